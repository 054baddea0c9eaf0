//! `lora_tokenizer`: Hugging Face tokenizer.json tokenizers (text ↔ ids).

use super::util::{self, guard, handle, req, req_out, req_path, req_str, Handle};
use super::*;
use crate::tokenizer::Tokenizer;
use std::ffi::c_char;

/// A tokenizer loaded from a Hugging Face `tokenizer.json`: byte-level or
/// SentencePiece-style BPE as Llama 2/3, Mistral, TinyLlama and Qwen2 ship,
/// giving the same ids and text as the `tokenizers` library.
///
/// Thread safety: immutable once loaded; every function taking `const
/// lora_tokenizer *` may be called on one tokenizer from several threads at
/// once. `lora_tokenizer_free` must not race with any other use.
pub struct lora_tokenizer {
    tag: u64,
    inner: Tokenizer,
}

impl Handle for lora_tokenizer {
    const TAG: u64 = 0x6c6f_7261_746f_6b31; // "loratok1"
    fn tag(&self) -> u64 {
        self.tag
    }
}

/// Loads a tokenizer. `path` is a `tokenizer.json` file or a model
/// directory holding one. BOS/EOS ids are read from `tokenizer_config.json`
/// (`bos_token`/`eos_token`) and else `config.json`
/// (`bos_token_id`/`eos_token_id`) in the same directory when present (see
/// `lora_tokenizer_info`). On success `*out` receives a tokenizer the caller
/// frees with `lora_tokenizer_free`.
///
/// Supported: model BPE (merges as "a b" or ["a","b"], byte_fallback,
/// ignore_merges, unk_token, fuse_unk); added tokens (special or not,
/// lstrip/rstrip/single_word/normalized); normalizers Sequence, NFC,
/// Prepend, Replace; pre-tokenizers Sequence, ByteLevel, Split (regex or
/// string), Metaspace; post-processors TemplateProcessing, ByteLevel,
/// Sequence; decoders Sequence, ByteLevel, Replace, ByteFallback, Fuse,
/// Strip, Metaspace. Anything else is refused, naming it.
///
/// Errors: `LORA_ERR_NULL_POINTER`, `LORA_ERR_INVALID_ARGUMENT` (empty
/// path), `LORA_ERR_IO` (no such file, or a directory without
/// tokenizer.json), `LORA_ERR_FILE_FORMAT` (not JSON, a field of the wrong
/// type, a merge of tokens not in the vocabulary, a malformed
/// tokenizer_config.json or config.json beside it), `LORA_ERR_UNSUPPORTED`
/// (another model type such as Unigram or WordPiece, another normalizer,
/// pre-tokenizer, post-processor or decoder, BPE dropout, a regex the engine
/// cannot compile; the message names it).
#[no_mangle]
pub unsafe extern "C" fn lora_tokenizer_load(path: *const c_char, out: *mut *mut lora_tokenizer) -> lora_status {
    guard(|| {
        let path = req_path(path, "path")?;
        let out = req_out(out, "out")?;
        let t = Tokenizer::load(&path)?;
        *out = util::into_handle(lora_tokenizer { tag: lora_tokenizer::TAG, inner: t });
        Ok(())
    })
}

/// Frees a tokenizer. NULL is a no-op; so is a second free of the same
/// handle where it can be detected (never rely on it).
#[no_mangle]
pub unsafe extern "C" fn lora_tokenizer_free(tok: *mut lora_tokenizer) {
    util::guard_value((), || util::free_handle(tok, |t| t.tag = 0))
}

