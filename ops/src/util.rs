//! Checks shared by the ops: inputs must agree on dtype and device before any kernel runs.

use engine::{Error, Result, Storage, Tensor};

pub(crate) fn same_dtype_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch { op, lhs: a.dtype(), rhs: b.dtype() });
    }
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch { op, lhs: a.device(), rhs: b.device() });
    }
    Ok(())
}

/// The error for a CUDA path that does not exist yet.
pub(crate) fn no_cuda(op: &'static str, s: &Storage) -> Error {
    Error::Unsupported { op, dtype: s.dtype(), device: s.device() }
}

/// Resolves a list of possibly negative dims, sorted and deduplicated; an empty list means all dims.
pub(crate) fn resolve_dims(op: &'static str, dims: &[isize], shape: &[usize]) -> Result<Vec<usize>> {
    if dims.is_empty() {
        return Ok((0..shape.len()).collect());
    }
    let mut out = dims.iter().map(|&d| engine::normalize_dim(op, d, shape)).collect::<Result<Vec<_>>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Errs unless every CUDA storage has the first one's dtype and device.
pub(crate) fn same_cuda_dtypes(op: &'static str, xs: &[&engine::cuda::CudaStorage]) -> Result<()> {
    let Some(first) = xs.first() else { return Ok(()) };
    for x in &xs[1..] {
        if x.dtype() != first.dtype() {
            return Err(Error::DTypeMismatch { op, lhs: first.dtype(), rhs: x.dtype() });
        }
        if x.ordinal() != first.ordinal() {
            return Err(Error::DeviceMismatch {
                op,
                lhs: engine::Device::Cuda(first.ordinal()),
                rhs: engine::Device::Cuda(x.ordinal()),
            });
        }
    }
    Ok(())
}
