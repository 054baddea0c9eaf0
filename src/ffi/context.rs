//! `lora_context`: backend, threads and seed.

use super::util::{self, guard, handle, read_params, req_out, Handle};
use super::*;
use crate::session::{BackendChoice, Context, ContextParams};
use std::ffi::c_char;

/// Which compute backend a context uses (one of the `LORA_BACKEND_*` values).
pub type lora_backend = u32;
/// CUDA when a driver loads, a device exists and NVRTC (the run-time
/// kernel compiler; `LORA_NVRTC_LIB` may name it) is found, else the CPU.
pub const LORA_BACKEND_AUTO: lora_backend = 0;
/// The CPU (the reference backend; always available).
pub const LORA_BACKEND_CPU: lora_backend = 1;
/// An NVIDIA GPU through CUDA; `lora_context_new` fails with
/// `LORA_ERR_CUDA_UNAVAILABLE` where there is none.
pub const LORA_BACKEND_CUDA: lora_backend = 2;

/// Options of `lora_context_new`. Initialize with
/// `lora_context_default_params()`, then change fields.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_context_params {
    /// `sizeof(lora_context_params)` as compiled by the caller (set by the
    /// defaults function); lets later versions append fields.
    pub struct_size: u32,
    /// `LORA_BACKEND_*`; default `LORA_BACKEND_AUTO`.
    pub backend: lora_backend,
    /// CPU worker threads; 0 (default) means one per available core.
    pub n_threads: u32,
    /// CUDA device ordinal for `LORA_BACKEND_CUDA`/`AUTO`; default 0.
    pub device_index: u32,
    /// Seed of every random choice made under this context (adapter
    /// initialization, dropout); default 0.
    pub seed: u64,
}

/// A context: the backend, the CPU thread pool and the seed. Create with
/// `lora_context_new`, free with `lora_context_free`.
///
/// Thread safety: functions taking `const lora_context *` may be called on
/// one context from several threads at once; `lora_context_free` must not
/// race with any other use of the context.
pub struct lora_context {
    tag: u64,
    pub(crate) inner: Context,
}

impl Handle for lora_context {
    const TAG: u64 = 0x6c6f_7261_6374_7831; // "loractx1"
    fn tag(&self) -> u64 {
        self.tag
    }
}

/// Default context parameters (AUTO backend, all cores, seed 0).
#[no_mangle]
pub extern "C" fn lora_context_default_params() -> lora_context_params {
    lora_context_params {
        struct_size: std::mem::size_of::<lora_context_params>() as u32,
        backend: LORA_BACKEND_AUTO,
        n_threads: 0,
        device_index: 0,
        seed: 0,
    }
}

/// Creates a context. `params` may be NULL for the defaults. On success
/// `*out` receives a new context the caller frees with
/// `lora_context_free`; on failure `*out` is not written.
///
/// Errors: `LORA_ERR_NULL_POINTER` (out), `LORA_ERR_STRUCT_SIZE`,
/// `LORA_ERR_INVALID_ARGUMENT` (unknown backend, n_threads above 4096),
/// `LORA_ERR_CUDA_UNAVAILABLE`
/// (CUDA requested, none usable), `LORA_ERR_INTERNAL` (threads).
#[no_mangle]
pub unsafe extern "C" fn lora_context_new(params: *const lora_context_params, out: *mut *mut lora_context) -> lora_status {
    guard(|| {
        let out = req_out(out, "out")?;
        let p = read_params(params, lora_context_default_params(), std::mem::size_of::<lora_context_params>(), "lora_context_params")?;
        let backend = match p.backend {
            LORA_BACKEND_AUTO => BackendChoice::Auto,
            LORA_BACKEND_CPU => BackendChoice::Cpu,
            LORA_BACKEND_CUDA => BackendChoice::Cuda,
            b => crate::bail!(InvalidArgument, "backend {b} is not a LORA_BACKEND_* value"),
        };
        if p.n_threads > 4096 {
            crate::bail!(InvalidArgument, "n_threads {} is unreasonably large (0 means all cores)", p.n_threads);
        }
        let ctx = Context::new(&ContextParams {
            backend,
            n_threads: p.n_threads as usize,
            seed: p.seed,
            device_index: p.device_index as usize,
        })?;
        *out = util::into_handle(lora_context { tag: lora_context::TAG, inner: ctx });
        Ok(())
    })
}

/// Frees a context. NULL is a no-op; so is a second free of the same
/// handle where it can be detected (never rely on it).
#[no_mangle]
pub unsafe extern "C" fn lora_context_free(ctx: *mut lora_context) {
    util::guard_value((), || util::free_handle(ctx, |c| c.tag = 0))
}

/// The backend the context actually uses (`LORA_BACKEND_CPU` or
/// `LORA_BACKEND_CUDA`, never AUTO) into `*out`.
#[no_mangle]
pub unsafe extern "C" fn lora_context_backend(ctx: *const lora_context, out: *mut lora_backend) -> lora_status {
    guard(|| {
        let c = handle(ctx, "ctx")?;
        let out = req_out(out, "out")?;
        *out = if c.inner.device.is_cuda() { LORA_BACKEND_CUDA } else { LORA_BACKEND_CPU };
        Ok(())
    })
}

/// Describes the context's device, e.g. "cpu (2 CPU threads)" or
/// "cuda:0 NVIDIA H100 80GB HBM3 (sm_90) (16 CPU threads)", into `buf`
/// (NUL-terminated, truncated to `len` at a character boundary);
/// `*needed` (if not NULL) receives the full length without the NUL.
#[no_mangle]
pub unsafe extern "C" fn lora_context_describe(ctx: *const lora_context, buf: *mut c_char, len: usize, needed: *mut usize) -> lora_status {
    guard(|| {
        let c = handle(ctx, "ctx")?;
        let s = format!("{} ({} CPU threads)", c.inner.device.describe(), c.inner.n_threads());
        let n = util::write_cstr(&s, buf, len);
        if !needed.is_null() {
            *needed = n;
        }
        Ok(())
    })
}
