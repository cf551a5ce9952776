//! mila-rs nn: modules, optimizers, data and the trainer (issue 7).
