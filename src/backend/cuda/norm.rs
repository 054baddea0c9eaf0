//! Launchers for `cuda/norm.cu`: RMSNorm forward and backward, fp32, twins
//! of [`crate::backend::cpu::norm`]. The kernels round every f32 step as the
//! CPU does and differ only in the order of their f64 sums, so results are
//! bit-exact except where an f64 sum lands within ~D·2⁻⁵³ of an f32 rounding
//! boundary: bounds [`RSTD_REL_TOL`], [`Y_REL_TOL`], [`DX_TOL_ULPS`],
//! [`DW_TOL_ULPS`].

use super::{launch_cfg, out_ptr, scratch, CudaDevice, NORM_CU};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr};

/// Threads per block (`NORM_THREADS` in norm.cu).
const NORM_THREADS: u32 = 256;
/// Target number of blocks of the dw partial-sum kernel (enough to fill a
/// GPU of ~130 SMs several times over).
const DW_TARGET_BLOCKS: usize = 1024;

/// `rstd`: the mean is an f64 sum rounded to f32, so at most one f32
/// rounding of the variance can differ (1 ulp, 2⁻²³ relative), which
/// `1/sqrt` halves, plus the two f32 roundings that then follow.
pub const RSTD_REL_TOL: f64 = 2.0 / (1u64 << 23) as f64;
/// `y = w·(x·r)`: `RSTD_REL_TOL` carried through two more roundings.
pub const Y_REL_TOL: f64 = 4.0 / (1u64 << 23) as f64;
/// `dx`, in ulps (2⁻²³) of `|r·g| + |c·x|`: `c` may differ by one f32
/// rounding, and the final subtraction rounds once.
pub const DX_TOL_ULPS: f64 = 3.0;
/// `dw`, in ulps (2⁻²³) of `|dw_before| + Σ_rows |dy·x̂|`: the f64 column sum
/// rounded to f32 may differ by one rounding, and the addition rounds once.
pub const DW_TOL_ULPS: f64 = 3.0;

fn check_shape(rows: usize, dim: usize) -> Result<()> {
    if dim == 0 || dim > u32::MAX as usize || rows > i32::MAX as usize {
        bail!(InvalidShape, "rmsnorm [{rows}, {dim}]: dim must be in 1..=2^32-1 and rows at most 2^31-1");
    }
    rows.checked_mul(dim).ok_or_else(|| err!(InvalidShape, "rmsnorm [{rows}, {dim}] overflows"))?;
    Ok(())
}

fn check_len(len: usize, want: usize, what: &str) -> Result<()> {
    if len != want {
        bail!(BufferSize, "rmsnorm: {what} has {len} elements, needs {want}");
    }
    Ok(())
}

/// A forward's shape, input lengths and streams.
fn check_forward(dev: &CudaDevice, x: &CudaView<'_, f32>, w: &CudaView<'_, f32>, rows: usize, dim: usize) -> Result<()> {
    check_shape(rows, dim)?;
    check_len(x.len(), rows * dim, "x")?;
    check_len(w.len(), dim, "w")?;
    dev.check_stream(x, "rmsnorm x")?;
    dev.check_stream(w, "rmsnorm w")
}

