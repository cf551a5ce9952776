//! `CudaDevice`: one per ordinal, opened on first use and kept for the life of the process.
//!
//! cudarc is built with `dynamic-loading`: nothing CUDA is needed to build, and `libcuda`, `libcublas` and
//! `libnvrtc` are `dlopen`ed the first time a function of theirs is called. cudarc's loader *panics* when a
//! library is missing, and when a loaded library lacks a symbol the bindings expect (a driver older than
//! CUDA 13). So before touching a library we ask cudarc whether it can be loaded at all (`is_culib_present`),
//! and the set-up calls (driver probe, context, cuBLAS handle, NVRTC) run under [`catch_panics`] as a last
//! resort for the missing-symbol case. Either way the caller gets `Error::CudaUnavailable` (or `Nvrtc` /
//! `Cublas`), never a panic. The default panic hook may still print cudarc's message to stderr once.

use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
};
use cudarc::nvrtc::Ptx;

use super::alloc::{Allocator, MemoryStats, PooledSlice};
use super::blas::Blas;
use super::blaslt::BlasLt;
use super::graph::{CaptureState, FrozenUpload};
use super::modules::ModuleCache;
use super::staging::Staging;
use super::{nvrtc, OrCuda};
use crate::{Error, Result};

// ---- libraries ---------------------------------------------------------------------------------------

/// The CUDA libraries mila-rs loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Library {
    Driver,
    Cublas,
    CublasLt,
    Nvrtc,
}

impl Library {
    const ALL: [Library; 4] = [Library::Driver, Library::Cublas, Library::CublasLt, Library::Nvrtc];

    fn name(self) -> &'static str {
        match self {
            Library::Driver => "libcuda",
            Library::Cublas => "libcublas",
            Library::CublasLt => "libcublasLt",
            Library::Nvrtc => "libnvrtc",
        }
    }

    fn purpose(self) -> &'static str {
        match self {
            Library::Driver => "driver API: devices, memory, copies, kernel launches (required)",
            Library::Cublas => "matrix products",
            Library::CublasLt => "matrix products with a fused bias (Linear layers)",
            Library::Nvrtc => "compiles the CUDA kernels at run time",
        }
    }

    /// The file names cudarc tries, in order.
    pub(crate) fn candidates(self) -> Vec<String> {
        let stems: &[&str] = match self {
            Library::Driver => &["cuda", "nvcuda"],
            Library::Cublas => &["cublas"],
            Library::CublasLt => &["cublasLt"],
            Library::Nvrtc => &["nvrtc"],
        };
        stems.iter().flat_map(|s| cudarc::get_lib_name_candidates(s)).collect()
    }

    fn probe(self) -> bool {
        // SAFETY: each `is_culib_present` only `dlopen`s candidate names and drops the handles again.
        unsafe {
            match self {
                Library::Driver => cudarc::driver::sys::is_culib_present(),
                Library::Cublas => cudarc::cublas::sys::is_culib_present(),
                Library::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            }
        }
    }
}

/// Whether `lib` can be loaded (probed once per process).
pub(crate) fn library_present(lib: Library) -> bool {
    static PRESENT: [OnceLock<bool>; Library::ALL.len()] = [const { OnceLock::new() }; Library::ALL.len()];
    *PRESENT[lib as usize].get_or_init(|| lib.probe())
}

/// One line of [`library_report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryStatus {
    /// e.g. `libcublas`.
    pub name: &'static str,
    pub purpose: &'static str,
    /// The file names searched, in the order cudarc tries them (through the dynamic loader's search path).
    pub candidates: Vec<String>,
    pub found: bool,
}

impl fmt::Display for LibraryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.found { "found" } else { "NOT FOUND" };
        write!(f, "{:<10} {:<9} {} (searched {})", self.name, state, self.purpose, self.candidates.join(", "))
    }
}

/// Each CUDA library mila-rs loads, the names it looks for and whether one was found (for `mila info`).
pub fn library_report() -> Vec<LibraryStatus> {
    Library::ALL
        .iter()
        .map(|&lib| LibraryStatus {
            name: lib.name(),
            purpose: lib.purpose(),
            candidates: lib.candidates(),
            found: library_present(lib),
        })
        .collect()
}

