use engine::{gradcheck, DType, Device, Tensor};

use crate::testing::*;

use super::*;
use crate::view::{narrow, permute};

fn all_unary() -> Vec<Unary> {
    vec![
        Unary::Neg,
        Unary::Exp,
        Unary::Log,
        Unary::Sqrt,
        Unary::Rsqrt,
        Unary::Abs,
        Unary::Relu,
        Unary::Gelu,
        Unary::Silu,
        Unary::Elu(0.7),
        Unary::Elu(-0.5),
        Unary::Softplus { beta: 1.5, threshold: 2.0 },
        Unary::Sigmoid,
        Unary::Tanh,
        Unary::Powf(2.5),
        Unary::AddScalar(0.3),
        Unary::MulScalar(-1.7),
        Unary::DivScalar(3.0),
        Unary::ClampMin(0.1),
        Unary::ClampMax(-0.2),
    ]
}

/// Ops defined only for positive inputs get inputs in [0.2, 2].
fn input_for(op: Unary, shape: &[usize], seed: u64) -> Tensor {
    match op {
        Unary::Log | Unary::Sqrt | Unary::Rsqrt | Unary::Powf(_) => rand(shape, 0.2, 2.0, seed),
        _ => rand(shape, -3.0, 3.0, seed),
    }
}

#[test]
fn unary_values_match_scalar_formulas() {
    let x = input_for(Unary::Gelu, &[50], 1);
    let xv = x.to_vec_f64().unwrap();
    let check = |op: Unary, f: &dyn Fn(f64) -> f64| {
        let y = unary(op, &x).unwrap().to_vec_f64().unwrap();
        for (a, &v) in y.iter().zip(&xv) {
            assert!((a - f(v)).abs() <= 1e-15 * f(v).abs().max(1.0), "{op:?}({v}) = {a}, want {}", f(v));
        }
    };
    check(Unary::Gelu, &|v| 0.5 * v * (1.0 + engine::Float::erf(v / 2f64.sqrt())));
    check(Unary::Silu, &|v| v / (1.0 + (-v).exp()));
    check(Unary::Elu(0.7), &|v| if v > 0.0 { v } else { 0.7 * (v.exp() - 1.0) });
    check(Unary::Softplus { beta: 1.5, threshold: 2.0 }, &|v| {
        if 1.5 * v > 2.0 {
            v
        } else {
            (1.5 * v).exp().ln_1p() / 1.5
        }
    });
    check(Unary::Tanh, &f64::tanh);
    // Known values: GELU(1) = 0.8413447460685429 (PyTorch), sigmoid of extremes stays finite.
    let one = Tensor::from_vec(vec![1.0f64, -800.0, 800.0], &[3]).unwrap();
    assert!((gelu(&one).unwrap().to_vec_f64().unwrap()[0] - 0.8413447460685429).abs() < 1e-15);
    assert_eq!(sigmoid(&one).unwrap().to_vec_f64().unwrap()[1..], [0.0, 1.0]);
}

#[test]
fn unary_gradients_match_finite_differences() {
    for op in all_unary() {
        let x = input_for(op, &[3, 4], 2);
        // Also through a transposed view, so the kernel walks non-unit strides.
        for transposed in [false, true] {
            let r = gradcheck(op.name(), std::slice::from_ref(&x), |x| {
                let x = if transposed { permute(&x[0], &[1, 0])? } else { x[0].clone() };
                unary(op, &x)
            })
            .unwrap();
            assert!(r.passed(), "{r}");
        }
    }
}

