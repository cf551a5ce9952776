//! The ablation networks: every variant trains a step, parameters and multiply-adds differ exactly as each
//! design says, the attention matches plain loops (the forget gate's mapping onto the scan included), and
//! f64 gradient checks of the gated attentions and a Mamba-style block.

use std::collections::HashMap;

use engine::{gradcheck_with, DType, Device, Generator, GradcheckOptions, Result, Tensor};
use mila::ablation::{AttentionConfig, MambaStyleBlock, VariantAttention};
use mila::{AblationConfig, AblationNet, Mlla, MllaConfig, Variant};
use nn::{Init, Module};

fn init(dtype: DType, rng: &mut Generator) -> Init<'_> {
    Init { dtype, device: Device::Cpu, rng }
}

fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, std, DType::F64, Device::Cpu, &mut Generator::new(seed)).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

fn build(config: &AblationConfig, dtype: DType, seed: u64) -> AblationNet {
    AblationNet::new(&mut init(dtype, &mut Generator::new(seed)), config).unwrap()
}

/// The MNIST-sized network of every variant (f32, as trained).
fn mnist(variant: Variant) -> AblationNet {
    build(&AblationConfig::mnist(variant), DType::F32, 0)
}

/// (width, heads, tokens) of each stage of the MNIST network: one block per stage.
fn mnist_stages() -> Vec<(usize, usize, usize)> {
    let net = MllaConfig::mnist();
    (0..4).map(|i| (net.stage_dim(i), net.num_heads[i], (8 >> i) * (8 >> i))).collect()
}

#[test]
fn names_parse_back_and_rows_are_the_papers() {
    for v in Variant::ALL {
        assert_eq!(Variant::parse(v.name()).unwrap(), v);
        assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{}\"", v.name()));
    }
    assert_eq!(Variant::ForgetGate.row(), "+ forget gate");
    assert_eq!(Variant::SingleHead.row(), "- multi-head (single head)");
    let err = Variant::parse("forget").unwrap_err().to_string();
    assert!(err.contains("unknown variant 'forget'") && err.contains("forget-gate, shortcut"), "{err}");
}

/// Every variant, on a tiny network: a training forward, a finite loss, and a finite, nonzero gradient
/// for every parameter (a design whose parameters got no gradient would be switched on in name only).
/// 64x64 images leave the last stage a 2x2 grid: on one token the forget gate has no past to decay, and
/// A_log no gradient.
#[test]
fn every_variant_trains_a_step_with_finite_loss_and_gradients() {
    let net = MllaConfig {
        img_size: 64,
        num_classes: 3,
        embed_dim: 8,
        num_heads: vec![1, 1, 2, 2],
        mlp_ratio: 2.0,
        ..MllaConfig::mnist()
    };
    let x = Tensor::randn(&[2, 1, 64, 64], 0.0, 1.0, DType::F32, Device::Cpu, &mut Generator::new(1)).unwrap();
    for variant in Variant::ALL {
        let model = build(&AblationConfig { net: net.clone(), ..AblationConfig::mnist(variant) }, DType::F32, 2);
        let logits = model.forward(&x, &mut Generator::new(0)).unwrap();
        assert_eq!(logits.shape(), &[2, 3], "{variant}");
        let loss = ops::cross_entropy(&logits, &[0, 2], 0.1).unwrap();
        let l = loss.to_scalar().unwrap();
        assert!(l.is_finite() && l > 0.0, "{variant}: loss {l}");
        loss.backward().unwrap();
        for (name, p) in model.named_parameters() {
            let g = values(&p.grad().unwrap_or_else(|| panic!("{variant}: {name} has no gradient")));
            assert!(g.iter().all(|v| v.is_finite()), "{variant}: {name}");
            assert!(g.iter().any(|&v| v != 0.0), "{variant}: {name} has an all-zero gradient");
        }
    }
}

