//! CUDA strided copy (copy.cu): dst[view ld][i] = src[view ls][i].

use engine::cuda::{CudaStorage, PushKernelArg, Strided};
use engine::{DType, Float, Layout, Result};

use crate::cuda::{function, launch, Module};

const MODULE: Module = Module { name: "ops_copy", body: include_str!("copy.cu") };

pub(super) fn copy_into(dst: &mut CudaStorage, ld: &Layout, src: &CudaStorage, ls: &Layout) -> Result<()> {
    fn run<T: Float>(dst: &mut CudaStorage, ld: &Layout, src: &CudaStorage, ls: &Layout) -> Result<()> {
        let dev = src.device().clone();
        let n = ls.numel();
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
