//! Memory management: paged buffers (`lora_paged_alloc`), memory that may
//! exceed the fast tier and pages out and back in ([`paged`]), backed on the
//! CPU by a shared file mapping (`file_map`) and on CUDA by managed memory
//! (`backend::cuda::paged`).

#[cfg(unix)]
pub(crate) mod file_map;
pub mod paged;

#[cfg(unix)]
pub use file_map::page_size;
pub use paged::{flags, PagedBuf, PagedStats, Pager, PagingConfig, CHUNK_BYTES};
