//! RMSNorm (LLaMA, Mistral, Qwen2), forward and backward, fp32.
//!
//! Math, per row `x ∈ ℝᴰ` with weight `w ∈ ℝᴰ` (transformers
//! `LlamaRMSNorm.forward`, identical in `MistralRMSNorm` and `Qwen2RMSNorm`):
//!
//! ```text
//!   r  = 1 / sqrt(mean_j(x_j²) + eps)          ("rstd", one per row)
//!   x̂  = x · r
//!   y  = w ⊙ x̂                                 (weight applied after, as HF)
//! ```
//!
//! Backward, with `g = dy ⊙ w`:
//!
//! ```text
//!   dx = r·g − r³·x·(Σ_j g_j x_j)/D            (= r·(g − x̂·mean(g ⊙ x̂)))
//!   dw = Σ_rows dy ⊙ x̂
//! ```
//!
//! Layout: `x`, `y`, `dy`, `dx` are `[rows, D]` row-major; `w`, `dw` are
//! `[D]`; `rstd` is `[rows]`.
//!
//! Memory traffic: forward reads `x` twice (sum of squares, then scale; the
//! row is in L1/L2 the second time) and writes `y`; backward reads `x`,
//! `dy` and writes `dx` per row, plus one column pass over `x`, `dy` for
//! `dw`. Rows are independent: split over the rayon pool in tasks of about
//! `TASK_ELEMS` (16 Ki) elements.

use rayon::prelude::*;

/// Elements per rayon task: ~16 Ki floats is a few microseconds of work,
/// well above rayon's per-task overhead (~1 µs), small enough to balance.
const TASK_ELEMS: usize = 1 << 14;

fn rows_per_task(dim: usize) -> usize {
    (TASK_ELEMS / dim.max(1)).max(1)
}

/// Sum of squares of a row, accumulated in f64 (4 lanes). f64 makes the
/// mean correctly rounded for any practical D, so an fp32 kernel (GPU tree
/// reduction, PyTorch's cascade sum) differs from it only by its own error.
#[inline]
fn sum_sq_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let mut it = x.chunks_exact(4);
    for c in &mut it {
        for k in 0..4 {
            acc[k] += c[k] as f64 * c[k] as f64;
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for &v in it.remainder() {
        s += v as f64 * v as f64;
    }
    s
}

/// The reciprocal RMS of one row, with transformers' fp32 order:
/// `variance = mean(x²)` rounded to f32, then `rsqrt(variance + eps)`
/// computed as `1 / sqrt(·)` in f32 (PyTorch's CPU `rsqrt`).
#[inline]
pub fn rmsnorm_rstd_row(x: &[f32], eps: f32) -> f32 {
    let var = (sum_sq_f64(x) / x.len() as f64) as f32;
    1.0 / (var + eps).sqrt()
}

/// RMSNorm forward: `y[i, j] = w[j] · (x[i, j] · r_i)`,
/// `r_i = 1 / sqrt(mean_j x[i, j]² + eps)`.
///
/// `x`, `y`: `[rows, dim]`; `w`: `[dim]`. When `rstd` is given (`[rows]`),
/// `r_i` is stored there for [`rmsnorm_backward`]. The product is rounded
/// as transformers does in fp32: first `x·r`, then `w·(x·r)`.
pub fn rmsnorm_forward(x: &[f32], w: &[f32], rows: usize, dim: usize, eps: f32, y: &mut [f32], rstd: Option<&mut [f32]>) {
    assert!(dim > 0, "rmsnorm: dim must be positive");
    assert_eq!(x.len(), rows * dim, "rmsnorm: x is not [rows, dim]");
    assert_eq!(y.len(), rows * dim, "rmsnorm: y is not [rows, dim]");
    assert_eq!(w.len(), dim, "rmsnorm: w is not [dim]");
    let per = rows_per_task(dim);
    let body = |(xc, yc): (&[f32], &mut [f32]), rc: Option<&mut [f32]>| {
        let mut rc = rc;
        for (i, (xr, yr)) in xc.chunks_exact(dim).zip(yc.chunks_exact_mut(dim)).enumerate() {
            let r = rmsnorm_rstd_row(xr, eps);
            for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *yv = wv * (xv * r);
            }
            if let Some(rc) = rc.as_deref_mut() {
                rc[i] = r;
            }
        }
    };
    match rstd {
        Some(rs) => {
            assert_eq!(rs.len(), rows, "rmsnorm: rstd is not [rows]");
            x.par_chunks(per * dim)
                .zip(y.par_chunks_mut(per * dim))
                .zip(rs.par_chunks_mut(per))
                .for_each(|((xc, yc), rc)| body((xc, yc), Some(rc)));
        }
        None => x.par_chunks(per * dim).zip(y.par_chunks_mut(per * dim)).for_each(|p| body(p, None)),
    }
}

