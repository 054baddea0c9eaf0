//! Dense matrix products through cuBLAS (`cublasGemmEx`), row-major, fp32
//! accumulation, with fp32 or bf16 operands and an fp32 output (or, from
//! bf16 operands, a bf16 one: [`GemmOut`]). cuBLAS is
//! loaded at run time like the driver (cudarc's dynamic loading):
//! `libcublas.so.13` from the CUDA toolkit, the loader's path, or the
//! `nvidia-cublas` wheel's directory on `LD_LIBRARY_PATH`. A missing
//! library is [`ErrorKind::CudaUnavailable`](crate::ErrorKind), named.
//!
//! The CPU twin is [`crate::backend::cpu::matmul::gemm_f32`]: with fp32
//! operands the result agrees within fp32 accumulation error (cuBLAS may
//! split `k` and sum in any order; `CUBLAS_COMPUTE_32F` keeps TF32 off
//! unless `NVIDIA_TF32_OVERRIDE=1` is set); with bf16 operands it is the
//! product of the rounded operands, accumulated in fp32.

use super::{cu_err, guard, CudaDevice};
use crate::dtype::DType;
use crate::error::Result;
use cudarc::cublas::sys::{self as cb, cublasComputeType_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr};
use std::ffi::c_void;
use std::marker::PhantomData;

/// cuBLAS workspace (cuBLAS's own recommendation for Hopper is 32 MiB).
const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLAS handle bound to one device's stream, with its workspace.
pub struct Blas {
    handle: cb::cublasHandle_t,
    _workspace: CudaSlice<u8>,
}

// SAFETY: the handle is used only through `&Blas` by calls that enqueue on
// the device's one stream; cuBLAS handles may be used from any thread as
// long as calls on one handle are not concurrent, which the owners (a
// model under a mutex) guarantee.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

fn blas_err(call: &str, e: cudarc::cublas::result::CublasError) -> crate::error::Error {
    err!(Cuda, "{call} failed: {:?}", e.0)
}

impl Blas {
    /// Loads cuBLAS, creates a handle on `dev`'s stream and gives it a
    /// stream-ordered workspace.
    pub fn new(dev: &CudaDevice) -> Result<Blas> {
        // SAFETY: only tries to dlopen libcublas by its usual names.
        let present = std::panic::catch_unwind(|| unsafe { cb::is_culib_present() }).unwrap_or(false);
        if !present {
            bail!(CudaUnavailable, "cuBLAS (libcublas.so.13) not found: install the CUDA toolkit or the nvidia-cublas wheel and put its lib directory on LD_LIBRARY_PATH");
        }
        guard("cublasCreate", || {
            dev.ctx.bind_to_thread().map_err(|e| cu_err("cuCtxSetCurrent", e))?;
            let handle = cudarc::cublas::result::create_handle().map_err(|e| blas_err("cublasCreate", e))?;
            // SAFETY: the handle was just created; the stream belongs to
            // `dev`, which outlives every use through the owner.
            unsafe { cudarc::cublas::result::set_stream(handle, dev.stream.cu_stream() as _) }.map_err(|e| blas_err("cublasSetStream", e))?;
            // SAFETY: cuBLAS only writes its scratch into the workspace.
            let ws = unsafe { dev.stream.alloc::<u8>(WORKSPACE_BYTES) }.map_err(|e| cu_err("cuMemAlloc(cuBLAS workspace)", e))?;
            let p = ws.device_ptr(&dev.stream).0;
            // SAFETY: `ws` lives as long as the handle (both owned by Blas).
            unsafe { cb::cublasSetWorkspace_v2(handle, p as *mut c_void, WORKSPACE_BYTES) }.result().map_err(|e| blas_err("cublasSetWorkspace", e))?;
            Ok(Blas { handle, _workspace: ws })
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { cudarc::cublas::result::destroy_handle(self.handle) }));
    }
}

