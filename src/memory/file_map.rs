//! The CPU backing of a paged buffer: an unnamed file in a directory the
//! host chooses, mapped `MAP_SHARED`.
//!
//! Why a shared file mapping: for such a mapping the page cache *is* the
//! memory. `madvise(MADV_DONTNEED)` only removes the pages from this
//! process's page tables; their contents stay in the page cache (dirty or
//! clean) and come back on the next touch, from the cache or from the file.
//! So dropping pages can never lose data, whoever touches them when
//! (unlike private or anonymous memory, where `MADV_DONTNEED` zero-fills).
//! To actually give the memory back, a page-out then writes the dirty pages
//! and drops the clean ones from the page cache:
//!
//! ```text
//! page_out_start  = madvise(DONTNEED)             unmap here (PTE dirty bits move to the page cache)
//!                   sync_file_range(WRITE)        start writing the dirty pages, do not wait
//! page_out_finish = sync_file_range(WAIT|WRITE|WAIT)  wait for them (no fsync: nothing here must
//!                                                     survive a crash, so no disk cache flush)
//!                   posix_fadvise(DONTNEED)       drop the now clean pages from the page cache
//! page_in         = madvise(WILLNEED)             start readahead (prefetch: asynchronous)
//!                 | madvise(POPULATE_READ/WRITE)  fault the range in now (accessors: synchronous)
//! ```
//!
//! The pager finishes a budget eviction's page-outs on its next call, so the
//! write-back overlaps the caller's work (see `paged`).
//!
//! (Other Unix systems: `msync(MS_SYNC)` before `MADV_DONTNEED`, no cache
//! drop, `WILLNEED` only.) A page being touched by another thread during a
//! page-out is safe: it is re-faulted from the page cache, and a page dirty
//! again is skipped by the cache drop.
//!
//! The file is created unnamed (`O_TMPFILE`), or, where the file system
//! lacks that, created by `mkostemp` and unlinked at once, so nothing is left
//! behind after a crash. Its blocks are reserved with `fallocate`, so a write
//! through the mapping can never hit a full disk (which would be a SIGBUS);
//! where `fallocate` is not supported, the free space is checked and the file
//! is extended sparse (a warning is logged).
//!
//! On a memory file system (tmpfs, ramfs) the page cache cannot be dropped:
//! paging out only lowers this process's resident set, the memory stays in
//! use (or goes to swap). [`FileMap::in_memory_fs`] says so, and the pager
//! reports it in its statistics.

use crate::error::Result;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

/// The system's page size (`sysconf(_SC_PAGESIZE)`).
pub fn page_size() -> usize {
    static P: OnceLock<usize> = OnceLock::new();
    *P.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 {
            p as usize
        } else {
            4096
        }
    })
}

/// An unnamed file of `map_len` bytes mapped shared, read-write.
pub(crate) struct FileMap {
    file: File,
    ptr: *mut u8,
    /// Bytes the caller asked for.
    len: usize,
    /// `len` rounded up to whole pages: the file's and the mapping's size.
    map_len: usize,
    in_memory_fs: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value; the
// methods make system calls on it that are safe from any thread (the page
// cache serializes them), and the bytes are accessed only through slices
// whose borrows the owner (PagedBuf) controls.
unsafe impl Send for FileMap {}
unsafe impl Sync for FileMap {}

fn io_err(what: &str, dir: &Path, e: io::Error) -> crate::Error {
    err!(Io, "paged memory: {what} in directory '{}' failed: {e}", dir.display())
}

fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| err!(InvalidArgument, "paged memory: directory '{}' contains a NUL byte", p.display()))
}

/// Opens a new unnamed read-write file in `dir`.
fn open_unnamed(dir: &Path) -> Result<File> {
    let cdir = c_path(dir)?;
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `cdir` is NUL-terminated; open has no other requirements.
        let fd = unsafe { libc::open(cdir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600 as libc::c_uint) };
        if fd >= 0 {
            // SAFETY: a fresh descriptor we own.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        // File systems without O_TMPFILE say EOPNOTSUPP; kernels that do
        // not know the flag open the directory itself (EISDIR).
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL) => {}
            _ => return Err(io_err("creating the backing file (O_TMPFILE)", dir, e)),
        }
    }
    let mut template = dir.as_os_str().as_bytes().to_vec();
    template.extend_from_slice(b"/liblora-paged-XXXXXX\0");
    // SAFETY: `template` is a writable NUL-terminated buffer ending in
    // XXXXXX, as mkostemp requires.
    let fd = unsafe { libc::mkostemp(template.as_mut_ptr() as *mut libc::c_char, libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io_err("creating the backing file", dir, io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: mkostemp wrote the file's name into `template` (still NUL-terminated).
    if unsafe { libc::unlink(template.as_ptr() as *const libc::c_char) } != 0 {
        return Err(io_err("unlinking the backing file", dir, io::Error::last_os_error()));
    }
    Ok(file)
}

/// Bytes an unprivileged writer may still use on `file`'s file system.
fn free_space(file: &File) -> io::Result<u64> {
    // SAFETY: an all-zero statvfs is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a statvfs.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// True for tmpfs and ramfs (where paging out frees no memory).
fn is_memory_fs(file: &File) -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: an all-zero statfs is a valid value to be overwritten.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a pointer to a statfs.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
            return false;
        }
        const RAMFS_MAGIC: i64 = 0x8584_58f6;
        // f_type and the constant are c_long on some targets, u32 on others.
        #[allow(clippy::unnecessary_cast)]
        let (t, tmpfs) = (st.f_type as i64, libc::TMPFS_MAGIC as i64);
        t == tmpfs || t == RAMFS_MAGIC
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        false
    }
}

