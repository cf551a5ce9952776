use engine::{gradcheck_with, DType, Device, GradcheckOptions, Tensor};

use super::*;
use crate::conv::tests::assert_cuda_matches_cpu;
use crate::testing::*;
use crate::view::{narrow, permute};

const BASE: f64 = 10000.0;
const EPS: f64 = 1e-6;

/// (B, H, W, C, heads): N = 1 on a 1 x 1 grid, one head, non-square grids, head widths 2 to 32, some not
/// powers of two.
const SHAPES: [(usize, usize, usize, usize, usize); 7] = [
    (2, 3, 5, 8, 2),
    (1, 1, 1, 4, 1),
    (3, 4, 4, 16, 1),
    (2, 2, 7, 12, 3),
    (1, 6, 2, 24, 2),
    (2, 7, 7, 64, 2),
    (1, 1, 6, 8, 4),
];

/// qk (B, N, 2C) stored (B, 2C, N) and seen transposed, v (B, N, C) cut from a wider (B, N, C + 3): both
/// non-contiguous, as a caller may hand them over.
fn operands(b: usize, n: usize, c: usize, dtype: DType, seed: u64) -> (Tensor, Tensor) {
    let qk = randn_as(&[b, 2 * c, n], dtype, seed);
    let v = randn_as(&[b, n, c + 3], dtype, seed + 1);
    (qk, v)
}

fn views(t: &[Tensor], c: usize) -> engine::Result<(Tensor, Tensor)> {
    Ok((permute(&t[0], &[0, 2, 1])?, narrow(&t[1], 2, 1, c)?))
}

/// `linear_attention` or `linear_attention_ref`.
type Attention = fn(&Tensor, &Tensor, (usize, usize), usize, f64, f64) -> engine::Result<Tensor>;

/// A call that must fail: qk, v, grid, heads, rope base, z_eps and a word the error must contain.
type BadCall = (Tensor, Tensor, (usize, usize), usize, f64, f64, &'static str);

/// The output and the gradients of qk and v for a random cotangent, by `f`.
fn run(f: Attention, leaves: &[Tensor], (h, w, c, heads): (usize, usize, usize, usize)) -> Vec<Vec<f64>> {
    let leaves: Vec<Tensor> = leaves.iter().map(|t| t.detach().requires_grad_(true).unwrap()).collect();
    let (qk, v) = views(&leaves, c).unwrap();
    let y = f(&qk, &v, (h, w), heads, BASE, EPS).unwrap();
    let cot = randn_as(y.shape(), y.dtype(), 99);
    y.backward_with(&cot).unwrap();
    let mut out = vec![y.to_vec_f64().unwrap()];
    out.extend(leaves.iter().map(|t| t.grad().unwrap().to_vec_f64().unwrap()));
    out
}

#[test]
fn fused_matches_the_composition_forward_and_backward() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for (i, &(b, h, w, c, heads)) in SHAPES.iter().enumerate() {
            let (qk, v) = operands(b, h * w, c, dtype, 10 + i as u64);
            let fused = run(linear_attention, &[qk.clone(), v.clone()], (h, w, c, heads));
            let want = run(linear_attention_ref, &[qk, v], (h, w, c, heads));
            for (part, (a, e)) in ["out", "dqk", "dv"].iter().zip(fused.iter().zip(&want)) {
                assert_close(a, e, tol, &format!("{dtype} {b}x{h}x{w}x{c} heads {heads}: {part}"));
            }
        }
    }
}

#[test]
fn fused_gradients_match_finite_differences() {
    // phi and 1 / (q . kmean + eps) are smooth (elu's kink at 0 has matching one-sided slopes 1 and e^0):
    // the step near cbrt(f64 epsilon) balances truncation and roundoff.
    let opts = GradcheckOptions { eps: 1e-5, ..Default::default() };
    for (i, &(b, h, w, c, heads)) in
        [(2, 2, 3, 8, 2), (1, 1, 1, 4, 1), (1, 3, 2, 12, 3), (2, 1, 4, 8, 1), (1, 2, 2, 16, 4)].iter().enumerate()
    {
        let (qk, v) = operands(b, h * w, c, DType::F64, 40 + i as u64);
        let r = gradcheck_with("linear_attention", &[qk, v], opts, |t| {
            let (qk, v) = views(t, c)?;
            linear_attention(&qk, &v, (h, w), heads, BASE, EPS)
        })
        .unwrap();
        assert!(r.passed(), "{b}x{h}x{w}x{c} heads {heads}: {r}");
        assert!(r.max_abs_grad > 0.01, "{r}");
    }
}

