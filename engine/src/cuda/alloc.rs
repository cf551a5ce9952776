//! The caching device allocator, after PyTorch's: a freed block goes back to a per-device pool instead of to
//! the driver, and the next request of the same size class takes it from there. `cuMemAlloc` runs only on a
//! pool miss; `cuMemFree` only in [`Allocator::empty_cache`] (also run once when an allocation fails, before
//! the one retry).
//!
//! Size classes: a request is rounded up to a multiple of 512 bytes up to 1 MiB, and to a multiple of 2 MiB
//! above that; a block is reused only for its exact class. Activations and gradients repeat the same shapes
//! step after step, so exact classes hit almost always, and the rounding bounds the waste per block.
//!
//! Why reuse needs no events: every kernel, copy and cuBLAS call of a device is enqueued on the device's one
//! stream. A block returns to the pool when its owner is dropped on the host, possibly while kernels that use
//! it are still queued. Whoever takes it next can only use it through work enqueued later on the same stream,
//! which the GPU runs after the earlier work has finished, so the stream order alone keeps the old and new
//! uses apart. The host never touches device memory directly (reads go through `to_cpu`, which is stream
//! ordered and then waits), and handing a block back to the driver is preceded by a stream synchronisation.
//!
//! CUDA graphs (graph.rs): while a capture runs, every allocation is served from a *private pool* owned by
//! the graph being captured (PyTorch's graph pools). A captured step's blocks are the graph's: each replay
//! writes them again, so none of them may go to anyone outside the graph while it lives. A block allocated
//! during the capture remembers its pool ([`PooledSlice`]'s owner); when it is dropped it goes back to that
//! pool's free list as long as the graph lives, where later allocations of the same capture may take it
//! (stream order keeps that safe, as above), and to the general free list once the graph is gone. A capture
//! that misses its private free list takes a cached block from the general free list first (the warm-up step
//! before a capture leaves exactly the step's sizes there), and only then calls the driver (legal in the
//! relaxed capture mode graph.rs uses). Tensors that outlive the capture (gradients, the loss) keep their
//! blocks, and so their addresses, which every replay rewrites.
//!
//! cudarc's own per-slice event tracking is switched off on our contexts ([`super::CudaDevice`]): with it on,
//! each slice would create two CUDA events, and with several streams each launch would record and wait on
//! them. With one stream they can only cost time.

use std::collections::HashMap;
use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{result, sys, CudaSlice, CudaStream, CudaView, CudaViewMut, DriverError};

use super::OrCuda;
use crate::{Error, Result};

/// While non-zero, every allocation is filled with 0xFF bytes (NaN) before it is handed out: tests turn it on
/// so that an output element a kernel failed to write cannot pass for a correct value. A count of live
/// [`PoisonGuard`]s, so that tests running side by side cannot switch it off under each other.
static POISON: AtomicUsize = AtomicUsize::new(0);

/// Poisons new allocations (process-wide) until the guard is dropped. For tests.
#[must_use = "poisoning stops when the guard is dropped"]
pub fn poison_new_allocations() -> PoisonGuard {
    POISON.fetch_add(1, Ordering::SeqCst);
    PoisonGuard(())
}

/// Keeps new allocations poisoned while alive; see [`poison_new_allocations`].
pub struct PoisonGuard(());

