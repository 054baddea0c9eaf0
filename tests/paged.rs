//! Paged memory on the CPU (`memory::PagedBuf` over a shared file mapping):
//! - what is written is what is read back, at any budget, including a
//!   budget smaller than one chunk and buffers with a partial last chunk;
//! - the page-out really drops the pages: the mapping's resident set
//!   (`/proc/self/smaps`) and its page-cache residency (`mincore`) fall to
//!   ~0 after an evict, the bytes read back unchanged, and the resident set
//!   grows again on access;
//! - AdamW (`optim::adamw::adamw_update`) over moments held in paged
//!   buffers at a quarter of the state's size gives the same bits as the
//!   resident optimizer (`optim::AdamW`), and the statistics show the
//!   page-outs and page-ins that took;
//! - the budget is kept, and lowering it pages out at once;
//! - bad input: zero bytes, more than the backing store's free space,
//!   unusable directories, ranges outside the buffer;
//! - nothing is left in the backing directory, and a tmpfs directory is
//!   flagged.

#![cfg(target_os = "linux")]

use lora::backend::Device;
use lora::memory::{flags, PagedBuf, Pager, PagingConfig, CHUNK_BYTES};
use lora::optim::adamw::adamw_update;
use lora::optim::{AdamW, AdamWConfig, AdamWScalars};
use lora::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MIB: usize = 1 << 20;

/// A fresh directory under the target dir (on a disk here, not tmpfs),
/// removed when dropped.
struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> TempDir {
        let base = std::env::current_exe().unwrap().parent().unwrap().join("paged-tests");
        let d = base.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn entries(&self) -> usize {
        std::fs::read_dir(&self.0).unwrap().count()
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pager(dir: &TempDir, budget: usize) -> Arc<Pager> {
    Pager::new(Device::Cpu, PagingConfig { budget_bytes: budget as u64, dir: Some(dir.path().to_path_buf()), allow_oversubscription: false }).unwrap()
}

/// SplitMix64.
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

/// Byte `i` of the test pattern (varies in every byte, differs per seed).
fn pattern(seed: u64, i: usize) -> u8 {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (x >> 56) as u8 ^ (i as u8)
}

/// Resident bytes of the mapping that starts at `addr`, from
/// /proc/self/smaps (this VMA only, so other threads' memory is not mixed in).
fn vma_rss(addr: *const u8) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let want = format!("{:x}-", addr as usize);
    let mut in_vma = false;
    for line in smaps.lines() {
        if line.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) && line.contains('-') && line.split_whitespace().count() >= 5 {
            in_vma = line.starts_with(&want);
            continue;
        }
        if in_vma {
            if let Some(rest) = line.strip_prefix("Rss:") {
                let kb: usize = rest.trim().trim_end_matches("kB").trim().parse().unwrap();
                return kb * 1024;
            }
        }
    }
    panic!("no mapping at {addr:p} in /proc/self/smaps");
}

