//! Paged buffers: memory that may exceed the fast tier, paged out and back
//! in, for optimizer state (QLoRA's paged optimizers).
//!
//! Two tiers, by the context's device:
//!
//! | device | buffer                         | fast tier       | slow tier                 |
//! |--------|--------------------------------|-----------------|---------------------------|
//! | CPU    | a file mapped shared (`memory::file_map`) | RAM (mapped pages) | the file, on disk |
//! | CUDA   | managed memory ([`ManagedAlloc`]) | device memory | host memory               |
//!
//! A [`Pager`] (one per context) tracks every buffer in chunks of
//! [`CHUNK_BYTES`] and keeps the bytes in the fast tier under a **budget**:
//! when bringing a range in would exceed it, the least recently used chunks
//! of any buffer are paged out first. Budget 0 means no limit (pages move
//! only on explicit [`PagedBuf::evict`], or, on CUDA, when the driver needs
//! room).
//!
//! Correctness never depends on the budget or on the hints: a page that was
//! paged out comes back transparently when touched (a page fault on the CPU,
//! a migration on CUDA), with the bytes last written. The budget and the
//! hints only decide *when* data moves, so a computation gives the same bits
//! at any budget (tests/paged.rs runs AdamW at a quarter budget and compares
//! bit for bit).
//!
//! What the budget counts is the pager's own accounting: chunks brought in
//! by [`PagedBuf::prefetch`] or the accessors and not paged out since.
//! Touching memory through the raw pointer without a prefetch works but is
//! neither counted nor limited; [`PagedStats::bytes_in_memory`] measures the
//! truth on the CPU (`mincore`). The budget holds after each call except
//! that a single prefetch of a range larger than the budget keeps that whole
//! range in (the range is never evicted by the call that brings it in).
//!
//! Paging I/O runs under the pager's lock: calls on buffers of one context
//! are serialized while they move pages (they are safe from any thread).
//! A page-out forced by the budget is pipelined: its write-back starts in
//! the call that evicts and is waited for (and the pages dropped from the
//! page cache) in the pager's next call, so it overlaps the caller's work;
//! until then up to one call's evictions are still in memory (visible in
//! `bytes_in_memory`, not in `bytes_resident`). Explicit [`PagedBuf::evict`]
//! and budget changes finish every page-out before they return.

#[cfg(unix)]
use super::file_map::FileMap;
use crate::backend::cuda::paged::ManagedAlloc;
use crate::backend::Device;
use crate::error::Result;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// The pager's unit of residency: 2 MiB, the x86-64 huge page size, so a
/// chunk is a whole number of pages on every common page size (4 KiB,
/// 16 KiB, 64 KiB) and a 10 GiB state is 5,120 chunks to track.
pub const CHUNK_BYTES: usize = 2 << 20;

/// Bits of [`PagedStats::flags`].
pub mod flags {
    /// The buffer is CUDA managed memory (fast tier: the device).
    pub const CUDA_MANAGED: u32 = 1;
    /// The device lacks concurrent managed access: prefetch and evict do
    /// nothing (bitsandbytes' fallback) and the counters stay 0.
    pub const NO_CONCURRENT_MANAGED_ACCESS: u32 = 2;
    /// The backing file is on a memory file system (tmpfs): paging out
    /// lowers the resident set but frees no memory.
    pub const BACKING_IN_MEMORY: u32 = 4;
    /// The allocation exceeded the device's free memory (allowed by the host).
    pub const OVERSUBSCRIBED: u32 = 8;
}

/// How paging behaves; set on a [`Pager`] (the C API: `lora_context_set_paging`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PagingConfig {
    /// Most bytes of paged buffers kept in the fast tier (RAM on the CPU,
    /// device memory on CUDA); 0 = no limit.
    pub budget_bytes: u64,
    /// Directory of the CPU backing files; `None` = the system temp
    /// directory (`$TMPDIR`, else `/tmp`). Applies to later allocations.
    pub dir: Option<PathBuf>,
    /// CUDA: allow a paged allocation beyond the device's free memory.
    pub allow_oversubscription: bool,
}

