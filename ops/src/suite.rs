//! The gradient-check suite: one entry per differentiable op, on random f64 inputs that include broadcast
//! and non-contiguous (permuted, sliced) cases. `mila gradcheck` runs it; the tests run it too.

use engine::{gradcheck_with, DType, Device, Generator, GradcheckOptions, GradcheckReport, Result, Tensor};

use crate::*;

type Func = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

pub struct Case {
    pub name: &'static str,
    /// Input shapes, and the range inputs are drawn from (uniform).
    pub inputs: Vec<(Vec<usize>, f64, f64)>,
    pub f: Func,
    /// A finite-difference step replacing the run's. The default 1e-6 lets the roundoff of L(x +- h), about
    /// 1e-16 |L| / h, exceed the tolerance on small gradients when the loss sums many large terms (a conv, a
    /// batch norm); see [`Case::linear`] and [`Case::smooth`].
    pub step: Option<f64>,
    /// Whether the op has a CUDA path; the CUDA-vs-CPU test expects `Error::Unsupported` from those without.
    pub cuda: bool,
}

fn case(
    name: &'static str,
    inputs: &[(&[usize], f64, f64)],
    f: impl Fn(&[Tensor]) -> Result<Tensor> + 'static,
) -> Case {
    Case {
        name,
        inputs: inputs.iter().map(|&(s, lo, hi)| (s.to_vec(), lo, hi)).collect(),
        f: Box::new(f),
        step: None,
        cuda: true,
    }
}

impl Case {
    /// For ops linear in each input separately (convolutions, RoPE, masks): central differences are exact for
    /// any step, so a large one leaves only a tiny roundoff.
    fn linear(self) -> Case {
        Case { step: Some(1e-3), ..self }
    }

    /// For smooth nonlinear ops summing many terms (the norms): the step near cbrt(f64 epsilon) that balances
    /// the truncation error (h^2) against the roundoff (1 / h).
    fn smooth(self) -> Case {
        Case { step: Some(1e-5), ..self }
    }
}

const N: f64 = 3.0; // inputs in [-N, N] unless an op needs positive ones

