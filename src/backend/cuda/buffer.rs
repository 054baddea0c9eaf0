//! Dense tensors in device memory, in one of the crate's [`DType`]s.
//! fp16 and bf16 elements are carried as their 16-bit patterns (`u16`):
//! cudarc's `f16` feature (which would pull in `half`'s optional extras) is
//! off, and the kernels treat them as `unsigned short` anyway.

use super::{cu_err, guard, CudaDevice};
use crate::dtype::{DType, Elems, ElemsMut};
use crate::error::Result;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr};
use half::slice::HalfFloatSliceExt;

/// A borrowed device tensor's elements.
pub enum DevElems<'a> {
    F32(CudaView<'a, f32>),
    F16(CudaView<'a, u16>),
    BF16(CudaView<'a, u16>),
}

/// A mutably borrowed device tensor's elements.
pub enum DevElemsMut<'a> {
    F32(CudaViewMut<'a, f32>),
    F16(CudaViewMut<'a, u16>),
    BF16(CudaViewMut<'a, u16>),
}

impl DevElems<'_> {
    pub fn len(&self) -> usize {
        match self {
            DevElems::F32(v) => v.len(),
            DevElems::F16(v) | DevElems::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            DevElems::F32(_) => DType::F32,
            DevElems::F16(_) => DType::F16,
            DevElems::BF16(_) => DType::BF16,
        }
    }
    /// The device address of the first element.
    pub fn device_addr(&self, dev: &CudaDevice) -> u64 {
        match self {
            DevElems::F32(v) => v.device_ptr(&dev.stream).0,
            DevElems::F16(v) | DevElems::BF16(v) => v.device_ptr(&dev.stream).0,
        }
    }
    pub(crate) fn check_stream(&self, dev: &CudaDevice, what: &str) -> Result<()> {
        match self {
            DevElems::F32(v) => dev.check_stream(v, what),
            DevElems::F16(v) | DevElems::BF16(v) => dev.check_stream(v, what),
        }
    }
}

impl DevElemsMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            DevElemsMut::F32(v) => v.len(),
            DevElemsMut::F16(v) | DevElemsMut::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            DevElemsMut::F32(_) => DType::F32,
            DevElemsMut::F16(_) => DType::F16,
            DevElemsMut::BF16(_) => DType::BF16,
        }
    }
    pub fn device_addr(&self, dev: &CudaDevice) -> u64 {
        match self {
            DevElemsMut::F32(v) => v.device_ptr(&dev.stream).0,
            DevElemsMut::F16(v) | DevElemsMut::BF16(v) => v.device_ptr(&dev.stream).0,
        }
    }
    pub(crate) fn check_stream(&self, dev: &CudaDevice, what: &str) -> Result<()> {
        match self {
            DevElemsMut::F32(v) => dev.check_stream(v, what),
            DevElemsMut::F16(v) | DevElemsMut::BF16(v) => dev.check_stream(v, what),
        }
    }
}

/// An owned device tensor's elements.
pub enum DevBuffer {
    F32(CudaSlice<f32>),
    F16(CudaSlice<u16>),
    BF16(CudaSlice<u16>),
}

impl DevBuffer {
    /// Copies host elements to the device.
    pub fn upload(dev: &CudaDevice, x: Elems<'_>) -> Result<DevBuffer> {
        Ok(match x {
            Elems::F32(s) => DevBuffer::F32(dev.upload(s)?),
            Elems::F16(s) => DevBuffer::F16(dev.upload(s.reinterpret_cast())?),
            Elems::BF16(s) => DevBuffer::BF16(dev.upload(s.reinterpret_cast())?),
        })
    }

    /// A buffer of `n` elements with every byte set to `byte`.
    pub fn filled(dev: &CudaDevice, dtype: DType, n: usize, byte: u8) -> Result<DevBuffer> {
        Ok(match dtype {
            DType::F32 => DevBuffer::F32(dev.alloc_filled(n, byte)?),
            DType::F16 => DevBuffer::F16(dev.alloc_filled(n, byte)?),
            DType::BF16 => DevBuffer::BF16(dev.alloc_filled(n, byte)?),
        })
    }

    pub fn len(&self) -> usize {
        match self {
            DevBuffer::F32(s) => s.len(),
            DevBuffer::F16(s) | DevBuffer::BF16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            DevBuffer::F32(_) => DType::F32,
            DevBuffer::F16(_) => DType::F16,
            DevBuffer::BF16(_) => DType::BF16,
        }
    }

    pub fn view(&self) -> DevElems<'_> {
        match self {
            DevBuffer::F32(s) => DevElems::F32(s.as_view()),
            DevBuffer::F16(s) => DevElems::F16(s.as_view()),
            DevBuffer::BF16(s) => DevElems::BF16(s.as_view()),
        }
    }

    pub fn view_mut(&mut self) -> DevElemsMut<'_> {
        match self {
            DevBuffer::F32(s) => DevElemsMut::F32(s.as_view_mut()),
            DevBuffer::F16(s) => DevElemsMut::F16(s.as_view_mut()),
            DevBuffer::BF16(s) => DevElemsMut::BF16(s.as_view_mut()),
        }
    }

    /// Copies the elements into a host buffer of the same dtype and length
    /// (waits for the stream).
    pub fn download_into(&self, dev: &CudaDevice, out: ElemsMut<'_>) -> Result<()> {
        if out.len() != self.len() || out.dtype() != self.dtype() {
            bail!(BufferSize, "download of {} {:?} elements into a host buffer of {} {:?}", self.len(), self.dtype(), out.len(), out.dtype());
        }
        guard("cuMemcpyDtoHAsync", || {
            let r = match (self, out) {
                (DevBuffer::F32(s), ElemsMut::F32(o)) => dev.stream.memcpy_dtoh(s, o),
                (DevBuffer::F16(s), ElemsMut::F16(o)) => dev.stream.memcpy_dtoh(s, o.reinterpret_cast_mut()),
                (DevBuffer::BF16(s), ElemsMut::BF16(o)) => dev.stream.memcpy_dtoh(s, o.reinterpret_cast_mut()),
                _ => unreachable!("dtypes checked above"),
            };
            r.map_err(|e| cu_err("cuMemcpyDtoHAsync", e))
        })
    }
}

/// The dtype of a host output buffer (crate::dtype has it for `Elems` only).
trait ElemsMutDtype {
    fn dtype(&self) -> DType;
}
impl ElemsMutDtype for ElemsMut<'_> {
    fn dtype(&self) -> DType {
        match self {
            ElemsMut::F32(_) => DType::F32,
            ElemsMut::F16(_) => DType::F16,
            ElemsMut::BF16(_) => DType::BF16,
        }
    }
}
