//! `lora_model`: a Hugging Face LLaMA-family model with LoRA adapters
//! (`lora_model_load`, `lora_create`, `lora_merge`, `lora_swap_adapter`,
//! generation, PEFT adapter files), and `lora_trainer` (`lora_train_step`).

use super::context::lora_context;
use super::util::{self, guard, handle, read_params, req, req_out, req_path, req_str, Handle};
use super::*;
use crate::error::Result;
use crate::lora::Init;
use crate::model::generate::{Request, Sampling};
use crate::model::peft::{self, AdapterSpec};
use crate::model::{LoadOptions, Model};
use crate::optim::adamw::AdamWConfig;
use crate::optim::schedule::Schedule;
use crate::quant::nf4::Nf4Params;
use crate::session::trainer::{OptimKind, Trainer, TrainerConfig};
use parking_lot::Mutex;
use std::ffi::{c_char, c_void};
use std::sync::Arc;

/// A progress callback: `done` of `total` units of the current call are
/// finished (layers loaded, micro-batches of a step, tokens generated).
/// Return 0 to continue, non-zero to cancel (the call then fails with
/// `LORA_ERR_CANCELLED`). Called on the calling thread; it must not call
/// liblora functions on the same model.
pub type lora_progress_fn = Option<unsafe extern "C" fn(user: *mut c_void, done: u64, total: u64) -> i32>;

/// How `lora_model_load` stores the linear layers (`LORA_QUANT_*`).
pub type lora_quant = u32;
/// Keep the checkpoint's weights (as fp32).
pub const LORA_QUANT_NONE: lora_quant = 0;
/// Quantize every linear layer but `lm_head` to NF4 (QLoRA), bit-exact
/// with bitsandbytes. A checkpoint that is already bitsandbytes 4-bit is
/// loaded as stored, whatever this field says.
pub const LORA_QUANT_NF4: lora_quant = 1;

/// Options of `lora_model_load`. Initialize with
/// `lora_model_default_params()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_model_params {
    /// `sizeof(lora_model_params)`, set by the defaults function.
    pub struct_size: u32,
    /// `LORA_QUANT_*`; default `LORA_QUANT_NONE`.
    pub quantize: lora_quant,
    /// NF4 blocksize (power of two, 32…4096); default 64.
    pub blocksize: u32,
    /// Non-zero: double-quantize the NF4 block scales; default 1.
    pub double_quant: u32,
    /// Called after each decoder layer is loaded; may be NULL.
    pub progress: lora_progress_fn,
    pub progress_user: *mut c_void,
}

/// A model: frozen base weights (fp32 or NF4), adapters, and what
/// generation and training need. Functions on one model serialize on an
/// internal lock, so calls from several threads are safe but do not run
/// in parallel. A trainer keeps the model's data alive: freeing the model
/// handle while a trainer uses it is allowed.
pub struct lora_model {
    tag: u64,
    inner: Arc<Mutex<Model>>,
    pool: Arc<rayon::ThreadPool>,
    pager: Arc<crate::memory::Pager>,
}

impl Handle for lora_model {
    const TAG: u64 = 0x6c6f_7261_6d6f_646c; // "loramodl"
    fn tag(&self) -> u64 {
        self.tag
    }
}

/// Facts about a loaded model.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct lora_model_info {
    pub n_layers: u32,
    pub hidden_size: u32,
    pub intermediate_size: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub vocab_size: u32,
    pub max_position_embeddings: u32,
    /// 1 when the linear layers are NF4.
    pub quantized: u32,
    /// NF4 blocksize, or 0.
    pub blocksize: u32,
    /// 1 when lm_head is tied to the embedding.
    pub tied_embeddings: u32,
    /// 1 while adapters are merged.
    pub merged: u32,
    pub n_adapters: u32,
    /// BOS / first EOS token id from config.json, or -1.
    pub bos_token_id: i64,
    pub eos_token_id: i64,
}

/// Options of `lora_create`. Initialize with `lora_create_default_params()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_create_params {
    /// `sizeof(lora_create_params)`, set by the defaults function.
    pub struct_size: u32,
    /// Rank; default 8.
    pub r: u32,
    /// scale = alpha / r (alpha / √r with use_rslora); default 16.
    pub alpha: f32,
    /// Dropout on each adapter's input while training, [0, 1); default 0.
    pub dropout: f32,
    /// Non-zero: rsLoRA scaling; default 0.
    pub use_rslora: u32,
    /// `LORA_INIT_KAIMING_UNIFORM` (default) or `LORA_INIT_GAUSSIAN`.
    pub init: super::layer::lora_init,
    /// Target modules: `"all-linear"` (default, also when NULL: every
    /// linear layer but lm_head, PEFT's meaning), a comma-separated list of
    /// names matched as PEFT matches a list (`"q_proj,v_proj"`: a module
    /// whose name is or ends with `.q_proj`), or `"re:<regex>"` for PEFT's
    /// string form (the full module name must match).
    pub target_modules: *const c_char,
    /// NULL, or `n_layers_to_transform` layer indices (PEFT
    /// `layers_to_transform`; applies to the list form and all-linear).
    pub layers_to_transform: *const i32,
    pub n_layers_to_transform: usize,
    /// NULL or `"pattern=rank,..."` (PEFT `rank_pattern`: the first pattern
    /// `p` with the module name matching `(.*\.)?(p)$` gives its rank).
    pub rank_pattern: *const c_char,
    /// NULL or `"pattern=alpha,..."` (PEFT `alpha_pattern`).
    pub alpha_pattern: *const c_char,
}

/// Bytes held, by category (`lora_model_memory`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct lora_memory_stats {
    /// Frozen base: embeddings, norms, head, linear weights (NF4 footprint
    /// or fp32), biases, merged copies.
    pub base_weights: u64,
    /// Of which NF4 linear weights, as stored (codes, scales, nested scales).
    pub base_quantized: u64,
    /// Number of weights stored in NF4 (`8·base_quantized/quantized_weights`
    /// is the bits per weight, ≈4.127 with double quantization).
    pub quantized_weights: u64,
    /// Adapter weights and their gradients (fp32).
    pub adapters: u64,
    /// Optimizer state of the trainer passed (0 without one).
    pub optimizer: u64,
    /// Activations kept for the backward at the last training step's peak
    /// (or the last inference call's).
    pub activations: u64,
    /// KV cache of a generation in progress (0 between calls).
    pub kv_cache: u64,
    /// The largest total of the categories observed so far.
    pub peak: u64,
}

fn model_ref<'a>(p: *const lora_model) -> Result<&'a lora_model> {
    handle(p, "model")
}

/// Runs `f` on the locked model inside the context's thread pool (the lock
/// is taken on the pool's thread: guards are not `Send`).
fn with_model<R: Send>(h: &lora_model, f: impl FnOnce(&mut Model) -> R + Send) -> R {
    let inner = h.inner.clone();
    h.pool.install(move || f(&mut inner.lock()))
}

fn progress_fn(f: lora_progress_fn, user: *mut c_void) -> impl FnMut(usize, usize) -> bool {
    let user = user as usize;
    move |done, total| match f {
        // SAFETY: the host's callback with the host's pointer (contract in
        // the header); it returns an int.
        Some(cb) => unsafe { cb(user as *mut c_void, done as u64, total as u64) == 0 },
        None => true,
    }
}

/// Default model-loading parameters: weights as stored, NF4 settings of
/// QLoRA (blocksize 64, double quantization) for when `quantize` is set.
#[no_mangle]
pub extern "C" fn lora_model_default_params() -> lora_model_params {
    lora_model_params {
        struct_size: std::mem::size_of::<lora_model_params>() as u32,
        quantize: LORA_QUANT_NONE,
        blocksize: 64,
        double_quant: 1,
        progress: None,
        progress_user: std::ptr::null_mut(),
    }
}

