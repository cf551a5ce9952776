//! Normalisation as fused ops: `layer_norm` over the last dim and `batch_norm2d` over (N, H, W) per channel.
//! Each is one forward kernel that saves mean and rstd = 1 / sqrt(var + eps), and one backward kernel for
//! (dx, dweight, dbias). Statistics accumulate in f64 whatever the dtype (PyTorch's CPU kernels do the same).
//!
//! Over a group of M elements (a row of D for layer_norm; the N H W elements of a channel for batch_norm2d),
//! with xhat = (x - mean) rstd, var the biased variance, w and b the weight and bias (1 and 0 when absent):
//!
//! | | formula |
//! | --- | --- |
//! | forward | y = xhat w + b |
//! | dL/dx, statistics of the batch | rstd w (g - mean(g) - xhat mean(g xhat)) (means over the group) |
//! | dL/dx, fixed statistics (batch norm in eval) | rstd w g |
//! | dL/dw | sum over the group(s) of g xhat |
//! | dL/db | sum over the group(s) of g |
//!
//! (layer_norm's w is per element of the row, so its "w" in the dL/dx row goes inside the means:
//! dx = rstd (gy - mean(gy) - xhat mean(gy xhat)) with gy = g w.)
//!
//! batch_norm2d in training normalises with the batch mean and biased variance and, when given running
//! buffers, updates them in place as PyTorch does: running = (1 - momentum) running + momentum stat, where the
//! variance stat is the unbiased one (M / (M - 1) var). PyTorch's momentum=None (a cumulative average) is the
//! caller's: pass momentum = 1 / num_batches_tracked. In eval it uses the running statistics, and backward is
//! the affine map above.
//!
//! The CUDA kernels (cuda.rs, norm.cu) follow the same plan: one fused forward and one fused backward kernel
//! per op (layer_norm's backward adds a small kernel that sums its blocks' dweight/dbias partials; batch_norm2d
//! with few channels cuts each channel over several blocks, a kernel for the slices' partial sums and one that
//! combines them in order and writes y or dx), and the running buffers are blended in place by a kernel on the
//! device's stream.

mod cpu;
pub(crate) mod cuda;

use engine::cuda::CudaStorage;
use engine::{Device, Error, Layout, Op, Result, Storage, Tensor};

use crate::util::{channels_last_layout, check_vector, is_channels_last, no_cuda, saved_contiguous, Needs, Operand};
use crate::view::permute;

/// Where the statistics of a batch norm come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stats {
    Batch,
    Running,
}

struct LayerNorm {
    /// Input (contiguous, detached) and weight, with the per-row mean and rstd of the forward.
    x: Tensor,
    w: Option<Tensor>,
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
    needs: Needs,
}

impl Op for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        self.gradients(g, None)
    }
    /// On CUDA a gradient already pending for x (a residual's, where x is a residual stream) is added as the
    /// kernel stores dx: one pass fewer than the tape's accumulation, the same sum.
    fn takes_pending(&self) -> bool {
        matches!(self.x.device(), Device::Cuda(_)) && self.needs.x
    }
    fn backward_onto(&self, g: &Tensor, mut pending: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
        let x = &self.x;
        let fits = |p: &Tensor| {
            p.is_contiguous() && p.shape() == x.shape() && p.dtype() == x.dtype() && p.device() == x.device()
        };
        let pend = match pending.first_mut() {
            Some(slot) if slot.as_ref().is_some_and(fits) => slot.take(),
            _ => None,
        };
        engine::sum_pending(self.gradients(g, pend.as_ref())?, pending)
    }
}