impl PagingConfig {
    /// The directory backing files go to.
    pub fn resolved_dir(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

/// Counters of one buffer, or of a whole pager.
///
/// `bytes_resident + bytes_paged_out == bytes_total` (a fresh buffer counts
/// as paged out: its bytes are zeros on the backing store), except for
/// buffers flagged [`flags::NO_CONCURRENT_MANAGED_ACCESS`], which count in
/// neither. Page-ins and
/// page-outs count chunk moves ([`CHUNK_BYTES`], the last one of a buffer
/// may be shorter); the `_total` fields count their bytes. A pager's
/// cumulative counters include buffers freed since.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagedStats {
    /// Live buffers.
    pub buffers: u64,
    /// Bytes allocated in live buffers (as requested).
    pub bytes_total: u64,
    /// Bytes in the fast tier, by the pager's accounting.
    pub bytes_resident: u64,
    /// Bytes in the slow tier, by the pager's accounting.
    pub bytes_paged_out: u64,
    /// Chunks brought into the fast tier.
    pub page_ins: u64,
    /// Chunks pushed out to the slow tier.
    pub page_outs: u64,
    pub bytes_paged_in_total: u64,
    pub bytes_paged_out_total: u64,
    /// CPU: bytes of the buffers actually in memory now (`mincore`: pages in
    /// the page cache, mapped or not). `None` on CUDA.
    pub bytes_in_memory: Option<u64>,
    /// The pager's budget (0 = no limit).
    pub budget_bytes: u64,
    /// [`flags`] bits (OR over the buffers for a pager).
    pub flags: u32,
}

/// What backs one buffer.
pub(crate) enum Backing {
    #[cfg(unix)]
    File(FileMap),
    Cuda(ManagedAlloc),
}

impl Backing {
    fn ptr(&self) -> *mut u8 {
        match self {
            #[cfg(unix)]
            Backing::File(f) => f.ptr(),
            Backing::Cuda(m) => m.ptr() as usize as *mut u8,
        }
    }

    /// Brings a byte range into the fast tier (`populate`: see
    /// [`FileMap::page_in`]; CUDA always queues an asynchronous prefetch).
    fn page_in(&self, r: Range<usize>, populate: Option<bool>) -> Result<()> {
        match self {
            #[cfg(unix)]
            Backing::File(f) => f.page_in(r.start, r.len(), populate),
            Backing::Cuda(m) => m.prefetch_to_device(r.start, r.len()),
        }
    }

    /// Starts a page-out (CPU: unmap and start the write-back; CUDA: queue
    /// the migration to the host).
    fn page_out_start(&self, r: Range<usize>) -> Result<()> {
        match self {
            #[cfg(unix)]
            Backing::File(f) => f.page_out_start(r.start, r.len()),
            Backing::Cuda(m) => m.prefetch_to_host(r.start, r.len()),
        }
    }

