//! Compute backends. The CPU backend is the reference; the CUDA backend is
//! loaded at run time and every kernel of it is checked against its CPU twin.
//! Dispatch is by the [`Device`] enum.

pub mod cpu;
pub mod cuda;

use std::sync::Arc;

/// Where a context computes.
#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<cuda::CudaDevice>),
}

impl Device {
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// A human-readable name ("cpu", or "cuda:0 NVIDIA H100 80GB HBM3 (sm_90)").
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(d) => d.describe(),
        }
    }
}
