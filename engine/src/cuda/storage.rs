//! `CudaStorage`: a tensor's flat buffer on a CUDA device, and the storage-level routines the engine needs
//! (fill, strided copy, dtype cast, host transfer, same-shape add), with their kernels in storage.cu.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, DriverError, PushKernelArg};

use super::{device, kernel_name, vector, CudaDevice, OrCuda, PooledSlice};
use crate::{CpuStorage, DType, Device, Error, Float, Layout, Result};

/// Dims a kernel-side [`Strided`] holds (after merging, see [`Strided::new`]).
pub const MAX_DIMS: usize = 8;

pub(super) const MODULE: &str = "engine_storage";
pub(super) const SOURCE: &str = concat!(include_str!("prelude.cuh"), "\n", include_str!("storage.cu"));

/// A view's shape, strides and offset (in elements) as kernels take it: passed by value, mirrored field for
/// field by `struct Strided` in prelude.cuh (and ops/src/prelude.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strided {
    pub shape: [i64; MAX_DIMS],
    pub strides: [i64; MAX_DIMS],
    pub offset: i64,
    pub rank: i32,
    /// 1 when the view is contiguous, so kernels can index `offset + i` directly.
    pub contiguous: i32,
}

// The .cu side checks the same size with a static_assert.
const _: () = assert!(std::mem::size_of::<Strided>() == 144);

// SAFETY: plain integers in C layout with no padding, the layout of `struct Strided` in prelude.cuh.
unsafe impl DeviceRepr for Strided {}

impl Strided {
    /// The kernel-side description of `layout`. Size-1 dims are dropped and neighbours that are contiguous with
    /// each other merged, which keeps the row-major order of the elements and shortens the index arithmetic;
    /// errs if more than [`MAX_DIMS`] dims remain.
    pub fn new(layout: &Layout) -> Result<Strided> {
        let err = |msg: String| Error::invalid("cuda_strided", msg, layout.shape());
        let to_i64 = |v: usize| i64::try_from(v).map_err(|_| err(format!("{v} does not fit in i64")));
        let (shape, strides) = merge_dims(layout.shape(), layout.strides());
        if shape.len() > MAX_DIMS {
            return Err(err(format!(
                "{} dims remain after merging (strides {:?}); CUDA kernels take at most {MAX_DIMS}",
                shape.len(),
                layout.strides()
            )));
        }
        let mut out = Strided {
            shape: [1; MAX_DIMS],
            strides: [0; MAX_DIMS],
            offset: to_i64(layout.offset())?,
            rank: shape.len() as i32,
            contiguous: layout.is_contiguous() as i32,
        };
        for (d, (&n, &s)) in shape.iter().zip(&strides).enumerate() {
            out.shape[d] = to_i64(n)?;
            out.strides[d] = to_i64(s)?;
        }
        Ok(out)
    }
}

/// Drops size-1 dims and fuses a dim into the one before it when the outer stride is the inner extent.
fn merge_dims(shape: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut out_shape: Vec<usize> = Vec::with_capacity(shape.len());
    let mut out_strides: Vec<usize> = Vec::with_capacity(shape.len());
    for (&d, &s) in shape.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        match (out_shape.last_mut(), out_strides.last_mut()) {
            (Some(pd), Some(ps)) if *ps == s * d => {
                *pd *= d;
                *ps = s;
            }
            _ => {
                out_shape.push(d);
                out_strides.push(s);
            }
        }
    }
    (out_shape, out_strides)
}

/// Errs unless every element `layout` can reach lies inside a buffer of `len` elements: kernels do not
/// bounds-check, so this is what keeps a bad layout from reading outside the allocation.
fn check_span(op: &'static str, layout: &Layout, len: usize) -> Result<()> {
    let span = layout.storage_span();
    if span.end > len {
        return Err(Error::invalid(
            op,
            format!(
                "the layout (strides {:?}, offset {}) reaches past a buffer of {len} elements",
                layout.strides(),
                layout.offset()
            ),
            layout.shape(),
        ));
    }
    Ok(())
}

