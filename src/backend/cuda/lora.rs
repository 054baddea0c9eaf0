//! Launchers for `cuda/lora.cu`: the LoRA products, fp32, twins of what
//! [`crate::lora::LoraLayer`]'s `forward_at` and `backward` compute with
//! [`crate::backend::cpu::matmul::gemm_f32`] (A `[r, in]`, B `[out, r]`,
//! row-major):
//! - [`shrink`] `h = x·Aᵀ`, [`expand`] `y += s·h·Bᵀ`, [`forward`] both;
//! - [`bgmv`]: a mixed-adapter batch (Punica's BGMV), one launch per stage
//!   for the whole batch, the adapter of each row from a device index array
//!   (−1, or any index outside the table: no adapter, the row untouched);
//! - backward: [`bwd_g`] `g = dy·B`, [`bwd_dx`] `dx += s·g·A`, [`grad_b`]
//!   `dB += s·dyᵀ·h`, [`grad_a`] `dA += s·gᵀ·x`, and [`backward`] all four.
//!
//! Agreement with the CPU: both sum in f32 in different orders (the GPU a
//! per-thread FMA chain then a fixed tree, the CPU gemm's blocking), so a
//! length-`k` sum of products agrees within [`dot_tol`] of `Σ|terms|`, and
//! an accumulated result (`y`, `dx`, `dA`, `dB`) within [`accum_tol`].
//! Dropout: [`dropout`] makes the adapter input (x after the mask) and
//! [`dropout_accum`] applies the mask to the `dx` contribution, bit for bit
//! as the CPU does (the same counter-based mask, [`crate::rng::dropout_keep`]).
//!
//! All functions only queue work (no sync); scratch buffers are freed in
//! stream order.

use super::{launch_cfg, scratch, stride_grid, CudaDevice, LORA_CU};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr};

/// Threads per block (`LORA_THREADS` in lora.cu).
const LORA_THREADS: u32 = 256;

/// The f32 unit roundoff, 2⁻²⁴.
pub const U: f64 = 1.0 / (1u64 << 24) as f64;

/// Bound on `|gpu − cpu|` of a length-`k` f32 sum of products whose
/// absolute values sum to `abs_sum`: each side is within `(k + 16)·u·abs_sum`
/// of the exact value (the GPU's longest chain is `k/256 + 13` roundings:
/// FMAs, 5 shuffle levels, 8 warp sums), so twice that.
pub fn dot_tol(k: usize, abs_sum: f64) -> f64 {
    2.0 * (k as f64 + 16.0) * U * abs_sum + f64::from(f32::MIN_POSITIVE)
}

/// Bound on `|gpu − cpu|` of `d += s·Σ_k` (a length-`k` sum with
/// `Σ|terms| = abs_sum`, `d` before the update `d0`): the sum's
/// [`dot_tol`] scaled by `|s|`, plus the product with `s` and the addition
/// rounding once on each side.
pub fn accum_tol(k: usize, s: f32, abs_sum: f64, d0: f32) -> f64 {
    let s = s.abs() as f64;
    s * dot_tol(k, abs_sum) + 4.0 * U * ((d0 as f64).abs() + s * abs_sum)
}

fn dim32(v: usize, what: &str) -> Result<u32> {
    if v == 0 || v > u32::MAX as usize {
        bail!(InvalidShape, "lora: {what} = {v} must be in 1..=2^32-1");
    }
    Ok(v as u32)
}

fn rows32(n: usize) -> Result<u32> {
    if n > i32::MAX as usize {
        bail!(InvalidShape, "lora: {n} rows, at most 2^31-1");
    }
    Ok(n as u32)
}

/// `ceil(cols / LORA_THREADS)`, within CUDA's gridDim.y limit.
fn col_blocks(cols: usize) -> Result<u32> {
    let b = cols.div_ceil(LORA_THREADS as usize);
    if b > 65535 {
        bail!(InvalidShape, "lora: {cols} columns exceed the grid limit (65535·{LORA_THREADS})");
    }
    Ok(b as u32)
}

fn check_len(len: usize, rows: usize, cols: usize, what: &str) -> Result<()> {
    let want = rows.checked_mul(cols).ok_or_else(|| err!(InvalidShape, "lora: {what} [{rows}, {cols}] overflows"))?;
    if len != want {
        bail!(BufferSize, "lora: {what} has {len} elements, [{rows}, {cols}] needs {want}");
    }
    Ok(())
}

