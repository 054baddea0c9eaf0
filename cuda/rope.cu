// rope.cu — rotary position embeddings (HF "rotate_half" convention), forward
// and backward, fp32: the twin of src/backend/cpu/rope.rs (the spec); in place,
// or out of place into a bf16 copy (and optionally fp32) for the bf16 step.
//
// Math: x is [B, T, H, D] row-major, 2*half <= D. The head vector at
// (b, t, h) has its first 2*half elements split into halves x1 = x[..half],
// x2 = x[half..2*half] (not interleaved pairs); the rest (a partial
// rotation, Phi-4-mini's partial_rotary_factor) passes through unchanged.
// Pair i is rotated by the table row t (cos/sin [len, half], len >= T):
//   forward:  y1 = x1*cos - x2*sin      y2 = x2*cos + x1*sin
//   backward: the inverse rotation, sin -> -sin.
// Rounding as the CPU (HF's fp32 order): y1 = (a*c) + ((-b)*s), y2 = (b*c) +
// (a*s), each product and the sum rounded once (no FMA: --fmad=false and _rn
// intrinsics). With the same table the result is bit for bit the CPU's.
//
// Memory traffic: one read and one write of x (in place; out of place the
// write is the bf16 copy, plus fp32 when asked for); the table row
// (2*half floats) is read per token and stays in L1/L2 across heads and
// batch rows. One thread per (head vector, item): items 0..half are the
// pairs (consecutive threads touch consecutive x1 and x2 elements: two
// coalesced streams), items half..D-half the passed-through elements (their
// bf16 copy written where one is asked for). Grid-stride loop over
// items = B*T*H*(D - half).
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define ROPE_THREADS 256

// f32 -> bf16 bits, round to nearest even (NaN kept quiet): bit for bit
// elementwise.cu's conversion and half::bf16::from_f32.
__device__ __forceinline__ u16 rope_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// In place on x; with yb (not null) the result's bf16 rounding too.
__device__ __forceinline__ void rope_rotate(float* x, u16* __restrict__ yb, u32 seq, u32 heads, u32 half, u32 D, u64 items,
                                            const float* __restrict__ cos_t, const float* __restrict__ sin_t, float sign) {
    const u32 per = D - half;
    for (u64 p = (u64)blockIdx.x * blockDim.x + threadIdx.x; p < items; p += (u64)gridDim.x * blockDim.x) {
        const u64 vec = p / per;            // head vector index (b, t, h)
        const u32 i = (u32)(p - vec * per);  // item within the vector
        const u64 base = vec * D;
        if (i >= half) {  // passed through: x stays, its bf16 copy is written
            if (yb) yb[base + half + i] = rope_bf16(x[base + half + i]);
            continue;
        }
        const u32 t = (u32)((vec / heads) % seq);
        const float c = cos_t[(u64)t * half + i];
        const float s = sign * sin_t[(u64)t * half + i];  // exact (sign is +-1)
        const float a = x[base + i], b = x[base + half + i];
        const float y1 = __fadd_rn(__fmul_rn(a, c), __fmul_rn(-b, s)), y2 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
        x[base + i] = y1;
        x[base + half + i] = y2;
        if (yb) {
            yb[base + i] = rope_bf16(y1);
            yb[base + half + i] = rope_bf16(y2);
        }
    }
}

// In place on x [B, T, H, D]: rotate by +theta. items = B*T*H*(D - half).
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_fwd_f32(float* x, u32 seq, u32 heads, u32 half, u32 D, u64 items, const float* __restrict__ cos_t, const float* __restrict__ sin_t) {
    rope_rotate(x, nullptr, seq, heads, half, D, items, cos_t, sin_t, 1.0f);
}

// In place on dy [B, T, H, D]: rotate by -theta (dy -> dx).
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_bwd_f32(float* dy, u32 seq, u32 heads, u32 half, u32 D, u64 items, const float* __restrict__ cos_t, const float* __restrict__ sin_t) {
    rope_rotate(dy, nullptr, seq, heads, half, D, items, cos_t, sin_t, -1.0f);
}

