//! CUDA path of the stochastic regularisers (regularize.cu): one grid-stride launch scales x by the uploaded
//! mask. The mask itself is drawn on the host from the caller's generator (mod.rs), so CUDA and CPU runs of one
//! seed drop the same elements.

use engine::cuda::{CudaStorage, PushKernelArg};
use engine::{DType, Error, Float, Layout, Result};

use crate::cuda::{function, launch, Module};

pub(crate) const MODULE: Module = Module { name: "ops_regularize", body: include_str!("regularize.cu") };

/// y[i] = x[i] mask[i / block] with block = len(x) / len(mask), over x's row-major order: contiguous.
pub(super) fn scale_blocks(
    op: &'static str,
    x: &CudaStorage,
    lx: &Layout,
    mask: &CudaStorage,
    lm: &Layout,
) -> Result<CudaStorage> {
    fn run<T: Float>(
        op: &'static str,
        x: &CudaStorage,
        lx: &Layout,
        mask: &CudaStorage,
        lm: &Layout,
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let (n, blocks) = (lx.numel(), lm.numel());
        let y = dev.alloc::<T>(n)?;
        if n > 0 {
            let (sx, sm) = (x.strided(op, lx)?, mask.strided(op, lm)?);
            let f = function::<T>(dev, &MODULE, "scale_blocks")?;
            let (n64, block64) = (n as i64, (n / blocks) as i64);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(x.slice::<T>()?).arg(&sx).arg(mask.slice::<T>()?).arg(&sm).arg(y.as_slice());
            args.arg(&n64).arg(&block64);
            // SAFETY: scale_blocks_<T>(const T* x, Strided lx, const T* mask, Strided lm, T* y, long long n,
            // long long block) reads x through lx at indices below n and the mask through lm at indices below
            // n / block = blocks (both views checked against their buffers by `strided`), and writes y[0..n),
            // which `y` holds.
            unsafe { launch(op, dev, args, n)? };
        }
        CudaStorage::from_slice(dev, y)
    }
    let (n, blocks) = (lx.numel(), lm.numel());
    if blocks == 0 && n > 0 || blocks > 0 && n % blocks != 0 {
        return Err(Error::invalid(op, format!("internal: {blocks} mask entries for {n} elements"), lx.shape()));
    }
    crate::util::same_cuda_dtypes(op, &[x, mask])?;
    match x.dtype() {
        DType::F32 => run::<f32>(op, x, lx, mask, lm),
        DType::F64 => run::<f64>(op, x, lx, mask, lm),
    }
}

/// y[i] = x[i] + t[i] mask[i / block] (the product rounded first) with block = len(t) / len(mask), over the
/// row-major order of x and t (any views of one shape); y contiguous.
pub(super) fn add_scaled_blocks(
    op: &'static str,
    (x, lx): (&CudaStorage, &Layout),
    (t, lt): (&CudaStorage, &Layout),
    (mask, lm): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn run<T: Float>(
        op: &'static str,
        (x, lx): (&CudaStorage, &Layout),
        (t, lt): (&CudaStorage, &Layout),
        (mask, lm): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let (n, blocks) = (lt.numel(), lm.numel());
        let y = dev.alloc::<T>(n)?;
        if n > 0 {
            let (sx, st, sm) = (x.strided(op, lx)?, t.strided(op, lt)?, mask.strided(op, lm)?);
            let f = function::<T>(dev, &MODULE, "add_scaled_blocks")?;
            let (n64, block64) = (n as i64, (n / blocks) as i64);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(x.slice::<T>()?).arg(&sx).arg(t.slice::<T>()?).arg(&st).arg(mask.slice::<T>()?).arg(&sm);
            args.arg(y.as_slice()).arg(&n64).arg(&block64);
            // SAFETY: add_scaled_blocks_<T>(const T* x, Strided lx, const T* t, Strided lt, const T* mask,
            // Strided lm, T* y, long long n, long long block) reads x and t through lx, lt at indices below n
            // (one shape, checked by the caller: lx has n elements too) and the mask through lm at indices
            // below n / block = blocks (each view checked against its buffer by `strided`), and writes
            // y[0..n), which `y` holds.
            unsafe { launch(op, dev, args, n)? };
        }
        CudaStorage::from_slice(dev, y)
    }
    let (n, blocks) = (lt.numel(), lm.numel());
    if blocks == 0 && n > 0 || blocks > 0 && n % blocks != 0 || lx.numel() != n {
        return Err(Error::invalid(op, format!("internal: {blocks} mask entries for {n} elements"), lt.shape()));
    }
    crate::util::same_cuda_dtypes(op, &[x, t, mask])?;
    match x.dtype() {
        DType::F32 => run::<f32>(op, (x, lx), (t, lt), (mask, lm)),
        DType::F64 => run::<f64>(op, (x, lx), (t, lt), (mask, lm)),
    }
}
