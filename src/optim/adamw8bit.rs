//! 8-bit AdamW as bitsandbytes 0.50.2 computes it on the CPU
//! (`bitsandbytes.optim.AdamW8bit`), bit for bit but for the square root.
//!
//! State (bitsandbytes/optim/optimizer.py `Optimizer2State.init_state`,
//! lines 492–533):
//! - a tensor with fewer than `min_8bit_size` = 4,096 elements (line 502)
//!   keeps fp32 moments and takes the 32-bit update
//!   (backends/cpu/ops.py `_optimizer_update_32bit_cpu`, lines 370–383);
//! - a larger one stores `m` as 8-bit codes of the signed dynamic map
//!   (`qmap1`, `create_dynamic_map(signed=True)`) and `v` of the unsigned
//!   one (`qmap2`, `signed=False`), blockwise with 256 elements per block
//!   and one fp32 absmax per block (`absmax1`, `absmax2`), all zero at
//!   first (lines 518–529).
//!
//! 8-bit update (`_optimizer_update_8bit_blockwise_cpu`, ops.py 469–578),
//! per block of 256, `t` the new step, Python floats rounded to `f32`
//! where torch does:
//!
//! ```text
//! m = qmap1[state1] · absmax1,  v = qmap2[state2] · absmax2   (native dequantize: code · absmax)
//! m ← fma(g, f32(1 − β1), m · f32(β1))                         (ops.py:508, mul_ + add_(alpha))
//! v ← fma(f32(1 − β2)·g, g, v · f32(β2))                       (ops.py:509, mul_ + addcmul_)
//! c1 = 1 − β1^t,  c2 = sqrt(1 − β2^t)                (f64)     (ops.py:511–512, math.sqrt)
//! denom = sqrt(v) / f32(c2) + f32(eps)                         (ops.py:514)
//! p ← p · f32(1 − lr·wd)                  if wd > 0            (ops.py:515–516)
//! p ← p + (f32(−lr / c1) · m) / denom                          (ops.py:517, addcdiv_)
//! (state1, absmax1) = quantize(m, qmap1); (state2, absmax2) = quantize(v, qmap2)
//! ```
//!
//! 32-bit update (tensors under 4,096 elements):
//!
//! ```text
//! m, v as above (fp32 state)
//! step_size = −lr · c2 / c1                         (f64)      (ops.py:375)
//! p ← p · f32(1 − lr·wd)                  if wd > 0
//! p ← fma(m / (sqrt(v) + f32(eps · c2)), f32(step_size), p)    (ops.py:380–383, add_(alpha))
//! ```
//!
//! Quantization (the native `quantize_blockwise` CPU kernel of 0.50.2,
//! `quantize_cpu_impl` with `build_quantize_lut` in csrc/cpu_ops.cpp):
//! `absmax = max |x|` over the block; a zero block gets all codes 0;
//! otherwise `z = x · f32(1 / absmax)` (a product with the reciprocal, not
//! a division: checked against the library), clamped to [−1, 1], indexes a
//! 65,536-entry table: `code = lut[trunc((z + 1) · 0.5 · 65535 + 0.5)]`,
//! where `lut[i]` counts the midpoints `0.5 · (c[k] + c[k+1])` of the map
//! that are `< −1 + 2i / 65535`. Where the map is finer than the table
//! (near 0) this is not the nearest code. [`DynamicMap8`] builds the same
//! table; the tests check it against bitsandbytes' codes and against the
//! thresholds measured from the library in `quant::dynamic_map`.
//!
//! Not reproduced: PyTorch's CPU `Tensor.sqrt` (not correctly rounded on
//! MKL builds; see [`super::adamw`]): the codes and absmax values, which do
//! not depend on it, are bit-exact; parameters are bit-exact against a run
//! with the IEEE square root and within a few ulp of the update otherwise.
//! Percentile clipping, `max_unorm` and paged state are not implemented
//! (AdamW8bit's defaults leave them off).

use super::adamw::AdamWConfig;
use super::state::{check_names, Lookup, StateTensor};
use super::{check_step_args, simd_dispatch, TASK_ELEMS};
use crate::error::Result;
use crate::quant::dynamic_map::signed_dynamic_map;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Elements per block of the 8-bit state (bitsandbytes: fixed 256).
pub const BLOCKSIZE_8BIT: usize = 256;

