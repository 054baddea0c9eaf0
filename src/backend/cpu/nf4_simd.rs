//! x86_64 SIMD kernels for NF4 (AVX-512 and AVX2), chosen at run time.
//! They compute exactly the functions of the scalar reference in `nf4.rs`,
//! to the bit, on full blocks (the tensor's partial last block always goes
//! through the reference code); the unit tests there compare them on every
//! dtype, blocksize and corner case.
//!
//! Quantize, per block of `bs` (a multiple of 32) elements:
//! - absmax: lane-wise `max(|x|, acc)` over the block, then a horizontal
//!   max. `maxps(a, acc)` returns `acc` when `a` is NaN, which is the
//!   reference's `if a > amax { a } else { amax }`, and max is
//!   order-independent otherwise, so the result is the reference's.
//! - codes: `v = x · fp32(1 / max(absmax, 1e-38))` (same product as the
//!   reference), then `code = #{t : v > t}` over the 15 midpoints.
//!   AVX-512 looks the value's cell up in a 32-cell grid over [-1, 1]
//!   holding at most one threshold per cell (two `vpermi2` table lookups,
//!   one compare, one masked add; see `GRID_THRESHOLD`); AVX2 counts the 15
//!   compares. Both give 0 for NaN, like the reference.
//! - packing: the even element's code in the high nibble.
//!
//! Dequantize, per block: the 16 outputs `narrow(NF4_CODE[c] · absmax)` are
//! computed in a vector (fp32 product, then the same round-to-nearest-even
//! as `half`'s `bf16::from_f32` / the F16C `f16` conversion half uses), and
//! the codes index that table: AVX-512 `vpermw` (16-bit outputs) or
//! `vpermps` (f32), AVX2 two `vpshufb` on the tables' low and high bytes,
//! or two `vpermps` and a blend. Memory traffic is the reference's, except
//! that large outputs go out through non-temporal stores on AVX-512 (see
//! `Sink` and `STREAM_MIN_BYTES`), which saves the read of each output
//! line before it is written.

// Off x86_64 only `Isa` (always Portable) and the tables, which the tests
// check everywhere, remain.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]

use super::{Narrow, Widen, ABSMAX_FLOOR, NF4_CODE, NF4_THRESHOLDS};

/// The instruction sets the fast paths can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (auto-vectorized where the compiler manages); every
    /// target, and blocksizes that are not a multiple of 32.
    Portable,
    /// AVX2 + F16C (x86_64).
    Avx2,
    /// AVX-512 F + BW + VL, plus AVX2, F16C and FMA (x86_64).
    Avx512,
}

impl Isa {
    /// The best set this CPU supports (std caches the CPUID probe).
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every set this CPU can run, best last (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        match Isa::detect() {
            Isa::Avx512 => v.extend([Isa::Avx2, Isa::Avx512]),
            Isa::Avx2 => v.push(Isa::Avx2),
            Isa::Portable => {}
        }
        v
    }

    /// `self` if this CPU supports it, else the best it does (so a caller
    /// can never run an instruction the CPU lacks).
    pub fn or_supported(self) -> Isa {
        if Isa::available().contains(&self) {
            self
        } else {
            Isa::detect()
        }
    }
}

/// Element kinds, as the `DT` constant of [`Widen`] / [`Narrow`].
pub(crate) const DT_F32: u8 = 0;
pub(crate) const DT_F16: u8 = 1;
pub(crate) const DT_BF16: u8 = 2;

