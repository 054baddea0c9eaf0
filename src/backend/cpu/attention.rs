//! Causal self-attention with grouped-query heads, flash-style (tiled over
//! keys, O(T·D) memory per head), forward, backward and single-row decode,
//! fp32.
//!
//! Math (transformers `eager_attention_forward` with `repeat_kv`, mask
//! added before an fp32 softmax): query head `h` uses KV head
//! `g = h / (n_heads / n_kv_heads)`; with `scale = head_dim^−½` (or the
//! shape's own scale, Gemma's `query_pre_attn_scalar^−½`),
//!
//! ```text
//!   s_ij   = scale · q_i · k_j                 for keys j visible from row i
//!            (then c·tanh(s_ij/c) with a soft cap c, Gemma 2)
//!   lse_i  = log Σ_j exp(s_ij)                 (natural log; saved)
//!   P_ij   = exp(s_ij − lse_i)
//!   o_i    = Σ_j P_ij v_j
//! ```
//!
//! Visibility (the causal mask, bottom-right aligned like a KV cache): query
//! row `i < T` sits at absolute position `p_i = i + (S − T)` among `S ≥ T`
//! keys and sees keys `j ≤ p_i`; with a sliding window `W` (Mistral) only
//! `p_i − W < j ≤ p_i`. Training has `S = T`; a prefill that continues a cache
//! has `S > T`. Every row sees at least its own key, so no row is empty.
//!
//! Backward (FlashAttention-2, Dao 2023, Alg. 2), recomputing `P` from `lse`:
//!
//! ```text
//!   δ_i   = do_i · o_i
//!   dv_j += Σ_i P_ij do_i
//!   dP_ij = do_i · v_j
//!   dS_ij = P_ij (dP_ij − δ_i)                (× (1 − tanh²(s_ij/c)) with a cap)
//!   dq_i  = scale Σ_j dS_ij k_j
//!   dk_j += scale Σ_i dS_ij q_i                (summed over the query heads of the group)
//! ```
//!
//! Layouts (row-major, token-major as the projections produce them):
//! `q`, `o`, `do`, `dq`: `[B, T, n_heads, D]`; `k`, `v`, `dk`, `dv`:
//! `[B, S, n_kv_heads, D]`; `lse`: `[B, T, n_heads]`. Decode: `q`, `o`
//! `[B, n_heads, D]`, caches `[B, cap, n_kv_heads, D]` with a length per
//! sequence.
//!
//! Tiling and memory traffic: the forward walks a block of `q_block` query
//! rows of one head against tiles of `kv_block` keys with an online softmax
//! (running max `m`, sum `l`, an accumulator per row), so nothing of size
//! T×S exists; per task the working set is `q_block·D` accumulators plus a
//! `q_block × kv_block` score tile. Each tile is two small GEMMs
//! (`S = scale·Q·Kᵀ`, `acc += P·V`, through [`gemm_f32`]) and one `exp` per
//! score. K/V are streamed once per query block: `2·S·D·⌈T/q_block⌉` reads
//! per head. The backward runs one task per `(batch, kv head)` that owns
//! `dk`, `dv` of that head and `dq` of its query heads (so no two tasks write
//! the same element), walking key tiles outside and query blocks inside,
//! five GEMMs per tile; it needs `(group·T + 2S)·D` floats of task-local
//! gradient, scattered into the outputs at the end. Parallelism: forward
//! over (batch, query block); backward over (batch, kv head).
//!
//! Precision: products accumulate in f32 (in the gemm crate's order),
//! exp/log in f32 (`exp` vectorized: [`vexp`], within 1 ulp). The result is deterministic: every output element is
//! produced by one task in a fixed order, whatever the number of threads.

use super::matmul::{gemm_f32, Mat};
use super::vexp;
use rayon::prelude::*;

/// Default query rows per block. Measured on a 2-core AVX-512 machine at
/// T = 1024, D = 64: 64×64 tiles are within 2% of the best of 16…128 and
/// 10% faster than 32×64; a block is also the forward's unit of parallel
/// work (T/64 tasks per sequence).
pub const Q_BLOCK: usize = 64;
/// Default keys per tile: a 64×D K tile and V tile (32 KiB at D = 64) stay
/// in L1/L2 while the block's rows pass over them.
pub const KV_BLOCK: usize = 64;

