//! The tensor: shared storage, a layout over it, and (when it was made by a recorded op) the node of the
//! reverse-mode tape that made it. Cloning a `Tensor` is cheap (an `Arc`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::autograd::{self, Node, Op};
use crate::{CpuStorage, DType, Device, Error, Float, Layout, Result, Storage};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn next() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(1);
        TensorId(COUNTER.fetch_add(1, Ordering::Relaxed))
    }
}

/// The storage shared by a tensor and its views, counted in [`crate::storage::cpu_memory`] while it lives
/// when it is on the CPU.
pub(crate) struct StorageCell {
    data: RwLock<Storage>,
    /// The bytes counted when the cell was made, given back on drop (an in-place write cannot change them).
    cpu_bytes: usize,
}

impl StorageCell {
    fn new(storage: Storage) -> Arc<StorageCell> {
        let cpu_bytes = match &storage {
            Storage::Cpu(s) => s.len() * s.dtype().size_in_bytes(),
            Storage::Cuda(_) => 0,
        };
        crate::storage::cpu_memory::acquire(cpu_bytes);
        Arc::new(StorageCell { data: RwLock::new(storage), cpu_bytes })
    }

    fn read(&self) -> RwLockReadGuard<'_, Storage> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for StorageCell {
    fn drop(&mut self) {
        crate::storage::cpu_memory::release(self.cpu_bytes);
    }
}

pub(crate) struct Inner {
    pub(crate) storage: Arc<StorageCell>,
    pub(crate) layout: Layout,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) meta: Arc<Meta>,
}

/// A tensor's place in the tape, apart from its data: what a node keeps of each input. The graph's edges
/// point here, not at the tensors, so that recording an op keeps its inputs' *storage* alive only where the
/// op saved them for its backward (as PyTorch's edges point at grad_fns): an intermediate result that no
/// backward needs is freed as soon as the forward drops it, instead of living until backward is done.
pub(crate) struct Meta {
    pub(crate) id: TensorId,
    /// The shape, for checking the gradients backward hands to this tensor.
    pub(crate) shape: Vec<usize>,
    /// The op that made this tensor, with its inputs; `None` for leaves and untracked results.
    pub(crate) node: Option<Node>,
    pub(crate) requires_grad: AtomicBool,
    pub(crate) retains_grad: AtomicBool,
    pub(crate) grad: Mutex<Option<Tensor>>,
}

impl Meta {
    pub(crate) fn requires_grad(&self) -> bool {
        self.requires_grad.load(Ordering::Relaxed)
    }
    pub(crate) fn is_leaf(&self) -> bool {
        self.node.is_none()
    }
    pub(crate) fn grad(&self) -> Option<Tensor> {
        self.grad.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub(crate) fn set_grad(&self, g: Option<Tensor>) {
        *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = g;
    }
}

#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {}, {}", self.shape(), self.dtype(), self.device())?;
        if let Some(node) = &self.0.meta.node {
            write!(f, ", grad_fn={}", node.name)?;
        } else if self.requires_grad() {
            write!(f, ", requires_grad")?;
        }
        write!(f, ")")
    }
}

impl Tensor {
    fn build(storage: Arc<StorageCell>, layout: Layout, node: Option<Node>) -> Tensor {
        let (dtype, device) = {
            let s = storage.read();
            (s.dtype(), s.device())
        };
        let requires_grad = node.is_some();
        let meta = Meta {
            id: TensorId::next(),
            shape: layout.shape().to_vec(),
            node,
            requires_grad: AtomicBool::new(requires_grad),
            retains_grad: AtomicBool::new(false),
            grad: Mutex::new(None),
        };
        Tensor(Arc::new(Inner { storage, layout, dtype, device, meta: Arc::new(meta) }))
    }

