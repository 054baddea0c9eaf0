//! Launchers for `cuda/loss.cu`: fused cross-entropy (forward + backward in
//! place over the logits) and the global L2 gradient norm with clipping,
//! twins of [`crate::backend::cpu::loss`]'s `cross_entropy_fused`,
//! `grad_norm_l2` and `clip_grad_norm`.
//!
//! Agreement with the CPU: cross-entropy differs by CUDA's `expf` (≤ 2 ulp
//! against libm's < 1 ulp) and the order of its f64 sums: the loss within
//! [`CE_LOSS_TOL`] (absolute, per counted row on average), each gradient
//! element within [`ce_grad_tol`]. With a soft cap (Gemma 2's
//! `final_logit_softcapping`, the twin of `cross_entropy_fused_softcap`)
//! each capped logit also differs by CUDA's `tanhf` against `vexp::tanh`
//! (within [`softcap_tol`]): the loss within [`ce_loss_tol_softcap`], each
//! gradient element within [`ce_grad_tol_softcap`]. The gradient norm differs only in the
//! order of f64 sums, then rounded to f32: within [`NORM_REL_TOL`]; the
//! clipping decision and coefficient follow from the norm, and a clipped
//! gradient is within one rounding of `g·coef` with the GPU's coefficient.
//!
//! `*_async` functions only queue work and leave their results in a small
//! device buffer; the others wait and return host values, as the CPU ops.

use super::{launch_cfg, scratch, stride_grid, CudaDevice, LOSS_CU};
use crate::backend::cpu::loss::{ClipGradNorm, CrossEntropy};
use crate::error::Result;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// Threads per block of the fused cross-entropy (`LOSS_THREADS`).
const LOSS_THREADS: u32 = 512;
/// Threads of the one-block kernels (`LOSS_CHECK_THREADS`).
const LOSS_CHECK_THREADS: u32 = 1024;
/// Threads per block of the sum of squares and clipping (`LOSS_NORM_THREADS`).
const LOSS_NORM_THREADS: u32 = 256;
/// Partial sums per tensor (`LOSS_NORM_BLOCKS`).
const LOSS_NORM_BLOCKS: u32 = 128;

/// One f32 ulp, relative (2⁻²³).
const ULP: f64 = 1.0 / (1u64 << 23) as f64;

/// Cross-entropy loss, absolute: each `exp` may differ by 3 ulp, so the
/// row sum by 3 ulp relative and its log by 3·2⁻²³ absolute; f64 sums add
/// nothing visible. The mean is then rounded to f32 (one ulp of the loss).
pub const CE_LOSS_TOL: f64 = 4.0 * ULP;

/// Bound on one gradient element, `|d_gpu − d_cpu| ≤ ce_grad_tol(c, p, is_label)`
/// with `c` the scale and `p` the softmax probability: `exp` (3 ulp), the
/// reciprocal of the sum (1 rounding that may differ), two products and,
/// at the label, the subtraction of `c` (1 ulp of `|c|`).
pub fn ce_grad_tol(c: f32, p: f64, is_label: bool) -> f64 {
    let c = c.abs() as f64;
    8.0 * ULP * c * p + if is_label { 2.0 * ULP * c } else { 0.0 } + f64::from(f32::MIN_POSITIVE)
}

/// Bound on one soft-capped logit, `|z'_gpu − z'_cpu| ≤ softcap_tol(z', cap)`
/// for `z' = f32(f32(tanh(f32(z/cap)))·cap)` (the loss kernels' cap and
/// `elementwise::softcap` against the CPU's `vexp::tanh(z / c) * c`). The
/// division is IEEE on both sides (the same quotient `q`); `tanhf` and
/// `vexp::tanh` are each within 2 ulp of `tanh(q)`, so they differ by at
/// most 4 ulp of `t`, 4·2⁻²³·|t|; the product by `cap` scales that to
/// 4·2⁻²³·|z'| and each side's rounding of it adds half an ulp of `z'`:
/// 5·2⁻²³·|z'| in all (at most 5·2⁻²³·`cap`, as `|z'| ≤ cap`). The
/// absolute term covers a subnormal `t` (ulps of 2⁻¹⁴⁹, times `cap`).
pub fn softcap_tol(capped: f64, cap: f32) -> f64 {
    5.0 * ULP * capped.abs() + f64::from(f32::MIN_POSITIVE) * cap as f64
}

