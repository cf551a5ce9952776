//! CUDA optimizer updates (optim.cu): one grid-stride kernel per rule, updating the parameter and its state
//! in place, and the multi-tensor forms, one launch over a table of up to about a hundred tensors. The
//! callers hold the write locks of every tensor written, so the kernels write through the buffers' shared
//! slices (cudarc does not tell reads from writes once event tracking is off).

use std::collections::HashMap;
use std::sync::{RwLockReadGuard, RwLockWriteGuard};

use engine::cuda::{CudaDevice, CudaStorage, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use engine::{DType, Error, Float, Layout, Result, Storage, Tensor};

use super::{AdamWStep, AdamWTensors, SgdStep, SgdTensors};
use crate::cuda::{elements, function, launch, Module};

pub(crate) const MODULE: Module = Module { name: "ops_optim", body: include_str!("optim.cu") };

/// `struct SgdParams` of optim.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct SgdParams {
    lr: f64,
    momentum: f64,
    one_minus_dampening: f64,
    weight_decay: f64,
    use_momentum: i32,
    nesterov: i32,
    first: i32,
    /// Explicit padding to a multiple of 8 bytes, so that no byte handed to the driver is uninitialised.
    pad: i32,
}

/// `struct AdamWParams` of optim.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct AdamWParams {
    step_size: f64,
    decay: f64,
    beta1: f64,
    one_minus_beta1: f64,
    beta2: f64,
    one_minus_beta2: f64,
    bc2_sqrt: f64,
    eps: f64,
    amsgrad: i32,
    pad: i32,
}

// The .cu side checks the same sizes with static_asserts.
const _: () = assert!(std::mem::size_of::<SgdParams>() == 48);
const _: () = assert!(std::mem::size_of::<AdamWParams>() == 72);

// SAFETY: plain f64 and i32 fields in C layout with explicit padding, the layouts of the structs in optim.cu.
unsafe impl DeviceRepr for SgdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamWParams {}

impl SgdParams {
    fn new(h: SgdStep) -> Self {
        SgdParams {
            lr: h.lr,
            momentum: h.momentum,
            one_minus_dampening: 1.0 - h.dampening,
            weight_decay: h.weight_decay,
            use_momentum: (h.momentum != 0.0) as i32,
            nesterov: h.nesterov as i32,
            first: h.first as i32,
            pad: 0,
        }
    }
}

impl AdamWParams {
    /// `amsgrad`: a vmax buffer is updated.
    fn new(h: AdamWStep, amsgrad: bool) -> Self {
        // The bias corrections as the CPU computes them, in f64.
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
        AdamWParams {
            step_size: h.lr / bc1,
            decay: 1.0 - h.lr * h.weight_decay,
            beta1: h.beta1,
            one_minus_beta1: 1.0 - h.beta1,
            beta2: h.beta2,
            one_minus_beta2: 1.0 - h.beta2,
            bc2_sqrt,
            eps: h.eps,
            amsgrad: amsgrad as i32,
            pad: 0,
        }
    }
}

type Mut<'a> = (&'a mut CudaStorage, &'a Layout);
type Ref<'a> = (&'a CudaStorage, &'a Layout);

/// One SGD step in place on p and buf (`buf` untouched when momentum is 0).
pub(super) fn sgd(p: Mut, g: Ref, buf: Mut, h: SgdStep) -> Result<()> {
    fn run<T: Float>(p: Mut, g: Ref, buf: Mut, h: SgdStep) -> Result<()> {
        const OP: &str = "sgd_step";
        let n = p.1.numel();
        if n == 0 {
            return Ok(());
        }
        let dev = p.0.device().clone();
        let params = SgdParams::new(h);
        let (pv, gv, bv) =
            (elements::<T>(OP, (&*p.0, p.1))?, elements::<T>(OP, (g.0, g.1))?, elements::<T>(OP, (&*buf.0, buf.1))?);
        let f = function::<T>(&dev, &MODULE, "sgd_step")?;
        let n64 = n as i64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(&pv).arg(&gv).arg(&bv).arg(&n64).arg(&params);
        // SAFETY: sgd_step_<T>(T* p, const T* g, T* buf, long long n, SgdParams h) reads and writes
        // p[0..n), buf[0..n) and reads g[0..n); each view holds the n elements of its tensor (same shape,
        // checked by the caller), and the caller's write locks keep anything else from touching p and buf.
        unsafe { launch(OP, &dev, args, n) }
    }
    crate::util::same_cuda_dtypes("sgd_step", &[p.0, g.0, buf.0])?;
    match g.0.dtype() {
        DType::F32 => run::<f32>(p, g, buf, h),
        DType::F64 => run::<f64>(p, g, buf, h),
    }
}

