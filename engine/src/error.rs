//! The one error type of mila-rs. Every variant names the op and the shapes, dtypes or devices involved, so a
//! message read without the code still says what went wrong and where.

use crate::{DType, Device};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch between {lhs:?} and {rhs:?}")]
    ShapeMismatch { op: &'static str, lhs: Vec<usize>, rhs: Vec<usize> },

    #[error("{op}: shapes {lhs:?} and {rhs:?} cannot be broadcast together")]
    Broadcast { op: &'static str, lhs: Vec<usize>, rhs: Vec<usize> },

    #[error("{op}: dtype mismatch, {lhs} and {rhs}")]
    DTypeMismatch { op: &'static str, lhs: DType, rhs: DType },

    #[error("{op}: device mismatch, {lhs} and {rhs}")]
    DeviceMismatch { op: &'static str, lhs: Device, rhs: Device },

    #[error("{op}: dim {dim} is out of range for a tensor of shape {shape:?}")]
    DimOutOfRange { op: &'static str, dim: isize, shape: Vec<usize> },

    #[error("{op}: cannot view {numel} elements of shape {shape:?} as {target:?}")]
    ElementCount { op: &'static str, shape: Vec<usize>, numel: usize, target: Vec<isize> },

    #[error("{op}: {msg} (shape {shape:?})")]
    InvalidArgument { op: &'static str, msg: String, shape: Vec<usize> },

    #[error("{op}: not supported for dtype {dtype} on {device}")]
    Unsupported { op: &'static str, dtype: DType, device: Device },

    #[error("backward: the gradient of {op} is not implemented")]
    BackwardNotSupported { op: &'static str },

    #[error("backward: {op} returned a gradient of shape {got:?} for an input of shape {expected:?}")]
    BackwardShape { op: &'static str, got: Vec<usize>, expected: Vec<usize> },

    #[error("backward: called on a tensor of shape {shape:?}; only a scalar (one element) has an implicit cotangent, use backward_with")]
    NotScalar { shape: Vec<usize> },

    #[error("backward: the tensor does not require grad and has no graph (was it made under no_grad, or detached?)")]
    NoGraph,

    #[error("backward: the graph through {op} was already freed by an earlier backward")]
    GraphFreed { op: &'static str },

    #[error("cuda: device {ordinal} unavailable: {reason}")]
    CudaUnavailable { ordinal: usize, reason: String },

    #[error("cuda: {op}: {msg}")]
    Cuda { op: &'static str, msg: String },

    #[error("nvrtc: compiling {module} failed:\n{log}")]
    Nvrtc { module: &'static str, log: String },

    #[error("cublas: {op}: {msg}")]
    Cublas { op: &'static str, msg: String },

    #[error("gradcheck: {0}")]
    Gradcheck(String),

    #[error("io: {path}: {source}")]
    Io { path: String, source: std::io::Error },

    #[error("{context}: {msg}")]
    Msg { context: &'static str, msg: String },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, msg: impl Into<String>, shape: &[usize]) -> Self {
        Error::InvalidArgument { op, msg: msg.into(), shape: shape.to_vec() }
    }
}

/// Returns early with an [`Error::InvalidArgument`].
#[macro_export]
macro_rules! bail_invalid {
    ($op:expr, $shape:expr, $($arg:tt)*) => {
        return Err($crate::Error::invalid($op, format!($($arg)*), $shape))
    };
}
