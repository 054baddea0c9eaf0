//! Status codes. Values are explicit and stable: never renumbered or reused;
//! new ones are appended.

use crate::error::ErrorKind;
use std::ffi::c_char;

/// Result of every fallible call: `LORA_OK` (0) or one of `LORA_ERR_*`.
/// `lora_status_str` names it; `lora_last_error` has the detail.
pub type lora_status = i32;

/// Success.
pub const LORA_OK: lora_status = 0;
/// A required pointer argument was NULL.
pub const LORA_ERR_NULL_POINTER: lora_status = 1;
/// An argument is out of its documented range (an unknown enum value, a
/// bad option, an empty name).
pub const LORA_ERR_INVALID_ARGUMENT: lora_status = 2;
/// A shape has no dimensions, too many, a zero dimension, or a size that
/// overflows.
pub const LORA_ERR_INVALID_SHAPE: lora_status = 3;
/// An NF4 blocksize is not a power of two from 32 to 4096.
pub const LORA_ERR_INVALID_BLOCKSIZE: lora_status = 4;
/// A buffer's stated length in bytes does not match what the shape and dtype
/// require.
pub const LORA_ERR_BUFFER_SIZE: lora_status = 5;
/// A `lora_dtype` value is not one of `LORA_DTYPE_*`.
pub const LORA_ERR_UNKNOWN_DTYPE: lora_status = 6;
/// The input holds NaN or ±Inf; the message names the first flat index.
pub const LORA_ERR_NON_FINITE: lora_status = 7;
/// A file could not be opened, read or written (see the message for the
/// operating system's reason).
pub const LORA_ERR_IO: lora_status = 8;
/// A file is malformed: truncated, header length past the end, bad JSON,
/// offsets out of range, inconsistent metadata.
pub const LORA_ERR_FILE_FORMAT: lora_status = 9;
/// A named tensor is not in the file.
pub const LORA_ERR_TENSOR_NOT_FOUND: lora_status = 10;
/// A tensor in a file has a different dtype than its role requires.
pub const LORA_ERR_DTYPE_MISMATCH: lora_status = 11;
/// Shapes disagree: between tensors, or between a tensor and its stated
/// metadata (e.g. a quant state that lies about the shape).
pub const LORA_ERR_SHAPE_MISMATCH: lora_status = 12;
/// CUDA was requested but no usable driver or device is present.
pub const LORA_ERR_CUDA_UNAVAILABLE: lora_status = 13;
/// A CUDA call failed; the message names it.
pub const LORA_ERR_CUDA: lora_status = 14;
/// An allocation failed.
pub const LORA_ERR_OUT_OF_MEMORY: lora_status = 15;
/// The input is well-formed but uses a feature liblora does not support
/// (e.g. FP4 instead of NF4).
pub const LORA_ERR_UNSUPPORTED: lora_status = 16;
/// A parameter struct's `struct_size` is not one this library knows.
pub const LORA_ERR_STRUCT_SIZE: lora_status = 17;
/// A Rust panic was caught at the API boundary (a liblora bug; please
/// report the message).
pub const LORA_ERR_PANIC: lora_status = 18;
/// An internal invariant failed (a liblora bug).
pub const LORA_ERR_INTERNAL: lora_status = 19;
/// The object is not in a state that allows the call (e.g. asking for the
/// double-quantization codes of a tensor quantized without it), or a
/// handle that was already freed.
pub const LORA_ERR_INVALID_STATE: lora_status = 20;
/// A progress callback returned non-zero: the call stopped early. What it
/// was building is discarded; objects it was updating are left as before
/// the call where the function's documentation says so.
pub const LORA_ERR_CANCELLED: lora_status = 21;
/// A paged allocation on a CUDA context asks for more managed memory than
/// the device has free, and the host did not allow oversubscription
/// (`lora_paging_params.allow_oversubscription`).
pub const LORA_ERR_DEVICE_MEMORY_EXCEEDED: lora_status = 22;

