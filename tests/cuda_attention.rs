//! The attention kernels (`cuda::attention`) against the CPU ops
//! (`attention_forward`, `attention_backward`, `attention_decode`), on a GPU.
//!
//! Bounds (per element, first order in the f32 unit roundoff u, magnitudes
//! from an f64 recomputation): a score `scale·q·k` differs by at most
//! `ds = score_tol(D, scale, Σ|q∘k|)`;
//! - `o` (forward and decode) within `out_tol(n, ds_row, Σ_j P_ij|v_jc|)`,
//!   `lse` within `lse_tol(n, ds_row, lse)` (n: the row's visible keys);
//! - backward (given the CPU's `o` and `lse`): `P` within a relative
//!   `2·ds + 8u + 2u·|s − lse|`; `dP`, `δ` within `2(D+8)u·Σ|terms|`; so `dS` within
//!   `εP·|dP−δ| + P·(εdP + εδ) + 4u|dS|`; `dv`, `dk`, `dq` within the
//!   propagated `Σ ε·|factor|` plus `2(n+10)u·Σ|terms|` for their own sums
//!   (n: the sum's length).
//!
//! With a soft cap c the score bound is `cap_tol(ds, c, s)` and `dS` takes
//! the factor `1 − t²` (t = tanh(s/c)), within `2|t|Δt + Δt² + 4u` where
//! `Δt = ds/c + 4u + 2u|s|/c`.
//!
//! Each bound is multiplied by [`SLACK`]. Shapes: odd T and S (37/37, 5/70
//! with a window, 70/70), GQA groups 1, 2, 4, head_dim 32, 48, 64, 128 and
//! 256 (the `_d256` kernels), soft caps 2 and 50;
//! random seeded inputs; every output poisoned (0xFF: NaN) first. Without a
//! GPU each test prints why it skips and passes, unless `LORA_REQUIRE_GPU=1`.

use lora::backend::cpu::attention::{attention_backward, attention_decode, attention_forward, softmax_scale, AttnShape, DecodeShape};
use lora::backend::cuda::attention as gatt;
use lora::backend::cuda::CudaDevice;

#[path = "common/gpu.rs"]
mod harness;
use harness::{gpu, Rng};
use harness::emu;

/// The bounds are first order in u and take magnitudes from f64 values
/// that stand in for the f32 ones each side computed; 1.5 covers both.
const SLACK: f64 = 1.5;
const U: f64 = gatt::U;

/// Asserts `|got − want| ≤ tol[i]` (NaN fails); returns how many were bit-exact.
fn check_close(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f64) -> usize {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut exact = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.to_bits() == w.to_bits() {
            exact += 1;
            continue;
        }
        let d = (g as f64 - w as f64).abs();
        let t = SLACK * tol(i);
        assert!(d <= t, "{what}[{i}]: GPU {g:e} vs CPU {w:e}, |diff| {d:e} > bound {t:e}");
    }
    exact
}

/// `‖got − want‖ / ‖want‖` (for the log).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn poisoned(dev: &CudaDevice, n: usize) -> cudarc::driver::CudaSlice<f32> {
    dev.alloc_filled::<f32>(n, 0xFF).unwrap()
}

/// (B, T, S, H, Hkv, D, window, soft cap).
type Case = (usize, usize, usize, usize, usize, usize, Option<usize>, Option<f32>);
const CASES: &[Case] = &[
    (2, 37, 37, 4, 4, 64, None, None),       // group 1
    (1, 37, 37, 8, 4, 32, None, None),       // group 2
    (2, 5, 70, 8, 2, 128, Some(16), None),   // group 4, prefill continuing a cache, window
    (1, 37, 37, 6, 3, 48, Some(7), None),    // odd-but-even D, window
    (1, 70, 70, 4, 1, 128, None, None),      // group 4, several key tiles
    (1, 37, 37, 4, 2, 256, None, None),      // head_dim 256 (the _d256 kernels)
    (1, 5, 40, 4, 1, 160, Some(9), None),    // between 128 and 256, prefill, window
    (2, 37, 37, 4, 2, 64, None, Some(2.0)),  // a soft cap that bends most scores
    (1, 21, 40, 4, 2, 256, Some(16), Some(50.0)), // Gemma 2's attention cap at head_dim 256
];

fn shape(c: &Case) -> AttnShape {
    let &(batch, q_len, kv_len, n_heads, n_kv_heads, head_dim, window, softcap) = c;
    AttnShape { batch, q_len, kv_len, n_heads, n_kv_heads, head_dim, window, scale: None, softcap }
}

/// `(capped score, its bound, the factor 1 − t² of dS and that factor's
/// bound)` of an uncapped score `x` within `ds` under cap `c` (module doc).
fn capped(x: f64, ds: f64, c: Option<f32>) -> (f64, f64, f64, f64) {
    let Some(c) = c else { return (x, ds, 1.0, 0.0) };
    let cf = c as f64;
    let t = (x / cf).tanh();
    let dt = ds / cf + 4.0 * U + 2.0 * U * x.abs() / cf;
    (cf * t, gatt::cap_tol(ds, c, x), 1.0 - t * t, 2.0 * t.abs() * dt + dt * dt + 4.0 * U)
}

/// f64 magnitudes of the forward: per row (b, i, h) the score bound `ds`,
/// the visible count `n`, exact `P` over the visible keys (j, P_ij), and
/// per element `Σ_j P_ij |v_jc|`.
struct Fwd {
    ds: Vec<f64>,
    n: Vec<usize>,
    pv: Vec<f64>,
    /// per row: (first visible key, exact P of each visible key, per-key ds)
    p: Vec<(usize, Vec<f64>, Vec<f64>)>,
    /// per row and visible key: the cap's factor of dS and its bound (1, 0
    /// without a cap)
    fac: Vec<Vec<(f64, f64)>>,
}

fn fwd_magnitudes(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> Fwd {
    let (t, sl, hq, hkv, d) = (s.q_len, s.kv_len, s.n_heads, s.n_kv_heads, s.head_dim);
    let scale = softmax_scale(d);
    let rows = s.batch * t * hq;
    let mut f = Fwd { ds: vec![0.0; rows], n: vec![0; rows], pv: vec![0.0; rows * d], p: Vec::with_capacity(rows), fac: Vec::with_capacity(rows) };
    for b in 0..s.batch {
        for i in 0..t {
            for h in 0..hq {
                let row = (b * t + i) * hq + h;
                let g = h / s.group();
                let qi = &q[row * d..(row + 1) * d];
                let (lo, hi) = s.visible(i);
                let kj = |j: usize| ((b * sl + j) * hkv + g) * d;
                let mut sc = Vec::new();
                let mut dsj = Vec::new();
                let mut fac = Vec::new();
                for j in lo..hi {
                    let kr = &k[kj(j)..kj(j) + d];
                    let dot: f64 = qi.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let ad: f64 = qi.iter().zip(kr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    let (x, ds, fj, efj) = capped(scale as f64 * dot, gatt::score_tol(d, scale, ad), s.softcap);
                    sc.push(x);
                    dsj.push(ds);
                    fac.push((fj, efj));
                }
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - m).exp() / l).collect();
                for (jj, &pj) in p.iter().enumerate() {
                    let vr = &v[kj(lo + jj)..kj(lo + jj) + d];
                    for (acc, &vc) in f.pv[row * d..(row + 1) * d].iter_mut().zip(vr) {
                        *acc += pj * (vc as f64).abs();
                    }
                }
                f.ds[row] = dsj.iter().cloned().fold(0.0, f64::max);
                f.n[row] = hi - lo;
                f.p.push((lo, p, dsj));
                f.fac.push(fac);
            }
        }
    }
    f
}

