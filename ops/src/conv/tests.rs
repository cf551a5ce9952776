use engine::{gradcheck, DType, Device, Error, Tensor};

use super::*;
use crate::testing::*;
use crate::view::{narrow, permute, reshape};

/// One conv2d configuration: x (N, C, H, W), O outputs, kernel, stride, padding, dilation, groups, bias, and
/// whether x reaches the op as a permuted (non-contiguous) view.
#[derive(Clone, Copy)]
struct Cfg {
    name: &'static str,
    x: [usize; 4],
    o: usize,
    k: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
    bias: bool,
    permuted: bool,
}

const BASE: Cfg = Cfg {
    name: "",
    x: [2, 3, 7, 6],
    o: 4,
    k: (3, 3),
    stride: (1, 1),
    padding: (0, 0),
    dilation: (1, 1),
    groups: 1,
    bias: true,
    permuted: false,
};

fn configs() -> Vec<Cfg> {
    vec![
        Cfg { name: "dense stride 2 pad 1", stride: (2, 2), padding: (1, 1), ..BASE },
        Cfg { name: "dense dilation, no bias", stride: (1, 2), padding: (2, 0), dilation: (2, 1), bias: false, ..BASE },
        Cfg { name: "dense permuted input", k: (2, 3), padding: (1, 2), permuted: true, ..BASE },
        Cfg { name: "groups 2", x: [2, 4, 5, 7], o: 6, k: (3, 2), stride: (2, 1), padding: (1, 1), groups: 2, ..BASE },
        Cfg {
            name: "groups 2 dilated permuted",
            x: [1, 4, 7, 5],
            o: 2,
            dilation: (2, 2),
            padding: (2, 1),
            groups: 2,
            permuted: true,
            ..BASE
        },
        Cfg { name: "depthwise 3x3 pad 1", x: [2, 3, 5, 6], o: 3, padding: (1, 1), groups: 3, ..BASE },
        Cfg {
            name: "depthwise stride 2 no bias",
            x: [3, 5, 7, 5],
            o: 5,
            stride: (2, 2),
            padding: (1, 1),
            groups: 5,
            bias: false,
            ..BASE
        },
        Cfg {
            name: "depthwise dilated permuted",
            x: [2, 3, 6, 7],
            o: 3,
            dilation: (2, 3),
            padding: (1, 3),
            groups: 3,
            permuted: true,
            ..BASE
        },
        Cfg { name: "channel multiplier", x: [2, 2, 5, 5], o: 4, padding: (1, 1), groups: 2, ..BASE },
        Cfg { name: "pointwise 1x1", o: 5, k: (1, 1), ..BASE },
        Cfg {
            name: "pointwise permuted, no bias",
            x: [3, 4, 3, 5],
            o: 2,
            k: (1, 1),
            bias: false,
            permuted: true,
            ..BASE
        },
        Cfg { name: "1x1 stride 2", o: 2, k: (1, 1), stride: (2, 2), ..BASE },
        Cfg {
            name: "dense stride 2 dilated channels-last",
            x: [2, 3, 9, 8],
            o: 4,
            stride: (2, 1),
            padding: (1, 2),
            dilation: (1, 2),
            permuted: true,
            ..BASE
        },
        Cfg { name: "one-channel image channels-last", x: [2, 1, 6, 5], o: 3, stride: (2, 2), padding: (1, 1), ..BASE },
        Cfg {
            name: "depthwise 3x3 channels-last",
            x: [2, 4, 5, 6],
            o: 4,
            padding: (1, 1),
            groups: 4,
            permuted: true,
            ..BASE
        },
        Cfg {
            name: "depthwise stride 2 channels-last, no bias",
            x: [2, 4, 7, 6],
            o: 4,
            stride: (2, 2),
            padding: (1, 1),
            groups: 4,
            bias: false,
            permuted: true,
            ..BASE
        },
    ]
}

impl Cfg {
    fn w_shape(&self) -> [usize; 4] {
        [self.o, self.x[1] / self.groups, self.k.0, self.k.1]
    }

    /// The stored input: (N, H, W, C) when the op is to see a permuted view of it.
    fn x_stored(&self) -> [usize; 4] {
        let [n, c, h, w] = self.x;
        if self.permuted {
            [n, h, w, c]
        } else {
            self.x
        }
    }

    fn inputs(&self, dtype: DType, seed: u64) -> Vec<Tensor> {
        let mut v = vec![randn_as(&self.x_stored(), dtype, seed), randn_as(&self.w_shape(), dtype, seed + 1)];
        if self.bias {
            v.push(randn_as(&[self.o], dtype, seed + 2));
        }
        v
    }

    /// The (N, C, H, W) view the op sees.
    fn x_view(&self, stored: &Tensor) -> Result<Tensor> {
        if self.permuted {
            permute(stored, &[0, 3, 1, 2])
        } else {
            Ok(stored.clone())
        }
    }

    fn run(&self, t: &[Tensor]) -> Result<Tensor> {
        conv2d(&self.x_view(&t[0])?, &t[1], t.get(2), self.stride, self.padding, self.dilation, self.groups)
    }

    fn run_ref(&self, t: &[Tensor]) -> Result<Tensor> {
        conv2d_ref(&self.x_view(&t[0])?, &t[1], t.get(2), self.stride, self.padding, self.dilation, self.groups)
    }

    fn geom(&self) -> Conv2dGeom {
        Conv2dGeom::new(&self.x, &self.w_shape(), self.stride, self.padding, self.dilation, self.groups).unwrap()
    }
}

