//! CPU backward of the scan: the reverse-time recurrence of the table in mod.rs, chunk by chunk, recomputing
//! each chunk's states from the state saved at its entry.
//!
//! Work is split into tasks of (batch b, a group of consecutive channels). A task owns its rows of du, ddelta
//! and dz outright, and accumulates the reduced gradients into buffers of its own: dB and dC of batch b
//! (summed over its channels, time-major (L, S)) and dA, dD, ddelta_bias of its channels (summed over time).
//! The buffers are then summed in a fixed order (groups in channel order for dB and dC, batches in order for
//! the rest). The channel groups depend only on C, never on the thread count, so the result is the same bits
//! on every run and every machine, and no two threads ever write one location.

use engine::{cpu_buffer, Float, Result, Storage, Tensor};
use rayon::prelude::*;

use super::cpu::{read, sigmoid, softplus_grad, time_major, Row, Slices, TASK_MIN};
use super::{Dims, Operands, ScanGrads};
use crate::util::with_dtype;

/// Channel groups per batch: enough tasks to keep a few cores busy at batch 1, few enough that the per-task
/// (L, S) buffers of dB and dC stay a small multiple of B's size.
const CHANNEL_GROUPS: usize = 16;

/// The sums one task accumulates.
struct Partial<T> {
    /// (L, S): sum over the task's channels of dL/dB[b, :, t] and dL/dC[b, :, t]
    db: Vec<T>,
    dc: Vec<T>,
    /// (channels of the task, S), and (channels of the task): summed over time
    da: Vec<T>,
    dd: Vec<T>,
    dbias: Vec<T>,
}

/// One task's rows of the per-element gradients (b C + c0 .. b C + c1, each L long, concatenated).
struct Rows<'a, T> {
    du: &'a mut [T],
    ddelta: &'a mut [T],
    dz: Option<&'a mut [T]>,
}

/// Splits `buf` into consecutive pieces of the given lengths.
fn split_lengths<T>(mut buf: &mut [T], lengths: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for n in lengths {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(n);
        out.push(head);
        buf = tail;
    }
    out
}

/// Scratch of one task: a chunk's recomputed states and decays, and the carried state cotangent.
struct Scratch<T> {
    /// (chunk, S): h[t0 + i] for i < chunk
    hs: Vec<T>,
    /// (chunk, S): exp(dt[t0 + i] A)
    decay: Vec<T>,
    /// (S): dA[t+1] gh[t+1], what flows into step t's state cotangent from step t+1
    carry: Vec<T>,
}

