//! CUDA reductions (reduce.cu): one warp per output element, or per slice of one when a row is long, the
//! slices' partial results then reduced by a second launch. Sums of f32 accumulate in f32 along a warp
//! tree, which keeps the error near log2(n) ulps rather than n.

use engine::cuda::{CudaDevice, CudaFunction, CudaSlice, CudaStorage, PushKernelArg, Strided};
use engine::{DType, Float, Layout, Result};

use super::{Plan, ReduceKind};
use crate::cuda::{function, launch, Module};

const MODULE: Module = Module { name: "ops_reduce", body: include_str!("reduce.cu") };

/// Elements one warp reduces before a row is split into slices.
const SLICE: usize = 4096;

#[derive(Clone, Copy)]
enum Kernel {
    Sum,
    Max,
    CountEq,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::Sum => "reduce_sum",
            Kernel::Max => "reduce_max",
            Kernel::CountEq => "reduce_count_eq",
        }
    }
}

/// One launch: `out[task]` for `rows * splits` tasks of `x` viewed through `lx` as (rows, group).
#[allow(clippy::too_many_arguments)]
fn launch_reduce<T: Float>(
    dev: &CudaDevice,
    f: &CudaFunction,
    x: &CudaSlice<T>,
    lx: &Strided,
    reference: &CudaSlice<T>,
    out: &CudaSlice<T>,
    rows: usize,
    group: usize,
    splits: usize,
) -> Result<()> {
    let (rows64, group64, splits64) = (rows as i64, group as i64, splits as i64);
    let mut args = dev.stream().launch_builder(f);
    args.arg(x).arg(lx).arg(reference).arg(out).arg(&rows64).arg(&group64).arg(&splits64);
    // SAFETY: reduce_<op>(const T* x, Strided lx, const T* ref, T* out, long long outputs, long long group,
    // long long splits) reads x at lx-indices below rows * group, ref[0..rows) (count only), and writes
    // out[0..rows * splits), which `out` holds. One warp per task: 32 threads for each of the tasks.
    unsafe { launch("reduce", dev, args, rows * splits * 32) }
}

fn reduce_into<T: Float>(
    dev: &CudaDevice,
    kernel: Kernel,
    x: &CudaSlice<T>,
    lx: &Layout,
    reference: Option<&CudaSlice<T>>,
    rows: usize,
    group: usize,
) -> Result<engine::cuda::PooledSlice<T>> {
    let out = dev.alloc::<T>(rows)?;
    if rows == 0 {
        return Ok(out);
    }
    let f = function::<T>(dev, &MODULE, kernel.name())?;
    let sx = Strided::new(lx)?;
    // The reference is only read by count_eq; pass the output as a placeholder pointer otherwise.
    let reference = reference.unwrap_or(out.as_slice());
    let splits = if group > 2 * SLICE { group.div_ceil(SLICE) } else { 1 };
    if splits == 1 {
        launch_reduce(dev, &f, x, &sx, reference, out.as_slice(), rows, group, 1)?;
        return Ok(out);
    }
    let partial = dev.alloc::<T>(rows * splits)?;
    launch_reduce(dev, &f, x, &sx, reference, partial.as_slice(), rows, group, splits)?;
    // Partial counts add up; partial sums and maxima combine with their own op.
    let second = match kernel {
        Kernel::CountEq => function::<T>(dev, &MODULE, Kernel::Sum.name())?,
        _ => f,
    };
    let lp = Strided::new(&Layout::contiguous(&[rows, splits]))?;
    launch_reduce(dev, &second, partial.as_slice(), &lp, reference, out.as_slice(), rows, splits, 1)?;
    Ok(out)
}

fn rows(plan: &Plan) -> usize {
    plan.out_shape.iter().product()
}

pub(super) fn reduce(x: &CudaStorage, layout: &Layout, plan: &Plan, kind: ReduceKind) -> Result<CudaStorage> {
    fn run<T: Float>(x: &CudaStorage, layout: &Layout, plan: &Plan, kind: ReduceKind) -> Result<CudaStorage> {
        let dev = x.device();
        if plan.group == 0 {
            // A sum over nothing is 0 (max over nothing was refused before).
            let mut s = CudaStorage::alloc(dev, rows(plan), T::DTYPE)?;
            s.fill(0.0)?;
            return Ok(s);
        }
        let kernel = match kind {
            ReduceKind::Sum => Kernel::Sum,
            ReduceKind::Max => Kernel::Max,
        };
        let lx = layout.permute(&plan.perm)?;
        let out = reduce_into::<T>(dev, kernel, x.slice::<T>()?, &lx, None, rows(plan), plan.group)?;
        CudaStorage::from_slice(dev, out)
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x, layout, plan, kind),
        DType::F64 => run::<f64>(x, layout, plan, kind),
    }
}

/// dL/dx of max: g[row] / ties to each element equal to the row's max.
pub(super) fn max_backward(
    x: &CudaStorage,
    layout: &Layout,
    y: &CudaStorage,
    g: &CudaStorage,
    plan: &Plan,
) -> Result<CudaStorage> {
    fn run<T: Float>(
        x: &CudaStorage,
        layout: &Layout,
        y: &CudaStorage,
        g: &CudaStorage,
        plan: &Plan,
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let n = layout.numel();
        let lx = layout.permute(&plan.perm)?;
        let count = reduce_into::<T>(
            dev,
            Kernel::CountEq,
            x.slice::<T>()?,
            &lx,
            Some(y.slice::<T>()?),
            rows(plan),
            plan.group,
        )?;
        let dx = dev.alloc::<T>(n)?;
        if n > 0 {
            let f = function::<T>(dev, &MODULE, "max_bwd")?;
            let sx = Strided::new(&lx)?;
            let dest = Strided::new(&Layout::contiguous(layout.shape()).permute(&plan.perm)?)?;
            let (n64, group64) = (n as i64, plan.group as i64);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(x.slice::<T>()?).arg(&sx).arg(y.slice::<T>()?).arg(g.slice::<T>()?).arg(count.as_slice());
            args.arg(dx.as_slice()).arg(&dest).arg(&n64).arg(&group64);
            // SAFETY: max_bwd(x, lx, y, g, count, dx, ldest, n, group): y, g, count hold n / group rows; dest
            // is a permutation of a contiguous layout of n elements, so every write lands in `dx`.
            unsafe { launch("max_backward", dev, args, n)? };
        }
        CudaStorage::from_slice(dev, dx)
    }
    crate::util::same_cuda_dtypes("max_backward", &[x, y, g])?;
    match x.dtype() {
        DType::F32 => run::<f32>(x, layout, y, g, plan),
        DType::F64 => run::<f64>(x, layout, y, g, plan),
    }
}
