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
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned long long u64;

#define SWIGLU_THREADS 256

__device__ __forceinline__ float swiglu_silu(float g) { return __fdiv_rn(g, __fadd_rn(1.0f, expf(-g))); }

__device__ __forceinline__ void swiglu_grad(float g, float u, float dh, float* dg, float* du) {
    const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
    const float dsilu = __fmul_rn(dh, u);
    *dg = __fmul_rn(__fmul_rn(dsilu, s), __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s))));
    *du = __fmul_rn(dh, swiglu_silu(g));
}

// h = silu(gate) * up.
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_fwd_f32(const float* __restrict__ gate, const float* __restrict__ up, u64 n, float* __restrict__ h) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        h[i] = __fmul_rn(swiglu_silu(gate[i]), up[i]);
}

// dgate, dup from gate, up, dh (all written).
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_f32(const float* __restrict__ gate, const float* __restrict__ up, const float* __restrict__ dh, u64 n,
                   float* __restrict__ dgate, float* __restrict__ dup) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float dg, du;
        swiglu_grad(gate[i], up[i], dh[i], &dg, &du);
        dgate[i] = dg;
        dup[i] = du;
    }
}

// In place: gate <- dgate, up <- dup.
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_bwd_inplace_f32(float* __restrict__ gate, float* __restrict__ up, const float* __restrict__ dh, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float dg, du;
        swiglu_grad(gate[i], up[i], dh[i], &dg, &du);
        gate[i] = dg;
        up[i] = du;
    }
}
