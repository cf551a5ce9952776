use engine::{gradcheck, gradcheck_with, no_grad, DType, Device, Error, Generator, GradcheckOptions, Tensor};

use super::*;

/// One scan configuration: sizes, the chunk the CPU saves states at, and which options are on.
#[derive(Debug, Clone, Copy)]
struct Cfg {
    b: usize,
    c: usize,
    l: usize,
    s: usize,
    chunk: usize,
    d: bool,
    z: bool,
    bias: bool,
    softplus: bool,
}

const ALL: Cfg = Cfg { b: 2, c: 3, l: 9, s: 3, chunk: 4, d: true, z: true, bias: true, softplus: true };
const NONE: Cfg = Cfg { d: false, z: false, bias: false, softplus: false, ..ALL };

/// The configurations every property is checked on: L = 1, L a multiple of the chunk and not, L = 70 with the
/// default chunk 64, S = 1 and S = 16, each option on and off.
fn configs() -> Vec<Cfg> {
    vec![
        ALL,
        NONE,
        Cfg { l: 1, ..ALL },
        Cfg { l: 1, chunk: 64, ..NONE },
        Cfg { l: 8, chunk: 4, ..ALL },
        Cfg { l: 9, chunk: 1, z: false, ..ALL },
        Cfg { b: 1, c: 2, l: 70, s: 2, chunk: DEFAULT_CHUNK, ..ALL },
        Cfg { s: 1, d: false, ..ALL },
        Cfg { s: 16, c: 2, l: 11, chunk: 5, bias: false, ..ALL },
        Cfg { s: 16, b: 1, c: 1, l: 6, chunk: 64, softplus: false, ..NONE },
        Cfg { z: false, d: true, bias: false, softplus: true, ..ALL },
        Cfg { z: true, d: false, bias: true, softplus: false, ..ALL },
    ]
}

/// Random inputs of `cfg` in f64: u, delta, A, B, C, then D, z, delta_bias where the config has them. A < 0
/// (a decaying state, as Mamba's A = -exp(A_log)); dt stays positive and moderate.
fn inputs(cfg: Cfg, seed: u64) -> Vec<Tensor> {
    let mut g = Generator::new(seed);
    let mut t =
        |shape: &[usize], lo: f64, hi: f64| Tensor::rand(shape, lo, hi, DType::F64, Device::Cpu, &mut g).unwrap();
    let (bcl, bsl) = ([cfg.b, cfg.c, cfg.l], [cfg.b, cfg.s, cfg.l]);
    let delta = if cfg.softplus { (-2.0, 1.0) } else { (0.05, 1.0) };
    let mut v = vec![t(&bcl, -2.0, 2.0), t(&bcl, delta.0, delta.1), t(&[cfg.c, cfg.s], -2.0, -0.1)];
    v.push(t(&bsl, -1.5, 1.5));
    v.push(t(&bsl, -1.5, 1.5));
    if cfg.d {
        v.push(t(&[cfg.c], -1.0, 1.0));
    }
    if cfg.z {
        v.push(t(&bcl, -2.0, 2.0));
    }
    if cfg.bias {
        v.push(t(&[cfg.c], -0.5, 0.5));
    }
    v
}

/// (D, z, delta_bias) of `x` as laid out by [`inputs`].
fn optional(cfg: Cfg, x: &[Tensor]) -> (Option<&Tensor>, Option<&Tensor>, Option<&Tensor>) {
    let mut rest = x[5..].iter();
    let d = if cfg.d { rest.next() } else { None };
    let z = if cfg.z { rest.next() } else { None };
    let bias = if cfg.bias { rest.next() } else { None };
    (d, z, bias)
}

fn scan(cfg: Cfg, x: &[Tensor]) -> Result<Tensor> {
    let (d, z, bias) = optional(cfg, x);
    selective_scan_chunked(&x[0], &x[1], &x[2], &x[3], &x[4], d, z, bias, cfg.softplus, cfg.chunk)
}

fn scan_ref(cfg: Cfg, x: &[Tensor]) -> Result<Tensor> {
    let (d, z, bias) = optional(cfg, x);
    selective_scan_ref(&x[0], &x[1], &x[2], &x[3], &x[4], d, z, bias, cfg.softplus)
}

