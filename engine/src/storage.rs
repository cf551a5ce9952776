//! Storage: the flat buffer behind one or more tensors (views share it). CPU storage is a `Vec` per dtype;
//! CUDA storage is a pooled device buffer (see [`crate::cuda`]).
//!
//! The few storage-level routines here (strided copy, same-shape add, fill, dtype cast, device transfer) are
//! what the engine itself needs: `contiguous`, gradient accumulation and reading values back. Everything else
//! is an op in the `ops` crate.

use crate::cuda::CudaStorage;
use crate::{DType, Device, Error, Float, Layout, Result};

/// A cache of large freed CPU buffers, reused by exact length and dtype.
///
/// A fresh multi-megabyte `Vec` costs a page fault per 4 KiB page on first touch (the allocator maps new
/// memory for it and the kernel zeroes every page), which for a 64 MiB elementwise output is more time than
/// the arithmetic. Training and benchmarks make the same shapes over and over, so keeping freed buffers and
/// handing them back skips that cost, as PyTorch's caching allocators do on the GPU.
pub mod pool {
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Buffers smaller than this go back to the system allocator, which recycles small blocks well itself.
    /// From a few pages up it does not: glibc maps fresh zeroed pages for them or trims them away, so a
    /// training step's activations and gradients (64 KiB to a few MiB for the small MLLA) are kept here.
    pub const MIN_BYTES: usize = 1 << 16;
    /// The cache never holds more than this; beyond it freed buffers are released.
    pub const MAX_CACHED_BYTES: usize = 1 << 30;

    pub(crate) struct Pool<T> {
        free: HashMap<usize, Vec<Vec<T>>>,
        bytes: usize,
    }

    pub(crate) fn take<T>(pool: &Mutex<Option<Pool<T>>>, n: usize) -> Option<Vec<T>> {
        if n * size_of::<T>() < MIN_BYTES {
            return None;
        }
        let mut guard = pool.lock().unwrap_or_else(|e| e.into_inner());
        let p = guard.as_mut()?;
        let v = p.free.get_mut(&n)?.pop()?;
        p.bytes -= n * size_of::<T>();
        Some(v)
    }

    pub(crate) fn give<T>(pool: &Mutex<Option<Pool<T>>>, v: Vec<T>) {
        let bytes = v.len() * size_of::<T>();
        if bytes < MIN_BYTES {
            return;
        }
        let mut guard = pool.lock().unwrap_or_else(|e| e.into_inner());
        let p = guard.get_or_insert_with(|| Pool { free: HashMap::new(), bytes: 0 });
        if p.bytes + bytes > MAX_CACHED_BYTES {
            return; // dropped here, outside the cache
        }
        p.bytes += bytes;
        p.free.entry(v.len()).or_default().push(v);
    }
}

