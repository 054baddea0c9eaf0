// attention_tc.cu — causal grouped-query attention on tensor cores (bf16
// operands, fp32 accumulation): the training step's attention in its bf16
// compute mode. The same function as attention.cu (and the CPU's
// attention_forward / attention_backward), FlashAttention-2's algorithm,
// with every matrix product an mma.sync.m16n8k16 bf16 -> fp32:
//   forward   S = Q·Kᵀ, online softmax, O += P·V         (P rounded to bf16)
//   backward  Sᵀ = K·Qᵀ, Pᵀ = exp(scale·Sᵀ − lse), dV += Pᵀ·dO, dPᵀ = V·dOᵀ,
//             dSᵀ = Pᵀ∘(dPᵀ − δ), dK += dSᵀ·Q            (dkdv kernel)
//             S = Q·Kᵀ, P, dP = dO·Vᵀ, dS, dQ += dS·K     (dq kernel)
// δ_i = dO_i·O_i comes from attention.cu's attention_delta_f32 (fp32 O) or
// attention_tc_delta_bf16o below (bf16 O).
// Inputs and outputs are in the layouts of attention.cu (q, o, do, dq
// [B, T, H, D]; k, v, dk, dv [B, T, Hkv, D]; lse [B, T, H]). Two forms:
//   *_bf16    q, k, v, o fp32; operands rounded to bf16 (nearest even) as
//             they are staged, so no bf16 copies of the activations exist;
//   *_bf16io  q, k, v, o bf16 (what the bf16 training step keeps for the
//             backward: half the bytes held and read); dO, lse, δ and the
//             gradients fp32 as above.
// Given the roundings of the fp32 form's q, k, v, the bf16 form's forward
// computes the same lse and the fp32 o rounded to bf16 (the rounding
// happens before the first product either way); its backward, given that
// bf16 o, the gradients the fp32 form computes from the widened o (δ is
// computed from o, attention_tc_delta_bf16o for the bf16 one).
// Self-attention only (S = T), D ∈ {64, 128, 256} (256: the atcw_* kernels
// below, with dK and dV in two kernels),
// optional sliding window W (row i sees keys max(0, i−W+1) ≤ j ≤ i),
// optional soft cap c > 0 (Gemma 2; cap 0: none): each scaled score x
// becomes c·tanh(x/c) before the softmax, as in attention.cu, and dS takes
// the factor 1 − t² (t = tanh(x/c)) before its bf16 rounding.
//
// Error (the bound the tests state): each operand carries a relative
// rounding of 2⁻⁸ (the bf16 unit roundoff); P and dS are rounded to bf16
// before their products; sums are fp32 (tensor-core accumulation). exp/log
// are __expf/__logf.
//
// Memory traffic per (batch, head): forward reads Q once, K and V once per
// 64-row query tile (from L2 for the group's other heads) and writes O and
// lse once; dkdv reads its 64 keys of K, V once and Q, dO, lse, δ of every
// query row (and head of the group) that sees them, writes dK, dV once; dq
// reads K, V once per 64-row query tile and writes dQ once. No T×T matrix.
// Deterministic: every output element is summed by one thread in a fixed
// order (no atomics).
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), lane = 4·g + t:
//   A (16×16, row-major, 4 regs of 2 bf16): {(g, 2t..2t+1), (g+8, 2t..),
//     (g, 2t+8..), (g+8, 2t+8..)};  B (16×8, 2 regs): {(2t..2t+1, g),
//     (2t+8.., g)} as (k, n);  C (16×8 fp32): {(g, 2t), (g, 2t+1),
//     (g+8, 2t), (g+8, 2t+1)}.
// A C fragment of a 16×16 product pair is the A fragment of the next
// product (FlashAttention-2's register reuse of P).
//
// No host code and no #include (NVRTC compiles it without headers).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define ATC_THREADS 128     // 4 warps, every kernel
#define ATC_PAD 8           // bf16 padding of shared rows
#define ATC_FWD_BQ 64       // forward: query rows per block (16 per warp)
#define ATC_FWD_BK 64       // forward: keys per tile
#define ATC_DQ_BQ 64        // dq: query rows per block
#define ATC_DQ_BK 32        // dq: keys per tile
#define ATC_KV_BK 64        // dkdv: keys per block (16 per warp)
#define ATC_KV_BQ 32        // dkdv: query rows per tile

#define ATC_NEG_INF (-__int_as_float(0x7f800000))

// Two floats to a bf16 pair (round to nearest even): lo in the low half.
__device__ __forceinline__ u32 atc_pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u16 atc_bf16(float x) { return (u16)(atc_pack(x, 0.0f) & 0xffffu); }

__device__ __forceinline__ u32 atc_ld32(const u16* p) { return *(const u32*)p; }

// Two consecutive elements (the first at an even index) as a bf16 pair, and
// one element as bf16: fp32 inputs are rounded, bf16 inputs read as they are.
__device__ __forceinline__ u32 atc_ld_pair(const float* p) {
    const float2 x = *(const float2*)p;
    return atc_pack(x.x, x.y);
}
__device__ __forceinline__ u32 atc_ld_pair(const u16* p) { return *(const u32*)p; }
__device__ __forceinline__ u16 atc_ld_one(const float* p) { return atc_bf16(*p); }
__device__ __forceinline__ u16 atc_ld_one(const u16* p) { return *p; }

// Stores two consecutive outputs (the first at an even index): fp32, or
// rounded to a bf16 pair.
__device__ __forceinline__ void atc_st_pair(float* p, float a, float b) { *(float2*)p = make_float2(a, b); }
__device__ __forceinline__ void atc_st_pair(u16* p, float a, float b) { *(u32*)p = atc_pack(a, b); }

// c += a·b, m16n8k16, bf16 operands, fp32 accumulators.
__device__ __forceinline__ void atc_mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The sequence `b`, head `hd` (of `pairs` per sequence) and tile of this
// block under the launchers' grid (attention.rs causal_grid): x = a
// chunk's (sequence, head) pairs, y = tile, z = chunk of gridDim.x / pairs
// sequences; blocks start in index order, so a chunk's blocks run tile by
// tile.
__device__ __forceinline__ void atc_block(u32 pairs, u32& b, u32& hd, u32& tile) {
    b = blockIdx.z * (gridDim.x / pairs) + blockIdx.x / pairs;
    hd = blockIdx.x % pairs;
    tile = blockIdx.y;
}

