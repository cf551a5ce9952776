//! mila-rs ops: the differentiable primitives, one folder per family. Each folder's `mod.rs` opens with the
//! math (forward, derivative, shapes) and holds the op and its backward; `cpu.rs` holds the CPU kernel and,
//! where the family has one, a `.cu` file the CUDA kernel.
//!
//! Derived ops (softmax, cross-entropy, mean, ...) are compositions in `derived.rs` with no backward code of
//! their own. `suite.rs` lists every op for the gradient checker; `ext.rs` gives them method syntax.

pub mod conv;
pub mod copy;
pub mod cuda;
pub mod derived;
pub mod elementwise;
pub mod ext;
pub mod linattn;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod reduce;
pub mod regularize;
pub mod rope;
pub mod scan;
pub mod shape;
pub mod suite;
pub mod view;

#[cfg(test)]
mod testing;
mod util;

pub use conv::{causal_conv1d, conv2d, conv2d_act, conv2d_ref, conv2d_residual};
pub use copy::copy_into;
pub use derived::{cross_entropy, cross_entropy_soft, log_softmax, mean, min, smoothed_targets, softmax, var};
pub use elementwise::*;
pub use ext::TensorOps;
pub use linattn::{linear_attention, linear_attention_ref};
pub use matmul::{act_linear, gated_linear, layer_norm_linears, linear, linear_relu, matmul, matmul_ref};
pub use norm::{batch_norm2d, layer_norm};
pub use reduce::{max, sum, sum_all, sum_to_shape};
pub use regularize::{add_drop_path, drop_path, dropout, with_fed_masks, FedMask};
pub use rope::rope2d;
pub use scan::{selective_scan, selective_scan_ref};
pub use shape::{chunk, concat, index_select, pad, split, stack};
pub use view::{expand, flatten, narrow, permute, reshape, select, squeeze, t, transpose, unsqueeze};
