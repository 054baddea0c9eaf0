//! NF4 quantize / dequantize throughput on the CPU, against the machine's
//! copy bandwidth measured in the same run.
//!
//!     cargo run --release --example bench_nf4 [-- --threads 2 --reps 9 --quick]
//!
//! Everything runs inside one rayon pool of `--threads` threads (default 2,
//! the cores of the reference machine), as a `Context` would run it.
//!
//! What is counted as "bytes moved" (logical traffic, one read of each input
//! byte and one write of each output byte; write-allocate reads not counted):
//! - copy: read + write, 2 × the buffer size;
//! - quantize bf16 → NF4: 2 B read + 0.5 B written per element (the block
//!   scales, 4 B per 64 elements and less with double quantization, are left
//!   out: under 3 %);
//! - dequantize NF4 → bf16: 0.5 B read + 2 B written = 2.5 B per element;
//!   NF4 → f32: 0.5 + 4 = 4.5 B per element (scales again left out).
//!
//! The bitsandbytes figure the quantize speedup is quoted against is
//! REFERENCES.md's (0.04 G elem/s, 2 threads, same kind of machine), not
//! measured by this program; `bench/bnb_nf4.py` measures it.

use half::bf16;
use lora::backend::cpu::nf4::{self as kernels, Isa};
use lora::dtype::{Elems, ElemsMut};
use lora::quant::nf4::{Absmax, Nf4Params, Nf4Tensor};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

/// bitsandbytes 0.50 CPU quantize bf16 → NF4+DQ with 2 threads, G elem/s
/// (REFERENCES.md, "Reference measurements": 0.037–0.046; midpoint).
const BNB_QUANT_GELEMS: f64 = 0.04;
/// bitsandbytes 0.50 CPU dequantize NF4+DQ → bf16, 2 threads, G elem/s
/// (REFERENCES.md: 1.26–1.42).
const BNB_DEQUANT_GELEMS: f64 = 1.3;

struct Args {
    threads: usize,
    reps: usize,
    quick: bool,
}

fn args() -> Args {
    let mut a = Args { threads: 2, reps: 9, quick: false };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        match v[i].as_str() {
            "--threads" => {
                a.threads = v[i + 1].parse().expect("--threads N");
                i += 1;
            }
            "--reps" => {
                a.reps = v[i + 1].parse().expect("--reps N");
                i += 1;
            }
            "--quick" => a.quick = true,
            other => panic!("unknown argument {other}; use --threads N, --reps N, --quick"),
        }
        i += 1;
    }
    a
}

/// Median wall time in seconds of `reps` runs of `f` (after one warm-up).
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

/// SplitMix64: a small, good-enough generator for benchmark data.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Gaussian weights N(0, 0.02²) in bf16, like a transformer's linear
/// layers; generated in parallel, deterministic per chunk.
fn random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut v = vec![bf16::ZERO; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
        let mut s = seed ^ (c as u64).wrapping_mul(0xA076_1D64_78BD_642F);
        for pair in ch.chunks_mut(2) {
            // Box–Muller.
            let u1 = ((splitmix(&mut s) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (splitmix(&mut s) >> 11) as f64 / (1u64 << 53) as f64;
            let r = (-2.0 * u1.ln()).sqrt() * 0.02;
            let th = 2.0 * std::f64::consts::PI * u2;
            pair[0] = bf16::from_f64(r * th.cos());
            if pair.len() > 1 {
                pair[1] = bf16::from_f64(r * th.sin());
            }
        }
    });
    v
}

/// Multithreaded memcpy of a `bytes`-sized buffer, one contiguous slice per
/// thread; returns (read + write) bytes per second.
fn copy_bandwidth(bytes: usize, threads: usize, reps: usize) -> f64 {
    let src: Vec<u8> = (0..bytes).into_par_iter().map(|i| i as u8).collect();
    let mut dst = vec![1u8; bytes];
    let per = bytes.div_ceil(threads);
    let t = median_secs(reps, || {
        dst.par_chunks_mut(per).zip(src.par_chunks(per)).for_each(|(d, s)| d.copy_from_slice(s));
        black_box(&mut dst);
    });
    2.0 * bytes as f64 / t
}

struct Row {
    what: String,
    secs: f64,
    bytes_per_elem: f64,
    bnb: Option<f64>,
}

