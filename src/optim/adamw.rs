//! AdamW with PyTorch's exact semantics: `torch.optim.AdamW(foreach=False,
//! fused=False)`, i.e. `_single_tensor_adam` with
//! `decoupled_weight_decay=True` (torch 2.15, torch/optim/adam.py
//! lines 415–547), the path PyTorch takes on the CPU.
//!
//! One step, per tensor, with `t` the new step count and Python floats
//! (`f64`) rounded to `f32` where torch turns them into tensor scalars:
//!
//! ```text
//! p ← p · f32(1 − lr·wd)                       if wd ≠ 0   (adam.py:420, mul_)
//! m ← lerp(m, g, f32(1 − β1))                              (adam.py:457, lerp_)
//! v ← fma(f32(1 − β2)·g, g, v · f32(β2))                   (adam.py:476, mul_ + addcmul_)
//! bc1 = 1 − β1^t,  step_size = lr / bc1        (f64)       (adam.py:531–534)
//! bc2_sqrt = (1 − β2^t)^0.5                    (f64, pow)  (adam.py:535–536)
//! denom = sqrt(v) / f32(bc2_sqrt) + f32(eps)               (adam.py:545)
//! p ← p + (f32(−step_size) · m) / denom                    (adam.py:547, addcdiv_)
//! ```
//!
//! The fused forms are what ATen's CPU kernels compute, checked on the
//! fixtures (and per operation against torch on random data):
//! - `lerp(a, b, w)` = `fma(w, b − a, a)` when `|w| < 0.5`, else
//!   `fma(w − 1, b − a, b)` (ATen `lerp` / `lerp_vec`, both branches).
//! - `addcmul_(t1, t2, value)` = `fma(value·t1, t2, self)`.
//! - `addcdiv_(t1, t2, value)` = `self + (value·t1)/t2`, not
//!   `value·(t1/t2)`.
//! - Division by the Python float `bc2_sqrt` is an fp32 division by
//!   `f32(bc2_sqrt)`, not a multiplication by its reciprocal.
//! - `β^t` is C `pow(β, t)` (Python's `float ** float`): [`f64::powf`],
//!   the same libm call. `x ** 0.5` is `pow(x, 0.5)`, not `sqrt`.
//!
//! The one operation that is not reproduced is `Tensor.sqrt`: on x86 CPU
//! builds PyTorch computes it with MKL's vector math, which is not
//! correctly rounded (about 17% of fp32 results are 1 ulp off on the
//! fixture machine). Here `sqrt` is IEEE (`f32::sqrt`), so parameters are
//! equal to a PyTorch run whose square root is the IEEE one, bit for bit,
//! and within a few ulp of the update of stock PyTorch (tests/optim.rs).
//! The moments never depend on the square root and equal PyTorch's.
//! A CUDA kernel (IEEE `sqrtf` and division) computing the same per-element
//! formula from the same [`AdamWScalars`] gives the same bits.
//!
//! Steps are counted in a `u64`; PyTorch counts in an fp32 tensor, which
//! agrees up to 2^24 steps.

use super::state::{check_names, Lookup, StateTensor};
use super::{check_step_args, simd_dispatch, TASK_ELEMS};
use crate::error::Result;
use crate::memory::{PagedBuf, PagedStats, Pager, CHUNK_BYTES};
use rayon::prelude::*;

/// Hyperparameters, as Python floats. Defaults are torch.optim.AdamW's
/// (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

impl AdamWConfig {
    /// The checks torch.optim.Adam makes at construction (lr, eps,
    /// weight_decay ≥ 0; 0 ≤ β < 1), plus finiteness.
    pub fn validate(&self) -> Result<()> {
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = *self;
        for (name, v) in [("lr", lr), ("eps", eps), ("weight_decay", weight_decay)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!(InvalidArgument, "AdamW {name} must be finite and >= 0, got {v}");
            }
        }
        for (name, v) in [("beta1", beta1), ("beta2", beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!(InvalidArgument, "AdamW {name} must be in [0, 1), got {v}");
            }
        }
        Ok(())
    }
}

