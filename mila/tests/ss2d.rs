//! SS2D, VMamba's vision Mamba block: names and shapes, init, errors, the four scan orders (against a sum of
//! four single-order scans built by hand with transposes, flips and the reference scan; and the symmetry
//! under transposing the grid), and an f64 finite-difference check on a tiny grid.

use std::collections::HashMap;

use engine::{gradcheck_with, DType, Device, Generator, GradcheckOptions, Result, Tensor};
use mila::{MambaConfig, ScanOrder, Ss2d};
use nn::{Entry, Init, Module};
use ops::TensorOps;

fn init(rng: &mut Generator) -> Init<'_> {
    Init { dtype: DType::F64, device: Device::Cpu, rng }
}

fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, std, DType::F64, Device::Cpu, &mut Generator::new(seed)).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    values(a).iter().zip(values(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// A tiny SS2D: d_model 4, d_state 3, expand 2 (d_inner 8), dt_rank 1.
fn tiny_config() -> MambaConfig {
    MambaConfig { d_state: 3, ..MambaConfig::ss2d(4) }
}

/// Random O(1) values for every parameter, keyed by name (the init's small dt keeps the scans short-sighted,
/// which would make the orders hard to tell apart).
fn random_state(m: &dyn Module, seed: u64) -> HashMap<String, Tensor> {
    m.state_dict().into_iter().enumerate().map(|(i, (n, t))| (n, randn(t.shape(), 0.5, seed + i as u64))).collect()
}

fn build(config: &MambaConfig, resolution: (usize, usize), state: Option<&HashMap<String, Tensor>>) -> Ss2d {
    let m = Ss2d::new(&mut init(&mut Generator::new(0)), config, resolution).unwrap();
    if let Some(state) = state {
        m.load_tensors(state, &HashMap::new(), true).unwrap();
    }
    m
}

#[test]
fn ss2d_names_shapes_and_flags_are_vmamba_s() {
    let m = build(&MambaConfig::ss2d(8), (3, 5), None); // d_inner 16, dt_rank 1, d_state 16
    let mut flags = Vec::new();
    m.visit(&mut |name, e| {
        if let Entry::Param { tensor, no_decay } = e {
            flags.push((name.to_string(), tensor.shape().to_vec(), no_decay));
        }
    });
    let expected: [(&str, &[usize], bool); 11] = [
        ("x_proj_weight", &[4, 33, 16], false),
        ("dt_projs_weight", &[4, 16, 1], false),
        ("dt_projs_bias", &[4, 16], true),
        ("A_logs", &[64, 16], true),
        ("Ds", &[64], true),
        ("in_proj.weight", &[32, 8], false),
        ("conv2d.weight", &[16, 1, 3, 3], false),
        ("conv2d.bias", &[16], true),
        ("out_norm.weight", &[16], true),
        ("out_norm.bias", &[16], true),
        ("out_proj.weight", &[8, 16], false),
    ];
    let got: Vec<(&str, &[usize], bool)> = flags.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), *d)).collect();
    assert_eq!(got, expected);
    assert_eq!(m.num_params(), expected.iter().map(|(_, s, _)| s.iter().product::<usize>()).sum::<usize>());
    // 15 tokens: in_proj, conv, four times (x_proj, dt_proj, scan 3S + 1), out_proj.
    let n = 15;
    assert_eq!(m.macs(), n * (256 + 144 + 4 * (33 * 16 + 16 * (1 + 3 * 16 + 1)) + 128));
}

#[test]
fn ss2d_init_follows_vmamba() {
    let m = build(&MambaConfig::ss2d(64), (2, 2), None); // d_inner 128, dt_rank 4
    let dt: Vec<f64> = values(&m.dt_projs_bias).iter().map(|b| b.exp().ln_1p()).collect();
    assert_eq!(dt.len(), 4 * 128);
    assert!(dt.iter().all(|&x| (1e-3 - 1e-12..=0.1 + 1e-12).contains(&x)), "softplus(dt_projs_bias) range");
    // Each copy is drawn anew.
    assert_ne!(dt[..128], dt[128..256]);
    let w = values(&m.dt_projs_weight);
    assert!(w.iter().all(|x| x.abs() <= 0.5) && w.iter().any(|x| x.abs() > 0.45), "U(+-R^-0.5), R = 4");
    let bound = 1.0 / f64::sqrt(128.0);
    let xw = values(&m.x_proj_weight);
    assert!(xw.iter().all(|x| x.abs() <= bound) && xw.iter().any(|x| x.abs() > 0.9 * bound));
    for (i, a) in values(&m.a_logs).iter().enumerate() {
        assert_eq!(*a, ((i % 16 + 1) as f64).ln(), "A_logs element {i}");
    }
    assert!(values(&m.ds).iter().all(|&d| d == 1.0));
    assert!(values(&m.out_norm.weight).iter().all(|&v| v == 1.0));
    assert!(m.in_proj.bias.is_none() && m.out_proj.bias.is_none());
}