fn print_rows(n: usize, copy_bw: f64, rows: &[Row]) {
    println!(
        "  {:<44} {:>9} {:>10} {:>8} {:>9} {:>10}",
        "operation", "median ms", "G elem/s", "GB/s", "÷ copy", "× bnb ref"
    );
    for r in rows {
        let eps = n as f64 / r.secs;
        let bps = eps * r.bytes_per_elem;
        let bnb = r.bnb.map(|b| format!("{:.1}×", eps / 1e9 / b)).unwrap_or_else(|| "-".into());
        let (gbs, ratio) = if r.bytes_per_elem > 0.0 {
            (format!("{:.1}", bps / 1e9), format!("{:.2}", bps / copy_bw))
        } else {
            ("-".into(), "-".into())
        };
        println!("  {:<44} {:>9.3} {:>10.3} {:>8} {:>9} {:>10}", r.what, r.secs * 1e3, eps / 1e9, gbs, ratio, bnb);
    }
}

fn bench_shape(rows_n: usize, cols: usize, reps: usize, copy_bw: f64) {
    let n = rows_n * cols;
    let shape = [rows_n, cols];
    let x = random_bf16(n, 0x5EED ^ n as u64);
    println!("\n{rows_n}×{cols} bf16 ({:.1} M elements, {:.0} MiB), blocksize 64", n as f64 / 1e6, (2 * n) as f64 / (1 << 20) as f64);

    let dq = Nf4Params { blocksize: 64, double_quant: true };
    let nodq = Nf4Params { blocksize: 64, double_quant: false };
    let mut rows = Vec::new();

    // Public API, as a caller sees it: validation, kernel, double quant,
    // allocation of the result.
    let t = median_secs(reps, || {
        black_box(Nf4Tensor::quantize(Elems::BF16(&x), &shape, dq).unwrap());
    });
    rows.push(Row { what: "quantize bf16→NF4+DQ (Nf4Tensor::quantize)".into(), secs: t, bytes_per_elem: 2.5, bnb: Some(BNB_QUANT_GELEMS) });
    let t = median_secs(reps, || {
        black_box(Nf4Tensor::quantize(Elems::BF16(&x), &shape, nodq).unwrap());
    });
    rows.push(Row { what: "quantize bf16→NF4 (no DQ)".into(), secs: t, bytes_per_elem: 2.5, bnb: Some(BNB_QUANT_GELEMS) });

    let tdq = Nf4Tensor::quantize(Elems::BF16(&x), &shape, dq).unwrap();
    let tnodq = Nf4Tensor::quantize(Elems::BF16(&x), &shape, nodq).unwrap();
    let mut out16 = vec![bf16::ZERO; n];
    let mut out32 = vec![0f32; n];
    let t = median_secs(reps, || {
        tdq.dequantize_into(ElemsMut::BF16(&mut out16)).unwrap();
        black_box(&mut out16);
    });
    rows.push(Row { what: "dequantize NF4+DQ→bf16 (dequantize_into)".into(), secs: t, bytes_per_elem: 2.5, bnb: Some(BNB_DEQUANT_GELEMS) });
    let t = median_secs(reps, || {
        tnodq.dequantize_into(ElemsMut::BF16(&mut out16)).unwrap();
        black_box(&mut out16);
    });
    rows.push(Row { what: "dequantize NF4→bf16 (no DQ)".into(), secs: t, bytes_per_elem: 2.5, bnb: None });
    let t = median_secs(reps, || {
        tdq.dequantize_into(ElemsMut::F32(&mut out32)).unwrap();
        black_box(&mut out32);
    });
    rows.push(Row { what: "dequantize NF4+DQ→f32".into(), secs: t, bytes_per_elem: 4.5, bnb: None });

    // Where the time goes: the kernels alone, and the steps around them.
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(64)];
    let t = median_secs(reps, || {
        kernels::nf4_quantize(Elems::BF16(&x), 64, &mut packed, &mut absmax);
        black_box(&mut packed);
    });
    rows.push(Row { what: "  kernel nf4_quantize bf16 (preallocated)".into(), secs: t, bytes_per_elem: 2.5, bnb: Some(BNB_QUANT_GELEMS) });
    let t = median_secs(reps, || {
        black_box(Elems::BF16(&x).first_non_finite());
    });
    rows.push(Row { what: "  input finiteness scan (first_non_finite)".into(), secs: t, bytes_per_elem: 2.0, bnb: None });
    let t = median_secs(reps, || {
        black_box(lora::quant::nf4::DoubleQuant::compress(&absmax));
    });
    rows.push(Row { what: "  DoubleQuant::compress of the scales".into(), secs: t, bytes_per_elem: 0.0, bnb: None });
    let absmax_f32 = tdq.absmax_f32().into_owned();
    let t = median_secs(reps, || {
        black_box(tdq.absmax_f32());
    });
    rows.push(Row { what: "  DoubleQuant::decode of the scales".into(), secs: t, bytes_per_elem: 0.0, bnb: None });
    let t = median_secs(reps, || {
        kernels::nf4_dequantize(tdq.packed(), &absmax_f32, 64, ElemsMut::BF16(&mut out16));
        black_box(&mut out16);
    });
    rows.push(Row { what: "  kernel nf4_dequantize bf16".into(), secs: t, bytes_per_elem: 2.5, bnb: None });
    if let Absmax::Double(d) = tdq.absmax() {
        let sc = kernels::DoubleQuantScales {
            codes: &d.codes,
            map: &d.map,
            nested_absmax: &d.nested_absmax,
            nested_blocksize: d.nested_blocksize,
            offset: d.offset,
        };
        let t = median_secs(reps, || {
            kernels::nf4_dequantize_double_quant(tdq.packed(), sc, 64, ElemsMut::BF16(&mut out16));
            black_box(&mut out16);
        });
        rows.push(Row { what: "  kernel NF4+DQ→bf16, scales decoded per task".into(), secs: t, bytes_per_elem: 2.5, bnb: Some(BNB_DEQUANT_GELEMS) });
    }
    // The other instruction sets this CPU offers (what a machine without
    // AVX-512, or without AVX2, would run).
    for isa in Isa::available().into_iter().rev().skip(1) {
        let t = median_secs(reps, || {
            kernels::nf4_quantize_isa(isa, Elems::BF16(&x), 64, &mut packed, &mut absmax);
            black_box(&mut packed);
        });
        rows.push(Row { what: format!("  kernel nf4_quantize bf16, {isa:?}"), secs: t, bytes_per_elem: 2.5, bnb: Some(BNB_QUANT_GELEMS) });
        let t = median_secs(reps, || {
            kernels::nf4_dequantize_isa(isa, tdq.packed(), &absmax_f32, 64, ElemsMut::BF16(&mut out16));
            black_box(&mut out16);
        });
        rows.push(Row { what: format!("  kernel nf4_dequantize bf16, {isa:?}"), secs: t, bytes_per_elem: 2.5, bnb: Some(BNB_DEQUANT_GELEMS) });
    }
    print_rows(n, copy_bw, &rows);
}

