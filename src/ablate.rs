//! `mila ablate`: the paper's ablation (docs/MILA.md section 1) at small scale. Every variant of
//! [`mila::ablation`] is trained with the same data (the embedded MNIST-10k padded to 32x32), seed, recipe
//! and budget by the trainer of `mila train`, then the table is printed (parameters, multiply-adds,
//! training and inference throughput, top-1) and written as JSON with the settings.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use engine::{no_grad, DType, Device, Error, Generator, Result, Tensor};
use mila::{AblationConfig, AblationNet, Variant};
use nn::Module;
use serde::Serialize;

/// Default epochs per variant: a few minutes each on a GPU.
const EPOCHS: usize = 50;
/// `--quick`: one epoch (63 steps of 128), a few minutes for all nine variants on 2 cores. Half of it says
/// little: after 32 steps (one epoch of 4,000 images) test accuracy was still 11-36% for the linear
/// attention variants and 60% for MILA, too early to compare them.
const QUICK_EPOCHS: usize = 1;
/// Inference throughput is timed over at least this long (and at least 3 batches), after one warm-up batch.
const INFER_SECONDS: f64 = 1.0;

/// `mila ablate`: which variants, the budget, the device and where to write.
#[derive(Debug, Clone, clap::Parser)]
pub struct AblateArgs {
    /// Epochs per variant [default: 50; 1 with --quick].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Train on the first N of the 8,000 training images [default: all].
    #[arg(long)]
    pub train_samples: Option<usize>,
    /// Evaluate on the first N of the 2,000 test images [default: all].
    #[arg(long)]
    pub test_samples: Option<usize>,
    /// A CPU-sized budget: 1 epoch per variant (an explicit --epochs wins).
    #[arg(long)]
    pub quick: bool,
    /// Variants to train, comma-separated [default: all, in the paper's order]: baseline, input-gate,
    /// forget-gate, shortcut, no-norm, single-head, block-all, block-attn, mila.
    #[arg(long, value_delimiter = ',', value_parser = |s: &str| Variant::parse(s).map_err(|e| e.to_string()))]
    pub variants: Vec<Variant>,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value = "cpu", value_parser = |s: &str| Device::parse(s).map_err(|e| e.to_string()))]
    pub device: Device,
    #[arg(long, default_value = "f32", value_parser = |s: &str| DType::parse(s).map_err(|e| e.to_string()))]
    pub dtype: DType,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: one run folder per variant (metrics.jsonl, curves.png, last.safetensors) and
    /// ablate.json.
    #[arg(long, default_value = "runs/ablate")]
    pub out: PathBuf,
}

/// What every variant shared, as written in the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct AblateSettings {
    /// The macro design (stem, widths, depths, heads, MLP ratio).
    pub net: mila::MllaConfig,
    /// The single-head variant's q/k width and the all-blocks variant's E / C.
    pub d_state: usize,
    pub expand: f64,
    pub dataset: &'static str,
    pub train_samples: usize,
    pub test_samples: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    pub device: String,
    pub dtype: String,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct AblationRow {
    pub variant: Variant,
    /// The paper's row name.
    pub row: &'static str,
    pub params: usize,
    /// Multiply-adds of one image's forward (the paper's "FLOPs").
    pub macs: u64,
    /// Training images per second over all epochs (loader, forward, backward, step).
    pub train_images_per_s: Option<f64>,
    /// Inference images per second (eval mode, no graph, batches of --batch-size).
    pub infer_images_per_s: Option<f64>,
    /// Test accuracy after the last epoch, in [0, 1].
    pub top1: Option<f64>,
    /// Wall time of the variant's training and evaluation.
    pub seconds: f64,
    /// Why the variant has no result (its training stopped with this error).
    pub error: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    settings: &'a AblateSettings,
    rows: &'a [AblationRow],
}