#[test]
fn binary_gradients_with_broadcast_and_views() {
    let a = randn(&[3, 1, 5], 3);
    let b = add_scalar(&abs(&randn(&[4, 1], 4)).unwrap(), 0.5).unwrap(); // away from 0 for div
    let wide = randn(&[4, 6], 5);
    for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div, Binary::Maximum, Binary::Minimum] {
        let r = gradcheck(op.name(), &[a.clone(), b.clone()], |x| binary(op, &x[0], &x[1])).unwrap();
        assert!(r.passed(), "{r}");
        // Non-contiguous: a permuted (5, 3) against a column slice of a wider tensor.
        let r = gradcheck(op.name(), &[a.clone(), wide.clone()], |x| {
            let a = permute(&narrow(&x[0], 0, 0, 3)?, &[1, 2, 0])?; // (1, 5, 3)
            let b = add_scalar(&abs(&narrow(&x[1], 1, 1, 3)?)?, 0.5)?; // (4, 3), strided rows
            binary(op, &a, &crate::view::unsqueeze(&b, 1)?)
        })
        .unwrap();
        assert!(r.passed(), "{r}");
    }
}

#[test]
fn broadcast_matches_explicit_loops() {
    let a = randn(&[2, 3, 1], 6);
    let b = randn(&[4], 7);
    let y = mul(&a, &b).unwrap();
    assert_eq!(y.shape(), &[2, 3, 4]);
    let (av, bv, yv) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap(), y.to_vec_f64().unwrap());
    for i in 0..6 {
        for j in 0..4 {
            assert_eq!(yv[i * 4 + j], av[i] * bv[j]);
        }
    }
}

#[test]
fn large_tensors_take_the_parallel_path_and_agree() {
    // 2^17 elements, permuted: both the parallel strided walk and the contiguous walk.
    let a = randn(&[256, 512], 8);
    let b = randn(&[512, 256], 9);
    let bt = permute(&b, &[1, 0]).unwrap();
    let y = add(&a, &bt).unwrap().to_vec_f64().unwrap();
    let (av, bv) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    for i in (0..256).step_by(17) {
        for j in (0..512).step_by(13) {
            assert_eq!(y[i * 512 + j], av[i * 512 + j] + bv[j * 256 + i]);
        }
    }
}

#[test]
fn max_min_share_ties_and_where_routes_gradients() {
    let a = Tensor::from_vec(vec![1.0f64, 2.0, 3.0], &[3]).unwrap().requires_grad_(true).unwrap();
    let b = Tensor::from_vec(vec![2.0f64, 2.0, 1.0], &[3]).unwrap().requires_grad_(true).unwrap();
    crate::reduce::sum_all(&maximum(&a, &b).unwrap()).unwrap().backward().unwrap();
    assert_eq!(a.grad().unwrap().to_vec_f64().unwrap(), vec![0.0, 0.5, 1.0]);
    assert_eq!(b.grad().unwrap().to_vec_f64().unwrap(), vec![1.0, 0.5, 0.0]);

    let c = compare(Cmp::Gt, &a.detach(), &b.detach()).unwrap();
    assert_eq!(c.to_vec_f64().unwrap(), vec![0.0, 0.0, 1.0]);
    let x = randn(&[2, 3], 10);
    let y = randn(&[3], 11);
    let cond = compare_scalar(Cmp::Gt, &randn(&[2, 3], 12), 0.0).unwrap();
    let r = gradcheck("where", &[x, y], |v| where_(&cond, &v[0], &v[1])).unwrap();
    assert!(r.passed(), "{r}");
}

#[test]
fn comparisons_cover_every_relation() {
    let a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3]).unwrap();
    let b = Tensor::scalar(2.0, DType::F32, Device::Cpu).unwrap();
    let got = |op| compare(op, &a, &b).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(got(Cmp::Eq), [0.0, 1.0, 0.0]);
    assert_eq!(got(Cmp::Ne), [1.0, 0.0, 1.0]);
    assert_eq!(got(Cmp::Lt), [1.0, 0.0, 0.0]);
    assert_eq!(got(Cmp::Le), [1.0, 1.0, 0.0]);
    assert_eq!(got(Cmp::Gt), [0.0, 0.0, 1.0]);
    assert_eq!(got(Cmp::Ge), [0.0, 1.0, 1.0]);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let a = randn(&[2, 3], 13);
    let b = randn(&[4], 14);
    let f = Tensor::from_vec(vec![1.0f32; 6], &[2, 3]).unwrap();
    assert!(matches!(add(&a, &b), Err(engine::Error::Broadcast { op: "add", .. })));
    assert!(matches!(mul(&a, &f), Err(engine::Error::DTypeMismatch { op: "mul", .. })));
    assert!(where_(&f, &a, &a).is_err());
    assert!(softplus(&a, 0.0, 20.0).is_err());
    let msg = add(&a, &b).unwrap_err().to_string();
    assert!(msg.contains("[2, 3]") && msg.contains("[4]"), "{msg}");
}

