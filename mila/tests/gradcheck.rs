//! Finite-difference checks (f64) of a tiny MILA block and a PatchMerging, through the input and several
//! parameters, so that every branch of the composition (CPE, gate, DWConv, attention, MLP) is covered.

use std::collections::HashMap;

use engine::{gradcheck_with, DType, Device, Generator, GradcheckOptions, Result, Tensor};
use mila::{BlockConfig, MilaBlock, PatchMerging};
use nn::{Init, Module};

fn init(rng: &mut Generator) -> Init<'_> {
    Init { dtype: DType::F64, device: Device::Cpu, rng }
}

/// The step balances the two errors of a central difference: roundoff, about 1e-16 times the loss's O(100)
/// terms, divided by the step (about 1e-8 at the default 1e-6, above the 1e-9 absolute tolerance), and truncation,
/// O(step^2) times the third derivative. Their sum is smallest near the cube root of the roundoff, 3e-5.
fn options() -> GradcheckOptions {
    GradcheckOptions { eps: 3e-5, ..Default::default() }
}

fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, std, DType::F64, Device::Cpu, &mut Generator::new(seed)).unwrap()
}

/// Parameters of O(1) size (the init's 0.02 would make the attention path nearly linear and its
/// gradients tiny next to the residual's), keyed by name.
fn random_state(module: &dyn Module, seed: u64) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (i, (name, t)) in module.state_dict().into_iter().enumerate() {
        out.insert(name, randn(t.shape(), 0.5, seed + i as u64));
    }
    out
}

#[test]
fn mila_block_gradients_match_finite_differences() {
    let cfg =
        BlockConfig { dim: 8, input_resolution: (4, 4), num_heads: 2, mlp_ratio: 2.0, qkv_bias: true, drop_path: 0.0 };
    let make = || MilaBlock::new(&mut init(&mut Generator::new(1)), &cfg);
    let state = random_state(&make().unwrap(), 100);
    // Checked: the input and one parameter of each branch.
    let names = [
        "cpe1.weight",
        "norm1.weight",
        "act_proj.weight",
        "in_proj.bias",
        "dwc.weight",
        "attn.qk.weight",
        "attn.lepe.bias",
        "out_proj.weight",
        "mlp.fc1.weight",
    ];
    let mut inputs = vec![randn(&[1, 16, 8], 1.0, 7)];
    inputs.extend(names.iter().map(|n| state[*n].clone()));
    let f = |xs: &[Tensor]| -> Result<Tensor> {
        let mut block = make()?;
        block.load_tensors(&state, &HashMap::new(), true)?;
        block.cpe1.weight = xs[1].clone();
        block.norm1.weight = xs[2].clone();
        block.act_proj.weight = xs[3].clone();
        block.in_proj.bias = Some(xs[4].clone());
        block.dwc.weight = xs[5].clone();
        block.attn.qk.weight = xs[6].clone();
        block.attn.lepe.bias = Some(xs[7].clone());
        block.out_proj.weight = xs[8].clone();
        block.mlp.fc1.weight = xs[9].clone();
        block.forward(&xs[0], &mut Generator::new(0))
    };
    let report = gradcheck_with("MilaBlock", &inputs, options(), f).unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert!(report.max_abs_grad > 1e-2, "gradients this small prove little: {report}");
    assert_eq!(report.elements, inputs.iter().map(Tensor::numel).sum::<usize>());
}

#[test]
fn patch_merging_gradients_match_finite_differences() {
    // Training mode: the BatchNorm of conv.2 normalises with the batch statistics, which couple the samples.
    let make = || PatchMerging::new(&mut init(&mut Generator::new(2)), 4, (4, 4));
    let state = random_state(&make().unwrap(), 200);
    let inputs = [randn(&[2, 16, 4], 1.0, 8), state["conv.1.conv.weight"].clone()];
    let f = |xs: &[Tensor]| -> Result<Tensor> {
        let mut merge = make()?;
        merge.load_tensors(&state, &HashMap::new(), false)?;
        merge.conv[1].conv.weight = xs[1].clone();
        merge.forward(&xs[0])
    };
    let report = gradcheck_with("PatchMerging", &inputs, options(), f).unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
}
