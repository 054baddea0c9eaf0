//! `lora_paged`: paged memory for optimizer state (`lora_paged_alloc`), and
//! the paging settings of a context (`lora_context_set_paging`).

use super::context::lora_context;
use super::util::{self, guard, handle, read_params, req_out, Handle};
use super::*;
use crate::error::Result;
use crate::memory::{PagedBuf, PagedStats, PagingConfig};
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;

/// Bytes per chunk, the unit in which paged memory is tracked, brought in
/// and paged out (2 MiB). Prefetch and evict ranges are widened to whole
/// chunks.
pub const LORA_PAGED_CHUNK_BYTES: u64 = 2097152;

/// `lora_paged_stats.bytes_in_memory` when it cannot be measured (CUDA).
pub const LORA_PAGED_UNKNOWN: u64 = 0xFFFF_FFFF_FFFF_FFFF;

/// Flag bits of `lora_paged_stats.flags` (OR over the buffers of a context).
pub type lora_paged_flags = u32;
/// CUDA managed memory: the fast tier is the device, the slow one the host.
pub const LORA_PAGED_FLAG_CUDA_MANAGED: lora_paged_flags = 1;
/// The device lacks concurrent managed access: prefetch and evict do
/// nothing (the driver migrates whole buffers at kernel launch, as with
/// bitsandbytes on such devices), the counters stay 0, and the host may
/// touch the memory only while the device is idle.
pub const LORA_PAGED_FLAG_NO_CONCURRENT_MANAGED_ACCESS: lora_paged_flags = 2;
/// The backing directory is on a memory file system (tmpfs): paging out
/// lowers the process's resident memory but frees no RAM. Choose a
/// directory on a disk.
pub const LORA_PAGED_FLAG_BACKING_IN_MEMORY: lora_paged_flags = 4;
/// Allocated beyond the device's free memory (oversubscription allowed).
pub const LORA_PAGED_FLAG_OVERSUBSCRIBED: lora_paged_flags = 8;

/// Paging settings of a context (`lora_context_set_paging`). Initialize
/// with `lora_paging_default_params()`, then change fields.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_paging_params {
    /// `sizeof(lora_paging_params)`, set by the defaults function.
    pub struct_size: u32,
    /// CUDA: non-zero lets `lora_paged_alloc` ask for more managed memory
    /// than the device has free (the driver then pages to the host);
    /// default 0: such a call fails with `LORA_ERR_DEVICE_MEMORY_EXCEEDED`.
    pub allow_oversubscription: u32,
    /// Most bytes of the context's paged buffers kept in the fast tier (RAM
    /// on the CPU, device memory on CUDA); bringing in more pages out the
    /// least recently used chunks first. 0 (default): no limit, pages move
    /// only on `lora_paged_evict` (or, on CUDA, when the driver needs room).
    pub budget_bytes: u64,
    /// CPU: directory of the backing files (NUL-terminated; copied). NULL
    /// (default): the system temp directory (`$TMPDIR`, else /tmp). Use a
    /// directory on a disk: on tmpfs paging out frees no memory. Files are
    /// unlinked when created, so nothing is left behind, even after a crash.
    pub dir: *const c_char,
}

