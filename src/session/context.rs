//! The context: which device computes, with how many CPU threads, and the
//! seed every random choice (initialization, dropout) derives from.

use crate::backend::{cuda, Device};
use crate::error::Result;
use crate::memory::{Pager, PagingConfig};

/// Backend requested at context creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// CUDA if a driver loads and a device exists, else CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Debug)]
pub struct ContextParams {
    pub backend: BackendChoice,
    /// CPU worker threads; 0 means one per available core.
    pub n_threads: usize,
    pub seed: u64,
    pub device_index: usize,
}

impl Default for ContextParams {
    fn default() -> Self {
        ContextParams { backend: BackendChoice::Auto, n_threads: 0, seed: 0, device_index: 0 }
    }
}

pub struct Context {
    pub device: Device,
    /// Shared so objects made under the context (layers, trainers) keep
    /// their threads even if the context handle is freed first.
    pub pool: std::sync::Arc<rayon::ThreadPool>,
    pub seed: u64,
    /// Paged memory of this context (`lora_paged_alloc`): its budget,
    /// directory and buffers. Shared with the buffers, which may outlive
    /// the context.
    pub pager: std::sync::Arc<Pager>,
}

impl Context {
    pub fn new(p: &ContextParams) -> Result<Context> {
        let device = match p.backend {
            BackendChoice::Cpu => Device::Cpu,
            BackendChoice::Cuda => Device::Cuda(std::sync::Arc::new(cuda::open(p.device_index)?)),
            // AUTO needs the kernels too: a driver without NVRTC means CPU.
            BackendChoice::Auto => match cuda::nvrtc::ensure().and_then(|_| cuda::open(p.device_index)) {
                Ok(d) => Device::Cuda(std::sync::Arc::new(d)),
                Err(e) => {
                    log!(Info, "backend AUTO chose the CPU: {}", e.message);
                    Device::Cpu
                }
            },
        };
        let threads = if p.n_threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { p.n_threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("lora-cpu-{i}"))
            .build()
            .map_err(|e| err!(Internal, "cannot start {threads} worker threads: {e}"))?;
        log!(Info, "context on {} with {threads} CPU threads, seed {}", device.describe(), p.seed);
        let pager = Pager::new(device.clone(), PagingConfig::default())?;
        Ok(Context { device, pool: std::sync::Arc::new(pool), seed: p.seed, pager })
    }

    /// Runs `f` on this context's thread pool (so rayon work inside it uses
    /// the context's thread count).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    pub fn n_threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}
