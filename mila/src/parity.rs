//! Parity with the official PyTorch code through the fixtures of `fixtures/` (see its README): build the
//! module of the file's `kind` from its `config`, load `param.*` by name, run forward (and, for MLLA, first
//! eval mode with the stored running statistics), backward with `cotangent`, and compare every stored
//! tensor by relative error ||x - ref|| / ||ref||. The `selective_scan` kind is the scan op alone: its inputs
//! are `input.<name>` and their gradients `grad.<name>`.

use std::path::Path;

use engine::{no_grad, DType, Device, Error, Generator, Result, Tensor};
use nn::checkpoint::{self, Checkpoint};
use nn::{Entry, Init, Module};
use serde::Deserialize;

use crate::attention::LinearAttention;
use crate::block::{BlockConfig, MilaBlock};
use crate::mamba::{MambaConfig, MambaMixer};
use crate::mlla::{Mlla, MllaConfig};

/// The fixture kinds this module checks (the metadata's `kind`).
pub const SUPPORTED_KINDS: [&str; 5] = ["LinearAttention", "MLLABlock", "MLLA", "MambaMixer", "selective_scan"];

/// One compared tensor.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The fixture's key: `output`, `grad.input`, `grad.attn.qk.weight`, `buffer_after.norm.running_var`, ...
    pub name: String,
    /// ||x - ref|| / ||scale||, where scale is the reference tensor itself except for gradients that are zero
    /// in exact arithmetic (see [`vanishing_scale`]).
    pub rel_error: f64,
    pub tolerance: f64,
    /// The key of the reference whose norm divides the error: `name` itself, or for a vanishing gradient
    /// the largest gradient of its parent module.
    pub relative_to: String,
    /// ||x - ref|| / ||ref||, the plain relative error (equal to `rel_error` unless `relative_to` differs).
    pub plain_error: f64,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.rel_error <= self.tolerance
    }
}

/// Every comparison of one fixture run, in the order they were made.
#[derive(Debug, Clone)]
pub struct ParityReport {
    pub kind: String,
    pub dtype: DType,
    pub device: Device,
    pub comparisons: Vec<Comparison>,
}

impl ParityReport {
    /// The comparison closest to (or furthest past) its tolerance.
    pub fn worst(&self) -> Option<&Comparison> {
        self.comparisons.iter().max_by(|a, b| (a.rel_error / a.tolerance).total_cmp(&(b.rel_error / b.tolerance)))
    }

    pub fn passed(&self) -> bool {
        self.comparisons.iter().all(Comparison::passed)
    }

    /// The largest relative error among the tensors whose name starts with `prefix`.
    pub fn max_error(&self, prefix: &str) -> f64 {
        self.comparisons.iter().filter(|c| c.name.starts_with(prefix)).map(|c| c.rel_error).fold(0.0, f64::max)
    }
}

/// Tolerances per dtype: (forward outputs, gradients and buffers). f64 meets the fixtures' 1e-9 everywhere;
/// f32 rounding (about 6e-8 per op) grows through the model's depth and its backward, so gradients get 1e-4.
pub fn tolerances(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-9, 1e-9),
        DType::F32 => (1e-5, 1e-4),
    }
}

/// ||got - want|| / ||want|| over all elements (the absolute norm of the difference when want is all zero).
pub fn rel_error(got: &Tensor, want: &Tensor) -> Result<f64> {
    let norm = norm(want)?;
    let diff = diff_norm(got, want)?;
    Ok(if norm > 0.0 { diff / norm } else { diff })
}

fn diff_norm(got: &Tensor, want: &Tensor) -> Result<f64> {
    if got.shape() != want.shape() {
        return Err(Error::ShapeMismatch { op: "parity", lhs: got.shape().to_vec(), rhs: want.shape().to_vec() });
    }
    let (g, w) = (got.to_vec_f64()?, want.to_vec_f64()?);
    Ok(g.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt())
}

fn norm(t: &Tensor) -> Result<f64> {
    Ok(t.to_vec_f64()?.iter().map(|v| v * v).sum::<f64>().sqrt())
}

/// Below this fraction of the largest gradient of its parent module, a reference gradient is vanishing.
const VANISHING: f64 = 1e-6;