/// One AdamW step in place on p, m, v and, with amsgrad, vmax.
pub(super) fn adamw(p: Mut, g: Ref, m: Mut, v: Mut, vmax: Option<Mut>, h: AdamWStep) -> Result<()> {
    fn run<T: Float>(p: Mut, g: Ref, m: Mut, v: Mut, vmax: Option<Mut>, h: AdamWStep) -> Result<()> {
        const OP: &str = "adamw_step";
        let n = p.1.numel();
        if n == 0 {
            return Ok(());
        }
        let dev = p.0.device().clone();
        let params = AdamWParams::new(h, vmax.is_some());
        let (pv, gv) = (elements::<T>(OP, (&*p.0, p.1))?, elements::<T>(OP, (g.0, g.1))?);
        let (mv, vv) = (elements::<T>(OP, (&*m.0, m.1))?, elements::<T>(OP, (&*v.0, v.1))?);
        // Without amsgrad the kernel never reads vmax: v stands in for the pointer.
        let xv = match &vmax {
            Some(x) => elements::<T>(OP, (&*x.0, x.1))?,
            None => elements::<T>(OP, (&*v.0, v.1))?,
        };
        let f = function::<T>(&dev, &MODULE, "adamw_step")?;
        let n64 = n as i64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(&pv).arg(&gv).arg(&mv).arg(&vv).arg(&xv).arg(&n64).arg(&params);
        // SAFETY: adamw_step_<T>(T* p, const T* g, T* m, T* v, T* vmax, long long n, AdamWParams h) reads
        // and writes elements 0..n of p, m, v and (only when h.amsgrad, i.e. a vmax was given) vmax, and
        // reads g[0..n); each view holds the n elements of its tensor (same shape, checked by the caller),
        // and the caller's write locks keep anything else from touching the buffers written.
        unsafe { launch(OP, &dev, args, n) }
    }
    let mut all = vec![&*p.0, g.0, &*m.0, &*v.0];
    if let Some(x) = &vmax {
        all.push(&*x.0);
    }
    crate::util::same_cuda_dtypes("adamw_step", &all)?;
    match g.0.dtype() {
        DType::F32 => run::<f32>(p, g, m, v, vmax, h),
        DType::F64 => run::<f64>(p, g, m, v, vmax, h),
    }
}

/// x *= factor in place.
pub(super) fn scale(x: &mut CudaStorage, layout: &Layout, factor: f64) -> Result<()> {
    fn run<T: Float>(x: &mut CudaStorage, layout: &Layout, factor: f64) -> Result<()> {
        const OP: &str = "scale_";
        let n = layout.numel();
        if n == 0 {
            return Ok(());
        }
        let dev = x.device().clone();
        let xv = elements::<T>(OP, (&*x, layout))?;
        let f = function::<T>(&dev, &MODULE, "scale")?;
        let n64 = n as i64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(&xv).arg(&n64).arg(&factor);
        // SAFETY: scale_<T>(T* x, long long n, double factor) reads and writes x[0..n), which the view holds;
        // the caller's write lock keeps anything else from touching it.
        unsafe { launch(OP, &dev, args, n) }
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x, layout, factor),
        DType::F64 => run::<f64>(x, layout, factor),
    }
}

// ---- Multi-tensor updates ------------------------------------------------------------------------------

/// Hyperparameter sets per table (`MT_SETS` in optim.cu).
const SETS: usize = 4;
/// Elements per chunk (`MT_CHUNK`).
pub(super) const CHUNK: usize = 4096;
/// The longest table entry: a longer tensor takes several (whole chunks each, and a length a u32 holds).
pub(super) const SEGMENT: usize = 1 << 31;

