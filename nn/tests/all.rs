//! Integration tests of nn, one binary.

mod modules;
mod optim;