/// Tile sizes (see the module doc). Any positive values give the same
/// result up to fp32 rounding; tests use odd sizes to exercise partial tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnTiles {
    pub q_block: usize,
    pub kv_block: usize,
}

impl Default for AttnTiles {
    fn default() -> Self {
        AttnTiles { q_block: Q_BLOCK, kv_block: KV_BLOCK }
    }
}

/// Shape of one attention call. `n_heads` must be a multiple of
/// `n_kv_heads`; `kv_len ≥ q_len`; `window` (Mistral `sliding_window`), if
/// set, is ≥ 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub batch: usize,
    /// T: query rows per sequence.
    pub q_len: usize,
    /// S: keys per sequence (`S ≥ T`; the last T keys belong to the queries).
    pub kv_len: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window W: row at position p sees keys `p−W < j ≤ p`.
    pub window: Option<usize>,
    /// The scores' scale; `None` is `head_dim^−½`.
    pub scale: Option<f32>,
    /// Soft cap `c` of the scaled scores: `c·tanh(s/c)` (Gemma 2).
    pub softcap: Option<f32>,
}

impl AttnShape {
    /// Plain causal self-attention over `seq` tokens (`S = T`, no window).
    pub fn causal(batch: usize, seq: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        AttnShape { batch, q_len: seq, kv_len: seq, n_heads, n_kv_heads, head_dim, window: None, scale: None, softcap: None }
    }

    /// The scores' scale: the shape's own, else `head_dim^−½`, as
    /// transformers' `self.scaling = head_dim**-0.5` (a Python float,
    /// rounded to f32 when it scales an fp32 tensor).
    pub fn scale(&self) -> f32 {
        self.scale.unwrap_or_else(|| softmax_scale(self.head_dim))
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Keys `lo..hi` (half-open) visible from query row `i`.
    #[inline]
    pub fn visible(&self, i: usize) -> (usize, usize) {
        visible_keys(i + (self.kv_len - self.q_len), self.window)
    }

    fn check(&self) {
        assert!(self.n_kv_heads > 0 && self.n_heads.is_multiple_of(self.n_kv_heads), "attention: n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads);
        assert!(self.head_dim > 0, "attention: head_dim must be positive");
        assert!(self.kv_len >= self.q_len, "attention: kv_len {} < q_len {}", self.kv_len, self.q_len);
        assert!(self.window != Some(0), "attention: window must be ≥ 1");
        assert!(self.softcap.is_none_or(|c| c > 0.0), "attention: softcap must be positive");
    }
}

/// `c·tanh(x/c)` in place (transformers' order: divide, tanh, multiply).
#[inline]
fn cap_scores(x: &mut [f32], c: f32) {
    x.iter_mut().for_each(|v| *v = vexp::tanh(*v / c) * c);
}

/// `head_dim^−½` rounded to f32 (computed as Python's `head_dim**-0.5`).
pub fn softmax_scale(head_dim: usize) -> f32 {
    (head_dim as f64).powf(-0.5) as f32
}

/// Keys visible from absolute position `p`: `lo..p+1`, `lo = p+1−W` with a
/// window, else 0.
#[inline]
fn visible_keys(p: usize, window: Option<usize>) -> (usize, usize) {
    let hi = p + 1;
    let lo = window.map_or(0, |w| hi.saturating_sub(w));
    (lo, hi)
}

/// `Σ a_k b_k` in f32 with 8 partial sums (vectorizes; fixed order).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// `y += alpha · x`.
#[inline]
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}

/// Causal GQA attention forward with the default tiles; see
/// [`attention_forward_tiled`].
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, out: &mut [f32], lse: &mut [f32]) {
    attention_forward_tiled(q, k, v, s, AttnTiles::default(), out, lse)
}

