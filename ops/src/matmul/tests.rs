use engine::{gradcheck, DType, Device, Error, Generator, Tensor};
use proptest::prelude::*;

use crate::testing::*;
use crate::view::{expand, narrow, permute, t};

use super::*;

/// Asserts `got` and `want` have the same shape and agree within `tol` everywhere.
fn assert_close(got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape(), want.shape());
    assert_eq!(got.dtype(), want.dtype());
    for (i, (x, y)) in got.to_vec_f64().unwrap().iter().zip(want.to_vec_f64().unwrap()).enumerate() {
        assert!((x - y).abs() <= tol, "element {i}: {x} vs {y} (tol {tol})");
    }
}

/// f64 products of N(0, 1) entries with k <= 100: gemm and the loop differ only by summation order.
const F64_TOL: f64 = 1e-12;

#[test]
fn matches_reference_for_plain_transposed_and_broadcast_batches() {
    let a = randn(&[5, 7], 1);
    let b = randn(&[7, 3], 2);
    assert_close(&matmul(&a, &b).unwrap(), &matmul_ref(&a, &b).unwrap(), F64_TOL);
    // Transposed and sliced operands go to gemm with their own strides.
    let at = t(&randn(&[7, 5], 3)).unwrap();
    let bs = narrow(&randn(&[7, 6], 4), 1, 2, 3).unwrap(); // (7, 3) with row stride 6
    assert!(!at.is_contiguous() && !bs.is_contiguous());
    assert_close(&matmul(&at, &bs).unwrap(), &matmul_ref(&at, &bs).unwrap(), F64_TOL);
    // (2, 1, 4, 3) @ (5, 3, 6) -> (2, 5, 4, 6): both operands broadcast along a batch dim.
    let a = randn(&[2, 1, 4, 3], 5);
    let b = randn(&[5, 3, 6], 6);
    let c = matmul(&a, &b).unwrap();
    assert_eq!(c.shape(), &[2, 5, 4, 6]);
    assert_close(&c, &matmul_ref(&a, &b).unwrap(), F64_TOL);
    // A matrix shared by every batch: folded into one product when the batch runs on from the rows of a
    // (contiguous, or batch of one), not when it does not (permuted batch dims, a row slice).
    let w = t(&randn(&[6, 4], 9)).unwrap();
    for a in [
        randn(&[3, 2, 5, 4], 10),
        randn(&[1, 5, 4], 11),
        permute(&randn(&[2, 3, 5, 4], 12), &[1, 0, 2, 3]).unwrap(),
        narrow(&randn(&[3, 7, 4], 13), 1, 1, 5).unwrap(),
    ] {
        assert_close(&matmul(&a, &w).unwrap(), &matmul_ref(&a, &w).unwrap(), F64_TOL);
    }
    // Batch dims permuted into place, matrices transposed.
    let a = permute(&randn(&[3, 4, 2], 7), &[2, 1, 0]).unwrap(); // (2, 4, 3)
    let b = permute(&randn(&[5, 2, 3], 8), &[1, 2, 0]).unwrap(); // (2, 3, 5)
    assert_close(&matmul(&a, &b).unwrap(), &matmul_ref(&a, &b).unwrap(), F64_TOL);
}

#[test]
fn reference_is_a_plain_triple_loop() {
    // Hand-computed, so the reference itself is checked: [[1, 2], [3, 4]] @ [[5], [6]] = [[17], [39]].
    let a = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
    let b = Tensor::from_vec(vec![5.0f64, 6.0], &[2, 1]).unwrap();
    assert_eq!(matmul_ref(&a, &b).unwrap().to_vec_f64().unwrap(), vec![17.0, 39.0]);
    assert_eq!(matmul(&a, &b).unwrap().to_vec_f64().unwrap(), vec![17.0, 39.0]);
}

