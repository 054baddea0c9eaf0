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
//! `exp` is [`vexp::exp`] (within 1 ulp; PyTorch's vectorized CPU SiLU uses
//! Sleef's, within 1 too), so each chunk's loop vectorizes.

use super::vexp::{self, simd_dispatch};
use rayon::prelude::*;

/// Elements per rayon task (see norm.rs: a few microseconds of work).
const TASK_ELEMS: usize = 1 << 14;

/// `silu(g) = g / (1 + exp(−g))`, PyTorch's CPU formula for fp32.
#[inline(always)]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + vexp::exp(-g))
}

#[inline(always)]
fn forward_body(g: &[f32], u: &[f32], h: &mut [f32]) {
    for ((hv, &g), &u) in h.iter_mut().zip(g).zip(u) {
        *hv = silu(g) * u;
    }
}

simd_dispatch! {
    fn forward_chunk(g: &[f32], u: &[f32], h: &mut [f32]) = forward_body
}

#[inline(always)]
fn backward_body(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g.len().min(u.len()).min(dh.len()).min(dg.len()).min(du.len()) {
        (dg[i], du[i]) = swiglu_grad(g[i], u[i], dh[i]);
    }
}

simd_dispatch! {
    fn backward_chunk(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) = backward_body
}

#[inline(always)]
fn backward_inplace_body(g: &mut [f32], u: &mut [f32], dh: &[f32]) {
    for i in 0..g.len().min(u.len()).min(dh.len()) {
        (g[i], u[i]) = swiglu_grad(g[i], u[i], dh[i]);
    }
}

simd_dispatch! {
    fn backward_inplace_chunk(g: &mut [f32], u: &mut [f32], dh: &[f32]) = backward_inplace_body
}

/// SwiGLU forward: `h = silu(gate) · up`, elementwise.
pub fn swiglu_forward(gate: &[f32], up: &[f32], h: &mut [f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up differ in length");
    assert_eq!(gate.len(), h.len(), "swiglu: h differs in length");
    h.par_chunks_mut(TASK_ELEMS)
        .zip(gate.par_chunks(TASK_ELEMS))
        .zip(up.par_chunks(TASK_ELEMS))
        .for_each(|((hc, gc), uc)| forward_chunk(gc, uc, hc));
}

/// The two gradients at one element: `(dgate, dup)` for `h = silu(g)·u`.
#[inline(always)]
fn swiglu_grad(g: f32, u: f32, dh: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + vexp::exp(-g));
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
        .for_each(|((dgc, duc), ((gc, uc), dhc))| backward_chunk(gc, uc, dhc, dgc, duc));
}

/// [`swiglu_backward`] in place: on return `gate` holds `dgate` and `up`
/// holds `dup`, so the backward needs no buffers beyond the forward's.
pub fn swiglu_backward_inplace(gate: &mut [f32], up: &mut [f32], dh: &[f32]) {
    let n = gate.len();
    assert!(up.len() == n && dh.len() == n, "swiglu: lengths differ");
    gate.par_chunks_mut(TASK_ELEMS)
        .zip(up.par_chunks_mut(TASK_ELEMS))
        .zip(dh.par_chunks(TASK_ELEMS))
        .for_each(|((gc, uc), dhc)| backward_inplace_chunk(gc, uc, dhc));
}

// ---------------------------------------------------------------------------
// GeGLU (Gemma): `h = gelu_tanh(g) · u`.
//
// PyTorch's `gelu(x, approximate="tanh")` on the CPU, fp32:
//   inner = β·(x + κ·x³),  β = √2·(2/√π)·½ = √(2/π),  κ = 0.044715
//   gelu  = ½·x·(1 + tanh(inner))
//   gelu' = ½·(1 + tanh(inner)) + ½·x·(1 − tanh²(inner))·β·(1 + 3κ·x²)
// ---------------------------------------------------------------------------

