//! The transformer ops of the CPU backend (src/backend/cpu/{embed,norm,rope,
//! swiglu,attention,loss}.rs) against
//!
//! 1. small f64 references written here, straight from the formulas (HF's
//!    op order, no tiling, full T×S score matrices), which check the fp32
//!    forwards;
//! 2. central finite differences of those f64 references, which check every
//!    fp32 backward;
//! 3. PyTorch/transformers fixtures (tests/fixtures/ops, written by
//!    scripts/fixtures/gen_ops.py), which check that the formulas are the
//!    ones transformers runs.
//!
//! Comparisons are elementwise `|ours − ref| ≤ atol + rtol·|ref|`, with
//! `atol` a fraction of the reference's largest magnitude where noted.

use lora::backend::cpu::attention::{self, AttnShape, AttnTiles, DecodeShape};
use lora::backend::cpu::{embed, loss, norm, rope, swiglu};
use lora::rng::SplitMix64;

// ---------------------------------------------------------------------------
// Tolerances
// ---------------------------------------------------------------------------

/// fp32 forward vs the f64 reference, relative to the output's scale
/// (`atol = FWD_TOL·max|ref|`, `rtol = FWD_TOL`). Each output is a handful of
/// fp32 roundings (≤ 2⁻²⁴ ≈ 6e-8 each) plus f32 dot products of ≤ 32 terms,
/// online-softmax rescales and exp/log: a few ×1e-7 relative; measured
/// ≤ 6.3e-7 (attention out, T = 70, scores ×3), ≤ 1e-7 elsewhere. 5e-6
/// leaves ~8× room for other compilers' libm without hiding a wrong formula
/// (a wrong mask, scale or head mapping moves outputs by O(1)).
const FWD_TOL: f64 = 5e-6;

/// fp32 backward vs central differences of the f64 reference, as a fraction
/// of the largest gradient magnitude (`atol = GRAD_TOL·max|fd|`, `rtol =
/// GRAD_TOL`). The finite differences themselves are accurate to ~1e-10
/// (h = 1e-5: truncation h²·f'''/6 ≈ 2e-11, cancellation ε·|L|/h ≈ 1e-10);
/// the fp32 backward carries a few ×1e-7 relative error (softmax recomputed
/// from the saved fp32 lse, sums of ≤ 70 terms). Measured ≤ 4.6e-7 (attention
/// dk, T = 70); 5e-6 is ~10× that. A transposed index or a missing term
/// (e.g. dk not summed over the group) gives O(1).
const GRAD_TOL: f64 = 5e-6;

/// Step of the central differences (inputs are O(1)).
const FD_H: f64 = 1e-5;

/// RoPE against the direct f64 formula `θ = p·theta^(−2i/D)`: besides the
/// output's own rounding, the angle is rounded to f32 on purpose (HF does,
/// and the fixtures show matching it matters: at p = 4000 an exact angle is
/// 5.8e-5 off HF's cos): `|Δθ| ≤ 2·p·inv_freq·2⁻²⁴ ≤ 1.3e-6` rad at the
/// positions used here (p ≤ 11), times |x| ≲ 4 relative to max|x| ≈ 3:
/// ≤ ~2e-6. Measured 8.6e-8 (forward), 7e-8 (backward).
const ROPE_DIRECT_TOL: f64 = 5e-6;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn randn(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Asserts `|ours − want| ≤ atol + rtol·|want|` elementwise, where `atol`
/// is `atol_frac·max(|want|)`; returns the largest error relative to that
/// scale, for the record.
fn assert_close(what: &str, ours: &[f32], want: &[f64], atol_frac: f64, rtol: f64) -> f64 {
    assert_eq!(ours.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    let atol = atol_frac * scale;
    let mut worst = 0f64;
    for (i, (&a, &b)) in ours.iter().zip(want).enumerate() {
        let err = (a as f64 - b).abs();
        assert!(a.is_finite() && err <= atol + rtol * b.abs(), "{what}[{i}]: ours {a} vs ref {b} (|Δ| {err:e} > {:e})", atol + rtol * b.abs());
        worst = worst.max(err / scale);
    }
    // Visible with `cargo test --test cpu_ops -- --nocapture`.
    eprintln!("{what}: max |Δ|/max|ref| = {worst:.2e}");
    worst
}

/// Central differences of a scalar function at `x`: `∂f/∂x_k`.
fn fd_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|k| {
            let x0 = x[k];
            x[k] = x0 + FD_H;
            let fp = f(&x);
            x[k] = x0 - FD_H;
            let fm = f(&x);
            x[k] = x0;
            (fp - fm) / (2.0 * FD_H)
        })
        .collect()
}

fn dotf(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---------------------------------------------------------------------------
// f64 references (straight from the formulas)
// ---------------------------------------------------------------------------

fn rmsnorm_ref(x: &[f64], w: &[f64], dim: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks(dim).zip(y.chunks_mut(dim)) {
        let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
        for j in 0..dim {
            yr[j] = w[j] * (xr[j] * r);
        }
    }
    y
}

/// RoPE on `[B, T, H, D]` at positions `pos0 + t`, angle in f64.
fn rope_ref(x: &[f64], seq: usize, heads: usize, d: usize, pos0: usize, theta: f64, inverse: bool) -> Vec<f64> {
    let half = d / 2;
    let mut y = x.to_vec();
    for (bt, row) in y.chunks_mut(heads * d).enumerate() {
        let p = (pos0 + bt % seq) as f64;
        for v in row.chunks_mut(d) {
            for i in 0..half {
                let a = p * theta.powf(-((2 * i) as f64) / d as f64);
                let (c, s) = (a.cos(), if inverse { -a.sin() } else { a.sin() });
                let (x1, x2) = (v[i], v[i + half]);
                v[i] = x1 * c - x2 * s;
                v[i + half] = x2 * c + x1 * s;
            }
        }
    }
    y
}

fn swiglu_ref(g: &[f64], u: &[f64]) -> Vec<f64> {
    g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect()
}

/// Naive attention: full masked score matrix per (b, h), HF's repeat_kv head
/// mapping (`h → h / (n_heads / n_kv_heads)`), mask `j ≤ p` and
/// `j > p − W` with `p = i + S − T`. Returns (out, lse) in our layouts.
fn attn_ref(q: &[f64], k: &[f64], v: &[f64], s: &AttnShape) -> (Vec<f64>, Vec<f64>) {
    let (bsz, t, sl, hq, hkv, d) = (s.batch, s.q_len, s.kv_len, s.n_heads, s.n_kv_heads, s.head_dim);
    let rep = hq / hkv;
    let scale = s.scale.map_or(1.0 / (d as f64).sqrt(), |x| x as f64);
    let cap = |x: f64| s.softcap.map_or(x, |c| c as f64 * (x / c as f64).tanh());
    let mut o = vec![0.0; bsz * t * hq * d];
    let mut lse = vec![0.0; bsz * t * hq];
    for b in 0..bsz {
        for h in 0..hq {
            let g = h / rep;
            for i in 0..t {
                let p = i + sl - t;
                let qi = &q[((b * t + i) * hq + h) * d..][..d];
                let mut sc = vec![f64::NEG_INFINITY; sl];
                for (j, x) in sc.iter_mut().enumerate() {
                    let in_window = match s.window {
                        Some(w) => j + w > p,
                        None => true,
                    };
                    let allowed = j <= p && in_window;
                    if allowed {
                        *x = cap(scale * dotf(qi, &k[((b * sl + j) * hkv + g) * d..][..d]));
                    }
                }
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|&x| (x - m).exp()).sum();
                lse[(b * t + i) * hq + h] = m + z.ln();
                let oi = &mut o[((b * t + i) * hq + h) * d..][..d];
                for j in 0..sl {
                    let pj = (sc[j] - m).exp() / z;
                    for c in 0..d {
                        oi[c] += pj * v[((b * sl + j) * hkv + g) * d + c];
                    }
                }
            }
        }
    }
    (o, lse)
}

