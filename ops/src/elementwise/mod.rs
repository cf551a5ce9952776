//! Elementwise ops: unary math, binary arithmetic with NumPy broadcasting, comparisons and `where`.
//!
//! Unary y = f(x); backward dL/dx = g * f'(x), computed by one fused kernel from x, y and g:
//!
//! | op | f(x) | f'(x) |
//! | --- | --- | --- |
//! | neg | -x | -1 |
//! | exp | e^x | y |
//! | log | ln x | 1/x |
//! | sqrt | sqrt x | 1/(2y) |
//! | rsqrt | 1/sqrt x | -y^3/2 |
//! | abs | abs x | sign x (0 at 0) |
//! | relu | max(x, 0) | 1 if x > 0 else 0 |
//! | gelu | x Phi(x) = x (1 + erf(x/sqrt 2)) / 2 | Phi(x) + x phi(x) |
//! | silu | x sigmoid(x) | s (1 + x (1 - s)) |
//! | elu(a) | x if x > 0 else a (e^x - 1) | 1 if x > 0 else y + a |
//! | softplus(b, t) | ln(1 + e^(bx)) / b, x if bx > t | sigmoid(bx) (1 if bx > t) |
//! | sigmoid | 1 / (1 + e^-x) | y (1 - y) |
//! | tanh | tanh x | 1 - y^2 |
//! | powf(p) | x^p | p x^(p-1) |
//! | add_scalar(c), mul_scalar(c), div_scalar(c) | x + c, c x, x / c | 1, c, 1/c |
//! | clamp_min(c), clamp_max(c) | max(x, c), min(x, c) | 1 where x is kept, else 0 |
//!
//! Binary y = f(a, b) over the broadcast shape; backward gives (g df/da, g df/db), each summed back to its
//! input's shape:
//!
//! | op | f | df/da | df/db |
//! | --- | --- | --- | --- |
//! | add | a + b | 1 | 1 |
//! | sub | a - b | 1 | -1 |
//! | mul | a b | b | a |
//! | div | a / b | 1/b | -a/b^2 |
//! | maximum | max(a, b) | 1 if a > b, 1/2 if a = b | 1 if b > a, 1/2 if a = b |
//! | minimum | min(a, b) | 1 if a < b, 1/2 if a = b | 1 if b < a, 1/2 if a = b |
//!
//! Comparisons return 1.0 / 0.0 in the inputs' dtype and carry no gradient. `where_(c, a, b)` picks a where
//! c != 0, else b; its gradient goes to the input that was picked.

pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod zip;

use engine::{broadcast_shape, Device, Error, Op, Result, Storage, Tensor};

use crate::reduce::sum_to_shape;
use crate::util::{no_cuda, same_dtype_device};
use crate::view::permute;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unary {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Abs,
    Relu,
    Gelu,
    Silu,
    Elu(f64),
    Softplus { beta: f64, threshold: f64 },
    Sigmoid,
    Tanh,
    Powf(f64),
    AddScalar(f64),
    MulScalar(f64),
    DivScalar(f64),
    ClampMin(f64),
    ClampMax(f64),
}

impl Unary {
    pub fn name(&self) -> &'static str {
        match self {
            Unary::Neg => "neg",
            Unary::Exp => "exp",
            Unary::Log => "log",
            Unary::Sqrt => "sqrt",
            Unary::Rsqrt => "rsqrt",
            Unary::Abs => "abs",
            Unary::Relu => "relu",
            Unary::Gelu => "gelu",
            Unary::Silu => "silu",
            Unary::Elu(_) => "elu",
            Unary::Softplus { .. } => "softplus",
            Unary::Sigmoid => "sigmoid",
            Unary::Tanh => "tanh",
            Unary::Powf(_) => "powf",
            Unary::AddScalar(_) => "add_scalar",
            Unary::MulScalar(_) => "mul_scalar",
            Unary::DivScalar(_) => "div_scalar",
            Unary::ClampMin(_) => "clamp_min",
            Unary::ClampMax(_) => "clamp_max",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
}

impl Binary {
    pub fn name(&self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
            Binary::Maximum => "maximum",
            Binary::Minimum => "minimum",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    pub fn name(&self) -> &'static str {
        match self {
            Cmp::Eq => "eq",
            Cmp::Ne => "ne",
            Cmp::Lt => "lt",
            Cmp::Le => "le",
            Cmp::Gt => "gt",
            Cmp::Ge => "ge",
        }
    }
}

/// What a unary op's derivative reads (the `df` column of the table above), so that its backward saves
/// only that: the input x, the output y, or neither. Saving both would keep one tensor alive per op for
/// nothing (an `add_scalar` between two layers would hold its input and output until backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Needs {
    Nothing,
    X,
    Y,
}