#[test]
fn parameters_differ_as_each_design_says() {
    let params = |v| mnist(v).num_params() as i64;
    let base = params(Variant::Baseline);
    let per_block =
        |f: &dyn Fn(i64, i64) -> i64| mnist_stages().iter().map(|&(c, h, _)| f(c as i64, h as i64)).sum::<i64>();
    // The shortcut's D: exactly C per block.
    assert_eq!(params(Variant::Shortcut) - base, per_block(&|c, _| c));
    // dt_proj, Linear C -> C with bias.
    assert_eq!(params(Variant::InputGate) - base, per_block(&|c, _| c * c + c));
    // dt_proj and A_log (d_v x d_k = (C/h)^2).
    assert_eq!(params(Variant::ForgetGate) - base, per_block(&|c, h| c * c + c + (c / h) * (c / h)));
    // Dropping the normaliser drops no parameter.
    assert_eq!(params(Variant::NoNorm), base);
    // One head: qkv's output shrinks from 3C to 2 d_state + C.
    assert_eq!(base - params(Variant::SingleHead), per_block(&|c, _| (2 * c - 32) * (c + 1)));
    assert!(params(Variant::SingleHead) < base);
    // Mamba's attention sub-block: in_proj, act_proj, out_proj and dwc (9C + C) in, proj out.
    assert_eq!(params(Variant::BlockAttn) - base, per_block(&|c, _| 2 * c * c + 2 * c + 10 * c));
    // All blocks Mamba's at E = 1.5 C: norm1, in/act_proj, dwc, qkv at width E, out_proj; no MLP.
    let block_all = |c: i64| {
        let e = 3 * c / 2;
        2 * c + 2 * (c * e + e) + 10 * e + (3 * e * e + 3 * e) + (e * c + c)
    };
    let swin = |c: i64| 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (8 * c * c + 5 * c);
    assert_eq!(params(Variant::BlockAll) - base, per_block(&|c, _| block_all(c) - swin(c)));
    assert!(((params(Variant::BlockAll) - base) as f64 / base as f64).abs() < 0.1, "parameters matched to 10%");
}

/// With the same seed, the MILA variant is the MLLA network: same names, same values.
#[test]
fn the_mila_variant_is_mlla() {
    let ours = build(&AblationConfig::mnist(Variant::Mila), DType::F64, 3);
    let mlla = Mlla::new(&mut init(DType::F64, &mut Generator::new(3)), &MllaConfig::mnist()).unwrap();
    let (a, b) = (ours.state_dict(), mlla.state_dict());
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(values(ta), values(tb), "{na}");
    }
    assert_eq!(ours.macs(), mlla.macs());
    let x = randn(&[2, 1, 32, 32], 1.0, 4);
    let (ya, yb) =
        (ours.forward(&x, &mut Generator::new(0)).unwrap(), mlla.forward(&x, &mut Generator::new(0)).unwrap());
    assert_eq!(values(&ya), values(&yb));
}

#[test]
fn multiply_adds_follow_the_designs() {
    let macs = |v| mnist(v).macs() as i64;
    let base = macs(Variant::Baseline);
    let stages = mnist_stages();
    // The normaliser's q . mean(k): N C per block (h heads of d_k = C/h).
    assert_eq!(base - macs(Variant::NoNorm), stages.iter().map(|&(c, _, n)| (n * c) as i64).sum::<i64>());
    // The shortcut is elementwise work, not counted.
    assert_eq!(macs(Variant::Shortcut), base);
    // dt_proj: N C^2 per block.
    assert_eq!(macs(Variant::InputGate) - base, stages.iter().map(|&(c, _, n)| (n * c * c) as i64).sum::<i64>());
    // The forget gate: dt_proj, then a scan of 2C channels over d_k states (3 per element) instead of the
    // global products (2 N d_k C + N C).
    let forget =
        stages.iter().map(|&(c, h, n)| (n * c * c + 3 * n * 2 * c * (c / h) - 2 * n * (c / h) * c - n * c) as i64);
    assert_eq!(macs(Variant::ForgetGate) - base, forget.sum::<i64>());
    assert!(macs(Variant::SingleHead) < base);
    assert!(macs(Variant::BlockAttn) > base);
    for v in Variant::ALL {
        println!("{:<42} {:>9} parameters {:>10} MACs", v.row(), mnist(v).num_params(), macs(v));
    }
}

