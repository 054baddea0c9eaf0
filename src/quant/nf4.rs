//! NF4 tensors: a dense weight quantized blockwise to 4-bit NormalFloat,
//! with the block scales kept in fp32 or double-quantized to 8 bits.
//! Format and rounding are bitsandbytes' (`quantize_4bit(quant_type="nf4")`),
//! see DESIGN.md section 4; the kernels are in `backend::cpu::nf4`.

use crate::backend::cpu::nf4 as k;
use crate::dtype::{checked_numel, DType, Elems, ElemsMut};
use crate::error::Result;
use crate::quant::dynamic_map::signed_dynamic_map;

/// Smallest and largest NF4 blocksize accepted (powers of two in between),
/// the range bitsandbytes' `quantize_4bit` supports on the CPU.
pub(crate) const MIN_BLOCKSIZE: usize = 32;
pub(crate) const MAX_BLOCKSIZE: usize = 4096;
/// Blocksize of the 8-bit quantization of the absmax values
/// (bitsandbytes: `quantize_blockwise(absmax - offset, blocksize=256)`).
pub(crate) const NESTED_BLOCKSIZE: usize = 256;

/// Parameters of [`Nf4Tensor::quantize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nf4Params {
    /// Elements per block: a power of two from 32 to 4096 (default 64).
    pub blocksize: usize,
    /// Quantize the fp32 block scales to 8 bits (QLoRA's double
    /// quantization; default on).
    pub double_quant: bool,
}

impl Default for Nf4Params {
    fn default() -> Self {
        Nf4Params { blocksize: 64, double_quant: true }
    }
}

/// Double-quantized block scales: `absmax_i = map[codes_i] ·
/// nested_absmax[i / nested_blocksize] + offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    pub codes: Vec<u8>,
    pub nested_absmax: Vec<f32>,
    pub offset: f32,
    pub nested_blocksize: usize,
    /// The 8-bit code book (bitsandbytes' signed dynamic map for files we
    /// write; whatever `nested_quant_map` a loaded file carries).
    pub map: Box<[f32; 256]>,
}

impl DoubleQuant {
    /// Quantizes fp32 block scales as bitsandbytes does with
    /// `compress_statistics=True`.
    pub fn compress(absmax: &[f32]) -> DoubleQuant {
        // offset = absmax.mean(), in torch's fp32 summation order.
        let offset = mean_f32(absmax);
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let map = Box::new(signed_dynamic_map());
        let nb = absmax.len().div_ceil(NESTED_BLOCKSIZE);
        let mut codes = vec![0u8; absmax.len()];
        let mut nested_absmax = vec![0f32; nb];
        k::blockwise8_quantize(&centered, crate::quant::dynamic_map::blockwise8_signed_code, NESTED_BLOCKSIZE, &mut codes, &mut nested_absmax);
        DoubleQuant { codes, nested_absmax, offset, nested_blocksize: NESTED_BLOCKSIZE, map }
    }

    /// The fp32 block scales this encodes.
    pub fn decode(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.codes.len()];
        k::blockwise8_dequantize(&self.codes, &self.map, &self.nested_absmax, self.nested_blocksize, self.offset, &mut out);
        out
    }
}

/// Mean of fp32 values as torch's `Tensor.mean()` on the CPU computes it:
/// the fp32 sum in PyTorch's order, divided in fp32 by the count.
fn mean_f32(v: &[f32]) -> f32 {
    use crate::backend::cpu::reduce::{torch_sum_f32, TORCH_F32_LANES};
    torch_sum_f32(v, TORCH_F32_LANES) / v.len() as f32
}

/// The block scales of an NF4 tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    Double(DoubleQuant),
}

/// A weight in NF4: packed codes, block scales, and the shape and dtype of
/// the dense tensor it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) blocksize: usize,
    pub(crate) packed: Vec<u8>,
    pub(crate) absmax: Absmax,
}

