//! Checks and helpers shared by the ops: inputs must agree on dtype and device before any kernel runs; fused
//! kernels read their (contiguous) inputs as typed slices.

use engine::{CpuStorage, Error, Float, Layout, Result, Storage, Tensor};

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

/// A CPU tensor's storage with its layout: how fused kernels receive their operands.
pub(crate) type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// The elements of a contiguous CPU view as a typed slice (from the view's offset, `numel` long). Kernels of
/// the fused families make their inputs contiguous at op entry and read them through this.
pub(crate) fn contiguous_slice<'a, T: Float>(op: &'static str, s: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let v = T::slice(s).ok_or(Error::DTypeMismatch { op, lhs: T::DTYPE, rhs: s.dtype() })?;
    if !layout.is_contiguous() {
        return Err(Error::invalid(op, "internal: kernel input is not contiguous", layout.shape()));
    }
    v.get(layout.offset()..layout.offset() + layout.numel())
        .ok_or_else(|| Error::invalid(op, "internal: view exceeds its storage", layout.shape()))
}

/// The elements of a channels-last view: a (N, C, H, W) layout whose memory is (N, H, W, C) row-major.
pub(crate) fn channels_last_slice<'a, T: Float>(
    op: &'static str,
    s: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let v = T::slice(s).ok_or(Error::DTypeMismatch { op, lhs: T::DTYPE, rhs: s.dtype() })?;
    if !is_channels_last(layout) {
        return Err(Error::invalid(op, "internal: kernel input is not channels-last", layout.shape()));
    }
    v.get(layout.offset()..layout.offset() + layout.numel())
        .ok_or_else(|| Error::invalid(op, "internal: view exceeds its storage", layout.shape()))
}

/// The elements of any CPU view, gathered in row-major order (for small operands such as biases).
pub(crate) fn gathered<T: Float>(op: &'static str, s: &CpuStorage, layout: &Layout) -> Result<Vec<T>> {
    let v = T::slice(s).ok_or(Error::DTypeMismatch { op, lhs: T::DTYPE, rhs: s.dtype() })?;
    if layout.storage_span().end > v.len() {
        return Err(Error::invalid(op, "internal: view exceeds its storage", layout.shape()));
    }
    Ok(CpuStorage::gather(v, layout))
}

/// Whether a (N, C, H, W) layout is a channels-last view: its memory is (N, H, W, C) row-major, as the
/// image view of (B, H W, C) tokens is.
pub(crate) fn is_channels_last(layout: &Layout) -> bool {
    layout.rank() == 4 && layout.permute(&[0, 2, 3, 1]).is_ok_and(|l| l.is_contiguous())
}

/// The (N, C, H, W) view of channels-last memory (N, H, W, C).
pub(crate) fn channels_last_layout(n: usize, c: usize, h: usize, w: usize) -> Layout {
    Layout::new(vec![n, c, h, w], vec![h * w * c, 1, w * c, c], 0)
}

/// `t`, detached and in row-major order: what a fused kernel saves for its backward. Copies only when `t` is
/// not contiguous already; records nothing.
pub(crate) fn saved_contiguous(t: &Tensor) -> Result<Tensor> {
    t.detach().contiguous()
}

/// Checks that an optional per-channel operand (weight, bias, running statistic) is a vector of `len`
/// elements with `x`'s dtype and device.
pub(crate) fn check_vector(op: &'static str, what: &str, v: Option<&Tensor>, x: &Tensor, len: usize) -> Result<()> {
    let Some(v) = v else { return Ok(()) };
    same_dtype_device(op, x, v)?;
    if v.shape() != [len] {
        return Err(Error::invalid(op, format!("{what} must have shape [{len}], got {:?}", v.shape()), x.shape()));
    }
    Ok(())
}

/// The one dtype `match` of a kernel whose operands are read with [`contiguous_slice`]: runs `$body` with
/// `$T` bound to the element type of `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            engine::DType::F32 => {
                type $T = f32;
                $body
            }
            engine::DType::F64 => {
                type $T = f64;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;

/// Which of an op's (input, weight, bias) need a gradient, as recorded, so that backward computes no more.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Needs {
    pub x: bool,
    pub w: bool,
    pub bias: bool,
}

impl Needs {
    pub(crate) fn of(x: &Tensor, w: Option<&Tensor>, bias: Option<&Tensor>) -> Self {
        let wants = |t: Option<&Tensor>| t.is_some_and(|t| t.requires_grad());
        Needs { x: x.requires_grad(), w: wants(w), bias: wants(bias) }
    }
}

/// Gradients from a fused backward kernel for (input, weight, bias), each present only where it was needed.
pub(crate) struct Grads<S> {
    pub x: Option<S>,
    pub w: Option<S>,
    pub bias: Option<S>,
}

impl<T: Float> Grads<Vec<T>> {
    pub(crate) fn into_storage(self) -> Grads<Storage> {
        let s = |v: Option<Vec<T>>| v.map(|v| Storage::Cpu(T::into_storage(v)));
        Grads { x: s(self.x), w: s(self.w), bias: s(self.bias) }
    }
}

impl Grads<Storage> {
    /// The gradients as tensors in the recorded input order: x, then the weight and the bias where the op was
    /// given them (`None` shapes for operands it was not given).
    pub(crate) fn into_tensors(
        self,
        x: &[usize],
        w: Option<&[usize]>,
        bias: Option<&[usize]>,
    ) -> Result<Vec<Option<Tensor>>> {
        let t = |s: Option<Storage>, shape: &[usize]| s.map(|s| Tensor::from_storage(s, shape)).transpose();
        let mut out = vec![t(self.x, x)?];
        if let Some(w) = w {
            out.push(t(self.w, w)?);
        }
        if let Some(b) = bias {
            out.push(t(self.bias, b)?);
        }
        Ok(out)
    }
}
