//! The GPU tests' shared harness: the device (the GPU; without one, the
//! emulated device of fakecuda.rs; or why there is none), the skip-or-fail
//! rule of `LORA_REQUIRE_GPU=1`, and a seeded generator.
//! Included by `#[path]` in each `tests/cuda_*.rs`.

use lora::backend::cuda::{self, CudaDevice};
use std::sync::{Arc, OnceLock};

pub fn require_gpu() -> bool {
    std::env::var("LORA_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

#[path = "emu.rs"]
#[allow(dead_code)]
pub mod emu;
#[path = "fakecuda.rs"]
#[allow(dead_code)]
pub mod fakecuda;

/// Whether the shared device is the emulated one.
static EMULATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The shared device, or why there is none: the GPU, else (no CUDA driver
/// here, LORA_REQUIRE_GPU unset) the emulated device of
/// tests/common/fakecuda.rs, unless LORA_CUDA_EMULATE=0. One per process.
pub fn device() -> &'static Result<Arc<CudaDevice>, String> {
    static DEV: OnceLock<Result<Arc<CudaDevice>, String>> = OnceLock::new();
    DEV.get_or_init(|| {
        let d = match cuda::open(0) {
            Ok(d) => d,
            Err(e) => {
                let want = std::env::var("LORA_CUDA_EMULATE").as_deref() != Ok("0");
                if !want || require_gpu() || cuda::driver_present() {
                    return Err(format!("no CUDA device: {}", e.message));
                }
                fakecuda::install().map_err(|why| format!("no CUDA device ({}), and no emulated one: {why}", e.message))?;
                EMULATED.store(true, std::sync::atomic::Ordering::Relaxed);
                cuda::open(0).map_err(|e| format!("the emulated CUDA device does not open: {}", e.message))?
            }
        };
        cuda::nvrtc::ensure().map_err(|e| format!("{} has no NVRTC to compile kernels: {}", d.describe(), e.message))?;
        // A GPU and NVRTC are here: from now on every problem is a failure.
        if let Err(e) = d.load_all_kernels() {
            panic!("kernels do not compile or load on {}: {e}", d.describe());
        }
        let (ma, mi) = cuda::nvrtc::version().unwrap_or((0, 0));
        eprintln!("{}: {} with NVRTC {ma}.{mi}", env!("CARGO_CRATE_NAME"), d.describe());
        Ok(Arc::new(d))
    })
}

/// The device (the GPU, or without one the emulated device), or `None`
/// after printing why this test skips (a failure under
/// LORA_REQUIRE_GPU=1).
pub fn gpu(test: &str) -> Option<&'static Arc<CudaDevice>> {
    match device() {
        Ok(d) => Some(d),
        Err(why) if require_gpu() => panic!("{test}: LORA_REQUIRE_GPU=1 but {why}"),
        Err(why) => {
            eprintln!("SKIPPED {test}: {why} (set LORA_REQUIRE_GPU=1 to make this a failure)");
            None
        }
    }
}

/// Whether the device is the emulated one (slow: a test may shrink its
/// work there).
#[allow(dead_code)]
pub fn emulated() -> bool {
    EMULATED.load(std::sync::atomic::Ordering::Relaxed)
}

/// SplitMix64: small, seeded, good enough for test data.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    #[allow(dead_code)]
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn gauss(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    /// `n` gaussian values times `scale`, none exactly zero.
    #[allow(dead_code)]
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let v = (self.gauss() * scale) as f32;
                if v == 0.0 { scale as f32 } else { v }
            })
            .collect()
    }
}

/// Applies `f` to every RMSNorm weight of `m` (input, output and q/k
/// norms): the device tests move them away from the identity in their
/// random models.
#[allow(dead_code)] // used by cuda_train and cuda_fuzz only
pub fn for_each_norm_weight(m: &mut lora::model::Model, mut f: impl FnMut(&mut f32)) {
    for b in &mut m.blocks {
        let pairs = b.qk_norm.iter_mut().chain(b.post_norms.iter_mut()).flatten();
        for w in pairs.chain(b.attn_norm.iter_mut()).chain(b.mlp_norm.iter_mut()) {
            w.iter_mut().for_each(&mut f);
        }
    }
}