fn ce_ref(x: &[f64], labels: &[i32], vocab: usize) -> (f64, usize) {
    let (mut sum, mut count) = (0.0, 0);
    for (row, &y) in x.chunks(vocab).zip(labels) {
        if y == -100 {
            continue;
        }
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
        sum += lse - row[y as usize];
        count += 1;
    }
    (sum, count)
}

// ---------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------

#[test]
fn embedding_lookup_and_scatter_add() {
    let (vocab, dim) = (11, 5);
    let table: Vec<f32> = (0..vocab * dim).map(|i| i as f32 * 0.5 - 3.0).collect();
    let ids = [3u32, 0, 10, 3, 7];
    let mut out = vec![f32::NAN; ids.len() * dim];
    embed::embedding_forward(&table, vocab, dim, &ids, &mut out).unwrap();
    for (n, &id) in ids.iter().enumerate() {
        assert_eq!(&out[n * dim..(n + 1) * dim], &table[id as usize * dim..(id as usize + 1) * dim]);
    }
    let dout: Vec<f32> = (0..ids.len() * dim).map(|i| i as f32).collect();
    let mut dtable = vec![1f32; vocab * dim];
    embed::embedding_backward(&dout, &ids, vocab, dim, &mut dtable).unwrap();
    for r in 0..vocab {
        for c in 0..dim {
            let want = 1.0 + ids.iter().enumerate().filter(|(_, &id)| id as usize == r).map(|(n, _)| dout[n * dim + c]).sum::<f32>();
            assert_eq!(dtable[r * dim + c], want, "row {r} col {c}");
        }
    }
    // An out-of-range id is an error, and nothing is written.
    let mut out2 = vec![7f32; 2 * dim];
    let e = embed::embedding_forward(&table, vocab, dim, &[1, 11], &mut out2).unwrap_err();
    assert_eq!(e.kind, lora::ErrorKind::InvalidArgument);
    assert!(out2.iter().all(|&v| v == 7.0));
    let before = dtable.clone();
    assert!(embed::embedding_backward(&out2, &[11, 0], vocab, dim, &mut dtable).is_err());
    assert_eq!(before, dtable);
}

// ---------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------

#[test]
fn rmsnorm_forward_and_finite_differences() {
    let mut rng = SplitMix64::new(11);
    for &(rows, dim, eps) in &[(5usize, 37usize, 1e-5f32), (3, 64, 1e-6), (1, 1, 1e-6)] {
        let x = randn(&mut rng, rows * dim, 1.5);
        let w: Vec<f32> = (0..dim).map(|_| 1.0 + 0.3 * rng.normal()).collect();
        let dy = randn(&mut rng, rows * dim, 1.0);
        let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
        let mut y = vec![f32::NAN; rows * dim];
        let mut rstd = vec![f32::NAN; rows];
        norm::rmsnorm_forward(&x, &w, rows, dim, eps, &mut y, Some(&mut rstd));
        let yref = rmsnorm_ref(&xd, &wd, dim, eps as f64);
        assert_close("rmsnorm y", &y, &yref, FWD_TOL, FWD_TOL);
        // Without rstd: same y.
        let mut y2 = vec![f32::NAN; rows * dim];
        norm::rmsnorm_forward(&x, &w, rows, dim, eps, &mut y2, None);
        assert_eq!(y, y2);

        let mut dx = vec![f32::NAN; rows * dim];
        let mut dw = vec![0.25f32; dim]; // accumulates
        norm::rmsnorm_backward(&x, &w, &rstd, &dy, rows, dim, &mut dx, Some(&mut dw));
        let dx_fd = fd_grad(&xd, |x| dotf(&dyd, &rmsnorm_ref(x, &wd, dim, eps as f64)));
        let dw_fd: Vec<f64> = fd_grad(&wd, |w| dotf(&dyd, &rmsnorm_ref(&xd, w, dim, eps as f64))).iter().map(|g| g + 0.25).collect();
        if dim == 1 {
            // y = w·x/sqrt(x² + eps) is flat in x: the true dx is ~eps/|x|,
            // while ours is the difference of two O(|dy·w|/|x|) fp32 terms,
            // so only an absolute bound of a few ulps of those terms holds.
            for (i, (&a, &b)) in dx.iter().zip(&dx_fd).enumerate() {
                let terms = (dy[i] * w[0] / x[i]).abs() as f64;
                assert!((a as f64 - b).abs() <= 4.0 * f32::EPSILON as f64 * terms + 1e-12, "rmsnorm dx (dim 1)[{i}]: {a} vs {b}");
            }
        } else {
            assert_close("rmsnorm dx", &dx, &dx_fd, GRAD_TOL, GRAD_TOL);
        }
        assert_close("rmsnorm dw", &dw, &dw_fd, GRAD_TOL, GRAD_TOL);
        // Without dw: same dx.
        let mut dx2 = vec![f32::NAN; rows * dim];
        norm::rmsnorm_backward(&x, &w, &rstd, &dy, rows, dim, &mut dx2, None);
        assert_eq!(dx, dx2);
    }
}

#[test]
fn rmsnorm_large_rows_parallel_matches_serial_rows() {
    // Enough rows to split into several rayon tasks; each row must equal the
    // single-row computation bit for bit.
    let mut rng = SplitMix64::new(12);
    let (rows, dim) = (300, 96);
    let x = randn(&mut rng, rows * dim, 2.0);
    let w = randn(&mut rng, dim, 1.0);
    let mut y = vec![0f32; rows * dim];
    norm::rmsnorm_forward(&x, &w, rows, dim, 1e-6, &mut y, None);
    for r in [0, 17, 170, 299] {
        let mut yr = vec![0f32; dim];
        norm::rmsnorm_forward(&x[r * dim..(r + 1) * dim], &w, 1, dim, 1e-6, &mut yr, None);
        assert_eq!(&y[r * dim..(r + 1) * dim], &yr[..]);
    }
    let dy = randn(&mut rng, rows * dim, 1.0);
    let rstd: Vec<f32> = x.chunks(dim).map(|r| norm::rmsnorm_rstd_row(r, 1e-6)).collect();
    let (mut dx, mut dw) = (vec![0f32; rows * dim], vec![0f32; dim]);
    norm::rmsnorm_backward(&x, &w, &rstd, &dy, rows, dim, &mut dx, Some(&mut dw));
    let want: Vec<f64> = (0..dim).map(|j| (0..rows).map(|i| dy[i * dim + j] as f64 * x[i * dim + j] as f64 * rstd[i] as f64).sum()).collect();
    assert_close("rmsnorm dw (300 rows)", &dw, &want, FWD_TOL, FWD_TOL);
}