/// Tensors with fewer elements keep fp32 state (AdamW8bit's
/// `min_8bit_size` default).
pub const MIN_8BIT_SIZE: usize = 4096;

/// Entries of the quantization lookup table (csrc/cpu_ops.cpp `kLUTSize`).
const LUT_SIZE: usize = 65536;

/// `create_dynamic_map(signed=False)` (bitsandbytes 0.50.2, torch 2.15) as
/// fp32 bit patterns: 0, then for i in 0..7 the midpoints of
/// `linspace(0.1, 1, 2^(i+1) + 1)` times `10^(i−6)`, then 1.0. Exact bits
/// (the construction's `linspace` rounding is torch's); the fixture
/// `qmap.unsigned` is compared with it.
static UNSIGNED_DYNAMIC_MAP_BITS: [u32; 256] = [
    0x00000000, 0x34ae7baa, 0x35500998, 0x360e9b38, 0x3692ccf6, 0x36de4c51, 0x3714e5d5, 0x3783126e,
    0x37e171a0, 0x381fe868, 0x384f1800, 0x387e479a, 0x3896bb99, 0x38ae5364, 0x38c5eb31, 0x3906594b,
    0x394154ca, 0x397c5049, 0x399ba5e4, 0x39b923a2, 0x39d6a163, 0x39f41f22, 0x3a08ce71, 0x3a178d50,
    0x3a264c30, 0x3a350b10, 0x3a43c9ef, 0x3a5288d0, 0x3a6147af, 0x3a70068e, 0x3a7ec56e, 0x3a958106,
    0x3aba5e35, 0x3adf3b64, 0x3b020c4a, 0x3b147ae1, 0x3b26e978, 0x3b395810, 0x3b4bc6a7, 0x3b5e3540,
    0x3b70a3d7, 0x3b818937, 0x3b8ac082, 0x3b93f7cf, 0x3b9d2f1a, 0x3ba66666, 0x3baf9db2, 0x3bb8d4fd,
    0x3bc20c4a, 0x3bcb4395, 0x3bd47ae1, 0x3bddb22e, 0x3be6e978, 0x3bf020c5, 0x3bf9580f, 0x3c0147ae,
    0x3c05e354, 0x3c0a7ef9, 0x3c0f1aa0, 0x3c13b645, 0x3c1851eb, 0x3c1ced92, 0x3c218937, 0x3c2f5c2a,
    0x3c466667, 0x3c5d70a3, 0x3c747ae2, 0x3c85c28f, 0x3c9147af, 0x3c9ccccd, 0x3ca851eb, 0x3cb3d70b,
    0x3cbf5c29, 0x3ccae147, 0x3cd66667, 0x3ce1eb87, 0x3ced70a3, 0x3cf8f5c3, 0x3d023d70, 0x3d080000,
    0x3d0dc28f, 0x3d13851f, 0x3d1947af, 0x3d1f0a3d, 0x3d24cccd, 0x3d2a8f5c, 0x3d3051eb, 0x3d36147b,
    0x3d3bd70a, 0x3d41999a, 0x3d475c28, 0x3d4d1eb8, 0x3d52e147, 0x3d58a3d7, 0x3d5e6667, 0x3d6428f7,
    0x3d69eb87, 0x3d6fae15, 0x3d7570a3, 0x3d7b3333, 0x3d807ae2, 0x3d835c2a, 0x3d863d71, 0x3d891eb8,
    0x3d8c0000, 0x3d8ee148, 0x3d91c290, 0x3d94a3d7, 0x3d97851f, 0x3d9a6667, 0x3d9d47af, 0x3da028f6,
    0x3da30a3e, 0x3da5eb85, 0x3da8cccd, 0x3dabae15, 0x3dae8f5c, 0x3db170a4, 0x3db451eb, 0x3db73333,
    0x3dba147b, 0x3dbcf5c3, 0x3dbfd70b, 0x3dc2b852, 0x3dc5999a, 0x3dc87ae2, 0x3dcb5c29, 0x3dd40000,
    0x3de26666, 0x3df0cccd, 0x3dff3333, 0x3e06cccc, 0x3e0e0000, 0x3e153334, 0x3e1c6666, 0x3e23999a,
    0x3e2acccc, 0x3e320000, 0x3e393334, 0x3e406666, 0x3e47999a, 0x3e4ecccc, 0x3e560000, 0x3e5d3334,
    0x3e646666, 0x3e6b999a, 0x3e72cccc, 0x3e7a0000, 0x3e809999, 0x3e843333, 0x3e87cccd, 0x3e8b6666,
    0x3e8f0000, 0x3e92999a, 0x3e963333, 0x3e99cccc, 0x3e9d6666, 0x3ea10000, 0x3ea4999a, 0x3ea83333,
    0x3eabcccc, 0x3eaf6666, 0x3eb30000, 0x3eb6999a, 0x3eba3333, 0x3ebdcccc, 0x3ec16666, 0x3ec50000,
    0x3ec8999a, 0x3ecc3333, 0x3ecfcccc, 0x3ed36666, 0x3ed70000, 0x3eda999a, 0x3ede3333, 0x3ee1cccc,
    0x3ee56666, 0x3ee90000, 0x3eec999a, 0x3ef03333, 0x3ef3cccc, 0x3ef76666, 0x3efb0000, 0x3efe9999,
    0x3f01199a, 0x3f02e666, 0x3f04b333, 0x3f068000, 0x3f084ccc, 0x3f0a199a, 0x3f0be666, 0x3f0db334,
    0x3f0f8000, 0x3f114ccd, 0x3f13199a, 0x3f14e666, 0x3f16b334, 0x3f188000, 0x3f1a4ccd, 0x3f1c199a,
    0x3f1de666, 0x3f1fb334, 0x3f218000, 0x3f234ccd, 0x3f25199a, 0x3f26e666, 0x3f28b334, 0x3f2a8000,
    0x3f2c4ccd, 0x3f2e199a, 0x3f2fe666, 0x3f31b334, 0x3f338000, 0x3f354ccd, 0x3f37199a, 0x3f38e666,
    0x3f3ab334, 0x3f3c8000, 0x3f3e4ccd, 0x3f40199a, 0x3f41e666, 0x3f43b334, 0x3f458000, 0x3f474ccc,
    0x3f49199a, 0x3f4ae666, 0x3f4cb334, 0x3f4e8000, 0x3f504ccc, 0x3f52199a, 0x3f53e666, 0x3f55b334,
    0x3f578000, 0x3f594ccc, 0x3f5b199a, 0x3f5ce666, 0x3f5eb334, 0x3f608000, 0x3f624ccc, 0x3f64199a,
    0x3f65e666, 0x3f67b334, 0x3f698000, 0x3f6b4ccc, 0x3f6d199a, 0x3f6ee666, 0x3f70b334, 0x3f728000,
    0x3f744ccc, 0x3f76199a, 0x3f77e666, 0x3f79b334, 0x3f7b8000, 0x3f7d4ccc, 0x3f7f199a, 0x3f800000,
];

