//! One LoRA linear layer.
//!
//! `y = x·W0ᵀ + b + Σ_active m_a·s_a · dropout(x)·A_aᵀ·B_aᵀ`, with `A: [r,in]`,
//! `B: [out,r]`, `s = alpha/r` (rsLoRA `alpha/√r`) and a per-adapter
//! multiplier `m` set at swap time (llama.cpp's adapter scale). The base
//! `W0` is frozen and never modified: merging writes `W0 + Σ m·s·B·A` into
//! a separate dense buffer that is always derived from `W0`, so merge,
//! unmerge and swap never drift, whatever their number.
//!
//! Memory: a dense base is kept as fp32 `[out,in]` (copied at creation,
//! transposed for `fan_in_fan_out`); an NF4 base stays NF4 and is
//! dequantized tile by tile (`TILE_ELEMS` at a time) inside the matmuls.

use crate::backend::cpu::matmul::{gemm_f32, Mat};
use crate::dtype::{Elems, ElemsMut};
use crate::error::Result;
use crate::quant::nf4::{dequantize_range_f32, Absmax, Nf4Params, Nf4Tensor};
use crate::rng::{derive_seed, dropout_keep, SplitMix64};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Elements of the NF4 base dequantized at once: 8 MiB of fp32, large
/// enough that each tile's GEMM runs at full speed, a small fraction of a
/// dense copy of a real layer.
const TILE_ELEMS: usize = 1 << 21;

/// Dequantized-tile buffers kept between calls: a fresh 8 MiB buffer per
/// product was a fresh mapping to fault in and clear, page by page, every
/// time (each NF4 linear dequantizes its whole weight twice a step). At
/// most `KEPT_TILES` are kept (one per linear running at once: models on
/// several threads); the rest are freed.
static TILES: parking_lot::Mutex<Vec<Vec<f32>>> = parking_lot::Mutex::new(Vec::new());
const KEPT_TILES: usize = 4;

/// Runs `f` on a tile buffer of `n` floats (contents unspecified: every
/// caller overwrites what it reads).
fn with_tile<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = {
        let mut kept = TILES.lock();
        match kept.iter().position(|b| b.len() >= n) {
            Some(i) => kept.swap_remove(i),
            None => kept.pop().unwrap_or_default(),
        }
    };
    if buf.len() < n {
        buf = Vec::with_capacity(n);
        buf.resize(n, 0.0);
    }
    let r = f(&mut buf[..n]);
    let mut kept = TILES.lock();
    if kept.len() < KEPT_TILES {
        kept.push(buf);
    }
    r
}

/// How a new adapter's A and B are initialized.
#[derive(Clone, Debug)]
pub enum Init {
    /// PEFT's default: A ~ kaiming_uniform(a=√5) = U(±1/√in), B = 0.
    KaimingUniform,
    /// PEFT's "gaussian": A ~ N(0, (1/r)²) (std 1/r), B = 0.
    Gaussian,
    /// Caller-supplied A `[r,in]` and B `[out,r]`, row-major.
    Given { a: Vec<f32>, b: Vec<f32> },
}

#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub r: usize,
    pub alpha: f32,
    /// Dropout probability on the adapter's input, in [0, 1).
    pub dropout: f32,
    pub use_rslora: bool,
    pub init: Init,
}

/// A named adapter and its fp32 master weights and gradients.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub name: String,
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub use_rslora: bool,
    /// PEFT's `scaling`: `alpha / r` or `alpha / √r`, computed in f64 then
    /// rounded to f32 as torch does when multiplying an fp32 tensor by it.
    pub scale: f32,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub grad_a: Vec<f32>,
    pub grad_b: Vec<f32>,
    seed: u64,
}

impl Adapter {
    /// The seed of this adapter's dropout masks in this layer (with the
    /// call number and the element index: [`crate::rng::dropout_keep`]).
    pub fn dropout_seed(&self) -> u64 {
        self.seed
    }
}

/// How [`LoraLayer::add_weighted`] combines adapters (PEFT
/// `add_weighted_adapter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// Equal ranks; `A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ`.
    Linear,
    /// Exact: `A = cat(wᵢ·sᵢ·Aᵢ)` (rows), `B = cat(Bᵢ)` (columns), rank Σrᵢ.
    Cat,
}

/// Error added by requantizing a merged weight to NF4.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RequantReport {
    /// ‖NF4(W) − W‖ / ‖W‖ over the merged weight W.
    pub rel_rms: f64,
    pub max_abs: f32,
}

#[derive(Clone, Debug)]
enum Base {
    Dense(Vec<f32>),
    /// The NF4 weight `[out,in]`, as stored: double-quantized scales are
    /// decoded tile by tile, so the base costs its NF4 footprint (≈4.127
    /// bits per weight) and no more.
    Nf4 { t: Nf4Tensor },
}

#[derive(Clone, Debug)]
struct ForwardRecord {
    call: u64,
    rows: usize,
    train: bool,
    mixed: Option<Vec<i32>>,
}

/// A linear layer with a frozen base and named LoRA adapters.
#[derive(Clone, Debug)]
pub struct LoraLayer {
    in_f: usize,
    out_f: usize,
    fan_in_fan_out: bool,
    base: Base,
    bias: Option<Vec<f32>>,
    bias_trainable: bool,
    grad_bias: Option<Vec<f32>>,
    adapters: Vec<Adapter>,
    /// Active adapters (index, multiplier), in activation order.
    active: Vec<(usize, f32)>,
    /// `W0 + Σ_active m·s·B·A` when merged, derived at its first use (a
    /// model merged on a GPU never needs the host copy unless a host
    /// forward or an export asks for it).
    merged: Option<OnceLock<Vec<f32>>>,
    grads_pending: bool,
    seed: u64,
    calls: u64,
    last_forward: Option<ForwardRecord>,
}

