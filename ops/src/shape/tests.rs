use engine::{broadcast_shape, gradcheck, DType, Device, Error, Generator, Tensor};
use proptest::prelude::*;

use crate::testing::*;
use crate::view::{narrow, permute, reshape_usize, select, t};

use super::*;

/// Row-major values of a tensor.
fn values(x: &Tensor) -> Vec<f64> {
    x.to_vec_f64().unwrap()
}

/// Multi-index of flat position `i` in a row-major tensor of `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
    idx
}

/// Flat position of a multi-index in a row-major tensor of `shape`.
fn ravel(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &d)| acc * d + i)
}

#[test]
fn concat_places_each_input_at_its_offset() {
    // Three inputs along dim 1, one permuted, one sliced, one empty along the joined dim.
    let a = randn(&[2, 3, 4], 1);
    let b = permute(&randn(&[4, 2, 2], 2), &[1, 2, 0]).unwrap(); // (2, 2, 4)
    let e = randn(&[2, 0, 4], 3);
    let c = narrow(&randn(&[2, 5, 4], 4), 1, 1, 1).unwrap(); // (2, 1, 4)
    let xs = [a, b, e, c];
    let y = concat(&xs, 1).unwrap();
    assert_eq!(y.shape(), &[2, 6, 4]);
    let yv = values(&y);
    // Input i covers rows offsets[i]..offsets[i] + size_i of dim 1.
    let mut offset = 0;
    for x in &xs {
        let xv = values(x);
        for (flat, &v) in xv.iter().enumerate() {
            let mut idx = unravel(flat, x.shape());
            idx[1] += offset;
            assert_eq!(yv[ravel(&idx, y.shape())], v);
        }
        offset += x.shape()[1];
    }
    // Negative dims, and a single input is a copy.
    assert_eq!(concat(&xs[..2], -2).unwrap().shape(), &[2, 5, 4]);
    let one = concat(&xs[..1], 0).unwrap();
    assert!(!one.same_storage(&xs[0]));
    assert_eq!(values(&one), values(&xs[0]));
}

#[test]
fn empty_inputs_concat_and_pad_to_empty_results() {
    // The second piece's view starts one past the end of the (empty) output storage.
    let y = concat(&[randn(&[0, 1], 5), randn(&[0, 1], 6)], 1).unwrap();
    assert_eq!(y.shape(), &[0, 2]);
    let y = pad(&randn(&[0, 3], 7), &[(1, 1)], 2.0).unwrap();
    assert_eq!(y.shape(), &[0, 5]);
    // Padding an empty dim gives only the padding.
    assert_eq!(values(&pad(&randn(&[0], 8), &[(1, 2)], 2.0).unwrap()), vec![2.0; 3]);
}

#[test]
fn stack_adds_a_dim_whose_slices_are_the_inputs() {
    let xs: Vec<Tensor> = (0..3).map(|s| randn(&[2, 4], 10 + s)).collect();
    for (dim, shape) in [(0, vec![3, 2, 4]), (1, vec![2, 3, 4]), (2, vec![2, 4, 3]), (-1, vec![2, 4, 3])] {
        let y = stack(&xs, dim).unwrap();
        assert_eq!(y.shape(), shape.as_slice());
        for (i, x) in xs.iter().enumerate() {
            assert_eq!(values(&select(&y, dim, i).unwrap()), values(x), "dim {dim} slice {i}");
        }
    }
}

#[test]
fn split_and_chunk_are_views_with_torch_sizes() {
    let x = randn(&[3, 7], 20);
    let pieces = split(&x, &[2, 0, 5], 1).unwrap();
    let sizes: Vec<usize> = pieces.iter().map(|p| p.shape()[1]).collect();
    assert_eq!(sizes, vec![2, 0, 5]);
    assert!(pieces.iter().all(|p| p.same_storage(&x)));
    assert_eq!(values(&pieces[2]), values(&narrow(&x, 1, 2, 5).unwrap()));
    // torch.chunk: ceil(size / n) per piece, so 7 in 3 is 3, 3, 1 and 6 in 4 is only three pieces of 2.
    let chunk_sizes = |size: usize, n: usize| -> Vec<usize> {
        chunk(&randn(&[size, 2], 21), n, 0).unwrap().iter().map(|p| p.shape()[0]).collect()
    };
    assert_eq!(chunk_sizes(7, 3), vec![3, 3, 1]);
    assert_eq!(chunk_sizes(6, 4), vec![2, 2, 2]);
    assert_eq!(chunk_sizes(2, 5), vec![1, 1]);
    assert_eq!(chunk_sizes(6, 1), vec![6]);
    assert_eq!(chunk_sizes(0, 3), vec![0, 0, 0]);
}

