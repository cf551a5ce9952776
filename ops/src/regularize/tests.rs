use engine::{gradcheck, DType, Generator, Tensor};

use super::*;
use crate::conv::tests::assert_cuda_matches_cpu;
use crate::testing::*;
use crate::view::permute;

/// Dropout by its contract, element by element: one uniform per element in row-major order, kept when below
/// 1 - p, kept values scaled by 1 / (1 - p).
fn dropout_ref(x: &[f64], p: f64, seed: u64) -> Vec<f64> {
    let mut g = Generator::new(seed);
    x.iter().map(|&v| if g.uniform() < 1.0 - p { v / (1.0 - p) } else { 0.0 }).collect()
}

/// Drop path by its contract: one uniform per sample, the whole sample kept (and scaled) or zeroed.
fn drop_path_ref(x: &[f64], n: usize, p: f64, seed: u64) -> Vec<f64> {
    let mut g = Generator::new(seed);
    let per = x.len() / n;
    let keep: Vec<bool> = (0..n).map(|_| g.uniform() < 1.0 - p).collect();
    x.iter().enumerate().map(|(i, &v)| if keep[i / per] { v / (1.0 - p) } else { 0.0 }).collect()
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-6,
        DType::F64 => 1e-15,
    }
}

#[test]
fn dropout_and_drop_path_match_their_references_and_reproduce_with_the_seed() {
    for dtype in [DType::F32, DType::F64] {
        // A permuted view: the mask follows the view's row-major order.
        let stored = randn_as(&[5, 4, 3], dtype, 1);
        let x = permute(&stored, &[2, 0, 1]).unwrap();
        let xv = x.to_vec_f64().unwrap();
        for p in [0.3, 0.5, 0.9] {
            let y = dropout(&x, p, true, &mut Generator::new(7)).unwrap();
            assert_close(&y.to_vec_f64().unwrap(), &dropout_ref(&xv, p, 7), tol(dtype), "dropout");
            let again = dropout(&x, p, true, &mut Generator::new(7)).unwrap();
            assert_eq!(y.to_vec_f64().unwrap(), again.to_vec_f64().unwrap());
            assert_ne!(
                y.to_vec_f64().unwrap(),
                dropout(&x, p, true, &mut Generator::new(8)).unwrap().to_vec_f64().unwrap()
            );

            let y = drop_path(&x, p, true, &mut Generator::new(9)).unwrap();
            assert_close(&y.to_vec_f64().unwrap(), &drop_path_ref(&xv, 3, p, 9), tol(dtype), "drop_path");
        }
    }
}

#[test]
fn drop_path_keeps_or_drops_whole_samples() {
    let x = rand(&[64, 3, 5], 0.5, 1.5, 1); // no zeros in x: a zero in y is a drop
    let y = drop_path(&x, 0.5, true, &mut Generator::new(2)).unwrap().to_vec_f64().unwrap();
    let xv = x.to_vec_f64().unwrap();
    let mut kept = 0;
    for (ys, xs) in y.chunks(15).zip(xv.chunks(15)) {
        let dropped = ys.iter().all(|&v| v == 0.0);
        assert!(dropped || ys.iter().zip(xs).all(|(a, b)| (a - 2.0 * b).abs() < 1e-15));
        kept += usize::from(!dropped);
    }
    assert!((16..=48).contains(&kept), "{kept} of 64 samples kept at p = 0.5");
}

#[test]
fn eval_and_p_zero_are_the_identity_and_draw_nothing() {
    let x = randn(&[4, 6], 1);
    let mut g = Generator::new(3);
    for (p, training) in [(0.5, false), (0.0, true), (1.0, false)] {
        for f in [dropout, drop_path] {
            let y = f(&x, p, training, &mut g).unwrap();
            assert!(y.same_storage(&x));
            assert_eq!(y.to_vec_f64().unwrap(), x.to_vec_f64().unwrap());
        }
    }
    assert_eq!(g, Generator::new(3));
}

