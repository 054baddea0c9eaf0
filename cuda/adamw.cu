// adamw.cu — one AdamW step (PyTorch semantics: torch.optim.AdamW with
// foreach=False, fused=False), fp32: the twin of adamw_update in
// src/optim/adamw.rs (the spec; read its doc). The step's scalars are
// computed once on the host in f64 and rounded to f32 (AdamWScalars) and
// passed in; per element, in this order:
//   p  = p * decay                                if has_decay
//   m  = lerp(m, g, w1)    = fma(w1, g - m, m)          if |w1| < 0.5
//                          = fma(w1 - 1, g - m, g)      else       (ATen lerp)
//   v  = fma(omb2 * g, g, v * beta2)                               (addcmul_)
//   denom = sqrt(v) / bc2_sqrt + eps                  (IEEE sqrt and division)
//   p  = p + (neg_step * m) / denom                                (addcdiv_)
// Every operation is written with an _rn intrinsic (--fmad=false: nothing
// else is contracted), so the result is the CPU's bit for bit.
//
// Memory traffic: reads p, g, m, v and writes p, m, v: 28 bytes per
// element, one pass. One thread per element, grid-stride loop.
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned int u32;
typedef unsigned long long u64;

#define ADAMW_THREADS 256

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
    adamw_update_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v, u64 n,
                     u32 has_decay, float decay, float w1, float beta2, float omb2, float bc2_sqrt, float eps, float neg_step) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float pv = p[i];
        const float gv = g[i], m0 = m[i], v0 = v[i];
        if (has_decay) pv = __fmul_rn(pv, decay);
        const float diff = __fsub_rn(gv, m0);
        const float mv = fabsf(w1) < 0.5f ? __fmaf_rn(w1, diff, m0) : __fmaf_rn(__fsub_rn(w1, 1.0f), diff, gv);
        const float vv = __fmaf_rn(__fmul_rn(omb2, gv), gv, __fmul_rn(v0, beta2));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), bc2_sqrt), eps);
        p[i] = __fadd_rn(pv, __fdiv_rn(__fmul_rn(neg_step, mv), denom));
        m[i] = mv;
        v[i] = vv;
    }
}
