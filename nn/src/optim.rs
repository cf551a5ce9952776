//! Optimizers with PyTorch's update rules (the kernels and formulas are in `ops::optim`), parameter groups,
//! gradient clipping by global norm.

use std::collections::HashMap;

use engine::{no_grad, Error, Result, Tensor, TensorId};
use ops::optim::{
    adamw_hyper, adamw_step_multi, adamw_step_multi_hyper, scale_multi, sgd_step_multi, sum_squares_multi, AdamWStep,
    AdamWTensors, SgdStep, SgdTensors, ADAMW_HYPER_LEN,
};

/// Parameters sharing hyper-parameters (here: the weight decay).
#[derive(Clone)]
pub struct ParamGroup {
    pub params: Vec<Tensor>,
    pub weight_decay: f64,
}

/// Splits named parameters into a decayed group and a no-decay group (biases, norms and every 1-D
/// parameter), as timm and the official MLLA code do.
pub fn param_groups(named: &[(String, Tensor)], weight_decay: f64, no_decay: &[&str]) -> Vec<ParamGroup> {
    let (mut decay, mut keep) = (Vec::new(), Vec::new());
    for (name, p) in named {
        let skip = p.rank() <= 1 || name.ends_with(".bias") || no_decay.iter().any(|k| name.contains(k));
        if skip {
            keep.push(p.clone());
        } else {
            decay.push(p.clone());
        }
    }
    vec![ParamGroup { params: decay, weight_decay }, ParamGroup { params: keep, weight_decay: 0.0 }]
}

/// Named state tensors and named counters (see [`Optimizer::export_state`]).
pub type NamedState = (Vec<(String, Tensor)>, Vec<(String, u64)>);

pub trait Optimizer {
    /// Applies one update to every parameter that has a gradient.
    fn step(&mut self) -> Result<()>;
    fn lr(&self) -> f64;
    fn set_lr(&mut self, lr: f64);
    fn groups(&self) -> &[ParamGroup];

    /// The optimizer's state as named tensors and counters, named after the parameters
    /// (`optim.<param>.<state>`), for checkpoints.
    fn export_state(&self, named: &[(String, Tensor)]) -> NamedState;

    /// Restores what [`Optimizer::export_state`] wrote (copies, on the parameters' devices).
    fn import_state(
        &mut self,
        named: &[(String, Tensor)],
        tensors: &HashMap<String, Tensor>,
        counters: &HashMap<String, u64>,
    ) -> Result<()>;

    /// For CUDA graphs ([`crate::graph::GraphedStep`]): enqueues the update of every parameter that has a
    /// gradient with the values that change from step to step (learning rate, step counts) read from the
    /// device tensor `hyper` when the kernels run, so that the update can be captured once and replayed.
    /// Counts no step: each replay is counted by [`Optimizer::next_graphed_hyper`], which also says what
    /// to write into `hyper` before it. The state must exist already (run one eager [`Optimizer::step`]
    /// first). `hyper`: f64 on the parameters' device, [`Optimizer::graphed_hyper_len`] elements.
    /// Optimizers that cannot do this (the default) return an error.
    fn step_graphed(&mut self, hyper: &Tensor) -> Result<()> {
        let _ = hyper;
        Err(Error::Msg {
            context: "cuda graph",
            msg: "this optimizer cannot run inside a CUDA graph (AdamW can)".into(),
        })
    }

    /// The number of values [`Optimizer::step_graphed`] reads, for the parameters that have a gradient now;
    /// `None` when this optimizer cannot run graphed (the default).
    fn graphed_hyper_len(&self) -> Option<usize> {
        None
    }

    /// Counts one step of the update recorded by the last [`Optimizer::step_graphed`] (as [`Optimizer::step`]
    /// would) and returns the values to write into its `hyper` tensor for that step, at the current
    /// learning rate.
    fn next_graphed_hyper(&mut self) -> Result<Vec<f64>> {
        Err(Error::Msg { context: "cuda graph", msg: "this optimizer has no graphed update".into() })
    }

    /// Drops every parameter's gradient.
    fn zero_grad(&self) {
        for p in self.groups().iter().flat_map(|g| &g.params) {
            p.zero_grad();
        }
    }
}

fn zeros_like(p: &Tensor) -> Result<Tensor> {
    Tensor::zeros(p.shape(), p.dtype(), p.device())
}

#[derive(Debug, Clone, Copy)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
}

pub struct Sgd {
    groups: Vec<ParamGroup>,
    cfg: SgdConfig,
    /// Momentum buffers, made on a parameter's first step.
    buffers: HashMap<TensorId, Tensor>,
}

impl Sgd {
    pub fn new(groups: Vec<ParamGroup>, cfg: SgdConfig) -> Result<Self> {
        if cfg.nesterov && (cfg.momentum <= 0.0 || cfg.dampening != 0.0) {
            return Err(Error::Msg { context: "sgd", msg: "nesterov needs momentum > 0 and dampening 0".into() });
        }
        Ok(Sgd { groups, cfg, buffers: HashMap::new() })
    }
}

