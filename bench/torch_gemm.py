"""Baseline for examples/bench_gemm.rs: the same fp32 products with PyTorch
on the CPU (MKL), 2 threads, best of 20.

    python bench/torch_gemm.py [THREADS]
"""
import sys
import time

import torch

SHAPES = [(512, 768, 768, True), (512, 256, 768, True), (512, 2048, 768, True), (512, 768, 2048, True),
          (512, 768, 768, False), (512, 768, 2048, False), (512, 8000, 768, True), (512, 768, 8000, False)]


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    for m, n, k, tb in SHAPES:
        a = torch.rand(m, k)
        b = torch.rand(n, k) if tb else torch.rand(k, n)
        best = float("inf")
        for _ in range(20):
            t = time.perf_counter()
            _ = a @ b.t() if tb else a @ b
            best = min(best, time.perf_counter() - t)
        print(f"{m}x{n}x{k} B{'ᵀ' if tb else ' '}: {best * 1e6:8.1f} us {2 * m * n * k / best / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
