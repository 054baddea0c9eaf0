//! The CUDA NF4 kernels against their CPU twins (the spec), on a GPU:
//! - quantize: bit for bit (packed bytes, fp32 absmax, and the whole
//!   double-quantized state) with `Nf4Tensor::quantize`;
//! - dequantize: bit for bit with `Nf4Tensor::dequantize_into`, into f32,
//!   f16 and bf16, from plain and double-quantized tensors (these through
//!   the kernels that decode each block's scale in the same pass);
//! - absmax decode: bit for bit with `DoubleQuant::decode`;
//! - the kernels that decode double-quantized scales where they read them
//!   (dequantize, GEMV): the bits of the decode pass followed by the
//!   fp32-scale kernel;
//! - GEMV (NF4 fused, and the dense bf16 one): within a stated bound of the
//!   exact product of the CPU-dequantized weight with x;
//! - the bitsandbytes fixtures of tests/fixtures/nf4 (embedded in this
//!   binary): GPU quantize and dequantize reproduce bitsandbytes' bytes.
//!
//! Inputs are fresh seeded random values (never zeros), with partial last
//! blocks, odd element counts, every blocksize from 32 to 4096 and all three
//! dtypes; every output buffer is poisoned (0xFF bytes: NaN) first.
//!
//! Without a GPU (or without NVRTC) each test prints why it skips and
//! passes, unless `LORA_REQUIRE_GPU=1`, where that is a failure. A kernel
//! that fails to compile or load on a present GPU always fails.

use half::{bf16, f16};
use lora::backend::cuda::{self, dense, nf4 as gnf4, CudaDevice, DevBuffer, DevElemsMut};
use lora::dtype::{DType, Elems, ElemsMut};
use lora::io::nf4_file;
use lora::io::safetensors::StFile;
use lora::quant::nf4::{Absmax, DoubleQuant, Nf4Params, Nf4Tensor};
use lora::ErrorKind;
use std::sync::OnceLock;

// ------------------------------------------------------------------ harness

#[path = "common/gpu.rs"]
mod harness;
use harness::{gpu, Rng};
use harness::emu;

/// NF4 code values and midpoint thresholds, as the spec computes them
/// (fp32 sum, then halving), to plant exact ties in test data.
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];
fn thresholds() -> [f32; 15] {
    std::array::from_fn(|i| (NF4[i] + NF4[i + 1]) / 2.0)
}

/// Random finite non-zero values for `dtype`: gaussian runs of random
/// length with random scales spanning the dtype's range (subnormal to
/// near-max), heavy tails, and runs of exact NF4 ties (±1 then midpoints).
fn random_values(rng: &mut Rng, n: usize, dtype: DType) -> Vec<f32> {
    // Exponent range of per-run scales, safely inside each dtype.
    let (lo, hi) = match dtype {
        // Up to 1e30: beyond ~1e36 the double-quantized scales overflow fp32
        // when decoded (code·nested + offset), which quantize refuses.
        DType::F32 => (-44.0, 30.0),
        DType::BF16 => (-44.0, 30.0),
        DType::F16 => (-6.0, 4.0),
    };
    let thr = thresholds();
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let run = 1 + rng.below(300);
        match rng.below(10) {
            0 => {
                // Ties: a block scaled by 2^k with its max 1·2^k and values
                // exactly on midpoints (exact in every dtype for small k).
                let s = f32::powi(2.0, rng.below(9) as i32 - 4);
                v.push(if rng.below(2) == 0 { s } else { -s });
                for _ in 0..run {
                    v.push(thr[rng.below(15)] * s);
                }
            }
            1 => {
                // Heavy tails (Student-t-like).
                let s = 10f64.powf(rng.unit() * 4.0 - 2.0);
                for _ in 0..run {
                    let g = rng.gauss();
                    let d = rng.gauss().abs().max(0.05);
                    v.push((s * g / d) as f32);
                }
            }
            _ => {
                let s = 10f64.powf(lo + rng.unit() * (hi - lo));
                for _ in 0..run {
                    v.push((s * rng.gauss()) as f32);
                }
            }
        }
    }
    v.truncate(n);
    let tiny = match dtype {
        DType::F16 => 6.0e-8,
        _ => 1.0e-40,
    };
    for x in v.iter_mut() {
        let max = match dtype {
            DType::F16 => 60000.0,
            _ => 1.0e36,
        };
        *x = x.clamp(-max, max);
        if *x == 0.0 {
            *x = tiny;
        }
    }
    v
}