// ---------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------

#[test]
fn rope_direct_formula_inverse_and_gradient() {
    let mut rng = SplitMix64::new(21);
    let (b, t, h, d, pos0, theta) = (2, 7, 3, 16, 5, 10000f32);
    let x = randn(&mut rng, b * t * h * d, 1.0);
    let inv = rope::rope_inv_freq(d, theta);
    let table = rope::RopeTable::new(&inv, pos0, t);
    let mut y = x.clone();
    rope::rope_forward(&mut y, b, t, h, d, &table);
    let want = rope_ref(&f64s(&x), t, h, d, pos0, theta as f64, false);
    assert_close("rope forward", &y, &want, ROPE_DIRECT_TOL, 0.0);

    // Backward = rotation by −θ: the exact gradient of the (linear) forward.
    let dy = randn(&mut rng, x.len(), 1.0);
    let mut dx = dy.clone();
    rope::rope_backward(&mut dx, b, t, h, d, &table);
    let dyd = f64s(&dy);
    let dx_fd = fd_grad(&f64s(&x), |x| dotf(&dyd, &rope_ref(x, t, h, d, pos0, theta as f64, false)));
    assert_close("rope backward", &dx, &dx_fd, ROPE_DIRECT_TOL, 0.0);

    // backward(forward(x)) = x up to fp32 rounding (rotation is orthogonal).
    let mut back = y.clone();
    rope::rope_backward(&mut back, b, t, h, d, &table);
    assert_close("rope inverse", &back, &f64s(&x), 1e-6, 0.0);

    // A table for pos0..pos0+T equals one built from the explicit list, and
    // continuing a sequence (KV cache) uses the later rows unchanged.
    let pos: Vec<usize> = (pos0..pos0 + t).collect();
    assert_eq!(table, rope::RopeTable::with_positions(&inv, &pos));
    let tail = rope::RopeTable::new(&inv, pos0 + 3, t - 3);
    assert_eq!(&table.cos[3 * d / 2..], &tail.cos[..]);
    assert_eq!(&table.sin[3 * d / 2..], &tail.sin[..]);
}

#[test]
fn rope_inv_freq_variants() {
    let d = 128;
    let inv = rope::rope_inv_freq(d, 500000.0);
    for (i, &f) in inv.iter().enumerate() {
        let want = 500000f64.powf(-(2.0 * i as f64) / d as f64);
        assert!((f as f64 - want).abs() <= 2e-7 * want, "inv_freq[{i}] {f} vs {want}");
    }
    let lin = rope::rope_inv_freq_linear(d, 500000.0, 4.0);
    assert!(lin.iter().zip(&inv).all(|(a, b)| *a == b / 4.0));
    // Llama 3.1: factor 8, low 1, high 4, original 8192 (its config.json).
    let l3 = rope::rope_inv_freq_llama3(d, 500000.0, 8.0, 1.0, 4.0, 8192);
    let mut kinds = [0; 3];
    for (i, (&a, &f)) in l3.iter().zip(&inv).enumerate() {
        let wl = 2.0 * std::f64::consts::PI / f as f64;
        let want = if wl < 8192.0 / 4.0 {
            kinds[0] += 1;
            f as f64
        } else if wl > 8192.0 {
            kinds[1] += 1;
            f as f64 / 8.0
        } else {
            kinds[2] += 1;
            let s = (8192.0 / wl - 1.0) / 3.0;
            (1.0 - s) * f as f64 / 8.0 + s * f as f64
        };
        assert!((a as f64 - want).abs() <= 1e-6 * want, "llama3 inv_freq[{i}] {a} vs {want}");
    }
    assert!(kinds.iter().all(|&k| k > 0), "all three bands exercised: {kinds:?}");
}

// ---------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------

#[test]
fn swiglu_forward_and_finite_differences() {
    let mut rng = SplitMix64::new(31);
    let n = 203;
    let mut g = randn(&mut rng, n, 3.0);
    g[0] = -30.0; // saturated σ: exp(30) is finite in f32, silu → −0
    g[1] = 25.0;
    let u = randn(&mut rng, n, 1.0);
    let dh = randn(&mut rng, n, 1.0);
    let mut h = vec![f32::NAN; n];
    swiglu::swiglu_forward(&g, &u, &mut h);
    let (gd, ud, dhd) = (f64s(&g), f64s(&u), f64s(&dh));
    assert_close("swiglu h", &h, &swiglu_ref(&gd, &ud), FWD_TOL, FWD_TOL);
    let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    swiglu::swiglu_backward(&g, &u, &dh, &mut dg, &mut du);
    assert_close("swiglu dgate", &dg, &fd_grad(&gd, |g| dotf(&dhd, &swiglu_ref(g, &ud))), GRAD_TOL, GRAD_TOL);
    assert_close("swiglu dup", &du, &fd_grad(&ud, |u| dotf(&dhd, &swiglu_ref(&gd, u))), GRAD_TOL, GRAD_TOL);
    let (mut g2, mut u2) = (g.clone(), u.clone());
    swiglu::swiglu_backward_inplace(&mut g2, &mut u2, &dh);
    assert_eq!((g2, u2), (dg, du));
}

fn geglu_ref(g: &[f64], u: &[f64]) -> Vec<f64> {
    let beta = (2.0 / std::f64::consts::PI).sqrt();
    g.iter().zip(u).map(|(&x, &u)| 0.5 * x * (1.0 + (beta * (x + 0.044715 * x * x * x)).tanh()) * u).collect()
}

#[test]
fn geglu_forward_and_finite_differences() {
    // Gemma's tanh-approximated GELU gate, PyTorch's `gelu(approximate="tanh")`.
    let mut rng = SplitMix64::new(32);
    let n = 203;
    let mut g = randn(&mut rng, n, 3.0);
    g[0] = -30.0; // saturated: gelu → −0, gelu' → 0
    g[1] = 25.0; // gelu → x, gelu' → 1
    let u = randn(&mut rng, n, 1.0);
    let dh = randn(&mut rng, n, 1.0);
    let mut h = vec![f32::NAN; n];
    swiglu::geglu_forward(&g, &u, &mut h);
    let (gd, ud, dhd) = (f64s(&g), f64s(&u), f64s(&dh));
    assert_close("geglu h", &h, &geglu_ref(&gd, &ud), FWD_TOL, FWD_TOL);
    let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    swiglu::geglu_backward(&g, &u, &dh, &mut dg, &mut du);
    assert_close("geglu dgate", &dg, &fd_grad(&gd, |g| dotf(&dhd, &geglu_ref(g, &ud))), GRAD_TOL, GRAD_TOL);
    assert_close("geglu dup", &du, &fd_grad(&ud, |u| dotf(&dhd, &geglu_ref(&gd, u))), GRAD_TOL, GRAD_TOL);
}

