//! Launchers for `cuda/swiglu.cu`: SwiGLU and GeGLU (Gemma's tanh-GELU
//! gate; every launcher takes the [`Activation`]) forward and backward,
//! fp32, twins of [`crate::backend::cpu::swiglu`]. Same roundings in the
//! same order; the only difference is CUDA's `expf` / `tanhf` (≤ 2 ulp)
//! against the CPU's (< 1 ulp; `vexp::tanh` ≤ 1.46 ulp), so agreement is
//! within [`h_tol`], [`dup_tol`] and [`dgate_tol`], not bit for bit.

use super::{launch_cfg, out_ptr, stride_grid, CudaDevice, SWIGLU_CU};
use crate::error::Result;
pub use crate::model::config::Activation;
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr};

/// The kernels' `act` argument: 0 SwiGLU (`silu`), 1 GeGLU (tanh-GELU).
fn act_code(act: Activation) -> u32 {
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    }
}

/// Threads per block (`SWIGLU_THREADS` in swiglu.cu).
const SWIGLU_THREADS: u32 = 256;

/// One f32 ulp, relative (2⁻²³).
const ULP: f64 = 1.0 / (1u64 << 23) as f64;

/// `h = silu(g)·u`, relative: the two expf results differ by up to 3 ulp
/// of `e = exp(−g)`, which moves `g/(1+e)` by at most as much relatively;
/// the CPU and GPU each round `1+e`, the division and the product once.
pub const H_REL_TOL: f64 = 8.0 * ULP;
/// `dup = dh·silu(g)`: as [`H_REL_TOL`].
pub const DUP_REL_TOL: f64 = 8.0 * ULP;

/// Bound on `|dgate_gpu − dgate_cpu|` at one element. SwiGLU: `σ` is off
/// by a few ulp relative, and `1 + g·(1 − σ)` can cancel (g ≈ −1.28), so
/// the bound is relative to the terms' magnitude `|dh·u|·σ·(1 + |g|)`, with
/// 16 ulp. GeGLU: `tanh` is off by a few ulp (CUDA's `tanhf` ≤ 2, the CPU's
/// ≤ 1.46) and `½(1 + t) + ½g(1 − t²)·β(1 + 3κg²)` can cancel, so 16 ulp of
/// `|dh·u|·(1 + |g|·β(1 + 3κg²))`.
pub fn dgate_tol(act: Activation, g: f32, u: f32, dh: f32) -> f64 {
    let (g, m) = (g as f64, (dh as f64 * u as f64).abs());
    let terms = match act {
        Activation::Silu => (1.0 / (1.0 + (-g).exp())) * (1.0 + g.abs()),
        Activation::GeluTanh => 1.0 + g.abs() * GELU_BETA * (1.0 + 3.0 * GELU_KAPPA * g * g),
    };
    16.0 * ULP * m * terms + f64::from(f32::MIN_POSITIVE)
}

/// `√(2/π)` and `κ` of the tanh-GELU.
const GELU_BETA: f64 = 0.797_884_560_802_865_4;
const GELU_KAPPA: f64 = 0.044_715;

/// Bound on `|h_gpu − h_cpu|` for `h = act(g)·u`: SwiGLU [`H_REL_TOL`]
/// relative; GeGLU 16 ulp of `|g·u|` (`½g·(1 + t)` cancels where `t → −1`,
/// so the tanh's few ulp are relative to `|g|`, not to `h`).
pub fn h_tol(act: Activation, g: f32, u: f32, h: f32) -> f64 {
    match act {
        Activation::Silu => H_REL_TOL * h.abs() as f64 + 1e-45,
        Activation::GeluTanh => 16.0 * ULP * (g as f64 * u as f64).abs() + 1e-45,
    }
}

/// Bound on `|dup_gpu − dup_cpu|` for `dup = dh·act(g)`: as [`h_tol`].
pub fn dup_tol(act: Activation, g: f32, dh: f32, du: f32) -> f64 {
    match act {
        Activation::Silu => DUP_REL_TOL * du.abs() as f64 + 1e-45,
        Activation::GeluTanh => 16.0 * ULP * (g as f64 * dh as f64).abs() + 1e-45,
    }
}

