//! Generation with a KV cache: prefill each prompt, then decode one token
//! per sequence per step, all sequences together, each with its own
//! adapter if asked (a mixed-adapter batch), merged or not.
//!
//! Sampling follows transformers' default processor order: temperature,
//! then top-k, then top-p (nucleus, keeping the smallest set whose
//! probability reaches `top_p`, at least one token), then a draw from the
//! softmax. `temperature == 0` is greedy (argmax, lowest id on ties).

use super::{Model, ModelConfig};
use crate::backend::cpu::attention::attention_decode;
use crate::backend::cpu::on_pool;
use crate::rng::SplitMix64;
use crate::Result;

/// Sampling settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    /// `InvalidArgument` unless the temperature is finite and ≥ 0 and
    /// top_p is in (0, 1] (NaN fails both).
    pub fn check(&self) -> Result<()> {
        let temperature_ok = self.temperature >= 0.0 && self.temperature.is_finite();
        let top_p_ok = self.top_p > 0.0 && self.top_p <= 1.0;
        if !temperature_ok || !top_p_ok {
            bail!(InvalidArgument, "sampling: temperature {} must be ≥ 0 and top_p {} in (0, 1]", self.temperature, self.top_p);
        }
        Ok(())
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut SplitMix64) -> usize {
    if s.temperature <= 0.0 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best;
    }
    let mut idx: Vec<(usize, f32)> = logits.iter().map(|&v| v / s.temperature).enumerate().collect();
    idx.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0)));
    if s.top_k > 0 && s.top_k < idx.len() {
        // transformers keeps ties with the k-th value.
        let kth = idx[s.top_k - 1].1;
        let keep = idx.iter().take_while(|(_, v)| *v >= kth).count();
        idx.truncate(keep);
    }
    let m = idx[0].1;
    let mut p: Vec<f64> = idx.iter().map(|(_, v)| ((v - m) as f64).exp()).collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = p.len();
        for (i, &x) in p.iter().enumerate() {
            acc += x;
            if acc >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        idx.truncate(keep);
        p.truncate(keep);
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
    }
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0.0;
    for (i, &x) in p.iter().enumerate() {
        acc += x;
        if u < acc {
            return idx[i].0;
        }
    }
    idx[idx.len() - 1].0
}

/// The sampling loop of a generation: from the prompts' last logits
/// (`[B, V]`), samples a token per unfinished sequence, stops a sequence at
/// a `stop` id (included), reports progress, and asks `decode` for the next
/// logits given the sampled tokens (finished sequences decode a dummy token
/// into their spare cache row; their output is final).
pub(crate) fn sample_loop(
    mut last: Vec<f32>,
    vocab: usize,
    max_new: usize,
    s: &Sampling,
    stop: &[i32],
    progress: &mut dyn FnMut(usize, usize) -> bool,
    mut decode: impl FnMut(&[i32]) -> Result<Vec<f32>>,
) -> Result<Vec<Vec<i32>>> {
    let bsz = last.len() / vocab;
    let mut rng = SplitMix64::new(s.seed);
    let mut out: Vec<Vec<i32>> = vec![Vec::new(); bsz];
    let mut done = vec![false; bsz];
    for step in 0..max_new {
        let mut next = vec![0i32; bsz];
        for b in 0..bsz {
            if done[b] {
                continue;
            }
            let tok = sample(&last[b * vocab..(b + 1) * vocab], s, &mut rng) as i32;
            out[b].push(tok);
            next[b] = tok;
            if stop.contains(&tok) {
                done[b] = true;
            }
        }
        if !progress(step + 1, max_new) {
            bail!(Cancelled, "generation cancelled by the progress callback after {} tokens", step + 1);
        }
        if done.iter().all(|&d| d) || step + 1 == max_new {
            break;
        }
        last = decode(&next)?;
    }
    Ok(out)
}

/// Appends a step's tokens to each sequence's history (`lens`: the
/// positions its KV cache holds); `Some(m)`, the cache length, when the
/// caches must be recomputed before these tokens are decoded
/// ([`ModelConfig::rope_switches_after`]), the new tokens' position `m`
/// being the call's largest.
pub(crate) fn push_step(cfg: &ModelConfig, hist: &mut [Vec<i32>], next: &[i32], lens: &[usize]) -> Option<usize> {
    for (h, &t) in hist.iter_mut().zip(next) {
        h.push(t);
    }
    let m = lens.iter().copied().max().unwrap_or(0);
    cfg.rope_switches_after(m).then_some(m)
}

/// One request of a batch.
pub struct Request<'a> {
    pub prompt: &'a [i32],
    /// Model adapter index for this sequence, −1 for the base; `None`:
    /// the model's active adapters.
    pub adapter: Option<i32>,
}

