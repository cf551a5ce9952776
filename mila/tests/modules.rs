//! Module behaviour: init, configs, shapes, train/eval mode, drop path and errors on bad input.

use engine::{no_grad, DType, Device, Generator, Tensor};
use mila::{BlockConfig, LinearAttention, MilaBlock, Mlla, MllaConfig, PatchMerging};
use nn::trainer::Classifier;
use nn::{Init, Module};
use ops::TensorOps;

fn init(rng: &mut Generator) -> Init<'_> {
    Init { dtype: DType::F64, device: Device::Cpu, rng }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, DType::F64, Device::Cpu, &mut Generator::new(seed)).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

fn mnist_model(seed: u64) -> Mlla {
    Mlla::new(&mut init(&mut Generator::new(seed)), &MllaConfig::mnist()).unwrap()
}

#[test]
fn init_follows_mlla() {
    let model = mnist_model(0);
    for (name, t) in model.named_parameters() {
        let v = values(&t);
        if name.ends_with("qk.weight") || name.ends_with("fc1.weight") || name == "head.weight" {
            // trunc_normal(std 0.02), cut at +-2 (never reached at this std).
            let std = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
            assert!((0.015..0.025).contains(&std), "{name}: std {std}");
        }
        if name.starts_with("norm") || name.contains(".norm1.") || name.contains(".norm2.") {
            let want = if name.ends_with("weight") { 1.0 } else { 0.0 };
            assert!(v.iter().all(|&x| x == want), "{name}");
        }
        if name.ends_with("proj.bias") || name == "head.bias" {
            assert!(v.iter().all(|&x| x == 0.0), "{name}");
        }
        if name.ends_with("cpe1.weight") {
            // PyTorch's conv default: U(+-1/sqrt(fan_in)), fan_in 9 for a depthwise 3x3.
            assert!(v.iter().all(|x| x.abs() <= 1.0 / 3.0) && v.iter().any(|x| x.abs() > 0.1), "{name}");
        }
    }
    let running: Vec<f64> =
        model.state_dict().iter().filter(|(n, _)| n.ends_with("running_var")).flat_map(|(_, t)| values(t)).collect();
    assert!(!running.is_empty() && running.iter().all(|&v| v == 1.0));
}

#[test]
fn configs_match_the_spec_and_the_fixture() {
    let t = MllaConfig::tiny();
    assert_eq!((t.embed_dim, t.depths.clone(), t.num_heads.clone()), (64, vec![2, 4, 8, 4], vec![2, 4, 8, 16]));
    let b = MllaConfig::base();
    assert_eq!((b.embed_dim, b.depths.clone(), b.num_heads.clone()), (96, vec![3, 6, 21, 6], vec![3, 6, 12, 24]));
    assert_eq!(MllaConfig::small().depths, vec![3, 6, 21, 6]);
    // The fixture's constructor arguments (with an extra "mode" key) are the mnist preset.
    let json = r#"{"img_size": 32, "in_chans": 1, "num_classes": 10, "embed_dim": 16, "depths": [1, 1, 1, 1],
        "num_heads": [1, 2, 4, 8], "mlp_ratio": 4.0, "qkv_bias": true, "drop_path_rate": 0.0, "mode": "train"}"#;
    assert_eq!(MllaConfig::from_json(json).unwrap(), MllaConfig::mnist());
    assert!(MllaConfig::from_json("{\"img_size\": 32}").is_err());
}

#[test]
fn drop_path_rates_grow_linearly_over_all_blocks() {
    let cfg = MllaConfig::tiny();
    let rates = cfg.drop_path_rates();
    assert_eq!(rates.len(), 18);
    assert_eq!(rates[0], 0.0);
    assert!((rates[17] - 0.2).abs() < 1e-15);
    assert!((rates[9] - 0.2 * 9.0 / 17.0).abs() < 1e-15);
    // Block 2 of stage 1 is block 4 overall.
    let mut small = cfg.clone();
    small.img_size = 32;
    small.num_classes = 2;
    small.embed_dim = 8;
    small.num_heads = vec![1, 1, 1, 1];
    let model = Mlla::new(&mut init(&mut Generator::new(0)), &small).unwrap();
    assert_eq!(model.layers[1].blocks[2].drop_path.p, rates[4]);
    assert_eq!(model.layers[3].blocks[3].drop_path.p, rates[17]);
}

