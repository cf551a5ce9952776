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
//! On the CPU every product and elementwise pass is the one the composition runs, in the same order, so
//! results and gradients are bitwise those of `linear(act(h))` (a test checks it). On CUDA the bias rides in
//! the cuBLASLt epilogues of the forward product and of the weight-gradient product, as in [`super::linear`]
//! (linear.rs).

use engine::{no_grad, Error, Op, Result, Tensor};

use super::linear::{affine, check_operands, weight_bias_grads};
use super::matmul_nd;
use crate::elementwise::{gelu_and_derivative, mul, unary, unary_grad, Needs, Unary};

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
        // GELU on the CPU: its value and derivative in one pass (one erf per element instead of two), and
        // dh = (g W) * gelu'(h), the product the derivative pass would form: the same bits.
        let fused = if matches!(self.act, Unary::Gelu) { gelu_and_derivative(h)? } else { None };
        if let Some((a, d)) = fused {
            let (k, n) = (w.dim(1)?, w.dim(0)?);
            let (dw, db) = weight_bias_grads(&a, g, k, n, self.has_bias)?;
            drop(a);
            let dh = mul(&matmul_nd(g, w)?, &d)?;
            let mut grads = vec![Some(dh), Some(dw)];
            if self.has_bias {
                grads.push(db);
            }
            return Ok(grads);
        }
        let a = unary(self.act, h)?;
        let (k, n) = (w.dim(1)?, w.dim(0)?);
        // dW = g^T a over the stacked rows and db (one cuBLASLt product on CUDA): as `linear`'s backward.
        let (dw, db) = weight_bias_grads(&a, g, k, n, self.has_bias)?;
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
    if act.needs() != Needs::X {
        let msg = format!("{} is not an activation whose derivative reads only its input", act.name());
        return Err(Error::invalid(OP, msg, h.shape()));
    }
    check_operands(OP, h, 2, weight, bias)?;
    let y = no_grad(|| affine(&unary(act, h)?, weight, bias))?;
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
