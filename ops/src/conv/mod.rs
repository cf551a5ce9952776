//! Convolutions: `conv2d` with stride, padding, dilation and groups (PyTorch's `F.conv2d`), and the causal
//! depthwise `causal_conv1d` of the Mamba mixer.
//!
//! conv2d: x (N, C, H, W), w (O, C/G, kh, kw), bias (O), G groups. Group q maps input channels
//! q C/G .. (q+1) C/G to output channels q O/G .. (q+1) O/G; c0(o) is the first input channel of o's group.
//! Writing ih = a sh - ph + i dh and iw = b sw - pw + j dw (x is 0 outside the image):
//!
//! | | formula |
//! | --- | --- |
//! | shape | OH = (H + 2 ph - dh (kh - 1) - 1) / sh + 1 (floor), OW likewise; y is (N, O, OH, OW) |
//! | forward | y[n,o,a,b] = bias[o] + sum_{c,i,j} w[o,c,i,j] x[n, c0(o) + c, ih, iw] |
//! | dL/dx | dx[n, c0(o) + c, ih, iw] += g[n,o,a,b] w[o,c,i,j] (the transposed convolution) |
//! | dL/dw | dw[o,c,i,j] = sum_{n,a,b} g[n,o,a,b] x[n, c0(o) + c, ih, iw] |
//! | dL/dbias | db[o] = sum_{n,a,b} g[n,o,a,b] |
//!
//! Two CPU kernels. Depthwise (G = C = O, the MILA block's 3x3 convs): direct loops over zero-padded (n, c)
//! planes, several per task; when x is a channels-last view (memory (N, H, W, C), as the image view of the
//! block's (B, H W, C) tokens), the loops run in that layout instead, vectorised along the channels with no
//! transposing copy, and the output and dx are channels-last views too; so does a conv with one group, as one
//! GEMM per block of samples of the channels-last patches (rows of kh kw C). Everything else: per sample and
//! group, im2col gathers the patches into cols (C/G kh kw, OH OW) so that y_q = W_q cols is one GEMM (W_q is
//! (O/G, C/G kh kw)); backward is dW_q += G_q cols^T and dx = col2im(W_q^T G_q). A 1x1 conv with stride 1
//! and no padding uses x itself as cols. The CUDA path (cuda.rs, conv.cu) has the same split: tiled
//! direct depthwise kernels (a fused backward), and for the rest an implicit-GEMM forward (im2col's patches
//! gathered as the product needs them) and im2col + cuBLAS for the backward, the pointwise forward and TF32
//! mode. CUDA kernels read contiguous NCHW, except for a depthwise conv of a channels-last view: as on the CPU it
//! runs in that layout (NHWC kernels, vectorised along the channels, no copy of x saved), answering a
//! channels-last output and dx.
//!
//! causal_conv1d: x (B, C, L), w (C, 1, k), bias (C); k - 1 zeros on the left, so the output keeps length L
//! and y[t] sees x[t - k + 1 ..= t] only (PyTorch's Conv1d(C, C, k, groups=C, padding=k-1) cut to its first L
//! outputs). With x = 0 at negative times:
//!
//! | | formula |
//! | --- | --- |
//! | forward | y[b,c,t] = bias[c] + sum_j w[c,0,j] x[b,c,t + j - (k-1)] |
//! | dL/dx | dx[b,c,s] = sum_j g[b,c,s - j + (k-1)] w[c,0,j] (terms with s - j + k - 1 < L) |
//! | dL/dw | dw[c,0,j] = sum_{b,t} g[b,c,t] x[b,c,t + j - (k-1)] |
//! | dL/dbias | db[c] = sum_{b,t} g[b,c,t] |

mod conv_act;
mod conv_residual;
mod cpu;
pub(crate) mod cuda;
mod reference;

pub use conv_act::conv2d_act;
pub use conv_residual::conv2d_residual;
pub use reference::conv2d_ref;

