//! `act_linear(h, act, W, b) = act(h) W^T + b`: a Linear layer whose input is an activation of `h` (an MLP's
//! second layer, `fc2(gelu(fc1(x)))`), as one recorded op that saves `h` and not `act(h)`.
//!
//! Composed, the activation saves h for its derivative and the Linear saves a = act(h) for its weight's
//! gradient: two tensors of the hidden width (4x the model width in an MLP) alive until backward. This op
//! saves h alone and recomputes a = act(h) in the backward (one elementwise pass), which is what the
//! weight's gradient needs:
//!
//! ```text
//! y  = a W^T + b,  a = act(h)
//! db = sum over rows of g
//! dW = g^T a                         (a recomputed)
//! dh = (g W) * act'(h)
//! ```
//!
//! Every product and elementwise pass is the one the composition runs, in the same order, so results and
//! gradients are bitwise those of `linear(act(h))` (a test checks it).

use engine::{no_grad, Error, Op, Result, Tensor};

use super::matmul_nd;
use crate::elementwise::{add, unary, unary_grad, Needs, Unary};
use crate::reduce::sum_to_shape;
use crate::util::same_dtype_device;
use crate::view::{reshape_usize, t};

struct ActLinear {
    act: Unary,
    h: Tensor,
    w: Tensor,
    has_bias: bool,
}

impl Op for ActLinear {
    fn name(&self) -> &'static str {
        "act_linear"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (h, w) = (&self.h, &self.w);
        let a = unary(self.act, h)?;
        let (k, n) = (w.dim(1)?, w.dim(0)?);
        let rows = h.numel() / k;
        // dW^T = a^T g over the stacked rows (as the Linear's shared-weight gradient), then W's orientation.
        let dw = t(&matmul_nd(&t(&reshape_usize(&a, &[rows, k])?)?, &reshape_usize(g, &[rows, n])?)?)?;
        let db = self.has_bias.then(|| sum_to_shape(g, &[n])).transpose()?;
        let da = matmul_nd(g, w)?;
        drop(a);
        let dh = unary_grad(self.act, h, h, &da, h.shape())?;
        let mut grads = vec![Some(dh), Some(dw)];
        if self.has_bias {
            grads.push(db);
        }
        Ok(grads)
    }
}

/// `act(h) @ weight^T + bias` for h (..., k), weight (n, k), bias (n): a Linear applied to an activation,
/// saving h only (see the module docs). `act` must be an activation whose derivative reads its input alone
/// (GELU, SiLU, ReLU, softplus, ...).
pub fn act_linear(h: &Tensor, act: Unary, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "act_linear";
    same_dtype_device(OP, h, weight)?;
    if let Some(b) = bias {
        same_dtype_device(OP, h, b)?;
    }
    if act.needs() != Needs::X {
        let msg = format!("{} is not an activation whose derivative reads only its input", act.name());
        return Err(Error::invalid(OP, msg, h.shape()));
    }
    let (n, k) = match *weight.shape() {
        [n, k] => (n, k),
        _ => return Err(Error::invalid(OP, "weight must be (out, in)", weight.shape())),
    };
    if h.rank() < 2 || h.dim(-1)? != k {
        return Err(Error::ShapeMismatch { op: OP, lhs: h.shape().to_vec(), rhs: weight.shape().to_vec() });
    }
    if bias.is_some_and(|b| b.shape() != [n]) {
        return Err(Error::ShapeMismatch { op: OP, lhs: weight.shape().to_vec(), rhs: bias.unwrap().shape().to_vec() });
    }
    let y = no_grad(|| {
        let p = matmul_nd(&unary(act, h)?, &t(weight)?)?;
        match bias {
            Some(b) => add(&p, b),
            None => Ok(p),
        }
    })?;
    let mut inputs = vec![h, weight];
    inputs.extend(bias);
    // The saved h must be contiguous for the row reshapes of the backward (a Linear's input always is).
    let h_saved = h.detach().contiguous()?;
    Ok(Tensor::from_op_over(&y, &inputs, || ActLinear {
        act,
        h: h_saved,
        w: weight.detach(),
        has_bias: bias.is_some(),
    }))
}
