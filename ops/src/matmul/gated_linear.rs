//! `gated_linear(x, gate, act, W, b) = (x * act(gate)) W^T + b`: a Linear layer over a gated product (the
//! MILA block's `out_proj(attn(t) * silu(act_proj(t)))`, Mamba's `out_proj(y * silu(z))`), as one recorded op
//! that saves x and gate and neither act(gate) nor the product.
//!
//! Composed, the activation saves gate, the product saves x and a = act(gate), and the Linear saves p = x a:
//! four tensors of the layer's input width alive until backward. This op saves x and gate alone and
//! recomputes a and p in the backward (two elementwise passes):
//!
//! ```text
//! y     = p W^T + b,  p = x a,  a = act(gate)
//! db    = sum over rows of g
//! dW    = g^T p                        (p recomputed)
//! dp    = g W
//! dx    = dp a,  da = dp x             (a recomputed)
//! dgate = da act'(gate)
//! ```
//!
//! Every product and elementwise pass is the one the composition runs, through the same kernels and in the
//! same order, so results and gradients are bitwise those of `linear(x * act(gate))` (a test checks it).

use engine::{no_grad, Error, Op, Result, Tensor};

use super::linear::{affine, weight_bias_grads};
use super::matmul_nd;
use crate::elementwise::{binary, binary_grad, unary, unary_grad, Binary, Needs, Unary};
use crate::util::same_dtype_device;

struct GatedLinear {
    act: Unary,
    x: Tensor,
    gate: Tensor,
    w: Tensor,
    has_bias: bool,
}

impl Op for GatedLinear {
    fn name(&self) -> &'static str {
        "gated_linear"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, gate, w) = (&self.x, &self.gate, &self.w);
        let (k, n) = (w.dim(1)?, w.dim(0)?);
        let a = unary(self.act, gate)?;
        let p = binary(Binary::Mul, x, &a)?;
        // dW = g^T p over the stacked rows and db (one cuBLASLt product on CUDA): as `linear`'s backward.
        let (dw, db) = weight_bias_grads(&p, g, k, n, self.has_bias)?;
        drop(p);
        let dp = matmul_nd(g, w)?;
        let (dx, da) = binary_grad(Binary::Mul, x, &a, &dp)?;
        drop((a, dp));
        let dgate = unary_grad(self.act, gate, gate, &da, gate.shape())?;
        let mut grads = vec![Some(dx), Some(dgate), Some(dw)];
        if self.has_bias {
            grads.push(db);
        }
        Ok(grads)
    }
}

/// `(x * act(gate)) @ weight^T + bias` for x and gate (..., k) of one shape, weight (n, k), bias (n): a Linear
/// applied to a gated product, saving x and gate only (see the module docs). `act` must be an activation
/// whose derivative reads its input alone (SiLU, GELU, ReLU, softplus, ...).
pub fn gated_linear(x: &Tensor, gate: &Tensor, act: Unary, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "gated_linear";
    same_dtype_device(OP, x, gate)?;
    same_dtype_device(OP, x, weight)?;
    if let Some(b) = bias {
        same_dtype_device(OP, x, b)?;
    }
    if act.needs() != Needs::X {
        let msg = format!("{} is not an activation whose derivative reads only its input", act.name());
        return Err(Error::invalid(OP, msg, gate.shape()));
    }
    if x.shape() != gate.shape() {
        return Err(Error::ShapeMismatch { op: OP, lhs: x.shape().to_vec(), rhs: gate.shape().to_vec() });
    }
    let (n, k) = match *weight.shape() {
        [n, k] => (n, k),
        _ => return Err(Error::invalid(OP, "weight must be (out, in)", weight.shape())),
    };
    if x.rank() < 2 || x.dim(-1)? != k {
        return Err(Error::ShapeMismatch { op: OP, lhs: x.shape().to_vec(), rhs: weight.shape().to_vec() });
    }
    if bias.is_some_and(|b| b.shape() != [n]) {
        return Err(Error::ShapeMismatch { op: OP, lhs: weight.shape().to_vec(), rhs: bias.unwrap().shape().to_vec() });
    }
    let y = no_grad(|| affine(&binary(Binary::Mul, x, &unary(act, gate)?)?, weight, bias))?;
    let mut inputs = vec![x, gate, weight];
    inputs.extend(bias);
    Ok(Tensor::from_op_over(&y, &inputs, || GatedLinear {
        act,
        x: x.detach(),
        gate: gate.detach(),
        w: weight.detach(),
        has_bias: bias.is_some(),
    }))
}
