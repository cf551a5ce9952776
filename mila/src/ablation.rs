//! The ablation of `docs/MILA.md` section 1 at small scale: a baseline linear attention network, each of
//! Mamba's six designs switched on alone on top of it, and MILA.
//!
//! # The baseline
//!
//! The MLLA macro design (stem to 1/4 resolution, four stages whose width doubles while the grid halves,
//! PatchMerging between them, a final LayerNorm, the token mean and a linear head; section 4) with Swin's
//! block in every stage:
//!
//! ```text
//! x = x + drop_path(attn(norm1(x)))
//! x = x + drop_path(mlp(norm2(x)))
//! ```
//!
//! and, as `attn`, global multi-head ELU+1 linear attention with q, k and v projections (`qkv`), the
//! normaliser and an output projection (`proj`). For h heads of width d = C/h and the N tokens of one
//! image:
//!
//! ```text
//! [q, k, v] = split(qkv(x));  q = elu(q) + 1;  k = elu(k) + 1          (B, N, C) each
//! y_i = q_i (sum_j k_j^T v_j / N) / (q_i . mean_j k_j + 1e-6)           per head
//! out = proj(y)
//! ```
//!
//! It has no positional encoding (no RoPE, LePE or CPE): those are what MILA puts in place of the forget
//! gate (section 1), so a baseline with them would already hold a stand-in for one design under test. The
//! stem's convs and the stride-2 depthwise conv of each PatchMerging still see neighbourhoods, so the
//! network is not blind to position, only its attention is.
//!
//! # The six designs, one at a time
//!
//! | [`Variant`] | what changes |
//! | --- | --- |
//! | `InputGate` | Delta_i = softplus(x_i W + b) (`dt_proj`, C -> C), and v_i becomes Delta_i (.) v_i: a per-token, per-channel gate on what enters the state. Scaling v rather than k keeps it a gate: the normaliser does not see it |
//! | `ForgetGate` | the state decays: S_i = exp(Delta_i A) (.) S_{i-1} + k_i^T v_i, causal over the row-major token order, computed by the `selective_scan` op (below) |
//! | `Shortcut` | + D (.) v_i, D learned per channel (init 1, not decayed): exactly C parameters per block |
//! | `NoNorm` | no division by q_i . Z_i: y_i = q_i (sum_j k_j^T v_j) / N |
//! | `SingleHead` | one head whose q and k are `d_state` (16) wide, shared by all C channels of v |
//! | `BlockAll` | every block is Mamba's: `x + out_proj(attn(silu(dwc(in_proj(t)))) * silu(act_proj(t)))`, t = norm1(x), no MLP, width E = 1.5 C |
//! | `BlockAttn` | the attention sub-block is Mamba's (as above at width C), the MLP sub-block stays |
//! | `Mila` | MILA itself: [`MilaBlock`] (block design + RoPE + LePE + CPE), the network of [`crate::Mlla`] |
//!
//! `NoNorm` keeps the constant 1/N: without it the output would grow with the number of tokens (64 at the
//! first stage of a 32x32 image), which is a change of scale, not of design; what goes is the learned,
//! per-token division by q_i . Z_i.
//!
//! `BlockAll` has no MLP, so its blocks are widened to E = 1.5 C (`expand`): 3CE + 3E^2 = 11.25 C^2 weights
//! against the baseline's 12 C^2, as the paper matched parameters (28M both). The attention inside a
//! Mamba-style block has no `proj` of its own: `out_proj` is its output projection, as in Mamba.
//!
//! # The forget gate through the selective scan
//!
//! The scan (`ops::selective_scan`, section 6) runs, per batch b, channel c and state n, over time t:
//! h[c,n,t] = exp(dt[c,t] A[c,n]) h[c,n,t-1] + dt[c,t] Bm[n,t] u[c,t] and y[c,t] = sum_n Cm[n,t] h[c,n,t].
//! Linear attention's state S (d_k x d_v per head) is h read sideways, so:
//!
//! | scan | linear attention |
//! | --- | --- |
//! | time t | token i, in row-major order (causal: token i sees tokens j <= i) |
//! | batch | (image, head): heads ride in the batch, each with its own q and k |
//! | channel c | a value channel of the head (d_v of them) |
//! | state n | a key/query dimension of the head (d_k of them) |
//! | u[c, t] | v_i[c] |
//! | Bm[n, t] | k_i[n] |
//! | Cm[n, t] | q_i[n] |
//! | h[c, n, t] | S_i[n, c] |
//! | dt[c, t] | Delta_i[c] = softplus(x_i W + b), the forget gate's step |
//! | A[c, n] | -exp(A_log[c, n]), shared by the heads (init -(1..d_k) in every row, as Mamba's) |
//!
//! The scan multiplies what enters the state by dt: that is Mamba's input gate, coupled to its forget gate.
//! To switch on the forget gate alone, u = v / dt cancels it (dt is floored at 1e-4 so the division stays
//! well scaled; softplus goes below it only for pre-activations below -9.2). The normaliser's running sum
//! Z_i = exp(Delta_i A) (.) Z_{i-1} + k_i decays with the same gate, per value channel, so it is the same
//! recurrence with v = 1: those d_v channels ride beside v's in one scan of 2 d_v channels, and
//! y_i = (q_i S_i) / (q_i Z_i + 1e-6).
//!
//! At 32x32 the last stage is a single token, which has no past to decay: there the forget gate is the
//! identity and its A_log gets no gradient.