#[test]
fn fused_forward_matches_the_definition() {
    // One token: RoPE is the identity at (0, 0), kmean = k and kv = k^T v, so per head
    // out = (q . k) v / (q . k + eps).
    let (qk, v) = (randn(&[1, 1, 8], 1), randn(&[1, 1, 4], 2));
    let y = linear_attention(&qk, &v, (1, 1), 2, BASE, EPS).unwrap().to_vec_f64().unwrap();
    let (a, vv) = (qk.to_vec_f64().unwrap(), v.to_vec_f64().unwrap());
    let phi = |x: f64| if x > 0.0 { x + 1.0 } else { x.exp_m1() + 1.0 };
    for h in 0..2 {
        let q: Vec<f64> = (0..2).map(|j| phi(a[2 * h + j])).collect();
        let k: Vec<f64> = (0..2).map(|j| phi(a[4 + 2 * h + j])).collect();
        let qk_dot = q[0] * k[0] + q[1] * k[1];
        for e in 0..2 {
            let want = qk_dot * vv[2 * h + e] / (qk_dot + EPS);
            assert!((y[2 * h + e] - want).abs() < 1e-14, "head {h} channel {e}: {} vs {want}", y[2 * h + e]);
        }
    }
}

#[test]
fn fused_saves_only_the_small_results() {
    // No graph without gradients; with one, the node keeps qk and v themselves (already contiguous: no copy).
    let (qk, v) = (randn(&[2, 6, 16], 3), randn(&[2, 6, 8], 4));
    let y = linear_attention(&qk, &v, (2, 3), 2, BASE, EPS).unwrap();
    assert!(!y.requires_grad());
    let (qk, v) = (qk.requires_grad_(true).unwrap(), v.requires_grad_(true).unwrap());
    let y = linear_attention(&qk, &v, (2, 3), 2, BASE, EPS).unwrap();
    assert!(y.requires_grad());
    crate::sum_all(&y).unwrap().backward().unwrap();
    assert_eq!(qk.grad().unwrap().shape(), [2, 6, 16]);
    assert_eq!(v.grad().unwrap().shape(), [2, 6, 8]);
}

#[test]
fn fused_bad_arguments_are_errors() {
    let (qk, v) = (randn(&[2, 6, 16], 1), randn(&[2, 6, 8], 2));
    let cases: Vec<BadCall> = vec![
        (qk.clone(), v.clone(), (2, 4), 2, BASE, EPS, "grid"),
        (qk.clone(), v.clone(), (usize::MAX, 2), 2, BASE, EPS, "grid"),
        (qk.clone(), v.clone(), (2, 3), 3, BASE, EPS, "heads"),
        (qk.clone(), v.clone(), (2, 3), 0, BASE, EPS, "heads"),
        (qk.clone(), v.clone(), (2, 3), 8, BASE, EPS, "even"),
        (qk.clone(), v.clone(), (2, 3), 2, 0.0, EPS, "base"),
        (qk.clone(), v.clone(), (2, 3), 2, BASE, f64::NAN, "z_eps"),
        (randn(&[2, 6, 12], 3), randn(&[2, 6, 6], 4), (2, 3), 1, BASE, EPS, "multiple of 4"),
        (randn(&[2, 6, 15], 3), v.clone(), (2, 3), 2, BASE, EPS, "qk must be"),
        (randn(&[1, 6, 16], 3), v.clone(), (2, 3), 2, BASE, EPS, "qk must be"),
        (qk.clone(), randn(&[12, 8], 4), (2, 3), 2, BASE, EPS, "(B, N, C)"),
    ];
    for (qk, v, grid, heads, base, eps, what) in cases {
        let e = linear_attention(&qk, &v, grid, heads, base, eps).unwrap_err().to_string();
        assert!(e.contains("linear_attention") && e.contains(what), "{what}: {e}");
    }
    let e = linear_attention(&qk.to_dtype(DType::F32).unwrap(), &v, (2, 3), 2, BASE, EPS).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    // Empty batches and grids give empty results.
    let y = linear_attention(&randn(&[0, 6, 16], 5), &randn(&[0, 6, 8], 6), (2, 3), 2, BASE, EPS).unwrap();
    assert_eq!(y.shape(), [0, 6, 8]);
    let y = linear_attention(&randn(&[2, 0, 16], 5), &randn(&[2, 0, 8], 6), (0, 3), 2, BASE, EPS).unwrap();
    assert_eq!(y.shape(), [2, 0, 8]);
}

