//! `config.json` of a Hugging Face LLaMA-family decoder.
//!
//! Accepted: `model_type` `llama`, `mistral`, `qwen2`, `qwen3`, `gemma`,
//! `gemma2`, `gemma3_text`, `granite`, `phi3`, `olmo2`, `smollm3`
//! (architectures `LlamaForCausalLM`, `MistralForCausalLM`,
//! `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `GemmaForCausalLM`,
//! `Gemma2ForCausalLM`, `Gemma3ForCausalLM`, `GraniteForCausalLM`,
//! `Phi3ForCausalLM`, `Olmo2ForCausalLM`, `SmolLM3ForCausalLM`). Both the
//! transformers 4 form (`rope_theta`, `rope_scaling`) and the transformers 5
//! form (`rope_parameters`) of the rotary settings are read. Anything that
//! would change the function the model computes and that liblora does not
//! implement (another activation, `pretraining_tp > 1`, a rope type other
//! than default/linear/llama3, attention dropout, …) is refused by name:
//! half-loading a model that then computes something else is the one
//! outcome worse than an error.

use crate::Result;
use serde_json::{Map, Value};

/// Rotary frequency scaling (`rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear { factor: f32 },
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
    /// YaRN (transformers `_compute_yarn_parameters`): `attention_factor`
    /// multiplies cos and sin; the rest shape `inv_freq`.
    /// `theta` is `rope_theta` as config.json states it: the correction
    /// range takes its logarithm in Python floats.
    Yarn { theta: f64, factor: f64, attention_factor: f64, beta_fast: f64, beta_slow: f64, original_max_position_embeddings: usize, truncate: bool },
    /// LongRoPE (`longrope`; Phi-3's `su`, and its `yarn`, which
    /// transformers' Phi3Config reads as `longrope`): per-frequency
    /// divisors, the short ones for calls up to
    /// `original_max_position_embeddings` positions, the long ones above
    /// (f32 as PyTorch holds them); `attention_factor` multiplies cos and
    /// sin.
    LongRope { short_factor: Vec<f32>, long_factor: Vec<f32>, attention_factor: f64, original_max_position_embeddings: usize },
}

/// bitsandbytes 4-bit settings of an already quantized checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4bit {
    pub double_quant: bool,
    /// Module names kept in full precision (`llm_int8_skip_modules`).
    pub skip_modules: Vec<String>,
}

/// The architecture family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen2's layout with RMSNorm on each query and key head before the
    /// rotation (`q_norm`, `k_norm`), `attention_bias` on all four
    /// attention projections, and an explicit `head_dim`.
    Qwen3,
    /// Gemma: RMSNorm `x̂·(1 + w)`, a tanh-GELU gated MLP, embeddings
    /// scaled by √hidden, tied head, explicit `head_dim`.
    Gemma,
    /// Gemma's layout plus a norm on the attention and MLP outputs before
    /// each residual add, `query_pre_attn_scalar`, tanh soft-capping of
    /// the attention scores and the logits, alternating sliding windows.
    Gemma2,
    /// Gemma 2's layout (capping optional) with Qwen3's per-head q/k
    /// norms (Gemma's `1 + w`) and a separate rope for sliding layers
    /// (`gemma3_text`, the text-only `Gemma3ForCausalLM`).
    Gemma3,
    /// Llama's layout with four scalars: `embedding_multiplier` on the
    /// embeddings, `attention_multiplier` as the scores' scale,
    /// `residual_multiplier` on each branch output before its residual
    /// add, and the logits divided by `logits_scaling`.
    Granite,
    /// Llama's computation with q, k and v in one projection (`qkv_proj`,
    /// `[q_dim + 2·kv_dim, hidden]`) and gate and up in one
    /// (`gate_up_proj`, `[2·intermediate, hidden]`, gate first), a sliding
    /// window on every layer when set (Phi-3, Phi-4).
    Phi3,
    /// Norms on the attention and MLP outputs only (no input norms), and
    /// q/k RMSNorms over the whole projection (`[q_dim]`, `[kv_dim]`)
    /// before the heads are split (OLMo 2).
    Olmo2,
    /// Llama's layout where some layers skip the rotation (`no_rope_layers`,
    /// NoPE; by default every 4th) and sliding windows follow
    /// `use_sliding_window` and `layer_types` (SmolLM3).
    SmolLm3,
}

/// The gated MLP's activation on the gate: `act(gate)·up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(x)` (`silu`).
    Silu,
    /// PyTorch's `gelu(x, approximate="tanh")` (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Arch {
    /// Gemma 1, 2 or 3.
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma | Arch::Gemma2 | Arch::Gemma3)
    }

    /// Whether PEFT has a default `target_modules` for this `model_type`
    /// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`: q_proj,
    /// v_proj); for the others it refuses a config without them.
    pub fn has_peft_default_targets(self) -> bool {
        !matches!(self, Arch::Granite | Arch::Phi3 | Arch::Olmo2 | Arch::SmolLm3)
    }

    /// Whether q/k/v and gate/up are single fused projections (Phi-3).
    pub fn fused(self) -> bool {
        self == Arch::Phi3
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma => "gemma",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3_text",
            Arch::Granite => "granite",
            Arch::Phi3 => "phi3",
            Arch::Olmo2 => "olmo2",
            Arch::SmolLm3 => "smollm3",
        }
    }
    pub fn architecture(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma => "GemmaForCausalLM",
            Arch::Gemma2 => "Gemma2ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Granite => "GraniteForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::Olmo2 => "Olmo2ForCausalLM",
            Arch::SmolLm3 => "SmolLM3ForCausalLM",
        }
    }
}

/// What liblora needs from `config.json`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The leading elements of each q/k head that rotate: `head_dim`, or
    /// `⌊head_dim·partial_rotary_factor⌋` (Phi-3's layout: Phi-4-mini's
    /// 0.75); the rest pass through unrotated.
    pub rotary_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v (Qwen2 always; Llama `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// RMSNorm over each query and key head (weights `[head_dim]`, the
    /// model's `rms_norm_eps`) between the projection and the rotation
    /// (Qwen3 `q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// The q/k norms span the whole projection (`[q_dim]`, `[kv_dim]`)
    /// instead of one head (OLMo 2).
    pub qk_norm_full: bool,
    /// No norm on the attention's and the MLP's inputs (OLMo 2: only
    /// the output norms).
    pub no_input_norms: bool,
    /// Sliding attention window per layer (Mistral `sliding_window`; Qwen2
    /// `layer_types` = `sliding_attention`), `None` = full causal.
    pub windows: Vec<Option<usize>>,
    /// Per layer, whether q and k are rotated (SmolLM3's NoPE layers: no).
    pub rope_layers: Vec<bool>,
    /// The gated MLP's activation (`hidden_act` / Gemma's `hidden_activation`).
    pub act: Activation,
    /// Gemma's RMSNorm: `x̂·(1 + w)` with `w` as stored (every norm of the
    /// model, the q/k norms included).
    pub norm_offset: bool,
    /// Factor on the embedding rows (Gemma: `√hidden` rounded to f32;
    /// Granite: `embedding_multiplier`).
    pub embed_scale: Option<f32>,
    /// Factor on each branch output before its residual add (Granite
    /// `residual_multiplier`).
    pub residual_scale: Option<f32>,
    /// The logits are divided by this (Granite `logits_scaling`).
    pub logits_divisor: Option<f32>,
    /// Gemma 2/3: RMSNorm on the attention output and on the MLP output
    /// before each residual add (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`; the MLP's input norm is then
    /// `pre_feedforward_layernorm`).
    pub sandwich_norm: bool,
    /// The softmax scale of the attention scores: `head_dim^−½`, or
    /// `query_pre_attn_scalar^−½` (Gemma 2/3), as transformers'
    /// `self.scaling` rounded to f32.
    pub attn_scale: f32,
    /// `c·tanh(s/c)` on the scaled attention scores (`attn_logit_softcapping`).
    pub attn_softcap: Option<f32>,
    /// `c·tanh(z/c)` on the logits (`final_logit_softcapping`).
    pub final_softcap: Option<f32>,
    /// Gemma 3: the rotary settings of the sliding-window layers
    /// (`rope_parameters.sliding_attention`, or `rope_local_base_freq`),
    /// when they differ from the full layers'.
    pub local_rope: Option<(f32, RopeScaling)>,
    /// The checkpoint's dtype (`dtype` / `torch_dtype`), if stated.
    pub dtype: Option<String>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub bnb_4bit: Option<Bnb4bit>,
    /// The parsed JSON, written back (minus quantization) on export.
    pub raw: Map<String, Value>,
}

