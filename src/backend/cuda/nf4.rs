//! Launchers for `cuda/nf4.cu`: argument checks, launch shapes, and
//! host-side glue. Each kernel computes the function of its CPU twin in
//! `backend::cpu::nf4` (see the comment at the top of the .cu file):
//!
//! | kernel | CPU twin | agreement |
//! |---|---|---|
//! | `nf4_quantize_{f32,f16,bf16}` | `cpu::nf4::nf4_quantize` | bit for bit |
//! | `nf4_dequantize_{f32,f16,bf16}` | `cpu::nf4::nf4_dequantize` | bit for bit |
//! | `nf4_absmax_decode` | `DoubleQuant::decode` | bit for bit |
//! | `nf4_gemv_bf16` | dequantize, then an exact dot product | [`GEMV_REL_TOL`] bound |
//!
//! Three levels of API:
//! - device buffers: [`quantize`], [`dequantize`], [`absmax_decode`],
//!   [`gemv_bf16`] take cudarc views and only launch (no synchronization);
//! - [`CudaNf4`], an NF4 tensor resident on the device, with or without
//!   double quantization;
//! - host convenience: [`quantize_host`], [`dequantize_host`],
//!   [`absmax_decode_host`], [`gemv_bf16_host`] take host slices and an
//!   [`Nf4Tensor`], and return when the result is on the host.
//!
//! Double quantization's offset is `mean(absmax)` in torch's fp32 summation
//! order; that stays on the host: the fp32 scales (n/bs floats) are copied
//! back and [`DoubleQuant::compress`] runs on them, then its codes go up.

use super::{cu_err, guard, CudaDevice, DevBuffer, DevElems, DevElemsMut, NF4_CU};
use crate::dtype::{checked_numel, DType, Elems, ElemsMut};
use crate::error::Result;
use crate::quant::nf4::{check_blocksize, Absmax, DoubleQuant, Nf4Params, Nf4Tensor};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;
use half::slice::HalfFloatSliceExt;

/// Threads per thread block of `nf4_quantize_*` (`Q_THREADS` in nf4.cu).
const Q_THREADS: u32 = 256;
/// Threads per thread block of `nf4_dequantize_*` (`DQ_THREADS`).
const DQ_THREADS: u32 = 256;
/// Elements one dequantize thread writes: 16 bytes of codes.
const DQ_CHUNK: usize = 32;
/// Chunks each `nf4_dequantize_*` thread converts (`DQ_CHUNKS_PER_THREAD`).
const DQ_CHUNKS_PER_THREAD: u32 = 2;
/// Threads per thread block of `nf4_absmax_decode`.
const DECODE_THREADS: u32 = 256;
/// Rows per thread block of `nf4_gemv_bf16`, one warp each (`GEMV_ROWS`).
const GEMV_ROWS: u32 = 4;
/// Most vectors one `nf4_gemv_bf16` launch multiplies (`GEMV_MAX_BATCH`).
pub const GEMV_MAX_BATCH: usize = 8;
/// Alignment the vectorized kernels need for codes and dense data (uint4).
const VEC_ALIGN: u64 = 16;
/// The CUDA limit on `gridDim.x`.
const MAX_GRID_X: u64 = i32::MAX as u64;

/// Relative error bound of `nf4_gemv_bf16` against the exact dot product of
/// the CPU-dequantized weights with x (computed in f64), per output:
/// `|y - exact| <= GEMV_REL_TOL * |exact| + gemv_sum_tol(in) * sum_k |w_k x_k|`.
/// The first term is the final rounding to bf16 (half an ulp is 2^-9
/// relative; 2^-8 leaves room for the fp32 error it rounds). The second is
/// the fp32 accumulation, see [`gemv_sum_tol`].
pub const GEMV_REL_TOL: f64 = 1.0 / 256.0;

/// fp32 accumulation error bound of `nf4_gemv_bf16` relative to
/// `sum_k |w_k x_k|`: recursive summation of m terms with FMAs errs by at
/// most `m·u` (u = 2^-24) of that sum; a lane sums in/32 terms in chunks of
/// 32 scaled once by the block scale (two more roundings per chunk), then
/// five shuffle additions: m = in/32 + 32 + 2 + 5 is the longest chain. We
/// take `(in + 64)·u`, which covers it with room.
pub fn gemv_sum_tol(in_features: usize) -> f64 {
    (in_features as f64 + 64.0) * f64::powi(2.0, -24)
}

fn grid_x(blocks: u64, what: &str) -> Result<u32> {
    if blocks == 0 || blocks > MAX_GRID_X {
        bail!(InvalidShape, "{what}: {blocks} thread blocks is outside CUDA's grid limit (1..={MAX_GRID_X})");
    }
    Ok(blocks as u32)
}

