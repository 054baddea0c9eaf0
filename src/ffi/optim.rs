//! `lora_optimizer`: AdamW (PyTorch's) and 8-bit AdamW (bitsandbytes') over
//! caller-owned fp32 tensors, for hosts with their own training loop. The
//! trainer (`lora_train_step`) uses the same optimizers internally.

use super::context::lora_context;
use super::model::{lora_optim, LORA_OPTIM_ADAMW};
use super::util::{self, guard, handle, read_params, req, req_out, Handle};
use super::*;
use crate::optim::adamw::AdamWConfig;
use crate::optim::Optimizer;

/// Options of `lora_optimizer_new`. Initialize with
/// `lora_optimizer_default_params()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_optimizer_params {
    /// `sizeof(lora_optimizer_params)`, set by the defaults function.
    pub struct_size: u32,
    /// `LORA_OPTIM_ADAMW` (default) or `LORA_OPTIM_ADAMW_8BIT`.
    pub optimizer: lora_optim,
    /// torch.optim.AdamW's defaults: lr 1e-3, betas (0.9, 0.999), eps
    /// 1e-8, weight decay 1e-2.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Non-zero: moments in the context's paged memory (AdamW only).
    pub paged: u32,
}

/// An optimizer over a fixed list of fp32 tensors. Not for concurrent use.
pub struct lora_optimizer {
    tag: u64,
    inner: Optimizer,
}

impl Handle for lora_optimizer {
    const TAG: u64 = 0x6c6f_7261_6f70_746d; // "loraoptm"
    fn tag(&self) -> u64 {
        self.tag
    }
}

/// torch.optim.AdamW's defaults.
#[no_mangle]
pub extern "C" fn lora_optimizer_default_params() -> lora_optimizer_params {
    let d = AdamWConfig::default();
    lora_optimizer_params {
        struct_size: std::mem::size_of::<lora_optimizer_params>() as u32,
        optimizer: LORA_OPTIM_ADAMW,
        lr: d.lr,
        beta1: d.beta1,
        beta2: d.beta2,
        eps: d.eps,
        weight_decay: d.weight_decay,
        paged: 0,
    }
}

/// Creates an optimizer for `n` tensors of `sizes[i]` elements (zero
/// state, step 0). `LORA_OPTIM_ADAMW` is torch.optim.AdamW bit for bit;
/// `LORA_OPTIM_ADAMW_8BIT` is bitsandbytes' AdamW8bit (blockwise 8-bit
/// moments for tensors of 4,096 elements or more, fp32 below). `params`
/// may be NULL for the defaults. `*out` receives an optimizer the caller
/// frees with `lora_optimizer_free`; it keeps the context's pager alive
/// (paged state), so it may outlive `ctx`. Sizes are element counts.
///
/// Errors: `LORA_ERR_INVALID_ARGUMENT` (n = 0, a zero size, bad
/// hyperparameters), `LORA_ERR_UNSUPPORTED` (paged 8-bit), `LORA_ERR_IO`
/// / `LORA_ERR_OUT_OF_MEMORY` (paged state), `LORA_ERR_STRUCT_SIZE`.
#[no_mangle]
pub unsafe extern "C" fn lora_optimizer_new(ctx: *const lora_context, params: *const lora_optimizer_params, sizes: *const usize, n: usize, out: *mut *mut lora_optimizer) -> lora_status {
    guard(|| {
        let ctx = handle(ctx, "ctx")?;
        let out = req_out(out, "out")?;
        let p = read_params(params, lora_optimizer_default_params(), std::mem::size_of::<lora_optimizer_params>(), "lora_optimizer_params")?;
        if n == 0 {
            crate::bail!(InvalidArgument, "n is 0: no tensors to optimize");
        }
        // SAFETY: `n` sizes (header contract).
        let sizes = std::slice::from_raw_parts(req(sizes, "sizes")?, n);
        if let Some(i) = sizes.iter().position(|&s| s == 0) {
            crate::bail!(InvalidArgument, "sizes[{i}] is 0");
        }
        let cfg = AdamWConfig { lr: p.lr, beta1: p.beta1, beta2: p.beta2, eps: p.eps, weight_decay: p.weight_decay };
        let kind = super::model::optim_kind(p.optimizer)?;
        let inner = Optimizer::new(kind, cfg, sizes, (p.paged != 0).then_some(&ctx.inner.pager))?;
        *out = util::into_handle(lora_optimizer { tag: lora_optimizer::TAG, inner });
        Ok(())
    })
}

/// Frees an optimizer (NULL: no-op).
#[no_mangle]
pub unsafe extern "C" fn lora_optimizer_free(opt: *mut lora_optimizer) {
    util::free_handle(opt, |o| o.tag = 0);
}

/// Sets the learning rate of the next steps (a schedule's job).
#[no_mangle]
pub unsafe extern "C" fn lora_optimizer_set_lr(opt: *mut lora_optimizer, lr: f64) -> lora_status {
    guard(|| util::handle_mut(opt, "opt")?.inner.set_lr(lr))
}

/// One step: `params[i]` (`sizes[i]` floats, updated in place) from
/// `grads[i]`, for the `n` tensors given at creation, in order.
///
/// Errors: `LORA_ERR_INVALID_ARGUMENT` (n differs from creation),
/// `LORA_ERR_NULL_POINTER`, `LORA_ERR_NON_FINITE` (a gradient is NaN or
/// infinite: nothing is updated).
#[no_mangle]
pub unsafe extern "C" fn lora_optimizer_step(opt: *mut lora_optimizer, params: *const *mut f32, grads: *const *const f32, n: usize) -> lora_status {
    guard(|| {
        let o = util::handle_mut(opt, "opt")?;
        let sizes = o.inner.sizes().to_vec();
        if n != sizes.len() {
            crate::bail!(InvalidArgument, "{n} tensors given; the optimizer was created for {}", sizes.len());
        }
        let pp = std::slice::from_raw_parts(req(params, "params")?, n);
        let gp = std::slice::from_raw_parts(req(grads, "grads")?, n);
        let mut ps: Vec<&mut [f32]> = Vec::with_capacity(n);
        let mut gs: Vec<&[f32]> = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `sizes[i]` floats at each pointer, params not aliasing
            // each other or the gradients (header contract).
            ps.push(std::slice::from_raw_parts_mut(req(pp[i] as *const f32, "params[i]")? as *const f32 as *mut f32, sizes[i]));
            gs.push(std::slice::from_raw_parts(req(gp[i], "grads[i]")?, sizes[i]));
        }
        crate::optim::clip::check_finite(None, &gs)?;
        o.inner.step(&mut ps, &gs)
    })
}

/// Bytes of optimizer state (moments, 8-bit codes and scales).
#[no_mangle]
pub unsafe extern "C" fn lora_optimizer_state_bytes(opt: *const lora_optimizer, bytes: *mut u64) -> lora_status {
    guard(|| {
        let o = handle(opt, "opt")?;
        *req_out(bytes, "bytes")? = o.inner.state_bytes() as u64;
        Ok(())
    })
}
