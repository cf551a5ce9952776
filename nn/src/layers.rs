//! The layers the models are built from, with PyTorch's parameter names, layouts and default init.

use std::sync::atomic::{AtomicU64, Ordering};

use engine::{Generator, Result, Tensor};

use crate::init::Init;
use crate::module::{visit_child, Entry, Module};

/// y = x W^T + b; W is (out, in) as in PyTorch.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// PyTorch's default init (kaiming uniform weight and bias).
    pub fn new(init: &mut Init, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = init.kaiming_uniform(&[out_features, in_features], in_features)?;
        let bias = if bias { Some(init.kaiming_uniform(&[out_features], in_features)?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// timm/MLLA init: weight trunc_normal(std 0.02), bias 0.
    pub fn new_trunc_normal(init: &mut Init, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = init.trunc_normal(&[out_features, in_features], 0.02)?;
        let bias = if bias { Some(init.constant(&[out_features], 0.0)?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// x (..., in) -> (..., out): [`ops::linear`], one recorded op (on CUDA one cuBLASLt product with the bias
    /// in its epilogue; on the CPU bitwise `x W^T + b` composed).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}

impl Module for Linear {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        f("weight", Entry::Param { tensor: &self.weight, no_decay: false });
        if let Some(b) = &self.bias {
            f("bias", Entry::Param { tensor: b, no_decay: true });
        }
    }
    fn set_training(&mut self, _: bool) {}
}

/// 2-D convolution, weight (out, in / groups, kh, kw).
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl Conv2d {
    /// PyTorch's default init. `kernel` is (kh, kw).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        init: &mut Init,
        in_channels: usize,
        out_channels: usize,
        kernel: (usize, usize),
        stride: usize,
        padding: usize,
        groups: usize,
        bias: bool,
    ) -> Result<Self> {
        if groups == 0 || !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
            return Err(engine::Error::invalid(
                "Conv2d",
                format!("groups {groups} must divide in {in_channels} and out {out_channels} channels"),
                &[out_channels, in_channels, kernel.0, kernel.1],
            ));
        }
        let fan_in = in_channels / groups * kernel.0 * kernel.1;
        let weight = init.kaiming_uniform(&[out_channels, in_channels / groups, kernel.0, kernel.1], fan_in)?;
        let bias = if bias { Some(init.kaiming_uniform(&[out_channels], fan_in)?) } else { None };
        Ok(Conv2d { weight, bias, stride: (stride, stride), padding: (padding, padding), dilation: (1, 1), groups })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(x, &self.weight, self.bias.as_ref(), self.stride, self.padding, self.dilation, self.groups)
    }
}

impl Module for Conv2d {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        f("weight", Entry::Param { tensor: &self.weight, no_decay: false });
        if let Some(b) = &self.bias {
            f("bias", Entry::Param { tensor: b, no_decay: true });
        }
    }
    fn set_training(&mut self, _: bool) {}
}

/// LayerNorm over the last dim: weight 1, bias 0.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(init: &mut Init, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm { weight: init.constant(&[dim], 1.0)?, bias: init.constant(&[dim], 0.0)?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, Some(&self.weight), Some(&self.bias), self.eps)
    }

    /// `[l.forward(self.forward(x)) for l in linears]`, bitwise, as one `ops::layer_norm_linears` call: the
    /// normalised x is not kept for backward (the Linears recompute it from x, which the norm saves anyway).
    pub fn forward_linears(&self, x: &Tensor, linears: &[&Linear]) -> Result<Vec<Tensor>> {
        let pairs: Vec<(&Tensor, Option<&Tensor>)> = linears.iter().map(|l| (&l.weight, l.bias.as_ref())).collect();
        ops::layer_norm_linears(x, Some(&self.weight), Some(&self.bias), self.eps, &pairs)
    }
}

impl Module for LayerNorm {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        f("weight", Entry::Param { tensor: &self.weight, no_decay: true });
        f("bias", Entry::Param { tensor: &self.bias, no_decay: true });
    }
    fn set_training(&mut self, _: bool) {}
}

