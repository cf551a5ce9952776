//! The Mamba-1 mixer (official `Mamba` of `mamba_simple.py`, `docs/MILA.md` section 6), composed from the
//! engine's ops: linear, causal depthwise conv1d, SiLU, views and the fused `selective_scan`.
//!
//! For tokens x (B, L, d_model), d_inner = expand d_model, S = d_state, R = dt_rank:
//!
//! ```text
//! [xs, z]       = split(in_proj(x))                      in_proj: Linear(d_model, 2 d_inner), no bias
//! xs            = silu(causal depthwise conv1d(xs))       conv1d: kernel d_conv, groups d_inner, bias
//! [dtr, Bm, Cm] = split(x_proj(xs), [R, S, S])            x_proj: Linear(d_inner, R + 2S), no bias
//! delta         = dtr dt_proj.weight^T                    dt_proj.bias enters the scan as delta_bias
//! A             = -exp(A_log)                             (d_inner, S)
//! y             = scan(xs, delta, A, Bm, Cm, D, z, dt_proj.bias, softplus on)
//! out           = out_proj(y)                             out_proj: Linear(d_inner, d_model), no bias
//! ```
//!
//! Init as `mamba_simple.py`: dt_proj.weight U(+-R^-0.5); dt_proj.bias = softplus^-1(dt) with dt log-uniform
//! in [0.001, 0.1], floored at 1e-4, so that softplus(bias) starts in that range; A_log = log(1..S) in every
//! row (A = -1, ..., -S); D = 1; the other layers PyTorch's defaults. `A_log` and `D` are not weight-decayed
//! (Mamba's `_no_weight_decay`).

use engine::{Error, Result, Tensor};
use nn::module::visit_child;
use nn::{Entry, Init, Linear, Module};
use ops::TensorOps;

use crate::util::linear_macs;

/// The smallest dt = softplus(dt_proj.bias) drawn at init (Mamba's `dt_min`).
const DT_MIN: f64 = 1e-3;
/// The largest dt drawn at init (`dt_max`).
const DT_MAX: f64 = 0.1;
/// The floor applied to the drawn dt (`dt_init_floor`); below DT_MIN, so it only matters for other ranges.
const DT_FLOOR: f64 = 1e-4;

/// The constructor arguments of a Mamba mixer, as in the fixtures' `config` JSON.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MambaConfig {
    pub d_model: usize,
    #[serde(default = "default_d_state")]
    pub d_state: usize,
    /// The kernel length of the causal conv1d (the kernel side of SS2D's square conv2d).
    #[serde(default = "default_d_conv")]
    pub d_conv: usize,
    #[serde(default = "default_expand")]
    pub expand: usize,
    /// Rank of the delta projection; `None` is Mamba's "auto", ceil(d_model / 16).
    #[serde(default)]
    pub dt_rank: Option<usize>,
}

fn default_d_state() -> usize {
    16
}

fn default_d_conv() -> usize {
    4
}

fn default_expand() -> usize {
    2
}

impl MambaConfig {
    /// Mamba's defaults: d_state 16, d_conv 4, expand 2, dt_rank ceil(d_model / 16).
    pub fn new(d_model: usize) -> Self {
        MambaConfig { d_model, d_state: default_d_state(), d_conv: default_d_conv(), expand: 2, dt_rank: None }
    }

    /// VMamba's SS2D defaults: as [`MambaConfig::new`] with a 3x3 conv.
    pub fn ss2d(d_model: usize) -> Self {
        MambaConfig { d_conv: 3, ..MambaConfig::new(d_model) }
    }

    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    pub fn dt_rank(&self) -> usize {
        self.dt_rank.unwrap_or(self.d_model.div_ceil(16))
    }

    /// Every size must be positive.
    pub(crate) fn check(&self, op: &'static str) -> Result<()> {
        let sizes = [self.d_model, self.d_state, self.d_conv, self.expand, self.dt_rank()];
        if sizes.contains(&0) {
            return Err(Error::invalid(
                op,
                format!("every size must be positive, got {self:?} (dt_rank {})", self.dt_rank()),
                &sizes,
            ));
        }
        Ok(())
    }
}

/// A new trainable tensor holding `values`.
pub(crate) fn param(init: &Init, values: &[f64], shape: &[usize]) -> Result<Tensor> {
    Tensor::from_f64(values, shape, init.dtype, init.device)?.requires_grad_(true)
}