    /// Completes a page-out (CPU: wait for the write-back, drop the pages
    /// from the page cache; CUDA: nothing, the stream orders the migration).
    fn page_out_finish(&self, r: Range<usize>) -> Result<()> {
        match self {
            #[cfg(unix)]
            Backing::File(f) => f.page_out_finish(r.start, r.len()),
            Backing::Cuda(_) => Ok(()),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    page_ins: u64,
    page_outs: u64,
    bytes_in: u64,
    bytes_out: u64,
}

struct Entry {
    backing: Arc<Backing>,
    len: usize,
    /// Per chunk: 0 when paged out, else its key in `State::lru`.
    ticks: Vec<u64>,
    resident: u64,
    counters: Counters,
    /// False where prefetch/evict do nothing (CUDA without concurrent
    /// managed access): such a buffer is outside the budget.
    tracked: bool,
    flags: u32,
}

impl Entry {
    fn chunk_range(&self, c: usize) -> Range<usize> {
        let s = c * CHUNK_BYTES;
        s..(s + CHUNK_BYTES).min(self.len)
    }
}

struct State {
    config: PagingConfig,
    /// Last LRU key handed out (keys grow: the smallest is the least recent).
    tick: u64,
    next_id: u64,
    bufs: HashMap<u64, Entry>,
    /// Resident chunks by last use: tick → (buffer id, chunk index).
    lru: BTreeMap<u64, (u64, usize)>,
    resident: u64,
    /// Over all buffers, freed ones included.
    counters: Counters,
    /// Page-outs started by the previous budget eviction and not finished:
    /// their write-back overlaps the caller's work until the next call.
    pending: Vec<Victim>,
}

/// A page-out to do: a byte range of one backing.
type Victim = (Arc<Backing>, Range<usize>);

impl State {
    /// Marks the least recently used chunks paged out until the resident
    /// total fits the budget, sparing chunks touched at or after `spare_from`
    /// (0: spare nothing). Returns the ranges to page out, merged where
    /// adjacent.
    fn evict_to_budget(&mut self, spare_from: u64) -> Vec<Victim> {
        let budget = self.config.budget_bytes;
        let mut victims: Vec<Victim> = Vec::new();
        if budget == 0 {
            return victims;
        }
        while self.resident > budget {
            let Some((&t, &(id, c))) = self.lru.first_key_value() else { break };
            if spare_from != 0 && t >= spare_from {
                break;
            }
            self.lru.remove(&t);
            let e = self.bufs.get_mut(&id).expect("LRU entries name live buffers");
            e.ticks[c] = 0;
            let r = e.chunk_range(c);
            let n = r.len() as u64;
            e.resident -= n;
            self.resident -= n;
            for k in [&mut e.counters, &mut self.counters] {
                k.page_outs += 1;
                k.bytes_out += n;
            }
            victims.push((e.backing.clone(), r));
        }
        merge(victims)
    }
}

/// Sorts page-outs by backing and offset and merges adjacent ranges (one
/// system call or driver call per run instead of per chunk).
fn merge(mut v: Vec<Victim>) -> Vec<Victim> {
    v.sort_by_key(|(b, r)| (Arc::as_ptr(b) as usize, r.start));
    let mut out: Vec<Victim> = Vec::with_capacity(v.len());
    for (b, r) in v {
        if let Some((lb, lr)) = out.last_mut() {
            if Arc::ptr_eq(lb, &b) && lr.end == r.start {
                lr.end = r.end;
                continue;
            }
        }
        out.push((b, r));
    }
    out
}

/// Runs `f` on every victim, going on after a failure; the first error.
fn each(victims: &[Victim], f: impl Fn(&Backing, Range<usize>) -> Result<()>) -> Result<()> {
    let mut first_err = None;
    for (b, r) in victims {
        if let Err(e) = f(b, r.clone()) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

impl State {
    /// Starts the page-outs of `victims` and finishes every one started
    /// before: on return all of them are out of memory (synchronous: for
    /// explicit evictions and budget changes).
    fn page_out_now(&mut self, victims: Vec<Victim>) -> Result<()> {
        let started = each(&victims, Backing::page_out_start);
        self.pending.extend(victims);
        let finished = each(&std::mem::take(&mut self.pending), Backing::page_out_finish);
        started.and(finished)
    }

    /// Starts the page-outs of `victims` and finishes those the previous
    /// call started (pipelined: the write-back of this call's victims
    /// overlaps the caller's work on what it brings in; at most one call's
    /// worth of pages is written back but not yet dropped).
    fn page_out_pipelined(&mut self, victims: Vec<Victim>) -> Result<()> {
        let started = each(&victims, Backing::page_out_start);
        let finished = each(&std::mem::replace(&mut self.pending, victims), Backing::page_out_finish);
        started.and(finished)
    }
}

/// The pager of one context: its configuration, and the residency of every
/// paged buffer allocated under it. Shared (`Arc`) by the context and its
/// buffers, so a buffer may outlive the context. All methods are
/// thread-safe.
pub struct Pager {
    device: Device,
    state: Mutex<State>,
}

impl Pager {
    /// A pager allocating on `device` (CUDA managed memory or, on the CPU,
    /// backing files). Checks `config.dir` when one is given (CPU only).
    pub fn new(device: Device, config: PagingConfig) -> Result<Arc<Pager>> {
        if config.dir.is_some() {
            Self::check_dir(&device, &config)?;
        }
        Ok(Arc::new(Pager {
            device,
            state: Mutex::new(State {
                config,
                tick: 0,
                next_id: 1,
                bufs: HashMap::new(),
                lru: BTreeMap::new(),
                resident: 0,
                counters: Counters::default(),
                pending: Vec::new(),
            }),
        }))
    }

    fn check_dir(device: &Device, config: &PagingConfig) -> Result<()> {
        if device.is_cuda() {
            return Ok(());
        }
        let dir = config.resolved_dir();
        if dir.as_os_str().is_empty() {
            bail!(InvalidArgument, "paged memory: the backing directory is an empty path");
        }
        #[cfg(unix)]
        return FileMap::probe_dir(&dir);
        #[cfg(not(unix))]
        bail!(Unsupported, "paged memory on the CPU needs a Unix system (mmap of a file)");
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn config(&self) -> PagingConfig {
        self.state.lock().config.clone()
    }

    /// Replaces the configuration. On the CPU the directory is checked
    /// first (it must exist and accept a new file: `Io` otherwise; nothing
    /// changes on error). A lower budget pages out at once.
    pub fn set_config(&self, config: PagingConfig) -> Result<()> {
        Self::check_dir(&self.device, &config)?;
        let mut st = self.state.lock();
        st.config = config;
        let victims = st.evict_to_budget(0);
        st.page_out_now(victims)
    }

    /// Totals over the live buffers, cumulative counters over all.
    /// On the CPU this runs `mincore` over every buffer (cheap: one byte per
    /// page, 64 Ki pages per call).
    pub fn stats(&self) -> PagedStats {
        let st = self.state.lock();
        let mut s = PagedStats {
            buffers: st.bufs.len() as u64,
            bytes_resident: st.resident,
            page_ins: st.counters.page_ins,
            page_outs: st.counters.page_outs,
            bytes_paged_in_total: st.counters.bytes_in,
            bytes_paged_out_total: st.counters.bytes_out,
            budget_bytes: st.config.budget_bytes,
            ..Default::default()
        };
        let mut in_memory = Some(0u64);
        for e in st.bufs.values() {
            s.bytes_total += e.len as u64;
            if e.tracked {
                s.bytes_paged_out += e.len as u64 - e.resident;
            }
            s.flags |= e.flags;
            in_memory = in_memory.zip(measured(&e.backing)).map(|(a, b)| a + b);
        }
        s.bytes_in_memory = in_memory;
        s
    }

    fn buf_stats(&self, id: u64) -> PagedStats {
        let st = self.state.lock();
        let e = &st.bufs[&id];
        PagedStats {
            buffers: 1,
            bytes_total: e.len as u64,
            bytes_resident: e.resident,
            bytes_paged_out: if e.tracked { e.len as u64 - e.resident } else { 0 },
            page_ins: e.counters.page_ins,
            page_outs: e.counters.page_outs,
            bytes_paged_in_total: e.counters.bytes_in,
            bytes_paged_out_total: e.counters.bytes_out,
            bytes_in_memory: measured(&e.backing),
            budget_bytes: st.config.budget_bytes,
            flags: e.flags,
        }
    }

    /// Registers a new buffer of `bytes` and returns its id and backing.
    fn alloc(&self, bytes: usize) -> Result<(u64, Arc<Backing>)> {
        if bytes == 0 {
            bail!(InvalidArgument, "paged memory: a buffer of 0 bytes was requested");
        }
        let mut st = self.state.lock();
        let (backing, tracked, flags) = match &self.device {
            Device::Cuda(dev) => {
                // Managed bytes of earlier buffers not on the device yet: the
                // driver's free figure does not count them.
                let pending: u64 = st.bufs.values().filter(|e| e.flags & flags::CUDA_MANAGED != 0).map(|e| e.len as u64 - e.resident).sum();
                let m = ManagedAlloc::new(dev, bytes, pending, st.config.allow_oversubscription)?;
                let mut f = flags::CUDA_MANAGED;
                if !m.concurrent_access() {
                    f |= flags::NO_CONCURRENT_MANAGED_ACCESS;
                }
                if m.oversubscribed() {
                    f |= flags::OVERSUBSCRIBED;
                }
                (Backing::Cuda(m), f & flags::NO_CONCURRENT_MANAGED_ACCESS == 0, f)
            }
            Device::Cpu => {
                #[cfg(unix)]
                {
                    let fm = FileMap::create(&st.config.resolved_dir(), bytes)?;
                    let f = if fm.in_memory_fs() { flags::BACKING_IN_MEMORY } else { 0 };
                    (Backing::File(fm), true, f)
                }
                #[cfg(not(unix))]
                bail!(Unsupported, "paged memory on the CPU needs a Unix system (mmap of a file)");
            }
        };
        let id = st.next_id;
        st.next_id += 1;
        let backing = Arc::new(backing);
        let n_chunks = bytes.div_ceil(CHUNK_BYTES);
        st.bufs.insert(id, Entry { backing: backing.clone(), len: bytes, ticks: vec![0; n_chunks], resident: 0, counters: Counters::default(), tracked, flags });
        Ok((id, backing))
    }

    fn free(&self, id: u64) {
        let mut st = self.state.lock();
        if let Some(e) = st.bufs.remove(&id) {
            for &t in e.ticks.iter().filter(|&&t| t != 0) {
                st.lru.remove(&t);
            }
            st.resident -= e.resident;
            // Its unfinished page-outs are moot: the file goes with it.
            st.pending.retain(|(b, _)| !Arc::ptr_eq(b, &e.backing));
        }
    }

    /// Brings the chunks of `range` in (marking them most recently used),
    /// paging out least recently used chunks first where the budget needs.
    /// `populate`: `None` hints for the chunks that were out (asynchronous),
    /// `Some(write)` faults the whole byte range in now (CPU).
    fn bring_in(&self, id: u64, range: Range<usize>, populate: Option<bool>) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let e = st.bufs.get_mut(&id).expect("a live PagedBuf is registered");
        if !e.tracked {
            return Ok(());
        }
        let (c0, c1) = (range.start / CHUNK_BYTES, range.end.div_ceil(CHUNK_BYTES));
        let spare_from = st.tick + 1;
        let mut ins: Vec<Range<usize>> = Vec::new();
        for c in c0..c1 {
            let t = e.ticks[c];
            if t != 0 {
                st.lru.remove(&t);
            } else {
                let r = e.chunk_range(c);
                let n = r.len() as u64;
                e.resident += n;
                st.resident += n;
                for k in [&mut e.counters, &mut st.counters] {
                    k.page_ins += 1;
                    k.bytes_in += n;
                }
                match ins.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => ins.push(r),
                }
            }
            st.tick += 1;
            e.ticks[c] = st.tick;
            st.lru.insert(st.tick, (id, c));
        }
        let backing = e.backing.clone();
        // Make room first (this call's write-back runs on while we read;
        // the previous call's is finished before reading, so that dropping
        // its pages from the cache cannot drop what this call reads), then read.
        let victims = st.evict_to_budget(spare_from);
        st.page_out_pipelined(victims)?;
        if populate.is_some() {
            backing.page_in(range, populate)?;
        } else {
            for r in ins {
                backing.page_in(r, None)?;
            }
        }
        Ok(())
    }

    /// Pages the chunks of `range` out.
    fn push_out(&self, id: u64, range: Range<usize>) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let e = st.bufs.get_mut(&id).expect("a live PagedBuf is registered");
        if !e.tracked {
            return Ok(());
        }
        let mut victims: Vec<Victim> = Vec::new();
        for c in range.start / CHUNK_BYTES..range.end.div_ceil(CHUNK_BYTES) {
            let t = e.ticks[c];
            if t == 0 {
                continue;
            }
            st.lru.remove(&t);
            e.ticks[c] = 0;
            let r = e.chunk_range(c);
            let n = r.len() as u64;
            e.resident -= n;
            st.resident -= n;
            for k in [&mut e.counters, &mut st.counters] {
                k.page_outs += 1;
                k.bytes_out += n;
            }
            victims.push((e.backing.clone(), r));
        }
        st.page_out_now(merge(victims))
    }
}

/// Measured bytes in memory of one backing (CPU), `None` where unknown.
fn measured(b: &Backing) -> Option<u64> {
    match b {
        #[cfg(unix)]
        Backing::File(f) => f.bytes_in_memory().ok().map(|n| n.min(f.len() as u64)),
        Backing::Cuda(_) => None,
    }
}

/// A paged buffer: `len` bytes, zero at first, in a [`Pager`]'s fast tier
/// or paged out. Always valid to read and write (paged-out bytes come back
/// on access); [`PagedBuf::prefetch`] and [`PagedBuf::evict`] are hints
/// that move data ahead of time and keep the pager's budget.
///
/// Typical use (the optimizer): walk the state in windows no larger than
/// the budget allows, taking a slice of each window with
/// [`as_f32_mut`](PagedBuf::as_f32_mut) (which brings it in, paging out
/// the least recently used chunks of any buffer when over budget),
/// optionally prefetching the next window first so its reads overlap the
/// update:
///
/// ```no_run
/// # use lora::memory::{PagedBuf, Pager, PagingConfig};
/// # use lora::backend::Device;
/// # fn main() -> lora::Result<()> {
/// let pager = Pager::new(Device::Cpu, PagingConfig { budget_bytes: 64 << 20, ..Default::default() })?;
/// let n = 1 << 24; // 16 Mi moments, 64 MiB each
/// let (mut m, mut v) = (PagedBuf::new(&pager, n * 4)?, PagedBuf::new(&pager, n * 4)?);
/// let window = 1 << 20; // elements: 4 MiB per buffer per window
/// for s in (0..n).step_by(window) {
///     let w = s..(s + window).min(n);
///     let (m, v) = (m.as_f32_mut(w.clone())?, v.as_f32_mut(w)?);
///     // ... update m and v ...
/// #   let _ = (m, v);
/// }
/// # Ok(()) }
/// ```
///
/// On CUDA the buffer is managed memory: pass [`device_ptr`](PagedBuf::device_ptr)
/// to kernels on the device's stream after a [`prefetch`](PagedBuf::prefetch);
/// the host accessors first bring their range back to the host (counted as
/// page-outs) and wait for the stream.
///
/// Thread safety: `PagedBuf` is `Send + Sync`; `&self` methods may run
/// concurrently (paging is locked inside the pager). The bytes are
/// borrowed like a slice's: shared by `as_bytes`/`as_f32`, exclusive by the
/// `_mut` accessors.
pub struct PagedBuf {
    pager: Arc<Pager>,
    id: u64,
    backing: Arc<Backing>,
    len: usize,
}

// SAFETY: the bytes are owned by this value and borrowed through its
// accessors under Rust's usual rules; the backing's raw pointer is valid
// from any thread; paging state is behind the pager's mutex.
unsafe impl Send for PagedBuf {}
unsafe impl Sync for PagedBuf {}

impl PagedBuf {
    /// Allocates `bytes` under `pager` (zero-filled; see the type doc).
    ///
    /// Errors: `InvalidArgument` (0 bytes); CPU: `Io` (the directory cannot
    /// hold a file), `OutOfMemory` (more than the backing store's free space,
    /// or the address space); CUDA: `DeviceMemoryExceeded` (more than the
    /// device's free memory without oversubscription allowed), `OutOfMemory`,
    /// `Cuda`.
    pub fn new(pager: &Arc<Pager>, bytes: usize) -> Result<PagedBuf> {
        let (id, backing) = pager.alloc(bytes)?;
        Ok(PagedBuf { pager: pager.clone(), id, backing, len: bytes })
    }

    /// Size in bytes (as requested).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pager(&self) -> &Arc<Pager> {
        &self.pager
    }

    /// The start of the bytes: a host pointer (CPU), or the managed address
    /// valid on the host and the device (CUDA). Page-aligned. Valid until
    /// the buffer is dropped.
    pub fn as_ptr(&self) -> *mut u8 {
        self.backing.ptr()
    }

    /// The managed device address on CUDA, `None` on the CPU.
    pub fn device_ptr(&self) -> Option<u64> {
        match &*self.backing {
            Backing::Cuda(m) => Some(m.ptr()),
            #[cfg(unix)]
            Backing::File(_) => None,
        }
    }

    /// True for CUDA managed memory.
    pub fn is_cuda(&self) -> bool {
        matches!(&*self.backing, Backing::Cuda(_))
    }

    /// The counters of this buffer (budget: the pager's).
    pub fn stats(&self) -> PagedStats {
        self.pager.buf_stats(self.id)
    }

    fn check(&self, range: &Range<usize>, unit: usize, what: &str) -> Result<Range<usize>> {
        let (s, e) = (range.start.checked_mul(unit), range.end.checked_mul(unit));
        match (s, e) {
            (Some(s), Some(e)) if s <= e && e <= self.len => Ok(s..e),
            _ => bail!(InvalidArgument, "paged memory: {what} range {}..{} is outside the buffer's {} bytes", range.start, range.end, self.len),
        }
    }

    /// Starts bringing the byte range in (widened to whole chunks): RAM
    /// readahead on the CPU, an asynchronous migration to the device on
    /// CUDA. Pages out least recently used chunks of any buffer of the
    /// pager where the budget requires. An empty range does nothing.
    /// Errors: `InvalidArgument` (range outside the buffer), `Io`/`Cuda`
    /// (a page-out or page-in failed; no data is lost).
    pub fn prefetch(&self, range: Range<usize>) -> Result<()> {
        let r = self.check(&range, 1, "byte")?;
        self.pager.bring_in(self.id, r, None)
    }

    /// Pushes the byte range out (widened to whole chunks): written to
    /// the backing file and dropped from memory on the CPU, migrated to the
    /// host on CUDA. The bytes stay valid. Errors as [`PagedBuf::prefetch`].
    pub fn evict(&self, range: Range<usize>) -> Result<()> {
        let r = self.check(&range, 1, "byte")?;
        self.pager.push_out(self.id, r)
    }

    /// Makes a byte range ready for host access: on the CPU, brought in now
    /// (faulted in, writable when `write`); on CUDA, migrated to the host and
    /// the stream drained.
    fn host_access(&self, r: &Range<usize>, write: bool) -> Result<()> {
        match &*self.backing {
            Backing::Cuda(m) => {
                self.pager.push_out(self.id, r.clone())?;
                m.synchronize()
            }
            #[cfg(unix)]
            Backing::File(_) => self.pager.bring_in(self.id, r.clone(), Some(write)),
        }
    }

    fn slice(&self, r: &Range<usize>) -> *mut u8 {
        // SAFETY (of callers' use): `r` was checked to lie inside the
        // `len` bytes of the mapping or managed allocation.
        unsafe { self.backing.ptr().add(r.start) }
    }

    /// The bytes of `range`, brought in first.
    pub fn as_bytes(&self, range: Range<usize>) -> Result<&[u8]> {
        let r = self.check(&range, 1, "byte")?;
        self.host_access(&r, false)?;
        // SAFETY: in bounds (checked); the memory lives as long as `self`;
        // no `&mut` borrow can coexist with `&self`; paging never changes
        // the bytes (module doc).
        Ok(unsafe { std::slice::from_raw_parts(self.slice(&r), r.len()) })
    }

    /// The bytes of `range`, brought in first, for writing.
    pub fn as_bytes_mut(&mut self, range: Range<usize>) -> Result<&mut [u8]> {
        let r = self.check(&range, 1, "byte")?;
        self.host_access(&r, true)?;
        // SAFETY: as in `as_bytes`, and `&mut self` makes the borrow exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.slice(&r), r.len()) })
    }

    /// Elements `range` of the buffer read as `f32`s (element `i` at byte
    /// `4i`), brought in first.
    pub fn as_f32(&self, range: Range<usize>) -> Result<&[f32]> {
        let r = self.check(&range, 4, "f32")?;
        self.host_access(&r, false)?;
        // SAFETY: as in `as_bytes`; the base is page-aligned and offsets are
        // multiples of 4, so the f32s are aligned; every bit pattern is an f32.
        Ok(unsafe { std::slice::from_raw_parts(self.slice(&r) as *const f32, range.len()) })
    }

    /// Elements `range` as `f32`s for writing, brought in first.
    pub fn as_f32_mut(&mut self, range: Range<usize>) -> Result<&mut [f32]> {
        let r = self.check(&range, 4, "f32")?;
        self.host_access(&r, true)?;
        // SAFETY: as in `as_f32`, and `&mut self` makes the borrow exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.slice(&r) as *mut f32, range.len()) })
    }
}

impl Drop for PagedBuf {
    fn drop(&mut self) {
        // Unregister first (no page-out may touch the memory after), then the
        // last Arc of the backing unmaps or frees it.
        self.pager.free(self.id);
    }
}
