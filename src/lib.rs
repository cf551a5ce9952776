//! The commands behind the `mila` binary, as functions so that tests can call them.

pub mod bench;

use std::path::Path;
use std::process::ExitCode;

use engine::{DType, Device, GradcheckOptions, Result};

mod ablate;
pub use ablate::{ablate, ablation_table, AblateArgs, AblateSettings, AblationRow};

/// `mila info`.
pub fn info() -> Result<ExitCode> {
    use engine::cuda;
    println!("mila-rs {}", env!("CARGO_PKG_VERSION"));
    println!("cpu threads: {}", rayon::current_num_threads());
    println!("dtypes: f32, f64");
    println!("CUDA libraries (loaded at run time; none is needed to build):");
    for lib in cuda::library_report() {
        println!("  {lib}");
    }
    match cuda::unavailable_reason() {
        None => {
            if let Some((major, minor)) = cuda::driver_version() {
                println!("CUDA driver: supports CUDA {major}.{minor}");
            }
            for ordinal in 0..cuda::device_count() {
                match cuda::device(ordinal) {
                    Ok(dev) => println!("device cuda:{ordinal}: {dev:?}"),
                    Err(e) => println!("device cuda:{ordinal}: {e}"),
                }
            }
        }
        Some(reason) => println!("devices: cpu only ({reason})"),
    }
    println!("TF32 matmul: {}", if cuda::tf32_enabled() { "on" } else { "off" });
    Ok(ExitCode::SUCCESS)
}