#[test]
fn forward_matches_the_cpu() {
    let Some(dev) = gpu("forward_matches_the_cpu") else { return };
    let mut rng = Rng(71);
    for c in CASES {
        let s = shape(c);
        let (nq, nk) = (s.batch * s.q_len * s.n_heads * s.head_dim, s.batch * s.kv_len * s.n_kv_heads * s.head_dim);
        let (q, k, v) = (rng.vec(nq, 1.5), rng.vec(nk, 1.0), rng.vec(nk, 1.0));
        let mut o = vec![0f32; nq];
        let mut lse = vec![0f32; nq / s.head_dim];
        attention_forward(&q, &k, &v, &s, &mut o, &mut lse);
        let f = fwd_magnitudes(&q, &k, &v, &s);
        let d = s.head_dim;

        let (qd, kd, vd) = (dev.upload(&q).unwrap(), dev.upload(&k).unwrap(), dev.upload(&v).unwrap());
        let (mut od, mut ld) = (poisoned(dev, nq), poisoned(dev, nq / d));
        gatt::forward(dev, &qd.as_view(), &kd.as_view(), &vd.as_view(), &s, &mut od.as_view_mut(), &mut ld.as_view_mut()).unwrap();
        let (go, gl) = (dev.download(&od).unwrap(), dev.download(&ld).unwrap());
        let eo = check_close("o", &go, &o, |e| gatt::out_tol(f.n[e / d], f.ds[e / d], f.pv[e]));
        let el = check_close("lse", &gl, &lse, |r| gatt::lse_tol(f.n[r], f.ds[r], lse[r] as f64));
        eprintln!("attention fwd {c:?}: o rel err {:.2e} ({eo}/{nq} bit-exact), lse rel err {:.2e} ({el}/{} bit-exact)", rel_err(&go, &o), rel_err(&gl, &lse), nq / d);
    }
}

/// Random inputs (q ×1.5, k, v, dout gaussian) and the CPU's forward and
/// backward of them.
struct Reference {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn reference(rng: &mut Rng, s: &AttnShape) -> Reference {
    let (nq, nk) = (s.batch * s.q_len * s.n_heads * s.head_dim, s.batch * s.kv_len * s.n_kv_heads * s.head_dim);
    let (q, k, v, dout) = (rng.vec(nq, 1.5), rng.vec(nk, 1.0), rng.vec(nk, 1.0), rng.vec(nq, 1.0));
    let mut o = vec![0f32; nq];
    let mut lse = vec![0f32; nq / s.head_dim];
    attention_forward(&q, &k, &v, s, &mut o, &mut lse);
    let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
    attention_backward(&q, &k, &v, &o, &lse, &dout, s, &mut dq, &mut dk, &mut dv);
    Reference { q, k, v, dout, o, lse, dq, dk, dv }
}

#[test]
fn backward_matches_the_cpu() {
    let Some(dev) = gpu("backward_matches_the_cpu") else { return };
    let mut rng = Rng(72);
    for c in CASES {
        let s = shape(c);
        let (t, sl, hq, hkv, d) = (s.q_len, s.kv_len, s.n_heads, s.n_kv_heads, s.head_dim);
        let scale = softmax_scale(d) as f64;
        let (nq, nk) = (s.batch * t * hq * d, s.batch * sl * hkv * d);
        let Reference { q, k, v, dout, o, lse, dq, dk, dv } = reference(&mut rng, &s);

        // Bounds (module doc), accumulated pair by pair.
        let f = fwd_magnitudes(&q, &k, &v, &s);
        let (mut tq, mut tk, mut tv) = (vec![0f64; nq], vec![0f64; nk], vec![0f64; nk]);
        // Per element the sum's Σ|terms| and length, for the own-sum term.
        let (mut aq, mut ak, mut av) = (vec![0f64; nq], vec![0f64; nk], vec![0f64; nk]);
        let mut nkey = vec![0usize; s.batch * sl]; // (row, head of a group) pairs seeing key j, per (b, j)
        for b in 0..s.batch {
            for i in 0..t {
                for h in 0..hq {
                    let row = (b * t + i) * hq + h;
                    let g = h / s.group();
                    let qi = &q[row * d..(row + 1) * d];
                    let di = &dout[row * d..(row + 1) * d];
                    let oi = &o[row * d..(row + 1) * d];
                    let delta: f64 = di.iter().zip(oi).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let adelta: f64 = di.iter().zip(oi).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    let (lo, p, dsj) = &f.p[row];
                    for (jj, &pj) in p.iter().enumerate() {
                        let j = lo + jj;
                        if h == 0 {
                            nkey[b * sl + j] += s.group();
                        }
                        let kr0 = ((b * sl + j) * hkv + g) * d;
                        let (kj, vj) = (&k[kr0..kr0 + d], &v[kr0..kr0 + d]);
                        let dp: f64 = di.iter().zip(vj).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let adp: f64 = di.iter().zip(vj).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                        let (fj, efj) = f.fac[row][jj];
                        let ds = pj * (dp - delta) * fj;
                        let e_p = pj * (2.0 * dsj[jj] + 8.0 * U + 2.0 * U * pj.max(f64::MIN_POSITIVE).ln().abs()); // + rounding of s − lse
                        let e_ds = (e_p * (dp - delta).abs() + pj * 2.0 * (d as f64 + 8.0) * U * (adp + adelta)) * fj + (pj * (dp - delta)).abs() * efj + 6.0 * U * ds.abs();
                        for cc in 0..d {
                            let (qc, kc, dc) = (qi[cc].abs() as f64, kj[cc].abs() as f64, di[cc].abs() as f64);
                            tv[kr0 + cc] += e_p * dc;
                            av[kr0 + cc] += pj * dc;
                            tk[kr0 + cc] += scale * e_ds * qc;
                            ak[kr0 + cc] += scale * ds.abs() * qc;
                            tq[row * d + cc] += scale * e_ds * kc;
                            aq[row * d + cc] += scale * ds.abs() * kc;
                        }
                    }
                }
            }
        }
        let own = |n: usize| 2.0 * (n as f64 + 10.0) * U;
        let fl = f64::from(f32::MIN_POSITIVE);
        let tol_q = |e: usize| tq[e] + own(f.n[e / d]) * aq[e] + fl;
        let key_n = |e: usize| nkey[e / d / hkv];
        let tol_k = |e: usize| tk[e] + own(key_n(e)) * ak[e] + fl;
        let tol_v = |e: usize| tv[e] + own(key_n(e)) * av[e] + fl;

        let up = |x: &[f32]| dev.upload(x).unwrap();
        let (qd, kd, vd, od, ld, dd) = (up(&q), up(&k), up(&v), up(&o), up(&lse), up(&dout));
        // One backward on the GPU into poisoned outputs: (dq, dk, dv).
        let run = || {
            let (mut dqd, mut dkd, mut dvd) = (poisoned(dev, nq), poisoned(dev, nk), poisoned(dev, nk));
            gatt::backward(dev, &qd.as_view(), &kd.as_view(), &vd.as_view(), &od.as_view(), &ld.as_view(), &dd.as_view(), &s, &mut dqd.as_view_mut(), &mut dkd.as_view_mut(), &mut dvd.as_view_mut()).unwrap();
            (dev.download(&dqd).unwrap(), dev.download(&dkd).unwrap(), dev.download(&dvd).unwrap())
        };
        let (gq, gk, gv) = run();
        let eq = check_close("dq", &gq, &dq, tol_q);
        let ek = check_close("dk", &gk, &dk, tol_k);
        let ev = check_close("dv", &gv, &dv, tol_v);
        eprintln!(
            "attention bwd {c:?}: rel err dq {:.2e} ({eq}/{nq} exact), dk {:.2e} ({ek}/{nk}), dv {:.2e} ({ev}/{nk})",
            rel_err(&gq, &dq),
            rel_err(&gk, &dk),
            rel_err(&gv, &dv)
        );
        // Determinism: a second run is bit-identical.
        let (dq2, dk2, dv2) = run();
        assert!(dq2.iter().zip(&gq).all(|(a, b)| a.to_bits() == b.to_bits()), "dq is not deterministic");
        assert!(dk2.iter().zip(&gk).all(|(a, b)| a.to_bits() == b.to_bits()), "dk is not deterministic");
        assert!(dv2.iter().zip(&gv).all(|(a, b)| a.to_bits() == b.to_bits()), "dv is not deterministic");
        // With o in bf16 (the lean step's kept output): the fp32 form's
        // bits given the widened o.
        let ob: Vec<u16> = o.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let ow: Vec<f32> = ob.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let (obd, owd) = (dev.upload(&ob).unwrap(), up(&ow));
        let run_o = |bf16_o: bool| {
            let (mut dqd, mut dkd, mut dvd) = (poisoned(dev, nq), poisoned(dev, nk), poisoned(dev, nk));
            let (qv, kv, vv, lv, dv_) = (qd.as_view(), kd.as_view(), vd.as_view(), ld.as_view(), dd.as_view());
            if bf16_o {
                gatt::backward(dev, &qv, &kv, &vv, &obd.as_view(), &lv, &dv_, &s, &mut dqd.as_view_mut(), &mut dkd.as_view_mut(), &mut dvd.as_view_mut()).unwrap();
            } else {
                gatt::backward(dev, &qv, &kv, &vv, &owd.as_view(), &lv, &dv_, &s, &mut dqd.as_view_mut(), &mut dkd.as_view_mut(), &mut dvd.as_view_mut()).unwrap();
            }
            let bits = |d: &cudarc::driver::CudaSlice<f32>| dev.download(d).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            (bits(&dqd), bits(&dkd), bits(&dvd))
        };
        assert!(run_o(true) == run_o(false), "attention backward {c:?} with bf16 o: not the fp32 form's bits on the widened o");
        let short = dev.upload(&ob[1..]).unwrap();
        let (mut dqd, mut dkd, mut dvd) = (poisoned(dev, nq), poisoned(dev, nk), poisoned(dev, nk));
        assert!(gatt::backward(dev, &qd.as_view(), &kd.as_view(), &vd.as_view(), &short.as_view(), &ld.as_view(), &dd.as_view(), &s, &mut dqd.as_view_mut(), &mut dkd.as_view_mut(), &mut dvd.as_view_mut()).is_err(), "a short bf16 o was taken");
    }
}

/// (B, T, H, Hkv, D, window) for the tensor-core kernels (self-attention).
/// (B, T, H, Hkv, D, window, soft cap) of the tensor-core cases.
type TcCase = (usize, usize, usize, usize, usize, Option<usize>, Option<f32>);
const TC_CASES: &[TcCase] = &[
    (2, 37, 4, 4, 64, None, None),       // one partial tile, group 1
    (1, 130, 8, 2, 64, None, None),      // three query tiles, group 4
    (2, 70, 8, 2, 128, Some(16), None),  // window, two tiles
    (1, 200, 4, 1, 128, None, None),     // four tiles, one KV head
    (1, 65, 6, 3, 64, Some(7), None),    // a tile and one row, small window
    (2, 70, 4, 2, 64, None, Some(2.0)),  // a soft cap that bends most scores
    (1, 130, 4, 1, 128, Some(40), Some(50.0)), // Gemma 2's attention cap at head_dim 128 (27B), window
    (1, 70, 4, 2, 256, None, None),      // head_dim 256 (the _d256 kernels: dK and dV apart)
    (2, 40, 2, 1, 256, Some(16), Some(50.0)), // Gemma 2 2B/9B: head_dim 256, cap 50, window
];

/// Per-row check of a bf16-operand result against the fp32 CPU result:
/// `‖Δ_row‖ ≤ 0.1·‖ref_row‖ + 0.02·rms_row(ref)` for every row (a wrong
/// index or mask moves whole rows by O(1)), and `‖Δ‖/‖ref‖ ≤ 4·2⁻⁸`
/// overall (about six roundings to bf16 feed each product: q, k, v, dO,
/// P and dS; each contributes about 2⁻⁸/√3 in the root mean square). Returns the overall relative error.
fn check_rows(what: &str, got: &[f32], want: &[f32], d: usize) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    let rows = want.len() / d;
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let rms_row = (want.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / rows as f64).sqrt();
    for r in 0..rows {
        let (g, w) = (&got[r * d..(r + 1) * d], &want[r * d..(r + 1) * d]);
        let diff: f64 = g.iter().zip(w).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
        let bound = 0.1 * norm(w) + 0.02 * rms_row;
        assert!(diff <= bound, "{what}: row {r} differs by {diff:e} (bound {bound:e}); GPU {:?}… CPU {:?}…", &g[..4.min(d)], &w[..4.min(d)]);
    }
    let e = rel_err(got, want);
    assert!(e <= 4.0 * gatt::BF16_U, "{what}: relative error {e:e} > 4·2⁻⁸");
    e
}

