//! The training loop: AdamW or SGD with parameter groups, linear warmup then cosine, label-smoothed
//! cross-entropy, evaluation every epoch, JSON-lines metrics, atomic checkpoints with everything needed to
//! resume exactly (weights, buffers, optimizer state, step, generator state, config), and a stop with a clear
//! message when the loss stops being finite.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use engine::{no_grad, DType, Device, Error, Generator, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::data::{Augment, Dataset, Loader, LoaderConfig};
use crate::ema::Ema;
use crate::graph::{GraphedStep, StepOutput};
use crate::module::Module;
use crate::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup, Sgd, SgdConfig};
use crate::schedule::CosineWarmup;

/// A model that maps a batch of images (N, C, H, W) to logits (N, classes).
pub trait Classifier: Module {
    /// `rng` drives the model's own randomness (drop path) in training mode.
    fn logits(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptimizerKind {
    AdamW,
    Sgd,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub optimizer: OptimizerKind,
    /// SGD momentum (ignored by AdamW).
    pub momentum: f64,
    /// Fraction of all steps spent in linear warmup.
    pub warmup_frac: f64,
    pub label_smoothing: f64,
    pub clip_grad: Option<f64>,
    pub seed: u64,
    pub device: engine::Device,
    pub dtype: engine::DType,
    /// Random shift of training images, in pixels.
    pub random_shift: usize,
    /// Zero padding of every image (2 turns MNIST's 28x28 into 32x32).
    pub pad: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub out_dir: PathBuf,
    /// Print a progress bar (off in tests).
    pub progress: bool,
    /// Stop after this many epochs of this call, as an interruption would (the schedule still spans
    /// `epochs`; `--resume` continues).
    #[serde(default)]
    pub stop_after: Option<usize>,
    /// Keep an exponential moving average of the weights with this decay ([`crate::ema`]) and evaluate it
    /// instead of the last weights.
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// On CUDA, run each training step by replaying one CUDA graph of the whole step (see
    /// [`crate::graph::GraphedStep`]): the first step runs eagerly and is captured, batches of another shape
    /// (an epoch's last) run eagerly. The same losses and weights as without it. AdamW only, no gradient
    /// clipping, no host randomness in the model (drop path 0).
    #[serde(default)]
    pub cuda_graph: bool,
    /// Drop each epoch's last batch when it is smaller than `batch_size` (as timm- and Swin-style trainers
    /// do), so that every step is a full batch.
    #[serde(default)]
    pub drop_last: bool,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    /// With an EMA, the last weights' test accuracy, measured after the last epoch only (test_acc is the
    /// average's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_acc_raw: Option<f64>,
    pub images_per_s: f64,
    pub seconds: f64,
    /// Every step's loss in this epoch (the resume test compares them).
    pub step_losses: Vec<f64>,
    /// Every step's wall time in this epoch, in seconds: from the end of the previous step (or the start of
    /// the epoch) to the end of this one, so waiting for the loader counts. Each step ends with the logits
    /// copied to the host, which waits for the device, so on CUDA these are completed steps (`mila bench
    /// train` takes their median).
    #[serde(default)]
    pub step_seconds: Vec<f64>,
}

/// On a GPU, the training loop reads losses and logits back once per this many steps (see [`train`]).
const SYNC_EVERY_ON_DEVICE: usize = 16;

/// A step whose loss and logits have not been read back yet.
struct Pending {
    loss: Tensor,
    logits: Tensor,
    labels: Vec<usize>,
    step: usize,
    batch: usize,
}

/// Where a run is, saved in each checkpoint's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    epochs_done: usize,
    step: usize,
    rng: [u64; 4],
    config: TrainConfig,
}

pub fn checkpoint_path(out_dir: &Path) -> PathBuf {
    out_dir.join("last.safetensors")
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source: e }
}

/// Counts of correct predictions of `logits` (host side).
fn correct(logits: &Tensor, labels: &[usize]) -> Result<usize> {
    let v = logits.to_vec_f64()?;
    let c = logits.shape()[1];
    Ok(v.chunks(c)
        .zip(labels)
        .filter(|(row, &l)| {
            let best = row.iter().enumerate().fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
            best == l
        })
        .count())
}

fn to_tensor(images: Vec<f32>, shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
    Tensor::from_vec(images, shape)?.to_dtype(dtype)?.to_device(device)
}

