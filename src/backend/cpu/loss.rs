//! The end of a training step's forward and the start of its update:
//! causal-LM cross-entropy with its fused backward, and the global gradient
//! norm with clipping. fp32 data, f64 reductions.
//!
//! Cross-entropy (PyTorch `F.cross_entropy(logits, labels, ignore_index=-100)`,
//! which transformers' `ForCausalLMLoss` calls after shifting the labels and
//! upcasting the logits to fp32). Per counted row `i` (label `y_i ≠ −100`):
//!
//! ```text
//!   m_i    = max_j x_ij                         (stability: exp never overflows)
//!   lse_i  = m_i + log Σ_j exp(x_ij − m_i)
//!   ℓ_i    = lse_i − x_{i,y_i}
//!   loss   = Σ_i ℓ_i / count                    ("mean" reduction)
//!   dx_ij  = c · (softmax(x_i)_j − [j = y_i])   (c = dloss/count for the mean;
//!                                                rows with y = −100 get 0)
//! ```
//!
//! With `num_items_in_batch` (HF Trainer under gradient accumulation) the
//! loss is `Σ ℓ / num_items` instead: use [`CrossEntropy::sum`] and pass
//! `c = 1/num_items` to the backward.
//!
//! All labels ignored: PyTorch returns NaN (0/0). Here the loss is **0.0
//! with `count = 0`** and the gradient is all zeros, so an empty micro-batch
//! adds nothing to an accumulated step; callers that need to know check
//! `count`.
//!
//! Layout: `logits`, `dlogits` `[N, V]` row-major, `labels` `[N]` (i32;
//! the caller has already shifted them). Memory traffic: forward reads the
//! logits once (row max, then exp-sum, with the row in cache); backward
//! reads them once and writes the gradient once; the fused version does
//! both in one read and one in-place write, and one exponential per logit
//! (`exp` is [`vexp::exp`], within 1 ulp, so the rows vectorize). Rows are
//! split over the rayon pool.
//!
//! Gradient clipping (`torch.nn.utils.clip_grad_norm_`, norm_type 2):
//!
//! ```text
//!   n_k        = ‖g_k‖₂ per tensor              (torch._foreach_norm)
//!   total_norm = ‖(n_1, …, n_K)‖₂               (vector_norm of the stacked norms)
//!   clip_coef  = max_norm / (total_norm + 1e-6)
//!   g_k       *= clip_coef                      only if clip_coef < 1
//! ```
//!
//! in fp32, with PyTorch's rounding: `max_norm / tensor` is
//! `Tensor.__rtruediv__`, i.e. `tensor.reciprocal() * max_norm`, so the
//! coefficient is `(1 / (total_norm + 1e-6)) · max_norm` (two roundings).
//! PyTorch multiplies by `min(clip_coef, 1)` always; multiplying by 1.0 is
//! exact, so skipping it is the same result. (`optim::clip` implements the
//! same semantics for the trainer.)

use crate::Result;
use rayon::prelude::*;
use super::vexp::{self, simd_dispatch};

/// The label value that marks a row as not counted (PyTorch's default
/// `ignore_index`, and what HF data collators put on padding/prompt tokens).
pub const IGNORE_INDEX: i32 = -100;

/// Result of a cross-entropy forward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropy {
    /// `sum / count` rounded to f32; 0.0 when `count == 0`.
    pub loss: f32,
    /// Rows whose label is not [`IGNORE_INDEX`].
    pub count: usize,
    /// `Σ ℓ_i` over counted rows, in f64 (for "sum / num_items" reductions).
    pub sum: f64,
}

/// Rows per rayon task: at least one, about 32 Ki logits.
fn rows_per_task(vocab: usize) -> usize {
    ((1usize << 15) / vocab.max(1)).max(1)
}

/// Number of counted rows (labels ≠ [`IGNORE_INDEX`]).
pub fn count_labels(labels: &[i32]) -> usize {
    labels.iter().filter(|&&y| y != IGNORE_INDEX).count()
}