/// Gradients of sum(g * conv2d(x, w, b)) by the definition's loops, scattered instead of gathered: (dx, dw, db)
/// with dx in (N, C, H, W) order.
fn conv2d_grads_ref(x: &[f64], w: &[f64], gy: &[f64], g: &Conv2dGeom) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (cg, og) = (g.c / g.groups, g.o / g.groups);
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; g.o]);
    for n in 0..g.n {
        for o in 0..g.o {
            for a in 0..g.oh {
                for b in 0..g.ow {
                    let gv = gy[((n * g.o + o) * g.oh + a) * g.ow + b];
                    db[o] += gv;
                    for c in 0..cg {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let ih = (a * g.stride.0 + i * g.dilation.0) as isize - g.padding.0 as isize;
                                let iw = (b * g.stride.1 + j * g.dilation.1) as isize - g.padding.1 as isize;
                                if ih < 0 || iw < 0 || ih as usize >= g.h || iw as usize >= g.w {
                                    continue;
                                }
                                let xi = ((n * g.c + o / og * cg + c) * g.h + ih as usize) * g.w + iw as usize;
                                let wi = ((o * cg + c) * g.kh + i) * g.kw + j;
                                dx[xi] += gv * w[wi];
                                dw[wi] += gv * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

/// Tolerance of a kernel against the f64 references: f64 rounding, or f32 rounding over sums of tens of terms.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::F64 => 1e-12,
    }
}

#[test]
fn conv2d_matches_the_seven_loop_reference() {
    for dtype in [DType::F32, DType::F64] {
        for (k, cfg) in configs().into_iter().enumerate() {
            let t = cfg.inputs(dtype, 10 * k as u64);
            let y = cfg.run(&t).unwrap();
            assert_eq!(y.shape(), cfg.geom().out_shape(), "{}", cfg.name);
            assert_eq!(y.dtype(), dtype);
            // The reference reads the same (rounded) values, in f64.
            let t64: Vec<Tensor> = t.iter().map(|v| v.to_dtype(DType::F64).unwrap()).collect();
            let want = cfg.run_ref(&t64).unwrap().to_vec_f64().unwrap();
            assert_close(&y.to_vec_f64().unwrap(), &want, tol(dtype), &format!("{} {dtype}", cfg.name));
        }
    }
}

#[test]
fn known_values_of_a_small_conv() {
    // x = 1..16 as a 4x4 image, w = [[1, 0], [0, -1]], stride 2: each output is x[i][j] - x[i+1][j+1] = -5.
    let x = Tensor::from_vec((1..=16).map(|v| v as f64).collect(), &[1, 1, 4, 4]).unwrap();
    let w = Tensor::from_vec(vec![1.0, 0.0, 0.0, -1.0], &[1, 1, 2, 2]).unwrap();
    let b = Tensor::from_vec(vec![0.5], &[1]).unwrap();
    let y = conv2d(&x, &w, Some(&b), (2, 2), (0, 0), (1, 1), 1).unwrap();
    assert_eq!(y.shape(), &[1, 1, 2, 2]);
    assert_eq!(y.to_vec_f64().unwrap(), vec![-4.5; 4]);
    // Padding 1, stride 3 on a 4x4 input: OH = (4 + 2 - 2) / 3 + 1 = 2; the corner sees only -x[0][0].
    let y = conv2d(&x, &w, None, (3, 3), (1, 1), (1, 1), 1).unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), vec![-1.0, -4.0 + 0.0, -13.0, 11.0 - 16.0]);
}

#[test]
fn conv2d_gradients_match_the_loop_reference() {
    for dtype in [DType::F32, DType::F64] {
        for (k, cfg) in configs().into_iter().enumerate() {
            let t: Vec<Tensor> =
                cfg.inputs(dtype, 100 + 10 * k as u64).into_iter().map(|v| v.requires_grad_(true).unwrap()).collect();
            let y = cfg.run(&t).unwrap();
            let gy = randn_as(y.shape(), dtype, 7 + k as u64);
            y.backward_with(&gy).unwrap();
            let x_nchw = cfg.x_view(&t[0]).unwrap().to_vec_f64().unwrap();
            let (dx, dw, db) =
                conv2d_grads_ref(&x_nchw, &t[1].to_vec_f64().unwrap(), &gy.to_vec_f64().unwrap(), &cfg.geom());
            let what = |p: &str| format!("{} {dtype} d{p}", cfg.name);
            // x's gradient has the stored shape: read it through the same view to compare in NCHW order.
            let gx = cfg.x_view(&t[0].grad().unwrap()).unwrap().to_vec_f64().unwrap();
            assert_close(&gx, &dx, tol(dtype), &what("x"));
            assert_close(&t[1].grad().unwrap().to_vec_f64().unwrap(), &dw, tol(dtype), &what("w"));
            if cfg.bias {
                assert_close(&t[2].grad().unwrap().to_vec_f64().unwrap(), &db, tol(dtype), &what("bias"));
            }
        }
    }
}

#[test]
fn conv2d_gradients_match_finite_differences() {
    for (k, cfg) in configs().into_iter().enumerate() {
        let r = gradcheck(cfg.name, &cfg.inputs(DType::F64, 1000 + k as u64), |t| cfg.run(t)).unwrap();
        assert!(r.passed(), "{r}");
        assert!(r.max_abs_grad > 0.1, "{r}");
    }
}

/// A depthwise conv of a channels-last view (the MILA block's tokens seen as an image) runs in that layout and
/// answers in it; its values are those of the NCHW kernel on a contiguous copy, bit for bit for the output and
/// dx (the same terms added in the same order), and to rounding for the weight and bias gradients.
#[test]
fn depthwise_channels_last_matches_the_contiguous_kernel() {
    for dtype in [DType::F32, DType::F64] {
        for (k, cfg) in configs().into_iter().filter(|c| c.permuted && c.groups == c.x[1]).enumerate() {
            let t: Vec<Tensor> =
                cfg.inputs(dtype, 50 + k as u64).into_iter().map(|v| v.requires_grad_(true).unwrap()).collect();
            let x_cl = cfg.x_view(&t[0]).unwrap();
            assert!(is_channels_last(x_cl.layout()), "{}", cfg.name);
            let x_nchw = x_cl.detach().contiguous().unwrap().requires_grad_(true).unwrap();
            let run = |x: &Tensor| conv2d(x, &t[1], t.get(2), cfg.stride, cfg.padding, cfg.dilation, cfg.groups);
            let (y_cl, y) = (run(&x_cl).unwrap(), run(&x_nchw).unwrap());
            assert!(is_channels_last(y_cl.layout()), "{}: the output stays channels-last", cfg.name);
            assert_eq!(y_cl.to_vec_f64().unwrap(), y.to_vec_f64().unwrap(), "{} {dtype}", cfg.name);
            // The gradient reaches the op channels-last (through a view of channels-last memory) or as a
            // contiguous NCHW tensor: both give dx in the channels-last layout.
            let [n, _, oh, ow] = cfg.geom().out_shape();
            let gy_nhwc = randn_as(&[n, oh, ow, cfg.o], dtype, 9 + k as u64);
            let gy_view = permute(&gy_nhwc, &[0, 3, 1, 2]).unwrap();
            for gy in [gy_view.clone(), gy_view.contiguous().unwrap()] {
                for v in t.iter().chain([&x_nchw]) {
                    v.zero_grad();
                }
                y_cl.backward_retain(&gy).unwrap();
                let (gx_cl, gw_cl) = (t[0].grad().unwrap(), t[1].grad().unwrap());
                assert!(gx_cl.is_contiguous(), "{}: dx of the stored NHWC input is contiguous", cfg.name);
                let gb_cl = t.get(2).map(|b| b.grad().unwrap().to_vec_f64().unwrap());
                for v in &t {
                    v.zero_grad();
                }
                y.backward_retain(&gy).unwrap();
                let gx = permute(&x_nchw.grad().unwrap(), &[0, 2, 3, 1]).unwrap();
                assert_eq!(gx_cl.to_vec_f64().unwrap(), gx.to_vec_f64().unwrap(), "{} {dtype} dx", cfg.name);
                let what = format!("{} {dtype} dw", cfg.name);
                assert_close(
                    &gw_cl.to_vec_f64().unwrap(),
                    &t[1].grad().unwrap().to_vec_f64().unwrap(),
                    tol(dtype),
                    &what,
                );
                if let Some(gb_cl) = gb_cl {
                    let gb = t[2].grad().unwrap().to_vec_f64().unwrap();
                    assert_close(&gb_cl, &gb, tol(dtype), &format!("{} {dtype} db", cfg.name));
                }
            }
        }
    }
}

#[test]
fn only_the_needed_gradients_are_computed() {
    // A frozen input (the stem's image) gets no gradient; the weight still does.
    let cfg = configs()[0];
    let t = cfg.inputs(DType::F64, 3);
    let w = t[1].clone().requires_grad_(true).unwrap();
    let y = conv2d(&t[0], &w, None, cfg.stride, cfg.padding, cfg.dilation, cfg.groups).unwrap();
    crate::sum_all(&y).unwrap().backward().unwrap();
    assert!(t[0].grad().is_none());
    assert_eq!(w.grad().unwrap().shape(), w.shape());
}

#[test]
fn conv2d_bad_arguments_are_errors_naming_the_op_and_shapes() {
    let x = randn(&[2, 3, 5, 5], 1);
    let w = randn(&[4, 3, 3, 3], 2);
    let msg = |r: Result<Tensor>| {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("conv2d"), "{e}");
        e
    };
    let e = msg(conv2d(&x, &randn(&[4, 1, 3, 3], 3), None, (1, 1), (0, 0), (1, 1), 2));
    assert!(e.contains("groups 2") && e.contains("[2, 3, 5, 5]"), "{e}");
    assert!(matches!(
        conv2d(&x, &randn(&[4, 2, 3, 3], 3), None, (1, 1), (0, 0), (1, 1), 1),
        Err(Error::ShapeMismatch { op: "conv2d", .. })
    ));
    let e = msg(conv2d(&randn(&[2, 4, 5, 5], 3), &randn(&[3, 2, 3, 3], 3), None, (1, 1), (0, 0), (1, 1), 2));
    assert!(e.contains("output channels 3") && e.contains("[2, 4, 5, 5]"), "{e}");
    let e = msg(conv2d(&randn(&[3, 5, 5], 4), &w, None, (1, 1), (0, 0), (1, 1), 1));
    assert!(e.contains("[3, 5, 5]"), "{e}");
    let e = msg(conv2d(&x, &randn(&[4, 3, 7, 3], 5), None, (1, 1), (0, 0), (1, 1), 1));
    assert!(e.contains("does not fit") && e.contains("[4, 3, 7, 3]"), "{e}");
    msg(conv2d(&x, &w, None, (0, 1), (0, 0), (1, 1), 1));
    msg(conv2d(&x, &w, None, (1, 1), (0, 0), (1, 0), 1));
    msg(conv2d(&x, &w, None, (1, 1), (0, 0), (1, 1), 0));
    msg(conv2d(&x, &randn(&[4, 3, 0, 3], 6), None, (1, 1), (0, 0), (1, 1), 1));
    msg(conv2d(&x, &w, Some(&randn(&[3], 7)), (1, 1), (0, 0), (1, 1), 1));
    let w32 = randn_as(&[4, 3, 3, 3], DType::F32, 8);
    assert!(matches!(conv2d(&x, &w32, None, (1, 1), (0, 0), (1, 1), 1), Err(Error::DTypeMismatch { .. })));
    // A dilated kernel exactly as large as the padded input still fits (one output).
    let y = conv2d(&x, &w, None, (1, 1), (1, 1), (3, 3), 1).unwrap();
    assert_eq!(y.shape(), &[2, 4, 1, 1]);
}