/// Checks a blocksize against the supported set.
pub fn check_blocksize(bs: usize) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(&bs) {
        bail!(InvalidBlocksize, "blocksize {bs} is not a power of two from {MIN_BLOCKSIZE} to {MAX_BLOCKSIZE}");
    }
    Ok(())
}

impl Nf4Tensor {
    /// Quantizes a dense tensor. Refuses empty or overflowing shapes,
    /// unsupported blocksizes, a length that disagrees with the shape, and
    /// NaN or ±Inf (naming the first offending flat index).
    pub fn quantize(x: Elems<'_>, shape: &[usize], params: Nf4Params) -> Result<Nf4Tensor> {
        check_blocksize(params.blocksize)?;
        let n = checked_numel(shape, x.dtype().size())?;
        if n != x.len() {
            bail!(BufferSize, "shape {shape:?} has {n} elements but the input holds {}", x.len());
        }
        if let Some(i) = x.first_non_finite() {
            bail!(NonFinite, "element {i} (flat index) is {}; NF4 needs finite weights", x.get(i));
        }
        let bs = params.blocksize;
        let mut packed = vec![0u8; n.div_ceil(2)];
        let mut absmax = vec![0f32; n.div_ceil(bs)];
        k::nf4_quantize(x, bs, &mut packed, &mut absmax);
        let absmax = if params.double_quant {
            let d = DoubleQuant::compress(&absmax);
            // |map| ≤ 1, so decoded scales are bounded by max(nested) + |offset|;
            // only near fp32's limit is the full decode needed to decide.
            let bound = d.nested_absmax.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) + (d.offset as f64).abs();
            let overflows = !d.offset.is_finite()
                || d.nested_absmax.iter().any(|v| !v.is_finite())
                || (bound >= f32::MAX as f64 && d.decode().iter().any(|v| !v.is_finite()));
            if overflows {
                bail!(NonFinite, "double quantization overflows fp32 for block scales up to {:e}: quantize without double quantization", absmax.iter().fold(0f32, |m, v| m.max(*v)));
            }
            Absmax::Double(d)
        } else {
            Absmax::F32(absmax)
        };
        Ok(Nf4Tensor { shape: shape.to_vec(), dtype: x.dtype(), blocksize: bs, packed, absmax })
    }

    /// Assembles a tensor from parts (as read from a file), checking that
    /// they agree with each other.
    pub fn from_parts(shape: Vec<usize>, dtype: DType, blocksize: usize, packed: Vec<u8>, absmax: Absmax) -> Result<Nf4Tensor> {
        check_blocksize(blocksize)?;
        let n = checked_numel(&shape, 1)?;
        if packed.len() != n.div_ceil(2) {
            bail!(ShapeMismatch, "shape {shape:?} needs {} packed bytes, found {}", n.div_ceil(2), packed.len());
        }
        let nblocks = n.div_ceil(blocksize);
        match &absmax {
            Absmax::F32(a) => {
                if a.len() != nblocks {
                    bail!(ShapeMismatch, "shape {shape:?} with blocksize {blocksize} needs {nblocks} absmax values, found {}", a.len());
                }
                if let Some(i) = a.iter().position(|v| !v.is_finite() || *v < 0.0) {
                    bail!(FileFormat, "absmax[{i}] = {} is not a finite non-negative scale", a[i]);
                }
            }
            Absmax::Double(d) => {
                if d.codes.len() != nblocks {
                    bail!(ShapeMismatch, "shape {shape:?} with blocksize {blocksize} needs {nblocks} absmax codes, found {}", d.codes.len());
                }
                if d.nested_blocksize == 0 || d.nested_absmax.len() != nblocks.div_ceil(d.nested_blocksize) {
                    bail!(
                        ShapeMismatch,
                        "{nblocks} absmax codes in nested blocks of {} need {} nested absmax values, found {}",
                        d.nested_blocksize,
                        nblocks.div_ceil(d.nested_blocksize.max(1)),
                        d.nested_absmax.len()
                    );
                }
                if !d.offset.is_finite() || d.nested_absmax.iter().any(|v| !v.is_finite()) || d.map.iter().any(|v| !v.is_finite()) {
                    bail!(FileFormat, "double-quantization state holds a non-finite value");
                }
            }
        }
        Ok(Nf4Tensor { shape, dtype, blocksize, packed, absmax })
    }

    /// True when rows `r0..r1` of this 2-D tensor start and end on block
    /// boundaries (the end may be the tensor's): what [`Nf4Tensor::rows`]
    /// takes.
    pub fn rows_on_blocks(&self, r0: usize, r1: usize) -> bool {
        let [rows, cols] = self.shape[..] else { return false };
        let bs = self.blocksize;
        r0 < r1 && r1 <= rows && (r0 * cols) % bs == 0 && ((r1 * cols) % bs == 0 || r1 == rows)
    }

    /// Rows `r0..r1` of a 2-D tensor as a tensor of their own (a fused
    /// projection's part: Phi-3's q, k, v of `qkv_proj`), dequantizing to
    /// the same values bit for bit. The rows must start and end on block
    /// boundaries (the end may be the tensor's). Double-quantized scales
    /// stay so when the rows start on a nested block; else they are
    /// decoded to fp32 (the values the nested ones decode to).
    pub fn rows(&self, r0: usize, r1: usize) -> Result<Nf4Tensor> {
        let [rows, cols] = self.shape[..] else { bail!(InvalidShape, "rows of a tensor of shape {:?}: not 2-D", self.shape) };
        let bs = self.blocksize;
        let (e0, e1) = (r0 * cols, r1 * cols);
        if !self.rows_on_blocks(r0, r1) {
            bail!(InvalidShape, "rows {r0}..{r1} of [{rows}, {cols}] in blocks of {bs}: not a whole-block range");
        }
        let (b0, b1) = (e0 / bs, e1.div_ceil(bs));
        let absmax = match &self.absmax {
            Absmax::F32(a) => Absmax::F32(a[b0..b1].to_vec()),
            Absmax::Double(d) if b0 % d.nested_blocksize == 0 => Absmax::Double(DoubleQuant {
                codes: d.codes[b0..b1].to_vec(),
                nested_absmax: d.nested_absmax[b0 / d.nested_blocksize..b1.div_ceil(d.nested_blocksize)].to_vec(),
                offset: d.offset,
                nested_blocksize: d.nested_blocksize,
                map: d.map.clone(),
            }),
            Absmax::Double(d) => Absmax::F32(d.decode()[b0..b1].to_vec()),
        };
        Nf4Tensor::from_parts(vec![r1 - r0, cols], self.dtype, bs, self.packed[e0 / 2..e1.div_ceil(2)].to_vec(), absmax)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }
    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Double(_))
    }

    /// The fp32 block scales (decoded when double-quantized).
    pub fn absmax_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.absmax {
            Absmax::F32(a) => std::borrow::Cow::Borrowed(a),
            Absmax::Double(d) => std::borrow::Cow::Owned(d.decode()),
        }
    }

    /// Writes the dense tensor into `out` (same number of elements).
    pub fn dequantize_into(&self, out: ElemsMut<'_>) -> Result<()> {
        if out.len() != self.numel() {
            bail!(BufferSize, "output holds {} elements, the tensor {:?} has {}", out.len(), self.shape, self.numel());
        }
        let absmax = self.absmax_f32();
        k::nf4_dequantize(&self.packed, &absmax, self.blocksize, out);
        Ok(())
    }

    /// Dequantized copy in fp32.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.numel()];
        self.dequantize_into(ElemsMut::F32(&mut v)).expect("sized to fit");
        v
    }

    /// Bytes this tensor's quantized data occupies: packed codes, scales,
    /// and for double quantization the nested scales and offset (the 16- and
    /// 256-entry code books are shared constants and not counted).
    pub fn footprint_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::F32(a) => 4 * a.len(),
                Absmax::Double(d) => d.codes.len() + 4 * d.nested_absmax.len() + 4,
            }
    }

    /// `8 · footprint / numel`: 4.5 for blocksize 64, ≈ 4.127 with double
    /// quantization (DESIGN.md section 4).
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.footprint_bytes() as f64 / self.numel() as f64
    }

}


