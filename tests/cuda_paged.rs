//! Paged memory on CUDA (managed memory, `backend::cuda::paged`), on a GPU:
//! - bytes written on the host, prefetched to the device, changed there by
//!   the device (a memset on the context's stream) and brought back read
//!   as written; fresh buffers are zero;
//! - AdamW over moments in managed buffers at a quarter budget, each
//!   window prefetched to the device and brought back, equals the resident
//!   `optim::AdamW` bit for bit, and the statistics show the moves;
//! - the device budget is kept;
//! - an allocation beyond the device's free memory (counting earlier paged
//!   buffers not yet on the device) fails with `DeviceMemoryExceeded`
//!   (`LORA_ERR_DEVICE_MEMORY_EXCEEDED` through the C API) unless
//!   oversubscription is allowed.
//!
//! Where the device lacks concurrent managed access the fallback is checked
//! instead (flag set, prefetch a no-op, data still right).
//!
//! Without a GPU the tests run on the emulated device (tests/common/gpu.rs;
//! managed memory is host memory there, so they check the bookkeeping, not
//! the migration), or print why they skip.

use lora::backend::cuda::{paged as cpaged, CudaDevice};
use lora::backend::Device;
use lora::memory::{flags, PagedBuf, Pager, PagingConfig, CHUNK_BYTES};
use lora::optim::adamw::adamw_update;
use lora::optim::{AdamW, AdamWConfig, AdamWScalars};
use lora::ErrorKind;
use std::sync::{Arc, OnceLock};

const MIB: usize = 1 << 20;

#[path = "common/gpu.rs"]
mod harness;

/// The device (tests/common/gpu.rs: the GPU, or the emulated one), with
/// its managed-memory facts printed once.
fn gpu(test: &str) -> Option<Arc<CudaDevice>> {
    let d = harness::gpu(test)?;
    static SHOWN: OnceLock<()> = OnceLock::new();
    SHOWN.get_or_init(|| {
        let c = cpaged::concurrent_managed_access(d).expect("cuDeviceGetAttribute");
        let (free, total) = cpaged::mem_info(d).expect("cuMemGetInfo");
        eprintln!("cuda_paged: {}, concurrent managed access {c}, {free} of {total} bytes free", d.describe());
    });
    Some(d.clone())
}

fn pager(dev: &Arc<CudaDevice>, budget: usize, allow: bool) -> Arc<Pager> {
    Pager::new(Device::Cuda(dev.clone()), PagingConfig { budget_bytes: budget as u64, dir: None, allow_oversubscription: allow }).unwrap()
}

