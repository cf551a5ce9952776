//! Integration tests of the MILA models, one binary.

mod ablation;
mod gradcheck;
mod modules;
mod parity;
mod size;
