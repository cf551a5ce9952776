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

// ---- Multi-tensor steps ----------------------------------------------------------------------------------

/// Lengths the multi-tensor tests cycle through: one element, odd lengths, one chunk (4096) and one past it,
/// one over a hundred thousand.
const LENGTHS: &[usize] = &[1, 3, 1000, 100_003, 4096, 4097, 17, 2, 8191];

/// Three views (rows 0..2, 2..5 and 5 of one (6, 7) buffer, as a concat's backward hands out gradients)
/// and `count` tensors of their own storage with lengths cycling through [`LENGTHS`], uniform in [lo, hi), on
/// `device`. The same generator state gives the same values on every device.
fn many(count: usize, lo: f64, hi: f64, dtype: DType, device: Device, g: &mut Generator) -> Vec<Tensor> {
    let whole = copy_to(&Tensor::rand(&[6, 7], lo, hi, dtype, Device::Cpu, g).unwrap(), device);
    let mut out: Vec<Tensor> =
        [(0, 2), (2, 3), (5, 1)].iter().map(|&(s, n)| crate::view::narrow(&whole, 0, s, n).unwrap()).collect();
    for i in 0..count {
        out.push(copy_to(&Tensor::rand(&[LENGTHS[i % LENGTHS.len()]], lo, hi, dtype, Device::Cpu, g).unwrap(), device));
    }
    out
}

/// Parameters and optimizer state of the multi-tensor tests, made from `seed` (the same seed gives the same
/// values, in storage of their own, on any device).
struct World {
    p: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    vmax: Vec<Tensor>,
}

impl World {
    fn new(seed: u64, count: usize, dtype: DType, device: Device) -> World {
        let mut g = Generator::new(seed);
        World {
            p: many(count, -1.0, 1.0, dtype, device, &mut g),
            m: many(count, -0.1, 0.1, dtype, device, &mut g),
            v: many(count, 0.01, 0.02, dtype, device, &mut g),
            vmax: many(count, 0.005, 0.025, dtype, device, &mut g),
        }
    }

    /// Every tensor, for comparisons.
    fn all(&self) -> impl Iterator<Item = (&'static str, usize, &Tensor)> {
        let named = [("p", &self.p), ("m / buf", &self.m), ("v", &self.v), ("vmax", &self.vmax)];
        named.into_iter().flat_map(|(name, ts)| ts.iter().enumerate().map(move |(i, t)| (name, i, t)))
    }
}

/// The gradients of `step` (the same on every device).
fn multi_grads(seed: u64, step: u64, count: usize, dtype: DType, device: Device) -> Vec<Tensor> {
    many(count, -1.0, 1.0, dtype, device, &mut Generator::new(1000 * seed + step))
}

/// Per-tensor AdamW hyperparameters: three groups of lr and weight decay, half of the tensors with amsgrad,
/// and every seventh a step ahead (as a parameter that missed no step while others did), so that a table
/// takes more than its 4 hyperparameter sets.
fn adamw_h(i: usize, step: u64) -> AdamWStep {
    AdamWStep {
        lr: [0.01, 0.003, 0.02][i % 3],
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: [0.1, 0.0, 0.05][i % 3],
        amsgrad: i % 2 == 1,
        step: step + i.is_multiple_of(7) as u64,
    }
}

/// Per-tensor SGD hyperparameters: plain, with momentum and dampening, nesterov, in two weight decays.
fn sgd_h(i: usize, step: u64) -> SgdStep {
    let plain = SgdStep {
        lr: 0.1,
        momentum: 0.0,
        dampening: 0.0,
        nesterov: false,
        weight_decay: [0.0, 0.01][i % 2],
        first: step == 1,
    };
    match i % 3 {
        0 => plain,
        1 => SgdStep { momentum: 0.9, dampening: 0.2, ..plain },
        _ => SgdStep { momentum: 0.8, nesterov: true, ..plain },
    }
}

fn adamw_items<'a>(w: &'a World, grads: &'a [Tensor], step: u64) -> Vec<AdamWTensors<'a>> {
    (0..w.p.len())
        .map(|i| AdamWTensors {
            p: &w.p[i],
            grad: &grads[i],
            m: &w.m[i],
            v: &w.v[i],
            vmax: Some(&w.vmax[i]),
            h: adamw_h(i, step),
        })
        .collect()
}

fn sgd_items<'a>(w: &'a World, grads: &'a [Tensor], step: u64) -> Vec<SgdTensors<'a>> {
    (0..w.p.len()).map(|i| SgdTensors { p: &w.p[i], grad: &grads[i], buf: &w.m[i], h: sgd_h(i, step) }).collect()
}

