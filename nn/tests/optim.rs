//! Five steps of each optimizer from a fixed state against the documented update rules, written here as
//! plain f64 loops. The gradient is that of L(p) = sum(c p^2 / 2 + d p), i.e. g = c p + d, and goes
//! through the engine's backward.

use engine::Tensor;
use nn::{clip_grad_norm, AdamW, AdamWConfig, Optimizer, ParamGroup, Sgd, SgdConfig};
use ops::TensorOps;

const P0: [f64; 4] = [0.5, -1.5, 2.0, 0.1];
const C: [f64; 4] = [1.0, 2.0, 0.5, 3.0];
const D: [f64; 4] = [0.3, -0.2, 0.1, 1.0];

fn param() -> Tensor {
    Tensor::from_vec(P0.to_vec(), &[2, 2]).unwrap().requires_grad_(true).unwrap()
}

fn compute_grad(p: &Tensor) {
    let c = Tensor::from_vec(C.to_vec(), &[2, 2]).unwrap();
    let d = Tensor::from_vec(D.to_vec(), &[2, 2]).unwrap();
    let loss = p.mul(p).unwrap().mul(&c).unwrap().mul_scalar(0.5).unwrap().add(&p.mul(&d).unwrap()).unwrap();
    loss.sum_all().unwrap().backward().unwrap();
}

fn run(opt: &mut dyn Optimizer, p: &Tensor) -> Vec<f64> {
    for _ in 0..5 {
        opt.zero_grad();
        compute_grad(p);
        opt.step().unwrap();
    }
    p.to_vec_f64().unwrap()
}

fn assert_close(got: &[f64], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-14 * w.abs().max(1.0), "{got:?} vs {want:?}");
    }
}

fn sgd_reference(lr: f64, momentum: f64, dampening: f64, nesterov: bool, wd: f64) -> Vec<f64> {
    let mut p = P0.to_vec();
    let mut buf = [0.0; 4];
    for step in 0..5 {
        for i in 0..4 {
            let mut g = C[i] * p[i] + D[i] + wd * p[i];
            if momentum != 0.0 {
                buf[i] = if step == 0 { g } else { momentum * buf[i] + (1.0 - dampening) * g };
                g = if nesterov { g + momentum * buf[i] } else { buf[i] };
            }
            p[i] -= lr * g;
        }
    }
    p
}

#[test]
fn sgd_follows_pytorch_rules() {
    for (momentum, dampening, nesterov, wd) in
        [(0.0, 0.0, false, 0.0), (0.9, 0.0, false, 0.01), (0.9, 0.1, false, 0.0), (0.8, 0.0, true, 0.05)]
    {
        let p = param();
        let groups = vec![ParamGroup { params: vec![p.clone()], weight_decay: wd }];
        let mut opt = Sgd::new(groups, SgdConfig { lr: 0.1, momentum, dampening, nesterov }).unwrap();
        assert_close(&run(&mut opt, &p), &sgd_reference(0.1, momentum, dampening, nesterov, wd));
    }
    let bad = Sgd::new(vec![], SgdConfig { lr: 0.1, momentum: 0.0, dampening: 0.0, nesterov: true });
    assert!(bad.is_err());
}

fn adamw_reference(cfg: AdamWConfig, wd: f64) -> Vec<f64> {
    let mut p = P0.to_vec();
    let (mut m, mut v, mut vmax) = (vec![0.0; 4], vec![0.0; 4], vec![0.0f64; 4]);
    for t in 1..=5 {
        for i in 0..4 {
            let g = C[i] * p[i] + D[i];
            p[i] *= 1.0 - cfg.lr * wd;
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g;
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g * g;
            let vhat = if cfg.amsgrad {
                vmax[i] = vmax[i].max(v[i]);
                vmax[i]
            } else {
                v[i]
            };
            let bc1 = 1.0 - cfg.beta1.powi(t);
            let bc2 = 1.0 - cfg.beta2.powi(t);
            p[i] -= cfg.lr / bc1 * m[i] / (vhat.sqrt() / bc2.sqrt() + cfg.eps);
        }
    }
    p
}

#[test]
fn adamw_follows_pytorch_rules() {
    for (amsgrad, wd) in [(false, 0.0), (false, 0.05), (true, 0.05)] {
        let cfg = AdamWConfig { lr: 0.05, beta1: 0.9, beta2: 0.99, eps: 1e-8, amsgrad };
        let p = param();
        let mut opt = AdamW::new(vec![ParamGroup { params: vec![p.clone()], weight_decay: wd }], cfg);
        assert_close(&run(&mut opt, &p), &adamw_reference(cfg, wd));
        assert_eq!(opt.state(&p).unwrap().step, 5);
    }
}

#[test]
fn no_decay_groups_and_clipping() {
    let w = Tensor::from_vec(vec![1.0f64; 4], &[2, 2]).unwrap();
    let b = Tensor::from_vec(vec![1.0f64; 2], &[2]).unwrap();
    let n = Tensor::from_vec(vec![1.0f64; 4], &[2, 2]).unwrap();
    let named = vec![("fc.weight".to_string(), w.clone()), ("fc.bias".to_string(), b), ("norm1.weight".into(), n)];
    let groups = nn::param_groups(&named, 0.05, &["norm"]);
    assert_eq!(groups[0].params.len(), 1);
    assert!(groups[0].params[0].same_storage(&w));
    assert_eq!(groups[1].params.len(), 2);
    assert_eq!(groups[1].weight_decay, 0.0);

    let p = param();
    compute_grad(&p);
    let g: Vec<f64> = (0..4).map(|i| C[i] * P0[i] + D[i]).collect();
    let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((clip_grad_norm(std::slice::from_ref(&p), 1.0).unwrap() - norm).abs() < 1e-14);
    let clipped = p.grad().unwrap().to_vec_f64().unwrap();
    for (c, gi) in clipped.iter().zip(&g) {
        assert!((c - gi / (norm + 1e-6)).abs() < 1e-15);
    }
}