#[test]
fn round_trip_under_tiny_budgets() {
    let dir = TempDir::new("roundtrip");
    // A partial last chunk, odd length; budgets: under one chunk, one chunk,
    // two chunks, no limit.
    let len = 9 * MIB + 12_345;
    for (k, budget) in [CHUNK_BYTES / 2, CHUNK_BYTES, 2 * CHUNK_BYTES, 0].into_iter().enumerate() {
        let p = pager(&dir, budget);
        let mut a = PagedBuf::new(&p, len).unwrap();
        let mut b = PagedBuf::new(&p, len / 3).unwrap();
        let seed = 100 + k as u64;
        // Fresh buffers read as zeros.
        assert!(a.as_bytes(0..len).unwrap().iter().step_by(4093).all(|&x| x == 0));
        // Write both in windows that straddle chunk boundaries, interleaved.
        let win = 777_777;
        for s in (0..len).step_by(win) {
            let e = (s + win).min(len);
            for (i, x) in a.as_bytes_mut(s..e).unwrap().iter_mut().enumerate() {
                *x = pattern(seed, s + i);
            }
            let (bs, be) = (s / 3, e / 3);
            for (i, x) in b.as_bytes_mut(bs..be).unwrap().iter_mut().enumerate() {
                *x = pattern(seed + 50, bs + i);
            }
            if budget != 0 {
                let st = p.stats();
                assert!(st.bytes_resident <= budget.max(2 * CHUNK_BYTES) as u64 + CHUNK_BYTES as u64, "budget {budget}: {st:?}");
            }
        }
        // Read back in another window size, backwards.
        let win = 1_234_567;
        let starts: Vec<usize> = (0..len).step_by(win).collect();
        for &s in starts.iter().rev() {
            let e = (s + win).min(len);
            let got = a.as_bytes(s..e).unwrap();
            assert!(got.iter().enumerate().all(|(i, &x)| x == pattern(seed, s + i)), "budget {budget}: buffer a differs in {s}..{e}");
        }
        let got = b.as_bytes(0..len / 3).unwrap();
        assert!(got.iter().enumerate().all(|(i, &x)| x == pattern(seed + 50, i)), "budget {budget}: buffer b differs");
        // And through the raw pointer after evicting everything.
        a.evict(0..len).unwrap();
        b.evict(0..len / 3).unwrap();
        // SAFETY: the buffer's len bytes, no other borrow alive.
        let raw = unsafe { std::slice::from_raw_parts(a.as_ptr(), len) };
        assert!(raw.iter().enumerate().all(|(i, &x)| x == pattern(seed, i)), "budget {budget}: raw read after evict differs");
        let st = p.stats();
        assert_eq!(st.bytes_resident + st.bytes_paged_out, st.bytes_total);
        assert_eq!(st.bytes_total, (len + len / 3) as u64);
        assert_eq!(st.buffers, 2);
        if budget != 0 {
            assert!(st.page_outs > 0 && st.page_ins > st.page_outs / 2, "budget {budget}: {st:?}");
        }
        assert_eq!(st.flags & flags::BACKING_IN_MEMORY, 0, "the test directory is on a disk here");
        drop(a);
        drop(b);
        let st = p.stats();
        assert_eq!((st.buffers, st.bytes_total, st.bytes_resident), (0, 0, 0));
    }
    assert_eq!(dir.entries(), 0, "backing files must be unlinked");
}

/// MADV_DONTNEED on the shared file mapping drops the pages from this
/// process (smaps Rss) and, with the write-back and cache drop, from memory
/// (mincore); the bytes come back from the file on the next touch.
#[test]
fn evict_drops_pages_and_they_come_back() {
    let dir = TempDir::new("evict");
    let p = pager(&dir, 0);
    let len = 16 * MIB;
    let mut a = PagedBuf::new(&p, len).unwrap();
    for (i, x) in a.as_bytes_mut(0..len).unwrap().iter_mut().enumerate() {
        *x = pattern(7, i);
    }
    let rss_full = vma_rss(a.as_ptr());
    let mem_full = a.stats().bytes_in_memory.unwrap();
    assert!(rss_full >= len - MIB, "after writing, Rss {rss_full}");
    assert!(mem_full >= (len - MIB) as u64, "after writing, in memory {mem_full}");

    a.evict(0..len).unwrap();
    let rss_out = vma_rss(a.as_ptr());
    let mem_out = a.stats().bytes_in_memory.unwrap();
    eprintln!("16 MiB buffer: Rss {rss_full} -> {rss_out} bytes, in memory (mincore) {mem_full} -> {mem_out} bytes");
    assert!(rss_out <= 64 << 10, "after evict, Rss {rss_out}");
    assert!(mem_out <= MIB as u64, "after evict, still {mem_out} bytes in the page cache");
    let st = a.stats();
    assert_eq!((st.bytes_resident, st.bytes_paged_out, st.page_outs), (0, len as u64, 8));

    // Half of it read back through the accessor: exactly that half returns.
    let half = a.as_bytes(0..len / 2).unwrap();
    assert!(half.iter().enumerate().all(|(i, &x)| x == pattern(7, i)));
    let rss_half = vma_rss(a.as_ptr());
    assert!(rss_half >= len / 2 - MIB && rss_half <= len / 2 + MIB, "after reading half, Rss {rss_half}");
    assert_eq!(a.stats().page_ins, 8 + 4);
    // The other half through the raw pointer: transparent, and uncounted.
    // SAFETY: in bounds; no &mut alive.
    let rest = unsafe { std::slice::from_raw_parts(a.as_ptr().add(len / 2), len / 2) };
    assert!(rest.iter().enumerate().all(|(i, &x)| x == pattern(7, len / 2 + i)));
    assert!(vma_rss(a.as_ptr()) >= len - MIB);
    assert_eq!(a.stats().page_ins, 8 + 4);
}

