// nf4.cu — NF4 (bitsandbytes quant_type="nf4") on the GPU: blockwise
// quantization, dequantization, the decode of double-quantized block scales,
// and a fused batch-1 GEMV. Each kernel computes the same function as its CPU
// twin in src/backend/cpu/nf4.rs (the spec) and is tested against it:
// bit-exact for quantize / dequantize / absmax decode, within a stated bound
// for the GEMV (its fp32 summation order differs).
//
// Math (row-major flattening x[0..n), blocks of `bs` elements, bs a power of
// two in 32..4096, the last block possibly partial):
//   absmax_b = max_i |x_i|                                       (fp32, exact)
//   full block:    v_i = x_i * fp32(1 / max(absmax_b, 1e-38))      (two roundings)
//                  stored scale = absmax_b
//   partial block: v_i = x_i / max(absmax_b, 1e-38)                (one rounding)
//                  stored scale = max(absmax_b, 1e-38)
//   q_i = #{ t in NF4_THRESH : v_i > t }   (nearest code, ties to the lower)
//   byte j = q_{2j} << 4 | q_{2j+1}; an odd count pads the low nibble with 7.
//   dequantize:    out_i = round_to_dtype(fp32(NF4_CODE[q_i] * absmax_b))
//   absmax decode: absmax_i = fp32(fp32(map[c_i] * nested[i / nbs]) + offset)
//   gemv:          y_r = bf16( sum_k NF4_CODE[q_rk] * absmax_(rk) * x_k ), fp32
//                  accumulation; the scale is factored out of each 32-element
//                  chunk (sum_chunk absmax * sum_k code_k * x_k).
// Rounding must match the CPU exactly: the module is compiled with
// --fmad=false --ftz=false --prec-div=true, and every rounding step is written
// with an explicit _rn intrinsic anyway, so no contraction, flush-to-zero or
// approximate division can change a result. Inputs are finite (the host
// checks), so NaN handling never decides a result.
//
// Memory traffic (n elements, s bytes per input/output element):
//   quantize:    reads n*s (twice: the second pass hits L1/L2), writes n/2 + 4n/bs.
//   dequantize:  reads n/2 + 4n/bs, writes n*s. Each thread loads 16 bytes of
//                codes (uint4, 32 elements) and writes them with 16-byte
//                stores; the 16-entry code table sits in shared memory. This
//                is the bandwidth-bound kernel; its target is >= 80% of a
//                device-to-device copy.
//   absmax decode: reads n/bs codes + 4n/(bs*256), writes 4n/bs.
//   gemv:        reads out*in/2 + 4*out*in/bs of weights once, x (2*in bytes)
//                once per row from L1/L2, writes 2*out. One warp per row,
//                16-byte loads of codes and of x.
//
// No host code and no #include: everything below is plain CUDA C++ that NVRTC
// compiles without headers. bf16 and fp16 are carried as unsigned short.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// The 16 NF4 values (bitsandbytes get_4bit_type("nf4")), and the 15 decision
// thresholds: fp32((code[i] + code[i+1]) / 2), computed in fp32 as the CPU
// does (NF4_THRESHOLDS in src/backend/cpu/nf4.rs). Literals are the shortest
// decimal that round-trips the fp32 value; a unit test in
// src/backend/cuda/nf4.rs checks them against the Rust tables bit for bit.
__constant__ float NF4_CODE[16] = {
    -1.0f, -0.6961928f, -0.52507305f, -0.3949175f, -0.28444138f, -0.18477343f, -0.091050036f, 0.0f,
    0.0795803f, 0.1609302f, 0.2461123f, 0.33791524f, 0.44070983f, 0.562617f, 0.72295684f, 1.0f,
};
__constant__ float NF4_THRESH[15] = {
    -0.8480964f, -0.6106329f, -0.45999527f, -0.33967942f, -0.2346074f, -0.13791174f, -0.045525018f,
    0.03979015f, 0.12025525f, 0.20352125f, 0.29201376f, 0.38931254f, 0.50166345f, 0.6427869f, 0.86147845f,
};

// bitsandbytes clamps the scale from below before normalizing
// (absmax.clamp(min=1e-38)); ABSMAX_FLOOR in src/backend/cpu/nf4.rs.
#define NF4_ABSMAX_FLOOR 1e-38f
// Code of 0.0, used to pad the low nibble of an odd-length tensor's last byte.
#define NF4_CODE_ZERO 7u

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