#[test]
fn f32_matches_reference_within_the_summation_error_bound() {
    let mut g = Generator::new(9);
    let a = Tensor::randn(&[3, 33, 70], 0.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap();
    let b = Tensor::randn(&[70, 21], 0.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap();
    let (got, want) = (matmul(&a, &b).unwrap(), matmul_ref(&a, &b).unwrap());
    assert_eq!(got.dtype(), DType::F32);
    // Any order of k f32 additions is within k * eps * sum_p |a_ip b_pj| of the exact sum; the reference
    // is exact to f64 precision on the same f32 inputs, then rounded once to f32.
    let abs = |x: &Tensor| {
        Tensor::from_f64(
            &x.to_vec_f64().unwrap().iter().map(|v| v.abs()).collect::<Vec<_>>(),
            x.shape(),
            DType::F64,
            Device::Cpu,
        )
        .unwrap()
    };
    let bound = matmul_ref(&abs(&a), &abs(&b)).unwrap().to_vec_f64().unwrap();
    let (got, want) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    for ((x, y), s) in got.iter().zip(&want).zip(&bound) {
        let tol = 71.0 * f32::EPSILON as f64 * s;
        assert!((x - y).abs() <= tol, "{x} vs {y} (tol {tol})");
    }
}

/// The order `cpu::gemm_fixed_order` promises, written out: k cut into even blocks of at most
/// `GEMM_K_BLOCK`, each summed from zero by one fused multiply-add per step, then added to the output.
fn fixed_order_reference(a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
    let blocks = k.div_ceil(cpu::GEMM_K_BLOCK);
    let kc = k.div_ceil(blocks);
    let mut c = vec![0f32; m * n];
    for (i, j) in (0..m).flat_map(|i| (0..n).map(move |j| (i, j))) {
        for k0 in (0..k).step_by(kc) {
            let acc = (k0..k.min(k0 + kc)).fold(0f32, |acc, p| a[i * k + p].mul_add(b[p * n + j], acc));
            c[i * n + j] += acc;
        }
    }
    c
}

#[test]
fn cpu_products_sum_in_a_fixed_order_on_every_machine() {
    // Without the cut, `gemm` sums k > 512 in blocks sized from the detected L1 cache, so a training run's
    // bits differed between machines. k = 1300 is three blocks of 434 (gemm's own cut on a 512 machine).
    for (m, k, n) in [(5, 300, 7), (3, 1300, 9), (17, 1024, 4)] {
        let a = randn(&[m, k], 11).to_dtype(DType::F32).unwrap();
        let b = randn(&[k, n], 12).to_dtype(DType::F32).unwrap();
        let got: Vec<f32> = matmul(&a, &b).unwrap().to_vec_f64().unwrap().iter().map(|&x| x as f32).collect();
        let (av, bv): (Vec<f32>, Vec<f32>) = (
            a.to_vec_f64().unwrap().iter().map(|&x| x as f32).collect(),
            b.to_vec_f64().unwrap().iter().map(|&x| x as f32).collect(),
        );
        let want = fixed_order_reference(&av, &bv, (m, k, n));
        let same = got.iter().zip(&want).filter(|(x, y)| x.to_bits() == y.to_bits()).count();
        assert_eq!(same, m * n, "({m}, {k}, {n}): {same} of {} elements bitwise equal", m * n);
    }
}

#[test]
fn threaded_paths_match_reference() {
    // One product above the threading threshold (70 * 80 * 90 multiply-adds), split by gemm.
    let a = randn(&[70, 90], 10);
    let b = t(&randn(&[80, 90], 11)).unwrap();
    assert_close(&matmul(&a, &b).unwrap(), &matmul_ref(&a, &b).unwrap(), F64_TOL);
    // The right operand broadcast over the batch: one tall product, split over threads.
    let a = randn(&[600, 8, 8], 12);
    let b = randn(&[8, 8], 13);
    assert_close(&matmul(&a, &b).unwrap(), &matmul_ref(&a, &b).unwrap(), F64_TOL);
    // Many small products, one per thread, with the left operand broadcast over the batch.
    let (a, b) = (randn(&[8, 8], 12), randn(&[600, 8, 8], 13));
    assert_close(&matmul(&a, &b).unwrap(), &matmul_ref(&a, &b).unwrap(), F64_TOL);
}

#[test]
fn vectors_follow_torch_shapes() {
    let v = randn(&[4], 14);
    let m = randn(&[2, 4, 3], 15);
    let w = randn(&[3], 16);
    let cases = [
        (v.clone(), randn(&[4], 17), vec![]),     // dot
        (v.clone(), m.clone(), vec![2, 3]),       // vector @ batched matrix
        (m.clone(), w.clone(), vec![2, 4]),       // batched matrix @ vector
        (randn(&[5, 4], 18), v.clone(), vec![5]), // matrix @ vector
    ];
    for (a, b, shape) in cases {
        let c = matmul(&a, &b).unwrap();
        assert_eq!(c.shape(), shape.as_slice());
        assert_close(&c, &matmul_ref(&a, &b).unwrap(), F64_TOL);
    }
}

#[test]
fn empty_sizes_give_empty_or_zero_results() {
    // k = 0: every entry is an empty sum.
    let c = matmul(&randn(&[3, 0], 19), &randn(&[0, 2], 20)).unwrap();
    assert_eq!(c.shape(), &[3, 2]);
    assert_eq!(c.to_vec_f64().unwrap(), vec![0.0; 6]);
    assert_eq!(matmul(&randn(&[0, 4], 21), &randn(&[4, 2], 22)).unwrap().shape(), &[0, 2]);
    assert_eq!(matmul(&randn(&[0, 3, 4], 23), &randn(&[4, 2], 24)).unwrap().shape(), &[0, 3, 2]);
    assert_eq!(matmul(&randn(&[2, 1, 3, 4], 25), &randn(&[0, 4, 2], 26)).unwrap().shape(), &[2, 0, 3, 2]);
    assert_eq!(matmul(&randn(&[0], 27), &randn(&[0], 28)).unwrap().to_vec_f64().unwrap(), vec![0.0]);
    // The backward of a k = 0 product has the inputs' (empty) shapes.
    let a = randn(&[3, 0], 29).requires_grad_(true).unwrap();
    let b = randn(&[0, 2], 30).requires_grad_(true).unwrap();
    matmul(&a, &b).unwrap().backward_with(&randn(&[3, 2], 31)).unwrap();
    assert_eq!(a.grad().unwrap().shape(), &[3, 0]);
    assert_eq!(b.grad().unwrap().shape(), &[0, 2]);
}

#[test]
fn stride_zero_operands_are_read_in_place() {
    // Rows repeated by expand: every row of A is the same, so every row of C is too.
    let row = randn(&[1, 5], 32);
    let a = expand(&row, &[4, 5]).unwrap();
    assert_eq!(a.strides(), &[0, 1]);
    let b = randn(&[5, 3], 33);
    let c = matmul(&a, &b).unwrap();
    assert_close(&c, &matmul_ref(&a, &b).unwrap(), F64_TOL);
    let cv = c.to_vec_f64().unwrap();
    assert!(cv.chunks(3).all(|r| r == &cv[..3]));
}

#[test]
fn matmul_gradients_match_finite_differences() {
    let cases: Vec<(&str, Vec<Tensor>, Case)> = vec![
        ("2-D", vec![randn(&[3, 4], 40), randn(&[4, 5], 41)], ("mm", Box::new(|x| matmul(&x[0], &x[1])))),
        (
            "batched broadcast",
            vec![randn(&[2, 1, 3, 4], 42), randn(&[3, 4, 2], 43)],
            ("bmm", Box::new(|x| matmul(&x[0], &x[1]))),
        ),
        (
            "left operand shared over the batch",
            vec![randn(&[3, 4], 44), randn(&[2, 4, 2], 45)],
            ("bmm", Box::new(|x| matmul(&x[0], &x[1]))),
        ),
        (
            // A Linear layer: the batch folds into the rows, forward and backward.
            "right operand shared over the batch",
            vec![randn(&[2, 3, 4], 56), randn(&[5, 4], 57)],
            ("bmm", Box::new(|x| matmul(&x[0], &t(&x[1])?))),
        ),
        (
            // Batch dims that do not run on from the rows: no fold.
            "right operand shared, left permuted",
            vec![randn(&[3, 2, 2, 4], 58), randn(&[4, 5], 59)],
            ("bmm", Box::new(|x| matmul(&permute(&x[0], &[1, 0, 2, 3])?, &x[1]))),
        ),
        (
            "permuted and sliced",
            vec![randn(&[4, 2, 3], 46), randn(&[2, 6, 5], 47)],
            // (2, 3, 4) @ (2, 4, 5), the first a permutation, the second a slice of rows 1..5.
            ("bmm", Box::new(|x| matmul(&permute(&x[0], &[1, 2, 0])?, &narrow(&x[1], 1, 1, 4)?))),
        ),
        (
            "transposed",
            vec![randn(&[4, 3], 48), randn(&[5, 4], 49)],
            ("mm", Box::new(|x| matmul(&t(&x[0])?, &t(&x[1])?))),
        ),
        ("vector @ matrix", vec![randn(&[4], 50), randn(&[2, 4, 3], 51)], ("vm", Box::new(|x| matmul(&x[0], &x[1])))),
        ("matrix @ vector", vec![randn(&[3, 4], 52), randn(&[4], 53)], ("mv", Box::new(|x| matmul(&x[0], &x[1])))),
        ("dot", vec![randn(&[5], 54), randn(&[5], 55)], ("dot", Box::new(|x| matmul(&x[0], &x[1])))),
    ];
    for (what, inputs, (name, f)) in cases {
        let r = gradcheck(name, &inputs, f).unwrap();
        assert!(r.passed(), "{what}: {r}");
        assert!(r.max_abs_grad > 0.1, "{what}: {r}");
    }
}

#[test]
fn only_inputs_that_require_grad_get_one() {
    let a = randn(&[3, 4], 56).requires_grad_(true).unwrap();
    let b = randn(&[4, 2], 57);
    let g = randn(&[3, 2], 58);
    matmul(&a, &b).unwrap().backward_with(&g).unwrap();
    assert!(b.grad().is_none());
    // dA = g B^T, computed by the reference.
    assert_close(&a.grad().unwrap(), &matmul_ref(&g, &t(&b).unwrap()).unwrap(), F64_TOL);
}

#[test]
fn bad_operands_are_errors_naming_both_shapes() {
    let shape_err = |a: &[usize], b: &[usize]| matmul(&randn(a, 60), &randn(b, 61)).unwrap_err();
    match shape_err(&[2, 3], &[4, 5]) {
        Error::ShapeMismatch { op: "matmul", lhs, rhs } => assert_eq!((lhs, rhs), (vec![2, 3], vec![4, 5])),
        e => panic!("unexpected {e}"),
    }
    // The shapes in the message are the caller's, not the promoted ones.
    match shape_err(&[3], &[4, 5]) {
        Error::ShapeMismatch { lhs, rhs, .. } => assert_eq!((lhs, rhs), (vec![3], vec![4, 5])),
        e => panic!("unexpected {e}"),
    }
    match shape_err(&[2, 3, 4], &[3, 4, 5]) {
        Error::Broadcast { op: "matmul", lhs, rhs } => assert_eq!((lhs, rhs), (vec![2, 3, 4], vec![3, 4, 5])),
        e => panic!("unexpected {e}"),
    }
    assert!(matches!(shape_err(&[], &[3]), Error::InvalidArgument { op: "matmul", .. }));
    assert!(matches!(shape_err(&[3], &[]), Error::InvalidArgument { op: "matmul", .. }));
    let f32s = Tensor::zeros(&[3, 3], DType::F32, Device::Cpu).unwrap();
    assert!(matches!(matmul(&f32s, &randn(&[3, 3], 62)), Err(Error::DTypeMismatch { .. })));
    assert!(matmul_ref(&randn(&[2, 3], 63), &randn(&[2, 3], 64)).is_err());
}

/// A random product: operand shapes with broadcast batch dims, possibly vectors, possibly transposed.
#[derive(Debug, Clone)]
struct Product {
    batch: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    /// Per batch dim and operand: set that operand's dim to 1.
    ones: Vec<(bool, bool)>,
    /// Leading batch dims each operand leaves out.
    drop: (usize, usize),
    /// 0: matrix @ matrix, 1: vector @ matrix, 2: matrix @ vector, 3: vector @ vector.
    vectors: u8,
    transpose: (bool, bool),
    seed: u64,
}

fn product() -> impl Strategy<Value = Product> {
    (prop::collection::vec(0usize..4, 0..3), 0usize..6, 0usize..6, 0usize..6).prop_flat_map(|(batch, m, k, n)| {
        let r = batch.len();
        (
            prop::collection::vec((any::<bool>(), any::<bool>()), r),
            (0..=r, 0..=r),
            prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)],
            (any::<bool>(), any::<bool>()),
            any::<u64>(),
        )
            .prop_map(move |(ones, drop, vectors, transpose, seed)| Product {
                batch: batch.clone(),
                m,
                k,
                n,
                ones,
                drop,
                vectors,
                transpose,
                seed,
            })
    })
}

