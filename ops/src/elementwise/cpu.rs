//! CPU kernels of the elementwise family. Formulas are written once per op as scalar functions generic over
//! `Float`; the kernels are the strided loops of `zip.rs` around them.

use engine::{with_cpu, CpuStorage, DType, Error, Float, Layout, Result};

use super::zip::zip_runs;
use super::{Binary, Cmp, Unary};

pub(crate) mod exp;
mod gelu;

pub(crate) use exp::{exp, expm1};

const SQRT_2: f64 = std::f64::consts::SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// g(t) = erf(sqrt t) / sqrt t on t in [0, 16] (x = sqrt t in [0, 4]) as a polynomial in u = t / 8 - 1,
/// lowest power first: the degree-22 Chebyshev interpolant of g (computed at 40 digits) in the monomial
/// basis, whose coefficients stay below 0.36 on [-1, 1], so Horner's rule in f64 is well conditioned. The
/// series is within 4e-13 of g relatively, far below an f32 rounding step (6e-8).
#[rustfmt::skip]
const ERF_POLY: [f64; 23] = [
    0.35353099564340495,
    -0.17657623330392602,
    0.13167511689547204,
    -0.10771044230403212,
    0.09020899404424361,
    -0.07472787156784313,
    0.05988690674393008,
    -0.04576504084136506,
    0.03306061159641992,
    -0.022474029448637273,
    0.014349738735770057,
    -0.008604359881842766,
    0.004852986669306072,
    -0.0025830290325423214,
    0.0012940700205056187,
    -0.0006048631720031435,
    0.0002730868781407246,
    -0.00012649419013464736,
    5.051648098446156e-05,
    -1.2635295810882544e-05,
    5.069598611100323e-06,
    -4.586436654384096e-06,
    1.4883137738024427e-06,
];

/// erf of an f32, as the f32 nearest a f64 evaluation of x g(x^2) ([`ERF_POLY`]); |x| >= 4 gives +-1, which
/// erf(4) = 1 - 1.5e-8 rounds to. Branch-free, so that loops over slices vectorise (libm's erff is a call
/// with branches); equal to the correctly rounded erf but where that lies within about 4e-13 of the midpoint
/// between two f32s (the test checks it against libm's f64 erf on a dense grid).
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let x64 = x as f64;
    let a = if x64.abs() < 4.0 { x64.abs() } else { 4.0 }; // NaN: 4.0, restored below
    let u = a * a * 0.125 - 1.0;
    let mut p = ERF_POLY[22];
    for &c in ERF_POLY[..22].iter().rev() {
        p = p * u + c;
    }
    let r = a * p;
    let r = (if r < 1.0 { r } else { 1.0 } as f32).copysign(x);
    if x.is_nan() {
        x
    } else {
        r
    }
}

/// `of_f32(x)` where T is f32 (our branch-free functions: the same bits on every machine, loops that
/// vectorise), `of_t(x)` (libm) where T is f64, the gradient checks' dtype. The test on the dtype is a constant,
/// so each instance keeps one arm.
#[inline(always)]
fn f32_or_libm<T: Float>(x: T, of_f32: impl Fn(f32) -> f32, of_t: impl Fn(T) -> T) -> T {
    if T::DTYPE == DType::F32 {
        T::from_f64(of_f32(x.to_f64() as f32) as f64)
    } else {
        of_t(x)
    }
}

/// erf in T: [`erf_f32`] for f32, libm's erf for f64.
#[inline(always)]
fn erf<T: Float>(x: T) -> T {
    f32_or_libm(x, erf_f32, T::erf)
}

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    // Two branches so that e^(-x) never overflows.
    if x >= T::ZERO {
        T::ONE / (T::ONE + exp(-x))
    } else {
        let e = exp(x);
        e / (T::ONE + e)
    }
}