/// The outputs of a tensor-core run: forward `o`, `lse`, then the backward
/// from those: `dq`, `dk`, `dv`.
type TcOut = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// Checks one tensor-core run (GPU or emulated) of a case against the CPU:
/// forward element by element — scores within ds (q and k rounded to bf16:
/// 2·2⁻⁸ of scale·Σ|q∘k|, the bf16 unit roundoff), weights within 2·ds, P
/// and v rounded (2·2⁻⁸): o within (2·ds + 3·2⁻⁸)·Σ_j P|v| (SLACK covers the f32 terms), lse within
/// ds and the fast exp/log — and the backward by rows ([`check_rows`]).
fn check_tc_case(what: &str, rng: &mut Rng, s: &AttnShape, run: impl FnOnce(&Reference) -> TcOut) {
    let (batch, t, hq, hkv, d) = (s.batch, s.q_len, s.n_heads, s.n_kv_heads, s.head_dim);
    let r = reference(rng, s);
    let nq = batch * t * hq * d;
    let f = fwd_magnitudes(&r.q, &r.k, &r.v, s);
    let scale = softmax_scale(d) as f64;
    let mut ds = vec![0f64; nq / d];
    for b in 0..batch {
        for i in 0..t {
            for h in 0..hq {
                let row = (b * t + i) * hq + h;
                let (lo, hi) = s.visible(i);
                let g = h / s.group();
                let qi = &r.q[row * d..(row + 1) * d];
                ds[row] = (lo..hi)
                    .map(|j| {
                        let kr = &r.k[((b * t + j) * hkv + g) * d..((b * t + j) * hkv + g + 1) * d];
                        2.0 * gatt::BF16_U * scale * qi.iter().zip(kr).map(|(&a, &c)| (a as f64 * c as f64).abs()).sum::<f64>()
                    })
                    .fold(0.0, f64::max)
                    + f.ds[row];
            }
        }
    }
    let (go, gl, gdq, gdk, gdv) = run(&r);
    check_close(&format!("{what} o"), &go, &r.o, |e| (2.0 * ds[e / d] + 3.0 * gatt::BF16_U) * f.pv[e] + 1e-6);
    check_close(&format!("{what} lse"), &gl, &r.lse, |i| ds[i] + 1e-5 * (1.0 + r.lse[i].abs() as f64));
    let eq = check_rows(&format!("{what} dq"), &gdq, &r.dq, d);
    let ek = check_rows(&format!("{what} dk"), &gdk, &r.dk, d);
    let ev = check_rows(&format!("{what} dv"), &gdv, &r.dv, d);
    eprintln!(
        "{what} (B {batch}, T {t}, H {hq}/{hkv}, D {d}, window {:?}, cap {:?}): o rel err {:.2e}, lse {:.2e}, dq {eq:.2e}, dk {ek:.2e}, dv {ev:.2e}",
        s.window,
        s.softcap,
        rel_err(&go, &r.o),
        rel_err(&gl, &r.lse)
    );
}