#[test]
fn ss2d_shapes_and_errors() {
    let m = build(&tiny_config(), (3, 5), None);
    assert_eq!(m.forward(&randn(&[2, 15, 4], 1.0, 1)).unwrap().shape(), &[2, 15, 4]);
    assert!(m.forward(&randn(&[2, 16, 4], 1.0, 1)).is_err(), "16 tokens are not a 3x5 grid");
    assert!(m.forward(&randn(&[2, 15, 5], 1.0, 1)).is_err(), "5 channels, not 4");
    let mut rng = Generator::new(0);
    let even = MambaConfig { d_conv: 4, ..tiny_config() };
    assert!(Ss2d::new(&mut init(&mut rng), &even, (3, 5)).is_err(), "an even conv would change the grid");
    assert!(Ss2d::new(&mut init(&mut rng), &tiny_config(), (0, 5)).is_err());
    assert!(Ss2d::new(&mut init(&mut rng), &MambaConfig { d_state: 0, ..tiny_config() }, (3, 5)).is_err());
}

#[test]
fn scan_orders_visit_every_token_once() {
    // A 2x3 grid, tokens 0 1 2 / 3 4 5.
    assert_eq!(ScanOrder::RowMajor.steps(2, 3), [0, 1, 2, 3, 4, 5]);
    assert_eq!(ScanOrder::ColumnMajor.steps(2, 3), [0, 3, 1, 4, 2, 5]);
    assert_eq!(ScanOrder::RowMajorReversed.steps(2, 3), [5, 4, 3, 2, 1, 0]);
    assert_eq!(ScanOrder::ColumnMajorReversed.steps(2, 3), [5, 2, 4, 1, 3, 0]);
}

/// Reverses the last dim.
fn flip(x: &Tensor) -> Tensor {
    let l = x.dim(-1).unwrap();
    x.index_select(-1, &(0..l).rev().collect::<Vec<_>>()).unwrap()
}