/// `copies` stacked dt projections of Mamba's init: weights (copies, d_inner, R) U(+-R^-0.5) and biases
/// (copies, d_inner) = softplus^-1(dt), dt log-uniform in [DT_MIN, DT_MAX] floored at DT_FLOOR. Returned as
/// values, weights first.
pub(crate) fn dt_init(init: &mut Init, copies: usize, d_inner: usize, rank: usize) -> (Vec<f64>, Vec<f64>) {
    let bound = (rank as f64).powf(-0.5);
    let mut weights = Vec::with_capacity(copies * d_inner * rank);
    let mut biases = Vec::with_capacity(copies * d_inner);
    for _ in 0..copies {
        weights.extend(init.rng.uniform_vec(d_inner * rank, -bound, bound));
        biases.extend(init.rng.uniform_vec(d_inner, 0.0, 1.0).into_iter().map(|r| {
            let dt = (r * (DT_MAX.ln() - DT_MIN.ln()) + DT_MIN.ln()).exp().max(DT_FLOOR);
            // softplus^-1(dt) = log(exp(dt) - 1) = dt + log(1 - exp(-dt)), written with expm1 so that it
            // keeps its digits for small dt.
            dt + (-(-dt).exp_m1()).ln()
        }));
    }
    (weights, biases)
}

/// A_log of `rows` channels: log(1), ..., log(S) in every row, so that A = -exp(A_log) = -1, ..., -S.
pub(crate) fn a_log_init(rows: usize, states: usize) -> Vec<f64> {
    (0..rows).flat_map(|_| (1..=states).map(|n| (n as f64).ln())).collect()
}

/// The selective SSM of one Mamba branch on u (B, d_inner, L): x_proj, dt_proj, A = -exp(A_log) and the
/// scan with delta_bias and softplus on, gated by silu(z) when z (B, d_inner, L) is given. x_proj (R + 2S,
/// d_inner), dt_proj (d_inner, R), dt_bias (d_inner), a_log (d_inner, S), d (d_inner). Returns (B, d_inner, L).
#[allow(clippy::too_many_arguments)]
pub(crate) fn ssm(
    u: &Tensor,
    x_proj: &Tensor,
    dt_proj: &Tensor,
    dt_bias: &Tensor,
    a_log: &Tensor,
    d: &Tensor,
    z: Option<&Tensor>,
    (rank, states): (usize, usize),
) -> Result<Tensor> {
    let dbl = u.transpose(1, 2)?.matmul(&x_proj.t()?)?; // (B, L, R + 2S)
    let delta = dbl.narrow(2, 0, rank)?.matmul(&dt_proj.t()?)?.transpose(1, 2)?; // (B, d_inner, L)
    let bm = dbl.narrow(2, rank, states)?.transpose(1, 2)?; // (B, S, L)
    let cm = dbl.narrow(2, rank + states, states)?.transpose(1, 2)?; // (B, S, L)
    let a = a_log.exp()?.neg()?; // (d_inner, S)
    ops::selective_scan(u, &delta, &a, &bm, &cm, Some(d), z, Some(dt_bias), true)
}

/// Multiply-adds of [`ssm`] over `tokens` steps: the delta projection (x_proj is counted with the Linear
/// layers) and the scan's three products per (step, channel, state), dA h, (dt u) Bm and Cm h, plus D u.
pub(crate) fn ssm_macs(tokens: u64, d_inner: u64, rank: u64, states: u64) -> u64 {
    tokens * d_inner * (rank + 3 * states + 1)
}

/// Causal depthwise 1-D convolution with PyTorch's `Conv1d(C, C, k, groups=C, padding=k-1)` parameters
/// (weight (C, 1, k), bias (C)), cut to its first L outputs as Mamba does.
pub struct CausalConv1d {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl CausalConv1d {
    /// PyTorch's default init: U(+-1/sqrt(k)) for weight and bias (fan_in = k for a depthwise conv).
    pub fn new(init: &mut Init, channels: usize, kernel: usize) -> Result<Self> {
        Ok(CausalConv1d {
            weight: init.kaiming_uniform(&[channels, 1, kernel], kernel)?,
            bias: init.kaiming_uniform(&[channels], kernel)?,
        })
    }

    /// x (B, C, L) -> (B, C, L).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::causal_conv1d(x, &self.weight, Some(&self.bias))
    }
}

impl Module for CausalConv1d {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        f("weight", Entry::Param { tensor: &self.weight, no_decay: false });
        f("bias", Entry::Param { tensor: &self.bias, no_decay: true });
    }
    fn set_training(&mut self, _: bool) {}
}

