use engine::{gradcheck, no_grad, DType, Device, Tensor};

use super::*;
use crate::conv::tests::assert_cuda_matches_cpu;
use crate::testing::*;
use crate::view::{narrow, permute, reshape};
use crate::{add, add_scalar, mean, mul, rsqrt, sub, var};

/// layer_norm composed from the primitives (its gradient is the tape's chain rule, not the fused kernel).
fn layer_norm_composed(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let centered = sub(x, &mean(x, &[-1], true)?)?;
    let mut y = mul(&centered, &rsqrt(&add_scalar(&var(x, &[-1], 0, true)?, eps)?)?)?;
    if let Some(w) = w {
        y = mul(&y, w)?;
    }
    if let Some(b) = b {
        y = add(&y, b)?;
    }
    Ok(y)
}

/// batch_norm2d composed from the primitives, with the batch's statistics or given (constant) ones.
fn batch_norm_composed(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    stats: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
    let c = x.shape()[1] as isize;
    let per_channel = |t: &Tensor| reshape(t, &[1, c, 1, 1]);
    let (m, v) = match stats {
        Some((m, v)) => (per_channel(m)?, per_channel(v)?),
        None => (mean(x, &[0, 2, 3], true)?, var(x, &[0, 2, 3], 0, true)?),
    };
    let mut y = mul(&sub(x, &m)?, &rsqrt(&add_scalar(&v, eps)?)?)?;
    if let Some(w) = w {
        y = mul(&y, &per_channel(w)?)?;
    }
    if let Some(b) = b {
        y = add(&y, &per_channel(b)?)?;
    }
    Ok(y)
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F64 => 1e-12,
    }
}

/// Runs `fused` and `composed` on the same leaves and compares outputs and every gradient.
fn compare_with_composed(
    what: &str,
    leaves: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    composed: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let dtype = leaves[0].dtype();
    let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
        let t: Vec<Tensor> = leaves.iter().map(|l| l.detach().requires_grad_(true).unwrap()).collect();
        let y = f(&t).unwrap();
        y.backward_with(&randn_as(y.shape(), dtype, 99)).unwrap();
        let grads: Vec<Vec<f64>> = t.iter().map(|l| l.grad().unwrap().to_vec_f64().unwrap()).collect();
        (y.to_vec_f64().unwrap(), grads)
    };
    let (y, grads) = run(&fused);
    let (y_ref, grads_ref) = run(&composed);
    assert_close(&y, &y_ref, tol(dtype), &format!("{what} {dtype} output"));
    for (i, (g, r)) in grads.iter().zip(&grads_ref).enumerate() {
        assert_close(g, r, 10.0 * tol(dtype), &format!("{what} {dtype} grad of input {i}"));
    }
}

