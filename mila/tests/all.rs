//! Integration tests of the MILA models, one binary.

mod ablation;
mod cuda;
mod gradcheck;
mod mamba;
mod memory;
mod modules;
mod parity;
mod size;
mod ss2d;
