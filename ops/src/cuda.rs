//! What the families' CUDA paths share: the kernel sources (engine prelude + math prelude + the family's
//! .cu), a typed function lookup, and the error mapping of launches.
//!
//! Every op enqueues on its device's one stream and returns; nothing here waits for the device.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use engine::cuda::{kernel_name, CudaDevice, CudaFunction, CudaStorage, CudaView, LaunchArgs, Strided};
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family's kernels compile with NVRTC for the H100 (sm_90). Needs libnvrtc, not a GPU: with
    /// `LD_LIBRARY_PATH` pointing at an NVRTC (e.g. from the `nvidia-cuda-nvrtc` wheel) this runs anywhere.
    #[test]
    fn every_module_compiles_for_sm_90() {
        if !engine::cuda::nvrtc_available() {
            if engine::cuda::require_cuda() {
                panic!("MILA_REQUIRE_CUDA=1 but libnvrtc cannot be loaded");
            }
            eprintln!("skipping every_module_compiles_for_sm_90: libnvrtc not found");
            return;
        }
        for m in [
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
        ] {
            if let Err(e) = engine::cuda::compile(m.name, source(m), "sm_90") {
                panic!("{e}");
            }
        }
    }
}
