//! In-place optimizer updates, one fused kernel per rule (not differentiable, run under `no_grad`). The
//! rules are PyTorch's (`torch.optim.SGD`, `torch.optim.AdamW`), element by element:
//!
//! SGD, with g = grad + weight_decay * p:
//!     buf = g on the first step, else momentum * buf + (1 - dampening) * g     (when momentum != 0)
//!     d   = g + momentum * buf if nesterov else buf                           (g when momentum == 0)
//!     p  -= lr * d
//!
//! AdamW at step t (from 1), with decoupled weight decay:
//!     p  *= 1 - lr * weight_decay
//!     m   = beta1 * m + (1 - beta1) * g
//!     v   = beta2 * v + (1 - beta2) * g^2
//!     vhat = max(vmax, v) (stored back in vmax) if amsgrad else v
//!     p  -= lr / (1 - beta1^t) * m / (sqrt(vhat) / sqrt(1 - beta2^t) + eps)
//!
//! Parameters, gradients and state are contiguous tensors of one shape, dtype and device. Each may be a view
//! into a larger buffer (a concat's input gradients are): only its own elements are read and written.
//!
//! [`sgd_step_multi`] and [`adamw_step_multi`] update many parameters at once, each with its own
//! hyperparameters: on the CPU one per-tensor call after another; on CUDA one kernel launch per (device,
//! dtype) for up to about a hundred tensors (a table of them passed as the kernel's parameter, see optim.cu),
//! with the per-element code of the one-tensor kernels, so the results are the same bits either way.

mod cpu;
pub(crate) mod cuda;

use engine::{DType, Device, Error, Result, Storage, Tensor};

use crate::util::same_dtype_device;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// The momentum buffer is initialised from g (PyTorch's first step) rather than updated.
    pub first: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    /// 1-based step count, for the bias corrections.
    pub step: u64,
}

fn check(op: &'static str, p: &Tensor, others: &[&Tensor]) -> Result<()> {
    if !p.is_contiguous() {
        return Err(Error::invalid(op, "parameters must be contiguous", p.shape()));
    }
    for t in others {
        same_dtype_device(op, p, t)?;
        if t.shape() != p.shape() {
            return Err(Error::ShapeMismatch { op, lhs: p.shape().to_vec(), rhs: t.shape().to_vec() });
        }
        if !t.is_contiguous() {
            return Err(Error::invalid(op, "gradients and state must be contiguous", t.shape()));
        }
    }
    Ok(())
}

/// For the arms of a dispatch that mix devices, which `check` has already refused.
fn mixed(op: &'static str, p: &Tensor, s: &Storage) -> Error {
    Error::DeviceMismatch { op, lhs: p.device(), rhs: s.device() }
}

/// One SGD step on `p` in place; `buf` is the momentum buffer (ignored when momentum is 0).
pub fn sgd_step(p: &Tensor, grad: &Tensor, buf: &Tensor, h: SgdStep) -> Result<()> {
    check("sgd_step", p, &[grad, buf])?;
    let g = grad.storage();
    let mut ps = p.storage_mut();
    let mut bs = buf.storage_mut();
    match (&mut *ps, &*g, &mut *bs) {
        (Storage::Cpu(ps), Storage::Cpu(gs), Storage::Cpu(bs)) => {
            cpu::sgd((ps, p.layout()), (gs, grad.layout()), (bs, buf.layout()), h)
        }
        (Storage::Cuda(ps), Storage::Cuda(gs), Storage::Cuda(bs)) => {
            cuda::sgd((ps, p.layout()), (gs, grad.layout()), (bs, buf.layout()), h)
        }
        (_, gs, _) => Err(mixed("sgd_step", p, gs)),
    }
}

