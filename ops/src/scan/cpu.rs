//! CPU forward of the scan, and what the backward (backward.rs) shares with it: typed access to the operands,
//! the per-(batch, channel) row view and the scalar functions.
//!
//! Each (batch, channel) row is one sequential recurrence over time with its S states in a small buffer;
//! rows run in parallel. B and C are read time-major, (B, L, S), so that the inner loop over states walks
//! contiguous memory.

use engine::{cpu_buffer, Float, Result, Storage, Tensor};
use rayon::prelude::*;

use super::{Dims, Forward, Operands, OP};
use crate::util::{contiguous_slice, with_dtype};

/// Fewest (step x state) updates one parallel task gets: below this, splitting costs more than it saves.
pub(super) const TASK_MIN: usize = 1 << 14;

/// Above this, softplus is the identity (PyTorch's default threshold, also Mamba's kernels').
const SOFTPLUS_THRESHOLD: f64 = 20.0;

#[inline(always)]
pub(super) fn sigmoid<T: Float>(x: T) -> T {
    // Two branches so that e^(-x) never overflows.
    if x >= T::ZERO {
        T::ONE / (T::ONE + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::ONE + e)
    }
}

#[inline(always)]
pub(super) fn softplus<T: Float>(x: T) -> T {
    if x > T::from_f64(SOFTPLUS_THRESHOLD) {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// d softplus / dx of the thresholded softplus above: 1 where it is the identity.
#[inline(always)]
pub(super) fn softplus_grad<T: Float>(x: T) -> T {
    if x > T::from_f64(SOFTPLUS_THRESHOLD) {
        T::ONE
    } else {
        sigmoid(x)
    }
}

/// The operands as typed slices, in the order of [`Operands`].
pub(super) struct Slices<'a, T> {
    pub u: &'a [T],
    pub delta: &'a [T],
    pub a: &'a [T],
    pub b: &'a [T],
    pub c: &'a [T],
    pub d: Option<&'a [T]>,
    pub z: Option<&'a [T]>,
    pub delta_bias: Option<&'a [T]>,
}

/// Runs `f` on the operands' slices and on those of `extra` (the backward's saved states and cotangent),
/// holding one read guard per distinct storage meanwhile (operands may share storage, e.g. D and delta_bias
/// cut from one parameter, and a lock is not taken twice).
pub(super) fn read<T: Float, R>(x: &Operands, extra: &[&Tensor], f: impl FnOnce(Slices<T>, &[&[T]]) -> R) -> Result<R> {
    let optional = [&x.d, &x.z, &x.delta_bias];
    let all: Vec<&Tensor> = [&x.u, &x.delta, &x.a, &x.b, &x.c]
        .into_iter()
        .chain(optional.iter().filter_map(|t| t.as_ref()))
        .chain(extra.iter().copied())
        .collect();
    let mut owners: Vec<&Tensor> = Vec::new();
    let mut guard_of = Vec::with_capacity(all.len());
    for t in &all {
        match owners.iter().position(|o| o.same_storage(t)) {
            Some(i) => guard_of.push(i),
            None => {
                guard_of.push(owners.len());
                owners.push(t);
            }
        }
    }
    let guards: Vec<_> = owners.iter().map(|t| t.storage()).collect();
    let mut slices = Vec::with_capacity(all.len());
    for (t, &g) in all.iter().zip(&guard_of) {
        // An empty tensor has nothing to read (and the engine does not call its layout contiguous).
        let s = if t.numel() == 0 { &[][..] } else { contiguous_slice::<T>(OP, guards[g].as_cpu(OP)?, t.layout())? };
        slices.push(s);
    }
    let mut it = slices.iter().copied();
    let mut next = || it.next().unwrap_or(&[]);
    let (u, delta, a, b, c) = (next(), next(), next(), next(), next());
    let mut opt = |t: &Option<Tensor>| t.as_ref().map(|_| next());
    let (d, z, delta_bias) = (opt(optional[0]), opt(optional[1]), opt(optional[2]));
    let s = Slices { u, delta, a, b, c, d, z, delta_bias };
    Ok(f(s, &slices[slices.len() - extra.len()..]))
}

/// (B, S, L) -> (B, L, S): the states of one time step side by side.
pub(super) fn time_major<T: Float>(m: &[T], dims: Dims) -> Vec<T> {
    let (s, l) = (dims.states, dims.length);
    let mut out = cpu_buffer(m.len());
    if out.is_empty() {
        return out;
    }
    for (ob, mb) in out.chunks_mut(s * l).zip(m.chunks(s * l)) {
        for n in 0..s {
            for t in 0..l {
                ob[t * s + n] = mb[n * l + t];
            }
        }
    }
    out
}

/// One (batch, channel) row of the scan: its slices of the (B, C, L) operands, its parameters, and the time-major
/// B and C of its batch.
pub(super) struct Row<'a, T> {
    pub u: &'a [T],
    pub delta: &'a [T],
    pub z: Option<&'a [T]>,
    /// A[c, :] (S)
    pub a: &'a [T],
    pub d: T,
    pub bias: T,
    pub softplus: bool,
    /// (L, S) of this row's batch
    pub bt: &'a [T],
    pub ct: &'a [T],
}