use engine::{Device, Error, Layout, Op, Result, Storage, Tensor};

use crate::view::permute;

pub(crate) use crate::util::is_channels_last;
use crate::util::{channels_last_layout, check_vector, no_cuda, same_dtype_device, saved_contiguous, Needs};

/// The storage and layout of an optional operand (a bias), on the device of the match arm it is used in (its
/// device was checked against x's at op entry).
fn operand<'a, S>(
    t: Option<&'a Tensor>,
    s: Option<&'a Storage>,
    get: impl Fn(&'a Storage) -> Result<&'a S>,
) -> Result<Option<(&'a S, &'a engine::Layout)>> {
    t.zip(s).map(|(t, s)| Ok((get(s)?, t.layout()))).transpose()
}

/// Sizes of one conv2d call, checked once at op entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conv2dGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Conv2dGeom {
    pub(crate) fn new(
        x: &[usize],
        w: &[usize],
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
    ) -> Result<Self> {
        const OP: &str = "conv2d";
        let (&[n, c, h, wd], &[o, cg, kh, kw]) = (x, w) else {
            return Err(Error::invalid(
                OP,
                format!("expected x (N, C, H, W) and weight (O, C/groups, kh, kw), got weight {w:?}"),
                x,
            ));
        };
        if groups == 0 || c % groups != 0 || o % groups != 0 {
            return Err(Error::invalid(
                OP,
                format!("groups {groups} must divide the input channels {c} and the output channels {o}"),
                x,
            ));
        }
        if cg != c / groups {
            return Err(Error::ShapeMismatch { op: OP, lhs: x.to_vec(), rhs: w.to_vec() });
        }
        if stride.0 == 0 || stride.1 == 0 || dilation.0 == 0 || dilation.1 == 0 || kh == 0 || kw == 0 {
            return Err(Error::invalid(
                OP,
                format!("stride {stride:?}, dilation {dilation:?} and kernel {kh}x{kw} must be positive"),
                x,
            ));
        }
        // Output size along one axis, or None when the dilated kernel is larger than the padded input.
        let out = |len: usize, k: usize, s: usize, p: usize, d: usize| {
            let span = d.checked_mul(k - 1)?.checked_add(1)?;
            len.checked_add(p.checked_mul(2)?)?.checked_sub(span).map(|r| r / s + 1)
        };
        match (out(h, kh, stride.0, padding.0, dilation.0), out(wd, kw, stride.1, padding.1, dilation.1)) {
            (Some(oh), Some(ow)) => {
                Ok(Conv2dGeom { n, c, h, w: wd, o, kh, kw, stride, padding, dilation, groups, oh, ow })
            }
            _ => Err(Error::invalid(
                OP,
                format!(
                    "kernel {kh}x{kw} with dilation {dilation:?} does not fit the input padded by {padding:?}; \
                     weight {w:?}"
                ),
                x,
            )),
        }
    }

    pub(crate) fn out_shape(&self) -> [usize; 4] {
        [self.n, self.o, self.oh, self.ow]
    }

    /// Depthwise: every channel convolved with its own single filter.
    pub(crate) fn is_depthwise(&self) -> bool {
        self.groups == self.c && self.o == self.c
    }

    /// A 1x1 conv reading every pixel once: im2col would be a copy of x.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == (1, 1) && self.padding == (0, 0)
    }
}

/// The checks shared by `conv2d` and `conv2d_ref`.
fn conv2d_geom(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
) -> Result<Conv2dGeom> {
    same_dtype_device("conv2d", x, w)?;
    let geom = Conv2dGeom::new(x.shape(), w.shape(), stride, padding, dilation, groups)?;
    check_vector("conv2d", "bias", bias, x, geom.o)?;
    Ok(geom)
}

struct Conv2d {
    /// Input and weight, contiguous and detached.
    x: Tensor,
    w: Tensor,
    has_bias: bool,
    geom: Conv2dGeom,
    needs: Needs,
}