/// Encodes `len` bytes of UTF-8 `text` (need not be NUL-terminated; may be
/// NULL when `len` is 0) into token ids, as `tokenizers`'
/// `encode(text, add_special_tokens).ids`: added tokens such as
/// "<|im_end|>" written in the text are recognized; with `add_special`
/// non-zero the post-processor's tokens are added too (Llama's BOS; none
/// for Qwen2).
///
/// `*n_out` receives the number of ids. When it is at most `cap`, the ids
/// are written to `ids` (which may be NULL when `cap` is 0). Otherwise the
/// call returns `LORA_ERR_BUFFER_SIZE`, `*n_out` still receives the number
/// needed and `ids` is not written: call with `cap` 0 to size the buffer.
///
/// Errors: `LORA_ERR_NULL_POINTER` (tok, n_out; text with len > 0; ids with
/// cap > 0), `LORA_ERR_INVALID_STATE` (a freed tokenizer),
/// `LORA_ERR_INVALID_ARGUMENT` (text is not valid UTF-8; the message gives
/// the byte offset), `LORA_ERR_BUFFER_SIZE` (cap too small),
/// `LORA_ERR_FILE_FORMAT` (the text needs the unknown token and the file's
/// unk_token is not in its vocabulary).
#[no_mangle]
pub unsafe extern "C" fn lora_tokenizer_encode(
    tok: *const lora_tokenizer,
    text: *const c_char,
    len: usize,
    add_special: u32,
    ids: *mut i32,
    cap: usize,
    n_out: *mut usize,
) -> lora_status {
    guard(|| {
        let t = &handle(tok, "tok")?.inner;
        let n_out = req_out(n_out, "n_out")?;
        let bytes: &[u8] = if len == 0 {
            &[]
        } else {
            req(text as *const u8, "text")?;
            // SAFETY: the host passes `len` readable bytes at `text`.
            unsafe { std::slice::from_raw_parts(text as *const u8, len) }
        };
        let s = std::str::from_utf8(bytes)
            .map_err(|e| crate::err!(InvalidArgument, "text is not valid UTF-8 at byte {} of {len}", e.valid_up_to()))?;
        let out = t.encode(s, add_special != 0)?;
        *n_out = out.len();
        if out.len() > cap {
            crate::bail!(BufferSize, "the text encodes to {} ids; cap is {cap} (*n_out holds the count needed)", out.len());
        }
        if !out.is_empty() {
            req(ids as *const i32, "ids")?;
            // SAFETY: the host gives `cap >= out.len()` writable ids at `ids`;
            // every id fits i32 (checked when the vocabulary was loaded).
            unsafe {
                for (i, &id) in out.iter().enumerate() {
                    *ids.add(i) = id as i32;
                }
            }
        }
        Ok(())
    })
}

/// Decodes `n` token ids (`ids` may be NULL when `n` is 0) to UTF-8 text,
/// as `tokenizers`' `decode(ids, skip_special_tokens)`: with `skip_special`
/// non-zero, special added tokens (BOS, EOS, "<|im_end|>") are left out;
/// ids the vocabulary does not have are skipped; bytes that do not form
/// valid UTF-8 (a character cut between ids) become U+FFFD, as the library
/// does for the tokenizer's decoder (ByteLevel: one per invalid sequence;
/// ByteFallback: one per byte).
///
/// `*needed` receives the text's length in bytes, without the NUL. When
/// `len > *needed`, the text and a NUL are written to `buf`. Otherwise the
/// call returns `LORA_ERR_BUFFER_SIZE` and `buf` is not written: call with
/// `buf` NULL and `len` 0 to size it. The text may itself contain NUL bytes
/// (a decoded byte 0): use `*needed` as its length.
///
/// Errors: `LORA_ERR_NULL_POINTER` (tok, needed; ids with n > 0; buf with
/// len > 0), `LORA_ERR_INVALID_STATE` (a freed tokenizer),
/// `LORA_ERR_INVALID_ARGUMENT` (a negative id; the message gives its
/// index), `LORA_ERR_BUFFER_SIZE` (len too small).
#[no_mangle]
pub unsafe extern "C" fn lora_tokenizer_decode(
    tok: *const lora_tokenizer,
    ids: *const i32,
    n: usize,
    skip_special: u32,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> lora_status {
    guard(|| {
        let t = &handle(tok, "tok")?.inner;
        let needed = req_out(needed, "needed")?;
        let ids: &[i32] = if n == 0 {
            &[]
        } else {
            req(ids, "ids")?;
            // SAFETY: the host passes `n` readable ids at `ids`.
            unsafe { std::slice::from_raw_parts(ids, n) }
        };
        let mut u = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            if id < 0 {
                crate::bail!(InvalidArgument, "ids[{i}] is {id}: token ids are non-negative");
            }
            u.push(id as u32);
        }
        let s = t.decode(&u, skip_special != 0)?;
        write_text(&s, buf, len, needed)
    })
}

/// `*needed` = length; the text and a NUL into `buf` when it fits, else
/// `LORA_ERR_BUFFER_SIZE` with `buf` untouched.
fn write_text(s: &str, buf: *mut c_char, len: usize, needed: &mut usize) -> crate::Result<()> {
    *needed = s.len();
    if len <= s.len() {
        crate::bail!(BufferSize, "the text is {} bytes and needs a buffer of {}; len is {len} (*needed holds the length)", s.len(), s.len() + 1);
    }
    req(buf as *const c_char, "buf")?;
    // SAFETY: the host gives `len > s.len()` writable bytes at `buf`.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf as *mut u8, s.len());
        *buf.add(s.len()) = 0;
    }
    Ok(())
}

