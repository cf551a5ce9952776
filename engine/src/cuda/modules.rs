//! The module cache of a [`super::CudaDevice`]: each kernel module compiled by NVRTC once and loaded once,
//! whether it is first needed by a kernel lookup or compiled ahead of use by a precompile, on any thread.
//!
//! A module's name maps to one [`Slot`]:
//!
//! - `Compiling(c)`: someone needs the module and nobody has loaded it yet. `c.image` is a `OnceLock`, so
//!   the source is compiled exactly once, by the first thread that calls `get_or_init` on it (a precompile
//!   worker, or the thread that needs a kernel, whichever comes first); every other thread that needs the
//!   module blocks in `get_or_init` until that compile ends and then shares its result. No lock is held
//!   while compiling.
//! - `Loaded`: the image has been loaded. Slots only move from `Compiling` to `Loaded`, under the lock, and
//!   only the thread that finds its very `Compiling` slot (pointer equality) still in place loads it: so a
//!   module is loaded once, and a thread that comes second finds it loaded and keeps that one.
//!
//! A failed compile or load removes the slot (the error goes to every thread that waited on it; a later
//! request compiles again), so a failure is reported, never cached and never a panic. One name, one source:
//! a request whose source differs from the slot's is an error.
//!
//! The cache is generic over the loaded module and takes the compiler and the loader as arguments, so that
//! its concurrency can be tested on the host, without a device (see the tests below).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::{Error, Result};

/// Compiles a module (name, full source) to an image: a CUBIN. Shared by the precompile threads.
pub(crate) type Compiler<'a> = dyn Fn(&'static str, &'static str) -> Result<Vec<u8>> + Sync + 'a;

/// Loads a module's image (name, image) on the device.
pub(crate) type Loader<'a, M> = dyn Fn(&'static str, &[u8]) -> Result<M> + 'a;

/// One compile of one module's source, shared by every thread that needs it.
struct Compile {
    source: &'static str,
    /// The image, or the compile's error as text (`Error` is not `Clone`): set once, by whoever comes first.
    image: OnceLock<std::result::Result<Vec<u8>, String>>,
}