impl Op for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = g.contiguous()?;
        let grads = match (&*self.x.storage(), &*self.w.storage(), &*g.storage()) {
            (Storage::Cpu(x), Storage::Cpu(w), Storage::Cpu(gs)) => cpu::conv2d_backward(
                (x, self.x.layout()),
                (w, self.w.layout()),
                (gs, g.layout()),
                &self.geom,
                self.needs,
            )?,
            (Storage::Cuda(x), Storage::Cuda(w), Storage::Cuda(gs)) => cuda::conv2d_backward(
                (x, self.x.layout()),
                (w, self.w.layout()),
                (gs, g.layout()),
                &self.geom,
                self.needs,
            )?,
            (s, _, _) => return Err(no_cuda("conv2d_backward", s)),
        };
        grads.into_tensors(self.x.shape(), Some(self.w.shape()), self.has_bias.then_some(&[self.geom.o]))
    }
}

/// A conv2d whose input is a channels-last view, on the CPU depthwise or with one group, on CUDA depthwise:
/// computed in that layout (depthwise vectorised along the channels, dense as one GEMM per block of samples,
/// the patches rows of kh kw C), the output a channels-last view too, with no transposing copy; x is saved as
/// the view itself.
struct ConvChannelsLast {
    x: Tensor,
    w: Tensor,
    has_bias: bool,
    geom: Conv2dGeom,
    needs: Needs,
    /// The op is x + conv2d(x) ([`conv2d_residual`]): dx is g + the conv's dx.
    residual: bool,
}

impl Op for ConvChannelsLast {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        // The gradient usually arrives channels-last (through the tokens view); otherwise it is put so.
        let gd = &self.geom;
        let g = if is_channels_last(g.layout()) {
            g.clone()
        } else {
            permute(g, &[0, 2, 3, 1])?.contiguous()?.with_layout(channels_last_layout(gd.n, gd.o, gd.oh, gd.ow))
        };
        let grads = match (&*self.x.storage(), &*self.w.storage(), &*g.storage()) {
            (Storage::Cpu(x), Storage::Cpu(w), Storage::Cpu(gs)) => cpu::conv2d_nhwc_backward(
                (x, self.x.layout()),
                (w, self.w.layout()),
                (gs, g.layout()),
                &self.geom,
                self.needs,
            )?,
            (Storage::Cuda(x), Storage::Cuda(w), Storage::Cuda(gs)) => cuda::conv2d_nhwc_backward(
                (x, self.x.layout()),
                (w, self.w.layout()),
                (gs, g.layout()),
                &self.geom,
                self.needs,
                self.residual,
            )?,
            (s, _, _) => return Err(no_cuda("conv2d_backward", s)),
        };
        let cpu_residual = self.residual && g.device() == Device::Cpu;
        let dx = grads
            .x
            .map(|s| {
                let t = Tensor::from_storage(s, &[gd.n, gd.h, gd.w, gd.c])?;
                let t = t.with_layout(channels_last_layout(gd.n, gd.c, gd.h, gd.w));
                // On CUDA the dx kernel added g already.
                if cpu_residual {
                    add_in_memory_order(&t, &g)
                } else {
                    Ok(t)
                }
            })
            .transpose()?;
        let w = grads.w.map(|s| Tensor::from_storage(s, self.w.shape())).transpose()?;
        let mut out = vec![dx, w];
        if self.has_bias {
            out.push(grads.bias.map(|s| Tensor::from_storage(s, &[gd.o])).transpose()?);
        }
        Ok(out)
    }
}

/// The op that differentiates one conv2d, with what it saved: the NCHW kernels' or the channels-last ones'.
enum ConvBackward {
    Nchw(Conv2d),
    ChannelsLast(ConvChannelsLast),
}