/// AdamW over moments in paged buffers at a quarter budget == AdamW with
/// resident moments, bit for bit; parameters and gradients stay resident.
#[test]
fn adamw_over_paged_moments_is_bit_identical() {
    let dir = TempDir::new("adamw");
    // Two tensors (one not a multiple of the window or the chunk).
    let sizes = [3 * MIB / 2 + 1000, 700_001];
    let state_bytes: usize = sizes.iter().map(|n| 2 * 4 * n).sum();
    let budget = state_bytes / 4;
    let p = pager(&dir, budget);
    let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
    let mut rng = Rng(42);
    let init: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| rng.normal_f32()).collect()).collect();

    let mut reference = AdamW::new(cfg, &sizes).unwrap();
    let mut p_ref = init.clone();
    let mut p_paged = init.clone();
    let mut ms: Vec<PagedBuf> = sizes.iter().map(|&n| PagedBuf::new(&p, 4 * n).unwrap()).collect();
    let mut vs: Vec<PagedBuf> = sizes.iter().map(|&n| PagedBuf::new(&p, 4 * n).unwrap()).collect();
    let window = 256 * 1024; // elements: 1 MiB per moment per window

    for step in 1..=4u64 {
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
                if w.end < n {
                    // Overlap the next window's reads with this update.
                    let next = w.end * 4..((w.end + window).min(n)) * 4;
                    ms[t].prefetch(next.clone()).unwrap();
                    vs[t].prefetch(next).unwrap();
                }
                let m = ms[t].as_f32_mut(w.clone()).unwrap();
                let v = vs[t].as_f32_mut(w.clone()).unwrap();
                adamw_update(&mut p_paged[t][w.clone()], &grads[t][w.clone()], m, v, &s);
            }
        }
        let st = p.stats();
        assert!(st.bytes_resident <= (budget + 4 * CHUNK_BYTES) as u64, "step {step}: {st:?}");
    }
    for (t, &n) in sizes.iter().enumerate() {
        let (m_ref, v_ref) = reference.moments(t).unwrap();
        let m = ms[t].as_f32(0..n).unwrap();
        assert!(m.iter().zip(m_ref).all(|(a, b)| a.to_bits() == b.to_bits()), "tensor {t}: exp_avg differs");
        let v = vs[t].as_f32(0..n).unwrap();
        assert!(v.iter().zip(v_ref).all(|(a, b)| a.to_bits() == b.to_bits()), "tensor {t}: exp_avg_sq differs");
        assert!(p_paged[t].iter().zip(&p_ref[t]).all(|(a, b)| a.to_bits() == b.to_bits()), "tensor {t}: parameters differ");
    }
    let st = p.stats();
    eprintln!("AdamW, state {state_bytes} bytes, budget {budget}: {st:?}");
    // Every step re-reads state that the budget forced out the step before.
    let chunks: u64 = sizes.iter().map(|&n| 2 * (4 * n).div_ceil(CHUNK_BYTES) as u64).sum();
    assert!(st.page_outs >= 3 * chunks / 2, "page-outs {} for {chunks} chunks over 4 steps", st.page_outs);
    assert!(st.page_ins >= 3 * chunks, "page-ins {} for {chunks} chunks over 4 steps", st.page_ins);
    assert!(st.bytes_resident <= (budget + 4 * CHUNK_BYTES) as u64);
}

#[test]
fn budget_is_kept_and_lowering_it_pages_out() {
    let dir = TempDir::new("budget");
    let p = pager(&dir, 0);
    let len = 20 * MIB;
    let a = PagedBuf::new(&p, len).unwrap();
    let b = PagedBuf::new(&p, len).unwrap();
    a.prefetch(0..len).unwrap();
    b.prefetch(0..len).unwrap();
    assert_eq!(p.stats().bytes_resident, 2 * len as u64);
    // Lower the budget: the least recently used (a's) chunks go first.
    p.set_config(PagingConfig { budget_bytes: (8 * MIB) as u64, ..p.config() }).unwrap();
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.bytes_resident, 0, "{sa:?}");
    assert_eq!(sb.bytes_resident, 8 * MIB as u64, "{sb:?}");
    // Touching a's start again evicts b's oldest chunk.
    a.prefetch(0..1).unwrap();
    assert_eq!(a.stats().bytes_resident, CHUNK_BYTES as u64);
    assert_eq!(b.stats().bytes_resident, 6 * MIB as u64);
    assert_eq!(p.stats().bytes_resident, 8 * MIB as u64);
    // A prefetch larger than the budget keeps its own range.
    b.prefetch(0..len).unwrap();
    assert_eq!(b.stats().bytes_resident, len as u64);
    assert_eq!(a.stats().bytes_resident, 0);
    // Empty ranges do nothing.
    let before = p.stats();
    a.prefetch(5..5).unwrap();
    a.evict(len..len).unwrap();
    assert_eq!(p.stats(), before);
}

