//! Derived ops: compositions of the primitives, with no backward code of their own (their gradient is the
//! chain rule through the primitives they call).

use engine::{Error, Result, Tensor};

use crate::elementwise::{div_scalar, exp, log, mul, mul_scalar, neg, powf, sub};
use crate::reduce::{max, sum};
use crate::util::resolve_dims;

/// Number of elements reduced by `dims` (all dims when empty).
fn reduced_count(op: &'static str, x: &Tensor, dims: &[isize]) -> Result<usize> {
    Ok(resolve_dims(op, dims, x.shape())?.iter().map(|&d| x.shape()[d]).product())
}

/// Mean over `dims` (all dims when empty).
pub fn mean(x: &Tensor, dims: &[isize], keepdim: bool) -> Result<Tensor> {
    let n = reduced_count("mean", x, dims)?;
    div_scalar(&sum(x, dims, keepdim)?, n as f64)
}

/// Variance over `dims` with Bessel's `correction` (1: unbiased, as `torch.var`'s default; 0: biased).
pub fn var(x: &Tensor, dims: &[isize], correction: usize, keepdim: bool) -> Result<Tensor> {
    let n = reduced_count("var", x, dims)?;
    if n <= correction {
        return Err(Error::invalid("var", format!("{n} elements with correction {correction}"), x.shape()));
    }
    let centered = sub(x, &mean(x, dims, true)?)?;
    div_scalar(&sum(&powf(&centered, 2.0)?, dims, keepdim)?, (n - correction) as f64)
}

/// Min over `dims`, as -max(-x).
pub fn min(x: &Tensor, dims: &[isize], keepdim: bool) -> Result<Tensor> {
    neg(&max(&neg(x)?, dims, keepdim)?)
}

/// log(softmax(x)) along `dim`, computed as x - m - log(sum(exp(x - m))) with m the (detached) max, so
/// exp never overflows. m is a constant shift: its gradient would cancel exactly, so it is not tracked.
pub fn log_softmax(x: &Tensor, dim: isize) -> Result<Tensor> {
    let m = engine::no_grad(|| max(x, &[dim], true))?;
    let shifted = sub(x, &m)?;
    let lse = log(&sum(&exp(&shifted)?, &[dim], true)?)?;
    sub(&shifted, &lse)
}

/// softmax along `dim`: exp(x - m) / sum(exp(x - m)).
pub fn softmax(x: &Tensor, dim: isize) -> Result<Tensor> {
    let m = engine::no_grad(|| max(x, &[dim], true))?;
    let e = exp(&sub(x, &m)?)?;
    crate::elementwise::div(&e, &sum(&e, &[dim], true)?)
}

/// Mean cross-entropy of `logits` (N, C) against class indices `targets` (N), with label smoothing `eps`
/// as in `torch.nn.functional.cross_entropy`: the target distribution is (1 - eps) one-hot + eps / C.
pub fn cross_entropy(logits: &Tensor, targets: &[usize], label_smoothing: f64) -> Result<Tensor> {
    let (n, c) = match logits.shape() {
        &[n, c] => (n, c),
        s => return Err(Error::invalid("cross_entropy", "logits must be (N, C)", s)),
    };
    if targets.len() != n {
        return Err(Error::invalid(
            "cross_entropy",
            format!("{} targets for {n} rows of logits", targets.len()),
            logits.shape(),
        ));
    }
    // Target distribution q, built on the host (N x C values, errors naming the logits' shape, which is
    // (targets, classes) here) and moved to the logits' device once.
    let q = smoothed_targets(targets, c, label_smoothing)?;
    let q = Tensor::from_f64(&q, &[n, c], logits.dtype(), logits.device())?;
    cross_entropy_soft(logits, &q)
}

/// The target distribution of [`cross_entropy`] for class indices `targets` among `classes`, row-major
/// (N x C): (1 - eps) one-hot + eps / C. For a step captured into a CUDA graph, which cannot upload it
/// itself: written into a device tensor before each replay and passed to [`cross_entropy_soft`], it gives
/// the same loss, bit for bit, as `cross_entropy(logits, targets, eps)`.
pub fn smoothed_targets(targets: &[usize], classes: usize, label_smoothing: f64) -> Result<Vec<f64>> {
    let shape = [targets.len(), classes];
    if let Some(&t) = targets.iter().find(|&&t| t >= classes) {
        return Err(Error::invalid(
            "cross_entropy",
            format!("target class {t} out of range for {classes} classes"),
            &shape,
        ));
    }
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::invalid(
            "cross_entropy",
            format!("label smoothing {label_smoothing} not in [0, 1]"),
            &shape,
        ));
    }
    let mut q = vec![label_smoothing / classes as f64; targets.len() * classes];
    for (row, &t) in targets.iter().enumerate() {
        q[row * classes + t] += 1.0 - label_smoothing;
    }
    Ok(q)
}

