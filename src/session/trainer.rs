//! The trainer: a model, the adapter being trained, an optimizer and a
//! learning-rate schedule; one [`Trainer::step`] is one optimizer step.
//!
//! A step takes a batch `[B, T]` of token ids and labels (−100 ignored;
//! the labels default to the ids, transformers' causal-LM convention),
//! splits it into micro-batches of `micro_batch` sequences, and accumulates
//! gradients of `Σ_tokens loss / N`, where `N` is the number of counted
//! tokens of the whole step (transformers' `num_items_in_batch`: the loss of
//! an accumulated step equals the loss of the same batch in one piece).
//! Then: the global gradient norm, clipping to `max_grad_norm` if set,
//! AdamW (PyTorch's semantics, or bitsandbytes' 8-bit AdamW) with the
//! schedule's learning rate for this step, and the gradients are cleared.
//!
//! Determinism: dropout masks are named by (adapter seed, micro-batch
//! number), so a run resumed from a checkpoint continues bit for bit.

use crate::model::{peft, MemStats, Model};
use crate::model::generate::{Request, Sampling};
use crate::model::gpu::{Compute, DeviceModel};

use crate::optim::adamw::AdamWConfig;
use crate::optim::Optimizer;
use crate::optim::schedule::Schedule;
use crate::memory::{PagedStats, Pager};
use crate::Result;
use crate::backend::cpu::on_pool;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

pub use crate::optim::OptimKind;

#[derive(Clone, Debug)]
pub struct TrainerConfig {
    pub adamw: AdamWConfig,
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Sequences per micro-batch (0: the whole batch at once).
    pub micro_batch: usize,
    /// Recompute each layer during the backward instead of keeping its
    /// activations.
    pub checkpointing: bool,
    pub optimizer: OptimKind,
    /// Keep AdamW's moments in paged memory (QLoRA's paged optimizer);
    /// needs a pager ([`Trainer::with_pager`]).
    pub paged: bool,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig { adamw: AdamWConfig::default(), schedule: Schedule::Constant, max_grad_norm: 1.0, micro_batch: 0, checkpointing: false, optimizer: OptimKind::AdamW, paged: false }
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepResult {
    /// Mean loss over the step's counted tokens (before the update).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Steps completed, this one included.
    pub step: u64,
    /// Tokens processed (B·T) and counted (labels ≠ −100, after the shift).
    pub tokens: u64,
    pub counted_tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

pub struct Trainer {
    pub model: Arc<Mutex<Model>>,
    pub adapter: String,
    pub cfg: TrainerConfig,
    opt: Optimizer,
    step: u64,
    micro_calls: u64,
    /// Steps run on the model's device copy ([`Trainer::use_device`]),
    /// which holds this adapter's gradients and AdamW state meanwhile.
    on_device: bool,
}

/// The newest complete checkpoint set aside as `.NAME.old.PID` beside
/// `dir` by a save that did not finish.
fn set_aside(dir: &Path) -> Option<std::path::PathBuf> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let prefix = format!(".{}.old.", dir.file_name()?.to_string_lossy());
    std::fs::read_dir(parent)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix) && e.path().join("trainer_state.json").is_file())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

impl Trainer {
    /// A trainer for adapter `adapter` of `model`: it becomes the only
    /// active adapter (multiplier 1). `cfg.paged` needs [`Trainer::with_pager`].
    pub fn new(model: Arc<Mutex<Model>>, adapter: &str, cfg: TrainerConfig) -> Result<Trainer> {
        Self::with_pager(model, adapter, cfg, None)
    }