// In place with the bf16 rounding too (the bf16 step's products take it;
// the fp32 result stays for the fp32 consumers): bit for bit rope_fwd_f32 /
// rope_bwd_f32 followed by elementwise_f32_to_bf16, in one pass.
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_fwd_inplace_out_f32(float* x, u16* __restrict__ yb, u32 seq, u32 heads, u32 half, u32 D, u64 items, const float* __restrict__ cos_t,
                             const float* __restrict__ sin_t) {
    rope_rotate(x, yb, seq, heads, half, D, items, cos_t, sin_t, 1.0f);
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_bwd_inplace_out_f32(float* dy, u16* __restrict__ dxb, u32 seq, u32 heads, u32 half, u32 D, u64 items, const float* __restrict__ cos_t,
                             const float* __restrict__ sin_t) {
    rope_rotate(dy, dxb, seq, heads, half, D, items, cos_t, sin_t, -1.0f);
}

// Out of place for the bf16 step: x [B, T, H, D] rotated by +theta
// (sign 1) or -theta (sign -1) into y (fp32, skipped when null) and yb (its
// bf16 rounding, the tensor-core attention's or a product's operand): bit
// for bit the in-place kernels followed by elementwise_f32_to_bf16.
// yb's rows (one per token, heads * D values) start ld elements
// apart, at column off (ld = heads * D and off = 0: contiguous).
__device__ __forceinline__ void rope_rotate_out(const float* __restrict__ x, float* __restrict__ y, u16* __restrict__ yb, u32 seq, u32 heads, u32 half,
                                                u32 D, u64 items, const float* __restrict__ cos_t, const float* __restrict__ sin_t, float sign,
                                                u64 ld, u64 off) {
    const u32 per = D - half;
    for (u64 p = (u64)blockIdx.x * blockDim.x + threadIdx.x; p < items; p += (u64)gridDim.x * blockDim.x) {
        const u64 vec = p / per;
        const u32 i = (u32)(p - vec * per);
        const u64 base = vec * D;
        const u64 bb = (vec / heads) * ld + off + (vec % heads) * D;
        if (i >= half) {  // passed through
            const float v = x[base + half + i];
            if (y) y[base + half + i] = v;
            yb[bb + half + i] = rope_bf16(v);
            continue;
        }
        const u32 t = (u32)((vec / heads) % seq);
        const float c = cos_t[(u64)t * half + i];
        const float s = sign * sin_t[(u64)t * half + i];
        const float a = x[base + i], b = x[base + half + i];
        const float y1 = __fadd_rn(__fmul_rn(a, c), __fmul_rn(-b, s)), y2 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
        if (y) {
            y[base + i] = y1;
            y[base + half + i] = y2;
        }
        yb[bb + i] = rope_bf16(y1);
        yb[bb + half + i] = rope_bf16(y2);
    }
}

// Forward (+theta) out of place: y (optional) and its bf16 rounding yb,
// whose token rows start ld elements apart at column off (ld = heads *
// D and off = 0: contiguous; more: a block of a wide operand, such
// as the stacked input-gradient product's [dq | dk | dv | ...]).
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_fwd_out_f32(const float* __restrict__ x, float* __restrict__ y, u16* __restrict__ yb, u32 seq, u32 heads, u32 half, u32 D, u64 items,
                     const float* __restrict__ cos_t, const float* __restrict__ sin_t, u64 ld, u64 off) {
    rope_rotate_out(x, y, yb, seq, heads, half, D, items, cos_t, sin_t, 1.0f, ld, off);
}

// Backward (-theta) out of place: dx (optional) and its bf16 rounding, laid
// out as the forward's.
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_bwd_out_f32(const float* __restrict__ dy, float* __restrict__ dx, u16* __restrict__ dxb, u32 seq, u32 heads, u32 half, u32 D, u64 items,
                     const float* __restrict__ cos_t, const float* __restrict__ sin_t, u64 ld, u64 off) {
    rope_rotate_out(dy, dx, dxb, seq, heads, half, D, items, cos_t, sin_t, -1.0f, ld, off);
}
