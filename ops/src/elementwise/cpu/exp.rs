//! e^x and e^x - 1 of f32 on the CPU, written out instead of calling libm's `expf` and `expm1f`.
//!
//! Why our own: SiLU, sigmoid and the linear attention's kernel elu(x) + 1 evaluate one of them for every
//! element of large activations, and a libm call per element keeps those loops scalar. These functions have
//! no branches and no calls (selects, multiply-adds and integer bit moves), so the loops around them
//! vectorise. Their results are fixed by the operations written here, the same on every machine (libm picks
//! an implementation by the CPU it finds); the build targets x86-64-v3, whose fused multiply-add `mul_add`
//! compiles to, and Rust never fuses a multiply and an add on its own, so a vectorised loop gives the bits
//! of the scalar one.
//!
//! The method, for a learner:
//!
//! ```text
//! e^x = 2^n e^r,   n = nearest integer to x / ln 2,   r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2]
//! ```
//!
//! n comes from adding 1.5 * 2^23 to x / ln 2: the sum's last bit is worth 1, so the addition rounds to an
//! integer (ties to even) and that integer sits in the low bits of the sum's encoding. r is x - n ln 2 with
//! ln 2 split into a short head (n times it is exact) and a tail. e^r is its Taylor series to r^8: the first
//! term left out, r^9 / 9!, is below 2e-10 of e^r, far below an f32 step (6e-8). expm1 takes n = 0 for
//! |x| < ln 2, where the rest would cancel, and runs its series to r^10 there. 2^n is built from its exponent
//! bits. Both functions are within about one f32 step of the exact value (the tests measure it against
//! f64 on a dense grid).

/// 1.5 * 2^23: adding it to |v| < 2^22 rounds v to an integer in the sum's low bits.
const SHIFT: f32 = 12_582_912.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO; LN2_HI has 16 significant bits, so n LN2_HI is exact for |n| < 2^8.
#[allow(clippy::excessive_precision)] // written out exactly
const LN2_HI: f32 = 0.693_145_751_953_125;
#[allow(clippy::excessive_precision)] // ln 2 - LN2_HI to f64 precision, rounded once
const LN2_LO: f32 = 1.428_606_820_309_417_3e-6;
/// 1 / k! for k = 2..=10, the Taylor coefficients of e^r after 1 + r.
const INV_FACT: [f32; 9] = [
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
];

/// (n, r) for an x already clamped to the caller's range: n the nearest integer to x / ln 2, r = x - n ln 2.
#[inline(always)]
fn reduce(x: f32) -> (i32, f32) {
    let t = x.mul_add(LOG2_E, SHIFT);
    let n = t.to_bits() as i32 - SHIFT.to_bits() as i32;
    let nf = t - SHIFT;
    let r = (-nf).mul_add(LN2_HI, x);
    let r = (-nf).mul_add(LN2_LO, r);
    (n, r)
}

/// 2^k for k in [-126, 127], from its exponent bits.
#[inline(always)]
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// (e^r - 1 - r) / r^2 = 1/2! + r/3! + r^2/4! + ..., from the first `terms` coefficients of [`INV_FACT`],
/// by Horner's rule.
#[inline(always)]
fn q(r: f32, terms: usize) -> f32 {
    let mut p = INV_FACT[terms - 1];
    for &c in INV_FACT[..terms - 1].iter().rev() {
        p = p.mul_add(r, c);
    }
    p
}

/// e^x of an f32. x above 89 gives infinity (e^88.73 is past the largest f32), x below -104 gives 0, NaN
/// gives NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // clamp keeps NaN, which flows through the arithmetic to the result.
    let xc = x.clamp(-104.0, 89.0);
    let (n, r) = reduce(xc);
    // e^r = 1 + r + r^2 q(r) to r^8, the small terms first.
    let er = (r * r).mul_add(q(r, 7), r) + 1.0;
    // n lies in [-150, 129]: 2^n in two halves, each a normal f32, so that results below 2^-126 round once
    // (in the last product) into the subnormals and results past 2^128 overflow to infinity.
    let h = n >> 1;
    er * pow2(h) * pow2(n - h)
}

