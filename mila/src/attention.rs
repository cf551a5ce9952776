//! MILA's linear attention (official `LinearAttention`, `docs/MILA.md` section 2).
//!
//! For tokens x (B, N, C) on an H x W grid with h heads of width d = C / h:
//!
//! ```text
//! [q, k] = split(qk(x));  v = x                       (no value projection)
//! q = elu(q) + 1;  k = elu(k) + 1                      (a positive kernel)
//! q_r = rope2d(q);  k_r = rope2d(k)                    (over all C channels, before the head split)
//! z   = 1 / (q . mean_tokens(k) + 1e-6)                (per token and head; q and k WITHOUT rope)
//! kv  = (k_r^T / sqrt(N)) @ (v / sqrt(N))              (d x d per head)
//! out = (q_r @ kv) z + lepe(v as a (B, C, H, W) image)
//! ```

use engine::{Error, Result, Tensor};
use nn::module::visit_child;
use nn::{Conv2d, Entry, Init, Linear, Module};
use ops::TensorOps;

use crate::util::{check_tokens, conv_macs, linear_macs, to_image, to_tokens};

/// RoPE's frequency base, as in the official code.
const ROPE_BASE: f64 = 10000.0;
/// Added to the normaliser q . mean(k) so that it never divides by zero (q, k > 0 keep it positive anyway).
const Z_EPS: f64 = 1e-6;

/// ELU+1 linear attention with RoPE-2D and LePE. Parameters `qk` (Linear C -> 2C) and `lepe` (depthwise
/// 3x3 conv); RoPE's table is rebuilt per call from the grid, so it is not a buffer here (the official
/// `rope.rotations` buffer is derived from the shape and is ignored on load).
pub struct LinearAttention {
    pub qk: Linear,
    pub lepe: Conv2d,
    pub dim: usize,
    pub num_heads: usize,
    /// The token grid (H, W) this layer expects.
    pub resolution: (usize, usize),
}

impl LinearAttention {
    /// MLLA's init: `qk` trunc_normal(0.02) with zero bias, `lepe` PyTorch's conv default.
    pub fn new(
        init: &mut Init,
        dim: usize,
        resolution: (usize, usize),
        num_heads: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        const OP: &str = "LinearAttention";
        if num_heads == 0 || !dim.is_multiple_of(num_heads) {
            return Err(Error::invalid(OP, format!("{num_heads} heads do not divide dim {dim}"), &[dim]));
        }
        // RoPE-2D rotates C/2 complex pairs, half by row and half by column.
        if dim == 0 || !dim.is_multiple_of(4) {
            return Err(Error::invalid(OP, format!("dim {dim} must be a positive multiple of 4 (RoPE-2D)"), &[dim]));
        }
        if resolution.0 == 0 || resolution.1 == 0 {
            return Err(Error::invalid(OP, format!("empty token grid {resolution:?}"), &[dim]));
        }
        Ok(LinearAttention {
            qk: Linear::new_trunc_normal(init, dim, 2 * dim, qkv_bias)?,
            lepe: Conv2d::new(init, dim, dim, (3, 3), 1, 1, dim, true)?,
            dim,
            num_heads,
            resolution,
        })
    }

    /// x (B, N, C) -> (B, N, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = check_tokens("LinearAttention", x, self.resolution, self.dim)?;
        let (h, w) = self.resolution;
        let (heads, d) = (self.num_heads, c / self.num_heads);
        let qk = self.qk.forward(x)?; // (B, N, 2C)
        let q = qk.narrow(2, 0, c)?.elu(1.0)?.add_scalar(1.0)?;
        let k = qk.narrow(2, c, c)?.elu(1.0)?.add_scalar(1.0)?;
        // RoPE over the whole C-channel vector, before the heads are split.
        let q_rope = q.rope2d(h, w, ROPE_BASE)?;
        let k_rope = k.rope2d(h, w, ROPE_BASE)?;
        // (B, N, C) -> (B, h, N, d)
        let heads_of =
            |t: &Tensor| t.reshape(&[b as isize, n as isize, heads as isize, d as isize])?.permute(&[0, 2, 1, 3]);
        let (q, k, v) = (heads_of(&q)?, heads_of(&k)?, heads_of(x)?);
        let (q_rope, k_rope) = (heads_of(&q_rope)?, heads_of(&k_rope)?);

        // The normaliser uses q and k before RoPE: rotated kernels are no longer positive, so their dot
        // product could vanish or change sign. (B, h, N, d) @ (B, h, d, 1) -> (B, h, N, 1)
        let z = q.matmul(&k.mean(&[-2], true)?.transpose(-2, -1)?)?.add_scalar(Z_EPS)?.powf(-1.0)?;
        // Both factors are scaled by 1/sqrt(N) (not one by 1/N), as the official code does: the sum over
        // N tokens stays O(1) in either factor, which keeps f32/f16 partial sums in range.
        let scale = (n as f64).powf(-0.5);
        let kv = k_rope.transpose(-2, -1)?.mul_scalar(scale)?.matmul(&v.mul_scalar(scale)?)?; // (B, h, d, d)
                                                                                              // (B, h, N, d) -> (B, N, h, d) -> (B, N, C)
        let out = q_rope.matmul(&kv)?.mul(&z)?.transpose(1, 2)?.reshape(&[b as isize, n as isize, c as isize])?;
        // LePE: the depthwise conv of v (the unscaled input) seen as a (B, C, H, W) image.
        let lepe = self.lepe.forward(&to_image(x, h, w)?)?;
        out.add(&to_tokens(&lepe)?)
    }

    /// Multiply-adds of one sample's forward: the projections, the three attention products
    /// (q . mean(k), k^T v, q kv) and the LePE conv.
    pub fn macs(&self) -> u64 {
        let n = (self.resolution.0 * self.resolution.1) as u64;
        let (c, d) = (self.dim as u64, (self.dim / self.num_heads) as u64);
        let attention = n * c + 2 * n * c * d;
        linear_macs(&self.qk, n) + attention + conv_macs(&self.lepe, self.resolution)
    }
}

impl Module for LinearAttention {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.qk, "qk", f);
        visit_child(&self.lepe, "lepe", f);
    }
    fn set_training(&mut self, _: bool) {}
}