/// The reference key to measure a vanishing parameter gradient against, or None for the tensor itself.
///
/// Two gradients of MLLA are zero in exact arithmetic, and both implementations return only what the
/// cancellation leaves:
/// - the bias of a conv followed by a BatchNorm on batch statistics (PatchMerging's `conv.2`): it shifts a
///   whole channel, which the normalisation subtracts again (fixture: 5e-14, next to 1e2 for the weight);
/// - `attn.qk` on a 1x1 grid (the last stage at 32x32): with one token, (q kv) z = v (q.k) / (q.k + 1e-6),
///   so q and k act only through the 1e-6 stabiliser (fixture: 2e-10, next to 1e-2 for `attn.lepe`); the
///   gradient is a difference of O(1) terms that agree to 1e-7, so even the float64 reference carries a
///   relative error near 1e-9, and float32 none of its digits.
///
/// A relative error between two such residues measures roundoff, not correctness. So a gradient below
/// [`VANISHING`] of the largest gradient in its parent module (`layers.3.blocks.0.attn` for
/// `layers.3.blocks.0.attn.qk.weight`) is measured against that largest gradient: the check becomes "ours
/// vanishes too". [`Comparison::relative_to`] names the key used, so reports show where this happened.
fn vanishing_scale(fx: &Fixture, key: &str) -> Result<Option<String>> {
    let Some(name) = key.strip_prefix("grad.").filter(|n| *n != "input") else { return Ok(None) };
    // The parent module: the name without its last two parts (`conv.bias`, `qk.weight`).
    let parts: Vec<&str> = name.split('.').collect();
    let parent = match parts[..parts.len().saturating_sub(2)].join(".") {
        p if p.is_empty() => "grad.".to_string(),
        p => format!("grad.{p}."),
    };
    let mut largest: Option<(f64, &String)> = None;
    for (k, t) in &fx.data.tensors {
        if k.starts_with(&parent) && k != "grad.input" {
            let n = norm(t)?;
            if largest.is_none_or(|(m, _)| n > m) {
                largest = Some((n, k));
            }
        }
    }
    let own = norm(fx.tensor(key)?)?;
    Ok(largest.filter(|&(m, _)| own < VANISHING * m).map(|(_, k)| k.clone()))
}

/// A fixture file: its `kind`, its `config` JSON and its tensors (on the CPU, float64; counters apart).
pub struct Fixture {
    pub kind: String,
    pub config: String,
    pub data: Checkpoint,
}

impl Fixture {
    pub fn load(path: &Path) -> Result<Self> {
        let data = checkpoint::load(path)?;
        let meta = |key: &str| {
            data.metadata.get(key).cloned().ok_or_else(|| Error::Msg {
                context: "parity",
                msg: format!("{}: no '{key}' in the safetensors metadata", path.display()),
            })
        };
        Ok(Fixture { kind: meta("kind")?, config: meta("config")?, data })
    }

    /// A stored tensor by key.
    pub fn tensor(&self, key: &str) -> Result<&Tensor> {
        self.data
            .tensors
            .get(key)
            .ok_or_else(|| Error::Msg { context: "parity", msg: format!("the fixture has no tensor '{key}'") })
    }
}

/// The config of a `LinearAttention` fixture.
#[derive(Deserialize)]
struct AttentionConfig {
    dim: usize,
    input_resolution: (usize, usize),
    num_heads: usize,
    #[serde(default = "default_true")]
    qkv_bias: bool,
}

fn default_true() -> bool {
    true
}

fn parse<T: for<'de> Deserialize<'de>>(kind: &str, json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| Error::Msg { context: "parity", msg: format!("{kind} config {json}: {e}") })
}