use engine::{Error, Generator, Result, Tensor};
use nn::module::visit_child;
use nn::trainer::Classifier;
use nn::{Conv2d, DropPath, Entry, Init, LayerNorm, Linear, Mlp, Module};
use ops::TensorOps;
use serde::Serialize;

use crate::block::{BlockConfig, MilaBlock};
use crate::mlla::{MllaConfig, PatchMerging, Stem};
use crate::util::{check_tokens, conv_macs, linear_macs, to_image, to_tokens};

/// Added to the normaliser q . Z so that it never divides by zero (q, k > 0 keep it positive anyway).
const Z_EPS: f64 = 1e-6;
/// The forget gate's floor on dt, which keeps u = v / dt well scaled (see the module notes).
const DT_MIN: f64 = 1e-4;
/// Mamba's range for the initial dt (dt_proj's bias is softplus^-1 of a log-uniform draw in it).
const DT_INIT: (f64, f64) = (1e-3, 1e-1);

/// One row of the ablation: the baseline, one of Mamba's six designs on top of it, or MILA. The order is the
/// paper's table's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    Baseline,
    InputGate,
    ForgetGate,
    Shortcut,
    NoNorm,
    SingleHead,
    BlockAll,
    BlockAttn,
    Mila,
}

impl Variant {
    pub const ALL: [Variant; 9] = [
        Variant::Baseline,
        Variant::InputGate,
        Variant::ForgetGate,
        Variant::Shortcut,
        Variant::NoNorm,
        Variant::SingleHead,
        Variant::BlockAll,
        Variant::BlockAttn,
        Variant::Mila,
    ];

    /// The short name (`--variants`, JSON, output folders).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::InputGate => "input-gate",
            Variant::ForgetGate => "forget-gate",
            Variant::Shortcut => "shortcut",
            Variant::NoNorm => "no-norm",
            Variant::SingleHead => "single-head",
            Variant::BlockAll => "block-all",
            Variant::BlockAttn => "block-attn",
            Variant::Mila => "mila",
        }
    }

    /// The row of the paper's table.
    pub fn row(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline linear attention",
            Variant::InputGate => "+ input gate",
            Variant::ForgetGate => "+ forget gate",
            Variant::Shortcut => "+ shortcut",
            Variant::NoNorm => "- normalisation",
            Variant::SingleHead => "- multi-head (single head)",
            Variant::BlockAll => "+ block design, all blocks",
            Variant::BlockAttn => "+ block design, attention sub-block only",
            Variant::Mila => "MILA",
        }
    }

    /// The variant with this short name.
    pub fn parse(name: &str) -> Result<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == name).ok_or_else(|| Error::Msg {
            context: "ablation",
            msg: format!("unknown variant '{name}' (one of: {})", Variant::ALL.map(Variant::name).join(", ")),
        })
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The switches of one [`VariantAttention`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    /// C: the width of x, of v and of the output.
    pub dim: usize,
    pub num_heads: usize,
    /// The width of q and k per head (C / heads in linear attention, d_state in Mamba).
    pub qk_dim: usize,
    pub qkv_bias: bool,
    /// v_i scaled by Delta_i = softplus(dt_proj(x_i)).
    pub input_gate: bool,
    /// The state decays by exp(Delta_i A); causal, through the selective scan.
    pub forget_gate: bool,
    /// + D (.) v_i.
    pub shortcut: bool,
    /// Divide by q_i . Z_i.
    pub normalise: bool,
    /// An output projection `proj` (off inside a Mamba-style block, whose `out_proj` is one).
    pub proj: bool,
}