__device__ __forceinline__ float atc_quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float atc_quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// First key row i sees (window 0: no window).
__device__ __forceinline__ long long atc_lo(long long i, u32 window) {
    if (window == 0) return 0;
    const long long lo = i + 1 - (long long)window;
    return lo > 0 ? lo : 0;
}

// Key j visible from query row i (i < T, j < T checked by the caller).
__device__ __forceinline__ bool atc_sees(long long i, long long j, u32 window) {
    return j <= i && (window == 0 || i - j < (long long)window);
}

// A scaled score x = scale·(q·k), soft-capped when cap > 0 (Gemma 2):
// c·tanh(x/c), in attention.cu's (and the CPU's) order; `fac` gets the
// factor dS takes from the cap, 1 − t² (1 without a cap).
__device__ __forceinline__ float atc_cap(float x, float cap, float& fac) {
    if (cap > 0.0f) {
        const float t = tanhf(__fdiv_rn(x, cap));
        fac = 1.0f - t * t;
        return __fmul_rn(t, cap);
    }
    fac = 1.0f;
    return x;
}

// rows×D rows r0.. of a [.., ld]-strided matrix (fp32 or bf16) into bf16
// sh[r·lds + c]; rows ≥ n are zero.
template <int D, typename T>
__device__ __forceinline__ void atc_stage_rows(u16* sh, int lds, const T* __restrict__ base, u64 ld, long long r0, int n, int rows) {
    for (int e = threadIdx.x; e < rows * (D / 2); e += ATC_THREADS) {
        const int r = e / (D / 2), c = (e - r * (D / 2)) * 2;
        *(u32*)(sh + r * lds + c) = r < n ? atc_ld_pair(base + (u64)(r0 + r) * ld + c) : 0u;
    }
}

// The same rows transposed: sh[c·lds + r].
template <int D, typename T>
__device__ __forceinline__ void atc_stage_cols(u16* sh, int lds, const T* __restrict__ base, u64 ld, long long r0, int n, int rows) {
    for (int e = threadIdx.x; e < rows * D; e += ATC_THREADS) {
        const int r = e / D, c = e - r * D;
        sh[c * lds + r] = r < n ? atc_ld_one(base + (u64)(r0 + r) * ld + c) : (u16)0;
    }
}

// A fragments (16 rows × D) of rows r, r+8 of a [.., ld] matrix (fp32 or
// bf16) read straight from global memory (rows ≥ T read as zero).
template <int D, typename T>
__device__ __forceinline__ void atc_frag_rows(u32 (*fa)[4], const T* __restrict__ base, u64 ld, long long r, u32 T_, int t) {
    const bool v0 = r < (long long)T_, v1 = r + 8 < (long long)T_;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const int c = kk * 16 + 2 * t;
        fa[kk][0] = v0 ? atc_ld_pair(base + (u64)r * ld + c) : 0u;
        fa[kk][1] = v1 ? atc_ld_pair(base + (u64)(r + 8) * ld + c) : 0u;
        fa[kk][2] = v0 ? atc_ld_pair(base + (u64)r * ld + c + 8) : 0u;
        fa[kk][3] = v1 ? atc_ld_pair(base + (u64)(r + 8) * ld + c + 8) : 0u;
    }
}

// acc[nd] += A·B for nd < D/8, over NK/16 steps of k: A (16×NK) from the
// C fragments c (rounded to bf16 pairs: a C fragment pair is the next
// product's A fragment, FlashAttention-2's register reuse of P), B (NK×8
// blocks) from sB's row nd·8 + g, columns 16·kk + 2t.. (an operand staged
// transposed by atc_stage_cols). P·V, dS·K, Pᵀ·dO and dSᵀ·Q.
template <int NK, int D>
__device__ __forceinline__ void atc_mma_c(float (*acc)[4], float (*c)[4], const u16* sB, int ldb, int g, int t) {
#pragma unroll
    for (int kk = 0; kk < NK / 16; kk++) {
        const u32 a0 = atc_pack(c[2 * kk][0], c[2 * kk][1]), a1 = atc_pack(c[2 * kk][2], c[2 * kk][3]);
        const u32 a2 = atc_pack(c[2 * kk + 1][0], c[2 * kk + 1][1]), a3 = atc_pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
#pragma unroll
        for (int nd = 0; nd < D / 8; nd++) {
            const u16* pb = sB + (nd * 8 + g) * ldb + kk * 16 + 2 * t;
            atc_mma(acc[nd], a0, a1, a2, a3, atc_ld32(pb), atc_ld32(pb + 8));
        }
    }
}

template <int N>
__device__ __forceinline__ void atc_zero(float (*c)[4]) {
#pragma unroll
    for (int i = 0; i < N; i++) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.0f;
}

// The forward's online softmax over one tile of NK keys j0..: s holds the
// warp's products q·k for its rows row0 (C fragment entries c < 2) and
// row1 = row0 + 8. Visible entries (key < khi, atc_sees) become
// exp(x − m) with x the scaled, soft-capped score and m the rows' new
// running maximum, the others 0; m and the running sums l are updated and
// al gets the factor by which the rows' earlier sums must be scaled.
template <int NK>
__device__ __forceinline__ void atc_softmax(float (*s)[4], long long j0, long long khi, long long row0, long long row1, u32 window, float scale,
                                            float cap, int t, float& m0, float& m1, float& l0, float& l1, float& al0, float& al1) {
    float mx0 = ATC_NEG_INF, mx1 = ATC_NEG_INF;
#pragma unroll
    for (int nt = 0; nt < NK / 8; nt++) {
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const long long j = j0 + nt * 8 + 2 * t + (c & 1);
            const long long i = c < 2 ? row0 : row1;
            float fac;
            const float x = (j < khi && atc_sees(i, j, window)) ? atc_cap(s[nt][c] * scale, cap, fac) : ATC_NEG_INF;
            s[nt][c] = x;
            if (c < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
        }
    }
    mx0 = atc_quad_max(mx0);
    mx1 = atc_quad_max(mx1);
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float mu0 = mn0 == ATC_NEG_INF ? 0.0f : mn0, mu1 = mn1 == ATC_NEG_INF ? 0.0f : mn1;
    al0 = __expf(m0 - mu0);
    al1 = __expf(m1 - mu1);
    float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < NK / 8; nt++) {
        s[nt][0] = __expf(s[nt][0] - mu0);
        s[nt][1] = __expf(s[nt][1] - mu0);
        s[nt][2] = __expf(s[nt][2] - mu1);
        s[nt][3] = __expf(s[nt][3] - mu1);
        ps0 += s[nt][0] + s[nt][1];
        ps1 += s[nt][2] + s[nt][3];
    }
    l0 = l0 * al0 + atc_quad_sum(ps0);
    l1 = l1 * al1 + atc_quad_sum(ps1);
    m0 = mn0;
    m1 = mn1;
}

