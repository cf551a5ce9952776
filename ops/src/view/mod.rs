//! Movement ops: new layouts over the same storage, no data copied (reshape copies only when the strides
//! leave no other way, as `torch.reshape` does).
//!
//! | op | forward | backward (dL/dx from g = dL/dy) |
//! | --- | --- | --- |
//! | reshape(x, s) | same elements, shape s | g reshaped to x's shape |
//! | permute(x, p) | y[i_p0, i_p1, ...] = x[i_0, i_1, ...] | g permuted by the inverse of p |
//! | narrow(x, d, a, n) | elements a..a+n along d | g written into zeros of x's shape at a..a+n |
//! | expand(x, s) | size-1 and new leading dims repeated (stride 0) | g summed over the repeated dims |

use engine::{Error, Layout, Op, Result, Tensor};

use crate::reduce::sum_to_shape;

/// Resolves a target shape that may hold one `-1`.
fn infer_shape(op: &'static str, shape: &[isize], x: &Tensor) -> Result<Vec<usize>> {
    let err = || Error::ElementCount { op, shape: x.shape().to_vec(), numel: x.numel(), target: shape.to_vec() };
    let known: usize = shape.iter().filter(|&&d| d >= 0).map(|&d| d as usize).product();
    let holes = shape.iter().filter(|&&d| d == -1).count();
    if holes > 1 || shape.iter().any(|&d| d < -1) {
        return Err(err());
    }
    let out: Vec<usize> =
        shape.iter().map(|&d| if d == -1 { x.numel().checked_div(known).unwrap_or(0) } else { d as usize }).collect();
    if out.iter().product::<usize>() != x.numel() {
        return Err(err());
    }
    Ok(out)
}

struct Reshape {
    input_shape: Vec<usize>,
}

impl Op for Reshape {
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(reshape_usize(g, &self.input_shape)?)])
    }
}

/// A view with another shape (one dim may be -1); copies first only if no view is possible.
pub fn reshape(x: &Tensor, shape: &[isize]) -> Result<Tensor> {
    let shape = infer_shape("reshape", shape, x)?;
    reshape_usize(x, &shape)
}

pub(crate) fn reshape_usize(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if shape.iter().product::<usize>() != x.numel() {
        return Err(Error::ElementCount {
            op: "reshape",
            shape: x.shape().to_vec(),
            numel: x.numel(),
            target: shape.iter().map(|&d| d as isize).collect(),
        });
    }
    if shape == x.shape() {
        return Ok(x.clone());
    }
    let make = || Reshape { input_shape: x.shape().to_vec() };
    match x.layout().reshape_view(shape) {
        Some(layout) => Ok(x.view_from_op(layout, make)),
        None => {
            let c = x.contiguous()?;
            let layout = Layout::contiguous(shape);
            Ok(c.view_from_op(layout, || Reshape { input_shape: c.shape().to_vec() }))
        }
    }
}

/// Merges dims `start..=end` into one.
pub fn flatten(x: &Tensor, start: isize, end: isize) -> Result<Tensor> {
    if x.rank() == 0 {
        return reshape_usize(x, &[1]);
    }
    let (s, e) =
        (engine::normalize_dim("flatten", start, x.shape())?, engine::normalize_dim("flatten", end, x.shape())?);
    if s > e {
        return Err(Error::invalid("flatten", format!("start dim {start} is after end dim {end}"), x.shape()));
    }
    let mut shape = x.shape()[..s].to_vec();
    shape.push(x.shape()[s..=e].iter().product());
    shape.extend_from_slice(&x.shape()[e + 1..]);
    reshape_usize(x, &shape)
}

struct Permute {
    inverse: Vec<usize>,
}

impl Op for Permute {
    fn name(&self) -> &'static str {
        "permute"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(permute(g, &self.inverse)?)])
    }
}