struct Cache {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Model {
    /// Generates up to `max_new` tokens for each request; stops a sequence
    /// at any of `stop` ids (the stop token is included). Returns the new
    /// tokens of each sequence.
    pub fn generate(&mut self, reqs: &[Request<'_>], max_new: usize, s: &Sampling, stop: &[i32], progress: &mut dyn FnMut(usize, usize) -> bool) -> Result<Vec<Vec<i32>>> {
        if reqs.is_empty() {
            bail!(InvalidArgument, "no sequences to generate");
        }
        s.check()?;
        let mixed = reqs.iter().any(|r| r.adapter.is_some());
        if mixed && reqs.iter().any(|r| r.adapter.is_none()) {
            bail!(InvalidArgument, "either every sequence names its adapter or none does");
        }
        for r in reqs {
            if r.prompt.is_empty() {
                bail!(InvalidArgument, "an empty prompt (give at least one token, e.g. BOS)");
            }
            self.check_ids(r.prompt)?;
        }
        let bsz = reqs.len();
        let cap = reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(0) + max_new;
        if cap > self.cfg.max_position_embeddings {
            crate::log!(Warn, "generating to position {cap}, past max_position_embeddings {}", self.cfg.max_position_embeddings);
        }
        if self.gpu.0.is_some() {
            let seq_ad: Option<Vec<i32>> = mixed.then(|| reqs.iter().map(|r| r.adapter.unwrap_or(-1)).collect());
            let prompts: Vec<&[i32]> = reqs.iter().map(|r| r.prompt).collect();
            return self.with_device(|g, _| g.generate(&prompts, seq_ad.as_deref(), max_new, s, stop, progress));
        }
        let (nkv, hd) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let nl = self.blocks.len();
        let per = bsz
            .checked_mul(cap)
            .and_then(|x| x.checked_mul(nkv * hd))
            .filter(|&p| p.checked_mul(8 * nl).is_some())
            .ok_or_else(|| err!(InvalidArgument, "a KV cache for {bsz} sequences of {cap} positions overflows"))?;
        // The cache is the one allocation a request's size controls: fail
        // with a status instead of aborting when it does not fit.
        let zeros = |n: usize| -> Result<Vec<f32>> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| err!(OutOfMemory, "the KV cache ({} MB for {bsz} sequences × {cap} positions × {nl} layers) does not fit in memory", (per * 8 * nl) >> 20))?;
            v.resize(n, 0.0);
            Ok(v)
        };
        let mut caches: Vec<Cache> = (0..nl).map(|_| Ok(Cache { k: zeros(per)?, v: zeros(per)? })).collect::<Result<_>>()?;
        self.kv_bytes = nl * per * 8;
        self.note_peak(self.kv_bytes);
        let seq_ad: Option<Vec<i32>> = if mixed { Some(reqs.iter().map(|r| r.adapter.unwrap_or(-1)).collect()) } else { None };
        let mut lens = vec![0usize; bsz];
        let mut last_logits = vec![0f32; bsz * self.vocab()];
        let v = self.vocab();
        // Prefill, one sequence at a time (prompts may differ in length);
        // LongRoPE's factors are the batch's, chosen by its longest prompt.
        let mut hist: Vec<Vec<i32>> = reqs.iter().map(|r| r.prompt.to_vec()).collect();
        let longest = hist.iter().map(Vec::len).max().unwrap_or(1);
        for b in 0..bsz {
            self.prefill_into(&hist[b], seq_ad.as_ref().map(|x| x[b]), longest - 1, &mut caches, cap, b, &mut last_logits)?;
            lens[b] = hist[b].len();
        }
        let out = sample_loop(last_logits, v, max_new, s, stop, progress, |next| {
            let Some(m) = push_step(&self.cfg, &mut hist, next, &lens) else {
                return on_pool(|| self.decode_step(next, &mut lens, &mut caches, cap, seq_ad.as_deref()));
            };
            // LongRoPE switches to its long frequencies at this position:
            // recompute every sequence's cache with them (transformers'
            // Phi-3 generation drops its cache here), the largest position
            // being the new token's.
            let mut logits = vec![0f32; bsz * v];
            for b in 0..bsz {
                self.prefill_into(&hist[b], seq_ad.as_ref().map(|x| x[b]), m, &mut caches, cap, b, &mut logits)?;
                lens[b] = hist[b].len();
            }
            Ok(logits)
        });
        self.kv_bytes = 0;
        let out = out?;
        let keep = self.act_peak;
        self.pool.trim(keep);
        Ok(out)
    }

