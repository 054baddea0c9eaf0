//! Launchers for `cuda/dense.cu`: the batch-1 bf16 GEMV (the baseline the
//! fused NF4 GEMV is measured against, and the second step of "dequantize,
//! then GEMV"). Its CPU twin is the exact dot product; agreement is within
//! [`DENSE_GEMV_REL_TOL`] / [`dense_gemv_sum_tol`].

use super::{cu_err, guard, CudaDevice, DENSE_CU};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};

/// Rows per thread block, one warp each (`DENSE_GEMV_ROWS` in dense.cu).
const DENSE_GEMV_ROWS: u32 = 4;

/// Relative bound from the final rounding to bf16 (half an ulp is 2^-9).
pub const DENSE_GEMV_REL_TOL: f64 = 1.0 / 256.0;

/// fp32 accumulation bound relative to `Σ|w_k x_k|`: a lane sums in/32
/// products with FMAs, then five shuffle additions; `(in + 64)·2^-24`
/// covers the longest chain with room.
pub fn dense_gemv_sum_tol(in_features: usize) -> f64 {
    (in_features as f64 + 64.0) * f64::powi(2.0, -24)
}

/// `(gridDim.x, blockDim.x)` of `dense_gemv_bf16`: one warp per row,
/// DENSE_GEMV_ROWS rows per block.
pub fn gemv_shape(rows: usize) -> Result<(u32, u32)> {
    let blocks = (rows as u64).div_ceil(DENSE_GEMV_ROWS as u64);
    if blocks == 0 || blocks > i32::MAX as u64 {
        bail!(InvalidShape, "GEMV with {rows} rows is outside CUDA's grid limit");
    }
    Ok((blocks as u32, 32 * DENSE_GEMV_ROWS))
}

/// `y[r] = Σ_k w[r,k]·x[k]` for a dense bf16 weight `[rows, cols]`
/// (row-major), x and y bf16 (as u16), fp32 accumulation. The vector path
/// (cols % 8 == 0) needs `w` and `x` 16-byte aligned (checked).
pub fn gemv_bf16(dev: &CudaDevice, w: &CudaView<'_, u16>, rows: usize, cols: usize, x: &CudaView<'_, u16>, y: &mut CudaViewMut<'_, u16>) -> Result<()> {
    if rows == 0 || cols == 0 || rows > u32::MAX as usize || cols > u32::MAX as usize {
        bail!(InvalidShape, "GEMV shape [{rows}, {cols}]: each dimension must be in 1..=2^32-1");
    }
    let n = rows.checked_mul(cols).ok_or_else(|| err!(InvalidShape, "GEMV shape [{rows}, {cols}] overflows"))?;
    if w.len() != n {
        bail!(BufferSize, "weight [{rows}, {cols}] needs {n} elements, found {}", w.len());
    }
    if x.len() != cols || y.len() != rows {
        bail!(ShapeMismatch, "weight [{rows}, {cols}] needs x of {cols} and y of {rows} elements, got {} and {}", x.len(), y.len());
    }
    dev.check_stream(w, "GEMV weight")?;
    dev.check_stream(x, "GEMV x")?;
    dev.check_stream(y, "GEMV y")?;
    for (a, what) in [(w.device_ptr(&dev.stream).0, "GEMV weight"), (x.device_ptr(&dev.stream).0, "GEMV x")] {
        if cols.is_multiple_of(8) && a % 16 != 0 {
            bail!(InvalidArgument, "{what} at device address {a:#x} is not 16-byte aligned (the kernel uses 16-byte loads)");
        }
    }
    let (grid, block) = gemv_shape(rows)?;
    let name = "dense_gemv_bf16";
    let f = dev.function(&DENSE_CU, name)?;
    let (r32, c32) = (rows as u32, cols as u32);
    guard(name, || {
        let mut b = dev.stream.launch_builder(&f);
        b.arg(w).arg(&r32).arg(&c32).arg(x).arg(y);
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match (ptr, u32, u32, ptr, ptr); sizes and
        // alignment checked above.
        unsafe { b.launch(cfg) }.map_err(|e| cu_err(&format!("cuLaunchKernel({name})"), e))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn launch_constant_matches_the_kernel() {
        let src = include_str!("../../../cuda/dense.cu");
        let line = src.lines().find(|l| l.starts_with("#define DENSE_GEMV_ROWS ")).expect("#define in dense.cu");
        assert_eq!(line["#define DENSE_GEMV_ROWS ".len()..].trim(), super::DENSE_GEMV_ROWS.to_string());
    }
}
