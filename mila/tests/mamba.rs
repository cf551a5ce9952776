//! The Mamba-1 mixer: official names, shapes and no-decay flags, `mamba_simple.py`'s init, causality, errors
//! and an f64 finite-difference check through the input and every parameter.

use std::collections::HashMap;
use std::path::PathBuf;

use engine::{gradcheck_with, DType, Device, Generator, GradcheckOptions, Result, Tensor};
use mila::{MambaConfig, MambaMixer};
use nn::{Entry, Init, Module};

fn init(rng: &mut Generator) -> Init<'_> {
    Init { dtype: DType::F64, device: Device::Cpu, rng }
}

fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, std, DType::F64, Device::Cpu, &mut Generator::new(seed)).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

fn mixer(config: &MambaConfig, seed: u64) -> MambaMixer {
    MambaMixer::new(&mut init(&mut Generator::new(seed)), config).unwrap()
}

/// (name, no_decay) of every parameter, in visiting order.
fn decay_flags(m: &dyn Module) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    m.visit(&mut |name, e| {
        if let Entry::Param { no_decay, .. } = e {
            out.push((name.to_string(), no_decay));
        }
    });
    out
}

#[test]
fn mixer_names_shapes_and_flags_are_the_official_ones() {
    // The fixture was written by the official module: its param.* keys are the official state_dict.
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/mamba_mixer.safetensors"));
    let fixture = nn::checkpoint::load(&path).unwrap();
    let config: MambaConfig = serde_json::from_str(&fixture.metadata["config"]).unwrap();
    assert_eq!(config, MambaConfig { dt_rank: Some(1), ..MambaConfig::new(12) });
    let m = mixer(&config, 0);
    let ours: HashMap<String, Vec<usize>> = m.state_dict().into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
    let official: HashMap<String, Vec<usize>> = fixture
        .tensors
        .iter()
        .filter_map(|(k, t)| k.strip_prefix("param.").map(|n| (n.to_string(), t.shape().to_vec())))
        .collect();
    assert_eq!(ours, official);
    // PyTorch's state_dict order: the module's own parameters, then its children.
    let flags = decay_flags(&m);
    let names: Vec<&str> = flags.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "A_log",
            "D",
            "in_proj.weight",
            "conv1d.weight",
            "conv1d.bias",
            "x_proj.weight",
            "dt_proj.weight",
            "dt_proj.bias",
            "out_proj.weight"
        ]
    );
    // A_log and D as Mamba's _no_weight_decay, biases as everywhere in this codebase; weights decay.
    for (name, no_decay) in &flags {
        assert_eq!(*no_decay, name == "A_log" || name == "D" || name.ends_with("bias"), "{name}");
    }
    // 2 d_inner d + d_inner (k + 1) + d_inner (R + 2S) + d_inner (R + 1) + d_inner S + d_inner + d_inner d.
    assert_eq!(m.num_params(), 576 + 120 + 792 + 48 + 384 + 24 + 288);
    // Multiply-adds of 16 tokens: in_proj, conv, x_proj, out_proj, then dt_proj (R) and the scan (3S + 1).
    assert_eq!(m.macs(16), 16 * (576 + 96 + 792 + 288) + 16 * 24 * (1 + 3 * 16 + 1));
    assert_eq!(m.macs(32), 2 * m.macs(16));
}

