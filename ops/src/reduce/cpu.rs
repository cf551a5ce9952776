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

pub(super) fn reduce(x: &CpuStorage, layout: &Layout, plan: &Plan, kind: ReduceKind) -> Result<CpuStorage> {
    with_cpu!(x, |v: T| {
        let xs = grouped(v, layout, plan)?;
        let out_len: usize = plan.out_shape.iter().product();
        let group = plan.group;
        let out: Vec<T> = if group == 0 {
            vec![T::ZERO; out_len]
        } else if xs.len() >= PARALLEL_MIN {
            xs.par_chunks(group).map(|run| reduce_run(run, kind)).collect()
        } else {
            xs.chunks(group).map(|run| reduce_run(run, kind)).collect()
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
