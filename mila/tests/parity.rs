//! Parity with the official PyTorch code through `fixtures/` (README there): forward, eval forward,
//! every gradient and the BatchNorm buffers, in f64 and f32 on the CPU; and Mamba's mixer and selective scan
//! against their float64 loop references.

use std::path::PathBuf;

use engine::{DType, Device};
use mila::parity::{self, ParityReport};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures")).join(name)
}

/// Runs a fixture in both dtypes and asserts each tensor is within its dtype's tolerance; prints the report.
fn check(file: &str, expected_comparisons: usize) -> Vec<ParityReport> {
    [DType::F64, DType::F32]
        .into_iter()
        .map(|dtype| {
            let report = parity::run(&fixture(file), Device::Cpu, dtype).unwrap();
            assert_eq!(report.comparisons.len(), expected_comparisons, "{file} {dtype}");
            for c in &report.comparisons {
                println!(
                    "{file} {dtype} {}: {:.3e} (tolerance {:.0e}, relative to {}, plain {:.3e})",
                    c.name, c.rel_error, c.tolerance, c.relative_to, c.plain_error
                );
                assert!(
                    c.passed(),
                    "{file} {dtype} {}: relative error {:.3e} > {:.0e}",
                    c.name,
                    c.rel_error,
                    c.tolerance
                );
            }
            report
        })
        .collect()
}

#[test]
fn linear_attention_matches_the_fixture() {
    // output, grad.input and 4 parameter gradients.
    let reports = check("linear_attention.safetensors", 6);
    assert_eq!(reports[0].kind, "LinearAttention");
}

#[test]
fn mila_block_matches_the_fixture() {
    // output, grad.input, 24 parameter gradients.
    let reports = check("mila_block.safetensors", 26);
    assert_eq!(reports[0].kind, "MLLABlock");
    assert!(reports[0].max_error("") <= 1e-9);
}

#[test]
fn mlla_matches_the_fixture_in_eval_and_training() {
    // eval_output, output, grad.input, 139 parameter gradients, 16 running statistics.
    let reports = check("mlla_model.safetensors", 2 + 1 + 139 + 16);
    let f64_report = &reports[0];
    assert_eq!(f64_report.kind, "MLLA");
    for prefix in ["eval_output", "output", "grad.", "buffer_after."] {
        assert!(f64_report.comparisons.iter().any(|c| c.name.starts_with(prefix)), "{prefix} was not compared");
    }
    // Exactly the gradients that vanish in exact arithmetic are measured against their parent module's
    // largest gradient (see parity::vanishing_scale): PatchMerging's conv.2 bias, ahead of a batch-statistics
    // BatchNorm, and the attention's qk on the last stage's 1x1 grid. Any other would hide a real error.
    for report in &reports {
        let mut rescaled: Vec<&str> =
            report.comparisons.iter().filter(|c| c.relative_to != c.name).map(|c| c.name.as_str()).collect();
        rescaled.sort();
        assert_eq!(
            rescaled,
            [
                "grad.layers.0.downsample.conv.2.conv.bias",
                "grad.layers.1.downsample.conv.2.conv.bias",
                "grad.layers.2.downsample.conv.2.conv.bias",
                "grad.layers.3.blocks.0.attn.qk.bias",
                "grad.layers.3.blocks.0.attn.qk.weight",
            ],
            "{}",
            report.dtype
        );
    }
}

#[test]
fn mamba_mixer_matches_the_fixture() {
    // output, grad.input and 9 parameter gradients.
    let reports = check("mamba_mixer.safetensors", 11);
    assert_eq!(reports[0].kind, "MambaMixer");
    for report in &reports {
        // No gradient of the mixer vanishes: each is measured against its own reference.
        assert!(report.comparisons.iter().all(|c| c.relative_to == c.name), "{}", report.dtype);
        let worst = report.worst().unwrap();
        println!("MambaMixer {}: worst {} {:.3e}", report.dtype, worst.name, worst.rel_error);
    }
}

#[test]
fn selective_scan_matches_the_fixture() {
    // output and the gradients of u, delta, A, B, C, D, z and delta_bias.
    let reports = check("selective_scan.safetensors", 9);
    assert_eq!(reports[0].kind, "selective_scan");
    for report in &reports {
        let names: Vec<&str> = report.comparisons.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["output", "grad.u", "grad.delta", "grad.A", "grad.B", "grad.C", "grad.D", "grad.z", "grad.delta_bias"]
        );
        let worst = report.worst().unwrap();
        println!("selective_scan {}: worst {} {:.3e}", report.dtype, worst.name, worst.rel_error);
    }
}

#[test]
fn the_scan_fixture_is_the_one_the_ops_tests_use() {
    let ours = std::fs::read(fixture("selective_scan.safetensors")).unwrap();
    let ops_copy =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/tests/fixtures/selective_scan.safetensors"))
            .unwrap();
    assert!(ours == ops_copy, "fixtures/selective_scan.safetensors and ops/tests/fixtures/ differ");
}

#[test]
fn unsupported_kinds_are_errors_that_say_so() {
    let dir = std::env::temp_dir().join(format!("mila-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mamba2.safetensors");
    let meta =
        [("kind", "Mamba2"), ("config", "{}")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    nn::checkpoint::save(&path, &[], &[], meta).unwrap();
    let err = parity::run(&path, Device::Cpu, DType::F64).expect_err("Mamba2 has no module here");
    assert!(err.to_string().contains("'Mamba2' is not supported yet"), "{err}");
    assert!(parity::run(&dir.join("missing.safetensors"), Device::Cpu, DType::F64).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
