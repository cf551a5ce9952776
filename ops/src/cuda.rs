//! What the families' CUDA paths share: the kernel sources (engine prelude + math prelude + the family's
//! .cu), a typed function lookup, and the error mapping of launches; and [`precompile`], which compiles
//! every module ahead of use.
//!
//! Every op enqueues on its device's one stream and returns; nothing here waits for the device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use engine::cuda::{kernel_name, CudaDevice, CudaFunction, CudaStorage, CudaView, LaunchArgs, LaunchConfig, Strided};
use engine::{Error, Float, Layout, Result};

/// A family's kernels: a module name (unique in the process) and its .cu body.
pub(crate) struct Module {
    pub name: &'static str,
    pub body: &'static str,
}

const MATH_PRELUDE: &str = include_str!("prelude.cuh");

/// The full source of `m`, assembled once per process (NVRTC compiles it once per device).
pub(crate) fn source(m: &Module) -> &'static str {
    static SOURCES: OnceLock<Mutex<HashMap<&'static str, &'static str>>> = OnceLock::new();
    let mut sources = SOURCES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    sources.entry(m.name).or_insert_with(|| {
        // Leaked once per module: the device's module cache holds `&'static str` sources.
        Box::leak(format!("{}\n{}\n{}", engine::cuda::PRELUDE, MATH_PRELUDE, m.body).into_boxed_str())
    })
}

/// Every family's kernels.
pub(crate) const MODULES: [&Module; 11] = [
    &crate::elementwise::cuda::MODULE,
    &crate::reduce::cuda::MODULE,
    &crate::copy::cuda::MODULE,
    &crate::shape::cuda::MODULE,
    &crate::optim::cuda::MODULE,
    &crate::scan::cuda::MODULE,
    &crate::conv::cuda::MODULE,
    &crate::norm::cuda::MODULE,
    &crate::rope::cuda::MODULE,
    &crate::regularize::cuda::MODULE,
    &crate::linattn::cuda::MODULE,
];

/// Every kernel module the engine and ops load, as (name, full source), the sources being the very strings
/// the kernel lookups pass (so that the device's cache, which holds one source per name, accepts them).
pub fn modules() -> Vec<(&'static str, &'static str)> {
    let ops = MODULES.iter().map(|m| (m.name, source(m)));
    engine::cuda::MODULES.iter().copied().chain(ops).collect()
}

/// Compiles every module of [`modules`] not loaded on `dev` yet, all at once (one thread each), and loads
/// them: afterwards no op compiles anything on this device. See [`CudaDevice::precompile`].
pub fn precompile(dev: &CudaDevice) -> Result<()> {
    dev.precompile(&modules())
}

/// [`precompile`] on a thread of its own, returning at once; an op that needs a module meanwhile waits for
/// that module's compile only. See [`CudaDevice::precompile_in_background`].
pub fn precompile_in_background(dev: &Arc<CudaDevice>) -> Result<JoinHandle<Result<()>>> {
    dev.precompile_in_background(modules())
}

/// The kernel `<base>_<dtype of T>` of module `m` on `dev`.
pub(crate) fn function<T: Float>(dev: &CudaDevice, m: &Module, base: &str) -> Result<CudaFunction> {
    dev.function(m.name, source(m), &kernel_name::<T>(base))
}

/// A CUDA tensor as kernels see it: its storage and its layout.
pub(crate) type View<'a> = (&'a CudaStorage, &'a Layout);

/// A contiguous view's elements as a range of its buffer, so that kernels index them from 0.
pub(crate) fn elements<'a, T: Float>(op: &'static str, (s, layout): View<'a>) -> Result<CudaView<'a, T>> {
    if !layout.is_contiguous() {
        return Err(Error::invalid(op, "internal: kernel input is not contiguous", layout.shape()));
    }
    let (start, n) = (layout.offset(), layout.numel());
    s.slice::<T>()?
        .try_slice(start..start + n)
        .ok_or_else(|| Error::invalid(op, "internal: view exceeds its storage", layout.shape()))
}

/// The (pointer, view, flag) a kernel takes for an optional operand (a bias, a norm's weight): its whole
/// buffer and checked `Strided`, or `fallback` with an empty view and flag 0, in which case the kernel never
/// reads it.
pub(crate) fn optional<'a, T: Float>(
    op: &'static str,
    v: Option<View<'a>>,
    fallback: &CudaView<'a, T>,
) -> Result<(CudaView<'a, T>, Strided, i32)> {
    match v {
        Some((s, l)) => Ok((s.slice::<T>()?.as_view(), s.strided(op, l)?, 1)),
        None => Ok((fallback.slice(..), Strided::new(&Layout::contiguous(&[0]))?, 0)),
    }
}