// ---------------------------------------------------------------- conversions

// bf16 -> f32: exact, bf16 is the top half of an f32.
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// f32 -> bf16, round to nearest even, bit for bit half::bf16::from_f32:
// half rounds up when bit 15 is set and (bits 0..14 or bit 16) are, which is
// what adding 0x7fff + bit16 and truncating does. Subnormals are kept (no
// flush); NaN is quietened like half does (never reached: inputs are finite).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// f16 <-> f32 with the PTX conversions (IEEE, round to nearest even, no
// flush: the same as half::f16::to_f32 / from_f32).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// |x| by clearing the sign bit (exact, as f32::abs).
__device__ __forceinline__ float abs_exact(float x) { return __uint_as_float(__float_as_uint(x) & 0x7fffffffu); }

template <int DT> __device__ __forceinline__ float load_elem(const void* __restrict__ p, u64 i) {
    if (DT == DT_F32) return ((const float*)p)[i];
    if (DT == DT_F16) return f16_to_f32(((const u16*)p)[i]);
    return bf16_to_f32(((const u16*)p)[i]);
}

// ------------------------------------------------------------------ quantize

// Code of a normalized value: how many thresholds lie strictly below it
// (torch.bucketize(right=False) on the midpoints; nf4_code on the CPU).
__device__ __forceinline__ u32 nf4_code(float v) {
    u32 c = 0;
#pragma unroll
    for (int i = 0; i < 15; ++i) c += (v > NF4_THRESH[i]) ? 1u : 0u;
    return c;
}

// Launch: blockDim.x = 256; G = min(bs/2, 256) threads per NF4 block
// (256/G NF4 blocks per thread block); grid = ceil(nblocks / (256/G)).
// Thread `lane` of a group writes bytes lane, lane+G, ... of its block.
#define Q_THREADS 256
template <int DT>
__device__ __forceinline__ void nf4_quantize_impl(const void* __restrict__ x, u64 n, u32 bs, u8* __restrict__ packed,
                                                  float* __restrict__ absmax) {
    __shared__ float warp_max[Q_THREADS / 32];
    const u32 G = (bs >> 1) < Q_THREADS ? (bs >> 1) : Q_THREADS;
    const u32 group = threadIdx.x / G;
    const u32 lane = threadIdx.x % G;
    const u64 nblocks = (n + bs - 1) / bs;
    const u64 blk = (u64)blockIdx.x * (Q_THREADS / G) + group;
    const bool active = blk < nblocks;
    const u64 start = blk * bs;
    const u64 end = active ? (start + bs < n ? start + bs : n) : start;

    // Pass 1: absmax of the block (max is exact, so the order is free).
    float amax = 0.0f;
    for (u64 i = start + lane; i < end; i += G) {
        const float a = abs_exact(load_elem<DT>(x, i));
        amax = a > amax ? a : amax;
    }
    const u32 width = G < 32 ? G : 32;
    for (u32 off = width >> 1; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, amax, off);
        amax = o > amax ? o : amax;
    }
    if (G > 32) {  // uniform over the thread block
        if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
        __syncthreads();
        const u32 w0 = (group * G) >> 5;
        amax = 0.0f;
        for (u32 w = 0; w < (G >> 5); ++w) {
            const float o = warp_max[w0 + w];
            amax = o > amax ? o : amax;
        }
    }
    if (!active) return;

    // Pass 2: normalize exactly as the CPU and pack two codes per byte.
    const bool partial = (end - start) < (u64)bs;
    const float clamped = amax > NF4_ABSMAX_FLOOR ? amax : NF4_ABSMAX_FLOOR;
    const float inv = __fdiv_rn(1.0f, clamped);
    const u64 nbytes = (end - start + 1) >> 1;
    u8* __restrict__ out = packed + (start >> 1);
    for (u64 j = lane; j < nbytes; j += G) {
        const u64 e = start + 2 * j;
        const float v0 = load_elem<DT>(x, e);
        const u32 hi = partial ? nf4_code(__fdiv_rn(v0, clamped)) : nf4_code(__fmul_rn(v0, inv));
        u32 lo = NF4_CODE_ZERO;
        if (e + 1 < end) {
            const float v1 = load_elem<DT>(x, e + 1);
            lo = partial ? nf4_code(__fdiv_rn(v1, clamped)) : nf4_code(__fmul_rn(v1, inv));
        }
        out[j] = (u8)((hi << 4) | lo);
    }
    if (lane == 0) absmax[blk] = partial ? clamped : amax;
}

