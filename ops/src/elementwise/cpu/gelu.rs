//! GELU of f32 (the MLP's activation) forward and backward on the CPU, with `erf_f32`'s polynomial
//! evaluated four lanes at a time in 256-bit f64 vectors where the CPU has AVX.
//!
//! Each lane runs exactly the operations of the scalar formulas ([`Unary::Gelu`]'s `f` and `df`, in
//! cpu.rs) in the same order: f32 division and products, the widening to f64, min instead of the
//! branch-free selects (`min(a, b)` is `a < b ? a : b`, NaN included), separate multiplies and adds in
//! Horner's rule (never fused), the narrowing back to f32 and `exp_f32` for the derivative's Gaussian,
//! lane by lane. The results are so bitwise the scalar ones (a test checks every kind of input); the scalar
//! code takes the runs' tails and CPUs without AVX.

use engine::Layout;

use rayon::prelude::*;

use crate::elementwise::zip::{zip_runs, PARALLEL_MIN};
use crate::elementwise::Unary;

/// gelu(x) over a strided f32 input.
pub(super) fn gelu_f32(x: &[f32], lx: &Layout) -> Vec<f32> {
    let mut out = engine::cpu_buffer(lx.numel());
    zip_runs(&mut out, lx.shape(), [lx], |o, [s], [t]| {
        if t == 1 {
            forward_run(o, &x[s..s + o.len()]);
        } else {
            for (k, v) in o.iter_mut().enumerate() {
                *v = Unary::Gelu.f(x[s + k * t]);
            }
        }
    });
    out
}

/// g * gelu'(x) over strided f32 inputs of one shape.
pub(super) fn gelu_backward_f32(x: &[f32], lx: &Layout, g: &[f32], lg: &Layout) -> Vec<f32> {
    let mut out = engine::cpu_buffer(lx.numel());
    zip_runs(&mut out, lx.shape(), [lx, lg], |o, [sx, sg], [tx, tg]| {
        if tx == 1 && tg == 1 {
            let n = o.len();
            backward_run(o, &x[sx..sx + n], &g[sg..sg + n]);
        } else {
            for (k, v) in o.iter_mut().enumerate() {
                let xv = x[sx + k * tx];
                *v = g[sg + k * tg] * Unary::Gelu.df(xv, xv);
            }
        }
    });
    out
}

/// (gelu(x), gelu'(x)) of a contiguous f32 input in one pass: one erf per element serves both, each
/// output the bits of the separate passes (gelu'(x) as `df` gives it, before any product with a gradient).
pub(super) fn gelu_and_derivative_f32(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut a, mut d) = (engine::cpu_buffer(x.len()), engine::cpu_buffer(x.len()));
    if x.len() < PARALLEL_MIN {
        both_run(&mut a, &mut d, x);
    } else {
        let chunk = x.len().div_ceil(rayon::current_num_threads() * 4).max(PARALLEL_MIN / 4);
        a.par_chunks_mut(chunk).zip(d.par_chunks_mut(chunk)).zip(x.par_chunks(chunk)).for_each(|((a, d), x)| {
            both_run(a, d, x);
        });
    }
    (a, d)
}

fn both_scalar(a: &mut [f32], d: &mut [f32], x: &[f32]) {
    for ((a, d), &xv) in a.iter_mut().zip(d.iter_mut()).zip(x) {
        *a = Unary::Gelu.f(xv);
        *d = Unary::Gelu.df(xv, xv);
    }
}

/// One contiguous run: a[i] = gelu(x[i]), d[i] = gelu'(x[i]).
fn both_run(a: &mut [f32], d: &mut [f32], x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked just above).
        return unsafe { avx::both(a, d, x) };
    }
    both_scalar(a, d, x)
}

fn forward_scalar(o: &mut [f32], x: &[f32]) {
    for (v, &xv) in o.iter_mut().zip(x) {
        *v = Unary::Gelu.f(xv);
    }
}

fn backward_scalar(o: &mut [f32], x: &[f32], g: &[f32]) {
    for ((v, &xv), &gv) in o.iter_mut().zip(x).zip(g) {
        *v = gv * Unary::Gelu.df(xv, xv);
    }
}

/// One contiguous run: o[i] = gelu(x[i]).
fn forward_run(o: &mut [f32], x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked just above).
        return unsafe { avx::forward(o, x) };
    }
    forward_scalar(o, x)
}

