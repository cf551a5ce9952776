//! CPU kernels of the fused linear attention. Each direction is a reduction over the tokens per (batch, head)
//! and then a pass per token row, both parallel with rayon; every sum runs in token (or channel) order, so
//! results do not depend on the thread count.

use engine::{Float, Result, Storage};
use rayon::prelude::*;

use super::{Dims, OP};
use crate::util::{contiguous_slice, with_dtype, Operand};

/// RoPE-2D's angles: the (H + W, C/4, 2) cos/sin table of rope/cpu.rs, read as rope2d reads it.
struct Angles<'a, T> {
    table: &'a [T],
    h: usize,
    w: usize,
    quarter: usize,
}

impl<'a, T: Float> Angles<'a, T> {
    fn new(table: &'a [T], dims: Dims) -> Self {
        Angles { table, h: dims.grid_h, w: dims.grid_w.max(1), quarter: dims.channels / 4 }
    }

    /// y = R_tok x on the channels c0..c0 + x.len() (c0 and the length even), or R_tok^T x when `inverse`.
    /// Pair p turns by the token's row when p < C/4 and by its column otherwise, with (cos, sin) at entry
    /// p % (C/4) of that row of the table; the token's two rows are found once, not per pair.
    fn rotate(&self, tok: usize, c0: usize, x: &[T], y: &mut [T], inverse: bool) {
        let q = self.quarter;
        let (by_row, by_col) = (tok / self.w * q, (self.h + tok % self.w) * q);
        for (j, (yp, xp)) in y.chunks_exact_mut(2).zip(x.chunks_exact(2)).enumerate() {
            let p = c0 / 2 + j;
            // Pairs below C/4 by row, the others by column at p % q, which is p - q for the pairs up to C/2.
            let at = if p < q {
                by_row + p
            } else if p - q < q {
                by_col + (p - q)
            } else {
                by_col + p % q
            };
            let (cos, sin) = (self.table[at * 2], self.table[at * 2 + 1]);
            let sin = if inverse { -sin } else { sin };
            yp[0] = xp[0] * cos - xp[1] * sin;
            yp[1] = xp[0] * sin + xp[1] * cos;
        }
    }

    /// The kernel features of one head's raw channels c0..c0 + d of token `tok`: f = phi(raw), r = R f.
    fn features(&self, tok: usize, c0: usize, raw: &[T], f: &mut [T], r: &mut [T]) {
        for (f, &x) in f.iter_mut().zip(raw) {
            *f = phi(x);
        }
        self.rotate(tok, c0, f, r, false);
    }
}

/// phi(x) = elu(x) + 1, evaluated as the composition does (elu, then + 1).
fn phi<T: Float>(x: T) -> T {
    if x > T::ZERO {
        x + T::ONE
    } else {
        crate::elementwise::cpu::expm1(x) + T::ONE
    }
}

fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::ZERO, |s, (&x, &y)| s + x * y)
}

/// y = x m for a row x (d) and a row-major d x d matrix m, summing over the rows of m in order.
fn row_times<T: Float>(x: &[T], m: &[T], y: &mut [T]) {
    y.fill(T::ZERO);
    for (&xi, mi) in x.iter().zip(m.chunks_exact(y.len())) {
        for (a, &mie) in y.iter_mut().zip(mi) {
            *a += xi * mie;
        }
    }
}

/// y = m x^T for a row x (d): y_i = sum_e m_ie x_e.
fn times_row<T: Float>(m: &[T], x: &[T], y: &mut [T]) {
    for (a, mi) in y.iter_mut().zip(m.chunks_exact(x.len())) {
        *a = dot(mi, x);
    }
}