// Scales rows row0 (entries c < 2) and row1 of an accumulator.
template <int D>
__device__ __forceinline__ void atc_rescale(float (*acc)[4], float al0, float al1) {
#pragma unroll
    for (int nd = 0; nd < D / 8; nd++) {
        acc[nd][0] *= al0;
        acc[nd][1] *= al0;
        acc[nd][2] *= al1;
        acc[nd][3] *= al1;
    }
}

// The forward's outputs of rows row0 and row1 (those < T): o = acc / l
// (fp32 or rounded to bf16) and lse = m + log l.
template <int D, typename TO>
__device__ __forceinline__ void atc_store_o(TO* __restrict__ o, float* __restrict__ lse, u32 b, u32 T, u32 H, u32 h, long long row0, long long row1,
                                            float (*acc)[4], float m0, float m1, float l0, float l1, int t) {
    const u64 ldq = (u64)H * D;
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    if (row0 < (long long)T) {
        TO* ob = o + ((u64)b * T + row0) * ldq + (u64)h * D;
#pragma unroll
        for (int nd = 0; nd < D / 8; nd++) atc_st_pair(ob + nd * 8 + 2 * t, acc[nd][0] * inv0, acc[nd][1] * inv0);
        if (t == 0) lse[((u64)b * T + row0) * H + h] = m0 + __logf(l0);
    }
    if (row1 < (long long)T) {
        TO* ob = o + ((u64)b * T + row1) * ldq + (u64)h * D;
#pragma unroll
        for (int nd = 0; nd < D / 8; nd++) atc_st_pair(ob + nd * 8 + 2 * t, acc[nd][2] * inv1, acc[nd][3] * inv1);
        if (t == 0) lse[((u64)b * T + row1) * H + h] = m1 + __logf(l1);
    }
}

// The dq kernels' tile: s (q·k of rows row0, row1 against keys j0..)
// becomes dS = P∘(dP − δ)·(1 − t²) (0 where not visible), P = exp(x − lse).
template <int NK>
__device__ __forceinline__ void atc_ds(float (*s)[4], float (*dp)[4], long long j0, long long khi, long long row0, long long row1, u32 T, u32 window,
                                       float scale, float cap, float lse0, float lse1, float del0, float del1, int t) {
#pragma unroll
    for (int nt = 0; nt < NK / 8; nt++) {
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const long long j = j0 + nt * 8 + 2 * t + (c & 1);
            const long long i = c < 2 ? row0 : row1;
            const bool ok = j < khi && i < (long long)T && atc_sees(i, j, window);
            float fac = 1.0f;
            const float p = ok ? __expf(atc_cap(s[nt][c] * scale, cap, fac) - (c < 2 ? lse0 : lse1)) : 0.0f;
            s[nt][c] = p * (dp[nt][c] - (c < 2 ? del0 : del1)) * fac;
        }
    }
}

// The dK/dV kernels' tile, transposed (rows keys key0 (c < 2) and key1,
// columns the queries i0 + il, il < nq): with P, st (k·q) becomes Pᵀ; with
// DS, dp (v·dO) becomes dSᵀ = Pᵀ∘(dPᵀ − δ)·(1 − t²).
template <int NQ, bool P, bool DS>
__device__ __forceinline__ void atc_pt(float (*st)[4], float (*dp)[4], long long i0, int nq, long long key0, long long key1, u32 T, u32 window,
                                       float scale, float cap, const float* sl, const float* sd, int t) {
#pragma unroll
    for (int nt = 0; nt < NQ / 8; nt++) {
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int il = nt * 8 + 2 * t + (c & 1);
            const long long i = i0 + il, j = c < 2 ? key0 : key1;
            const bool ok = il < nq && j < (long long)T && atc_sees(i, j, window);
            float fac = 1.0f;
            const float p = ok ? __expf(atc_cap(st[nt][c] * scale, cap, fac) - sl[il]) : 0.0f;
            if (P) st[nt][c] = p;
            if (DS) dp[nt][c] = p * (dp[nt][c] - sd[il]) * fac;
        }
    }
}

// Rows r0 (entries c < 2) and r1 = r0 + 8 of an fp32 accumulator, times f,
// to out0 and out1 (NULL: a row past the end).
template <int D>
__device__ __forceinline__ void atc_store_f32(float* out0, float* out1, float (*acc)[4], float f, int t) {
    if (out0) {
#pragma unroll
        for (int nd = 0; nd < D / 8; nd++) *(float2*)(out0 + nd * 8 + 2 * t) = make_float2(acc[nd][0] * f, acc[nd][1] * f);
    }
    if (out1) {
#pragma unroll
        for (int nd = 0; nd < D / 8; nd++) *(float2*)(out1 + nd * 8 + 2 * t) = make_float2(acc[nd][2] * f, acc[nd][3] * f);
    }
}

