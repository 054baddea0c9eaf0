// swiglu.cu — SwiGLU gating of the LLaMA MLP, forward and backward, fp32:
// the twin of src/backend/cpu/swiglu.rs (the spec).
//
// Math, elementwise (any shape, flattened):
//   s       = 1 / (1 + exp(-g))
//   silu(g) = g / (1 + exp(-g))            (PyTorch CPU's formula)
//   h       = silu(g) * u
//   du      = dh * silu(g)
//   dg      = ((dh * u) * s) * (1 + g * (1 - s))
// Each operation is rounded once, in the CPU's order (_rn intrinsics,
// --fmad=false). The one difference is expf: CUDA's (max 2 ulp) against the
// CPU libm's (< 1 ulp), so results agree within a few ulp, not bit for bit
// (bounds in src/backend/cuda/swiglu.rs).
//
// Memory traffic: forward reads 2 and writes 1 float per element; backward
// reads 3 and writes 2 (the in-place variant writes over gate and up).
// One thread per element, grid-stride loop.
//
// The `_out` kernels serve the bf16 compute mode: each fuses the conversions
// around the gating into the one pass, with optional (null: skipped)
// outputs, so only what the step goes on to use is written. A bf16 output
// is the fp32 result rounded to nearest even (bit for bit the fp32 kernel
// followed by elementwise_f32_to_bf16); bf16 inputs are widened exactly.
//   swiglu_fwd_out_f32    g, u fp32     -> h fp32 / bf16, g and u as bf16
//                         (the forward keeps gate and up for the backward in
//                         bf16): 8 bytes read, up to 10 written per element
//                         where the unfused chain moved 30.
//   swiglu_fwd_inplace_out_f32  the same with h written over g.
//   swiglu_fwd_out_bf16   g, u bf16     -> h fp32 / bf16 (the backward's
//                         recomputation of the down projection's input).
//   swiglu_bwd_out_bf16   g, u bf16, dh -> dgate, dup fp32 / bf16
//                         (swiglu_bwd_out_bf16dh: dh in bf16 too;
//                         swiglu_bwd_inplace_bf16all: every output in
//                         place but the fp32 dup).
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned long long u64;

#define SWIGLU_THREADS 256

typedef unsigned short u16;
typedef unsigned int u32;

// f32 -> bf16 bits, round to nearest even (NaN kept quiet): bit for bit
// elementwise.cu's conversion and half::bf16::from_f32.
__device__ __forceinline__ u16 swiglu_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float swiglu_widen(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ float swiglu_silu(float g) { return __fdiv_rn(g, __fadd_rn(1.0f, expf(-g))); }

__device__ __forceinline__ void swiglu_grad(float g, float u, float dh, float* dg, float* du) {
    const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
    const float dsilu = __fmul_rn(dh, u);
    *dg = __fmul_rn(__fmul_rn(dsilu, s), __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s))));
    *du = __fmul_rn(dh, swiglu_silu(g));
}

// GeGLU (Gemma): the gate's activation is PyTorch's tanh-approximated GELU,
// in the CPU twin's order (src/backend/cpu/swiglu.rs):
//   inner = beta * (x + kappa * x^3), beta = sqrt(2/pi), kappa = 0.044715
//   gelu  = (0.5 * x) * (1 + tanh(inner))
//   gelu' = 0.5 * (1 + t) + (0.5 * x) * (1 - t * t) * (beta * (1 + 3 * kappa * x^2))
//   dgate = (dh * u) * gelu'(g), dup = dh * gelu(g)
// tanhf (CUDA: max 2 ulp) against the CPU's vexp::tanh (<= 1.46 ulp).
#define GLU_BETA 0.7978845834732056f
#define GLU_KAPPA 0.044715f
__device__ __forceinline__ float glu_gelu(float x) {
    const float inner = __fmul_rn(GLU_BETA, __fadd_rn(x, __fmul_rn(GLU_KAPPA, __fmul_rn(__fmul_rn(x, x), x))));
    return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, tanhf(inner)));
}

__device__ __forceinline__ float glu_gelu_grad(float x) {
    const float x_sq = __fmul_rn(x, x);
    const float inner = __fmul_rn(GLU_BETA, __fadd_rn(x, __fmul_rn(GLU_KAPPA, __fmul_rn(x_sq, x))));
    const float t = tanhf(inner);
    const float left = __fmul_rn(0.5f, x);
    const float right = __fadd_rn(1.0f, t);
    const float left_d = __fmul_rn(0.5f, right);
    const float right_d = __fmul_rn(__fmul_rn(left, __fsub_rn(1.0f, __fmul_rn(t, t))), __fmul_rn(GLU_BETA, __fadd_rn(1.0f, __fmul_rn(__fmul_rn(3.0f, GLU_KAPPA), x_sq))));
    return __fadd_rn(left_d, right_d);
}

// The gate's activation: act 0 silu (SwiGLU), 1 tanh-GELU (GeGLU). Every
// kernel takes act as its last parameter (uniform over the launch).
__device__ __forceinline__ float glu_act(float g, u32 act) { return act ? glu_gelu(g) : swiglu_silu(g); }