/// Host data of one dtype.
enum Host {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}
impl Host {
    fn from_f32(v: &[f32], dtype: DType) -> Host {
        match dtype {
            DType::F32 => Host::F32(v.to_vec()),
            DType::F16 => Host::F16(v.iter().map(|&x| f16::from_f32(x)).map(|h| if h.to_f32() == 0.0 { f16::from_f32(6.0e-8) } else { h }).collect()),
            DType::BF16 => Host::BF16(v.iter().map(|&x| bf16::from_f32(x)).map(|h| if h.to_f32() == 0.0 { bf16::from_f32(1.0e-40) } else { h }).collect()),
        }
    }
    fn elems(&self) -> Elems<'_> {
        match self {
            Host::F32(v) => Elems::F32(v),
            Host::F16(v) => Elems::F16(v),
            Host::BF16(v) => Elems::BF16(v),
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn first_diff<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Asserts two NF4 tensors are identical, naming the first difference.
fn assert_same_nf4(what: &str, gpu: &Nf4Tensor, cpu: &Nf4Tensor) {
    assert_eq!(gpu.shape(), cpu.shape(), "{what}: shape");
    assert_eq!(gpu.dtype(), cpu.dtype(), "{what}: dtype");
    assert_eq!(gpu.blocksize(), cpu.blocksize(), "{what}: blocksize");
    if let Some(i) = first_diff(gpu.packed(), cpu.packed()) {
        panic!("{what}: packed byte {i} of {}: kernel {:#04x}, CPU {:#04x}", cpu.packed().len(), gpu.packed()[i], cpu.packed()[i]);
    }
    match (gpu.absmax(), cpu.absmax()) {
        (Absmax::F32(a), Absmax::F32(b)) => {
            if let Some(i) = first_diff(&bits(a), &bits(b)) {
                panic!("{what}: absmax[{i}]: kernel {:e} ({:#010x}), CPU {:e} ({:#010x})", a[i], a[i].to_bits(), b[i], b[i].to_bits());
            }
        }
        (Absmax::Double(a), Absmax::Double(b)) => {
            assert_eq!(a.offset.to_bits(), b.offset.to_bits(), "{what}: DQ offset {} vs {}", a.offset, b.offset);
            assert_eq!(a.nested_blocksize, b.nested_blocksize, "{what}: nested blocksize");
            assert_eq!(bits(&a.nested_absmax), bits(&b.nested_absmax), "{what}: nested absmax");
            assert_eq!(bits(&a.map[..]), bits(&b.map[..]), "{what}: nested map");
            if let Some(i) = first_diff(&a.codes, &b.codes) {
                panic!("{what}: DQ code {i}: kernel {}, CPU {}", a.codes[i], b.codes[i]);
            }
        }
        _ => panic!("{what}: one is double-quantized, the other not"),
    }
}

const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Element counts for one blocksize: single partial blocks, odd counts,
/// exact multiples, a multiple plus a short tail, and a multi-CTA size.
fn counts(bs: usize) -> Vec<usize> {
    let mut v = vec![1, 3, 31, bs - 1, bs, bs + 1, 3 * bs, 5 * bs + 17, 7 * bs + bs / 2 + 1, 64 * bs + 33];
    v.sort();
    v.dedup();
    v
}

// -------------------------------------------------------------------- tests

#[test]
fn quantize_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu("quantize_matches_cpu_bit_for_bit") else { return };
    let mut rng = Rng(0x5eed_0001);
    let mut cases = 0;
    for dtype in DTYPES {
        for bs in BLOCKSIZES {
            for n in counts(bs) {
                let what = format!("quantize {dtype:?} n={n} bs={bs}");
                let host = Host::from_f32(&random_values(&mut rng, n, dtype), dtype);
                let x = host.elems();
                let cpu = Nf4Tensor::quantize(x, &[n], Nf4Params { blocksize: bs, double_quant: false }).unwrap();

                // Device API into poisoned outputs.
                let xd = DevBuffer::upload(dev, x).unwrap();
                let mut packed = dev.alloc_filled::<u8>(n.div_ceil(2), 0xFF).unwrap();
                let mut absmax = dev.alloc_filled::<f32>(n.div_ceil(bs), 0xFF).unwrap();
                gnf4::quantize(dev, &xd.view(), bs, &mut packed.as_view_mut(), &mut absmax.as_view_mut()).unwrap();
                let gpu = Nf4Tensor::from_parts(vec![n], dtype, bs, dev.download(&packed).unwrap(), Absmax::F32(dev.download(&absmax).unwrap())).unwrap();
                assert_same_nf4(&what, &gpu, &cpu);

                // Host wrapper with double quantization (offset on the host).
                let p = Nf4Params { blocksize: bs, double_quant: true };
                let cpu_dq = Nf4Tensor::quantize(x, &[n], p).unwrap();
                let gpu_dq = gnf4::quantize_host(dev, x, &[n], p).unwrap();
                assert_same_nf4(&format!("{what} dq"), &gpu_dq, &cpu_dq);
                cases += 1;
            }
        }
    }
    // A 2-D weight of a realistic size, bf16, default parameters.
    let (r, c) = (1024, 4096);
    let host = Host::from_f32(&random_values(&mut rng, r * c, DType::BF16), DType::BF16);
    let cpu = Nf4Tensor::quantize(host.elems(), &[r, c], Nf4Params::default()).unwrap();
    let gpu = gnf4::quantize_host(dev, host.elems(), &[r, c], Nf4Params::default()).unwrap();
    assert_same_nf4("quantize bf16 [1024, 4096] default params", &gpu, &cpu);
    eprintln!("quantize: {} cases bit-exact", cases + 1);
}

#[test]
fn quantize_host_refuses_what_the_cpu_refuses() {
    let Some(dev) = gpu("quantize_host_refuses_what_the_cpu_refuses") else { return };
    let mut v = vec![0.5f32; 100];
    v[37] = f32::NAN;
    let e = gnf4::quantize_host(dev, Elems::F32(&v), &[100], Nf4Params::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NonFinite);
    assert!(e.message.contains("37"), "{}", e.message);
    let e = gnf4::quantize_host(dev, Elems::F32(&v[..64]), &[64], Nf4Params { blocksize: 48, double_quant: false }).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidBlocksize);
    let e = gnf4::quantize_host(dev, Elems::F32(&v[..64]), &[65], Nf4Params::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BufferSize);
}

/// CPU-quantized random tensors (plain and double-quantized) for the
/// dequantize / decode / GEMV tests.
fn random_tensors(rng: &mut Rng) -> Vec<(String, Nf4Tensor)> {
    let mut out = Vec::new();
    for dtype in DTYPES {
        for bs in BLOCKSIZES {
            for n in counts(bs) {
                let host = Host::from_f32(&random_values(rng, n, dtype), dtype);
                let dq = rng.below(2) == 0;
                let t = Nf4Tensor::quantize(host.elems(), &[n], Nf4Params { blocksize: bs, double_quant: dq }).unwrap();
                out.push((format!("{dtype:?} n={n} bs={bs} dq={dq}"), t));
            }
        }
    }
    out
}

