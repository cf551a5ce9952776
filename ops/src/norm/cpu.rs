//! CPU kernels of the normalisation family. layer_norm works row by row (rows in parallel, the weight and bias
//! gradients summed per chunk of rows); batch_norm2d reduces per channel, then maps (sample, channel) planes.

use engine::{CpuStorage, Error, Float, Layout, Result, Storage};
use rayon::prelude::*;

use super::Stats;
use crate::util::{channels_last_slice, contiguous_slice, gathered, with_dtype, Grads, Needs, Operand};

/// Fewest elements one parallel task gets: below this, splitting costs more than it saves.
const TASK_MIN: usize = 1 << 12;

/// Mean and biased variance of `v` in f64, in two passes (a one-pass sum of squares cancels badly when
/// |mean| >> std).
fn moments<T: Float>(v: impl Iterator<Item = T> + Clone) -> (f64, f64) {
    let (mut n, mut sum) = (0usize, 0.0);
    for x in v.clone() {
        sum += x.to_f64();
        n += 1;
    }
    let mean = sum / n.max(1) as f64;
    let var = v.map(|x| (x.to_f64() - mean).powi(2)).sum::<f64>() / n.max(1) as f64;
    (mean, var)
}

fn rstd(var: f64, eps: f64) -> f64 {
    1.0 / (var + eps).sqrt()
}

fn vector<T: Float>(op: &'static str, v: Option<Operand>) -> Result<Option<Vec<T>>> {
    v.map(|(s, l)| gathered::<T>(op, s, l)).transpose()
}

/// Forward: (y, mean, rstd) with one mean and rstd per row of the last dim.
pub(super) fn layer_norm(
    x: Operand,
    w: Option<Operand>,
    b: Option<Operand>,
    eps: f64,
) -> Result<(Storage, Storage, Storage)> {
    fn run<T: Float>(x: &[T], d: usize, w: Option<Vec<T>>, b: Option<Vec<T>>, eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
        let mut y = engine::cpu_buffer(x.len()); // every row is written
        let mut stats = vec![(T::ZERO, T::ZERO); x.len() / d];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(stats.par_iter_mut()).with_min_len(TASK_MIN.div_ceil(d)).for_each(
            |((yr, xr), st)| {
                let (mean, var) = moments(xr.iter().copied());
                let (m, r) = (T::from_f64(mean), T::from_f64(rstd(var, eps)));
                for (k, (yv, &xv)) in yr.iter_mut().zip(xr).enumerate() {
                    let mut v = (xv - m) * r;
                    if let Some(w) = &w {
                        v *= w[k];
                    }
                    if let Some(b) = &b {
                        v += b[k];
                    }
                    *yv = v;
                }
                *st = (m, r);
            },
        );
        let (mean, rstd) = stats.into_iter().unzip();
        (y, mean, rstd)
    }
    const OP: &str = "layer_norm";
    let d = x.1.shape().last().copied().unwrap_or(1).max(1);
    with_dtype!(x.0.dtype(), |T| {
        let (y, mean, rstd) = run::<T>(contiguous_slice(OP, x.0, x.1)?, d, vector(OP, w)?, vector(OP, b)?, eps);
        let s = |v: Vec<T>| Storage::Cpu(T::into_storage(v));
        Ok((s(y), s(mean), s(rstd)))
    })
}

