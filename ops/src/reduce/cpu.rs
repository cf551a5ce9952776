//! CPU reduction kernels. The input is gathered in "kept dims first, reduced dims last" order, so output
//! element k reduces the run `k * group .. (k + 1) * group`.

use engine::{with_cpu, CpuStorage, Error, Float, Layout, Result};
use rayon::prelude::*;

use super::{Plan, ReduceKind};

/// Below this many input elements a reduction runs on one thread.
const PARALLEL_MIN: usize = 1 << 15;

fn grouped<T: Float>(x: &[T], layout: &Layout, plan: &Plan) -> Result<Vec<T>> {
    let permuted = layout.permute(&plan.perm)?;
    Ok(CpuStorage::gather(x, &permuted))
}

fn reduce_run<T: Float>(run: &[T], kind: ReduceKind) -> T {
    match kind {
        // Accumulate in f64: an f32 sum of many terms would lose the low bits.
        ReduceKind::Sum => T::from_f64(run.iter().map(|v| v.to_f64()).sum()),
        ReduceKind::Max => {
            let mut acc = T::NEG_INFINITY;
            for &v in run {
                if v.is_nan() {
                    return v; // NaN propagates, as in PyTorch
                }
                if v > acc {
                    acc = v;
                }
            }
            acc
        }
    }
}

/// Column reduction of a contiguous (rows, cols) block: out[c] reduces x[r * cols + c] over r. Used when the
/// reduced dims are the leading ones (a bias gradient summed over batch and tokens), where gathering the
/// transposed view would walk memory with a stride of `cols`.
fn reduce_columns<T: Float>(x: &[T], rows: usize, cols: usize, kind: ReduceKind) -> Vec<T> {
    let column_block = |c0: usize, out: &mut [T]| match kind {
        ReduceKind::Sum => {
            let mut acc = vec![0f64; out.len()];
            for r in 0..rows {
                let row = &x[r * cols + c0..r * cols + c0 + out.len()];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v.to_f64();
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = T::from_f64(a);
            }
        }
        ReduceKind::Max => {
            out.fill(T::NEG_INFINITY);
            for r in 0..rows {
                let row = &x[r * cols + c0..r * cols + c0 + out.len()];
                for (o, &v) in out.iter_mut().zip(row) {
                    if v.is_nan() || *o < v {
                        *o = if o.is_nan() { *o } else { v };
                    }
                }
            }
        }
    };
    let mut out = engine::cpu_buffer(cols);
    let block = 256;
    if rows * cols >= PARALLEL_MIN && cols > block {
        out.par_chunks_mut(block).enumerate().for_each(|(i, o)| column_block(i * block, o));
    } else {
        column_block(0, &mut out);
    }
    out
}

pub(super) fn reduce(x: &CpuStorage, layout: &Layout, plan: &Plan, kind: ReduceKind) -> Result<CpuStorage> {
    with_cpu!(x, |v: T| {
        let out_len: usize = plan.out_shape.iter().product();
        let group = plan.group;
        let permuted = layout.permute(&plan.perm)?;
        let rank = plan.perm.len();
        let leading_reduced = plan.perm[..plan.kept].iter().copied().eq(rank - plan.kept..rank);
        let reduce_runs = |xs: &[T]| -> Vec<T> {
            if xs.len() >= PARALLEL_MIN {
                xs.par_chunks(group).map(|run| reduce_run(run, kind)).collect()
            } else {
                xs.chunks(group).map(|run| reduce_run(run, kind)).collect()
            }
        };
        let out: Vec<T> = if group == 0 {
            vec![T::ZERO; out_len]
        } else if permuted.is_contiguous() {
            // The reduced dims are already innermost: reduce the runs in place, no copy.
            let o = permuted.offset();
            reduce_runs(&v[o..o + layout.numel()])
        } else if layout.is_contiguous() && leading_reduced {
            let o = layout.offset();
            reduce_columns(&v[o..o + layout.numel()], group, out_len, kind)
        } else {
            reduce_runs(&grouped(v, layout, plan)?)
        };
        Ok(T::into_storage(out))
    })
}

/// dL/dx for `max`: g[k] / ties to each element equal to the max of its group.
pub(super) fn max_backward(
    x: &CpuStorage,
    layout: &Layout,
    y: &CpuStorage,
    g: &CpuStorage,
    plan: &Plan,
) -> Result<CpuStorage> {
    fn f<T: Float>(x: &[T], layout: &Layout, y: &[T], g: &[T], plan: &Plan) -> Result<Vec<T>> {
        let xs = grouped(x, layout, plan)?;
        // Where each gathered element lands in a contiguous tensor of the input's shape.
        let dest = Layout::contiguous(layout.shape()).permute(&plan.perm)?.offsets();
        let mut out = vec![T::ZERO; xs.len()];
        for (k, run) in xs.chunks(plan.group.max(1)).enumerate() {
            let ties = run.iter().filter(|&&v| v == y[k] || (v.is_nan() && y[k].is_nan())).count();
            if ties == 0 {
                continue;
            }
            let share = g[k] / T::from_f64(ties as f64);
            for (j, &v) in run.iter().enumerate() {
                if v == y[k] || (v.is_nan() && y[k].is_nan()) {
                    out[dest[k * plan.group + j]] = share;
                }
            }
        }
        Ok(out)
    }
    match (x, y, g) {
        (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(g)) => Ok(CpuStorage::F32(f(x, layout, y, g, plan)?)),
        (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(g)) => Ok(CpuStorage::F64(f(x, layout, y, g, plan)?)),
        _ => Err(Error::DTypeMismatch { op: "max_backward", lhs: x.dtype(), rhs: g.dtype() }),
    }
}