/// Loads a Hugging Face checkpoint directory (`config.json` and
/// `model.safetensors`, or shards with `model.safetensors.index.json`) of
/// a `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
/// `Qwen3ForCausalLM` (dense Qwen3, with its per-head q/k norms),
/// `GemmaForCausalLM`, `Gemma2ForCausalLM` (soft caps included) or
/// `Gemma3ForCausalLM` (the text-only `gemma3_text`; its local and global
/// ropes), `GraniteForCausalLM` (its four multipliers) or
/// `Phi3ForCausalLM` (fused `qkv_proj` and `gate_up_proj`, which adapters
/// target as such), `Olmo2ForCausalLM` (output norms only, whole-width
/// q/k norms) or `SmolLM3ForCausalLM` (its unrotated layers), rope default, linear, llama3, yarn or longrope (Phi-3.5's and the 128k Phi-3s'; a partial
/// rotation, Phi-4-mini's, in Phi-3's layout only): fp32, fp16 or bf16 weights, or a
/// bitsandbytes NF4 checkpoint saved by transformers (any
/// `bnb_4bit_quant_storage`, with or without double quantization, with
/// `llm_int8_skip_modules`). Safetensors only (`pytorch_model.bin` is
/// refused by name). With `LORA_QUANT_NF4` each linear layer is quantized as it
/// is read, so peak memory stays near the quantized model plus one layer.
/// On the CUDA device (`lora_model_use_device`) every one of these runs,
/// Gemma 2's soft caps and Gemma's head_dim 256 included; a `head_dim`
/// over 256 is refused with `LORA_ERR_UNSUPPORTED` (the model stays usable
/// on the CPU).
/// Files are memory-mapped. Unsupported architectures, config options or
/// unexpected tensors are refused by name (nothing is half-loaded). On
/// success `*out` receives a model the caller frees with
/// `lora_model_free`; on failure `*out` is not written. The model keeps
/// the context's worker threads and pager alive, so it may outlive `ctx`.
/// Thread-safe with respect to other contexts and models; calls on one
/// model serialize (see `lora_model`).
///
/// Errors: `LORA_ERR_NULL_POINTER`, `LORA_ERR_IO` (missing files),
/// `LORA_ERR_FILE_FORMAT`, `LORA_ERR_UNSUPPORTED`, `LORA_ERR_SHAPE_MISMATCH`,
/// `LORA_ERR_TENSOR_NOT_FOUND`, `LORA_ERR_DTYPE_MISMATCH`,
/// `LORA_ERR_NON_FINITE`, `LORA_ERR_INVALID_BLOCKSIZE`,
/// `LORA_ERR_STRUCT_SIZE`, `LORA_ERR_CANCELLED`.
#[no_mangle]
pub unsafe extern "C" fn lora_model_load(ctx: *const lora_context, dir: *const c_char, params: *const lora_model_params, out: *mut *mut lora_model) -> lora_status {
    guard(|| {
        let ctx = handle(ctx, "ctx")?;
        let dir = req_path(dir, "dir")?;
        let out = req_out(out, "out")?;
        let p = read_params(params, lora_model_default_params(), std::mem::size_of::<lora_model_params>(), "lora_model_params")?;
        let quantize = match p.quantize {
            LORA_QUANT_NONE => None,
            LORA_QUANT_NF4 => {
                crate::quant::nf4::check_blocksize(p.blocksize as usize)?;
                Some(Nf4Params { blocksize: p.blocksize as usize, double_quant: p.double_quant != 0 })
            }
            q => crate::bail!(InvalidArgument, "quantize {q} is not a LORA_QUANT_* value"),
        };
        let mut prog = progress_fn(p.progress, p.progress_user);
        let m = ctx.inner.run(|| Model::load(&dir, LoadOptions { quantize, seed: ctx.inner.seed }, &mut prog))?;
        *out = util::into_handle(lora_model { tag: lora_model::TAG, inner: Arc::new(Mutex::new(m)), pool: ctx.inner.pool.clone(), pager: ctx.inner.pager.clone() });
        Ok(())
    })
}

/// Frees a model handle (NULL: no-op). A trainer created on it keeps the
/// model's data alive until the trainer is freed.
#[no_mangle]
pub unsafe extern "C" fn lora_model_free(model: *mut lora_model) {
    util::free_handle(model, |m| m.tag = 0);
}

/// Fills `*info`.
#[no_mangle]
pub unsafe extern "C" fn lora_model_get_info(model: *const lora_model, info: *mut lora_model_info) -> lora_status {
    guard(|| {
        let m = model_ref(model)?.inner.lock();
        let info = req_out(info, "info")?;
        let c = &m.cfg;
        *info = lora_model_info {
            n_layers: c.num_layers as u32,
            hidden_size: c.hidden_size as u32,
            intermediate_size: c.intermediate_size as u32,
            n_heads: c.num_heads as u32,
            n_kv_heads: c.num_kv_heads as u32,
            head_dim: c.head_dim as u32,
            vocab_size: c.vocab_size as u32,
            max_position_embeddings: c.max_position_embeddings.min(u32::MAX as usize) as u32,
            quantized: m.quant.is_some() as u32,
            blocksize: m.quant.map_or(0, |q| q.blocksize as u32),
            tied_embeddings: c.tie_word_embeddings as u32,
            merged: m.is_merged() as u32,
            n_adapters: m.adapters.len() as u32,
            bos_token_id: c.bos_token_id.unwrap_or(-1),
            eos_token_id: c.eos_token_ids.first().copied().unwrap_or(-1),
        };
        Ok(())
    })
}

/// Default adapter parameters: r 8, alpha 16, no dropout, all-linear,
/// kaiming-uniform A and zero B (a fresh adapter changes nothing).
#[no_mangle]
pub extern "C" fn lora_create_default_params() -> lora_create_params {
    lora_create_params {
        struct_size: std::mem::size_of::<lora_create_params>() as u32,
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        use_rslora: 0,
        init: super::layer::LORA_INIT_KAIMING_UNIFORM,
        target_modules: std::ptr::null(),
        layers_to_transform: std::ptr::null(),
        n_layers_to_transform: 0,
        rank_pattern: std::ptr::null(),
        alpha_pattern: std::ptr::null(),
    }
}

fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        req_str(p, what).map(Some)
    }
}

/// Adds adapter `name` to the model's target modules (PEFT
/// `get_peft_model` / `add_adapter`). The first adapter becomes active;
/// later ones are resident until `lora_swap_adapter` activates them.
/// `params` may be NULL for the defaults. The model must be unmerged.
///
/// Errors: `LORA_ERR_INVALID_ARGUMENT` (empty/duplicate name, rank 0 or
/// above max(1024, a module's in + out), alpha ≤ 0, dropout outside [0, 1),
/// targets that match nothing, bad pattern or regex),
/// `LORA_ERR_UNSUPPORTED` (targets such as lm_head or embed_tokens),
/// `LORA_ERR_INVALID_STATE` (merged), `LORA_ERR_STRUCT_SIZE`.
#[no_mangle]
pub unsafe extern "C" fn lora_create(model: *mut lora_model, name: *const c_char, params: *const lora_create_params) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let name = req_str(name, "name")?;
        let p = read_params(params, lora_create_default_params(), std::mem::size_of::<lora_create_params>(), "lora_create_params")?;
        let mut spec = AdapterSpec::new(p.r as usize, p.alpha);
        spec.dropout = p.dropout;
        spec.use_rslora = p.use_rslora != 0;
        spec.init = match p.init {
            super::layer::LORA_INIT_KAIMING_UNIFORM => Init::KaimingUniform,
            super::layer::LORA_INIT_GAUSSIAN => Init::Gaussian,
            i => crate::bail!(InvalidArgument, "init {i} is not LORA_INIT_KAIMING_UNIFORM or LORA_INIT_GAUSSIAN for a model adapter"),
        };
        if let Some(t) = opt_str(p.target_modules, "target_modules")? {
            spec.targets = AdapterSpec::parse_targets(t)?;
        }
        if p.n_layers_to_transform > 0 {
            let ls = req(p.layers_to_transform, "layers_to_transform")?;
            // SAFETY: n_layers_to_transform ints at the pointer (header contract).
            let ls = std::slice::from_raw_parts(ls, p.n_layers_to_transform);
            if let Some(&bad) = ls.iter().find(|&&v| v < 0) {
                crate::bail!(InvalidArgument, "layers_to_transform holds {bad}");
            }
            spec.layers_to_transform = Some(ls.iter().map(|&v| v as usize).collect());
        }
        if let Some(s) = opt_str(p.rank_pattern, "rank_pattern")? {
            spec.rank_pattern = AdapterSpec::parse_pattern(s, "rank_pattern")?;
        }
        if let Some(s) = opt_str(p.alpha_pattern, "alpha_pattern")? {
            spec.alpha_pattern = AdapterSpec::parse_pattern(s, "alpha_pattern")?;
        }
        with_model(h, |m| m.add_adapter(name, spec))
    })
}

