// rope.cu — rotary position embeddings (HF "rotate_half" convention), forward
// and backward in place, fp32: the twin of src/backend/cpu/rope.rs (the spec).
//
// Math: x is [B, T, H, D] row-major, D = 2*half. The head vector at (b, t, h)
// is split into halves x1 = x[..half], x2 = x[half..] (not interleaved pairs),
// and pair i is rotated by the table row t (cos/sin [len, half], len >= T):
//   forward:  y1 = x1*cos - x2*sin      y2 = x2*cos + x1*sin
//   backward: the inverse rotation, sin -> -sin.
// Rounding as the CPU (HF's fp32 order): y1 = (a*c) + ((-b)*s), y2 = (b*c) +
// (a*s), each product and the sum rounded once (no FMA: --fmad=false and _rn
// intrinsics). With the same table the result is bit for bit the CPU's.
//
// Memory traffic: one read and one write of x, in place; the table row
// (2*half floats) is read per token and stays in L1/L2 across heads and
// batch rows. One thread per (head vector, pair): consecutive threads touch
// consecutive x1 and x2 elements (two coalesced streams). Grid-stride loop.
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned int u32;
typedef unsigned long long u64;

#define ROPE_THREADS 256

__device__ __forceinline__ void rope_rotate(float* x, u32 seq, u32 heads, u32 half, u64 pairs,
                                            const float* __restrict__ cos_t, const float* __restrict__ sin_t, float sign) {
    for (u64 p = (u64)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (u64)gridDim.x * blockDim.x) {
        const u64 vec = p / half;            // head vector index (b, t, h)
        const u32 i = (u32)(p - vec * half);  // pair within the vector
        const u32 t = (u32)((vec / heads) % seq);
        const u64 base = vec * 2 * half;
        const float c = cos_t[(u64)t * half + i];
        const float s = sign * sin_t[(u64)t * half + i];  // exact (sign is +-1)
        const float a = x[base + i], b = x[base + half + i];
        x[base + i] = __fadd_rn(__fmul_rn(a, c), __fmul_rn(-b, s));
        x[base + half + i] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}

// In place on x [B, T, H, 2*half]: rotate by +theta. pairs = B*T*H*half.
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_fwd_f32(float* x, u32 seq, u32 heads, u32 half, u64 pairs, const float* __restrict__ cos_t, const float* __restrict__ sin_t) {
    rope_rotate(x, seq, heads, half, pairs, cos_t, sin_t, 1.0f);
}

// In place on dy [B, T, H, 2*half]: rotate by -theta (dy -> dx).
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_bwd_f32(float* dy, u32 seq, u32 heads, u32 half, u64 pairs, const float* __restrict__ cos_t, const float* __restrict__ sin_t) {
    rope_rotate(dy, seq, heads, half, pairs, cos_t, sin_t, -1.0f);
}
