//! The CUDA backend, through cudarc with dynamic loading: the library builds
//! without a CUDA toolkit and finds the driver at run time. cudarc panics
//! when a library it needs is missing, so presence is checked first and
//! every call into it runs behind `catch_unwind`.
//!
//! Kernels live in `cuda/*.cu` (one file per family, embedded with
//! `include_str!`), are compiled by NVRTC at first use to a CUBIN for the
//! device's own `sm_XY` ([`nvrtc`]), and are loaded once per device. Each
//! family has its launcher module here (argument checks, launch shapes):
//! [`nf4`] for `cuda/nf4.cu`, [`dense`] for `cuda/dense.cu`; the training
//! step's elementwise and reduction ops [`norm`], [`rope`], [`swiglu`],
//! [`embed`], [`loss`] (cross-entropy, gradient norm) and [`adamw`]; the
//! LoRA products [`lora`]; causal grouped-query attention [`attention`]
//! (forward, backward, decode); [`elementwise`] (sums, bias, bf16
//! conversion). Dense matrix products go through cuBLAS ([`blas`]).
//! [`paged`] holds
//! the managed memory of paged buffers (host code only).
//!
//! Streams: a [`CudaDevice`] owns exactly one stream and all its work,
//! copies included, is ordered on it; buffers used with a device must have
//! been allocated on that device's stream (the launchers check).

/// Queues kernel `$f` (a `CudaFunction`) on `$dev`'s stream with
/// `$cfg` and the arguments in order, mapping a driver error or a cudarc
/// panic to an error naming `$name`. Launching is unsafe: each call site
/// says, in a `// SAFETY:` comment, why the arguments match the kernel's
/// parameters and the buffers cover what the launch shape touches.
macro_rules! launch_kernel {
    ($dev:expr, $f:expr, $name:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let name: &str = $name;
        $crate::backend::cuda::guard(name, || {
            let mut b = $dev.stream.launch_builder(&$f);
            $( cudarc::driver::PushKernelArg::arg(&mut b, $arg); )*
            // SAFETY: see the call site's SAFETY comment.
            unsafe { b.launch($cfg) }.map_err(|e| $crate::backend::cuda::cu_err(&format!("cuLaunchKernel({name})"), e))?;
            Ok(())
        })
    }};
}

pub mod adamw;
pub mod attention;
pub mod blas;
pub mod buffer;
pub mod dense;
pub mod elementwise;
pub mod embed;
pub mod lora;
pub mod loss;
pub mod nf4;
pub mod norm;
pub mod nvrtc;
pub mod paged;
pub mod rope;
pub mod swiglu;

pub use buffer::{DevBuffer, DevElems, DevElemsMut};