fn check(dev: &CudaDevice, n: usize, views: &[(&CudaView<'_, f32>, &str)]) -> Result<()> {
    for (v, what) in views {
        if v.len() != n {
            bail!(ShapeMismatch, "swiglu: {what} has {} elements, expected {n}", v.len());
        }
        dev.check_stream(*v, &format!("swiglu {what}"))?;
    }
    Ok(())
}

fn check_mut(dev: &CudaDevice, n: usize, v: &CudaViewMut<'_, f32>, what: &str) -> Result<()> {
    if v.len() != n {
        bail!(ShapeMismatch, "swiglu: {what} has {} elements, expected {n}", v.len());
    }
    dev.check_stream(v, &format!("swiglu {what}"))
}

/// The device address of a bf16 input of `n` elements, after the checks.
fn in_ptr_bf16(dev: &CudaDevice, n: usize, v: &CudaView<'_, u16>, what: &str) -> Result<u64> {
    if v.len() != n {
        bail!(ShapeMismatch, "swiglu: {what} has {} elements, expected {n}", v.len());
    }
    dev.check_stream(v, &format!("swiglu {what}"))?;
    Ok(v.device_ptr(&dev.stream).0)
}

/// `h = silu(gate)·up` from fp32 `gate`, `up` in one pass, writing only the
/// outputs given: `h` (fp32), `hb` (its bf16 rounding) and `gb`, `ub` (the
/// bf16 roundings of gate and up, which the bf16 step keeps for the
/// backward). Every value is bit for bit [`swiglu_forward`]'s, and each
/// bf16 output bit for bit `elementwise::to_bf16` of the fp32 one.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_forward_out(
    dev: &CudaDevice,
    gate: &CudaView<'_, f32>,
    up: &CudaView<'_, f32>,
    h: Option<&mut CudaViewMut<'_, f32>>,
    hb: Option<&mut CudaViewMut<'_, u16>>,
    gb: Option<&mut CudaViewMut<'_, u16>>,
    ub: Option<&mut CudaViewMut<'_, u16>>,
    act: Activation,
) -> Result<()> {
    let n = gate.len();
    check(dev, n, &[(gate, "gate"), (up, "up")])?;
    let (hp, hbp, gbp, ubp) = (out_ptr(dev, n, h, "swiglu h")?, out_ptr(dev, n, hb, "swiglu bf16 h")?, out_ptr(dev, n, gb, "swiglu bf16 gate")?, out_ptr(dev, n, ub, "swiglu bf16 up")?);
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let name = "swiglu_fwd_out_f32";
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, ptr, u64, ptr, ptr, ptr, ptr) as the kernel; elements < n
    // of each buffer (lengths checked equal to n); a 0 output is skipped.
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, SWIGLU_THREADS), 1), SWIGLU_THREADS), [gate, up, &n64, &hp, &hbp, &gbp, &ubp, &act_u32])
}

/// [`swiglu_forward_out`] with `h` (fp32) written over `gate`: on return
/// `gate` holds `silu(gate)·up`, and the bf16 outputs given are written
/// from the same values (bit for bit the out-of-place kernel's).
pub fn swiglu_forward_inplace_out(
    dev: &CudaDevice,
    gate: &mut CudaViewMut<'_, f32>,
    up: &CudaView<'_, f32>,
    hb: Option<&mut CudaViewMut<'_, u16>>,
    gb: Option<&mut CudaViewMut<'_, u16>>,
    ub: Option<&mut CudaViewMut<'_, u16>>,
    act: Activation,
) -> Result<()> {
    let n = gate.len();
    let gp = out_ptr(dev, n, Some(gate), "swiglu gate (in place)")?;
    check(dev, n, &[(up, "up")])?;
    let (hbp, gbp, ubp) = (out_ptr(dev, n, hb, "swiglu bf16 h")?, out_ptr(dev, n, gb, "swiglu bf16 gate")?, out_ptr(dev, n, ub, "swiglu bf16 up")?);
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let name = "swiglu_fwd_inplace_out_f32";
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, ptr, u64, ptr, ptr, ptr) as the kernel; elements < n of
    // each buffer (lengths checked equal to n); a 0 output is skipped.
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, SWIGLU_THREADS), 1), SWIGLU_THREADS), [&gp, up, &n64, &hbp, &gbp, &ubp, &act_u32])
}

/// `h = silu(gate)·up` from bf16 `gate`, `up` (widened exactly), into `h`
/// (fp32) and/or `hb` (bf16): [`swiglu_forward_out`] on the widened
/// values.
pub fn swiglu_forward_bf16(dev: &CudaDevice, gate: &CudaView<'_, u16>, up: &CudaView<'_, u16>, h: Option<&mut CudaViewMut<'_, f32>>, hb: Option<&mut CudaViewMut<'_, u16>>, act: Activation) -> Result<()> {
    let n = gate.len();
    let (gp, up_) = (in_ptr_bf16(dev, n, gate, "gate")?, in_ptr_bf16(dev, n, up, "up")?);
    let (hp, hbp) = (out_ptr(dev, n, h, "swiglu h")?, out_ptr(dev, n, hb, "swiglu bf16 h")?);
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let name = "swiglu_fwd_out_bf16";
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, ptr, u64, ptr, ptr) as the kernel; elements < n of each
    // buffer (lengths checked); a 0 output is skipped.
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, SWIGLU_THREADS), 1), SWIGLU_THREADS), [&gp, &up_, &n64, &hp, &hbp, &act_u32])
}