pub(super) fn layer_norm_backward(
    x: Operand,
    w: Option<Operand>,
    mean: Operand,
    rstd: Operand,
    g: Operand,
    needs: Needs,
) -> Result<Grads<Storage>> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Float>(
        x: &[T],
        d: usize,
        w: Option<Vec<T>>,
        mean: &[T],
        rstd: &[T],
        g: &[T],
        needs: Needs,
    ) -> Grads<Vec<T>> {
        let rows = mean.len();
        let chunk = rows.div_ceil(rayon::current_num_threads() * 4).max(TASK_MIN.div_ceil(d)).max(1);
        let chunks = rows.div_ceil(chunk);
        // Every row of dx is written.
        let mut dx = engine::cpu_buffer(if needs.x { x.len() } else { 0 });
        // One dx slice per chunk of rows, or none when x needs no gradient.
        let dx_chunks: Vec<Option<&mut [T]>> =
            if needs.x { dx.chunks_mut(chunk * d).map(Some).collect() } else { (0..chunks).map(|_| None).collect() };
        let sums = needs.w || needs.bias;
        // Per chunk: the partial sums over its rows of g xhat (dw) and g (db), in f64.
        let partials: Vec<(Vec<f64>, Vec<f64>)> = dx_chunks
            .into_par_iter()
            .enumerate()
            .map(|(ci, mut dxc)| {
                let (mut dw, mut db) = if sums { (vec![0.0; d], vec![0.0; d]) } else { (Vec::new(), Vec::new()) };
                let r0 = ci * chunk;
                for r in r0..(r0 + chunk).min(rows) {
                    let (xr, gr, m, rs) = (&x[r * d..][..d], &g[r * d..][..d], mean[r], rstd[r]);
                    let xhat = |k: usize| (xr[k] - m) * rs;
                    if sums {
                        for k in 0..d {
                            dw[k] += (gr[k] * xhat(k)).to_f64();
                            db[k] += gr[k].to_f64();
                        }
                    }
                    let Some(dxc) = dxc.as_deref_mut() else { continue };
                    let gy = |k: usize| w.as_ref().map_or(gr[k], |w| gr[k] * w[k]);
                    let (mut s_gy, mut s_gyx) = (0.0, 0.0);
                    for k in 0..d {
                        s_gy += gy(k).to_f64();
                        s_gyx += (gy(k) * xhat(k)).to_f64();
                    }
                    let (a, b) = (T::from_f64(s_gy / d as f64), T::from_f64(s_gyx / d as f64));
                    for (k, v) in dxc[(r - r0) * d..][..d].iter_mut().enumerate() {
                        *v = rs * (gy(k) - a - xhat(k) * b);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0.0; d], vec![0.0; d]);
        for (pw, pb) in &partials {
            for (acc, v) in dw.iter_mut().zip(pw).chain(db.iter_mut().zip(pb)) {
                *acc += v;
            }
        }
        let to_t = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
        Grads { x: needs.x.then_some(dx), w: needs.w.then(|| to_t(dw)), bias: needs.bias.then(|| to_t(db)) }
    }
    const OP: &str = "layer_norm_backward";
    let d = x.1.shape().last().copied().unwrap_or(1).max(1);
    with_dtype!(x.0.dtype(), |T| {
        let grads = run::<T>(
            contiguous_slice(OP, x.0, x.1)?,
            d,
            vector(OP, w)?,
            contiguous_slice(OP, mean.0, mean.1)?,
            contiguous_slice(OP, rstd.0, rstd.1)?,
            contiguous_slice(OP, g.0, g.1)?,
            needs,
        );
        Ok(grads.into_storage())
    })
}

/// (N, C, H W) of an NCHW layout.
fn nchw(layout: &Layout) -> (usize, usize, usize) {
    match layout.shape() {
        &[n, c, h, w] => (n, c, h * w),
        _ => (0, 0, 0),
    }
}

/// What the batch norm forward leaves: the output, and per channel the statistics it normalised with and the
/// (biased) variance behind the rstd, for the running update.
pub(super) struct BatchNormOut {
    pub y: Storage,
    pub mean: Storage,
    pub var: Storage,
    pub rstd: Storage,
}

/// Forward with the batch statistics, or with `fixed` (running mean, running var) when given.
pub(super) fn batch_norm(
    x: Operand,
    w: Option<Operand>,
    b: Option<Operand>,
    fixed: Option<(Operand, Operand)>,
    eps: f64,
) -> Result<BatchNormOut> {
    #[allow(clippy::type_complexity)]
    fn run<T: Float>(
        x: &[T],
        (n, c, hw): (usize, usize, usize),
        w: Option<Vec<T>>,
        b: Option<Vec<T>>,
        fixed: Option<(Vec<T>, Vec<T>)>,
        eps: f64,
    ) -> (Vec<T>, Vec<T>, Vec<T>, Vec<T>) {
        let (mean, var): (Vec<f64>, Vec<f64>) = match fixed {
            Some((m, v)) => (m.iter().map(|v| v.to_f64()).collect(), v.iter().map(|v| v.to_f64()).collect()),
            None => (0..c)
                .into_par_iter()
                .map(|ch| moments((0..n).flat_map(|s| x[(s * c + ch) * hw..][..hw].iter().copied())))
                .unzip(),
        };
        let rstd: Vec<f64> = var.iter().map(|&v| rstd(v, eps)).collect();
        // Per channel: y = (x - mean) scale + shift.
        let scale: Vec<T> =
            (0..c).map(|ch| T::from_f64(rstd[ch] * w.as_ref().map_or(1.0, |w| w[ch].to_f64()))).collect();
        let shift: Vec<T> = (0..c).map(|ch| b.as_ref().map_or(T::ZERO, |b| b[ch])).collect();
        let mean_t: Vec<T> = mean.iter().map(|&m| T::from_f64(m)).collect();
        let mut y = engine::cpu_buffer(x.len()); // every plane is written
        if hw > 0 {
            y.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().with_min_len(TASK_MIN.div_ceil(hw)).for_each(
                |(nc, (yp, xp))| {
                    let ch = nc % c;
                    for (yv, &xv) in yp.iter_mut().zip(xp) {
                        *yv = (xv - mean_t[ch]) * scale[ch] + shift[ch];
                    }
                },
            );
        }
        let t = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
        (y, mean_t, t(var), t(rstd))
    }
    const OP: &str = "batch_norm2d";
    with_dtype!(x.0.dtype(), |T| {
        let fixed = match fixed {
            Some((m, v)) => Some((gathered::<T>(OP, m.0, m.1)?, gathered::<T>(OP, v.0, v.1)?)),
            None => None,
        };
        let (y, mean, var, rstd) =
            run::<T>(contiguous_slice(OP, x.0, x.1)?, nchw(x.1), vector(OP, w)?, vector(OP, b)?, fixed, eps);
        let s = |v: Vec<T>| Storage::Cpu(T::into_storage(v));
        Ok(BatchNormOut { y: s(y), mean: s(mean), var: s(var), rstd: s(rstd) })
    })
}

pub(super) fn batch_norm_backward(
    x: Operand,
    w: Option<Operand>,
    mean: Operand,
    rstd: Operand,
    g: Operand,
    stats: Stats,
    needs: Needs,
) -> Result<Grads<Storage>> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Float>(
        x: &[T],
        (n, c, hw): (usize, usize, usize),
        w: Option<Vec<T>>,
        mean: &[T],
        rstd: &[T],
        g: &[T],
        stats: Stats,
        needs: Needs,
    ) -> Grads<Vec<T>> {
        // Pass 1, per channel: sum g and sum g xhat (f64), which dw, db and the batch-statistics dx need.
        let plane = |s: usize, ch: usize| (s * c + ch) * hw;
        let need_sums = needs.w || needs.bias || (needs.x && stats == Stats::Batch);
        let sums: Vec<(f64, f64)> = if need_sums {
            (0..c)
                .into_par_iter()
                .map(|ch| {
                    let (mut sg, mut sgx) = (0.0, 0.0);
                    for s in 0..n {
                        let (xp, gp) = (&x[plane(s, ch)..][..hw], &g[plane(s, ch)..][..hw]);
                        for (&xv, &gv) in xp.iter().zip(gp) {
                            sg += gv.to_f64();
                            sgx += (gv * (xv - mean[ch]) * rstd[ch]).to_f64();
                        }
                    }
                    (sg, sgx)
                })
                .collect()
        } else {
            Vec::new()
        };
        // Pass 2, per (sample, channel) plane: dx = rstd w (g - [mean(g) + xhat mean(g xhat)] in training).
        let dx = needs.x.then(|| {
            let mut dx = engine::cpu_buffer(x.len()); // every plane is written
            let m = (n * hw) as f64;
            if hw > 0 {
                dx.par_chunks_mut(hw).enumerate().with_min_len(TASK_MIN.div_ceil(hw)).for_each(|(nc, dxp)| {
                    let ch = nc % c;
                    let k = rstd[ch] * w.as_ref().map_or(T::ONE, |w| w[ch]);
                    let (xp, gp) = (&x[nc * hw..][..hw], &g[nc * hw..][..hw]);
                    match stats {
                        Stats::Batch => {
                            let (a, b) = (T::from_f64(sums[ch].0 / m), T::from_f64(sums[ch].1 / m));
                            for ((d, &xv), &gv) in dxp.iter_mut().zip(xp).zip(gp) {
                                *d = k * (gv - a - (xv - mean[ch]) * rstd[ch] * b);
                            }
                        }
                        Stats::Running => {
                            for (d, &gv) in dxp.iter_mut().zip(gp) {
                                *d = k * gv;
                            }
                        }
                    }
                });
            }
            dx
        });
        Grads {
            x: dx,
            w: needs.w.then(|| sums.iter().map(|s| T::from_f64(s.1)).collect()),
            bias: needs.bias.then(|| sums.iter().map(|s| T::from_f64(s.0)).collect()),
        }
    }
    const OP: &str = "batch_norm2d_backward";
    with_dtype!(x.0.dtype(), |T| {
        let grads = run::<T>(
            contiguous_slice(OP, x.0, x.1)?,
            nchw(x.1),
            vector(OP, w)?,
            contiguous_slice(OP, mean.0, mean.1)?,
            contiguous_slice(OP, rstd.0, rstd.1)?,
            contiguous_slice(OP, g.0, g.1)?,
            stats,
            needs,
        );
        Ok(grads.into_storage())
    })
}