/// Every op of the suite.
pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for op in [
        Unary::Neg,
        Unary::Exp,
        Unary::Abs,
        Unary::Relu,
        Unary::Gelu,
        Unary::Silu,
        Unary::Elu(1.0),
        // alpha <= 0: the one unary op whose backward reads both x and y.
        Unary::Elu(-0.5),
        Unary::AddScalar(0.25),
        Unary::Softplus { beta: 1.0, threshold: 20.0 },
        Unary::Sigmoid,
        Unary::Tanh,
        Unary::MulScalar(0.5),
        Unary::ClampMin(0.0),
    ] {
        v.push(case(op.name(), &[(&[3, 5], -N, N)], move |x| unary(op, &permute(&x[0], &[1, 0])?)));
    }
    for op in [Unary::Log, Unary::Sqrt, Unary::Rsqrt, Unary::Powf(1.5)] {
        v.push(case(op.name(), &[(&[4, 6], 0.2, 2.0)], move |x| unary(op, &narrow(&x[0], 1, 1, 4)?)));
    }
    for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Maximum, Binary::Minimum] {
        v.push(case(op.name(), &[(&[2, 3, 1], -N, N), (&[4, 3], -N, N)], move |x| {
            binary(op, &x[0], &reshape(&permute(&x[1], &[1, 0])?, &[1, 3, 4])?)
        }));
    }
    v.push(case("div", &[(&[3, 4], -N, N), (&[4], 0.5, 2.0)], |x| div(&x[0], &x[1])));
    v.push(case("where", &[(&[3, 4], -N, N), (&[4], -N, N)], |x| {
        let cond = compare_scalar(Cmp::Gt, &x[0].detach(), 0.0)?;
        where_(&cond, &x[0], &x[1])
    }));
    v.push(case("sum", &[(&[3, 4, 5], -N, N)], |x| sum(&permute(&x[0], &[2, 0, 1])?, &[0, 2], true)));
    v.push(case("max", &[(&[3, 4, 5], -N, N)], |x| max(&narrow(&x[0], 2, 1, 3)?, &[1], false)));
    v.push(case("mean", &[(&[3, 4], -N, N)], |x| mean(&x[0], &[-1], false)));
    v.push(case("var", &[(&[3, 4], -N, N)], |x| var(&x[0], &[0], 1, false)));
    v.push(case("softmax", &[(&[3, 5], -N, N)], |x| softmax(&permute(&x[0], &[1, 0])?, -1)));
    v.push(case("log_softmax", &[(&[3, 5], -N, N)], |x| log_softmax(&x[0], -1)));
    v.push(case("cross_entropy", &[(&[4, 5], -N, N)], |x| cross_entropy(&x[0], &[1, 0, 4, 4], 0.1)));
    v.push(case("reshape", &[(&[3, 4], -N, N)], |x| reshape(&permute(&x[0], &[1, 0])?, &[2, -1])));
    v.push(case("expand", &[(&[3, 1], -N, N)], |x| expand(&x[0], &[2, 3, 4])));
    v.push(case("matmul", &[(&[3, 4], -N, N), (&[5, 4], -N, N)], |x| matmul(&x[0], &t(&x[1])?)).linear());
    v.push(
        case("matmul (batched, broadcast)", &[(&[2, 1, 3, 4], -N, N), (&[3, 4, 2], -N, N)], |x| {
            matmul(&x[0], &narrow(&x[1], 2, 0, 2)?)
        })
        .linear(),
    );
    // A Linear on tokens: the weight's gradient is one product over the stacked rows (also from a permuted A).
    v.push(case("matmul (tokens x shared weight)", &[(&[2, 3, 4], -N, N), (&[5, 4], -N, N)], |x| {
        matmul(&x[0], &t(&x[1])?)
    }));
    v.push(case("matmul (permuted tokens x shared weight)", &[(&[3, 2, 4], -N, N), (&[5, 4], -N, N)], |x| {
        matmul(&permute(&x[0], &[1, 0, 2])?, &t(&x[1])?)
    }));
    // A Linear layer (on CUDA: the bias in the cuBLASLt epilogues): tokens cut from a permuted tensor, odd
    // sizes, no bias.
    v.push(
        case("linear", &[(&[3, 2, 5], -N, N), (&[4, 5], -N, N), (&[4], -N, N)], |x| {
            linear(&permute(&x[0], &[1, 0, 2])?, &x[1], Some(&x[2]))
        })
        .linear(),
    );
    v.push(
        case("linear (odd sizes)", &[(&[2, 3, 7], -N, N), (&[5, 7], -N, N), (&[5], -N, N)], |x| {
            linear(&x[0], &x[1], Some(&x[2]))
        })
        .linear(),
    );
    v.push(case("linear (no bias)", &[(&[3, 5], -N, N), (&[4, 5], -N, N)], |x| linear(&x[0], &x[1], None)).linear());
    v.push(case("act_linear (gelu)", &[(&[2, 3, 4], -N, N), (&[5, 4], -N, N), (&[5], -N, N)], |x| {
        act_linear(&x[0], Unary::Gelu, &x[1], Some(&x[2]))
    }));
    v.push(case(
        "gated_linear (silu, transposed x)",
        &[(&[2, 4, 3], -N, N), (&[2, 3, 4], -N, N), (&[5, 4], -N, N), (&[5], -N, N)],
        |x| gated_linear(&permute(&x[0], &[0, 2, 1])?, &x[1], Unary::Silu, &x[2], Some(&x[3])),
    ));
    v.push(
        case(
            "layer_norm_linears (two Linears)",
            &[(&[2, 3, 4], -N, N), (&[4], -N, N), (&[4], -N, N), (&[5, 4], -N, N), (&[5], -N, N), (&[2, 4], -N, N)],
            |x| {
                let ys =
                    layer_norm_linears(&x[0], Some(&x[1]), Some(&x[2]), 1e-5, &[(&x[3], Some(&x[4])), (&x[5], None)])?;
                concat(&ys, -1)
            },
        )
        .smooth(),
    );
    v.push(case("concat", &[(&[2, 3], -N, N), (&[3, 4], -N, N)], |x| concat(&[x[0].clone(), t(&x[1])?], 0)));
    v.push(case("stack", &[(&[2, 3], -N, N), (&[3, 2], -N, N)], |x| stack(&[x[0].clone(), t(&x[1])?], 1)));
    v.push(case("split", &[(&[5, 3], -N, N)], |x| Ok(split(&x[0], &[2, 3], 0)?.remove(1))));
    v.push(case("chunk", &[(&[4, 5], -N, N)], |x| Ok(chunk(&x[0], 2, 1)?.remove(0))));
    v.push(case("index_select", &[(&[4, 3], -N, N)], |x| index_select(&x[0], 0, &[3, 0, 3, 1])));
    v.push(case("pad", &[(&[2, 3], -N, N)], |x| pad(&t(&x[0])?, &[(1, 2), (0, 1)], 0.5)));
    vision_cases(&mut v);
    scan_cases(&mut v);
    v
}