__device__ __forceinline__ void glu_grad(float g, float u, float dh, u32 act, float* dg, float* du) {
    if (act) {
        *dg = __fmul_rn(__fmul_rn(dh, u), glu_gelu_grad(g));
        *du = __fmul_rn(dh, glu_gelu(g));
    } else {
        swiglu_grad(g, u, dh, dg, du);
    }
}

// h = silu(gate) * up.
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_fwd_f32(const float* __restrict__ gate, const float* __restrict__ up, u64 n, float* __restrict__ h, u32 act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        h[i] = __fmul_rn(glu_act(gate[i], act), up[i]);
}

// dgate, dup from gate, up, dh (all written).
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_f32(const float* __restrict__ gate, const float* __restrict__ up, const float* __restrict__ dh, u64 n,
                   float* __restrict__ dgate, float* __restrict__ dup, u32 act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float dg, du;
        glu_grad(gate[i], up[i], dh[i], act, &dg, &du);
        dgate[i] = dg;
        dup[i] = du;
    }
}

// In place: gate <- dgate, up <- dup.
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_inplace_f32(float* __restrict__ gate, float* __restrict__ up, const float* __restrict__ dh, u64 n, u32 act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float dg, du;
        glu_grad(gate[i], up[i], dh[i], act, &dg, &du);
        gate[i] = dg;
        up[i] = du;
    }
}

// h = silu(gate) * up from fp32 gate, up; writes h (fp32 and/or bf16) and
// the bf16 roundings of gate and up, each output optional (null: skipped).
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_fwd_out_f32(const float* __restrict__ gate, const float* __restrict__ up, u64 n, float* __restrict__ h,
                       u16* __restrict__ hb, u16* __restrict__ gb, u16* __restrict__ ub, u32 act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float g = gate[i], u = up[i];
        const float y = __fmul_rn(glu_act(g, act), u);
        if (h) h[i] = y;
        if (hb) hb[i] = swiglu_bf16(y);
        if (gb) gb[i] = swiglu_bf16(g);
        if (ub) ub[i] = swiglu_bf16(u);
    }
}

// swiglu_fwd_out_f32 in place: h (fp32) written over gate, the bf16
// outputs each optional (the bf16 step's forward: no third fp32 buffer
// beside gate and up). Each element is read before it is written, by the
// one thread that writes it.
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_fwd_inplace_out_f32(float* __restrict__ gate, const float* __restrict__ up, u64 n, u16* __restrict__ hb,
                               u16* __restrict__ gb, u16* __restrict__ ub, u32 act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float g = gate[i], u = up[i];
        const float y = __fmul_rn(glu_act(g, act), u);
        gate[i] = y;
        if (hb) hb[i] = swiglu_bf16(y);
        if (gb) gb[i] = swiglu_bf16(g);
        if (ub) ub[i] = swiglu_bf16(u);
    }
}

// h = silu(gate) * up from bf16 gate, up (widened exactly); h fp32 and/or
// bf16, each optional.
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_fwd_out_bf16(const u16* __restrict__ gate, const u16* __restrict__ up, u64 n, float* __restrict__ h, u16* __restrict__ hb, u32 act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float y = __fmul_rn(glu_act(swiglu_widen(gate[i]), act), swiglu_widen(up[i]));
        if (h) h[i] = y;
        if (hb) hb[i] = swiglu_bf16(y);
    }
}

// h = silu(gate) * up from bf16 gate, up [rows, cols] whose rows start
// in_ld elements apart (cols: separate buffers; more: gate and up side by
// side in one wide buffer, up = gate + cols) into bf16 rows of ld >= cols
// (ld > cols: a wide operand, the folded down projection's x·A^T columns go
// after), columns cols..ld zeroed; the values of swiglu_fwd_out_bf16's hb.
// Grid-stride over rows * ld.
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_fwd_wide_bf16(const u16* __restrict__ gate, const u16* __restrict__ up, u64 rows, u32 cols, u64 in_ld, u64 ld,
                         u16* __restrict__ hb, u32 act) {
    const u64 n = rows * ld;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / ld, c = i % ld;
        if (c < cols) {
            const u64 j = r * in_ld + c;
            hb[i] = swiglu_bf16(__fmul_rn(glu_act(swiglu_widen(gate[j]), act), swiglu_widen(up[j])));
        } else {
            hb[i] = 0;
        }
    }
}

__device__ __forceinline__ float swiglu_ld(const float* p) { return *p; }
__device__ __forceinline__ float swiglu_ld(const u16* p) { return swiglu_widen(*p); }

