// lora.cu — the LoRA product kernels, fp32: the twins of what
// src/lora/layer.rs (LoraLayer::forward_at, backward) computes on the CPU
// with gemm_f32. A is [r, in], B [out, r] (row-major, as Adapter stores
// them), x [n, in], y/dy [n, out], h/g [n, r]; s the adapter's scale.
//
// Math:
//   shrink     h[i, j]  = sum_k x[i, k] * A[j, k]              (h = x·Aᵀ)
//   expand     y[i, o] += s * sum_j h[i, j] * B[o, j]          (y += s·h·Bᵀ)
//   bgmv_*     the same per row i with adapter a = idx[i] (pointer tables
//              A[a], B[a], rank r_a, scale s_a); a row whose index is not in
//              [0, count) (−1: no adapter) gets h = 0 and y untouched.
//   bwd_g      g[i, j]  = sum_o dy[i, o] * B[o, j]             (g = dy·B)
//   bwd_dx    dx[i, c] += s * sum_j g[i, j] * A[j, c]          (dx += s·g·A)
//   bwd_outer  D[p, q] += s * sum_i U[i, p] * V[i, q]          dB (U=dy, V=h)
//                                                              dA (U=g, V=x)
//   dropout    x' = x ⊙ mask · 1/(1−p) (the adapter input when training
//              with LoRA dropout) and dx += s·(g·A) ⊙ mask · 1/(1−p), the
//              mask a counter-based hash of (seed, call, element), bit for
//              bit the CPU's
// All sums in f32 with explicit fused multiply-adds (the module compiles
// with --fmad=false, so nothing else is contracted): row sums are a strided
// per-thread FMA chain then a fixed-order tree over the block; the rank sum
// of expand/dx and the n-sum of bwd_outer are one sequential FMA chain.
// Results differ from the CPU's gemm only by rounding: |gpu − exact| and
// |cpu − exact| are each within (k + 16)·2⁻²⁴·sum|terms| for a length-k sum
// (the launchers state the bounds).
//
// Memory traffic: shrink and bwd_g read their row of x (dy) once per
// LORA_RCHUNK ranks (L1 hits after the first pass) and the small A (B),
// r·in floats, from L2 for every row; they write r floats per row. expand
// and bwd_dx read h (g) as broadcasts and B (A) from L2, read and write y
// (dx) once: coalesced over the output columns. bwd_outer reads U and V
// once per output element from L2 (column broadcast, row coalesced) and
// reads-modifies-writes D once.
// Launch: row kernels one block of LORA_THREADS per row (gridDim.x = n);
// column kernels gridDim = (n, ceil(cols / LORA_THREADS)); bwd_outer a
// grid-stride loop over the P·Q outputs.
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define LORA_THREADS 256
#define LORA_RCHUNK 8

// out[j·so] = sum_k v[k] * W[j·sj + k·sk] for j < r, by one block
// (blockDim.x == LORA_THREADS). Ranks in chunks of LORA_RCHUNK held in
// registers; per-thread FMA chains over k, then an xor butterfly in each
// warp and a sum over the warps in warp order.
__device__ __forceinline__ void lora_rowdot(const float* __restrict__ v, u32 K, const float* __restrict__ W, u64 sj, u64 sk,
                                            u32 r, float* __restrict__ out) {
    __shared__ float sh[LORA_RCHUNK][LORA_THREADS / 32];
    const u32 lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (u32 j0 = 0; j0 < r; j0 += LORA_RCHUNK) {
        float acc[LORA_RCHUNK];
#pragma unroll
        for (int q = 0; q < LORA_RCHUNK; q++) acc[q] = 0.0f;
        const float* Wj = W + (u64)j0 * sj;
        for (u32 k = threadIdx.x; k < K; k += blockDim.x) {
            const float xv = v[k];
            const float* wk = Wj + (u64)k * sk;
#pragma unroll
            for (int q = 0; q < LORA_RCHUNK; q++)
                if (j0 + q < r) acc[q] = __fmaf_rn(xv, wk[(u64)q * sj], acc[q]);
        }
#pragma unroll
        for (int q = 0; q < LORA_RCHUNK; q++) {
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) acc[q] = __fadd_rn(acc[q], __shfl_xor_sync(0xffffffffu, acc[q], off));
        }
        __syncthreads();  // sh may still be read by the previous chunk
        if (lane == 0) {
#pragma unroll
            for (int q = 0; q < LORA_RCHUNK; q++) sh[q][wid] = acc[q];
        }
        __syncthreads();
        if (threadIdx.x < LORA_RCHUNK && j0 + threadIdx.x < r) {
            float s = 0.0f;
            for (u32 w = 0; w < nw; w++) s = __fadd_rn(s, sh[threadIdx.x][w]);
            out[j0 + threadIdx.x] = s;
        }
    }
}