    /// A leaf (no graph) over new storage.
    pub fn from_storage(storage: Storage, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if storage.len() != numel {
            return Err(Error::ElementCount {
                op: "from_storage",
                shape: vec![storage.len()],
                numel: storage.len(),
                target: shape.iter().map(|&d| d as isize).collect(),
            });
        }
        Ok(Self::build(StorageCell::new(storage), Layout::contiguous(shape), None))
    }

    /// A CPU leaf from a vector.
    pub fn from_vec<T: Float>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        Self::from_storage(Storage::Cpu(T::into_storage(data)), shape)
    }

    /// A leaf from f64 values, converted to `dtype` and placed on `device`.
    pub fn from_f64(data: &[f64], shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(Error::ElementCount {
                op: "from_f64",
                shape: vec![data.len()],
                numel: data.len(),
                target: shape.iter().map(|&d| d as isize).collect(),
            });
        }
        Self::from_storage(Storage::from_cpu(CpuStorage::from_f64(data, dtype), device)?, shape)
    }

    pub fn full(shape: &[usize], value: f64, dtype: DType, device: Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Self::from_storage(Storage::full(n, value, dtype, device)?, shape)
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Self::full(shape, 0.0, dtype, device)
    }

    pub fn ones(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Self::full(shape, 1.0, dtype, device)
    }

    /// A 0-dim tensor.
    pub fn scalar(value: f64, dtype: DType, device: Device) -> Result<Tensor> {
        Self::full(&[], value, dtype, device)
    }

    pub fn zeros_like(&self) -> Result<Tensor> {
        Self::zeros(self.shape(), self.dtype(), self.device())
    }

    pub fn ones_like(&self) -> Result<Tensor> {
        Self::ones(self.shape(), self.dtype(), self.device())
    }

    /// The result of an op over new storage. Records a tape node when grad mode is on and an input requires
    /// grad; `make_op` is only called then, so forward passes under `no_grad` save nothing.
    pub fn from_op<O: Op + 'static>(
        storage: Storage,
        shape: &[usize],
        inputs: &[&Tensor],
        make_op: impl FnOnce() -> O,
    ) -> Tensor {
        let node = Node::record(inputs, make_op);
        Self::build(StorageCell::new(storage), Layout::contiguous(shape), node)
    }

    /// Like [`Tensor::from_op`] for ops whose backward needs their own output (exp, sigmoid, max, ...):
    /// `make_op` receives an untracked tensor over the output's storage, so the node holds no cycle.
    pub fn from_op_with_output<O: Op + 'static>(
        storage: Storage,
        shape: &[usize],
        inputs: &[&Tensor],
        make_op: impl FnOnce(Tensor) -> O,
    ) -> Tensor {
        let storage = StorageCell::new(storage);
        let layout = Layout::contiguous(shape);
        let node = Node::record(inputs, || make_op(Self::build(storage.clone(), layout.clone(), None)));
        Self::build(storage, layout, node)
    }

    /// A view of `self`'s storage under a new layout, recorded like [`Tensor::from_op`].
    pub fn view_from_op<O: Op + 'static>(&self, layout: Layout, make_op: impl FnOnce() -> O) -> Tensor {
        let node = Node::record(&[self], make_op);
        Self::build(self.0.storage.clone(), layout, node)
    }

    /// Same as [`Tensor::from_op`] for an op that returns a non-contiguous layout over new storage.
    pub fn from_op_with_layout<O: Op + 'static>(
        storage: Storage,
        layout: Layout,
        inputs: &[&Tensor],
        make_op: impl FnOnce() -> O,
    ) -> Tensor {
        let node = Node::record(inputs, make_op);
        Self::build(StorageCell::new(storage), layout, node)
    }

    pub fn id(&self) -> TensorId {
        self.0.meta.id
    }
    pub fn shape(&self) -> &[usize] {
        self.0.layout.shape()
    }
    pub fn dims(&self) -> &[usize] {
        self.shape()
    }
    pub fn rank(&self) -> usize {
        self.shape().len()
    }
    pub fn numel(&self) -> usize {
        self.0.layout.numel()
    }
    pub fn strides(&self) -> &[usize] {
        self.0.layout.strides()
    }
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    pub fn device(&self) -> Device {
        self.0.device
    }
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }

    /// Size of `dim` (negative counts from the end).
    pub fn dim(&self, dim: isize) -> Result<usize> {
        Ok(self.shape()[crate::layout::normalize_dim("dim", dim, self.shape())?])
    }

    /// Read access to the storage (shared by all views of it).
    pub fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.storage.read()
    }

    /// Write access for in-place updates (optimizers, under `no_grad`). Views of the same storage see them.
    pub fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.0.storage.data.write().unwrap_or_else(|e| e.into_inner())
    }

    /// True when both tensors are views of the same storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    /// A key of the storage, equal for two live tensors exactly when [`Tensor::same_storage`] holds (for
    /// grouping many tensors by storage without comparing every pair).
    pub fn storage_key(&self) -> usize {
        Arc::as_ptr(&self.0.storage) as *const () as usize
    }

    /// The name of the op that made this tensor, if it was recorded.
    pub fn grad_fn(&self) -> Option<&'static str> {
        self.0.meta.node.as_ref().map(|n| n.name)
    }

    pub fn is_leaf(&self) -> bool {
        self.0.meta.is_leaf()
    }

    pub fn requires_grad(&self) -> bool {
        self.0.meta.requires_grad()
    }

    /// Marks a leaf as requiring grad (its gradient is kept in `grad()` after backward). Returns `self`.
    pub fn requires_grad_(self, on: bool) -> Result<Tensor> {
        if !self.is_leaf() && !on {
            return Err(Error::invalid(
                "requires_grad_",
                "only a leaf's requires_grad can be turned off; use detach()",
                self.shape(),
            ));
        }
        self.0.meta.requires_grad.store(on || !self.is_leaf(), Ordering::Relaxed);
        Ok(self)
    }

    /// Asks backward to keep this intermediate tensor's gradient too.
    pub fn retain_grad(&self) {
        self.0.meta.retains_grad.store(true, Ordering::Relaxed);
    }

    /// The gradient accumulated by backward, if any.
    pub fn grad(&self) -> Option<Tensor> {
        self.0.meta.grad()
    }

    pub fn set_grad(&self, g: Option<Tensor>) {
        self.0.meta.set_grad(g)
    }

    pub fn zero_grad(&self) {
        self.set_grad(None);
    }

    /// The result of a fused op that computed `value` from other ops with recording off: `value`'s data and
    /// layout, recorded as one node over `inputs` with the fused op's own backward (which may recompute
    /// cheap intermediates instead of saving them).
    pub fn from_op_over<O: Op + 'static>(value: &Tensor, inputs: &[&Tensor], make_op: impl FnOnce() -> O) -> Tensor {
        let node = Node::record(inputs, make_op);
        Self::build(value.0.storage.clone(), value.0.layout.clone(), node)
    }

    /// A new leaf over the same storage, cut from the graph.
    pub fn detach(&self) -> Tensor {
        Self::build(self.0.storage.clone(), self.0.layout.clone(), None)
    }

    /// A view over the same storage with another layout, not recorded (for ops' own bookkeeping).
    pub fn with_layout(&self, layout: Layout) -> Tensor {
        Self::build(self.0.storage.clone(), layout, None)
    }

    /// A copy in row-major order if the layout is not contiguous already; the gradient passes through.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        let storage = self.storage().copy_contiguous(self.layout())?;
        Ok(Tensor::from_op(storage, self.shape(), &[self], || autograd::Identity { name: "contiguous" }))
    }

    /// This tensor in another dtype; the gradient is cast back.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let storage = self.storage().cast(self.layout(), dtype)?;
        let from = self.dtype();
        Ok(Tensor::from_op(storage, self.shape(), &[self], || autograd::Cast { to: from }))
    }

    /// This tensor on another device; the gradient is moved back.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let host = self.storage().to_cpu(self.layout())?;
        let storage = Storage::from_cpu(host, device)?;
        let from = self.device();
        Ok(Tensor::from_op(storage, self.shape(), &[self], || autograd::ToDevice { to: from }))
    }

    /// The elements in row-major order on the host. Errs if `T` is not this tensor's dtype.
    pub fn to_vec<T: Float>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype() {
            return Err(Error::DTypeMismatch { op: "to_vec", lhs: self.dtype(), rhs: T::DTYPE });
        }
        let host = self.storage().to_cpu(self.layout())?;
        Ok(T::slice(&host).map(|s| s.to_vec()).unwrap_or_default())
    }

    /// The elements in row-major order on the host, as f64 whatever the dtype.
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        let host = self.storage().to_cpu(self.layout())?;
        Ok(host.to_f64_vec(&Layout::contiguous(&[host.len()])))
    }

    /// Overwrites this tensor's elements in place with `values` (row-major, converted to the dtype), keeping
    /// its storage and so its address: new inputs for a step captured in a CUDA graph, which reads them from
    /// there. On CUDA the copy is enqueued on the device's stream (through pinned staging; no wait). The
    /// tensor must be contiguous; not recorded on the tape.
    pub fn write_f64(&self, values: &[f64]) -> Result<()> {
        if values.len() != self.numel() {
            return Err(Error::invalid(
                "write_f64",
                format!("{} values for {} elements", values.len(), self.numel()),
                self.shape(),
            ));
        }
        if !self.is_contiguous() {
            return Err(Error::invalid("write_f64", "the tensor must be contiguous", self.shape()));
        }
        let offset = self.layout().offset();
        let host = CpuStorage::from_f64(values, self.dtype());
        let mut storage = self.storage_mut();
        if offset + values.len() > storage.len() {
            return Err(Error::invalid("write_f64", "the view exceeds its storage", self.shape()));
        }
        match (&mut *storage, &host) {
            (Storage::Cpu(CpuStorage::F32(d)), CpuStorage::F32(v)) => d[offset..offset + v.len()].copy_from_slice(v),
            (Storage::Cpu(CpuStorage::F64(d)), CpuStorage::F64(v)) => d[offset..offset + v.len()].copy_from_slice(v),
            (Storage::Cuda(c), host) => c.write_from_cpu(offset, host)?,
            (Storage::Cpu(_), _) => {
                return Err(Error::invalid("write_f64", "internal: storage and tensor dtypes differ", self.shape()))
            }
        }
        Ok(())
    }

    /// The value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::invalid("to_scalar", "expected exactly one element", self.shape()));
        }
        Ok(self.to_vec_f64()?[0])
    }

    /// Backpropagates from a one-element tensor (cotangent 1).
    pub fn backward(&self) -> Result<()> {
        if self.numel() != 1 {
            return Err(Error::NotScalar { shape: self.shape().to_vec() });
        }
        let seed = self.ones_like()?;
        autograd::backward(self, seed, false)
    }

    /// Backpropagates the cotangent `grad` (same shape as `self`).
    pub fn backward_with(&self, grad: &Tensor) -> Result<()> {
        autograd::backward(self, grad.detach(), false)
    }

    /// Like [`Tensor::backward_with`] but keeps the graph (and its saved tensors) for another backward.
    pub fn backward_retain(&self, grad: &Tensor) -> Result<()> {
        autograd::backward(self, grad.detach(), true)
    }

    /// `self + other` for same-shape tensors, untracked: the tape's gradient accumulation.
    pub fn accumulate(&self, other: &Tensor) -> Result<Tensor> {
        if self.shape() != other.shape() {
            return Err(Error::ShapeMismatch {
                op: "accumulate_grad",
                lhs: self.shape().to_vec(),
                rhs: other.shape().to_vec(),
            });
        }
        let s = self.storage().add_same_shape(self.layout(), &other.storage(), other.layout())?;
        Tensor::from_storage(s, self.shape())
    }
}