/// Cross-entropy loss of soft-capped logits, absolute (per counted row on
/// average, as [`CE_LOSS_TOL`]). The loss is `log Σ_j exp(z'_j − m) −
/// (z'_y − m)`, which does not depend on `m` but through roundings, so the
/// two sides differ by:
/// - [`CE_LOSS_TOL`] for the same capped logits (`exp`, the f64 sums, the
///   final rounding);
/// - each capped logit moving by `δ ≤ 5·2⁻²³·cap` ([`softcap_tol`]): the
///   exact loss moves by at most `Σ_j p_j·δ + δ ≤ 2δ` (its gradient
///   `p − onehot(y)` has an l1 norm ≤ 2), 10·2⁻²³·`cap`;
/// - the roundings of `z'_j − m` in fp32 (`|z'_j − m| ≤ 2·cap`, half an
///   ulp each, at most 2⁻²³·`cap`) were the same on both sides for the
///   same inputs and no longer are: up to 2·2⁻²³·`cap` in each exponent,
///   so in `log Σ` (the label's `z'_y − m` is exact in f64).
///
/// 12·2⁻²³·`cap` more in all (first order: the exponentials' second-order
/// terms are below 2⁻⁴⁰ relative for `cap` up to a few thousand).
pub fn ce_loss_tol_softcap(cap: f32) -> f64 {
    CE_LOSS_TOL + 12.0 * ULP * cap as f64
}

/// Bound on one gradient element of the soft-capped cross-entropy,
/// `|d_gpu − d_cpu| ≤ ce_grad_tol_softcap(c, p, is_label, t, cap)` with
/// `c` the scale, `p` the softmax probability of the capped logits,
/// `t = tanh(z/cap)` of the raw logit. Each side stores
/// `f32(dz'·f)`, `f = f32(1 − f32(t²))`:
/// - `dz'` (the uncapped kernel's value on the capped logits) differs by
///   [`ce_grad_tol`] for the same capped logits, plus the capped logits'
///   own difference: `log p_j = z'_j − log Σ_k exp(z'_k)` moves by at most
///   twice the largest move of one exponent (7·2⁻²³·`cap`: [`softcap_tol`]
///   and the roundings of `z'_j − m`, as in [`ce_loss_tol_softcap`]), so
///   `p` by 14·2⁻²³·`cap`·`p` relative, and `dz' = c·(p − [label])` by
///   `|c|`·that;
/// - `f`: the two `t` differ by 4·2⁻²³·|t| ([`softcap_tol`]), so `t²` by
///   8·2⁻²³·t², plus each side's rounding of `t²` (half an ulp) and of
///   `1 − t²` (half an ulp of `f`): `|Δf| ≤ 9·2⁻²³·t² + 2⁻²³·f ≤ 9·2⁻²³`
///   (as `t² + f = 1`). Absolute, not relative: where `tanh` saturates
///   (`t` within an ulp or two of ±1) `f` is 0 on one side and a few ulp
///   of 1 on the other, so the bound there is `|dz'|·9·2⁻²³`, not 0;
/// - the product: `|Δd| ≤ |Δdz'|·(f + |Δf|) + |dz'|·|Δf|` and each
///   side's rounding, half an ulp of `|dz'|·f`, with `|dz'| ≤
///   |c|·(p + [label])`.
///
/// For logits far below the cap (`t → 0`, `f → 1`) it tends to
/// [`ce_grad_tol`] plus the terms above; where `f → 0` to the `|Δf|` term.
pub fn ce_grad_tol_softcap(c: f32, p: f64, is_label: bool, t: f64, cap: f32) -> f64 {
    let ca = c.abs() as f64;
    let f = (1.0 - t * t).max(0.0);
    let df = 9.0 * ULP;
    let ddz = ce_grad_tol(c, p, is_label) + 14.0 * ULP * cap as f64 * ca * p;
    let dz = ca * (p + if is_label { 1.0 } else { 0.0 });
    ddz * (f + df) + dz * (df + ULP * (f + df)) + f64::from(f32::MIN_POSITIVE)
}

