//! Deterministic random numbers: SplitMix64 streams and a counter-based
//! hash for dropout masks, so a run is reproducible from the context seed
//! without storing masks.

/// SplitMix64 (Steele, Lea, Flood 2014): a fast 64-bit generator with a
/// 64-bit state; good enough for initialization and sampling.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in [0, 1) with 24 random bits (exact in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// Standard normal (Box–Muller, computed in f64).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// The SplitMix64 output function: a bijective 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stream seed derived from a base seed and a label (e.g. an adapter's
/// name), so independent objects draw independent numbers.
pub fn derive_seed(seed: u64, label: &str) -> u64 {
    let mut h = mix64(seed ^ 0x6C6F_7261);
    for b in label.bytes() {
        h = mix64(h ^ b as u64);
    }
    h
}

/// Keep-decision of inverted dropout for element `index` of call `call`:
/// true with probability 1 − p. Counter-based, so forward and backward
/// regenerate the same mask.
#[inline]
pub fn dropout_keep(seed: u64, call: u64, index: u64, p: f32) -> bool {
    let h = mix64(seed ^ mix64(call.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ index));
    ((h >> 40) as f32 * (1.0 / (1u64 << 24) as f32)) >= p
}