/// The CPU dequantization of `t` into `dtype`, as bytes.
fn cpu_dequant_bytes(t: &Nf4Tensor, dtype: DType) -> Vec<u8> {
    let n = t.numel();
    match dtype {
        DType::F32 => {
            let mut o = vec![0f32; n];
            t.dequantize_into(ElemsMut::F32(&mut o)).unwrap();
            o.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        DType::F16 => {
            let mut o = vec![f16::ZERO; n];
            t.dequantize_into(ElemsMut::F16(&mut o)).unwrap();
            o.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        DType::BF16 => {
            let mut o = vec![bf16::ZERO; n];
            t.dequantize_into(ElemsMut::BF16(&mut o)).unwrap();
            o.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
    }
}

/// The GPU dequantization of `t` into `dtype` through the device API (into
/// a poisoned buffer), as bytes.
fn gpu_dequant_bytes(dev: &CudaDevice, t: &Nf4Tensor, dtype: DType) -> Vec<u8> {
    let n = t.numel();
    let w = gnf4::CudaNf4::upload(dev, t).unwrap();
    let mut out = DevBuffer::filled(dev, dtype, n, 0xFF).unwrap();
    w.dequantize_into(dev, &mut out.view_mut()).unwrap();
    match &out {
        DevBuffer::F32(s) => dev.download(s).unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DevBuffer::F16(s) | DevBuffer::BF16(s) => dev.download(s).unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn assert_same_bytes(what: &str, gpu: &[u8], cpu: &[u8], elem: usize) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: byte count");
    if let Some(i) = first_diff(gpu, cpu) {
        let e = i / elem;
        panic!("{what}: element {e} differs: kernel {:02x?}, CPU {:02x?}", &gpu[e * elem..(e + 1) * elem], &cpu[e * elem..(e + 1) * elem]);
    }
}

#[test]
fn dequantize_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu("dequantize_matches_cpu_bit_for_bit") else { return };
    let mut rng = Rng(0x5eed_0002);
    let tensors = random_tensors(&mut rng);
    for (name, t) in &tensors {
        for dtype in DTYPES {
            let what = format!("dequantize {name} -> {dtype:?}");
            assert_same_bytes(&what, &gpu_dequant_bytes(dev, t, dtype), &cpu_dequant_bytes(t, dtype), dtype.size());
        }
    }
    // The host wrapper, on a 2-D bf16 weight.
    let host = Host::from_f32(&random_values(&mut rng, 512 * 1000, DType::BF16), DType::BF16);
    let t = Nf4Tensor::quantize(host.elems(), &[512, 1000], Nf4Params::default()).unwrap();
    let mut o = vec![bf16::ZERO; t.numel()];
    gnf4::dequantize_host(dev, &t, ElemsMut::BF16(&mut o)).unwrap();
    let got: Vec<u8> = o.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_same_bytes("dequantize_host bf16 [512, 1000]", &got, &cpu_dequant_bytes(&t, DType::BF16), 2);
    eprintln!("dequantize: {} tensors x 3 dtypes bit-exact", tensors.len());
}

/// The strided bf16 dequantization (a 2-D weight written into the first
/// columns of wider rows, for the folded adapter products) writes each row
/// as the contiguous one does, bit for bit, and leaves the other columns as
/// they were; from plain and double-quantized scales, with blocks that
/// straddle rows.
#[test]
fn strided_dequantize_writes_the_contiguous_rows() {
    let Some(dev) = gpu("strided_dequantize_writes_the_contiguous_rows") else { return };
    let mut rng = Rng(0x5eed_0007);
    for &(rows, cols, bs) in &[(1usize, 32usize, 64usize), (3, 96, 64), (7, 160, 128), (5, 2048, 64), (9, 64, 4096)] {
        for dq in [false, true] {
            let host = Host::from_f32(&random_values(&mut rng, rows * cols, DType::BF16), DType::BF16);
            let t = Nf4Tensor::quantize(host.elems(), &[rows, cols], Nf4Params { blocksize: bs, double_quant: dq }).unwrap();
            let want = cpu_dequant_bytes(&t, DType::BF16);
            let w = gnf4::CudaNf4::upload(dev, &t).unwrap();
            for ld in [cols, cols + 8, cols + 40] {
                let mut out = dev.alloc_filled::<u16>(rows * ld, 0xFF).unwrap();
                w.dequantize_bf16_ld(dev, &mut out.as_view_mut(), ld).unwrap();
                let got = dev.download(&out).unwrap();
                for r in 0..rows {
                    let row: Vec<u8> = got[r * ld..r * ld + cols].iter().flat_map(|x| x.to_le_bytes()).collect();
                    assert_same_bytes(&format!("strided dequantize [{rows}, {cols}] bs={bs} dq={dq} ld={ld} row {r}"), &row, &want[r * cols * 2..(r + 1) * cols * 2], 2);
                    assert!(got[r * ld + cols..(r + 1) * ld].iter().all(|&v| v == 0xFFFF), "strided dequantize ld={ld}: row {r}'s other columns written");
                }
            }
        }
    }
    // Refusals: a width not a multiple of 32, a row stride not a multiple
    // of 8 or below the width, a buffer of another size, a 1-D tensor.
    let host = Host::from_f32(&random_values(&mut rng, 4 * 48, DType::BF16), DType::BF16);
    let t48 = gnf4::CudaNf4::upload(dev, &Nf4Tensor::quantize(host.elems(), &[4, 48], Nf4Params::default()).unwrap()).unwrap();
    let mut o = dev.alloc_filled::<u16>(4 * 64, 0xFF).unwrap();
    assert_eq!(t48.dequantize_bf16_ld(dev, &mut o.as_view_mut(), 64).unwrap_err().kind, ErrorKind::InvalidShape);
    let host = Host::from_f32(&random_values(&mut rng, 4 * 64, DType::BF16), DType::BF16);
    let t64 = gnf4::CudaNf4::upload(dev, &Nf4Tensor::quantize(host.elems(), &[4, 64], Nf4Params::default()).unwrap()).unwrap();
    let mut o = dev.alloc_filled::<u16>(4 * 68, 0xFF).unwrap();
    assert_eq!(t64.dequantize_bf16_ld(dev, &mut o.as_view_mut(), 68).unwrap_err().kind, ErrorKind::InvalidShape);
    let mut o = dev.alloc_filled::<u16>(4 * 56, 0xFF).unwrap();
    assert_eq!(t64.dequantize_bf16_ld(dev, &mut o.as_view_mut(), 56).unwrap_err().kind, ErrorKind::InvalidShape);
    let mut o = dev.alloc_filled::<u16>(4 * 72 + 1, 0xFF).unwrap();
    assert_eq!(t64.dequantize_bf16_ld(dev, &mut o.as_view_mut(), 72).unwrap_err().kind, ErrorKind::BufferSize);
    let flat = gnf4::CudaNf4::upload(dev, &Nf4Tensor::quantize(host.elems(), &[256], Nf4Params::default()).unwrap()).unwrap();
    let mut o = dev.alloc_filled::<u16>(256, 0xFF).unwrap();
    assert_eq!(flat.dequantize_bf16_ld(dev, &mut o.as_view_mut(), 256).unwrap_err().kind, ErrorKind::InvalidShape);
}

#[test]
fn dequantize_checks_sizes_and_alignment() {
    let Some(dev) = gpu("dequantize_checks_sizes_and_alignment") else { return };
    let n = 256;
    let packed = dev.alloc_filled::<u8>(n / 2 + 16, 0x77).unwrap();
    let absmax = dev.upload(&[1.0f32; 8]).unwrap();
    let mut out = DevBuffer::filled(dev, DType::F32, n, 0xFF).unwrap();
    // Wrong packed length.
    let e = gnf4::dequantize(dev, &packed.as_view(), &absmax.slice(0..4), 64, &mut out.view_mut()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BufferSize, "{}", e.message);
    // Codes not 16-byte aligned.
    let e = gnf4::dequantize(dev, &packed.slice(1..1 + n / 2), &absmax.slice(0..4), 64, &mut out.view_mut()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{}", e.message);
    // A buffer of another CudaDevice (another stream) is refused.
    let other = cuda::open(0).unwrap();
    let foreign = other.alloc_filled::<u8>(n / 2, 0x77).unwrap();
    let e = gnf4::dequantize(dev, &foreign.as_view(), &absmax.slice(0..4), 64, &mut out.view_mut()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{}", e.message);
    // The correct call works on aligned views.
    gnf4::dequantize(dev, &packed.slice(16..16 + n / 2), &absmax.slice(0..4), 64, &mut out.view_mut()).unwrap();
    let DevBuffer::F32(o) = &out else { unreachable!() };
    let o = dev.download(o).unwrap();
    // 0x77: codes 7 and 7 (0.0).
    assert!(o.iter().all(|&v| v == 0.0), "{:?}", &o[..8]);
}

#[test]
fn absmax_decode_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu("absmax_decode_matches_cpu_bit_for_bit") else { return };
    let mut rng = Rng(0x5eed_0003);
    let mut cases = 0;
    // From real double quantization of random tensors.
    for (name, t) in random_tensors(&mut rng) {
        if let Absmax::Double(d) = t.absmax() {
            let got = gnf4::absmax_decode_host(dev, d).unwrap();
            let want = d.decode();
            if let Some(i) = first_diff(&bits(&got), &bits(&want)) {
                panic!("absmax decode {name}: value {i}: GPU {:e}, CPU {:e}", got[i], want[i]);
            }
            cases += 1;
        }
    }
    // Synthetic states: random codes, map, scales, offsets and nested
    // blocksizes that are not 256 (files may carry any).
    for (n, nbs) in [(1usize, 256usize), (255, 256), (257, 256), (10_000, 256), (1000, 100), (999, 7), (64, 1)] {
        let map: Box<[f32; 256]> = Box::new(std::array::from_fn(|_| (rng.gauss() * 0.5) as f32));
        let d = DoubleQuant {
            codes: (0..n).map(|_| rng.below(256) as u8).collect(),
            nested_absmax: (0..n.div_ceil(nbs)).map(|_| (rng.unit() * 10.0) as f32 + 1e-3).collect(),
            offset: (rng.gauss() * 3.0) as f32,
            nested_blocksize: nbs,
            map,
        };
        let got = gnf4::absmax_decode_host(dev, &d).unwrap();
        let want = d.decode();
        if let Some(i) = first_diff(&bits(&got), &bits(&want)) {
            panic!("synthetic absmax decode n={n} nbs={nbs}: value {i}: GPU {:e}, CPU {:e}", got[i], want[i]);
        }
        cases += 1;
    }
    eprintln!("absmax decode: {cases} cases bit-exact");
}

/// Checks GEMV outputs against the exact product of `w` (the CPU's
/// dequantization, fp32) with `x`, computed in f64:
/// - per output, the rigorous bound `|y - exact| <= rel·|exact| + sum_tol·Σ|w x|`;
/// - over the vector, `‖y - exact‖ <= GEMV_RMS_REL_TOL·‖exact‖`.
#[allow(clippy::too_many_arguments)]
fn check_gemv(what: &str, y: &[bf16], w: &[f32], x: &[f32], rows: usize, cols: usize, rel: f64, sum_tol: f64) {
    /// For seeded random inputs the error is dominated by the bf16 output
    /// rounding, ≈ 2^-9/√3 ≈ 0.0011 rms relative; 2^-8 leaves 3.5× room and
    /// still catches a wrong scale or a dropped chunk.
    const GEMV_RMS_REL_TOL: f64 = 1.0 / 256.0;
    let (mut err2, mut ref2) = (0f64, 0f64);
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let exact: f64 = row.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let mag: f64 = row.iter().zip(x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        let got = y[r].to_f64();
        let bound = rel * exact.abs() + sum_tol * mag;
        assert!(got.is_finite() && (got - exact).abs() <= bound, "{what}: row {r}: GPU {got:e}, exact {exact:e}, |diff| {:e} > bound {bound:e}", (got - exact).abs());
        err2 += (got - exact).powi(2);
        ref2 += exact * exact;
    }
    if rows >= 16 {
        let rel_norm = (err2 / ref2).sqrt();
        assert!(rel_norm <= GEMV_RMS_REL_TOL, "{what}: relative error norm {rel_norm:e} > {GEMV_RMS_REL_TOL:e}");
    }
}

/// Random bf16 x (never zero) and its f32 values.
fn random_x(rng: &mut Rng, cols: usize) -> (Vec<bf16>, Vec<f32>) {
    let xb: Vec<bf16> = (0..cols).map(|_| bf16::from_f32(rng.gauss() as f32)).map(|v| if v.to_f32() == 0.0 { bf16::from_f32(0.01) } else { v }).collect();
    let xf = xb.iter().map(|v| v.to_f32()).collect();
    (xb, xf)
}

const GEMV_SHAPES: [(usize, usize); 9] = [(1, 32), (4, 64), (33, 96), (64, 4096), (37, 1000), (5, 31), (256, 11008), (3, 4128), (130, 544)];

#[test]
fn nf4_gemv_matches_cpu_within_bound() {
    let Some(dev) = gpu("nf4_gemv_matches_cpu_within_bound") else { return };
    let mut rng = Rng(0x5eed_0004);
    let mut cases = 0;
    for (rows, cols) in GEMV_SHAPES {
        for bs in [32usize, 64, 256, 4096] {
            for dq in [false, true] {
                let what = format!("nf4 gemv [{rows}, {cols}] bs={bs} dq={dq}");
                let dtype = DTYPES[rng.below(3)];
                // Weight magnitudes from fp16's range for every dtype, so a
                // row's sum never nears fp32/bf16 overflow.
                let host = Host::from_f32(&random_values(&mut rng, rows * cols, DType::F16), dtype);
                let t = Nf4Tensor::quantize(host.elems(), &[rows, cols], Nf4Params { blocksize: bs, double_quant: dq }).unwrap();
                let w = t.dequantize_f32();
                let (xb, xf) = random_x(&mut rng, cols);
                let mut y = vec![bf16::from_bits(0xFFFF); rows];
                gnf4::gemv_bf16_host(dev, &t, &xb, &mut y).unwrap();
                check_gemv(&what, &y, &w, &xf, rows, cols, gnf4::GEMV_REL_TOL, gnf4::gemv_sum_tol(cols));
                // A batch of decode rows in one launch: each vector the bits
                // of its own launch (the first one is x above).
                let nb = [2usize, 5, gnf4::GEMV_MAX_BATCH][rng.below(3)];
                let mut xs = xb.clone();
                for _ in 1..nb {
                    xs.extend(random_x(&mut rng, cols).0);
                }
                let mut yb = vec![bf16::from_bits(0xFFFF); nb * rows];
                gnf4::gemv_bf16_host(dev, &t, &xs, &mut yb).unwrap();
                for k in 0..nb {
                    let mut yk = vec![bf16::from_bits(0xFFFF); rows];
                    gnf4::gemv_bf16_host(dev, &t, &xs[k * cols..(k + 1) * cols], &mut yk).unwrap();
                    assert_eq!(yk, yb[k * rows..(k + 1) * rows], "{what}: vector {k} of a batch of {nb} differs from its own launch");
                }
                if dq {
                    // Scales decoded where the kernel reads them: the bits
                    // of the decode pass, then the fp32-scale kernel.
                    let wd = gnf4::CudaNf4::upload(dev, &t).unwrap();
                    let a = wd.absmax_f32(dev).unwrap();
                    let xd = dev.upload(&xs.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()).unwrap();
                    let mut yd = dev.alloc_filled::<u16>(nb * rows, 0xFF).unwrap();
                    gnf4::gemv_bf16_batch(dev, &wd.packed.as_view(), &a.as_view(), bs, rows, cols, nb, &xd.as_view(), &mut yd.as_view_mut()).unwrap();
                    let two: Vec<u16> = dev.download(&yd).unwrap();
                    assert_eq!(two, yb.iter().map(|v| v.to_bits()).collect::<Vec<u16>>(), "{what}: the fused scale decode differs from decode, then GEMV");
                }
                cases += 1;
            }
        }
    }
    eprintln!("nf4 gemv: {cases} cases within bound");
}

#[test]
fn dense_gemv_matches_cpu_within_bound() {
    let Some(dev) = gpu("dense_gemv_matches_cpu_within_bound") else { return };
    let mut rng = Rng(0x5eed_0005);
    for (rows, cols) in GEMV_SHAPES.into_iter().chain([(17, 7), (8, 4104)]) {
        let what = format!("dense gemv [{rows}, {cols}]");
        let wb: Vec<bf16> = random_values(&mut rng, rows * cols, DType::F16).iter().map(|&v| bf16::from_f32(v)).collect();
        let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let (xb, xf) = random_x(&mut rng, cols);
        let wd = dev.upload(&wb.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()).unwrap();
        let xd = dev.upload(&xb.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()).unwrap();
        let mut yd = dev.alloc_filled::<u16>(rows, 0xFF).unwrap();
        dense::gemv_bf16(dev, &wd.as_view(), rows, cols, &xd.as_view(), &mut yd.as_view_mut()).unwrap();
        let y: Vec<bf16> = dev.download(&yd).unwrap().into_iter().map(bf16::from_bits).collect();
        check_gemv(&what, &y, &wf, &xf, rows, cols, dense::DENSE_GEMV_REL_TOL, dense::dense_gemv_sum_tol(cols));
    }
}

#[test]
fn device_resident_tensor_round_trips() {
    let Some(dev) = gpu("device_resident_tensor_round_trips") else { return };
    let mut rng = Rng(0x5eed_0006);
    for dtype in DTYPES {
        let n = 3 * 4096 + 77;
        let host = Host::from_f32(&random_values(&mut rng, n, dtype), dtype);
        for dq in [false, true] {
            let p = Nf4Params { blocksize: 128, double_quant: dq };
            let cpu = Nf4Tensor::quantize(host.elems(), &[n], p).unwrap();
            // Quantize from a device buffer, stay on the device, come back.
            let xd = DevBuffer::upload(dev, host.elems()).unwrap();
            let t = gnf4::CudaNf4::quantize(dev, &xd.view(), &[n], p).unwrap();
            assert_same_nf4(&format!("CudaNf4::quantize {dtype:?} dq={dq}"), &t.download(dev).unwrap(), &cpu);
            // Upload then download is the identity.
            let back = gnf4::CudaNf4::upload(dev, &cpu).unwrap().download(dev).unwrap();
            assert_same_nf4(&format!("upload/download {dtype:?} dq={dq}"), &back, &cpu);
        }
    }
    // Views: dequantize into the middle of a larger buffer leaves the rest.
    let host = Host::from_f32(&random_values(&mut rng, 1000, DType::F32), DType::F32);
    let t = Nf4Tensor::quantize(host.elems(), &[1000], Nf4Params { blocksize: 64, double_quant: false }).unwrap();
    let w = gnf4::CudaNf4::upload(dev, &t).unwrap();
    let mut big = dev.alloc_filled::<f32>(1000 + 8, 0xFF).unwrap();
    {
        let mut v = DevElemsMut::F32(big.slice_mut(4..1004));
        w.dequantize_into(dev, &mut v).unwrap();
    }
    let got = dev.download(&big).unwrap();
    let want = t.dequantize_f32();
    assert_eq!(bits(&got[4..1004]), bits(&want), "dequantize into a view");
    assert!(got[..4].iter().chain(&got[1004..]).all(|v| v.to_bits() == 0xFFFF_FFFF), "wrote outside the view");
}

// ---------------------------------------------------------------- fixtures

macro_rules! fixtures {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nf4/", $name)) as &[u8])),*]
    };
}

/// tests/fixtures/nf4, embedded so the test binary runs anywhere.
static FIXTURES: &[(&str, &[u8])] = fixtures!(
    "bf16_bs64.safetensors",
    "bs1024_f32.safetensors",
    "bs128_f32.safetensors",
    "bs2048_bf16.safetensors",
    "bs256_f32.safetensors",
    "bs4096_bf16.safetensors",
    "bs512_f16.safetensors",
    "dq_near_mean_f32_bs32.safetensors",
    "f16_bs64.safetensors",
    "gauss_f32_bs64.safetensors",
    "huge_bf16_bs64.safetensors",
    "huge_f32_bs64.safetensors",
    "midpoint_ties_f32_bs64.safetensors",
    "near_max_f32_bs64.safetensors",
    "negmax_f32_bs64.safetensors",
    "odd_f32_bs64.safetensors",
    "single_block_f32_bs64.safetensors",
    "student_t3_f32_bs32.safetensors",
    "subnormal_f32_bs64.safetensors",
    "tiny1d_f32_bs64.safetensors",
    "tiny_f32_bs64.safetensors",
    "vec1d_f32_bs64.safetensors",
    "vec1d_odd_f32_bs64.safetensors",
    "zero_blocks_f32_bs64.safetensors",
);

/// The embedded list is the fixture directory (where the source tree is at
/// hand), so a new fixture cannot be left out of the GPU check.
#[test]
fn embedded_fixtures_are_the_fixture_directory() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        eprintln!("SKIPPED embedded_fixtures_are_the_fixture_directory: {} not present", dir.display());
        return;
    };
    let mut on_disk: Vec<String> = rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".safetensors")).collect();
    on_disk.sort();
    let embedded: Vec<String> = FIXTURES.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(on_disk, embedded, "add new fixtures to FIXTURES in tests/cuda_nf4.rs");
}

