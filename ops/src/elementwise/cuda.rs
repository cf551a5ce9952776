//! CUDA paths of the elementwise family: one kernel launch per op (elementwise.cu), outputs contiguous.
//!
//! Each launch goes through [`map`], which asks `engine::cuda::vector::plan` for the kernel form: the
//! vectorised one (`<kernel>_vec`: 16-byte accesses, inputs as a pointer and a period) when every input is flat
//! (contiguous, a broadcast scalar, or a repeated row such as a bias) and every pointer is 16-byte aligned,
//! else the Strided one (inputs read through their `Strided` views; broadcast dims have stride 0). Both forms
//! compute the same formula, so the choice never changes a result.

use engine::cuda::vector::{self, Flat, Path};
use engine::cuda::{kernel_name, CudaSlice, CudaStorage, CudaView, PushKernelArg};
use engine::{DType, Error, Float, Layout, Result};

use super::{Binary, Cmp, Unary};
use crate::cuda::{function, launch, Module, View};

pub(crate) const MODULE: Module = Module { name: "ops_elementwise", body: include_str!("elementwise.cu") };

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

/// Launches `kernel` (base name, without the dtype) over `n` output elements: inputs `inputs`, each laid out
/// over the output's shape, outputs `outputs` (contiguous, `n` elements each), then the trailing `scalars`.
///
/// Both forms of a kernel take, in order: for each input a pointer and its view (a `Strided` in the Strided
/// form; a period, `long long`, in the vectorised form `<kernel>_vec`), each output pointer, `long long n`,
/// and the scalars as doubles.
fn map<T: Float>(
    op: &'static str,
    kernel: &str,
    inputs: &[View],
    outputs: &[&CudaSlice<T>],
    n: usize,
    scalars: &[f64],
) -> Result<()> {
    let Some(&(first, _)) = inputs.first() else { return Ok(()) };
    let dev = first.device();
    if n == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let mut addresses = Vec::with_capacity(inputs.len());
    for &(s, l) in inputs {
        addresses.push((l, vector::address(s.slice::<T>()?, stream)));
    }
    let out_addresses: Vec<u64> = outputs.iter().map(|o| vector::address(o, stream)).collect();
    let n64 = n as i64;
    match vector::plan(&addresses, &out_addresses, size_of::<T>()) {
        Path::Vector(flats) => {
            let views =
                inputs.iter().zip(&flats).map(|(&v, &f)| flat_view::<T>(op, v, f)).collect::<Result<Vec<_>>>()?;
            let periods: Vec<i64> = flats.iter().map(|f| f.period()).collect();
            let name = format!("{kernel}_vec");
            let f = function::<T>(dev, &MODULE, &name)?;
            let wave = dev.wave(MODULE.name, &kernel_name::<T>(&name), &f, vector::THREADS)?;
            let mut args = stream.launch_builder(&f);
            for (v, p) in views.iter().zip(&periods) {
                args.arg(v).arg(p);
            }
            for o in outputs {
                args.arg(*o);
            }
            args.arg(&n64);
            for s in scalars {
                args.arg(s);
            }
            // SAFETY: the parameter list is the one described above, pushed in that order. The kernel reads
            // input k at p[i], p[0] or p[i % period] for i < n (its flat form), all inside the view `flat_view`
            // cut to exactly those elements, 16 bytes at a time at addresses `plan` checked to be aligned, and
            // writes outputs[m][0..n), each holding n elements, from aligned addresses.
            unsafe { args.launch(vector::launch_config(n, size_of::<T>(), wave)) }
                .map(|_| ())
                .map_err(|e| Error::Cuda { op, msg: format!("{e:?}") })
        }
        Path::Strided => {
            let views = inputs.iter().map(|&(s, l)| s.strided(op, l)).collect::<Result<Vec<_>>>()?;
            let f = function::<T>(dev, &MODULE, kernel)?;
            let mut args = stream.launch_builder(&f);
            for (&(s, _), v) in inputs.iter().zip(&views) {
                args.arg(s.slice::<T>()?).arg(v);
            }
            for o in outputs {
                args.arg(*o);
            }
            args.arg(&n64);
            for s in scalars {
                args.arg(s);
            }
            // SAFETY: the parameter list is the one described above, pushed in that order. Each input is read
            // at offset_of(view, i) for i < n, inside its buffer (`strided` checked the layout's span); each
            // output is written at [0..n), and holds n elements.
            unsafe { launch(op, dev, args, n) }
        }
    }
}

