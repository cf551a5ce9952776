//! The core of MILA's linear attention as one fused op (docs/MILA.md, section 2): ELU+1 kernels, RoPE-2D, the
//! normaliser and the two token products, between the `qk` projection and LePE.
//!
//! Inputs qk (B, N, 2C) (q's pre-activation in channels 0..C, k's in C..2C) and v (B, N, C), tokens on an
//! H x W grid (N = H W, row-major), h heads of even width d = C / h. phi(x) = elu(x) + 1; R_n is RoPE-2D's
//! rotation of token n over all C channels (rope/mod.rs, same table, same channel pairs), block-diagonal in
//! 2 x 2 pairs, so with d even it never mixes two heads. Per batch and head (vectors are a head's d channels,
//! q_n a row):
//!
//! | | forward |
//! | --- | --- |
//! | kernels | q_n = phi(qk_n[..C]), k_n = phi(qk_n[C..]); q~_n = R_n q_n, k~_n = R_n k_n |
//! | mean key | kmean = (1/N) sum_n k_n (unrotated), saved (B, C) |
//! | normaliser | z_n = 1 / (q_n . kmean + eps) (unrotated) |
//! | kv | kv = (1/N) sum_n k~_n^T v_n, d x d, saved (B, h, d, d) |
//! | output | out_n = z_n (q~_n kv) |
//!
//! (The composition scales k~ and v by N^(-1/2) each; one 1/N after the sum is the same product up to
//! rounding.) With G_n = dL/dout_n and o_n = q~_n kv:
//!
//! | | backward |
//! | --- | --- |
//! | normaliser | ds_n = dL/d(q_n . kmean) = -z_n^2 (G_n . o_n) |
//! | kv | dkv = sum_n q~_n^T (z_n G_n) |
//! | mean key | dkmean = sum_n ds_n q_n |
//! | q | dq_n = R_n^T (z_n G_n kv^T) + ds_n kmean |
//! | k | dk_n = R_n^T ((1/N) v_n dkv^T) + dkmean / N |
//! | v | dv_n = (1/N) k~_n dkv |
//! | qk | [dq_n phi'(.), dk_n phi'(.)], phi'(x) = 1 if x > 0 else e^x, which is min(phi(x), 1) |
//!
//! (phi'(x) = min(phi(x), 1) exactly: for x > 0, phi = x + 1 >= 1; else phi = expm1(x) + 1 <= 1, the very
//! value the ELU backward computes, y + alpha.)
//!
//! Memory: the op saves qk and v (which the projection and LePE keep anyway), kmean (B, C) and kv
//! (B, h, d, d); the backward recomputes q, k, their rotations and z from qk. Two passes each way: a reduction
//! over tokens (kmean and kv; dkv, dkmean and ds), then a per-token pass (out; dqk and dv). On CUDA
//! (linattn.cu, planned in cuda.rs) the reductions cut each (batch, head) into token slices whose partial
//! sums are combined in a fixed order: no atomics, bitwise deterministic.
//!
//! NOTES.md here: the kernels' profile, what changed for speed and the predicted gains.
//!
//! `linear_attention_ref` (reference.rs) is the same function composed from the primitive ops, for tests and
//! for odd head widths.

mod cpu;
pub(crate) mod cuda;
mod reference;

pub use reference::linear_attention_ref;

use std::sync::RwLockReadGuard;

use engine::{Error, Float, Layout, Op, Result, Storage, Tensor};

use crate::rope;
use crate::util::{no_cuda, same_dtype_device, saved_contiguous, with_dtype};

const OP: &str = "linear_attention";

/// Sizes and constants of one call, checked at op entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub tokens: usize,
    pub channels: usize,
    pub heads: usize,
    /// The head width C / heads (even).
    pub d: usize,
    /// The token grid (H, W), H W = N.
    pub grid_h: usize,
    pub grid_w: usize,
    pub eps: f64,
}

impl Dims {
    /// The RoPE-2D table's grid: empty when there are no tokens (as rope2d makes it).
    fn rope_grid(&self) -> rope::Grid {
        if self.tokens == 0 {
            rope::Grid { h: 0, w: 0, c: self.channels }
        } else {
            rope::Grid { h: self.grid_h, w: self.grid_w, c: self.channels }
        }
    }
}