/// Counters of a paged buffer (`lora_paged_get_stats`) or of all of a
/// context's (`lora_context_paged_stats`). Set `struct_size` to
/// `sizeof(lora_paged_stats)` before the call.
///
/// Byte counts are the pager's accounting of what prefetch, evict and the
/// budget moved: memory touched through the pointer without a prefetch is
/// still served (and not counted). `bytes_resident + bytes_paged_out ==
/// bytes_total` (except for buffers flagged
/// `LORA_PAGED_FLAG_NO_CONCURRENT_MANAGED_ACCESS`, which count in neither);
/// a fresh buffer counts as paged out (zeros on the backing store).
/// Page-ins and page-outs count chunk moves.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_paged_stats {
    /// In: `sizeof(lora_paged_stats)` as compiled by the caller.
    pub struct_size: u32,
    /// `LORA_PAGED_FLAG_*` bits.
    pub flags: lora_paged_flags,
    /// Live buffers (1 for a buffer's own stats).
    pub buffers: u64,
    /// Bytes allocated in them.
    pub bytes_total: u64,
    /// Bytes in the fast tier (RAM on the CPU, device on CUDA).
    pub bytes_resident: u64,
    /// Bytes in the slow tier (backing file on the CPU, host on CUDA).
    pub bytes_paged_out: u64,
    /// Chunks brought into the fast tier so far.
    pub page_ins: u64,
    /// Chunks pushed out to the slow tier so far.
    pub page_outs: u64,
    /// Bytes of those page-ins.
    pub bytes_paged_in_total: u64,
    /// Bytes of those page-outs.
    pub bytes_paged_out_total: u64,
    /// CPU: bytes actually in memory now, measured (`mincore`);
    /// `LORA_PAGED_UNKNOWN` on CUDA.
    pub bytes_in_memory: u64,
    /// The context's budget (0: no limit).
    pub budget_bytes: u64,
}

/// Paged memory: `bytes` that may exceed the fast tier (RAM on the CPU,
/// device memory on CUDA), paged out and back in. Allocate with
/// `lora_paged_alloc`, free with `lora_paged_free`.
///
/// The memory is always valid to read and write through `lora_paged_ptr`:
/// a paged-out byte comes back transparently on access, with the value last
/// written, whatever the budget. `lora_paged_prefetch` (before use) and
/// `lora_paged_evict` (after) are hints that move data ahead of time and
/// keep the context's budget.
///
/// Thread safety: every function may be called concurrently on one buffer
/// or on buffers of one context (paging is serialized inside the context);
/// the bytes themselves are the caller's to synchronize. `lora_paged_free`
/// must not race with any other use of the buffer. A buffer keeps what it
/// needs of its context alive: it may outlive the context.
pub struct lora_paged {
    tag: u64,
    inner: PagedBuf,
}

impl Handle for lora_paged {
    const TAG: u64 = 0x6c6f_7261_7061_6764; // "lorapagd"
    fn tag(&self) -> u64 {
        self.tag
    }
}

/// Default paging parameters: no budget, the system temp directory, no
/// oversubscription.
#[no_mangle]
pub extern "C" fn lora_paging_default_params() -> lora_paging_params {
    lora_paging_params { struct_size: std::mem::size_of::<lora_paging_params>() as u32, allow_oversubscription: 0, budget_bytes: 0, dir: std::ptr::null() }
}

fn dir_of(p: *const c_char) -> Result<Option<PathBuf>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the host passes a NUL-terminated string (header contract).
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        crate::bail!(InvalidArgument, "lora_paging_params.dir is an empty string (NULL means the temp directory)");
    }
    #[cfg(unix)]
    let path = PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(bytes));
    #[cfg(not(unix))]
    let path = PathBuf::from(std::str::from_utf8(bytes).map_err(|_| crate::err!(InvalidArgument, "lora_paging_params.dir is not UTF-8"))?);
    Ok(Some(path))
}

/// Sets the paging of the context's paged buffers; `params` NULL restores
/// the defaults. The budget applies at once to every buffer of the context
/// (a lower one pages out the least recently used chunks now); the
/// directory applies to later allocations and is checked now (it must
/// exist and accept a new file). On failure nothing changes.
///
/// Thread safety: may be called while other threads use the context's
/// buffers; not concurrently with `lora_context_free`.
///
/// Errors: `LORA_ERR_NULL_POINTER` (ctx), `LORA_ERR_INVALID_STATE` (freed
/// ctx), `LORA_ERR_STRUCT_SIZE`, `LORA_ERR_INVALID_ARGUMENT` (empty dir),
/// `LORA_ERR_IO` (dir missing, not a directory or not writable; a page-out
/// the new budget forced failed).
#[no_mangle]
pub unsafe extern "C" fn lora_context_set_paging(ctx: *mut lora_context, params: *const lora_paging_params) -> lora_status {
    guard(|| {
        let c = handle(ctx as *const lora_context, "ctx")?;
        let p = read_params(params, lora_paging_default_params(), std::mem::size_of::<lora_paging_params>(), "lora_paging_params")?;
        let cfg = PagingConfig { budget_bytes: p.budget_bytes, dir: dir_of(p.dir)?, allow_oversubscription: p.allow_oversubscription != 0 };
        c.inner.pager.set_config(cfg)
    })
}

