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

mod cpu;
pub(crate) mod cuda;

use engine::{Device, Error, Generator, Op, Result, Storage, Tensor};

use crate::util::{no_cuda, saved_contiguous};

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
        Ok(vec![Some(Tensor::from_storage(scaled(self.name, g, &self.mask)?, g.shape())?)])
    }
}

/// x scaled block by block by `mask`, as new contiguous storage.
fn scaled(op: &'static str, x: &Tensor, mask: &Tensor) -> Result<Storage> {
    // The CPU kernel walks contiguous slices; the CUDA kernel reads any view, so x is copied for the CPU only.
    let xc = if x.device() == Device::Cpu { saved_contiguous(x)? } else { x.clone() };
    let storage = match (&*xc.storage(), &*mask.storage()) {
        (Storage::Cpu(s), Storage::Cpu(m)) => cpu::scale_blocks(op, (s, xc.layout()), (m, mask.layout()))?,
        (Storage::Cuda(s), Storage::Cuda(m)) => {
            Storage::Cuda(cuda::scale_blocks(op, s, xc.layout(), m, mask.layout())?)
        }
        (s, _) => return Err(no_cuda(op, s)),
    };
    Ok(storage)
}

/// Draws the mask (one entry per block) and applies it; the identity when not training or p = 0.
fn masked(op: &'static str, x: &Tensor, p: f64, training: bool, blocks: usize, g: &mut Generator) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::invalid(op, format!("probability {p} is not in [0, 1]"), x.shape()));
    }
    if !training || p == 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    // keep = 0 (p = 1) drops everything; there is nothing to rescale.
    let scale = if keep > 0.0 { 1.0 / keep } else { 0.0 };
    let values: Vec<f64> = (0..blocks).map(|_| if g.uniform() < keep { scale } else { 0.0 }).collect();
    let mask = Tensor::from_f64(&values, &[blocks], x.dtype(), x.device())?;
    let storage = scaled(op, x, &mask)?;
    Ok(Tensor::from_op(storage, x.shape(), &[x], || Masked { name: op, mask }))
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

#[cfg(test)]
mod tests;