impl AttentionConfig {
    /// The baseline: h heads of width C/h, normalised, with an output projection.
    pub fn baseline(dim: usize, num_heads: usize, qkv_bias: bool) -> Self {
        AttentionConfig {
            dim,
            num_heads,
            qk_dim: dim / num_heads.max(1),
            qkv_bias,
            input_gate: false,
            forget_gate: false,
            shortcut: false,
            normalise: true,
            proj: true,
        }
    }
}

/// ELU+1 linear attention with each of Mamba's attention-level designs behind a switch (module notes).
/// Parameters: `qkv` (Linear C -> 2 h d_k + C), and where switched on `dt_proj` (Linear C -> C, Mamba's dt
/// init), `A_log` (d_v, d_k), `D` (C), `proj` (Linear C -> C).
pub struct VariantAttention {
    pub qkv: Linear,
    pub dt_proj: Option<Linear>,
    pub a_log: Option<Tensor>,
    pub d: Option<Tensor>,
    pub proj: Option<Linear>,
    pub config: AttentionConfig,
}

/// Mamba's `dt_proj.bias`: softplus^-1(dt) for dt log-uniform in [1e-3, 1e-1], so that softplus(bias)
/// starts there.
fn dt_bias(init: &mut Init, channels: usize) -> Result<Tensor> {
    let (lo, hi) = (DT_INIT.0.ln(), DT_INIT.1.ln());
    let values: Vec<f64> = init
        .rng
        .uniform_vec(channels, lo, hi)
        .into_iter()
        // softplus^-1(dt) = log(exp(dt) - 1) = dt + log(1 - exp(-dt)), the latter exact for small dt.
        .map(|u| {
            let dt = u.exp().max(DT_MIN);
            dt + (-(-dt).exp_m1()).ln()
        })
        .collect();
    Tensor::from_f64(&values, &[channels], init.dtype, init.device)?.requires_grad_(true)
}

impl VariantAttention {
    pub fn new(init: &mut Init, config: &AttentionConfig) -> Result<Self> {
        const OP: &str = "VariantAttention";
        let c = config.dim;
        if config.num_heads == 0 || c == 0 || !c.is_multiple_of(config.num_heads) {
            return Err(Error::invalid(OP, format!("{} heads do not divide dim {c}", config.num_heads), &[c]));
        }
        if config.qk_dim == 0 {
            return Err(Error::invalid(OP, "q/k width 0", &[c]));
        }
        let (h, dk, dv) = (config.num_heads, config.qk_dim, c / config.num_heads);
        let qkv = Linear::new_trunc_normal(init, c, 2 * h * dk + c, config.qkv_bias)?;
        let dt_proj = if config.input_gate || config.forget_gate {
            let mut linear = Linear::new_trunc_normal(init, c, c, false)?;
            linear.bias = Some(dt_bias(init, c)?);
            Some(linear)
        } else {
            None
        };
        let a_log = if config.forget_gate {
            // ln(1..d_k) in every row: A = -(1..d_k), Mamba's S4D-real init.
            let row: Vec<f64> = (1..=dk).map(|n| (n as f64).ln()).collect();
            let values: Vec<f64> = (0..dv).flat_map(|_| row.iter().copied()).collect();
            Some(Tensor::from_f64(&values, &[dv, dk], init.dtype, init.device)?.requires_grad_(true)?)
        } else {
            None
        };
        let d = if config.shortcut { Some(init.constant(&[c], 1.0)?) } else { None };
        let proj = if config.proj { Some(Linear::new_trunc_normal(init, c, c, true)?) } else { None };
        Ok(VariantAttention { qkv, dt_proj, a_log, d, proj, config: *config })
    }