/// Gradient norm, relative: each per-tensor norm and the total are f64
/// sums rounded to f32; their order differs from the CPU's, which may move
/// each rounding by one ulp (twice in all, plus room).
pub const NORM_REL_TOL: f64 = 3.0 * ULP;

// ------------------------------------------------------------ cross-entropy

mod sealed {
    /// Only fp32 and bf16 logits ([`super::LogitElem`]).
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
}

/// The element type of the logits [`cross_entropy_fused_async`] works on in
/// place: fp32, or bf16 bits (`u16`: each logit widened exactly, the same
/// arithmetic, each gradient rounded to bf16 as it is stored — the fp32
/// kernel's bits on the widened logits, rounded). Sealed: the launcher
/// trusts its kernel name and element size.
pub trait LogitElem: cudarc::driver::DeviceRepr + sealed::Sealed {
    const KERNEL: &'static str;
}

impl LogitElem for f32 {
    const KERNEL: &'static str = "loss_ce_fused_f32";
}

impl LogitElem for u16 {
    const KERNEL: &'static str = "loss_ce_fused_bf16";
}

/// Fused cross-entropy, queued without a sync: as `cpu::loss::cross_entropy_fused`,
/// overwrites `logits` (`[rows, vocab]`) with the gradient scaled by
/// `grad_scale` (`None`: `1/count`, the mean loss's) and writes `out` (3
/// f64): `[Σ ℓ_i, count, first bad row or −1]`. With `softcap`
/// `Some(cap)`, as `cpu::loss::cross_entropy_fused_softcap`: the loss of
/// `cap·tanh(z/cap)`, the gradient with respect to the raw `z` (a cap that
/// is not finite and positive is `InvalidArgument`). A label neither −100
/// nor in `[0, vocab)` leaves `logits` untouched (`out[2] ≥ 0`). Scratch:
/// `rows` f64 and 2 u32, freed in stream order.
pub fn cross_entropy_fused_async<T: LogitElem>(
    dev: &CudaDevice,
    logits: &mut CudaViewMut<'_, T>,
    labels: &CudaView<'_, i32>,
    vocab: usize,
    grad_scale: Option<f32>,
    softcap: Option<f32>,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    let cap = super::cap_arg("cross_entropy", softcap)?;
    let rows = labels.len();
    if vocab == 0 || vocab > i32::MAX as usize || rows > i32::MAX as usize {
        bail!(InvalidShape, "cross_entropy: vocab {vocab} must be in 1..=2^31-1 and rows {rows} at most 2^31-1");
    }
    let n = rows.checked_mul(vocab).ok_or_else(|| err!(InvalidShape, "cross_entropy [{rows}, {vocab}] overflows"))?;
    if logits.len() != n {
        bail!(BufferSize, "cross_entropy: logits has {} elements, [{rows}, {vocab}] needs {n}", logits.len());
    }
    if out.len() != 3 {
        bail!(BufferSize, "cross_entropy: out needs 3 elements, has {}", out.len());
    }
    dev.check_stream(logits, "cross_entropy logits")?;
    dev.check_stream(labels, "cross_entropy labels")?;
    dev.check_stream(out, "cross_entropy out")?;
    let mut status = scratch::<u32>(dev, 2)?;
    let mut row_loss = scratch::<f64>(dev, rows)?;
    let (r32, v32) = (rows as u32, vocab as u32);
    let name = "loss_ce_check_labels";
    let f = dev.function(&LOSS_CU, name)?;
    // SAFETY: (ptr, u32, u32, ptr) as the kernel; one block reads
    // labels[< rows] and writes status[0..2] (2 allocated).
    launch_kernel!(dev, f, name, launch_cfg((1, 1), LOSS_CHECK_THREADS), [labels, &r32, &v32, &mut status])?;
    if rows > 0 {
        let (mean, scale) = match grad_scale {
            Some(c) => (0u32, c),
            None => (1u32, 0.0f32),
        };
        let name = T::KERNEL;
        let f = dev.function(&LOSS_CU, name)?;
        // SAFETY: (ptr, ptr, u32, u32, ptr, f32, u32, ptr, f32) as the
        // kernel; block `row` < rows touches logits row `row`, labels[row]
        // (a valid index, else the kernel returns before touching logits:
        // it reads status written above) and row_loss[row] (rows
        // allocated).
        launch_kernel!(dev, f, name, launch_cfg((r32, 1), LOSS_THREADS), [logits, labels, &r32, &v32, &status, &scale, &mean, &mut row_loss, &cap])?;
    }
    let name = "loss_ce_finish";
    let f = dev.function(&LOSS_CU, name)?;
    // SAFETY: (ptr, u32, ptr, ptr) as the kernel; reads row_loss[< rows]
    // (all written when status says the labels are valid, else not read)
    // and status, writes out[0..3] (length 3 checked).
    launch_kernel!(dev, f, name, launch_cfg((1, 1), LOSS_CHECK_THREADS), [&row_loss, &r32, &status, out])
}