#[test]
fn empty_batches_give_empty_outputs_and_gradients() {
    for groups in [1, 3] {
        let x = randn(&[0, 3, 4, 4], 1).requires_grad_(true).unwrap();
        let w = randn(&[3, 3 / groups, 3, 3], 2).requires_grad_(true).unwrap();
        let y = conv2d(&x, &w, None, (1, 1), (1, 1), (1, 1), groups).unwrap();
        assert_eq!(y.shape(), &[0, 3, 4, 4]);
        crate::sum_all(&y).unwrap().backward().unwrap();
        assert_eq!(w.grad().unwrap().to_vec_f64().unwrap(), vec![0.0; w.numel()]);
    }
}

/// Causal conv1d by PyTorch's recipe: Conv1d with k - 1 zeros on both sides, then the first L outputs.
fn causal_conv1d_ref(x: &[f64], w: &[f64], b: Option<&[f64]>, [bs, c, l, k]: [usize; 4]) -> Vec<f64> {
    let mut y = vec![0.0; bs * c * l];
    for n in 0..bs {
        for ch in 0..c {
            let mut padded = vec![0.0; k - 1];
            padded.extend_from_slice(&x[(n * c + ch) * l..][..l]);
            padded.extend(std::iter::repeat_n(0.0, k - 1));
            let full: Vec<f64> = (0..l + k - 1)
                .map(|t| b.map_or(0.0, |b| b[ch]) + (0..k).map(|j| w[ch * k + j] * padded[t + j]).sum::<f64>())
                .collect();
            y[(n * c + ch) * l..][..l].copy_from_slice(&full[..l]);
        }
    }
    y
}

#[test]
fn causal_conv1d_matches_the_padded_conv_reference() {
    for dtype in [DType::F32, DType::F64] {
        for (l, k, bias) in [(5, 4, true), (1, 4, true), (7, 3, false), (2, 1, true), (3, 5, true)] {
            let (bs, c) = (2, 3);
            let x = randn_as(&[bs, c, l], dtype, l as u64);
            let w = randn_as(&[c, 1, k], dtype, 20 + k as u64);
            let b = randn_as(&[c], dtype, 30);
            let y = causal_conv1d(&x, &w, bias.then_some(&b)).unwrap();
            assert_eq!(y.shape(), &[bs, c, l]);
            let bv = b.to_vec_f64().unwrap();
            let want = causal_conv1d_ref(
                &x.to_vec_f64().unwrap(),
                &w.to_vec_f64().unwrap(),
                bias.then_some(&bv[..]),
                [bs, c, l, k],
            );
            assert_close(&y.to_vec_f64().unwrap(), &want, tol(dtype), &format!("L {l} k {k} {dtype}"));
        }
    }
}

#[test]
fn causal_conv1d_is_a_depthwise_conv2d_with_left_padding() {
    // Conv2d over a (B, C, 1, L) image with k - 1 zeros on each side, cut to the first L columns.
    let (x, w, b) = (randn(&[2, 3, 6], 1), randn(&[3, 1, 4], 2), randn(&[3], 3));
    let y = causal_conv1d(&x, &w, Some(&b)).unwrap();
    let x4 = reshape(&x, &[2, 3, 1, 6]).unwrap();
    let w4 = reshape(&w, &[3, 1, 1, 4]).unwrap();
    let y4 = conv2d(&x4, &w4, Some(&b), (1, 1), (0, 3), (1, 1), 3).unwrap();
    let want = reshape(&narrow(&y4, 3, 0, 6).unwrap(), &[2, 3, 6]).unwrap();
    assert_close(&y.to_vec_f64().unwrap(), &want.to_vec_f64().unwrap(), 1e-14, "conv1d vs conv2d");
}

