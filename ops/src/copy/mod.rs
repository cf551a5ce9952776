//! Strided copy: write the elements of `src` (any layout) into the elements of `dst` under `dst_layout`
//! (any layout), in row-major order of their common shape. It is the engine room of concat, pad, stack and
//! of the backward of narrow: each writes into a view of a freshly made output.
//!
//! Not differentiable by itself: the ops built on it record their own backward.

use engine::{Error, Float, Layout, Result, Storage, Tensor};

mod cuda;

/// Copies `src` into the view `dst_layout` of `dst`'s storage. `dst` must not share storage with `src`.
pub fn copy_into(dst: &Tensor, dst_layout: &Layout, src: &Tensor) -> Result<()> {
    if dst_layout.shape() != src.shape() {
        return Err(Error::ShapeMismatch {
            op: "copy_into",
            lhs: dst_layout.shape().to_vec(),
            rhs: src.shape().to_vec(),
        });
    }
    crate::util::same_dtype_device("copy_into", dst, src)?;
    if dst.same_storage(src) {
        return Err(Error::invalid("copy_into", "source and destination share storage", src.shape()));
    }
    if dst_layout.numel() == 0 {
        return Ok(());
    }
    if dst_layout.storage_span().end > dst.storage().len() {
        return Err(Error::invalid("copy_into", "destination view exceeds its storage", dst_layout.shape()));
    }
    let s = src.storage();
    let mut d = dst.storage_mut();
    match (&mut *d, &*s) {
        (Storage::Cpu(d), Storage::Cpu(s)) => {
            fn f<T: Float>(d: &mut [T], dl: &Layout, s: &[T], sl: &Layout) {
                let src = engine::CpuStorage::gather(s, sl);
                let mut i = 0;
                dl.for_each_run(|start, len, stride| {
                    for k in 0..len {
                        d[start + k * stride] = src[i + k];
                    }
                    i += len;
                });
            }
            match (d, s) {
                (engine::CpuStorage::F32(d), engine::CpuStorage::F32(s)) => f(d, dst_layout, s, src.layout()),
                (engine::CpuStorage::F64(d), engine::CpuStorage::F64(s)) => f(d, dst_layout, s, src.layout()),
                (d, s) => return Err(Error::DTypeMismatch { op: "copy_into", lhs: d.dtype(), rhs: s.dtype() }),
            }
            Ok(())
        }
        (Storage::Cuda(d), Storage::Cuda(s)) => cuda::copy_into(d, dst_layout, s, src.layout()),
        (d, _) => Err(crate::util::no_cuda("copy_into", d)),
    }
}
