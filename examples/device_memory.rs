//! Device memory of a training step, counted without a GPU: the peak bytes
//! in use in the device's memory pool during `Trainer::step`, for the
//! 1B-parameter LLaMA of examples/gpu_bench_train.rs, on the emulated CUDA
//! device (tests/common/fakecuda.rs) in its count-only mode: every
//! allocation the device path makes happens, in the same order and sizes
//! as on a GPU, but no kernel or product runs. So this counts the pool's
//! peak exactly as the crate asks for memory (the figure gpu_bench_train
//! reads from the driver, `CU_MEMPOOL_ATTR_USED_MEM_HIGH`), in seconds on
//! any machine; what it cannot see is the driver's own overhead (the
//! context, cuBLAS's workspace, the pool's rounding), which a GPU run adds.
//! The losses are meaningless (nothing computes).
//!
//!     cargo run --release --example device_memory -- [nf4|bf16] [BATCH] [SEQ] [RANK]
//!
//! Each line also gives the second step's matrix products (cuBLAS calls
//! and FLOPs) and their roofline time on an H100 (a lower bound:
//! bench/RESULTS.md), and how many times the host waited for the device
//! during it (synchronizations, blocking copies and frees).
//! LORA_DEVICE_MEMORY_DETAIL=1 lists the allocations live at each peak, the
//! step's kernel launches by kernel and its waits by call.
//! Prints one line per step variant: the default bf16 step and the lean
//! bf16 step (bf16 adapter products, tensor-core attention; also with the
//! fp32 attention kernels), each also
//! without recomputation (q, k, v and the mid-layer residual kept, not
//! recomputed in the backward: `DeviceModel::set_recompute`) and with
//! activation checkpointing, and the lean step without its adapters folded
//! into the base products (`DeviceModel::set_fold`); and the fp32 step.

#[path = "../tests/common/gpu.rs"]
#[allow(dead_code)]
mod common;

#[path = "common/llama_1b.rs"]
mod llama_1b;

use lora::model::gpu::{Compute, DeviceModel, LoraPath};
use lora::session::trainer::{Trainer, TrainerConfig};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Instant;

const GIB: f64 = (1u64 << 30) as f64;
/// H100 SXM, dense bf16 tensor-core FLOP/s (spec sheet).
const H100_BF16_FLOPS: f64 = 989.4e12;
/// H100 SXM, fp32 FLOP/s without tensor cores (spec sheet; the crate keeps
/// TF32 off).
const H100_F32_FLOPS: f64 = 66.9e12;
/// Device-to-device copy on the H100 of 2026-11-28 (bench/gpu/), bytes/s
/// read + written.
const H100_COPY_BYTES_PER_S: f64 = 2427.2e9;

fn main() {
    if let Err(e) = run() {
        eprintln!("device_memory: {e}");
        std::process::exit(1);
    }
}

