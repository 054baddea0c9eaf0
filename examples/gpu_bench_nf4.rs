//! GPU benchmark of the NF4 kernels (a benchmark, not a test: it prints
//! figures and ratios against baselines measured in the same run).
//!
//! 1. Device-to-device copy bandwidth (cuMemcpyDtoD of 1 GiB; read + write
//!    bytes per second): the roofline the memory-bound kernels are held to.
//! 2. NF4 → bf16 dequantization of 4096×4096, 4096×11008 and 8192×28672
//!    (bytes moved = n/2 codes + 2n output + 4n/64 absmax), as a fraction of
//!    the copy bandwidth (target ≥ 80%); also NF4 quantization of bf16.
//! 3. Batch-1 GEMV y = W·x for 4096×4096, 4096×11008 and 11008×4096: fused
//!    NF4 (fp32 scales ready; and with the double-quant decode per call),
//!    dequantize-to-bf16-then-GEMV, and plain bf16 GEMV.
//! 4. A decode step's 2 and 8 rows: the fused GEMV of all rows in one
//!    launch (the weight read once) against one launch per row.
//!
//! Timing: CUDA events around batches of launches (each batch ≥ ~2 ms),
//! after warm-up; the median of 7 batches. Inputs rotate over enough copies
//! that the working set is at least 3× the L2 cache, so weights come from
//! DRAM as they would in a model.
//!
//! Run: `cargo run --release --example gpu_bench_nf4` (needs a GPU and
//! NVRTC; set LORA_NVRTC_LIB to the libnvrtc.so.13 path if the loader
//! cannot find it). Without a GPU it says so and exits 0 (1 with
//! LORA_REQUIRE_GPU=1).

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaSlice;
use lora::backend::cuda::{self, dense, nf4 as gnf4, CudaDevice, DevElems};
use lora::quant::nf4::Nf4Params;
use std::error::Error;

type R<T> = std::result::Result<T, Box<dyn Error>>;

fn drv<T>(r: std::result::Result<T, cudarc::driver::DriverError>, what: &str) -> R<T> {
    r.map_err(|e| format!("{what}: {e:?}").into())
}

/// SplitMix64 for test data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn bf16_bits(&mut self, n: usize) -> Vec<u16> {
        (0..n).map(|_| half::bf16::from_f32(self.uniform(-1.0, 1.0)).to_bits()).collect()
    }
}

/// A timing: median milliseconds per call, and whether the calls were
/// replayed from a CUDA graph (else launched one by one, where launch cost
/// on the host can hide the time of very short kernels).
struct Timing {
    ms: f64,
    graph: bool,
}

/// Times `f(i)` with CUDA events. The calls are captured into a CUDA graph
/// of `k` calls (k sized so one replay takes >= ~2 ms) and the graph is
/// replayed 7 times after a warm-up; the median per-call time is reported.
/// A graph runs its kernels back to back, so a 3 us GEMV is measured on
/// the GPU, not bounded by the host's launch rate. Falls back to direct
/// launches if capture fails.
fn time_ms(dev: &CudaDevice, mut f: impl FnMut(usize) -> R<()>) -> R<Timing> {
    let ctx = dev.context();
    let s = dev.stream();
    let ev = || drv(ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)), "cuEventCreate");
    let timed = |run: &mut dyn FnMut() -> R<()>| -> R<f64> {
        let (a, b) = (ev()?, ev()?);
        drv(a.record(s), "cuEventRecord")?;
        run()?;
        drv(b.record(s), "cuEventRecord")?;
        Ok(drv(a.elapsed_ms(&b), "cuEventElapsedTime")? as f64)
    };
    let mut i = 0usize;
    // Warm-up, and a first estimate from a direct batch.
    for _ in 0..3 {
        f(i)?;
        i += 1;
    }
    let est = timed(&mut || {
        for _ in 0..5 {
            f(i)?;
            i += 1;
        }
        Ok(())
    })? / 5.0;
    let k = ((2.0 / est.max(1e-4)).ceil() as usize).clamp(1, 2000);
    // Capture k calls into a graph.
    let graph = (|| -> R<Option<cudarc::driver::CudaGraph>> {
        drv(s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED), "cuStreamBeginCapture")?;
        let mut r = Ok(());
        for _ in 0..k {
            r = f(i);
            i += 1;
            if r.is_err() {
                break;
            }
        }
        let g = drv(s.end_capture(CUgraphInstantiate_flags(0)), "cuStreamEndCapture");
        r?;
        g
    })();
    let mut v: Vec<f64> = Vec::new();
    let used_graph = match graph {
        Ok(Some(g)) => {
            drv(g.launch(), "cuGraphLaunch")?;
            for _ in 0..7 {
                v.push(timed(&mut || drv(g.launch(), "cuGraphLaunch"))? / k as f64);
            }
            true
        }
        other => {
            if let Err(e) = other {
                eprintln!("  (graph capture failed, timing direct launches: {e})");
            }
            drv(s.synchronize(), "cuStreamSynchronize")?;
            for _ in 0..7 {
                v.push(
                    timed(&mut || {
                        for _ in 0..k {
                            f(i)?;
                            i += 1;
                        }
                        Ok(())
                    })? / k as f64,
                );
            }
            false
        }
    };
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(Timing { ms: v[v.len() / 2], graph: used_graph })
}