impl Unary {
    #[inline(always)]
    fn f<T: Float>(self, x: T) -> T {
        let c = |v: f64| T::from_f64(v);
        match self {
            Unary::Neg => -x,
            Unary::Exp => exp(x),
            Unary::Log => x.ln(),
            Unary::Sqrt => x.sqrt(),
            Unary::Rsqrt => T::ONE / x.sqrt(),
            Unary::Abs => x.abs(),
            Unary::Relu => {
                if x > T::ZERO {
                    x
                } else {
                    T::ZERO
                }
            }
            Unary::Gelu => c(0.5) * x * (T::ONE + erf(x / c(SQRT_2))),
            Unary::Silu => x * sigmoid(x),
            Unary::Elu(a) => {
                if x > T::ZERO {
                    x
                } else {
                    c(a) * expm1(x)
                }
            }
            Unary::Softplus { beta, threshold } => {
                let bx = c(beta) * x;
                if bx > c(threshold) {
                    x
                } else {
                    bx.exp().ln_1p() / c(beta)
                }
            }
            Unary::Sigmoid => sigmoid(x),
            Unary::Tanh => x.tanh(),
            Unary::Powf(p) => x.powf(c(p)),
            Unary::AddScalar(s) => x + c(s),
            Unary::MulScalar(s) => x * c(s),
            Unary::DivScalar(s) => x / c(s),
            Unary::ClampMin(s) => {
                if x < c(s) {
                    c(s)
                } else {
                    x
                }
            }
            Unary::ClampMax(s) => {
                if x > c(s) {
                    c(s)
                } else {
                    x
                }
            }
        }
    }

    /// f'(x), given x and y = f(x).
    #[inline(always)]
    fn df<T: Float>(self, x: T, y: T) -> T {
        let c = |v: f64| T::from_f64(v);
        let step = |b: bool| if b { T::ONE } else { T::ZERO };
        match self {
            Unary::Neg => -T::ONE,
            Unary::Exp => y,
            Unary::Log => T::ONE / x,
            Unary::Sqrt => c(0.5) / y,
            Unary::Rsqrt => c(-0.5) * y * y * y,
            Unary::Abs => {
                if x > T::ZERO {
                    T::ONE
                } else if x < T::ZERO {
                    -T::ONE
                } else {
                    T::ZERO
                }
            }
            Unary::Relu => step(x > T::ZERO),
            Unary::Gelu => {
                let cdf = c(0.5) * (T::ONE + erf(x / c(SQRT_2)));
                cdf + x * c(INV_SQRT_2PI) * exp(c(-0.5) * x * x)
            }
            Unary::Silu => {
                let s = sigmoid(x);
                s * (T::ONE + x * (T::ONE - s))
            }
            Unary::Elu(a) => {
                if x > T::ZERO {
                    T::ONE
                } else {
                    y + c(a)
                }
            }
            Unary::Softplus { beta, threshold } => {
                let bx = c(beta) * x;
                if bx > c(threshold) {
                    T::ONE
                } else {
                    sigmoid(bx)
                }
            }
            Unary::Sigmoid => y * (T::ONE - y),
            Unary::Tanh => T::ONE - y * y,
            Unary::Powf(p) => {
                if p == 0.0 {
                    T::ZERO
                } else {
                    c(p) * x.powf(c(p - 1.0))
                }
            }
            Unary::AddScalar(_) => T::ONE,
            Unary::MulScalar(s) => c(s),
            Unary::DivScalar(s) => T::ONE / c(s),
            // PyTorch's clamp passes the gradient where x is inside the bound, the bound included.
            Unary::ClampMin(s) => step(x >= c(s)),
            Unary::ClampMax(s) => step(x <= c(s)),
        }
    }
}

impl Binary {
    #[inline(always)]
    fn f<T: Float>(self, a: T, b: T) -> T {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
            Binary::Maximum => {
                if a.is_nan() || a > b {
                    a
                } else {
                    b
                }
            }
            Binary::Minimum => {
                if a.is_nan() || a < b {
                    a
                } else {
                    b
                }
            }
        }
    }

    /// (g df/da, g df/db).
    #[inline(always)]
    fn df<T: Float>(self, a: T, b: T, g: T) -> (T, T) {
        let half = T::from_f64(0.5);
        let pick = |first: bool, second: bool| {
            if first {
                (g, T::ZERO)
            } else if second {
                (T::ZERO, g)
            } else {
                (g * half, g * half)
            }
        };
        match self {
            Binary::Add => (g, g),
            Binary::Sub => (g, -g),
            Binary::Mul => (g * b, g * a),
            Binary::Div => (g / b, -g * a / (b * b)),
            Binary::Maximum => pick(a > b, b > a),
            Binary::Minimum => pick(a < b, b < a),
        }
    }
}