/// Launches a one-block-per-row product kernel `name(x, m, n, k, q, out)`:
/// block i reads row i of `x` `[n, k]` and all of `m` (`m_shape` elements
/// named `m_what`), writes row i of `out` `[n, q]`.
#[allow(clippy::too_many_arguments)]
fn row_product(dev: &CudaDevice, name: &'static str, x: (&CudaView<'_, f32>, &str), m: (&CudaView<'_, f32>, usize, usize, &str), n: usize, k: (usize, &str), q: usize, out: (&mut CudaViewMut<'_, f32>, &str)) -> Result<()> {
    let (n32, k32, q32) = (rows32(n)?, dim32(k.0, k.1)?, dim32(q, "r")?);
    let k = k.0;
    check_len(x.0.len(), n, k, x.1)?;
    check_len(m.0.len(), m.1, m.2, m.3)?;
    check_len(out.0.len(), n, q, out.1)?;
    dev.check_stream(x.0, &format!("lora {}", x.1))?;
    dev.check_stream(m.0, &format!("lora {}", m.3))?;
    dev.check_stream(out.0, &format!("lora {}", out.1))?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(&LORA_CU, name)?;
    let (xv, mv, o) = (x.0, m.0, out.0);
    // SAFETY: (ptr, ptr, u32, u32, u32, ptr) as the row kernels; block i
    // reads row i of x and all of m, writes row i of out (lengths checked).
    launch_kernel!(dev, f, name, launch_cfg((n32, 1), LORA_THREADS), [xv, mv, &n32, &k32, &q32, o])
}

/// Launches a (row, column block) accumulation kernel
/// `name(h, m, n, r, cols, s, y)`: block (i, c) reads row i of `h` `[n, r]`
/// and `m` (`[cols, r]` or `[r, cols]`, `m_shape`), updates `y[i, c·256..]`.
#[allow(clippy::too_many_arguments)]
fn row_accumulate(dev: &CudaDevice, name: &'static str, h: (&CudaView<'_, f32>, &str), m: (&CudaView<'_, f32>, usize, usize, &str), n: usize, r: usize, cols: (usize, &str), s: f32, y: (&mut CudaViewMut<'_, f32>, &str)) -> Result<()> {
    let (n32, r32, c32) = (rows32(n)?, dim32(r, "r")?, dim32(cols.0, cols.1)?);
    let cols = cols.0;
    let cb = col_blocks(cols)?;
    check_len(h.0.len(), n, r, h.1)?;
    check_len(m.0.len(), m.1, m.2, m.3)?;
    check_len(y.0.len(), n, cols, y.1)?;
    dev.check_stream(h.0, &format!("lora {}", h.1))?;
    dev.check_stream(m.0, &format!("lora {}", m.3))?;
    dev.check_stream(y.0, &format!("lora {}", y.1))?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(&LORA_CU, name)?;
    let (hv, mv, o) = (h.0, m.0, y.0);
    // SAFETY: (ptr, ptr, u32, u32, u32, f32, ptr) as the accumulation
    // kernels; block (i, c) reads row i of h and m (lengths checked),
    // updates y[i, c·256..] below cols.
    launch_kernel!(dev, f, name, launch_cfg((n32, cb), LORA_THREADS), [hv, mv, &n32, &r32, &c32, &s, o])
}

/// `h[n, r] = x[n, in]·Aᵀ` (`A` `[r, in]`), overwriting `h`.
pub fn shrink(dev: &CudaDevice, x: &CudaView<'_, f32>, a: &CudaView<'_, f32>, n: usize, in_f: usize, r: usize, h: &mut CudaViewMut<'_, f32>) -> Result<()> {
    row_product(dev, "lora_shrink_f32", (x, "x"), (a, r, in_f, "A"), n, (in_f, "in"), r, (h, "h"))
}

/// `y[n, out] += s·h[n, r]·Bᵀ` (`B` `[out, r]`).
#[allow(clippy::too_many_arguments)]
pub fn expand(dev: &CudaDevice, h: &CudaView<'_, f32>, b: &CudaView<'_, f32>, n: usize, r: usize, out_f: usize, s: f32, y: &mut CudaViewMut<'_, f32>) -> Result<()> {
    row_accumulate(dev, "lora_expand_f32", (h, "h"), (b, out_f, r, "B"), n, r, (out_f, "out"), s, (y, "y"))
}