/// The reverse-time scan of one row, accumulating into the task's sums; `states` is the row's chunk-entry
/// states (chunks, S), `g` its output cotangent (L).
#[allow(clippy::too_many_arguments)]
fn row_backward<T: Float>(
    r: &Row<T>,
    states: &[T],
    g: &[T],
    chunk: usize,
    scratch: &mut Scratch<T>,
    (du, ddelta, mut dz): (&mut [T], &mut [T], Option<&mut [T]>),
    (db, dc, da): (&mut [T], &mut [T], &mut [T]),
) -> (T, T) {
    let (l, s) = (r.u.len(), r.a.len());
    let Scratch { hs, decay, carry } = scratch;
    carry.fill(T::ZERO);
    let (mut dd, mut dbias) = (T::ZERO, T::ZERO);
    for k in (0..l.div_ceil(chunk)).rev() {
        let (t0, len) = (k * chunk, chunk.min(l - k * chunk));
        let h0 = &states[k * s..][..s];
        // Recompute the chunk's states from its entry state (the forward's recurrence, kept per step).
        for i in 0..len {
            let t = t0 + i;
            let (_, dt) = r.dt(t);
            let x = dt * r.u[t];
            let b = &r.bt[t * s..][..s];
            for n in 0..s {
                let prev = if i == 0 { h0[n] } else { hs[(i - 1) * s + n] };
                let e = (dt * r.a[n]).exp();
                decay[i * s + n] = e;
                hs[i * s + n] = e * prev + b[n] * x;
            }
        }
        // Walk the chunk backwards in time.
        for i in (0..len).rev() {
            let t = t0 + i;
            let (raw, dt) = r.dt(t);
            let u = r.u[t];
            let (b, c) = (&r.bt[t * s..][..s], &r.ct[t * s..][..s]);
            let h = &hs[i * s..][..s];
            // The gate's gradient needs y, recomputed from the state (dividing out by silu(z) is unstable near 0).
            let gy = match (r.z, dz.as_deref_mut()) {
                (Some(z), Some(dz)) => {
                    let y = c.iter().zip(h).fold(T::ZERO, |acc, (&c, &h)| acc + c * h) + r.d * u;
                    let sg = sigmoid(z[t]);
                    dz[t] = g[t] * y * sg * (T::ONE + z[t] * (T::ONE - sg));
                    g[t] * z[t] * sg
                }
                _ => g[t],
            };
            dd += gy * u;
            let (mut du_t, mut ddt) = (r.d * gy, T::ZERO);
            let (db, dc) = (&mut db[t * s..][..s], &mut dc[t * s..][..s]);
            for n in 0..s {
                let prev = if i == 0 { h0[n] } else { hs[(i - 1) * s + n] };
                let e = decay[i * s + n];
                // gh[t] = C[t] gy[t] + dA[t+1] gh[t+1]
                let gh = c[n] * gy + carry[n];
                let gh_dt = gh * dt;
                dc[n] += gy * h[n];
                db[n] += gh_dt * u;
                du_t += gh_dt * b[n];
                ddt += gh * (r.a[n] * e * prev + b[n] * u);
                da[n] += gh_dt * e * prev;
                carry[n] = e * gh;
            }
            du[t] = du_t;
            let gd = if r.softplus { ddt * softplus_grad(raw) } else { ddt };
            ddelta[t] = gd;
            dbias += gd;
        }
    }
    (dd, dbias)
}