/// BatchNorm2d with running statistics (momentum 0.1, eps 1e-5 by default) and `num_batches_tracked`.
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: AtomicU64,
    pub momentum: f64,
    pub eps: f64,
    pub training: bool,
}

impl BatchNorm2d {
    pub fn new(init: &mut Init, channels: usize) -> Result<Self> {
        Ok(BatchNorm2d {
            weight: init.constant(&[channels], 1.0)?,
            bias: init.constant(&[channels], 0.0)?,
            running_mean: init.buffer(&[channels], 0.0)?,
            running_var: init.buffer(&[channels], 1.0)?,
            num_batches_tracked: AtomicU64::new(0),
            momentum: 0.1,
            eps: 1e-5,
            training: true,
        })
    }

    /// x (N, C, H, W). In training, uses batch statistics and updates the running ones.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.training {
            self.num_batches_tracked.fetch_add(1, Ordering::Relaxed);
        }
        ops::batch_norm2d(
            x,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            self.training,
            self.momentum,
            self.eps,
        )
    }
}

impl Module for BatchNorm2d {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        f("weight", Entry::Param { tensor: &self.weight, no_decay: true });
        f("bias", Entry::Param { tensor: &self.bias, no_decay: true });
        f("running_mean", Entry::Buffer(&self.running_mean));
        f("running_var", Entry::Buffer(&self.running_var));
        f("num_batches_tracked", Entry::Counter(&self.num_batches_tracked));
    }
    fn set_training(&mut self, training: bool) {
        self.training = training;
    }
}

/// fc1 -> GELU (erf) -> fc2, as timm's `Mlp` (dropout 0).
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    /// MLLA's init: trunc_normal(0.02) weights, zero biases.
    pub fn new(init: &mut Init, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Mlp {
            fc1: Linear::new_trunc_normal(init, dim, hidden, true)?,
            fc2: Linear::new_trunc_normal(init, hidden, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // fc2(gelu(h)) as one op that saves h and recomputes gelu(h) in its backward: the hidden layer's
        // activation (4x the width) is not kept for backward, and the results are bitwise the same.
        self.forward_hidden(&self.fc1.forward(x)?)
    }

    /// `self.forward(norm.forward(x))`, bitwise, without keeping the normalised x for backward (see
    /// [`LayerNorm::forward_linears`]): a transformer block's `mlp(norm2(x))`.
    pub fn forward_normed(&self, norm: &LayerNorm, x: &Tensor) -> Result<Tensor> {
        let mut h = norm.forward_linears(x, &[&self.fc1])?;
        self.forward_hidden(&h.remove(0))
    }

    /// fc2(gelu(h)) for the hidden pre-activation h = fc1(x).
    fn forward_hidden(&self, h: &Tensor) -> Result<Tensor> {
        ops::act_linear(h, ops::Unary::Gelu, &self.fc2.weight, self.fc2.bias.as_ref())
    }
}

impl Module for Mlp {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.fc1, "fc1", f);
        visit_child(&self.fc2, "fc2", f);
    }
    fn set_training(&mut self, _: bool) {}
}

/// Stochastic depth: drops whole samples with probability `p` in training (timm's `DropPath`).
pub struct DropPath {
    pub p: f64,
    pub training: bool,
}

impl DropPath {
    pub fn forward(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        ops::drop_path(x, self.p, self.training, rng)
    }

    /// The residual `x + self.forward(t)` as one op (`ops::add_drop_path`): the same draws and bits, one pass
    /// fewer over the branch.
    pub fn residual(&self, x: &Tensor, t: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        ops::add_drop_path(x, t, self.p, self.training, rng)
    }
}

impl Module for DropPath {
    fn visit(&self, _: &mut dyn FnMut(&str, Entry<'_>)) {}
    fn set_training(&mut self, training: bool) {
        self.training = training;
    }
}
