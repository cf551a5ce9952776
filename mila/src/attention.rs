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
use ops::{linear_attention, linear_attention_ref, TensorOps};

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
        check_tokens("LinearAttention", x, self.resolution, self.dim)?;
        let qk = self.qk.forward(x)?; // (B, N, 2C)
                                      // ELU+1, RoPE-2D, the normaliser and both token products in one fused op (ops/src/linattn), which
                                      // keeps only qk, x and the per-head kmean and kv for its backward. It needs even head widths (a RoPE
                                      // pair may not straddle two heads); odd ones take the composition of primitive ops.
        let out = if (self.dim / self.num_heads).is_multiple_of(2) {
            linear_attention(&qk, x, self.resolution, self.num_heads, ROPE_BASE, Z_EPS)?
        } else {
            linear_attention_ref(&qk, x, self.resolution, self.num_heads, ROPE_BASE, Z_EPS)?
        };
        // LePE: the depthwise conv of v (the unscaled input) seen as a (B, C, H, W) image.
        let (h, w) = self.resolution;
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