impl ConvBackward {
    /// The layout of the output (and of the gradient the backward reads best).
    fn out_layout(&self) -> Layout {
        match self {
            ConvBackward::Nchw(op) => Layout::contiguous(&op.geom.out_shape()),
            ConvBackward::ChannelsLast(op) => {
                let g = &op.geom;
                channels_last_layout(g.n, g.o, g.oh, g.ow)
            }
        }
    }

    /// The forward again from the saved x and weight (and the caller's bias), through the same kernel, so
    /// the same bits: for ops that recompute a conv's output in their backward instead of saving it.
    fn recompute(&self, bias: Option<&Tensor>) -> Result<Tensor> {
        match self {
            ConvBackward::Nchw(op) => conv2d_nchw_value(&op.x, &op.w, bias, &op.geom),
            ConvBackward::ChannelsLast(op) => {
                let epi = if op.residual { Epilogue::Residual } else { Epilogue::Plain };
                conv2d_channels_last_value(&op.x, &op.w, bias, &op.geom, epi)
            }
        }
    }
}

impl Op for ConvBackward {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        match self {
            ConvBackward::Nchw(op) => op.backward(g),
            ConvBackward::ChannelsLast(op) => op.backward(g),
        }
    }
}

/// 2-D convolution (cross-correlation, as PyTorch): x (N, C, H, W), weight (O, C/groups, kh, kw), optional
/// bias (O); stride, padding (zeros on both sides) and dilation as (height, width). Returns (N, O, OH, OW).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
) -> Result<Tensor> {
    let geom = conv2d_geom(x, weight, bias, stride, padding, dilation, groups)?;
    let (y, op) = conv2d_untracked(x, weight, bias, geom)?;
    Ok(recorded(&y, x, weight, bias, || op))
}

/// `y` recorded as the output of a conv-shaped op over x, the weight and the optional bias (in that order: the
/// order of the op's gradients).
fn recorded<O: Op + 'static>(
    y: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    op: impl FnOnce() -> O,
) -> Tensor {
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    Tensor::from_op_over(y, &inputs, op)
}

/// conv2d's output, not recorded, and the op for its backward. A channels-last input takes the channels-last
/// kernels (see [`ConvChannelsLast`]) where they exist: on the CPU depthwise or with one group, on CUDA
/// depthwise; x is then saved as the detached view itself, with no copy.
fn conv2d_untracked(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geom: Conv2dGeom,
) -> Result<(Tensor, ConvBackward)> {
    let (y, op, _) = conv2d_untracked_with(x, weight, bias, geom, Epilogue::Plain)?;
    Ok((y, op))
}

/// What a conv does to its output beyond the convolution, where its kernels can do it as they store each
/// output (the channels-last depthwise CUDA kernels; [`cuda::epilogue_code`]): nothing, add the input
/// (`x + conv2d(x)`, the output in x's shape), or an activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Epilogue {
    Plain,
    Residual,
    Act(crate::elementwise::Unary),
}

/// [`conv2d_untracked`] with an epilogue, and whether the output has it. The channels-last path forms the
/// residual (its CUDA kernels, or an add in memory order on the CPU) and, on CUDA, the activations the
/// kernels have; otherwise the output is the plain conv and the caller applies the rest. A residual needs the
/// output in x's shape (checked by the caller).
fn conv2d_untracked_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geom: Conv2dGeom,
    epi: Epilogue,
) -> Result<(Tensor, ConvBackward, bool)> {
    let needs = Needs::of(x, Some(weight), bias);
    let has_bias = bias.is_some();
    if is_channels_last(x.layout()) {
        let here = match x.device() {
            Device::Cpu => geom.is_depthwise() || geom.groups == 1,
            Device::Cuda(_) => geom.is_depthwise() && cuda::channels_last_supported(&geom),
        };
        if here {
            let (xd, wc) = (x.detach(), saved_contiguous(weight)?);
            let applied = match epi {
                Epilogue::Plain | Epilogue::Residual => epi,
                Epilogue::Act(_) if x.device() != Device::Cpu && cuda::epilogue_code(epi).is_some() => epi,
                Epilogue::Act(_) => Epilogue::Plain,
            };
            let y = conv2d_channels_last_value(&xd, &wc, bias, &geom, applied)?;
            let residual = epi == Epilogue::Residual;
            let op = ConvChannelsLast { x: xd, w: wc, has_bias, geom, needs, residual };
            return Ok((y, ConvBackward::ChannelsLast(op), applied == epi));
        }
    }
    let (xc, wc) = (saved_contiguous(x)?, saved_contiguous(weight)?);
    let y = conv2d_nchw_value(&xc, &wc, bias, &geom)?;
    Ok((y, ConvBackward::Nchw(Conv2d { x: xc, w: wc, has_bias, geom, needs }), epi == Epilogue::Plain))
}

