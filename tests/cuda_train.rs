//! The training step on a GPU against the CPU backend: 20 steps of AdamW
//! on the PEFT fixtures (Llama NF4 quantized at load, Qwen2 with qkv bias,
//! tied head, rsLoRA and layers_to_transform, Mistral bf16 with a sliding
//! window and rank/alpha patterns), a random Llama with head_dim 128 and a
//! random Mistral with head_dim 64 and a 48-token window (the two whose
//! attention runs on tensor cores in bf16 mode), through `Trainer` exactly
//! as `lora_train_step` runs it.
//!
//! Bounds, per step:
//! - fp32 compute (adapter products on cuBLAS, and on the crate's LoRA
//!   kernels): the GPU computes the CPU's function with another
//!   summation order (cuBLAS splits and orders k as it likes, the
//!   reductions are trees): each product differs by about k·2⁻²⁴ relative
//!   and the differences pass through 20 AdamW updates. Loss within 1e-4
//!   relative, gradient norm within 1e-3, adapter weights after 20 steps
//!   within 2e-3 relative L2.
//! - bf16 compute: the frozen products take bf16 operands (2⁻⁸ relative
//!   rounding each): loss within 2e-2 relative of the CPU's fp32 loss, and
//!   the loss falls as on the CPU; the same with tensor-core attention
//!   (bf16 q, k, v, P, dO, dS) switched on, and with the adapter products
//!   on bf16 operands as well (`LoraPath::BlasBf16`).
//!
//! Activation checkpointing changes nothing (bit for bit: the same kernels
//! and products run on the same inputs); a run moved from the GPU back to
//! the CPU, or saved on the GPU and resumed on the CPU, continues with the
//! CPU's numbers (fp32 bounds).
//!
//! Without a GPU every test runs on the emulated device
//! (tests/common/fakecuda.rs), the 20-step comparison with 2 steps there;
//! it skips where there is no C++ compiler (a failure under
//! LORA_REQUIRE_GPU=1).

#[path = "common/gpu.rs"]
#[allow(dead_code)]
mod common;

use lora::model::gpu::{Compute, LoraPath};
use lora::model::peft::{self, AdapterSpec, Targets};
use lora::model::{LoadOptions, Model};
use lora::quant::nf4::Nf4Params;
use lora::rng::SplitMix64;
use lora::session::trainer::{OptimKind, Trainer, TrainerConfig};
use lora::ErrorKind;
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const STEPS: usize = 20;

/// The fixtures: `tests/fixtures/model` under the working directory when
/// there is one (scripts/gpu-check.sh runs this binary from a copy of the
/// repository on another machine), else under the source tree.
fn fixture(case: &str) -> PathBuf {
    let rel = Path::new("tests/fixtures/model");
    let base = if rel.is_dir() { rel.to_path_buf() } else { Path::new(env!("CARGO_MANIFEST_DIR")).join(rel) };
    base.join(case)
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<i32> {
    let mut r = SplitMix64::new(seed);
    (0..n).map(|_| (r.next_u64() % vocab as u64) as i32).collect()
}

struct Case {
    name: &'static str,
    model: Box<dyn Fn() -> Model>,
    batch: usize,
    seq: usize,
}

/// A random NF4 model of config `cfg` (checked by `check`) with every norm
/// weight drawn around one (so a missing or transposed norm shows) and a
/// rank-16 adapter "a".
fn random_nf4(cfg: serde_json::Value, seed: u64, check: fn(&Model)) -> Box<dyn Fn() -> Model> {
    Box::new(move || {
        let mut m = Model::random(&cfg.to_string(), 0.02, LoadOptions { quantize: Some(Nf4Params::default()), seed }).unwrap();
        check(&m);
        let mut r = SplitMix64::new(seed + 1);
        common::for_each_norm_weight(&mut m, |x| *x = 1.0 + 0.2 * r.normal());
        m.add_adapter("a", AdapterSpec::new(16, 32.0)).unwrap();
        m
    })
}

/// Every case (`all_cases`), or those `LORA_TRAIN_CASES` selects.
fn case_list(all_cases: bool) -> Vec<Case> {
    let fx = |case: &'static str, quant: bool| -> Box<dyn Fn() -> Model> {
        Box::new(move || {
            let mut m = Model::load(&fixture(case).join("model"), LoadOptions { quantize: quant.then(Nf4Params::default), seed: 3 }, &mut |_, _| true).unwrap();
            peft::load_adapter(&mut m, &fixture(case).join("adapter"), "a").unwrap();
            m
        })
    };
    let random = Box::new(|| {
        let cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 1000,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 512, "tie_word_embeddings": true
        });
        let mut m = Model::random(&cfg.to_string(), 0.02, LoadOptions { quantize: Some(Nf4Params::default()), seed: 9 }).unwrap();
        m.add_adapter("a", AdapterSpec::new(16, 32.0)).unwrap();
        m
    }) as Box<dyn Fn() -> Model>;
    let window = Box::new(|| {
        let cfg = serde_json::json!({
            "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 777,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": false,
            "sliding_window": 48
        });
        let mut m = Model::random(&cfg.to_string(), 0.02, LoadOptions { quantize: None, seed: 10 }).unwrap();
        m.add_adapter("a", AdapterSpec::new(8, 16.0)).unwrap();
        m
    }) as Box<dyn Fn() -> Model>;
    // Qwen3: per-head q/k norms, head_dim 128 with q_dim 512 ≠ hidden 256,
    // YaRN (cos and sin scaled), NF4 (folds and stacked gradients in the
    // lean step).
    let qwen3 = random_nf4(
        serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 640,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "tie_word_embeddings": true,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 128}
        }),
        11,
        |m| assert!(m.blocks[0].qk_norm.is_some()),
    );
    // SmolLM3: the middle layer unrotated (NoPE) and windowed, head_dim
    // 128 (the lean step's bf16 q/k copies and stacked gradients without
    // the rotation).
    let smollm3 = random_nf4(
        serde_json::json!({
            "architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128, "vocab_size": 600,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "no_rope_layers": [1, 0, 1],
            "use_sliding_window": true, "sliding_window": 20, "layer_types": ["full_attention", "sliding_attention", "full_attention"]
        }),
        13,
        |m| assert_eq!(m.cfg.rope_layers, [true, false, true]),
    );
    // Granite: every multiplier away from 1 (the residual one not a power
    // of two), tied, head_dim 128.
    let granite = random_nf4(
        serde_json::json!({
            "architectures": ["GraniteForCausalLM"], "model_type": "granite", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 700,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "tie_word_embeddings": true, "rope_theta": 10000.0,
            "embedding_multiplier": 12.0, "attention_multiplier": 0.015625, "residual_multiplier": 0.22, "logits_scaling": 0.25
        }),
        14,
        |m| assert_eq!(m.cfg.residual_scale, Some(0.22)),
    );
    // OLMo 2: no input norms, output norms on both branches, q/k norms over
    // the whole projection (folds and stacked gradients from the unnormed
    // input).
    let olmo2 = random_nf4(
        serde_json::json!({
            "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 500,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "rope_theta": 500000.0, "tie_word_embeddings": false
        }),
        15,
        |m| assert!(m.blocks[0].attn_norm.is_none() && m.blocks[0].mlp_norm.is_none() && m.blocks[0].post_norms.is_some()),
    );
    // Gemma 3: GeGLU, 1 + w norms (q/k, input and output), the sliding
    // layers' own rope (and windows), query_pre_attn_scalar, embeddings ×
    // √hidden, tied.
    let gemma3 = random_nf4(
        serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128, "vocab_size": 640,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "query_pre_attn_scalar": 96, "sliding_window": 24,
            "layer_types": ["sliding_attention", "full_attention"], "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        }),
        17,
        |m| assert!(m.cfg.local_rope_at(0) && !m.cfg.local_rope_at(1) && m.cfg.attn_softcap.is_none()),
    );
    // Phi-3: q/k/v and gate/up fused (the device splits the NF4 weights by
    // rows and the adapters' B, A shared), head_dim 128, a window, and
    // Phi-4-mini's partial rotation (the first 96 of 128 elements rotate:
    // the lean step's bf16 rotated copies and stacked gradients pass the
    // rest through).
    let phi3 = random_nf4(
        serde_json::json!({
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 700,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "rope_theta": 10000.0, "sliding_window": 40, "tie_word_embeddings": false,
            "partial_rotary_factor": 0.75
        }),
        19,
        |m| assert!(m.cfg.arch.fused() && m.cfg.rotary_dim == 96),
    );
    // Gemma 2: head_dim 256 (the _d256 attention kernels), soft caps on
    // the attention scores and the logits small enough to bend this
    // random model's (its logits, rms 0.31 and at most 1.5 uncapped, are
    // at most 0.59 capped), every other layer sliding.
    let gemma2 = random_nf4(
        serde_json::json!({
            "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 640,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "query_pre_attn_scalar": 256, "sliding_window": 24,
            "attn_logit_softcapping": 0.25, "final_logit_softcapping": 0.6, "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 10000.0
        }),
        21,
        |m| assert!(m.cfg.head_dim == 256 && m.cfg.attn_softcap == Some(0.25) && m.cfg.final_softcap == Some(0.6)),
    );
    // Gemma 2 27B's layout: head_dim 128, where the tensor-core kernels
    // take the soft-capped scores (the lean step's attention).
    let gemma2_hd128 = random_nf4(
        serde_json::json!({
            "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128, "vocab_size": 640,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "query_pre_attn_scalar": 144, "sliding_window": 24,
            "attn_logit_softcapping": 0.25, "final_logit_softcapping": 0.6, "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 10000.0
        }),
        23,
        |m| assert!(m.cfg.head_dim == 128 && m.cfg.attn_softcap == Some(0.25)),
    );
    let all = vec![
        Case { name: "llama_nf4", model: fx("llama_nf4", true), batch: 3, seq: 33 },
        Case { name: "qwen2_fp32", model: fx("qwen2_fp32", false), batch: 2, seq: 40 },
        Case { name: "mistral_bf16", model: fx("mistral_bf16", false), batch: 2, seq: 37 },
        Case { name: "random_hd128_nf4", model: random, batch: 2, seq: 130 },
        Case { name: "random_mistral_hd64_window48", model: window, batch: 2, seq: 100 },
        Case { name: "qwen3_fp32", model: fx("qwen3_fp32", false), batch: 2, seq: 40 },
        Case { name: "llama_bias_nf4", model: fx("llama_bias_fp32", true), batch: 2, seq: 29 },
        Case { name: "random_qwen3_hd128_nf4", model: qwen3, batch: 2, seq: 70 },
        // Per-layer windows: layer 0 full, layer 1 a window of 6.
        Case { name: "qwen2_window6_fp32", model: fx("qwen2_window6_fp32", false), batch: 2, seq: 30 },
        // SmolLM3 (layer 1 unrotated and a window of 5) and Granite
        // (multipliers 12, 0.09, 0.22, 2.5), as transformers wrote them.
        Case { name: "smollm3_fp32", model: fx("smollm3_fp32", false), batch: 2, seq: 30 },
        Case { name: "granite_fp32", model: fx("granite_fp32", false), batch: 2, seq: 30 },
        Case { name: "random_smollm3_nope_hd128_nf4", model: smollm3, batch: 2, seq: 70 },
        Case { name: "random_granite_hd128_nf4", model: granite, batch: 2, seq: 70 },
        Case { name: "olmo2_fp32", model: fx("olmo2_fp32", false), batch: 2, seq: 30 },
        Case { name: "random_olmo2_hd128_nf4", model: olmo2, batch: 2, seq: 70 },
        // Gemma (GeGLU, 1 + w norms, scaled embeddings) and Gemma 3 (layer 0
        // sliding with its own rope, window 5), as transformers wrote them.
        Case { name: "gemma_fp32", model: fx("gemma_fp32", false), batch: 2, seq: 30 },
        Case { name: "gemma3_fp32", model: fx("gemma3_fp32", false), batch: 2, seq: 30 },
        Case { name: "random_gemma3_hd128_nf4", model: gemma3, batch: 2, seq: 70 },
        // Phi-3 (fused projections, window 6), fp32 and quantized at load.
        Case { name: "phi3_fp32", model: fx("phi3_fp32", false), batch: 2, seq: 30 },
        Case { name: "phi3_nf4", model: fx("phi3_fp32", true), batch: 2, seq: 30 },
        Case { name: "random_phi3_partial_hd128_nf4", model: phi3, batch: 2, seq: 70 },
        // Phi-3 with LongRoPE (original length 12): training takes the long
        // factors; generation's prompts the short ones, then every cache is
        // recomputed with the long ones where the decode crosses 12.
        Case { name: "phi3_longrope_fp32", model: fx("phi3_longrope_fp32", false), batch: 2, seq: 30 },
        // Phi-4-mini's rope: a partial rotation (12 of 16) with LongRoPE.
        Case { name: "phi3_partial_longrope_fp32", model: fx("phi3_partial_longrope_fp32", false), batch: 2, seq: 30 },
        // Gemma 2 (soft caps 4 and 8, window 6), as transformers wrote it,
        // and at head_dim 256.
        Case { name: "gemma2_fp32", model: fx("gemma2_fp32", false), batch: 2, seq: 30 },
        Case { name: "random_gemma2_hd256_nf4", model: gemma2, batch: 2, seq: 70 },
        Case { name: "random_gemma2_hd128_nf4", model: gemma2_hd128, batch: 2, seq: 70 },
    ];
    if all_cases {
        return all;
    }
    all.into_iter().filter(|c| selected(c.name)).collect()
}

