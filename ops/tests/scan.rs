//! The selective scan against the float64 fixture of Mamba's reference loop (`tests/fixtures/
//! selective_scan.safetensors`: output and every input's gradient), and its CUDA kernels against the CPU on
//! fresh random inputs (skipped without a device; failing under MILA_REQUIRE_CUDA=1).

use std::collections::HashMap;

use engine::cuda::{poison_new_allocations, test_device_or_skip};
use engine::{DType, Device, Error, Generator, Tensor};
use ops::{selective_scan, selective_scan_ref};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/selective_scan.safetensors");

/// The scan's inputs in the op's argument order; the fixture names them `input.<name>`, `grad.<name>`.
const NAMES: [&str; 8] = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"];

/// Every tensor of a safetensors file (little-endian float64) as CPU tensors, with the metadata's `kind` and
/// parsed `config`.
fn load(path: &str) -> (HashMap<String, Tensor>, String, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F64, "{name}");
        let v: Vec<f64> = view.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
        out.insert(name, Tensor::from_vec(v, view.shape()).unwrap());
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    let config = serde_json::from_str(meta.get("config").map_or("{}", |s| s.as_str())).unwrap();
    (out, meta.get("kind").cloned().unwrap_or_default(), config)
}

/// ||got - want|| / ||want||.
fn rel_error(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    let diff: f64 = g.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    let norm = w.iter().map(|v| v * v).sum::<f64>().sqrt();
    if diff == 0.0 {
        0.0
    } else {
        diff / norm
    }
}

/// The output and every input's gradient for `cot`, on leaves made from `x` (in `NAMES` order, all eight).
fn forward_backward(x: &[Tensor], softplus: bool, cot: &Tensor) -> (Tensor, Vec<Tensor>) {
    let leaves: Vec<Tensor> = x.iter().map(|t| t.detach().requires_grad_(true).unwrap()).collect();
    let l = &leaves;
    let y = selective_scan(&l[0], &l[1], &l[2], &l[3], &l[4], Some(&l[5]), Some(&l[6]), Some(&l[7]), softplus).unwrap();
    y.backward_with(cot).unwrap();
    (y, leaves.iter().map(|t| t.grad().expect("every input gets a gradient")).collect())
}

fn scan_matches_the_fixture(dtype: DType, tol_out: f64, tol_grad: f64) {
    let (t, kind, config) = load(FIXTURE);
    assert_eq!(kind, "selective_scan");
    let size = |k: &str| config[k].as_u64().unwrap_or_else(|| panic!("config has no {k}: {config}")) as usize;
    let (b, c, l, s) = (size("batch"), size("channels"), size("length"), size("state"));
    let softplus = config["delta_softplus"].as_bool().unwrap();
    assert_eq!(t["input.u"].shape(), &[b, c, l]);
    assert_eq!(t["input.A"].shape(), &[c, s]);
    assert_eq!(t["input.B"].shape(), &[b, s, l]);
    let x: Vec<Tensor> = NAMES.iter().map(|n| t[&format!("input.{n}")].to_dtype(dtype).unwrap()).collect();
    let (y, grads) = forward_backward(&x, softplus, &t["cotangent"].to_dtype(dtype).unwrap());
    let e = rel_error(&y, &t["output"]);
    println!("{dtype} selective_scan fixture: output relative error {e:.2e}");
    assert!(e < tol_out, "{dtype} output: relative error {e:.2e}");
    for (name, g) in NAMES.iter().zip(&grads) {
        let e = rel_error(g, &t[&format!("grad.{name}")]);
        println!("{dtype} selective_scan fixture: grad.{name} relative error {e:.2e}");
        assert!(e < tol_grad, "{dtype} grad.{name}: relative error {e:.2e}");
    }
}

#[test]
fn scan_matches_the_fixture_f64() {
    scan_matches_the_fixture(DType::F64, 1e-10, 1e-10);
}

