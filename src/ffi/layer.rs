//! `lora_layer`: one linear layer with a frozen base and named LoRA
//! adapters (`lora_layer_add_adapter`, `lora_layer_merge`, `lora_layer_swap_adapter`, ...).

use super::context::lora_context;
use super::nf4::{dtype_of, lora_nf4, InputBuf};
use super::util::{self, guard, handle, read_params, req, req_out, req_str, Handle};
use super::*;
use crate::dtype::{DType, Elems};
use crate::error::Result;
use crate::lora::{AdapterConfig, Combine, Init, LoraLayer};
use crate::quant::nf4::Nf4Params;
use std::ffi::{c_char, c_void};
use std::sync::Arc;

/// How a new adapter's weights are initialized (`LORA_INIT_*`).
pub type lora_init = u32;
/// PEFT's default: A ~ kaiming_uniform(a=√5) = U(±1/√in), B = 0.
pub const LORA_INIT_KAIMING_UNIFORM: lora_init = 0;
/// PEFT's "gaussian": A ~ N(0, (1/r)²), B = 0.
pub const LORA_INIT_GAUSSIAN: lora_init = 1;
/// A and B copied from the config's `a` (`[r,in]`) and `b` (`[out,r]`).
pub const LORA_INIT_GIVEN: lora_init = 2;

/// How `lora_layer_add_weighted` combines adapters (`LORA_COMBINE_*`).
pub type lora_combine = u32;
/// PEFT "linear": equal ranks; A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ.
pub const LORA_COMBINE_LINEAR: lora_combine = 0;
/// PEFT "cat": exact, rank Σrᵢ; A = cat(wᵢ·sᵢ·Aᵢ), B = cat(Bᵢ).
pub const LORA_COMBINE_CAT: lora_combine = 1;

/// An adapter's configuration (`lora_layer_add_adapter`). Initialize with
/// `lora_adapter_default_config()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct lora_adapter_config {
    /// `sizeof(lora_adapter_config)`, set by the defaults function.
    pub struct_size: u32,
    /// Rank, 1 to the larger of 1024 and in + out (above min(in, out) too,
    /// as PEFT); default 8.
    pub r: u32,
    /// Scale numerator: scale = alpha/r (or alpha/√r with use_rslora);
    /// must be > 0; default 8.
    pub alpha: f32,
    /// Dropout on the adapter's input during training, in [0, 1); default 0.
    pub dropout: f32,
    /// Non-zero: rsLoRA scaling alpha/√r; default 0.
    pub use_rslora: u32,
    /// `LORA_INIT_*`; default `LORA_INIT_KAIMING_UNIFORM`.
    pub init: lora_init,
    /// With `LORA_INIT_GIVEN`: r·in floats, row-major `[r,in]`; copied.
    pub a: *const f32,
    /// With `LORA_INIT_GIVEN`: out·r floats, row-major `[out,r]`; copied.
    pub b: *const f32,
}

/// A LoRA linear layer: `y = x·Wᵀ + b + Σ_active m·s·dropout(x)·Aᵀ·Bᵀ`.
/// The base weight is frozen and never modified (merging writes a separate
/// merged copy derived from it). Not thread-safe: use one layer from one
/// thread at a time (const functions may run concurrently with each other).
/// It keeps its context's worker threads alive: it may outlive the context.
pub struct lora_layer {
    tag: u64,
    inner: LoraLayer,
    pool: Arc<rayon::ThreadPool>,
}

impl Handle for lora_layer {
    const TAG: u64 = 0x6c6f_7261_6c61_7972; // "loralayr"
    fn tag(&self) -> u64 {
        self.tag
    }
}

/// Reads `n` elements of `dtype` from a caller buffer as f32.
fn read_f32(data: *const c_void, bytes: usize, dtype: lora_dtype, n: usize, what: &str) -> Result<Vec<f32>> {
    let dt = dtype_of(dtype)?;
    let buf = InputBuf::new(data, bytes, dt, n).map_err(|e| e.context(what))?;
    let e = buf.elems();
    Ok(match e {
        Elems::F32(s) => s.to_vec(),
        _ => (0..n).map(|i| e.get(i)).collect(),
    })
}

