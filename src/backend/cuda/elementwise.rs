//! Launchers for `cuda/elementwise.cu`: `y += x`, `y *= s`, the bias add, the fp32 →
//! bf16 operand conversion and the bf16 → fp32 widening, twins of one-line
//! CPU loops, bit for bit (one IEEE addition per element; round to nearest
//! even as `half::bf16::from_f32`; widening exact); and the logits' soft
//! cap, within a few ulp of the CPU's (`tanhf` against `vexp::tanh`).

use super::{launch_cfg, stride_grid, CudaDevice, ELEMENTWISE_CU};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr};

/// Threads per block (`EW_THREADS` in elementwise.cu).
const EW_THREADS: u32 = 256;

/// `y[i] += x[i]` (queued).
pub fn add(dev: &CudaDevice, y: &mut CudaViewMut<'_, f32>, x: &CudaView<'_, f32>) -> Result<()> {
    if y.len() != x.len() {
        bail!(ShapeMismatch, "add: y has {} elements, x {}", y.len(), x.len());
    }
    dev.check_stream(y, "add y")?;
    dev.check_stream(x, "add x")?;
    let n = y.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let name = "elementwise_add_f32";
    let f = dev.function(&ELEMENTWISE_CU, name)?;
    // SAFETY: (ptr, ptr, u64) as the kernel; elements < n of both (equal
    // lengths checked).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n, EW_THREADS), 1), EW_THREADS), [y, x, &n])
}

/// `y[i] *= s` (queued): one fp32 product per element, bit for bit the
/// CPU's `x * s`.
pub fn scale(dev: &CudaDevice, y: &mut CudaViewMut<'_, f32>, s: f32) -> Result<()> {
    dev.check_stream(y, "scale y")?;
    let n = y.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let name = "elementwise_scale_f32";
    let f = dev.function(&ELEMENTWISE_CU, name)?;
    // SAFETY: (ptr, u64, f32) as the kernel; elements < n of y.
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n, EW_THREADS), 1), EW_THREADS), [y, &n, &s])
}

/// `y[i] = cap·tanh(y[i]/cap)` (queued): the soft cap of the logits
/// returned (Gemma 2's `final_logit_softcapping`), the twin of the CPU
/// head's `vexp::tanh(z / c) * c` in the same order; CUDA's `tanhf`
/// against `vexp::tanh`, so within [`super::loss::softcap_tol`], not bit
/// for bit. A cap that is not finite and positive is `InvalidArgument`.
pub fn softcap(dev: &CudaDevice, y: &mut CudaViewMut<'_, f32>, cap: f32) -> Result<()> {
    let cap = super::cap_arg("softcap", Some(cap))?;
    dev.check_stream(y, "softcap y")?;
    let n = y.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let name = "elementwise_softcap_f32";
    let f = dev.function(&ELEMENTWISE_CU, name)?;
    // SAFETY: (ptr, u64, f32) as the kernel; elements < n of y.
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n, EW_THREADS), 1), EW_THREADS), [y, &n, &cap])
}

/// `y[r, c] += b[c]` over `y: [rows, b.len()]` (queued).
pub fn add_bias(dev: &CudaDevice, y: &mut CudaViewMut<'_, f32>, b: &CudaView<'_, f32>) -> Result<()> {
    let cols = b.len();
    if cols == 0 || cols > u32::MAX as usize || y.len() % cols != 0 {
        bail!(ShapeMismatch, "add_bias: y of {} elements is not rows × {cols}", y.len());
    }
    dev.check_stream(y, "bias y")?;
    dev.check_stream(b, "bias b")?;
    let rows = (y.len() / cols) as u64;
    if rows == 0 {
        return Ok(());
    }
    let c32 = cols as u32;
    let name = "elementwise_add_bias_f32";
    let f = dev.function(&ELEMENTWISE_CU, name)?;
    // SAFETY: (ptr, ptr, u64, u32) as the kernel; y has rows·cols elements,
    // b has cols (checked).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(rows * cols as u64, EW_THREADS), 1), EW_THREADS), [y, b, &rows, &c32])
}

/// `y[i] = bf16(x[i])` (bits in `u16`; queued).
pub fn to_bf16(dev: &CudaDevice, x: &CudaView<'_, f32>, y: &mut CudaViewMut<'_, u16>) -> Result<()> {
    if y.len() != x.len() {
        bail!(ShapeMismatch, "to_bf16: x has {} elements, y {}", x.len(), y.len());
    }
    dev.check_stream(x, "to_bf16 x")?;
    dev.check_stream(y, "to_bf16 y")?;
    let n = x.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let name = "elementwise_f32_to_bf16";
    let f = dev.function(&ELEMENTWISE_CU, name)?;
    // SAFETY: (ptr, ptr, u64) as the kernel; elements < n of both.
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n, EW_THREADS), 1), EW_THREADS), [x, y, &n])
}