// dst[p] += s * sum_j h[j] * M[p·sp + j·sj] for this block's columns p < P.
__device__ __forceinline__ void lora_colsum(const float* __restrict__ h, u32 r, const float* __restrict__ M, u64 sp, u64 sj,
                                            u32 P, float s, float* __restrict__ dst) {
    const u32 p = blockIdx.y * blockDim.x + threadIdx.x;
    if (p >= P) return;
    const float* Mp = M + (u64)p * sp;
    float acc = 0.0f;
    for (u32 j = 0; j < r; j++) acc = __fmaf_rn(h[j], Mp[(u64)j * sj], acc);
    dst[p] = __fadd_rn(dst[p], __fmul_rn(s, acc));
}

// h = x·Aᵀ. grid = n, block = LORA_THREADS.
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_shrink_f32(const float* __restrict__ x, const float* __restrict__ A, u32 n, u32 in_f, u32 r, float* __restrict__ h) {
    const u32 i = blockIdx.x;
    if (i >= n) return;
    lora_rowdot(x + (u64)i * in_f, in_f, A, in_f, 1, r, h + (u64)i * r);
}

// y += s·h·Bᵀ. grid = (n, ceil(out/LORA_THREADS)).
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_expand_f32(const float* __restrict__ h, const float* __restrict__ B, u32 n, u32 r, u32 out_f, float s, float* __restrict__ y) {
    const u32 i = blockIdx.x;
    if (i >= n) return;
    lora_colsum(h + (u64)i * r, r, B, r, 1, out_f, s, y + (u64)i * out_f);
}

// Mixed batch, stage 1: h[i, :r_a] = x[i]·A[a]ᵀ, h[i, r_a:r_max] = 0, a =
// idx[i]; a row without an adapter gets h[i] = 0. A: table of `count`
// device pointers; ranks[a] ≤ r_max (checked by the launcher). grid = n.
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_bgmv_shrink_f32(const float* __restrict__ x, const int* __restrict__ idx, const u64* __restrict__ A, const u32* __restrict__ ranks,
                         u32 count, u32 n, u32 in_f, u32 r_max, float* __restrict__ h) {
    const u32 i = blockIdx.x;
    if (i >= n) return;
    const int a = idx[i];
    const bool on = a >= 0 && (u32)a < count;
    const u32 r = on ? ranks[a] : 0;
    float* hi = h + (u64)i * r_max;
    for (u32 j = r + threadIdx.x; j < r_max; j += blockDim.x) hi[j] = 0.0f;
    if (on) lora_rowdot(x + (u64)i * in_f, in_f, (const float*)A[a], in_f, 1, r, hi);
}

// Mixed batch, stage 2: y[i] += s_a·h[i, :r_a]·B[a]ᵀ; rows without an
// adapter untouched. grid = (n, ceil(out/LORA_THREADS)).
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_bgmv_expand_f32(const float* __restrict__ h, const int* __restrict__ idx, const u64* __restrict__ B, const u32* __restrict__ ranks,
                         const float* __restrict__ scales, u32 count, u32 n, u32 r_max, u32 out_f, float* __restrict__ y) {
    const u32 i = blockIdx.x;
    if (i >= n) return;
    const int a = idx[i];
    if (a < 0 || (u32)a >= count) return;
    const u32 r = ranks[a];
    lora_colsum(h + (u64)i * r_max, r, (const float*)B[a], r, 1, out_f, scales[a], y + (u64)i * out_f);
}

// g = dy·B. grid = n.
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_bwd_g_f32(const float* __restrict__ dy, const float* __restrict__ B, u32 n, u32 out_f, u32 r, float* __restrict__ g) {
    const u32 i = blockIdx.x;
    if (i >= n) return;
    lora_rowdot(dy + (u64)i * out_f, out_f, B, 1, r, r, g + (u64)i * r);
}

// dx += s·g·A. grid = (n, ceil(in/LORA_THREADS)).
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_bwd_dx_f32(const float* __restrict__ g, const float* __restrict__ A, u32 n, u32 r, u32 in_f, float s, float* __restrict__ dx) {
    const u32 i = blockIdx.x;
    if (i >= n) return;
    lora_colsum(g + (u64)i * r, r, A, 1, in_f, in_f, s, dx + (u64)i * in_f);
}