/// The NCHW kernels' output for contiguous x and weight.
fn conv2d_nchw_value(xc: &Tensor, wc: &Tensor, bias: Option<&Tensor>, geom: &Conv2dGeom) -> Result<Tensor> {
    let bias_storage = bias.map(|b| b.storage());
    let storage = match (&*xc.storage(), &*wc.storage()) {
        (Storage::Cpu(xs), Storage::Cpu(ws)) => {
            // The bias is on x's device (checked at op entry), so on the CPU too.
            let b = operand(bias, bias_storage.as_deref(), |s| s.as_cpu("conv2d"))?;
            Storage::Cpu(cpu::conv2d((xs, xc.layout()), (ws, wc.layout()), b, geom)?)
        }
        (Storage::Cuda(xs), Storage::Cuda(ws)) => {
            let b = operand(bias, bias_storage.as_deref(), |s| s.as_cuda("conv2d"))?;
            Storage::Cuda(cuda::conv2d((xs, xc.layout()), (ws, wc.layout()), b, geom)?)
        }
        (s, _) => return Err(no_cuda("conv2d", s)),
    };
    Tensor::from_storage(storage, &geom.out_shape())
}

/// The channels-last kernels' output (a channels-last view) for a channels-last x and a contiguous weight,
/// with the epilogue `epi` (on the CPU only Plain and Residual, the latter an add in memory order).
fn conv2d_channels_last_value(
    x: &Tensor,
    wc: &Tensor,
    bias: Option<&Tensor>,
    geom: &Conv2dGeom,
    epi: Epilogue,
) -> Result<Tensor> {
    let bias_storage = bias.map(|b| b.storage());
    let storage = match (&*x.storage(), &*wc.storage()) {
        (Storage::Cpu(xs), Storage::Cpu(ws)) => {
            let b = operand(bias, bias_storage.as_deref(), |s| s.as_cpu("conv2d"))?;
            Storage::Cpu(cpu::conv2d_nhwc((xs, x.layout()), (ws, wc.layout()), b, geom)?)
        }
        (Storage::Cuda(xs), Storage::Cuda(ws)) => {
            let b = operand(bias, bias_storage.as_deref(), |s| s.as_cuda("conv2d"))?;
            Storage::Cuda(cuda::conv2d_nhwc((xs, x.layout()), (ws, wc.layout()), b, geom, epi)?)
        }
        (s, _) => return Err(no_cuda("conv2d", s)),
    };
    let (n, o, oh, ow) = (geom.n, geom.o, geom.oh, geom.ow);
    let y = Tensor::from_storage(storage, &[n, oh, ow, o])?.with_layout(channels_last_layout(n, o, oh, ow));
    match (epi, x.device()) {
        (Epilogue::Plain, _) | (_, Device::Cuda(_)) => Ok(y),
        (Epilogue::Residual, Device::Cpu) => add_in_memory_order(&y, x),
        (Epilogue::Act(_), Device::Cpu) => {
            Err(Error::invalid("conv2d", "internal: no activation epilogue on the CPU", x.shape()))
        }
    }
}