#[test]
fn scan_matches_the_fixture_f32() {
    // The fixtures' README: float32 meets about 1e-5 for outputs and 1e-4 for gradients.
    scan_matches_the_fixture(DType::F32, 1e-5, 1e-4);
}

#[test]
fn scan_reference_matches_the_fixture() {
    let (t, _, config) = load(FIXTURE);
    let x: Vec<&Tensor> = NAMES.iter().map(|n| &t[&format!("input.{n}")]).collect();
    let softplus = config["delta_softplus"].as_bool().unwrap();
    let y = selective_scan_ref(x[0], x[1], x[2], x[3], x[4], Some(x[5]), Some(x[6]), Some(x[7]), softplus).unwrap();
    let e = rel_error(&y, &t["output"]);
    assert!(e < 1e-12, "relative error {e:.2e}");
}

/// Random inputs in `NAMES` order for sizes (B, C, L, S): A < 0, dt moderate. Without softplus, dt = delta +
/// delta_bias is used as it is, so both are drawn positive: a negative dt makes exp(dt A) > 1, and the state
/// grows without bound (past f32's range within a few dozen steps), which no caller of the scan does.
fn random_inputs((b, c, l, s): (usize, usize, usize, usize), dtype: DType, seed: u64, softplus: bool) -> Vec<Tensor> {
    let mut g = Generator::new(seed);
    let mut t = |shape: &[usize], lo: f64, hi: f64| Tensor::rand(shape, lo, hi, dtype, Device::Cpu, &mut g).unwrap();
    let (delta, bias) = if softplus { ((-2.0, 1.0), (-0.5, 0.5)) } else { ((0.01, 1.0), (0.0, 0.5)) };
    vec![
        t(&[b, c, l], -2.0, 2.0),
        t(&[b, c, l], delta.0, delta.1),
        t(&[c, s], -2.0, -0.1),
        t(&[b, s, l], -1.5, 1.5),
        t(&[b, s, l], -1.5, 1.5),
        t(&[c], -1.0, 1.0),
        t(&[b, c, l], -2.0, 2.0),
        t(&[c], bias.0, bias.1),
    ]
}

