//! Finite-difference gradient checking.
//!
//! For a function f of some tensors, pick a random cotangent g and let L(x) = sum(g * f(x)). The analytic
//! gradient dL/dx comes from `backward_with(g)`; the numeric one from central differences,
//! (L(x + h e_j) - L(x - h e_j)) / 2h for every element j of every input, all in f64. The report names the
//! element where the two disagree most.
//!
//! An element passes when |numeric - analytic| <= atol + rtol * max(|numeric|, |analytic|). Inputs are
//! turned into fresh f64 leaves on their device; to check an op on non-contiguous inputs, make the view
//! inside `f` (e.g. `|x| op(&x[0].permute(&[1, 0])?)`).

use std::fmt;

use crate::{no_grad, DType, Error, Generator, Result, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct GradcheckOptions {
    /// Finite-difference step.
    pub eps: f64,
    pub rtol: f64,
    pub atol: f64,
    /// Seed of the random cotangent.
    pub seed: u64,
}

impl Default for GradcheckOptions {
    fn default() -> Self {
        GradcheckOptions { eps: 1e-6, rtol: 1e-6, atol: 1e-9, seed: 0x5eed }
    }
}

#[derive(Debug, Clone)]
pub struct Worst {
    pub input: usize,
    /// Multi-index of the element within that input.
    pub index: Vec<usize>,
    pub numeric: f64,
    pub analytic: f64,
    /// |numeric - analytic| / max(|numeric|, |analytic|).
    pub rel_error: f64,
    /// |numeric - analytic| / (atol + rtol * max(|numeric|, |analytic|)): above 1 fails.
    pub ratio: f64,
}

#[derive(Debug, Clone)]
pub struct GradcheckReport {
    pub op: String,
    pub elements: usize,
    pub worst: Option<Worst>,
    /// The largest analytic gradient magnitude seen (a check of an all-zero gradient proves little).
    pub max_abs_grad: f64,
    pub options: GradcheckOptions,
}

impl GradcheckReport {
    pub fn passed(&self) -> bool {
        self.worst.as_ref().is_none_or(|w| w.ratio <= 1.0)
    }

    /// `Ok(self)` when passed, else an `Error::Gradcheck` carrying the report.
    pub fn ok(self) -> Result<Self> {
        if self.passed() {
            Ok(self)
        } else {
            Err(Error::Gradcheck(self.to_string()))
        }
    }
}

impl fmt::Display for GradcheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed() { "ok" } else { "FAIL" };
        write!(f, "gradcheck {}: {} elements, ", self.op, self.elements)?;
        match &self.worst {
            Some(w) => write!(
                f,
                "worst input {} index {:?}: numeric {:.12e} analytic {:.12e} (rel {:.2e}, {:.2}x tolerance): {verdict}",
                w.input, w.index, w.numeric, w.analytic, w.rel_error, w.ratio
            ),
            None => write!(f, "nothing to check: {verdict}"),
        }
    }
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d].max(1);
        i /= shape[d].max(1);
    }
    idx
}

/// Checks `f`'s gradients with respect to every input with default options.
pub fn gradcheck(op: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<GradcheckReport> {
    gradcheck_with(op, inputs, GradcheckOptions::default(), f)
}

pub fn gradcheck_with(
    op: &str,
    inputs: &[Tensor],
    opts: GradcheckOptions,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<GradcheckReport> {
    let values: Vec<Vec<f64>> = inputs.iter().map(|t| t.to_vec_f64()).collect::<Result<_>>()?;
    let leaf = |i: usize, v: &[f64]| Tensor::from_f64(v, inputs[i].shape(), DType::F64, inputs[i].device());

    // Analytic: one backward with a random cotangent.
    let leaves: Vec<Tensor> =
        (0..inputs.len()).map(|i| leaf(i, &values[i])?.requires_grad_(true)).collect::<Result<_>>()?;
    let y = f(&leaves)?;
    if y.dtype() != DType::F64 {
        return Err(Error::Gradcheck(format!("{op}: f must return f64 for f64 inputs, got {}", y.dtype())));
    }
    let g = Generator::new(opts.seed).normal_vec(y.numel(), 0.0, 1.0);
    let cot = Tensor::from_f64(&g, y.shape(), DType::F64, y.device())?;
    if y.requires_grad() {
        y.backward_with(&cot)?;
    }
    let loss = |xs: &[Tensor]| -> Result<f64> {
        let y = no_grad(|| f(xs))?;
        Ok(y.to_vec_f64()?.iter().zip(&g).map(|(a, b)| a * b).sum())
    };

    let mut report = GradcheckReport { op: op.to_string(), elements: 0, worst: None, max_abs_grad: 0.0, options: opts };
    for i in 0..inputs.len() {
        let analytic = match leaves[i].grad() {
            Some(t) => t.to_vec_f64()?,
            None => vec![0.0; values[i].len()],
        };
        let mut xs: Vec<Tensor> = (0..inputs.len()).map(|k| leaf(k, &values[k])).collect::<Result<_>>()?;
        for j in 0..values[i].len() {
            let mut v = values[i].clone();
            let h = opts.eps * values[i][j].abs().max(1.0);
            v[j] = values[i][j] + h;
            xs[i] = leaf(i, &v)?;
            let plus = loss(&xs)?;
            v[j] = values[i][j] - h;
            xs[i] = leaf(i, &v)?;
            let minus = loss(&xs)?;
            let numeric = (plus - minus) / (2.0 * h);
            let a = analytic[j];
            let diff = (numeric - a).abs();
            let scale = numeric.abs().max(a.abs());
            let ratio = diff / (opts.atol + opts.rtol * scale);
            report.elements += 1;
            report.max_abs_grad = report.max_abs_grad.max(a.abs());
            if report.worst.as_ref().is_none_or(|w| ratio > w.ratio) || ratio.is_nan() {
                report.worst = Some(Worst {
                    input: i,
                    index: unravel(j, inputs[i].shape()),
                    numeric,
                    analytic: a,
                    rel_error: if scale > 0.0 { diff / scale } else { 0.0 },
                    ratio: if ratio.is_nan() { f64::INFINITY } else { ratio },
                });
            }
        }
        xs[i] = leaf(i, &values[i])?;
    }
    Ok(report)
}
