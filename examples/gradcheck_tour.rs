//! A tour of the gradient check: how mila-rs knows that its backward passes are right.
//!
//! Reverse-mode autodiff gives every gradient of a loss in one backward pass, but each op's backward is
//! hand-written code, and a wrong one fails silently: training still runs, only worse. The check compares
//! that code against the one thing that needs no derivation at all, the function itself evaluated at two
//! nearby points.
//!
//! 1. Central finite differences on one number, and how to pick the step.
//! 2. The engine's check (`engine::gradcheck_with`) on a small MILA block in f64: the input and every
//!    parameter, with the worst element of each.
//! 3. An op with a deliberately wrong backward, and the check catching it.
//!
//! Run: `cargo run --release --example gradcheck_tour` (exits nonzero if a check does not come out as
//! expected).

use std::collections::HashMap;
use std::process::ExitCode;

use engine::{
    gradcheck_with, CpuStorage, DType, Device, Generator, GradcheckOptions, GradcheckReport, Op, Result, Storage,
    Tensor,
};
use mila::{BlockConfig, MilaBlock};
use nn::{Init, Module};
use ops::TensorOps;

fn main() -> Result<ExitCode> {
    let mut failures = Vec::new();

    // ---- 1. Finite differences on one number. --------------------------------------------------------
    // The derivative is a limit: f'(x) = lim (f(x + h) - f(x)) / h. With a small but finite h, Taylor's
    // expansion says how far off each quotient is:
    //
    //     forward:  (f(x + h) - f(x)) / h          = f'(x) + h f''(x) / 2 + O(h^2)
    //     central:  (f(x + h) - f(x - h)) / (2h)   = f'(x) + h^2 f'''(x) / 6 + O(h^4)
    //
    // The central quotient's even terms cancel, so its truncation error falls as h^2, not h. But the two
    // values of f are rounded (about 1e-16 relative in f64) and their difference is divided by h, so the
    // roundoff error grows as 1e-16 |f| / h. The total is smallest where the two meet: h near the cube root
    // of 1e-16 for the central quotient (about 5e-6), where both are near 1e-11.
    let (x0, exact) = (0.7f64, 1.0 - 0.7f64.tanh().powi(2)); // d tanh / dx = 1 - tanh^2
    println!("1. d tanh(x) / dx at x = 0.7, exact {exact:.15}");
    println!("   {:>7}  {:>12}  {:>12}", "h", "forward err", "central err");
    for k in [1, 2, 3, 4, 5, 6, 7, 8, 10, 12] {
        let h = 10f64.powi(-k);
        let forward = ((x0 + h).tanh() - x0.tanh()) / h;
        let central = ((x0 + h).tanh() - (x0 - h).tanh()) / (2.0 * h);
        println!("   {h:>7.0e}  {:>12.2e}  {:>12.2e}", (forward - exact).abs(), (central - exact).abs());
    }
    println!("   The central error falls 100x per decade of h down to h ~ 1e-5, then roundoff takes over.\n");

    // ---- 2. The engine's check on a MILA block. ------------------------------------------------------
    // A block of width 8 (2 heads) on a 2x3 token grid, in f64: f32's 1e-7 roundoff would leave only a
    // few correct digits in each quotient. Every parameter is redrawn at O(1) size: at MLLA's init
    // (std 0.02) the attention branch is nearly linear and its gradients tiny next to the residual's, so a
    // mistake inside it could hide below the tolerance.
    let cfg =
        BlockConfig { dim: 8, input_resolution: (2, 3), num_heads: 2, mlp_ratio: 2.0, qkv_bias: true, drop_path: 0.0 };
    let make =
        || MilaBlock::new(&mut Init { dtype: DType::F64, device: Device::Cpu, rng: &mut Generator::new(1) }, &cfg);
    let mut g = Generator::new(7);
    let mut state = HashMap::new();
    for (name, t) in make()?.state_dict() {
        state.insert(name, Tensor::randn(t.shape(), 0.0, 0.5, DType::F64, Device::Cpu, &mut g)?);
    }
    let x = Tensor::randn(&[1, 6, 8], 0.0, 1.0, DType::F64, Device::Cpu, &mut g)?; // (B, N, C)

    // What `gradcheck_with` does with a function f of some tensors:
    // - draws a random cotangent g shaped like f's output and sets L = sum(g * f(inputs)), a scalar whose
    //   gradient exercises every output element with its own weight;
    // - analytic: one backward with g gives dL/dinput for every input at once;
    // - numeric: for every element of every input, L at input +- h, central quotient (2 forwards each);
    // - compares them element by element: |numeric - analytic| <= atol + rtol max(|numeric|, |analytic|)
    //   passes, and reports the element with the largest ratio to that bound.
    // The step: 3e-5 (times max(1, |value|)). The block's L sums O(100) terms, so its roundoff is ~1e-14,
    // and 1e-14 / h against h^2: smallest near h = 2e-5.
    let opts = GradcheckOptions { eps: 3e-5, rtol: 1e-6, atol: 1e-9, seed: 0x5eed };
    println!("2. gradcheck of a MILA block (dim 8, 2 heads, 2x3 tokens, f64), one check per tensor");
    println!("   {:<18} {:>8}  {:>15}  {:>14}  verdict", "tensor", "elements", "worst rel error", "vs tolerance");

    // The input: f(x) = block(x) with the parameters fixed.
    let block = make()?;
    block.load_tensors(&state, &HashMap::new(), true)?;
    let report =
        gradcheck_with("x", std::slice::from_ref(&x), opts, |xs| block.forward(&xs[0], &mut Generator::new(0)))?;
    print_row(&report, &mut failures);

    // Each parameter: f(p) = block(x) with p put in the block's slot. A fresh block per call, since the
    // check passes in its own leaf tensors (perturbed copies for the numeric side).
    for (name, value) in block.named_parameters() {
        let report = gradcheck_with(&name, &[value], opts, |ps| {
            let mut b = make()?;
            b.load_tensors(&state, &HashMap::new(), true)?;
            *slot(&mut b, &name)
                .ok_or_else(|| engine::Error::Msg { context: "tour", msg: format!("no slot {name}") })? = ps[0].clone();
            b.forward(&x, &mut Generator::new(0))
        })?;
        print_row(&report, &mut failures);
    }
    println!();

    // ---- 3. A wrong backward, caught. ----------------------------------------------------------------
    // An op is a forward (any code) and a backward (a struct implementing `Op`). `HandSilu` computes
    // silu(x) = x sigmoid(x) on the host; its backward is written three ways. The right one is
    // d silu / dx = s + x s (1 - s) = s (1 + x (1 - s)), s = sigmoid(x).
    println!("3. a hand-written silu op with three backwards");
    let v = Tensor::randn(&[3, 4], 0.0, 2.0, DType::F64, Device::Cpu, &mut g)?;
    for (flaw, should_pass) in [
        (Flaw::Right, true),
        // The classic slip: the product rule applied to x only, the sigmoid's own derivative forgotten.
        (Flaw::ForgotTerm, false),
        // Right formula, 1e-4 too large: a gradient this close still trains, and still fails the check.
        (Flaw::Scaled(1.0 + 1e-4), false),
    ] {
        let report =
            gradcheck_with(&format!("{flaw:?}"), std::slice::from_ref(&v), opts, |xs| hand_silu(&xs[0], flaw))?;
        let w = report.worst.as_ref().expect("12 elements were checked");
        println!(
            "   {:<22} worst element {:?}: numeric {:+.9}  analytic {:+.9}  -> {}",
            report.op,
            w.index,
            w.numeric,
            w.analytic,
            if report.passed() { "passes" } else { "FAILS" }
        );
        if report.passed() != should_pass {
            failures.push(format!("{flaw:?} should {}", if should_pass { "pass" } else { "fail" }));
        }
    }

    println!();
    if failures.is_empty() {
        println!("every gradient of the block matches its finite differences, and both wrong backwards were caught");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("unexpected: {}", failures.join("; "));
        Ok(ExitCode::FAILURE)
    }
}