/// A 256-entry dynamic map and the lookup table bitsandbytes' CPU
/// quantizer builds from it.
pub struct DynamicMap8 {
    code: [f32; 256],
    /// Indexed by a `u16`: no bounds check.
    lut: Box<[u8; LUT_SIZE]>,
}

impl std::fmt::Debug for DynamicMap8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicMap8").field("min", &self.code[0]).field("max", &self.code[255]).finish()
    }
}

impl DynamicMap8 {
    /// The map `code` (sorted ascending, in [−1, 1]) with its table:
    /// `lut[i]` = number of midpoints `0.5·(c[k] + c[k+1])` (fp32) below
    /// `−1 + (2i)/65535` (fp32), as `build_quantize_lut` computes it.
    pub fn from_code(code: [f32; 256]) -> DynamicMap8 {
        debug_assert!(code.windows(2).all(|w| w[0] <= w[1]), "map must be sorted");
        let mid: Vec<f32> = code.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
        let mut lut = Box::new([0u8; LUT_SIZE]);
        let mut k = 0usize;
        for (i, e) in lut.iter_mut().enumerate() {
            let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
            while k < mid.len() && mid[k] < val {
                k += 1;
            }
            *e = k as u8;
        }
        DynamicMap8 { code, lut }
    }

    /// `create_dynamic_map(signed=True)`: the first moment's map.
    pub fn signed() -> &'static DynamicMap8 {
        static M: OnceLock<DynamicMap8> = OnceLock::new();
        M.get_or_init(|| DynamicMap8::from_code(signed_dynamic_map()))
    }

    /// `create_dynamic_map(signed=False)`: the second moment's map.
    pub fn unsigned() -> &'static DynamicMap8 {
        static M: OnceLock<DynamicMap8> = OnceLock::new();
        M.get_or_init(|| DynamicMap8::from_code(UNSIGNED_DYNAMIC_MAP_BITS.map(f32::from_bits)))
    }

    /// The 256 code values.
    pub fn code(&self) -> &[f32; 256] {
        &self.code
    }

    /// The code of a normalized value: `lut[trunc((clamp(z, −1, 1) + 1) ·
    /// 0.5 · 65535 + 0.5)]` (csrc/cpu_ops.cpp `norm_to_lut_index`). The
    /// library's AVX2 path may fuse the last multiply-add; the code is the
    /// same (bisection over all fp32 inputs in [−1, 1] finds the same 255
    /// steps for both forms and for bitsandbytes itself, with either map).
    /// NaN gives code 0, as there.
    #[inline(always)]
    pub fn encode(&self, z: f32) -> u8 {
        let z = z.clamp(-1.0, 1.0);
        // `as` truncates toward zero (NaN → 0); the value is in [0.5, 65535.5].
        let idx = ((z + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5) as u16;
        self.lut[idx as usize]
    }

    /// Quantizes one block: returns `absmax = max |x|` (0 for an all-zero
    /// block, whose codes are all 0) and writes `code(x · (1/absmax))`.
    #[inline(always)]
    pub fn quantize_block(&self, x: &[f32], q: &mut [u8]) -> f32 {
        let absmax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
        if absmax == 0.0 {
            q.fill(0);
            return 0.0;
        }
        let inv = 1.0f32 / absmax;
        for (q, &v) in q.iter_mut().zip(x) {
            *q = self.encode(v * inv);
        }
        absmax
    }

    /// `code[q] · absmax` (the native `dequantize_blockwise` kernel).
    #[inline(always)]
    pub fn decode(&self, q: u8, absmax: f32) -> f32 {
        self.code[q as usize] * absmax
    }

    /// Blockwise quantization of a whole tensor (`quantize_blockwise(x,
    /// code, blocksize)`): codes and one absmax per block.
    pub fn quantize(&self, x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
        assert!(blocksize > 0);
        let mut q = vec![0u8; x.len()];
        let absmax = x.chunks(blocksize).zip(q.chunks_mut(blocksize)).map(|(x, q)| self.quantize_block(x, q)).collect();
        (q, absmax)
    }

    /// Blockwise dequantization of a whole tensor.
    pub fn dequantize(&self, q: &[u8], absmax: &[f32], blocksize: usize) -> Vec<f32> {
        assert!(blocksize > 0 && absmax.len() == q.len().div_ceil(blocksize));
        q.chunks(blocksize).zip(absmax).flat_map(|(q, &a)| q.iter().map(move |&c| self.decode(c, a))).collect()
    }
}