/// Runs `f`, turning a panic into `Err`. cudarc resolves each CUDA symbol on its first call and panics when
/// the loaded library lacks it; on the set-up paths that must become an error the caller can report.
pub(crate) fn catch_panics<T>(
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("{what}: the CUDA bindings panicked: {msg}"))
        }
    }
}

// ---- the driver ----------------------------------------------------------------------------------------

struct Driver {
    device_count: usize,
    /// e.g. 13000 for CUDA 13.0.
    version: i32,
}

/// Loads libcuda and runs `cuInit` once per process; the outcome (or why it failed) is kept.
fn driver() -> std::result::Result<&'static Driver, String> {
    static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();
    DRIVER.get_or_init(probe_driver).as_ref().map_err(|e| e.clone())
}

fn probe_driver() -> std::result::Result<Driver, String> {
    if !library_present(Library::Driver) {
        return Err("the CUDA driver library libcuda could not be loaded (no NVIDIA driver installed?); \
                    `mila info` lists the names searched"
            .into());
    }
    catch_panics("cuInit", || {
        result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
        let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
        let mut version = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| format!("cuDriverGetVersion failed: {e:?}"))?;
        Ok(Driver { device_count: count.max(0) as usize, version })
    })
}

/// The number of CUDA devices (0 when there is no driver or no device).
pub fn device_count() -> usize {
    driver().map(|d| d.device_count).unwrap_or(0)
}

/// Whether at least one CUDA device can be used.
pub fn is_available() -> bool {
    device_count() > 0
}

/// The CUDA version the driver supports, as (major, minor), when a driver is loaded.
pub fn driver_version() -> Option<(u32, u32)> {
    let v = driver().ok()?.version.max(0) as u32;
    Some((v / 1000, (v % 1000) / 10))
}

/// Why CUDA is unavailable, when it is (`None` when at least one device is present).
pub fn unavailable_reason() -> Option<String> {
    match driver() {
        Err(reason) => Some(reason),
        Ok(d) if d.device_count == 0 => Some("the driver reports no CUDA device".into()),
        Ok(_) => None,
    }
}

// ---- the device ----------------------------------------------------------------------------------------

/// A loaded NVRTC module and the functions taken from it so far.
struct LoadedModule {
    module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
}

/// One CUDA device: its context, the one stream all of its work goes to, the caching allocator, the cuBLAS
/// handle and the cuBLASLt handle (made on first use) and the NVRTC module cache. Get it with [`device`].
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    compute_capability: (u32, u32),
    multiprocessors: u32,
    total_memory: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pool: Arc<Allocator>,
    blas: OnceLock<std::result::Result<Mutex<Blas>, String>>,
    /// The cuBLASLt handle and its workspace, made on first use (blaslt.rs).
    pub(super) blas_lt: OnceLock<std::result::Result<Mutex<BlasLt>, String>>,
    /// The NVRTC modules, compiled and loaded once each (see modules.rs).
    modules: ModuleCache<LoadedModule>,
    staging: Mutex<Staging>,
    /// Blocks of a kernel one wave holds, by (module, kernel, threads a block): see [`CudaDevice::wave`].
    waves: Mutex<HashMap<(&'static str, String, u32), usize>>,
    /// The CUDA graph capture running on the stream, if any (graph.rs).
    capture: Mutex<Option<CaptureState>>,
}

/// Opened devices; never dropped, so each ordinal is opened once per process.
static DEVICES: Mutex<Vec<Arc<CudaDevice>>> = Mutex::new(Vec::new());

/// The device `ordinal`, opened on first use and shared afterwards. `Error::CudaUnavailable` (never a panic)
/// when libcuda is missing, there is no device, or the ordinal is out of range.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    let unavailable = |reason: String| Error::CudaUnavailable { ordinal, reason };
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = devices.iter().find(|d| d.ordinal == ordinal) {
        return Ok(d.clone());
    }
    let count = driver().map_err(unavailable)?.device_count;
    if ordinal >= count {
        return Err(unavailable(match count {
            0 => "the driver reports no CUDA device".into(),
            n => format!("only {n} CUDA device(s), numbered from 0"),
        }));
    }
    let dev = Arc::new(catch_panics("opening the device", || CudaDevice::open(ordinal)).map_err(unavailable)?);
    devices.push(dev.clone());
    Ok(dev)
}

