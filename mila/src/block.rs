//! The MILA block (official `MLLABlock`, `docs/MILA.md` section 3): linear attention inside Mamba's block
//! design (input projection, depthwise conv + SiLU, a SiLU gate branch, output projection), with conditional
//! positional encodings (depthwise 3x3 convs) before the attention and the MLP sub-blocks.
//!
//! ```text
//! x = x + cpe1(x)                                   (on the (B, C, H, W) view)
//! t = norm1(x)
//! g = silu(act_proj(t))                             (gate branch)
//! t = attn(silu(dwc(in_proj(t))))
//! x = x + drop_path(out_proj(t * g))
//! x = x + cpe2(x)
//! x = x + drop_path(mlp(norm2(x)))
//! ```

use engine::{Error, Generator, Result, Tensor};
use nn::module::visit_child;
use nn::{Conv2d, DropPath, Entry, Init, LayerNorm, Linear, Mlp, Module};

use crate::attention::LinearAttention;
use crate::util::{check_tokens, conv_macs, linear_macs, to_image, to_tokens};

/// The constructor arguments of a block, as in the fixtures' `config` JSON.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlockConfig {
    pub dim: usize,
    pub input_resolution: (usize, usize),
    pub num_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub drop_path: f64,
}

fn default_mlp_ratio() -> f64 {
    4.0
}

fn default_true() -> bool {
    true
}

/// `x + cpe(x)` on the (B, C, H, W) image view of the tokens x, back as tokens: one op
/// ([`ops::conv2d_residual`]), bitwise the composition `x.add(to_tokens(cpe.forward(to_image(x))))`.
fn positional(cpe: &Conv2d, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let y = ops::conv2d_residual(
        &to_image(x, h, w)?,
        &cpe.weight,
        cpe.bias.as_ref(),
        cpe.stride,
        cpe.padding,
        cpe.dilation,
        cpe.groups,
    )?;
    to_tokens(&y)
}

/// A depthwise 3x3 conv (padding 1, bias), the shape of `cpe1`, `cpe2` and `dwc`.
fn depthwise3x3(init: &mut Init, dim: usize) -> Result<Conv2d> {
    Conv2d::new(init, dim, dim, (3, 3), 1, 1, dim, true)
}

/// One MILA block on an H x W token grid.
pub struct MilaBlock {
    pub cpe1: Conv2d,
    pub norm1: LayerNorm,
    pub in_proj: Linear,
    pub act_proj: Linear,
    pub dwc: Conv2d,
    pub attn: LinearAttention,
    pub out_proj: Linear,
    pub drop_path: DropPath,
    pub cpe2: Conv2d,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub dim: usize,
    pub resolution: (usize, usize),
}

impl MilaBlock {
    /// MLLA's init: Linear layers trunc_normal(0.02) with zero biases, LayerNorms 1/0, convs PyTorch's
    /// default. Starts in training mode.
    pub fn new(init: &mut Init, cfg: &BlockConfig) -> Result<Self> {
        let dim = cfg.dim;
        let hidden = (dim as f64 * cfg.mlp_ratio) as usize;
        if hidden == 0 || !cfg.mlp_ratio.is_finite() {
            return Err(Error::invalid(
                "MilaBlock",
                format!("mlp_ratio {} gives no hidden units", cfg.mlp_ratio),
                &[dim],
            ));
        }
        if !(0.0..1.0).contains(&cfg.drop_path) {
            return Err(Error::invalid("MilaBlock", format!("drop_path {} is not in [0, 1)", cfg.drop_path), &[dim]));
        }
        // Fields are made in the official module order, which is also the state_dict order.
        Ok(MilaBlock {
            cpe1: depthwise3x3(init, dim)?,
            norm1: LayerNorm::new(init, dim, 1e-5)?,
            in_proj: Linear::new_trunc_normal(init, dim, dim, true)?,
            act_proj: Linear::new_trunc_normal(init, dim, dim, true)?,
            dwc: depthwise3x3(init, dim)?,
            attn: LinearAttention::new(init, dim, cfg.input_resolution, cfg.num_heads, cfg.qkv_bias)?,
            out_proj: Linear::new_trunc_normal(init, dim, dim, true)?,
            drop_path: DropPath { p: cfg.drop_path, training: true },
            cpe2: depthwise3x3(init, dim)?,
            norm2: LayerNorm::new(init, dim, 1e-5)?,
            mlp: Mlp::new(init, dim, hidden)?,
            dim,
            resolution: cfg.input_resolution,
        })
    }

    /// x (B, N, C) -> (B, N, C). `rng` draws the drop-path masks (only in training with drop_path > 0).
    pub fn forward(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        check_tokens("MilaBlock", x, self.resolution, self.dim)?;
        let (h, w) = self.resolution;
        let x = positional(&self.cpe1, x, h, w)?;
        // Fused ops that keep less for backward and give the composition's bits (ops::layer_norm_linears,
        // conv2d_act, gated_linear): norm1's output is not saved by the two projections, SiLU(dwc) not by its
        // SiLU, and neither SiLU(gate) nor the gated product by out_proj; each is recomputed in backward.
        let [a, t] = <[Tensor; 2]>::try_from(self.norm1.forward_linears(&x, &[&self.act_proj, &self.in_proj])?)
            .map_err(|_| Error::invalid("MilaBlock", "norm1 gave other than two outputs", x.shape()))?;
        let d = &self.dwc;
        // The conv and SiLU on the channels-last image view of the tokens: its output reads back as contiguous
        // tokens.
        let t = ops::conv2d_act(
            &to_image(&t, h, w)?,
            &d.weight,
            d.bias.as_ref(),
            d.stride,
            d.padding,
            d.dilation,
            d.groups,
            ops::Unary::Silu,
        )?;
        let t = self.attn.forward(&to_tokens(&t)?)?;
        let o = &self.out_proj;
        let t = ops::gated_linear(&t, &a, ops::Unary::Silu, &o.weight, o.bias.as_ref())?;
        let x = self.drop_path.residual(&x, &t, rng)?;
        let x = positional(&self.cpe2, &x, h, w)?;
        self.drop_path.residual(&x, &self.mlp.forward_normed(&self.norm2, &x)?, rng)
    }

    /// Multiply-adds of one sample's forward (convs, projections, attention, MLP; not the norms or the
    /// elementwise ops).
    pub fn macs(&self) -> u64 {
        let n = (self.resolution.0 * self.resolution.1) as u64;
        let convs = [&self.cpe1, &self.dwc, &self.cpe2].iter().map(|c| conv_macs(c, self.resolution)).sum::<u64>();
        let linears = [&self.in_proj, &self.act_proj, &self.out_proj, &self.mlp.fc1, &self.mlp.fc2]
            .iter()
            .map(|l| linear_macs(l, n))
            .sum::<u64>();
        convs + linears + self.attn.macs()
    }
}

impl Module for MilaBlock {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.cpe1, "cpe1", f);
        visit_child(&self.norm1, "norm1", f);
        visit_child(&self.in_proj, "in_proj", f);
        visit_child(&self.act_proj, "act_proj", f);
        visit_child(&self.dwc, "dwc", f);
        visit_child(&self.attn, "attn", f);
        visit_child(&self.out_proj, "out_proj", f);
        visit_child(&self.cpe2, "cpe2", f);
        visit_child(&self.norm2, "norm2", f);
        visit_child(&self.mlp, "mlp", f);
    }
    fn set_training(&mut self, training: bool) {
        self.drop_path.set_training(training);
        self.attn.set_training(training);
        self.mlp.set_training(training);
    }
}