#[test]
fn layer_norm_matches_a_row_loop() {
    let x = randn(&[3, 5], 1);
    let (w, b) = (randn(&[5], 2), randn(&[5], 3));
    let y = layer_norm(&x, Some(&w), Some(&b), 1e-5).unwrap().to_vec_f64().unwrap();
    let (xv, wv, bv) = (x.to_vec_f64().unwrap(), w.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    for r in 0..3 {
        let row = &xv[r * 5..][..5];
        let m = row.iter().sum::<f64>() / 5.0;
        let v = row.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 5.0;
        for k in 0..5 {
            let want = (row[k] - m) / (v + 1e-5).sqrt() * wv[k] + bv[k];
            assert!((y[r * 5 + k] - want).abs() < 1e-14, "row {r} col {k}: {} vs {want}", y[r * 5 + k]);
        }
    }
}

#[test]
fn layer_norm_matches_its_composition_in_both_dtypes() {
    for dtype in [DType::F32, DType::F64] {
        // (B, N, C) = (2, 3, 7) stored as (C, B, N): the op sees a permuted view.
        let leaves = [randn_as(&[7, 2, 3], dtype, 4), randn_as(&[7], dtype, 5), randn_as(&[7], dtype, 6)];
        let view = |t: &[Tensor]| permute(&t[0], &[1, 2, 0]);
        compare_with_composed(
            "layer_norm affine permuted",
            &leaves,
            |t| layer_norm(&view(t)?, Some(&t[1]), Some(&t[2]), 1e-5),
            |t| layer_norm_composed(&view(t)?, Some(&t[1]), Some(&t[2]), 1e-5),
        );
        compare_with_composed(
            "layer_norm plain",
            &leaves[..1],
            |t| layer_norm(&view(t)?, None, None, 1e-6),
            |t| layer_norm_composed(&view(t)?, None, None, 1e-6),
        );
        compare_with_composed(
            "layer_norm bias only",
            &[leaves[0].clone(), leaves[2].clone()],
            |t| layer_norm(&view(t)?, None, Some(&t[1]), 1e-5),
            |t| layer_norm_composed(&view(t)?, None, Some(&t[1]), 1e-5),
        );
    }
}

#[test]
fn layer_norm_gradients_match_finite_differences() {
    let (x, w, b) = (randn(&[5, 2, 3], 7), randn(&[5], 8), randn(&[5], 9));
    let view = |t: &Tensor| permute(t, &[1, 2, 0]);
    let r = gradcheck("layer_norm", &[x.clone(), w, b], |t| layer_norm(&view(&t[0])?, Some(&t[1]), Some(&t[2]), 1e-5))
        .unwrap();
    assert!(r.passed(), "{r}");
    let r = gradcheck("layer_norm no affine", &[x], |t| layer_norm(&view(&t[0])?, None, None, 1e-5)).unwrap();
    assert!(r.passed(), "{r}");
    assert!(r.max_abs_grad > 0.1, "{r}");
}

#[test]
fn layer_norm_bad_arguments_are_errors() {
    let x = randn(&[2, 4], 1);
    for (w, b) in [(Some(randn(&[3], 2)), None), (None, Some(randn(&[2, 4], 3))), (Some(randn(&[4, 1], 4)), None)] {
        let e = layer_norm(&x, w.as_ref(), b.as_ref(), 1e-5).unwrap_err().to_string();
        assert!(e.contains("layer_norm") && e.contains("[2, 4]"), "{e}");
    }
    assert!(layer_norm(&Tensor::scalar(1.0, DType::F64, engine::Device::Cpu).unwrap(), None, None, 1e-5).is_err());
    assert!(layer_norm(&randn(&[3, 0], 5), None, None, 1e-5).is_err());
    assert!(layer_norm(&x, Some(&randn_as(&[4], DType::F32, 6)), None, 1e-5).is_err());
}

#[test]
fn batch_norm_training_matches_its_composition_and_updates_running_stats() {
    for dtype in [DType::F32, DType::F64] {
        // (N, C, H, W) = (3, 4, 2, 5) stored as (N, H, W, C), the channels-last order of a token tensor.
        let leaves = [randn_as(&[3, 2, 5, 4], dtype, 10), randn_as(&[4], dtype, 11), randn_as(&[4], dtype, 12)];
        let view = |t: &Tensor| permute(t, &[0, 3, 1, 2]);
        compare_with_composed(
            "batch_norm2d training",
            &leaves,
            |t| batch_norm2d(&view(&t[0])?, Some(&t[1]), Some(&t[2]), None, None, true, 0.1, 1e-5),
            |t| batch_norm_composed(&view(&t[0])?, Some(&t[1]), Some(&t[2]), None, 1e-5),
        );
        compare_with_composed(
            "batch_norm2d training, no affine",
            &leaves[..1],
            |t| batch_norm2d(&view(&t[0])?, None, None, None, None, true, 0.1, 1e-5),
            |t| batch_norm_composed(&view(&t[0])?, None, None, None, 1e-5),
        );

        // The running buffers, updated by PyTorch's rule with the unbiased variance, computed by loops.
        let x = view(&leaves[0]).unwrap();
        let rm0 = randn_as(&[4], dtype, 13);
        let rv0 = Tensor::rand(&[4], 0.5, 2.0, dtype, engine::Device::Cpu, &mut engine::Generator::new(14)).unwrap();
        let (rm, rv) = (rm0.to_vec_f64().unwrap(), rv0.to_vec_f64().unwrap());
        batch_norm2d(&x, None, None, Some(&rm0), Some(&rv0), true, 0.1, 1e-5).unwrap();
        let xv = x.to_vec_f64().unwrap();
        let (n, c, hw) = (3, 4, 10);
        for ch in 0..c {
            let vals: Vec<f64> = (0..n).flat_map(|s| xv[(s * c + ch) * hw..][..hw].to_vec()).collect();
            let m = vals.iter().sum::<f64>() / 30.0;
            let unbiased = vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / 29.0;
            let want_m = 0.9 * rm[ch] + 0.1 * m;
            let want_v = 0.9 * rv[ch] + 0.1 * unbiased;
            let (got_m, got_v) = (rm0.to_vec_f64().unwrap()[ch], rv0.to_vec_f64().unwrap()[ch]);
            assert!((got_m - want_m).abs() <= tol(dtype), "{dtype} running_mean[{ch}] {got_m} vs {want_m}");
            assert!((got_v - want_v).abs() <= tol(dtype), "{dtype} running_var[{ch}] {got_v} vs {want_v}");
        }
    }
}

#[test]
fn batch_norm_eval_uses_the_running_stats_and_leaves_them_alone() {
    for dtype in [DType::F32, DType::F64] {
        let leaves = [randn_as(&[2, 3, 4, 3], dtype, 20), randn_as(&[3], dtype, 21), randn_as(&[3], dtype, 22)];
        let rm = randn_as(&[3], dtype, 23);
        let rv = Tensor::rand(&[3], 0.5, 2.0, dtype, engine::Device::Cpu, &mut engine::Generator::new(24)).unwrap();
        let before = (rm.to_vec_f64().unwrap(), rv.to_vec_f64().unwrap());
        compare_with_composed(
            "batch_norm2d eval",
            &leaves,
            |t| batch_norm2d(&t[0], Some(&t[1]), Some(&t[2]), Some(&rm), Some(&rv), false, 0.1, 1e-5),
            |t| batch_norm_composed(&t[0], Some(&t[1]), Some(&t[2]), Some((&rm, &rv)), 1e-5),
        );
        assert_eq!((rm.to_vec_f64().unwrap(), rv.to_vec_f64().unwrap()), before);
        // By the formula, elementwise.
        let y = batch_norm2d(&leaves[0], None, None, Some(&rm), Some(&rv), false, 0.1, 1e-3).unwrap();
        let (xv, yv) = (leaves[0].to_vec_f64().unwrap(), y.to_vec_f64().unwrap());
        for (i, (&xe, &ye)) in xv.iter().zip(&yv).enumerate() {
            let ch = i / 12 % 3;
            let want = (xe - before.0[ch]) / (before.1[ch] + 1e-3).sqrt();
            assert!((ye - want).abs() <= tol(dtype) * want.abs().max(1.0), "{dtype} {i}: {ye} vs {want}");
        }
    }
}

#[test]
fn running_buffers_may_be_views() {
    // Buffers that are strided views of a larger tensor are updated where the views point, nowhere else.
    let store = Tensor::zeros(&[2, 3], DType::F64, engine::Device::Cpu).unwrap();
    let col = |k: usize| crate::view::select(&store, 1, k).unwrap();
    let x = randn(&[4, 2, 3, 3], 30);
    no_grad(|| batch_norm2d(&x, None, None, Some(&col(0)), Some(&col(2)), true, 0.5, 1e-5)).unwrap();
    let s = store.to_vec_f64().unwrap();
    assert_eq!((s[1], s[4]), (0.0, 0.0));
    let means = crate::mean(&x, &[0, 2, 3], false).unwrap().to_vec_f64().unwrap();
    let vars = var(&x, &[0, 2, 3], 1, false).unwrap().to_vec_f64().unwrap();
    for ch in 0..2 {
        assert!((s[ch * 3] - 0.5 * means[ch]).abs() < 1e-14);
        assert!((s[ch * 3 + 2] - 0.5 * vars[ch]).abs() < 1e-14);
    }
}

#[test]
fn batch_norm_gradients_match_finite_differences() {
    let (x, w, b) = (randn(&[3, 2, 3, 4], 40), randn(&[4], 41), randn(&[4], 42));
    let view = |t: &Tensor| permute(t, &[0, 3, 1, 2]);
    let r = gradcheck("batch_norm2d training", &[x.clone(), w.clone(), b.clone()], |t| {
        batch_norm2d(&view(&t[0])?, Some(&t[1]), Some(&t[2]), None, None, true, 0.1, 1e-5)
    })
    .unwrap();
    assert!(r.passed(), "{r}");
    let r = gradcheck("batch_norm2d training no affine", std::slice::from_ref(&x), |t| {
        batch_norm2d(&narrow(&view(&t[0])?, 3, 1, 2)?, None, None, None, None, true, 0.1, 1e-5)
    })
    .unwrap();
    assert!(r.passed(), "{r}");
    let (rm, rv) = (randn(&[4], 43), rand(&[4], 0.5, 2.0, 44));
    let r = gradcheck("batch_norm2d eval", &[x, w, b], |t| {
        batch_norm2d(&view(&t[0])?, Some(&t[1]), Some(&t[2]), Some(&rm), Some(&rv), false, 0.1, 1e-5)
    })
    .unwrap();
    assert!(r.passed(), "{r}");
}

#[test]
fn batch_norm_bad_arguments_are_errors() {
    let x = randn(&[2, 3, 2, 2], 1);
    let (v3, v4) = (randn(&[3], 2), randn(&[4], 3));
    let cases: Vec<Result<Tensor>> = vec![
        batch_norm2d(&randn(&[2, 3, 4], 4), None, None, None, None, true, 0.1, 1e-5),
        batch_norm2d(&x, Some(&v4), None, None, None, true, 0.1, 1e-5),
        batch_norm2d(&x, None, Some(&v4), None, None, true, 0.1, 1e-5),
        batch_norm2d(&x, None, None, Some(&v3), None, true, 0.1, 1e-5),
        batch_norm2d(&x, None, None, Some(&v3), Some(&v4), true, 0.1, 1e-5),
        batch_norm2d(&x, None, None, None, None, false, 0.1, 1e-5),
        batch_norm2d(&randn(&[1, 3, 1, 1], 5), None, None, None, None, true, 0.1, 1e-5),
        batch_norm2d(&x, None, None, Some(&v3), Some(&v3.detach()), true, 1.5, 1e-5),
    ];
    for r in cases {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("batch_norm2d"), "{e}");
    }
    // One value per channel is fine in eval.
    let one = randn(&[1, 3, 1, 1], 6);
    assert!(batch_norm2d(&one, None, None, Some(&v3), Some(&rand(&[3], 0.5, 1.0, 7)), false, 0.1, 1e-5).is_ok());
}

