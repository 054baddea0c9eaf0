//! CUDA managed memory for paged buffers, as bitsandbytes' paged optimizers
//! use it (`get_paged` / `cprefetch` in bitsandbytes 0.50): one
//! `cuMemAllocManaged` allocation per buffer, `cuMemPrefetchAsync` to the
//! device before the optimizer reads it, and (on request: [`ManagedAlloc::prefetch_to_host`])
//! back to the host. Host code here, no kernel.
//!
//! Differences from bitsandbytes, and why:
//! - Attach flag `CU_MEM_ATTACH_GLOBAL` (bitsandbytes: `cudaMemAttachHost`):
//!   kernels on this device's stream may then use the memory on every
//!   device, including those without concurrent managed access, where
//!   host-attached memory needs an extra `cuStreamAttachMemAsync`.
//! - The allocation is refused when it would not fit in the device's free
//!   memory ([`ManagedAlloc::new`]) unless the host allows oversubscription.
//!
//! Fallback (as bitsandbytes'): where the device reports no
//! `CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS` (pre-Pascal GPUs,
//! Windows, some virtualized set-ups), prefetching is not supported: both
//! prefetch directions are no-ops, the driver migrates whole allocations at
//! kernel launch, and the host may touch the memory only while the device is
//! idle ([`ManagedAlloc::synchronize`] waits for the whole context).
//! [`ManagedAlloc::concurrent_access`] says which case holds.

use super::{cu_err, guard, CudaDevice};
use crate::error::Result;
use cudarc::driver::{result, sys};
use std::sync::Arc;

/// One managed allocation on one device.
pub struct ManagedAlloc {
    dev: Arc<CudaDevice>,
    ptr: sys::CUdeviceptr,
    len: usize,
    concurrent: bool,
    oversubscribed: bool,
}

// SAFETY: a managed pointer is a plain address valid in every thread; all
// driver calls bind the device's context to the calling thread first.
unsafe impl Send for ManagedAlloc {}
unsafe impl Sync for ManagedAlloc {}

/// Whether `dev` supports concurrent managed access (and so prefetching).
pub fn concurrent_managed_access(dev: &CudaDevice) -> Result<bool> {
    guard("cuDeviceGetAttribute", || {
        let v = dev
            .ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)
            .map_err(|e| cu_err("cuDeviceGetAttribute(CONCURRENT_MANAGED_ACCESS)", e))?;
        Ok(v != 0)
    })
}

/// `(free, total)` bytes of device memory now (`cuMemGetInfo`).
pub fn mem_info(dev: &CudaDevice) -> Result<(u64, u64)> {
    guard("cuMemGetInfo", || {
        dev.ctx.bind_to_thread().map_err(|e| cu_err("cuCtxSetCurrent", e))?;
        let (free, total) = result::mem_get_info().map_err(|e| cu_err("cuMemGetInfo", e))?;
        Ok((free as u64, total as u64))
    })
}

