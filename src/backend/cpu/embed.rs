//! Token embedding lookup and its (scatter-add) backward, fp32.
//!
//! Math: `out[n, :] = table[ids[n], :]`; backward `dtable[ids[n], :] += dout[n, :]`.
//! Layout: `table`/`dtable` `[vocab, dim]`, `out`/`dout` `[n, dim]`, row-major.
//!
//! In LoRA training the embedding is frozen, so only the lookup is on the hot
//! path; the backward exists for completeness (e.g. a trainable embedding
//! or a check of the gradient flowing into the first layer). Memory traffic:
//! one row read and one row written per token.

use crate::Result;
use rayon::prelude::*;

fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    if let Some((n, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        bail!(InvalidArgument, "embedding: token id {id} at position {n} is outside [0, {vocab})");
    }
    Ok(())
}

/// `out[n, :] = table[ids[n], :]` for every token `n`.
///
/// Errors (`InvalidArgument`, nothing written) when an id is `≥ vocab`.
pub fn embedding_forward(table: &[f32], vocab: usize, dim: usize, ids: &[u32], out: &mut [f32]) -> Result<()> {
    assert_eq!(table.len(), vocab * dim, "embedding: table is not [vocab, dim]");
    assert_eq!(out.len(), ids.len() * dim, "embedding: out is not [n, dim]");
    check_ids(ids, vocab)?;
    if dim == 0 {
        return Ok(());
    }
    out.par_chunks_mut(dim).zip(ids.par_iter()).with_min_len(64).for_each(|(o, &id)| {
        let id = id as usize;
        o.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    });
    Ok(())
}

/// `dtable[ids[n], :] += dout[n, :]` for every token `n`, in token order
/// (serial: tokens that repeat an id add into the same row, and a fixed
/// order keeps the result deterministic).
///
/// Errors (`InvalidArgument`, nothing written) when an id is `≥ vocab`.
pub fn embedding_backward(dout: &[f32], ids: &[u32], vocab: usize, dim: usize, dtable: &mut [f32]) -> Result<()> {
    assert_eq!(dtable.len(), vocab * dim, "embedding: dtable is not [vocab, dim]");
    assert_eq!(dout.len(), ids.len() * dim, "embedding: dout is not [n, dim]");
    check_ids(ids, vocab)?;
    if dim == 0 {
        return Ok(());
    }
    for (d, &id) in dout.chunks_exact(dim).zip(ids) {
        let id = id as usize;
        for (t, &g) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(d) {
            *t += g;
        }
    }
    Ok(())
}