impl CudaDevice {
    fn open(ordinal: usize) -> std::result::Result<CudaDevice, String> {
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("creating the context: {e:?}"))?;
        // SAFETY: no slice exists on this context yet, and all of its work goes to the one stream below, so
        // cudarc's cross-stream event tracking has nothing to order (see alloc.rs).
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own rather than the legacy default stream, which would synchronise with every other
        // blocking stream in the process (other libraries' included).
        let stream = ctx.new_stream().map_err(|e| format!("creating the stream: {e:?}"))?;
        let attr = |a: sys::CUdevice_attribute| {
            ctx.attribute(a).map(|v| v.max(0) as u32).map_err(|e| format!("reading {a:?}: {e:?}"))
        };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let multiprocessors = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1);
        let name = ctx.name().map_err(|e| format!("reading the name: {e:?}"))?;
        let total_memory = ctx.total_mem().map_err(|e| format!("reading the memory size: {e:?}"))?;
        Ok(CudaDevice {
            ordinal,
            name,
            compute_capability: (major, minor),
            multiprocessors,
            total_memory,
            pool: Arc::new(Allocator::new(stream.clone())),
            ctx,
            stream,
            blas: OnceLock::new(),
            blas_lt: OnceLock::new(),
            modules: ModuleCache::new(),
            staging: Mutex::new(Staging::new()),
            waves: Mutex::new(HashMap::new()),
            capture: Mutex::new(None),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor), e.g. (9, 0) for an H100.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.compute_capability
    }

    /// The NVRTC target for this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }

    pub fn multiprocessor_count(&self) -> u32 {
        self.multiprocessors
    }

    pub fn total_memory(&self) -> usize {
        self.total_memory
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op on this device enqueues its work on. Launch kernels here, nowhere else: the
    /// allocator's block reuse relies on it (see alloc.rs).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits until all work queued on this device has finished (for benches and timing; ops never need it).
    /// An error while a CUDA graph is being captured (a capture may not wait).
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_while_capturing("synchronize")?;
        self.stream.synchronize().or_cuda("synchronize")
    }

    /// `Error::Cuda` naming `op` when a capture is running: `op` would wait for the device.
    fn refuse_while_capturing(&self, op: &'static str) -> Result<()> {
        if self.is_capturing() {
            return Err(Error::Cuda {
                op,
                msg: "waits for the device, which a step being captured into a CUDA graph may not do (read \
                      results after replaying the graph instead)"
                    .into(),
            });
        }
        Ok(())
    }

    pub(super) fn capture_state(&self) -> MutexGuard<'_, Option<CaptureState>> {
        self.capture.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn pool(&self) -> &Arc<Allocator> {
        &self.pool
    }

    pub(crate) fn blas(&self) -> Result<&Mutex<Blas>> {
        self.blas
            .get_or_init(|| Blas::new(self))
            .as_ref()
            .map_err(|msg| Error::Cublas { op: "create", msg: msg.clone() })
    }

    // ---- memory ----

    /// An uninitialised buffer of `len` elements from the pool. Every element must be written before it is
    /// read (a reused block holds whatever its last owner left there).
    pub fn alloc<T>(&self, len: usize) -> Result<PooledSlice<T>> {
        self.pool.alloc(len)
    }

    /// As [`CudaDevice::alloc`], but during a graph capture never a block the capture has used before, so
    /// that no captured work writes it ahead of this point: for buffers whose values the host writes between
    /// replays (ops' fed masks). A block freed and reused within a capture would be rewritten by each replay.
    pub fn alloc_untouched<T>(&self, len: usize) -> Result<PooledSlice<T>> {
        self.pool.alloc_untouched(len)
    }

    /// A device copy of `host` (enqueued through pinned staging, so it does not wait for the device; the
    /// host slice may be dropped as soon as this returns).
    ///
    /// During a CUDA graph capture the copy is captured with its values (graph.rs): every replay copies the
    /// same bytes again.
    pub fn htod<T: DeviceRepr + Copy>(&self, host: &[T]) -> Result<PooledSlice<T>> {
        let mut out = self.alloc::<T>(host.len())?;
        if !host.is_empty() {
            let mut view = out.view_mut();
            let (dst, _record) = view.device_ptr_mut(&self.stream);
            self.upload(host, dst)?;
        }
        Ok(out)
    }

    /// Copies `host` into `dst[offset..offset + host.len()]` (stream ordered, through pinned staging like
    /// [`Self::htod`]): new values for a buffer that kernels or a CUDA graph keep using, such as a graphed
    /// step's batch. Out-of-range writes are refused.
    pub fn htod_into<T: DeviceRepr + Copy>(&self, host: &[T], dst: &mut PooledSlice<T>, offset: usize) -> Result<()> {
        let end = offset.checked_add(host.len()).filter(|&e| e <= dst.len()).ok_or_else(|| Error::Cuda {
            op: "htod_into",
            msg: format!("{} values at offset {offset} do not fit a buffer of {}", host.len(), dst.len()),
        })?;
        if host.is_empty() {
            return Ok(());
        }
        let mut view = dst.view_mut();
        let mut range = view.slice_mut(offset..end);
        let (ptr, _record) = range.device_ptr_mut(&self.stream);
        self.upload(host, ptr)
    }

    /// Enqueues the copy of `host` to `dst` (room for it is the caller's promise): through the staging ring,
    /// or, during a capture, from a page-locked copy owned by the capture.
    fn upload<T: Copy>(&self, host: &[T], dst: sys::CUdeviceptr) -> Result<()> {
        {
            let mut capture = self.capture_state();
            if let Some(state) = capture.as_mut() {
                self.ctx.bind_to_thread().or_cuda("htod")?;
                let frozen = FrozenUpload::new(host)?;
                // SAFETY: `frozen` holds host.len() values of T (made from `host` just above) and lives as long
                // as the graph (it moves into the CapturedGraph), so every replay of the captured copy reads
                // it; `dst` has room for them (caller). Captured, not run: the copy happens at each replay.
                unsafe { result::memcpy_htod_async(dst, frozen.as_slice::<T>(host.len()), self.stream.cu_stream()) }
                    .or_cuda("htod (captured)")?;
                state.uploads.push(frozen);
                return Ok(());
            }
        }
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        staging.upload(&self.ctx, &self.stream, host, dst)
    }

    /// The elements of `src` on the host. Waits for the stream: the only synchronising copy.
    pub fn dtoh<T: DeviceRepr + Default + Clone, S: DevicePtr<T>>(&self, src: &S) -> Result<Vec<T>> {
        self.refuse_while_capturing("dtoh")?;
        let mut host = vec![T::default(); src.len()];
        if !host.is_empty() {
            self.stream.memcpy_dtoh(src, &mut host).or_cuda("dtoh")?;
        }
        // A copy into pageable memory has already completed when the call returns, but waiting explicitly does
        // not rely on that, and surfaces errors of earlier asynchronous work here.
        self.synchronize()?;
        Ok(host)
    }

    /// What the caching allocator holds on this device.
    pub fn memory_stats(&self) -> MemoryStats {
        self.pool.stats()
    }

    /// Restarts the peak from what is in use now.
    pub fn reset_peak(&self) {
        self.pool.reset_peak()
    }

    /// Gives every cached (free) block back to the driver. Waits for the stream first.
    pub fn empty_cache(&self) -> Result<()> {
        self.pool.empty_cache()
    }

    // ---- kernels ----

    /// A launch configuration for a grid-stride kernel over `n` elements: 256 threads a block, and no more
    /// blocks than fill the device (8 per multiprocessor); each thread then loops over several elements.
    pub fn launch_config(&self, n: usize) -> LaunchConfig {
        const THREADS: u32 = 256;
        const BLOCKS_PER_SM: usize = 8;
        let max_blocks = self.multiprocessors as usize * BLOCKS_PER_SM;
        let blocks = n.div_ceil(THREADS as usize).clamp(1, max_blocks);
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// The kernel `name` of `module`. The first call for a module on this device compiles `source` with NVRTC
    /// for this device's architecture and loads it; later calls return the cached function. When a
    /// [`Self::precompile`] is compiling the module at that moment, this waits for that compile instead of
    /// starting another. Module names are process-wide: one name, one source. A compile failure is
    /// `Error::Nvrtc` carrying NVRTC's full log.
    pub fn function(&self, module: &'static str, source: &'static str, name: &str) -> Result<CudaFunction> {
        let missing =
            |why: String| Error::Cuda { op: "function", msg: format!("module '{module}': kernel '{name}': {why}") };
        let compile = |m: &'static str, src: &'static str| nvrtc::compile(m, src, &self.arch());
        self.modules.with(module, source, &compile, &|m, image| self.load_module(m, image), |loaded| {
            if let Some(f) = loaded.functions.get(name) {
                return Ok(f.clone());
            }
            if name.contains('\0') {
                return Err(missing("the name contains a NUL byte".into()));
            }
            let f = loaded.module.load_function(name).map_err(|e| missing(format!("{e:?}")))?;
            loaded.functions.insert(name.to_string(), f.clone());
            Ok(f)
        })
    }

    /// Compiles every module of `modules` (name, full source, exactly as later passed to [`Self::function`])
    /// that is not loaded on this device yet, all at once, one thread each (NVRTC is thread-safe for distinct
    /// programs), then loads them on the calling thread. Afterwards `function` finds them loaded and compiles
    /// nothing. A module already being compiled (by `function` or another precompile) is waited for, not
    /// compiled again; no lock is held while compiling. Returns the first error (an `Error::Nvrtc` with the
    /// log for a module that does not compile) after trying every module; the others are loaded all the same.
    pub fn precompile(&self, modules: &[(&'static str, &'static str)]) -> Result<()> {
        let arch = self.arch();
        let compile = |m: &'static str, src: &'static str| nvrtc::compile(m, src, &arch);
        self.modules.precompile(modules, &compile, &|m, image| self.load_module(m, image))
    }

    /// [`Self::precompile`] on a thread of its own, returning at once: start it before building the data and
    /// the model, and their time hides the compiles. A kernel asked for meanwhile waits only for its own
    /// module's compile (or compiles it, if the precompile has not got to it yet). Join the handle for the
    /// outcome, or drop it: a module that failed to compile fails again, with the log, when it is needed.
    pub fn precompile_in_background(
        self: &Arc<Self>,
        modules: Vec<(&'static str, &'static str)>,
    ) -> Result<std::thread::JoinHandle<Result<()>>> {
        let dev = self.clone();
        std::thread::Builder::new()
            .name(format!("precompile cuda:{}", self.ordinal))
            .spawn(move || dev.precompile(&modules))
            .map_err(|e| Error::Msg { context: "precompile", msg: format!("starting the thread: {e}") })
    }

    /// Whether module `module` is loaded on this device.
    pub fn is_loaded(&self, module: &str) -> bool {
        self.modules.is_loaded(module)
    }

    /// How many times module `module` has been compiled for this device (for tests and diagnostics: 1 once
    /// it is loaded, however many threads asked for it, unless a compile failed).
    pub fn compile_count(&self, module: &str) -> usize {
        self.modules.compile_count(module)
    }

    /// The blocks of one full wave of kernel `name` of `module` (`f`, as [`Self::function`] returned it for
    /// that very symbol, dtype suffix included: `_f32` and `_f64` twins differ in registers) at `threads`
    /// threads a block: multiprocessors x the blocks one multiprocessor holds at once, which the
    /// driver's occupancy calculator works out from the kernel's registers and shared memory. Asked once per
    /// kernel and block size. A grid-stride kernel launched with at most this many blocks runs them all at
    /// once, so none waits for another to finish.
    pub fn wave(&self, module: &'static str, name: &str, f: &CudaFunction, threads: u32) -> Result<usize> {
        let mut waves = self.waves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&w) = waves.get(&(module, name.to_string(), threads)) {
            return Ok(w);
        }
        let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(threads, 0, None).or_cuda("occupancy")?;
        let w = self.multiprocessors as usize * per_sm.max(1) as usize;
        waves.insert((module, name.to_string(), threads), w);
        Ok(w)
    }

    fn load_module(&self, module: &'static str, image: &[u8]) -> Result<LoadedModule> {
        let loaded = self
            .ctx
            .load_module(Ptx::from_binary(image.to_vec()))
            .map_err(|e| Error::Cuda { op: "load_module", msg: format!("module '{module}': {e:?}") })?;
        Ok(LoadedModule { module: loaded, functions: HashMap::new() })
    }
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaDevice(cuda:{}, {}, sm_{}{}, {} SMs, {:.1} GiB)",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_memory as f64 / (1u64 << 30) as f64
        )
    }
}
