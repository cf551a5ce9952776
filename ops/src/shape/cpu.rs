//! CPU kernels of index_select and its backward. Both see the tensor as (outer, size, inner) around the
//! selected dim, so each selected slice is `outer` contiguous runs of `inner` elements.

use std::borrow::Cow;

use engine::{with_cpu, CpuStorage, Float, Layout};

/// (outer, size, inner): the sizes before, at and after `dim`.
pub(super) fn split_at_dim(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (shape[..dim].iter().product(), shape[dim], shape[dim + 1..].iter().product())
}

/// The elements under `layout` in row-major order, borrowed when they already are.
fn row_major<'a, T: Float>(data: &'a [T], layout: &Layout) -> Cow<'a, [T]> {
    if layout.is_contiguous() {
        let o = layout.offset();
        Cow::Borrowed(&data[o..o + layout.numel()])
    } else {
        Cow::Owned(CpuStorage::gather(data, layout))
    }
}

/// y[o, j, i] = x[o, indices[j], i]. Every index is below the dim's size (checked by the caller).
pub(super) fn index_select(x: &CpuStorage, layout: &Layout, dim: usize, indices: &[usize]) -> CpuStorage {
    with_cpu!(x, |v: T| {
        let (outer, size, inner) = split_at_dim(layout.shape(), dim);
        let xs = row_major(v, layout);
        let mut out = Vec::with_capacity(outer * indices.len() * inner);
        for o in 0..outer {
            for &i in indices {
                let start = (o * size + i) * inner;
                out.extend_from_slice(&xs[start..start + inner]);
            }
        }
        T::into_storage(out)
    })
}

/// dx[o, i, k] = sum over j with indices[j] = i of g[o, j, k], into zeros of `input_shape`: repeated indices
/// accumulate.
pub(super) fn index_add(
    g: &CpuStorage,
    g_layout: &Layout,
    input_shape: &[usize],
    dim: usize,
    indices: &[usize],
) -> CpuStorage {
    with_cpu!(g, |v: T| {
        let (outer, size, inner) = split_at_dim(input_shape, dim);
        let gs = row_major(v, g_layout);
        let mut out = engine::cpu_filled(outer * size * inner, T::ZERO);
        for o in 0..outer {
            for (j, &i) in indices.iter().enumerate() {
                let src = &gs[(o * indices.len() + j) * inner..][..inner];
                let dst = &mut out[(o * size + i) * inner..][..inner];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d += s;
                }
            }
        }
        T::into_storage(out)
    })
}
