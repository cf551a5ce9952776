//! Helpers shared by the families' tests.

use engine::{DType, Device, Generator, Result, Tensor};

/// A named function of some tensors, for tables of gradient checks.
pub(crate) type Case = (&'static str, Box<dyn Fn(&[Tensor]) -> Result<Tensor>>);

pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, DType::F64, Device::Cpu, &mut Generator::new(seed)).unwrap()
}

pub(crate) fn rand(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    Tensor::rand(shape, lo, hi, DType::F64, Device::Cpu, &mut Generator::new(seed)).unwrap()
}

/// Normal(0, 1) values in `dtype`.
pub(crate) fn randn_as(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, dtype, Device::Cpu, &mut Generator::new(seed)).unwrap()
}

/// Asserts |got - want| <= tol * max(1, max |want|) elementwise: a tolerance relative to the tensor's scale,
/// so that one small element does not need an absurd relative precision.
pub(crate) fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * scale, "{what}: element {i}: got {a}, want {b} (tol {tol} x {scale})");
    }
}

/// The exact bits of a tensor's values (f32 widened to f64, which is exact), for bitwise comparisons that
/// also tell -0 from +0 and compare NaNs.
pub(crate) fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64().unwrap().into_iter().map(f64::to_bits).collect()
}