/// Cells of the AVX-512 code search: cell `k = trunc(16·v + 15.5)` cuts
/// [-1, 1] into 32 cells of width 1/16 (cell 0 also takes everything
/// that truncates towards it from below). Each cell holds at most one
/// threshold (the closest two are 0.080 apart), so
/// `code = GRID_BASE[k] + (v > GRID_THRESHOLD[k])`, where `GRID_BASE[k]`
/// counts the thresholds in lower cells and `GRID_THRESHOLD[k]` is the
/// cell's own threshold (+∞ if none). The comparison is the exact one on
/// `v`; the cell only has to be right up to rounding, and every threshold
/// lies more than 0.065 index units (0.004 in `v`; the closest is
/// −0.3397, at 10.065) from a cell edge (unit-tested), far beyond the
/// error of one fused multiply-add.
/// Normalized values satisfy |v| ≤ 1 + 2⁻²² (|x| ≤ absmax, one rounding of
/// `x · (1/absmax)`), so `k` lies in 0..=31 with no clamping; NaN
/// (from ±Inf inputs) converts to `i32::MIN`, whose low 5 bits — all that
/// `vpermi2ps` reads — select cell 0: code 0, as in the reference.
pub(crate) const GRID_CELLS: usize = 32;
pub(crate) const GRID_OFFSET: f32 = 15.5;
pub(crate) static GRID_THRESHOLD: [f32; GRID_CELLS] = {
    let mut t = [f32::INFINITY; GRID_CELLS];
    let mut i = 0;
    while i < 15 {
        let k = (NF4_THRESHOLDS[i] * 16.0 + GRID_OFFSET) as usize;
        t[k] = NF4_THRESHOLDS[i];
        i += 1;
    }
    t
};
pub(crate) static GRID_BASE: [i32; GRID_CELLS] = {
    let mut b = [0i32; GRID_CELLS];
    let mut k = 1;
    while k < GRID_CELLS {
        let lo = (k as f32 - GRID_OFFSET) / 16.0;
        let mut i = 0;
        while i < 15 {
            if NF4_THRESHOLDS[i] < lo {
                b[k] += 1;
            }
            i += 1;
        }
        k += 1;
    }
    b
};

