//! Pinned staging for uploads, so that copying a batch to the device does not wait for the device.
//!
//! `cuMemcpyHtoDAsync` from pageable host memory first synchronises the stream (the driver stages pageable
//! memory through its own pinned buffer), so every upload of a training step's batch, and of the targets
//! that cross-entropy builds on the host, would wait for all queued work: the host could not run ahead of the
//! device. From page-locked memory the copy is truly asynchronous. So small uploads go through a ring of
//! pinned slots: the host copies into the next slot and enqueues the slot's copy to the device, followed by
//! an event; a slot is written again only after its event has completed, which waits only when the host is a
//! whole ring of uploads ahead of the device.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

use super::OrCuda;
use crate::Result;

/// The size of a slot; larger uploads go through several slots, one after the other.
const SLOT_BYTES: usize = 4 << 20;
/// Slots in the ring: the host may be this many uploads ahead of the device.
const SLOTS: usize = 8;

struct Slot {
    ptr: *mut u8,
    /// Recorded after the slot's last copy; the slot is free once it has completed.
    copied: CudaEvent,
}

/// The ring of a device; allocated on the first small upload.
pub(crate) struct Staging {
    slots: Vec<Slot>,
    next: usize,
}

// SAFETY: the raw pointers are page-locked host buffers owned by the ring, used only under the device's
// `Mutex<Staging>`.
unsafe impl Send for Staging {}

impl Staging {
    pub(crate) fn new() -> Self {
        Staging { slots: Vec::new(), next: 0 }
    }

    /// Copies `host` to `dst` (a device buffer of at least `size_of_val(host)` bytes) on `stream`, through
    /// as many slots as it takes. Returns once the host values are in pinned memory.
    pub(crate) fn upload<T: Copy>(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        host: &[T],
        dst: sys::CUdeviceptr,
    ) -> Result<()> {
        let per_slot = (SLOT_BYTES / std::mem::size_of::<T>().max(1)).max(1);
        for (i, chunk) in host.chunks(per_slot).enumerate() {
            let offset = (i * per_slot * std::mem::size_of::<T>()) as sys::CUdeviceptr;
            self.upload_chunk(ctx, stream, chunk, dst + offset)?;
        }
        Ok(())
    }

    fn upload_chunk<T: Copy>(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        host: &[T],
        dst: sys::CUdeviceptr,
    ) -> Result<()> {
        let bytes = std::mem::size_of_val(host);
        debug_assert!(bytes <= SLOT_BYTES);
        if self.slots.len() < SLOTS {
            ctx.bind_to_thread().or_cuda("staging")?;
            // SAFETY: a fresh page-locked allocation (page aligned, so aligned for any T) owned by the ring
            // until `Drop`.
            let ptr = unsafe { result::malloc_host(SLOT_BYTES, 0) }.or_cuda("staging: cuMemHostAlloc")? as *mut u8;
            let copied = ctx.new_event(None).or_cuda("staging: event")?;
            self.slots.push(Slot { ptr, copied });
            self.next = self.slots.len() - 1;
        }
        let slot = &self.slots[self.next];
        self.next = (self.next + 1) % SLOTS;
        // The slot's previous copy must have read it before it is overwritten (a no-op wait for a new slot's
        // event, which has never been recorded).
        slot.copied.synchronize().or_cuda("staging: waiting for a slot")?;
        // SAFETY: the slot holds SLOT_BYTES >= bytes, no copy reads it any more (its event has completed), and
        // host and slot do not overlap (the slot is ours).
        unsafe { std::ptr::copy_nonoverlapping(host.as_ptr() as *const u8, slot.ptr, bytes) };
        // SAFETY: `slot.ptr` holds `host.len()` values of T (page aligned), `dst` has room for them (caller);
        // the copy is enqueued on the device's stream, so it lands before any later use of `dst`.
        unsafe {
            let src = std::slice::from_raw_parts(slot.ptr as *const T, host.len());
            result::memcpy_htod_async(dst, src, stream.cu_stream()).or_cuda("staging: cuMemcpyHtoDAsync")?;
        }
        slot.copied.record(stream).or_cuda("staging: recording the copy")?;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for slot in &self.slots {
            // Pending copies may still read the slot: wait before freeing. Errors cannot be reported here.
            let _ = slot.copied.synchronize();
            // SAFETY: allocated by `malloc_host` above and freed once.
            let _ = unsafe { result::free_host(slot.ptr as *mut std::ffi::c_void) };
        }
    }
}