/// `struct MultiTable<P, DEPTH, N>` of optim.cu, field for field: D operand addresses per tensor, for up to
/// N tensors. N % 8 == 4, so that `count` and `set` end the struct on an 8-byte boundary with no padding.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct MultiTable<P, const D: usize, const N: usize> {
    pub(super) sets: [P; SETS],
    pub(super) ptr: [[u64; N]; D],
    pub(super) len: [u32; N],
    pub(super) chunk_end: [u32; N],
    pub(super) count: i32,
    pub(super) set: [u8; N],
}

type SgdTable = MultiTable<SgdParams, 3, 116>;
type AdamWTable = MultiTable<AdamWParams, 4, 92>;
type AdamWMaxTable = MultiTable<AdamWParams, 5, 76>;
/// One tensor per entry and a double per set: the factor of `scale_multi`, unused by `sum_squares_multi`.
type ScalarTable = MultiTable<f64, 1, 236>;

// At most 4 KiB, the kernel-parameter limit of every CUDA version; the .cu side checks the same sizes.
const _: () = assert!(std::mem::size_of::<SgdTable>() == 4024);
const _: () = assert!(std::mem::size_of::<AdamWTable>() == 4064);
const _: () = assert!(std::mem::size_of::<AdamWMaxTable>() == 4016);
const _: () = assert!(std::mem::size_of::<ScalarTable>() == 4048);

/// Threads per block of the multi-tensor kernels (`MT_THREADS`).
const THREADS: u32 = 256;

// SAFETY: u64, u32, i32 and u8 arrays and params structs that are DeviceRepr themselves, in C layout with no
// padding (the sizes above), the layout of `MultiTable` in optim.cu.
unsafe impl<P: DeviceRepr, const D: usize, const N: usize> DeviceRepr for MultiTable<P, D, N> {}

/// Tables filled with tensors in order, a new one when the last is full (N entries, or SETS hyperparameter
/// sets and a new one needed).
pub(super) struct Tables<P, const D: usize, const N: usize> {
    /// Full tables and their chunk counts.
    done: Vec<(MultiTable<P, D, N>, u32)>,
    table: MultiTable<P, D, N>,
    sets: usize,
    chunks: u32,
    elem_bytes: usize,
}

impl<P: Copy + Default + PartialEq, const D: usize, const N: usize> Tables<P, D, N> {
    pub(super) fn new(elem_bytes: usize) -> Self {
        let table = MultiTable {
            sets: [P::default(); SETS],
            ptr: [[0; N]; D],
            len: [0; N],
            chunk_end: [0; N],
            count: 0,
            set: [0; N],
        };
        Tables { done: Vec::new(), table, sets: 0, chunks: 0, elem_bytes }
    }

    /// Adds a tensor of `n` > 0 elements whose operands start at `addrs`, to be updated with `params`.
    pub(super) fn push(&mut self, addrs: [u64; D], n: usize, params: P) {
        for start in (0..n).step_by(SEGMENT) {
            let len = SEGMENT.min(n - start);
            let mut set = self.table.sets[..self.sets].iter().position(|s| *s == params);
            if self.table.count as usize == N || (set.is_none() && self.sets == SETS) {
                self.close();
                set = None;
            }
            let set = set.unwrap_or_else(|| {
                self.table.sets[self.sets] = params;
                self.sets += 1;
                self.sets - 1
            });
            let i = self.table.count as usize;
            for (k, &a) in addrs.iter().enumerate() {
                self.table.ptr[k][i] = a + (start * self.elem_bytes) as u64;
            }
            // Both fit: len <= 2^31, and a table's chunks <= N * 2^31 / CHUNK < 2^32.
            self.table.len[i] = len as u32;
            self.chunks += len.div_ceil(CHUNK) as u32;
            self.table.chunk_end[i] = self.chunks;
            self.table.set[i] = set as u8;
            self.table.count += 1;
        }
    }

