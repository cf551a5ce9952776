//! A profiling driver: the main job's CPU training step (small MLLA on MNIST-10k, AdamW, drop path 0.1,
//! label smoothing 0.1, batch 128), run for `STEPS` steps (first argument, default 20) on the same batches,
//! schedule and randomness as `mila train`'s first epoch; prints each step's loss and the median step time.
//! `perf record` / `perf stat` this rather than a whole training run.

use std::sync::Arc;
use std::time::Instant;

use engine::{Generator, Result};
use nn::data::{Augment, Dataset, Loader, LoaderConfig};
use nn::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup};
use nn::schedule::CosineWarmup;
use nn::trainer::Classifier;
use nn::Module;

fn main() -> Result<()> {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build()
        .map_err(|e| engine::Error::Msg { context: "train_steps", msg: e.to_string() })?;
    pool.install(|| run(steps))
}

fn run(steps: usize) -> Result<()> {
    let (train, _) = Dataset::mnist10k()?;
    let mut cfg = mila::MllaConfig::mnist();
    cfg.drop_path_rate = 0.1;
    let mut rng = Generator::new(0);
    let mut init = nn::Init { dtype: engine::DType::F32, device: engine::Device::Cpu, rng: &mut rng };
    let mut model = mila::Mlla::new(&mut init, &cfg)?;
    model.set_training(true);
    let loader = Loader::new(
        Arc::new(train),
        LoaderConfig {
            batch_size: 128,
            shuffle: true,
            drop_last: false,
            seed: 0,
            mean: vec![0.1307],
            std: vec![0.3081],
            augment: Augment { pad: 2, random_shift: 2 },
        },
    )?;
    let (decay, keep) = model.parameters_by_decay();
    let groups = vec![ParamGroup { params: decay, weight_decay: 0.05 }, ParamGroup { params: keep, weight_decay: 0.0 }];
    let mut opt = AdamW::new(groups, AdamWConfig { lr: 2e-3, ..Default::default() });
    let total = loader.num_batches() * 20;
    let schedule =
        CosineWarmup { base: 2e-3, min_lr: 0.0, warmup: ((total as f64 * 0.05).round() as usize).max(1), total };
    let mut rng = Generator::new(0x6d69_6c61);
    let mut times = Vec::new();
    for (step, batch) in loader.iter(0, 0).take(steps).enumerate() {
        let t = Instant::now();
        opt.set_lr(schedule.lr(step));
        let x = engine::Tensor::from_vec(batch.images, &batch.shape)?;
        let logits = model.logits(&x, &mut rng)?;
        let loss = ops::cross_entropy(&logits, &batch.labels, 0.1)?;
        let l = loss.to_scalar()?;
        opt.zero_grad();
        loss.backward()?;
        opt.step()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        println!("step {step} loss {l:?} {:.1} ms", times[step]);
    }
    times.sort_by(f64::total_cmp);
    println!("median {:.2} ms over {} steps", times[times.len() / 2], times.len());
    Ok(())
}
