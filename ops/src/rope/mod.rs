//! 2-D rotary position embedding (RoPE-2D) of MILA's linear attention (`docs/MILA.md`, section 2).
//!
//! x is (B, N, C) with N = H W tokens in row-major order, token t at (r, c) = (t / W, t % W). With
//! k_max = C / 4 and theta_m = base^(-m / k_max), complex pair p (channels 2p = re, 2p + 1 = im) of token
//! (r, c) turns by angle a = r theta_p for p < k_max, c theta_(p - k_max) for k_max <= p < 2 k_max:
//!
//! | | formula |
//! | --- | --- |
//! | forward | (y_2p + i y_2p+1) = (x_2p + i x_2p+1) e^(i a): y_2p = x_2p cos a - x_2p+1 sin a, y_2p+1 = x_2p sin a + x_2p+1 cos a |
//! | dL/dx | the rotation by -a (a rotation's inverse is its transpose): dx_2p = g_2p cos a + g_2p+1 sin a, dx_2p+1 = -g_2p sin a + g_2p+1 cos a |
//! | shapes | y has x's shape; C must be a multiple of 4 |
//!
//! The cos/sin table is built per call in the working dtype, following the official code's float32 order of
//! operations (theta = 1 / base^(m / k_max), a = r theta, then cos and sin), so f64 runs are exact to f64. It
//! holds one row of C/4 angles per token row and per token column, (H + W, C/4, 2); on CUDA it is built on the
//! host the same way and uploaded (small: (H + W) C/2 values), so both devices use the same rounded angles.

pub(crate) mod cpu;
pub(crate) mod cuda;

use engine::{Device, Error, Op, Result, Storage, Tensor};

use crate::util::{no_cuda, saved_contiguous};

/// Which way to rotate: by +angle (forward) or by -angle (backward, the transpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Forward,
    Backward,
}

/// The token grid (H, W) and the channels C of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grid {
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

struct Rope2d {
    /// The (H + W, C/4, 2) table of (cos a, sin a) of the forward, on x's device.
    table: Tensor,
    grid: Grid,
}

/// x rotated by the table, as new contiguous storage. The CPU kernel walks contiguous rows, so x is made
/// contiguous there; the CUDA kernel reads any view.
fn rotate(x: &Tensor, table: &Tensor, grid: Grid, dir: Direction) -> Result<Storage> {
    let xc = if x.device() == Device::Cpu { saved_contiguous(x)? } else { x.clone() };
    let storage = match (&*xc.storage(), &*table.storage()) {
        (Storage::Cpu(s), Storage::Cpu(t)) => cpu::rotate((s, xc.layout()), (t, table.layout()), grid, dir)?,
        (Storage::Cuda(s), Storage::Cuda(t)) => {
            Storage::Cuda(cuda::rotate(s, xc.layout(), t, table.layout(), grid, dir)?)
        }
        (s, _) => return Err(no_cuda("rope2d", s)),
    };
    Ok(storage)
}

impl Op for Rope2d {
    fn name(&self) -> &'static str {
        "rope2d"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let storage = rotate(g, &self.table, self.grid, Direction::Backward)?;
        Ok(vec![Some(Tensor::from_storage(storage, g.shape())?)])
    }
}

/// RoPE-2D of x (B, N, C) for an H x W token grid (N = H W, row-major) with frequency base `base` (10000 in
/// MILA). Each channel pair (2p, 2p + 1) is rotated by the angle of its token's row (first C/4 pairs) or
/// column (last C/4 pairs).
pub fn rope2d(x: &Tensor, h: usize, w: usize, base: f64) -> Result<Tensor> {
    const OP: &str = "rope2d";
    let &[_, n, c] = x.shape() else {
        return Err(Error::invalid(OP, "expected x (B, N, C)", x.shape()));
    };
    if h.checked_mul(w) != Some(n) {
        return Err(Error::invalid(OP, format!("{n} tokens do not form a {h}x{w} grid"), x.shape()));
    }
    if c == 0 || c % 4 != 0 {
        return Err(Error::invalid(OP, format!("channels {c} must be a positive multiple of 4"), x.shape()));
    }
    if !(base.is_finite() && base > 0.0) {
        return Err(Error::invalid(OP, format!("base {base} must be positive and finite"), x.shape()));
    }
    // No tokens, no angles: an empty grid also keeps a degenerate one (0 x usize::MAX) from sizing the table.
    let grid = if n == 0 { Grid { h: 0, w: 0, c } } else { Grid { h, w, c } };
    let table = Storage::from_cpu(cpu::table(x.dtype(), grid, base), x.device())?;
    let table = Tensor::from_storage(table, &[grid.h + grid.w, c / 4, 2])?;
    let storage = rotate(x, &table, grid, Direction::Forward)?;
    Ok(Tensor::from_op(storage, x.shape(), &[x], || Rope2d { table: table.clone(), grid }))
}

#[cfg(test)]
mod tests;