/// (mean loss, accuracy) of `model` on `data`, in eval mode, without a graph.
pub fn evaluate<M: Classifier>(model: &mut M, loader: &Loader, cfg: &TrainConfig) -> Result<(f64, f64)> {
    model.set_training(false);
    let mut rng = Generator::new(0); // unused in eval mode
    let (mut loss_sum, mut hits, mut n) = (0.0, 0usize, 0usize);
    no_grad(|| -> Result<()> {
        for b in loader.iter(0, 0) {
            let x = to_tensor(b.images, &b.shape, cfg.dtype, cfg.device)?;
            let logits = model.logits(&x, &mut rng)?;
            let loss = ops::cross_entropy(&logits, &b.labels, 0.0)?.to_scalar()?;
            loss_sum += loss * b.labels.len() as f64;
            hits += correct(&logits, &b.labels)?;
            n += b.labels.len();
        }
        Ok(())
    })?;
    Ok((loss_sum / n.max(1) as f64, hits as f64 / n.max(1) as f64))
}

fn loader_for(data: Arc<Dataset>, cfg: &TrainConfig, train: bool) -> Result<Arc<Loader>> {
    Ok(Arc::new(Loader::new(
        data,
        LoaderConfig {
            batch_size: cfg.batch_size,
            shuffle: train,
            drop_last: train && cfg.drop_last,
            seed: cfg.seed,
            mean: cfg.mean.clone(),
            std: cfg.std.clone(),
            augment: Augment { pad: cfg.pad, random_shift: if train { cfg.random_shift } else { 0 } },
        },
    )?))
}

fn make_optimizer<M: Classifier>(model: &M, cfg: &TrainConfig) -> Result<Box<dyn Optimizer>> {
    let (decay, keep) = model.parameters_by_decay();
    let groups = vec![
        ParamGroup { params: decay, weight_decay: cfg.weight_decay },
        ParamGroup { params: keep, weight_decay: 0.0 },
    ];
    Ok(match cfg.optimizer {
        OptimizerKind::AdamW => Box::new(AdamW::new(groups, AdamWConfig { lr: cfg.lr, ..Default::default() })),
        OptimizerKind::Sgd => Box::new(Sgd::new(
            groups,
            SgdConfig { lr: cfg.lr, momentum: cfg.momentum, dampening: 0.0, nesterov: false },
        )?),
    })
}

fn save_checkpoint<M: Classifier>(
    model: &M,
    opt: &dyn Optimizer,
    ema: Option<&Ema>,
    state: &RunState,
    path: &Path,
) -> Result<()> {
    let named = model.named_parameters();
    let (opt_tensors, opt_counters) = opt.export_state(&named);
    let mut tensors = model.state_dict();
    tensors.extend(opt_tensors);
    let mut counters = model.counters();
    counters.extend(opt_counters);
    if let Some(ema) = ema {
        let (t, c) = ema.export();
        tensors.extend(t);
        counters.extend(c);
    }
    let run = serde_json::to_string(state).map_err(|e| Error::Msg { context: "checkpoint", msg: e.to_string() })?;
    checkpoint::save(path, &tensors, &counters, HashMap::from([("run".to_string(), run)]))
}

