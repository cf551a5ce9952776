//! `mila bench models`: whole-model workloads timed on this engine, beside the same workloads timed in PyTorch
//! by `benches/pytorch/bench_models.py` (read from `--pytorch-json`), with the ratios ours/PyTorch against the
//! targets of issues 7 and 9.
//!
//! | key | workload | full size | `--quick` |
//! | --- | --- | --- | --- |
//! | `mlla_t_train_fp32`, `_tf32` | MLLA-T training step: forward, cross-entropy (label smoothing 0.1), backward, AdamW (lr 2e-3, weight decay 0.05 on weights) | `MllaConfig::tiny`, 224x224x3, 1000 classes, batch 128 | tiny's depths and heads with embed 16, 32x32x3, 10 classes, batch 2 |
//! | `mlla_t_infer_fp32`, `_tf32` | MLLA-T forward in eval mode without a graph | as above | as above |
//! | `block_fwd` | one MILA block (training mode, drop path 0), forward without a graph | C 64, 56x56 tokens, 2 heads, batch 64 | C 16, 8x8, 2 heads, batch 2 |
//! | `block_fwd_bwd` | the same forward with a graph, then backward of a fixed random cotangent | as above | as above |
//! | `small_train` | training step of the small MLLA (32x32x1, embed 32, depths 1,2,2,1, heads 1,2,4,8, 10 classes; 2.0M parameters) | batch 256 | batch 8 |
//! | `small_train_graph` | the same step captured once into a CUDA graph and replayed (`nn::GraphedStep`; CUDA only); compared with PyTorch's `small_train` rows | batch 256 | batch 8 |
//!
//! Targets (ours / PyTorch eager on the same GPU): training throughput >= 1.3x in fp32 and in TF32 with peak
//! memory <= 0.8x; inference throughput >= 1.3x; block forward+backward time <= 0.6x; the small model's step
//! <= 15 ms (absolute).
//!
//! Both halves time alike (the [`Clock`] of `mila bench`): random inputs made once, `warmup` untimed calls,
//! then `reps` repetitions of `calls` back-to-back calls (`calls` chosen after warm-up so a repetition lasts
//! at least 5 ms), CUDA events on the stream; the median per call. Gradients are dropped at the start of every
//! training step and before every forward+backward. Peak memory (CUDA) is the most the allocator had handed
//! out during the timed repetitions, after a reset that follows the warm-up: ours is the caching allocator's
//! `peak_bytes` (block sizes: requests rounded up to 512 B, or to 2 MiB above 1 MiB), PyTorch's is
//! `torch.cuda.max_memory_allocated` (requests rounded up to 512 B).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use engine::cuda::{self, CudaDevice};
use engine::{no_grad, DType, Device, Error, Generator, Result, Tensor};
use mila::{BlockConfig, MilaBlock, Mlla, MllaConfig};
use nn::{AdamW, AdamWConfig, GraphedStep, Init, Module, Optimizer, ParamGroup};
use serde::{Deserialize, Serialize};

use super::{
    cpu_description, default_device, parse_device, sig, write_json, Clock, Timing, MAX_CALLS_PER_REP, MIN_REP_MS,
};

/// `mila bench models`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelsBenchArgs {
    /// cpu, cuda or cuda:N (default: cuda when a device is available, else cpu).
    #[arg(long, value_parser = parse_device)]
    pub device: Option<Device>,
    /// Small sizes and few repetitions: a smoke run whose numbers mean little (use `bench_models.py --quick`
    /// for the PyTorch half).
    #[arg(long)]
    pub quick: bool,
    /// Timed repetitions; the median is reported (default 20, 3 with --quick).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Untimed calls before timing (default 3, 1 with --quick).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// The JSON written by `benches/pytorch/bench_models.py` on the same device.
    #[arg(long)]
    pub pytorch_json: Option<PathBuf>,
    /// Only these workload keys (comma-separated), e.g. `block_fwd,block_fwd_bwd`.
    #[arg(long)]
    pub only: Option<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

// ---- the PyTorch half ----------------------------------------------------------------------------------

/// One row of `bench_models.py`'s JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PytorchRow {
    pub key: String,
    pub shape: String,
    /// "eager" or "compile".
    pub mode: String,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    #[serde(default)]
    pub images_per_s: Option<f64>,
    #[serde(default)]
    pub peak_bytes: Option<u64>,
}