/// Checks the operands and the configuration; returns the sizes.
fn check(qk: &Tensor, v: &Tensor, grid: (usize, usize), heads: usize, rope_base: f64, z_eps: f64) -> Result<Dims> {
    same_dtype_device(OP, qk, v)?;
    let &[batch, tokens, c] = v.shape() else {
        return Err(Error::invalid(OP, "expected v (B, N, C)", v.shape()));
    };
    if qk.shape() != [batch, tokens, 2 * c] {
        return Err(Error::invalid(
            OP,
            format!("qk must be (B, N, 2C) = [{batch}, {tokens}, {}] for v {:?}", 2 * c, v.shape()),
            qk.shape(),
        ));
    }
    let (grid_h, grid_w) = grid;
    if grid_h.checked_mul(grid_w) != Some(tokens) {
        return Err(Error::invalid(OP, format!("{tokens} tokens do not form a {grid_h}x{grid_w} grid"), v.shape()));
    }
    if c == 0 || !c.is_multiple_of(4) {
        return Err(Error::invalid(OP, format!("channels {c} must be a positive multiple of 4 (RoPE-2D)"), v.shape()));
    }
    if heads == 0 || !c.is_multiple_of(heads) {
        return Err(Error::invalid(OP, format!("{heads} heads do not divide {c} channels"), v.shape()));
    }
    let d = c / heads;
    if !d.is_multiple_of(2) {
        return Err(Error::invalid(
            OP,
            format!("head width {d} = {c} / {heads} must be even (a RoPE pair may not straddle two heads)"),
            v.shape(),
        ));
    }
    if !(rope_base.is_finite() && rope_base > 0.0) {
        return Err(Error::invalid(OP, format!("rope base {rope_base} must be positive and finite"), v.shape()));
    }
    if !z_eps.is_finite() {
        return Err(Error::invalid(OP, format!("z_eps {z_eps} must be finite"), v.shape()));
    }
    Ok(Dims { batch, tokens, channels: c, heads, d, grid_h, grid_w, eps: z_eps })
}

/// `n` zeros of `like`'s dtype on its device.
fn zeros(n: usize, like: &Tensor) -> Result<Storage> {
    let cpu = with_dtype!(like.dtype(), |T| T::into_storage(vec![T::ZERO; n]));
    Storage::from_cpu(cpu, like.device())
}

/// Read guards on the storages of some tensors, one per distinct storage (two operands may share one, and a
/// read lock is not taken twice by one thread), with each tensor's (storage, layout).
struct Held<'a> {
    tensors: Vec<&'a Tensor>,
    owner: Vec<usize>,
    guards: Vec<RwLockReadGuard<'a, Storage>>,
}

impl<'a> Held<'a> {
    fn new(tensors: &[&'a Tensor]) -> Self {
        let mut firsts: Vec<&Tensor> = Vec::new();
        let mut owner = Vec::new();
        for &t in tensors {
            match firsts.iter().position(|o| o.same_storage(t)) {
                Some(i) => owner.push(i),
                None => {
                    owner.push(firsts.len());
                    firsts.push(t);
                }
            }
        }
        let guards = firsts.iter().map(|t| t.storage()).collect();
        Held { tensors: tensors.to_vec(), owner, guards }
    }

    /// The i-th tensor's storage and layout.
    fn get(&self, i: usize) -> (&Storage, &Layout) {
        (&self.guards[self.owner[i]], self.tensors[i].layout())
    }
}

/// The op's node: the contiguous operands, the rope table and the small results the backward reuses.
struct LinearAttention {
    qk: Tensor,
    v: Tensor,
    /// (H + W, C/4, 2) cos/sin table, on the operands' device.
    table: Tensor,
    /// (B, C): the mean of k over the tokens.
    kmean: Tensor,
    /// (B, heads, d, d): (1/N) sum_n k~_n^T v_n.
    kv: Tensor,
    dims: Dims,
}

impl Op for LinearAttention {
    fn name(&self) -> &'static str {
        OP
    }

    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        if self.dims.batch * self.dims.tokens == 0 {
            let zero = |t: &Tensor| Tensor::zeros(t.shape(), t.dtype(), t.device()).map(Some);
            return Ok(vec![zero(&self.qk)?, zero(&self.v)?]);
        }
        let g = g.contiguous()?;
        let held = Held::new(&[&self.qk, &self.v, &self.table, &self.kmean, &self.kv, &g]);
        let (dqk, dv) = match (held.get(0), held.get(1), held.get(2), held.get(3), held.get(4), held.get(5)) {
            (
                (Storage::Cpu(qk), lqk),
                (Storage::Cpu(v), lv),
                (Storage::Cpu(t), lt),
                (Storage::Cpu(km), lkm),
                (Storage::Cpu(kv), lkv),
                (Storage::Cpu(gs), lg),
            ) => cpu::backward((qk, lqk), (v, lv), (t, lt), (km, lkm), (kv, lkv), (gs, lg), self.dims)?,
            (
                (Storage::Cuda(qk), lqk),
                (Storage::Cuda(v), lv),
                (Storage::Cuda(t), lt),
                (Storage::Cuda(km), lkm),
                (Storage::Cuda(kv), lkv),
                (Storage::Cuda(gs), lg),
            ) => {
                let (dqk, dv) = cuda::backward((qk, lqk), (v, lv), (t, lt), (km, lkm), (kv, lkv), (gs, lg), self.dims)?;
                (Storage::Cuda(dqk), Storage::Cuda(dv))
            }
            ((s, _), ..) => return Err(no_cuda(OP, s)),
        };
        drop(held);
        Ok(vec![Some(Tensor::from_storage(dqk, self.qk.shape())?), Some(Tensor::from_storage(dv, self.v.shape())?)])
    }
}