/// dL/d(every input) for the output cotangent `g` (B, C, L), from the saved chunk-entry states.
pub(super) fn backward(
    x: &Operands,
    states: &Tensor,
    g: &Tensor,
    dims: Dims,
    delta_softplus: bool,
    chunk: usize,
) -> Result<ScanGrads<Storage>> {
    fn run<T: Float>(x: Slices<T>, states: &[T], g: &[T], dims: Dims, sp: bool, chunk: usize) -> ScanGrads<Vec<T>> {
        let Dims { batch, channels, length: l, states: s } = dims;
        if batch * channels * l == 0 {
            // Nothing flows back: every gradient is zero (dB, dC and dA may still have elements).
            let z = |n: usize| vec![T::ZERO; n];
            let (bcl, bsl) = (batch * channels * l, batch * s * l);
            return ScanGrads {
                u: z(bcl),
                delta: z(bcl),
                a: z(channels * s),
                b: z(bsl),
                c: z(bsl),
                d: x.d.map(|_| z(channels)),
                z: x.z.map(|_| z(bcl)),
                delta_bias: x.delta_bias.map(|_| z(channels)),
            };
        }
        // Channels per task (C >= 1 here): at most CHANNEL_GROUPS groups.
        let per = channels.div_ceil(CHANNEL_GROUPS);
        let groups = channels.div_ceil(per);
        let bcl = batch * channels * l;
        let (mut du, mut ddelta) = (cpu_buffer::<T>(bcl), cpu_buffer::<T>(bcl));
        let mut dz = x.z.map(|_| cpu_buffer::<T>(bcl));
        let (bt, ct) = (time_major(x.b, dims), time_major(x.c, dims));
        let tasks = batch * groups;
        let group_len = |task: usize| per.min(channels - task % groups * per);
        let lengths = || (0..tasks).map(|k| group_len(k) * l);
        let du_rows = split_lengths(&mut du, lengths());
        let dd_rows = split_lengths(&mut ddelta, lengths());
        let dz_rows: Vec<Option<&mut [T]>> = match dz.as_mut() {
            Some(dz) => split_lengths(dz, lengths()).into_iter().map(Some).collect(),
            None => (0..tasks).map(|_| None).collect(),
        };
        let per_task: Vec<Rows<T>> =
            du_rows.into_iter().zip(dd_rows).zip(dz_rows).map(|((du, ddelta), dz)| Rows { du, ddelta, dz }).collect();
        let n_chunks = dims.chunks(chunk);
        let partials: Vec<Partial<T>> = per_task
            .into_par_iter()
            .enumerate()
            .with_min_len(TASK_MIN.div_ceil((per * l * s).max(1)))
            .map(|(task, out)| {
                let (b, c0, n) = (task / groups, task % groups * per, group_len(task));
                let mut p = Partial {
                    db: vec![T::ZERO; l * s],
                    dc: vec![T::ZERO; l * s],
                    da: vec![T::ZERO; n * s],
                    dd: vec![T::ZERO; n],
                    dbias: vec![T::ZERO; n],
                };
                let mut scratch = Scratch {
                    hs: vec![T::ZERO; chunk.min(l) * s],
                    decay: vec![T::ZERO; chunk.min(l) * s],
                    carry: vec![T::ZERO; s],
                };
                let Rows { du, ddelta, mut dz } = out;
                for j in 0..n {
                    let row = b * channels + c0 + j;
                    let r = Row::new(&x, dims, row, &bt, &ct, sp);
                    let row_states = &states[row * n_chunks * s..][..n_chunks * s];
                    let (dd, dbias) = row_backward(
                        &r,
                        row_states,
                        &g[row * l..][..l],
                        chunk,
                        &mut scratch,
                        (
                            &mut du[j * l..][..l],
                            &mut ddelta[j * l..][..l],
                            dz.as_deref_mut().map(|z| &mut z[j * l..][..l]),
                        ),
                        (&mut p.db, &mut p.dc, &mut p.da[j * s..][..s]),
                    );
                    p.dd[j] = dd;
                    p.dbias[j] = dbias;
                }
                p
            })
            .collect();

        // dB, dC (B, S, L): per batch, the groups' (L, S) sums in channel order, transposed back.
        let mut db = vec![T::ZERO; batch * s * l];
        let mut dc = vec![T::ZERO; batch * s * l];
        db.par_chunks_mut(s * l).zip(dc.par_chunks_mut(s * l)).enumerate().for_each(|(b, (db, dc))| {
            for p in &partials[b * groups..(b + 1) * groups] {
                for t in 0..l {
                    for n in 0..s {
                        db[n * l + t] += p.db[t * s + n];
                        dc[n * l + t] += p.dc[t * s + n];
                    }
                }
            }
        });
        // dA (C, S), dD and ddelta_bias (C): each channel's sums over the batches, in batch order.
        let (mut da, mut dd, mut dbias) =
            (vec![T::ZERO; channels * s], vec![T::ZERO; channels], vec![T::ZERO; channels]);
        for (task, p) in partials.iter().enumerate() {
            let c0 = task % groups * per;
            for (acc, v) in da[c0 * s..].iter_mut().zip(&p.da) {
                *acc += *v;
            }
            for (j, (&v, &w)) in p.dd.iter().zip(&p.dbias).enumerate() {
                dd[c0 + j] += v;
                dbias[c0 + j] += w;
            }
        }
        ScanGrads {
            u: du,
            delta: ddelta,
            a: da,
            b: db,
            c: dc,
            d: x.d.map(|_| dd),
            z: dz,
            delta_bias: x.delta_bias.map(|_| dbias),
        }
    }
    with_dtype!(x.u.dtype(), |T| {
        let grads = read::<T, _>(x, &[states, g], |s, extra| run(s, extra[0], extra[1], dims, delta_softplus, chunk))?;
        let st = |v: Vec<T>| Storage::Cpu(T::into_storage(v));
        Ok(ScanGrads {
            u: st(grads.u),
            delta: st(grads.delta),
            a: st(grads.a),
            b: st(grads.b),
            c: st(grads.c),
            d: grads.d.map(st),
            z: grads.z.map(st),
            delta_bias: grads.delta_bias.map(st),
        })
    })
}
