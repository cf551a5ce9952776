//! The tape: topological order, accumulation, no_grad, detach, retained and freed graphs, errors.

use engine::{no_grad, DType, Device, Error, Generator, Tensor};
use ops::TensorOps;

fn leaf(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape).unwrap().requires_grad_(true).unwrap()
}

#[test]
fn a_tensor_used_twice_gets_the_sum_of_its_gradients() {
    // y = x * x + 3 x  =>  dy/dx = 2x + 3
    let x = leaf(&[1.0, -2.0, 0.5], &[3]);
    let y = x.mul(&x).unwrap().add(&x.mul_scalar(3.0).unwrap()).unwrap().sum_all().unwrap();
    y.backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f64().unwrap(), vec![5.0, -1.0, 4.0]);
}

#[test]
fn diamond_graphs_visit_each_node_once() {
    // a -> b, c -> d = b * c, with b = exp(a), c = sin-free: c = a^2. dd/da = e^a a^2 + e^a 2a.
    let a = leaf(&[0.3, -0.7], &[2]);
    let b = a.exp().unwrap();
    let c = a.powf(2.0).unwrap();
    b.mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
    let got = a.grad().unwrap().to_vec_f64().unwrap();
    for (g, x) in got.iter().zip([0.3f64, -0.7]) {
        let want = x.exp() * x * x + x.exp() * 2.0 * x;
        assert!((g - want).abs() < 1e-15, "{g} vs {want}");
    }
}

#[test]
fn gradients_accumulate_across_backward_calls_until_zeroed() {
    let x = leaf(&[2.0], &[1]);
    for _ in 0..3 {
        x.mul_scalar(4.0).unwrap().sum_all().unwrap().backward().unwrap();
    }
    assert_eq!(x.grad().unwrap().to_vec_f64().unwrap(), vec![12.0]);
    x.zero_grad();
    assert!(x.grad().is_none());
}

#[test]
fn backward_with_takes_a_cotangent() {
    let x = leaf(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let y = x.mul_scalar(2.0).unwrap();
    let g = Tensor::from_vec(vec![1.0, 0.0, -1.0, 0.5], &[2, 2]).unwrap();
    y.backward_with(&g).unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f64().unwrap(), vec![2.0, 0.0, -2.0, 1.0]);
    let bad = Tensor::from_vec(vec![1.0; 3], &[3]).unwrap();
    assert!(matches!(x.mul_scalar(2.0).unwrap().backward_with(&bad), Err(Error::ShapeMismatch { .. })));
}

#[test]
fn no_grad_records_nothing_and_detach_cuts_the_graph() {
    let x = leaf(&[1.0, 2.0], &[2]);
    let y = no_grad(|| x.exp().unwrap());
    assert!(!y.requires_grad() && y.grad_fn().is_none());
    assert!(matches!(y.sum_all().unwrap().backward(), Err(Error::NoGraph)));
    let d = x.exp().unwrap().detach();
    assert!(d.is_leaf() && !d.requires_grad());
    // The detached branch contributes nothing: d(x + detach(x)^2)/dx = 1.
    x.add(&x.detach().powf(2.0).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f64().unwrap(), vec![1.0, 1.0]);
    assert!(engine::is_grad_enabled());
}

#[test]
fn saved_tensors_are_freed_after_backward_unless_retained() {
    let x = leaf(&[1.0, 2.0], &[2]);
    let y = x.exp().unwrap().sum_all().unwrap();
    let one = Tensor::ones(&[], DType::F64, Device::Cpu).unwrap();
    y.backward_retain(&one).unwrap();
    y.backward().unwrap(); // the retained graph runs again, then is freed
    let e: Vec<f64> = [1.0f64, 2.0].iter().map(|v| 2.0 * v.exp()).collect();
    assert_eq!(x.grad().unwrap().to_vec_f64().unwrap(), e);
    assert!(matches!(y.backward(), Err(Error::GraphFreed { op: "sum" })));
}

#[test]
fn intermediate_gradients_on_request() {
    let x = leaf(&[1.0, -1.0], &[2]);
    let h = x.mul_scalar(3.0).unwrap();
    h.retain_grad();
    let other = x.mul_scalar(5.0).unwrap();
    h.tanh().unwrap().sum_all().unwrap().backward().unwrap();
    let hv = [3.0f64, -3.0];
    let want: Vec<f64> = hv.iter().map(|v| 1.0 - v.tanh().powi(2)).collect();
    assert_eq!(h.grad().unwrap().to_vec_f64().unwrap(), want);
    assert!(other.grad().is_none());
}

#[test]
fn backward_needs_a_scalar_and_a_graph() {
    let x = leaf(&[1.0, 2.0], &[2]);
    assert!(matches!(x.exp().unwrap().backward(), Err(Error::NotScalar { .. })));
    let c = Tensor::from_vec(vec![1.0f64], &[1]).unwrap();
    assert!(matches!(c.backward(), Err(Error::NoGraph)));
}

#[test]
fn deep_graphs_do_not_overflow_the_stack() {
    let x = leaf(&[0.5], &[1]);
    let mut y = x.clone();
    for _ in 0..50_000 {
        y = y.add_scalar(1e-6).unwrap();
    }
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f64().unwrap(), vec![1.0]);
}

#[test]
fn cast_and_contiguous_pass_gradients_through() {
    let mut g = Generator::new(3);
    let x = Tensor::randn(&[3, 4], 0.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap().requires_grad_(true).unwrap();
    let y = x.t().unwrap().contiguous().unwrap().to_dtype(DType::F64).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    y.mul_scalar(2.0).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = x.grad().unwrap();
    assert_eq!(gx.dtype(), DType::F32);
    assert_eq!(gx.to_vec::<f32>().unwrap(), vec![2.0; 12]);
}

#[test]
fn cuda_tensors_without_a_device_are_errors() {
    if engine::cuda::is_available() {
        return; // covered by the CUDA tests
    }
    let r = Tensor::zeros(&[2, 3], DType::F32, Device::Cuda(0));
    assert!(matches!(r, Err(Error::CudaUnavailable { .. })), "{r:?}");
}
