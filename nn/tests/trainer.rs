//! The trainer: it learns, a resumed run repeats the uninterrupted losses exactly, a non-finite loss stops
//! the run with the step named and the last good checkpoint kept.

use std::sync::Arc;

use engine::{DType, Device, Generator, Result, Tensor};
use nn::data::Dataset;
use nn::module::{visit_child, Entry};
use nn::trainer::{checkpoint_path, train, Classifier, OptimizerKind, TrainConfig};
use nn::{Init, Linear, Module};
use ops::TensorOps;

/// Flatten + one hidden layer, with dropout `p` on the hidden layer in training.
struct Tiny {
    fc1: Linear,
    fc2: Linear,
    p: f64,
    training: bool,
}

impl Module for Tiny {
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>)) {
        visit_child(&self.fc1, "fc1", f);
        visit_child(&self.fc2, "fc2", f);
    }
    fn set_training(&mut self, training: bool) {
        self.training = training;
    }
}

impl Classifier for Tiny {
    fn logits(&self, x: &Tensor, rng: &mut Generator) -> Result<Tensor> {
        let hidden = self.fc1.forward(&x.flatten(1, -1)?)?.relu()?;
        self.fc2.forward(&ops::dropout(&hidden, self.p, self.training, rng)?)
    }
}

fn tiny(seed: u64) -> Tiny {
    tiny_on(seed, Device::Cpu)
}

fn tiny_on(seed: u64, device: Device) -> Tiny {
    let mut rng = Generator::new(seed);
    let mut i = Init { dtype: DType::F32, device, rng: &mut rng };
    Tiny {
        fc1: Linear::new(&mut i, 32 * 32, 32, true).unwrap(),
        fc2: Linear::new(&mut i, 32, 10, true).unwrap(),
        p: 0.0,
        training: true,
    }
}

fn subset(d: &Dataset, n: usize) -> Arc<Dataset> {
    Arc::new(Dataset { images: d.images[..n * 784].to_vec(), labels: d.labels[..n].to_vec(), n, ..d.clone() })
}

fn config(dir: &str, epochs: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 50,
        lr,
        min_lr: 0.0,
        weight_decay: 0.05,
        optimizer: OptimizerKind::AdamW,
        momentum: 0.9,
        warmup_frac: 0.1,
        label_smoothing: 0.1,
        clip_grad: None,
        seed: 7,
        device: Device::Cpu,
        dtype: DType::F32,
        random_shift: 2,
        pad: 2,
        mean: vec![0.1307],
        std: vec![0.3081],
        out_dir: std::env::temp_dir().join(format!("mila-trainer-{}-{dir}", std::process::id())),
        progress: false,
        stop_after: None,
        ema_decay: None,
        cuda_graph: false,
        drop_last: false,
    }
}

#[test]
fn learns_and_resumes_exactly() {
    learn_and_resume("", None);
}

/// With a weight average too: the resumed run also continues the average exactly (its test accuracy is the
/// average's), and the last epoch reports the last weights' accuracy beside it.
#[test]
fn learns_and_resumes_exactly_with_an_ema() {
    let straight = learn_and_resume("ema", Some(0.9));
    let last = straight.last().unwrap();
    assert!(last.test_acc_raw.unwrap() > 0.6, "{last:?}");
    assert!(straight[..2].iter().all(|m| m.test_acc_raw.is_none()));
}

