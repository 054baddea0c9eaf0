//! LLaMA-family causal language models (Llama, Mistral, Qwen2) with LoRA
//! adapters on their linear layers: loading, the training forward and
//! backward, inference and generation.
//!
//! The function computed is transformers' `LlamaForCausalLM` (eager
//! attention) in fp32:
//!
//! ```text
//! x = embed[ids]
//! per layer:  h = RMSNorm₁(x);  q,k,v = h·W_{q,k,v}ᵀ (+b);  q,k = RoPE(q,k)
//!             x = x + o_proj(causal_GQA_attention(q, k, v))
//!             h = RMSNorm₂(x);  x = x + down(silu(gate(h)) ⊙ up(h))
//! logits = RMSNorm_f(x) · W_headᵀ        (W_head = embed when tied)
//! ```
//!
//! Every linear layer is a [`LoraLayer`] (dense fp32 or NF4 base, frozen,
//! with adapters). Embeddings, norms and the head are frozen fp32.
//! Gradients flow only into adapters: the backward stops at the first
//! layer's input, so the embedding is never differentiated.

pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod gpu;
pub mod peft;

use crate::backend::cpu::attention::{attention_backward, attention_forward, AttnShape};
use crate::backend::cpu::loss::{cross_entropy_fused, IGNORE_INDEX};
use crate::backend::cpu::matmul::{gemm_f32, Mat};
use crate::backend::cpu::norm::{rmsnorm_backward, rmsnorm_forward};
use crate::backend::cpu::rope::{rope_backward, rope_forward, RopeTable};
use crate::backend::cpu::swiglu::{glu_backward, glu_forward};
use crate::dtype::DType;
use crate::lora::layer::{AdapterConfig, LoraLayer};
use crate::quant::nf4::{Nf4Params, Nf4Tensor};
use crate::rng::derive_seed;
use crate::Result;
use checkpoint::Checkpoint;
use config::ModelConfig;
use rayon::prelude::*;
use std::path::Path;

/// The linear modules of a decoder layer, in PyTorch's registration order
/// (the order of `model.parameters()`, which fixes the optimizer's and the
/// gradient norm's order).
pub const LINEARS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
pub const Q: usize = 0;
pub const K: usize = 1;
pub const V: usize = 2;
pub const O: usize = 3;
pub const GATE: usize = 4;
pub const UP: usize = 5;
pub const DOWN: usize = 6;

/// transformers' causal shift: position `t` of each sequence predicts
/// `labels[t+1]`; the last position predicts nothing (−100).
/// Token ids must lie in `[0, vocab)`.
pub(crate) fn check_token_ids(ids: &[i32], vocab: usize) -> Result<()> {
    if let Some((i, &t)) = ids.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= vocab) {
        bail!(InvalidArgument, "token id {t} at position {i} is outside [0, {vocab})");
    }
    Ok(())
}

/// Labels must be −100 (ignored) or in `[0, vocab)`.
pub(crate) fn check_labels(labels: &[i32], vocab: usize) -> Result<()> {
    if let Some((i, &y)) = labels.iter().enumerate().find(|(_, &y)| y != IGNORE_INDEX && (y < 0 || y as usize >= vocab)) {
        bail!(InvalidArgument, "label {y} at position {i} is neither -100 nor in [0, {vocab})");
    }
    Ok(())
}

pub fn shifted_targets(labels: &[i32], batch: usize, seq: usize) -> Vec<i32> {
    let mut targets = vec![IGNORE_INDEX; batch * seq];
    for b in 0..batch {
        targets[b * seq..(b + 1) * seq - 1].copy_from_slice(&labels[b * seq + 1..(b + 1) * seq]);
    }
    targets
}

/// The rotary tables of one forward: the full layers', and the sliding
/// layers' when they rotate with their own frequencies (Gemma 3).
pub(crate) struct Tables {
    full: RopeTable,
    local: Option<RopeTable>,
}

impl Tables {
    /// Layer `l`'s table.
    pub(crate) fn layer(&self, cfg: &ModelConfig, l: usize) -> &RopeTable {
        match &self.local {
            Some(t) if cfg.local_rope_at(l) => t,
            _ => &self.full,
        }
    }
}

/// `model.layers.{l}.self_attn.q_proj`, … : the module path PEFT keys use
/// (of the seven separate projections; [`module_path_in`] for any layout).
pub fn module_path(layer: usize, j: usize) -> String {
    let parent = if j < 4 { "self_attn" } else { "mlp" };
    format!("model.layers.{layer}.{parent}.{}", LINEARS[j])
}

/// Phi-3's linear modules: q/k/v and gate/up fused, in registration order.
pub const FUSED_LINEARS: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];
const QKV: usize = 0;
const F_O: usize = 1;
const GATE_UP: usize = 2;
const F_DOWN: usize = 3;

/// The projections reading one input: q, k, v (or Phi-3's `qkv_proj`) and
/// gate, up (or `gate_up_proj`).
#[derive(Clone, Copy)]
enum Group {
    Qkv,
    GateUp,
}

impl Group {
    /// `Block::lin` indices: the separate ones, and the fused one.
    fn linears(self) -> (&'static [usize], usize) {
        match self {
            Group::Qkv => (&[Q, K, V], QKV),
            Group::GateUp => (&[GATE, UP], GATE_UP),
        }
    }
}

/// `Block::lin` index of o_proj and down_proj, in the fused layout or not.
fn o_down(fused: bool) -> (usize, usize) {
    if fused {
        (F_O, F_DOWN)
    } else {
        (O, DOWN)
    }
}

/// The linear modules of one of `cfg`'s decoder layers, in [`Block::lin`] order.
pub fn linears(cfg: &ModelConfig) -> &'static [&'static str] {
    if cfg.arch.fused() {
        &FUSED_LINEARS
    } else {
        &LINEARS
    }
}

/// `(out_features, in_features, bias)` of each of [`linears`].
fn linear_shapes(cfg: &ModelConfig) -> Vec<(usize, usize, bool)> {
    let (h, it, qd, kvd) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
    if cfg.arch.fused() {
        vec![(qd + 2 * kvd, h, cfg.qkv_bias), (h, qd, cfg.o_bias), (2 * it, h, cfg.mlp_bias), (h, it, cfg.mlp_bias)]
    } else {
        let (qb, ob, mb) = (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias);
        vec![(qd, h, qb), (kvd, h, qb), (kvd, h, qb), (h, qd, ob), (it, h, mb), (it, h, mb), (h, it, mb)]
    }
}

/// The module path of linear `j` of layer `layer` in `cfg`'s layout.
pub fn module_path_in(cfg: &ModelConfig, layer: usize, j: usize) -> String {
    let names = linears(cfg);
    let attn = if cfg.arch.fused() { 2 } else { 4 };
    let parent = if j < attn { "self_attn" } else { "mlp" };
    format!("model.layers.{layer}.{parent}.{}", names[j])
}

/// Splits the rows of `[rows, Σ widths]` into one `[rows, width]` buffer
/// per width (a fused projection's outputs).
fn split_cols(pool: &mut BufPool, y: Vec<f32>, rows: usize, widths: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = widths.iter().sum();
    let mut out: Vec<Vec<f32>> = widths.iter().map(|&w| pool.take(rows * w)).collect();
    let mut at = 0;
    for (o, &w) in out.iter_mut().zip(widths) {
        o.par_chunks_mut(w).zip(y.par_chunks(total)).for_each(|(d, s)| d.copy_from_slice(&s[at..at + w]));
        at += w;
    }
    pool.give(y);
    out
}