/// `y += s·(x·Aᵀ)·Bᵀ`: [`shrink`] into scratch (`n·r` f32), then [`expand`].
#[allow(clippy::too_many_arguments)]
pub fn forward(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    n: usize,
    in_f: usize,
    out_f: usize,
    r: usize,
    s: f32,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    dim32(r, "r")?;
    let mut h = scratch::<f32>(dev, n * r)?;
    shrink(dev, x, a, n, in_f, r, &mut h.slice_mut(0..n * r))?;
    expand(dev, &h.slice(0..n * r), b, n, r, out_f, s, y)
}

/// One adapter of a mixed batch: `a` `[rank, in]`, `b` `[out, rank]`, the
/// scale applied to its rows.
pub struct BgmvAdapter<'a> {
    pub a: CudaView<'a, f32>,
    pub b: CudaView<'a, f32>,
    pub rank: usize,
    pub scale: f32,
}

/// Mixed-adapter batch: `y[i] += s_a·(x[i]·A_aᵀ)·B_aᵀ` with `a =
/// row_adapter[i]` indexing `adapters`; a row whose index is −1 (or outside
/// the table) is untouched. Two launches for the whole batch (shrink into
/// scratch `[n, max rank]`, then expand), after uploading the adapters'
/// pointer, rank and scale tables.
#[allow(clippy::too_many_arguments)]
pub fn bgmv(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    row_adapter: &CudaView<'_, i32>,
    adapters: &[BgmvAdapter<'_>],
    n: usize,
    in_f: usize,
    out_f: usize,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (n32, i32_, o32) = (rows32(n)?, dim32(in_f, "in")?, dim32(out_f, "out")?);
    let cb = col_blocks(out_f)?;
    check_len(x.len(), n, in_f, "x")?;
    check_len(y.len(), n, out_f, "y")?;
    check_len(row_adapter.len(), n, 1, "row_adapter")?;
    dev.check_stream(x, "lora x")?;
    dev.check_stream(y, "lora y")?;
    dev.check_stream(row_adapter, "lora row_adapter")?;
    if adapters.is_empty() || adapters.len() > i32::MAX as usize {
        bail!(InvalidArgument, "lora bgmv: {} adapters, needs 1..=2^31-1", adapters.len());
    }
    let (mut pa, mut pb, mut ranks, mut scales) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (k, ad) in adapters.iter().enumerate() {
        let r32 = dim32(ad.rank, "adapter rank")?;
        check_len(ad.a.len(), ad.rank, in_f, &format!("adapter {k} A"))?;
        check_len(ad.b.len(), out_f, ad.rank, &format!("adapter {k} B"))?;
        dev.check_stream(&ad.a, "lora bgmv A")?;
        dev.check_stream(&ad.b, "lora bgmv B")?;
        pa.push(ad.a.device_ptr(&dev.stream).0);
        pb.push(ad.b.device_ptr(&dev.stream).0);
        ranks.push(r32);
        scales.push(ad.scale);
    }
    if n == 0 {
        return Ok(());
    }
    let r_max = *ranks.iter().max().expect("non-empty");
    let count = adapters.len() as u32;
    let (pa, pb, ranks, scales) = (dev.upload(&pa)?, dev.upload(&pb)?, dev.upload(&ranks)?, dev.upload(&scales)?);
    let mut h = scratch::<f32>(dev, n * r_max as usize)?;
    let name = "lora_bgmv_shrink_f32";
    let f = dev.function(&LORA_CU, name)?;
    // SAFETY: (ptr, ptr, ptr, ptr, u32, u32, u32, u32, ptr); block i reads
    // row i of x and idx[i]; for an index a < count it reads the adapter's
    // A (rank·in elements, checked) through the table; writes h[i, :r_max]
    // (n·r_max allocated). The tables and views outlive the queued work
    // (frees are stream-ordered; the views borrow live buffers).
    launch_kernel!(dev, f, name, launch_cfg((n32, 1), LORA_THREADS), [x, row_adapter, &pa, &ranks, &count, &n32, &i32_, &r_max, &mut h])?;
    let name = "lora_bgmv_expand_f32";
    let f = dev.function(&LORA_CU, name)?;
    // SAFETY: (ptr, ptr, ptr, ptr, ptr, u32, u32, u32, u32, ptr); block
    // (i, c) reads h[i, :rank_a], B_a (out·rank elements, checked) and
    // updates y[i, c·256..] below out.
    launch_kernel!(dev, f, name, launch_cfg((n32, cb), LORA_THREADS), [&h, row_adapter, &pb, &ranks, &scales, &count, &n32, &r_max, &o32, y])
}

/// `g[n, r] = dy[n, out]·B` (`B` `[out, r]`), overwriting `g`.
pub fn bwd_g(dev: &CudaDevice, dy: &CudaView<'_, f32>, b: &CudaView<'_, f32>, n: usize, out_f: usize, r: usize, g: &mut CudaViewMut<'_, f32>) -> Result<()> {
    row_product(dev, "lora_bwd_g_f32", (dy, "dy"), (b, out_f, r, "B"), n, (out_f, "out"), r, (g, "g"))
}

/// `dx[n, in] += s·g[n, r]·A` (`A` `[r, in]`).
#[allow(clippy::too_many_arguments)]
pub fn bwd_dx(dev: &CudaDevice, g: &CudaView<'_, f32>, a: &CudaView<'_, f32>, n: usize, r: usize, in_f: usize, s: f32, dx: &mut CudaViewMut<'_, f32>) -> Result<()> {
    row_accumulate(dev, "lora_bwd_dx_f32", (g, "g"), (a, r, in_f, "A"), n, r, (in_f, "in"), s, (dx, "dx"))
}

/// `D[P, Q] += s·Uᵀ·V` with `U` `[n, P]`, `V` `[n, Q]`.
#[allow(clippy::too_many_arguments)]
fn outer(dev: &CudaDevice, u: &CudaView<'_, f32>, v: &CudaView<'_, f32>, n: usize, p: usize, q: usize, s: f32, d: &mut CudaViewMut<'_, f32>, what: &str) -> Result<()> {
    let (n32, p32, q32) = (rows32(n)?, dim32(p, "P")?, dim32(q, "Q")?);
    check_len(u.len(), n, p, &format!("{what}: left factor"))?;
    check_len(v.len(), n, q, &format!("{what}: right factor"))?;
    check_len(d.len(), p, q, what)?;
    dev.check_stream(u, "lora bwd factor")?;
    dev.check_stream(v, "lora bwd factor")?;
    dev.check_stream(d, "lora bwd gradient")?;
    let name = "lora_bwd_outer_f32";
    let f = dev.function(&LORA_CU, name)?;
    let grid = stride_grid(p as u64 * q as u64, LORA_THREADS);
    // SAFETY: (ptr, u32, ptr, u32, u32, u32, u32, f32, ptr); thread t < P·Q
    // reads U[i·P + t/Q] and V[i·Q + t%Q] for i < n (n·P, n·Q checked) and
    // updates D[t] (P·Q checked).
    launch_kernel!(dev, f, name, launch_cfg((grid, 1), LORA_THREADS), [u, &p32, v, &q32, &n32, &p32, &q32, &s, d])
}

/// `dB[out, r] += s·dyᵀ·h` (`dy` `[n, out]`, `h` `[n, r]`).
#[allow(clippy::too_many_arguments)]
pub fn grad_b(dev: &CudaDevice, dy: &CudaView<'_, f32>, h: &CudaView<'_, f32>, n: usize, out_f: usize, r: usize, s: f32, db: &mut CudaViewMut<'_, f32>) -> Result<()> {
    outer(dev, dy, h, n, out_f, r, s, db, "dB")
}

/// `dA[r, in] += s·gᵀ·x` (`g` `[n, r]`, `x` `[n, in]`).
#[allow(clippy::too_many_arguments)]
pub fn grad_a(dev: &CudaDevice, g: &CudaView<'_, f32>, x: &CudaView<'_, f32>, n: usize, r: usize, in_f: usize, s: f32, da: &mut CudaViewMut<'_, f32>) -> Result<()> {
    outer(dev, g, x, n, r, in_f, s, da, "dA")
}

/// The adapter's whole backward, as `LoraLayer::backward` (no dropout):
/// `h = x·Aᵀ`, `g = dy·B` (scratch, `2·n·r` f32), `dB += s·dyᵀ·h`, `dA +=
/// s·gᵀ·x`, and `dx += s·g·A` when `dx` is given.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    n: usize,
    in_f: usize,
    out_f: usize,
    r: usize,
    s: f32,
    da: &mut CudaViewMut<'_, f32>,
    db: &mut CudaViewMut<'_, f32>,
    dx: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    dim32(r, "r")?;
    let nr = n.checked_mul(r).ok_or_else(|| err!(InvalidShape, "lora: [{n}, {r}] overflows"))?;
    let mut h = scratch::<f32>(dev, nr)?;
    let mut g = scratch::<f32>(dev, nr)?;
    shrink(dev, x, a, n, in_f, r, &mut h.slice_mut(0..nr))?;
    bwd_g(dev, dy, b, n, out_f, r, &mut g.slice_mut(0..nr))?;
    grad_b(dev, dy, &h.slice(0..nr), n, out_f, r, s, db)?;
    grad_a(dev, &g.slice(0..nr), x, n, r, in_f, s, da)?;
    match dx {
        Some(dx) => bwd_dx(dev, &g.slice(0..nr), a, n, r, in_f, s, dx),
        None => Ok(()),
    }
}