impl Drop for PoisonGuard {
    fn drop(&mut self) {
        POISON.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Requests up to this size are rounded to [`SMALL_ROUND`], larger ones to [`LARGE_ROUND`].
const SMALL_LIMIT: usize = 1 << 20;
const SMALL_ROUND: usize = 512;
const LARGE_ROUND: usize = 2 << 20;

/// The block size a request of `bytes` gets (at least one small block, so that even an empty buffer has a
/// valid device pointer). `None` if rounding overflows.
pub(crate) fn size_class(bytes: usize) -> Option<usize> {
    let bytes = bytes.max(1);
    let round = if bytes <= SMALL_LIMIT { SMALL_ROUND } else { LARGE_ROUND };
    bytes.checked_next_multiple_of(round)
}

/// What a device's allocator holds. Sizes are block sizes (requests rounded up to their class).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in blocks owned by live buffers.
    pub in_use_bytes: usize,
    /// The most `in_use_bytes` plus the cached blocks of live graphs' private pools (which their replays
    /// use) has been since the device was opened or [`super::CudaDevice::reset_peak`]: without graphs, the
    /// most bytes handed out at once.
    pub peak_bytes: usize,
    /// Bytes obtained from the driver and not yet given back: in use plus cached.
    pub reserved_bytes: usize,
    /// Driver allocations (`cuMemAlloc`) so far.
    pub num_allocs: u64,
    /// Requests served from the pool so far.
    pub num_cache_hits: u64,
    /// Bytes in blocks owned by the private pools of live CUDA graphs (in use or free), part of
    /// `reserved_bytes`.
    pub graph_pool_bytes: usize,
}

impl fmt::Display for MemoryStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: f64 = (1 << 20) as f64;
        write!(
            f,
            "in use {:.1} MiB (peak {:.1} MiB), reserved {:.1} MiB, {} driver allocations, {} cache hits",
            self.in_use_bytes as f64 / MIB,
            self.peak_bytes as f64 / MIB,
            self.reserved_bytes as f64 / MIB,
            self.num_allocs,
            self.num_cache_hits
        )?;
        if self.graph_pool_bytes > 0 {
            write!(f, ", graph pools {:.1} MiB", self.graph_pool_bytes as f64 / MIB)?;
        }
        Ok(())
    }
}

/// The pool a block belongs to: [`GENERAL`], or the id of a graph's private pool.
pub(crate) type Owner = u64;
/// The general pool's owner id; private pools count from 1.
pub(crate) const GENERAL: Owner = 0;

/// A graph's private pool: its cached blocks by size class, and the bytes of every block it owns.
#[derive(Default)]
struct PrivatePool {
    free: HashMap<usize, Vec<sys::CUdeviceptr>>,
    bytes: usize,
}

/// The allocator's bookkeeping, without the driver (so that it can be tested on a machine without a GPU).
#[derive(Default)]
struct Pool {
    /// Cached blocks of the general pool, by size class.
    free: HashMap<usize, Vec<sys::CUdeviceptr>>,
    /// The private pools of live graphs (and of the capture running now), by id.
    private: HashMap<Owner, PrivatePool>,
    /// The private pool that serves every allocation while a capture runs.
    capturing: Option<Owner>,
    /// The last private pool id handed out.
    last_private: Owner,
    /// Bytes in the free lists of the private pools: not handed out, but a live graph's.
    private_free: usize,
    stats: MemoryStats,
}