    /// x (B, N, C) -> (B, N, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, n) = match *x.shape() {
            [b, n, c] if c == cfg.dim && n > 0 => (b, n),
            _ => {
                return Err(Error::invalid(
                    "VariantAttention",
                    format!("expected tokens (B, N, {}) with N >= 1", cfg.dim),
                    x.shape(),
                ))
            }
        };
        let (c, hk) = (cfg.dim, cfg.num_heads * cfg.qk_dim);
        let qkv = self.qkv.forward(x)?; // (B, N, 2 h d_k + C)
        let q = qkv.narrow(2, 0, hk)?.elu(1.0)?.add_scalar(1.0)?; // (B, N, h d_k)
        let k = qkv.narrow(2, hk, hk)?.elu(1.0)?.add_scalar(1.0)?;
        let v = qkv.narrow(2, 2 * hk, c)?; // (B, N, C)
        let dt = match &self.dt_proj {
            Some(p) => Some(p.forward(x)?.softplus(1.0, 20.0)?), // (B, N, C)
            None => None,
        };
        let y = match (&self.a_log, &dt) {
            (Some(a_log), Some(dt)) => self.decayed(&q, &k, &v, dt, a_log, (b, n))?,
            _ => {
                let gated = match (&dt, cfg.input_gate) {
                    (Some(dt), true) => v.mul(dt)?,
                    _ => v.clone(),
                };
                self.global(&q, &k, &gated, (b, n))?
            }
        };
        let y = match &self.d {
            Some(d) => y.add(&v.mul(d)?)?,
            None => y,
        };
        match &self.proj {
            Some(p) => p.forward(&y),
            None => Ok(y),
        }
    }

    /// Non-causal attention over all tokens: q, k (B, N, h d_k), v (B, N, C) -> (B, N, C).
    fn global(&self, q: &Tensor, k: &Tensor, v: &Tensor, (b, n): (usize, usize)) -> Result<Tensor> {
        let cfg = &self.config;
        let (h, dk, dv) = (cfg.num_heads, cfg.qk_dim, cfg.dim / cfg.num_heads);
        // (B, N, h w) -> (B, h, N, w)
        let heads =
            |t: &Tensor, w: usize| t.reshape(&[b as isize, n as isize, h as isize, w as isize])?.permute(&[0, 2, 1, 3]);
        let (q, k, v) = (heads(q, dk)?, heads(k, dk)?, heads(v, dv)?);
        // Both factors scaled by 1/sqrt(N), as MILA's code does: the sum over tokens stays O(1) in f32.
        let scale = (n as f64).powf(-0.5);
        let kv = k.transpose(-2, -1)?.mul_scalar(scale)?.matmul(&v.mul_scalar(scale)?)?; // (B, h, d_k, d_v)
        let mut y = q.matmul(&kv)?; // (B, h, N, d_v)
        if cfg.normalise {
            // (B, h, N, d_k) @ (B, h, d_k, 1) -> (B, h, N, 1)
            let z = q.matmul(&k.mean(&[-2], true)?.transpose(-2, -1)?)?.add_scalar(Z_EPS)?.powf(-1.0)?;
            y = y.mul(&z)?;
        }
        // (B, h, N, d_v) -> (B, N, h, d_v) -> (B, N, C)
        y.transpose(1, 2)?.reshape(&[b as isize, n as isize, cfg.dim as isize])
    }

    /// Causal attention whose state decays by exp(dt A), through the selective scan (module notes):
    /// q, k (B, N, h d_k), v and dt (B, N, C) -> (B, N, C).
    fn decayed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dt: &Tensor,
        a_log: &Tensor,
        (b, n): (usize, usize),
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (h, dk, dv) = (cfg.num_heads, cfg.qk_dim, cfg.dim / cfg.num_heads);
        // (B, N, h w) -> (B, h, w, N) -> (B h, w, N): heads ride in the scan's batch, tokens are its time.
        let scan_layout = |t: &Tensor, w: usize| {
            t.reshape(&[b as isize, n as isize, h as isize, w as isize])?.permute(&[0, 2, 3, 1])?.reshape(&[
                (b * h) as isize,
                w as isize,
                n as isize,
            ])
        };
        let (cm, bm) = (scan_layout(q, dk)?, scan_layout(k, dk)?); // (B h, d_k, N)
        let dt = scan_layout(&dt.maximum_scalar(DT_MIN)?, dv)?; // (B h, d_v, N)
        let v = scan_layout(v, dv)?;
        // With the input gate on, the scan's own dt factor is that gate (Mamba's coupling); without it,
        // u = v / dt cancels the factor and leaves only the decay.
        let u = if cfg.input_gate { v } else { v.div(&dt)? };
        let a = a_log.exp()?.neg()?; // (d_v, d_k), negative: a decay
        let y = if cfg.normalise {
            // Z's recurrence is S's with v = 1 (and no input gate): its channels ride beside v's.
            let ones = dt.powf(-1.0)?;
            let u = ops::concat(&[u, ones], 1)?; // (B h, 2 d_v, N)
            let delta = ops::concat(&[dt.clone(), dt], 1)?;
            let a = ops::concat(&[a.clone(), a], 0)?; // (2 d_v, d_k)
            let both = ops::selective_scan(&u, &delta, &a, &bm, &cm, None, None, None, false)?;
            let (num, den) = (both.narrow(1, 0, dv)?, both.narrow(1, dv, dv)?); // q S, q Z: (B h, d_v, N)
            num.div(&den.add_scalar(Z_EPS)?)?
        } else {
            ops::selective_scan(&u, &dt, &a, &bm, &cm, None, None, None, false)?
        };
        // (B h, d_v, N) -> (B, h, d_v, N) -> (B, N, h, d_v) -> (B, N, C)
        y.reshape(&[b as isize, h as isize, dv as isize, n as isize])?.permute(&[0, 3, 1, 2])?.reshape(&[
            b as isize,
            n as isize,
            cfg.dim as isize,
        ])
    }

    /// Multiply-adds of one sample's forward over `n` tokens: the projections, and the attention products
    /// (k^T v, q kv and q . mean(k); or, with the forget gate, 3 per scan element: decay, input, readout).
    pub fn macs(&self, n: usize) -> u64 {
        let cfg = &self.config;
        let n = n as u64;
        let (c, hk, dk) = (cfg.dim as u64, (cfg.num_heads * cfg.qk_dim) as u64, cfg.qk_dim as u64);
        let linears = [Some(&self.qkv), self.dt_proj.as_ref(), self.proj.as_ref()]
            .into_iter()
            .flatten()
            .map(|l| linear_macs(l, n))
            .sum::<u64>();
        let attention = if cfg.forget_gate {
            let channels = if cfg.normalise { 2 * c } else { c };
            3 * n * channels * dk
        } else {
            2 * n * dk * c + if cfg.normalise { n * hk } else { 0 }
        };
        linears + attention
    }
}