#[test]
fn the_rate_and_the_mean_are_kept_in_expectation() {
    let x = Tensor::ones(&[100_000], DType::F32, engine::Device::Cpu).unwrap();
    let y = dropout(&x, 0.2, true, &mut Generator::new(4)).unwrap().to_vec_f64().unwrap();
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / 1e5;
    assert!((kept - 0.8).abs() < 0.01, "kept {kept}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.25).abs() < 1e-6));
    let all = dropout(&x, 1.0, true, &mut Generator::new(5)).unwrap();
    assert!(all.to_vec_f64().unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn the_gradient_is_the_same_mask() {
    for dtype in [DType::F32, DType::F64] {
        for (op, f) in
            [("dropout", dropout as fn(&Tensor, f64, bool, &mut Generator) -> Result<Tensor>), ("drop_path", drop_path)]
        {
            let x = randn_as(&[6, 2, 5], dtype, 11).requires_grad_(true).unwrap();
            let y = f(&x, 0.4, true, &mut Generator::new(12)).unwrap();
            let g = randn_as(y.shape(), dtype, 13);
            y.backward_with(&g).unwrap();
            // The mask, read back from the forward: y / x (x has no zeros).
            let mask: Vec<f64> =
                y.to_vec_f64().unwrap().iter().zip(x.to_vec_f64().unwrap()).map(|(a, b)| a / b).collect();
            let want: Vec<f64> = g.to_vec_f64().unwrap().iter().zip(&mask).map(|(a, m)| a * m).collect();
            assert_close(&x.grad().unwrap().to_vec_f64().unwrap(), &want, 10.0 * tol(dtype), op);
            assert!(mask.contains(&0.0) && mask.iter().any(|&m| m > 1.0), "{op}: degenerate mask");
        }
    }
    // With the generator re-seeded inside f, every evaluation sees the same mask.
    let x = randn(&[5, 3, 2], 14);
    for f in [dropout, drop_path] {
        let r = gradcheck("mask", std::slice::from_ref(&x), |t| {
            f(&permute(&t[0], &[1, 0, 2])?, 0.5, true, &mut Generator::new(15))
        })
        .unwrap();
        assert!(r.passed() && r.max_abs_grad > 0.1, "{r}");
    }
}

#[test]
fn bad_probabilities_are_errors() {
    let x = randn(&[2, 3], 1);
    for p in [-0.1, 1.5, f64::NAN] {
        let e = dropout(&x, p, true, &mut Generator::new(0)).unwrap_err().to_string();
        assert!(e.contains("dropout") && e.contains("[2, 3]"), "{e}");
        assert!(drop_path(&x, p, false, &mut Generator::new(0)).is_err());
    }
    let scalar = Tensor::scalar(1.0, DType::F64, engine::Device::Cpu).unwrap();
    assert!(drop_path(&scalar, 0.5, true, &mut Generator::new(0)).is_err());
    assert_eq!(dropout(&scalar, 0.5, true, &mut Generator::new(0)).unwrap().shape(), &[] as &[usize]);
    assert_eq!(drop_path(&randn(&[0, 3], 2), 0.5, true, &mut Generator::new(0)).unwrap().shape(), &[0, 3]);
}

#[test]
fn masks_on_cuda_match_the_cpu_for_one_seed() {
    if engine::cuda::test_device_or_skip("masks_on_cuda_match_the_cpu_for_one_seed").is_none() {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        // A permuted view, read in place on CUDA: the mask follows the view's row-major order on both devices.
        let stored = randn_as(&[5, 4, 3], dtype, 21);
        for p in [0.3, 0.5, 0.9, 1.0] {
            for (op, f) in [
                ("dropout", dropout as fn(&Tensor, f64, bool, &mut Generator) -> Result<Tensor>),
                ("drop_path", drop_path),
            ] {
                assert_cuda_matches_cpu(&format!("{op} p {p}"), std::slice::from_ref(&stored), &[true], |t| {
                    f(&permute(&t[0], &[2, 0, 1])?, p, true, &mut Generator::new(22))
                });
            }
        }
    }
}

/// `add_drop_path(x, t)` against `x.add(&drop_path(t))` from the same seed: output and both gradients bit for
/// bit, with permuted views of x and t.
fn assert_add_drop_path_is_the_composition(device: engine::Device) {
    for dtype in [DType::F32, DType::F64] {
        for p in [0.0, 0.3, 0.5, 0.9, 1.0] {
            let run = |fused: bool| {
                let xs = randn_as(&[4, 6, 5], dtype, 31).to_device(device).unwrap().requires_grad_(true).unwrap();
                let ts = randn_as(&[6, 4, 5], dtype, 32).to_device(device).unwrap().requires_grad_(true).unwrap();
                let (x, t) = (permute(&xs, &[1, 0, 2]).unwrap(), ts.clone());
                let mut g = Generator::new(33);
                let y = if fused {
                    add_drop_path(&x, &t, p, true, &mut g).unwrap()
                } else {
                    x.add(&drop_path(&t, p, true, &mut g).unwrap()).unwrap()
                };
                y.backward_with(&randn_as(y.shape(), dtype, 34).to_device(device).unwrap()).unwrap();
                // The generator's next draw: both made the same number of draws.
                let next = g.uniform();
                let v = |t: &Tensor| t.to_vec_f64().unwrap();
                (v(&y), v(&xs.grad().unwrap()), v(&ts.grad().unwrap()), next)
            };
            let (fused, composed) = (run(true), run(false));
            assert_eq!(fused, composed, "add_drop_path {dtype} p {p} on {device}");
            if p == 0.5 {
                // Not a degenerate mask: some samples dropped (y != x + t), some kept (y != x).
                let x = permute(&randn_as(&[4, 6, 5], dtype, 31), &[1, 0, 2]).unwrap();
                let t = randn_as(&[6, 4, 5], dtype, 32);
                assert_ne!(fused.0, x.add(&t).unwrap().to_vec_f64().unwrap());
                assert_ne!(fused.0, x.to_vec_f64().unwrap());
            }
        }
    }
}

#[test]
fn add_drop_path_is_the_residual_with_drop_path_bit_for_bit() {
    assert_add_drop_path_is_the_composition(engine::Device::Cpu);
    // In eval it is the sum and draws nothing.
    let (x, t) = (randn(&[3, 4], 41), randn(&[3, 4], 42));
    let mut g = Generator::new(43);
    let y = add_drop_path(&x, &t, 0.5, false, &mut g).unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), x.add(&t).unwrap().to_vec_f64().unwrap());
    assert_eq!(g.uniform(), Generator::new(43).uniform());
}

#[test]
fn add_drop_path_passes_gradcheck() {
    let leaves = [randn(&[5, 3, 2], 51), randn(&[5, 2, 3], 52)];
    let r = gradcheck("add_drop_path", &leaves, |t| {
        add_drop_path(&t[0], &permute(&t[1], &[0, 2, 1])?, 0.5, true, &mut Generator::new(53))
    })
    .unwrap();
    assert!(r.passed() && r.max_abs_grad > 0.1, "{r}");
}

#[test]
fn add_drop_path_bad_operands_are_errors() {
    let mut g = Generator::new(0);
    let e = add_drop_path(&randn(&[2, 3], 1), &randn(&[3, 2], 2), 0.5, true, &mut g).unwrap_err().to_string();
    assert!(e.contains("add_drop_path") && e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
    let e = add_drop_path(&randn(&[2, 3], 1), &randn(&[2, 3], 2), 1.5, true, &mut g).unwrap_err().to_string();
    assert!(e.contains("add_drop_path") && e.contains("1.5"), "{e}");
    let f32x = randn_as(&[2, 3], DType::F32, 3);
    assert!(add_drop_path(&f32x, &randn(&[2, 3], 2), 0.5, true, &mut g).is_err());
}

#[test]
fn add_drop_path_on_cuda_is_the_composition_bit_for_bit() {
    if engine::cuda::test_device_or_skip("add_drop_path_on_cuda_is_the_composition_bit_for_bit").is_none() {
        return;
    }
    assert_add_drop_path_is_the_composition(engine::Device::Cuda(0));
    // And the same bits as the CPU's (the product rounded before the add on both).
    let stored = [randn(&[6, 4, 5], 61), randn(&[6, 4, 5], 62)];
    assert_cuda_matches_cpu("add_drop_path", &stored, &[true, true], |t| {
        add_drop_path(&t[0], &t[1], 0.4, true, &mut Generator::new(63))
    });
}
