//! Element types of tensors that cross the API, and conversions between
//! their byte representation and `f32`.

use crate::error::Result;
use half::{bf16, f16};

/// Element type of a dense buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name PyTorch uses (`torch.float32` → `"float32"`), as written in
    /// bitsandbytes' quant-state JSON.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    pub fn from_torch_name(s: &str) -> Option<DType> {
        match s.strip_prefix("torch.").unwrap_or(s) {
            "float32" | "float" => Some(DType::F32),
            "float16" | "half" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// The safetensors dtype of this element type.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

/// A borrowed dense tensor's elements in one of the [`DType`]s. The slices
/// are typed, so alignment has already been dealt with by whoever built it.
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> Elems<'a> {
    pub fn len(&self) -> usize {
        match self {
            Elems::F32(s) => s.len(),
            Elems::F16(s) => s.len(),
            Elems::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Elems::F32(_) => DType::F32,
            Elems::F16(_) => DType::F16,
            Elems::BF16(_) => DType::BF16,
        }
    }

    /// Element `i` widened to `f32` (exact for all three types).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Elems::F32(s) => s[i],
            Elems::F16(s) => s[i].to_f32(),
            Elems::BF16(s) => s[i].to_f32(),
        }
    }

    /// The index of the first NaN or infinite element, if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        use rayon::prelude::*;
        // Chunked so large tensors are scanned on all threads.
        const CHUNK: usize = 1 << 16;
        let n = self.len();
        let chunks = n.div_ceil(CHUNK);
        (0..chunks).into_par_iter().find_map_first(|c| {
            let lo = c * CHUNK;
            let hi = (lo + CHUNK).min(n);
            // A branch-free scan of the exponent bits (vectorizes), then the
            // exact position only in a chunk that has a non-finite value.
            let bad = match self {
                Elems::F32(s) => s[lo..hi].iter().fold(false, |a, v| a | (v.to_bits() & 0x7F80_0000 == 0x7F80_0000)),
                Elems::F16(s) => s[lo..hi].iter().fold(false, |a, v| a | (v.to_bits() & 0x7C00 == 0x7C00)),
                Elems::BF16(s) => s[lo..hi].iter().fold(false, |a, v| a | (v.to_bits() & 0x7F80 == 0x7F80)),
            };
            if !bad {
                return None;
            }
            match self {
                Elems::F32(s) => s[lo..hi].iter().position(|v| !v.is_finite()),
                Elems::F16(s) => s[lo..hi].iter().position(|v| !v.is_finite()),
                Elems::BF16(s) => s[lo..hi].iter().position(|v| !v.is_finite()),
            }
            .map(|p| lo + p)
        })
    }
}

/// Mutable typed output buffer.
pub enum ElemsMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl ElemsMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            ElemsMut::F32(s) => s.len(),
            ElemsMut::F16(s) => s.len(),
            ElemsMut::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Number of elements of `shape`, refusing empty shapes, zero dimensions and
/// products that overflow `usize` (or whose byte size for `elem_size` would).
pub fn checked_numel(shape: &[usize], elem_size: usize) -> Result<usize> {
    if shape.is_empty() {
        crate::bail!(InvalidShape, "shape has no dimensions");
    }
    let mut n: usize = 1;
    for (i, &d) in shape.iter().enumerate() {
        if d == 0 {
            crate::bail!(InvalidShape, "dimension {i} of shape {shape:?} is zero");
        }
        n = n
            .checked_mul(d)
            .ok_or_else(|| crate::err!(InvalidShape, "shape {shape:?} overflows the address space"))?;
    }
    if n.checked_mul(elem_size.max(1)).is_none_or(|b| b > isize::MAX as usize) {
        crate::bail!(InvalidShape, "shape {shape:?} is too large for memory");
    }
    Ok(n)
}
