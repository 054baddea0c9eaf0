"""A random Llama checkpoint for the CPU step benchmarks (examples/bench_train.rs
beside bench/peft_train.py): transformers' LlamaForCausalLM with its own
initialization, seed 0, saved in bf16 with save_pretrained.

    python bench/make_random_llama.py OUT_DIR [HIDDEN] [INTER] [LAYERS] [HEADS] [KV_HEADS] [VOCAB]

Defaults: the "random Llama 50M" of bench/RESULTS.md (768, 2048, 6, 12, 4,
8000; untied head). With ARCH=qwen3 in the environment, a Qwen3ForCausalLM
of the same sizes instead (per-head q/k norms; HEAD_DIM=... sets an explicit
head_dim, as Qwen3's 128 with q_dim != hidden). ARCH=gemma3: a
Gemma3ForCausalLM (text) of those sizes, its tied head and transformers'
Gemma 3 defaults otherwise (1 + w norms, tanh-GELU, q/k norms, every 6th
layer global, local rope 10^4, query_pre_attn_scalar 256).
"""
import os
import sys

import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    out = a[0]
    hidden, inter, layers, heads, kv, vocab = (int(x) for x in (a[1:] + ["768", "2048", "6", "12", "4", "8000"][len(a) - 1:]))
    torch.manual_seed(0)
    kw = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)
    if os.environ.get("HEAD_DIM"):
        kw["head_dim"] = int(os.environ["HEAD_DIM"])
    arch = os.environ.get("ARCH", "llama")
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                          "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
    if arch == "gemma3":
        kw["tie_word_embeddings"] = True
    model = model_cls(cfg_cls(**kw)).to(torch.bfloat16)
    model.save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
