//! `mila bench`: timed runs of the ops that matter, each beside a ceiling measured in the same run, printed as
//! a table and optionally written as JSON (`--json PATH`).
//!
//! | command | what | ceiling it is divided by |
//! | --- | --- | --- |
//! | `ops` | SGEMM 4096^3 through `ops::matmul`; elementwise add and a full sum over 64M floats | cuBLAS sgemm called directly; a device-to-device copy of 64M floats |
//! | `vision` | depthwise 3x3 conv2d and LayerNorm, forward and backward; a dense 3x3 conv forward | the copy; cuBLAS sgemm |
//! | `scan` | the selective scan at two Mamba sizes, forward and backward | the copy |
//! | `train` | the default `mila train` run (or `--epochs N`) | none: seconds, ms per step, images/s, accuracy |
//! | `models` | MLLA-T training and inference, one MILA block, the small MLLA's step (`models.rs`) | PyTorch on the same workloads (`--pytorch-json`, from `benches/pytorch/bench_models.py`) |
//!
//! How a number is made (docs: .library/device/METHOD.md). Inputs are uniform random, never zeros. Each case
//! runs its warm-up calls first (NVRTC compilation, cuBLAS handle and pool allocations happen there), then
//! `reps` repetitions, each of `calls` back-to-back calls; the table gives the median over repetitions of the
//! time per call. On CUDA each repetition is bracketed by two events recorded on the device's one stream (the
//! stream every op and cuBLAS call uses), so the time is the device's; `calls` is picked after warm-up so that
//! a repetition lasts at least a few milliseconds, which hides the launch gap before the first call. On the
//! CPU a repetition is host wall time. The working sets of the full sizes are at least twice an H100's L2
//! (50 MB), so no case is timed from the cache; the report names any case whose working set is smaller.
//!
//! Rates: TFLOP/s = 2 m n k / time for products (`2 N O OH OW C kh kw` for a convolution); GB/s = the fewest
//! bytes the op must move (each input read once, each output written once, f32 = 4 bytes) / time, 1 GB =
//! 1e9 bytes. A copy moves 2 x 4 bytes per element (read + write). Buffers an implementation keeps for its
//! own backward (LayerNorm's mean and rstd, the scan's saved chunk states) are not counted: they are a choice
//! of the implementation, not part of the function.
//!
//! On CUDA every case is checked once after timing: outputs (and gradients) against the CPU ops on the same
//! inputs (the first sample of the batch where the whole batch would take the CPU too long) or against a
//! float64 host computation, as ||x - ref|| / ||ref||; a `MISMATCH` in the check column, or a non-finite
//! number, makes the command exit non-zero. `--quick` shrinks every size for a smoke run (numbers mean little).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use engine::cuda::{self, CudaDevice, GemmConfig};
use engine::{no_grad, CpuStorage, DType, Device, Error, Generator, Result, Storage, Tensor};
use ops::TensorOps;
use serde::Serialize;

pub mod models;

// ---- command line --------------------------------------------------------------------------------------

fn parse_device(s: &str) -> std::result::Result<Device, String> {
    Device::parse(s).map_err(|e| e.to_string())
}

/// The options every timed bench takes.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// cpu, cuda or cuda:N (default: cuda when a device is available, else cpu).
    #[arg(long, value_parser = parse_device)]
    pub device: Option<Device>,
    /// Small sizes and few repetitions: a smoke run whose numbers mean little.
    #[arg(long)]
    pub quick: bool,
    /// Timed repetitions; the median is reported (default 20, 3 with --quick).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Untimed calls before timing (default 3, 1 with --quick).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Allow TF32 tensor-core math in f32 matrix products (cuBLAS; off by default).
    #[arg(long)]
    pub tf32: bool,
}

/// `mila bench train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainBenchArgs {
    /// cpu, cuda or cuda:N (default: cuda when a device is available, else cpu).
    #[arg(long, value_parser = parse_device)]
    pub device: Option<Device>,
    /// Epochs (default: `mila train`'s 20; 1 with --quick).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// One epoch.
    #[arg(long)]
    pub quick: bool,
    /// The run's output directory (metrics.jsonl, curves.png, last.safetensors).
    #[arg(long, default_value = "runs/bench-train")]
    pub out: PathBuf,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Allow TF32 tensor-core math in f32 matrix products (cuBLAS; off by default).
    #[arg(long)]
    pub tf32: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// SGEMM 4096^3 through ops::matmul vs cuBLAS called directly; copy, add and sum over 64M floats.
    Ops(BenchArgs),
    /// Depthwise 3x3 conv and LayerNorm forward/backward as bandwidth; dense 3x3 conv forward vs SGEMM.
    Vision(BenchArgs),
    /// The selective scan at (64, 384, 3136, 16) and (8, 1536, 4096, 16), forward and backward, as bandwidth.
    Scan(BenchArgs),
    /// Times the default training run: total seconds, ms per step, images/s, final test accuracy.
    Train(TrainBenchArgs),
    /// MLLA-T training/inference, a MILA block, the small MLLA's step, beside PyTorch's (--pytorch-json).
    Models(models::ModelsBenchArgs),
}

/// `mila bench ...`.
pub fn run(cmd: &BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Ops(a) => finish(ops_bench(&mut Bench::new("ops", a)?)?, a.json.as_deref()),
        BenchCommand::Vision(a) => finish(vision_bench(&mut Bench::new("vision", a)?)?, a.json.as_deref()),
        BenchCommand::Scan(a) => finish(scan_bench(&mut Bench::new("scan", a)?)?, a.json.as_deref()),
        BenchCommand::Train(a) => train_bench(a),
        BenchCommand::Models(a) => models::run(a),
    }
}

fn finish(report: Report, json: Option<&Path>) -> Result<ExitCode> {
    report.print();
    if let Some(path) = json {
        write_json(path, &report)?;
        println!("wrote {}", path.display());
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let io = |e: std::io::Error| Error::Io { path: path.display().to_string(), source: e };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Msg { context: "bench", msg: e.to_string() })?;
    std::fs::write(path, text + "\n").map_err(io)
}

/// The device asked for, else cuda:0 when there is one, else the CPU (said on stderr, so that a GPU run that
/// silently fell back is visible).
fn default_device(d: Option<Device>) -> Device {
    d.unwrap_or_else(|| match cuda::unavailable_reason() {
        None => Device::Cuda(0),
        Some(reason) => {
            eprintln!("mila bench: no CUDA device ({reason}); running on the CPU");
            Device::Cpu
        }
    })
}

