//! Index and shape ops: joining, splitting, gathering and padding along a dim.
//!
//! | op | forward | backward (g = dL/dy) |
//! | --- | --- | --- |
//! | concat(xs, d) | the xs end to end along d: y[.., o_i + j, ..] = xs[i][.., j, ..], o_i = sum of the earlier sizes | dL/dxs[i] = narrow(g, d, o_i, size_i), a view |
//! | stack(xs, d) | concat of unsqueeze(xs[i], d) | through concat and the views |
//! | split(x, sizes, d), chunk(x, n, d) | narrow views of x | that of narrow |
//! | index_select(x, d, idx) | y[.., j, ..] = x[.., idx[j], ..] | dL/dx[.., i, ..] = sum of g[.., j, ..] over the j with idx[j] = i (index_add into zeros) |
//! | pad(x, p, v) | v around x: y[.., lo + i, ..] = x[.., i, ..] on each padded dim | g without the border, a view |
//!
//! concat and pad allocate their output and fill it with `copy_into` through narrow views of it, so they run on
//! any device `copy_into` supports; only index_select has kernels of its own (`cpu.rs`, `cuda.rs`).

mod cpu;
pub(crate) mod cuda;

use engine::{Error, Op, Result, Storage, Tensor};

use crate::copy::copy_into;
use crate::util::same_dtype_device;
use crate::view::{narrow, unsqueeze};

/// The product of `shape`, or an error if it does not fit in a `usize`.
fn checked_numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, "the result has more elements than fit in memory", shape))
}

struct Concat {
    dim: usize,
    /// Each input's size along `dim`, in order.
    sizes: Vec<usize>,
}

impl Op for Concat {
    fn name(&self) -> &'static str {
        "concat"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut start = 0;
        let mut grads = Vec::with_capacity(self.sizes.len());
        for &len in &self.sizes {
            grads.push(Some(narrow(g, self.dim as isize, start, len)?));
            start += len;
        }
        Ok(grads)
    }
}

/// Joins `xs` along `dim`; all must have the same dtype, device, rank and sizes on the other dims.
pub fn concat(xs: &[Tensor], dim: isize) -> Result<Tensor> {
    let first = xs.first().ok_or_else(|| Error::invalid("concat", "needs at least one tensor", &[]))?;
    let d = engine::normalize_dim("concat", dim, first.shape())?;
    let mut shape = first.shape().to_vec();
    shape[d] = 0;
    for x in xs {
        same_dtype_device("concat", first, x)?;
        let fits = x.rank() == first.rank() && (0..x.rank()).all(|i| i == d || x.shape()[i] == first.shape()[i]);
        if !fits {
            return Err(Error::ShapeMismatch { op: "concat", lhs: first.shape().to_vec(), rhs: x.shape().to_vec() });
        }
        // Expanded (stride-0) inputs can be huge without memory behind them, so the sum may overflow.
        shape[d] = shape[d]
            .checked_add(x.shape()[d])
            .ok_or_else(|| Error::invalid("concat", "the result has more elements than fit in memory", x.shape()))?;
    }
    let sizes: Vec<usize> = xs.iter().map(|x| x.shape()[d]).collect();
    let inputs: Vec<&Tensor> = xs.iter().collect();
    // Record the output first, then fill it: copy_into writes into a tensor, and this one is new, so no
    // other view of its storage exists yet.
    let storage = Storage::full(checked_numel("concat", &shape)?, 0.0, first.dtype(), first.device())?;
    let y = Tensor::from_op(storage, &shape, &inputs, || Concat { dim: d, sizes: sizes.clone() });
    let mut start = 0;
    for (x, &len) in xs.iter().zip(&sizes) {
        // An empty piece writes nothing, and its narrow view may start past the end of the storage, which
        // copy_into's bounds check would refuse.
        if x.numel() > 0 {
            copy_into(&y, &y.layout().narrow(d, start, len)?, x)?;
        }
        start += len;
    }
    Ok(y)
}

/// Joins same-shape tensors along a new dim `dim` (0..=rank; negative counts from the end of the new shape).
pub fn stack(xs: &[Tensor], dim: isize) -> Result<Tensor> {
    let first = xs.first().ok_or_else(|| Error::invalid("stack", "needs at least one tensor", &[]))?;
    let rank = first.rank() as isize + 1;
    let d = if dim < 0 { dim + rank } else { dim };
    if !(0..rank).contains(&d) {
        return Err(Error::DimOutOfRange { op: "stack", dim, shape: first.shape().to_vec() });
    }
    for x in xs {
        same_dtype_device("stack", first, x)?;
        if x.shape() != first.shape() {
            return Err(Error::ShapeMismatch { op: "stack", lhs: first.shape().to_vec(), rhs: x.shape().to_vec() });
        }
    }
    let parts = xs.iter().map(|x| unsqueeze(x, d)).collect::<Result<Vec<_>>>()?;
    concat(&parts, d)
}