impl ManagedAlloc {
    /// Allocates `bytes` of managed memory on `dev`.
    ///
    /// `pending` is managed memory already allocated (by the caller's other
    /// buffers) that is not resident on the device yet and so not counted in
    /// the driver's free figure. Unless `allow_oversubscription`, the call
    /// fails with `DeviceMemoryExceeded` when `bytes + pending` exceeds the
    /// device's free memory now; with it, such an allocation succeeds and is
    /// marked [`ManagedAlloc::oversubscribed`] (the driver then evicts pages
    /// to the host under pressure).
    pub fn new(dev: &Arc<CudaDevice>, bytes: usize, pending: u64, allow_oversubscription: bool) -> Result<ManagedAlloc> {
        if bytes == 0 {
            bail!(InvalidArgument, "paged memory: a buffer of 0 bytes was requested");
        }
        let concurrent = concurrent_managed_access(dev)?;
        let (free, total) = mem_info(dev)?;
        let need = (bytes as u64).saturating_add(pending);
        let oversubscribed = need > free;
        if oversubscribed && !allow_oversubscription {
            bail!(
                DeviceMemoryExceeded,
                "paged memory: {bytes} bytes of managed memory (plus {pending} bytes of earlier paged buffers not yet on the device) exceed the {free} bytes free of {total} on {}; allow oversubscription (lora_paging_params.allow_oversubscription) to page beyond device memory",
                dev.describe()
            );
        }
        let ptr = guard("cuMemAllocManaged", || {
            dev.ctx.bind_to_thread().map_err(|e| cu_err("cuCtxSetCurrent", e))?;
            // SAFETY: a fresh allocation; its bytes are only read through
            // slices of u8/f32, for which every bit pattern is valid.
            // Zero-filled (lora_paged_alloc's promise) without a pass over
            // it: cuMemAllocManaged maps no page until first touched, and a
            // page the driver or the kernel maps for a process is cleared
            // (tests/cuda_paged.rs checks fresh buffers read as zeros on
            // the GPU). Clearing explicitly would touch every page, a cost
            // that defeats an oversubscribed buffer.
            unsafe { result::malloc_managed(bytes, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
                .map_err(|e| cu_err(&format!("cuMemAllocManaged({bytes} bytes)"), e))
        })?;
        if !concurrent {
            crate::log!(
                Warn,
                "paged memory on {}: no concurrent managed access; prefetch and evict do nothing and the host may touch the buffer only while the device is idle",
                dev.describe()
            );
        }
        if oversubscribed {
            crate::log!(Info, "paged memory on {}: {bytes} bytes allocated beyond the {free} bytes free (oversubscription allowed)", dev.describe());
        }
        Ok(ManagedAlloc { dev: dev.clone(), ptr, len: bytes, concurrent, oversubscribed })
    }

    /// The managed address: valid on the host and on the device.
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// False where the device lacks concurrent managed access (prefetching
    /// is then a no-op: see the module doc).
    pub fn concurrent_access(&self) -> bool {
        self.concurrent
    }

    /// True when the allocation exceeded the device's free memory (allowed
    /// by the host).
    pub fn oversubscribed(&self) -> bool {
        self.oversubscribed
    }

    fn prefetch(&self, off: usize, len: usize, to: sys::CUmemLocation, what: &str) -> Result<()> {
        if !self.concurrent || len == 0 {
            return Ok(());
        }
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            bail!(InvalidArgument, "paged memory: range {off}+{len} is outside the {} bytes of the buffer", self.len);
        }
        guard("cuMemPrefetchAsync", || {
            self.dev.ctx.bind_to_thread().map_err(|e| cu_err("cuCtxSetCurrent", e))?;
            // SAFETY: the range lies inside this managed allocation, which
            // outlives the stream-ordered prefetch (Drop synchronizes first).
            unsafe { result::mem_prefetch_async(self.ptr + off as u64, len, to, self.dev.stream.cu_stream()) }
                .map_err(|e| cu_err(&format!("cuMemPrefetchAsync({len} bytes {what})"), e))
        })
    }

    /// Queues a migration of `off..off+len` to the device on the device's
    /// stream (kernels queued after it find the pages there).
    pub fn prefetch_to_device(&self, off: usize, len: usize) -> Result<()> {
        let loc = sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: self.dev.ordinal as i32 };
        self.prefetch(off, len, loc, "to the device")
    }

    /// Queues a migration of `off..off+len` back to host memory on the
    /// device's stream.
    pub fn prefetch_to_host(&self, off: usize, len: usize) -> Result<()> {
        let loc = sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, id: 0 };
        self.prefetch(off, len, loc, "to the host")
    }

    /// Waits until the host may touch the memory: for the device's stream,
    /// or, without concurrent managed access, for the whole context.
    pub fn synchronize(&self) -> Result<()> {
        if self.concurrent {
            return self.dev.synchronize();
        }
        guard("cuCtxSynchronize", || self.dev.ctx.synchronize().map_err(|e| cu_err("cuCtxSynchronize", e)))
    }
}

impl Drop for ManagedAlloc {
    fn drop(&mut self) {
        let r = guard("cuMemFree", || {
            // Work queued on the stream may still use the memory.
            self.dev.synchronize()?;
            self.dev.ctx.bind_to_thread().map_err(|e| cu_err("cuCtxSetCurrent", e))?;
            // SAFETY: our own allocation, freed once, after the stream drained.
            unsafe { result::memory_free(self.ptr) }.map_err(|e| cu_err("cuMemFree", e))
        });
        if let Err(e) = r {
            crate::log!(Error, "paged memory: freeing {} bytes of managed memory: {}", self.len, e.message);
        }
    }
}