/// e^x - 1 of an f32, accurate relative to the result also where x is near 0 (where e^x - 1 would cancel):
/// within one f32 step for x < 16.6, one and a half above.
/// x above 89 gives infinity, x below -86 gives -1 (e^-17 is already below half an f32 step of 1), NaN
/// gives NaN, |x| < 2^-24 gives x itself (the exact result rounds to it; -0 stays -0).
#[inline(always)]
pub(crate) fn expm1_f32(x: f32) -> f32 {
    let xc = x.clamp(-86.0, 89.0);
    // For |x| < ln 2, n = 0 and r = x: the series alone, to r^10 (the first term left out is below 1e-9 of
    // the result there). Reducing such x to n = +-1 would leave 2 (h em1 + (h - 1/2)) below to cancel.
    let (n, r) = if x.abs() < std::f32::consts::LN_2 { (0, x) } else { reduce(xc) };
    // e^r - 1 = r + r^2 q(r): r itself is the leading term, so small r loses nothing.
    let em1 = (r * r).mul_add(q(r, 9), r);
    // e^x - 1 = 2^n (1 + em1) - 1 = 2 (h em1 + (h - 1/2)) with h = 2^(n - 1) in [2^-125, 2^127]: h - 1/2 is
    // exact for |n| <= 24 (beyond, it rounds: up to half a step more for x > 16.6, where the 1 is a tiny
    // part of the result), the multiply-add rounds once, and doubling is exact up to the overflow to
    // infinity past 2^128.
    let h = pow2(n - 1);
    let y = 2.0 * h.mul_add(em1, h - 0.5);
    if x.abs() < 5.960_464_5e-8_f32 {
        x
    } else {
        y
    }
}

/// e^x in T: [`exp_f32`] for f32, libm's exp for f64 (the gradient checks' dtype).
#[inline(always)]
pub(crate) fn exp<T: engine::Float>(x: T) -> T {
    super::f32_or_libm(x, exp_f32, T::exp)
}

/// e^x - 1 in T: [`expm1_f32`] for f32, libm's expm1 for f64.
#[inline(always)]
pub(crate) fn expm1<T: engine::Float>(x: T) -> T {
    super::f32_or_libm(x, expm1_f32, T::exp_m1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The distance of `got` from the exact `want` (an f64), in steps of f32 at `want`'s magnitude (the
    /// smallest subnormal step below the normal range).
    fn steps(got: f32, want: f64) -> f64 {
        let ulp = if want.abs() < f32::MIN_POSITIVE as f64 {
            f32::from_bits(1) as f64
        } else {
            let w = want as f32;
            (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64
        };
        (got as f64 - want).abs() / ulp
    }

    /// Every f32 in [lo, hi] at a stride of `every` encodings (both signs of the grid included by the caller).
    fn grid(lo: f32, hi: f32, every: u32) -> impl Iterator<Item = f32> {
        let (a, b) = (lo.to_bits(), hi.to_bits());
        let (a, b) = (a.min(b), a.max(b));
        (a..=b).step_by(every as usize).map(f32::from_bits)
    }

    #[test]
    fn exp_f32_is_within_one_step_of_the_exact_value() {
        let mut worst = (0.0f64, 0.0f32);
        // x in [-104, 89] (both signs), every 97th f32: about 21 million values.
        for x in grid(0.0, 89.0, 97).chain(grid(-0.0, -104.0, 97)) {
            let e = steps(exp_f32(x), (x as f64).exp());
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(worst.0 <= 1.0, "exp_f32 is {} steps off at x = {:e}", worst.0, worst.1);
    }

    #[test]
    fn expm1_f32_is_within_one_step_of_the_exact_value_also_near_zero() {
        let mut worst = (0.0f64, 0.0f32);
        for x in grid(0.0, 89.0, 97).chain(grid(-0.0, -86.0, 97)) {
            // Past x = 16.6 (n >= 25) h - 1/2 rounds: one more half step.
            let bound = if x < 16.6 { 1.0 } else { 1.5 };
            let e = steps(expm1_f32(x), (x as f64).exp_m1()) / bound;
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(worst.0 <= 1.0, "expm1_f32 is {} of its bound off at x = {:e}", worst.0, worst.1);
    }

    #[test]
    fn the_ends_of_the_range_and_special_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(88.8), f32::INFINITY);
        assert_eq!(exp_f32(88.7), (88.7f32 as f64).exp() as f32);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-104.0), 0.0);
        // Subnormal results: e^-100 = 3.7e-44 is 26 smallest steps.
        assert_eq!(exp_f32(-100.0), (-100f64).exp() as f32);
        assert!(exp_f32(f32::NAN).is_nan());

        assert_eq!(expm1_f32(0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(expm1_f32(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(expm1_f32(1e-30), 1e-30);
        assert_eq!(expm1_f32(-20.0), -1.0);
        assert_eq!(expm1_f32(f32::NEG_INFINITY), -1.0);
        assert_eq!(expm1_f32(88.5), (88.5f64).exp_m1() as f32);
        assert_eq!(expm1_f32(88.8), f32::INFINITY);
        assert_eq!(expm1_f32(f32::INFINITY), f32::INFINITY);
        assert!(expm1_f32(f32::NAN).is_nan());
    }
}