#[test]
fn mlla_forward_gives_logits_and_eval_leaves_buffers_alone() {
    let mut model = mnist_model(1);
    let x = randn(&[2, 1, 32, 32], 2);
    let mut rng = Generator::new(0);
    let y = model.forward(&x, &mut rng).unwrap();
    assert_eq!(y.shape(), &[2, 10]);
    assert!(values(&y).iter().all(|v| v.is_finite()));
    assert_eq!(values(&model.logits(&x, &mut rng).unwrap()), values(&y));
    // Two training forwards: every BatchNorm counted two batches and moved its running mean.
    assert!(model.counters().iter().all(|(_, c)| *c == 2));
    let running = |m: &Mlla| values(&m.patch_embed.conv1.norm.as_ref().unwrap().running_mean);
    assert!(running(&model).iter().any(|&v| v != 0.0));

    model.set_training(false);
    let before = running(&model);
    let e1 = no_grad(|| model.forward(&x, &mut rng)).unwrap();
    let e2 = no_grad(|| model.forward(&x.narrow(0, 0, 1).unwrap(), &mut rng)).unwrap();
    assert_eq!(running(&model), before);
    assert!(model.counters().iter().all(|(_, c)| *c == 2));
    // In eval, a sample's logits do not depend on the rest of the batch.
    let (a, b) = (values(&e1), values(&e2));
    assert!(a[..10].iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-12));
}

#[test]
fn drop_path_drops_whole_samples_only_in_training() {
    let cfg =
        BlockConfig { dim: 8, input_resolution: (2, 2), num_heads: 2, mlp_ratio: 4.0, qkv_bias: true, drop_path: 0.5 };
    let mut block = MilaBlock::new(&mut init(&mut Generator::new(3)), &cfg).unwrap();
    let x = randn(&[16, 4, 8], 4);
    let outputs: Vec<Vec<f64>> =
        (0..2).map(|seed| values(&block.forward(&x, &mut Generator::new(seed)).unwrap())).collect();
    assert_ne!(outputs[0], outputs[1], "different masks for different seeds");
    block.set_training(false);
    assert!(!block.drop_path.training);
    let e: Vec<Vec<f64>> = (0..2).map(|seed| values(&block.forward(&x, &mut Generator::new(seed)).unwrap())).collect();
    assert_eq!(e[0], e[1], "eval is deterministic");
}

#[test]
fn bad_shapes_and_configs_are_errors() {
    let mut rng = Generator::new(5);
    let mut i = init(&mut rng);
    assert!(LinearAttention::new(&mut i, 16, (4, 4), 3, true).is_err(), "3 heads do not divide 16");
    assert!(LinearAttention::new(&mut i, 6, (4, 4), 2, true).is_err(), "RoPE-2D needs a multiple of 4");
    let attn = LinearAttention::new(&mut i, 8, (4, 4), 2, true).unwrap();
    assert!(attn.forward(&randn(&[1, 15, 8], 6)).is_err(), "15 tokens are not a 4x4 grid");
    assert!(attn.forward(&randn(&[1, 16, 4], 6)).is_err(), "4 channels, not 8");
    assert_eq!(attn.forward(&randn(&[3, 16, 8], 6)).unwrap().shape(), &[3, 16, 8]);

    let model = mnist_model(7);
    let mut g = Generator::new(0);
    assert!(model.forward(&randn(&[1, 1, 28, 28], 8), &mut g).is_err(), "28x28 must be padded to 32x32");
    assert!(model.forward(&randn(&[1, 3, 32, 32], 8), &mut g).is_err());
    assert!(model.forward(&randn(&[32, 32], 8), &mut g).is_err());

    let bad = |f: fn(&mut MllaConfig)| {
        let mut c = MllaConfig::mnist();
        f(&mut c);
        Mlla::new(&mut init(&mut Generator::new(0)), &c).is_err()
    };
    assert!(bad(|c| c.img_size = 48), "48 is not a multiple of 32");
    assert!(bad(|c| c.num_heads = vec![1, 2, 4]));
    assert!(bad(|c| c.num_heads = vec![1, 3, 4, 8]), "3 heads do not divide 32");
    assert!(bad(|c| c.embed_dim = 18));
    assert!(bad(|c| c.drop_path_rate = 1.0));
    assert!(bad(|c| c.depths = vec![]));
    assert!(bad(|c| c.mlp_ratio = 0.0));
}

