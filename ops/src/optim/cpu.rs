//! CPU optimizer kernels: one pass over the parameter, gradient and state slices.

use engine::{CpuStorage, Error, Float, Result};

use super::{AdamWStep, SgdStep};

fn mismatch(op: &'static str, a: &CpuStorage, b: &CpuStorage) -> Error {
    Error::DTypeMismatch { op, lhs: a.dtype(), rhs: b.dtype() }
}

pub(super) fn sgd(p: &mut CpuStorage, g: &CpuStorage, buf: &mut CpuStorage, h: SgdStep) -> Result<()> {
    fn run<T: Float>(p: &mut [T], g: &[T], buf: &mut [T], h: SgdStep) {
        let c = T::from_f64;
        for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
            let mut d = g + c(h.weight_decay) * *p;
            if h.momentum != 0.0 {
                *b = if h.first { d } else { c(h.momentum) * *b + c(1.0 - h.dampening) * d };
                d = if h.nesterov { d + c(h.momentum) * *b } else { *b };
            }
            *p -= c(h.lr) * d;
        }
    }
    match (p, g, buf) {
        (CpuStorage::F32(p), CpuStorage::F32(g), CpuStorage::F32(b)) => run(p, g, b, h),
        (CpuStorage::F64(p), CpuStorage::F64(g), CpuStorage::F64(b)) => run(p, g, b, h),
        (p, g, _) => return Err(mismatch("sgd_step", p, g)),
    }
    Ok(())
}

pub(super) fn adamw(
    p: &mut CpuStorage,
    g: &CpuStorage,
    m: &mut CpuStorage,
    v: &mut CpuStorage,
    vmax: Option<&mut CpuStorage>,
    h: AdamWStep,
) -> Result<()> {
    fn run<T: Float>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], mut vmax: Option<&mut [T]>, h: AdamWStep) {
        let c = T::from_f64;
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
        let step_size = c(h.lr / bc1);
        let decay = c(1.0 - h.lr * h.weight_decay);
        for i in 0..p.len() {
            let gi = g[i];
            p[i] *= decay;
            m[i] = c(h.beta1) * m[i] + c(1.0 - h.beta1) * gi;
            v[i] = c(h.beta2) * v[i] + c(1.0 - h.beta2) * gi * gi;
            let vhat = match vmax.as_deref_mut() {
                Some(x) => {
                    x[i] = x[i].max(v[i]);
                    x[i]
                }
                None => v[i],
            };
            p[i] -= step_size * m[i] / (vhat.sqrt() / c(bc2_sqrt) + c(h.eps));
        }
    }
    match (p, g, m, v, vmax) {
        (CpuStorage::F32(p), CpuStorage::F32(g), CpuStorage::F32(m), CpuStorage::F32(v), None) => {
            run(p, g, m, v, None, h)
        }
        (CpuStorage::F32(p), CpuStorage::F32(g), CpuStorage::F32(m), CpuStorage::F32(v), Some(CpuStorage::F32(x))) => {
            run(p, g, m, v, Some(x), h)
        }
        (CpuStorage::F64(p), CpuStorage::F64(g), CpuStorage::F64(m), CpuStorage::F64(v), None) => {
            run(p, g, m, v, None, h)
        }
        (CpuStorage::F64(p), CpuStorage::F64(g), CpuStorage::F64(m), CpuStorage::F64(v), Some(CpuStorage::F64(x))) => {
            run(p, g, m, v, Some(x), h)
        }
        (p, g, ..) => return Err(mismatch("adamw_step", p, g)),
    }
    Ok(())
}

pub(super) fn scale(t: &mut CpuStorage, factor: f64) {
    engine::with_cpu!(t, |v: T| v.iter_mut().for_each(|x| *x *= T::from_f64(factor)))
}
