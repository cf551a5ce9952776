//! CPU kernel of the stochastic regularisers: scale consecutive blocks of a tensor by a mask (and add another).

use engine::{Error, Float, Result, Storage};
use rayon::prelude::*;

use crate::util::{contiguous_slice, with_dtype, Operand};

/// y[i] = t[i] mask[i / block], plus x[i] where x is given (the product rounded before the add, as
/// `x + scale_blocks(t)`), with block = len(t) / len(mask); x and t contiguous, of one length.
pub(super) fn add_scaled_blocks(op: &'static str, x: Option<Operand>, t: Operand, mask: Operand) -> Result<Storage> {
    fn run<T: Float>(x: Option<&[T]>, t: &[T], mask: &[T]) -> Vec<T> {
        let mut y = engine::cpu_buffer(t.len()); // every element is written
        let block = (t.len() / mask.len().max(1)).max(1);
        let min_len = (4096 / block).max(1);
        let blocks = y.par_chunks_mut(block).zip(t.par_chunks(block)).zip(mask).with_min_len(min_len);
        match x {
            None => blocks.for_each(|((yb, tb), &m)| {
                for (yv, &tv) in yb.iter_mut().zip(tb) {
                    *yv = tv * m;
                }
            }),
            Some(x) => blocks.zip(x.par_chunks(block)).for_each(|(((yb, tb), &m), xb)| {
                for ((yv, &tv), &xv) in yb.iter_mut().zip(tb).zip(xb) {
                    *yv = xv + tv * m;
                }
            }),
        }
        y
    }
    let (n, blocks) = (t.1.numel(), mask.1.numel());
    if blocks == 0 && n > 0 || blocks > 0 && n % blocks != 0 || x.is_some_and(|x| x.1.numel() != n) {
        return Err(Error::invalid(op, format!("internal: {blocks} mask entries for {n} elements"), t.1.shape()));
    }
    with_dtype!(t.0.dtype(), |T| {
        let xs = x.map(|x| contiguous_slice(op, x.0, x.1)).transpose()?;
        Ok(Storage::Cpu(T::into_storage(run::<T>(
            xs,
            contiguous_slice(op, t.0, t.1)?,
            contiguous_slice(op, mask.0, mask.1)?,
        ))))
    })
}