impl Optimizer for Sgd {
    /// Every parameter with a gradient in one [`sgd_step_multi`] (one launch per device and about a hundred
    /// parameters on CUDA).
    fn step(&mut self) -> Result<()> {
        no_grad(|| {
            // (parameter, gradient, momentum buffer, hyperparameters), in group order.
            let mut work = Vec::new();
            for group in &self.groups {
                for p in &group.params {
                    let Some(g) = p.grad() else { continue };
                    let first = !self.buffers.contains_key(&p.id());
                    let buf = match self.buffers.get(&p.id()) {
                        Some(b) => b.clone(),
                        None => {
                            let b = zeros_like(p)?;
                            self.buffers.insert(p.id(), b.clone());
                            b
                        }
                    };
                    let h = SgdStep {
                        lr: self.cfg.lr,
                        momentum: self.cfg.momentum,
                        dampening: self.cfg.dampening,
                        nesterov: self.cfg.nesterov,
                        weight_decay: group.weight_decay,
                        first,
                    };
                    work.push((p, g, buf, h));
                }
            }
            let items: Vec<SgdTensors> =
                work.iter().map(|(p, grad, buf, h)| SgdTensors { p, grad, buf, h: *h }).collect();
            sgd_step_multi(&items)
        })
    }
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    fn export_state(&self, named: &[(String, Tensor)]) -> NamedState {
        let tensors = named
            .iter()
            .filter_map(|(n, p)| self.buffers.get(&p.id()).map(|b| (format!("optim.{n}.momentum_buffer"), b.clone())))
            .collect();
        (tensors, Vec::new())
    }
    fn import_state(
        &mut self,
        named: &[(String, Tensor)],
        tensors: &HashMap<String, Tensor>,
        _: &HashMap<String, u64>,
    ) -> Result<()> {
        for (n, p) in named {
            if let Some(b) = tensors.get(&format!("optim.{n}.momentum_buffer")) {
                self.buffers.insert(p.id(), state_copy(b, p)?);
            }
        }
        Ok(())
    }
}

/// A fresh copy of saved state `t`, in `like`'s dtype and on its device, with `like`'s shape checked.
fn state_copy(t: &Tensor, like: &Tensor) -> Result<Tensor> {
    if t.shape() != like.shape() {
        return Err(Error::ShapeMismatch { op: "import_state", lhs: like.shape().to_vec(), rhs: t.shape().to_vec() });
    }
    no_grad(|| {
        let out = zeros_like(like)?;
        let src = t.to_dtype(like.dtype())?.to_device(like.device())?;
        ops::copy_into(&out, &out.layout().clone(), &src)?;
        Ok(out)
    })
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub amsgrad: bool,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults.
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, amsgrad: false }
    }
}

/// Per-parameter AdamW state: step count, first and second moments, and the running max for amsgrad.
pub struct AdamState {
    pub step: u64,
    pub m: Tensor,
    pub v: Tensor,
    /// Only with amsgrad.
    pub vmax: Option<Tensor>,
}

pub struct AdamW {
    groups: Vec<ParamGroup>,
    cfg: AdamWConfig,
    state: HashMap<TensorId, AdamState>,
    /// The parameters of the last [`Optimizer::step_graphed`], in its order, with their weight decay: whose
    /// hyperparameters [`Optimizer::next_graphed_hyper`] writes.
    graphed: Vec<(TensorId, f64)>,
}

impl AdamW {
    pub fn new(groups: Vec<ParamGroup>, cfg: AdamWConfig) -> Self {
        AdamW { groups, cfg, state: HashMap::new(), graphed: Vec::new() }
    }

    /// The hyperparameters of one step of a parameter at step count `step` in a group of `weight_decay`.
    fn hyper(&self, weight_decay: f64, step: u64) -> AdamWStep {
        AdamWStep {
            lr: self.cfg.lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay,
            amsgrad: self.cfg.amsgrad,
            step,
        }
    }

    /// The state of one parameter, if it has taken a step.
    pub fn state(&self, p: &Tensor) -> Option<&AdamState> {
        self.state.get(&p.id())
    }
}

