//! CUDA optimizer updates (optim.cu): one grid-stride kernel per rule, updating the parameter and its state
//! in place. The callers hold the write locks of every tensor written, so the kernels write through the
//! buffers' shared slices (cudarc does not tell reads from writes once event tracking is off).

use engine::cuda::{CudaStorage, DeviceRepr, PushKernelArg};
use engine::{DType, Float, Layout, Result};

use super::{AdamWStep, SgdStep};
use crate::cuda::{elements, function, launch, Module};

pub(crate) const MODULE: Module = Module { name: "ops_optim", body: include_str!("optim.cu") };

/// `struct SgdParams` of optim.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SgdParams {
    lr: f64,
    momentum: f64,
    one_minus_dampening: f64,
    weight_decay: f64,
    use_momentum: i32,
    nesterov: i32,
    first: i32,
    /// Explicit padding to a multiple of 8 bytes, so that no byte handed to the driver is uninitialised.
    pad: i32,
}

/// `struct AdamWParams` of optim.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AdamWParams {
    step_size: f64,
    decay: f64,
    beta1: f64,
    one_minus_beta1: f64,
    beta2: f64,
    one_minus_beta2: f64,
    bc2_sqrt: f64,
    eps: f64,
    amsgrad: i32,
    pad: i32,
}

// The .cu side checks the same sizes with static_asserts.
const _: () = assert!(std::mem::size_of::<SgdParams>() == 48);
const _: () = assert!(std::mem::size_of::<AdamWParams>() == 72);

// SAFETY: plain f64 and i32 fields in C layout with explicit padding, the layouts of the structs in optim.cu.
unsafe impl DeviceRepr for SgdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamWParams {}

type Mut<'a> = (&'a mut CudaStorage, &'a Layout);
type Ref<'a> = (&'a CudaStorage, &'a Layout);

/// One SGD step in place on p and buf (`buf` untouched when momentum is 0).
pub(super) fn sgd(p: Mut, g: Ref, buf: Mut, h: SgdStep) -> Result<()> {
    fn run<T: Float>(p: Mut, g: Ref, buf: Mut, h: SgdStep) -> Result<()> {
        const OP: &str = "sgd_step";
        let n = p.1.numel();
        if n == 0 {
            return Ok(());
        }
        let dev = p.0.device().clone();
        let params = SgdParams {
            lr: h.lr,
            momentum: h.momentum,
            one_minus_dampening: 1.0 - h.dampening,
            weight_decay: h.weight_decay,
            use_momentum: (h.momentum != 0.0) as i32,
            nesterov: h.nesterov as i32,
            first: h.first as i32,
            pad: 0,
        };
        let (pv, gv, bv) =
            (elements::<T>(OP, (&*p.0, p.1))?, elements::<T>(OP, (g.0, g.1))?, elements::<T>(OP, (&*buf.0, buf.1))?);
        let f = function::<T>(&dev, &MODULE, "sgd_step")?;
        let n64 = n as i64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(&pv).arg(&gv).arg(&bv).arg(&n64).arg(&params);
        // SAFETY: sgd_step_<T>(T* p, const T* g, T* buf, long long n, SgdParams h) reads and writes
        // p[0..n), buf[0..n) and reads g[0..n); each view holds the n elements of its tensor (same shape,
        // checked by the caller), and the caller's write locks keep anything else from touching p and buf.
        unsafe { launch(OP, &dev, args, n) }
    }
    crate::util::same_cuda_dtypes("sgd_step", &[p.0, g.0, buf.0])?;
    match g.0.dtype() {
        DType::F32 => run::<f32>(p, g, buf, h),
        DType::F64 => run::<f64>(p, g, buf, h),
    }
}

/// One AdamW step in place on p, m, v and, with amsgrad, vmax.
pub(super) fn adamw(p: Mut, g: Ref, m: Mut, v: Mut, vmax: Option<Mut>, h: AdamWStep) -> Result<()> {
    fn run<T: Float>(p: Mut, g: Ref, m: Mut, v: Mut, vmax: Option<Mut>, h: AdamWStep) -> Result<()> {
        const OP: &str = "adamw_step";
        let n = p.1.numel();
        if n == 0 {
            return Ok(());
        }
        let dev = p.0.device().clone();
        // The bias corrections as the CPU computes them, in f64.
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
        let params = AdamWParams {
            step_size: h.lr / bc1,
            decay: 1.0 - h.lr * h.weight_decay,
            beta1: h.beta1,
            one_minus_beta1: 1.0 - h.beta1,
            beta2: h.beta2,
            one_minus_beta2: 1.0 - h.beta2,
            bc2_sqrt,
            eps: h.eps,
            amsgrad: vmax.is_some() as i32,
            pad: 0,
        };
        let (pv, gv) = (elements::<T>(OP, (&*p.0, p.1))?, elements::<T>(OP, (g.0, g.1))?);
        let (mv, vv) = (elements::<T>(OP, (&*m.0, m.1))?, elements::<T>(OP, (&*v.0, v.1))?);
        // Without amsgrad the kernel never reads vmax: v stands in for the pointer.
        let xv = match &vmax {
            Some(x) => elements::<T>(OP, (&*x.0, x.1))?,
            None => elements::<T>(OP, (&*v.0, v.1))?,
        };
        let f = function::<T>(&dev, &MODULE, "adamw_step")?;
        let n64 = n as i64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(&pv).arg(&gv).arg(&mv).arg(&vv).arg(&xv).arg(&n64).arg(&params);
        // SAFETY: adamw_step_<T>(T* p, const T* g, T* m, T* v, T* vmax, long long n, AdamWParams h) reads
        // and writes elements 0..n of p, m, v and (only when h.amsgrad, i.e. a vmax was given) vmax, and
        // reads g[0..n); each view holds the n elements of its tensor (same shape, checked by the caller),
        // and the caller's write locks keep anything else from touching the buffers written.
        unsafe { launch(OP, &dev, args, n) }
    }
    let mut all = vec![&*p.0, g.0, &*m.0, &*v.0];
    if let Some(x) = &vmax {
        all.push(&*x.0);
    }
    crate::util::same_cuda_dtypes("adamw_step", &all)?;
    match g.0.dtype() {
        DType::F32 => run::<f32>(p, g, m, v, vmax, h),
        DType::F64 => run::<f64>(p, g, m, v, vmax, h),
    }
}

/// x *= factor in place.
pub(super) fn scale(x: &mut CudaStorage, layout: &Layout, factor: f64) -> Result<()> {
    fn run<T: Float>(x: &mut CudaStorage, layout: &Layout, factor: f64) -> Result<()> {
        const OP: &str = "scale_";
        let n = layout.numel();
        if n == 0 {
            return Ok(());
        }
        let dev = x.device().clone();
        let xv = elements::<T>(OP, (&*x, layout))?;
        let f = function::<T>(&dev, &MODULE, "scale")?;
        let n64 = n as i64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(&xv).arg(&n64).arg(&factor);
        // SAFETY: scale_<T>(T* x, long long n, double factor) reads and writes x[0..n), which the view holds;
        // the caller's write lock keeps anything else from touching it.
        unsafe { launch(OP, &dev, args, n) }
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x, layout, factor),
        DType::F64 => run::<f64>(x, layout, factor),
    }
}