/// `bench_models.py`'s JSON (the fields read here).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PytorchReport {
    pub torch: String,
    pub device: String,
    pub quick: bool,
    pub rows: Vec<PytorchRow>,
}

fn read_pytorch(path: &Path) -> Result<PytorchReport> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Msg { context: "bench models", msg: format!("{}: {e}", path.display()) })
}

// ---- the workloads -------------------------------------------------------------------------------------

/// What a row measures: throughput (higher is better) or time (lower is better).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    ImagesPerS,
    Ms,
}

/// A workload's target.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// ours / PyTorch eager throughput at least this, and, where measured, peak memory at most `memory`.
    Throughput { ratio: f64, memory: Option<f64> },
    /// ours / PyTorch eager time at most this.
    TimeRatio(f64),
    /// ours at most this many milliseconds.
    AbsoluteMs(f64),
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Throughput { ratio, memory: Some(m) } => format!("img/s >= {ratio}x, peak <= {m}x"),
            Target::Throughput { ratio, memory: None } => format!("img/s >= {ratio}x"),
            Target::TimeRatio(r) => format!("time <= {r}x"),
            Target::AbsoluteMs(ms) => format!("<= {ms} ms"),
        }
    }
}

/// The sizes of the workloads; `bench_models.py`'s `workloads` makes the same.
struct Workloads {
    tiny: MllaConfig,
    tiny_batch: usize,
    /// The block's width, grid side, heads and batch.
    block: [usize; 4],
    small: MllaConfig,
    small_batch: usize,
}

fn workloads(quick: bool) -> Workloads {
    let mut tiny = MllaConfig::tiny();
    let small = MllaConfig::small32();
    if quick {
        (tiny.embed_dim, tiny.img_size, tiny.num_classes) = (16, 32, 10);
        Workloads { tiny, tiny_batch: 2, block: [16, 8, 2, 2], small, small_batch: 8 }
    } else {
        Workloads { tiny, tiny_batch: 128, block: [64, 56, 2, 64], small, small_batch: 256 }
    }
}

/// The workload's description, the same string as `bench_models.py`'s (rows are matched by it).
fn mlla_shape(cfg: &MllaConfig, batch: usize) -> String {
    let dash = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("-");
    format!(
        "MLLA embed {}, depths {}, heads {}, {s}x{s}x{}, {} classes, batch {batch}",
        cfg.embed_dim,
        dash(&cfg.depths),
        dash(&cfg.num_heads),
        cfg.in_chans,
        cfg.num_classes,
        s = cfg.img_size
    )
}

fn block_shape(dim: usize, side: usize, heads: usize, batch: usize) -> String {
    format!("MILA block C {dim}, {side}x{side} tokens, {heads} heads, batch {batch}")
}

/// Our timing of one workload.
struct Measured {
    timing: Timing,
    peak_bytes: Option<u64>,
    params: Option<usize>,
}

struct Ctx {
    device: Device,
    cuda: Option<Arc<CudaDevice>>,
    clock: Clock,
}

impl Ctx {
    /// Warm-up, calibration, then the timed repetitions with the allocator's peak reset just before them.
    fn measure(&self, mut f: impl FnMut() -> Result<()>, before_timing: &dyn Fn()) -> Result<Measured> {
        let c = &self.clock;
        for _ in 0..c.warmup {
            f()?;
        }
        c.sync()?;
        let calls = if c.quick {
            1
        } else {
            let single = c.once(1, &mut f)?;
            ((MIN_REP_MS / single.max(1e-6)).ceil() as usize).clamp(1, MAX_CALLS_PER_REP)
        };
        before_timing();
        c.sync()?;
        if let Some(dev) = &self.cuda {
            dev.reset_peak();
        }
        let mut per_call = Vec::with_capacity(c.reps);
        for _ in 0..c.reps.max(1) {
            per_call.push(c.once(calls, &mut f)? / calls as f64);
        }
        per_call.sort_by(f64::total_cmp);
        let n = per_call.len();
        let median = if n % 2 == 1 { per_call[n / 2] } else { 0.5 * (per_call[n / 2 - 1] + per_call[n / 2]) };
        let peak_bytes = self.cuda.as_ref().map(|d| d.memory_stats().peak_bytes as u64);
        let timing =
            Timing { median_ms: median, min_ms: per_call[0], max_ms: per_call[n - 1], reps: n, calls_per_rep: calls };
        Ok(Measured { timing, peak_bytes, params: None })
    }