impl Product {
    /// Operand `which` (0: A, 1: B) of shape (..batch, rows, cols), or a vector of `rows`.
    fn operand(&self, which: usize, rows: usize, cols: usize, vector: bool) -> Tensor {
        let seed = self.seed.wrapping_add(which as u64);
        if vector {
            return randn(&[rows], seed);
        }
        let drop = if which == 0 { self.drop.0 } else { self.drop.1 };
        let mut shape: Vec<usize> = self.batch[drop..]
            .iter()
            .zip(&self.ones[drop..])
            .map(|(&d, &(oa, ob))| if (which == 0 && oa) || (which == 1 && ob) { 1 } else { d })
            .collect();
        let transposed = if which == 0 { self.transpose.0 } else { self.transpose.1 };
        if transposed {
            // Stored as (.., cols, rows) and viewed back as (.., rows, cols).
            shape.extend([cols, rows]);
            t(&randn(&shape, seed)).unwrap()
        } else {
            shape.extend([rows, cols]);
            randn(&shape, seed)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn matmul_matches_the_triple_loop_on_random_shapes(p in product()) {
        let a = p.operand(0, if p.vectors & 1 == 1 { p.k } else { p.m }, p.k, p.vectors & 1 == 1);
        let b = p.operand(1, p.k, p.n, p.vectors & 2 == 2);
        let c = matmul(&a, &b).unwrap();
        let want = matmul_ref(&a, &b).unwrap();
        prop_assert_eq!(c.shape(), want.shape());
        for (x, y) in c.to_vec_f64().unwrap().iter().zip(want.to_vec_f64().unwrap()) {
            prop_assert!((x - y).abs() <= F64_TOL, "{:?} @ {:?}: {} vs {}", a.shape(), b.shape(), x, y);
        }
    }
}

// ---- CUDA against the CPU (skipped without a device) -------------------------------------------------------
//
// The helpers are shared with the shape and optim families' CUDA tests.

pub(crate) fn to_cuda(t: &Tensor) -> Tensor {
    t.to_device(Device::Cuda(0)).unwrap()
}

/// ||got - want|| / ||want|| over all elements (0 when both are zero).
pub(crate) fn rel_error(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    assert_eq!(g.len(), w.len());
    let diff = g.iter().zip(&w).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let norm = w.iter().map(|y| y * y).sum::<f64>().sqrt();
    if diff == 0.0 {
        0.0
    } else {
        diff / norm
    }
}

/// cuBLAS and gemm add the k products in different orders: a few ulps apart.
pub(crate) fn cuda_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F64 => 1e-12,
    }
}

