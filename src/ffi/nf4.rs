//! `lora_nf4`: NF4 tensors (`lora_quantize_nf4` and friends).

use super::context::lora_context;
use super::util::{self, guard, handle, read_params, req, req_out, req_path, req_str, Handle};
use super::*;
use crate::dtype::{DType, Elems, ElemsMut};
use crate::error::Result;
use crate::io::{nf4_file, safetensors::StFile};
use crate::quant::nf4::{Absmax, Nf4Params, Nf4Tensor};
use half::{bf16, f16};
use std::ffi::c_char;

/// Options of `lora_quantize_nf4`. Initialize with
/// `lora_nf4_default_params()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_nf4_params {
    /// `sizeof(lora_nf4_params)`, set by the defaults function.
    pub struct_size: u32,
    /// Elements per block: a power of two from 32 to 4096; default 64.
    pub blocksize: u32,
    /// Non-zero: double quantization of the block scales (8-bit codes in
    /// blocks of 256 plus an fp32 scale per 256 blocks and one offset), as
    /// QLoRA; default 1.
    pub double_quant: u32,
}

/// Read-only facts about an NF4 tensor, filled by `lora_nf4_get_info`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_nf4_info {
    /// Number of dimensions (≤ `LORA_MAX_DIMS`).
    pub ndim: u32,
    /// The dense tensor's shape; entries past `ndim` are 0.
    pub shape: [usize; 8],
    /// Number of weights (product of the shape).
    pub numel: usize,
    /// The dtype of the tensor that was quantized (`LORA_DTYPE_*`).
    pub dtype: lora_dtype,
    /// Elements per block.
    pub blocksize: u32,
    /// Number of blocks, `ceil(numel / blocksize)`.
    pub num_blocks: usize,
    /// 1 when the block scales are double-quantized, else 0.
    pub double_quant: u32,
    /// Blocks per nested scale with double quantization (256), else 0.
    pub nested_blocksize: u32,
    /// Number of nested fp32 scales with double quantization, else 0.
    pub num_nested: usize,
    /// The offset added to decoded scales with double quantization, else 0.
    pub offset: f32,
    /// Bytes of packed codes, `ceil(numel / 2)`.
    pub packed_bytes: usize,
    /// Bytes of quantized data: packed codes and scales (the constant code
    /// books are not counted).
    pub footprint_bytes: usize,
    /// `8 · footprint_bytes / numel`: 4.5 at blocksize 64, ≈4.127 with
    /// double quantization.
    pub bits_per_weight: f64,
}

/// An NF4-quantized tensor. Immutable once made: every `const lora_nf4 *`
/// function may be called from several threads at once; `lora_nf4_free`
/// must not race with any other use. Pointers handed out by accessors stay
/// valid until the tensor is freed.
pub struct lora_nf4 {
    tag: u64,
    pub(crate) inner: Nf4Tensor,
}

impl Handle for lora_nf4 {
    const TAG: u64 = 0x6c6f_7261_6e66_3401; // "loranf4"
    fn tag(&self) -> u64 {
        self.tag
    }
}

fn new_handle(t: Nf4Tensor) -> *mut lora_nf4 {
    util::into_handle(lora_nf4 { tag: lora_nf4::TAG, inner: t })
}

pub(crate) fn dtype_of(d: lora_dtype) -> Result<DType> {
    match d {
        LORA_DTYPE_F32 => Ok(DType::F32),
        LORA_DTYPE_F16 => Ok(DType::F16),
        LORA_DTYPE_BF16 => Ok(DType::BF16),
        other => bail!(UnknownDtype, "dtype {other} is not a LORA_DTYPE_* value"),
    }
}

fn lora_dtype_of(d: DType) -> lora_dtype {
    match d {
        DType::F32 => LORA_DTYPE_F32,
        DType::F16 => LORA_DTYPE_F16,
        DType::BF16 => LORA_DTYPE_BF16,
    }
}