/// A typed pooled device buffer.
pub enum CudaBuffer {
    F32(PooledSlice<f32>),
    F64(PooledSlice<f64>),
}

/// Calls `$body` with `$v` bound to the typed [`PooledSlice`] of a [`CudaBuffer`] and `$T` to its element
/// type: the one dtype `match` of a CUDA dispatch, like [`crate::with_cpu`].
#[macro_export]
macro_rules! with_cuda {
    ($b:expr, |$v:ident : $T:ident| $body:expr) => {
        match $b {
            $crate::cuda::CudaBuffer::F32($v) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::cuda::CudaBuffer::F64($v) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
        }
    };
}

impl CudaBuffer {
    pub fn dtype(&self) -> DType {
        match self {
            CudaBuffer::F32(_) => DType::F32,
            CudaBuffer::F64(_) => DType::F64,
        }
    }

    pub fn len(&self) -> usize {
        with_cuda!(self, |s: T| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wraps a buffer made by generic code (`fn f<T: Float>(..) -> Result<PooledSlice<T>>`).
    pub fn from_slice<T: Float>(slice: PooledSlice<T>) -> Result<CudaBuffer> {
        // `Float` is f32 or f64; `Any` finds which without a trait method per dtype.
        let mut slot = Some(slice);
        let any: &mut dyn Any = &mut slot;
        if let Some(s) = any.downcast_mut::<Option<PooledSlice<f32>>>().and_then(Option::take) {
            return Ok(CudaBuffer::F32(s));
        }
        if let Some(s) = any.downcast_mut::<Option<PooledSlice<f64>>>().and_then(Option::take) {
            return Ok(CudaBuffer::F64(s));
        }
        Err(Error::Unsupported { op: "cuda_buffer", dtype: T::DTYPE, device: Device::Cuda(0) })
    }

    /// The buffer as `PooledSlice<T>`, if `T` is its dtype.
    pub fn typed<T: Float>(&self) -> Option<&PooledSlice<T>> {
        let any: &dyn Any = match self {
            CudaBuffer::F32(s) => s,
            CudaBuffer::F64(s) => s,
        };
        any.downcast_ref::<PooledSlice<T>>()
    }

    pub fn typed_mut<T: Float>(&mut self) -> Option<&mut PooledSlice<T>> {
        let any: &mut dyn Any = match self {
            CudaBuffer::F32(s) => s,
            CudaBuffer::F64(s) => s,
        };
        any.downcast_mut::<PooledSlice<T>>()
    }

    fn ordinal(&self) -> usize {
        with_cuda!(self, |s: T| s.ordinal())
    }
}

/// A tensor's storage on a CUDA device: a pooled buffer and the device it lives on.
pub struct CudaStorage {
    device: Arc<CudaDevice>,
    buffer: CudaBuffer,
}

impl fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaStorage(cuda:{}, {}, {} elements)", self.ordinal(), self.dtype(), self.len())
    }
}

impl CudaStorage {
    /// Storage over a buffer of `device`.
    pub fn new(device: Arc<CudaDevice>, buffer: CudaBuffer) -> Result<Self> {
        if buffer.ordinal() != device.ordinal() {
            return Err(Error::DeviceMismatch {
                op: "cuda_storage",
                lhs: Device::Cuda(device.ordinal()),
                rhs: Device::Cuda(buffer.ordinal()),
            });
        }
        Ok(CudaStorage { device, buffer })
    }

    /// Storage over a typed buffer from [`CudaDevice::alloc`] (the usual end of a generic op).
    pub fn from_slice<T: Float>(device: &Arc<CudaDevice>, slice: PooledSlice<T>) -> Result<Self> {
        Self::new(device.clone(), CudaBuffer::from_slice(slice)?)
    }

    /// `n` uninitialised elements of `dtype`: an op's output, to be written in full by its kernel.
    pub fn alloc(device: &Arc<CudaDevice>, n: usize, dtype: DType) -> Result<Self> {
        let buffer = match dtype {
            DType::F32 => CudaBuffer::F32(device.alloc(n)?),
            DType::F64 => CudaBuffer::F64(device.alloc(n)?),
        };
        Ok(CudaStorage { device: device.clone(), buffer })
    }

