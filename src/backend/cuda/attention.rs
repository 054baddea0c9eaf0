//! Launchers for `cuda/attention.cu`: causal grouped-query attention, fp32,
//! twins of [`crate::backend::cpu::attention`]'s [`attention_forward`],
//! [`attention_backward`] and [`attention_decode`] (same shapes
//! [`AttnShape`], [`DecodeShape`], same layouts, same `scale`):
//! - [`forward`]: flash-style, one block per (batch, head, 16 query rows),
//!   K/V tiles of 32 keys through shared memory, online softmax; writes `o`
//!   and `lse`;
//! - [`backward`]: `δ = rowsum(do∘o)` (scratch), then `dk`, `dv` (one block
//!   per (batch, KV head, 16 keys), summing the group's query heads) and `dq`
//!   (one block per (batch, head, 16 query rows), recomputing `P` and `dS`),
//!   no atomics: deterministic;
//! - [`decode`]: one query row per sequence against its KV cache (lengths
//!   from the host, checked and uploaded).
//!
//! `head_dim` is limited to [`MAX_HEAD_DIM`] (256, Gemma's): head_dims up
//! to [`NARROW_HEAD_DIM`] run the kernels instantiated for 128 columns,
//! larger ones their `_d256` twins (twice the register tile and shared
//! memory, above the default 48 KiB: the launchers raise the function's
//! limit). Soft-capped scores (Gemma 2's `attn_logit_softcapping`) are
//! `c·tanh(s/c)` in every kernel (the CPU's order; [`cap_tol`] bounds the
//! difference it adds), in the tensor-core kernels too (head_dim 64, 128
//! or 256: [`tc_supported`]).
//!
//! Agreement with the CPU: both sum in f32 in different orders and both use
//! f32 `exp`/`log` (≤ 2 ulp on the GPU; on the CPU `exp` within 1 ulp,
//! [`vexp`](crate::backend::cpu::vexp), and Rust's `ln`), so results
//! agree within bounds proportional to the sums' lengths and magnitudes;
//! `tests/cuda_attention.rs` states them: a score `s = scale·q·k` within
//! [`score_tol`], `o` (and decode) within [`out_tol`] of `Σ_j P_ij |v_j|`,
//! `lse` within [`lse_tol`]. All functions only queue work (no sync).
//!
//! [`attention_forward`]: crate::backend::cpu::attention::attention_forward
//! [`attention_backward`]: crate::backend::cpu::attention::attention_backward
//! [`attention_decode`]: crate::backend::cpu::attention::attention_decode

use super::{launch_cfg, scratch, stride_grid, CudaDevice, ATTENTION_CU, ATTENTION_TC_CU};
use crate::backend::cpu::attention::{AttnShape, DecodeShape};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DeviceRepr};

/// Threads per block (`ATT_THREADS` in attention.cu).
const ATT_THREADS: u32 = 128;
/// Largest head_dim (`ATT_DMAX` in attention.cu).
pub const MAX_HEAD_DIM: usize = 256;
/// Largest head_dim of the narrow kernels (`ATT_DNARROW`); above it the
/// `_d256` kernels run.
pub const NARROW_HEAD_DIM: usize = 128;
/// Keys per forward / decode tile (`ATT_FK`).
const ATT_FK: usize = 32;
/// Query rows per dkdv chunk (`ATT_BR`).
const ATT_BR: usize = 8;
/// Query rows per forward block (`ATT_FQ`).
const ATT_FQ: usize = 16;
/// Keys per dkdv block (`ATT_BK`).
const ATT_BK: usize = 16;
/// Query rows per dq block (`ATT_BQ`).
const ATT_BQ: usize = 16;

/// The f32 unit roundoff, 2⁻²⁴.
pub const U: f64 = 1.0 / (1u64 << 24) as f64;

/// Bound on `|gpu − cpu|` of a score `scale·(q·k)` over `d` products whose
/// absolute values sum to `abs_dot`: each side's dot is within
/// `(d + 8)·u·abs_dot` of exact (a length-d chain; the CPU's 8 partial sums
/// are shorter), times `scale`, plus the product's rounding on each side.
pub fn score_tol(d: usize, scale: f32, abs_dot: f64) -> f64 {
    let s = scale as f64;
    2.0 * (d as f64 + 9.0) * U * s * abs_dot
}

/// Bound on `|gpu − cpu|` of an output element `o_ic = Σ_j P_ij v_jc` over
/// `n` visible keys, where every score differs by at most `ds` (from
/// [`score_tol`]) and `pv = Σ_j P_ij |v_jc|`: the weights `e^(s−m)/l` are
/// then within a relative `2·ds + (n + 8)·u` (the exponent's shift, the
/// exp's 2 ulp, the sum l of n terms) on each side, and the weighted sum
/// adds `(n + 4)·u` on each side.
pub fn out_tol(n: usize, ds: f64, pv: f64) -> f64 {
    let rel = 2.0 * ds + 2.0 * (2.0 * n as f64 + 16.0) * U;
    rel * pv + f64::from(f32::MIN_POSITIVE)
}

/// Bound on `|gpu − cpu|` of `lse = m + log l` over `n` visible keys with
/// scores within `ds`: `ds` from the scores, a relative `(n + 4)·u` in `l`,
/// and the log and the addition (`4·u·(|m| + |log l|)`) on each side.
pub fn lse_tol(n: usize, ds: f64, lse: f64) -> f64 {
    ds + 2.0 * (n as f64 + 4.0) * U + 8.0 * U * (lse.abs() + 1.0)
}

