//! Method syntax: `use ops::TensorOps;` then `x.matmul(&w)?.add(&b)?.relu()?`. Each method is the free
//! function of the same name.

use engine::{Generator, Result, Tensor};

use crate::elementwise::{self as ew, Cmp};

macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*) => $path:path;)*) => {
        $(fn $name(&self, $($arg: $ty),*) -> Result<Tensor>;)*
    };
}

macro_rules! implement {
    ($($name:ident($($arg:ident: $ty:ty),*) => $path:path;)*) => {
        $(fn $name(&self, $($arg: $ty),*) -> Result<Tensor> { $path(self, $($arg),*) })*
    };
}

macro_rules! tensor_ops {
    ($($body:tt)*) => {
        pub trait TensorOps {
            forward! { $($body)* }
        }
        impl TensorOps for Tensor {
            implement! { $($body)* }
        }
    };
}

tensor_ops! {
    reshape(shape: &[isize]) => crate::view::reshape;
    permute(dims: &[usize]) => crate::view::permute;
    transpose(a: isize, b: isize) => crate::view::transpose;
    t() => crate::view::t;
    narrow(dim: isize, start: usize, len: usize) => crate::view::narrow;
    select(dim: isize, index: usize) => crate::view::select;
    expand(shape: &[usize]) => crate::view::expand;
    unsqueeze(dim: isize) => crate::view::unsqueeze;
    squeeze(dim: isize) => crate::view::squeeze;
    flatten(start: isize, end: isize) => crate::view::flatten;
    neg() => ew::neg;
    exp() => ew::exp;
    log() => ew::log;
    sqrt() => ew::sqrt;
    rsqrt() => ew::rsqrt;
    abs() => ew::abs;
    relu() => ew::relu;
    gelu() => ew::gelu;
    silu() => ew::silu;
    sigmoid() => ew::sigmoid;
    tanh() => ew::tanh;
    elu(alpha: f64) => ew::elu;
    softplus(beta: f64, threshold: f64) => ew::softplus;
    powf(p: f64) => ew::powf;
    add_scalar(c: f64) => ew::add_scalar;
    sub_scalar(c: f64) => ew::sub_scalar;
    mul_scalar(c: f64) => ew::mul_scalar;
    div_scalar(c: f64) => ew::div_scalar;
    maximum_scalar(c: f64) => ew::maximum_scalar;
    minimum_scalar(c: f64) => ew::minimum_scalar;
    add(other: &Tensor) => ew::add;
    sub(other: &Tensor) => ew::sub;
    mul(other: &Tensor) => ew::mul;
    div(other: &Tensor) => ew::div;
    maximum(other: &Tensor) => ew::maximum;
    minimum(other: &Tensor) => ew::minimum;
    sum(dims: &[isize], keepdim: bool) => crate::reduce::sum;
    sum_all() => crate::reduce::sum_all;
    max(dims: &[isize], keepdim: bool) => crate::reduce::max;
    min(dims: &[isize], keepdim: bool) => crate::derived::min;
    mean(dims: &[isize], keepdim: bool) => crate::derived::mean;
    var(dims: &[isize], correction: usize, keepdim: bool) => crate::derived::var;
    softmax(dim: isize) => crate::derived::softmax;
    log_softmax(dim: isize) => crate::derived::log_softmax;
    matmul(other: &Tensor) => crate::matmul::matmul;
    index_select(dim: isize, indices: &[usize]) => crate::shape::index_select;
    pad(pads: &[(usize, usize)], value: f64) => crate::shape::pad;
    conv2d(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize
    ) => crate::conv::conv2d;
    causal_conv1d(weight: &Tensor, bias: Option<&Tensor>) => crate::conv::causal_conv1d;
    layer_norm(weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) => crate::norm::layer_norm;
    rope2d(h: usize, w: usize, base: f64) => crate::rope::rope2d;
    dropout(p: f64, training: bool, g: &mut Generator) => crate::regularize::dropout;
    drop_path(p: f64, training: bool, g: &mut Generator) => crate::regularize::drop_path;
    eq(other: &Tensor) => eq;
    lt(other: &Tensor) => lt;
    gt(other: &Tensor) => gt;
}

fn eq(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ew::compare(Cmp::Eq, a, b)
}
fn lt(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ew::compare(Cmp::Lt, a, b)
}
fn gt(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ew::compare(Cmp::Gt, a, b)
}
