//! CUDA paths of the elementwise family: one kernel launch per op (elementwise.cu), inputs read through
//! their `Strided` views (broadcast dims have stride 0), outputs contiguous.

use engine::cuda::{CudaStorage, PushKernelArg, Strided};
use engine::{DType, Float, Layout, Result};

use super::{Binary, Cmp, Unary};
use crate::cuda::{function, launch, Module};

const MODULE: Module = Module { name: "ops_elementwise", body: include_str!("elementwise.cu") };

impl Unary {
    /// The op's scalar parameters as the kernels take them (a, b).
    fn params(self) -> (f64, f64) {
        match self {
            Unary::Elu(a)
            | Unary::Powf(a)
            | Unary::AddScalar(a)
            | Unary::MulScalar(a)
            | Unary::DivScalar(a)
            | Unary::ClampMin(a)
            | Unary::ClampMax(a) => (a, 0.0),
            Unary::Softplus { beta, threshold } => (beta, threshold),
            _ => (0.0, 0.0),
        }
    }
}

/// Runs `f::<f32>` or `f::<f64>` by the dtype.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
        }
    };
}

pub(super) fn unary(op: Unary, x: &CudaStorage, lx: &Layout) -> Result<CudaStorage> {
    fn run<T: Float>(op: Unary, x: &CudaStorage, lx: &Layout) -> Result<CudaStorage> {
        let dev = x.device();
        let n = lx.numel();
        let out = dev.alloc::<T>(n)?;
        if n > 0 {
            let f = function::<T>(dev, &MODULE, &format!("unary_fwd_{}", op.name()))?;
            let (a, b, sx, n64) = (op.params().0, op.params().1, Strided::new(lx)?, n as i64);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(x.slice::<T>()?).arg(&sx).arg(out.as_slice()).arg(&n64).arg(&a).arg(&b);
            // SAFETY: unary_fwd_<op>(const T* x, Strided lx, T* y, long long n, double a, double b) reads x
            // through lx and writes y[0..n), which `out` holds.
            unsafe { launch(op.name(), dev, args, n)? };
        }
        CudaStorage::from_slice(dev, out)
    }
    by_dtype!(x.dtype(), run(op, x, lx))
}

pub(super) fn unary_backward(
    op: Unary,
    x: (&CudaStorage, &Layout),
    y: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    type View<'a> = (&'a CudaStorage, &'a Layout);
    fn run<T: Float>(op: Unary, x: View, y: View, g: View) -> Result<CudaStorage> {
        let dev = x.0.device();
        let n = x.1.numel();
        let out = dev.alloc::<T>(n)?;
        if n > 0 {
            let f = function::<T>(dev, &MODULE, &format!("unary_bwd_{}", op.name()))?;
            let (sx, sy, sg) = (Strided::new(x.1)?, Strided::new(y.1)?, Strided::new(g.1)?);
            let ((a, b), n64) = (op.params(), n as i64);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(x.0.slice::<T>()?).arg(&sx).arg(y.0.slice::<T>()?).arg(&sy).arg(g.0.slice::<T>()?).arg(&sg);
            args.arg(out.as_slice()).arg(&n64).arg(&a).arg(&b);
            // SAFETY: unary_bwd_<op>(x, lx, y, ly, g, lg, T* dx, n, a, b): three strided reads of one shape,
            // n contiguous writes into `out`.
            unsafe { launch(op.name(), dev, args, n)? };
        }
        CudaStorage::from_slice(dev, out)
    }
    crate::util::same_cuda_dtypes(op.name(), &[x.0, y.0, g.0])?;
    by_dtype!(x.0.dtype(), run(op, x, y, g))
}

