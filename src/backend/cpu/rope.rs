//! Rotary position embeddings (RoPE), the Hugging Face "rotate_half"
//! convention, forward and backward, fp32.
//!
//! A head vector `x ∈ ℝᴰ` (D even, `H = D/2`) at position `p` is split into
//! halves `x₁ = x[..H]`, `x₂ = x[H..]` (NOT interleaved pairs), and each pair
//! `(x₁[i], x₂[i])` is rotated by the angle `θ_i = p · inv_freq[i]`:
//!
//! ```text
//!   inv_freq[i] = 1 / theta^(2i/D)                     (rope_theta = theta)
//!   y₁[i] = x₁[i]·cos θ_i − x₂[i]·sin θ_i
//!   y₂[i] = x₂[i]·cos θ_i + x₁[i]·sin θ_i
//! ```
//!
//! which is transformers' `q·cos + rotate_half(q)·sin` with
//! `rotate_half(x) = cat(−x₂, x₁)` and `cos = cat(cos θ, cos θ)`. The backward
//! is the inverse rotation (by −θ), since the map is orthogonal:
//!
//! ```text
//!   dx₁[i] =  dy₁[i]·cos θ_i + dy₂[i]·sin θ_i
//!   dx₂[i] = −dy₁[i]·sin θ_i + dy₂[i]·cos θ_i
//! ```
//!
//! Rounding matches transformers' `LlamaRotaryEmbedding` in fp32: `inv_freq`
//! is an f32 vector, the angle is the f32 product `(p as f32) · inv_freq[i]`
//! (so at large positions the angle carries the same rounding error as in
//! HF, up to `p·inv_freq·2⁻²⁴` rad), and cos/sin of that f32 angle are
//! rounded to f32.
//!
//! Layout: `x` is `[B, T, H, D]` row-major (token-major, as the q/k/v
//! projections produce it and as HF's attention output is laid out); the
//! table has one row per sequence position `t`, shared by all batch rows and
//! heads. Tables start at any `pos0`, so a KV cache can continue a sequence.
//! Memory traffic: one read and one write of `x`, in place, plus the table
//! row (`D` floats) per token; split over tokens on the rayon pool.

use rayon::prelude::*;

/// `inv_freq[i] = 1 / theta^(2i/D)`, `i < D/2`, as transformers'
/// `compute_default_rope_parameters` computes it in fp32: the exponent
/// `(2i as f32) / (D as f32)` in f32, the power rounded to f32 (computed
/// in f64 here: PyTorch's fp32 `pow` is within 1 ulp of that), then
/// `1.0 / power` in f32.
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    assert!(head_dim > 0 && head_dim.is_multiple_of(2), "rope: head_dim must be even and positive");
    (0..head_dim / 2).map(|i| 1.0 / rope_power(head_dim, theta, i)).collect()
}

/// `theta^(2i/D)` as transformers' fp32 `base ** (arange(0, D, 2) / D)`:
/// the exponent in f32, the power rounded to f32.
fn rope_power(head_dim: usize, theta: f32, i: usize) -> f32 {
    let e = (2 * i) as f32 / head_dim as f32;
    (theta as f64).powf(e as f64) as f32
}

/// Linear scaling ("linear" rope_type): `inv_freq / factor`.
pub fn rope_inv_freq_linear(head_dim: usize, theta: f32, factor: f32) -> Vec<f32> {
    rope_inv_freq(head_dim, theta).into_iter().map(|f| f / factor).collect()
}

/// Llama 3.1 frequency scaling ("llama3" rope_type), transformers
/// `_compute_llama3_parameters`, fp32 arithmetic in the same order:
///
/// ```text
///   wavelen = 2π / f
///   f' = f / factor                              if wavelen > orig / low_freq_factor
///      = f                                       if wavelen < orig / high_freq_factor
///      = (1 − s)·f/factor + s·f,  s = (orig/wavelen − low) / (high − low)   otherwise
/// ```
pub fn rope_inv_freq_llama3(head_dim: usize, theta: f32, factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize) -> Vec<f32> {
    let orig = original_max_position_embeddings as f64;
    // HF computes these scalars as Python floats (f64); an op between an f32
    // tensor and a Python scalar runs in f32 with the scalar rounded to f32.
    let low_wavelen = (orig / low_freq_factor as f64) as f32;
    let high_wavelen = (orig / high_freq_factor as f64) as f32;
    let band = (high_freq_factor as f64 - low_freq_factor as f64) as f32;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    rope_inv_freq(head_dim, theta)
        .into_iter()
        .map(|f| {
            let wavelen = two_pi / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            let s = (orig as f32 / wavelen - low_freq_factor) / band;
            let smoothed = (1.0 - s) * scaled / factor + s * scaled;
            // HF: `~(wavelen < high) * ~(wavelen > low)` (same for finite values).
            let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
            if medium { smoothed } else { scaled }
        })
        .collect()
}