/// The MILA block's forward as the plain composition of its layers (before the fused ops that save less for
/// backward), for checking that the fused forward gives the same bits.
fn block_forward_composed(b: &MilaBlock, x: &Tensor, rng: &mut Generator) -> Tensor {
    let (h, w) = b.resolution;
    let image = |t: &Tensor| {
        let (n, c) = (t.dim(0).unwrap() as isize, t.dim(2).unwrap() as isize);
        t.reshape(&[n, h as isize, w as isize, c]).unwrap().permute(&[0, 3, 1, 2]).unwrap()
    };
    let tokens = |t: &Tensor| {
        let (n, c) = (t.dim(0).unwrap() as isize, t.dim(1).unwrap() as isize);
        t.permute(&[0, 2, 3, 1]).unwrap().reshape(&[n, -1, c]).unwrap()
    };
    let x = x.add(&tokens(&b.cpe1.forward(&image(x)).unwrap())).unwrap();
    let t = b.norm1.forward(&x).unwrap();
    let gate = b.act_proj.forward(&t).unwrap().silu().unwrap();
    let t = b.in_proj.forward(&t).unwrap();
    let t = tokens(&b.dwc.forward(&image(&t)).unwrap()).silu().unwrap();
    let t = b.attn.forward(&t).unwrap();
    let x = x.add(&b.drop_path.forward(&b.out_proj.forward(&t.mul(&gate).unwrap()).unwrap(), rng).unwrap()).unwrap();
    let x = x.add(&tokens(&b.cpe2.forward(&image(&x)).unwrap())).unwrap();
    x.add(&b.drop_path.forward(&b.mlp.forward(&b.norm2.forward(&x).unwrap()).unwrap(), rng).unwrap()).unwrap()
}

#[test]
fn mila_block_is_bitwise_its_composition_forward_and_backward() {
    let bits = |t: &Tensor| t.to_vec_f64().unwrap().into_iter().map(f64::to_bits).collect::<Vec<_>>();
    for dtype in [DType::F32, DType::F64] {
        let cfg = BlockConfig {
            dim: 16,
            input_resolution: (4, 5),
            num_heads: 2,
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_path: 0.3,
        };
        let block =
            MilaBlock::new(&mut Init { dtype, device: Device::Cpu, rng: &mut Generator::new(3) }, &cfg).unwrap();
        let run = |fused: bool| {
            let x = Tensor::randn(&[3, 20, 16], 0.0, 1.0, dtype, Device::Cpu, &mut Generator::new(4))
                .unwrap()
                .requires_grad_(true)
                .unwrap();
            let mut rng = Generator::new(5);
            let y =
                if fused { block.forward(&x, &mut rng).unwrap() } else { block_forward_composed(&block, &x, &mut rng) };
            block.parameters().iter().for_each(Tensor::zero_grad);
            y.backward_with(&Tensor::randn(y.shape(), 0.0, 1.0, dtype, Device::Cpu, &mut Generator::new(6)).unwrap())
                .unwrap();
            let mut out = vec![bits(&y), bits(&x.grad().unwrap())];
            for (name, p) in block.named_parameters() {
                out.push(p.grad().map(|g| bits(&g)).unwrap_or_else(|| panic!("{name} has no gradient")));
            }
            out
        };
        assert_eq!(run(true), run(false), "{dtype:?}");
    }
}

