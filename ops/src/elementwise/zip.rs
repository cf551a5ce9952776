//! Walking several strided views of one shape in lockstep, in parallel for large tensors.
//!
//! Every elementwise CPU kernel is a loop over runs: `f(out_run, starts, strides)` gets a slice of the
//! contiguous output and, for each input, the storage offset of the run's first element and the stride
//! between its elements. Dims that are contiguous in every view are merged first, so a contiguous or simply
//! broadcast tensor is walked in one or a few long runs.

use engine::Layout;
use rayon::prelude::*;

/// Below this many output elements a kernel runs on one thread.
pub(crate) const PARALLEL_MIN: usize = 1 << 16;

struct Merged<const N: usize> {
    dims: Vec<usize>,
    strides: Vec<[usize; N]>,
    offsets: [usize; N],
}

fn merge<const N: usize>(shape: &[usize], layouts: [&Layout; N]) -> Merged<N> {
    let mut dims: Vec<usize> = Vec::new();
    let mut strides: Vec<[usize; N]> = Vec::new();
    for (d, &size) in shape.iter().enumerate() {
        if size == 1 {
            continue;
        }
        let s: [usize; N] = std::array::from_fn(|i| layouts[i].strides()[d]);
        match (dims.last_mut(), strides.last_mut()) {
            (Some(pd), Some(ps)) if (0..N).all(|i| ps[i] == s[i] * size) => {
                *pd *= size;
                *ps = s;
            }
            _ => {
                dims.push(size);
                strides.push(s);
            }
        }
    }
    if dims.is_empty() {
        dims.push(1);
        strides.push([1; N]);
    }
    Merged { dims, strides, offsets: std::array::from_fn(|i| layouts[i].offset()) }
}

impl<const N: usize> Merged<N> {
    /// Runs over the flat output range `lo..lo + out.len()`.
    fn walk<T>(&self, lo: usize, out: &mut [T], f: &(impl Fn(&mut [T], [usize; N], [usize; N]) + Sync)) {
        let r = self.dims.len();
        let inner = self.dims[r - 1];
        let inner_strides = self.strides[r - 1];
        // Multi-index of `lo`, and the storage offsets there.
        let mut idx = vec![0usize; r];
        let mut rem = lo;
        for d in (0..r).rev() {
            idx[d] = rem % self.dims[d];
            rem /= self.dims[d];
        }
        let mut pos = self.offsets;
        for (&i_d, s_d) in idx.iter().zip(&self.strides) {
            for (p, &s) in pos.iter_mut().zip(s_d) {
                *p += i_d * s;
            }
        }
        let mut done = 0;
        while done < out.len() {
            let len = (inner - idx[r - 1]).min(out.len() - done);
            f(&mut out[done..done + len], pos, inner_strides);
            done += len;
            // Advance by `len` along the inner dim, carrying into the outer dims.
            idx[r - 1] += len;
            for (i, p) in pos.iter_mut().enumerate() {
                *p += len * inner_strides[i];
            }
            let mut d = r - 1;
            while idx[d] == self.dims[d] && d > 0 {
                for (i, p) in pos.iter_mut().enumerate() {
                    *p -= self.dims[d] * self.strides[d][i];
                    *p += self.strides[d - 1][i];
                }
                idx[d] = 0;
                idx[d - 1] += 1;
                d -= 1;
            }
        }
    }
}

/// Fills `out` (contiguous, `shape`) run by run; every layout in `layouts` must have shape `shape`.
pub(crate) fn zip_runs<T: Send, const N: usize>(
    out: &mut [T],
    shape: &[usize],
    layouts: [&Layout; N],
    f: impl Fn(&mut [T], [usize; N], [usize; N]) + Sync,
) {
    debug_assert!(layouts.iter().all(|l| l.shape() == shape));
    if out.is_empty() {
        return;
    }
    let merged = merge(shape, layouts);
    if out.len() < PARALLEL_MIN {
        return merged.walk(0, out, &f);
    }
    let tasks = rayon::current_num_threads() * 4;
    let chunk = out.len().div_ceil(tasks).max(PARALLEL_MIN / 4);
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, part)| merged.walk(c * chunk, part, &f));
}