/// ||a - b|| / ||b||, 0 when both are zero.
fn rel_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if num == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The output and every input's gradient (in input order) for the cotangent `cot`.
fn forward_backward(cfg: Cfg, x: &[Tensor], cot: &Tensor) -> (Vec<f64>, Vec<Vec<f64>>) {
    let leaves: Vec<Tensor> = x.iter().map(|t| t.detach().requires_grad_(true).unwrap()).collect();
    let y = scan(cfg, &leaves).unwrap();
    y.backward_with(cot).unwrap();
    let grads = leaves.iter().map(|t| t.grad().expect("every input gets a gradient").to_vec_f64().unwrap()).collect();
    (y.to_vec_f64().unwrap(), grads)
}

fn cotangent(cfg: Cfg, dtype: DType, seed: u64) -> Tensor {
    Tensor::randn(&[cfg.b, cfg.c, cfg.l], 0.0, 1.0, dtype, Device::Cpu, &mut Generator::new(seed)).unwrap()
}

#[test]
fn scan_matches_reference_f64() {
    for (i, cfg) in configs().into_iter().enumerate() {
        let x = inputs(cfg, 10 + i as u64);
        let got = scan(cfg, &x).unwrap();
        assert_eq!(got.shape(), &[cfg.b, cfg.c, cfg.l]);
        let e = rel_error(&got.to_vec_f64().unwrap(), &scan_ref(cfg, &x).unwrap().to_vec_f64().unwrap());
        assert!(e < 1e-14, "{cfg:?}: relative error {e:.2e}");
    }
}

#[test]
fn scan_matches_reference_f32() {
    for (i, cfg) in configs().into_iter().enumerate() {
        let x32: Vec<Tensor> = inputs(cfg, 20 + i as u64).iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
        // The reference on exactly the f32 values, in f64.
        let x64: Vec<Tensor> = x32.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
        let got = scan(cfg, &x32).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let e = rel_error(&got.to_vec_f64().unwrap(), &scan_ref(cfg, &x64).unwrap().to_vec_f64().unwrap());
        assert!(e < 1e-5, "{cfg:?}: relative error {e:.2e}");
    }
}

#[test]
fn scan_grad_passes_gradcheck() {
    for (i, cfg) in configs().into_iter().enumerate() {
        // Step 1e-5 (near cbrt of f64 epsilon): at 1e-6 the roundoff of L(x +- h), which sums every output,
        // reaches the tolerance on the smallest gradients of the longer sequences.
        let opts = GradcheckOptions { eps: 1e-5, ..Default::default() };
        let r = gradcheck_with("selective_scan", &inputs(cfg, 30 + i as u64), opts, |x| scan(cfg, x)).unwrap();
        assert!(r.passed(), "{cfg:?}: {r}");
        assert!(r.max_abs_grad > 0.0, "{cfg:?}: {r}");
    }
}

/// The op's gradients against central differences of the reference (a different code path from the op's own
/// forward, which gradcheck differentiates).
#[test]
fn scan_grad_matches_reference() {
    for cfg in [ALL, Cfg { l: 13, chunk: 5, s: 4, ..ALL }, Cfg { l: 7, chunk: 3, ..NONE }] {
        let x = inputs(cfg, 40);
        let cot = cotangent(cfg, DType::F64, 41);
        let (_, grads) = forward_backward(cfg, &x, &cot);
        let g = cot.to_vec_f64().unwrap();
        let loss = |xs: &[Tensor]| -> f64 {
            let y = scan_ref(cfg, xs).unwrap().to_vec_f64().unwrap();
            y.iter().zip(&g).map(|(a, b)| a * b).sum()
        };
        for (i, analytic) in grads.iter().enumerate() {
            let values = x[i].to_vec_f64().unwrap();
            let mut numeric = vec![0.0; values.len()];
            for (j, n) in numeric.iter_mut().enumerate() {
                let h = 1e-6 * values[j].abs().max(1.0);
                let at = |v: f64| {
                    let mut vs = values.clone();
                    vs[j] = v;
                    let mut xs = x.clone();
                    xs[i] = Tensor::from_f64(&vs, x[i].shape(), DType::F64, Device::Cpu).unwrap();
                    loss(&xs)
                };
                *n = (at(values[j] + h) - at(values[j] - h)) / (2.0 * h);
            }
            let e = rel_error(analytic, &numeric);
            assert!(e < 1e-7, "{cfg:?}: input {i}: relative error {e:.2e} against finite differences");
        }
    }
}