impl Unary {
    pub(crate) fn needs(&self) -> Needs {
        match *self {
            Unary::Neg | Unary::AddScalar(_) | Unary::MulScalar(_) | Unary::DivScalar(_) => Needs::Nothing,
            Unary::Exp | Unary::Sqrt | Unary::Rsqrt | Unary::Sigmoid | Unary::Tanh => Needs::Y,
            // f'(x) = 1 where x > 0, else y + alpha; for alpha > 0, x > 0 exactly when y > 0 (y = x there, and
            // y = alpha (e^x - 1) <= 0 elsewhere), so y alone gives the same bits, read in x's place.
            Unary::Elu(a) if a > 0.0 => Needs::Y,
            Unary::Log
            | Unary::Abs
            | Unary::Relu
            | Unary::Gelu
            | Unary::Silu
            | Unary::Elu(_)
            | Unary::Softplus { .. }
            | Unary::Powf(_)
            | Unary::ClampMin(_)
            | Unary::ClampMax(_) => Needs::X,
        }
    }
}

struct UnaryBackward {
    op: Unary,
    /// x or y or neither, per [`Unary::needs`] (ELU with alpha <= 0 is the one op that reads both; it saves
    /// x here and y below).
    saved: Option<Tensor>,
    y_for_elu: Option<Tensor>,
    shape: Vec<usize>,
}

impl Op for UnaryBackward {
    fn name(&self) -> &'static str {
        self.op.name()
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        // The kernels take (x, y); an operand the derivative does not read is given as another tensor of the
        // same shape (the saved one, or g), which they never read for this op.
        let x = self.saved.as_ref().unwrap_or(g);
        let y = self.y_for_elu.as_ref().unwrap_or(x);
        Ok(vec![Some(unary_grad(self.op, x, y, g, &self.shape)?)])
    }
}

/// g f'(x) of a unary op, from x and y = f(x) (either may stand in for the other where `op.needs()` says
/// the derivative does not read it), as a new tensor of `shape`.
pub(crate) fn unary_grad(op: Unary, x: &Tensor, y: &Tensor, g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let storage = match (&*x.storage(), &*y.storage(), &*g.storage()) {
        (Storage::Cpu(xs), Storage::Cpu(ys), Storage::Cpu(gs)) => {
            Storage::Cpu(cpu::unary_backward(op, xs, x.layout(), ys, y.layout(), gs, g.layout())?)
        }
        (Storage::Cuda(xs), Storage::Cuda(ys), Storage::Cuda(gs)) => {
            Storage::Cuda(cuda::unary_backward(op, (xs, x.layout()), (ys, y.layout()), (gs, g.layout()))?)
        }
        (s, _, _) => return Err(no_cuda(op.name(), s)),
    };
    Tensor::from_storage(storage, shape)
}

/// (gelu(x), gelu'(x)) for a contiguous f32 CPU tensor, in one pass that evaluates erf once per element
/// for both: the bits of `unary(Gelu, x)` and of the derivative by which `unary_grad(Gelu, ..)` multiplies
/// its gradient (g * gelu'(x) is that product). None on CUDA or for other dtypes and layouts. Not recorded.
pub(crate) fn gelu_and_derivative(x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let pair = match &*x.storage() {
        Storage::Cpu(s) => cpu::gelu_and_derivative(s, x.layout()),
        Storage::Cuda(_) => None,
    };
    let Some((a, d)) = pair else { return Ok(None) };
    Ok(Some((Tensor::from_storage(Storage::Cpu(a), x.shape())?, Tensor::from_storage(Storage::Cpu(d), x.shape())?)))
}

