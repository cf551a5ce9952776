//! The models on CUDA: every fixture in f32 (and f64) within the tolerances of `mila parity`, and a training
//! step that, once warm, takes every buffer from the caching allocator (no driver allocation). Skipped with a
//! printed line without a device; failing under MILA_REQUIRE_CUDA=1.

use std::path::PathBuf;

use engine::cuda::test_device_or_skip;
use engine::{DType, Device, Generator, Tensor};
use mila::{Mlla, MllaConfig};
use nn::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup};
use nn::trainer::Classifier;
use nn::{Init, Module};

/// The CUDA tests of this binary share the device and its allocation counters: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures")).join(name)
}

#[test]
fn fixtures_pass_on_cuda_in_f32_and_f64() {
    let _serial = serial();
    if test_device_or_skip("fixtures_pass_on_cuda_in_f32_and_f64").is_none() {
        return;
    }
    let _poison = engine::cuda::poison_new_allocations();
    for file in [
        "linear_attention.safetensors",
        "mila_block.safetensors",
        "mlla_model.safetensors",
        "selective_scan.safetensors",
        "mamba_mixer.safetensors",
    ] {
        for dtype in [DType::F32, DType::F64] {
            let report = mila::parity::run(&fixture(file), Device::Cuda(0), dtype).unwrap();
            let worst = report.worst().expect("the fixture compares something");
            println!("{file} cuda {dtype}: worst {:.3e} ({})", worst.rel_error, worst.name);
            for c in &report.comparisons {
                assert!(c.passed(), "{file} cuda {dtype} {}: {:.3e} > {:.0e}", c.name, c.rel_error, c.tolerance);
            }
        }
    }
}

#[test]
fn a_warm_training_step_allocates_nothing_from_the_driver() {
    let _serial = serial();
    let Some(dev) = test_device_or_skip("a_warm_training_step_allocates_nothing_from_the_driver") else { return };
    let device = Device::Cuda(0);
    let mut rng = Generator::new(3);
    let mut init = Init { dtype: DType::F32, device, rng: &mut rng };
    let model = Mlla::new(&mut init, &MllaConfig::mnist()).unwrap();
    let (decay, keep) = model.parameters_by_decay();
    let groups = vec![ParamGroup { params: decay, weight_decay: 0.05 }, ParamGroup { params: keep, weight_decay: 0.0 }];
    let mut opt = AdamW::new(groups, AdamWConfig { lr: 1e-3, ..Default::default() });
    let mut g = Generator::new(4);
    let x = Tensor::randn(&[16, 1, 32, 32], 0.0, 1.0, DType::F32, device, &mut g).unwrap();
    let labels: Vec<usize> = (0..16).map(|i| (i * 7) % 10).collect();
    let mut step = |rng: &mut Generator| -> f64 {
        let logits = model.logits(&x, rng).unwrap();
        let loss = ops::cross_entropy(&logits, &labels, 0.1).unwrap();
        opt.zero_grad();
        loss.backward().unwrap();
        opt.step().unwrap();
        loss.to_scalar().unwrap()
    };
    // Two warm-up steps: the first creates the optimizer state, the second sees every buffer shape once more.
    let first = step(&mut rng);
    step(&mut rng);
    let before = dev.memory_stats();
    let mut last = first;
    for _ in 0..3 {
        last = step(&mut rng);
    }
    let after = dev.memory_stats();
    println!("warm steps: {before} -> {after}");
    assert_eq!(after.num_allocs, before.num_allocs, "driver allocations in warm training steps");
    assert!(after.num_cache_hits > before.num_cache_hits, "the steps took their buffers from the pool");
    assert!(last.is_finite() && last < first, "five steps on one batch lower its loss: {first} -> {last}");
}
