use engine::{gradcheck, Tensor};

use crate::testing::*;

use super::*;
use crate::view::{narrow, permute};

/// Slow reference: reduce a 3-D tensor over dim 1 by explicit loops.
fn sum_dim1_ref(x: &[f64], s: [usize; 3]) -> Vec<f64> {
    let mut out = vec![0.0; s[0] * s[2]];
    for i in 0..s[0] {
        for j in 0..s[1] {
            for k in 0..s[2] {
                out[i * s[2] + k] += x[(i * s[1] + j) * s[2] + k];
            }
        }
    }
    out
}

#[test]
fn sum_and_max_match_loops() {
    let x = randn(&[3, 5, 4], 1);
    let xv = x.to_vec_f64().unwrap();
    let s = sum(&x, &[1], false).unwrap();
    assert_eq!(s.shape(), &[3, 4]);
    let want = sum_dim1_ref(&xv, [3, 5, 4]);
    for (a, b) in s.to_vec_f64().unwrap().iter().zip(&want) {
        assert!((a - b).abs() < 1e-12);
    }
    let m = max(&x, &[0, -1], true).unwrap();
    assert_eq!(m.shape(), &[1, 5, 1]);
    let mv = m.to_vec_f64().unwrap();
    for (j, &got) in mv.iter().enumerate() {
        let want =
            (0..3).flat_map(|i| (0..4).map(move |k| (i * 5 + j) * 4 + k)).map(|o| xv[o]).fold(f64::MIN, f64::max);
        assert_eq!(got, want);
    }
    assert_eq!(sum_all(&x).unwrap().shape(), &[] as &[usize]);
}

#[test]
fn f32_sums_accumulate_in_f64() {
    let n = 1 << 20;
    let x = Tensor::from_vec(vec![0.1f32; n], &[n]).unwrap();
    let s = sum_all(&x).unwrap().to_scalar().unwrap();
    let exact = 0.1f32 as f64 * n as f64;
    assert!((s - exact).abs() / exact < 1e-7, "{s} vs {exact}");
}

#[test]
fn reduce_gradients_match_finite_differences() {
    let x = randn(&[3, 4, 5], 2);
    let cases: Vec<Case> = vec![
        ("sum(1)", Box::new(|x| sum(&x[0], &[1], false))),
        ("sum(0,2,keepdim)", Box::new(|x| sum(&x[0], &[0, -1], true))),
        ("sum(permuted)", Box::new(|x| sum(&permute(&x[0], &[2, 0, 1])?, &[1], false))),
        ("max(2)", Box::new(|x| max(&x[0], &[2], false))),
        ("max(all) of a slice", Box::new(|x| max(&narrow(&x[0], 1, 1, 2)?, &[], false))),
        ("sum_to_shape", Box::new(|x| sum_to_shape(&x[0], &[4, 1]))),
    ];
    for (name, f) in cases {
        let r = gradcheck(name, std::slice::from_ref(&x), f).unwrap();
        assert!(r.passed(), "{r}");
    }
}

#[test]
fn max_splits_the_gradient_between_ties() {
    let x = Tensor::from_vec(vec![1.0f64, 3.0, 3.0, 2.0], &[4]).unwrap().requires_grad_(true).unwrap();
    max(&x, &[0], false).unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f64().unwrap(), vec![0.0, 0.5, 0.5, 0.0]);
}

#[test]
fn bad_dims_are_errors() {
    let x = randn(&[2, 3], 3);
    assert!(sum(&x, &[2], false).is_err());
    assert!(max(&x, &[-3], false).is_err());
    assert!(max(&Tensor::from_vec(Vec::<f64>::new(), &[0]).unwrap(), &[], false).is_err());
}

#[test]
fn leading_dims_reduce_by_columns() {
    // (6, 4, 300) contiguous, reduced over the two leading dims: the column path, large enough to go parallel.
    let x = randn(&[6, 4, 300], 11);
    let xv = x.to_vec_f64().unwrap();
    let s = sum(&x, &[0, 1], false).unwrap().to_vec_f64().unwrap();
    let m = max(&x, &[0, 1], true).unwrap();
    assert_eq!(m.shape(), &[1, 1, 300]);
    let m = m.to_vec_f64().unwrap();
    for c in 0..300 {
        let col: Vec<f64> = (0..24).map(|r| xv[r * 300 + c]).collect();
        assert!((s[c] - col.iter().sum::<f64>()).abs() < 1e-12);
        assert_eq!(m[c], col.iter().cloned().fold(f64::MIN, f64::max));
    }
    let small = randn(&[3, 4], 12);
    for (name, keep) in [("sum(0)", false), ("max(0)", true)] {
        let r = gradcheck(name, std::slice::from_ref(&small), |x| {
            if keep {
                max(&x[0], &[0], true)
            } else {
                sum(&x[0], &[0], false)
            }
        })
        .unwrap();
        assert!(r.passed(), "{r}");
    }
}