/// `LORA_TRAIN_CASES=a,b` keeps the cases (and the folded test's runs)
/// whose names contain a or b (gpu-check splits the cases so; or to rerun
/// a few while working on them).
fn selected(name: &str) -> bool {
    match std::env::var("LORA_TRAIN_CASES") {
        Ok(f) if !f.is_empty() => f.split(',').any(|p| name.contains(p)),
        _ => true,
    }
}

/// The cases `LORA_TRAIN_CASES` selects.
fn cases() -> Vec<Case> {
    case_list(false)
}

fn trainer(m: Model, cfg: TrainerConfig, dev: Option<Compute>) -> Trainer {
    let mut t = Trainer::new(Arc::new(Mutex::new(m)), "a", cfg).unwrap();
    if let Some(c) = dev {
        t.use_device(Some((0, c))).unwrap();
    }
    t
}

fn cfg() -> TrainerConfig {
    let mut c = TrainerConfig::default();
    c.adamw.lr = 3e-3;
    c
}

fn weights(t: &Trainer) -> Vec<f32> {
    t.model.lock().adapter_params("a").unwrap().0.iter().flat_map(|p| p.to_vec()).collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

fn run(t: &mut Trainer, ids: &[i32], batch: usize, seq: usize, steps: usize) -> Vec<(f64, f64)> {
    (0..steps).map(|_| t.step(ids, None, batch, seq, &mut |_, _| true).map(|r| (r.loss, r.grad_norm)).unwrap()).collect()
}

/// Bf16 adapter products with the lean step on (whatever LORA_CUDA_LEAN
/// says), checked.
fn lean_step(g: &mut lora::model::gpu::DeviceModel) {
    g.set_lora_path(LoraPath::BlasBf16).unwrap();
    g.set_lean(true);
    assert!(g.lean(), "bf16 adapter products in BF16 mode did not make the step lean");
}

/// Bf16 adapter products with the lean step off (every activation also in
/// fp32), checked.
fn full_step(g: &mut lora::model::gpu::DeviceModel) {
    g.set_lora_path(LoraPath::BlasBf16).unwrap();
    g.set_lean(false);
    assert!(!g.lean(), "set_lean(false) left the step lean");
}

/// Asserts each step's GPU loss within `tol` relative of the CPU's; returns
/// the largest relative difference.
fn check_losses(what: &str, want: &[(f64, f64)], got: &[(f64, f64)], tol: f64) -> f64 {
    let mut worst = 0f64;
    for (i, ((lc, _), (lg, _))) in want.iter().zip(got).enumerate() {
        let dl = (lg - lc).abs() / lc.abs();
        assert!(dl <= tol, "{what}: step {i} loss {lg} on the GPU, {lc} on the CPU: rel {dl:.2e}");
        worst = worst.max(dl);
    }
    worst
}

#[test]
fn twenty_steps_match_the_cpu() {
    let Some(_) = common::gpu("twenty_steps_match_the_cpu") else { return };
    // Two steps on the emulated device (twenty take it ten minutes).
    let steps = if common::emulated() { 2 } else { STEPS };
    for c in cases() {
        let vocab = (c.model)().vocab();
        let ids = tokens(c.batch * c.seq, vocab, 7);
        let mut cpu = trainer((c.model)(), cfg(), None);
        let want = run(&mut cpu, &ids, c.batch, c.seq, steps);
        let mut g32 = trainer((c.model)(), cfg(), Some(Compute::F32));
        let got = run(&mut g32, &ids, c.batch, c.seq, steps);
        let (mut el, mut eg) = (0f64, 0f64);
        for (i, ((lc, nc), (lg, ng))) in want.iter().zip(&got).enumerate() {
            let (dl, dn) = ((lg - lc).abs() / lc.abs(), (ng - nc).abs() / nc.abs().max(1e-12));
            assert!(dl <= 1e-4, "{}: step {i} loss {lg} on the GPU (fp32), {lc} on the CPU: rel {dl:.2e}", c.name);
            assert!(dn <= 1e-3, "{}: step {i} grad norm {ng} on the GPU (fp32), {nc} on the CPU: rel {dn:.2e}", c.name);
            el = el.max(dl);
            eg = eg.max(dn);
        }
        let ew = rel_l2(&weights(&g32), &weights(&cpu));
        assert!(ew <= 2e-3, "{}: adapter after {steps} steps differs by {ew:.2e} (rel L2)", c.name);
        // The same with the adapter products on the crate's LoRA kernels,
        // and the head and loss over chunks of 7 rows.
        let mut gk = trainer((c.model)(), cfg(), Some(Compute::F32));
        gk.set_lora_kernels(true).unwrap();
        gk.with_device_model(|g| g.set_head_chunk_elems(7 * vocab)).unwrap();
        let gotk = run(&mut gk, &ids, c.batch, c.seq, steps);
        check_losses(&format!("{} fp32, LoRA kernels, 7-row head chunks", c.name), &want, &gotk, 1e-4);
        let mut g16 = trainer((c.model)(), cfg(), Some(Compute::BF16));
        let got16 = run(&mut g16, &ids, c.batch, c.seq, steps);
        let e16 = check_losses(&format!("{} bf16", c.name), &want, &got16, 2e-2);
        assert!(got16[steps - 1].0 < got16[0].0, "{}: bf16 loss did not fall: {:?}", c.name, got16);
        // The same with attention on tensor cores (where head_dim allows).
        let mut tc = trainer((c.model)(), cfg(), Some(Compute::BF16));
        tc.set_tensor_core_attention(true).unwrap();
        let gottc = run(&mut tc, &ids, c.batch, c.seq, steps);
        let etc = check_losses(&format!("{} bf16, tensor-core attention", c.name), &want, &gottc, 2e-2);
        assert!(gottc[steps - 1].0 < gottc[0].0, "{}: loss with tensor-core attention did not fall: {:?}", c.name, gottc);
        // The same with the adapter products on bf16 operands too (PyTorch
        // autocast's precision).
        let mut tb = trainer((c.model)(), cfg(), Some(Compute::BF16));
        tb.set_tensor_core_attention(true).unwrap();
        tb.with_device_model(lean_step).unwrap();
        let gottb = run(&mut tb, &ids, c.batch, c.seq, steps);
        let etb = check_losses(&format!("{} bf16, tensor-core attention, bf16 adapter products", c.name), &want, &gottb, 2e-2);
        assert!(gottb[steps - 1].0 < gottb[0].0, "{}: loss with bf16 adapter products did not fall: {:?}", c.name, gottb);
        // The same without the lean step (every activation also in fp32):
        // the lean step's extra roundings (gate/up, the SwiGLU product's
        // gradient, logits, δ from the bf16 o) stay well inside the bf16
        // bound.
        let mut tf = trainer((c.model)(), cfg(), Some(Compute::BF16));
        tf.set_tensor_core_attention(true).unwrap();
        tf.with_device_model(full_step).unwrap();
        let gottf = run(&mut tf, &ids, c.batch, c.seq, steps);
        let elean = check_losses(&format!("{} lean bf16 step against the full one", c.name), &gottf, &gottb, 1e-2);
        // ... and it is a different computation (gate/up and the logits
        // rounded to bf16): the switch reaches the step.
        assert_ne!(gottf, gottb, "{}: the lean and the full bf16 step gave the same bits: set_lean did nothing", c.name);
        eprintln!("{}: lean bf16 step within {elean:.2e} (max rel loss) of the full bf16 step over {steps} steps", c.name);
        eprintln!(
            "{} ({}×{}): CPU loss {:.5} → {:.5}; GPU fp32 max rel loss {el:.2e}, grad norm {eg:.2e}, adapter {ew:.2e}; GPU bf16 max rel loss {e16:.2e} ({:.5} → {:.5}), with tensor-core attention {etc:.2e}, and bf16 adapter products {etb:.2e}",
            c.name,
            c.batch,
            c.seq,
            want[0].0,
            want[steps - 1].0,
            got16[0].0,
            got16[steps - 1].0
        );
    }
}

#[test]
fn checkpointing_micro_batches_and_handoffs() {
    let Some(_) = common::gpu("checkpointing_micro_batches_and_handoffs") else { return };
    let c = cases().remove(0);
    let ids = tokens(c.batch * c.seq, (c.model)().vocab(), 8);
    let mut plain = trainer((c.model)(), cfg(), Some(Compute::BF16));
    let want = run(&mut plain, &ids, c.batch, c.seq, 4);
    // Checkpointing recomputes each layer with the same kernels: bit for bit.
    let mut ck = trainer((c.model)(), TrainerConfig { checkpointing: true, ..cfg() }, Some(Compute::BF16));
    let got = run(&mut ck, &ids, c.batch, c.seq, 4);
    for (a, b) in want.iter().zip(&got) {
        assert_eq!(a.0.to_bits(), b.0.to_bits(), "checkpointing changed the loss: {a:?} vs {b:?}");
    }
    assert_eq!(weights(&ck), weights(&plain));
    // The same in the lean bf16 step (bf16 adapter products: activations
    // held in bf16 alone, fused conversions; with tensor-core attention q,
    // k, v and o in bf16 too), which must recompute the same bits too.
    // Without checkpointing it recomputes q, k, v and the mid-layer residual
    // in the backward; a checkpointed layer's recomputation keeps them for
    // its backward: so this also checks that those recomputations give the
    // forward's bits.
    // On this fixture (head_dim below 64: fp32 attention) and on the two
    // cases whose head_dim the tensor-core kernels take.
    for lc in std::iter::once(cases().remove(0)).chain(cases().into_iter().skip(3)) {
        let lids = tokens(lc.batch * lc.seq, (lc.model)().vocab(), 8);
        let lean = |checkpointing: bool| {
            let mut t = trainer((lc.model)(), TrainerConfig { checkpointing, ..cfg() }, Some(Compute::BF16));
            t.set_tensor_core_attention(true).unwrap();
            t.with_device_model(lean_step).unwrap();
            let losses = run(&mut t, &lids, lc.batch, lc.seq, 4);
            (losses, weights(&t))
        };
        let ((lw, ww), (lck, wc)) = (lean(false), lean(true));
        for (a, b) in lw.iter().zip(&lck) {
            assert_eq!(a.0.to_bits(), b.0.to_bits(), "{}: checkpointing changed the lean step's loss: {a:?} vs {b:?}", lc.name);
        }
        assert_eq!(ww, wc, "{}: checkpointing changed the lean step's adapter", lc.name);
        let lwant = run(&mut trainer((lc.model)(), cfg(), None), &lids, lc.batch, lc.seq, 4);
        check_losses(&format!("{}: lean bf16 step", lc.name), &lwant, &lw, 2e-2);
    }
    // Micro-batches of one sequence accumulate the whole batch's gradient.
    let mut cpu = trainer((c.model)(), cfg(), None);
    let whole = run(&mut cpu, &ids, c.batch, c.seq, 6);
    let mut mb = trainer((c.model)(), TrainerConfig { micro_batch: 1, ..cfg() }, Some(Compute::F32));
    let got = run(&mut mb, &ids, c.batch, c.seq, 3);
    check_losses("micro-batches on the GPU", &whole, &got, 1e-4);
    // Back to the CPU: the adapter and AdamW state come along.
    mb.use_device(None).unwrap();
    assert!(mb.device().is_none());
    let rest = run(&mut mb, &ids, c.batch, c.seq, 3);
    check_losses("after moving back to the CPU (steps 3..)", &whole[3..], &rest, 1e-4);
    // Saved on the GPU, resumed on the CPU.
    let mut g = trainer((c.model)(), cfg(), Some(Compute::F32));
    run(&mut g, &ids, c.batch, c.seq, 3);
    let dir = std::env::temp_dir().join(format!("liblora-cuda-train-{}", std::process::id()));
    g.save(&dir).unwrap();
    let mut r = Trainer::resume(Arc::new(Mutex::new((c.model)())), &dir).unwrap();
    assert_eq!(r.steps_done(), 3);
    let rest = run(&mut r, &ids, c.batch, c.seq, 3);
    check_losses("resumed on the CPU from a GPU checkpoint (steps 3..)", &whole[3..], &rest, 1e-4);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("checkpointing bit-identical over 4 steps; micro-batches, GPU→CPU handoff and GPU save → CPU resume within 1e-4");
}

#[test]
fn refusals() {
    let Some(_) = common::gpu("refusals") else { return };
    let c = cases().remove(0);
    let mut t = Trainer::new(Arc::new(Mutex::new((c.model)())), "a", TrainerConfig { optimizer: OptimKind::AdamW8bit, ..cfg() }).unwrap();
    assert_eq!(t.use_device(Some((0, Compute::BF16))).unwrap_err().kind, ErrorKind::Unsupported);
    let mut t = trainer((c.model)(), cfg(), Some(Compute::BF16));
    let n = c.batch * c.seq;
    let mut labels = tokens(n, 10, 1);
    labels[5] = 1 << 30;
    let ids = tokens(n, 10, 2);
    assert_eq!(t.step(&ids, Some(&labels), c.batch, c.seq, &mut |_, _| true).unwrap_err().kind, ErrorKind::InvalidArgument);
    // Still usable on the device after the refusal.
    run(&mut t, &ids, c.batch, c.seq, 1);
    assert!(t.device().is_some());
    // A second trainer of the same adapter on the same device is refused.
    let mut t2 = Trainer::new(t.model.clone(), "a", cfg()).unwrap();
    assert_eq!(t2.use_device(Some((0, Compute::BF16))).unwrap_err().kind, ErrorKind::InvalidState);
    drop(t2);
    // A failed move leaves the trainer on the CPU, still usable.
    assert_eq!(t.use_device(Some((4096, Compute::BF16))).unwrap_err().kind, ErrorKind::CudaUnavailable);
    assert!(t.device().is_none());
    run(&mut t, &ids, c.batch, c.seq, 1);
    // A head_dim above the attention kernels' 256 runs on the CPU only:
    // refused with the reason, still usable there.
    let wide = serde_json::json!({
        "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 320, "vocab_size": 256
    });
    let mut g = Model::random(&wide.to_string(), 0.02, LoadOptions::default()).unwrap();
    let e = g.use_device(Some((0, Compute::F32))).unwrap_err();
    assert!(e.kind == ErrorKind::Unsupported && e.to_string().contains("head_dim 320"), "{e}");
    assert!(g.device().is_none());
    g.logits(&tokens(16, 256, 3), 1, 16, None).unwrap();
}

/// Generation on the device (KV cache in device memory, decode attention)
/// against the CPU's `Model::generate` with the same adapter: greedy tokens
/// equal in fp32 mode after a few training steps, for prompts of different
/// lengths; bf16 mode generates the requested lengths, and sampling with a
/// seed repeats itself.
#[test]
fn generation_on_the_device_matches_the_cpu() {
    let Some(_) = common::gpu("generation_on_the_device_matches_the_cpu") else { return };
    use lora::model::generate::Sampling;
    for c in cases() {
        let vocab = (c.model)().vocab();
        let ids = tokens(c.batch * c.seq, vocab, 9);
        let mut t = trainer((c.model)(), cfg(), Some(Compute::F32));
        run(&mut t, &ids, c.batch, c.seq, 3);
        let prompts: Vec<&[i32]> = vec![&ids[..5], &ids[c.seq..c.seq + 11], &ids[3..4]];
        let greedy = Sampling::default();
        let gpu = t.generate(&prompts, 12, &greedy, &[], &mut |_, _| true).unwrap();
        t.use_device(None).unwrap();
        let cpu = t.generate(&prompts, 12, &greedy, &[], &mut |_, _| true).unwrap();
        assert_eq!(gpu, cpu, "{}: greedy tokens on the GPU (fp32) differ from the CPU's", c.name);
        let mut t16 = trainer((c.model)(), cfg(), Some(Compute::BF16));
        run(&mut t16, &ids, c.batch, c.seq, 3);
        let g16 = t16.generate(&prompts, 12, &greedy, &[], &mut |_, _| true).unwrap();
        assert!(g16.iter().all(|s| s.len() == 12 && s.iter().all(|&x| x >= 0 && (x as usize) < vocab)), "{}: bf16 generation {g16:?}", c.name);
        let sampled = Sampling { temperature: 0.8, top_k: 20, top_p: 0.9, seed: 5 };
        let a = t16.generate(&prompts, 8, &sampled, &[], &mut |_, _| true).unwrap();
        let b = t16.generate(&prompts, 8, &sampled, &[], &mut |_, _| true).unwrap();
        assert_eq!(a, b, "{}: seeded sampling on the GPU is not repeatable", c.name);
        // The decode path (KV cache; fused NF4 GEMVs in bf16 mode) agrees
        // with a full forward over the same tokens: each greedy token is the
        // full forward's argmax, or within bf16 noise of it. Under LongRoPE
        // a batch takes its longest sequence's factors, so each prompt is
        // generated alone for this check.
        let alone: Vec<Vec<i32>> = if (c.model)().cfg.rope_freqs().long.is_some() {
            prompts.iter().map(|p| t16.generate(&[p], 12, &greedy, &[], &mut |_, _| true).unwrap().remove(0)).collect()
        } else {
            g16.clone()
        };
        for (p, gen) in prompts.iter().zip(&alone) {
            for k in 0..gen.len() {
                let mut seq = p.to_vec();
                seq.extend_from_slice(&gen[..k]);
                let lg = t16.last_logits(&seq).unwrap();
                let top = (0..lg.len()).fold(0, |b, i| if lg[i] > lg[b] { i } else { b });
                let gap = lg[top] - lg[gen[k] as usize];
                assert!(gap <= 0.05 * (1.0 + lg[top].abs()), "{}: decoded token {k} is {} but the full forward's argmax is {top} by {gap}", c.name, gen[k]);
            }
        }
        // fp32: the device's full-forward logits are the CPU's.
        let mut t32 = trainer((c.model)(), cfg(), Some(Compute::F32));
        let gl = t32.last_logits(&ids[..c.seq]).unwrap();
        t32.use_device(None).unwrap();
        let cl = t32.last_logits(&ids[..c.seq]).unwrap();
        let num: f64 = gl.iter().zip(&cl).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        let den: f64 = cl.iter().map(|b| (*b as f64).powi(2)).sum();
        assert!((num / den).sqrt() <= 1e-5, "{}: GPU fp32 logits differ from the CPU's by {:e}", c.name, (num / den).sqrt());
        let same16 = g16.iter().zip(&cpu).filter(|(x, y)| x == y).count();
        eprintln!("{}: GPU fp32 greedy == CPU for 3 prompts × 12 tokens; bf16 greedy equals the CPU's on {same16}/3 prompts", c.name);
    }
}

/// Every adapter weight of `m` set to uniform noise in ±0.05 (so each
/// adapter visibly changes the logits; B starts at zero otherwise).
fn randomize_adapters(m: &mut Model, seed: u64) {
    let mut r = SplitMix64::new(seed);
    let names: Vec<String> = m.adapters.iter().map(|a| a.name.clone()).collect();
    for n in names {
        for t in m.adapter_params(&n).unwrap().0 {
            t.iter_mut().for_each(|x| *x = ((r.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 0.1 - 0.05) as f32);
        }
    }
}

fn rel_l2_f32(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    rel_l2(a, b)
}

/// A model on the device (`Model::use_device`, `lora_model_use_device`)
/// against the same model on the CPU through the same calls: logits with
/// one and with two active adapters (multipliers), merged (derived on the
/// device), swapped while merged, unmerged, mixed-adapter batches (BGMV;
/// a base-only row too), greedy generation merged and with mixed
/// adapters, and adapters
/// added and removed on the host after the copy was made. fp32 compute:
/// within 1e-5 relative L2 (summation order only) and equal greedy
/// tokens; bf16 compute: unmerging restores the unmerged logits bit for
/// bit, and the merged logits are within bf16 rounding (2e-2) of the
/// unmerged ones.
#[test]
fn merge_swap_and_mixed_batches_on_the_device() {
    let Some(_) = common::gpu("merge_swap_and_mixed_batches_on_the_device") else { return };
    use lora::model::generate::{Request, Sampling};
    for c in cases() {
        let mut host = (c.model)();
        let spec = AdapterSpec::new(4, 8.0);
        host.add_adapter("b", spec).unwrap();
        randomize_adapters(&mut host, 11);
        let vocab = host.vocab();
        let (b, t) = (2, c.seq.min(48));
        let ids = tokens(3 * t, vocab, 12);
        let probe = lora::backend::cuda::open(0).unwrap();
        let reserved0 = probe.pool_reserved_bytes().unwrap();
        let mut dev = host.clone();
        dev.use_device(Some((0, Compute::F32))).unwrap();
        let mut worst = 0f64;
        let mut cmp = |what: &str, host: &mut Model, dev: &mut Model, sa: Option<&[i32]>| {
            let n = sa.map_or(b, |s| s.len());
            let want = host.logits(&ids[..n * t], n, t, sa).unwrap();
            let got = dev.logits(&ids[..n * t], n, t, sa).unwrap();
            let e = rel_l2_f32(&got, &want);
            assert!(e <= 1e-5, "{}: {what}: device logits differ from the CPU's by {e:.2e} (rel L2)", c.name);
            worst = worst.max(e);
        };
        cmp("adapter a", &mut host, &mut dev, None);
        // From here the head runs over chunks of 7 rows (several per call).
        dev.with_device(|g, _| {
            g.set_head_chunk_elems(7 * vocab);
            Ok(())
        })
        .unwrap();
        cmp("adapter a, head in 7-row chunks", &mut host, &mut dev, None);
        // The loss on the device (head and cross-entropy in chunks, only the
        // sums come back), with some labels ignored.
        let mut labels = ids[..b * t].to_vec();
        labels[3] = -100;
        let (lh, ld) = (host.loss(&ids[..b * t], &labels, b, t).unwrap(), dev.loss(&ids[..b * t], &labels, b, t).unwrap());
        assert!(((ld - lh) / lh).abs() <= 1e-5, "{}: device loss {ld}, CPU {lh}", c.name);
        for m in [&mut host, &mut dev] {
            m.set_active(&[("a", 0.5), ("b", 1.5)]).unwrap();
        }
        cmp("a × 0.5 + b × 1.5", &mut host, &mut dev, None);
        for m in [&mut host, &mut dev] {
            m.merge().unwrap();
        }
        assert!(dev.device().unwrap().is_merged());
        cmp("merged a × 0.5 + b × 1.5", &mut host, &mut dev, None);
        for m in [&mut host, &mut dev] {
            m.set_active(&[("b", 1.0)]).unwrap();
        }
        cmp("merged, swapped to b", &mut host, &mut dev, None);
        // Generation through the merged weights (the decode path's dense
        // products, no adapter kernels): greedy tokens equal.
        let merged_reqs = [Request { prompt: &ids[..7], adapter: None }, Request { prompt: &ids[t..t + 3], adapter: None }];
        let want = host.generate(&merged_reqs, 8, &Sampling::default(), &[], &mut |_, _| true).unwrap();
        let got = dev.generate(&merged_reqs, 8, &Sampling::default(), &[], &mut |_, _| true).unwrap();
        assert_eq!(got, want, "{}: greedy generation of the merged model on the device differs from the CPU's", c.name);
        for m in [&mut host, &mut dev] {
            m.unmerge().unwrap();
        }
        assert!(!dev.device().unwrap().is_merged());
        cmp("unmerged b", &mut host, &mut dev, None);
        cmp("mixed batch [a, b, base]", &mut host, &mut dev, Some(&[0, 1, -1]));
        // Mixed-adapter generation: greedy tokens equal.
        let prompts: [&[i32]; 3] = [&ids[..5], &ids[t..t + 9], &ids[2..3]];
        let reqs = |ad: [i32; 3]| -> Vec<Request<'_>> { prompts.iter().zip(ad).map(|(p, a)| Request { prompt: p, adapter: Some(a) }).collect() };
        let greedy = Sampling::default();
        let want = host.generate(&reqs([1, -1, 0]), 10, &greedy, &[], &mut |_, _| true).unwrap();
        let got = dev.generate(&reqs([1, -1, 0]), 10, &greedy, &[], &mut |_, _| true).unwrap();
        assert_eq!(got, want, "{}: mixed-adapter greedy generation on the device differs from the CPU's", c.name);
        // Adapters added and removed on the host reach the device.
        for m in [&mut host, &mut dev] {
            m.add_adapter("c", AdapterSpec::new(2, 4.0)).unwrap();
            randomize_adapters(m, 13);
            m.set_active(&[("c", 1.0)]).unwrap();
        }
        cmp("adapter c added after the copy", &mut host, &mut dev, None);
        for m in [&mut host, &mut dev] {
            m.remove_adapter("b").unwrap();
        }
        cmp("b removed (c active)", &mut host, &mut dev, None);
        cmp("mixed batch [a, c] after the removal", &mut host, &mut dev, Some(&[0, 1]));
        // bf16: merging changes the logits only by bf16 rounding; unmerging
        // restores them exactly.
        dev.use_device(Some((0, Compute::BF16))).unwrap();
        let before = dev.logits(&ids[..b * t], b, t, None).unwrap();
        dev.merge().unwrap();
        let merged = dev.logits(&ids[..b * t], b, t, None).unwrap();
        dev.unmerge().unwrap();
        let after = dev.logits(&ids[..b * t], b, t, None).unwrap();
        assert_eq!(before, after, "{}: bf16 logits after merge + unmerge differ", c.name);
        let e16 = rel_l2_f32(&merged, &before);
        assert!(e16 <= 2e-2, "{}: bf16 merged logits differ from unmerged by {e16:.2e}", c.name);
        dev.use_device(None).unwrap();
        assert!(dev.device().is_none());
        // The copy's memory went back to the driver, not just to the pool
        // (checked when tests run one at a time, as gpu-check runs them:
        // the pool is the device's, shared with concurrent tests).
        let reserved = probe.pool_reserved_bytes().unwrap();
        let alone = std::env::args().any(|a| a == "--test-threads=1") || std::env::var("RUST_TEST_THREADS").is_ok_and(|v| v == "1");
        if alone {
            assert!(reserved <= reserved0, "{}: the memory pool holds {reserved} bytes after the model left the device, {reserved0} before", c.name);
        }
        eprintln!("{}: device vs CPU logits (one/two adapters, merged, swapped while merged, unmerged, mixed batches, added/removed adapters) within {worst:.2e}; mixed greedy generation equal; bf16 merged vs unmerged {e16:.2e}", c.name);
    }
}

/// Trainers and a model on a device: a trainer that put the model there
/// takes it off again; one that found it there leaves it; the copy cannot
/// be moved or an adapter removed while a trainer trains on it; host-side
/// changes to the trained adapter reach the device before the next step.
#[test]
fn trainers_share_the_models_device_copy() {
    let Some(_) = common::gpu("trainers_share_the_models_device_copy") else { return };
    let c = cases().remove(0);
    let ids = tokens(c.batch * c.seq, (c.model)().vocab(), 14);
    let mut t = trainer((c.model)(), cfg(), Some(Compute::F32));
    assert!(t.model.lock().device().is_some());
    assert_eq!(t.model.lock().use_device(None).unwrap_err().kind, ErrorKind::InvalidState);
    assert_eq!(t.model.lock().remove_adapter("a").unwrap_err().kind, ErrorKind::InvalidState);
    run(&mut t, &ids, c.batch, c.seq, 2);
    t.use_device(None).unwrap();
    assert!(t.model.lock().device().is_none(), "the trainer put the model on the device and should have taken it off");
    // The model put there by its owner stays there.
    let model = Arc::new(Mutex::new((c.model)()));
    model.lock().use_device(Some((0, Compute::F32))).unwrap();
    let mut t2 = Trainer::new(model.clone(), "a", cfg()).unwrap();
    t2.use_device(Some((0, Compute::F32))).unwrap();
    let mut cpu = trainer((c.model)(), cfg(), None);
    let want = run(&mut cpu, &ids, c.batch, c.seq, 2);
    let got = run(&mut t2, &ids, c.batch, c.seq, 2);
    check_losses("a trainer on the owner's device copy", &want, &got, 1e-4);
    // A host-side write to the trained adapter (every weight halved, on
    // both models) reaches the device before the next step; the moments
    // stay.
    for m in [&cpu.model, &model] {
        for p in m.lock().adapter_params("a").unwrap().0 {
            p.iter_mut().for_each(|x| *x *= 0.5);
        }
    }
    let want = run(&mut cpu, &ids, c.batch, c.seq, 2);
    let got = run(&mut t2, &ids, c.batch, c.seq, 2);
    check_losses("after a host write that halved the adapter", &want, &got, 1e-4);
    drop(t2);
    assert!(model.lock().device().is_some(), "the owner's device copy should stay after the trainer is dropped");
    assert!(model.lock().device().unwrap().training().is_empty());
    model.lock().use_device(None).unwrap();
    eprintln!("trainers and the model's device copy: attach/detach, refusals, shared copy within 1e-4 of the CPU");
}

/// Paged AdamW state on the device (CUDA managed memory, prefetched
/// before each update) runs the same kernel on the same values as device
/// memory: losses and weights bit for bit; the moments come back to the
/// host pager when the trainer leaves the device.
#[test]
fn paged_adamw_state_on_the_device() {
    let Some(_) = common::gpu("paged_adamw_state_on_the_device") else { return };
    use lora::backend::Device;
    use lora::memory::{Pager, PagingConfig};
    let c = cases().remove(0);
    let ids = tokens(c.batch * c.seq, (c.model)().vocab(), 15);
    let pager = Pager::new(Device::Cpu, PagingConfig { budget_bytes: 1 << 20, dir: None, allow_oversubscription: false }).unwrap();
    let mut paged = Trainer::with_pager(Arc::new(Mutex::new((c.model)())), "a", TrainerConfig { paged: true, ..cfg() }, Some(&pager)).unwrap();
    paged.use_device(Some((0, Compute::F32))).unwrap();
    let mut resident = trainer((c.model)(), cfg(), Some(Compute::F32));
    let a = run(&mut paged, &ids, c.batch, c.seq, 4);
    let b = run(&mut resident, &ids, c.batch, c.seq, 4);
    assert_eq!(a, b, "paged AdamW state on the device changed the losses");
    assert_eq!(weights(&paged), weights(&resident));
    // Back on the CPU, both continue alike (the moments came back).
    paged.use_device(None).unwrap();
    resident.use_device(None).unwrap();
    let a = run(&mut paged, &ids, c.batch, c.seq, 2);
    let b = run(&mut resident, &ids, c.batch, c.seq, 2);
    assert_eq!(a, b, "after leaving the device, the paged trainer's state differs");
    eprintln!("paged AdamW state on the device: bit-identical to device memory over 4 steps and after the hand-off");
}

/// LoRA dropout on the device draws the CPU's masks (the adapter's seed,
/// the micro-batch number, the element): 10 fp32 steps match the CPU
/// trainer's losses within the fp32 bound, with micro-batches and
/// checkpointing too (each recomputed layer and micro-batch redraws its own
/// mask), and a run moved back to the CPU continues with the CPU's numbers.
#[test]
fn dropout_matches_the_cpu() {
    let Some(_) = common::gpu("dropout_matches_the_cpu") else { return };
    // Phi-3 too: the fused projection's parts draw the one mask PEFT's
    // fused module does.
    for c in cases().into_iter().filter(|c| ["llama_nf4", "qwen2_fp32", "phi3_fp32"].contains(&c.name)) {
        let model = || {
            let mut m = (c.model)();
            let mut spec = AdapterSpec::new(8, 16.0);
            spec.dropout = 0.1;
            m.add_adapter("d", spec).unwrap();
            m
        };
        let mk = |cfg: TrainerConfig, dev: bool| {
            let mut t = Trainer::new(Arc::new(Mutex::new(model())), "d", cfg).unwrap();
            if dev {
                t.use_device(Some((0, Compute::F32))).unwrap();
            }
            t
        };
        let ids = tokens(c.batch * c.seq, model().vocab(), 16);
        let want = run(&mut mk(cfg(), false), &ids, c.batch, c.seq, 10);
        let mut g = mk(cfg(), true);
        let got = run(&mut g, &ids, c.batch, c.seq, 6);
        let e = check_losses(&format!("{} with dropout 0.1 on the GPU", c.name), &want[..6], &got, 1e-4);
        g.use_device(None).unwrap();
        let rest = run(&mut g, &ids, c.batch, c.seq, 4);
        check_losses(&format!("{} with dropout, moved back to the CPU (steps 6..)", c.name), &want[6..], &rest, 1e-4);
        // The same on the crate's LoRA kernels (dx through the mask from an
        // unscaled g·A).
        let mut gk = mk(cfg(), true);
        gk.set_lora_kernels(true).unwrap();
        let gotk = run(&mut gk, &ids, c.batch, c.seq, 6);
        check_losses(&format!("{} with dropout on the LoRA kernels", c.name), &want[..6], &gotk, 1e-4);
        let mb = TrainerConfig { micro_batch: 1, checkpointing: true, ..cfg() };
        let want_mb = run(&mut mk(mb.clone(), false), &ids, c.batch, c.seq, 4);
        let got_mb = run(&mut mk(mb, true), &ids, c.batch, c.seq, 4);
        check_losses(&format!("{} with dropout, micro-batches of 1 and checkpointing", c.name), &want_mb, &got_mb, 1e-4);
        // The lean bf16 step (bf16 adapter products, tensor-core
        // attention): the mask is drawn on the widened bf16 input; bf16
        // precision, and checkpointing redraws the same masks (bit for bit).
        let lean = |checkpointing: bool| {
            let mut t = Trainer::new(Arc::new(Mutex::new(model())), "d", TrainerConfig { checkpointing, ..cfg() }).unwrap();
            t.use_device(Some((0, Compute::BF16))).unwrap();
            t.set_tensor_core_attention(true).unwrap();
            t.with_device_model(lean_step).unwrap();
            run(&mut t, &ids, c.batch, c.seq, 6)
        };
        let (gl, glc) = (lean(false), lean(true));
        check_losses(&format!("{} with dropout, lean bf16 step", c.name), &want[..6], &gl, 2e-2);
        assert_eq!(gl, glc, "{}: checkpointing changed the lean step with dropout", c.name);
        eprintln!("{}: LoRA dropout 0.1 on the GPU within {e:.2e} of the CPU's losses; hand-off and micro-batches + checkpointing alike", c.name);
    }
}

/// The device switches through the C API (`lora_model_set_device_option`,
/// `lora_model_device_option`): starting values, round trips that reach
/// the device copy, refusals (the settings themselves are trained with in
/// the tests above).
#[test]
fn device_options_through_the_c_api() {
    use lora::ffi::context::*;
    use lora::ffi::model::*;
    use lora::ffi::*;
    let Some(_) = common::gpu("device_options_through_the_c_api") else { return };
    let dir = std::ffi::CString::new(fixture("llama_nf4").join("model").to_str().unwrap()).unwrap();
    let opts = [LORA_DEVICE_TENSOR_CORE_ATTENTION, LORA_DEVICE_BF16_ADAPTER_PRODUCTS, LORA_DEVICE_RECOMPUTE, LORA_DEVICE_FOLD_ADAPTERS];
    // SAFETY: valid pointers to locals; handles freed below.
    unsafe {
        let cp = lora_context_default_params();
        let mut ctx = std::ptr::null_mut();
        assert_eq!(lora_context_new(&cp, &mut ctx), LORA_OK);
        let mut m = std::ptr::null_mut();
        assert_eq!(lora_model_load(ctx, dir.as_ptr(), std::ptr::null(), &mut m), LORA_OK);
        let mut v = -1;
        // Not on a device: refused, *value untouched.
        assert_eq!(lora_model_set_device_option(m, LORA_DEVICE_RECOMPUTE, 0), LORA_ERR_INVALID_STATE);
        assert_eq!(lora_model_device_option(m, LORA_DEVICE_RECOMPUTE, &mut v), LORA_ERR_INVALID_STATE);
        assert_eq!(v, -1);
        assert_eq!(lora_model_use_device(m, 0, LORA_COMPUTE_BF16), LORA_OK);
        // The starting values (the environment's, as the default mode has them).
        let get = |o| {
            let mut v = -1;
            assert_eq!(lora_model_device_option(m, o, &mut v), LORA_OK);
            v
        };
        let env_is = |k: &str, val: &str| std::env::var(k).is_ok_and(|v| v == val);
        assert_eq!(get(LORA_DEVICE_TENSOR_CORE_ATTENTION), i32::from(env_is("LORA_CUDA_ATTENTION", "tc")));
        assert_eq!(get(LORA_DEVICE_BF16_ADAPTER_PRODUCTS), i32::from(env_is("LORA_CUDA_LORA", "bf16")));
        assert_eq!(get(LORA_DEVICE_RECOMPUTE), i32::from(!env_is("LORA_CUDA_RECOMPUTE", "0")));
        assert_eq!(get(LORA_DEVICE_FOLD_ADAPTERS), i32::from(!env_is("LORA_CUDA_FOLD", "0")));
        // Round trips (the getter reads the device copy's own state).
        for o in opts {
            for val in [1, 0, 1] {
                assert_eq!(lora_model_set_device_option(m, o, val), LORA_OK, "option {o} = {val}");
                assert_eq!(get(o), val, "option {o}");
            }
        }
        // Refusals: unknown option, a value other than 0 or 1, NULL out.
        assert_eq!(lora_model_set_device_option(m, 4, 1), LORA_ERR_INVALID_ARGUMENT);
        assert_eq!(lora_model_set_device_option(m, LORA_DEVICE_RECOMPUTE, 2), LORA_ERR_INVALID_ARGUMENT);
        assert_eq!(lora_model_set_device_option(m, LORA_DEVICE_RECOMPUTE, -1), LORA_ERR_INVALID_ARGUMENT);
        assert_eq!(lora_model_device_option(m, 7, &mut v), LORA_ERR_INVALID_ARGUMENT);
        assert_eq!(lora_model_device_option(m, LORA_DEVICE_RECOMPUTE, std::ptr::null_mut()), LORA_ERR_NULL_POINTER);
        assert_eq!(lora_model_set_device_option(std::ptr::null_mut(), LORA_DEVICE_RECOMPUTE, 1), LORA_ERR_NULL_POINTER);
        // F32 mode: the bf16-only switches are refused on, allowed off.
        assert_eq!(lora_model_use_device(m, 0, LORA_COMPUTE_F32), LORA_OK);
        for o in [LORA_DEVICE_TENSOR_CORE_ATTENTION, LORA_DEVICE_BF16_ADAPTER_PRODUCTS] {
            assert_eq!(get(o), 0);
            assert_eq!(lora_model_set_device_option(m, o, 1), LORA_ERR_INVALID_ARGUMENT, "option {o} on in F32 mode");
            assert_eq!(get(o), 0, "a refused switch changed");
            assert_eq!(lora_model_set_device_option(m, o, 0), LORA_OK);
        }
        assert_eq!(lora_model_use_device(m, -1, LORA_COMPUTE_F32), LORA_OK);
        assert_eq!(lora_model_device_option(m, LORA_DEVICE_RECOMPUTE, &mut v), LORA_ERR_INVALID_STATE);
        lora_model_free(m);
        lora_context_free(ctx);
    }
}

/// Folding adapters into their base products (the lean step's default:
/// q, k, v, gate and up take `[x | x·Aᵀ]·[W | s·B]ᵀ` as one product, and
/// q, k and v's input gradient is one product over `[dq | dk | dv | g…]`
/// and `[W_q; W_k; W_v; s·A…]`) against
/// the unfolded lean step and the CPU: the same sums of the same bf16
/// operands but for one rounding less of gate and up, so the losses agree
/// far inside the bf16 bound; the folded products run (profile), and the
/// switch reaches the step (other bits). On NF4 models: the llama fixture,
/// the qwen2 fixture quantized (biases on q, k and v, added after the
/// folded product; its adapter has q and v in layer 1 only), and the
/// random head_dim-128 model; adapters randomized so that B is not zero
/// from the first step. `LORA_TRAIN_CASES` selects runs by name (the
/// cases' names, and `fold_…` for the runs of this test alone).
#[test]
fn folded_adapter_products_match_the_unfolded() {
    let Some(_) = common::gpu("folded_adapter_products_match_the_unfolded") else { return };
    let steps = if common::emulated() { 2 } else { 6 };
    let qwen = || {
        let mut m = Model::load(&fixture("qwen2_fp32").join("model"), LoadOptions { quantize: Some(Nf4Params::default()), seed: 3 }, &mut |_, _| true).unwrap();
        peft::load_adapter(&mut m, &fixture("qwen2_fp32").join("adapter"), "a").unwrap();
        m
    };
    let mut all = case_list(true);
    let mut take = |name: &str| {
        let i = all.iter().position(|c| c.name == name).unwrap_or_else(|| panic!("no case {name}"));
        all.remove(i)
    };
    let (qwen3, bias, random, llama) = (take("random_qwen3_hd128_nf4"), take("llama_bias_nf4"), take("random_hd128_nf4"), take("llama_nf4"));
    // Widths the folds do not take: hidden 200 and intermediate 344 (not
    // multiples of 32: no forward fold; multiples of 8: the stacked
    // gradient), hidden 100
    // (neither: the unfolded step, bit for bit); adapters on q, v, up and
    // down only, rank 12 but 4 on v (both padded to 16 columns), alpha 24.
    let odd = |hidden: usize, heads: usize| -> Box<dyn Fn() -> Model> {
        Box::new(move || {
            let cfg = serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": 344,
                "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": heads / 2, "vocab_size": 500,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": true
            });
            let mut m = Model::random(&cfg.to_string(), 0.02, LoadOptions { quantize: Some(Nf4Params::default()), seed: 5 }).unwrap();
            let mut spec = AdapterSpec::new(12, 24.0);
            spec.targets = Targets::Names(vec!["q_proj".into(), "v_proj".into(), "up_proj".into(), "down_proj".into()]);
            spec.rank_pattern = vec![("v_proj".into(), 4)];
            m.add_adapter("a", spec).unwrap();
            m
        })
    };
    // Widths that fold, with ranks that are not the fixtures': 64 (a tail
    // wider than the rank-16 blocks), 1 on gate (padded to 8 columns), 20
    // on v (padded to 24), at alpha 48 (scale 0.75: s·B is not an exact
    // scaling of B's bf16 copy).
    let ranks = Box::new(|| {
        let cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": false
        });
        let mut m = Model::random(&cfg.to_string(), 0.02, LoadOptions { quantize: Some(Nf4Params::default()), seed: 6 }).unwrap();
        let mut spec = AdapterSpec::new(64, 48.0);
        spec.rank_pattern = vec![("gate_proj".into(), 1), ("v_proj".into(), 20)];
        m.add_adapter("a", spec).unwrap();
        m
    }) as Box<dyn Fn() -> Model>;
    // (name, model, batch, seq, forward folds expected, stacked gradients expected)
    type Run = (&'static str, Box<dyn Fn() -> Model>, usize, usize, bool, bool);
    let runs: Vec<Run> = vec![
        ("llama_nf4", llama.model, llama.batch, llama.seq, true, true),
        ("fold_qwen2 quantized (biases)", Box::new(qwen), 2, 40, true, true),
        ("random_hd128_nf4", random.model, random.batch, random.seq, true, true),
        ("fold_random r 64, 20 on v, 1 on gate", ranks, 2, 24, true, true),
        ("fold_random hidden 200", odd(200, 4), 2, 24, false, true),
        ("fold_random hidden 100", odd(100, 2), 2, 24, false, false),
        ("random_qwen3_hd128_nf4 (q/k norms)", qwen3.model, qwen3.batch, qwen3.seq, true, true),
        // Biases on all seven linears, adapters on o, up and down only.
        ("llama_bias_nf4 (every bias, quantized)", bias.model, bias.batch, bias.seq, true, true),
    ];
    for (name, model, batch, seq, want_fold, want_stack) in runs.into_iter().filter(|r| selected(r.0)) {
        let mk = || {
            let mut m = model();
            randomize_adapters(&mut m, 77);
            m
        };
        let ids = tokens(batch * seq, mk().vocab(), 21);
        let want = run(&mut trainer(mk(), cfg(), None), &ids, batch, seq, steps);
        let go = |fold: bool| {
            let mut t = trainer(mk(), cfg(), Some(Compute::BF16));
            t.with_device_model(|g| {
                lean_step(g);
                g.set_fold(fold);
                g.set_profiling(true);
            })
            .unwrap();
            let losses = run(&mut t, &ids, batch, seq, steps);
            let mut count = |what: &str| t.with_device_model(|g| g.profile().unwrap_or_default().iter().filter(|p| p.0.contains(what)).map(|p| p.2).sum::<u64>()).unwrap();
            let (folded, stacked) = (count("adapter folded"), count("stacked"));
            (losses, weights(&t), folded, stacked)
        };
        let ((lf, wf, nf, sf), (lu, wu, nu, su)) = (go(true), go(false));
        // Per step and layer: q, k, v, gate and up forward, and q, k, v
        // recomputed in the backward; q, k and v's input gradient stacked
        // (every layer but the first, whose input gradient is not made).
        assert_eq!(nf > 0, want_fold, "{name}: {nf} folded products with folding on");
        assert_eq!(nu, 0, "{name}: a folded product ran with folding off");
        assert_eq!(sf > 0, want_stack, "{name}: {sf} stacked input-gradient products with folding on");
        assert_eq!(su, 0, "{name}: a stacked input-gradient product ran with folding off");
        if !want_fold && !want_stack {
            assert_eq!(lf, lu, "{name}: nothing folds at this width, yet the bits changed");
            assert_eq!(wf, wu, "{name}: nothing folds at this width, yet the adapter changed");
            continue;
        }
        let e = check_losses(&format!("{name}: folded against unfolded lean step"), &lu, &lf, 2e-3);
        let eg = lf.iter().zip(&lu).map(|(a, b)| (a.1 - b.1).abs() / b.1.abs()).fold(0f64, f64::max);
        assert!(eg <= 1e-2, "{name}: gradient norms folded {lf:?} vs unfolded {lu:?}");
        // AdamW's first steps move each weight by about lr whatever its
        // gradient's size, so rounding-level gradient differences show in
        // the weights far more than in the losses.
        let ew = rel_l2(&wf, &wu);
        assert!(ew <= 2e-2, "{name}: adapters after {steps} steps differ by {ew:.2e} (rel L2) folded vs unfolded");
        assert_ne!(lf, lu, "{name}: folding changed no bits: set_fold did not reach the step");
        let ec = check_losses(&format!("{name}: folded lean step against the CPU"), &want, &lf, 2e-2);
        eprintln!("{name}: {nf} folded products and {sf} stacked input-gradient products over {steps} steps; losses within {e:.2e} of the unfolded lean step (gradient norms {eg:.2e}), {ec:.2e} of the CPU; adapters {ew:.2e} apart");
    }
}