/// The f32 scale of inverted dropout with probability `p` (kept elements
/// are multiplied by it), as the CPU computes it.
pub fn dropout_scale(p: f32) -> f32 {
    1.0 / (1.0 - p)
}

/// Checks a dropout launch's rate, lengths and streams (`src` and `dst` of
/// one length): `None` when there is nothing to do, else the element count
/// and the keep scale.
fn dropout_args(dev: &CudaDevice, src: (&CudaView<'_, f32>, &str), dst: (&CudaViewMut<'_, f32>, &str), p: f32) -> Result<Option<(u64, f32)>> {
    let n = src.0.len();
    if !(0.0..1.0).contains(&p) {
        bail!(InvalidArgument, "lora dropout: p = {p} must be in [0, 1)");
    }
    if dst.0.len() != n {
        bail!(BufferSize, "lora dropout: {} has {n} elements, {} {}", src.1, dst.1, dst.0.len());
    }
    dev.check_stream(src.0, &format!("lora dropout {}", src.1))?;
    dev.check_stream(dst.0, &format!("lora dropout {}", dst.1))?;
    Ok((n > 0).then(|| (n as u64, dropout_scale(p))))
}

/// `out[i] = x[i]·1/(1−p)` if element `i` of call `call` is kept (`seed`,
/// the adapter's), else 0: [`crate::lora::LoraLayer`]'s adapter input when
/// training with dropout `p`, bit for bit.
pub fn dropout(dev: &CudaDevice, x: &CudaView<'_, f32>, seed: u64, call: u64, p: f32, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
    let Some((n64, scale)) = dropout_args(dev, (x, "x"), (out, "out"), p)? else { return Ok(()) };
    let name = "lora_dropout_f32";
    let f = dev.function(&LORA_CU, name)?;
    // SAFETY: (ptr, u64, u64, u64, f32, f32, ptr) as the kernel; elements < n
    // of x and out (lengths checked equal).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, LORA_THREADS), 1), LORA_THREADS), [x, &n64, &seed, &call, &p, &scale, out])
}