impl Module for VariantAttention {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.qkv, "qkv", f);
        if let Some(p) = &self.dt_proj {
            visit_child(p, "dt_proj", f);
        }
        // Mamba keeps A_log and D out of weight decay (`_no_weight_decay`).
        if let Some(a) = &self.a_log {
            f("A_log", Entry::Param { tensor: a, no_decay: true });
        }
        if let Some(d) = &self.d {
            f("D", Entry::Param { tensor: d, no_decay: true });
        }
        if let Some(p) = &self.proj {
            visit_child(p, "proj", f);
        }
    }
    fn set_training(&mut self, _: bool) {}
}

/// Swin's block around a [`VariantAttention`]: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
pub struct AttentionBlock {
    pub norm1: LayerNorm,
    pub attn: VariantAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub drop_path: DropPath,
    pub resolution: (usize, usize),
}

impl AttentionBlock {
    pub fn new(
        init: &mut Init,
        attn: &AttentionConfig,
        resolution: (usize, usize),
        mlp_ratio: f64,
        drop_path: f64,
    ) -> Result<Self> {
        Ok(AttentionBlock {
            norm1: LayerNorm::new(init, attn.dim, 1e-5)?,
            attn: VariantAttention::new(init, attn)?,
            norm2: LayerNorm::new(init, attn.dim, 1e-5)?,
            mlp: Mlp::new(init, attn.dim, hidden_width("AttentionBlock", attn.dim, mlp_ratio)?)?,
            drop_path: DropPath { p: drop_path, training: true },
            resolution,
        })
    }

    /// x (B, N, C) -> (B, N, C).
    pub fn forward(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        check_tokens("AttentionBlock", x, self.resolution, self.attn.config.dim)?;
        let x = self.drop_path.residual(x, &self.attn.forward(&self.norm1.forward(x)?)?, rng)?;
        self.drop_path.residual(&x, &self.mlp.forward(&self.norm2.forward(&x)?)?, rng)
    }

    pub fn macs(&self) -> u64 {
        let n = self.resolution.0 * self.resolution.1;
        self.attn.macs(n) + linear_macs(&self.mlp.fc1, n as u64) + linear_macs(&self.mlp.fc2, n as u64)
    }
}

impl Module for AttentionBlock {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.norm1, "norm1", f);
        visit_child(&self.attn, "attn", f);
        visit_child(&self.norm2, "norm2", f);
        visit_child(&self.mlp, "mlp", f);
    }
    fn set_training(&mut self, training: bool) {
        self.drop_path.set_training(training);
    }
}