/// Ranks every layer takes, whatever its size (PEFT writes ranks above a
/// small layer's dimensions: test models of hidden 2 with r 8).
pub const SMALL_RANK: usize = 1024;

/// Checks an adapter rank for an `out`×`in` layer: 1 to the larger of
/// [`SMALL_RANK`] and in + out. PEFT takes ranks above min(in, out) (the
/// update's rank is then min(in, out), with more parameters), and so does
/// liblora, so the adapters PEFT writes for small layers load; a larger
/// rank would only cost memory (A and B hold r·(in + out) values), and is
/// refused before anything is allocated.
pub fn check_rank(r: usize, in_f: usize, out_f: usize) -> Result<()> {
    let max = SMALL_RANK.max(in_f + out_f);
    if r == 0 || r > max {
        bail!(InvalidArgument, "rank {r} for a {out_f}x{in_f} layer: an adapter's rank is 1 to {max} (the larger of {SMALL_RANK} and in + out)");
    }
    Ok(())
}

fn check_finite(v: &[f32], what: &str) -> Result<()> {
    if crate::backend::cpu::reduce::all_finite(v) {
        return Ok(());
    }
    let i = v.iter().position(|x| !x.is_finite()).expect("all_finite found one");
    bail!(NonFinite, "{what}[{i}] is {}", v[i])
}

/// `m·s` for an adapter and its multiplier.
fn eff_scale(a: &Adapter, mult: f32) -> f32 {
    a.scale * mult
}

impl LoraLayer {
    /// A layer over a dense base weight `w` given as `[out,in]`, or as
    /// `[in,out]` when `fan_in_fan_out` (GPT-2's Conv1D). The weight is
    /// copied (as fp32).
    pub fn new_dense(w: Elems<'_>, in_f: usize, out_f: usize, fan_in_fan_out: bool, bias: Option<Vec<f32>>, seed: u64) -> Result<Self> {
        crate::dtype::checked_numel(&[out_f, in_f], 4)?;
        if w.len() != in_f * out_f {
            bail!(BufferSize, "weight holds {} elements, [{out_f}, {in_f}] needs {}", w.len(), in_f * out_f);
        }
        if let Some(i) = w.first_non_finite() {
            bail!(NonFinite, "weight element {i} is {}", w.get(i));
        }
        let mut dense = vec![0f32; in_f * out_f];
        if fan_in_fan_out {
            for i in 0..in_f {
                for o in 0..out_f {
                    dense[o * in_f + i] = w.get(i * out_f + o);
                }
            }
        } else {
            for (k, d) in dense.iter_mut().enumerate() {
                *d = w.get(k);
            }
        }
        Self::with_base(Base::Dense(dense), in_f, out_f, fan_in_fan_out, bias, seed)
    }

    /// A layer over an NF4 base weight of shape `[out,in]` (kept NF4).
    pub fn new_nf4(t: Nf4Tensor, bias: Option<Vec<f32>>, seed: u64) -> Result<Self> {
        if t.shape().len() != 2 {
            bail!(InvalidShape, "an NF4 base weight must be 2-D [out, in], got {:?}", t.shape());
        }
        let (out_f, in_f) = (t.shape()[0], t.shape()[1]);
        Self::with_base(Base::Nf4 { t }, in_f, out_f, false, bias, seed)
    }

    fn with_base(base: Base, in_f: usize, out_f: usize, fan_in_fan_out: bool, bias: Option<Vec<f32>>, seed: u64) -> Result<Self> {
        if let Some(b) = &bias {
            if b.len() != out_f {
                bail!(ShapeMismatch, "bias has {} elements, the layer has {out_f} outputs", b.len());
            }
            check_finite(b, "bias")?;
        }
        Ok(LoraLayer {
            in_f,
            out_f,
            fan_in_fan_out,
            base,
            bias,
            bias_trainable: false,
            grad_bias: None,
            adapters: Vec::new(),
            active: Vec::new(),
            merged: None,
            grads_pending: false,
            seed,
            calls: 0,
            last_forward: None,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_f
    }
    pub fn out_features(&self) -> usize {
        self.out_f
    }
    pub fn is_nf4(&self) -> bool {
        matches!(self.base, Base::Nf4 { .. })
    }
    /// The NF4 base weight, if the base is NF4.
    /// The dense fp32 base `[out,in]`, when the base is not NF4.
    pub fn base_dense(&self) -> Option<&[f32]> {
        match &self.base {
            Base::Dense(w) => Some(w),
            Base::Nf4 { .. } => None,
        }
    }

    pub fn nf4_base(&self) -> Option<&Nf4Tensor> {
        match &self.base {
            Base::Nf4 { t, .. } => Some(t),
            Base::Dense(_) => None,
        }
    }

    /// Bytes held for the frozen base: the NF4 footprint (packed codes and
    /// scales as stored) plus its decoded fp32 block scales, or the dense
    /// fp32 copy; plus the bias and a merged weight if present.
    pub fn base_bytes(&self) -> usize {
        let w = match &self.base {
            Base::Nf4 { t } => t.footprint_bytes(),
            Base::Dense(w) => w.len() * 4,
        };
        w + self.bias.as_ref().map_or(0, |b| b.len() * 4) + self.merged.as_ref().and_then(|m| m.get()).map_or(0, |m| m.len() * 4)
    }

    /// Bytes of adapter weights and their gradients.
    pub fn adapter_bytes(&self) -> usize {
        self.adapters.iter().map(|a| (a.a.len() + a.b.len() + a.grad_a.len() + a.grad_b.len()) * 4).sum()
    }

    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }
    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }
    pub fn grads_pending(&self) -> bool {
        self.grads_pending
    }
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
    pub fn grad_bias(&self) -> Option<&[f32]> {
        self.grad_bias.as_deref()
    }