fn tc_shape(c: &TcCase) -> AttnShape {
    let &(batch, t, n_heads, n_kv_heads, head_dim, window, softcap) = c;
    AttnShape { batch, q_len: t, kv_len: t, n_heads, n_kv_heads, head_dim, window, scale: None, softcap }
}

#[test]
fn tensor_core_kernels_match_the_cpu() {
    let Some(dev) = gpu("tensor_core_kernels_match_the_cpu") else { return };
    let mut rng = Rng(74);
    for c in TC_CASES {
        let s = tc_shape(c);
        assert!(gatt::tc_supported(dev, &s));
        check_tc_case("attention tc", &mut rng, &s, |r| {
            let (nq, nk, d) = (r.q.len(), r.k.len(), s.head_dim);
            let (qd, kd, vd, dod) = (dev.upload(&r.q).unwrap(), dev.upload(&r.k).unwrap(), dev.upload(&r.v).unwrap(), dev.upload(&r.dout).unwrap());
            let (mut od, mut ld) = (poisoned(dev, nq), poisoned(dev, nq / d));
            gatt::forward_tc(dev, &qd.as_view(), &kd.as_view(), &vd.as_view(), &s, &mut od.as_view_mut(), &mut ld.as_view_mut()).unwrap();
            // The backward from the GPU's own o and lse.
            let (mut dqd, mut dkd, mut dvd) = (poisoned(dev, nq), poisoned(dev, nk), poisoned(dev, nk));
            gatt::backward_tc(dev, &qd.as_view(), &kd.as_view(), &vd.as_view(), &od.as_view(), &ld.as_view(), &dod.as_view(), &s, &mut dqd.as_view_mut(), &mut dkd.as_view_mut(), &mut dvd.as_view_mut()).unwrap();
            let dl = |x: &cudarc::driver::CudaSlice<f32>| dev.download(x).unwrap();
            (dl(&od), dl(&ld), dl(&dqd), dl(&dkd), dl(&dvd))
        });
    }
    // The bf16 form (q, k, v, o in bf16, as the bf16 step keeps them): the
    // fp32 form's bits on the same, bf16-rounded, values; o is the fp32 o
    // rounded; δ from the bf16 o as from its widening.
    for c in TC_CASES {
        let s = tc_shape(c);
        let r = reference(&mut rng, &s);
        let (nq, nk, d) = (r.q.len(), r.k.len(), s.head_dim);
        let bits = |x: &[f32]| x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect::<Vec<u16>>();
        let widen = |b: &[u16]| b.iter().map(|&v| half::bf16::from_bits(v).to_f32()).collect::<Vec<f32>>();
        let (qb, kb, vb) = (bits(&r.q), bits(&r.k), bits(&r.v));
        // The fp32 form reads the unrounded values, the bf16 form their
        // roundings (as the lean step); o and lse must agree bit for bit.
        let (qw, kw, vw) = (dev.upload(&r.q).unwrap(), dev.upload(&r.k).unwrap(), dev.upload(&r.v).unwrap());
        let (qbd, kbd, vbd, dod) = (dev.upload(&qb).unwrap(), dev.upload(&kb).unwrap(), dev.upload(&vb).unwrap(), dev.upload(&r.dout).unwrap());
        let (mut of, mut lf) = (poisoned(dev, nq), poisoned(dev, nq / d));
        gatt::forward_tc(dev, &qw.as_view(), &kw.as_view(), &vw.as_view(), &s, &mut of.as_view_mut(), &mut lf.as_view_mut()).unwrap();
        let (mut ob, mut lb) = (dev.alloc_filled::<u16>(nq, 0xFF).unwrap(), poisoned(dev, nq / d));
        gatt::forward_tc(dev, &qbd.as_view(), &kbd.as_view(), &vbd.as_view(), &s, &mut ob.as_view_mut(), &mut lb.as_view_mut()).unwrap();
        let obh = dev.download(&ob).unwrap();
        assert_eq!(obh, bits(&dev.download(&of).unwrap()), "tc bf16 form: o is not the fp32 form's o rounded");
        assert_eq!(dev.download(&lb).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>(), dev.download(&lf).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "tc bf16 form: lse");
        let ow = dev.upload(&widen(&obh)).unwrap();
        let grads = |bf: bool| {
            let (mut dq, mut dk, mut dv) = (poisoned(dev, nq), poisoned(dev, nk), poisoned(dev, nk));
            if bf {
                gatt::backward_tc(dev, &qbd.as_view(), &kbd.as_view(), &vbd.as_view(), &ob.as_view(), &lb.as_view(), &dod.as_view(), &s, &mut dq.as_view_mut(), &mut dk.as_view_mut(), &mut dv.as_view_mut()).unwrap();
            } else {
                gatt::backward_tc(dev, &qw.as_view(), &kw.as_view(), &vw.as_view(), &ow.as_view(), &lf.as_view(), &dod.as_view(), &s, &mut dq.as_view_mut(), &mut dk.as_view_mut(), &mut dv.as_view_mut()).unwrap();
            }
            [dq, dk, dv].map(|x| dev.download(&x).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>())
        };
        assert_eq!(grads(true), grads(false), "tc bf16 form: dq, dk, dv differ from the fp32 form's on the same values");
        eprintln!("attention tc, bf16 form (B {}, T {}, H {}/{}, D {d}): bit for bit the fp32 form on bf16 values", s.batch, s.q_len, s.n_heads, s.n_kv_heads);
    }
    // Shapes the tensor-core kernels do not take are refused, not run.
    let s = AttnShape { batch: 1, q_len: 5, kv_len: 9, n_heads: 2, n_kv_heads: 2, head_dim: 64, window: None, scale: None, softcap: None };
    let x = poisoned(dev, 5 * 2 * 64);
    let kx = poisoned(dev, 9 * 2 * 64);
    let (mut o, mut l) = (poisoned(dev, 5 * 2 * 64), poisoned(dev, 10));
    assert!(!gatt::tc_supported(dev, &s));
    let e = gatt::forward_tc(dev, &x.as_view(), &kx.as_view(), &kx.as_view(), &s, &mut o.as_view_mut(), &mut l.as_view_mut()).unwrap_err();
    assert_eq!(e.kind, lora::ErrorKind::Unsupported, "{e}");
    // Nor head_dims other than 64, 128 and 256 (the fp32 kernels take
    // them); soft caps they take, and 256 where blocks may have 120 KiB of
    // shared memory.
    let s = AttnShape { kv_len: 5, ..s };
    let sm80 = dev.compute_capability.0 >= 8;
    assert!(gatt::tc_supported(dev, &s) == sm80);
    assert!(gatt::tc_supported(dev, &AttnShape { softcap: Some(50.0), ..s }) == sm80);
    assert!(gatt::tc_supported(dev, &AttnShape { head_dim: 256, ..s }) == (sm80 && dev.max_smem_optin >= 120 << 10));
    assert!(!gatt::tc_supported(dev, &AttnShape { head_dim: 160, ..s }));
}

/// The launchers' grids (`gatt::causal_grid`) of the query-tile kernels
/// (forward, dq) and the key-tile kernels (dkdv), for a device of one
/// multiprocessor: a chunk of as few sequences as fill two of its waves,
/// so batches of several sequences take several chunks here.
fn emu_grids(q_tiles: usize, k_tiles: usize, h: u32, hkv: u32, batch: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    (gatt::causal_grid(1, q_tiles, h, batch).unwrap(), gatt::causal_grid(1, k_tiles, hkv, batch).unwrap())
}

// ------------------------------------------ tensor cores, CPU emulation

