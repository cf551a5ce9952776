//! CUDA graphs: [`CudaDevice::capture`] records everything a closure enqueues on the device's stream into a
//! graph, and [`CapturedGraph::replay`] launches all of it again with one call, so that a step made of
//! hundreds of small kernels costs the host one launch instead of hundreds.
//!
//! What a capture needs of the code it runs (the training step of nn's `GraphedStep` is built for it):
//!
//! - Work only, no waiting: nothing may read the device back or synchronise (`to_cpu`, `to_scalar`,
//!   [`CudaDevice::synchronize`], [`CudaDevice::empty_cache`] return an error while a capture runs, and the
//!   capture then fails with that error).
//! - Values that change from step to step must live in device memory that is written before each replay
//!   (outside the graph): a kernel argument is frozen into the graph as it was at capture.
//! - Host-to-device copies made during the capture ([`CudaDevice::htod`]: tables such as RoPE's angles that
//!   an op builds on the host) are captured *with their values*: the bytes are kept in a page-locked buffer
//!   owned by the graph, and every replay copies the same bytes again. That is right for constants, and
//!   wrong for anything that changes per step, which therefore must not be uploaded inside a captured step
//!   (nn's `GraphedStep` refuses a model that draws host random numbers during the capture).
//! - NVRTC compiles, module loads and the cuBLAS/cuBLASLt handles, workspaces and algorithm choices happen on
//!   first use: run the step once before capturing it (a warm-up) so that none happens during the capture.
//!
//! Capture mode: `CU_STREAM_CAPTURE_MODE_RELAXED`. The caching allocator serves the capture from a private
//! pool (alloc.rs), which usually takes its blocks from what the warm-up step left cached, but may have to
//! call `cuMemAlloc` on a miss; the stricter modes (global, thread-local) forbid that call during a capture
//! ("potentially unsafe"), relaxed allows it. A `cuMemAlloc` is not stream work and is not captured: the
//! block simply stays the graph's (its private pool's) for the graph's life, which is what a replay needs.
//! Everything that would conflict with the capture in any mode (synchronising the stream, querying events
//! recorded in it) is refused by the engine before it reaches the driver.
//!
//! Memory: every block allocated during the capture belongs to the graph's private pool; freed, it is
//! reused only by the same capture, or, after the capture, kept for the graph (each replay writes it). Blocks
//! still owned by tensors after the capture (the gradients, the loss, anything the closure returns) keep
//! their addresses: each replay rewrites them in place. When the [`CapturedGraph`] is dropped, the private
//! pool goes back to the general pool.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaGraph};

use super::alloc::Owner;
use super::{CudaDevice, OrCuda};
use crate::{Error, Result};

/// A page-locked host buffer holding the bytes of one upload made during a capture; the captured copy reads
/// it at every replay, so it lives as long as the graph.
pub(crate) struct FrozenUpload {
    ptr: *mut u8,
}

// SAFETY: the buffer is owned by this value alone (allocated here, freed in Drop); the host writes it once,
// before the capture records the copy, and only the device reads it afterwards.
unsafe impl Send for FrozenUpload {}

impl FrozenUpload {
    /// Copies `host` into a new page-locked buffer. The device's context must be current.
    pub(crate) fn new<T: Copy>(host: &[T]) -> Result<Self> {
        let bytes = std::mem::size_of_val(host).max(1);
        // SAFETY: a fresh page-locked allocation of `bytes` bytes (page aligned, so aligned for any T).
        let ptr = unsafe { result::malloc_host(bytes, 0) }.or_cuda("capture: cuMemHostAlloc")? as *mut u8;
        // SAFETY: the buffer holds `bytes >= size_of_val(host)` bytes and does not overlap `host`.
        unsafe { std::ptr::copy_nonoverlapping(host.as_ptr() as *const u8, ptr, std::mem::size_of_val(host)) };
        Ok(FrozenUpload { ptr })
    }

    /// The buffer as `len` values of T (those written by [`FrozenUpload::new`]).
    ///
    /// # Safety
    /// `len` must be the length of the slice the buffer was made from, and T its element type.
    pub(crate) unsafe fn as_slice<T>(&self, len: usize) -> &[T] {
        // SAFETY: per the caller, the buffer holds `len` initialised values of T, suitably aligned.
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, len) }
    }
}