// ---- CUDA against the CPU ------------------------------------------------------------------------------

#[test]
fn layer_norm_on_cuda_matches_the_cpu() {
    if engine::cuda::test_device_or_skip("layer_norm_on_cuda_matches_the_cpu").is_none() {
        return;
    }
    let view = |t: &Tensor| permute(t, &[1, 2, 0]);
    for dtype in [DType::F32, DType::F64] {
        // (B, N, C) = (2, 3, 7) stored as (C, B, N), as the CPU tests.
        let t = [randn_as(&[7, 2, 3], dtype, 50), randn_as(&[7], dtype, 51), randn_as(&[7], dtype, 52)];
        assert_cuda_matches_cpu("layer_norm affine permuted", &t, &[true; 3], |t| {
            layer_norm(&view(&t[0])?, Some(&t[1]), Some(&t[2]), 1e-5)
        });
        assert_cuda_matches_cpu("layer_norm plain", &t[..1], &[true], |t| layer_norm(&view(&t[0])?, None, None, 1e-6));
        assert_cuda_matches_cpu("layer_norm bias only", &[t[0].clone(), t[2].clone()], &[true; 2], |t| {
            layer_norm(&view(&t[0])?, None, Some(&t[1]), 1e-5)
        });
        // Only some gradients: the weight and bias of a frozen input, and the input alone.
        assert_cuda_matches_cpu("layer_norm frozen x", &t, &[false, true, true], |t| {
            layer_norm(&view(&t[0])?, Some(&t[1]), Some(&t[2]), 1e-5)
        });
        assert_cuda_matches_cpu("layer_norm frozen affine", &t, &[true, false, false], |t| {
            layer_norm(&view(&t[0])?, Some(&t[1]), Some(&t[2]), 1e-5)
        });
        // The weight as a strided view (column 0 of a (C, 2) tensor).
        let w2 = randn_as(&[7, 2], dtype, 53);
        assert_cuda_matches_cpu("layer_norm strided weight", &[t[0].clone(), w2], &[true; 2], |t| {
            layer_norm(&view(&t[0])?, Some(&crate::view::select(&t[1], 1, 0)?), None, 1e-5)
        });
        // Enough rows that every block of the backward walks several tiles, the last one partial.
        let t = [randn_as(&[2, 2201, 16], dtype, 54), randn_as(&[16], dtype, 55), randn_as(&[16], dtype, 56)];
        assert_cuda_matches_cpu("layer_norm many rows", &t, &[true; 3], |t| {
            layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5)
        });
        // Rows too long for the dweight/dbias accumulators in shared memory: they go to global memory.
        let t = [randn_as(&[5, 3100], dtype, 57), randn_as(&[3100], dtype, 58), randn_as(&[3100], dtype, 59)];
        assert_cuda_matches_cpu("layer_norm long rows", &t, &[true; 3], |t| {
            layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5)
        });
    }
}