extern "C" __global__ void __launch_bounds__(Q_THREADS)
    nf4_quantize_f32(const float* __restrict__ x, u64 n, u32 bs, u8* __restrict__ packed, float* __restrict__ absmax) {
    nf4_quantize_impl<DT_F32>(x, n, bs, packed, absmax);
}
extern "C" __global__ void __launch_bounds__(Q_THREADS)
    nf4_quantize_f16(const u16* __restrict__ x, u64 n, u32 bs, u8* __restrict__ packed, float* __restrict__ absmax) {
    nf4_quantize_impl<DT_F16>(x, n, bs, packed, absmax);
}
extern "C" __global__ void __launch_bounds__(Q_THREADS)
    nf4_quantize_bf16(const u16* __restrict__ x, u64 n, u32 bs, u8* __restrict__ packed, float* __restrict__ absmax) {
    nf4_quantize_impl<DT_BF16>(x, n, bs, packed, absmax);
}

// ---------------------------------------------------------------- dequantize

// Launch: blockDim.x = 256, DQ_CHUNKS_PER_THREAD 32-element chunks per
// thread (thread t of block b takes chunks b*256*K + t + j*256, j < K: each
// load and store instruction of a warp covers consecutive chunks), grid =
// ceil(ceil(n/32) / (256*K)). Every load of a thread is issued before its
// first store, so K loads are in flight per thread, and a 4096x4096 weight
// fits one wave of an H100. `packed` and `out` must be 16-byte aligned
// (checked by the host). A chunk never straddles two NF4 blocks (bs >= 32 is
// a power of two), so one absmax load serves all 32 outputs.
#define DQ_THREADS 256
#define DQ_CHUNKS_PER_THREAD 2