/// The fp32 constants of one AdamW step (the same for every tensor and
/// element), computed in `f64` as PyTorch does and rounded once. A GPU
/// kernel takes these as arguments and runs [`adamw_update`]'s formula.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// `f32(1 − lr·wd)`, or `None` when `wd == 0` (torch skips the mul).
    pub decay: Option<f32>,
    /// `f32(1 − β1)`: lerp weight of the first moment.
    pub lerp_weight: f32,
    /// `f32(β2)` and `f32(1 − β2)`.
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `f32((1 − β2^t)^0.5)`.
    pub bias_correction2_sqrt: f32,
    /// `f32(eps)`.
    pub eps: f32,
    /// `f32(−lr / (1 − β1^t))`.
    pub neg_step_size: f32,
}

impl AdamWScalars {
    /// The constants of step `step` (1 for the first step).
    pub fn new(cfg: &AdamWConfig, step: u64) -> AdamWScalars {
        let t = step as f64;
        let bias_correction1 = 1.0 - cfg.beta1.powf(t);
        let bias_correction2 = 1.0 - cfg.beta2.powf(t);
        let step_size = cfg.lr / bias_correction1;
        AdamWScalars {
            decay: (cfg.weight_decay != 0.0).then_some((1.0 - cfg.lr * cfg.weight_decay) as f32),
            lerp_weight: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            bias_correction2_sqrt: bias_correction2.powf(0.5) as f32,
            eps: cfg.eps as f32,
            neg_step_size: (-step_size) as f32,
        }
    }
}

/// The same constants as the CUDA AdamW kernel takes them (the backend
/// sits below `optim` and has its own copy of the struct).
impl From<&AdamWScalars> for crate::backend::cuda::adamw::AdamWStep {
    fn from(s: &AdamWScalars) -> Self {
        crate::backend::cuda::adamw::AdamWStep {
            decay: s.decay,
            lerp_weight: s.lerp_weight,
            beta2: s.beta2,
            one_minus_beta2: s.one_minus_beta2,
            bias_correction2_sqrt: s.bias_correction2_sqrt,
            eps: s.eps,
            neg_step_size: s.neg_step_size,
        }
    }
}

/// ATen's `lerp(self, end, weight)` for fp32 (ATen/native/Lerp.h): both
/// the scalar and the vectorized CPU kernels compute it with one FMA.
#[inline(always)]
pub fn torch_lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        weight.mul_add(end - start, start)
    } else {
        (weight - 1.0).mul_add(end - start, end)
    }
}

/// One AdamW step on one tensor (or any slice of it: elements are
/// independent). See the module documentation for the formula.
#[inline(always)]
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    debug_assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let mut pv = *p;
        if let Some(d) = s.decay {
            pv *= d;
        }
        let mv = torch_lerp(*m, g, s.lerp_weight);
        let vv = (s.one_minus_beta2 * g).mul_add(g, *v * s.beta2);
        let denom = vv.sqrt() / s.bias_correction2_sqrt + s.eps;
        *p = pv + (s.neg_step_size * mv) / denom;
        *m = mv;
        *v = vv;
    }
}

simd_dispatch! {
    /// [`adamw_update`], with AVX2 and FMA where available (same bits).
    fn adamw_update_simd(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) => adamw_update
}

/// [`adamw_update`] over a whole tensor, in parallel chunks.
fn adamw_update_par(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    if p.len() <= TASK_ELEMS {
        return adamw_update_simd(p, g, m, v, s);
    }
    p.par_chunks_mut(TASK_ELEMS)
        .zip(g.par_chunks(TASK_ELEMS))
        .zip(m.par_chunks_mut(TASK_ELEMS))
        .zip(v.par_chunks_mut(TASK_ELEMS))
        .for_each(|(((p, g), m), v)| adamw_update_simd(p, g, m, v, s));
}

/// Where the moments live.
enum Moments {
    /// One `Vec` per tensor.
    Resident { m: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    /// Two paged buffers (all `exp_avg`, all `exp_avg_sq`), tensor `i` at
    /// elements `offs[i]..offs[i+1]`: QLoRA's paged optimizer state.
    Paged { m: PagedBuf, v: PagedBuf, offs: Vec<usize>, window: usize },
}

impl std::fmt::Debug for Moments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Moments::Resident { .. } => f.write_str("Resident"),
            Moments::Paged { offs, window, .. } => write!(f, "Paged {{ elems: {}, window: {window} }}", offs.last().unwrap_or(&0)),
        }
    }
}