/// The host never waits for the device inside a step's forward and
/// backward (a wait there empties the GPU's queue: every kernel after it
/// waits for the host to enqueue it), only at its end: the loss and the
/// gradient norm, then the adapter's copy to the host. Counted by the
/// emulated driver (every synchronization, blocking copy and free, by the
/// calling thread: other tests run beside this one), so on a GPU this test
/// has nothing to count and skips.
#[test]
fn a_step_waits_for_the_device_only_at_its_end() {
    let Some(_) = common::gpu("a_step_waits_for_the_device_only_at_its_end") else { return };
    if !common::emulated() {
        eprintln!("SKIPPED a_step_waits_for_the_device_only_at_its_end: the emulated driver counts the waits; a GPU's does not");
        return;
    }
    let waits: unsafe extern "C" fn(i32, i32) -> u64 = emu_hook(b"lora_fakecuda_sync_report");
    // SAFETY: the hook's signature.
    let waits = move |print: bool| unsafe { waits(print as i32, 1) };
    let c = cases().remove(0);
    let ids = tokens(c.batch * c.seq, (c.model)().vocab(), 5);
    // (what, compute, lean, checkpointing, micro-batch)
    let runs: [(&str, Compute, bool, bool, usize); 4] = [
        ("bf16 step", Compute::BF16, false, false, 0),
        ("lean bf16 step, micro-batches of 1", Compute::BF16, true, false, 1),
        ("lean bf16 step + checkpointing", Compute::BF16, true, true, 0),
        ("fp32 step + checkpointing, micro-batches of 2", Compute::F32, false, true, 2),
    ];
    for (what, compute, lean, ckpt, micro) in runs {
        let mut t = trainer((c.model)(), TrainerConfig { checkpointing: ckpt, micro_batch: micro, ..cfg() }, Some(compute));
        if lean {
            t.with_device_model(lean_step).unwrap();
        }
        let n_micro = if micro == 0 { 1 } else { c.batch.div_ceil(micro) };
        for step in 0..2 {
            waits(false);
            let mut inside = Vec::new();
            t.step(&ids, None, c.batch, c.seq, &mut |_, _| {
                inside.push(waits(true));
                true
            })
            .unwrap();
            let total: u64 = inside.iter().sum::<u64>() + waits(true);
            assert_eq!(inside, vec![0; n_micro], "{what}, step {step}: the host waited for the device inside the micro-batches' forward and backward");
            // Each micro-batch's loss, the gradient norm, the adapter.
            assert!(total <= n_micro as u64 + 2, "{what}, step {step}: the host waited {total} times for {n_micro} micro-batches (at most one per micro-batch's loss, the gradient norm and the adapter's copy)");
            assert!(total >= 1, "{what}, step {step}: no wait at all: the step returned figures it never read back");
            eprintln!("{what}, step {step}: {n_micro} micro-batches, {total} waits, all after the last");
        }
    }
}

