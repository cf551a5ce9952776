//! Integration tests of the ops crate, one binary (faster to build, smaller to carry to the GPU).

mod autograd;
mod cuda;
mod parity;
mod random_shapes;
mod scan;