// ---------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------

struct AttnCase {
    s: AttnShape,
    tiles: AttnTiles,
}

fn attn_cases() -> Vec<AttnCase> {
    let sh = |batch, q_len, kv_len, n_heads, n_kv_heads, head_dim, window| AttnShape { batch, q_len, kv_len, n_heads, n_kv_heads, head_dim, window, scale: None, softcap: None };
    let tl = |q_block, kv_block| AttnTiles { q_block, kv_block };
    vec![
        // GQA 4/2, T = 13 not a multiple of either tile.
        AttnCase { s: sh(2, 13, 13, 4, 2, 8, None), tiles: tl(4, 5) },
        // Same with the default tiles (one partial tile each way).
        AttnCase { s: sh(2, 13, 13, 4, 2, 8, None), tiles: AttnTiles::default() },
        // MHA and MQA; tiles of one row / one key.
        AttnCase { s: sh(1, 9, 9, 3, 3, 5, None), tiles: tl(1, 1) },
        AttnCase { s: sh(1, 9, 9, 4, 1, 6, None), tiles: tl(3, 4) },
        // Continuing a cache: 6 new rows after 11 cached keys (S = 17).
        AttnCase { s: sh(2, 6, 17, 4, 2, 8, None), tiles: tl(4, 5) },
        // Mistral sliding window of 5 keys, with and without a cache prefix.
        AttnCase { s: sh(1, 12, 12, 4, 2, 8, Some(5)), tiles: tl(4, 3) },
        AttnCase { s: sh(1, 7, 10, 2, 1, 4, Some(4)), tiles: tl(2, 3) },
        // Gemma 2: its own scale (query_pre_attn_scalar 24) and scores
        // soft-capped at 1.5 (q scaled up below so the cap bends them), with
        // a window and a cache prefix; Gemma 3's scale without a cap.
        AttnCase { s: AttnShape { scale: Some(24f64.powf(-0.5) as f32), softcap: Some(1.5), ..sh(2, 9, 12, 4, 2, 8, Some(6)) }, tiles: tl(4, 5) },
        AttnCase { s: AttnShape { scale: Some(0.3), ..sh(1, 8, 8, 2, 1, 8, None) }, tiles: tl(3, 3) },
    ]
}

fn run_forward(q: &[f32], k: &[f32], v: &[f32], c: &AttnCase) -> (Vec<f32>, Vec<f32>) {
    let s = &c.s;
    let mut o = vec![f32::NAN; q.len()];
    let mut lse = vec![f32::NAN; s.batch * s.q_len * s.n_heads];
    attention::attention_forward_tiled(q, k, v, s, c.tiles, &mut o, &mut lse);
    (o, lse)
}

fn attn_inputs(rng: &mut SplitMix64, s: &AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let q = randn(rng, s.batch * s.q_len * s.n_heads * s.head_dim, if s.softcap.is_some() { 3.0 } else { 1.0 });
    let k = randn(rng, s.batch * s.kv_len * s.n_kv_heads * s.head_dim, 1.0);
    let v = randn(rng, s.batch * s.kv_len * s.n_kv_heads * s.head_dim, 1.0);
    (q, k, v)
}

#[test]
fn attention_forward_matches_naive() {
    let mut rng = SplitMix64::new(41);
    for c in attn_cases() {
        let (q, k, v) = attn_inputs(&mut rng, &c.s);
        let (o, lse) = run_forward(&q, &k, &v, &c);
        let (oref, lref) = attn_ref(&f64s(&q), &f64s(&k), &f64s(&v), &c.s);
        assert_close(&format!("attn out {:?}", c.s), &o, &oref, FWD_TOL, FWD_TOL);
        assert_close(&format!("attn lse {:?}", c.s), &lse, &lref, FWD_TOL, FWD_TOL);
    }
    // Longer sequence, several full tiles and a partial one, default tiles,
    // larger scores (q scaled ×3) so the online max actually moves.
    let s = AttnShape::causal(1, 70, 4, 2, 32);
    let (mut q, k, v) = attn_inputs(&mut rng, &s);
    q.iter_mut().for_each(|x| *x *= 3.0);
    let c = AttnCase { s, tiles: AttnTiles::default() };
    let (o, lse) = run_forward(&q, &k, &v, &c);
    let (oref, lref) = attn_ref(&f64s(&q), &f64s(&k), &f64s(&v), &s);
    assert_close("attn out T=70", &o, &oref, FWD_TOL, FWD_TOL);
    assert_close("attn lse T=70", &lse, &lref, FWD_TOL, FWD_TOL);
    // Tile sizes change only rounding.
    let (o2, _) = run_forward(&q, &k, &v, &AttnCase { s, tiles: AttnTiles { q_block: 7, kv_block: 9 } });
    assert_close("attn out T=70 tiles 7×9", &o2, &f64s(&o), 1e-6, 1e-6);
}

#[test]
fn attention_is_causal() {
    // Changing a future key/value leaves every earlier row unchanged, bit
    // for bit; the row at that position changes.
    let mut rng = SplitMix64::new(42);
    let s = AttnShape::causal(1, 11, 4, 2, 8);
    let c = AttnCase { s, tiles: AttnTiles { q_block: 4, kv_block: 3 } };
    let (q, mut k, mut v) = attn_inputs(&mut rng, &s);
    let (o, _) = run_forward(&q, &k, &v, &c);
    let row = s.n_heads * s.head_dim;
    let kv_row = s.n_kv_heads * s.head_dim;
    let pos = 6;
    for x in &mut k[pos * kv_row..(pos + 1) * kv_row] {
        *x += 1.0;
    }
    for x in &mut v[pos * kv_row..(pos + 1) * kv_row] {
        *x -= 2.0;
    }
    let (o2, _) = run_forward(&q, &k, &v, &c);
    assert_eq!(&o[..pos * row], &o2[..pos * row]);
    assert_ne!(&o[pos * row..(pos + 1) * row], &o2[pos * row..(pos + 1) * row]);
}

#[test]
fn attention_backward_finite_differences() {
    let mut rng = SplitMix64::new(43);
    for c in attn_cases() {
        let s = c.s;
        let (q, k, v) = attn_inputs(&mut rng, &s);
        let dout = randn(&mut rng, q.len(), 1.0);
        let (o, lse) = run_forward(&q, &k, &v, &c);
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; k.len()], vec![f32::NAN; v.len()]);
        attention::attention_backward_tiled(&q, &k, &v, &o, &lse, &dout, &s, c.tiles, &mut dq, &mut dk, &mut dv);
        let (qd, kd, vd, dod) = (f64s(&q), f64s(&k), f64s(&v), f64s(&dout));
        let loss = |q: &[f64], k: &[f64], v: &[f64]| dotf(&dod, &attn_ref(q, k, v, &s).0);
        let name = format!("{s:?} tiles {:?}", c.tiles);
        assert_close(&format!("attn dq {name}"), &dq, &fd_grad(&qd, |x| loss(x, &kd, &vd)), GRAD_TOL, GRAD_TOL);
        assert_close(&format!("attn dk {name}"), &dk, &fd_grad(&kd, |x| loss(&qd, x, &vd)), GRAD_TOL, GRAD_TOL);
        assert_close(&format!("attn dv {name}"), &dv, &fd_grad(&vd, |x| loss(&qd, &kd, x)), GRAD_TOL, GRAD_TOL);
    }
}

