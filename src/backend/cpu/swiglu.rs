//! SwiGLU gating of the LLaMA MLP, forward and backward, fp32.
//!
//! transformers `LlamaMLP.forward`: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`
//! with `act_fn = silu`. This file is the elementwise middle:
//!
//! ```text
//!   σ(g)    = 1 / (1 + exp(−g))
//!   silu(g) = g · σ(g)                 (PyTorch CPU: g / (1 + exp(−g)))
//!   h       = silu(g) · u
//!   du      = dh · silu(g)
//!   dg      = (dh · u) · σ(g) · (1 + g · (1 − σ(g)))   (PyTorch silu_backward)
//! ```
//!
//! All tensors share one shape (any, flattened; typically `[tokens, inter]`).
//! Memory traffic: forward reads 2, writes 1 value per element; backward
//! reads 3, writes 2. Split over the rayon pool in chunks of `TASK_ELEMS` (16 Ki).

use rayon::prelude::*;

/// Elements per rayon task (see norm.rs: a few microseconds of work).
const TASK_ELEMS: usize = 1 << 14;

/// `silu(g) = g / (1 + exp(−g))`, PyTorch's CPU formula for fp32.
#[inline]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// SwiGLU forward: `h = silu(gate) · up`, elementwise.
pub fn swiglu_forward(gate: &[f32], up: &[f32], h: &mut [f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up differ in length");
    assert_eq!(gate.len(), h.len(), "swiglu: h differs in length");
    h.par_chunks_mut(TASK_ELEMS)
        .zip(gate.par_chunks(TASK_ELEMS))
        .zip(up.par_chunks(TASK_ELEMS))
        .for_each(|((hc, gc), uc)| {
            for ((hv, &g), &u) in hc.iter_mut().zip(gc).zip(uc) {
                *hv = silu(g) * u;
            }
        });
}

/// The two gradients at one element: `(dgate, dup)` for `h = silu(g)·u`.
#[inline]
fn swiglu_grad(g: f32, u: f32, dh: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-g).exp());
    let dsilu = dh * u;
    (dsilu * s * (1.0 + g * (1.0 - s)), dh * silu(g))
}

/// SwiGLU backward: `dup = dh · silu(gate)`,
/// `dgate = (dh · up) · σ(gate) · (1 + gate · (1 − σ(gate)))`. Both written.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dh: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let n = gate.len();
    assert!(up.len() == n && dh.len() == n && dgate.len() == n && dup.len() == n, "swiglu: lengths differ");
    dgate
        .par_chunks_mut(TASK_ELEMS)
        .zip(dup.par_chunks_mut(TASK_ELEMS))
        .zip(gate.par_chunks(TASK_ELEMS).zip(up.par_chunks(TASK_ELEMS)).zip(dh.par_chunks(TASK_ELEMS)))
        .for_each(|((dgc, duc), ((gc, uc), dhc))| {
            for i in 0..gc.len() {
                (dgc[i], duc[i]) = swiglu_grad(gc[i], uc[i], dhc[i]);
            }
        });
}

/// [`swiglu_backward`] in place: on return `gate` holds `dgate` and `up`
/// holds `dup`, so the backward needs no buffers beyond the forward's.
pub fn swiglu_backward_inplace(gate: &mut [f32], up: &mut [f32], dh: &[f32]) {
    let n = gate.len();
    assert!(up.len() == n && dh.len() == n, "swiglu: lengths differ");
    gate.par_chunks_mut(TASK_ELEMS)
        .zip(up.par_chunks_mut(TASK_ELEMS))
        .zip(dh.par_chunks(TASK_ELEMS))
        .for_each(|((gc, uc), dhc)| {
            for i in 0..gc.len() {
                (gc[i], uc[i]) = swiglu_grad(gc[i], uc[i], dhc[i]);
            }
        });
}