#[test]
fn concurrent_use_from_threads_keeps_data() {
    let dir = TempDir::new("threads");
    let p = pager(&dir, 3 * CHUNK_BYTES);
    let len = 6 * MIB + 100;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let p = p.clone();
            s.spawn(move || {
                let mut a = PagedBuf::new(&p, len).unwrap();
                for round in 0..3 {
                    for s0 in (0..len).step_by(MIB) {
                        let e = (s0 + MIB).min(len);
                        for (i, x) in a.as_bytes_mut(s0..e).unwrap().iter_mut().enumerate() {
                            *x = pattern(t * 10 + round, s0 + i);
                        }
                    }
                    for s0 in (0..len).step_by(MIB / 2) {
                        let e = (s0 + MIB / 2).min(len);
                        let got = a.as_bytes(s0..e).unwrap();
                        assert!(got.iter().enumerate().all(|(i, &x)| x == pattern(t * 10 + round, s0 + i)), "thread {t} round {round}");
                    }
                }
            });
        }
    });
    let st = p.stats();
    assert_eq!(st.buffers, 0);
    assert!(st.page_outs > 0);
}

#[test]
fn bad_input() {
    let dir = TempDir::new("bad");
    let p = pager(&dir, 0);
    // Zero bytes.
    assert_eq!(PagedBuf::new(&p, 0).err().unwrap().kind, ErrorKind::InvalidArgument);
    // More than the file system has free; more than can be mapped.
    let e = PagedBuf::new(&p, 1 << 46).err().unwrap();
    assert_eq!(e.kind, ErrorKind::OutOfMemory, "{}", e.message);
    assert!(e.message.contains("free"), "{}", e.message);
    assert_eq!(PagedBuf::new(&p, usize::MAX).err().unwrap().kind, ErrorKind::OutOfMemory);
    assert_eq!(PagedBuf::new(&p, usize::MAX / 2 + 1).err().unwrap().kind, ErrorKind::OutOfMemory);
    // Unusable directories: missing, a file, /proc (no files can be made
    // there, even as root); set_config refuses them and changes nothing.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    for bad in [dir.path().join("missing"), file.clone(), PathBuf::from("/proc/self")] {
        let cfg = PagingConfig { budget_bytes: 1, dir: Some(bad.clone()), allow_oversubscription: false };
        let e = p.set_config(cfg.clone()).err().unwrap_or_else(|| panic!("{} accepted", bad.display()));
        assert_eq!(e.kind, ErrorKind::Io, "{}: {}", bad.display(), e.message);
        assert_eq!(Pager::new(Device::Cpu, cfg).err().unwrap().kind, ErrorKind::Io);
    }
    assert_eq!(p.config().budget_bytes, 0);
    std::fs::remove_file(&file).unwrap();
    // A directory that vanishes after being set: the allocation says so.
    let gone = dir.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let p2 = Pager::new(Device::Cpu, PagingConfig { dir: Some(gone.clone()), ..Default::default() }).unwrap();
    std::fs::remove_dir(&gone).unwrap();
    assert_eq!(PagedBuf::new(&p2, 4096).err().unwrap().kind, ErrorKind::Io);
    // A read-only directory (not for root, who may write anyway).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let e = p.set_config(PagingConfig { dir: Some(ro.clone()), ..Default::default() }).err().unwrap();
        assert_eq!(e.kind, ErrorKind::Io);
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Ranges outside the buffer.
    let mut a = PagedBuf::new(&p, 1000).unwrap();
    assert_eq!(a.prefetch(0..1001).err().unwrap().kind, ErrorKind::InvalidArgument);
    assert_eq!(a.evict(999..1001).err().unwrap().kind, ErrorKind::InvalidArgument);
    #[allow(clippy::reversed_empty_ranges)]
    let rev = 10..5;
    assert_eq!(a.as_bytes(rev).err().unwrap().kind, ErrorKind::InvalidArgument);
    assert_eq!(a.as_f32(0..251).err().unwrap().kind, ErrorKind::InvalidArgument);
    assert_eq!(a.as_f32_mut(usize::MAX / 2..usize::MAX / 2 + 1).err().unwrap().kind, ErrorKind::InvalidArgument);
    assert_eq!(a.as_f32_mut(0..250).unwrap().len(), 250);
    assert_eq!(dir.entries(), 0, "nothing may be left in the backing directory");
}