/// Facts about a tokenizer; each output may be NULL when not wanted.
///
/// - `*vocab_size`: the number of distinct tokens, model and added, as
///   `len(tokenizer)` in transformers (ids are below it for the usual
///   contiguous vocabularies).
/// - `*bos_id`, `*eos_id`: the BOS and EOS ids, −1 when unknown. Taken from
///   `tokenizer_config.json` beside tokenizer.json (`bos_token` /
///   `eos_token`, a string or an object with "content", looked up in the
///   vocabulary, as transformers' `tokenizer.bos_token_id`); where that is
///   absent or null, from `config.json` (`bos_token_id` / `eos_token_id`;
///   the first of a list). Informational: `lora_tokenizer_encode` adds BOS
///   through the tokenizer's post-processor, not from here.
///
/// Errors: `LORA_ERR_NULL_POINTER` (tok), `LORA_ERR_INVALID_STATE` (a
/// freed tokenizer).
#[no_mangle]
pub unsafe extern "C" fn lora_tokenizer_info(tok: *const lora_tokenizer, vocab_size: *mut usize, bos_id: *mut i32, eos_id: *mut i32) -> lora_status {
    guard(|| {
        let t = &handle(tok, "tok")?.inner;
        let id = |v: Option<u32>| v.map_or(-1, |x| x as i32);
        // SAFETY: each non-NULL output points to a writable value (header contract).
        unsafe {
            if let Some(p) = vocab_size.as_mut() {
                *p = t.vocab_size();
            }
            if let Some(p) = bos_id.as_mut() {
                *p = id(t.bos_id());
            }
            if let Some(p) = eos_id.as_mut() {
                *p = id(t.eos_id());
            }
        }
        Ok(())
    })
}

/// The id of the token string `token` (NUL-terminated UTF-8, exactly as in
/// the vocabulary: "<|im_end|>", "▁the", "Ġthe") into `*id`, or −1 when the
/// tokenizer has no such token.
///
/// Errors: `LORA_ERR_NULL_POINTER`, `LORA_ERR_INVALID_STATE` (a freed
/// tokenizer), `LORA_ERR_INVALID_ARGUMENT` (token is not UTF-8).
#[no_mangle]
pub unsafe extern "C" fn lora_tokenizer_token_to_id(tok: *const lora_tokenizer, token: *const c_char, id: *mut i32) -> lora_status {
    guard(|| {
        let t = &handle(tok, "tok")?.inner;
        let token = req_str(token, "token")?;
        let id = req_out(id, "id")?;
        *id = t.token_to_id(token).map_or(-1, |x| x as i32);
        Ok(())
    })
}

/// The token string of `id` (as in the vocabulary, not decoded: "Ġthe",
/// "<0x0A>") into `buf`, NUL-terminated, when `len > *needed`; `*needed`
/// receives its length in bytes. Too small a buffer: `LORA_ERR_BUFFER_SIZE`,
/// `buf` not written (`buf` NULL and `len` 0 asks for the length).
///
/// Errors: `LORA_ERR_NULL_POINTER` (tok, needed; buf with len > 0),
/// `LORA_ERR_INVALID_STATE` (a freed tokenizer), `LORA_ERR_INVALID_ARGUMENT`
/// (no token has this id), `LORA_ERR_BUFFER_SIZE`.
#[no_mangle]
pub unsafe extern "C" fn lora_tokenizer_id_to_token(
    tok: *const lora_tokenizer,
    id: i32,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> lora_status {
    guard(|| {
        let t = &handle(tok, "tok")?.inner;
        let needed = req_out(needed, "needed")?;
        let s = u32::try_from(id)
            .ok()
            .and_then(|u| t.id_to_token(u))
            .ok_or_else(|| crate::err!(InvalidArgument, "no token has id {id} (vocab_size {})", t.vocab_size()))?;
        write_text(s, buf, len, needed)
    })
}

/// Whether `id` is a special added token (BOS, EOS, "<|im_end|>": those
/// `skip_special` leaves out when decoding): `*out` = 1 or 0 (0 for ids the
/// tokenizer does not have).
///
/// Errors: `LORA_ERR_NULL_POINTER`, `LORA_ERR_INVALID_STATE` (a freed
/// tokenizer).
#[no_mangle]
pub unsafe extern "C" fn lora_tokenizer_is_special(tok: *const lora_tokenizer, id: i32, out: *mut u32) -> lora_status {
    guard(|| {
        let t = &handle(tok, "tok")?.inner;
        let out = req_out(out, "out")?;
        *out = u32::try_from(id).is_ok_and(|u| t.is_special(u)) as u32;
        Ok(())
    })
}
