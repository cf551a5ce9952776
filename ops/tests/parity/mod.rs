//! Parity with the official PyTorch code, through the fixtures in `fixtures/` at the repository root.

mod linear_attention;