/// Causal GQA attention forward:
/// `out[b,i,h,:] = Σ_j softmax_j(scale·q[b,i,h,:]·k[b,j,g,:]) · v[b,j,g,:]`
/// over the keys visible from row `i` (module doc), `g = h / (n_heads/n_kv_heads)`,
/// and `lse[b,i,h] = log Σ_j exp(scale·q·k_j)`.
///
/// `q`, `out`: `[B, T, n_heads, D]`; `k`, `v`: `[B, S, n_kv_heads, D]`;
/// `lse`: `[B, T, n_heads]`. Both outputs are overwritten. Parallel over
/// (batch, block of `q_block` query rows); each task handles all heads.
/// Fully masked entries of a tile never reach the softmax (they get
/// probability 0), so the result equals HF's additive `finfo.min` mask.
pub fn attention_forward_tiled(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, tiles: AttnTiles, out: &mut [f32], lse: &mut [f32]) {
    s.check();
    assert!(tiles.q_block > 0 && tiles.kv_block > 0, "attention: tiles must be positive");
    let (t, sl, hq, hkv, d) = (s.q_len, s.kv_len, s.n_heads, s.n_kv_heads, s.head_dim);
    assert_eq!(q.len(), s.batch * t * hq * d, "attention: q is not [B, T, n_heads, D]");
    assert_eq!(k.len(), s.batch * sl * hkv * d, "attention: k is not [B, S, n_kv_heads, D]");
    assert_eq!(v.len(), k.len(), "attention: v is not [B, S, n_kv_heads, D]");
    assert_eq!(out.len(), q.len(), "attention: out is not [B, T, n_heads, D]");
    assert_eq!(lse.len(), s.batch * t * hq, "attention: lse is not [B, T, n_heads]");
    if s.batch == 0 || t == 0 || hq == 0 {
        return;
    }
    let qb = tiles.q_block;
    out.par_chunks_mut(t * hq * d).zip(lse.par_chunks_mut(t * hq)).enumerate().for_each(|(b, (ob, lb))| {
        ob.par_chunks_mut(qb * hq * d).zip(lb.par_chunks_mut(qb * hq)).enumerate().for_each(|(blk, (o, l))| {
            forward_block(q, k, v, s, tiles.kv_block, b, blk * qb, o, l);
        });
    });
}

/// One forward task: rows `i0..i0+rows` of sequence `b`, all heads;
/// `o`: `[rows, n_heads, D]`, `lse`: `[rows, n_heads]` (slices of the outputs).
///
/// Per head and key tile `j0..j1`: `S = scale·Q_blk·K_tileᵀ` (GEMM), masked
/// entries set to −∞, then per row the online-softmax update
/// `m' = max(m, max_j S_j)`, `l' = l·e^(m−m') + Σ_j e^(S_j−m')`,
/// `acc' = acc·e^(m−m')`, and `acc' += P·V_tile` (GEMM, `P_j = e^(S_j−m')`).
#[allow(clippy::too_many_arguments)]
fn forward_block(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, kv_block: usize, b: usize, i0: usize, o: &mut [f32], lse: &mut [f32]) {
    let (t, sl, hq, hkv, d) = (s.q_len, s.kv_len, s.n_heads, s.n_kv_heads, s.head_dim);
    let rows = lse.len() / hq;
    let group = s.group();
    let scale = s.scale();
    let (ldq, ldk) = (hq * d, hkv * d);

    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let mut acc = vec![0f32; rows * d];
    let mut p = vec![0f32; rows * kv_block];
    // Keys any row of the block can see: from the first row's lo to the
    // last row's hi (both bounds are non-decreasing in i).
    let (lo, _) = s.visible(i0);
    let (_, hi) = s.visible(i0 + rows - 1);
    for h in 0..hq {
        let g = h / group;
        let q_blk = &q[((b * t + i0) * hq + h) * d..];
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        acc.fill(0.0);
        let mut j0 = lo;
        while j0 < hi {
            let nk = (j0 + kv_block).min(hi) - j0;
            let k_tile = &k[((b * sl + j0) * hkv + g) * d..];
            let v_tile = &v[((b * sl + j0) * hkv + g) * d..];
            // S[rows × nk] = scale · Q_blk[rows × D] · K_tileᵀ[D × nk]
            gemm_f32(&mut p, nk, Mat::n(q_blk, ldq), Mat::t(k_tile, ldk), rows, nk, d, scale, false, false);
            for r in 0..rows {
                let (vlo, vhi) = s.visible(i0 + r);
                let pr = &mut p[r * nk..(r + 1) * nk];
                // Visible part of this tile for row r: columns a..e.
                let a = vlo.clamp(j0, j0 + nk) - j0;
                let e = vhi.clamp(j0, j0 + nk) - j0;
                if a >= e {
                    pr.fill(0.0); // sees nothing here: contributes nothing, state unchanged
                    continue;
                }
                if let Some(c) = s.softcap {
                    cap_scores(&mut pr[a..e], c);
                }
                let mt = pr[a..e].iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y));
                let m_new = m[r].max(mt);
                // exp(−∞) = 0 on the row's first tile, where acc and l are 0.
                let corr = vexp::exp(m[r] - m_new);
                if corr != 1.0 {
                    acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= corr);
                }
                pr[..a].fill(0.0);
                pr[e..].fill(0.0);
                l[r] = l[r] * corr + vexp::exp_sub_sum(&mut pr[a..e], m_new);
                m[r] = m_new;
            }
            // acc[rows × D] += P[rows × nk] · V_tile[nk × D]
            gemm_f32(&mut acc, d, Mat::n(&p, nk), Mat::n(v_tile, ldk), rows, d, nk, 1.0, true, false);
            j0 += nk;
        }
        for r in 0..rows {
            let or = &mut o[(r * hq + h) * d..][..d];
            for (ov, &av) in or.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *ov = av / l[r];
            }
            lse[r * hq + h] = m[r] + l[r].ln();
        }
    }
}