fn pattern(seed: u64, i: usize) -> u8 {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (x >> 56) as u8 ^ (i as u8)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn normal_f32(&mut self) -> f32 {
        let u1 = ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

#[test]
fn host_device_round_trip() {
    let Some(dev) = gpu("host_device_round_trip") else { return };
    let p = pager(&dev, 0, false);
    let len = 64 * MIB + 123;
    let mut a = PagedBuf::new(&p, len).unwrap();
    let st = a.stats();
    assert_ne!(st.flags & flags::CUDA_MANAGED, 0);
    assert_eq!(st.bytes_in_memory, None);
    let concurrent = st.flags & flags::NO_CONCURRENT_MANAGED_ACCESS == 0;
    assert!(a.is_cuda() && a.device_ptr() == Some(a.as_ptr() as u64));
    // Fresh managed memory reads as zeros.
    assert!(a.as_bytes(0..len).unwrap().iter().step_by(4093).all(|&x| x == 0), "fresh managed memory is not zero");
    for (i, x) in a.as_bytes_mut(0..len).unwrap().iter_mut().enumerate() {
        *x = pattern(5, i);
    }
    a.prefetch(0..len).unwrap();
    // The device writes 0x5A over [MIB, 3 MIB + 7) on the context's stream.
    let (off, n) = (MIB, 2 * MIB + 7);
    // SAFETY: the range lies inside the managed allocation, which outlives
    // the stream-ordered memset (the accessor below synchronizes).
    unsafe { cudarc::driver::result::memset_d8_async(a.device_ptr().unwrap() + off as u64, 0x5A, n, dev.stream().cu_stream()) }.unwrap();
    // The emulated device keeps stream-ordered work queued until something
    // synchronizes (tests/fakecuda/fake_cuda.cpp), as a busy GPU may: read
    // without a synchronization, the bytes are still the host's. (So there
    // a host access that skips its synchronization reads stale bytes and
    // fails the check below.)
    if harness::emulated() && std::env::var("LORA_FAKECUDA_DEFER").map_or(true, |v| v != "0") {
        // SAFETY: inside the allocation; the emulated device's memory is
        // host memory and its queued memset has not run.
        let before = unsafe { *a.as_ptr().add(off) };
        assert_eq!(before, pattern(5, off), "the emulated device ran a stream-ordered memset before any synchronization");
    }
    let got = a.as_bytes(0..len).unwrap();
    let bad = got.iter().enumerate().filter(|&(i, &x)| x != if (off..off + n).contains(&i) { 0x5A } else { pattern(5, i) }).count();
    assert_eq!(bad, 0, "{bad} bytes differ after the device round trip");
    let st = a.stats();
    eprintln!("round trip: {st:?}");
    if concurrent {
        let chunks = len.div_ceil(CHUNK_BYTES) as u64;
        assert!(st.page_ins >= chunks && st.page_outs >= chunks, "{st:?}");
        assert_eq!(st.bytes_resident, 0, "the host accessor brings the whole range back");
    } else {
        assert_eq!((st.page_ins, st.page_outs), (0, 0), "fallback: no prefetching");
    }
}

#[test]
fn adamw_over_managed_moments_is_bit_identical() {
    let Some(dev) = gpu("adamw_over_managed_moments_is_bit_identical") else { return };
    let sizes = [3 * MIB / 2 + 1000, 700_001];
    let state_bytes: usize = sizes.iter().map(|n| 8 * n).sum();
    let budget = state_bytes / 4;
    let p = pager(&dev, budget, false);
    let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
    let mut rng = Rng(42);
    let init: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| rng.normal_f32()).collect()).collect();
    let mut reference = AdamW::new(cfg, &sizes).unwrap();
    let (mut p_ref, mut p_paged) = (init.clone(), init);
    let mut ms: Vec<PagedBuf> = sizes.iter().map(|&n| PagedBuf::new(&p, 4 * n).unwrap()).collect();
    let mut vs: Vec<PagedBuf> = sizes.iter().map(|&n| PagedBuf::new(&p, 4 * n).unwrap()).collect();
    let window = 256 * 1024;
    for step in 1..=3u64 {
        let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| rng.normal_f32() * 0.1).collect()).collect();
        {
            let mut pr: Vec<&mut [f32]> = p_ref.iter_mut().map(|v| v.as_mut_slice()).collect();
            let gr: Vec<&[f32]> = grads.iter().map(|v| v.as_slice()).collect();
            reference.step(&mut pr, &gr).unwrap();
        }
        let s = AdamWScalars::new(&cfg, step);
        for (t, &n) in sizes.iter().enumerate() {
            for w0 in (0..n).step_by(window) {
                let w = w0..(w0 + window).min(n);
                // To the device (what a CUDA optimizer would do), then back
                // for the CPU reference kernel.
                ms[t].prefetch(w.start * 4..w.end * 4).unwrap();
                vs[t].prefetch(w.start * 4..w.end * 4).unwrap();
                let m = ms[t].as_f32_mut(w.clone()).unwrap();
                let v = vs[t].as_f32_mut(w.clone()).unwrap();
                adamw_update(&mut p_paged[t][w.clone()], &grads[t][w.clone()], m, v, &s);
            }
        }
        assert!(p.stats().bytes_resident <= (budget + 2 * CHUNK_BYTES) as u64);
    }
    for (t, &n) in sizes.iter().enumerate() {
        let (m_ref, v_ref) = reference.moments(t).unwrap();
        assert!(ms[t].as_f32(0..n).unwrap().iter().zip(m_ref).all(|(a, b)| a.to_bits() == b.to_bits()), "tensor {t}: exp_avg differs");
        assert!(vs[t].as_f32(0..n).unwrap().iter().zip(v_ref).all(|(a, b)| a.to_bits() == b.to_bits()), "tensor {t}: exp_avg_sq differs");
        assert!(p_paged[t].iter().zip(&p_ref[t]).all(|(a, b)| a.to_bits() == b.to_bits()), "tensor {t}: parameters differ");
    }
    let st = p.stats();
    eprintln!("AdamW on managed memory, state {state_bytes} bytes, budget {budget}: {st:?}");
    if st.flags & flags::NO_CONCURRENT_MANAGED_ACCESS == 0 {
        assert!(st.page_ins > 0 && st.page_outs > 0, "{st:?}");
    }
}

