// loss.cu — the end of a training step's forward and the start of its
// update, fp32 data with f64 reductions: the twin of src/backend/cpu/loss.rs
// (the spec): fused causal-LM cross-entropy (forward + backward in place),
// and the global L2 gradient norm with clipping.
//
// Cross-entropy, per row i of logits [N, V] with label y_i (-100: ignored):
//   m     = max_j x_j                         (f32, exact)
//   S     = sum_j f32(exp(x_j - m))           (exp in f32, sum in f64)
//   l_i   = log(S) - (x_y - m)                (f64)
//   dx_j  = c * (f32(exp(x_j - m)) * f32(1/S)),  then dx_y -= c   (f32)
//   ignored rows: dx = 0, l = 0.   loss sum = sum_i l_i (f64, fixed tree)
//   c = grad_scale, or for the mean f32(1/count) (count = labels != -100).
// Soft cap (cap > 0; Gemma 2's final_logit_softcapping, the CPU's
// cross_entropy_fused_softcap): every logit read, the label's too, is
// first replaced by x' = f32(tanhf(f32(x / cap)) * cap) (divide, tanh,
// multiply, as the CPU; recomputed at each read, the same bits), the loss
// and dx' above are those of x', and each gradient element stored is the
// one with respect to the raw x: dx = f32(dx' * f32(1 - f32(t * t))),
// t = tanhf(f32(x / cap)) (for bf16 in fp32, then rounded once).
// cap = 0: no cap, the arithmetic above exactly.
// A label outside [0, V) other than -100 is an error and nothing is
// written: loss_ce_check_labels (one block) writes status[0] = the first bad
// row (0xFFFFFFFF: none) and status[1] = count, before the fused kernel,
// which does nothing unless status[0] is 0xFFFFFFFF.
// Differences from the CPU: CUDA's expf (max 2 ulp) against libm's, and the
// order of the f64 sums; with a cap also CUDA's tanhf (max 2 ulp) against
// the CPU's vexp::tanh (max 2 ulp); bounds in src/backend/cuda/loss.rs.
//
// Gradient norm (torch.nn.utils.clip_grad_norm_, norm 2): per tensor
// n_k = f32(sqrt(sum g^2)) (f64 sum: fixed-size per-block partials, then a
// tree), total = f32(sqrt(sum_k f64(n_k)^2)) (in tensor order, one thread),
// clip_coef = f32(f32(1 / (total + 1e-6)) * max_norm), and g *= clip_coef
// when total is finite and clip_coef < 1 (decided on the device: no sync).
//
// loss_ce_fused_bf16 is the same in place on bf16 logits (the bf16 step's
// head writes them so): each logit widened exactly, the same fp32/f64
// arithmetic, each gradient rounded to bf16 (nearest even) as it is stored
// — bit for bit loss_ce_fused_f32 on the widened logits followed by
// elementwise_f32_to_bf16, at half the bytes.
//
// Memory traffic: cross-entropy reads each row three times (max, exp-sum,
// gradient: the row stays in L1/L2) and writes it once, in place; one block
// per row. Norm: one read of every gradient; clipping one read and write.
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define LOSS_THREADS 512
#define LOSS_CHECK_THREADS 1024
#define LOSS_NORM_THREADS 256
#define LOSS_NORM_BLOCKS 128
#define LOSS_IGNORE_INDEX (-100)
#define LOSS_ALL_OK 0xffffffffu

