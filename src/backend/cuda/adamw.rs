//! Launcher for `cuda/adamw.cu`: one AdamW step on one fp32 tensor, twin of
//! `optim::adamw::adamw_update` given the same step constants
//! ([`AdamWStep`], the fields of `optim::AdamWScalars`: the backend sits
//! below `optim` and does not import it): every operation is rounded as on the CPU (explicit FMAs where ATen uses
//! them, IEEE sqrt and division, nothing else contracted), so `p`, `m` and
//! `v` are the CPU's bit for bit.

use super::{launch_cfg, stride_grid, CudaDevice, ADAMW_CU};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, DevicePtrMut};
use std::sync::Arc;

/// Threads per block (`ADAMW_THREADS` in adamw.cu).
const ADAMW_THREADS: u32 = 256;

/// The fp32 constants of one AdamW step, computed on the host in f64 and
/// rounded once (the fields of `optim::AdamWScalars`, which documents each).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// `f32(1 − lr·wd)`, or `None` when `wd == 0` (torch skips the mul).
    pub decay: Option<f32>,
    /// `f32(1 − β1)`.
    pub lerp_weight: f32,
    /// `f32(β2)`.
    pub beta2: f32,
    /// `f32(1 − β2)`.
    pub one_minus_beta2: f32,
    /// `f32((1 − β2^t)^0.5)`.
    pub bias_correction2_sqrt: f32,
    /// `f32(eps)`.
    pub eps: f32,
    /// `f32(−lr / (1 − β1^t))`.
    pub neg_step_size: f32,
}

/// `adamw_update(p, g, m, v, s)` on the device (queued, no sync): all four
/// buffers of one length.
pub fn adamw_update(dev: &CudaDevice, p: &mut CudaViewMut<'_, f32>, g: &CudaView<'_, f32>, m: &mut CudaViewMut<'_, f32>, v: &mut CudaViewMut<'_, f32>, s: &AdamWStep) -> Result<()> {
    let n = p.len();
    if g.len() != n || m.len() != n || v.len() != n {
        bail!(ShapeMismatch, "adamw: p, g, m, v have {n}, {}, {}, {} elements", g.len(), m.len(), v.len());
    }
    dev.check_stream(m, "adamw m")?;
    dev.check_stream(v, "adamw v")?;
    // The guards record the moments' use by the launch when dropped.
    let (mp, _m_used) = m.device_ptr_mut(&dev.stream);
    let (vp, _v_used) = v.device_ptr_mut(&dev.stream);
    launch(dev, p, g, mp, vp, s)
}

/// [`adamw_update`] with the moments in CUDA managed memory (paged
/// optimizer state, [`super::paged::ManagedAlloc`]): `m` and `v` hold
/// `p.len()` fp32 values each; the same kernel, so the same bits.
pub fn adamw_update_managed(dev: &CudaDevice, p: &mut CudaViewMut<'_, f32>, g: &CudaView<'_, f32>, m: &super::paged::ManagedAlloc, v: &super::paged::ManagedAlloc, s: &AdamWStep) -> Result<()> {
    let n = p.len();
    if g.len() != n || m.len() != 4 * n || v.len() != 4 * n {
        bail!(ShapeMismatch, "adamw: p and g have {n} and {} elements, the managed m and v {} and {} bytes", g.len(), m.len(), v.len());
    }
    if !Arc::ptr_eq(m.device(), v.device()) || m.device().ordinal != dev.ordinal {
        bail!(InvalidArgument, "adamw: the managed moments belong to another device");
    }
    // The allocations outlive the queued launch (their Drop synchronizes).
    launch(dev, p, g, m.ptr(), v.ptr(), s)
}

/// The launch: `m` and `v` are device addresses of `p.len()` fp32 values
/// each (checked by the callers).
fn launch(dev: &CudaDevice, p: &mut CudaViewMut<'_, f32>, g: &CudaView<'_, f32>, m: u64, v: u64, s: &AdamWStep) -> Result<()> {
    dev.check_stream(p, "adamw p")?;
    dev.check_stream(g, "adamw g")?;
    let n = p.len();
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let has_decay = s.decay.is_some() as u32;
    let decay = s.decay.unwrap_or(1.0);
    let name = "adamw_update_f32";
    let f = dev.function(&ADAMW_CU, name)?;
    // SAFETY: (ptr, ptr, ptr, ptr, u64, u32, f32 × 7) as the kernel; elements
    // < n of each buffer (p and g checked here, m and v by the callers).
    launch_kernel!(
        dev,
        f,
        name,
        launch_cfg((stride_grid(n64, ADAMW_THREADS), 1), ADAMW_THREADS),
        [p, g, &m, &v, &n64, &has_decay, &decay, &s.lerp_weight, &s.beta2, &s.one_minus_beta2, &s.bias_correction2_sqrt, &s.eps, &s.neg_step_size]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn launch_constant_matches_the_kernel() {
        let src = include_str!("../../../cuda/adamw.cu");
        let line = src.lines().find(|l| l.starts_with("#define ADAMW_THREADS ")).expect("#define in adamw.cu");
        assert_eq!(line["#define ADAMW_THREADS ".len()..].trim(), super::ADAMW_THREADS.to_string());
    }
}
