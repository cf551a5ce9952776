//! CPU benches of the ops: `cargo bench --bench cpu_ops`.
//!
//! Each op is measured beside this machine's peaks (`peak.rs`), in the same run:
//! - matmul: f32 (n, n) @ (n, n) with gemm on the rayon pool. A product is n^3 multiply-adds, 2 n^3 FLOP; the
//!   throughput is declared in FLOP, so the "elem/s" criterion prints is FLOP/s. Peak: `peak/fma`.
//! - add: f32 a + b over 16M elements, 3 x 64 MiB moved (two reads, one write); throughput in bytes. Peak:
//!   `peak/copy`, a parallel copy of 64 MiB (2 x 64 MiB moved).

mod peak;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::{DType, Device, Generator, Tensor};

fn matmul_f32(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu/matmul_f32");
    // One 1024^3 product takes tens of milliseconds on a few cores: the fewest samples criterion allows keep
    // a run within a few seconds, and the spread of so long an operation is small anyway.
    group.sample_size(10);
    let mut g = Generator::new(0);
    for n in [512usize, 1024] {
        let a = Tensor::randn(&[n, n], 0.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap();
        let b = Tensor::randn(&[n, n], 0.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap();
        let flop = 2 * (n as u64).pow(3);
        group.throughput(Throughput::Elements(flop));
        let id = BenchmarkId::new(format!("{n}x{n}x{n}"), format!("{:.2}_GFLOP", flop as f64 / 1e9));
        group.bench_function(id, |bench| bench.iter(|| ops::matmul(&a, &b).unwrap()));
    }
    group.finish();
}

const ADD_N: usize = 16 << 20;

fn add_f32(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu/add_f32");
    group.sample_size(10);
    let mut g = Generator::new(1);
    let a = Tensor::randn(&[ADD_N], 0.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap();
    let b = Tensor::randn(&[ADD_N], 0.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap();
    group.throughput(Throughput::Bytes(3 * 4 * ADD_N as u64));
    group.bench_function("16M", |bench| bench.iter(|| ops::add(&a, &b).unwrap()));
    group.finish();
}

fn peaks(c: &mut Criterion) {
    let mut group = c.benchmark_group("peak");
    group.sample_size(10);
    group.throughput(Throughput::Elements((peak::fma_flops_per_call() * rayon::current_num_threads() as f64) as u64));
    group.bench_function("fma_f32", |bench| bench.iter(peak::fma_all_threads));
    let src = vec![1.0f32; ADD_N];
    let mut dst = vec![0.0f32; ADD_N];
    group.throughput(Throughput::Bytes(2 * 4 * ADD_N as u64));
    group.bench_function("copy_64MiB", |bench| bench.iter(|| peak::copy(&mut dst, &src)));
    group.finish();
}

criterion_group!(benches, peaks, matmul_f32, add_f32);
criterion_main!(benches);