    /// Moves the current table, if it holds anything, to the full ones and starts an empty one (the old
    /// entries past `count` stay, initialised and never read).
    fn close(&mut self) {
        if self.table.count > 0 {
            self.done.push((self.table, self.chunks));
        }
        self.table.count = 0;
        self.sets = 0;
        self.chunks = 0;
    }

    /// Every table with its chunk count.
    pub(super) fn finish(mut self) -> Vec<(MultiTable<P, D, N>, u32)> {
        self.close();
        self.done
    }
}

/// A launch over `chunks` chunks: one block of [`THREADS`] per chunk, up to the device's grid-stride cap.
fn chunk_grid(dev: &CudaDevice, chunks: u32) -> LaunchConfig {
    let blocks = dev.launch_config(chunks as usize * THREADS as usize).grid_dim.0;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Launches `kernel` (an update kernel of optim.cu, `<kernel>_<T>(MultiTable t)`) once per table.
///
/// # Safety
/// For each entry of each table, the D addresses must be the first elements of `len` elements of the
/// entry's operands, in buffers of the kernel's dtype that stay alive (locked, written ones for writing) until
/// the launches are enqueued, and no written range may overlap another operand's.
unsafe fn launch_tables<T: Float, P: DeviceRepr, const D: usize, const N: usize>(
    op: &'static str,
    dev: &CudaDevice,
    kernel: &str,
    tables: &[(MultiTable<P, D, N>, u32)],
) -> Result<()> {
    let f = function::<T>(dev, &MODULE, kernel)?;
    for (table, chunks) in tables {
        let mut args = dev.stream().launch_builder(&f);
        args.arg(table);
        // SAFETY: the kernel takes the table by value (copied at launch) and, for each of its `count` entries,
        // reads and writes elements 0..len[i] at the addresses ptr[k][i] (the parameter and state written, the
        // gradient only read); the caller vouches for those ranges.
        unsafe { args.launch(chunk_grid(dev, *chunks)) }.map_err(|e| Error::Cuda { op, msg: format!("{e:?}") })?;
    }
    Ok(())
}

/// A storage lock held for reading or writing.
enum Guard<'a> {
    Read(RwLockReadGuard<'a, Storage>),
    Write(RwLockWriteGuard<'a, Storage>),
}

impl Guard<'_> {
    fn storage(&self) -> &Storage {
        match self {
            Guard::Read(g) => g,
            Guard::Write(g) => g,
        }
    }
}

/// The device addresses of `operands` (tensor, written) as `T`, found while holding each storage's lock
/// once (a write lock where any operand on it is written), and `f` run on them under those locks; `None`
/// without running `f` when a written operand overlaps another operand in memory (a launch would race).
/// Empty operands get address 0.
fn with_addresses<T: Float, R>(
    op: &'static str,
    dev: &CudaDevice,
    operands: &[(&Tensor, bool)],
    f: impl FnOnce(&[u64]) -> Result<R>,
) -> Result<Option<R>> {
    // One lock per storage, in first-seen order.
    let mut written: HashMap<usize, bool> = HashMap::new();
    let mut order = Vec::new();
    for &(t, w) in operands {
        let e = written.entry(t.storage_key()).or_insert_with(|| {
            order.push(t);
            false
        });
        *e |= w;
    }
    let mut guards = HashMap::with_capacity(order.len());
    for t in order {
        let g = if written[&t.storage_key()] { Guard::Write(t.storage_mut()) } else { Guard::Read(t.storage()) };
        guards.insert(t.storage_key(), g);
    }
    let mut addrs = Vec::with_capacity(operands.len());
    // (first byte, end, written) of every non-empty operand.
    let mut spans = Vec::with_capacity(operands.len());
    for &(t, w) in operands {
        let Storage::Cuda(s) = guards[&t.storage_key()].storage() else {
            return Err(Error::DeviceMismatch { op, lhs: engine::Device::Cuda(dev.ordinal()), rhs: t.device() });
        };
        if s.ordinal() != dev.ordinal() || s.dtype() != T::DTYPE {
            return Err(Error::invalid(op, "internal: a multi-tensor launch mixes devices or dtypes", t.shape()));
        }
        if t.numel() == 0 {
            addrs.push(0);
            continue;
        }
        let a = elements::<T>(op, (s, t.layout()))?.device_ptr(dev.stream()).0;
        addrs.push(a);
        spans.push((a, a + (t.numel() * std::mem::size_of::<T>()) as u64, w));
    }
    // A span overlaps an earlier-starting one exactly when it starts before that one's end.
    spans.sort_unstable_by_key(|s| s.0);
    let (mut end_any, mut end_written) = (0, 0);
    for (start, end, w) in spans {
        if start < end_written || (w && start < end_any) {
            return Ok(None);
        }
        end_any = end_any.max(end);
        if w {
            end_written = end_written.max(end);
        }
    }
    f(&addrs).map(Some)
}

/// [`sgd`] on every item (one device and dtype, checked by the caller) in as few launches as the tables
/// allow; false, with nothing done, when written operands overlap.
pub(super) fn sgd_multi(items: &[SgdTensors]) -> Result<bool> {
    fn run<T: Float>(dev: &CudaDevice, items: &[SgdTensors]) -> Result<bool> {
        const OP: &str = "sgd_step";
        let operands: Vec<(&Tensor, bool)> =
            items.iter().flat_map(|it| [(it.p, true), (it.grad, false), (it.buf, true)]).collect();
        let done = with_addresses::<T, ()>(OP, dev, &operands, |addrs| {
            let mut tables = Tables::<SgdParams, 3, 116>::new(std::mem::size_of::<T>());
            for (it, a) in items.iter().zip(addrs.chunks_exact(3)) {
                if it.p.numel() > 0 {
                    tables.push([a[0], a[1], a[2]], it.p.numel(), SgdParams::new(it.h));
                }
            }
            // SAFETY: the addresses are those of the items' checked contiguous views, with_addresses holds their
            // locks and found no overlap; p and buf are written, g read, as sgd_multi does.
            unsafe { launch_tables::<T, _, 3, 116>(OP, dev, "sgd_multi", &tables.finish()) }
        })?;
        Ok(done.is_some())
    }
    let Some(first) = items.first() else { return Ok(true) };
    let dev = cuda_device(first.p)?;
    match first.p.dtype() {
        DType::F32 => run::<f32>(&dev, items),
        DType::F64 => run::<f64>(&dev, items),
    }
}

/// [`adamw`] on every item (one device and dtype, and all with a vmax or none, checked by the caller) in as
/// few launches as the tables allow; false, with nothing done, when written operands overlap.
pub(super) fn adamw_multi(items: &[AdamWTensors]) -> Result<bool> {
    fn run<T: Float>(dev: &CudaDevice, items: &[AdamWTensors], amsgrad: bool) -> Result<bool> {
        const OP: &str = "adamw_step";
        let operands = adamw_operands(items);
        let done = with_addresses::<T, ()>(OP, dev, &operands, |a| {
            // (item, its operands' addresses) of the non-empty items.
            let width = if amsgrad { 5 } else { 4 };
            let live = items.iter().zip(a.chunks_exact(width)).filter(|(it, _)| it.p.numel() > 0);
            let params = |it: &AdamWTensors| AdamWParams::new(it.h, amsgrad);
            if amsgrad {
                let mut tables = Tables::<AdamWParams, 5, 76>::new(std::mem::size_of::<T>());
                for (it, a) in live {
                    tables.push([a[0], a[1], a[2], a[3], a[4]], it.p.numel(), params(it));
                }
                // SAFETY: as in sgd_multi; p, m, v and vmax are written, g read.
                unsafe { launch_tables::<T, _, 5, 76>(OP, dev, "adamw_multi_max", &tables.finish()) }
            } else {
                let mut tables = Tables::<AdamWParams, 4, 92>::new(std::mem::size_of::<T>());
                for (it, a) in live {
                    tables.push([a[0], a[1], a[2], a[3]], it.p.numel(), params(it));
                }
                // SAFETY: as in sgd_multi; p, m and v are written, g read.
                unsafe { launch_tables::<T, _, 4, 92>(OP, dev, "adamw_multi", &tables.finish()) }
            }
        })?;
        Ok(done.is_some())
    }
    let Some((dev, dtype, amsgrad)) = adamw_launch(items)? else { return Ok(true) };
    match dtype {
        DType::F32 => run::<f32>(&dev, items, amsgrad),
        DType::F64 => run::<f64>(&dev, items, amsgrad),
    }
}

/// Every item's operands in table order (p, g, m, v, and vmax with amsgrad), each with whether it is written.
fn adamw_operands<'a>(items: &[AdamWTensors<'a>]) -> Vec<(&'a Tensor, bool)> {
    let mut operands = Vec::with_capacity(items.len() * 5);
    for it in items {
        operands.extend([(it.p, true), (it.grad, false), (it.m, true), (it.v, true)]);
        if let Some(x) = it.vmax {
            operands.push((x, true));
        }
    }
    operands
}