impl Cmp {
    #[inline(always)]
    fn f<T: Float>(self, a: T, b: T) -> bool {
        match self {
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
        }
    }
}

fn mismatch(op: &'static str, a: &CpuStorage, b: &CpuStorage) -> Error {
    Error::DTypeMismatch { op, lhs: a.dtype(), rhs: b.dtype() }
}

/// Matches two (or three) CPU storages of one dtype, binding typed slices.
macro_rules! same_dtype {
    ($op:expr, ($($s:expr),+), |$($v:ident),+ ; $T:ident| $body:expr) => {
        match ($($s),+) {
            ($(CpuStorage::F32($v)),+) => { type $T = f32; Ok(CpuStorage::F32($body)) }
            ($(CpuStorage::F64($v)),+) => { type $T = f64; Ok(CpuStorage::F64($body)) }
            #[allow(unreachable_patterns)]
            _ => Err(mismatch($op, same_dtype!(@first $($s),+), same_dtype!(@last $($s),+))),
        }
    };
    (@first $a:expr $(, $rest:expr)*) => { $a };
    (@last $a:expr) => { $a };
    (@last $a:expr, $($rest:expr),+) => { same_dtype!(@last $($rest),+) };
}

/// Expands `$m!(K)` once per op, K being the op as an expression whose variant the compiler sees (its
/// parameters are plain captured values). Each op so gets its own loop with its formula inlined, instead of
/// one loop that matches on the op for every element, which also keeps the loops vectorisable.
macro_rules! specialize_unary {
    ($op:expr, $m:ident) => {
        match $op {
            Unary::Neg => $m!(Unary::Neg),
            Unary::Exp => $m!(Unary::Exp),
            Unary::Log => $m!(Unary::Log),
            Unary::Sqrt => $m!(Unary::Sqrt),
            Unary::Rsqrt => $m!(Unary::Rsqrt),
            Unary::Abs => $m!(Unary::Abs),
            Unary::Relu => $m!(Unary::Relu),
            Unary::Gelu => $m!(Unary::Gelu),
            Unary::Silu => $m!(Unary::Silu),
            Unary::Elu(a) => $m!(Unary::Elu(a)),
            Unary::Softplus { beta, threshold } => $m!(Unary::Softplus { beta, threshold }),
            Unary::Sigmoid => $m!(Unary::Sigmoid),
            Unary::Tanh => $m!(Unary::Tanh),
            Unary::Powf(p) => $m!(Unary::Powf(p)),
            Unary::AddScalar(c) => $m!(Unary::AddScalar(c)),
            Unary::MulScalar(c) => $m!(Unary::MulScalar(c)),
            Unary::DivScalar(c) => $m!(Unary::DivScalar(c)),
            Unary::ClampMin(c) => $m!(Unary::ClampMin(c)),
            Unary::ClampMax(c) => $m!(Unary::ClampMax(c)),
        }
    };
}

/// As [`specialize_unary`], for binary ops.
macro_rules! specialize_binary {
    ($op:expr, $m:ident) => {
        match $op {
            Binary::Add => $m!(Binary::Add),
            Binary::Sub => $m!(Binary::Sub),
            Binary::Mul => $m!(Binary::Mul),
            Binary::Div => $m!(Binary::Div),
            Binary::Maximum => $m!(Binary::Maximum),
            Binary::Minimum => $m!(Binary::Minimum),
        }
    };
}

/// out[i] = f(x[i]) over one strided input.
fn map1<T: Float>(x: &[T], lx: &Layout, f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = engine::cpu_buffer(lx.numel());
    zip_runs(&mut out, lx.shape(), [lx], |o, [s], [t]| {
        if t == 1 {
            let x = &x[s..s + o.len()];
            for (v, &xv) in o.iter_mut().zip(x) {
                *v = f(xv);
            }
        } else {
            for (k, v) in o.iter_mut().enumerate() {
                *v = f(x[s + k * t]);
            }
        }
    });
    out
}