/// The CUDA launch plan, without a device: which reductions the contiguous-rows kernels take (the permuted
/// input is contiguous), and how rows are spread over warps and blocks.
#[test]
fn cuda_reductions_pick_the_row_kernels_for_contiguous_rows() {
    use super::cuda::{rows_launch, RowsLaunch};
    let rows_kernels = |shape: &[usize], layout: &engine::Layout, dims: &[isize]| {
        let plan = Plan::new("sum", shape, dims, false).unwrap();
        layout.permute(&plan.perm).unwrap().is_contiguous()
    };
    let c = |shape: &[usize]| engine::Layout::contiguous(shape);
    assert!(rows_kernels(&[64, 1 << 20], &c(&[64, 1 << 20]), &[]), "a full sum");
    assert!(rows_kernels(&[8, 16, 300], &c(&[8, 16, 300]), &[-1]), "a sum over the last dim");
    assert!(rows_kernels(&[8, 16, 300], &c(&[8, 16, 300]), &[1, 2]), "over the last two");
    let rows_from_3 = c(&[10, 300]).narrow(0, 3, 7).unwrap();
    assert!(rows_kernels(&[7, 300], &rows_from_3, &[1]), "rows with an offset (any alignment: heads are peeled)");
    assert!(!rows_kernels(&[8, 300], &c(&[8, 300]), &[0]), "a column sum (sum_to_shape of a bias) is strided");
    let t = c(&[300, 8]).permute(&[1, 0]).unwrap();
    assert!(!rows_kernels(&[8, 300], &t, &[1]), "rows of a transposed tensor are strided");
    let cols = c(&[8, 301]).narrow(1, 0, 300).unwrap();
    assert!(!rows_kernels(&[8, 300], &cols, &[]), "a narrowed inner dim is not contiguous");

    // H100: 132 SMs, 8 blocks of 256 threads each for both kernels.
    let wave = 132 * 8;
    // A full sum of 64M floats: one wave of blocks, each ~64K elements; the last one combines the partials.
    assert_eq!(rows_launch(1, 64 << 20, wave, wave), RowsLaunch::Block { splits: wave });
    // A smaller full sum is split into slices of at least 8192 elements.
    assert_eq!(rows_launch(1, 100_000, wave, wave), RowsLaunch::Block { splits: 13 });
    assert_eq!(rows_launch(1, 5_000, wave, wave), RowsLaunch::Block { splits: 1 });
    // 64 long rows share the wave: 17 slices each.
    assert_eq!(rows_launch(64, 1 << 20, wave, wave), RowsLaunch::Block { splits: 17 });
    // Short rows, few or many: a warp each, grid capped at one wave.
    assert_eq!(rows_launch(4096, 300, wave, wave), RowsLaunch::Warp { blocks: 512 });
    assert_eq!(rows_launch(1 << 20, 64, wave, wave), RowsLaunch::Warp { blocks: wave });
    assert_eq!(rows_launch(3, 1, wave, wave), RowsLaunch::Warp { blocks: 1 });
    // Long rows, enough of them for a warp each on every warp slot of a wave.
    assert_eq!(rows_launch(8 * wave, 1 << 14, wave, wave), RowsLaunch::Warp { blocks: wave });
    assert_eq!(rows_launch(8 * wave - 1, 1 << 14, wave, wave), RowsLaunch::Block { splits: 1 });
}

/// Which strided reductions take the columns kernel (a row-major (R, K) matrix summed down its columns), and
/// how its grid splits the rows.
#[test]
fn cuda_reductions_pick_the_columns_kernel_for_leading_reduced_dims() {
    use super::cuda::{cols_launch, is_columns};
    let columns = |shape: &[usize], layout: &engine::Layout, dims: &[isize]| {
        let plan = Plan::new("sum", shape, dims, false).unwrap();
        let lx = layout.permute(&plan.perm).unwrap();
        !lx.is_contiguous() && is_columns(&lx, plan.out_shape.iter().product())
    };
    let c = |shape: &[usize]| engine::Layout::contiguous(shape);
    assert!(columns(&[8192, 16], &c(&[8192, 16]), &[0]), "a bias gradient");
    assert!(columns(&[128, 64, 16], &c(&[128, 64, 16]), &[0, 1]), "over the leading two dims");
    assert!(columns(&[128, 64, 16], &c(&[128, 64, 16]), &[0]), "over the first dim, keeping (64, 16)");
    assert!(columns(&[16, 64, 1, 24], &c(&[16, 64, 1, 24]), &[0, 1]), "size-1 dims are skipped");
    let from_3 = c(&[10, 300]).narrow(0, 3, 7).unwrap();
    assert!(columns(&[7, 300], &from_3, &[0]), "an offset view");
    assert!(!columns(&[8, 16, 300], &c(&[8, 16, 300]), &[0, 2]), "the kept dim between reduced ones");
    assert!(!columns(&[8, 300], &c(&[8, 300]), &[1]), "a row sum is the rows kernel's");
    let t = c(&[300, 8]).permute(&[1, 0]).unwrap();
    assert!(!columns(&[8, 300], &t, &[0]), "a transposed matrix's column sum reads rows");
    let cols = c(&[8, 301]).narrow(1, 0, 300).unwrap();
    assert!(!columns(&[8, 300], &cols, &[0]), "rows with a gap between them");
    assert!(!columns(&[300, 1], &c(&[300, 1]), &[0]), "one column is a contiguous row");

    let wave = 132 * 8;
    // 16 columns of 8192 rows: one block across, the rows in 128 slices of 64.
    assert_eq!(cols_launch(8192, 16, wave), (1, 128));
    // Enough columns for a wave: no split.
    assert_eq!(cols_launch(8192, 32 * wave, wave), (wave, 1));
    // Few rows: one slice.
    assert_eq!(cols_launch(3, 5, wave), (1, 1));
    // 4097 columns: 129 blocks across, 9 slices (a wave of 1056 blocks).
    assert_eq!(cols_launch(64, 4097, wave), (129, 1));
    assert_eq!(cols_launch(100_000, 4097, wave), (129, 9));
}
