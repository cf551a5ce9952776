//! `mila`: the command line of mila-rs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use engine::{DType, Device};

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
    /// Checks a module against a PyTorch parity fixture (fixtures/*.safetensors): output, every gradient and,
    /// for MLLA, eval output and BatchNorm buffers. Kinds: LinearAttention, MLLABlock, MLLA, MambaMixer,
    /// selective_scan.
    Parity {
        /// The fixture file.
        file: PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: Device,
        /// f64 (tolerance 1e-9) or f32 (1e-5 outputs, 1e-4 gradients).
        #[arg(long, default_value = "f64", value_parser = parse_dtype)]
        dtype: DType,
    },
    /// Trains an MLLA on an image dataset (default: the small MLLA on the embedded MNIST-10k, on the CPU).
    Train(mila_rs::TrainArgs),
    /// Evaluates a checkpoint written by `train` on its dataset's test split.
    Eval {
        /// The checkpoint (`<out>/last.safetensors`).
        checkpoint: PathBuf,
    },
    /// Timed benches with their ceilings measured in the same run: ops, vision, scan, train.
    Bench {
        #[command(subcommand)]
        which: mila_rs::bench::BenchCommand,
    },
    /// The paper's ablation at small scale: trains the baseline linear attention network, each of Mamba's six
    /// designs on it alone, and MILA, with the same data, seed and budget; prints the table, writes JSON.
    Ablate(mila_rs::AblateArgs),
}

fn parse_device(s: &str) -> Result<Device, String> {
    Device::parse(s).map_err(|e| e.to_string())
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The main job: with no command, train the default model on the embedded MNIST-10k.
    let command = cli.command.unwrap_or_else(|| Command::Train(mila_rs::TrainArgs::parse_from(["train"])));
    // The command runs on a worker of the rayon pool that the CPU kernels use, so that a kernel's parallel loop
    // starts on this thread and the others join it (work stealing), rather than the caller handing each loop to
    // the pool and sleeping until it ends: two thread switches per op saved, a few thousand a training step.
    let pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("mila-{i}")).stack_size(WORKER_STACK).build();
    let result = match &pool {
        Ok(pool) => pool.install(|| run(command)),
        Err(_) => run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The stack of each rayon worker, the one that runs the command included (the main thread's size on Linux).
const WORKER_STACK: usize = 8 << 20;

fn run(command: Command) -> engine::Result<ExitCode> {
    match command {
        Command::Info => mila_rs::info(),
        Command::Gradcheck { op, seed, rtol } => mila_rs::gradcheck(op.as_deref(), seed, rtol),
        Command::Parity { file, device, dtype } => mila_rs::parity(&file, device, dtype),
        Command::Train(args) => mila_rs::train(&args),
        Command::Eval { checkpoint } => mila_rs::eval(&checkpoint),
        Command::Bench { which } => mila_rs::bench::run(&which),
        Command::Ablate(args) => mila_rs::ablate(&args),
    }
}