#[test]
fn layer_norm_on_cuda_matches_the_cpu_on_rows_held_in_registers() {
    if engine::cuda::test_device_or_skip("layer_norm_on_cuda_matches_the_cpu_on_rows_held_in_registers").is_none() {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        // Row lengths of every register instance (f32: 1, 2, 4, 8 vectors a lane; f64 half the elements), groups
        // of fewer than 32 lanes with idle lanes (12, 20), and row counts that leave the last step and the last
        // block partial; the bench's 64 channels over enough rows for several blocks and steps a block.
        for (rows, d) in [(1, 64), (7, 4), (33, 12), (130, 20), (2049, 64), (301, 132), (65, 256), (9, 520), (5, 1024)]
        {
            let t = [
                add_scalar(&randn_as(&[rows, d], dtype, 80 + d as u64), 3.0).unwrap(),
                randn_as(&[d], dtype, 81),
                randn_as(&[d], dtype, 82),
            ];
            let what = format!("layer_norm ({rows}, {d})");
            assert_cuda_matches_cpu(&what, &t, &[true; 3], |t| layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5));
            assert_cuda_matches_cpu(&format!("{what} no affine"), &t[..1], &[true], |t| {
                layer_norm(&t[0], None, None, 1e-5)
            });
            assert_cuda_matches_cpu(&format!("{what} frozen x"), &t, &[false, true, true], |t| {
                layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5)
            });
            assert_cuda_matches_cpu(&format!("{what} bias only"), &[t[0].clone(), t[2].clone()], &[true, true], |t| {
                layer_norm(&t[0], None, Some(&t[1]), 1e-5)
            });
            assert_cuda_matches_cpu(&format!("{what} frozen affine"), &t, &[true, false, false], |t| {
                layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5)
            });
        }
        // Views starting a row into their buffer (16-byte aligned: the register kernels, from that offset), and
        // one element in (not aligned: the one-warp-per-row kernels).
        let t = [randn_as(&[10, 64], dtype, 83), randn_as(&[64], dtype, 84)];
        assert_cuda_matches_cpu("layer_norm rows offset by a row", &t, &[true; 2], |t| {
            layer_norm(&narrow(&t[0], 0, 1, 9)?, Some(&t[1]), None, 1e-5)
        });
        let t = [randn_as(&[2 * 64 + 1], dtype, 85), randn_as(&[64], dtype, 86)];
        assert_cuda_matches_cpu("layer_norm rows offset by an element", &t, &[true; 2], |t| {
            layer_norm(&reshape(&narrow(&t[0], 0, 1, 128)?, &[2, 64])?, Some(&t[1]), None, 1e-5)
        });
    }
}