/// Runs `f` on the same fresh N(0, 1) inputs of `shapes` on the CPU and on CUDA (views are taken inside `f`,
/// on each device, so CUDA sees the strided layouts), backpropagates the same random cotangent, and compares
/// the outputs and every input's gradient, in f32 and f64.
pub(crate) fn assert_cuda_matches_cpu(
    what: &str,
    shapes: &[&[usize]],
    f: impl Fn(&[Tensor]) -> engine::Result<Tensor>,
) {
    for (seed, dtype) in [(1, DType::F32), (2, DType::F64)] {
        let mut g = Generator::new(seed);
        let base: Vec<Tensor> =
            shapes.iter().map(|s| Tensor::randn(s, 0.0, 1.0, dtype, Device::Cpu, &mut g).unwrap()).collect();
        let cpu: Vec<Tensor> = base.iter().map(|x| x.detach().requires_grad_(true).unwrap()).collect();
        let gpu: Vec<Tensor> = base.iter().map(|x| to_cuda(x).requires_grad_(true).unwrap()).collect();
        let y_cpu = f(&cpu).unwrap();
        let y_gpu = f(&gpu).unwrap_or_else(|e| panic!("{what} ({dtype}) on CUDA: {e}"));
        assert_eq!(y_gpu.device(), Device::Cuda(0), "{what}");
        assert_eq!(y_gpu.shape(), y_cpu.shape(), "{what}");
        let tol = cuda_tol(dtype);
        let err = rel_error(&y_gpu, &y_cpu);
        assert!(err <= tol, "{what} ({dtype}): output relative error {err:e}");
        let cot = Tensor::randn(y_cpu.shape(), 0.0, 1.0, dtype, Device::Cpu, &mut g).unwrap();
        y_cpu.backward_with(&cot).unwrap();
        y_gpu.backward_with(&to_cuda(&cot)).unwrap_or_else(|e| panic!("{what} ({dtype}) backward on CUDA: {e}"));
        for (i, (c, d)) in cpu.iter().zip(&gpu).enumerate() {
            let (gc, gd) = (c.grad().unwrap(), d.grad().unwrap());
            assert_eq!(gd.device(), Device::Cuda(0), "{what}: gradient {i}");
            let err = rel_error(&gd, &gc);
            assert!(err <= tol, "{what} ({dtype}): gradient {i} relative error {err:e}");
        }
    }
}

#[test]
fn cuda_matmul_matches_cpu_on_plain_transposed_and_sliced_operands() {
    if engine::cuda::test_device_or_skip("cuda_matmul_matches_cpu_on_plain_transposed_and_sliced_operands").is_none() {
        return;
    }
    assert_cuda_matches_cpu("2-D", &[&[5, 7], &[7, 3]], |x| matmul(&x[0], &x[1]));
    assert_cuda_matches_cpu("both transposed", &[&[7, 5], &[3, 7]], |x| matmul(&t(&x[0])?, &t(&x[1])?));
    // Row stride 9 with an offset; rows 2..9 of B, then columns 1..6 of those.
    assert_cuda_matches_cpu("sliced", &[&[6, 9], &[9, 8]], |x| {
        matmul(&narrow(&x[0], 1, 2, 7)?, &narrow(&narrow(&x[1], 0, 2, 7)?, 1, 1, 5)?)
    });
    // Transposed slices: unit row stride, leading dim 6 (A) and 8 (B).
    assert_cuda_matches_cpu("sliced then transposed", &[&[9, 6], &[5, 8]], |x| {
        matmul(&t(&narrow(&x[0], 0, 1, 7)?)?, &t(&narrow(&x[1], 1, 0, 7)?)?)
    });
    assert_cuda_matches_cpu("one row times one column", &[&[1, 6], &[6, 1]], |x| matmul(&x[0], &x[1]));
    // Stride-0 rows (A) and columns (B): copied before cuBLAS.
    assert_cuda_matches_cpu("expanded rows and columns", &[&[1, 5], &[5, 1]], |x| {
        matmul(&expand(&x[0], &[4, 5])?, &expand(&x[1], &[5, 3])?)
    });
}

#[test]
fn cuda_matmul_matches_cpu_on_batches_that_collapse_or_not() {
    if engine::cuda::test_device_or_skip("cuda_matmul_matches_cpu_on_batches_that_collapse_or_not").is_none() {
        return;
    }
    assert_cuda_matches_cpu("contiguous batch", &[&[3, 4, 5], &[3, 5, 2]], |x| matmul(&x[0], &x[1]));
    // One weight for the whole batch (stride 0), transposed as a Linear layer's.
    assert_cuda_matches_cpu("shared transposed weight", &[&[2, 3, 4, 5], &[6, 5]], |x| matmul(&x[0], &t(&x[1])?));
    // Rows sliced out of a wider tensor, one weight: still one tall product.
    assert_cuda_matches_cpu("row-sliced batch, shared weight", &[&[2, 4, 7], &[5, 3]], |x| {
        matmul(&narrow(&x[0], 2, 1, 5)?, &x[1])
    });
    // (2, 1) against (1, 3) batch dims: no single stride, one call per leading index.
    assert_cuda_matches_cpu("broadcast both ways", &[&[2, 1, 4, 3], &[3, 3, 6]], |x| matmul(&x[0], &x[1]));
    // Attention heads out of (B, T, H, D): q (B, H, T, D) @ k^T (B, H, D, T). B = 3 loops over B ...
    let attention = |x: &[Tensor]| matmul(&permute(&x[0], &[0, 2, 1, 3])?, &permute(&x[1], &[0, 2, 3, 1])?);
    assert_cuda_matches_cpu("heads, looped", &[&[3, 5, 2, 4], &[3, 6, 2, 4]], attention);
    // ... B = 12 would take more calls than copying q and k does.
    assert_cuda_matches_cpu("heads, copied", &[&[12, 5, 2, 4], &[12, 6, 2, 4]], attention);
    // Batch dims permuted into place, as in the CPU tests.
    assert_cuda_matches_cpu("permuted batch", &[&[3, 4, 2], &[5, 2, 3]], |x| {
        matmul(&permute(&x[0], &[2, 1, 0])?, &permute(&x[1], &[1, 2, 0])?)
    });
}

