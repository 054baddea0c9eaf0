//! CPU kernels for NF4 (bitsandbytes `quant_type="nf4"`) and for the
//! blockwise 8-bit code used by double quantization.
//!
//! Math, per block of `bs` consecutive elements of the row-major flattening:
//!   absmax = max |x_i|                                   (fp32)
//!   q_i    = #{ t in THRESHOLDS : x_i · (1/absmax) > t }  (0..=15)
//! i.e. the nearest NF4 code with ties going to the lower code. Two codes per
//! byte, the even element in the high nibble. Dequantization is
//! `NF4_CODE[q_i] · absmax` in fp32, rounded once to the output type.
//!
//! Memory traffic: quantize reads the input once and writes n/2 bytes plus
//! 4 bytes per block; dequantize reads n/2 + 4·n/bs bytes and writes n
//! elements. Both are split over blocks on the rayon pool of the caller.
//!
//! Two implementations of each: the scalar `*_reference` functions below
//! are the specification, written to be read (only the tests call them);
//! [`nf4_quantize`] and [`nf4_dequantize`] run the fast paths — AVX-512 or
//! AVX2 kernels in `nf4_simd.rs`, picked at run time, or a portable loop
//! elsewhere — which the tests at the end of this file hold bit-identical
//! to the reference on every dtype, blocksize and corner case.

use crate::dtype::{Elems, ElemsMut};
use half::{bf16, f16};
use rayon::prelude::*;

#[path = "nf4_simd.rs"]
mod simd;
pub use simd::Isa;
use simd::{DT_BF16, DT_F16, DT_F32};

/// The 16 NF4 values (bitsandbytes `get_4bit_type("nf4")`, also
/// `QuantState.code` and the `quant_map` tensor of checkpoints).
// bitsandbytes' float64 text kept as it is printed there (each rounds to
// the f32 it stores).
#[allow(clippy::excessive_precision)]
pub(crate) static NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// Decision thresholds between consecutive NF4 codes: the midpoints
/// `(code[i] + code[i+1]) / 2` computed in fp32, as bitsandbytes' CPU path
/// (`_get_4bit_quantize_bounds`, backends/default/ops.py) does before
/// `torch.bucketize`. `code = #{t : x > t}` is bucketize's
/// `right=False` rule: a value exactly on a midpoint takes the lower code.
pub(crate) static NF4_THRESHOLDS: [f32; 15] = {
    let mut t = [0f32; 15];
    let mut i = 0;
    while i < 15 {
        t[i] = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
        i += 1;
    }
    t
};

/// bitsandbytes clamps block scales from below before normalizing
/// (`absmax.clamp(min=1e-38)`), so an all-zero block maps to code 7 (0.0).
pub(crate) const ABSMAX_FLOOR: f32 = 1e-38;

/// Code of an already normalized value (in [-1, 1] unless the block is
/// degenerate). Branch-free so loops over it vectorize.
#[inline(always)]
pub(crate) fn nf4_code(v: f32) -> u8 {
    let mut c = 0u8;
    for &t in NF4_THRESHOLDS.iter() {
        c += (v > t) as u8;
    }
    c
}

/// Blocks handed to one rayon task by the reference: enough work (≥ 16 Ki
/// elements) to amortize scheduling, few enough tasks to balance across
/// cores.
#[cfg_attr(not(test), allow(dead_code))] // the spec; only the tests call it
fn blocks_per_task(blocksize: usize) -> usize {
    (16384 / blocksize).max(1)
}

/// Elements per rayon task of the fast paths: at several G elements/s a
/// task of 16 Ki elements lasts a few microseconds, comparable to rayon's
/// cost of handing it out; 128 Ki (256 KiB of bf16) still makes 128 tasks
/// of a 4096×4096 matrix to balance over the cores.
const FAST_TASK_ELEMS: usize = 1 << 17;

fn fast_blocks_per_task(blocksize: usize) -> usize {
    (FAST_TASK_ELEMS / blocksize).max(1)
}

/// Reads element `i` of a typed slice as f32.
pub(crate) trait Widen: Copy + Send + Sync {
    /// Which type this is, for the SIMD kernels (`DT_F32`, `DT_F16`,
    /// `DT_BF16`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const DT: u8;
    fn widen(self) -> f32;
}
impl Widen for f32 {
    const DT: u8 = DT_F32;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}