/// A module that a fixture can drive: forward from its one input.
trait Fixtured: Module {
    fn run(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor>;
}

impl Fixtured for LinearAttention {
    fn run(&self, x: &Tensor, _: &mut Generator) -> Result<Tensor> {
        self.forward(x)
    }
}

impl Fixtured for MilaBlock {
    fn run(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        self.forward(x, rng)
    }
}

impl Fixtured for Mlla {
    fn run(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        self.forward(x, rng)
    }
}

impl Fixtured for MambaMixer {
    fn run(&self, x: &Tensor, _: &mut Generator) -> Result<Tensor> {
        self.forward(x)
    }
}

/// Runs the fixture at `path` on `device` in `dtype` and compares every stored result.
pub fn run(path: &Path, device: Device, dtype: DType) -> Result<ParityReport> {
    let fx = Fixture::load(path)?;
    // The init is overwritten by the fixture's parameters; the seed only has to be fixed.
    let mut rng = Generator::new(0);
    let mut init = Init { dtype, device, rng: &mut rng };
    let comparisons = match fx.kind.as_str() {
        "LinearAttention" => {
            let c: AttentionConfig = parse(&fx.kind, &fx.config)?;
            let m = LinearAttention::new(&mut init, c.dim, c.input_resolution, c.num_heads, c.qkv_bias)?;
            compare(&fx, m, device, dtype)?
        }
        "MLLABlock" => {
            compare(&fx, MilaBlock::new(&mut init, &parse::<BlockConfig>(&fx.kind, &fx.config)?)?, device, dtype)?
        }
        "MLLA" => compare(&fx, Mlla::new(&mut init, &MllaConfig::from_json(&fx.config)?)?, device, dtype)?,
        "MambaMixer" => {
            compare(&fx, MambaMixer::new(&mut init, &parse::<MambaConfig>(&fx.kind, &fx.config)?)?, device, dtype)?
        }
        "selective_scan" => compare_scan(&fx, device, dtype)?,
        other => {
            return Err(Error::Msg {
                context: "parity",
                msg: format!(
                    "kind '{other}' is not supported yet (this command checks {})",
                    SUPPORTED_KINDS.join(", ")
                ),
            })
        }
    };
    Ok(ParityReport { kind: fx.kind, dtype, device, comparisons })
}

/// Measures computed tensors against a fixture's references, keeping the comparisons in order.
struct Checker<'a> {
    fx: &'a Fixture,
    comparisons: Vec<Comparison>,
}

impl Checker<'_> {
    fn check(&mut self, name: &str, got: &Tensor, tolerance: f64) -> Result<()> {
        let relative_to = vanishing_scale(self.fx, name)?.unwrap_or_else(|| name.to_string());
        let reference = self.fx.tensor(name)?;
        let plain_error = rel_error(got, reference)?;
        let scale = norm(self.fx.tensor(&relative_to)?)?;
        let diff = diff_norm(got, reference)?;
        let measured = if scale > 0.0 { diff / scale } else { diff };
        self.comparisons.push(Comparison {
            name: name.to_string(),
            rel_error: measured,
            tolerance,
            relative_to,
            plain_error,
        });
        Ok(())
    }
}

/// The gradient that backward left in `t`, or an error naming what it is.
fn grad_of(t: &Tensor, name: &str) -> Result<Tensor> {
    t.grad().ok_or_else(|| Error::Msg { context: "parity", msg: format!("no gradient reached '{name}'") })
}

/// The fixture's cotangent in the working dtype, on the working device.
fn cotangent(fx: &Fixture, device: Device, dtype: DType) -> Result<Tensor> {
    fx.tensor("cotangent")?.to_dtype(dtype)?.to_device(device)
}