#[test]
fn attention_backward_long_sequence_tiles_agree() {
    // T = 70 with default tiles vs 7×9 tiles vs an f64 analytic backward
    // (full P matrix) — finite differences are too slow at this size, and
    // the analytic formulas were checked against them above.
    let mut rng = SplitMix64::new(44);
    let s = AttnShape::causal(2, 70, 4, 2, 16);
    let (q, k, v) = attn_inputs(&mut rng, &s);
    let dout = randn(&mut rng, q.len(), 1.0);
    let mut o = vec![0f32; q.len()];
    let mut lse = vec![0f32; 2 * 70 * 4];
    attention::attention_forward(&q, &k, &v, &s, &mut o, &mut lse);
    let grads = |tiles: AttnTiles| {
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
        attention::attention_backward_tiled(&q, &k, &v, &o, &lse, &dout, &s, tiles, &mut dq, &mut dk, &mut dv);
        (dq, dk, dv)
    };
    let (dq, dk, dv) = grads(AttnTiles::default());
    // f64 analytic reference.
    let (qd, kd, vd, dod) = (f64s(&q), f64s(&k), f64s(&v), f64s(&dout));
    let (od, ld) = attn_ref(&qd, &kd, &vd, &s);
    let (t, hq, hkv, d) = (70, 4, 2, 16);
    let scale = 1.0 / (d as f64).sqrt();
    let (mut rq, mut rk, mut rv) = (vec![0f64; q.len()], vec![0f64; k.len()], vec![0f64; v.len()]);
    for b in 0..2 {
        for h in 0..hq {
            let g = h / 2;
            for i in 0..t {
                let qa = ((b * t + i) * hq + h) * d;
                let delta = dotf(&dod[qa..qa + d], &od[qa..qa + d]);
                for j in 0..=i {
                    let ka = ((b * t + j) * hkv + g) * d;
                    let p = (scale * dotf(&qd[qa..qa + d], &kd[ka..ka + d]) - ld[(b * t + i) * hq + h]).exp();
                    let ds = p * (dotf(&dod[qa..qa + d], &vd[ka..ka + d]) - delta) * scale;
                    for c in 0..d {
                        rv[ka + c] += p * dod[qa + c];
                        rk[ka + c] += ds * qd[qa + c];
                        rq[qa + c] += ds * kd[ka + c];
                    }
                }
            }
        }
    }
    assert_close("attn dq T=70", &dq, &rq, GRAD_TOL, GRAD_TOL);
    assert_close("attn dk T=70", &dk, &rk, GRAD_TOL, GRAD_TOL);
    assert_close("attn dv T=70", &dv, &rv, GRAD_TOL, GRAD_TOL);
    let (dq2, dk2, dv2) = grads(AttnTiles { q_block: 7, kv_block: 9 });
    assert_close("attn dq tiles", &dq2, &f64s(&dq), 1e-6, 1e-6);
    assert_close("attn dk tiles", &dk2, &f64s(&dk), 1e-6, 1e-6);
    assert_close("attn dv tiles", &dv2, &f64s(&dv), 1e-6, 1e-6);
}

#[test]
fn attention_decode_matches_forward_last_row() {
    // Three sequences with caches of different lengths (1, 6, 9) in a
    // cache of capacity 12; each decode row equals the reference's last row
    // over that sequence's keys, and the training forward's last row.
    let mut rng = SplitMix64::new(45);
    let (hq, hkv, d, cap) = (4, 2, 8, 12);
    let lens = [1usize, 6, 9];
    for (window, scale, softcap) in [(None, None, None), (Some(4), None, None), (Some(5), Some(0.7), Some(1.5))] {
        let ds = DecodeShape { batch: 3, cache_cap: cap, n_heads: hq, n_kv_heads: hkv, head_dim: d, window, scale, softcap };
        let kc = randn(&mut rng, 3 * cap * hkv * d, 1.0);
        let vc = randn(&mut rng, 3 * cap * hkv * d, 1.0);
        let q = randn(&mut rng, 3 * hq * d, 1.0);
        let mut o = vec![f32::NAN; q.len()];
        attention::attention_decode(&q, &kc, &vc, &lens, &ds, &mut o);
        for (b, &len) in lens.iter().enumerate() {
            let s = AttnShape { batch: 1, q_len: 1, kv_len: len, n_heads: hq, n_kv_heads: hkv, head_dim: d, window, scale, softcap };
            let ks = &kc[b * cap * hkv * d..][..len * hkv * d];
            let vs = &vc[b * cap * hkv * d..][..len * hkv * d];
            let qs = &q[b * hq * d..(b + 1) * hq * d];
            let (oref, _) = attn_ref(&f64s(qs), &f64s(ks), &f64s(vs), &s);
            assert_close(&format!("decode b={b} {window:?}"), &o[b * hq * d..(b + 1) * hq * d], &oref, FWD_TOL, FWD_TOL);
            let (of, _) = run_forward(qs, ks, vs, &AttnCase { s, tiles: AttnTiles::default() });
            assert_close(&format!("decode vs forward b={b}"), &o[b * hq * d..(b + 1) * hq * d], &f64s(&of), 1e-6, 1e-6);
        }
    }
}

// ---------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------

#[test]
fn cross_entropy_ignored_labels_and_finite_differences() {
    let mut rng = SplitMix64::new(51);
    let (n, vocab) = (9, 37);
    let x = randn(&mut rng, n * vocab, 2.0);
    let labels = [3, -100, 0, 36, -100, 17, 17, -100, 5];
    let ce = loss::cross_entropy_forward(&x, &labels, vocab).unwrap();
    let xd = f64s(&x);
    let (sum, count) = ce_ref(&xd, &labels, vocab);
    assert_eq!(ce.count, 6);
    assert_eq!(count, 6);
    assert!((ce.sum - sum).abs() <= 1e-6 * sum.abs(), "sum {} vs {sum}", ce.sum);
    assert_close("ce loss", &[ce.loss], &[sum / 6.0], FWD_TOL, FWD_TOL);

    let mut dx = vec![f32::NAN; x.len()];
    loss::cross_entropy_backward(&x, &labels, vocab, 1.0 / ce.count as f32, &mut dx).unwrap();
    let fd = fd_grad(&xd, |x| {
        let (s, c) = ce_ref(x, &labels, vocab);
        s / c as f64
    });
    assert_close("ce dlogits", &dx, &fd, GRAD_TOL, GRAD_TOL);
    for (r, &y) in labels.iter().enumerate() {
        if y == -100 {
            assert!(dx[r * vocab..(r + 1) * vocab].iter().all(|&g| g == 0.0), "ignored row {r} has gradient");
        }
    }
    // Fused in place: same loss, same gradient.
    let mut xf = x.clone();
    let cf = loss::cross_entropy_fused(&mut xf, &labels, vocab, None).unwrap();
    assert_eq!(cf, ce);
    assert_eq!(xf, dx);
    // Fused with an explicit scale (sum / num_items_in_batch).
    let mut xs = x.clone();
    loss::cross_entropy_fused(&mut xs, &labels, vocab, Some(0.125)).unwrap();
    let mut d2 = vec![0f32; x.len()];
    loss::cross_entropy_backward(&x, &labels, vocab, 0.125, &mut d2).unwrap();
    assert_eq!(xs, d2);
}