#[test]
fn patch_merging_is_bitwise_its_token_composition_and_the_image_chain_up_to_rounding() {
    for dtype in [DType::F32, DType::F64] {
        let pm = PatchMerging::new(&mut Init { dtype, device: Device::Cpu, rng: &mut Generator::new(7) }, 8, (6, 4))
            .unwrap();
        // 0: the module; 1: its token chain op by op (Linear, ReLU, depthwise conv on the channels-last view,
        // ReLU, Linear, BatchNorm on the image view); 2: the official chain on the NCHW image (Conv,
        // BatchNorm, ReLU as ConvLayer composes them).
        let run = |how: usize| {
            let x = Tensor::randn(&[2, 24, 8], 0.0, 1.0, dtype, Device::Cpu, &mut Generator::new(8))
                .unwrap()
                .requires_grad_(true)
                .unwrap();
            let image = |t: &Tensor, h: isize, w: isize| {
                let c = t.dim(2).unwrap() as isize;
                t.reshape(&[2, h, w, c]).unwrap().permute(&[0, 3, 1, 2]).unwrap()
            };
            let tokens = |t: &Tensor| {
                let c = t.dim(1).unwrap() as isize;
                t.permute(&[0, 2, 3, 1]).unwrap().reshape(&[2, -1, c]).unwrap()
            };
            let y = match how {
                0 => pm.forward(&x).unwrap(),
                1 => {
                    let [e, d, p] = &pm.conv[..] else { unreachable!() };
                    let w2d = |l: &mila::ConvLayer| {
                        let w = &l.conv.weight;
                        w.reshape(&[w.dim(0).unwrap() as isize, w.dim(1).unwrap() as isize]).unwrap()
                    };
                    let t = ops::linear(&x, &w2d(e), e.conv.bias.as_ref()).unwrap().relu().unwrap();
                    let t = d.conv.forward(&image(&t, 6, 4)).unwrap().relu().unwrap();
                    let t = ops::linear(&tokens(&t), &w2d(p), p.conv.bias.as_ref()).unwrap();
                    tokens(&p.norm.as_ref().unwrap().forward(&image(&t, 3, 2)).unwrap())
                }
                _ => {
                    let y = pm.conv.iter().fold(image(&x, 6, 4), |t, l| {
                        let mut y = l.conv.forward(&t).unwrap();
                        if let Some(n) = &l.norm {
                            y = n.forward(&y).unwrap();
                        }
                        if l.relu {
                            y = y.relu().unwrap();
                        }
                        y
                    });
                    tokens(&y)
                }
            };
            assert_eq!(y.shape(), &[2, 6, 16]);
            pm.parameters().iter().for_each(Tensor::zero_grad);
            y.backward_with(&Tensor::randn(y.shape(), 0.0, 1.0, dtype, Device::Cpu, &mut Generator::new(9)).unwrap())
                .unwrap();
            let mut out = vec![y.to_vec_f64().unwrap(), x.grad().unwrap().to_vec_f64().unwrap()];
            out.extend(pm.parameters().iter().map(|p| p.grad().unwrap().to_vec_f64().unwrap()));
            out
        };
        let (module, tokens, images) = (run(0), run(1), run(2));
        let as_bits =
            |v: &[Vec<f64>]| v.iter().map(|t| t.iter().map(|x| x.to_bits()).collect::<Vec<_>>()).collect::<Vec<_>>();
        assert_eq!(as_bits(&module), as_bits(&tokens), "{dtype:?}: the module against its token chain");
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        for (i, (a, b)) in module.iter().zip(&images).enumerate() {
            // Relative to the tensor's largest element, or to 1 where that is rounding noise: conv.2's bias
            // gradient is zero in exact arithmetic (the BatchNorm after it removes the mean).
            let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1.0);
            let err = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
            assert!(
                err <= tol,
                "{dtype:?}: tensor {i} (0 output, 1 dx, then parameters): {err:e} against the image chain"
            );
        }
    }
}