impl Widen for f16 {
    const DT: u8 = DT_F16;
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}
impl Widen for bf16 {
    const DT: u8 = DT_BF16;
    #[inline(always)]
    fn widen(self) -> f32 {
        // Exact: bf16 is the top half of an f32.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Quantizes one block `x` into `out` (⌈len/2⌉ bytes); returns the block
/// scale to store. Reproduces bitsandbytes' CPU path
/// (`quantize_4bit` "default" kernel) to the bit:
/// - a full block stores `absmax = max|x|` and normalizes by multiplying
///   with the fp32 reciprocal `1 / max(absmax, 1e-38)`;
/// - the tensor's partial last block (`partial`) stores the clamped
///   `max(absmax, 1e-38)` and normalizes by dividing by it;
/// - an odd element count pads the last byte's low nibble with the code of
///   0.0 (7).
#[inline(always)]
pub(crate) fn quantize_block<T: Widen>(x: &[T], out: &mut [u8], partial: bool) -> f32 {
    let mut amax = 0f32;
    for &v in x {
        let a = v.widen().abs();
        amax = if a > amax { a } else { amax };
    }
    let clamped = if amax > ABSMAX_FLOOR { amax } else { ABSMAX_FLOOR };
    let pairs = x.len() / 2;
    if partial {
        for i in 0..pairs {
            let hi = nf4_code(x[2 * i].widen() / clamped);
            let lo = nf4_code(x[2 * i + 1].widen() / clamped);
            out[i] = (hi << 4) | lo;
        }
        if x.len() % 2 == 1 {
            out[pairs] = (nf4_code(x[x.len() - 1].widen() / clamped) << 4) | nf4_code(0.0);
        }
        clamped
    } else {
        let inv = 1.0 / clamped;
        for i in 0..pairs {
            let hi = nf4_code(x[2 * i].widen() * inv);
            let lo = nf4_code(x[2 * i + 1].widen() * inv);
            out[i] = (hi << 4) | lo;
        }
        amax
    }
}

#[cfg_attr(not(test), allow(dead_code))] // the spec; only the tests call it
fn quantize_reference_typed<T: Widen>(x: &[T], blocksize: usize, packed: &mut [u8], absmax: &mut [f32]) {
    let bpt = blocks_per_task(blocksize);
    let half = blocksize / 2;
    packed
        .par_chunks_mut(bpt * half)
        .zip(absmax.par_chunks_mut(bpt))
        .enumerate()
        .for_each(|(task, (pk, am))| {
            let start = task * bpt * blocksize;
            for (b, a) in am.iter_mut().enumerate() {
                let lo = start + b * blocksize;
                let hi = (lo + blocksize).min(x.len());
                *a = quantize_block(&x[lo..hi], &mut pk[b * half..], hi - lo < blocksize);
            }
        });
}

/// The specification of [`nf4_quantize`]: NF4-quantizes `x` in blocks of
/// `blocksize` (even), writing `packed` (⌈n/2⌉ bytes) and `absmax`
/// (⌈n/blocksize⌉ floats), one scalar block at a time.
#[cfg_attr(not(test), allow(dead_code))] // the spec; only the tests call it
pub(crate) fn nf4_quantize_reference(x: Elems<'_>, blocksize: usize, packed: &mut [u8], absmax: &mut [f32]) {
    debug_assert!(blocksize.is_multiple_of(2));
    debug_assert_eq!(packed.len(), x.len().div_ceil(2));
    debug_assert_eq!(absmax.len(), x.len().div_ceil(blocksize));
    match x {
        Elems::F32(s) => quantize_reference_typed(s, blocksize, packed, absmax),
        Elems::F16(s) => quantize_reference_typed(s, blocksize, packed, absmax),
        Elems::BF16(s) => quantize_reference_typed(s, blocksize, packed, absmax),
    }
}

/// Output element types dequantization can write, each rounded once from
/// the fp32 product (round to nearest even, as torch's `.to()`).
pub(crate) trait Narrow: Copy + Send + Sync + Default {
    /// Which type this is, for the SIMD kernels.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const DT: u8;
    fn narrow(v: f32) -> Self;
}
impl Narrow for f32 {
    const DT: u8 = DT_F32;
    #[inline(always)]
    fn narrow(v: f32) -> f32 {
        v
    }
}
impl Narrow for f16 {
    const DT: u8 = DT_F16;
    #[inline(always)]
    fn narrow(v: f32) -> f16 {
        f16::from_f32(v)
    }
}
impl Narrow for bf16 {
    const DT: u8 = DT_BF16;
    #[inline(always)]
    fn narrow(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
}

/// Dequantizes one block (`ob.len()` ≤ blocksize elements) from its packed
/// bytes `bytes` (at least ⌈len/2⌉) and scale `a`.
#[inline(always)]
fn dequantize_block<T: Narrow>(bytes: &[u8], a: f32, ob: &mut [T]) {
    // The block's 16 possible outputs, each computed exactly as the
    // per-element formula would: a table lookup, not an approximation.
    let mut lut = [T::default(); 16];
    for (l, c) in lut.iter_mut().zip(NF4_CODE.iter()) {
        *l = T::narrow(*c * a);
    }
    let pairs = ob.len() / 2;
    for i in 0..pairs {
        let byte = bytes[i];
        ob[2 * i] = lut[(byte >> 4) as usize];
        ob[2 * i + 1] = lut[(byte & 15) as usize];
    }
    if ob.len() % 2 == 1 {
        ob[2 * pairs] = lut[(bytes[pairs] >> 4) as usize];
    }
}

#[cfg_attr(not(test), allow(dead_code))] // the spec; only the tests call it
fn dequantize_reference_typed<T: Narrow>(packed: &[u8], absmax: &[f32], blocksize: usize, out: &mut [T]) {
    let bpt = blocks_per_task(blocksize);
    out.par_chunks_mut(bpt * blocksize).enumerate().for_each(|(task, o)| {
        let first_block = task * bpt;
        for (b, ob) in o.chunks_mut(blocksize).enumerate() {
            let blk = first_block + b;
            dequantize_block(&packed[blk * blocksize / 2..], absmax[blk], ob);
        }
    });
}

/// The specification of [`nf4_dequantize`]:
/// `out[i] = narrow(NF4_CODE[q_i] · absmax[i / bs])`, one scalar block at a
/// time.
#[cfg_attr(not(test), allow(dead_code))] // the spec; only the tests call it
pub(crate) fn nf4_dequantize_reference(packed: &[u8], absmax: &[f32], blocksize: usize, out: ElemsMut<'_>) {
    match out {
        ElemsMut::F32(o) => dequantize_reference_typed(packed, absmax, blocksize, o),
        ElemsMut::F16(o) => dequantize_reference_typed(packed, absmax, blocksize, o),
        ElemsMut::BF16(o) => dequantize_reference_typed(packed, absmax, blocksize, o),
    }
}

// ----------------------------------------------------------------------
// Fast paths: the same functions, vectorized. Full blocks go to a kernel
// for the chosen instruction set (blocksize a multiple of 32; other even
// blocksizes use the portable loop); the tensor's partial last block, at
// most one, always goes through the reference's block function.
// ----------------------------------------------------------------------

/// NF4-quantizes `x` in blocks of `blocksize` (even), writing
/// `packed` (⌈n/2⌉ bytes) and `absmax` (⌈n/blocksize⌉ floats), exactly as
/// `nf4_quantize_reference` does. Inputs must be finite (checked by the
/// caller; NaN and ±Inf give the reference's bits anyway). Uses the best
/// instruction set of this CPU and the caller's rayon pool.
pub fn nf4_quantize(x: Elems<'_>, blocksize: usize, packed: &mut [u8], absmax: &mut [f32]) {
    nf4_quantize_isa(Isa::detect(), x, blocksize, packed, absmax)
}

/// [`nf4_quantize`] with a chosen instruction set (for tests and
/// benchmarks); one this CPU lacks is replaced by the best it has.
pub fn nf4_quantize_isa(isa: Isa, x: Elems<'_>, blocksize: usize, packed: &mut [u8], absmax: &mut [f32]) {
    let isa = isa.or_supported();
    match x {
        Elems::F32(s) => quantize_fast(isa, s, blocksize, packed, absmax),
        Elems::F16(s) => quantize_fast(isa, s, blocksize, packed, absmax),
        Elems::BF16(s) => quantize_fast(isa, s, blocksize, packed, absmax),
    }
}

fn quantize_fast<T: Widen>(isa: Isa, x: &[T], blocksize: usize, packed: &mut [u8], absmax: &mut [f32]) {
    let n = x.len();
    assert!(blocksize >= 2 && blocksize.is_multiple_of(2), "NF4 blocksize {blocksize} must be even");
    assert_eq!(packed.len(), n.div_ceil(2), "packed output size");
    assert_eq!(absmax.len(), n.div_ceil(blocksize), "absmax output size");
    let isa = if blocksize.is_multiple_of(32) { isa } else { Isa::Portable };
    let bpt = fast_blocks_per_task(blocksize);
    let half = blocksize / 2;
    packed.par_chunks_mut(bpt * half).zip(absmax.par_chunks_mut(bpt)).enumerate().for_each(|(task, (pk, am))| {
        let start = task * bpt * blocksize;
        let xs = &x[start..(start + am.len() * blocksize).min(n)];
        let full = xs.len() / blocksize;
        let (xf, xt) = xs.split_at(full * blocksize);
        let (pf, pt) = pk.split_at_mut(full * half);
        let (af, at) = am.split_at_mut(full);
        quantize_full_blocks(isa, xf, blocksize, pf, af);
        if let Some(a) = at.first_mut() {
            *a = quantize_block(xt, pt, true);
        }
    });
}

/// Quantizes whole blocks: `x.len() == absmax.len() · blocksize`.
fn quantize_full_blocks<T: Widen>(isa: Isa, x: &[T], blocksize: usize, packed: &mut [u8], absmax: &mut [f32]) {
    match isa {
        // SAFETY: `isa` is supported by this CPU (`Isa::or_supported`), the
        // blocksize is a multiple of 32 (checked by the caller) and the
        // kernels assert the slice lengths.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { simd::quantize_avx512(x, blocksize, packed, absmax) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { simd::quantize_avx2(x, blocksize, packed, absmax) },
        _ => quantize_full_blocks_portable(x, blocksize, packed, absmax),
    }
}

/// Portable full blocks: the reference's arithmetic, arranged in loops the
/// compiler can vectorize (codes of the whole block first, then packing).
fn quantize_full_blocks_portable<T: Widen>(x: &[T], blocksize: usize, packed: &mut [u8], absmax: &mut [f32]) {
    let mut codes = vec![0u8; blocksize];
    for ((xb, pb), a) in x.chunks_exact(blocksize).zip(packed.chunks_exact_mut(blocksize / 2)).zip(absmax.iter_mut()) {
        // max is order-independent and skips NaN like the reference.
        let mut lanes = [0f32; 8];
        let chunks = xb.chunks_exact(8);
        let rest = chunks.remainder();
        for ch in chunks {
            for (l, v) in lanes.iter_mut().zip(ch) {
                let v = v.widen().abs();
                *l = if v > *l { v } else { *l };
            }
        }
        let mut amax = 0f32;
        for v in lanes.iter().copied().chain(rest.iter().map(|v| v.widen().abs())) {
            amax = if v > amax { v } else { amax };
        }
        let clamped = if amax > ABSMAX_FLOOR { amax } else { ABSMAX_FLOOR };
        let inv = 1.0 / clamped;
        for (c, v) in codes.iter_mut().zip(xb) {
            *c = nf4_code(v.widen() * inv);
        }
        for (o, pair) in pb.iter_mut().zip(codes.chunks_exact(2)) {
            *o = (pair[0] << 4) | pair[1];
        }
        *a = amax;
    }
}

/// Inverse of [`nf4_quantize`]: `out[i] = narrow(NF4_CODE[q_i] ·
/// absmax[i / bs])`, exactly as `nf4_dequantize_reference`. Uses the best
/// instruction set of this CPU and the caller's rayon pool.
pub fn nf4_dequantize(packed: &[u8], absmax: &[f32], blocksize: usize, out: ElemsMut<'_>) {
    nf4_dequantize_isa(Isa::detect(), packed, absmax, blocksize, out)
}

/// [`nf4_dequantize`] with a chosen instruction set (for tests and
/// benchmarks); one this CPU lacks is replaced by the best it has.
pub fn nf4_dequantize_isa(isa: Isa, packed: &[u8], absmax: &[f32], blocksize: usize, out: ElemsMut<'_>) {
    let stream = byte_len(&out) >= STREAM_MIN_BYTES;
    dequantize_with(isa, stream, packed, absmax, blocksize, out)
}

/// [`nf4_dequantize_isa`] with the choice of streaming stores made by the
/// caller (the tests exercise both on small outputs).
fn dequantize_with(isa: Isa, stream: bool, packed: &[u8], absmax: &[f32], blocksize: usize, out: ElemsMut<'_>) {
    dequantize_scales_with(isa, stream, packed, Scales::F32(absmax), blocksize, out)
}

/// Double-quantized block scales, as stored: `absmax_i = map[codes_i] ·
/// nested_absmax[i / nested_blocksize] + offset` (see
/// [`blockwise8_dequantize`]).
#[derive(Clone, Copy, Debug)]
pub struct DoubleQuantScales<'a> {
    pub codes: &'a [u8],
    pub map: &'a [f32; 256],
    pub nested_absmax: &'a [f32],
    pub nested_blocksize: usize,
    pub offset: f32,
}

/// Where a dequantization task gets its blocks' fp32 scales.
#[derive(Clone, Copy)]
enum Scales<'a> {
    F32(&'a [f32]),
    Double(DoubleQuantScales<'a>),
}

impl Scales<'_> {
    fn len(&self) -> usize {
        match self {
            Scales::F32(a) => a.len(),
            Scales::Double(d) => d.codes.len(),
        }
    }

    /// The scales of blocks `first..first + count`: borrowed, or decoded
    /// into `buf` exactly as [`blockwise8_dequantize`] computes them.
    fn get<'s>(&'s self, first: usize, count: usize, buf: &'s mut [f32]) -> &'s [f32] {
        match self {
            Scales::F32(a) => &a[first..first + count],
            Scales::Double(d) => {
                let out = &mut buf[..count];
                // Nested block by nested block (one division each, not one
                // per scale).
                let (mut b, end, mut o) = (first, first + count, 0);
                while b < end {
                    let q = b / d.nested_blocksize;
                    let seg_end = ((q + 1) * d.nested_blocksize).min(end);
                    let s = d.nested_absmax[q];
                    for (ob, &c) in out[o..o + seg_end - b].iter_mut().zip(&d.codes[b..seg_end]) {
                        *ob = d.map[c as usize] * s + d.offset;
                    }
                    o += seg_end - b;
                    b = seg_end;
                }
                out
            }
        }
    }
}

/// [`nf4_dequantize`] from double-quantized scales: the same bits as
/// decoding them with [`blockwise8_dequantize`] and calling
/// [`nf4_dequantize`], but each rayon task decodes only its own blocks'
/// scales, into a buffer on its stack, so the fp32 scales are never
/// materialized (for a 4096×11008 matrix that saves writing, page-faulting
/// and re-reading a 2.8 MB vector).
pub fn nf4_dequantize_double_quant(packed: &[u8], scales: DoubleQuantScales<'_>, blocksize: usize, out: ElemsMut<'_>) {
    nf4_dequantize_double_quant_isa(Isa::detect(), packed, scales, blocksize, out)
}

/// [`nf4_dequantize_double_quant`] with a chosen instruction set.
pub fn nf4_dequantize_double_quant_isa(isa: Isa, packed: &[u8], scales: DoubleQuantScales<'_>, blocksize: usize, out: ElemsMut<'_>) {
    assert!(scales.nested_blocksize > 0, "nested blocksize must be positive");
    let nblocks = out.len().div_ceil(blocksize.max(1));
    assert!(
        scales.nested_absmax.len() >= nblocks.min(scales.codes.len()).div_ceil(scales.nested_blocksize),
        "{} nested scales cannot cover {nblocks} blocks in nested blocks of {}",
        scales.nested_absmax.len(),
        scales.nested_blocksize
    );
    let stream = byte_len(&out) >= STREAM_MIN_BYTES;
    dequantize_scales_with(isa, stream, packed, Scales::Double(scales), blocksize, out)
}

fn dequantize_scales_with(isa: Isa, stream: bool, packed: &[u8], scales: Scales<'_>, blocksize: usize, out: ElemsMut<'_>) {
    let isa = isa.or_supported();
    match out {
        ElemsMut::F32(o) => dequantize_fast(isa, stream, packed, scales, blocksize, o),
        ElemsMut::F16(o) => dequantize_fast(isa, stream, packed, scales, blocksize, o),
        ElemsMut::BF16(o) => dequantize_fast(isa, stream, packed, scales, blocksize, o),
    }
}

/// Byte size of an output buffer.
fn byte_len(out: &ElemsMut<'_>) -> usize {
    match out {
        ElemsMut::F32(o) => std::mem::size_of_val(*o),
        ElemsMut::F16(o) => std::mem::size_of_val(*o),
        ElemsMut::BF16(o) => std::mem::size_of_val(*o),
    }
}

/// Outputs of at least this many bytes are written with non-temporal
/// (streaming) stores where the kernel has them (AVX-512): such an output
/// cannot stay in the caches anyway — it is the whole L3 of this machine's
/// Zen 4 core complex and 16 times a core's L2 — and streaming saves the
/// read-for-ownership of every line, measured here at +30–40 % throughput.
/// Smaller outputs keep ordinary stores, so a consumer finds them cached.
/// (glibc's memcpy makes the same choice at ¾ of the shared cache.)
pub(crate) const STREAM_MIN_BYTES: usize = 32 << 20;

fn dequantize_fast<T: Narrow>(isa: Isa, stream: bool, packed: &[u8], scales: Scales<'_>, blocksize: usize, out: &mut [T]) {
    let n = out.len();
    assert!(blocksize >= 2 && blocksize.is_multiple_of(2), "NF4 blocksize {blocksize} must be even");
    assert!(packed.len() >= n.div_ceil(2), "packed input holds {} bytes, {n} elements need {}", packed.len(), n.div_ceil(2));
    assert!(scales.len() >= n.div_ceil(blocksize), "{} block scales, {n} elements need {}", scales.len(), n.div_ceil(blocksize));
    let isa = if blocksize.is_multiple_of(32) { isa } else { Isa::Portable };
    let bpt = fast_blocks_per_task(blocksize);
    let half = blocksize / 2;
    out.par_chunks_mut(bpt * blocksize).enumerate().for_each(|(task, o)| {
        let b0 = task * bpt;
        // Room for one task's decoded scales (at most FAST_TASK_ELEMS / 2
        // blocks, blocksize ≥ 2): 256 KiB would not fit every thread's
        // stack, so decode in slices of at most 4096 blocks.
        let mut buf = [0f32; 4096];
        let full = o.len() / blocksize;
        let (of, ot) = o.split_at_mut(full * blocksize);
        for (k, ofk) in of.chunks_mut(buf.len() * blocksize).enumerate() {
            let first = b0 + k * buf.len();
            let count = ofk.len() / blocksize;
            let a = scales.get(first, count, &mut buf);
            dequantize_full_blocks(isa, stream, &packed[first * half..(first + count) * half], a, blocksize, ofk);
        }
        if !ot.is_empty() {
            let a = scales.get(b0 + full, 1, &mut buf)[0];
            dequantize_block(&packed[(b0 + full) * half..], a, ot);
        }
    });
}

/// Dequantizes whole blocks: `out.len() == absmax.len() · blocksize`;
/// `stream` asks for non-temporal stores (AVX-512 only).
fn dequantize_full_blocks<T: Narrow>(isa: Isa, stream: bool, packed: &[u8], absmax: &[f32], blocksize: usize, out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    let as_f32 = |o: &mut [T]| {
        assert!(T::DT == DT_F32 && std::mem::size_of::<T>() == 4);
        // SAFETY: `T::DT == DT_F32` means `T` is f32 (the only Narrow
        // implementor with that tag), checked just above.
        unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr() as *mut f32, o.len()) }
    };
    match (isa, T::DT, stream) {
        // SAFETY (all kernel calls): `isa` is supported by this CPU
        // (`Isa::or_supported`), the blocksize is a multiple of 32 (checked
        // by the caller), the kernels assert the slice lengths, and `T::DT`
        // says what `T` is (a 16-bit f16 / bf16 unless DT_F32).
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, DT_F32, false) => unsafe { simd::dequantize32_avx512::<false>(packed, absmax, blocksize, as_f32(out)) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, DT_F32, true) => unsafe { simd::dequantize32_avx512::<true>(packed, absmax, blocksize, as_f32(out)) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, _, false) => unsafe { simd::dequantize16_avx512::<T, false>(packed, absmax, blocksize, out) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, _, true) => unsafe { simd::dequantize16_avx512::<T, true>(packed, absmax, blocksize, out) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, DT_F32, _) => unsafe { simd::dequantize32_avx2(packed, absmax, blocksize, as_f32(out)) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, _, _) => unsafe { simd::dequantize16_avx2(packed, absmax, blocksize, out) },
        _ => {
            for ((ob, pb), &a) in out.chunks_exact_mut(blocksize).zip(packed.chunks_exact(blocksize / 2)).zip(absmax) {
                dequantize_block(pb, a, ob);
            }
        }
    }
}

