//! MILA, MLLA and Mamba on mila-rs (issues 6 and 8).
