"""Baseline for examples/bench_train.rs: one LoRA training step (forward,
backward, clip, AdamW) with PyTorch + transformers + PEFT on the CPU, on
the same model directory, batch and rank, LoRA on all linear layers;
the base in fp32, or NF4 + double quantization through bitsandbytes
(QLoRA, compute dtype fp32).

    python bench/peft_train.py MODEL_DIR [nf4|fp32] [BATCH] [SEQ] [STEPS] [RANK] [THREADS]

Prints the median step time and tokens/s (a warm-up step first).
"""
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def main():
    a = sys.argv[1:]
    d = a[0] if a else "models/default"
    quant = (a[1] if len(a) > 1 else "nf4") == "nf4"
    batch = int(a[2]) if len(a) > 2 else 8
    seq = int(a[3]) if len(a) > 3 else 128
    steps = int(a[4]) if len(a) > 4 else 10
    rank = int(a[5]) if len(a) > 5 else 16
    threads = int(a[6]) if len(a) > 6 else 2
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if quant:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        kw["device_map"] = "cpu"
    t = time.time()
    m = AutoModelForCausalLM.from_pretrained(d, **kw)
    load_s = time.time() - t
    m = get_peft_model(m, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    vocab = m.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(f"{d} | {'NF4+DQ (bitsandbytes)' if quant else 'fp32'} base | load {load_s:.2f} s | torch {torch.__version__} | {threads} threads")
    print(f"batch {batch} x seq {seq}, rank {rank}: median step {med * 1e3:.1f} ms = {batch * seq / med:.0f} tokens/s (min {min(times) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