// Block-wide reductions, fixed order, result returned to every thread.
// blockDim.x is a multiple of 32 (at most 1024).
__device__ __forceinline__ double loss_block_sum(double v) {
    __shared__ double sh[32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
    const u32 lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? sh[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

__device__ __forceinline__ float loss_block_max(float v) {
    __shared__ float sh[32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    const u32 lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? sh[lane] : -__int_as_float(0x7f800000);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

__device__ __forceinline__ u32 loss_block_min_u32(u32 v) {
    __shared__ u32 sh[32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, off));
    const u32 lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? sh[lane] : 0xffffffffu;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

__device__ __forceinline__ u32 loss_block_add_u32(u32 v) {
    __shared__ u32 sh[32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const u32 lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? sh[lane] : 0u;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// status[0] = first row whose label is neither -100 nor in [0, vocab)
// (LOSS_ALL_OK: none); status[1] = rows whose label is not -100. One block.
extern "C" __global__ void __launch_bounds__(LOSS_CHECK_THREADS)
    loss_ce_check_labels(const int* __restrict__ labels, u32 rows, u32 vocab, u32* __restrict__ status) {
    u32 bad = LOSS_ALL_OK, count = 0;
    for (u32 i = threadIdx.x; i < rows; i += blockDim.x) {
        const int y = labels[i];
        if (y == LOSS_IGNORE_INDEX) continue;
        ++count;
        if ((y < 0 || (u32)y >= vocab) && bad == LOSS_ALL_OK) bad = i;
    }
    bad = loss_block_min_u32(bad);
    count = loss_block_add_u32(count);
    if (threadIdx.x == 0) {
        status[0] = bad;
        status[1] = count;
    }
}

// A logit as fp32 (bf16 widened exactly), and a gradient stored (bf16:
// rounded to nearest even, NaN kept quiet, as elementwise_f32_to_bf16).
__device__ __forceinline__ float loss_ld(const float* p) { return *p; }
__device__ __forceinline__ float loss_ld(const u16* p) { return __uint_as_float(((u32)*p) << 16); }
__device__ __forceinline__ void loss_st(float* p, float v) { *p = v; }
__device__ __forceinline__ u16 loss_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ void loss_st(u16* p, float v) { *p = loss_bf16(v); }

// tanh(x / cap) and the capped logit cap * tanh(x / cap), in the CPU's
// order (module comment); loss_tanh only with cap > 0, loss_cap passes x
// on unchanged for cap = 0.
__device__ __forceinline__ float loss_tanh(float x, float cap) { return tanhf(__fdiv_rn(x, cap)); }
__device__ __forceinline__ float loss_cap(float x, float cap) { return cap > 0.0f ? __fmul_rn(loss_tanh(x, cap), cap) : x; }

// In place on logits [rows, vocab]: the gradient (module comment), and
// row_loss[row] = l_row (0 for ignored rows). mean != 0: c = f32(1/count),
// else c = grad_scale. cap > 0: the loss of the soft-capped logits, the
// gradient with respect to the raw ones (module comment); cap = 0: no cap.
// Does nothing unless status[0] == LOSS_ALL_OK.
// grid = rows, block = LOSS_THREADS.
template <typename T>
__device__ __forceinline__ void loss_ce_fused(T* __restrict__ logits, const int* __restrict__ labels, u32 rows, u32 vocab,
                                              const u32* __restrict__ status, float grad_scale, u32 mean, double* __restrict__ row_loss,
                                              float cap) {
    const u32 row = blockIdx.x;
    if (row >= rows || status[0] != LOSS_ALL_OK) return;
    T* x = logits + (u64)row * vocab;
    const int y = labels[row];
    if (y == LOSS_IGNORE_INDEX) {
        for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) loss_st(x + j, 0.0f);
        if (threadIdx.x == 0) row_loss[row] = 0.0;
        return;
    }
    const u32 count = status[1];
    const float c = mean ? (count == 0 ? 0.0f : __double2float_rn(__ddiv_rn(1.0, (double)count))) : grad_scale;
    float m = -__int_as_float(0x7f800000);
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, loss_cap(loss_ld(x + j), cap));
    m = loss_block_max(m);
    const float xy = loss_cap(loss_ld(x + y), cap);  // read before any thread writes (the sum below synchronizes)
    double s = 0.0;
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) s = __dadd_rn(s, (double)expf(__fsub_rn(loss_cap(loss_ld(x + j), cap), m)));
    s = loss_block_sum(s);
    const float inv = __double2float_rn(__ddiv_rn(1.0, s));
    // The label's element gets −c too, in fp32 before it is stored (the
    // same value the fp32 kernel's separate subtraction gave); with a cap
    // the factor 1 − t² follows, in fp32, before bf16's one rounding.
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float xj = loss_ld(x + j);
        const float t = cap > 0.0f ? loss_tanh(xj, cap) : 0.0f;
        const float z = cap > 0.0f ? __fmul_rn(t, cap) : xj;
        float g = __fmul_rn(c, __fmul_rn(expf(__fsub_rn(z, m)), inv));
        if (j == (u32)y) g = __fsub_rn(g, c);
        if (cap > 0.0f) g = __fmul_rn(g, __fsub_rn(1.0f, __fmul_rn(t, t)));
        loss_st(x + j, g);
    }
    if (threadIdx.x == 0) row_loss[row] = __dsub_rn(log(s), __dsub_rn((double)xy, (double)m));
}

extern "C" __global__ void __launch_bounds__(LOSS_THREADS)
    loss_ce_fused_f32(float* __restrict__ logits, const int* __restrict__ labels, u32 rows, u32 vocab,
                      const u32* __restrict__ status, float grad_scale, u32 mean, double* __restrict__ row_loss, float cap) {
    loss_ce_fused(logits, labels, rows, vocab, status, grad_scale, mean, row_loss, cap);
}

// The same on bf16 logits, in place (module comment).
extern "C" __global__ void __launch_bounds__(LOSS_THREADS)
    loss_ce_fused_bf16(u16* __restrict__ logits, const int* __restrict__ labels, u32 rows, u32 vocab,
                       const u32* __restrict__ status, float grad_scale, u32 mean, double* __restrict__ row_loss, float cap) {
    loss_ce_fused(logits, labels, rows, vocab, status, grad_scale, mean, row_loss, cap);
}

// out[0] = sum of row_loss (0 when a label was bad), out[1] = count,
// out[2] = first bad row (-1: none). One block of LOSS_CHECK_THREADS.
extern "C" __global__ void __launch_bounds__(LOSS_CHECK_THREADS)
    loss_ce_finish(const double* __restrict__ row_loss, u32 rows, const u32* __restrict__ status, double* __restrict__ out) {
    const bool ok = status[0] == LOSS_ALL_OK;
    double s = 0.0;
    if (ok)
        for (u32 i = threadIdx.x; i < rows; i += blockDim.x) s = __dadd_rn(s, row_loss[i]);
    s = loss_block_sum(s);
    if (threadIdx.x == 0) {
        out[0] = s;
        out[1] = (double)status[1];
        out[2] = ok ? -1.0 : (double)status[0];
    }
}

// partial[b] = sum of g^2 over elements b*T + t (grid stride), in f64, for
// b < LOSS_NORM_BLOCKS. grid = LOSS_NORM_BLOCKS, block = LOSS_NORM_THREADS.
__device__ __forceinline__ void loss_sumsq_block(const float* __restrict__ g, u64 n, double* __restrict__ partial) {
    double s = 0.0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const double v = (double)g[i];
        s = __dadd_rn(s, __dmul_rn(v, v));
    }
    s = loss_block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
extern "C" __global__ void __launch_bounds__(LOSS_NORM_THREADS)
    loss_sumsq_partial_f32(const float* __restrict__ g, u64 n, double* __restrict__ partial) {
    loss_sumsq_block(g, n, partial);
}

// The same for k tensors of one buffer in one launch: spans[2t], spans[2t +
// 1] = start and length of tensor t in g; block (b, t) computes what block
// b of loss_sumsq_partial_f32 over tensor t does, into partial[t *
// LOSS_NORM_BLOCKS + b]. grid = (LOSS_NORM_BLOCKS, k), block =
// LOSS_NORM_THREADS.
extern "C" __global__ void __launch_bounds__(LOSS_NORM_THREADS)
    loss_sumsq_partial_spans_f32(const float* __restrict__ g, const u64* __restrict__ spans, double* __restrict__ partial) {
    const u64 t = blockIdx.y;
    loss_sumsq_block(g + spans[2 * t], spans[2 * t + 1], partial + t * LOSS_NORM_BLOCKS);
}

// norms[k] = f32(sqrt(sum_b partial[k * LOSS_NORM_BLOCKS + b])).
// grid = tensors, block = LOSS_NORM_BLOCKS (one partial per thread).
extern "C" __global__ void __launch_bounds__(LOSS_NORM_BLOCKS)
    loss_gradnorm_tensor(const double* __restrict__ partial, float* __restrict__ norms) {
    double s = loss_block_sum(partial[(u64)blockIdx.x * LOSS_NORM_BLOCKS + threadIdx.x]);
    if (threadIdx.x == 0) norms[blockIdx.x] = __double2float_rn(__dsqrt_rn(s));
}

// out[0] = total norm, out[1] = clip_coef, out[2] = 1 when the gradients
// are to be scaled (total finite and clip_coef < 1), else 0. One thread:
// the sum of the K squared norms runs in tensor order, as on the CPU.
extern "C" __global__ void loss_gradnorm_total(const float* __restrict__ norms, u32 tensors, float max_norm, float* __restrict__ out) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (u32 k = 0; k < tensors; ++k) {
        const double v = (double)norms[k];
        s = __dadd_rn(s, __dmul_rn(v, v));
    }
    const float total = __double2float_rn(__dsqrt_rn(s));
    const float coef = __fmul_rn(__fdiv_rn(1.0f, __fadd_rn(total, 1e-6f)), max_norm);
    out[0] = total;
    out[1] = coef;
    out[2] = (isfinite(total) && coef < 1.0f) ? 1.0f : 0.0f;
}

// g *= out[1] when out[2] != 0 (out from loss_gradnorm_total).
extern "C" __global__ void __launch_bounds__(LOSS_NORM_THREADS)
    loss_clip_scale_f32(float* __restrict__ g, u64 n, const float* __restrict__ out) {
    if (out[2] == 0.0f) return;
    const float coef = out[1];
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) g[i] = __fmul_rn(g[i], coef);
}