    /// Gives the cached blocks back between workloads.
    fn free(&self) -> Result<()> {
        match &self.cuda {
            Some(dev) => dev.empty_cache(),
            None => Ok(()),
        }
    }

    fn init<'a>(&self, rng: &'a mut Generator) -> Init<'a> {
        Init { dtype: DType::F32, device: self.device, rng }
    }
}

/// What both training cases start from: the model (seed 0), AdamW with the main job's groups, a random batch
/// and labels, and the generator drop path draws from.
fn train_setup(ctx: &Ctx, cfg: &MllaConfig, batch: usize) -> Result<(Mlla, AdamW, Tensor, Vec<usize>, Generator)> {
    let mut rng = Generator::new(0);
    let model = Mlla::new(&mut ctx.init(&mut rng), cfg)?;
    let (decay, keep) = model.parameters_by_decay();
    let groups = vec![ParamGroup { params: decay, weight_decay: 0.05 }, ParamGroup { params: keep, weight_decay: 0.0 }];
    let opt = AdamW::new(groups, AdamWConfig { lr: 2e-3, ..Default::default() });
    let x =
        Tensor::randn(&[batch, cfg.in_chans, cfg.img_size, cfg.img_size], 0.0, 1.0, DType::F32, ctx.device, &mut rng)?;
    let labels: Vec<usize> = (0..batch).map(|_| rng.below(cfg.num_classes)).collect();
    Ok((model, opt, x, labels, Generator::new(1)))
}

/// A training step: drop the gradients, forward, label-smoothed cross-entropy, backward, AdamW. The last
/// step's loss is returned as a check (it must be finite).
fn train_case(ctx: &Ctx, cfg: &MllaConfig, batch: usize) -> Result<(Measured, f64)> {
    let (model, mut opt, x, labels, mut drop_rng) = train_setup(ctx, cfg, batch)?;
    let mut last_loss = None;
    let step = || -> Result<()> {
        opt.zero_grad();
        let logits = model.forward(&x, &mut drop_rng)?;
        let loss = ops::cross_entropy(&logits, &labels, 0.1)?;
        loss.backward()?;
        opt.step()?;
        last_loss = Some(loss.detach());
        Ok(())
    };
    let mut m = ctx.measure(step, &|| ())?;
    m.params = Some(model.num_params());
    let loss = last_loss.map_or(Ok(f64::NAN), |l| l.to_scalar())?;
    drop((model, opt, x));
    ctx.free()?;
    Ok((m, loss))
}

/// [`train_case`] with the step captured into a CUDA graph ([`GraphedStep`]) and replayed: the same model,
/// optimizer, batch and labels; the graph's construction (an eager warm-up step and the capture) comes
/// first, untimed, then each call copies the batch and the labels' targets into the graph's buffers, writes
/// AdamW's hyperparameters and launches the graph (the loss is copied out, as the trainer does). CUDA only.
fn train_graphed_case(ctx: &Ctx, cfg: &MllaConfig, batch: usize) -> Result<(Measured, f64)> {
    let (model, mut opt, x, labels, mut drop_rng) = train_setup(ctx, cfg, batch)?;
    let (mut graphed, _) = GraphedStep::new(&model, &mut opt, &x, &labels, 0.1, &mut drop_rng)?;
    let mut last_loss = None;
    let step = || -> Result<()> {
        last_loss = Some(graphed.run(&model, &mut opt, &x, &labels, &mut drop_rng)?.loss);
        Ok(())
    };
    let mut m = ctx.measure(step, &|| ())?;
    m.params = Some(model.num_params());
    let loss = last_loss.map_or(Ok(f64::NAN), |l| l.to_scalar())?;
    drop((graphed, model, opt, x));
    ctx.free()?;
    Ok((m, loss))
}

