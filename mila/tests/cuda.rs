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

/// The small MLLA of `mila bench models` (drop path 0), at a small batch.
fn small_mlla(seed: u64, device: Device, drop_path_rate: f64) -> Mlla {
    let cfg = MllaConfig { drop_path_rate, ..MllaConfig::small32() };
    let mut rng = Generator::new(seed);
    Mlla::new(&mut Init { dtype: DType::F32, device, rng: &mut rng }, &cfg).unwrap()
}

fn adamw_for(model: &Mlla) -> AdamW {
    let (decay, keep) = model.parameters_by_decay();
    let groups = vec![ParamGroup { params: decay, weight_decay: 0.05 }, ParamGroup { params: keep, weight_decay: 0.0 }];
    AdamW::new(groups, AdamWConfig { lr: 2e-3, ..Default::default() })
}

/// Losses, then every parameter, gradient and AdamW moment, as bits.
fn fingerprint(model: &Mlla, opt: &AdamW, losses: &[f64]) -> Vec<Vec<u64>> {
    let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
    let mut out = vec![bits(losses.to_vec())];
    for p in model.parameters() {
        out.push(bits(p.to_vec_f64().unwrap()));
        out.push(bits(p.grad().expect("every parameter has a gradient").to_vec_f64().unwrap()));
        let st = opt.state(&p).expect("AdamW state");
        out.push(bits(st.m.to_vec_f64().unwrap()));
        out.push(bits(st.v.to_vec_f64().unwrap()));
        out.push(vec![st.step]);
    }
    out.push(model.counters().into_iter().map(|(_, v)| v).collect());
    out
}

/// N training steps of the small MLLA replayed from one CUDA graph (`nn::GraphedStep`: the first step eager,
/// then captured) against the same N steps run eagerly from the same initial state, with a new batch, new
/// labels and a new learning rate each step: the same kernels in the same order on the same values, so the
/// losses, weights, gradients and AdamW state are equal bit for bit.
#[test]
fn graphed_training_matches_eager_training_bitwise() {
    let _serial = serial();
    let Some(dev) = test_device_or_skip("graphed_training_matches_eager_training_bitwise") else { return };
    let without = graphed_against_eager(&dev, 0.0);
    // With drop path the replays draw the masks the eager steps draw (fed masks), so the runs agree bit for
    // bit again; and the masks act: the losses are not those of the run without drop path.
    let with = graphed_against_eager(&dev, 0.5);
    assert_ne!(with, without, "drop path 0.5 changed nothing");
}

/// Trains the small MLLA (drop path `rate`) for a few steps eagerly and then graphed, from the same start;
/// asserts the two agree bit for bit and returns the losses' bits.
fn graphed_against_eager(dev: &std::sync::Arc<engine::cuda::CudaDevice>, rate: f64) -> Vec<u64> {
    let device = Device::Cuda(0);
    let (batch, steps) = (16, 6);
    let mut g = Generator::new(8);
    let batches: Vec<(Tensor, Vec<usize>, f64)> = (0..steps)
        .map(|s| {
            let x = Tensor::randn(&[batch, 1, 32, 32], 0.0, 1.0, DType::F32, device, &mut g).unwrap();
            let labels = (0..batch).map(|_| g.below(10)).collect();
            (x, labels, 1e-3 * (1.0 + s as f64))
        })
        .collect();

    let eager = {
        let model = small_mlla(5, device, rate);
        let mut opt = adamw_for(&model);
        let mut rng = Generator::new(1);
        let mut losses = Vec::new();
        for (x, labels, lr) in &batches {
            opt.set_lr(*lr);
            opt.zero_grad();
            let loss = ops::cross_entropy(&model.logits(x, &mut rng).unwrap(), labels, 0.1).unwrap();
            loss.backward().unwrap();
            opt.step().unwrap();
            losses.push(loss.to_scalar().unwrap());
        }
        let mut f = fingerprint(&model, &opt, &losses);
        f.push(rng.state().to_vec());
        f
    };

    let stats_before = dev.memory_stats();
    let graphed = {
        let model = small_mlla(5, device, rate);
        let mut opt = adamw_for(&model);
        let mut rng = Generator::new(1);
        let (x0, labels0, lr0) = &batches[0];
        opt.set_lr(*lr0);
        let (mut step, first) = nn::GraphedStep::new(&model, &mut opt, x0, labels0, 0.1, &mut rng).unwrap();
        println!(
            "graphed step, drop path {rate}: {} frozen uploads, {} fed masks; {}",
            step.frozen_uploads(),
            step.fed_masks(),
            dev.memory_stats()
        );
        // The first block's rate is 0 (rates grow linearly from 0); every other block has two drop paths.
        let expected_masks = if rate > 0.0 { 2 * (model_blocks() - 1) } else { 0 };
        assert_eq!(step.fed_masks(), expected_masks, "one fed mask a drop path with p > 0");
        let mut losses = vec![first.loss.to_scalar().unwrap()];
        for (x, labels, lr) in &batches[1..] {
            opt.set_lr(*lr);
            let out = step.run(&model, &mut opt, x, labels, &mut rng).unwrap();
            losses.push(out.loss.to_scalar().unwrap());
        }
        assert_eq!(step.replays(), steps as u64 - 1);
        let mut f = fingerprint(&model, &opt, &losses);
        f.push(rng.state().to_vec());
        drop(step);
        f
    };
    assert_eq!(
        graphed[0],
        eager[0],
        "drop path {rate}: losses: graphed {:?}, eager {:?}",
        graphed[0].iter().map(|b| f64::from_bits(*b)).collect::<Vec<_>>(),
        eager[0].iter().map(|b| f64::from_bits(*b)).collect::<Vec<_>>()
    );
    assert!(graphed == eager, "drop path {rate}: weights, gradients, AdamW state or generator differ");
    let after = dev.memory_stats();
    assert_eq!(after.graph_pool_bytes, stats_before.graph_pool_bytes, "the graph's private pool is given back");
    eager[0].clone()
}

/// The number of MILA blocks of the small model.
fn model_blocks() -> usize {
    MllaConfig::small32().depths.iter().sum()
}

/// An optimizer without a graphed update is refused before anything is updated; so is a CPU tensor.
#[test]
fn graphed_steps_refuse_what_a_graph_cannot_replay() {
    let _serial = serial();
    let mut g = Generator::new(9);
    let labels: Vec<usize> = (0..4).map(|_| g.below(10)).collect();
    // On the CPU: refused without a device.
    let model = small_mlla(5, Device::Cpu, 0.0);
    let x = Tensor::randn(&[4, 1, 32, 32], 0.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap();
    let err = nn::GraphedStep::new(&model, &mut adamw_for(&model), &x, &labels, 0.1, &mut Generator::new(1)).err();
    assert!(err.expect("a CPU step is refused").to_string().contains("CUDA"));
    if test_device_or_skip("graphed_steps_refuse_what_a_graph_cannot_replay").is_none() {
        return;
    }
    let device = Device::Cuda(0);
    let x = x.to_device(device).unwrap();
    let model = small_mlla(5, device, 0.0);
    let groups = vec![ParamGroup { params: model.parameters(), weight_decay: 0.0 }];
    let mut sgd =
        nn::Sgd::new(groups, nn::SgdConfig { lr: 0.1, momentum: 0.0, dampening: 0.0, nesterov: false }).unwrap();
    let err = nn::GraphedStep::new(&model, &mut sgd, &x, &labels, 0.1, &mut Generator::new(1)).err();
    assert!(err.expect("SGD is refused").to_string().contains("AdamW"));
}