fn run() -> lora::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let mode = a.first().map(String::as_str).unwrap_or("nf4").to_string();
    let num = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, seq, rank) = (num(1, 4), num(2, 1024), num(3, 16));
    if lora::backend::cuda::driver_present() {
        lora::bail!(InvalidState, "a CUDA driver is here: measure on the GPU (examples/gpu_bench_train.rs) instead");
    }
    // SAFETY: before any other thread runs; read by the fake libraries.
    unsafe { std::env::set_var("LORA_FAKECUDA_COUNT_ONLY", "1") };
    let dev = match common::device() {
        Ok(d) => d.clone(),
        Err(why) => lora::bail!(CudaUnavailable, "{why}"),
    };
    let t0 = Instant::now();
    let m = llama_1b::build(&mode, rank)?;
    let (trainable, total) = m.param_counts();
    let model = Arc::new(Mutex::new(m));
    println!(
        "device memory of one training step, counted on the emulated CUDA device (count-only): {mode}, {:.3}B params ({trainable} trainable), batch {batch} x seq {seq}, r {rank} (model built in {:.0} s)",
        total as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
    let ids: Vec<i32> = (0..batch * seq).map(|i| ((i as u64 * 2654435761) % llama_1b::VOCAB as u64) as i32).collect();
    // The lean step: bf16 adapter products, with tensor-core attention
    // (`tc`) or the fp32 attention kernels.
    let lean = |g: &mut DeviceModel, tc: bool| -> lora::Result<()> {
        g.set_lora_path(LoraPath::BlasBf16)?;
        g.set_lean(true);
        g.set_tensor_core_attention(tc)
    };
    let hooks = Hooks::find();
    // The roofline of the products on an H100 SXM: the spec sheet's dense
    // bf16 tensor-core and fp32 rates, and the device-to-device copy
    // bandwidth gpu_bench_nf4 measured on the H100 of 2026-11-28.
    // SAFETY: see Hooks::find.
    unsafe { (hooks.set_roofline)(H100_BF16_FLOPS, H100_F32_FLOPS, H100_COPY_BYTES_PER_S) };
    // (name, compute, checkpointing, lean (Some(tensor-core attention)),
    // recomputation, adapters folded into the base products (lean only))
    type Variant = (&'static str, Compute, bool, Option<bool>, bool, bool);
    let variants: [Variant; 9] = [
        ("bf16 step (default)", Compute::BF16, false, None, true, true),
        ("bf16 step, no recomputation", Compute::BF16, false, None, false, true),
        ("lean bf16 step", Compute::BF16, false, Some(true), true, true),
        ("lean bf16 step, not folded", Compute::BF16, false, Some(true), true, false),
        ("lean bf16 step, fp32 attention", Compute::BF16, false, Some(false), true, true),
        ("lean bf16 step, no recomputation", Compute::BF16, false, Some(true), false, true),
        ("bf16 step + checkpointing", Compute::BF16, true, None, true, true),
        ("lean bf16 step + checkpointing", Compute::BF16, true, Some(true), true, true),
        ("fp32 step", Compute::F32, false, None, true, true),
    ];
    for (name, compute, ckpt, is_lean, recompute, fold) in variants {
        let mut t = Trainer::new(model.clone(), "a", TrainerConfig { checkpointing: ckpt, ..Default::default() })?;
        t.use_device(Some((0, compute)))?;
        t.with_device_model(|g| {
            g.set_recompute(recompute);
            g.set_fold(fold);
            if let Some(tc) = is_lean {
                lean(g, tc)?;
            }
            Ok::<(), lora::Error>(())
        })
        .expect("on the device")?;
        let fixed = dev.pool_used_bytes()?;
        dev.reset_pool_peak()?;
        let detail = std::env::var("LORA_DEVICE_MEMORY_DETAIL").is_ok_and(|v| v == "1");
        for i in 0..2 {
            if i == 1 {
                // The second step's work alone (the first also uploads).
                hooks.reset();
            }
            // Nothing computes: a step refused for a non-finite loss or
            // gradient (read from untouched memory) has made every
            // allocation all the same; any other error is real.
            match t.step(&ids, None, batch, seq, &mut |_, _| true) {
                Err(e) if e.kind != lora::ErrorKind::NonFinite => return Err(e.context(&format!("the {name}"))),
                _ => {}
            }
        }
        let peak = dev.pool_peak_bytes()?;
        let (gemms, flops) = hooks.work();
        let (big_s, small_s, big_b, small_b) = hooks.roofline();
        let syncs = hooks.syncs(detail);
        let tiled = hooks.shapes(detail);
        println!(
            "  {name:<34} peak pool {:6.2} GiB = {:5.2} GiB resident (weights, adapter, AdamW state) + {:5.2} GiB for the step; {gemms} products, {:.2} TFLOP",
            peak as f64 / GIB,
            fixed as f64 / GIB,
            (peak - fixed) as f64 / GIB,
            flops as f64 / 1e12
        );
        println!(
            "    products' H100 roofline: >= {:.1} ms (large {:.1} ms, {:.1} GB; rank-sized {:.1} ms, {:.1} GB; {:.1} ms with 128x128 tiles in whole waves); the host waited for the device {syncs} times",
            (big_s + small_s) * 1e3,
            big_s * 1e3,
            big_b / 1e9,
            small_s * 1e3,
            small_b / 1e9,
            tiled * 1e3
        );
        if detail {
            hooks.peak_report();
        }
        hooks.launches(detail);
        t.use_device(None)?;
    }
    Ok(())
}

/// The emulated device's counters (tests/fakecuda/*.cpp; loaded
/// process-wide by common::device()).
struct Hooks {
    peak: unsafe extern "C" fn(),
    launches: unsafe extern "C" fn(i32, i32),
    gemms: unsafe extern "C" fn(*mut u64, *mut u64, i32),
    set_roofline: unsafe extern "C" fn(f64, f64, f64),
    roofline: unsafe extern "C" fn(*mut f64, *mut f64, *mut f64, *mut f64, i32),
    syncs: unsafe extern "C" fn(i32, i32) -> u64,
    shapes: unsafe extern "C" fn(i32, i32) -> f64,
}

impl Hooks {
    fn find() -> Hooks {
        let this = libloading::os::unix::Library::this();
        // SAFETY: the hooks' signatures in tests/fakecuda/fake_cuda.cpp and
        // fake_cublas.cpp, whose libraries stay loaded for the process.
        unsafe {
            Hooks {
                peak: *this.get(b"lora_fakecuda_peak_report").expect("the emulated driver's peak report"),
                launches: *this.get(b"lora_fakecuda_launch_report").expect("the emulated driver's launch report"),
                gemms: *this.get(b"lora_fakecublas_work").expect("the emulated cuBLAS's product count"),
                set_roofline: *this.get(b"lora_fakecublas_set_roofline").expect("the emulated cuBLAS's roofline"),
                roofline: *this.get(b"lora_fakecublas_roofline").expect("the emulated cuBLAS's roofline"),
                syncs: *this.get(b"lora_fakecuda_sync_report").expect("the emulated driver's synchronization count"),
                shapes: *this.get(b"lora_fakecublas_shape_report").expect("the emulated cuBLAS's products by shape"),
            }
        }
    }

    fn peak_report(&self) {
        // SAFETY: see find.
        unsafe { (self.peak)() }
    }

    /// Starts the product and launch counts again.
    fn reset(&self) {
        self.work();
        self.roofline();
        self.launches(false);
        self.syncs(false);
        self.shapes(false);
    }

    /// The products' roofline time with tile quantization since the last
    /// reset (with `print`, by shape, to stderr); it starts again.
    fn shapes(&self, print: bool) -> f64 {
        // SAFETY: see find.
        unsafe { (self.shapes)(print as i32, 1) }
    }

    /// The calls that made the host wait for the device since the last
    /// reset (with `print`, by call, to stderr); the count starts again.
    fn syncs(&self, print: bool) -> u64 {
        // SAFETY: see find.
        unsafe { (self.syncs)(print as i32, 1) }
    }

    /// The roofline estimate of the products since the last call
    /// (seconds of the large and of the rank-sized products, bytes of
    /// each); it starts again.
    fn roofline(&self) -> (f64, f64, f64, f64) {
        let (mut big, mut small, mut bb, mut sb) = (0f64, 0f64, 0f64, 0f64);
        // SAFETY: see find; the pointers are to live locals.
        unsafe { (self.roofline)(&mut big, &mut small, &mut bb, &mut sb, 1) };
        (big, small, bb, sb)
    }

    /// The products (count, FLOPs) since the last call; the count starts
    /// again.
    fn work(&self) -> (u64, u64) {
        let (mut calls, mut flops) = (0u64, 0u64);
        // SAFETY: see find; the pointers are to live locals.
        unsafe { (self.gemms)(&mut calls, &mut flops, 1) };
        (calls, flops)
    }

    /// With `print`, the kernel launches since the last reset by kernel
    /// (to stderr); the count starts again.
    fn launches(&self, print: bool) {
        // SAFETY: see find.
        unsafe { (self.launches)(print as i32, 1) }
    }
}