/// One line of part 2's table; a failed check is remembered.
fn print_row(report: &GradcheckReport, failures: &mut Vec<String>) {
    let (rel, ratio) = report.worst.as_ref().map_or((0.0, 0.0), |w| (w.rel_error, w.ratio));
    let verdict = if report.passed() { "ok" } else { "FAIL" };
    println!("   {:<18} {:>8}  {rel:>15.2e}  {ratio:>13.3}x  {verdict}", report.op, report.elements);
    if !report.passed() {
        failures.push(report.to_string());
    }
}

/// The tensor a parameter name refers to inside a MILA block, for swapping it out.
fn slot<'a>(b: &'a mut MilaBlock, name: &str) -> Option<&'a mut Tensor> {
    let (module, which) = name.rsplit_once('.')?;
    let (weight, bias): (&mut Tensor, Option<&mut Tensor>) = match module {
        "cpe1" => (&mut b.cpe1.weight, b.cpe1.bias.as_mut()),
        "norm1" => (&mut b.norm1.weight, Some(&mut b.norm1.bias)),
        "in_proj" => (&mut b.in_proj.weight, b.in_proj.bias.as_mut()),
        "act_proj" => (&mut b.act_proj.weight, b.act_proj.bias.as_mut()),
        "dwc" => (&mut b.dwc.weight, b.dwc.bias.as_mut()),
        "attn.qk" => (&mut b.attn.qk.weight, b.attn.qk.bias.as_mut()),
        "attn.lepe" => (&mut b.attn.lepe.weight, b.attn.lepe.bias.as_mut()),
        "out_proj" => (&mut b.out_proj.weight, b.out_proj.bias.as_mut()),
        "cpe2" => (&mut b.cpe2.weight, b.cpe2.bias.as_mut()),
        "norm2" => (&mut b.norm2.weight, Some(&mut b.norm2.bias)),
        "mlp.fc1" => (&mut b.mlp.fc1.weight, b.mlp.fc1.bias.as_mut()),
        "mlp.fc2" => (&mut b.mlp.fc2.weight, b.mlp.fc2.bias.as_mut()),
        _ => return None,
    };
    match which {
        "weight" => Some(weight),
        "bias" => bias,
        _ => None,
    }
}

