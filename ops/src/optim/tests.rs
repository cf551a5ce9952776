//! The CUDA updates against the CPU ones (skipped without a device): the same fresh random parameters,
//! state and gradients, three steps, every tensor written compared.

use engine::cuda::test_device_or_skip;
use engine::{DType, Device, Generator, Tensor};

use super::*;
use crate::matmul::tests::{cuda_tol, rel_error, to_cuda};

const SHAPE: &[usize] = &[3, 37];

/// A CPU tensor of `SHAPE` uniform in [lo, hi) and its copy on CUDA (separate storage: the steps are
/// in place).
fn pair(lo: f64, hi: f64, dtype: DType, g: &mut Generator) -> (Tensor, Tensor) {
    let cpu = Tensor::rand(SHAPE, lo, hi, dtype, Device::Cpu, g).unwrap();
    let gpu = to_cuda(&cpu);
    (cpu, gpu)
}

fn assert_same(what: &str, step: u64, gpu: &Tensor, cpu: &Tensor) {
    assert_eq!(gpu.device(), Device::Cuda(0));
    let err = rel_error(gpu, cpu);
    assert!(err <= cuda_tol(cpu.dtype()), "{what} ({}), step {step}: relative error {err:e}", cpu.dtype());
}

#[test]
fn cuda_sgd_matches_cpu_for_three_steps() {
    if test_device_or_skip("cuda_sgd_matches_cpu_for_three_steps").is_none() {
        return;
    }
    let plain = SgdStep { lr: 0.1, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0, first: true };
    let configs = [
        ("plain", plain),
        ("weight decay", SgdStep { weight_decay: 0.05, ..plain }),
        ("momentum, dampening", SgdStep { momentum: 0.9, dampening: 0.2, weight_decay: 0.01, ..plain }),
        ("nesterov", SgdStep { momentum: 0.8, nesterov: true, weight_decay: 0.01, ..plain }),
    ];
    for (what, h) in configs {
        for (seed, dtype) in [(1, DType::F32), (2, DType::F64)] {
            let mut g = Generator::new(seed);
            let (p, p_gpu) = pair(-1.0, 1.0, dtype, &mut g);
            let (buf, buf_gpu) = pair(-1.0, 1.0, dtype, &mut g);
            for step in 1..=3 {
                let (grad, grad_gpu) = pair(-1.0, 1.0, dtype, &mut g);
                let h = SgdStep { first: step == 1, ..h };
                sgd_step(&p, &grad, &buf, h).unwrap();
                sgd_step(&p_gpu, &grad_gpu, &buf_gpu, h).unwrap_or_else(|e| panic!("{what} on CUDA: {e}"));
                assert_same(what, step, &p_gpu, &p);
                assert_same(what, step, &buf_gpu, &buf);
            }
        }
    }
}

#[test]
fn cuda_adamw_matches_cpu_for_three_steps_with_and_without_vmax() {
    if test_device_or_skip("cuda_adamw_matches_cpu_for_three_steps_with_and_without_vmax").is_none() {
        return;
    }
    for amsgrad in [false, true] {
        let what = if amsgrad { "adamw with vmax" } else { "adamw" };
        for (seed, dtype) in [(3, DType::F32), (4, DType::F64)] {
            let mut g = Generator::new(seed);
            let (p, p_gpu) = pair(-1.0, 1.0, dtype, &mut g);
            let (m, m_gpu) = pair(-0.1, 0.1, dtype, &mut g);
            // Second moments are non-negative; vmax starts above some of v and below others.
            let (v, v_gpu) = pair(0.01, 0.02, dtype, &mut g);
            let (vmax, vmax_gpu) = pair(0.005, 0.025, dtype, &mut g);
            for step in 1..=3 {
                let (grad, grad_gpu) = pair(-1.0, 1.0, dtype, &mut g);
                let h = AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, amsgrad, step };
                adamw_step(&p, &grad, &m, &v, Some(&vmax), h).unwrap();
                adamw_step(&p_gpu, &grad_gpu, &m_gpu, &v_gpu, Some(&vmax_gpu), h)
                    .unwrap_or_else(|e| panic!("{what} on CUDA: {e}"));
                for (name, gpu, cpu) in
                    [("p", &p_gpu, &p), ("m", &m_gpu, &m), ("v", &v_gpu, &v), ("vmax", &vmax_gpu, &vmax)]
                {
                    assert_same(&format!("{what}: {name}"), step, gpu, cpu);
                }
            }
        }
    }
}