    /// Index of adapter `name`.
    pub fn adapter_index(&self, name: &str) -> Result<usize> {
        self.adapters.iter().position(|a| a.name == name).ok_or_else(|| err!(InvalidArgument, "no adapter named '{name}'"))
    }

    pub fn adapter(&self, name: &str) -> Result<&Adapter> {
        Ok(&self.adapters[self.adapter_index(name)?])
    }

    /// Active adapters as (name, multiplier).
    pub fn active(&self) -> Vec<(String, f32)> {
        self.active.iter().map(|&(i, m)| (self.adapters[i].name.clone(), m)).collect()
    }

    /// Makes the base bias trainable (its gradient accumulates in backward).
    pub fn set_bias_trainable(&mut self, on: bool) -> Result<()> {
        if on && self.bias.is_none() {
            bail!(InvalidState, "the layer has no bias to train");
        }
        self.bias_trainable = on;
        self.grad_bias = if on { Some(vec![0.0; self.out_f]) } else { None };
        Ok(())
    }

    /// Adds adapter `name`. A fresh adapter (B = 0) changes no output. The
    /// first adapter added becomes active; later ones are resident until
    /// activated (PEFT's `add_adapter`).
    pub fn add_adapter(&mut self, name: &str, cfg: AdapterConfig) -> Result<()> {
        if name.is_empty() {
            bail!(InvalidArgument, "adapter name is empty");
        }
        if self.adapters.iter().any(|a| a.name == name) {
            bail!(InvalidArgument, "an adapter named '{name}' already exists");
        }
        check_rank(cfg.r, self.in_f, self.out_f)?;
        if !(cfg.alpha.is_finite() && cfg.alpha > 0.0) {
            bail!(InvalidArgument, "alpha {} must be positive and finite", cfg.alpha);
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            bail!(InvalidArgument, "dropout {} is outside [0, 1)", cfg.dropout);
        }
        let (r, in_f, out_f) = (cfg.r, self.in_f, self.out_f);
        let seed = derive_seed(self.seed, name);
        let mut rng = SplitMix64::new(seed);
        let (a, b) = match cfg.init {
            Init::KaimingUniform => {
                // kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√in.
                let bound = 1.0 / (in_f as f32).sqrt();
                ((0..r * in_f).map(|_| rng.uniform(-bound, bound)).collect(), vec![0.0; out_f * r])
            }
            Init::Gaussian => {
                let std = 1.0 / r as f32;
                ((0..r * in_f).map(|_| rng.normal() * std).collect(), vec![0.0; out_f * r])
            }
            Init::Given { a, b } => {
                if a.len() != r * in_f {
                    bail!(ShapeMismatch, "A holds {} values, [{r}, {in_f}] needs {}", a.len(), r * in_f);
                }
                if b.len() != out_f * r {
                    bail!(ShapeMismatch, "B holds {} values, [{out_f}, {r}] needs {}", b.len(), out_f * r);
                }
                check_finite(&a, "A")?;
                check_finite(&b, "B")?;
                (a, b)
            }
        };
        let scale = if cfg.use_rslora { (cfg.alpha as f64 / (r as f64).sqrt()) as f32 } else { (cfg.alpha as f64 / r as f64) as f32 };
        self.adapters.push(Adapter {
            name: name.to_string(),
            r,
            alpha: cfg.alpha,
            dropout: cfg.dropout,
            use_rslora: cfg.use_rslora,
            scale,
            grad_a: vec![0.0; a.len()],
            grad_b: vec![0.0; b.len()],
            a,
            b,
            seed,
        });
        if self.active.is_empty() && !self.is_merged() {
            self.active.push((self.adapters.len() - 1, 1.0));
        }
        Ok(())
    }

    /// Replaces adapter `name`'s weights (e.g. loaded from a file).
    pub fn set_adapter_weights(&mut self, name: &str, a: &[f32], b: &[f32]) -> Result<()> {
        let i = self.adapter_index(name)?;
        if self.is_merged() && self.active.iter().any(|&(k, _)| k == i) {
            bail!(InvalidState, "adapter '{name}' is merged; unmerge before changing its weights");
        }
        let ad = &mut self.adapters[i];
        if a.len() != ad.a.len() || b.len() != ad.b.len() {
            bail!(ShapeMismatch, "adapter '{name}' needs A of {} and B of {} values", ad.a.len(), ad.b.len());
        }
        check_finite(a, "A")?;
        check_finite(b, "B")?;
        ad.a.copy_from_slice(a);
        ad.b.copy_from_slice(b);
        Ok(())
    }

