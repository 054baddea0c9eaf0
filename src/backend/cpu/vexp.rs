//! `e^x` in f32 that vectorizes: the exponentials of the attention softmax
//! and of SiLU on the CPU, where glibc's scalar `expf` was about 7% of a
//! training step of the default model (one call per element, no SIMD).
//!
//! Cody–Waite range reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2` (`ln 2` in
//! two parts, the first with 16 significant bits so `n·ln2_hi` is exact),
//! Cephes' degree-6 polynomial for `e^r`, and the scale `2^n` applied as
//! two halves so that subnormal results round once. Error below 1 ulp:
//! 0.987 ulp at most over every f32 in [−105, 89.5] against f64's `exp`
//! (glibc's `expf` is within 0.5; PyTorch's vectorized CPU `exp`, Sleef's
//! `expf_u10`, within 1). `exp(−∞) = 0`, `exp(+∞) = +∞`, NaN stays NaN;
//! below −104 the result is 0, above 89 it is +∞ (the f32 limits are
//! −103.97 and 88.72).
//!
//! Plain IEEE multiplies, adds and divides, no fused multiply-add: the
//! same bits from the SSE2 form and the AVX2 form (chosen at run time) and
//! on any other architecture, so a training run does not depend on the
//! machine's instruction set.

/// `e^x` (module doc: < 1 ulp).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO; LN2_HI (0x3f317200) has 16 significant bits,
    // so n·LN2_HI is exact for |n| ≤ 150.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2²³: adding it rounds to an integer (nearest even), held in the
    // low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // NaN passes both comparisons (clamp keeps it).
    let x = x.clamp(-104.0, 89.0);
    let nr = x * LOG2E + ROUND;
    let n = nr - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001e-1, which is 0.5 in f32
    let e = (p * (r * r) + r) + 1.0;
    // n ∈ [−150, 128] from the low bits of nr; 2^n as 2^n1·2^n2, both
    // normal, so e·2^n1 is exact and the last product rounds once.
    let ni = nr.to_bits() as i32 - 0x4b40_0000;
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    (e * s1) * s2
}

/// `tanh x` in f32 that vectorizes (Gemma's GELU gate and soft caps; glibc's
/// scalar `tanhf` is a call per element). `|x| < 0.55`: `x + x³·P(x²)`,
/// `P` a degree-4 least-squares fit of `(tanh x − x)/x³`; above:
/// `1 − 2/(e^{2|x|} + 1)` with [`exp`], the sign restored; `|x| ≥ 9.1`
/// is ±1 (as in f32). Error ≤ 2 ulp over every f32 (the test below
/// sweeps them); PyTorch's Sleef `tanhf_u10` is within 1. NaN stays NaN.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let u = x * x;
    let mut p = -6.297_997_7e-3f32;
    p = p * u + 2.108_372_9e-2;
    p = p * u - 5.385_376_1e-2;
    p = p * u + 1.333_258e-1;
    p = p * u - 3.333_331_6e-1;
    // copysign keeps tanh(−0) = −0; the clamp passes NaN on (min would not).
    let small = (x + (x * u) * p).copysign(x);
    let e = exp(2.0 * if a > 9.1 { 9.1 } else { a });
    let big = (1.0 - 2.0 / (e + 1.0)).copysign(x);
    if a < 0.55 {
        small
    } else {
        big
    }
}