/// The inverse of [`split_cols`]: `[rows, Σ widths]` from the parts
/// (a fused projection's output gradient).
fn concat_cols(pool: &mut BufPool, parts: &[&[f32]], rows: usize) -> Vec<f32> {
    let widths: Vec<usize> = parts.iter().map(|p| p.len() / rows.max(1)).collect();
    let total: usize = widths.iter().sum();
    let mut y = pool.take(rows * total);
    y.par_chunks_mut(total).enumerate().for_each(|(r, d)| {
        let mut at = 0;
        for (p, &w) in parts.iter().zip(&widths) {
            d[at..at + w].copy_from_slice(&p[r * w..(r + 1) * w]);
            at += w;
        }
    });
    y
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Block {
    /// The attention's and the MLP's input norms (`None`: OLMo 2, which
    /// normalizes the outputs only).
    pub attn_norm: Option<Vec<f32>>,
    pub mlp_norm: Option<Vec<f32>>,
    pub lin: Vec<LoraLayer>,
    /// Per-head RMSNorm weights `[head_dim]` of the queries and keys
    /// (`q_norm`, `k_norm`) when the architecture has them (Qwen3, Gemma 3).
    pub qk_norm: Option<[Vec<f32>; 2]>,
    /// Gemma 2/3: the norms on the attention output and on the MLP output
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`); the
    /// MLP's input norm (`mlp_norm`) is then `pre_feedforward_layernorm`.
    pub post_norms: Option<[Vec<f32>; 2]>,
}

impl Block {
    /// Backward of a projection group on input `x`: `dys` the outputs'
    /// gradients (concatenated for a fused projection); the input's
    /// gradient goes to (overwrites) `dx` when given.
    fn group_backward(&mut self, pool: &mut BufPool, group: Group, fused: bool, x: &[f32], dys: &[&[f32]], n: usize, mut dx: Option<&mut [f32]>) -> Result<()> {
        let (js, fj) = group.linears();
        if fused {
            let dy = concat_cols(pool, dys, n);
            self.lin[fj].backward_into(x, &dy, n, dx, false)?;
            pool.give(dy);
            return Ok(());
        }
        for (i, (&j, dy)) in js.iter().zip(dys).enumerate() {
            self.lin[j].backward_into(x, dy, n, dx.as_deref_mut(), i > 0)?;
        }
        Ok(())
    }

    /// Checkpoint names of layer `l`'s norms in [`norms`](Self::norms)
    /// order (`None` where the architecture has none).
    fn norm_names(cfg: &ModelConfig, l: usize) -> [Option<String>; 6] {
        let p = format!("model.layers.{l}");
        let name = |on: bool, n: &str| on.then(|| format!("{p}.{n}.weight"));
        let (input, sandwich, qk) = (!cfg.no_input_norms, cfg.sandwich_norm, cfg.qk_norm);
        [
            name(input, "input_layernorm"),
            name(input, if sandwich { "pre_feedforward_layernorm" } else { "post_attention_layernorm" }),
            name(sandwich, "post_attention_layernorm"),
            name(sandwich, "post_feedforward_layernorm"),
            name(qk, "self_attn.q_norm"),
            name(qk, "self_attn.k_norm"),
        ]
    }

    /// The layer's norm weights: attention input, MLP input, attention
    /// output, MLP output, q, k.
    fn norms(&self) -> [Option<&Vec<f32>>; 6] {
        fn pair(w: &Option<[Vec<f32>; 2]>, i: usize) -> Option<&Vec<f32>> {
            w.as_ref().map(|w| &w[i])
        }
        [self.attn_norm.as_ref(), self.mlp_norm.as_ref(), pair(&self.post_norms, 0), pair(&self.post_norms, 1), pair(&self.qk_norm, 0), pair(&self.qk_norm, 1)]
    }

    /// Output norm `i` (0: attention, 1: MLP), where the layer has them.
    fn post(&self, i: usize) -> Option<&Vec<f32>> {
        self.norms()[2 + i]
    }

    /// Elements of the layer's norm weights.
    fn norm_elems(&self) -> usize {
        self.norms().iter().flatten().map(|w| w.len()).sum()
    }
}

/// A model-level adapter: its PEFT configuration and where it lives.
#[derive(Clone, Debug)]
pub struct AdapterInfo {
    pub name: String,
    pub spec: peft::AdapterSpec,
    /// (layer, linear index) of every module that carries it.
    pub modules: Vec<(usize, usize)>,
}

/// Load-time options.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Quantize every linear layer but the head to NF4 (QLoRA).
    pub quantize: Option<Nf4Params>,
    /// Seed for adapter initialization and dropout.
    pub seed: u64,
}

/// Bytes held, by category (the C API's `lora_memory_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    pub base_weights: usize,
    /// Of which: NF4-quantized linear weights (footprint as stored).
    pub base_quantized: usize,
    /// Number of weights stored in NF4.
    pub quantized_weights: usize,
    pub adapters: usize,
    pub optimizer: usize,
    /// Activations held for the backward at the last training step's peak.
    pub activations: usize,
    pub kv_cache: usize,
    /// The largest total observed (static + activations/cache) so far.
    pub peak: usize,
}

/// A decoder-only language model with LoRA adapters.
#[derive(Clone, Debug)]
pub struct Model {
    pub cfg: ModelConfig,
    /// `[vocab, hidden]`.
    pub embed: Vec<f32>,
    pub blocks: Vec<Block>,
    pub norm: Vec<f32>,
    /// `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Vec<f32>>,
    /// The rotary frequencies every forward's table is made from.
    freqs: crate::backend::cpu::rope::RopeFreqs,
    /// The sliding layers' own frequencies (Gemma 3), if any.
    local_freqs: Option<crate::backend::cpu::rope::RopeFreqs>,
    /// Norm weights as the checkpoint stores them, by tensor name, where
    /// the model multiplies by `1 + w` (Gemma): the blocks hold `1 + w`,
    /// the export writes these back bit for bit.
    raw_norms: std::collections::HashMap<String, Vec<f32>>,
    /// dtype of the checkpoint's dense tensors (for export).
    pub dtype: DType,
    /// NF4 parameters when the linear layers are NF4.
    pub quant: Option<Nf4Params>,
    pub adapters: Vec<AdapterInfo>,
    /// Active adapters and multipliers (model level).
    active: Vec<(String, f32)>,
    merged: bool,
    pub seed: u64,
    /// Largest activation / KV-cache bytes seen (see [`MemStats`]).
    pub(crate) act_peak: usize,
    pub(crate) kv_bytes: usize,
    pub(crate) peak: usize,
    pub(crate) pool: BufPool,
    /// The copy on a CUDA device, when the model is on one
    /// ([`Model::use_device`]).
    pub(crate) gpu: gpu::DeviceCopy,
    /// Counts changes to the adapters (added, removed, weights written):
    /// the device copy re-syncs when it differs from the last one it saw.
    adapters_version: u64,
}

/// Recycled fp32 buffers: a training step allocates the same activation
/// and gradient buffers every time, and returning them to the system
/// allocator (which unmaps large blocks) costs a page fault and a page
/// clear per 4 KiB on the next step — about a fifth of a small model's
/// step time. Buffers are zero-filled when handed out.
#[derive(Clone, Debug, Default)]
pub(crate) struct BufPool {
    free: Vec<Vec<f32>>,
    free_bytes: usize,
}

impl BufPool {
    /// A buffer of `n` floats, reusing the smallest free one that fits. Its
    /// contents are unspecified (what an earlier use left there, zeros
    /// past that): every caller overwrites the whole buffer, so clearing
    /// it first (a memset of every activation, ~3% of a step) is skipped.
    pub(crate) fn take(&mut self, n: usize) -> Vec<f32> {
        let mut best: Option<usize> = None;
        for (i, v) in self.free.iter().enumerate() {
            if v.capacity() >= n && best.is_none_or(|b| self.free[b].capacity() > v.capacity()) {
                best = Some(i);
            }
        }
        match best {
            Some(i) => {
                let mut v = self.free.swap_remove(i);
                self.free_bytes -= v.capacity() * 4;
                v.truncate(n);
                v.resize(n, 0.0);
                v
            }
            None => vec![0.0; n],
        }
    }

    /// A buffer holding a copy of `src`.
    pub(crate) fn copy_of(&mut self, src: &[f32]) -> Vec<f32> {
        let mut v = self.take(src.len());
        v.copy_from_slice(src);
        v
    }

    /// Returns a buffer for reuse.
    pub(crate) fn give(&mut self, v: Vec<f32>) {
        if v.capacity() > 0 {
            self.free_bytes += v.capacity() * 4;
            self.free.push(v);
        }
    }

    /// Frees the smallest buffers until at most `max_bytes` are kept: the
    /// model trims to one step's working set after each call.
    pub(crate) fn trim(&mut self, max_bytes: usize) {
        if self.free_bytes <= max_bytes {
            return;
        }
        self.free.sort_by_key(|v| std::cmp::Reverse(v.capacity()));
        while self.free_bytes > max_bytes {
            let v = self.free.pop().expect("free_bytes counts these");
            self.free_bytes -= v.capacity() * 4;
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.free_bytes
    }
}

/// Saved activations of one layer for its backward.
struct LayerActs {
    h1: Vec<f32>,
    rstd1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    lse: Vec<f32>,
    x_mid: Vec<f32>,
    h2: Vec<f32>,
    rstd2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    a: Vec<f32>,
    /// With per-head q/k norms: q and k before them, and their rstds.
    qk: Option<QkActs>,
    /// With Gemma 2/3's output norms: the attention output (o_proj's) and
    /// the MLP output (down_proj's) before them, with their rstds.
    post: [Option<(Vec<f32>, Vec<f32>)>; 2],
}

/// What the backward of the per-head q/k RMSNorm needs.
struct QkActs {
    q_raw: Vec<f32>,
    k_raw: Vec<f32>,
    rq: Vec<f32>,
    rk: Vec<f32>,
}

impl QkActs {
    fn bufs(self) -> [Vec<f32>; 4] {
        [self.q_raw, self.k_raw, self.rq, self.rk]
    }
}

impl LayerActs {
    fn recycle(self, pool: &mut BufPool) {
        for v in [self.h1, self.rstd1, self.q, self.k, self.v, self.att, self.lse, self.x_mid, self.h2, self.rstd2, self.g, self.u, self.a] {
            pool.give(v);
        }
        for v in self.qk.into_iter().flat_map(QkActs::bufs) {
            pool.give(v);
        }
        for (y, r) in self.post.into_iter().flatten() {
            pool.give(y);
            pool.give(r);
        }
    }

    fn bytes(&self) -> usize {
        let qk = self.qk.as_ref().map_or(0, |a| a.q_raw.len() + a.k_raw.len() + a.rq.len() + a.rk.len())
            + self.post.iter().flatten().map(|(y, r)| y.len() + r.len()).sum::<usize>();
        4 * ([&self.h1, &self.rstd1, &self.q, &self.k, &self.v, &self.att, &self.lse, &self.x_mid, &self.h2, &self.rstd2, &self.g, &self.u, &self.a]
            .iter()
            .map(|v| v.len())
            .sum::<usize>()
            + qk)
    }
}

/// The per-head RMSNorm of queries and keys (`[rows·heads, head_dim]`
/// each), in place: `q`, `k` become the normed values; with `keep`, the
/// inputs and rstds are returned for the backward.
fn qk_norm_forward(pool: &mut BufPool, w: &[Vec<f32>; 2], q: &mut Vec<f32>, k: &mut Vec<f32>, eps: f32, keep: bool) -> Option<QkActs> {
    // Per head (Qwen3, Gemma 3: weights [head_dim]) or over the whole
    // projection (OLMo 2: [q_dim], [kv_dim]): rows of the weights' width.
    let (dq, dk) = (w[0].len(), w[1].len());
    let (nq, nk) = (q.len() / dq, k.len() / dk);
    let q_raw = std::mem::replace(q, pool.take(nq * dq));
    let k_raw = std::mem::replace(k, pool.take(nk * dk));
    let (mut rq, mut rk) = (pool.take(nq), pool.take(nk));
    rmsnorm_forward(&q_raw, &w[0], nq, dq, eps, q, Some(&mut rq));
    rmsnorm_forward(&k_raw, &w[1], nk, dk, eps, k, Some(&mut rk));
    let acts = QkActs { q_raw, k_raw, rq, rk };
    if keep {
        Some(acts)
    } else {
        for v in acts.bufs() {
            pool.give(v);
        }
        None
    }
}

/// Backward of [`qk_norm_forward`]: `dq`, `dk` (gradients of the normed
/// values) become those of its inputs.
fn qk_norm_backward(pool: &mut BufPool, w: &[Vec<f32>; 2], acts: QkActs, dq: &mut Vec<f32>, dk: &mut Vec<f32>) {
    for (i, (raw, r, d)) in [(&acts.q_raw, &acts.rq, &mut *dq), (&acts.k_raw, &acts.rk, &mut *dk)].into_iter().enumerate() {
        let mut dr = pool.take(raw.len());
        rmsnorm_backward(raw, &w[i], r, d, r.len(), w[i].len(), &mut dr, None);
        pool.give(std::mem::replace(d, dr));
    }
    for v in acts.bufs() {
        pool.give(v);
    }
}

/// A branch's input: `RMSNorm(x)·w` (its rstd into `rstd`), or `x` itself
/// where the model has no input norm (OLMo 2).
fn input_norm(pool: &mut BufPool, w: Option<&Vec<f32>>, x: &[f32], rows: usize, dim: usize, eps: f32, rstd: Option<&mut [f32]>) -> Vec<f32> {
    match w {
        Some(w) => {
            let mut y = pool.take(rows * dim);
            rmsnorm_forward(x, w, rows, dim, eps, &mut y, rstd);
            y
        }
        None => pool.copy_of(x),
    }
}

/// Backward of [`input_norm`]: writes the gradient of `x` into `dx`.
fn input_norm_backward(w: Option<&Vec<f32>>, x: &[f32], rstd: &[f32], dy: &[f32], rows: usize, dim: usize, dx: &mut [f32]) {
    match w {
        Some(w) => rmsnorm_backward(x, w, rstd, dy, rows, dim, dx, None),
        None => dx.copy_from_slice(dy),
    }
}

/// `x += y`, or with an output norm (Gemma 2/3) `x += RMSNorm(y)·w`, or
/// with a residual multiplier (Granite) `x += y·m`; `y` goes back to the
/// pool, or with `keep` (and a norm) is returned with its rstd for
/// [`residual_backward`].
#[allow(clippy::too_many_arguments)]
fn residual_add(pool: &mut BufPool, w: Option<&Vec<f32>>, scale: Option<f32>, y: Vec<f32>, x: &mut [f32], rows: usize, dim: usize, eps: f32, keep: bool) -> Option<(Vec<f32>, Vec<f32>)> {
    let Some(w) = w else {
        match scale {
            None => x.par_iter_mut().zip(y.par_iter()).for_each(|(a, b)| *a += b),
            Some(m) => x.par_iter_mut().zip(y.par_iter()).for_each(|(a, b)| *a += b * m),
        }
        pool.give(y);
        return None;
    };
    debug_assert!(scale.is_none(), "an output norm and a residual multiplier");
    let mut yn = pool.take(rows * dim);
    let mut r = pool.take(rows);
    rmsnorm_forward(&y, w, rows, dim, eps, &mut yn, Some(&mut r));
    x.par_iter_mut().zip(yn.par_iter()).for_each(|(a, b)| *a += b);
    pool.give(yn);
    if keep {
        Some((y, r))
    } else {
        pool.give(y);
        pool.give(r);
        None
    }
}

/// The gradient of a branch output `y` from that of the residual stream
/// `dx` ([`residual_add`]): `None` without a norm or multiplier (it is `dx`
/// itself), else through the norm or times the multiplier.
fn residual_backward(pool: &mut BufPool, w: Option<&Vec<f32>>, scale: Option<f32>, saved: Option<(Vec<f32>, Vec<f32>)>, dx: &[f32], dim: usize) -> Result<Option<Vec<f32>>> {
    match (w, saved) {
        (None, None) => Ok(scale.map(|m| {
            let mut dy = pool.take(dx.len());
            dy.par_iter_mut().zip(dx.par_iter()).for_each(|(d, g)| *d = g * m);
            dy
        })),
        (Some(w), Some((y, r))) => {
            let mut dy = pool.take(dx.len());
            rmsnorm_backward(&y, w, &r, dx, r.len(), dim, &mut dy, None);
            pool.give(y);
            pool.give(r);
            Ok(Some(dy))
        }
        _ => bail!(Internal, "layer activations without the output norm inputs"),
    }
}

/// Per-row adapter choice for a mixed batch, resolved per linear layer.
#[derive(Clone, Debug)]
pub struct RowAdapters {
    /// Per token row, the model-level adapter index (−1: base only).
    pub rows: Vec<i32>,
}

/// Result of one forward+backward over a micro-batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct MicroResult {
    /// Σ per-token losses over counted tokens.
    pub loss_sum: f64,
    pub count: usize,
}

/// The error of a device operation on a model that is not on one.
fn not_on_device() -> crate::Error {
    err!(InvalidState, "the model is not on a device (lora_model_use_device)")
}

impl Model {
    /// Loads a Hugging Face checkpoint directory. `progress(done, total)`
    /// is called after each tensor group; returning `false` cancels.
    pub fn load(dir: &Path, opts: LoadOptions, progress: &mut dyn FnMut(usize, usize) -> bool) -> Result<Model> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| err!(Io, "{}: cannot read: {e}", cfg_path.display()))?;
        let cfg = ModelConfig::parse(&text).map_err(|e| e.context(&cfg_path.display().to_string()))?;
        let ck = Checkpoint::open(dir)?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut expected: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut take = |n: &str| {
            expected.insert(n.to_string());
            n.to_string()
        };
        let embed_name = take("model.embed_tokens.weight");
        let dtype = ck.dtype_of(&embed_name)?.ok_or_else(|| err!(DtypeMismatch, "model.embed_tokens.weight is not a float tensor"))?;
        let embed = ck.dense(&embed_name, &[v, h])?.into_f32();
        // Norm weights; Gemma multiplies by 1 + w, kept as such, with the
        // stored w set aside for the export.
        let mut raw_norms = std::collections::HashMap::new();
        let mut read_norm = |name: String, len: usize| -> Result<Vec<f32>> {
            let w = ck.dense(&name, &[len])?.into_f32();
            if !cfg.norm_offset {
                return Ok(w);
            }
            let eff = w.iter().map(|x| 1.0 + x).collect();
            raw_norms.insert(name, w);
            Ok(eff)
        };
        let norm = read_norm(take("model.norm.weight"), h)?;
        let lm_head = if cfg.tie_word_embeddings {
            if ck.contains("lm_head.weight") {
                take("lm_head.weight");
            }
            None
        } else {
            Some(ck.dense(&take("lm_head.weight"), &[v, h])?.into_f32())
        };
        let total = cfg.num_layers;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        let bnb = cfg.bnb_4bit.clone();
        let shapes = linear_shapes(&cfg);
        let (dq, dk) = cfg.qk_norm_dims();
        for l in 0..cfg.num_layers {
            let mut norms: [Option<Vec<f32>>; 6] = Default::default();
            for ((w, name), len) in norms.iter_mut().zip(Block::norm_names(&cfg, l)).zip([h, h, h, h, dq, dk]) {
                if let Some(name) = name {
                    *w = Some(read_norm(take(&name), len)?);
                }
            }
            let [attn_norm, mlp_norm, post_a, post_f, q_norm, k_norm] = norms;
            let mut lin = Vec::with_capacity(shapes.len());
            for (j, &(out_f, in_f, has_bias)) in shapes.iter().enumerate() {
                let m = module_path_in(&cfg, l, j);
                let seed = derive_seed(opts.seed, &m);
                let bias = if has_bias { Some(ck.dense(&take(&format!("{m}.bias")), &[out_f])?.into_f32()) } else { None };
                let layer = if ck.is_nf4(&m) {
                    if bnb.is_none() {
                        bail!(FileFormat, "{}: '{m}' is stored 4-bit but config.json has no bitsandbytes quantization_config", dir.display());
                    }
                    for suf in [".weight", ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map", ".weight.quant_state.bitsandbytes__nf4"] {
                        take(&format!("{m}{suf}"));
                    }
                    let t = ck.nf4(&m, out_f, in_f).map_err(|e| e.context(&m))?;
                    LoraLayer::new_nf4(t, bias, seed)?
                } else {
                    let w = ck.dense(&take(&format!("{m}.weight")), &[out_f, in_f])?;
                    match opts.quantize {
                        Some(qp) => {
                            // Quantized from the checkpoint's own dtype, as
                            // transformers + bitsandbytes do; the dense copy
                            // is dropped before the next layer is read.
                            let t = Nf4Tensor::quantize(w.elems(), &[out_f, in_f], qp).map_err(|e| e.context(&m))?;
                            drop(w);
                            LoraLayer::new_nf4(t, bias, seed)?
                        }
                        None => LoraLayer::new_dense(w.elems(), in_f, out_f, false, bias, seed).map_err(|e| e.context(&m))?,
                    }
                };
                lin.push(layer);
            }
            let (qk_norm, post_norms) = (q_norm.zip(k_norm).map(<[_; 2]>::from), post_a.zip(post_f).map(<[_; 2]>::from));
            blocks.push(Block { attn_norm, mlp_norm, lin, qk_norm, post_norms });
            if !progress(l + 1, total) {
                bail!(Cancelled, "loading cancelled by the progress callback after layer {l}");
            }
        }
        // Anything else in the checkpoint is a tensor this architecture
        // does not have: refuse it rather than compute without it.
        for n in ck.names() {
            if !expected.contains(n) && !n.ends_with(".rotary_emb.inv_freq") {
                bail!(Unsupported, "{}: unexpected tensor '{n}' for {}", dir.display(), cfg.arch.architecture());
            }
        }
        let quant = if blocks.iter().all(|b| b.lin.iter().all(|l| l.is_nf4())) {
            blocks.first().and_then(|b| b.lin[0].nf4_base()).map(|t| Nf4Params { blocksize: t.blocksize(), double_quant: t.is_double_quant() })
        } else {
            None
        };
        let mut m = Model::assemble(cfg, embed, blocks, norm, lm_head, dtype, quant, opts.seed);
        m.raw_norms = raw_norms;
        Ok(m)
    }

    /// A model from its parts, without adapters.
    #[allow(clippy::too_many_arguments)]
    fn assemble(cfg: ModelConfig, embed: Vec<f32>, blocks: Vec<Block>, norm: Vec<f32>, lm_head: Option<Vec<f32>>, dtype: DType, quant: Option<Nf4Params>, seed: u64) -> Model {
        let freqs = cfg.rope_freqs();
        let local_freqs = cfg.local_rope_freqs();
        let mut m = Model {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            freqs,
            local_freqs,
            raw_norms: Default::default(),
            dtype,
            quant,
            adapters: Vec::new(),
            active: Vec::new(),
            merged: false,
            seed,
            act_peak: 0,
            kv_bytes: 0,
            peak: 0,
            pool: BufPool::default(),
            gpu: gpu::DeviceCopy::default(),
            adapters_version: 0,
        };
        m.note_peak(0);
        m
    }

    /// A model of the architecture in `config_json` (config.json text)
    /// with random weights, as transformers initializes one (normal, std
    /// `std` for matrices and the embedding, ones for norms, zero biases),
    /// quantized to NF4 when `opts.quantize` says so. For benchmarks and
    /// tests of sizes no fixture has; deterministic in `opts.seed`.
    pub fn random(config_json: &str, std: f32, opts: LoadOptions) -> Result<Model> {
        let cfg = ModelConfig::parse(config_json)?;
        if cfg.bnb_4bit.is_some() {
            bail!(Unsupported, "a random model takes a config without quantization_config (use LoadOptions::quantize)");
        }
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let rand = |name: &str, n: usize| -> Vec<f32> {
            const CHUNK: usize = 1 << 20;
            let mut w = vec![0f32; n];
            let base = derive_seed(opts.seed, name);
            w.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                let mut r = crate::rng::SplitMix64::new(derive_seed(base, &c.to_string()));
                o.iter_mut().for_each(|x| *x = r.normal() * std);
            });
            w
        };
        let embed = rand("model.embed_tokens.weight", v * h);
        let lm_head = (!cfg.tie_word_embeddings).then(|| rand("lm_head.weight", v * h));
        let shapes = linear_shapes(&cfg);
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let mut lin = Vec::with_capacity(shapes.len());
            for (j, &(out_f, in_f, has_bias)) in shapes.iter().enumerate() {
                let m = module_path_in(&cfg, l, j);
                let w = rand(&m, out_f * in_f);
                let bias = has_bias.then(|| vec![0f32; out_f]);
                let seed = derive_seed(opts.seed, &m);
                lin.push(match opts.quantize {
                    Some(qp) => LoraLayer::new_nf4(Nf4Tensor::quantize(crate::dtype::Elems::F32(&w), &[out_f, in_f], qp)?, bias, seed)?,
                    None => LoraLayer::new_dense(crate::dtype::Elems::F32(&w), in_f, out_f, false, bias, seed)?,
                });
            }
            // Multiplying by one: ones, or Gemma's zeros (1 + w).
            let (dq, dk) = cfg.qk_norm_dims();
            let qk_norm = cfg.qk_norm.then(|| [vec![1.0; dq], vec![1.0; dk]]);
            let post_norms = cfg.sandwich_norm.then(|| [vec![1.0; h], vec![1.0; h]]);
            let input = (!cfg.no_input_norms).then(|| vec![1.0; h]);
            blocks.push(Block { attn_norm: input.clone(), mlp_norm: input, lin, qk_norm, post_norms });
        }
        Ok(Model::assemble(cfg, embed, blocks, vec![1.0; h], lm_head, DType::F32, opts.quantize, opts.seed))
    }

    pub fn hidden(&self) -> usize {
        self.cfg.hidden_size
    }
    pub fn vocab(&self) -> usize {
        self.cfg.vocab_size
    }
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// The adapter change counter (see the field).
    pub fn adapters_version(&self) -> u64 {
        self.adapters_version
    }

    /// Notes that adapter weights or the adapter list changed.
    pub(crate) fn touch_adapters(&mut self) {
        self.adapters_version += 1;
    }

    /// Puts the model on CUDA device `ordinal` with `compute` precision
    /// (`Some`), or takes it off (`None`). On a device the frozen weights
    /// and every adapter are copied there once; logits, loss, generation
    /// (mixed-adapter batches too), merge, unmerge and swaps then run
    /// there, and trainers that asked for the device
    /// ([`crate::session::trainer::Trainer::use_device`]) train there. The host
    /// copy stays the master: adapters added, loaded, removed or written
    /// on the host are copied over before the next device operation. A
    /// model already on that device with that precision is left as it is;
    /// moving it (or taking it off) is refused while a trainer trains on
    /// it (`InvalidState`).
    pub fn use_device(&mut self, device: Option<(usize, gpu::Compute)>) -> Result<()> {
        self.place_on(device)?;
        // Asked for by the owner: it stays when trainers come and go.
        if let Some(g) = self.gpu.0.as_deref_mut() {
            g.by_trainer = false;
        }
        Ok(())
    }

    /// [`use_device`](Self::use_device) without claiming the copy for the
    /// owner (trainers use it). A move to another device uploads there
    /// before the old copy is freed, so a failed move leaves the model
    /// where it was; a change of precision on the same device frees first
    /// (two copies may not fit).
    pub(crate) fn place_on(&mut self, device: Option<(usize, gpu::Compute)>) -> Result<()> {
        if let Some(g) = self.gpu.0.as_deref() {
            if device == Some((g.ordinal(), g.compute())) {
                return Ok(());
            }
            let t = g.training();
            if !t.is_empty() {
                bail!(InvalidState, "adapter '{}' is being trained on the device; move its trainer off first (lora_trainer_use_device with device -1)", t[0]);
            }
            if device.is_none_or(|(o, _)| o == g.ordinal()) {
                self.gpu.clear();
            }
        }
        if let Some((ordinal, compute)) = device {
            let g = gpu::DeviceModel::upload(ordinal, self, compute)?;
            self.gpu.clear();
            self.gpu.0 = Some(Box::new(g));
        }
        Ok(())
    }


    /// The device copy, when the model is on a device.
    pub fn device(&self) -> Option<&gpu::DeviceModel> {
        self.gpu.0.as_deref()
    }

    /// The device copy; `InvalidState` when the model is not on a device.
    pub fn on_device(&self) -> Result<&gpu::DeviceModel> {
        self.device().ok_or_else(not_on_device)
    }

    /// Runs `f` on the device copy, synced with the host first
    /// ([`gpu::DeviceModel::sync`]); `InvalidState` when the model is not
    /// on a device.
    pub fn with_device<R>(&mut self, f: impl FnOnce(&mut gpu::DeviceModel, &mut Model) -> Result<R>) -> Result<R> {
        let mut g = self.gpu.0.take().ok_or_else(not_on_device)?;
        let r = g.sync(self).and_then(|_| f(&mut g, self));
        self.gpu.0 = Some(g);
        r
    }

    pub fn active(&self) -> &[(String, f32)] {
        &self.active
    }

    fn head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    pub fn adapter_index(&self, name: &str) -> Result<usize> {
        self.adapters.iter().position(|a| a.name == name).ok_or_else(|| err!(InvalidArgument, "no adapter named '{name}'"))
    }

    /// Adds adapter `name` with `spec` (PEFT `get_peft_model` /
    /// `add_adapter`) on the modules the spec selects. The first adapter
    /// becomes active. Every module's A/B are initialized by `spec.init`
    /// from its own seed (the model seed and the module path). Nothing is
    /// added unless every module accepts the adapter's rank.
    pub fn add_adapter(&mut self, name: &str, spec: peft::AdapterSpec) -> Result<()> {
        if name.is_empty() || name.contains('/') || name.contains('\0') {
            bail!(InvalidArgument, "adapter name '{name}' is empty or contains '/'");
        }
        if self.adapters.iter().any(|a| a.name == name) {
            bail!(InvalidArgument, "an adapter named '{name}' already exists");
        }
        if self.merged {
            bail!(InvalidState, "the model is merged; unmerge before adding adapters");
        }
        spec.validate()?;
        let mut modules = Vec::new();
        for l in 0..self.blocks.len() {
            for (j, leaf) in linears(&self.cfg).iter().enumerate() {
                if spec.targets(l, leaf, &self.module(l, j)) {
                    modules.push((l, j));
                }
            }
        }
        if modules.is_empty() {
            bail!(InvalidArgument, "adapter '{name}': target modules {} match no module of this model (its linear layers are {})", spec.targets_display(), linears(&self.cfg).join(", "));
        }
        // Validate every module first so a failure leaves nothing behind.
        for &(l, j) in &modules {
            let path = self.module(l, j);
            let layer = &self.blocks[l].lin[j];
            let r = spec.rank_for(&path);
            crate::lora::layer::check_rank(r, layer.in_features(), layer.out_features()).map_err(|e| e.context(&format!("adapter '{name}', {path}")))?;
        }
        let first = self.adapters.is_empty();
        for &(l, j) in &modules {
            let path = self.module(l, j);
            let cfg = AdapterConfig {
                r: spec.rank_for(&path),
                alpha: spec.alpha_for(&path),
                dropout: spec.dropout,
                use_rslora: spec.use_rslora,
                init: spec.init.clone(),
            };
            let layer = &mut self.blocks[l].lin[j];
            layer.add_adapter(name, cfg)?;
        }
        self.adapters.push(AdapterInfo { name: name.to_string(), spec, modules });
        self.touch_adapters();
        if first {
            self.active = vec![(name.to_string(), 1.0)];
        }
        self.sync_active()?;
        Ok(())
    }

    /// Pushes the model-level active set to every layer (each gets the
    /// subset of adapters it carries).
    fn sync_active(&mut self) -> Result<()> {
        let active = self.active.clone();
        for b in &mut self.blocks {
            for layer in &mut b.lin {
                let set: Vec<(&str, f32)> = active.iter().filter(|(n, _)| layer.adapter_index(n).is_ok()).map(|(n, m)| (n.as_str(), *m)).collect();
                layer.set_active(&set)?;
            }
        }
        Ok(())
    }

    /// Makes `set` (name, multiplier) the active adapters, merged or not
    /// (`lora_swap_adapter`). When merged, every layer's merged weight is
    /// re-derived from `W0`, so no error accumulates over swaps.
    pub fn set_active(&mut self, set: &[(&str, f32)]) -> Result<()> {
        for (i, &(n, m)) in set.iter().enumerate() {
            self.adapter_index(n)?;
            if !m.is_finite() {
                bail!(InvalidArgument, "multiplier {m} for adapter '{n}' is not finite");
            }
            if set[..i].iter().any(|&(o, _)| o == n) {
                bail!(InvalidArgument, "adapter '{n}' listed twice");
            }
        }
        if self.blocks.iter().any(|b| b.lin.iter().any(|l| l.grads_pending())) {
            bail!(InvalidState, "swapping adapters while gradients are accumulated but not consumed");
        }
        let old = std::mem::replace(&mut self.active, set.iter().map(|&(n, m)| (n.to_string(), m)).collect());
        self.sync_active()?;
        if self.gpu.0.is_some() {
            if let Err(e) = self.with_device(|_, _| Ok(())) {
                self.active = old;
                self.sync_active()?;
                return Err(e);
            }
        } else {
            self.materialize_merged();
        }
        Ok(())
    }

    /// On the host, a merge (or a swap while merged) derives the merged
    /// weights at once; on a device only the device's are derived, the
    /// host's wait for a host forward or an export to ask for them.
    fn materialize_merged(&self) {
        self.blocks.iter().flat_map(|b| b.lin.iter()).for_each(|l| l.materialize_merged());
    }

    /// Merges the active adapters into every layer's weight.
    pub fn merge(&mut self) -> Result<()> {
        if self.merged {
            bail!(InvalidState, "the model is already merged");
        }
        if self.blocks.iter().any(|b| b.lin.iter().any(|l| l.grads_pending())) {
            bail!(InvalidState, "merging while gradients are accumulated but not consumed");
        }
        let res: Result<()> = self.blocks.iter_mut().try_for_each(|b| b.lin.iter_mut().filter(|l| !l.active().is_empty()).try_for_each(|l| l.merge()));
        if let Err(e) = res {
            for b in &mut self.blocks {
                for l in &mut b.lin {
                    if l.is_merged() {
                        let _ = l.unmerge();
                    }
                }
            }
            return Err(e);
        }
        self.merged = true;
        if self.gpu.0.is_some() {
            if let Err(e) = self.with_device(|_, _| Ok(())) {
                let _ = self.unmerge();
                return Err(e);
            }
        } else {
            self.materialize_merged();
        }
        self.note_peak(0);
        Ok(())
    }

    /// Exact unmerge (the base was never modified).
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.merged {
            bail!(InvalidState, "the model is not merged");
        }
        for b in &mut self.blocks {
            for l in &mut b.lin {
                if l.is_merged() {
                    l.unmerge()?;
                }
            }
        }
        self.merged = false;
        if let Some(g) = self.gpu.0.as_deref_mut() {
            g.drop_merged();
        }
        Ok(())
    }

    /// (trainable, total) parameters as PEFT's `print_trainable_parameters`
    /// counts them: trainable = adapters of every adapter (PEFT counts
    /// requires_grad params: the adapters being trained); total = all
    /// parameters with NF4 weights counted as their element count.
    pub fn param_counts(&self) -> (usize, usize) {
        let mut trainable = 0;
        let mut total = self.embed.len() + self.norm.len() + self.lm_head.as_ref().map_or(0, |h| h.len());
        for b in &self.blocks {
            total += b.norm_elems();
            for l in &b.lin {
                trainable += l.trainable_params();
                total += l.total_params();
            }
        }
        (trainable, total)
    }

    /// `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7340`
    /// (PEFT's format: thousands separators, four decimals).
    pub fn trainable_summary(&self) -> String {
        let (t, a) = self.param_counts();
        fn sep(n: usize) -> String {
            let s = n.to_string();
            let mut out = String::new();
            for (i, c) in s.chars().enumerate() {
                if i > 0 && (s.len() - i).is_multiple_of(3) {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        let pct = if a == 0 { 0.0 } else { 100.0 * t as f64 / a as f64 };
        format!("trainable params: {} || all params: {} || trainable%: {:.4}", sep(t), sep(a), pct)
    }

    /// Bytes by category; `optimizer` is filled in by the trainer.
    pub fn memory(&self) -> MemStats {
        let (base, q, qn, ad) = self.weight_bytes();
        let acts = self.act_peak.max(self.pool.bytes());
        MemStats {
            base_weights: base,
            base_quantized: q,
            quantized_weights: qn,
            adapters: ad,
            optimizer: 0,
            // Held for the backward at the peak, or kept for reuse.
            activations: acts,
            kv_cache: self.kv_bytes,
            peak: self.peak.max(base + ad + acts.max(self.kv_bytes)),
        }
    }

    /// Records a total of static memory plus `dynamic` bytes as a candidate peak.
    pub(crate) fn note_peak(&mut self, dynamic: usize) {
        let (base, _, _, adapters) = self.weight_bytes();
        self.peak = self.peak.max(base + adapters + dynamic);
    }

    /// (base weights, of which NF4 as stored, NF4 weight count, adapters
    /// with their gradients), in bytes.
    fn weight_bytes(&self) -> (usize, usize, usize, usize) {
        let mut base = (self.embed.len() + self.norm.len() + self.lm_head.as_ref().map_or(0, |h| h.len())) * 4;
        let (mut q, mut qn, mut ad) = (0, 0, 0);
        for b in &self.blocks {
            base += b.norm_elems() * 4;
            for l in &b.lin {
                base += l.base_bytes();
                ad += l.adapter_bytes();
                if let Some(t) = l.nf4_base() {
                    q += t.footprint_bytes();
                    qn += t.numel();
                }
            }
        }
        (base, q, qn, ad)
    }

    /// Checks token ids against the vocabulary.
    pub fn check_ids(&self, ids: &[i32]) -> Result<()> {
        check_token_ids(ids, self.vocab())
    }

    /// `x = embed[ids]`, `[n, H]`.
    pub(crate) fn embed_rows(&self, ids: &[i32]) -> Vec<f32> {
        let h = self.hidden();
        let mut x = vec![0f32; ids.len() * h];
        x.par_chunks_mut(h).zip(ids.par_iter()).for_each(|(row, &t)| row.copy_from_slice(&self.embed[t as usize * h..(t as usize + 1) * h]));
        if let Some(s) = self.cfg.embed_scale {
            x.par_iter_mut().for_each(|v| *v *= s);
        }
        x
    }

    /// Per-linear row-adapter indices for a mixed batch: the model-level
    /// choice per row mapped to this layer's adapter index (−1 if absent).
    fn layer_rows(&self, layer: &LoraLayer, rows: &RowAdapters) -> Vec<i32> {
        let map: Vec<i32> = self.adapters.iter().map(|a| layer.adapter_index(&a.name).map(|i| i as i32).unwrap_or(-1)).collect();
        rows.rows.iter().map(|&r| if r < 0 { -1 } else { map[r as usize] }).collect()
    }

    fn lin_forward(&mut self, l: usize, j: usize, x: &[f32], n: usize, rows: Option<&RowAdapters>, train: bool, call: u64) -> Result<Vec<f32>> {
        let out_f = self.blocks[l].lin[j].out_features();
        let mut y = self.pool.take(n * out_f);
        let ra = rows.map(|r| self.layer_rows(&self.blocks[l].lin[j], r));
        // Training: the trainer checks the loss and gradients, not each
        // linear's input; inference (logits, generation) keeps the check.
        self.blocks[l].lin[j].forward_checked(x, n, &mut y, ra.as_deref(), train, call, !train)?;
        Ok(y)
    }

    /// Forward of a projection group on `x` (`n` rows): one output per
    /// projection, `widths` wide (a fused projection's output split).
    #[allow(clippy::too_many_arguments)]
    fn group_forward(&mut self, l: usize, group: Group, x: &[f32], n: usize, widths: &[usize], rows: Option<&RowAdapters>, train: bool, call: u64) -> Result<Vec<Vec<f32>>> {
        let (js, fj) = group.linears();
        if self.cfg.arch.fused() {
            let y = self.lin_forward(l, fj, x, n, rows, train, call)?;
            return Ok(split_cols(&mut self.pool, y, n, widths));
        }
        js.iter().map(|&j| self.lin_forward(l, j, x, n, rows, train, call)).collect()
    }

    /// q, k, v of layer `l` from its normed input `h1` (`batch`
    /// sequences of `seq` rows): the projections (split when fused), the
    /// q/k norms (their inputs kept with `train`), and the rotation by
    /// `table` where the layer rotates.
    #[allow(clippy::too_many_arguments)]
    fn qkv_forward(&mut self, l: usize, h1: &[f32], batch: usize, seq: usize, table: &RopeTable, rows: Option<&RowAdapters>, train: bool, call: u64) -> Result<([Vec<f32>; 3], Option<QkActs>)> {
        let (hd, nh, nkv, eps) = (self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.rms_norm_eps);
        let [mut q, mut k, v]: [Vec<f32>; 3] = self.group_forward(l, Group::Qkv, h1, batch * seq, &[nh * hd, nkv * hd, nkv * hd], rows, train, call)?.try_into().map_err(|_| err!(Internal, "q, k, v"))?;
        let qk = match &self.blocks[l].qk_norm {
            Some(w) => qk_norm_forward(&mut self.pool, w, &mut q, &mut k, eps, train),
            None => None,
        };
        if self.cfg.rope_layers[l] {
            rope_forward(&mut q, batch, seq, nh, hd, table);
            rope_forward(&mut k, batch, seq, nkv, hd, table);
        }
        Ok(([q, k, v], qk))
    }

    /// The MLP of layer `l` on its normed input `h2` (`n` rows): gate and
    /// up (split when fused), the gated activation `a`, and down's output
    /// `d`, as `[g, u, a, d]`.
    #[allow(clippy::too_many_arguments)]
    fn mlp_forward(&mut self, l: usize, h2: &[f32], n: usize, rows: Option<&RowAdapters>, train: bool, call: u64) -> Result<[Vec<f32>; 4]> {
        let it = self.cfg.intermediate_size;
        let [g, u]: [Vec<f32>; 2] = self.group_forward(l, Group::GateUp, h2, n, &[it, it], rows, train, call)?.try_into().map_err(|_| err!(Internal, "gate, up"))?;
        let mut a = self.pool.take(g.len());
        glu_forward(self.cfg.act, &g, &u, &mut a);
        let d = self.lin_forward(l, o_down(self.cfg.arch.fused()).1, &a, n, rows, train, call)?;
        Ok([g, u, a, d])
    }

    /// One decoder layer forward on `x: [B·T, H]` (in place, the residual
    /// stream), returning what its backward needs.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(&mut self, l: usize, x: &mut [f32], batch: usize, seq: usize, tables: &Tables, rows: Option<&RowAdapters>, train: bool, call: u64) -> Result<LayerActs> {
        let cfg = &self.cfg;
        let (h, hd, nh, eps, rs) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.rms_norm_eps, cfg.residual_scale);
        let shape = cfg.attn_shape(l, batch, seq);
        let table = tables.layer(cfg, l);
        let o_j = o_down(cfg.arch.fused()).0;
        let n = batch * seq;
        let mut rstd1 = self.pool.take(n);
        let h1 = input_norm(&mut self.pool, self.blocks[l].attn_norm.as_ref(), x, n, h, eps, Some(&mut rstd1));
        let ([q, k, v], qk) = self.qkv_forward(l, &h1, batch, seq, table, rows, train, call)?;
        let mut att = self.pool.take(n * nh * hd);
        let mut lse = self.pool.take(n * nh);
        attention_forward(&q, &k, &v, &shape, &mut att, &mut lse);
        let o = self.lin_forward(l, o_j, &att, n, rows, train, call)?;
        let post_o = residual_add(&mut self.pool, self.blocks[l].post(0), rs, o, x, n, h, eps, train);
        let x_mid = self.pool.copy_of(x);
        let mut rstd2 = self.pool.take(n);
        let h2 = input_norm(&mut self.pool, self.blocks[l].mlp_norm.as_ref(), x, n, h, eps, Some(&mut rstd2));
        let [g, u, a, d] = self.mlp_forward(l, &h2, n, rows, train, call)?;
        let post_d = residual_add(&mut self.pool, self.blocks[l].post(1), rs, d, x, n, h, eps, train);
        Ok(LayerActs { h1, rstd1, q, k, v, att, lse, x_mid, h2, rstd2, g, u, a, qk, post: [post_o, post_d] })
    }

    /// Backward of one layer: `dx` (gradient of the layer's output) is
    /// replaced by the gradient of its input (unless `need_dx` is false,
    /// for the first layer). Adapter gradients accumulate in the layers.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(&mut self, l: usize, x_in: &[f32], acts: LayerActs, dx: &mut [f32], batch: usize, seq: usize, tables: &Tables, need_dx: bool) -> Result<()> {
        let cfg = &self.cfg;
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let n = batch * seq;
        let it = cfg.intermediate_size;
        let mut pool = std::mem::take(&mut self.pool);
        let res = Self::layer_backward_in(&mut self.blocks[l], &mut pool, acts, x_in, dx, (n, h, it, nh, nkv, hd), cfg.attn_shape(l, batch, seq), (cfg.act, cfg.residual_scale, cfg.arch.fused()), cfg.rope_layers[l].then(|| tables.layer(cfg, l)), need_dx);
        self.pool = pool;
        res
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward_in(
        blk: &mut Block,
        pool: &mut BufPool,
        acts: LayerActs,
        x_in: &[f32],
        dx: &mut [f32],
        dims: (usize, usize, usize, usize, usize, usize),
        shape: AttnShape,
        (act, rs, fused): (config::Activation, Option<f32>, bool),
        table: Option<&RopeTable>,
        need_dx: bool,
    ) -> Result<()> {
        let (n, h, it, nh, nkv, hd) = dims;
        let (batch, seq) = (shape.batch, shape.q_len);
        let LayerActs { h1, rstd1, q, k, v, att, lse, x_mid, h2, rstd2, g, u, a, qk, post: [post_o, post_d] } = acts;
        let (o_j, down_j) = o_down(fused);
        // MLP: x_out = x_mid + [norm](down(a));  a = act(g)·u
        let mut da = pool.take(n * it);
        let dd = residual_backward(pool, blk.post(1), rs, post_d, dx, h)?;
        blk.lin[down_j].backward_into(&a, dd.as_deref().unwrap_or(dx), n, Some(&mut da), false)?;
        pool.give(a);
        if let Some(b) = dd {
            pool.give(b);
        }
        let (mut dg, mut du) = (pool.take(n * it), pool.take(n * it));
        glu_backward(act, &g, &u, &da, &mut dg, &mut du);
        for b in [da, g, u] {
            pool.give(b);
        }
        let mut dh2 = pool.take(n * h);
        blk.group_backward(pool, Group::GateUp, fused, &h2, &[&dg, &du], n, Some(&mut dh2))?;
        pool.give(dg);
        pool.give(du);
        // d x_mid = dx + RMSNorm₂ᵀ(dh2)
        let mut dxm = pool.take(n * h);
        input_norm_backward(blk.mlp_norm.as_ref(), &x_mid, &rstd2, &dh2, n, h, &mut dxm);
        dxm.par_iter_mut().zip(dx.par_iter()).for_each(|(a, b)| *a += b);
        for b in [x_mid, h2, rstd2, dh2] {
            pool.give(b);
        }
        // Attention: x_mid = x_in + [norm](o(att))
        let mut datt = pool.take(n * nh * hd);
        let d_o = residual_backward(pool, blk.post(0), rs, post_o, &dxm, h)?;
        blk.lin[o_j].backward_into(&att, d_o.as_deref().unwrap_or(&dxm), n, Some(&mut datt), false)?;
        if let Some(b) = d_o {
            pool.give(b);
        }
        let (mut dq, mut dk, mut dv) = (pool.take(q.len()), pool.take(k.len()), pool.take(v.len()));
        attention_backward(&q, &k, &v, &att, &lse, &datt, &shape, &mut dq, &mut dk, &mut dv);
        for b in [att, lse, datt, q, k, v] {
            pool.give(b);
        }
        if let Some(table) = table {
            rope_backward(&mut dq, batch, seq, nh, hd, table);
            rope_backward(&mut dk, batch, seq, nkv, hd, table);
        }
        match (&blk.qk_norm, qk) {
            (Some(w), Some(acts)) => qk_norm_backward(pool, w, acts, &mut dq, &mut dk),
            (None, None) => {}
            _ => bail!(Internal, "layer activations without the q/k norm inputs"),
        }
        if need_dx {
            let mut dh1 = pool.take(n * h);
            blk.group_backward(pool, Group::Qkv, fused, &h1, &[&dq, &dk, &dv], n, Some(&mut dh1))?;
            input_norm_backward(blk.attn_norm.as_ref(), x_in, &rstd1, &dh1, n, h, dx);
            dx.par_iter_mut().zip(dxm.par_iter()).for_each(|(a, b)| *a += b);
            pool.give(dh1);
        } else {
            blk.group_backward(pool, Group::Qkv, fused, &h1, &[&dq, &dk, &dv], n, None)?;
        }
        for b in [h1, rstd1, dq, dk, dv, dxm] {
            pool.give(b);
        }
        Ok(())
    }

    fn check_batch(&self, ids: &[i32], batch: usize, seq: usize) -> Result<()> {
        if batch == 0 || seq == 0 {
            bail!(InvalidShape, "batch {batch} × sequence {seq} is empty");
        }
        if ids.len() != batch * seq {
            bail!(ShapeMismatch, "{} token ids for a batch of {batch} × {seq}", ids.len());
        }
        self.check_ids(ids)
    }

    /// Final norm and head: logits `[n, V]` from the residual stream.
    /// The logits are divided by `logits_scaling` where the model does
    /// (Granite); with `cap`, they are also soft-capped
    /// (`final_logit_softcapping`) where the model caps them.
    fn head_forward(&self, x: &[f32], n: usize, cap: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (h, v) = (self.hidden(), self.vocab());
        let mut hf = vec![0f32; n * h];
        let mut rstd = vec![0f32; n];
        rmsnorm_forward(x, &self.norm, n, h, self.cfg.rms_norm_eps, &mut hf, Some(&mut rstd));
        let mut logits = vec![0f32; n * v];
        gemm_f32(&mut logits, v, Mat::n(&hf, h), Mat::t(self.head(), h), n, v, h, 1.0, false, true);
        if let Some(s) = self.cfg.logits_divisor {
            logits.par_iter_mut().for_each(|z| *z /= s);
        }
        if let (true, Some(c)) = (cap, self.cfg.final_softcap) {
            logits.par_iter_mut().for_each(|z| *z = crate::backend::cpu::vexp::tanh(*z / c) * c);
        }
        (logits, hf, rstd)
    }

    /// Logits `[B·T, V]` for a batch (inference: no dropout), with the
    /// active adapters, or per sequence adapters (`seq_adapters[b]` a
    /// model adapter index, −1 for none); on the device when the model is
    /// on one ([`Model::use_device`]).
    pub fn logits(&mut self, ids: &[i32], batch: usize, seq: usize, seq_adapters: Option<&[i32]>) -> Result<Vec<f32>> {
        self.check_batch(ids, batch, seq)?;
        if self.gpu.0.is_some() {
            return self.with_device(|g, _| g.logits(ids, batch, seq, seq_adapters));
        }
        crate::backend::cpu::on_pool(|| self.logits_cpu(ids, batch, seq, seq_adapters))
    }

    fn logits_cpu(&mut self, ids: &[i32], batch: usize, seq: usize, seq_adapters: Option<&[i32]>) -> Result<Vec<f32>> {
        let rows = self.row_adapters(seq_adapters, batch, seq)?;
        let n = batch * seq;
        let tables = self.tables(0, seq);
        let mut x = self.embed_rows(ids);
        let mut peak = 0;
        for l in 0..self.blocks.len() {
            let acts = self.layer_forward(l, &mut x, batch, seq, &tables, rows.as_ref(), false, 0)?;
            peak = peak.max(acts.bytes());
            acts.recycle(&mut self.pool);
        }

        let (logits, _, _) = self.head_forward(&x, n, true);
        self.pool.trim(self.act_peak.max(peak));
        self.note_peak(peak + logits.len() * 4);
        Ok(logits)
    }

    pub(crate) fn row_adapters(&self, seq_adapters: Option<&[i32]>, batch: usize, seq: usize) -> Result<Option<RowAdapters>> {
        let Some(sa) = seq_adapters else { return Ok(None) };
        if sa.len() != batch {
            bail!(ShapeMismatch, "{} per-sequence adapters for a batch of {batch}", sa.len());
        }
        if self.merged {
            bail!(InvalidState, "a mixed-adapter batch needs the model unmerged");
        }
        if let Some(&a) = sa.iter().find(|&&a| a < -1 || a >= self.adapters.len() as i32) {
            bail!(InvalidArgument, "adapter index {a} is not −1 or one of the model's {} adapters", self.adapters.len());
        }
        Ok(Some(RowAdapters { rows: sa.iter().flat_map(|&a| std::iter::repeat_n(a, seq)).collect() }))
    }

    /// Forward and backward over one micro-batch with causal-LM labels
    /// (`labels[b,t]` is the target of position `t−1`, transformers'
    /// shift; −100 ignored). The loss gradient is scaled by `grad_scale`
    /// (1 / the step's total counted tokens), so micro-batches accumulate
    /// into the gradient of `Σ loss / N`. `call` names this micro-batch's
    /// dropout masks. With `checkpointing`, each layer keeps only its input
    /// and is recomputed during the backward.
    pub fn forward_backward(&mut self, ids: &[i32], labels: &[i32], batch: usize, seq: usize, grad_scale: f32, call: u64, checkpointing: bool) -> Result<MicroResult> {
        self.check_batch(ids, batch, seq)?;
        if labels.len() != ids.len() {
            bail!(ShapeMismatch, "{} labels for {} token ids", labels.len(), ids.len());
        }
        if self.merged {
            bail!(InvalidState, "training needs the model unmerged");
        }
        let (h, vsz) = (self.hidden(), self.vocab());
        check_labels(labels, vsz)?;
        let n = batch * seq;
        let tables = self.tables(0, seq);
        let mut x = self.embed_rows(ids);
        let nl = self.blocks.len();
        let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(nl);
        let mut saved: Vec<Option<LayerActs>> = Vec::with_capacity(nl);
        let mut held = 0usize;
        for l in 0..nl {
            inputs.push(self.pool.copy_of(&x));
            held += x.len() * 4;
            let acts = self.layer_forward(l, &mut x, batch, seq, &tables, None, true, call)?;
            if checkpointing {
                saved.push(None);
            } else {
                held += acts.bytes();
                saved.push(Some(acts));
            }
        }
        let targets = shifted_targets(labels, batch, seq);
        let (mut logits, _hf, rstd) = self.head_forward(&x, n, false);
        held += logits.len() * 4 * 2;
        let ce = match self.cfg.final_softcap {
            None => cross_entropy_fused(&mut logits, &targets, vsz, Some(grad_scale))?,
            Some(c) => crate::backend::cpu::loss::cross_entropy_fused_softcap(&mut logits, &targets, vsz, Some(grad_scale), c)?,
        };
        if let Some(s) = self.cfg.logits_divisor {
            logits.par_iter_mut().for_each(|g| *g /= s);
        }
        // d hf = dlogits · W_head;  dx = RMSNorm_fᵀ(d hf)
        let mut dhf = self.pool.take(n * h);
        gemm_f32(&mut dhf, h, Mat::n(&logits, vsz), Mat::n(self.head(), h), n, h, vsz, 1.0, false, true);
        self.pool.give(logits);
        let mut dx = self.pool.take(n * h);
        rmsnorm_backward(&x, &self.norm, &rstd, &dhf, n, h, &mut dx, None);
        self.pool.give(dhf);
        self.pool.give(_hf);
        self.pool.give(rstd);
        let mut peak_extra = 0;
        for l in (0..nl).rev() {
            let x_in = inputs.pop().expect("one input per layer");
            let acts = match saved.pop().expect("one slot per layer") {
                Some(a) => a,
                None => {
                    let mut xr = self.pool.copy_of(&x_in);
                    let a = self.layer_forward(l, &mut xr, batch, seq, &tables, None, true, call)?;
                    self.pool.give(xr);
                    peak_extra = peak_extra.max(a.bytes());
                    a
                }
            };
            self.layer_backward(l, &x_in, acts, &mut dx, batch, seq, &tables, l > 0)?;
            self.pool.give(x_in);
        }
        self.pool.give(dx);
        self.pool.give(x);
        self.act_peak = held + peak_extra;
        // Keep one step's working set (saved activations plus the
        // backward's temporaries, about as much again) for the next step.
        self.pool.trim(2 * self.act_peak);
        self.note_peak(self.act_peak);
        Ok(MicroResult { loss_sum: ce.sum, count: ce.count })
    }

    /// Mean causal-LM loss of a batch (transformers' `model(ids,
    /// labels=labels).loss`), without gradients.
    pub fn loss(&mut self, ids: &[i32], labels: &[i32], batch: usize, seq: usize) -> Result<f32> {
        if labels.len() != ids.len() {
            bail!(ShapeMismatch, "{} labels for {} token ids", labels.len(), ids.len());
        }
        if self.gpu.0.is_some() {
            self.check_batch(ids, batch, seq)?;
            return self.with_device(|g, _| g.loss(ids, labels, batch, seq));
        }
        let mut logits = self.logits(ids, batch, seq, None)?;
        let vsz = self.vocab();
        let targets = shifted_targets(labels, batch, seq);
        Ok(cross_entropy_fused(&mut logits, &targets, vsz, Some(0.0))?.loss)
    }

    /// Zeroes every adapter gradient.
    pub fn zero_grad(&mut self) {
        for b in &mut self.blocks {
            for l in &mut b.lin {
                l.zero_grad();
            }
        }
    }

    /// Adapter `name`'s (A, B, dA, dB) slices in the optimizer's order:
    /// layer by layer, modules in registration order, A before B.
    pub fn adapter_params(&mut self, name: &str) -> Result<(Vec<&mut [f32]>, Vec<&[f32]>)> {
        self.adapter_index(name)?;
        self.touch_adapters();
        let slots = self.adapter_slots(name)?;
        let mut params = Vec::with_capacity(slots.len() * 2);
        let mut grads = Vec::with_capacity(slots.len() * 2);
        for crate::lora::layer::Adapter { a, b, grad_a, grad_b, .. } in slots {
            params.push(a.as_mut_slice());
            grads.push(grad_a.as_slice());
            params.push(b.as_mut_slice());
            grads.push(grad_b.as_slice());
        }
        Ok((params, grads))
    }

    /// Adapter `name`'s gradients, mutable (for clipping), in
    /// [`adapter_params`](Self::adapter_params) order.
    pub fn adapter_grads_mut(&mut self, name: &str) -> Result<Vec<&mut [f32]>> {
        Ok(self.adapter_slots(name)?.into_iter().flat_map(|ad| [ad.grad_a.as_mut_slice(), ad.grad_b.as_mut_slice()]).collect())
    }

    /// Adapter `name` in every module that carries it, in (layer, linear)
    /// order: the optimizer's and the gradient norm's order.
    fn adapter_slots(&mut self, name: &str) -> Result<Vec<&mut crate::lora::layer::Adapter>> {
        let ai = self.adapter_index(name)?;
        let modules = self.adapters[ai].modules.clone();
        // Modules are listed in the order this walk visits them, so each
        // is taken once.
        let mut want = modules.iter().peekable();
        let mut out = Vec::with_capacity(modules.len());
        for (l, blk) in self.blocks.iter_mut().enumerate() {
            for (j, layer) in blk.lin.iter_mut().enumerate() {
                if want.peek() != Some(&&(l, j)) {
                    continue;
                }
                want.next();
                let i = layer.adapter_index(name)?;
                out.push(layer.adapter_mut(i));
            }
        }
        Ok(out)
    }

    /// Copies adapter `from`'s weights into adapter `to` (same modules and
    /// shapes).
    pub fn copy_adapter_weights(&mut self, from: &str, to: &str) -> Result<()> {
        let (fi, ti) = (self.adapter_index(from)?, self.adapter_index(to)?);
        if self.adapters[fi].modules != self.adapters[ti].modules {
            bail!(ShapeMismatch, "adapters '{from}' and '{to}' target different modules");
        }
        self.touch_adapters();
        for &(l, j) in &self.adapters[fi].modules.clone() {
            let path = self.module(l, j);
            let layer = &mut self.blocks[l].lin[j];
            let src = layer.adapter(from)?.clone();
            layer.set_adapter_weights(to, &src.a, &src.b).map_err(|e| e.context(&path))?;
        }
        Ok(())
    }

    /// Removes adapter `name` from the model (refused while merged).
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        let ai = self.adapter_index(name)?;
        if self.merged && self.active.iter().any(|(n, _)| n == name) {
            bail!(InvalidState, "adapter '{name}' is merged; unmerge before removing it");
        }
        if self.device().is_some_and(|g| g.training().contains(&name)) {
            bail!(InvalidState, "adapter '{name}' is being trained on the device; free or move its trainer first");
        }
        self.touch_adapters();
        for &(l, j) in &self.adapters[ai].modules.clone() {
            self.blocks[l].lin[j].remove_adapter(name)?;
        }
        self.adapters.remove(ai);
        self.active.retain(|(n, _)| n != name);
        Ok(())
    }

    /// Sizes of adapter `name`'s tensors in [`adapter_params`](Self::adapter_params) order.
    pub fn adapter_sizes(&self, name: &str) -> Result<Vec<usize>> {
        let ai = self.adapter_index(name)?;
        let mut v = Vec::new();
        for &(l, j) in &self.adapters[ai].modules {
            let layer = &self.blocks[l].lin[j];
            let a = layer.adapter(name)?;
            v.push(a.a.len());
            v.push(a.b.len());
        }
        Ok(v)
    }

    /// The PEFT keys of adapter `name`'s tensors in [`adapter_params`](Self::adapter_params) order.
    pub fn adapter_keys(&self, name: &str) -> Result<Vec<String>> {
        let ai = self.adapter_index(name)?;
        Ok(self.adapters[ai]
            .modules
            .iter()
            .flat_map(|&(l, j)| {
                let m = self.module(l, j);
                [format!("base_model.model.{m}.lora_A.weight"), format!("base_model.model.{m}.lora_B.weight")]
            })
            .collect())
    }

    /// The module path of linear `j` of layer `l` (PEFT's key).
    pub fn module(&self, l: usize, j: usize) -> String {
        module_path_in(&self.cfg, l, j)
    }

    /// The rotary tables of positions `pos0..pos0 + len`.
    pub(crate) fn tables(&self, pos0: usize, len: usize) -> Tables {
        Tables { full: self.freqs.table(pos0, len), local: self.local_freqs.as_ref().map(|f| f.table(pos0, len)) }
    }

    /// [`tables`](Self::tables) with LongRoPE's factors chosen by `last`,
    /// the largest position of the call.
    pub(crate) fn tables_upto(&self, pos0: usize, len: usize, last: usize) -> Tables {
        Tables { full: self.freqs.table_upto(pos0, len, last), local: self.local_freqs.as_ref().map(|f| f.table_upto(pos0, len, last)) }
    }

    /// The rotary tables of arbitrary positions.
    pub(crate) fn tables_at(&self, positions: &[usize]) -> Tables {
        Tables { full: self.freqs.table_at(positions), local: self.local_freqs.as_ref().map(|f| f.table_at(positions)) }
    }

    /// Writes the model with the active adapters merged as a Hugging Face
    /// checkpoint directory (`config.json` + `model.safetensors`) that
    /// transformers loads as a plain model. Dense tensors keep the
    /// checkpoint's dtype (that of its embedding); an NF4 base is written
    /// dequantized (with the merge) in that dtype and its quantization
    /// config is dropped.
    pub fn export_merged(&self, dir: &Path) -> Result<()> {
        use crate::io::safetensors::{write_atomic, OutTensor};
        std::fs::create_dir_all(dir).map_err(|e| err!(Io, "{}: cannot create: {e}", dir.display()))?;
        let dt = self.dtype;
        let enc = |shape: Vec<usize>, v: &[f32]| -> OutTensor<'static> {
            let data: Vec<u8> = match dt {
                DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                DType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                DType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            };
            OutTensor { dtype: dt.to_safetensors(), shape, data: std::borrow::Cow::Owned(data) }
        };
        let (h, v) = (self.hidden(), self.vocab());
        let mut out: Vec<(String, OutTensor<'static>)> = Vec::new();
        // A norm as the checkpoint stores it: Gemma's w of `1 + w` (as read,
        // or from the weight multiplied for a model that was not read).
        let norm = |name: String, eff: &[f32]| -> (String, OutTensor<'static>) {
            let t = match (self.raw_norms.get(&name), self.cfg.norm_offset) {
                (Some(raw), _) => enc(vec![raw.len()], raw),
                (None, true) => enc(vec![eff.len()], &eff.iter().map(|x| x - 1.0).collect::<Vec<f32>>()),
                (None, false) => enc(vec![eff.len()], eff),
            };
            (name, t)
        };
        out.push(("model.embed_tokens.weight".into(), enc(vec![v, h], &self.embed)));
        out.push(norm("model.norm.weight".into(), &self.norm));
        if let Some(w) = &self.lm_head {
            out.push(("lm_head.weight".into(), enc(vec![v, h], w)));
        }
        for (l, b) in self.blocks.iter().enumerate() {
            for (name, w) in Block::norm_names(&self.cfg, l).into_iter().zip(b.norms()) {
                if let (Some(name), Some(w)) = (name, w) {
                    out.push(norm(name, w));
                }
            }
            for (j, layer) in b.lin.iter().enumerate() {
                let m = self.module(l, j);
                let mut w = layer.base_weight_f32();
                if !layer.is_merged() {
                    for (name, mult) in layer.active() {
                        let i = layer.adapter_index(&name)?;
                        let d = layer.delta_weight(i, mult);
                        w.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
                    }
                } else {
                    w = layer.effective_weight();
                }
                out.push((format!("{m}.weight"), enc(vec![layer.out_features(), layer.in_features()], &w)));
                if let Some(bias) = layer.bias() {
                    out.push((format!("{m}.bias"), enc(vec![layer.out_features()], bias)));
                }
            }
        }
        let mut cfg = self.cfg.raw.clone();
        cfg.remove("quantization_config");
        cfg.insert("dtype".into(), serde_json::Value::String(dt.torch_name().into()));
        cfg.insert("architectures".into(), serde_json::json!([self.cfg.arch.architecture()]));
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(cfg)).map_err(|e| err!(Internal, "config.json: {e}"))?;
        write_atomic(&dir.join("model.safetensors"), &out, &Default::default())?;
        crate::io::safetensors::write_file_atomic(&dir.join("config.json"), text.as_bytes())?;
        Ok(())
    }
}