#[test]
fn device_budget_is_kept() {
    let Some(dev) = gpu("device_budget_is_kept") else { return };
    let p = pager(&dev, 8 * MIB, false);
    let len = 32 * MIB;
    let a = PagedBuf::new(&p, len).unwrap();
    if a.stats().flags & flags::NO_CONCURRENT_MANAGED_ACCESS != 0 {
        eprintln!("device_budget_is_kept: no concurrent managed access; prefetch is a no-op there");
        a.prefetch(0..len).unwrap();
        assert_eq!(a.stats().bytes_resident, 0);
        return;
    }
    for s in (0..len).step_by(MIB) {
        a.prefetch(s..s + MIB).unwrap();
        assert!(a.stats().bytes_resident <= 8 * MIB as u64);
    }
    dev.synchronize().unwrap();
    let st = a.stats();
    assert_eq!(st.bytes_resident, 8 * MIB as u64);
    assert_eq!(st.page_outs, 12);
}

#[test]
fn refuses_more_than_free_device_memory() {
    let Some(dev) = gpu("refuses_more_than_free_device_memory") else { return };
    let (free, _) = cpaged::mem_info(&dev).unwrap();
    let p = pager(&dev, 0, false);
    let e = PagedBuf::new(&p, (free + (1 << 30)) as usize).err().expect("an allocation beyond free memory must fail");
    assert_eq!(e.kind, ErrorKind::DeviceMemoryExceeded, "{}", e.message);
    // Earlier buffers not yet on the device count against the free memory.
    let big = (free as usize / 10) * 6;
    let a = PagedBuf::new(&p, big).unwrap();
    let e = PagedBuf::new(&p, big).err().expect("two 60% buffers must not both fit");
    assert_eq!(e.kind, ErrorKind::DeviceMemoryExceeded, "{}", e.message);
    drop(a);
    // Allowed: it succeeds (or the driver itself says out of memory), never
    // the refusal; the first and last bytes work.
    let p = pager(&dev, 0, true);
    match PagedBuf::new(&p, (free + (1 << 30)) as usize) {
        Ok(mut b) => {
            assert_ne!(b.stats().flags & flags::OVERSUBSCRIBED, 0);
            let n = b.len();
            b.as_bytes_mut(0..4096).unwrap().fill(7);
            b.as_bytes_mut(n - 4096..n).unwrap().fill(9);
            assert!(b.as_bytes(0..4096).unwrap().iter().all(|&x| x == 7));
            assert!(b.as_bytes(n - 4096..n).unwrap().iter().all(|&x| x == 9));
        }
        Err(e) => assert_eq!(e.kind, ErrorKind::OutOfMemory, "{}", e.message),
    }
}

/// The same refusal through the C API: its own status.
#[test]
fn c_api_status_for_device_memory_exceeded() {
    use lora::ffi::context::*;
    use lora::ffi::paged::*;
    use lora::ffi::*;
    let Some(dev) = gpu("c_api_status_for_device_memory_exceeded") else { return };
    let (free, _) = cpaged::mem_info(&dev).unwrap();
    let mut cp = lora_context_default_params();
    cp.backend = LORA_BACKEND_CUDA;
    let mut ctx = std::ptr::null_mut();
    // SAFETY: valid pointers to locals; handles freed below.
    unsafe {
        assert_eq!(lora_context_new(&cp, &mut ctx), LORA_OK);
        let mut buf = std::ptr::null_mut();
        assert_eq!(lora_paged_alloc(ctx, (free + (1 << 30)) as usize, &mut buf), LORA_ERR_DEVICE_MEMORY_EXCEEDED);
        assert!(buf.is_null());
        assert_eq!(lora_paged_alloc(ctx, 3 * MIB, &mut buf), LORA_OK);
        let mut st: lora_paged_stats = std::mem::zeroed();
        st.struct_size = std::mem::size_of::<lora_paged_stats>() as u32;
        assert_eq!(lora_paged_prefetch(buf, 0, 3 * MIB), LORA_OK);
        assert_eq!(lora_paged_get_stats(buf, &mut st), LORA_OK);
        assert_ne!(st.flags & LORA_PAGED_FLAG_CUDA_MANAGED, 0);
        assert_eq!(st.bytes_in_memory, LORA_PAGED_UNKNOWN);
        lora_paged_free(buf);
        lora_context_free(ctx);
    }
}