// ------------------------------------------------------------------ forward
// grid = causal_grid over ⌈T/64⌉ tiles of H heads, block = 128. Warp w owns query rows i0+16w .. +15.
template <int D, typename TI, typename TO>
__device__ __forceinline__ void atc_forward(const TI* __restrict__ q, const TI* __restrict__ k, const TI* __restrict__ v, u32 T, u32 H, u32 Hkv,
                                            u32 window, float scale, float cap, TO* __restrict__ o, float* __restrict__ lse) {
    constexpr int LDK = D + ATC_PAD, LDV = ATC_FWD_BK + ATC_PAD;
    __shared__ __align__(16) u16 sK[ATC_FWD_BK * LDK];
    __shared__ __align__(16) u16 sVt[D * LDV];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // Query tiles last to first: under the causal mask the last rows see
    // the most keys, so a chunk's longest blocks start first.
    u32 b, h, tile;
    atc_block(H, b, h, tile);
    const u32 i0 = (gridDim.y - 1 - tile) * ATC_FWD_BQ;
    if (i0 >= T) return;
    const u32 grp = h / (H / Hkv);
    const u64 ldq = (u64)H * D, ldk = (u64)Hkv * D;
    const TI* qb = q + ((u64)b * T * H + h) * D;
    const TI* kb = k + ((u64)b * T * Hkv + grp) * D;
    const TI* vb = v + ((u64)b * T * Hkv + grp) * D;
    const int nq = (int)min((u32)ATC_FWD_BQ, T - i0);
    const long long wr = (long long)i0 + warp * 16;  // the warp's first row
    const long long row0 = wr + g, row1 = row0 + 8;
    u32 qa[D / 16][4];
    atc_frag_rows<D>(qa, qb, ldq, row0, T, t);
    float acc[D / 8][4];
    atc_zero<D / 8>(acc);
    float m0 = ATC_NEG_INF, m1 = ATC_NEG_INF, l0 = 0.0f, l1 = 0.0f;
    const long long klo = atc_lo(i0, window), khi = (long long)i0 + nq;
    for (long long j0 = klo; j0 < khi; j0 += ATC_FWD_BK) {
        const int nk = (int)min((long long)ATC_FWD_BK, khi - j0);
        __syncthreads();  // the previous tile is consumed
        atc_stage_rows<D>(sK, LDK, kb, ldk, j0, nk, ATC_FWD_BK);
        atc_stage_cols<D>(sVt, LDV, vb, ldk, j0, nk, ATC_FWD_BK);
        __syncthreads();
        if (wr >= (long long)T || j0 > wr + 15 || j0 + ATC_FWD_BK <= atc_lo(wr, window)) continue;  // nothing visible to this warp
        float s[ATC_FWD_BK / 8][4];
        atc_zero<ATC_FWD_BK / 8>(s);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
            for (int nt = 0; nt < ATC_FWD_BK / 8; nt++) {
                const u16* pb = sK + (nt * 8 + g) * LDK + kk * 16 + 2 * t;
                atc_mma(s[nt], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], atc_ld32(pb), atc_ld32(pb + 8));
            }
        }
        float al0, al1;
        atc_softmax<ATC_FWD_BK>(s, j0, khi, row0, row1, window, scale, cap, t, m0, m1, l0, l1, al0, al1);
        atc_rescale<D>(acc, al0, al1);
        atc_mma_c<ATC_FWD_BK, D>(acc, s, sVt, LDV, g, t);
    }
    atc_store_o<D>(o, lse, b, T, H, h, row0, row1, acc, m0, m1, l0, l1, t);
}

// ----------------------------------------------------------------------- dq
// grid = causal_grid over ⌈T/64⌉ tiles of H heads, block = 128. Warp w owns query rows i0+16w .. +15.
template <int D, typename TI>
__device__ __forceinline__ void atc_dq(const TI* __restrict__ q, const TI* __restrict__ k, const TI* __restrict__ v, const float* __restrict__ dout,
                                       const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale,
                                       float cap, float* __restrict__ dq) {
    constexpr int LDK = D + ATC_PAD, LDT = ATC_DQ_BK + ATC_PAD;
    __shared__ __align__(16) u16 sK[ATC_DQ_BK * LDK];
    __shared__ __align__(16) u16 sV[ATC_DQ_BK * LDK];
    __shared__ __align__(16) u16 sKt[D * LDT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // Query tiles last to first (the longest first, as the forward).
    u32 b, h, tile;
    atc_block(H, b, h, tile);
    const u32 i0 = (gridDim.y - 1 - tile) * ATC_DQ_BQ;
    if (i0 >= T) return;
    const u32 grp = h / (H / Hkv);
    const u64 ldq = (u64)H * D, ldk = (u64)Hkv * D;
    const TI* qb = q + ((u64)b * T * H + h) * D;
    const float* ob = dout + ((u64)b * T * H + h) * D;
    const TI* kb = k + ((u64)b * T * Hkv + grp) * D;
    const TI* vb = v + ((u64)b * T * Hkv + grp) * D;
    const int nq = (int)min((u32)ATC_DQ_BQ, T - i0);
    const long long wr = (long long)i0 + warp * 16;
    const long long row0 = wr + g, row1 = row0 + 8;
    u32 qa[D / 16][4], da[D / 16][4];
    atc_frag_rows<D>(qa, qb, ldq, row0, T, t);
    atc_frag_rows<D>(da, ob, ldq, row0, T, t);
    const bool v0 = row0 < (long long)T, v1 = row1 < (long long)T;
    const float lse0 = v0 ? lse[((u64)b * T + row0) * H + h] : 0.0f, lse1 = v1 ? lse[((u64)b * T + row1) * H + h] : 0.0f;
    const float del0 = v0 ? delta[((u64)b * T + row0) * H + h] : 0.0f, del1 = v1 ? delta[((u64)b * T + row1) * H + h] : 0.0f;
    float acc[D / 8][4];
    atc_zero<D / 8>(acc);
    const long long klo = atc_lo(i0, window), khi = (long long)i0 + nq;
    for (long long j0 = klo; j0 < khi; j0 += ATC_DQ_BK) {
        const int nk = (int)min((long long)ATC_DQ_BK, khi - j0);
        __syncthreads();
        atc_stage_rows<D>(sK, LDK, kb, ldk, j0, nk, ATC_DQ_BK);
        atc_stage_rows<D>(sV, LDK, vb, ldk, j0, nk, ATC_DQ_BK);
        atc_stage_cols<D>(sKt, LDT, kb, ldk, j0, nk, ATC_DQ_BK);
        __syncthreads();
        if (wr >= (long long)T || j0 > wr + 15 || j0 + ATC_DQ_BK <= atc_lo(wr, window)) continue;
        float s[ATC_DQ_BK / 8][4], dp[ATC_DQ_BK / 8][4];
        atc_zero<ATC_DQ_BK / 8>(s);
        atc_zero<ATC_DQ_BK / 8>(dp);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
            for (int nt = 0; nt < ATC_DQ_BK / 8; nt++) {
                const u16* pk = sK + (nt * 8 + g) * LDK + kk * 16 + 2 * t;
                const u16* pv = sV + (nt * 8 + g) * LDK + kk * 16 + 2 * t;
                atc_mma(s[nt], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], atc_ld32(pk), atc_ld32(pk + 8));
                atc_mma(dp[nt], da[kk][0], da[kk][1], da[kk][2], da[kk][3], atc_ld32(pv), atc_ld32(pv + 8));
            }
        }
        atc_ds<ATC_DQ_BK>(s, dp, j0, khi, row0, row1, T, window, scale, cap, lse0, lse1, del0, del1, t);
        atc_mma_c<ATC_DQ_BK, D>(acc, s, sKt, LDT, g, t);
    }
    float* out = dq + (u64)h * D;
    atc_store_f32<D>(v0 ? out + ((u64)b * T + row0) * ldq : nullptr, v1 ? out + ((u64)b * T + row1) * ldq : nullptr, acc, scale, t);
}