/// Bound on `|gpu − cpu|` a soft cap `c` adds to a score whose uncapped
/// value `x` the two sides computed within `ds` ([`score_tol`]): `c·tanh(x/c)`
/// moves by at most `ds` (its slope is ≤ 1), and each side's `tanh` (2 ulp
/// of a value ≤ 1: 2u), the division (u·|x|/c before a tanh of slope ≤ 1)
/// and the product (u·c) add `c·(2u + u) + u·|x|`.
pub fn cap_tol(ds: f64, cap: f32, x: f64) -> f64 {
    let c = cap as f64;
    ds + 2.0 * (3.0 * U * c + U * x.abs())
}

fn dim32(v: usize, what: &str) -> Result<u32> {
    if v > i32::MAX as usize {
        bail!(InvalidShape, "attention: {what} = {v} exceeds 2^31-1");
    }
    Ok(v as u32)
}

fn check_len(len: usize, dims: &[usize], what: &str) -> Result<()> {
    let want = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| err!(InvalidShape, "attention: {what} {dims:?} overflows"))?;
    if len != want {
        bail!(BufferSize, "attention: {what} has {len} elements, {dims:?} needs {want}");
    }
    Ok(())
}

/// Checks heads, head_dim, window and cap; returns the cap as the kernels
/// take it (0: none).
fn check_heads(n_heads: usize, n_kv_heads: usize, head_dim: usize, window: Option<usize>, softcap: Option<f32>) -> Result<f32> {
    let cap = super::cap_arg("attention", softcap)?;
    if n_kv_heads == 0 || n_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        bail!(InvalidShape, "attention: n_heads {n_heads} is not a positive multiple of n_kv_heads {n_kv_heads}");
    }
    if n_heads > 65535 {
        bail!(InvalidShape, "attention: {n_heads} heads exceed the grid limit 65535");
    }
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        bail!(InvalidShape, "attention: head_dim {head_dim} must be in 1..={MAX_HEAD_DIM}");
    }
    if window == Some(0) {
        bail!(InvalidArgument, "attention: window must be ≥ 1");
    }
    Ok(cap)
}

/// The fp32 kernels of attention.cu.
#[derive(Clone, Copy)]
enum F32Kernel {
    Forward,
    Dkdv,
    Dq,
    Decode,
}

impl F32Kernel {
    /// The kernel's name for head_dim `d` (the `_d256` instantiation above
    /// [`NARROW_HEAD_DIM`]) and the widest head_dim its tiles hold.
    fn name(self, d: usize) -> (&'static str, usize) {
        const NAMES: [[&str; 4]; 2] = [
            ["attention_forward_f32", "attention_dkdv_f32", "attention_dq_f32", "attention_decode_f32"],
            ["attention_forward_d256_f32", "attention_dkdv_d256_f32", "attention_dq_d256_f32", "attention_decode_d256_f32"],
        ];
        let wide = d > NARROW_HEAD_DIM;
        (NAMES[usize::from(wide)][self as usize], if wide { MAX_HEAD_DIM } else { NARROW_HEAD_DIM })
    }

    /// Dynamic shared memory in bytes for `dm` columns: the tiles as
    /// attention.cu carves them, rows of `dm + 1` floats. The narrow
    /// kernels (and decode) have theirs static: none.
    fn smem(self, dm: usize) -> u32 {
        if dm <= NARROW_HEAD_DIM {
            return 0;
        }
        let pad = dm + 1;
        let floats = match self {
            F32Kernel::Forward => (ATT_FQ + 2 * ATT_FK) * pad,
            F32Kernel::Dkdv => (2 * ATT_BK + 2 * ATT_BR) * pad + 2 * ATT_BR * ATT_BK,
            F32Kernel::Dq => (2 * ATT_BQ + 2 * ATT_BK) * pad + ATT_BQ * (ATT_BK + 1),
            F32Kernel::Decode => 0,
        };
        (floats * 4) as u32
    }
}