impl Pool {
    fn hand_out(&mut self, class: usize) {
        self.stats.in_use_bytes += class;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.held());
    }

    /// Bytes handed out plus those cached for live graphs.
    fn held(&self) -> usize {
        self.stats.in_use_bytes + self.private_free
    }

    fn reset_peak(&mut self) {
        self.stats.peak_bytes = self.held();
    }

    /// A cached block of `class` for the next allocation, and the pool it now belongs to: during a capture
    /// from the capture's private free list, else from the general free list (moved into the private pool).
    /// With `untouched`, never a block the running capture has freed: captured work may have written it, and
    /// every replay would write it again.
    fn take(&mut self, class: usize, untouched: bool) -> Option<(sys::CUdeviceptr, Owner)> {
        let got = match self.capturing {
            Some(id) => {
                let own = match untouched {
                    true => None,
                    false => self.private.get_mut(&id).and_then(|p| p.free.get_mut(&class)).and_then(Vec::pop),
                };
                match own {
                    Some(ptr) => {
                        self.private_free -= class;
                        Some((ptr, id))
                    }
                    None => {
                        let ptr = self.free.get_mut(&class).and_then(Vec::pop)?;
                        // A cached general block joins the capture's pool for good.
                        self.adopt(id, class);
                        Some((ptr, id))
                    }
                }
            }
            None => self.free.get_mut(&class).and_then(Vec::pop).map(|ptr| (ptr, GENERAL)),
        };
        if got.is_some() {
            self.stats.num_cache_hits += 1;
            self.hand_out(class);
        }
        got
    }

    /// Counts a block of `class` as the private pool `id`'s.
    fn adopt(&mut self, id: Owner, class: usize) {
        if let Some(p) = self.private.get_mut(&id) {
            p.bytes += class;
            self.stats.graph_pool_bytes += class;
        }
    }

    /// Books a block just obtained from the driver; returns its pool (the capture's, while one runs).
    fn add_new(&mut self, class: usize) -> Owner {
        self.stats.num_allocs += 1;
        self.stats.reserved_bytes += class;
        self.hand_out(class);
        match self.capturing {
            Some(id) => {
                self.adopt(id, class);
                id
            }
            None => GENERAL,
        }
    }

    /// Takes back a block of `class` owned by `owner`: into its private pool while that pool lives, else into
    /// the general free list.
    fn give_back(&mut self, ptr: sys::CUdeviceptr, class: usize, owner: Owner) {
        self.stats.in_use_bytes -= class;
        match self.private.get_mut(&owner) {
            Some(p) if owner != GENERAL => {
                p.free.entry(class).or_default().push(ptr);
                self.private_free += class;
            }
            _ => self.free.entry(class).or_default().push(ptr),
        }
    }

    /// Opens a new private pool and serves every allocation from it until [`Pool::end_capture`].
    fn begin_capture(&mut self) -> Result<Owner> {
        if let Some(id) = self.capturing {
            return Err(Error::Cuda {
                op: "capture",
                msg: format!("a capture into graph pool {id} is already running on this device"),
            });
        }
        self.last_private += 1;
        let id = self.last_private;
        self.private.insert(id, PrivatePool::default());
        self.capturing = Some(id);
        Ok(id)
    }

    /// Allocations come from the general pool again; the capture's private pool stays (its graph lives).
    fn end_capture(&mut self) {
        self.capturing = None;
    }

    /// The graph of private pool `id` is gone: its cached blocks join the general free list, and its blocks
    /// still in use go there when they are dropped.
    fn release_private(&mut self, id: Owner) {
        if self.capturing == Some(id) {
            self.capturing = None;
        }
        if let Some(p) = self.private.remove(&id) {
            self.stats.graph_pool_bytes -= p.bytes;
            for (class, ptrs) in p.free {
                self.private_free -= class * ptrs.len();
                self.free.entry(class).or_default().extend(ptrs);
            }
        }
    }
}

pub(crate) struct Allocator {
    stream: Arc<CudaStream>,
    pool: Mutex<Pool>,
}

impl Allocator {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Self {
        Allocator { stream, pool: Mutex::new(Pool::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        // The pool's invariants hold between statements, so a panic elsewhere cannot leave it half-updated.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        self.lock().stats
    }

    pub(crate) fn reset_peak(&self) {
        self.lock().reset_peak()
    }

    /// A buffer of `len` elements of `T`, uninitialised (it may hold whatever its last owner wrote).
    pub(crate) fn alloc<T>(self: &Arc<Self>, len: usize) -> Result<PooledSlice<T>> {
        self.alloc_with::<T>(len, false)
    }

    /// As [`Allocator::alloc`], but during a capture never a block that the capture used before: no captured
    /// work touches the buffer ahead of the point where it is handed out, so values written into it from the
    /// host between replays are what the graph reads (fed masks). Outside a capture the same as `alloc`.
    pub(crate) fn alloc_untouched<T>(self: &Arc<Self>, len: usize) -> Result<PooledSlice<T>> {
        self.alloc_with::<T>(len, true)
    }

    fn alloc_with<T>(self: &Arc<Self>, len: usize, untouched: bool) -> Result<PooledSlice<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| too_large(len))?;
        let (ptr, class, owner) = self.alloc_block(bytes, untouched)?;
        // SAFETY: `ptr` is a live block of `class >= len * size_of::<T>()` bytes that nothing else owns until
        // `PooledSlice::drop` returns it. Event tracking is off on our contexts, so `upgrade_device_ptr` creates
        // no events (its only fallible, and panicking, step).
        let slice = unsafe { self.stream.upgrade_device_ptr::<T>(ptr, len) };
        // Not while a capture runs: the memset would be captured and repeated by every replay, over values
        // written into the block between replays (a graphed step's fed drop-path masks).
        if POISON.load(Ordering::SeqCst) > 0 && class > 0 && !self.capturing() {
            // All bytes 0xFF: a NaN in f32 and f64, so an element a kernel forgot to write shows in any result.
            self.stream.context().bind_to_thread().map_err(|e| Error::Cuda { op: "poison", msg: format!("{e:?}") })?;
            // SAFETY: `ptr` is a live block of `class` bytes owned by the slice made above; the memset is
            // enqueued on the stream every user of the block runs on, so it lands before any later kernel.
            unsafe { sys::cuMemsetD8Async(ptr, 0xFF, class, self.stream.cu_stream()) }
                .result()
                .map_err(|e| Error::Cuda { op: "poison", msg: format!("{e:?}") })?;
        }
        Ok(PooledSlice { slice: ManuallyDrop::new(slice), class, owner, pool: self.clone() })
    }