    /// Uninitialised storage that no work of a running graph capture has touched
    /// ([`CudaDevice::alloc_untouched`]): for values written from the host between replays.
    pub fn alloc_untouched(device: &Arc<CudaDevice>, n: usize, dtype: DType) -> Result<Self> {
        let buffer = match dtype {
            DType::F32 => CudaBuffer::F32(device.alloc_untouched(n)?),
            DType::F64 => CudaBuffer::F64(device.alloc_untouched(n)?),
        };
        Ok(CudaStorage { device: device.clone(), buffer })
    }

    pub fn dtype(&self) -> DType {
        self.buffer.dtype()
    }

    pub fn ordinal(&self) -> usize {
        self.device.ordinal()
    }

    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device, for its stream, kernels ([`CudaDevice::function`]) and allocator.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    pub fn buffer(&self) -> &CudaBuffer {
        &self.buffer
    }

    pub fn buffer_mut(&mut self) -> &mut CudaBuffer {
        &mut self.buffer
    }

    /// The buffer as a launch argument of element type `T` (`DTypeMismatch` if it is not `T`). Kernels may
    /// write through it too: cudarc does not tell reads from writes once event tracking is off.
    pub fn slice<T: Float>(&self) -> Result<&CudaSlice<T>> {
        self.buffer.typed::<T>().map(|s| s.as_slice()).ok_or(Error::DTypeMismatch {
            op: "cuda_slice",
            lhs: self.dtype(),
            rhs: T::DTYPE,
        })
    }

