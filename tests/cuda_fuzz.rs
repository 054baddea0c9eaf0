//! Random model configs on the device against the CPU: each seed draws a
//! family (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3, Granite, Phi-3,
//! OLMo 2, SmolLM3), its shapes (1 to 8 heads, grouped-query ratios,
//! head_dim 4 to 256, apart from hidden/heads where the family allows it),
//! its knobs (soft caps, windows, rope scalings, partial rotation, biases,
//! multipliers, tied heads), NF4 at load or not, and an adapter on every
//! linear layer with a random rank (ranks above a layer's min(in, out)
//! too), alpha and rsLoRA, A and B random. Then, on the device against the
//! same model on the CPU:
//! - fp32 compute: logits within 1e-5 relative L2 (summation order only)
//!   and two AdamW steps' losses within 1e-4 relative, gradient norms
//!   within 1e-3 (tests/cuda_train.rs's fp32 bounds);
//! - bf16 compute: two steps' losses within 2e-2 (bf16 operands), with the
//!   lean step and tensor-core attention where head_dim takes them.
//!
//! The fixed cases of tests/cuda_train.rs check each family in depth;
//! this looks for shapes and combinations those cases miss.
//! `LORA_FUZZ_SEEDS=N` (default 8) and `LORA_FUZZ_FIRST=S` choose the seeds.
//! Without a GPU it runs on the emulated device (tests/common/fakecuda.rs),
//! and skips where there is no C++ compiler (a failure under
//! LORA_REQUIRE_GPU=1).

#[path = "common/gpu.rs"]
#[allow(dead_code)]
mod common;

use lora::model::gpu::{Compute, LoraPath};
use lora::model::peft::AdapterSpec;
use lora::model::{LoadOptions, Model};
use lora::quant::nf4::Nf4Params;
use lora::rng::SplitMix64;
use lora::session::trainer::{Trainer, TrainerConfig};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::sync::Arc;

fn pick<T: Copy>(r: &mut SplitMix64, xs: &[T]) -> T {
    xs[(r.next_u64() % xs.len() as u64) as usize]
}