/// Mean cross-entropy of `logits` (N, C) against a target distribution `q` (N, C) already on the logits'
/// device: -sum(q * log_softmax(logits)) / N. [`cross_entropy`] is this with q from [`smoothed_targets`].
pub fn cross_entropy_soft(logits: &Tensor, q: &Tensor) -> Result<Tensor> {
    let n = match logits.shape() {
        &[n, _] => n,
        s => return Err(Error::invalid("cross_entropy", "logits must be (N, C)", s)),
    };
    if q.shape() != logits.shape() {
        return Err(Error::ShapeMismatch {
            op: "cross_entropy",
            lhs: logits.shape().to_vec(),
            rhs: q.shape().to_vec(),
        });
    }
    let logp = log_softmax(logits, -1)?;
    mul_scalar(&sum(&mul(q, &logp)?, &[], false)?, -1.0 / n.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use engine::gradcheck;

    use super::*;
    use crate::testing::*;
    use crate::view::permute;

    #[test]
    fn values_match_direct_formulas() {
        let x = randn(&[3, 5], 1);
        let xv = x.to_vec_f64().unwrap();
        let sm = softmax(&x, 1).unwrap().to_vec_f64().unwrap();
        let lsm = log_softmax(&x, -1).unwrap().to_vec_f64().unwrap();
        for r in 0..3 {
            let row = &xv[r * 5..r * 5 + 5];
            let z: f64 = row.iter().map(|v| v.exp()).sum();
            for j in 0..5 {
                assert!((sm[r * 5 + j] - row[j].exp() / z).abs() < 1e-15);
                assert!((lsm[r * 5 + j] - (row[j] - z.ln())).abs() < 1e-14);
            }
        }
        let v = var(&x, &[1], 1, false).unwrap().to_vec_f64().unwrap();
        let m: f64 = xv[..5].iter().sum::<f64>() / 5.0;
        let want = xv[..5].iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 4.0;
        assert!((v[0] - want).abs() < 1e-14);
        assert_eq!(min(&x, &[], false).unwrap().to_scalar().unwrap(), xv.iter().cloned().fold(f64::MAX, f64::min));
    }

    #[test]
    fn softmax_is_stable_for_large_logits() {
        let x = Tensor::from_vec(vec![1000.0f32, 1001.0, -1000.0], &[1, 3]).unwrap();
        let y = softmax(&x, -1).unwrap().to_vec::<f32>().unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        assert!((y[1] - 0.7310586).abs() < 1e-6);
    }

    #[test]
    fn cross_entropy_soft_with_smoothed_targets_is_cross_entropy_bitwise() {
        let x = randn(&[4, 5], 7);
        let targets = [2, 0, 4, 4];
        for eps in [0.0, 0.1] {
            let want = cross_entropy(&x, &targets, eps).unwrap().to_scalar().unwrap();
            let q = smoothed_targets(&targets, 5, eps).unwrap();
            let q = Tensor::from_f64(&q, &[4, 5], x.dtype(), x.device()).unwrap();
            let got = cross_entropy_soft(&x, &q).unwrap().to_scalar().unwrap();
            assert_eq!(got.to_bits(), want.to_bits(), "eps {eps}");
        }
        assert!(smoothed_targets(&[5], 5, 0.0).is_err());
        assert!(smoothed_targets(&[1], 5, 1.5).is_err());
        let q = Tensor::zeros(&[4, 4], x.dtype(), x.device()).unwrap();
        assert!(cross_entropy_soft(&x, &q).is_err());
    }

    #[test]
    fn cross_entropy_matches_the_smoothing_formula() {
        // With smoothing eps, PyTorch's loss per row is (1 - eps) * nll + eps * mean_c(-log p_c).
        let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 1.0, -1.0, 0.0], &[2, 3]).unwrap();
        let rows: [(&[f64], usize); 2] = [(&[1.0, 2.0, 3.0], 2), (&[1.0, -1.0, 0.0], 0)];
        let neg_logp = |r: &[f64], j: usize| r.iter().map(|v| v.exp()).sum::<f64>().ln() - r[j];
        for eps in [0.0, 0.1] {
            let got = cross_entropy(&x, &[2, 0], eps).unwrap().to_scalar().unwrap();
            let want = rows
                .iter()
                .map(|&(r, t)| (1.0 - eps) * neg_logp(r, t) + eps * (0..3).map(|j| neg_logp(r, j)).sum::<f64>() / 3.0)
                .sum::<f64>()
                / 2.0;
            assert!((got - want).abs() < 1e-15, "eps {eps}: {got} vs {want}");
        }
    }

    #[test]
    fn derived_gradients_match_finite_differences() {
        let x = randn(&[4, 6], 2);
        let cases: Vec<Case> = vec![
            ("mean", Box::new(|x| mean(&x[0], &[0], false))),
            ("var", Box::new(|x| var(&permute(&x[0], &[1, 0])?, &[-1], 1, true))),
            ("min", Box::new(|x| min(&x[0], &[1], false))),
            ("softmax", Box::new(|x| softmax(&x[0], 1))),
            ("log_softmax(dim 0)", Box::new(|x| log_softmax(&x[0], 0))),
            ("cross_entropy", Box::new(|x| cross_entropy(&x[0], &[0, 5, 2, 2], 0.1))),
        ];
        for (name, f) in cases {
            let r = gradcheck(name, std::slice::from_ref(&x), f).unwrap();
            assert!(r.passed(), "{r}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = randn(&[2, 3], 3);
        assert!(cross_entropy(&x, &[0], 0.0).is_err());
        assert!(cross_entropy(&x, &[0, 3], 0.0).is_err());
        assert!(cross_entropy(&x, &[0, 1], 1.5).is_err());
        assert!(cross_entropy(&randn(&[6], 4), &[0], 0.0).is_err());
        assert!(var(&randn(&[1], 5), &[], 1, false).is_err());
        assert!(softmax(&x, 2).is_err());
    }
}