pub(crate) fn status_of(kind: ErrorKind) -> lora_status {
    match kind {
        ErrorKind::NullPointer => LORA_ERR_NULL_POINTER,
        ErrorKind::InvalidArgument => LORA_ERR_INVALID_ARGUMENT,
        ErrorKind::InvalidShape => LORA_ERR_INVALID_SHAPE,
        ErrorKind::InvalidBlocksize => LORA_ERR_INVALID_BLOCKSIZE,
        ErrorKind::BufferSize => LORA_ERR_BUFFER_SIZE,
        ErrorKind::UnknownDtype => LORA_ERR_UNKNOWN_DTYPE,
        ErrorKind::NonFinite => LORA_ERR_NON_FINITE,
        ErrorKind::Io => LORA_ERR_IO,
        ErrorKind::FileFormat => LORA_ERR_FILE_FORMAT,
        ErrorKind::TensorNotFound => LORA_ERR_TENSOR_NOT_FOUND,
        ErrorKind::DtypeMismatch => LORA_ERR_DTYPE_MISMATCH,
        ErrorKind::ShapeMismatch => LORA_ERR_SHAPE_MISMATCH,
        ErrorKind::CudaUnavailable => LORA_ERR_CUDA_UNAVAILABLE,
        ErrorKind::Cuda => LORA_ERR_CUDA,
        ErrorKind::OutOfMemory => LORA_ERR_OUT_OF_MEMORY,
        ErrorKind::Unsupported => LORA_ERR_UNSUPPORTED,
        ErrorKind::StructSize => LORA_ERR_STRUCT_SIZE,
        ErrorKind::Internal => LORA_ERR_INTERNAL,
        ErrorKind::InvalidState => LORA_ERR_INVALID_STATE,
        ErrorKind::Cancelled => LORA_ERR_CANCELLED,
        ErrorKind::DeviceMemoryExceeded => LORA_ERR_DEVICE_MEMORY_EXCEEDED,
    }
}

/// A static, NUL-terminated description of `status` ("unknown status" for
/// values this library does not define). Never NULL; do not free.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn lora_status_str(status: lora_status) -> *const c_char {
    let s: &'static str = match status {
        LORA_OK => "ok\0",
        LORA_ERR_NULL_POINTER => "null pointer argument\0",
        LORA_ERR_INVALID_ARGUMENT => "invalid argument\0",
        LORA_ERR_INVALID_SHAPE => "invalid shape\0",
        LORA_ERR_INVALID_BLOCKSIZE => "invalid blocksize\0",
        LORA_ERR_BUFFER_SIZE => "buffer size does not match the shape\0",
        LORA_ERR_UNKNOWN_DTYPE => "unknown dtype\0",
        LORA_ERR_NON_FINITE => "non-finite value in input\0",
        LORA_ERR_IO => "I/O error\0",
        LORA_ERR_FILE_FORMAT => "malformed file\0",
        LORA_ERR_TENSOR_NOT_FOUND => "tensor not found\0",
        LORA_ERR_DTYPE_MISMATCH => "dtype mismatch\0",
        LORA_ERR_SHAPE_MISMATCH => "shape mismatch\0",
        LORA_ERR_CUDA_UNAVAILABLE => "CUDA unavailable\0",
        LORA_ERR_CUDA => "CUDA error\0",
        LORA_ERR_OUT_OF_MEMORY => "out of memory\0",
        LORA_ERR_UNSUPPORTED => "unsupported\0",
        LORA_ERR_STRUCT_SIZE => "unknown parameter struct size\0",
        LORA_ERR_PANIC => "internal panic\0",
        LORA_ERR_INTERNAL => "internal error\0",
        LORA_ERR_INVALID_STATE => "invalid state for this call\0",
        LORA_ERR_CANCELLED => "cancelled by the progress callback\0",
        LORA_ERR_DEVICE_MEMORY_EXCEEDED => "exceeds the device's free memory\0",
        _ => "unknown status\0",
    };
    s.as_ptr() as *const c_char
}

/// Last error of the calling thread: copies the message of the most recent
/// failed call made on this thread into `buf` (UTF-8, NUL-terminated,
/// truncated to `len` bytes at a character boundary) and returns its full length in bytes, without the NUL.
/// `buf` may be NULL (with any `len`) to ask for the length. Successful
/// calls do not clear it. Thread-safe: each thread has its own.
#[no_mangle]
pub unsafe extern "C" fn lora_last_error(buf: *mut c_char, len: usize) -> usize {
    super::util::guard_value(0, || super::util::with_last_error(|s| super::util::write_cstr(s, buf, len)))
}
