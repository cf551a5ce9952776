//! Reverse-mode autodiff, define-by-run.
//!
//! Every op that runs while grad mode is on and sees an input that requires grad records a [`Node`] on its
//! output: the op's backward (a struct implementing [`Op`], whose fields are what the forward saved) and the
//! inputs. `backward` sorts the graph reachable from the output topologically, seeds the output with the
//! cotangent and visits nodes from the output back to the leaves, each node turning the gradient of its
//! output into gradients of its inputs (vector-Jacobian products). A tensor used twice receives the sum.
//!
//! Backward runs under `no_grad`: gradients are plain tensors, not graphs (no higher-order derivatives). A
//! node's saved tensors are released once it has run, unless the graph is retained.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use std::sync::Arc;

use crate::tensor::{Meta, TensorId};
use crate::{DType, Device, Error, Result, Tensor};

/// The backward half of an op. `backward` receives dL/d(output) and returns dL/d(input) for each input in
/// the order they were recorded (`None` where an input gets no gradient).
pub trait Op: Send + Sync {
    fn name(&self) -> &'static str;
    fn backward(&self, grad: &Tensor) -> Result<Vec<Option<Tensor>>>;

    /// Whether [`Op::backward_onto`] should be handed the gradients already pending for the inputs (an op that
    /// can add one as its kernel stores its own, saving the tape's separate accumulation pass).
    fn takes_pending(&self) -> bool {
        false
    }

    /// The backward with `pending[i]`, the gradient already accumulated for input i (for the first occurrence
    /// of each input that has one), added in: entry i of the result is `pending[i] + own_i`, or the one that
    /// exists. The sum must be the tape's own (`pending.accumulate(own)`, one rounded addition) so that results
    /// do not depend on the op taking the path. Called only when [`Op::takes_pending`] says so.
    fn backward_onto(&self, grad: &Tensor, pending: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
        sum_pending(self.backward(grad)?, pending)
    }
}

/// `pending[i] + own[i]` by the tape's accumulation (or whichever exists), slot by slot: [`Op::backward_onto`]'s
/// default, and the rest of an op's slots after it summed some in itself.
pub fn sum_pending(own: Vec<Option<Tensor>>, pending: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
    if own.len() != pending.len() {
        return Ok(own); // the tape reports the count mismatch
    }
    own.into_iter()
        .zip(pending)
        .map(|(g, p)| match (p, g) {
            (Some(p), Some(g)) => p.accumulate(&g).map(Some),
            (p, g) => Ok(p.or(g)),
        })
        .collect()
}

struct NodeState {
    op: Box<dyn Op>,
    /// The inputs' places in the tape, not the inputs: their storage stays alive only through what `op`
    /// saved (see [`Meta`]).
    inputs: Vec<Arc<Meta>>,
}

pub(crate) struct Node {
    pub(crate) name: &'static str,
    state: Mutex<Option<NodeState>>,
}

impl Node {
    pub(crate) fn record<O: Op + 'static>(inputs: &[&Tensor], make_op: impl FnOnce() -> O) -> Option<Node> {
        if !is_grad_enabled() || !inputs.iter().any(|t| t.requires_grad()) {
            return None;
        }
        let op = make_op();
        Some(Node {
            name: op.name(),
            state: Mutex::new(Some(NodeState {
                op: Box::new(op),
                inputs: inputs.iter().map(|&t| t.0.meta.clone()).collect(),
            })),
        })
    }

    fn inputs(&self) -> Result<Vec<Arc<Meta>>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &*state {
            Some(s) => Ok(s.inputs.clone()),
            None => Err(Error::GraphFreed { op: self.name }),
        }
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops record the tape on this thread.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Turns recording off until dropped (restoring the previous mode).
pub struct NoGradGuard {
    prev: bool,
}

impl NoGradGuard {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        NoGradGuard { prev: GRAD_ENABLED.with(|g| g.replace(false)) }
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.prev));
    }
}

/// Runs `f` with recording off: nothing it computes keeps a graph or saves tensors.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = NoGradGuard::new();
    f()
}

/// Tensors reachable from `root` through recorded nodes, inputs before the tensors made from them.
fn topological_order(root: &Tensor) -> Result<Vec<Arc<Meta>>> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative post-order DFS (graphs can be deeper than the stack).
    let mut stack: Vec<(Arc<Meta>, bool)> = vec![(root.0.meta.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(node) = &t.node {
            for input in node.inputs()? {
                if input.requires_grad() && !seen.contains(&input.id) {
                    stack.push((input, false));
                }
            }
        }
    }
    Ok(order)
}

fn accumulate(slot: &mut HashMap<TensorId, Tensor>, id: TensorId, g: Tensor) -> Result<()> {
    match slot.remove(&id) {
        Some(prev) => slot.insert(id, prev.accumulate(&g)?),
        None => slot.insert(id, g),
    };
    Ok(())
}