    /// [`Trainer::new`] with the pager that holds paged optimizer state.
    pub fn with_pager(model: Arc<Mutex<Model>>, adapter: &str, cfg: TrainerConfig, pager: Option<&Arc<Pager>>) -> Result<Trainer> {
        cfg.adamw.validate()?;
        if !(cfg.max_grad_norm.is_finite() && cfg.max_grad_norm >= 0.0) {
            bail!(InvalidArgument, "max_grad_norm {} must be finite and ≥ 0", cfg.max_grad_norm);
        }
        let sizes = {
            let mut m = model.lock();
            if m.is_merged() {
                bail!(InvalidState, "the model is merged; unmerge it before training");
            }
            let sizes = m.adapter_sizes(adapter)?;
            m.set_active(&[(adapter, 1.0)])?;
            sizes
        };
        let pager = if cfg.paged { Some(pager.ok_or_else(|| err!(InvalidArgument, "paged optimizer state needs a pager"))?) } else { None };
        let opt = Optimizer::new(cfg.optimizer, cfg.adamw, &sizes, pager)?;
        Ok(Trainer { model, adapter: adapter.to_string(), cfg, opt, step: 0, micro_calls: 0, on_device: false })
    }

    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Sets the micro-batch size (0: the whole batch) and activation
    /// checkpointing from the next step on: the memory a step needs, not
    /// what it computes (the gradient is the same mean over the step's
    /// tokens; checkpointing recomputes the same values). Say after a step
    /// failed with `OutOfMemory` on a device, which applied nothing.
    pub fn set_batching(&mut self, micro_batch: usize, checkpointing: bool) {
        self.cfg.micro_batch = micro_batch;
        self.cfg.checkpointing = checkpointing;
    }

    /// The micro-batch size (0: the whole batch) and whether activation
    /// checkpointing is on.
    pub fn batching(&self) -> (usize, bool) {
        (self.cfg.micro_batch, self.cfg.checkpointing)
    }

    /// Optimizer state bytes.
    pub fn optimizer_bytes(&self) -> usize {
        self.opt.state_bytes()
    }

    /// Paging counters of the optimizer state (first and second moments),
    /// when it is paged.
    pub fn paged_stats(&self) -> Option<(PagedStats, PagedStats)> {
        self.opt.paged_stats()
    }

    /// Memory by category, optimizer state included.
    pub fn memory(&self) -> MemStats {
        let mut m = self.model.lock().memory();
        m.optimizer = self.opt.state_bytes();
        m.peak += m.optimizer;
        m
    }