/// The caller's shape array, checked.
pub(crate) fn read_shape(shape: *const usize, ndim: usize) -> Result<Vec<usize>> {
    if ndim == 0 {
        bail!(InvalidShape, "ndim is 0");
    }
    if ndim > LORA_MAX_DIMS as usize {
        bail!(InvalidShape, "ndim {ndim} exceeds LORA_MAX_DIMS ({LORA_MAX_DIMS})");
    }
    req(shape, "shape")?;
    // SAFETY: the host passes `ndim` readable sizes at `shape`.
    Ok(unsafe { std::slice::from_raw_parts(shape, ndim) }.to_vec())
}

/// A caller's dense input buffer as typed elements: borrowed when aligned,
/// copied when not (the API accepts any alignment).
pub(crate) enum InputBuf<'a> {
    Borrowed(Elems<'a>),
    F32(Vec<f32>),
    U16(Vec<u16>, DType),
}

impl<'a> InputBuf<'a> {
    /// `bytes` bytes at `data`, `n` elements of `dtype`.
    pub(crate) fn new(data: *const std::ffi::c_void, bytes: usize, dtype: DType, n: usize) -> Result<InputBuf<'a>> {
        req(data as *const u8, "data")?;
        let need = n * dtype.size();
        if bytes != need {
            bail!(BufferSize, "data_bytes is {bytes}; {n} elements of {dtype:?} need {need}");
        }
        let aligned = (data as usize).is_multiple_of(dtype.size());
        // SAFETY: the host passes `bytes` readable bytes at `data`, not
        // modified during the call; typed slices are made only when aligned.
        unsafe {
            let raw = std::slice::from_raw_parts(data as *const u8, bytes);
            Ok(match (dtype, aligned) {
                (DType::F32, true) => InputBuf::Borrowed(Elems::F32(std::slice::from_raw_parts(data as *const f32, n))),
                (DType::F16, true) => InputBuf::Borrowed(Elems::F16(std::slice::from_raw_parts(data as *const f16, n))),
                (DType::BF16, true) => InputBuf::Borrowed(Elems::BF16(std::slice::from_raw_parts(data as *const bf16, n))),
                (DType::F32, false) => InputBuf::F32(raw.chunks_exact(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect()),
                (d, false) => InputBuf::U16(raw.chunks_exact(2).map(|c| u16::from_ne_bytes([c[0], c[1]])).collect(), d),
            })
        }
    }

    pub(crate) fn elems(&self) -> Elems<'_> {
        match self {
            InputBuf::Borrowed(e) => *e,
            InputBuf::F32(v) => Elems::F32(v),
            // SAFETY: f16 and bf16 are repr(transparent) over u16.
            InputBuf::U16(v, DType::F16) => Elems::F16(unsafe { std::slice::from_raw_parts(v.as_ptr() as *const f16, v.len()) }),
            InputBuf::U16(v, _) => Elems::BF16(unsafe { std::slice::from_raw_parts(v.as_ptr() as *const bf16, v.len()) }),
        }
    }
}

/// Default NF4 parameters: blocksize 64, double quantization on.
#[no_mangle]
pub extern "C" fn lora_nf4_default_params() -> lora_nf4_params {
    lora_nf4_params { struct_size: std::mem::size_of::<lora_nf4_params>() as u32, blocksize: 64, double_quant: 1 }
}