template <int DT> __device__ __forceinline__ void store_word(void* __restrict__ out, u64 base, u32 i, u32 w,
                                                             const float* lut, float a) {
    // Word i of the chunk's 16 code bytes: bytes k = 0..3 hold elements
    // 8i+2k (high nibble) and 8i+2k+1 (low nibble).
    float v[8];
#pragma unroll
    for (u32 k = 0; k < 4; ++k) {
        const u32 b = (w >> (8 * k)) & 0xffu;
        v[2 * k] = __fmul_rn(lut[b >> 4], a);
        v[2 * k + 1] = __fmul_rn(lut[b & 15u], a);
    }
    if (DT == DT_F32) {
        float4* o = (float4*)((float*)out + base + 8 * i);
        o[0] = make_float4(v[0], v[1], v[2], v[3]);
        o[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        u32 h[8];
#pragma unroll
        for (u32 k = 0; k < 8; ++k) h[k] = (DT == DT_F16) ? f32_to_f16(v[k]) : f32_to_bf16(v[k]);
        uint4* o = (uint4*)((u16*)out + base + 8 * i);
        *o = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
    }
}

template <int DT> __device__ __forceinline__ void store_elem(void* __restrict__ out, u64 i, float v) {
    if (DT == DT_F32) ((float*)out)[i] = v;
    else if (DT == DT_F16) ((u16*)out)[i] = f32_to_f16(v);
    else ((u16*)out)[i] = f32_to_bf16(v);
}

// Where a block's scale comes from: the fp32 absmax, or (double
// quantization) decoded on the fly exactly as nf4_absmax_decode does it,
// map[code] * nested[block / nested_bs] + offset (an fp32 multiply and an
// fp32 add, never fused): the same value, without that kernel's pass and
// buffer.
struct AbsmaxF32 {
    const float* __restrict__ a;
    __device__ __forceinline__ float get(u64 blk) const { return a[blk]; }
};
struct AbsmaxDouble {
    const u8* __restrict__ codes;
    const float* __restrict__ map;
    const float* __restrict__ nested;
    u64 nested_bs;
    float offset;
    __device__ __forceinline__ float get(u64 blk) const {
        return __fadd_rn(__fmul_rn(map[codes[blk]], nested[blk / nested_bs]), offset);
    }
};

// Where element e of the flattened tensor goes: e itself, or (STRIDED: a
// 2-D tensor [rows, cols] written into rows of ld elements) row * ld + col.
template <bool STRIDED> __device__ __forceinline__ u64 out_index(u64 e, u32 cols, u64 ld) {
    return STRIDED ? (e / cols) * ld + e % cols : e;
}

// STRIDED: cols % 32 == 0 (a chunk never straddles two rows) and ld % 8 == 0
// (each row starts 16-byte aligned), both checked by the host.
template <int DT, class A, bool STRIDED = false>
__device__ __forceinline__ void nf4_dequantize_impl(const u8* __restrict__ packed, const A absmax,
                                                    u32 bs_shift, u64 n, void* __restrict__ out,
                                                    u32 cols = 0, u64 ld = 0) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    const u64 first = (u64)blockIdx.x * (DQ_THREADS * DQ_CHUNKS_PER_THREAD) + threadIdx.x;
    uint4 q[DQ_CHUNKS_PER_THREAD];
    float a[DQ_CHUNKS_PER_THREAD];
    // Loads first (full chunks), then the stores.
#pragma unroll
    for (u32 j = 0; j < DQ_CHUNKS_PER_THREAD; ++j) {
        const u64 chunk = first + (u64)j * DQ_THREADS;
        const u64 e0 = chunk * 32;
        if (e0 < n) a[j] = absmax.get(e0 >> bs_shift);
        if (e0 + 32 <= n) q[j] = ((const uint4*)packed)[chunk];
    }
#pragma unroll
    for (u32 j = 0; j < DQ_CHUNKS_PER_THREAD; ++j) {
        const u64 chunk = first + (u64)j * DQ_THREADS;
        const u64 e0 = chunk * 32;
        if (e0 + 32 <= n) {
            const u64 base = out_index<STRIDED>(e0, cols, ld);
            store_word<DT>(out, base, 0, q[j].x, lut, a[j]);
            store_word<DT>(out, base, 1, q[j].y, lut, a[j]);
            store_word<DT>(out, base, 2, q[j].z, lut, a[j]);
            store_word<DT>(out, base, 3, q[j].w, lut, a[j]);
        } else if (e0 < n) {
            // The tensor's last, short chunk: element by element.
            for (u64 e = e0; e < n; ++e) {
                const u32 b = packed[e >> 1];
                const u32 c = (e & 1) ? (b & 15u) : (b >> 4);
                store_elem<DT>(out, out_index<STRIDED>(e, cols, ld), __fmul_rn(lut[c], a[j]));
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nf4_dequantize_f32(const u8* __restrict__ packed, const float* __restrict__ absmax, u32 bs_shift, u64 n,
                       float* __restrict__ out) {
    nf4_dequantize_impl<DT_F32>(packed, AbsmaxF32{absmax}, bs_shift, n, out);
}
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nf4_dequantize_f16(const u8* __restrict__ packed, const float* __restrict__ absmax, u32 bs_shift, u64 n,
                       u16* __restrict__ out) {
    nf4_dequantize_impl<DT_F16>(packed, AbsmaxF32{absmax}, bs_shift, n, out);
}
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nf4_dequantize_bf16(const u8* __restrict__ packed, const float* __restrict__ absmax, u32 bs_shift, u64 n,
                        u16* __restrict__ out) {
    nf4_dequantize_impl<DT_BF16>(packed, AbsmaxF32{absmax}, bs_shift, n, out);
}
// The same from a double-quantized state (codes, 256-entry map, nested
// absmax per nested_bs blocks, offset), the scales decoded in the pass.
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nf4_dequantize_dq_f32(const u8* __restrict__ packed, const u8* __restrict__ codes, const float* __restrict__ map,
                          const float* __restrict__ nested, u64 nested_bs, float offset, u32 bs_shift, u64 n,
                          float* __restrict__ out) {
    nf4_dequantize_impl<DT_F32>(packed, AbsmaxDouble{codes, map, nested, nested_bs, offset}, bs_shift, n, out);
}
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nf4_dequantize_dq_f16(const u8* __restrict__ packed, const u8* __restrict__ codes, const float* __restrict__ map,
                          const float* __restrict__ nested, u64 nested_bs, float offset, u32 bs_shift, u64 n,
                          u16* __restrict__ out) {
    nf4_dequantize_impl<DT_F16>(packed, AbsmaxDouble{codes, map, nested, nested_bs, offset}, bs_shift, n, out);
}
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nf4_dequantize_dq_bf16(const u8* __restrict__ packed, const u8* __restrict__ codes, const float* __restrict__ map,
                           const float* __restrict__ nested, u64 nested_bs, float offset, u32 bs_shift, u64 n,
                           u16* __restrict__ out) {
    nf4_dequantize_impl<DT_BF16>(packed, AbsmaxDouble{codes, map, nested, nested_bs, offset}, bs_shift, n, out);
}

// The bf16 forms written into the rows of a wider matrix: a 2-D weight
// [rows, cols] (n = rows * cols) into out [rows, ld], columns cols..ld left
// as they are (the folded adapter products' B columns go there). The same
// values as nf4_dequantize_bf16 / nf4_dequantize_dq_bf16.
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nf4_dequantize_ld_bf16(const u8* __restrict__ packed, const float* __restrict__ absmax, u32 bs_shift, u64 n,
                           u32 cols, u64 ld, u16* __restrict__ out) {
    nf4_dequantize_impl<DT_BF16, AbsmaxF32, true>(packed, AbsmaxF32{absmax}, bs_shift, n, out, cols, ld);
}
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nf4_dequantize_dq_ld_bf16(const u8* __restrict__ packed, const u8* __restrict__ codes, const float* __restrict__ map,
                              const float* __restrict__ nested, u64 nested_bs, float offset, u32 bs_shift, u64 n,
                              u32 cols, u64 ld, u16* __restrict__ out) {
    nf4_dequantize_impl<DT_BF16, AbsmaxDouble, true>(packed, AbsmaxDouble{codes, map, nested, nested_bs, offset}, bs_shift, n,
                                                     out, cols, ld);
}

// ------------------------------------------------------------- absmax decode

// Double quantization's decode, DoubleQuant::decode on the CPU:
// out_i = map[codes_i] * nested[i / nested_bs] + offset, an fp32 multiply and
// an fp32 add (never fused). The 256-entry map goes to shared memory.
// Launch: blockDim.x = 256, grid-stride over n.
extern "C" __global__ void __launch_bounds__(256)
    nf4_absmax_decode(const u8* __restrict__ codes, const float* __restrict__ map, const float* __restrict__ nested,
                      u64 nested_bs, float offset, u64 n, float* __restrict__ out) {
    __shared__ float smap[256];
    for (u32 i = threadIdx.x; i < 256; i += blockDim.x) smap[i] = map[i];
    __syncthreads();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = __fadd_rn(__fmul_rn(smap[codes[i]], nested[i / nested_bs]), offset);
    }
}

// ---------------------------------------------------------------------- gemv

// y[b, r] = sum_k W[r,k] x[b, k] for W NF4 [rows, in] (row-major, so row r
// is the flat range [r*in, (r+1)*in)) and nb <= GEMV_MAX_BATCH vectors x
// [nb, in] (a few decode rows), x and y bf16, fp32 accumulation. The weight
// is read once for all nb vectors; each vector's sum runs in exactly the
// order of the nb = 1 case, so a batch gives the bits of nb separate calls.
// Launch: blockDim.x = 32 * GEMV_ROWS (one warp per row), grid = ceil(rows /
// GEMV_ROWS). Fast path when in % 32 == 0 (every row starts on a 16-byte code
// boundary and every 32-element chunk lies in one NF4 block): lane l takes
// chunks l, l+32, ...; per chunk one uint4 of codes, one absmax, and per
// vector four uint4 of x. Otherwise an element-wise path (same math,
// dequantize then multiply). `packed` and `x` must be 16-byte aligned
// (checked by the host).
#define GEMV_ROWS 4
#define GEMV_MAX_BATCH 8

__device__ __forceinline__ float chunk_word_dot(u32 w, uint4 xv, const float* lut, float acc) {
    // 8 codes of word w against 8 bf16 of x (xv.x holds elements 0,1, ...).
    const u32 xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
    for (u32 k = 0; k < 4; ++k) {
        const u32 b = (w >> (8 * k)) & 0xffu;
        acc = __fmaf_rn(lut[b >> 4], __uint_as_float(xs[k] << 16), acc);
        acc = __fmaf_rn(lut[b & 15u], __uint_as_float(xs[k] & 0xffff0000u), acc);
    }
    return acc;
}

template <class A>
__device__ __forceinline__ void nf4_gemv_impl(const u8* __restrict__ packed, const A absmax, u32 bs_shift, u32 rows,
                                              u32 in, u32 nb, const u16* __restrict__ x, u16* __restrict__ y) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    const u32 lane = threadIdx.x & 31;
    const u32 r = blockIdx.x * GEMV_ROWS + (threadIdx.x >> 5);
    if (r >= rows) return;
    const u64 row0 = (u64)r * in;
    float acc[GEMV_MAX_BATCH];
#pragma unroll
    for (u32 b = 0; b < GEMV_MAX_BATCH; ++b) acc[b] = 0.0f;
    if ((in & 31u) == 0) {
        const u32 nchunks = in >> 5;
        const uint4* __restrict__ wq = (const uint4*)(packed + (row0 >> 1));
#pragma unroll 2
        for (u32 c = lane; c < nchunks; c += 32) {
            const uint4 q = wq[c];
            const float a = absmax.get((row0 + 32ull * c) >> bs_shift);
#pragma unroll
            for (u32 b = 0; b < GEMV_MAX_BATCH; ++b) {
                if (b < nb) {
                    const uint4* __restrict__ xq = (const uint4*)(x + (u64)b * in);
                    const uint4 x0 = xq[4 * c], x1 = xq[4 * c + 1], x2 = xq[4 * c + 2], x3 = xq[4 * c + 3];
                    float part = 0.0f;
                    part = chunk_word_dot(q.x, x0, lut, part);
                    part = chunk_word_dot(q.y, x1, lut, part);
                    part = chunk_word_dot(q.z, x2, lut, part);
                    part = chunk_word_dot(q.w, x3, lut, part);
                    acc[b] = __fmaf_rn(part, a, acc[b]);
                }
            }
        }
    } else {
        for (u32 k = lane; k < in; k += 32) {
            const u64 e = row0 + k;
            const u32 bt = packed[e >> 1];
            const u32 q = (e & 1) ? (bt & 15u) : (bt >> 4);
            const float w = __fmul_rn(lut[q], absmax.get(e >> bs_shift));
#pragma unroll
            for (u32 b = 0; b < GEMV_MAX_BATCH; ++b)
                if (b < nb) acc[b] = __fmaf_rn(w, bf16_to_f32(x[(u64)b * in + k]), acc[b]);
        }
    }
#pragma unroll
    for (u32 b = 0; b < GEMV_MAX_BATCH; ++b) {
        if (b < nb) {
            float s = acc[b];
#pragma unroll
            for (u32 off = 16; off > 0; off >>= 1) s = __fadd_rn(s, __shfl_xor_sync(0xffffffffu, s, off));
            if (lane == 0) y[(u64)b * rows + r] = f32_to_bf16(s);
        }
    }
}

extern "C" __global__ void __launch_bounds__(32 * GEMV_ROWS)
    nf4_gemv_bf16(const u8* __restrict__ packed, const float* __restrict__ absmax, u32 bs_shift, u32 rows, u32 in,
                  u32 nb, const u16* __restrict__ x, u16* __restrict__ y) {
    nf4_gemv_impl(packed, AbsmaxF32{absmax}, bs_shift, rows, in, nb, x, y);
}
// The same from a double-quantized state, each block's scale decoded where
// it is read (the decode's value: the same bits as decode, then GEMV).
extern "C" __global__ void __launch_bounds__(32 * GEMV_ROWS)
    nf4_gemv_dq_bf16(const u8* __restrict__ packed, const u8* __restrict__ codes, const float* __restrict__ map,
                     const float* __restrict__ nested, u64 nested_bs, float offset, u32 bs_shift, u32 rows, u32 in,
                     u32 nb, const u16* __restrict__ x, u16* __restrict__ y) {
    nf4_gemv_impl(packed, AbsmaxDouble{codes, map, nested, nested_bs, offset}, bs_shift, rows, in, nb, x, y);
}
