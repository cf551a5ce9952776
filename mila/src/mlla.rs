//! The MLLA network (official `MLLA`, `docs/MILA.md` section 4): a convolutional stem to 1/4 resolution,
//! four stages of MILA blocks whose width doubles while the grid halves (PatchMerging between them), a final
//! LayerNorm, the mean over tokens and a linear head.

use engine::{Error, Generator, Result, Tensor};
use nn::module::visit_child;
use nn::trainer::Classifier;
use nn::{BatchNorm2d, Conv2d, Entry, Init, LayerNorm, Linear, Module};
use ops::TensorOps;
use serde::{Deserialize, Serialize};

use crate::block::{BlockConfig, MilaBlock};
use crate::util::{check_tokens, conv_macs, linear_macs, to_image, to_tokens};

/// The official `ConvLayer`: Conv2d, then an optional BatchNorm2d (`norm`), then an optional ReLU.
pub struct ConvLayer {
    pub conv: Conv2d,
    pub norm: Option<BatchNorm2d>,
    pub relu: bool,
}

/// How a [`ConvLayer`] is made: kernel, stride, padding, groups, conv bias, BatchNorm, ReLU.
#[derive(Clone, Copy)]
struct ConvSpec {
    kernel: usize,
    stride: usize,
    padding: usize,
    groups: usize,
    bias: bool,
    norm: bool,
    relu: bool,
}

impl ConvLayer {
    fn new(init: &mut Init, in_channels: usize, out_channels: usize, s: ConvSpec) -> Result<Self> {
        let conv =
            Conv2d::new(init, in_channels, out_channels, (s.kernel, s.kernel), s.stride, s.padding, s.groups, s.bias)?;
        let norm = if s.norm { Some(BatchNorm2d::new(init, out_channels)?) } else { None };
        Ok(ConvLayer { conv, norm, relu: s.relu })
    }

    /// x (B, C, H, W) -> (B, O, OH, OW).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.norm.is_none() && self.relu {
            // ReLU(conv) as one op that saves the conv's input, not its output, and recomputes the conv in
            // backward: the same bits (PatchMerging's wide 1x1 and depthwise convs).
            let c = &self.conv;
            return ops::conv2d_act(
                x,
                &c.weight,
                c.bias.as_ref(),
                c.stride,
                c.padding,
                c.dilation,
                c.groups,
                ops::Unary::Relu,
            );
        }
        let mut y = self.conv.forward(x)?;
        if let Some(norm) = &self.norm {
            y = norm.forward(&y)?;
        }
        if self.relu {
            y = y.relu()?;
        }
        Ok(y)
    }

    /// The output side for an input side `size` (floor((size + 2p - k) / s) + 1), along dim 0 or 1.
    fn out_size(&self, size: usize, axis: usize) -> usize {
        let k = self.conv.weight.shape()[2 + axis];
        let (pad, stride) = if axis == 0 {
            (self.conv.padding.0, self.conv.stride.0)
        } else {
            (self.conv.padding.1, self.conv.stride.1)
        };
        (size + 2 * pad).saturating_sub(k) / stride + 1
    }

    /// Multiply-adds for one sample with an (h, w) input, and the output (h, w).
    fn macs(&self, (h, w): (usize, usize)) -> (u64, (usize, usize)) {
        let out = (self.out_size(h, 0), self.out_size(w, 1));
        (conv_macs(&self.conv, out), out)
    }
}

impl Module for ConvLayer {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.conv, "conv", f);
        if let Some(norm) = &self.norm {
            visit_child(norm, "norm", f);
        }
    }
    fn set_training(&mut self, training: bool) {
        if let Some(norm) = &mut self.norm {
            norm.set_training(training);
        }
    }
}