#[test]
fn cuda_matmul_keeps_torch_vector_shapes_and_empty_sizes() {
    if engine::cuda::test_device_or_skip("cuda_matmul_keeps_torch_vector_shapes_and_empty_sizes").is_none() {
        return;
    }
    assert_cuda_matches_cpu("vector @ batched matrix", &[&[4], &[2, 4, 3]], |x| matmul(&x[0], &x[1]));
    assert_cuda_matches_cpu("batched matrix @ vector", &[&[2, 4, 3], &[3]], |x| matmul(&x[0], &x[1]));
    assert_cuda_matches_cpu("dot", &[&[5], &[5]], |x| matmul(&x[0], &x[1]));
    // Strided vectors: a column (stride 3) on the left, a column of a transposed matrix on the right.
    assert_cuda_matches_cpu("strided vectors", &[&[4, 3], &[4, 5], &[2, 5]], |x| {
        let v = crate::view::select(&x[0], 1, 1)?;
        let w = crate::view::select(&t(&x[2])?, 1, 0)?;
        matmul(&matmul(&v, &x[1])?, &w)
    });
    // k = 0 is a fill with zeros; empty outputs launch nothing.
    assert_cuda_matches_cpu("k = 0", &[&[3, 0], &[0, 2]], |x| matmul(&x[0], &x[1]));
    assert_cuda_matches_cpu("empty batch", &[&[0, 3, 4], &[4, 2]], |x| matmul(&x[0], &x[1]));
    assert_cuda_matches_cpu("m = 0", &[&[0, 4], &[4, 2]], |x| matmul(&x[0], &x[1]));
}

/// Forward value and the gradients of (h, w, b) under a fixed cotangent, in f32 (where a different
/// summation order would show in the bits).
fn act_linear_run(fused: bool, act: crate::Unary, bias: bool) -> Vec<Vec<f64>> {
    let h = randn_as(&[2, 5, 6], DType::F32, 31).requires_grad_(true).unwrap();
    let w = randn_as(&[3, 6], DType::F32, 32).requires_grad_(true).unwrap();
    let b = randn_as(&[3], DType::F32, 33).requires_grad_(true).unwrap();
    let bias = bias.then_some(&b);
    let y = if fused {
        act_linear(&h, act, &w, bias).unwrap()
    } else {
        let p = matmul(&crate::unary(act, &h).unwrap(), &t(&w).unwrap()).unwrap();
        match bias {
            Some(b) => crate::add(&p, b).unwrap(),
            None => p,
        }
    };
    y.backward_with(&randn_as(y.shape(), DType::F32, 34)).unwrap();
    let mut out = vec![y.to_vec_f64().unwrap()];
    for x in [&h, &w] {
        out.push(x.grad().unwrap().to_vec_f64().unwrap());
    }
    if bias.is_some() {
        out.push(b.grad().unwrap().to_vec_f64().unwrap());
    }
    out
}

#[test]
fn act_linear_is_bitwise_the_composition_and_gradchecks() {
    for act in [crate::Unary::Gelu, crate::Unary::Silu, crate::Unary::Relu] {
        for bias in [true, false] {
            assert_eq!(act_linear_run(true, act, bias), act_linear_run(false, act, bias), "{act:?}, bias {bias}");
        }
    }
    let h = randn(&[2, 3, 4], 41);
    let w = randn(&[5, 4], 42);
    let b = randn(&[5], 43);
    let r = gradcheck("act_linear", &[h, w, b], |x| act_linear(&x[0], crate::Unary::Gelu, &x[1], Some(&x[2]))).unwrap();
    assert!(r.passed(), "{r}");
}

#[test]
fn act_linear_bad_inputs_are_errors() {
    let (h, w) = (randn(&[2, 4], 1), randn(&[3, 4], 2));
    assert!(act_linear(&h, crate::Unary::Exp, &w, None).is_err(), "exp's derivative reads its output");
    assert!(act_linear(&h, crate::Unary::Gelu, &randn(&[3, 5], 3), None).is_err());
    assert!(act_linear(&h, crate::Unary::Gelu, &w, Some(&randn(&[4], 4))).is_err());
    assert!(act_linear(&randn(&[4], 5), crate::Unary::Gelu, &w, None).is_err());
    assert!(act_linear(&h, crate::Unary::Gelu, &randn(&[3, 4, 1], 6), None).is_err());
}

/// Forward value and the gradients of (x, gate, w, b) under a fixed cotangent, as bits. x is a transposed
/// view when `strided` (the saved x is then not contiguous).
fn gated_linear_run(fused: bool, dtype: DType, act: crate::Unary, bias: bool, strided: bool) -> Vec<Vec<u64>> {
    let x = if strided {
        randn_as(&[2, 6, 5], dtype, 51).requires_grad_(true).unwrap()
    } else {
        randn_as(&[2, 5, 6], dtype, 51).requires_grad_(true).unwrap()
    };
    let gate = randn_as(&[2, 5, 6], dtype, 52).requires_grad_(true).unwrap();
    let w = randn_as(&[3, 6], dtype, 53).requires_grad_(true).unwrap();
    let b = randn_as(&[3], dtype, 54).requires_grad_(true).unwrap();
    let xv = if strided { permute(&x, &[0, 2, 1]).unwrap() } else { x.clone() };
    let bias_arg = bias.then_some(&b);
    let y = if fused {
        gated_linear(&xv, &gate, act, &w, bias_arg).unwrap()
    } else {
        let p = crate::mul(&xv, &crate::unary(act, &gate).unwrap()).unwrap();
        let p = matmul(&p, &t(&w).unwrap()).unwrap();
        match bias_arg {
            Some(b) => crate::add(&p, b).unwrap(),
            None => p,
        }
    };
    y.backward_with(&randn_as(y.shape(), dtype, 55)).unwrap();
    let mut out = vec![bits(&y)];
    for p in [&x, &gate, &w] {
        out.push(bits(&p.grad().unwrap()));
    }
    if bias {
        out.push(bits(&b.grad().unwrap()));
    }
    out
}

#[test]
fn gated_linear_is_bitwise_the_composition_and_gradchecks() {
    for dtype in [DType::F32, DType::F64] {
        for act in [crate::Unary::Silu, crate::Unary::Gelu] {
            for (bias, strided) in [(true, false), (false, false), (true, true)] {
                assert_eq!(
                    gated_linear_run(true, dtype, act, bias, strided),
                    gated_linear_run(false, dtype, act, bias, strided),
                    "{dtype:?}, {act:?}, bias {bias}, strided {strided}"
                );
            }
        }
    }
    let (x, gate, w, b) = (randn(&[2, 3, 4], 61), randn(&[2, 3, 4], 62), randn(&[5, 4], 63), randn(&[5], 64));
    let r = gradcheck("gated_linear", &[x, gate, w, b], |x| {
        gated_linear(&x[0], &x[1], crate::Unary::Silu, &x[2], Some(&x[3]))
    })
    .unwrap();
    assert!(r.passed(), "{r}");
}

