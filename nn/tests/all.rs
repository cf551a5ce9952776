//! Integration tests of nn, one binary.

mod checkpoint;
mod modules;
mod optim;
