//! CPU optimizer kernels: one pass over the parameter, gradient and state slices.
//!
//! Each tensor is read as its own elements, `offset..offset + numel` of its storage (the views are
//! contiguous, checked in mod.rs). A parameter or gradient may be a view into a larger buffer (the gradients
//! of a concat's inputs are narrow views of one tensor), and the rest of that buffer is not its to update.

use engine::{CpuStorage, Error, Float, Layout, Result};

use super::{AdamWStep, SgdStep};

type Mut<'a> = (&'a mut CpuStorage, &'a Layout);
type Ref<'a> = (&'a CpuStorage, &'a Layout);

/// The elements of a contiguous view as a typed slice.
fn elements<'a, T: Float>(op: &'static str, (s, layout): Ref<'a>) -> Result<&'a [T]> {
    let range = layout.offset()..layout.offset() + layout.numel();
    let v = T::slice(s).ok_or(Error::DTypeMismatch { op, lhs: T::DTYPE, rhs: s.dtype() })?;
    v.get(range).ok_or_else(|| Error::invalid(op, "the view exceeds its storage", layout.shape()))
}

fn elements_mut<'a, T: Float>(op: &'static str, (s, layout): Mut<'a>) -> Result<&'a mut [T]> {
    let range = layout.offset()..layout.offset() + layout.numel();
    let dtype = s.dtype();
    let v = T::slice_mut(s).ok_or(Error::DTypeMismatch { op, lhs: T::DTYPE, rhs: dtype })?;
    v.get_mut(range).ok_or_else(|| Error::invalid(op, "the view exceeds its storage", layout.shape()))
}

pub(super) fn sgd(p: Mut, g: Ref, buf: Mut, h: SgdStep) -> Result<()> {
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
    fn typed<T: Float>(p: Mut, g: Ref, buf: Mut, h: SgdStep) -> Result<()> {
        const OP: &str = "sgd_step";
        run::<T>(elements_mut(OP, p)?, elements(OP, g)?, elements_mut(OP, buf)?, h);
        Ok(())
    }
    match g.0.dtype() {
        engine::DType::F32 => typed::<f32>(p, g, buf, h),
        engine::DType::F64 => typed::<f64>(p, g, buf, h),
    }
}

pub(super) fn adamw(p: Mut, g: Ref, m: Mut, v: Mut, vmax: Option<Mut>, h: AdamWStep) -> Result<()> {
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
    fn typed<T: Float>(p: Mut, g: Ref, m: Mut, v: Mut, vmax: Option<Mut>, h: AdamWStep) -> Result<()> {
        const OP: &str = "adamw_step";
        let vmax = vmax.map(|x| elements_mut::<T>(OP, x)).transpose()?;
        run::<T>(elements_mut(OP, p)?, elements(OP, g)?, elements_mut(OP, m)?, elements_mut(OP, v)?, vmax, h);
        Ok(())
    }
    match g.0.dtype() {
        engine::DType::F32 => typed::<f32>(p, g, m, v, vmax, h),
        engine::DType::F64 => typed::<f64>(p, g, m, v, vmax, h),
    }
}

pub(super) fn scale(x: Mut, factor: f64) -> Result<()> {
    fn typed<T: Float>(x: Mut, factor: f64) -> Result<()> {
        elements_mut::<T>("scale_", x)?.iter_mut().for_each(|v| *v *= T::from_f64(factor));
        Ok(())
    }
    match x.0.dtype() {
        engine::DType::F32 => typed::<f32>(x, factor),
        engine::DType::F64 => typed::<f64>(x, factor),
    }
}
