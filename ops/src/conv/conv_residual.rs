//! `conv2d_residual(x, W, b, ...) = x + conv2d(x, W, b, ...)`: a convolution whose output has its input's shape
//! (stride 1, 'same' padding, as many output channels as input ones), added to its input: the MILA block's
//! conditional positional encodings `x = x + cpe(x)`, as one recorded op.
//!
//! ```text
//! y  = x + conv2d(x)
//! dx = g + conv2d's dx of g           dW, db = conv2d's of g
//! ```
//!
//! Composed, the add is one more pass over x and y in the forward, and in the backward x's two gradients (g
//! through the add, the conv's dx) meet in the tape's accumulation, another pass. On CUDA the channels-last
//! depthwise kernels form both sums as they store each output (`residual` in `dwl_fwd_*` and `dwl_dx_*`), so
//! neither pass runs; on the CPU, and for the NCHW kernels, the op adds in the output's memory order. Every sum
//! is the composition's, an addition of the same two values, so results and gradients are bitwise those of
//! `x.add(conv2d(x))` on either device (a test checks it).

use engine::{no_grad, Error, Op, Result, Tensor};

use super::{conv2d_geom, conv2d_untracked_with, recorded, ConvBackward, Epilogue};

struct ConvResidual {
    conv: ConvBackward,
}

impl Op for ConvResidual {
    fn name(&self) -> &'static str {
        "conv2d_residual"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut grads = self.conv.backward(g)?;
        // The channels-last op added g to dx itself (it knows it is a residual, and formed x + conv2d(x) in the
        // forward); the NCHW one did neither.
        if let (ConvBackward::Nchw(_), Some(Some(dx))) = (&self.conv, grads.first_mut()) {
            *dx = dx.accumulate(g)?;
        }
        Ok(grads)
    }
}

/// `x + conv2d(x, weight, bias, stride, padding, dilation, groups)` for a conv whose output has x's shape
/// (otherwise an error naming both shapes); same layouts as [`super::conv2d`], one recorded op (see the
/// module docs).
pub fn conv2d_residual(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
) -> Result<Tensor> {
    const OP: &str = "conv2d_residual";
    let geom = conv2d_geom(x, weight, bias, stride, padding, dilation, groups)?;
    if geom.out_shape() != x.shape() {
        return Err(Error::ShapeMismatch { op: OP, lhs: x.shape().to_vec(), rhs: geom.out_shape().to_vec() });
    }
    let (y, conv, added) = conv2d_untracked_with(x, weight, bias, geom, Epilogue::Residual)?;
    let y = if added { y } else { no_grad(|| crate::elementwise::add(&x.detach(), &y))? };
    Ok(recorded(&y, x, weight, bias, || ConvResidual { conv }))
}