const TC_EMU_ENTRY: &str = r#"
extern "C" {
void emu_atc_forward(unsigned d, unsigned gx, unsigned gy, unsigned gz, const float* q, const float* k, const float* v, u32 T, u32 H, u32 Hkv, u32 w, float scale, float cap, float* o, float* lse) {
    emu_launch3(dim3{gx, gy, gz}, ATC_THREADS, [&] {
        if (d == 64) attention_tc_forward_d64_bf16(q, k, v, T, H, Hkv, w, scale, cap, o, lse);
        else if (d == 128) attention_tc_forward_d128_bf16(q, k, v, T, H, Hkv, w, scale, cap, o, lse);
        else attention_tc_forward_d256_bf16(q, k, v, T, H, Hkv, w, scale, cap, o, lse);
    });
}
void emu_atc_dkdv(unsigned d, unsigned gx, unsigned gy, unsigned gz, const float* q, const float* k, const float* v, const float* dout, const float* lse, const float* delta, u32 T, u32 H, u32 Hkv, u32 w, float scale, float cap, float* dk, float* dv) {
    if (d == 256) {
        emu_launch3(dim3{gx, gy, gz}, ATC_THREADS, [&] { attention_tc_dv_d256_bf16(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dv); });
        emu_launch3(dim3{gx, gy, gz}, ATC_THREADS, [&] { attention_tc_dk_d256_bf16(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dk); });
        return;
    }
    emu_launch3(dim3{gx, gy, gz}, ATC_THREADS, [&] {
        if (d == 64) attention_tc_dkdv_d64_bf16(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dk, dv);
        else attention_tc_dkdv_d128_bf16(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dk, dv);
    });
}
void emu_atc_dq(unsigned d, unsigned gx, unsigned gy, unsigned gz, const float* q, const float* k, const float* v, const float* dout, const float* lse, const float* delta, u32 T, u32 H, u32 Hkv, u32 w, float scale, float cap, float* dq) {
    emu_launch3(dim3{gx, gy, gz}, ATC_THREADS, [&] {
        if (d == 64) attention_tc_dq_d64_bf16(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dq);
        else if (d == 128) attention_tc_dq_d128_bf16(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dq);
        else attention_tc_dq_d256_bf16(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dq);
    });
}
// The bf16 form: forward, then δ from the bf16 o, then dk/dv and dq.
void emu_atc_bf16io(unsigned d, unsigned gx, unsigned gy, unsigned gz, unsigned kx, unsigned ky, unsigned kz, u64 rows, const u16* q, const u16* k, const u16* v, const float* dout, u32 T, u32 H, u32 Hkv, u32 w, float scale, float cap,
                    u16* o, float* lse, float* delta, unsigned dgrid, float* dq, float* dk, float* dv) {
    emu_launch3(dim3{gx, gy, gz}, ATC_THREADS, [&] {
        if (d == 64) attention_tc_forward_d64_bf16io(q, k, v, T, H, Hkv, w, scale, cap, o, lse);
        else if (d == 128) attention_tc_forward_d128_bf16io(q, k, v, T, H, Hkv, w, scale, cap, o, lse);
        else attention_tc_forward_d256_bf16io(q, k, v, T, H, Hkv, w, scale, cap, o, lse);
    });
    emu_launch3(dim3{dgrid, 1, 1}, ATC_THREADS, [&] { attention_tc_delta_bf16o(dout, o, rows, d, delta); });
    if (d == 256) {
        emu_launch3(dim3{kx, ky, kz}, ATC_THREADS, [&] { attention_tc_dv_d256_bf16io(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dv); });
        emu_launch3(dim3{kx, ky, kz}, ATC_THREADS, [&] { attention_tc_dk_d256_bf16io(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dk); });
    } else {
        emu_launch3(dim3{kx, ky, kz}, ATC_THREADS, [&] {
            if (d == 64) attention_tc_dkdv_d64_bf16io(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dk, dv);
            else attention_tc_dkdv_d128_bf16io(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dk, dv);
        });
    }
    emu_launch3(dim3{gx, gy, gz}, ATC_THREADS, [&] {
        if (d == 64) attention_tc_dq_d64_bf16io(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dq);
        else if (d == 128) attention_tc_dq_d128_bf16io(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dq);
        else attention_tc_dq_d256_bf16io(q, k, v, dout, lse, delta, T, H, Hkv, w, scale, cap, dq);
    });
}
}
"#;

type EmuFwd = unsafe extern "C" fn(u32, u32, u32, u32, *const f32, *const f32, *const f32, u32, u32, u32, u32, f32, f32, *mut f32, *mut f32);
type EmuDkdv = unsafe extern "C" fn(u32, u32, u32, u32, *const f32, *const f32, *const f32, *const f32, *const f32, *const f32, u32, u32, u32, u32, f32, f32, *mut f32, *mut f32);
type EmuDq = unsafe extern "C" fn(u32, u32, u32, u32, *const f32, *const f32, *const f32, *const f32, *const f32, *const f32, u32, u32, u32, u32, f32, f32, *mut f32);
type EmuBf16io = unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, u32, u64, *const u16, *const u16, *const u16, *const f32, u32, u32, u32, u32, f32, f32, *mut u16, *mut f32, *mut f32, u32, *mut f32, *mut f32, *mut f32);

/// The tensor-core kernels compiled for the host (tests/common/emu.rs),
/// launched with the launchers' grid shapes (64 query rows or keys per
/// block, 128 threads).
#[test]
fn emulated_tensor_core_kernels_match_the_cpu() {
    let lib = match emu::build("attention_tc", &["attention_tc.cu"], &emu::SUBST, emu::MIN_MAX, TC_EMU_ENTRY) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED emulated_tensor_core_kernels_match_the_cpu: kernel emulation unavailable: {why}");
            return;
        }
    };
    // SAFETY: entry points built just above with these signatures.
    let (fwd, dkdv, dq): (EmuFwd, EmuDkdv, EmuDq) = unsafe { (*lib.get(b"emu_atc_forward").unwrap(), *lib.get(b"emu_atc_dkdv").unwrap(), *lib.get(b"emu_atc_dq").unwrap()) };
    // Small shapes (every CUDA thread is an OS thread here): partial and
    // whole tiles, groups 1 and 2, head_dims 64, 128 and 256, windows, soft caps 2
    // (bends most scores) and 50.
    let cases: &[TcCase] = &[
        (1, 70, 2, 1, 64, None, None),
        (2, 19, 2, 2, 128, Some(7), None),
        (1, 66, 4, 2, 64, Some(40), None),
        (3, 130, 2, 1, 64, None, None),
        (1, 70, 2, 1, 64, None, Some(2.0)),
        (1, 40, 2, 1, 128, Some(24), Some(50.0)),
        (1, 70, 2, 1, 256, None, Some(2.0)),
        (2, 19, 4, 2, 256, Some(7), None),
    ];
    // (the fourth: three chunks of one sequence each for the query-tile
    // kernels, one of three for dkdv: emu_grids)
    let mut rng = Rng(75);
    for c in cases {
        let s = tc_shape(c);
        check_tc_case("emulated attention tc", &mut rng, &s, |r| {
            let (t, h, hkv, d) = (s.q_len as u32, s.n_heads as u32, s.n_kv_heads as u32, s.head_dim as u32);
            let w = s.window.unwrap_or(0) as u32;
            let cap = s.softcap.unwrap_or(0.0);
            let scale = softmax_scale(s.head_dim);
            let (nq, nk) = (r.q.len(), r.k.len());
            let (qg, kg) = emu_grids(s.q_len.div_ceil(64), s.kv_len.div_ceil(64), h, hkv, s.batch);
            let (mut o, mut lse) = (vec![f32::NAN; nq], vec![f32::NAN; nq / s.head_dim]);
            // SAFETY: buffers sized as the kernels index them ([B,T,H,D] and
            // [B,T,Hkv,D], lse [B,T,H]); grid as forward_tc launches.
            unsafe { fwd(d, qg.0, qg.1, qg.2, r.q.as_ptr(), r.k.as_ptr(), r.v.as_ptr(), t, h, hkv, w, scale, cap, o.as_mut_ptr(), lse.as_mut_ptr()) };
            // δ = rowsum(dO∘O) as attention_delta_f32 computes it (f32).
            let delta: Vec<f32> = r.dout.chunks(s.head_dim).zip(o.chunks(s.head_dim)).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum()).collect();
            let (mut gdq, mut gdk, mut gdv) = (vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk]);
            // SAFETY: as above; grids as backward_tc launches them.
            unsafe {
                dkdv(d, kg.0, kg.1, kg.2, r.q.as_ptr(), r.k.as_ptr(), r.v.as_ptr(), r.dout.as_ptr(), lse.as_ptr(), delta.as_ptr(), t, h, hkv, w, scale, cap, gdk.as_mut_ptr(), gdv.as_mut_ptr());
                dq(d, qg.0, qg.1, qg.2, r.q.as_ptr(), r.k.as_ptr(), r.v.as_ptr(), r.dout.as_ptr(), lse.as_ptr(), delta.as_ptr(), t, h, hkv, w, scale, cap, gdq.as_mut_ptr());
            }
            (o, lse, gdq, gdk, gdv)
        });
    }
}