fn get_usize(m: &Map<String, Value>, k: &str) -> Result<Option<usize>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| err!(FileFormat, "config.json: `{k}` is {v}, not a non-negative integer")),
    }
}

fn need_usize(m: &Map<String, Value>, k: &str) -> Result<usize> {
    match get_usize(m, k)? {
        Some(0) => bail!(FileFormat, "config.json: `{k}` is 0"),
        Some(v) => Ok(v),
        None => bail!(FileFormat, "config.json: `{k}` is missing"),
    }
}

fn get_f64(m: &Map<String, Value>, k: &str) -> Result<Option<f64>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| err!(FileFormat, "config.json: `{k}` is {v}, not a number")),
    }
}

fn get_bool(m: &Map<String, Value>, k: &str, default: bool) -> Result<bool> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => bail!(FileFormat, "config.json: `{k}` is {v}, not a boolean"),
    }
}

fn get_str<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(|v| v.as_str())
}

fn token_ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => Vec::new(),
    }
}

fn parse_rope(m: &Map<String, Value>) -> Result<(f32, RopeScaling)> {
    parse_rope_or(m, 10000.0)
}

/// [`parse_rope`] with `default_theta` where config.json states none.
fn parse_rope_or(m: &Map<String, Value>, default_theta: f64) -> Result<(f32, RopeScaling)> {
    // transformers 5: rope_parameters {rope_type, rope_theta, factor, ...};
    // transformers 4: rope_theta at top level, rope_scaling {type|rope_type, ...}.
    let (params, theta) = match m.get("rope_parameters") {
        Some(Value::Object(p)) => {
            let theta = get_f64(p, "rope_theta")?.or(get_f64(m, "rope_theta")?).unwrap_or(default_theta);
            (Some(p.clone()), theta)
        }
        _ => {
            let theta = get_f64(m, "rope_theta")?.unwrap_or(default_theta);
            match m.get("rope_scaling") {
                Some(Value::Object(p)) => (Some(p.clone()), theta),
                None | Some(Value::Null) => (None, theta),
                Some(v) => bail!(FileFormat, "config.json: `rope_scaling` is {v}, not an object"),
            }
        }
    };
    if !(theta > 0.0) {
        bail!(FileFormat, "config.json: rope_theta {theta} is not positive");
    }
    // A partial rotation (Phi-4-mini's 0.75, top level or in the rope
    // parameters) exists in Phi-3's modeling alone (its q_rot / q_pass);
    // elsewhere it is refused whatever the rope type.
    if get_str(m, "model_type") != Some("phi3") {
        for src in [Some(m), params.as_ref()].into_iter().flatten() {
            if let Some(f) = get_f64(src, "partial_rotary_factor")? {
                if f != 1.0 {
                    bail!(Unsupported, "config.json: partial_rotary_factor {f} is not supported here (1 is; Phi-3's layout takes others)");
                }
            }
        }
    }
    let Some(p) = params else { return Ok((theta as f32, RopeScaling::Default)) };
    let ty = get_str(&p, "rope_type").or(get_str(&p, "type")).unwrap_or("default");
    // transformers' Phi3Config reads `su` and `yarn` as `longrope`; `su`
    // is LongRoPE's old name everywhere.
    let phi3 = get_str(m, "model_type") == Some("phi3");
    let ty = match ty {
        "su" => "longrope",
        "yarn" if phi3 => "longrope",
        t => t,
    };
    let factor = || -> Result<f32> {
        let f = get_f64(&p, "factor")?.ok_or_else(|| err!(FileFormat, "config.json: rope type `{ty}` without `factor`"))?;
        if !(f > 0.0) {
            bail!(FileFormat, "config.json: rope factor {f} is not positive");
        }
        Ok(f as f32)
    };
    let scaling = match ty {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: get_f64(&p, "low_freq_factor")?.ok_or_else(|| err!(FileFormat, "config.json: llama3 rope without `low_freq_factor`"))? as f32,
            high_freq_factor: get_f64(&p, "high_freq_factor")?.ok_or_else(|| err!(FileFormat, "config.json: llama3 rope without `high_freq_factor`"))? as f32,
            original_max_position_embeddings: get_usize(&p, "original_max_position_embeddings")?
                .ok_or_else(|| err!(FileFormat, "config.json: llama3 rope without `original_max_position_embeddings`"))?,
        },
        "yarn" => {
            // transformers: a top-level original_max_position_embeddings
            // wins (Phi-3's layout), else the rope parameters', else
            // max_position_embeddings; no factor means their ratio.
            let orig = match get_usize(m, "original_max_position_embeddings")? {
                Some(o) => Some(o),
                None => get_usize(&p, "original_max_position_embeddings")?,
            }
            .or(get_usize(m, "max_position_embeddings")?)
            .ok_or_else(|| err!(FileFormat, "config.json: yarn rope without `original_max_position_embeddings` or `max_position_embeddings`"))?;
            if orig == 0 {
                bail!(FileFormat, "config.json: yarn original_max_position_embeddings is 0");
            }
            let factor = match get_f64(&p, "factor")? {
                Some(f) => f,
                None => get_usize(m, "max_position_embeddings")?.ok_or_else(|| err!(FileFormat, "config.json: yarn rope without `factor` or `max_position_embeddings`"))? as f64 / orig as f64,
            };
            if factor.is_nan() || factor <= 0.0 {
                bail!(FileFormat, "config.json: rope factor {factor} is not positive");
            }
            // yarn_get_mscale: 0.1·m·ln(s) + 1 for s > 1, else 1.
            let mscale = |s: f64, m: f64| if s <= 1.0 { 1.0 } else { 0.1 * m * s.ln() + 1.0 };
            let attention_factor = match get_f64(&p, "attention_factor")? {
                Some(a) => a,
                None => match (get_f64(&p, "mscale")?.filter(|&x| x != 0.0), get_f64(&p, "mscale_all_dim")?.filter(|&x| x != 0.0)) {
                    (Some(a), Some(b)) => mscale(factor, a) / mscale(factor, b),
                    _ => mscale(factor, 1.0),
                },
            };
            if !attention_factor.is_finite() || attention_factor <= 0.0 {
                bail!(FileFormat, "config.json: yarn attention factor {attention_factor} is not positive");
            }
            // `or 32` / `or 1` in transformers: 0 and null take the default.
            let beta = |k: &str, d: f64| -> Result<f64> { Ok(get_f64(&p, k)?.filter(|&x| x != 0.0).unwrap_or(d)) };
            RopeScaling::Yarn {
                theta,
                factor,
                attention_factor,
                beta_fast: beta("beta_fast", 32.0)?,
                beta_slow: beta("beta_slow", 1.0)?,
                original_max_position_embeddings: orig,
                truncate: get_bool(&p, "truncate", true)?,
            }
        }
        "longrope" => parse_longrope(m, &p)?,
        other => bail!(Unsupported, "config.json: rope type `{other}` is not supported (default, linear, llama3, yarn and longrope are)"),
    };
    Ok((theta as f32, scaling))
}