/// [`swiglu_forward_bf16`]'s bf16 `h` of `gate`, `up` `[rows, cols]`
/// (rows `in_ld` apart: `cols` for separate buffers, or gate and up side by
/// side in one wide buffer, `up` starting `cols` after `gate`) written into
/// the first `cols` columns of `hb` `[rows, ld]` (`ld > cols`: a wide
/// operand), columns `cols..ld` zeroed: the same bf16 values.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_forward_wide_bf16(dev: &CudaDevice, gate: &CudaView<'_, u16>, up: &CudaView<'_, u16>, rows: usize, cols: usize, in_ld: usize, hb: &mut CudaViewMut<'_, u16>, ld: usize, act: Activation) -> Result<()> {
    let need = rows.saturating_sub(1).saturating_mul(in_ld).saturating_add(cols);
    if cols == 0 || cols > u32::MAX as usize || in_ld < cols || ld < cols || rows.checked_mul(ld) != Some(hb.len()) || (rows > 0 && (gate.len() < need || up.len() < need)) {
        bail!(ShapeMismatch, "swiglu wide: gate {} and up {} elements as [{rows}, {cols}] rows {in_ld} apart, into [{rows}, {ld}] of {} elements", gate.len(), up.len(), hb.len());
    }
    dev.check_stream(gate, "swiglu gate")?;
    dev.check_stream(up, "swiglu up")?;
    dev.check_stream(hb, "swiglu wide bf16 h")?;
    if rows == 0 {
        return Ok(());
    }
    let (r64, c32, in64, ld64, total) = (rows as u64, cols as u32, in_ld as u64, ld as u64, hb.len() as u64);
    let name = "swiglu_fwd_wide_bf16";
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, ptr, u64, u32, u64, u64, ptr) as the kernel; it reads
    // gate and up at r·in_ld + c (c < cols, below the lengths checked) and
    // writes rows·ld of hb (checked).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(total, SWIGLU_THREADS), 1), SWIGLU_THREADS), [gate, up, &r64, &c32, &in64, &ld64, hb, &act_u32])
}

/// [`swiglu_backward_bf16_inplace`] on gate and up side by side in one wide
/// buffer `gu` `[rows, ld]` (gate in columns `0..cols`, up in
/// `up_off..up_off + cols`, `up_off ≥ cols`; the rest not touched), from
/// `dh` `[rows, cols]`: the same bits.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_backward_pair_inplace(dev: &CudaDevice, gu: &mut CudaViewMut<'_, u16>, rows: usize, cols: usize, ld: usize, up_off: usize, dh: Dh<'_, '_>, act: Activation) -> Result<()> {
    if cols == 0 || cols > u32::MAX as usize || up_off < cols || up_off.checked_add(cols).is_none_or(|w| w > ld) || rows.checked_mul(ld) != Some(gu.len()) {
        bail!(ShapeMismatch, "swiglu pair: gate and up [{rows}, {cols}] (up at column {up_off}) do not fit [{rows}, {ld}] of {} elements", gu.len());
    }
    dev.check_stream(gu, "swiglu gate and up (in place)")?;
    let n = rows * cols;
    let (dhp, name) = match dh {
        Dh::F32(v) => {
            check(dev, n, &[(v, "dh")])?;
            (v.device_ptr(&dev.stream).0, "swiglu_bwd_pair_bf16")
        }
        Dh::Bf16(v) => (in_ptr_bf16(dev, n, v, "dh")?, "swiglu_bwd_pair_bf16dh"),
    };
    if n == 0 {
        return Ok(());
    }
    let (r64, c32, ld64, up64) = (rows as u64, cols as u32, ld as u64, up_off as u64);
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, u64, u32, u64, u64, ptr) as the kernels; element i < n
    // reads dh[i] and reads and writes gu at row·ld + col and + up_off
    // (< rows·ld, checked).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n as u64, SWIGLU_THREADS), 1), SWIGLU_THREADS), [gu, &r64, &c32, &ld64, &up64, &dhp, &act_u32])
}