/// Elements in `n` rows of `width` (refusing n = 0 and overflow).
fn rows_elems(n: usize, width: usize) -> Result<usize> {
    if n == 0 {
        bail!(InvalidShape, "n is 0");
    }
    n.checked_mul(width).ok_or_else(|| err!(InvalidShape, "{n} rows of {width} overflow"))
}

/// Checks an output buffer and returns a writer of f32 values into it.
fn out_check(out: *mut c_void, bytes: usize, dtype: lora_dtype, n: usize, what: &str) -> Result<DType> {
    let dt = dtype_of(dtype)?;
    req(out as *const u8, what)?;
    if bytes != n * dt.size() {
        bail!(BufferSize, "{what}: {bytes} bytes given; {n} elements of {dt:?} need {}", n * dt.size());
    }
    Ok(dt)
}

fn write_out(out: *mut c_void, dt: DType, v: &[f32]) {
    // SAFETY: out_check verified `v.len() * size` writable bytes; writes are
    // unaligned-safe.
    unsafe {
        match dt {
            DType::F32 => std::ptr::copy_nonoverlapping(v.as_ptr() as *const u8, out as *mut u8, v.len() * 4),
            DType::F16 => v.iter().enumerate().for_each(|(i, x)| (out as *mut u16).add(i).write_unaligned(half::f16::from_f32(*x).to_bits())),
            DType::BF16 => v.iter().enumerate().for_each(|(i, x)| (out as *mut u16).add(i).write_unaligned(half::bf16::from_f32(*x).to_bits())),
        }
    }
}

fn bias_of(bias: *const f32, out_f: usize) -> Result<Option<Vec<f32>>> {
    // SAFETY: a non-null bias holds out_f floats (header contract).
    Ok(if bias.is_null() { None } else { Some(unsafe { std::slice::from_raw_parts(bias, out_f) }.to_vec()) })
}

fn new_layer(ctx: &lora_context, l: LoraLayer) -> *mut lora_layer {
    util::into_handle(lora_layer { tag: lora_layer::TAG, inner: l, pool: ctx.inner.pool.clone() })
}

/// Creates a layer over a dense base weight: `weight` holds `out·in`
/// elements of `dtype` in `[out,in]` order, or `[in,out]` when
/// `fan_in_fan_out` is non-zero (GPT-2's Conv1D); it is copied (as fp32).
/// `bias` is NULL or `out` floats (copied). Adapters get their random
/// initialization from the context's seed. `*out` receives the layer.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lora_layer_new(
    ctx: *const lora_context,
    weight: *const c_void,
    weight_bytes: usize,
    dtype: lora_dtype,
    in_features: usize,
    out_features: usize,
    fan_in_fan_out: u32,
    bias: *const f32,
    out: *mut *mut lora_layer,
) -> lora_status {
    guard(|| {
        let ctx = handle(ctx, "ctx")?;
        let out = req_out(out, "out")?;
        let dt = dtype_of(dtype)?;
        let n = crate::dtype::checked_numel(&[out_features, in_features], dt.size())?;
        let w = InputBuf::new(weight, weight_bytes, dt, n)?;
        let b = bias_of(bias, out_features)?;
        let l = ctx.inner.run(|| LoraLayer::new_dense(w.elems(), in_features, out_features, fan_in_fan_out != 0, b, ctx.inner.seed))?;
        *out = new_layer(ctx, l);
        Ok(())
    })
}

/// Creates a layer over an NF4 base weight of shape `[out,in]` (the tensor
/// is copied; the caller keeps ownership of `weight`). It stays NF4 and is
/// dequantized tile by tile when used. `bias` is NULL or `out` floats.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_new_nf4(ctx: *const lora_context, weight: *const lora_nf4, bias: *const f32, out: *mut *mut lora_layer) -> lora_status {
    guard(|| {
        let ctx = handle(ctx, "ctx")?;
        let w = &handle(weight, "weight")?.inner;
        let out = req_out(out, "out")?;
        let out_f = w.shape()[0];
        let b = bias_of(bias, out_f)?;
        let l = LoraLayer::new_nf4(w.clone(), b, ctx.inner.seed)?;
        *out = new_layer(ctx, l);
        Ok(())
    })
}