/// Live bytes of CPU tensor storage and their high-water mark, the CPU's counterpart of the CUDA allocator's
/// [`crate::cuda::MemoryStats`] (`in_use_bytes`, `peak_bytes`, `reset_peak`).
///
/// A buffer counts from the moment a tensor takes it (every tensor's storage is made in `Tensor`'s
/// constructors) until the last tensor over it, view or saved copy included, is dropped: what a forward keeps
/// for its backward, the gradients, the parameters. Scratch buffers inside a kernel and the free buffers of the
/// reuse pool are not counted (on CUDA, `in_use_bytes` leaves out the cached blocks likewise). The counters
/// are process-wide atomics, always on; tests running in parallel threads add to them too.
pub mod cpu_memory {
    use std::fmt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static IN_USE: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);

    /// A snapshot of the CPU storage counters.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct CpuMemoryStats {
        /// Bytes of CPU storage owned by live tensors.
        pub in_use_bytes: usize,
        /// The most `in_use_bytes` has been since the process started or [`reset_peak`].
        pub peak_bytes: usize,
    }

    impl fmt::Display for CpuMemoryStats {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            const MIB: f64 = (1 << 20) as f64;
            let (now, peak) = (self.in_use_bytes as f64 / MIB, self.peak_bytes as f64 / MIB);
            write!(f, "CPU tensors in use {now:.1} MiB (peak {peak:.1} MiB)")
        }
    }

    /// The counters now.
    pub fn memory_stats() -> CpuMemoryStats {
        CpuMemoryStats { in_use_bytes: IN_USE.load(Ordering::Relaxed), peak_bytes: PEAK.load(Ordering::Relaxed) }
    }

    /// Restarts the high-water mark from the bytes in use now.
    pub fn reset_peak() {
        PEAK.store(IN_USE.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub(crate) fn acquire(bytes: usize) {
        if bytes > 0 {
            let now = IN_USE.fetch_add(bytes, Ordering::Relaxed) + bytes;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
    }

    pub(crate) fn release(bytes: usize) {
        if bytes > 0 {
            IN_USE.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

static POOL_F32: std::sync::Mutex<Option<pool::Pool<f32>>> = std::sync::Mutex::new(None);
static POOL_F64: std::sync::Mutex<Option<pool::Pool<f64>>> = std::sync::Mutex::new(None);

/// A buffer of `n` elements whose values are unspecified (a reused buffer keeps its old contents; a new
/// one is zeroed): for kernels that write every element.
pub fn cpu_buffer<T: Float>(n: usize) -> Vec<T> {
    T::take_pooled(n).unwrap_or_else(|| vec![T::ZERO; n])
}

/// A buffer of `n` elements all equal to `value`.
pub fn cpu_filled<T: Float>(n: usize, value: T) -> Vec<T> {
    match T::take_pooled(n) {
        Some(mut v) => {
            v.fill(value);
            v
        }
        None => vec![value; n],
    }
}

pub(crate) fn take_f32(n: usize) -> Option<Vec<f32>> {
    pool::take(&POOL_F32, n)
}
pub(crate) fn take_f64(n: usize) -> Option<Vec<f64>> {
    pool::take(&POOL_F64, n)
}

impl Drop for CpuStorage {
    fn drop(&mut self) {
        match self {
            CpuStorage::F32(v) => pool::give(&POOL_F32, std::mem::take(v)),
            CpuStorage::F64(v) => pool::give(&POOL_F64, std::mem::take(v)),
        }
    }
}

#[derive(Debug, Clone)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Calls `$body` with `$v` bound to the typed vector and `$T` to its element type.
#[macro_export]
macro_rules! with_cpu {
    ($s:expr, |$v:ident : $T:ident| $body:expr) => {
        match $s {
            $crate::CpuStorage::F32($v) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::CpuStorage::F64($v) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
        }
    };
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
        }
    }

    pub fn len(&self) -> usize {
        with_cpu!(self, |v: T| v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn zeros(n: usize, dtype: DType) -> Self {
        Self::full(n, 0.0, dtype)
    }

    pub fn full(n: usize, value: f64, dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(cpu_filled(n, value as f32)),
            DType::F64 => CpuStorage::F64(cpu_filled(n, value)),
        }
    }

    pub fn from_f64(v: &[f64], dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(v.iter().map(|&x| x as f32).collect()),
            DType::F64 => CpuStorage::F64(v.to_vec()),
        }
    }

    /// The elements under `layout`, gathered into a new contiguous vector.
    pub fn gather<T: Float>(data: &[T], layout: &Layout) -> Vec<T> {
        if layout.is_contiguous() {
            let o = layout.offset();
            let mut out = cpu_buffer(layout.numel());
            out.copy_from_slice(&data[o..o + layout.numel()]);
            return out;
        }
        let mut out = cpu_buffer(layout.numel());
        let mut i = 0;
        layout.for_each_run(|start, len, stride| {
            if stride == 1 {
                out[i..i + len].copy_from_slice(&data[start..start + len]);
            } else {
                for (k, o) in out[i..i + len].iter_mut().enumerate() {
                    *o = data[start + k * stride];
                }
            }
            i += len;
        });
        out
    }

    pub fn copy_contiguous(&self, layout: &Layout) -> CpuStorage {
        with_cpu!(self, |v: T| T::into_storage(Self::gather(v, layout)))
    }

    pub fn to_f64_vec(&self, layout: &Layout) -> Vec<f64> {
        with_cpu!(self, |v: T| Self::gather(v, layout).into_iter().map(|x| x.to_f64()).collect())
    }

    pub fn cast(&self, layout: &Layout, dtype: DType) -> CpuStorage {
        match (self, dtype) {
            (CpuStorage::F32(v), DType::F64) => {
                CpuStorage::F64(Self::gather(v, layout).into_iter().map(|x| x as f64).collect())
            }
            (CpuStorage::F64(v), DType::F32) => {
                CpuStorage::F32(Self::gather(v, layout).into_iter().map(|x| x as f32).collect())
            }
            _ => self.copy_contiguous(layout),
        }
    }
}

#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            Storage::Cuda(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn full(n: usize, value: f64, dtype: DType, device: Device) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(CpuStorage::full(n, value, dtype))),
            Device::Cuda(i) => Ok(Storage::Cuda(CudaStorage::full(i, n, value, dtype)?)),
        }
    }

    /// Moves CPU data onto `device` (a no-op move for the CPU).
    pub fn from_cpu(cpu: CpuStorage, device: Device) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(cpu)),
            Device::Cuda(i) => Ok(Storage::Cuda(CudaStorage::from_cpu(i, &cpu)?)),
        }
    }

    pub fn as_cpu(&self, op: &'static str) -> Result<&CpuStorage> {
        match self {
            Storage::Cpu(s) => Ok(s),
            Storage::Cuda(s) => Err(Error::Unsupported { op, dtype: s.dtype(), device: Device::Cuda(s.ordinal()) }),
        }
    }

    /// The CUDA storage behind a tensor, for an op's CUDA path (`Unsupported` on the CPU).
    pub fn as_cuda(&self, op: &'static str) -> Result<&CudaStorage> {
        match self {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(s) => Err(Error::Unsupported { op, dtype: s.dtype(), device: Device::Cpu }),
        }
    }

    /// Mutable CUDA storage, for in-place updates (optimizers, under `no_grad`).
    pub fn as_cuda_mut(&mut self, op: &'static str) -> Result<&mut CudaStorage> {
        match self {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(s) => Err(Error::Unsupported { op, dtype: s.dtype(), device: Device::Cpu }),
        }
    }

    /// The elements under `layout` as new contiguous storage on the same device.
    pub fn copy_contiguous(&self, layout: &Layout) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.copy_contiguous(layout))),
            Storage::Cuda(s) => Ok(Storage::Cuda(s.copy_strided(layout)?)),
        }
    }

    /// The elements under `layout` in row-major order, converted to `dtype`, on the same device.
    pub fn cast(&self, layout: &Layout, dtype: DType) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.cast(layout, dtype))),
            Storage::Cuda(s) => Ok(Storage::Cuda(s.cast(layout, dtype)?)),
        }
    }

    /// The elements under `layout`, contiguous, on the host (the one place that waits for the device).
    pub fn to_cpu(&self, layout: &Layout) -> Result<CpuStorage> {
        match self {
            Storage::Cpu(s) => Ok(s.copy_contiguous(layout)),
            Storage::Cuda(s) => s.to_cpu(layout),
        }
    }

    /// `a + b` elementwise for two tensors of the same shape (any strides), as new contiguous storage.
    /// Used by the tape to accumulate gradients.
    pub fn add_same_shape(&self, la: &Layout, other: &Storage, lb: &Layout) -> Result<Storage> {
        match (self, other) {
            (Storage::Cpu(a), Storage::Cpu(b)) => Ok(Storage::Cpu(cpu_add(a, la, b, lb)?)),
            (Storage::Cuda(a), Storage::Cuda(b)) => Ok(Storage::Cuda(a.add_same_shape(la, b, lb)?)),
            (a, b) => Err(Error::DeviceMismatch { op: "accumulate_grad", lhs: a.device(), rhs: b.device() }),
        }
    }
}