/// A row-major matrix `[rows, cols]` on the device, fp32 or bf16 (bits in
/// `u16`), its rows `ld ≥ cols` elements apart (`cols` unless made by
/// [`MatRef::bf16_ld`]): the address of a view's memory, valid while that
/// memory is borrowed (`'a`).
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    ptr: u64,
    dtype: DType,
    pub rows: usize,
    pub cols: usize,
    ld: usize,
    _b: PhantomData<&'a ()>,
}

fn check_dims(len: usize, rows: usize, cols: usize, what: &str) -> Result<()> {
    if rows.checked_mul(cols) != Some(len) {
        bail!(BufferSize, "{what}: [{rows}, {cols}] does not match a buffer of {len} elements");
    }
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        bail!(InvalidShape, "{what}: [{rows}, {cols}] exceeds cuBLAS's 2^31-1 per dimension");
    }
    Ok(())
}

impl<'a> MatRef<'a> {
    pub fn f32(dev: &CudaDevice, v: &CudaView<'a, f32>, rows: usize, cols: usize) -> Result<MatRef<'a>> {
        check_dims(v.len(), rows, cols, "fp32 matrix")?;
        dev.check_stream(v, "matrix operand")?;
        Ok(MatRef { ptr: v.device_ptr(&dev.stream).0, dtype: DType::F32, rows, cols, ld: cols, _b: PhantomData })
    }
    pub fn bf16(dev: &CudaDevice, v: &CudaView<'a, u16>, rows: usize, cols: usize) -> Result<MatRef<'a>> {
        check_dims(v.len(), rows, cols, "bf16 matrix")?;
        dev.check_stream(v, "matrix operand")?;
        Ok(MatRef { ptr: v.device_ptr(&dev.stream).0, dtype: DType::BF16, rows, cols, ld: cols, _b: PhantomData })
    }
    /// `cols` columns of a bf16 matrix whose `rows` rows start `ld`
    /// elements apart in `v` (a block of a wide operand: `v` starts at the
    /// block's first element and holds at least `(rows − 1)·ld + cols`).
    pub fn bf16_ld(dev: &CudaDevice, v: &CudaView<'a, u16>, rows: usize, cols: usize, ld: usize) -> Result<MatRef<'a>> {
        if cols == 0 || cols > ld || rows > i32::MAX as usize || ld > i32::MAX as usize {
            bail!(InvalidShape, "wide bf16 matrix: [{rows}, {cols}] of rows {ld} apart");
        }
        let need = rows.saturating_sub(1) * ld + cols;
        if rows > 0 && v.len() < need {
            bail!(BufferSize, "wide bf16 matrix: [{rows}, {cols}] of rows {ld} apart needs {need} elements, the buffer has {}", v.len());
        }
        dev.check_stream(v, "matrix operand")?;
        Ok(MatRef { ptr: v.device_ptr(&dev.stream).0, dtype: DType::BF16, rows, cols, ld, _b: PhantomData })
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

fn cuda_type(d: DType) -> Result<cudaDataType> {
    Ok(match d {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        DType::F16 => bail!(Unsupported, "fp16 matrix operands are not used by the device path"),
    })
}

mod sealed {
    /// Only fp32 and bf16 outputs ([`super::GemmOut`]).
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
}

/// The element type of a product's output `C`: fp32, or bf16 bits (`u16`;
/// from bf16 operands only): `α·op(A)·op(B) + β·C` is accumulated in fp32
/// (a bf16 `C` widened for the `β` term) and rounded to bf16 (nearest
/// even) as it is stored. Sealed.
pub trait GemmOut: cudarc::driver::DeviceRepr + sealed::Sealed {
    const DTYPE: DType;
}

impl GemmOut for f32 {
    const DTYPE: DType = DType::F32;
}

impl GemmOut for u16 {
    const DTYPE: DType = DType::BF16;
}

/// Row-major `C[m, n] = α·op(A)·op(B) + β·C`, `op(A)` `[m, k]` (`A` stored
/// `[m, k]`, or `[k, m]` with `ta`), `op(B)` `[k, n]` (`B` stored `[k, n]`,
/// or `[n, k]` with `tb`). `A` and `B` of one dtype; `C` fp32, or bf16
/// with bf16 operands ([`GemmOut`]). Queued on the device's stream. With
/// `β = 0`, `C` need not be initialized.
#[allow(clippy::too_many_arguments)]
pub fn gemm<C: GemmOut>(dev: &CudaDevice, blas: &Blas, a: MatRef<'_>, ta: bool, b: MatRef<'_>, tb: bool, c: &mut CudaViewMut<'_, C>, alpha: f32, beta: f32) -> Result<()> {
    let (m, k) = if ta { (a.cols, a.rows) } else { (a.rows, a.cols) };
    let (kb, n) = if tb { (b.cols, b.rows) } else { (b.rows, b.cols) };
    if k != kb {
        bail!(ShapeMismatch, "gemm: op(A) is [{m}, {k}] but op(B) is [{kb}, {n}]");
    }
    check_dims(c.len(), m, n, "gemm C")?;
    gemm_ld(dev, blas, a, ta, b, tb, c, n, alpha, beta)
}

/// [`gemm()`] into `C` `[m, n]` whose rows start `ldc ≥ n` elements apart in
/// `c` (a block of a wide output: `c` starts at the block's first element
/// and holds at least `(m − 1)·ldc + n`); the other elements of `c` are not
/// touched.
#[allow(clippy::too_many_arguments)]
pub fn gemm_ld<C: GemmOut>(dev: &CudaDevice, blas: &Blas, a: MatRef<'_>, ta: bool, b: MatRef<'_>, tb: bool, c: &mut CudaViewMut<'_, C>, ldc: usize, alpha: f32, beta: f32) -> Result<()> {
    let (m, k) = if ta { (a.cols, a.rows) } else { (a.rows, a.cols) };
    let (kb, n) = if tb { (b.cols, b.rows) } else { (b.rows, b.cols) };
    if k != kb {
        bail!(ShapeMismatch, "gemm: op(A) is [{m}, {k}] but op(B) is [{kb}, {n}]");
    }
    if a.dtype != b.dtype {
        bail!(DtypeMismatch, "gemm: A is {:?}, B is {:?}; both must be one dtype", a.dtype, b.dtype);
    }
    if C::DTYPE == DType::BF16 && a.dtype != DType::BF16 {
        bail!(Unsupported, "gemm: a bf16 output needs bf16 operands, not {:?}", a.dtype);
    }
    if ldc < n || m > i32::MAX as usize || n > i32::MAX as usize || ldc > i32::MAX as usize {
        bail!(InvalidShape, "gemm: C [{m}, {n}] with rows {ldc} apart");
    }
    if m > 0 && c.len() < (m - 1) * ldc + n {
        bail!(BufferSize, "gemm C: [{m}, {n}] with rows {ldc} apart needs {} elements, the buffer has {}", (m - 1) * ldc + n, c.len());
    }
    dev.check_stream(c, "gemm C")?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let t = cuda_type(a.dtype)?;
    let op = |tr: bool| if tr { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let cptr = c.device_ptr(&dev.stream).0;
    guard("cublasGemmEx", || {
        // cuBLAS runs in the calling thread's current context, and a model
        // on a device is driven from whichever thread calls into it.
        dev.ctx.bind_to_thread().map_err(|e| cu_err("cuCtxSetCurrent", e))?;
        // Column-major view: Cᵀ[n, m] = op(B)ᵀ·op(A)ᵀ, each row-major
        // buffer read as its transpose with ld = its row stride.
        // SAFETY: the operand buffers hold rows·ld elements each (checked
        // when the MatRefs were made, and borrowed for the call), C holds
        // (m − 1)·ldc + n; alpha and beta are host scalars (the default pointer mode).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                blas.handle,
                op(tb),
                op(ta),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b.ptr as *const c_void,
                t,
                b.ld.max(1) as i32,
                a.ptr as *const c_void,
                t,
                a.ld.max(1) as i32,
                &beta as *const f32 as *const c_void,
                cptr as *mut c_void,
                cuda_type(C::DTYPE)?,
                ldc.max(1) as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_err(&format!("cublasGemmEx([{m}, {k}]·[{k}, {n}], {:?})", a.dtype), e))
    })
}
