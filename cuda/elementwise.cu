// elementwise.cu — the small elementwise kernels the device training step
// needs around the matrix products: residual and gradient sums, a scale,
// the bias add, the fp32 -> bf16 conversion of a matrix product's operand, the
// bf16 -> fp32 widening (set or add) of a bf16 GEMV's output, and the soft
// cap of the logits.
//
// Each is the twin of a one-line CPU loop: the sum `y += x` and the bias
// add are one IEEE fp32 addition per element (bit for bit the CPU's), the
// conversion rounds to nearest even as half::bf16::from_f32 (NaN kept
// quiet), bit for bit; the soft cap differs by tanhf against the CPU's
// vexp::tanh (both within 2 ulp).
//
// Grid-stride loops over u64 counts; launch: blockDim.x = EW_THREADS,
// any grid (the host caps it).
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define EW_THREADS 256

// f32 -> bf16, round to nearest even (bit for bit half::bf16::from_f32).
__device__ __forceinline__ u16 ew_f32_to_bf16_bits(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// y[i] += x[i], i < n.
extern "C" __global__ void __launch_bounds__(EW_THREADS) elementwise_add_f32(float* __restrict__ y, const float* __restrict__ x, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = __fadd_rn(y[i], x[i]);
}

// y[i] *= s, i < n (one IEEE fp32 product per element: the embedding
// multipliers of Granite and Gemma, as the CPU's x * s).
extern "C" __global__ void __launch_bounds__(EW_THREADS) elementwise_scale_f32(float* __restrict__ y, u64 n, float s) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = __fmul_rn(y[i], s);
}

// y[i] = cap * tanh(y[i] / cap), i < n, cap > 0: Gemma 2's soft cap of the
// logits returned (final_logit_softcapping), in the order of the CPU head's
// vexp::tanh(z / c) * c (the division and the product rounded as IEEE
// fp32; tanhf, max 2 ulp, against vexp::tanh, max 2 ulp: within a few ulp
// of cap, not bit for bit).
extern "C" __global__ void __launch_bounds__(EW_THREADS) elementwise_softcap_f32(float* __restrict__ y, u64 n, float cap) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = __fmul_rn(tanhf(__fdiv_rn(y[i], cap)), cap);
}

// y[r, c] += b[c] for r < rows, c < cols (y row-major).
extern "C" __global__ void __launch_bounds__(EW_THREADS) elementwise_add_bias_f32(float* __restrict__ y, const float* __restrict__ b, u64 rows, u32 cols) {
    const u64 n = rows * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = __fadd_rn(y[i], b[i % cols]);
}

// y[i] = bf16(x[i]), i < n.
extern "C" __global__ void __launch_bounds__(EW_THREADS) elementwise_f32_to_bf16(const float* __restrict__ x, u16* __restrict__ y, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = ew_f32_to_bf16_bits(x[i]);
}

// y[i] = widen(x[i]) (accumulate 0) or y[i] += widen(x[i]) (accumulate 1),
// x bf16 bits; i < n. Widening is exact.
extern "C" __global__ void __launch_bounds__(EW_THREADS) elementwise_bf16_to_f32(const u16* __restrict__ x, float* __restrict__ y, u64 n, u32 accumulate) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = __uint_as_float(((u32)x[i]) << 16);
        y[i] = accumulate ? __fadd_rn(y[i], v) : v;
    }
}

// dst[i * ld + off + j] = src[i * cols + j] for i < rows, j < cols: a
// contiguous [rows, cols] matrix (16-bit elements) copied into columns
// off..off+cols of a wider one [rows, ld] (the folded adapter products'
// x·A^T columns). Grid-stride over rows * cols.
extern "C" __global__ void __launch_bounds__(EW_THREADS)
    elementwise_copy_cols_u16(const u16* __restrict__ src, u64 rows, u32 cols, u64 ld, u64 off, u16* __restrict__ dst) {
    const u64 n = rows * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        dst[(i / cols) * ld + off + i % cols] = src[i];
}

// y[i * ld + off + j] = bf16(x[i * cols + j]) for i < rows, j < cols: the
// conversion of a contiguous [rows, cols] matrix into columns off..off+cols
// of a wider bf16 one [rows, ld]. Grid-stride over rows * cols.
extern "C" __global__ void __launch_bounds__(EW_THREADS)
    elementwise_f32_to_bf16_cols(const float* __restrict__ x, u64 rows, u32 cols, u64 ld, u64 off, u16* __restrict__ y) {
    const u64 n = rows * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[(i / cols) * ld + off + i % cols] = ew_f32_to_bf16_bits(x[i]);
}