/// Allocates `bytes` of paged memory under `ctx`, zero-filled; `*out`
/// receives the buffer (free it with `lora_paged_free`), written only on
/// success.
///
/// CPU context: backed by a new unlinked file in the paging directory,
/// mapped shared, its blocks reserved now. CUDA context: managed memory
/// (`cuMemAllocManaged`), valid on the host and the device.
///
/// Errors: `LORA_ERR_NULL_POINTER` (ctx, out), `LORA_ERR_INVALID_STATE`
/// (freed ctx), `LORA_ERR_INVALID_ARGUMENT` (bytes is 0), `LORA_ERR_IO` (the
/// paging directory cannot hold the file), `LORA_ERR_OUT_OF_MEMORY` (more
/// than the backing store's free space or the address space; CUDA: the
/// driver's out of memory), `LORA_ERR_DEVICE_MEMORY_EXCEEDED` (CUDA: more
/// than the device's free memory, counting earlier paged buffers not yet on
/// the device, without `allow_oversubscription`), `LORA_ERR_CUDA`.
#[no_mangle]
pub unsafe extern "C" fn lora_paged_alloc(ctx: *const lora_context, bytes: usize, out: *mut *mut lora_paged) -> lora_status {
    guard(|| {
        let c = handle(ctx, "ctx")?;
        let out = req_out(out, "out")?;
        let b = PagedBuf::new(&c.inner.pager, bytes)?;
        *out = util::into_handle(lora_paged { tag: lora_paged::TAG, inner: b });
        Ok(())
    })
}

/// Frees a buffer and its backing (the file's blocks, the managed memory).
/// NULL is a no-op; so is a second free of the same handle where it can be
/// detected (never rely on it). Pointers from `lora_paged_ptr` become
/// invalid: on the CPU the range is unmapped, so a later access faults.
#[no_mangle]
pub unsafe extern "C" fn lora_paged_free(buf: *mut lora_paged) {
    util::guard_value((), || util::free_handle(buf, |h| h.tag = 0))
}

/// The buffer's memory into `*out`: page-aligned, `lora_paged_size` bytes,
/// valid until `lora_paged_free`. On CUDA the managed address, usable on
/// the host and in kernels.
///
/// Errors: `LORA_ERR_NULL_POINTER` (buf, out), `LORA_ERR_INVALID_STATE`
/// (freed buf).
#[no_mangle]
pub unsafe extern "C" fn lora_paged_ptr(buf: *const lora_paged, out: *mut *mut c_void) -> lora_status {
    guard(|| {
        let b = handle(buf, "buf")?;
        let out = req_out(out, "out")?;
        *out = b.inner.as_ptr() as *mut c_void;
        Ok(())
    })
}

/// The buffer's size in bytes (as allocated) into `*out`.
///
/// Errors: `LORA_ERR_NULL_POINTER` (buf, out), `LORA_ERR_INVALID_STATE`
/// (freed buf).
#[no_mangle]
pub unsafe extern "C" fn lora_paged_size(buf: *const lora_paged, out: *mut usize) -> lora_status {
    guard(|| {
        let b = handle(buf, "buf")?;
        let out = req_out(out, "out")?;
        *out = b.inner.len();
        Ok(())
    })
}

fn range_of(b: &lora_paged, offset: usize, bytes: usize) -> Result<std::ops::Range<usize>> {
    match offset.checked_add(bytes) {
        Some(end) if end <= b.inner.len() => Ok(offset..end),
        _ => crate::bail!(InvalidArgument, "range offset {offset} + {bytes} bytes is outside the buffer's {} bytes", b.inner.len()),
    }
}