#[test]
fn index_select_gathers_slices_in_index_order() {
    // Non-contiguous input, repeated and unsorted indices, along the middle dim.
    let x = permute(&randn(&[5, 2, 3], 30), &[1, 0, 2]).unwrap(); // (2, 5, 3)
    let idx = [4, 0, 4, 2];
    let y = index_select(&x, 1, &idx).unwrap();
    assert_eq!(y.shape(), &[2, 4, 3]);
    let (xv, yv) = (values(&x), values(&y));
    for (flat, &v) in yv.iter().enumerate() {
        let mut i = unravel(flat, y.shape());
        i[1] = idx[i[1]];
        assert_eq!(v, xv[ravel(&i, x.shape())]);
    }
    assert_eq!(index_select(&x, -1, &[]).unwrap().shape(), &[2, 5, 0]);
    // Repeated indices accumulate in the backward: dx row i is the sum of the g rows that picked it.
    let x = randn(&[3, 2], 31).requires_grad_(true).unwrap();
    let g = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]).unwrap();
    index_select(&x, 0, &[2, 0, 2]).unwrap().backward_with(&g).unwrap();
    assert_eq!(values(&x.grad().unwrap()), vec![3.0, 4.0, 0.0, 0.0, 6.0, 8.0]);
}

#[test]
fn pad_surrounds_the_input_with_the_value() {
    let x = t(&randn(&[3, 2], 40)).unwrap(); // (2, 3), non-contiguous
                                             // Last dim (1, 2), first dim (0, 1): (2, 3) -> (3, 6).
    let y = pad(&x, &[(1, 2), (0, 1)], -7.5).unwrap();
    assert_eq!(y.shape(), &[3, 6]);
    let (xv, yv) = (values(&x), values(&y));
    for i in 0..3 {
        for j in 0..6 {
            let want = if i < 2 && (1..4).contains(&j) { xv[i * 3 + j - 1] } else { -7.5 };
            assert_eq!(yv[i * 6 + j], want, "({i}, {j})");
        }
    }
    // No pairs: a copy; and f32 keeps its dtype.
    assert_eq!(values(&pad(&x, &[], 0.0).unwrap()), xv);
    let x32 = Tensor::ones(&[2], DType::F32, Device::Cpu).unwrap();
    assert_eq!(pad(&x32, &[(1, 0)], 3.0).unwrap().to_vec::<f32>().unwrap(), vec![3.0, 1.0, 1.0]);
}

#[test]
fn shape_op_gradients_match_finite_differences() {
    let cases: Vec<(Vec<Tensor>, Case)> = vec![
        (
            vec![randn(&[2, 3], 50), randn(&[4, 2], 51), randn(&[2, 5], 52)],
            // (2, 3), (2, 4) transposed, (2, 2) sliced: joined along dim 1.
            ("concat", Box::new(|x| concat(&[x[0].clone(), t(&x[1])?, narrow(&x[2], 1, 1, 2)?], 1))),
        ),
        (
            vec![randn(&[3, 2], 53), randn(&[3, 2], 54)],
            ("concat(dim 0, same input twice)", Box::new(|x| concat(&[x[0].clone(), x[1].clone(), x[0].clone()], 0))),
        ),
        (vec![randn(&[2, 3], 55), randn(&[3, 2], 56)], ("stack", Box::new(|x| stack(&[x[0].clone(), t(&x[1])?], 1)))),
        (
            vec![randn(&[4, 5], 57)],
            // The pieces reordered, one left out (its gradient is zero).
            (
                "split",
                Box::new(|x| {
                    let p = split(&t(&x[0])?, &[2, 1, 2], 0)?;
                    concat(&[p[2].clone(), p[0].clone()], 0)
                }),
            ),
        ),
        (
            vec![randn(&[3, 7], 58)],
            (
                "chunk",
                Box::new(|x| {
                    let p = chunk(&x[0], 3, -1)?;
                    concat(&[p[2].clone(), p[1].clone(), p[0].clone()], 1)
                }),
            ),
        ),
        (
            vec![randn(&[4, 3, 2], 59)],
            ("index_select", Box::new(|x| index_select(&permute(&x[0], &[2, 0, 1])?, 1, &[3, 1, 3, 3]))),
        ),
        (vec![randn(&[3, 4], 60)], ("pad", Box::new(|x| pad(&t(&x[0])?, &[(2, 1), (1, 0)], 0.5)))),
    ];
    for (inputs, (name, f)) in cases {
        let r = gradcheck(name, &inputs, f).unwrap();
        assert!(r.passed(), "{r}");
        assert!(r.max_abs_grad > 0.1, "{r}");
    }
}