#[test]
fn tmpfs_backing_is_flagged_and_still_correct() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: no /dev/shm");
        return;
    }
    let p = Pager::new(Device::Cpu, PagingConfig { budget_bytes: CHUNK_BYTES as u64, dir: Some(shm.to_path_buf()), allow_oversubscription: false }).unwrap();
    let len = 5 * MIB;
    let mut a = PagedBuf::new(&p, len).unwrap();
    for s in (0..len).step_by(MIB) {
        for (i, x) in a.as_bytes_mut(s..s + MIB).unwrap().iter_mut().enumerate() {
            *x = pattern(3, s + i);
        }
    }
    a.evict(0..len).unwrap();
    assert!(a.as_bytes(0..len).unwrap().iter().enumerate().all(|(i, &x)| x == pattern(3, i)));
    let st = a.stats();
    assert_ne!(st.flags & flags::BACKING_IN_MEMORY, 0, "{st:?}");
    assert!(st.page_outs > 0);
}

/// A buffer keeps its pager alive (it may outlive the context that made it).
#[test]
fn buffer_outlives_its_pager_handle() {
    let dir = TempDir::new("outlive");
    let p = pager(&dir, CHUNK_BYTES);
    let mut a = PagedBuf::new(&p, 3 * MIB).unwrap();
    drop(p);
    a.as_f32_mut(0..4).unwrap().copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
    a.evict(0..3 * MIB).unwrap();
    assert_eq!(a.as_f32(0..4).unwrap(), &[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(Arc::strong_count(a.pager()), 1);
}

/// The C header's constants are the Rust core's.
#[test]
fn c_constants_match_the_core() {
    use lora::ffi::paged::*;
    assert_eq!(LORA_PAGED_CHUNK_BYTES, CHUNK_BYTES as u64);
    assert_eq!(LORA_PAGED_FLAG_CUDA_MANAGED, flags::CUDA_MANAGED);
    assert_eq!(LORA_PAGED_FLAG_NO_CONCURRENT_MANAGED_ACCESS, flags::NO_CONCURRENT_MANAGED_ACCESS);
    assert_eq!(LORA_PAGED_FLAG_BACKING_IN_MEMORY, flags::BACKING_IN_MEMORY);
    assert_eq!(LORA_PAGED_FLAG_OVERSUBSCRIBED, flags::OVERSUBSCRIBED);
}

/// `AdamW::set_state` (how a device trainer hands its state back) writes
/// paged moments through their pages as it writes resident ones, with a
/// budget far below the state, and refuses wrong shapes.
#[test]
fn adamw_state_handed_back_into_paged_moments() {
    let dir = TempDir::new("setstate");
    let p = pager(&dir, CHUNK_BYTES);
    let sizes = [3 * CHUNK_BYTES / 4 + 5, 17, CHUNK_BYTES / 2];
    let mut paged = AdamW::new_paged(AdamWConfig::default(), &sizes, &p).unwrap();
    let mut resident = AdamW::new(AdamWConfig::default(), &sizes).unwrap();
    let mut r = Rng(9);
    let moments: Vec<(Vec<f32>, Vec<f32>)> = sizes.iter().map(|&n| ((0..n).map(|_| r.normal_f32()).collect(), (0..n).map(|_| r.normal_f32().abs()).collect())).collect();
    paged.set_state(7, moments.clone()).unwrap();
    resident.set_state(7, moments.clone()).unwrap();
    for (i, (m, v)) in moments.iter().enumerate() {
        assert_eq!(paged.moments(i).unwrap(), (m.clone(), v.clone()), "paged tensor {i}");
        assert_eq!(resident.moments(i).unwrap(), (m.clone(), v.clone()), "resident tensor {i}");
    }
    assert_eq!((paged.step_count(), resident.step_count()), (7, 7));
    let mut short = moments.clone();
    short.pop();
    assert_eq!(paged.set_state(1, short).unwrap_err().kind, ErrorKind::ShapeMismatch);
    let mut wrong = moments;
    wrong[1].1.push(0.0);
    assert_eq!(resident.set_state(1, wrong).unwrap_err().kind, ErrorKind::ShapeMismatch);
}
