//! Benchmark (not a test): forward + backward of one LoRA linear layer,
//! 4096→4096, r = 16, 512 rows, with an fp32 base and an NF4 (double
//! quantized) base, a single adapter and a mixed batch of 8 adapters.
//! Compare with `bench/peft_layer.py` (PyTorch + PEFT) on the same machine
//! and thread count.
//!
//!     cargo run --release --example bench_lora_layer [threads]

use lora::dtype::Elems;
use lora::lora::{AdapterConfig, Init, LoraLayer};
use lora::quant::nf4::{Nf4Params, Nf4Tensor};
use lora::rng::SplitMix64;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let (d, r, n) = (4096usize, 16usize, 512usize);
    let mut rng = SplitMix64::new(1);
    let w: Vec<f32> = (0..d * d).map(|_| rng.normal() * 0.02).collect();
    let x: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
    let dy: Vec<f32> = (0..n * d).map(|_| rng.normal() * 0.01).collect();
    println!("LoRA layer {d}->{d}, r={r}, {n} rows, {threads} threads; median of 5 (after 1 warm-up)");
    println!("{:<28} {:>10} {:>10} {:>10}", "case", "fwd ms", "bwd ms", "fwd+bwd ms");
    for nf4 in [false, true] {
        for mixed in [false, true] {
            let mut layer = pool.install(|| {
                if nf4 {
                    let t = Nf4Tensor::quantize(Elems::F32(&w), &[d, d], Nf4Params::default()).unwrap();
                    LoraLayer::new_nf4(t, None, 1).unwrap()
                } else {
                    LoraLayer::new_dense(Elems::F32(&w), d, d, false, None, 1).unwrap()
                }
            });
            let n_ad = if mixed { 8 } else { 1 };
            for k in 0..n_ad {
                let a: Vec<f32> = (0..r * d).map(|_| rng.normal() * 0.01).collect();
                let b: Vec<f32> = (0..d * r).map(|_| rng.normal() * 0.01).collect();
                layer.add_adapter(&format!("a{k}"), AdapterConfig { r, alpha: 32.0, dropout: 0.0, use_rslora: false, init: Init::Given { a, b } }).unwrap();
            }
            let rows: Vec<i32> = (0..n as i32).map(|i| i % 8).collect();
            let ra = if mixed { Some(rows.as_slice()) } else { None };
            let mut y = vec![0f32; n * d];
            let mut dx = vec![0f32; n * d];
            let (mut tf, mut tb) = (Vec::new(), Vec::new());
            for it in 0..6 {
                let t0 = Instant::now();
                pool.install(|| layer.forward(&x, n, &mut y, ra, true)).unwrap();
                let t1 = Instant::now();
                pool.install(|| layer.backward(&x, &dy, n, Some(&mut dx))).unwrap();
                let t2 = Instant::now();
                layer.zero_grad();
                if it > 0 {
                    tf.push((t1 - t0).as_secs_f64() * 1e3);
                    tb.push((t2 - t1).as_secs_f64() * 1e3);
                }
            }
            let (f, b) = (median(tf), median(tb));
            let name = format!("{} base, {}", if nf4 { "NF4+DQ" } else { "fp32" }, if mixed { "mixed batch of 8" } else { "1 adapter" });
            println!("{name:<28} {f:>10.1} {b:>10.1} {:>10.1}", f + b);
        }
    }
}