template <typename TD>
__device__ __forceinline__ void swiglu_bwd_out(const u16* __restrict__ gate, const u16* __restrict__ up, const TD* __restrict__ dh, u64 n,
                                               float* __restrict__ dgate, float* __restrict__ dup, u16* __restrict__ dgate_b, u16* __restrict__ dup_b, u32 act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float dg, du;
        glu_grad(swiglu_widen(gate[i]), swiglu_widen(up[i]), swiglu_ld(dh + i), act, &dg, &du);
        if (dgate) dgate[i] = dg;
        if (dup) dup[i] = du;
        if (dgate_b) dgate_b[i] = swiglu_bf16(dg);
        if (dup_b) dup_b[i] = swiglu_bf16(du);
    }
}

// dgate, dup from bf16 gate, up (widened exactly) and fp32 dh; each of the
// fp32 and bf16 outputs optional.
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_out_bf16(const u16* __restrict__ gate, const u16* __restrict__ up, const float* __restrict__ dh, u64 n,
                        float* __restrict__ dgate, float* __restrict__ dup, u16* __restrict__ dgate_b, u16* __restrict__ dup_b, u32 act) {
    swiglu_bwd_out(gate, up, dh, n, dgate, dup, dgate_b, dup_b, act);
}

// The same with dh in bf16 too (widened exactly: the fp32-dh kernel's bits
// on the widened dh).
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_out_bf16dh(const u16* __restrict__ gate, const u16* __restrict__ up, const u16* __restrict__ dh, u64 n,
                          float* __restrict__ dgate, float* __restrict__ dup, u16* __restrict__ dgate_b, u16* __restrict__ dup_b, u32 act) {
    swiglu_bwd_out(gate, up, dh, n, dgate, dup, dgate_b, dup_b, act);
}

// In place from bf16 gate and up: gate <- bf16(dgate), up <- bf16(dup), the
// bf16 outputs of swiglu_bwd_out_bf16 / _bf16dh (each element read before
// it is written, by the one thread that writes it).
template <typename TD>
__device__ __forceinline__ void swiglu_bwd_inplace_b(u16* gate, u16* up, const TD* __restrict__ dh, u64 n, u32 act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float dg, du;
        glu_grad(swiglu_widen(gate[i]), swiglu_widen(up[i]), swiglu_ld(dh + i), act, &dg, &du);
        gate[i] = swiglu_bf16(dg);
        up[i] = swiglu_bf16(du);
    }
}

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_inplace_bf16(u16* __restrict__ gate, u16* __restrict__ up, const float* __restrict__ dh, u64 n, u32 act) {
    swiglu_bwd_inplace_b(gate, up, dh, n, act);
}

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_inplace_bf16dh(u16* __restrict__ gate, u16* __restrict__ up, const u16* __restrict__ dh, u64 n, u32 act) {
    swiglu_bwd_inplace_b(gate, up, dh, n, act);
}

// In place, every output: from bf16 gate and up and fp32 dh, dh <- the fp32
// dgate, dup <- the fp32 dup, gate <- bf16(dgate), up <- bf16(dup) — the
// four outputs of swiglu_bwd_out_bf16, bit for bit, with one fp32 buffer
// (dup) made instead of two fp32 and two bf16 (the default bf16 step's
// MLP backward, whose fp32 adapter products read the fp32 gradients and
// whose base products the bf16 ones). Each element is read before it is
// written, by the one thread that writes it.
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_inplace_bf16all(u16* __restrict__ gate, u16* __restrict__ up, float* __restrict__ dh, u64 n, float* __restrict__ dup, u32 act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float dg, du;
        glu_grad(swiglu_widen(gate[i]), swiglu_widen(up[i]), dh[i], act, &dg, &du);
        dh[i] = dg;
        dup[i] = du;
        gate[i] = swiglu_bf16(dg);
        up[i] = swiglu_bf16(du);
    }
}

// In place on gate and up side by side in one wide buffer gu [rows, ld]
// (gate in columns 0..cols, up in up_off..up_off+cols) from dh [rows, cols]:
// gate <- bf16(dgate), up <- bf16(dup), the bits of swiglu_bwd_inplace_bf16
// (fp32 dh) / _bf16dh (bf16 dh) on separate buffers. Grid-stride over
// rows * cols.
template <typename TD>
__device__ __forceinline__ void swiglu_bwd_pair_b(u16* gu, u64 rows, u32 cols, u64 ld, u64 up_off, const TD* __restrict__ dh, u32 act) {
    const u64 n = rows * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 g = (i / cols) * ld + i % cols, u = g + up_off;
        float dg, du;
        glu_grad(swiglu_widen(gu[g]), swiglu_widen(gu[u]), swiglu_ld(dh + i), act, &dg, &du);
        gu[g] = swiglu_bf16(dg);
        gu[u] = swiglu_bf16(du);
    }
}

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_pair_bf16(u16* __restrict__ gu, u64 rows, u32 cols, u64 ld, u64 up_off, const float* __restrict__ dh, u32 act) {
    swiglu_bwd_pair_b(gu, rows, cols, ld, up_off, dh, act);
}

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_pair_bf16dh(u16* __restrict__ gu, u64 rows, u32 cols, u64 ld, u64 up_off, const u16* __restrict__ dh, u32 act) {
    swiglu_bwd_pair_b(gu, rows, cols, ld, up_off, dh, act);
}
