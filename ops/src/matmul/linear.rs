//! `linear(x, W, b) = x W^T + b`: a Linear layer as one recorded op, for x (..., in), W (out, in), b (out).
//!
//! ```text
//! y  = x W^T + b
//! dx = g W
//! dW = g^T x        (one product over the stacked rows of x and g, as the shared-weight matmul backward)
//! db = sum over rows of g
//! ```
//!
//! On the CPU every product and add is the one the composition `add(matmul(x, t(W)), b)` runs, in the same
//! order, so values and gradients are bitwise those of the composition (a test checks it, f32 and f64).
//!
//! On CUDA, with a bias, the forward is one cuBLASLt product with the bias in its epilogue
//! (`CUBLASLT_EPILOGUE_BIAS`) instead of a cuBLAS GEMM and a broadcast add: f32 (TF32 when
//! [`engine::cuda::set_tf32`] is on, as for every product) and f64. How the row-major operands map to
//! cuBLASLt's column-major terms is in the engine's blaslt.rs: the forward is its "TN" product
//! `Y^T (out x rows) = W^T^T X^T` with a bias of `out` (D's row count). The backward is the composition's:
//! cuBLAS products and our column sum for `db` (cuBLASLt's BGRADB epilogue was measured slower, see
//! [`weight_bias_grads`]).
//!
//! Falls back to the composition's kernels (cuBLAS GEMM + add) where cuBLASLt offers no algorithm, where a
//! size is zero, or where the bias is not 16-byte aligned. A non-contiguous x (or W, b) is copied contiguous
//! first. Without a bias the op is the plain product on every device.

use engine::{no_grad, Device, Error, Op, Result, Storage, Tensor};

use super::{cuda, matmul};
use crate::elementwise::{add, unary, unary_grad, Unary};
use crate::reduce::sum_to_shape;
use crate::util::same_dtype_device;
use crate::view::{reshape_usize, t};

/// A dense (contiguous) version of `x`: `x` itself when it already is.
fn dense(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        Ok(x.clone())
    } else {
        x.detach().contiguous()
    }
}

/// `a W^T + b` without recording: the fused cuBLASLt product on CUDA with a bias where available, else
/// exactly the composition `add(matmul(a, t(W)), b)`. `a` is (..., k) of rank 1 or more.
pub(super) fn affine(a: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    affine_act(a, w, bias, false)
}

/// [`affine`], or with `relu` `max(a W^T + b, 0)`: on CUDA with a bias the ReLU rides in the product's
/// epilogue (cuBLASLt RELU_BIAS), else the composition `relu(affine(..))`.
fn affine_act(a: &Tensor, w: &Tensor, bias: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    if let (Some(b), Device::Cuda(_)) = (bias, a.device()) {
        let (n, k) = (w.dim(0)?, w.dim(1)?);
        let rows = a.numel() / k.max(1);
        if rows > 0 && n > 0 && k > 0 {
            let (ad, wd, bd) = (dense(a)?, dense(w)?, dense(b)?);
            let (sa, sw, sb) = (ad.storage(), wd.storage(), bd.storage());
            if let (Storage::Cuda(sa), Storage::Cuda(sw), Storage::Cuda(sb)) = (&*sa, &*sw, &*sb) {
                let op = |s, l: &Tensor| cuda::Dense { storage: s, offset: l.layout().offset() };
                if let Some(y) = cuda::linear_bias(op(sa, &ad), op(sw, &wd), op(sb, &bd), rows, k, n, relu)? {
                    let mut shape = a.shape()[..a.rank() - 1].to_vec();
                    shape.push(n);
                    return Tensor::from_storage(Storage::Cuda(y), &shape);
                }
            }
        }
    }
    let p = matmul(a, &t(w)?)?;
    let y = match bias {
        Some(b) => add(&p, b)?,
        None => p,
    };
    if relu {
        unary(Unary::Relu, &y)
    } else {
        Ok(y)
    }
}

