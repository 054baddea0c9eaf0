// dense.cu — dense (unquantized) kernels. For now one: the batch-1 bf16
// GEMV, the baseline NF4 GEMV is measured against and the second half of
// "dequantize to bf16, then GEMV".
//
// Math: y[r] = bf16( sum_k W[r,k] * x[k] ), W bf16 [rows, in] row-major,
// x and y bf16, fp32 accumulation with fused multiply-adds (the order differs
// from any CPU loop, so results are compared within a bound, not bit for bit).
//
// Memory traffic: reads 2*rows*in bytes of W once (streamed) and x (2*in
// bytes) once per row from L1/L2, writes 2*rows bytes. One warp per row;
// when in % 8 == 0 each lane loads 16 bytes (8 elements) of W and of x per
// step, else it walks element by element. `W` and `x` must be 16-byte
// aligned for the vector path (checked by the host).
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float dense_bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// f32 -> bf16, round to nearest even (bit for bit half::bf16::from_f32).
__device__ __forceinline__ u16 dense_f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float dot_bf16x2(u32 w, u32 x, float acc) {
    acc = __fmaf_rn(__uint_as_float(w << 16), __uint_as_float(x << 16), acc);
    acc = __fmaf_rn(__uint_as_float(w & 0xffff0000u), __uint_as_float(x & 0xffff0000u), acc);
    return acc;
}

// Launch: blockDim.x = 32 * DENSE_GEMV_ROWS, grid = ceil(rows / DENSE_GEMV_ROWS).
#define DENSE_GEMV_ROWS 4

extern "C" __global__ void __launch_bounds__(32 * DENSE_GEMV_ROWS)
    dense_gemv_bf16(const u16* __restrict__ w, u32 rows, u32 in, const u16* __restrict__ x, u16* __restrict__ y) {
    const u32 lane = threadIdx.x & 31;
    const u32 r = blockIdx.x * DENSE_GEMV_ROWS + (threadIdx.x >> 5);
    if (r >= rows) return;
    const u64 row0 = (u64)r * in;
    float acc = 0.0f;
    if ((in & 7u) == 0) {
        const uint4* __restrict__ wv = (const uint4*)(w + row0);
        const uint4* __restrict__ xv = (const uint4*)x;
        const u32 nvec = in >> 3;
#pragma unroll 4
        for (u32 c = lane; c < nvec; c += 32) {
            const uint4 a = wv[c];
            const uint4 b = xv[c];
            acc = dot_bf16x2(a.x, b.x, acc);
            acc = dot_bf16x2(a.y, b.y, acc);
            acc = dot_bf16x2(a.z, b.z, acc);
            acc = dot_bf16x2(a.w, b.w, acc);
        }
    } else {
        for (u32 k = lane; k < in; k += 32)
            acc = __fmaf_rn(dense_bf16_to_f32(w[row0 + k]), dense_bf16_to_f32(x[k]), acc);
    }
#pragma unroll
    for (u32 off = 16; off > 0; off >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, off));
    if (lane == 0) y[r] = dense_f32_to_bf16(acc);
}