// --------------------------------------------------------------------- dkdv
// grid = causal_grid over ⌈T/64⌉ key tiles of Hkv heads, block = 128, dynamic shared memory
// atc_kv_smem(D) bytes. Warp w owns keys j0+16w .. +15; the block walks the
// query rows of every head of its KV group that see its keys, 32 at a time.
template <int D, typename TI>
__device__ __forceinline__ void atc_dkdv(const TI* __restrict__ q, const TI* __restrict__ k, const TI* __restrict__ v, const float* __restrict__ dout,
                                         const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale,
                                         float cap, float* __restrict__ dk, float* __restrict__ dv) {
    constexpr int LDK = D + ATC_PAD, LDT = ATC_KV_BQ + ATC_PAD;
    extern __shared__ __align__(16) unsigned char atc_smem[];
    u16* sK = (u16*)atc_smem;               // [64][LDK]
    u16* sV = sK + ATC_KV_BK * LDK;         // [64][LDK]
    u16* sQ = sV + ATC_KV_BK * LDK;         // [32][LDK]
    u16* sO = sQ + ATC_KV_BQ * LDK;         // [32][LDK]   dO
    u16* sQt = sO + ATC_KV_BQ * LDK;        // [D][LDT]
    u16* sOt = sQt + D * LDT;               // [D][LDT]    dOᵀ
    float* sl = (float*)(sOt + D * LDT);    // [32] lse
    float* sd = sl + ATC_KV_BQ;             // [32] δ
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // Key tiles first to last: the first keys are seen by the most query
    // rows, so a chunk's longest blocks start first.
    u32 b, grp, tile;
    atc_block(Hkv, b, grp, tile);
    const u32 j0 = tile * ATC_KV_BK;
    if (j0 >= T) return;
    const u32 per = H / Hkv;
    const u64 ldq = (u64)H * D, ldk = (u64)Hkv * D;
    const TI* kb = k + ((u64)b * T * Hkv + grp) * D;
    const TI* vb = v + ((u64)b * T * Hkv + grp) * D;
    const int nk = (int)min((u32)ATC_KV_BK, T - j0);
    atc_stage_rows<D>(sK, LDK, kb, ldk, j0, nk, ATC_KV_BK);
    atc_stage_rows<D>(sV, LDK, vb, ldk, j0, nk, ATC_KV_BK);
    const int kw = warp * 16;  // the warp's first key within the block
    const long long key0 = (long long)j0 + kw + g, key1 = key0 + 8;
    float ak[D / 8][4], av[D / 8][4];
    atc_zero<D / 8>(ak);
    atc_zero<D / 8>(av);
    // Rows that see a key of the block: j0 ≤ i < j0 + nk − 1 + W.
    const long long qhi = window == 0 ? (long long)T : min((long long)T, (long long)j0 + nk - 1 + (long long)window);
    const long long wk0 = (long long)j0 + kw;  // the warp's first key
    for (u32 hh = 0; hh < per; hh++) {
        const u32 h = grp * per + hh;
        const TI* qb = q + ((u64)b * T * H + h) * D;
        const float* ob = dout + ((u64)b * T * H + h) * D;
        for (long long i0 = j0; i0 < qhi; i0 += ATC_KV_BQ) {
            const int nq = (int)min((long long)ATC_KV_BQ, qhi - i0);
            __syncthreads();
            atc_stage_rows<D>(sQ, LDK, qb, ldq, i0, nq, ATC_KV_BQ);
            atc_stage_rows<D>(sO, LDK, ob, ldq, i0, nq, ATC_KV_BQ);
            atc_stage_cols<D>(sQt, LDT, qb, ldq, i0, nq, ATC_KV_BQ);
            atc_stage_cols<D>(sOt, LDT, ob, ldq, i0, nq, ATC_KV_BQ);
            if (threadIdx.x < ATC_KV_BQ) {
                const bool ok = (int)threadIdx.x < nq;
                const u64 r = ((u64)b * T + (u64)(i0 + threadIdx.x)) * H + h;
                sl[threadIdx.x] = ok ? lse[r] : 0.0f;
                sd[threadIdx.x] = ok ? delta[r] : 0.0f;
            }
            __syncthreads();
            // Nothing of this tile sees the warp's keys: all rows before the
            // first key, or (window) all rows past the last key's window.
            if (wk0 >= (long long)T || i0 + nq - 1 < wk0 || (window != 0 && i0 >= wk0 + 15 + (long long)window)) continue;
            float st[ATC_KV_BQ / 8][4], dp[ATC_KV_BQ / 8][4];
            atc_zero<ATC_KV_BQ / 8>(st);
            atc_zero<ATC_KV_BQ / 8>(dp);
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                const u16* pk0 = sK + (kw + g) * LDK + kk * 16 + 2 * t;
                const u16* pk1 = pk0 + 8 * LDK;
                const u16* pv0 = sV + (kw + g) * LDK + kk * 16 + 2 * t;
                const u16* pv1 = pv0 + 8 * LDK;
                const u32 k0 = atc_ld32(pk0), k1 = atc_ld32(pk1), k2 = atc_ld32(pk0 + 8), k3 = atc_ld32(pk1 + 8);
                const u32 w0 = atc_ld32(pv0), w1 = atc_ld32(pv1), w2 = atc_ld32(pv0 + 8), w3 = atc_ld32(pv1 + 8);
#pragma unroll
                for (int nt = 0; nt < ATC_KV_BQ / 8; nt++) {
                    const u16* pq = sQ + (nt * 8 + g) * LDK + kk * 16 + 2 * t;
                    const u16* po = sO + (nt * 8 + g) * LDK + kk * 16 + 2 * t;
                    atc_mma(st[nt], k0, k1, k2, k3, atc_ld32(pq), atc_ld32(pq + 8));
                    atc_mma(dp[nt], w0, w1, w2, w3, atc_ld32(po), atc_ld32(po + 8));
                }
            }
            // Pᵀ and dSᵀ: rows are keys (key0: c < 2, key1: c ≥ 2), columns queries.
            atc_pt<ATC_KV_BQ, true, true>(st, dp, i0, nq, key0, key1, T, window, scale, cap, sl, sd, t);
            atc_mma_c<ATC_KV_BQ, D>(av, st, sOt, LDT, g, t);
            atc_mma_c<ATC_KV_BQ, D>(ak, dp, sQt, LDT, g, t);
        }
    }
    const u64 r0 = (((u64)b * T + key0) * Hkv + grp) * D, r1 = (((u64)b * T + key1) * Hkv + grp) * D;
    const bool k0 = key0 < (long long)T, k1 = key1 < (long long)T;
    atc_store_f32<D>(k0 ? dk + r0 : nullptr, k1 ? dk + r1 : nullptr, ak, scale, t);
    atc_store_f32<D>(k0 ? dv + r0 : nullptr, k1 ? dv + r1 : nullptr, av, 1.0f, t);
}