/// The elements of a flat input that the vectorised form reads: from its layout's offset, `span` long.
fn flat_view<'a, T: Float>(op: &'static str, (s, l): View<'a>, flat: Flat) -> Result<CudaView<'a, T>> {
    let o = l.offset();
    s.slice::<T>()?
        .try_slice(o..o + flat.span(l.numel()))
        .ok_or_else(|| Error::invalid(op, "internal: view exceeds its storage", l.shape()))
}

pub(super) fn unary(op: Unary, x: &CudaStorage, lx: &Layout) -> Result<CudaStorage> {
    fn run<T: Float>(op: Unary, x: &CudaStorage, lx: &Layout) -> Result<CudaStorage> {
        let dev = x.device();
        let n = lx.numel();
        let out = dev.alloc::<T>(n)?;
        let (a, b) = op.params();
        map::<T>(op.name(), &format!("unary_fwd_{}", op.name()), &[(x, lx)], &[out.as_slice()], n, &[a, b])?;
        CudaStorage::from_slice(dev, out)
    }
    by_dtype!(x.dtype(), run(op, x, lx))
}

pub(super) fn unary_backward(op: Unary, x: View, y: View, g: View) -> Result<CudaStorage> {
    fn run<T: Float>(op: Unary, x: View, y: View, g: View) -> Result<CudaStorage> {
        let dev = x.0.device();
        let n = x.1.numel();
        let out = dev.alloc::<T>(n)?;
        let (a, b) = op.params();
        map::<T>(op.name(), &format!("unary_bwd_{}", op.name()), &[x, y, g], &[out.as_slice()], n, &[a, b])?;
        CudaStorage::from_slice(dev, out)
    }
    crate::util::same_cuda_dtypes(op.name(), &[x.0, y.0, g.0])?;
    by_dtype!(x.0.dtype(), run(op, x, y, g))
}

/// One output over the shape of the first input, from inputs of that (broadcast) shape.
fn one_output<T: Float>(op: &'static str, kernel: &str, inputs: &[View]) -> Result<CudaStorage> {
    let dev = inputs[0].0.device();
    let n = inputs[0].1.numel();
    let out = dev.alloc::<T>(n)?;
    map::<T>(op, kernel, inputs, &[out.as_slice()], n, &[])?;
    CudaStorage::from_slice(dev, out)
}

/// `la` and `lb` are the inputs broadcast to the output shape.
pub(super) fn binary(op: Binary, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Result<CudaStorage> {
    crate::util::same_cuda_dtypes(op.name(), &[a, b])?;
    let kernel = format!("binary_fwd_{}", op.name());
    by_dtype!(a.dtype(), one_output(op.name(), &kernel, &[(a, la), (b, lb)]))
}

pub(super) fn compare(op: Cmp, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Result<CudaStorage> {
    crate::util::same_cuda_dtypes(op.name(), &[a, b])?;
    let kernel = format!("cmp_{}", op.name());
    by_dtype!(a.dtype(), one_output(op.name(), &kernel, &[(a, la), (b, lb)]))
}

/// (g df/da, g df/db) over the shape of `g`; `la`, `lb` are the inputs broadcast to it.
pub(super) fn binary_backward(op: Binary, a: View, b: View, g: View) -> Result<(CudaStorage, CudaStorage)> {
    fn run<T: Float>(op: Binary, a: View, b: View, g: View) -> Result<(CudaStorage, CudaStorage)> {
        let dev = g.0.device();
        let n = g.1.numel();
        let (da, db) = (dev.alloc::<T>(n)?, dev.alloc::<T>(n)?);
        let kernel = format!("binary_bwd_{}", op.name());
        map::<T>(op.name(), &kernel, &[a, b, g], &[da.as_slice(), db.as_slice()], n, &[])?;
        Ok((CudaStorage::from_slice(dev, da)?, CudaStorage::from_slice(dev, db)?))
    }
    crate::util::same_cuda_dtypes(op.name(), &[a.0, b.0, g.0])?;
    by_dtype!(g.0.dtype(), run(op, a, b, g))
}

/// `c != 0 ? a : b`, all three broadcast to one shape.
pub(super) fn where_(c: View, a: View, b: View) -> Result<CudaStorage> {
    crate::util::same_cuda_dtypes("where", &[c.0, a.0, b.0])?;
    by_dtype!(a.0.dtype(), one_output("where", "where", &[c, a, b]))
}
