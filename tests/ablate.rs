//! `mila ablate` end to end, through the binary: a tiny run of two variants prints their rows of the table
//! and writes the JSON; a bad variant name is an error that lists the good ones.

fn mila(args: &[&str]) -> std::process::Output {
    crate::mila().args(args).output().unwrap()
}

#[test]
fn a_tiny_ablate_prints_the_table_and_writes_json() {
    let out = std::env::temp_dir().join(format!("mila-ablate-cli-{}", std::process::id()));
    let out_arg = out.to_str().unwrap();
    // Two variants, 4 steps of 64 images each.
    let run = mila(&[
        "ablate",
        "--variants",
        "baseline,forget-gate",
        "--epochs",
        "1",
        "--train-samples",
        "256",
        "--test-samples",
        "128",
        "--batch-size",
        "64",
        "--out",
        out_arg,
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("| variant | params | MACs | train img/s | infer img/s | top-1 |"), "{stdout}");
    // Parameters and MACs of the MNIST networks (mila/tests/ablation.rs derives their differences).
    for row in ["| baseline linear attention | 0.412M | 2.15M | ", "| + forget gate | 0.435M | 2.33M | "] {
        assert!(stdout.contains(row), "no row '{row}' in:\n{stdout}");
    }
    assert!(!stdout.contains("| + shortcut |"), "only the variants asked for:\n{stdout}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ablate.json")).unwrap()).unwrap();
    assert_eq!(json["settings"]["train_samples"], 256);
    assert_eq!(json["settings"]["epochs"], 1);
    let rows = json["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["variant"].as_str().unwrap()).collect();
    assert_eq!(names, ["baseline", "forget-gate"]);
    for r in rows {
        let top1 = r["top1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&top1), "{r}");
        assert!(r["train_images_per_s"].as_f64().unwrap() > 0.0 && r["infer_images_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["error"].is_null());
    }
    assert_eq!(rows[0]["params"], 412_402);
    assert!(out.join("forget-gate").join("metrics.jsonl").exists());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn an_unknown_variant_is_an_error_naming_the_known_ones() {
    let run = mila(&["ablate", "--variants", "baseline,forget", "--epochs", "1"]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("unknown variant 'forget'") && stderr.contains("block-attn"), "{stderr}");
}