use crate::error::{Error, ErrorKind, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, DriverError};
use nvrtc::KernelSource;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// `cuda/nf4.cu`: NF4 quantize, dequantize, absmax decode, fused GEMV.
pub static NF4_CU: KernelSource = KernelSource { name: "nf4.cu", src: include_str!("../../../cuda/nf4.cu") };
/// `cuda/dense.cu`: dense bf16 GEMV.
pub static DENSE_CU: KernelSource = KernelSource { name: "dense.cu", src: include_str!("../../../cuda/dense.cu") };
/// `cuda/norm.cu`: RMSNorm forward and backward.
pub static NORM_CU: KernelSource = KernelSource { name: "norm.cu", src: include_str!("../../../cuda/norm.cu") };
/// `cuda/rope.cu`: rotary position embeddings, forward and backward.
pub static ROPE_CU: KernelSource = KernelSource { name: "rope.cu", src: include_str!("../../../cuda/rope.cu") };
/// `cuda/swiglu.cu`: SwiGLU gating, forward and backward.
pub static SWIGLU_CU: KernelSource = KernelSource { name: "swiglu.cu", src: include_str!("../../../cuda/swiglu.cu") };
/// `cuda/embed.cu`: embedding gather.
pub static EMBED_CU: KernelSource = KernelSource { name: "embed.cu", src: include_str!("../../../cuda/embed.cu") };
/// `cuda/loss.cu`: fused cross-entropy, gradient norm and clipping.
pub static LOSS_CU: KernelSource = KernelSource { name: "loss.cu", src: include_str!("../../../cuda/loss.cu") };
/// `cuda/adamw.cu`: the AdamW update.
pub static ADAMW_CU: KernelSource = KernelSource { name: "adamw.cu", src: include_str!("../../../cuda/adamw.cu") };
/// `cuda/lora.cu`: the LoRA products (shrink, expand, mixed-adapter BGMV, backward).
pub static LORA_CU: KernelSource = KernelSource { name: "lora.cu", src: include_str!("../../../cuda/lora.cu") };
/// `cuda/attention.cu`: causal grouped-query attention (forward, backward, decode).
pub static ATTENTION_CU: KernelSource = KernelSource { name: "attention.cu", src: include_str!("../../../cuda/attention.cu") };
/// `cuda/attention_tc.cu`: causal GQA attention on tensor cores (bf16
/// operands, fp32 accumulation), forward and backward.
pub static ATTENTION_TC_CU: KernelSource = KernelSource { name: "attention_tc.cu", src: include_str!("../../../cuda/attention_tc.cu") };
/// `cuda/elementwise.cu`: sums, bias add, fp32 → bf16 conversion.
pub static ELEMENTWISE_CU: KernelSource = KernelSource { name: "elementwise.cu", src: include_str!("../../../cuda/elementwise.cu") };
/// Every kernel source of the library (tests compile each of them).
pub static SOURCES: &[&KernelSource] = &[&NF4_CU, &DENSE_CU, &NORM_CU, &ROPE_CU, &SWIGLU_CU, &EMBED_CU, &LOSS_CU, &ADAMW_CU, &LORA_CU, &ATTENTION_CU, &ATTENTION_TC_CU, &ELEMENTWISE_CU];

/// An opened CUDA device (its primary context), its one stream, and the
/// kernels loaded on it so far.
pub struct CudaDevice {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub name: String,
    pub ordinal: usize,
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors (launch grids are sized by them).
    pub multiprocessors: u32,
    /// Dynamic shared memory a block may opt in to, bytes
    /// (`MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`: 227 KiB on an H100, 163 KiB on
    /// an A100, 99 KiB on sm_86/sm_89 cards).
    pub max_smem_optin: u32,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl CudaDevice {
    pub fn describe(&self) -> String {
        let (ma, mi) = self.compute_capability;
        format!("cuda:{} {} (sm_{ma}{mi})", self.ordinal, self.name)
    }

    /// The real architecture kernels are compiled for: `sm_XY` from the
    /// device's compute capability.
    pub fn arch(&self) -> String {
        let (ma, mi) = self.compute_capability;
        format!("sm_{ma}{mi}")
    }

    /// The device's stream: all of this device's work is ordered on it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Waits for all work queued on the device's stream.
    pub fn synchronize(&self) -> Result<()> {
        guard("cuStreamSynchronize", || self.stream.synchronize().map_err(|e| cu_err("cuStreamSynchronize", e)))
    }

    /// Copies a host slice into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        guard("cuMemcpyHtoDAsync", || self.stream.clone_htod(host).map_err(|e| cu_err("cuMemAlloc/cuMemcpyHtoDAsync", e)))
    }

    /// Copies a host slice into an existing device buffer (`dst.len() ≥
    /// host.len()`).
    pub fn upload_into<T: DeviceRepr, D: DevicePtrMut<T>>(&self, host: &[T], dst: &mut D) -> Result<()> {
        guard("cuMemcpyHtoDAsync", || self.stream.memcpy_htod(host, dst).map_err(|e| cu_err("cuMemcpyHtoDAsync", e)))
    }

    /// Copies device memory into another device buffer, queued on the stream.
    pub fn copy<T: DeviceRepr, S: DevicePtr<T>, D: DevicePtrMut<T>>(&self, src: &S, dst: &mut D) -> Result<()> {
        guard("cuMemcpyDtoDAsync", || self.stream.memcpy_dtod(src, dst).map_err(|e| cu_err("cuMemcpyDtoDAsync", e)))
    }