impl LayerNorm {
    /// The gradients of (x, weight, bias); with `pend` (CUDA), dx is pend + the norm's own.
    fn gradients(&self, g: &Tensor, pend: Option<&Tensor>) -> Result<Vec<Option<Tensor>>> {
        if pend.is_some() && self.x.device() == Device::Cpu {
            return Err(Error::invalid(
                "layer_norm_backward",
                "internal: a pending gradient on the CPU",
                self.x.shape(),
            ));
        }
        let g = g.contiguous()?;
        let pend_storage = pend.map(|p| p.storage());
        let w_storage = self.w.as_ref().map(|w| w.storage());
        let grads = match (&*self.x.storage(), &*self.mean.storage(), &*self.rstd.storage(), &*g.storage()) {
            (Storage::Cpu(x), Storage::Cpu(mean), Storage::Cpu(rstd), Storage::Cpu(gs)) => {
                let w = cpu_operand(self.w.as_ref(), w_storage.as_deref(), "layer_norm_backward")?;
                cpu::layer_norm_backward(
                    (x, self.x.layout()),
                    w,
                    (mean, self.mean.layout()),
                    (rstd, self.rstd.layout()),
                    (gs, g.layout()),
                    self.needs,
                )?
            }
            (Storage::Cuda(x), Storage::Cuda(mean), Storage::Cuda(rstd), Storage::Cuda(gs)) => {
                let w = cuda_operand(self.w.as_ref(), w_storage.as_deref(), "layer_norm_backward")?;
                let p = cuda_operand(pend, pend_storage.as_deref(), "layer_norm_backward")?;
                cuda::layer_norm_backward(
                    (x, self.x.layout()),
                    w,
                    (mean, self.mean.layout()),
                    (rstd, self.rstd.layout()),
                    (gs, g.layout()),
                    p,
                    self.needs,
                )?
            }
            (s, ..) => return Err(no_cuda("layer_norm_backward", s)),
        };
        let d = &self.x.shape()[self.x.rank() - 1..];
        grads.into_tensors(self.x.shape(), self.w.as_ref().map(|_| d), self.has_bias.then_some(d))
    }
}

/// The storage and layout of an optional operand on the CPU (its device was checked against x's).
fn cpu_operand<'a>(t: Option<&'a Tensor>, s: Option<&'a Storage>, op: &'static str) -> Result<Option<Operand<'a>>> {
    t.zip(s).map(|(t, s)| Ok((s.as_cpu(op)?, t.layout()))).transpose()
}

/// The same on CUDA.
fn cuda_operand<'a>(
    t: Option<&'a Tensor>,
    s: Option<&'a Storage>,
    op: &'static str,
) -> Result<Option<(&'a CudaStorage, &'a Layout)>> {
    t.zip(s).map(|(t, s)| Ok((s.as_cuda(op)?, t.layout()))).transpose()
}

/// Layer normalisation over the last dim of x (any leading shape), with optional elementwise weight and bias
/// of that dim's size, as `F.layer_norm(x, (D,), weight, bias, eps)`.
pub fn layer_norm(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let d = match x.shape().last() {
        Some(&d) if d > 0 => d,
        _ => return Err(Error::invalid(OP, "needs at least one dim, with a non-empty last dim", x.shape())),
    };
    check_vector(OP, "weight", weight, x, d)?;
    check_vector(OP, "bias", bias, x, d)?;
    let xc = saved_contiguous(x)?;
    let (ws, bs) = (weight.map(|w| w.storage()), bias.map(|b| b.storage()));
    let (y, mean, rstd) = match &*xc.storage() {
        Storage::Cpu(s) => cpu::layer_norm(
            (s, xc.layout()),
            cpu_operand(weight, ws.as_deref(), OP)?,
            cpu_operand(bias, bs.as_deref(), OP)?,
            eps,
        )?,
        Storage::Cuda(s) => cuda::layer_norm(
            (s, xc.layout()),
            cuda_operand(weight, ws.as_deref(), OP)?,
            cuda_operand(bias, bs.as_deref(), OP)?,
            eps,
        )?,
    };
    let rows = [x.numel() / d];
    let (mean, rstd) = (Tensor::from_storage(mean, &rows)?, Tensor::from_storage(rstd, &rows)?);
    let mut inputs = vec![x];
    inputs.extend(weight);
    inputs.extend(bias);
    let needs = Needs::of(x, weight, bias);
    Ok(Tensor::from_op(y, x.shape(), &inputs, || LayerNorm {
        x: xc.clone(),
        w: weight.map(Tensor::detach),
        mean,
        rstd,
        has_bias: bias.is_some(),
        needs,
    }))
}

struct BatchNorm2d {
    x: Tensor,
    w: Option<Tensor>,
    /// Per-channel mean and rstd used by the forward (the batch's or the running ones).
    mean: Tensor,
    rstd: Tensor,
    stats: Stats,
    has_bias: bool,
    /// x was channels-last on the CPU and was kept so: g is read, and dx written, channels-last.
    channels_last: bool,
    needs: Needs,
}

