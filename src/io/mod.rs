//! File formats: safetensors reading and writing with validation, and the
//! bitsandbytes/transformers layout of NF4 tensors inside them.

pub mod nf4_file;
pub mod safetensors;
