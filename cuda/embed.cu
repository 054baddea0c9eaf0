// embed.cu — token embedding lookup (gather) into fp32 rows: the twin of
// embedding_forward in src/backend/cpu/embed.rs (the spec), from an fp32
// table (a copy) or a bf16 one (each element widened to fp32, exactly: the
// CPU op on the table widened first).
//
// Math: out[n, :] = table[ids[n], :], table [vocab, dim], out [N, dim].
// An id >= vocab is an error and nothing is written: embed_check_ids (one
// block) writes status[0] = the first offending position (0xFFFFFFFF when
// all are valid), and embed_gather_f32 writes nothing unless status[0] says
// all are valid. The host reads status back to report the error.
//
// Memory traffic: reads N ids and N*dim table floats (the rows named), writes
// N*dim floats: a copy, bit for bit. One thread per output float (coalesced
// row copies), grid-stride loop; the id is re-read per element from L1.
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define EMBED_THREADS 256
#define EMBED_CHECK_THREADS 1024

// status[0] = min { n : ids[n] >= vocab }, or 0xFFFFFFFF. One block.
extern "C" __global__ void __launch_bounds__(EMBED_CHECK_THREADS)
    embed_check_ids(const u32* __restrict__ ids, u32 n, u32 vocab, u32* __restrict__ status) {
    __shared__ u32 sh[32];
    u32 bad = 0xffffffffu;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x)
        if (ids[i] >= vocab) { bad = min(bad, i); break; }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) bad = min(bad, __shfl_xor_sync(0xffffffffu, bad, off));
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = bad;
    __syncthreads();
    if (threadIdx.x < 32) {
        bad = threadIdx.x < (blockDim.x >> 5) ? sh[threadIdx.x] : 0xffffffffu;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) bad = min(bad, __shfl_xor_sync(0xffffffffu, bad, off));
        if (threadIdx.x == 0) status[0] = bad;
    }
}

__device__ __forceinline__ float embed_widen(float x) { return x; }
__device__ __forceinline__ float embed_widen(u16 x) { return __uint_as_float(((u32)x) << 16); }

// out[k] = table[ids[k / dim] * dim + k % dim] for k < n*dim (widened to
// fp32), when status[0] is 0xFFFFFFFF (every id valid).
template <class T>
__device__ __forceinline__ void embed_gather(const T* __restrict__ table, u32 dim, const u32* __restrict__ ids, u64 total,
                                             const u32* __restrict__ status, float* __restrict__ out) {
    if (status[0] != 0xffffffffu) return;
    for (u64 k = (u64)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (u64)gridDim.x * blockDim.x) {
        const u64 tok = k / dim;
        const u32 j = (u32)(k - tok * dim);
        out[k] = embed_widen(table[(u64)ids[tok] * dim + j]);
    }
}

extern "C" __global__ void __launch_bounds__(EMBED_THREADS)
    embed_gather_f32(const float* __restrict__ table, u32 dim, const u32* __restrict__ ids, u64 total,
                     const u32* __restrict__ status, float* __restrict__ out) {
    embed_gather(table, dim, ids, total, status, out);
}

// The same from a bf16 table (bits in u16).
extern "C" __global__ void __launch_bounds__(EMBED_THREADS)
    embed_gather_bf16(const u16* __restrict__ table, u32 dim, const u32* __restrict__ ids, u64 total,
                      const u32* __restrict__ status, float* __restrict__ out) {
    embed_gather(table, dim, ids, total, status, out);
}
