//! The CUDA backend, through cudarc with dynamic loading: the library builds
//! without a CUDA toolkit and finds the driver at run time. cudarc panics
//! when a library it needs is missing, so presence is checked first and
//! every call into it runs behind `catch_unwind`.

use crate::error::Result;
use cudarc::driver::CudaContext;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// An opened CUDA device (its primary context).
pub struct CudaDevice {
    pub(crate) ctx: Arc<CudaContext>,
    pub name: String,
    pub ordinal: usize,
    pub compute_capability: (i32, i32),
}

impl CudaDevice {
    pub fn describe(&self) -> String {
        let (ma, mi) = self.compute_capability;
        format!("cuda:{} {} (sm_{ma}{mi})", self.ordinal, self.name)
    }
}

/// True when the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only attempts to dlopen the driver library by its usual names.
    catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// True when NVRTC (`libnvrtc.so`) can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only attempts to dlopen the NVRTC library by its usual names.
    catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
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
        let name = ctx.name().map_err(|e| err!(Cuda, "cuDeviceGetName: {e:?}"))?;
        let cc = ctx.compute_capability().map_err(|e| err!(Cuda, "cuDeviceGetAttribute(compute capability): {e:?}"))?;
        Ok(CudaDevice { ctx, name, ordinal, compute_capability: cc })
    }));
    match r {
        Ok(r) => r,
        Err(_) => bail!(CudaUnavailable, "the CUDA driver library is present but lacks a symbol cudarc needs (driver too old?)"),
    }
}