#[test]
fn cross_entropy_of_soft_capped_logits_and_finite_differences() {
    // Gemma 2's final_logit_softcapping: the loss of c·tanh(z/c), its
    // gradient with respect to the raw z; logits large enough to saturate.
    let mut rng = SplitMix64::new(52);
    let (n, vocab, c) = (7, 29, 3.0f32);
    let z = randn(&mut rng, n * vocab, 4.0);
    let labels = [3, -100, 0, 28, 11, -100, 5];
    let capped = |z: &[f64]| -> Vec<f64> { z.iter().map(|&x| c as f64 * (x / c as f64).tanh()).collect() };
    let zd = f64s(&z);
    let (sum, count) = ce_ref(&capped(&zd), &labels, vocab);
    let mut g = z.clone();
    let ce = loss::cross_entropy_fused_softcap(&mut g, &labels, vocab, None, c).unwrap();
    assert_eq!(ce.count, count);
    assert!((ce.sum - sum).abs() <= 1e-6 * sum.abs(), "sum {} vs {sum}", ce.sum);
    let fd = fd_grad(&zd, |z| {
        let (s, c) = ce_ref(&capped(z), &labels, vocab);
        s / c as f64
    });
    assert_close("capped ce dz", &g, &fd, GRAD_TOL, GRAD_TOL);
}

#[test]
fn cross_entropy_stable_all_ignored_and_bad_labels() {
    // Logits far beyond exp's range: max subtraction keeps everything finite.
    let vocab = 4;
    let x = [1e4f32, -1e4, 0.0, 9990.0, -5e3, -5e3, -5e3, -5e3];
    let labels = [3, 2];
    let ce = loss::cross_entropy_forward(&x, &labels, vocab).unwrap();
    let (sum, _) = ce_ref(&f64s(&x), &labels, vocab);
    assert!(ce.loss.is_finite() && ((ce.loss as f64) - sum / 2.0).abs() < 1e-4, "{} vs {}", ce.loss, sum / 2.0);
    let mut d = vec![0f32; 8];
    loss::cross_entropy_backward(&x, &labels, vocab, 0.5, &mut d).unwrap();
    assert!(d.iter().all(|g| g.is_finite()));
    // Row 0: only logits 1e4 and 9990 matter: p₀ = 1/(1 + e⁻¹⁰), p₃ = 1 − p₀.
    let p0 = (1.0 / (1.0 + (-10f64).exp())) as f32;
    assert!((d[0] - 0.5 * p0).abs() < 1e-6 && (d[3] + 0.5 * p0).abs() < 1e-6, "{d:?}");

    // All ignored: loss 0, count 0, zero gradient (PyTorch would give NaN).
    let all = [-100, -100];
    let ce = loss::cross_entropy_forward(&x, &all, vocab).unwrap();
    assert_eq!((ce.loss, ce.count, ce.sum), (0.0, 0, 0.0));
    let mut xf = x.to_vec();
    let cf = loss::cross_entropy_fused(&mut xf, &all, vocab, None).unwrap();
    assert_eq!(cf.count, 0);
    assert!(xf.iter().all(|&g| g == 0.0));

    // Labels outside [0, V) other than −100: error, nothing written.
    for bad in [[4, 0], [-1, 0], [0, -101]] {
        assert_eq!(loss::cross_entropy_forward(&x, &bad, vocab).unwrap_err().kind, lora::ErrorKind::InvalidArgument);
        let mut d = vec![3f32; 8];
        assert!(loss::cross_entropy_backward(&x, &bad, vocab, 1.0, &mut d).is_err());
        assert!(d.iter().all(|&g| g == 3.0));
        let mut xf = x.to_vec();
        assert!(loss::cross_entropy_fused(&mut xf, &bad, vocab, None).is_err());
        assert_eq!(xf, x);
    }
}

#[test]
fn cross_entropy_many_rows_parallel() {
    // Several rayon tasks (rows × vocab > 32 Ki per task): same as row by row.
    let mut rng = SplitMix64::new(52);
    let (n, vocab) = (64, 3001);
    let x = randn(&mut rng, n * vocab, 3.0);
    let labels: Vec<i32> = (0..n).map(|i| if i % 5 == 0 { -100 } else { (i * 97 % vocab) as i32 }).collect();
    let ce = loss::cross_entropy_forward(&x, &labels, vocab).unwrap();
    let (sum, count) = ce_ref(&f64s(&x), &labels, vocab);
    assert_eq!(ce.count, count);
    assert!((ce.sum - sum).abs() <= 1e-6 * sum, "{} vs {sum}", ce.sum);
    let mut xf = x.clone();
    let cf = loss::cross_entropy_fused(&mut xf, &labels, vocab, None).unwrap();
    assert_eq!(cf, ce);
    // Each counted row's gradient sums to 0 (softmax sums to 1).
    for (r, &y) in labels.iter().enumerate() {
        let s: f64 = xf[r * vocab..(r + 1) * vocab].iter().map(|&g| g as f64).sum();
        assert!(s.abs() < 1e-7, "row {r} (label {y}) gradient sums to {s}");
    }
}

// ---------------------------------------------------------------------------
// Gradient norm and clipping
// ---------------------------------------------------------------------------