/// Reorders dims: output dim i is input dim `dims[i]`.
pub fn permute(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let layout = x.layout().permute(dims)?;
    let mut inverse = vec![0; dims.len()];
    for (i, &d) in dims.iter().enumerate() {
        inverse[d] = i;
    }
    Ok(x.view_from_op(layout, || Permute { inverse }))
}

/// Swaps two dims (negative dims count from the end).
pub fn transpose(x: &Tensor, a: isize, b: isize) -> Result<Tensor> {
    let (a, b) = (engine::normalize_dim("transpose", a, x.shape())?, engine::normalize_dim("transpose", b, x.shape())?);
    let mut dims: Vec<usize> = (0..x.rank()).collect();
    dims.swap(a, b);
    permute(x, &dims)
}

/// The transpose of the last two dims (matrices and batches of them).
pub fn t(x: &Tensor) -> Result<Tensor> {
    if x.rank() < 2 {
        return Err(Error::invalid("t", "needs at least 2 dims", x.shape()));
    }
    transpose(x, -2, -1)
}

struct Narrow {
    input_shape: Vec<usize>,
    dim: usize,
    start: usize,
}

impl Op for Narrow {
    fn name(&self) -> &'static str {
        "narrow"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        // Write g into a zero tensor of the input's shape at start..start+len.
        let out = Tensor::zeros(&self.input_shape, g.dtype(), g.device())?;
        let view = out.layout().narrow(self.dim, self.start, g.shape()[self.dim])?;
        crate::copy::copy_into(&out, &view, g)?;
        Ok(vec![Some(out)])
    }
}

/// Elements `start..start + len` along `dim`, as a view.
pub fn narrow(x: &Tensor, dim: isize, start: usize, len: usize) -> Result<Tensor> {
    let d = engine::normalize_dim("narrow", dim, x.shape())?;
    let layout = x.layout().narrow(d, start, len)?;
    if len == x.shape()[d] {
        return Ok(x.clone());
    }
    Ok(x.view_from_op(layout, || Narrow { input_shape: x.shape().to_vec(), dim: d, start }))
}

/// The element at `index` along `dim`, with that dim removed.
pub fn select(x: &Tensor, dim: isize, index: usize) -> Result<Tensor> {
    let d = engine::normalize_dim("select", dim, x.shape())?;
    squeeze(&narrow(x, dim, index, 1)?, d as isize)
}

struct Expand {
    input_shape: Vec<usize>,
}

impl Op for Expand {
    fn name(&self) -> &'static str {
        "expand"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(sum_to_shape(g, &self.input_shape)?)])
    }
}

/// Broadcasts to `shape` (NumPy rules) as a view with zero strides.
pub fn expand(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if x.shape() == shape {
        return Ok(x.clone());
    }
    let layout = x.layout().broadcast_as(shape)?;
    Ok(x.view_from_op(layout, || Expand { input_shape: x.shape().to_vec() }))
}

/// Inserts a size-1 dim at `dim` (0..=rank; negative counts from the end of the new shape).
pub fn unsqueeze(x: &Tensor, dim: isize) -> Result<Tensor> {
    let rank = x.rank() as isize + 1;
    let d = if dim < 0 { dim + rank } else { dim };
    if !(0..rank).contains(&d) {
        return Err(Error::DimOutOfRange { op: "unsqueeze", dim, shape: x.shape().to_vec() });
    }
    let mut shape = x.shape().to_vec();
    shape.insert(d as usize, 1);
    reshape_usize(x, &shape)
}

/// Removes dim `dim`, which must have size 1.
pub fn squeeze(x: &Tensor, dim: isize) -> Result<Tensor> {
    let d = engine::normalize_dim("squeeze", dim, x.shape())?;
    if x.shape()[d] != 1 {
        return Err(Error::invalid("squeeze", format!("dim {dim} has size {}, not 1", x.shape()[d]), x.shape()));
    }
    let mut shape = x.shape().to_vec();
    shape.remove(d);
    reshape_usize(x, &shape)
}

#[cfg(test)]
mod tests;
