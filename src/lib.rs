//! liblora: LoRA and QLoRA fine-tuning with a stable C ABI.
//!
//! Layers (DESIGN.md section 2), each calling only those below it:
//! `ffi` → `session` → (`lora`, `optim`, `model`) → (`quant`, `memory`, `io`)
//! → `backend` (`cpu`, the reference, and `cuda`). `tokenizer` (Hugging Face
//! tokenizer.json: text ↔ ids) stands apart, used by `ffi` and generation.

#[macro_use]
pub mod error;
pub mod backend;
pub mod dtype;
pub mod io;
#[macro_use]
pub mod log;
pub mod memory;
pub mod model;
pub mod optim;
pub mod lora;
pub mod quant;
pub mod rng;
pub mod session;
pub mod tokenizer;

pub mod ffi;

pub use error::{Error, ErrorKind, Result};