/// Launches `args` over a grid-stride configuration for `n` elements.
///
/// # Safety
/// The kernel's parameter list must match the arguments pushed, and every index it computes from `n` and
/// the `Strided` views must lie inside the buffers passed (true for views of valid layouts, which ops
/// build only through the engine's checked layout methods).
pub(crate) unsafe fn launch(op: &'static str, dev: &CudaDevice, mut args: LaunchArgs<'_>, n: usize) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { args.launch(dev.launch_config(n)) }.map(|_| ()).map_err(|e| Error::Cuda { op, msg: format!("{e:?}") })
}

/// Launches `args` on a one-dimensional grid of `blocks` blocks of `threads` threads with `shared` bytes of
/// dynamic shared memory (kernels whose plans size their own grids).
///
/// # Safety
/// As [`launch`].
pub(crate) unsafe fn launch_1d(
    op: &'static str,
    mut args: LaunchArgs<'_>,
    blocks: usize,
    threads: usize,
    shared: usize,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    // SAFETY: forwarded to the caller.
    unsafe { args.launch(cfg) }.map(|_| ()).map_err(|e| Error::Cuda { op, msg: format!("{e:?}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family's kernels compile with NVRTC for the H100 (sm_90), all at once on threads of their own
    /// as [`precompile`] compiles them. Needs libnvrtc, not a GPU: with `LD_LIBRARY_PATH` pointing at an
    /// NVRTC (e.g. from the `nvidia-cuda-nvrtc` wheel) this runs anywhere.
    #[test]
    fn every_module_compiles_for_sm_90() {
        if !engine::cuda::nvrtc_available() {
            if engine::cuda::require_cuda() {
                panic!("MILA_REQUIRE_CUDA=1 but libnvrtc cannot be loaded");
            }
            eprintln!("skipping every_module_compiles_for_sm_90: libnvrtc not found");
            return;
        }
        let all = modules();
        assert_eq!(all.len(), engine::cuda::MODULES.len() + MODULES.len());
        let started = std::time::Instant::now();
        let results: Vec<(Result<Vec<u8>>, f64)> = std::thread::scope(|s| {
            let handles: Vec<_> = all
                .iter()
                .map(|&(name, src)| {
                    s.spawn(move || {
                        let t = std::time::Instant::now();
                        (engine::cuda::compile(name, src, "sm_90"), t.elapsed().as_secs_f64())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("a compile thread panicked")).collect()
        });
        // With --nocapture: each module's compile time (the longest bounds a precompile's wall time).
        eprintln!("compiled {} modules concurrently in {:.2} s:", all.len(), started.elapsed().as_secs_f64());
        for ((name, _), (r, seconds)) in all.iter().zip(results) {
            match r {
                Ok(cubin) => eprintln!("  {name:<16} {seconds:>6.2} s {:>9} bytes", cubin.len()),
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// The sources [`modules`] lists are the very strings the kernel lookups pass, and each name is listed once.
    #[test]
    fn the_precompile_list_matches_the_lookups() {
        let all = modules();
        for m in MODULES {
            let (_, listed) = all.iter().find(|(name, _)| *name == m.name).expect(m.name);
            assert!(std::ptr::eq(*listed, source(m)), "{}: the same leaked string", m.name);
        }
        let mut names: Vec<&str> = all.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "one entry per module");
    }

    /// After [`precompile`], every module is loaded, each compiled once, and looking up a kernel of each
    /// compiles nothing more (nor fails the one-name-one-source check). A second precompile, racing a
    /// third, changes nothing.
    #[test]
    fn precompile_loads_every_module_once() {
        let Some(dev) = engine::cuda::test_device_or_skip("precompile_loads_every_module_once") else { return };
        precompile(&dev).unwrap();
        // One kernel of each module.
        let kernels = [
            ("engine_storage", "fill_f32"),
            ("ops_elementwise", "binary_fwd_add_f32"),
            ("ops_reduce", "max_bwd_f32"),
            ("ops_copy", "copy_strided_f32"),
            ("ops_shape", "index_select_f32"),
            ("ops_optim", "sgd_step_f32"),
            ("ops_scan", "scan_bwd_sum_f32"),
            ("ops_conv", "dw_fwd_f32"),
            ("ops_norm", "bn_bwd_f32"),
            ("ops_rope", "rope_f32"),
            ("ops_regularize", "scale_blocks_f32"),
            ("ops_linattn", "linattn_fwd_out_d32_f32"),
        ];
        let all = modules();
        assert_eq!(kernels.len(), all.len());
        for (name, source) in &all {
            assert!(dev.is_loaded(name), "{name} loaded");
            assert_eq!(dev.compile_count(name), 1, "{name} compiled once");
            let (_, kernel) = kernels.iter().find(|(m, _)| m == name).expect(name);
            if let Err(e) = dev.function(name, source, kernel) {
                panic!("{name}: {kernel}: {e}");
            }
            assert_eq!(dev.compile_count(name), 1, "{name}: the lookup compiled nothing");
        }
        let again = dev.precompile_in_background(all.clone()).unwrap();
        precompile(&dev).unwrap();
        again.join().unwrap().unwrap();
        assert!(all.iter().all(|(name, _)| dev.compile_count(name) == 1));
    }
}
