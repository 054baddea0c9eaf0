//! Learning-rate schedules as `transformers.get_scheduler` builds them
//! (transformers 5.24, transformers/optimization.py): a `LambdaLR` whose
//! learning rate after `k` scheduler steps is `base_lr * lambda(k)`,
//! computed in `f64` exactly as the Python lambdas do.
//!
//! Indexing: `LambdaLR` applies `lambda(0)` at construction and
//! `lambda(k)` after its k-th `step()`; a training loop calls
//! `scheduler.step()` after each `optimizer.step()`, so optimizer step
//! `n` (1-based) runs with [`Schedule::lr_at`]`(base, n − 1)`.
//!
//! Lambdas (`w` warmup steps, `T` training steps, `s` the step):
//! - constant: `1`
//! - constant_with_warmup: `s < w ? s / max(1.0, w) : 1.0`
//! - linear: `s < w ? s / max(1, w) : max(0.0, (T − s) / max(1, T − w))`
//! - cosine: `s < w ? s / max(1, w)`, else with
//!   `progress = (s − w) / max(1, T − w)`:
//!   `max(0, 0.5 · (1 + cos(π · num_cycles · 2 · progress)))`
//!   (num_cycles 0.5: a half cosine from 1 to 0 over `T − w` steps; past
//!   `T` it rises again, as in transformers, whose cosine lambda has no
//!   clamp at `T`.) transformers' module defines the cosine lambda twice;
//!   the second definition (with `min_lr_rate = 0`, `factor·1 + 0`) is
//!   the one used, and gives the same values.
//!
//! `cos` is the platform libm's, as Python's `math.cos` is (glibc on
//! Linux: the same bits).

use std::f64::consts::PI;

/// A learning-rate schedule (transformers' `SchedulerType`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// `"constant"`.
    Constant,
    /// `"constant_with_warmup"`.
    ConstantWithWarmup { warmup_steps: u64 },
    /// `"linear"`: warmup, then linear decay to 0 at `total_steps`.
    Linear { warmup_steps: u64, total_steps: u64 },
    /// `"cosine"`: warmup, then `num_cycles` cosine waves (0.5 by default:
    /// a half cosine down to 0 at `total_steps`).
    Cosine { warmup_steps: u64, total_steps: u64, num_cycles: f64 },
}

/// Python's `max(0.0, x)` for a float `x`: the first argument unless `x`
/// is strictly greater.
#[inline]
fn py_max0(x: f64) -> f64 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

impl Schedule {
    /// transformers' name for the schedule.
    pub fn name(&self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::ConstantWithWarmup { .. } => "constant_with_warmup",
            Schedule::Linear { .. } => "linear",
            Schedule::Cosine { .. } => "cosine",
        }
    }

    /// The cosine schedule with transformers' default `num_cycles = 0.5`.
    pub fn cosine(warmup_steps: u64, total_steps: u64) -> Schedule {
        Schedule::Cosine { warmup_steps, total_steps, num_cycles: 0.5 }
    }

    /// The multiplier `lambda(step)` of the base learning rate.
    pub fn factor(&self, step: u64) -> f64 {
        // Python ints: exact; differences may be negative.
        let s = step as i128;
        let warmup = |w: u64| s as f64 / (w.max(1)) as f64;
        match *self {
            Schedule::Constant => 1.0,
            Schedule::ConstantWithWarmup { warmup_steps: w } => {
                if s < w as i128 {
                    warmup(w)
                } else {
                    1.0
                }
            }
            Schedule::Linear { warmup_steps: w, total_steps: t } => {
                if s < w as i128 {
                    return warmup(w);
                }
                let den = (t as i128 - w as i128).max(1);
                py_max0((t as i128 - s) as f64 / den as f64)
            }
            Schedule::Cosine { warmup_steps: w, total_steps: t, num_cycles } => {
                if s < w as i128 {
                    return warmup(w);
                }
                let den = (t as i128 - w as i128).max(1);
                let progress = (s - w as i128) as f64 / den as f64;
                py_max0(0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos()))
            }
        }
    }

    /// The learning rate after `step` scheduler steps: `base_lr * factor`
    /// (LambdaLR's `base_lr * lmbda(last_epoch)`), in `f64`. An optimizer
    /// takes it as is; the `f32` roundings happen inside its step.
    pub fn lr_at(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.factor(step)
    }
}