fn infer_case(ctx: &Ctx, cfg: &MllaConfig, batch: usize) -> Result<(Measured, f64)> {
    let mut rng = Generator::new(0);
    let mut model = Mlla::new(&mut ctx.init(&mut rng), cfg)?;
    model.set_training(false);
    let x =
        Tensor::randn(&[batch, cfg.in_chans, cfg.img_size, cfg.img_size], 0.0, 1.0, DType::F32, ctx.device, &mut rng)?;
    let mut out = None;
    let mut m = ctx.measure(
        || {
            out = Some(no_grad(|| model.forward(&x, &mut rng))?);
            Ok(())
        },
        &|| (),
    )?;
    m.params = Some(model.num_params());
    let check = out.map_or(Ok(f64::NAN), |o| finite_sum(&o))?;
    drop((model, x));
    ctx.free()?;
    Ok((m, check))
}

/// The sum of |x| (finite when every element is).
fn finite_sum(t: &Tensor) -> Result<f64> {
    Ok(t.to_vec_f64()?.iter().map(|v| v.abs()).sum())
}

fn block_cases(ctx: &Ctx, dim: usize, side: usize, heads: usize, batch: usize) -> Result<(Measured, Measured, f64)> {
    let mut rng = Generator::new(0);
    let cfg = BlockConfig {
        dim,
        input_resolution: (side, side),
        num_heads: heads,
        mlp_ratio: 4.0,
        qkv_bias: true,
        drop_path: 0.0,
    };
    let block = MilaBlock::new(&mut ctx.init(&mut rng), &cfg)?;
    let n = side * side;
    let x = Tensor::randn(&[batch, n, dim], 0.0, 1.0, DType::F32, ctx.device, &mut rng)?.requires_grad_(true)?;
    let g = Tensor::randn(&[batch, n, dim], 0.0, 1.0, DType::F32, ctx.device, &mut rng)?;
    let mut leaves = block.parameters();
    leaves.push(x.clone());
    let clear = || leaves.iter().for_each(Tensor::zero_grad);
    let mut drop_rng = Generator::new(1);
    let fwd = ctx.measure(|| no_grad(|| block.forward(&x, &mut drop_rng)).map(drop), &|| ())?;
    let both = ctx.measure(
        || {
            clear();
            block.forward(&x, &mut drop_rng)?.backward_with(&g)
        },
        &clear,
    )?;
    let check = x.grad().map_or(Ok(f64::NAN), |gx| finite_sum(&gx))?;
    drop((block, x, g, leaves));
    ctx.free()?;
    Ok((fwd, both, check))
}

// ---- the report ----------------------------------------------------------------------------------------

/// One line of the table: our number beside PyTorch's.
#[derive(Debug, Clone, Serialize)]
pub struct ModelsRow {
    pub key: String,
    pub name: String,
    pub shape: String,
    pub metric: Metric,
    pub params: Option<usize>,
    pub ours: Timing,
    pub ours_images_per_s: Option<f64>,
    pub ours_peak_bytes: Option<u64>,
    pub pytorch_eager: Option<PytorchRow>,
    pub pytorch_compile: Option<PytorchRow>,
    /// ours / PyTorch of the row's metric (img/s: higher is better for us; ms: lower is).
    pub ratio_eager: Option<f64>,
    pub ratio_compile: Option<f64>,
    /// Our peak bytes / PyTorch eager's.
    pub memory_ratio: Option<f64>,
    pub target: Option<String>,
    pub meets_target: Option<bool>,
    /// A finite loss or output: the workload computed numbers, not NaN.
    pub finite: bool,
    /// Our step ran by replaying one CUDA graph (`small_train_graph`; its PyTorch columns are those of
    /// `small_train`, eager and compiled, which run the same step without a graph).
    pub cuda_graph: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelsReport {
    pub bench: &'static str,
    pub device: String,
    pub pytorch_device: Option<String>,
    pub torch: Option<String>,
    pub quick: bool,
    pub warmup: usize,
    pub reps: usize,
    pub timing: String,
    pub rows: Vec<ModelsRow>,
    /// Workloads that failed (out of memory, a kernel error): `key: error`.
    pub errors: Vec<String>,
    pub notes: Vec<String>,
}

impl ModelsReport {
    fn ok(&self) -> bool {
        self.errors.is_empty()
            && self.rows.iter().all(|r| {
                r.finite
                    && r.ours.median_ms.is_finite()
                    && r.ratio_eager.is_none_or(f64::is_finite)
                    && r.ratio_compile.is_none_or(f64::is_finite)
            })
    }

