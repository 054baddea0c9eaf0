//! Shared plumbing of the exports: the panic boundary, the thread-local
//! last error, pointer and struct checks, and handle validation.

use super::status::*;
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(msg: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

pub(crate) fn with_last_error<R>(f: impl FnOnce(&str) -> R) -> R {
    LAST_ERROR.with(|e| f(&e.borrow()))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs `f` behind the panic boundary and maps its result to a status,
/// recording the message of a failure for `lora_last_error`.
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> lora_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => LORA_OK,
        Ok(Err(e)) => fail(e),
        Err(p) => {
            let msg = format!("internal panic: {}", panic_message(p.as_ref()));
            crate::log::emit(crate::log::Level::Error, &msg);
            set_last_error(msg);
            LORA_ERR_PANIC
        }
    }
}

fn fail(e: Error) -> lora_status {
    crate::log!(Debug, "{e}");
    let st = status_of(e.kind);
    set_last_error(e.message);
    st
}

/// Runs `f` behind the panic boundary for exports that return a value
/// rather than a status; `fallback` on panic.
pub(crate) fn guard_value<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// A required pointer, or `LORA_ERR_NULL_POINTER` naming the argument.
pub(crate) fn req<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: non-null pointers passed by the host point to a valid T for
    // the duration of the call (the header's contract).
    unsafe { p.as_ref() }.ok_or_else(|| err!(NullPointer, "argument '{what}' is NULL"))
}

/// A required output pointer.
pub(crate) fn req_out<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: as for `req`; the host gives exclusive access to *p.
    unsafe { p.as_mut() }.ok_or_else(|| err!(NullPointer, "output argument '{what}' is NULL"))
}

/// A NUL-terminated string argument as a path.
pub(crate) fn req_path(p: *const c_char, what: &str) -> Result<PathBuf> {
    let s = req_str(p, what)?;
    if s.is_empty() {
        bail!(InvalidArgument, "path argument '{what}' is empty");
    }
    Ok(PathBuf::from(s))
}

/// A NUL-terminated UTF-8 string argument.
pub(crate) fn req_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        bail!(NullPointer, "string argument '{what}' is NULL");
    }
    // SAFETY: the host passes a NUL-terminated string (header contract).
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map_err(|_| err!(InvalidArgument, "string argument '{what}' is not UTF-8"))
}

/// Parameter structs begin with `uint32_t struct_size`. Copies the first
/// `struct_size` bytes of the caller's struct over `defaults`, so a caller
/// built against an older header (a prefix of today's struct, at least
/// `min_size` bytes) gets defaults for the fields it does not know.
pub(crate) fn read_params<T: Copy>(p: *const T, defaults: T, min_size: usize, what: &str) -> Result<T> {
    if p.is_null() {
        return Ok(defaults);
    }
    // SAFETY: the first field of every params struct is a u32 size.
    let size = unsafe { *(p as *const u32) } as usize;
    let full = std::mem::size_of::<T>();
    if size < min_size || size > full {
        bail!(
            StructSize,
            "{what}.struct_size is {size}; this liblora accepts {min_size} to {full} (initialize with the *_default_params() function)"
        );
    }
    let mut out = defaults;
    // SAFETY: the caller's struct has `size` readable bytes; `out` has
    // `full ≥ size` bytes; T is plain data (Copy, repr(C)).
    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, &mut out as *mut T as *mut u8, size) };
    Ok(out)
}

/// Copies `s` into the caller's `buf` of `len` bytes, NUL-terminated and
/// truncated to fit (never inside a UTF-8 character); returns the
/// untruncated length (without the NUL).
pub(crate) fn write_cstr(s: &str, buf: *mut c_char, len: usize) -> usize {
    if !buf.is_null() && len > 0 {
        let mut n = s.len().min(len - 1);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: the host gives `len` writable bytes at `buf`.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), buf as *mut u8, n);
            *buf.add(n) = 0;
        }
    }
    s.len()
}

/// A live-handle marker: each handle type stores its own tag; freeing
/// clears it, so a handle used after `_free` is caught while its memory
/// has not been reused (`LORA_ERR_INVALID_STATE`).
pub(crate) trait Handle {
    const TAG: u64;
    fn tag(&self) -> u64;
}

pub(crate) fn handle<'a, H: Handle>(p: *const H, what: &str) -> Result<&'a H> {
    let h = req(p, what)?;
    if h.tag() != H::TAG {
        bail!(InvalidState, "'{what}' is not a live handle of this type (freed already?)");
    }
    Ok(h)
}

/// A live handle for mutation. The header forbids using one handle from
/// two threads at once, which makes the `&mut` exclusive.
pub(crate) fn handle_mut<'a, H: Handle>(p: *mut H, what: &str) -> Result<&'a mut H> {
    handle(p as *const H, what)?;
    // SAFETY: validated non-null live handle of type H; exclusive by the
    // header's contract.
    Ok(unsafe { &mut *p })
}

/// `Box::into_raw` for a new handle.
pub(crate) fn into_handle<H>(h: H) -> *mut H {
    Box::into_raw(Box::new(h))
}

/// Frees a handle made by [`into_handle`]; NULL and already-freed handles
/// (when detectable) are ignored.
pub(crate) fn free_handle<H: Handle>(p: *mut H, clear: impl FnOnce(&mut H)) {
    if p.is_null() {
        return;
    }
    // SAFETY: p came from into_handle (header contract) and is freed once;
    // the tag check catches a second free while the memory is unreused.
    unsafe {
        if (*p).tag() != H::TAG {
            return;
        }
        clear(&mut *p);
        drop(Box::from_raw(p));
    }
}

