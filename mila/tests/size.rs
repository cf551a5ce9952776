//! Parameter counts and multiply-adds of the MLLA presets, from the real module trees, against the official
//! numbers of docs/MILA.md (224x224, 1000 classes).

use engine::{DType, Device, Generator};
use mila::{Mlla, MllaConfig};
use nn::{Init, Module};

fn build(config: &MllaConfig) -> Mlla {
    let mut rng = Generator::new(0);
    Mlla::new(&mut Init { dtype: DType::F32, device: Device::Cpu, rng: &mut rng }, config).unwrap()
}

#[test]
fn parameter_counts_match_the_official_models() {
    for (name, config, official) in [
        ("MLLA-T", MllaConfig::tiny(), 24_392_200),
        ("MLLA-S", MllaConfig::small(), 43_015_048),
        ("MLLA-B", MllaConfig::base(), 95_983_960),
    ] {
        let model = build(&config);
        assert_eq!(model.num_params(), official, "{name}");
    }
}

#[test]
fn mlla_tiny_costs_about_4_2_gmacs() {
    let model = build(&MllaConfig::tiny());
    let gmacs = model.macs() as f64 / 1e9;
    println!("MLLA-T at 224x224: {gmacs:.3} GMACs");
    assert!((gmacs - 4.2).abs() / 4.2 < 0.05, "{gmacs} GMACs");
    // The stages dominate; the stem and head are a small part.
    let stages: u64 = model.layers.iter().map(|l| l.macs()).sum();
    assert!(stages as f64 > 0.8 * model.macs() as f64);
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