impl Op for BatchNorm2d {
    fn name(&self) -> &'static str {
        "batch_norm2d"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let &[n, c, h, w] = self.x.shape() else {
            return Err(Error::invalid("batch_norm2d_backward", "expected x (N, C, H, W)", self.x.shape()));
        };
        if self.channels_last {
            return self.backward_channels_last(g, (n, c, h, w));
        }
        let g = g.contiguous()?;
        let w_storage = self.w.as_ref().map(|w| w.storage());
        let grads = match (&*self.x.storage(), &*self.mean.storage(), &*self.rstd.storage(), &*g.storage()) {
            (Storage::Cpu(x), Storage::Cpu(mean), Storage::Cpu(rstd), Storage::Cpu(gs)) => {
                let w = cpu_operand(self.w.as_ref(), w_storage.as_deref(), "batch_norm2d_backward")?;
                cpu::batch_norm_backward(
                    (x, self.x.layout()),
                    w,
                    (mean, self.mean.layout()),
                    (rstd, self.rstd.layout()),
                    (gs, g.layout()),
                    self.stats,
                    self.needs,
                )?
            }
            (Storage::Cuda(x), Storage::Cuda(mean), Storage::Cuda(rstd), Storage::Cuda(gs)) => {
                let w = cuda_operand(self.w.as_ref(), w_storage.as_deref(), "batch_norm2d_backward")?;
                cuda::batch_norm_backward(
                    (x, self.x.layout()),
                    w,
                    (mean, self.mean.layout()),
                    (rstd, self.rstd.layout()),
                    (gs, g.layout()),
                    self.stats,
                    self.needs,
                )?
            }
            (s, ..) => return Err(no_cuda("batch_norm2d_backward", s)),
        };
        let c = &self.x.shape()[1..2];
        grads.into_tensors(self.x.shape(), self.w.as_ref().map(|_| c), self.has_bias.then_some(c))
    }
}

impl BatchNorm2d {
    /// The backward of a channels-last forward (CPU): g made channels-last if it is not, dx channels-last.
    fn backward_channels_last(
        &self,
        g: &Tensor,
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "batch_norm2d_backward";
        let layout = channels_last_layout(n, c, h, w);
        let g = if is_channels_last(g.layout()) {
            g.clone()
        } else {
            permute(g, &[0, 2, 3, 1])?.contiguous()?.with_layout(layout.clone())
        };
        let w_storage = self.w.as_ref().map(|w| w.storage());
        let grads = match (&*self.x.storage(), &*self.mean.storage(), &*self.rstd.storage(), &*g.storage()) {
            (Storage::Cpu(x), Storage::Cpu(mean), Storage::Cpu(rstd), Storage::Cpu(gs)) => {
                cpu::batch_norm_nhwc_backward(
                    (x, self.x.layout()),
                    cpu_operand(self.w.as_ref(), w_storage.as_deref(), OP)?,
                    (mean, self.mean.layout()),
                    (rstd, self.rstd.layout()),
                    (gs, g.layout()),
                    self.stats,
                    self.needs,
                )?
            }
            (s, ..) => return Err(no_cuda(OP, s)),
        };
        let dx =
            grads.x.map(|s| Ok::<_, Error>(Tensor::from_storage(s, &[n, h, w, c])?.with_layout(layout))).transpose()?;
        let vec_of = |s: Option<Storage>| s.map(|s| Tensor::from_storage(s, &[c])).transpose();
        let mut out = vec![dx];
        if self.w.is_some() {
            out.push(vec_of(grads.w)?);
        }
        if self.has_bias {
            out.push(vec_of(grads.bias)?);
        }
        Ok(out)
    }
}