/// `a + b` (untracked; the sum the composition's `b + a` gives, addition commuting) for a fresh dense `a`
/// (offset 0, a permutation of row-major order), in a's memory order and with a's layout: a view of b when b
/// has a's strides, else a copy of it in that order.
fn add_in_memory_order(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let sum = engine::no_grad(|| crate::elementwise::add(&conv_act::flat(a), &conv_act::in_memory_order_of(b, a)?))?;
    Ok(sum.with_layout(a.layout().clone()))
}

/// Sizes of one causal_conv1d call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conv1dGeom {
    pub b: usize,
    pub c: usize,
    pub l: usize,
    pub k: usize,
}

struct CausalConv1d {
    x: Tensor,
    w: Tensor,
    has_bias: bool,
    geom: Conv1dGeom,
    needs: Needs,
}

impl Op for CausalConv1d {
    fn name(&self) -> &'static str {
        "causal_conv1d"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = g.contiguous()?;
        let grads = match (&*self.x.storage(), &*self.w.storage(), &*g.storage()) {
            (Storage::Cpu(x), Storage::Cpu(w), Storage::Cpu(gs)) => cpu::causal_conv1d_backward(
                (x, self.x.layout()),
                (w, self.w.layout()),
                (gs, g.layout()),
                &self.geom,
                self.needs,
            )?,
            (Storage::Cuda(x), Storage::Cuda(w), Storage::Cuda(gs)) => cuda::causal_conv1d_backward(
                (x, self.x.layout()),
                (w, self.w.layout()),
                (gs, g.layout()),
                &self.geom,
                self.needs,
            )?,
            (s, _, _) => return Err(no_cuda("causal_conv1d_backward", s)),
        };
        grads.into_tensors(self.x.shape(), Some(self.w.shape()), self.has_bias.then_some(&[self.geom.c]))
    }
}

/// Causal depthwise 1-D convolution: x (B, C, L), weight (C, 1, k), optional bias (C). Output (B, C, L), where
/// time t sees inputs t - k + 1 ..= t (k - 1 zeros padded on the left), as the Mamba mixer's `conv1d`.
pub fn causal_conv1d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "causal_conv1d";
    same_dtype_device(OP, x, weight)?;
    let geom = match (x.shape(), weight.shape()) {
        (&[b, c, l], &[wc, 1, k]) if wc == c && k > 0 => Conv1dGeom { b, c, l, k },
        (&[_, _, _], _) => {
            return Err(Error::ShapeMismatch { op: OP, lhs: x.shape().to_vec(), rhs: weight.shape().to_vec() })
        }
        (s, _) => return Err(Error::invalid(OP, "expected x (B, C, L)", s)),
    };
    check_vector(OP, "bias", bias, x, geom.c)?;
    let (xc, wc) = (saved_contiguous(x)?, saved_contiguous(weight)?);
    let bias_storage = bias.map(|b| b.storage());
    let storage = match (&*xc.storage(), &*wc.storage()) {
        (Storage::Cpu(xs), Storage::Cpu(ws)) => {
            let b = operand(bias, bias_storage.as_deref(), |s| s.as_cpu(OP))?;
            Storage::Cpu(cpu::causal_conv1d((xs, xc.layout()), (ws, wc.layout()), b, &geom)?)
        }
        (Storage::Cuda(xs), Storage::Cuda(ws)) => {
            let b = operand(bias, bias_storage.as_deref(), |s| s.as_cuda(OP))?;
            Storage::Cuda(cuda::causal_conv1d((xs, xc.layout()), (ws, wc.layout()), b, &geom)?)
        }
        (s, _) => return Err(no_cuda(OP, s)),
    };
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    let needs = Needs::of(x, Some(weight), bias);
    Ok(Tensor::from_op(storage, x.shape(), &inputs, || CausalConv1d {
        x: xc.clone(),
        w: wc.clone(),
        has_bias: bias.is_some(),
        geom,
        needs,
    }))
}

#[cfg(test)]
pub(crate) mod tests;