#[test]
fn scan_grad_f32_matches_f64() {
    for (i, cfg) in configs().into_iter().enumerate() {
        let x64 = inputs(cfg, 50 + i as u64);
        let x32: Vec<Tensor> = x64.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
        let cot = cotangent(cfg, DType::F64, 51);
        let (y64, g64) = forward_backward(cfg, &x64, &cot);
        let (y32, g32) = forward_backward(cfg, &x32, &cot.to_dtype(DType::F32).unwrap());
        assert!(rel_error(&y32, &y64) < 1e-5, "{cfg:?}: output");
        for (k, (a, b)) in g32.iter().zip(&g64).enumerate() {
            let e = rel_error(a, b);
            assert!(e < 1e-4, "{cfg:?}: gradient {k}: relative error {e:.2e}");
        }
    }
}

#[test]
fn scan_grad_does_not_depend_on_the_chunk() {
    let base = Cfg { b: 2, c: 3, l: 23, s: 5, chunk: 64, ..ALL };
    let x = inputs(base, 60);
    let cot = cotangent(base, DType::F64, 61);
    let (y, g) = forward_backward(base, &x, &cot);
    for chunk in [1, 2, 4, 7, 22, 23, 24] {
        let (yc, gc) = forward_backward(Cfg { chunk, ..base }, &x, &cot);
        // Same arithmetic in the same order: the chunk only decides what is saved and recomputed.
        assert_eq!(yc, y, "chunk {chunk}: output");
        assert_eq!(gc, g, "chunk {chunk}: gradients");
    }
}

#[test]
fn scan_backward_is_deterministic() {
    // More channels than channel groups, so several tasks add into each batch's dB and dC.
    let cfg = Cfg { b: 3, c: 37, l: 50, s: 16, chunk: 8, ..ALL };
    let x = inputs(cfg, 70);
    let cot = cotangent(cfg, DType::F32, 71);
    let x32: Vec<Tensor> = x.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
    let first = forward_backward(cfg, &x32, &cot);
    for _ in 0..3 {
        assert_eq!(forward_backward(cfg, &x32, &cot), first);
    }
}

#[test]
fn scan_takes_views_and_partial_requires_grad() {
    let cfg = ALL;
    let x = inputs(cfg, 80);
    // u and z stored (B, L, C) and B stored (B, L, S), as a mixer produces them, handed over transposed.
    let stored = |t: &Tensor| crate::view::transpose(t, 1, 2).unwrap().contiguous().unwrap();
    let (u_blc, b_bls, z_blc) = (stored(&x[0]), stored(&x[3]), stored(&x[6]));
    let u = crate::view::transpose(&u_blc, 1, 2).unwrap();
    let b = crate::view::transpose(&b_bls, 1, 2).unwrap();
    let z = crate::view::transpose(&z_blc, 1, 2).unwrap();
    assert!(!u.is_contiguous());
    let u_leaf = u_blc.requires_grad_(true).unwrap();
    let u_view = crate::view::transpose(&u_leaf, 1, 2).unwrap();
    let y =
        selective_scan_chunked(&u_view, &x[1], &x[2], &b, &x[4], Some(&x[5]), Some(&z), Some(&x[7]), true, 4).unwrap();
    let want = scan(cfg, &x).unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    // Only u requires grad: it gets one, of its own (B, L, C) shape.
    y.backward_with(&cotangent(cfg, DType::F64, 81)).unwrap();
    let gu = u_leaf.grad().unwrap();
    assert_eq!(gu.shape(), &[cfg.b, cfg.l, cfg.c]);
    let (_, grads) = forward_backward(cfg, &x, &cotangent(cfg, DType::F64, 81));
    let want_gu = crate::view::transpose(
        &Tensor::from_f64(&grads[0], &[cfg.b, cfg.c, cfg.l], DType::F64, Device::Cpu).unwrap(),
        1,
        2,
    )
    .unwrap();
    assert_eq!(gu.to_vec_f64().unwrap(), want_gu.to_vec_f64().unwrap());
    // Under no_grad nothing is recorded.
    let y = no_grad(|| scan(cfg, &x.iter().map(|t| t.detach().requires_grad_(true).unwrap()).collect::<Vec<_>>()));
    assert!(y.unwrap().grad_fn().is_none());
}

#[test]
fn scan_handles_empty_sizes() {
    for cfg in [Cfg { l: 0, ..ALL }, Cfg { b: 0, ..ALL }, Cfg { c: 0, ..ALL }] {
        let x = inputs(cfg, 90);
        let cot = cotangent(cfg, DType::F64, 91);
        let (y, grads) = forward_backward(cfg, &x, &cot);
        assert!(y.is_empty(), "{cfg:?}");
        for (g, t) in grads.iter().zip(&x) {
            assert_eq!(g.len(), t.numel(), "{cfg:?}");
            assert!(g.iter().all(|&v| v == 0.0), "{cfg:?}: a gradient with nothing to flow from is zero");
        }
    }
}