#[test]
fn gated_linear_bad_inputs_are_errors() {
    let (x, w) = (randn(&[2, 4], 1), randn(&[3, 4], 2));
    let silu = crate::Unary::Silu;
    assert!(gated_linear(&x, &x, crate::Unary::Exp, &w, None).is_err(), "exp's derivative reads its output");
    assert!(gated_linear(&x, &randn(&[1, 4], 3), silu, &w, None).is_err(), "no broadcasting of the gate");
    assert!(gated_linear(&x, &x, silu, &randn(&[3, 5], 3), None).is_err());
    assert!(gated_linear(&x, &x, silu, &w, Some(&randn(&[4], 4))).is_err());
    assert!(gated_linear(&randn(&[4], 5), &randn(&[4], 5), silu, &w, None).is_err());
    assert!(gated_linear(&x, &x, silu, &randn(&[3, 4, 1], 6), None).is_err());
    assert!(gated_linear(&x, &randn_as(&[2, 4], DType::F32, 7), silu, &w, None).is_err());
}

/// The outputs and the gradients of (x, LN weight, LN bias, every W_i and b_i) as bits, for `n_out` Linears
/// after one LayerNorm, fused or composed; x is a transposed view when `strided`.
fn layer_norm_linears_run(fused: bool, dtype: DType, n_out: usize, strided: bool) -> Vec<Vec<u64>> {
    let (b, n, d) = (2, 5, 8);
    let x = if strided { randn_as(&[b, d, n], dtype, 91) } else { randn_as(&[b, n, d], dtype, 91) };
    let x = x.requires_grad_(true).unwrap();
    let xv = if strided { permute(&x, &[0, 2, 1]).unwrap() } else { x.clone() };
    let (lw, lb) = (randn_as(&[d], dtype, 92), randn_as(&[d], dtype, 93));
    let (lw, lb) = (lw.requires_grad_(true).unwrap(), lb.requires_grad_(true).unwrap());
    // Linear i: (3 + i, d), the second one without bias.
    let params: Vec<(Tensor, Option<Tensor>)> = (0..n_out)
        .map(|i| {
            let w = randn_as(&[3 + i, d], dtype, 100 + i as u64).requires_grad_(true).unwrap();
            let bias = (i != 1).then(|| randn_as(&[3 + i], dtype, 110 + i as u64).requires_grad_(true).unwrap());
            (w, bias)
        })
        .collect();
    let linears: Vec<(&Tensor, Option<&Tensor>)> = params.iter().map(|(w, b)| (w, b.as_ref())).collect();
    let ys = if fused {
        layer_norm_linears(&xv, Some(&lw), Some(&lb), 1e-5, &linears).unwrap()
    } else {
        let normed = crate::layer_norm(&xv, Some(&lw), Some(&lb), 1e-5).unwrap();
        let linear = |(w, b): (&Tensor, Option<&Tensor>)| {
            let p = matmul(&normed, &t(w).unwrap()).unwrap();
            b.map_or(p.clone(), |b| crate::add(&p, b).unwrap())
        };
        linears.iter().map(|&l| linear(l)).collect()
    };
    let y = crate::concat(&ys, -1).unwrap();
    y.backward_with(&randn_as(y.shape(), dtype, 120)).unwrap();
    let mut out = vec![bits(&y), bits(&x.grad().unwrap()), bits(&lw.grad().unwrap()), bits(&lb.grad().unwrap())];
    for (w, b) in &params {
        out.push(bits(&w.grad().unwrap()));
        out.extend(b.as_ref().map(|b| bits(&b.grad().unwrap())));
    }
    out
}

#[test]
fn layer_norm_linears_is_bitwise_the_composition_and_gradchecks() {
    for dtype in [DType::F32, DType::F64] {
        for (n_out, strided) in [(1, false), (2, false), (3, false), (2, true)] {
            assert_eq!(
                layer_norm_linears_run(true, dtype, n_out, strided),
                layer_norm_linears_run(false, dtype, n_out, strided),
                "{dtype:?}, {n_out} Linears, strided {strided}"
            );
        }
    }
    let inputs = [
        randn(&[2, 3, 4], 131),
        randn(&[4], 132),
        randn(&[4], 133),
        randn(&[5, 4], 134),
        randn(&[5], 135),
        randn(&[2, 4], 136),
    ];
    let r = gradcheck("layer_norm_linears", &inputs, |x| {
        let ys = layer_norm_linears(&x[0], Some(&x[1]), Some(&x[2]), 1e-5, &[(&x[3], Some(&x[4])), (&x[5], None)])?;
        crate::concat(&ys, -1)
    })
    .unwrap();
    assert!(r.passed(), "{r}");
}

#[test]
fn layer_norm_linears_allows_frozen_weights_and_retained_graphs() {
    // A frozen second weight: only the first Linear reads t in backward, which must still free it, and the
    // frozen one gets no gradient.
    let x = randn(&[2, 3, 4], 1).requires_grad_(true).unwrap();
    let w1 = randn(&[5, 4], 2).requires_grad_(true).unwrap();
    let w2 = randn(&[2, 4], 3);
    let ys = layer_norm_linears(&x, None, None, 1e-5, &[(&w1, None), (&w2, None)]).unwrap();
    crate::concat(&ys, -1).unwrap().backward_with(&randn(&[2, 3, 7], 4)).unwrap();
    assert!(x.grad().is_some() && w1.grad().is_some() && w2.grad().is_none());
    // A retained graph recomputes t on its second pass and gives the same gradients again.
    let w3 = randn(&[3, 4], 5).requires_grad_(true).unwrap();
    let ys = layer_norm_linears(&x, None, None, 1e-5, &[(&w1, None), (&w3, None)]).unwrap();
    let y = crate::concat(&ys, -1).unwrap();
    let cot = randn(y.shape(), 6);
    y.backward_retain(&cot).unwrap();
    let first = w3.grad().unwrap().to_vec_f64().unwrap();
    y.backward_with(&cot).unwrap();
    let twice: Vec<f64> = first.iter().map(|v| 2.0 * v).collect();
    assert_eq!(w3.grad().unwrap().to_vec_f64().unwrap(), twice);
}