/// Forward: (out (B, N, C), kmean (B, C), kv (B, heads, d, d)).
pub(super) fn forward(qk: Operand, v: Operand, table: Operand, dims: Dims) -> Result<(Storage, Storage, Storage)> {
    fn run<T: Float>(qk: &[T], v: &[T], table: &[T], dims: Dims) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Dims { batch, tokens: n, channels: c, heads, d, eps, .. } = dims;
        let ang = Angles::new(table, dims);
        let inv_n = T::from_f64(1.0 / n as f64);
        // Pass 1, per (batch, head): kmean = (1/N) sum k, kv = (1/N) sum k~^T v, summed in token order.
        let per_head: Vec<(Vec<T>, Vec<T>)> = (0..batch * heads)
            .into_par_iter()
            .map(|bh| {
                let (b, c0) = (bh / heads, bh % heads * d);
                let (mut ksum, mut kv) = (vec![T::ZERO; d], vec![T::ZERO; d * d]);
                let (mut k, mut kr) = (vec![T::ZERO; d], vec![T::ZERO; d]);
                for tok in 0..n {
                    let row = b * n + tok;
                    ang.features(tok, c0, &qk[row * 2 * c + c + c0..][..d], &mut k, &mut kr);
                    let vr = &v[row * c + c0..][..d];
                    for (s, &x) in ksum.iter_mut().zip(&k) {
                        *s += x;
                    }
                    for (kv_i, &ki) in kv.chunks_exact_mut(d).zip(&kr) {
                        for (a, &ve) in kv_i.iter_mut().zip(vr) {
                            *a += ki * ve;
                        }
                    }
                }
                ksum.iter_mut().chain(kv.iter_mut()).for_each(|s| *s *= inv_n);
                (ksum, kv)
            })
            .collect();
        // (B, heads, d) is (B, C), and (B, heads, d, d) the heads' matrices one after another.
        let kmean: Vec<T> = per_head.iter().flat_map(|(m, _)| m.iter().copied()).collect();
        let kv: Vec<T> = per_head.iter().flat_map(|(_, m)| m.iter().copied()).collect();

        // Pass 2, per token row: out = z (q~ kv) head by head.
        let mut out = engine::cpu_buffer(batch * n * c); // every element is written
        out.par_chunks_mut(c).enumerate().with_min_len(16).for_each_init(
            || (vec![T::ZERO; d], vec![T::ZERO; d]),
            |(q, qr), (row, o)| {
                let (b, tok) = (row / n, row % n);
                for h in 0..heads {
                    let c0 = h * d;
                    ang.features(tok, c0, &qk[row * 2 * c + c0..][..d], q, qr);
                    let z = T::ONE / (dot(q, &kmean[b * c + c0..][..d]) + T::from_f64(eps));
                    let oh = &mut o[c0..c0 + d];
                    row_times(qr, &kv[(b * heads + h) * d * d..][..d * d], oh);
                    oh.iter_mut().for_each(|x| *x *= z);
                }
            },
        );
        (out, kmean, kv)
    }
    with_dtype!(qk.0.dtype(), |T| {
        let (out, kmean, kv) = run::<T>(
            contiguous_slice(OP, qk.0, qk.1)?,
            contiguous_slice(OP, v.0, v.1)?,
            contiguous_slice(OP, table.0, table.1)?,
            dims,
        );
        let s = |x: Vec<T>| Storage::Cpu(T::into_storage(x));
        Ok((s(out), s(kmean), s(kv)))
    })
}