pub(crate) fn backward(root: &Tensor, seed: Tensor, retain_graph: bool) -> Result<()> {
    if !root.requires_grad() {
        return Err(Error::NoGraph);
    }
    if seed.shape() != root.shape() {
        return Err(Error::ShapeMismatch { op: "backward", lhs: root.shape().to_vec(), rhs: seed.shape().to_vec() });
    }
    if seed.dtype() != root.dtype() {
        return Err(Error::DTypeMismatch { op: "backward", lhs: root.dtype(), rhs: seed.dtype() });
    }
    if seed.device() != root.device() {
        return Err(Error::DeviceMismatch { op: "backward", lhs: root.device(), rhs: seed.device() });
    }
    let order = topological_order(root)?;
    let _guard = NoGradGuard::new();
    let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
    grads.insert(root.id(), seed);
    for t in order.iter().rev() {
        let Some(g) = grads.remove(&t.id) else { continue };
        if t.is_leaf() || t.retains_grad.load(std::sync::atomic::Ordering::Relaxed) {
            let g = g.contiguous()?;
            let total = match t.grad() {
                Some(prev) => prev.accumulate(&g)?,
                None => g.clone(),
            };
            t.set_grad(Some(total));
        }
        let Some(node) = &t.node else { continue };
        let state = {
            let mut lock = node.state.lock().unwrap_or_else(|e| e.into_inner());
            if retain_graph {
                None
            } else {
                lock.take()
            }
        };
        // With a retained graph the state stays in place and is borrowed under the lock. An op that takes the
        // pending gradients gets them out of `grads` (first occurrences only) and returns them summed in.
        let run = |s: &NodeState, grads: &mut HashMap<TensorId, Tensor>| -> Result<(Vec<Option<Tensor>>, Vec<bool>)> {
            if !s.op.takes_pending() {
                return Ok((s.op.backward(&g)?, vec![false; s.inputs.len()]));
            }
            let mut seen = HashSet::new();
            let pending: Vec<Option<Tensor>> = s
                .inputs
                .iter()
                .map(|i| if i.requires_grad() && seen.insert(i.id) { grads.remove(&i.id) } else { None })
                .collect();
            let given = pending.iter().map(Option::is_some).collect();
            Ok((s.op.backward_onto(&g, pending)?, given))
        };
        let (gs, given, inputs) = match &state {
            Some(s) => {
                let (gs, given) = run(s, &mut grads)?;
                (gs, given, s.inputs.clone())
            }
            None => {
                let lock = node.state.lock().unwrap_or_else(|e| e.into_inner());
                let s = lock.as_ref().ok_or(Error::GraphFreed { op: node.name })?;
                let (gs, given) = run(s, &mut grads)?;
                (gs, given, s.inputs.clone())
            }
        };
        if gs.len() != inputs.len() {
            return Err(Error::Msg {
                context: "backward",
                msg: format!("{} returned {} gradients for {} inputs", node.name, gs.len(), inputs.len()),
            });
        }
        for ((input, gi), given) in inputs.iter().zip(gs).zip(given) {
            let Some(gi) = gi else { continue };
            if !input.requires_grad() {
                continue;
            }
            if gi.shape() != input.shape {
                return Err(Error::BackwardShape {
                    op: node.name,
                    got: gi.shape().to_vec(),
                    expected: input.shape.clone(),
                });
            }
            if given {
                // The pending gradient is summed into gi already (and was taken out of `grads`).
                grads.insert(input.id, gi);
            } else {
                accumulate(&mut grads, input.id, gi)?;
            }
        }
        drop(state);
    }
    Ok(())
}

/// Backward of ops whose gradient passes through unchanged (`contiguous`).
pub(crate) struct Identity {
    pub(crate) name: &'static str,
}

impl Op for Identity {
    fn name(&self) -> &'static str {
        self.name
    }
    fn backward(&self, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.clone())])
    }
}

pub(crate) struct Cast {
    pub(crate) to: DType,
}

impl Op for Cast {
    fn name(&self) -> &'static str {
        "to_dtype"
    }
    fn backward(&self, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.to_dtype(self.to)?)])
    }
}

pub(crate) struct ToDevice {
    pub(crate) to: Device,
}

