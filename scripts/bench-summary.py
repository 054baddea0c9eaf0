#!/usr/bin/env python3
"""The training-step rows of a gpu-check log as one table, each of ours
against the PyTorch + PEFT row of the same base and checkpointing setting
(QLoRA rows against PEFT + bitsandbytes nf4, bf16 against PEFT bf16):
speed as PEFT's median step time over ours (the bar: >= 2.0) and peak
device memory as 1 - ours / PEFT's (the bar: >= 70% less).

  python3 scripts/bench-summary.py gpu-out/gpu-check.log

Standard library only (the GPU machine's python3). Ours' memory is the
memory pool's peak; PEFT's is torch.cuda.max_memory_allocated.
"""
import re
import sys

HEAD = re.compile(r"^(liblora|peft) (nf4|bf16)( \+ckpt)?(?: (BF16|F32))?(?: \[([^\]]*)\])? \|")
STEP = re.compile(r"median step ([0-9.]+) ms = ([0-9]+) tokens/s.*\| peak (?:pool|allocated) ([0-9.]+) GiB")


def rows(lines):
    """(who, base, ckpt, options, ms, tokens/s, GiB) per benchmark row."""
    head = None
    for line in lines:
        m = HEAD.match(line)
        if m:
            head = (m.group(1), m.group(2), bool(m.group(3)), (m.group(5) or "defaults") if m.group(1) == "liblora" else "")
            continue
        s = STEP.search(line)
        if s and head:
            yield head + (float(s.group(1)), int(s.group(2)), float(s.group(3)))
            head = None


def main(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        found = list(rows(f))
    peft = {(b, c): (ms, gib) for who, b, c, _, ms, _, gib in found if who == "peft"}
    print(f"{'row':<62} {'ms':>8} {'tok/s':>7} {'GiB':>6} {'speed vs PEFT':>14} {'memory vs PEFT':>15}")
    for who, base, ckpt, opts, ms, tps, gib in found:
        name = f"{who} {base}{' +ckpt' if ckpt else ''}{' ' + opts if opts else ''}"
        ref = peft.get((base, ckpt)) if who == "liblora" else None
        speed = f"{ref[0] / ms:.2f}x" if ref else ""
        mem = f"{(1 - gib / ref[1]) * 100:.0f}% less" if ref else ""
        print(f"{name:<62} {ms:>8.1f} {tps:>7} {gib:>6.2f} {speed:>14} {mem:>15}")
    if not found:
        print("no training-step rows in this log")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