fn assert_bitwise(what: &str, got: &World, want: &World) {
    for ((name, i, x), (_, _, y)) in got.all().zip(want.all()) {
        let (x, y) = (x.to_vec_f64().unwrap(), y.to_vec_f64().unwrap());
        let same = x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: {name}[{i}] differs from the per-tensor steps");
    }
}

/// Three steps of `adamw_step_multi` and `sgd_step_multi` over `count` + 3 tensors on `device`, against the
/// same steps one tensor at a time on the same device (the same bits) and, off the CPU, on the CPU (within
/// the CUDA tolerance).
fn multi_steps_match_per_tensor_steps(device: Device, count: usize) {
    for (seed, dtype) in [(11, DType::F32), (12, DType::F64)] {
        for rule in ["adamw", "sgd"] {
            let what = format!("{rule} ({dtype}, {device})");
            let (multi, single) = (World::new(seed, count, dtype, device), World::new(seed, count, dtype, device));
            let cpu = World::new(seed, count, dtype, Device::Cpu);
            for step in 1..=3 {
                let grads = multi_grads(seed, step, count, dtype, device);
                let cpu_grads = multi_grads(seed, step, count, dtype, Device::Cpu);
                if rule == "adamw" {
                    adamw_step_multi(&adamw_items(&multi, &grads, step)).unwrap();
                    for it in adamw_items(&single, &grads, step) {
                        adamw_step(it.p, it.grad, it.m, it.v, it.vmax, it.h).unwrap();
                    }
                    adamw_step_multi(&adamw_items(&cpu, &cpu_grads, step)).unwrap();
                } else {
                    sgd_step_multi(&sgd_items(&multi, &grads, step)).unwrap();
                    for it in sgd_items(&single, &grads, step) {
                        sgd_step(it.p, it.grad, it.buf, it.h).unwrap();
                    }
                    sgd_step_multi(&sgd_items(&cpu, &cpu_grads, step)).unwrap();
                }
                assert_bitwise(&format!("{what}, step {step}"), &multi, &single);
                if device != Device::Cpu {
                    for ((name, i, x), (_, _, y)) in multi.all().zip(cpu.all()) {
                        assert_same(&format!("{what}: {name}[{i}]"), step, x, y);
                    }
                }
            }
        }
    }
}

#[test]
fn multi_steps_match_per_tensor_steps_bitwise() {
    multi_steps_match_per_tensor_steps(Device::Cpu, 40);
}

/// 200 + 3 tensors: more than one table of each kind (116 SGD, 92 AdamW, 76 AdamW with amsgrad entries)
/// and more hyperparameter sets than a table holds.
#[test]
fn cuda_multi_steps_match_per_tensor_steps_bitwise() {
    if test_device_or_skip("cuda_multi_steps_match_per_tensor_steps_bitwise").is_none() {
        return;
    }
    multi_steps_match_per_tensor_steps(Device::Cuda(0), 200);
}

