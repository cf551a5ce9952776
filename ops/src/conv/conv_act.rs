//! `conv2d_act(x, W, b, ..., act) = act(conv2d(x, W, b))`: a convolution followed by an activation (the MILA
//! block's `silu(dwc(t))`), as one recorded op that saves the conv's input and not its output.
//!
//! Composed, the conv saves x and the activation saves c = conv2d(x): two tensors alive until backward. This
//! op saves what the conv saves (x, weight) and recomputes c in the backward with the same forward kernel
//! (for a depthwise 3x3 conv, about the cost of two elementwise passes):
//!
//! ```text
//! y  = act(c),  c = conv2d(x, W, b)
//! dc = g act'(c)                        (c recomputed)
//! dx, dW, db = conv2d's backward of dc
//! ```
//!
//! The activation and its derivative run elementwise in the memory order of c (channels-last for a
//! channels-last input, whose image view is the block's tokens), and y keeps c's layout, as the composition's
//! activation on the tokens view does; dc reaches the conv's backward in c's layout, as through that view. So
//! every pass is the one the composition runs, and results and gradients are bitwise those of
//! `act(conv2d(x))` (a test checks it). On CUDA the channels-last depthwise kernels apply ReLU, SiLU and GELU
//! as they store each output (the elementwise kernels' formulas, so the same bits; one pass over c fewer);
//! elsewhere the activation is the elementwise kernel's pass.

use engine::{no_grad, Error, Layout, Op, Result, Tensor};

use super::{conv2d_geom, conv2d_untracked_with, recorded, ConvBackward, Epilogue};
use crate::elementwise::{unary, unary_grad, Needs, Unary};
use crate::view::permute;

struct ConvAct {
    conv: ConvBackward,
    bias: Option<Tensor>,
    act: Unary,
}

impl Op for ConvAct {
    fn name(&self) -> &'static str {
        "conv2d_act"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let c = self.conv.recompute(self.bias.as_ref())?;
        let flat = flat(&c);
        let dc = unary_grad(self.act, &flat, &flat, &in_memory_order_of(g, &c)?, flat.shape())?;
        drop((c, flat));
        self.conv.backward(&dc.with_layout(self.conv.out_layout()))
    }
}

/// A fresh dense tensor (offset 0, a permutation of row-major order: a conv's output) as its storage, 1-D.
pub(super) fn flat(c: &Tensor) -> Tensor {
    c.with_layout(Layout::contiguous(&[c.numel()]))
}

/// `g`'s values as a 1-D tensor in the memory order of `like` (a dense tensor of g's shape): a view when g
/// has like's strides, else a copy.
pub(super) fn in_memory_order_of(g: &Tensor, like: &Tensor) -> Result<Tensor> {
    if g.strides() == like.strides() {
        return Ok(g.with_layout(Layout::new(vec![g.numel()], vec![1], g.layout().offset())));
    }
    // like's dims by decreasing stride: the permutation under which it is row-major.
    let mut perm: Vec<usize> = (0..like.rank()).collect();
    perm.sort_by_key(|&d| (like.shape()[d] == 1, std::cmp::Reverse(like.strides()[d])));
    let g = permute(g, &perm)?.contiguous()?;
    Ok(g.with_layout(Layout::contiguous(&[g.numel()])))
}

/// `act(conv2d(x, weight, bias, stride, padding, dilation, groups))`, saving x and not the conv's output (see
/// the module docs); same shapes and layouts as [`super::conv2d`]. `act` must be an activation whose
/// derivative reads its input alone (SiLU, GELU, ReLU, ...).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_act(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
    act: Unary,
) -> Result<Tensor> {
    if act.needs() != Needs::X {
        let msg = format!("{} is not an activation whose derivative reads only its input", act.name());
        return Err(Error::invalid("conv2d_act", msg, x.shape()));
    }
    let geom = conv2d_geom(x, weight, bias, stride, padding, dilation, groups)?;
    // On CUDA the channels-last depthwise kernels apply ReLU, SiLU and GELU as they store each output (the
    // elementwise kernels' formulas, so the same bits); otherwise the activation is its own pass.
    let (c, conv, activated) = conv2d_untracked_with(x, weight, bias, geom, Epilogue::Act(act))?;
    let y = if activated { c } else { no_grad(|| unary(act, &flat(&c)))?.with_layout(c.layout().clone()) };
    Ok(recorded(&y, x, weight, bias, || ConvAct { conv, bias: bias.map(Tensor::detach), act }))
}
