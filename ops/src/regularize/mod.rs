//! Stochastic regularisers: `dropout` (per element) and `drop_path` (stochastic depth, per sample, as timm's
//! `DropPath`). Both are the identity in eval or with p = 0, and draw nothing from the generator then.
//!
//! With keep = 1 - p and a Bernoulli(keep) draw m per element (dropout) or per index of dim 0 (drop_path,
//! broadcast over the other dims):
//!
//! | | formula |
//! | --- | --- |
//! | forward | y = x m / keep (all zeros when p = 1) |
//! | dL/dx | g m / keep: the same mask |
//!
//! Draws come from the caller's [`Generator`] in row-major order, one uniform u per element or sample, kept
//! when u < keep; so a run is reproduced by its seed. The mask is drawn on the host on every device and
//! uploaded with the tensor (one value per sample for drop_path, per element for dropout): a CUDA run drops
//! exactly the elements a CPU run of the same seed drops.
//!
//! In a CUDA graph: a captured step cannot draw on the host, and an upload made during a capture is replayed
//! with the capture's values (engine's `cuda/graph.rs`). [`with_fed_masks`] runs a capture so that every mask
//! is instead a device buffer of its own that nothing in the graph writes, handed back as a [`FedMask`]; before
//! each replay the caller draws each mask's values from the generator, in the order of the forward, and writes
//! them there ([`FedMask::draw`]). The draws are those an eager step would make at that point of the run, so a
//! replayed step drops exactly the samples the eager step drops (nn's `GraphedStep` relies on it).

mod cpu;
pub(crate) mod cuda;

use std::cell::RefCell;

use engine::cuda::CudaStorage;
use engine::{Device, Error, Generator, Op, Result, Storage, Tensor};

use crate::util::{no_cuda, same_dtype_device, saved_contiguous};
use crate::TensorOps;

struct Masked {
    name: &'static str,
    /// One scale (0 or 1 / keep) per block of `x.numel() / mask.numel()` consecutive elements.
    mask: Tensor,
}

impl Op for Masked {
    fn name(&self) -> &'static str {
        self.name
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(Tensor::from_storage(scaled(self.name, None, g, &self.mask)?, g.shape())?)])
    }
}

/// t scaled block by block by `mask`, plus x where given (`x + scaled(t)`, the product rounded before the
/// add), as new contiguous storage. x, if any, has t's shape (checked by the caller).
fn scaled(op: &'static str, x: Option<&Tensor>, t: &Tensor, mask: &Tensor) -> Result<Storage> {
    // The CPU kernel walks contiguous slices; the CUDA kernels read any view, so the copies are for the CPU only.
    let dense = |v: &Tensor| if v.device() == Device::Cpu { saved_contiguous(v) } else { Ok(v.clone()) };
    let (xc, tc) = (x.map(dense).transpose()?, dense(t)?);
    let xs = xc.as_ref().map(|v| v.storage());
    let xo = xs.as_deref().zip(xc.as_ref().map(|v| v.layout()));
    let (lt, lm) = (tc.layout(), mask.layout());
    let storage = match (xo, &*tc.storage(), &*mask.storage()) {
        (None, Storage::Cpu(ts), Storage::Cpu(m)) => cpu::add_scaled_blocks(op, None, (ts, lt), (m, lm))?,
        (Some((Storage::Cpu(xs), lx)), Storage::Cpu(ts), Storage::Cpu(m)) => {
            cpu::add_scaled_blocks(op, Some((xs, lx)), (ts, lt), (m, lm))?
        }
        (None, Storage::Cuda(ts), Storage::Cuda(m)) => Storage::Cuda(cuda::scale_blocks(op, ts, lt, m, lm)?),
        (Some((Storage::Cuda(xs), lx)), Storage::Cuda(ts), Storage::Cuda(m)) => {
            Storage::Cuda(cuda::add_scaled_blocks(op, (xs, lx), (ts, lt), (m, lm))?)
        }
        (_, s, _) => return Err(no_cuda(op, s)),
    };
    Ok(storage)
}

/// Draws the mask (one entry per block) and applies it; the identity when not training or p = 0.
fn masked(op: &'static str, x: &Tensor, p: f64, training: bool, blocks: usize, g: &mut Generator) -> Result<Tensor> {
    let Some(mask) = draw(op, x, p, training, blocks, g)? else {
        return Ok(x.clone());
    };
    let storage = scaled(op, None, x, &mask)?;
    Ok(Tensor::from_op(storage, x.shape(), &[x], || Masked { name: op, mask }))
}

/// The mask of one regulariser call on x's device (one scale per block), or None when it is the identity (not
/// training, or p = 0), which draws nothing. Inside [`with_fed_masks`] it is also recorded for the replays.
fn draw(
    op: &'static str,
    x: &Tensor,
    p: f64,
    training: bool,
    blocks: usize,
    g: &mut Generator,
) -> Result<Option<Tensor>> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::invalid(op, format!("probability {p} is not in [0, 1]"), x.shape()));
    }
    if !training || p == 0.0 {
        return Ok(None);
    }
    let keep = 1.0 - p;
    let values = draw_mask(blocks, keep, g);
    // Inside a capture with fed masks: a buffer that no captured work writes, filled before each replay.
    // Untouched: a block freed earlier in the capture would be rewritten by the replay of its old owner's
    // kernels, after the host had filled it.
    let fed_device = match x.device() {
        Device::Cuda(ordinal) if FED.with(|f| f.borrow().is_some()) => {
            Some(engine::cuda::device(ordinal)?).filter(|dev| dev.is_capturing())
        }
        _ => None,
    };
    let mask = match fed_device {
        Some(dev) => {
            let storage = CudaStorage::alloc_untouched(&dev, blocks, x.dtype())?;
            Tensor::from_storage(Storage::Cuda(storage), &[blocks])?
        }
        None => Tensor::from_f64(&values, &[blocks], x.dtype(), x.device())?,
    };
    FED.with(|f| {
        if let Some(fed) = f.borrow_mut().as_mut() {
            fed.push(FedMask { mask: mask.clone(), keep });
        }
    });
    Ok(Some(mask))
}