    /// A mutable view for in-place updates and copies into this buffer.
    pub fn slice_mut<T: Float>(&mut self) -> Result<CudaViewMut<'_, T>> {
        let dtype = self.dtype();
        self.buffer.typed_mut::<T>().map(|s| s.view_mut()).ok_or(Error::DTypeMismatch {
            op: "cuda_slice",
            lhs: dtype,
            rhs: T::DTYPE,
        })
    }

    /// The kernel-side view of `layout` over this buffer, after checking that every element it reaches lies
    /// inside the buffer (kernels do not bounds-check).
    pub fn strided(&self, op: &'static str, layout: &Layout) -> Result<Strided> {
        check_span(op, layout, self.len())?;
        Strided::new(layout)
    }

    pub fn full(ordinal: usize, n: usize, value: f64, dtype: DType) -> Result<Self> {
        let mut s = Self::alloc(&device::device(ordinal)?, n, dtype)?;
        s.fill(value)?;
        Ok(s)
    }

    /// Sets every element to `value` (converted to the dtype).
    pub fn fill(&mut self, value: f64) -> Result<()> {
        let dev = self.device.clone();
        with_cuda!(&mut self.buffer, |s: T| fill(&dev, s, value))
    }

    pub fn from_cpu(ordinal: usize, cpu: &CpuStorage) -> Result<Self> {
        let device = device::device(ordinal)?;
        let buffer = match cpu {
            CpuStorage::F32(v) => CudaBuffer::F32(device.htod(v)?),
            CpuStorage::F64(v) => CudaBuffer::F64(device.htod(v)?),
        };
        Ok(CudaStorage { device, buffer })
    }

    /// Copies `cpu` (of this buffer's dtype) into elements `offset..offset + cpu.len()` (stream ordered).
    pub fn write_from_cpu(&mut self, offset: usize, cpu: &CpuStorage) -> Result<()> {
        let device = self.device.clone();
        match (&mut self.buffer, cpu) {
            (CudaBuffer::F32(d), CpuStorage::F32(v)) => device.htod_into(v, d, offset),
            (CudaBuffer::F64(d), CpuStorage::F64(v)) => device.htod_into(v, d, offset),
            _ => Err(Error::DTypeMismatch { op: "write_from_cpu", lhs: self.dtype(), rhs: cpu.dtype() }),
        }
    }

    /// The elements under `layout` as new contiguous storage on this device.
    pub fn copy_strided(&self, layout: &Layout) -> Result<Self> {
        let buffer = match &self.buffer {
            CudaBuffer::F32(s) => CudaBuffer::F32(gather(&self.device, s, layout)?),
            CudaBuffer::F64(s) => CudaBuffer::F64(gather(&self.device, s, layout)?),
        };
        Ok(CudaStorage { device: self.device.clone(), buffer })
    }

    /// The elements under `layout`, contiguous and converted to `dtype`.
    pub fn cast(&self, layout: &Layout, dtype: DType) -> Result<Self> {
        let buffer = match (&self.buffer, dtype) {
            (CudaBuffer::F32(s), DType::F64) => CudaBuffer::F64(cast::<f32, f64>(&self.device, s, layout)?),
            (CudaBuffer::F64(s), DType::F32) => CudaBuffer::F32(cast::<f64, f32>(&self.device, s, layout)?),
            _ => return self.copy_strided(layout),
        };
        Ok(CudaStorage { device: self.device.clone(), buffer })
    }

    /// The elements under `layout`, contiguous, on the host. The one routine that waits for the device.
    pub fn to_cpu(&self, layout: &Layout) -> Result<CpuStorage> {
        Ok(match &self.buffer {
            CudaBuffer::F32(s) => CpuStorage::F32(to_host(&self.device, s, layout)?),
            CudaBuffer::F64(s) => CpuStorage::F64(to_host(&self.device, s, layout)?),
        })
    }

    /// `a + b` for two views of the same shape (any strides), as new contiguous storage.
    pub fn add_same_shape(&self, la: &Layout, other: &Self, lb: &Layout) -> Result<Self> {
        const OP: &str = "accumulate_grad";
        if other.ordinal() != self.ordinal() {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: Device::Cuda(self.ordinal()),
                rhs: Device::Cuda(other.ordinal()),
            });
        }
        if la.shape() != lb.shape() {
            return Err(Error::ShapeMismatch { op: OP, lhs: la.shape().to_vec(), rhs: lb.shape().to_vec() });
        }
        let buffer = match (&self.buffer, &other.buffer) {
            (CudaBuffer::F32(a), CudaBuffer::F32(b)) => CudaBuffer::F32(add(&self.device, a, la, b, lb)?),
            (CudaBuffer::F64(a), CudaBuffer::F64(b)) => CudaBuffer::F64(add(&self.device, a, la, b, lb)?),
            _ => return Err(Error::DTypeMismatch { op: OP, lhs: self.dtype(), rhs: other.dtype() }),
        };
        Ok(CudaStorage { device: self.device.clone(), buffer })
    }
}

// ---- the kernels' launches ---------------------------------------------------------------------------

/// A launch's outcome as our error, naming the op and the kernel.
fn launched<E>(op: &'static str, kernel: &str, r: std::result::Result<E, DriverError>) -> Result<()> {
    r.map(|_| ()).map_err(|e| Error::Cuda { op, msg: format!("launching {kernel}: {e:?}") })
}

fn fill<T: Float>(dev: &CudaDevice, out: &mut PooledSlice<T>, value: f64) -> Result<()> {
    let n = out.len();
    if n == 0 {
        return Ok(());
    }
    let name = kernel_name::<T>("fill");
    let f = dev.function(MODULE, SOURCE, &name)?;
    let n64 = n as i64;
    let mut out = out.view_mut();
    let mut launch = dev.stream().launch_builder(&f);
    launch.arg(&mut out).arg(&n64).arg(&value);
    // SAFETY: fill_<T>(T* out, long long n, double value) writes out[0..n), and `out` holds n elements of T.
    launched("fill", &name, unsafe { launch.launch(dev.launch_config(n)) })
}