/// LongRoPE's parameters (transformers `_compute_longrope_parameters` and
/// `standardize_rope_params`): `original_max_position_embeddings` from
/// the top level for Phi-3 (its config class defaults it to 4096), else
/// from the rope parameters, else `max_position_embeddings`; `factor`
/// stated or `max_position_embeddings / original`; `attention_factor`
/// stated or `√(1 + ln factor / ln original)` (1 for a factor ≤ 1).
fn parse_longrope(m: &Map<String, Value>, p: &Map<String, Value>) -> Result<RopeScaling> {
    let orig = if get_str(m, "model_type") == Some("phi3") {
        get_usize(m, "original_max_position_embeddings")?.unwrap_or(4096)
    } else {
        match get_usize(p, "original_max_position_embeddings")? {
            Some(o) => o,
            None => get_usize(m, "max_position_embeddings")?.ok_or_else(|| err!(FileFormat, "config.json: longrope without `original_max_position_embeddings` or `max_position_embeddings`"))?,
        }
    };
    if orig < 2 {
        bail!(FileFormat, "config.json: longrope original_max_position_embeddings {orig} must be at least 2");
    }
    let factor = match get_f64(p, "factor")? {
        Some(f) => f,
        None => get_usize(m, "max_position_embeddings")?.ok_or_else(|| err!(FileFormat, "config.json: longrope without `factor` or `max_position_embeddings`"))? as f64 / orig as f64,
    };
    let attention_factor = match get_f64(p, "attention_factor")? {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (orig as f64).ln()).sqrt(),
    };
    if !attention_factor.is_finite() || attention_factor <= 0.0 {
        bail!(FileFormat, "config.json: longrope attention factor {attention_factor} is not positive");
    }
    let list = |k: &str| -> Result<Vec<f32>> {
        let v = p.get(k).and_then(|v| v.as_array()).ok_or_else(|| err!(FileFormat, "config.json: longrope without a `{k}` list"))?;
        v.iter()
            .map(|x| match x.as_f64() {
                Some(f) if f.is_finite() && f > 0.0 => Ok(f as f32),
                _ => bail!(FileFormat, "config.json: longrope `{k}` holds {x}, not a positive number"),
            })
            .collect()
    };
    Ok(RopeScaling::LongRope { short_factor: list("short_factor")?, long_factor: list("long_factor")?, attention_factor, original_max_position_embeddings: orig })
}

/// The rotated elements of each head, `⌊head_dim·partial_rotary_factor⌋`
/// (transformers: the rope parameters' factor, else the top level's, else
/// 1), which must be even and positive.
fn rotary_dim_of(m: &Map<String, Value>, head_dim: usize) -> Result<usize> {
    let params = m.get("rope_parameters").or(m.get("rope_scaling")).and_then(|v| v.as_object());
    let f = match params.map(|p| get_f64(p, "partial_rotary_factor")).transpose()?.flatten() {
        Some(f) => f,
        None => get_f64(m, "partial_rotary_factor")?.unwrap_or(1.0),
    };
    let rot = (head_dim as f64 * f) as usize;
    if !(f > 0.0 && f <= 1.0) || rot == 0 || !rot.is_multiple_of(2) {
        bail!(Unsupported, "config.json: partial_rotary_factor {f} rotates {rot} of head_dim {head_dim} elements (an even count in 2..=head_dim is supported)");
    }
    Ok(rot)
}

