//! Reductions over any set of dims, with or without keepdim.
//!
//! | op | forward | backward |
//! | --- | --- | --- |
//! | sum(x, D) | y[o] = sum over the reduced index r of x[o, r] | dL/dx[o, r] = g[o] (g broadcast back) |
//! | max(x, D) | y[o] = max_r x[o, r] (NaN propagates) | g[o] / k to each of the k elements equal to y[o], 0 elsewhere |
//!
//! `max` splits the gradient evenly between ties, like `torch.amax`. The kernels view the input with the
//! kept dims first and the reduced dims last, so each output element reduces one run of the gathered input;
//! sums accumulate in f64 whatever the dtype (on CUDA, in the contiguous-rows kernels; the strided kernel
//! accumulates f32 in f32 along a warp tree: see cuda.rs).

mod cpu;
pub(crate) mod cuda;

use engine::{Op, Result, Storage, Tensor};

use crate::util::{no_cuda, resolve_dims};
use crate::view::{expand, reshape_usize};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReduceKind {
    Sum,
    Max,
}

/// The reduction plan: permutation putting kept dims first, and the output shapes.
pub(crate) struct Plan {
    pub perm: Vec<usize>,
    /// How many of `perm`'s dims are kept (the rest are reduced).
    pub kept: usize,
    /// Elements reduced into each output element.
    pub group: usize,
    pub keep_shape: Vec<usize>,
    pub out_shape: Vec<usize>,
}

impl Plan {
    fn new(op: &'static str, shape: &[usize], dims: &[isize], keepdim: bool) -> Result<Plan> {
        let reduced = resolve_dims(op, dims, shape)?;
        let kept: Vec<usize> = (0..shape.len()).filter(|d| !reduced.contains(d)).collect();
        let keep_shape: Vec<usize> =
            shape.iter().enumerate().map(|(d, &s)| if reduced.contains(&d) { 1 } else { s }).collect();
        let out_shape = if keepdim { keep_shape.clone() } else { kept.iter().map(|&d| shape[d]).collect() };
        Ok(Plan {
            kept: kept.len(),
            group: reduced.iter().map(|&d| shape[d]).product(),
            perm: kept.into_iter().chain(reduced).collect(),
            keep_shape,
            out_shape,
        })
    }
}

struct Sum {
    input_shape: Vec<usize>,
    keep_shape: Vec<usize>,
}

impl Op for Sum {
    fn name(&self) -> &'static str {
        "sum"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = reshape_usize(g, &self.keep_shape)?;
        Ok(vec![Some(expand(&g, &self.input_shape)?)])
    }
}

struct Max {
    x: Tensor,
    y: Tensor,
    plan: Plan,
}

impl Op for Max {
    fn name(&self) -> &'static str {
        "max"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let storage = match (&*self.x.storage(), &*self.y.storage(), &*g.contiguous()?.storage()) {
            (Storage::Cpu(x), Storage::Cpu(y), Storage::Cpu(g)) => {
                Storage::Cpu(cpu::max_backward(x, self.x.layout(), y, g, &self.plan)?)
            }
            (Storage::Cuda(x), Storage::Cuda(y), Storage::Cuda(g)) => {
                Storage::Cuda(cuda::max_backward(x, self.x.layout(), y, g, &self.plan)?)
            }
            (s, _, _) => return Err(no_cuda("max_backward", s)),
        };
        Ok(vec![Some(Tensor::from_storage(storage, self.x.shape())?)])
    }
}

fn reduce(op: &'static str, kind: ReduceKind, x: &Tensor, dims: &[isize], keepdim: bool) -> Result<(Storage, Plan)> {
    let plan = Plan::new(op, x.shape(), dims, keepdim)?;
    if kind == ReduceKind::Max && plan.group == 0 {
        return Err(engine::Error::invalid(op, "max over an empty dim has no value", x.shape()));
    }
    let storage = match &*x.storage() {
        Storage::Cpu(s) => Storage::Cpu(cpu::reduce(s, x.layout(), &plan, kind)?),
        Storage::Cuda(s) => Storage::Cuda(cuda::reduce(s, x.layout(), &plan, kind)?),
    };
    Ok((storage, plan))
}

/// Sum over `dims` (all dims when empty).
pub fn sum(x: &Tensor, dims: &[isize], keepdim: bool) -> Result<Tensor> {
    let (storage, plan) = reduce("sum", ReduceKind::Sum, x, dims, keepdim)?;
    Ok(Tensor::from_op(storage, &plan.out_shape, &[x], || Sum {
        input_shape: x.shape().to_vec(),
        keep_shape: plan.keep_shape.clone(),
    }))
}

/// Sum of every element, as a 0-dim tensor.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    sum(x, &[], false)
}

/// Max over `dims` (all dims when empty); ties share the gradient.
pub fn max(x: &Tensor, dims: &[isize], keepdim: bool) -> Result<Tensor> {
    let (storage, plan) = reduce("max", ReduceKind::Max, x, dims, keepdim)?;
    Ok(Tensor::from_op_with_output(storage, &plan.out_shape.clone(), &[x], |y| Max { x: x.detach(), y, plan }))
}

/// Sums `g` down to `shape`, undoing a NumPy broadcast (the backward of every broadcasting op).
pub fn sum_to_shape(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    let lead = g.rank().checked_sub(shape.len()).ok_or_else(|| engine::Error::Broadcast {
        op: "sum_to_shape",
        lhs: g.shape().to_vec(),
        rhs: shape.to_vec(),
    })?;
    let dims: Vec<isize> = (0..g.rank())
        .filter(|&d| d < lead || (shape[d - lead] == 1 && g.shape()[d] != 1))
        .map(|d| d as isize)
        .collect();
    let s = if dims.is_empty() { g.clone() } else { sum(g, &dims, true)? };
    reshape_usize(&s, shape)
}

#[cfg(test)]
mod tests;
