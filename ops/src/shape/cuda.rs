//! CUDA index_select and its backward (shape.cu): one thread per element of the selection, the indices
//! uploaded once per call. concat, stack, pad, split and chunk need nothing here: they are device-agnostic
//! compositions of `Storage::full`, views and `copy_into`.

use engine::cuda::{CudaDevice, CudaStorage, PooledSlice, PushKernelArg};
use engine::{DType, Float, Layout, Result};

use super::cpu::split_at_dim;
use crate::cuda::{function, launch, Module};

pub(crate) const MODULE: Module = Module { name: "ops_shape", body: include_str!("shape.cu") };

/// The indices on the device as the kernels read them (`long long`). Every index is below its dim's size,
/// which fits in an i64, so the casts are exact.
fn upload(dev: &CudaDevice, indices: &[usize]) -> Result<PooledSlice<i64>> {
    let host: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    dev.htod(&host)
}

/// The (n, nidx, size, inner) scalars both kernels take after their pointers.
fn sizes(n: usize, nidx: usize, size: usize, inner: usize) -> [i64; 4] {
    [n as i64, nidx as i64, size as i64, inner as i64]
}

/// y[o, j, i] = x[o, indices[j], i] around `dim`: contiguous, of x's shape with `indices.len()` at `dim`.
pub(super) fn index_select(x: &CudaStorage, layout: &Layout, dim: usize, indices: &[usize]) -> Result<CudaStorage> {
    fn run<T: Float>(x: &CudaStorage, layout: &Layout, dim: usize, indices: &[usize]) -> Result<CudaStorage> {
        let dev = x.device();
        let (outer, size, inner) = split_at_dim(layout.shape(), dim);
        // The caller checked that the result's element count fits.
        let n = outer * indices.len() * inner;
        let out = dev.alloc::<T>(n)?;
        if n > 0 {
            let lx = x.strided("index_select", layout)?;
            let idx = upload(dev, indices)?;
            let f = function::<T>(dev, &MODULE, "index_select")?;
            let [n64, nidx, size64, inner64] = sizes(n, indices.len(), size, inner);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(x.slice::<T>()?).arg(&lx).arg(idx.as_slice()).arg(out.as_slice());
            args.arg(&n64).arg(&nidx).arg(&size64).arg(&inner64);
            // SAFETY: index_select_<T>(const T* x, Strided lx, const long long* idx, T* y, long long n,
            // long long nidx, long long size, long long inner) reads idx[0..nidx) (`idx` holds them) and x at
            // lx-positions of row-major indices below outer * size * inner, the elements of x's view (checked
            // against its buffer by `strided`), since every index is below size; it writes y[0..n), which
            // `out` holds.
            unsafe { launch("index_select", dev, args, n)? };
        }
        CudaStorage::from_slice(dev, out)
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x, layout, dim, indices),
        DType::F64 => run::<f64>(x, layout, dim, indices),
    }
}

/// dx[o, i, k] = sum over j with indices[j] = i of g[o, j, k]: contiguous, of `input_shape`.
pub(super) fn index_add(
    g: &CudaStorage,
    g_layout: &Layout,
    input_shape: &[usize],
    dim: usize,
    indices: &[usize],
) -> Result<CudaStorage> {
    fn run<T: Float>(
        g: &CudaStorage,
        g_layout: &Layout,
        input_shape: &[usize],
        dim: usize,
        indices: &[usize],
    ) -> Result<CudaStorage> {
        let dev = g.device();
        let (outer, size, inner) = split_at_dim(input_shape, dim);
        // Rows no index picks get no gradient: start from zeros.
        let mut dx = CudaStorage::alloc(dev, outer * size * inner, T::DTYPE)?;
        dx.fill(0.0)?;
        let n = g_layout.numel();
        if n > 0 {
            let lg = g.strided("index_select_backward", g_layout)?;
            let idx = upload(dev, indices)?;
            let f = function::<T>(dev, &MODULE, "index_add")?;
            let [n64, nidx, size64, inner64] = sizes(n, indices.len(), size, inner);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(g.slice::<T>()?).arg(&lg).arg(idx.as_slice()).arg(dx.slice::<T>()?);
            args.arg(&n64).arg(&nidx).arg(&size64).arg(&inner64);
            // SAFETY: index_add_<T>(const T* g, Strided lg, const long long* idx, T* dx, long long n,
            // long long nidx, long long size, long long inner) reads g at lg-positions of i < n (checked by
            // `strided`; g has the selection's shape (outer, nidx, inner)) and idx[0..nidx), and adds into dx
            // at (o * size + idx[j]) * inner + r < outer * size * inner, the length of `dx`.
            unsafe { launch("index_select_backward", dev, args, n)? };
        }
        Ok(dx)
    }
    match g.dtype() {
        DType::F32 => run::<f32>(g, g_layout, input_shape, dim, indices),
        DType::F64 => run::<f64>(g, g_layout, input_shape, dim, indices),
    }
}
