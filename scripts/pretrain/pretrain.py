#!/usr/bin/env python3
"""Pretrain liblora's embedded default model: a tiny byte-level LLaMA.

Trains a LlamaForCausalLM from scratch on data/pretrain.txt (token id == byte
value, vocab 256), on CPU with one thread, seeded and deterministic; then
saves it in bfloat16 with a byte-identity tokenizer into models/default/.

    python scripts/pretrain/pretrain.py --steps 2400          # train + save
    python scripts/pretrain/pretrain.py --steps 2400 --resume # continue after a crash
    python scripts/pretrain/pretrain.py --bench 5             # time a few steps
    python scripts/pretrain/pretrain.py --export-only         # re-export from the last checkpoint

Needs torch, transformers (>= 4.5x, tested with 5.x), safetensors, tokenizers.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

MODEL_CONFIG = dict(
    vocab_size=256,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
    hidden_act="silu",
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def log(msg, fh=None):
    line = "[%s] %s" % (time.strftime("%H:%M:%S"), msg)
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


def make_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(**MODEL_CONFIG)
    # transformers >= 5 keeps rope_theta inside rope_parameters; make sure it took.
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
    assert theta == 10000.0, (rp, theta)
    return cfg


def load_bytes(path, holdout):
    data = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8).long()
    n_val = int(len(data) * holdout)
    return data[: len(data) - n_val], data[len(data) - n_val:]


def get_batch(data, batch, seq, gen):
    ix = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[i: i + seq] for i in ix.tolist()])
    y = torch.stack([data[i + 1: i + seq + 1] for i in ix.tolist()])
    return x, y


@torch.no_grad()
def evaluate(model, data, seq, batch=16):
    """Mean next-byte loss (nats/byte) over non-overlapping windows covering `data`."""
    model.eval()
    n = (len(data) - 1) // seq
    tot, cnt = 0.0, 0
    for s in range(0, n, batch):
        idx = range(s, min(n, s + batch))
        x = torch.stack([data[i * seq: i * seq + seq] for i in idx])
        y = torch.stack([data[i * seq + 1: i * seq + seq + 1] for i in idx])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum")
        tot += loss.item()
        cnt += y.numel()
    model.train()
    return tot / cnt


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def build_optimizer(model, args):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in n else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def write_tokenizer(out_dir):
    """Byte-identity tokenizer: token id == byte value for all 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    b2u = ByteLevel.alphabet()  # the 256 printable stand-ins GPT-2 uses for bytes
    # Recompute GPT-2's bytes_to_unicode so that id == byte value.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_to_char = {b: chr(c) for b, c in zip(bs, cs)}
    assert set(byte_to_char.values()) == set(b2u)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                 use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # The Python binding ignores the decoder's (functionally irrelevant) options;
    # write them out consistently with the pre-tokenizer for other readers.
    spec = json.loads(tok.to_str())
    spec["decoder"].update(add_prefix_space=False, trim_offsets=False, use_regex=False)
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(spec, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": MODEL_CONFIG["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        }, f, indent=2)
        f.write("\n")


def check_tokenizer(out_dir):
    from tokenizers import Tokenizer

    s = "Hello, world!\n\u00e9"
    want = list(s.encode("utf-8"))
    assert want == [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 195, 169]
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    enc = tok.encode(s, add_special_tokens=False).ids
    assert enc == want, (enc, want)
    assert tok.decode(enc) == s
    s2 = "  leading spaces,\ttabs\r\n\u20ac\U0001F600 \x00\x7f end "
    assert tok.encode(s2, add_special_tokens=False).ids == list(s2.encode("utf-8"))
    assert tok.decode(list(s2.encode("utf-8"))) == s2
    allb = list(range(256))
    assert [tok.token_to_id(tok.id_to_token(i)) for i in allb] == allb
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
        names = []
        for at in (AutoTokenizer.from_pretrained(out_dir),
                   PreTrainedTokenizerFast(tokenizer_file=os.path.join(out_dir, "tokenizer.json"))):
            for t in (s, s2):
                assert at(t, add_special_tokens=False)["input_ids"] == list(t.encode("utf-8"))
                assert at.decode(list(t.encode("utf-8"))) == t
            names.append(type(at).__name__)
        ok_hf = "transformers AutoTokenizer/PreTrainedTokenizerFast OK (%s)" % ", ".join(names)
    except ImportError:
        ok_hf = "transformers not available"
    return "tokenizer round-trip OK (tokenizers); " + ok_hf


def save_checkpoint(path, model, opt, gen, step, meta):
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "gen": gen.get_state(), "step": step, "meta": meta}, tmp)
    os.replace(tmp, path)