/// Mamba's block design around a [`VariantAttention`] of width E (no `proj`: `out_proj` is its output
/// projection), with an optional MLP sub-block after it:
///
/// ```text
/// t = norm1(x);  g = silu(act_proj(t))                    (B, N, E)
/// t = attn(silu(dwc(in_proj(t))))                         (B, N, E), dwc on the (B, E, H, W) view
/// x = x + drop_path(out_proj(t * g))                      (B, N, C)
/// x = x + drop_path(mlp(norm2(x)))                        (only with an MLP)
/// ```
pub struct MambaStyleBlock {
    pub norm1: LayerNorm,
    pub in_proj: Linear,
    pub act_proj: Linear,
    pub dwc: Conv2d,
    pub attn: VariantAttention,
    pub out_proj: Linear,
    pub mlp: Option<(LayerNorm, Mlp)>,
    pub drop_path: DropPath,
    pub dim: usize,
    pub resolution: (usize, usize),
}

impl MambaStyleBlock {
    /// `attn.dim` is the inner width E; `mlp_ratio` None drops the MLP sub-block.
    pub fn new(
        init: &mut Init,
        dim: usize,
        attn: &AttentionConfig,
        resolution: (usize, usize),
        mlp_ratio: Option<f64>,
        drop_path: f64,
    ) -> Result<Self> {
        let inner = attn.dim;
        let norm1 = LayerNorm::new(init, dim, 1e-5)?;
        let in_proj = Linear::new_trunc_normal(init, dim, inner, true)?;
        let act_proj = Linear::new_trunc_normal(init, dim, inner, true)?;
        let dwc = Conv2d::new(init, inner, inner, (3, 3), 1, 1, inner, true)?;
        let attn = VariantAttention::new(init, &AttentionConfig { proj: false, ..*attn })?;
        let out_proj = Linear::new_trunc_normal(init, inner, dim, true)?;
        let mlp = match mlp_ratio {
            Some(r) => {
                Some((LayerNorm::new(init, dim, 1e-5)?, Mlp::new(init, dim, hidden_width("MambaStyleBlock", dim, r)?)?))
            }
            None => None,
        };
        Ok(MambaStyleBlock {
            norm1,
            in_proj,
            act_proj,
            dwc,
            attn,
            out_proj,
            mlp,
            drop_path: DropPath { p: drop_path, training: true },
            dim,
            resolution,
        })
    }

    /// x (B, N, C) -> (B, N, C).
    pub fn forward(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        check_tokens("MambaStyleBlock", x, self.resolution, self.dim)?;
        let (h, w) = self.resolution;
        let t = self.norm1.forward(x)?;
        let gate = self.act_proj.forward(&t)?.silu()?; // (B, N, E)
        let t = self.in_proj.forward(&t)?;
        let t = to_tokens(&self.dwc.forward(&to_image(&t, h, w)?)?.silu()?)?;
        let t = self.attn.forward(&t)?;
        let x = self.drop_path.residual(x, &self.out_proj.forward(&t.mul(&gate)?)?, rng)?;
        match &self.mlp {
            Some((norm2, mlp)) => self.drop_path.residual(&x, &mlp.forward(&norm2.forward(&x)?)?, rng),
            None => Ok(x),
        }
    }

    pub fn macs(&self) -> u64 {
        let n = self.resolution.0 * self.resolution.1;
        let mut linears = vec![&self.in_proj, &self.act_proj, &self.out_proj];
        if let Some((_, mlp)) = &self.mlp {
            linears.extend([&mlp.fc1, &mlp.fc2]);
        }
        linears.iter().map(|l| linear_macs(l, n as u64)).sum::<u64>()
            + conv_macs(&self.dwc, self.resolution)
            + self.attn.macs(n)
    }
}

impl Module for MambaStyleBlock {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.norm1, "norm1", f);
        visit_child(&self.in_proj, "in_proj", f);
        visit_child(&self.act_proj, "act_proj", f);
        visit_child(&self.dwc, "dwc", f);
        visit_child(&self.attn, "attn", f);
        visit_child(&self.out_proj, "out_proj", f);
        if let Some((norm2, mlp)) = &self.mlp {
            visit_child(norm2, "norm2", f);
            visit_child(mlp, "mlp", f);
        }
    }
    fn set_training(&mut self, training: bool) {
        self.drop_path.set_training(training);
    }
}

/// The MLP's hidden width C r, which must be at least 1.
fn hidden_width(op: &'static str, dim: usize, ratio: f64) -> Result<usize> {
    let hidden = (dim as f64 * ratio) as usize;
    if hidden == 0 || !ratio.is_finite() {
        return Err(Error::invalid(op, format!("mlp_ratio {ratio} gives no hidden units"), &[dim]));
    }
    Ok(hidden)
}

