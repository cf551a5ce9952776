//! The CUDA backend (issue 4 fills this in). Until then every entry point returns `CudaUnavailable`.

use crate::{CpuStorage, DType, Error, Layout, Result};

#[derive(Debug)]
pub struct CudaStorage {
    ordinal: usize,
    dtype: DType,
    len: usize,
}

fn unavailable(ordinal: usize) -> Error {
    Error::CudaUnavailable { ordinal, reason: "the CUDA backend is not built yet".into() }
}

impl CudaStorage {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn full(ordinal: usize, _n: usize, _value: f64, _dtype: DType) -> Result<Self> {
        Err(unavailable(ordinal))
    }
    pub fn from_cpu(ordinal: usize, _cpu: &CpuStorage) -> Result<Self> {
        Err(unavailable(ordinal))
    }
    pub fn copy_strided(&self, _layout: &Layout) -> Result<Self> {
        Err(unavailable(self.ordinal))
    }
    pub fn cast(&self, _layout: &Layout, _dtype: DType) -> Result<Self> {
        Err(unavailable(self.ordinal))
    }
    pub fn to_cpu(&self, _layout: &Layout) -> Result<CpuStorage> {
        Err(unavailable(self.ordinal))
    }
    pub fn add_same_shape(&self, _la: &Layout, _other: &Self, _lb: &Layout) -> Result<Self> {
        Err(unavailable(self.ordinal))
    }
}

/// Whether a CUDA device can be used.
pub fn is_available() -> bool {
    false
}