/// The device, dtype and amsgrad flag of one multi-tensor AdamW launch (its first item's); None for no items.
/// A launch mixing amsgrad and plain items is refused (the grouping never makes one).
fn adamw_launch(items: &[AdamWTensors]) -> Result<Option<(std::sync::Arc<CudaDevice>, DType, bool)>> {
    let Some(first) = items.first() else { return Ok(None) };
    let amsgrad = first.vmax.is_some();
    if items.iter().any(|it| it.vmax.is_some() != amsgrad) {
        return Err(Error::invalid("adamw_step", "internal: a multi-tensor launch mixes amsgrad", first.p.shape()));
    }
    Ok(Some((cuda_device(first.p)?, first.p.dtype(), amsgrad)))
}

impl AdamWParams {
    /// The doubles the `_hyper` kernels read per tensor, in `struct AdamWParams` order (amsgrad is the kernel's).
    pub(super) fn hyper(self) -> [f64; 8] {
        [
            self.step_size,
            self.decay,
            self.beta1,
            self.one_minus_beta1,
            self.beta2,
            self.one_minus_beta2,
            self.bc2_sqrt,
            self.eps,
        ]
    }
}

/// The doubles of one AdamW step as the `_hyper` kernels read them: the very values the host puts in the
/// tables of [`adamw_multi`].
pub(super) fn adamw_hyper(h: AdamWStep) -> [f64; 8] {
    AdamWParams::new(h, h.amsgrad).hyper()
}

