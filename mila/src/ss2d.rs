//! A vision Mamba block over token grids: VMamba's SS2D ("2-D selective scan", `vmamba.py`, `forward_corev0`),
//! composed from the engine's ops.
//!
//! For tokens x (B, N, C) on an H x W grid (N = H W, row-major), d_inner = expand C, S = d_state,
//! R = dt_rank, K = 4 scan orders:
//!
//! ```text
//! [xs, z] = split(in_proj(x))                        in_proj: Linear(C, 2 d_inner), no bias
//! xs      = silu(conv2d(xs as (B, d_inner, H, W)))    depthwise d_conv x d_conv, padding (d_conv - 1) / 2, bias
//! for k in 0..4:                                     the four orders of ScanOrder::ALL
//!     u_k = xs's N tokens in order k                  (B, d_inner, N)
//!     y_k = ssm_k(u_k)                                Mamba's SSM with copy k of x_proj, dt_proj, A_log, D
//!     y  += y_k mapped back to row-major order        (B, d_inner, N)
//! out = out_proj(out_norm(y) * silu(z))              out_norm: LayerNorm(d_inner); out_proj: Linear(d_inner, C)
//! ```
//!
//! The orders (k as in VMamba): 0 row-major (row by row, left to right), 1 column-major (column by column,
//! top to bottom), 2 and 3 the same two reversed. [`ScanOrder::steps`] lists the row-major token visited at
//! each step; u_k is gathered with it (`index_select` on the token axis) and y_k scattered back with its
//! inverse, a copy of (B, d_inner, N) each way. Unlike the Mamba mixer, the scan here has no z gate: the gate
//! comes after `out_norm`, on the sum of the four orders.
//!
//! VMamba runs the four orders as one scan over K d_inner channels, with B and C grouped per order; our scan
//! op shares B and C among all its channels, so each order is its own scan call.
//!
//! Parameters under VMamba's names, the K copies stacked along a leading dim (layouts as VMamba's):
//!
//! | name | shape | init |
//! | --- | --- | --- |
//! | `x_proj_weight` | (K, R + 2S, d_inner) | PyTorch's Linear default, U(+-d_inner^-0.5) |
//! | `dt_projs_weight` | (K, d_inner, R) | U(+-R^-0.5) |
//! | `dt_projs_bias` | (K, d_inner) | softplus^-1(dt), dt log-uniform in [0.001, 0.1] floored at 1e-4 |
//! | `A_logs` | (K d_inner, S) | log(1..S) in every row; copy k is rows k d_inner .. (k+1) d_inner |
//! | `Ds` | (K d_inner) | 1 |
//! | `in_proj.weight` | (2 d_inner, C) | PyTorch's default |
//! | `conv2d.weight`, `conv2d.bias` | (d_inner, 1, d_conv, d_conv), (d_inner) | PyTorch's default |
//! | `out_norm.weight`, `out_norm.bias` | (d_inner) | 1, 0 (eps 1e-5) |
//! | `out_proj.weight` | (C, d_inner) | PyTorch's default |
//!
//! `A_logs`, `Ds` and `dt_projs_bias` are not weight-decayed (Mamba's `_no_weight_decay`; the bias as every
//! bias here).

use engine::{Error, Result, Tensor};
use nn::module::visit_child;
use nn::{Conv2d, Entry, Init, LayerNorm, Linear, Module};
use ops::TensorOps;

use crate::mamba::{a_log_init, dt_init, param, ssm, ssm_macs, MambaConfig};
use crate::util::{check_tokens, conv_macs, linear_macs, to_image};

/// One order in which SS2D scans the token grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanOrder {
    /// Row by row, each left to right: the tokens' own order.
    RowMajor,
    /// Column by column, each top to bottom.
    ColumnMajor,
    /// Row-major, last token first.
    RowMajorReversed,
    /// Column-major, last token first.
    ColumnMajorReversed,
}