/// The Mamba-1 mixer over token sequences (B, L, d_model).
pub struct MambaMixer {
    pub in_proj: Linear,
    pub conv1d: CausalConv1d,
    pub x_proj: Linear,
    pub dt_proj: Linear,
    /// (d_inner, S); A = -exp(A_log).
    pub a_log: Tensor,
    /// (d_inner): the skip D u.
    pub d: Tensor,
    pub out_proj: Linear,
    pub config: MambaConfig,
}

impl MambaMixer {
    /// Mamba's init (module doc). The parameters are drawn in `mamba_simple.py`'s order.
    pub fn new(init: &mut Init, config: &MambaConfig) -> Result<Self> {
        config.check("MambaMixer")?;
        let (d_model, d_inner, rank, states) = (config.d_model, config.d_inner(), config.dt_rank(), config.d_state);
        let in_proj = Linear::new(init, d_model, 2 * d_inner, false)?;
        let conv1d = CausalConv1d::new(init, d_inner, config.d_conv)?;
        let x_proj = Linear::new(init, d_inner, rank + 2 * states, false)?;
        let (dt_w, dt_b) = dt_init(init, 1, d_inner, rank);
        let dt_proj =
            Linear { weight: param(init, &dt_w, &[d_inner, rank])?, bias: Some(param(init, &dt_b, &[d_inner])?) };
        Ok(MambaMixer {
            in_proj,
            conv1d,
            x_proj,
            dt_proj,
            a_log: param(init, &a_log_init(d_inner, states), &[d_inner, states])?,
            d: param(init, &vec![1.0; d_inner], &[d_inner])?,
            out_proj: Linear::new(init, d_inner, d_model, false)?,
            config: config.clone(),
        })
    }

    /// x (B, L, d_model) -> (B, L, d_model).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d_model = self.config.d_model;
        if !matches!(*x.shape(), [_, l, c] if l > 0 && c == d_model) {
            return Err(Error::invalid(
                "MambaMixer",
                format!("expected tokens (B, L, {d_model}) with L >= 1"),
                x.shape(),
            ));
        }
        let d_inner = self.config.d_inner();
        let xz = self.in_proj.forward(x)?; // (B, L, 2 d_inner)
        let xs = xz.narrow(2, 0, d_inner)?.transpose(1, 2)?; // (B, d_inner, L)
        let z = xz.narrow(2, d_inner, d_inner)?.transpose(1, 2)?; // (B, d_inner, L)
        let xs = self.conv1d.forward(&xs)?.silu()?;
        let dt_bias = self.dt_proj.bias.as_ref().ok_or_else(|| {
            Error::invalid(
                "MambaMixer",
                "dt_proj has no bias (it is the scan's delta_bias)",
                self.dt_proj.weight.shape(),
            )
        })?;
        let y = ssm(
            &xs,
            &self.x_proj.weight,
            &self.dt_proj.weight,
            dt_bias,
            &self.a_log,
            &self.d,
            Some(&z),
            (self.config.dt_rank(), self.config.d_state),
        )?; // (B, d_inner, L)
        self.out_proj.forward(&y.transpose(1, 2)?) // (B, L, d_model)
    }

    /// Multiply-adds of one sequence of `length` tokens: the projections, the conv, and the scan (see
    /// `ssm_macs`); not the SiLUs or the gate.
    pub fn macs(&self, length: usize) -> u64 {
        let l = length as u64;
        let c = &self.config;
        let linears = [&self.in_proj, &self.x_proj, &self.out_proj].iter().map(|p| linear_macs(p, l)).sum::<u64>();
        let conv = self.conv1d.weight.numel() as u64 * l;
        linears + conv + ssm_macs(l, c.d_inner() as u64, c.dt_rank() as u64, c.d_state as u64)
    }
}

impl Module for MambaMixer {
    /// PyTorch's `state_dict` order: the module's own parameters (A_log, D) before its children.
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        f("A_log", Entry::Param { tensor: &self.a_log, no_decay: true });
        f("D", Entry::Param { tensor: &self.d, no_decay: true });
        visit_child(&self.in_proj, "in_proj", f);
        visit_child(&self.conv1d, "conv1d", f);
        visit_child(&self.x_proj, "x_proj", f);
        visit_child(&self.dt_proj, "dt_proj", f);
        visit_child(&self.out_proj, "out_proj", f);
    }
    fn set_training(&mut self, _: bool) {}
}