/// The same parameter twice in one multi-tensor step is stepped twice, as by two single steps (the CUDA path
/// sees the overlap and goes one tensor at a time), and an empty tensor is no trouble.
fn repeated_parameter_is_stepped_twice(device: Device) {
    let mut g = Generator::new(13);
    let (p, grad) = (
        Tensor::rand(&[33], -1.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap(),
        Tensor::rand(&[33], -1.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap(),
    );
    // Separate storage for each operand: a CPU step reads the gradient while writing the parameter.
    let empty: Vec<Tensor> = (0..4).map(|_| Tensor::zeros(&[0, 4], DType::F32, device).unwrap()).collect();
    let h = AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, amsgrad: false, step: 1 };
    let (pm, gm) = (copy_to(&p, device), copy_to(&grad, device));
    let (mm, vm) = (pm.zeros_like().unwrap(), pm.zeros_like().unwrap());
    let (ps, gs) = (copy_to(&p, device), copy_to(&grad, device));
    let (ms, vs) = (ps.zeros_like().unwrap(), ps.zeros_like().unwrap());
    let item = AdamWTensors { p: &pm, grad: &gm, m: &mm, v: &vm, vmax: None, h };
    let none = AdamWTensors { p: &empty[0], grad: &empty[1], m: &empty[2], v: &empty[3], vmax: None, h };
    adamw_step_multi(&[item, none, AdamWTensors { h: AdamWStep { step: 2, ..h }, ..item }]).unwrap();
    adamw_step(&ps, &gs, &ms, &vs, None, h).unwrap();
    adamw_step(&ps, &gs, &ms, &vs, None, AdamWStep { step: 2, ..h }).unwrap();
    for (got, want) in [(&pm, &ps), (&mm, &ms), (&vm, &vs)] {
        assert_eq!(got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap(), "{device}");
    }
    let hs = SgdStep { lr: 0.1, momentum: 0.9, dampening: 0.0, nesterov: false, weight_decay: 0.0, first: true };
    let item = SgdTensors { p: &pm, grad: &gm, buf: &mm, h: hs };
    sgd_step_multi(&[item, SgdTensors { p: &empty[0], grad: &empty[1], buf: &empty[2], h: hs }, item]).unwrap();
    sgd_step(&ps, &gs, &ms, hs).unwrap();
    sgd_step(&ps, &gs, &ms, hs).unwrap();
    for (got, want) in [(&pm, &ps), (&mm, &ms)] {
        assert_eq!(got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap(), "{device}");
    }
}

#[test]
fn repeated_parameter_in_a_multi_step_is_stepped_twice() {
    repeated_parameter_is_stepped_twice(Device::Cpu);
}

#[test]
fn cuda_repeated_parameter_in_a_multi_step_is_stepped_twice() {
    if test_device_or_skip("cuda_repeated_parameter_in_a_multi_step_is_stepped_twice").is_none() {
        return;
    }
    repeated_parameter_is_stepped_twice(Device::Cuda(0));
}

/// The multi-tensor steps check every item before updating any.
#[test]
fn multi_steps_check_every_item_first() {
    let p = Tensor::ones(&[4], DType::F32, Device::Cpu).unwrap();
    let (grad, bad) = (p.ones_like().unwrap(), Tensor::ones(&[5], DType::F32, Device::Cpu).unwrap());
    let (m, v) = (p.zeros_like().unwrap(), p.zeros_like().unwrap());
    let h = AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0, amsgrad: false, step: 1 };
    let good = AdamWTensors { p: &p, grad: &grad, m: &m, v: &v, vmax: None, h };
    assert!(adamw_step_multi(&[good, AdamWTensors { grad: &bad, ..good }]).is_err());
    assert!(adamw_step_multi(&[good, AdamWTensors { h: AdamWStep { amsgrad: true, ..h }, ..good }]).is_err());
    assert!(adamw_step_multi(&[good, AdamWTensors { h: AdamWStep { step: 0, ..h }, ..good }]).is_err());
    let hs = SgdStep { lr: 0.1, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0, first: true };
    let good = SgdTensors { p: &p, grad: &grad, buf: &m, h: hs };
    assert!(sgd_step_multi(&[good, SgdTensors { buf: &bad, ..good }]).is_err());
    assert_eq!(p.to_vec_f64().unwrap(), vec![1.0; 4], "nothing updated");
}

/// `scale_multi` gives the bits of one `scale_` per tensor; `sum_squares_multi` the bits of adding the
/// one-tensor sums in order on the CPU, and on CUDA the CPU's sum within tolerance, the same run to run.
fn refs(ts: &[Tensor]) -> Vec<&Tensor> {
    ts.iter().collect()
}

fn multi_scale_and_sum_squares(device: Device, count: usize) {
    for (seed, dtype) in [(21, DType::F32), (22, DType::F64)] {
        let mut g = Generator::new(seed);
        let xs = many(count, -2.0, 2.0, dtype, device, &mut g);
        let mut g = Generator::new(seed);
        let ys = many(count, -2.0, 2.0, dtype, device, &mut g);
        let mut g = Generator::new(seed);
        let cpu = many(count, -2.0, 2.0, dtype, Device::Cpu, &mut g);
        scale_multi(&refs(&xs), 0.37).unwrap();
        ys.iter().for_each(|y| scale_(y, 0.37).unwrap());
        for (i, (x, y)) in xs.iter().zip(&ys).enumerate() {
            let same =
                x.to_vec_f64().unwrap().iter().zip(y.to_vec_f64().unwrap()).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "scale_multi ({dtype}, {device}): tensor {i}");
        }
        scale_multi(&refs(&cpu), 0.37).unwrap();
        let got = sum_squares_multi(&refs(&xs)).unwrap();
        let want = cpu.iter().fold(0.0, |acc, x| acc + sum_squares(x).unwrap());
        if device == Device::Cpu {
            assert_eq!(got.to_bits(), want.to_bits(), "sum_squares_multi ({dtype}): {got} vs {want}");
        } else {
            assert!((got - want).abs() <= cuda_tol(dtype) * want, "sum_squares_multi ({dtype}): {got} vs {want}");
            assert_eq!(got.to_bits(), sum_squares_multi(&refs(&xs)).unwrap().to_bits(), "run to run");
        }
    }
}

