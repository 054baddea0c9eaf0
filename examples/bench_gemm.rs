//! The CPU backend's fp32 products (`backend::cpu::matmul::gemm_f32`, the
//! `gemm` crate) on the shapes of a training step of the 50M-parameter
//! Llama of bench/RESULTS.md (512 tokens, hidden 768, MLP 2048, vocab
//! 8000): GFLOP/s per shape, best of 20. bench/torch_gemm.py times the same
//! shapes with PyTorch (MKL) as the baseline.
//!
//!     cargo run --release --example bench_gemm
//!     python bench/torch_gemm.py

use lora::backend::cpu::matmul::{gemm_f32, Mat};
use std::time::Instant;

/// (m, n, k, B transposed): C[m×n] = A[m×k]·op(B).
pub const SHAPES: [(usize, usize, usize, bool); 8] =
    [(512, 768, 768, true), (512, 256, 768, true), (512, 2048, 768, true), (512, 768, 2048, true), (512, 768, 768, false), (512, 768, 2048, false), (512, 8000, 768, true), (512, 768, 8000, false)];

fn main() {
    println!("threads: {}", rayon::current_num_threads());
    for &(m, n, k, tb) in &SHAPES {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let bm = if tb { Mat::t(&b, k) } else { Mat::n(&b, n) };
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            gemm_f32(&mut c, n, Mat::n(&a, k), bm, m, n, k, 1.0, false, true);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{m}x{n}x{k} B{}: {:8.1} us {:6.1} GFLOP/s", if tb { "ᵀ" } else { " " }, best * 1e6, 2.0 * (m * n * k) as f64 / best / 1e9);
    }
}
