// attention.cu — causal grouped-query attention, fp32: the twins of
// src/backend/cpu/attention.rs (attention_forward, attention_backward,
// attention_decode). Layouts (row-major): q, o, do, dq [B, T, H, D];
// k, v, dk, dv [B, S, Hkv, D]; lse, delta [B, T, H]; decode q, o [B, H, D]
// and caches [B, cap, Hkv, D] with lens[B]. Query head h reads KV head
// g = h / (H / Hkv). D ≤ ATT_DMAX: every kernel is a template over its
// largest head_dim DM (a runtime loop over d inside a compile-time tile),
// instantiated for DM = ATT_DNARROW (the names below) and DM = ATT_DMAX
// (the same names with _d256: Gemma's head_dim 256).
//
// Math (scale = D^-1/2 rounded to f32, passed in):
//   row i sits at p = i + (S − T) and sees keys lo ≤ j < p + 1,
//   lo = max(0, p + 1 − W) with a sliding window W, else 0;
//   s_ij = scale·(q_i·k_j), then with a soft cap c > 0 (Gemma 2; cap 0:
//     none) s_ij = c·tanh(s_ij/c) (divide, tanhf, multiply: the CPU's
//     order), lse_i = log Σ_j exp(s_ij),
//   o_i = Σ_j exp(s_ij − lse_i) v_j.
// Forward (FlashAttention-2's online softmax): per key tile,
//   m' = max(m, max_j s_j), l' = l·e^(m−m') + Σ_j e^(s_j−m'),
//   acc' = acc·e^(m−m') + Σ_j e^(s_j−m') v_j;  o = acc/l, lse = m + log l.
// Backward (FA-2, P recomputed from lse):
//   δ_i = do_i·o_i;  P_ij = e^(s_ij − lse_i);  dP_ij = do_i·v_j;
//   dS_ij = P_ij (dP_ij − δ_i)  (× (1 − t²), t = tanh(scale·q·k/c), with a cap);
//   dv_j = Σ_(h in group, i) P_ij do_i;  dk_j = scale Σ_(h, i) dS_ij q_i;
//   dq_i = scale Σ_j dS_ij k_j.
// All sums in f32 with explicit FMAs (the module compiles with
// --fmad=false); exp/log are expf/logf (≤ 2 ulp). Every output element is
// written by one thread in a fixed order: results are deterministic (no
// atomics; dq has its own pass that recomputes P and dS).
//
// Memory traffic (per (batch, head)):
//   forward: Q read once; K and V read once per query tile of ATT_FQ rows
//     (2·S·D·⌈T/ATT_FQ⌉ floats, from L2 for the group's other heads),
//     staged through shared memory; o and lse written once. No T×S matrix.
//   shared memory: the tiles each kernel lists, rows of DM + 1 floats;
//     static in the narrow kernels (under 48 KiB), dynamic in the _d256
//     ones (above 48 KiB: attention.rs F32Kernel::smem sizes it and the
//     launcher raises the function's limit).
//   backward: delta reads do and o once. dkdv (one block per (b, kv head,
//     key tile of ATT_BK keys)) reads its K/V tile once and q, do, lse, δ of
//     every query row of the group that sees the tile (group·T·2D per key
//     tile, at most); writes dk, dv once. dq (one block per (b, h, query
//     tile of ATT_BQ)) reads K/V once per query tile, writes dq once.
//   decode: one block per (b, h): q once, the visible K/V rows of the cache
//     once (each warp a quarter of the keys), o written once.
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned int u32;
typedef unsigned long long u64;

#define ATT_THREADS 128        // 4 warps per block, every kernel
#define ATT_WARPS (ATT_THREADS / 32)
#define ATT_DNARROW 128        // largest head_dim of the narrow kernels
#define ATT_DMAX 256           // largest head_dim (the _d256 kernels)
#define ATT_FQ 16              // forward: query rows per block (4 per warp)
#define ATT_FK 32              // forward / decode: keys per tile (one per lane)
#define ATT_BK 16              // backward dkdv: keys per block
#define ATT_BR 8               // backward dkdv: query rows per chunk (ATT_BR·ATT_BK == ATT_THREADS)
#define ATT_BQ 16              // backward dq: query rows per block