/// Quantizes a dense row-major tensor to NF4, bit for bit as bitsandbytes
/// `quantize_4bit(x, blocksize, compress_statistics=double_quant,
/// quant_type="nf4")`.
///
/// - `data`: `data_bytes` bytes holding `prod(shape)` elements of `dtype`
///   (`LORA_DTYPE_F32`, `_F16` or `_BF16`), any alignment; not retained.
/// - `shape`, `ndim`: 1 to `LORA_MAX_DIMS` non-zero dimensions.
/// - `params`: NULL for the defaults (blocksize 64, double quantization).
/// - `out`: receives a new tensor, freed with `lora_nf4_free`; written only
///   on success.
///
/// Runs on `ctx`'s threads. Errors: `LORA_ERR_NULL_POINTER`,
/// `LORA_ERR_UNKNOWN_DTYPE`, `LORA_ERR_INVALID_SHAPE`,
/// `LORA_ERR_BUFFER_SIZE` (data_bytes disagrees with shape and dtype),
/// `LORA_ERR_INVALID_BLOCKSIZE`, `LORA_ERR_NON_FINITE` (NaN or ±Inf; the
/// message names the first flat index), `LORA_ERR_STRUCT_SIZE`.
#[no_mangle]
pub unsafe extern "C" fn lora_quantize_nf4(
    ctx: *const lora_context,
    data: *const std::ffi::c_void,
    data_bytes: usize,
    dtype: lora_dtype,
    shape: *const usize,
    ndim: usize,
    params: *const lora_nf4_params,
    out: *mut *mut lora_nf4,
) -> lora_status {
    guard(|| {
        let ctx = handle(ctx, "ctx")?;
        let out = req_out(out, "out")?;
        let dtype = dtype_of(dtype)?;
        let shape = read_shape(shape, ndim)?;
        let n = crate::dtype::checked_numel(&shape, dtype.size())?;
        let p = read_params(params, lora_nf4_default_params(), std::mem::size_of::<lora_nf4_params>(), "lora_nf4_params")?;
        let input = InputBuf::new(data, data_bytes, dtype, n)?;
        let params = Nf4Params { blocksize: p.blocksize as usize, double_quant: p.double_quant != 0 };
        let t = ctx.inner.run(|| Nf4Tensor::quantize(input.elems(), &shape, params))?;
        *out = new_handle(t);
        Ok(())
    })
}

/// Frees an NF4 tensor. NULL is a no-op; so is a detectable second free.
#[no_mangle]
pub unsafe extern "C" fn lora_nf4_free(t: *mut lora_nf4) {
    util::guard_value((), || util::free_handle(t, |h| h.tag = 0))
}

/// Dequantizes into the caller's buffer `out` of `out_bytes` bytes, which
/// must hold exactly `numel` elements of `dtype` (any of the three; the
/// fp32 product `code · absmax` is rounded once, as bitsandbytes'
/// `dequantize_4bit`). Any alignment. Nothing is written on failure.
/// Runs on `ctx`'s threads.
#[no_mangle]
pub unsafe extern "C" fn lora_nf4_dequantize(
    ctx: *const lora_context,
    t: *const lora_nf4,
    dtype: lora_dtype,
    out: *mut std::ffi::c_void,
    out_bytes: usize,
) -> lora_status {
    guard(|| {
        let ctx = handle(ctx, "ctx")?;
        let t = &handle(t, "t")?.inner;
        let dtype = dtype_of(dtype)?;
        req(out as *const u8, "out")?;
        let n = t.numel();
        if out_bytes != n * dtype.size() {
            bail!(BufferSize, "out_bytes is {out_bytes}; {n} elements of {dtype:?} need {}", n * dtype.size());
        }
        let aligned = (out as usize).is_multiple_of(dtype.size());
        let out = out as usize; // a plain address can cross into the pool
        ctx.inner.run(|| -> Result<()> {
            let out = out as *mut std::ffi::c_void;
            // SAFETY: the host gives `out_bytes` writable bytes at `out`;
            // typed slices are made only when aligned.
            unsafe {
                match (dtype, aligned) {
                    (DType::F32, true) => t.dequantize_into(ElemsMut::F32(std::slice::from_raw_parts_mut(out as *mut f32, n))),
                    (DType::F16, true) => t.dequantize_into(ElemsMut::F16(std::slice::from_raw_parts_mut(out as *mut f16, n))),
                    (DType::BF16, true) => t.dequantize_into(ElemsMut::BF16(std::slice::from_raw_parts_mut(out as *mut bf16, n))),
                    (_, false) => {
                        // Unaligned: dequantize to an aligned scratch, then copy bytes.
                        let mut scratch = vec![0u32; out_bytes.div_ceil(4)];
                        let bytes = std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut u8, out_bytes);
                        let typed = match dtype {
                            DType::F32 => ElemsMut::F32(std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut f32, n)),
                            DType::F16 => ElemsMut::F16(std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut f16, n)),
                            DType::BF16 => ElemsMut::BF16(std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut bf16, n)),
                        };
                        t.dequantize_into(typed)?;
                        std::ptr::copy_nonoverlapping(bytes.as_ptr(), out as *mut u8, out_bytes);
                        Ok(())
                    }
                }
            }
        })
    })
}