/// MLLA-T's four stages at batch 2, head width 32; then head widths 2 to 64 (padded to 8, 16, 32, 64 on
/// CUDA), grids of one row, and a batch whose (batch, head) pairs fill the device so that the tokens are not
/// sliced. (No single-token grid: there out = v up to eps, and dq, of size eps / (q . k)^2, is all roundoff.)
const CUDA_SHAPES: [(usize, usize, usize, usize, usize); 13] = [
    (2, 56, 56, 64, 2),
    (2, 28, 28, 128, 4),
    (2, 14, 14, 256, 8),
    (2, 7, 7, 512, 16),
    (2, 3, 5, 8, 2),
    (2, 1, 2, 4, 1),
    (3, 4, 4, 16, 1),
    (2, 2, 7, 12, 3),
    (1, 6, 2, 24, 2),
    (2, 5, 9, 64, 1),
    (1, 9, 10, 96, 2),
    (1, 1, 40, 8, 2),
    (64, 4, 4, 32, 16),
];

#[test]
fn linear_attention_on_cuda_matches_the_cpu() {
    if engine::cuda::test_device_or_skip("linear_attention_on_cuda_matches_the_cpu").is_none() {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        for (i, &(b, h, w, c, heads)) in CUDA_SHAPES.iter().enumerate() {
            let (qk, v) = operands(b, h * w, c, dtype, 70 + i as u64);
            assert_cuda_matches_cpu(
                &format!("linear_attention {b}x{h}x{w}x{c} heads {heads}"),
                &[qk, v],
                &[true, true],
                |t| {
                    let (qk, v) = views(t, c)?;
                    linear_attention(&qk, &v, (h, w), heads, BASE, EPS)
                },
            );
        }
    }
}

#[test]
fn linear_attention_on_cuda_is_deterministic_and_rejects_wide_heads() {
    let Some(_dev) = engine::cuda::test_device_or_skip("linear_attention_on_cuda_is_deterministic") else { return };
    let dev = Device::Cuda(0);
    let (qk, v) = operands(4, 28 * 28, 128, DType::F32, 5);
    let once = || {
        let qk = qk.to_device(dev).unwrap().requires_grad_(true).unwrap();
        let v = v.to_device(dev).unwrap().requires_grad_(true).unwrap();
        let (qkv, vv) = views(&[qk.clone(), v.clone()], 128).unwrap();
        let y = linear_attention(&qkv, &vv, (28, 28), 4, BASE, EPS).unwrap();
        y.backward_with(&randn_as(y.shape(), DType::F32, 6).to_device(dev).unwrap()).unwrap();
        [y, qk.grad().unwrap(), v.grad().unwrap()].map(|t| t.to_vec_f64().unwrap())
    };
    assert!(once() == once(), "bitwise equal runs");
    // d = 128 has no CUDA kernel: a clear error, not a wrong answer.
    let (qk, v) = (randn(&[1, 4, 256], 7).to_device(dev).unwrap(), randn(&[1, 4, 128], 8).to_device(dev).unwrap());
    let e = linear_attention(&qk, &v, (2, 2), 1, BASE, EPS).unwrap_err().to_string();
    assert!(e.contains("linear_attention") && e.contains("head width 128"), "{e}");
}