/// Tables for the `_hyper` kernels: entries as [`Tables`] makes them, but each entry's `set` is its item's
/// index counted from the table's first item (a u8), and the table's first item comes with it, so that the
/// launch passes the hyperparameter buffer advanced to that item. A table closes when it is full or an item
/// index would not fit the u8 (items without elements take no entry but keep their index).
pub(super) fn hyper_tables<const D: usize, const N: usize>(
    entries: impl Iterator<Item = (usize, [u64; D], usize)>,
    elem_bytes: usize,
) -> Vec<(MultiTable<AdamWParams, D, N>, u32, usize)> {
    let empty = || MultiTable {
        sets: [AdamWParams::default(); SETS],
        ptr: [[0; N]; D],
        len: [0; N],
        chunk_end: [0; N],
        count: 0,
        set: [0; N],
    };
    let mut done = Vec::new();
    let mut cur: Option<(MultiTable<AdamWParams, D, N>, u32, usize)> = None;
    for (item, addrs, n) in entries {
        for start in (0..n).step_by(SEGMENT) {
            let len = SEGMENT.min(n - start);
            if cur.as_ref().is_some_and(|(t, _, first)| t.count as usize == N || item - first > u8::MAX as usize) {
                done.extend(cur.take());
            }
            let (t, chunks, first) = cur.get_or_insert_with(|| (empty(), 0, item));
            let i = t.count as usize;
            for (k, &a) in addrs.iter().enumerate() {
                t.ptr[k][i] = a + (start * elem_bytes) as u64;
            }
            t.len[i] = len as u32;
            *chunks += len.div_ceil(CHUNK) as u32;
            t.chunk_end[i] = *chunks;
            t.set[i] = (item - *first) as u8;
            t.count += 1;
        }
    }
    done.extend(cur);
    done
}

