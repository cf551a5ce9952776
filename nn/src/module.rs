//! Modules: named parameters and buffers under PyTorch's `state_dict` names, train/eval mode.
//!
//! A module lists its tensors through [`Module::visit`], giving each a dotted name relative to the module
//! (`weight`, `mlp.fc1.bias`, `layers.0.blocks.1.attn.qk.weight`). Containers prefix their children's names,
//! so the names of a whole model are PyTorch's and a PyTorch `state_dict` saved as safetensors loads as is.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use engine::{no_grad, Error, Result, Tensor};

/// What a named entry of a module is.
pub enum Entry<'a> {
    /// A trained parameter; `no_decay` marks those AdamW should not decay (norms, biases, 1-D).
    Param { tensor: &'a Tensor, no_decay: bool },
    /// A buffer: saved and loaded, not trained (BatchNorm's running statistics).
    Buffer(&'a Tensor),
    /// An integer buffer (BatchNorm's `num_batches_tracked`, int64 in PyTorch).
    Counter(&'a AtomicU64),
}

pub trait Module {
    /// Calls `f` with the name (relative to this module) and kind of every tensor it owns, in a fixed order.
    fn visit(&self, f: &mut dyn FnMut(&str, Entry<'_>));

    /// Switches training behaviour (batch statistics, dropout) on or off, for this module and its children.
    fn set_training(&mut self, training: bool);

    /// Every parameter with its full name.
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visit(&mut |name, e| {
            if let Entry::Param { tensor, .. } = e {
                out.push((name.to_string(), tensor.clone()));
            }
        });
        out
    }

    /// Parameters split into (decayed, not decayed) by the flags set where they were made.
    fn parameters_by_decay(&self) -> (Vec<Tensor>, Vec<Tensor>) {
        let (mut decay, mut keep) = (Vec::new(), Vec::new());
        self.visit(&mut |_, e| {
            if let Entry::Param { tensor, no_decay } = e {
                if no_decay {
                    keep.push(tensor.clone());
                } else {
                    decay.push(tensor.clone());
                }
            }
        });
        (decay, keep)
    }

    fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters().into_iter().map(|(_, t)| t).collect()
    }

    /// Number of trainable elements.
    fn num_params(&self) -> usize {
        self.parameters().iter().map(|p| p.numel()).sum()
    }

    /// Parameters and float buffers by name (counters are in [`Module::counters`]).
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visit(&mut |name, e| match e {
            Entry::Param { tensor, .. } | Entry::Buffer(tensor) => out.push((name.to_string(), tensor.clone())),
            Entry::Counter(_) => {}
        });
        out
    }

    /// Integer buffers by name.
    fn counters(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        self.visit(&mut |name, e| {
            if let Entry::Counter(c) = e {
                out.push((name.to_string(), c.load(Ordering::Relaxed)));
            }
        });
        out
    }

    /// Copies tensors by name into this module's parameters and buffers, in place (tensor identities, and so
    /// optimizer state, are kept). Shapes must match; every entry of the module must be present unless
    /// `strict` is false. Values are converted to each parameter's dtype and device.
    fn load_tensors(
        &self,
        tensors: &HashMap<String, Tensor>,
        counters: &HashMap<String, u64>,
        strict: bool,
    ) -> Result<()> {
        let mut result = Ok(());
        self.visit(&mut |name, e| {
            if result.is_err() {
                return;
            }
            result = match e {
                Entry::Param { tensor, .. } | Entry::Buffer(tensor) => match tensors.get(name) {
                    Some(src) => assign(name, tensor, src),
                    None if strict => Err(missing(name)),
                    None => Ok(()),
                },
                Entry::Counter(c) => match counters.get(name) {
                    Some(&v) => {
                        c.store(v, Ordering::Relaxed);
                        Ok(())
                    }
                    None if strict => Err(missing(name)),
                    None => Ok(()),
                },
            };
        });
        result
    }
}

fn missing(name: &str) -> Error {
    Error::Msg { context: "load_tensors", msg: format!("'{name}' is missing from the loaded tensors") }
}

/// `dst <- src` in place (through dst's storage), converting dtype and device.
pub fn assign(name: &str, dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.shape() != src.shape() {
        return Err(Error::Msg {
            context: "load_tensors",
            msg: format!("'{name}': shape {:?} in the module, {:?} loaded", dst.shape(), src.shape()),
        });
    }
    no_grad(|| {
        let src = src.to_dtype(dst.dtype())?.to_device(dst.device())?;
        ops::copy_into(dst, &dst.layout().clone(), &src)
    })
}

/// The dotted name of a child: `join("layers.0", "blocks")` is `layers.0.blocks`.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Visits `child` with its names prefixed by `name`.
pub fn visit_child(child: &dyn Module, name: &str, f: &mut dyn FnMut(&str, Entry<'_>)) {
    child.visit(&mut |inner, e| f(&join(name, inner), e));
}