/// The bf16 form of the tensor-core kernels (q, k, v, o in bf16) in
/// emulation: the fp32 form's bits on the same bf16 values, o rounded, δ
/// from the bf16 o.
#[test]
fn emulated_tensor_core_bf16_form_matches_the_fp32_form() {
    let lib = match emu::build("attention_tc", &["attention_tc.cu"], &emu::SUBST, emu::MIN_MAX, TC_EMU_ENTRY) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED emulated_tensor_core_bf16_form_matches_the_fp32_form: kernel emulation unavailable: {why}");
            return;
        }
    };
    // SAFETY: entry points built just above with these signatures.
    let (fwd, dkdv, dq, io): (EmuFwd, EmuDkdv, EmuDq, EmuBf16io) =
        unsafe { (*lib.get(b"emu_atc_forward").unwrap(), *lib.get(b"emu_atc_dkdv").unwrap(), *lib.get(b"emu_atc_dq").unwrap(), *lib.get(b"emu_atc_bf16io").unwrap()) };
    let bits = |x: &[f32]| x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect::<Vec<u16>>();
    let widen = |b: &[u16]| b.iter().map(|&v| half::bf16::from_bits(v).to_f32()).collect::<Vec<f32>>();
    let fbits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    // attention.cu too, for its δ kernel (the emulation is available: the
    // build above succeeded).
    let fp32 = emu::build("attention-delta", &["attention.cu"], &emu::SUBST, emu::MIN_MAX, F32_EMU_ENTRY).unwrap_or_else(|e| panic!("emulating attention.cu: {e}"));
    let mut rng = Rng(76);
    for c in &[(1usize, 70usize, 2usize, 1usize, 64usize, None, None), (2, 19, 2, 2, 128, Some(7), None), (1, 70, 2, 1, 64, None, Some(2.0)), (1, 40, 2, 1, 256, Some(9), Some(2.0))] {
        let s = tc_shape(c);
        let (t, h, hkv, d) = (s.q_len as u32, s.n_heads as u32, s.n_kv_heads as u32, s.head_dim as u32);
        let w = s.window.unwrap_or(0) as u32;
        let cap = s.softcap.unwrap_or(0.0);
        let scale = softmax_scale(s.head_dim);
        let (nq, nk) = (s.batch * s.q_len * s.n_heads * s.head_dim, s.batch * s.kv_len * s.n_kv_heads * s.head_dim);
        // The fp32 form reads the unrounded values (and rounds them as it
        // stages them); the bf16 form their roundings, as the lean step.
        let (qf, kf, vf) = (rng.vec(nq, 1.5), rng.vec(nk, 1.0), rng.vec(nk, 1.0));
        let (qb, kb, vb) = (bits(&qf), bits(&kf), bits(&vf));
        let dout = rng.vec(nq, 1.0);
        let (qw, kw, vw) = (qf, kf, vf);
        let (qg, kg) = emu_grids(s.q_len.div_ceil(64), s.kv_len.div_ceil(64), h, hkv, s.batch);
        let rows = nq / s.head_dim;
        // The bf16 form, whole: forward, δ, dk/dv, dq.
        let (mut ob, mut lb, mut delta) = (vec![0xFFFFu16; nq], vec![f32::NAN; rows], vec![f32::NAN; rows]);
        let (mut bdq, mut bdk, mut bdv) = (vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk]);
        let dgrid = rows.div_ceil(4).min(3) as u32; // fewer warps than rows: the grid-stride loop
        // SAFETY: buffers sized as the kernels index them; grids as the launchers'.
        unsafe {
            io(d, qg.0, qg.1, qg.2, kg.0, kg.1, kg.2, rows as u64, qb.as_ptr(), kb.as_ptr(), vb.as_ptr(), dout.as_ptr(), t, h, hkv, w, scale, cap, ob.as_mut_ptr(), lb.as_mut_ptr(), delta.as_mut_ptr(), dgrid, bdq.as_mut_ptr(), bdk.as_mut_ptr(), bdv.as_mut_ptr())
        };
        // The fp32 form on the widened values, with the same δ.
        let (mut of, mut lf) = (vec![f32::NAN; nq], vec![f32::NAN; rows]);
        let (mut fdq, mut fdk, mut fdv) = (vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk]);
        // SAFETY: as above.
        unsafe {
            fwd(d, qg.0, qg.1, qg.2, qw.as_ptr(), kw.as_ptr(), vw.as_ptr(), t, h, hkv, w, scale, cap, of.as_mut_ptr(), lf.as_mut_ptr());
            dkdv(d, kg.0, kg.1, kg.2, qw.as_ptr(), kw.as_ptr(), vw.as_ptr(), dout.as_ptr(), lf.as_ptr(), delta.as_ptr(), t, h, hkv, w, scale, cap, fdk.as_mut_ptr(), fdv.as_mut_ptr());
            dq(d, qg.0, qg.1, qg.2, qw.as_ptr(), kw.as_ptr(), vw.as_ptr(), dout.as_ptr(), lf.as_ptr(), delta.as_ptr(), t, h, hkv, w, scale, cap, fdq.as_mut_ptr());
        }
        assert_eq!(ob, bits(&of), "emulated tc bf16 form: o is not the fp32 o rounded");
        assert_eq!(fbits(&lb), fbits(&lf), "emulated tc bf16 form: lse");
        assert_eq!((fbits(&bdq), fbits(&bdk), fbits(&bdv)), (fbits(&fdq), fbits(&fdk), fbits(&fdv)), "emulated tc bf16 form: dq, dk, dv");
        // δ from the bf16 o: bit for bit attention.cu's fp32 δ kernel on
        // the widened o (emulated too), and near rowsum(dO ∘ widen(o)).
        let ow = widen(&ob);
        // SAFETY: an entry point of the fp32 emulation library built above.
        let delta_f32: EmuAttDelta = unsafe { *fp32.get(b"emu_att_delta").unwrap() };
        let mut want = vec![f32::NAN; rows];
        // SAFETY: dout and o hold rows·D, delta rows.
        unsafe { delta_f32(dgrid, dout.as_ptr(), ow.as_ptr(), rows as u64, d, want.as_mut_ptr()) };
        assert_eq!(fbits(&delta), fbits(&want), "emulated δ from the bf16 o differs from attention_delta_f32 on the widened o");
        for r in 0..rows {
            let want: f64 = (0..s.head_dim).map(|c| dout[r * s.head_dim + c] as f64 * ow[r * s.head_dim + c] as f64).sum();
            let mag: f64 = (0..s.head_dim).map(|c| (dout[r * s.head_dim + c] as f64 * ow[r * s.head_dim + c] as f64).abs()).sum();
            assert!((delta[r] as f64 - want).abs() <= 1e-6 * mag + 1e-30, "emulated δ row {r}: {} vs {want}", delta[r]);
        }
    }
}