/// running[i] = (1 - momentum) running[i] + momentum scale stat[i], in place through `layout`, in f64.
pub(super) fn blend_into(
    op: &'static str,
    running: &mut CpuStorage,
    layout: &Layout,
    stat: &CpuStorage,
    momentum: f64,
    scale: f64,
) -> Result<()> {
    with_dtype!(running.dtype(), |T| {
        let stat = contiguous_slice::<T>(op, stat, &Layout::contiguous(&[layout.numel()]))?;
        let dtype = running.dtype();
        let r = T::slice_mut(running).ok_or(Error::DTypeMismatch { op, lhs: T::DTYPE, rhs: dtype })?;
        if layout.storage_span().end > r.len() {
            return Err(Error::invalid(op, "running buffer view exceeds its storage", layout.shape()));
        }
        for (&s, off) in stat.iter().zip(layout.offsets()) {
            r[off] = T::from_f64((1.0 - momentum) * r[off].to_f64() + momentum * scale * s.to_f64());
        }
        Ok(())
    })
}

/// Rows (pixels) per task of the channels-last batch norm: fixed, so that the f64 partial sums, and so the
/// statistics, do not depend on the thread count.
const NHWC_ROWS_PER_TASK: usize = 1024;

/// Per channel, the sum over the rows of a (rows, C) block of f(row, c), in f64: partial sums per fixed task
/// of rows, added in task order.
fn column_sums(rows: usize, c: usize, f: impl Fn(usize, usize) -> f64 + Sync) -> Vec<f64> {
    let partials: Vec<Vec<f64>> = (0..rows.div_ceil(NHWC_ROWS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let mut acc = vec![0.0; c];
            for r in t * NHWC_ROWS_PER_TASK..((t + 1) * NHWC_ROWS_PER_TASK).min(rows) {
                for (ch, a) in acc.iter_mut().enumerate() {
                    *a += f(r, ch);
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0.0; c];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Two [`column_sums`] at once, of the pairs f gives: each sum adds its terms in the order `column_sums`
/// does (rows in order within a task, task partials in task order), so each is bitwise that function's.
fn column_sum_pairs(rows: usize, c: usize, f: impl Fn(usize, usize) -> (f64, f64) + Sync) -> (Vec<f64>, Vec<f64>) {
    let partials: Vec<(Vec<f64>, Vec<f64>)> = (0..rows.div_ceil(NHWC_ROWS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
            for r in t * NHWC_ROWS_PER_TASK..((t + 1) * NHWC_ROWS_PER_TASK).min(rows) {
                for (ch, (a, b)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                    let (u, v) = f(r, ch);
                    *a += u;
                    *b += v;
                }
            }
            (a, b)
        })
        .collect();
    let (mut ta, mut tb) = (vec![0.0; c], vec![0.0; c]);
    for (pa, pb) in &partials {
        for (t, v) in ta.iter_mut().zip(pa).chain(tb.iter_mut().zip(pb)) {
            *t += v;
        }
    }
    (ta, tb)
}

/// `batch_norm` for a channels-last x (memory (N, H, W, C)): the same statistics and formulas over the rows
/// of a (N H W, C) block; y comes out channels-last.
pub(super) fn batch_norm_nhwc(
    x: Operand,
    w: Option<Operand>,
    b: Option<Operand>,
    fixed: Option<(Operand, Operand)>,
    eps: f64,
) -> Result<BatchNormOut> {
    #[allow(clippy::type_complexity)]
    fn run<T: Float>(
        x: &[T],
        c: usize,
        w: Option<Vec<T>>,
        b: Option<Vec<T>>,
        fixed: Option<(Vec<T>, Vec<T>)>,
        eps: f64,
    ) -> (Vec<T>, Vec<T>, Vec<T>, Vec<T>) {
        let rows = x.len() / c.max(1);
        let (mean, var): (Vec<f64>, Vec<f64>) = match fixed {
            Some((m, v)) => (m.iter().map(|v| v.to_f64()).collect(), v.iter().map(|v| v.to_f64()).collect()),
            None => {
                let n = rows.max(1) as f64;
                let mean: Vec<f64> =
                    column_sums(rows, c, |r, ch| x[r * c + ch].to_f64()).iter().map(|s| s / n).collect();
                let var = column_sums(rows, c, |r, ch| (x[r * c + ch].to_f64() - mean[ch]).powi(2))
                    .iter()
                    .map(|s| s / n)
                    .collect();
                (mean, var)
            }
        };
        let rstd: Vec<f64> = var.iter().map(|&v| rstd(v, eps)).collect();
        let scale: Vec<T> =
            (0..c).map(|ch| T::from_f64(rstd[ch] * w.as_ref().map_or(1.0, |w| w[ch].to_f64()))).collect();
        let shift: Vec<T> = (0..c).map(|ch| b.as_ref().map_or(T::ZERO, |b| b[ch])).collect();
        let mean_t: Vec<T> = mean.iter().map(|&m| T::from_f64(m)).collect();
        let mut y = engine::cpu_buffer(x.len()); // every row is written
        if c > 0 {
            y.par_chunks_mut(c * NHWC_ROWS_PER_TASK).zip(x.par_chunks(c * NHWC_ROWS_PER_TASK)).for_each(|(ys, xs)| {
                for (yr, xr) in ys.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                    for ((((yv, &xv), &m), &s), &sh) in yr.iter_mut().zip(xr).zip(&mean_t).zip(&scale).zip(&shift) {
                        *yv = (xv - m) * s + sh;
                    }
                }
            });
        }
        let t = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
        (y, mean_t, t(var), t(rstd))
    }
    const OP: &str = "batch_norm2d";
    let c = x.1.shape()[1];
    with_dtype!(x.0.dtype(), |T| {
        let fixed = match fixed {
            Some((m, v)) => Some((gathered::<T>(OP, m.0, m.1)?, gathered::<T>(OP, v.0, v.1)?)),
            None => None,
        };
        let (y, mean, var, rstd) =
            run::<T>(channels_last_slice(OP, x.0, x.1)?, c, vector(OP, w)?, vector(OP, b)?, fixed, eps);
        let s = |v: Vec<T>| Storage::Cpu(T::into_storage(v));
        Ok(BatchNormOut { y: s(y), mean: s(mean), var: s(var), rstd: s(rstd) })
    })
}

/// `batch_norm_backward` for channels-last x and g; dx comes out channels-last.
pub(super) fn batch_norm_nhwc_backward(
    x: Operand,
    w: Option<Operand>,
    mean: Operand,
    rstd: Operand,
    g: Operand,
    stats: Stats,
    needs: Needs,
) -> Result<Grads<Storage>> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Float>(
        x: &[T],
        c: usize,
        w: Option<Vec<T>>,
        mean: &[T],
        rstd: &[T],
        g: &[T],
        stats: Stats,
        needs: Needs,
    ) -> Grads<Vec<T>> {
        let rows = x.len() / c.max(1);
        let need_sums = needs.w || needs.bias || (needs.x && stats == Stats::Batch);
        let (sg, sgx) = if need_sums {
            // Both sums in one pass over g and x, each accumulated as its own pass would.
            column_sum_pairs(rows, c, |r, ch| {
                let gv = g[r * c + ch];
                (gv.to_f64(), (gv * (x[r * c + ch] - mean[ch]) * rstd[ch]).to_f64())
            })
        } else {
            (Vec::new(), Vec::new())
        };
        let dx = needs.x.then(|| {
            let mut dx = engine::cpu_buffer(x.len()); // every row is written
            let m = rows as f64;
            let k: Vec<T> = (0..c).map(|ch| rstd[ch] * w.as_ref().map_or(T::ONE, |w| w[ch])).collect();
            let (a, b): (Vec<T>, Vec<T>) = match stats {
                Stats::Batch => (0..c).map(|ch| (T::from_f64(sg[ch] / m), T::from_f64(sgx[ch] / m))).unzip(),
                Stats::Running => (Vec::new(), Vec::new()),
            };
            if c > 0 {
                let block = c * NHWC_ROWS_PER_TASK;
                dx.par_chunks_mut(block).enumerate().for_each(|(t, ds)| {
                    for (i, dr) in ds.chunks_exact_mut(c).enumerate() {
                        let r = t * NHWC_ROWS_PER_TASK + i;
                        let (xr, gr) = (&x[r * c..][..c], &g[r * c..][..c]);
                        match stats {
                            Stats::Batch => {
                                for ch in 0..c {
                                    dr[ch] = k[ch] * (gr[ch] - a[ch] - (xr[ch] - mean[ch]) * rstd[ch] * b[ch]);
                                }
                            }
                            Stats::Running => {
                                for ch in 0..c {
                                    dr[ch] = k[ch] * gr[ch];
                                }
                            }
                        }
                    }
                });
            }
            dx
        });
        Grads {
            x: dx,
            w: needs.w.then(|| sgx.iter().map(|&s| T::from_f64(s)).collect()),
            bias: needs.bias.then(|| sg.iter().map(|&s| T::from_f64(s)).collect()),
        }
    }
    const OP: &str = "batch_norm2d_backward";
    let c = x.1.shape()[1];
    with_dtype!(x.0.dtype(), |T| {
        let grads = run::<T>(
            channels_last_slice(OP, x.0, x.1)?,
            c,
            vector(OP, w)?,
            contiguous_slice(OP, mean.0, mean.1)?,
            contiguous_slice(OP, rstd.0, rstd.1)?,
            channels_last_slice(OP, g.0, g.1)?,
            stats,
            needs,
        );
        Ok(grads.into_storage())
    })
}