#[test]
fn clip_grad_norm_semantics() {
    let mut rng = SplitMix64::new(61);
    let sizes = [7usize, 1, 200_000, 33]; // one tensor above the parallel chunk
    let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| randn(&mut rng, n, 0.01)).collect();
    let want = grads.iter().flatten().map(|&g| g as f64 * g as f64).sum::<f64>().sqrt();
    let views: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
    let total = loss::grad_norm_l2(&views);
    assert!((total as f64 - want).abs() <= 1e-6 * want, "{total} vs {want}");

    // Clipping to max_norm = total/2: every element scaled by max/(total+1e-6).
    let max_norm = total / 2.0;
    let mut g2 = grads.clone();
    let r = {
        let mut muts: Vec<&mut [f32]> = g2.iter_mut().map(|g| &mut g[..]).collect();
        loss::clip_grad_norm(&mut muts, max_norm)
    };
    assert_eq!(r.total_norm, total);
    assert_eq!(r.clip_coef, (1.0 / (total + 1e-6)) * max_norm); // torch: reciprocal() * max_norm
    assert!(r.clipped);
    for (a, b) in g2.iter().flatten().zip(grads.iter().flatten()) {
        assert_eq!(*a, *b * r.clip_coef);
    }
    let views: Vec<&[f32]> = g2.iter().map(|g| &g[..]).collect();
    assert!((loss::grad_norm_l2(&views) - max_norm).abs() <= 1e-5 * max_norm);

    // max_norm ≥ total: clip_coef ≥ 1 (or just under 1 only when total + 1e-6
    // rounds above max_norm), nothing changes.
    let mut g3 = grads.clone();
    let r = {
        let mut muts: Vec<&mut [f32]> = g3.iter_mut().map(|g| &mut g[..]).collect();
        loss::clip_grad_norm(&mut muts, total * 2.0)
    };
    assert!(!r.clipped && r.clip_coef > 1.0);
    assert_eq!(g3, grads);

    // Empty list: norm 0, coefficient huge, nothing to do.
    assert_eq!(loss::grad_norm_l2(&[]), 0.0);
    assert!(!loss::clip_grad_norm(&mut [], 1.0).clipped);

    // Non-finite: reported, gradients left alone.
    let mut g4 = grads.clone();
    g4[1][0] = f32::NAN;
    let before = g4.clone();
    let r = {
        let mut muts: Vec<&mut [f32]> = g4.iter_mut().map(|g| &mut g[..]).collect();
        loss::clip_grad_norm(&mut muts, 1e-3)
    };
    assert!(r.total_norm.is_nan() && !r.clipped);
    assert_eq!(format!("{g4:?}"), format!("{before:?}"));
}

// ---------------------------------------------------------------------------
// Determinism
// ---------------------------------------------------------------------------

#[test]
fn results_do_not_depend_on_thread_count() {
    // Every reduction has a fixed order (fixed chunks, one task per output),
    // so 1 and 4 threads give the same bits; sizes are large enough to split.
    let mut rng = SplitMix64::new(71);
    let s = AttnShape::causal(2, 100, 4, 2, 16);
    let (q, k, v) = attn_inputs(&mut rng, &s);
    let dout = randn(&mut rng, q.len(), 1.0);
    let (rows, dim, vocab) = (200, 160, 700);
    let x = randn(&mut rng, rows * dim, 1.0);
    let w = randn(&mut rng, dim, 1.0);
    let logits = randn(&mut rng, rows * vocab, 2.0);
    let labels: Vec<i32> = (0..rows).map(|i| if i % 3 == 0 { -100 } else { (i * 7 % vocab) as i32 }).collect();
    let big = randn(&mut rng, 300_000, 1.0);
    let run = || {
        let mut o = vec![0f32; q.len()];
        let mut lse = vec![0f32; 2 * 100 * 4];
        attention::attention_forward(&q, &k, &v, &s, &mut o, &mut lse);
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
        attention::attention_backward(&q, &k, &v, &o, &lse, &dout, &s, &mut dq, &mut dk, &mut dv);
        let (mut y, mut r) = (vec![0f32; rows * dim], vec![0f32; rows]);
        norm::rmsnorm_forward(&x, &w, rows, dim, 1e-6, &mut y, Some(&mut r));
        let (mut dx, mut dw) = (vec![0f32; rows * dim], vec![0f32; dim]);
        norm::rmsnorm_backward(&x, &w, &r, &y, rows, dim, &mut dx, Some(&mut dw));
        let mut lg = logits.clone();
        let ce = loss::cross_entropy_fused(&mut lg, &labels, vocab, None).unwrap();
        let gn = loss::grad_norm_l2(&[&big, &x]);
        (o, lse, dq, dk, dv, y, dx, dw, lg, ce.sum, gn)
    };
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let one = pool(1).install(run);
    let four = pool(4).install(run);
    assert!(one == four, "results differ between 1 and 4 threads");
}

// ---------------------------------------------------------------------------
// PyTorch / transformers parity (tests/fixtures/ops, scripts/fixtures/gen_ops.py)
// ---------------------------------------------------------------------------

mod torch_parity {
    use super::*;
    use lora::io::safetensors::StFile;
    use std::collections::HashMap;
    use std::path::PathBuf;

    /// Ours vs PyTorch, both fp32 (`atol = TORCH_TOL·max|ref|`, `rtol =
    /// TORCH_TOL`). The formulas and rounding order are the same; what
    /// differs is summation order (PyTorch's vectorized/cascade sums and
    /// GEMM vs our f64 or 8-lane f32 sums), the online softmax, and libm vs
    /// SLEEF exp/cos/sin — each a few ulps. Measured ≤ 4.9e-7 (attention
    /// dk with a cache prefix), ≤ 2.2e-7 for every other op; inv_freq
    /// (default and llama3) is bit-identical (yarn: one element 1 ulp off,
    /// PyTorch's f32 pow against a correctly rounded one) and cos/sin are within 1 ulp
    /// at positions up to 4004. 3e-6 is ~6× the worst; a wrong formula
    /// (mask, scale, rotate_half convention, head mapping, label shift) is
    /// off by O(1).
    const TORCH_TOL: f64 = 3e-6;

    fn open(case: &str) -> (StFile, HashMap<String, String>) {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ops").join(format!("{case}.safetensors"));
        let f = StFile::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let m = f.metadata();
        assert_eq!(m["format"], "liblora-ops-fixture-v1");
        (f, m)
    }

    fn num<T: std::str::FromStr>(m: &HashMap<String, String>, k: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        m[k].parse().unwrap()
    }

    fn rd(f: &StFile, name: &str) -> Vec<f32> {
        f.read_f32(name).unwrap()
    }

    fn same(case: &str, what: &str, ours: &[f32], f: &StFile, name: &str) -> f64 {
        assert_close(&format!("torch {case} {what}"), ours, &f64s(&rd(f, name)), TORCH_TOL, TORCH_TOL)
    }

    #[test]
    fn rmsnorm_matches_llama_rmsnorm() {
        for case in ["rmsnorm_2x5x48_eps1e-6", "rmsnorm_3x40_eps1e-5"] {
            let (f, m) = open(case);
            let (rows, dim): (usize, usize) = (num(&m, "rows"), num(&m, "dim"));
            let eps: f32 = num(&m, "eps");
            let (x, w, dy) = (rd(&f, "x"), rd(&f, "weight"), rd(&f, "dy"));
            let mut y = vec![0f32; rows * dim];
            let mut rstd = vec![0f32; rows];
            norm::rmsnorm_forward(&x, &w, rows, dim, eps, &mut y, Some(&mut rstd));
            same(case, "y", &y, &f, "y");
            let (mut dx, mut dw) = (vec![0f32; rows * dim], vec![0f32; dim]);
            norm::rmsnorm_backward(&x, &w, &rstd, &dy, rows, dim, &mut dx, Some(&mut dw));
            same(case, "dx", &dx, &f, "dx");
            same(case, "dweight", &dw, &f, "dweight");
        }
    }

