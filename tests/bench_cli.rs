//! Smoke runs of `mila bench ops` and `mila bench vision` on the CPU with --quick: the table is printed, the
//! JSON is written, and every number in it is finite. Nothing here asserts a timing.

use std::path::PathBuf;

fn run_bench(which: &str) -> (String, serde_json::Value) {
    let dir = std::env::temp_dir().join(format!("mila-bench-{which}-{}", std::process::id()));
    let json: PathBuf = dir.join("out.json");
    let out = crate::mila()
        .args(["bench", which, "--quick", "--device", "cpu", "--json"])
        .arg(&json)
        .output()
        .expect("the mila binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "mila bench {which} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON file is written")).expect("valid JSON");
    std::fs::remove_dir_all(&dir).unwrap();
    (stdout, value)
}

/// Every table row is printed, and every rate, time and ratio in the JSON is a finite positive number.
fn check(which: &str, expected: &[&str]) {
    let (stdout, json) = run_bench(which);
    assert!(stdout.contains(&format!("mila bench {which}: cpu")), "{stdout}");
    assert!(stdout.contains("| case | shape (f32) | median ms |"), "{stdout}");
    for name in expected {
        assert!(stdout.lines().any(|l| l.starts_with(&format!("| {name}"))), "no row '{name}' in\n{stdout}");
    }
    for line in stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| case")) {
        assert!(!line.contains("NaN") && !line.contains("inf"), "a number is not finite: {line}");
    }
    assert_eq!(json["bench"], which);
    let rows = json["rows"].as_array().expect("rows");
    assert!(rows.len() >= expected.len());
    for row in rows {
        for key in ["median_ms", "min_ms", "max_ms", "rate"] {
            let v = row[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "{key} = {v} in {row}");
        }
        if !row["ratio"].is_null() {
            let v = row["ratio"].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "ratio = {v} in {row}");
        }
    }
}

#[test]
fn bench_ops_quick_prints_finite_numbers() {
    check("ops", &["sgemm (1)", "sgemm: ops::matmul", "copy (1)", "copy: ops::copy_into", "add: ops::add", "sum:"]);
}

#[test]
fn bench_vision_quick_prints_finite_numbers() {
    check(
        "vision",
        &[
            "depthwise conv3x3 forward",
            "depthwise conv3x3 backward",
            "layer_norm forward+backward",
            "dense conv3x3 forward",
        ],
    );
}