    fn alloc_block(&self, bytes: usize, untouched: bool) -> Result<(sys::CUdeviceptr, usize, Owner)> {
        let class = size_class(bytes).ok_or_else(|| too_large(bytes))?;
        if let Some((ptr, owner)) = self.lock().take(class, untouched) {
            return Ok((ptr, class, owner));
        }
        let ptr = match self.driver_alloc(class) {
            Ok(ptr) => ptr,
            // Emptying the cache synchronises the stream, which a running capture forbids.
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY && !self.capturing() => {
                // Cached blocks of other classes may be what fills the device: give them back and retry once.
                self.empty_cache()?;
                self.driver_alloc(class).map_err(|e| {
                    let stats = self.stats();
                    Error::Cuda {
                        op: "alloc",
                        msg: format!(
                            "out of memory allocating {class} bytes after emptying the cache ({stats}): {e:?}"
                        ),
                    }
                })?
            }
            Err(e) => return Err(Error::Cuda { op: "alloc", msg: format!("cuMemAlloc of {class} bytes: {e:?}") }),
        };
        let owner = self.lock().add_new(class);
        Ok((ptr, class, owner))
    }

    /// Whether a capture is running (allocations come from its private pool).
    pub(crate) fn capturing(&self) -> bool {
        self.lock().capturing.is_some()
    }

    /// Starts serving allocations from a new private pool; returns its id. See the module docs.
    pub(crate) fn begin_capture(&self) -> Result<Owner> {
        self.lock().begin_capture()
    }

    /// Stops serving allocations from the capture's private pool (which stays reserved for its graph).
    pub(crate) fn end_capture(&self) {
        self.lock().end_capture()
    }

    /// Hands private pool `id` back to the general pool: call once its graph is destroyed and no launch of it
    /// can be queued any more (later work on the one stream runs after the launches already queued).
    pub(crate) fn release_private(&self, id: Owner) {
        self.lock().release_private(id)
    }

    fn driver_alloc(&self, bytes: usize) -> std::result::Result<sys::CUdeviceptr, DriverError> {
        self.stream.context().bind_to_thread()?;
        // SAFETY: the device's context is current on this thread; the memory is handed out uninitialised, which
        // every caller of `alloc` accounts for (outputs are written before they are read).
        unsafe { result::malloc_sync(bytes) }
    }

    /// Takes a block back from a dropped [`PooledSlice`].
    fn release(&self, ptr: sys::CUdeviceptr, class: usize, owner: Owner) {
        self.lock().give_back(ptr, class, owner)
    }

