//! Launchers for `cuda/rope.cu`: rotary position embeddings on
//! `[B, T, H, D]`, twins of [`crate::backend::cpu::rope`]'s `rope_forward`
//! and `rope_backward`, in place or (for the bf16 step, [`rope_bf16`]) out
//! of place into a bf16 copy. Same table, same roundings (no FMA): bit for
//! bit. A table of `half` pairs rotates the first `2·half` elements of
//! each head vector (`2·half < D`: a partial rotation, the rest passing
//! through unchanged).

use super::{launch_cfg, out_ptr, stride_grid, CudaDevice, ROPE_CU};
use crate::backend::cpu::rope::RopeTable;
use crate::error::Result;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// Threads per block (`ROPE_THREADS` in rope.cu).
const ROPE_THREADS: u32 = 256;

/// A [`RopeTable`] on the device: `cos`, `sin` `[len, half]` row-major.
pub struct CudaRopeTable {
    pub half: usize,
    pub len: usize,
    pub cos: CudaSlice<f32>,
    pub sin: CudaSlice<f32>,
}

impl CudaRopeTable {
    /// Copies a host table to the device.
    pub fn upload(dev: &CudaDevice, t: &RopeTable) -> Result<CudaRopeTable> {
        if t.cos.len() != t.half * t.len || t.sin.len() != t.half * t.len {
            bail!(BufferSize, "rope table [{}, {}] has {} cos and {} sin values", t.len, t.half, t.cos.len(), t.sin.len());
        }
        Ok(CudaRopeTable { half: t.half, len: t.len, cos: dev.upload(&t.cos)?, sin: dev.upload(&t.sin)? })
    }
}

/// Checks a rotation of `n = x_len` elements `[B, T, H, D]` against the
/// table; returns the item count (`B·T·H·(D − half)`: the pairs and the
/// passed-through elements) and `(seq, heads, half, D)` as the kernels take
/// them (items 0: nothing to launch).
fn check(dev: &CudaDevice, x_len: usize, batch: usize, seq: usize, heads: usize, head_dim: usize, table: &CudaRopeTable) -> Result<(u64, [u32; 4])> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!(InvalidShape, "rope: head_dim {head_dim} must be even and positive");
    }
    if table.half == 0 || table.half * 2 > head_dim {
        bail!(ShapeMismatch, "rope: table rotates {} elements, x has head_dim {head_dim}", table.half * 2);
    }
    if table.len < seq {
        bail!(ShapeMismatch, "rope: table has {} rows, need {seq}", table.len);
    }
    if seq > u32::MAX as usize || heads > u32::MAX as usize || table.half > u32::MAX as usize {
        bail!(InvalidShape, "rope: seq {seq}, heads {heads} or head_dim {head_dim} exceeds 2^32-1");
    }
    let n = [batch, seq, heads, head_dim].iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| err!(InvalidShape, "rope: [{batch}, {seq}, {heads}, {head_dim}] overflows"))?;
    if x_len != n {
        bail!(BufferSize, "rope: x has {x_len} elements, [{batch}, {seq}, {heads}, {head_dim}] needs {n}");
    }
    if table.cos.len() != table.half * table.len || table.sin.len() != table.half * table.len {
        bail!(BufferSize, "rope: table buffers do not hold [{}, {}] values", table.len, table.half);
    }
    dev.check_stream(&table.cos, "rope cos table")?;
    dev.check_stream(&table.sin, "rope sin table")?;
    Ok(((n / head_dim * (head_dim - table.half)) as u64, [seq as u32, heads as u32, table.half as u32, head_dim as u32]))
}

fn rotate(dev: &CudaDevice, x: &mut CudaViewMut<'_, f32>, batch: usize, seq: usize, heads: usize, head_dim: usize, table: &CudaRopeTable, name: &'static str) -> Result<()> {
    let (items, [s32, h32, half32, d32]) = check(dev, x.len(), batch, seq, heads, head_dim, table)?;
    dev.check_stream(x, "rope x")?;
    if items == 0 {
        return Ok(());
    }
    let f = dev.function(&ROPE_CU, name)?;
    // SAFETY: (ptr, u32 ×4, u64, ptr, ptr) as the kernel; item p < items
    // touches x[vec·D + i], x[vec·D + half + i] (< n; i < D − half) and
    // table row t < seq ≤ len (checked above).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(items, ROPE_THREADS), 1), ROPE_THREADS), [x, &s32, &h32, &half32, &d32, &items, &table.cos, &table.sin])
}

/// RoPE out of place for the bf16 step: `x` rotated forward (or, with
/// `backward`, by −θ) into `yb` as bf16 and, when given, into `y` as fp32:
/// bit for bit [`rope_forward`] / [`rope_backward`] followed by
/// `elementwise::to_bf16`, in one pass.
#[allow(clippy::too_many_arguments)]
pub fn rope_bf16(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    y: Option<&mut CudaViewMut<'_, f32>>,
    yb: &mut CudaViewMut<'_, u16>,
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    table: &CudaRopeTable,
    backward: bool,
) -> Result<()> {
    rope_bf16_into(dev, x, y, yb, heads * head_dim, 0, batch, seq, heads, head_dim, table, backward)
}