/// Every label must be [`IGNORE_INDEX`] or in `[0, vocab)` (PyTorch raises
/// "Target out of bounds" otherwise); checked before anything is written.
fn check_labels(labels: &[i32], vocab: usize) -> Result<()> {
    for (i, &y) in labels.iter().enumerate() {
        if y != IGNORE_INDEX && (y < 0 || y as usize >= vocab) {
            bail!(InvalidArgument, "cross_entropy: label {y} at row {i} is neither {IGNORE_INDEX} nor in [0, {vocab})");
        }
    }
    Ok(())
}

/// Row max, in eight lanes (the same maximum as a left-to-right fold, for
/// finite values; vectorizes).
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    it.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `Σ_j f(x_j)` in f64, four lanes (element `j` into lane `j mod 4`, the
/// lanes added pairwise, then the tail in order).
#[inline(always)]
fn sum4_f64(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f64; 4];
    let mut it = x.chunks_exact(4);
    for c in &mut it {
        for k in 0..4 {
            acc[k] += f(c[k]) as f64;
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for &v in it.remainder() {
        s += f(v) as f64;
    }
    s
}

#[inline(always)]
fn row_stats_body(x: &[f32]) -> (f32, f64) {
    let m = row_max(x);
    (m, sum4_f64(x, |v| vexp::exp(v - m)))
}

simd_dispatch! {
    /// Row max and `Σ_j exp(x_j − max)` (exp in f32, [`vexp::exp`]; sum in
    /// f64 as [`sum4_f64`]).
    fn row_stats(x: &[f32]) -> (f32, f64) = row_stats_body
}

/// The fused row: `x_j ← exp(x_j − m)` once (the sum's terms and the
/// gradient's), then `x_j ← c·(x_j/Σ) − c·[j = y]`; returns the row's loss.
/// The same values as [`row_stats`], [`row_loss`] and [`row_grad`] in
/// turn, with half the exponentials.
#[inline(always)]
fn row_fused_body(x: &mut [f32], y: usize, c: f32) -> f64 {
    let m = row_max(x);
    let xy = x[y];
    for v in x.iter_mut() {
        *v = vexp::exp(*v - m);
    }
    let sum = sum4_f64(x, |v| v);
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v = c * (*v * inv);
    }
    x[y] -= c;
    sum.ln() - (xy as f64 - m as f64)
}

simd_dispatch! {
    fn row_fused(x: &mut [f32], y: usize, c: f32) -> f64 = row_fused_body
}

/// `ℓ = log Σ_j exp(x_j − m) − (x_y − m)` in f64.
#[inline]
fn row_loss(x: &[f32], y: usize, m: f32, sum: f64) -> f64 {
    sum.ln() - (x[y] as f64 - m as f64)
}

#[inline(always)]
fn row_grad_body(x: &[f32], y: usize, m: f32, sum: f64, c: f32, d: &mut [f32]) {
    let inv = (1.0 / sum) as f32;
    for (dv, &xv) in d.iter_mut().zip(x) {
        *dv = c * (vexp::exp(xv - m) * inv);
    }
    d[y] -= c;
}

simd_dispatch! {
    /// `d_j = c · (exp(x_j − m)/sum − [j = y])`, written over `d`.
    fn row_grad(x: &[f32], y: usize, m: f32, sum: f64, c: f32, d: &mut [f32]) = row_grad_body
}

/// Cross-entropy forward (module doc): mean over counted rows of
/// `logsumexp(x_i) − x_{i,y_i}`. `logits`: `[N, V]`, `labels`: `[N]`.
/// Per-row losses are summed in f64 in row order (deterministic).
///
/// Errors (`InvalidArgument`) on a label outside `[0, V)` other than −100.
/// All rows ignored: `loss = 0.0`, `count = 0` (PyTorch gives NaN).
pub fn cross_entropy_forward(logits: &[f32], labels: &[i32], vocab: usize) -> Result<CrossEntropy> {
    assert!(vocab > 0, "cross_entropy: vocab must be positive");
    assert_eq!(logits.len(), labels.len() * vocab, "cross_entropy: logits is not [N, V]");
    check_labels(labels, vocab)?;
    let per = rows_per_task(vocab);
    let partial: Vec<f64> = logits
        .par_chunks(per * vocab)
        .zip(labels.par_chunks(per))
        .map(|(xc, yc)| {
            let mut s = 0f64;
            for (x, &y) in xc.chunks_exact(vocab).zip(yc) {
                if y != IGNORE_INDEX {
                    let (m, sum) = row_stats(x);
                    s += row_loss(x, y as usize, m, sum);
                }
            }
            s
        })
        .collect();
    Ok(finish(partial.iter().sum(), count_labels(labels)))
}

fn finish(sum: f64, count: usize) -> CrossEntropy {
    let loss = if count == 0 { 0.0 } else { (sum / count as f64) as f32 };
    CrossEntropy { loss, count, sum }
}

/// Cross-entropy backward: `dlogits[i, :] = grad_scale · (softmax(x_i) − onehot(y_i))`
/// for counted rows, `0` for ignored rows (written, not accumulated). For the
/// mean loss with upstream gradient `dloss`, `grad_scale = dloss / count`.
///
/// Errors (`InvalidArgument`, nothing written) on an out-of-range label.
pub fn cross_entropy_backward(logits: &[f32], labels: &[i32], vocab: usize, grad_scale: f32, dlogits: &mut [f32]) -> Result<()> {
    assert!(vocab > 0, "cross_entropy: vocab must be positive");
    assert_eq!(logits.len(), labels.len() * vocab, "cross_entropy: logits is not [N, V]");
    assert_eq!(dlogits.len(), logits.len(), "cross_entropy: dlogits is not [N, V]");
    check_labels(labels, vocab)?;
    let per = rows_per_task(vocab);
    dlogits
        .par_chunks_mut(per * vocab)
        .zip(logits.par_chunks(per * vocab))
        .zip(labels.par_chunks(per))
        .for_each(|((dc, xc), yc)| {
            for ((d, x), &y) in dc.chunks_exact_mut(vocab).zip(xc.chunks_exact(vocab)).zip(yc) {
                if y == IGNORE_INDEX {
                    d.fill(0.0);
                } else {
                    let (m, sum) = row_stats(x);
                    row_grad(x, y as usize, m, sum, grad_scale, d);
                }
            }
        });
    Ok(())
}

/// Forward and backward in one pass, in place: returns the loss as
/// [`cross_entropy_forward`] and overwrites `logits` with `dlogits` as
/// [`cross_entropy_backward`] would write them with `grad_scale`
/// (`None`: `1 / count`, the mean loss's gradient; 0 when `count = 0`).
/// Saves the `[N, V]` gradient buffer, the largest activation of a step.
///
/// Errors (`InvalidArgument`, logits untouched) on an out-of-range label.
pub fn cross_entropy_fused(logits: &mut [f32], labels: &[i32], vocab: usize, grad_scale: Option<f32>) -> Result<CrossEntropy> {
    fused(logits, labels, vocab, grad_scale, None)
}

/// [`cross_entropy_fused`] of soft-capped logits (Gemma 2's
/// `final_logit_softcapping`): the loss of `z' = c·tanh(z/c)` for the raw
/// logits `z` given, whose gradient (with respect to `z`) is written over
/// them: `dz = dz'·(1 − tanh²(z/c))`. One row of scratch per task.
pub fn cross_entropy_fused_softcap(logits: &mut [f32], labels: &[i32], vocab: usize, grad_scale: Option<f32>, cap: f32) -> Result<CrossEntropy> {
    assert!(cap > 0.0, "cross_entropy: the soft cap must be positive");
    fused(logits, labels, vocab, grad_scale, Some(cap))
}

fn fused(logits: &mut [f32], labels: &[i32], vocab: usize, grad_scale: Option<f32>, cap: Option<f32>) -> Result<CrossEntropy> {
    assert!(vocab > 0, "cross_entropy: vocab must be positive");
    assert_eq!(logits.len(), labels.len() * vocab, "cross_entropy: logits is not [N, V]");
    check_labels(labels, vocab)?;
    let count = count_labels(labels);
    let c = grad_scale.unwrap_or(if count == 0 { 0.0 } else { (1.0 / count as f64) as f32 });
    let per = rows_per_task(vocab);
    let partial: Vec<f64> = logits
        .par_chunks_mut(per * vocab)
        .zip(labels.par_chunks(per))
        .map(|(xc, yc)| {
            let mut s = 0f64;
            let mut t = if cap.is_some() { vec![0f32; vocab] } else { Vec::new() };
            for (x, &y) in xc.chunks_exact_mut(vocab).zip(yc) {
                if y == IGNORE_INDEX {
                    x.fill(0.0);
                    continue;
                }
                let Some(cap) = cap else {
                    s += row_fused(x, y as usize, c);
                    continue;
                };
                for (tv, xv) in t.iter_mut().zip(x.iter_mut()) {
                    *tv = vexp::tanh(*xv / cap);
                    *xv = *tv * cap;
                }
                s += row_fused(x, y as usize, c);
                for (xv, &tv) in x.iter_mut().zip(&t) {
                    *xv *= 1.0 - tv * tv;
                }
            }
            s
        })
        .collect();
    Ok(finish(partial.iter().sum(), count))
}

/// Elements per task of the sum of squares; fixed so the partial sums (and
/// so the result) do not depend on the number of threads.
const NORM_CHUNK: usize = 1 << 16;

/// `Σ x²` of one tensor in f64: fixed chunks summed in parallel, partial
/// sums added in chunk order.
fn sum_sq(x: &[f32]) -> f64 {
    let serial = |c: &[f32]| {
        let mut acc = [0f64; 4];
        let mut it = c.chunks_exact(4);
        for q in &mut it {
            for k in 0..4 {
                acc[k] += q[k] as f64 * q[k] as f64;
            }
        }
        let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        for &v in it.remainder() {
            s += v as f64 * v as f64;
        }
        s
    };
    if x.len() <= NORM_CHUNK {
        return serial(x);
    }
    let parts: Vec<f64> = x.par_chunks(NORM_CHUNK).map(serial).collect();
    parts.iter().sum()
}

/// Global L2 norm of a list of gradient tensors, as
/// `torch.nn.utils.get_total_norm(grads, 2.0)`: each tensor's norm
/// `n_k = ‖g_k‖₂` rounded to f32, then `‖(n_1, …, n_K)‖₂` rounded to f32.
/// Sums of squares in f64 (PyTorch: fp32 cascade sums; the difference is
/// within PyTorch's own rounding). Empty list: 0.0. A NaN or ±∞ anywhere
/// gives a non-finite result.
pub fn grad_norm_l2(grads: &[&[f32]]) -> f32 {
    let norms: Vec<f32> = grads.par_iter().map(|g| sum_sq(g).sqrt() as f32).collect();
    let total: f64 = norms.iter().map(|&n| n as f64 * n as f64).sum();
    total.sqrt() as f32
}

/// What [`clip_grad_norm`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipGradNorm {
    /// The global norm before clipping (what `clip_grad_norm_` returns).
    pub total_norm: f32,
    /// `(1 / (total_norm + 1e-6)) · max_norm` in f32 (may be ≥ 1).
    pub clip_coef: f32,
    /// Whether the gradients were scaled (`clip_coef < 1` and the norm finite).
    pub clipped: bool,
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=2.0)`:
/// `total_norm` = [`grad_norm_l2`]; `clip_coef = max_norm / (total_norm + 1e-6)`
/// rounded as PyTorch does it in f32, `(1 / (total_norm + 1e-6)) · max_norm`
/// (the `1e-6` is PyTorch's constant); every element of every tensor is
/// multiplied by `clip_coef` when `clip_coef < 1`.
///
/// Non-finite `total_norm`: PyTorch (with the default
/// `error_if_nonfinite=False`) would multiply by NaN (or by 0 for +∞). Here
/// the gradients are left unchanged and `clipped = false`; the caller sees
/// `!total_norm.is_finite()` and must skip the optimizer step.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> ClipGradNorm {
    let total_norm = {
        let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
        grad_norm_l2(&views)
    };
    let clip_coef = (1.0 / (total_norm + 1e-6)) * max_norm;
    let clipped = total_norm.is_finite() && clip_coef < 1.0;
    if clipped {
        for g in grads.iter_mut() {
            g.par_chunks_mut(NORM_CHUNK).for_each(|c| c.iter_mut().for_each(|x| *x *= clip_coef));
        }
    }
    ClipGradNorm { total_norm, clip_coef, clipped }
}