/// Causal GQA attention backward with the default tiles; see
/// [`attention_backward_tiled`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(q: &[f32], k: &[f32], v: &[f32], out: &[f32], lse: &[f32], dout: &[f32], s: &AttnShape, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    attention_backward_tiled(q, k, v, out, lse, dout, s, AttnTiles::default(), dq, dk, dv)
}

/// Causal GQA attention backward (module doc): from the forward's inputs,
/// `out`, `lse` and the upstream `dout`, writes `dq` `[B, T, n_heads, D]`
/// and `dk`, `dv` `[B, S, n_kv_heads, D]` (overwritten, not accumulated);
/// `dk`, `dv` of a KV head sum the contributions of all its query heads.
/// `P` is recomputed tile by tile from `lse`, so memory stays O((T+S)·D).
/// Parallel over (batch, KV head).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_tiled(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    s: &AttnShape,
    tiles: AttnTiles,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    s.check();
    assert!(tiles.q_block > 0 && tiles.kv_block > 0, "attention: tiles must be positive");
    let (bsz, t, sl, hq, hkv, d) = (s.batch, s.q_len, s.kv_len, s.n_heads, s.n_kv_heads, s.head_dim);
    assert_eq!(q.len(), bsz * t * hq * d, "attention: q is not [B, T, n_heads, D]");
    assert_eq!(k.len(), bsz * sl * hkv * d, "attention: k is not [B, S, n_kv_heads, D]");
    assert_eq!(v.len(), k.len(), "attention: v is not [B, S, n_kv_heads, D]");
    assert!(out.len() == q.len() && dout.len() == q.len() && dq.len() == q.len(), "attention: out/dout/dq are not [B, T, n_heads, D]");
    assert!(dk.len() == k.len() && dv.len() == k.len(), "attention: dk/dv are not [B, S, n_kv_heads, D]");
    assert_eq!(lse.len(), bsz * t * hq, "attention: lse is not [B, T, n_heads]");
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    if bsz == 0 || t == 0 || hq == 0 {
        return;
    }
    // δ[b,i,h] = do · o, one per query row and head.
    let mut delta = vec![0f32; bsz * t * hq];
    delta.par_chunks_mut(hq).enumerate().with_min_len(64).for_each(|(bi, dr)| {
        for (h, x) in dr.iter_mut().enumerate() {
            let at = (bi * hq + h) * d;
            *x = dot(&dout[at..at + d], &out[at..at + d]);
        }
    });

    let group = s.group();
    let scale = s.scale();
    let kvb = tiles.kv_block;
    // One task per (b, g): local dq [group, T, D], dk [S, D], dv [S, D].
    // Per key tile (outer, so the tile's dk/dv stay in cache), query head of
    // the group, and block of query rows that can see the tile:
    //   S  = scale·Q·Kᵀ,  P = exp(S − lse) (0 where masked)    [rows × nk]
    //   dP = dO·Vᵀ,       dS = scale·P∘(dP − δ)
    //   dV += Pᵀ·dO,  dK += dSᵀ·Q,  dQ += dS·K                 (five GEMMs)
    let qb = tiles.q_block;
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..bsz * hkv)
        .into_par_iter()
        .map(|task| {
            let (b, g) = (task / hkv, task % hkv);
            let (ldq, ldk) = (hq * d, hkv * d);
            let mut dq_l = vec![0f32; group * t * d];
            let mut dk_l = vec![0f32; sl * d];
            let mut dv_l = vec![0f32; sl * d];
            let mut p = vec![0f32; qb * kvb];
            let mut ds = vec![0f32; qb * kvb];
            let mut tb = if s.softcap.is_some() { vec![0f32; kvb] } else { Vec::new() };
            let mut j0 = 0;
            while j0 < sl {
                let nk = (j0 + kvb).min(sl) - j0;
                let k_tile = &k[((b * sl + j0) * hkv + g) * d..];
                let v_tile = &v[((b * sl + j0) * hkv + g) * d..];
                // Rows that can see a key of the tile: from the first with
                // p_i ≥ j0 (i ≥ j0 − (S − T)) to the last with lo_i < j0+nk.
                let i_start = j0.saturating_sub(sl - t);
                let mut i_end = i_start;
                while i_end < t && s.visible(i_end).0 < j0 + nk {
                    i_end += 1;
                }
                for hh in 0..group {
                    let h = g * group + hh;
                    let mut i0 = i_start;
                    while i0 < i_end {
                        let rows = (i0 + qb).min(i_end) - i0;
                        let at = ((b * t + i0) * hq + h) * d;
                        let (q_blk, do_blk) = (&q[at..], &dout[at..]);
                        gemm_f32(&mut p, nk, Mat::n(q_blk, ldq), Mat::t(k_tile, ldk), rows, nk, d, scale, false, false);
                        gemm_f32(&mut ds, nk, Mat::n(do_blk, ldq), Mat::t(v_tile, ldk), rows, nk, d, 1.0, false, false);
                        for r in 0..rows {
                            let i = i0 + r;
                            let (vlo, vhi) = s.visible(i);
                            let a = vlo.clamp(j0, j0 + nk) - j0;
                            let e = vhi.clamp(j0, j0 + nk) - j0;
                            let row = (b * t + i) * hq + h;
                            let (lse_i, delta_i) = (lse[row], delta[row]);
                            let pr = &mut p[r * nk..(r + 1) * nk];
                            let dr = &mut ds[r * nk..(r + 1) * nk];
                            // (a row seeing none of the tile: all zero)
                            let (a, e) = if a < e { (a, e) } else { (0, 0) };
                            for buf in [&mut *pr, &mut *dr] {
                                buf[..a].fill(0.0);
                                buf[e..].fill(0.0);
                            }
                            match s.softcap {
                                None => {
                                    vexp::exp_sub(&mut pr[a..e], lse_i);
                                    for (&pj, dj) in pr[a..e].iter().zip(&mut dr[a..e]) {
                                        *dj = pj * (*dj - delta_i) * scale;
                                    }
                                }
                                Some(c) => {
                                    // t = tanh(s/c): P = exp(c·t − lse), dS = P(dP − δ)(1 − t²)·scale.
                                    let tr = &mut tb[..e - a];
                                    for (t, x) in tr.iter_mut().zip(pr[a..e].iter_mut()) {
                                        *t = vexp::tanh(*x / c);
                                        *x = *t * c;
                                    }
                                    vexp::exp_sub(&mut pr[a..e], lse_i);
                                    for ((&pj, dj), &t) in pr[a..e].iter().zip(&mut dr[a..e]).zip(tr.iter()) {
                                        *dj = pj * (*dj - delta_i) * (1.0 - t * t) * scale;
                                    }
                                }
                            }
                        }
                        // dV[nk × D] += Pᵀ[nk × rows] · dO[rows × D]
                        gemm_f32(&mut dv_l[j0 * d..], d, Mat::t(&p, nk), Mat::n(do_blk, ldq), nk, d, rows, 1.0, true, false);
                        // dK[nk × D] += dSᵀ[nk × rows] · Q[rows × D]
                        gemm_f32(&mut dk_l[j0 * d..], d, Mat::t(&ds, nk), Mat::n(q_blk, ldq), nk, d, rows, 1.0, true, false);
                        // dQ[rows × D] += dS[rows × nk] · K_tile[nk × D]
                        gemm_f32(&mut dq_l[(hh * t + i0) * d..], d, Mat::n(&ds, nk), Mat::n(k_tile, ldk), rows, d, nk, 1.0, true, false);
                        i0 += rows;
                    }
                }
                j0 += nk;
            }
            (dq_l, dk_l, dv_l)
        })
        .collect();
    // Scatter the task-local gradients into the strided outputs.
    for (task, (dq_l, dk_l, dv_l)) in parts.iter().enumerate() {
        let (b, g) = (task / hkv, task % hkv);
        for hh in 0..group {
            let h = g * group + hh;
            for i in 0..t {
                let at = ((b * t + i) * hq + h) * d;
                dq[at..at + d].copy_from_slice(&dq_l[(hh * t + i) * d..][..d]);
            }
        }
        for j in 0..sl {
            let at = ((b * sl + j) * hkv + g) * d;
            dk[at..at + d].copy_from_slice(&dk_l[j * d..(j + 1) * d]);
            dv[at..at + d].copy_from_slice(&dv_l[j * d..(j + 1) * d]);
        }
    }
}