fn main() {
    let a = args();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(a.threads).build().unwrap();
    pool.install(|| {
        let copy_bytes = if a.quick { 64 << 20 } else { 512 << 20 };
        let copy_bw = copy_bandwidth(copy_bytes, a.threads, a.reps);
        println!(
            "NF4 CPU benchmark: {} rayon threads, median of {} runs (after one warm-up); kernels: {:?}",
            a.threads,
            a.reps,
            Isa::detect()
        );
        println!("copy bandwidth: {:.1} GB/s (read + write, memcpy of {} MiB split over the threads)", copy_bw / 1e9, copy_bytes >> 20);
        println!(
            "bnb reference (REFERENCES.md, not measured here): quantize {BNB_QUANT_GELEMS} G elem/s, dequantize NF4+DQ→bf16 {BNB_DEQUANT_GELEMS} G elem/s"
        );
        let shapes: &[(usize, usize)] = if a.quick { &[(1024, 1024)] } else { &[(4096, 4096), (4096, 11008)] };
        for &(r, c) in shapes {
            bench_shape(r, c, a.reps, copy_bw);
        }
        // Copy again at the end: the figure drifts on shared machines.
        let copy_bw2 = copy_bandwidth(copy_bytes, a.threads, a.reps);
        println!("\ncopy bandwidth again at the end: {:.1} GB/s", copy_bw2 / 1e9);
    });
}