#[test]
fn softplus_threshold_is_pytorchs() {
    // delta + bias above 20: dt = delta + bias exactly, and its derivative 1.
    let cfg = Cfg { b: 1, c: 1, l: 2, s: 1, ..NONE };
    let t = |v: &[f64], shape: &[usize]| Tensor::from_f64(v, shape, DType::F64, Device::Cpu).unwrap();
    let (u, delta, a) = (t(&[1.0, 1.0], &[1, 1, 2]), t(&[25.0, 30.0], &[1, 1, 2]), t(&[-0.01], &[1, 1]));
    let (b, c) = (t(&[1.0, 1.0], &[1, 1, 2]), t(&[1.0, 1.0], &[1, 1, 2]));
    let y = selective_scan(&u, &delta, &a, &b, &c, None, None, None, true).unwrap().to_vec_f64().unwrap();
    // h[0] = dt B u = 25; h[1] = exp(30 A) h[0] + 30.
    assert_eq!(y, vec![25.0, (30.0 * -0.01f64).exp() * 25.0 + 30.0]);
    let r = gradcheck("selective_scan", &[u, delta, a, b, c], |x| scan(Cfg { softplus: true, ..cfg }, x)).unwrap();
    assert!(r.passed(), "{r}");
}

#[test]
fn scan_rejects_bad_inputs() {
    let x = inputs(ALL, 100);
    let (u, delta, a, b, c, d, z, bias) = (&x[0], &x[1], &x[2], &x[3], &x[4], &x[5], &x[6], &x[7]);
    let t = |shape: &[usize]| Tensor::zeros(shape, DType::F64, Device::Cpu).unwrap();
    let run =
        |u: &Tensor, delta: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor, d: &Tensor, z: &Tensor, bias: &Tensor| {
            selective_scan(u, delta, a, b, c, Some(d), Some(z), Some(bias), true)
        };
    let invalid = |r: Result<Tensor>, what: &str| match r {
        Err(Error::InvalidArgument { op: "selective_scan", msg, .. }) => assert!(msg.contains(what), "{msg}"),
        other => panic!("expected an invalid-argument error naming {what}, got {other:?}"),
    };
    invalid(run(&t(&[2, 3]), delta, a, b, c, d, z, bias), "u must be");
    assert!(matches!(run(u, &t(&[2, 3, 8]), a, b, c, d, z, bias), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(run(u, delta, a, b, c, d, &t(&[2, 9, 3]), bias), Err(Error::ShapeMismatch { .. })));
    invalid(run(u, delta, &t(&[4, 3]), b, c, d, z, bias), "A must be");
    invalid(run(u, delta, &t(&[3, 0]), b, c, d, z, bias), "states >= 1");
    invalid(run(u, delta, &t(&[3]), b, c, d, z, bias), "A must be");
    invalid(run(u, delta, a, &t(&[2, 4, 9]), c, d, z, bias), "B must be");
    invalid(run(u, delta, a, b, &t(&[2, 3, 8]), d, z, bias), "C must be");
    invalid(run(u, delta, a, b, c, &t(&[4]), z, bias), "D must");
    invalid(run(u, delta, a, b, c, d, z, &t(&[3, 1])), "delta_bias must");
    let f32 = a.to_dtype(DType::F32).unwrap();
    assert!(matches!(run(u, delta, &f32, b, c, d, z, bias), Err(Error::DTypeMismatch { .. })));
    invalid(selective_scan_chunked(u, delta, a, b, c, None, None, None, true, 0), "chunk");
    // The reference checks the same way.
    assert!(selective_scan_ref(u, delta, &t(&[4, 3]), b, c, None, None, None, true).is_err());
}

#[test]
#[ignore = "needs g++: compiles scan.cu for the CPU emulator (emu/) and runs its kernels (about a minute)"]
fn scan_cuda_source_runs_on_the_emulator() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/scan/emu");
    let exe = std::env::temp_dir().join(format!("mila_scan_emu_{}", std::process::id()));
    let built = std::process::Command::new("g++")
        .args(["-std=c++17", "-O1", "-o"])
        .arg(&exe)
        .arg(format!("{dir}/harness.cpp"))
        .status()
        .expect("g++ runs");
    assert!(built.success(), "the emulator harness does not compile");
    let out = std::process::Command::new(&exe).output().expect("the emulator runs");
    let _ = std::fs::remove_file(&exe);
    let log = String::from_utf8_lossy(&out.stdout);
    println!("{log}");
    assert!(out.status.success(), "{log}{}", String::from_utf8_lossy(&out.stderr));
}