/// `src` under `layout`, contiguous: a device-to-device copy when the view is one range already, else the
/// gather kernel.
fn gather<T: Float>(dev: &CudaDevice, src: &PooledSlice<T>, layout: &Layout) -> Result<PooledSlice<T>> {
    const OP: &str = "copy_strided";
    check_span(OP, layout, src.len())?;
    let n = layout.numel();
    let mut out = dev.alloc::<T>(n)?;
    if n == 0 {
        return Ok(out);
    }
    if layout.is_contiguous() {
        let o = layout.offset();
        let range = src.try_slice(o..o + n).ok_or_else(|| Error::invalid(OP, "range out of bounds", layout.shape()))?;
        dev.stream().memcpy_dtod(&range, &mut out.view_mut()).or_cuda(OP)?;
        return Ok(out);
    }
    let ls = Strided::new(layout)?;
    let name = kernel_name::<T>("gather");
    let f = dev.function(MODULE, SOURCE, &name)?;
    let n64 = n as i64;
    let mut launch = dev.stream().launch_builder(&f);
    launch.arg(src.as_slice()).arg(&ls).arg(out.as_slice()).arg(&n64);
    // SAFETY: gather_<T>(const T* src, Strided ls, T* out, long long n) reads src at offset_of(ls, i) for
    // i < n, all inside `src` (check_span), and writes out[0..n), which holds n elements of T.
    launched(OP, &name, unsafe { launch.launch(dev.launch_config(n)) })?;
    Ok(out)
}

fn cast<S: Float, D: Float>(dev: &CudaDevice, src: &PooledSlice<S>, layout: &Layout) -> Result<PooledSlice<D>> {
    const OP: &str = "cast";
    check_span(OP, layout, src.len())?;
    let n = layout.numel();
    let out = dev.alloc::<D>(n)?;
    if n == 0 {
        return Ok(out);
    }
    let ls = Strided::new(layout)?;
    let name = format!("cast_{}_to_{}", S::DTYPE, D::DTYPE);
    let f = dev.function(MODULE, SOURCE, &name)?;
    let n64 = n as i64;
    let mut launch = dev.stream().launch_builder(&f);
    launch.arg(src.as_slice()).arg(&ls).arg(out.as_slice()).arg(&n64);
    // SAFETY: cast_<S>_to_<D>(const S* src, Strided ls, D* out, long long n) reads src at offset_of(ls, i) for
    // i < n, inside `src` (check_span), and writes out[0..n), which holds n elements of D.
    launched(OP, &name, unsafe { launch.launch(dev.launch_config(n)) })?;
    Ok(out)
}

fn add<T: Float>(
    dev: &CudaDevice,
    a: &PooledSlice<T>,
    la: &Layout,
    b: &PooledSlice<T>,
    lb: &Layout,
) -> Result<PooledSlice<T>> {
    const OP: &str = "accumulate_grad";
    check_span(OP, la, a.len())?;
    check_span(OP, lb, b.len())?;
    let n = la.numel();
    let out = dev.alloc::<T>(n)?;
    if n == 0 {
        return Ok(out);
    }
    let n64 = n as i64;
    let stream = dev.stream();
    let inputs = [(la, vector::address(a, stream)), (lb, vector::address(b, stream))];
    if let vector::Path::Vector(flats) = vector::plan(&inputs, &[vector::address(&out, stream)], size_of::<T>()) {
        let va = flat_view(OP, a, la, flats[0])?;
        let vb = flat_view(OP, b, lb, flats[1])?;
        let (pa, pb) = (flats[0].period(), flats[1].period());
        let name = kernel_name::<T>("add_vec");
        let f = dev.function(MODULE, SOURCE, &name)?;
        let cfg = vector::launch_config(n, size_of::<T>(), dev.wave(MODULE, &name, &f, vector::THREADS)?);
        let mut launch = stream.launch_builder(&f);
        launch.arg(&va).arg(&pa).arg(&vb).arg(&pb).arg(out.as_slice()).arg(&n64);
        // SAFETY: add_vec_<T>(const T* a, long long pa, const T* b, long long pb, T* out, long long n) reads a
        // and b through their flat forms (p[i], p[0] or p[i % period] for i < n), inside the views `va`, `vb`
        // that `flat_view` cut to exactly those elements, with 16-byte loads at addresses `plan` checked; and
        // writes out[0..n), which holds n elements of T, from an aligned address.
        launched(OP, &name, unsafe { launch.launch(cfg) })?;
        return Ok(out);
    }
    let (sa, sb) = (Strided::new(la)?, Strided::new(lb)?);
    let name = kernel_name::<T>("add_strided");
    let f = dev.function(MODULE, SOURCE, &name)?;
    let mut launch = stream.launch_builder(&f);
    launch.arg(a.as_slice()).arg(&sa).arg(b.as_slice()).arg(&sb).arg(out.as_slice()).arg(&n64);
    // SAFETY: add_strided_<T>(const T* a, Strided la, const T* b, Strided lb, T* out, long long n) reads a and
    // b at offset_of(l, i) for i < n, inside each buffer (check_span; both layouts have n elements), and writes
    // out[0..n), which holds n elements of T.
    launched(OP, &name, unsafe { launch.launch(dev.launch_config(n)) })?;
    Ok(out)
}

