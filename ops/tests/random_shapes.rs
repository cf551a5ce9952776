//! Gradient checks on random shapes: broadcast pairs, permuted inputs, random reduction dims, random conv2d
//! configurations against the reference.

use engine::{gradcheck, gradcheck_with, DType, Device, Generator, GradcheckOptions, Tensor};
use ops::{
    batch_norm2d, binary, causal_conv1d, conv2d, conv2d_ref, layer_norm, rope2d, sum, unary, Binary, TensorOps, Unary,
};
use proptest::prelude::*;

fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..4, 1..4)
}

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand(shape, -2.0, 2.0, DType::F64, Device::Cpu, &mut Generator::new(seed)).unwrap()
}

const BINARY: [Binary; 6] = [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div, Binary::Maximum, Binary::Minimum];

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn binary_ops_with_random_broadcast(shape in shape_strategy(), mask in prop::collection::vec(any::<bool>(), 4),
                                        drop_lead in any::<bool>(), op in 0usize..6, seed in any::<u64>()) {
        // b: a's shape with some dims set to 1 and maybe the leading dim dropped.
        let mut b_shape: Vec<usize> = shape.iter().zip(&mask).map(|(&d, &m)| if m { 1 } else { d }).collect();
        if drop_lead && b_shape.len() > 1 {
            b_shape.remove(0);
        }
        let op = BINARY[op];
        let a = tensor(&shape, seed);
        let b = tensor(&b_shape, seed ^ 1);
        let r = gradcheck(op.name(), &[a, b], |x| {
            // Keep div away from zero denominators.
            let b = if op == Binary::Div { x[1].abs()?.add_scalar(0.5)? } else { x[1].clone() };
            binary(op, &x[0], &b)
        }).unwrap();
        prop_assert!(r.passed(), "{} {:?} {:?}: {}", op.name(), shape, b_shape, r);
    }

    #[test]
    fn unary_ops_on_permuted_inputs(shape in shape_strategy(), seed in any::<u64>(), op in 0usize..5) {
        let op = [Unary::Gelu, Unary::Silu, Unary::Tanh, Unary::Softplus { beta: 2.0, threshold: 3.0 }, Unary::Elu(0.5)][op];
        let x = tensor(&shape, seed);
        let rank = shape.len();
        let r = gradcheck(op.name(), &[x], |x| unary(op, &x[0].permute(&(0..rank).rev().collect::<Vec<_>>())?)).unwrap();
        prop_assert!(r.passed(), "{}", r);
    }

    #[test]
    fn sums_over_random_dims(shape in shape_strategy(), dims in prop::collection::vec(0isize..3, 0..3),
                             keepdim in any::<bool>(), seed in any::<u64>()) {
        let dims: Vec<isize> = dims.into_iter().filter(|&d| (d as usize) < shape.len()).collect();
        let x = tensor(&shape, seed);
        let r = gradcheck("sum", &[x], |x| sum(&x[0], &dims, keepdim)).unwrap();
        prop_assert!(r.passed(), "{}", r);
    }

    #[test]
    fn reshape_permute_round_trips(shape in shape_strategy(), seed in any::<u64>()) {
        let x = tensor(&shape, seed);
        let rank = shape.len();
        let perm: Vec<usize> = (0..rank).rev().collect();
        let back = x.permute(&perm).unwrap().permute(&perm).unwrap(); // reversal is its own inverse
        prop_assert_eq!(back.to_vec_f64().unwrap(), x.to_vec_f64().unwrap());
        let flat = x.permute(&perm).unwrap().reshape(&[-1]).unwrap();
        let again = flat.reshape(&x.permute(&perm).unwrap().shape().iter().map(|&d| d as isize).collect::<Vec<_>>()).unwrap();
        prop_assert_eq!(again.permute(&perm).unwrap().to_vec_f64().unwrap(), x.to_vec_f64().unwrap());
    }

    #[test]
    fn bad_shapes_never_panic(a in prop::collection::vec(0usize..5, 0..4), b in prop::collection::vec(0usize..5, 0..4),
                              dim in -5isize..5, seed in any::<u64>()) {
        let x = tensor(&a, seed);
        let y = tensor(&b, seed ^ 2);
        // Each may fail, but must fail with an Err.
        let _ = x.add(&y);
        let _ = x.sum(&[dim], false);
        let _ = x.max(&[dim], true);
        let _ = x.softmax(dim);
        let _ = x.narrow(dim, 1, 2);
        let _ = x.transpose(dim, 0);
        let _ = x.reshape(&b.iter().map(|&d| d as isize).collect::<Vec<_>>());
        let _ = x.expand(&b);
        let _ = x.unsqueeze(dim);
    }
}