#[test]
fn batch_norm_on_cuda_matches_the_cpu() {
    if engine::cuda::test_device_or_skip("batch_norm_on_cuda_matches_the_cpu").is_none() {
        return;
    }
    let view = |t: &Tensor| permute(t, &[0, 3, 1, 2]);
    for dtype in [DType::F32, DType::F64] {
        // (N, C, H, W) = (3, 4, 2, 5) stored channels-last, as the CPU tests.
        let t = [randn_as(&[3, 2, 5, 4], dtype, 60), randn_as(&[4], dtype, 61), randn_as(&[4], dtype, 62)];
        let train = |t: &[Tensor]| batch_norm2d(&view(&t[0])?, t.get(1), t.get(2), None, None, true, 0.1, 1e-5);
        assert_cuda_matches_cpu("batch_norm2d training", &t, &[true; 3], train);
        assert_cuda_matches_cpu("batch_norm2d training no affine", &t[..1], &[true], train);
        assert_cuda_matches_cpu("batch_norm2d training frozen x", &t, &[false, true, true], train);
        assert_cuda_matches_cpu("batch_norm2d training frozen affine", &t, &[true, false, false], train);
        // Channels of 3200 elements: each block loops over its channel several times.
        let big = [randn_as(&[8, 3, 20, 20], dtype, 63), randn_as(&[3], dtype, 64), randn_as(&[3], dtype, 65)];
        assert_cuda_matches_cpu("batch_norm2d training large", &big, &[true; 3], |t| {
            batch_norm2d(&t[0], Some(&t[1]), Some(&t[2]), None, None, true, 0.1, 1e-5)
        });
        // Eval: the running statistics, read as given (the variance as a strided view).
        let rm = randn_as(&[4], dtype, 66);
        let rv_store = Tensor::rand(&[4, 2], 0.5, 2.0, dtype, Device::Cpu, &mut engine::Generator::new(67)).unwrap();
        let eval = |t: &[Tensor]| {
            let (rm, rv) = (rm.to_device(t[0].device())?, rv_store.to_device(t[0].device())?);
            let rv = crate::view::select(&rv, 1, 1)?;
            batch_norm2d(&view(&t[0])?, t.get(1), t.get(2), Some(&rm), Some(&rv), false, 0.1, 1e-3)
        };
        assert_cuda_matches_cpu("batch_norm2d eval", &t, &[true; 3], eval);
        assert_cuda_matches_cpu("batch_norm2d eval no affine", &t[..1], &[true], eval);
        assert_cuda_matches_cpu("batch_norm2d eval frozen x", &t, &[false, true, true], eval);
    }
}