/// The optimizer state of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Bnb8bitTensorState {
    /// Under `min_8bit_size` elements: fp32 moments (`state1` = m,
    /// `state2` = v).
    Fp32 { m: Vec<f32>, v: Vec<f32> },
    /// 8-bit moments: codes of the signed (`state1`) and unsigned
    /// (`state2`) dynamic maps, one fp32 absmax per 256-element block.
    Blockwise { state1: Vec<u8>, state2: Vec<u8>, absmax1: Vec<f32>, absmax2: Vec<f32> },
}

impl Bnb8bitTensorState {
    fn zeros(n: usize, min_8bit_size: usize) -> Bnb8bitTensorState {
        if n < min_8bit_size {
            Bnb8bitTensorState::Fp32 { m: vec![0.0; n], v: vec![0.0; n] }
        } else {
            let blocks = n.div_ceil(BLOCKSIZE_8BIT);
            Bnb8bitTensorState::Blockwise {
                state1: vec![0; n],
                state2: vec![0; n],
                absmax1: vec![0.0; blocks],
                absmax2: vec![0.0; blocks],
            }
        }
    }

    pub fn is_8bit(&self) -> bool {
        matches!(self, Bnb8bitTensorState::Blockwise { .. })
    }

    /// The moments `(m, v)` in fp32 (dequantized for 8-bit state).
    pub fn moments(&self) -> (Vec<f32>, Vec<f32>) {
        match self {
            Bnb8bitTensorState::Fp32 { m, v } => (m.clone(), v.clone()),
            Bnb8bitTensorState::Blockwise { state1, state2, absmax1, absmax2 } => (
                DynamicMap8::signed().dequantize(state1, absmax1, BLOCKSIZE_8BIT),
                DynamicMap8::unsigned().dequantize(state2, absmax2, BLOCKSIZE_8BIT),
            ),
        }
    }