/// Hint: bytes `offset .. offset+bytes` will be used soon. Starts bringing
/// them in (widened to whole chunks of `LORA_PAGED_CHUNK_BYTES`): readahead
/// into RAM on the CPU, an asynchronous migration to the device on CUDA
/// (ordered before later work on the context's stream). Where the budget
/// requires, the least recently used chunks of the context's buffers are
/// paged out first (never those of this range). `bytes` 0 does nothing.
///
/// Errors: `LORA_ERR_NULL_POINTER` (buf), `LORA_ERR_INVALID_STATE` (freed
/// buf), `LORA_ERR_INVALID_ARGUMENT` (range past the end),
/// `LORA_ERR_IO` / `LORA_ERR_CUDA` (moving pages failed; no data is lost).
#[no_mangle]
pub unsafe extern "C" fn lora_paged_prefetch(buf: *mut lora_paged, offset: usize, bytes: usize) -> lora_status {
    guard(|| {
        let b = handle(buf as *const lora_paged, "buf")?;
        let r = range_of(b, offset, bytes)?;
        b.inner.prefetch(r)
    })
}

/// Hint: bytes `offset .. offset+bytes` are not needed for a while. Pages
/// them out (widened to whole chunks): written to the backing file and
/// dropped from RAM on the CPU, migrated to the host on CUDA. The bytes
/// stay valid and come back on access. `bytes` 0 does nothing.
///
/// Errors: as `lora_paged_prefetch`.
#[no_mangle]
pub unsafe extern "C" fn lora_paged_evict(buf: *mut lora_paged, offset: usize, bytes: usize) -> lora_status {
    guard(|| {
        let b = handle(buf as *const lora_paged, "buf")?;
        let r = range_of(b, offset, bytes)?;
        b.inner.evict(r)
    })
}

fn write_stats(s: &PagedStats, out: *mut lora_paged_stats) -> Result<()> {
    let out = req_out(out, "out")?;
    let full = std::mem::size_of::<lora_paged_stats>();
    let size = out.struct_size as usize;
    if size != full {
        crate::bail!(StructSize, "lora_paged_stats.struct_size is {size}; this liblora writes {full} (set it to sizeof(lora_paged_stats))");
    }
    *out = lora_paged_stats {
        struct_size: out.struct_size,
        flags: s.flags,
        buffers: s.buffers,
        bytes_total: s.bytes_total,
        bytes_resident: s.bytes_resident,
        bytes_paged_out: s.bytes_paged_out,
        page_ins: s.page_ins,
        page_outs: s.page_outs,
        bytes_paged_in_total: s.bytes_paged_in_total,
        bytes_paged_out_total: s.bytes_paged_out_total,
        bytes_in_memory: s.bytes_in_memory.unwrap_or(LORA_PAGED_UNKNOWN),
        budget_bytes: s.budget_bytes,
    };
    Ok(())
}

/// The buffer's counters into `*out` (set `out->struct_size` first).
///
/// Errors: `LORA_ERR_NULL_POINTER` (buf, out), `LORA_ERR_INVALID_STATE`
/// (freed buf), `LORA_ERR_STRUCT_SIZE`.
#[no_mangle]
pub unsafe extern "C" fn lora_paged_get_stats(buf: *const lora_paged, out: *mut lora_paged_stats) -> lora_status {
    guard(|| {
        let b = handle(buf, "buf")?;
        write_stats(&b.inner.stats(), out)
    })
}

/// The counters of all the context's paged buffers into `*out` (set
/// `out->struct_size` first): totals over the live buffers, cumulative
/// page-ins and page-outs over all, freed ones included.
///
/// Errors: `LORA_ERR_NULL_POINTER` (ctx, out), `LORA_ERR_INVALID_STATE`
/// (freed ctx), `LORA_ERR_STRUCT_SIZE`.
#[no_mangle]
pub unsafe extern "C" fn lora_context_paged_stats(ctx: *const lora_context, out: *mut lora_paged_stats) -> lora_status {
    guard(|| {
        let c = handle(ctx, "ctx")?;
        write_stats(&c.inner.pager.stats(), out)
    })
}