/// Which CUDA kernel form the layouts the ops build (each input broadcast to the output shape) get, at the
/// aligned base addresses the allocator hands out; the choice itself is engine::cuda::vector::plan, and this
/// checks the op-level layouts it sees. Needs no device.
#[test]
fn cuda_kernel_form_for_the_layouts_ops_build() {
    use engine::cuda::vector::{plan, Flat, Path};
    const BASE: u64 = 0x7f00_0000_0000;
    let form = |a: &Tensor, b: &Tensor, elem: usize| {
        let shape = engine::broadcast_shape("test", a.shape(), b.shape()).unwrap();
        let (la, lb) = (a.layout().broadcast_as(&shape).unwrap(), b.layout().broadcast_as(&shape).unwrap());
        plan(&[(&la, BASE), (&lb, BASE + (1 << 20))], &[BASE + (2 << 20)], elem)
    };
    let x = randn(&[1000, 64], 1);
    // Same shapes: both contiguous.
    assert_eq!(form(&x, &randn(&[1000, 64], 2), 8), Path::Vector(vec![Flat::Contiguous; 2]));
    // A Linear's bias (64,) over (1000, 64): a repeated row of 64 (whole packs for f32 and f64).
    assert_eq!(form(&x, &randn(&[64], 3), 8), Path::Vector(vec![Flat::Contiguous, Flat::Repeat(64)]));
    assert_eq!(form(&x, &randn(&[64], 3), 4), Path::Vector(vec![Flat::Contiguous, Flat::Repeat(64)]));
    // A scalar tensor (compare_scalar, where's zero).
    let s = Tensor::scalar(0.0, DType::F64, Device::Cpu).unwrap();
    assert_eq!(form(&x, &s, 8), Path::Vector(vec![Flat::Contiguous, Flat::Scalar]));
    // A column (1000, 1) or a transposed operand has no flat form: the Strided kernel.
    assert_eq!(form(&x, &randn(&[1000, 1], 4), 8), Path::Strided);
    assert_eq!(form(&x, &permute(&randn(&[64, 1000], 5), &[1, 0]).unwrap(), 8), Path::Strided);
    // A bias of 6 doubles is 3 packs; of 6 floats, one and a half: Strided for f32 only.
    let y = randn(&[10, 6], 6);
    assert_eq!(form(&y, &randn(&[6], 7), 8), Path::Vector(vec![Flat::Contiguous, Flat::Repeat(6)]));
    assert_eq!(form(&y, &randn(&[6], 7), 4), Path::Strided);
    // Narrowed rows keep the view contiguous; whether it is aligned depends on its offset: rows of 64 from
    // row 1 start 64 elements in (aligned), a narrow of a flat buffer from element 1 does not.
    let rows = narrow(&x, 0, 1, 999).unwrap();
    assert_eq!(form(&rows, &randn(&[999, 64], 8), 4), Path::Vector(vec![Flat::Contiguous; 2]));
    let flat = narrow(&randn(&[4001], 9), 0, 1, 4000).unwrap();
    assert_eq!(form(&flat, &randn(&[4000], 10), 4), Path::Strided);
    assert_eq!(form(&flat, &randn(&[4000], 10), 8), Path::Strided);
}

