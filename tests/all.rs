//! Integration tests of the `mila` command line, one binary (faster to build, smaller to carry to the GPU).

mod ablate;
mod bench_cli;
mod train_cli;

use std::path::PathBuf;
use std::process::Command;

/// The `mila` binary: the one cargo built for these tests, or, where the tests were built on another machine
/// and carried (the GPU machine: `.gpu/bin/mila` beside `.gpu/tests/`), the packed one.
pub fn mila() -> Command {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_mila"));
    let packed = PathBuf::from(".gpu/bin/mila");
    Command::new(if !built.exists() && packed.exists() { packed } else { built })
}
