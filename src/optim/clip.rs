//! Gradient clipping by global norm (`torch.nn.utils.clip_grad_norm_`,
//! norm_type 2, error_if_nonfinite False; torch 2.15
//! torch/nn/utils/clip_grad.py `_get_total_norm` lines 90–107 and
//! `_clip_grads_with_norm_` lines 164–181) and the finiteness guard that
//! refuses an optimizer step.
//!
//! ```text
//! norm_i     = f32(‖g_i‖₂)                      per tensor (vector_norm)
//! total      = f32(‖[norm_0, norm_1, …]‖₂)      (vector_norm of the stack)
//! clip_coef  = f32(max_norm) · (1 / (total + f32(1e-6)))   (fp32; Tensor.__rtruediv__
//!                                               is `reciprocal() * other`)
//! coef       = min(clip_coef, 1.0)             (torch.clamp(max=1.0))
//! g_i       ← g_i · coef                        (always; ·1.0 is exact)
//! ```
//! and the pre-clip `total` is returned.
//!
//! Norms: PyTorch accumulates each 2-norm in fp32 over SIMD lanes, so its
//! last bit depends on the CPU's vector width. Here the sum of squares is
//! accumulated in `f64` (exact products, 29 more bits per addition) over
//! fixed chunks, then square-rooted and rounded to `f32`: within 1 ulp of
//! PyTorch on the fixtures, usually equal, and independent of the number
//! of threads. The clip coefficient follows from the norm with PyTorch's
//! fp32 operations exactly.
//!
//! Non-finite gradients: where the total norm is NaN or infinite, PyTorch
//! would scale every gradient by NaN or 0; here the gradients are left as
//! they are (the step must be refused anyway, by [`check_finite`], and the
//! untouched values say which tensor went bad), and the norm is returned.

use super::TASK_ELEMS;
use crate::backend::cpu::loss::{clip_grad_norm as backend_clip, grad_norm_l2};
use crate::backend::cpu::reduce::all_finite;
use crate::error::Result;
use rayon::prelude::*;

/// `‖x‖₂` rounded to `f32` (the backend's f64-accumulated norm, which
/// does not depend on the thread count).
pub fn tensor_norm(x: &[f32]) -> f32 {
    grad_norm_l2(&[x])
}

/// The global 2-norm of `grads`, as `clip_grad_norm_` computes it: the norm
/// of the vector of the per-tensor fp32 norms. 0 for no tensors.
pub fn grad_norm(grads: &[&[f32]]) -> f32 {
    grad_norm_l2(grads)
}

/// `clip_grad_norm_(params, max_norm)`: scales all gradients by
/// `min(1, max_norm / (total + 1e-6))` (in PyTorch's fp32 order of
/// operations, `backend::cpu::loss::clip_grad_norm`) and returns the
/// pre-clip total norm. Gradients stay untouched where the norm is not
/// finite (see the module docs).
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> Result<f32> {
    if !(max_norm.is_finite() && max_norm >= 0.0) {
        bail!(InvalidArgument, "max_norm must be finite and >= 0, got {max_norm}");
    }
    Ok(backend_clip(grads, max_norm as f32).total_norm)
}

/// Refuses a step: `NonFinite` when `loss` (if given) or any gradient
/// element is NaN or infinite, naming the first offending tensor and
/// element. Reads only.
pub fn check_finite(loss: Option<f32>, grads: &[&[f32]]) -> Result<()> {
    if let Some(l) = loss {
        if !l.is_finite() {
            bail!(NonFinite, "loss is {l}: refusing the optimizer step");
        }
    }
    for (i, g) in grads.iter().enumerate() {
        let bad = if g.len() <= TASK_ELEMS {
            !all_finite(g)
        } else {
            !g.par_chunks(TASK_ELEMS).all(all_finite)
        };
        if bad {
            let (j, x) = g.iter().enumerate().find(|(_, x)| !x.is_finite()).expect("found above");
            bail!(NonFinite, "gradient of tensor {i} is {x} at element {j}: refusing the optimizer step");
        }
    }
    Ok(())
}