#[test]
fn cuda_plan_slices_tokens_into_whole_tiles() {
    let dims = |batch, tokens, heads, d| Dims {
        batch,
        tokens,
        channels: heads * d,
        heads,
        d,
        grid_h: 1,
        grid_w: tokens,
        eps: EPS,
    };
    // H200 (132 multiprocessors), f32 d32 waves: forward reduce 6 blocks a multiprocessor, out 4; backward
    // reduce 3, tokens 3 (the tiled kernel: one block a slice).
    let fwd = cuda::Waves { reduce: 6 * 132, tokens: 4 * 132 };
    let bwd = cuda::Waves { reduce: 3 * 132, tokens: 3 * 132 };
    // MLLA-T stage 1 at batch 64 (128 pairs): forward 4 slices of 25 tiles (512 blocks, one wave of out),
    // backward 3 of 33 (384 blocks: one wave of each kernel).
    let p = cuda::Plan::new(dims(64, 3136, 2, 32), 4, fwd, &[]).unwrap();
    assert_eq!(p, cuda::Plan { dp: 32, span: 25 * 32, slices: 4, threads: 256 });
    let p = cuda::Plan::new(dims(64, 3136, 2, 32), 4, bwd, &[]).unwrap();
    assert_eq!((p.span, p.slices), (33 * 32, 3));
    // Batch 128: 6 slices of 17 tiles.
    let p = cuda::Plan::new(dims(128, 3136, 2, 32), 4, fwd, &[]).unwrap();
    assert_eq!((p.span, p.slices), (17 * 32, 6));
    // Stage 4: enough pairs, one slice.
    let p = cuda::Plan::new(dims(128, 49, 16, 32), 4, fwd, &[]).unwrap();
    assert_eq!((p.slices, p.span), (1, 64));
    // Few pairs: many slices, never more than the tiles.
    let wide = cuda::Waves { reduce: 8 * 132, tokens: 8 * 132 };
    let p = cuda::Plan::new(dims(1, 100, 1, 8), 8, wide, &[]).unwrap();
    assert_eq!((p.dp, p.threads, p.slices), (8, 64, 2));
    for (d, dp) in [(2, 8), (8, 8), (12, 16), (32, 32), (34, 64), (64, 64)] {
        assert_eq!(cuda::padded_width(d, &[]).unwrap(), dp);
    }
    assert!(cuda::padded_width(66, &[]).is_err());
    // Tiles: 4 KiB, 2 KiB for f64 at width 64; whole thread blocks of rows.
    assert_eq!(cuda::tile_tokens(32, 4), 32);
    assert_eq!(cuda::tile_tokens(64, 8), 4);
    assert_eq!(cuda::tile_tokens(8, 4), 128);
    // The backward's token pass is tiled (one block a slice) where its tiles fit: f32 up to width 32, f64
    // up to 16 (linattn.cu's LaTok::TILED).
    for (dp, f32_tiled, f64_tiled) in [(8, true, true), (16, true, true), (32, true, false), (64, false, false)] {
        assert_eq!((cuda::tiled_tokens(dp, 4), cuda::tiled_tokens(dp, 8)), (f32_tiled, f64_tiled), "width {dp}");
    }
}

#[test]
#[ignore = "needs g++: compiles linattn.cu for the scan's CPU emulator (emu/) and runs its kernels (about a minute)"]
fn linattn_cuda_source_runs_on_the_emulator() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/linattn/emu");
    let exe = std::env::temp_dir().join(format!("mila_linattn_emu_{}", std::process::id()));
    let built = std::process::Command::new("g++")
        .args(["-std=c++17", "-O1", "-o"])
        .arg(&exe)
        .arg(format!("{dir}/harness.cpp"))
        .status()
        .expect("g++ runs");
    assert!(built.success(), "the emulator harness does not compile");
    let out = std::process::Command::new(&exe).output().expect("the emulator runs");
    let _ = std::fs::remove_file(&exe);
    let log = String::from_utf8_lossy(&out.stdout);
    println!("{log}");
    assert!(out.status.success(), "{log}{}", String::from_utf8_lossy(&out.stderr));
}
