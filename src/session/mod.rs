//! What a C handle owns: the context (backend, threads, seed) and, in later
//! layers, models, adapters and trainers.

pub mod context;

pub use context::{BackendChoice, Context, ContextParams};
pub mod trainer;