/// O(1) parameters (the init's 0.02 would make q and k nearly constant), keyed by name.
fn random_state(module: &dyn Module, seed: u64) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (i, (name, t)) in module.state_dict().into_iter().enumerate() {
        out.insert(name, randn(t.shape(), 0.5, seed + i as u64));
    }
    out
}

/// A tiny attention: C 4, 2 heads (d_v 2) with q/k width 3, so that a mix-up of the two widths fails.
fn tiny(switches: impl Fn(AttentionConfig) -> AttentionConfig) -> AttentionConfig {
    switches(AttentionConfig { qk_dim: 3, proj: false, ..AttentionConfig::baseline(4, 2, true) })
}

fn attention(config: &AttentionConfig, seed: u64) -> VariantAttention {
    let attn = VariantAttention::new(&mut init(DType::F64, &mut Generator::new(0)), config).unwrap();
    attn.load_tensors(&random_state(&attn, seed), &HashMap::new(), true).unwrap();
    attn
}

fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// What `attn` computes, in plain loops over (batch, head, value channel, token): the global form, or the
/// causal recurrence S_t = exp(dt A) S_{t-1} + k_t v_t (times dt with the input gate) with its normaliser
/// Z_t = exp(dt A) Z_{t-1} + k_t.
fn reference(attn: &VariantAttention, x: &Tensor) -> Vec<f64> {
    let cfg = attn.config;
    let (b, n, c) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let (h, dk, dv) = (cfg.num_heads, cfg.qk_dim, c / cfg.num_heads);
    let (hk, width) = (h * dk, 2 * h * dk + c);
    let qkv = values(&attn.qkv.forward(x).unwrap()); // (B, N, 2 h d_k + C)
    let elu1 = |v: f64| if v > 0.0 { v + 1.0 } else { v.exp() };
    let q = |bi: usize, t: usize, hd: usize, i: usize| elu1(qkv[(bi * n + t) * width + hd * dk + i]);
    let k = |bi: usize, t: usize, hd: usize, i: usize| elu1(qkv[(bi * n + t) * width + hk + hd * dk + i]);
    let v = |bi: usize, t: usize, ch: usize| qkv[(bi * n + t) * width + 2 * hk + ch];
    let dt: Vec<f64> =
        attn.dt_proj.as_ref().map_or(vec![], |p| values(&p.forward(x).unwrap()).into_iter().map(softplus).collect());
    let a: Vec<f64> = attn.a_log.as_ref().map_or(vec![], |t| values(t).iter().map(|l| -l.exp()).collect());
    let d: Vec<f64> = attn.d.as_ref().map_or(vec![], values);
    let mut out = vec![0.0; b * n * c];
    for bi in 0..b {
        for hd in 0..h {
            for cc in 0..dv {
                let ch = hd * dv + cc;
                let (mut s, mut z) = (vec![0.0; dk], vec![0.0; dk]);
                for t in 0..n {
                    let (num, den) = if cfg.forget_gate {
                        let step = dt[(bi * n + t) * c + ch].max(1e-4);
                        let gate = if cfg.input_gate { step } else { 1.0 };
                        for i in 0..dk {
                            let decay = (step * a[cc * dk + i]).exp();
                            s[i] = decay * s[i] + gate * k(bi, t, hd, i) * v(bi, t, ch);
                            z[i] = decay * z[i] + k(bi, t, hd, i);
                        }
                        (
                            (0..dk).map(|i| q(bi, t, hd, i) * s[i]).sum::<f64>(),
                            (0..dk).map(|i| q(bi, t, hd, i) * z[i]).sum(),
                        )
                    } else {
                        let (mut num, mut den) = (0.0, 0.0);
                        for j in 0..n {
                            let qk: f64 = (0..dk).map(|i| q(bi, t, hd, i) * k(bi, j, hd, i)).sum();
                            let gate = if cfg.input_gate { dt[(bi * n + j) * c + ch] } else { 1.0 };
                            num += qk * gate * v(bi, j, ch) / n as f64;
                            den += qk / n as f64;
                        }
                        (num, den)
                    };
                    let y = if cfg.normalise { num / (den + 1e-6) } else { num };
                    let skip = if cfg.shortcut { d[ch] * v(bi, t, ch) } else { 0.0 };
                    out[(bi * n + t) * c + ch] = y + skip;
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_plain_loops_for_every_switch() {
    let x = randn(&[2, 5, 4], 1.0, 10);
    let cases: [(&str, AttentionConfig); 7] = [
        ("baseline", tiny(|c| c)),
        ("input gate", tiny(|c| AttentionConfig { input_gate: true, ..c })),
        ("forget gate", tiny(|c| AttentionConfig { forget_gate: true, ..c })),
        ("forget gate, no normaliser", tiny(|c| AttentionConfig { forget_gate: true, normalise: false, ..c })),
        ("both gates (Mamba's coupling)", tiny(|c| AttentionConfig { forget_gate: true, input_gate: true, ..c })),
        ("shortcut, no normaliser", tiny(|c| AttentionConfig { shortcut: true, normalise: false, ..c })),
        ("single head", tiny(|c| AttentionConfig { num_heads: 1, qk_dim: 6, ..c })),
    ];
    for (i, (what, config)) in cases.iter().enumerate() {
        let attn = attention(config, 100 * i as u64);
        let ours = values(&attn.forward(&x).unwrap());
        let want = reference(&attn, &x);
        let err = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        println!("{what}: max |ours - loops| {err:.2e} (outputs up to {scale:.2})");
        assert!(scale > 1e-2 && err <= 1e-12 * scale.max(1.0), "{what}: {err:e}");
    }
}

/// The forget gate is causal over the row-major token order: changing the last token leaves the others.
#[test]
fn the_forget_gate_is_causal() {
    let attn = attention(&tiny(|c| AttentionConfig { forget_gate: true, ..c }), 5);
    let x = randn(&[1, 5, 4], 1.0, 11);
    let mut moved = values(&x);
    moved[4 * 4..].iter_mut().for_each(|v| *v += 1.0);
    let moved = Tensor::from_f64(&moved, &[1, 5, 4], DType::F64, Device::Cpu).unwrap();
    let (a, b) = (values(&attn.forward(&x).unwrap()), values(&attn.forward(&moved).unwrap()));
    assert_eq!(a[..16], b[..16]);
    assert_ne!(a[16..], b[16..]);
}

/// See gradcheck.rs: the step balances roundoff against truncation.
fn options() -> GradcheckOptions {
    GradcheckOptions { eps: 3e-5, ..Default::default() }
}

/// Checks an attention's gradients through x, qkv and, where present, dt_proj, A_log and D.
fn check_attention(what: &str, config: AttentionConfig, seed: u64) {
    let base = attention(&config, seed);
    let state = random_state(&base, seed);
    let mut inputs = vec![randn(&[2, 5, 4], 1.0, seed + 50), state["qkv.weight"].clone()];
    let names = ["dt_proj.weight", "dt_proj.bias", "A_log", "D"];
    let present: Vec<&str> = names.into_iter().filter(|n| state.contains_key(*n)).collect();
    inputs.extend(present.iter().map(|n| state[*n].clone()));
    let f = |xs: &[Tensor]| -> Result<Tensor> {
        let mut attn = VariantAttention::new(&mut init(DType::F64, &mut Generator::new(0)), &config)?;
        attn.load_tensors(&state, &HashMap::new(), true)?;
        attn.qkv.weight = xs[1].clone();
        for (name, t) in present.iter().zip(&xs[2..]) {
            match *name {
                "dt_proj.weight" => attn.dt_proj.as_mut().unwrap().weight = t.clone(),
                "dt_proj.bias" => attn.dt_proj.as_mut().unwrap().bias = Some(t.clone()),
                "A_log" => attn.a_log = Some(t.clone()),
                _ => attn.d = Some(t.clone()),
            }
        }
        attn.forward(&xs[0])
    };
    let report = gradcheck_with(what, &inputs, options(), f).unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert!(report.max_abs_grad > 1e-2, "gradients this small prove little: {report}");
    assert_eq!(report.elements, inputs.iter().map(Tensor::numel).sum::<usize>());
}

#[test]
fn forget_gate_attention_gradients_match_finite_differences() {
    check_attention("forget gate", tiny(|c| AttentionConfig { forget_gate: true, ..c }), 300);
}

#[test]
fn input_gate_attention_gradients_match_finite_differences() {
    check_attention("input gate", tiny(|c| AttentionConfig { input_gate: true, ..c }), 400);
}

#[test]
fn coupled_gates_with_shortcut_and_no_normaliser_gradients_match_finite_differences() {
    let config =
        tiny(|c| AttentionConfig { input_gate: true, forget_gate: true, shortcut: true, normalise: false, ..c });
    check_attention("both gates, shortcut, no normaliser", config, 500);
}

/// A Mamba-style block (the block design) with the forget gate inside, through x and one parameter of each
/// branch.
#[test]
fn mamba_style_block_gradients_match_finite_differences() {
    let attn = AttentionConfig { forget_gate: true, ..AttentionConfig::baseline(6, 2, true) };
    let make = || MambaStyleBlock::new(&mut init(DType::F64, &mut Generator::new(6)), 4, &attn, (2, 3), Some(2.0), 0.0);
    let state = random_state(&make().unwrap(), 600);
    let names = ["in_proj.weight", "act_proj.bias", "dwc.weight", "attn.A_log", "out_proj.weight", "mlp.fc1.weight"];
    let mut inputs = vec![randn(&[1, 6, 4], 1.0, 601)];
    inputs.extend(names.iter().map(|n| state[*n].clone()));
    let f = |xs: &[Tensor]| -> Result<Tensor> {
        let mut block = make()?;
        block.load_tensors(&state, &HashMap::new(), true)?;
        block.in_proj.weight = xs[1].clone();
        block.act_proj.bias = Some(xs[2].clone());
        block.dwc.weight = xs[3].clone();
        block.attn.a_log = Some(xs[4].clone());
        block.out_proj.weight = xs[5].clone();
        if let Some((_, mlp)) = &mut block.mlp {
            mlp.fc1.weight = xs[6].clone();
        }
        block.forward(&xs[0], &mut Generator::new(0))
    };
    let report = gradcheck_with("MambaStyleBlock", &inputs, options(), f).unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert!(report.max_abs_grad > 1e-2, "{report}");
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let mut rng = Generator::new(7);
    let mut i = init(DType::F64, &mut rng);
    assert!(VariantAttention::new(&mut i, &AttentionConfig::baseline(6, 4, true)).is_err(), "4 heads, dim 6");
    assert!(
        VariantAttention::new(&mut i, &AttentionConfig { qk_dim: 0, ..AttentionConfig::baseline(4, 2, true) }).is_err()
    );
    let attn = VariantAttention::new(&mut i, &AttentionConfig::baseline(4, 2, true)).unwrap();
    let err = attn.forward(&randn(&[1, 5, 3], 1.0, 0)).unwrap_err().to_string();
    assert!(err.contains("VariantAttention") && err.contains("[1, 5, 3]"), "{err}");

    let bad = |f: fn(&mut AblationConfig)| {
        let mut c = AblationConfig::mnist(Variant::BlockAll);
        f(&mut c);
        AblationNet::new(&mut init(DType::F32, &mut Generator::new(0)), &c).is_err()
    };
    assert!(bad(|c| c.expand = 0.0));
    assert!(bad(|c| c.expand = 1.3), "E = round(1.3 * 64) = 83 is not divisible by 4 heads");
    assert!(bad(|c| c.d_state = 0));
    assert!(bad(|c| c.net.img_size = 48));
    let model = mnist(Variant::Baseline);
    assert!(model.forward(&Tensor::zeros(&[1, 1, 28, 28], DType::F32, Device::Cpu).unwrap(), &mut rng).is_err());
}