/// One block of an ablation network.
pub enum AblationBlock {
    Attention(AttentionBlock),
    MambaStyle(MambaStyleBlock),
    Mila(MilaBlock),
}

impl AblationBlock {
    pub fn forward(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        match self {
            AblationBlock::Attention(b) => b.forward(x, rng),
            AblationBlock::MambaStyle(b) => b.forward(x, rng),
            AblationBlock::Mila(b) => b.forward(x, rng),
        }
    }

    pub fn macs(&self) -> u64 {
        match self {
            AblationBlock::Attention(b) => b.macs(),
            AblationBlock::MambaStyle(b) => b.macs(),
            AblationBlock::Mila(b) => b.macs(),
        }
    }

    fn module(&self) -> &dyn Module {
        match self {
            AblationBlock::Attention(b) => b,
            AblationBlock::MambaStyle(b) => b,
            AblationBlock::Mila(b) => b,
        }
    }
}

impl Module for AblationBlock {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        self.module().visit(f);
    }
    fn set_training(&mut self, training: bool) {
        match self {
            AblationBlock::Attention(b) => b.set_training(training),
            AblationBlock::MambaStyle(b) => b.set_training(training),
            AblationBlock::Mila(b) => b.set_training(training),
        }
    }
}

/// One stage (`layers.i`): blocks, then PatchMerging unless it is the last.
pub struct AblationLayer {
    pub blocks: Vec<AblationBlock>,
    pub downsample: Option<PatchMerging>,
}

impl Module for AblationLayer {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        for (i, block) in self.blocks.iter().enumerate() {
            visit_child(block, &format!("blocks.{i}"), f);
        }
        if let Some(d) = &self.downsample {
            visit_child(d, "downsample", f);
        }
    }
    fn set_training(&mut self, training: bool) {
        self.blocks.iter_mut().for_each(|b| b.set_training(training));
        if let Some(d) = &mut self.downsample {
            d.set_training(training);
        }
    }
}

/// An ablation network: the variant and the macro design it is built in.
#[derive(Debug, Clone, PartialEq)]
pub struct AblationConfig {
    pub variant: Variant,
    /// Stem, stage widths, depths, heads, MLP ratio, drop path, classes: shared by every variant.
    pub net: MllaConfig,
    /// The q/k width of the single-head variant (Mamba's d_state).
    pub d_state: usize,
    /// The inner width E / C of the all-blocks Mamba-style block (1.5 matches the baseline's parameters).
    pub expand: f64,
}

impl AblationConfig {
    /// The small network of `mila train` (MNIST padded to 32x32, embed 16, one block per stage, heads
    /// 1, 2, 4, 8), built as `variant`.
    pub fn mnist(variant: Variant) -> Self {
        AblationConfig { variant, net: MllaConfig::mnist(), d_state: 16, expand: 1.5 }
    }

    /// What attention a block of width `dim` with `heads` heads gets in this variant.
    fn attention(&self, dim: usize, heads: usize) -> AttentionConfig {
        let base = AttentionConfig::baseline(dim, heads, self.net.qkv_bias);
        match self.variant {
            Variant::InputGate => AttentionConfig { input_gate: true, ..base },
            Variant::ForgetGate => AttentionConfig { forget_gate: true, ..base },
            Variant::Shortcut => AttentionConfig { shortcut: true, ..base },
            Variant::NoNorm => AttentionConfig { normalise: false, ..base },
            Variant::SingleHead => AttentionConfig { num_heads: 1, qk_dim: self.d_state, ..base },
            Variant::BlockAll => {
                let inner = self.inner_width(dim);
                AttentionConfig { dim: inner, qk_dim: inner / heads, ..base }
            }
            Variant::Baseline | Variant::BlockAttn | Variant::Mila => base,
        }
    }

    /// E = round(expand C), the all-blocks variant's inner width.
    fn inner_width(&self, dim: usize) -> usize {
        (self.expand * dim as f64).round() as usize
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("AblationConfig", msg, &[self.net.img_size, self.net.img_size]));
        if self.d_state == 0 {
            return bad("d_state must be at least 1".into());
        }
        if !(self.expand.is_finite() && self.expand > 0.0) {
            return bad(format!("expand {} must be positive", self.expand));
        }
        for (i, &heads) in self.net.num_heads.iter().enumerate() {
            let dim = self.net.stage_dim(i);
            let width = if self.variant == Variant::BlockAll { self.inner_width(dim) } else { dim };
            if heads == 0 || width == 0 || !width.is_multiple_of(heads) {
                return bad(format!("stage {i}: {heads} heads do not divide the attention width {width}"));
            }
        }
        Ok(())
    }
}