/// Reserves the file's blocks (`fallocate`), or where the file system
/// cannot, extends it sparse. An error of its own kind for a full disk.
fn reserve(file: &File, dir: &Path, map_len: usize) -> Result<()> {
    let too_big = |e: io::Error| {
        err!(
            OutOfMemory,
            "paged memory: the backing store in '{}' cannot hold {map_len} bytes ({e}); choose another directory or a smaller buffer",
            dir.display()
        )
    };
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a valid descriptor; mode 0 allocates and extends the size.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, map_len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT) => return Err(too_big(e)),
            Some(libc::EOPNOTSUPP) => {
                log!(Warn, "paged memory: '{}' does not support fallocate; the backing file is sparse, and a disk that fills up later would crash writes to the buffer", dir.display());
            }
            _ => return Err(io_err("reserving the backing file's blocks (fallocate)", dir, e)),
        }
    }
    file.set_len(map_len as u64).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EFBIG) => too_big(e),
        _ => io_err("sizing the backing file", dir, e),
    })
}

impl FileMap {
    /// Checks that `dir` can hold backing files (creates and drops an empty one).
    pub fn probe_dir(dir: &Path) -> Result<()> {
        if !dir.is_dir() {
            bail!(Io, "paged memory: '{}' is not a directory (or cannot be read)", dir.display());
        }
        open_unnamed(dir).map(drop)
    }

