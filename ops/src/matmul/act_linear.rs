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
//! One exception, GELU of an f32 tensor on the CPU: there the forward's one pass gives gelu(h) and gelu'(h)
//! together (erf evaluated once per element for the whole step) and saves both, so that the backward
//! evaluates no erf; the two tensors are the same bits as the separate passes'.
//!
//! On the CPU every product and elementwise pass is the one the composition runs, in the same order, so
//! results and gradients are bitwise those of `linear(act(h))` (a test checks it). On CUDA the bias rides in
//! the cuBLASLt epilogues of the forward product and of the weight-gradient product, as in [`super::linear`]
//! (linear.rs).

use engine::{no_grad, Error, Op, Result, Tensor};

use super::linear::{affine, check_operands, weight_bias_grads};
use super::matmul_nd;
use crate::elementwise::{gelu_and_derivative, mul, unary, unary_grad, Needs, Unary};

/// What the backward reads besides W.
enum Saved {
    /// h, from which the backward recomputes act(h) and act'(h).
    H(Tensor),
    /// GELU of an f32 CPU tensor: (gelu(h), gelu'(h)) from the forward's single pass.
    Gelu(Tensor, Tensor),
}

struct ActLinear {
    act: Unary,
    saved: Saved,
    w: Tensor,
    has_bias: bool,
}

impl Op for ActLinear {
    fn name(&self) -> &'static str {
        "act_linear"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let w = &self.w;
        let h = match &self.saved {
            Saved::H(h) => h,
            Saved::Gelu(a, d) => {
                // dh = (g W) * gelu'(h): the product the derivative pass forms, so the same bits.
                let (k, n) = (w.dim(1)?, w.dim(0)?);
                let (dw, db) = weight_bias_grads(a, g, k, n, self.has_bias)?;
                let dh = mul(&matmul_nd(g, w)?, d)?;
                let mut grads = vec![Some(dh), Some(dw)];
                if self.has_bias {
                    grads.push(db);
                }
                return Ok(grads);
            }
        };
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
    let mut inputs = vec![h, weight];
    inputs.extend(bias);
    let recording = engine::is_grad_enabled() && inputs.iter().any(|t| t.requires_grad());
    // GELU of an f32 CPU tensor being recorded: its value and derivative in one pass (one erf per element
    // for the whole step, where recomputing in the backward took two more), both kept for the backward.
    // The same bits as the value and derivative passes; it keeps two hidden-width tensors instead of one.
    let gelu = if recording && matches!(act, Unary::Gelu) { no_grad(|| gelu_and_derivative(h))? } else { None };
    let y = match &gelu {
        Some((a, _)) => no_grad(|| affine(a, weight, bias))?,
        None => no_grad(|| affine(&unary(act, h)?, weight, bias))?,
    };
    let saved = match gelu {
        Some((a, d)) => Saved::Gelu(a, d),
        // The saved h must be contiguous for the row reshapes of the backward (a Linear's input always is).
        None => Saved::H(h.detach().contiguous()?),
    };
    Ok(Tensor::from_op_over(&y, &inputs, || ActLinear { act, saved, w: weight.detach(), has_bias: bias.is_some() }))
}