    /// One optimizer step (module doc). `progress(done, total)` is called
    /// after each micro-batch; returning false cancels the step before the
    /// update (gradients are cleared, weights and optimizer untouched).
    pub fn step(&mut self, ids: &[i32], labels: Option<&[i32]>, batch: usize, seq: usize, progress: &mut dyn FnMut(usize, usize) -> bool) -> Result<StepResult> {
        let t0 = Instant::now();
        if batch == 0 || seq < 2 {
            bail!(InvalidShape, "a training batch needs at least 1 sequence of at least 2 tokens, got {batch} × {seq}");
        }
        let n = batch.checked_mul(seq).ok_or_else(|| err!(InvalidShape, "batch {batch} × {seq} overflows"))?;
        if ids.len() != n {
            bail!(ShapeMismatch, "{} token ids for a batch of {batch} × {seq}", ids.len());
        }
        let labels = labels.unwrap_or(ids);
        if labels.len() != n {
            bail!(ShapeMismatch, "{} labels for a batch of {batch} × {seq}", labels.len());
        }
        let total = crate::backend::cpu::loss::count_labels(&crate::model::shifted_targets(labels, batch, seq));
        if total == 0 {
            bail!(InvalidArgument, "no position of the batch has a label (all −100 after the causal shift)");
        }
        let mb = if self.cfg.micro_batch == 0 { batch } else { self.cfg.micro_batch.min(batch) };
        let n_micro = batch.div_ceil(mb);
        let lr = self.cfg.schedule.lr_at(self.cfg.adamw.lr, self.step);
        let grad_scale = (1.0 / total as f64) as f32;
        let mut model = self.model.lock();
        if model.is_merged() {
            bail!(InvalidState, "the model is merged; unmerge it before training");
        }
        if model.active().len() != 1 || model.active()[0].0 != self.adapter || model.active()[0].1 != 1.0 {
            bail!(InvalidState, "the trainer's adapter '{}' is not the model's only active adapter (multiplier 1): swap it back in before training", self.adapter);
        }
        model.check_ids(ids)?;
        if self.on_device {
            crate::model::check_labels(labels, model.vocab())?;
            if model.device().is_none() {
                bail!(InvalidState, "the trainer trains on a device but the model is no longer on one");
            }
            let (adapter, cfg, calls) = (self.adapter.clone(), self.cfg.clone(), self.micro_calls);
            // An error before the update leaves nothing applied (the
            // gradients so far are cleared); out of device memory, it says
            // so and what the caller can change.
            let not_applied = |e: crate::Error| match e.kind {
                crate::ErrorKind::OutOfMemory => e.context(&format!(
                    "the device ran out of memory in a training step of {batch} x {seq} tokens (micro-batches of {mb}{}); the step was not applied \
                     (adapter, optimizer state and step count unchanged): smaller micro-batches, activation checkpointing or shorter sequences need less",
                    if cfg.checkpointing { ", checkpointing on" } else { "" }
                )),
                _ => e,
            };
            let r = model.with_device(|g, m| {
                let mut outs = Vec::with_capacity(n_micro);
                let run = (|| -> Result<crate::model::gpu::DeviceStep> {
                    for (i, b0) in (0..batch).step_by(mb).enumerate() {
                        let b1 = (b0 + mb).min(batch);
                        // Micro-batch numbers name the dropout masks, as on the CPU.
                        outs.push(g.forward_backward(&adapter, &ids[b0 * seq..b1 * seq], &labels[b0 * seq..b1 * seq], b1 - b0, seq, grad_scale, cfg.checkpointing, calls + i as u64 + 1)?);
                        if !progress(i + 1, n_micro) {
                            bail!(Cancelled, "training step cancelled by the progress callback after micro-batch {}", i + 1);
                        }
                    }
                    // Out of memory only before the update: after it, a
                    // memset and the bf16 copy's refresh in its own buffer
                    // allocate nothing.
                    g.finish_step(&adapter, &outs, cfg.max_grad_norm, &cfg.adamw, lr)
                })();
                let r = match run {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = g.zero_grad(&adapter);
                        return Err(not_applied(e));
                    }
                };
                g.push_adapter_to(&adapter, m)?;
                Ok(r)
            })?;
            drop(model);
            return Ok(self.finish(n_micro, r.loss_sum / total as f64, r.grad_norm as f64, lr, n, total, t0));
        }
        let mut loss_sum = 0f64;
        let result = (|| -> Result<()> {
            for (i, b0) in (0..batch).step_by(mb).enumerate() {
                let b1 = (b0 + mb).min(batch);
                let (m, call, ckpt) = (&mut *model, self.micro_calls + i as u64 + 1, self.cfg.checkpointing);
                let r = on_pool(|| m.forward_backward(&ids[b0 * seq..b1 * seq], &labels[b0 * seq..b1 * seq], b1 - b0, seq, grad_scale, call, ckpt))?;
                loss_sum += r.loss_sum;
                if !progress(i + 1, n_micro) {
                    bail!(Cancelled, "training step cancelled by the progress callback after micro-batch {}", i + 1);
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            model.zero_grad();
            return Err(e);
        }
        let loss = loss_sum / total as f64;
        let name = self.adapter.clone();
        let (max_norm, opt, m) = (self.cfg.max_grad_norm, &mut self.opt, &mut *model);
        let grad_norm = on_pool(|| Self::clip_and_update(m, opt, &name, loss, max_norm, lr))?;
        drop(model);
        Ok(self.finish(n_micro, loss, grad_norm as f64, lr, n, total, t0))
    }

    /// The CPU step's end: refuses non-finite gradients (clearing them),
    /// clips, and applies the optimizer; returns the gradient norm.
    fn clip_and_update(model: &mut Model, opt: &mut Optimizer, name: &str, loss: f64, max_norm: f64, lr: f64) -> Result<f32> {
        let grad_norm = {
            let (_, grads) = model.adapter_params(name)?;
            if let Err(e) = crate::optim::clip::check_finite(Some(loss as f32), &grads) {
                drop(grads);
                model.zero_grad();
                return Err(e);
            }
            drop(grads);
            let mut gm = model.adapter_grads_mut(name)?;
            if max_norm > 0.0 {
                crate::optim::clip::clip_grad_norm(&mut gm, max_norm)?
            } else {
                let g: Vec<&[f32]> = gm.iter().map(|g| &**g).collect();
                crate::optim::clip::grad_norm(&g)
            }
        };
        opt.set_lr(lr)?;
        {
            let (mut params, grads) = model.adapter_params(name)?;
            opt.step(&mut params, &grads)?;
        }
        model.zero_grad();
        Ok(grad_norm)
    }

    /// Counts a finished step and describes it.
    #[allow(clippy::too_many_arguments)]
    fn finish(&mut self, n_micro: usize, loss: f64, grad_norm: f64, lr: f64, n: usize, total: usize, t0: Instant) -> StepResult {
        self.micro_calls += n_micro as u64;
        self.step += 1;
        let secs = t0.elapsed().as_secs_f64();
        StepResult {
            loss,
            grad_norm,
            lr,
            step: self.step,
            tokens: n as u64,
            counted_tokens: total as u64,
            seconds: secs,
            tokens_per_s: if secs > 0.0 { n as f64 / secs } else { 0.0 },
        }
    }

    fn state_json(&self, seed: u64) -> Value {
        let (sched, warm, tot, cyc) = match self.cfg.schedule {
            Schedule::Constant => ("constant", 0, 0, 0.0),
            Schedule::ConstantWithWarmup { warmup_steps } => ("constant_with_warmup", warmup_steps, 0, 0.0),
            Schedule::Linear { warmup_steps, total_steps } => ("linear", warmup_steps, total_steps, 0.0),
            Schedule::Cosine { warmup_steps, total_steps, num_cycles } => ("cosine", warmup_steps, total_steps, num_cycles),
        };
        let a = self.cfg.adamw;
        json!({
            "format": "liblora-trainer-state",
            "version": 1,
            "adapter": self.adapter,
            "step": self.step,
            "micro_calls": self.micro_calls,
            "model_seed": seed.to_string(),
            "optimizer": match self.cfg.optimizer { OptimKind::AdamW => "adamw", OptimKind::AdamW8bit => "adamw_8bit" },
            "lr": a.lr, "beta1": a.beta1, "beta2": a.beta2, "eps": a.eps, "weight_decay": a.weight_decay,
            "schedule": sched, "warmup_steps": warm, "total_steps": tot, "num_cycles": cyc,
            "max_grad_norm": self.cfg.max_grad_norm,
            "micro_batch": self.cfg.micro_batch,
            "checkpointing": self.cfg.checkpointing,
            "paged": self.cfg.paged,
        })
    }

    /// Moves training to CUDA device `ordinal` with `compute` precision
    /// (`Some`), or back to the CPU (`None`). The model goes to that
    /// device first if it is not there ([`Model::use_device`]; a copy made
    /// this way is taken off again when the last trainer on it leaves or
    /// is dropped). On failure the trainer is on the CPU, its state intact
    /// (unless the copy back from the device failed: the error says so).
    /// The adapter's AdamW state moves with the trainer, so steps continue
    /// where they were (on the device it lives in device memory, or in CUDA
    /// managed memory when the trainer's state is paged). A device needs
    /// fp32 AdamW (8-bit AdamW is a CPU feature for now: `Unsupported`);
    /// LoRA dropout draws the CPU's masks there, so a run continues alike on
    /// either.
    pub fn use_device(&mut self, device: Option<(usize, Compute)>) -> Result<()> {
        let mut model = self.model.lock();
        let leave = |model: &mut Model| {
            // The last trainer to leave takes off a copy trainers made.
            if model.device().is_some_and(|g| g.by_trainer && g.training().is_empty()) {
                let _ = model.place_on(None);
            }
        };
        if std::mem::take(&mut self.on_device) {
            // The state comes back first (the host model's adapter is
            // current after every step). No sync needed: the device frees
            // this trainer's state even when the copy back fails.
            if let Some(g) = model.gpu.0.as_deref_mut() {
                match g.train_end(&self.adapter) {
                    Ok((steps, moments)) => {
                        if let Optimizer::AdamW(opt) = &mut self.opt {
                            opt.set_state(steps, moments)?;
                        }
                    }
                    Err(e) => {
                        leave(&mut model);
                        return Err(e.context("copying the trainer's AdamW state back from the device failed: the trainer is on the CPU with the state it had before it went there"));
                    }
                }
            }
        }
        let Some((ordinal, compute)) = device else {
            leave(&mut model);
            return Ok(());
        };
        let Optimizer::AdamW(opt) = &self.opt else {
            leave(&mut model);
            bail!(Unsupported, "training on a GPU needs the fp32 AdamW optimizer; 8-bit AdamW runs on the CPU only");
        };
        let had = model.device().is_some();
        if let Err(e) = model.place_on(Some((ordinal, compute))) {
            leave(&mut model);
            return Err(e);
        }
        if let Some(g) = model.gpu.0.as_deref_mut() {
            g.by_trainer |= !had;
        }
        let moments = (0..opt.sizes().len()).map(|i| opt.moments(i)).collect::<Result<Vec<_>>>()?;
        let (adapter, steps, paged) = (self.adapter.clone(), opt.step_count(), self.cfg.paged);
        if let Err(e) = model.with_device(|g, m| g.train_begin(m, &adapter, steps, &moments, paged)) {
            leave(&mut model);
            return Err(e);
        }
        self.on_device = true;
        Ok(())
    }

    /// Runs `f` on the model's device copy, when training runs on a device.
    fn on_device_model<R>(&self, f: impl FnOnce(&mut DeviceModel) -> R) -> Option<R> {
        if !self.on_device {
            return None;
        }
        let mut m = self.model.lock();
        m.gpu.0.as_deref_mut().map(f)
    }

    /// The per-category device time of the steps since profiling was last
    /// turned on (see [`DeviceModel::set_profiling`]), then turns profiling
    /// on or off as `on` says (`None`: unchanged); `None` on the CPU.
    pub fn device_profile(&self, on: Option<bool>) -> Option<Vec<(&'static str, f64, u64)>> {
        self.on_device_model(|g| {
            let p = g.profile();
            if let Some(on) = on {
                g.set_profiling(on);
            }
            p
        })?
    }

    /// Tensor-core attention on the device (see
    /// [`DeviceModel::set_tensor_core_attention`]); `InvalidState` on the CPU.
    pub fn set_tensor_core_attention(&mut self, on: bool) -> Result<()> {
        self.on_device_model(|g| g.set_tensor_core_attention(on)).unwrap_or_else(|| Err(err!(InvalidState, "the trainer runs on the CPU; tensor-core attention is a device option")))
    }

    /// Generates up to `max_new` tokens for each prompt with this trainer's
    /// adapter (multiplier 1, no per-sequence adapters; the model must be
    /// unmerged), with [`Model::generate`]: on the device when the model
    /// is on one. A sequence stops at a `stop` id (included).
    pub fn generate(&mut self, prompts: &[&[i32]], max_new: usize, s: &Sampling, stop: &[i32], progress: &mut dyn FnMut(usize, usize) -> bool) -> Result<Vec<Vec<i32>>> {
        let mut m = self.model.lock();
        let ai = m.adapter_index(&self.adapter)? as i32;
        let reqs: Vec<Request<'_>> = prompts.iter().map(|p| Request { prompt: p, adapter: Some(ai) }).collect();
        m.generate(&reqs, max_new, s, stop, progress)
    }

    /// The logits after the last token of `ids` with this trainer's adapter
    /// (on the device when the model is on one).
    pub fn last_logits(&mut self, ids: &[i32]) -> Result<Vec<f32>> {
        let mut m = self.model.lock();
        let ai = m.adapter_index(&self.adapter)? as i32;
        let v = m.vocab();
        let all = m.logits(ids, 1, ids.len(), Some(&[ai]))?;
        Ok(all[all.len() - v..].to_vec())
    }

    /// The adapter products on the crate's LoRA kernels instead of cuBLAS
    /// (see [`DeviceModel::set_lora_kernels`]); `InvalidState` on the CPU.
    pub fn set_lora_kernels(&mut self, on: bool) -> Result<()> {
        self.on_device_model(|g| g.set_lora_kernels(on)).ok_or_else(|| err!(InvalidState, "the trainer runs on the CPU; the LoRA kernels are a device option"))
    }

    /// Runs `f` on the model's device copy (for its options:
    /// [`DeviceModel::set_head_chunk_elems`] and the like) when training
    /// runs on a device.
    pub fn with_device_model<R>(&mut self, f: impl FnOnce(&mut DeviceModel) -> R) -> Option<R> {
        self.on_device_model(f)
    }

    /// The device training runs on, if any.
    pub fn device(&self) -> Option<String> {
        self.on_device_model(|g| g.device().describe())
    }

    /// Saves a training checkpoint to directory `dir`: the adapter in
    /// PEFT's format, the optimizer state, and the step counters and
    /// configuration. Written into a fresh temporary directory beside
    /// `dir` (every file fsynced), then renamed into place: a process
    /// killed mid-save leaves either the previous checkpoint or the new
    /// one, never a mixture.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let model = self.model.lock();
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let fname = dir.file_name().ok_or_else(|| err!(InvalidArgument, "'{}' names no directory", dir.display()))?.to_string_lossy().to_string();
        let tmp = parent.join(format!(".{fname}.tmp.{}", std::process::id()));
        // Temporary directories of saves that were killed are incomplete
        // and never loaded; remove them.
        if let Ok(rd) = std::fs::read_dir(&parent) {
            let pre = format!(".{fname}.tmp.");
            for e in rd.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with(&pre)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        std::fs::create_dir_all(&tmp).map_err(|e| err!(Io, "{}: cannot create: {e}", tmp.display()))?;
        let res = (|| -> Result<()> {
            peft::save_adapter(&model, &self.adapter, &tmp)?;
            let keys = model.adapter_keys(&self.adapter)?;
            let names: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
            let state = match model.device().filter(|_| self.on_device) {
                Some(g) => {
                    let (steps, moments) = g.moments(&self.adapter)?;
                    let mut a = crate::optim::AdamW::new(self.cfg.adamw, self.opt.sizes())?;
                    a.set_state(steps, moments)?;
                    a.export_state(&names)?
                }
                None => self.opt.export_state(&names)?,
            };
            crate::optim::state::save(&tmp.join("optimizer.safetensors"), &state, &Default::default())?;
            let text = serde_json::to_string_pretty(&self.state_json(model.seed)).map_err(|e| err!(Internal, "{e}"))?;
            crate::io::safetensors::write_file_atomic(&tmp.join("trainer_state.json"), text.as_bytes())?;
            // Swap into place: old → aside, new → dir, old removed.
            let old = parent.join(format!(".{fname}.old.{}", std::process::id()));
            let had_old = dir.exists();
            if had_old {
                std::fs::rename(dir, &old).map_err(|e| err!(Io, "{}: cannot move aside: {e}", dir.display()))?;
            }
            if let Err(e) = std::fs::rename(&tmp, dir) {
                if had_old {
                    let _ = std::fs::rename(&old, dir);
                }
                bail!(Io, "{}: cannot rename into place: {e}", dir.display());
            }
            if let Ok(d) = std::fs::File::open(&parent) {
                let _ = d.sync_all();
            }
            if had_old {
                let _ = std::fs::remove_dir_all(&old);
            }
            // Leftovers of earlier interrupted saves (any process).
            while let Some(stale) = set_aside(dir) {
                if std::fs::remove_dir_all(&stale).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        res
    }

    /// Resumes from a checkpoint written by [`save`](Self::save): the
    /// adapter is created (or its weights replaced) from the checkpoint,
    /// the optimizer state, step counters and configuration restored.
    pub fn resume(model: Arc<Mutex<Model>>, dir: &Path) -> Result<Trainer> {
        Self::resume_with_pager(model, dir, None)
    }

    /// [`Trainer::resume`]; a checkpoint of a paged run keeps its state
    /// paged when `pager` is given (else it is resumed resident, with the
    /// same numbers).
    pub fn resume_with_pager(model: Arc<Mutex<Model>>, dir: &Path, pager: Option<&Arc<Pager>>) -> Result<Trainer> {
        let found;
        let dir = if dir.join("trainer_state.json").is_file() {
            dir
        } else {
            // A save killed between its two renames leaves the previous
            // checkpoint complete under `.NAME.old.PID`: use it.
            found = set_aside(dir).ok_or_else(|| err!(Io, "{}: no checkpoint here (no trainer_state.json)", dir.display()))?;
            crate::log!(Warn, "{}: using the previous checkpoint {} left by an interrupted save", dir.display(), found.display());
            found.as_path()
        };
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| err!(Io, "{}: cannot read: {e}", sp.display()))?;
        let j: Value = serde_json::from_str(&text).map_err(|e| err!(FileFormat, "{}: not JSON: {e}", sp.display()))?;
        if j.get("format").and_then(|v| v.as_str()) != Some("liblora-trainer-state") || j.get("version").and_then(|v| v.as_u64()) != Some(1) {
            bail!(FileFormat, "{}: not a liblora trainer state (version 1)", sp.display());
        }
        let f = |k: &str| j.get(k).and_then(|v| v.as_f64()).ok_or_else(|| err!(FileFormat, "{}: no number '{k}'", sp.display()));
        let u = |k: &str| j.get(k).and_then(|v| v.as_u64()).ok_or_else(|| err!(FileFormat, "{}: no integer '{k}'", sp.display()));
        let adapter = j.get("adapter").and_then(|v| v.as_str()).ok_or_else(|| err!(FileFormat, "{}: no adapter name", sp.display()))?.to_string();
        let schedule = match j.get("schedule").and_then(|v| v.as_str()).unwrap_or("") {
            "constant" => Schedule::Constant,
            "constant_with_warmup" => Schedule::ConstantWithWarmup { warmup_steps: u("warmup_steps")? },
            "linear" => Schedule::Linear { warmup_steps: u("warmup_steps")?, total_steps: u("total_steps")? },
            "cosine" => Schedule::Cosine { warmup_steps: u("warmup_steps")?, total_steps: u("total_steps")?, num_cycles: f("num_cycles")? },
            s => bail!(FileFormat, "{}: unknown schedule '{s}'", sp.display()),
        };
        let optimizer = match j.get("optimizer").and_then(|v| v.as_str()).unwrap_or("") {
            "adamw" => OptimKind::AdamW,
            "adamw_8bit" => OptimKind::AdamW8bit,
            s => bail!(FileFormat, "{}: unknown optimizer '{s}'", sp.display()),
        };
        let cfg = TrainerConfig {
            adamw: AdamWConfig { lr: f("lr")?, beta1: f("beta1")?, beta2: f("beta2")?, eps: f("eps")?, weight_decay: f("weight_decay")? },
            schedule,
            max_grad_norm: f("max_grad_norm")?,
            micro_batch: u("micro_batch")? as usize,
            checkpointing: j.get("checkpointing").and_then(|v| v.as_bool()).unwrap_or(false),
            optimizer,
            paged: pager.is_some() && j.get("paged").and_then(|v| v.as_bool()).unwrap_or(false),
        };
        {
            let mut m = model.lock();
            let seed: u64 = j.get("model_seed").and_then(|v| v.as_str()).and_then(|s| s.parse().ok()).unwrap_or(m.seed);
            if seed != m.seed {
                crate::log!(Warn, "resuming with model seed {} but the checkpoint was trained with {seed}: dropout masks will differ", m.seed);
            }
            if m.adapter_index(&adapter).is_ok() {
                let tmp = format!("{adapter}.resume");
                peft::load_adapter(&mut m, dir, &tmp)?;
                let res = m.copy_adapter_weights(&tmp, &adapter);
                m.remove_adapter(&tmp)?;
                res?;
            } else {
                peft::load_adapter(&mut m, dir, &adapter)?;
            }
        }
        let mut tr = Trainer::with_pager(model, &adapter, cfg, pager)?;
        let keys = tr.model.lock().adapter_keys(&adapter)?;
        let names: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
        let state = crate::optim::state::load(&dir.join("optimizer.safetensors"))?;
        tr.opt.import_state(&names, &state)?;
        tr.step = u("step")?;
        tr.micro_calls = u("micro_calls")?;
        Ok(tr)
    }
}

impl Drop for Trainer {
    /// A trainer on a device leaves it (its gradients and moments there are
    /// freed; the model leaves too if trainers put it there and none is
    /// left). This locks the model: do not drop a trainer while holding its
    /// model's lock.
    fn drop(&mut self) {
        if self.on_device {
            let _ = self.use_device(None);
        }
    }
}
