//! A whole training step (forward, label-smoothed cross-entropy, backward, optimizer update) captured into
//! one CUDA graph and replayed each step: the host launches one graph instead of hundreds of kernels, which
//! is what a small model's step is bound by (see engine's `cuda/graph.rs` for the capture itself).
//!
//! How a step's changing inputs reach a graph that was recorded once:
//!
//! - the batch: [`GraphedStep::run`] copies the images (a device tensor) into the graph's static input
//!   buffer with one device copy, outside the graph;
//! - the labels: the target distribution of the cross-entropy ([`ops::smoothed_targets`], one-hot with label
//!   smoothing) is written into a static device tensor, which the captured [`ops::cross_entropy_soft`] reads;
//! - the learning rate and the step counts (AdamW's bias corrections): the captured update reads them from a
//!   device tensor ([`Optimizer::step_graphed`]), written before each replay with the values
//!   [`Optimizer::next_graphed_hyper`] computes on the host exactly as an eager step computes its kernel
//!   arguments;
//! - the drop-path (and dropout) masks: the capture runs under [`ops::with_fed_masks`], so that each mask is
//!   a device buffer of its own; before each replay [`GraphedStep::run`] draws every mask's values from the
//!   model's generator, in the forward's order, exactly the draws an eager step makes, and writes them there.
//!
//! The first step runs eagerly: it is a real training step, and the warm-up that compiles every kernel,
//! creates the cuBLAS handles and workspaces, chooses the GEMM algorithms and creates the optimizer's state,
//! none of which may happen during a capture. The capture that follows records the next step without
//! running it; [`GraphedStep::run`] then runs a step per replay. Because a replay runs the very kernels of an
//! eager step, in the same order, on the same values, the losses and weights are those of eager training,
//! bit for bit (the test `graphed_training_matches_eager_training_bitwise` checks it on the GPU).
//!
//! Not graphable, refused with an error: a model that draws host random numbers in its forward other than
//! through dropout or drop path (a replay would repeat the capture's draws), an optimizer without a graphed
//! update (SGD), a CPU device. Gradient clipping reads the gradient norm back to the host and cannot be captured either (the
//! trainer refuses `--cuda-graph` with `--clip-grad`). A graph is for one batch shape: run a batch of
//! another shape (an epoch's last, smaller one) eagerly; the graph stays valid.

use engine::cuda::CapturedGraph;
use engine::{DType, Device, Error, Generator, Result, Tensor};

use crate::module::{Entry, Module};
use crate::optim::Optimizer;
use crate::trainer::Classifier;

/// One training step of fixed shapes, captured into a CUDA graph (see the module docs).
pub struct GraphedStep {
    graph: CapturedGraph,
    /// The static input: the images of the step being run are copied here.
    x: Tensor,
    /// The static target distribution (N, classes).
    q: Tensor,
    /// The optimizer's per-step hyperparameters.
    hyper: Tensor,
    /// The captured step's random masks, in the order the forward draws them.
    masks: Vec<ops::FedMask>,
    /// The loss and logits of the last replay (rewritten by each).
    loss: Tensor,
    logits: Tensor,
    label_smoothing: f64,
    /// What one step adds to each of the model's counters (BatchNorm's `num_batches_tracked`, counted on
    /// the host in the forward): a replay does not run the forward's host code, so [`GraphedStep::run`] adds
    /// them.
    counter_steps: Vec<u64>,
    replays: u64,
}

/// The loss (a scalar) and the logits of one step, in tensors of their own.
#[derive(Clone)]
pub struct StepOutput {
    pub loss: Tensor,
    pub logits: Tensor,
}

fn graph_error(msg: impl Into<String>) -> Error {
    Error::Msg { context: "cuda graph", msg: msg.into() }
}

fn counter_values<M: Module + ?Sized>(model: &M) -> Vec<u64> {
    model.counters().into_iter().map(|(_, v)| v).collect()
}

/// Adds `deltas[i]` to the model's i-th counter (in visit order), or takes it away with `undo`.
fn bump_counters<M: Module + ?Sized>(model: &M, deltas: &[u64], undo: bool) {
    let mut i = 0;
    model.visit(&mut |_, e| {
        if let Entry::Counter(c) = e {
            if let Some(&d) = deltas.get(i) {
                if undo {
                    c.fetch_sub(d, std::sync::atomic::Ordering::Relaxed);
                } else {
                    c.fetch_add(d, std::sync::atomic::Ordering::Relaxed);
                }
            }
            i += 1;
        }
    });
}

/// A copy of `t` in storage of its own (the graph's outputs are overwritten by the next replay).
fn snapshot(t: &Tensor) -> Result<Tensor> {
    let storage = t.storage().copy_contiguous(t.layout())?;
    Tensor::from_storage(storage, t.shape())
}

