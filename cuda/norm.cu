// norm.cu — RMSNorm forward and backward, fp32: the twin of
// src/backend/cpu/norm.rs (the spec; read its doc for the formulas).
//
// Math, per row x in R^D with weight w in R^D:
//   r   = 1 / sqrt(f32(sum_j x_j^2 / D) + eps)   sum in f64 (x_j^2 is exact in
//                                              f64), mean rounded to f32, then
//                                              eps added, sqrt and 1/. in f32
//   y_j = w_j * (x_j * r)                       two f32 roundings, this order
// Backward, g_j = f32(dy_j * w_j):
//   dot  = sum_j g_j * x_j                      in f64 (products exact)
//   c    = f32(r^3 * dot / D)                   in f64, rounded once
//   dx_j = r * g_j - c * x_j                    f32, no FMA
//   dw_j += f32( sum_rows dy_j * f32(x_j * r) ) f64 column sums, added in f32
// Every f32 step is written with an _rn intrinsic and the module is compiled
// with --fmad=false, so the only difference from the CPU is the order of the
// f64 sums (the CPU sums 4 lanes then the tail; here a fixed tree). Rounding
// an f64 sum to f32 hides that almost always: results are bit-exact except
// where an f64 sum lies within ~D*2^-53 of an f32 rounding boundary.
//
// Layout: x, y, dy, dx [rows, D] row-major; w, dw [D]; rstd [rows].
// Memory traffic: forward reads x twice per row (the second pass hits L1/L2)
// and w, writes y (+ rstd). Backward dx reads x, dy twice and w, writes dx.
// dw: one pass over x and dy by column bands (coalesced across threads),
// into f64 partials [chunks, D], then a pass over the partials.
// Launch: rows kernels one block of NORM_THREADS per row; dw kernels one
// thread per column, gridDim.y = row chunks.
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NORM_THREADS 256

// f32 -> bf16 bits, round to nearest even (NaN kept quiet): bit for bit
// elementwise.cu's conversion and half::bf16::from_f32.
__device__ __forceinline__ u16 norm_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Sum of v over the block, the same value returned to every thread. Fixed
// order (xor butterfly in each warp, then over the warps' sums), so the
// result does not depend on scheduling. blockDim.x is a multiple of 32.
__device__ __forceinline__ double norm_block_sum(double v) {
    __shared__ double sh[32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
    const u32 lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();  // sh may still be read by a previous call
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? sh[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// The forward of one row: y = w * (x * r) into y (fp32) and/or yb (its
// bf16 rounding), either pointer null to skip it; rstd[row] = r when rstd is
// not null.
// yb's rows are ld elements apart (dim, or more for a wide operand).
__device__ __forceinline__ void norm_fwd_row(const float* __restrict__ x, const float* __restrict__ w, u32 rows, u32 dim, float eps,
                                             float* __restrict__ y, u16* __restrict__ yb, float* __restrict__ rstd, u64 ld) {
    const u32 row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (u64)row * dim;
    double acc = 0.0;
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x) {
        const double v = (double)xr[j];
        acc = __dadd_rn(acc, __dmul_rn(v, v));
    }
    acc = norm_block_sum(acc);
    const float var = __double2float_rn(__ddiv_rn(acc, (double)dim));
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = __fmul_rn(w[j], __fmul_rn(xr[j], r));
        if (y) y[(u64)row * dim + j] = v;
        if (yb) yb[(u64)row * ld + j] = norm_bf16(v);
    }
    if (rstd != 0 && threadIdx.x == 0) rstd[row] = r;
}

// y = w * (x * r); rstd[row] = r when rstd is not null. grid = rows.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_rmsnorm_fwd_f32(const float* __restrict__ x, const float* __restrict__ w, u32 rows, u32 dim, float eps,
                         float* __restrict__ y, float* __restrict__ rstd) {
    norm_fwd_row(x, w, rows, dim, eps, y, 0, rstd, dim);
}

// The same with y's bf16 rounding written to yb too (the bf16 compute
// mode's matrix-product operand, no separate conversion pass); y may be
// null where only the bf16 copy is used. grid = rows.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_rmsnorm_fwd_out_f32(const float* __restrict__ x, const float* __restrict__ w, u32 rows, u32 dim, float eps,
                             float* __restrict__ y, u16* __restrict__ yb, float* __restrict__ rstd) {
    norm_fwd_row(x, w, rows, dim, eps, y, yb, rstd, dim);
}

// The bf16 form alone into rows of ld >= dim elements (a wide operand: the
// folded adapter products' x·A^T columns go beside it), columns dim..ld
// zeroed; the same bf16 values as norm_rmsnorm_fwd_out_f32. grid = rows.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_rmsnorm_fwd_wide_bf16(const float* __restrict__ x, const float* __restrict__ w, u32 rows, u32 dim, float eps,
                               u64 ld, u16* __restrict__ yb, float* __restrict__ rstd) {
    norm_fwd_row(x, w, rows, dim, eps, 0, yb, rstd, ld);
    if (blockIdx.x < rows)
        for (u64 j = dim + threadIdx.x; j < ld; j += blockDim.x) yb[(u64)blockIdx.x * ld + j] = 0;
}