/// The outputs of [`swiglu_backward_bf16`] and [`swiglu_backward_bf16_dh`],
/// each optional.
#[derive(Default)]
pub struct SwigluGrads<'a, 'b> {
    pub dgate: Option<&'a mut CudaViewMut<'b, f32>>,
    pub dup: Option<&'a mut CudaViewMut<'b, f32>>,
    pub dgate_bf16: Option<&'a mut CudaViewMut<'b, u16>>,
    pub dup_bf16: Option<&'a mut CudaViewMut<'b, u16>>,
}

/// [`swiglu_backward`] from bf16 `gate`, `up` (widened exactly) and fp32
/// `dh`, writing the gradients given in `out` (fp32 and/or their bf16
/// roundings, for the products that take bf16 operands).
pub fn swiglu_backward_bf16(dev: &CudaDevice, gate: &CudaView<'_, u16>, up: &CudaView<'_, u16>, dh: &CudaView<'_, f32>, out: SwigluGrads<'_, '_>, act: Activation) -> Result<()> {
    check(dev, gate.len(), &[(dh, "dh")])?;
    backward_bf16(dev, gate, up, dh.device_ptr(&dev.stream).0, out, "swiglu_bwd_out_bf16", act)
}

/// [`swiglu_backward_bf16`] with `dh` in bf16 too (widened exactly: the
/// bits of the fp32-`dh` form on the widened `dh`).
pub fn swiglu_backward_bf16_dh(dev: &CudaDevice, gate: &CudaView<'_, u16>, up: &CudaView<'_, u16>, dh: &CudaView<'_, u16>, out: SwigluGrads<'_, '_>, act: Activation) -> Result<()> {
    let dhp = in_ptr_bf16(dev, gate.len(), dh, "dh")?;
    backward_bf16(dev, gate, up, dhp, out, "swiglu_bwd_out_bf16dh", act)
}

/// The bf16 backward kernels' launch, `dh` (checked by the caller) at
/// device address `dhp`.
fn backward_bf16(dev: &CudaDevice, gate: &CudaView<'_, u16>, up: &CudaView<'_, u16>, dhp: u64, out: SwigluGrads<'_, '_>, name: &'static str, act: Activation) -> Result<()> {
    let n = gate.len();
    let (gp, up_) = (in_ptr_bf16(dev, n, gate, "gate")?, in_ptr_bf16(dev, n, up, "up")?);
    let (dgp, dup_) = (out_ptr(dev, n, out.dgate, "swiglu dgate")?, out_ptr(dev, n, out.dup, "swiglu dup")?);
    let (dgbp, dubp) = (out_ptr(dev, n, out.dgate_bf16, "swiglu bf16 dgate")?, out_ptr(dev, n, out.dup_bf16, "swiglu bf16 dup")?);
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, ptr, ptr, u64, ptr, ptr, ptr, ptr) as the kernels;
    // elements < n of each buffer (lengths checked, dh's by the caller); a 0
    // output is skipped.
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, SWIGLU_THREADS), 1), SWIGLU_THREADS), [&gp, &up_, &dhp, &n64, &dgp, &dup_, &dgbp, &dubp, &act_u32])
}

/// `h = silu(gate)·up`, elementwise, as `cpu::swiglu::swiglu_forward`.
pub fn swiglu_forward(dev: &CudaDevice, gate: &CudaView<'_, f32>, up: &CudaView<'_, f32>, h: &mut CudaViewMut<'_, f32>, act: Activation) -> Result<()> {
    let n = gate.len();
    check(dev, n, &[(gate, "gate"), (up, "up")])?;
    check_mut(dev, n, h, "h")?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let name = "swiglu_fwd_f32";
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, ptr, u64, ptr) as the kernel; elements < n of each
    // buffer (lengths checked equal to n).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, SWIGLU_THREADS), 1), SWIGLU_THREADS), [gate, up, &n64, h, &act_u32])
}

/// `dup = dh·silu(gate)`, `dgate = (dh·up)·σ(gate)·(1 + gate·(1 − σ(gate)))`,
/// both written, as `cpu::swiglu::swiglu_backward`.
pub fn swiglu_backward(
    dev: &CudaDevice,
    gate: &CudaView<'_, f32>,
    up: &CudaView<'_, f32>,
    dh: &CudaView<'_, f32>,
    dgate: &mut CudaViewMut<'_, f32>,
    dup: &mut CudaViewMut<'_, f32>,
    act: Activation,
) -> Result<()> {
    let n = gate.len();
    check(dev, n, &[(gate, "gate"), (up, "up"), (dh, "dh")])?;
    check_mut(dev, n, dgate, "dgate")?;
    check_mut(dev, n, dup, "dup")?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let name = "swiglu_bwd_f32";
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, ptr, ptr, u64, ptr, ptr) as the kernel; elements < n.
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, SWIGLU_THREADS), 1), SWIGLU_THREADS), [gate, up, dh, &n64, dgate, dup, &act_u32])
}