/// One AdamW step on `p` in place; `vmax` (the running max of v) is required with amsgrad, unused without.
pub fn adamw_step(
    p: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    vmax: Option<&Tensor>,
    h: AdamWStep,
) -> Result<()> {
    // Without amsgrad the kernel never touches vmax: pass v in its place to keep one code path.
    let vmax = adamw_vmax(p, grad, m, v, vmax, h)?.unwrap_or(v);
    let g = grad.storage();
    let mut ps = p.storage_mut();
    let mut ms = m.storage_mut();
    if vmax.same_storage(v) {
        let mut vs = v.storage_mut();
        return match (&mut *ps, &*g, &mut *ms, &mut *vs) {
            (Storage::Cpu(ps), Storage::Cpu(gs), Storage::Cpu(ms), Storage::Cpu(vs)) => {
                cpu::adamw((ps, p.layout()), (gs, grad.layout()), (ms, m.layout()), (vs, v.layout()), None, h)
            }
            (Storage::Cuda(ps), Storage::Cuda(gs), Storage::Cuda(ms), Storage::Cuda(vs)) => {
                cuda::adamw((ps, p.layout()), (gs, grad.layout()), (ms, m.layout()), (vs, v.layout()), None, h)
            }
            (_, gs, ..) => Err(mixed("adamw_step", p, gs)),
        };
    }
    let mut vs = v.storage_mut();
    let mut xs = vmax.storage_mut();
    match (&mut *ps, &*g, &mut *ms, &mut *vs, &mut *xs) {
        (Storage::Cpu(ps), Storage::Cpu(gs), Storage::Cpu(ms), Storage::Cpu(vs), Storage::Cpu(xs)) => cpu::adamw(
            (ps, p.layout()),
            (gs, grad.layout()),
            (ms, m.layout()),
            (vs, v.layout()),
            Some((xs, vmax.layout())),
            h,
        ),
        (Storage::Cuda(ps), Storage::Cuda(gs), Storage::Cuda(ms), Storage::Cuda(vs), Storage::Cuda(xs)) => cuda::adamw(
            (ps, p.layout()),
            (gs, grad.layout()),
            (ms, m.layout()),
            (vs, v.layout()),
            Some((xs, vmax.layout())),
            h,
        ),
        (_, gs, ..) => Err(mixed("adamw_step", p, gs)),
    }
}

/// Checks the operands of one AdamW step; returns the vmax buffer the step updates (with amsgrad only).
fn adamw_vmax<'a>(
    p: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    vmax: Option<&'a Tensor>,
    h: AdamWStep,
) -> Result<Option<&'a Tensor>> {
    check("adamw_step", p, &[grad, m, v])?;
    if h.step == 0 {
        return Err(Error::invalid("adamw_step", "steps count from 1", p.shape()));
    }
    match (h.amsgrad, vmax) {
        (true, Some(x)) => {
            check("adamw_step", p, &[x])?;
            Ok(Some(x))
        }
        (true, None) => Err(Error::invalid("adamw_step", "amsgrad needs a vmax buffer", p.shape())),
        (false, _) => Ok(None),
    }
}

/// One parameter of [`sgd_step_multi`]: the operands and hyperparameters of one [`sgd_step`].
#[derive(Debug, Clone, Copy)]
pub struct SgdTensors<'a> {
    pub p: &'a Tensor,
    pub grad: &'a Tensor,
    pub buf: &'a Tensor,
    pub h: SgdStep,
}

/// One parameter of [`adamw_step_multi`]: the operands and hyperparameters of one [`adamw_step`].
#[derive(Debug, Clone, Copy)]
pub struct AdamWTensors<'a> {
    pub p: &'a Tensor,
    pub grad: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    /// Required with amsgrad, unused without.
    pub vmax: Option<&'a Tensor>,
    pub h: AdamWStep,
}