#define ATT_NEG_INF (-__int_as_float(0x7f800000))

// Columns per lane of a DM-wide row, and the shared row stride (DM + 1:
// rows fall in different banks).
template <u32 DM> struct AttDim {
    static const u32 DCH = DM / 32;
    static const u32 PAD = DM + 1;
};

// The _d256 kernels' dynamic shared memory (floats), carved in the order
// the kernels list their tiles; attention.rs F32Kernel::smem computes the
// same sizes.
extern __shared__ __align__(16) float att_smem[];

// The sequence `b`, head `hd` (of `pairs` per sequence) and tile of this
// block under the launchers' grid (attention.rs causal_grid): x = a
// chunk's (sequence, head) pairs, y = tile, z = chunk of gridDim.x / pairs
// sequences; blocks start in index order, so a chunk's blocks run tile by
// tile.
__device__ __forceinline__ void att_block(u32 pairs, u32& b, u32& hd, u32& tile) {
    b = blockIdx.z * (gridDim.x / pairs) + blockIdx.x / pairs;
    hd = blockIdx.x % pairs;
    tile = blockIdx.y;
}

__device__ __forceinline__ float att_warp_max(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}

__device__ __forceinline__ float att_warp_sum(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x = __fadd_rn(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}

// First visible key of absolute position p (window 0: none).
__device__ __forceinline__ long long att_lo(long long p, u32 window) {
    if (window == 0) return 0;
    const long long lo = p + 1 - (long long)window;
    return lo > 0 ? lo : 0;
}

// A scaled score x = scale·(q·k), soft-capped when cap > 0: c·tanh(x/c).
__device__ __forceinline__ float att_cap(float x, float cap) {
    return cap > 0.0f ? __fmul_rn(tanhf(__fdiv_rn(x, cap)), cap) : x;
}

// The backward's P = exp(s − lse) from the unscaled dot, and the factor
// its dS takes from the cap: 1 − t² with t = tanh(scale·dot/c) (1 without
// a cap, which then is not applied: the uncapped bits are unchanged).
__device__ __forceinline__ float att_p(float dot, float scale, float cap, float lse, float& fac) {
    float x = __fmul_rn(dot, scale);
    fac = 1.0f;
    if (cap > 0.0f) {
        const float t = tanhf(__fdiv_rn(x, cap));
        x = __fmul_rn(t, cap);
        fac = __fsub_rn(1.0f, __fmul_rn(t, t));
    }
    return expf(x - lse);
}

// Copies rows [j0, j0+n) of a [.., ld]-strided matrix (row j at base + j·ld)
// into sh[r·PAD + d] for d < D; rows ≥ n are zero-filled up to `rows`.
template <u32 PAD>
__device__ __forceinline__ void att_stage(float* sh, const float* __restrict__ base, u64 ld, long long j0, u32 n, u32 rows, u32 D) {
    for (u32 e = threadIdx.x; e < rows * D; e += blockDim.x) {
        const u32 r = e / D, d = e - r * D;
        sh[r * PAD + d] = r < n ? base[(u64)(j0 + r) * ld + d] : 0.0f;
    }
}

// Forward. grid = causal_grid over ⌈T/ATT_FQ⌉ tiles of H heads, block =
// ATT_THREADS, shared (ATT_FQ + 2·ATT_FK)·PAD floats: sq, sk, sv. Warp w
// owns rows i0 + 4w .. i0 + 4w + 3; in a key tile lane j scores key
// j0 + j, and lane c holds acc columns c, c + 32, ... (DCH of them).
template <u32 DM>
__device__ __forceinline__ void att_forward(float* __restrict__ smem, const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, u32 T, u32 S, u32 H,
                                            u32 Hkv, u32 D, u32 window, float scale, float cap, float* __restrict__ o, float* __restrict__ lse) {
    const u32 PAD = AttDim<DM>::PAD, DCH = AttDim<DM>::DCH;
    float* sq = smem;
    float* sk = sq + ATT_FQ * PAD;
    float* sv = sk + ATT_FK * PAD;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Query tiles last to first: under the causal mask the last rows see
    // the most keys, so a chunk's longest blocks start first.
    u32 b, h, tile;
    att_block(H, b, h, tile);
    const u32 i0 = (gridDim.y - 1 - tile) * ATT_FQ;
    if (i0 >= T) return;
    const u32 g = h / (H / Hkv);
    const u32 nrows = min((u32)ATT_FQ, T - i0);
    const long long off = (long long)S - (long long)T;
    const u64 ldq = (u64)H * D, ldk = (u64)Hkv * D;
    const float* qb = q + ((u64)b * T * H + h) * D;
    const float* kb = k + ((u64)b * S * Hkv + g) * D;
    const float* vb = v + ((u64)b * S * Hkv + g) * D;
    att_stage<PAD>(sq, qb, ldq, i0, nrows, ATT_FQ, D);

    const u32 RW = ATT_FQ / ATT_WARPS;
    float m[RW], l[RW], acc[RW][DCH];
#pragma unroll
    for (u32 r = 0; r < RW; r++) {
        m[r] = ATT_NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (u32 t = 0; t < DCH; t++) acc[r][t] = 0.0f;
    }
    const long long klo = att_lo(i0 + off, window), khi = (long long)(i0 + nrows) + off;
    for (long long j0 = klo; j0 < khi; j0 += ATT_FK) {
        const u32 nk = (u32)min((long long)ATT_FK, khi - j0);
        __syncthreads();  // the previous tile (and at first sq) is done
        att_stage<PAD>(sk, kb, ldk, j0, nk, ATT_FK, D);
        att_stage<PAD>(sv, vb, ldk, j0, nk, ATT_FK, D);
        __syncthreads();
        const long long j = j0 + lane;
#pragma unroll
        for (u32 r = 0; r < RW; r++) {
            const u32 ri = warp * RW + r;
            if (ri >= nrows) continue;  // warp-uniform
            const long long p = (long long)(i0 + ri) + off;
            const bool vis = lane < nk && j <= p && j >= att_lo(p, window);
            float s = ATT_NEG_INF;
            if (vis) {
                float dot = 0.0f;
                const float* qr = sq + ri * PAD;
                const float* kr = sk + lane * PAD;
                for (u32 d = 0; d < D; d++) dot = __fmaf_rn(qr[d], kr[d], dot);
                s = att_cap(__fmul_rn(dot, scale), cap);
            }
            const float mt = att_warp_max(s);
            const float mn = fmaxf(m[r], mt);
            if (mn == ATT_NEG_INF) continue;  // sees nothing yet (warp-uniform)
            const float corr = expf(m[r] - mn);  // 0 on the first visible tile
            const float pj = vis ? expf(s - mn) : 0.0f;
            l[r] = __fadd_rn(__fmul_rn(l[r], corr), att_warp_sum(pj));
            m[r] = mn;
#pragma unroll
            for (u32 t = 0; t < DCH; t++) acc[r][t] = __fmul_rn(acc[r][t], corr);
            for (u32 jj = 0; jj < nk; jj++) {
                const float pv = __shfl_sync(0xffffffffu, pj, jj);
                const float* vr = sv + jj * PAD;
#pragma unroll
                for (u32 t = 0; t < DCH; t++) {
                    const u32 c = lane + 32 * t;
                    if (c < D) acc[r][t] = __fmaf_rn(pv, vr[c], acc[r][t]);
                }
            }
        }
    }
#pragma unroll
    for (u32 r = 0; r < RW; r++) {
        const u32 ri = warp * RW + r;
        if (ri >= nrows) continue;
        const u64 row = ((u64)b * T + i0 + ri) * H + h;
#pragma unroll
        for (u32 t = 0; t < DCH; t++) {
            const u32 c = lane + 32 * t;
            if (c < D) o[row * D + c] = __fdiv_rn(acc[r][t], l[r]);
        }
        if (lane == 0) lse[row] = __fadd_rn(m[r], logf(l[r]));
    }
}

// Decode. grid = (H, B), block = ATT_THREADS, static shared memory. Warp w
// takes key tiles w, w + 4, ... of the visible range (lane j scores key
// j0 + j, reading its K row from global; V rows are read coalesced over
// the columns); the four partial (m, l, acc) are merged in shared memory
// in warp order.
template <u32 DM>
__device__ __forceinline__ void att_decode(const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc, const u32* __restrict__ lens,
                                           u32 cap, u32 H, u32 Hkv, u32 D, u32 window, float scale, float softcap, float* __restrict__ o) {
    const u32 DCH = AttDim<DM>::DCH;
    __shared__ float sq[DM];
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][DM];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 b = blockIdx.y, h = blockIdx.x;
    const u32 g = h / (H / Hkv);
    const u64 ld = (u64)Hkv * D;
    const float* qr = q + ((u64)b * H + h) * D;
    for (u32 d = threadIdx.x; d < D; d += blockDim.x) sq[d] = qr[d];
    __syncthreads();
    const long long len = lens[b];
    const long long lo = att_lo(len - 1, window);
    const float* kb = kc + ((u64)b * cap * Hkv + g) * D;
    const float* vb = vc + ((u64)b * cap * Hkv + g) * D;
    float m = ATT_NEG_INF, l = 0.0f, acc[DCH];
#pragma unroll
    for (u32 t = 0; t < DCH; t++) acc[t] = 0.0f;
    for (long long j0 = lo + (long long)warp * ATT_FK; j0 < len; j0 += ATT_WARPS * ATT_FK) {
        const u32 nk = (u32)min((long long)ATT_FK, len - j0);
        const bool vis = lane < nk;
        float s = ATT_NEG_INF;
        if (vis) {
            const float* kr = kb + (u64)(j0 + lane) * ld;
            float dot = 0.0f;
            for (u32 d = 0; d < D; d++) dot = __fmaf_rn(sq[d], kr[d], dot);
            s = att_cap(__fmul_rn(dot, scale), softcap);
        }
        const float mn = fmaxf(m, att_warp_max(s));  // finite: the tile has a key
        const float corr = expf(m - mn);
        const float pj = vis ? expf(s - mn) : 0.0f;
        l = __fadd_rn(__fmul_rn(l, corr), att_warp_sum(pj));
        m = mn;
#pragma unroll
        for (u32 t = 0; t < DCH; t++) acc[t] = __fmul_rn(acc[t], corr);
        for (u32 jj = 0; jj < nk; jj++) {
            const float pv = __shfl_sync(0xffffffffu, pj, jj);
            const float* vr = vb + (u64)(j0 + jj) * ld;
#pragma unroll
            for (u32 t = 0; t < DCH; t++) {
                const u32 c = lane + 32 * t;
                if (c < D) acc[t] = __fmaf_rn(pv, vr[c], acc[t]);
            }
        }
    }
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (u32 t = 0; t < DCH; t++) sacc[warp][lane + 32 * t] = acc[t];
    __syncthreads();
    float M = ATT_NEG_INF;
    for (u32 w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm[w]);
    float L = 0.0f;
    float f[ATT_WARPS];
    for (u32 w = 0; w < ATT_WARPS; w++) {
        f[w] = sm[w] == ATT_NEG_INF ? 0.0f : expf(sm[w] - M);  // a warp with no keys adds nothing
        L = __fmaf_rn(sl[w], f[w], L);
    }
    float* orow = o + ((u64)b * H + h) * D;
    for (u32 c = threadIdx.x; c < D; c += blockDim.x) {
        float a = 0.0f;
        for (u32 w = 0; w < ATT_WARPS; w++) a = __fmaf_rn(sacc[w][c], f[w], a);
        orow[c] = __fdiv_rn(a, L);
    }
}