/// A backward's shape, the lengths and streams of x, w, rstd, dy and dx.
fn check_backward(dev: &CudaDevice, [x, w, rstd, dy]: [&CudaView<'_, f32>; 4], rows: usize, dim: usize, dx: &CudaViewMut<'_, f32>) -> Result<()> {
    check_shape(rows, dim)?;
    check_len(x.len(), rows * dim, "x")?;
    check_len(dy.len(), rows * dim, "dy")?;
    check_len(dx.len(), rows * dim, "dx")?;
    check_len(w.len(), dim, "w")?;
    check_len(rstd.len(), rows, "rstd")?;
    for (v, what) in [(x, "rmsnorm x"), (w, "rmsnorm w"), (rstd, "rmsnorm rstd"), (dy, "rmsnorm dy")] {
        dev.check_stream(v, what)?;
    }
    dev.check_stream(dx, "rmsnorm dx")
}

/// RMSNorm forward, as [`crate::backend::cpu::norm::rmsnorm_forward`]:
/// `y[i, j] = w[j]·(x[i, j]·r_i)`, `r_i = 1/sqrt(mean_j x[i, j]² + eps)`,
/// stored in `rstd` (`[rows]`) when given. Queues the work (no sync).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rows: usize,
    dim: usize,
    eps: f32,
    y: &mut CudaViewMut<'_, f32>,
    rstd: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    check_forward(dev, x, w, rows, dim)?;
    check_len(y.len(), rows * dim, "y")?;
    dev.check_stream(y, "rmsnorm y")?;
    let rp = out_ptr(dev, rows, rstd, "rmsnorm rstd")?;
    if rows == 0 {
        return Ok(());
    }
    let name = "norm_rmsnorm_fwd_f32";
    let f = dev.function(&NORM_CU, name)?;
    let (r32, d32) = (rows as u32, dim as u32);
    // SAFETY: (ptr, ptr, u32, u32, f32, ptr, ptr) as the kernel; one block
    // per row touches row `blockIdx.x` of x, y and rstd[row] (lengths
    // checked above); a 0 rstd is never written.
    launch_kernel!(dev, f, name, launch_cfg((r32, 1), NORM_THREADS), [x, w, &r32, &d32, &eps, y, &rp])
}

/// [`rmsnorm_forward`] writing `y`'s bf16 rounding to `yb` in the same
/// pass (the bf16 step's product operand; bit for bit `y` followed by
/// `elementwise::to_bf16`), and `y` itself only when given.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward_bf16(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rows: usize,
    dim: usize,
    eps: f32,
    y: Option<&mut CudaViewMut<'_, f32>>,
    yb: &mut CudaViewMut<'_, u16>,
    rstd: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    check_forward(dev, x, w, rows, dim)?;
    check_len(yb.len(), rows * dim, "bf16 y")?;
    dev.check_stream(yb, "rmsnorm bf16 y")?;
    let (yp, rp) = (out_ptr(dev, rows * dim, y, "rmsnorm y")?, out_ptr(dev, rows, rstd, "rmsnorm rstd")?);
    if rows == 0 {
        return Ok(());
    }
    let name = "norm_rmsnorm_fwd_out_f32";
    let f = dev.function(&NORM_CU, name)?;
    let (r32, d32) = (rows as u32, dim as u32);
    // SAFETY: (ptr, ptr, u32, u32, f32, ptr, ptr, ptr) as the kernel; one
    // block per row touches row `blockIdx.x` of x, y, yb and rstd[row]
    // (lengths checked above); a 0 pointer is never written.
    launch_kernel!(dev, f, name, launch_cfg((r32, 1), NORM_THREADS), [x, w, &r32, &d32, &eps, &yp, yb, &rp])
}

/// [`rmsnorm_forward_bf16`]'s bf16 `y` alone written into the first `dim`
/// columns of `yb` `[rows, ld]` (a wide operand, `ld ≥ dim`), columns
/// `dim..ld` zeroed: the same bf16 values.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward_wide_bf16(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rows: usize,
    dim: usize,
    eps: f32,
    yb: &mut CudaViewMut<'_, u16>,
    ld: usize,
    rstd: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    check_forward(dev, x, w, rows, dim)?;
    if ld < dim {
        bail!(InvalidShape, "rmsnorm: a wide output's row stride {ld} is below its {dim} columns");
    }
    check_len(yb.len(), rows * ld, "wide bf16 y")?;
    dev.check_stream(yb, "rmsnorm wide bf16 y")?;
    let rp = out_ptr(dev, rows, rstd, "rmsnorm rstd")?;
    if rows == 0 {
        return Ok(());
    }
    let name = "norm_rmsnorm_fwd_wide_bf16";
    let f = dev.function(&NORM_CU, name)?;
    let (r32, d32, ld64) = (rows as u32, dim as u32, ld as u64);
    // SAFETY: (ptr, ptr, u32, u32, f32, u64, ptr, ptr) as the kernel; one
    // block per row touches row `blockIdx.x` of x and of yb (ld elements)
    // and rstd[row] (lengths checked above); a 0 rstd is never written.
    launch_kernel!(dev, f, name, launch_cfg((r32, 1), NORM_THREADS), [x, w, &r32, &d32, &eps, &ld64, yb, &rp])
}