/// Every option on and off, S across the kernels' lane layouts (1 to 32 lanes per channel, 4 or 8 states per
/// lane), channels not a multiple of a block's (32 at S = 16) and several blocks per batch, lengths past
/// several tiles (32 steps in f32, 16 in f64) and not a multiple of one.
fn scan_cuda_matches_cpu(dtype: DType, tol_out: f64, tol_grad: f64) {
    let _serial = crate::cuda_serial();
    let Some(_dev) = test_device_or_skip("scan_cuda_matches_cpu") else { return };
    let _poison = poison_new_allocations();
    let sizes = [
        (2, 5, 9, 3),
        (1, 3, 1, 1),
        (1, 3, 70, 16),
        (2, 37, 130, 16),
        (1, 4, 33, 40),
        (1, 2, 20, 256),
        (3, 100, 75, 16),
        (1, 9, 40, 150),
    ];
    let mut failures = Vec::new();
    for (i, &dims) in sizes.iter().enumerate() {
        for softplus in [true, false] {
            let seed = 500 + i as u64;
            let cpu = random_inputs(dims, dtype, seed, softplus);
            let gpu: Vec<Tensor> = cpu.iter().map(|t| t.to_device(Device::Cuda(0)).unwrap()).collect();
            let cot = Tensor::randn(&[dims.0, dims.1, dims.2], 0.0, 1.0, dtype, Device::Cpu, &mut Generator::new(seed))
                .unwrap();
            let (y_cpu, g_cpu) = forward_backward(&cpu, softplus, &cot);
            let (y_gpu, g_gpu) = forward_backward(&gpu, softplus, &cot.to_device(Device::Cuda(0)).unwrap());
            assert_eq!(y_gpu.device(), Device::Cuda(0));
            let e = rel_error(&y_gpu, &y_cpu);
            println!("{dtype} {dims:?} softplus {softplus}: output {e:.2e}");
            if e.is_nan() || e > tol_out {
                failures.push(format!("{dims:?} softplus {softplus}: output relative error {e:.2e}"));
            }
            for (name, (a, b)) in NAMES.iter().zip(g_gpu.iter().zip(&g_cpu)) {
                let e = rel_error(a, b);
                if e.is_nan() || e > tol_grad {
                    failures.push(format!("{dims:?} softplus {softplus}: grad.{name} relative error {e:.2e}"));
                }
            }
        }
        // The optional operands absent: the kernels' flags and placeholder pointers.
        let cpu = random_inputs(dims, dtype, 600 + i as u64, false);
        let bare = |x: &[Tensor]| -> (Tensor, Vec<Tensor>) {
            let l: Vec<Tensor> = x[..5].iter().map(|t| t.detach().requires_grad_(true).unwrap()).collect();
            let y = selective_scan(&l[0], &l[1], &l[2], &l[3], &l[4], None, None, None, false).unwrap();
            y.backward_with(&y.ones_like().unwrap()).unwrap();
            (y, l.iter().map(|t| t.grad().unwrap()).collect())
        };
        let (y_cpu, g_cpu) = bare(&cpu);
        let (y_gpu, g_gpu) = bare(&cpu.iter().map(|t| t.to_device(Device::Cuda(0)).unwrap()).collect::<Vec<_>>());
        let worst = g_gpu.iter().zip(&g_cpu).fold(rel_error(&y_gpu, &y_cpu), |m, (a, b)| m.max(rel_error(a, b)));
        if worst.is_nan() || worst > tol_grad {
            failures.push(format!("{dims:?} without D, z, delta_bias: relative error {worst:.2e}"));
        }
    }
    assert!(failures.is_empty(), "{dtype}: the CUDA scan differs from the CPU:\n{}", failures.join("\n"));
}

#[test]
fn scan_cuda_matches_cpu_f32() {
    scan_cuda_matches_cpu(DType::F32, 1e-5, 1e-4);
}

#[test]
fn scan_cuda_matches_cpu_f64() {
    scan_cuda_matches_cpu(DType::F64, 1e-12, 1e-12);
}

#[test]
fn scan_cuda_refuses_more_than_256_states() {
    let _serial = crate::cuda_serial();
    if test_device_or_skip("scan_cuda_refuses_more_than_256_states").is_none() {
        return;
    }
    let x: Vec<Tensor> = random_inputs((1, 2, 3, 257), DType::F32, 7, true)
        .iter()
        .map(|t| t.to_device(Device::Cuda(0)).unwrap())
        .collect();
    let r = selective_scan(&x[0], &x[1], &x[2], &x[3], &x[4], None, None, None, true);
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
}

#[test]
fn scan_cuda_is_deterministic() {
    // The backward sums dB, dC over channels and dA, dD, ddelta_bias over batches without atomics: the same
    // inputs give the same bits on every run.
    let _serial = crate::cuda_serial();
    let Some(_dev) = test_device_or_skip("scan_cuda_is_deterministic") else { return };
    let dims = (3, 100, 75, 16);
    let x: Vec<Tensor> =
        random_inputs(dims, DType::F32, 700, true).iter().map(|t| t.to_device(Device::Cuda(0)).unwrap()).collect();
    let cot = Tensor::randn(&[dims.0, dims.1, dims.2], 0.0, 1.0, DType::F32, Device::Cuda(0), &mut Generator::new(701))
        .unwrap();
    let bits = |(y, grads): (Tensor, Vec<Tensor>)| -> Vec<Vec<f64>> {
        std::iter::once(y).chain(grads).map(|t| t.to_vec_f64().unwrap()).collect()
    };
    let first = bits(forward_backward(&x, true, &cot));
    for _ in 0..3 {
        assert!(bits(forward_backward(&x, true, &cot)) == first, "a CUDA scan result changed between runs");
    }
}
