//! CPU kernel of the stochastic regularisers: scale consecutive blocks of a tensor by a mask.

use engine::{Error, Float, Result, Storage};
use rayon::prelude::*;

use crate::util::{contiguous_slice, with_dtype, Operand};

/// y[i] = x[i] mask[i / block] with block = len(x) / len(mask); x contiguous.
pub(super) fn scale_blocks(op: &'static str, x: Operand, mask: Operand) -> Result<Storage> {
    fn run<T: Float>(x: &[T], mask: &[T]) -> Vec<T> {
        let mut y = engine::cpu_buffer(x.len()); // every element is written
        let block = (x.len() / mask.len().max(1)).max(1);
        y.par_chunks_mut(block).zip(x.par_chunks(block)).zip(mask).with_min_len((4096 / block).max(1)).for_each(
            |((yb, xb), &m)| {
                for (yv, &xv) in yb.iter_mut().zip(xb) {
                    *yv = xv * m;
                }
            },
        );
        y
    }
    let (n, blocks) = (x.1.numel(), mask.1.numel());
    if blocks == 0 && n > 0 || blocks > 0 && n % blocks != 0 {
        return Err(Error::invalid(op, format!("internal: {blocks} mask entries for {n} elements"), x.1.shape()));
    }
    with_dtype!(x.0.dtype(), |T| Ok(Storage::Cpu(T::into_storage(run::<T>(
        contiguous_slice(op, x.0, x.1)?,
        contiguous_slice(op, mask.0, mask.1)?
    )))))
}

/// y[i] = x[i] + (t[i] mask[i / block]) with block = len(t) / len(mask): the product rounded first, as
/// `x + scale_blocks(t)`; x and t contiguous, of one length.
pub(super) fn add_scaled_blocks(op: &'static str, x: Operand, t: Operand, mask: Operand) -> Result<Storage> {
    fn run<T: Float>(x: &[T], t: &[T], mask: &[T]) -> Vec<T> {
        let mut y = engine::cpu_buffer(x.len()); // every element is written
        let block = (x.len() / mask.len().max(1)).max(1);
        y.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(t.par_chunks(block))
            .zip(mask)
            .with_min_len((4096 / block).max(1))
            .for_each(|(((yb, xb), tb), &m)| {
                for ((yv, &xv), &tv) in yb.iter_mut().zip(xb).zip(tb) {
                    *yv = xv + tv * m;
                }
            });
        y
    }
    let (n, blocks) = (t.1.numel(), mask.1.numel());
    if blocks == 0 && n > 0 || blocks > 0 && n % blocks != 0 || x.1.numel() != n {
        return Err(Error::invalid(op, format!("internal: {blocks} mask entries for {n} elements"), t.1.shape()));
    }
    with_dtype!(x.0.dtype(), |T| Ok(Storage::Cpu(T::into_storage(run::<T>(
        contiguous_slice(op, x.0, x.1)?,
        contiguous_slice(op, t.0, t.1)?,
        contiguous_slice(op, mask.0, mask.1)?
    )))))
}
