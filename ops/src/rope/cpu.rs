//! CPU kernels of RoPE-2D: the cos/sin table and the pairwise rotation, one token row per task.

use engine::{CpuStorage, DType, Float, Result, Storage};
use rayon::prelude::*;

use crate::util::{contiguous_slice, with_dtype, Operand};

/// Which way to rotate: by +angle (forward) or by -angle (backward, the transpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Forward,
    Backward,
}

/// The (N, C/2, 2) table of (cos a, sin a) for every token and channel pair, computed in `dtype`.
pub(super) fn table(dtype: DType, h: usize, w: usize, c: usize, base: f64) -> CpuStorage {
    fn run<T: Float>(h: usize, w: usize, c: usize, base: f64) -> Vec<T> {
        let k_max = c / 4;
        let theta: Vec<T> = (0..k_max)
            .map(|m| T::ONE / T::from_f64(base).powf(T::from_f64(m as f64) / T::from_f64(k_max as f64)))
            .collect();
        // (cos, sin) of pos theta_m for pos < len: the rows' and the columns' halves of the table, so that the
        // trigonometry runs (H + W) k_max times rather than H W 2 k_max.
        let half = |len: usize| -> Vec<T> {
            (0..len)
                .flat_map(|pos| theta.iter().map(move |&th| T::from_f64(pos as f64) * th))
                .flat_map(|a| [a.cos(), a.sin()])
                .collect()
        };
        let (rows, cols) = (half(h), half(w));
        let k2 = 2 * k_max;
        let mut out = Vec::with_capacity(h * w * c);
        for r in 0..h {
            for col in 0..w {
                // Pairs 0..k_max follow the row, pairs k_max..2 k_max the column.
                out.extend_from_slice(&rows[r * k2..][..k2]);
                out.extend_from_slice(&cols[col * k2..][..k2]);
            }
        }
        out
    }
    with_dtype!(dtype, |T| T::into_storage(run::<T>(h, w, c, base)))
}

/// y = x rotated pairwise by the table's angles (or their negatives); x is (B, N, C) contiguous.
pub(super) fn rotate(x: Operand, table: Operand, dir: Direction) -> Result<Storage> {
    fn run<T: Float>(x: &[T], table: &[T], c: usize, dir: Direction) -> Vec<T> {
        let n = table.len() / c;
        let mut y = vec![T::ZERO; x.len()];
        y.par_chunks_mut(c).zip(x.par_chunks(c)).enumerate().with_min_len(64).for_each(|(row, (yr, xr))| {
            let tr = &table[(row % n) * c..][..c];
            for ((yp, xp), cs) in yr.chunks_exact_mut(2).zip(xr.chunks_exact(2)).zip(tr.chunks_exact(2)) {
                let sin = if dir == Direction::Forward { cs[1] } else { -cs[1] };
                yp[0] = xp[0] * cs[0] - xp[1] * sin;
                yp[1] = xp[0] * sin + xp[1] * cs[0];
            }
        });
        y
    }
    const OP: &str = "rope2d";
    let c = x.1.shape().last().copied().unwrap_or(1).max(1);
    with_dtype!(x.0.dtype(), |T| Ok(Storage::Cpu(T::into_storage(run::<T>(
        contiguous_slice(OP, x.0, x.1)?,
        contiguous_slice(OP, table.0, table.1)?,
        c,
        dir
    )))))
}