/// The vision and mixer primitives: convolutions, norms, RoPE and the stochastic regularisers (their masks
/// come from a generator seeded inside `f`, so every evaluation sees the same one).
fn vision_cases(v: &mut Vec<Case>) {
    let nchw = |x: &Tensor| permute(x, &[0, 3, 1, 2]); // inputs stored channels-last
                                                       // The MILA block's silu(dwc(t)): depthwise 3x3 on the channels-last image view of tokens.
    v.push(
        case(
            "conv2d_act (depthwise, silu, channels-last)",
            &[(&[2, 5, 4, 3], -N, N), (&[3, 1, 3, 3], -N, N), (&[3], -N, N)],
            move |x| conv2d_act(&nchw(&x[0])?, &x[1], Some(&x[2]), (1, 1), (1, 1), (1, 1), 3, Unary::Silu),
        )
        .smooth(),
    );
    v.push(
        case("conv2d", &[(&[2, 6, 5, 3], -N, N), (&[4, 3, 3, 3], -N, N), (&[4], -N, N)], move |x| {
            conv2d(&nchw(&x[0])?, &x[1], Some(&x[2]), (2, 2), (1, 1), (1, 1), 1)
        })
        .linear(),
    );
    v.push(
        case("conv2d(groups 2, dilation 2)", &[(&[1, 4, 7, 6], -N, N), (&[6, 2, 3, 2], -N, N)], |x| {
            conv2d(&x[0], &x[1], None, (1, 2), (2, 1), (2, 2), 2)
        })
        .linear(),
    );
    v.push(
        case("conv2d(depthwise)", &[(&[2, 3, 5, 4], -N, N), (&[3, 1, 3, 3], -N, N), (&[3], -N, N)], |x| {
            conv2d(&x[0], &x[1], Some(&x[2]), (1, 1), (1, 1), (1, 1), 3)
        })
        .linear(),
    );
    // Depthwise of channels-last views (the MILA blocks' token images): the NHWC kernels. C 6 (f32: single
    // elements, f64: 16-byte pairs) at stride 1, C 4 (16-byte accesses) at stride 2 with no padding.
    v.push(
        case(
            "conv2d(depthwise, channels-last)",
            &[(&[2, 5, 4, 6], -N, N), (&[6, 1, 3, 3], -N, N), (&[6], -N, N)],
            move |x| conv2d(&nchw(&x[0])?, &x[1], Some(&x[2]), (1, 1), (1, 1), (1, 1), 6),
        )
        .linear(),
    );
    v.push(
        case(
            "conv2d(depthwise, channels-last, stride 2)",
            &[(&[2, 7, 6, 4], -N, N), (&[4, 1, 3, 3], -N, N)],
            move |x| conv2d(&nchw(&x[0])?, &x[1], None, (2, 2), (0, 0), (1, 1), 4),
        )
        .linear(),
    );
    v.push(
        case("causal_conv1d", &[(&[2, 5, 3], -N, N), (&[3, 1, 4], -N, N), (&[3], -N, N)], |x| {
            causal_conv1d(&transpose(&x[0], 1, 2)?, &x[1], Some(&x[2]))
        })
        .linear(),
    );
    v.push(
        case("layer_norm", &[(&[2, 5, 3], -N, N), (&[5], -N, N), (&[5], -N, N)], |x| {
            layer_norm(&transpose(&x[0], 1, 2)?, Some(&x[1]), Some(&x[2]), 1e-5)
        })
        .smooth(),
    );
    v.push(
        case("batch_norm2d(training)", &[(&[2, 3, 4, 3], -N, N), (&[3], -N, N), (&[3], -N, N)], move |x| {
            batch_norm2d(&nchw(&x[0])?, Some(&x[1]), Some(&x[2]), None, None, true, 0.1, 1e-5)
        })
        .smooth(),
    );
    v.push(
        case("batch_norm2d(eval)", &[(&[2, 3, 4, 3], -N, N), (&[3], -N, N), (&[3], -N, N)], |x| {
            let mean = Tensor::from_f64(&[0.5, -1.0, 0.0], &[3], x[0].dtype(), x[0].device())?;
            let var = Tensor::from_f64(&[0.7, 2.0, 1.3], &[3], x[0].dtype(), x[0].device())?;
            batch_norm2d(&x[0], Some(&x[1]), Some(&x[2]), Some(&mean), Some(&var), false, 0.1, 1e-5)
        })
        .linear(),
    );
    v.push(case("rope2d", &[(&[1, 8, 6], -N, N)], |x| rope2d(&transpose(&x[0], 1, 2)?, 2, 3, 10000.0)).linear());
    v.push(
        case("linear_attention", &[(&[1, 16, 6], -N, N), (&[1, 6, 10], -N, N)], |x| {
            // qk stored (B, 2C, N), v cut from a wider (B, N, C + 2): both non-contiguous.
            linear_attention(&transpose(&x[0], 1, 2)?, &narrow(&x[1], 2, 1, 8)?, (2, 3), 2, 10000.0, 1e-6)
        })
        .smooth(),
    );
    v.push(case("dropout", &[(&[4, 5], -N, N)], |x| dropout(&x[0], 0.5, true, &mut Generator::new(7))).linear());
    v.push(case("drop_path", &[(&[4, 3, 2], -N, N)], |x| drop_path(&x[0], 0.5, true, &mut Generator::new(8))).linear());
}

