//! Diagnostics. The library never prints; a host may install a callback
//! that receives leveled messages (`lora_set_log_callback`).

use parking_lot::RwLock;
use std::ffi::{c_char, c_void, CString};

/// Message severity, as passed to the callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(i32)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

pub type LogFn = unsafe extern "C" fn(level: i32, message: *const c_char, user: *mut c_void);

struct Sink {
    f: LogFn,
    user: usize,
    max_level: Level,
}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Installs (or with `None` removes) the host's callback.
pub fn set(f: Option<LogFn>, user: *mut c_void, max_level: Level) {
    *SINK.write() = f.map(|f| Sink { f, user: user as usize, max_level });
}

/// True when a message at `level` would reach a callback (so callers can
/// skip formatting otherwise).
pub fn enabled(level: Level) -> bool {
    SINK.read().as_ref().is_some_and(|s| level <= s.max_level)
}

/// Sends a message to the host's callback, if one is installed.
pub fn emit(level: Level, msg: &str) {
    let guard = SINK.read();
    if let Some(s) = guard.as_ref() {
        if level <= s.max_level {
            let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
            // SAFETY: the host promised (lora.h) that the callback is safe to
            // call from any thread with a NUL-terminated message valid for
            // the duration of the call.
            unsafe { (s.f)(level as i32, c.as_ptr(), s.user as *mut c_void) };
        }
    }
}

/// `log!(Level, "fmt", args..)`: formats only when a callback listens.
#[macro_export]
macro_rules! log {
    ($lvl:ident, $($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::$lvl) {
            $crate::log::emit($crate::log::Level::$lvl, &format!($($arg)*));
        }
    };
}