/// A test hook of the emulated driver (tests/fakecuda/fake_cuda.cpp, whose
/// library stays loaded for the process); `T` must be its signature.
fn emu_hook<T: Copy>(name: &[u8]) -> T {
    let this = libloading::os::unix::Library::this();
    // SAFETY: the caller names the hook's signature.
    unsafe { *this.get::<T>(name).unwrap_or_else(|e| panic!("the emulated driver's {}: {e}", String::from_utf8_lossy(name))) }
}

/// A model that does not fit the device stays on the host. A step that
/// runs out of device memory — early in the forward, mid-way, late in the
/// backward, in a later micro-batch — fails with
/// `OutOfMemory`, says what to change, and leaves nothing behind: the
/// adapter and the step count as they were, no gradient kept, and the
/// next steps (with the memory back) give the bits an untouched trainer
/// gives. The emulated driver refuses this test thread's allocations past
/// a limit (a GPU's memory cannot be limited per test), so on a GPU this
/// test skips.
#[test]
fn running_out_of_device_memory_applies_nothing() {
    let Some(_) = common::gpu("running_out_of_device_memory_applies_nothing") else { return };
    if !common::emulated() {
        eprintln!("SKIPPED running_out_of_device_memory_applies_nothing: the emulated driver limits a test's memory; a GPU's does not");
        return;
    }
    let limit: unsafe extern "C" fn(usize) = emu_hook(b"lora_fakecuda_set_memory_limit");
    let memory: unsafe extern "C" fn(*mut usize, *mut usize, i32) = emu_hook(b"lora_fakecuda_thread_memory");
    // This thread's live device memory, and its high-water mark since the
    // last call (SAFETY: the hooks' signatures; pointers to live locals).
    let mem = || {
        let (mut live, mut high) = (0usize, 0usize);
        unsafe { memory(&mut live, &mut high, 1) };
        (live, high)
    };
    let c = cases().remove(0);
    let ids = tokens(c.batch * c.seq, (c.model)().vocab(), 9);
    // Moving the model to a device too small for it: refused, the model
    // stays on the host and trains there; with the memory back it moves.
    {
        let mut t = Trainer::new(Arc::new(Mutex::new((c.model)())), "a", cfg()).unwrap();
        let base = mem().0;
        // SAFETY: the hook's signature.
        unsafe { limit(base + 4096) };
        let e = t.use_device(Some((0, Compute::BF16)));
        // SAFETY: as above (0: no limit).
        unsafe { limit(0) };
        assert_eq!(e.expect_err("the model went to a device with 4 KiB free").kind, ErrorKind::OutOfMemory);
        assert!(t.model.lock().device().is_none(), "a refused move left a device copy");
        assert_eq!(mem().0, base, "a refused move kept device memory");
        t.step(&ids, None, c.batch, c.seq, &mut |_, _| true).expect("a CPU step after the refused move");
        t.use_device(Some((0, Compute::BF16))).expect("the move with the memory back");
        t.step(&ids, None, c.batch, c.seq, &mut |_, _| true).expect("a device step after the move");
    }
    for (what, lean, micro) in [("bf16 step", false, 0), ("lean bf16 step, micro-batches of 1", true, 1)] {
        let mk = || {
            let mut t = trainer((c.model)(), TrainerConfig { micro_batch: micro, ..cfg() }, Some(Compute::BF16));
            if lean {
                t.with_device_model(lean_step).unwrap();
            }
            t
        };
        // The first step's memory on top of what the trainer holds.
        let mut r = mk();
        let w0 = weights(&r);
        let base = mem().0;
        let mut want = run(&mut r, &ids, c.batch, c.seq, 1);
        let need = mem().1 - base;
        want.extend(run(&mut r, &ids, c.batch, c.seq, 1));
        let w2 = weights(&r);
        drop(r);
        assert!(need > 0, "{what}: the step allocated no device memory");
        for frac in [0.02, 0.3, 0.6, 0.95] {
            let mut t = mk();
            let at = base + (need as f64 * frac) as usize;
            assert_eq!(mem().0, base, "{what}: a fresh trainer holds other memory than the first");
            // SAFETY: the hook's signature.
            unsafe { limit(at) };
            let e = t.step(&ids, None, c.batch, c.seq, &mut |_, _| true);
            // SAFETY: as above (0: no limit).
            unsafe { limit(0) };
            let e = e.expect_err(&format!("{what}: the step ran within {frac} of its memory"));
            assert_eq!(e.kind, ErrorKind::OutOfMemory, "{what}, {frac} of the memory: {e}");
            for says in ["ran out of memory", "not applied", "micro-batches", "checkpointing"] {
                assert!(e.message.contains(says), "{what}, {frac} of the memory: the error does not say \"{says}\": {}", e.message);
            }
            assert_eq!(weights(&t), w0, "{what}, {frac} of the memory: the failed step changed the adapter");
            assert_eq!(t.steps_done(), 0, "{what}, {frac} of the memory: the failed step was counted");
            let got = run(&mut t, &ids, c.batch, c.seq, 2);
            assert_eq!(got, want, "{what}, {frac} of the memory: the steps after the failed one differ from an untouched trainer's");
            assert_eq!(weights(&t), w2, "{what}, {frac} of the memory: the adapter after two steps differs from an untouched trainer's");
            eprintln!("{what}: out of memory at {frac} of the step's {need} bytes: refused, nothing applied, the next steps bit for bit; {}", e.message);
        }
        // The way on: the same batch in micro-batches of one sequence with
        // checkpointing fits where the whole batch did not (the same mean:
        // the loss within summation order of the untouched trainer's).
        if micro == 0 {
            let mut t = mk();
            // SAFETY: the hook's signature.
            unsafe { limit(base + need / 2) };
            let refused = t.step(&ids, None, c.batch, c.seq, &mut |_, _| true).map(|_| ());
            t.set_batching(1, true);
            let r = t.step(&ids, None, c.batch, c.seq, &mut |_, _| true);
            // SAFETY: as above (0: no limit).
            unsafe { limit(0) };
            assert_eq!(refused.expect_err("the whole batch in half its memory").kind, ErrorKind::OutOfMemory);
            let r = r.expect("micro-batches of one with checkpointing in half the whole batch's memory");
            let e = (r.loss - want[0].0).abs() / want[0].0.abs();
            assert!(e <= 1e-4, "{what}: the micro-batched retry's loss {} vs {} ({e:.1e})", r.loss, want[0].0);
            eprintln!("{what}: refused in half its memory, then trained in micro-batches of one with checkpointing within it (loss {e:.1e} from the whole batch's)");
        }
    }
}