#[test]
fn multi_scale_and_sum_squares_match_per_tensor() {
    multi_scale_and_sum_squares(Device::Cpu, 40);
}

/// 500 + 3 tensors: more than two tables of 236.
#[test]
fn cuda_multi_scale_and_sum_squares_match_per_tensor() {
    if test_device_or_skip("cuda_multi_scale_and_sum_squares_match_per_tensor").is_none() {
        return;
    }
    multi_scale_and_sum_squares(Device::Cuda(0), 500);
}

/// How the host fills the multi-tensor tables (no device needed: the addresses are made up): a new table
/// past N entries or past 4 hyperparameter sets, a tensor past 2^31 elements in several entries whose
/// addresses advance by whole segments, and the running chunk counts.
#[test]
fn multi_tensor_tables_split_by_entries_sets_and_segments() {
    use super::cuda::{Tables, CHUNK, SEGMENT};
    // 237 tensors of one set: 236 in the first table, 1 in the second.
    let mut t = Tables::<f64, 1, 236>::new(4);
    for i in 0..237 {
        t.push([1000 * i as u64], 4097, 1.0);
    }
    let tables = t.finish();
    assert_eq!(tables.iter().map(|(t, _)| t.count).collect::<Vec<_>>(), [236, 1]);
    assert_eq!(tables[0].1, 236 * 2);
    assert_eq!(&tables[0].0.chunk_end[..3], &[2, 4, 6]);
    assert_eq!((tables[1].0.ptr[0][0], tables[1].0.len[0], tables[1].0.chunk_end[0]), (236_000, 4097, 2));
    // Five sets: the fifth starts a new table; a known set reuses its index.
    let mut t = Tables::<f64, 1, 236>::new(4);
    for (i, factor) in [0.5, 0.25, 0.5, 2.0, 3.0, 4.0, 0.5].into_iter().enumerate() {
        t.push([i as u64], 1, factor);
    }
    let tables = t.finish();
    assert_eq!(tables.len(), 2);
    assert_eq!(
        (tables[0].0.count, &tables[0].0.sets[..], &tables[0].0.set[..5]),
        (5, &[0.5, 0.25, 2.0, 3.0][..], &[0, 1, 0, 2, 3][..])
    );
    assert_eq!(
        (tables[1].0.count, tables[1].0.sets[..2].to_vec(), &tables[1].0.set[..2]),
        (2, vec![4.0, 0.5], &[0, 1][..])
    );
    // 2^32 + 5 elements of 8 bytes, operands at 0 and 1 << 40: three entries.
    let mut t = Tables::<f64, 2, 236>::new(8);
    let n = (1usize << 32) + 5;
    t.push([0, 1 << 40], n, 1.0);
    let (table, chunks) = &t.finish()[0];
    let per = (SEGMENT / CHUNK) as u32;
    assert_eq!(table.count, 3);
    assert_eq!(&table.len[..3], &[SEGMENT as u32, SEGMENT as u32, 5]);
    assert_eq!(&table.chunk_end[..3], &[per, 2 * per, 2 * per + 1]);
    assert_eq!(*chunks, 2 * per + 1);
    let step = (SEGMENT * 8) as u64;
    assert_eq!(&table.ptr[0][..3], &[0, step, 2 * step]);
    assert_eq!(&table.ptr[1][..3], &[1 << 40, (1 << 40) + step, (1 << 40) + 2 * step]);
}

// ---- Hyperparameters in device memory (CUDA graphs) ------------------------------------------------------

fn hyper_tensor(hs: &[AdamWStep], device: Device) -> Tensor {
    let values: Vec<f64> = hs.iter().flat_map(|&h| adamw_hyper(h)).collect();
    Tensor::from_f64(&values, &[values.len()], DType::F64, device).unwrap()
}