// D[p, q] += s·sum_{i<n} U[i·ldu + p]·V[i·ldv + q], D [P, Q] row-major:
// dB (P=out, Q=r, U=dy, V=h) and dA (P=r, Q=in, U=g, V=x). Grid-stride over
// the P·Q outputs; one sequential FMA chain over i per output.
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_bwd_outer_f32(const float* __restrict__ U, u32 ldu, const float* __restrict__ V, u32 ldv, u32 n, u32 P, u32 Q, float s,
                       float* __restrict__ D) {
    const u64 total = (u64)P * Q;
    for (u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (u64)gridDim.x * blockDim.x) {
        const u32 p = (u32)(t / Q), q = (u32)(t % Q);
        float acc = 0.0f;
        for (u32 i = 0; i < n; i++) acc = __fmaf_rn(U[(u64)i * ldu + p], V[(u64)i * ldv + q], acc);
        D[t] = __fadd_rn(D[t], __fmul_rn(s, acc));
    }
}

// ---------------------------------------------------------------- dropout

// Inverted dropout of the adapter input, the twin of
// LoraLayer::adapter_input with rng::dropout_keep: element i of a call's
// [n, in] input is kept with probability 1 − p by a counter-based hash of
// (seed, call, i), so the forward, a recomputed (checkpointed) layer and
// the backward draw the same mask, and the CPU draws it too.
__device__ __forceinline__ u64 lora_mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ bool lora_keep(u64 seed, u64 call, u64 i, float p) {
    const u64 h = lora_mix64(seed ^ lora_mix64((call * 0xD6E8FEB86659FD93ull) ^ i));
    // (h >> 40) < 2^24: exact in f32, and so is the scaling by 2^-24.
    return __fmul_rn((float)(h >> 40), 5.9604644775390625e-08f) >= p;
}

// out[i] = keep_i ? x[i] * scale : 0 (scale = f32(1 / (1 − p))). Grid-stride.
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_dropout_f32(const float* __restrict__ x, u64 n, u64 seed, u64 call, float p, float scale, float* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = lora_keep(seed, call, i, p) ? __fmul_rn(x[i], scale) : 0.0f;
}

// dx[i] += (s * m_i) * v[i], m_i = scale if kept else 0: the gradient
// through the mask, in LoraLayer::backward's order. Grid-stride.
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_dropout_accum_f32(const float* __restrict__ v, u64 n, u64 seed, u64 call, float p, float scale, float s,
                           float* __restrict__ dx) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float m = lora_keep(seed, call, i, p) ? scale : 0.0f;
        dx[i] = __fadd_rn(dx[i], __fmul_rn(__fmul_rn(s, m), v[i]));
    }
}

// f32 -> bf16 bits, round to nearest even (NaN kept quiet): bit for bit
// elementwise.cu's conversion and half::bf16::from_f32.
__device__ __forceinline__ u16 lora_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// The adapter's columns of a folded product's wide weight W' [out, ld]
// (W in columns 0..in, written by the dequantization): for t in 0..ld-in,
// W'[o, in + t] = bf16(s * B[o, t - off]) when off <= t < off + r, else 0 —
// so that [x | x·A^T ...]·W'^T = x·W^T + s·(x·A^T)·B^T in one product.
// Grid-stride over out * (ld - in).
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_fold_tail_bf16(const float* __restrict__ b, u32 out_f, u32 r, float s, u32 in_f, u32 off, u64 ld,
                        u16* __restrict__ w) {
    const u64 tail = ld - in_f, n = (u64)out_f * tail;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 o = i / tail, t = i % tail;
        w[o * ld + in_f + t] = (t >= off && t < (u64)off + r) ? lora_bf16(__fmul_rn(s, b[o * r + (t - off)])) : (u16)0;
    }
}

// The adapter's rows of a stacked input-gradient product's weight:
// out[k, c] = bf16(s * A[k, c]) for k < r, 0 for r <= k < rows (padding), so
// that [.. | g]·[..; s·A] adds s·g·A. Grid-stride over rows * in.
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_scaled_rows_bf16(const float* __restrict__ a, u32 r, u32 in_f, float s, u32 rows, u16* __restrict__ out) {
    const u64 n = (u64)rows * in_f;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = (i / in_f < r) ? lora_bf16(__fmul_rn(s, a[i])) : (u16)0;
}