/// Loads the fixture into `m` and compares eval output (when stored), output, gradients and buffers.
fn compare<M: Fixtured>(fx: &Fixture, mut m: M, device: Device, dtype: DType) -> Result<Vec<Comparison>> {
    let (tol_out, tol_grad) = tolerances(dtype);
    let mut checker = Checker { fx, comparisons: Vec::new() };
    fx.data.load_into(&m, "param", true)?;
    let input = fx.tensor("input")?.to_dtype(dtype)?.to_device(device)?;
    // drop path is 0 in the fixtures, so nothing is drawn; the generator is only a required argument.
    let mut rng = Generator::new(0);

    // Eval mode first, with the stored running statistics, before the training forward updates them.
    if fx.data.tensors.contains_key("eval_output") {
        m.set_training(false);
        let y = no_grad(|| m.run(&input, &mut rng))?;
        checker.check("eval_output", &y, tol_out)?;
        m.set_training(true);
    }

    let x = input.requires_grad_(true)?;
    let y = m.run(&x, &mut rng)?;
    checker.check("output", &y, tol_out)?;
    y.backward_with(&cotangent(fx, device, dtype)?)?;
    checker.check("grad.input", &grad_of(&x, "input")?, tol_grad)?;

    let params = m.named_parameters();
    for (name, p) in &params {
        checker.check(&format!("grad.{name}"), &grad_of(p, name)?, tol_grad)?;
    }
    let mut buffers = Vec::new();
    m.visit(&mut |name, e| {
        if let Entry::Buffer(t) = e {
            buffers.push((name.to_string(), t.clone()));
        }
    });
    let mut compared_buffers = 0;
    for (name, b) in &buffers {
        let key = format!("buffer_after.{name}");
        if fx.data.tensors.contains_key(&key) {
            checker.check(&key, b, tol_grad)?;
            compared_buffers += 1;
        }
    }

    // Every stored gradient and buffer must belong to the module: a name that matches nothing would
    // otherwise go unchecked.
    let grads = fx.data.tensors.keys().filter(|k| k.starts_with("grad.") && *k != "grad.input").count();
    let stored_buffers = fx.data.tensors.keys().filter(|k| k.starts_with("buffer_after.")).count();
    if grads != params.len() || stored_buffers != compared_buffers {
        return Err(Error::Msg {
            context: "parity",
            msg: format!(
                "the fixture stores {grads} parameter gradients and {stored_buffers} buffers, the module has \
                 {} parameters and matched {compared_buffers} buffers",
                params.len()
            ),
        });
    }
    Ok(checker.comparisons)
}

/// The config of a `selective_scan` fixture: the sizes of its inputs and the softplus flag.
#[derive(Deserialize)]
struct ScanConfig {
    batch: usize,
    channels: usize,
    length: usize,
    state: usize,
    #[serde(default = "default_true")]
    delta_softplus: bool,
}

/// The scan op's inputs in its argument order, under their fixture names (`input.u`, `grad.u`, ...).
const SCAN_INPUTS: [&str; 8] = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"];

/// Runs `ops::selective_scan` on the fixture's inputs (all of them given: skip D, gate z and delta_bias) and
/// compares the output and the gradient of every input.
fn compare_scan(fx: &Fixture, device: Device, dtype: DType) -> Result<Vec<Comparison>> {
    let ScanConfig { batch: b, channels: c, length: l, state: s, delta_softplus } = parse(&fx.kind, &fx.config)?;
    let shapes: [&[usize]; 8] = [&[b, c, l], &[b, c, l], &[c, s], &[b, s, l], &[b, s, l], &[c], &[b, c, l], &[c]];
    let mut xs = Vec::with_capacity(SCAN_INPUTS.len());
    for (name, shape) in SCAN_INPUTS.iter().zip(shapes) {
        let x = fx.tensor(&format!("input.{name}"))?;
        if x.shape() != shape {
            return Err(Error::Msg {
                context: "parity",
                msg: format!("input.{name} has shape {:?}; the config {} gives {shape:?}", x.shape(), fx.config),
            });
        }
        xs.push(x.to_dtype(dtype)?.to_device(device)?.requires_grad_(true)?);
    }
    let (tol_out, tol_grad) = tolerances(dtype);
    let mut checker = Checker { fx, comparisons: Vec::new() };
    let y = ops::selective_scan(
        &xs[0],
        &xs[1],
        &xs[2],
        &xs[3],
        &xs[4],
        Some(&xs[5]),
        Some(&xs[6]),
        Some(&xs[7]),
        delta_softplus,
    )?; // (B, C, L)
    checker.check("output", &y, tol_out)?;
    y.backward_with(&cotangent(fx, device, dtype)?)?;
    for (name, x) in SCAN_INPUTS.iter().zip(&xs) {
        checker.check(&format!("grad.{name}"), &grad_of(x, name)?, tol_grad)?;
    }
    // As for modules: a stored gradient of no input would otherwise go unchecked.
    let stored: Vec<&String> = fx.data.tensors.keys().filter(|k| k.starts_with("grad.")).collect();
    if stored.len() != SCAN_INPUTS.len() {
        return Err(Error::Msg {
            context: "parity",
            msg: format!("the fixture stores the gradients {stored:?}; the scan has the inputs {SCAN_INPUTS:?}"),
        });
    }
    Ok(checker.comparisons)
}