impl Op for ToDevice {
    fn name(&self) -> &'static str {
        "to_device"
    }
    fn backward(&self, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.to_device(self.to)?)])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::Op;
    use crate::{Result, Tensor};

    /// y = 2 x; its backward needs nothing from the forward, so it saves nothing.
    struct Double;
    impl Op for Double {
        fn name(&self) -> &'static str {
            "double"
        }
        fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
            Ok(vec![Some(double(g)?)])
        }
    }

    fn double(x: &Tensor) -> Result<Tensor> {
        let v: Vec<f64> = x.to_vec::<f64>()?.iter().map(|a| 2.0 * a).collect();
        let storage = crate::Storage::Cpu(crate::CpuStorage::F64(v));
        Ok(Tensor::from_op(storage, x.shape(), &[x], || Double))
    }

    #[test]
    fn intermediates_no_backward_saved_are_freed_with_the_forward() -> Result<()> {
        let x = Tensor::from_vec(vec![1.0f64, -2.0, 3.0], &[3])?.requires_grad_(true)?;
        let y = double(&x)?;
        let z = double(&y)?;
        let y_data = Arc::downgrade(&y.0.storage);
        drop(y);
        // The tape still links z to x through y's node, but y's data is gone: no backward needed it.
        assert!(y_data.upgrade().is_none(), "an unsaved intermediate outlived its last user");
        z.backward_with(&Tensor::from_vec(vec![1.0f64; z.numel()], z.shape())?)?;
        assert_eq!(x.grad().map(|g| g.to_vec::<f64>()).transpose()?, Some(vec![4.0; 3]));
        Ok(())
    }

    /// a + 2 b; `onto` makes it take the pending gradients (summed as the default `backward_onto` does, and
    /// counted).
    struct Add2 {
        onto: bool,
        got: Arc<std::sync::atomic::AtomicUsize>,
    }
    impl Op for Add2 {
        fn name(&self) -> &'static str {
            "add2"
        }
        fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
            Ok(vec![Some(g.clone()), Some(double(g)?)])
        }
        fn takes_pending(&self) -> bool {
            self.onto
        }
        fn backward_onto(&self, g: &Tensor, pending: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
            let n = pending.iter().filter(|p| p.is_some()).count();
            self.got.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            super::sum_pending(self.backward(g)?, pending)
        }
    }

    /// x's gradient through a = add2(double(x), x) and out = add2(a, x) (x again at the root, as a residual):
    /// with and without the pending path in a's op, and how many pending gradients it was handed.
    fn pending_run(onto: bool) -> Result<(Vec<f64>, usize)> {
        let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let x = Tensor::from_vec(vec![0.25f64, -1.5, 3.0], &[3])?.requires_grad_(true)?;
        let d = double(&x)?;
        let a = {
            let v: Vec<f64> = d.to_vec::<f64>()?.iter().zip(x.to_vec::<f64>()?).map(|(p, q)| p + 2.0 * q).collect();
            let storage = crate::Storage::Cpu(crate::CpuStorage::F64(v));
            let op = Add2 { onto, got: got.clone() };
            Tensor::from_op(storage, x.shape(), &[&d, &x], || op)
        };
        // A residual of x at the root: its gradient reaches x first and is pending when add2's backward runs.
        let out = {
            let v: Vec<f64> = a.to_vec::<f64>()?.iter().zip(x.to_vec::<f64>()?).map(|(p, q)| p + 2.0 * q).collect();
            let storage = crate::Storage::Cpu(crate::CpuStorage::F64(v));
            let op = Add2 { onto: false, got: got.clone() };
            Tensor::from_op(storage, x.shape(), &[&a, &x], || op)
        };
        out.backward_with(&Tensor::from_vec(vec![1.0f64, 0.5, -2.0], &[3])?)?;
        let n = got.load(std::sync::atomic::Ordering::Relaxed);
        Ok((x.grad().map(|g| g.to_vec::<f64>()).transpose()?.unwrap_or_default(), n))
    }

    #[test]
    fn ops_that_take_pending_gradients_give_the_tapes_sums() -> Result<()> {
        let (plain, n0) = pending_run(false)?;
        let (onto, n1) = pending_run(true)?;
        assert_eq!(plain, onto);
        assert_eq!((n0, n1), (0, 1), "the residual's gradient for x was handed to add2 once");
        // add2 passes g to its first input and 2 g to its second: d(out)/dx = 2 (out's x) + 2 (a's x) + 2 (a's
        // first input, through double): 6 times the cotangent.
        assert_eq!(plain, vec![6.0, 3.0, -12.0]);
        Ok(())
    }

    #[test]
    fn a_retained_intermediate_gets_its_gradient_after_being_dropped_from_the_forward() -> Result<()> {
        let x = Tensor::from_vec(vec![0.5f64, 1.5], &[2])?.requires_grad_(true)?;
        let y = double(&x)?;
        y.retain_grad();
        let z = double(&double(&y)?)?;
        z.backward_with(&Tensor::from_vec(vec![1.0f64; z.numel()], z.shape())?)?;
        assert_eq!(y.grad().map(|g| g.to_vec::<f64>()).transpose()?, Some(vec![4.0; 2]));
        assert_eq!(x.grad().map(|g| g.to_vec::<f64>()).transpose()?, Some(vec![8.0; 2]));
        Ok(())
    }
}