    /// Copies device memory (a buffer or view) into a new device buffer.
    pub fn duplicate<T: DeviceRepr, S: DevicePtr<T>>(&self, src: &S) -> Result<CudaSlice<T>> {
        guard("cuMemcpyDtoDAsync", || self.stream.clone_dtod(src).map_err(|e| cu_err("cuMemAlloc/cuMemcpyDtoDAsync", e)))
    }

    /// Copies a device buffer (or view) back to a new host vector (waits for
    /// the stream).
    pub fn download<T: DeviceRepr, S: DevicePtr<T>>(&self, dev: &S) -> Result<Vec<T>> {
        self.check_stream(dev, "download source")?;
        guard("cuMemcpyDtoHAsync", || self.stream.clone_dtoh(dev).map_err(|e| cu_err("cuMemcpyDtoHAsync", e)))
    }

    /// A new device buffer of `n` elements whose every byte is `byte` (0xFF
    /// gives NaN in every float type: tests poison outputs with it).
    pub fn alloc_filled<T: DeviceRepr>(&self, n: usize, byte: u8) -> Result<CudaSlice<T>> {
        guard("cuMemAlloc", || {
            // SAFETY: the memory is written by the memset below before any
            // read, in stream order.
            let mut s = unsafe { self.stream.alloc::<T>(n) }.map_err(|e| cu_err(&format!("cuMemAlloc({} bytes)", n * std::mem::size_of::<T>()), e))?;
            self.fill_bytes(&mut s, byte)?;
            Ok(s)
        })
    }