fn fixture_input(f: &StFile) -> (Host, Vec<usize>) {
    let t = f.get("input").unwrap();
    let shape = t.shape().to_vec();
    let b = t.data();
    let host = match DType::from_safetensors(t.dtype()).unwrap() {
        DType::F32 => Host::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
        DType::F16 => Host::F16(b.chunks_exact(2).map(|c| f16::from_le_bytes(c.try_into().unwrap())).collect()),
        DType::BF16 => Host::BF16(b.chunks_exact(2).map(|c| bf16::from_le_bytes(c.try_into().unwrap())).collect()),
    };
    (host, shape)
}

#[test]
fn fixtures_match_bitsandbytes_on_gpu() {
    let Some(dev) = gpu("fixtures_match_bitsandbytes_on_gpu") else { return };
    let dir = std::env::temp_dir().join(format!("lora-cuda-nf4-fixtures-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in FIXTURES {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let f = StFile::open(&path).unwrap();
        let (host, shape) = fixture_input(&f);
        for (prefix, dq) in [("nodq", false), ("dq", true)] {
            let theirs = nf4_file::load(&f, prefix).unwrap();
            let p = Nf4Params { blocksize: theirs.blocksize(), double_quant: dq };
            let ours = gnf4::quantize_host(dev, host.elems(), &shape, p).unwrap();
            assert_same_nf4(&format!("{name} {prefix}: GPU quantize vs bitsandbytes"), &ours, &theirs);
            let want = f.get(&format!("{prefix}.dequant")).unwrap();
            let dtype = DType::from_safetensors(want.dtype()).unwrap();
            assert_same_bytes(&format!("{name} {prefix}: GPU dequantize vs bitsandbytes"), &gpu_dequant_bytes(dev, &theirs, dtype), want.data(), dtype.size());
            if let Absmax::Double(d) = theirs.absmax() {
                let got = gnf4::absmax_decode_host(dev, d).unwrap();
                assert_eq!(bits(&got), bits(&f.read_f32("dq.absmax_decoded").unwrap()), "{name}: GPU absmax decode vs bitsandbytes");
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    eprintln!("fixtures: {} files bit-exact with bitsandbytes on the GPU", FIXTURES.len());
}

// ------------------------------------------------------- CPU emulation
//
// Without a GPU the kernels' logic (indexing, packing, reductions, partial
// blocks, tails) is still checked: the .cu sources are compiled as C++ for
// the host against a small shim that runs every CUDA thread of a block as an
// OS thread (`__syncthreads` and the warp shuffles are barriers), launched
// with the very launch shapes the GPU launchers use, and compared with the
// CPU spec like the GPU results. Host fp32 arithmetic is IEEE
// round-to-nearest without FMA contraction (-ffp-contract=off), as the
// kernels' explicit `_rn` intrinsics are on the GPU. What this cannot check:
// the GPU's own instructions, memory model, alignment faults, the Rust-side
// argument marshalling; the GPU tests above do.
//
// Needs a C++20 compiler (`c++`, or $CXX); skipped with a message when there
// is none or when LORA_SKIP_CUDA_EMULATION=1 (the GPU check sets it: the GPU
// runs the real kernels).

const EMU_ENTRY: &str = r#"
extern "C" {
void emu_nf4_quantize(int dt, unsigned g, unsigned b, const void* x, u64 n, u32 bs, u8* packed, float* absmax) {
    emu_launch(g, b, [&] {
        if (dt == 0) nf4_quantize_f32((const float*)x, n, bs, packed, absmax);
        else if (dt == 1) nf4_quantize_f16((const u16*)x, n, bs, packed, absmax);
        else nf4_quantize_bf16((const u16*)x, n, bs, packed, absmax);
    });
}
void emu_nf4_dequantize(int dt, unsigned g, unsigned b, const u8* packed, const float* absmax, u32 shift, u64 n, void* out) {
    emu_launch(g, b, [&] {
        if (dt == 0) nf4_dequantize_f32(packed, absmax, shift, n, (float*)out);
        else if (dt == 1) nf4_dequantize_f16(packed, absmax, shift, n, (u16*)out);
        else nf4_dequantize_bf16(packed, absmax, shift, n, (u16*)out);
    });
}
void emu_nf4_absmax_decode(unsigned g, unsigned b, const u8* codes, const float* map, const float* nested, u64 nbs, float offset, u64 n, float* out) {
    emu_launch(g, b, [&] { nf4_absmax_decode(codes, map, nested, nbs, offset, n, out); });
}
void emu_nf4_gemv_bf16(unsigned g, unsigned b, const u8* packed, const float* absmax, u32 shift, u32 rows, u32 in, u32 nb, const u16* x, u16* y) {
    emu_launch(g, b, [&] { nf4_gemv_bf16(packed, absmax, shift, rows, in, nb, x, y); });
}
void emu_dense_gemv_bf16(unsigned g, unsigned b, const u16* w, u32 rows, u32 in, const u16* x, u16* y) {
    emu_launch(g, b, [&] { dense_gemv_bf16(w, rows, in, x, y); });
}
}
"#;

struct Emu {
    _lib: libloading::Library,
    quantize: unsafe extern "C" fn(i32, u32, u32, *const u8, u64, u32, *mut u8, *mut f32),
    dequantize: unsafe extern "C" fn(i32, u32, u32, *const u8, *const f32, u32, u64, *mut u8),
    decode: unsafe extern "C" fn(u32, u32, *const u8, *const f32, *const f32, u64, f32, u64, *mut f32),
    gemv: unsafe extern "C" fn(u32, u32, *const u8, *const f32, u32, u32, u32, u32, *const u16, *mut u16),
    dense: unsafe extern "C" fn(u32, u32, *const u16, u32, u32, *const u16, *mut u16),
}

/// Builds (once per process) the host emulation of the kernels, or says
/// why it skips.
fn emu(test: &str) -> Option<&'static Emu> {
    static EMU: OnceLock<Result<Emu, String>> = OnceLock::new();
    let r = EMU.get_or_init(|| {
        // The kernels these tests emulate (the other families have GPU
        // tests of their own; attention_tc.cu has its own emulated test).
        let lib = emu::build("nf4", &["nf4.cu", "dense.cu"], &emu::SUBST, "", EMU_ENTRY)?;
        // SAFETY: the library was just built from the sources above; its
        // entry points have the signatures declared in `Emu`.
        unsafe {
            Ok(Emu {
                quantize: *lib.get(b"emu_nf4_quantize").unwrap(),
                dequantize: *lib.get(b"emu_nf4_dequantize").unwrap(),
                decode: *lib.get(b"emu_nf4_absmax_decode").unwrap(),
                gemv: *lib.get(b"emu_nf4_gemv_bf16").unwrap(),
                dense: *lib.get(b"emu_dense_gemv_bf16").unwrap(),
                _lib: lib,
            })
        }
    });
    match r {
        Ok(e) => Some(e),
        Err(why) => {
            eprintln!("SKIPPED {test}: kernel emulation unavailable: {why}");
            None
        }
    }
}

fn dt_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// Raw little-endian bytes of host data.
fn host_bytes(h: &Host) -> Vec<u8> {
    match h {
        Host::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Host::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Host::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Smaller counts than on the GPU (every CUDA thread is an OS thread here).
fn emu_counts(bs: usize) -> Vec<usize> {
    let mut v = vec![1, 3, bs - 1, bs, bs + 1, 3 * bs + 17, 2 * bs + bs / 2 + 1, 9 * bs + 32];
    v.sort();
    v.dedup();
    v
}

#[test]
fn emulated_quantize_and_dequantize_match_cpu_bit_for_bit() {
    let Some(emu) = emu("emulated_quantize_and_dequantize_match_cpu_bit_for_bit") else { return };
    let mut rng = Rng(0x5eed_e001);
    let mut cases = 0;
    for dtype in DTYPES {
        for bs in [32usize, 64, 128, 512, 4096] {
            for n in emu_counts(bs) {
                let what = format!("emulated {dtype:?} n={n} bs={bs}");
                let host = Host::from_f32(&random_values(&mut rng, n, dtype), dtype);
                let cpu = Nf4Tensor::quantize(host.elems(), &[n], Nf4Params { blocksize: bs, double_quant: false }).unwrap();
                let xb = host_bytes(&host);
                let mut packed = vec![0xFFu8; n.div_ceil(2)];
                let mut absmax = vec![f32::NAN; n.div_ceil(bs)];
                let (g, b) = gnf4::quantize_shape(n, bs).unwrap();
                // SAFETY: buffers sized as the kernel expects for n and bs.
                unsafe { (emu.quantize)(dt_code(dtype), g, b, xb.as_ptr(), n as u64, bs as u32, packed.as_mut_ptr(), absmax.as_mut_ptr()) };
                let got = Nf4Tensor::from_parts(vec![n], dtype, bs, packed, Absmax::F32(absmax)).unwrap();
                assert_same_nf4(&format!("{what} quantize"), &got, &cpu);
                let Absmax::F32(am) = cpu.absmax() else { unreachable!() };
                for od in DTYPES {
                    let mut out = vec![0xFFu8; n * od.size()];
                    let (g, b) = gnf4::dequantize_shape(n).unwrap();
                    // SAFETY: as above; out holds n elements of od.
                    unsafe { (emu.dequantize)(dt_code(od), g, b, cpu.packed().as_ptr(), am.as_ptr(), bs.trailing_zeros(), n as u64, out.as_mut_ptr()) };
                    assert_same_bytes(&format!("{what} dequantize -> {od:?}"), &out, &cpu_dequant_bytes(&cpu, od), od.size());
                }
                cases += 1;
            }
        }
    }
    eprintln!("emulation: {cases} quantize cases and {} dequantize cases bit-exact", cases * 3);
}

#[test]
fn emulated_absmax_decode_matches_cpu_bit_for_bit() {
    let Some(emu) = emu("emulated_absmax_decode_matches_cpu_bit_for_bit") else { return };
    let mut rng = Rng(0x5eed_e002);
    for (n, nbs) in [(1usize, 256usize), (257, 256), (3000, 256), (1000, 100), (999, 7)] {
        let map: Box<[f32; 256]> = Box::new(std::array::from_fn(|_| (rng.gauss() * 0.5) as f32));
        let d = DoubleQuant {
            codes: (0..n).map(|_| rng.below(256) as u8).collect(),
            nested_absmax: (0..n.div_ceil(nbs)).map(|_| (rng.unit() * 10.0) as f32 + 1e-3).collect(),
            offset: (rng.gauss() * 3.0) as f32,
            nested_blocksize: nbs,
            map,
        };
        let mut out = vec![f32::NAN; n];
        let (g, b) = gnf4::absmax_decode_shape(n);
        // SAFETY: buffers sized for n codes and n/nbs nested scales.
        unsafe { (emu.decode)(g, b, d.codes.as_ptr(), d.map.as_ptr(), d.nested_absmax.as_ptr(), nbs as u64, d.offset, n as u64, out.as_mut_ptr()) };
        assert_eq!(bits(&out), bits(&d.decode()), "emulated absmax decode n={n} nbs={nbs}");
    }
}

#[test]
fn emulated_gemvs_match_cpu_within_bound() {
    let Some(emu) = emu("emulated_gemvs_match_cpu_within_bound") else { return };
    let mut rng = Rng(0x5eed_e003);
    for (rows, cols) in [(4usize, 64usize), (33, 96), (5, 31), (6, 4128), (17, 1000)] {
        for bs in [32usize, 64, 4096] {
            let what = format!("emulated nf4 gemv [{rows}, {cols}] bs={bs}");
            let host = Host::from_f32(&random_values(&mut rng, rows * cols, DType::F16), DType::BF16);
            let t = Nf4Tensor::quantize(host.elems(), &[rows, cols], Nf4Params { blocksize: bs, double_quant: false }).unwrap();
            let Absmax::F32(am) = t.absmax() else { unreachable!() };
            // nb vectors in one launch: each within the bound, and each the
            // bits of its own nb = 1 launch.
            let nb = [1usize, 3, gnf4::GEMV_MAX_BATCH][rng.below(3)];
            let xs: Vec<(Vec<bf16>, Vec<f32>)> = (0..nb).map(|_| random_x(&mut rng, cols)).collect();
            let xu: Vec<u16> = xs.iter().flat_map(|(xb, _)| xb.iter().map(|v| v.to_bits())).collect();
            let (g, b) = gnf4::gemv_shape(rows).unwrap();
            let gemv = |x: &[u16], nb: usize| -> Vec<u16> {
                let mut y = vec![0xFFFFu16; nb * rows];
                // SAFETY: weight [rows, cols] in blocks of bs; x nb·cols; y nb·rows.
                unsafe { (emu.gemv)(g, b, t.packed().as_ptr(), am.as_ptr(), bs.trailing_zeros(), rows as u32, cols as u32, nb as u32, x.as_ptr(), y.as_mut_ptr()) };
                y
            };
            let y = gemv(&xu, nb);
            for (k, (_, xf)) in xs.iter().enumerate() {
                let yk: Vec<bf16> = y[k * rows..(k + 1) * rows].iter().map(|&v| bf16::from_bits(v)).collect();
                check_gemv(&format!("{what} vector {k}/{nb}"), &yk, &t.dequantize_f32(), xf, rows, cols, gnf4::GEMV_REL_TOL, gnf4::gemv_sum_tol(cols));
                assert_eq!(gemv(&xu[k * cols..(k + 1) * cols], 1), y[k * rows..(k + 1) * rows], "{what}: vector {k} of a batch of {nb} differs from its own launch");
            }
        }
        let what = format!("emulated dense gemv [{rows}, {cols}]");
        let wb: Vec<bf16> = random_values(&mut rng, rows * cols, DType::F16).iter().map(|&v| bf16::from_f32(v)).collect();
        let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let wu: Vec<u16> = wb.iter().map(|v| v.to_bits()).collect();
        let (xb, xf) = random_x(&mut rng, cols);
        let xu: Vec<u16> = xb.iter().map(|v| v.to_bits()).collect();
        let mut y = vec![0xFFFFu16; rows];
        let (g, b) = dense::gemv_shape(rows).unwrap();
        // SAFETY: w [rows, cols], x cols, y rows.
        unsafe { (emu.dense)(g, b, wu.as_ptr(), rows as u32, cols as u32, xu.as_ptr(), y.as_mut_ptr()) };
        let y: Vec<bf16> = y.into_iter().map(bf16::from_bits).collect();
        check_gemv(&what, &y, &wf, &xf, rows, cols, dense::DENSE_GEMV_REL_TOL, dense::dense_gemv_sum_tol(cols));
    }
}