/// Visits a list of children as PyTorch's `nn.Sequential`/`ModuleList` name them: `0`, `1`, ...
fn visit_list<M: Module>(items: &[M], prefix: &str, f: &mut dyn FnMut(&str, Entry<'_>)) {
    for (i, item) in items.iter().enumerate() {
        visit_child(item, &format!("{prefix}.{i}"), f);
    }
}

/// Multiply-adds of a chain of conv layers from an (h, w) input, and the output (h, w).
fn chain_macs(layers: &[ConvLayer], size: (usize, usize)) -> (u64, (usize, usize)) {
    layers.iter().fold((0, size), |(total, side), l| {
        let (m, out) = l.macs(side);
        (total + m, out)
    })
}

/// The stem (`patch_embed`), to 1/4 resolution with `embed_dim` channels:
/// conv1 (3x3 s2, in -> C/2, ReLU); conv2 (two 3x3 C/2 -> C/2, ReLU after the first) added to its input;
/// conv3 (3x3 s2 C/2 -> 4C, ReLU; 1x1 4C -> C). All convs without bias, each followed by BatchNorm.
pub struct Stem {
    pub conv1: ConvLayer,
    pub conv2: Vec<ConvLayer>,
    pub conv3: Vec<ConvLayer>,
}

impl Stem {
    pub fn new(init: &mut Init, in_chans: usize, embed_dim: usize) -> Result<Self> {
        let half = embed_dim / 2;
        let spec = |kernel, stride, relu| ConvSpec {
            kernel,
            stride,
            padding: kernel / 2,
            groups: 1,
            bias: false,
            norm: true,
            relu,
        };
        Ok(Stem {
            conv1: ConvLayer::new(init, in_chans, half, spec(3, 2, true))?,
            conv2: vec![
                ConvLayer::new(init, half, half, spec(3, 1, true))?,
                ConvLayer::new(init, half, half, spec(3, 1, false))?,
            ],
            conv3: vec![
                ConvLayer::new(init, half, 4 * embed_dim, spec(3, 2, true))?,
                ConvLayer::new(init, 4 * embed_dim, embed_dim, spec(1, 1, false))?,
            ],
        })
    }

    /// Image (B, in, H, W) -> tokens (B, H/4 W/4, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.conv1.forward(x)?; // (B, C/2, H/2, W/2)
        let y = self.conv2.iter().try_fold(x.clone(), |t, l| l.forward(&t))?;
        let x = y.add(&x)?;
        let x = self.conv3.iter().try_fold(x, |t, l| l.forward(&t))?; // (B, C, H/4, W/4)
        to_tokens(&x)
    }

    /// Multiply-adds for one (h, w) image.
    pub fn macs(&self, size: (usize, usize)) -> u64 {
        let (m1, side) = self.conv1.macs(size);
        let (m2, side) = chain_macs(&self.conv2, side);
        let (m3, _) = chain_macs(&self.conv3, side);
        m1 + m2 + m3
    }
}

impl Module for Stem {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.conv1, "conv1", f);
        visit_list(&self.conv2, "conv2", f);
        visit_list(&self.conv3, "conv3", f);
    }
    fn set_training(&mut self, training: bool) {
        self.conv1.set_training(training);
        self.conv2.iter_mut().chain(self.conv3.iter_mut()).for_each(|l| l.set_training(training));
    }
}

/// Downsampling between stages (`downsample`), an inverted bottleneck that halves the grid and doubles the
/// width: 1x1 C -> 8C (ReLU), 3x3 stride-2 depthwise 8C (ReLU), 1x1 8C -> 2C + BatchNorm; convs with bias.
pub struct PatchMerging {
    pub conv: Vec<ConvLayer>,
    pub dim: usize,
    /// The input grid (H, W).
    pub resolution: (usize, usize),
}

impl PatchMerging {
    pub fn new(init: &mut Init, dim: usize, resolution: (usize, usize)) -> Result<Self> {
        // The official expansion ratio 4 applies to the output width 2C.
        let (out, wide) = (2 * dim, 8 * dim);
        let spec = |kernel, stride, groups, norm, relu| ConvSpec {
            kernel,
            stride,
            padding: kernel / 2,
            groups,
            bias: true,
            norm,
            relu,
        };
        Ok(PatchMerging {
            conv: vec![
                ConvLayer::new(init, dim, wide, spec(1, 1, 1, false, true))?,
                ConvLayer::new(init, wide, wide, spec(3, 2, wide, false, true))?,
                ConvLayer::new(init, wide, out, spec(1, 1, 1, true, false))?,
            ],
            dim,
            resolution,
        })
    }

