//! The CUDA backend, on cudarc with dynamic loading (nothing CUDA is needed to build; see device.rs).
//!
//! How the pieces fit:
//!
//! - [`CudaDevice`] (device.rs): one per ordinal, opened by [`device`] on first use and shared for the life
//!   of the process. It holds the cudarc context, ONE stream that every op of the device enqueues its work on
//!   (kernels, copies, cuBLAS), the caching allocator, the cuBLAS handle bound to that stream, and the
//!   NVRTC module cache. Without a driver or a device, [`device`] returns `Error::CudaUnavailable`.
//! - The caching allocator (alloc.rs): buffers are [`PooledSlice`]s whose blocks go back to a per-device pool
//!   on drop and are reused by size class; the driver allocates only on a pool miss. Because all work of a
//!   device is ordered on its one stream, a block can be reused at once without events. See
//!   [`CudaDevice::memory_stats`].
//! - NVRTC (nvrtc.rs): [`CudaDevice::function`] compiles a module's CUDA C++ source once per device for the
//!   device's architecture (`sm_90` on an H100), caches it by module name and returns the kernel. Kernels are
//!   `extern "C"` templates instantiated as `<op>_f32` / `<op>_f64`; [`kernel_name`] builds the name.
//!   [`CudaDevice::precompile`] (and its background form) compiles a list of modules ahead of use, all at
//!   once on threads of their own; the cache (modules.rs) makes sure each is compiled and loaded once.
//! - cuBLAS (blas.rs): [`CudaDevice::gemm_strided_batched`] for row-major operands, with opt-in TF32
//!   ([`set_tf32`]). cuBLASLt (blaslt.rs): the same products with a fused epilogue, the bias of a Linear
//!   layer ([`CudaDevice::gemm_bias`]) or its gradient ([`CudaDevice::gemm_bias_grad`]).
//! - [`CudaStorage`] (storage.rs): a tensor's buffer, [`CudaBuffer`] (one pooled slice per dtype), and the
//!   engine's own kernels (storage.cu): fill, strided gather, cast, same-shape add. Kernels take views as
//!   [`Strided`] parameter structs.
//! - Vectorised launches ([`vector`]): which kernel form an elementwise launch takes (16-byte accesses for flat,
//!   aligned operands; the Strided form otherwise) and its one-wave grid ([`CudaDevice::wave`]); the device
//!   side (`Pack16`, `load16`, `map16`) is in prelude.cuh.
//!
//! - CUDA graphs (graph.rs): [`CudaDevice::capture`] records the work a closure enqueues (a whole training
//!   step) into a [`CapturedGraph`] that [`CapturedGraph::replay`] launches with one call; the allocator
//!   serves the capture from a private pool owned by the graph.
//!
//! Nothing but `to_cpu` (and [`CudaDevice::synchronize`], for timing) waits for the device: ops enqueue and
//! return. Errors of asynchronous work therefore surface at the next synchronising call. Uploads
//! (`from_cpu`) go through a ring of pinned slots (staging.rs): a copy from pageable memory would wait for
//! the stream first.
//!
//! Writing a kernel for an op: put the source beside the op, get the function from the input's device,
//! allocate the output from the pool, launch on the device's stream with a `// SAFETY:` note:
//!
//! ```ignore
//! // scale.cu: `extern "C" __global__ void scale_f32(const float* x, Strided lx, float* out, long long n,
//! // double a)` and its f64 twin, one template body; the engine's PRELUDE goes in front of it.
//! static SRC: LazyLock<String> = LazyLock::new(|| format!("{PRELUDE}\n{}", include_str!("scale.cu")));
//!
//! fn scale<T: Float>(x: &CudaStorage, layout: &Layout, a: f64) -> Result<CudaStorage> {
//!     let dev = x.device();
//!     let f = dev.function("ops_scale", &SRC, &kernel_name::<T>("scale"))?;
//!     let n = layout.numel();
//!     let out = dev.alloc::<T>(n)?; // uninitialised, from the pool
//!     let (lx, n64) = (x.strided("scale", layout)?, n as i64); // bounds-checked against x's buffer
//!     let mut launch = dev.stream().launch_builder(&f);
//!     launch.arg(x.slice::<T>()?).arg(&lx).arg(out.as_slice()).arg(&n64).arg(&a);
//!     // SAFETY: scale_<T>(const T* x, Strided lx, T* out, long long n, double a) reads x at offset_of(lx, i)
//!     // for i < n, inside x's buffer (checked by `strided`), and writes out[0..n), which holds n elements.
//!     unsafe { launch.launch(dev.launch_config(n)) }.map_err(|e| Error::Cuda { op: "scale", msg: format!("{e:?}") })?;
//!     CudaStorage::from_slice(dev, out)
//! }
//! ```