/// Word order fix-up of the AVX-512 64-code pack (`pack64`). After the
/// per-128-bit-lane packs, `vpmaddubsw` and `vpmovwb`, byte `8L + m`
/// (lane L = 0..4, m = 0..8) holds the packed pair `8·(m/2) + 2L + m%2`;
/// so output word M (pairs 2M, 2M+1) is word `4·(M % 4) + M / 4` of that.
static PACK64_ORDER: [u16; 16] = {
    let mut o = [0u16; 16];
    let mut m = 0;
    while m < 16 {
        o[m] = (4 * (m % 4) + m / 4) as u16;
        m += 1;
    }
    o
};

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// The reference's full-block normalizer: the fp32 reciprocal of
    /// `max(absmax, 1e-38)`.
    #[inline(always)]
    fn full_block_scale(amax: f32) -> f32 {
        let clamped = if amax > ABSMAX_FLOOR { amax } else { ABSMAX_FLOOR };
        1.0 / clamped
    }

    // ------------------------------------------------------------------
    // AVX-512
    // ------------------------------------------------------------------

    /// 16 elements at `p`, widened exactly to f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn load16<T: Widen>(p: *const T) -> __m512 {
        // SAFETY: the caller guarantees 16 readable elements at `p`.
        match T::DT {
            DT_F32 => _mm512_loadu_ps(p as *const f32),
            DT_F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            // bf16 is the top half of an f32: widen by a 16-bit shift.
            _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)))),
        }
    }

    /// `|v|` by clearing the sign bits (`abs_mask` = 0x7FFF_FFFF; integer
    /// AND, as `vandps` on zmm needs AVX-512 DQ).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn abs16(v: __m512, abs_mask: __m512i) -> __m512 {
        _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask))
    }

    /// The grid tables of [`GRID_THRESHOLD`] / [`GRID_BASE`], each in two
    /// registers for `vpermi2ps` / `vpermi2d`.
    #[derive(Clone, Copy)]
    struct Grid {
        t_lo: __m512,
        t_hi: __m512,
        b_lo: __m512i,
        b_hi: __m512i,
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn grid() -> Grid {
        Grid {
            t_lo: _mm512_loadu_ps(GRID_THRESHOLD.as_ptr()),
            t_hi: _mm512_loadu_ps(GRID_THRESHOLD.as_ptr().add(16)),
            b_lo: _mm512_loadu_si512(GRID_BASE.as_ptr() as *const _),
            b_hi: _mm512_loadu_si512(GRID_BASE.as_ptr().add(16) as *const _),
        }
    }

    /// NF4 codes (as 32-bit lanes) of 16 normalized values: the number of
    /// thresholds strictly below each, by the grid of [`GRID_THRESHOLD`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn code16(v: __m512, g: Grid) -> __m512i {
        let k = _mm512_cvttps_epi32(_mm512_fmadd_ps(v, _mm512_set1_ps(16.0), _mm512_set1_ps(GRID_OFFSET)));
        let t = _mm512_permutex2var_ps(g.t_lo, k, g.t_hi);
        let base = _mm512_permutex2var_epi32(g.b_lo, k, g.b_hi);
        let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, t);
        _mm512_mask_add_epi32(base, above, base, _mm512_set1_epi32(1))
    }

    /// 16 codes (32-bit lanes, element order) packed to 8 bytes, the even
    /// element in the high nibble, in the low half of the result.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn pack16(c: __m512i) -> __m128i {
        // Each 64-bit lane holds (even, odd); its low byte becomes
        // even << 4 | odd, and vpmovqb keeps that byte.
        _mm512_cvtepi64_epi8(_mm512_or_si512(_mm512_slli_epi64::<4>(c), _mm512_srli_epi64::<32>(c)))
    }

    /// 64 codes (four vectors of 32-bit lanes, element order) packed to 32
    /// bytes, the even element in the high nibble.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn pack64(c0: __m512i, c1: __m512i, c2: __m512i, c3: __m512i) -> __m256i {
        // The packs work per 128-bit lane L: byte 4q + j of lane L is
        // element 16q + 4L + j (codes fit a byte, so saturation never acts).
        let b = _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
        // Adjacent bytes (even, odd) → even·16 + odd, one word per pair;
        // then one byte per pair, in the order PACK64_ORDER undoes.
        let w = _mm512_maddubs_epi16(b, _mm512_set1_epi16(0x0110));
        let p = _mm512_cvtepi16_epi8(w);
        _mm256_permutexvar_epi16(_mm256_loadu_si256(PACK64_ORDER.as_ptr() as *const __m256i), p)
    }

    /// Quantizes `absmax.len()` full blocks of `bs` elements (a multiple of
    /// 32): `x.len() == absmax.len() · bs`, `packed.len() == x.len() / 2`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VL, AVX2, F16C and FMA.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    pub(crate) unsafe fn quantize_avx512<T: Widen>(x: &[T], bs: usize, packed: &mut [u8], absmax: &mut [f32]) {
        assert!(bs.is_multiple_of(32) && x.len() == absmax.len() * bs && packed.len() == x.len() / 2);
        let g = grid();
        let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
        // Groups of 16 blocks: all maxima first, then their 16 reciprocals
        // in one vector division, then the codes. Done block by block, each
        // block's codes would wait on its own reduction and division.
        for (grp, am) in absmax.chunks_mut(16).enumerate() {
            let first = grp * 16;
            let mut maxima = [0f32; 16];
            for (j, a) in am.iter_mut().enumerate() {
                // SAFETY: block `first + j` is x[(first+j)·bs ..][..bs]
                // (lengths asserted above); each load reads 16 elements
                // inside it.
                let xb = x.as_ptr().add((first + j) * bs);
                let mut m0 = _mm512_setzero_ps();
                let mut m1 = _mm512_setzero_ps();
                let mut i = 0;
                while i < bs {
                    // max(a, acc) keeps acc when a is NaN, like the reference.
                    m0 = _mm512_max_ps(abs16(load16(xb.add(i)), abs_mask), m0);
                    m1 = _mm512_max_ps(abs16(load16(xb.add(i + 16)), abs_mask), m1);
                    i += 32;
                }
                *a = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
                maxima[j] = *a;
            }
            // The reference's full-block normalizer, 1 / max(absmax, 1e-38),
            // for the whole group (IEEE division: the same bits as scalar).
            let clamped = _mm512_max_ps(_mm512_loadu_ps(maxima.as_ptr()), _mm512_set1_ps(ABSMAX_FLOOR));
            let mut inv = [0f32; 16];
            _mm512_storeu_ps(inv.as_mut_ptr(), _mm512_div_ps(_mm512_set1_ps(1.0), clamped));
            // Codes, 64 elements (32 bytes) per step; each vector of 16 lies
            // in one block and uses that block's normalizer.
            // SAFETY: the group's blocks are x[first·bs ..][..len] and
            // packed[first·bs/2 ..][..len/2], len = am.len()·bs; every load
            // and store below stays inside them.
            let xg = x.as_ptr().add(first * bs);
            let pg = packed.as_mut_ptr().add(first * bs / 2);
            if bs == 32 {
                // Two blocks per step.
                let mut j = 0;
                while j + 2 <= am.len() {
                    let (r0, r1) = (_mm512_set1_ps(inv[j]), _mm512_set1_ps(inv[j + 1]));
                    let xj = xg.add(32 * j);
                    let c0 = code16(_mm512_mul_ps(load16(xj), r0), g);
                    let c1 = code16(_mm512_mul_ps(load16(xj.add(16)), r0), g);
                    let c2 = code16(_mm512_mul_ps(load16(xj.add(32)), r1), g);
                    let c3 = code16(_mm512_mul_ps(load16(xj.add(48)), r1), g);
                    _mm256_storeu_si256(pg.add(16 * j) as *mut __m256i, pack64(c0, c1, c2, c3));
                    j += 2;
                }
                if j < am.len() {
                    // An odd block count leaves one block of 32.
                    let r0 = _mm512_set1_ps(inv[j]);
                    let xj = xg.add(32 * j);
                    let c0 = code16(_mm512_mul_ps(load16(xj), r0), g);
                    let c1 = code16(_mm512_mul_ps(load16(xj.add(16)), r0), g);
                    _mm_storeu_si128(pg.add(16 * j) as *mut __m128i, _mm_unpacklo_epi64(pack16(c0), pack16(c1)));
                }
            } else {
                for (j, &rj) in inv.iter().take(am.len()).enumerate() {
                    let r = _mm512_set1_ps(rj);
                    let xj = xg.add(j * bs);
                    let pj = pg.add(j * bs / 2);
                    let mut i = 0;
                    while i + 64 <= bs {
                        let c0 = code16(_mm512_mul_ps(load16(xj.add(i)), r), g);
                        let c1 = code16(_mm512_mul_ps(load16(xj.add(i + 16)), r), g);
                        let c2 = code16(_mm512_mul_ps(load16(xj.add(i + 32)), r), g);
                        let c3 = code16(_mm512_mul_ps(load16(xj.add(i + 48)), r), g);
                        _mm256_storeu_si256(pj.add(i / 2) as *mut __m256i, pack64(c0, c1, c2, c3));
                        i += 64;
                    }
                    if i < bs {
                        // Blocksizes 96, 160, …: a last 32.
                        let c0 = code16(_mm512_mul_ps(load16(xj.add(i)), r), g);
                        let c1 = code16(_mm512_mul_ps(load16(xj.add(i + 16)), r), g);
                        _mm_storeu_si128(pj.add(i / 2) as *mut __m128i, _mm_unpacklo_epi64(pack16(c0), pack16(c1)));
                    }
                }
            }
        }
    }

    /// The 16 possible outputs of a block with scale `a`, as 16-bit
    /// patterns of `T` (f16 or bf16), in the low 256 bits.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn lut16_avx512<T: Narrow>(code: __m512, a: f32) -> __m512i {
        let p = _mm512_mul_ps(code, _mm512_set1_ps(a));
        let h = if T::DT == DT_F16 {
            _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(p)
        } else {
            // Round to nearest even on the bit pattern (half's f32_to_bf16):
            // add 0x7FFF plus the kept LSB, truncate. NaN: the top half with
            // the quiet bit set.
            let bits = _mm512_castps_si512(p);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(p, p);
            let r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40)));
            _mm512_cvtepi32_epi16(r)
        };
        _mm512_zextsi256_si512(h)
    }

    /// Writes a run of 64-byte vectors to consecutive memory from `dst`:
    /// with plain unaligned stores, or (`STREAM`) with non-temporal stores,
    /// which bypass the caches and skip the read-for-ownership of each line
    /// (a write of n bytes then moves n bytes, not 2n). Streaming stores
    /// need 64-byte aligned addresses, so when `dst` is not aligned each
    /// aligned line is assembled from the end of the previous vector and
    /// the start of the current one (`vpermt2w` / `vpermt2d`), and the
    /// partial first and last lines get masked ordinary stores. `WORD` is
    /// the element size (2 or 4 bytes); `dst` must be aligned to it.
    struct Sink<const STREAM: bool, const WORD: usize> {
        dst: *mut u8,
        /// `dst` mod 64, in bytes (a multiple of WORD).
        shift: usize,
        idx: __m512i,
        prev: __m512i,
        started: bool,
    }

    impl<const STREAM: bool, const WORD: usize> Sink<STREAM, WORD> {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
        unsafe fn new(dst: *mut u8) -> Self {
            let shift = dst as usize % 64;
            debug_assert!(shift.is_multiple_of(WORD));
            // Element i of an assembled line is element E - s + i of the
            // pair (previous, current), E = 64/WORD, s = shift/WORD.
            let first = (64 - shift) / WORD;
            let idx = if WORD == 2 {
                _mm512_add_epi16(
                    _mm512_set_epi16(
                        31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
                    ),
                    _mm512_set1_epi16(first as i16),
                )
            } else {
                _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(first as i32))
            };
            Sink { dst, shift, idx, prev: _mm512_setzero_si512(), started: false }
        }

        /// `prev`'s last `shift` bytes followed by `v`'s first 64 − shift.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
        unsafe fn join(&self, v: __m512i) -> __m512i {
            if WORD == 2 {
                _mm512_permutex2var_epi16(self.prev, self.idx, v)
            } else {
                _mm512_permutex2var_epi32(self.prev, self.idx, v)
            }
        }

        /// Writes the next 64 bytes.
        ///
        /// # Safety
        /// The run's memory must hold them.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
        unsafe fn put(&mut self, v: __m512i) {
            if !STREAM {
                _mm512_storeu_si512(self.dst as *mut _, v);
            } else if self.shift == 0 {
                _mm512_stream_si512(self.dst as *mut _, v);
            } else if self.started {
                // SAFETY: dst − shift is 64-byte aligned and its line lies
                // within the run (it starts after the first vector's head).
                _mm512_stream_si512(self.dst.sub(self.shift) as *mut _, self.join(v));
            } else {
                // The first, partial line: bytes [0, 64 − shift) of v.
                _mm512_mask_storeu_epi8(self.dst as *mut _, (1u64 << (64 - self.shift)) - 1, v);
                self.started = true;
            }
            self.prev = v;
            self.dst = self.dst.add(64);
        }

        /// Writes the last partial line and orders the streaming stores
        /// before whatever the thread does next (rayon's hand-back).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
        unsafe fn finish(self) {
            if STREAM {
                if self.shift != 0 && self.started {
                    let tail = self.join(_mm512_setzero_si512());
                    _mm512_mask_storeu_epi8(self.dst.sub(self.shift) as *mut _, (1u64 << self.shift) - 1, tail);
                }
                _mm_sfence();
            }
        }
    }

    /// Dequantizes `absmax.len()` full blocks of `bs` (a multiple of 32)
    /// elements into `out` (f16 or bf16; `out.len() == absmax.len() · bs`,
    /// `packed.len() == out.len() / 2`), with streaming stores if `STREAM`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VL, AVX2, F16C and FMA.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    pub(crate) unsafe fn dequantize16_avx512<T: Narrow, const STREAM: bool>(packed: &[u8], absmax: &[f32], bs: usize, out: &mut [T]) {
        assert!(T::DT != DT_F32 && std::mem::size_of::<T>() == 2);
        assert!(bs.is_multiple_of(32) && out.len() == absmax.len() * bs && packed.len() == out.len() / 2);
        let code = _mm512_loadu_ps(NF4_CODE.as_ptr());
        let low4 = _mm512_set1_epi32(15);
        // SAFETY: the sink writes out[..] in order, 32 outputs (64 bytes)
        // per put, out.len() / 32 puts in all (asserted above).
        let mut sink = Sink::<STREAM, 2>::new(out.as_mut_ptr() as *mut u8);
        for (blk, &a) in absmax.iter().enumerate() {
            let lut = lut16_avx512::<T>(code, a);
            // SAFETY: block `blk` reads packed[blk·bs/2 ..][..bs/2] (asserted
            // above), 16 bytes per step.
            let src = packed.as_ptr().add(blk * bs / 2);
            let mut j = 0;
            while j < bs / 2 {
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(src.add(j) as *const __m128i));
                // 16-bit index pairs (high nibble, low nibble) = elements
                // (2j, 2j+1) in little-endian word order.
                let idx = _mm512_or_si512(_mm512_srli_epi32::<4>(b), _mm512_slli_epi32::<16>(_mm512_and_si512(b, low4)));
                sink.put(_mm512_permutexvar_epi16(idx, lut));
                j += 16;
            }
        }
        sink.finish();
    }

    /// As [`dequantize16_avx512`] for f32 outputs.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VL, AVX2, F16C and FMA.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    pub(crate) unsafe fn dequantize32_avx512<const STREAM: bool>(packed: &[u8], absmax: &[f32], bs: usize, out: &mut [f32]) {
        assert!(bs.is_multiple_of(32) && out.len() == absmax.len() * bs && packed.len() == out.len() / 2);
        let code = _mm512_loadu_ps(NF4_CODE.as_ptr());
        let low4 = _mm_set1_epi8(15);
        // SAFETY: as in dequantize16_avx512, 16 outputs per put.
        let mut sink = Sink::<STREAM, 4>::new(out.as_mut_ptr() as *mut u8);
        for (blk, &a) in absmax.iter().enumerate() {
            let lut = _mm512_mul_ps(code, _mm512_set1_ps(a));
            // SAFETY: as in dequantize16_avx512.
            let src = packed.as_ptr().add(blk * bs / 2);
            let mut j = 0;
            while j < bs / 2 {
                let b = _mm_loadu_si128(src.add(j) as *const __m128i);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), low4);
                let lo = _mm_and_si128(b, low4);
                let i0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
                let i1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
                sink.put(_mm512_castps_si512(_mm512_permutexvar_ps(i0, lut)));
                sink.put(_mm512_castps_si512(_mm512_permutexvar_ps(i1, lut)));
                j += 16;
            }
        }
        sink.finish();
    }

    // ------------------------------------------------------------------
    // AVX2
    // ------------------------------------------------------------------

    /// 8 elements at `p`, widened exactly to f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8<T: Widen>(p: *const T) -> __m256 {
        // SAFETY: the caller guarantees 8 readable elements at `p`.
        match T::DT {
            DT_F32 => _mm256_loadu_ps(p as *const f32),
            DT_F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)))),
        }
    }

    /// NF4 codes (32-bit lanes) of 8 normalized values: minus the sum of
    /// the 15 compare masks.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn code8(v: __m256, thr: &[__m256; 15]) -> __m256i {
        let mut c = _mm256_setzero_si256();
        for t in thr {
            c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, *t)));
        }
        c
    }

    /// Horizontal max of 8 lanes holding no NaN.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn hmax8(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
        _mm_cvtss_f32(m)
    }

    /// Quantizes full blocks as [`quantize_avx512`] does.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(crate) unsafe fn quantize_avx2<T: Widen>(x: &[T], bs: usize, packed: &mut [u8], absmax: &mut [f32]) {
        assert!(bs.is_multiple_of(32) && x.len() == absmax.len() * bs && packed.len() == x.len() / 2);
        let mut thr = [_mm256_setzero_ps(); 15];
        for (t, &v) in thr.iter_mut().zip(NF4_THRESHOLDS.iter()) {
            *t = _mm256_set1_ps(v);
        }
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let nibble_weights = _mm256_set1_epi16(0x0110);
        for (blk, a) in absmax.iter_mut().enumerate() {
            // SAFETY: as in quantize_avx512, 8 elements per load.
            let xb = x.as_ptr().add(blk * bs);
            let mut m = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < bs {
                for (k, mk) in m.iter_mut().enumerate() {
                    *mk = _mm256_max_ps(_mm256_and_ps(load8(xb.add(i + 8 * k)), abs_mask), *mk);
                }
                i += 32;
            }
            let amax = hmax8(_mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
            *a = amax;
            let inv = _mm256_set1_ps(full_block_scale(amax));
            let pb = packed.as_mut_ptr().add(blk * bs / 2);
            let mut i = 0;
            while i < bs {
                let mut c = [_mm256_setzero_si256(); 4];
                for (k, ck) in c.iter_mut().enumerate() {
                    *ck = code8(_mm256_mul_ps(load8(xb.add(i + 8 * k)), inv), &thr);
                }
                // 32 codes to 32 bytes in element order: the packs work
                // per 128-bit lane, the permute undoes the lane interleave.
                let bytes = _mm256_packus_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
                let bytes = _mm256_permutevar8x32_epi32(bytes, order);
                // Pairs to one byte: even · 16 + odd.
                let pairs = _mm256_maddubs_epi16(bytes, nibble_weights);
                let packed16 = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi16(pairs, pairs));
                // SAFETY: 16 bytes inside this block's packed range.
                _mm_storeu_si128(pb.add(i / 2) as *mut __m128i, _mm256_castsi256_si128(packed16));
                i += 32;
            }
        }
    }

    /// bf16 patterns (in 32-bit lanes) of 8 floats, rounded to nearest
    /// even as half's `f32_to_bf16`: add 0x7FFF plus the kept LSB, truncate;
    /// NaN keeps its top half with the quiet bit set.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn bf16_bits8(p: __m256) -> __m256i {
        let bits = _mm256_castps_si256(p);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(p, p));
        let q = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
        _mm256_blendv_epi8(r, q, nan)
    }

    /// The 16 outputs of a block (f16 or bf16 patterns) split into a table
    /// of low bytes and one of high bytes, each repeated in both lanes for
    /// `vpshufb`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn lut16_avx2<T: Narrow>(a: f32) -> (__m256i, __m256i) {
        let av = _mm256_set1_ps(a);
        let p0 = _mm256_mul_ps(_mm256_loadu_ps(NF4_CODE.as_ptr()), av);
        let p1 = _mm256_mul_ps(_mm256_loadu_ps(NF4_CODE.as_ptr().add(8)), av);
        let words = if T::DT == DT_F16 {
            let h0 = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(p0);
            let h1 = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(p1);
            _mm256_set_m128i(h1, h0)
        } else {
            // Values fit 16 bits, so the unsigned pack is exact; it
            // interleaves lanes, the permute restores element order.
            _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(bf16_bits8(p0), bf16_bits8(p1)))
        };
        let lo = _mm256_and_si256(words, _mm256_set1_epi16(0xFF));
        let hi = _mm256_srli_epi16::<8>(words);
        // [lo 0..8, hi 0..8 | lo 8..16, hi 8..16] → [lo 0..16 | hi 0..16]
        let t = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(lo, hi));
        (_mm256_permute2x128_si256::<0x00>(t, t), _mm256_permute2x128_si256::<0x11>(t, t))
    }

    /// 32 code indices (one per byte, element order: the low 128 bits hold
    /// elements 0..16) from 16 packed bytes at `p`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn unpack32(p: *const u8) -> (__m128i, __m128i) {
        // SAFETY: the caller guarantees 16 readable bytes at `p`.
        let b = _mm_loadu_si128(p as *const __m128i);
        let low4 = _mm_set1_epi8(15);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), low4);
        let lo = _mm_and_si128(b, low4);
        (_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo))
    }

    /// Dequantizes full blocks to f16 / bf16 as [`dequantize16_avx512`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(crate) unsafe fn dequantize16_avx2<T: Narrow>(packed: &[u8], absmax: &[f32], bs: usize, out: &mut [T]) {
        assert!(T::DT != DT_F32 && std::mem::size_of::<T>() == 2);
        assert!(bs.is_multiple_of(32) && out.len() == absmax.len() * bs && packed.len() == out.len() / 2);
        for (blk, &a) in absmax.iter().enumerate() {
            let (lut_lo, lut_hi) = lut16_avx2::<T>(a);
            // SAFETY: as in dequantize16_avx512.
            let src = packed.as_ptr().add(blk * bs / 2);
            let dst = out.as_mut_ptr().add(blk * bs) as *mut u16;
            let mut j = 0;
            while j < bs / 2 {
                let (i0, i1) = unpack32(src.add(j));
                let idx = _mm256_set_m128i(i1, i0);
                let l = _mm256_shuffle_epi8(lut_lo, idx);
                let h = _mm256_shuffle_epi8(lut_hi, idx);
                // Per lane: unpacklo gives elements 0..8 (lane 0) and
                // 16..24 (lane 1), unpackhi 8..16 and 24..32.
                let o0 = _mm256_unpacklo_epi8(l, h);
                let o1 = _mm256_unpackhi_epi8(l, h);
                _mm256_storeu_si256(dst.add(2 * j) as *mut __m256i, _mm256_permute2x128_si256::<0x20>(o0, o1));
                _mm256_storeu_si256(dst.add(2 * j + 16) as *mut __m256i, _mm256_permute2x128_si256::<0x31>(o0, o1));
                j += 16;
            }
        }
    }

    /// Dequantizes full blocks to f32 as [`dequantize32_avx512`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(crate) unsafe fn dequantize32_avx2(packed: &[u8], absmax: &[f32], bs: usize, out: &mut [f32]) {
        assert!(bs.is_multiple_of(32) && out.len() == absmax.len() * bs && packed.len() == out.len() / 2);
        let c0 = _mm256_loadu_ps(NF4_CODE.as_ptr());
        let c1 = _mm256_loadu_ps(NF4_CODE.as_ptr().add(8));
        for (blk, &a) in absmax.iter().enumerate() {
            let av = _mm256_set1_ps(a);
            let (lut0, lut1) = (_mm256_mul_ps(c0, av), _mm256_mul_ps(c1, av));
            // SAFETY: as in dequantize16_avx512.
            let src = packed.as_ptr().add(blk * bs / 2);
            let dst = out.as_mut_ptr().add(blk * bs);
            let mut j = 0;
            while j < bs / 2 {
                let (i0, i1) = unpack32(src.add(j));
                for (k, ik) in [i0, _mm_srli_si128::<8>(i0), i1, _mm_srli_si128::<8>(i1)].into_iter().enumerate() {
                    let id = _mm256_cvtepu8_epi32(ik);
                    // Bit 3 of the code picks the table half (blendv reads
                    // the sign bit).
                    let v = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(lut0, id),
                        _mm256_permutevar8x32_ps(lut1, id),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<28>(id)),
                    );
                    _mm256_storeu_ps(dst.add(2 * j + 8 * k), v);
                }
                j += 16;
            }
        }
    }
}