/// Frees a layer. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_free(layer: *mut lora_layer) {
    util::guard_value((), || util::free_handle(layer, |h| h.tag = 0))
}

/// Default adapter configuration: r 8, alpha 8, dropout 0, no rsLoRA,
/// kaiming-uniform A and zero B (PEFT's `LoraConfig` defaults).
#[no_mangle]
pub extern "C" fn lora_adapter_default_config() -> lora_adapter_config {
    lora_adapter_config {
        struct_size: std::mem::size_of::<lora_adapter_config>() as u32,
        r: 8,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: 0,
        init: LORA_INIT_KAIMING_UNIFORM,
        a: std::ptr::null(),
        b: std::ptr::null(),
    }
}

/// Adds adapter `name` to `layer` (PEFT `add_adapter`). A fresh adapter
/// (B = 0) changes no output. The first adapter becomes active; later ones
/// are resident until `lora_layer_swap_adapter` activates them.
///
/// Errors: `LORA_ERR_INVALID_ARGUMENT` (empty or duplicate name, rank 0 or
/// above max(1024, in + out), alpha ≤ 0, dropout outside [0, 1), unknown init),
/// `LORA_ERR_NULL_POINTER` (a or b NULL with LORA_INIT_GIVEN),
/// `LORA_ERR_NON_FINITE`, `LORA_ERR_STRUCT_SIZE`.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_add_adapter(layer: *mut lora_layer, name: *const c_char, config: *const lora_adapter_config) -> lora_status {
    guard(|| {
        let l = util::handle_mut(layer, "layer")?;
        let name = req_str(name, "name")?;
        let c = read_params(config, lora_adapter_default_config(), std::mem::size_of::<lora_adapter_config>(), "lora_adapter_config")?;
        let (in_f, out_f, r) = (l.inner.in_features(), l.inner.out_features(), c.r as usize);
        let init = match c.init {
            LORA_INIT_KAIMING_UNIFORM => Init::KaimingUniform,
            LORA_INIT_GAUSSIAN => Init::Gaussian,
            LORA_INIT_GIVEN => {
                req(c.a, "config.a")?;
                req(c.b, "config.b")?;
                crate::lora::layer::check_rank(r, in_f, out_f)?;
                // SAFETY: the config promises r·in and out·r floats.
                let (a, b) = unsafe { (std::slice::from_raw_parts(c.a, r * in_f).to_vec(), std::slice::from_raw_parts(c.b, out_f * r).to_vec()) };
                Init::Given { a, b }
            }
            o => bail!(InvalidArgument, "init {o} is not a LORA_INIT_* value"),
        };
        l.inner.add_adapter(name, AdapterConfig { r, alpha: c.alpha, dropout: c.dropout, use_rslora: c.use_rslora != 0, init })
    })
}

/// Makes the base bias trainable (non-zero) or frozen (0, the default).
/// `LORA_ERR_INVALID_STATE` if the layer has no bias.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_set_bias_trainable(layer: *mut lora_layer, trainable: u32) -> lora_status {
    guard(|| util::handle_mut(layer, "layer")?.inner.set_bias_trainable(trainable != 0))
}

/// Trainable parameters (all adapters' A and B, plus the bias if trainable)
/// and all parameters (base counted as out·in also when NF4, as PEFT does).
#[no_mangle]
pub unsafe extern "C" fn lora_layer_param_counts(layer: *const lora_layer, trainable: *mut usize, total: *mut usize) -> lora_status {
    guard(|| {
        let l = &handle(layer, "layer")?.inner;
        let (t, a) = (req_out(trainable, "trainable")?, req_out(total, "total")?);
        *t = l.trainable_params();
        *a = l.total_params();
        Ok(())
    })
}

