//! CPU benches of the ops: `cargo bench --bench cpu_ops`.
//!
//! matmul: f32 (n, n) @ (n, n) with gemm on the rayon pool. A product is n^3 multiply-adds, 2 n^3 FLOP; the
//! throughput is declared in FLOP, so the "elem/s" criterion prints is FLOP/s.

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

criterion_group!(benches, matmul_f32);
criterion_main!(benches);
