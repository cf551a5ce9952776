//! Integration tests of nn, one binary.

mod checkpoint;
mod data;
mod modules;
mod optim;
mod trainer;