/// Trainable (adapter) and total parameter counts, as PEFT counts them.
#[no_mangle]
pub unsafe extern "C" fn lora_model_param_counts(model: *const lora_model, trainable: *mut u64, total: *mut u64) -> lora_status {
    guard(|| {
        let m = model_ref(model)?.inner.lock();
        let (t, a) = m.param_counts();
        *req_out(trainable, "trainable")? = t as u64;
        *req_out(total, "total")? = a as u64;
        Ok(())
    })
}

/// PEFT's `print_trainable_parameters` line, e.g. `trainable params:
/// 4,194,304 || all params: 1,104,242,688 || trainable%: 0.3798`, written
/// to `buf` (NUL-terminated, truncated to `len`); `*needed` (may be NULL)
/// receives its full length without the NUL.
#[no_mangle]
pub unsafe extern "C" fn lora_model_trainable_summary(model: *const lora_model, buf: *mut c_char, len: usize, needed: *mut usize) -> lora_status {
    guard(|| {
        let s = model_ref(model)?.inner.lock().trainable_summary();
        let n = util::write_cstr(&s, buf, len);
        if !needed.is_null() {
            *needed = n;
        }
        Ok(())
    })
}

/// Merges the active adapters into the weights (PEFT `merge_adapter`):
/// later forwards use `W0 + Σ m·s·B·A`. For an NF4 base the merged weight
/// is kept dense (fp32, derived at its first use on the host); the NF4
/// base is kept for an exact unmerge. On a model on a device
/// (`lora_model_use_device`) the merged weights are derived there, in the
/// compute dtype.
///
/// Errors: `LORA_ERR_INVALID_STATE` (already merged, gradients pending),
/// on a device `LORA_ERR_OUT_OF_MEMORY` and `LORA_ERR_CUDA` (the model is
/// then left unmerged).
#[no_mangle]
pub unsafe extern "C" fn lora_merge(model: *mut lora_model) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        with_model(h, |m| m.merge())
    })
}

/// Undoes `lora_merge`, exactly (the base was never modified).
///
/// Errors: `LORA_ERR_INVALID_STATE` (not merged).
#[no_mangle]
pub unsafe extern "C" fn lora_unmerge(model: *mut lora_model) -> lora_status {
    guard(|| model_ref(model)?.inner.lock().unmerge())
}

/// Makes `names[0..n]` with `multipliers` (NULL: all 1.0) the active
/// adapters, merged or not (PEFT `set_adapter`; llama.cpp's adapter
/// scale). `n = 0` leaves only the base. When merged, every merged weight
/// is re-derived from `W0`, so any number of swaps accumulates no error.
///
/// Errors: `LORA_ERR_INVALID_ARGUMENT` (unknown or repeated name,
/// non-finite multiplier), `LORA_ERR_INVALID_STATE` (gradients pending).
#[no_mangle]
pub unsafe extern "C" fn lora_swap_adapter(model: *mut lora_model, names: *const *const c_char, multipliers: *const f32, n: usize) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let mut set = Vec::with_capacity(n);
        if n > 0 {
            let names = std::slice::from_raw_parts(req(names, "names")?, n);
            for (i, &p) in names.iter().enumerate() {
                let m = if multipliers.is_null() { 1.0 } else { *multipliers.add(i) };
                set.push((req_str(p, "names[i]")?, m));
            }
        }
        with_model(h, |m| m.set_active(&set))
    })
}

fn seq_adapters(m: &Model, adapters: *const *const c_char, batch: usize) -> Result<Option<Vec<i32>>> {
    if adapters.is_null() {
        return Ok(None);
    }
    // SAFETY: `batch` pointers (header contract).
    let names = unsafe { std::slice::from_raw_parts(adapters, batch) };
    let mut v = Vec::with_capacity(batch);
    for &p in names {
        if p.is_null() {
            v.push(-1);
        } else {
            v.push(m.adapter_index(req_str(p, "adapters[i]")?)? as i32);
        }
    }
    Ok(Some(v))
}

/// Logits `[batch, seq, vocab]` (fp32) for token ids `[batch, seq]`, with
/// the active adapters, or — when `adapters` is non-NULL — one adapter per
/// sequence (`adapters[b]` a name, or NULL for the base alone; the model
/// must be unmerged). `out_len` is the number of floats at `out`. On the
/// device when the model is on one (`lora_model_use_device`).
///
/// Errors: `LORA_ERR_INVALID_SHAPE`, `LORA_ERR_BUFFER_SIZE`,
/// `LORA_ERR_INVALID_ARGUMENT` (token id outside the vocabulary, unknown
/// adapter), `LORA_ERR_INVALID_STATE` (per-sequence adapters while merged).
#[no_mangle]
pub unsafe extern "C" fn lora_model_logits(model: *mut lora_model, ids: *const i32, batch: usize, seq: usize, adapters: *const *const c_char, out: *mut f32, out_len: usize) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let n = batch.checked_mul(seq).filter(|&n| n > 0).ok_or_else(|| crate::err!(InvalidShape, "batch {batch} × seq {seq} is empty or overflows"))?;
        let ids = std::slice::from_raw_parts(req(ids, "ids")?, n);
        req(out as *const f32, "out")?;
        let vocab = h.inner.lock().vocab();
        let need = n.checked_mul(vocab).ok_or_else(|| crate::err!(InvalidShape, "logits size overflows"))?;
        if out_len != need {
            crate::bail!(BufferSize, "out holds {out_len} floats; [{batch}, {seq}, {vocab}] needs {need}");
        }
        let sa = seq_adapters(&h.inner.lock(), adapters, batch)?;
        let logits = with_model(h, |m| m.logits(ids, batch, seq, sa.as_deref()))?;
        std::ptr::copy_nonoverlapping(logits.as_ptr(), out, need);
        Ok(())
    })
}

/// Mean causal-LM cross-entropy of a batch, as transformers'
/// `model(ids, labels=labels).loss` (labels shifted by one inside; −100
/// ignored; `labels` NULL means the ids). No gradients, no dropout. On the
/// device when the model is on one (the logits stay there).
#[no_mangle]
pub unsafe extern "C" fn lora_model_loss(model: *mut lora_model, ids: *const i32, labels: *const i32, batch: usize, seq: usize, loss: *mut f32) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let n = batch.checked_mul(seq).filter(|&n| n > 0).ok_or_else(|| crate::err!(InvalidShape, "batch {batch} × seq {seq} is empty or overflows"))?;
        let ids = std::slice::from_raw_parts(req(ids, "ids")?, n);
        let labels = if labels.is_null() { ids } else { std::slice::from_raw_parts(labels, n) };
        let out = req_out(loss, "loss")?;
        *out = with_model(h, |m| m.loss(ids, labels, batch, seq))?;
        Ok(())
    })
}

