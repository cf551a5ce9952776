//! mila-rs engine: tensors over shared storage with strided layouts, f32/f64, CPU and CUDA devices, a
//! reverse-mode tape with `no_grad`, a seedable generator and the finite-difference gradient checker.
//!
//! The differentiable ops live in the `ops` crate; the engine gives them [`Tensor::from_op`] to record a
//! node and the [`Op`] trait for their backward.

pub mod autograd;
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gradcheck;
pub mod layout;
pub mod rng;
pub mod storage;
pub mod tensor;

pub use autograd::{is_grad_enabled, no_grad, sum_pending, NoGradGuard, Op};
pub use device::Device;
pub use dtype::{DType, Float};
pub use error::{Error, Result};
pub use gradcheck::{gradcheck, gradcheck_with, GradcheckOptions, GradcheckReport};
pub use layout::{broadcast_shape, contiguous_strides, normalize_dim, Layout};
pub use rng::Generator;
pub use storage::cpu_memory::{self, CpuMemoryStats};
pub use storage::{cpu_buffer, cpu_filled, CpuStorage, Storage};
pub use tensor::{Tensor, TensorId};