// Backward, stage 1: delta[r] = do[r]·o[r] for the n = B·T·H rows of D
// floats; one warp per row, grid-stride. Any D.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_delta_f32(const float* __restrict__ dout, const float* __restrict__ o, u64 n, u32 D, float* __restrict__ delta) {
    const u32 lane = threadIdx.x & 31;
    const u64 nw = (u64)gridDim.x * ATT_WARPS;
    for (u64 r = (u64)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5); r < n; r += nw) {
        float a = 0.0f;
        for (u32 c = lane; c < D; c += 32) a = __fmaf_rn(dout[r * D + c], o[r * D + c], a);
        a = att_warp_sum(a);
        if (lane == 0) delta[r] = a;
    }
}

// Backward, stage 2: dk, dv. grid = causal_grid over ⌈S/ATT_BK⌉ key tiles
// of Hkv heads, block = ATT_THREADS, shared (2·ATT_BK + 2·ATT_BR)·PAD +
// 2·ATT_BR·ATT_BK floats: sk, sv, sq, sdo, sp, sds. The block owns keys
// j0 .. j0+ATT_BK−1 of KV head g; it walks the group's query heads in
// order and, per head, chunks of ATT_BR query rows that see some key of
// the tile: thread t = r·ATT_BK + j scores pair (r, j) into shared P and
// dS, then each thread updates its ATT_BK·DM / ATT_THREADS elements
// e = t + ATT_THREADS·m (key e/D, column e%D) of dv and dk in registers
// (a fixed-order FMA chain over (head, row)).
template <u32 DM>
__device__ __forceinline__ void att_dkdv(float* __restrict__ smem, const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout,
                                         const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 S, u32 H, u32 Hkv, u32 D, u32 window,
                                         float scale, float cap, float* __restrict__ dk, float* __restrict__ dv) {
    const u32 PAD = AttDim<DM>::PAD;
    float* sk = smem;
    float* sv = sk + ATT_BK * PAD;
    float* sq = sv + ATT_BK * PAD;
    float* sdo = sq + ATT_BR * PAD;
    float* sp = sdo + ATT_BR * PAD;  // [ATT_BR][ATT_BK]
    float* sds = sp + ATT_BR * ATT_BK;
    const u32 EPT = ATT_BK * DM / ATT_THREADS;
    // Key tiles first to last: the first keys are seen by the most query
    // rows, so a chunk's longest blocks start first.
    u32 b, g, tile;
    att_block(Hkv, b, g, tile);
    const u32 j0 = tile * ATT_BK;
    if (j0 >= S) return;
    const u32 nk = min((u32)ATT_BK, S - j0);
    const u32 group = H / Hkv;
    const long long off = (long long)S - (long long)T;
    const u64 ldq = (u64)H * D, ldk = (u64)Hkv * D;
    const float* kb = k + ((u64)b * S * Hkv + g) * D;
    const float* vb = v + ((u64)b * S * Hkv + g) * D;
    att_stage<PAD>(sk, kb, ldk, j0, nk, ATT_BK, D);
    att_stage<PAD>(sv, vb, ldk, j0, nk, ATT_BK, D);

    // Query rows whose position p sees a key of [j0, j0+nk):
    // p ≥ j0 and (window) p + 1 − W < j0 + nk.
    long long ilo = (long long)j0 - off;
    if (ilo < 0) ilo = 0;
    long long ihi = T;
    if (window != 0) {
        const long long e = (long long)j0 + nk + window - 1 - off;
        if (e < ihi) ihi = e;
    }
    float adk[EPT], adv[EPT];
#pragma unroll
    for (u32 mm = 0; mm < EPT; mm++) adk[mm] = adv[mm] = 0.0f;
    const u32 pr = threadIdx.x / ATT_BK, pj = threadIdx.x % ATT_BK;
    for (u32 hh = 0; hh < group; hh++) {
        const u32 h = g * group + hh;
        const float* qb = q + ((u64)b * T * H + h) * D;
        const float* db = dout + ((u64)b * T * H + h) * D;
        for (long long r0 = ilo; r0 < ihi; r0 += ATT_BR) {
            const u32 nr = (u32)min((long long)ATT_BR, ihi - r0);
            __syncthreads();  // previous chunk's sq, sdo, sp, sds are done
            att_stage<PAD>(sq, qb, ldq, r0, nr, ATT_BR, D);
            att_stage<PAD>(sdo, db, ldq, r0, nr, ATT_BR, D);
            __syncthreads();
            {
                const long long i = r0 + pr, p = i + off, j = (long long)j0 + pj;
                float P = 0.0f, dS = 0.0f;
                if (pr < nr && pj < nk && j <= p && j >= att_lo(p, window)) {
                    const u64 row = ((u64)b * T + (u64)i) * H + h;
                    float s = 0.0f, dp = 0.0f;
                    const float* qr = sq + pr * PAD;
                    const float* dr = sdo + pr * PAD;
                    const float* kr = sk + pj * PAD;
                    const float* vr = sv + pj * PAD;
                    for (u32 d = 0; d < D; d++) {
                        s = __fmaf_rn(qr[d], kr[d], s);
                        dp = __fmaf_rn(dr[d], vr[d], dp);
                    }
                    float fac;
                    P = att_p(s, scale, cap, lse[row], fac);
                    dS = __fmul_rn(P, __fsub_rn(dp, delta[row]));
                    if (cap > 0.0f) dS = __fmul_rn(dS, fac);
                }
                sp[pr * ATT_BK + pj] = P;
                sds[pr * ATT_BK + pj] = dS;
            }
            __syncthreads();
#pragma unroll
            for (u32 mm = 0; mm < EPT; mm++) {
                const u32 e = threadIdx.x + ATT_THREADS * mm;
                if (e >= nk * D) continue;
                const u32 jj = e / D, c = e - jj * D;
                float a = adv[mm], ak = adk[mm];
                for (u32 r = 0; r < nr; r++) {
                    a = __fmaf_rn(sp[r * ATT_BK + jj], sdo[r * PAD + c], a);
                    ak = __fmaf_rn(sds[r * ATT_BK + jj], sq[r * PAD + c], ak);
                }
                adv[mm] = a;
                adk[mm] = ak;
            }
        }
    }
#pragma unroll
    for (u32 mm = 0; mm < EPT; mm++) {
        const u32 e = threadIdx.x + ATT_THREADS * mm;
        if (e >= nk * D) continue;
        const u32 jj = e / D, c = e - jj * D;
        const u64 at = (u64)(j0 + jj) * ldk + c;
        dv[((u64)b * S * Hkv + g) * D + at] = adv[mm];
        dk[((u64)b * S * Hkv + g) * D + at] = __fmul_rn(adk[mm], scale);
    }
}

