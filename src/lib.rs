//! The commands behind the `mila` binary, as functions so that tests can call them.

use std::process::ExitCode;

use engine::{GradcheckOptions, Result};

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