    /// Sets every byte of `s` to `byte`.
    pub fn fill_bytes<T>(&self, s: &mut CudaSlice<T>, byte: u8) -> Result<()> {
        self.check_stream(s, "fill target")?;
        guard("cuMemsetD8Async", || {
            let bytes = s.num_bytes();
            if bytes == 0 {
                return Ok(());
            }
            let (ptr, _rec) = s.device_ptr(&self.stream);
            // SAFETY: `ptr` addresses `bytes` bytes owned by `s`, which
            // outlives the stream-ordered memset (freeing is stream-ordered).
            unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, bytes, self.stream.cu_stream()) }.map_err(|e| cu_err("cuMemsetD8Async", e))
        })
    }

    /// Refuses a buffer that was allocated on another stream (another device,
    /// or another `CudaDevice` of the same one): this device orders its work
    /// on its own stream only, so such a buffer could be used before it is
    /// ready or freed while in use.
    pub(crate) fn check_stream<T, S: DeviceSlice<T>>(&self, s: &S, what: &str) -> Result<()> {
        if !Arc::ptr_eq(s.stream(), &self.stream) {
            bail!(InvalidArgument, "{what} was allocated on another stream than {}'s; allocate it through this CudaDevice", self.describe());
        }
        Ok(())
    }

    /// The loaded module of `k` on this device, compiling it on first use.
    fn module(&self, k: &'static KernelSource) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock();
        if let Some(m) = mods.get(k.name) {
            return Ok(m.clone());
        }
        let arch = self.arch();
        let cubin = nvrtc::cubin_cached(k, &arch).map_err(|e| e.context(&format!("compiling cuda/{} for {}", k.name, self.describe())))?;
        let m = guard("cuModuleLoadData", || {
            self.ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()))
                .map_err(|e| cu_err(&format!("cuModuleLoadData(cuda/{}, {arch} CUBIN)", k.name), e))
        })?;
        mods.insert(k.name, m.clone());
        Ok(m)
    }

    /// Kernel `name` of source `k`, loaded on this device (cached).
    pub(crate) fn function(&self, k: &'static KernelSource, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().get(&(k.name, name)) {
            return Ok(f.clone());
        }
        let m = self.module(k)?;
        let f = guard("cuModuleGetFunction", || m.load_function(name).map_err(|e| cu_err(&format!("cuModuleGetFunction({name} in cuda/{})", k.name), e)))?;
        self.functions.lock().insert((k.name, name), f.clone());
        Ok(f)
    }

    /// Reads (`set` None) or sets an attribute of the device's default
    /// memory pool, the pool every stream-ordered buffer of this crate
    /// comes from; returns the value read (or set).
    fn pool_attribute(&self, attr: cudarc::driver::sys::CUmemPool_attribute, set: Option<u64>) -> Result<u64> {
        use cudarc::driver::sys;
        guard("cuMemPool attribute", || {
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: out-pointer to a local; ordinal of an open device.
            unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.ordinal as i32) }.result().map_err(|e| cu_err("cuDeviceGetDefaultMemPool", e))?;
            let mut v: u64 = set.unwrap_or(0);
            let p = &mut v as *mut u64 as *mut std::ffi::c_void;
            // SAFETY: the attributes used here are cuuint64_t values.
            let r = unsafe { if set.is_some() { sys::cuMemPoolSetAttribute(pool, attr, p) } else { sys::cuMemPoolGetAttribute(pool, attr, p) } };
            r.result().map_err(|e| cu_err(&format!("cuMemPool{}Attribute({attr:?})", if set.is_some() { "Set" } else { "Get" }), e))?;
            Ok(v)
        })
    }

    /// Lets the memory pool keep freed memory instead of returning it to
    /// the driver at every synchronization (a training step frees and
    /// allocates the same buffers every time).
    pub fn keep_freed_memory(&self) -> Result<()> {
        self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX)).map(|_| ())
    }

    /// Peak bytes in use in the memory pool (every stream-ordered buffer of
    /// the crate on this device) since the last [`reset_pool_peak`](Self::reset_pool_peak).
    pub fn pool_peak_bytes(&self) -> Result<u64> {
        self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)
    }

    /// Bytes the memory pool holds from the driver now (in use or kept).
    pub fn pool_reserved_bytes(&self) -> Result<u64> {
        self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, None)
    }

    /// Bytes in use in the memory pool now.
    pub fn pool_used_bytes(&self) -> Result<u64> {
        self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT, None)
    }

    /// Waits for the stream, then returns the pool's unused memory to the
    /// driver ([`keep_freed_memory`](Self::keep_freed_memory) keeps it
    /// otherwise): after a model leaves the device, its memory is free for
    /// other programs again.
    pub fn trim_pool(&self) -> Result<()> {
        use cudarc::driver::sys;
        self.synchronize()?;
        guard("cuMemPoolTrimTo", || {
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: out-pointer to a local; ordinal of an open device.
            unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.ordinal as i32) }.result().map_err(|e| cu_err("cuDeviceGetDefaultMemPool", e))?;
            // SAFETY: the device's default pool; trimming frees only unused memory.
            unsafe { sys::cuMemPoolTrimTo(pool, 0) }.result().map_err(|e| cu_err("cuMemPoolTrimTo", e))
        })
    }

    /// Resets [`pool_peak_bytes`](Self::pool_peak_bytes) to the bytes in use now.
    pub fn reset_pool_peak(&self) -> Result<()> {
        self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0)).map(|_| ())
    }

    /// Loads every kernel family now (compiling with NVRTC where needed), so
    /// a missing NVRTC or a compile error shows at start-up, not mid-run.
    pub fn load_all_kernels(&self) -> Result<()> {
        for k in SOURCES {
            self.module(k)?;
        }
        Ok(())
    }
}

/// `gridDim.x` of a grid-stride kernel over `n` items with `threads` per
/// block: enough blocks to cover `n`, capped at 2^16 (more than any GPU runs
/// at once; the loop covers the rest), at least 1.
/// A soft cap as the kernels take it (Gemma 2's `c·tanh(x/c)`): 0 for
/// none, else the cap, which must be finite and positive
/// (`InvalidArgument`, naming `what`).
pub(crate) fn cap_arg(what: &str, cap: Option<f32>) -> Result<f32> {
    match cap {
        None => Ok(0.0),
        Some(c) if c.is_finite() && c > 0.0 => Ok(c),
        Some(c) => bail!(InvalidArgument, "{what}: the soft cap {c} must be finite and positive"),
    }
}

pub(crate) fn stride_grid(n: u64, threads: u32) -> u32 {
    n.div_ceil(threads as u64).clamp(1, 1 << 16) as u32
}