    /// Removes adapter `name` (PEFT `delete_adapter`). Refused while it is
    /// merged into the weight.
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        let i = self.adapter_index(name)?;
        let pos = self.active.iter().position(|&(k, _)| k == i);
        if self.is_merged() && pos.is_some() {
            bail!(InvalidState, "adapter '{name}' is merged; unmerge before removing it");
        }
        self.check_no_pending("removing an adapter")?;
        self.adapters.remove(i);
        self.active.retain(|&(k, _)| k != i);
        self.active.iter_mut().for_each(|(k, _)| {
            if *k > i {
                *k -= 1;
            }
        });
        Ok(())
    }

    /// Trainable parameters: adapters' A and B (plus the bias if trainable).
    pub fn trainable_params(&self) -> usize {
        self.adapters.iter().map(|a| a.a.len() + a.b.len()).sum::<usize>() + if self.bias_trainable { self.out_f } else { 0 }
    }

    /// All parameters: base weight (counted as `out·in` for NF4 too, as
    /// PEFT does), bias and adapters.
    pub fn total_params(&self) -> usize {
        self.in_f * self.out_f + self.bias.as_ref().map_or(0, |b| b.len()) + self.adapters.iter().map(|a| a.a.len() + a.b.len()).sum::<usize>()
    }

    fn check_no_pending(&self, what: &str) -> Result<()> {
        if self.grads_pending {
            bail!(InvalidState, "{what} while gradients are accumulated but not consumed (call zero_grad or step first)");
        }
        Ok(())
    }

    /// Makes `set` (adapter name, multiplier) the active adapters: O(1)
    /// when unmerged; when merged, the merged weight is re-derived as
    /// exactly `W0 + Σ m·s·B·A` of the new set. Several active adapters
    /// sum their deltas (PEFT's list form of `set_adapter`).
    pub fn set_active(&mut self, set: &[(&str, f32)]) -> Result<()> {
        self.check_no_pending("swapping adapters")?;
        let mut new = Vec::with_capacity(set.len());
        for &(name, m) in set {
            if !m.is_finite() {
                bail!(InvalidArgument, "multiplier {m} for adapter '{name}' is not finite");
            }
            let i = self.adapter_index(name)?;
            if new.iter().any(|&(k, _)| k == i) {
                bail!(InvalidArgument, "adapter '{name}' listed twice");
            }
            new.push((i, m));
        }
        self.active = new;
        if self.is_merged() {
            self.merged = Some(OnceLock::new());
        }
        Ok(())
    }

    /// Merges the active adapters into the (dense) weight the layer uses.
    pub fn merge(&mut self) -> Result<()> {
        if self.is_merged() {
            bail!(InvalidState, "the layer is already merged");
        }
        self.check_no_pending("merging")?;
        self.merged = Some(OnceLock::new());
        Ok(())
    }

    /// Back to `W0` with the adapters applied separately: exact, since
    /// `W0` was never modified.
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.is_merged() {
            bail!(InvalidState, "the layer is not merged");
        }
        self.merged = None;
        Ok(())
    }

    /// `W0` (dequantized for NF4) as fp32 `[out,in]`.
    pub fn base_weight_f32(&self) -> Vec<f32> {
        match &self.base {
            Base::Dense(w) => w.clone(),
            Base::Nf4 { t } => {
                let mut w = vec![0f32; self.in_f * self.out_f];
                let absmax = t.absmax_f32();
                let bs = t.blocksize();
                w.par_chunks_mut(TILE_ELEMS).enumerate().for_each(|(c, o)| dequantize_range_f32(t.packed(), &absmax, bs, c * TILE_ELEMS, o));
                w
            }
        }
    }

    /// `s·B·A` of adapter `i` (PEFT's `get_delta_weight`, `[out,in]`).
    pub fn delta_weight(&self, i: usize, mult: f32) -> Vec<f32> {
        let a = &self.adapters[i];
        let mut d = vec![0f32; self.in_f * self.out_f];
        gemm_f32(&mut d, self.in_f, Mat::n(&a.b, a.r), Mat::n(&a.a, self.in_f), self.out_f, self.in_f, a.r, 1.0, false, true);
        let s = eff_scale(a, mult);
        d.par_iter_mut().for_each(|v| *v *= s);
        d
    }

    /// Derives the merged weight now if the layer is merged and it has not
    /// been yet (a host model merges eagerly; one on a device never needs
    /// the host copy unless a host forward or an export asks for it).
    pub fn materialize_merged(&self) {
        if let Some(m) = &self.merged {
            self.merged_weight(m);
        }
    }

    /// The merged weight, derived now if this is its first use.
    fn merged_weight<'a>(&self, m: &'a OnceLock<Vec<f32>>) -> &'a Vec<f32> {
        m.get_or_init(|| self.derive_merged())
    }

    fn derive_merged(&self) -> Vec<f32> {
        let mut w = self.base_weight_f32();
        for &(i, m) in &self.active {
            let d = self.delta_weight(i, m);
            w.par_iter_mut().zip(d.par_iter()).for_each(|(x, y)| *x += *y);
        }
        w
    }

    /// The weight the layer currently computes with, in the base's own
    /// layout (`[in,out]` for fan_in_fan_out): merged if merged, else `W0`.
    pub fn effective_weight(&self) -> Vec<f32> {
        let w = match &self.merged {
            Some(m) => self.merged_weight(m).clone(),
            None => self.base_weight_f32(),
        };
        if self.fan_in_fan_out {
            let mut t = vec![0f32; w.len()];
            for o in 0..self.out_f {
                for i in 0..self.in_f {
                    t[i * self.out_f + o] = w[o * self.in_f + i];
                }
            }
            t
        } else {
            w
        }
    }

    /// Writes the effective weight into `out` (`[out,in]`, or `[in,out]` for
    /// fan_in_fan_out) as fp32, fp16 or bf16.
    pub fn effective_weight_into(&self, out: ElemsMut<'_>) -> Result<()> {
        let w = self.effective_weight();
        if out.len() != w.len() {
            bail!(BufferSize, "output holds {} elements, the weight has {}", out.len(), w.len());
        }
        match out {
            ElemsMut::F32(o) => o.copy_from_slice(&w),
            ElemsMut::F16(o) => o.iter_mut().zip(&w).for_each(|(d, s)| *d = half::f16::from_f32(*s)),
            ElemsMut::BF16(o) => o.iter_mut().zip(&w).for_each(|(d, s)| *d = half::bf16::from_f32(*s)),
        }
        Ok(())
    }

    /// Requantizes the merged weight to NF4 and makes it the new base (an
    /// explicit, lossy step: PEFT does it silently on merge). The merged
    /// adapters become inactive (their effect is now in the base). Returns
    /// the error the requantization added.
    pub fn requantize_merged(&mut self, params: Nf4Params) -> Result<RequantReport> {
        let Some(cell) = self.merged.take() else {
            bail!(InvalidState, "the layer is not merged: nothing to requantize");
        };
        let w = cell.into_inner().unwrap_or_else(|| self.derive_merged());
        let t = match Nf4Tensor::quantize(Elems::F32(&w), &[self.out_f, self.in_f], params) {
            Ok(t) => t,
            Err(e) => {
                self.merged = Some(OnceLock::from(w));
                return Err(e);
            }
        };
        let q = t.dequantize_f32();
        let (mut e2, mut r2, mut mx) = (0f64, 0f64, 0f32);
        for (a, b) in q.iter().zip(&w) {
            let d = a - b;
            e2 += (d as f64) * (d as f64);
            r2 += (*b as f64) * (*b as f64);
            mx = mx.max(d.abs());
        }
        self.base = Base::Nf4 { t };
        self.active.clear();
        Ok(RequantReport { rel_rms: if r2 > 0.0 { (e2 / r2).sqrt() } else { e2.sqrt() }, max_abs: mx })
    }

    /// `y = x·Wᵀ (+ b)` for the base (or merged) weight; `x: [n,in]`,
    /// `y: [n,out]` overwritten.
    fn base_forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (in_f, out_f) = (self.in_f, self.out_f);
        let merged = self.merged.as_ref().map(|m| self.merged_weight(m));
        match (merged, &self.base) {
            (Some(w), _) | (None, Base::Dense(w)) => {
                gemm_f32(y, out_f, Mat::n(x, in_f), Mat::t(w, in_f), n, out_f, in_f, 1.0, false, true);
            }
            (None, Base::Nf4 { t }) => {
                let rows = (TILE_ELEMS / in_f).clamp(1, out_f);
                with_tile(rows * in_f, |tile| {
                    for o0 in (0..out_f).step_by(rows) {
                        let o1 = (o0 + rows).min(out_f);
                        let tw = &mut tile[..(o1 - o0) * in_f];
                        dequant_par(t, o0 * in_f, tw);
                        gemm_f32(&mut y[o0..], out_f, Mat::n(x, in_f), Mat::t(tw, in_f), n, o1 - o0, in_f, 1.0, false, true);
                    }
                });
            }
        }
        if let Some(b) = &self.bias {
            y.par_chunks_mut(out_f).for_each(|row| row.iter_mut().zip(b).for_each(|(v, bb)| *v += bb));
        }
    }

    /// `dx = dy·W` (`+=` when `accumulate`) through the base weight;
    /// `dy: [n,out]`, `dx: [n,in]`.
    fn base_backward(&self, dy: &[f32], n: usize, dx: &mut [f32], accumulate: bool) {
        let (in_f, out_f) = (self.in_f, self.out_f);
        match &self.base {
            Base::Dense(w) => gemm_f32(dx, in_f, Mat::n(dy, out_f), Mat::n(w, in_f), n, in_f, out_f, 1.0, accumulate, true),
            Base::Nf4 { t } => {
                let rows = (TILE_ELEMS / in_f).clamp(1, out_f);
                with_tile(rows * in_f, |tile| {
                    for o0 in (0..out_f).step_by(rows) {
                        let o1 = (o0 + rows).min(out_f);
                        let tw = &mut tile[..(o1 - o0) * in_f];
                        dequant_par(t, o0 * in_f, tw);
                        gemm_f32(dx, in_f, Mat::n(&dy[o0..], out_f), Mat::n(tw, in_f), n, in_f, o1 - o0, 1.0, accumulate || o0 > 0, true);
                    }
                });
            }
        }
    }

    /// `dropout(x)` for adapter `ad` on rows `rows` (global row indices) of
    /// call `call`, gathered into a dense `[rows.len(), in]` buffer.
    fn adapter_input<'x>(&self, ad: &Adapter, x: &'x [f32], rows: Option<&[usize]>, call: u64, train: bool) -> std::borrow::Cow<'x, [f32]> {
        let in_f = self.in_f;
        let p = if train { ad.dropout } else { 0.0 };
        let keep = 1.0 / (1.0 - p);
        let gather = |r: usize, out: &mut [f32]| {
            let src = &x[r * in_f..(r + 1) * in_f];
            if p > 0.0 {
                for (c, (o, v)) in out.iter_mut().zip(src).enumerate() {
                    *o = if dropout_keep(ad.seed, call, (r * in_f + c) as u64, p) { v * keep } else { 0.0 };
                }
            } else {
                out.copy_from_slice(src);
            }
        };
        match rows {
            None => {
                if p == 0.0 {
                    // No dropout: the input itself, not a copy.
                    return std::borrow::Cow::Borrowed(x);
                }
                let mut out = vec![0f32; x.len()];
                out.par_chunks_mut(in_f).enumerate().for_each(|(r, o)| gather(r, o));
                out.into()
            }
            Some(rs) => {
                let mut out = vec![0f32; rs.len() * in_f];
                out.par_chunks_mut(in_f).zip(rs.par_iter()).for_each(|(o, &r)| gather(r, o));
                out.into()
            }
        }
    }

    /// Rows of a mixed batch grouped by adapter: (adapter index, rows).
    fn groups(&self, row_adapter: &[i32]) -> Result<Vec<(usize, Vec<usize>)>> {
        let mut g: Vec<(usize, Vec<usize>)> = Vec::new();
        for (r, &a) in row_adapter.iter().enumerate() {
            if a < 0 {
                continue;
            }
            let a = a as usize;
            if a >= self.adapters.len() {
                bail!(InvalidArgument, "row {r} names adapter index {a}, but the layer has {} adapters", self.adapters.len());
            }
            match g.iter_mut().find(|(k, _)| *k == a) {
                Some((_, v)) => v.push(r),
                None => g.push((a, vec![r])),
            }
        }
        Ok(g)
    }

    fn check_rows(&self, x: &[f32], n: usize, y_len: usize) -> Result<()> {
        if n == 0 {
            bail!(InvalidShape, "batch has 0 rows");
        }
        if x.len() != n * self.in_f {
            bail!(ShapeMismatch, "input holds {} values, {n} rows of {} features need {}", x.len(), self.in_f, n * self.in_f);
        }
        if y_len != n * self.out_f {
            bail!(ShapeMismatch, "output holds {y_len} values, {n} rows of {} outputs need {}", self.out_f, n * self.out_f);
        }
        Ok(())
    }

    /// Forward for `n` rows: `y = x·Wᵀ + b + Σ_active m·s·dropout(x)·Aᵀ·Bᵀ`
    /// (merged: `x·W'ᵀ + b`). `row_adapter`, if given, names per row the
    /// adapter index to apply alone (or −1 for the base only): a
    /// mixed-adapter batch, computed per group of rows. Dropout only when
    /// `train`, driven by the layer's seed and a call counter.
    pub fn forward(&mut self, x: &[f32], n: usize, y: &mut [f32], row_adapter: Option<&[i32]>, train: bool) -> Result<()> {
        let call = self.calls + 1;
        self.forward_at(x, n, y, row_adapter, train, call)
    }

    /// [`forward`](Self::forward) as call number `call`, which names the
    /// dropout mask: a model recomputing a checkpointed layer, or resuming
    /// a run, passes the same number again to get the same mask.
    pub fn forward_at(&mut self, x: &[f32], n: usize, y: &mut [f32], row_adapter: Option<&[i32]>, train: bool, call: u64) -> Result<()> {
        self.forward_checked(x, n, y, row_adapter, train, call, true)
    }

    /// [`forward_at`](Self::forward_at), scanning `x` for NaN or ±∞ only
    /// with `check`: a model's training step skips the scan (it was ~3% of
    /// a step; a non-finite activation reaches the loss, which the trainer
    /// checks with the gradients before any optimizer step).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_checked(&mut self, x: &[f32], n: usize, y: &mut [f32], row_adapter: Option<&[i32]>, train: bool, call: u64, check: bool) -> Result<()> {
        self.check_rows(x, n, y.len())?;
        if check {
            check_finite(x, "x")?;
        }
        if let Some(ra) = row_adapter {
            if ra.len() != n {
                bail!(ShapeMismatch, "row_adapter has {} entries for {n} rows", ra.len());
            }
            if self.is_merged() {
                bail!(InvalidState, "a mixed-adapter batch needs the layer unmerged");
            }
        }
        let groups = row_adapter.map(|ra| self.groups(ra)).transpose()?;
        self.calls = self.calls.max(call);
        self.base_forward(x, n, y);
        let (in_f, out_f) = (self.in_f, self.out_f);
        match &groups {
            None if !self.is_merged() => {
                for &(i, m) in &self.active {
                    let ad = &self.adapters[i];
                    let xin = self.adapter_input(ad, x, None, call, train);
                    let mut h = vec![0f32; n * ad.r];
                    gemm_f32(&mut h, ad.r, Mat::n(&xin, in_f), Mat::t(&ad.a, in_f), n, ad.r, in_f, 1.0, false, true);
                    gemm_f32(y, out_f, Mat::n(&h, ad.r), Mat::t(&ad.b, ad.r), n, out_f, ad.r, eff_scale(ad, m), true, true);
                }
            }
            None => {}
            Some(groups) => {
                for (i, rows) in groups {
                    let ad = &self.adapters[*i];
                    let k = rows.len();
                    let xin = self.adapter_input(ad, x, Some(rows), call, train);
                    let mut h = vec![0f32; k * ad.r];
                    gemm_f32(&mut h, ad.r, Mat::n(&xin, in_f), Mat::t(&ad.a, in_f), k, ad.r, in_f, 1.0, false, true);
                    let mut u = vec![0f32; k * out_f];
                    gemm_f32(&mut u, out_f, Mat::n(&h, ad.r), Mat::t(&ad.b, ad.r), k, out_f, ad.r, 1.0, false, true);
                    let s = ad.scale;
                    for (j, &r) in rows.iter().enumerate() {
                        y[r * out_f..(r + 1) * out_f].iter_mut().zip(&u[j * out_f..(j + 1) * out_f]).for_each(|(d, v)| *d += s * v);
                    }
                }
            }
        }
        self.last_forward = Some(ForwardRecord { call, rows: n, train, mixed: row_adapter.map(|r| r.to_vec()) });
        Ok(())
    }

    /// Backward of the most recent [`forward`](Self::forward) (same `x`, same
    /// rows): writes `dx` (if given) and accumulates `dA`, `dB` of the
    /// adapters that took part (and the bias gradient if trainable). The
    /// base is never modified. Needs the layer unmerged.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], n: usize, dx: Option<&mut [f32]>) -> Result<()> {
        self.backward_impl(x, dy, n, dx, false, true)
    }

    /// [`backward`](Self::backward) for a model's training step: the input
    /// gradient is added into `dx` when `accumulate` (the modules that
    /// read one input: q, k and v; gate and up) instead of overwriting it,
    /// and `dy` is not scanned for NaN or ±∞ (as
    /// [`forward_checked`](Self::forward_checked) without `check`).
    pub(crate) fn backward_into(&mut self, x: &[f32], dy: &[f32], n: usize, dx: Option<&mut [f32]>, accumulate: bool) -> Result<()> {
        self.backward_impl(x, dy, n, dx, accumulate, false)
    }

    fn backward_impl(&mut self, x: &[f32], dy: &[f32], n: usize, dx: Option<&mut [f32]>, accumulate: bool, check: bool) -> Result<()> {
        self.check_rows(x, n, dy.len())?;
        if check {
            check_finite(dy, "dy")?;
        }
        if self.is_merged() {
            bail!(InvalidState, "backward needs the layer unmerged (a merged weight has no adapter gradients)");
        }
        let Some(rec) = self.last_forward.clone() else {
            bail!(InvalidState, "backward without a forward");
        };
        if rec.rows != n {
            bail!(InvalidState, "backward for {n} rows after a forward of {} rows", rec.rows);
        }
        if let Some(d) = &dx {
            if d.len() != n * self.in_f {
                bail!(ShapeMismatch, "dx holds {} values, {n} rows of {} features need {}", d.len(), self.in_f, n * self.in_f);
            }
        }
        let (in_f, out_f) = (self.in_f, self.out_f);
        let mut dx = dx;
        if let Some(d) = dx.as_deref_mut() {
            self.base_backward(dy, n, d, accumulate);
        }
        if let Some(gb) = self.grad_bias.as_mut() {
            for row in dy.chunks(out_f) {
                gb.iter_mut().zip(row).for_each(|(g, v)| *g += v);
            }
        }
        // (adapter index, effective scale, rows or all).
        let work: Vec<(usize, f32, Option<Vec<usize>>)> = match &rec.mixed {
            None => self.active.iter().map(|&(i, m)| (i, eff_scale(&self.adapters[i], m), None)).collect(),
            Some(ra) => self.groups(ra)?.into_iter().map(|(i, rows)| (i, self.adapters[i].scale, Some(rows))).collect(),
        };
        for (i, s, rows) in work {
            let ad = &self.adapters[i];
            let r = ad.r;
            let xin = self.adapter_input(ad, x, rows.as_deref(), rec.call, rec.train);
            let k = rows.as_ref().map_or(n, |v| v.len());
            let dyg: std::borrow::Cow<'_, [f32]> = match &rows {
                None => dy.into(),
                Some(rs) => rs.iter().flat_map(|&r| dy[r * out_f..(r + 1) * out_f].iter().copied()).collect::<Vec<_>>().into(),
            };
            let mut h = vec![0f32; k * r];
            gemm_f32(&mut h, r, Mat::n(&xin, in_f), Mat::t(&ad.a, in_f), k, r, in_f, 1.0, false, true);
            let mut g = vec![0f32; k * r];
            gemm_f32(&mut g, r, Mat::n(&dyg, out_f), Mat::n(&ad.b, r), k, r, out_f, 1.0, false, true);
            let (p, seed, call, train) = (ad.dropout, ad.seed, rec.call, rec.train);
            // All rows, no dropout mask: dx += s·(g·A) in the product itself.
            let direct = rows.is_none() && !(train && p > 0.0);
            if direct {
                if let Some(d) = dx.as_deref_mut() {
                    gemm_f32(d, in_f, Mat::n(&g, r), Mat::n(&ad.a, in_f), k, in_f, r, s, true, true);
                }
            }
            let mut gdx = if dx.is_some() && !direct { vec![0f32; k * in_f] } else { Vec::new() };
            if dx.is_some() && !direct {
                gemm_f32(&mut gdx, in_f, Mat::n(&g, r), Mat::n(&ad.a, in_f), k, in_f, r, 1.0, false, true);
            }
            let ad = &mut self.adapters[i];
            gemm_f32(&mut ad.grad_b, r, Mat::t(&dyg, out_f), Mat::n(&h, r), out_f, r, k, s, true, true);
            gemm_f32(&mut ad.grad_a, in_f, Mat::t(&g, r), Mat::n(&xin, in_f), r, in_f, k, s, true, true);
            if let (Some(d), false) = (dx.as_deref_mut(), direct) {
                let keep = if train && p > 0.0 { 1.0 / (1.0 - p) } else { 1.0 };
                for j in 0..k {
                    let row = rows.as_ref().map_or(j, |v| v[j]);
                    let dst = &mut d[row * in_f..(row + 1) * in_f];
                    for (c, (o, v)) in dst.iter_mut().zip(&gdx[j * in_f..(j + 1) * in_f]).enumerate() {
                        let m = if train && p > 0.0 {
                            if dropout_keep(seed, call, (row * in_f + c) as u64, p) { keep } else { 0.0 }
                        } else {
                            1.0
                        };
                        *o += s * m * v;
                    }
                }
            }
        }
        self.grads_pending = true;
        Ok(())
    }

    /// Clears accumulated gradients (after an optimizer step consumed them).
    pub fn zero_grad(&mut self) {
        for a in &mut self.adapters {
            a.grad_a.iter_mut().for_each(|v| *v = 0.0);
            a.grad_b.iter_mut().for_each(|v| *v = 0.0);
        }
        if let Some(g) = self.grad_bias.as_mut() {
            g.iter_mut().for_each(|v| *v = 0.0);
        }
        self.grads_pending = false;
    }

    /// A new adapter `name` from weighted existing ones (PEFT
    /// `add_weighted_adapter`): `linear` needs equal ranks; `cat` is exact
    /// with rank Σrᵢ. The new adapter has `alpha = r` (scale 1), dropout 0,
    /// and is not activated.
    pub fn add_weighted(&mut self, name: &str, parts: &[(&str, f32)], how: Combine) -> Result<()> {
        if parts.is_empty() {
            bail!(InvalidArgument, "no adapters to combine");
        }
        let idx: Vec<(usize, f32)> = parts.iter().map(|&(n, w)| Ok((self.adapter_index(n)?, w))).collect::<Result<_>>()?;
        if let Some(&(_, w)) = parts.iter().find(|(_, w)| !w.is_finite()) {
            bail!(InvalidArgument, "combination weight {w} is not finite");
        }
        let in_f = self.in_f;
        let out_f = self.out_f;
        let (r, a, b) = match how {
            Combine::Linear => {
                let r = self.adapters[idx[0].0].r;
                if let Some(&(i, _)) = idx.iter().find(|&&(i, _)| self.adapters[i].r != r) {
                    bail!(InvalidArgument, "linear combination needs equal ranks: '{}' has rank {}, '{}' has {r}", self.adapters[i].name, self.adapters[i].r, self.adapters[idx[0].0].name);
                }
                let (mut a, mut b) = (vec![0f32; r * in_f], vec![0f32; out_f * r]);
                for &(i, w) in &idx {
                    let ad = &self.adapters[i];
                    // PEFT: weight·scaling in Python floats; √|·| with the sign on A.
                    let ws = w as f64 * ad.scale as f64;
                    let wa = (ws.abs().sqrt() * if ws >= 0.0 { 1.0 } else { -1.0 }) as f32;
                    let wb = ws.abs().sqrt() as f32;
                    a.iter_mut().zip(&ad.a).for_each(|(d, s)| *d += s * wa);
                    b.iter_mut().zip(&ad.b).for_each(|(d, s)| *d += s * wb);
                }
                (r, a, b)
            }
            Combine::Cat => {
                let r: usize = idx.iter().map(|&(i, _)| self.adapters[i].r).sum();
                check_rank(r, in_f, out_f)?;
                let mut a = Vec::with_capacity(r * in_f);
                let mut b = vec![0f32; out_f * r];
                let mut col = 0;
                for &(i, w) in &idx {
                    let ad = &self.adapters[i];
                    let f = w * ad.scale;
                    a.extend(ad.a.iter().map(|v| v * f));
                    for o in 0..out_f {
                        b[o * r + col..o * r + col + ad.r].copy_from_slice(&ad.b[o * ad.r..(o + 1) * ad.r]);
                    }
                    col += ad.r;
                }
                (r, a, b)
            }
        };
        let was_empty = self.active.is_empty();
        self.add_adapter(name, AdapterConfig { r, alpha: r as f32, dropout: 0.0, use_rslora: false, init: Init::Given { a, b } })?;
        if was_empty {
            self.active.clear();
        }
        Ok(())
    }

    /// Adapter weights for an optimizer: (A, B, dA, dB) of adapter `i`.
    pub fn adapter_mut(&mut self, i: usize) -> &mut Adapter {
        &mut self.adapters[i]
    }
}