#[test]
fn layer_norm_linears_bad_inputs_are_errors() {
    let (x, w) = (randn(&[2, 4], 1), randn(&[3, 4], 2));
    assert!(layer_norm_linears(&x, None, None, 1e-5, &[]).is_err(), "no Linear");
    assert!(layer_norm_linears(&randn(&[4], 3), None, None, 1e-5, &[(&w, None)]).is_err());
    assert!(layer_norm_linears(&x, None, None, 1e-5, &[(&randn(&[3, 5], 4), None)]).is_err());
    assert!(layer_norm_linears(&x, None, None, 1e-5, &[(&randn(&[3, 4, 1], 4), None)]).is_err());
    assert!(layer_norm_linears(&x, None, None, 1e-5, &[(&w, Some(&randn(&[4], 5)))]).is_err());
    assert!(layer_norm_linears(&x, Some(&randn(&[3], 6)), None, 1e-5, &[(&w, None)]).is_err());
    assert!(layer_norm_linears(&x, None, None, 1e-5, &[(&randn_as(&[3, 4], DType::F32, 7), None)]).is_err());
}

// ---- linear ----------------------------------------------------------------------------------------------

/// The composition `linear` stands for.
fn linear_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> engine::Result<Tensor> {
    let p = matmul(x, &t(w)?)?;
    match b {
        Some(b) => crate::add(&p, b),
        None => Ok(p),
    }
}

/// Forward value and the gradients of (x, w, b) under a fixed random cotangent, fused or composed, for x
/// built by `view` from a stored tensor of `stored` shape.
fn linear_run(
    fused: bool,
    dtype: DType,
    stored: &[usize],
    view: &dyn Fn(&Tensor) -> engine::Result<Tensor>,
    (n, k): (usize, usize),
    bias: bool,
) -> Vec<Vec<f64>> {
    let x = randn_as(stored, dtype, 71).requires_grad_(true).unwrap();
    let w = randn_as(&[n, k], dtype, 72).requires_grad_(true).unwrap();
    let b = randn_as(&[n], dtype, 73).requires_grad_(true).unwrap();
    let bias = bias.then_some(&b);
    let xv = view(&x).unwrap();
    let y = if fused { linear(&xv, &w, bias).unwrap() } else { linear_composed(&xv, &w, bias).unwrap() };
    y.backward_with(&randn_as(y.shape(), dtype, 74)).unwrap();
    let mut out = vec![y.shape().iter().map(|&d| d as f64).collect(), y.to_vec_f64().unwrap()];
    for p in [&x, &w] {
        out.push(p.grad().unwrap().to_vec_f64().unwrap());
    }
    if bias.is_some() {
        out.push(b.grad().unwrap().to_vec_f64().unwrap());
    }
    out
}