/// [`adamw_multi`] with each item's hyperparameters read from `hyper` (8 doubles per item, in item order, a
/// contiguous f64 tensor on the items' device: checked by the caller) when the kernels run. False, with
/// nothing done, when written operands overlap.
pub(super) fn adamw_multi_hyper(items: &[AdamWTensors], hyper: &Tensor) -> Result<bool> {
    fn run<T: Float>(dev: &CudaDevice, items: &[AdamWTensors], hyper: &Tensor, amsgrad: bool) -> Result<bool> {
        const OP: &str = "adamw_step_hyper";
        let operands = adamw_operands(items);
        // The hyperparameters are read only; the caller made sure they share no storage with an operand.
        let hyper_storage = hyper.storage();
        let Storage::Cuda(hs) = &*hyper_storage else {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: engine::Device::Cuda(dev.ordinal()),
                rhs: hyper.device(),
            });
        };
        let hv = elements::<f64>(OP, (hs, hyper.layout()))?;
        let done = with_addresses::<T, ()>(OP, dev, &operands, |a| {
            let width = if amsgrad { 5 } else { 4 };
            let live = items.iter().zip(a.chunks_exact(width)).enumerate().filter(|(_, (it, _))| it.p.numel() > 0);
            let elem = std::mem::size_of::<T>();
            if amsgrad {
                let entries = live.map(|(i, (it, a))| (i, [a[0], a[1], a[2], a[3], a[4]], it.p.numel()));
                let tables = hyper_tables::<5, 76>(entries, elem);
                // SAFETY: as in adamw_multi; the kernel also reads 8 doubles per item of the table from the
                // hyper view advanced to the table's first item, all inside the checked 8 * items view.
                unsafe { launch_hyper_tables::<T, 5, 76>(OP, dev, "adamw_multi_max_hyper", &tables, &hv) }
            } else {
                let entries = live.map(|(i, (it, a))| (i, [a[0], a[1], a[2], a[3]], it.p.numel()));
                let tables = hyper_tables::<4, 92>(entries, elem);
                // SAFETY: as above.
                unsafe { launch_hyper_tables::<T, 4, 92>(OP, dev, "adamw_multi_hyper", &tables, &hv) }
            }
        })?;
        Ok(done.is_some())
    }
    let Some((dev, dtype, amsgrad)) = adamw_launch(items)? else { return Ok(true) };
    match dtype {
        DType::F32 => run::<f32>(&dev, items, hyper, amsgrad),
        DType::F64 => run::<f64>(&dev, items, hyper, amsgrad),
    }
}

/// Launches `kernel(table, hyper + 8 * first)` once per table of [`hyper_tables`].
///
/// # Safety
/// As [`launch_tables`]; and `hyper` holds 8 doubles for every item index the tables name.
unsafe fn launch_hyper_tables<T: Float, const D: usize, const N: usize>(
    op: &'static str,
    dev: &CudaDevice,
    kernel: &str,
    tables: &[(MultiTable<AdamWParams, D, N>, u32, usize)],
    hyper: &engine::cuda::CudaView<'_, f64>,
) -> Result<()> {
    let f = function::<T>(dev, &MODULE, kernel)?;
    for (table, chunks, first) in tables {
        let last = (0..table.count as usize).map(|i| table.set[i] as usize).max().unwrap_or(0);
        let end = (first + last + 1) * 8;
        let h = hyper.try_slice(first * 8..end).ok_or_else(|| {
            Error::invalid(op, format!("the hyperparameters hold {} values, {end} needed", hyper.len()), &[])
        })?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(table).arg(&h);
        // SAFETY: the table by value as in launch_tables; `h` covers the 8 doubles of every item the table
        // names (checked just above), read only.
        unsafe { args.launch(chunk_grid(dev, *chunks)) }.map_err(|e| Error::Cuda { op, msg: format!("{e:?}") })?;
    }
    Ok(())
}