impl ScanOrder {
    /// The K = 4 orders, in VMamba's order of the stacked parameter copies.
    pub const ALL: [ScanOrder; 4] =
        [ScanOrder::RowMajor, ScanOrder::ColumnMajor, ScanOrder::RowMajorReversed, ScanOrder::ColumnMajorReversed];

    /// The row-major index of the token visited at each step of this order on an h x w grid.
    pub fn steps(self, h: usize, w: usize) -> Vec<usize> {
        let row_major: Vec<usize> = (0..h * w).collect();
        let column_major: Vec<usize> = (0..w).flat_map(|c| (0..h).map(move |r| r * w + c)).collect();
        match self {
            ScanOrder::RowMajor => row_major,
            ScanOrder::ColumnMajor => column_major,
            ScanOrder::RowMajorReversed => row_major.into_iter().rev().collect(),
            ScanOrder::ColumnMajorReversed => column_major.into_iter().rev().collect(),
        }
    }
}

/// Where each token of a grid is visited: `inverse(steps)[token] = step`.
fn inverse(steps: &[usize]) -> Vec<usize> {
    let mut out = vec![0; steps.len()];
    for (step, &token) in steps.iter().enumerate() {
        out[token] = step;
    }
    out
}

/// VMamba's SS2D on an H x W token grid (module doc).
pub struct Ss2d {
    /// (K, R + 2S, d_inner)
    pub x_proj_weight: Tensor,
    /// (K, d_inner, R)
    pub dt_projs_weight: Tensor,
    /// (K, d_inner)
    pub dt_projs_bias: Tensor,
    /// (K d_inner, S)
    pub a_logs: Tensor,
    /// (K d_inner)
    pub ds: Tensor,
    pub in_proj: Linear,
    pub conv2d: Conv2d,
    pub out_norm: LayerNorm,
    pub out_proj: Linear,
    pub config: MambaConfig,
    /// The token grid (H, W) this layer expects.
    pub resolution: (usize, usize),
}

impl Ss2d {
    /// VMamba's init (module doc). `config.d_conv` is the side of the square depthwise conv and must be odd,
    /// so that its padding keeps the grid's size (VMamba's default is 3: [`MambaConfig::ss2d`]).
    pub fn new(init: &mut Init, config: &MambaConfig, resolution: (usize, usize)) -> Result<Self> {
        const OP: &str = "Ss2d";
        config.check(OP)?;
        let (d_model, d_inner, rank, states, k) =
            (config.d_model, config.d_inner(), config.dt_rank(), config.d_state, config.d_conv);
        if k.is_multiple_of(2) {
            return Err(Error::invalid(OP, format!("d_conv {k} must be odd to keep the grid's size"), &[k, k]));
        }
        if resolution.0 == 0 || resolution.1 == 0 {
            return Err(Error::invalid(OP, format!("empty token grid {resolution:?}"), &[d_model]));
        }
        let copies = ScanOrder::ALL.len();
        let in_proj = Linear::new(init, d_model, 2 * d_inner, false)?;
        let conv2d = Conv2d::new(init, d_inner, d_inner, (k, k), 1, (k - 1) / 2, d_inner, true)?;
        let x_proj_weight = init.kaiming_uniform(&[copies, rank + 2 * states, d_inner], d_inner)?;
        let (dt_w, dt_b) = dt_init(init, copies, d_inner, rank);
        Ok(Ss2d {
            x_proj_weight,
            dt_projs_weight: param(init, &dt_w, &[copies, d_inner, rank])?,
            dt_projs_bias: param(init, &dt_b, &[copies, d_inner])?,
            a_logs: param(init, &a_log_init(copies * d_inner, states), &[copies * d_inner, states])?,
            ds: param(init, &vec![1.0; copies * d_inner], &[copies * d_inner])?,
            in_proj,
            conv2d,
            out_norm: LayerNorm::new(init, d_inner, 1e-5)?,
            out_proj: Linear::new(init, d_inner, d_model, false)?,
            config: config.clone(),
            resolution,
        })
    }