    /// Gives every cached block of the general pool back to the driver (the private pools of live graphs keep
    /// theirs). Waits for the stream first: a cached block may still be read or written by work that was
    /// queued before its owner was dropped. Refused while a capture runs (it may not synchronise).
    pub(crate) fn empty_cache(&self) -> Result<()> {
        if self.capturing() {
            return Err(Error::Cuda {
                op: "empty_cache",
                msg: "called while a CUDA graph is being captured (it would synchronise the stream)".into(),
            });
        }
        let blocks: Vec<(sys::CUdeviceptr, usize)> = {
            let mut pool = self.lock();
            pool.free.drain().flat_map(|(class, ptrs)| ptrs.into_iter().map(move |p| (p, class))).collect()
        };
        if blocks.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.stream.synchronize() {
            // The blocks may still be in use: keep them cached rather than free them under running work.
            let mut pool = self.lock();
            for (ptr, class) in blocks {
                pool.free.entry(class).or_default().push(ptr);
            }
            return Err(Error::Cuda { op: "empty_cache", msg: format!("synchronising before freeing: {e:?}") });
        }
        self.stream.context().bind_to_thread().or_cuda("empty_cache")?;
        let mut first_error = None;
        for (ptr, class) in blocks {
            // SAFETY: `ptr` came from `malloc_sync` in this context, is owned by no buffer (it was in the free
            // list, which we drained), and the stream has finished all work that could touch it.
            match unsafe { result::free_sync(ptr) } {
                Ok(()) => self.lock().stats.reserved_bytes -= class,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(Error::Cuda { op: "empty_cache", msg: format!("cuMemFree: {e:?}") }),
        }
    }
}

fn too_large(what: usize) -> Error {
    Error::Cuda { op: "alloc", msg: format!("a buffer of {what} elements or bytes overflows the address space") }
}

/// A typed device buffer whose block returns to its device's pool when dropped.
///
/// It derefs to cudarc's [`CudaSlice`], so it can be passed to a launch builder as `.arg(&*buf)` or through
/// [`PooledSlice::as_slice`]. Mutable access is only through a view ([`PooledSlice::view_mut`]): handing out
/// `&mut CudaSlice` would let the slice inside be swapped for one of another size or owner, which would put
/// the wrong block back in the pool.
pub struct PooledSlice<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    class: usize,
    /// The pool the block goes back to ([`GENERAL`] or a graph's private pool).
    owner: Owner,
    pool: Arc<Allocator>,
}

impl<T> PooledSlice<T> {
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slice.is_empty()
    }

    /// The size of the pooled block behind this buffer, in bytes (the request rounded up to its class).
    pub fn block_bytes(&self) -> usize {
        self.class
    }

    pub fn as_slice(&self) -> &CudaSlice<T> {
        &self.slice
    }

    pub fn view(&self) -> CudaView<'_, T> {
        self.slice.as_view()
    }

    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice.as_view_mut()
    }
}

impl<T> Deref for PooledSlice<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> Drop for PooledSlice<T> {
    fn drop(&mut self) {
        // SAFETY: `slice` is not touched again; `drop` runs once.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        // `leak` gives up ownership without freeing; with event tracking off it neither waits nor records.
        let ptr = slice.leak();
        self.pool.release(ptr, self.class, self.owner);
    }
}