/// The elements a vectorised kernel reads of a flat input: from the layout's offset, `flat.span(numel)` long.
fn flat_view<'a, T>(
    op: &'static str,
    s: &'a PooledSlice<T>,
    layout: &Layout,
    flat: vector::Flat,
) -> Result<CudaView<'a, T>> {
    let o = layout.offset();
    s.try_slice(o..o + flat.span(layout.numel()))
        .ok_or_else(|| Error::invalid(op, "internal: flat view exceeds its buffer", layout.shape()))
}

fn to_host<T: Float + DeviceRepr>(dev: &CudaDevice, src: &PooledSlice<T>, layout: &Layout) -> Result<Vec<T>> {
    const OP: &str = "to_cpu";
    check_span(OP, layout, src.len())?;
    let n = layout.numel();
    if n == 0 {
        return Ok(Vec::new());
    }
    if layout.is_contiguous() {
        let o = layout.offset();
        let range = src.try_slice(o..o + n).ok_or_else(|| Error::invalid(OP, "range out of bounds", layout.shape()))?;
        return dev.dtoh(&range);
    }
    let packed = gather(dev, src, layout)?;
    dev.dtoh(packed.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_merges_dims_and_keeps_the_order() {
        // A (4, 6) buffer narrowed to (4, 3) and viewed as (2, 2, 3): rows stay apart, the two row dims merge.
        let l = Layout::contiguous(&[4, 6]).narrow(1, 1, 3).unwrap().reshape_view(&[2, 2, 3]).unwrap();
        let s = Strided::new(&l).unwrap();
        assert_eq!((s.rank, s.contiguous, s.offset), (2, 0, 1));
        assert_eq!((&s.shape[..2], &s.strides[..2]), (&[4i64, 3][..], &[6i64, 1][..]));
        // Broadcast dims keep stride 0; size-1 dims vanish.
        let b = Layout::contiguous(&[3, 1]).broadcast_as(&[2, 3, 5]).unwrap();
        let s = Strided::new(&b).unwrap();
        assert_eq!((s.rank, &s.shape[..3], &s.strides[..3]), (3, &[2i64, 3, 5][..], &[0i64, 1, 0][..]));
        assert_eq!(Strided::new(&Layout::contiguous(&[])).unwrap().rank, 0);
    }

    #[test]
    fn strided_refuses_more_than_max_dims() {
        // Nine dims reversed: the strides grow inwards, so no two neighbours merge.
        let permuted = Layout::contiguous(&[2; 9]).permute(&[8, 7, 6, 5, 4, 3, 2, 1, 0]).unwrap();
        assert!(matches!(Strided::new(&permuted), Err(Error::InvalidArgument { .. })));
        // The same nine dims in order merge into one.
        assert_eq!(Strided::new(&Layout::contiguous(&[2; 9])).unwrap().rank, 1);
    }

    #[test]
    fn check_span_catches_layouts_past_the_buffer() {
        let l = Layout::contiguous(&[4, 6]).narrow(0, 2, 2).unwrap();
        assert!(check_span("t", &l, 24).is_ok());
        assert!(check_span("t", &l, 23).is_err());
    }
}