/// How `HandSilu`'s backward goes wrong.
#[derive(Debug, Clone, Copy)]
enum Flaw {
    Right,
    ForgotTerm,
    Scaled(f64),
}

/// silu's backward, with what the forward saved: its input.
struct HandSilu {
    x: Tensor,
    flaw: Flaw,
}

impl Op for HandSilu {
    fn name(&self) -> &'static str {
        "hand_silu"
    }

    /// dL/dx = dL/dy * silu'(x). Runs under no_grad, so these ops record nothing.
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let s = self.x.sigmoid()?;
        let right = s.mul(&self.x.mul(&s.neg()?.add_scalar(1.0)?)?.add_scalar(1.0)?)?; // s (1 + x (1 - s))
        let derivative = match self.flaw {
            Flaw::Right => right,
            Flaw::ForgotTerm => s, // d(x s)/dx taken as s: s's own derivative dropped
            Flaw::Scaled(k) => right.mul_scalar(k)?,
        };
        Ok(vec![Some(g.mul(&derivative)?)])
    }
}

/// y = x sigmoid(x), computed on the host and recorded on the tape as one `HandSilu` node.
fn hand_silu(x: &Tensor, flaw: Flaw) -> Result<Tensor> {
    let y: Vec<f64> = x.to_vec_f64()?.iter().map(|&v| v / (1.0 + (-v).exp())).collect();
    let storage = Storage::from_cpu(CpuStorage::from_f64(&y, x.dtype()), x.device())?;
    // The node keeps x detached: its value is what backward needs, not its history.
    Ok(Tensor::from_op(storage, x.shape(), &[x], || HandSilu { x: x.detach(), flaw }))
}