/// AdamW over a fixed list of fp32 tensors, with its state (resident, or
/// in paged memory: [`AdamW::new_paged`]).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    sizes: Vec<usize>,
    step: u64,
    moments: Moments,
}

impl AdamW {
    /// An optimizer for tensors of `sizes` elements, with zero moments and
    /// step 0 (PyTorch's lazily created initial state).
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Result<AdamW> {
        config.validate()?;
        Ok(AdamW {
            config,
            sizes: sizes.to_vec(),
            step: 0,
            moments: Moments::Resident { m: sizes.iter().map(|&n| vec![0.0; n]).collect(), v: sizes.iter().map(|&n| vec![0.0; n]).collect() },
        })
    }

    /// The same optimizer with its moments in two paged buffers of
    /// `pager` (bitsandbytes' `PagedAdamW32bit`). A step walks the state in
    /// windows of at most a sixteenth of the pager's budget (at least one
    /// paging chunk), prefetching the next window while it updates the
    /// current one, so the resident state stays within the budget; the
    /// arithmetic is [`adamw_update`]'s, so the results are bit-identical
    /// to resident moments whatever the budget.
    pub fn new_paged(config: AdamWConfig, sizes: &[usize], pager: &std::sync::Arc<Pager>) -> Result<AdamW> {
        config.validate()?;
        let mut offs = vec![0usize];
        for &n in sizes {
            offs.push(offs.last().unwrap() + n);
        }
        let total = (*offs.last().unwrap()).max(1);
        let bytes = total.checked_mul(4).ok_or_else(|| err!(InvalidArgument, "optimizer state of {total} floats overflows"))?;
        let budget = pager.config().budget_bytes as usize;
        let window = if budget == 0 { usize::MAX } else { (budget / 16).max(CHUNK_BYTES) / 4 };
        let m = PagedBuf::new(pager, bytes)?;
        let v = PagedBuf::new(pager, bytes)?;
        Ok(AdamW { config, sizes: sizes.to_vec(), step: 0, moments: Moments::Paged { m, v, offs, window } })
    }

    /// True when the moments are in paged memory.
    pub fn is_paged(&self) -> bool {
        matches!(self.moments, Moments::Paged { .. })
    }

