//! CPU reference kernels for NF4 (bitsandbytes `quant_type="nf4"`) and for
//! the blockwise 8-bit code used by double quantization.
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

use crate::dtype::{Elems, ElemsMut};
use half::{bf16, f16};
use rayon::prelude::*;

/// The 16 NF4 values (bitsandbytes `get_4bit_type("nf4")`, also
/// `QuantState.code` and the `quant_map` tensor of checkpoints).
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

/// Blocks handed to one rayon task: enough work (≥ 16 Ki elements) to
/// amortize scheduling, few enough tasks to balance across cores.
fn blocks_per_task(blocksize: usize) -> usize {
    (16384 / blocksize).max(1)
}

/// Reads element `i` of a typed slice as f32.
trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}
impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}
impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}
impl Widen for bf16 {
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
fn quantize_block<T: Widen>(x: &[T], out: &mut [u8], partial: bool) -> f32 {
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

fn quantize_typed<T: Widen>(x: &[T], blocksize: usize, packed: &mut [u8], absmax: &mut [f32]) {
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

/// NF4-quantizes `x` in blocks of `blocksize` (even), writing
/// `packed` (⌈n/2⌉ bytes) and `absmax` (⌈n/blocksize⌉ floats). Inputs must
/// be finite (checked by the caller).
pub fn nf4_quantize(x: Elems<'_>, blocksize: usize, packed: &mut [u8], absmax: &mut [f32]) {
    debug_assert!(blocksize % 2 == 0);
    debug_assert_eq!(packed.len(), x.len().div_ceil(2));
    debug_assert_eq!(absmax.len(), x.len().div_ceil(blocksize));
    match x {
        Elems::F32(s) => quantize_typed(s, blocksize, packed, absmax),
        Elems::F16(s) => quantize_typed(s, blocksize, packed, absmax),
        Elems::BF16(s) => quantize_typed(s, blocksize, packed, absmax),
    }
}

/// Output element types dequantization can write, each rounded once from
/// the fp32 product (round to nearest even, as torch's `.to()`).
trait Narrow: Copy + Send + Sync + Default {
    fn narrow(v: f32) -> Self;
}
impl Narrow for f32 {
    #[inline(always)]
    fn narrow(v: f32) -> f32 {
        v
    }
}
impl Narrow for f16 {
    #[inline(always)]
    fn narrow(v: f32) -> f16 {
        f16::from_f32(v)
    }
}
impl Narrow for bf16 {
    #[inline(always)]
    fn narrow(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
}

fn dequantize_typed<T: Narrow>(packed: &[u8], absmax: &[f32], blocksize: usize, out: &mut [T]) {
    let bpt = blocks_per_task(blocksize);
    let n = out.len();
    out.par_chunks_mut(bpt * blocksize).enumerate().for_each(|(task, o)| {
        let first_block = task * bpt;
        for (b, ob) in o.chunks_mut(blocksize).enumerate() {
            let blk = first_block + b;
            let a = absmax[blk];
            // The block's 16 possible outputs, each computed exactly as the
            // per-element formula would: a table lookup, not an approximation.
            let mut lut = [T::default(); 16];
            for (l, c) in lut.iter_mut().zip(NF4_CODE.iter()) {
                *l = T::narrow(*c * a);
            }
            let bytes = &packed[blk * blocksize / 2..];
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
    });
    debug_assert_eq!(n, out.len());
}

/// Inverse of [`nf4_quantize`]: `out[i] = NF4_CODE[q_i] · absmax[i / bs]`.
pub fn nf4_dequantize(packed: &[u8], absmax: &[f32], blocksize: usize, out: ElemsMut<'_>) {
    match out {
        ElemsMut::F32(o) => dequantize_typed(packed, absmax, blocksize, o),
        ElemsMut::F16(o) => dequantize_typed(packed, absmax, blocksize, o),
        ElemsMut::BF16(o) => dequantize_typed(packed, absmax, blocksize, o),
    }
}

/// Blockwise 8-bit quantization as bitsandbytes' native CPU
/// `quantize_blockwise` does it (`quantize_cpu_impl<float>` in
/// libbitsandbytes_cpu.so, read from its machine code): per block
/// `scale = max|x|` and `q_i = code(x_i · fp32(1/scale))`, where `code` is
/// bitsandbytes' table lookup (`quant::dynamic_map::blockwise8_signed_code`
/// for the signed dynamic map; not always the nearest entry near 0). A
/// block whose scale is 0 gets code 0 everywhere.
pub fn blockwise8_quantize(x: &[f32], code: impl Fn(f32) -> u8, blocksize: usize, codes: &mut [u8], scales: &mut [f32]) {
    for ((xb, cb), s) in x.chunks(blocksize).zip(codes.chunks_mut(blocksize)).zip(scales.iter_mut()) {
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
}

/// Inverse of [`blockwise8_quantize`] plus an offset:
/// `out_i = map[q_i] · scales[i / bs] + offset` (fp32, unfused).
pub fn blockwise8_dequantize(codes: &[u8], map: &[f32; 256], scales: &[f32], blocksize: usize, offset: f32, out: &mut [f32]) {
    for ((ob, cb), &s) in out.chunks_mut(blocksize).zip(codes.chunks(blocksize)).zip(scales) {
        for (o, &c) in ob.iter_mut().zip(cb) {
            *o = map[c as usize] * s + offset;
        }
    }
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