/// Saves adapter `name` to directory `dir` (created if needed) in PEFT's
/// format: `adapter_config.json` and `adapter_model.safetensors`, loadable
/// by `PeftModel.from_pretrained`. Each file is written atomically.
#[no_mangle]
pub unsafe extern "C" fn lora_adapter_save(model: *const lora_model, name: *const c_char, dir: *const c_char) -> lora_status {
    guard(|| {
        let m = model_ref(model)?.inner.lock();
        peft::save_adapter(&m, req_str(name, "name")?, &req_path(dir, "dir")?)
    })
}

/// Loads a PEFT adapter directory (as written by PEFT's `save_pretrained`
/// or `lora_adapter_save`) as adapter `name`. Refused by name: DoRA,
/// bias training, modules_to_save, and other options liblora does not
/// implement. Nothing is added unless every tensor loads.
#[no_mangle]
pub unsafe extern "C" fn lora_adapter_load(model: *mut lora_model, dir: *const c_char, name: *const c_char) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let (dir, name) = (req_path(dir, "dir")?, req_str(name, "name")?);
        with_model(h, |m| peft::load_adapter(m, &dir, name))
    })
}

/// Removes adapter `name` (PEFT `delete_adapter`); refused while merged.
#[no_mangle]
pub unsafe extern "C" fn lora_adapter_remove(model: *mut lora_model, name: *const c_char) -> lora_status {
    guard(|| model_ref(model)?.inner.lock().remove_adapter(req_str(name, "name")?))
}

/// Writes the model with its active adapters merged as a Hugging Face
/// checkpoint directory (`config.json`, `model.safetensors`) that
/// transformers loads as a plain model. Dense weights keep the
/// checkpoint's dtype; an NF4 base is written dequantized.
#[no_mangle]
pub unsafe extern "C" fn lora_model_export_merged(model: *const lora_model, dir: *const c_char) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let dir = req_path(dir, "dir")?;
        with_model(h, |m| m.export_merged(&dir))
    })
}

/// Options of `lora_generate`. Initialize with
/// `lora_generate_default_params()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_generate_params {
    /// `sizeof(lora_generate_params)`, set by the defaults function.
    pub struct_size: u32,
    /// New tokens per sequence at most; default 32.
    pub max_new_tokens: u32,
    /// 0 (default) = greedy; else softmax temperature.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off, default).
    pub top_k: u32,
    /// Nucleus sampling mass in (0, 1]; default 1 (off).
    pub top_p: f32,
    /// Sampling seed; default 0.
    pub seed: u64,
    /// Non-zero: stop a sequence at the config's EOS token(s); default 1.
    pub stop_at_eos: u32,
    /// Called after each generated position; may be NULL.
    pub progress: lora_progress_fn,
    pub progress_user: *mut c_void,
}

/// Default generation options: greedy, 32 tokens, stop at EOS.
#[no_mangle]
pub extern "C" fn lora_generate_default_params() -> lora_generate_params {
    lora_generate_params {
        struct_size: std::mem::size_of::<lora_generate_params>() as u32,
        max_new_tokens: 32,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        stop_at_eos: 1,
        progress: None,
        progress_user: std::ptr::null_mut(),
    }
}

/// Generates for `n_seqs` prompts at once with a KV cache:
/// `prompts[i]` holds `prompt_lens[i]` ids. With `adapters` non-NULL each
/// sequence uses its own adapter (`adapters[i]` a name, or NULL for the
/// base alone): a mixed-adapter batch; otherwise the active adapters
/// (merged or not). New tokens go to `out[i · max_new_tokens + j]`
/// (`out_len ≥ n_seqs · max_new_tokens`), their count to `out_lens[i]`.
/// On the device when the model is on one (`lora_model_use_device`).
///
/// Errors: `LORA_ERR_INVALID_ARGUMENT` (empty prompt, id outside the
/// vocabulary, temperature < 0, top_p outside (0, 1]), `LORA_ERR_BUFFER_SIZE`,
/// `LORA_ERR_INVALID_STATE`, `LORA_ERR_CANCELLED`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lora_generate(
    model: *mut lora_model,
    prompts: *const *const i32,
    prompt_lens: *const usize,
    adapters: *const *const c_char,
    n_seqs: usize,
    params: *const lora_generate_params,
    out: *mut i32,
    out_len: usize,
    out_lens: *mut usize,
) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let (p, maxn) = generate_args(n_seqs, params, out, out_len, out_lens)?;
        let (sa, eos) = {
            let m = h.inner.lock();
            (seq_adapters(&m, adapters, n_seqs)?, m.cfg.eos_token_ids.clone())
        };
        let prs = prompt_slices(prompts, prompt_lens, n_seqs)?;
        let reqs: Vec<Request<'_>> = prs.iter().enumerate().map(|(i, pr)| Request { prompt: pr, adapter: sa.as_ref().map(|v| v[i]) }).collect();
        let (s, stop) = sampling_of(&p, &eos);
        let mut prog = progress_fn(p.progress, p.progress_user);
        let res = with_model(h, |m| m.generate(&reqs, maxn, &s, &stop, &mut prog))?;
        write_generated(&res, maxn, out, out_lens);
        Ok(())
    })
}

/// Checks a generate call's counts and output buffers; its params (or the
/// defaults) and `max_new_tokens`.
unsafe fn generate_args(n_seqs: usize, params: *const lora_generate_params, out: *mut i32, out_len: usize, out_lens: *mut usize) -> crate::Result<(lora_generate_params, usize)> {
    if n_seqs == 0 {
        crate::bail!(InvalidArgument, "n_seqs is 0");
    }
    let p = read_params(params, lora_generate_default_params(), std::mem::size_of::<lora_generate_params>(), "lora_generate_params")?;
    let maxn = p.max_new_tokens as usize;
    let need = n_seqs.checked_mul(maxn).ok_or_else(|| crate::err!(InvalidShape, "n_seqs × max_new_tokens overflows"))?;
    if out_len < need {
        crate::bail!(BufferSize, "out holds {out_len} ids; {n_seqs} × {maxn} needed");
    }
    req(out as *const i32, "out")?;
    req(out_lens as *const usize, "out_lens")?;
    Ok((p, maxn))
}

/// The prompts of a generate call as slices (each non-empty).
unsafe fn prompt_slices<'a>(prompts: *const *const i32, prompt_lens: *const usize, n_seqs: usize) -> crate::Result<Vec<&'a [i32]>> {
    let prompts = std::slice::from_raw_parts(req(prompts, "prompts")?, n_seqs);
    let lens = std::slice::from_raw_parts(req(prompt_lens, "prompt_lens")?, n_seqs);
    let mut out = Vec::with_capacity(n_seqs);
    for i in 0..n_seqs {
        if lens[i] == 0 {
            crate::bail!(InvalidArgument, "prompt {i} is empty");
        }
        out.push(std::slice::from_raw_parts(req(prompts[i], "prompts[i]")?, lens[i]));
    }
    Ok(out)
}

/// Sampling settings and stop ids of generate params.
fn sampling_of(p: &lora_generate_params, eos: &[i64]) -> (Sampling, Vec<i32>) {
    let s = Sampling { temperature: p.temperature, top_k: p.top_k as usize, top_p: p.top_p, seed: p.seed };
    let stop: Vec<i32> = if p.stop_at_eos != 0 { eos.iter().map(|&e| e as i32).collect() } else { Vec::new() };
    (s, stop)
}

/// Copies generated sequences to `out[i · maxn ..]` and their lengths.
unsafe fn write_generated(res: &[Vec<i32>], maxn: usize, out: *mut i32, out_lens: *mut usize) {
    for (i, toks) in res.iter().enumerate() {
        std::ptr::copy_nonoverlapping(toks.as_ptr(), out.add(i * maxn), toks.len());
        *out_lens.add(i) = toks.len();
    }
}