// ------------------------------------------------------------ head_dim 256
// The same three products for D = 256 (Gemma 1, 2 and 3), restructured so
// a thread's registers hold one D-wide accumulator: the warps' A fragments
// of Q (and dO) are read from shared memory instead of held in registers,
// tiles are 32 keys (forward, dq) or 32 query rows (dK, dV), and dK and dV
// are two kernels (each recomputes P from K·Qᵀ; dK also dP = V·dOᵀ). Every
// buffer lives in dynamic shared memory (atcw_*_smem in the launcher:
// 70 / 119 / 70 / 120 KiB for forward / dq / dV / dK at D = 256). Operands
// are staged with the roundings of the narrow kernels (the same bf16
// values); the sums differ only in their tile order.
#define ATC_W_BK 32

// The A fragment (16×16, row-major) of rows r..r+15, columns 16·kk.. of a
// bf16 matrix in shared memory with row stride ld.
__device__ __forceinline__ void atc_afrag(const u16* sh, int ld, int r, int kk, int g, int t, u32& a0, u32& a1, u32& a2, u32& a3) {
    const u16* p = sh + (r + g) * ld + kk * 16 + 2 * t;
    a0 = atc_ld32(p);
    a1 = atc_ld32(p + 8 * ld);
    a2 = atc_ld32(p + 8);
    a3 = atc_ld32(p + 8 * ld + 8);
}

// forward, D = 256: grid as atc_forward; dynamic shared memory
// sQ [64][LDK], sK [32][LDK], sVᵀ [D][LDT].
template <int D, typename TI, typename TO>
__device__ __forceinline__ void atcw_forward(const TI* __restrict__ q, const TI* __restrict__ k, const TI* __restrict__ v, u32 T, u32 H, u32 Hkv,
                                             u32 window, float scale, float cap, TO* __restrict__ o, float* __restrict__ lse) {
    constexpr int BQ = ATC_FWD_BQ, BK = ATC_W_BK, LDK = D + ATC_PAD, LDT = BK + ATC_PAD;
    extern __shared__ __align__(16) unsigned char atc_smem[];
    u16* sQ = (u16*)atc_smem;   // [BQ][LDK]
    u16* sK = sQ + BQ * LDK;    // [BK][LDK]
    u16* sVt = sK + BK * LDK;   // [D][LDT]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    u32 b, h, tile;
    atc_block(H, b, h, tile);
    const u32 i0 = (gridDim.y - 1 - tile) * BQ;
    if (i0 >= T) return;
    const u32 grp = h / (H / Hkv);
    const u64 ldq = (u64)H * D, ldk = (u64)Hkv * D;
    const TI* qb = q + ((u64)b * T * H + h) * D;
    const TI* kb = k + ((u64)b * T * Hkv + grp) * D;
    const TI* vb = v + ((u64)b * T * Hkv + grp) * D;
    const int nq = (int)min((u32)BQ, T - i0);
    const long long wr = (long long)i0 + warp * 16;
    const long long row0 = wr + g, row1 = row0 + 8;
    atc_stage_rows<D>(sQ, LDK, qb, ldq, i0, nq, BQ);  // visible after the loop's first barrier
    float acc[D / 8][4];
    atc_zero<D / 8>(acc);
    float m0 = ATC_NEG_INF, m1 = ATC_NEG_INF, l0 = 0.0f, l1 = 0.0f;
    const long long klo = atc_lo(i0, window), khi = (long long)i0 + nq;
    for (long long j0 = klo; j0 < khi; j0 += BK) {
        const int nk = (int)min((long long)BK, khi - j0);
        __syncthreads();
        atc_stage_rows<D>(sK, LDK, kb, ldk, j0, nk, BK);
        atc_stage_cols<D>(sVt, LDT, vb, ldk, j0, nk, BK);
        __syncthreads();
        if (wr >= (long long)T || j0 > wr + 15 || j0 + BK <= atc_lo(wr, window)) continue;
        float s[BK / 8][4];
        atc_zero<BK / 8>(s);
#pragma unroll 4
        for (int kk = 0; kk < D / 16; kk++) {
            u32 a0, a1, a2, a3;
            atc_afrag(sQ, LDK, warp * 16, kk, g, t, a0, a1, a2, a3);
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
                const u16* pb = sK + (nt * 8 + g) * LDK + kk * 16 + 2 * t;
                atc_mma(s[nt], a0, a1, a2, a3, atc_ld32(pb), atc_ld32(pb + 8));
            }
        }
        float al0, al1;
        atc_softmax<BK>(s, j0, khi, row0, row1, window, scale, cap, t, m0, m1, l0, l1, al0, al1);
        atc_rescale<D>(acc, al0, al1);
        atc_mma_c<BK, D>(acc, s, sVt, LDT, g, t);
    }
    atc_store_o<D>(o, lse, b, T, H, h, row0, row1, acc, m0, m1, l0, l1, t);
}