/// [`cross_entropy_fused_async`], then waits and returns what
/// `cpu::loss::cross_entropy_fused` (with `softcap`,
/// `cross_entropy_fused_softcap`) returns; an invalid label is
/// `InvalidArgument` with `logits` untouched.
pub fn cross_entropy_fused(dev: &CudaDevice, logits: &mut CudaViewMut<'_, f32>, labels: &CudaView<'_, i32>, vocab: usize, grad_scale: Option<f32>, softcap: Option<f32>) -> Result<CrossEntropy> {
    let mut out = dev.alloc_filled::<f64>(3, 0xFF)?;
    cross_entropy_fused_async(dev, logits, labels, vocab, grad_scale, softcap, &mut out.as_view_mut())?;
    let o = dev.download(&out)?;
    if o[2] >= 0.0 {
        let row = o[2] as usize;
        let y = dev.download(&labels.slice(row..row + 1))?[0];
        bail!(InvalidArgument, "cross_entropy: label {y} at row {row} is neither -100 nor in [0, {vocab})");
    }
    let (sum, count) = (o[0], o[1] as usize);
    let loss = if count == 0 { 0.0 } else { (sum / count as f64) as f32 };
    Ok(CrossEntropy { loss, count, sum })
}

// ---------------------------------------------------------- gradient norm

