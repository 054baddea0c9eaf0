#!/usr/bin/env python3
"""bitsandbytes' CPU NF4 quantize / dequantize throughput, for comparison
with `cargo run --release --example bench_nf4` (same matrices' shapes and
distribution, same thread count, same way of counting bytes).

    /root/pyref/bin/python bench/bnb_nf4.py [--threads 2] [--reps 5]

Counts, as bench_nf4 does: copy = read + write bytes of a bf16 tensor copy
(torch `copy_`, 512 MiB); quantize bf16 → NF4 = 2.5 B per element (2 read,
0.5 written); dequantize NF4 → bf16 = 2.5 B per element (0.5 read, 2
written); block scales left out.
"""
import argparse
import statistics
import time

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F


def median_secs(reps, f):
    f()  # warm-up
    t = []
    for _ in range(reps):
        s = time.perf_counter()
        f()
        t.append(time.perf_counter() - s)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    n_copy = 256 << 20  # bf16 elements: 512 MiB
    src = torch.randn(n_copy, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = median_secs(a.reps, lambda: dst.copy_(src))
    copy_bw = 2 * 2 * n_copy / t
    del src, dst
    print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {a.reps} runs")
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write, torch copy_ of 512 MiB bf16)")

    for rows, cols in [(4096, 4096), (4096, 11008)]:
        n = rows * cols
        w = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
        print(f"\n{rows}×{cols} bf16 ({n / 1e6:.1f} M elements), blocksize 64")
        print(f"  {'operation':<36} {'median ms':>9} {'G elem/s':>10} {'GB/s':>8} {'÷ copy':>8}")
        results = []
        for dq in (True, False):
            name = "quantize bf16→NF4" + ("+DQ" if dq else " (no DQ)")
            t = median_secs(a.reps, lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4"))
            results.append((name, t))
        for dq in (True, False):
            q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            out = F.dequantize_4bit(q, quant_state=st)
            assert out.dtype == torch.bfloat16 and out.shape == w.shape
            name = "dequantize NF4" + ("+DQ" if dq else " (no DQ)") + "→bf16"
            t = median_secs(a.reps, lambda: F.dequantize_4bit(q, quant_state=st))
            results.append((name, t))
        for name, t in results:
            eps = n / t
            print(f"  {name:<36} {t * 1e3:>9.2f} {eps / 1e9:>10.3f} {eps * 2.5 / 1e9:>8.2f} {eps * 2.5 / copy_bw:>8.3f}")


if __name__ == "__main__":
    main()