/// Dequantizes flat elements `start .. start + out.len()` of an NF4 tensor
/// to fp32 given its decoded block scales: `out[j] = NF4_CODE[q] · absmax`
/// for element `start + j`. Used to dequantize a weight tile by tile.
pub fn dequantize_range_f32(packed: &[u8], absmax: &[f32], blocksize: usize, start: usize, out: &mut [f32]) {
    use crate::backend::cpu::nf4::NF4_CODE;
    for (j, o) in out.iter_mut().enumerate() {
        let i = start + j;
        let byte = packed[i / 2];
        let q = if i.is_multiple_of(2) { byte >> 4 } else { byte & 15 };
        *o = NF4_CODE[q as usize] * absmax[i / blocksize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fused projection's parts: each row range dequantizes to the whole
    /// tensor's values for those rows, bit for bit, with the nested scales
    /// kept where the range starts on a nested block and decoded elsewhere;
    /// ranges off the blocks are refused.
    #[test]
    fn row_ranges_dequantize_to_the_whole_tensors_rows() {
        let mut r = crate::rng::SplitMix64::new(5);
        for (rows, cols, bs, dq) in [(48usize, 512usize, 64usize, true), (40, 64, 64, true), (40, 64, 128, false), (7, 256, 256, true)] {
            let x: Vec<f32> = (0..rows * cols).map(|_| r.normal() * 0.05).collect();
            let t = Nf4Tensor::quantize(Elems::F32(&x), &[rows, cols], Nf4Params { blocksize: bs, double_quant: dq }).unwrap();
            let all = t.dequantize_f32();
            let step = (bs / cols).max(1);
            let cuts: Vec<usize> = (0..=rows).filter(|&c| c % step == 0 || c == rows).collect();
            for w in cuts.windows(2).chain([[0, rows].as_slice()]) {
                let p = t.rows(w[0], w[1]).unwrap();
                assert_eq!(p.shape(), [w[1] - w[0], cols]);
                let got: Vec<u32> = p.dequantize_f32().iter().map(|v| v.to_bits()).collect();
                let want: Vec<u32> = all[w[0] * cols..w[1] * cols].iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "rows {}..{} of [{rows}, {cols}] blocksize {bs}", w[0], w[1]);
                let nested_start = (w[0] * cols / bs) % NESTED_BLOCKSIZE == 0;
                assert_eq!(p.is_double_quant(), dq && nested_start, "rows {}..{}", w[0], w[1]);
            }
        }
        let x = vec![0.5f32; 40 * 64];
        let t = Nf4Tensor::quantize(Elems::F32(&x), &[40, 64], Nf4Params { blocksize: 128, double_quant: true }).unwrap();
        assert!(t.rows(1, 3).is_err() && t.rows(2, 41).is_err() && t.rows(4, 4).is_err());
        assert!(!t.rows_on_blocks(1, 3) && !t.rows_on_blocks(2, 41) && !t.rows_on_blocks(4, 4));
        assert!(t.rows_on_blocks(2, 4) && t.rows_on_blocks(38, 40) && t.rows_on_blocks(0, 40));
        // A small Phi-3's qkv part (12 rows of 12: 144 values) splits a
        // block of 64: not a row range rows() takes (the device uploads
        // such a part dense).
        let t = Nf4Tensor::quantize(Elems::F32(&vec![0.5f32; 36 * 12]), &[36, 12], Nf4Params::default()).unwrap();
        assert!(!t.rows_on_blocks(0, 12) && !t.rows_on_blocks(12, 24) && t.rows(12, 24).is_err());
    }
}