// Backward, stage 3: dq. grid = causal_grid over ⌈T/ATT_BQ⌉ tiles of H
// heads, block = ATT_THREADS, shared (2·ATT_BQ + 2·ATT_BK)·PAD +
// ATT_BQ·(ATT_BK + 1) floats: sq, sdo, sk, sv, sds. Per key tile of ATT_BK
// keys: thread t scores pairs t and t + 128 of the ATT_BQ × ATT_BK tile
// into shared dS (P and dS recomputed as in dkdv), then each thread
// updates its ATT_BQ·DM / ATT_THREADS elements of dq in registers (a
// fixed-order FMA chain over keys).
template <u32 DM>
__device__ __forceinline__ void att_dq(float* __restrict__ smem, const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout,
                                       const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 S, u32 H, u32 Hkv, u32 D, u32 window,
                                       float scale, float cap, float* __restrict__ dq) {
    const u32 PAD = AttDim<DM>::PAD;
    const u32 LDS = ATT_BK + 1;
    float* sq = smem;
    float* sdo = sq + ATT_BQ * PAD;
    float* sk = sdo + ATT_BQ * PAD;
    float* sv = sk + ATT_BK * PAD;
    float* sds = sv + ATT_BK * PAD;  // [ATT_BQ][ATT_BK + 1]
    const u32 EPT = ATT_BQ * DM / ATT_THREADS;
    const u32 PPT = ATT_BQ * ATT_BK / ATT_THREADS;
    // Query tiles last to first (the longest first, as the forward).
    u32 b, h, tile;
    att_block(H, b, h, tile);
    const u32 i0 = (gridDim.y - 1 - tile) * ATT_BQ;
    if (i0 >= T) return;
    const u32 g = h / (H / Hkv);
    const u32 nrows = min((u32)ATT_BQ, T - i0);
    const long long off = (long long)S - (long long)T;
    const u64 ldq = (u64)H * D, ldk = (u64)Hkv * D;
    const float* qb = q + ((u64)b * T * H + h) * D;
    const float* db = dout + ((u64)b * T * H + h) * D;
    const float* kb = k + ((u64)b * S * Hkv + g) * D;
    const float* vb = v + ((u64)b * S * Hkv + g) * D;
    att_stage<PAD>(sq, qb, ldq, i0, nrows, ATT_BQ, D);
    att_stage<PAD>(sdo, db, ldq, i0, nrows, ATT_BQ, D);
    float lr[PPT], dr[PPT];
#pragma unroll
    for (u32 u = 0; u < PPT; u++) {
        const u32 r = (threadIdx.x + ATT_THREADS * u) / ATT_BK;
        const u64 row = ((u64)b * T + i0 + r) * H + h;
        lr[u] = r < nrows ? lse[row] : 0.0f;
        dr[u] = r < nrows ? delta[row] : 0.0f;
    }
    float acc[EPT];
#pragma unroll
    for (u32 mm = 0; mm < EPT; mm++) acc[mm] = 0.0f;
    const long long klo = att_lo(i0 + off, window), khi = (long long)(i0 + nrows) + off;
    for (long long j0 = klo; j0 < khi; j0 += ATT_BK) {
        const u32 nk = (u32)min((long long)ATT_BK, khi - j0);
        __syncthreads();  // previous tile's sk, sv, sds are done
        att_stage<PAD>(sk, kb, ldk, j0, nk, ATT_BK, D);
        att_stage<PAD>(sv, vb, ldk, j0, nk, ATT_BK, D);
        __syncthreads();
#pragma unroll
        for (u32 u = 0; u < PPT; u++) {
            const u32 pair = threadIdx.x + ATT_THREADS * u;
            const u32 r = pair / ATT_BK, jj = pair % ATT_BK;
            const long long p = (long long)(i0 + r) + off, j = j0 + jj;
            float dS = 0.0f;
            if (r < nrows && jj < nk && j <= p && j >= att_lo(p, window)) {
                float s = 0.0f, dp = 0.0f;
                const float* qr = sq + r * PAD;
                const float* dor = sdo + r * PAD;
                const float* kr = sk + jj * PAD;
                const float* vr = sv + jj * PAD;
                for (u32 d = 0; d < D; d++) {
                    s = __fmaf_rn(qr[d], kr[d], s);
                    dp = __fmaf_rn(dor[d], vr[d], dp);
                }
                float fac;
                const float P = att_p(s, scale, cap, lr[u], fac);
                dS = __fmul_rn(P, __fsub_rn(dp, dr[u]));
                if (cap > 0.0f) dS = __fmul_rn(dS, fac);
            }
            sds[r * LDS + jj] = dS;
        }
        __syncthreads();
#pragma unroll
        for (u32 mm = 0; mm < EPT; mm++) {
            const u32 e = threadIdx.x + ATT_THREADS * mm;
            if (e >= nrows * D) continue;
            const u32 r = e / D, c = e - r * D;
            float a = acc[mm];
            for (u32 jj = 0; jj < nk; jj++) a = __fmaf_rn(sds[r * LDS + jj], sk[jj * PAD + c], a);
            acc[mm] = a;
        }
    }
#pragma unroll
    for (u32 mm = 0; mm < EPT; mm++) {
        const u32 e = threadIdx.x + ATT_THREADS * mm;
        if (e >= nrows * D) continue;
        const u32 r = e / D, c = e - r * D;
        dq[((u64)b * T + i0 + r) * ldq + (u64)h * D + c] = __fmul_rn(acc[mm], scale);
    }
}