/// A conv2d configuration: (N, C/G, G, O/G, H, W, kh, kw), stride, padding, dilation, bias.
type ConvArgs = ([usize; 8], (usize, usize), (usize, usize), (usize, usize), bool);

fn conv_strategy() -> impl Strategy<Value = ConvArgs> {
    (
        prop::array::uniform8(1usize..4),
        (1usize..4, 1usize..4),
        (0usize..3, 0usize..3),
        (1usize..3, 1usize..3),
        any::<bool>(),
    )
        .prop_map(|(mut d, s, p, dl, b)| {
            d[0] -= 1; // batch 0..3
            d[4] += 3; // H, W in 4..7
            d[5] += 3;
            (d, s, p, dl, b)
        })
}

fn conv_inputs(&([n, cg, g, og, h, w, kh, kw], .., bias): &ConvArgs, seed: u64) -> Vec<Tensor> {
    let mut t = vec![tensor(&[n, cg * g, h, w], seed), tensor(&[og * g, cg, kh, kw], seed ^ 1)];
    if bias {
        t.push(tensor(&[og * g], seed ^ 2));
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn conv2d_random_configs_match_the_reference(args in conv_strategy(), seed in any::<u64>()) {
        let (d, stride, padding, dilation, _) = args;
        let t = conv_inputs(&args, seed);
        let got = conv2d(&t[0], &t[1], t.get(2), stride, padding, dilation, d[2]);
        let want = conv2d_ref(&t[0], &t[1], t.get(2), stride, padding, dilation, d[2]);
        match (got, want) {
            (Ok(y), Ok(r)) => {
                prop_assert_eq!(y.shape(), r.shape());
                for (a, b) in y.to_vec_f64().unwrap().iter().zip(r.to_vec_f64().unwrap()) {
                    prop_assert!((a - b).abs() < 1e-12, "{:?}: {} vs {}", args, a, b);
                }
            }
            // Both refuse the same (too large) kernels.
            (Err(_), Err(_)) => {}
            (got, want) => prop_assert!(false, "{:?}: {:?} vs {:?}", args, got.err(), want.err()),
        }
    }

    #[test]
    fn conv2d_random_configs_pass_gradcheck(args in conv_strategy(), seed in any::<u64>()) {
        let (d, stride, padding, dilation, _) = args;
        let t = conv_inputs(&args, seed);
        prop_assume!(conv2d(&t[0], &t[1], None, stride, padding, dilation, d[2]).is_ok());
        // conv2d is linear in each input: exact central differences for any step (see ops::suite).
        let opts = GradcheckOptions { eps: 1e-3, ..Default::default() };
        let r = gradcheck_with("conv2d", &t, opts, |x| conv2d(&x[0], &x[1], x.get(2), stride, padding, dilation, d[2]))
            .unwrap();
        prop_assert!(r.passed(), "{:?}: {}", args, r);
    }

    #[test]
    fn vision_ops_never_panic_on_bad_arguments(a in prop::collection::vec(0usize..4, 0..5),
                                               b in prop::collection::vec(0usize..4, 0..5),
                                               k in prop::array::uniform4(0usize..3), seed in any::<u64>()) {
        let x = tensor(&a, seed);
        let w = tensor(&b, seed ^ 1);
        let v = tensor(&b[..b.len().min(1)], seed ^ 2);
        // Each may fail, but must fail with an Err.
        let _ = conv2d(&x, &w, Some(&v), (k[0], k[1]), (k[2], k[3]), (k[1], k[0]), k[2]);
        let _ = causal_conv1d(&x, &w, Some(&v));
        let _ = layer_norm(&x, Some(&v), None, 1e-5);
        let _ = batch_norm2d(&x, Some(&v), None, Some(&v), Some(&v.abs().unwrap()), k[0] == 0, 0.1, 1e-5);
        let _ = rope2d(&x, k[0], k[1], 10000.0);
        let _ = x.dropout(0.5, true, &mut Generator::new(seed));
        let _ = x.drop_path(0.5, true, &mut Generator::new(seed));
    }
}