// ---- the report ----------------------------------------------------------------------------------------

/// Timings of one case, in milliseconds per call.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub reps: usize,
    pub calls_per_rep: usize,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub shape: String,
    #[serde(flatten)]
    pub timing: Timing,
    /// Floating-point operations per call (products), or
    pub flop: Option<f64>,
    /// the fewest bytes per call (memory-bound ops).
    pub bytes: Option<f64>,
    /// flop / time in TFLOP/s, or bytes / time in GB/s.
    pub rate: f64,
    pub unit: &'static str,
    /// The row this one is divided by, and the quotient of the rates.
    pub reference: Option<String>,
    pub ratio: Option<f64>,
    pub target: Option<f64>,
    /// Whether `ratio` reaches `target`.
    pub meets_target: Option<bool>,
    /// What the output was compared with, and the relative error.
    pub check: Option<String>,
    pub check_failed: bool,
}

impl Row {
    fn flop(name: impl Into<String>, shape: impl Into<String>, timing: Timing, flop: f64) -> Row {
        let rate = flop / (timing.median_ms * 1e-3) / 1e12;
        Row::new(name.into(), shape.into(), timing, Some(flop), None, rate, "TFLOP/s")
    }

    fn bytes(name: impl Into<String>, shape: impl Into<String>, timing: Timing, bytes: f64) -> Row {
        let rate = bytes / (timing.median_ms * 1e-3) / 1e9;
        Row::new(name.into(), shape.into(), timing, None, Some(bytes), rate, "GB/s")
    }

    fn new(
        name: String,
        shape: String,
        timing: Timing,
        flop: Option<f64>,
        bytes: Option<f64>,
        rate: f64,
        unit: &'static str,
    ) -> Row {
        Row {
            name,
            shape,
            timing,
            flop,
            bytes,
            rate,
            unit,
            reference: None,
            ratio: None,
            target: None,
            meets_target: None,
            check: None,
            check_failed: false,
        }
    }

    /// Divides this row's rate by `reference`'s.
    fn against(mut self, reference: &Row, target: Option<f64>) -> Row {
        // The reference's short name: its name up to the colon ("copy (1)").
        self.reference = Some(reference.name.split(':').next().unwrap_or("").trim().to_string());
        self.ratio = Some(self.rate / reference.rate);
        self.target = target;
        self.meets_target = target.zip(self.ratio).map(|(t, r)| r >= t);
        self
    }

    fn checked(mut self, check: Option<Check>) -> Row {
        if let Some(c) = check {
            self.check_failed = !c.passed();
            self.check = Some(c.to_string());
        }
        self
    }
}

/// The outcome of comparing an output with a reference.
#[derive(Debug, Clone)]
struct Check {
    what: String,
    /// The worst relative error over the tensors compared.
    error: f64,
    tolerance: f64,
}

impl Check {
    fn passed(&self) -> bool {
        self.error.is_finite() && self.error <= self.tolerance
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1e} vs {}", self.error, self.what)?;
        if !self.passed() {
            write!(f, " MISMATCH (tolerance {:.0e})", self.tolerance)?;
        }
        Ok(())
    }
}

/// Everything one bench prints, and its JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub bench: &'static str,
    /// e.g. "NVIDIA H100 80GB HBM3 (cuda:0, sm_90, 132 SMs, L2 50 MiB, 79.1 GiB)".
    pub device: String,
    pub dtype: &'static str,
    pub tf32: bool,
    pub quick: bool,
    pub warmup: usize,
    pub reps: usize,
    /// How the clock was read.
    pub timing: String,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Report {
    /// No failed check and every rate finite.
    pub fn ok(&self) -> bool {
        self.rows.iter().all(|r| !r.check_failed && r.rate.is_finite() && r.ratio.is_none_or(f64::is_finite))
    }

    pub fn print(&self) {
        println!();
        println!("mila bench {}: {}", self.bench, self.device);
        println!(
            "dtype {}, TF32 {}{}; {}; {} warm-up calls, median of {} repetitions",
            self.dtype,
            if self.tf32 { "on" } else { "off" },
            if self.quick { ", --quick sizes (a smoke run)" } else { "" },
            self.timing,
            self.warmup,
            self.reps
        );
        println!();
        println!("| case | shape (f32) | median ms | min / max ms | calls/rep | rate | vs | ratio | target | check |");
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for r in &self.rows {
            let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or_else(|| "-".to_string(), f);
            println!(
                "| {} | {} | {} | {} / {} | {} | {} {} | {} | {} | {} | {} |",
                r.name,
                r.shape,
                sig(r.timing.median_ms),
                sig(r.timing.min_ms),
                sig(r.timing.max_ms),
                r.timing.calls_per_rep,
                sig(r.rate),
                r.unit,
                r.reference.as_deref().unwrap_or("-"),
                opt(r.ratio, &|x| format!("{x:.3}")),
                match (r.target, r.meets_target) {
                    (Some(t), Some(met)) => format!(">= {t:.2} {}", if met { "met" } else { "MISSED" }),
                    _ => "-".to_string(),
                },
                r.check.as_deref().unwrap_or("-"),
            );
        }
        for n in &self.notes {
            println!("- {n}");
        }
        let failed = self.rows.iter().filter(|r| r.check_failed).count();
        if failed > 0 {
            println!("{failed} check(s) failed");
        }
    }
}

/// Three significant digits (at least none after the point).
fn sig(x: f64) -> String {
    if !x.is_finite() || x == 0.0 {
        return format!("{x}");
    }
    let decimals = (2 - x.abs().log10().floor() as i32).clamp(0, 9) as usize;
    format!("{x:.decimals$}")
}

// ---- timing --------------------------------------------------------------------------------------------

/// A repetition lasts at least this long (more calls per repetition otherwise), outside --quick.
const MIN_REP_MS: f64 = 5.0;
const MAX_CALLS_PER_REP: usize = 100;

struct Clock {
    cuda: Option<Arc<CudaDevice>>,
    warmup: usize,
    reps: usize,
    quick: bool,
}

impl Clock {
    fn sync(&self) -> Result<()> {
        match &self.cuda {
            Some(dev) => dev.synchronize(),
            None => Ok(()),
        }
    }

