//! Checkpoints: round trip of parameters, buffers, counters, optimizer state and metadata; atomic writes;
//! a resumed optimizer continues exactly as the uninterrupted one.

use std::collections::HashMap;

use engine::{DType, Device, Generator, Tensor};
use nn::checkpoint::{load, save};
use nn::{AdamW, AdamWConfig, BatchNorm2d, Init, Mlp, Module, Optimizer, ParamGroup};
use ops::TensorOps;

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("mila-{}-{name}.safetensors", std::process::id()))
}

fn step(model: &Mlp, opt: &mut AdamW, x: &Tensor) -> f64 {
    opt.zero_grad();
    let loss = model.forward(x).unwrap().tanh().unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    opt.step().unwrap();
    loss.to_scalar().unwrap()
}

fn model(seed: u64) -> Mlp {
    let mut rng = Generator::new(seed);
    Mlp::new(&mut Init { dtype: DType::F32, device: Device::Cpu, rng: &mut rng }, 3, 8).unwrap()
}

#[test]
fn resume_gives_exactly_the_uninterrupted_losses() {
    let x = Tensor::randn(&[5, 3], 0.0, 1.0, DType::F32, Device::Cpu, &mut Generator::new(9)).unwrap();
    let cfg = AdamWConfig { lr: 0.01, ..Default::default() };
    let group = |m: &Mlp| vec![ParamGroup { params: m.parameters(), weight_decay: 0.05 }];

    let a = model(1);
    let mut opt_a = AdamW::new(group(&a), cfg);
    let straight: Vec<f64> = (0..6).map(|_| step(&a, &mut opt_a, &x)).collect();

    let b = model(1);
    let mut opt_b = AdamW::new(group(&b), cfg);
    let mut resumed: Vec<f64> = (0..3).map(|_| step(&b, &mut opt_b, &x)).collect();
    let named = b.named_parameters();
    let (state, counters) = opt_b.export_state(&named);
    let mut tensors = b.state_dict();
    tensors.extend(state);
    let path = temp_path("resume");
    let meta = HashMap::from([("step".to_string(), "3".to_string())]);
    save(&path, &tensors, &counters, meta).unwrap();
    assert!(!path.with_extension("safetensors.tmp").exists());

    // A fresh process: a new model with other weights, loaded from the file.
    let c = model(2);
    let ck = load(&path).unwrap();
    ck.load_into(&c, "", false).unwrap();
    let mut opt_c = AdamW::new(group(&c), cfg);
    opt_c.import_state(&c.named_parameters(), &ck.tensors, &ck.counters).unwrap();
    assert_eq!(ck.metadata["step"], "3");
    resumed.extend((0..3).map(|_| step(&c, &mut opt_c, &x)));
    assert_eq!(resumed, straight);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn buffers_and_counters_round_trip() {
    let mut rng = Generator::new(3);
    let bn = BatchNorm2d::new(&mut Init { dtype: DType::F64, device: Device::Cpu, rng: &mut rng }, 2).unwrap();
    let x = Tensor::randn(&[2, 2, 3, 3], 0.0, 1.0, DType::F64, Device::Cpu, &mut Generator::new(4)).unwrap();
    bn.forward(&x).unwrap();
    let path = temp_path("bn");
    save(&path, &bn.state_dict(), &bn.counters(), HashMap::new()).unwrap();
    let ck = load(&path).unwrap();
    assert_eq!(ck.counters["num_batches_tracked"], 1);
    assert_eq!(ck.tensors["running_var"].to_vec_f64().unwrap(), bn.running_var.to_vec_f64().unwrap());
    assert_eq!(ck.tensors["running_var"].dtype(), DType::F64);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_files_are_errors() {
    assert!(load(std::path::Path::new("/nonexistent/mila.safetensors")).is_err());
    let path = temp_path("garbage");
    std::fs::write(&path, b"not a safetensors file").unwrap();
    let e = load(&path).err().unwrap().to_string();
    assert!(e.contains("garbage"), "{e}");
    std::fs::remove_file(&path).unwrap();
}