/// Views of consecutive pieces of `x` along `dim` with the given sizes, which must add up to that dim's size
/// (`torch.split` with a list of sizes).
pub fn split(x: &Tensor, sizes: &[usize], dim: isize) -> Result<Vec<Tensor>> {
    let d = engine::normalize_dim("split", dim, x.shape())?;
    let total = sizes.iter().try_fold(0usize, |acc, &s| acc.checked_add(s));
    if total != Some(x.shape()[d]) {
        let msg = format!("sizes {sizes:?} do not add up to the size {} of dim {dim}", x.shape()[d]);
        return Err(Error::invalid("split", msg, x.shape()));
    }
    let mut start = 0;
    let mut pieces = Vec::with_capacity(sizes.len());
    for &len in sizes {
        pieces.push(narrow(x, d as isize, start, len)?);
        start += len;
    }
    Ok(pieces)
}

/// `torch.chunk`: pieces of ceil(size / n) along `dim`, the last one smaller, so there may be fewer than `n`;
/// an empty dim gives `n` empty pieces.
pub fn chunk(x: &Tensor, n: usize, dim: isize) -> Result<Vec<Tensor>> {
    if n == 0 {
        return Err(Error::invalid("chunk", "the number of chunks must be positive", x.shape()));
    }
    let size = x.shape()[engine::normalize_dim("chunk", dim, x.shape())?];
    if size == 0 {
        return split(x, &vec![0; n], dim);
    }
    let step = size.div_ceil(n);
    let sizes: Vec<usize> = (0..size).step_by(step).map(|start| step.min(size - start)).collect();
    split(x, &sizes, dim)
}

struct IndexSelect {
    input_shape: Vec<usize>,
    dim: usize,
    indices: Vec<usize>,
}

impl Op for IndexSelect {
    fn name(&self) -> &'static str {
        "index_select"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let storage = match &*g.storage() {
            Storage::Cpu(s) => Storage::Cpu(cpu::index_add(s, g.layout(), &self.input_shape, self.dim, &self.indices)),
            Storage::Cuda(s) => {
                Storage::Cuda(cuda::index_add(s, g.layout(), &self.input_shape, self.dim, &self.indices)?)
            }
        };
        Ok(vec![Some(Tensor::from_storage(storage, &self.input_shape)?)])
    }
}

/// The slices `indices` of `x` along `dim`, in that order (repeats allowed): `torch.index_select`.
pub fn index_select(x: &Tensor, dim: isize, indices: &[usize]) -> Result<Tensor> {
    let d = engine::normalize_dim("index_select", dim, x.shape())?;
    let size = x.shape()[d];
    if let Some(&bad) = indices.iter().find(|&&i| i >= size) {
        let msg = format!("index {bad} is out of range for dim {dim} of size {size}");
        return Err(Error::invalid("index_select", msg, x.shape()));
    }
    let mut shape = x.shape().to_vec();
    shape[d] = indices.len();
    checked_numel("index_select", &shape)?;
    let storage = match &*x.storage() {
        Storage::Cpu(s) => Storage::Cpu(cpu::index_select(s, x.layout(), d, indices)),
        Storage::Cuda(s) => Storage::Cuda(cuda::index_select(s, x.layout(), d, indices)?),
    };
    Ok(Tensor::from_op(storage, &shape, &[x], || IndexSelect {
        input_shape: x.shape().to_vec(),
        dim: d,
        indices: indices.to_vec(),
    }))
}

struct Pad {
    input_shape: Vec<usize>,
    /// (before, after) per dim, for the last `pads.len()` dims, the last dim first.
    pads: Vec<(usize, usize)>,
}

impl Op for Pad {
    fn name(&self) -> &'static str {
        "pad"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let r = self.input_shape.len();
        let mut inner = g.clone();
        for (i, &(before, _)) in self.pads.iter().enumerate() {
            let d = r - 1 - i;
            inner = narrow(&inner, d as isize, before, self.input_shape[d])?;
        }
        Ok(vec![Some(inner)])
    }
}

/// Constant padding as `torch.nn.functional.pad(x, p, value=value)`: `pads[0]` is (before, after) for the
/// last dim, `pads[1]` for the one before it, and so on.
pub fn pad(x: &Tensor, pads: &[(usize, usize)], value: f64) -> Result<Tensor> {
    let r = x.rank();
    if pads.len() > r {
        let msg = format!("{} (before, after) pairs for a tensor of {r} dims", pads.len());
        return Err(Error::invalid("pad", msg, x.shape()));
    }
    let mut shape = x.shape().to_vec();
    for (i, &(before, after)) in pads.iter().enumerate() {
        let d = r - 1 - i;
        shape[d] = shape[d]
            .checked_add(before)
            .and_then(|s| s.checked_add(after))
            .ok_or_else(|| Error::invalid("pad", format!("padding {pads:?} is too large"), x.shape()))?;
    }
    let storage = Storage::full(checked_numel("pad", &shape)?, value, x.dtype(), x.device())?;
    let y = Tensor::from_op(storage, &shape, &[x], || Pad { input_shape: x.shape().to_vec(), pads: pads.to_vec() });
    // x goes into the interior: on each padded dim, `before` onwards for x's own size.
    let mut interior = y.layout().clone();
    for (i, &(before, _)) in pads.iter().enumerate() {
        let d = r - 1 - i;
        interior = interior.narrow(d, before, x.shape()[d])?;
    }
    // As in concat, an empty x has nothing to write (and its view may point past the storage).
    if x.numel() > 0 {
        copy_into(&y, &interior, x)?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests;