/// YaRN frequency scaling ("yarn" rope_type), transformers
/// `_compute_yarn_parameters` with f32 tensors where it has them:
///
/// ```text
///   p_i  = theta^(2i/D)                 (as rope_inv_freq)
///   extrapolation_i = 1 / p_i,  interpolation_i = 1 / (factor·p_i)
///   c(r) = D·ln(orig / (2π·r)) / (2·ln theta)           (f64)
///   lo, hi = c(beta_fast), c(beta_slow)  (floor / ceil with truncate),
///            clamped to [0, D−1]; hi += 0.001 when equal
///   ramp_i = clamp((i − lo) / (hi − lo), 0, 1),  e_i = 1 − ramp_i
///   inv_freq_i = interpolation_i·(1 − e_i) + extrapolation_i·e_i
/// ```
///
/// (`theta` in f64 as config.json states it: the correction range takes
/// its logarithm in Python floats; the powers use its f32 rounding, as
/// transformers' f32 tensors do.) The attention factor multiplies cos and
/// sin ([`RopeTable::scaled`]).
pub fn rope_inv_freq_yarn(head_dim: usize, theta: f64, factor: f64, beta_fast: f64, beta_slow: f64, original_max_position_embeddings: usize, truncate: bool) -> Vec<f32> {
    let d = head_dim as f64;
    let orig = original_max_position_embeddings as f64;
    let corr = |rot: f64| d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
    let (mut lo, mut hi) = (corr(beta_fast), corr(beta_slow));
    if truncate {
        lo = lo.floor();
        hi = hi.ceil();
    }
    let (lo, mut hi) = (lo.max(0.0), hi.min(d - 1.0));
    if lo == hi {
        hi += 0.001;
    }
    // Python scalars meet f32 tensors: each rounded to f32 for the op.
    let (lo32, span32, f32f) = (lo as f32, (hi - lo) as f32, factor as f32);
    (0..head_dim / 2)
        .map(|i| {
            let pw = rope_power(head_dim, theta as f32, i);
            let extrap = 1.0 / pw;
            let interp = 1.0 / (f32f * pw);
            let ramp = ((i as f32 - lo32) / span32).clamp(0.0, 1.0);
            let ext = 1.0 - ramp;
            interp * (1.0 - ext) + extrap * ext
        })
        .collect()
}

/// LongRoPE ("longrope", Phi-3's "su"; transformers
/// `_compute_longrope_parameters`): `inv_freq[i] = 1 / (ext[i]·theta^(2i/D))`
/// in f32, `ext` the short or the long factors (f32 as PyTorch holds the
/// list), the power as [`rope_inv_freq`]'s.
pub fn rope_inv_freq_longrope(head_dim: usize, theta: f32, ext: &[f32]) -> Vec<f32> {
    assert_eq!(ext.len(), head_dim / 2, "rope: longrope factors must number head_dim / 2");
    (0..head_dim / 2).map(|i| 1.0 / (ext[i] * rope_power(head_dim, theta, i))).collect()
}

/// A model's rotary frequencies and the factor on cos and sin (1 but for
/// YaRN and LongRoPE): what every table of its forwards is made from.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeFreqs {
    pub inv_freq: Vec<f32>,
    pub scale: f32,
    /// LongRoPE's long frequencies and the length above which a forward
    /// takes them (`original_max_position_embeddings`): transformers picks
    /// them for the whole call when its largest position + 1 exceeds that
    /// length (`longrope_frequency_update`), the short ones (`inv_freq`)
    /// otherwise.
    pub long: Option<(Vec<f32>, usize)>,
}

impl RopeFreqs {
    /// The frequencies of a call whose largest position is `last`.
    fn inv_freq_upto(&self, last: usize) -> &[f32] {
        match &self.long {
            Some((f, _)) if self.long_at(last + 1) => f,
            _ => &self.inv_freq,
        }
    }

    /// Whether a call over positions below `len` takes LongRoPE's long
    /// frequencies (never without LongRoPE).
    pub fn long_at(&self, len: usize) -> bool {
        self.long.as_ref().is_some_and(|(_, orig)| len > *orig)
    }

    /// The table of positions `pos0..pos0 + len` ([`RopeTable::new`], scaled).
    pub fn table(&self, pos0: usize, len: usize) -> RopeTable {
        self.table_upto(pos0, len, (pos0 + len).saturating_sub(1))
    }