/// Index of adapter `name` (for `row_adapter` of mixed batches) into `*index`.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_adapter_index(layer: *const lora_layer, name: *const c_char, index: *mut i32) -> lora_status {
    guard(|| {
        let l = &handle(layer, "layer")?.inner;
        let name = req_str(name, "name")?;
        let out = req_out(index, "index")?;
        *out = l.adapter_index(name)? as i32;
        Ok(())
    })
}

/// Forward for `n` rows: `x` holds `n·in` elements of `x_dtype`, `y`
/// receives `n·out` elements of `y_dtype` (fp32, fp16 or bf16; computed in
/// fp32). `row_adapter` is NULL (all active adapters) or `n` adapter
/// indices (`lora_layer_adapter_index`), −1 for base only: a mixed-adapter
/// batch where each row uses its own adapter, computed by grouping rows.
/// `train` non-zero applies dropout (reproducible from the context seed)
/// and records what `lora_layer_backward` needs. `y` is written only on
/// success.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lora_layer_forward(
    layer: *mut lora_layer,
    x: *const c_void,
    x_bytes: usize,
    x_dtype: lora_dtype,
    n: usize,
    row_adapter: *const i32,
    y: *mut c_void,
    y_bytes: usize,
    y_dtype: lora_dtype,
    train: u32,
) -> lora_status {
    guard(|| {
        let l = util::handle_mut(layer, "layer")?;
        let (in_f, out_f) = (l.inner.in_features(), l.inner.out_features());
        let xv = read_f32(x, x_bytes, x_dtype, rows_elems(n, in_f)?, "x")?;
        let ny = rows_elems(n, out_f)?;
        let ydt = out_check(y, y_bytes, y_dtype, ny, "y")?;
        // SAFETY: a non-null row_adapter holds n entries (header contract).
        let ra = if row_adapter.is_null() { None } else { Some(unsafe { std::slice::from_raw_parts(row_adapter, n) }.to_vec()) };
        let mut yv = vec![0f32; ny];
        let pool = l.pool.clone();
        pool.install(|| l.inner.forward(&xv, n, &mut yv, ra.as_deref(), train != 0))?;
        write_out(y, ydt, &yv);
        Ok(())
    })
}

/// Backward of the latest `lora_layer_forward` (same `x` and `n`): writes
/// `dx` (`n·in` elements of `dx_dtype`; may be NULL when not needed) and
/// accumulates the gradients of the adapters that took part (and of the
/// bias if trainable). Gradients accumulate over calls until
/// `lora_layer_zero_grad`; swapping or merging in between fails with
/// `LORA_ERR_INVALID_STATE`, as does backward on a merged layer. The base
/// weight never receives a gradient.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lora_layer_backward(
    layer: *mut lora_layer,
    x: *const c_void,
    x_bytes: usize,
    x_dtype: lora_dtype,
    dy: *const c_void,
    dy_bytes: usize,
    dy_dtype: lora_dtype,
    n: usize,
    dx: *mut c_void,
    dx_bytes: usize,
    dx_dtype: lora_dtype,
) -> lora_status {
    guard(|| {
        let l = util::handle_mut(layer, "layer")?;
        let (in_f, out_f) = (l.inner.in_features(), l.inner.out_features());
        let xv = read_f32(x, x_bytes, x_dtype, rows_elems(n, in_f)?, "x")?;
        let dyv = read_f32(dy, dy_bytes, dy_dtype, rows_elems(n, out_f)?, "dy")?;
        let dxdt = if dx.is_null() { None } else { Some(out_check(dx, dx_bytes, dx_dtype, n * in_f, "dx")?) };
        let mut dxv = if dxdt.is_some() { vec![0f32; n * in_f] } else { Vec::new() };
        let pool = l.pool.clone();
        pool.install(|| l.inner.backward(&xv, &dyv, n, if dxdt.is_some() { Some(&mut dxv) } else { None }))?;
        if let Some(dt) = dxdt {
            write_out(dx, dt, &dxv);
        }
        Ok(())
    })
}