/// The shapes of the CUDA split-channel tests, each with its seed: few channels of many elements, cut into
/// slices (two launches): the MNIST step's (128, 8, 16, 16), odd planes longer than a block whose slices start
/// mid-plane, one channel, planes shorter than a block (7x7: a thread's step crosses several planes) and of one
/// element; then many small channels, or as many channels as a wave (one slice a channel: the fused kernels);
/// last, slices of several chunks of the statistics' loop (4096 elements a chunk), split and fused, the last
/// chunk partial.
const BN_SPLIT_SHAPES: [([usize; 4], u64); 9] = [
    ([128, 8, 16, 16], 600),
    ([64, 3, 37, 41], 610),
    ([5, 1, 3, 1000], 620),
    ([256, 4, 7, 7], 630),
    ([4099, 2, 1, 1], 640),
    ([2, 64, 7, 7], 650),
    ([16, 64, 8, 8], 660),
    ([2, 1200, 48, 48], 670),
    ([64, 64, 40, 40], 680),
];

#[test]
fn batch_norm_on_cuda_matches_the_cpu_on_split_channels() {
    if engine::cuda::test_device_or_skip("batch_norm_on_cuda_matches_the_cpu_on_split_channels").is_none() {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        for (shape, seed) in BN_SPLIT_SHAPES {
            let c = shape[1];
            // Values centred on 3 (std 1), so that a variance computed carelessly would cancel.
            let x = add_scalar(&randn_as(&shape, dtype, seed), 3.0).unwrap();
            let t = [x, randn_as(&[c], dtype, seed + 1), randn_as(&[c], dtype, seed + 2)];
            let what = format!("batch_norm2d {shape:?}");
            let train = |t: &[Tensor]| batch_norm2d(&t[0], t.get(1), t.get(2), None, None, true, 0.1, 1e-5);
            assert_cuda_matches_cpu(&format!("{what} training"), &t, &[true; 3], train);
            assert_cuda_matches_cpu(&format!("{what} training no affine"), &t[..1], &[true], train);
            assert_cuda_matches_cpu(&format!("{what} training frozen x"), &t, &[false, true, true], train);
            assert_cuda_matches_cpu(&format!("{what} training frozen affine"), &t, &[true, false, false], train);
            assert_cuda_matches_cpu(
                &format!("{what} training bias only"),
                &[t[0].clone(), t[2].clone()],
                &[true; 2],
                |t| batch_norm2d(&t[0], None, Some(&t[1]), None, None, true, 0.1, 1e-5),
            );
            // Eval: the running statistics; its backward takes the sums only for dw and db.
            let rm = randn_as(&[c], dtype, seed + 3);
            let rv = Tensor::rand(&[c], 0.5, 2.0, dtype, Device::Cpu, &mut engine::Generator::new(seed + 4)).unwrap();
            let eval = |t: &[Tensor]| {
                let (rm, rv) = (rm.to_device(t[0].device())?, rv.to_device(t[0].device())?);
                batch_norm2d(&t[0], t.get(1), t.get(2), Some(&rm), Some(&rv), false, 0.1, 1e-5)
            };
            assert_cuda_matches_cpu(&format!("{what} eval"), &t, &[true; 3], eval);
            assert_cuda_matches_cpu(&format!("{what} eval no affine"), &t[..1], &[true], eval);
            assert_cuda_matches_cpu(&format!("{what} eval frozen x"), &t, &[false, true, true], eval);
        }
    }
}