fn cfg(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

fn check_aligned(addr: u64, what: &str) -> Result<()> {
    if !addr.is_multiple_of(VEC_ALIGN) {
        bail!(InvalidArgument, "{what} at device address {addr:#x} is not {VEC_ALIGN}-byte aligned (the kernel uses 16-byte loads and stores)");
    }
    Ok(())
}

fn addr<T, S: DevicePtr<T>>(dev: &CudaDevice, s: &S) -> u64 {
    s.device_ptr(&dev.stream).0
}

// ------------------------------------------------------------ launch shapes
// `(gridDim.x, blockDim.x)` of each kernel, as the .cu file's comments
// describe them. Public so a CPU emulation of the kernels (tests) launches
// them exactly as the GPU does.

/// `nf4_quantize_*`: 256 threads; min(bs/2, 256) threads per NF4 block.
pub fn quantize_shape(n: usize, blocksize: usize) -> Result<(u32, u32)> {
    check_blocksize(blocksize)?;
    let group = (blocksize as u32 / 2).min(Q_THREADS);
    let per_cta = (Q_THREADS / group) as u64;
    Ok((grid_x((n.div_ceil(blocksize) as u64).div_ceil(per_cta), "nf4_quantize")?, Q_THREADS))
}

/// `nf4_dequantize_*`: one thread per 32 elements, 256 per block.
pub fn dequantize_shape(n: usize) -> Result<(u32, u32)> {
    Ok((grid_x((n.div_ceil(DQ_CHUNK) as u64).div_ceil((DQ_THREADS * DQ_CHUNKS_PER_THREAD) as u64), "nf4_dequantize")?, DQ_THREADS))
}

/// `nf4_absmax_decode`: grid-stride, enough blocks to fill any GPU, no more.
pub fn absmax_decode_shape(n: usize) -> (u32, u32) {
    ((n as u64).div_ceil(DECODE_THREADS as u64).clamp(1, 1 << 16) as u32, DECODE_THREADS)
}

/// `nf4_gemv_bf16`: one warp per row, GEMV_ROWS rows per block.
pub fn gemv_shape(rows: usize) -> Result<(u32, u32)> {
    Ok((grid_x((rows as u64).div_ceil(GEMV_ROWS as u64), "nf4_gemv_bf16")?, 32 * GEMV_ROWS))
}

// ---------------------------------------------------------------- device API

/// Quantizes `x` (n elements, finite) in blocks of `blocksize` into `packed`
/// (⌈n/2⌉ bytes) and `absmax` (⌈n/blocksize⌉ fp32 scales), bit for bit as
/// `cpu::nf4::nf4_quantize`. Queues the work on the device's stream.
pub fn quantize(dev: &CudaDevice, x: &DevElems<'_>, blocksize: usize, packed: &mut CudaViewMut<'_, u8>, absmax: &mut CudaViewMut<'_, f32>) -> Result<()> {
    check_blocksize(blocksize)?;
    let n = x.len();
    if n == 0 {
        bail!(InvalidShape, "cannot quantize an empty tensor");
    }
    if packed.len() != n.div_ceil(2) {
        bail!(BufferSize, "{n} elements pack into {} bytes, the output holds {}", n.div_ceil(2), packed.len());
    }
    let nblocks = n.div_ceil(blocksize);
    if absmax.len() != nblocks {
        bail!(BufferSize, "{n} elements in blocks of {blocksize} need {nblocks} absmax values, the output holds {}", absmax.len());
    }
    x.check_stream(dev, "quantize input")?;
    dev.check_stream(packed, "quantize output (packed)")?;
    dev.check_stream(absmax, "quantize output (absmax)")?;
    let (grid, block) = quantize_shape(n, blocksize)?;
    let name = match x.dtype() {
        DType::F32 => "nf4_quantize_f32",
        DType::F16 => "nf4_quantize_f16",
        DType::BF16 => "nf4_quantize_bf16",
    };
    let f = dev.function(&NF4_CU, name)?;
    let (n64, bs32) = (n as u64, blocksize as u32);
    guard(name, || {
        let mut b = dev.stream.launch_builder(&f);
        match x {
            DevElems::F32(v) => b.arg(v),
            DevElems::F16(v) | DevElems::BF16(v) => b.arg(v),
        };
        b.arg(&n64).arg(&bs32).arg(packed).arg(absmax);
        // SAFETY: the argument list matches the kernel's signature
        // (pointer, u64, u32, pointer, pointer); the buffer sizes were
        // checked above against what the launch shape makes it touch.
        unsafe { b.launch(cfg(grid, block)) }.map_err(|e| cu_err(&format!("cuLaunchKernel({name})"), e))?;
        Ok(())
    })
}

/// Writes `out[i] = NF4_CODE[q_i] · absmax[i / blocksize]`, rounded once to
/// the output's dtype, bit for bit as `cpu::nf4::nf4_dequantize`. `packed`
/// and `out` must start 16-byte aligned (whole allocations always do).
pub fn dequantize(dev: &CudaDevice, packed: &CudaView<'_, u8>, absmax: &CudaView<'_, f32>, blocksize: usize, out: &mut DevElemsMut<'_>) -> Result<()> {
    dequantize_from(dev, packed, Scales::F32(absmax), blocksize, out)
}

/// [`dequantize`] from a double-quantized state: each block's scale decoded
/// in the same pass, as [`absmax_decode`] decodes it (the same value; no
/// pass and no buffer for the decoded scales).
pub fn dequantize_double(dev: &CudaDevice, packed: &CudaView<'_, u8>, dq: &CudaDoubleQuant, blocksize: usize, out: &mut DevElemsMut<'_>) -> Result<()> {
    dequantize_from(dev, packed, Scales::Double(dq), blocksize, out)
}

/// Where [`dequantize_from`] takes the block scales.
enum Scales<'a> {
    F32(&'a CudaView<'a, f32>),
    Double(&'a CudaDoubleQuant),
}

/// Rows written into a wider matrix: `[rows, cols]` into rows of `ld`
/// elements ([`CudaNf4::dequantize_bf16_ld`]).
#[derive(Clone, Copy)]
struct Strided {
    cols: usize,
    ld: usize,
}

fn dequantize_from(dev: &CudaDevice, packed: &CudaView<'_, u8>, scales: Scales<'_>, blocksize: usize, out: &mut DevElemsMut<'_>) -> Result<()> {
    dequantize_rows(dev, packed, scales, blocksize, out, None)
}

fn dequantize_rows(dev: &CudaDevice, packed: &CudaView<'_, u8>, scales: Scales<'_>, blocksize: usize, out: &mut DevElemsMut<'_>, strided: Option<Strided>) -> Result<()> {
    check_blocksize(blocksize)?;
    // The element count: the output's, or for rows written into a wider
    // matrix rows·cols of its rows·ld.
    let n = match strided {
        None => out.len(),
        Some(Strided { cols, ld }) => {
            if out.dtype() != DType::BF16 {
                bail!(Unsupported, "strided dequantization writes bf16 only, not {:?}", out.dtype());
            }
            if cols == 0 || !cols.is_multiple_of(32) || ld < cols || !ld.is_multiple_of(8) || !out.len().is_multiple_of(ld) {
                bail!(InvalidShape, "strided dequantization needs cols a multiple of 32 and ld >= cols a multiple of 8 dividing the output ({} elements); got cols {cols}, ld {ld}", out.len());
            }
            out.len() / ld * cols
        }
    };
    if n == 0 {
        bail!(InvalidShape, "cannot dequantize into an empty output");
    }
    if packed.len() != n.div_ceil(2) {
        bail!(BufferSize, "an output of {n} elements needs {} packed bytes, found {}", n.div_ceil(2), packed.len());
    }
    check_scales(dev, &scales, n, blocksize).map_err(|e| e.context("dequantize"))?;
    dev.check_stream(packed, "dequantize input (packed)")?;
    out.check_stream(dev, "dequantize output")?;
    check_aligned(addr(dev, packed), "packed codes")?;
    check_aligned(out.device_addr(dev), "dequantize output")?;
    let (grid, block) = dequantize_shape(n)?;
    let name = match (out.dtype(), &scales) {
        (DType::BF16, Scales::F32(_)) if strided.is_some() => "nf4_dequantize_ld_bf16",
        (DType::BF16, Scales::Double(_)) if strided.is_some() => "nf4_dequantize_dq_ld_bf16",
        (DType::F32, Scales::F32(_)) => "nf4_dequantize_f32",
        (DType::F16, Scales::F32(_)) => "nf4_dequantize_f16",
        (DType::BF16, Scales::F32(_)) => "nf4_dequantize_bf16",
        (DType::F32, Scales::Double(_)) => "nf4_dequantize_dq_f32",
        (DType::F16, Scales::Double(_)) => "nf4_dequantize_dq_f16",
        (DType::BF16, Scales::Double(_)) => "nf4_dequantize_dq_bf16",
    };
    let f = dev.function(&NF4_CU, name)?;
    let (shift, n64) = (blocksize.trailing_zeros(), n as u64);
    let nbs = match &scales {
        Scales::Double(dq) => dq.nested_blocksize as u64,
        Scales::F32(_) => 0,
    };
    guard(name, || {
        let mut b = dev.stream.launch_builder(&f);
        b.arg(packed);
        push_scales(&mut b, &scales, &nbs);
        b.arg(&shift).arg(&n64);
        let (cols32, ld64) = strided.map_or((0u32, 0u64), |s| (s.cols as u32, s.ld as u64));
        if strided.is_some() {
            b.arg(&cols32).arg(&ld64);
        }
        match out {
            DevElemsMut::F32(v) => b.arg(v),
            DevElemsMut::F16(v) | DevElemsMut::BF16(v) => b.arg(v),
        };
        // SAFETY: arguments match the kernel's (packed, then absmax — or
        // codes, map, nested, u64 nested blocksize, f32 offset — then u32,
        // u64, (strided: u32 cols, u64 ld,) out); sizes and alignment
        // checked above (strided: the output holds n / cols rows of ld).
        unsafe { b.launch(cfg(grid, block)) }.map_err(|e| cu_err(&format!("cuLaunchKernel({name})"), e))?;
        Ok(())
    })
}

/// Double-quantization decode: `out[i] = map[codes[i]] · nested[i /
/// nested_blocksize] + offset` (fp32 multiply, then fp32 add), bit for bit
/// as [`DoubleQuant::decode`].
pub fn absmax_decode(
    dev: &CudaDevice,
    codes: &CudaView<'_, u8>,
    map: &CudaView<'_, f32>,
    nested: &CudaView<'_, f32>,
    nested_blocksize: usize,
    offset: f32,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let n = codes.len();
    if n == 0 {
        bail!(InvalidShape, "no absmax codes to decode");
    }
    if out.len() != n {
        bail!(BufferSize, "{n} absmax codes decode into {n} values, the output holds {}", out.len());
    }
    check_double(dev, codes, map, nested, nested_blocksize)?;
    dev.check_stream(out, "decoded absmax")?;
    let (grid, block) = absmax_decode_shape(n);
    let name = "nf4_absmax_decode";
    let f = dev.function(&NF4_CU, name)?;
    let (nbs, n64) = (nested_blocksize as u64, n as u64);
    guard(name, || {
        let mut b = dev.stream.launch_builder(&f);
        b.arg(codes).arg(map).arg(nested).arg(&nbs).arg(&offset).arg(&n64).arg(out);
        // SAFETY: arguments match (ptr, ptr, ptr, u64, f32, u64, ptr); sizes
        // checked above.
        unsafe { b.launch(cfg(grid, block)) }.map_err(|e| cu_err(&format!("cuLaunchKernel({name})"), e))?;
        Ok(())
    })
}

/// Batch-1 GEMV with an NF4 weight: `y[r] = Σ_k W[r,k]·x[k]` for W
/// `[rows, cols]` (row-major flattening, blocks of `blocksize` over it),
/// given its packed codes and fp32 scales (decode double quantization
/// first: [`CudaNf4::absmax_f32`]). x and y are bf16 (as u16), accumulation
/// fp32; within [`GEMV_REL_TOL`] / [`gemv_sum_tol`] of the exact result.
/// `packed` and `x` must start 16-byte aligned.
#[allow(clippy::too_many_arguments)]
pub fn gemv_bf16(
    dev: &CudaDevice,
    packed: &CudaView<'_, u8>,
    absmax: &CudaView<'_, f32>,
    blocksize: usize,
    rows: usize,
    cols: usize,
    x: &CudaView<'_, u16>,
    y: &mut CudaViewMut<'_, u16>,
) -> Result<()> {
    gemv_bf16_batch(dev, packed, absmax, blocksize, rows, cols, 1, x, y)
}

/// [`gemv_bf16`] for `nb` vectors at once (1..=[`GEMV_MAX_BATCH`]: a
/// decode step's few rows): `x` `[nb, cols]`, `y` `[nb, rows]`. The weight
/// is read once; each vector's result has the bits of its own
/// [`gemv_bf16`] call.
#[allow(clippy::too_many_arguments)]
pub fn gemv_bf16_batch(
    dev: &CudaDevice,
    packed: &CudaView<'_, u8>,
    absmax: &CudaView<'_, f32>,
    blocksize: usize,
    rows: usize,
    cols: usize,
    nb: usize,
    x: &CudaView<'_, u16>,
    y: &mut CudaViewMut<'_, u16>,
) -> Result<()> {
    gemv_from(dev, packed, Scales::F32(absmax), blocksize, rows, cols, nb, x, y)
}

/// [`gemv_bf16_batch`] from a double-quantized state: each block's scale
/// decoded where the kernel reads it (the bits of [`absmax_decode`] then
/// [`gemv_bf16_batch`], without that pass and its buffer).
#[allow(clippy::too_many_arguments)]
pub fn gemv_bf16_batch_double(
    dev: &CudaDevice,
    packed: &CudaView<'_, u8>,
    dq: &CudaDoubleQuant,
    blocksize: usize,
    rows: usize,
    cols: usize,
    nb: usize,
    x: &CudaView<'_, u16>,
    y: &mut CudaViewMut<'_, u16>,
) -> Result<()> {
    gemv_from(dev, packed, Scales::Double(dq), blocksize, rows, cols, nb, x, y)
}

/// Checks a block-scale source for `n` elements in blocks of `blocksize`.
fn check_scales(dev: &CudaDevice, scales: &Scales<'_>, n: usize, blocksize: usize) -> Result<()> {
    let nblocks = n.div_ceil(blocksize);
    match scales {
        Scales::F32(a) => {
            if a.len() != nblocks {
                bail!(BufferSize, "{n} elements in blocks of {blocksize} need {nblocks} absmax values, found {}", a.len());
            }
            dev.check_stream(*a, "absmax")
        }
        Scales::Double(dq) => {
            if dq.codes.len() != nblocks {
                bail!(BufferSize, "{n} elements in blocks of {blocksize} need {nblocks} absmax codes, found {}", dq.codes.len());
            }
            check_double(dev, &dq.codes.as_view(), &dq.map.as_view(), &dq.nested_absmax.as_view(), dq.nested_blocksize)
        }
    }
}

/// A double-quantized state's parts agree: a 256-entry map, one nested
/// absmax per `nested_blocksize` codes; all on the device's stream.
fn check_double(dev: &CudaDevice, codes: &CudaView<'_, u8>, map: &CudaView<'_, f32>, nested: &CudaView<'_, f32>, nested_blocksize: usize) -> Result<()> {
    let n = codes.len();
    if map.len() != 256 {
        bail!(BufferSize, "the 8-bit code map has {} entries, expected 256", map.len());
    }
    if nested_blocksize == 0 {
        bail!(InvalidArgument, "nested blocksize is 0");
    }
    if nested.len() != n.div_ceil(nested_blocksize) {
        bail!(BufferSize, "{n} codes in nested blocks of {nested_blocksize} need {} nested absmax values, found {}", n.div_ceil(nested_blocksize), nested.len());
    }
    dev.check_stream(codes, "absmax codes")?;
    dev.check_stream(map, "absmax code map")?;
    dev.check_stream(nested, "nested absmax")
}

/// The kernel arguments of a block-scale source: the fp32 absmax, or the
/// double-quantized state's codes, map, nested absmax, nested blocksize
/// and offset (`nbs` holds the blocksize as the kernel's u64).
fn push_scales<'a>(b: &mut cudarc::driver::LaunchArgs<'a>, scales: &'a Scales<'a>, nbs: &'a u64) {
    match scales {
        Scales::F32(a) => {
            b.arg(*a);
        }
        Scales::Double(dq) => {
            b.arg(&dq.codes).arg(&dq.map).arg(&dq.nested_absmax).arg(nbs).arg(&dq.offset);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn gemv_from(dev: &CudaDevice, packed: &CudaView<'_, u8>, scales: Scales<'_>, blocksize: usize, rows: usize, cols: usize, nb: usize, x: &CudaView<'_, u16>, y: &mut CudaViewMut<'_, u16>) -> Result<()> {
    check_blocksize(blocksize)?;
    if nb == 0 || nb > GEMV_MAX_BATCH {
        bail!(InvalidArgument, "GEMV batch of {nb} vectors: 1..={GEMV_MAX_BATCH}");
    }
    if rows == 0 || cols == 0 || rows > u32::MAX as usize || cols > u32::MAX as usize {
        bail!(InvalidShape, "GEMV shape [{rows}, {cols}]: each dimension must be in 1..=2^32-1");
    }
    let n = rows.checked_mul(cols).ok_or_else(|| err!(InvalidShape, "GEMV shape [{rows}, {cols}] overflows"))?;
    if packed.len() != n.div_ceil(2) {
        bail!(BufferSize, "weight [{rows}, {cols}] needs {} packed bytes, found {}", n.div_ceil(2), packed.len());
    }
    check_scales(dev, &scales, n, blocksize).map_err(|e| e.context(&format!("GEMV weight [{rows}, {cols}]")))?;
    if x.len() != nb * cols {
        bail!(ShapeMismatch, "x has {} elements, {nb} vectors for the weight [{rows}, {cols}] need {}", x.len(), nb * cols);
    }
    if y.len() != nb * rows {
        bail!(ShapeMismatch, "y has {} elements, the weight [{rows}, {cols}] gives {} for {nb} vectors", y.len(), nb * rows);
    }
    dev.check_stream(packed, "GEMV weight codes")?;
    dev.check_stream(x, "GEMV x")?;
    dev.check_stream(y, "GEMV y")?;
    check_aligned(addr(dev, packed), "GEMV weight codes")?;
    check_aligned(addr(dev, x), "GEMV x")?;
    let (grid, block) = gemv_shape(rows)?;
    let name = match scales {
        Scales::F32(_) => "nf4_gemv_bf16",
        Scales::Double(_) => "nf4_gemv_dq_bf16",
    };
    let f = dev.function(&NF4_CU, name)?;
    let (shift, r32, c32, nb32) = (blocksize.trailing_zeros(), rows as u32, cols as u32, nb as u32);
    let nbs = match &scales {
        Scales::Double(dq) => dq.nested_blocksize as u64,
        Scales::F32(_) => 0,
    };
    guard(name, || {
        let mut b = dev.stream.launch_builder(&f);
        b.arg(packed);
        push_scales(&mut b, &scales, &nbs);
        b.arg(&shift).arg(&r32).arg(&c32).arg(&nb32).arg(x).arg(y);
        // SAFETY: arguments match the kernel's (packed, the scales as
        // push_scales gives them, u32, u32, u32, u32, ptr, ptr); sizes (x:
        // nb·cols, y: nb·rows) and alignment checked above.
        unsafe { b.launch(cfg(grid, block)) }.map_err(|e| cu_err(&format!("cuLaunchKernel({name})"), e))?;
        Ok(())
    })
}

// ------------------------------------------------------- device-resident NF4

/// Double-quantized scales on the device (see [`DoubleQuant`]).
pub struct CudaDoubleQuant {
    pub codes: CudaSlice<u8>,
    pub nested_absmax: CudaSlice<f32>,
    /// The 256-entry 8-bit code book.
    pub map: CudaSlice<f32>,
    pub offset: f32,
    pub nested_blocksize: usize,
}

/// Block scales on the device.
pub enum CudaAbsmax {
    F32(CudaSlice<f32>),
    Double(CudaDoubleQuant),
}

/// An NF4 tensor resident on a device: the device twin of [`Nf4Tensor`].
pub struct CudaNf4 {
    pub shape: Vec<usize>,
    /// Dtype of the dense tensor it came from.
    pub dtype: DType,
    pub blocksize: usize,
    pub packed: CudaSlice<u8>,
    pub absmax: CudaAbsmax,
}

impl CudaNf4 {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Copies a host NF4 tensor to the device.
    pub fn upload(dev: &CudaDevice, t: &Nf4Tensor) -> Result<CudaNf4> {
        let absmax = match t.absmax() {
            Absmax::F32(a) => CudaAbsmax::F32(dev.upload(a)?),
            Absmax::Double(d) => CudaAbsmax::Double(CudaDoubleQuant {
                codes: dev.upload(&d.codes)?,
                nested_absmax: dev.upload(&d.nested_absmax)?,
                map: dev.upload(&d.map[..])?,
                offset: d.offset,
                nested_blocksize: d.nested_blocksize,
            }),
        };
        Ok(CudaNf4 { shape: t.shape().to_vec(), dtype: t.dtype(), blocksize: t.blocksize(), packed: dev.upload(t.packed())?, absmax })
    }

    /// Copies the tensor back to the host.
    pub fn download(&self, dev: &CudaDevice) -> Result<Nf4Tensor> {
        let packed = dev.download(&self.packed)?;
        let absmax = match &self.absmax {
            CudaAbsmax::F32(a) => Absmax::F32(dev.download(a)?),
            CudaAbsmax::Double(d) => {
                let map: Vec<f32> = dev.download(&d.map)?;
                let map: Box<[f32; 256]> = map.into_boxed_slice().try_into().map_err(|_| err!(Internal, "device code map is not 256 entries"))?;
                Absmax::Double(DoubleQuant {
                    codes: dev.download(&d.codes)?,
                    nested_absmax: dev.download(&d.nested_absmax)?,
                    offset: d.offset,
                    nested_blocksize: d.nested_blocksize,
                    map,
                })
            }
        };
        Nf4Tensor::from_parts(self.shape.clone(), self.dtype, self.blocksize, packed, absmax)
    }

    /// Quantizes a device tensor of shape `shape` (finite values: unlike the
    /// host path this does not scan for NaN/Inf, which give unspecified
    /// codes). With double quantization the fp32 scales make a round trip
    /// through the host for [`DoubleQuant::compress`] (torch's mean order).
    pub fn quantize(dev: &CudaDevice, x: &DevElems<'_>, shape: &[usize], params: Nf4Params) -> Result<CudaNf4> {
        check_blocksize(params.blocksize)?;
        let n = checked_numel(shape, x.dtype().size())?;
        if n != x.len() {
            bail!(BufferSize, "shape {shape:?} has {n} elements but the input holds {}", x.len());
        }
        let bs = params.blocksize;
        let mut packed = dev.alloc_filled::<u8>(n.div_ceil(2), 0xFF)?;
        let mut absmax = dev.alloc_filled::<f32>(n.div_ceil(bs), 0xFF)?;
        quantize(dev, x, bs, &mut packed.as_view_mut(), &mut absmax.as_view_mut())?;
        let absmax = if params.double_quant {
            let host = dev.download(&absmax)?;
            let d = DoubleQuant::compress(&host);
            CudaAbsmax::Double(CudaDoubleQuant {
                codes: dev.upload(&d.codes)?,
                nested_absmax: dev.upload(&d.nested_absmax)?,
                map: dev.upload(&d.map[..])?,
                offset: d.offset,
                nested_blocksize: d.nested_blocksize,
            })
        } else {
            CudaAbsmax::F32(absmax)
        };
        Ok(CudaNf4 { shape: shape.to_vec(), dtype: x.dtype(), blocksize: bs, packed, absmax })
    }

    /// The fp32 block scales on the device: a copy of them, or for double
    /// quantization their decode (one `nf4_absmax_decode` launch). Kernels
    /// that run many times on one weight should keep this rather than
    /// decode per call (it costs 4 bytes per block of device memory).
    pub fn absmax_f32(&self, dev: &CudaDevice) -> Result<CudaSlice<f32>> {
        match &self.absmax {
            CudaAbsmax::F32(a) => {
                dev.check_stream(a, "absmax")?;
                dev.duplicate(a)
            }
            CudaAbsmax::Double(d) => {
                let mut out = dev.alloc_filled::<f32>(d.codes.len(), 0xFF)?;
                absmax_decode(dev, &d.codes.as_view(), &d.map.as_view(), &d.nested_absmax.as_view(), d.nested_blocksize, d.offset, &mut out.as_view_mut())?;
                Ok(out)
            }
        }
    }

    /// Dequantizes into `out` (numel elements, any of the three dtypes).
    pub fn dequantize_into(&self, dev: &CudaDevice, out: &mut DevElemsMut<'_>) -> Result<()> {
        if out.len() != self.numel() {
            bail!(BufferSize, "output holds {} elements, the tensor {:?} has {}", out.len(), self.shape, self.numel());
        }
        match &self.absmax {
            CudaAbsmax::F32(a) => dequantize(dev, &self.packed.as_view(), &a.as_view(), self.blocksize, out),
            CudaAbsmax::Double(dq) => dequantize_double(dev, &self.packed.as_view(), dq, self.blocksize, out),
        }
    }

    /// Dequantizes this 2-D weight `[rows, cols]` to bf16 into the first
    /// `cols` columns of `out` `[rows, ld]` (the same values as
    /// [`dequantize_into`](Self::dequantize_into)); columns `cols..ld` are
    /// not written. `cols` must be a multiple of 32 and `ld ≥ cols` a
    /// multiple of 8 (each row 16-byte aligned).
    pub fn dequantize_bf16_ld(&self, dev: &CudaDevice, out: &mut CudaViewMut<'_, u16>, ld: usize) -> Result<()> {
        let [rows, cols] = self.shape[..] else {
            bail!(InvalidShape, "strided dequantization needs a 2-D weight, this one has shape {:?}", self.shape);
        };
        if rows.checked_mul(ld) != Some(out.len()) {
            bail!(BufferSize, "output holds {} elements, [{rows}, {ld}] needs {}", out.len(), rows.saturating_mul(ld));
        }
        let mut o = DevElemsMut::BF16(out.slice_mut(..));
        let s = Some(Strided { cols, ld });
        match &self.absmax {
            CudaAbsmax::F32(a) => dequantize_rows(dev, &self.packed.as_view(), Scales::F32(&a.as_view()), self.blocksize, &mut o, s),
            CudaAbsmax::Double(dq) => dequantize_rows(dev, &self.packed.as_view(), Scales::Double(dq), self.blocksize, &mut o, s),
        }
    }

    /// `y = W·x` for this tensor as a 2-D weight `[rows, cols]`, x and y bf16
    /// on the device; `x` `[nb, cols]` and `y` `[nb, rows]` for nb vectors
    /// (1..=[`GEMV_MAX_BATCH`], [`gemv_bf16_batch`]). Double-quantized
    /// scales are decoded where the kernel reads them
    /// ([`gemv_bf16_batch_double`]).
    pub fn gemv_bf16(&self, dev: &CudaDevice, x: &CudaView<'_, u16>, y: &mut CudaViewMut<'_, u16>) -> Result<()> {
        let [rows, cols] = self.shape[..] else {
            bail!(InvalidShape, "GEMV needs a 2-D weight [out, in], this one has shape {:?}", self.shape);
        };
        // x [nb, cols] for nb vectors (gemv_bf16_batch checks nb and y).
        if cols == 0 || x.len() % cols != 0 {
            bail!(ShapeMismatch, "x has {} elements, not a whole number of vectors of {cols} for the weight [{rows}, {cols}]", x.len());
        }
        let nb = x.len() / cols;
        match &self.absmax {
            CudaAbsmax::F32(a) => gemv_bf16_batch(dev, &self.packed.as_view(), &a.as_view(), self.blocksize, rows, cols, nb, x, y),
            CudaAbsmax::Double(dq) => gemv_bf16_batch_double(dev, &self.packed.as_view(), dq, self.blocksize, rows, cols, nb, x, y),
        }
    }
}

// ----------------------------------------------------------------- host API

/// [`Nf4Tensor::quantize`] on the GPU: same checks (blocksize, shape, NaN
/// and ±Inf refused naming the first flat index), same result bit for bit.
pub fn quantize_host(dev: &CudaDevice, x: Elems<'_>, shape: &[usize], params: Nf4Params) -> Result<Nf4Tensor> {
    check_blocksize(params.blocksize)?;
    let n = checked_numel(shape, x.dtype().size())?;
    if n != x.len() {
        bail!(BufferSize, "shape {shape:?} has {n} elements but the input holds {}", x.len());
    }
    if let Some(i) = x.first_non_finite() {
        bail!(NonFinite, "element {i} (flat index) is {}; NF4 needs finite weights", x.get(i));
    }
    let xd = DevBuffer::upload(dev, x)?;
    CudaNf4::quantize(dev, &xd.view(), shape, params)?.download(dev)
}

/// Dequantizes `t` on the GPU into the host buffer `out` (numel elements,
/// any dtype), bit for bit as [`Nf4Tensor::dequantize_into`].
pub fn dequantize_host(dev: &CudaDevice, t: &Nf4Tensor, out: ElemsMut<'_>) -> Result<()> {
    if out.len() != t.numel() {
        bail!(BufferSize, "output holds {} elements, the tensor {:?} has {}", out.len(), t.shape(), t.numel());
    }
    let dtype = match out {
        ElemsMut::F32(_) => DType::F32,
        ElemsMut::F16(_) => DType::F16,
        ElemsMut::BF16(_) => DType::BF16,
    };
    let w = CudaNf4::upload(dev, t)?;
    let mut o = DevBuffer::filled(dev, dtype, t.numel(), 0xFF)?;
    w.dequantize_into(dev, &mut o.view_mut())?;
    o.download_into(dev, out)
}

/// [`DoubleQuant::decode`] on the GPU.
pub fn absmax_decode_host(dev: &CudaDevice, d: &DoubleQuant) -> Result<Vec<f32>> {
    let codes = dev.upload(&d.codes)?;
    let map = dev.upload(&d.map[..])?;
    let nested = dev.upload(&d.nested_absmax)?;
    let mut out = dev.alloc_filled::<f32>(d.codes.len(), 0xFF)?;
    absmax_decode(dev, &codes.as_view(), &map.as_view(), &nested.as_view(), d.nested_blocksize, d.offset, &mut out.as_view_mut())?;
    dev.download(&out)
}

/// `y = W·x` on the GPU for a 2-D NF4 weight `t` `[rows, cols]`, x and y
/// bf16 on the host (`x` `[nb, cols]`, `y` `[nb, rows]` for nb vectors).
pub fn gemv_bf16_host(dev: &CudaDevice, t: &Nf4Tensor, x: &[bf16], y: &mut [bf16]) -> Result<()> {
    let [rows, cols] = t.shape()[..] else {
        bail!(InvalidShape, "GEMV needs a 2-D weight [out, in], this one has shape {:?}", t.shape());
    };
    let nb = x.len() / cols.max(1);
    if x.len() != nb * cols || y.len() != nb * rows || nb == 0 {
        bail!(ShapeMismatch, "weight [{rows}, {cols}] needs x of nb·{cols} and y of nb·{rows} elements, got {} and {}", x.len(), y.len());
    }
    let w = CudaNf4::upload(dev, t)?;
    let xd = dev.upload(x.reinterpret_cast())?;
    let mut yd = dev.alloc_filled::<u16>(nb * rows, 0xFF)?;
    w.gemv_bf16(dev, &xd.as_view(), &mut yd.as_view_mut())?;
    guard("cuMemcpyDtoHAsync", || dev.stream.memcpy_dtoh(&yd, y.reinterpret_cast_mut()).map_err(|e| cu_err("cuMemcpyDtoHAsync", e)))
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::nf4::{ABSMAX_FLOOR, NF4_CODE, NF4_THRESHOLDS};

    const SRC: &str = include_str!("../../../cuda/nf4.cu");

    /// The float literals of `__constant__ float NAME[..] = { ... };`.
    fn table(name: &str) -> Vec<f32> {
        let start = SRC.find(&format!("__constant__ float {name}[")).unwrap_or_else(|| panic!("{name} not in nf4.cu"));
        let body = &SRC[start..];
        let (open, close) = (body.find('{').unwrap(), body.find('}').unwrap());
        body[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('f').parse::<f32>().unwrap_or_else(|e| panic!("{name}: '{s}': {e}")))
            .collect()
    }

    fn define(name: &str) -> &'static str {
        let key = format!("#define {name} ");
        let line = SRC.lines().find(|l| l.starts_with(&key)).unwrap_or_else(|| panic!("#define {name} not in nf4.cu"));
        line[key.len()..].trim()
    }

    #[test]
    fn device_tables_equal_the_cpu_spec_bit_for_bit() {
        let code = table("NF4_CODE");
        let thr = table("NF4_THRESH");
        assert_eq!(code.len(), 16);
        assert_eq!(thr.len(), 15);
        for i in 0..16 {
            assert_eq!(code[i].to_bits(), NF4_CODE[i].to_bits(), "NF4_CODE[{i}]: {} vs {}", code[i], NF4_CODE[i]);
        }
        for i in 0..15 {
            assert_eq!(thr[i].to_bits(), NF4_THRESHOLDS[i].to_bits(), "NF4_THRESH[{i}]: {} vs {}", thr[i], NF4_THRESHOLDS[i]);
        }
        let floor: f32 = define("NF4_ABSMAX_FLOOR").trim_end_matches('f').parse().unwrap();
        assert_eq!(floor.to_bits(), ABSMAX_FLOOR.to_bits());
        assert_eq!(define("NF4_CODE_ZERO"), format!("{}u", crate::backend::cpu::nf4::nf4_code(0.0)));
    }

    #[test]
    fn launch_constants_match_the_kernels() {
        assert_eq!(define("Q_THREADS"), super::Q_THREADS.to_string());
        assert_eq!(define("DQ_THREADS"), super::DQ_THREADS.to_string());
        assert_eq!(define("DQ_CHUNKS_PER_THREAD"), super::DQ_CHUNKS_PER_THREAD.to_string());
        assert_eq!(define("GEMV_ROWS"), super::GEMV_ROWS.to_string());
        assert_eq!(define("GEMV_MAX_BATCH"), super::GEMV_MAX_BATCH.to_string());
    }

    /// The kernels' f32→bf16 (`(x + 0x7fff + bit16) >> 16`, NaN quietened)
    /// is half's round-to-nearest-even, checked on every 251st bit pattern
    /// plus the rounding edges of a few values.
    #[test]
    fn bf16_rounding_formula_is_halfs() {
        let kernel = |f: f32| -> u16 {
            let x = f.to_bits();
            if x & 0x7fff_ffff > 0x7f80_0000 {
                return ((x >> 16) | 0x40) as u16;
            }
            (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16
        };
        let check = |x: u32| {
            let f = f32::from_bits(x);
            assert_eq!(kernel(f), half::bf16::from_f32(f).to_bits(), "{x:#010x}");
        };
        for x in (0..=u32::MAX).step_by(251) {
            check(x);
        }
        for base in [0u32, 0x0001_0000, 0x3f80_0000, 0x7f7f_0000, 0x8000_0000, 0xbf80_0000, 0xff7f_0000] {
            for low in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
                check(base | low);
                check((base + 0x1_0000) | low);
            }
        }
    }
}
