//! `layer_norm_linears(x, ln, [(W_1, b_1), ...]) = [LN(x) W_1^T + b_1, ...]`: Linear layers that read a
//! LayerNorm's output (the MILA block's norm1 feeding `in_proj` and `act_proj`, norm2 feeding `mlp.fc1`),
//! recorded so that the normalised t = LN(x) is not kept for backward.
//!
//! Composed, the LayerNorm saves x (and its per-row mean and rstd) and each Linear saves t for its weight's
//! gradient: x and t alive until backward. Here the LayerNorm is recorded as usual, t feeds the Linears'
//! nodes for the gradient's path only, and those save x (the LayerNorm's own saved copy, no more memory) and
//! recompute t = LN(x) when their weight's gradient is needed, once for all of them:
//!
//! ```text
//! t   = LN(x)                          (a recorded layer_norm: saves x, mean, rstd)
//! y_i = t W_i^T + b_i
//! db_i = sum over rows of g_i
//! dW_i = g_i^T t                       (t recomputed from x, shared by the Linears of one call)
//! dt   = sum_i g_i W_i                 (accumulated by the tape on t, as for the composition)
//! ```
//!
//! The gradient of t reaches the LayerNorm's node exactly as in the composition, and the recomputed t is
//! the LayerNorm kernel's output for the same x again, so results and gradients are bitwise those of the
//! LayerNorm followed by the Linears (a test checks it). The recomputed t lives from the first Linear's
//! backward that reads it to the last; the backward costs one LayerNorm forward more.

use std::sync::{Arc, Mutex};

use engine::{no_grad, Error, Op, Result, Tensor};

use super::linear::{affine, weight_bias_grads};
use super::matmul_nd;
use crate::norm::layer_norm;
use crate::reduce::sum_to_shape;
use crate::util::same_dtype_device;

/// What recomputes t = LN(x) in backward, shared by the Linears of one call.
struct Normed {
    x: Tensor,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
    /// How many Linears read t in backward (those whose weight needs its gradient).
    readers: usize,
    /// t once recomputed, and how many readers have had it in this backward pass; dropped after the last.
    cache: Mutex<(Option<Tensor>, usize)>,
}

impl Normed {
    fn get(&self) -> Result<Tensor> {
        let mut guard = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (cached, served) = &mut *guard;
        let t = match cached {
            Some(t) => t.clone(),
            None => {
                let t = no_grad(|| layer_norm(&self.x, self.weight.as_ref(), self.bias.as_ref(), self.eps))?;
                *cached = Some(t.clone());
                t
            }
        };
        *served += 1;
        if *served >= self.readers {
            // The last reader of this pass: free t with it (a retained graph's next pass recomputes it).
            *cached = None;
            *served = 0;
        }
        Ok(t)
    }
}

struct NormLinear {
    normed: Arc<Normed>,
    w: Tensor,
    has_bias: bool,
    /// Whether the weight needs its gradient (and so t is read in backward).
    reads_t: bool,
}

impl Op for NormLinear {
    fn name(&self) -> &'static str {
        "norm_linear"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let w = &self.w;
        let (k, n) = (w.dim(1)?, w.dim(0)?);
        let (dw, db) = if self.reads_t {
            // dW = g^T t over the stacked rows and db (one cuBLASLt product on CUDA): as `linear`'s backward.
            let (dw, db) = weight_bias_grads(&self.normed.get()?, g, k, n, self.has_bias)?;
            (Some(dw), db)
        } else {
            (None, self.has_bias.then(|| sum_to_shape(g, &[n])).transpose()?)
        };
        let dt = matmul_nd(g, w)?;
        let mut grads = vec![Some(dt), dw];
        if self.has_bias {
            grads.push(db);
        }
        Ok(grads)
    }
}

/// `layer_norm(x, ln_weight, ln_bias, eps)` followed by Linear layers `(weight (n_i, d), bias (n_i))`, one
/// output (..., n_i) per Linear, without keeping the normalised x for backward (see the module docs). x is
/// (..., d) with at least two dims.
pub fn layer_norm_linears(
    x: &Tensor,
    ln_weight: Option<&Tensor>,
    ln_bias: Option<&Tensor>,
    eps: f64,
    linears: &[(&Tensor, Option<&Tensor>)],
) -> Result<Vec<Tensor>> {
    const OP: &str = "layer_norm_linears";
    if linears.is_empty() {
        return Err(Error::invalid(OP, "needs at least one Linear", x.shape()));
    }
    if x.rank() < 2 {
        return Err(Error::invalid(OP, "x must be (..., d) with at least two dims", x.shape()));
    }
    let d = x.dim(-1)?;
    for &(w, b) in linears {
        same_dtype_device(OP, x, w)?;
        let n = match *w.shape() {
            [n, k] if k == d => n,
            [_, _] => return Err(Error::ShapeMismatch { op: OP, lhs: x.shape().to_vec(), rhs: w.shape().to_vec() }),
            _ => return Err(Error::invalid(OP, "weight must be (out, in)", w.shape())),
        };
        if let Some(b) = b {
            same_dtype_device(OP, x, b)?;
            if b.shape() != [n] {
                return Err(Error::ShapeMismatch { op: OP, lhs: w.shape().to_vec(), rhs: b.shape().to_vec() });
            }
        }
    }
    // One contiguous x, saved by the LayerNorm and read again for the recompute (a copy only if x is not
    // contiguous, which the LayerNorm would make anyway).
    let x = x.contiguous()?;
    let normed = layer_norm(&x, ln_weight, ln_bias, eps)?;
    let shared = Arc::new(Normed {
        x: x.detach(),
        weight: ln_weight.map(Tensor::detach),
        bias: ln_bias.map(Tensor::detach),
        eps,
        readers: linears.iter().filter(|(w, _)| w.requires_grad()).count(),
        cache: Mutex::new((None, 0)),
    });
    linears
        .iter()
        .map(|&(w, b)| {
            let y = no_grad(|| affine(&normed, w, b))?;
            let mut inputs = vec![&normed, w];
            inputs.extend(b);
            Ok(Tensor::from_op_over(&y, &inputs, || NormLinear {
                normed: shared.clone(),
                w: w.detach(),
                has_bias: b.is_some(),
                reads_t: w.requires_grad(),
            }))
        })
        .collect()
}
