//! CUDA strided copy: dst[view ld][i] = src[view ls][i].
//!
//! Two ways, by the layouts: both views contiguous (the common case of a copy into a fresh buffer or into a
//! whole-rows slice of one) is one device-to-device memcpy of the range, which runs at the device's copy
//! bandwidth by definition (the `copy` ceiling of `mila bench ops` is this very call); anything else goes
//! through the copy_strided kernel (copy.cu), element by element through `offset_of`.

use engine::cuda::{CudaStorage, PushKernelArg, Strided};
use engine::{DType, Error, Float, Layout, Result};

use crate::cuda::{function, launch, Module};

pub(crate) const MODULE: Module = Module { name: "ops_copy", body: include_str!("copy.cu") };

/// How a copy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyPath {
    /// `cuMemcpyDtoDAsync` of `numel` elements from `ls`'s offset to `ld`'s offset.
    Memcpy,
    /// The copy_strided kernel.
    Strided,
}

/// Memcpy when both views are contiguous (each one range of its buffer), else the kernel. No alignment
/// matters: the driver copies any byte range.
pub(crate) fn copy_path(ld: &Layout, ls: &Layout) -> CopyPath {
    if ld.is_contiguous() && ls.is_contiguous() {
        CopyPath::Memcpy
    } else {
        CopyPath::Strided
    }
}

pub(super) fn copy_into(dst: &mut CudaStorage, ld: &Layout, src: &CudaStorage, ls: &Layout) -> Result<()> {
    fn run<T: Float>(dst: &mut CudaStorage, ld: &Layout, src: &CudaStorage, ls: &Layout) -> Result<()> {
        let dev = src.device().clone();
        let n = ls.numel();
        if copy_path(ld, ls) == CopyPath::Memcpy {
            let range = |l: &Layout| l.offset()..l.offset() + n;
            let from = src.slice::<T>()?.try_slice(range(ls));
            let from =
                from.ok_or_else(|| Error::invalid("copy_into", "source view exceeds its storage", ls.shape()))?;
            let mut whole = dst.slice_mut::<T>()?;
            let mut to = whole
                .try_slice_mut(range(ld))
                .ok_or_else(|| Error::invalid("copy_into", "destination view exceeds its storage", ld.shape()))?;
            return dev
                .stream()
                .memcpy_dtod(&from, &mut to)
                .map_err(|e| Error::Cuda { op: "copy_into", msg: format!("{e:?}") });
        }
        let f = function::<T>(&dev, &MODULE, "copy_strided")?;
        let (sd, ss, n64) = (Strided::new(ld)?, Strided::new(ls)?, n as i64);
        let mut args = dev.stream().launch_builder(&f);
        args.arg(src.slice::<T>()?).arg(&ss).arg(dst.slice::<T>()?).arg(&sd).arg(&n64);
        // SAFETY: copy_strided(const T* src, Strided ls, T* dst, Strided ld, long long n); both views have n
        // elements and were checked to lie inside their buffers by the caller.
        unsafe { launch("copy_into", &dev, args, n) }
    }
    crate::util::same_cuda_dtypes("copy_into", &[dst, src])?;
    match src.dtype() {
        DType::F32 => run::<f32>(dst, ld, src, ls),
        DType::F64 => run::<f64>(dst, ld, src, ls),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_copies_are_one_memcpy() {
        let c = Layout::contiguous(&[6, 10]);
        assert_eq!(copy_path(&c, &c), CopyPath::Memcpy);
        // Whole rows of a bigger buffer (concat along dim 0, narrow's backward) and odd offsets: still one range.
        let rows = Layout::contiguous(&[9, 10]).narrow(0, 3, 6).unwrap();
        let odd = Layout::contiguous(&[61]).narrow(0, 1, 60).unwrap().reshape_view(&[6, 10]).unwrap();
        assert_eq!(copy_path(&rows, &odd), CopyPath::Memcpy);
        // A column block (concat along dim 1), a transposed source, a broadcast source: the kernel.
        let cols = Layout::contiguous(&[6, 14]).narrow(1, 2, 10).unwrap();
        assert_eq!(copy_path(&cols, &c), CopyPath::Strided);
        assert_eq!(copy_path(&c, &Layout::contiguous(&[10, 6]).permute(&[1, 0]).unwrap()), CopyPath::Strided);
        assert_eq!(copy_path(&c, &Layout::contiguous(&[10]).broadcast_as(&[6, 10]).unwrap()), CopyPath::Strided);
    }
}