/// The split kernels add their partials in a fixed order: the same inputs give the same bits, run after run.
#[test]
fn batch_norm_on_cuda_is_deterministic() {
    if engine::cuda::test_device_or_skip("batch_norm_on_cuda_is_deterministic").is_none() {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        for (shape, seed) in BN_SPLIT_SHAPES {
            let c = shape[1];
            let leaves =
                [randn_as(&shape, dtype, seed), randn_as(&[c], dtype, seed + 1), randn_as(&[c], dtype, seed + 2)];
            let g = randn_as(&shape, dtype, seed + 5).to_device(Device::Cuda(0)).unwrap();
            let run = || {
                let t: Vec<Tensor> = leaves
                    .iter()
                    .map(|l| l.to_device(Device::Cuda(0)).unwrap().detach().requires_grad_(true).unwrap())
                    .collect();
                let y = batch_norm2d(&t[0], Some(&t[1]), Some(&t[2]), None, None, true, 0.1, 1e-5).unwrap();
                y.backward_with(&g).unwrap();
                let mut out = vec![y.to_vec_f64().unwrap()];
                out.extend(t.iter().map(|l| l.grad().unwrap().to_vec_f64().unwrap()));
                out
            };
            let (a, b) = (run(), run());
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                let same = a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype} {shape:?}: part {i} (y, dx, dw, db) differs between two runs");
            }
        }
    }
}

#[test]
fn batch_norm_on_cuda_updates_the_running_stats_as_the_cpu() {
    if engine::cuda::test_device_or_skip("batch_norm_on_cuda_updates_the_running_stats_as_the_cpu").is_none() {
        return;
    }
    // A small shape (the fused kernel), and channels split into slices (the two-launch kernels): the variance
    // combined from the slices' partials feeds the running variance.
    for (shape, (dtype, tol)) in [[4, 3, 5, 2], [128, 8, 16, 16], [64, 3, 37, 41]]
        .into_iter()
        .flat_map(|s| [(DType::F32, 1e-6), (DType::F64, 1e-14)].map(|d| (s, d)))
    {
        let c = shape[1];
        let x = add_scalar(&randn_as(&shape, dtype, 70), 2.0).unwrap();
        let rm = randn_as(&[c], dtype, 71);
        let rv = Tensor::rand(&[c], 0.5, 2.0, dtype, Device::Cpu, &mut engine::Generator::new(72)).unwrap();
        let store = randn_as(&[c, 4], dtype, 73);
        let run = |device: Device| {
            // Contiguous buffers, and buffers that are strided views of one tensor (columns 0 and 2).
            let (x, rm, rv, store) = (
                x.to_device(device).unwrap(),
                rm.to_device(device).unwrap(),
                rv.to_device(device).unwrap(),
                store.to_device(device).unwrap(),
            );
            let col = |k: usize| crate::view::select(&store, 1, k).unwrap();
            no_grad(|| batch_norm2d(&x, None, None, Some(&rm), Some(&rv), true, 0.1, 1e-5)).unwrap();
            no_grad(|| batch_norm2d(&x, None, None, Some(&col(0)), Some(&col(2)), true, 0.3, 1e-5)).unwrap();
            [rm.to_vec_f64().unwrap(), rv.to_vec_f64().unwrap(), store.to_vec_f64().unwrap()]
        };
        let (gpu, cpu) = (run(Device::Cuda(0)), run(Device::Cpu));
        for (what, (a, b)) in ["running_mean", "running_var", "view buffers"].iter().zip(gpu.iter().zip(&cpu)) {
            assert_close(a, b, tol, &format!("{dtype} {shape:?} {what}"));
        }
    }
}

