//! Matrix product with NumPy broadcasting of batch dims, as `torch.matmul`.
//!
//! | case | shapes | forward | backward (g = dL/dC) |
//! | --- | --- | --- | --- |
//! | 2-D | (m, k) @ (k, n) -> (m, n) | C[i, j] = sum_p A[i, p] B[p, j] | dA = g B^T, dB = A^T g |
//! | batched | (..a, m, k) @ (..b, k, n) -> (..c, m, n), ..c = broadcast(..a, ..b) | one 2-D product per batch index | as 2-D per batch, then summed over the batch dims each input was broadcast along |
//! | vector @ matrix | (k) @ (..b, k, n) -> (..b, n) | A viewed as (1, k), the 1 removed after | through the views |
//! | matrix @ vector | (..a, m, k) @ (k) -> (..a, m) | B viewed as (k, 1), the 1 removed after | through the views |
//! | dot | (k) @ (k) -> () | sum_p A[p] B[p] | through the views |
//!
//! Broadcast batch dims are stride-0 views and transposed or sliced inputs are passed to the kernel with their
//! own strides: on the CPU the forward never copies an input. cuBLAS (cuda.rs) needs a unit stride in one of
//! the two matrix dims and batch dims it can step through with one stride, and copies an operand only when
//! it has neither. The backward is two more matmuls over transposed views (`t`) followed by `sum_to_shape`;
//! each runs only for an input that requires grad.

mod act_linear;
pub(crate) mod cpu;
mod cuda;
mod gated_linear;
mod linear;
mod norm_linear;
mod reference;

pub use act_linear::act_linear;
pub use gated_linear::gated_linear;
pub use linear::{linear, linear_relu};
pub use norm_linear::layer_norm_linears;
pub use reference::matmul_ref;

use engine::{Error, Layout, Op, Result, Storage, Tensor};

use crate::reduce::sum_to_shape;
use crate::util::same_dtype_device;
use crate::view::{reshape_usize, t, unsqueeze};

/// Sizes of a batched product of rank-2+ operands, after broadcasting.
pub(crate) struct Plan {
    /// Broadcast batch dims (empty for a plain 2-D product).
    pub batch: Vec<usize>,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Plan {
    /// `lhs` and `rhs` are the shapes the caller gave, for the error messages.
    fn new(a: &[usize], b: &[usize], lhs: &[usize], rhs: &[usize]) -> Result<Plan> {
        let (ra, rb) = (a.len(), b.len());
        let (m, k) = (a[ra - 2], a[ra - 1]);
        let (kb, n) = (b[rb - 2], b[rb - 1]);
        if k != kb {
            return Err(Error::ShapeMismatch { op: "matmul", lhs: lhs.to_vec(), rhs: rhs.to_vec() });
        }
        let batch = engine::broadcast_shape("matmul", &a[..ra - 2], &b[..rb - 2]).map_err(|_| Error::Broadcast {
            op: "matmul",
            lhs: lhs.to_vec(),
            rhs: rhs.to_vec(),
        })?;
        Ok(Plan { batch, m, k, n })
    }

    fn out_shape(&self) -> Vec<usize> {
        let mut s = self.batch.clone();
        s.extend([self.m, self.n]);
        s
    }

    /// `x`'s layout broadcast to the full batch, its last two dims `rows` x `cols` unchanged.
    fn expand(&self, x: &Tensor, rows: usize, cols: usize) -> Result<Layout> {
        let mut shape = self.batch.clone();
        shape.extend([rows, cols]);
        x.layout().broadcast_as(&shape)
    }
}

struct Matmul {
    /// A, kept only when B needs its gradient (dB = A^T g).
    a: Option<Tensor>,
    /// B, kept only when A needs its gradient (dA = g B^T).
    b: Option<Tensor>,
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
}

impl Op for Matmul {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        // g: (..c, m, n). Each product below comes out with the full batch ..c and is summed back down to the
        // input's own batch dims, which undoes the broadcast.
        let da = match &self.b {
            Some(b) => Some(sum_to_shape(&matmul_nd(g, &t(b)?)?, &self.a_shape)?), // (..c, m, k)
            None => None,
        };
        let db = match &self.a {
            Some(a) if self.b_shape.len() == 2 && a.rank() > 2 => {
                // B was shared by every batch (a Linear layer's weight): the sum over the batch of A_i^T g_i is
                // one product of the stacked rows, A^T g with A (batches m, k) and g (batches m, n), instead of
                // a (..c, k, n) stack of products summed afterwards (on CUDA: one long-K GEMM instead of a
                // batched GEMM of small products, its (..c, k, n) buffer and a reduction).
                let (k, n) = (a.dim(-1)?, g.dim(-1)?);
                let rows = a.shape()[..a.rank() - 1].iter().product();
                let (a2, g2) = (reshape_usize(a, &[rows, k])?, reshape_usize(g, &[rows, n])?);
                Some(matmul_nd(&t(&a2)?, &g2)?)
            }
            Some(a) => Some(sum_to_shape(&matmul_nd(&t(a)?, g)?, &self.b_shape)?), // (..c, k, n)
            None => None,
        };
        Ok(vec![da, db])
    }
}