/// Queues the global L2 norm of `grads` and, when `clip` is
/// `Some(max_norm)`, the clipping of every tensor by
/// `clip_coef = f32(1/(total + 1e-6))·max_norm` when `total` is finite and
/// `clip_coef < 1` (decided on the device). `out` (3 f32) receives
/// `[total_norm, clip_coef, clipped as 0/1]`.
fn norm_and_clip_async(dev: &CudaDevice, grads: &mut [CudaViewMut<'_, f32>], clip: Option<f32>, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
    {
        let views: Vec<CudaView<'_, f32>> = grads.iter().map(|g| g.slice(..)).collect();
        norm_total_async(dev, &views, clip, out)?;
    }
    if clip.is_some() {
        for g in grads.iter_mut() {
            clip_scale_async(dev, g, out)?;
        }
    }
    Ok(())
}

/// The clipping of [`clip_grad_norm_async`] for gradient tensors that sit
/// in one buffer: `spans` name each tensor's range in `flat` (the norm is
/// the norm of the per-tensor norms, as for separate tensors), and the
/// scaling is one launch over the whole buffer (the same coefficient for
/// every element, so the same values as per tensor). Elements of `flat`
/// outside every span are scaled too.
pub fn clip_grad_norm_flat_async(dev: &CudaDevice, flat: &mut CudaViewMut<'_, f32>, spans: &[std::ops::Range<usize>], max_norm: Option<f32>, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
    if let Some(r) = spans.iter().find(|r| r.start > r.end || r.end > flat.len()) {
        bail!(BufferSize, "grad_norm: span {r:?} is outside a buffer of {} elements", flat.len());
    }
    if (1..=65535).contains(&spans.len()) {
        // Every tensor's partial sums in one launch (grid.y: the tensor).
        check_norm_out(out, spans.len())?;
        dev.check_stream(flat, "gradient buffer")?;
        let table: Vec<u64> = spans.iter().flat_map(|r| [r.start as u64, (r.end - r.start) as u64]).collect();
        let table = dev.upload(&table)?;
        let nb = LOSS_NORM_BLOCKS as usize;
        let mut partial = scratch::<f64>(dev, spans.len() * nb)?;
        let name = "loss_sumsq_partial_spans_f32";
        let f = dev.function(&LOSS_CU, name)?;
        let g = flat.slice(..);
        // SAFETY: (ptr, ptr, ptr) as the kernel; block (b, t) reads
        // g[start_t .. start_t + len_t] (inside flat: checked above) and
        // writes partial[t·nb + b].
        launch_kernel!(dev, f, name, launch_cfg((LOSS_NORM_BLOCKS, spans.len() as u32), LOSS_NORM_THREADS), [&g, &table, &mut partial])?;
        norm_finish_async(dev, &partial, spans.len(), max_norm, out)?;
    } else {
        let views: Vec<CudaView<'_, f32>> = spans.iter().map(|r| flat.slice(r.clone())).collect();
        norm_total_async(dev, &views, max_norm, out)?;
    }
    if max_norm.is_some() {
        clip_scale_async(dev, flat, out)?;
    }
    Ok(())
}

/// Per-tensor norms and their total into `out` = `[norm, clip_coef,
/// clipped]` (`clip` None: no clipping decided).
fn norm_total_async(dev: &CudaDevice, grads: &[CudaView<'_, f32>], clip: Option<f32>, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
    check_norm_out(out, grads.len())?;
    for (k, g) in grads.iter().enumerate() {
        dev.check_stream(g, &format!("gradient tensor {k}"))?;
    }
    let k = grads.len();
    let nb = LOSS_NORM_BLOCKS as usize;
    let mut partial = scratch::<f64>(dev, k * nb)?;
    let name = "loss_sumsq_partial_f32";
    let f = dev.function(&LOSS_CU, name)?;
    for (i, gv) in grads.iter().enumerate() {
        let n64 = gv.len() as u64;
        let mut part = partial.slice_mut(i * nb..(i + 1) * nb);
        // SAFETY: (ptr, u64, ptr) as the kernel; LOSS_NORM_BLOCKS blocks
        // read g[< n] and block b writes part[b] (LOSS_NORM_BLOCKS long).
        launch_kernel!(dev, f, name, launch_cfg((LOSS_NORM_BLOCKS, 1), LOSS_NORM_THREADS), [gv, &n64, &mut part])?;
    }
    norm_finish_async(dev, &partial, k, clip, out)
}

/// `out` holds the norm's triple, and `tensors` is within the kernels' reach.
fn check_norm_out(out: &CudaViewMut<'_, f32>, tensors: usize) -> Result<()> {
    if out.len() != 3 {
        bail!(BufferSize, "grad_norm: out needs 3 elements, has {}", out.len());
    }
    if tensors > (1 << 20) {
        bail!(InvalidArgument, "grad_norm: {tensors} tensors is more than 2^20");
    }
    Ok(())
}

/// From the `k` tensors' partial sums (LOSS_NORM_BLOCKS each, in tensor
/// order): the per-tensor norms, then the total and the clip decision in
/// `out`.
fn norm_finish_async(dev: &CudaDevice, partial: &CudaSlice<f64>, k: usize, clip: Option<f32>, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
    dev.check_stream(out, "grad_norm out")?;
    let mut norms = scratch::<f32>(dev, k)?;
    if k > 0 {
        let name = "loss_gradnorm_tensor";
        let f = dev.function(&LOSS_CU, name)?;
        // SAFETY: (ptr, ptr) as the kernel; block i < k reads partial[i·nb
        // + t] for t < nb (all written above) and writes norms[i].
        launch_kernel!(dev, f, name, launch_cfg((k as u32, 1), LOSS_NORM_BLOCKS), [partial, &mut norms])?;
    }
    let (k32, max_norm) = (k as u32, clip.unwrap_or(f32::INFINITY));
    let name = "loss_gradnorm_total";
    let f = dev.function(&LOSS_CU, name)?;
    // SAFETY: (ptr, u32, f32, ptr) as the kernel; one thread reads
    // norms[< k] and writes out[0..3] (length checked).
    launch_kernel!(dev, f, name, launch_cfg((1, 1), 32), [&norms, &k32, &max_norm, &mut *out])
}

/// Scales `g` by the clip coefficient the device decided in `out`.
fn clip_scale_async(dev: &CudaDevice, g: &mut CudaViewMut<'_, f32>, out: &CudaViewMut<'_, f32>) -> Result<()> {
    dev.check_stream(g, "gradient tensor")?;
    let n64 = g.len() as u64;
    if n64 == 0 {
        return Ok(());
    }
    let name = "loss_clip_scale_f32";
    let f = dev.function(&LOSS_CU, name)?;
    let o = out.slice(..);
    // SAFETY: (ptr, u64, ptr) as the kernel; elements < n of g, and
    // out[1..3].
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, LOSS_NORM_THREADS), 1), LOSS_NORM_THREADS), [&mut *g, &n64, &o])
}