impl<'a, T: Float> Row<'a, T> {
    /// Row `row` = b C + c; `bt`, `ct` are time-major (B, L, S).
    pub(super) fn new(x: &Slices<'a, T>, dims: Dims, row: usize, bt: &'a [T], ct: &'a [T], softplus: bool) -> Self {
        let Dims { channels, length: l, states: s, .. } = dims;
        let (b, c) = (row / channels, row % channels);
        let at = |v: &'a [T]| &v[row * l..][..l];
        Row {
            u: at(x.u),
            delta: at(x.delta),
            z: x.z.map(at),
            a: &x.a[c * s..][..s],
            d: x.d.map_or(T::ZERO, |d| d[c]),
            bias: x.delta_bias.map_or(T::ZERO, |v| v[c]),
            softplus,
            bt: &bt[b * l * s..][..l * s],
            ct: &ct[b * l * s..][..l * s],
        }
    }

    /// (delta + bias, dt) at step t: the pre-activation (for softplus' derivative) and the step size.
    #[inline(always)]
    pub(super) fn dt(&self, t: usize) -> (T, T) {
        let raw = self.delta[t] + self.bias;
        (raw, if self.softplus { softplus(raw) } else { raw })
    }

    /// One step of the recurrence: h = exp(dt A) h + dt B u, in place; returns sum_n C h.
    #[inline(always)]
    fn step(&self, t: usize, dt: T, h: &mut [T]) -> T {
        let s = self.a.len();
        let (b, c) = (&self.bt[t * s..][..s], &self.ct[t * s..][..s]);
        let x = dt * self.u[t];
        let mut y = T::ZERO;
        for n in 0..s {
            h[n] = (dt * self.a[n]).exp() * h[n] + b[n] * x;
            y += c[n] * h[n];
        }
        y
    }
}

/// Forward over every row: the output and the state entering each chunk of `chunk` steps.
pub(super) fn forward(x: &Operands, dims: Dims, delta_softplus: bool, chunk: usize) -> Result<Forward> {
    fn run<T: Float>(x: Slices<T>, dims: Dims, softplus: bool, chunk: usize) -> (Vec<T>, Vec<T>) {
        let Dims { batch, channels, length: l, states: s } = dims;
        let per_row = dims.chunks(chunk) * s;
        let mut out = cpu_buffer::<T>(batch * channels * l);
        let mut saved = cpu_buffer::<T>(batch * channels * per_row);
        if out.is_empty() {
            return (out, saved);
        }
        let (bt, ct) = (time_major(x.b, dims), time_major(x.c, dims));
        out.par_chunks_mut(l)
            .zip(saved.par_chunks_mut(per_row))
            .enumerate()
            .with_min_len(TASK_MIN.div_ceil(l * s))
            .for_each(|(row, (o, st))| {
                let r = Row::new(&x, dims, row, &bt, &ct, softplus);
                let mut h = vec![T::ZERO; s];
                for t in 0..l {
                    if t % chunk == 0 {
                        st[t / chunk * s..][..s].copy_from_slice(&h);
                    }
                    let (_, dt) = r.dt(t);
                    let mut y = r.step(t, dt, &mut h) + r.d * r.u[t];
                    if let Some(z) = r.z {
                        y *= z[t] * sigmoid(z[t]);
                    }
                    o[t] = y;
                }
            });
        (out, saved)
    }
    with_dtype!(x.u.dtype(), |T| {
        let (out, states) = read::<T, _>(x, &[], |s, _| run(s, dims, delta_softplus, chunk))?;
        Ok(Forward { out: Storage::Cpu(T::into_storage(out)), states: Storage::Cpu(T::into_storage(states)), chunk })
    })
}