/// x *= factor on every tensor of `xs` (one device and dtype, checked by the caller), one launch per table;
/// false, with nothing done, when two of them overlap.
pub(super) fn scale_multi(xs: &[&Tensor], factor: f64) -> Result<bool> {
    fn run<T: Float>(dev: &CudaDevice, xs: &[&Tensor], factor: f64) -> Result<bool> {
        const OP: &str = "scale_";
        let operands: Vec<(&Tensor, bool)> = xs.iter().map(|&x| (x, true)).collect();
        let done = with_addresses::<T, ()>(OP, dev, &operands, |addrs| {
            let mut tables = Tables::<f64, 1, 236>::new(std::mem::size_of::<T>());
            for (x, &a) in xs.iter().zip(addrs).filter(|(x, _)| x.numel() > 0) {
                tables.push([a], x.numel(), factor);
            }
            // SAFETY: as in sgd_multi; x is written.
            unsafe { launch_tables::<T, _, 1, 236>(OP, dev, "scale_multi", &tables.finish()) }
        })?;
        Ok(done.is_some())
    }
    let Some(first) = xs.first() else { return Ok(true) };
    let dev = cuda_device(first)?;
    match first.dtype() {
        DType::F32 => run::<f32>(&dev, xs, factor),
        DType::F64 => run::<f64>(&dev, xs, factor),
    }
}

/// The sum of squares of every element of `xs` (one device and dtype, contiguous, checked by the caller), in
/// f64: one launch per table writing per-block partials, one reduction of the partials, one read.
pub(super) fn sum_squares_multi(xs: &[&Tensor]) -> Result<f64> {
    fn run<T: Float>(dev: &std::sync::Arc<CudaDevice>, xs: &[&Tensor]) -> Result<f64> {
        const OP: &str = "sum_squares";
        let operands: Vec<(&Tensor, bool)> = xs.iter().map(|&x| (x, false)).collect();
        let partials = with_addresses::<T, _>(OP, dev, &operands, |addrs| {
            let mut tables = Tables::<f64, 1, 236>::new(std::mem::size_of::<T>());
            for (x, &a) in xs.iter().zip(addrs).filter(|(x, _)| x.numel() > 0) {
                tables.push([a], x.numel(), 0.0);
            }
            let tables = tables.finish();
            let grids: Vec<LaunchConfig> = tables.iter().map(|&(_, chunks)| chunk_grid(dev, chunks)).collect();
            let total: usize = grids.iter().map(|g| g.grid_dim.0 as usize).sum();
            if total == 0 {
                return Ok(None);
            }
            let out = dev.alloc::<f64>(total)?;
            let f = function::<T>(dev, &MODULE, "sum_squares_multi")?;
            let mut at = 0;
            for ((table, _), cfg) in tables.iter().zip(grids) {
                let blocks = cfg.grid_dim.0 as usize;
                let slots = out.as_slice().slice(at..at + blocks);
                let mut args = dev.stream().launch_builder(&f);
                args.arg(table).arg(&slots);
                // SAFETY: sum_squares_multi_<T>(ScalarTable t, double* partials) reads elements 0..len[i] at
                // ptr[0][i], the first elements of the tensors' checked contiguous views (read-locked by
                // with_addresses), and writes partials[0..gridDim.x), the `blocks` slots of this launch.
                unsafe { args.launch(cfg) }.map_err(|e| Error::Cuda { op: OP, msg: format!("{e:?}") })?;
                at += blocks;
            }
            let storage = Storage::Cuda(CudaStorage::from_slice(dev, out)?);
            Ok(Some(Tensor::from_storage(storage, &[total])?))
        })?;
        // Every operand is read only: with_addresses never refuses.
        match partials.flatten() {
            Some(p) => crate::reduce::sum_all(&p)?.to_scalar(),
            None => Ok(0.0),
        }
    }
    let Some(first) = xs.first() else { return Ok(0.0) };
    let dev = cuda_device(first)?;
    match first.dtype() {
        DType::F32 => run::<f32>(&dev, xs),
        DType::F64 => run::<f64>(&dev, xs),
    }
}

/// The CUDA device of `t`.
fn cuda_device(t: &Tensor) -> Result<std::sync::Arc<CudaDevice>> {
    match t.device() {
        engine::Device::Cuda(i) => engine::cuda::device(i),
        other => Err(Error::DeviceMismatch { op: "optimizer step", lhs: engine::Device::Cuda(0), rhs: other }),
    }
}