impl Drop for FrozenUpload {
    fn drop(&mut self) {
        // The owner (a CapturedGraph, or a failed capture) drops these only once no launch can read them.
        // SAFETY: allocated by `malloc_host` in `new`, freed once. An error cannot be reported from here.
        let _ = unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}

/// What the device holds while a capture runs.
pub(crate) struct CaptureState {
    pub(crate) pool: Owner,
    pub(crate) uploads: Vec<FrozenUpload>,
}

/// A captured, instantiated graph of work on one device's stream, with the private memory pool and the
/// frozen uploads it uses. Not `Send`: graphs must not be used from several threads (CUDA's rule).
pub struct CapturedGraph {
    /// `Some` until Drop.
    graph: Option<CudaGraph>,
    dev: Arc<CudaDevice>,
    pool: Owner,
    uploads: Vec<FrozenUpload>,
}

impl CapturedGraph {
    /// Enqueues one replay of the whole graph on the device's stream (returns at once, like any op).
    pub fn replay(&self) -> Result<()> {
        let graph = self.graph.as_ref().ok_or_else(|| Error::Cuda { op: "replay", msg: "no graph".into() })?;
        graph.launch().or_cuda("replay: cuGraphLaunch")
    }

    /// How many host-to-device copies the capture froze into the graph (see the module docs).
    pub fn frozen_uploads(&self) -> usize {
        self.uploads.len()
    }

    /// The device the graph runs on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
}

impl Drop for CapturedGraph {
    fn drop(&mut self) {
        // Replays may still be queued: they read the frozen uploads and use the pool's blocks. Wait for them
        // (errors of earlier work cannot be reported from here; they surface at the next synchronising call).
        let _ = self.dev.stream().synchronize();
        drop(self.graph.take());
        self.dev.pool().release_private(self.pool);
        self.uploads.clear();
    }
}

impl CudaDevice {
    /// Runs `f` with the device's stream in capture mode and returns the instantiated graph of everything
    /// it enqueued, with `f`'s value. Nothing `f` enqueues runs now: it runs at each
    /// [`CapturedGraph::replay`]. Allocations during the capture come from the graph's private pool (see
    /// the module docs for what `f` may and may not do). Waits for the stream first, so that errors of
    /// earlier work are reported as such. When `f` fails, or the capture is invalidated (by an operation
    /// that cannot be captured), the capture is ended, its memory given back, and the error returned.
    pub fn capture<R>(self: &Arc<Self>, f: impl FnOnce() -> Result<R>) -> Result<(CapturedGraph, R)> {
        self.synchronize()?;
        {
            let mut state = self.capture_state();
            if state.is_some() {
                return Err(Error::Cuda { op: "capture", msg: "a capture is already running on this device".into() });
            }
            let pool = self.pool().begin_capture()?;
            *state = Some(CaptureState { pool, uploads: Vec::new() });
        }
        let began = self.stream().begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED);
        let out = match began {
            Ok(()) => f(),
            Err(e) => Err(Error::Cuda { op: "capture", msg: format!("cuStreamBeginCapture: {e:?}") }),
        };
        // End the capture in every case that began it (even when `f` failed), so the stream is usable again.
        let ended = match began {
            Ok(()) => self.stream().end_capture(sys::CUgraphInstantiate_flags(0)),
            Err(_) => Ok(None),
        };
        let state = self.capture_state().take();
        self.pool().end_capture();
        let Some(CaptureState { pool, uploads }) = state else {
            return Err(Error::Cuda { op: "capture", msg: "internal: the capture state vanished".into() });
        };
        let fail = |e: Error| {
            // Nothing captured has run: the pool's blocks hold nothing in flight.
            self.pool().release_private(pool);
            e
        };
        let value = match out {
            Ok(v) => v,
            Err(e) => return Err(fail(e)),
        };
        let graph = match ended {
            Ok(Some(g)) => g,
            Ok(None) => return Err(fail(Error::Cuda { op: "capture", msg: "the capture produced no graph".into() })),
            Err(e) => {
                return Err(fail(Error::Cuda {
                    op: "capture",
                    msg: format!(
                        "cuStreamEndCapture/cuGraphInstantiate: {e:?} (an operation that cannot be captured ran \
                         during the capture)"
                    ),
                }))
            }
        };
        let captured = CapturedGraph { graph: Some(graph), dev: self.clone(), pool, uploads };
        // Uploading the graph's resources now keeps that cost out of the first replay.
        captured.graph.as_ref().map_or(Ok(()), |g| g.upload()).or_cuda("capture: cuGraphUpload")?;
        Ok((captured, value))
    }

    /// Whether a capture is running on this device.
    pub fn is_capturing(&self) -> bool {
        self.capture_state().is_some()
    }
}
