//! The linear attention core composed from the primitive ops, as `LinearAttention::forward` computed it before
//! the fused op: the reference its tests compare with, and the path for odd head widths.

use engine::{Error, Result, Tensor};

use crate::TensorOps;

/// [`super::linear_attention`] composed from narrow, elu, rope2d, reshape/permute, mean, matmul and the
/// scalar ops; differentiable through them. Head widths may be odd here (RoPE rotates before the head split).
pub fn linear_attention_ref(
    qk: &Tensor,
    v: &Tensor,
    (h, w): (usize, usize),
    heads: usize,
    rope_base: f64,
    z_eps: f64,
) -> Result<Tensor> {
    const OP: &str = "linear_attention_ref";
    let &[b, n, c] = v.shape() else {
        return Err(Error::invalid(OP, "expected v (B, N, C)", v.shape()));
    };
    if heads == 0 || !c.is_multiple_of(heads) || qk.shape() != [b, n, 2 * c] {
        return Err(Error::invalid(
            OP,
            format!("qk (B, N, 2C) and {heads} heads dividing C for v {:?}", v.shape()),
            qk.shape(),
        ));
    }
    let d = c / heads;
    let q = qk.narrow(2, 0, c)?.elu(1.0)?.add_scalar(1.0)?;
    let k = qk.narrow(2, c, c)?.elu(1.0)?.add_scalar(1.0)?;
    // RoPE over the whole C-channel vector, before the heads are split.
    let q_rope = q.rope2d(h, w, rope_base)?;
    let k_rope = k.rope2d(h, w, rope_base)?;
    // (B, N, C) -> (B, h, N, d)
    let heads_of =
        |t: &Tensor| t.reshape(&[b as isize, n as isize, heads as isize, d as isize])?.permute(&[0, 2, 1, 3]);
    let (q, k, v) = (heads_of(&q)?, heads_of(&k)?, heads_of(v)?);
    let (q_rope, k_rope) = (heads_of(&q_rope)?, heads_of(&k_rope)?);
    // The normaliser uses q and k before RoPE: rotated kernels are no longer positive, so their dot product
    // could vanish or change sign. (B, h, N, d) @ (B, h, d, 1) -> (B, h, N, 1)
    let z = q.matmul(&k.mean(&[-2], true)?.transpose(-2, -1)?)?.add_scalar(z_eps)?.powf(-1.0)?;
    // Both factors are scaled by 1/sqrt(N) (not one by 1/N), as the official code does: the sum over N tokens
    // stays O(1) in either factor, which keeps f32/f16 partial sums in range.
    let scale = (n as f64).powf(-0.5);
    let kv = k_rope.transpose(-2, -1)?.mul_scalar(scale)?.matmul(&v.mul_scalar(scale)?)?; // (B, h, d, d)
                                                                                          // (B, h, N, d) -> (B, N, h, d) -> (B, N, C)
    q_rope.matmul(&kv)?.mul(&z)?.transpose(1, 2)?.reshape(&[b as isize, n as isize, c as isize])
}