/// On the CPU a channels-last x is normalised in its own layout: y (and dx) channels-last, values those of
/// the contiguous kernel to rounding.
#[test]
fn batch_norm_keeps_a_channels_last_layout() {
    for training in [true, false] {
        let leaf = randn(&[3, 4, 5, 6], 60).requires_grad_(true).unwrap(); // (N, H, W, C) memory
        let x = permute(&leaf, &[0, 3, 1, 2]).unwrap();
        let plain = x.detach().contiguous().unwrap().requires_grad_(true).unwrap();
        let (w, b, rm, rv) = (randn(&[6], 61), randn(&[6], 62), randn(&[6], 63), rand(&[6], 0.5, 2.0, 64));
        let run = |x: &Tensor| batch_norm2d(x, Some(&w), Some(&b), Some(&rm), Some(&rv), training, 0.0, 1e-5);
        let (y, want) = (run(&x).unwrap(), run(&plain).unwrap());
        assert!(crate::util::is_channels_last(y.layout()) && !y.is_contiguous());
        assert_close(&y.to_vec_f64().unwrap(), &want.to_vec_f64().unwrap(), 1e-12, "y");
        let g = randn(&[3, 6, 4, 5], 65);
        y.backward_with(&g).unwrap();
        want.backward_with(&g).unwrap();
        let dx = permute(&leaf.grad().unwrap(), &[0, 3, 1, 2]).unwrap();
        assert_close(&dx.to_vec_f64().unwrap(), &plain.grad().unwrap().to_vec_f64().unwrap(), 1e-12, "dx");
    }
}

/// x's gradient when x meets its layer norm again in a residual, `x + LN(x) c` (the residual's gradient is
/// pending when the norm's backward runs: on CUDA the kernel adds it as it stores dx), and the same sum formed
/// by hand from a graph without the residual: the cotangent plus the norm's own gradient, one addition.
fn layer_norm_residual_grads(device: Device, dtype: DType, rows: usize, d: usize) -> (Vec<u64>, Vec<u64>) {
    let on = |t: Tensor| t.to_device(device).unwrap();
    let (xs, ws, bs) = (randn_as(&[rows, d], dtype, 701), randn_as(&[d], dtype, 702), randn_as(&[d], dtype, 703));
    let (c, cot) = (on(randn_as(&[rows, d], dtype, 704)), on(randn_as(&[rows, d], dtype, 705)));
    let (w, b) = (on(ws), on(bs));
    let x = on(xs.clone()).detach().requires_grad_(true).unwrap();
    let out = add(&x, &mul(&layer_norm(&x, Some(&w), Some(&b), 1e-5).unwrap(), &c).unwrap()).unwrap();
    out.backward_with(&cot).unwrap();
    let fused = bits(&x.grad().unwrap().to_device(Device::Cpu).unwrap());
    let x2 = on(xs).detach().requires_grad_(true).unwrap(); // a leaf of its own (to_device to its device is x)
    mul(&layer_norm(&x2, Some(&w), Some(&b), 1e-5).unwrap(), &c).unwrap().backward_with(&cot).unwrap();
    let by_hand = cot.accumulate(&x2.grad().unwrap()).unwrap();
    (fused, bits(&by_hand.to_device(Device::Cpu).unwrap()))
}

#[test]
fn layer_norm_adds_a_pending_gradient_as_the_tape_would() {
    let (fused, by_hand) = layer_norm_residual_grads(Device::Cpu, DType::F64, 5, 7);
    assert_eq!(fused, by_hand);
}

#[test]
fn layer_norm_on_cuda_adds_a_pending_gradient_bit_for_bit() {
    if engine::cuda::test_device_or_skip("layer_norm_on_cuda_adds_a_pending_gradient_bit_for_bit").is_none() {
        return;
    }
    // Rows held in registers (d a multiple of 4 up to 1024), and the general kernel (d = 1030, d = 7).
    for dtype in [DType::F32, DType::F64] {
        for (rows, d) in [(300, 64), (37, 256), (9, 1030), (50, 7)] {
            let (fused, by_hand) = layer_norm_residual_grads(Device::Cuda(0), dtype, rows, d);
            assert_eq!(fused, by_hand, "{dtype:?} ({rows}, {d})");
        }
    }
}