/// [`rmsnorm_backward`]'s `dx` (no `dw`: a frozen norm) with, given `res`,
/// the residual stream's gradient added (`dx = norm's dx + res`, bit for
/// bit `elementwise::add` after it) and, with `dxb`, its bf16 rounding
/// written in the same pass (the next product's operand; bit for bit
/// `elementwise::to_bf16`).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_residual(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rstd: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    rows: usize,
    dim: usize,
    res: Option<&CudaView<'_, f32>>,
    dx: &mut CudaViewMut<'_, f32>,
    dxb: Option<&mut CudaViewMut<'_, u16>>,
) -> Result<()> {
    backward_residual(dev, [x, w, rstd, dy], rows, dim, res, dx, dxb.map(|b| (b, dim)), false)
}

/// [`rmsnorm_backward_residual`] with the bf16 rounding of `dx` written
/// into the first `dim` columns of `dxb` `[rows, ld]` (a wide operand,
/// `ld ≥ dim`), columns `dim..ld` zeroed: the same values.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_residual_wide(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rstd: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    rows: usize,
    dim: usize,
    res: Option<&CudaView<'_, f32>>,
    dx: &mut CudaViewMut<'_, f32>,
    dxb: &mut CudaViewMut<'_, u16>,
    ld: usize,
) -> Result<()> {
    backward_residual(dev, [x, w, rstd, dy], rows, dim, res, dx, Some((dxb, ld)), true)
}

/// The two launchers above: `dxb` with its row stride; `wide` picks the
/// kernel that zeroes the columns past `dim`.
#[allow(clippy::too_many_arguments)]
fn backward_residual(dev: &CudaDevice, inputs: [&CudaView<'_, f32>; 4], rows: usize, dim: usize, res: Option<&CudaView<'_, f32>>, dx: &mut CudaViewMut<'_, f32>, dxb: Option<(&mut CudaViewMut<'_, u16>, usize)>, wide: bool) -> Result<()> {
    check_backward(dev, inputs, rows, dim, dx)?;
    let [x, w, rstd, dy] = inputs;
    let resp = match res {
        Some(r) => {
            check_len(r.len(), rows * dim, "residual")?;
            dev.check_stream(r, "rmsnorm residual")?;
            r.device_ptr(&dev.stream).0
        }
        None => 0u64,
    };
    let (dxbp, ld) = match dxb {
        Some((b, ld)) => {
            if ld < dim {
                bail!(InvalidShape, "rmsnorm: a bf16 dx's row stride {ld} is below its {dim} columns");
            }
            (out_ptr(dev, rows * ld, Some(b), "rmsnorm bf16 dx")?, ld)
        }
        None => (0u64, dim),
    };
    if rows == 0 {
        return Ok(());
    }
    let (r32, d32, ld64) = (rows as u32, dim as u32, ld as u64);
    let name = if wide { "norm_rmsnorm_bwd_dx_wide_f32" } else { "norm_rmsnorm_bwd_dx_out_f32" };
    let f = dev.function(&NORM_CU, name)?;
    if wide {
        // SAFETY: (ptr ×4, u32, u32, ptr ×2, u64, ptr) as the kernel; one
        // block per row touches that row of x, dy, dx (and res unless 0),
        // dxb's row of ld and rstd[row] (lengths checked above).
        launch_kernel!(dev, f, name, launch_cfg((r32, 1), NORM_THREADS), [x, w, rstd, dy, &r32, &d32, &resp, dx, &ld64, &dxbp])
    } else {
        // SAFETY: (ptr ×4, u32, u32, ptr ×3) as the kernel; one block per row
        // touches that row of x, dy, dx (and res, dxb unless 0) and
        // rstd[row] (lengths checked above).
        launch_kernel!(dev, f, name, launch_cfg((r32, 1), NORM_THREADS), [x, w, rstd, dy, &r32, &d32, &resp, dx, &dxbp])
    }
}