fn learn_and_resume(tag: &str, ema_decay: Option<f64>) -> Vec<nn::trainer::EpochMetrics> {
    let (train_all, test_all) = Dataset::mnist10k().unwrap();
    let (tr, te) = (subset(&train_all, 600), subset(&test_all, 200));
    let config = |dir: &str, epochs, lr| TrainConfig { ema_decay, ..config(&format!("{dir}{tag}"), epochs, lr) };

    let cfg = config("straight", 3, 3e-3);
    let mut a = tiny(1);
    let straight = train(&mut a, tr.clone(), te.clone(), &cfg, false).unwrap();
    assert!(straight.last().unwrap().test_acc > 0.6, "{:?}", straight.last().unwrap().test_acc);
    assert!(straight[2].train_loss < straight[0].train_loss);

    // The same run interrupted after its first epoch, then resumed into a model with other weights:
    // everything (weights, optimizer, step, generator) must come from the checkpoint.
    let cfg2 = TrainConfig { stop_after: Some(1), ..config("resumed", 3, 3e-3) };
    let mut b = tiny(1);
    let first = train(&mut b, tr.clone(), te.clone(), &cfg2, false).unwrap();
    assert_eq!(first.len(), 1);
    let mut c = tiny(99);
    let rest = train(&mut c, tr.clone(), te.clone(), &TrainConfig { stop_after: None, ..cfg2.clone() }, true).unwrap();
    assert_eq!(rest.iter().map(|m| m.epoch).collect::<Vec<_>>(), [2, 3]);
    let losses = |ms: &[nn::trainer::EpochMetrics]| ms.iter().flat_map(|m| m.step_losses.clone()).collect::<Vec<_>>();
    assert_eq!([losses(&first), losses(&rest)].concat(), losses(&straight), "resumed losses differ");
    assert_eq!(rest[1].test_acc, straight[2].test_acc);
    assert_eq!(rest[1].test_acc_raw, straight[2].test_acc_raw);
    // The resumed run's files cover the whole run: three metric lines and the curves.
    assert_eq!(nn::trainer::read_metrics(&cfg2.out_dir.join("metrics.jsonl")).unwrap().len(), 3);
    let png = std::fs::read(cfg2.out_dir.join("curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    if let Ok(keep) = std::env::var("MILA_KEEP_PLOT") {
        std::fs::write(keep, png).unwrap();
    }
    let _ = std::fs::remove_dir_all(&cfg.out_dir);
    let _ = std::fs::remove_dir_all(&cfg2.out_dir);
    straight
}

#[test]
fn non_finite_loss_stops_and_keeps_the_checkpoint() {
    let (train_all, test_all) = Dataset::mnist10k().unwrap();
    let (tr, te) = (subset(&train_all, 100), subset(&test_all, 50));
    let mut cfg = config("nan", 1, 1e-3);
    let mut m = tiny(3);
    train(&mut m, tr.clone(), te.clone(), &cfg, false).unwrap();
    let saved = std::fs::read(checkpoint_path(&cfg.out_dir)).unwrap();
    cfg.epochs = 2;
    cfg.lr = 1e38; // the second epoch explodes
    let err = train(&mut m, tr, te, &cfg, true).unwrap_err().to_string();
    assert!(err.contains("at step"), "{err}");
    assert_eq!(std::fs::read(checkpoint_path(&cfg.out_dir)).unwrap(), saved, "the last good checkpoint is kept");
    let _ = std::fs::remove_dir_all(&cfg.out_dir);
}

/// `drop_last` drops each epoch's last, smaller training batch (every step a full batch) and nothing else:
/// the test set is still evaluated whole, and the run is otherwise the same (its first steps' losses too).
#[test]
fn drop_last_drops_the_short_training_batch_only() {
    let (train_all, test_all) = Dataset::mnist10k().unwrap();
    // 130 images in batches of 50: two full batches and one of 30; 70 test images in batches of 50.
    let (tr, te) = (subset(&train_all, 130), subset(&test_all, 70));
    let run = |drop_last: bool| {
        let cfg = TrainConfig { drop_last, ..config(&format!("drop-last-{drop_last}"), 2, 1e-3) };
        train(&mut tiny(3), tr.clone(), te.clone(), &cfg, false).unwrap()
    };
    let (kept, dropped) = (run(false), run(true));
    assert_eq!(kept.iter().map(|m| m.step_losses.len()).collect::<Vec<_>>(), [3, 3]);
    assert_eq!(dropped.iter().map(|m| m.step_losses.len()).collect::<Vec<_>>(), [2, 2]);
    assert_eq!(dropped.last().unwrap().step, 4);
    // The schedule spans the steps that run (warmup and cosine over 4 steps, not 6), so the first step's
    // learning rate, and with it every later loss, differs; the first loss (before any update) does not.
    assert_eq!(kept[0].step_losses[0], dropped[0].step_losses[0]);
    // The test set is evaluated whole either way: 70 images give accuracies in multiples of 1/70.
    for m in kept.iter().chain(&dropped) {
        let hits = m.test_acc * 70.0;
        assert!((hits - hits.round()).abs() < 1e-9, "{}", m.test_acc);
    }
}

#[test]
fn cuda_graph_is_refused_where_it_cannot_run() {
    let (train_all, test_all) = Dataset::mnist10k().unwrap();
    let (tr, te) = (subset(&train_all, 100), subset(&test_all, 50));
    let cases = [
        ("on the CPU", TrainConfig { cuda_graph: true, ..config("graph-cpu", 1, 1e-3) }, "CUDA device"),
        (
            "with clipping",
            TrainConfig {
                cuda_graph: true,
                clip_grad: Some(1.0),
                device: Device::Cuda(0),
                ..config("graph-clip", 1, 1e-3)
            },
            "clipping",
        ),
        (
            "with SGD",
            TrainConfig {
                cuda_graph: true,
                optimizer: OptimizerKind::Sgd,
                device: Device::Cuda(0),
                ..config("graph-sgd", 1, 1e-3)
            },
            "AdamW",
        ),
    ];
    for (what, cfg, says) in cases {
        let err = train(&mut tiny(1), tr.clone(), te.clone(), &cfg, false).err().unwrap_or_else(|| panic!("{what}"));
        assert!(err.to_string().contains(says), "{what}: {err}");
        let _ = std::fs::remove_dir_all(&cfg.out_dir);
    }
}

/// Two epochs on CUDA with every step replayed from one CUDA graph (the first eager and captured, each
/// epoch's last, smaller batch eager) repeat the losses, accuracies and weights of the same run without the
/// graph, bit for bit; without dropout and with it (the graph's masks are fed from the host generator, drawn
/// as the eager steps draw them, the last batch's included).
#[test]
fn cuda_graph_training_repeats_eager_training_exactly() {
    if engine::cuda::test_device_or_skip("cuda_graph_training_repeats_eager_training_exactly").is_none() {
        return;
    }
    let (train_all, test_all) = Dataset::mnist10k().unwrap();
    // 620 images in batches of 50: 12 full batches and one of 20 per epoch.
    let (tr, te) = (subset(&train_all, 620), subset(&test_all, 200));
    let run = |graph: bool, p: f64| {
        let cfg = TrainConfig {
            cuda_graph: graph,
            device: Device::Cuda(0),
            ..config(&format!("cuda-graph-{graph}-{p}"), 2, 3e-3)
        };
        let mut model = Tiny { p, ..tiny_on(1, Device::Cuda(0)) };
        let metrics = train(&mut model, tr.clone(), te.clone(), &cfg, false).unwrap();
        let weights: Vec<Vec<f64>> = model.parameters().iter().map(|p| p.to_vec_f64().unwrap()).collect();
        let _ = std::fs::remove_dir_all(&cfg.out_dir);
        (metrics, weights)
    };
    for p in [0.0, 0.3] {
        same_run(run(false, p), run(true, p));
    }
    assert_ne!(run(false, 0.0).1, run(false, 0.3).1, "dropout changed nothing");
}

fn same_run(
    (eager, eager_w): (Vec<nn::trainer::EpochMetrics>, Vec<Vec<f64>>),
    (graphed, graphed_w): (Vec<nn::trainer::EpochMetrics>, Vec<Vec<f64>>),
) {
    for (e, g) in eager.iter().zip(&graphed) {
        assert_eq!(e.step_losses.len(), 13);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&g.step_losses),
            bits(&e.step_losses),
            "epoch {}: {:?} vs {:?}",
            e.epoch,
            g.step_losses,
            e.step_losses
        );
        assert_eq!((g.train_acc, g.test_loss, g.test_acc), (e.train_acc, e.test_loss, e.test_acc), "epoch {}", e.epoch);
    }
    assert_eq!(graphed_w, eager_w, "final weights");
}