// ------------------------------------------------ fp32 kernels, CPU emulation

const F32_EMU_ENTRY: &str = r#"
extern "C" {
void emu_att_fwd(unsigned gx, unsigned gy, unsigned gz, const float* q, const float* k, const float* v, u32 T, u32 S, u32 H, u32 Hkv, u32 D, u32 w, float scale, float cap, float* o, float* lse) {
    emu_launch3(dim3{gx, gy, gz}, ATT_THREADS, [&] {
        if (D > ATT_DNARROW) attention_forward_d256_f32(q, k, v, T, S, H, Hkv, D, w, scale, cap, o, lse);
        else attention_forward_f32(q, k, v, T, S, H, Hkv, D, w, scale, cap, o, lse);
    });
}
void emu_att_bwd(unsigned dgrid, unsigned kx, unsigned ky, unsigned kz, unsigned qx, unsigned qy, unsigned qz, const float* q, const float* k, const float* v, const float* o, const float* dout, const float* lse,
                 float* delta, u64 rows, u32 T, u32 S, u32 H, u32 Hkv, u32 D, u32 w, float scale, float cap, float* dq, float* dk, float* dv) {
    emu_launch(dgrid, ATT_THREADS, [&] { attention_delta_f32(dout, o, rows, D, delta); });
    emu_launch3(dim3{kx, ky, kz}, ATT_THREADS, [&] {
        if (D > ATT_DNARROW) attention_dkdv_d256_f32(q, k, v, dout, lse, delta, T, S, H, Hkv, D, w, scale, cap, dk, dv);
        else attention_dkdv_f32(q, k, v, dout, lse, delta, T, S, H, Hkv, D, w, scale, cap, dk, dv);
    });
    emu_launch3(dim3{qx, qy, qz}, ATT_THREADS, [&] {
        if (D > ATT_DNARROW) attention_dq_d256_f32(q, k, v, dout, lse, delta, T, S, H, Hkv, D, w, scale, cap, dq);
        else attention_dq_f32(q, k, v, dout, lse, delta, T, S, H, Hkv, D, w, scale, cap, dq);
    });
}
void emu_att_delta(unsigned dgrid, const float* dout, const float* o, u64 rows, u32 D, float* delta) {
    emu_launch(dgrid, ATT_THREADS, [&] { attention_delta_f32(dout, o, rows, D, delta); });
}
void emu_att_decode(unsigned H, unsigned B, const float* q, const float* kc, const float* vc, const u32* lens, u32 cap, u32 Hkv, u32 D, u32 w, float scale, float softcap, float* o) {
    emu_launch3(dim3{H, B, 1}, ATT_THREADS, [&] {
        if (D > ATT_DNARROW) attention_decode_d256_f32(q, kc, vc, lens, cap, H, Hkv, D, w, scale, softcap, o);
        else attention_decode_f32(q, kc, vc, lens, cap, H, Hkv, D, w, scale, softcap, o);
    });
}
}
"#;

type EmuAttFwd = unsafe extern "C" fn(u32, u32, u32, *const f32, *const f32, *const f32, u32, u32, u32, u32, u32, u32, f32, f32, *mut f32, *mut f32);
type EmuAttBwd = unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, u32, *const f32, *const f32, *const f32, *const f32, *const f32, *const f32, *mut f32, u64, u32, u32, u32, u32, u32, u32, f32, f32, *mut f32, *mut f32, *mut f32);
type EmuAttDelta = unsafe extern "C" fn(u32, *const f32, *const f32, u64, u32, *mut f32);
type EmuAttDecode = unsafe extern "C" fn(u32, u32, *const f32, *const f32, *const f32, *const u32, u32, u32, u32, u32, f32, f32, *mut f32);

/// The fp32 attention kernels (forward, δ + dK/dV + dQ, decode) compiled for
/// the host and launched with the launchers' grids (16 query rows or keys
/// per block, 128 threads), against the CPU ops: relative error ≤ 1e-5
/// (the same f32 function with other summation orders and host exp/log),
/// head_dim up to 256 and soft caps included.
#[test]
fn emulated_fp32_kernels_match_the_cpu() {
    let lib = match emu::build("attention", &["attention.cu"], &emu::SUBST, emu::MIN_MAX, F32_EMU_ENTRY) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED emulated_fp32_kernels_match_the_cpu: kernel emulation unavailable: {why}");
            return;
        }
    };
    // SAFETY: entry points built just above with these signatures.
    let (fwd, bwd, dec): (EmuAttFwd, EmuAttBwd, EmuAttDecode) = unsafe { (*lib.get(b"emu_att_fwd").unwrap(), *lib.get(b"emu_att_bwd").unwrap(), *lib.get(b"emu_att_decode").unwrap()) };
    let mut rng = Rng(76);
    let cases: &[Case] = &[
        (1, 21, 21, 4, 2, 32, None, None),
        (1, 5, 40, 2, 1, 64, Some(9), None),
        (2, 17, 17, 2, 2, 48, Some(5), Some(3.0)),
        (3, 40, 40, 2, 1, 32, None, None),
        (1, 19, 19, 2, 1, 256, None, Some(4.0)),
        (1, 4, 37, 2, 2, 200, Some(20), None),
    ];
    for c in cases {
        let s = shape(c);
        let cap = s.softcap.unwrap_or(0.0);
        let r = reference(&mut rng, &s);
        let (t, sl, h, hkv, d) = (s.q_len as u32, s.kv_len as u32, s.n_heads as u32, s.n_kv_heads as u32, s.head_dim as u32);
        let w = s.window.unwrap_or(0) as u32;
        let scale = softmax_scale(s.head_dim);
        let (nq, nk) = (r.q.len(), r.k.len());
        let (mut o, mut lse) = (vec![f32::NAN; nq], vec![f32::NAN; nq / s.head_dim]);
        let (qg, kg) = emu_grids(s.q_len.div_ceil(16), s.kv_len.div_ceil(16), h, hkv, s.batch);
        // SAFETY: buffers as the kernels index them; grid as forward launches.
        unsafe { fwd(qg.0, qg.1, qg.2, r.q.as_ptr(), r.k.as_ptr(), r.v.as_ptr(), t, sl, h, hkv, d, w, scale, cap, o.as_mut_ptr(), lse.as_mut_ptr()) };
        check_rows("emulated attention o", &o, &r.o, s.head_dim);
        assert!(rel_err(&o, &r.o) <= 1e-5 && rel_err(&lse, &r.lse) <= 1e-5, "emulated fp32 forward: o {:e}, lse {:e}", rel_err(&o, &r.o), rel_err(&lse, &r.lse));
        let rows = (s.batch * s.q_len * s.n_heads) as u64;
        let (mut delta, mut dq, mut dk, mut dv) = (vec![f32::NAN; rows as usize], vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk]);
        // SAFETY: as above, with the CPU's o and lse as the GPU test uses.
        unsafe {
            bwd((rows.div_ceil(4)).clamp(1, 1 << 16) as u32, kg.0, kg.1, kg.2, qg.0, qg.1, qg.2,
                r.q.as_ptr(), r.k.as_ptr(), r.v.as_ptr(), r.o.as_ptr(), r.dout.as_ptr(), r.lse.as_ptr(), delta.as_mut_ptr(), rows, t, sl, h, hkv, d, w, scale, cap,
                dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr())
        };
        for (what, got, want) in [("dq", &dq, &r.dq), ("dk", &dk, &r.dk), ("dv", &dv, &r.dv)] {
            assert!(rel_err(got, want) <= 1e-5, "emulated fp32 {what}: relative error {:e}", rel_err(got, want));
        }
        eprintln!("emulated fp32 attention {c:?}: o {:.1e}, lse {:.1e}, dq {:.1e}, dk {:.1e}, dv {:.1e}", rel_err(&o, &r.o), rel_err(&lse, &r.lse), rel_err(&dq, &r.dq), rel_err(&dk, &r.dk), rel_err(&dv, &r.dv));
    }
    // Decode: B sequences with their own lengths against the CPU op.
    for (d, softcap) in [(64usize, None), (256, Some(3.0f32))] {
        let (bsz, cap, hq, hkv, window) = (3usize, 40usize, 4usize, 2usize, Some(17usize));
        let s = DecodeShape { batch: bsz, cache_cap: cap, n_heads: hq, n_kv_heads: hkv, head_dim: d, window, scale: None, softcap };
        let lens = [1usize, 23, cap];
        let (q, kc, vc) = (rng.vec(bsz * hq * d, 1.5), rng.vec(bsz * cap * hkv * d, 1.0), rng.vec(bsz * cap * hkv * d, 1.0));
        let mut want = vec![0f32; q.len()];
        attention_decode(&q, &kc, &vc, &lens, &s, &mut want);
        let lens32: Vec<u32> = lens.iter().map(|&n| n as u32).collect();
        let mut got = vec![f32::NAN; q.len()];
        // SAFETY: q, o [B, H, D]; caches [B, cap, Hkv, D]; lens B.
        unsafe { dec(hq as u32, bsz as u32, q.as_ptr(), kc.as_ptr(), vc.as_ptr(), lens32.as_ptr(), cap as u32, hkv as u32, d as u32, 17, softmax_scale(d), softcap.unwrap_or(0.0), got.as_mut_ptr()) };
        assert!(rel_err(&got, &want) <= 1e-5, "emulated decode D={d} cap {softcap:?}: relative error {:e}", rel_err(&got, &want));
    }
}