    /// Tokens (B, H W, C) -> (B, H/2 W/2, 2C).
    ///
    /// The official module permutes the tokens to an NCHW image and back; here the chain runs on the tokens,
    /// with the same parameters and the same function (sums in other orders): each 1x1 conv is a Linear over
    /// the tokens (its weight (O, C, 1, 1) read as (O, C)), the first with its ReLU (`linear_relu`: bias and
    /// ReLU in the product's epilogue on CUDA), the depthwise conv runs on the channels-last image view of the
    /// tokens (no copy), the ReLU after it rides in the last product's input (`act_linear`, which saves the
    /// pre-activation), and only the final BatchNorm sees the narrow 2C-wide output as an image.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_tokens("PatchMerging", x, self.resolution, self.dim)?;
        let (h, w) = self.resolution;
        let is_1x1 = |l: &ConvLayer| {
            let c = &l.conv;
            c.weight.shape()[2..] == [1, 1] && c.stride == (1, 1) && c.padding == (0, 0) && c.groups == 1
        };
        // The official layers (1x1 with ReLU, depthwise with ReLU, 1x1 with BatchNorm); others as images.
        let (expand, depthwise, project) = match &self.conv[..] {
            [e, d, p]
                if is_1x1(e) && e.relu && e.norm.is_none() && d.relu && d.norm.is_none() && is_1x1(p) && !p.relu =>
            {
                (e, d, p)
            }
            _ => return self.forward_images(x),
        };
        let pointwise = |l: &ConvLayer| {
            let wt = &l.conv.weight;
            wt.reshape(&[wt.dim(0)? as isize, wt.dim(1)? as isize])
        };
        let t = ops::linear_relu(x, &pointwise(expand)?, expand.conv.bias.as_ref())?;
        let d = &depthwise.conv;
        let t = to_image(&t, h, w)?;
        let t = ops::conv2d(&t, &d.weight, d.bias.as_ref(), d.stride, d.padding, d.dilation, d.groups)?;
        let (oh, ow) = (t.dim(2)?, t.dim(3)?);
        let y = ops::act_linear(&to_tokens(&t)?, ops::Unary::Relu, &pointwise(project)?, project.conv.bias.as_ref())?;
        match &project.norm {
            Some(norm) => to_tokens(&norm.forward(&to_image(&y, oh, ow)?)?),
            None => Ok(y),
        }
    }

    /// The chain as the official module runs it, on the NCHW image of the tokens (for layers changed from
    /// the official ones).
    fn forward_images(&self, x: &Tensor) -> Result<Tensor> {
        let image = to_image(x, self.resolution.0, self.resolution.1)?;
        to_tokens(&self.conv.iter().try_fold(image, |t, l| l.forward(&t))?)
    }

    /// Multiply-adds for one sample.
    pub fn macs(&self) -> u64 {
        chain_macs(&self.conv, self.resolution).0
    }
}

impl Module for PatchMerging {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_list(&self.conv, "conv", f);
    }
    fn set_training(&mut self, training: bool) {
        self.conv.iter_mut().for_each(|l| l.set_training(training));
    }
}

/// One stage (`layers.i`): blocks at one width and grid, then PatchMerging unless it is the last.
pub struct BasicLayer {
    pub blocks: Vec<MilaBlock>,
    pub downsample: Option<PatchMerging>,
}

impl BasicLayer {
    pub fn forward(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.blocks {
            x = block.forward(&x, rng)?;
        }
        match &self.downsample {
            Some(d) => d.forward(&x),
            None => Ok(x),
        }
    }

    pub fn macs(&self) -> u64 {
        self.blocks.iter().map(MilaBlock::macs).sum::<u64>() + self.downsample.as_ref().map_or(0, PatchMerging::macs)
    }
}

impl Module for BasicLayer {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_list(&self.blocks, "blocks", f);
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

/// The constructor arguments of MLLA, as in the fixtures' `config` JSON (unknown keys are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MllaConfig {
    pub img_size: usize,
    pub in_chans: usize,
    pub num_classes: usize,
    pub embed_dim: usize,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub mlp_ratio: f64,
    pub drop_path_rate: f64,
    pub qkv_bias: bool,
}

impl MllaConfig {
    /// MLLA-T: 24.4M parameters, 4.2G FLOPs at 224x224 (drop path 0.2 as the official config).
    pub fn tiny() -> Self {
        Self::imagenet(64, &[2, 4, 8, 4], &[2, 4, 8, 16], 0.2)
    }

    /// MLLA-S: 43.0M parameters, 7.3G FLOPs (drop path 0.3).
    pub fn small() -> Self {
        Self::imagenet(64, &[3, 6, 21, 6], &[2, 4, 8, 16], 0.3)
    }