/// One scale per block: 1 / keep where a uniform draw falls below `keep`, else 0 (keep = 0, p = 1, drops
/// everything: there is nothing to rescale).
fn draw_mask(blocks: usize, keep: f64, g: &mut Generator) -> Vec<f64> {
    let scale = if keep > 0.0 { 1.0 / keep } else { 0.0 };
    (0..blocks).map(|_| if g.uniform() < keep { scale } else { 0.0 }).collect()
}

thread_local! {
    /// The masks drawn so far inside [`with_fed_masks`] on this thread, or None outside it.
    static FED: RefCell<Option<Vec<FedMask>>> = const { RefCell::new(None) };
}

/// A dropout or drop-path mask of a captured CUDA graph, whose values are written from the host before each
/// replay (see the module docs).
pub struct FedMask {
    mask: Tensor,
    keep: f64,
}

impl FedMask {
    /// Draws this mask's values from `g` (as the eager op would at this point of the run) and writes them
    /// into the graph's buffer (enqueued on the device's stream, no wait).
    pub fn draw(&self, g: &mut Generator) -> Result<()> {
        self.mask.write_f64(&draw_mask(self.mask.numel(), self.keep, g))
    }

    /// The number of draws (samples for drop_path, elements for dropout).
    pub fn len(&self) -> usize {
        self.mask.numel()
    }

    pub fn is_empty(&self) -> bool {
        self.mask.numel() == 0
    }
}

/// Runs `f` (a CUDA graph capture) with fed masks: each dropout or drop-path mask that `f` applies in
/// training while a capture runs on its device is made as a device buffer that no captured work writes, and
/// returned, in the order drawn, with what `f` returned. `f` still draws from the generator as usual; the
/// caller resets the generator afterwards (a capture runs no step) and calls [`FedMask::draw`] on every mask,
/// in order, before each replay. Masks made outside a capture (a CPU tensor, an eager step) get their values
/// at once, as always, and are returned too. Not reentrant: a nested call is refused.
pub fn with_fed_masks<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, Vec<FedMask>)> {
    if FED.with(|fed| fed.borrow().is_some()) {
        return Err(Error::Msg { context: "with_fed_masks", msg: "already feeding masks on this thread".into() });
    }
    FED.with(|fed| *fed.borrow_mut() = Some(Vec::new()));
    let out = f();
    let masks = FED.with(|fed| fed.borrow_mut().take()).unwrap_or_default();
    Ok((out?, masks))
}

/// Zeroes each element with probability p and scales the others by 1 / (1 - p) in training; the identity in
/// eval. The mask comes from `g`, one draw per element in row-major order.
pub fn dropout(x: &Tensor, p: f64, training: bool, g: &mut Generator) -> Result<Tensor> {
    masked("dropout", x, p, training, x.numel(), g)
}

/// Stochastic depth: zeroes each sample (index of dim 0) with probability p and scales the others by
/// 1 / (1 - p) in training, as timm's `drop_path`; the identity in eval. One draw per sample from `g`.
pub fn drop_path(x: &Tensor, p: f64, training: bool, g: &mut Generator) -> Result<Tensor> {
    let Some(&n) = x.shape().first() else {
        return Err(Error::invalid("drop_path", "needs a sample dim (dim 0)", x.shape()));
    };
    masked("drop_path", x, p, training, n, g)
}

/// The residual `x + drop_path(t)` in one pass: y = x + t m / keep with one draw per sample (index of dim 0)
/// from `g`, exactly as `x.add(&drop_path(t, ..))` (the same draws and bits: the scaled term is rounded
/// before the add, no fused multiply-add), without writing the dropped branch out and reading it back. x and t
/// have one shape; in eval or with p = 0 it is `x.add(t)`.
pub fn add_drop_path(x: &Tensor, t: &Tensor, p: f64, training: bool, g: &mut Generator) -> Result<Tensor> {
    const OP: &str = "add_drop_path";
    same_dtype_device(OP, x, t)?;
    if x.shape() != t.shape() {
        return Err(Error::ShapeMismatch { op: OP, lhs: x.shape().to_vec(), rhs: t.shape().to_vec() });
    }
    let Some(&n) = t.shape().first() else {
        return Err(Error::invalid(OP, "needs a sample dim (dim 0)", t.shape()));
    };
    let Some(mask) = draw(OP, t, p, training, n, g)? else {
        return x.add(t);
    };
    let storage = scaled(OP, Some(x), t, &mask)?;
    Ok(Tensor::from_op(storage, x.shape(), &[x, t], || AddDropPath { mask }))
}

/// `add_drop_path`'s backward: dx = g, dt = g m / keep (drop_path's).
struct AddDropPath {
    mask: Tensor,
}

impl Op for AddDropPath {
    fn name(&self) -> &'static str {
        "add_drop_path"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dt = Tensor::from_storage(scaled("add_drop_path", None, g, &self.mask)?, g.shape())?;
        Ok(vec![Some(g.clone()), Some(dt)])
    }
}

#[cfg(test)]
mod tests;