/// The weight and bias gradients of `a W^T + b` for the cotangent g (..., n): `dW = g^T a` over the stacked
/// rows and `db` the column sums of g (with `has_bias`): the composition's product and reduction.
///
/// Not cuBLASLt's BGRADB epilogue ([`engine::cuda::CudaDevice::gemm_bias_grad`]): on the H200 it runs the
/// bias sums as a kernel of its own after the product (`globalKernelBgradAB_v2`), 130 us for a (200704, 64)
/// cotangent against 46 us for our column sum, so the fused form was slower (MILA block forward+backward
/// 5.80 ms with it).
pub(super) fn weight_bias_grads(
    a: &Tensor,
    g: &Tensor,
    k: usize,
    n: usize,
    has_bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let rows = a.numel() / k.max(1);
    // dW = g^T a over the stacked rows, formed in W's own orientation (n, k): contiguous, so the leaf takes it
    // as it is. (Formed as (a^T g)^T it was a transposed view, which the engine copied contiguous at every
    // weight: a small copy kernel per Linear a step on CUDA.)
    let dw = super::matmul_nd(&t(&reshape_usize(g, &[rows, n])?)?, &reshape_usize(a, &[rows, k])?)?;
    let db = has_bias.then(|| sum_to_shape(g, &[n])).transpose()?;
    Ok((dw, db))
}

/// Checks `linear`'s and `act_linear`'s operands: W (n, k), x (..., k) of rank `min_rank` or more, b (n).
/// Returns (n, k).
pub(super) fn check_operands(
    op: &'static str,
    x: &Tensor,
    min_rank: usize,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(usize, usize)> {
    same_dtype_device(op, x, weight)?;
    if let Some(b) = bias {
        same_dtype_device(op, x, b)?;
    }
    let (n, k) = match *weight.shape() {
        [n, k] => (n, k),
        _ => return Err(Error::invalid(op, "weight must be (out, in)", weight.shape())),
    };
    if x.rank() < min_rank || x.dim(-1)? != k {
        return Err(Error::ShapeMismatch { op, lhs: x.shape().to_vec(), rhs: weight.shape().to_vec() });
    }
    if let Some(b) = bias.filter(|b| b.shape() != [n]) {
        return Err(Error::ShapeMismatch { op, lhs: weight.shape().to_vec(), rhs: b.shape().to_vec() });
    }
    Ok((n, k))
}

/// The recorded Linear layer, and with `relu_out` a Linear followed by a ReLU (`linear_relu`), which saves
/// its output for the ReLU's backward.
struct Linear {
    x: Tensor,
    w: Tensor,
    has_bias: bool,
    /// `linear_relu`'s output max(x W^T + b, 0): its positive entries are where the ReLU passed the gradient.
    relu_out: Option<Tensor>,
}

impl Op for Linear {
    fn name(&self) -> &'static str {
        if self.relu_out.is_some() {
            "linear_relu"
        } else {
            "linear"
        }
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (&self.x, &self.w);
        // After a ReLU, its backward from the output first (relu'(y) = relu'(x W^T + b): y > 0 exactly where
        // its input is), as the composition's ReLU node would.
        let relu_grad = self.relu_out.as_ref().map(|y| unary_grad(Unary::Relu, y, y, g, y.shape())).transpose()?;
        let g = relu_grad.as_ref().unwrap_or(g);
        let (k, n) = (w.dim(1)?, w.dim(0)?);
        let (dw, db) = weight_bias_grads(x, g, k, n, self.has_bias)?;
        // dx = g W: the composition's matmul(g, t(t(W))), whose right operand has W's own layout.
        let dx = matmul(g, w)?;
        let mut grads = vec![Some(dx), Some(dw)];
        if self.has_bias {
            grads.push(db);
        }
        Ok(grads)
    }
}

/// `x @ weight^T + bias` for x (..., in) of rank 1 or more, weight (out, in), bias (out): a Linear layer as
/// one recorded op, bitwise the composition on the CPU and one fused cuBLASLt product on CUDA (module docs).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    recorded("linear", x, weight, bias, false)
}

/// `max(x @ weight^T + bias, 0)`: a Linear layer followed by a ReLU as one recorded op (the patch merging's
/// expanding 1x1 conv). On CUDA with a bias the ReLU rides in the product's cuBLASLt epilogue (RELU_BIAS), so
/// the pre-activation is never written; on the CPU it is bitwise `linear(x, ..).relu()`, forward and backward.
/// Saves x and the output.
pub fn linear_relu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    recorded("linear_relu", x, weight, bias, true)
}

fn recorded(op: &'static str, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    check_operands(op, x, 1, weight, bias)?;
    let y = no_grad(|| affine_act(x, weight, bias, relu))?;
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    if !engine::is_grad_enabled() || !inputs.iter().any(|t| t.requires_grad()) {
        return Ok(y);
    }
    // The saved x must be contiguous for the row reshapes of the backward (a Linear's input usually is).
    let saved = Linear {
        x: x.detach().contiguous()?,
        w: weight.detach(),
        has_bias: bias.is_some(),
        relu_out: relu.then(|| y.detach()),
    };
    Ok(Tensor::from_op_over(&y, &inputs, || saved))
}