#[test]
fn decode_matches_the_cpu() {
    let Some(dev) = gpu("decode_matches_the_cpu") else { return };
    let mut rng = Rng(73);
    // (H, Hkv, D, window, soft cap); B = 4 sequences with lengths 1, 37,
    // cap and a random one.
    type DecodeCase = (usize, usize, usize, Option<usize>, Option<f32>);
    let cases: &[DecodeCase] =
        &[(4, 4, 64, None, None), (8, 4, 32, Some(16), None), (8, 2, 128, None, None), (6, 3, 48, Some(7), None), (4, 1, 128, Some(40), None), (4, 2, 256, Some(40), None), (2, 1, 256, None, Some(50.0)), (4, 2, 64, None, Some(2.0))];
    let (bsz, cap) = (4, 150);
    for &(hq, hkv, d, window, softcap) in cases {
        let lens = [1usize, 37, cap, 1 + rng.below(cap)];
        let s = DecodeShape { batch: bsz, cache_cap: cap, n_heads: hq, n_kv_heads: hkv, head_dim: d, window, scale: None, softcap };
        let scale = softmax_scale(d);
        let (q, kc, vc) = (rng.vec(bsz * hq * d, 1.5), rng.vec(bsz * cap * hkv * d, 1.0), rng.vec(bsz * cap * hkv * d, 1.0));
        let mut o = vec![0f32; q.len()];
        attention_decode(&q, &kc, &vc, &lens, &s, &mut o);
        // Bound: as the forward's row over keys lo..len.
        let mut tol = vec![0f64; q.len()];
        for b in 0..bsz {
            let lo = window.map_or(0, |w| lens[b].saturating_sub(w));
            for h in 0..hq {
                let g = h / (hq / hkv);
                let qi = &q[(b * hq + h) * d..][..d];
                let at = |j: usize| ((b * cap + j) * hkv + g) * d;
                let (mut sc, mut ds) = (Vec::new(), 0f64);
                for j in lo..lens[b] {
                    let kr = &kc[at(j)..at(j) + d];
                    let x = scale as f64 * qi.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
                    let (x, dsj, _, _) = capped(x, gatt::score_tol(d, scale, qi.iter().zip(kr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum()), softcap);
                    sc.push(x);
                    ds = ds.max(dsj);
                }
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for cc in 0..d {
                    let pv: f64 = (lo..lens[b]).zip(&sc).map(|(j, x)| (x - m).exp() / l * (vc[at(j) + cc] as f64).abs()).sum();
                    tol[(b * hq + h) * d + cc] = gatt::out_tol(lens[b] - lo, ds, pv);
                }
            }
        }
        let (qd, kd, vd) = (dev.upload(&q).unwrap(), dev.upload(&kc).unwrap(), dev.upload(&vc).unwrap());
        let mut od = poisoned(dev, q.len());
        gatt::decode(dev, &qd.as_view(), &kd.as_view(), &vd.as_view(), &lens, &s, &mut od.as_view_mut()).unwrap();
        let go = dev.download(&od).unwrap();
        let e = check_close("decode o", &go, &o, |i| tol[i]);
        eprintln!("attention decode H={hq} Hkv={hkv} D={d} window={window:?} cap={softcap:?}: rel err {:.2e} ({e}/{} bit-exact)", rel_err(&go, &o), q.len());
    }
}

#[test]
fn launchers_reject_bad_arguments() {
    let Some(dev) = gpu("launchers_reject_bad_arguments") else { return };
    let ok = AttnShape { batch: 1, q_len: 3, kv_len: 4, n_heads: 2, n_kv_heads: 1, head_dim: 8, window: None, scale: None, softcap: None };
    let try_fwd = |s: AttnShape, nq: usize, nk: usize| {
        let (q, k, v) = (poisoned(dev, nq), poisoned(dev, nk), poisoned(dev, nk));
        let (mut o, mut l) = (poisoned(dev, nq), poisoned(dev, nq / s.head_dim.max(1)));
        gatt::forward(dev, &q.as_view(), &k.as_view(), &v.as_view(), &s, &mut o.as_view_mut(), &mut l.as_view_mut()).map(|_| ()).map_err(|e| e.kind)
    };
    use lora::ErrorKind::*;
    assert_eq!(try_fwd(ok, 48, 32), Ok(()));
    assert_eq!(try_fwd(AttnShape { window: Some(0), ..ok }, 48, 32), Err(InvalidArgument));
    assert_eq!(try_fwd(AttnShape { q_len: 5, ..ok }, 80, 32), Err(InvalidShape)); // S < T
    assert_eq!(try_fwd(AttnShape { n_kv_heads: 3, ..ok }, 48, 96), Err(InvalidShape)); // 2 % 3
    assert_eq!(try_fwd(AttnShape { head_dim: 258, ..ok }, 3 * 2 * 258, 4 * 258), Err(InvalidShape));
    for c in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert_eq!(try_fwd(AttnShape { softcap: Some(c), ..ok }, 48, 32), Err(InvalidArgument), "cap {c}");
    }
    assert_eq!(try_fwd(ok, 48, 31), Err(BufferSize));
    let s = DecodeShape { batch: 2, cache_cap: 4, n_heads: 2, n_kv_heads: 1, head_dim: 8, window: None, scale: None, softcap: None };
    let (q, kc) = (poisoned(dev, 32), poisoned(dev, 64));
    let mut o = poisoned(dev, 32);
    let e = gatt::decode(dev, &q.as_view(), &kc.as_view(), &kc.as_view(), &[1, 5], &s, &mut o.as_view_mut()).unwrap_err();
    assert_eq!(e.kind, InvalidArgument, "{e}");
    let e = gatt::decode(dev, &q.as_view(), &kc.as_view(), &kc.as_view(), &[0, 4], &s, &mut o.as_view_mut()).unwrap_err();
    assert_eq!(e.kind, InvalidArgument, "{e}");
}
