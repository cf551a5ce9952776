//! Modules: PyTorch names, init bounds, forward against direct formulas, loading in place.

use std::collections::HashMap;

use engine::{DType, Device, Generator, Tensor};
use nn::{BatchNorm2d, Conv2d, Init, LayerNorm, Linear, Mlp, Module};
use ops::TensorOps;

fn init(rng: &mut Generator) -> Init<'_> {
    Init { dtype: DType::F64, device: Device::Cpu, rng }
}

#[test]
fn names_follow_pytorch_and_flags_mark_no_decay() {
    let mut rng = Generator::new(0);
    let mut i = init(&mut rng);
    let mlp = Mlp::new(&mut i, 4, 16).unwrap();
    let names: Vec<String> = mlp.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
    assert_eq!(mlp.num_params(), 4 * 16 + 16 + 16 * 4 + 4);
    let (decay, keep) = mlp.parameters_by_decay();
    assert_eq!((decay.len(), keep.len()), (2, 2));
    let bn = BatchNorm2d::new(&mut i, 3).unwrap();
    let sd: Vec<String> = bn.state_dict().into_iter().map(|(n, _)| n).collect();
    assert_eq!(sd, ["weight", "bias", "running_mean", "running_var"]);
    assert_eq!(bn.counters(), vec![("num_batches_tracked".to_string(), 0)]);
}

#[test]
fn default_init_bounds() {
    let mut rng = Generator::new(1);
    let mut i = init(&mut rng);
    let lin = Linear::new(&mut i, 25, 7, true).unwrap();
    let bound = 1.0 / 5.0;
    assert!(lin.weight.to_vec_f64().unwrap().iter().all(|v| v.abs() <= bound));
    let conv = Conv2d::new(&mut i, 4, 6, (3, 3), 1, 1, 2, true).unwrap();
    assert_eq!(conv.weight.shape(), &[6, 2, 3, 3]);
    let bound = 1.0 / (18f64).sqrt();
    assert!(conv.weight.to_vec_f64().unwrap().iter().all(|v| v.abs() <= bound));
    assert!(Conv2d::new(&mut i, 4, 6, (3, 3), 1, 1, 3, true).is_err());
    let t = Linear::new_trunc_normal(&mut i, 100, 100, true).unwrap();
    let w = t.weight.to_vec_f64().unwrap();
    let std = (w.iter().map(|v| v * v).sum::<f64>() / w.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.002, "{std}");
    assert!(t.bias.unwrap().to_vec_f64().unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn linear_and_layer_norm_match_formulas() {
    let mut rng = Generator::new(2);
    let mut i = init(&mut rng);
    let lin = Linear::new(&mut i, 3, 2, true).unwrap();
    let x = Tensor::randn(&[4, 3], 0.0, 1.0, DType::F64, Device::Cpu, &mut Generator::new(3)).unwrap();
    let y = lin.forward(&x).unwrap().to_vec_f64().unwrap();
    let (w, b, xv) =
        (lin.weight.to_vec_f64().unwrap(), lin.bias.as_ref().unwrap().to_vec_f64().unwrap(), x.to_vec_f64().unwrap());
    for r in 0..4 {
        for o in 0..2 {
            let want = b[o] + (0..3).map(|k| xv[r * 3 + k] * w[o * 3 + k]).sum::<f64>();
            assert!((y[r * 2 + o] - want).abs() < 1e-14);
        }
    }
    let ln = LayerNorm::new(&mut i, 3, 1e-5).unwrap();
    let z = ln.forward(&x).unwrap();
    let m = z.mean(&[-1], false).unwrap().to_vec_f64().unwrap();
    assert!(m.iter().all(|v| v.abs() < 1e-12));
}

#[test]
fn loading_copies_in_place_and_checks_shapes() {
    let mut rng = Generator::new(4);
    let mut i = init(&mut rng);
    let a = Mlp::new(&mut i, 3, 5).unwrap();
    let b = Mlp::new(&mut i, 3, 5).unwrap();
    let before = b.fc1.weight.id();
    let tensors: HashMap<String, Tensor> = a.state_dict().into_iter().collect();
    b.load_tensors(&tensors, &HashMap::new(), true).unwrap();
    assert_eq!(b.fc1.weight.id(), before, "parameters keep their identity");
    assert_eq!(b.fc2.bias.as_ref().unwrap().to_vec_f64().unwrap(), a.fc2.bias.as_ref().unwrap().to_vec_f64().unwrap());
    let mut bad = tensors.clone();
    bad.insert("fc1.weight".into(), Tensor::zeros(&[2, 2], DType::F64, Device::Cpu).unwrap());
    assert!(b.load_tensors(&bad, &HashMap::new(), true).is_err());
    let mut partial = tensors;
    partial.remove("fc2.bias");
    assert!(b.load_tensors(&partial, &HashMap::new(), true).is_err());
    assert!(b.load_tensors(&partial, &HashMap::new(), false).is_ok());
}

#[test]
fn batch_norm_counts_batches_in_training_only() {
    let mut rng = Generator::new(5);
    let mut i = init(&mut rng);
    let mut bn = BatchNorm2d::new(&mut i, 2).unwrap();
    let x = Tensor::randn(&[3, 2, 2, 2], 0.0, 1.0, DType::F64, Device::Cpu, &mut Generator::new(6)).unwrap();
    bn.forward(&x).unwrap();
    bn.forward(&x).unwrap();
    bn.set_training(false);
    bn.forward(&x).unwrap();
    assert_eq!(bn.counters()[0].1, 2);
    assert_ne!(bn.running_mean.to_vec_f64().unwrap(), vec![0.0, 0.0]);
}
