//! mila-rs ops: the differentiable primitives, one folder per family. Each folder's `mod.rs` opens with the
//! math (forward, derivative, shapes) and holds the op and its backward; `cpu.rs` holds the CPU kernel and,
//! where the family has one, a `.cu` file the CUDA kernel.
//!
//! Derived ops (softmax, cross-entropy, mean, ...) are compositions in `derived.rs` with no backward code of
//! their own.

pub mod conv;
pub mod copy;
pub mod norm;
pub mod reduce;
pub mod regularize;
pub mod rope;
pub mod view;

mod util;

pub use conv::{causal_conv1d, conv2d, conv2d_ref};
pub use copy::copy_into;
pub use norm::{batch_norm2d, layer_norm};
pub use reduce::{max, sum, sum_all, sum_to_shape};
pub use regularize::{drop_path, dropout};
pub use rope::rope2d;
pub use view::{expand, flatten, narrow, permute, reshape, select, squeeze, t, transpose, unsqueeze};
pub mod elementwise;
pub use elementwise::*;
pub mod derived;
#[cfg(test)]
mod testing;
pub use derived::{cross_entropy, log_softmax, mean, min, softmax, var};
pub mod ext;
pub mod suite;
pub use ext::TensorOps;