/// `dx[i] += (s·m_i)·v[i]` with `m_i = 1/(1−p)` where element `i` of call
/// `call` is kept, else 0: the `dx` contribution through the dropout mask
/// (`v = g·A`), in the CPU's order, bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn dropout_accum(dev: &CudaDevice, v: &CudaView<'_, f32>, seed: u64, call: u64, p: f32, s: f32, dx: &mut CudaViewMut<'_, f32>) -> Result<()> {
    let Some((n64, scale)) = dropout_args(dev, (v, "v"), (dx, "dx"), p)? else { return Ok(()) };
    let name = "lora_dropout_accum_f32";
    let f = dev.function(&LORA_CU, name)?;
    // SAFETY: (ptr, u64, u64, u64, f32, f32, f32, ptr) as the kernel;
    // elements < n of v and dx (lengths checked equal).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n64, LORA_THREADS), 1), LORA_THREADS), [v, &n64, &seed, &call, &p, &scale, &s, dx])
}

/// The adapter's columns of a folded product's wide weight `w` `[out_f,
/// ld]` (its first `in_f` columns hold the frozen weight, not touched): for
/// `t` in `0..ld − in_f`, `w[o, in_f + t] = bf16(s·B[o, t − off])` where
/// `off ≤ t < off + r`, else 0. With the adapter's `x·Aᵀ` in columns
/// `in_f + off..` of the input, one product then gives `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`.
#[allow(clippy::too_many_arguments)]
pub fn fold_tail_bf16(dev: &CudaDevice, b: &CudaView<'_, f32>, out_f: usize, r: usize, s: f32, in_f: usize, off: usize, w: &mut CudaViewMut<'_, u16>, ld: usize) -> Result<()> {
    let (o32, r32, in32, off32) = (dim32(out_f, "out")?, dim32(r, "rank")?, dim32(in_f, "in")?, off as u32);
    if b.len() != out_f * r {
        bail!(BufferSize, "lora fold: B has {} elements, [{out_f}, {r}] needs {}", b.len(), out_f * r);
    }
    if off > u32::MAX as usize || in_f.checked_add(off).and_then(|v| v.checked_add(r)).is_none_or(|e| e > ld) {
        bail!(InvalidShape, "lora fold: columns {in_f} + {off}..+{r} do not fit a row of {ld}");
    }
    if out_f.checked_mul(ld) != Some(w.len()) {
        bail!(BufferSize, "lora fold: the wide weight has {} elements, [{out_f}, {ld}] needs {}", w.len(), out_f.saturating_mul(ld));
    }
    dev.check_stream(b, "lora fold B")?;
    dev.check_stream(w, "lora fold W")?;
    let n = (out_f * (ld - in_f)) as u64;
    let ld64 = ld as u64;
    let name = "lora_fold_tail_bf16";
    let f = dev.function(&LORA_CU, name)?;
    // SAFETY: (ptr, u32, u32, f32, u32, u32, u64, ptr) as the kernel; it
    // reads B [out_f, r] and writes columns in_f..ld of each of w's out_f
    // rows of ld (all checked above).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n, LORA_THREADS), 1), LORA_THREADS), [b, &o32, &r32, &s, &in32, &off32, &ld64, w])
}