/// Raises `f`'s dynamic shared memory limit to `smem` bytes (above 48 KiB
/// a launch fails without it).
fn allow_smem(f: &cudarc::driver::CudaFunction, name: &str, smem: u32) -> Result<()> {
    super::guard("cuFuncSetAttribute", || {
        f.set_attribute(cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(|e| super::cu_err(&format!("cuFuncSetAttribute({name}, MAX_DYNAMIC_SHARED_SIZE_BYTES = {smem})"), e))
    })
}

/// Kernel `name` of `src` and its launch configuration over `grid` with
/// `smem` bytes of dynamic shared memory (the function's limit raised
/// above 48 KiB; refused by name where the device allows less).
fn smem_launch(
    dev: &CudaDevice,
    src: &'static super::KernelSource,
    name: &'static str,
    grid: (u32, u32, u32),
    threads: u32,
    smem: u32,
) -> Result<(cudarc::driver::CudaFunction, cudarc::driver::LaunchConfig)> {
    if smem > dev.max_smem_optin {
        bail!(Unsupported, "attention kernel {name} needs {smem} bytes of shared memory per block; {} allows {}", dev.describe(), dev.max_smem_optin);
    }
    let f = dev.function(src, name)?;
    if smem > 0 {
        allow_smem(&f, name, smem)?;
    }
    let mut cfg = grid_cfg(grid, threads);
    cfg.shared_mem_bytes = smem;
    Ok((f, cfg))
}

/// The function, name and launch configuration of fp32 kernel `k` for
/// head_dim `d` over `grid`, with its dynamic shared memory allowed.
fn f32_launch(dev: &CudaDevice, k: F32Kernel, d: usize, grid: (u32, u32, u32)) -> Result<(cudarc::driver::CudaFunction, &'static str, cudarc::driver::LaunchConfig)> {
    let (name, dm) = k.name(d);
    let (f, cfg) = smem_launch(dev, &ATTENTION_CU, name, grid, ATT_THREADS, k.smem(dm))?;
    Ok((f, name, cfg))
}

/// Checks a training/prefill shape: heads, `S ≥ T`, grid limits. Returns
/// `(T, S, H, Hkv, D, window, cap)` as the kernels take them (window 0,
/// cap 0: none).
fn check_shape(s: &AttnShape) -> Result<(u32, u32, u32, u32, u32, u32, f32)> {
    let cap = check_heads(s.n_heads, s.n_kv_heads, s.head_dim, s.window, s.softcap)?;
    if s.kv_len < s.q_len {
        bail!(InvalidShape, "attention: kv_len {} < q_len {}", s.kv_len, s.q_len);
    }
    if s.batch > 65535 {
        bail!(InvalidShape, "attention: batch {} exceeds the grid limit 65535", s.batch);
    }
    let w = s.window.map_or(Ok(0), |w| dim32(w.min(i32::MAX as usize), "window"))?;
    Ok((dim32(s.q_len, "q_len")?, dim32(s.kv_len, "kv_len")?, s.n_heads as u32, s.n_kv_heads as u32, s.head_dim as u32, w, cap))
}

/// The launch grid of a causal attention kernel over `tiles` tiles (of
/// query rows or keys) of each of `pairs` heads (query heads, or KV heads
/// for the dkdv kernels) of `batch` sequences: `(bc·pairs, tiles,
/// batch / bc)`, `bc` sequences per chunk (a divisor of `batch`). The
/// kernels read block `(x, y, z)` as sequence `z·bc + x / pairs`, head
/// `x mod pairs` and tile `y` (the dkdv kernels: key tile `y`, the
/// longest first) or `tiles − 1 − y` (forward and dq: the last query
/// rows, which see the most keys, first). The scheduler starts blocks in
/// index order, so a chunk runs its longest blocks first and the grid ends
/// on short ones, not on whichever (sequence, head) came last; a chunk
/// holds about two waves of blocks of the device (`bc` from its
/// multiprocessors, at 4 blocks each), so the keys and values it reads
/// stay those of a few sequences.
pub fn causal_grid(multiprocessors: u32, tiles: usize, pairs: u32, batch: usize) -> Result<(u32, u32, u32)> {
    if tiles > 65535 {
        bail!(InvalidShape, "attention: {tiles} tiles per head exceed the grid limit 65535 (sequence too long)");
    }
    if batch == 0 || tiles == 0 || pairs == 0 {
        return Ok((pairs.max(1), tiles.max(1) as u32, batch.max(1) as u32));
    }
    let per_seq = pairs as usize * tiles;
    let want = (2 * 4 * multiprocessors as usize).div_ceil(per_seq).clamp(1, batch);
    let bc = (1..=want).rev().find(|&d| batch.is_multiple_of(d)).unwrap_or(1);
    let x = bc * pairs as usize;
    if x > i32::MAX as usize || batch / bc > 65535 {
        bail!(InvalidShape, "attention: batch {batch} × {pairs} heads exceed the grid limits");
    }
    Ok((x as u32, tiles as u32, (batch / bc) as u32))
}

/// A launch configuration of `grid` (x, y, z) without dynamic shared
/// memory (the launchers add it).
fn grid_cfg((x, y, z): (u32, u32, u32), threads: u32) -> cudarc::driver::LaunchConfig {
    let mut cfg = launch_cfg((x, y), threads);
    cfg.grid_dim.2 = z;
    cfg
}

/// Lengths and streams of a forward's buffers.
fn check_forward_args<T>(dev: &CudaDevice, q: &CudaView<'_, T>, k: &CudaView<'_, T>, v: &CudaView<'_, T>, s: &AttnShape, o: &CudaViewMut<'_, T>, lse: &CudaViewMut<'_, f32>) -> Result<()> {
    check_len(q.len(), &q_dims(s), "q")?;
    check_len(k.len(), &kv_dims(s), "k")?;
    check_len(v.len(), &kv_dims(s), "v")?;
    check_len(o.len(), &q_dims(s), "o")?;
    check_len(lse.len(), &[s.batch, s.q_len, s.n_heads], "lse")?;
    for (x, what) in [(q, "q"), (k, "k"), (v, "v")] {
        dev.check_stream(x, &format!("attention {what}"))?;
    }
    dev.check_stream(o, "attention o")?;
    dev.check_stream(lse, "attention lse")
}

/// Lengths and streams of a backward's buffers: inputs q, k, v, o (fp32,
/// or bf16 for the tensor-core kernels' bf16 form), lse, dout; outputs dq,
/// dk, dv.
fn check_backward_args<T, O>(dev: &CudaDevice, qkv: [&CudaView<'_, T>; 3], o: &CudaView<'_, O>, lse: &CudaView<'_, f32>, dout: &CudaView<'_, f32>, s: &AttnShape, out: [&CudaViewMut<'_, f32>; 3]) -> Result<()> {
    let [q, k, v] = qkv;
    let [dq, dk, dv] = out;
    for (len, what) in [(q.len(), "q"), (o.len(), "o"), (dout.len(), "dout"), (dq.len(), "dq")] {
        check_len(len, &q_dims(s), what)?;
    }
    for (len, what) in [(k.len(), "k"), (v.len(), "v"), (dk.len(), "dk"), (dv.len(), "dv")] {
        check_len(len, &kv_dims(s), what)?;
    }
    check_len(lse.len(), &[s.batch, s.q_len, s.n_heads], "lse")?;
    for (x, what) in [(q, "q"), (k, "k"), (v, "v")] {
        dev.check_stream(x, &format!("attention {what}"))?;
    }
    dev.check_stream(o, "attention o")?;
    dev.check_stream(lse, "attention lse")?;
    dev.check_stream(dout, "attention dout")?;
    for (x, what) in [(dq, "dq"), (dk, "dk"), (dv, "dv")] {
        dev.check_stream(x, &format!("attention {what}"))?;
    }
    Ok(())
}

fn q_dims(s: &AttnShape) -> [usize; 4] {
    [s.batch, s.q_len, s.n_heads, s.head_dim]
}

fn kv_dims(s: &AttnShape) -> [usize; 4] {
    [s.batch, s.kv_len, s.n_kv_heads, s.head_dim]
}

/// Causal GQA forward: `o[b,i,h,:] = Σ_j softmax_j(scale·q·k_j)·v_j` over
/// the keys visible from row `i`, and `lse[b,i,h] = log Σ_j exp(scale·q·k_j)`
/// (as [`crate::backend::cpu::attention::attention_forward`]). `q`, `o`
/// `[B, T, H, D]`, `k`, `v` `[B, S, Hkv, D]`, `lse` `[B, T, H]`; both
/// outputs overwritten.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    dev: &CudaDevice,
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, f32>,
    v: &CudaView<'_, f32>,
    s: &AttnShape,
    o: &mut CudaViewMut<'_, f32>,
    lse: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (t, sl, h, hkv, d, w, cap) = check_shape(s)?;
    check_forward_args(dev, q, k, v, s, o, lse)?;
    if s.batch == 0 || s.q_len == 0 {
        return Ok(());
    }
    let scale = s.scale();
    let (f, name, cfg) = f32_launch(dev, F32Kernel::Forward, s.head_dim, causal_grid(dev.multiprocessors, s.q_len.div_ceil(ATT_FQ), h, s.batch)?)?;
    // SAFETY: (ptr ×3, u32 ×7, f32 ×2, ptr ×2) as the kernel. The block of
    // (b, h, tile) (causal_grid) reads rows < T of q (head h), rows < S of k, v (head h/(H/Hkv) < Hkv)
    // and writes rows < T of o and lse: all lengths checked above; D ≤ the
    // kernel's columns, its shared memory as F32Kernel::smem sizes it.
    launch_kernel!(dev, f, name, cfg, [q, k, v, &t, &sl, &h, &hkv, &d, &w, &scale, &cap, o, lse])
}

/// Causal GQA backward (FlashAttention-2, as
/// [`crate::backend::cpu::attention::attention_backward`]): from the
/// forward's inputs, its `o` and `lse`, and the upstream `dout`, writes
/// `dq` `[B, T, H, D]` and `dk`, `dv` `[B, S, Hkv, D]` (overwritten); `dk`,
/// `dv` of a KV head sum its query heads. Three launches plus a `B·T·H`
/// scratch for `δ`; deterministic (no atomics). `o` is fp32, or bf16 (what
/// the lean bf16 step keeps: `δ = rowsum(dout ∘ o)` from the widened `o`,
/// bit for bit the fp32 form given that widened `o`).
#[allow(clippy::too_many_arguments)]
pub fn backward<O: TcElem>(
    dev: &CudaDevice,
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, f32>,
    v: &CudaView<'_, f32>,
    o: &CudaView<'_, O>,
    lse: &CudaView<'_, f32>,
    dout: &CudaView<'_, f32>,
    s: &AttnShape,
    dq: &mut CudaViewMut<'_, f32>,
    dk: &mut CudaViewMut<'_, f32>,
    dv: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (t, sl, h, hkv, d, w, cap) = check_shape(s)?;
    check_backward_args(dev, [q, k, v], o, lse, dout, s, [&*dq, &*dk, &*dv])?;
    if s.batch == 0 || s.kv_len == 0 {
        return Ok(());
    }
    let scale = s.scale();
    let delta = delta_async(dev, o, dout, s, d)?;
    let (f, name, cfg) = f32_launch(dev, F32Kernel::Dkdv, s.head_dim, causal_grid(dev.multiprocessors, s.kv_len.div_ceil(ATT_BK), hkv, s.batch)?)?;
    // SAFETY: (ptr ×6, u32 ×7, f32 ×2, ptr ×2). The block of (b, g, key tile)
    // (causal_grid) reads keys
    // < S of k, v (head g < Hkv), rows < T of q, dout (heads of group g < H),
    // lse and delta at those rows, and writes its keys' rows of dk, dv:
    // lengths checked above, delta has B·T·H elements.
    launch_kernel!(dev, f, name, cfg, [q, k, v, dout, lse, &delta, &t, &sl, &h, &hkv, &d, &w, &scale, &cap, dk, dv])?;
    if s.q_len == 0 {
        return Ok(());
    }
    let (f, name, cfg) = f32_launch(dev, F32Kernel::Dq, s.head_dim, causal_grid(dev.multiprocessors, s.q_len.div_ceil(ATT_BQ), h, s.batch)?)?;
    // SAFETY: (ptr ×6, u32 ×7, f32 ×2, ptr). The block of (b, h, tile)
    // (causal_grid) reads rows < T
    // of q, dout, lse, delta (head h), keys < S of k, v (head h/(H/Hkv)),
    // and writes its rows of dq: lengths checked above.
    launch_kernel!(dev, f, name, cfg, [q, k, v, dout, lse, &delta, &t, &sl, &h, &hkv, &d, &w, &scale, &cap, dq])
}

/// `δ = rowsum(dout ∘ o)` per (batch, row, head), `[B, T, H]` (scratch,
/// freed in stream order), `o` fp32 or bf16 ([`TcElem`]; the bf16 kernel
/// gives the fp32 kernel's bits on the widened `o`). Lengths checked by the
/// callers.
fn delta_async<T: TcElem>(dev: &CudaDevice, o: &CudaView<'_, T>, dout: &CudaView<'_, f32>, s: &AttnShape, d: u32) -> Result<cudarc::driver::CudaSlice<f32>> {
    let rows = (s.batch * s.q_len * s.n_heads) as u64;
    let mut delta = scratch::<f32>(dev, rows as usize)?;
    if rows > 0 {
        let (src, name, threads) = T::DELTA;
        let f = dev.function(src, name)?;
        let grid = stride_grid(rows, threads / 32);
        // SAFETY: (ptr, ptr, u64, u32, ptr); warp r < rows reads D values of
        // row r of dout and o (rows·D each, checked) and writes delta[r]
        // (rows allocated); `threads` is the kernel's block size.
        launch_kernel!(dev, f, name, launch_cfg((grid, 1), threads), [dout, o, &rows, &d, &mut delta])?;
    }
    Ok(delta)
}

// ------------------------------------------------- tensor cores (bf16 mode)

/// Threads per block of `cuda/attention_tc.cu` (`ATC_THREADS`).
const ATC_THREADS: u32 = 128;
/// Query rows per forward / dq block, keys per dkdv block (`ATC_FWD_BQ`,
/// `ATC_DQ_BQ`, `ATC_KV_BK`).
const ATC_ROWS: usize = 64;
/// Query rows per dkdv tile (`ATC_KV_BQ`) and shared-row padding (`ATC_PAD`).
const ATC_KV_BQ: usize = 32;
const ATC_PAD: usize = 8;
/// The head_dim-256 kernels' tile: keys (forward, dq) or query rows (dK,
/// dV) per step (`ATC_W_BK`).
const ATC_W_BK: usize = 32;

mod sealed {
    /// Only this module's element types name kernels ([`super::TcElem`]).
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
}

/// The element type of the tensor-core kernels' q, k, v and o: fp32
/// (rounded to bf16 as the kernels stage it; kernels `*_bf16`) or bf16 bits
/// (`u16`, kernels `*_bf16io`: what the bf16 step keeps, half the bytes).
/// Given the roundings of the fp32 form's q, k, v, the bf16 form computes
/// the same lse and o rounded to bf16; its backward, given that o, the
/// gradients the fp32 form computes from the widened o. Sealed: the
/// launchers trust its kernel names and element size.
pub trait TcElem: DeviceRepr + sealed::Sealed {
    /// The kernels' names, `[forward, dkdv, dq]` for head_dim 64 then 128.
    const KERNELS: [[&'static str; 3]; 2];
    /// The head_dim-256 kernels, `[forward, dv, dk, dq]`.
    const WIDE: [&'static str; 4];
    /// The `δ = rowsum(dout ∘ o)` kernel for this `o`: source, name,
    /// threads per block.
    const DELTA: (&'static super::KernelSource, &'static str, u32);
}

impl TcElem for f32 {
    const KERNELS: [[&'static str; 3]; 2] = [
        ["attention_tc_forward_d64_bf16", "attention_tc_dkdv_d64_bf16", "attention_tc_dq_d64_bf16"],
        ["attention_tc_forward_d128_bf16", "attention_tc_dkdv_d128_bf16", "attention_tc_dq_d128_bf16"],
    ];
    const WIDE: [&'static str; 4] = ["attention_tc_forward_d256_bf16", "attention_tc_dv_d256_bf16", "attention_tc_dk_d256_bf16", "attention_tc_dq_d256_bf16"];
    const DELTA: (&'static super::KernelSource, &'static str, u32) = (&ATTENTION_CU, "attention_delta_f32", ATT_THREADS);
}

impl TcElem for u16 {
    const KERNELS: [[&'static str; 3]; 2] = [
        ["attention_tc_forward_d64_bf16io", "attention_tc_dkdv_d64_bf16io", "attention_tc_dq_d64_bf16io"],
        ["attention_tc_forward_d128_bf16io", "attention_tc_dkdv_d128_bf16io", "attention_tc_dq_d128_bf16io"],
    ];
    const WIDE: [&'static str; 4] = ["attention_tc_forward_d256_bf16io", "attention_tc_dv_d256_bf16io", "attention_tc_dk_d256_bf16io", "attention_tc_dq_d256_bf16io"];
    const DELTA: (&'static super::KernelSource, &'static str, u32) = (&ATTENTION_TC_CU, "attention_tc_delta_bf16o", ATC_THREADS);
}

/// The unit roundoff of bf16 (8 significant bits, round to nearest):
/// `|bf16(x) − x| ≤ 2⁻⁸·|x|`.
pub const BF16_U: f64 = 1.0 / 256.0;

/// True when the tensor-core kernels take this shape: self-attention
/// (`S = T`) with head_dim 64, 128 or 256 (soft-capped or not), on an
/// sm_80+ device (for 256, one whose blocks may take the kernels' 120 KiB
/// of shared memory: A100 and H100 can, the sm_86/sm_89 cards' 99 KiB
/// cannot).
pub fn tc_supported(dev: &CudaDevice, s: &AttnShape) -> bool {
    let d = s.head_dim;
    s.q_len == s.kv_len
        && dev.compute_capability.0 >= 8
        && (d == 64 || d == 128 || (d == 256 && atcw_smem(d).into_iter().max().unwrap_or(0) <= dev.max_smem_optin))
}

/// Dynamic shared memory of the head_dim-`d` (256) kernels, bytes:
/// `[forward, dv, dk, dq]` (their layouts in `cuda/attention_tc.cu`).
fn atcw_smem(d: usize) -> [u32; 4] {
    let (ldk, ldt) = (d + ATC_PAD, ATC_W_BK + ATC_PAD);
    let (rows, tile) = (ATC_ROWS * ldk, ATC_W_BK * ldk);
    [
        2 * (rows + tile + d * ldt),
        2 * (rows + tile + d * ldt) + 4 * ATC_W_BK,
        2 * (2 * rows + 2 * tile + d * ldt) + 2 * 4 * ATC_W_BK,
        2 * (2 * rows + 2 * tile + d * ldt),
    ]
    .map(|b| b as u32)
}

/// Dynamic shared memory of the dkdv kernel for head_dim `d`.
fn atc_dkdv_smem(d: usize) -> u32 {
    let ldk = d + ATC_PAD;
    let ldt = ATC_KV_BQ + ATC_PAD;
    (2 * (2 * ATC_ROWS * ldk + 2 * ATC_KV_BQ * ldk + 2 * d * ldt) + 2 * ATC_KV_BQ * 4) as u32
}

/// The kernels read and write pairs of elements as one 8-byte (fp32) or
/// 4-byte (bf16) access at even indices: each buffer must start at such
/// an address (a whole allocation does; a view at an odd offset does not).
fn check_pairs_aligned<T>(dev: &CudaDevice, v: &CudaView<'_, T>, what: &str) -> Result<()> {
    let (a, align) = (v.device_ptr(&dev.stream).0, 2 * std::mem::size_of::<T>() as u64);
    if a % align != 0 {
        bail!(InvalidArgument, "attention {what} at device address {a:#x} is not {align}-byte aligned (the tensor-core kernels access element pairs)");
    }
    Ok(())
}

/// `(T, H, Hkv, D, window, cap)` as the tensor-core kernels take them.
fn tc_check(dev: &CudaDevice, s: &AttnShape) -> Result<(u32, u32, u32, u32, u32, f32)> {
    let (t, _, h, hkv, d, w, cap) = check_shape(s)?;
    if !tc_supported(dev, s) {
        bail!(Unsupported, "tensor-core attention needs S = T and head_dim 64, 128 or 256 (with 120 KiB of shared memory per block) on sm_80+, got S {} T {} head_dim {} on {}", s.kv_len, s.q_len, s.head_dim, dev.describe());
    }
    Ok((t, h, hkv, d, w, cap))
}

/// [`forward`] on tensor cores: the same outputs from bf16-rounded q, k, v
/// (and P), fp32 accumulation (`cuda/attention_tc.cu`); q, k, v and o fp32
/// or bf16 ([`TcElem`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_tc<T: TcElem>(dev: &CudaDevice, q: &CudaView<'_, T>, k: &CudaView<'_, T>, v: &CudaView<'_, T>, s: &AttnShape, o: &mut CudaViewMut<'_, T>, lse: &mut CudaViewMut<'_, f32>) -> Result<()> {
    let (t, h, hkv, d, w, cap) = tc_check(dev, s)?;
    check_forward_args(dev, q, k, v, s, o, lse)?;
    for (x, what) in [(q, "q"), (k, "k"), (v, "v"), (&o.as_view(), "o")] {
        check_pairs_aligned(dev, x, what)?;
    }
    if s.batch == 0 || s.q_len == 0 {
        return Ok(());
    }
    let scale = s.scale();
    let (name, smem) = if d == 256 { (T::WIDE[0], atcw_smem(256)[0]) } else { (T::KERNELS[usize::from(d == 128)][0], 0) };
    let (f, cfg) = smem_launch(dev, &ATTENTION_TC_CU, name, causal_grid(dev.multiprocessors, s.q_len.div_ceil(ATC_ROWS), h, s.batch)?, ATC_THREADS, smem)?;
    // SAFETY: (ptr ×3, u32 ×4, f32 ×2, ptr ×2) as the kernel. The block of
    // (b, h, tile) (causal_grid) reads rows < T of q (head h) and of k, v (head h/(H/Hkv)), writes its
    // rows < T of o and lse: lengths checked above; pair accesses (float2,
    // or two bf16 as one u32) are aligned (D even, buffers checked above);
    // head_dim 256: dynamic shared memory as the kernel lays it out
    // (atcw_smem).
    launch_kernel!(dev, f, name, cfg, [q, k, v, &t, &h, &hkv, &w, &scale, &cap, o, lse])
}

/// [`backward`] on tensor cores (FlashAttention-2 with bf16 operands; `P`
/// and `dS` rounded to bf16 before their products), from the outputs of
/// [`forward_tc`] (q, k, v, o in its element type; lse, dout and the
/// gradients fp32). Deterministic (no atomics).
#[allow(clippy::too_many_arguments)]
pub fn backward_tc<T: TcElem>(
    dev: &CudaDevice,
    q: &CudaView<'_, T>,
    k: &CudaView<'_, T>,
    v: &CudaView<'_, T>,
    o: &CudaView<'_, T>,
    lse: &CudaView<'_, f32>,
    dout: &CudaView<'_, f32>,
    s: &AttnShape,
    dq: &mut CudaViewMut<'_, f32>,
    dk: &mut CudaViewMut<'_, f32>,
    dv: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (t, h, hkv, d, w, cap) = tc_check(dev, s)?;
    check_backward_args(dev, [q, k, v], o, lse, dout, s, [&*dq, &*dk, &*dv])?;
    for (x, what) in [(q, "q"), (k, "k"), (v, "v"), (o, "o")] {
        check_pairs_aligned(dev, x, what)?;
    }
    for (x, what) in [(dout, "dout"), (&dq.as_view(), "dq"), (&dk.as_view(), "dk"), (&dv.as_view(), "dv")] {
        check_pairs_aligned(dev, x, what)?;
    }
    if s.batch == 0 || s.q_len == 0 {
        return Ok(());
    }
    let scale = s.scale();
    let delta = delta_async(dev, o, dout, s, d)?;
    if d == 256 {
        return backward_tc_wide::<T>(dev, [q, k, v], lse, dout, &delta, s, (t, h, hkv, w, scale, cap), dq, dk, dv);
    }
    let name = T::KERNELS[usize::from(d == 128)][1];
    let kv_grid = causal_grid(dev.multiprocessors, s.kv_len.div_ceil(ATC_ROWS), hkv, s.batch)?;
    let (f, cfg) = smem_launch(dev, &ATTENTION_TC_CU, name, kv_grid, ATC_THREADS, atc_dkdv_smem(s.head_dim))?;
    // SAFETY: (ptr ×6, u32 ×4, f32 ×2, ptr ×2). The block of (b, g, key tile)
    // (causal_grid) reads keys < T
    // of k, v (head g), rows < T of q, dout, lse, delta (heads of group g),
    // writes its keys' rows of dk, dv; dynamic shared memory as the kernel
    // lays it out (atc_dkdv_smem).
    launch_kernel!(dev, f, name, cfg, [q, k, v, dout, lse, &delta, &t, &h, &hkv, &w, &scale, &cap, dk, dv])?;
    let name = T::KERNELS[usize::from(d == 128)][2];
    let f = dev.function(&ATTENTION_TC_CU, name)?;
    let cfg = grid_cfg(causal_grid(dev.multiprocessors, s.q_len.div_ceil(ATC_ROWS), h, s.batch)?, ATC_THREADS);
    // SAFETY: (ptr ×6, u32 ×4, f32 ×2, ptr). The block of (b, h, tile)
    // (causal_grid) reads rows < T of
    // q, dout, lse, delta (head h) and keys < T of k, v, writes its rows of
    // dq: lengths checked above.
    launch_kernel!(dev, f, name, cfg, [q, k, v, dout, lse, &delta, &t, &h, &hkv, &w, &scale, &cap, dq])
}

/// [`backward_tc`]'s kernels for head_dim 256: dV, dK (each recomputing
/// P) and dq, each with its dynamic shared memory (`atcw_smem`).
#[allow(clippy::too_many_arguments)]
fn backward_tc_wide<T: TcElem>(
    dev: &CudaDevice,
    [q, k, v]: [&CudaView<'_, T>; 3],
    lse: &CudaView<'_, f32>,
    dout: &CudaView<'_, f32>,
    delta: &cudarc::driver::CudaSlice<f32>,
    s: &AttnShape,
    (t, h, hkv, w, scale, cap): (u32, u32, u32, u32, f32, f32),
    dq: &mut CudaViewMut<'_, f32>,
    dk: &mut CudaViewMut<'_, f32>,
    dv: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let smem = atcw_smem(256);
    let kv_grid = causal_grid(dev.multiprocessors, s.kv_len.div_ceil(ATC_ROWS), hkv, s.batch)?;
    let part = |i: usize, out: &mut CudaViewMut<'_, f32>| -> Result<()> {
        let name = T::WIDE[i];
        let (f, cfg) = smem_launch(dev, &ATTENTION_TC_CU, name, kv_grid, ATC_THREADS, smem[i])?;
        // SAFETY: (ptr ×6, u32 ×4, f32 ×2, ptr). The block of (b, g, key
        // tile) (causal_grid) reads keys < T of k, v (head g), rows < T of
        // q, dout, lse, delta (heads of group g), writes its keys' rows of
        // dv (part 1) or dk (part 2): lengths checked by backward_tc;
        // dynamic shared memory as the kernel lays it out (atcw_smem).
        launch_kernel!(dev, f, name, cfg, [q, k, v, dout, lse, delta, &t, &h, &hkv, &w, &scale, &cap, out])
    };
    part(1, dv)?;
    part(2, dk)?;
    let name = T::WIDE[3];
    let (f, cfg) = smem_launch(dev, &ATTENTION_TC_CU, name, causal_grid(dev.multiprocessors, s.q_len.div_ceil(ATC_ROWS), h, s.batch)?, ATC_THREADS, smem[3])?;
    // SAFETY: (ptr ×6, u32 ×4, f32 ×2, ptr). The block of (b, h, tile)
    // (causal_grid) reads rows < T of q, dout, lse, delta (head h) and keys
    // < T of k, v, writes its rows of dq; shared memory as atcw_smem.
    launch_kernel!(dev, f, name, cfg, [q, k, v, dout, lse, delta, &t, &h, &hkv, &w, &scale, &cap, dq])
}

/// Decode attention (as [`crate::backend::cpu::attention::attention_decode`]):
/// `o[b,h,:] = Σ_j softmax_j(scale·q[b,h,:]·k[b,j,g,:])·v[b,j,g,:]` over keys
/// `lo..lens[b]` of sequence b's cache (`lo = lens[b] − W` with a window).
/// `q`, `o` `[B, H, D]`; caches `[B, cap, Hkv, D]`; `lens` (host) each in
/// `1..=cap`, uploaded as u32.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    dev: &CudaDevice,
    q: &CudaView<'_, f32>,
    k_cache: &CudaView<'_, f32>,
    v_cache: &CudaView<'_, f32>,
    lens: &[usize],
    s: &DecodeShape,
    o: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let softcap = check_heads(s.n_heads, s.n_kv_heads, s.head_dim, s.window, s.softcap)?;
    if s.batch > 65535 {
        bail!(InvalidShape, "attention decode: batch {} exceeds the grid limit 65535", s.batch);
    }
    let cap = dim32(s.cache_cap, "cache_cap")?;
    let w = s.window.map_or(Ok(0), |w| dim32(w.min(i32::MAX as usize), "window"))?;
    let (h, hkv, d) = (s.n_heads as u32, s.n_kv_heads as u32, s.head_dim as u32);
    check_len(q.len(), &[s.batch, s.n_heads, s.head_dim], "q")?;
    check_len(o.len(), &[s.batch, s.n_heads, s.head_dim], "o")?;
    check_len(k_cache.len(), &[s.batch, s.cache_cap, s.n_kv_heads, s.head_dim], "k_cache")?;
    check_len(v_cache.len(), &[s.batch, s.cache_cap, s.n_kv_heads, s.head_dim], "v_cache")?;
    if lens.len() != s.batch {
        bail!(BufferSize, "attention decode: {} lengths for batch {}", lens.len(), s.batch);
    }
    if let Some((b, &n)) = lens.iter().enumerate().find(|&(_, &n)| n == 0 || n > s.cache_cap) {
        bail!(InvalidArgument, "attention decode: lens[{b}] = {n} is not in 1..={}", s.cache_cap);
    }
    dev.check_stream(q, "attention q")?;
    dev.check_stream(k_cache, "attention k_cache")?;
    dev.check_stream(v_cache, "attention v_cache")?;
    dev.check_stream(o, "attention o")?;
    if s.batch == 0 {
        return Ok(());
    }
    let lens32: Vec<u32> = lens.iter().map(|&n| n as u32).collect();
    let lens_d = dev.upload(&lens32)?;
    let scale = s.scale();
    let (name, _) = F32Kernel::Decode.name(s.head_dim);
    let f = dev.function(&ATTENTION_CU, name)?;
    // SAFETY: (ptr ×4, u32 ×5, f32 ×2, ptr). Block (h, b) reads q[b, h], lens[b]
    // (B uploaded), cache rows < lens[b] ≤ cap of head h/(H/Hkv) < Hkv, and
    // writes o[b, h]: lengths and lens checked above; D ≤ the kernel's
    // columns (static shared memory).
    launch_kernel!(dev, f, name, launch_cfg((h, s.batch as u32), ATT_THREADS), [q, k_cache, v_cache, &lens_d, &cap, &h, &hkv, &d, &w, &scale, &softcap, o])
}

#[cfg(test)]
mod tests {
    /// Every (sequence, head, tile) has exactly one block: chunks of whole
    /// sequences (a divisor of the batch), about two waves of a device's
    /// blocks each; too many tiles are refused.
    #[test]
    fn causal_grid_covers_each_block_once() {
        for (sms, tiles, pairs, batch) in [(132, 16, 32, 4), (132, 64, 32, 4), (132, 16, 8, 4), (4, 3, 2, 3), (1, 1, 2, 2), (132, 1, 1, 7), (108, 5, 12, 6)] {
            let (x, y, z) = super::causal_grid(sms, tiles, pairs, batch).unwrap();
            let bc = x as usize / pairs as usize;
            assert_eq!((x as usize % pairs as usize, y as usize, z as usize * bc), (0, tiles, batch), "{sms} SMs, {tiles} tiles, {pairs} heads, batch {batch}: grid ({x}, {y}, {z})");
            // A chunk fills two waves of 4 blocks per multiprocessor, unless
            // the batch (or its divisors) is too small for it.
            let want = (8 * sms as usize).div_ceil(pairs as usize * tiles).min(batch);
            assert!(bc <= want && (bc == want || batch % want != 0), "{sms} SMs, {tiles} tiles, {pairs} heads, batch {batch}: {bc} sequences per chunk");
        }
        assert_eq!(super::causal_grid(132, 65536, 32, 1).unwrap_err().kind, crate::ErrorKind::InvalidShape);
    }

    /// The launcher's tile constants are the kernel's.
    #[test]
    fn launch_constants_match_the_kernel() {
        let src = include_str!("../../../cuda/attention.cu");
        let def = |name: &str| -> String {
            let pre = format!("#define {name} ");
            let line = src.lines().find(|l| l.starts_with(&pre)).unwrap_or_else(|| panic!("#define {name} in attention.cu"));
            line[pre.len()..].split_whitespace().next().unwrap().to_string()
        };
        assert_eq!(def("ATT_THREADS"), super::ATT_THREADS.to_string());
        assert_eq!(def("ATT_DMAX"), super::MAX_HEAD_DIM.to_string());
        assert_eq!(def("ATT_DNARROW"), super::NARROW_HEAD_DIM.to_string());
        assert_eq!(def("ATT_FK"), super::ATT_FK.to_string());
        assert_eq!(def("ATT_BR"), super::ATT_BR.to_string());
        assert_eq!(def("ATT_FQ"), super::ATT_FQ.to_string());
        assert_eq!(def("ATT_BK"), super::ATT_BK.to_string());
        assert_eq!(def("ATT_BQ"), super::ATT_BQ.to_string());
        let tc = include_str!("../../../cuda/attention_tc.cu");
        let tdef = |name: &str| -> String {
            let pre = format!("#define {name} ");
            let line = tc.lines().find(|l| l.starts_with(&pre)).unwrap_or_else(|| panic!("#define {name} in attention_tc.cu"));
            line[pre.len()..].split_whitespace().next().unwrap().to_string()
        };
        assert_eq!(tdef("ATC_THREADS"), super::ATC_THREADS.to_string());
        for n in ["ATC_FWD_BQ", "ATC_DQ_BQ", "ATC_KV_BK"] {
            assert_eq!(tdef(n), super::ATC_ROWS.to_string(), "{n}");
        }
        assert_eq!(tdef("ATC_KV_BQ"), super::ATC_KV_BQ.to_string());
        assert_eq!(tdef("ATC_W_BK"), super::ATC_W_BK.to_string());
        assert_eq!(tdef("ATC_PAD"), super::ATC_PAD.to_string());
    }
}