/// The CUDA items of `items` grouped by their key (device, dtype, kind), in first-seen order; the CPU ones, and
/// those whose key is `None`, are handed to `single` one by one, in order.
fn cuda_groups<I: Copy, K: PartialEq>(
    items: &[I],
    key: impl Fn(&I) -> Option<(Device, DType, K)>,
    mut single: impl FnMut(&I) -> Result<()>,
) -> Result<Vec<Vec<I>>> {
    let mut groups: Vec<((Device, DType, K), Vec<I>)> = Vec::new();
    for it in items {
        let Some(k) = key(it).filter(|k| k.0 != Device::Cpu) else {
            single(it)?;
            continue;
        };
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, g)) => g.push(*it),
            None => groups.push((k, vec![*it])),
        }
    }
    Ok(groups.into_iter().map(|(_, g)| g).collect())
}

/// [`sgd_step`] on every item, with the same results; on CUDA one launch per (device, dtype) and up to 116
/// tensors. Every item is checked before anything is updated. Items whose tensors overlap in memory where one
/// of them is written (the same parameter twice, say) are updated one after another, as the loop would.
pub fn sgd_step_multi(items: &[SgdTensors]) -> Result<()> {
    for it in items {
        check("sgd_step", it.p, &[it.grad, it.buf])?;
    }
    let groups =
        cuda_groups(items, |it| Some((it.p.device(), it.p.dtype(), ())), |it| sgd_step(it.p, it.grad, it.buf, it.h))?;
    for group in groups {
        if !cuda::sgd_multi(&group)? {
            for it in &group {
                sgd_step(it.p, it.grad, it.buf, it.h)?;
            }
        }
    }
    Ok(())
}

/// [`adamw_step`] on every item, with the same results; on CUDA one launch per (device, dtype, amsgrad) and
/// up to 92 tensors (76 with amsgrad). Checks and overlapping items as [`sgd_step_multi`].
pub fn adamw_step_multi(items: &[AdamWTensors]) -> Result<()> {
    let mut checked = Vec::with_capacity(items.len());
    for it in items {
        let vmax = adamw_vmax(it.p, it.grad, it.m, it.v, it.vmax, it.h)?;
        checked.push(AdamWTensors { vmax, ..*it });
    }
    let one = |it: &AdamWTensors| adamw_step(it.p, it.grad, it.m, it.v, it.vmax, it.h);
    let groups = cuda_groups(&checked, |it| Some((it.p.device(), it.p.dtype(), it.vmax.is_some())), one)?;
    for group in groups {
        if !cuda::adamw_multi(&group)? {
            group.iter().try_for_each(one)?;
        }
    }
    Ok(())
}

/// Doubles per item in the hyperparameter buffer of [`adamw_step_multi_hyper`].
pub const ADAMW_HYPER_LEN: usize = 8;

/// The per-step hyperparameters of one AdamW update as [`adamw_step_multi_hyper`] reads them from device
/// memory: lr / (1 - beta1^t), 1 - lr * weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t),
/// eps, computed on the host in f64 exactly as [`adamw_step_multi`] computes the kernel arguments.
pub fn adamw_hyper(h: AdamWStep) -> [f64; ADAMW_HYPER_LEN] {
    cuda::adamw_hyper(h)
}