impl GraphedStep {
    /// Runs one eager training step on `images` (N, C, H, W, on a CUDA device, the model's dtype) and
    /// `labels` (N class indices) — forward in the model's current mode, cross-entropy with
    /// `label_smoothing`, backward, `opt.step()` — and then captures the next step of the same shapes
    /// into a graph, without running it. Returns the graphed step and the eager step's output.
    ///
    /// `rng` is the model's generator: the eager step draws its drop-path masks from it; the capture leaves it
    /// as the eager step left it (each replay draws its own masks from it in [`GraphedStep::run`]). A model
    /// that draws from it otherwise than through dropout or drop path is refused.
    pub fn new<M: Classifier>(
        model: &M,
        opt: &mut dyn Optimizer,
        images: &Tensor,
        labels: &[usize],
        label_smoothing: f64,
        rng: &mut Generator,
    ) -> Result<(GraphedStep, StepOutput)> {
        let Device::Cuda(ordinal) = images.device() else {
            return Err(graph_error(format!("CUDA graphs need a CUDA device, the images are on {}", images.device())));
        };
        let dev = engine::cuda::device(ordinal)?;
        if opt.graphed_hyper_len().is_none() {
            return Err(graph_error("this optimizer cannot run inside a CUDA graph (AdamW can)"));
        }
        // The warm-up: an eager step, exactly as the trainer's.
        opt.zero_grad();
        let logits = model.logits(images, rng)?;
        let loss = ops::cross_entropy(&logits, labels, label_smoothing)?;
        loss.backward()?;
        opt.step()?;
        let warm = StepOutput { loss: loss.detach(), logits: logits.detach() };
        drop((logits, loss));

        let classes = warm.logits.shape().get(1).copied().unwrap_or(0);
        let device = images.device();
        let x = Tensor::zeros(images.shape(), images.dtype(), device)?;
        // In the logits' dtype, as cross_entropy makes it.
        let q = Tensor::zeros(&[labels.len(), classes], warm.logits.dtype(), device)?;
        let hyper_len = opt.graphed_hyper_len().unwrap_or(0);
        let hyper = Tensor::zeros(&[hyper_len], DType::F64, device)?;
        let counters = counter_values(model);
        let before = rng.state();
        let ((graph, (loss, logits)), masks) = ops::with_fed_masks(|| {
            dev.capture(|| {
                opt.zero_grad();
                let logits = model.logits(&x, rng)?;
                let loss = ops::cross_entropy_soft(&logits, &q)?;
                loss.backward()?;
                opt.step_graphed(&hyper)?;
                Ok((loss.detach(), logits.detach()))
            })
        })?;
        // Every draw of the capture must have been a fed mask's: the replays draw those again.
        let fed: usize = masks.iter().map(ops::FedMask::len).sum();
        let mut replayed = Generator::from_state(before);
        for _ in 0..fed {
            replayed.uniform();
        }
        if replayed.state() != rng.state() {
            return Err(graph_error(
                "the model draws random numbers on the host in its forward other than for dropout or drop path: \
                 a CUDA graph would replay the same draws every step; train without the graph",
            ));
        }
        // The capture ran no step: the generator goes back to where the eager step left it.
        *rng = Generator::from_state(before);
        // The capture ran the forward's host code but no step: its counter increments are each replay's.
        let counter_steps: Vec<u64> =
            counter_values(model).iter().zip(&counters).map(|(after, before)| after.saturating_sub(*before)).collect();
        bump_counters(model, &counter_steps, true);
        let step = GraphedStep { graph, x, q, hyper, masks, loss, logits, label_smoothing, counter_steps, replays: 0 };
        Ok((step, warm))
    }

    /// One training step on `images` and `labels` (the shapes of the capture) by a replay of the graph: the
    /// inputs, `opt`'s next hyperparameters (at its current learning rate) and the step's masks (drawn from
    /// `rng`, the model's generator) are written to the graph's device buffers, then the graph is launched, and the model's host counters advance as a forward would
    /// advance them. `model` and `opt` must be those given to [`GraphedStep::new`] (the graph updates their
    /// tensors, whatever is passed). Returns at once, like any op; the output is a copy that the next replay
    /// does not overwrite.
    pub fn run<M: Module + ?Sized>(
        &mut self,
        model: &M,
        opt: &mut dyn Optimizer,
        images: &Tensor,
        labels: &[usize],
        rng: &mut Generator,
    ) -> Result<StepOutput> {
        if images.shape() != self.x.shape() || labels.len() != self.q.shape()[0] {
            return Err(Error::invalid(
                "cuda graph",
                format!(
                    "the graph was captured for images {:?} and {} labels, got {} labels (run other shapes eagerly)",
                    self.x.shape(),
                    self.q.shape()[0],
                    labels.len()
                ),
                images.shape(),
            ));
        }
        let q = ops::smoothed_targets(labels, self.q.shape()[1], self.label_smoothing)?;
        let hyper = opt.next_graphed_hyper()?;
        if hyper.len() != self.hyper.numel() {
            return Err(graph_error(format!(
                "the optimizer gives {} hyperparameters, the graph was captured with {} (another optimizer?)",
                hyper.len(),
                self.hyper.numel()
            )));
        }
        ops::copy_into(&self.x, &self.x.layout().clone(), &images.detach())?;
        self.q.write_f64(&q)?;
        self.hyper.write_f64(&hyper)?;
        for mask in &self.masks {
            mask.draw(rng)?;
        }
        self.graph.replay()?;
        bump_counters(model, &self.counter_steps, false);
        self.replays += 1;
        Ok(StepOutput { loss: snapshot(&self.loss)?, logits: snapshot(&self.logits)? })
    }

    /// Replays so far.
    pub fn replays(&self) -> u64 {
        self.replays
    }

    /// Host-to-device copies frozen into the graph (constant tables an op uploads, such as RoPE's angles).
    pub fn frozen_uploads(&self) -> usize {
        self.graph.frozen_uploads()
    }

    /// The random masks each replay draws (dropout and drop-path layers active in the capture).
    pub fn fed_masks(&self) -> usize {
        self.masks.len()
    }

    /// The batch size and image shape the graph was captured for.
    pub fn input_shape(&self) -> &[usize] {
        self.x.shape()
    }
}
