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
//! operations (theta = 1 / base^(m / k_max), a = r theta, then cos and sin), so f64 runs are exact to f64.

mod cpu;

use engine::{Error, Op, Result, Storage, Tensor};

use crate::util::{no_cuda, saved_contiguous};

struct Rope2d {
    /// The (N, C/2, 2) table of (cos a, sin a) of the forward.
    table: Tensor,
}

impl Op for Rope2d {
    fn name(&self) -> &'static str {
        "rope2d"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = g.contiguous()?;
        let storage = match (&*g.storage(), &*self.table.storage()) {
            (Storage::Cpu(gs), Storage::Cpu(t)) => {
                cpu::rotate((gs, g.layout()), (t, self.table.layout()), cpu::Direction::Backward)?
            }
            (s, _) => return Err(no_cuda("rope2d_backward", s)),
        };
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
    let xc = saved_contiguous(x)?;
    let table = Tensor::from_storage(Storage::Cpu(cpu::table(x.dtype(), h, w, c, base)), &[n, c / 2, 2])?
        .to_device(x.device())?;
    let storage = match (&*xc.storage(), &*table.storage()) {
        (Storage::Cpu(s), Storage::Cpu(t)) => {
            cpu::rotate((s, xc.layout()), (t, table.layout()), cpu::Direction::Forward)?
        }
        (s, _) => return Err(no_cuda(OP, s)),
    };
    Ok(Tensor::from_op(storage, x.shape(), &[x], || Rope2d { table: table.clone() }))
}

#[cfg(test)]
mod tests;