/// RMSNorm backward. With `g = dy ⊙ w` and `r` the forward's rstd:
///
/// `dx[i, :] = r_i·g − r_i³·x[i, :]·(Σ_j g_j x[i, j]) / dim`   (written),
/// `dw[j]  += Σ_i dy[i, j] · (x[i, j] · r_i)`                   (accumulated,
/// like PyTorch's `.grad`; pass zeros for a fresh gradient).
///
/// `x`, `dy`, `dx`: `[rows, dim]`; `w`, `dw`: `[dim]`; `rstd`: `[rows]`
/// from [`rmsnorm_forward`] (or [`rmsnorm_rstd_row`]). The row dot product
/// is accumulated in f64; everything else in f32.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32], rows: usize, dim: usize, dx: &mut [f32], dw: Option<&mut [f32]>) {
    assert!(dim > 0, "rmsnorm: dim must be positive");
    assert_eq!(x.len(), rows * dim, "rmsnorm: x is not [rows, dim]");
    assert_eq!(dy.len(), rows * dim, "rmsnorm: dy is not [rows, dim]");
    assert_eq!(dx.len(), rows * dim, "rmsnorm: dx is not [rows, dim]");
    assert_eq!(w.len(), dim, "rmsnorm: w is not [dim]");
    assert_eq!(rstd.len(), rows, "rmsnorm: rstd is not [rows]");
    let per = rows_per_task(dim);
    x.par_chunks(per * dim)
        .zip(dy.par_chunks(per * dim))
        .zip(dx.par_chunks_mut(per * dim))
        .zip(rstd.par_chunks(per))
        .for_each(|(((xc, dyc), dxc), rc)| {
            for (((xr, dyr), dxr), &r) in xc.chunks_exact(dim).zip(dyc.chunks_exact(dim)).zip(dxc.chunks_exact_mut(dim)).zip(rc) {
                let mut dot = 0f64;
                for ((&xv, &dv), &wv) in xr.iter().zip(dyr).zip(w) {
                    dot += (dv * wv) as f64 * xv as f64;
                }
                let c = (r as f64 * r as f64 * r as f64 * dot / dim as f64) as f32;
                for (((dxv, &xv), &dv), &wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                    *dxv = r * (dv * wv) - c * xv;
                }
            }
        });
    if let Some(dw) = dw {
        assert_eq!(dw.len(), dim, "rmsnorm: dw is not [dim]");
        // Column reduction: each task owns a band of columns and walks all
        // rows, so the sum order (row by row, f64) is fixed and the result
        // does not depend on the number of threads.
        const BAND: usize = 64;
        dw.par_chunks_mut(BAND).enumerate().for_each(|(band, dwc)| {
            let c0 = band * BAND;
            let mut acc = [0f64; BAND];
            for ((xr, dyr), &r) in x.chunks_exact(dim).zip(dy.chunks_exact(dim)).zip(rstd) {
                for (k, a) in acc[..dwc.len()].iter_mut().enumerate() {
                    *a += dyr[c0 + k] as f64 * (xr[c0 + k] * r) as f64;
                }
            }
            for (d, a) in dwc.iter_mut().zip(acc) {
                *d += a as f32;
            }
        });
    }
}