#[test]
fn cuda_scale_and_sum_squares_match_cpu() {
    if test_device_or_skip("cuda_scale_and_sum_squares_match_cpu").is_none() {
        return;
    }
    for (seed, dtype) in [(5, DType::F32), (6, DType::F64)] {
        let mut g = Generator::new(seed);
        let (x, x_gpu) = pair(-2.0, 2.0, dtype, &mut g);
        for step in 1..=3 {
            let factor = 0.25 + g.uniform();
            scale_(&x, factor).unwrap();
            scale_(&x_gpu, factor).unwrap();
            assert_same("scale_", step, &x_gpu, &x);
        }
        let (cpu, gpu) = (sum_squares(&x).unwrap(), sum_squares(&x_gpu).unwrap());
        assert!((gpu - cpu).abs() <= cuda_tol(dtype) * cpu, "sum_squares ({dtype}): {gpu} vs {cpu}");
    }
}

/// Fresh copy of `x` in its own storage on `device`.
fn copy_to(x: &Tensor, device: Device) -> Tensor {
    Tensor::from_f64(&x.to_vec_f64().unwrap(), x.shape(), x.dtype(), device).unwrap()
}

/// Two parameters that are rows 0..2 and 2..5 of one buffer, with gradients that are the same rows of
/// another (as a concat's backward hands them out), updated on `device`: each step must change its own
/// rows only, exactly as it changes separate CPU copies of them.
fn views_update_their_own_elements(device: Device) {
    let mut g = Generator::new(7);
    let w = Tensor::rand(&[5, 4], -1.0, 1.0, DType::F64, Device::Cpu, &mut g).unwrap();
    let gw = Tensor::rand(&[5, 4], -1.0, 1.0, DType::F64, Device::Cpu, &mut g).unwrap();
    let (w_dev, gw_dev) = (copy_to(&w, device), copy_to(&gw, device));
    let rows = [(0, 2), (2, 3)];
    let view = |x: &Tensor, (start, len): (usize, usize)| crate::view::narrow(x, 0, start, len).unwrap();
    let tol = if device == Device::Cpu { 0.0 } else { cuda_tol(DType::F64) };
    // The same steps on separate CPU copies of each piece.
    let mut want = Vec::new();
    for &r in &rows {
        let (p, gr) = (copy_to(&view(&w, r), Device::Cpu), copy_to(&view(&gw, r), Device::Cpu));
        let (buf, m, v) = (p.zeros_like().unwrap(), p.zeros_like().unwrap(), p.zeros_like().unwrap());
        let h = SgdStep { lr: 0.1, momentum: 0.9, dampening: 0.0, nesterov: true, weight_decay: 0.01, first: true };
        sgd_step(&p, &gr, &buf, h).unwrap();
        let h = AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, amsgrad: false, step: 1 };
        adamw_step(&p, &gr, &m, &v, None, h).unwrap();
        scale_(&gr, 0.5).unwrap();
        want.push((p.to_vec_f64().unwrap(), gr.to_vec_f64().unwrap()));
    }
    for (&r, (p_want, g_want)) in rows.iter().zip(&want) {
        let (p, gr) = (view(&w_dev, r), view(&gw_dev, r));
        assert!(p.is_contiguous() && gr.is_contiguous());
        let zeros = || Tensor::zeros(p.shape(), DType::F64, device).unwrap();
        let (buf, m, v) = (zeros(), zeros(), zeros());
        let h = SgdStep { lr: 0.1, momentum: 0.9, dampening: 0.0, nesterov: true, weight_decay: 0.01, first: true };
        sgd_step(&p, &gr, &buf, h).unwrap();
        let h = AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, amsgrad: false, step: 1 };
        adamw_step(&p, &gr, &m, &v, None, h).unwrap();
        scale_(&gr, 0.5).unwrap();
        for (got, want, what) in [(&p, p_want, "parameter"), (&gr, g_want, "gradient")] {
            for (x, y) in got.to_vec_f64().unwrap().iter().zip(want) {
                assert!((x - y).abs() <= tol * y.abs().max(1.0), "{device} rows {r:?} {what}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn views_with_an_offset_update_their_own_elements() {
    views_update_their_own_elements(Device::Cpu);
}

#[test]
fn cuda_views_with_an_offset_update_their_own_elements() {
    if test_device_or_skip("cuda_views_with_an_offset_update_their_own_elements").is_none() {
        return;
    }
    views_update_their_own_elements(Device::Cuda(0));
}
