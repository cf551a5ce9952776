//! This machine's peaks, measured in the same run as the op benches so that ratios are fair.
//!
//! - FMA throughput: every thread runs independent chains of fused multiply-adds on registers (AVX-512F
//!   when present, else AVX2+FMA), 2 FLOPs per lane per FMA.
//! - Memory bandwidth: a parallel copy of a buffer far larger than the caches; bytes moved = read + write.

use rayon::prelude::*;

/// FLOPs done by one call of `fma_kernel` on one thread.
pub fn fma_flops_per_call() -> f64 {
    // 12 accumulators x 16 lanes x 2 FLOPs x ITERS (AVX-512), or 12 x 8 x 2 x ITERS (AVX2).
    let lanes = if is_x86_feature_detected!("avx512f") { 16.0 } else { 8.0 };
    12.0 * lanes * 2.0 * ITERS as f64
}

const ITERS: usize = 1 << 16;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512() -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); 12];
    for _ in 0..ITERS {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in acc {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2() -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..ITERS {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut out = [0f32; 8];
    let mut s = _mm256_setzero_ps();
    for v in acc {
        s = _mm256_add_ps(s, v);
    }
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

/// One `fma_kernel` call on every rayon thread; returns the FLOPs done.
pub fn fma_all_threads() -> f64 {
    let threads = rayon::current_num_threads();
    let sink: f32 = (0..threads)
        .into_par_iter()
        .map(|_| {
            // SAFETY: the feature was detected at run time before calling the function compiled for it.
            unsafe {
                if is_x86_feature_detected!("avx512f") {
                    fma_avx512()
                } else {
                    fma_avx2()
                }
            }
        })
        .sum();
    std::hint::black_box(sink);
    fma_flops_per_call() * threads as f64
}

/// Parallel copy `src` -> `dst`.
pub fn copy(dst: &mut [f32], src: &[f32]) {
    let chunk = dst.len().div_ceil(rayon::current_num_threads() * 4).max(1 << 16);
    dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
}