/// Nested blocks per rayon task of the blockwise 8-bit code: 64 blocks of
/// 256 scales, i.e. the scales of 1 Mi weights at NF4 blocksize 64.
const BLOCKWISE8_BLOCKS_PER_TASK: usize = 64;

/// Blockwise 8-bit quantization as bitsandbytes' native CPU
/// `quantize_blockwise` does it (`quantize_cpu_impl<float>` in
/// libbitsandbytes_cpu.so, read from its machine code): per block
/// `scale = max|x|` and `q_i = code(x_i · fp32(1/scale))`, where `code` is
/// bitsandbytes' table lookup (`quant::dynamic_map::blockwise8_signed_code`
/// for the signed dynamic map; not always the nearest entry near 0). A
/// block whose scale is 0 gets code 0 everywhere. Blocks are independent;
/// groups of them run on the caller's rayon pool.
pub fn blockwise8_quantize(x: &[f32], code: impl Fn(f32) -> u8 + Sync, blocksize: usize, codes: &mut [u8], scales: &mut [f32]) {
    let per_task = BLOCKWISE8_BLOCKS_PER_TASK * blocksize;
    x.par_chunks(per_task)
        .zip(codes.par_chunks_mut(per_task))
        .zip(scales.par_chunks_mut(BLOCKWISE8_BLOCKS_PER_TASK))
        .for_each(|((xt, ct), st)| {
            for ((xb, cb), s) in xt.chunks(blocksize).zip(ct.chunks_mut(blocksize)).zip(st.iter_mut()) {
                let mut amax = 0f32;
                for &v in xb {
                    amax = if v.abs() > amax { v.abs() } else { amax };
                }
                *s = amax;
                if amax == 0.0 {
                    cb.fill(0);
                    continue;
                }
                let inv = 1.0 / amax;
                for (c, &v) in cb.iter_mut().zip(xb) {
                    *c = code(v * inv);
                }
            }
        });
}

