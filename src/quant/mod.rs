//! Weight quantization formats: blockwise NF4 with optional double
//! quantization of the block scales, bit-exact with bitsandbytes.

pub mod dynamic_map;
pub mod nf4;

pub use nf4::{Absmax, Nf4Params, Nf4Tensor};