#[test]
fn linear_is_bitwise_the_composition_on_the_cpu() {
    type View = Box<dyn Fn(&Tensor) -> engine::Result<Tensor>>;
    type LinearCase = (&'static str, Vec<usize>, View, (usize, usize));
    let cases: Vec<LinearCase> = vec![
        ("tokens", vec![2, 5, 6], Box::new(|x| Ok(x.clone())), (3, 6)),
        ("2-D, odd sizes", vec![7, 13], Box::new(|x| Ok(x.clone())), (9, 13)),
        ("one vector", vec![6], Box::new(|x| Ok(x.clone())), (4, 6)),
        ("permuted tokens", vec![5, 2, 6], Box::new(|x| permute(x, &[1, 0, 2])), (3, 6)),
        ("transposed 2-D", vec![6, 4], Box::new(t), (5, 6)),
        ("sliced features", vec![3, 4, 9], Box::new(|x| narrow(x, 2, 2, 6)), (3, 6)),
        // Above the CPU gemm's threading threshold.
        ("large", vec![4, 50, 70], Box::new(|x| Ok(x.clone())), (90, 70)),
    ];
    for dtype in [DType::F32, DType::F64] {
        for (what, stored, view, nk) in &cases {
            for bias in [true, false] {
                let fused = linear_run(true, dtype, stored, view.as_ref(), *nk, bias);
                let composed = linear_run(false, dtype, stored, view.as_ref(), *nk, bias);
                assert_eq!(fused, composed, "{what} ({dtype}), bias {bias}");
            }
        }
    }
    // Recorded as one node; nothing recorded without grad.
    let (x, w, b) = (randn(&[2, 3], 1).requires_grad_(true).unwrap(), randn(&[4, 3], 2), randn(&[4], 3));
    assert_eq!(linear(&x, &w, Some(&b)).unwrap().grad_fn(), Some("linear"));
    assert_eq!(linear(&x.detach(), &w, Some(&b)).unwrap().grad_fn(), None);
    assert_eq!(engine::no_grad(|| linear(&x, &w, None)).unwrap().grad_fn(), None);
}

/// Forward value and gradients of (x, w, b) for `linear_relu` or `linear(..).relu()`, as bits.
fn linear_relu_run(fused: bool, dtype: DType, x: &[usize], (n, k): (usize, usize), bias: bool) -> Vec<Vec<u64>> {
    let x = randn_as(x, dtype, 91).requires_grad_(true).unwrap();
    let w = randn_as(&[n, k], dtype, 92).requires_grad_(true).unwrap();
    let b = randn_as(&[n], dtype, 93).requires_grad_(true).unwrap();
    let bias = bias.then_some(&b);
    let y = if fused {
        linear_relu(&x, &w, bias).unwrap()
    } else {
        crate::unary(crate::Unary::Relu, &linear(&x, &w, bias).unwrap()).unwrap()
    };
    y.backward_with(&randn_as(y.shape(), dtype, 94)).unwrap();
    let bits = |t: &Tensor| t.to_vec_f64().unwrap().into_iter().map(f64::to_bits).collect::<Vec<_>>();
    let mut out = vec![bits(&y), bits(&x.grad().unwrap()), bits(&w.grad().unwrap())];
    if bias.is_some() {
        out.push(bits(&b.grad().unwrap()));
    }
    out
}

#[test]
fn linear_relu_is_bitwise_the_composition_on_the_cpu_and_gradchecks() {
    for dtype in [DType::F32, DType::F64] {
        for (x, nk) in [(vec![2, 5, 6], (3, 6)), (vec![7, 13], (9, 13)), (vec![4, 50, 70], (90, 70))] {
            for bias in [true, false] {
                let fused = linear_relu_run(true, dtype, &x, nk, bias);
                assert_eq!(fused, linear_relu_run(false, dtype, &x, nk, bias), "{x:?} ({dtype}), bias {bias}");
                // Not degenerate: some outputs cut to zero, some passed.
                let y: Vec<f64> = fused[0].iter().map(|&b| f64::from_bits(b)).collect();
                assert!(y.contains(&0.0) && y.iter().any(|&v| v > 0.0));
            }
        }
    }
    let r = gradcheck("linear_relu", &[randn(&[2, 3, 5], 95), randn(&[4, 5], 96), randn(&[4], 97)], |x| {
        linear_relu(&x[0], &x[1], Some(&x[2]))
    })
    .unwrap();
    assert!(r.passed() && r.max_abs_grad > 0.1, "{r}");
    let (x, w) = (randn(&[2, 4], 1), randn(&[3, 4], 2));
    assert!(linear_relu(&x, &randn(&[3, 5], 3), None).is_err());
    assert!(linear_relu(&x, &w, Some(&randn(&[4], 4))).is_err());
    let x = x.requires_grad_(true).unwrap();
    assert_eq!(linear_relu(&x, &w, None).unwrap().grad_fn(), Some("linear_relu"));
}

#[test]
fn linear_gradients_match_finite_differences() {
    let cases: Vec<(&str, Vec<Tensor>, Case)> = vec![
        (
            "tokens with bias",
            vec![randn(&[2, 3, 5], 80), randn(&[4, 5], 81), randn(&[4], 82)],
            ("linear", Box::new(|x| linear(&x[0], &x[1], Some(&x[2])))),
        ),
        (
            "2-D without bias",
            vec![randn(&[3, 5], 83), randn(&[4, 5], 84)],
            ("linear", Box::new(|x| linear(&x[0], &x[1], None))),
        ),
        (
            "vector, permuted input",
            vec![randn(&[5], 85), randn(&[3, 2, 5], 86), randn(&[7, 5], 87), randn(&[7], 88)],
            (
                "linear",
                Box::new(|x| {
                    let y = linear(&x[0], &x[2], Some(&x[3]))?;
                    crate::add(&y, &linear(&permute(&x[1], &[1, 0, 2])?, &x[2], Some(&x[3]))?)
                }),
            ),
        ),
    ];
    for (what, inputs, (name, f)) in cases {
        let r = gradcheck(name, &inputs, f).unwrap();
        assert!(r.passed(), "{what}: {r}");
        assert!(r.max_abs_grad > 0.1, "{what}: {r}");
    }
}

#[test]
fn linear_bad_inputs_are_errors() {
    let (x, w) = (randn(&[2, 4], 1), randn(&[3, 4], 2));
    assert!(linear(&x, &randn(&[3, 5], 3), None).is_err());
    assert!(linear(&x, &w, Some(&randn(&[4], 4))).is_err());
    assert!(linear(&randn(&[], 5), &w, None).is_err());
    assert!(linear(&x, &randn(&[3, 4, 1], 6), None).is_err());
    let f32s = Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap();
    assert!(matches!(linear(&x, &w, Some(&f32s)), Err(Error::DTypeMismatch { .. })));
}

#[test]
fn cuda_linear_matches_cpu() {
    if engine::cuda::test_device_or_skip("cuda_linear_matches_cpu").is_none() {
        return;
    }
    let _poison = engine::cuda::poison_new_allocations();
    // Fused (bias in the cuBLASLt epilogues) for every shape; without a bias the plain product.
    for (what, x, (n, k)) in [
        ("tokens", vec![2, 5, 6], (3, 6)),
        ("odd sizes", vec![3, 7, 13], (9, 13)),
        ("one row, one feature", vec![1, 1], (1, 1)),
        ("one vector", vec![6], (4, 6)),
        ("MILA-like", vec![2, 49, 64], (192, 64)),
        ("wide odd", vec![37, 129], (257, 129)),
    ] {
        let shapes: [&[usize]; 3] = [&x, &[n, k], &[n]];
        assert_cuda_matches_cpu(&format!("linear {what}"), &shapes, |x| linear(&x[0], &x[1], Some(&x[2])));
        assert_cuda_matches_cpu(&format!("linear {what}, no bias"), &shapes[..2], |x| linear(&x[0], &x[1], None));
    }
    // Non-contiguous inputs: copied contiguous first.
    assert_cuda_matches_cpu("linear, permuted tokens", &[&[5, 2, 6], &[3, 6], &[3]], |x| {
        linear(&permute(&x[0], &[1, 0, 2])?, &x[1], Some(&x[2]))
    });
    assert_cuda_matches_cpu("linear, transposed weight view", &[&[4, 7], &[7, 5], &[5]], |x| {
        linear(&x[0], &t(&x[1])?, Some(&x[2]))
    });
    // Row slices of x at an odd offset (4-byte aligned: the heuristic is asked for that alignment) and a bias
    // at an odd offset (not 16-byte aligned: the unfused fallback).
    assert_cuda_matches_cpu("linear, sliced x", &[&[3, 4, 9], &[5, 6], &[5]], |x| {
        linear(&narrow(&x[0], 2, 1, 6)?, &x[1], Some(&x[2]))
    });
    assert_cuda_matches_cpu("linear, offset bias", &[&[3, 4, 6], &[5, 6], &[8]], |x| {
        linear(&x[0], &x[1], Some(&narrow(&x[2], 0, 1, 5)?))
    });
    // The gradient arriving as an expanded (stride-0) view: the backward copies it contiguous.
    assert_cuda_matches_cpu("linear under a sum", &[&[2, 3, 6], &[4, 6], &[4]], |x| {
        crate::sum(&linear(&x[0], &x[1], Some(&x[2]))?, &[1], false)
    });
    // linear_relu: the ReLU in the epilogue with a bias, composed without.
    for (what, x, (n, k)) in [("tokens", vec![2, 5, 6], (3, 6)), ("MILA-like", vec![2, 49, 64], (512, 64))] {
        let shapes: [&[usize]; 3] = [&x, &[n, k], &[n]];
        assert_cuda_matches_cpu(&format!("linear_relu {what}"), &shapes, |x| linear_relu(&x[0], &x[1], Some(&x[2])));
        assert_cuda_matches_cpu(&format!("linear_relu {what}, no bias"), &shapes[..2], |x| {
            linear_relu(&x[0], &x[1], None)
        });
    }
    // act_linear's forward and backward take the same fused products.
    assert_cuda_matches_cpu("act_linear", &[&[2, 7, 13], &[9, 13], &[9]], |x| {
        act_linear(&x[0], crate::Unary::Gelu, &x[1], Some(&x[2]))
    });
    assert_cuda_matches_cpu("act_linear, no bias", &[&[2, 7, 13], &[9, 13]], |x| {
        act_linear(&x[0], crate::Unary::Silu, &x[1], None)
    });
}