/// Trains `model` on `train`, evaluating on `test` after every epoch. With `resume`, continues from the
/// checkpoint in `cfg.out_dir` (weights, optimizer, step and generator as they were). Returns each epoch's
/// metrics (also appended to `out_dir/metrics.jsonl`).
pub fn train<M: Classifier>(
    model: &mut M,
    train_data: Arc<Dataset>,
    test_data: Arc<Dataset>,
    cfg: &TrainConfig,
    resume: bool,
) -> Result<Vec<EpochMetrics>> {
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| io(&cfg.out_dir, e))?;
    let train_loader = loader_for(train_data, cfg, true)?;
    let test_loader = loader_for(test_data, cfg, false)?;
    let steps_per_epoch = train_loader.num_batches();
    let total = steps_per_epoch * cfg.epochs;
    let schedule = CosineWarmup {
        base: cfg.lr,
        min_lr: cfg.min_lr,
        warmup: ((total as f64 * cfg.warmup_frac).round() as usize).max(1),
        total,
    };
    if cfg.cuda_graph {
        let refuse = |why: &str| Err(Error::Msg { context: "train", msg: format!("--cuda-graph: {why}") });
        if !cfg.device.is_cuda() {
            return refuse("CUDA graphs need a CUDA device");
        }
        if cfg.clip_grad.is_some() {
            return refuse("gradient clipping reads the gradient norm back to the host, which a graph cannot do");
        }
        if cfg.optimizer != OptimizerKind::AdamW {
            return refuse("only AdamW has a graphed update");
        }
    }
    let mut opt = make_optimizer(model, cfg)?;
    let mut ema = cfg.ema_decay.map(|d| Ema::new(model, d)).transpose()?;
    let mut rng = Generator::new(cfg.seed ^ 0x6d69_6c61);
    // The captured step (with --cuda-graph), made at the first step of this call and kept across epochs.
    let mut graphed: Option<GraphedStep> = None;
    let (mut start_epoch, mut step) = (0, 0);
    let ck_path = checkpoint_path(&cfg.out_dir);
    if resume {
        let ck = checkpoint::load(&ck_path)?;
        let run: RunState = serde_json::from_str(ck.metadata.get("run").map(String::as_str).unwrap_or(""))
            .map_err(|e| Error::Msg { context: "resume", msg: format!("{}: no run state: {e}", ck_path.display()) })?;
        ck.load_into(model, "", false)?;
        opt.import_state(&model.named_parameters(), &ck.tensors, &ck.counters)?;
        if let Some(ema) = &mut ema {
            ema.import(&ck.tensors, &ck.counters)?;
        }
        (start_epoch, step) = (run.epochs_done, run.step);
        rng = Generator::from_state(run.rng);
    }
    let metrics_path = cfg.out_dir.join("metrics.jsonl");
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(resume)
        .write(true)
        .truncate(!resume)
        .open(&metrics_path)
        .map_err(|e| io(&metrics_path, e))?;
    let mut all = Vec::new();
    let end = cfg.stop_after.map_or(cfg.epochs, |n| (start_epoch + n).min(cfg.epochs));
    for epoch in start_epoch..end {
        model.set_training(true);
        let started = Instant::now();
        let bar = if cfg.progress {
            let b = indicatif::ProgressBar::new(steps_per_epoch as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let (mut loss_sum, mut hits, mut seen) = (0.0, 0usize, 0usize);
        let mut step_losses = Vec::with_capacity(steps_per_epoch);
        let (mut step_seconds, mut step_started) = (Vec::with_capacity(steps_per_epoch), Instant::now());
        // Losses and logits stay on the device until `sync_every` steps have queued: reading one back waits
        // for the device, and a wait per step would stop the host from queuing the next step while the device
        // runs this one. A non-finite loss is still found and named by its step, at most `sync_every - 1`
        // steps late (those steps' updates are lost with the run; the checkpoint on disk is the last good one).
        let sync_every = if cfg.device.is_cuda() { SYNC_EVERY_ON_DEVICE } else { 1 };
        let mut pending: Vec<Pending> = Vec::with_capacity(sync_every);
        let mut settle = |pending: &mut Vec<Pending>, bar: &indicatif::ProgressBar| -> Result<()> {
            for p in pending.drain(..) {
                let l = p.loss.to_scalar()?;
                if !l.is_finite() {
                    bar.abandon();
                    return Err(Error::Msg {
                        context: "train",
                        msg: format!(
                            "the loss is {l} at step {} (epoch {}, batch {}); stopped. The last good checkpoint is {}",
                            p.step,
                            epoch + 1,
                            p.batch,
                            ck_path.display()
                        ),
                    });
                }
                let n = p.labels.len();
                hits += correct(&p.logits, &p.labels)?;
                loss_sum += l * n as f64;
                seen += n;
                step_losses.push(l);
                let ips = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!("loss {l:.4} acc {:.3} {ips:.0} img/s", hits as f64 / seen as f64));
            }
            Ok(())
        };
        for batch in train_loader.spawn(epoch, 0, 4) {
            let lr = schedule.lr(step);
            opt.set_lr(lr);
            let x = to_tensor(batch.images, &batch.shape, cfg.dtype, cfg.device)?;
            if cfg.cuda_graph {
                let out = match &mut graphed {
                    Some(g) if g.input_shape() == x.shape() => {
                        g.run(&*model, opt.as_mut(), &x, &batch.labels, &mut rng)?
                    }
                    Some(_) => {
                        // Another batch shape (an epoch's last batch): eagerly, as without the graph.
                        opt.zero_grad();
                        let logits = model.logits(&x, &mut rng)?;
                        let loss = ops::cross_entropy(&logits, &batch.labels, cfg.label_smoothing)?;
                        loss.backward()?;
                        opt.step()?;
                        StepOutput { loss: loss.detach(), logits: logits.detach() }
                    }
                    None => {
                        let (g, out) =
                            GraphedStep::new(&*model, opt.as_mut(), &x, &batch.labels, cfg.label_smoothing, &mut rng)?;
                        graphed = Some(g);
                        out
                    }
                };
                pending.push(Pending {
                    loss: out.loss,
                    logits: out.logits,
                    labels: batch.labels,
                    step,
                    batch: batch.index,
                });
            } else {
                let logits = model.logits(&x, &mut rng)?;
                let loss = ops::cross_entropy(&logits, &batch.labels, cfg.label_smoothing)?;
                pending.push(Pending {
                    loss: loss.detach(),
                    logits: logits.detach(),
                    labels: batch.labels,
                    step,
                    batch: batch.index,
                });
                if sync_every == 1 {
                    // On the CPU the value is there already: a non-finite loss stops the run before its update.
                    settle(&mut pending, &bar)?;
                }
                opt.zero_grad();
                loss.backward()?;
                if let Some(max_norm) = cfg.clip_grad {
                    crate::optim::clip_grad_norm(&model.parameters(), max_norm)?;
                }
                opt.step()?;
            }
            if let Some(ema) = &mut ema {
                ema.update(model)?;
            }
            step += 1;
            if pending.len() >= sync_every {
                settle(&mut pending, &bar)?;
            }
            step_seconds.push(step_started.elapsed().as_secs_f64());
            step_started = Instant::now();
            bar.inc(1);
        }
        settle(&mut pending, &bar)?;
        let seconds = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let ((test_loss, test_acc), test_acc_raw) = match &ema {
            None => (evaluate(model, &test_loader, cfg)?, None),
            Some(ema) => {
                let averaged = ema.with_shadow(model, |m| evaluate(m, &test_loader, cfg))?;
                let raw = if epoch + 1 == cfg.epochs { Some(evaluate(model, &test_loader, cfg)?.1) } else { None };
                (averaged, raw)
            }
        };
        let m = EpochMetrics {
            epoch: epoch + 1,
            step,
            lr: schedule.lr(step.saturating_sub(1)),
            train_loss: loss_sum / seen.max(1) as f64,
            train_acc: hits as f64 / seen.max(1) as f64,
            test_loss,
            test_acc,
            test_acc_raw,
            images_per_s: seen as f64 / seconds.max(1e-9),
            seconds,
            step_losses,
            step_seconds,
        };
        if cfg.progress {
            println!(
                "epoch {:>3}/{}  loss {:.4}  train acc {:.4}  test loss {:.4}  test acc {:.4}  {:.0} img/s  {:.1} s",
                m.epoch, cfg.epochs, m.train_loss, m.train_acc, m.test_loss, m.test_acc, m.images_per_s, m.seconds
            );
        }
        let line = serde_json::to_string(&m).map_err(|e| Error::Msg { context: "metrics", msg: e.to_string() })?;
        writeln!(metrics_file, "{line}").map_err(|e| io(&metrics_path, e))?;
        let state = RunState { epochs_done: epoch + 1, step, rng: rng.state(), config: cfg.clone() };
        save_checkpoint(model, opt.as_ref(), ema.as_ref(), &state, &ck_path)?;
        all.push(m);
    }
    // The curves of the whole run, earlier sessions of a resumed one included.
    let history = read_metrics(&metrics_path)?;
    if !history.is_empty() {
        crate::plot::plot_metrics(&cfg.out_dir.join("curves.png"), &history)?;
    }
    Ok(all)
}

/// Every epoch recorded in a `metrics.jsonl`.
pub fn read_metrics(path: &Path) -> Result<Vec<EpochMetrics>> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| Error::Msg { context: "metrics", msg: format!("{}: {e}", path.display()) })
        })
        .collect()
}

/// The config stored in a checkpoint written by [`train`].
pub fn checkpoint_config(ck: &checkpoint::Checkpoint) -> Result<TrainConfig> {
    let run: RunState = serde_json::from_str(ck.metadata.get("run").map(String::as_str).unwrap_or(""))
        .map_err(|e| Error::Msg { context: "checkpoint", msg: format!("no run state in the metadata: {e}") })?;
    Ok(run.config)
}
