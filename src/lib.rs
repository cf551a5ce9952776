//! The commands behind the `mila` binary, as functions so that tests can call them.

use std::process::ExitCode;

use engine::{GradcheckOptions, Result};

/// `mila info`.
pub fn info() -> Result<ExitCode> {
    println!("mila-rs {}", env!("CARGO_PKG_VERSION"));
    println!("cpu threads: {}", rayon::current_num_threads());
    println!("dtypes: f32, f64");
    println!("devices: cpu");
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
