//! Peak live bytes of CPU tensor storage (`engine::cpu_memory`) in one MLLA-T training step and in one MILA
//! block, printed for comparing what the forward saves for backward. Ignored by default (about 5 s in
//! release on two cores); run with
//! `cargo test --release -p mila-models --test all memory -- --ignored --nocapture --test-threads=1`
//! (one thread, so that no other test moves the process-wide counters).

use engine::{cpu_memory, DType, Device, Generator, Tensor};
use mila::{BlockConfig, MilaBlock, Mlla, MllaConfig};
use nn::Init;

const MIB: f64 = (1 << 20) as f64;

#[test]
#[ignore = "prints measurements; ~5 s"]
fn mlla_t_training_step_peak_cpu_bytes() {
    let (batch, size) = (2, 224);
    let mut rng = Generator::new(0);
    let config = MllaConfig { img_size: size, ..MllaConfig::tiny() };
    let model = Mlla::new(&mut Init { dtype: DType::F32, device: Device::Cpu, rng: &mut rng }, &config).unwrap();
    let x = Tensor::randn(&[batch, 3, size, size], 0.0, 1.0, DType::F32, Device::Cpu, &mut rng).unwrap();
    let targets: Vec<usize> = (0..batch).collect();
    cpu_memory::reset_peak();
    let base = cpu_memory::memory_stats().in_use_bytes;
    let loss = ops::cross_entropy(&model.forward(&x, &mut rng).unwrap(), &targets, 0.0).unwrap();
    let saved = cpu_memory::memory_stats().in_use_bytes - base;
    loss.backward().unwrap();
    let peak = cpu_memory::memory_stats().peak_bytes - base;
    println!(
        "MLLA-T, batch {batch}, {size}x{size}, f32: saved after forward {:.1} MiB, step peak {:.1} MiB above the \
         {:.1} MiB of parameters and input",
        saved as f64 / MIB,
        peak as f64 / MIB,
        base as f64 / MIB
    );
}

/// Bytes a block's forward leaves alive (what it saves for backward, and its output), in units of one
/// (B, N, C) tensor, for the first block of each MLLA-T stage at 224x224.
#[test]
#[ignore = "prints measurements"]
fn mila_block_saved_bytes() {
    let batch = 2;
    for (dim, side, heads) in [(64, 56, 2), (128, 28, 4), (256, 14, 8), (512, 7, 16)] {
        let mut rng = Generator::new(1);
        let cfg = BlockConfig {
            dim,
            input_resolution: (side, side),
            num_heads: heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_path: 0.1,
        };
        let block = MilaBlock::new(&mut Init { dtype: DType::F32, device: Device::Cpu, rng: &mut rng }, &cfg).unwrap();
        let x = Tensor::randn(&[batch, side * side, dim], 0.0, 1.0, DType::F32, Device::Cpu, &mut rng)
            .unwrap()
            .requires_grad_(true)
            .unwrap();
        let unit = (batch * side * side * dim * 4) as f64;
        let before = cpu_memory::memory_stats().in_use_bytes;
        let y = block.forward(&x, &mut rng).unwrap();
        let kept = cpu_memory::memory_stats().in_use_bytes - before;
        println!(
            "block dim {dim} on {side}x{side}: {:.2} MiB kept, {:.2} U (U = one (B, N, C) tensor)",
            kept as f64 / MIB,
            kept as f64 / unit
        );
        drop(y);
    }
}