fn inv_freq_of(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Vec<f32> {
    use crate::backend::cpu::rope::*;
    match *scaling {
        RopeScaling::LongRope { ref short_factor, .. } => rope_inv_freq_longrope(head_dim, theta, short_factor),
        RopeScaling::Default => rope_inv_freq(head_dim, theta),
        RopeScaling::Linear { factor } => rope_inv_freq_linear(head_dim, theta, factor),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            rope_inv_freq_llama3(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
        }
        RopeScaling::Yarn { theta, factor, beta_fast, beta_slow, original_max_position_embeddings, truncate, .. } => {
            rope_inv_freq_yarn(head_dim, theta, factor, beta_fast, beta_slow, original_max_position_embeddings, truncate)
        }
    }
}

/// The tables' frequencies and scale for one rotary setting (LongRoPE's
/// long frequencies beside the short ones).
fn freqs_of(head_dim: usize, theta: f32, scaling: &RopeScaling) -> crate::backend::cpu::rope::RopeFreqs {
    let long = match scaling {
        RopeScaling::LongRope { long_factor, original_max_position_embeddings, .. } => {
            Some((crate::backend::cpu::rope::rope_inv_freq_longrope(head_dim, theta, long_factor), *original_max_position_embeddings))
        }
        _ => None,
    };
    crate::backend::cpu::rope::RopeFreqs { inv_freq: inv_freq_of(head_dim, theta, scaling), scale: attention_scaling_of(scaling), long }
}

fn attention_scaling_of(scaling: &RopeScaling) -> f32 {
    match scaling {
        RopeScaling::Yarn { attention_factor, .. } | RopeScaling::LongRope { attention_factor, .. } => *attention_factor as f32,
        _ => 1.0,
    }
}

/// Gemma 3's two rotary settings: (full layers, sliding layers when they
/// differ). transformers 5 writes `rope_parameters` as
/// `{"full_attention": {...}, "sliding_attention": {...}}`; older files
/// give `rope_theta` (default 10⁶) and `rope_scaling` for the full layers
/// and `rope_local_base_freq` (default 10⁴) for the sliding ones.
fn parse_gemma3_rope(m: &Map<String, Value>) -> Result<((f32, RopeScaling), Option<(f32, RopeScaling)>)> {
    let sub = |p: Option<&Value>, default_theta: f64| -> Result<(f32, RopeScaling)> {
        let mut one = Map::new();
        for k in ["max_position_embeddings", "original_max_position_embeddings"] {
            if let Some(v) = m.get(k) {
                one.insert(k.into(), v.clone());
            }
        }
        let mut p = match p {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(v) => bail!(FileFormat, "config.json: rope parameters {v} are not an object"),
        };
        p.entry("rope_theta").or_insert(default_theta.into());
        one.insert("rope_parameters".into(), Value::Object(p));
        parse_rope(&one)
    };
    let (full, local) = match m.get("rope_parameters") {
        Some(Value::Object(p)) if p.contains_key("full_attention") || p.contains_key("sliding_attention") => {
            (sub(p.get("full_attention"), 1e6)?, sub(p.get("sliding_attention"), 1e4)?)
        }
        _ => {
            let mut full = match m.get("rope_parameters").or(m.get("rope_scaling")) {
                Some(Value::Object(p)) => p.clone(),
                None | Some(Value::Null) => Map::new(),
                Some(v) => bail!(FileFormat, "config.json: rope parameters {v} are not an object"),
            };
            if let Some(t) = m.get("rope_theta") {
                full.entry("rope_theta").or_insert(t.clone());
            }
            let local_theta = get_f64(m, "rope_local_base_freq")?.unwrap_or(1e4);
            (sub(Some(&Value::Object(full)), 1e6)?, sub(None, local_theta)?)
        }
    };
    let local = (local != full).then_some(local);
    Ok((full, local))
}

impl ModelConfig {
    /// Parses and validates `config.json` text.
    pub fn parse(text: &str) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text).map_err(|e| err!(FileFormat, "config.json is not valid JSON: {e}"))?;
        let Value::Object(m) = v else { bail!(FileFormat, "config.json is not a JSON object") };
        let mt = get_str(&m, "model_type").ok_or_else(|| err!(FileFormat, "config.json: `model_type` is missing"))?;
        let arch = match mt {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma" => Arch::Gemma,
            "gemma2" => Arch::Gemma2,
            "gemma3_text" => Arch::Gemma3,
            "granite" => Arch::Granite,
            "phi3" => Arch::Phi3,
            "olmo2" => Arch::Olmo2,
            "smollm3" => Arch::SmolLm3,
            "gemma3" => bail!(Unsupported, "model_type `gemma3` is the multimodal Gemma 3 (Gemma3ForConditionalGeneration); liblora reads the text-only `gemma3_text` (Gemma3ForCausalLM)"),
            other => bail!(Unsupported, "model_type `{other}` is not supported (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, granite, phi3, olmo2 and smollm3 are)"),
        };
        if let Some(Value::Array(a)) = m.get("architectures") {
            for x in a {
                let name = x.as_str().unwrap_or("");
                if name != arch.architecture() {
                    bail!(Unsupported, "architecture `{name}` is not supported for model_type `{mt}` (only {})", arch.architecture());
                }
            }
        }
        let hidden_size = need_usize(&m, "hidden_size")?;
        let num_heads = need_usize(&m, "num_attention_heads")?;
        let num_kv_heads = get_usize(&m, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!(FileFormat, "config.json: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}");
        }
        // transformers' Gemma configs default head_dim to 256.
        let head_dim = get_usize(&m, "head_dim")?.unwrap_or(if arch.is_gemma() { 256 } else { hidden_size / num_heads });
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!(FileFormat, "config.json: head_dim {head_dim} must be even and positive");
        }
        if get_usize(&m, "head_dim")?.is_none() && !arch.is_gemma() && hidden_size % num_heads != 0 {
            bail!(FileFormat, "config.json: hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}");
        }
        let act = match arch {
            // Gemma reads `hidden_act`, and takes the legacy "gelu" of the
            // official configs as the tanh approximation it was meant to be.
            Arch::Gemma => match get_str(&m, "hidden_act").unwrap_or("gelu_pytorch_tanh") {
                "gelu" | "gelu_pytorch_tanh" => Activation::GeluTanh,
                a => bail!(Unsupported, "config.json: hidden_act `{a}` is not supported for gemma (gelu_pytorch_tanh is)"),
            },
            Arch::Gemma2 | Arch::Gemma3 => match get_str(&m, "hidden_activation").unwrap_or("gelu_pytorch_tanh") {
                "gelu_pytorch_tanh" => Activation::GeluTanh,
                a => bail!(Unsupported, "config.json: hidden_activation `{a}` is not supported (gelu_pytorch_tanh is)"),
            },
            _ => match get_str(&m, "hidden_act").unwrap_or("silu") {
                "silu" => Activation::Silu,
                a => bail!(Unsupported, "config.json: hidden_act `{a}` is not supported (silu is)"),
            },
        };
        if arch.is_gemma() && get_bool(&m, "use_bidirectional_attention", false)? {
            bail!(Unsupported, "config.json: use_bidirectional_attention is not supported (causal attention is)");
        }
        if let Some(tp) = get_usize(&m, "pretraining_tp")? {
            if tp != 1 {
                bail!(Unsupported, "config.json: pretraining_tp {tp} is not supported (1 is)");
            }
        }
        // Dropout inside the model (Phi-3's residual and embedding dropout
        // too) would make training a different function.
        for k in ["attention_dropout", "resid_pdrop", "embd_pdrop"] {
            if let Some(p) = get_f64(&m, k)? {
                if p != 0.0 && (k == "attention_dropout" || arch == Arch::Phi3) {
                    bail!(Unsupported, "config.json: {k} {p} is not supported (0 is)");
                }
            }
        }
        let ((rope_theta, rope_scaling), local_rope) = match arch {
            Arch::Gemma3 => parse_gemma3_rope(&m)?,
            // transformers' SmolLM3Config defaults rope_theta to 2·10⁶.
            Arch::SmolLm3 => (parse_rope_or(&m, 2e6)?, None),
            _ => (parse_rope(&m)?, None),
        };
        let rotary_dim = rotary_dim_of(&m, head_dim)?;
        for sc in std::iter::once(&rope_scaling).chain(local_rope.as_ref().map(|(_, sc)| sc)) {
            if let RopeScaling::LongRope { short_factor, long_factor, .. } = sc {
                for (k, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                    if f.len() != rotary_dim / 2 {
                        bail!(FileFormat, "config.json: longrope `{k}` has {} factors; {rotary_dim} rotated elements per head need {}", f.len(), rotary_dim / 2);
                    }
                }
            }
        }
        let num_layers = need_usize(&m, "num_hidden_layers")?;
        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Arch::Llama | Arch::Granite | Arch::Olmo2 | Arch::SmolLm3 => {
                let ab = get_bool(&m, "attention_bias", false)?;
                (ab, ab, get_bool(&m, "mlp_bias", false)?)
            }
            Arch::Mistral | Arch::Phi3 => (false, false, false),
            Arch::Qwen2 => (true, false, false),
            Arch::Qwen3 | Arch::Gemma | Arch::Gemma2 | Arch::Gemma3 => {
                let ab = get_bool(&m, "attention_bias", false)?;
                (ab, ab, false)
            }
        };
        // Gemma 2/3 default to a 4096 window when the key is absent.
        // SmolLM3's NoPE layers: no_rope_layers[l] is 1 where layer l
        // rotates; by default every no_rope_layer_interval-th layer does not.
        let rope_layers: Vec<bool> = match (arch, m.get("no_rope_layers")) {
            (Arch::SmolLm3, Some(Value::Array(a))) => {
                if a.len() < num_layers {
                    bail!(FileFormat, "config.json: no_rope_layers has {} entries for {num_layers} layers", a.len());
                }
                a[..num_layers].iter().map(|v| v.as_i64().map(|x| x != 0).ok_or_else(|| err!(FileFormat, "config.json: no_rope_layers entry {v} is not 0 or 1"))).collect::<Result<_>>()?
            }
            (Arch::SmolLm3, _) => {
                let every = get_usize(&m, "no_rope_layer_interval")?.unwrap_or(4);
                if every == 0 {
                    bail!(FileFormat, "config.json: no_rope_layer_interval is 0");
                }
                (0..num_layers).map(|l| (l + 1) % every != 0).collect()
            }
            _ => vec![true; num_layers],
        };
        let sliding = match (arch, m.get("sliding_window")) {
            (Arch::Gemma2 | Arch::Gemma3, None) => Some(4096),
            _ => get_usize(&m, "sliding_window")?,
        };
        // Windows per layer from `layer_types` (full_attention /
        // sliding_attention).
        let from_layer_types = |a: &Vec<Value>| -> Result<Vec<Option<usize>>> {
            if a.len() != num_layers {
                bail!(FileFormat, "config.json: layer_types has {} entries for {num_layers} layers", a.len());
            }
            a.iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(None),
                    Some("sliding_attention") => sliding.map(Some).ok_or_else(|| err!(FileFormat, "config.json: a sliding_attention layer but no sliding_window")),
                    _ => Err(err!(Unsupported, "config.json: layer type {t} is not supported")),
                })
                .collect()
        };
        let windows = match arch {
            Arch::Llama | Arch::Gemma | Arch::Granite | Arch::Olmo2 => vec![None; num_layers],
            Arch::Mistral | Arch::Phi3 => vec![sliding; num_layers],
            Arch::SmolLm3 => {
                // Sliding only with use_sliding_window, on the layers
                // layer_types (or, without it, the NoPE layers) name.
                let sw = if get_bool(&m, "use_sliding_window", false)? { sliding } else { None };
                match (m.get("layer_types"), sw) {
                    (_, None) => vec![None; num_layers],
                    (Some(Value::Array(a)), Some(_)) => from_layer_types(a)?,
                    (_, Some(w)) => rope_layers.iter().map(|&r| (!r).then_some(w)).collect(),
                }
            }
            Arch::Gemma2 | Arch::Gemma3 if !matches!(m.get("layer_types"), Some(Value::Array(_))) => {
                // transformers' default layer_types: every `pattern`-th layer
                // full, the rest sliding (Gemma 2: pattern 2; Gemma 3:
                // `sliding_window_pattern`, 6).
                let pattern = if arch == Arch::Gemma2 { 2 } else { get_usize(&m, "sliding_window_pattern")?.unwrap_or(6) };
                if pattern == 0 {
                    bail!(FileFormat, "config.json: sliding_window_pattern is 0");
                }
                let sw = sliding.ok_or_else(|| err!(FileFormat, "config.json: sliding layers but no sliding_window"))?;
                (0..num_layers).map(|i| ((i + 1) % pattern != 0).then_some(sw)).collect()
            }
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma2 | Arch::Gemma3 => match m.get("layer_types") {
                Some(Value::Array(a)) => from_layer_types(a)?,
                _ => {
                    if get_bool(&m, "use_sliding_window", false)? {
                        let from = get_usize(&m, "max_window_layers")?.unwrap_or(num_layers);
                        (0..num_layers).map(|i| if i >= from { sliding } else { None }).collect()
                    } else {
                        vec![None; num_layers]
                    }
                }
            },
        };
        if windows.contains(&Some(0)) {
            bail!(FileFormat, "config.json: sliding_window is 0");
        }
        let eps = get_f64(&m, "rms_norm_eps")?.unwrap_or(1e-6);
        if !(eps > 0.0) {
            bail!(FileFormat, "config.json: rms_norm_eps {eps} is not positive");
        }
        let bnb_4bit = match m.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(q)) => {
                let method = get_str(q, "quant_method").unwrap_or("");
                if method != "bitsandbytes" || !get_bool(q, "load_in_4bit", false)? {
                    bail!(Unsupported, "config.json: quantization `{method}` is not supported (bitsandbytes 4-bit NF4 is)");
                }
                let qt = get_str(q, "bnb_4bit_quant_type").unwrap_or("fp4");
                if qt != "nf4" {
                    bail!(Unsupported, "config.json: bnb_4bit_quant_type `{qt}` is not supported (nf4 is)");
                }
                let skip = match q.get("llm_int8_skip_modules") {
                    Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
                    _ => Vec::new(),
                };
                Some(Bnb4bit { double_quant: get_bool(q, "bnb_4bit_use_double_quant", false)?, skip_modules: skip })
            }
            Some(v) => bail!(FileFormat, "config.json: quantization_config is {v}, not an object"),
        };
        let tie_default = arch.is_gemma() || arch == Arch::SmolLm3;
        // transformers' Gemma 2 defaults cap the scores at 50 and the logits
        // at 30 when the keys are absent; null turns a cap off.
        let cap = |k: &str, default: Option<f64>| -> Result<Option<f32>> {
            let c = match m.get(k) {
                None => default,
                Some(Value::Null) => None,
                Some(_) => get_f64(&m, k)?,
            };
            match c {
                Some(c) if !(c > 0.0 && c.is_finite()) => bail!(FileFormat, "config.json: `{k}` {c} is not positive"),
                c => Ok(c.map(|c| c as f32)),
            }
        };
        let (attn_softcap, final_softcap) = match arch {
            Arch::Gemma2 => (cap("attn_logit_softcapping", Some(50.0))?, cap("final_logit_softcapping", Some(30.0))?),
            Arch::Gemma3 => (cap("attn_logit_softcapping", None)?, cap("final_logit_softcapping", None)?),
            _ => (None, None),
        };
        // Granite's multipliers (transformers' defaults: 1).
        let multiplier = |k: &str| -> Result<f32> {
            let x = get_f64(&m, k)?.unwrap_or(1.0);
            if !(x > 0.0 && x.is_finite()) {
                bail!(FileFormat, "config.json: `{k}` {x} is not positive");
            }
            Ok(x as f32)
        };
        let granite = if arch == Arch::Granite {
            Some((multiplier("embedding_multiplier")?, multiplier("attention_multiplier")?, multiplier("residual_multiplier")?, multiplier("logits_scaling")?))
        } else {
            None
        };
        let attn_scale = match arch {
            Arch::Granite => granite.map_or(1.0, |g| g.1),
            Arch::Gemma2 | Arch::Gemma3 => {
                let s = get_f64(&m, "query_pre_attn_scalar")?.unwrap_or(256.0);
                if !(s > 0.0 && s.is_finite()) {
                    bail!(FileFormat, "config.json: query_pre_attn_scalar {s} is not positive");
                }
                s.powf(-0.5) as f32
            }
            _ => crate::backend::cpu::attention::softmax_scale(head_dim),
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: need_usize(&m, "vocab_size")?,
            hidden_size,
            intermediate_size: need_usize(&m, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            rms_norm_eps: eps as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: get_usize(&m, "max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: get_bool(&m, "tie_word_embeddings", tie_default)?,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3 | Arch::Olmo2),
            qk_norm_full: arch == Arch::Olmo2,
            no_input_norms: arch == Arch::Olmo2,
            windows,
            rope_layers,
            act,
            norm_offset: arch.is_gemma(),
            embed_scale: match granite {
                Some(g) => Some(g.0),
                None => arch.is_gemma().then(|| (hidden_size as f64).sqrt() as f32),
            },
            residual_scale: granite.map(|g| g.2),
            logits_divisor: granite.map(|g| g.3),
            sandwich_norm: matches!(arch, Arch::Gemma2 | Arch::Gemma3 | Arch::Olmo2),
            attn_scale,
            attn_softcap,
            final_softcap,
            local_rope,
            dtype: get_str(&m, "dtype").or(get_str(&m, "torch_dtype")).map(String::from),
            bos_token_id: m.get("bos_token_id").and_then(|v| v.as_i64()),
            eos_token_ids: token_ids(m.get("eos_token_id")),
            bnb_4bit,
            raw: m,
        };
        Ok(cfg)
    }

    /// `inv_freq` for this config's rotary settings (of the full layers).
    pub fn inv_freq(&self) -> Vec<f32> {
        inv_freq_of(self.rotary_dim, self.rope_theta, &self.rope_scaling)
    }

    /// The factor on cos and sin (transformers' `attention_scaling`): YaRN's
    /// `attention_factor`, else 1.
    pub fn rope_attention_scaling(&self) -> f32 {
        attention_scaling_of(&self.rope_scaling)
    }

    /// What every rotary table of this model is made from: `inv_freq`
    /// and the factor on cos and sin (of the full layers).
    pub fn rope_freqs(&self) -> crate::backend::cpu::rope::RopeFreqs {
        freqs_of(self.rotary_dim, self.rope_theta, &self.rope_scaling)
    }

    /// The sliding layers' rotary frequencies when they have their own
    /// (Gemma 3), else `None`.
    pub fn local_rope_freqs(&self) -> Option<crate::backend::cpu::rope::RopeFreqs> {
        self.local_rope.as_ref().map(|(theta, sc)| freqs_of(self.rotary_dim, *theta, sc))
    }

    /// Whether a call over positions below `len` takes LongRoPE's long
    /// frequencies (in any of the model's rotary settings; never without
    /// LongRoPE).
    pub fn rope_long_at(&self, len: usize) -> bool {
        std::iter::once(&self.rope_scaling)
            .chain(self.local_rope.as_ref().map(|(_, sc)| sc))
            .any(|sc| matches!(sc, RopeScaling::LongRope { original_max_position_embeddings: orig, .. } if len > *orig))
    }

    /// Whether a generation whose KV cache holds `len` positions must
    /// recompute it before the next token: LongRoPE switches to its long
    /// frequencies there, where transformers' Phi-3 `generate` drops its
    /// cache and recomputes every position with them.
    pub fn rope_switches_after(&self, len: usize) -> bool {
        !self.rope_long_at(len) && self.rope_long_at(len + 1)
    }

    /// Whether layer `l` rotates with the sliding layers' frequencies.
    pub fn local_rope_at(&self, l: usize) -> bool {
        self.local_rope.is_some() && self.windows[l].is_some()
    }

    /// Widths of the q and k norms' weights: one head, or the whole
    /// projection (OLMo 2).
    pub fn qk_norm_dims(&self) -> (usize, usize) {
        if self.qk_norm_full {
            (self.q_dim(), self.kv_dim())
        } else {
            (self.head_dim, self.head_dim)
        }
    }

    /// Layer `l`'s attention over a batch of `seq` tokens: heads, window,
    /// score scale and cap.
    pub fn attn_shape(&self, l: usize, batch: usize, seq: usize) -> crate::backend::cpu::attention::AttnShape {
        use crate::backend::cpu::attention::AttnShape;
        AttnShape { window: self.windows[l], scale: Some(self.attn_scale), softcap: self.attn_softcap, ..AttnShape::causal(batch, seq, self.num_heads, self.num_kv_heads, self.head_dim) }
    }

    /// Layer `l`'s decode attention over caches of `cap` rows.
    pub fn decode_shape(&self, l: usize, batch: usize, cap: usize) -> crate::backend::cpu::attention::DecodeShape {
        crate::backend::cpu::attention::DecodeShape {
            batch,
            cache_cap: cap,
            n_heads: self.num_heads,
            n_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            window: self.windows[l],
            scale: Some(self.attn_scale),
            softcap: self.attn_softcap,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"model_type":"llama","architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":256,"rms_norm_eps":1e-6,
        "rope_parameters":{"rope_type":"default","rope_theta":10000.0}}"#;

    fn with(k: &str, v: &str) -> String {
        let mut m: Map<String, Value> = serde_json::from_str(BASE).unwrap();
        m.insert(k.into(), serde_json::from_str(v).unwrap());
        Value::Object(m).to_string()
    }

    #[test]
    fn parses_llama() {
        let c = ModelConfig::parse(BASE).unwrap();
        assert_eq!((c.head_dim, c.num_kv_heads, c.rope_theta), (16, 2, 10000.0));
        assert!(!c.tie_word_embeddings && !c.qkv_bias);
    }

    #[test]
    fn refuses_by_name() {
        for (k, v, needle) in [
            ("model_type", "\"gpt2\"", "gpt2"),
            ("hidden_act", "\"gelu\"", "gelu"),
            ("pretraining_tp", "2", "pretraining_tp"),
            ("rope_parameters", r#"{"rope_type":"dynamic","rope_theta":1e4,"factor":2}"#, "dynamic"),
            ("partial_rotary_factor", "0.5", "partial_rotary_factor"),
            ("architectures", r#"["LlamaForSequenceClassification"]"#, "LlamaForSequenceClassification"),
            ("quantization_config", r#"{"quant_method":"gptq"}"#, "gptq"),
            ("attention_dropout", "0.1", "attention_dropout"),
        ] {
            let e = ModelConfig::parse(&with(k, v)).unwrap_err();
            assert!(e.message.contains(needle), "{k}: {}", e.message);
        }
        assert!(ModelConfig::parse(&with("num_key_value_heads", "3")).is_err());
        assert!(ModelConfig::parse("[1]").is_err());
    }

    #[test]
    fn parses_yarn_as_transformers_defaults_it() {
        let y = |rp: &str, top: &str| ModelConfig::parse(&with("rope_parameters", rp).replacen('{', &format!("{{{top}"), 1)).map(|c| c.rope_scaling);
        // Factor 4 → attention factor 0.1·ln 4 + 1; betas 32 / 1, truncated.
        let r = y(r#"{"rope_type":"yarn","rope_theta":1e6,"factor":4.0,"original_max_position_embeddings":32768}"#, "").unwrap();
        assert_eq!(r, RopeScaling::Yarn { theta: 1e6, factor: 4.0, attention_factor: 0.1 * 4f64.ln() + 1.0, beta_fast: 32.0, beta_slow: 1.0, original_max_position_embeddings: 32768, truncate: true });
        // No factor: max_position_embeddings / original; mscale ratio.
        let r = y(r#"{"rope_type":"yarn","rope_theta":1e4,"original_max_position_embeddings":1024,"mscale":1.0,"mscale_all_dim":0.5}"#, r#""max_position_embeddings":8192,"#).unwrap();
        let ms = |m: f64| 0.1 * m * 8f64.ln() + 1.0;
        assert_eq!(r, RopeScaling::Yarn { theta: 1e4, factor: 8.0, attention_factor: ms(1.0) / ms(0.5), beta_fast: 32.0, beta_slow: 1.0, original_max_position_embeddings: 1024, truncate: true });
        // A top-level original_max_position_embeddings wins (Phi-3's layout); an explicit attention factor is taken as is.
        let r = y(r#"{"rope_type":"yarn","rope_theta":1e4,"factor":2.0,"attention_factor":1.5,"original_max_position_embeddings":100,"truncate":false}"#, r#""original_max_position_embeddings":4096,"#).unwrap();
        assert_eq!(r, RopeScaling::Yarn { theta: 1e4, factor: 2.0, attention_factor: 1.5, beta_fast: 32.0, beta_slow: 1.0, original_max_position_embeddings: 4096, truncate: false });
        let c = ModelConfig::parse(&with("rope_parameters", r#"{"rope_type":"yarn","rope_theta":1e4,"factor":2.0,"attention_factor":1.5,"original_max_position_embeddings":64}"#)).unwrap();
        assert_eq!(c.rope_attention_scaling(), 1.5);
        assert_eq!(ModelConfig::parse(BASE).unwrap().rope_attention_scaling(), 1.0);
        // The transformers 4 form Qwen's model cards give: rope_theta at the
        // top, rope_scaling with `rope_type` (or the older `type`).
        for ty in ["rope_type", "type"] {
            let t = format!(
                r#"{{"model_type":"qwen3","hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":4,"head_dim":32,
                "vocab_size":256,"rope_theta":1000000,"rope_scaling":{{"{ty}":"yarn","factor":4.0,"original_max_position_embeddings":32768}}}}"#
            );
            let c = ModelConfig::parse(&t).unwrap();
            assert_eq!(c.rope_scaling, RopeScaling::Yarn { theta: 1e6, factor: 4.0, attention_factor: 0.1 * 4f64.ln() + 1.0, beta_fast: 32.0, beta_slow: 1.0, original_max_position_embeddings: 32768, truncate: true });
        }
        // Neither factor nor max_position_embeddings: an error, not a guess.
        assert!(y(r#"{"rope_type":"yarn","rope_theta":1e4,"original_max_position_embeddings":64}"#, "").is_err());
    }

    #[test]
    fn parses_qwen3() {
        let q3 = |extra: &str| {
            let t = format!(
                r#"{{"model_type":"qwen3","architectures":["Qwen3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
                "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,"vocab_size":256{extra}}}"#
            );
            ModelConfig::parse(&t)
        };
        let c = q3("").unwrap();
        assert_eq!((c.arch, c.head_dim, c.q_dim(), c.kv_dim()), (Arch::Qwen3, 32, 128, 64));
        assert!(c.qk_norm && !c.qkv_bias && !c.o_bias && !c.mlp_bias);
        assert_eq!(c.windows, vec![None; 3]);
        let c = q3(r#","attention_bias":true"#).unwrap();
        assert!(c.qkv_bias && c.o_bias && !c.mlp_bias);
        let c = q3(r#","use_sliding_window":true,"sliding_window":8,"max_window_layers":1"#).unwrap();
        assert_eq!(c.windows, vec![None, Some(8), Some(8)]);
        assert!(!ModelConfig::parse(BASE).unwrap().qk_norm);
        let e = q3(r#","architectures":["Qwen2ForCausalLM"]"#).unwrap_err();
        assert!(e.message.contains("Qwen2ForCausalLM"), "{}", e.message);
        // Qwen3-0.6B's config.json as published (transformers 4 form,
        // integer rope_theta, null rope_scaling and sliding_window).
        let c = ModelConfig::parse(
            r#"{"architectures":["Qwen3ForCausalLM"],"attention_bias":false,"attention_dropout":0.0,"bos_token_id":151643,
            "eos_token_id":151645,"head_dim":128,"hidden_act":"silu","hidden_size":1024,"initializer_range":0.02,
            "intermediate_size":3072,"max_position_embeddings":40960,"max_window_layers":28,"model_type":"qwen3",
            "num_attention_heads":16,"num_hidden_layers":28,"num_key_value_heads":8,"rms_norm_eps":1e-06,"rope_scaling":null,
            "rope_theta":1000000,"sliding_window":null,"tie_word_embeddings":true,"torch_dtype":"bfloat16",
            "transformers_version":"4.51.0","use_cache":true,"use_sliding_window":false,"vocab_size":151936}"#,
        )
        .unwrap();
        assert_eq!((c.q_dim(), c.kv_dim(), c.hidden_size, c.rope_theta, c.rope_scaling.clone()), (2048, 1024, 1024, 1e6, RopeScaling::Default));
        assert!(c.qk_norm && c.tie_word_embeddings && c.windows.iter().all(|w| w.is_none()));
        assert_eq!((c.dtype.as_deref(), c.eos_token_ids.as_slice()), (Some("bfloat16"), &[151645][..]));
    }

    // The published config.json of gemma-3-1b-it, gemma-2-2b and gemma-2b
    // (transformers 4 form). The expected values are what transformers
    // 5.25's Gemma3TextConfig / Gemma2Config / GemmaConfig make of them.
    const GEMMA3_1B: &str = r#"{"architectures":["Gemma3ForCausalLM"],"attention_bias":false,"attention_dropout":0.0,"attn_logit_softcapping":null,"bos_token_id":2,"cache_implementation":"hybrid","eos_token_id":[1,106],"final_logit_softcapping":null,"head_dim":256,"hidden_activation":"gelu_pytorch_tanh","hidden_size":1152,"initializer_range":0.02,"intermediate_size":6912,"max_position_embeddings":32768,"model_type":"gemma3_text","num_attention_heads":4,"num_hidden_layers":26,"num_key_value_heads":1,"pad_token_id":0,"query_pre_attn_scalar":256,"rms_norm_eps":1e-06,"rope_local_base_freq":10000,"rope_scaling":null,"rope_theta":1000000,"sliding_window":512,"sliding_window_pattern":6,"torch_dtype":"bfloat16","transformers_version":"4.50.0.dev0","use_cache":true,"vocab_size":262144}"#;
    const GEMMA2_2B: &str = r#"{"architectures":["Gemma2ForCausalLM"],"attention_bias":false,"attention_dropout":0.0,"attn_logit_softcapping":50.0,"bos_token_id":2,"cache_implementation":"hybrid","eos_token_id":[1,107],"final_logit_softcapping":30.0,"head_dim":256,"hidden_act":"gelu_pytorch_tanh","hidden_activation":"gelu_pytorch_tanh","hidden_size":2304,"initializer_range":0.02,"intermediate_size":9216,"max_position_embeddings":8192,"model_type":"gemma2","num_attention_heads":8,"num_hidden_layers":26,"num_key_value_heads":4,"pad_token_id":0,"query_pre_attn_scalar":256,"rms_norm_eps":1e-06,"rope_theta":10000.0,"sliding_window":4096,"torch_dtype":"float32","transformers_version":"4.42.4","use_cache":true,"vocab_size":256000}"#;
    const GEMMA_2B: &str = r#"{"architectures":["GemmaForCausalLM"],"attention_bias":false,"attention_dropout":0.0,"bos_token_id":2,"eos_token_id":1,"head_dim":256,"hidden_act":"gelu","hidden_activation":null,"hidden_size":2048,"initializer_range":0.02,"intermediate_size":16384,"max_position_embeddings":8192,"model_type":"gemma","num_attention_heads":8,"num_hidden_layers":18,"num_key_value_heads":1,"pad_token_id":0,"rms_norm_eps":1e-06,"rope_scaling":null,"rope_theta":10000.0,"torch_dtype":"bfloat16","transformers_version":"4.38.0.dev0","use_cache":true,"vocab_size":256000}"#;

    #[test]
    fn gemma3_1b_published_config() {
        let c = ModelConfig::parse(GEMMA3_1B).unwrap();
        assert_eq!(c.arch, Arch::Gemma3);
        let full: Vec<usize> = (0..c.num_layers).filter(|&l| c.windows[l].is_none()).collect();
        assert_eq!(full, [5, 11, 17, 23]); // sliding_window_pattern 6
        assert!(c.windows.iter().flatten().all(|&w| w == 512));
        assert_eq!((c.rope_theta, &c.rope_scaling), (1e6, &RopeScaling::Default));
        assert_eq!(c.local_rope, Some((1e4, RopeScaling::Default)));
        assert!(c.local_rope_at(0) && !c.local_rope_at(5));
        assert_eq!((c.q_dim(), c.kv_dim(), c.attn_scale), (1024, 256, 0.0625));
        assert_eq!((c.attn_softcap, c.final_softcap), (None, None));
        assert!(c.qk_norm && c.norm_offset && c.sandwich_norm && c.tie_word_embeddings && c.act == Activation::GeluTanh);
        assert_eq!(c.embed_scale, Some((1152f64).sqrt() as f32));
        assert_eq!(c.eos_token_ids, [1, 106]);
        // rope_scaling applies to the full layers only (Gemma 3 4B+).
        let mut m: Map<String, Value> = serde_json::from_str(GEMMA3_1B).unwrap();
        m.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": 8.0}));
        let c = ModelConfig::parse(&Value::Object(m).to_string()).unwrap();
        assert_eq!((c.rope_theta, &c.rope_scaling), (1e6, &RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(c.local_rope, Some((1e4, RopeScaling::Default)));
    }

    #[test]
    fn gemma2_and_gemma_published_configs() {
        let c = ModelConfig::parse(GEMMA2_2B).unwrap();
        assert_eq!(c.arch, Arch::Gemma2);
        assert_eq!(&c.windows[..4], &[Some(4096), None, Some(4096), None]);
        assert_eq!((c.attn_softcap, c.final_softcap, c.attn_scale), (Some(50.0), Some(30.0), 0.0625));
        assert!(!c.qk_norm && c.sandwich_norm && c.norm_offset && c.local_rope.is_none() && c.tie_word_embeddings);
        // Absent caps take transformers' defaults; null turns them off.
        let mut m: Map<String, Value> = serde_json::from_str(GEMMA2_2B).unwrap();
        m.remove("attn_logit_softcapping");
        m.insert("final_logit_softcapping".into(), Value::Null);
        let c = ModelConfig::parse(&Value::Object(m).to_string()).unwrap();
        assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), None));

        let c = ModelConfig::parse(GEMMA_2B).unwrap();
        assert_eq!(c.arch, Arch::Gemma);
        // The legacy "gelu" is the tanh approximation, as transformers says.
        assert_eq!(c.act, Activation::GeluTanh);
        assert_eq!((c.q_dim(), c.kv_dim(), c.attn_scale, c.embed_scale), (2048, 256, 0.0625, Some((2048f64).sqrt() as f32)));
        assert!(c.norm_offset && !c.sandwich_norm && !c.qk_norm && c.tie_word_embeddings && c.windows.iter().all(|w| w.is_none()));
        assert_eq!((c.attn_softcap, c.final_softcap), (None, None));
    }

    #[test]
    fn gemma_variants_it_cannot_compute_are_refused_by_name() {
        let with_g = |base: &str, k: &str, v: Value| {
            let mut m: Map<String, Value> = serde_json::from_str(base).unwrap();
            m.insert(k.into(), v);
            ModelConfig::parse(&Value::Object(m).to_string()).unwrap_err().to_string()
        };
        assert!(with_g(GEMMA3_1B, "model_type", "gemma3".into()).contains("gemma3_text"));
        assert!(with_g(GEMMA3_1B, "use_bidirectional_attention", true.into()).contains("use_bidirectional_attention"));
        assert!(with_g(GEMMA2_2B, "hidden_activation", "gelu".into()).contains("hidden_activation `gelu`"));
        assert!(with_g(GEMMA2_2B, "attn_logit_softcapping", (-1.0).into()).contains("attn_logit_softcapping"));
        assert!(with_g(GEMMA3_1B, "query_pre_attn_scalar", 0.into()).contains("query_pre_attn_scalar"));
        assert!(with_g(GEMMA3_1B, "sliding_window_pattern", 0.into()).contains("sliding_window_pattern"));
        assert!(with_g(GEMMA_2B, "hidden_act", "relu".into()).contains("hidden_act `relu`"));
    }

    #[test]
    fn granite_multipliers() {
        let g = r#"{"architectures":["GraniteForCausalLM"],"attention_bias":false,"attention_dropout":0.0,"attention_multiplier":0.015625,
            "embedding_multiplier":12.0,"hidden_act":"silu","hidden_size":2048,"intermediate_size":8192,"logits_scaling":8.0,
            "max_position_embeddings":131072,"mlp_bias":false,"model_type":"granite","num_attention_heads":32,"num_hidden_layers":40,
            "num_key_value_heads":8,"residual_multiplier":0.22,"rms_norm_eps":1e-05,"rope_scaling":null,"rope_theta":5000000.0,
            "tie_word_embeddings":true,"torch_dtype":"bfloat16","vocab_size":49155}"#;
        let c = ModelConfig::parse(g).unwrap();
        assert_eq!(c.arch, Arch::Granite);
        assert_eq!((c.embed_scale, c.attn_scale, c.residual_scale, c.logits_divisor), (Some(12.0), 0.015625, Some(0.22), Some(8.0)));
        assert!(c.tie_word_embeddings && !c.norm_offset && c.act == Activation::Silu);
        // transformers' defaults: every multiplier 1 (the scores unscaled).
        let mut m: Map<String, Value> = serde_json::from_str(g).unwrap();
        for k in ["attention_multiplier", "embedding_multiplier", "logits_scaling", "residual_multiplier"] {
            m.remove(k);
        }
        let c = ModelConfig::parse(&Value::Object(m.clone()).to_string()).unwrap();
        assert_eq!((c.embed_scale, c.attn_scale, c.residual_scale, c.logits_divisor), (Some(1.0), 1.0, Some(1.0), Some(1.0)));
        m.insert("logits_scaling".into(), 0.into());
        assert!(ModelConfig::parse(&Value::Object(m).to_string()).unwrap_err().to_string().contains("logits_scaling"));
    }

    #[test]
    fn phi3_config() {
        // Phi-3-mini-4k-instruct's layout (transformers 4 form); transformers
        // 5.25's Phi3Config reads it as sliding window 2047, default rope
        // 10⁴ with partial_rotary_factor 1, untied.
        let p = r#"{"architectures":["Phi3ForCausalLM"],"attention_bias":false,"attention_dropout":0.0,"bos_token_id":1,"embd_pdrop":0.0,
            "eos_token_id":32000,"hidden_act":"silu","hidden_size":3072,"initializer_range":0.02,"intermediate_size":8192,
            "max_position_embeddings":4096,"model_type":"phi3","num_attention_heads":32,"num_hidden_layers":32,"num_key_value_heads":32,
            "original_max_position_embeddings":4096,"pad_token_id":32000,"resid_pdrop":0.0,"rms_norm_eps":1e-05,"rope_scaling":null,
            "rope_theta":10000.0,"sliding_window":2047,"tie_word_embeddings":false,"torch_dtype":"bfloat16","use_cache":true,"vocab_size":32064}"#;
        let c = ModelConfig::parse(p).unwrap();
        assert!(c.arch == Arch::Phi3 && c.arch.fused());
        assert!(c.windows.iter().all(|&w| w == Some(2047)));
        assert_eq!((c.rope_theta, &c.rope_scaling, c.tie_word_embeddings, c.head_dim), (1e4, &RopeScaling::Default, false, 96));
        let with_p = |k: &str, v: Value| {
            let mut m: Map<String, Value> = serde_json::from_str(p).unwrap();
            m.insert(k.into(), v);
            ModelConfig::parse(&Value::Object(m).to_string())
        };
        // Dropout inside the model is refused by name.
        assert!(with_p("resid_pdrop", 0.1.into()).unwrap_err().to_string().contains("resid_pdrop"));
        assert!(with_p("embd_pdrop", 0.1.into()).unwrap_err().to_string().contains("embd_pdrop"));
        // A partial rotation (Phi-4-mini's 0.75): the first 72 of 96; one
        // that leaves an odd count is refused by name.
        let c = with_p("partial_rotary_factor", 0.75.into()).unwrap();
        assert_eq!((c.rotary_dim, c.rope_freqs().inv_freq.len(), ModelConfig::parse(p).unwrap().rotary_dim), (72, 36, 96));
        assert_eq!(c.rope_freqs().inv_freq[1], crate::backend::cpu::rope::rope_inv_freq(72, 1e4)[1]);
        assert!(with_p("partial_rotary_factor", 0.7.into()).unwrap_err().to_string().contains("partial_rotary_factor"));
        // LongRoPE as Phi-3.5-mini states it (max 131072 over the top-level
        // original 4096: factor 32, attention factor √(1 + ln 32 / ln 4096));
        // Phi3Config reads `su` and `yarn` as longrope too.
        let short: Vec<f64> = (0..48).map(|i| 1.0 + i as f64 / 16.0).collect();
        let long: Vec<f64> = (0..48).map(|i| 1.0 + i as f64).collect();
        for ty in ["longrope", "su", "yarn"] {
            let mut m: Map<String, Value> = serde_json::from_str(p).unwrap();
            m.insert("max_position_embeddings".into(), 131072.into());
            m.insert("rope_scaling".into(), serde_json::json!({"type": ty, "short_factor": short, "long_factor": long}));
            let c = ModelConfig::parse(&Value::Object(m).to_string()).unwrap();
            let want_af = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
            let RopeScaling::LongRope { short_factor, long_factor, attention_factor, original_max_position_embeddings } = &c.rope_scaling else { panic!("{ty}: {:?}", c.rope_scaling) };
            assert_eq!((short_factor.len(), long_factor[47], *original_max_position_embeddings), (48, 48.0, 4096), "{ty}");
            assert!((attention_factor - want_af).abs() < 1e-15, "{ty}: {attention_factor}");
            let f = c.rope_freqs();
            assert_eq!(f.scale, want_af as f32);
            // inv_freq[i] = 1 / (ext[i]·10⁴^(i/48)): short up to 4096 positions, long above.
            let (t_short, t_long) = (f.table(0, 4096), f.table(0, 4097));
            let p1 = |t: &crate::backend::cpu::rope::RopeTable, i: usize| (t.sin[t.half + i] / f.scale).asin();
            assert!((p1(&t_short, 1) as f64 - 1.0 / (short[1] * 1e4f64.powf(2.0 / 96.0))).abs() < 1e-6);
            assert!((p1(&t_long, 1) as f64 - 1.0 / (long[1] * 1e4f64.powf(2.0 / 96.0))).abs() < 1e-6);
            assert_eq!(f.table_at(&[7, 4095]).cos, f.table(0, 4096).cos.chunks(48).enumerate().filter(|(r, _)| [7, 4095].contains(r)).flat_map(|(_, c)| c.to_vec()).collect::<Vec<_>>());
            assert!(f.long_at(4097) && !f.long_at(4096));
        }
        let bad = serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": long});
        assert!(with_p("rope_scaling", bad).unwrap_err().to_string().contains("short_factor"));
        // Another family's longrope takes its original length from the rope
        // parameters (or max_position_embeddings), its factor from their ratio.
        let llama = with("rope_parameters", &serde_json::json!({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": vec![1.0; 8], "long_factor": vec![2.0; 8], "original_max_position_embeddings": 1024}).to_string());
        assert!(ModelConfig::parse(&llama).unwrap_err().to_string().contains("max_position_embeddings"));
        let mut m: Map<String, Value> = serde_json::from_str(&llama).unwrap();
        m.insert("max_position_embeddings".into(), 4096.into());
        let c = ModelConfig::parse(&Value::Object(m).to_string()).unwrap();
        let af = (1.0 + 4f64.ln() / 1024f64.ln()).sqrt();
        assert!(matches!(c.rope_scaling, RopeScaling::LongRope { original_max_position_embeddings: 1024, attention_factor, .. } if attention_factor == af), "{:?}", c.rope_scaling);
        // Llama's resid_pdrop-like keys mean nothing there.
        assert!(ModelConfig::parse(&with("resid_pdrop", "0.1")).is_ok());
    }

    #[test]
    fn olmo2_config() {
        // OLMo-2-1124-7B's layout (transformers 4 form).
        let c = ModelConfig::parse(
            r#"{"architectures":["Olmo2ForCausalLM"],"attention_bias":false,"attention_dropout":0.0,"eos_token_id":100257,"hidden_act":"silu",
            "hidden_size":4096,"intermediate_size":11008,"max_position_embeddings":4096,"model_type":"olmo2","num_attention_heads":32,
            "num_hidden_layers":32,"num_key_value_heads":32,"pad_token_id":100277,"rms_norm_eps":1e-06,"rope_scaling":null,"rope_theta":500000,
            "tie_word_embeddings":false,"torch_dtype":"float32","vocab_size":100352}"#,
        )
        .unwrap();
        assert_eq!(c.arch, Arch::Olmo2);
        assert!(c.qk_norm && c.qk_norm_full && c.no_input_norms && c.sandwich_norm && !c.norm_offset);
        assert_eq!((c.qk_norm_dims(), c.rope_theta, c.windows[0]), ((4096, 4096), 5e5, None));
    }

    #[test]
    fn smollm3_nope_layers_and_defaults() {
        // transformers' SmolLM3Config defaults: every 4th layer unrotated,
        // rope_theta 2·10⁶, tied, windows only with use_sliding_window.
        let base = r#"{"architectures":["SmolLM3ForCausalLM"],"model_type":"smollm3","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":8,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":256,"sliding_window":16}"#;
        let c = ModelConfig::parse(base).unwrap();
        assert_eq!(c.rope_layers, [true, true, true, false, true, true, true, false]);
        assert_eq!((c.rope_theta, c.tie_word_embeddings), (2e6, true));
        assert!(c.windows.iter().all(|w| w.is_none()));
        let with_s = |k: &str, v: Value| {
            let mut m: Map<String, Value> = serde_json::from_str(base).unwrap();
            m.insert(k.into(), v);
            ModelConfig::parse(&Value::Object(m).to_string())
        };
        // With use_sliding_window and no layer_types, the NoPE layers slide.
        let c = with_s("use_sliding_window", true.into()).unwrap();
        assert_eq!(c.windows[..4], [None, None, None, Some(16)]);
        let c = with_s("no_rope_layers", serde_json::json!([1, 0, 1, 1, 1, 1, 1, 1])).unwrap();
        assert_eq!(c.rope_layers[..3], [true, false, true]);
        assert!(with_s("no_rope_layers", serde_json::json!([1, 0])).unwrap_err().to_string().contains("no_rope_layers"));
        assert!(with_s("no_rope_layer_interval", 0.into()).unwrap_err().to_string().contains("no_rope_layer_interval"));
    }
}