    /// Paging counters of the two moment buffers (None when resident).
    pub fn paged_stats(&self) -> Option<(PagedStats, PagedStats)> {
        match &self.moments {
            Moments::Paged { m, v, .. } => Some((m.stats(), v.stats())),
            Moments::Resident { .. } => None,
        }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Replaces the hyperparameters (a scheduler sets `lr` before each
    /// step, as `LambdaLR` sets `param_groups[i]["lr"]`).
    pub fn set_config(&mut self, config: AdamWConfig) -> Result<()> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Sets the learning rate of the next steps.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.set_config(AdamWConfig { lr, ..self.config })
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// First and second moments of tensor `i` (copied).
    pub fn moments(&self, i: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        match &self.moments {
            Moments::Resident { m, v } => Ok((m[i].clone(), v[i].clone())),
            Moments::Paged { m, v, offs, .. } => Ok((m.as_f32(offs[i]..offs[i + 1])?.to_vec(), v.as_f32(offs[i]..offs[i + 1])?.to_vec())),
        }
    }

    /// Replaces the state: `step` steps taken, and `moments[i]` the first
    /// and second moments of tensor `i` (a device trainer hands its state
    /// back this way); paged state is written through its pages.
    pub fn set_state(&mut self, step: u64, moments: Vec<(Vec<f32>, Vec<f32>)>) -> Result<()> {
        if moments.len() != self.sizes.len() {
            bail!(ShapeMismatch, "{} moment pairs for {} tensors", moments.len(), self.sizes.len());
        }
        for (i, ((m, v), &n)) in moments.iter().zip(&self.sizes).enumerate() {
            if m.len() != n || v.len() != n {
                bail!(ShapeMismatch, "moments of tensor {i} have {} and {} values, the tensor {n}", m.len(), v.len());
            }
        }
        match &mut self.moments {
            Moments::Resident { m, v } => {
                (*m, *v) = moments.into_iter().unzip();
            }
            Moments::Paged { m, v, offs, .. } => {
                for (i, (hm, hv)) in moments.iter().enumerate() {
                    m.as_f32_mut(offs[i]..offs[i + 1])?.copy_from_slice(hm);
                    v.as_f32_mut(offs[i]..offs[i + 1])?.copy_from_slice(hv);
                }
            }
        }
        self.step = step;
        Ok(())
    }

    /// One optimizer step: `params[i] -= update(grads[i])` for every tensor.
    ///
    /// Fails, changing nothing, when the counts or lengths do not match the
    /// optimizer's tensors (`InvalidArgument`, `ShapeMismatch`) or when any
    /// gradient element is NaN or infinite (`NonFinite`). With paged
    /// moments, a paging I/O error fails the step part-way (`Io`).
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]]) -> Result<()> {
        check_step_args(&self.sizes, params, grads)?;
        self.step += 1;
        let s = AdamWScalars::new(&self.config, self.step);
        match &mut self.moments {
            Moments::Resident { m, v } => {
                for (((p, g), m), v) in params.iter_mut().zip(grads).zip(m).zip(v) {
                    adamw_update_par(p, g, m, v, &s);
                }
            }
            Moments::Paged { m, v, offs, window } => {
                // Windows over the concatenated state, in order; the next
                // window is prefetched before the current one is updated.
                let mut wins: Vec<(usize, usize, usize)> = Vec::new(); // (tensor, start, end) within the tensor
                for (i, &n) in self.sizes.iter().enumerate() {
                    let mut a = 0;
                    while a < n {
                        let b = (a + *window).min(n);
                        wins.push((i, a, b));
                        a = b;
                    }
                }
                for (k, &(i, a, b)) in wins.iter().enumerate() {
                    if let Some(&(j, c, d)) = wins.get(k + 1) {
                        m.prefetch(4 * (offs[j] + c)..4 * (offs[j] + d))?;
                        v.prefetch(4 * (offs[j] + c)..4 * (offs[j] + d))?;
                    }
                    let mm = m.as_f32_mut(offs[i] + a..offs[i] + b)?;
                    let vv = v.as_f32_mut(offs[i] + a..offs[i] + b)?;
                    adamw_update_par(&mut params[i][a..b], &grads[i][a..b], mm, vv, &s);
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors: `"{names[i]}.exp_avg"`,
    /// `"{names[i]}.exp_avg_sq"` (F32 `[numel]`) and `"step"` (I64 `[]`).
    pub fn export_state(&self, names: &[&str]) -> Result<Vec<StateTensor>> {
        check_names(names, self.sizes.len())?;
        let mut out = Vec::with_capacity(2 * names.len() + 1);
        for (i, n) in names.iter().enumerate() {
            let (m, v) = self.moments(i)?;
            out.push(StateTensor::f32(format!("{n}.exp_avg"), m));
            out.push(StateTensor::f32(format!("{n}.exp_avg_sq"), v));
        }
        out.push(StateTensor::step(self.step));
        Ok(out)
    }

    /// Restores a state exported by [`AdamW::export_state`] (extra tensors
    /// are ignored). All or nothing: on error the optimizer is unchanged.
    pub fn import_state(&mut self, names: &[&str], tensors: &[StateTensor]) -> Result<()> {
        check_names(names, self.sizes.len())?;
        let look = Lookup::new(tensors)?;
        let step = look.step()?;
        let mut mv = Vec::with_capacity(names.len());
        for (n, &len) in names.iter().zip(&self.sizes) {
            mv.push((look.f32(&format!("{n}.exp_avg"), len)?, look.f32(&format!("{n}.exp_avg_sq"), len)?));
        }
        match &mut self.moments {
            Moments::Resident { m, v } => {
                *m = mv.iter().map(|(a, _)| a.to_vec()).collect();
                *v = mv.iter().map(|(_, b)| b.to_vec()).collect();
            }
            Moments::Paged { m, v, offs, .. } => {
                for (i, (a, b)) in mv.iter().enumerate() {
                    m.as_f32_mut(offs[i]..offs[i + 1])?.copy_from_slice(a);
                    v.as_f32_mut(offs[i]..offs[i + 1])?.copy_from_slice(b);
                }
            }
        }
        self.step = step;
        Ok(())
    }
}