/// Backward: (dqk (B, N, 2C), dv (B, N, C)) for the cotangent g (B, N, C).
pub(super) fn backward(
    qk: Operand,
    v: Operand,
    table: Operand,
    kmean: Operand,
    kv: Operand,
    g: Operand,
    dims: Dims,
) -> Result<(Storage, Storage)> {
    struct Saved<'a, T> {
        qk: &'a [T],
        v: &'a [T],
        kmean: &'a [T],
        kv: &'a [T],
        g: &'a [T],
    }
    fn run<T: Float>(x: Saved<T>, table: &[T], dims: Dims) -> (Vec<T>, Vec<T>) {
        let Dims { batch, tokens: n, channels: c, heads, d, eps, .. } = dims;
        let ang = Angles::new(table, dims);
        let (inv_n, eps) = (T::from_f64(1.0 / n as f64), T::from_f64(eps));
        // Pass 1, per (batch, head): ds_n = -z_n^2 (G_n . o_n), dkv = sum q~^T (z G), dkmean = sum ds q.
        let per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..batch * heads)
            .into_par_iter()
            .map(|bh| {
                let (b, c0) = (bh / heads, bh % heads * d);
                let (kvh, kmh) = (&x.kv[bh * d * d..][..d * d], &x.kmean[b * c + c0..][..d]);
                let (mut dkv, mut dkm, mut ds) = (vec![T::ZERO; d * d], vec![T::ZERO; d], vec![T::ZERO; n]);
                let (mut q, mut qr, mut o, mut dout) =
                    (vec![T::ZERO; d], vec![T::ZERO; d], vec![T::ZERO; d], vec![T::ZERO; d]);
                for (tok, ds) in ds.iter_mut().enumerate() {
                    let row = b * n + tok;
                    ang.features(tok, c0, &x.qk[row * 2 * c + c0..][..d], &mut q, &mut qr);
                    let gr = &x.g[row * c + c0..][..d];
                    let z = T::ONE / (dot(&q, kmh) + eps);
                    row_times(&qr, kvh, &mut o);
                    *ds = -(dot(gr, &o) * z * z);
                    for (a, &ge) in dout.iter_mut().zip(gr) {
                        *a = ge * z;
                    }
                    for (dkv_i, &qi) in dkv.chunks_exact_mut(d).zip(&qr) {
                        for (a, &de) in dkv_i.iter_mut().zip(&dout) {
                            *a += qi * de;
                        }
                    }
                    for (a, &qj) in dkm.iter_mut().zip(&q) {
                        *a += *ds * qj;
                    }
                }
                (dkv, dkm, ds)
            })
            .collect();

        // Pass 2, per token row: dqk and dv head by head.
        let (mut dqk, mut dv) = (engine::cpu_buffer(batch * n * 2 * c), engine::cpu_buffer(batch * n * c)); // written
        dqk.par_chunks_mut(2 * c).zip(dv.par_chunks_mut(c)).enumerate().with_min_len(16).for_each_init(
            || [0; 4].map(|_| vec![T::ZERO; d]),
            |[f, r, rot, back], (row, (dqk_row, dv_row))| {
                let (b, tok) = (row / n, row % n);
                for (h, (dkv, dkm, ds)) in per_head[b * heads..][..heads].iter().enumerate() {
                    let c0 = h * d;
                    let (kvh, kmh) = (&x.kv[(b * heads + h) * d * d..][..d * d], &x.kmean[b * c + c0..][..d]);
                    let gr = &x.g[row * c + c0..][..d];
                    // q: dq = R^T (z G kv^T) + ds kmean, times phi'.
                    ang.features(tok, c0, &x.qk[row * 2 * c + c0..][..d], f, r);
                    let z = T::ONE / (dot(f, kmh) + eps);
                    times_row(kvh, gr, rot);
                    rot.iter_mut().for_each(|a| *a *= z);
                    ang.rotate(tok, c0, rot, back, true);
                    for (((out, &dq), &km), &qj) in
                        dqk_row[c0..c0 + d].iter_mut().zip(back.iter()).zip(kmh).zip(f.iter())
                    {
                        *out = (dq + ds[tok] * km) * qj.min(T::ONE);
                    }
                    // k: dk = R^T ((1/N) v dkv^T) + dkmean / N, times phi'; v: dv = (1/N) k~ dkv.
                    ang.features(tok, c0, &x.qk[row * 2 * c + c + c0..][..d], f, r);
                    let vr = &x.v[row * c + c0..][..d];
                    times_row(dkv, vr, rot);
                    rot.iter_mut().for_each(|a| *a *= inv_n);
                    ang.rotate(tok, c0, rot, back, true);
                    let dk_row = &mut dqk_row[c + c0..c + c0 + d];
                    for (((out, &dk), &dm), &kj) in dk_row.iter_mut().zip(back.iter()).zip(dkm).zip(f.iter()) {
                        *out = (dk + dm * inv_n) * kj.min(T::ONE);
                    }
                    let dvh = &mut dv_row[c0..c0 + d];
                    row_times(r, dkv, dvh);
                    dvh.iter_mut().for_each(|a| *a *= inv_n);
                }
            },
        );
        (dqk, dv)
    }
    with_dtype!(qk.0.dtype(), |T| {
        let x = Saved::<T> {
            qk: contiguous_slice(OP, qk.0, qk.1)?,
            v: contiguous_slice(OP, v.0, v.1)?,
            kmean: contiguous_slice(OP, kmean.0, kmean.1)?,
            kv: contiguous_slice(OP, kv.0, kv.1)?,
            g: contiguous_slice(OP, g.0, g.1)?,
        };
        let (dqk, dv) = run::<T>(x, contiguous_slice(OP, table.0, table.1)?, dims);
        Ok((Storage::Cpu(T::into_storage(dqk)), Storage::Cpu(T::into_storage(dv))))
    })
}