/// A network of the ablation. Names follow MLLA's (`patch_embed`, `layers.i.blocks.j`,
/// `layers.i.downsample`, `norm`, `head`); the MILA variant is [`crate::Mlla`] exactly, names, init order
/// and all.
pub struct AblationNet {
    pub patch_embed: Stem,
    pub layers: Vec<AblationLayer>,
    pub norm: LayerNorm,
    pub head: Linear,
    pub config: AblationConfig,
}

impl AblationNet {
    /// Builds the network with MLLA's init (Linear trunc_normal(0.02), zero biases, LayerNorm 1/0, convs
    /// PyTorch's default; dt_proj's bias, A_log and D as Mamba's), in training mode. Modules are made in
    /// the same order as [`crate::Mlla::new`], so the same seed gives MILA the same weights.
    pub fn new(init: &mut Init, config: &AblationConfig) -> Result<Self> {
        config.net.validate()?;
        config.validate()?;
        let net = &config.net;
        let patch_embed = Stem::new(init, net.in_chans, net.embed_dim)?;
        let mut layers = Vec::with_capacity(net.depths.len());
        for stage in net.stages() {
            let (dim, grid) = (stage.dim, stage.grid);
            let attn = config.attention(dim, stage.heads);
            let blocks = stage
                .drop_paths
                .iter()
                .map(|&drop_path| {
                    Ok(match config.variant {
                        Variant::Mila => AblationBlock::Mila(MilaBlock::new(
                            init,
                            &BlockConfig {
                                dim,
                                input_resolution: grid,
                                num_heads: stage.heads,
                                mlp_ratio: net.mlp_ratio,
                                qkv_bias: net.qkv_bias,
                                drop_path,
                            },
                        )?),
                        Variant::BlockAll => {
                            AblationBlock::MambaStyle(MambaStyleBlock::new(init, dim, &attn, grid, None, drop_path)?)
                        }
                        Variant::BlockAttn => AblationBlock::MambaStyle(MambaStyleBlock::new(
                            init,
                            dim,
                            &attn,
                            grid,
                            Some(net.mlp_ratio),
                            drop_path,
                        )?),
                        _ => {
                            AblationBlock::Attention(AttentionBlock::new(init, &attn, grid, net.mlp_ratio, drop_path)?)
                        }
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            layers.push(AblationLayer { blocks, downsample: stage.downsample(init)? });
        }
        let features = net.stage_dim(net.depths.len() - 1);
        Ok(AblationNet {
            patch_embed,
            layers,
            norm: LayerNorm::new(init, features, 1e-5)?,
            head: Linear::new_trunc_normal(init, features, net.num_classes, true)?,
            config: config.clone(),
        })
    }

    /// Logits: image (B, in_chans, S, S) -> (B, num_classes).
    pub fn forward(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        self.config.net.check_images("AblationNet", x)?;
        let mut t = self.patch_embed.forward(x)?; // (B, N, C)
        for layer in &self.layers {
            for block in &layer.blocks {
                t = block.forward(&t, rng)?;
            }
            if let Some(d) = &layer.downsample {
                t = d.forward(&t)?; // (B, N/4, 2C)
            }
        }
        let pooled = self.norm.forward(&t)?.mean(&[1], false)?; // (B, F)
        self.head.forward(&pooled)
    }

    /// Multiply-adds of one image's forward: every conv, linear layer and attention product (not the norms
    /// or elementwise work).
    pub fn macs(&self) -> u64 {
        let side = self.config.net.img_size;
        let stages = self
            .layers
            .iter()
            .map(|l| {
                l.blocks.iter().map(AblationBlock::macs).sum::<u64>()
                    + l.downsample.as_ref().map_or(0, PatchMerging::macs)
            })
            .sum::<u64>();
        self.patch_embed.macs((side, side)) + stages + linear_macs(&self.head, 1)
    }
}

impl Module for AblationNet {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.patch_embed, "patch_embed", f);
        for (i, layer) in self.layers.iter().enumerate() {
            visit_child(layer, &format!("layers.{i}"), f);
        }
        visit_child(&self.norm, "norm", f);
        visit_child(&self.head, "head", f);
    }
    fn set_training(&mut self, training: bool) {
        self.patch_embed.set_training(training);
        self.layers.iter_mut().for_each(|l| l.set_training(training));
    }
}

impl Classifier for AblationNet {
    fn logits(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        self.forward(x, rng)
    }
}
