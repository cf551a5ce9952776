use engine::gradcheck;

use crate::testing::*;

use super::*;

#[test]
fn views_share_storage_and_copy_only_when_needed() {
    let x = randn(&[2, 3, 4], 1);
    let p = permute(&x, &[2, 0, 1]).unwrap();
    assert!(p.same_storage(&x));
    assert_eq!(p.shape(), &[4, 2, 3]);
    let n = narrow(&x, 2, 1, 2).unwrap();
    assert!(n.same_storage(&x));
    // A split of a permuted dim is still a view; merging across the permutation needs a copy.
    assert!(reshape(&p, &[2, 2, 2, 3]).unwrap().same_storage(&x));
    let merged = reshape(&p, &[-1]).unwrap();
    assert!(!merged.same_storage(&x));
    let xv = x.to_vec_f64().unwrap();
    let want: Vec<f64> = (0..4)
        .flat_map(|k| (0..2).flat_map(move |i| (0..3).map(move |j| (i * 3 + j) * 4 + k)))
        .map(|o| xv[o])
        .collect();
    assert_eq!(merged.to_vec_f64().unwrap(), want);
    let e = expand(&randn(&[3, 1], 2), &[2, 3, 5]).unwrap();
    assert_eq!(e.strides(), &[0, 1, 0]);
}

#[test]
fn bad_views_are_errors() {
    let x = randn(&[2, 3], 3);
    assert!(reshape(&x, &[4, -1]).is_err());
    assert!(reshape(&x, &[-1, -1]).is_err());
    assert!(permute(&x, &[0, 0]).is_err());
    assert!(narrow(&x, 1, 2, 2).is_err());
    assert!(narrow(&x, 5, 0, 1).is_err());
    assert!(expand(&x, &[2, 4]).is_err());
    assert!(squeeze(&x, 0).is_err());
    assert!(transpose(&x, 0, -3).is_err());
}

#[test]
fn view_gradients_match_finite_differences() {
    let x = randn(&[3, 4, 2], 4);
    let cases: Vec<Case> = vec![
        ("reshape", Box::new(|x| reshape(&x[0], &[4, -1]))),
        ("permute+reshape", Box::new(|x| reshape(&permute(&x[0], &[1, 2, 0])?, &[-1]))),
        ("narrow", Box::new(|x| narrow(&narrow(&x[0], 1, 1, 2)?, 0, 1, 2))),
        ("expand", Box::new(|x| expand(&narrow(&x[0], 2, 0, 1)?, &[5, 3, 4, 3]))),
        ("select+unsqueeze", Box::new(|x| unsqueeze(&select(&x[0], -1, 1)?, 0))),
        ("flatten+t", Box::new(|x| t(&flatten(&x[0], 1, 2)?))),
    ];
    for (name, f) in cases {
        let r = gradcheck(name, std::slice::from_ref(&x), f).unwrap();
        assert!(r.passed(), "{r}");
        assert!(r.max_abs_grad > 0.1, "{r}");
    }
}