/// Fills `*info` with the tensor's shape, blocksize, scales layout and
/// footprint.
#[no_mangle]
pub unsafe extern "C" fn lora_nf4_get_info(t: *const lora_nf4, info: *mut lora_nf4_info) -> lora_status {
    guard(|| {
        let t = &handle(t, "t")?.inner;
        let info = req_out(info, "info")?;
        let mut shape = [0usize; 8];
        shape[..t.shape().len()].copy_from_slice(t.shape());
        let (nested_bs, num_nested, offset) = match t.absmax() {
            Absmax::F32(_) => (0, 0, 0.0),
            Absmax::Double(d) => (d.nested_blocksize as u32, d.nested_absmax.len(), d.offset),
        };
        *info = lora_nf4_info {
            ndim: t.shape().len() as u32,
            shape,
            numel: t.numel(),
            dtype: lora_dtype_of(t.dtype()),
            blocksize: t.blocksize() as u32,
            num_blocks: t.num_blocks(),
            double_quant: t.is_double_quant() as u32,
            nested_blocksize: nested_bs,
            num_nested,
            offset,
            packed_bytes: t.packed().len(),
            footprint_bytes: t.footprint_bytes(),
            bits_per_weight: t.bits_per_weight(),
        };
        Ok(())
    })
}

/// The packed 4-bit codes (two per byte, the even element in the high
/// nibble; `ceil(numel/2)` bytes; with an odd element count the last low
/// nibble holds 7, the code of 0.0, as bitsandbytes pads): `*data` points into the tensor (valid
/// until it is freed; do not write), `*len` receives the length.
#[no_mangle]
pub unsafe extern "C" fn lora_nf4_packed(t: *const lora_nf4, data: *mut *const u8, len: *mut usize) -> lora_status {
    guard(|| {
        let t = &handle(t, "t")?.inner;
        let data = req_out(data, "data")?;
        let len = req_out(len, "len")?;
        *data = t.packed().as_ptr();
        *len = t.packed().len();
        Ok(())
    })
}

/// Copies the fp32 block scales (decoded from the 8-bit codes when double
/// quantized: `code8[q] · nested_absmax[i/256] + offset`) into `out`, which
/// must hold exactly `count == num_blocks` floats (else
/// `LORA_ERR_BUFFER_SIZE`).
#[no_mangle]
pub unsafe extern "C" fn lora_nf4_absmax(t: *const lora_nf4, out: *mut f32, count: usize) -> lora_status {
    guard(|| {
        let t = &handle(t, "t")?.inner;
        req(out as *const f32, "out")?;
        if count != t.num_blocks() {
            bail!(BufferSize, "count is {count}; the tensor has {} blocks", t.num_blocks());
        }
        let a = t.absmax_f32();
        // SAFETY: the host gives `count` writable floats at `out`.
        unsafe { std::ptr::copy_nonoverlapping(a.as_ptr(), out, count) };
        Ok(())
    })
}

/// The double-quantization state: `*codes` (one byte per block, indices
/// into the signed dynamic map) and `*nested_absmax` (one fp32 per 256
/// blocks) point into the tensor, valid until it is freed; `*num_blocks`,
/// `*num_nested` and `*offset` receive their sizes and the offset.
/// `LORA_ERR_INVALID_STATE` when the tensor was quantized without double
/// quantization. Output pointers may not be NULL.
#[no_mangle]
pub unsafe extern "C" fn lora_nf4_double_quant(
    t: *const lora_nf4,
    codes: *mut *const u8,
    num_blocks: *mut usize,
    nested_absmax: *mut *const f32,
    num_nested: *mut usize,
    offset: *mut f32,
) -> lora_status {
    guard(|| {
        let t = &handle(t, "t")?.inner;
        let (codes, num_blocks) = (req_out(codes, "codes")?, req_out(num_blocks, "num_blocks")?);
        let (nested_absmax, num_nested) = (req_out(nested_absmax, "nested_absmax")?, req_out(num_nested, "num_nested")?);
        let offset = req_out(offset, "offset")?;
        let Absmax::Double(d) = t.absmax() else {
            bail!(InvalidState, "the tensor was quantized without double quantization");
        };
        *codes = d.codes.as_ptr();
        *num_blocks = d.codes.len();
        *nested_absmax = d.nested_absmax.as_ptr();
        *num_nested = d.nested_absmax.len();
        *offset = d.offset;
        Ok(())
    })
}