/// For a CPU tensor that is a permutation of contiguous memory (a channels-last image, a transposed matrix)
/// but not contiguous itself: the permutation that makes it contiguous, and its inverse. Elementwise ops
/// compute such a tensor in memory order and answer the same permutation of their output, as PyTorch keeps
/// a tensor's memory format, so that the next op sees the layout it gave (no strided walk, no copy).
fn memory_order(x: &Tensor) -> Option<(Vec<usize>, Vec<usize>)> {
    if x.device() != Device::Cpu || x.is_contiguous() {
        return None;
    }
    // Dims by decreasing stride (size-1 dims last: their stride means nothing).
    let mut perm: Vec<usize> = (0..x.rank()).collect();
    perm.sort_by_key(|&d| (x.shape()[d] == 1, std::cmp::Reverse(x.strides()[d])));
    if !x.layout().permute(&perm).ok()?.is_contiguous() {
        return None;
    }
    let mut inverse = vec![0; perm.len()];
    for (i, &d) in perm.iter().enumerate() {
        inverse[d] = i;
    }
    Some((perm, inverse))
}

/// Applies a unary op.
pub fn unary(op: Unary, x: &Tensor) -> Result<Tensor> {
    if let Some((perm, inverse)) = memory_order(x) {
        return permute(&unary(op, &permute(x, &perm)?)?, &inverse);
    }
    let storage = match &*x.storage() {
        Storage::Cpu(s) => Storage::Cpu(cpu::unary(op, s, x.layout())),
        Storage::Cuda(s) => Storage::Cuda(cuda::unary(op, s, x.layout())?),
    };
    Ok(Tensor::from_op_with_output(storage, x.shape(), &[x], |y| {
        let (saved, y_for_elu) = match op.needs() {
            Needs::Nothing => (None, None),
            Needs::Y => (Some(y), None),
            Needs::X if matches!(op, Unary::Elu(_)) => (Some(x.detach()), Some(y)),
            Needs::X => (Some(x.detach()), None),
        };
        UnaryBackward { op, saved, y_for_elu, shape: x.shape().to_vec() }
    }))
}

struct BinaryBackward {
    op: Binary,
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
    /// The inputs, for the ops whose derivative depends on them (not add and sub).
    saved: Option<(Tensor, Tensor)>,
}

impl Op for BinaryBackward {
    fn name(&self) -> &'static str {
        self.op.name()
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (ga, gb) = match (&self.saved, self.op) {
            (None, Binary::Add) => (g.clone(), g.clone()),
            (None, Binary::Sub) => (g.clone(), crate::elementwise::neg(g)?),
            (None, op) => return Err(Error::BackwardNotSupported { op: op.name() }),
            (Some((a, b)), op) => binary_grad(op, a, b, g)?,
        };
        Ok(vec![Some(sum_to_shape(&ga, &self.a_shape)?), Some(sum_to_shape(&gb, &self.b_shape)?)])
    }
}

/// (g dc/da, g dc/db) of a binary op c = op(a, b) that reads its inputs (not add or sub), at g's shape: a and b
/// broadcast to it, the sums over broadcast dims left to the caller.
pub(crate) fn binary_grad(op: Binary, a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let la = a.layout().broadcast_as(g.shape())?;
    let lb = b.layout().broadcast_as(g.shape())?;
    let (ga, gb) = match (&*a.storage(), &*b.storage(), &*g.storage()) {
        (Storage::Cpu(sa), Storage::Cpu(sb), Storage::Cpu(sg)) => {
            let (ga, gb) = cpu::binary_backward(op, sa, &la, sb, &lb, sg, g.layout())?;
            (Storage::Cpu(ga), Storage::Cpu(gb))
        }
        (Storage::Cuda(sa), Storage::Cuda(sb), Storage::Cuda(sg)) => {
            let (ga, gb) = cuda::binary_backward(op, (sa, &la), (sb, &lb), (sg, g.layout()))?;
            (Storage::Cuda(ga), Storage::Cuda(gb))
        }
        (s, _, _) => return Err(no_cuda(op.name(), s)),
    };
    Ok((Tensor::from_storage(ga, g.shape())?, Tensor::from_storage(gb, g.shape())?))
}