    fn print(&self) {
        let mib = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.0}", b as f64 / (1u64 << 20) as f64));
        let ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
        println!();
        println!("mila bench models: ours on {}", self.device);
        match (&self.pytorch_device, &self.torch) {
            (Some(d), Some(t)) => println!("PyTorch {t} on {d}"),
            _ => println!("PyTorch: no --pytorch-json given"),
        }
        println!(
            "{}{}; {} warm-up calls, median of {} repetitions",
            self.timing,
            if self.quick { ", --quick sizes (a smoke run)" } else { "" },
            self.warmup,
            self.reps
        );
        println!();
        println!(
            "| workload | shape | ours | PyTorch eager | torch.compile | ours/eager | ours/compile | peak MiB ours | \
             peak MiB PyTorch | peak ours/PyTorch | target | verdict |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for r in &self.rows {
            let value = |ms: f64, ips: Option<f64>| match r.metric {
                Metric::ImagesPerS => ips.map_or("-".to_string(), |v| format!("{} img/s", sig(v))),
                Metric::Ms => format!("{} ms", sig(ms)),
            };
            let py =
                |p: &Option<PytorchRow>| p.as_ref().map_or("-".to_string(), |p| value(p.median_ms, p.images_per_s));
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                r.shape,
                value(r.ours.median_ms, r.ours_images_per_s),
                py(&r.pytorch_eager),
                py(&r.pytorch_compile),
                ratio(r.ratio_eager),
                ratio(r.ratio_compile),
                mib(r.ours_peak_bytes),
                mib(r.pytorch_eager.as_ref().and_then(|p| p.peak_bytes)),
                ratio(r.memory_ratio),
                r.target.as_deref().unwrap_or("-"),
                match (r.finite, r.meets_target) {
                    (false, _) => "NOT FINITE",
                    (true, Some(true)) => "met",
                    (true, Some(false)) => "MISSED",
                    (true, None) => "-",
                }
            );
        }
        for e in &self.errors {
            println!("- FAILED {e}");
        }
        for n in &self.notes {
            println!("- {n}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn row(
    key: &str,
    name: &str,
    shape: String,
    metric: Metric,
    batch: Option<usize>,
    m: &Measured,
    check: f64,
    target: Option<Target>,
    pytorch: Option<&PytorchReport>,
    notes: &mut Vec<String>,
) -> ModelsRow {
    let mut find = |mode: &str| {
        let p = pytorch?.rows.iter().find(|p| p.key == key && p.mode == mode)?;
        if p.shape != shape {
            notes.push(format!("{key} ({mode}): PyTorch ran '{}', ours '{shape}': not compared", p.shape));
            return None;
        }
        Some(p.clone())
    };
    let (eager, compile) = (find("eager"), find("compile"));
    let ips = batch.map(|b| b as f64 / (m.timing.median_ms * 1e-3));
    let ratio = |p: &Option<PytorchRow>| {
        p.as_ref().map(|p| match metric {
            Metric::ImagesPerS => p.median_ms / m.timing.median_ms,
            Metric::Ms => m.timing.median_ms / p.median_ms,
        })
    };
    let (ratio_eager, ratio_compile) = (ratio(&eager), ratio(&compile));
    let memory_ratio = m
        .peak_bytes
        .zip(eager.as_ref().and_then(|p| p.peak_bytes))
        .filter(|&(_, p)| p > 0)
        .map(|(o, p)| o as f64 / p as f64);
    let meets_target = target.and_then(|t| match t {
        Target::Throughput { ratio, memory } => {
            let speed = ratio_eager.map(|r| r >= ratio)?;
            let mem = match (memory, memory_ratio) {
                (Some(limit), Some(mr)) => mr <= limit,
                _ => true,
            };
            Some(speed && mem)
        }
        Target::TimeRatio(limit) => ratio_eager.map(|r| r <= limit),
        Target::AbsoluteMs(ms) => Some(m.timing.median_ms <= ms),
    });
    ModelsRow {
        key: key.to_string(),
        name: name.to_string(),
        shape,
        metric,
        params: m.params,
        ours: m.timing,
        ours_images_per_s: ips,
        ours_peak_bytes: m.peak_bytes,
        pytorch_eager: eager,
        pytorch_compile: compile,
        ratio_eager,
        ratio_compile,
        memory_ratio,
        target: target.map(|t| t.describe()),
        meets_target,
        finite: check.is_finite(),
        cuda_graph: false,
    }
}

/// `mila bench models`.
pub fn run(args: &ModelsBenchArgs) -> Result<ExitCode> {
    let device = default_device(args.device);
    let pytorch = args.pytorch_json.as_deref().map(read_pytorch).transpose()?;
    let (cuda_dev, description) = match device {
        Device::Cpu => (None, cpu_description()),
        Device::Cuda(i) => {
            let dev = cuda::device(i)?;
            let d = format!("{} (cuda:{i}, {:.1} GiB)", dev.name(), dev.total_memory() as f64 / (1u64 << 30) as f64);
            (Some(dev), d)
        }
    };
    let (warmup, reps) = if args.quick { (1, 3) } else { (3, 20) };
    let (warmup, reps) = (args.warmup.unwrap_or(warmup), args.reps.unwrap_or(reps).max(1));
    let ctx = Ctx {
        device,
        cuda: cuda_dev.clone(),
        clock: Clock { cuda: cuda_dev.clone(), warmup, reps, quick: args.quick },
    };
    let only: Option<Vec<&str>> = args.only.as_deref().map(|s| s.split(',').map(str::trim).collect());
    let want = |key: &str| only.as_ref().is_none_or(|o| o.contains(&key));
    let Workloads { tiny, tiny_batch, block: [bdim, bside, bheads, bbatch], small, small_batch } =
        workloads(args.quick);
    let mut notes = Vec::new();
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let py = pytorch.as_ref();

    for tf32 in [false, true] {
        if tf32 && cuda_dev.is_none() {
            continue; // TF32 is a CUDA setting
        }
        cuda::set_tf32(tf32);
        let suffix = if tf32 { "tf32" } else { "fp32" };
        let key = format!("mlla_t_train_{suffix}");
        let step = want(&key).then(|| attempt(&ctx, &key, train_case(&ctx, &tiny, tiny_batch), &mut errors));
        if let Some((m, loss)) = step.flatten() {
            // Peak memory is measured on CUDA only.
            let target = Target::Throughput { ratio: 1.3, memory: cuda_dev.is_some().then_some(0.8) };
            let name = format!("MLLA-T training step (AdamW), {suffix}");
            let shape = mlla_shape(&tiny, tiny_batch);
            let r =
                row(&key, &name, shape, Metric::ImagesPerS, Some(tiny_batch), &m, loss, Some(target), py, &mut notes);
            print_progress(&r);
            rows.push(r);
        }
        let key = format!("mlla_t_infer_{suffix}");
        let forward = want(&key).then(|| attempt(&ctx, &key, infer_case(&ctx, &tiny, tiny_batch), &mut errors));
        if let Some((m, check)) = forward.flatten() {
            let target = Target::Throughput { ratio: 1.3, memory: None };
            let name = format!("MLLA-T inference, {suffix}");
            let shape = mlla_shape(&tiny, tiny_batch);
            let r =
                row(&key, &name, shape, Metric::ImagesPerS, Some(tiny_batch), &m, check, Some(target), py, &mut notes);
            print_progress(&r);
            rows.push(r);
        }
    }
    cuda::set_tf32(false);
    let blocks = (want("block_fwd") || want("block_fwd_bwd"))
        .then(|| attempt(&ctx, "block_fwd", block_cases(&ctx, bdim, bside, bheads, bbatch), &mut errors))
        .flatten();
    if let Some((fwd, both, check)) = blocks {
        let shape = block_shape(bdim, bside, bheads, bbatch);
        let r = row(
            "block_fwd",
            "MILA block forward, fp32",
            shape.clone(),
            Metric::Ms,
            None,
            &fwd,
            check,
            None,
            py,
            &mut notes,
        );
        print_progress(&r);
        rows.push(r);
        let target = Some(Target::TimeRatio(0.6));
        let name = "MILA block forward+backward, fp32";
        let r = row("block_fwd_bwd", name, shape, Metric::Ms, None, &both, check, target, py, &mut notes);
        print_progress(&r);
        rows.push(r);
    }
    let small_step =
        want("small_train").then(|| attempt(&ctx, "small_train", train_case(&ctx, &small, small_batch), &mut errors));
    if let Some((m, loss)) = small_step.flatten() {
        let name = "small MLLA training step (AdamW), fp32";
        let shape = mlla_shape(&small, small_batch);
        let target = Some(Target::AbsoluteMs(15.0));
        let r = row("small_train", name, shape, Metric::Ms, Some(small_batch), &m, loss, target, py, &mut notes);
        print_progress(&r);
        rows.push(r);
    }
    // The same step replayed from a CUDA graph, beside PyTorch's rows of `small_train` (eager and compiled).
    let graphed = (cuda_dev.is_some() && want("small_train_graph"))
        .then(|| attempt(&ctx, "small_train_graph", train_graphed_case(&ctx, &small, small_batch), &mut errors));
    if let Some((m, loss)) = graphed.flatten() {
        let name = "small MLLA training step (AdamW), fp32, one CUDA graph";
        let shape = mlla_shape(&small, small_batch);
        let target = Some(Target::AbsoluteMs(15.0));
        let mut r = row("small_train", name, shape, Metric::Ms, Some(small_batch), &m, loss, target, py, &mut notes);
        r.key = "small_train_graph".into();
        r.cuda_graph = true;
        if let Some(eager) = rows.iter().find(|e| e.key == "small_train") {
            notes.push(format!(
                "small_train_graph: {:.3} ms per step replaying one CUDA graph vs {:.3} ms eager ({:.2}x faster)",
                m.timing.median_ms,
                eager.ours.median_ms,
                eager.ours.median_ms / m.timing.median_ms
            ));
        }
        print_progress(&r);
        rows.push(r);
    }

    if let Some(p) = &pytorch {
        if p.quick != args.quick {
            notes.push(format!(
                "the PyTorch JSON was made {} --quick and this run {} it: sizes differ",
                if p.quick { "with" } else { "without" },
                if args.quick { "with" } else { "without" }
            ));
        }
        let ours_name = cuda_dev.as_ref().map(|d| d.name().to_string());
        if let Some(name) = ours_name.filter(|n| !p.device.contains(n.as_str())) {
            notes.push(format!("PyTorch ran on '{}', ours on '{name}': not the same device", p.device));
        }
    } else {
        notes.push("no --pytorch-json: PyTorch columns and ratios are empty".into());
    }
    notes.push(
        "ours/eager and ours/compile: ours over PyTorch's in the row's unit (img/s: above 1 is faster; ms: below 1 \
         is faster); peak: the allocator's most handed-out bytes during the timed repetitions (ours in block sizes, \
         PyTorch's torch.cuda.max_memory_allocated), weights, optimizer state and inputs included"
            .into(),
    );
    let timing = match &cuda_dev {
        Some(_) => "CUDA events on the device's stream around each repetition".to_string(),
        None => format!("host wall clock, {} rayon threads", rayon::current_num_threads()),
    };
    let report = ModelsReport {
        bench: "models",
        device: description,
        pytorch_device: pytorch.as_ref().map(|p| p.device.clone()),
        torch: pytorch.as_ref().map(|p| p.torch.clone()),
        quick: args.quick,
        warmup,
        reps,
        timing,
        rows,
        errors,
        notes,
    };
    report.print();
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("wrote {}", path.display());
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The workload's value, or None with the error recorded (and the device's cache emptied) so that the
/// other workloads still run.
fn attempt<T>(ctx: &Ctx, key: &str, result: Result<T>, errors: &mut Vec<String>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("{key:<20} FAILED: {e}");
            errors.push(format!("{key}: {e}"));
            let _ = ctx.free();
            None
        }
    }
}

/// One line on stderr as each workload finishes (the table comes at the end).
fn print_progress(r: &ModelsRow) {
    let peak = r.ours_peak_bytes.map_or(String::new(), |b| format!(", peak {:.0} MiB", b as f64 / (1u64 << 20) as f64));
    eprintln!("{:<20} {:>10.3} ms{peak}   [{}]", r.key, r.ours.median_ms, r.shape);
}
