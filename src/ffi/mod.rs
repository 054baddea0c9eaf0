//! The C ABI: the only place with `extern "C"`. Every export has the same
//! shape: argument checks, a panic boundary, conversion to safe types, one
//! call into the safe core, and the result mapped to a `lora_status`.
//! `include/lora.h` is generated from this module by cbindgen.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

pub mod context;
pub mod layer;
pub mod model;
pub mod optim;
pub mod nf4;
pub mod paged;
pub mod status;
pub mod tokenizer;
mod util;

use std::ffi::{c_char, c_void};

pub use status::*;

/// Major version: a change here breaks the ABI; programs should refuse a
/// library whose `lora_version() >> 16` differs from the header's.
pub const LORA_VERSION_MAJOR: u32 = 0;
/// Minor version: additions that keep the ABI.
pub const LORA_VERSION_MINOR: u32 = 1;
/// Patch version.
pub const LORA_VERSION_PATCH: u32 = 0;
/// `(major << 16) | (minor << 8) | patch`, as returned by `lora_version()`.
pub const LORA_VERSION: u32 = (LORA_VERSION_MAJOR << 16) | (LORA_VERSION_MINOR << 8) | LORA_VERSION_PATCH;

/// Most dimensions a tensor shape may have in this API.
pub const LORA_MAX_DIMS: u32 = 8;

/// Element type of a dense buffer (one of the `LORA_DTYPE_*` values).
pub type lora_dtype = u32;
/// IEEE 754 binary32.
pub const LORA_DTYPE_F32: lora_dtype = 0;
/// IEEE 754 binary16.
pub const LORA_DTYPE_F16: lora_dtype = 1;
/// bfloat16 (the upper half of a binary32).
pub const LORA_DTYPE_BF16: lora_dtype = 2;

/// Log levels passed to a `lora_log_fn`.
pub type lora_log_level = i32;
pub const LORA_LOG_ERROR: lora_log_level = 0;
pub const LORA_LOG_WARN: lora_log_level = 1;
pub const LORA_LOG_INFO: lora_log_level = 2;
pub const LORA_LOG_DEBUG: lora_log_level = 3;

/// A host's log sink: `level` is a `LORA_LOG_*` value, `message` a
/// NUL-terminated UTF-8 string valid only during the call, `user` the
/// pointer given to `lora_set_log_callback`. It may be called from any
/// thread, including liblora's worker threads, and must not call back into
/// liblora.
pub type lora_log_fn = Option<unsafe extern "C" fn(level: lora_log_level, message: *const c_char, user: *mut c_void)>;

/// The library version, `LORA_VERSION` of the build: compare
/// `lora_version() >> 16` with `LORA_VERSION_MAJOR` to detect an ABI break.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn lora_version() -> u32 {
    LORA_VERSION
}

/// The version as a static string, e.g. "0.1.0". Never NULL; do not free.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn lora_version_string() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// Installs a log callback receiving messages up to `max_level`
/// (`LORA_LOG_*`), or removes it when `callback` is NULL. liblora never
/// prints on its own; without a callback its diagnostics are dropped.
/// Process-wide; thread-safe (a message being delivered while the callback
/// is replaced finishes with the old one).
#[no_mangle]
pub extern "C" fn lora_set_log_callback(callback: lora_log_fn, user: *mut c_void, max_level: lora_log_level) -> lora_status {
    util::guard(|| {
        let lvl = match max_level {
            LORA_LOG_ERROR => crate::log::Level::Error,
            LORA_LOG_WARN => crate::log::Level::Warn,
            LORA_LOG_INFO => crate::log::Level::Info,
            LORA_LOG_DEBUG => crate::log::Level::Debug,
            other => crate::bail!(InvalidArgument, "max_level {other} is not a LORA_LOG_* value"),
        };
        crate::log::set(callback, user, lvl);
        Ok(())
    })
}
