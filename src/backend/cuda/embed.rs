//! Launchers for `cuda/embed.cu`: the embedding gather, twin of
//! [`crate::backend::cpu::embed::embedding_forward`], bit for bit (a copy).
//! An id `≥ vocab` is an error and nothing is written: a one-block kernel
//! checks the ids into a status word first, and the gather runs only when
//! it says all are valid.

use super::{launch_cfg, stride_grid, CudaDevice, EMBED_CU};
use crate::error::Result;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// Threads per block of the gather (`EMBED_THREADS` in embed.cu).
const EMBED_THREADS: u32 = 256;
/// Threads of the one-block id check (`EMBED_CHECK_THREADS`).
const EMBED_CHECK_THREADS: u32 = 1024;
/// Status word when every id is valid.
pub const ALL_IDS_VALID: u32 = u32::MAX;

/// An embedding table on the device: fp32, or bf16 (bits in `u16`).
#[derive(Clone, Copy)]
pub enum Table<'a, 'b> {
    F32(&'a CudaView<'b, f32>),
    Bf16(&'a CudaView<'b, u16>),
}

impl Table<'_, '_> {
    fn len(&self) -> usize {
        match self {
            Table::F32(t) => t.len(),
            Table::Bf16(t) => t.len(),
        }
    }
}

/// `out[n, :] = table[ids[n], :]`, queued without a sync. `status[0]` is
/// written with the first position whose id is `≥ vocab`, or
/// [`ALL_IDS_VALID`]; when it is not, `out` is left untouched. Read it back
/// (or use [`embedding_forward`]) to report the error.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward_async(
    dev: &CudaDevice,
    table: &CudaView<'_, f32>,
    vocab: usize,
    dim: usize,
    ids: &CudaView<'_, u32>,
    out: &mut CudaViewMut<'_, f32>,
    status: &mut CudaSlice<u32>,
) -> Result<()> {
    gather_async(dev, Table::F32(table), vocab, dim, ids, out, status)
}

/// [`embedding_forward_async`] from a table of either dtype (a bf16 table's
/// elements are widened to fp32 exactly).
#[allow(clippy::too_many_arguments)]
pub fn gather_async(
    dev: &CudaDevice,
    table: Table<'_, '_>,
    vocab: usize,
    dim: usize,
    ids: &CudaView<'_, u32>,
    out: &mut CudaViewMut<'_, f32>,
    status: &mut CudaSlice<u32>,
) -> Result<()> {
    let n = ids.len();
    if vocab > u32::MAX as usize || dim > u32::MAX as usize || n > u32::MAX as usize {
        bail!(InvalidShape, "embedding: vocab {vocab}, dim {dim} and token count {n} must each be at most 2^32-1");
    }
    let want = vocab.checked_mul(dim).ok_or_else(|| err!(InvalidShape, "embedding [{vocab}, {dim}] overflows"))?;
    if table.len() != want {
        bail!(BufferSize, "embedding: table has {} elements, [{vocab}, {dim}] needs {want}", table.len());
    }
    let total = n.checked_mul(dim).ok_or_else(|| err!(InvalidShape, "embedding output [{n}, {dim}] overflows"))?;
    if out.len() != total {
        bail!(BufferSize, "embedding: out has {} elements, [{n}, {dim}] needs {total}", out.len());
    }
    if status.is_empty() {
        bail!(BufferSize, "embedding: status needs 1 element");
    }
    match table {
        Table::F32(t) => dev.check_stream(t, "embedding table")?,
        Table::Bf16(t) => dev.check_stream(t, "embedding table")?,
    }
    dev.check_stream(ids, "embedding ids")?;
    dev.check_stream(out, "embedding out")?;
    dev.check_stream(status, "embedding status")?;
    let (n32, v32, d32) = (n as u32, vocab as u32, dim as u32);
    let name = "embed_check_ids";
    let f = dev.function(&EMBED_CU, name)?;
    // SAFETY: (ptr, u32, u32, ptr) as the kernel; one block reads ids[< n]
    // and writes status[0] (length ≥ 1 checked).
    launch_kernel!(dev, f, name, launch_cfg((1, 1), EMBED_CHECK_THREADS), [ids, &n32, &v32, &mut *status])?;
    if total == 0 {
        return Ok(());
    }
    let t64 = total as u64;
    let cfg = launch_cfg((stride_grid(t64, EMBED_THREADS), 1), EMBED_THREADS);
    // SAFETY (both): (ptr, u32, ptr, u64, ptr, ptr) as the kernel; element
    // k < n·dim of out, ids[k / dim], and table row ids[·] < vocab (the
    // kernel runs only when the check found every id valid).
    match table {
        Table::F32(t) => {
            let name = "embed_gather_f32";
            let f = dev.function(&EMBED_CU, name)?;
            launch_kernel!(dev, f, name, cfg, [t, &d32, ids, &t64, &*status, out])
        }
        Table::Bf16(t) => {
            let name = "embed_gather_bf16";
            let f = dev.function(&EMBED_CU, name)?;
            launch_kernel!(dev, f, name, cfg, [t, &d32, ids, &t64, &*status, out])
        }
    }
}

/// [`embedding_forward_async`], then waits and reports an invalid id as
/// `InvalidArgument` (with `out` untouched), as the CPU op does.
pub fn embedding_forward(dev: &CudaDevice, table: &CudaView<'_, f32>, vocab: usize, dim: usize, ids: &CudaView<'_, u32>, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
    let mut status = dev.alloc_filled::<u32>(1, 0xFF)?;
    embedding_forward_async(dev, table, vocab, dim, ids, out, &mut status)?;
    let s = dev.download(&status)?[0];
    if s != ALL_IDS_VALID {
        let id = dev.download(&ids.slice(s as usize..s as usize + 1))?[0];
        bail!(InvalidArgument, "embedding: token id {id} at position {s} is outside [0, {vocab})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn launch_constants_match_the_kernel() {
        let src = include_str!("../../../cuda/embed.cu");
        for (name, v) in [("EMBED_THREADS", super::EMBED_THREADS), ("EMBED_CHECK_THREADS", super::EMBED_CHECK_THREADS)] {
            let pre = format!("#define {name} ");
            let line = src.lines().find(|l| l.starts_with(&pre)).expect("#define in embed.cu");
            assert_eq!(line[pre.len()..].trim(), v.to_string());
        }
    }
}