/// [`swiglu_backward`] in place, as `cpu::swiglu::swiglu_backward_inplace`:
/// on return `gate` holds dgate and `up` holds dup.
pub fn swiglu_backward_inplace(dev: &CudaDevice, gate: &mut CudaViewMut<'_, f32>, up: &mut CudaViewMut<'_, f32>, dh: &CudaView<'_, f32>, act: Activation) -> Result<()> {
    let n = gate.len();
    check_mut(dev, n, gate, "gate")?;
    check_mut(dev, n, up, "up")?;
    check(dev, n, &[(dh, "dh")])?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let name = "swiglu_bwd_inplace_f32";
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, ptr, ptr, u64) as the kernel; elements < n.
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, SWIGLU_THREADS), 1), SWIGLU_THREADS), [gate, up, dh, &n64, &act_u32])
}

/// `dh` of [`swiglu_backward_bf16_inplace`]: fp32, or bf16 (widened
/// exactly).
pub enum Dh<'a, 'b> {
    F32(&'a CudaView<'b, f32>),
    Bf16(&'a CudaView<'b, u16>),
}

/// [`swiglu_backward_bf16`] (or `_dh`) in place, bf16 outputs only: on
/// return `gate` holds the bf16 dgate and `up` the bf16 dup, the bits those
/// kernels write to `dgate_bf16`, `dup_bf16` (no second pair of buffers).
pub fn swiglu_backward_bf16_inplace(dev: &CudaDevice, gate: &mut CudaViewMut<'_, u16>, up: &mut CudaViewMut<'_, u16>, dh: Dh<'_, '_>, act: Activation) -> Result<()> {
    let n = gate.len();
    let gp = out_ptr(dev, n, Some(gate), "swiglu gate (in place)")?;
    let up_ = out_ptr(dev, n, Some(up), "swiglu up (in place)")?;
    let (dhp, name) = match dh {
        Dh::F32(v) => {
            check(dev, n, &[(v, "dh")])?;
            (v.device_ptr(&dev.stream).0, "swiglu_bwd_inplace_bf16")
        }
        Dh::Bf16(v) => (in_ptr_bf16(dev, n, v, "dh")?, "swiglu_bwd_inplace_bf16dh"),
    };
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, ptr, ptr, u64) as the kernels; elements < n of each
    // buffer (lengths checked).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, SWIGLU_THREADS), 1), SWIGLU_THREADS), [&gp, &up_, &dhp, &n64, &act_u32])
}

/// [`swiglu_backward_bf16`] in place with every output: on return `dh`
/// holds the fp32 dgate, `dup` the fp32 dup, and `gate` and `up` their bf16
/// roundings — the bits of `swiglu_backward_bf16` with all four outputs,
/// from one new fp32 buffer instead of four.
pub fn swiglu_backward_bf16_inplace_all(dev: &CudaDevice, gate: &mut CudaViewMut<'_, u16>, up: &mut CudaViewMut<'_, u16>, dh: &mut CudaViewMut<'_, f32>, dup: &mut CudaViewMut<'_, f32>, act: Activation) -> Result<()> {
    let n = gate.len();
    let gp = out_ptr(dev, n, Some(gate), "swiglu gate (in place)")?;
    let up_ = out_ptr(dev, n, Some(up), "swiglu up (in place)")?;
    let dhp = out_ptr(dev, n, Some(dh), "swiglu dh (in place)")?;
    let dup_ = out_ptr(dev, n, Some(dup), "swiglu dup")?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let name = "swiglu_bwd_inplace_bf16all";
    let f = dev.function(&SWIGLU_CU, name)?;
    let act_u32 = act_code(act);
    // SAFETY: (ptr, ptr, ptr, u64, ptr) as the kernel; elements < n of each
    // buffer (lengths checked).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, SWIGLU_THREADS), 1), SWIGLU_THREADS), [&gp, &up_, &dhp, &n64, &dup_, &act_u32])
}

#[cfg(test)]
mod tests {
    #[test]
    fn launch_constant_matches_the_kernel() {
        let src = include_str!("../../../cuda/swiglu.cu");
        let line = src.lines().find(|l| l.starts_with("#define SWIGLU_THREADS ")).expect("#define in swiglu.cu");
        assert_eq!(line["#define SWIGLU_THREADS ".len()..].trim(), super::SWIGLU_THREADS.to_string());
    }
}
