//! mila-rs ops.
