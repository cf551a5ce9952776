//! CPU kernels of RoPE-2D: the cos/sin table and the pairwise rotation, one token row per task.

use engine::{CpuStorage, DType, Float, Result, Storage};
use rayon::prelude::*;

use super::{Direction, Grid};
use crate::util::{contiguous_slice, with_dtype, Operand};

/// The (H + W, C/4, 2) table of (cos, sin) of pos theta_m: rows 0..H hold the angles of the token rows, rows
/// H..H + W those of the token columns, computed in `dtype`. A token (r, c) reads its first C/4 pairs' angles
/// from row r and its last C/4 from row H + c, so the trigonometry runs (H + W) C/4 times rather than
/// H W C/2, and the table is small enough to upload per call.
pub(crate) fn table(dtype: DType, grid: Grid, base: f64) -> CpuStorage {
    fn run<T: Float>(Grid { h, w, c }: Grid, base: f64) -> Vec<T> {
        let k_max = c / 4;
        let theta: Vec<T> = (0..k_max)
            .map(|m| T::ONE / T::from_f64(base).powf(T::from_f64(m as f64) / T::from_f64(k_max as f64)))
            .collect();
        (0..h)
            .chain(0..w)
            .flat_map(|pos| theta.iter().map(move |&th| T::from_f64(pos as f64) * th))
            .flat_map(|a| [a.cos(), a.sin()])
            .collect()
    }
    with_dtype!(dtype, |T| T::into_storage(run::<T>(grid, base)))
}

/// y = x rotated pairwise by the table's angles (or their negatives); x is (B, N, C) contiguous.
pub(super) fn rotate(x: Operand, table: Operand, grid: Grid, dir: Direction) -> Result<Storage> {
    fn run<T: Float>(x: &[T], table: &[T], Grid { h, w, c }: Grid, dir: Direction) -> Vec<T> {
        // Entries of one table row: (cos, sin) of C/4 pairs.
        let k2 = c / 2;
        let mut y = engine::cpu_buffer(x.len()); // every pair is written
        y.par_chunks_mut(c).zip(x.par_chunks(c)).enumerate().with_min_len(64).for_each(|(row, (yr, xr))| {
            let tok = row % (h * w);
            // Pairs 0..C/4 follow the token's row, pairs C/4..C/2 its column.
            let angles =
                table[tok / w * k2..][..k2].chunks_exact(2).chain(table[(h + tok % w) * k2..][..k2].chunks_exact(2));
            for ((yp, xp), cs) in yr.chunks_exact_mut(2).zip(xr.chunks_exact(2)).zip(angles) {
                let sin = if dir == Direction::Forward { cs[1] } else { -cs[1] };
                yp[0] = xp[0] * cs[0] - xp[1] * sin;
                yp[1] = xp[0] * sin + xp[1] * cs[0];
            }
        });
        y
    }
    const OP: &str = "rope2d";
    with_dtype!(x.0.dtype(), |T| Ok(Storage::Cpu(T::into_storage(run::<T>(
        contiguous_slice(OP, x.0, x.1)?,
        contiguous_slice(OP, table.0, table.1)?,
        grid,
        dir
    )))))
}
