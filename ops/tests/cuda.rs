//! Every op of the gradient-check suite on CUDA against the CPU: the same fresh random inputs (broadcast and
//! non-contiguous views included, as the suite builds them), outputs and every input's gradient, f32 and
//! f64. New device allocations are poisoned with NaN, so an element a kernel leaves unwritten fails.
//! Without a device these tests print a skip line (and fail under MILA_REQUIRE_CUDA=1).

use engine::cuda::{poison_new_allocations, test_device_or_skip};
use engine::{DType, Device, Error, Tensor};
use ops::suite;

/// ||a - b|| / ||b|| over all elements (0 when both are zero).
fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if num == 0.0 {
        0.0
    } else {
        num / den
    }
}

fn every_op_matches_cpu(dtype: DType, tol: f64) {
    let _serial = crate::cuda_serial();
    let Some(_dev) = test_device_or_skip("every_op_matches_cpu") else { return };
    let _poison = poison_new_allocations();
    let mut failures = Vec::new();
    for (i, case) in suite::cases().iter().enumerate() {
        let seed = 1000 + i as u64;
        let cpu = suite::inputs(case, seed, dtype, Device::Cpu).unwrap();
        let gpu: Vec<Tensor> = cpu.iter().map(|t| t.to_device(Device::Cuda(0)).unwrap()).collect();
        if !case.cuda {
            // No CUDA kernel yet: the op must say so, and the mark goes once it has one.
            match suite::forward_backward(case, &gpu, seed) {
                Err(Error::Unsupported { .. }) => println!("{dtype} {:<28} no CUDA path yet", case.name),
                other => failures.push(format!("{}: marked CPU-only, but CUDA gave {:?}", case.name, other.err())),
            }
            continue;
        }
        let (y_cpu, g_cpu) = suite::forward_backward(case, &cpu, seed).unwrap();
        let (y_gpu, g_gpu) = match suite::forward_backward(case, &gpu, seed) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        assert_eq!(y_gpu.device(), Device::Cuda(0), "{}", case.name);
        let mut worst = rel_error(&y_gpu, &y_cpu);
        for (a, b) in g_gpu.iter().zip(&g_cpu) {
            match (a, b) {
                (Some(a), Some(b)) => worst = worst.max(rel_error(a, b)),
                (None, None) => {}
                _ => failures.push(format!("{}: a gradient exists on one device only", case.name)),
            }
        }
        println!("{dtype} {:<28} worst relative error {worst:.2e}", case.name);
        if worst.is_nan() || worst > tol {
            failures.push(format!("{}: relative error {worst:.3e} > {tol:e}", case.name));
        }
    }
    assert!(failures.is_empty(), "{dtype}: {} ops differ from the CPU:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_op_matches_cpu_f32() {
    every_op_matches_cpu(DType::F32, 1e-5);
}

#[test]
fn every_op_matches_cpu_f64() {
    every_op_matches_cpu(DType::F64, 1e-12);
}

#[test]
fn cuda_results_stay_on_the_device_until_read() {
    let _serial = crate::cuda_serial();
    let Some(dev) = test_device_or_skip("cuda_results_stay_on_the_device_until_read") else { return };
    let x = Tensor::from_vec(vec![1.0f32, -2.0, 3.0], &[3]).unwrap().to_device(Device::Cuda(0)).unwrap();
    let y = ops::relu(&ops::mul_scalar(&x, 2.0).unwrap()).unwrap();
    assert_eq!(y.device(), Device::Cuda(0));
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![2.0, 0.0, 6.0]);
    // One warm-up pass while `y` is alive (it holds a block the loop cannot take), then the pool is warm:
    // the same shapes again allocate nothing new from the driver and are served from the cache.
    let _ = ops::relu(&ops::mul_scalar(&x, 2.0).unwrap()).unwrap();
    let before = dev.memory_stats();
    for _ in 0..3 {
        let _ = ops::relu(&ops::mul_scalar(&x, 2.0).unwrap()).unwrap();
    }
    let after = dev.memory_stats();
    assert_eq!(after.num_allocs, before.num_allocs, "driver allocations after warm-up");
    assert_eq!(after.num_cache_hits, before.num_cache_hits + 6, "two buffers a pass, from the cache");
}