/// Launches a kernel of the form `k(a, la, b, lb, ..., T* out, long long n)` over the shape of `la`.
fn two_inputs<T: Float>(
    name: &'static str,
    kernel: &str,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = a.0.device();
    let n = a.1.numel();
    let out = dev.alloc::<T>(n)?;
    if n > 0 {
        let f = function::<T>(dev, &MODULE, kernel)?;
        let (sa, sb, n64) = (Strided::new(a.1)?, Strided::new(b.1)?, n as i64);
        let mut args = dev.stream().launch_builder(&f);
        args.arg(a.0.slice::<T>()?).arg(&sa).arg(b.0.slice::<T>()?).arg(&sb).arg(out.as_slice()).arg(&n64);
        // SAFETY: <kernel>(const T* a, Strided la, const T* b, Strided lb, T* y, long long n); la and lb are
        // views of the same (broadcast) shape with n elements; y = `out` holds n.
        unsafe { launch(name, dev, args, n)? };
    }
    CudaStorage::from_slice(dev, out)
}

/// `la` and `lb` are the inputs broadcast to the output shape.
pub(super) fn binary(op: Binary, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Result<CudaStorage> {
    crate::util::same_cuda_dtypes(op.name(), &[a, b])?;
    let kernel = format!("binary_fwd_{}", op.name());
    by_dtype!(a.dtype(), two_inputs(op.name(), &kernel, (a, la), (b, lb)))
}

pub(super) fn compare(op: Cmp, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Result<CudaStorage> {
    crate::util::same_cuda_dtypes(op.name(), &[a, b])?;
    let kernel = format!("cmp_{}", op.name());
    by_dtype!(a.dtype(), two_inputs(op.name(), &kernel, (a, la), (b, lb)))
}

/// (g df/da, g df/db) over the shape of `g`; `la`, `lb` are the inputs broadcast to it.
pub(super) fn binary_backward(
    op: Binary,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, CudaStorage)> {
    type View<'a> = (&'a CudaStorage, &'a Layout);
    fn run<T: Float>(op: Binary, a: View, b: View, g: View) -> Result<(CudaStorage, CudaStorage)> {
        let dev = g.0.device();
        let n = g.1.numel();
        let (da, db) = (dev.alloc::<T>(n)?, dev.alloc::<T>(n)?);
        if n > 0 {
            let f = function::<T>(dev, &MODULE, &format!("binary_bwd_{}", op.name()))?;
            let (sa, sb, sg, n64) = (Strided::new(a.1)?, Strided::new(b.1)?, Strided::new(g.1)?, n as i64);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(a.0.slice::<T>()?).arg(&sa).arg(b.0.slice::<T>()?).arg(&sb).arg(g.0.slice::<T>()?).arg(&sg);
            args.arg(da.as_slice()).arg(db.as_slice()).arg(&n64);
            // SAFETY: binary_bwd_<op>(a, la, b, lb, g, lg, T* da, T* db, n): strided reads of g's shape, n
            // contiguous writes into each of `da` and `db`.
            unsafe { launch(op.name(), dev, args, n)? };
        }
        Ok((CudaStorage::from_slice(dev, da)?, CudaStorage::from_slice(dev, db)?))
    }
    crate::util::same_cuda_dtypes(op.name(), &[a.0, b.0, g.0])?;
    by_dtype!(g.0.dtype(), run(op, a, b, g))
}

/// `c != 0 ? a : b`, all three broadcast to one shape.
pub(super) fn where_(
    c: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    type View<'a> = (&'a CudaStorage, &'a Layout);
    fn run<T: Float>(c: View, a: View, b: View) -> Result<CudaStorage> {
        let dev = a.0.device();
        let n = a.1.numel();
        let out = dev.alloc::<T>(n)?;
        if n > 0 {
            let f = function::<T>(dev, &MODULE, "where")?;
            let (sc, sa, sb, n64) = (Strided::new(c.1)?, Strided::new(a.1)?, Strided::new(b.1)?, n as i64);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(c.0.slice::<T>()?).arg(&sc).arg(a.0.slice::<T>()?).arg(&sa).arg(b.0.slice::<T>()?).arg(&sb);
            args.arg(out.as_slice()).arg(&n64);
            // SAFETY: where_<T>(c, lc, a, la, b, lb, T* y, n): strided reads of one shape, n writes to `out`.
            unsafe { launch("where", dev, args, n)? };
        }
        CudaStorage::from_slice(dev, out)
    }
    crate::util::same_cuda_dtypes("where", &[c.0, a.0, b.0])?;
    by_dtype!(a.0.dtype(), run(c, a, b))
}