// ---------------------------------------------------------------- trainer

/// Optimizer of a trainer (`LORA_OPTIM_*`).
pub type lora_optim = u32;
/// torch.optim.AdamW (fp32 moments), PyTorch's exact update.
pub const LORA_OPTIM_ADAMW: lora_optim = 0;
/// bitsandbytes AdamW8bit: blockwise 8-bit moments (block 256; tensors
/// under 4,096 elements keep fp32 moments), bit for bit as its CPU path.
pub const LORA_OPTIM_ADAMW_8BIT: lora_optim = 1;

/// Learning-rate schedule (`LORA_SCHEDULE_*`, transformers' names).
pub type lora_schedule = u32;
pub const LORA_SCHEDULE_CONSTANT: lora_schedule = 0;
/// Linear warmup over `warmup_steps`, then constant.
pub const LORA_SCHEDULE_CONSTANT_WITH_WARMUP: lora_schedule = 1;
/// Linear warmup, then linear decay to 0 at `total_steps`.
pub const LORA_SCHEDULE_LINEAR: lora_schedule = 2;
/// Linear warmup, then half a cosine down to 0 at `total_steps`.
pub const LORA_SCHEDULE_COSINE: lora_schedule = 3;

/// Where AdamW's moments live (`LORA_PAGED_STATE_*`).
pub type lora_paged_state = u32;
/// Paged when the model's linear layers are NF4 (QLoRA's default, as
/// qlora.py's `paged_adamw_32bit`), else resident.
pub const LORA_PAGED_STATE_AUTO: lora_paged_state = 0;
/// Ordinary memory.
pub const LORA_PAGED_STATE_OFF: lora_paged_state = 1;
/// Paged memory of the model's context (`lora_context_set_paging` sets
/// its budget and directory): with a budget smaller than the state, the
/// state pages out and back in as each step walks it; the numbers are
/// bit-identical to resident state. 32-bit AdamW only.
pub const LORA_PAGED_STATE_ON: lora_paged_state = 2;

/// Options of `lora_trainer_new`. Initialize with
/// `lora_trainer_default_params()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_trainer_params {
    /// `sizeof(lora_trainer_params)`, set by the defaults function.
    pub struct_size: u32,
    /// `LORA_OPTIM_*`; default `LORA_OPTIM_ADAMW`.
    pub optimizer: lora_optim,
    /// Peak learning rate; default 2e-4 (QLoRA's for 7B–13B models).
    pub lr: f64,
    /// AdamW β1, β2, ε, decoupled weight decay; defaults 0.9, 0.999,
    /// 1e-8, 0.0.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// `LORA_SCHEDULE_*`; default constant.
    pub schedule: lora_schedule,
    pub warmup_steps: u64,
    /// Steps of the whole run (for the linear and cosine decays).
    pub total_steps: u64,
    /// Clip the global gradient norm to this; 0 turns clipping off;
    /// default 1.0 (transformers' default).
    pub max_grad_norm: f64,
    /// Sequences per micro-batch; a step accumulates gradients over
    /// ceil(batch / micro_batch) of them. 0 (default): the whole batch.
    pub micro_batch: u32,
    /// Non-zero: activation checkpointing (recompute each layer in the
    /// backward, keeping only layer inputs); default 0.
    pub checkpointing: u32,
    /// Called after each micro-batch of a step; may be NULL.
    pub progress: lora_progress_fn,
    pub progress_user: *mut c_void,
    /// `LORA_PAGED_STATE_*`; default `LORA_PAGED_STATE_AUTO`.
    pub paged_state: lora_paged_state,
}

/// A training run: model, adapter, optimizer and schedule. Holds the model
/// alive. Not for concurrent use from several threads.
pub struct lora_trainer {
    tag: u64,
    inner: Trainer,
    pool: Arc<rayon::ThreadPool>,
    progress: lora_progress_fn,
    progress_user: *mut c_void,
}

impl Handle for lora_trainer {
    const TAG: u64 = 0x6c6f_7261_7472_6e72; // "loratrnr"
    fn tag(&self) -> u64 {
        self.tag
    }
}

/// What one `lora_train_step` did.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct lora_step_result {
    /// Mean loss over the step's counted tokens, before the update.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used by this step.
    pub lr: f64,
    /// Steps completed so far, this one included.
    pub step: u64,
    /// Tokens processed (batch · seq) and tokens counted in the loss.
    pub tokens: u64,
    pub counted_tokens: u64,
    /// Wall time of the step and tokens (batch · seq) per second.
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// Default trainer options (see each field).
#[no_mangle]
pub extern "C" fn lora_trainer_default_params() -> lora_trainer_params {
    lora_trainer_params {
        struct_size: std::mem::size_of::<lora_trainer_params>() as u32,
        optimizer: LORA_OPTIM_ADAMW,
        lr: 2e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        schedule: LORA_SCHEDULE_CONSTANT,
        warmup_steps: 0,
        total_steps: 0,
        max_grad_norm: 1.0,
        micro_batch: 0,
        checkpointing: 0,
        progress: None,
        progress_user: std::ptr::null_mut(),
        paged_state: LORA_PAGED_STATE_AUTO,
    }
}

/// A `LORA_OPTIM_*` value as the optimizer it names.
pub(crate) fn optim_kind(o: lora_optim) -> Result<OptimKind> {
    match o {
        LORA_OPTIM_ADAMW => Ok(OptimKind::AdamW),
        LORA_OPTIM_ADAMW_8BIT => Ok(OptimKind::AdamW8bit),
        o => crate::bail!(InvalidArgument, "optimizer {o} is not a LORA_OPTIM_* value"),
    }
}

fn trainer_config(p: &lora_trainer_params, quantized: bool) -> Result<TrainerConfig> {
    let schedule = match p.schedule {
        LORA_SCHEDULE_CONSTANT => Schedule::Constant,
        LORA_SCHEDULE_CONSTANT_WITH_WARMUP => Schedule::ConstantWithWarmup { warmup_steps: p.warmup_steps },
        LORA_SCHEDULE_LINEAR | LORA_SCHEDULE_COSINE => {
            if p.total_steps == 0 || p.total_steps < p.warmup_steps {
                crate::bail!(InvalidArgument, "a decaying schedule needs total_steps ≥ warmup_steps and > 0 (got {} and {})", p.total_steps, p.warmup_steps);
            }
            if p.schedule == LORA_SCHEDULE_LINEAR {
                Schedule::Linear { warmup_steps: p.warmup_steps, total_steps: p.total_steps }
            } else {
                Schedule::cosine(p.warmup_steps, p.total_steps)
            }
        }
        s => crate::bail!(InvalidArgument, "schedule {s} is not a LORA_SCHEDULE_* value"),
    };
    let optimizer = optim_kind(p.optimizer)?;
    let paged = match p.paged_state {
        LORA_PAGED_STATE_AUTO => quantized && optimizer == OptimKind::AdamW,
        LORA_PAGED_STATE_OFF => false,
        LORA_PAGED_STATE_ON => true,
        v => crate::bail!(InvalidArgument, "paged_state {v} is not a LORA_PAGED_STATE_* value"),
    };
    Ok(TrainerConfig {
        paged,
        adamw: AdamWConfig { lr: p.lr, beta1: p.beta1, beta2: p.beta2, eps: p.eps, weight_decay: p.weight_decay },
        schedule,
        max_grad_norm: p.max_grad_norm,
        micro_batch: p.micro_batch as usize,
        checkpointing: p.checkpointing != 0,
        optimizer,
    })
}