    /// [`prefill`](Self::prefill) of sequence `b`'s tokens into its rows of
    /// the caches, its last logits into row `b` of `logits`.
    #[allow(clippy::too_many_arguments)]
    fn prefill_into(&mut self, tokens: &[i32], adapter: Option<i32>, last: usize, caches: &mut [Cache], cap: usize, b: usize, logits: &mut [f32]) -> Result<()> {
        let (t, v, row) = (tokens.len(), self.vocab(), self.cfg.num_kv_heads * self.cfg.head_dim);
        let sa = adapter.map(|a| vec![a]);
        let (lg, kvs) = on_pool(|| self.prefill(tokens, sa.as_deref(), last))?;
        for (l, (k, vv)) in kvs.into_iter().enumerate() {
            caches[l].k[b * cap * row..b * cap * row + t * row].copy_from_slice(&k);
            caches[l].v[b * cap * row..b * cap * row + t * row].copy_from_slice(&vv);
        }
        logits[b * v..(b + 1) * v].copy_from_slice(&lg[(t - 1) * v..t * v]);
        Ok(())
    }

    /// Full forward over one prompt: logits `[T, V]` and each layer's
    /// rotated k and v `[T, kv_dim]`; `last` is the largest position of
    /// the batch (LongRoPE's factors follow it).
    fn prefill(&mut self, prompt: &[i32], seq_ad: Option<&[i32]>, last: usize) -> Result<(Vec<f32>, Vec<(Vec<f32>, Vec<f32>)>)> {
        let t = prompt.len();
        let rows = self.row_adapters(seq_ad, 1, t)?;
        let tables = self.tables_upto(0, t, last);
        let mut x = self.embed_rows(prompt);
        let mut kvs = Vec::with_capacity(self.blocks.len());
        for l in 0..self.blocks.len() {
            let acts = self.layer_forward(l, &mut x, 1, t, &tables, rows.as_ref(), false, 0)?;
            kvs.push((acts.k, acts.v));
        }
        let (logits, _, _) = self.head_forward(&x, t, true);
        Ok((logits, kvs))
    }

    /// One decode step: token `next[b]` at position `lens[b]` of each
    /// sequence; returns logits `[B, V]`.
    fn decode_step(&mut self, next: &[i32], lens: &mut [usize], caches: &mut [Cache], cap: usize, seq_ad: Option<&[i32]>) -> Result<Vec<f32>> {
        let bsz = next.len();
        let c = &self.cfg;
        let (h, hd, nh, nkv, eps, rs) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.rms_norm_eps, c.residual_scale);
        let o_j = super::o_down(c.arch.fused()).0;
        let rows = self.row_adapters(seq_ad, bsz, 1)?;
        let positions: Vec<usize> = lens.to_vec();
        // One table row per sequence: rope as a [1, B, H, D] tensor.
        let tables = self.tables_at(&positions);
        let mut x = self.embed_rows(next);
        let new_lens: Vec<usize> = lens.iter().map(|&n| n + 1).collect();
        for l in 0..self.blocks.len() {
            let h1 = super::input_norm(&mut self.pool, self.blocks[l].attn_norm.as_ref(), &x, bsz, h, eps, None);
            let ([q, k, vv], _) = self.qkv_forward(l, &h1, 1, bsz, tables.layer(&self.cfg, l), rows.as_ref(), false, 0)?;
            self.pool.give(h1);
            let row = nkv * hd;
            for b in 0..bsz {
                let at = (b * cap + lens[b]) * row;
                caches[l].k[at..at + row].copy_from_slice(&k[b * row..(b + 1) * row]);
                caches[l].v[at..at + row].copy_from_slice(&vv[b * row..(b + 1) * row]);
            }
            let shape = self.cfg.decode_shape(l, bsz, cap);
            let mut att = vec![0f32; bsz * nh * hd];
            attention_decode(&q, &caches[l].k, &caches[l].v, &new_lens, &shape, &mut att);
            let o = self.lin_forward(l, o_j, &att, bsz, rows.as_ref(), false, 0)?;
            super::residual_add(&mut self.pool, self.blocks[l].post(0), rs, o, &mut x, bsz, h, eps, false);
            let h2 = super::input_norm(&mut self.pool, self.blocks[l].mlp_norm.as_ref(), &x, bsz, h, eps, None);
            let [g, u, a, d] = self.mlp_forward(l, &h2, bsz, rows.as_ref(), false, 0)?;
            super::residual_add(&mut self.pool, self.blocks[l].post(1), rs, d, &mut x, bsz, h, eps, false);
            for b in [h2, g, u, a, q, k, vv] {
                self.pool.give(b);
            }
        }
        for n in lens.iter_mut() {
            *n += 1;
        }
        let (logits, _, _) = self.head_forward(&x, bsz, true);
        Ok(logits)
    }
}
