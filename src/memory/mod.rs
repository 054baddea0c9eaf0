//! Memory management (paged buffers arrive with `lora_paged_alloc`).