/// Inverse of [`blockwise8_quantize`] plus an offset:
/// `out_i = map[q_i] · scales[i / bs] + offset` (fp32, unfused), on the
/// caller's rayon pool.
pub fn blockwise8_dequantize(codes: &[u8], map: &[f32; 256], scales: &[f32], blocksize: usize, offset: f32, out: &mut [f32]) {
    let per_task = BLOCKWISE8_BLOCKS_PER_TASK * blocksize;
    out.par_chunks_mut(per_task)
        .zip(codes.par_chunks(per_task))
        .zip(scales.par_chunks(BLOCKWISE8_BLOCKS_PER_TASK))
        .for_each(|((ot, ct), st)| {
            for ((ob, cb), &s) in ot.chunks_mut(blocksize).zip(ct.chunks(blocksize)).zip(st) {
                for (o, &c) in ob.iter_mut().zip(cb) {
                    *o = map[c as usize] * s + offset;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_midpoints() {
        for i in 0..15 {
            let mid = (NF4_CODE[i] as f64 + NF4_CODE[i + 1] as f64) / 2.0;
            assert!((mid as f32 - NF4_THRESHOLDS[i]).abs() <= f32::EPSILON, "{i}");
        }
    }

    #[test]
    fn simd_grid_cells_hold_one_threshold_far_from_their_edges() {
        use simd::{GRID_BASE, GRID_CELLS, GRID_OFFSET, GRID_THRESHOLD};
        let cell = |v: f32| ((v * 16.0 + GRID_OFFSET) as i32) as usize % GRID_CELLS;
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            let pos = t as f64 * 16.0 + GRID_OFFSET as f64;
            let edge_distance = (pos - pos.round()).abs();
            assert!(edge_distance > 0.065, "threshold {i} ({t}) is {edge_distance} cells from an edge");
            let k = pos.floor() as usize;
            assert_eq!(GRID_THRESHOLD[k], t, "cell {k}");
            assert_eq!(GRID_BASE[k], i as i32, "cell {k}");
        }
        assert_eq!(GRID_THRESHOLD.iter().filter(|t| t.is_finite()).count(), 15, "one cell per threshold");
        // The whole reachable range |v| ≤ 1 + 2^-22 lands in 0..32 unclamped.
        for v in [-1.0f32 - 2.4e-7, -1.0, 1.0, 1.0 + 2.4e-7] {
            let k = (v * 16.0 + GRID_OFFSET) as i32;
            assert!((0..GRID_CELLS as i32).contains(&k), "{v} → cell {k}");
        }
        // The grid reproduces the count on a fine sweep and at every
        // threshold and its neighbours.
        let code = |v: f32| GRID_BASE[cell(v)] + (v > GRID_THRESHOLD[cell(v)]) as i32;
        for j in 0..=200_000 {
            let v = -1.0 + j as f32 / 100_000.0;
            assert_eq!(code(v), nf4_code(v) as i32, "{v}");
        }
        for &t in NF4_THRESHOLDS.iter() {
            for v in [f32::from_bits(t.to_bits() - 1), t, f32::from_bits(t.to_bits() + 1)] {
                assert_eq!(code(v), nf4_code(v) as i32, "{v}");
            }
        }
    }

    #[test]
    fn codes_are_nearest() {
        for k in 0..=2000 {
            let v = -1.0 + k as f32 / 1000.0;
            let c = nf4_code(v) as usize;
            let best = (0..16)
                .min_by(|&a, &b| (NF4_CODE[a] - v).abs().partial_cmp(&(NF4_CODE[b] - v).abs()).unwrap())
                .unwrap();
            assert!((NF4_CODE[c] - v).abs() <= (NF4_CODE[best] - v).abs() + 1e-7, "{v}");
        }
        // Ties go to the lower code.
        for i in 0..15 {
            assert_eq!(nf4_code(NF4_THRESHOLDS[i]) as usize, i);
        }
    }
}

/// The fast paths against the reference, bit for bit, on every instruction
/// set this CPU offers (the portable one always included).
#[cfg(test)]
mod fast_vs_reference {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }
        fn sign(&mut self) -> f32 {
            if self.next() & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        }
        /// Roughly N(0, 1) (sum of uniforms), never exactly 0 in practice.
        fn normal(&mut self) -> f32 {
            (0..4).map(|_| self.unit()).sum::<f32>() - 2.0
        }
        /// Log-uniform magnitude in [lo, hi].
        fn log_uniform(&mut self, lo: f32, hi: f32) -> f32 {
            let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
            ((l + (h - l) * self.unit() as f64).exp()) as f32
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Dt {
        F32,
        F16,
        BF16,
    }

    /// Magnitude ranges per input type: (huge, tiny, subnormal range).
    fn ranges(dt: Dt) -> (f32, f32, (f32, f32)) {
        match dt {
            // bf16 shares f32's exponent range.
            Dt::F32 | Dt::BF16 => (1e30, 1e-30, (1e-45, 1e-39)),
            // f16: max 65504, subnormals below 6.1e-5.
            Dt::F16 => (3e4, 1e-4, (6e-8, 5e-5)),
        }
    }

    /// A test input of `n` values in blocks of `bs`: each block one of
    /// several kinds (Gaussian at a random scale, all zero, exact midpoint
    /// ties, huge, tiny, subnormal, negative maximum, a single spike, values
    /// one ulp around the thresholds); the first block is always Gaussian.
    fn input(dt: Dt, n: usize, bs: usize, rng: &mut Rng) -> Vec<f32> {
        let (huge, tiny, (sub_lo, sub_hi)) = ranges(dt);
        let mut v = vec![0f32; n];
        for (b, blk) in v.chunks_mut(bs).enumerate() {
            let kind = if b == 0 { 0 } else { rng.below(9) };
            match kind {
                0 => {
                    let s = rng.log_uniform(tiny, huge);
                    blk.iter_mut().for_each(|x| *x = rng.normal() * s);
                }
                1 => blk.iter_mut().for_each(|x| *x = 0.0 * rng.sign()),
                2 => {
                    // Power-of-two maximum M, so x / M and x · (1/M) are exact
                    // and values M·t land exactly on the midpoints (f32).
                    let m = (2f32).powi(rng.below(40) as i32 - 20);
                    for x in blk.iter_mut() {
                        *x = match rng.below(3) {
                            0 => NF4_THRESHOLDS[rng.below(15)] * m,
                            1 => NF4_CODE[rng.below(16)] * m,
                            _ => rng.normal() * m * 0.3,
                        };
                    }
                    let i = rng.below(blk.len());
                    blk[i] = m * rng.sign();
                }
                3 => blk.iter_mut().for_each(|x| *x = rng.normal() * huge),
                4 => blk.iter_mut().for_each(|x| *x = rng.normal() * tiny),
                5 => blk.iter_mut().for_each(|x| *x = rng.sign() * rng.log_uniform(sub_lo, sub_hi)),
                6 => {
                    let s = rng.log_uniform(tiny, huge * 0.5);
                    blk.iter_mut().for_each(|x| *x = rng.normal() * s);
                    let i = rng.below(blk.len());
                    blk[i] = -8.0 * s;
                }
                7 => {
                    let i = rng.below(blk.len());
                    blk[i] = rng.sign() * rng.log_uniform(tiny, huge);
                }
                _ => {
                    let m = (2f32).powi(rng.below(20) as i32 - 10);
                    for x in blk.iter_mut() {
                        let t = NF4_THRESHOLDS[rng.below(15)] * m;
                        *x = match rng.below(3) {
                            0 => t,
                            1 => f32::from_bits(t.to_bits() + 1),
                            _ => f32::from_bits(t.to_bits() - 1),
                        };
                    }
                    blk[0] = m;
                }
            }
        }
        v
    }

    fn bits_differ(a: &[u8], b: &[u8]) -> Option<usize> {
        a.iter().zip(b).position(|(x, y)| x != y).or(if a.len() != b.len() { Some(a.len().min(b.len())) } else { None })
    }

    /// Bit patterns for comparison; every NaN maps to one value because
    /// Rust leaves the sign and payload of a NaN produced by arithmetic
    /// unspecified (LLVM folds the reference's `-1.0 · a` to `-a`, flipping
    /// a NaN's sign where a vector multiply would not).
    fn canon32(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect()
    }
    fn canon16(v: &[f16]) -> Vec<u32> {
        v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() as u32 }).collect()
    }
    fn canonb(v: &[bf16]) -> Vec<u32> {
        v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() as u32 }).collect()
    }

    /// Runs `f` on `out[off..off + n]` of a buffer prefilled with `fill`,
    /// and checks that nothing outside that window changed.
    fn windowed<T: Copy + PartialEq>(n: usize, off: usize, fill: T, f: impl FnOnce(&mut [T])) -> Vec<T> {
        let mut buf = vec![fill; n + 64];
        f(&mut buf[off..off + n]);
        assert!(buf[..off].iter().chain(&buf[off + n..]).all(|v| *v == fill), "wrote outside its output (offset {off})");
        buf[off..off + n].to_vec()
    }

    /// Dequantizes to all three output types with the reference and with
    /// every fast path — plain and streaming stores, outputs at several
    /// misalignments — and compares bit patterns.
    fn check_dequantize(packed: &[u8], absmax: &[f32], bs: usize, n: usize, what: &str) {
        let mut r32 = vec![0f32; n];
        let mut r16 = vec![f16::ZERO; n];
        let mut rb = vec![bf16::ZERO; n];
        nf4_dequantize_reference(packed, absmax, bs, ElemsMut::F32(&mut r32));
        nf4_dequantize_reference(packed, absmax, bs, ElemsMut::F16(&mut r16));
        nf4_dequantize_reference(packed, absmax, bs, ElemsMut::BF16(&mut rb));
        // Prefilled with NaN patterns no output has, so a missed element
        // shows.
        let (s32, s16, sb) = (f32::from_bits(0x7F80_0001), f16::from_bits(0x7C01), bf16::from_bits(0x7F81));
        for isa in Isa::available() {
            // (streaming, offset in elements): offsets move the output off
            // 64-byte alignment by every residue class of interest.
            for (stream, off) in [(false, 0), (false, 3), (true, 0), (true, 1), (true, 7), (true, 16), (true, 31)] {
                let f32o = windowed(n, off, s32.to_bits(), |o| {
                    // SAFETY: same size and alignment as the bit pattern type; every pattern is a valid f32.
                    let o = unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr() as *mut f32, o.len()) };
                    dequantize_with(isa, stream, packed, absmax, bs, ElemsMut::F32(o))
                });
                let f16o = windowed(n, off, s16.to_bits(), |o| {
                    // SAFETY: same size and alignment as the bit pattern type; every pattern is a valid f16.
                    let o = unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr() as *mut f16, o.len()) };
                    dequantize_with(isa, stream, packed, absmax, bs, ElemsMut::F16(o))
                });
                let bfo = windowed(n, off, sb.to_bits(), |o| {
                    // SAFETY: same size and alignment as the bit pattern type; every pattern is a valid bf16.
                    let o = unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr() as *mut bf16, o.len()) };
                    dequantize_with(isa, stream, packed, absmax, bs, ElemsMut::BF16(o))
                });
                let f32o: Vec<f32> = f32o.into_iter().map(f32::from_bits).collect();
                let f16o: Vec<f16> = f16o.into_iter().map(f16::from_bits).collect();
                let bfo: Vec<bf16> = bfo.into_iter().map(bf16::from_bits).collect();
                let how = format!("{isa:?}, streaming {stream}, offset {off}");
                assert!(f32o.iter().all(|x| x.to_bits() != s32.to_bits()), "{what}: {how} left f32 elements unwritten");
                assert!(f16o.iter().all(|x| x.to_bits() != s16.to_bits()), "{what}: {how} left f16 elements unwritten");
                assert!(bfo.iter().all(|x| x.to_bits() != sb.to_bits()), "{what}: {how} left bf16 elements unwritten");
                for (name, r, f) in [
                    ("f32", canon32(&r32), canon32(&f32o)),
                    ("f16", canon16(&r16), canon16(&f16o)),
                    ("bf16", canonb(&rb), canonb(&bfo)),
                ] {
                    if let Some(e) = r.iter().zip(&f).position(|(a, b)| a != b) {
                        panic!(
                            "{what}: dequantize to {name} with {how} differs at element {e} (block {}, absmax {:e} = {:#010x}): reference {:#x}, fast {:#x}",
                            e / bs,
                            absmax[e / bs],
                            absmax[e / bs].to_bits(),
                            r[e],
                            f[e]
                        );
                    }
                }
            }
        }
    }

    /// Quantizes `v` (as f32, f16 and bf16) with the reference and every
    /// fast path, compares packed bytes and absmax bits, then checks the
    /// dequantization of the result.
    fn check(v32: &[f32], bs: usize, dt: Dt, what: &str) {
        let v16: Vec<f16> = v32.iter().map(|&x| f16::from_f32(x)).collect();
        let vb: Vec<bf16> = v32.iter().map(|&x| bf16::from_f32(x)).collect();
        let x = match dt {
            Dt::F32 => Elems::F32(v32),
            Dt::F16 => Elems::F16(&v16),
            Dt::BF16 => Elems::BF16(&vb),
        };
        assert!((0..x.len()).any(|i| x.get(i) != 0.0), "{what}: all-zero input");
        let n = x.len();
        let mut rp = vec![0u8; n.div_ceil(2)];
        let mut ra = vec![0f32; n.div_ceil(bs)];
        nf4_quantize_reference(x, bs, &mut rp, &mut ra);
        for isa in Isa::available() {
            let mut fp = vec![0xA5u8; rp.len()];
            let mut fa = vec![f32::NAN; ra.len()];
            nf4_quantize_isa(isa, x, bs, &mut fp, &mut fa);
            if let Some(i) = bits_differ(&rp, &fp) {
                panic!("{what} {dt:?}: {isa:?} packed byte {i} (block {}): reference {:#04x}, fast {:#04x}", 2 * i / bs, rp[i], fp[i]);
            }
            if let Some(b) = ra.iter().zip(&fa).position(|(a, b)| a.to_bits() != b.to_bits()) {
                panic!("{what} {dt:?}: {isa:?} absmax[{b}]: reference {:e}, fast {:e}", ra[b], fa[b]);
            }
        }
        check_dequantize(&rp, &ra, bs, n, &format!("{what} {dt:?}"));
    }

    /// Lengths for blocksize `bs`: below one block, exact multiples, partial
    /// last blocks, odd counts, and more than one rayon task of the fast
    /// path.
    fn lengths(bs: usize) -> Vec<usize> {
        let task = fast_blocks_per_task(bs) * bs;
        let mut v = vec![1, 3, bs - 1, bs, bs + 1, 2 * bs + 2, 3 * bs + 17, 5 * bs - 3, task + 1, 2 * task + 3 * bs + 31];
        v.retain(|&n| n > 0);
        v
    }

    #[test]
    fn quantize_and_dequantize_match_reference_all_blocksizes() {
        let mut rng = Rng(0x0123_4567_89AB_CDEF);
        for dt in [Dt::F32, Dt::F16, Dt::BF16] {
            // Powers of two (the supported set) and other even sizes the
            // kernels accept (portable path for non-multiples of 32).
            for bs in [32, 64, 128, 256, 512, 1024, 2048, 4096, 2, 6, 48, 96] {
                for n in lengths(bs) {
                    if bs >= 2048 && n > 4 * bs && dt == Dt::F16 {
                        // Keep the slow scalar f16 reference affordable.
                        continue;
                    }
                    let mut v = input(dt, n, bs, &mut rng);
                    if v.iter().all(|&x| x == 0.0) {
                        v[0] = 1.0;
                    }
                    check(&v, bs, dt, &format!("bs {bs} n {n}"));
                }
            }
        }
    }

    #[test]
    fn exact_midpoint_ties_take_the_lower_code() {
        // Full blocks (multiply by 1/M) and a partial last block (divide
        // by M), M a power of two: x = M·t lands on the midpoint exactly.
        let mut rng = Rng(7);
        for bs in [32, 64, 256] {
            let n = 3 * bs + 9;
            for e in [-30, -3, 0, 5, 30] {
                let m = (2f32).powi(e);
                let mut v: Vec<f32> = (0..n).map(|i| NF4_THRESHOLDS[i % 15] * m * rng.sign()).collect();
                for b in (0..n).step_by(bs) {
                    v[b] = m;
                }
                check(&v, bs, Dt::F32, &format!("ties bs {bs} M 2^{e}"));
            }
        }
    }

    #[test]
    fn non_finite_inputs_give_the_reference_bits() {
        // Outside the contract (callers reject them), but the fast paths
        // still compute the reference's function.
        let mut rng = Rng(11);
        for dt in [Dt::F32, Dt::F16, Dt::BF16] {
            for bs in [32, 64, 128] {
                let n = bs * 40 + 5;
                let mut v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                v[bs + 7] = f32::INFINITY;
                v[2 * bs + 1] = f32::NEG_INFINITY;
                v[3 * bs..4 * bs].fill(f32::NAN);
                v[n - 2] = f32::NAN;
                // NaNs at random places of most other blocks, some next to
                // the block's largest value.
                for b in 5..40 {
                    for _ in 0..rng.below(4) {
                        v[b * bs + rng.below(bs)] = f32::NAN;
                    }
                    v[b * bs + rng.below(bs)] = 9.0 * rng.sign();
                }
                check(&v, bs, dt, &format!("non-finite bs {bs}"));
            }
        }
    }

    #[test]
    fn dequantize_matches_reference_on_arbitrary_scales() {
        // Random packed bytes with scales of every kind: random finite bit
        // patterns (normal and subnormal), the clamp floor, rounding ties
        // of bf16 (low 16 bits 0x8000 with either parity), f16 overflow
        // and underflow, zero, negative, and non-finite.
        let mut rng = Rng(99);
        for bs in [32, 64, 128, 4096, 2, 48] {
            let nblocks = 300usize.div_ceil(bs / 32 + 1).max(3);
            for extra in [0usize, 1, bs / 2 + 1] {
                let n = nblocks * bs - if extra == 0 { 0 } else { bs - extra };
                let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.next() as u8).collect();
                let absmax: Vec<f32> = (0..n.div_ceil(bs))
                    .map(|_| match rng.below(12) {
                        0 => f32::from_bits(rng.next() as u32 & 0x7F7F_FFFF),
                        1 => f32::from_bits(rng.next() as u32 & 0x007F_FFFF),
                        2 => ABSMAX_FLOOR,
                        3 => f32::from_bits((rng.next() as u32 & 0x7F7E_0000) | 0x8000),
                        4 => f32::from_bits((rng.next() as u32 & 0x7F7E_0000) | 0x1_8000),
                        5 => rng.log_uniform(6e4, 1e6),
                        6 => rng.log_uniform(1e-9, 1e-4),
                        7 => 0.0,
                        8 => -rng.log_uniform(1e-3, 1e3),
                        9 => [f32::INFINITY, f32::NAN, f32::MAX, f32::MIN_POSITIVE][rng.below(4)],
                        _ => rng.log_uniform(1e-3, 10.0),
                    })
                    .collect();
                check_dequantize(&packed, &absmax, bs, n, &format!("arbitrary scales bs {bs} n {n}"));
            }
        }
    }

    #[test]
    fn fused_double_quant_dequantize_matches_decode_then_reference() {
        let mut rng = Rng(21);
        for (bs, n) in [
            (64, 2 * FAST_TASK_ELEMS + 3 * 64 + 7),
            (32, 300 * 32 + 5),
            (4096, 5 * 4096 + 2),
            // Blocksize 2: tasks of 65536 blocks, decoded 4096 at a time.
            (2, 2 * FAST_TASK_ELEMS + 3),
        ] {
            let v = input(Dt::F32, n, bs, &mut rng);
            let (mut p, mut a) = (vec![0u8; n.div_ceil(2)], vec![0f32; n.div_ceil(bs)]);
            nf4_quantize_reference(Elems::F32(&v), bs, &mut p, &mut a);
            // Real double quantization, and one with random codes and a
            // small nested blocksize (more nested scales per task).
            let real = crate::quant::nf4::DoubleQuant::compress(&a);
            let mut odd = real.clone();
            odd.nested_blocksize = 3;
            odd.codes.iter_mut().for_each(|c| *c = rng.next() as u8);
            odd.nested_absmax = (0..a.len().div_ceil(3)).map(|_| rng.log_uniform(1e-3, 1.0)).collect();
            for dq in [real, odd] {
                let decoded = dq.decode();
                let sc = DoubleQuantScales {
                    codes: &dq.codes,
                    map: &dq.map,
                    nested_absmax: &dq.nested_absmax,
                    nested_blocksize: dq.nested_blocksize,
                    offset: dq.offset,
                };
                let mut r32 = vec![0f32; n];
                let mut rb = vec![bf16::ZERO; n];
                let mut r16 = vec![f16::ZERO; n];
                nf4_dequantize_reference(&p, &decoded, bs, ElemsMut::F32(&mut r32));
                nf4_dequantize_reference(&p, &decoded, bs, ElemsMut::BF16(&mut rb));
                nf4_dequantize_reference(&p, &decoded, bs, ElemsMut::F16(&mut r16));
                for isa in Isa::available() {
                    let mut f32o = vec![f32::NAN; n];
                    let mut bfo = vec![bf16::NAN; n];
                    let mut f16o = vec![f16::NAN; n];
                    nf4_dequantize_double_quant_isa(isa, &p, sc, bs, ElemsMut::F32(&mut f32o));
                    nf4_dequantize_double_quant_isa(isa, &p, sc, bs, ElemsMut::BF16(&mut bfo));
                    nf4_dequantize_double_quant_isa(isa, &p, sc, bs, ElemsMut::F16(&mut f16o));
                    assert_eq!(canon32(&r32), canon32(&f32o), "bs {bs} n {n} {isa:?} f32");
                    assert_eq!(canonb(&rb), canonb(&bfo), "bs {bs} n {n} {isa:?} bf16");
                    assert_eq!(canon16(&r16), canon16(&f16o), "bs {bs} n {n} {isa:?} f16");
                }
            }
        }
    }

    #[test]
    fn blockwise8_tasks_match_one_serial_pass() {
        // More than one rayon task, a partial last block, zero blocks.
        let mut rng = Rng(5);
        let bs = 256;
        let n = BLOCKWISE8_BLOCKS_PER_TASK * bs * 3 + 77;
        let mut x: Vec<f32> = (0..n).map(|_| rng.normal() * 0.01).collect();
        x[bs..2 * bs].fill(0.0);
        let code = crate::quant::dynamic_map::blockwise8_signed_code;
        let (mut codes, mut scales) = (vec![0u8; n], vec![0f32; n.div_ceil(bs)]);
        blockwise8_quantize(&x, code, bs, &mut codes, &mut scales);
        let map = crate::quant::dynamic_map::signed_dynamic_map();
        let mut out = vec![0f32; n];
        blockwise8_dequantize(&codes, &map, &scales, bs, 0.25, &mut out);
        for (b, xb) in x.chunks(bs).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
            assert_eq!(scales[b].to_bits(), amax.to_bits(), "scale {b}");
            for (i, &v) in xb.iter().enumerate() {
                let want = if amax == 0.0 { 0 } else { code(v * (1.0 / amax)) };
                let k = b * bs + i;
                assert_eq!(codes[k], want, "code {k}");
                assert_eq!(out[k].to_bits(), (map[want as usize] * amax + 0.25).to_bits(), "decoded {k}");
            }
        }
    }
}