// dq, D = 256: grid as atc_dq; dynamic shared memory sQ [64][LDK],
// sdO [64][LDK], sK [32][LDK], sV [32][LDK], sKᵀ [D][LDT].
template <int D, typename TI>
__device__ __forceinline__ void atcw_dq(const TI* __restrict__ q, const TI* __restrict__ k, const TI* __restrict__ v, const float* __restrict__ dout,
                                        const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale,
                                        float cap, float* __restrict__ dq) {
    constexpr int BQ = ATC_DQ_BQ, BK = ATC_W_BK, LDK = D + ATC_PAD, LDT = BK + ATC_PAD;
    extern __shared__ __align__(16) unsigned char atc_smem[];
    u16* sQ = (u16*)atc_smem;   // [BQ][LDK]
    u16* sO = sQ + BQ * LDK;    // [BQ][LDK]  dO
    u16* sK = sO + BQ * LDK;    // [BK][LDK]
    u16* sV = sK + BK * LDK;    // [BK][LDK]
    u16* sKt = sV + BK * LDK;   // [D][LDT]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    u32 b, h, tile;
    atc_block(H, b, h, tile);
    const u32 i0 = (gridDim.y - 1 - tile) * BQ;
    if (i0 >= T) return;
    const u32 grp = h / (H / Hkv);
    const u64 ldq = (u64)H * D, ldk = (u64)Hkv * D;
    const TI* qb = q + ((u64)b * T * H + h) * D;
    const float* ob = dout + ((u64)b * T * H + h) * D;
    const TI* kb = k + ((u64)b * T * Hkv + grp) * D;
    const TI* vb = v + ((u64)b * T * Hkv + grp) * D;
    const int nq = (int)min((u32)BQ, T - i0);
    const long long wr = (long long)i0 + warp * 16;
    const long long row0 = wr + g, row1 = row0 + 8;
    atc_stage_rows<D>(sQ, LDK, qb, ldq, i0, nq, BQ);
    atc_stage_rows<D>(sO, LDK, ob, ldq, i0, nq, BQ);
    const bool v0 = row0 < (long long)T, v1 = row1 < (long long)T;
    const float lse0 = v0 ? lse[((u64)b * T + row0) * H + h] : 0.0f, lse1 = v1 ? lse[((u64)b * T + row1) * H + h] : 0.0f;
    const float del0 = v0 ? delta[((u64)b * T + row0) * H + h] : 0.0f, del1 = v1 ? delta[((u64)b * T + row1) * H + h] : 0.0f;
    float acc[D / 8][4];
    atc_zero<D / 8>(acc);
    const long long klo = atc_lo(i0, window), khi = (long long)i0 + nq;
    for (long long j0 = klo; j0 < khi; j0 += BK) {
        const int nk = (int)min((long long)BK, khi - j0);
        __syncthreads();
        atc_stage_rows<D>(sK, LDK, kb, ldk, j0, nk, BK);
        atc_stage_rows<D>(sV, LDK, vb, ldk, j0, nk, BK);
        atc_stage_cols<D>(sKt, LDT, kb, ldk, j0, nk, BK);
        __syncthreads();
        if (wr >= (long long)T || j0 > wr + 15 || j0 + BK <= atc_lo(wr, window)) continue;
        float s[BK / 8][4], dp[BK / 8][4];
        atc_zero<BK / 8>(s);
        atc_zero<BK / 8>(dp);
#pragma unroll 2
        for (int kk = 0; kk < D / 16; kk++) {
            u32 a0, a1, a2, a3, d0, d1, d2, d3;
            atc_afrag(sQ, LDK, warp * 16, kk, g, t, a0, a1, a2, a3);
            atc_afrag(sO, LDK, warp * 16, kk, g, t, d0, d1, d2, d3);
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
                const u16* pk = sK + (nt * 8 + g) * LDK + kk * 16 + 2 * t;
                const u16* pv = sV + (nt * 8 + g) * LDK + kk * 16 + 2 * t;
                atc_mma(s[nt], a0, a1, a2, a3, atc_ld32(pk), atc_ld32(pk + 8));
                atc_mma(dp[nt], d0, d1, d2, d3, atc_ld32(pv), atc_ld32(pv + 8));
            }
        }
        atc_ds<BK>(s, dp, j0, khi, row0, row1, T, window, scale, cap, lse0, lse1, del0, del1, t);
        atc_mma_c<BK, D>(acc, s, sKt, LDT, g, t);
    }
    float* out = dq + (u64)h * D;
    atc_store_f32<D>(v0 ? out + ((u64)b * T + row0) * ldq : nullptr, v1 ? out + ((u64)b * T + row1) * ldq : nullptr, acc, scale, t);
}

// dV (DV) or dK (!DV), D = 256: grid as atc_dkdv (blocks of 64 keys, 16
// per warp, walking the query rows of every head of the KV group that see
// them, 32 at a time); dynamic shared memory sK [64][LDK], then for dK sV
// [64][LDK], then sQ [32][LDK], for dK sdO [32][LDK], then sT [D][LDT]
// (dOᵀ for dV, Qᵀ for dK), lse [32] and for dK δ [32].
template <int D, typename TI, bool DV>
__device__ __forceinline__ void atcw_dkdv(const TI* __restrict__ q, const TI* __restrict__ k, const TI* __restrict__ v, const float* __restrict__ dout,
                                          const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale,
                                          float cap, float* __restrict__ out) {
    constexpr int BK = ATC_KV_BK, BQ = ATC_W_BK, LDK = D + ATC_PAD, LDT = BQ + ATC_PAD;
    extern __shared__ __align__(16) unsigned char atc_smem[];
    u16* sK = (u16*)atc_smem;                  // [BK][LDK]
    u16* sV = sK + BK * LDK;                   // [BK][LDK] (dK)
    u16* sQ = DV ? sV : sV + BK * LDK;         // [BQ][LDK]
    u16* sO = sQ + BQ * LDK;                   // [BQ][LDK] (dK) dO
    u16* sT = DV ? sO : sO + BQ * LDK;         // [D][LDT]  dOᵀ (dV), Qᵀ (dK)
    float* sl = (float*)(sT + D * LDT);        // [BQ] lse
    float* sd = sl + BQ;                       // [BQ] δ (dK)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    u32 b, grp, tile;
    atc_block(Hkv, b, grp, tile);
    const u32 j0 = tile * BK;
    if (j0 >= T) return;
    const u32 per = H / Hkv;
    const u64 ldq = (u64)H * D, ldk = (u64)Hkv * D;
    const TI* kb = k + ((u64)b * T * Hkv + grp) * D;
    const TI* vb = v + ((u64)b * T * Hkv + grp) * D;
    const int nk = (int)min((u32)BK, T - j0);
    atc_stage_rows<D>(sK, LDK, kb, ldk, j0, nk, BK);
    if (!DV) atc_stage_rows<D>(sV, LDK, vb, ldk, j0, nk, BK);
    const int kw = warp * 16;
    const long long key0 = (long long)j0 + kw + g, key1 = key0 + 8;
    float acc[D / 8][4];
    atc_zero<D / 8>(acc);
    const long long qhi = window == 0 ? (long long)T : min((long long)T, (long long)j0 + nk - 1 + (long long)window);
    const long long wk0 = (long long)j0 + kw;
    for (u32 hh = 0; hh < per; hh++) {
        const u32 h = grp * per + hh;
        const TI* qb = q + ((u64)b * T * H + h) * D;
        const float* ob = dout + ((u64)b * T * H + h) * D;
        for (long long i0 = j0; i0 < qhi; i0 += BQ) {
            const int nq = (int)min((long long)BQ, qhi - i0);
            __syncthreads();
            atc_stage_rows<D>(sQ, LDK, qb, ldq, i0, nq, BQ);
            if (DV) {
                atc_stage_cols<D>(sT, LDT, ob, ldq, i0, nq, BQ);
            } else {
                atc_stage_rows<D>(sO, LDK, ob, ldq, i0, nq, BQ);
                atc_stage_cols<D>(sT, LDT, qb, ldq, i0, nq, BQ);
            }
            if (threadIdx.x < BQ) {
                const bool ok = (int)threadIdx.x < nq;
                const u64 r = ((u64)b * T + (u64)(i0 + threadIdx.x)) * H + h;
                sl[threadIdx.x] = ok ? lse[r] : 0.0f;
                if (!DV) sd[threadIdx.x] = ok ? delta[r] : 0.0f;
            }
            __syncthreads();
            if (wk0 >= (long long)T || i0 + nq - 1 < wk0 || (window != 0 && i0 >= wk0 + 15 + (long long)window)) continue;
            float st[BQ / 8][4], dp[BQ / 8][4];
            atc_zero<BQ / 8>(st);
            atc_zero<BQ / 8>(dp);
#pragma unroll 2
            for (int kk = 0; kk < D / 16; kk++) {
                u32 k0, k1, k2, k3;
                atc_afrag(sK, LDK, kw, kk, g, t, k0, k1, k2, k3);
#pragma unroll
                for (int nt = 0; nt < BQ / 8; nt++) {
                    const u16* pq = sQ + (nt * 8 + g) * LDK + kk * 16 + 2 * t;
                    atc_mma(st[nt], k0, k1, k2, k3, atc_ld32(pq), atc_ld32(pq + 8));
                }
                if (!DV) {
                    u32 w0, w1, w2, w3;
                    atc_afrag(sV, LDK, kw, kk, g, t, w0, w1, w2, w3);
#pragma unroll
                    for (int nt = 0; nt < BQ / 8; nt++) {
                        const u16* po = sO + (nt * 8 + g) * LDK + kk * 16 + 2 * t;
                        atc_mma(dp[nt], w0, w1, w2, w3, atc_ld32(po), atc_ld32(po + 8));
                    }
                }
            }
            // Pᵀ (dV) or dSᵀ (dK): rows are keys (key0: c < 2, key1: c ≥ 2), columns queries.
            atc_pt<BQ, DV, !DV>(st, dp, i0, nq, key0, key1, T, window, scale, cap, sl, sd, t);
            atc_mma_c<BQ, D>(acc, DV ? st : dp, sT, LDT, g, t);
        }
    }
    float* base = out + (u64)grp * D;
    atc_store_f32<D>(key0 < (long long)T ? base + ((u64)b * T + key0) * Hkv * D : nullptr,
                     key1 < (long long)T ? base + ((u64)b * T + key1) * Hkv * D : nullptr, acc, DV ? 1.0f : scale, t);
}