/// Whether the AVX2 forms run (x86-64 with AVX2; detected once by std).
#[inline]
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `pub fn $name` running `$body` (an `#[inline(always)]` function
/// of the same arguments) compiled for AVX2 where the CPU has it, else as
/// built. The same arithmetic either way (module doc).
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? = $body:ident) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn wide($($a: $t),*) $(-> $r)? {
                    $body($($a),*)
                }
                if $crate::backend::cpu::vexp::avx2() {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe { wide($($a),*) };
                }
            }
            $body($($a),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[inline(always)]
fn exp_sub_sum_body(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for (v, a) in c.iter_mut().zip(acc.iter_mut()) {
            *v = exp(*v - shift);
            *a += *v;
        }
    }
    for (v, a) in chunks.into_remainder().iter_mut().zip(acc.iter_mut()) {
        *v = exp(*v - shift);
        *a += *v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

simd_dispatch! {
    /// `x[i] = e^(x[i] − shift)` in place; returns `Σ x[i]` summed in
    /// eight lanes (element `i` into lane `i mod 8`, in order), the lanes
    /// then added pairwise: the same sum on every machine.
    pub fn exp_sub_sum(x: &mut [f32], shift: f32) -> f32 = exp_sub_sum_body
}

#[inline(always)]
fn exp_sub_body(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
}

simd_dispatch! {
    /// `x[i] = e^(x[i] − shift)` in place.
    pub fn exp_sub(x: &mut [f32], shift: f32) = exp_sub_body
}

#[cfg(test)]
mod tests {
    use super::*;

    /// |got − want| in ulps of `want` rounded to f32 (subnormal ulp below
    /// the normal range).
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if !w.is_finite() || w == 0.0 && got == 0.0 {
            return if got == w { 0.0 } else { f64::INFINITY };
        }
        let ulp = if w.abs() < f32::MIN_POSITIVE { f32::from_bits(1) as f64 } else { (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64 };
        (got as f64 - want).abs() / ulp
    }

    /// The largest error (ulps, at x) over every `step`-th f32 of
    /// [−105, 89.5] (bit patterns 0..0x42b30000 and their negatives up to
    /// 0xc2d20000).
    fn worst_over(step: usize) -> (f64, f32) {
        let mut worst = (0f64, 0f32);
        for bits in (0u32..0x42b3_0000).step_by(step).chain((0x8000_0000u32..0xc2d2_0000).step_by(step)) {
            let x = f32::from_bits(bits);
            let u = ulps(exp(x), (x as f64).exp());
            if u > worst.0 {
                worst = (u, x);
            }
        }
        worst
    }

    /// Every f32 of [−105, 89.5], ~2·10⁹ values (about 1.5 minutes in
    /// release): `cargo test --release --lib vexp -- --ignored --nocapture`
    /// (0.987 ulp at most, at x = 59.28).
    #[test]
    #[ignore]
    fn within_one_ulp_everywhere() {
        let worst = worst_over(1);
        eprintln!("exp: worst {} ulp at {:e}", worst.0, worst.1);
        assert!(worst.0 < 1.0, "exp({:e}) is {} ulp off", worst.1, worst.0);
    }

    #[test]
    fn within_one_ulp_on_a_sweep_and_exact_at_the_edges() {
        // Every 97th f32 (the ignored test above takes them all).
        let worst = worst_over(97);
        assert!(worst.0 < 1.0, "exp({:e}) is {} ulp off", worst.1, worst.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(88.7).is_finite());
        assert!(exp(f32::NAN).is_nan());
        // The smallest subnormal, and a value rounding to it.
        assert_eq!(exp(-103.28), f32::from_bits(1));
        assert!(exp(-100.0) > 0.0 && exp(-100.0) < f32::MIN_POSITIVE);
    }

    /// tanh: every f32 of [−10, 10] (bit patterns up to 0x41200000 and
    /// their negatives) with `step` 1; the fast test takes every 31st.
    fn tanh_worst(step: usize) -> (f64, f32) {
        let mut worst = (0f64, 0f32);
        for bits in (0u32..0x4120_0000).step_by(step).chain((0x8000_0000u32..0xc120_0000).step_by(step)) {
            let x = f32::from_bits(bits);
            let u = ulps(tanh(x), (x as f64).tanh());
            if u > worst.0 {
                worst = (u, x);
            }
        }
        worst
    }

    #[test]
    fn tanh_within_two_ulp_and_saturates() {
        let worst = tanh_worst(31);
        assert!(worst.0 <= 2.0, "tanh({:e}) is {} ulp off", worst.1, worst.0);
        for (x, want) in [(0.0f32, 0.0f32), (-0.0, -0.0), (30.0, 1.0), (-30.0, -1.0), (f32::INFINITY, 1.0), (f32::NEG_INFINITY, -1.0)] {
            assert_eq!(tanh(x).to_bits(), want.to_bits(), "tanh({x})");
        }
        assert!(tanh(f32::NAN).is_nan());
        assert_eq!(tanh(1e-30), 1e-30);
    }

    /// `cargo test --release --lib vexp -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn tanh_within_two_ulp_everywhere() {
        let worst = tanh_worst(1);
        eprintln!("tanh: worst {} ulp at {:e}", worst.0, worst.1);
        assert!(worst.0 <= 2.0, "tanh({:e}) is {} ulp off", worst.1, worst.0);
    }

    #[test]
    fn slice_forms_match_the_scalar_and_sum_in_lanes() {
        for n in [0usize, 1, 7, 8, 9, 31, 100] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7).collect();
            let want: Vec<f32> = x.iter().map(|&v| exp(v - 1.5)).collect();
            let mut a = x.clone();
            let s = exp_sub_sum(&mut a, 1.5);
            assert_eq!(a, want, "n {n}");
            let mut lanes = [0f32; 8];
            want.iter().enumerate().for_each(|(i, v)| lanes[i % 8] += v);
            let ws = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            assert_eq!(s.to_bits(), ws.to_bits(), "n {n}");
            let mut b = x.clone();
            exp_sub(&mut b, 1.5);
            assert_eq!(b, want, "n {n}");
        }
    }
}