mod alloc;
mod blas;
mod blaslt;
mod device;
mod graph;
mod modules;
mod nvrtc;
mod staging;
mod storage;
#[cfg(test)]
mod tests;
pub mod vector;

use std::sync::Arc;

pub use alloc::{poison_new_allocations, MemoryStats, PoisonGuard, PooledSlice};
pub use blas::{set_tf32, tf32_enabled, GemmConfig};
pub use device::{
    device, device_count, driver_version, is_available, library_report, unavailable_reason, CudaDevice, LibraryStatus,
};
pub use graph::CapturedGraph;
pub use nvrtc::{compile, nvrtc_available};
pub use storage::{CudaBuffer, CudaStorage, Strided, MAX_DIMS};

/// cudarc itself, and the types ops need to launch kernels, so that they need not name cudarc's paths.
pub use cudarc;
pub use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg,
};

/// The engine's own kernel modules, (name, full source) exactly as the engine loads them: for
/// [`CudaDevice::precompile`] (the ops crate adds its own).
pub const MODULES: &[(&str, &str)] = &[(storage::MODULE, storage::SOURCE)];

/// The CUDA C++ every kernel module starts with: `struct Strided` (the mirror of [`Strided`]), `offset_of`
/// and the `GRID_STRIDE` loop. Prepend it to a module's source before [`CudaDevice::function`].
pub const PRELUDE: &str = include_str!("prelude.cuh");

use crate::{Error, Float, Result};

/// The symbol of a kernel instantiated for `T`: `kernel_name::<f32>("gather")` is `gather_f32`.
pub fn kernel_name<T: Float>(base: &str) -> String {
    format!("{base}_{}", T::DTYPE.as_str())
}

/// Maps cudarc driver errors to [`Error::Cuda`] naming the op.
pub(crate) trait OrCuda<T> {
    fn or_cuda(self, op: &'static str) -> Result<T>;
}

impl<T> OrCuda<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn or_cuda(self, op: &'static str) -> Result<T> {
        self.map_err(|e| Error::Cuda { op, msg: format!("{e:?}") })
    }
}

/// True when the environment says CUDA must be there (`MILA_REQUIRE_CUDA=1`), so that a GPU run of the test
/// suite fails instead of silently skipping the CUDA tests.
pub fn require_cuda() -> bool {
    std::env::var("MILA_REQUIRE_CUDA").is_ok_and(|v| v.trim() == "1")
}

/// For tests only: device 0, or `None` after printing `skipping <test>: no CUDA device (<reason>)`.
///
/// # Panics
/// When there is no device and `MILA_REQUIRE_CUDA=1`: on a GPU machine a skipped CUDA test is a failure.
/// Library code must never call this.
pub fn test_device_or_skip(test: &str) -> Option<Arc<CudaDevice>> {
    match device(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            let reason = match &e {
                Error::CudaUnavailable { reason, .. } => reason.clone(),
                other => other.to_string(),
            };
            if require_cuda() {
                panic!("{test}: MILA_REQUIRE_CUDA=1 but no CUDA device is usable: {reason}");
            }
            eprintln!("skipping {test}: no CUDA device ({reason})");
            None
        }
    }
}