/// MILA's linear attention without LePE: qk (B, N, 2C) is the `qk` projection's output (q's pre-activation
/// first, then k's), v (B, N, C) the values, on a `grid` = (H, W) token grid with `heads` heads of even width
/// d = C / heads. Returns (B, N, C): per token n and head, z_n (q~_n kv) with q = elu(q) + 1, k = elu(k) + 1,
/// q~, k~ their RoPE-2D rotations (frequency base `rope_base`, 10000 in MILA), kv = (1/N) sum k~^T v and
/// z_n = 1 / (q_n . mean(k) + z_eps) (1e-6 in MILA). Differentiable in qk and v; inputs may be any views (they
/// are made contiguous). See the module docs for the math; [`linear_attention_ref`] is the composition.
pub fn linear_attention(
    qk: &Tensor,
    v: &Tensor,
    grid: (usize, usize),
    heads: usize,
    rope_base: f64,
    z_eps: f64,
) -> Result<Tensor> {
    let dims = check(qk, v, grid, heads, rope_base, z_eps)?;
    let (qk_in, v_in) = (qk, v);
    let (qk, v) = (saved_contiguous(qk)?, saved_contiguous(v)?);
    let table = Storage::from_cpu(rope::cpu::table(qk.dtype(), dims.rope_grid(), rope_base), qk.device())?;
    let rg = dims.rope_grid();
    let table = Tensor::from_storage(table, &[rg.h + rg.w, rg.c / 4, 2])?;
    let held = Held::new(&[&qk, &v, &table]);
    let (out, kmean, kv) = match (held.get(0), held.get(1), held.get(2)) {
        // No tokens or no samples: nothing to compute (an empty view need not pass as contiguous).
        _ if dims.batch * dims.tokens == 0 => {
            let (b, c, d) = (dims.batch, dims.channels, dims.d);
            (zeros(0, &qk)?, zeros(b * c, &qk)?, zeros(b * dims.heads * d * d, &qk)?)
        }
        ((Storage::Cpu(q), lq), (Storage::Cpu(vs), lv), (Storage::Cpu(t), lt)) => {
            cpu::forward((q, lq), (vs, lv), (t, lt), dims)?
        }
        ((Storage::Cuda(q), lq), (Storage::Cuda(vs), lv), (Storage::Cuda(t), lt)) => {
            let (out, kmean, kv) = cuda::forward((q, lq), (vs, lv), (t, lt), dims)?;
            (Storage::Cuda(out), Storage::Cuda(kmean), Storage::Cuda(kv))
        }
        ((s, _), ..) => return Err(no_cuda(OP, s)),
    };
    drop(held);
    let Dims { batch, tokens, channels, heads, d, .. } = dims;
    let kmean = Tensor::from_storage(kmean, &[batch, channels])?;
    let kv = Tensor::from_storage(kv, &[batch, heads, d, d])?;
    Ok(Tensor::from_op(out, &[batch, tokens, channels], &[qk_in, v_in], || LinearAttention {
        qk,
        v,
        table,
        kmean,
        kv,
        dims,
    }))
}

#[cfg(test)]
mod tests;