const GELU_BETA: f32 = (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
const GELU_KAPPA: f32 = 0.044715;

/// PyTorch's tanh-approximated GELU of one value.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let inner = GELU_BETA * (x + GELU_KAPPA * (x * x * x));
    0.5 * x * (1.0 + vexp::tanh(inner))
}

/// Its derivative, in PyTorch's `GeluBackward` order.
#[inline(always)]
fn gelu_tanh_grad(x: f32) -> f32 {
    let x_sq = x * x;
    let inner = GELU_BETA * (x + GELU_KAPPA * (x_sq * x));
    let t = vexp::tanh(inner);
    let left = 0.5 * x;
    let right = 1.0 + t;
    let left_derivative = 0.5 * right;
    let right_derivative = left * (1.0 - t * t) * (GELU_BETA * (1.0 + 3.0 * GELU_KAPPA * x_sq));
    left_derivative + right_derivative
}

#[inline(always)]
fn geglu_forward_body(g: &[f32], u: &[f32], h: &mut [f32]) {
    for ((hv, &g), &u) in h.iter_mut().zip(g).zip(u) {
        *hv = gelu_tanh(g) * u;
    }
}

simd_dispatch! {
    fn geglu_forward_chunk(g: &[f32], u: &[f32], h: &mut [f32]) = geglu_forward_body
}

#[inline(always)]
fn geglu_backward_body(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g.len().min(u.len()).min(dh.len()).min(dg.len()).min(du.len()) {
        dg[i] = (dh[i] * u[i]) * gelu_tanh_grad(g[i]);
        du[i] = dh[i] * gelu_tanh(g[i]);
    }
}

simd_dispatch! {
    fn geglu_backward_chunk(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) = geglu_backward_body
}

/// GeGLU forward: `h = gelu_tanh(gate) · up`, elementwise.
pub fn geglu_forward(gate: &[f32], up: &[f32], h: &mut [f32]) {
    assert!(gate.len() == up.len() && gate.len() == h.len(), "geglu: lengths differ");
    h.par_chunks_mut(TASK_ELEMS).zip(gate.par_chunks(TASK_ELEMS)).zip(up.par_chunks(TASK_ELEMS)).for_each(|((hc, gc), uc)| geglu_forward_chunk(gc, uc, hc));
}

/// GeGLU backward: `dup = dh · gelu_tanh(gate)`,
/// `dgate = gelu_tanh'(gate) · (dh · up)`. Both written.
pub fn geglu_backward(gate: &[f32], up: &[f32], dh: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let n = gate.len();
    assert!(up.len() == n && dh.len() == n && dgate.len() == n && dup.len() == n, "geglu: lengths differ");
    dgate
        .par_chunks_mut(TASK_ELEMS)
        .zip(dup.par_chunks_mut(TASK_ELEMS))
        .zip(gate.par_chunks(TASK_ELEMS).zip(up.par_chunks(TASK_ELEMS)).zip(dh.par_chunks(TASK_ELEMS)))
        .for_each(|((dgc, duc), ((gc, uc), dhc))| geglu_backward_chunk(gc, uc, dhc, dgc, duc));
}

/// The gated MLP's middle for either activation: `h = act(gate) · up`.
pub fn glu_forward(act: crate::model::config::Activation, gate: &[f32], up: &[f32], h: &mut [f32]) {
    match act {
        crate::model::config::Activation::Silu => swiglu_forward(gate, up, h),
        crate::model::config::Activation::GeluTanh => geglu_forward(gate, up, h),
    }
}

/// Backward of [`glu_forward`].
pub fn glu_backward(act: crate::model::config::Activation, gate: &[f32], up: &[f32], dh: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    match act {
        crate::model::config::Activation::Silu => swiglu_backward(gate, up, dh, dgate, dup),
        crate::model::config::Activation::GeluTanh => geglu_backward(gate, up, dh, dgate, dup),
    }
}