    /// x (B, N, C) -> (B, N, C), tokens in row-major order.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_tokens("Ss2d", x, self.resolution, self.config.d_model)?;
        let (h, w) = self.resolution;
        let d_inner = self.config.d_inner();
        let xz = self.in_proj.forward(x)?; // (B, N, 2 d_inner)
        let z = xz.narrow(2, d_inner, d_inner)?; // (B, N, d_inner)
        let xs = to_image(&xz.narrow(2, 0, d_inner)?, h, w)?; // (B, d_inner, H, W)
        let xs = self.conv2d.forward(&xs)?.silu()?.flatten(2, 3)?; // (B, d_inner, N), row-major
        let mut ys = Vec::with_capacity(ScanOrder::ALL.len());
        for (k, order) in ScanOrder::ALL.into_iter().enumerate() {
            let steps = order.steps(h, w);
            let u = xs.index_select(2, &steps)?; // (B, d_inner, N) in order k
            ys.push(self.scan(k, &u)?.index_select(2, &inverse(&steps))?); // (B, d_inner, N), row-major
        }
        let y = ys[1..].iter().try_fold(ys[0].clone(), |sum, y| sum.add(y))?.transpose(1, 2)?; // (B, N, d_inner)
        let y = self.out_norm.forward(&y)?.mul(&z.silu()?)?;
        self.out_proj.forward(&y) // (B, N, C)
    }

    /// The SSM of order k (parameter copy k) on u (B, d_inner, N) in that order; no gate.
    fn scan(&self, k: usize, u: &Tensor) -> Result<Tensor> {
        let d_inner = self.config.d_inner();
        ssm(
            u,
            &self.x_proj_weight.select(0, k)?,
            &self.dt_projs_weight.select(0, k)?,
            &self.dt_projs_bias.select(0, k)?,
            &self.a_logs.narrow(0, k * d_inner, d_inner)?,
            &self.ds.narrow(0, k * d_inner, d_inner)?,
            None,
            (self.config.dt_rank(), self.config.d_state),
        )
    }

    /// Multiply-adds of one sample's forward: the projections, the conv and four scans (x_proj and
    /// `mamba::ssm_macs` each); not the norm, the SiLUs or the gate.
    pub fn macs(&self) -> u64 {
        let n = (self.resolution.0 * self.resolution.1) as u64;
        let c = &self.config;
        let (d_inner, rank, states) = (c.d_inner() as u64, c.dt_rank() as u64, c.d_state as u64);
        let copies = ScanOrder::ALL.len() as u64;
        let scans = copies * (n * d_inner * (rank + 2 * states) + ssm_macs(n, d_inner, rank, states));
        linear_macs(&self.in_proj, n)
            + conv_macs(&self.conv2d, self.resolution)
            + scans
            + linear_macs(&self.out_proj, n)
    }
}

impl Module for Ss2d {
    /// PyTorch's `state_dict` order: the module's own parameters before its children.
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        f("x_proj_weight", Entry::Param { tensor: &self.x_proj_weight, no_decay: false });
        f("dt_projs_weight", Entry::Param { tensor: &self.dt_projs_weight, no_decay: false });
        f("dt_projs_bias", Entry::Param { tensor: &self.dt_projs_bias, no_decay: true });
        f("A_logs", Entry::Param { tensor: &self.a_logs, no_decay: true });
        f("Ds", Entry::Param { tensor: &self.ds, no_decay: true });
        visit_child(&self.in_proj, "in_proj", f);
        visit_child(&self.conv2d, "conv2d", f);
        visit_child(&self.out_norm, "out_norm", f);
        visit_child(&self.out_proj, "out_proj", f);
    }
    fn set_training(&mut self, _: bool) {}
}
