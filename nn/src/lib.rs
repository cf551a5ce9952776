//! mila-rs nn: modules with PyTorch parameter names, init, optimizers and schedules; data, checkpoints and
//! the trainer come with issue 7.

pub mod checkpoint;
pub mod data;
pub mod ema;
pub mod graph;
pub mod init;
pub mod layers;
pub mod module;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use graph::{GraphedStep, StepOutput};
pub use init::Init;
pub use layers::{BatchNorm2d, Conv2d, DropPath, LayerNorm, Linear, Mlp};
pub use module::{Entry, Module};

pub use optim::{clip_grad_norm, param_groups, AdamW, AdamWConfig, Optimizer, ParamGroup, Sgd, SgdConfig};
pub use schedule::{CosineWarmup, StepLr};