// dx = r * (dy * w) - c * x, c = f32(r^3 * sum(dy*w*x) / D); with res
// not null, dx += res (one more f32 addition: the residual stream's
// gradient, bit for bit elementwise_add_f32 after the norm's); with dxb not
// null, dx's bf16 rounding goes there too (the next product's operand).
// dxb's rows are ld elements apart (dim, or more for a wide operand).
__device__ __forceinline__ void norm_bwd_dx_row(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ rstd,
                                                const float* __restrict__ dy, u32 rows, u32 dim, const float* __restrict__ res,
                                                float* __restrict__ dx, u16* __restrict__ dxb, u64 ld) {
    const u32 row = blockIdx.x;
    if (row >= rows) return;
    const u64 o = (u64)row * dim;
    double dot = 0.0;
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x)
        dot = __dadd_rn(dot, __dmul_rn((double)__fmul_rn(dy[o + j], w[j]), (double)x[o + j]));
    dot = norm_block_sum(dot);
    const float r = rstd[row];
    const double rd = (double)r;
    // CPU: r as f64 * r as f64 * r as f64 * dot / dim as f64, left to right.
    const float c = __double2float_rn(__ddiv_rn(__dmul_rn(__dmul_rn(__dmul_rn(rd, rd), rd), dot), (double)dim));
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = __fsub_rn(__fmul_rn(r, __fmul_rn(dy[o + j], w[j])), __fmul_rn(c, x[o + j]));
        if (res) v = __fadd_rn(v, res[o + j]);
        dx[o + j] = v;
        if (dxb) dxb[(u64)row * ld + j] = norm_bf16(v);
    }
}

// dx = r * (dy * w) - c * x, c = f32(r^3 * sum(dy*w*x) / D). grid = rows.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_rmsnorm_bwd_dx_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ rstd,
                            const float* __restrict__ dy, u32 rows, u32 dim, float* __restrict__ dx) {
    norm_bwd_dx_row(x, w, rstd, dy, rows, dim, 0, dx, 0, dim);
}

// The same plus the residual res (dx = norm's dx + res) and, with dxb not
// null, dx's bf16 rounding. grid = rows.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_rmsnorm_bwd_dx_out_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ rstd,
                                const float* __restrict__ dy, u32 rows, u32 dim, const float* __restrict__ res,
                                float* __restrict__ dx, u16* __restrict__ dxb) {
    norm_bwd_dx_row(x, w, rstd, dy, rows, dim, res, dx, dxb, dim);
}

// The same with dxb a wide operand: rows ld >= dim apart, columns dim..ld
// zeroed (an adapter's gradient block goes there). grid = rows.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_rmsnorm_bwd_dx_wide_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ rstd,
                                 const float* __restrict__ dy, u32 rows, u32 dim, const float* __restrict__ res,
                                 float* __restrict__ dx, u64 ld, u16* __restrict__ dxb) {
    norm_bwd_dx_row(x, w, rstd, dy, rows, dim, res, dx, dxb, ld);
    if (blockIdx.x < rows)
        for (u64 j = dim + threadIdx.x; j < ld; j += blockDim.x) dxb[(u64)blockIdx.x * ld + j] = 0;
}

// partial[chunk, j] = sum over rows [chunk*rows_per, min(rows, +rows_per))
// of dy[i, j] * f32(x[i, j] * r_i), in f64, in row order.
// grid = (ceil(dim / NORM_THREADS), chunks).
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_rmsnorm_bwd_dw_partial_f32(const float* __restrict__ x, const float* __restrict__ rstd, const float* __restrict__ dy,
                                    u32 rows, u32 dim, u32 rows_per, double* __restrict__ partial) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    const u32 r0 = blockIdx.y * rows_per;
    const u32 r1 = min(rows, r0 + rows_per);
    double acc = 0.0;
    for (u32 i = r0; i < r1; ++i) {
        const u64 o = (u64)i * dim + j;
        acc = __dadd_rn(acc, __dmul_rn((double)dy[o], (double)__fmul_rn(x[o], rstd[i])));
    }
    partial[(u64)blockIdx.y * dim + j] = acc;
}

// dw[j] += f32(sum_chunk partial[chunk, j]), chunks in order. grid = ceil(dim / NORM_THREADS).
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_rmsnorm_bwd_dw_finish_f32(const double* __restrict__ partial, u32 dim, u32 chunks, float* __restrict__ dw) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    double acc = 0.0;
    for (u32 c = 0; c < chunks; ++c) acc = __dadd_rn(acc, partial[(u64)c * dim + j]);
    dw[j] = __fadd_rn(dw[j], __double2float_rn(acc));
}