    /// MLLA-B: 96.0M parameters, 16.2G FLOPs (drop path 0.5).
    pub fn base() -> Self {
        Self::imagenet(96, &[3, 6, 21, 6], &[3, 6, 12, 24], 0.5)
    }

    /// A small model for MNIST padded to 32x32: embed 16, one block per stage, heads 1, 2, 4, 8.
    pub fn mnist() -> Self {
        MllaConfig {
            img_size: 32,
            in_chans: 1,
            num_classes: 10,
            embed_dim: 16,
            depths: vec![1, 1, 1, 1],
            num_heads: vec![1, 2, 4, 8],
            mlp_ratio: 4.0,
            drop_path_rate: 0.0,
            qkv_bias: true,
        }
    }

    /// The small MLLA of `mila bench models` (and `bench_models.py`'s `small32`): 32x32x1, embed 32, depths
    /// 1,2,2,1, heads 1,2,4,8, 10 classes, no drop path; 2,001,978 parameters.
    pub fn small32() -> Self {
        MllaConfig { embed_dim: 32, depths: vec![1, 2, 2, 1], ..Self::mnist() }
    }

    fn imagenet(embed_dim: usize, depths: &[usize], num_heads: &[usize], drop_path_rate: f64) -> Self {
        MllaConfig {
            img_size: 224,
            in_chans: 3,
            num_classes: 1000,
            embed_dim,
            depths: depths.to_vec(),
            num_heads: num_heads.to_vec(),
            mlp_ratio: 4.0,
            drop_path_rate,
            qkv_bias: true,
        }
    }

    /// Reads the JSON of a fixture's or checkpoint's `config`.
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| Error::Msg { context: "MllaConfig", msg: format!("{e}: {json}") })
    }

    /// Width of stage `i`: embed_dim 2^i.
    pub fn stage_dim(&self, i: usize) -> usize {
        self.embed_dim << i
    }

    /// Drop-path rate of every block, growing linearly from 0 to `drop_path_rate` over all blocks (as
    /// `torch.linspace(0, rate, total)`).
    pub fn drop_path_rates(&self) -> Vec<f64> {
        let total: usize = self.depths.iter().sum();
        (0..total).map(|i| if total > 1 { self.drop_path_rate * i as f64 / (total - 1) as f64 } else { 0.0 }).collect()
    }

    /// The stages as the constructors build them: width, heads, grid (halved after each stage but the
    /// last), and each block's drop-path rate.
    pub(crate) fn stages(&self) -> Vec<StagePlan> {
        let rates = self.drop_path_rates();
        let mut first = 0;
        let last = self.depths.len().saturating_sub(1);
        let mut plans = Vec::with_capacity(self.depths.len());
        for (i, (&depth, &heads)) in self.depths.iter().zip(&self.num_heads).enumerate() {
            let side = (self.img_size / 4) >> i;
            plans.push(StagePlan {
                dim: self.stage_dim(i),
                heads,
                grid: (side, side),
                drop_paths: rates[first..first + depth].to_vec(),
                merges: i < last,
            });
            first += depth;
        }
        plans
    }

    /// Errs unless x is a batch of images (B, in_chans, img_size, img_size); `op` names the caller.
    pub(crate) fn check_images(&self, op: &'static str, x: &Tensor) -> Result<()> {
        if x.shape().len() != 4 || x.shape()[1..] != [self.in_chans, self.img_size, self.img_size] {
            return Err(Error::invalid(
                op,
                format!("expected images (B, {}, {s}, {s})", self.in_chans, s = self.img_size),
                x.shape(),
            ));
        }
        Ok(())
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("MllaConfig", msg, &[self.img_size, self.img_size]));
        let stages = self.depths.len();
        if stages == 0 || stages != self.num_heads.len() {
            return bad(format!("{} depths and {} head counts", stages, self.num_heads.len()));
        }
        if self.in_chans == 0 || self.num_classes == 0 {
            return bad(format!("in_chans {} and num_classes {} must be positive", self.in_chans, self.num_classes));
        }
        if self.embed_dim == 0 || !self.embed_dim.is_multiple_of(4) {
            return bad(format!("embed_dim {} must be a positive multiple of 4 (RoPE-2D)", self.embed_dim));
        }
        // The stem divides by 4 and every PatchMerging by 2; RoPE is built for exactly that grid, so each
        // stride-2 conv must see an even side.
        let divisor = 4 << (stages - 1);
        if self.img_size == 0 || !self.img_size.is_multiple_of(divisor) {
            return bad(format!("img_size {} must be a positive multiple of {divisor}", self.img_size));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return bad(format!("drop_path_rate {} is not in [0, 1)", self.drop_path_rate));
        }
        Ok(())
    }
}