#[test]
fn hyper_tables_index_items_from_each_tables_first() {
    // Items of one chunk each (92 entries a table), a few without elements (no entry, but their index).
    let entries = (0..200).filter(|i| i % 50 != 3).map(|i| (i, [0x1000 * i as u64; 4], 10));
    let tables = super::cuda::hyper_tables::<4, 92>(entries, 4);
    let mut seen = Vec::new();
    for (t, chunks, first) in &tables {
        assert!(t.count as usize <= 92);
        assert_eq!(*chunks as usize, t.count as usize, "one chunk per 10-element entry");
        for k in 0..t.count as usize {
            let item = first + t.set[k] as usize;
            assert_eq!(t.ptr[0][k], 0x1000 * item as u64, "entry {k} of the table from item {first}");
            seen.push(item);
        }
    }
    let want: Vec<usize> = (0..200).filter(|i| i % 50 != 3).collect();
    assert_eq!(seen, want, "every item once, in order");
    // A gap of more than 255 items starts a new table (the index is a u8).
    let tables = super::cuda::hyper_tables::<4, 92>([(0, [0; 4], 1), (300, [0; 4], 1)].into_iter(), 4);
    assert_eq!(tables.iter().map(|t| t.2).collect::<Vec<_>>(), [0, 300]);
}

#[test]
fn adamw_hyper_checks_its_arguments() {
    let mut g = Generator::new(3);
    let p = Tensor::rand(SHAPE, -1.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap();
    let grad = Tensor::rand(SHAPE, -1.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap();
    let (m, v) = (p.zeros_like().unwrap(), p.zeros_like().unwrap());
    let h = adamw_h(1, 1);
    let h = AdamWStep { amsgrad: false, ..h };
    let items = [AdamWTensors { p: &p, grad: &grad, m: &m, v: &v, vmax: None, h }];
    let err = adamw_step_multi_hyper(&items, &hyper_tensor(&[h], Device::Cpu)).unwrap_err();
    assert!(err.to_string().contains("CUDA"), "{err}");
    let err = adamw_step_multi_hyper(&[AdamWTensors { h: AdamWStep { step: 0, ..h }, ..items[0] }], &p).unwrap_err();
    assert!(err.to_string().contains("steps count from 1"), "{err}");
    // The host values are those of the kernel arguments: lr / (1 - beta1^t) and sqrt(1 - beta2^t) at t = 1.
    let v = adamw_hyper(AdamWStep {
        lr: 0.5,
        beta1: 0.5,
        beta2: 0.75,
        eps: 1e-8,
        weight_decay: 0.1,
        amsgrad: false,
        step: 1,
    });
    assert_eq!(v, [1.0, 0.95, 0.5, 0.5, 0.75, 0.25, 0.5, 1e-8]);
}

/// Three steps with the hyperparameters read from device memory against `adamw_step_multi` with them as
/// kernel arguments: the same bits, over more than one table, with and without amsgrad.
#[test]
fn cuda_adamw_hyper_matches_adamw_multi_bitwise() {
    if test_device_or_skip("cuda_adamw_hyper_matches_adamw_multi_bitwise").is_none() {
        return;
    }
    let device = Device::Cuda(0);
    let count = 200;
    for amsgrad in [false, true] {
        for (seed, dtype) in [(21, DType::F32), (22, DType::F64)] {
            let (args, dev) = (World::new(seed, count, dtype, device), World::new(seed, count, dtype, device));
            // One hyperparameter buffer, rewritten before each step, as a graphed step does.
            let n = count + 3;
            let hyper = Tensor::zeros(&[ADAMW_HYPER_LEN * n], DType::F64, device).unwrap();
            for step in 1..=3 {
                let grads = multi_grads(seed, step, count, dtype, device);
                let hs: Vec<AdamWStep> = (0..n).map(|i| AdamWStep { amsgrad, ..adamw_h(i, step) }).collect();
                fn with<'a>(
                    w: &'a World,
                    grads: &'a [Tensor],
                    hs: &[AdamWStep],
                    amsgrad: bool,
                ) -> Vec<AdamWTensors<'a>> {
                    (0..hs.len())
                        .map(|i| AdamWTensors {
                            p: &w.p[i],
                            grad: &grads[i],
                            m: &w.m[i],
                            v: &w.v[i],
                            vmax: amsgrad.then_some(&w.vmax[i]),
                            h: hs[i],
                        })
                        .collect()
                }
                adamw_step_multi(&with(&args, &grads, &hs, amsgrad)).unwrap();
                let values: Vec<f64> = hs.iter().flat_map(|&h| adamw_hyper(h)).collect();
                hyper.write_f64(&values).unwrap();
                adamw_step_multi_hyper(&with(&dev, &grads, &hs, amsgrad), &hyper).unwrap();
                assert_bitwise(&format!("hyper, amsgrad {amsgrad}, {dtype}, step {step}"), &dev, &args);
            }
        }
    }
}