/// Creates a trainer for adapter `adapter` of `model` (which becomes the
/// only active adapter). `params` may be NULL for the defaults. `*out`
/// receives a trainer the caller frees with `lora_trainer_free` (it holds
/// the model's data alive; the model handle may be freed first). One
/// trainer must not be used from two threads at once.
///
/// Errors: `LORA_ERR_INVALID_ARGUMENT` (unknown adapter, bad
/// hyperparameters), `LORA_ERR_INVALID_STATE` (model merged),
/// `LORA_ERR_UNSUPPORTED` (`LORA_PAGED_STATE_ON` with the 8-bit
/// optimizer), `LORA_ERR_IO` / `LORA_ERR_OUT_OF_MEMORY` (paged state: the
/// paging directory cannot hold it), `LORA_ERR_STRUCT_SIZE`.
#[no_mangle]
pub unsafe extern "C" fn lora_trainer_new(model: *mut lora_model, adapter: *const c_char, params: *const lora_trainer_params, out: *mut *mut lora_trainer) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let adapter = req_str(adapter, "adapter")?;
        let out = req_out(out, "out")?;
        let p = read_params(params, lora_trainer_default_params(), std::mem::size_of::<lora_trainer_params>(), "lora_trainer_params")?;
        let quantized = h.inner.lock().quant.is_some();
        let tr = Trainer::with_pager(h.inner.clone(), adapter, trainer_config(&p, quantized)?, Some(&h.pager))?;
        *out = util::into_handle(lora_trainer { tag: lora_trainer::TAG, inner: tr, pool: h.pool.clone(), progress: p.progress, progress_user: p.progress_user });
        Ok(())
    })
}

/// Frees a trainer (NULL: no-op).
#[no_mangle]
pub unsafe extern "C" fn lora_trainer_free(trainer: *mut lora_trainer) {
    util::free_handle(trainer, |t| t.tag = 0);
}

/// One optimizer step on a batch of token ids `[batch, seq]` (seq ≥ 2):
/// causal-LM cross-entropy averaged over the counted tokens exactly as
/// transformers does (`labels` NULL means the ids; −100 is ignored;
/// labels are shifted by one inside), gradient accumulation over
/// micro-batches (the mean is over the whole step's counted tokens),
/// global-norm clipping, AdamW with the schedule's learning rate.
/// `*result` (may be NULL) receives loss, gradient norm, learning rate,
/// tokens and tokens/s.
///
/// On failure the adapter and optimizer are unchanged (gradients are
/// discarded). Errors: `LORA_ERR_INVALID_SHAPE`, `LORA_ERR_INVALID_ARGUMENT`
/// (ids or labels out of range, no counted token), `LORA_ERR_NON_FINITE`
/// (loss or gradient not finite: the step is skipped),
/// `LORA_ERR_INVALID_STATE` (model merged, or another adapter swapped in
/// since the trainer was created: swap the trainer's adapter back in),
/// `LORA_ERR_CANCELLED`; training on a device, `LORA_ERR_OUT_OF_MEMORY`
/// (the step needs more device memory than is free: nothing applied, so
/// the same batch can be retried with smaller micro-batches or activation
/// checkpointing) and `LORA_ERR_CUDA`.
#[no_mangle]
pub unsafe extern "C" fn lora_train_step(trainer: *mut lora_trainer, ids: *const i32, labels: *const i32, batch: usize, seq: usize, result: *mut lora_step_result) -> lora_status {
    guard(|| {
        let t = util::handle_mut(trainer, "trainer")?;
        let n = batch.checked_mul(seq).filter(|&n| n > 0).ok_or_else(|| crate::err!(InvalidShape, "batch {batch} × seq {seq} is empty or overflows"))?;
        let ids = std::slice::from_raw_parts(req(ids, "ids")?, n);
        let labels = if labels.is_null() { None } else { Some(std::slice::from_raw_parts(labels, n)) };
        let mut prog = progress_fn(t.progress, t.progress_user);
        let pool = t.pool.clone();
        let r = pool.install(|| t.inner.step(ids, labels, batch, seq, &mut prog))?;
        if !result.is_null() {
            *result = lora_step_result {
                loss: r.loss,
                grad_norm: r.grad_norm,
                lr: r.lr,
                step: r.step,
                tokens: r.tokens,
                counted_tokens: r.counted_tokens,
                seconds: r.seconds,
                tokens_per_s: r.tokens_per_s,
            };
        }
        Ok(())
    })
}

/// Operand precision of the frozen products of a model on a GPU.
pub type lora_compute = u32;
/// bf16 operands on tensor cores, fp32 accumulation (bitsandbytes'
/// `compute_dtype=bfloat16`); the embedding table and the MLP's gate/up
/// activations kept for the backward are held in bf16 too; adapter
/// masters, norms, attention, loss and AdamW stay fp32. The fast mode.
pub const LORA_COMPUTE_BF16: lora_compute = 0;
/// Every product in fp32: the CPU backend's numbers up to summation order.
pub const LORA_COMPUTE_F32: lora_compute = 1;

/// `LORA_COMPUTE_*` → the device precision; `device` −1 → `None`.
fn device_of(device: i32, compute: lora_compute) -> Result<Option<(usize, crate::model::gpu::Compute)>> {
    let c = match compute {
        LORA_COMPUTE_BF16 => crate::model::gpu::Compute::BF16,
        LORA_COMPUTE_F32 => crate::model::gpu::Compute::F32,
        _ => crate::bail!(InvalidArgument, "compute {compute} is not a LORA_COMPUTE_* value"),
    };
    match device {
        -1 => Ok(None),
        d if d >= 0 => Ok(Some((d as usize, c))),
        d => crate::bail!(InvalidArgument, "device {d} is neither -1 (CPU) nor a CUDA device index"),
    }
}

/// Puts `model` on CUDA device `device` (0, 1, …) with `compute`
/// precision (`LORA_COMPUTE_*`), or takes it off with `device = -1`. The
/// base weights (NF4 stays NF4) and every adapter are copied to device
/// memory once; then `lora_model_logits`, `lora_model_loss`,
/// `lora_generate` (mixed-adapter batches too: BGMV kernels, KV cache in
/// device memory), `lora_merge` (the merged weights `W0 + Σ m·s·B·A` are
/// derived on the device and kept beside `W0`, so `lora_unmerge` is exact),
/// `lora_unmerge` and `lora_swap_adapter` run there. The host copy stays
/// the master: adapters created, loaded, removed or changed through the
/// model are copied to the device before its next operation there.
/// Training runs on the device for trainers that ask
/// (`lora_trainer_use_device`). Calling it again with the same device and
/// precision does nothing. The kernels are compiled by NVRTC for the
/// device's architecture at first use and cached on disk
/// (`LORA_CUDA_CACHE_DIR`, default `$XDG_CACHE_HOME/liblora/cubin` or
/// `~/.cache/liblora/cubin`; `off` disables), so later processes skip the
/// compile.
///
/// Ownership: the device copy belongs to the model and is freed with it
/// or by `device = -1`. Thread safety: as every model call. Memory: the
/// frozen weights once (NF4: 4.127 bits per weight), adapters in fp32, and
/// while merged a dense copy of every merged module in the compute dtype.
///
/// Errors: `LORA_ERR_CUDA_UNAVAILABLE` (no driver, no such device, no
/// NVRTC or cuBLAS), `LORA_ERR_UNSUPPORTED` (head_dim above 256),
/// `LORA_ERR_INVALID_ARGUMENT` (unknown `compute`), `LORA_ERR_INVALID_STATE`
/// (moving or removing the device copy while a trainer trains on it),
/// `LORA_ERR_OUT_OF_MEMORY` (device memory), `LORA_ERR_CUDA`.
#[no_mangle]
pub unsafe extern "C" fn lora_model_use_device(model: *mut lora_model, device: i32, compute: lora_compute) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let d = device_of(device, compute)?;
        with_model(h, |m| m.use_device(d))
    })
}