/// Clears the accumulated gradients.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_zero_grad(layer: *mut lora_layer) -> lora_status {
    guard(|| {
        util::handle_mut(layer, "layer")?.inner.zero_grad();
        Ok(())
    })
}

fn copy_to(dst: *mut f32, len: usize, src: &[f32], what: &str) -> Result<()> {
    req(dst as *const f32, what)?;
    if len != src.len() {
        bail!(BufferSize, "{what}: {len} floats given, {} needed", src.len());
    }
    // SAFETY: `len` writable floats at dst (header contract).
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, len) };
    Ok(())
}

/// Copies adapter `name`'s A (`r·in` floats, `[r,in]`) and B (`out·r`,
/// `[out,r]`) into `a` and `b`; `a_len`/`b_len` must match exactly.
/// With `grads` non-zero copies the accumulated dA and dB instead.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_get_adapter(layer: *const lora_layer, name: *const c_char, grads: u32, a: *mut f32, a_len: usize, b: *mut f32, b_len: usize) -> lora_status {
    guard(|| {
        let l = &handle(layer, "layer")?.inner;
        let ad = l.adapter(req_str(name, "name")?)?;
        let (sa, sb) = if grads != 0 { (&ad.grad_a, &ad.grad_b) } else { (&ad.a, &ad.b) };
        if a_len != sa.len() || b_len != sb.len() {
            bail!(BufferSize, "adapter '{}' needs {} floats for A and {} for B", ad.name, sa.len(), sb.len());
        }
        copy_to(a, a_len, sa, "a")?;
        copy_to(b, b_len, sb, "b")
    })
}

/// Replaces adapter `name`'s A and B (lengths as for `lora_layer_get_adapter`).
#[no_mangle]
pub unsafe extern "C" fn lora_layer_set_adapter(layer: *mut lora_layer, name: *const c_char, a: *const f32, a_len: usize, b: *const f32, b_len: usize) -> lora_status {
    guard(|| {
        let l = util::handle_mut(layer, "layer")?;
        let name = req_str(name, "name")?;
        req(a, "a")?;
        req(b, "b")?;
        // SAFETY: a_len and b_len readable floats (header contract).
        let (av, bv) = unsafe { (std::slice::from_raw_parts(a, a_len), std::slice::from_raw_parts(b, b_len)) };
        l.inner.set_adapter_weights(name, av, bv)
    })
}

/// Merges the active adapters: the layer then computes with
/// `W0 + Σ m·s·B·A` (a dense fp32 copy; an NF4 base stays as it was, so
/// `lora_layer_unmerge` is exact). `LORA_ERR_INVALID_STATE` if already merged or
/// gradients are pending.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_merge(layer: *mut lora_layer) -> lora_status {
    guard(|| {
        let l = util::handle_mut(layer, "layer")?;
        let pool = l.pool.clone();
        pool.install(|| l.inner.merge())
    })
}

/// Undoes `lora_layer_merge` exactly (the base was never modified).
/// `LORA_ERR_INVALID_STATE` if not merged.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_unmerge(layer: *mut lora_layer) -> lora_status {
    guard(|| util::handle_mut(layer, "layer")?.inner.unmerge())
}

/// Makes the `n` adapters `names` the active set, adapter i scaled by
/// `multipliers[i]` (NULL: all 1.0), llama.cpp-style. Unmerged: O(1).
/// Merged: the merged weight is re-derived from the base as exactly
/// `W0 + Σ m·s·B·A` (no drift, however many swaps). `n` = 0 leaves only
/// the base. `LORA_ERR_INVALID_STATE` while gradients are pending.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_swap_adapter(layer: *mut lora_layer, names: *const *const c_char, multipliers: *const f32, n: usize) -> lora_status {
    guard(|| {
        let l = util::handle_mut(layer, "layer")?;
        if n > 0 {
            req(names, "names")?;
        }
        let mut set = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: n entries in names (and multipliers when non-null).
            let name = req_str(unsafe { *names.add(i) }, &format!("names[{i}]"))?;
            let m = if multipliers.is_null() { 1.0 } else { unsafe { *multipliers.add(i) } };
            set.push((name, m));
        }
        let pool = l.pool.clone();
        pool.install(|| l.inner.set_active(&set))
    })
}