/// `mila gradcheck`: every op of the suite, one line each; fails if any op fails.
pub fn gradcheck(filter: Option<&str>, seed: u64, rtol: f64) -> Result<ExitCode> {
    let opts = GradcheckOptions { rtol, ..Default::default() };
    let (mut ran, mut failed) = (0, 0);
    for case in ops::suite::cases() {
        if filter.is_some_and(|f| !case.name.contains(f)) {
            continue;
        }
        let report = ops::suite::run(&case, seed, opts)?;
        ran += 1;
        failed += usize::from(!report.passed());
        println!("{report}");
    }
    if ran == 0 {
        return Err(engine::Error::Msg {
            context: "gradcheck",
            msg: format!("no op matches '{}'", filter.unwrap_or("")),
        });
    }
    println!("gradcheck: {ran} ops, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `mila parity FILE`: runs a PyTorch fixture (kinds LinearAttention, MLLABlock, MLLA, MambaMixer,
/// selective_scan) on `device` in `dtype`, prints every tensor's relative error and a verdict line; fails if
/// any tensor is past its tolerance.
pub fn parity(path: &Path, device: Device, dtype: DType) -> Result<ExitCode> {
    let report = mila::parity::run(path, device, dtype)?;
    println!("{} ({}, {dtype} on {device})", path.display(), report.kind);
    for c in &report.comparisons {
        let verdict = if c.passed() { "ok" } else { "FAIL" };
        print!("  {:<56} {:>10.3e}  tolerance {:.0e}  {verdict}", c.name, c.rel_error, c.tolerance);
        if c.relative_to != c.name {
            // A vanishing gradient (zero in exact arithmetic): measured against its parent's largest.
            print!("  (vanishing: relative to {}; plain {:.3e})", c.relative_to, c.plain_error);
        }
        println!();
    }
    let passed = report.passed();
    match report.worst() {
        Some(w) => println!(
            "parity: {} worst {:.3e} ({}) tolerance {:.0e}: {}",
            report.kind,
            w.rel_error,
            w.name,
            w.tolerance,
            if passed { "ok" } else { "FAIL" }
        ),
        None => println!("parity: {} compared nothing: FAIL", report.kind),
    }
    Ok(if passed && report.worst().is_some() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ops::TensorOps;

    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures")).join(name)
    }

    /// Writes a copy of the fixture at `path` with the stored tensor `key` scaled by 1.001 into `dir`.
    fn perturbed_copy(path: &Path, key: &str, dir: &Path) -> PathBuf {
        let mut ck = nn::checkpoint::load(path).unwrap();
        let g = ck.tensors[key].mul_scalar(1.001).unwrap();
        ck.tensors.insert(key.into(), g);
        let bad = dir.join(path.file_name().unwrap());
        let tensors: Vec<(String, engine::Tensor)> = ck.tensors.into_iter().collect();
        let counters: Vec<(String, u64)> = ck.counters.into_iter().collect();
        nn::checkpoint::save(&bad, &tensors, &counters, ck.metadata).unwrap();
        bad
    }

    #[test]
    fn parity_passes_on_the_fixture_and_fails_on_a_perturbed_copy() {
        let path = fixture("mila_block.safetensors");
        assert_eq!(parity(&path, Device::Cpu, DType::F64).unwrap(), ExitCode::SUCCESS);

        // The same file with one stored gradient scaled by 1.001: the command must fail on it.
        let dir = std::env::temp_dir().join(format!("mila-cli-parity-{}", std::process::id()));
        let bad = perturbed_copy(&path, "grad.dwc.weight", &dir);
        assert_eq!(parity(&bad, Device::Cpu, DType::F64).unwrap(), ExitCode::FAILURE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parity_passes_the_mamba_kinds_and_fails_on_perturbed_copies() {
        let dir = std::env::temp_dir().join(format!("mila-cli-mamba-{}", std::process::id()));
        // One gradient each, deep in the scan: A's (through exp(dt A)) and delta's (through the softplus).
        for (file, key) in [("mamba_mixer.safetensors", "grad.A_log"), ("selective_scan.safetensors", "grad.delta")] {
            let path = fixture(file);
            for dtype in [DType::F64, DType::F32] {
                assert_eq!(parity(&path, Device::Cpu, dtype).unwrap(), ExitCode::SUCCESS, "{file} {dtype}");
            }
            let bad = perturbed_copy(&path, key, &dir);
            assert_eq!(parity(&bad, Device::Cpu, DType::F64).unwrap(), ExitCode::FAILURE, "{file} with {key} off");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `mila train`: the model config, recipe, device and output directory.
#[derive(Debug, Clone, clap::Parser)]
pub struct TrainArgs {
    /// Model: mnist (MLLA, embed 16, depths 1,1,1,1; ~0.44M parameters), tiny, small or base.
    #[arg(long, default_value = "mnist")]
    pub model: String,
    /// Dataset: mnist10k (embedded), mnist or fashion-mnist (IDX files in --data-dir), cifar10.
    #[arg(long, default_value = "mnist10k")]
    pub dataset: String,
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// adamw or sgd.
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    #[arg(long, default_value = "cpu", value_parser = |s: &str| Device::parse(s).map_err(|e| e.to_string()))]
    pub device: Device,
    #[arg(long, default_value = "f32", value_parser = |s: &str| DType::parse(s).map_err(|e| e.to_string()))]
    pub dtype: DType,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "runs/mila")]
    pub out: std::path::PathBuf,
    /// Continue the run whose checkpoint is in --out.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many epochs of this invocation (resume later with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Evaluate an exponential moving average of the weights with this decay (e.g. 0.998); the last
    /// weights' accuracy is reported beside it after the last epoch.
    #[arg(long)]
    pub ema: Option<f64>,
    /// Stochastic depth: drop-path rates grow linearly from 0 to this over the blocks. The default 0.1 is
    /// the official MLLA class's (`drop_path_rate=0.1`); over seeds 0-15 of the default run (CUDA) the mean
    /// test accuracy is 98.38% with it (0.15: 98.42%, 0.2: 98.33%; 0.0 over seeds 0-7: 98.32%).
    #[arg(long, default_value_t = 0.1)]
    pub drop_path: f64,
    /// With --device cuda: capture the whole training step (forward, loss, backward, AdamW) into one CUDA
    /// graph after the first step and replay it each step: the same results bit for bit, a fraction of the
    /// host time per step. `auto` (the default) does where it can (CUDA, AdamW, no clipping), `on` refuses a run where
    /// it cannot, `off` trains eagerly. Batches of another size (an epoch's last) run without the graph.
    #[arg(long, value_enum, default_value_t = GraphMode::Auto)]
    pub cuda_graph: GraphMode,
    /// Drop each epoch's last, smaller batch (`--drop-last true`), so that every step is a full batch.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub drop_last: bool,
    /// Clip the gradients to this global norm before each update (not with a CUDA graph).
    #[arg(long)]
    pub clip_grad: Option<f64>,
}

/// `mila train --cuda-graph`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphMode {
    /// Graph the step on CUDA with AdamW, else train eagerly.
    Auto,
    /// Graph the step; refuse a run that cannot be graphed.
    On,
    /// Train eagerly.
    Off,
}

impl TrainArgs {
    /// Whether the training step is captured into a CUDA graph (see [`GraphMode`]).
    pub fn graphed(&self) -> bool {
        match self.cuda_graph {
            GraphMode::On => true,
            GraphMode::Off => false,
            GraphMode::Auto => self.device.is_cuda() && self.optimizer == "adamw" && self.clip_grad.is_none(),
        }
    }
}

fn datasets(name: &str, dir: Option<&Path>) -> Result<(nn::data::Dataset, nn::data::Dataset)> {
    let need_dir = || {
        dir.ok_or_else(|| engine::Error::Msg { context: "train", msg: format!("--dataset {name} needs --data-dir") })
    };
    match name {
        "mnist10k" => nn::data::Dataset::mnist10k(),
        "mnist" | "fashion-mnist" => nn::data::Dataset::mnist(need_dir()?),
        "cifar10" => nn::data::Dataset::cifar10(need_dir()?),
        other => Err(engine::Error::Msg {
            context: "train",
            msg: format!("unknown dataset '{other}' (mnist10k, mnist, fashion-mnist, cifar10)"),
        }),
    }
}

fn model_config(name: &str, data: &nn::data::Dataset) -> Result<mila::MllaConfig> {
    let mut cfg = match name {
        "mnist" => mila::MllaConfig::mnist(),
        "tiny" => mila::MllaConfig::tiny(),
        "small" => mila::MllaConfig::small(),
        "base" => mila::MllaConfig::base(),
        other => {
            return Err(engine::Error::Msg {
                context: "train",
                msg: format!("unknown model '{other}' (mnist, tiny, small, base)"),
            })
        }
    };
    // The input side must be a multiple of 32: pad the images up to it.
    cfg.img_size = data.height.max(data.width).div_ceil(32) * 32;
    cfg.in_chans = data.channels;
    cfg.num_classes = data.classes.max(2);
    Ok(cfg)
}

/// On CUDA, compiles every kernel module (NVRTC, one thread each: `ops::cuda::precompile`) on a thread of
/// its own, so that the compiles overlap opening the device, loading the data and building the model instead
/// of running one after another inside the first training step. A kernel needed before its module is ready
/// waits for that module's compile only; the kernels and so the results are the same either way. `None`
/// on the CPU, or if the thread cannot be started (the modules then compile on first use, as without this).
fn start_precompile(device: Device) -> Option<std::thread::JoinHandle<Result<()>>> {
    let Device::Cuda(ordinal) = device else { return None };
    std::thread::Builder::new()
        .name("precompile".into())
        .spawn(move || ops::cuda::precompile(&*engine::cuda::device(ordinal)?))
        .ok()
}

/// Waits for [`start_precompile`]'s thread; what went wrong there, if anything.
fn finish_precompile(handle: Option<std::thread::JoinHandle<Result<()>>>) -> Option<String> {
    match handle?.join() {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("the thread panicked".into()),
    }
}

/// `mila train`.
pub fn train(args: &TrainArgs) -> Result<ExitCode> {
    let mut precompile = start_precompile(args.device);
    if args.graphed() {
        // No module may be loaded by another thread while the step is being captured: wait for the compiles
        // here (the first, eager step would otherwise compile what it needs itself).
        if let Some(why) = finish_precompile(precompile.take()) {
            eprintln!("warning: compiling the CUDA kernels ahead of use: {why}");
        }
    }
    let outcome = run_training(args);
    // Joined on every way out: no NVRTC thread is left running while the process exits. A failure there is
    // only a warning after a good run (a module that the run needed would have failed it with the same error),
    // and not worth a word after a failed one (opening the device, say, failed there too).
    if let (Some(why), Ok(_)) = (finish_precompile(precompile), &outcome) {
        eprintln!("warning: compiling the CUDA kernels ahead of use: {why}");
    }
    outcome
}

fn run_training(args: &TrainArgs) -> Result<ExitCode> {
    use std::sync::Arc;
    let (train_set, test_set) = datasets(&args.dataset, args.data_dir.as_deref())?;
    let mut model_cfg = model_config(&args.model, &train_set)?;
    if !(0.0..1.0).contains(&args.drop_path) {
        let msg = format!("--drop-path {} is not in [0, 1)", args.drop_path);
        return Err(engine::Error::Msg { context: "train", msg });
    }
    model_cfg.drop_path_rate = args.drop_path;
    if let Some(c) = args.clip_grad.filter(|c| !(c.is_finite() && *c > 0.0)) {
        return Err(engine::Error::Msg { context: "train", msg: format!("--clip-grad {c} is not a positive norm") });
    }
    let pad = (model_cfg.img_size - train_set.height) / 2;
    let optimizer = match args.optimizer.as_str() {
        "adamw" => nn::trainer::OptimizerKind::AdamW,
        "sgd" => nn::trainer::OptimizerKind::Sgd,
        o => return Err(engine::Error::Msg { context: "train", msg: format!("unknown optimizer '{o}' (adamw, sgd)") }),
    };
    let (mean, std) = if train_set.channels == 1 {
        (vec![0.1307], vec![0.3081])
    } else {
        (vec![0.4914, 0.4822, 0.4465], vec![0.2470, 0.2435, 0.2616])
    };
    let cfg = nn::trainer::TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        min_lr: 0.0,
        weight_decay: args.weight_decay,
        optimizer,
        momentum: 0.9,
        warmup_frac: 0.05,
        label_smoothing: args.label_smoothing,
        clip_grad: args.clip_grad,
        seed: args.seed,
        device: args.device,
        dtype: args.dtype,
        random_shift: 2,
        pad,
        mean,
        std,
        out_dir: args.out.clone(),
        progress: true,
        stop_after: args.stop_after,
        ema_decay: args.ema,
        cuda_graph: args.graphed(),
        drop_last: args.drop_last,
    };
    let mut rng = engine::Generator::new(args.seed);
    let mut init = nn::Init { dtype: args.dtype, device: args.device, rng: &mut rng };
    let mut model = mila::Mlla::new(&mut init, &model_cfg)?;
    println!(
        "training MLLA '{}' ({} parameters) on {} ({} train / {} test) on {} in {}",
        args.model,
        nn::Module::num_params(&model),
        args.dataset,
        train_set.n,
        test_set.n,
        args.device,
        args.dtype
    );
    let started = std::time::Instant::now();
    let metrics = nn::trainer::train(&mut model, Arc::new(train_set), Arc::new(test_set), &cfg, args.resume)?;
    println!("\n| epoch | train loss | train acc | test loss | test acc | img/s | s |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for m in &metrics {
        println!(
            "| {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.0} | {:.1} |",
            m.epoch, m.train_loss, m.train_acc, m.test_loss, m.test_acc, m.images_per_s, m.seconds
        );
    }
    if let Some(raw) = metrics.last().and_then(|m| m.test_acc_raw) {
        println!(
            "test accuracy of the weight average (--ema {}); of the last weights: {:.2}%",
            cfg.ema_decay.unwrap_or(0.0),
            100.0 * raw
        );
    }
    if let Some(last) = metrics.last() {
        println!(
            "done: test accuracy {:.2}% after {} epochs, {:.1} s in all; {} holds metrics.jsonl, curves.png and last.safetensors",
            100.0 * last.test_acc,
            last.epoch,
            started.elapsed().as_secs_f64(),
            args.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `mila eval CHECKPOINT`: rebuilds the run's model from the checkpoint's config and reports test accuracy.
pub fn eval(path: &Path) -> Result<ExitCode> {
    let ck = nn::checkpoint::load(path)?;
    let cfg = nn::trainer::checkpoint_config(&ck)?;
    let (_, test_set) = datasets("mnist10k", None)?;
    let model_cfg = model_config("mnist", &test_set)?;
    let mut rng = engine::Generator::new(0);
    let mut init = nn::Init { dtype: cfg.dtype, device: cfg.device, rng: &mut rng };
    let mut model = mila::Mlla::new(&mut init, &model_cfg)?;
    ck.load_into(&model, "", false)?;
    let loader = nn::data::Loader::new(
        std::sync::Arc::new(test_set),
        nn::data::LoaderConfig {
            batch_size: cfg.batch_size,
            shuffle: false,
            drop_last: false,
            seed: 0,
            mean: cfg.mean.clone(),
            std: cfg.std.clone(),
            augment: nn::data::Augment { pad: cfg.pad, random_shift: 0 },
        },
    )?;
    let (loss, acc) = nn::trainer::evaluate(&mut model, &loader, &cfg)?;
    println!("{}: test loss {loss:.4}, test accuracy {:.2}%", path.display(), 100.0 * acc);
    Ok(ExitCode::SUCCESS)
}