/// The table in Markdown, one row per variant, in the order given.
pub fn ablation_table(rows: &[AblationRow]) -> String {
    let or_dash = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    let mut out = String::from(
        "| variant | params | MACs | train img/s | infer img/s | top-1 |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let top1 = match (&r.error, r.top1) {
            (Some(_), _) => "failed".to_string(),
            (None, t) => or_dash(t, &|t| format!("{:.2}", 100.0 * t)),
        };
        out += &format!(
            "| {} | {:.3}M | {:.2}M | {} | {} | {top1} |\n",
            r.row,
            r.params as f64 / 1e6,
            r.macs as f64 / 1e6,
            or_dash(r.train_images_per_s, &|v| format!("{v:.0}")),
            or_dash(r.infer_images_per_s, &|v| format!("{v:.0}")),
        );
    }
    out
}

fn io(path: &std::path::Path, e: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source: e }
}

/// The first `n` samples, or all of them; `n` past the end is an error naming the flag.
fn take(data: nn::data::Dataset, n: Option<usize>, flag: &str) -> Result<nn::data::Dataset> {
    match n {
        None => Ok(data),
        Some(0) => Err(Error::Msg { context: "ablate", msg: format!("{flag} must be at least 1") }),
        Some(n) if n > data.n => {
            Err(Error::Msg { context: "ablate", msg: format!("{flag} {n}: the dataset has {} samples", data.n) })
        }
        Some(n) => data.subset(0..n),
    }
}

/// Images per second of `model`'s eval-mode forward on batches of `batch` random images: one warm-up batch
/// (kernel compilation, buffer pools), then batches until [`INFER_SECONDS`] have passed (at least 3). Each
/// batch's logits are copied to the host, which waits for the device.
fn inference_throughput(model: &mut AblationNet, batch: usize, device: Device, dtype: DType) -> Result<f64> {
    let net = &model.config.net;
    let shape = [batch, net.in_chans, net.img_size, net.img_size];
    let x = Tensor::randn(&shape, 0.0, 1.0, dtype, device, &mut Generator::new(0))?;
    model.set_training(false);
    let mut rng = Generator::new(0);
    no_grad(|| -> Result<f64> {
        model.forward(&x, &mut rng)?.to_vec_f64()?;
        let started = Instant::now();
        let mut batches = 0;
        while batches < 3 || started.elapsed().as_secs_f64() < INFER_SECONDS {
            model.forward(&x, &mut rng)?.to_vec_f64()?;
            batches += 1;
        }
        Ok((batches * batch) as f64 / started.elapsed().as_secs_f64())
    })
}

/// Trains one variant and measures it; a training error is kept in the row, not returned.
fn run_variant(
    variant: Variant,
    args: &AblateArgs,
    settings: &AblateSettings,
    data: (&Arc<nn::data::Dataset>, &Arc<nn::data::Dataset>),
) -> Result<AblationRow> {
    let config =
        AblationConfig { net: settings.net.clone(), d_state: settings.d_state, expand: settings.expand, variant };
    let mut rng = Generator::new(args.seed);
    let mut model = AblationNet::new(&mut nn::Init { dtype: args.dtype, device: args.device, rng: &mut rng }, &config)?;
    let (params, macs) = (model.num_params(), model.macs());
    println!("\n{} ({}): {params} parameters, {:.2}M MACs", variant.row(), variant.name(), macs as f64 / 1e6);
    let train_cfg = nn::trainer::TrainConfig {
        epochs: settings.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        min_lr: 0.0,
        weight_decay: 0.05,
        optimizer: nn::trainer::OptimizerKind::AdamW,
        momentum: 0.9,
        warmup_frac: 0.05,
        label_smoothing: 0.1,
        clip_grad: None,
        seed: args.seed,
        device: args.device,
        dtype: args.dtype,
        random_shift: 2,
        pad: (config.net.img_size - data.0.height) / 2,
        mean: vec![nn::data::MNIST_MEAN],
        std: vec![nn::data::MNIST_STD],
        out_dir: args.out.join(variant.name()),
        progress: true,
        stop_after: None,
        ema_decay: None,
        cuda_graph: false,
        drop_last: false,
    };
    let started = Instant::now();
    let trained = nn::trainer::train(&mut model, data.0.clone(), data.1.clone(), &train_cfg, false);
    let mut row = AblationRow {
        variant,
        row: variant.row(),
        params,
        macs,
        train_images_per_s: None,
        infer_images_per_s: None,
        top1: None,
        seconds: 0.0,
        error: None,
    };
    match trained {
        Ok(metrics) => {
            let (images, seconds) =
                metrics.iter().fold((0.0, 0.0), |(i, s), m| (i + m.images_per_s * m.seconds, s + m.seconds));
            row.train_images_per_s = Some(images / f64::max(seconds, 1e-9));
            row.top1 = metrics.last().map(|m| m.test_acc);
            row.infer_images_per_s = Some(inference_throughput(&mut model, args.batch_size, args.device, args.dtype)?);
        }
        Err(e) => {
            println!("{}: training stopped: {e}", variant.name());
            row.error = Some(e.to_string());
        }
    }
    row.seconds = started.elapsed().as_secs_f64();
    Ok(row)
}