/// Saves `n` NF4 tensors to one safetensors file at `path`, tensor `i`
/// under module prefix `prefixes[i]` (e.g. "model.layers.0.mlp.up_proj"),
/// with the keys, dtypes and quant-state JSON that transformers and
/// bitsandbytes write for a 4-bit `Linear4bit` (`P.weight`,
/// `P.weight.absmax`, `P.weight.quant_map`, `P.weight.nested_absmax`,
/// `P.weight.nested_quant_map`, `P.weight.quant_state.bitsandbytes__nf4`).
/// The file is written atomically (temporary file, fsync, rename): it
/// either appears complete or not at all, and a failed save leaves an
/// existing file unchanged. Errors: `LORA_ERR_NULL_POINTER`,
/// `LORA_ERR_INVALID_ARGUMENT` (n = 0, empty path or prefix, a prefix
/// given twice), `LORA_ERR_IO` (cannot write).
#[no_mangle]
pub unsafe extern "C" fn lora_nf4_save(path: *const c_char, prefixes: *const *const c_char, tensors: *const *const lora_nf4, n: usize) -> lora_status {
    guard(|| {
        let path = req_path(path, "path")?;
        if n == 0 {
            bail!(InvalidArgument, "n is 0: nothing to save");
        }
        req(prefixes, "prefixes")?;
        req(tensors, "tensors")?;
        let mut items = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: the host passes `n` entries in each array.
            let (p, t) = unsafe { (*prefixes.add(i), *tensors.add(i)) };
            let prefix = req_str(p, &format!("prefixes[{i}]"))?;
            let t = &handle(t, &format!("tensors[{i}]"))?.inner;
            items.push((prefix, t));
        }
        nf4_file::save(&path, &items)
    })
}

/// Loads the NF4 weight stored under module prefix `prefix` of the
/// safetensors file at `path` (one we wrote, or a transformers/bitsandbytes
/// 4-bit checkpoint). `*out` receives a new tensor on success.
///
/// Errors: `LORA_ERR_IO` (cannot open), `LORA_ERR_FILE_FORMAT` (truncated,
/// bad header, offsets out of range, bad quant state),
/// `LORA_ERR_TENSOR_NOT_FOUND`, `LORA_ERR_INVALID_ARGUMENT` (empty
/// prefix), `LORA_ERR_DTYPE_MISMATCH` (a key has the
/// wrong dtype), `LORA_ERR_SHAPE_MISMATCH` (the quant state disagrees with
/// the tensors), `LORA_ERR_UNSUPPORTED` (FP4, other storage dtypes),
/// `LORA_ERR_INVALID_BLOCKSIZE`.
#[no_mangle]
pub unsafe extern "C" fn lora_nf4_load(path: *const c_char, prefix: *const c_char, out: *mut *mut lora_nf4) -> lora_status {
    guard(|| {
        let path = req_path(path, "path")?;
        let prefix = req_str(prefix, "prefix")?;
        if prefix.is_empty() {
            bail!(InvalidArgument, "prefix is empty");
        }
        let out = req_out(out, "out")?;
        let f = StFile::open(&path)?;
        let t = nf4_file::load(&f, prefix)?;
        *out = new_handle(t);
        Ok(())
    })
}

/// Lists the module prefixes of the NF4 weights in the safetensors file at
/// `path`, sorted, each followed by '\n', into `buf` (NUL-terminated,
/// truncated to `len`; may be NULL); `*needed` receives the full length
/// without the NUL. Errors as for `lora_nf4_load`'s file checks.
#[no_mangle]
pub unsafe extern "C" fn lora_nf4_list(path: *const c_char, buf: *mut c_char, len: usize, needed: *mut usize) -> lora_status {
    guard(|| {
        let path = req_path(path, "path")?;
        let needed = req_out(needed, "needed")?;
        let f = StFile::open(&path)?;
        let s: String = nf4_file::list(&f).iter().map(|p| format!("{p}\n")).collect();
        *needed = util::write_cstr(&s, buf, len);
        Ok(())
    })
}