/// One contiguous run: o[i] = g[i] gelu'(x[i]).
fn backward_run(o: &mut [f32], x: &[f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked just above).
        return unsafe { avx::backward(o, x, g) };
    }
    backward_scalar(o, x, g)
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::super::{ERF_POLY, INV_SQRT_2PI, SQRT_2};
    use super::{backward_scalar, both_scalar, forward_scalar};

    /// Vectors of four lanes processed side by side: Horner's rule is a chain of dependent multiplies and
    /// adds, so independent chains interleaved keep the FP units busy where one chain waits on latency.
    const CHAINS: usize = 4;
    /// f32 lanes per loop step.
    const STEP: usize = 4 * CHAINS;

    /// erf_f32 of CHAINS vectors of four f32 lanes: the operations of [`super::super::erf_f32`], lane by lane.
    #[inline]
    #[target_feature(enable = "avx")]
    fn erf(x: [__m128; CHAINS]) -> [__m128; CHAINS] {
        let sign = _mm_set1_ps(-0.0);
        let a = x.map(|x| {
            let x64 = _mm256_cvtps_pd(x);
            _mm256_min_pd(_mm256_andnot_pd(_mm256_set1_pd(-0.0), x64), _mm256_set1_pd(4.0))
        });
        let u =
            a.map(|a| _mm256_sub_pd(_mm256_mul_pd(_mm256_mul_pd(a, a), _mm256_set1_pd(0.125)), _mm256_set1_pd(1.0)));
        let mut p = [_mm256_set1_pd(ERF_POLY[22]); CHAINS];
        for &c in ERF_POLY[..22].iter().rev() {
            for (p, &u) in p.iter_mut().zip(&u) {
                *p = _mm256_add_pd(_mm256_mul_pd(*p, u), _mm256_set1_pd(c));
            }
        }
        std::array::from_fn(|k| {
            let r = _mm256_min_pd(_mm256_mul_pd(a[k], p[k]), _mm256_set1_pd(1.0));
            let r = _mm256_cvtpd_ps(r);
            let r = _mm_or_ps(_mm_andnot_ps(sign, r), _mm_and_ps(sign, x[k]));
            // A NaN lane gives x itself.
            _mm_blendv_ps(r, x[k], _mm_cmpunord_ps(x[k], x[k]))
        })
    }

    /// erf(x / sqrt 2) of CHAINS vectors, x / sqrt 2 in f32 as the scalar formula divides.
    #[inline]
    #[target_feature(enable = "avx")]
    fn erf_scaled(x: [__m128; CHAINS]) -> [__m128; CHAINS] {
        erf(x.map(|x| _mm_div_ps(x, _mm_set1_ps(SQRT_2 as f32))))
    }

    /// gelu = (0.5 x) (1 + erf(x / sqrt 2)) of four lanes, given e = erf(x / sqrt 2).
    #[inline]
    #[target_feature(enable = "avx")]
    fn gelu4(x: __m128, e: __m128) -> __m128 {
        _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(0.5), x), _mm_add_ps(_mm_set1_ps(1.0), e))
    }

    /// gelu'(x) = (0.5 (1 + erf(x / sqrt 2))) + (x / sqrt(2 pi)) exp((-0.5 x) x) of four lanes, given
    /// e = erf(x / sqrt 2).
    #[inline]
    #[target_feature(enable = "avx")]
    fn derivative4(x: __m128, e: __m128) -> __m128 {
        let cdf = _mm_mul_ps(_mm_set1_ps(0.5), _mm_add_ps(_mm_set1_ps(1.0), e));
        let mut arg = [0f32; 4];
        // SAFETY: `arg` holds four f32 (unaligned store).
        unsafe { _mm_storeu_ps(arg.as_mut_ptr(), _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(-0.5), x), x)) };
        let ex = arg.map(crate::elementwise::cpu::exp::exp_f32);
        // SAFETY: `ex` holds four f32 (unaligned load).
        let ex = unsafe { _mm_loadu_ps(ex.as_ptr()) };
        let pdf = _mm_mul_ps(_mm_mul_ps(x, _mm_set1_ps(INV_SQRT_2PI as f32)), ex);
        _mm_add_ps(cdf, pdf)
    }

    /// CHAINS vectors of four lanes from s[i..i + STEP].
    ///
    /// # Safety
    /// i + STEP must not exceed s.len().
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn load(s: &[f32], i: usize) -> [__m128; CHAINS] {
        // SAFETY: the caller keeps i + STEP within s.
        std::array::from_fn(|k| unsafe { _mm_loadu_ps(s.as_ptr().add(i + 4 * k)) })
    }

    /// o[i..i + STEP] = v.
    ///
    /// # Safety
    /// i + STEP must not exceed o.len().
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn store(o: &mut [f32], i: usize, v: [__m128; CHAINS]) {
        for (k, v) in v.into_iter().enumerate() {
            // SAFETY: the caller keeps i + STEP within o.
            unsafe { _mm_storeu_ps(o.as_mut_ptr().add(i + 4 * k), v) };
        }
    }

    /// # Safety
    /// The CPU must have AVX.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn forward(o: &mut [f32], x: &[f32]) {
        let n = o.len().min(x.len());
        let body = n - n % STEP;
        for i in (0..body).step_by(STEP) {
            // SAFETY: i + STEP <= body <= the length of both slices.
            unsafe {
                let xv = load(x, i);
                let e = erf_scaled(xv);
                store(o, i, std::array::from_fn(|k| gelu4(xv[k], e[k])));
            }
        }
        forward_scalar(&mut o[body..n], &x[body..n]);
    }

    /// # Safety
    /// The CPU must have AVX.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn backward(o: &mut [f32], x: &[f32], g: &[f32]) {
        let n = o.len().min(x.len()).min(g.len());
        let body = n - n % STEP;
        for i in (0..body).step_by(STEP) {
            // SAFETY: i + STEP <= body <= the length of all three slices.
            unsafe {
                let (xv, gv) = (load(x, i), load(g, i));
                let e = erf_scaled(xv);
                store(o, i, std::array::from_fn(|k| _mm_mul_ps(gv[k], derivative4(xv[k], e[k]))));
            }
        }
        backward_scalar(&mut o[body..n], &x[body..n], &g[body..n]);
    }

    /// # Safety
    /// The CPU must have AVX.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn both(a: &mut [f32], d: &mut [f32], x: &[f32]) {
        let n = a.len().min(d.len()).min(x.len());
        let body = n - n % STEP;
        for i in (0..body).step_by(STEP) {
            // SAFETY: i + STEP <= body <= the length of all three slices.
            unsafe {
                let xv = load(x, i);
                let e = erf_scaled(xv);
                store(a, i, std::array::from_fn(|k| gelu4(xv[k], e[k])));
                store(d, i, std::array::from_fn(|k| derivative4(xv[k], e[k])));
            }
        }
        both_scalar(&mut a[body..n], &mut d[body..n], &x[body..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs of every kind: a dense sweep over the range where erf is not yet +-1, large and tiny values,
    /// signed zeros, infinities and NaN.
    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (-90_000..90_000).map(|i| i as f32 * 1e-4).collect();
        v.extend([0.0, -0.0, 1e-30, -1e-30, 1e-7, 5.6568, -5.6569, 20.0, -20.0, 1e30, -1e30]);
        v.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE, f32::MAX, f32::MIN]);
        // Odd lengths exercise the scalar tails.
        v.push(0.3);
        v
    }

    #[test]
    fn vector_gelu_is_bitwise_the_scalar_formula() {
        let x = inputs();
        let g: Vec<f32> = x.iter().enumerate().map(|(i, _)| ((i % 13) as f32 - 6.0) * 0.37).collect();
        let (mut fwd, mut bwd) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        forward_run(&mut fwd, &x);
        backward_run(&mut bwd, &x, &g);
        let (a, d) = gelu_and_derivative_f32(&x);
        for i in 0..x.len() {
            let want_f = Unary::Gelu.f(x[i]);
            let want_b = g[i] * Unary::Gelu.df(x[i], x[i]);
            assert_eq!(fwd[i].to_bits(), want_f.to_bits(), "gelu({}): {} vs {want_f}", x[i], fwd[i]);
            assert_eq!(bwd[i].to_bits(), want_b.to_bits(), "gelu'({}): {} vs {want_b}", x[i], bwd[i]);
            assert_eq!(a[i].to_bits(), want_f.to_bits(), "gelu({}) with the derivative", x[i]);
            let want_d = Unary::Gelu.df(x[i], x[i]);
            assert_eq!(d[i].to_bits(), want_d.to_bits(), "gelu'({}) alone: {} vs {want_d}", x[i], d[i]);
            assert_eq!((g[i] * d[i]).to_bits(), want_b.to_bits(), "g gelu'({}) as a product", x[i]);
        }
    }
}
