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

/// Runs `f` on a thread of rayon's global pool, the caller waiting for it
/// (at once, where the caller is already one of the pool's threads). A
/// parallel loop started from outside the pool hands its work over and
/// puts the caller to sleep until it is done: two thread switches and a
/// wake-up per loop, some hundreds per training step (~10% of the default
/// model's step on 2 cores). Started from a worker, the loops begin in
/// place. Callers keep user callbacks (progress) outside `f`, so they run
/// on the calling thread as before.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}