/// Moves `trainer`'s steps to CUDA device `device` (0, 1, …) with
/// `compute` precision (`LORA_COMPUTE_*`), or back to the CPU with
/// `device = -1`. The model goes to that device first if it is not there
/// (as `lora_model_use_device`; a copy made this way is taken off again
/// when the last trainer on it returns to the CPU or is freed, one made by
/// `lora_model_use_device` stays). One trainer per adapter on a device. The adapter's AdamW state moves to device memory; each
/// `lora_train_step` then runs forward, backward, clipping and AdamW
/// there, and copies the updated adapter back to the model, so saving
/// sees it (generation, merging and swaps run on the device copy, which
/// holds it already). Works after `lora_trainer_new` or
/// `lora_trainer_resume`. Attention runs on the fp32 kernels;
/// `lora_model_set_device_option` (or `LORA_CUDA_ATTENTION=tc` in the
/// environment, read when the model goes to the device) switches bf16
/// mode to the tensor-core kernels (`cuda/attention_tc.cu`), which have
/// not yet run on a GPU.
///
/// Ownership: the gradients and moments on the device belong to the
/// trainer and are freed with it (or when it returns to the CPU). Thread
/// safety: as every trainer call, not concurrently with other calls on the
/// same trainer or its model. `device` is a CUDA ordinal as the driver
/// numbers devices.
///
/// If the move fails (status below) the trainer is left on the CPU, its
/// state intact.
///
/// Paged optimizer state (`paged_state`) goes to CUDA managed memory
/// (bitsandbytes' paged AdamW: the driver may evict its pages to the host
/// under memory pressure; they are prefetched before each update) and
/// back to its host pages when the trainer returns to the CPU. Changing the
/// adapter's weights through the model (say `lora_adapter_load` into the
/// same name) reaches the device before the next step.
///
/// Errors: `LORA_ERR_CUDA_UNAVAILABLE` (no driver, no such device, no
/// NVRTC or cuBLAS), `LORA_ERR_UNSUPPORTED` (8-bit AdamW,
/// head_dim above 256), `LORA_ERR_INVALID_ARGUMENT`
/// (unknown `compute`), `LORA_ERR_INVALID_STATE` (the model is on another
/// device or precision where another trainer trains, or another trainer
/// trains this adapter there),
/// `LORA_ERR_OUT_OF_MEMORY` (device memory), `LORA_ERR_CUDA`.
#[no_mangle]
pub unsafe extern "C" fn lora_trainer_use_device(trainer: *mut lora_trainer, device: i32, compute: lora_compute) -> lora_status {
    guard(|| {
        let t = util::handle_mut(trainer, "trainer")?;
        t.inner.use_device(device_of(device, compute)?)
    })
}

/// Sets `trainer`'s micro-batch size (`micro_batch`, 0: the whole batch)
/// and activation checkpointing (`checkpointing` non-zero: on) from the
/// next step on, as `lora_trainer_params` sets them at creation. They
/// change the memory a step needs, not what it computes (the gradient is
/// the same mean over the step's counted tokens). The way on after a step
/// on a device failed with `LORA_ERR_OUT_OF_MEMORY` (which applied
/// nothing): retry the batch with smaller micro-batches or checkpointing.
/// `lora_trainer_save` records them. Thread safety: not concurrently with
/// other calls on the same trainer.
///
/// Errors: `LORA_ERR_NULL_POINTER`, `LORA_ERR_INVALID_STATE` (not a live
/// trainer).
#[no_mangle]
pub unsafe extern "C" fn lora_trainer_set_batching(trainer: *mut lora_trainer, micro_batch: u32, checkpointing: u32) -> lora_status {
    guard(|| {
        let t = util::handle_mut(trainer, "trainer")?;
        t.inner.set_batching(micro_batch as usize, checkpointing != 0);
        Ok(())
    })
}

/// Generates with `trainer`'s adapter (multiplier 1) for `n_seqs` prompts,
/// as `lora_generate` with that adapter for every sequence: on the GPU when
/// the model is on one (`lora_trainer_use_device`, `lora_model_use_device`;
/// KV cache in device memory, one logits copy per step for sampling),
/// else on the CPU.
/// Arguments and output as `lora_generate` (without per-sequence adapters):
/// `prompts[i]` holds `prompt_lens[i]` token ids; new ids go to the
/// caller's `out[i · max_new_tokens + j]` (`out_len` counts ids), their
/// count to `out_lens[i]`; nothing is kept by the library. The model must
/// be unmerged. Thread safety: not concurrently with other calls on the
/// same trainer or its model (the KV cache is per call).
///
/// Errors: those of `lora_generate`, and on a GPU `LORA_ERR_OUT_OF_MEMORY`
/// (the KV cache) and `LORA_ERR_CUDA`.
#[no_mangle]
pub unsafe extern "C" fn lora_trainer_generate(
    trainer: *mut lora_trainer,
    prompts: *const *const i32,
    prompt_lens: *const usize,
    n_seqs: usize,
    params: *const lora_generate_params,
    out: *mut i32,
    out_len: usize,
    out_lens: *mut usize,
) -> lora_status {
    guard(|| {
        let t = util::handle_mut(trainer, "trainer")?;
        let (p, maxn) = generate_args(n_seqs, params, out, out_len, out_lens)?;
        let prs = prompt_slices(prompts, prompt_lens, n_seqs)?;
        let eos = t.inner.model.lock().cfg.eos_token_ids.clone();
        let (s, stop) = sampling_of(&p, &eos);
        let mut prog = progress_fn(p.progress, p.progress_user);
        let pool = t.pool.clone();
        let res = pool.install(|| t.inner.generate(&prs, maxn, &s, &stop, &mut prog))?;
        write_generated(&res, maxn, out, out_lens);
        Ok(())
    })
}

/// Saves a training checkpoint to directory `dir`: the adapter (PEFT
/// format), the optimizer state, step counters and configuration. Written
/// to a temporary directory (files fsynced) and renamed into place, so a
/// crash never leaves a checkpoint that loads wrong.
#[no_mangle]
pub unsafe extern "C" fn lora_trainer_save(trainer: *const lora_trainer, dir: *const c_char) -> lora_status {
    guard(|| {
        let t = handle(trainer, "trainer")?;
        t.inner.save(&req_path(dir, "dir")?)
    })
}

/// Resumes a run from a checkpoint written by `lora_trainer_save` on a
/// freshly loaded copy of the same base model: the adapter is created (or
/// its weights replaced), optimizer state, step and schedule restored. On
/// the CPU the resumed run continues bit for bit. `params` may be NULL; only
/// its progress callback is used (the hyperparameters come from the
/// checkpoint). `*out` receives a trainer the caller frees with
/// `lora_trainer_free`.
///
/// Errors: `LORA_ERR_IO` (no checkpoint in `dir`), `LORA_ERR_FILE_FORMAT`,
/// `LORA_ERR_SHAPE_MISMATCH` (the checkpoint's adapter does not fit this
/// model), the errors of `lora_adapter_load`.
#[no_mangle]
pub unsafe extern "C" fn lora_trainer_resume(model: *mut lora_model, dir: *const c_char, params: *const lora_trainer_params, out: *mut *mut lora_trainer) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let dir = req_path(dir, "dir")?;
        let out = req_out(out, "out")?;
        let p = read_params(params, lora_trainer_default_params(), std::mem::size_of::<lora_trainer_params>(), "lora_trainer_params")?;
        let pager = h.pager.clone();
        let inner = h.inner.clone();
        let tr = h.pool.install(move || Trainer::resume_with_pager(inner, &dir, Some(&pager)))?;
        *out = util::into_handle(lora_trainer { tag: lora_trainer::TAG, inner: tr, pool: h.pool.clone(), progress: p.progress, progress_user: p.progress_user });
        Ok(())
    })
}