/// One stage of an [`MllaConfig`], as [`MllaConfig::stages`] lays it out.
pub(crate) struct StagePlan {
    pub dim: usize,
    pub heads: usize,
    /// The token grid (H, W) of its blocks.
    pub grid: (usize, usize),
    /// Each block's drop-path rate (one entry per block).
    pub drop_paths: Vec<f64>,
    /// Whether PatchMerging ends the stage (all but the last).
    pub merges: bool,
}

impl StagePlan {
    /// The stage's PatchMerging, or None for the last stage.
    pub fn downsample(&self, init: &mut Init) -> Result<Option<PatchMerging>> {
        self.merges.then(|| PatchMerging::new(init, self.dim, self.grid)).transpose()
    }
}

/// The MLLA classifier. Names are the official `state_dict` names (`patch_embed.conv1.conv.weight`,
/// `layers.2.blocks.5.attn.qk.weight`, `layers.0.downsample.conv.2.norm.running_var`, `norm.weight`,
/// `head.bias`), so official checkpoints load unchanged.
pub struct Mlla {
    pub patch_embed: Stem,
    pub layers: Vec<BasicLayer>,
    pub norm: LayerNorm,
    pub head: Linear,
    pub config: MllaConfig,
}

impl Mlla {
    /// Builds the model with MLLA's init (section 4), in training mode.
    pub fn new(init: &mut Init, config: &MllaConfig) -> Result<Self> {
        config.validate()?;
        let patch_embed = Stem::new(init, config.in_chans, config.embed_dim)?;
        let mut layers = Vec::with_capacity(config.depths.len());
        for stage in config.stages() {
            let blocks = stage
                .drop_paths
                .iter()
                .map(|&drop_path| {
                    let cfg = BlockConfig {
                        dim: stage.dim,
                        input_resolution: stage.grid,
                        num_heads: stage.heads,
                        mlp_ratio: config.mlp_ratio,
                        qkv_bias: config.qkv_bias,
                        drop_path,
                    };
                    MilaBlock::new(init, &cfg)
                })
                .collect::<Result<Vec<_>>>()?;
            layers.push(BasicLayer { blocks, downsample: stage.downsample(init)? });
        }
        let features = config.stage_dim(config.depths.len() - 1);
        Ok(Mlla {
            patch_embed,
            layers,
            norm: LayerNorm::new(init, features, 1e-5)?,
            head: Linear::new_trunc_normal(init, features, config.num_classes, true)?,
            config: config.clone(),
        })
    }

    /// Pooled features: image (B, in_chans, S, S) -> (B, F) after the last stage's norm and the token mean.
    pub fn forward_features(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        self.config.check_images("Mlla", x)?;
        let mut t = self.patch_embed.forward(x)?; // (B, N, C)
        for layer in &self.layers {
            t = layer.forward(&t, rng)?;
        }
        self.norm.forward(&t)?.mean(&[1], false) // (B, F)
    }

    /// Logits: image (B, in_chans, S, S) -> (B, num_classes).
    pub fn forward(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        self.head.forward(&self.forward_features(x, rng)?)
    }

    /// Multiply-adds of one image's forward: every conv, linear layer and attention product.
    pub fn macs(&self) -> u64 {
        self.patch_embed.macs((self.config.img_size, self.config.img_size))
            + self.layers.iter().map(BasicLayer::macs).sum::<u64>()
            + linear_macs(&self.head, 1)
    }
}

impl Module for Mlla {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.patch_embed, "patch_embed", f);
        visit_list(&self.layers, "layers", f);
        visit_child(&self.norm, "norm", f);
        visit_child(&self.head, "head", f);
    }
    fn set_training(&mut self, training: bool) {
        self.patch_embed.set_training(training);
        self.layers.iter_mut().for_each(|l| l.set_training(training));
    }
}

impl Classifier for Mlla {
    fn logits(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        self.forward(x, rng)
    }
}