/// The adapter's rows of a stacked input-gradient product's weight: `out`
/// `[rows, in_f]` gets `bf16(s·A)` (A `[r, in_f]`) in its first `r` rows
/// and zeros in the rest (`rows ≥ r`, padding).
pub fn scaled_rows_bf16(dev: &CudaDevice, a: &CudaView<'_, f32>, r: usize, in_f: usize, s: f32, out: &mut CudaViewMut<'_, u16>, rows: usize) -> Result<()> {
    let (r32, in32, rows32) = (dim32(r, "rank")?, dim32(in_f, "in")?, dim32(rows, "rows")?);
    if a.len() != r * in_f {
        bail!(BufferSize, "lora scaled rows: A has {} elements, [{r}, {in_f}] needs {}", a.len(), r * in_f);
    }
    if rows < r || rows.checked_mul(in_f) != Some(out.len()) {
        bail!(BufferSize, "lora scaled rows: out has {} elements, not [{rows} >= {r}, {in_f}]", out.len());
    }
    dev.check_stream(a, "lora scaled rows A")?;
    dev.check_stream(out, "lora scaled rows out")?;
    let n = out.len() as u64;
    let name = "lora_scaled_rows_bf16";
    let f = dev.function(&LORA_CU, name)?;
    // SAFETY: (ptr, u32, u32, f32, u32, ptr) as the kernel; it reads A's
    // r·in_f elements (rows below r) and writes out's rows·in_f (checked).
    launch_kernel!(dev, f, name, launch_cfg((stride_grid(n, LORA_THREADS), 1), LORA_THREADS), [a, &r32, &in32, &s, &rows32, out])
}

#[cfg(test)]
mod tests {
    #[test]
    fn launch_constant_matches_the_kernel() {
        let src = include_str!("../../../cuda/lora.cu");
        let line = src.lines().find(|l| l.starts_with("#define LORA_THREADS ")).expect("#define in lora.cu");
        assert_eq!(line["#define LORA_THREADS ".len()..].trim(), super::LORA_THREADS.to_string());
    }
}