#[test]
fn ss2d_is_the_sum_of_four_single_order_scans() {
    let (h, w) = (3, 4);
    let (b, l, d_inner, rank, states) = (2, h * w, 8, 1, 3);
    let config = tiny_config();
    let state = random_state(&build(&config, (h, w), None), 10);
    let m = build(&config, (h, w), Some(&state));
    let x = randn(&[b, l, 4], 1.0, 11);

    // The module's own in_proj and conv, then the orders by hand.
    let xz = m.in_proj.forward(&x).unwrap(); // (B, L, 2 d_inner)
    let image = xz.narrow(2, 0, d_inner).unwrap().permute(&[0, 2, 1]).unwrap().reshape(&[2, 8, 3, 4]).unwrap();
    let xs = m.conv2d.forward(&image).unwrap().silu().unwrap(); // (B, d_inner, H, W)
    let row_major = xs.reshape(&[2, 8, 12]).unwrap();
    let column_major = xs.transpose(2, 3).unwrap().contiguous().unwrap().reshape(&[2, 8, 12]).unwrap();
    let sequences = [row_major.clone(), column_major.clone(), flip(&row_major), flip(&column_major)];

    let mut per_order = Vec::new();
    for (k, u) in sequences.iter().enumerate() {
        let dbl = u.transpose(1, 2).unwrap().matmul(&m.x_proj_weight.select(0, k).unwrap().t().unwrap()).unwrap();
        let delta = dbl
            .narrow(2, 0, rank)
            .unwrap()
            .matmul(&m.dt_projs_weight.select(0, k).unwrap().t().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let bm = dbl.narrow(2, rank, states).unwrap().transpose(1, 2).unwrap();
        let cm = dbl.narrow(2, rank + states, states).unwrap().transpose(1, 2).unwrap();
        let a = m.a_logs.narrow(0, k * d_inner, d_inner).unwrap().exp().unwrap().neg().unwrap();
        let y = ops::selective_scan_ref(
            u,
            &delta,
            &a,
            &bm,
            &cm,
            Some(&m.ds.narrow(0, k * d_inner, d_inner).unwrap()),
            None,
            Some(&m.dt_projs_bias.select(0, k).unwrap()),
            true,
        )
        .unwrap(); // (B, d_inner, L) in order k
                   // Back to row-major: undo the flip, then the transpose.
        let y = if k >= 2 { flip(&y) } else { y };
        let y = if k % 2 == 1 {
            y.reshape(&[2, 8, 4, 3])
                .unwrap()
                .transpose(2, 3)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape(&[2, 8, 12])
                .unwrap()
        } else {
            y
        };
        per_order.push(y);
    }
    let sum = per_order.iter().skip(1).fold(per_order[0].clone(), |s, y| s.add(y).unwrap());
    let z = xz.narrow(2, d_inner, d_inner).unwrap();
    let gated = m.out_norm.forward(&sum.transpose(1, 2).unwrap()).unwrap().mul(&z.silu().unwrap()).unwrap();
    let by_hand = m.out_proj.forward(&gated).unwrap();

    let ours = m.forward(&x).unwrap();
    let err = max_abs_diff(&ours, &by_hand);
    println!("SS2D against four hand-made single-order scans: max |diff| {err:.3e}");
    assert!(err < 1e-12, "{err}");

    // The orders matter: every pair of single-order results differs by a visible amount.
    for i in 0..4 {
        for j in i + 1..4 {
            let d = max_abs_diff(&per_order[i], &per_order[j]);
            assert!(d > 1e-2, "orders {i} and {j} give nearly the same scan ({d})");
        }
    }
}

#[test]
fn ss2d_commutes_with_transposing_the_grid() {
    // Scanning an H x W grid's transpose row-major is scanning the grid column-major, and the other way
    // round. So with the conv's taps transposed and the parameter copies of orders 0 <-> 1 and 2 <-> 3
    // swapped, SS2D on the transposed grid is the transpose of SS2D on the grid.
    let (h, w) = (3, 5);
    let config = tiny_config();
    let d_inner = 8;
    let state = random_state(&build(&config, (h, w), None), 20);
    let swap = [1, 0, 3, 2];
    let rows: Vec<usize> = swap.iter().flat_map(|&k| k * d_inner..(k + 1) * d_inner).collect();
    let mut swapped = state.clone();
    for name in ["x_proj_weight", "dt_projs_weight", "dt_projs_bias"] {
        swapped.insert(name.into(), state[name].index_select(0, &swap).unwrap());
    }
    for name in ["A_logs", "Ds"] {
        swapped.insert(name.into(), state[name].index_select(0, &rows).unwrap());
    }
    swapped.insert("conv2d.weight".into(), state["conv2d.weight"].transpose(2, 3).unwrap().contiguous().unwrap());
    let m = build(&config, (h, w), Some(&state));
    let mt = build(&config, (w, h), Some(&swapped));

    // (B, H W, C) tokens <-> their transposed grid's tokens.
    let transpose_tokens = |t: &Tensor, (h, w): (usize, usize)| {
        let (b, c) = (t.dim(0).unwrap() as isize, t.dim(2).unwrap() as isize);
        t.reshape(&[b, h as isize, w as isize, c])
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape(&[b, -1, c])
            .unwrap()
    };
    let x = randn(&[2, h * w, 4], 1.0, 21);
    let y = m.forward(&x).unwrap();
    let yt = mt.forward(&transpose_tokens(&x, (h, w))).unwrap();
    let err = max_abs_diff(&yt, &transpose_tokens(&y, (h, w)));
    assert!(err < 1e-12, "{err}");
    // Without the swap of the copies the symmetry breaks: the copies do act on distinct orders.
    let plain = build(
        &config,
        (w, h),
        Some(&{
            let mut s = state.clone();
            s.insert("conv2d.weight".into(), swapped["conv2d.weight"].clone());
            s
        }),
    );
    let broken = max_abs_diff(&plain.forward(&transpose_tokens(&x, (h, w))).unwrap(), &transpose_tokens(&y, (h, w)));
    assert!(broken > 1e-3, "{broken}");
}

#[test]
fn ss2d_gradients_match_finite_differences() {
    let config = MambaConfig { d_state: 2, ..MambaConfig::ss2d(4) }; // d_inner 8, dt_rank 1
    let resolution = (2, 3);
    let state = random_state(&build(&config, resolution, None), 30);
    let names = [
        "x_proj_weight",
        "dt_projs_weight",
        "dt_projs_bias",
        "A_logs",
        "Ds",
        "in_proj.weight",
        "conv2d.weight",
        "conv2d.bias",
        "out_norm.weight",
        "out_norm.bias",
        "out_proj.weight",
    ];
    let mut inputs = vec![randn(&[2, 6, 4], 1.0, 31)];
    inputs.extend(names.iter().map(|n| state[*n].clone()));
    let f = |xs: &[Tensor]| -> Result<Tensor> {
        let mut m = Ss2d::new(&mut init(&mut Generator::new(0)), &config, resolution)?;
        m.x_proj_weight = xs[1].clone();
        m.dt_projs_weight = xs[2].clone();
        m.dt_projs_bias = xs[3].clone();
        m.a_logs = xs[4].clone();
        m.ds = xs[5].clone();
        m.in_proj.weight = xs[6].clone();
        m.conv2d.weight = xs[7].clone();
        m.conv2d.bias = Some(xs[8].clone());
        m.out_norm.weight = xs[9].clone();
        m.out_norm.bias = xs[10].clone();
        m.out_proj.weight = xs[11].clone();
        m.forward(&xs[0])
    };
    let report = gradcheck_with("Ss2d", &inputs, GradcheckOptions { eps: 3e-5, ..Default::default() }, f).unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert!(report.max_abs_grad > 1e-1, "gradients this small prove little: {report}");
    assert_eq!(report.elements, inputs.iter().map(Tensor::numel).sum::<usize>());
}
