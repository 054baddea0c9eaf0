//! Optimizers for the trainable (adapter) weights, on the CPU, with fp32
//! master weights and fp32 optimizer arithmetic.
//!
//! - [`AdamW`]: `torch.optim.AdamW` (single-tensor path, `foreach=False`),
//!   operation for operation, so that it is the reference a CUDA kernel is
//!   tested against and a checkpoint resumes bit for bit.
//! - [`AdamW8bit`]: `bitsandbytes.optim.AdamW8bit` as its CPU backend
//!   computes it: moments stored blockwise in 8 bits (dynamic maps, block
//!   256), tensors under 4,096 elements with 32-bit moments.
//! - [`Schedule`]: the learning-rate schedules of `transformers.get_scheduler`
//!   (constant, constant with warmup, linear, cosine).
//! - [`clip_grad_norm`] and [`check_finite`]: `torch.nn.utils.clip_grad_norm_`
//!   and the guard that refuses a step on a non-finite loss or gradient.
//!
//! Conventions shared by every optimizer here:
//! - Hyperparameters are `f64`, as the Python scalars of the references
//!   are; each is rounded to `f32` at exactly the point where PyTorch turns
//!   the Python float into the tensor's dtype ([`AdamW`] documents each).
//! - `step()` validates everything first (counts, lengths, finiteness of
//!   every gradient) and changes nothing when it returns an error.
//! - The state has a plain Rust representation (one `Vec<f32>` per moment
//!   per tensor, a `u64` step) and exports to / imports from named tensors
//!   ([`StateTensor`]), which [`state::save`] and [`state::load`] write and
//!   read as safetensors, so that training resumes bit for bit.
//! - Elementwise results do not depend on the number of threads; reductions
//!   (gradient norms) use a fixed chunking, so they do not either.

pub mod adamw;
pub mod adamw8bit;
pub mod clip;
pub mod schedule;
pub mod state;

pub use adamw::{AdamW, AdamWConfig, AdamWScalars};
pub use adamw8bit::{AdamW8bit, Bnb8bitTensorState, DynamicMap8};
pub use clip::{check_finite, clip_grad_norm, grad_norm, tensor_norm};
pub use schedule::Schedule;
pub use state::{StateData, StateTensor};

/// Elements per parallel task in the elementwise kernels: large enough that
/// rayon's overhead is negligible, small enough to spread a few-million-
/// element adapter over the cores. A multiple of the 8-bit block size.
pub(crate) const TASK_ELEMS: usize = 1 << 16;

/// Defines `$name`, which runs the `#[inline(always)]` kernel `$kernel`
/// compiled with AVX2 and FMA where the CPU has them, and as is otherwise.
///
/// The kernels use `f32::mul_add`, a correctly rounded fused multiply-add
/// whatever the target: without the `fma` target feature it is a call into
/// libm, with it one instruction (and the loops vectorize 8 wide). Every
/// operation is an IEEE-rounded elementwise one, so the results are the
/// same bits either way; only the speed differs.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) => $kernel:path) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn simd($($arg: $ty),*) {
                    $kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just
                    // above), the only requirement of `simd`.
                    return unsafe { simd($($arg),*) };
                }
            }
            $kernel($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// Checks that `params` and `grads` match the tensor sizes an optimizer was
/// built for, and that every gradient is finite.
pub(crate) fn check_step_args(sizes: &[usize], params: &[&mut [f32]], grads: &[&[f32]]) -> crate::Result<()> {
    if params.len() != sizes.len() || grads.len() != sizes.len() {
        bail!(
            InvalidArgument,
            "optimizer holds {} tensors, step got {} parameters and {} gradients",
            sizes.len(),
            params.len(),
            grads.len()
        );
    }
    for (i, ((p, g), &n)) in params.iter().zip(grads).zip(sizes).enumerate() {
        if p.len() != n || g.len() != n {
            bail!(
                ShapeMismatch,
                "tensor {i}: optimizer state has {n} elements, parameter has {}, gradient has {}",
                p.len(),
                g.len()
            );
        }
    }
    clip::check_finite(None, grads)
}

/// Which optimizer a trainer or a `lora_optimizer` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimKind {
    /// torch.optim.AdamW (fp32 moments).
    AdamW,
    /// bitsandbytes `AdamW8bit` (blockwise 8-bit moments).
    AdamW8bit,
}

/// One of the optimizers, behind one interface.
#[derive(Debug)]
pub enum Optimizer {
    AdamW(AdamW),
    AdamW8bit(AdamW8bit),
}

impl Optimizer {
    /// A new optimizer of `kind` for tensors of `sizes`; with `pager`, its
    /// moments live in paged memory (32-bit AdamW only).
    pub fn new(kind: OptimKind, config: AdamWConfig, sizes: &[usize], pager: Option<&std::sync::Arc<crate::memory::Pager>>) -> crate::Result<Optimizer> {
        Ok(match (kind, pager) {
            (OptimKind::AdamW, None) => Optimizer::AdamW(AdamW::new(config, sizes)?),
            (OptimKind::AdamW, Some(p)) => Optimizer::AdamW(AdamW::new_paged(config, sizes, p)?),
            (OptimKind::AdamW8bit, None) => Optimizer::AdamW8bit(AdamW8bit::new(config, sizes)?),
            (OptimKind::AdamW8bit, Some(_)) => {
                bail!(Unsupported, "paged 8-bit AdamW state is not implemented (8-bit state is a quarter of 32-bit; use it resident, or paged 32-bit AdamW)")
            }
        })
    }

    pub fn sizes(&self) -> &[usize] {
        match self {
            Optimizer::AdamW(o) => o.sizes(),
            Optimizer::AdamW8bit(o) => o.sizes(),
        }
    }

    pub fn set_lr(&mut self, lr: f64) -> crate::Result<()> {
        match self {
            Optimizer::AdamW(o) => o.set_lr(lr),
            Optimizer::AdamW8bit(o) => o.set_lr(lr),
        }
    }

    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]]) -> crate::Result<()> {
        match self {
            Optimizer::AdamW(o) => o.step(params, grads),
            Optimizer::AdamW8bit(o) => o.step(params, grads),
        }
    }

    pub fn export_state(&self, names: &[&str]) -> crate::Result<Vec<StateTensor>> {
        match self {
            Optimizer::AdamW(o) => o.export_state(names),
            Optimizer::AdamW8bit(o) => o.export_state(names),
        }
    }

    pub fn import_state(&mut self, names: &[&str], tensors: &[StateTensor]) -> crate::Result<()> {
        match self {
            Optimizer::AdamW(o) => o.import_state(names, tensors),
            Optimizer::AdamW8bit(o) => o.import_state(names, tensors),
        }
    }

    /// Bytes of state (moments; 8-bit codes and scales), paged or not.
    pub fn state_bytes(&self) -> usize {
        match self {
            Optimizer::AdamW(o) => o.sizes().iter().sum::<usize>() * 8,
            Optimizer::AdamW8bit(o) => o.state_bytes(),
        }
    }

    /// Paging counters of the moments (first, second) when paged.
    pub fn paged_stats(&self) -> Option<(crate::memory::PagedStats, crate::memory::PagedStats)> {
        match self {
            Optimizer::AdamW(o) => o.paged_stats(),
            Optimizer::AdamW8bit(_) => None,
        }
    }
}