/// The product of two operands of rank 2 or more: the recorded op.
fn matmul_nd(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_checked(a, b, a.shape(), b.shape())
}

fn matmul_checked(a: &Tensor, b: &Tensor, lhs: &[usize], rhs: &[usize]) -> Result<Tensor> {
    let plan = Plan::new(a.shape(), b.shape(), lhs, rhs)?;
    let la = plan.expand(a, plan.m, plan.k)?;
    let lb = plan.expand(b, plan.k, plan.n)?;
    let storage = match (&*a.storage(), &*b.storage()) {
        (Storage::Cpu(sa), Storage::Cpu(sb)) => Storage::Cpu(cpu::matmul(sa, &la, sb, &lb, &plan)?),
        (Storage::Cuda(sa), Storage::Cuda(sb)) => Storage::Cuda(cuda::matmul(sa, &la, sb, &lb, &plan)?),
        (sa, sb) => return Err(Error::DeviceMismatch { op: "matmul", lhs: sa.device(), rhs: sb.device() }),
    };
    Ok(Tensor::from_op(storage, &plan.out_shape(), &[a, b], || Matmul {
        a: b.requires_grad().then(|| a.detach()),
        b: a.requires_grad().then(|| b.detach()),
        a_shape: a.shape().to_vec(),
        b_shape: b.shape().to_vec(),
    }))
}

/// `torch.matmul`: the product over the last two dims with broadcast batch dims; a 1-D operand is a row
/// (left) or column (right) vector whose unit dim is dropped from the result.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_dtype_device("matmul", a, b)?;
    if a.rank() == 0 || b.rank() == 0 {
        let msg = format!("both operands need at least 1 dim, got {:?} and {:?}", a.shape(), b.shape());
        return Err(Error::invalid("matmul", msg, if a.rank() == 0 { a.shape() } else { b.shape() }));
    }
    // Promote vectors to matrices with views, so their gradients flow back through the same views.
    let a2 = if a.rank() == 1 { unsqueeze(a, 0)? } else { a.clone() };
    let b2 = if b.rank() == 1 { unsqueeze(b, 1)? } else { b.clone() };
    let c = matmul_checked(&a2, &b2, a.shape(), b.shape())?;
    if a.rank() > 1 && b.rank() > 1 {
        return Ok(c);
    }
    let mut shape = c.shape().to_vec();
    let r = shape.len();
    if b.rank() == 1 {
        shape.remove(r - 1);
    }
    if a.rank() == 1 {
        shape.remove(r - 2);
    }
    reshape_usize(&c, &shape)
}

#[cfg(test)]
pub(crate) mod tests;