/// Applies a binary op with NumPy broadcasting.
pub fn binary(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_dtype_device(op.name(), a, b)?;
    // Two operands of one permuted-contiguous layout (see `memory_order`): in memory order, kept so.
    if a.shape() == b.shape() && a.strides() == b.strides() {
        if let Some((perm, inverse)) = memory_order(a) {
            return permute(&binary(op, &permute(a, &perm)?, &permute(b, &perm)?)?, &inverse);
        }
    }
    let shape = broadcast_shape(op.name(), a.shape(), b.shape())?;
    let la = a.layout().broadcast_as(&shape)?;
    let lb = b.layout().broadcast_as(&shape)?;
    let storage = match (&*a.storage(), &*b.storage()) {
        (Storage::Cpu(sa), Storage::Cpu(sb)) => Storage::Cpu(cpu::binary(op, sa, &la, sb, &lb, &shape)?),
        (Storage::Cuda(sa), Storage::Cuda(sb)) => Storage::Cuda(cuda::binary(op, sa, &la, sb, &lb)?),
        (s, _) => return Err(no_cuda(op.name(), s)),
    };
    Ok(Tensor::from_op(storage, &shape, &[a, b], || BinaryBackward {
        op,
        a_shape: a.shape().to_vec(),
        b_shape: b.shape().to_vec(),
        saved: match op {
            Binary::Add | Binary::Sub => None,
            _ => Some((a.detach(), b.detach())),
        },
    }))
}

/// Compares elementwise with broadcasting; 1.0 where true, 0.0 elsewhere; no gradient.
pub fn compare(op: Cmp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_dtype_device(op.name(), a, b)?;
    let shape = broadcast_shape(op.name(), a.shape(), b.shape())?;
    let la = a.layout().broadcast_as(&shape)?;
    let lb = b.layout().broadcast_as(&shape)?;
    let storage = match (&*a.storage(), &*b.storage()) {
        (Storage::Cpu(sa), Storage::Cpu(sb)) => Storage::Cpu(cpu::compare(op, sa, &la, sb, &lb, &shape)?),
        (Storage::Cuda(sa), Storage::Cuda(sb)) => Storage::Cuda(cuda::compare(op, sa, &la, sb, &lb)?),
        (s, _) => return Err(no_cuda(op.name(), s)),
    };
    Tensor::from_storage(storage, &shape)
}

/// Compares with a scalar.
pub fn compare_scalar(op: Cmp, a: &Tensor, value: f64) -> Result<Tensor> {
    compare(op, a, &Tensor::scalar(value, a.dtype(), a.device())?)
}

struct WhereBackward {
    cond: Tensor,
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
}

impl Op for WhereBackward {
    fn name(&self) -> &'static str {
        "where"
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let zero = Tensor::scalar(0.0, g.dtype(), g.device())?;
        let ga = where_untracked(&self.cond, g, &zero)?;
        let gb = where_untracked(&self.cond, &zero, g)?;
        Ok(vec![None, Some(sum_to_shape(&ga, &self.a_shape)?), Some(sum_to_shape(&gb, &self.b_shape)?)])
    }
}