#[test]
fn dt_rank_is_ceil_of_d_model_over_16_unless_given() {
    assert_eq!(MambaConfig::new(12).dt_rank(), 1);
    assert_eq!(MambaConfig::new(33).dt_rank(), 3);
    assert_eq!(MambaConfig::new(768).dt_rank(), 48);
    assert_eq!(MambaConfig { dt_rank: Some(5), ..MambaConfig::new(768) }.dt_rank(), 5);
    let c = MambaConfig::new(64);
    assert_eq!((c.d_state, c.d_conv, c.expand, c.d_inner()), (16, 4, 2, 128));
    // Only d_model is required in a config's JSON.
    assert_eq!(serde_json::from_str::<MambaConfig>(r#"{"d_model": 64}"#).unwrap(), c);
}

#[test]
fn mixer_init_follows_mamba_simple() {
    let config = MambaConfig::new(256); // d_inner 512, dt_rank 16, d_state 16
    let m = mixer(&config, 1);
    let (d_inner, states) = (512, 16);

    // dt_proj.weight ~ U(+-R^-0.5) = U(+-0.25).
    let w = values(&m.dt_proj.weight);
    assert!(w.iter().all(|x| x.abs() <= 0.25) && w.iter().any(|x| x.abs() > 0.24), "dt_proj.weight bound");
    // softplus(dt_proj.bias) is dt, log-uniform in [0.001, 0.1] (the 1e-4 floor is below that range).
    let dt: Vec<f64> = values(m.dt_proj.bias.as_ref().unwrap()).iter().map(|b| b.exp().ln_1p()).collect();
    assert_eq!(dt.len(), d_inner);
    assert!(dt.iter().all(|&x| (1e-3 - 1e-12..=0.1 + 1e-12).contains(&x)), "dt outside [0.001, 0.1]");
    let log_dt: Vec<f64> = dt.iter().map(|x| x.ln()).collect();
    let mean = log_dt.iter().sum::<f64>() / d_inner as f64;
    // Uniform on [ln 0.001, ln 0.1]: mean ln 0.01, standard error 1.33 / sqrt(512) = 0.06.
    assert!((mean - 0.01f64.ln()).abs() < 0.3, "mean log dt {mean}");
    let below_001 = dt.iter().filter(|&&x| x < 0.01).count() as f64 / d_inner as f64;
    assert!((0.4..0.6).contains(&below_001), "half of dt should be below 0.01 (log-uniform): {below_001}");

    // A_log = log(1..S) in every row, so A = -exp(A_log) = -1, ..., -S; D = 1.
    assert_eq!(m.a_log.shape(), [d_inner, states]);
    for (i, a) in values(&m.a_log).iter().enumerate() {
        assert_eq!(*a, ((i % states + 1) as f64).ln(), "A_log element {i}");
    }
    assert!(values(&m.d).iter().all(|&d| d == 1.0));

    // PyTorch's defaults: U(+-1/sqrt(fan_in)).
    for (name, t, fan_in) in [
        ("in_proj.weight", &m.in_proj.weight, 256.0),
        ("x_proj.weight", &m.x_proj.weight, 512.0),
        ("out_proj.weight", &m.out_proj.weight, 512.0),
        ("conv1d.weight", &m.conv1d.weight, 4.0),
        ("conv1d.bias", &m.conv1d.bias, 4.0),
    ] {
        let bound = 1.0 / f64::sqrt(fan_in);
        let v = values(t);
        assert!(v.iter().all(|x| x.abs() <= bound) && v.iter().any(|x| x.abs() > 0.9 * bound), "{name}");
    }
    assert!(m.in_proj.bias.is_none() && m.x_proj.bias.is_none() && m.out_proj.bias.is_none());
}

#[test]
fn mixer_is_causal() {
    let m = mixer(&MambaConfig::new(8), 2);
    let x = randn(&[2, 9, 8], 1.0, 3);
    let y = values(&m.forward(&x).unwrap());
    // Change only token 5 of sample 1.
    let mut changed = values(&x);
    let at = |b: usize, t: usize, c: usize| (b * 9 + t) * 8 + c;
    for c in 0..8 {
        changed[at(1, 5, c)] += 1.0;
    }
    let y2 = values(&m.forward(&Tensor::from_f64(&changed, &[2, 9, 8], DType::F64, Device::Cpu).unwrap()).unwrap());
    for b in 0..2 {
        for t in 0..9 {
            let moved = (0..8).map(|c| (y[at(b, t, c)] - y2[at(b, t, c)]).abs()).fold(0.0, f64::max);
            if b == 1 && t >= 5 {
                assert!(moved > 1e-6, "token {t} of sample 1 must see token 5");
            } else {
                assert_eq!(moved, 0.0, "sample {b} token {t} must not see sample 1's token 5");
            }
        }
    }
}

#[test]
fn mixer_shapes_and_errors() {
    let m = mixer(&MambaConfig::new(12), 4);
    assert_eq!(m.forward(&randn(&[3, 7, 12], 1.0, 5)).unwrap().shape(), &[3, 7, 12]);
    assert_eq!(m.forward(&randn(&[1, 1, 12], 1.0, 5)).unwrap().shape(), &[1, 1, 12]);
    assert!(m.forward(&randn(&[3, 7, 11], 1.0, 5)).is_err(), "11 channels, not 12");
    assert!(m.forward(&randn(&[7, 12], 1.0, 5)).is_err(), "no batch dim");
    let mut rng = Generator::new(0);
    for bad in [
        MambaConfig::new(0),
        MambaConfig { d_state: 0, ..MambaConfig::new(8) },
        MambaConfig { d_conv: 0, ..MambaConfig::new(8) },
        MambaConfig { expand: 0, ..MambaConfig::new(8) },
        MambaConfig { dt_rank: Some(0), ..MambaConfig::new(8) },
    ] {
        assert!(MambaMixer::new(&mut init(&mut rng), &bad).is_err(), "{bad:?}");
    }
}

#[test]
fn mixer_gradients_match_finite_differences() {
    let config = MambaConfig { d_state: 3, d_conv: 3, ..MambaConfig::new(4) }; // d_inner 8, dt_rank 1
    let make = || MambaMixer::new(&mut init(&mut Generator::new(6)), &config);
    // Parameters of O(1): the init's A = -1..-S and small dt would leave most of the recurrence flat.
    let state: HashMap<String, Tensor> = make()
        .unwrap()
        .state_dict()
        .into_iter()
        .enumerate()
        .map(|(i, (name, t))| (name, randn(t.shape(), 0.5, 300 + i as u64)))
        .collect();
    let names = [
        "A_log",
        "D",
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "x_proj.weight",
        "dt_proj.weight",
        "dt_proj.bias",
        "out_proj.weight",
    ];
    let mut inputs = vec![randn(&[2, 5, 4], 1.0, 9)];
    inputs.extend(names.iter().map(|n| state[*n].clone()));
    let f = |xs: &[Tensor]| -> Result<Tensor> {
        let mut m = make()?;
        m.a_log = xs[1].clone();
        m.d = xs[2].clone();
        m.in_proj.weight = xs[3].clone();
        m.conv1d.weight = xs[4].clone();
        m.conv1d.bias = xs[5].clone();
        m.x_proj.weight = xs[6].clone();
        m.dt_proj.weight = xs[7].clone();
        m.dt_proj.bias = Some(xs[8].clone());
        m.out_proj.weight = xs[9].clone();
        m.forward(&xs[0])
    };
    // The step of gradcheck.rs: roundoff / step and step^2 truncation balance near 3e-5.
    let report =
        gradcheck_with("MambaMixer", &inputs, GradcheckOptions { eps: 3e-5, ..Default::default() }, f).unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert!(report.max_abs_grad > 1e-1, "gradients this small prove little: {report}");
    assert_eq!(report.elements, 40 + 24 + 8 + 64 + 24 + 8 + 56 + 8 + 8 + 32);
}
