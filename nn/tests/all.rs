//! Integration tests of nn, one binary.

mod optim;