#[test]
fn causal_conv1d_gradients_match_the_reference_and_finite_differences() {
    for dtype in [DType::F32, DType::F64] {
        for l in [1, 5] {
            let (bs, c, k) = (2, 3, 4);
            let x = randn_as(&[bs, c, l], dtype, 40 + l as u64).requires_grad_(true).unwrap();
            let w = randn_as(&[c, 1, k], dtype, 41).requires_grad_(true).unwrap();
            let b = randn_as(&[c], dtype, 42).requires_grad_(true).unwrap();
            let y = causal_conv1d(&x, &w, Some(&b)).unwrap();
            let gy = randn_as(y.shape(), dtype, 43);
            y.backward_with(&gy).unwrap();
            // The reference gradients by the scatter form of the definition.
            let (xv, wv, gv) = (x.to_vec_f64().unwrap(), w.to_vec_f64().unwrap(), gy.to_vec_f64().unwrap());
            let (mut dx, mut dw, mut db) = (vec![0.0; xv.len()], vec![0.0; wv.len()], vec![0.0; c]);
            for n in 0..bs {
                for ch in 0..c {
                    for t in 0..l {
                        let row = (n * c + ch) * l;
                        db[ch] += gv[row + t];
                        for j in 0..k {
                            if t + j + 1 >= k {
                                let s = t + j + 1 - k;
                                dx[row + s] += gv[row + t] * wv[ch * k + j];
                                dw[ch * k + j] += gv[row + t] * xv[row + s];
                            }
                        }
                    }
                }
            }
            let what = |p: &str| format!("L {l} {dtype} d{p}");
            assert_close(&x.grad().unwrap().to_vec_f64().unwrap(), &dx, tol(dtype), &what("x"));
            assert_close(&w.grad().unwrap().to_vec_f64().unwrap(), &dw, tol(dtype), &what("w"));
            assert_close(&b.grad().unwrap().to_vec_f64().unwrap(), &db, tol(dtype), &what("bias"));
        }
    }
    for l in [1, 5] {
        // Also on a (B, L, C) tensor viewed as (B, C, L), as the mixer holds its tokens.
        let t = [randn(&[2, l, 3], 50), randn(&[3, 1, 4], 51), randn(&[3], 52)];
        let r = gradcheck("causal_conv1d", &t, |t| causal_conv1d(&permute(&t[0], &[0, 2, 1])?, &t[1], Some(&t[2])))
            .unwrap();
        assert!(r.passed(), "{r}");
        let r = gradcheck("causal_conv1d no bias", &t[..2], |t| causal_conv1d(&crate::view::t(&t[0])?, &t[1], None))
            .unwrap();
        assert!(r.passed(), "{r}");
    }
}

#[test]
fn causal_conv1d_bad_shapes_are_errors() {
    let x = randn(&[2, 3, 5], 1);
    for w in [randn(&[3, 2, 4], 2), randn(&[4, 1, 4], 3), randn(&[3, 1, 0], 4), randn(&[3, 4], 5)] {
        let e = causal_conv1d(&x, &w, None).unwrap_err().to_string();
        assert!(e.contains("causal_conv1d") && e.contains("[2, 3, 5]"), "{e}");
    }
    assert!(causal_conv1d(&randn(&[3, 5], 6), &randn(&[3, 1, 4], 7), None).is_err());
    assert!(causal_conv1d(&x, &randn(&[3, 1, 4], 8), Some(&randn(&[2], 9))).is_err());
}

// ---- CUDA against the CPU ------------------------------------------------------------------------------