    /// A new zero-filled mapping of `len` bytes backed by a file in `dir`.
    /// Errors: `InvalidArgument` (len 0), `Io` (the directory cannot hold
    /// the file: missing, not writable, ...), `OutOfMemory` (the file
    /// system's free space, or the address space, is too small).
    pub fn create(dir: &Path, len: usize) -> Result<FileMap> {
        if len == 0 {
            bail!(InvalidArgument, "paged memory: a buffer of 0 bytes was requested");
        }
        let page = page_size();
        let map_len = len
            .checked_next_multiple_of(page)
            .filter(|&m| m <= isize::MAX as usize / 2)
            .ok_or_else(|| err!(OutOfMemory, "paged memory: {len} bytes cannot be mapped in this address space"))?;
        let file = open_unnamed(dir)?;
        let free = free_space(&file).map_err(|e| io_err("querying free space (fstatvfs)", dir, e))?;
        if map_len as u64 > free {
            bail!(
                OutOfMemory,
                "paged memory: a buffer of {len} bytes needs {map_len} bytes of backing store, but '{}' has {free} bytes free",
                dir.display()
            );
        }
        reserve(&file, dir, map_len)?;
        // SAFETY: a fresh shared mapping of the whole (sized) file; no
        // address hint, so nothing existing is replaced.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOMEM) {
                bail!(OutOfMemory, "paged memory: mmap of {map_len} bytes failed: {e}");
            }
            return Err(io_err("mapping the backing file (mmap)", dir, e));
        }
        let in_memory_fs = is_memory_fs(&file);
        if in_memory_fs {
            log!(
                Warn,
                "paged memory: '{}' is a memory file system (tmpfs): paging out will not free memory; set a directory on a disk",
                dir.display()
            );
        }
        Ok(FileMap { file, ptr: p as *mut u8, len, map_len, in_memory_fs })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the backing file lives in memory (tmpfs/ramfs).
    pub fn in_memory_fs(&self) -> bool {
        self.in_memory_fs
    }

    /// `off..off+len` widened to whole pages, clipped to the mapping.
    fn page_range(&self, off: usize, len: usize) -> (usize, usize) {
        let page = page_size();
        let start = off / page * page;
        let end = (off + len).next_multiple_of(page).min(self.map_len);
        (start, end.saturating_sub(start))
    }

    /// Brings `off..off+len` in. `populate`: `None` starts readahead and
    /// returns (a hint); `Some(write)` faults the pages in now, writable
    /// when `write` (Linux 5.14+; older kernels get the hint).
    pub fn page_in(&self, off: usize, len: usize, populate: Option<bool>) -> Result<()> {
        let (start, n) = self.page_range(off, len);
        if n == 0 {
            return Ok(());
        }
        // SAFETY: the range lies inside our mapping.
        let addr = unsafe { self.ptr.add(start) } as *mut libc::c_void;
        #[cfg(target_os = "linux")]
        if let Some(write) = populate {
            let advice = if write { libc::MADV_POPULATE_WRITE } else { libc::MADV_POPULATE_READ };
            // SAFETY: advice on our own mapping; populating changes no contents.
            if unsafe { libc::madvise(addr, n, advice) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                // EFAULT/EIO: the file could not be read back.
                bail!(Io, "paged memory: reading {n} bytes back from the backing file failed (madvise POPULATE): {e}");
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = populate;
        // SAFETY: a hint on our own mapping.
        unsafe { libc::madvise(addr, n, libc::MADV_WILLNEED) };
        Ok(())
    }

    /// First half of a page-out: unmaps the range here and starts writing
    /// its dirty pages to the file, without waiting. The pages stay in the
    /// page cache (as memory) until [`FileMap::page_out_finish`].
    pub fn page_out_start(&self, off: usize, len: usize) -> Result<()> {
        let (start, n) = self.page_range(off, len);
        if n == 0 {
            return Ok(());
        }
        // SAFETY: the range lies inside our mapping.
        let addr = unsafe { self.ptr.add(start) } as *mut libc::c_void;
        #[cfg(not(target_os = "linux"))]
        {
            // SAFETY: msync on our own mapping.
            if unsafe { libc::msync(addr, n, libc::MS_SYNC) } != 0 {
                bail!(Io, "paged memory: writing {n} bytes to the backing file failed (msync): {}", io::Error::last_os_error());
            }
        }
        // SAFETY: for a MAP_SHARED file mapping MADV_DONTNEED only unmaps:
        // the contents stay in the page cache and are re-read on the next
        // touch (the module doc; tests/paged.rs checks it).
        if unsafe { libc::madvise(addr, n, libc::MADV_DONTNEED) } != 0 {
            bail!(Internal, "paged memory: madvise(DONTNEED) failed: {}", io::Error::last_os_error());
        }
        #[cfg(target_os = "linux")]
        if !self.in_memory_fs {
            // SAFETY: a valid descriptor and a range inside the file.
            if unsafe { libc::sync_file_range(self.file.as_raw_fd(), start as libc::off64_t, n as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE) } != 0 {
                bail!(Io, "paged memory: writing {n} bytes to the backing file failed (sync_file_range): {}", io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Second half of a page-out: waits for the write-back of the range and
    /// drops its pages from the page cache (Linux; elsewhere nothing: the
    /// start already wrote them). Pages touched again since stay.
    pub fn page_out_finish(&self, off: usize, len: usize) -> Result<()> {
        let (start, n) = self.page_range(off, len);
        #[cfg(target_os = "linux")]
        if n != 0 && !self.in_memory_fs {
            let fd = self.file.as_raw_fd();
            let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: a valid descriptor and a range inside the file.
            if unsafe { libc::sync_file_range(fd, start as libc::off64_t, n as libc::off64_t, flags) } != 0 {
                // The pages stay dirty in the page cache (not dropped below):
                // nothing is lost while this process runs, but the disk is failing.
                bail!(Io, "paged memory: writing {n} bytes to the backing file failed (sync_file_range): {}", io::Error::last_os_error());
            }
            // SAFETY: a hint on a valid descriptor.
            unsafe { libc::posix_fadvise(fd, start as libc::off_t, n as libc::off_t, libc::POSIX_FADV_DONTNEED) };
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (start, n);
        Ok(())
    }

    /// Bytes of the mapping in memory now (`mincore`: in the page cache,
    /// mapped here or not), in whole pages.
    pub fn bytes_in_memory(&self) -> Result<u64> {
        let page = page_size();
        let pages = self.map_len / page;
        const STEP: usize = 1 << 16; // pages per call: a 64 KiB vector
        let mut vec = vec![0u8; STEP.min(pages)];
        let mut total = 0u64;
        let mut p = 0;
        while p < pages {
            let n = STEP.min(pages - p);
            // SAFETY: the range lies inside our mapping; `vec` has n bytes.
            let r = unsafe { libc::mincore(self.ptr.add(p * page) as *mut libc::c_void, n * page, vec.as_mut_ptr() as *mut _) };
            if r != 0 {
                bail!(Internal, "paged memory: mincore failed: {}", io::Error::last_os_error());
            }
            total += vec[..n].iter().filter(|&&b| b & 1 != 0).count() as u64;
            p += n;
        }
        Ok(total * page as u64)
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; no slice into it outlives
        // its owner (PagedBuf), which drops this last.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.map_len) };
        // The file closes with `self.file`; being unnamed, it is gone.
    }
}