/// `mila ablate`. Fails if any variant's training failed (the table and JSON still hold the others).
pub fn ablate(args: &AblateArgs) -> Result<ExitCode> {
    let (train_set, test_set) = nn::data::Dataset::mnist10k()?;
    let train_set = take(train_set, args.train_samples, "--train-samples")?;
    let test_set = take(test_set, args.test_samples, "--test-samples")?;
    let epochs = args.epochs.unwrap_or(if args.quick { QUICK_EPOCHS } else { EPOCHS });
    if epochs == 0 || args.batch_size == 0 {
        return Err(Error::Msg { context: "ablate", msg: "--epochs and --batch-size must be at least 1".into() });
    }
    let variants = if args.variants.is_empty() { Variant::ALL.to_vec() } else { args.variants.clone() };
    let model = AblationConfig::mnist(Variant::Baseline);
    let settings = AblateSettings {
        net: mila::MllaConfig { in_chans: train_set.channels, num_classes: train_set.classes.max(2), ..model.net },
        d_state: model.d_state,
        expand: model.expand,
        dataset: "mnist10k",
        train_samples: train_set.n,
        test_samples: test_set.n,
        epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        seed: args.seed,
        device: args.device.to_string(),
        dtype: args.dtype.to_string(),
    };
    println!(
        "ablation: {} variants, {epochs} epochs each on {} MNIST-10k training images ({} test), batch {}, AdamW {}, \
         seed {}, {} in {}",
        variants.len(),
        train_set.n,
        test_set.n,
        args.batch_size,
        args.lr,
        args.seed,
        args.device,
        args.dtype
    );
    let (train_set, test_set) = (Arc::new(train_set), Arc::new(test_set));
    let mut rows = Vec::with_capacity(variants.len());
    for &variant in &variants {
        rows.push(run_variant(variant, args, &settings, (&train_set, &test_set))?);
    }
    let table = ablation_table(&rows);
    println!("\n{table}");
    std::fs::create_dir_all(&args.out).map_err(|e| io(&args.out, e))?;
    let path = args.out.join("ablate.json");
    let json = serde_json::to_string_pretty(&Report { settings: &settings, rows: &rows })
        .map_err(|e| Error::Msg { context: "ablate", msg: e.to_string() })?;
    std::fs::write(&path, json + "\n").map_err(|e| io(&path, e))?;
    println!("wrote {} (and one run folder per variant)", path.display());
    let failed: Vec<&str> = rows.iter().filter(|r| r.error.is_some()).map(|r| r.variant.name()).collect();
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("ablate: training failed for {}", failed.join(", "));
        Ok(ExitCode::FAILURE)
    }
}