fn coin(r: &mut SplitMix64, p: f64) -> bool {
    ((r.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
}

/// One random config (transformers' config.json keys) and a description.
fn config(r: &mut SplitMix64) -> (Value, String) {
    let fam = pick(r, &["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "phi3", "olmo2", "smollm3"]);
    let arch = match fam {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "gemma" => "GemmaForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        "gemma3_text" => "Gemma3ForCausalLM",
        "granite" => "GraniteForCausalLM",
        "phi3" => "Phi3ForCausalLM",
        "olmo2" => "Olmo2ForCausalLM",
        _ => "SmolLM3ForCausalLM",
    };
    let heads = pick(r, &[1usize, 2, 3, 4, 6, 8]);
    let divisors: Vec<usize> = (1..=heads).filter(|d| heads.is_multiple_of(*d)).collect();
    let kv = pick(r, &divisors);
    let hd = pick(r, &[4usize, 8, 16, 32, 64, 128, 256]);
    let free_hd = matches!(fam, "llama" | "mistral" | "qwen3" | "gemma" | "gemma2" | "gemma3_text" | "smollm3");
    let hidden = if free_hd && coin(r, 0.5) { heads * pick(r, &[2usize, 4, 6, 8, 12, 16]) } else { heads * hd };
    let layers = pick(r, &[1usize, 2]);
    let mut c = json!({
        "architectures": [arch], "model_type": fam, "hidden_size": hidden, "intermediate_size": pick(r, &[8usize, 24, 40, 64, 100]),
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "vocab_size": pick(r, &[37usize, 64, 101, 256]), "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": pick(r, &[10000.0, 500000.0]), "tie_word_embeddings": coin(r, 0.5)
    });
    let o = c.as_object_mut().unwrap();
    if free_hd {
        o.insert("head_dim".into(), json!(hd));
    }
    if fam.starts_with("gemma") {
        o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
        o.insert("query_pre_attn_scalar".into(), json!(pick(r, &[hd, 2 * hd, 17])));
    }
    if fam == "gemma2" {
        o.insert("attn_logit_softcapping".into(), json!(pick(r, &[None, Some(0.5), Some(50.0)])));
        o.insert("final_logit_softcapping".into(), json!(pick(r, &[None, Some(0.3), Some(30.0)])));
        o.insert("sliding_window".into(), json!(pick(r, &[3usize, 8, 4096])));
    }
    if fam == "gemma3_text" {
        o.insert("sliding_window".into(), json!(pick(r, &[3usize, 8])));
        let types: Vec<&str> = (0..layers).map(|_| pick(r, &["sliding_attention", "full_attention"])).collect();
        o.insert("layer_types".into(), json!(types));
    }
    if matches!(fam, "llama" | "granite" | "smollm3" | "olmo2") {
        o.insert("attention_bias".into(), json!(coin(r, 0.3)));
    }
    if matches!(fam, "llama" | "granite") {
        o.insert("mlp_bias".into(), json!(coin(r, 0.3)));
    }
    if fam == "mistral" {
        o.insert("sliding_window".into(), json!(pick(r, &[None, Some(4usize), Some(9)])));
    }
    if fam == "granite" {
        o.insert("embedding_multiplier".into(), json!(pick(r, &[1.0, 12.0])));
        o.insert("attention_multiplier".into(), json!(pick(r, &[0.0625, 0.2])));
        o.insert("residual_multiplier".into(), json!(pick(r, &[0.22, 1.0])));
        o.insert("logits_scaling".into(), json!(pick(r, &[1.0, 4.0])));
    }
    if fam == "phi3" {
        o.insert("sliding_window".into(), json!(pick(r, &[None, Some(5usize)])));
        if hd >= 8 && coin(r, 0.3) {
            o.insert("partial_rotary_factor".into(), json!(0.5));
        }
    }
    if fam == "smollm3" {
        let nope: Vec<usize> = (0..layers).map(|_| pick(r, &[0usize, 1])).collect();
        o.insert("no_rope_layers".into(), json!(nope));
    }
    if matches!(fam, "llama" | "qwen2" | "qwen3" | "mistral") && coin(r, 0.5) {
        let rs = match pick(r, &[0, 1, 2]) {
            0 => json!({"rope_type": "linear", "factor": 2.0}),
            1 => json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
            _ => json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
        };
        o.insert("rope_scaling".into(), rs);
    }
    let desc = format!("{fam} hidden {hidden} heads {heads}/{kv} head_dim {hd} layers {layers}");
    (c, desc)
}

/// The seed's model: random weights (norm weights around their family's
/// identity, the rest of std 0.5/√hidden), NF4 at load or not, an adapter "a" with random A and B.
fn model(cfg: &Value, nf4: bool, r_adapter: usize, alpha: f32, rslora: bool, seed: u64) -> Model {
    let opts = LoadOptions { quantize: nf4.then(Nf4Params::default), seed };
    // Weights of std 0.5/√hidden: activations stay of order one through the
    // layers at every width (a fixed std makes the wide ones ill-conditioned).
    let std = 0.5 / (cfg["hidden_size"].as_f64().unwrap() as f32).sqrt();
    let mut m = Model::random(&cfg.to_string(), std, opts).unwrap();
    let mut r = SplitMix64::new(seed + 1);
    common::for_each_norm_weight(&mut m, |x| *x += 0.2 * r.normal());
    let mut spec = AdapterSpec::new(r_adapter, alpha);
    spec.use_rslora = rslora;
    m.add_adapter("a", spec).unwrap();
    // A ~ N(0, 1/in) and B ~ N(0, (0.3/(s·√r))²): each adapter adds about
    // 0.3 of its input's scale to its output (no adapter dominates).
    let s = if rslora { alpha / (r_adapter as f32).sqrt() } else { alpha / r_adapter as f32 };
    let b_std = 0.3 / (s * (r_adapter as f32).sqrt());
    for (i, t) in m.adapter_params("a").unwrap().0.into_iter().enumerate() {
        let std = if i % 2 == 0 { 1.0 / ((t.len() / r_adapter) as f32).sqrt() } else { b_std };
        t.iter_mut().for_each(|x| *x = std * r.normal());
    }
    m
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

fn steps(m: Model, dev: Option<Compute>, set: impl FnOnce(&mut Trainer), ids: &[i32], batch: usize, seq: usize) -> Vec<(f64, f64)> {
    let mut c = TrainerConfig::default();
    c.adamw.lr = 3e-3;
    let mut t = Trainer::new(Arc::new(Mutex::new(m)), "a", c).unwrap();
    if let Some(c) = dev {
        t.use_device(Some((0, c))).unwrap();
    }
    set(&mut t);
    (0..2).map(|_| t.step(ids, None, batch, seq, &mut |_, _| true).map(|r| (r.loss, r.grad_norm)).unwrap()).collect()
}

#[test]
fn random_configs_match_the_cpu() {
    if common::gpu("random_configs_match_the_cpu").is_none() {
        return;
    }
    let n: u64 = std::env::var("LORA_FUZZ_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let first: u64 = std::env::var("LORA_FUZZ_FIRST").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    for seed in first..first + n {
        let mut r = SplitMix64::new(0x5eed_f022 ^ seed);
        let (cfg, desc) = config(&mut r);
        let nf4 = coin(&mut r, 0.4);
        let (rank, alpha, rslora) = (pick(&mut r, &[1usize, 2, 4, 8, 16, 40]), pick(&mut r, &[1.0f32, 8.0, 16.0, 3.5]), coin(&mut r, 0.3));
        let (batch, seq) = (pick(&mut r, &[1usize, 2, 3]), pick(&mut r, &[3usize, 9, 17, 40, 70]));
        let vocab = cfg["vocab_size"].as_u64().unwrap();
        let ids: Vec<i32> = (0..batch * seq).map(|_| (r.next_u64() % vocab) as i32).collect();
        let what = format!("seed {seed}: {desc}{}, r {rank} alpha {alpha}{}, {batch}x{seq}", if nf4 { ", NF4" } else { "" }, if rslora { " rsLoRA" } else { "" });
        let mk = || model(&cfg, nf4, rank, alpha, rslora, seed);
        // Logits.
        let want = mk().logits(&ids, batch, seq, None).unwrap();
        let mut md = mk();
        md.use_device(Some((0, Compute::F32))).unwrap();
        let got = md.logits(&ids, batch, seq, None).unwrap();
        drop(md);
        let el = rel_l2(&got, &want);
        assert!(el <= 1e-5, "{what}: fp32 device logits differ from the CPU's by {el:.2e} (rel L2)");
        // Two AdamW steps, fp32 and bf16 compute.
        let cpu = steps(mk(), None, |_| {}, &ids, batch, seq);
        let f32s = steps(mk(), Some(Compute::F32), |_| {}, &ids, batch, seq);
        let b16 = steps(
            mk(),
            Some(Compute::BF16),
            |t| {
                t.set_tensor_core_attention(true).unwrap();
                t.with_device_model(|g| g.set_lora_path(LoraPath::BlasBf16).unwrap());
            },
            &ids,
            batch,
            seq,
        );
        if std::env::var("LORA_FUZZ_VERBOSE").is_ok() {
            eprintln!("{what}: CPU {cpu:?}\n  device fp32 {f32s:?}\n  device bf16 {b16:?}");
        }
        let (mut e32, mut eg, mut e16) = (0f64, 0f64, 0f64);
        for (i, (((lc, gc), (l32, g32)), (l16, _))) in cpu.iter().zip(&f32s).zip(&b16).enumerate() {
            let (d, dg, d16) = ((l32 - lc).abs() / lc.abs(), (g32 - gc).abs() / gc.abs().max(1e-30), (l16 - lc).abs() / lc.abs());
            assert!(d <= 1e-4, "{what}: step {i} fp32 device loss {l32} vs CPU {lc} (rel {d:.2e})");
            assert!(dg <= 1e-3, "{what}: step {i} fp32 device grad norm {g32} vs CPU {gc} (rel {dg:.2e})");
            assert!(d16 <= 2e-2, "{what}: step {i} bf16 device loss {l16} vs CPU {lc} (rel {d16:.2e})");
            (e32, eg, e16) = (e32.max(d), eg.max(dg), e16.max(d16));
        }
        eprintln!("{what}: logits {el:.1e}; 2 steps fp32 loss {e32:.1e}, grad norm {eg:.1e}; bf16 (lean, tensor cores where head_dim allows) loss {e16:.1e}");
    }
}
