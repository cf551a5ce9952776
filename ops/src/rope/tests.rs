use engine::{gradcheck_with, DType, GradcheckOptions, Tensor};

use super::*;
use crate::conv::tests::assert_cuda_matches_cpu;
use crate::testing::*;
use crate::view::permute;

/// RoPE-2D written from MILA.md independently of the kernel: every channel pair is a complex number
/// multiplied by exp(i angle), with the angle computed in f64 as r base^(-p / k_max) or c base^(-(p - k_max) /
/// k_max). `sign` -1 rotates the other way.
fn rope_ref(x: &[f64], [b, h, w, c]: [usize; 4], base: f64, sign: f64) -> Vec<f64> {
    let k_max = c / 4;
    let mut y = vec![0.0; x.len()];
    for s in 0..b {
        for r in 0..h {
            for col in 0..w {
                let tok = (s * h + r) * w + col;
                for p in 0..c / 2 {
                    let angle = if p < k_max {
                        r as f64 * base.powf(-(p as f64) / k_max as f64)
                    } else {
                        col as f64 * base.powf(-((p - k_max) as f64) / k_max as f64)
                    };
                    let (re, im) = (x[tok * c + 2 * p], x[tok * c + 2 * p + 1]);
                    let (cr, ci) = (angle.cos(), sign * angle.sin());
                    y[tok * c + 2 * p] = re * cr - im * ci;
                    y[tok * c + 2 * p + 1] = re * ci + im * cr;
                }
            }
        }
    }
    y
}

#[test]
fn rope_matches_the_complex_multiply_reference() {
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-13)] {
        for (b, h, w, c) in [(2, 3, 5, 8), (1, 4, 4, 16), (3, 1, 7, 4), (1, 6, 2, 12)] {
            let x = randn_as(&[b, h * w, c], dtype, (h * 10 + w) as u64);
            let y = rope2d(&x, h, w, 10000.0).unwrap();
            assert_eq!((y.shape(), y.dtype()), (x.shape(), dtype));
            let want = rope_ref(&x.to_vec_f64().unwrap(), [b, h, w, c], 10000.0, 1.0);
            assert_close(&y.to_vec_f64().unwrap(), &want, tol, &format!("rope {dtype} {b}x{h}x{w}x{c}"));
        }
    }
}

#[test]
fn rope_leaves_the_first_token_and_norms_unchanged() {
    // Token (0, 0) has angle 0 everywhere; every pair keeps its modulus.
    let x = randn(&[2, 12, 8], 1);
    let y = rope2d(&x, 3, 4, 100.0).unwrap();
    let (xv, yv) = (x.to_vec_f64().unwrap(), y.to_vec_f64().unwrap());
    assert_eq!(xv[..8], yv[..8]);
    for (xp, yp) in xv.chunks(2).zip(yv.chunks(2)) {
        assert!((xp[0].hypot(xp[1]) - yp[0].hypot(yp[1])).abs() < 1e-14);
    }
}

#[test]
fn rope_gradient_is_the_inverse_rotation() {
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-13)] {
        // x stored (B, C, N), seen as (B, N, C): a non-contiguous input.
        let x = randn_as(&[2, 8, 15], dtype, 2).requires_grad_(true).unwrap();
        let y = rope2d(&permute(&x, &[0, 2, 1]).unwrap(), 3, 5, 10000.0).unwrap();
        let g = randn_as(y.shape(), dtype, 3);
        y.backward_with(&g).unwrap();
        let want = rope_ref(&g.to_vec_f64().unwrap(), [2, 3, 5, 8], 10000.0, -1.0);
        let got = permute(&x.grad().unwrap(), &[0, 2, 1]).unwrap().to_vec_f64().unwrap();
        assert_close(&got, &want, tol, &format!("rope grad {dtype}"));
    }
}

#[test]
fn rope_gradients_match_finite_differences() {
    // RoPE is linear in x, so central differences are exact for any step: a large one keeps their roundoff
    // (about |loss| 1e-16 / step) far below the tolerance on the near-zero gradients.
    let opts = GradcheckOptions { eps: 1e-3, ..Default::default() };
    let r = gradcheck_with("rope2d", &[randn(&[2, 8, 15], 4)], opts, |t| {
        rope2d(&permute(&t[0], &[0, 2, 1])?, 5, 3, 10000.0)
    })
    .unwrap();
    assert!(r.passed(), "{r}");
    assert!(r.max_abs_grad > 0.1, "{r}");
}

#[test]
fn rope_bad_arguments_are_errors() {
    let x = randn(&[2, 6, 8], 1);
    for (t, h, w, base) in [
        (x.clone(), 2, 4, 10000.0),
        (randn(&[2, 6, 6], 2), 2, 3, 10000.0),
        (randn(&[6, 8], 3), 2, 3, 10000.0),
        (x.clone(), 2, 3, 0.0),
        (x.clone(), 2, 3, f64::NAN),
        (x.clone(), usize::MAX, 2, 10000.0),
    ] {
        let e = rope2d(&t, h, w, base).unwrap_err().to_string();
        assert!(e.contains("rope2d") && e.contains(&format!("{:?}", t.shape())), "{e}");
    }
    assert!(rope2d(&randn(&[0, 6, 8], 4), 2, 3, 10000.0).unwrap().shape() == [0, 6, 8]);
    assert_eq!(
        rope2d(&Tensor::zeros(&[1, 0, 4], DType::F64, engine::Device::Cpu).unwrap(), 0, 5, 10.0).unwrap().numel(),
        0
    );
}

#[test]
fn rope_on_cuda_matches_the_cpu() {
    if engine::cuda::test_device_or_skip("rope_on_cuda_matches_the_cpu").is_none() {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        for (b, h, w, c) in [(2, 3, 5, 8), (1, 4, 4, 16), (3, 1, 7, 4), (1, 6, 2, 12), (2, 14, 14, 64)] {
            // x stored (B, C, N), seen as (B, N, C): a non-contiguous input, read in place on CUDA.
            let x = randn_as(&[b, c, h * w], dtype, (h * 10 + w) as u64);
            assert_cuda_matches_cpu(&format!("rope {b}x{h}x{w}x{c}"), &[x], &[true], |t| {
                rope2d(&permute(&t[0], &[0, 2, 1])?, h, w, 10000.0)
            });
        }
    }
}