/// [`adamw_step_multi`] on CUDA, with every item's per-step hyperparameters read from device memory when the
/// kernel runs instead of passed as kernel arguments: item i takes elements `[8 i, 8 i + 8)` of `hyper` (a
/// contiguous f64 tensor of `ADAMW_HYPER_LEN * items.len()` elements on the items' device), which must hold
/// [`adamw_hyper`] of the step it is to apply. For an update captured into a CUDA graph: writing the next
/// step's values into `hyper` before each replay applies the schedule's learning rate and the step count's
/// bias corrections. Given the same values, the same bits as [`adamw_step_multi`]. The items' `h` are
/// checked as there (step >= 1, a vmax with amsgrad) and choose the kernel (amsgrad), nothing else. All
/// items on one CUDA device, one dtype, all with amsgrad or none; overlapping written operands are an error.
pub fn adamw_step_multi_hyper(items: &[AdamWTensors], hyper: &Tensor) -> Result<()> {
    const OP: &str = "adamw_step_hyper";
    let Some(first) = items.first() else { return Ok(()) };
    let mut checked = Vec::with_capacity(items.len());
    for it in items {
        let vmax = adamw_vmax(it.p, it.grad, it.m, it.v, it.vmax, it.h)?;
        if it.p.device() != first.p.device() || it.p.dtype() != first.p.dtype() {
            return Err(Error::invalid(OP, "every parameter must share one device and dtype", it.p.shape()));
        }
        if vmax.is_some() != first.h.amsgrad {
            return Err(Error::invalid(OP, "every parameter must use amsgrad, or none", it.p.shape()));
        }
        let shares = [Some(it.p), Some(it.grad), Some(it.m), Some(it.v), vmax].into_iter().flatten();
        if shares.into_iter().any(|t| t.same_storage(hyper)) {
            return Err(Error::invalid(OP, "the hyperparameters share storage with an operand", hyper.shape()));
        }
        checked.push(AdamWTensors { vmax, ..*it });
    }
    if !first.p.device().is_cuda() {
        return Err(Error::invalid(OP, "device hyperparameters are for CUDA parameters", first.p.shape()));
    }
    if hyper.dtype() != DType::F64 || hyper.device() != first.p.device() || !hyper.is_contiguous() {
        return Err(Error::invalid(
            OP,
            format!("the hyperparameters must be a contiguous f64 tensor on {}", first.p.device()),
            hyper.shape(),
        ));
    }
    if hyper.numel() != ADAMW_HYPER_LEN * items.len() {
        return Err(Error::invalid(
            OP,
            format!("{} hyperparameters for {} parameters ({ADAMW_HYPER_LEN} each)", hyper.numel(), items.len()),
            hyper.shape(),
        ));
    }
    if !cuda::adamw_multi_hyper(&checked, hyper)? {
        return Err(Error::invalid(OP, "written operands overlap in memory", first.p.shape()));
    }
    Ok(())
}

/// Multiplies every tensor in place by `factor` (gradient clipping).
pub fn scale_(t: &Tensor, factor: f64) -> Result<()> {
    check("scale_", t, &[])?;
    let mut s = t.storage_mut();
    match &mut *s {
        Storage::Cpu(c) => cpu::scale((c, t.layout()), factor),
        Storage::Cuda(c) => cuda::scale(c, t.layout(), factor),
    }
}

/// Sum of squares of every element, accumulated in f64 (for the global gradient norm).
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    let y = crate::reduce::sum_all(&crate::elementwise::mul(t, t)?)?;
    y.to_scalar()
}

/// [`scale_`] on every tensor, with the same results; on CUDA one launch per (device, dtype) and up to 236
/// tensors. Checks and overlapping tensors as [`sgd_step_multi`].
pub fn scale_multi(xs: &[&Tensor], factor: f64) -> Result<()> {
    for x in xs {
        check("scale_", x, &[])?;
    }
    let groups = cuda_groups(xs, |x| Some((x.device(), x.dtype(), ())), |x| scale_(x, factor))?;
    for group in groups {
        if !cuda::scale_multi(&group, factor)? {
            group.iter().try_for_each(|x| scale_(x, factor))?;
        }
    }
    Ok(())
}

/// The sum of [`sum_squares`] over `xs`. On the CPU, the same bits as adding them up in order; on CUDA, one
/// launch per (device, dtype) and up to 236 contiguous tensors, a fixed-order sum of the per-block partials
/// in f64 (the same run to run, not the bits of the one-tensor sums) and one read of the device.
pub fn sum_squares_multi(xs: &[&Tensor]) -> Result<f64> {
    let mut total = 0.0;
    let one = |x: &&Tensor| -> Result<()> {
        total += sum_squares(x)?;
        Ok(())
    };
    let groups = cuda_groups(xs, |x| x.is_contiguous().then(|| (x.device(), x.dtype(), ())), one)?;
    for group in groups {
        total += cuda::sum_squares_multi(&group)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests;
