//! `mila`: the command line of mila-rs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mila", version, about = "mila-rs: an autodiff tensor engine with MILA and Mamba on it")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// What this build can do: version, threads, dtypes, devices and the CUDA libraries found.
    Info,
    /// Runs the finite-difference gradient check of every op (f64, central differences).
    Gradcheck {
        /// Only ops whose name contains this.
        #[arg(long)]
        op: Option<String>,
        /// Seed of the random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Relative tolerance.
        #[arg(long, default_value_t = 1e-6)]
        rtol: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Info) {
        Command::Info => mila_rs::info(),
        Command::Gradcheck { op, seed, rtol } => mila_rs::gradcheck(op.as_deref(), seed, rtol),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
