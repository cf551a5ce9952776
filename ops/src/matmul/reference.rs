//! The slow reference for [`super::matmul`]: a triple loop per batch index in f64, with the shape rules of
//! `torch.matmul` written out again independently of the fast path, so the tests compare two implementations.

use engine::{Error, Result, Tensor};

/// `torch.matmul` by explicit loops, accumulated in f64 and returned in the inputs' dtype, untracked.
pub fn matmul_ref(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    crate::util::same_dtype_device("matmul_ref", a, b)?;
    let err = || Error::ShapeMismatch { op: "matmul_ref", lhs: a.shape().to_vec(), rhs: b.shape().to_vec() };
    if a.rank() == 0 || b.rank() == 0 {
        return Err(err());
    }
    // A vector is a (1, k) row on the left and a (k, 1) column on the right.
    let sa: Vec<usize> = if a.rank() == 1 { vec![1, a.shape()[0]] } else { a.shape().to_vec() };
    let sb: Vec<usize> = if b.rank() == 1 { vec![b.shape()[0], 1] } else { b.shape().to_vec() };
    let (m, k, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 1]);
    if sb[sb.len() - 2] != k {
        return Err(err());
    }
    // Batch dims, right-aligned and padded with 1s to a common rank.
    let rank = sa.len().max(sb.len()) - 2;
    let pad = |s: &[usize]| -> Vec<usize> {
        let own = &s[..s.len() - 2];
        std::iter::repeat_n(1, rank - own.len()).chain(own.iter().copied()).collect()
    };
    let (ba, bb) = (pad(&sa), pad(&sb));
    let mut batch = Vec::with_capacity(rank);
    for (&x, &y) in ba.iter().zip(&bb) {
        batch.push(match (x, y) {
            _ if x == y => x,
            (1, _) => y,
            (_, 1) => x,
            _ => return Err(err()),
        });
    }
    let (av, bv) = (a.to_vec_f64()?, b.to_vec_f64()?);
    let batches: usize = batch.iter().product();
    let mut out = vec![0.0; batches * m * n];
    for bi in 0..batches {
        // Unravel bi over `batch`; an operand's index on a dim where it has size 1 is 0.
        let (mut rest, mut ia, mut ib, mut stride_a, mut stride_b) = (bi, 0, 0, 1, 1);
        for d in (0..rank).rev() {
            let i = rest % batch[d];
            rest /= batch[d];
            ia += if ba[d] == 1 { 0 } else { i } * stride_a;
            ib += if bb[d] == 1 { 0 } else { i } * stride_b;
            stride_a *= ba[d];
            stride_b *= bb[d];
        }
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for p in 0..k {
                    acc += av[(ia * m + i) * k + p] * bv[(ib * k + p) * n + j];
                }
                out[(bi * m + i) * n + j] = acc;
            }
        }
    }
    let mut shape = batch;
    if a.rank() > 1 {
        shape.push(m);
    }
    if b.rank() > 1 {
        shape.push(n);
    }
    Tensor::from_f64(&out, &shape, a.dtype(), a.device())
}