    #[test]
    fn rope_matches_llama_rotary_embedding() {
        for case in [
            "rope_default_theta1e4_d16_pos3",
            "rope_default_theta1e6_d32_pos4000",
            "rope_llama3_d64_pos100",
            "rope_yarn_d128_pos3000",
            "rope_yarn_mscale_notrunc_d64_pos50",
        ] {
            let (f, m) = open(case);
            let (b, t, hq, hkv, d, pos0): (usize, usize, usize, usize, usize, usize) =
                (num(&m, "batch"), num(&m, "seq"), num(&m, "n_heads"), num(&m, "n_kv_heads"), num(&m, "head_dim"), num(&m, "pos0"));
            // The rope parameters through the model's own config parser.
            let rp: serde_json::Value = serde_json::from_str(&m["rope_parameters"]).unwrap();
            let cfg = serde_json::json!({
                "model_type": "llama", "hidden_size": hq * d, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": hq, "num_key_value_heads": hkv, "head_dim": d, "vocab_size": 8,
                "rope_parameters": rp
            });
            let cfg = lora::model::config::ModelConfig::parse(&cfg.to_string()).unwrap();
            let scaling: f64 = num(&m, "attention_scaling");
            assert_eq!(cfg.rope_attention_scaling(), scaling as f32, "{case}: attention scaling");
            let freqs = cfg.rope_freqs();
            same(case, "inv_freq", &freqs.inv_freq, &f, "inv_freq");
            // HF's table is [T, D] = cat(cos θ, cos θ); ours is one half.
            let table = freqs.table(pos0, t);
            let (hc, hs) = (rd(&f, "cos"), rd(&f, "sin"));
            let widen = |half: &[f32]| -> Vec<f32> { half.chunks(d / 2).flat_map(|r| r.iter().chain(r.iter()).copied()).collect() };
            assert_close(&format!("torch {case} cos"), &widen(&table.cos), &f64s(&hc), TORCH_TOL, TORCH_TOL);
            assert_close(&format!("torch {case} sin"), &widen(&table.sin), &f64s(&hs), TORCH_TOL, TORCH_TOL);
            for (x, h, rot, dname, dwant) in [("q", hq, "q_rot", "dq_rot", "dq"), ("k", hkv, "k_rot", "dk_rot", "dk")] {
                let mut v = rd(&f, x);
                rope::rope_forward(&mut v, b, t, h, d, &table);
                same(case, rot, &v, &f, rot);
                let mut g = rd(&f, dname);
                rope::rope_backward(&mut g, b, t, h, d, &table);
                same(case, dwant, &g, &f, dwant);
            }
        }
    }

    #[test]
    fn attention_matches_eager_attention_forward() {
        for case in ["attn_gqa4x2_t11_d16", "attn_gqa4x2_t5_s12_cache_d8", "attn_mqa2x1_t10_d8_window4"] {
            let (f, m) = open(case);
            let window = if m["window"] == "none" { None } else { Some(num(&m, "window")) };
            let s = AttnShape {
                batch: num(&m, "batch"),
                q_len: num(&m, "q_len"),
                kv_len: num(&m, "kv_len"),
                n_heads: num(&m, "n_heads"),
                n_kv_heads: num(&m, "n_kv_heads"),
                head_dim: num(&m, "head_dim"),
                window,
                scale: None,
                softcap: None,
            };
            assert_eq!(s.scale(), num::<f64>(&m, "scaling") as f32);
            let (q, k, v, dout) = (rd(&f, "q"), rd(&f, "k"), rd(&f, "v"), rd(&f, "dout"));
            for tiles in [AttnTiles::default(), AttnTiles { q_block: 3, kv_block: 4 }] {
                let (o, lse) = run_forward(&q, &k, &v, &AttnCase { s, tiles });
                same(case, "out", &o, &f, "out");
                same(case, "lse", &lse, &f, "lse");
                let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
                attention::attention_backward_tiled(&q, &k, &v, &o, &lse, &dout, &s, tiles, &mut dq, &mut dk, &mut dv);
                same(case, "dq", &dq, &f, "dq");
                same(case, "dk", &dk, &f, "dk");
                same(case, "dv", &dv, &f, "dv");
            }
        }
    }

    #[test]
    fn swiglu_matches_silu_times_up() {
        let case = "swiglu_6x40";
        let (f, _) = open(case);
        let (g, u, dh) = (rd(&f, "gate"), rd(&f, "up"), rd(&f, "dh"));
        let mut h = vec![0f32; g.len()];
        swiglu::swiglu_forward(&g, &u, &mut h);
        same(case, "h", &h, &f, "h");
        let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        swiglu::swiglu_backward(&g, &u, &dh, &mut dg, &mut du);
        same(case, "dgate", &dg, &f, "dgate");
        same(case, "dup", &du, &f, "dup");
    }

    #[test]
    fn cross_entropy_matches_for_causal_lm_loss() {
        for case in ["ce_causal_2x7_v50_mean", "ce_causal_2x7_v50_num_items16"] {
            let (f, m) = open(case);
            let vocab: usize = num(&m, "vocab");
            let lt = f.get("labels").unwrap();
            assert_eq!(lt.dtype(), safetensors::Dtype::I64);
            let (b, t) = (lt.shape()[0], lt.shape()[1]);
            let labels: Vec<i64> = lt.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
            // The caller's shift (ForCausalLMLoss pads with −100 and drops
            // the first label): row (b, t) is scored against labels[b, t+1].
            let shifted: Vec<i32> = (0..b * t).map(|i| if i % t == t - 1 { -100 } else { labels[i + 1] as i32 }).collect();
            let logits = rd(&f, "logits");
            let ce = loss::cross_entropy_forward(&logits, &shifted, vocab).unwrap();
            let (loss_v, scale) = match m["num_items_in_batch"].as_str() {
                "none" => (ce.loss, 1.0 / ce.count as f32),
                n => {
                    let n: f64 = n.parse().unwrap();
                    ((ce.sum / n) as f32, (1.0 / n) as f32)
                }
            };
            same(case, "loss", &[loss_v], &f, "loss");
            let mut d = vec![0f32; logits.len()];
            loss::cross_entropy_backward(&logits, &shifted, vocab, scale, &mut d).unwrap();
            same(case, "dlogits", &d, &f, "dlogits");
            let mut fused = logits.clone();
            let cf = loss::cross_entropy_fused(&mut fused, &shifted, vocab, Some(scale)).unwrap();
            assert_eq!(cf, ce);
            assert_eq!(fused, d);
        }
    }

    #[test]
    fn clip_matches_clip_grad_norm() {
        for case in ["clip_3_tensors_max1", "clip_3_tensors_max100"] {
            let (f, m) = open(case);
            let n: usize = num(&m, "tensors");
            let max_norm: f32 = num(&m, "max_norm");
            let mut grads: Vec<Vec<f32>> = (0..n).map(|i| rd(&f, &format!("grad{i}"))).collect();
            let r = {
                let mut muts: Vec<&mut [f32]> = grads.iter_mut().map(|g| &mut g[..]).collect();
                loss::clip_grad_norm(&mut muts, max_norm)
            };
            same(case, "total_norm", &[r.total_norm], &f, "total_norm");
            assert_eq!(r.clipped, max_norm < r.total_norm, "{case}");
            for (i, g) in grads.iter().enumerate() {
                same(case, &format!("clipped{i}"), g, &f, &format!("clipped{i}"));
            }
        }
    }
}
