//! The CPU backend: plain Rust, multithreaded with rayon where it pays.
//! Each function's doc comment gives its formula; it is the specification
//! the CUDA kernels are tested against.

pub mod matmul;
pub mod nf4;
pub mod reduce;
pub mod attention;
pub mod embed;
pub mod loss;
pub mod norm;
pub mod rope;
pub mod swiglu;
pub mod vexp;
