//! Parameter counts and multiply-adds of the MLLA presets, from the real module trees, against the official
//! numbers of docs/MILA.md (224x224, 1000 classes).

use engine::{DType, Device, Generator};
use mila::{Mlla, MllaConfig};
use nn::{Init, Module};

fn build(config: &MllaConfig) -> Mlla {
    let mut rng = Generator::new(0);
    Mlla::new(&mut Init { dtype: DType::F32, device: Device::Cpu, rng: &mut rng }, config).unwrap()
}

/// Each preset is built once (B holds 96M parameters) and checked for both numbers. The official "FLOPs" are
/// multiply-adds; ours count those of the convs, linear layers and attention products and leave out norms,
/// activations and other elementwise work, so they sit slightly below (1-2% here).
#[test]
fn presets_match_the_official_parameter_counts_and_flops() {
    for (name, config, params, gmacs) in [
        ("MLLA-T", MllaConfig::tiny(), 24_392_200, 4.2),
        ("MLLA-S", MllaConfig::small(), 43_015_048, 7.3),
        ("MLLA-B", MllaConfig::base(), 95_983_960, 16.2),
    ] {
        let model = build(&config);
        assert_eq!(model.num_params(), params, "{name}");
        let ours = model.macs() as f64 / 1e9;
        println!("{name} at 224x224: {} parameters, {ours:.3} GMACs (official {gmacs}G)", model.num_params());
        assert!((ours - gmacs).abs() / gmacs < 0.05, "{name}: {ours} GMACs");
        // The stages dominate; the stem and the head are a small part.
        let stages: u64 = model.layers.iter().map(|l| l.macs()).sum();
        assert!(stages as f64 > 0.8 * model.macs() as f64, "{name}");
    }
}

#[test]
fn names_are_the_official_state_dict_names() {
    let model = build(&MllaConfig::mnist());
    let names: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).collect();
    for expected in [
        "patch_embed.conv1.conv.weight",
        "patch_embed.conv1.norm.running_var",
        "patch_embed.conv2.1.norm.bias",
        "patch_embed.conv3.1.conv.weight",
        "layers.0.blocks.0.cpe1.weight",
        "layers.0.blocks.0.attn.qk.bias",
        "layers.0.blocks.0.attn.lepe.weight",
        "layers.2.blocks.0.mlp.fc2.weight",
        "layers.0.downsample.conv.0.conv.bias",
        "layers.2.downsample.conv.2.norm.running_mean",
        "norm.weight",
        "head.bias",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing");
    }
    assert!(!names.iter().any(|n| n.starts_with("layers.3.downsample")), "the last stage has no downsample");
    let counters = model.counters();
    assert_eq!(counters.len(), 8, "5 stem BatchNorms and 3 PatchMerging BatchNorms");
    assert!(counters.iter().any(|(n, _)| n == "layers.1.downsample.conv.2.norm.num_batches_tracked"));
}