#[test]
fn bad_arguments_are_errors() {
    let x = randn(&[2, 3], 70);
    assert!(matches!(concat(&[], 0), Err(Error::InvalidArgument { op: "concat", .. })));
    match concat(&[x.clone(), randn(&[3, 3], 71)], 1) {
        Err(Error::ShapeMismatch { op: "concat", lhs, rhs }) => assert_eq!((lhs, rhs), (vec![2, 3], vec![3, 3])),
        r => panic!("unexpected {r:?}"),
    }
    assert!(matches!(concat(&[x.clone(), randn(&[2, 3, 1], 72)], 0), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(concat(std::slice::from_ref(&x), 2), Err(Error::DimOutOfRange { op: "concat", .. })));
    assert!(matches!(concat(&[randn(&[], 73)], 0), Err(Error::DimOutOfRange { .. })));
    let f32s = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
    assert!(matches!(concat(&[x.clone(), f32s.clone()], 0), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(stack(&[], 0), Err(Error::InvalidArgument { op: "stack", .. })));
    assert!(matches!(stack(&[x.clone(), t(&x).unwrap()], 0), Err(Error::ShapeMismatch { op: "stack", .. })));
    assert!(matches!(stack(&[x.clone(), f32s], 0), Err(Error::DTypeMismatch { op: "stack", .. })));
    assert!(matches!(stack(std::slice::from_ref(&x), 3), Err(Error::DimOutOfRange { op: "stack", .. })));
    assert!(matches!(stack(std::slice::from_ref(&x), -4), Err(Error::DimOutOfRange { .. })));
    assert!(matches!(split(&x, &[1, 1], 1), Err(Error::InvalidArgument { op: "split", .. })));
    assert!(matches!(split(&x, &[usize::MAX, 4], 1), Err(Error::InvalidArgument { .. })));
    assert!(matches!(split(&x, &[3], 2), Err(Error::DimOutOfRange { .. })));
    assert!(matches!(chunk(&x, 0, 0), Err(Error::InvalidArgument { op: "chunk", .. })));
    assert!(matches!(index_select(&x, 1, &[0, 3]), Err(Error::InvalidArgument { op: "index_select", .. })));
    assert!(matches!(index_select(&x, -3, &[0]), Err(Error::DimOutOfRange { .. })));
    assert!(matches!(pad(&x, &[(1, 1); 3], 0.0), Err(Error::InvalidArgument { op: "pad", .. })));
    assert!(matches!(pad(&x, &[(usize::MAX, 1)], 0.0), Err(Error::InvalidArgument { op: "pad", .. })));
}

/// A shape and a dim of it (rank 1..4, sizes 0..5).
fn shape_and_dim() -> impl Strategy<Value = (Vec<usize>, usize)> {
    prop::collection::vec(0usize..5, 1..4).prop_flat_map(|s| {
        let r = s.len();
        (Just(s), 0..r)
    })
}

/// Random sizes adding up to `total`: cut points drawn from 0..=total.
fn sizes_from_cuts(total: usize, mut cuts: Vec<usize>) -> Vec<usize> {
    cuts.iter_mut().for_each(|c| *c %= total + 1);
    cuts.sort_unstable();
    cuts.push(total);
    let mut prev = 0;
    cuts.into_iter()
        .map(|c| {
            let s = c - prev;
            prev = c;
            s
        })
        .collect()
}

/// The prime factors of n (n >= 1), smallest first, by trial division.
fn prime_factors(mut n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut p = 2;
    while n > 1 {
        if p * p > n {
            out.push(n);
            break;
        }
        // A match rather than `is_multiple_of`, which is newer than the workspace's rust-version (1.85).
        match n % p {
            0 => {
                out.push(p);
                n /= p;
            }
            _ => p += 1,
        }
    }
    out
}

/// The simple broadcast rule: pad with leading 1s; each dim is the non-1 size when the other is 1, else both
/// must be equal.
fn broadcast_ref(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let pad = |s: &[usize]| [vec![1; r - s.len()], s.to_vec()].concat();
    let (a, b) = (pad(a), pad(b));
    a.iter()
        .zip(&b)
        .map(|(&x, &y)| {
            if x == y || y == 1 {
                Some(x)
            } else if x == 1 {
                Some(y)
            } else {
                None
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn concat_of_a_split_is_the_whole((shape, dim) in shape_and_dim(), cuts in prop::collection::vec(any::<usize>(), 0..4),
                                      transposed in any::<bool>(), seed in any::<u64>()) {
        // Also on a non-contiguous input: the reversed permutation of a tensor of the reversed shape.
        let x = if transposed {
            let rev: Vec<usize> = (0..shape.len()).rev().collect();
            let stored: Vec<usize> = shape.iter().rev().copied().collect();
            permute(&randn(&stored, seed), &rev).unwrap()
        } else {
            randn(&shape, seed)
        };
        let sizes = sizes_from_cuts(shape[dim], cuts);
        let pieces = split(&x, &sizes, dim as isize).unwrap();
        prop_assert_eq!(pieces.len(), sizes.len());
        let whole = concat(&pieces, dim as isize).unwrap();
        prop_assert_eq!(whole.shape(), x.shape());
        prop_assert_eq!(values(&whole), values(&x));
        let n = 1 + (seed % 4) as usize;
        prop_assert_eq!(values(&concat(&chunk(&x, n, dim as isize).unwrap(), dim as isize).unwrap()), values(&x));
    }

    #[test]
    fn permute_then_inverse_permute_is_the_identity(shape in prop::collection::vec(1usize..4, 1..5), seed in any::<u64>()) {
        let x = randn(&shape, seed);
                let mut perm: Vec<usize> = (0..shape.len()).collect();
        Generator::new(seed).shuffle(&mut perm);
        let mut inverse = vec![0; perm.len()];
        for (i, &d) in perm.iter().enumerate() {
            inverse[d] = i;
        }
        let p = permute(&x, &perm).unwrap();
        let permuted: Vec<usize> = perm.iter().map(|&d| shape[d]).collect();
        prop_assert_eq!(p.shape(), permuted.as_slice());
        let back = permute(&p, &inverse).unwrap();
        prop_assert_eq!(back.shape(), x.shape());
        prop_assert_eq!(values(&back), values(&x));
    }

    #[test]
    fn reshape_to_a_random_factorisation_and_back(shape in prop::collection::vec(1usize..6, 1..4), buckets in prop::collection::vec(0usize..4, 16),
                                                   transposed in any::<bool>(), seed in any::<u64>()) {
        let x = randn(&shape, seed);
        // Reshape a transposed view too: it needs a copy, the contiguous tensor does not.
        let x = if transposed { t(&reshape_usize(&x, &[shape[0], shape[1..].iter().product()]).unwrap()).unwrap() } else { x };
        // Deal the prime factors of numel into 4 dims.
        let mut target = vec![1usize; 4];
        for (p, &b) in prime_factors(x.numel()).into_iter().zip(buckets.iter().cycle()) {
            target[b] *= p;
        }
        let y = reshape_usize(&x, &target).unwrap();
        prop_assert_eq!(y.shape(), target.as_slice());
        prop_assert_eq!(values(&y), values(&x));
        let back = reshape_usize(&y, x.shape()).unwrap();
        prop_assert_eq!(values(&back), values(&x));
    }

    #[test]
    fn broadcast_shape_follows_the_rule_and_is_symmetric(a in prop::collection::vec(0usize..4, 0..4), b in prop::collection::vec(0usize..4, 0..4),
                                                        ones in prop::collection::vec(any::<bool>(), 4)) {
        // Random pairs rarely broadcast; also try a with some dims of b's tail set to 1.
        let tail = &b[b.len().saturating_sub(a.len())..];
        let compatible: Vec<usize> = tail.iter().zip(&ones).map(|(&d, &one)| if one { 1 } else { d }).collect();
        for (a, b) in [(a.clone(), b.clone()), (compatible, b.clone())] {
            let ab = broadcast_shape("t", &a, &b).ok();
            let ba = broadcast_shape("t", &b, &a).ok();
            prop_assert_eq!(&ab, &broadcast_ref(&a, &b), "{:?} {:?}", a, b);
            prop_assert_eq!(&ab, &ba);
            if let Some(out) = ab {
                // Both operands expand to the result as views.
                prop_assert!(engine::Layout::contiguous(&a).broadcast_as(&out).is_ok());
                prop_assert!(engine::Layout::contiguous(&b).broadcast_as(&out).is_ok());
            }
        }
    }
}

// ---- CUDA against the CPU (skipped without a device) -------------------------------------------------------

use crate::matmul::tests::assert_cuda_matches_cpu;

#[test]
fn cuda_index_select_matches_cpu_and_adds_repeated_indices() {
    if engine::cuda::test_device_or_skip("cuda_index_select_matches_cpu_and_adds_repeated_indices").is_none() {
        return;
    }
    // Non-contiguous input, unsorted indices with 4 picked three times: its gradient row is a sum of three.
    assert_cuda_matches_cpu("middle dim of a permutation", &[&[5, 2, 3]], |x| {
        index_select(&permute(&x[0], &[1, 0, 2])?, 1, &[4, 0, 4, 2, 4])
    });
    assert_cuda_matches_cpu("first dim", &[&[4, 6]], |x| index_select(&x[0], 0, &[3, 3, 1, 0, 3, 2, 1]));
    // Last dim of a slice (offset and row stride), one index many times.
    assert_cuda_matches_cpu("last dim of a slice", &[&[3, 8]], |x| {
        index_select(&narrow(&x[0], 1, 2, 5)?, -1, &[4, 4, 4, 0])
    });
    // Large enough for many blocks to add into one row at once.
    let many: Vec<usize> = (0..3000).map(|i| (i * 7) % 5).collect();
    assert_cuda_matches_cpu("thousands of repeats", &[&[5, 64]], |x| index_select(&x[0], 0, &many));
    // No indices: an empty result, and a zero gradient.
    assert_cuda_matches_cpu("no indices", &[&[3, 4]], |x| index_select(&x[0], 1, &[]));
}

#[test]
fn cuda_joins_splits_and_pads_match_cpu() {
    if engine::cuda::test_device_or_skip("cuda_joins_splits_and_pads_match_cpu").is_none() {
        return;
    }
    // The gradient-check compositions above, on CUDA: Storage::full, copy_into and narrow's backward.
    assert_cuda_matches_cpu("concat", &[&[2, 3], &[4, 2], &[2, 5]], |x| {
        concat(&[x[0].clone(), t(&x[1])?, narrow(&x[2], 1, 1, 2)?], 1)
    });
    assert_cuda_matches_cpu("concat of one input twice", &[&[3, 2], &[3, 2]], |x| {
        concat(&[x[0].clone(), x[1].clone(), x[0].clone()], 0)
    });
    assert_cuda_matches_cpu("concat with an empty piece", &[&[2, 3], &[2, 0]], |x| {
        concat(&[x[1].clone(), x[0].clone()], 1)
    });
    assert_cuda_matches_cpu("stack", &[&[2, 3], &[3, 2]], |x| stack(&[x[0].clone(), t(&x[1])?], 1));
    assert_cuda_matches_cpu("split", &[&[4, 5]], |x| {
        let p = split(&t(&x[0])?, &[2, 1, 2], 0)?;
        concat(&[p[2].clone(), p[0].clone()], 0)
    });
    assert_cuda_matches_cpu("chunk", &[&[3, 7]], |x| {
        let p = chunk(&x[0], 3, -1)?;
        concat(&[p[2].clone(), p[1].clone(), p[0].clone()], 1)
    });
    assert_cuda_matches_cpu("pad", &[&[3, 4]], |x| pad(&t(&x[0])?, &[(2, 1), (1, 0)], 0.5));
}