/// Queues the global L2 norm of `grads` (as `cpu::loss::grad_norm_l2`)
/// into `out` (3 f32; `out[0]` is the norm).
pub fn grad_norm_l2_async(dev: &CudaDevice, grads: &[CudaView<'_, f32>], out: &mut CudaViewMut<'_, f32>) -> Result<()> {
    norm_total_async(dev, grads, None, out)
}

/// `cpu::loss::grad_norm_l2` on the device: waits and returns the norm.
pub fn grad_norm_l2(dev: &CudaDevice, grads: &[CudaView<'_, f32>]) -> Result<f32> {
    let mut out = dev.alloc_filled::<f32>(3, 0xFF)?;
    grad_norm_l2_async(dev, grads, &mut out.as_view_mut())?;
    Ok(dev.download(&out)?[0])
}

/// Queues `cpu::loss::clip_grad_norm`: the norm, then every tensor scaled
/// when the device decides to clip; `out` (3 f32) receives
/// `[total_norm, clip_coef, clipped as 0/1]`. No sync.
pub fn clip_grad_norm_async(dev: &CudaDevice, grads: &mut [CudaViewMut<'_, f32>], max_norm: f32, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
    norm_and_clip_async(dev, grads, Some(max_norm), out)
}

/// `cpu::loss::clip_grad_norm` on the device: waits and returns what it did.
pub fn clip_grad_norm(dev: &CudaDevice, grads: &mut [CudaViewMut<'_, f32>], max_norm: f32) -> Result<ClipGradNorm> {
    let mut out: CudaSlice<f32> = dev.alloc_filled(3, 0xFF)?;
    clip_grad_norm_async(dev, grads, max_norm, &mut out.as_view_mut())?;
    let o = dev.download(&out)?;
    Ok(ClipGradNorm { total_norm: o[0], clip_coef: o[1], clipped: o[2] != 0.0 })
}

#[cfg(test)]
mod tests {
    #[test]
    fn launch_constants_match_the_kernel() {
        let src = include_str!("../../../cuda/loss.cu");
        for (name, v) in [
            ("LOSS_THREADS", super::LOSS_THREADS),
            ("LOSS_CHECK_THREADS", super::LOSS_CHECK_THREADS),
            ("LOSS_NORM_THREADS", super::LOSS_NORM_THREADS),
            ("LOSS_NORM_BLOCKS", super::LOSS_NORM_BLOCKS),
        ] {
            let pre = format!("#define {name} ");
            let line = src.lines().find(|l| l.starts_with(&pre)).expect("#define in loss.cu");
            assert_eq!(line[pre.len()..].trim(), v.to_string());
        }
    }
}