/// Batch normalisation of x (N, C, H, W) per channel, as `F.batch_norm(x, running_mean, running_var, weight,
/// bias, training, momentum, eps)`. Training uses the batch statistics and, when the running buffers (C) are
/// given, updates them in place (unbiased variance, see the module notes); eval needs them and uses them.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm2d(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    running_mean: Option<&Tensor>,
    running_var: Option<&Tensor>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> Result<Tensor> {
    const OP: &str = "batch_norm2d";
    let &[n, c, h, w] = x.shape() else {
        return Err(Error::invalid(OP, "expected x (N, C, H, W)", x.shape()));
    };
    for (what, v) in [("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)]
    {
        check_vector(OP, what, v, x, c)?;
    }
    let running = match (running_mean, running_var) {
        (Some(m), Some(v)) => Some((m, v)),
        (None, None) => None,
        _ => return Err(Error::invalid(OP, "give both running_mean and running_var, or neither", x.shape())),
    };
    let stats = if training { Stats::Batch } else { Stats::Running };
    if training && n * h * w <= 1 {
        return Err(Error::invalid(OP, "training needs more than one value per channel", x.shape()));
    }
    if !training && running.is_none() {
        return Err(Error::invalid(OP, "eval mode needs running_mean and running_var", x.shape()));
    }
    if training && !(0.0..=1.0).contains(&momentum) {
        return Err(Error::invalid(OP, format!("momentum {momentum} is not in [0, 1]"), x.shape()));
    }
    // On the CPU a channels-last x (see `util::is_channels_last`) is normalised in place, y channels-last too.
    let channels_last = x.device() == Device::Cpu && !x.is_contiguous() && is_channels_last(x.layout());
    let xc = if channels_last { x.detach() } else { saved_contiguous(x)? };
    let out = {
        let (ws, bs) = (weight.map(|w| w.storage()), bias.map(|b| b.storage()));
        // Fixed statistics in eval; None asks the kernel for the batch's.
        let fixed = running.filter(|_| stats == Stats::Running);
        let (rm, rv) = (fixed.map(|(m, _)| m.storage()), fixed.map(|(_, v)| v.storage()));
        match &*xc.storage() {
            Storage::Cpu(s) if channels_last => cpu::batch_norm_nhwc(
                (s, xc.layout()),
                cpu_operand(weight, ws.as_deref(), OP)?,
                cpu_operand(bias, bs.as_deref(), OP)?,
                cpu_operand(running_mean, rm.as_deref(), OP)?.zip(cpu_operand(running_var, rv.as_deref(), OP)?),
                eps,
            )?,
            Storage::Cpu(s) => cpu::batch_norm(
                (s, xc.layout()),
                cpu_operand(weight, ws.as_deref(), OP)?,
                cpu_operand(bias, bs.as_deref(), OP)?,
                cpu_operand(running_mean, rm.as_deref(), OP)?.zip(cpu_operand(running_var, rv.as_deref(), OP)?),
                eps,
            )?,
            Storage::Cuda(s) => cuda::batch_norm(
                (s, xc.layout()),
                cuda_operand(weight, ws.as_deref(), OP)?,
                cuda_operand(bias, bs.as_deref(), OP)?,
                cuda_operand(running_mean, rm.as_deref(), OP)?.zip(cuda_operand(running_var, rv.as_deref(), OP)?),
                eps,
            )?,
        }
    };
    // Every read guard is released: the buffers may now be written, even if they share storage with an input.
    if let (Stats::Batch, Some((rm, rv))) = (stats, running) {
        let m = n * h * w;
        let unbias = m as f64 / (m - 1) as f64;
        update_running(OP, rm, &out.mean, momentum, 1.0)?;
        update_running(OP, rv, &out.var, momentum, unbias)?;
    }
    let (mean, rstd) = (Tensor::from_storage(out.mean, &[c])?, Tensor::from_storage(out.rstd, &[c])?);
    let mut inputs = vec![x];
    inputs.extend(weight);
    inputs.extend(bias);
    let needs = Needs::of(x, weight, bias);
    let layout = if channels_last { channels_last_layout(n, c, h, w) } else { Layout::contiguous(x.shape()) };
    Ok(Tensor::from_op_with_layout(out.y, layout, &inputs, || BatchNorm2d {
        x: xc.clone(),
        w: weight.map(Tensor::detach),
        mean,
        rstd,
        stats,
        has_bias: bias.is_some(),
        channels_last,
        needs,
    }))
}

/// running = (1 - momentum) running + momentum scale stat, written in place into the buffer's storage (seen by
/// every view of it). Not recorded: buffers are state, not part of the graph.
fn update_running(op: &'static str, running: &Tensor, stat: &Storage, momentum: f64, scale: f64) -> Result<()> {
    let layout = running.layout().clone();
    let mut guard = running.storage_mut();
    match (&mut *guard, stat) {
        (Storage::Cpu(r), Storage::Cpu(s)) => cpu::blend_into(op, r, &layout, s, momentum, scale),
        (Storage::Cuda(r), Storage::Cuda(s)) => cuda::blend_into(op, r, &layout, s, momentum, scale),
        (s, _) => Err(no_cuda(op, s)),
    }
}

#[cfg(test)]
mod tests;
