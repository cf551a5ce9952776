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

/// `mila bench models --quick --device cpu` beside the PyTorch half's JSON from the same quick sizes
/// (`tests/data/pytorch_models_quick.json`, written by `benches/pytorch/bench_models.py --quick --device cpu
/// --compile`): every workload row is printed with finite numbers, and each is matched with PyTorch's row, so
/// the ratios are there. Nothing here asserts a timing.
#[test]
fn bench_models_quick_reads_the_pytorch_json() {
    let dir = std::env::temp_dir().join(format!("mila-bench-models-{}", std::process::id()));
    let json: PathBuf = dir.join("out.json");
    let pytorch = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pytorch_models_quick.json");
    let out = crate::mila()
        .args(["bench", "models", "--quick", "--device", "cpu", "--pytorch-json", pytorch, "--json"])
        .arg(&json)
        .output()
        .expect("the mila binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "mila bench models failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("mila bench models: ours on cpu"), "{stdout}");
    assert!(stdout.contains("| workload | shape | ours | PyTorch eager | torch.compile | ours/eager |"), "{stdout}");
    let names = [
        "MLLA-T training step (AdamW), fp32",
        "MLLA-T inference, fp32",
        "MILA block forward, fp32",
        "MILA block forward+backward, fp32",
        "small MLLA training step (AdamW), fp32",
    ];
    for name in names {
        assert!(stdout.lines().any(|l| l.starts_with(&format!("| {name} |"))), "no row '{name}' in\n{stdout}");
    }
    for line in stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| workload")) {
        let bad = |t: &str| ["NaN", "inf", "-inf"].contains(&t.trim_end_matches('x'));
        assert!(!line.split([' ', '|']).any(bad) && !line.contains("NOT FINITE"), "a number is not finite: {line}");
    }
    assert!(!stdout.contains("not compared"), "a PyTorch row did not match ours:\n{stdout}");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON file is written")).expect("valid JSON");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(value["bench"], "models");
    let rows = value["rows"].as_array().expect("rows");
    let keys: Vec<&str> = rows.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["mlla_t_train_fp32", "mlla_t_infer_fp32", "block_fwd", "block_fwd_bwd", "small_train"]);
    let positive = |v: &serde_json::Value, what: &str| {
        let x = v.as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{what} = {v}");
    };
    for row in rows {
        assert_eq!(row["finite"], true, "{row}");
        for key in ["median_ms", "min_ms", "max_ms"] {
            positive(&row["ours"][key], key);
        }
        positive(&row["pytorch_eager"]["median_ms"], "PyTorch eager median_ms");
        positive(&row["ratio_eager"], "ratio_eager");
    }
    // The compiled PyTorch step is in the small model's row only.
    positive(&rows[4]["ratio_compile"], "ratio_compile");
    assert!(rows[..4].iter().all(|r| r["ratio_compile"].is_null()));
    for row in &rows[..2] {
        positive(&row["ours_images_per_s"], "ours_images_per_s");
    }
}