// The entry points: DM = ATT_DNARROW, then DM = ATT_DMAX (_d256). Each
// parameter list is written out (the emulated device reads them). The
// narrow kernels' tiles are static shared memory (under 48 KiB; ptxas then
// knows the occupancy they allow and gives them the registers they had
// before the templates), the _d256 kernels' dynamic (above 48 KiB).
#define ATT_FWD_FLOATS(DM) ((ATT_FQ + 2 * ATT_FK) * (DM + 1))
#define ATT_DKDV_FLOATS(DM) ((2 * ATT_BK + 2 * ATT_BR) * (DM + 1) + 2 * ATT_BR * ATT_BK)
#define ATT_DQ_FLOATS(DM) ((2 * ATT_BQ + 2 * ATT_BK) * (DM + 1) + ATT_BQ * (ATT_BK + 1))
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_forward_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, u32 T, u32 S, u32 H, u32 Hkv, u32 D, u32 window, float scale, float cap, float* __restrict__ o, float* __restrict__ lse) {
    __shared__ float sh[ATT_FWD_FLOATS(ATT_DNARROW)];
    att_forward<ATT_DNARROW>(sh, q, k, v, T, S, H, Hkv, D, window, scale, cap, o, lse);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_dkdv_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 S, u32 H, u32 Hkv, u32 D, u32 window, float scale, float cap, float* __restrict__ dk, float* __restrict__ dv) {
    __shared__ float sh[ATT_DKDV_FLOATS(ATT_DNARROW)];
    att_dkdv<ATT_DNARROW>(sh, q, k, v, dout, lse, delta, T, S, H, Hkv, D, window, scale, cap, dk, dv);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_dq_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 S, u32 H, u32 Hkv, u32 D, u32 window, float scale, float cap, float* __restrict__ dq) {
    __shared__ float sh[ATT_DQ_FLOATS(ATT_DNARROW)];
    att_dq<ATT_DNARROW>(sh, q, k, v, dout, lse, delta, T, S, H, Hkv, D, window, scale, cap, dq);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_decode_f32(const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc, const u32* __restrict__ lens, u32 cap, u32 H, u32 Hkv, u32 D, u32 window, float scale, float softcap, float* __restrict__ o) {
    att_decode<ATT_DNARROW>(q, kc, vc, lens, cap, H, Hkv, D, window, scale, softcap, o);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_forward_d256_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, u32 T, u32 S, u32 H, u32 Hkv, u32 D, u32 window, float scale, float cap, float* __restrict__ o, float* __restrict__ lse) {
    att_forward<ATT_DMAX>(att_smem, q, k, v, T, S, H, Hkv, D, window, scale, cap, o, lse);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_dkdv_d256_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 S, u32 H, u32 Hkv, u32 D, u32 window, float scale, float cap, float* __restrict__ dk, float* __restrict__ dv) {
    att_dkdv<ATT_DMAX>(att_smem, q, k, v, dout, lse, delta, T, S, H, Hkv, D, window, scale, cap, dk, dv);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_dq_d256_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 S, u32 H, u32 Hkv, u32 D, u32 window, float scale, float cap, float* __restrict__ dq) {
    att_dq<ATT_DMAX>(att_smem, q, k, v, dout, lse, delta, T, S, H, Hkv, D, window, scale, cap, dq);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_decode_d256_f32(const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc, const u32* __restrict__ lens, u32 cap, u32 H, u32 Hkv, u32 D, u32 window, float scale, float softcap, float* __restrict__ o) {
    att_decode<ATT_DMAX>(q, kc, vc, lens, cap, H, Hkv, D, window, scale, softcap, o);
}
