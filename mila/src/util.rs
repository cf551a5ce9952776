//! Token/image layout changes and multiply-add counts shared by the modules.

use engine::{Error, Result, Tensor};
use nn::{Conv2d, Linear};
use ops::TensorOps;

/// Checks that x is (B, H W, C) for the given grid and width; returns (B, N, C).
pub(crate) fn check_tokens(
    op: &'static str,
    x: &Tensor,
    (h, w): (usize, usize),
    dim: usize,
) -> Result<(usize, usize, usize)> {
    match *x.shape() {
        [b, n, c] if n == h * w && c == dim => Ok((b, n, c)),
        _ => Err(Error::invalid(op, format!("expected tokens (B, {}, {dim}) of a {h}x{w} grid", h * w), x.shape())),
    }
}

/// Tokens (B, N, C) in row-major order -> image (B, C, H, W), as a view.
pub(crate) fn to_image(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, c) = (x.dim(0)?, x.dim(2)?);
    // (B, N, C) -> (B, H, W, C) -> (B, C, H, W)
    x.reshape(&[b as isize, h as isize, w as isize, c as isize])?.permute(&[0, 3, 1, 2])
}

/// Image (B, C, H, W) -> tokens (B, H W, C) in row-major order.
pub(crate) fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    // (B, C, H, W) -> (B, H, W, C) -> (B, N, C)
    x.permute(&[0, 2, 3, 1])?.reshape(&[b as isize, -1, c as isize])
}

/// Multiply-adds of a conv producing an (oh, ow) map for one sample: every output element takes
/// in/groups * kh * kw of them, so the total is the weight's size times the output area.
pub(crate) fn conv_macs(conv: &Conv2d, (oh, ow): (usize, usize)) -> u64 {
    (conv.weight.numel() * oh * ow) as u64
}

/// Multiply-adds of a Linear over `rows` rows.
pub(crate) fn linear_macs(linear: &Linear, rows: u64) -> u64 {
    linear.weight.numel() as u64 * rows
}