    /// Bytes of state held.
    pub fn bytes(&self) -> usize {
        match self {
            Bnb8bitTensorState::Fp32 { m, v } => 4 * (m.len() + v.len()),
            Bnb8bitTensorState::Blockwise { state1, state2, absmax1, absmax2 } => {
                state1.len() + state2.len() + 4 * (absmax1.len() + absmax2.len())
            }
        }
    }
}

/// The fp32 constants of one step (see the module docs for where each
/// rounding happens).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bnb8bitScalars {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `f32(1 − lr·wd)`, `None` unless `wd > 0`.
    pub decay: Option<f32>,
    /// 8-bit path: `f32(c2)`, `f32(eps)`, `f32(−lr / c1)`.
    pub correction2: f32,
    pub eps: f32,
    pub neg_lr_over_c1: f32,
    /// 32-bit path: `f32(eps · c2)`, `f32(−lr · c2 / c1)`.
    pub eps_correction2: f32,
    pub step_size: f32,
}

impl Bnb8bitScalars {
    pub fn new(cfg: &AdamWConfig, step: u64) -> Bnb8bitScalars {
        let t = step as f64;
        let c1 = 1.0 - cfg.beta1.powf(t);
        let c2 = (1.0 - cfg.beta2.powf(t)).sqrt();
        Bnb8bitScalars {
            beta1: cfg.beta1 as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            decay: (cfg.weight_decay > 0.0).then_some((1.0 - cfg.lr * cfg.weight_decay) as f32),
            correction2: c2 as f32,
            eps: cfg.eps as f32,
            neg_lr_over_c1: (-cfg.lr / c1) as f32,
            eps_correction2: (cfg.eps * c2) as f32,
            step_size: (-cfg.lr * c2 / c1) as f32,
        }
    }
}

/// The moment updates shared by both paths: `m·β1 + (1−β1)·g` with
/// `add_(alpha)`'s FMA, `v·β2 + (1−β2)·g·g` with `addcmul_`'s.
#[inline(always)]
fn moments_update(m: f32, v: f32, g: f32, s: &Bnb8bitScalars) -> (f32, f32) {
    (g.mul_add(s.one_minus_beta1, m * s.beta1), (s.one_minus_beta2 * g).mul_add(g, v * s.beta2))
}

/// The 32-bit update (tensors under `min_8bit_size`).
#[inline(always)]
pub fn bnb_update_32bit(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &Bnb8bitScalars) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let (mv, vv) = moments_update(*m, *v, g, s);
        let mut pv = *p;
        if let Some(d) = s.decay {
            pv *= d;
        }
        let update = mv / (vv.sqrt() + s.eps_correction2);
        *p = update.mul_add(s.step_size, pv);
        *m = mv;
        *v = vv;
    }
}