def export(model, out_dir, meta):
    from safetensors.torch import load_file

    os.makedirs(out_dir, exist_ok=True)
    m = model.to(torch.bfloat16)
    m.config.dtype = "bfloat16"
    m.save_pretrained(out_dir, safe_serialization=True)
    m.to(torch.float32)
    sd = load_file(os.path.join(out_dir, "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    write_tokenizer(out_dir)
    finalize(out_dir, meta)


def finalize(out_dir, meta):
    """Add a top-level rope_theta to config.json (transformers >= 5 writes it
    only inside rope_parameters; older readers look for it at the top level)
    and write training_log.json with repository-relative paths."""
    path = os.path.join(out_dir, "config.json")
    cfg = json.load(open(path))
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", MODEL_CONFIG["rope_theta"])
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    meta = json.loads(json.dumps(meta))
    for k, v in meta.get("args", {}).items():
        if isinstance(v, str) and os.path.isabs(v):
            meta["args"][k] = os.path.relpath(v, ROOT)
    with open(os.path.join(out_dir, "training_log.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "pretrain.txt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "default"))
    ap.add_argument("--ckpt", default=os.path.join(ROOT, "build", "pretrain", "ckpt.pt"))
    ap.add_argument("--log", default=os.path.join(ROOT, "build", "pretrain", "train.log"))
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--holdout", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--bench", type=int, default=0, help="time N steps and exit")
    ap.add_argument("--export-only", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    from transformers import LlamaForCausalLM

    os.makedirs(os.path.dirname(args.ckpt), exist_ok=True)
    fh = open(args.log, "a") if not args.bench else None

    train, val = load_bytes(args.data, args.holdout)
    cfg = make_config()
    model = LlamaForCausalLM(cfg)  # fp32 weights, seeded init
    model.train()
    nparams = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    step, t_prev = 0, 0.0
    meta = {"args": vars(args), "params": nparams, "train_bytes": len(train),
            "heldout_bytes": len(val), "history": []}

    if (args.resume or args.export_only) and os.path.exists(args.ckpt):
        ck = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step = ck["step"]
        t_prev = ck["meta"].get("train_seconds", 0.0)
        meta["history"] = ck["meta"].get("history", [])
        log("resumed from %s at step %d" % (args.ckpt, step), fh)

    if args.export_only:
        export(model, args.out, ck["meta"])
        log(check_tokenizer(args.out), fh)
        return

    log("params %d; train %d bytes, held-out %d bytes; %d steps x %d x %d"
        % (nparams, len(train), len(val), args.steps, args.batch, args.seq), fh)
    total = args.bench or args.steps
    t0 = time.time()
    ema = None
    while step < total:
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(train, args.batch, args.seq, gen)
        out = model(input_ids=x, labels=None)
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.size(-1)).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        elapsed = t_prev + time.time() - t0
        if args.bench:
            log("bench step %d loss %.4f  %.3f s/step" % (step, loss.item(), (time.time() - t0) / step))
            continue
        if step % args.log_every == 0 or step == 1:
            log("step %d/%d loss %.4f ema %.4f lr %.2e gnorm %.2f  %.1f min elapsed, %.2f s/step"
                % (step, args.steps, loss.item(), ema, lr, gn.item(), elapsed / 60,
                   elapsed / max(1, step)), fh)
        if step % args.eval_every == 0 or step == args.steps:
            vl = evaluate(model, val, args.seq)
            meta["history"].append({"step": step, "train_ema": ema, "heldout": vl,
                                    "minutes": elapsed / 60})
            log("eval step %d held-out loss %.4f nats/byte (%.3f bits/byte)"
                % (step, vl, vl / math.log(2)), fh)
        if step % args.ckpt_every == 0 or step == args.steps:
            meta["train_seconds"] = elapsed
            save_checkpoint(args.ckpt, model, opt, gen, step, meta)
    if args.bench:
        return

    meta["train_seconds"] = t_prev + time.time() - t0
    meta["final_train_loss_ema"] = ema
    meta["final_train_loss"] = evaluate(model, train[: len(val) * 4], args.seq)
    meta["final_heldout_loss"] = evaluate(model, val, args.seq)
    meta["steps"] = step
    log("final: train %.4f, held-out %.4f nats/byte (fp32), %.1f min"
        % (meta["final_train_loss"], meta["final_heldout_loss"], meta["train_seconds"] / 60), fh)
    save_checkpoint(args.ckpt, model, opt, gen, step, meta)
    export(model, args.out, meta)
    # held-out loss of the bf16 weights as saved
    from transformers import LlamaForCausalLM as L
    m2 = L.from_pretrained(args.out, dtype=torch.float32)
    meta["final_heldout_loss_bf16"] = evaluate(m2, val, args.seq)
    finalize(args.out, meta)
    log("held-out loss of saved bf16 weights: %.4f nats/byte" % meta["final_heldout_loss_bf16"], fh)
    log(check_tokenizer(args.out), fh)


if __name__ == "__main__":
    main()