    /// [`table`](Self::table) with LongRoPE's factors chosen by `last`, the
    /// largest position of the whole call (a batch's longest sequence).
    pub fn table_upto(&self, pos0: usize, len: usize, last: usize) -> RopeTable {
        RopeTable::new(self.inv_freq_upto(last), pos0, len).scaled(self.scale)
    }

    /// The table of arbitrary positions ([`RopeTable::with_positions`],
    /// scaled; LongRoPE's factors chosen by the largest).
    pub fn table_at(&self, positions: &[usize]) -> RopeTable {
        RopeTable::with_positions(self.inv_freq_upto(positions.iter().max().copied().unwrap_or(0)), positions).scaled(self.scale)
    }
}

/// cos/sin of `θ[t, i] = positions[t] · inv_freq[i]` for a list of positions;
/// `cos`, `sin` are `[len, D/2]` row-major (the second half of HF's
/// `cat(freqs, freqs)` table is the same numbers, so only one half is kept).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    /// `D/2`.
    pub half: usize,
    /// Number of positions (rows).
    pub len: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Rows for positions `pos0, pos0+1, …, pos0+len−1`.
    pub fn new(inv_freq: &[f32], pos0: usize, len: usize) -> Self {
        let pos: Vec<usize> = (pos0..pos0 + len).collect();
        Self::with_positions(inv_freq, &pos)
    }

    /// Rows for arbitrary positions (e.g. one per sequence while decoding).
    /// `θ = (p as f32) · inv_freq[i]` rounded to f32 (HF's fp32 product),
    /// `cos θ`, `sin θ` computed in f64 from that f32 angle and rounded.
    pub fn with_positions(inv_freq: &[f32], positions: &[usize]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                let a = (p as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable { half, len: positions.len(), cos, sin }
    }

    /// cos and sin each multiplied by `s` in f32 (transformers'
    /// `attention_scaling`, YaRN's attention factor; 1 changes nothing).
    pub fn scaled(mut self, s: f32) -> Self {
        if s != 1.0 {
            self.cos.iter_mut().chain(self.sin.iter_mut()).for_each(|v| *v *= s);
        }
        self
    }
}

/// Shared driver: rotates every `[D]` head vector of `x: [B, T, H, D]` by
/// the table row of its position `t`, by +θ (`sign = 1`) or −θ (`sign = −1`).
fn rotate(x: &mut [f32], batch: usize, seq: usize, heads: usize, head_dim: usize, table: &RopeTable, sign: f32) {
    assert!(head_dim > 0 && head_dim.is_multiple_of(2), "rope: head_dim must be even and positive");
    assert!(table.half > 0 && table.half * 2 <= head_dim, "rope: table rotates {} elements of head_dim {head_dim}", table.half * 2);
    assert!(table.len >= seq, "rope: table has {} rows, need {seq}", table.len);
    assert_eq!(x.len(), batch * seq * heads * head_dim, "rope: x is not [B, T, H, D]");
    let half = table.half;
    let row = heads * head_dim;
    if row == 0 {
        return;
    }
    let per = (1usize << 14).div_ceil(row).max(1);
    x.par_chunks_mut(row).enumerate().with_min_len(per).for_each(|(bt, xr)| {
        let t = bt % seq;
        let c = &table.cos[t * half..(t + 1) * half];
        let s = &table.sin[t * half..(t + 1) * half];
        for v in xr.chunks_exact_mut(head_dim) {
            // A partial rotation (2·half < D) leaves the rest as it is.
            let (x1, x2) = v[..2 * half].split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                let si = sign * s[i];
                // HF order: (x·cos) + (rotate_half(x)·sin), one rounding each.
                x1[i] = a * c[i] + (-b) * si;
                x2[i] = b * c[i] + a * si;
            }
        }
    });
}

/// RoPE forward, in place on `x: [B, T, H, D]`: the vector at `(b, t, h)`
/// is rotated by the angles of `table` row `t`:
/// `y₁ = x₁·cos − x₂·sin`, `y₂ = x₂·cos + x₁·sin` (halves, HF rotate_half).
/// Call once for q (`H = n_heads`) and once for k (`H = n_kv_heads`).
pub fn rope_forward(x: &mut [f32], batch: usize, seq: usize, heads: usize, head_dim: usize, table: &RopeTable) {
    rotate(x, batch, seq, heads, head_dim, table, 1.0);
}

/// RoPE backward, in place on `dy: [B, T, H, D]` → `dx`: the inverse
/// rotation, `dx₁ = dy₁·cos + dy₂·sin`, `dx₂ = dy₂·cos − dy₁·sin`.
pub fn rope_backward(dy: &mut [f32], batch: usize, seq: usize, heads: usize, head_dim: usize, table: &RopeTable) {
    rotate(dy, batch, seq, heads, head_dim, table, -1.0);
}