/// Requantizes the merged weight to NF4 and makes it the new base — a
/// separate, explicit, lossy step (PEFT does it silently when merging into
/// a 4-bit base). The merged adapters become inactive. `*rel_rms` and
/// `*max_abs` (each may be NULL) receive the error it added:
/// ‖NF4(W) − W‖/‖W‖ and max|NF4(W) − W|. `params` NULL: defaults.
/// `LORA_ERR_INVALID_STATE` if not merged.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_requantize(layer: *mut lora_layer, params: *const super::nf4::lora_nf4_params, rel_rms: *mut f64, max_abs: *mut f32) -> lora_status {
    guard(|| {
        let l = util::handle_mut(layer, "layer")?;
        let p = read_params(params, super::nf4::lora_nf4_default_params(), std::mem::size_of::<super::nf4::lora_nf4_params>(), "lora_nf4_params")?;
        let pool = l.pool.clone();
        let rep = pool.install(|| l.inner.requantize_merged(Nf4Params { blocksize: p.blocksize as usize, double_quant: p.double_quant != 0 }))?;
        if !rel_rms.is_null() {
            *rel_rms = rep.rel_rms;
        }
        if !max_abs.is_null() {
            *max_abs = rep.max_abs;
        }
        Ok(())
    })
}

/// The weight the layer computes with (merged if merged, else the base,
/// dequantized if NF4) in the base's own layout (`[out,in]`, or `[in,out]`
/// with fan_in_fan_out), as `dtype` into `out` of `out_bytes` bytes.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_weight(layer: *const lora_layer, dtype: lora_dtype, out: *mut c_void, out_bytes: usize) -> lora_status {
    guard(|| {
        let l = handle(layer, "layer")?;
        let n = l.inner.in_features() * l.inner.out_features();
        let dt = out_check(out, out_bytes, dtype, n, "out")?;
        let w = l.pool.install(|| l.inner.effective_weight());
        write_out(out, dt, &w);
        Ok(())
    })
}

/// Adds adapter `name` combining the `n` adapters `names` with `weights`
/// (PEFT `add_weighted_adapter`): `LORA_COMBINE_LINEAR` (equal ranks) or
/// `LORA_COMBINE_CAT` (exact, rank Σrᵢ). The new adapter has alpha = r
/// (scale 1) and is not activated.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_add_weighted(layer: *mut lora_layer, name: *const c_char, names: *const *const c_char, weights: *const f32, n: usize, how: lora_combine) -> lora_status {
    guard(|| {
        let l = util::handle_mut(layer, "layer")?;
        let name = req_str(name, "name")?;
        req(names, "names")?;
        req(weights, "weights")?;
        let how = match how {
            LORA_COMBINE_LINEAR => Combine::Linear,
            LORA_COMBINE_CAT => Combine::Cat,
            o => bail!(InvalidArgument, "combination {o} is not a LORA_COMBINE_* value"),
        };
        let mut parts = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: n entries in names and weights.
            let nm = req_str(unsafe { *names.add(i) }, &format!("names[{i}]"))?;
            parts.push((nm, unsafe { *weights.add(i) }));
        }
        l.inner.add_weighted(name, &parts, how)
    })
}

/// Layer facts: in and out features, number of adapters, merged (1/0).
/// Any output pointer may be NULL.
#[no_mangle]
pub unsafe extern "C" fn lora_layer_get_shape(layer: *const lora_layer, in_features: *mut usize, out_features: *mut usize, n_adapters: *mut usize, merged: *mut u32) -> lora_status {
    guard(|| {
        let l = &handle(layer, "layer")?.inner;
        if !in_features.is_null() {
            *in_features = l.in_features();
        }
        if !out_features.is_null() {
            *out_features = l.out_features();
        }
        if !n_adapters.is_null() {
            *n_adapters = l.adapters().len();
        }
        if !merged.is_null() {
            *merged = l.is_merged() as u32;
        }
        Ok(())
    })
}
