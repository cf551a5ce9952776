//! mila-rs nn: optimizers and schedules now; modules, data, checkpoints and the trainer come with issue 7.

pub mod optim;
pub mod schedule;

pub use optim::{clip_grad_norm, param_groups, AdamW, AdamWConfig, Optimizer, ParamGroup, Sgd, SgdConfig};
pub use schedule::{CosineWarmup, StepLr};