// δ[r] = dO[r]·O[r] for the n = B·T·H rows of D values with O in bf16
// (widened exactly): bit for bit attention.cu's attention_delta_f32 on the
// widened O (the same fmaf chain per lane, the same butterfly). One warp per
// row, grid-stride; blockDim.x = ATC_THREADS.
extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_delta_bf16o(const float* __restrict__ dout, const u16* __restrict__ o, u64 n, u32 D, float* __restrict__ delta) {
    const u32 lane = threadIdx.x & 31, warps = ATC_THREADS / 32;
    const u64 nw = (u64)gridDim.x * warps;
    for (u64 r = (u64)blockIdx.x * warps + (threadIdx.x >> 5); r < n; r += nw) {
        float a = 0.0f;
        for (u32 c = lane; c < D; c += 32) a = __fmaf_rn(dout[r * D + c], __uint_as_float(((u32)o[r * D + c]) << 16), a);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) a = __fadd_rn(a, __shfl_xor_sync(0xffffffffu, a, off));
        if (lane == 0) delta[r] = a;
    }
}

// Entry points, one per head_dim and input form (written out: the tests read
// the kernel names from the source).

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_forward_d64_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ o, float* __restrict__ lse) {
    atc_forward<64, float, float>(q, k, v, T, H, Hkv, window, scale, cap, o, lse);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dq_d64_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dq) {
    atc_dq<64, float>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dq);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dkdv_d64_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dk, float* __restrict__ dv) {
    atc_dkdv<64, float>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dk, dv);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_forward_d128_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ o, float* __restrict__ lse) {
    atc_forward<128, float, float>(q, k, v, T, H, Hkv, window, scale, cap, o, lse);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dq_d128_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dq) {
    atc_dq<128, float>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dq);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dkdv_d128_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dk, float* __restrict__ dv) {
    atc_dkdv<128, float>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dk, dv);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_forward_d64_bf16io(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, u16* __restrict__ o, float* __restrict__ lse) {
    atc_forward<64, u16, u16>(q, k, v, T, H, Hkv, window, scale, cap, o, lse);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dq_d64_bf16io(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dq) {
    atc_dq<64, u16>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dq);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dkdv_d64_bf16io(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dk, float* __restrict__ dv) {
    atc_dkdv<64, u16>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dk, dv);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_forward_d128_bf16io(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, u16* __restrict__ o, float* __restrict__ lse) {
    atc_forward<128, u16, u16>(q, k, v, T, H, Hkv, window, scale, cap, o, lse);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dq_d128_bf16io(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dq) {
    atc_dq<128, u16>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dq);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dkdv_d128_bf16io(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dk, float* __restrict__ dv) {
    atc_dkdv<128, u16>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dk, dv);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_forward_d256_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ o, float* __restrict__ lse) {
    atcw_forward<256, float, float>(q, k, v, T, H, Hkv, window, scale, cap, o, lse);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dq_d256_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dq) {
    atcw_dq<256, float>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dq);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dv_d256_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dv) {
    atcw_dkdv<256, float, true>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dv);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dk_d256_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dk) {
    atcw_dkdv<256, float, false>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dk);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_forward_d256_bf16io(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, u16* __restrict__ o, float* __restrict__ lse) {
    atcw_forward<256, u16, u16>(q, k, v, T, H, Hkv, window, scale, cap, o, lse);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dq_d256_bf16io(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dq) {
    atcw_dq<256, u16>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dq);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dv_d256_bf16io(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dv) {
    atcw_dkdv<256, u16, true>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dv);
}

extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc_dk_d256_bf16io(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, u32 T, u32 H, u32 Hkv, u32 window, float scale, float cap, float* __restrict__ dk) {
    atcw_dkdv<256, u16, false>(q, k, v, dout, lse, delta, T, H, Hkv, window, scale, cap, dk);
}
