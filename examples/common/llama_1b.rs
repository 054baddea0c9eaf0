//! The benchmark model of examples/gpu_bench_train.rs and
//! examples/device_memory.rs (one definition, so the memory count and the
//! GPU timing see the same model): a LLaMA of about 1.2B parameters with
//! random weights (hidden 2048, 16 layers, 32 heads with 8 KV heads of 64,
//! intermediate 8192, vocab 128256, tied embeddings), NF4 with double
//! quantization (`nf4`) or bf16 (`bf16`), and one adapter "a" of rank
//! `rank` (alpha 2·rank) on every linear.

use lora::model::peft::AdapterSpec;
use lora::model::{LoadOptions, Model};
use lora::quant::nf4::Nf4Params;

/// The model's vocabulary.
pub const VOCAB: usize = 128256;

/// Builds the model for `mode` (`nf4` or `bf16`) with adapter "a".
/// `LORA_BENCH_HEAD_DIM` (64 by default; 128 or 256, Gemma's) keeps the
/// hidden size and regroups it into 2048/head_dim heads (a quarter of them
/// KV heads), to time the attention kernels of other head_dims on the
/// same model.
pub fn build(mode: &str, rank: usize) -> lora::Result<Model> {
    let hd: usize = std::env::var("LORA_BENCH_HEAD_DIM").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    if !matches!(hd, 64 | 128 | 256) {
        lora::bail!(InvalidArgument, "LORA_BENCH_HEAD_DIM {hd}: 64, 128 or 256");
    }
    let heads = 2048 / hd;
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": heads, "num_key_value_heads": heads / 4, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 4096, "tie_word_embeddings": true,
        "head_dim": hd
    });
    let quant = match mode {
        "nf4" => Some(Nf4Params::default()),
        "bf16" => None,
        m => lora::bail!(InvalidArgument, "mode {m}: nf4 or bf16"),
    };
    let mut m = Model::random(&cfg.to_string(), 0.02, LoadOptions { quantize: quant, seed: 1 })?;
    m.add_adapter("a", AdapterSpec::new(rank, 2.0 * rank as f32))?;
    Ok(m)
}