/// `y[i] = widen(x[i])`, or `y[i] += widen(x[i])` with `accumulate`
/// (`x` bf16 bits; queued).
pub fn from_bf16(dev: &CudaDevice, x: &CudaView<'_, u16>, y: &mut CudaViewMut<'_, f32>, accumulate: bool) -> Result<()> {
    if y.len() != x.len() {
        bail!(ShapeMismatch, "from_bf16: x has {} elements, y {}", x.len(), y.len());
    }
    dev.check_stream(x, "from_bf16 x")?;
    dev.check_stream(y, "from_bf16 y")?;
    let n = x.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let acc = accumulate as u32;
    let name = "elementwise_bf16_to_f32";
    let f = dev.function(&ELEMENTWISE_CU, name)?;
    // SAFETY: (ptr, ptr, u64, u32) as the kernel; elements < n of both.
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n, EW_THREADS), 1), EW_THREADS), [x, y, &n, &acc])
}

/// Checks a `[rows, cols]` source of `src_len` elements going into columns
/// `off..off + cols` of a `[rows, ld]` destination of `dst_len`.
fn check_cols(what: &str, src_len: usize, rows: usize, cols: usize, dst_len: usize, ld: usize, off: usize) -> Result<()> {
    if rows.checked_mul(cols) != Some(src_len) || cols > u32::MAX as usize {
        bail!(ShapeMismatch, "{what}: src of {src_len} elements is not [{rows}, {cols}]");
    }
    if off.checked_add(cols).is_none_or(|e| e > ld) || rows.checked_mul(ld) != Some(dst_len) {
        bail!(ShapeMismatch, "{what}: columns {off}..{} do not fit dst [{rows}, {ld}] of {dst_len} elements", off.saturating_add(cols));
    }
    Ok(())
}

/// `y[i, off + j] = bf16(x[i, j])`: `x` `[rows, cols]` rounded into columns
/// `off..off + cols` of `y` `[rows, ld]` (bits as [`to_bf16`]); the other
/// columns are not touched (queued).
pub fn to_bf16_cols(dev: &CudaDevice, x: &CudaView<'_, f32>, rows: usize, cols: usize, y: &mut CudaViewMut<'_, u16>, ld: usize, off: usize) -> Result<()> {
    into_cols(dev, "elementwise_f32_to_bf16_cols", x, rows, cols, y, ld, off)
}

/// Copies `src` `[rows, cols]` (bf16 bits) into columns `off..off + cols`
/// of `dst` `[rows, ld]`; the other columns are not touched (queued).
pub fn copy_cols_bf16(dev: &CudaDevice, src: &CudaView<'_, u16>, rows: usize, cols: usize, dst: &mut CudaViewMut<'_, u16>, ld: usize, off: usize) -> Result<()> {
    into_cols(dev, "elementwise_copy_cols_u16", src, rows, cols, dst, ld, off)
}

/// Launches kernel `name` (`(src, u64 rows, u32 cols, u64 ld, u64 off,
/// dst)`, one source element per output, grid-stride) writing `src`
/// `[rows, cols]` into columns `off..off + cols` of `dst` `[rows, ld]`.
#[allow(clippy::too_many_arguments)]
fn into_cols<T: DeviceRepr>(dev: &CudaDevice, name: &'static str, src: &CudaView<'_, T>, rows: usize, cols: usize, dst: &mut CudaViewMut<'_, u16>, ld: usize, off: usize) -> Result<()> {
    check_cols(name, src.len(), rows, cols, dst.len(), ld, off)?;
    dev.check_stream(src, "wide columns: source")?;
    dev.check_stream(dst, "wide columns: destination")?;
    let n = src.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let (r64, c32, ld64, off64) = (rows as u64, cols as u32, ld as u64, off as u64);
    let f = dev.function(&ELEMENTWISE_CU, name)?;
    // SAFETY: (ptr, u64, u32, u64, u64, ptr) as both kernels; they read the
    // rows·cols elements of src and write row i's columns off..off+cols of
    // dst, all below rows·ld (checked).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n, EW_THREADS), 1), EW_THREADS), [src, &r64, &c32, &ld64, &off64, dst])
}

#[cfg(test)]
mod tests {
    #[test]
    fn launch_constant_matches_the_kernel() {
        let src = include_str!("../../../cuda/elementwise.cu");
        let line = src.lines().find(|l| l.starts_with("#define EW_THREADS ")).expect("#define in elementwise.cu");
        assert_eq!(line["#define EW_THREADS ".len()..].trim(), super::EW_THREADS.to_string());
    }
}