enum Slot<M> {
    Compiling(Arc<Compile>),
    Loaded { source: &'static str, module: M },
}

pub(crate) struct ModuleCache<M> {
    slots: Mutex<HashMap<&'static str, Slot<M>>>,
    /// NVRTC compiles run so far, by module (for tests and diagnostics: one per module unless one failed).
    compiles: Mutex<HashMap<&'static str, usize>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pointer equality first: the same `&'static str` every time is the normal case.
fn same_source(name: &'static str, had: &'static str, source: &'static str) -> Result<()> {
    if std::ptr::eq(had, source) || had == source {
        Ok(())
    } else {
        Err(Error::Cuda { op: "function", msg: format!("module '{name}' was already loaded from a different source") })
    }
}

/// A compile's outcome as our error. The compiler's errors are `Error::Nvrtc` (see nvrtc.rs); keep the log.
fn compile_error(name: &'static str, log: &str) -> Error {
    Error::Nvrtc { module: name, log: log.to_string() }
}

impl<M> ModuleCache<M> {
    pub(crate) fn new() -> Self {
        ModuleCache { slots: Mutex::new(HashMap::new()), compiles: Mutex::new(HashMap::new()) }
    }

    /// Runs `f` on module `name`, compiling (or waiting for the compile already under way) and loading it
    /// first if it is not loaded yet. `f` runs under the cache's lock: keep it short.
    pub(crate) fn with<R>(
        &self,
        name: &'static str,
        source: &'static str,
        compile: &Compiler<'_>,
        load: &Loader<'_, M>,
        f: impl FnOnce(&mut M) -> Result<R>,
    ) -> Result<R> {
        let c = {
            let mut slots = lock(&self.slots);
            match slots.entry(name) {
                Entry::Occupied(e) => match e.into_mut() {
                    Slot::Loaded { source: had, module } => {
                        same_source(name, had, source)?;
                        return f(module);
                    }
                    Slot::Compiling(c) => {
                        same_source(name, c.source, source)?;
                        c.clone()
                    }
                },
                Entry::Vacant(v) => {
                    let c = Arc::new(Compile { source, image: OnceLock::new() });
                    v.insert(Slot::Compiling(c.clone()));
                    c
                }
            }
        };
        self.finish(name, &c, compile, load)?;
        let mut slots = lock(&self.slots);
        match slots.get_mut(name) {
            Some(Slot::Loaded { source: had, module }) => {
                same_source(name, had, source)?;
                f(module)
            }
            // `finish` returned Ok, so the slot was loaded, and a loaded slot is never removed.
            _ => {
                Err(Error::Cuda { op: "function", msg: format!("module '{name}': internal: not loaded after loading") })
            }
        }
    }

    /// Compiles every module of `modules` (name, full source) that is not loaded yet, each on a thread of its
    /// own, then loads them on the calling thread. Returns once all are loaded, or the first error (after
    /// trying every module). A module whose compile is already under way is waited for, not compiled again.
    pub(crate) fn precompile(
        &self,
        modules: &[(&'static str, &'static str)],
        compile: &Compiler<'_>,
        load: &Loader<'_, M>,
    ) -> Result<()>
    where
        M: Send,
    {
        let mut first_error: Option<Error> = None;
        let mut pending: Vec<(&'static str, Arc<Compile>)> = Vec::new();
        {
            let mut slots = lock(&self.slots);
            for &(name, source) in modules {
                let claimed = match slots.entry(name) {
                    Entry::Occupied(e) => match e.into_mut() {
                        Slot::Loaded { source: had, .. } => same_source(name, had, source),
                        Slot::Compiling(c) => {
                            same_source(name, c.source, source).map(|()| pending.push((name, c.clone())))
                        }
                    },
                    Entry::Vacant(v) => {
                        let c = Arc::new(Compile { source, image: OnceLock::new() });
                        v.insert(Slot::Compiling(c.clone()));
                        pending.push((name, c));
                        Ok(())
                    }
                };
                if let Err(e) = claimed {
                    first_error.get_or_insert(e);
                }
            }
        }
        // The compiles, concurrently and without the lock (NVRTC is thread-safe for distinct programs). A
        // thread that cannot be started leaves its module to `finish` below, which compiles it here.
        std::thread::scope(|s| {
            for (name, c) in &pending {
                let _ = std::thread::Builder::new().name(format!("nvrtc {name}")).spawn_scoped(s, || {
                    self.compile_once(name, c, compile);
                });
            }
        });
        for (name, c) in &pending {
            if let Err(e) = self.finish(name, c, compile, load) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `c`'s image: compiled here if nobody has started it, else waited for.
    fn compile_once<'c>(
        &self,
        name: &'static str,
        c: &'c Compile,
        compile: &Compiler<'_>,
    ) -> &'c std::result::Result<Vec<u8>, String> {
        c.image.get_or_init(|| {
            *lock(&self.compiles).entry(name).or_insert(0) += 1;
            compile(name, c.source).map_err(|e| match e {
                Error::Nvrtc { log, .. } => log,
                other => other.to_string(),
            })
        })
    }

    /// Compiles (or waits for) `c`, then loads its image into the cache under the lock, unless another
    /// thread that shared the compile loaded it first.
    fn finish(&self, name: &'static str, c: &Arc<Compile>, compile: &Compiler<'_>, load: &Loader<'_, M>) -> Result<()> {
        let image = self.compile_once(name, c, compile);
        let mut slots = lock(&self.slots);
        match slots.get(name) {
            Some(Slot::Compiling(current)) if Arc::ptr_eq(current, c) => {}
            // Loaded by a thread that waited on the same compile: keep that one.
            Some(Slot::Loaded { .. }) => return Ok(()),
            // The compile or the load failed and the thread that saw it first removed the slot.
            _ => {
                return Err(match image {
                    Err(log) => compile_error(name, log),
                    Ok(_) => Error::Cuda { op: "load_module", msg: format!("module '{name}': loading failed") },
                })
            }
        }
        let loaded = match image {
            Err(log) => Err(compile_error(name, log)),
            Ok(bytes) => load(name, bytes),
        };
        match loaded {
            Ok(module) => {
                slots.insert(name, Slot::Loaded { source: c.source, module });
                Ok(())
            }
            Err(e) => {
                // Not kept: the next request compiles again.
                slots.remove(name);
                Err(e)
            }
        }
    }

    /// Whether module `name` is loaded.
    pub(crate) fn is_loaded(&self, name: &str) -> bool {
        matches!(lock(&self.slots).get(name), Some(Slot::Loaded { .. }))
    }

    /// How many times module `name` has been compiled.
    pub(crate) fn compile_count(&self, name: &str) -> usize {
        lock(&self.compiles).get(name).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    //! The cache's concurrency on the host: a fake compiler that sleeps and counts, and a fake loader.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::time::Duration;

    use super::*;

    /// A "module": its image as loaded, and which load of the cache made it.
    #[derive(Debug)]
    struct Fake {
        image: Vec<u8>,
        load: usize,
    }

    /// Compiles a source to its bytes after `delay`; a source containing "broken" fails with a log naming it.
    fn compiler(delay: Duration) -> impl Fn(&'static str, &'static str) -> Result<Vec<u8>> + Sync {
        move |name, source| {
            std::thread::sleep(delay);
            if source.contains("broken") {
                Err(Error::Nvrtc { module: name, log: format!("error: {source}") })
            } else {
                Ok(source.as_bytes().to_vec())
            }
        }
    }

    struct Loads(AtomicUsize);

    impl Loads {
        fn new() -> Self {
            Loads(AtomicUsize::new(0))
        }
        fn load(&self, _: &'static str, image: &[u8]) -> Result<Fake> {
            Ok(Fake { image: image.to_vec(), load: self.0.fetch_add(1, Ordering::SeqCst) })
        }
        fn loads(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn image(cache: &ModuleCache<Fake>, name: &'static str, source: &'static str) -> Result<Vec<u8>> {
        let (compile, loader) = (compiler(Duration::ZERO), Loads::new());
        cache.with(name, source, &compile, &|n, i| loader.load(n, i), |m| Ok(m.image.clone()))
    }

    const MODULES: [(&str, &str); 4] = [("a", "source a"), ("b", "source b"), ("c", "source c"), ("d", "source d")];

    #[test]
    fn precompiled_modules_are_loaded_once_and_not_compiled_again() {
        let cache = ModuleCache::new();
        let (compile, loader) = (compiler(Duration::from_millis(20)), Loads::new());
        cache.precompile(&MODULES, &compile, &|n, i| loader.load(n, i)).unwrap();
        assert_eq!(loader.loads(), MODULES.len());
        for (name, source) in MODULES {
            assert!(cache.is_loaded(name));
            assert_eq!(cache.compile_count(name), 1, "{name}");
            assert_eq!(image(&cache, name, source).unwrap(), source.as_bytes());
            assert_eq!(cache.compile_count(name), 1, "{name}: found loaded, not compiled again");
        }
        // Again: nothing to do.
        cache.precompile(&MODULES, &compile, &|n, i| loader.load(n, i)).unwrap();
        assert_eq!(loader.loads(), MODULES.len());
        assert!(MODULES.iter().all(|(name, _)| cache.compile_count(name) == 1));
    }

    #[test]
    fn the_compiles_run_concurrently() {
        let cache = ModuleCache::new();
        // Every compile waits for all the others to have started: this returns only if they run at once.
        let barrier = Barrier::new(MODULES.len());
        let compile = |_: &'static str, source: &'static str| {
            barrier.wait();
            Ok(source.as_bytes().to_vec())
        };
        let loader = Loads::new();
        cache.precompile(&MODULES, &compile, &|n, i| loader.load(n, i)).unwrap();
        assert!(MODULES.iter().all(|(name, _)| cache.is_loaded(name)));
    }

    #[test]
    fn a_module_requested_concurrently_is_compiled_and_loaded_once() {
        let cache = ModuleCache::new();
        let (compile, loader) = (compiler(Duration::from_millis(50)), Loads::new());
        let load = |n: &'static str, i: &[u8]| loader.load(n, i);
        // Two precompiles of overlapping sets (one listing a module twice) and lookups, all at once.
        std::thread::scope(|s| {
            s.spawn(|| cache.precompile(&MODULES, &compile, &load).unwrap());
            s.spawn(|| cache.precompile(&[MODULES[1], MODULES[0], MODULES[1]], &compile, &load).unwrap());
            for _ in 0..4 {
                s.spawn(|| {
                    for (name, source) in MODULES.iter().rev() {
                        let got = cache.with(name, source, &compile, &load, |m| Ok(m.load)).unwrap();
                        assert!(got < MODULES.len());
                    }
                });
            }
        });
        assert_eq!(loader.loads(), MODULES.len(), "each module loaded once");
        for (name, _) in MODULES {
            assert_eq!(cache.compile_count(name), 1, "{name} compiled once");
        }
    }

    #[test]
    fn a_lookup_waits_for_the_compile_under_way() {
        let cache = ModuleCache::new();
        let (slow, loader) = (compiler(Duration::from_millis(200)), Loads::new());
        let calls = AtomicUsize::new(0);
        let counting = |name, source| {
            calls.fetch_add(1, Ordering::SeqCst);
            slow(name, source)
        };
        std::thread::scope(|s| {
            s.spawn(|| cache.precompile(&MODULES[..1], &counting, &|n, i| loader.load(n, i)).unwrap());
            // Let the precompile claim the module, then ask for it with a compiler that must not be called.
            while cache.compile_count("a") == 0 {
                std::thread::yield_now();
            }
            let never = |_: &'static str, _: &'static str| -> Result<Vec<u8>> { panic!("compiled a second time") };
            let got = cache.with("a", "source a", &never, &|n, i| loader.load(n, i), |m| Ok(m.image.clone())).unwrap();
            assert_eq!(got, b"source a");
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(loader.loads(), 1);
    }

    #[test]
    fn a_failed_compile_is_reported_to_every_waiter_and_tried_again_later() {
        let cache = ModuleCache::new();
        let (compile, loader) = (compiler(Duration::from_millis(20)), Loads::new());
        let modules = [("good", "source good"), ("bad", "broken source")];
        match cache.precompile(&modules, &compile, &|n, i| loader.load(n, i)) {
            Err(Error::Nvrtc { module, log }) => {
                assert_eq!(module, "bad");
                assert!(log.contains("broken source"), "{log}");
            }
            other => panic!("expected the NVRTC error, got {other:?}"),
        }
        assert!(cache.is_loaded("good"), "the other modules load all the same");
        assert!(!cache.is_loaded("bad"));
        assert_eq!(cache.compile_count("bad"), 1);
        // Not cached: asked again, it is compiled again (and fails again).
        assert!(matches!(image(&cache, "bad", "broken source"), Err(Error::Nvrtc { module: "bad", .. })));
        assert_eq!(cache.compile_count("bad"), 2);
    }

    #[test]
    fn a_failed_load_is_reported_and_not_kept() {
        let cache: ModuleCache<Fake> = ModuleCache::new();
        let compile = compiler(Duration::ZERO);
        let failing =
            |_: &'static str, _: &[u8]| -> Result<Fake> { Err(Error::Cuda { op: "load_module", msg: "no".into() }) };
        assert!(matches!(cache.precompile(&MODULES[..1], &compile, &failing), Err(Error::Cuda { .. })));
        assert!(!cache.is_loaded("a"));
        assert_eq!(image(&cache, "a", "source a").unwrap(), b"source a");
    }

    #[test]
    fn one_name_one_source() {
        let cache = ModuleCache::new();
        assert!(image(&cache, "a", "source a").is_ok());
        assert!(matches!(image(&cache, "a", "another source"), Err(Error::Cuda { .. })));
        let (compile, loader) = (compiler(Duration::ZERO), Loads::new());
        let clash =
            cache.precompile(&[("a", "another source"), ("b", "source b")], &compile, &|n, i| loader.load(n, i));
        assert!(matches!(clash, Err(Error::Cuda { .. })));
        assert!(cache.is_loaded("b"), "the other modules load all the same");
        assert_eq!(image(&cache, "a", "source a").unwrap(), b"source a", "the first source stays");
    }

    /// With the real compiler (NVRTC, no device needed) and a loader that keeps the image: modules compiled
    /// concurrently give the same CUBINs as one at a time, and a broken one reports NVRTC's log.
    #[test]
    fn nvrtc_compiles_concurrently() {
        if !crate::cuda::nvrtc_available() {
            if crate::cuda::require_cuda() {
                panic!("MILA_REQUIRE_CUDA=1 but libnvrtc cannot be loaded");
            }
            eprintln!("skipping nvrtc_compiles_concurrently: libnvrtc not found");
            return;
        }
        const K1: &str = "extern \"C\" __global__ void k1(float* x) { x[threadIdx.x] *= 2.0f; }";
        const K2: &str = "extern \"C\" __global__ void k2(double* x) { x[threadIdx.x] += 1.0; }";
        const BAD: &str = "extern \"C\" __global__ void k3(float* x) { x[0] = no_such_name; }";
        let mut modules = crate::cuda::MODULES.to_vec();
        modules.extend([("test_k1", K1), ("test_k2", K2), ("test_bad", BAD)]);
        let cache: ModuleCache<Vec<u8>> = ModuleCache::new();
        let compile = |name: &'static str, source: &'static str| crate::cuda::compile(name, source, "sm_90");
        let keep = |_: &'static str, image: &[u8]| Ok(image.to_vec());
        match cache.precompile(&modules, &compile, &keep) {
            Err(Error::Nvrtc { module: "test_bad", log }) => assert!(log.contains("no_such_name"), "{log}"),
            other => panic!("expected test_bad's NVRTC error, got {other:?}"),
        }
        for &(name, source) in &modules[..modules.len() - 1] {
            let image = cache.with(name, source, &compile, &keep, |m| Ok(m.clone())).unwrap();
            assert_eq!(cache.compile_count(name), 1, "{name}");
            assert_eq!(image, compile(name, source).unwrap(), "{name}: the same CUBIN as compiled alone");
        }
    }
}