/// [`rope_bf16`] with each token's `H·D` bf16 values written at column
/// `off` of `yb`'s rows of `ld` (`[B·T, ld]`; `ld = H·D`, `off = 0`:
/// contiguous; more: a block of a wide operand, the other columns not
/// touched): the same bits.
#[allow(clippy::too_many_arguments)]
pub fn rope_bf16_into(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    y: Option<&mut CudaViewMut<'_, f32>>,
    yb: &mut CudaViewMut<'_, u16>,
    ld: usize,
    off: usize,
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    table: &CudaRopeTable,
    backward: bool,
) -> Result<()> {
    let (items, [s32, h32, half32, d32]) = check(dev, x.len(), batch, seq, heads, head_dim, table)?;
    dev.check_stream(x, "rope x")?;
    let tokens = batch * seq;
    if off.checked_add(heads * head_dim).is_none_or(|e| e > ld) || tokens.checked_mul(ld) != Some(yb.len()) {
        bail!(ShapeMismatch, "rope: columns {off}..+{} do not fit a bf16 output [{tokens}, {ld}] of {} elements", heads * head_dim, yb.len());
    }
    let ybp = out_ptr(dev, yb.len(), Some(yb), "rope bf16 y")?;
    let yp = out_ptr(dev, x.len(), y, "rope y")?;
    if items == 0 {
        return Ok(());
    }
    let (ld64, off64) = (ld as u64, off as u64);
    let name = if backward { "rope_bwd_out_f32" } else { "rope_fwd_out_f32" };
    let f = dev.function(&ROPE_CU, name)?;
    // SAFETY: (ptr ×3, u32 ×4, u64, ptr ×2, u64 ×2) as the kernel; item p
    // < items reads x and writes y (unless 0) at vec·D + i and + half (< n;
    // i < D − half) and yb at token·ld + off + h·D + i and + half (<
    // tokens·ld, checked), table row t < seq ≤ len (checked).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(items, ROPE_THREADS), 1), ROPE_THREADS), [x, &yp, &ybp, &s32, &h32, &half32, &d32, &items, &table.cos, &table.sin, &ld64, &off64])
}

/// RoPE forward in place on `x: [B, T, H, D]`, as `cpu::rope::rope_forward`.
pub fn rope_forward(dev: &CudaDevice, x: &mut CudaViewMut<'_, f32>, batch: usize, seq: usize, heads: usize, head_dim: usize, table: &CudaRopeTable) -> Result<()> {
    rotate(dev, x, batch, seq, heads, head_dim, table, "rope_fwd_f32")
}

/// RoPE backward in place on `dy: [B, T, H, D]` (→ dx), as
/// `cpu::rope::rope_backward`.
pub fn rope_backward(dev: &CudaDevice, dy: &mut CudaViewMut<'_, f32>, batch: usize, seq: usize, heads: usize, head_dim: usize, table: &CudaRopeTable) -> Result<()> {
    rotate(dev, dy, batch, seq, heads, head_dim, table, "rope_bwd_f32")
}

/// RoPE in place on `x` (forward, or with `backward` by −θ) that also
/// writes the result's bf16 rounding into `yb`: bit for bit
/// [`rope_forward`] / [`rope_backward`] followed by `elementwise::to_bf16`,
/// in one pass (the bf16 step's gradients of q and k, which its fp32
/// adapter products read in fp32 and its base products in bf16).
#[allow(clippy::too_many_arguments)]
pub fn rope_inplace_bf16(
    dev: &CudaDevice,
    x: &mut CudaViewMut<'_, f32>,
    yb: &mut CudaViewMut<'_, u16>,
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    table: &CudaRopeTable,
    backward: bool,
) -> Result<()> {
    let (items, [s32, h32, half32, d32]) = check(dev, x.len(), batch, seq, heads, head_dim, table)?;
    dev.check_stream(x, "rope x")?;
    let ybp = out_ptr(dev, x.len(), Some(yb), "rope bf16 y")?;
    if items == 0 {
        return Ok(());
    }
    let name = if backward { "rope_bwd_inplace_out_f32" } else { "rope_fwd_inplace_out_f32" };
    let f = dev.function(&ROPE_CU, name)?;
    // SAFETY: (ptr ×2, u32 ×4, u64, ptr ×2) as the kernel; item p < items
    // reads and writes x and writes yb at vec·D + i and vec·D + half + i
    // (< n, both lengths n; i < D − half), table row t < seq ≤ len
    // (checked).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(items, ROPE_THREADS), 1), ROPE_THREADS), [x, &ybp, &s32, &h32, &half32, &d32, &items, &table.cos, &table.sin])
}

#[cfg(test)]
mod tests {
    #[test]
    fn launch_constant_matches_the_kernel() {
        let src = include_str!("../../../cuda/rope.cu");
        let line = src.lines().find(|l| l.starts_with("#define ROPE_THREADS ")).expect("#define in rope.cu");
        assert_eq!(line["#define ROPE_THREADS ".len()..].trim(), super::ROPE_THREADS.to_string());
    }
}
