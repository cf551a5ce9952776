//! Integration tests of the MILA models, one binary.

mod cuda;
mod gradcheck;
mod modules;
mod parity;
mod size;
