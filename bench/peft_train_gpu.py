"""GPU baseline for liblora's training-step benchmark: one LoRA / QLoRA
training step (forward, backward, clip 1.0, AdamW) with PyTorch +
transformers + PEFT on one GPU, on a LLaMA config of about 1B parameters
with random weights (Llama 3.2 1B's shape: hidden 2048, 16 layers, 32
heads / 8 KV heads, MLP 8192, vocab 128256, tied embeddings), LoRA on all
linear layers, bf16 compute.

    python bench/peft_train_gpu.py [bf16|nf4] [BATCH] [SEQ] [STEPS] [RANK] [ckpt]

bf16: the base in bf16 (frozen), adapters fp32 masters under bf16 autocast
(PEFT's default for a bf16 model keeps adapters in fp32 and casts inputs).
nf4: the base as bitsandbytes NF4 + double quantization, compute bf16
(QLoRA); needs bitsandbytes importable. "ckpt" turns on gradient
checkpointing (as qlora.py does). Attention is PyTorch's SDPA (flash).

Prints one line per configuration: median step ms, tokens/s, peak device
memory (torch.cuda.max_memory_allocated, and reserved), after 2 warm-ups;
then the time to generate 64 greedy tokens after a 128-token prompt with
the trained adapter (transformers' generate, KV cache).
"""
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def llama_1b(**over):
    c = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rms_norm_eps=1e-5,
             rope_theta=500000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    c.update(over)
    return LlamaConfig(**c)


def build(mode, rank, ckpt):
    cfg = llama_1b()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if mode == "nf4":
        import bitsandbytes as bnb  # noqa: F401
        from transformers import BitsAndBytesConfig
        from transformers.integrations import replace_with_bnb_linear  # noqa: F401
        # Quantize through transformers' own path: save and reload with a
        # BitsAndBytesConfig would need disk; instead swap each Linear for
        # bnb's Linear4bit holding the same weights.
        for name, mod in list(m.named_modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear) and cname != "lm_head":
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                          device="cpu")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                    q = q.cuda()
                    setattr(mod, cname, q)
        torch.cuda.empty_cache()
    for p in m.parameters():
        p.requires_grad_(False)
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    m = get_peft_model(m, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0,
                                     task_type="CAUSAL_LM"))
    for n, p in m.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return m


def main():
    a = sys.argv[1:]
    mode = a[0] if a else "bf16"
    batch = int(a[1]) if len(a) > 1 else 4
    seq = int(a[2]) if len(a) > 2 else 1024
    steps = int(a[3]) if len(a) > 3 else 5
    rank = int(a[4]) if len(a) > 4 else 16
    ckpt = len(a) > 5 and a[5] == "ckpt"
    t = time.time()
    m = build(mode, rank, ckpt)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    nparams = sum(p.numel() for p in m.parameters())
    build_s = time.time() - t
    ids = torch.randint(0, 128256, (batch, seq), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30
    res = torch.cuda.max_memory_reserved() / 2**30
    print(f"peft {mode}{' +ckpt' if ckpt else ''} | {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"{nparams / 1e9:.3f}B params (stored) | build {build_s:.1f} s")
    print(f"  batch {batch} x seq {seq}, r {rank}: median step {med * 1e3:.1f} ms = {batch * seq / med:.0f} tokens/s "
          f"(min {min(times) * 1e3:.1f}) | peak allocated {peak:.2f} GiB, reserved {res:.2f} GiB | "
          f"losses {losses[0]:.4f} .. {losses[-1]:.4f}")
    try:
        generate(m, ids, ckpt)
    except Exception as e:  # the training figures above stand on their own
        print(f"  generate: failed: {type(e).__name__}: {e}")


def generate(m, ids, ckpt):
    # Generation with the trained adapter: one sequence, a 128-token prompt,
    # 64 greedy tokens (KV cache; prefill included), as gpu_bench_train.
    m.eval()
    if ckpt:
        m.gradient_checkpointing_disable()
    m.config.use_cache = True
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        prompt = ids[:1, :128]
        m.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = m.generate(input_ids=prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64)
        torch.cuda.synchronize()
        gen_s = time.perf_counter() - t
    new = out.shape[1] - prompt.shape[1]
    print(f"  generate: 1 x {prompt.shape[1]} prompt + {new} new tokens in {gen_s * 1e3:.1f} ms = {new / gen_s:.1f} tokens/s (prefill included)")


if __name__ == "__main__":
    main()