fn where_storage(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Storage, Vec<usize>)> {
    same_dtype_device("where", a, b)?;
    same_dtype_device("where", cond, a)?;
    let shape = broadcast_shape("where", &broadcast_shape("where", cond.shape(), a.shape())?, b.shape())?;
    let lc = cond.layout().broadcast_as(&shape)?;
    let la = a.layout().broadcast_as(&shape)?;
    let lb = b.layout().broadcast_as(&shape)?;
    let storage = match (&*cond.storage(), &*a.storage(), &*b.storage()) {
        (Storage::Cpu(c), Storage::Cpu(sa), Storage::Cpu(sb)) => {
            Storage::Cpu(cpu::where_(c, &lc, sa, &la, sb, &lb, &shape)?)
        }
        (Storage::Cuda(c), Storage::Cuda(sa), Storage::Cuda(sb)) => {
            Storage::Cuda(cuda::where_((c, &lc), (sa, &la), (sb, &lb))?)
        }
        (s, _, _) => return Err(no_cuda("where", s)),
    };
    Ok((storage, shape))
}

fn where_untracked(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (storage, shape) = where_storage(cond, a, b)?;
    Tensor::from_storage(storage, &shape)
}

/// `a` where `cond` is non-zero, else `b`, all three broadcast together. `cond` gets no gradient.
pub fn where_(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (storage, shape) = where_storage(cond, a, b)?;
    Ok(Tensor::from_op(storage, &shape, &[cond, a, b], || WhereBackward {
        cond: cond.detach(),
        a_shape: a.shape().to_vec(),
        b_shape: b.shape().to_vec(),
    }))
}

macro_rules! unary_fns {
    ($($fn_name:ident => $op:expr, $doc:literal;)*) => {$(
        #[doc = $doc]
        pub fn $fn_name(x: &Tensor) -> Result<Tensor> {
            unary($op, x)
        }
    )*};
}

unary_fns! {
    neg => Unary::Neg, "-x";
    exp => Unary::Exp, "e^x";
    log => Unary::Log, "natural logarithm";
    sqrt => Unary::Sqrt, "square root";
    rsqrt => Unary::Rsqrt, "1 / sqrt(x)";
    abs => Unary::Abs, "|x|";
    relu => Unary::Relu, "max(x, 0)";
    gelu => Unary::Gelu, "x * Phi(x), the exact (erf) GELU";
    silu => Unary::Silu, "x * sigmoid(x)";
    sigmoid => Unary::Sigmoid, "1 / (1 + e^-x)";
    tanh => Unary::Tanh, "hyperbolic tangent";
}

/// ELU with slope `alpha` for negative inputs.
pub fn elu(x: &Tensor, alpha: f64) -> Result<Tensor> {
    unary(Unary::Elu(alpha), x)
}

/// ln(1 + e^(beta x)) / beta, linear above `threshold` (PyTorch defaults: beta 1, threshold 20).
pub fn softplus(x: &Tensor, beta: f64, threshold: f64) -> Result<Tensor> {
    if beta == 0.0 {
        return Err(Error::invalid("softplus", "beta must be non-zero", x.shape()));
    }
    unary(Unary::Softplus { beta, threshold }, x)
}

pub fn powf(x: &Tensor, p: f64) -> Result<Tensor> {
    unary(Unary::Powf(p), x)
}

pub fn add_scalar(x: &Tensor, c: f64) -> Result<Tensor> {
    unary(Unary::AddScalar(c), x)
}

pub fn sub_scalar(x: &Tensor, c: f64) -> Result<Tensor> {
    unary(Unary::AddScalar(-c), x)
}

pub fn mul_scalar(x: &Tensor, c: f64) -> Result<Tensor> {
    unary(Unary::MulScalar(c), x)
}

pub fn div_scalar(x: &Tensor, c: f64) -> Result<Tensor> {
    unary(Unary::DivScalar(c), x)
}

/// max(x, c) elementwise.
pub fn maximum_scalar(x: &Tensor, c: f64) -> Result<Tensor> {
    unary(Unary::ClampMin(c), x)
}

/// min(x, c) elementwise.
pub fn minimum_scalar(x: &Tensor, c: f64) -> Result<Tensor> {
    unary(Unary::ClampMax(c), x)
}

pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Binary::Add, a, b)
}
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Binary::Sub, a, b)
}
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Binary::Mul, a, b)
}
pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Binary::Div, a, b)
}
pub fn maximum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Binary::Maximum, a, b)
}
pub fn minimum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Binary::Minimum, a, b)
}

#[cfg(test)]
mod tests;
