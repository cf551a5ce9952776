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