/// A launch configuration without dynamic shared memory.
pub(crate) fn launch_cfg(grid: (u32, u32), block: u32) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// The device address of a kernel's optional output of `n` elements (0 for
/// none: the kernels skip a null output), after the length and stream
/// checks; `what` names it in errors.
pub(crate) fn out_ptr<T>(dev: &CudaDevice, n: usize, v: Option<&mut cudarc::driver::CudaViewMut<'_, T>>, what: &str) -> Result<u64> {
    let Some(v) = v else { return Ok(0) };
    if v.len() != n {
        bail!(BufferSize, "{what} has {} elements, needs {n}", v.len());
    }
    dev.check_stream(v, what)?;
    Ok(v.device_ptr(&dev.stream).0)
}

/// An uninitialized device buffer of `n` elements for a kernel's scratch
/// (the kernels write every element they later read).
pub(crate) fn scratch<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    guard("cuMemAlloc", || {
        // SAFETY: callers only hand the buffer to kernels that write each
        // element before any read of it, in stream order.
        unsafe { dev.stream.alloc::<T>(n.max(1)) }.map_err(|e| cu_err(&format!("cuMemAlloc({} bytes)", n.max(1) * std::mem::size_of::<T>()), e))
    })
}

/// Maps a driver error of `call` to the crate's error: out-of-memory to
/// [`ErrorKind::OutOfMemory`] (a caller can act on it), everything else to
/// [`ErrorKind::Cuda`], naming the call and the driver's error.
pub(crate) fn cu_err(call: &str, e: DriverError) -> Error {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let kind = if e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY { ErrorKind::OutOfMemory } else { ErrorKind::Cuda };
    Error::new(kind, format!("{call} failed: {name} ({text})"))
}

/// Runs `f`, which calls into cudarc, turning a panic inside cudarc (a
/// missing driver symbol, a violated cudarc assertion) into an error.
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            bail!(Cuda, "{what}: cudarc panicked: {msg}")
        }
    }
}

/// True when the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only attempts to dlopen the driver library by its usual names.
    catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// True when NVRTC (`libnvrtc.so`) can be loaded: the library named by
/// `LORA_NVRTC_LIB` if that is set (see [`nvrtc`]), else one the dynamic
/// loader finds. [`nvrtc::ensure`] says why not.
pub fn nvrtc_present() -> bool {
    nvrtc::ensure().is_ok()
}

/// Opens CUDA device `ordinal`, or says why not (no driver, no device,
/// driver too old for the symbols we need, ordinal out of range).
pub fn open(ordinal: usize) -> Result<CudaDevice> {
    if !driver_present() {
        bail!(CudaUnavailable, "CUDA driver library (libcuda.so) not found: no NVIDIA driver on this machine");
    }
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<CudaDevice> {
        let count = CudaContext::device_count().map_err(|e| err!(CudaUnavailable, "cuDeviceGetCount failed: {e:?}"))?;
        if count <= 0 {
            bail!(CudaUnavailable, "the CUDA driver reports no devices");
        }
        if ordinal >= count as usize {
            bail!(CudaUnavailable, "CUDA device {ordinal} requested, but only {count} present");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| err!(CudaUnavailable, "cuCtx for device {ordinal}: {e:?}"))?;
        // SAFETY: all work of this CudaDevice goes to the one stream created
        // below (buffers from other streams are refused by check_stream), so
        // stream order alone keeps every use after its allocation and
        // before its free; cudarc's per-buffer events would only add two
        // driver calls per argument to every launch.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cu_err("cuStreamCreate", e))?;
        let name = ctx.name().map_err(|e| err!(Cuda, "cuDeviceGetName: {e:?}"))?;
        let cc = ctx.compute_capability().map_err(|e| err!(Cuda, "cuDeviceGetAttribute(compute capability): {e:?}"))?;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| err!(Cuda, "cuDeviceGetAttribute(multiprocessor count): {e:?}"))?;
        let optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| err!(Cuda, "cuDeviceGetAttribute(opt-in shared memory per block): {e:?}"))?;
        Ok(CudaDevice {
            ctx,
            stream,
            name,
            ordinal,
            compute_capability: cc,
            multiprocessors: sms.max(1) as u32,
            max_smem_optin: optin.max(0) as u32,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }));
    match r {
        Ok(r) => r,
        Err(_) => bail!(CudaUnavailable, "the CUDA driver library is present but lacks a symbol cudarc needs (driver too old?)"),
    }
}
