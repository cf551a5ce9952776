//! `mila train`'s flags: bad values are refused with a message that names the flag, before any training.

use crate::mila;

fn refused(args: &[&str], expected: &str) {
    let out = mila()
        .args(["train", "--epochs", "1", "--out"])
        .arg(std::env::temp_dir().join("mila-train-cli"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
}

#[test]
fn bad_training_flags_are_refused_by_name() {
    refused(&["--clip-grad", "0"], "--clip-grad 0 is not a positive norm");
    refused(&["--clip-grad", "nan"], "--clip-grad NaN is not a positive norm");
    refused(&["--drop-last", "maybe"], "--drop-last");
    refused(&["--drop-path", "1"], "--drop-path 1 is not in [0, 1)");
}