/// Block scales `[b0, b1)` of `t` as fp32: borrowed, or decoded from the
/// double-quantized codes (from the enclosing nested block, so the
/// arithmetic is exactly [`crate::quant::nf4::DoubleQuant::decode`]'s).
fn scales(t: &Nf4Tensor, b0: usize, b1: usize) -> std::borrow::Cow<'_, [f32]> {
    match t.absmax() {
        Absmax::F32(a) => std::borrow::Cow::Borrowed(&a[b0..b1]),
        Absmax::Double(d) => {
            let nb = d.nested_blocksize;
            let a0 = b0 / nb * nb;
            let mut out = vec![0f32; b1 - a0];
            crate::backend::cpu::nf4::blockwise8_dequantize(&d.codes[a0..b1], &d.map, &d.nested_absmax[a0 / nb..], nb, d.offset, &mut out);
            out.drain(..b0 - a0);
            std::borrow::Cow::Owned(out)
        }
    }
}

/// Dequantizes flat elements `[start, start + out.len())` on the rayon pool:
/// with the vectorized kernel when the range starts on a block boundary
/// (every tile of a layer whose `in` is a multiple of the blocksize).
fn dequant_par(t: &Nf4Tensor, start: usize, out: &mut [f32]) {
    let bs = t.blocksize();
    let end = start + out.len();
    let (b0, b1) = (start / bs, end.div_ceil(bs));
    let absmax = scales(t, b0, b1);
    if start.is_multiple_of(bs) {
        crate::backend::cpu::nf4::nf4_dequantize(&t.packed()[start / 2..end.div_ceil(2)], &absmax, bs, crate::dtype::ElemsMut::F32(out));
        return;
    }
    // Unaligned start: the scalar range decoder indexes scales from block 0.
    const CH: usize = 1 << 14;
    let full = t.absmax_f32();
    out.par_chunks_mut(CH).enumerate().for_each(|(c, o)| dequantize_range_f32(t.packed(), &full, bs, start + c * CH, o));
}