/// The selective scan. All options on, with u and z stored (B, L, C) and B stored (B, L, S) as a mixer makes
/// them and handed over transposed, and a chunk of 3 so that the backward crosses chunk boundaries (A < 0,
/// delta around softplus' bend); then every option off (dt = delta itself, kept positive).
fn scan_cases(v: &mut Vec<Case>) {
    let from_blc = |x: &Tensor| transpose(x, 1, 2);
    v.push(
        case(
            "selective_scan",
            &[
                (&[2, 7, 3], -N, N),
                (&[2, 3, 7], -2.0, 1.0),
                (&[3, 4], -2.0, -0.1),
                (&[2, 7, 4], -1.5, 1.5),
                (&[2, 4, 7], -1.5, 1.5),
                (&[3], -1.0, 1.0),
                (&[2, 7, 3], -N, N),
                (&[3], -0.5, 0.5),
            ],
            move |x| {
                let (u, b, z) = (from_blc(&x[0])?, from_blc(&x[3])?, from_blc(&x[6])?);
                scan::selective_scan_chunked(&u, &x[1], &x[2], &b, &x[4], Some(&x[5]), Some(&z), Some(&x[7]), true, 3)
            },
        )
        .smooth(),
    );
    v.push(
        case(
            "selective_scan(no D, z, delta_bias, softplus)",
            &[
                (&[1, 2, 5], -N, N),
                (&[1, 2, 5], 0.05, 1.0),
                (&[2, 3], -2.0, -0.1),
                (&[1, 3, 5], -1.5, 1.5),
                (&[1, 3, 5], -1.5, 1.5),
            ],
            |x| selective_scan(&x[0], &x[1], &x[2], &x[3], &x[4], None, None, None, false),
        )
        .smooth(),
    );
}

/// Fresh random inputs of `case` from `seed`, in `dtype` on `device`.
pub fn inputs(case: &Case, seed: u64, dtype: DType, device: Device) -> Result<Vec<Tensor>> {
    let mut g = Generator::new(seed);
    case.inputs.iter().map(|(shape, lo, hi)| Tensor::rand(shape, *lo, *hi, dtype, device, &mut g)).collect()
}

/// Runs one case's gradient check with fresh random inputs from `seed`.
pub fn run(case: &Case, seed: u64, opts: GradcheckOptions) -> Result<GradcheckReport> {
    let inputs = inputs(case, seed, DType::F64, Device::Cpu)?;
    let opts = GradcheckOptions { eps: case.step.unwrap_or(opts.eps), ..opts };
    gradcheck_with(case.name, &inputs, opts, &case.f)
}

/// The output of `case` on `inputs` and the gradient of every input for the cotangent drawn from `seed`.
pub fn forward_backward(case: &Case, inputs: &[Tensor], seed: u64) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let leaves = inputs.iter().map(|t| t.detach().requires_grad_(true)).collect::<Result<Vec<_>>>()?;
    let y = (case.f)(&leaves)?;
    let cot = Tensor::rand(y.shape(), -1.0, 1.0, y.dtype(), y.device(), &mut Generator::new(seed))?;
    if y.requires_grad() {
        y.backward_with(&cot)?;
    }
    Ok((y, leaves.iter().map(|t| t.grad()).collect()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_case_passes() {
        for c in super::cases() {
            let r = super::run(&c, 42, Default::default()).unwrap();
            assert!(r.passed(), "{r}");
            assert!(r.max_abs_grad > 0.0, "{r}");
        }
    }
}