    /// Milliseconds taken by `calls` calls of `f`, from the device's clock on CUDA.
    fn once(&self, calls: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        match &self.cuda {
            Some(dev) => {
                use engine::cuda::cudarc::driver::sys::CUevent_flags;
                let event_err = |e: engine::cuda::cudarc::driver::DriverError| Error::Cuda {
                    op: "bench_timer",
                    msg: format!("{e:?}"),
                };
                let stream = dev.stream();
                let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(event_err)?;
                for _ in 0..calls {
                    f()?;
                }
                let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(event_err)?;
                // Waits for both events; then the stream, which also surfaces errors of the work timed.
                let ms = start.elapsed_ms(&end).map_err(event_err)? as f64;
                dev.synchronize()?;
                Ok(ms)
            }
            None => {
                let t = Instant::now();
                for _ in 0..calls {
                    f()?;
                }
                Ok(t.elapsed().as_secs_f64() * 1e3)
            }
        }
    }

    /// Warm-up, then the median over repetitions of the time per call of `f`.
    fn measure(&self, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
        for _ in 0..self.warmup {
            f()?;
        }
        self.sync()?;
        let calls = if self.quick {
            1
        } else {
            let single = self.once(1, &mut f)?;
            ((MIN_REP_MS / single.max(1e-6)).ceil() as usize).clamp(1, MAX_CALLS_PER_REP)
        };
        let mut per_call = Vec::with_capacity(self.reps);
        for _ in 0..self.reps.max(1) {
            per_call.push(self.once(calls, &mut f)? / calls as f64);
        }
        per_call.sort_by(f64::total_cmp);
        let n = per_call.len();
        let median = if n % 2 == 1 { per_call[n / 2] } else { 0.5 * (per_call[n / 2 - 1] + per_call[n / 2]) };
        Ok(Timing { median_ms: median, min_ms: per_call[0], max_ms: per_call[n - 1], reps: n, calls_per_rep: calls })
    }
}

// ---- the bench context ---------------------------------------------------------------------------------

struct Bench {
    device: Device,
    cuda: Option<Arc<CudaDevice>>,
    /// The device's L2 in bytes (CUDA).
    l2: Option<usize>,
    clock: Clock,
    quick: bool,
    rng: Generator,
    report: Report,
}

impl Bench {
    fn new(name: &'static str, args: &BenchArgs) -> Result<Bench> {
        let device = default_device(args.device);
        cuda::set_tf32(args.tf32);
        let (cuda_dev, l2, description) = match device {
            Device::Cpu => (None, None, cpu_description()),
            Device::Cuda(i) => {
                let dev = cuda::device(i)?;
                use engine::cuda::cudarc::driver::sys::CUdevice_attribute;
                let l2 = dev.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE).ok();
                let l2 = l2.map(|b| b.max(0) as usize);
                let (major, minor) = dev.compute_capability();
                let mut d = format!(
                    "{} (cuda:{i}, sm_{major}{minor}, {} SMs, L2 {} MiB, {:.1} GiB)",
                    dev.name(),
                    dev.multiprocessor_count(),
                    l2.map_or("?".to_string(), |b| (b >> 20).to_string()),
                    dev.total_memory() as f64 / (1u64 << 30) as f64
                );
                if let Some((major, minor)) = cuda::driver_version() {
                    d.push_str(&format!(", driver for CUDA {major}.{minor}"));
                }
                (Some(dev), l2, d)
            }
        };
        let (warmup, reps) = if args.quick { (1, 3) } else { (3, 20) };
        let (warmup, reps) = (args.warmup.unwrap_or(warmup), args.reps.unwrap_or(reps).max(1));
        let timing = if cuda_dev.is_some() {
            "CUDA events on the device's stream around each repetition".to_string()
        } else {
            format!("host wall clock, {} rayon threads", rayon::current_num_threads())
        };
        let mut notes = Vec::new();
        if cuda_dev.is_none() && args.quick {
            notes.push(
                "checks on the CPU compare the CPU ops with themselves: they exercise the checking code only".into(),
            );
        }
        Ok(Bench {
            device,
            cuda: cuda_dev.clone(),
            l2,
            clock: Clock { cuda: cuda_dev, warmup, reps, quick: args.quick },
            quick: args.quick,
            rng: Generator::new(0x6d69_6c61),
            report: Report {
                bench: name,
                device: description,
                dtype: "f32",
                tf32: args.tf32,
                quick: args.quick,
                warmup,
                reps,
                timing,
                rows: Vec::new(),
                notes,
            },
        })
    }

    /// Uniform random values in [lo, hi) as an f32 tensor on the bench's device (a leaf).
    fn random(&mut self, shape: &[usize], lo: f32, hi: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let host: Vec<f32> = (0..n).map(|_| lo + (hi - lo) * self.rng.uniform() as f32).collect();
        Tensor::from_storage(Storage::from_cpu(CpuStorage::F32(host), self.device)?, shape)
    }

    /// Whether outputs are checked: always on CUDA (against the CPU ops or a float64 host computation); on the
    /// CPU only with --quick, where comparing the CPU ops with themselves exercises the checking code cheaply.
    fn checking(&self) -> bool {
        self.cuda.is_some() || self.quick
    }

    /// The tolerance of a relative error in f32 (TF32 products are looser).
    fn tolerance(&self, uses_matmul: bool) -> f64 {
        if uses_matmul && self.report.tf32 {
            3e-3
        } else {
            1e-3
        }
    }

    /// Notes a case whose working set could be served from L2.
    fn note_working_set(&mut self, case: &str, bytes: f64) {
        if let Some(l2) = self.l2 {
            if bytes < 2.0 * l2 as f64 {
                self.report.notes.push(format!(
                    "{case}: working set {:.1} MB is under twice the L2 ({} MiB): partly a cache number",
                    bytes / 1e6,
                    l2 >> 20
                ));
            }
        }
    }

    fn push(&mut self, row: Row) -> Row {
        self.report.rows.push(row.clone());
        row
    }

    /// The copy ceiling: 64M floats (1M with --quick) device to device, 2 x 4 bytes per element.
    fn copy_reference(&mut self, label: &str) -> Result<Row> {
        let n = if self.quick { 1 << 20 } else { 64 << 20 };
        let src = self.random(&[n], -1.0, 1.0)?;
        let bytes = 8.0 * n as f64;
        self.note_working_set("copy", bytes);
        let shape = format!("{}M floats", n >> 20);
        let row = match &self.cuda {
            Some(dev) => {
                let dev = dev.clone();
                let storage = src.storage();
                let s = storage.as_cuda("bench")?.slice::<f32>()?;
                let mut dst = dev.alloc::<f32>(n)?;
                let timing = self.clock.measure(|| {
                    dev.stream()
                        .memcpy_dtod(s, &mut dst.view_mut())
                        .map_err(|e| Error::Cuda { op: "memcpy_dtod", msg: format!("{e:?}") })
                })?;
                let check = if self.checking() {
                    let (a, b) = (dev.dtoh(s)?, dev.dtoh(dst.as_slice())?);
                    let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                    Some(Check { what: "source (bitwise)".into(), error: if same { 0.0 } else { 1.0 }, tolerance: 0.0 })
                } else {
                    None
                };
                Row::bytes(format!("copy{label}: cuMemcpyDtoD (cudarc memcpy_dtod)"), shape, timing, bytes)
                    .checked(check)
            }
            None => {
                let storage = src.storage();
                let s = f32_slice(&storage)?;
                let mut dst = vec![0f32; n];
                let timing = self.clock.measure(|| {
                    parallel_copy(&mut dst, s);
                    Ok(())
                })?;
                Row::bytes(format!("copy{label}: rayon copy_from_slice"), shape, timing, bytes)
            }
        };
        Ok(self.push(row))
    }

    /// The matrix-product ceiling: n^3 SGEMM (n = 4096, 256 with --quick) through the vendor library
    /// directly: cuBLAS `sgemm` through the engine's `gemm_strided_batched` (batch 1) on CUDA, the `gemm`
    /// crate (what ops::matmul calls on the CPU) on the CPU. Returns the row and (A, B, C) for checks.
    fn sgemm_reference(&mut self, label: &str) -> Result<(Row, Tensor, Tensor, Vec<f32>)> {
        let n = if self.quick { 256 } else { 4096 };
        let a = self.random(&[n, n], -1.0, 1.0)?;
        let b = self.random(&[n, n], -1.0, 1.0)?;
        let flop = 2.0 * (n as f64).powi(3);
        self.note_working_set("sgemm", 12.0 * (n * n) as f64);
        let shape = format!("{n}x{n} @ {n}x{n}");
        let (row, c) = {
            let (sa, sb) = (a.storage(), b.storage());
            match &self.cuda {
                Some(dev) => {
                    let dev = dev.clone();
                    let (xa, xb) = (sa.as_cuda("bench")?.slice::<f32>()?, sb.as_cuda("bench")?.slice::<f32>()?);
                    let mut c = dev.alloc::<f32>(n * n)?;
                    let cfg = GemmConfig::contiguous(1, n, n, n, false, false);
                    let timing =
                        self.clock.measure(|| dev.gemm_strided_batched::<f32>(&cfg, xa, xb, &mut c.view_mut()))?;
                    let name = format!("sgemm{label}: cuBLAS direct (gemm_strided_batched, batch 1)");
                    (Row::flop(name, shape, timing, flop), dev.dtoh(c.as_slice())?)
                }
                None => {
                    let (xa, xb) = (f32_slice(&sa)?, f32_slice(&sb)?);
                    let mut c = vec![0f32; n * n];
                    let timing = self.clock.measure(|| {
                        gemm_cpu(xa, xb, &mut c, n);
                        Ok(())
                    })?;
                    (Row::flop(format!("sgemm{label}: gemm crate direct"), shape, timing, flop), c)
                }
            }
        };
        let check = if self.checking() { Some(sampled_gemm_check(&a, &b, &c, self.tolerance(true))?) } else { None };
        Ok((self.push(row.checked(check)), a, b, c))
    }
}

fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("cpu: {model} ({} rayon threads)", rayon::current_num_threads())
}

fn f32_slice(s: &Storage) -> Result<&[f32]> {
    match s.as_cpu("bench")? {
        CpuStorage::F32(v) => Ok(v),
        CpuStorage::F64(_) => Err(Error::Msg { context: "bench", msg: "expected f32 storage".into() }),
    }
}

fn parallel_copy(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    let chunk = dst.len().div_ceil(rayon::current_num_threads() * 4).max(1 << 16);
    dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
}

/// C = A B for row-major n x n matrices through the gemm crate, on the rayon pool.
fn gemm_cpu(a: &[f32], b: &[f32], c: &mut [f32], n: usize) {
    assert!(a.len() >= n * n && b.len() >= n * n && c.len() >= n * n);
    let n_i = n as isize;
    // SAFETY: a, b and c hold n * n elements (asserted), read and written row-major with row stride n and
    // column stride 1. gemm's dst scale (0) applies to the old c, which is not read (read_dst false).
    unsafe {
        gemm::gemm(
            n,
            n,
            n,
            c.as_mut_ptr(),
            1,
            n_i,
            false,
            a.as_ptr(),
            1,
            n_i,
            b.as_ptr(),
            1,
            n_i,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

/// 64 entries of C = A B recomputed in float64 on the host.
fn sampled_gemm_check(a: &Tensor, b: &Tensor, c: &[f32], tolerance: f64) -> Result<Check> {
    let n = a.shape()[0];
    let (ha, hb) = (a.to_vec::<f32>()?, b.to_vec::<f32>()?);
    let mut g = Generator::new(7);
    let (mut num, mut den) = (0.0, 0.0);
    for _ in 0..64 {
        let (i, j) = ((g.uniform() * n as f64) as usize % n, (g.uniform() * n as f64) as usize % n);
        let r: f64 = (0..n).map(|p| ha[i * n + p] as f64 * hb[p * n + j] as f64).sum();
        num += (c[i * n + j] as f64 - r).powi(2);
        den += r * r;
    }
    Ok(Check { what: "f64 host, 64 entries".into(), error: (num / den.max(1e-300)).sqrt(), tolerance })
}

/// ||x - r|| / ||r|| over all elements, in f64.
fn rel_err(x: &[f64], r: &[f64]) -> f64 {
    if x.len() != r.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (a, b) in x.iter().zip(r) {
        num += (a - b) * (a - b);
        den += b * b;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// The worst relative error of device tensors (`first` samples of dim 0 when given) against CPU tensors.
fn worst_err(pairs: &[(&Tensor, &Tensor)], first: Option<usize>) -> Result<f64> {
    let mut worst: f64 = 0.0;
    for (dev, cpu) in pairs {
        let dev = match first {
            Some(_) if dev.rank() > 0 && dev.shape()[0] > cpu.shape()[0] => dev.narrow(0, 0, cpu.shape()[0])?,
            _ => (*dev).clone(),
        };
        let e = rel_err(&dev.to_vec_f64()?, &cpu.to_vec_f64()?);
        worst = if e.is_nan() { f64::NAN } else { worst.max(e) };
    }
    Ok(worst)
}

/// A CPU copy of `t` (its first `first` samples of dim 0 when given), as a leaf that requires grad.
fn host_leaf(t: &Tensor, first: Option<usize>) -> Result<Tensor> {
    let t = match first {
        Some(k) => t.narrow(0, 0, k.min(t.shape()[0]))?,
        None => t.clone(),
    };
    t.to_device(Device::Cpu)?.detach().requires_grad_(true)
}

fn grad_of(t: &Tensor) -> Result<Tensor> {
    t.grad().ok_or(Error::Msg { context: "bench", msg: "a leaf has no gradient after backward".into() })
}

fn dims(shape: &[usize]) -> String {
    format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

// ---- forward / backward timing of one op ---------------------------------------------------------------

/// An op's minimal traffic per pass, in bytes.
struct Traffic {
    forward: f64,
    backward: f64,
}

/// Times `f` (an op of `leaves`) forward without a graph, backward alone over one retained graph, and both
/// together, as three rows divided by the `copy` row. Leaves the gradients of the last forward+backward in
/// the leaves.
#[allow(clippy::too_many_arguments)]
fn time_forward_backward(
    bench: &mut Bench,
    name: &str,
    shape: &str,
    leaves: &[&Tensor],
    grad_out: &Tensor,
    traffic: Traffic,
    copy: &Row,
    f: impl Fn() -> Result<Tensor>,
) -> Result<[Row; 3]> {
    let clear = || leaves.iter().for_each(|l| l.zero_grad());
    let forward = bench.clock.measure(|| no_grad(|| f().map(drop)))?;
    let y = f()?;
    let backward = bench.clock.measure(|| {
        clear();
        y.backward_retain(grad_out)
    })?;
    drop(y);
    let both = bench.clock.measure(|| {
        clear();
        f()?.backward_with(grad_out)
    })?;
    bench.note_working_set(name, traffic.forward.max(traffic.backward));
    Ok([
        Row::bytes(format!("{name} forward"), shape, forward, traffic.forward).against(copy, None),
        Row::bytes(format!("{name} backward"), shape, backward, traffic.backward).against(copy, None),
        Row::bytes(format!("{name} forward+backward"), shape, both, traffic.forward + traffic.backward)
            .against(copy, None),
    ])
}

// ---- mila bench ops ------------------------------------------------------------------------------------

fn ops_bench(bench: &mut Bench) -> Result<Report> {
    // SGEMM: the vendor library, our op, the vendor library again (its spread is the noise of the ratio).
    let (reference, a, b, c_direct) = bench.sgemm_reference(" (1)")?;
    let n = a.shape()[0];
    let mut c_ours = None;
    let timing = bench.clock.measure(|| {
        c_ours = Some(no_grad(|| ops::matmul(&a, &b))?);
        Ok(())
    })?;
    let (again, ..) = bench.sgemm_reference(" (2)")?;
    let vendor = if bench.cuda.is_some() { "cuBLAS" } else { "gemm crate" };
    let best = if again.rate > reference.rate { &again } else { &reference };
    let check = match (&c_ours, bench.checking()) {
        (Some(c), true) => {
            let host: Vec<f64> = c.to_vec_f64()?;
            let direct: Vec<f64> = c_direct.iter().map(|&x| x as f64).collect();
            let what = format!("{vendor} direct");
            Some(Check { what, error: rel_err(&host, &direct), tolerance: bench.tolerance(true) })
        }
        _ => None,
    };
    let row = Row::flop(
        format!("sgemm: ops::matmul ({vendor} underneath)"),
        format!("{n}x{n} @ {n}x{n}"),
        timing,
        flop_of(n),
    )
    .against(best, Some(0.90))
    .checked(check);
    bench.push(row);

    // Bandwidth: the copy ceiling, then our copy kernel, add and sum, each over the same element count.
    let copy = bench.copy_reference(" (1)")?;
    let elems = if bench.quick { 1 << 20 } else { 64 << 20 };
    let shape = format!("{}M floats", elems >> 20);
    let x = bench.random(&[elems], -1.0, 1.0)?;
    let y = bench.random(&[elems], -1.0, 1.0)?;

    let dst = Tensor::zeros(&[elems], engine::DType::F32, bench.device)?;
    let timing = bench.clock.measure(|| ops::copy_into(&dst, dst.layout(), &x))?;
    let check = if bench.checking() {
        Some(Check { what: "source".into(), error: rel_err(&dst.to_vec_f64()?, &x.to_vec_f64()?), tolerance: 0.0 })
    } else {
        None
    };
    drop(dst);
    let row = Row::bytes("copy: ops::copy_into (contiguous: cuMemcpyDtoD)", shape.clone(), timing, 8.0 * elems as f64)
        .against(&copy, None)
        .checked(check);
    bench.push(row);

    let mut sum_out = None;
    let timing = bench.clock.measure(|| {
        sum_out = Some(no_grad(|| ops::add(&x, &y))?);
        Ok(())
    })?;
    let check = match (&sum_out, bench.checking()) {
        (Some(s), true) => {
            let (hx, hy) = (x.to_vec_f64()?, y.to_vec_f64()?);
            let want: Vec<f64> = hx.iter().zip(&hy).map(|(a, b)| a + b).collect();
            Some(Check { what: "f64 host".into(), error: rel_err(&s.to_vec_f64()?, &want), tolerance: 1e-6 })
        }
        _ => None,
    };
    drop(sum_out);
    let row = Row::bytes("add: ops::add, 2 reads + 1 write", shape.clone(), timing, 12.0 * elems as f64)
        .against(&copy, Some(0.80))
        .checked(check);
    bench.push(row);

    let mut total = None;
    let timing = bench.clock.measure(|| {
        total = Some(no_grad(|| ops::sum_all(&x))?);
        Ok(())
    })?;
    let check = match (&total, bench.checking()) {
        (Some(t), true) => {
            // Relative to sum |x|, the scale of a summation's rounding error (the sum itself may cancel).
            let hx = x.to_vec_f64()?;
            let (want, scale) = (hx.iter().sum::<f64>(), hx.iter().map(|v| v.abs()).sum::<f64>());
            let error = (t.to_scalar()? - want).abs() / scale;
            Some(Check { what: "f64 host sum, error over sum |x|".into(), error, tolerance: 1e-6 })
        }
        _ => None,
    };
    let row = Row::bytes("sum: ops::sum_all, 1 read", shape, timing, 4.0 * elems as f64 + 4.0)
        .against(&copy, Some(0.80))
        .checked(check);
    bench.push(row);
    let again = bench.copy_reference(" (2)")?;
    bench.report.notes.push(format!(
        "copy ceiling: copy (1) {:.0} GB/s and copy (2) {:.0} GB/s bracket the bandwidth rows (their gap is the noise); \
         ratios are over copy (1). sgemm ratio is over the faster cuBLAS/gemm run.",
        copy.rate, again.rate
    ));
    Ok(bench.report.clone())
}

fn flop_of(n: usize) -> f64 {
    2.0 * (n as f64).powi(3)
}

// ---- mila bench vision ---------------------------------------------------------------------------------

fn vision_bench(bench: &mut Bench) -> Result<Report> {
    let copy = bench.copy_reference("")?;
    let (sgemm, ..) = bench.sgemm_reference("")?;
    let q = bench.quick;

    // Depthwise 3x3, stride 1, padding 1, with bias: the MILA block's cpe and lepe convs.
    let [n, c, h, w] = if q { [2, 8, 16, 16] } else { [64, 64, 56, 56] };
    let x = bench.random(&[n, c, h, w], -1.0, 1.0)?.requires_grad_(true)?;
    let wt = bench.random(&[c, 1, 3, 3], -0.5, 0.5)?.requires_grad_(true)?;
    let bias = bench.random(&[c], -0.5, 0.5)?.requires_grad_(true)?;
    let g = bench.random(&[n, c, h, w], -1.0, 1.0)?;
    let nchw = (n * c * h * w) as f64;
    let (taps, chans) = (9.0 * c as f64, c as f64);
    let traffic = Traffic {
        // read x, weight, bias; write y
        forward: 4.0 * (2.0 * nchw + taps + chans),
        // read grad y, x, weight; write dx, dweight, dbias
        backward: 4.0 * (3.0 * nchw + 2.0 * taps + chans),
    };
    let conv = || ops::conv2d(&x, &wt, Some(&bias), (1, 1), (1, 1), (1, 1), c);
    let shape = format!("x {}, w {}, groups {c}", dims(&[n, c, h, w]), dims(&[c, 1, 3, 3]));
    let rows = time_forward_backward(bench, "depthwise conv3x3", &shape, &[&x, &wt, &bias], &g, traffic, &copy, conv)?;
    let check = if bench.checking() {
        // The whole batch on the CPU: 9 multiply-adds per output element.
        let (hx, hw, hb, hg) =
            (host_leaf(&x, None)?, host_leaf(&wt, None)?, host_leaf(&bias, None)?, g.to_device(Device::Cpu)?);
        let hy = ops::conv2d(&hx, &hw, Some(&hb), (1, 1), (1, 1), (1, 1), c)?;
        hy.backward_with(&hg)?;
        let y = no_grad(conv)?;
        let fwd = worst_err(&[(&y, &hy)], None)?;
        let bwd = worst_err(
            &[(&grad_of(&x)?, &grad_of(&hx)?), (&grad_of(&wt)?, &grad_of(&hw)?), (&grad_of(&bias)?, &grad_of(&hb)?)],
            None,
        )?;
        Some((fwd, bwd, "CPU ops, whole batch"))
    } else {
        None
    };
    let tolerance = bench.tolerance(false);
    push_checked(bench, rows, check, tolerance);
    drop((x, wt, bias, g));

    // LayerNorm over 64 channels of 64 x 56 x 56 tokens, with weight and bias (eps 1e-5).
    let (rows_n, d) = if q { (2 * 64, 64) } else { (64 * 3136, 64) };
    let x = bench.random(&[rows_n, d], -2.0, 2.0)?.requires_grad_(true)?;
    let wt = bench.random(&[d], 0.5, 1.5)?.requires_grad_(true)?;
    let bias = bench.random(&[d], -0.5, 0.5)?.requires_grad_(true)?;
    let g = bench.random(&[rows_n, d], -1.0, 1.0)?;
    let (rd, dd) = ((rows_n * d) as f64, d as f64);
    let traffic = Traffic {
        // read x, weight, bias; write y (the saved mean and rstd not counted)
        forward: 4.0 * (2.0 * rd + 2.0 * dd),
        // read grad y, x, weight; write dx, dweight, dbias
        backward: 4.0 * (3.0 * rd + 3.0 * dd),
    };
    let ln = || ops::layer_norm(&x, Some(&wt), Some(&bias), 1e-5);
    let shape = format!("x {}, weight and bias ({d})", dims(&[rows_n, d]));
    let rows = time_forward_backward(bench, "layer_norm", &shape, &[&x, &wt, &bias], &g, traffic, &copy, ln)?;
    let check = if bench.checking() {
        let (hx, hw, hb, hg) =
            (host_leaf(&x, None)?, host_leaf(&wt, None)?, host_leaf(&bias, None)?, g.to_device(Device::Cpu)?);
        let hy = ops::layer_norm(&hx, Some(&hw), Some(&hb), 1e-5)?;
        hy.backward_with(&hg)?;
        let y = no_grad(ln)?;
        let fwd = worst_err(&[(&y, &hy)], None)?;
        let bwd = worst_err(
            &[(&grad_of(&x)?, &grad_of(&hx)?), (&grad_of(&wt)?, &grad_of(&hw)?), (&grad_of(&bias)?, &grad_of(&hb)?)],
            None,
        )?;
        Some((fwd, bwd, "CPU ops, all rows"))
    } else {
        None
    };
    let tolerance = bench.tolerance(false);
    push_checked(bench, rows, check, tolerance);
    drop((x, wt, bias, g));

    // Dense 3x3 conv, stride 1, padding 1, no bias, forward only (im2col + cuBLAS on CUDA).
    let [n, c, h, w, o] = if q { [2, 8, 16, 16, 8] } else { [128, 32, 112, 112, 32] };
    let x = bench.random(&[n, c, h, w], -1.0, 1.0)?;
    let wt = bench.random(&[o, c, 3, 3], -0.2, 0.2)?;
    let flop = 2.0 * (n * o * h * w * c * 9) as f64;
    bench.note_working_set("dense conv3x3", 4.0 * ((n * c * h * w) + (n * o * h * w)) as f64);
    let conv = || no_grad(|| ops::conv2d(&x, &wt, None, (1, 1), (1, 1), (1, 1), 1));
    let timing = bench.clock.measure(|| conv().map(drop))?;
    let check = if bench.checking() {
        // The first sample on the CPU.
        let hy = ops::conv2d(&host_leaf(&x, Some(1))?, &host_leaf(&wt, None)?, None, (1, 1), (1, 1), (1, 1), 1)?;
        let error = worst_err(&[(&conv()?, &hy)], Some(1))?;
        Some(Check { what: "CPU ops, sample 0".into(), error, tolerance: bench.tolerance(true) })
    } else {
        None
    };
    let shape = format!("x {} -> {o} channels, w {}, stride 1, pad 1", dims(&[n, c, h, w]), dims(&[o, c, 3, 3]));
    let row =
        Row::flop("dense conv3x3 forward (ops::conv2d)", shape, timing, flop).against(&sgemm, None).checked(check);
    bench.push(row);
    bench.report.notes.push(
        "bandwidth rows are over the copy row; the dense conv is over the sgemm row (same run). Bytes per pass: \
         each input read once, each output written once (saved statistics not counted)"
            .into(),
    );
    Ok(bench.report.clone())
}

/// Pushes forward, backward and forward+backward rows with the checks of forward and gradients.
fn push_checked(bench: &mut Bench, rows: [Row; 3], check: Option<(f64, f64, &str)>, tolerance: f64) {
    let [fwd, bwd, both] = rows;
    let c = |error: f64, what: &str| check.map(|(.., by)| Check { what: format!("{by}, {what}"), error, tolerance });
    let (fe, be) = check.map_or((0.0, 0.0), |(f, b, _)| (f, b));
    bench.push(fwd.checked(c(fe, "output")));
    bench.push(bwd.checked(c(be, "gradients")));
    bench.push(both);
}

// ---- mila bench scan -----------------------------------------------------------------------------------

fn scan_bench(bench: &mut Bench) -> Result<Report> {
    let copy = bench.copy_reference("")?;
    let sizes: [[usize; 4]; 2] =
        if bench.quick { [[2, 16, 64, 16], [1, 32, 128, 16]] } else { [[64, 384, 3136, 16], [8, 1536, 4096, 16]] };
    for [batch, channels, length, states] in sizes {
        let bcl = [batch, channels, length];
        let bsl = [batch, states, length];
        let u = bench.random(&bcl, -1.0, 1.0)?.requires_grad_(true)?;
        let delta = bench.random(&bcl, -1.0, 1.0)?.requires_grad_(true)?;
        let z = bench.random(&bcl, -1.0, 1.0)?.requires_grad_(true)?;
        // A = -(1..=S) per channel as Mamba's A_log init gives, times a random factor in [0.5, 1.5).
        let a = {
            let f = bench.random(&[channels, states], 0.5, 1.5)?;
            let ramp: Vec<f32> = (0..channels * states).map(|i| -((i % states) as f32 + 1.0)).collect();
            let ramp = Tensor::from_vec(ramp, &[channels, states])?.to_device(bench.device)?;
            no_grad(|| ops::mul(&f, &ramp))?.detach().requires_grad_(true)?
        };
        let bm = bench.random(&bsl, -1.0, 1.0)?.requires_grad_(true)?;
        let cm = bench.random(&bsl, -1.0, 1.0)?.requires_grad_(true)?;
        let d = bench.random(&[channels], 0.5, 1.5)?.requires_grad_(true)?;
        // softplus(delta + delta_bias) then lies around 0.01 .. 0.3, Mamba's dt range.
        let delta_bias = bench.random(&[channels], -4.5, -2.0)?.requires_grad_(true)?;
        let g = bench.random(&bcl, -1.0, 1.0)?;
        let scan = |x: [&Tensor; 8]| {
            ops::selective_scan(x[0], x[1], x[2], x[3], x[4], Some(x[5]), Some(x[6]), Some(x[7]), true)
        };
        let leaves = [&u, &delta, &a, &bm, &cm, &d, &z, &delta_bias];

        // Bytes (f32 = 4), with BCL = batch * channels * length and BSL = batch * states * length:
        //   forward  reads u, delta, z (3 BCL), B, C (2 BSL), A (C S), D, delta_bias (2 C); writes out (BCL)
        //   backward reads u, delta, z, grad out (4 BCL), B, C (2 BSL), A, D, delta_bias (C S + 2 C);
        //            writes du, ddelta, dz (3 BCL), dB, dC (2 BSL), dA (C S), dD, ddelta_bias (2 C)
        // The forward's saved chunk states, which the backward reads back, are not counted.
        let (bcl_n, bsl_n) = ((batch * channels * length) as f64, (batch * states * length) as f64);
        let (cs, c2) = ((channels * states) as f64, 2.0 * channels as f64);
        let traffic = Traffic {
            forward: 4.0 * (4.0 * bcl_n + 2.0 * bsl_n + cs + c2),
            backward: 4.0 * (7.0 * bcl_n + 4.0 * bsl_n + 2.0 * cs + 2.0 * c2),
        };
        let shape = format!("B {batch}, C {channels}, L {length}, S {states}; z, D, delta_bias, softplus");
        let rows =
            time_forward_backward(bench, "selective_scan", &shape, &leaves, &g, traffic, &copy, || scan(leaves))?;
        let check = if bench.checking() {
            // The first sample on the CPU: out, and the gradients that are per sample (du, ddelta, dz, dB, dC).
            let host = |t: &Tensor, first| host_leaf(t, first);
            let hx = [
                host(&u, Some(1))?,
                host(&delta, Some(1))?,
                host(&a, None)?,
                host(&bm, Some(1))?,
                host(&cm, Some(1))?,
                host(&d, None)?,
                host(&z, Some(1))?,
                host(&delta_bias, None)?,
            ];
            let hy = scan([&hx[0], &hx[1], &hx[2], &hx[3], &hx[4], &hx[5], &hx[6], &hx[7]])?;
            hy.backward_with(&g.narrow(0, 0, 1)?.to_device(Device::Cpu)?)?;
            let y = no_grad(|| scan(leaves))?;
            let fwd = worst_err(&[(&y, &hy)], Some(1))?;
            let mut pairs = Vec::new();
            for i in [0, 1, 3, 4, 6] {
                pairs.push((grad_of(leaves[i])?, grad_of(&hx[i])?));
            }
            let refs: Vec<(&Tensor, &Tensor)> = pairs.iter().map(|(a, b)| (a, b)).collect();
            Some((fwd, worst_err(&refs, Some(1))?, "CPU ops, sample 0"))
        } else {
            None
        };
        let tolerance = bench.tolerance(false);
        push_checked(bench, rows, check, tolerance);
    }
    bench.report.notes.push(
        "bytes: forward 4 (4 BCL + 2 BSL + C S + 2 C), backward 4 (7 BCL + 4 BSL + 2 C S + 4 C) (inputs read once, \
         outputs and gradients written once; saved chunk states not counted); rates are over the copy row"
            .into(),
    );
    mixer_against_attention(bench)?;
    Ok(bench.report.clone())
}

/// The Mamba-1 mixer against MILA's linear attention at equal width and token count (issue #6): each one's
/// forward+backward time over (B, N, C) tokens, and the mixer's time over the attention's.
fn mixer_against_attention(bench: &mut Bench) -> Result<()> {
    let (batch, side, width) = if bench.quick { (2, 8, 32) } else { (16, 56, 192) };
    let tokens = side * side;
    let heads = width / 32;
    let mut rng = Generator::new(17);
    let mut init = nn::Init { dtype: DType::F32, device: bench.device, rng: &mut rng };
    let attention = mila::LinearAttention::new(&mut init, width, (side, side), heads, true)?;
    let mixer = mila::MambaMixer::new(&mut init, &mila::MambaConfig::new(width))?;
    let x = bench.random(&[batch, tokens, width], -1.0, 1.0)?.requires_grad_(true)?;
    let g = bench.random(&[batch, tokens, width], -1.0, 1.0)?;
    let shape = format!("x (B {batch}, N {tokens} = {side}x{side}, C {width})");
    let time = |f: &dyn Fn(&Tensor) -> Result<Tensor>| bench.clock.measure(|| f(&x)?.backward_with(&g));
    let attention_time = time(&|x| attention.forward(x))?;
    let mixer_time = time(&|x| mixer.forward(x))?;
    let ms = |name: String, timing: Timing, note: &str| {
        let rate = timing.median_ms;
        Row::new(name, format!("{shape}; {note}"), timing, None, None, rate, "ms")
    };
    let attention_row =
        ms("MILA LinearAttention forward+backward".into(), attention_time, &format!("{heads} heads, RoPE, LePE"));
    // The time ratio: `against` divides the rates, which for these rows are the times.
    let mixer_row = ms("Mamba mixer forward+backward".into(), mixer_time, "d_state 16, expand 2, d_conv 4")
        .against(&attention_row, None);
    bench.push(attention_row);
    bench.push(mixer_row);
    bench.report.notes.push(
        "mixer vs attention: the ratio column of the mixer row is its time over the attention's (above 1: the \
         mixer is slower), same width and tokens, forward+backward with parameter gradients"
            .into(),
    );
    Ok(())
}

// ---- mila bench train ----------------------------------------------------------------------------------

/// What `mila bench train` prints and writes.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub device: String,
    pub dtype: &'static str,
    pub tf32: bool,
    pub epochs: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub total_seconds: f64,
    pub train_seconds: f64,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub step_ms_max: f64,
    pub images_per_s: f64,
    pub final_test_acc: f64,
    pub final_train_loss: f64,
}

fn train_bench(args: &TrainBenchArgs) -> Result<ExitCode> {
    let device = default_device(args.device);
    cuda::set_tf32(args.tf32);
    let epochs = args.epochs.unwrap_or(if args.quick { 1 } else { 20 });
    let description = match device {
        Device::Cpu => cpu_description(),
        Device::Cuda(i) => {
            let dev = cuda::device(i)?;
            format!("{} (cuda:{i})", dev.name())
        }
    };
    let mut train_args = <crate::TrainArgs as clap::Parser>::parse_from(["train"]);
    train_args.epochs = epochs;
    train_args.device = device;
    train_args.out = args.out.clone();
    let started = Instant::now();
    crate::train(&train_args)?;
    let total_seconds = started.elapsed().as_secs_f64();
    let metrics = nn::trainer::read_metrics(&args.out.join("metrics.jsonl"))?;
    let mut steps: Vec<f64> = metrics.iter().flat_map(|m| m.step_seconds.iter().map(|s| s * 1e3)).collect();
    steps.sort_by(f64::total_cmp);
    let last = metrics.last().ok_or(Error::Msg { context: "bench train", msg: "no epoch was recorded".into() })?;
    let train_seconds: f64 = metrics.iter().map(|m| m.seconds).sum();
    let images: f64 = metrics.iter().map(|m| m.images_per_s * m.seconds).sum();
    let median = if steps.is_empty() { f64::NAN } else { steps[steps.len() / 2] };
    let report = TrainReport {
        device: description,
        dtype: "f32",
        tf32: args.tf32,
        epochs: metrics.len(),
        steps: steps.len(),
        batch_size: train_args.batch_size,
        total_seconds,
        train_seconds,
        step_ms_median: median,
        step_ms_min: steps.first().copied().unwrap_or(f64::NAN),
        step_ms_max: steps.last().copied().unwrap_or(f64::NAN),
        images_per_s: images / train_seconds.max(1e-9),
        final_test_acc: last.test_acc,
        final_train_loss: last.train_loss,
    };
    println!();
    println!("mila bench train: MLLA 'mnist' on the embedded MNIST-10k, `mila train` defaults, {}", report.device);
    println!("| device | dtype | epochs | steps | batch | total s | train-loop s | step ms (median) | step ms min / max | images/s | test acc |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | f32{} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} | {:.0} | {:.2}% |",
        device,
        if args.tf32 { " (TF32)" } else { "" },
        report.epochs,
        report.steps,
        report.batch_size,
        report.total_seconds,
        report.train_seconds,
        report.step_ms_median,
        report.step_ms_min,
        report.step_ms_max,
        report.images_per_s,
        100.0 * report.final_test_acc
    );
    println!(
        "- total: the whole command (data, model, training, evaluation after every epoch, checkpoints, plot); \
         train-loop: the training steps only; a step: from the end of the previous one to the end of this one"
    );
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