/// Shape of a decode step: one new query row per sequence against its KV
/// cache. `window` as in [`AttnShape`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeShape {
    pub batch: usize,
    /// Rows allocated per sequence in the caches (`cap ≥ lens[b]`).
    pub cache_cap: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
    /// As in [`AttnShape`].
    pub scale: Option<f32>,
    /// As in [`AttnShape`].
    pub softcap: Option<f32>,
}

impl DecodeShape {
    /// The scores' scale: the shape's own, else `head_dim^−½`.
    pub fn scale(&self) -> f32 {
        self.scale.unwrap_or_else(|| softmax_scale(self.head_dim))
    }
}

/// Decode attention (no backward): for each sequence `b` the query
/// `q[b, h, :]` (its token's k/v already written at cache row `lens[b]−1`)
/// attends keys `lo..lens[b]` of its cache, `lo = lens[b] − W` with a window
/// (else 0): `out[b,h,:] = Σ_j softmax_j(scale·q·k[b,j,g,:]) · v[b,j,g,:]`.
/// The same function as row `T−1` of [`attention_forward`] over those keys.
///
/// `q`, `out`: `[B, n_heads, D]`; `k_cache`, `v_cache`:
/// `[B, cache_cap, n_kv_heads, D]`; `lens`: `[B]`, each in `1..=cache_cap`.
/// Two passes over the scores (max, then exp-sum) with an O(L) buffer per
/// task; parallel over (batch, head).
pub fn attention_decode(q: &[f32], k_cache: &[f32], v_cache: &[f32], lens: &[usize], s: &DecodeShape, out: &mut [f32]) {
    let (bsz, cap, hq, hkv, d) = (s.batch, s.cache_cap, s.n_heads, s.n_kv_heads, s.head_dim);
    assert!(hkv > 0 && hq % hkv == 0, "attention_decode: n_heads {hq} is not a multiple of n_kv_heads {hkv}");
    assert!(d > 0, "attention_decode: head_dim must be positive");
    assert!(s.window != Some(0), "attention_decode: window must be ≥ 1");
    assert_eq!(q.len(), bsz * hq * d, "attention_decode: q is not [B, n_heads, D]");
    assert_eq!(out.len(), q.len(), "attention_decode: out is not [B, n_heads, D]");
    assert_eq!(k_cache.len(), bsz * cap * hkv * d, "attention_decode: k_cache is not [B, cap, n_kv_heads, D]");
    assert_eq!(v_cache.len(), k_cache.len(), "attention_decode: v_cache is not [B, cap, n_kv_heads, D]");
    assert_eq!(lens.len(), bsz, "attention_decode: lens is not [B]");
    assert!(lens.iter().all(|&n| n >= 1 && n <= cap), "attention_decode: every length must be in 1..=cache_cap");
    let group = hq / hkv;
    let scale = s.scale();
    out.par_chunks_mut(d).enumerate().for_each(|(bh, o)| {
        let (b, h) = (bh / hq, bh % hq);
        let g = h / group;
        let qv = &q[bh * d..(bh + 1) * d];
        let (lo, hi) = visible_keys(lens[b] - 1, s.window);
        let at = |j: usize| ((b * cap + j) * hkv + g) * d;
        let mut sc: Vec<f32> = (lo..hi).map(|j| dot(qv, &k_cache[at(j)..at(j) + d]) * scale).collect();
        if let Some(c) = s.softcap {
            cap_scores(&mut sc, c);
        }
        let m = sc.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        o.fill(0.0);
        let mut l = 0f32;
        for (j, &x) in (lo..hi).zip(&sc) {
            let p = vexp::exp(x - m);
            l += p;
            axpy(o, p, &v_cache[at(j)..at(j) + d]);
        }
        o.iter_mut().for_each(|x| *x /= l);
    });
}