impl<T> fmt::Debug for PooledSlice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PooledSlice<{}>(len {}, block {} bytes)", std::any::type_name::<T>(), self.len(), self.class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_small_and_large() {
        assert_eq!(size_class(0), Some(512));
        assert_eq!(size_class(1), Some(512));
        assert_eq!(size_class(512), Some(512));
        assert_eq!(size_class(513), Some(1024));
        assert_eq!(size_class(1 << 20), Some(1 << 20));
        assert_eq!(size_class((1 << 20) + 1), Some(2 << 20));
        assert_eq!(size_class((2 << 20) + 1), Some(4 << 20));
        assert_eq!(size_class(usize::MAX), None);
    }

    #[test]
    fn general_pool_reuses_blocks_by_class() {
        let mut pool = Pool::default();
        assert_eq!(pool.take(512, false), None);
        assert_eq!(pool.add_new(512), GENERAL);
        pool.give_back(0x1000, 512, GENERAL);
        assert_eq!(pool.take(1024, false), None, "exact classes only");
        assert_eq!(pool.take(512, false), Some((0x1000, GENERAL)));
        assert_eq!(pool.stats.num_cache_hits, 1);
        assert_eq!(pool.stats.in_use_bytes, 512);
        assert_eq!(pool.stats.graph_pool_bytes, 0);
    }

    #[test]
    fn a_capture_takes_general_blocks_into_its_private_pool_and_keeps_them() {
        let mut pool = Pool::default();
        // Two cached general blocks (a warm-up step's), one in use outside the graph.
        for ptr in [0x1000, 0x2000, 0x3000] {
            pool.add_new(512);
            pool.give_back(ptr, 512, GENERAL);
        }
        let outside = pool.take(512, false).unwrap();
        assert_eq!(outside.1, GENERAL);

        let id = pool.begin_capture().unwrap();
        assert!(pool.begin_capture().is_err(), "one capture at a time");
        // The capture adopts a cached general block ...
        let (a, owner) = pool.take(512, false).unwrap();
        assert_eq!(owner, id);
        assert_eq!(pool.stats.graph_pool_bytes, 512);
        // ... and a block it frees is reused by its own later allocations, not a general one.
        pool.give_back(a, 512, id);
        assert_eq!(pool.take(512, false), Some((a, id)));
        // A miss everywhere goes to the driver, booked to the capture's pool.
        let (b, _) = pool.take(512, false).unwrap(); // the last cached general block
        assert_eq!(pool.take(512, false), None);
        assert_eq!(pool.add_new(512), id);
        assert_eq!(pool.stats.graph_pool_bytes, 3 * 512);
        pool.end_capture();

        // After the capture, a freed private block stays the graph's: outside allocations never see it, and
        // the peak counts it as held (a replay uses it).
        pool.reset_peak();
        let held = pool.stats.peak_bytes;
        pool.give_back(b, 512, id);
        assert_eq!(pool.take(512, false), None);
        assert_eq!(pool.held(), held);
        pool.give_back(outside.0, 512, GENERAL);
        assert_eq!(pool.take(512, false), Some((outside.0, GENERAL)));

        // The graph goes: its cached blocks join the general pool, and its blocks still in use (a gradient)
        // go there when dropped.
        pool.release_private(id);
        assert_eq!(pool.stats.graph_pool_bytes, 0);
        assert_eq!(pool.private_free, 0);
        assert_eq!(pool.take(512, false), Some((b, GENERAL)));
        pool.give_back(a, 512, id);
        assert_eq!(pool.take(512, false), Some((a, GENERAL)));
    }

    #[test]
    fn an_untouched_allocation_skips_blocks_the_capture_freed() {
        let mut pool = Pool::default();
        pool.add_new(512);
        pool.give_back(0x1000, 512, GENERAL);
        let id = pool.begin_capture().unwrap();
        // A block written by captured work and freed within the capture ...
        assert_eq!(pool.add_new(512), id);
        pool.give_back(0x2000, 512, id);
        // ... is not handed to an allocation whose values are fed between replays: a replay would run that
        // work again, over the fed values. A cached general block (no captured work touched it) is.
        assert_eq!(pool.take(512, true), Some((0x1000, id)));
        assert_eq!(pool.take(512, true), None, "a miss goes to the driver");
        // Ordinary allocations still reuse it.
        assert_eq!(pool.take(512, false), Some((0x2000, id)));
        pool.end_capture();
    }

    #[test]
    fn released_capture_stops_serving_allocations() {
        let mut pool = Pool::default();
        let id = pool.begin_capture().unwrap();
        assert_eq!(pool.add_new(512), id);
        // A failed capture releases its pool while still capturing.
        pool.release_private(id);
        assert_eq!(pool.capturing, None);
        assert_eq!(pool.add_new(512), GENERAL);
        let next = pool.begin_capture().unwrap();
        assert_ne!(next, id, "pool ids are not reused");
    }
}