impl Optimizer for AdamW {
    /// Every parameter with a gradient in one [`adamw_step_multi`] (one launch per device and about a hundred
    /// parameters on CUDA).
    fn step(&mut self) -> Result<()> {
        no_grad(|| {
            // (parameter, gradient, m, v, vmax, hyperparameters), in group order.
            let mut work = Vec::new();
            for group in &self.groups {
                for p in &group.params {
                    let Some(g) = p.grad() else { continue };
                    let st = match self.state.entry(p.id()) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            let vmax = if self.cfg.amsgrad { Some(zeros_like(p)?) } else { None };
                            let (m, v) = (zeros_like(p)?, zeros_like(p)?);
                            e.insert(AdamState { step: 0, m, v, vmax })
                        }
                    };
                    st.step += 1;
                    let step = st.step;
                    let (m, v, vmax) = (st.m.clone(), st.v.clone(), st.vmax.clone());
                    work.push((p, g, m, v, vmax, self.hyper(group.weight_decay, step)));
                }
            }
            let items: Vec<AdamWTensors> = work
                .iter()
                .map(|(p, grad, m, v, vmax, h)| AdamWTensors { p, grad, m, v, vmax: vmax.as_ref(), h: *h })
                .collect();
            adamw_step_multi(&items)
        })
    }
    /// One [`adamw_step_multi_hyper`] over every parameter with a gradient, in the order of [`Optimizer::step`],
    /// so that a replay applies the same kernels to the same parameters as an eager step would.
    fn step_graphed(&mut self, hyper: &Tensor) -> Result<()> {
        no_grad(|| {
            let mut work = Vec::new();
            let mut graphed = Vec::new();
            for group in &self.groups {
                for p in &group.params {
                    let Some(g) = p.grad() else { continue };
                    let st = self.state.get(&p.id()).ok_or_else(|| Error::Msg {
                        context: "cuda graph",
                        msg: "AdamW has no state for a parameter yet: run one eager step before capturing".into(),
                    })?;
                    // The values come from `hyper`; this one only passes the checks (step >= 1).
                    let h = self.hyper(group.weight_decay, st.step + 1);
                    work.push((p, g, st.m.clone(), st.v.clone(), st.vmax.clone(), h));
                    graphed.push((p.id(), group.weight_decay));
                }
            }
            let items: Vec<AdamWTensors> = work
                .iter()
                .map(|(p, grad, m, v, vmax, h)| AdamWTensors { p, grad, m, v, vmax: vmax.as_ref(), h: *h })
                .collect();
            adamw_step_multi_hyper(&items, hyper)?;
            self.graphed = graphed;
            Ok(())
        })
    }
    fn graphed_hyper_len(&self) -> Option<usize> {
        let with_grad = self.groups.iter().flat_map(|g| &g.params).filter(|p| p.grad().is_some()).count();
        Some(ADAMW_HYPER_LEN * with_grad)
    }
    fn next_graphed_hyper(&mut self) -> Result<Vec<f64>> {
        if self.graphed.is_empty() {
            return Err(Error::Msg { context: "cuda graph", msg: "AdamW has no graphed update to advance".into() });
        }
        let mut values = Vec::with_capacity(ADAMW_HYPER_LEN * self.graphed.len());
        for i in 0..self.graphed.len() {
            let (id, weight_decay) = self.graphed[i];
            let st = self.state.get_mut(&id).ok_or_else(|| Error::Msg {
                context: "cuda graph",
                msg: "AdamW lost the state of a graphed parameter (was it imported again?)".into(),
            })?;
            st.step += 1;
            let step = st.step;
            values.extend(adamw_hyper(self.hyper(weight_decay, step)));
        }
        Ok(values)
    }
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    fn export_state(&self, named: &[(String, Tensor)]) -> NamedState {
        let (mut tensors, mut counters) = (Vec::new(), Vec::new());
        for (n, p) in named {
            let Some(st) = self.state.get(&p.id()) else { continue };
            tensors.push((format!("optim.{n}.exp_avg"), st.m.clone()));
            tensors.push((format!("optim.{n}.exp_avg_sq"), st.v.clone()));
            if let Some(x) = &st.vmax {
                tensors.push((format!("optim.{n}.max_exp_avg_sq"), x.clone()));
            }
            counters.push((format!("optim.{n}.step"), st.step));
        }
        (tensors, counters)
    }
    fn import_state(
        &mut self,
        named: &[(String, Tensor)],
        tensors: &HashMap<String, Tensor>,
        counters: &HashMap<String, u64>,
    ) -> Result<()> {
        for (n, p) in named {
            let Some(&step) = counters.get(&format!("optim.{n}.step")) else { continue };
            let get = |k: &str| {
                tensors.get(&format!("optim.{n}.{k}")).ok_or_else(|| Error::Msg {
                    context: "import_state",
                    msg: format!("optimizer state 'optim.{n}.{k}' is missing"),
                })
            };
            let vmax = match (self.cfg.amsgrad, tensors.get(&format!("optim.{n}.max_exp_avg_sq"))) {
                (true, Some(x)) => Some(state_copy(x, p)?),
                (true, None) => Some(zeros_like(p)?),
                (false, _) => None,
            };
            let st =
                AdamState { step, m: state_copy(get("exp_avg")?, p)?, v: state_copy(get("exp_avg_sq")?, p)?, vmax };
            self.state.insert(p.id(), st);
        }
        Ok(())
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor max_norm / (norm + 1e-6), applied only when below 1). Returns the norm before.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64> {
    no_grad(|| {
        let grads: Vec<Tensor> = params.iter().filter_map(|p| p.grad()).collect();
        let grads: Vec<&Tensor> = grads.iter().collect();
        // On CUDA one launch per ~200 gradients and one read of the device (not one per gradient).
        let norm = sum_squares_multi(&grads)?.sqrt();
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            scale_multi(&grads, factor)?;
        }
        Ok(norm)
    })
}