/// `(chunks, rows_per_chunk)` of the dw partial sums: about
/// `DW_TARGET_BLOCKS` blocks in all.
pub fn dw_chunks(rows: usize, dim: usize) -> (usize, usize) {
    let col_blocks = dim.div_ceil(NORM_THREADS as usize);
    let want = DW_TARGET_BLOCKS.div_ceil(col_blocks).clamp(1, rows.max(1));
    let per = rows.max(1).div_ceil(want);
    (rows.max(1).div_ceil(per), per)
}

/// RMSNorm backward, as [`crate::backend::cpu::norm::rmsnorm_backward`]:
/// `dx` written; `dw` (when given) accumulated (`+=`). `rstd` from the
/// forward. Queues the work (no sync); `dw` uses a scratch buffer of
/// `chunks·dim` f64 ([`dw_chunks`]), freed in stream order.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rstd: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    rows: usize,
    dim: usize,
    dx: &mut CudaViewMut<'_, f32>,
    dw: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    check_backward(dev, [x, w, rstd, dy], rows, dim, dx)?;
    if let Some(d) = dw.as_deref() {
        check_len(d.len(), dim, "dw")?;
        dev.check_stream(d, "rmsnorm dw")?;
    }
    if rows == 0 {
        return Ok(());
    }
    let (r32, d32) = (rows as u32, dim as u32);
    let name = "norm_rmsnorm_bwd_dx_f32";
    let f = dev.function(&NORM_CU, name)?;
    // SAFETY: (ptr, ptr, ptr, ptr, u32, u32, ptr) as the kernel; one block
    // per row touches that row of x, dy, dx and rstd[row] (lengths checked).
    launch_kernel!(dev, f, name, launch_cfg((r32, 1), NORM_THREADS), [x, w, rstd, dy, &r32, &d32, dx])?;
    let Some(dw) = dw else { return Ok(()) };
    let (chunks, per) = dw_chunks(rows, dim);
    let mut partial = scratch::<f64>(dev, chunks * dim)?;
    let col_blocks = dim.div_ceil(NORM_THREADS as usize) as u32;
    let (c32, p32) = (chunks as u32, per as u32);
    let name = "norm_rmsnorm_bwd_dw_partial_f32";
    let f = dev.function(&NORM_CU, name)?;
    // SAFETY: (ptr, ptr, ptr, u32, u32, u32, ptr); block (cb, chunk) reads
    // rows chunk·per.. min(rows, +per) of x and dy, columns < dim, and
    // writes partial[chunk·dim + j] (chunks·dim elements allocated).
    launch_kernel!(dev, f, name, launch_cfg((col_blocks, c32), NORM_THREADS), [x, rstd, dy, &r32, &d32, &p32, &mut partial])?;
    let name = "norm_rmsnorm_bwd_dw_finish_f32";
    let f = dev.function(&NORM_CU, name)?;
    // SAFETY: (ptr, u32, u32, ptr); thread j < dim reads partial[c·dim + j]
    // for c < chunks (all written above) and updates dw[j].
    launch_kernel!(dev, f, name, launch_cfg((col_blocks, 1), NORM_THREADS), [&partial, &d32, &c32, dw])
}

#[cfg(test)]
mod tests {
    #[test]
    fn launch_constant_matches_the_kernel() {
        let src = include_str!("../../../cuda/norm.cu");
        let line = src.lines().find(|l| l.starts_with("#define NORM_THREADS ")).expect("#define in norm.cu");
        assert_eq!(line["#define NORM_THREADS ".len()..].trim(), super::NORM_THREADS.to_string());
    }

    #[test]
    fn dw_chunks_cover_the_rows() {
        for (rows, dim) in [(1, 1), (7, 4096), (4096, 4096), (100_000, 64), (3, 100_000)] {
            let (c, per) = super::dw_chunks(rows, dim);
            assert!(c * per >= rows && (c - 1) * per < rows.max(1) && c <= 65535, "{rows} {dim}: {c} x {per}");
        }
    }
}
