//! Low-rank adapters (PEFT semantics, DESIGN.md section 4): a linear layer
//! with a frozen base weight (dense or NF4) and any number of named
//! adapters, with forward, backward, merge, hot swap, mixed-adapter batches
//! and weighted combination.

pub mod layer;

pub use layer::{AdapterConfig, Combine, Init, LoraLayer, RequantReport};