fn cpu_add(a: &CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout) -> Result<CpuStorage> {
    fn f<T: Float>(a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Vec<T> {
        let mut out = CpuStorage::gather(a, la);
        let mut i = 0;
        lb.for_each_run(|start, len, stride| {
            for k in 0..len {
                out[i + k] += b[start + k * stride];
            }
            i += len;
        });
        out
    }
    match (a, b) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => Ok(CpuStorage::F32(f(a, la, b, lb))),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => Ok(CpuStorage::F64(f(a, la, b, lb))),
        _ => Err(Error::DTypeMismatch { op: "accumulate_grad", lhs: a.dtype(), rhs: b.dtype() }),
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_memory::{memory_stats, reset_peak};
    use super::*;
    use crate::Tensor;

    #[test]
    fn large_buffers_are_reused_and_filled_buffers_hold_their_value() {
        let n = (4 << 20) / 4; // 4 MiB of f32, above the pool's threshold
        let first = CpuStorage::F32(vec![7.0; n]);
        let ptr = match &first {
            CpuStorage::F32(v) => v.as_ptr(),
            _ => unreachable!(),
        };
        drop(first);
        // Other tests may race for the same size class, so only require reuse when the buffer is there.
        let again: Vec<f32> = cpu_filled(n, 0.0);
        if again.as_ptr() == ptr {
            assert!(again.iter().all(|&v| v == 0.0), "a reused buffer keeps none of its old values when filled");
        }
        assert!(again.iter().all(|&v| v == 0.0));
        // Small buffers are left to the system allocator.
        drop(CpuStorage::F32(vec![1.0; 16]));
        assert!(take_f32(16).is_none());
    }

    /// |a - b| within `slack`: other tests of this binary run in parallel threads and move the counters a
    /// little (they hold kilobytes to a few MiB, far less than the 32 MiB tensors here).
    fn near(a: usize, b: usize, slack: usize) -> bool {
        a.abs_diff(b) <= slack
    }

    #[test]
    fn cpu_memory_counts_tensor_storage_until_its_last_view_is_dropped() -> crate::Result<()> {
        const BYTES: usize = 32 << 20;
        const SLACK: usize = 8 << 20;
        let before = memory_stats().in_use_bytes;
        let a = Tensor::zeros(&[BYTES / 8], DType::F64, Device::Cpu)?;
        let view = a.detach();
        let held = memory_stats();
        assert!(near(held.in_use_bytes, before + BYTES, SLACK), "{held} after one 32 MiB tensor from {before}");
        assert!(held.peak_bytes >= held.in_use_bytes);
        drop(a);
        assert!(near(memory_stats().in_use_bytes, before + BYTES, SLACK), "a view keeps the storage counted");
        let b = Tensor::zeros(&[BYTES / 4], DType::F32, Device::Cpu)?;
        assert!(memory_stats().peak_bytes >= before + 2 * BYTES - SLACK, "two tensors at once reach the peak");
        drop((view, b));
        let after = memory_stats();
        assert!(near(after.in_use_bytes, before, SLACK), "{after}: the storage was not given back");
        reset_peak();
        let reset = memory_stats();
        assert!(near(reset.peak_bytes, reset.in_use_bytes, SLACK), "{reset}: reset_peak restarts from in use");
        Ok(())
    }
}