/// out[i] = f(a[i], b[i]) over two strided inputs of `shape`.
fn map2<T: Float>(a: &[T], la: &Layout, b: &[T], lb: &Layout, shape: &[usize], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = engine::cpu_buffer(shape.iter().product());
    zip_runs(&mut out, shape, [la, lb], |o, [sa, sb], [ta, tb]| {
        if ta == 1 && tb == 1 {
            // Contiguous runs: plain slices, which the compiler vectorises.
            let (a, b) = (&a[sa..sa + o.len()], &b[sb..sb + o.len()]);
            for ((v, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *v = f(x, y);
            }
        } else {
            for (k, v) in o.iter_mut().enumerate() {
                *v = f(a[sa + k * ta], b[sb + k * tb]);
            }
        }
    });
    out
}

/// out[i] = f(a[i], b[i], c[i]) over three strided inputs of `shape`; `out` holds numel(shape) elements, all
/// of which are written.
#[allow(clippy::too_many_arguments)]
fn map3<T: Float, U: Copy + Send>(
    mut out: Vec<U>,
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    c: &[T],
    lc: &Layout,
    shape: &[usize],
    f: impl Fn(T, T, T) -> U + Sync,
) -> Vec<U> {
    zip_runs(&mut out, shape, [la, lb, lc], |o, [sa, sb, sc], [ta, tb, tc]| {
        if ta == 1 && tb == 1 && tc == 1 {
            // Contiguous runs: plain slices, which the compiler vectorises.
            let n = o.len();
            let (a, b, c) = (&a[sa..sa + n], &b[sb..sb + n], &c[sc..sc + n]);
            for (((v, &x), &y), &z) in o.iter_mut().zip(a).zip(b).zip(c) {
                *v = f(x, y, z);
            }
        } else {
            for (k, v) in o.iter_mut().enumerate() {
                *v = f(a[sa + k * ta], b[sb + k * tb], c[sc + k * tc]);
            }
        }
    });
    out
}

pub(super) fn unary(op: Unary, x: &CpuStorage, lx: &Layout) -> CpuStorage {
    if let (Unary::Gelu, CpuStorage::F32(v)) = (op, x) {
        // The MLP's activation: erf four lanes at a time (gelu.rs), the same bits.
        return CpuStorage::F32(gelu::gelu_f32(v, lx));
    }
    fn run<T: Float>(op: Unary, x: &[T], lx: &Layout) -> Vec<T> {
        macro_rules! go {
            ($k:expr) => {
                map1(x, lx, move |v| $k.f(v))
            };
        }
        specialize_unary!(op, go)
    }
    with_cpu!(x, |v: T| T::into_storage(run(op, v, lx)))
}

/// (gelu(x), gelu'(x)) of a contiguous f32 tensor in one pass (gelu.rs); None for other dtypes.
pub(super) fn gelu_and_derivative(x: &CpuStorage, lx: &Layout) -> Option<(CpuStorage, CpuStorage)> {
    match x {
        CpuStorage::F32(v) if lx.is_contiguous() => {
            let (a, d) = gelu::gelu_and_derivative_f32(v.get(lx.offset()..lx.offset() + lx.numel())?);
            Some((CpuStorage::F32(a), CpuStorage::F32(d)))
        }
        _ => None,
    }
}

pub(super) fn unary_backward(
    op: Unary,
    x: &CpuStorage,
    lx: &Layout,
    y: &CpuStorage,
    ly: &Layout,
    g: &CpuStorage,
    lg: &Layout,
) -> Result<CpuStorage> {
    fn run<T: Float>(op: Unary, x: &[T], lx: &Layout, y: &[T], ly: &Layout, g: &[T], lg: &Layout) -> Vec<T> {
        macro_rules! go {
            ($k:expr) => {
                map3(engine::cpu_buffer(lx.numel()), x, lx, y, ly, g, lg, lx.shape(), move |xv, yv, gv| {
                    gv * $k.df(xv, yv)
                })
            };
        }
        specialize_unary!(op, go)
    }
    if let (Unary::Gelu, CpuStorage::F32(x), CpuStorage::F32(_), CpuStorage::F32(g)) = (op, x, y, g) {
        // GELU's derivative reads x alone (y is not used); erf four lanes at a time (gelu.rs), the same bits.
        return Ok(CpuStorage::F32(gelu::gelu_backward_f32(x, lx, g, lg)));
    }
    same_dtype!(op.name(), (x, y, g), |x, y, g; T| run::<T>(op, x, lx, y, ly, g, lg))
}

pub(super) fn binary(
    op: Binary,
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    shape: &[usize],
) -> Result<CpuStorage> {
    fn run<T: Float>(op: Binary, a: &[T], la: &Layout, b: &[T], lb: &Layout, shape: &[usize]) -> Vec<T> {
        macro_rules! go {
            ($k:expr) => {
                map2(a, la, b, lb, shape, move |x, y| $k.f(x, y))
            };
        }
        specialize_binary!(op, go)
    }
    same_dtype!(op.name(), (a, b), |a, b; T| run::<T>(op, a, la, b, lb, shape))
}

/// (g df/da, g df/db) over the broadcast shape of `g`.
pub(super) fn binary_backward(
    op: Binary,
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    g: &CpuStorage,
    lg: &Layout,
) -> Result<(CpuStorage, CpuStorage)> {
    fn run<T: Float>(op: Binary, a: &[T], la: &Layout, b: &[T], lb: &Layout, g: &[T], lg: &Layout) -> (Vec<T>, Vec<T>) {
        // One pass per gradient, each writing its own buffer (the formula's other half is dead code there).
        let n = lg.numel();
        macro_rules! go {
            ($k:expr) => {
                (
                    map3(engine::cpu_buffer(n), a, la, b, lb, g, lg, lg.shape(), move |x, y, gv| $k.df(x, y, gv).0),
                    map3(engine::cpu_buffer(n), a, la, b, lb, g, lg, lg.shape(), move |x, y, gv| $k.df(x, y, gv).1),
                )
            };
        }
        specialize_binary!(op, go)
    }
    match (a, b, g) {
        (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(g)) => {
            let (ga, gb) = run(op, a, la, b, lb, g, lg);
            Ok((CpuStorage::F32(ga), CpuStorage::F32(gb)))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(g)) => {
            let (ga, gb) = run(op, a, la, b, lb, g, lg);
            Ok((CpuStorage::F64(ga), CpuStorage::F64(gb)))
        }
        (a, _, g) => Err(mismatch(op.name(), a, g)),
    }
}

pub(super) fn compare(
    op: Cmp,
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    shape: &[usize],
) -> Result<CpuStorage> {
    fn run<T: Float>(op: Cmp, a: &[T], la: &Layout, b: &[T], lb: &Layout, shape: &[usize]) -> Vec<T> {
        let one_if = |c: bool| if c { T::ONE } else { T::ZERO };
        match op {
            Cmp::Eq => map2(a, la, b, lb, shape, |x, y| one_if(Cmp::Eq.f(x, y))),
            Cmp::Ne => map2(a, la, b, lb, shape, |x, y| one_if(Cmp::Ne.f(x, y))),
            Cmp::Lt => map2(a, la, b, lb, shape, |x, y| one_if(Cmp::Lt.f(x, y))),
            Cmp::Le => map2(a, la, b, lb, shape, |x, y| one_if(Cmp::Le.f(x, y))),
            Cmp::Gt => map2(a, la, b, lb, shape, |x, y| one_if(Cmp::Gt.f(x, y))),
            Cmp::Ge => map2(a, la, b, lb, shape, |x, y| one_if(Cmp::Ge.f(x, y))),
        }
    }
    same_dtype!(op.name(), (a, b), |a, b; T| run::<T>(op, a, la, b, lb, shape))
}

pub(super) fn where_(
    c: &CpuStorage,
    lc: &Layout,
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    shape: &[usize],
) -> Result<CpuStorage> {
    fn run<T: Float>(c: &[T], lc: &Layout, a: &[T], la: &Layout, b: &[T], lb: &Layout, shape: &[usize]) -> Vec<T> {
        map3(
            engine::cpu_buffer(shape.iter().product()),
            c,
            lc,
            a,
            la,
            b,
            lb,
            shape,
            |cv, x, y| if cv != T::ZERO { x } else { y },
        )
    }
    same_dtype!("where", (c, a, b), |c, a, b; T| run::<T>(c, lc, a, la, b, lb, shape))
}