/// The 8-bit update of whole blocks: `p`, `g`, `q1`, `q2` hold
/// `absmax1.len()` blocks of 256 (the last may be partial).
#[inline(always)]
pub fn bnb_update_8bit(
    p: &mut [f32],
    g: &[f32],
    q1: &mut [u8],
    q2: &mut [u8],
    absmax1: &mut [f32],
    absmax2: &mut [f32],
    s: &Bnb8bitScalars,
) {
    let (map1, map2) = (DynamicMap8::signed(), DynamicMap8::unsigned());
    let mut m = [0f32; BLOCKSIZE_8BIT];
    let mut v = [0f32; BLOCKSIZE_8BIT];
    let blocks = p
        .chunks_mut(BLOCKSIZE_8BIT)
        .zip(g.chunks(BLOCKSIZE_8BIT))
        .zip(q1.chunks_mut(BLOCKSIZE_8BIT))
        .zip(q2.chunks_mut(BLOCKSIZE_8BIT))
        .zip(absmax1.iter_mut().zip(absmax2.iter_mut()));
    for ((((p, g), q1), q2), (a1, a2)) in blocks {
        let n = p.len();
        // Three passes per block: table lookups, then the arithmetic (which
        // vectorizes), then requantization.
        for j in 0..n {
            m[j] = map1.decode(q1[j], *a1);
            v[j] = map2.decode(q2[j], *a2);
        }
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(&mut m[..n]).zip(&mut v[..n]) {
            let (mv, vv) = moments_update(*m, *v, g, s);
            let denom = vv.sqrt() / s.correction2 + s.eps;
            let mut pv = *p;
            if let Some(d) = s.decay {
                pv *= d;
            }
            *p = pv + (s.neg_lr_over_c1 * mv) / denom;
            *m = mv;
            *v = vv;
        }
        *a1 = map1.quantize_block(&m[..n], q1);
        *a2 = map2.quantize_block(&v[..n], q2);
    }
}

simd_dispatch! {
    /// [`bnb_update_32bit`] with AVX2 and FMA where available (same bits).
    fn bnb_update_32bit_simd(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &Bnb8bitScalars) => bnb_update_32bit
}

simd_dispatch! {
    /// [`bnb_update_8bit`] with AVX2 and FMA where available (same bits).
    fn bnb_update_8bit_simd(
        p: &mut [f32],
        g: &[f32],
        q1: &mut [u8],
        q2: &mut [u8],
        absmax1: &mut [f32],
        absmax2: &mut [f32],
        s: &Bnb8bitScalars,
    ) => bnb_update_8bit
}

/// bitsandbytes' AdamW8bit over a fixed list of fp32 tensors.
#[derive(Clone, Debug)]
pub struct AdamW8bit {
    config: AdamWConfig,
    sizes: Vec<usize>,
    step: u64,
    states: Vec<Bnb8bitTensorState>,
}

