//! The commands behind the `mila` binary, as functions so that tests can call them.

use std::path::Path;
use std::process::ExitCode;

use engine::{DType, Device, GradcheckOptions, Result};

/// `mila info`.
pub fn info() -> Result<ExitCode> {
    use engine::cuda;
    println!("mila-rs {}", env!("CARGO_PKG_VERSION"));
    println!("cpu threads: {}", rayon::current_num_threads());
    println!("dtypes: f32, f64");
    println!("CUDA libraries (loaded at run time; none is needed to build):");
    for lib in cuda::library_report() {
        println!("  {lib}");
    }
    match cuda::unavailable_reason() {
        None => {
            if let Some((major, minor)) = cuda::driver_version() {
                println!("CUDA driver: supports CUDA {major}.{minor}");
            }
            for ordinal in 0..cuda::device_count() {
                match cuda::device(ordinal) {
                    Ok(dev) => println!("device cuda:{ordinal}: {dev:?}"),
                    Err(e) => println!("device cuda:{ordinal}: {e}"),
                }
            }
        }
        Some(reason) => println!("devices: cpu only ({reason})"),
    }
    println!("TF32 matmul: {}", if cuda::tf32_enabled() { "on" } else { "off" });
    Ok(ExitCode::SUCCESS)
}

/// `mila gradcheck`: every op of the suite, one line each; fails if any op fails.
pub fn gradcheck(filter: Option<&str>, seed: u64, rtol: f64) -> Result<ExitCode> {
    let opts = GradcheckOptions { rtol, ..Default::default() };
    let (mut ran, mut failed) = (0, 0);
    for case in ops::suite::cases() {
        if filter.is_some_and(|f| !case.name.contains(f)) {
            continue;
        }
        let report = ops::suite::run(&case, seed, opts)?;
        ran += 1;
        failed += usize::from(!report.passed());
        println!("{report}");
    }
    if ran == 0 {
        return Err(engine::Error::Msg {
            context: "gradcheck",
            msg: format!("no op matches '{}'", filter.unwrap_or("")),
        });
    }
    println!("gradcheck: {ran} ops, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `mila parity FILE`: runs a PyTorch fixture (kinds LinearAttention, MLLABlock, MLLA) on `device` in
/// `dtype`, prints every tensor's relative error and a verdict line; fails if any tensor is past its tolerance.
pub fn parity(path: &Path, device: Device, dtype: DType) -> Result<ExitCode> {
    let report = mila::parity::run(path, device, dtype)?;
    println!("{} ({}, {dtype} on {device})", path.display(), report.kind);
    for c in &report.comparisons {
        let verdict = if c.passed() { "ok" } else { "FAIL" };
        print!("  {:<56} {:>10.3e}  tolerance {:.0e}  {verdict}", c.name, c.rel_error, c.tolerance);
        if c.relative_to != c.name {
            // A vanishing gradient (zero in exact arithmetic): measured against its parent's largest.
            print!("  (vanishing: relative to {}; plain {:.3e})", c.relative_to, c.plain_error);
        }
        println!();
    }
    let passed = report.passed();
    match report.worst() {
        Some(w) => println!(
            "parity: {} worst {:.3e} ({}) tolerance {:.0e}: {}",
            report.kind,
            w.rel_error,
            w.name,
            w.tolerance,
            if passed { "ok" } else { "FAIL" }
        ),
        None => println!("parity: {} compared nothing: FAIL", report.kind),
    }
    Ok(if passed && report.worst().is_some() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ops::TensorOps;

    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures")).join(name)
    }

    #[test]
    fn parity_passes_on_the_fixture_and_fails_on_a_perturbed_copy() {
        let path = fixture("mila_block.safetensors");
        assert_eq!(parity(&path, Device::Cpu, DType::F64).unwrap(), ExitCode::SUCCESS);

        // The same file with one stored gradient scaled by 1.001: the command must fail on it.
        let mut ck = nn::checkpoint::load(&path).unwrap();
        let g = ck.tensors["grad.dwc.weight"].mul_scalar(1.001).unwrap();
        ck.tensors.insert("grad.dwc.weight".into(), g);
        let dir = std::env::temp_dir().join(format!("mila-cli-parity-{}", std::process::id()));
        let bad = dir.join("bad.safetensors");
        let tensors: Vec<(String, engine::Tensor)> = ck.tensors.into_iter().collect();
        let counters: Vec<(String, u64)> = ck.counters.into_iter().collect();
        nn::checkpoint::save(&bad, &tensors, &counters, ck.metadata).unwrap();
        assert_eq!(parity(&bad, Device::Cpu, DType::F64).unwrap(), ExitCode::FAILURE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parity_rejects_the_mamba_kinds_for_now() {
        let dir = std::env::temp_dir().join(format!("mila-cli-scan-{}", std::process::id()));
        let path = dir.join("scan.safetensors");
        let meta = [("kind".to_string(), "MambaMixer".to_string()), ("config".to_string(), "{}".to_string())];
        nn::checkpoint::save(&path, &[], &[], meta.into_iter().collect()).unwrap();
        let err = parity(&path, Device::Cpu, DType::F64).unwrap_err();
        assert!(err.to_string().contains("'MambaMixer' is not supported yet"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
