//! The naive conv2d, for tests: the definition in the module table as seven nested loops, in f64.

use engine::{Result, Tensor};

/// conv2d by its definition: loops over n, o, a, b, c, i, j, accumulated in f64 and returned in x's dtype;
/// no gradient. Same arguments and checks as [`super::conv2d`].
pub fn conv2d_ref(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
) -> Result<Tensor> {
    let g = super::conv2d_geom(x, weight, bias, stride, padding, dilation, groups)?;
    let (xv, wv) = (x.to_vec_f64()?, weight.to_vec_f64()?);
    let bv = bias.map(|b| b.to_vec_f64()).transpose()?;
    let (cg, og) = (g.c / g.groups, g.o / g.groups);
    let mut y = vec![0.0; g.n * g.o * g.oh * g.ow];
    for n in 0..g.n {
        for o in 0..g.o {
            let c0 = o / og * cg;
            for a in 0..g.oh {
                for b in 0..g.ow {
                    let mut acc = bv.as_ref().map_or(0.0, |bv| bv[o]);
                    for c in 0..cg {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let ih = (a * g.stride.0 + i * g.dilation.0) as isize - g.padding.0 as isize;
                                let iw = (b * g.stride.1 + j * g.dilation.1) as isize - g.padding.1 as isize;
                                if ih < 0 || iw < 0 || ih as usize >= g.h || iw as usize >= g.w {
                                    continue;
                                }
                                let xi = ((n * g.c + c0 + c) * g.h + ih as usize) * g.w + iw as usize;
                                acc += wv[((o * cg + c) * g.kh + i) * g.kw + j] * xv[xi];
                            }
                        }
                    }
                    y[((n * g.o + o) * g.oh + a) * g.ow + b] = acc;
                }
            }
        }
    }
    Tensor::from_f64(&y, &g.out_shape(), x.dtype(), x.device())
}