impl AdamW8bit {
    /// An optimizer with AdamW8bit's `min_8bit_size` (4,096). Its default
    /// hyperparameters are [`AdamWConfig::default`]'s (lr 1e-3, betas
    /// (0.9, 0.999), eps 1e-8, weight_decay 1e-2), as in
    /// bitsandbytes/optim/adamw.py.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Result<AdamW8bit> {
        AdamW8bit::with_min_8bit_size(config, sizes, MIN_8BIT_SIZE)
    }

    /// An optimizer whose tensors of at least `min_8bit_size` elements get
    /// 8-bit state.
    pub fn with_min_8bit_size(config: AdamWConfig, sizes: &[usize], min_8bit_size: usize) -> Result<AdamW8bit> {
        config.validate()?;
        Ok(AdamW8bit {
            config,
            sizes: sizes.to_vec(),
            step: 0,
            states: sizes.iter().map(|&n| Bnb8bitTensorState::zeros(n, min_8bit_size)).collect(),
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn set_config(&mut self, config: AdamWConfig) -> Result<()> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.set_config(AdamWConfig { lr, ..self.config })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// The state of tensor `i`.
    pub fn state(&self, i: usize) -> &Bnb8bitTensorState {
        &self.states[i]
    }

    /// Bytes of optimizer state (a 32-bit AdamW holds 8 per element).
    pub fn state_bytes(&self) -> usize {
        self.states.iter().map(|s| s.bytes()).sum()
    }

    /// One optimizer step. Fails, changing nothing, on mismatched counts or
    /// lengths or a non-finite gradient (as [`super::AdamW::step`]).
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]]) -> Result<()> {
        check_step_args(&self.sizes, params, grads)?;
        self.step += 1;
        let s = Bnb8bitScalars::new(&self.config, self.step);
        for ((p, g), st) in params.iter_mut().zip(grads).zip(&mut self.states) {
            let p: &mut [f32] = p;
            match st {
                Bnb8bitTensorState::Fp32 { m, v } => bnb_update_32bit_simd(p, g, m, v, &s),
                Bnb8bitTensorState::Blockwise { state1, state2, absmax1, absmax2 } => {
                    const B: usize = TASK_ELEMS / BLOCKSIZE_8BIT;
                    p.par_chunks_mut(TASK_ELEMS)
                        .zip(g.par_chunks(TASK_ELEMS))
                        .zip(state1.par_chunks_mut(TASK_ELEMS))
                        .zip(state2.par_chunks_mut(TASK_ELEMS))
                        .zip(absmax1.par_chunks_mut(B).zip(absmax2.par_chunks_mut(B)))
                        .for_each(|((((p, g), q1), q2), (a1, a2))| bnb_update_8bit_simd(p, g, q1, q2, a1, a2, &s));
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors, with bitsandbytes' state keys:
    /// `"{name}.state1"`, `"{name}.state2"` (U8 codes, or F32 moments for
    /// small tensors), `"{name}.absmax1"`, `"{name}.absmax2"` (F32, 8-bit
    /// state only), and `"step"` (I64 `[]`).
    pub fn export_state(&self, names: &[&str]) -> Result<Vec<StateTensor>> {
        check_names(names, self.sizes.len())?;
        let mut out = Vec::new();
        for (n, st) in names.iter().zip(&self.states) {
            match st {
                Bnb8bitTensorState::Fp32 { m, v } => {
                    out.push(StateTensor::f32(format!("{n}.state1"), m.clone()));
                    out.push(StateTensor::f32(format!("{n}.state2"), v.clone()));
                }
                Bnb8bitTensorState::Blockwise { state1, state2, absmax1, absmax2 } => {
                    out.push(StateTensor::u8(format!("{n}.state1"), state1.clone()));
                    out.push(StateTensor::u8(format!("{n}.state2"), state2.clone()));
                    out.push(StateTensor::f32(format!("{n}.absmax1"), absmax1.clone()));
                    out.push(StateTensor::f32(format!("{n}.absmax2"), absmax2.clone()));
                }
            }
        }
        out.push(StateTensor::step(self.step));
        Ok(out)
    }

    /// Restores a state exported by [`AdamW8bit::export_state`]; each
    /// tensor's kind (8-bit or fp32) must be the one this optimizer chose
    /// for it. All or nothing.
    pub fn import_state(&mut self, names: &[&str], tensors: &[StateTensor]) -> Result<()> {
        check_names(names, self.sizes.len())?;
        let look = Lookup::new(tensors)?;
        let step = look.step()?;
        let mut states = Vec::with_capacity(names.len());
        for ((n, &len), cur) in names.iter().zip(&self.sizes).zip(&self.states) {
            states.push(match cur {
                Bnb8bitTensorState::Fp32 { .. } => Bnb8bitTensorState::Fp32 {
                    m: look.f32(&format!("{n}.state1"), len)?.to_vec(),
                    v: look.f32(&format!("{n}.state2"), len)?.to_vec(),
                },
                Bnb8bitTensorState::Blockwise { absmax1, .. } => Bnb8bitTensorState::Blockwise {
                    state1: look.u8(&format!("{n}.state1"), len)?.to_vec(),
                    state2: look.u8(&format!("{n}.state2"), len)?.to_vec(),
                    absmax1: look.f32(&format!("{n}.absmax1"), absmax1.len())?.to_vec(),
                    absmax2: look.f32(&format!("{n}.absmax2"), absmax1.len())?.to_vec(),
                },
            });
        }
        self.step = step;
        self.states = states;
        Ok(())
    }
}
