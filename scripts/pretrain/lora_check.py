#!/usr/bin/env python3
"""Reference LoRA run for the README demo: does a short LoRA fine-tune of
models/default on data/finetune.txt visibly shift the style?

Measures next-byte loss (nats/byte) on the sonnets (train part and a held-out
tail) and on the pretraining held-out tail, before and after a short LoRA run
with peft, and prints greedy and sampled generations before and after.

    python scripts/pretrain/lora_check.py --steps 200 --batch 8 --seq 128 --lr 3e-3 --rank 8

Needs torch, transformers, peft. CPU, one thread, seeded.
"""
import argparse
import json
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_bytes(path):
    return torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8).long()


@torch.no_grad()
def evaluate(model, data, seq, batch=16):
    model.eval()
    n = (len(data) - 1) // seq
    tot, cnt = 0.0, 0
    for s in range(0, n, batch):
        idx = range(s, min(n, s + batch))
        x = torch.stack([data[i * seq: i * seq + seq] for i in idx])
        y = torch.stack([data[i * seq + 1: i * seq + seq + 1] for i in idx])
        logits = model(input_ids=x).logits
        tot += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum").item()
        cnt += y.numel()
    return tot / cnt


@torch.no_grad()
def generate(model, prompt, n=200, temperature=0.0, seed=0):
    model.eval()
    ids = torch.tensor([list(prompt.encode("utf-8"))])
    kw = dict(max_new_tokens=n, pad_token_id=0)
    if temperature > 0:
        torch.manual_seed(seed)
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)
    out = model.generate(ids, **kw)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


def show(title, model, prompts, n):
    print("=" * 20, title)
    for p in prompts:
        for t in (0.0, 0.8):
            print("--- prompt %r, %s:" % (p, "greedy" if t == 0 else "T=%.1f seed 0" % t))
            print(generate(model, p, n, t))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "default"))
    ap.add_argument("--finetune", default=os.path.join(ROOT, "data", "finetune.txt"))
    ap.add_argument("--pretrain", default=os.path.join(ROOT, "data", "pretrain.txt"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen", type=int, default=200)
    ap.add_argument("--no-gen", action="store_true")
    ap.add_argument("--json", help="write the measured numbers here")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    ft = load_bytes(args.finetune)
    n_val = int(len(ft) * args.holdout)
    ft_train, ft_val = ft[: len(ft) - n_val], ft[len(ft) - n_val:]
    pt = load_bytes(args.pretrain)
    pt_val = pt[len(pt) - int(len(pt) * 0.05):]

    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    prompts = ["It is a truth", "When I do count the clock", "My love"]

    def losses(m):
        return {"sonnets_train": evaluate(m, ft_train, args.seq),
                "sonnets_heldout": evaluate(m, ft_val, args.seq),
                "pretrain_heldout": evaluate(m, pt_val, args.seq)}

    before = losses(model)
    print("before:", json.dumps({k: round(v, 4) for k, v in before.items()}))
    if not args.no_gen:
        show("base model", model, prompts, args.gen)

    torch.manual_seed(args.seed)  # LoRA init does not depend on whether samples were drawn
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                     target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    ntrain = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        ix = torch.randint(0, len(ft_train) - args.seq - 1, (args.batch,), generator=gen).tolist()
        x = torch.stack([ft_train[i: i + args.seq] for i in ix])
        y = torch.stack([ft_train[i + 1: i + args.seq + 1] for i in ix])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 10 == 0 or step == 0:
            print("lora step %d loss %.4f" % (step + 1, loss.item()), flush=True)
    secs = time.time() - t0
    after = losses(model)
    print("after:", json.dumps({k: round(v, 4) for k, v in after.items()}))
    print("LoRA r=%d alpha=%g, %d trainable params, %d steps x %d x %d, lr %g: %.1f s"
          % (args.rank, args.alpha, ntrain, args.steps, args.batch, args.seq, args.lr, secs))
    if not args.no_gen:
        show("after LoRA", model, prompts, args.gen)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "trainable": ntrain, "seconds": secs,
                       "before": before, "after": after}, f, indent=2)


if __name__ == "__main__":
    main()