/// A permuted view of contiguous memory (a channels-last image) keeps its layout through unary ops and
/// binary ops between two such views: same values as on a contiguous copy, output in the input's memory
/// order, and gradients through it that match the contiguous computation exactly.
#[test]
fn permuted_contiguous_inputs_keep_their_memory_order() {
    let leaf = randn(&[2, 3, 4, 5], 71).requires_grad_(true).unwrap(); // (N, H, W, C) memory
    let cl = permute(&leaf, &[0, 3, 1, 2]).unwrap(); // (N, C, H, W)
    let other = permute(&randn(&[2, 3, 4, 5], 72), &[0, 3, 1, 2]).unwrap();
    let plain = cl.detach().contiguous().unwrap().requires_grad_(true).unwrap();
    for op in [Unary::Relu, Unary::Silu, Unary::Gelu, Unary::Exp] {
        let (y, want) = (unary(op, &cl).unwrap(), unary(op, &plain).unwrap());
        assert_eq!(y.strides(), cl.strides(), "{}", op.name());
        assert_eq!(y.to_vec_f64().unwrap(), want.to_vec_f64().unwrap(), "{}", op.name());
    }
    for op in [Binary::Add, Binary::Mul, Binary::Div] {
        let (y, want) = (binary(op, &cl, &other).unwrap(), binary(op, &plain, &other.contiguous().unwrap()).unwrap());
        assert_eq!(y.strides(), cl.strides(), "{}", op.name());
        assert_eq!(y.to_vec_f64().unwrap(), want.to_vec_f64().unwrap(), "{}", op.name());
    }
    // Gradients: the same chain on the view and on the copy.
    let chain = |x: &Tensor| binary(Binary::Mul, &unary(Unary::Silu, x)?, x);
    let g = randn(&[2, 5, 3, 4], 73);
    chain(&cl).unwrap().backward_with(&g).unwrap();
    chain(&plain).unwrap().backward_with(&g).unwrap();
    let got = permute(&leaf.grad().unwrap(), &[0, 3, 1, 2]).unwrap().to_vec_f64().unwrap();
    assert_eq!(got, plain.grad().unwrap().to_vec_f64().unwrap());
    // A transposed matrix is permuted-contiguous too; a slice is not, and stays on the strided path.
    let m = crate::view::t(&randn(&[6, 4], 74)).unwrap();
    assert_eq!(unary(Unary::Neg, &m).unwrap().strides(), m.strides());
    let s = narrow(&randn(&[6, 4], 75), 1, 1, 2).unwrap();
    assert!(unary(Unary::Neg, &s).unwrap().is_contiguous());
}

/// The f32 erf behind GELU against libm: over a dense grid of [-5, 5], every power of two and the special
/// values, it is the f32 nearest libm's f64 erf, but where that lies within 1e-12 of the midpoint between two
/// f32s (a handful of ties, one step apart); and within one step of libm's erff.
#[test]
fn f32_erf_is_the_rounded_f64_erf() {
    use engine::Float;
    let mut ties = 0;
    let mut check = |x: f32| {
        let got = super::cpu::erf_f32(x);
        let exact = <f64 as Float>::erf(x as f64);
        let want = exact as f32;
        if got.to_bits() != want.to_bits() {
            let mid = (got as f64 + want as f64) / 2.0;
            let one_step = (got.to_bits() as i64 - want.to_bits() as i64).abs() == 1;
            assert!(one_step && (exact - mid).abs() <= 1e-12 * exact.abs(), "erf({x:e}): {got:e} vs {want:e}");
            ties += 1;
        }
        let libm = <f32 as Float>::erf(x);
        assert!((got - libm).abs() <= f32::EPSILON * libm.abs().max(f32::MIN_POSITIVE), "erf({x:e}) vs erff {libm:e}");
    };
    let n = 4_000_000;
    for i in 0..=n {
        check(-5.0 + 10.0 * i as f32 / n as f32);
    }
    for e in -149..3 {
        let p = 2f32.powi(e);
        for x in [p, -p, p * 1.5, -p * 1.5] {
            check(x);
        }
    }
    for x in [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 10.0, -10.0, 3.9, 4.0, 4.5] {
        check(x);
    }
    assert!(ties <= 100, "{ties} near-ties of 4 million");
    assert!(super::cpu::erf_f32(f32::NAN).is_nan());
}
