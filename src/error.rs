//! The crate's error type. Every fallible operation of the safe core returns
//! [`Result`]; the C layer (`ffi`) maps each [`ErrorKind`] to a stable
//! `lora_status` number and keeps the message for `lora_last_error`.

use std::fmt;

/// What went wrong, coarsely: one kind per C status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NullPointer,
    InvalidArgument,
    InvalidShape,
    InvalidBlocksize,
    BufferSize,
    UnknownDtype,
    NonFinite,
    Io,
    FileFormat,
    TensorNotFound,
    DtypeMismatch,
    ShapeMismatch,
    CudaUnavailable,
    Cuda,
    OutOfMemory,
    Unsupported,
    StructSize,
    Internal,
    InvalidState,
    Cancelled,
    DeviceMemoryExceeded,
}

/// An error with its kind and a message that names the file, tensor, shape
/// or index involved, so a C caller can act on `lora_last_error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }

    /// The same error with `ctx: ` in front of its message.
    pub fn context(self, ctx: &str) -> Self {
        Error { kind: self.kind, message: format!("{ctx}: {}", self.message) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// `bail!(Kind, "fmt", args..)` returns an [`Error`] of that kind.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*)))
    };
}

/// `err!(Kind, "fmt", args..)` builds an [`Error`] of that kind.
#[macro_export]
macro_rules! err {
    ($kind:ident, $($arg:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*))
    };
}