/// How many copies of a `bytes`-sized input make a working set ≥ 3× L2.
fn copies(l2: usize, bytes: usize) -> usize {
    (3 * l2).div_ceil(bytes.max(1)).clamp(1, 64)
}

/// A device-resident NF4 weight with fp32 scales (random codes and scales:
/// the kernels' speed does not depend on the values).
struct Weight {
    packed: CudaSlice<u8>,
    absmax: CudaSlice<f32>,
}

fn random_weight(dev: &CudaDevice, rng: &mut Rng, n: usize, bs: usize) -> R<Weight> {
    let absmax: Vec<f32> = (0..n.div_ceil(bs)).map(|_| rng.uniform(0.01, 0.1)).collect();
    Ok(Weight { packed: dev.upload(&rng.bytes(n.div_ceil(2)))?, absmax: dev.upload(&absmax)? })
}

/// Microseconds, with '*' when not timed from a graph.
fn us(t: &Timing) -> String {
    format!("{:.1}{}", t.ms * 1e3, if t.graph { "" } else { "*" })
}

fn ms3(t: &Timing) -> String {
    format!("{:.3}{}", t.ms, if t.graph { "" } else { "*" })
}

fn gbs(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

fn main() -> R<()> {
    let dev = match cuda::open(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu_bench_nf4: no GPU: {e}");
            if std::env::var("LORA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                std::process::exit(1);
            }
            return Ok(());
        }
    };
    dev.load_all_kernels()?;
    let (nma, nmi) = cuda::nvrtc::version()?;
    let mut dv = 0;
    // SAFETY: valid out-pointer; the driver is loaded (the device opened).
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut dv) };
    let l2 = drv(dev.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE), "L2 size")? as usize;
    let sms = drv(dev.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT), "SM count")?;
    println!("# gpu_bench_nf4 on {}: {sms} SMs, L2 {} MiB, driver CUDA {}.{}, NVRTC {nma}.{nmi}", dev.describe(), l2 >> 20, dv / 1000, (dv % 1000) / 10);
    let mut rng = Rng(0xbe_0001);

    // 1. Copy bandwidth.
    let gib = 1usize << 30;
    let src = dev.alloc_filled::<u8>(gib, 0x5a)?;
    let mut dst = dev.alloc_filled::<u8>(gib, 0)?;
    let t_copy = time_ms(&dev, |_| drv(dev.stream().memcpy_dtod(&src, &mut dst), "cuMemcpyDtoDAsync"))?;
    let copy_bw = gbs(2.0 * gib as f64, t_copy.ms);
    drop((src, dst));
    println!();
    println!("## device-to-device copy (cuMemcpyDtoD, 1 GiB; bytes = read + write)");
    println!("{:>12} {:>10} {:>10}", "bytes", "ms", "GB/s");
    println!("{:>12} {:>10} {:>10.1}", 2 * gib, ms3(&t_copy), copy_bw);

    // 2. Dequantize NF4 -> bf16 (and quantize bf16 -> NF4).
    println!();
    println!("## NF4 (blocksize 64, fp32 absmax) -> bf16 dequantize; bytes = n/2 + 2n + 4n/64");
    println!("{:>14} {:>10} {:>12} {:>10} {:>10} {:>9}", "shape", "elements", "bytes", "us", "GB/s", "of copy");
    let bs = 64;
    let mut dq_rows = Vec::new();
    for (r, c) in [(4096usize, 4096usize), (4096, 11008), (8192, 28672)] {
        let n = r * c;
        let bytes = n / 2 + 2 * n + 4 * n.div_ceil(bs);
        let k = copies(l2, bytes);
        let ws: Vec<Weight> = (0..k).map(|_| random_weight(&dev, &mut rng, n, bs)).collect::<R<_>>()?;
        let mut outs: Vec<CudaSlice<u16>> = (0..k).map(|_| dev.alloc_filled::<u16>(n, 0)).collect::<lora::Result<_>>()?;
        let t = time_ms(&dev, |i| {
            let j = i % k;
            let mut o = cuda::DevElemsMut::BF16(outs[j].as_view_mut());
            Ok(gnf4::dequantize(&dev, &ws[j].packed.as_view(), &ws[j].absmax.as_view(), bs, &mut o)?)
        })?;
        let bw = gbs(bytes as f64, t.ms);
        println!("{:>14} {:>10} {:>12} {:>10} {:>10.1} {:>8.1}%", format!("{r}x{c}"), n, bytes, us(&t), bw, 100.0 * bw / copy_bw);
        dq_rows.push(100.0 * bw / copy_bw);
    }
    // 2b. The same from double-quantized scales (the step's weights): the
    // dequantize that decodes each block's scale in its pass, against the
    // decode pass into a buffer, then the fp32-scale dequantize.
    println!();
    println!("## NF4 with double-quantized scales (blocksize 64, nested 256) -> bf16; bytes = n/2 + 2n + n/64");
    println!("{:>14} {:>28} {:>10} {:>10} {:>9}", "shape", "path", "us", "GB/s", "of copy");
    {
        let (r, c) = (4096usize, 11008usize);
        let n = r * c;
        let nb = n / bs;
        let bytes = n / 2 + 2 * n + nb;
        let k = copies(l2, bytes);
        let map: Vec<f32> = (0..256).map(|i| (i as f32 - 127.5) / 127.5).collect();
        let mut ws = Vec::with_capacity(k);
        for _ in 0..k {
            let nested: Vec<f32> = (0..nb.div_ceil(256)).map(|_| rng.uniform(0.01, 0.1)).collect();
            let dq = gnf4::CudaDoubleQuant { codes: dev.upload(&rng.bytes(nb))?, nested_absmax: dev.upload(&nested)?, map: dev.upload(&map)?, offset: 0.05, nested_blocksize: 256 };
            ws.push((dev.upload(&rng.bytes(n / 2))?, dq));
        }
        let mut outs: Vec<CudaSlice<u16>> = (0..k).map(|_| dev.alloc_filled::<u16>(n, 0)).collect::<lora::Result<_>>()?;
        let fused = time_ms(&dev, |i| {
            let j = i % k;
            let mut o = cuda::DevElemsMut::BF16(outs[j].as_view_mut());
            Ok(gnf4::dequantize_double(&dev, &ws[j].0.as_view(), &ws[j].1, bs, &mut o)?)
        })?;
        let mut scales = dev.alloc_filled::<f32>(nb, 0)?;
        let two = time_ms(&dev, |i| {
            let j = i % k;
            let d = &ws[j].1;
            gnf4::absmax_decode(&dev, &d.codes.as_view(), &d.map.as_view(), &d.nested_absmax.as_view(), d.nested_blocksize, d.offset, &mut scales.as_view_mut())?;
            let mut o = cuda::DevElemsMut::BF16(outs[j].as_view_mut());
            Ok(gnf4::dequantize(&dev, &ws[j].0.as_view(), &scales.as_view(), bs, &mut o)?)
        })?;
        for (path, t) in [("scales decoded in the pass", &fused), ("decode pass, then dequantize", &two)] {
            let bw = gbs(bytes as f64, t.ms);
            println!("{:>14} {:>28} {:>10} {:>10.1} {:>8.1}%", format!("{r}x{c}"), path, us(t), bw, 100.0 * bw / copy_bw);
        }
        println!("fused / two passes: {:.2}x the speed", two.ms / fused.ms);
    }
    println!();
    println!("## bf16 -> NF4 quantize (blocksize 64, no double quant); bytes = 2n + n/2 + 4n/64");
    println!("{:>14} {:>10} {:>12} {:>10} {:>10} {:>9}", "shape", "elements", "bytes", "us", "GB/s", "of copy");
    {
        let (r, c) = (4096usize, 11008usize);
        let n = r * c;
        let x = dev.upload(&rng.bf16_bits(n))?;
        let mut packed = dev.alloc_filled::<u8>(n / 2, 0)?;
        let mut absmax = dev.alloc_filled::<f32>(n / bs, 0)?;
        let t = time_ms(&dev, |_| Ok(gnf4::quantize(&dev, &DevElems::BF16(x.as_view()), bs, &mut packed.as_view_mut(), &mut absmax.as_view_mut())?))?;
        let bytes = 2 * n + n / 2 + 4 * n / bs;
        let bw = gbs(bytes as f64, t.ms);
        println!("{:>14} {:>10} {:>12} {:>10} {:>10.1} {:>8.1}%", format!("{r}x{c}"), n, bytes, us(&t), bw, 100.0 * bw / copy_bw);
    }

    // 3. GEMV.
    println!();
    println!("## batch-1 GEMV y = W x, W [out, in], x/y bf16 (blocksize 64); GB/s counts the weight bytes read");
    println!(
        "{:>12} {:>11} {:>8} {:>13} {:>12} {:>10} {:>8} {:>9} {:>9}",
        "out x in", "fused NF4", "GB/s", "fused+DQdec", "dequant+gemv", "bf16 gemv", "GB/s", "fused/bf16", "dq+g/bf16"
    );
    println!("{:>12} {:>11} {:>8} {:>13} {:>12} {:>10} {:>8} {:>9} {:>9}", "", "us", "", "us", "us", "us", "", "speedup", "speedup");
    for (r, c) in [(4096usize, 4096usize), (4096, 11008), (11008, 4096)] {
        let n = r * c;
        let nf4_bytes = n / 2 + 4 * n / bs;
        let bf16_bytes = 2 * n;
        let kq = copies(l2, nf4_bytes);
        let ws: Vec<Weight> = (0..kq).map(|_| random_weight(&dev, &mut rng, n, bs)).collect::<R<_>>()?;
        let x = dev.upload(&rng.bf16_bits(c))?;
        let mut y = dev.alloc_filled::<u16>(r, 0)?;
        let t_fused = time_ms(&dev, |i| {
            let w = &ws[i % kq];
            Ok(gnf4::gemv_bf16(&dev, &w.packed.as_view(), &w.absmax.as_view(), bs, r, c, &x.as_view(), &mut y.as_view_mut())?)
        })?;
        // Fused with double-quantized scales decoded on every call.
        let host: Vec<u16> = rng.bf16_bits(n);
        let xd = dev.upload(&host)?;
        drop(host);
        let wdq = gnf4::CudaNf4::quantize(&dev, &DevElems::BF16(xd.as_view()), &[r, c], Nf4Params { blocksize: bs, double_quant: true })?;
        drop(xd);
        let t_fused_dq = time_ms(&dev, |_| Ok(wdq.gemv_bf16(&dev, &x.as_view(), &mut y.as_view_mut())?))?;
        // Dequantize to a bf16 scratch, then the dense GEMV.
        let mut scratch = dev.alloc_filled::<u16>(n, 0)?;
        let t_two = time_ms(&dev, |i| {
            let w = &ws[i % kq];
            let mut o = cuda::DevElemsMut::BF16(scratch.as_view_mut());
            gnf4::dequantize(&dev, &w.packed.as_view(), &w.absmax.as_view(), bs, &mut o)?;
            Ok(dense::gemv_bf16(&dev, &scratch.as_view(), r, c, &x.as_view(), &mut y.as_view_mut())?)
        })?;
        drop(scratch);
        // Plain bf16 weights.
        let kb = copies(l2, bf16_bytes);
        let wb: Vec<CudaSlice<u16>> = (0..kb).map(|_| dev.upload(&rng.bf16_bits(n))).collect::<lora::Result<_>>()?;
        let t_bf16 = time_ms(&dev, |i| Ok(dense::gemv_bf16(&dev, &wb[i % kb].as_view(), r, c, &x.as_view(), &mut y.as_view_mut())?))?;
        let yh = dev.download(&y)?;
        if yh.iter().any(|&v| !half::bf16::from_bits(v).to_f32().is_finite()) {
            return Err(format!("GEMV {r}x{c} produced a non-finite output").into());
        }
        println!(
            "{:>12} {:>11} {:>8.1} {:>13} {:>12} {:>10} {:>8.1} {:>9.2} {:>9.2}",
            format!("{r}x{c}"),
            us(&t_fused),
            gbs(nf4_bytes as f64, t_fused.ms),
            us(&t_fused_dq),
            us(&t_two),
            us(&t_bf16),
            gbs(bf16_bytes as f64, t_bf16.ms),
            t_bf16.ms / t_fused.ms,
            t_bf16.ms / t_two.ms
        );
    }
    println!("(times are medians of CUDA-graph replays; a '*' marks a direct-launch fallback, which the host's launch rate may bound)");

    // 4. A decode step's few rows: nb vectors through one fused launch
    // (the weight read once) against nb batch-1 launches.
    println!();
    println!("## {} decode rows: fused NF4 GEMV of all rows in one launch vs one launch per row (blocksize 64)", gnf4::GEMV_MAX_BATCH);
    println!("{:>12} {:>4} {:>12} {:>14} {:>9}", "out x in", "rows", "one launch", "per-row launches", "speedup");
    for (r, c) in [(4096usize, 4096usize), (4096, 11008), (11008, 4096)] {
        let n = r * c;
        let kq = copies(l2, n / 2 + 4 * n / bs);
        let ws: Vec<Weight> = (0..kq).map(|_| random_weight(&dev, &mut rng, n, bs)).collect::<R<_>>()?;
        for nb in [2usize, gnf4::GEMV_MAX_BATCH] {
            let x = dev.upload(&rng.bf16_bits(nb * c))?;
            let mut y = dev.alloc_filled::<u16>(nb * r, 0)?;
            let t_one = time_ms(&dev, |i| {
                let w = &ws[i % kq];
                Ok(gnf4::gemv_bf16_batch(&dev, &w.packed.as_view(), &w.absmax.as_view(), bs, r, c, nb, &x.as_view(), &mut y.as_view_mut())?)
            })?;
            let t_rows = time_ms(&dev, |i| {
                let w = &ws[i % kq];
                for k in 0..nb {
                    gnf4::gemv_bf16(&dev, &w.packed.as_view(), &w.absmax.as_view(), bs, r, c, &x.slice(k * c..(k + 1) * c), &mut y.slice_mut(k * r..(k + 1) * r))?;
                }
                Ok(())
            })?;
            println!("{:>12} {:>4} {:>12} {:>14} {:>9.2}", format!("{r}x{c}"), nb, us(&t_one), us(&t_rows), t_rows.ms / t_one.ms);
        }
    }
    println!();
    let worst = dq_rows.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "# dequantize NF4->bf16 reaches {:.1}%..{:.1}% of copy bandwidth (target >= 80%): {}",
        worst,
        dq_rows.iter().cloned().fold(0.0, f64::max),
        if worst >= 80.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