/// ||a - b|| / ||b|| over all elements (0 when they are equal).
fn rel_error(a: &[f64], b: &[f64]) -> f64 {
    let num = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if num == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// Runs `f` on `leaves` on the CPU and on copies of them on CUDA device 0, with one random cotangent: the
/// output and the gradient of every leaf marked in `grads` must agree within 1e-5 (f32) or 1e-12 (f64) of
/// their norm, and the other leaves must get no gradient on either device. New device buffers are poisoned
/// with NaN, so an element a kernel leaves unwritten fails. Shared by the vision families' CUDA tests.
pub(crate) fn assert_cuda_matches_cpu(
    what: &str,
    leaves: &[Tensor],
    grads: &[bool],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let dtype = leaves[0].dtype();
    let tol = match dtype {
        DType::F32 => 1e-5,
        DType::F64 => 1e-12,
    };
    let run = |device: Device| {
        let t: Vec<Tensor> = leaves
            .iter()
            .zip(grads)
            .map(|(l, &g)| l.to_device(device).unwrap().detach().requires_grad_(g).unwrap())
            .collect();
        let y = f(&t).unwrap_or_else(|e| panic!("{what} on {device}: {e}"));
        assert_eq!(y.device(), device, "{what}");
        let cot = randn_as(y.shape(), dtype, 77).to_device(device).unwrap();
        y.backward_with(&cot).unwrap_or_else(|e| panic!("{what} backward on {device}: {e}"));
        let mut out = vec![Some(y.to_vec_f64().unwrap())];
        out.extend(t.iter().map(|l| l.grad().map(|g| g.to_vec_f64().unwrap())));
        out
    };
    let poison = engine::cuda::poison_new_allocations();
    let gpu = run(Device::Cuda(0));
    drop(poison);
    let cpu = run(Device::Cpu);
    for (i, (a, b)) in gpu.iter().zip(&cpu).enumerate() {
        let part = if i == 0 { "output".to_string() } else { format!("grad of input {}", i - 1) };
        match (a, b) {
            (Some(a), Some(b)) => {
                let e = rel_error(a, b);
                assert!(e <= tol, "{what} {dtype}: {part}: relative error {e:.3e} > {tol:e}");
            }
            (None, None) => {}
            _ => panic!("{what} {dtype}: {part} exists on one device only"),
        }
    }
}

/// The CUDA tests' configs: `configs()`, plus larger ones whose block reductions span several warps, and the
/// tilings of the depthwise kernels (see `dw_plan` in cuda.rs, whose tests check the tiles on the host): whole
/// planes, several samples of a channel per block (a last group with fewer), bands of rows (a plane too tall
/// for the shared memory, and few planes split for the grid), both 3x3 instances with odd sizes, paddings 0
/// and 2 and one sample, the run-time instance (5x5, dilated, a 3x2 kernel), and planes too wide for any tile
/// (the untiled kernels); the direct 3x3 stride-2 padding-1 kernels (`dw_s2_plan`) at odd sides, the patch
/// merging's sides and a row wider than a warp. Also more groups than samples (the GEMMs then loop over the samples). The dense
/// path's chunks of samples are covered on the host, in cuda.rs.
fn cuda_configs() -> Vec<Cfg> {
    let mut v = configs();
    let dw =
        |name, x: [usize; 4], k, stride, padding| Cfg { name, x, o: x[1], k, stride, padding, groups: x[1], ..BASE };
    v.push(dw("depthwise 3x3 large", [4, 8, 17, 19], (3, 3), (1, 1), (1, 1)));
    // 64x64 planes, 12 of them: bands of rows so that the grid has a few blocks per multiprocessor.
    v.push(dw("depthwise 3x3 bands", [6, 2, 64, 64], (3, 3), (1, 1), (1, 1)));
    // 1056 planes of 5x5: four samples of a channel per block, the last group of two.
    v.push(dw("depthwise 3x3 grouped planes", [22, 48, 5, 5], (3, 3), (1, 1), (1, 1)));
    v.push(dw("depthwise 3x3 grouped planes stride 2", [22, 48, 7, 5], (3, 3), (2, 2), (1, 1)));
    // A plane too tall for one tile (f32 forward: 42 rows of 200 floats is over 24 KiB).
    v.push(dw("depthwise 3x3 tall plane", [1, 2, 40, 200], (3, 3), (1, 1), (1, 1)));
    v.push(dw("depthwise 3x3 stride 2 odd", [3, 5, 13, 11], (3, 3), (2, 2), (1, 1)));
    // The patch merging's shapes at a small batch (the direct stride-2 kernels: even sides, pair accesses; a
    // channel's items over several blocks at 56x56) and a row wider than a warp.
    v.push(dw("depthwise 3x3 stride 2 merge 56", [6, 3, 56, 56], (3, 3), (2, 2), (1, 1)));
    v.push(dw("depthwise 3x3 stride 2 merge 28", [4, 6, 28, 28], (3, 3), (2, 2), (1, 1)));
    v.push(dw("depthwise 3x3 stride 2 merge 14", [5, 8, 14, 14], (3, 3), (2, 2), (1, 1)));
    v.push(dw("depthwise 3x3 stride 2 wide", [2, 2, 9, 131], (3, 3), (2, 2), (1, 1)));
    v.push(dw("depthwise 3x3 stride 2 no padding", [2, 3, 8, 9], (3, 3), (2, 2), (0, 0)));
    v.push(dw("depthwise 3x3 no padding", [1, 3, 9, 13], (3, 3), (1, 1), (0, 0)));
    v.push(dw("depthwise 3x3 padding 2", [1, 3, 10, 4], (3, 3), (1, 1), (2, 2)));
    v.push(dw("depthwise 3x3 one pixel", [1, 2, 1, 1], (3, 3), (1, 1), (1, 1)));
    v.push(dw("depthwise 5x5 stride 2", [2, 4, 11, 9], (5, 5), (2, 2), (2, 2)));
    v.push(dw("depthwise 3x2 stride (2, 1)", [2, 3, 9, 10], (3, 2), (2, 1), (1, 0)));
    // Wider than any tile (f64: one run of 6 rows of 1100 doubles is over the budget): the untiled kernels.
    v.push(dw("depthwise 3x3 wide plane", [1, 2, 3, 1100], (3, 3), (1, 1), (1, 1)));
    // Channels-last views (the MILA blocks' token images): the NHWC kernels, 16-byte accesses when C allows
    // (f32: C a multiple of 4; f64: of 2), single elements otherwise; strips with a partial last one; H or W of
    // 1; stride 2 with and without padding; the run-time instance; several blocks along the channels (C / V over
    // 32) and threads walking several items.
    let cl = |name, x: [usize; 4], k, stride, padding| Cfg {
        name,
        x,
        o: x[1],
        k,
        stride,
        padding,
        groups: x[1],
        permuted: true,
        ..BASE
    };
    v.push(cl("channels-last 3x3 C 8", [3, 8, 9, 11], (3, 3), (1, 1), (1, 1)));
    v.push(cl("channels-last 3x3 C 6", [2, 6, 7, 5], (3, 3), (1, 1), (1, 1)));
    v.push(cl("channels-last 3x3 C 5 no padding", [3, 5, 6, 9], (3, 3), (1, 1), (0, 0)));
    v.push(cl("channels-last 3x3 H 1", [2, 4, 1, 7], (3, 3), (1, 1), (1, 1)));
    v.push(cl("channels-last 3x3 W 1", [2, 4, 6, 1], (3, 3), (1, 1), (1, 1)));
    v.push(cl("channels-last 3x3 padding 2", [2, 12, 17, 19], (3, 3), (1, 1), (2, 2)));
    v.push(cl("channels-last 3x3 stride 2", [2, 8, 9, 11], (3, 3), (2, 2), (1, 1)));
    v.push(cl("channels-last 3x3 stride 2 C 5 no padding", [3, 5, 7, 6], (3, 3), (2, 2), (0, 0)));
    v.push(cl("channels-last 3x3 stride 2 on 2x2", [4, 16, 2, 2], (3, 3), (2, 2), (1, 1)));
    v.push(cl("channels-last 5x5 stride 2", [2, 8, 11, 9], (5, 5), (2, 2), (2, 2)));
    v.push(cl("channels-last 3x2 stride (2, 1)", [2, 4, 9, 10], (3, 2), (2, 1), (1, 0)));
    v.push(Cfg { dilation: (2, 3), ..cl("channels-last dilated", [2, 6, 9, 8], (3, 3), (1, 1), (2, 3)) });
    v.push(cl("channels-last 1x1", [2, 4, 5, 6], (1, 1), (1, 1), (0, 0)));
    v.push(cl("channels-last 3x3 C 260", [2, 260, 6, 7], (3, 3), (1, 1), (1, 1)));
    // The MNIST model's shapes (batch 128, 16 to 128 channels, 16x16 down to 2x2) and an MLLA stage at batch 4.
    for (c, hw) in [(16, 16), (32, 8), (64, 4), (128, 2)] {
        v.push(cl("channels-last MNIST", [128, c, hw, hw], (3, 3), (1, 1), (1, 1)));
    }
    v.push(cl("channels-last MLLA stage 2", [4, 128, 28, 28], (3, 3), (1, 1), (1, 1)));
    v.push(Cfg { name: "dense large", x: [3, 6, 15, 13], o: 10, stride: (2, 1), padding: (1, 2), ..BASE });
    // The implicit GEMM's tiles: two tiles of output channels and of columns, K not a multiple of its step.
    v.push(Cfg { name: "dense 40 channels", x: [2, 8, 16, 16], o: 40, padding: (1, 1), ..BASE });
    // dx of a stride-1 dense conv as the conv of g with the flipped weight (`input_grad_conv`): the stem's
    // 3x3 padding 1 at 32 channels, no padding (padding 2 in the transposed conv), a 5x3 kernel with padding
    // (2, 0), an even kernel; a padding as large as the kernel keeps im2col + col2im.
    v.push(Cfg { name: "dense stem 3x3", x: [2, 32, 12, 10], o: 32, padding: (1, 1), ..BASE });
    v.push(Cfg { name: "dense 3x3 no padding", x: [2, 5, 9, 8], o: 7, ..BASE });
    v.push(Cfg { name: "dense 5x3 padding (2, 0)", x: [3, 4, 9, 7], o: 6, k: (5, 3), padding: (2, 0), ..BASE });
    v.push(Cfg { name: "dense 2x2 padding 1", x: [2, 3, 6, 5], o: 4, k: (2, 2), padding: (1, 1), ..BASE });
    v.push(Cfg { name: "dense padding 3 on 3x3", x: [2, 3, 5, 6], o: 4, padding: (3, 3), ..BASE });
    v.push(Cfg {
        name: "grouped 64 channels stride 2",
        x: [4, 16, 9, 9],
        o: 64,
        stride: (2, 2),
        padding: (1, 1),
        groups: 4,
        ..BASE
    });
    v.push(Cfg {
        name: "groups 3 (more groups than samples)",
        x: [2, 6, 6, 6],
        o: 9,
        groups: 3,
        padding: (1, 1),
        ..BASE
    });
    v
}

#[test]
fn conv2d_on_cuda_matches_the_cpu() {
    if engine::cuda::test_device_or_skip("conv2d_on_cuda_matches_the_cpu").is_none() {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        for (k, cfg) in cuda_configs().into_iter().enumerate() {
            let t = cfg.inputs(dtype, 500 + 10 * k as u64);
            assert_cuda_matches_cpu(cfg.name, &t, &vec![true; t.len()], |t| cfg.run(t));
            // A frozen input (the stem's image): only the weight and bias gradients are computed.
            let mut grads = vec![true; t.len()];
            grads[0] = false;
            assert_cuda_matches_cpu(&format!("{} frozen x", cfg.name), &t, &grads, |t| cfg.run(t));
        }
    }
}

#[test]
fn conv2d_on_cuda_handles_empty_batches() {
    if engine::cuda::test_device_or_skip("conv2d_on_cuda_handles_empty_batches").is_none() {
        return;
    }
    for groups in [1, 3] {
        let t = [randn(&[0, 3, 4, 4], 1), randn(&[3, 3 / groups, 3, 3], 2), randn(&[3], 3)];
        assert_cuda_matches_cpu("empty batch", &t, &[true; 3], |t| {
            conv2d(&t[0], &t[1], Some(&t[2]), (1, 1), (1, 1), (1, 1), groups)
        });
    }
}

#[test]
fn causal_conv1d_on_cuda_matches_the_cpu() {
    if engine::cuda::test_device_or_skip("causal_conv1d_on_cuda_matches_the_cpu").is_none() {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        for (l, k, bias) in [(5, 4, true), (1, 4, true), (7, 3, false), (2, 1, true), (3, 5, true), (300, 4, true)] {
            let (bs, c) = (3, 5);
            // x stored (B, L, C) as a mixer holds its tokens, seen as (B, C, L).
            let t = [randn_as(&[bs, l, c], dtype, l as u64), randn_as(&[c, 1, k], dtype, 7), randn_as(&[c], dtype, 8)];
            let n = if bias { 3 } else { 2 };
            assert_cuda_matches_cpu(&format!("causal_conv1d L {l} k {k}"), &t[..n], &vec![true; n], |t| {
                causal_conv1d(&permute(&t[0], &[0, 2, 1])?, &t[1], t.get(2))
            });
        }
    }
}

/// On CUDA, a depthwise conv of a channels-last view runs in that layout (the NHWC kernels): its output is a
/// channels-last view, x's gradient comes back in the stored (N, H, W, C) order, and the values agree with the
/// NCHW kernels on a contiguous copy, forward and every gradient, for the gradient arriving channels-last (the
/// tokens' gradient) or contiguous. Also a view whose memory starts off 16-byte alignment (the scalar kernels).
#[test]
fn depthwise_channels_last_on_cuda_matches_the_nchw_kernels() {
    let Some(_dev) = engine::cuda::test_device_or_skip("depthwise_channels_last_on_cuda_matches_the_nchw_kernels")
    else {
        return;
    };
    let cuda = Device::Cuda(0);
    let cfgs: Vec<Cfg> = cuda_configs().into_iter().filter(|c| c.permuted && c.groups == c.x[1]).collect();
    assert!(cfgs.len() >= 10);
    for dtype in [DType::F32, DType::F64] {
        let tol = match dtype {
            DType::F32 => 1e-5,
            DType::F64 => 1e-12,
        };
        for (k, cfg) in cfgs.iter().enumerate() {
            for misaligned in [false, true] {
                let what = format!("{} {dtype}{}", cfg.name, if misaligned { " misaligned" } else { "" });
                let t: Vec<Tensor> =
                    cfg.inputs(dtype, 900 + k as u64).into_iter().map(|v| v.to_device(cuda).unwrap()).collect();
                // The stored NHWC input, or the same values one element into a larger buffer.
                let stored = if misaligned {
                    let flat = reshape(&t[0], &[-1]).unwrap();
                    let pad = Tensor::zeros(&[1], dtype, cuda).unwrap();
                    let shifted = crate::concat(&[pad, flat], 0).unwrap();
                    let len = t[0].numel();
                    let s = cfg.x_stored().map(|v| v as isize);
                    reshape(&narrow(&shifted, 0, 1, len).unwrap(), &s).unwrap()
                } else {
                    t[0].clone()
                };
                let x_nhwc = stored.detach().requires_grad_(true).unwrap();
                let x_cl = cfg.x_view(&x_nhwc).unwrap();
                assert!(is_channels_last(x_cl.layout()), "{what}");
                assert_eq!(x_cl.layout().offset(), usize::from(misaligned), "{what}");
                let x_nchw = x_cl.detach().contiguous().unwrap().requires_grad_(true).unwrap();
                let w = t[1].detach().requires_grad_(true).unwrap();
                let b = t.get(2).map(|b| b.detach().requires_grad_(true).unwrap());
                let run = |x: &Tensor| conv2d(x, &w, b.as_ref(), cfg.stride, cfg.padding, cfg.dilation, cfg.groups);
                let (y_cl, y) = (run(&x_cl).unwrap(), run(&x_nchw).unwrap());
                assert!(is_channels_last(y_cl.layout()), "{what}: the output stays channels-last");
                let v = |t: &Tensor| t.to_vec_f64().unwrap();
                let e = rel_error(&v(&y_cl), &v(&y));
                assert!(e <= tol, "{what}: output relative error {e:.3e}");
                let [n, _, oh, ow] = cfg.geom().out_shape();
                let gy_view = permute(&randn_as(&[n, oh, ow, cfg.o], dtype, 7 + k as u64), &[0, 3, 1, 2])
                    .unwrap()
                    .to_device(cuda)
                    .unwrap();
                for gy in [gy_view.clone(), gy_view.contiguous().unwrap()] {
                    let leaves: Vec<&Tensor> = [&x_nhwc, &x_nchw, &w].into_iter().chain(b.as_ref()).collect();
                    leaves.iter().for_each(|l| l.zero_grad());
                    y_cl.backward_retain(&gy).unwrap();
                    let gx_cl = x_nhwc.grad().unwrap();
                    assert!(gx_cl.is_contiguous(), "{what}: dx of the stored NHWC input is contiguous");
                    let (gw_cl, gb_cl) = (v(&w.grad().unwrap()), b.as_ref().map(|b| v(&b.grad().unwrap())));
                    leaves.iter().for_each(|l| l.zero_grad());
                    y.backward_retain(&gy).unwrap();
                    let gx = permute(&x_nchw.grad().unwrap(), &[0, 2, 3, 1]).unwrap();
                    let mut errors =
                        vec![("dx", rel_error(&v(&gx_cl), &v(&gx))), ("dw", rel_error(&gw_cl, &v(&w.grad().unwrap())))];
                    if let (Some(gb_cl), Some(b)) = (gb_cl, &b) {
                        errors.push(("db", rel_error(&gb_cl, &v(&b.grad().unwrap()))));
                    }
                    for (part, e) in errors {
                        assert!(e <= tol, "{what}: {part} relative error {e:.3e}");
                    }
                }
            }
        }
    }
}

/// The NHWC kernels' gradients on CUDA against central differences of their own forward, in f64.
#[test]
fn depthwise_channels_last_on_cuda_passes_gradcheck() {
    let Some(_dev) = engine::cuda::test_device_or_skip("depthwise_channels_last_on_cuda_passes_gradcheck") else {
        return;
    };
    let small = |c: &Cfg| c.permuted && c.groups == c.x[1] && c.x.iter().product::<usize>() <= 600;
    let cfgs: Vec<Cfg> = cuda_configs().into_iter().filter(small).collect();
    assert!(cfgs.len() >= 8);
    for (k, cfg) in cfgs.iter().enumerate() {
        let t: Vec<Tensor> =
            cfg.inputs(DType::F64, 300 + k as u64).into_iter().map(|v| v.to_device(Device::Cuda(0)).unwrap()).collect();
        // atol 1e-8: central differences at eps 1e-6 of an O(1) loss summed on the GPU carry ~1e-8 of
        // roundoff (one element was off by 6.9e-9 at the default 1e-9); a wrong gradient is off by O(1).
        let opts = engine::GradcheckOptions { atol: 1e-8, ..Default::default() };
        let r = engine::gradcheck_with(cfg.name, &t, opts, |t| cfg.run(t)).unwrap();
        assert!(r.passed(), "{r}");
    }
}

/// The NHWC kernels' weight and bias gradients are sums in a fixed order: the same inputs give the same bits.
#[test]
fn depthwise_channels_last_on_cuda_is_deterministic() {
    let Some(_dev) = engine::cuda::test_device_or_skip("depthwise_channels_last_on_cuda_is_deterministic") else {
        return;
    };
    let cfg = cuda_configs().into_iter().find(|c| c.name == "channels-last MLLA stage 2").unwrap();
    let t: Vec<Tensor> = cfg.inputs(DType::F32, 5).into_iter().map(|v| v.to_device(Device::Cuda(0)).unwrap()).collect();
    let grads = || {
        let leaves: Vec<Tensor> = t.iter().map(|v| v.detach().requires_grad_(true).unwrap()).collect();
        let y = cfg.run(&leaves).unwrap();
        y.backward_with(&randn_as(y.shape(), DType::F32, 6).to_device(Device::Cuda(0)).unwrap()).unwrap();
        leaves.iter().map(|l| l.grad().unwrap().to_vec_f64().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(grads(), grads());
}

#[test]
#[ignore = "needs g++: compiles conv.cu for the scan's CPU emulator, runs dwl_*, dw_s2_* and conv_igemm (minutes)"]
fn conv_channels_last_kernels_run_on_the_emulator() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/conv/emu");
    let exe = std::env::temp_dir().join(format!("mila_conv_emu_{}", std::process::id()));
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

/// y and the gradients of `leaves` under a random cotangent (seed `seed`, on y's device), as bits on the host:
/// what the bitwise-composition tests compare.
fn output_and_grad_bits(y: &Tensor, seed: u64, leaves: &[&Tensor]) -> Vec<Vec<u64>> {
    let cot = randn_as(y.shape(), y.dtype(), seed).to_device(y.device()).unwrap();
    y.backward_with(&cot).unwrap();
    let host = |t: &Tensor| bits(&t.to_device(Device::Cpu).unwrap());
    std::iter::once(host(y)).chain(leaves.iter().map(|p| host(&p.grad().unwrap()))).collect()
}

/// How the fused conv + activation is used in a conv2d_act test: x's layout and what follows the activation.
#[derive(Clone, Copy, Debug)]
enum ActUse {
    /// x contiguous NCHW (the NCHW kernels), the cotangent on the image.
    Nchw,
    /// x the channels-last image view of tokens (B, H W, C), the output read back as tokens: the MILA block's
    /// `silu(dwc(t))`, whose composition applies the activation on the tokens view.
    Tokens,
    /// x channels-last, the cotangent contiguous NCHW (not in the output's memory order).
    ChannelsLastNchwGrad,
}

/// Output and the gradients of (x, w, b) as bits, fused or composed, for a depthwise 3x3 conv (or a dense one
/// with `groups` 1) under a fixed cotangent.
fn conv2d_act_run(
    fused: bool,
    dtype: DType,
    device: Device,
    act: crate::Unary,
    usage: ActUse,
    groups: usize,
) -> Vec<Vec<u64>> {
    // C = 8: whole 16-byte vectors of f32 and f64 (the CUDA channels-last kernels' vector path).
    let (n, c, h, w) = (2, 8, 5, 4);
    let on = |t: Tensor| t.to_device(device).unwrap().requires_grad_(true).unwrap();
    let tokens = on(randn_as(&[n, h * w, c], dtype, 71));
    let nchw = on(randn_as(&[n, c, h, w], dtype, 71));
    let weight = on(randn_as(&[c, c / groups, 3, 3], dtype, 72));
    let bias = on(randn_as(&[c], dtype, 73));
    let (leaf, x) = match usage {
        ActUse::Nchw => (&nchw, nchw.clone()),
        _ => (
            &tokens,
            permute(&reshape(&tokens, &[n as isize, h as isize, w as isize, c as isize]).unwrap(), &[0, 3, 1, 2])
                .unwrap(),
        ),
    };
    let to_tokens = |y: &Tensor| reshape(&permute(y, &[0, 2, 3, 1]).unwrap(), &[n as isize, -1, c as isize]).unwrap();
    let y = match (fused, usage) {
        (true, ActUse::Tokens) => {
            to_tokens(&conv2d_act(&x, &weight, Some(&bias), (1, 1), (1, 1), (1, 1), groups, act).unwrap())
        }
        (true, _) => conv2d_act(&x, &weight, Some(&bias), (1, 1), (1, 1), (1, 1), groups, act).unwrap(),
        (false, ActUse::Tokens) => {
            crate::unary(act, &to_tokens(&conv2d(&x, &weight, Some(&bias), (1, 1), (1, 1), (1, 1), groups).unwrap()))
                .unwrap()
        }
        (false, _) => {
            crate::unary(act, &conv2d(&x, &weight, Some(&bias), (1, 1), (1, 1), (1, 1), groups).unwrap()).unwrap()
        }
    };
    output_and_grad_bits(&y, 74, &[leaf, &weight, &bias])
}

/// An activation the conv kernels do not apply (its own pass after the conv on every path).
const SOFTPLUS: crate::Unary = crate::Unary::Softplus { beta: 1.0, threshold: 20.0 };

fn assert_conv2d_act_is_the_composition(device: Device) {
    for dtype in [DType::F32, DType::F64] {
        for act in [crate::Unary::Silu, crate::Unary::Gelu, crate::Unary::Relu, SOFTPLUS] {
            for usage in [ActUse::Nchw, ActUse::Tokens, ActUse::ChannelsLastNchwGrad] {
                for groups in [8, 1] {
                    assert_eq!(
                        conv2d_act_run(true, dtype, device, act, usage, groups),
                        conv2d_act_run(false, dtype, device, act, usage, groups),
                        "{device:?} {dtype:?}, {act:?}, {usage:?}, groups {groups}"
                    );
                }
            }
        }
    }
}

#[test]
fn conv2d_act_on_cuda_is_the_composition_bit_for_bit() {
    // The channels-last depthwise kernels apply ReLU, SiLU and GELU as they store (softplus: a separate pass).
    if engine::cuda::test_device_or_skip("conv2d_act_on_cuda_is_the_composition_bit_for_bit").is_none() {
        return;
    }
    assert_conv2d_act_is_the_composition(Device::Cuda(0));
}

#[test]
fn conv2d_act_is_bitwise_the_composition_and_gradchecks() {
    assert_conv2d_act_is_the_composition(Device::Cpu);
    // Strided and padded, depthwise, on a channels-last view and on a permuted (copied) input.
    let x = permute(&randn(&[2, 5, 4, 3], 81), &[0, 3, 1, 2]).unwrap();
    let r = gradcheck("conv2d_act", &[x, randn(&[3, 1, 3, 3], 82), randn(&[3], 83)], |x| {
        conv2d_act(&x[0], &x[1], Some(&x[2]), (2, 1), (1, 1), (1, 1), 3, crate::Unary::Silu)
    })
    .unwrap();
    assert!(r.passed(), "{r}");
    let r = gradcheck("conv2d_act (NCHW, dense)", &[randn(&[2, 2, 4, 5], 84), randn(&[3, 2, 3, 3], 85)], |x| {
        conv2d_act(&x[0], &x[1], None, (1, 1), (1, 1), (1, 1), 1, crate::Unary::Gelu)
    })
    .unwrap();
    assert!(r.passed(), "{r}");
}

#[test]
fn conv2d_act_bad_inputs_are_errors() {
    let (x, w) = (randn(&[1, 2, 4, 4], 1), randn(&[2, 1, 3, 3], 2));
    let silu = crate::Unary::Silu;
    assert!(conv2d_act(&x, &w, None, (1, 1), (1, 1), (1, 1), 2, crate::Unary::Exp).is_err());
    assert!(conv2d_act(&x, &w, None, (1, 1), (1, 1), (1, 1), 3, silu).is_err(), "groups do not divide");
    assert!(conv2d_act(&x, &w, Some(&randn(&[3], 3)), (1, 1), (1, 1), (1, 1), 2, silu).is_err());
    assert!(conv2d_act(&randn(&[2, 4, 4], 4), &w, None, (1, 1), (1, 1), (1, 1), 2, silu).is_err());
}

/// Output and the gradients of (x, w, b) as bits for x + conv2d(x), fused ([`conv2d_residual`]) or composed,
/// on `device`: depthwise 3x3 on the channels-last image view of tokens (the MILA block's cpe, the tokens
/// view's cotangent), or a dense (`groups` 1) conv on NCHW.
fn conv2d_residual_run(fused: bool, dtype: DType, device: Device, tokens_view: bool, groups: usize) -> Vec<Vec<u64>> {
    let (n, c, h, w) = (2, 8, 5, 6);
    let on = |t: Tensor| t.to_device(device).unwrap().requires_grad_(true).unwrap();
    let tokens = on(randn_as(&[n, h * w, c], dtype, 91));
    let nchw = on(randn_as(&[n, c, h, w], dtype, 91));
    let weight = on(randn_as(&[c, c / groups, 3, 3], dtype, 92));
    let bias = on(randn_as(&[c], dtype, 93));
    let (leaf, x) = if tokens_view {
        let img = reshape(&tokens, &[n as isize, h as isize, w as isize, c as isize]).unwrap();
        (&tokens, permute(&img, &[0, 3, 1, 2]).unwrap())
    } else {
        (&nchw, nchw.clone())
    };
    let y = if fused {
        conv2d_residual(&x, &weight, Some(&bias), (1, 1), (1, 1), (1, 1), groups).unwrap()
    } else {
        crate::add(&x, &conv2d(&x, &weight, Some(&bias), (1, 1), (1, 1), (1, 1), groups).unwrap()).unwrap()
    };
    // The cotangent in the tokens' order when x came from them (as the block's), else NCHW.
    let y = if tokens_view {
        reshape(&permute(&y, &[0, 2, 3, 1]).unwrap(), &[n as isize, -1, c as isize]).unwrap()
    } else {
        y
    };
    output_and_grad_bits(&y, 94, &[leaf, &weight, &bias])
}

fn assert_conv2d_residual_is_the_composition(device: Device) {
    for dtype in [DType::F32, DType::F64] {
        for (tokens_view, groups) in [(true, 8), (false, 8), (false, 1), (true, 1)] {
            assert_eq!(
                conv2d_residual_run(true, dtype, device, tokens_view, groups),
                conv2d_residual_run(false, dtype, device, tokens_view, groups),
                "{device:?} {dtype:?}, tokens view {tokens_view}, groups {groups}"
            );
        }
    }
}

#[test]
fn conv2d_residual_is_bitwise_the_composition_and_gradchecks() {
    assert_conv2d_residual_is_the_composition(Device::Cpu);
    // The op is linear in each input, so the central difference has no truncation error, and a step larger than
    // the default lowers its rounding error, which the residual's x term (a larger projected output) raises.
    let opts = engine::GradcheckOptions { eps: 1e-4, ..Default::default() };
    let x = permute(&randn(&[2, 5, 4, 3], 95), &[0, 3, 1, 2]).unwrap();
    let r = engine::gradcheck_with("conv2d_residual", &[x, randn(&[3, 1, 3, 3], 96), randn(&[3], 97)], opts, |x| {
        conv2d_residual(&x[0], &x[1], Some(&x[2]), (1, 1), (1, 1), (1, 1), 3)
    })
    .unwrap();
    assert!(r.passed() && r.max_abs_grad > 0.1, "{r}");
    let leaves = [randn(&[2, 2, 4, 5], 98), randn(&[2, 2, 5, 5], 99)];
    let r = engine::gradcheck_with("conv2d_residual (NCHW, dense, 5x5)", &leaves, opts, |x| {
        conv2d_residual(&x[0], &x[1], None, (1, 1), (2, 2), (1, 1), 1)
    })
    .unwrap();
    assert!(r.passed(), "{r}");
}

#[test]
fn conv2d_residual_on_cuda_is_the_composition_bit_for_bit() {
    if engine::cuda::test_device_or_skip("conv2d_residual_on_cuda_is_the_composition_bit_for_bit").is_none() {
        return;
    }
    assert_conv2d_residual_is_the_composition(Device::Cuda(0));
}

#[test]
fn conv2d_residual_needs_the_input_shape_back() {
    let (x, w) = (randn(&[1, 2, 4, 4], 1), randn(&[2, 1, 3, 3], 2));
    let e = conv2d_residual(&x, &w, None, (2, 2), (1, 1), (1, 1), 2).unwrap_err().to_string();
    assert!(e.contains("conv2d_residual") && e.contains("[1, 2, 4, 4]") && e.contains("[1, 2, 2, 2]"), "{e}");
    assert!(conv2d_residual(&x, &w, None, (1, 1), (0, 0), (1, 1), 2).is_err(), "no padding: 2x2 out");
    assert!(conv2d_residual(&x, &randn(&[4, 1, 3, 3], 3), None, (1, 1), (1, 1), (1, 1), 2).is_err(), "4 channels out");
    assert!(conv2d_residual(&x, &w, None, (1, 1), (1, 1), (1, 1), 3).is_err(), "groups do not divide");
}