/// Device memory of a model on a device (`lora_model_use_device`):
/// `*copy` the bytes its device copy holds (frozen weights, adapters,
/// trainers' gradients and moments in device memory, merged weights);
/// `*in_use` and `*peak` the bytes of the device's memory pool in use now
/// and at most so far (the copy plus activations, KV caches and scratch of
/// the calls; every stream-ordered buffer of the library on that device).
/// Any pointer may be NULL. All figures in bytes, written to the caller's
/// variables (nothing is allocated or kept). `lora_model_memory` reports
/// host memory. Thread safety: as every model call, not concurrently with
/// other calls on the same model.
///
/// Errors: `LORA_ERR_INVALID_STATE` (the model is not on a device),
/// `LORA_ERR_CUDA`.
#[no_mangle]
pub unsafe extern "C" fn lora_model_device_memory(model: *const lora_model, copy: *mut u64, in_use: *mut u64, peak: *mut u64) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let m = h.inner.lock();
        let g = m.on_device()?;
        let vals = [(copy, g.static_bytes() as u64), (in_use, g.device().pool_used_bytes()?), (peak, g.device().pool_peak_bytes()?)];
        for (p, v) in vals {
            if !p.is_null() {
                *p = v;
            }
        }
        Ok(())
    })
}

/// A switch of a model's device copy (`lora_model_set_device_option`).
pub type lora_device_option = u32;
/// 1: attention on tensor cores (`cuda/attention_tc.cu`: bf16 q, k, v,
/// P, dO and dS, fp32 accumulation and softmax) where the shape allows
/// (head_dim 64, 128 or 256, self-attention, soft-capped or not, sm_80+; the fp32 kernels
/// elsewhere). `LORA_COMPUTE_BF16` only. Off by default
/// (`LORA_CUDA_ATTENTION=tc` in the environment at `lora_model_use_device`
/// starts it on). These kernels have not yet run on a GPU.
pub const LORA_DEVICE_TENSOR_CORE_ATTENTION: lora_device_option = 0;
/// 1: adapter products on bf16 operands with fp32 accumulation (what
/// PyTorch + PEFT compute under bf16 autocast), and with them the lean
/// training step: activations nothing reads in fp32 held in bf16 alone
/// (less memory: the 1B benchmark step's 4.1 GiB against 4.6 by count).
/// `LORA_COMPUTE_BF16` only; the adapter masters, gradients and AdamW
/// stay fp32. Off by default (`LORA_CUDA_LORA=bf16` starts it on); not
/// yet run on a GPU.
pub const LORA_DEVICE_BF16_ADAPTER_PRODUCTS: lora_device_option = 1;
/// 1 (the default): a training step's backward recomputes each layer's
/// q, k, v and mid-layer residual from the layer input (the forward's
/// bits; about 6% more matrix work, 80 MiB less per layer of the 1B
/// benchmark model); 0 keeps them from the forward
/// (`LORA_CUDA_RECOMPUTE=0` starts it off).
pub const LORA_DEVICE_RECOMPUTE: lora_device_option = 2;
/// 1 (the default): with bf16 adapter products
/// (`LORA_DEVICE_BF16_ADAPTER_PRODUCTS`), a training step folds each
/// adapter into its module's base product where it can: the forward takes
/// `[x | x·Aᵀ]·[W | s·B]ᵀ` as one product for NF4 weights (q, k, v, gate,
/// up, down), and the backward makes q, k and v's input gradient as one
/// product (gate and up's as one per module, o_proj's with its adapter's
/// term). The same sums up to bf16
/// rounding, less memory traffic; not with LoRA dropout. 0 keeps each
/// adapter's products apart (`LORA_CUDA_FOLD=0` starts it off). Not yet
/// run on a GPU.
pub const LORA_DEVICE_FOLD_ADAPTERS: lora_device_option = 3;

fn device_option(option: lora_device_option) -> Result<crate::model::gpu::DeviceOption> {
    use crate::model::gpu::DeviceOption as O;
    Ok(match option {
        LORA_DEVICE_TENSOR_CORE_ATTENTION => O::TensorCoreAttention,
        LORA_DEVICE_BF16_ADAPTER_PRODUCTS => O::Bf16AdapterProducts,
        LORA_DEVICE_RECOMPUTE => O::Recompute,
        LORA_DEVICE_FOLD_ADAPTERS => O::FoldAdapters,
        _ => crate::bail!(InvalidArgument, "option {option} is not a LORA_DEVICE_* value"),
    })
}

/// Sets switch `option` (`LORA_DEVICE_*`) of `model`'s device copy to
/// `value`, 1 (on) or 0 (off); the next training step, forward or
/// generation on the device uses it (a trainer on the device included).
/// The switches start from their environment variables each time the
/// model goes to a device (`lora_model_use_device`,
/// `lora_trainer_use_device`), so set them after that. Nothing is
/// allocated for the caller (turning bf16 adapter products on makes the
/// adapters' bf16 copies in device memory, owned by the device copy).
/// Thread safety: as every model call, not concurrently with other calls
/// on the same model or its trainers.
///
/// Errors: `LORA_ERR_INVALID_ARGUMENT` (unknown `option`, `value` not 0 or
/// 1, or a bf16-only switch turned on in `LORA_COMPUTE_F32`: nothing
/// changes), `LORA_ERR_INVALID_STATE` (the model is not on a device),
/// `LORA_ERR_OUT_OF_MEMORY` and `LORA_ERR_CUDA` (the adapters' bf16
/// copies, made when bf16 adapter products are turned on).
#[no_mangle]
pub unsafe extern "C" fn lora_model_set_device_option(model: *mut lora_model, option: lora_device_option, value: i32) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let o = device_option(option)?;
        let on = match value {
            0 => false,
            1 => true,
            v => crate::bail!(InvalidArgument, "value {v} for option {option}: 0 (off) or 1 (on)"),
        };
        with_model(h, |m| m.with_device(|g, _| g.set_option(o, on)))
    })
}

/// The value of switch `option` (`LORA_DEVICE_*`) of `model`'s device
/// copy, 1 (on) or 0 (off), written to the caller's `*value` (nothing is
/// allocated or kept). Thread safety: as every model call, not
/// concurrently with other calls on the same model or its trainers.
///
/// Errors: `LORA_ERR_INVALID_ARGUMENT` (unknown `option`),
/// `LORA_ERR_INVALID_STATE` (the model is not on a device),
/// `LORA_ERR_NULL_POINTER` (`value`).
#[no_mangle]
pub unsafe extern "C" fn lora_model_device_option(model: *const lora_model, option: lora_device_option, value: *mut i32) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let o = device_option(option)?;
        let out = req_out(value, "value")?;
        let m = h.inner.lock();
        let g = m.on_device()?;
        *out = i32::from(g.option(o));
        Ok(())
    })
}

/// Memory by category for `model` (and the optimizer state of `trainer`,
/// which may be NULL), with the peak observed so far.
#[no_mangle]
pub unsafe extern "C" fn lora_model_memory(model: *const lora_model, trainer: *const lora_trainer, stats: *mut lora_memory_stats) -> lora_status {
    guard(|| {
        let h = model_ref(model)?;
        let out = req_out(stats, "stats")?;
        let mut m = h.inner.lock().memory();
        if !trainer.is_null() {
            let t = handle(trainer, "trainer")?;
            m.optimizer = t.inner.optimizer_bytes();
            m.peak += m.optimizer;
        }
        *out = lora_memory_stats {
            base_weights: m.base_weights as u64,
            base_quantized: m.base_quantized as u64,
            quantized_weights: m.quantized_weights as u64,
            adapters: m.adapters as u64,
            optimizer: m.optimizer as u64,
            activations: m.activations as u64,
            kv_cache: m.kv_cache as u64,
            peak: m.peak as u64,
        };
        Ok(())
    })
}
