"""PyTorch + PEFT baseline for examples/bench_lora_layer.rs: forward +
backward of one LoRA linear layer 4096->4096, r=16 (alpha 32), 512 rows,
fp32 base (nn.Linear) and NF4+double-quant base (bitsandbytes Linear4bit,
fp32 compute), one adapter and a mixed batch of 8 adapters (PEFT's
`adapter_names=` forward). Median of 5 after a warm-up.

    python bench/peft_layer.py [threads]      (needs torch, peft, bitsandbytes)
"""
import sys
import time

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(threads)
torch.manual_seed(0)
D, R, N = 4096, 16, 512


class M(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.proj = base

    def forward(self, x, **kw):
        return self.proj(x, **kw)


def make(nf4):
    if nf4:
        import bitsandbytes as bnb
        lin = nn.Linear(D, D, bias=False)
        q = bnb.nn.Linear4bit(D, D, bias=False, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4")
        q = q.to("cpu")
        m = M(q)
        m.is_loaded_in_4bit = True
    else:
        m = M(nn.Linear(D, D, bias=False))
    return m


def run(nf4, mixed):
    m = make(nf4)
    pm = get_peft_model(m, LoraConfig(r=R, lora_alpha=32, target_modules=["proj"], lora_dropout=0.0))
    names = ["default"]
    if mixed:
        for k in range(1, 8):
            pm.add_adapter(f"a{k}", LoraConfig(r=R, lora_alpha=32, target_modules=["proj"], lora_dropout=0.0))
        names = ["default"] + [f"a{k}" for k in range(1, 8)]
    for mod in pm.modules():
        if hasattr(mod, "lora_B"):
            for k in mod.lora_B:
                nn.init.normal_(mod.lora_B[k].weight, std=0.01)
                mod.lora_B[k].weight.requires_grad_(True)
                mod.lora_A[k].weight.requires_grad_(True)
    # PEFT refuses adapter_names= in training mode; dropout is 0, so eval()
    # changes nothing else (x requires grad, so bnb keeps its fp32 path).
    pm.train(not mixed)
    x = torch.randn(N, D, requires_grad=True)
    dy = torch.randn(N, D) * 0.01
    kw = {"adapter_names": [names[i % 8] for i in range(N)]} if mixed else {}
    tf, tb = [], []
    for it in range(6):
        t0 = time.perf_counter()
        y = pm(x, **kw)
        t1 = time.perf_counter()
        y.backward(dy)
        t2 = time.perf_counter()
        pm.zero_grad(set_to_none=True)
        x.grad = None
        if it:
            tf.append((t1 - t0) * 1e3)
            tb.append((t2 - t1) * 1e3)
    tf.sort(), tb.sort()
    return tf[len(tf) // 2], tb[len(tb) // 2]


print(f"PyTorch {torch.__version__} + PEFT, LoRA layer {D}->{D}, r={R}, {N} rows, {threads} threads")
print(f"{'case':<28} {'fwd ms':>10} {'bwd ms':>10} {'fwd+bwd ms':>10}")
for nf4 in (False, True):
    for mixed in (False, True):
        try:
            f, b = run(nf4, mixed)
            name = f"{'NF4+DQ' if nf4 else 'fp32'} base, {'mixed batch of 8' if mixed else '1 adapter'}"
            print(f"{name:<28} {f:>10.1f} {b:>10.1f} {f + b:>10.1f}", flush=True)
        except Exception as e:  # report, keep going
            print(f"{nf4=} {mixed=}: {type(e).__name__}: {e}", flush=True)
