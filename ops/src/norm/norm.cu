// Normalisation kernels (see norm/mod.rs for the math, norm/cuda.rs for the launches). Statistics and every
// sum accumulate in double whatever T is, as the CPU does, and the values derived from them (mean, rstd, the
// scales) are rounded to T at the same points as in norm/cpu.rs, so the devices differ by summation order only.
// Sums combine in a fixed order (warp and block trees of fixed shape, partials in block order): no atomics,
// and the same launch always gives the same bits.
//
// Optional per-channel operands (weight, bias, running statistics) are any vector views, read through their
// `Strided`; a flag says whether one was given (the pointer is then a placeholder that is never read).

// ---- reductions ----------------------------------------------------------------------------------------

// The sum of v over the 32 lanes of a warp, in every lane (the butterfly gives every lane the same bits).
__device__ __forceinline__ double warp_sum(double v) {
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
    return v;
}

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024), in every thread.
__device__ __forceinline__ double block_sum(double v) {
    __shared__ double scratch[32];
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // an earlier call's readers are done with scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0);
}

// ---- layer_norm over the last dim: rows of d elements ----------------------------------------------------

// y = (x - mean) rstd w + b, one warp per row (rows grid-strided over the warps), saving mean and rstd per
// row. Two passes over the row (mean, then the squares about it), as the CPU: one pass of x^2 cancels when
// |mean| >> std. The row stays in L1 between the passes.
template <typename T>
__device__ void ln_fwd_impl(const T* x, const T* w, Strided lw, int has_w, const T* b, Strided lb, int has_b, T* y,
                            T* mean, T* rstd, long long rows, long long d, double eps) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += warps) {
        const T* xr = x + row * d;
        double s = 0.0;
        for (long long k = lane; k < d; k += 32) s += (double)xr[k];
        const double mu = warp_sum(s) / (double)d;
        double q = 0.0;
        for (long long k = lane; k < d; k += 32) {
            const double t = (double)xr[k] - mu;
            q += t * t;
        }
        const double var = warp_sum(q) / (double)d;
        const T m = (T)mu, r = (T)(1.0 / sqrt(var + eps));
        T* yr = y + row * d;
        for (long long k = lane; k < d; k += 32) {
            T v = (xr[k] - m) * r;
            if (has_w) v *= w[offset_of(lw, k)];
            if (has_b) v += b[offset_of(lb, k)];
            yr[k] = v;
        }
        if (lane == 0) {
            mean[row] = m;
            rstd[row] = r;
        }
    }
}

// The fused backward. Block b owns rows [b chunk, (b + 1) chunk) and walks them in tiles of one row per warp:
//
// - dx (need_dx): warp j takes row t0 + j of the tile: with gy = g w and xhat = (x - mean) rstd,
//   dx = rstd (gy - mean(gy) - xhat mean(gy xhat)), the two means by a warp sum (two passes over the row).
// - dw, db partials (need_sums): thread k owns columns k, k + blockDim, ... and adds g xhat and g over the
//   tile's rows (just read by the warps, so in cache) into its accumulators acc[col] and acc[d + col].
//
// The accumulators live in shared memory when 2 d doubles fit (use_shared), else in the block's own slice of
// `partial`; either way each is touched by its one owner thread, so no synchronisation is needed, and the block
// leaves its sums in partial[b 2d .. (b + 1) 2d) for ln_bwd_reduce.
template <typename T>
__device__ void ln_bwd_impl(const T* x, const T* w, Strided lw, int has_w, const T* mean, const T* rstd, const T* g,
                            T* dx, double* partial, long long rows, long long d, long long chunk, int need_dx,
                            int need_sums, int use_shared) {
    extern __shared__ double ln_acc[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tile = blockDim.x >> 5;
    double* acc = use_shared ? ln_acc : partial + (long long)blockIdx.x * 2 * d;
    if (need_sums) {
        for (long long k = threadIdx.x; k < d; k += blockDim.x) acc[k] = acc[d + k] = 0.0;
    }
    const long long r0 = (long long)blockIdx.x * chunk, r1 = min(rows, r0 + chunk);
    for (long long t0 = r0; t0 < r1; t0 += tile) {
        const long long row = t0 + warp;
        if (need_dx && row < r1) {
            const T* xr = x + row * d;
            const T* gr = g + row * d;
            const T m = mean[row], rs = rstd[row];
            double s_gy = 0.0, s_gyx = 0.0;
            for (long long k = lane; k < d; k += 32) {
                const T gy = has_w ? gr[k] * w[offset_of(lw, k)] : gr[k];
                s_gy += (double)gy;
                s_gyx += (double)(gy * ((xr[k] - m) * rs));
            }
            const T a = (T)(warp_sum(s_gy) / (double)d), bb = (T)(warp_sum(s_gyx) / (double)d);
            T* dr = dx + row * d;
            for (long long k = lane; k < d; k += 32) {
                const T gy = has_w ? gr[k] * w[offset_of(lw, k)] : gr[k];
                dr[k] = rs * (gy - a - (xr[k] - m) * rs * bb);
            }
        }
        if (need_sums) {
            const long long t1 = min(r1, t0 + tile);
            for (long long k = threadIdx.x; k < d; k += blockDim.x) {
                double sw = 0.0, sb = 0.0;
                for (long long r = t0; r < t1; ++r) {
                    const T gv = g[r * d + k];
                    sw += (double)(gv * ((x[r * d + k] - mean[r]) * rstd[r]));
                    sb += (double)gv;
                }
                acc[k] += sw;
                acc[d + k] += sb;
            }
        }
    }
    if (need_sums && use_shared) {
        double* out = partial + (long long)blockIdx.x * 2 * d;
        for (long long k = threadIdx.x; k < d; k += blockDim.x) {
            out[k] = acc[k];
            out[d + k] = acc[d + k];
        }
    }
}

// dw[k] = sum over blocks of the partials of g xhat, db[k] of g, in block order: one thread per column.
template <typename T>
__device__ void ln_bwd_reduce_impl(const double* partial, T* dw, T* db, long long d, long long blocks, int need_w,
                                   int need_b) {
    GRID_STRIDE(k, d) {
        double sw = 0.0, sb = 0.0;
        for (long long blk = 0; blk < blocks; ++blk) {
            sw += partial[blk * 2 * d + k];
            sb += partial[blk * 2 * d + d + k];
        }
        if (need_w) dw[k] = (T)sw;
        if (need_b) db[k] = (T)sb;
    }
}

// ---- batch_norm2d over (N, H, W) per channel -------------------------------------------------------------

// Element e of channel ch in an (N, C, HW) tensor, e over the channel's N HW elements.
__device__ __forceinline__ long long bn_index(long long e, long long ch, long long c, long long hw) {
    return ((e / hw) * c + ch) * hw + e % hw;
}

// Training: one block per channel computes the batch mean and biased variance (two passes, double), writes
// y = (x - mean) scale + shift with scale = rstd w rounded once (the CPU's order), and saves mean, var and rstd
// (var feeds the running update, rstd the backward).
template <typename T>
__device__ void bn_fwd_train_impl(const T* x, const T* w, Strided lw, int has_w, const T* b, Strided lb, int has_b,
                                  T* y, T* mean, T* var, T* rstd, long long n, long long c, long long hw,
                                  double eps) {
    const long long m = n * hw;
    for (long long ch = blockIdx.x; ch < c; ch += gridDim.x) {
        double s = 0.0;
        for (long long e = threadIdx.x; e < m; e += blockDim.x) s += (double)x[bn_index(e, ch, c, hw)];
        const double mu = block_sum(s) / (double)m;
        double q = 0.0;
        for (long long e = threadIdx.x; e < m; e += blockDim.x) {
            const double t = (double)x[bn_index(e, ch, c, hw)] - mu;
            q += t * t;
        }
        const double v = block_sum(q) / (double)m;
        const double r = 1.0 / sqrt(v + eps);
        const T mean_t = (T)mu;
        const T scale = (T)(r * (has_w ? (double)w[offset_of(lw, ch)] : 1.0));
        const T shift = has_b ? b[offset_of(lb, ch)] : T(0);
        for (long long e = threadIdx.x; e < m; e += blockDim.x) {
            const long long i = bn_index(e, ch, c, hw);
            y[i] = (x[i] - mean_t) * scale + shift;
        }
        if (threadIdx.x == 0) {
            mean[ch] = mean_t;
            var[ch] = (T)v;
            rstd[ch] = (T)r;
        }
    }
}

// Eval: the running statistics, one block per (sample, channel) plane (the per-channel scale is worked out
// once per plane, not per element). The saved mean, var and rstd are written by a grid-stride loop first.
template <typename T>
__device__ void bn_fwd_eval_impl(const T* x, const T* w, Strided lw, int has_w, const T* b, Strided lb, int has_b,
                                 const T* rm, Strided lrm, const T* rv, Strided lrv, T* y, T* mean, T* var, T* rstd,
                                 long long n, long long c, long long hw, double eps) {
    GRID_STRIDE(ch, c) {
        mean[ch] = rm[offset_of(lrm, ch)];
        var[ch] = rv[offset_of(lrv, ch)];
        rstd[ch] = (T)(1.0 / sqrt((double)rv[offset_of(lrv, ch)] + eps));
    }
    for (long long plane = blockIdx.x; plane < n * c; plane += gridDim.x) {
        const long long ch = plane % c;
        const double r = 1.0 / sqrt((double)rv[offset_of(lrv, ch)] + eps);
        const T mean_t = rm[offset_of(lrm, ch)];
        const T scale = (T)(r * (has_w ? (double)w[offset_of(lw, ch)] : 1.0));
        const T shift = has_b ? b[offset_of(lb, ch)] : T(0);
        for (long long p = threadIdx.x; p < hw; p += blockDim.x) {
            const long long i = plane * hw + p;
            y[i] = (x[i] - mean_t) * scale + shift;
        }
    }
}

// The fused backward, one block per channel: sums of g and g xhat (double) where dw, db or the training dx
// need them, then dx = rstd w (g - mean(g) - xhat mean(g xhat)) with the batch statistics, rstd w g with the
// running ones.
template <typename T>
__device__ void bn_bwd_impl(const T* x, const T* w, Strided lw, int has_w, const T* mean, const T* rstd, const T* g,
                            T* dx, T* dw, T* db, long long n, long long c, long long hw, int batch_stats,
                            int need_dx, int need_w, int need_b) {
    const long long m = n * hw;
    const bool need_sums = need_w || need_b || (need_dx && batch_stats);
    for (long long ch = blockIdx.x; ch < c; ch += gridDim.x) {
        const T mu = mean[ch], rs = rstd[ch];
        double sg = 0.0, sgx = 0.0;
        if (need_sums) {
            for (long long e = threadIdx.x; e < m; e += blockDim.x) {
                const long long i = bn_index(e, ch, c, hw);
                const T gv = g[i];
                sg += (double)gv;
                sgx += (double)(gv * (x[i] - mu) * rs);
            }
            sg = block_sum(sg);
            sgx = block_sum(sgx);
        }
        if (threadIdx.x == 0) {
            if (need_w) dw[ch] = (T)sgx;
            if (need_b) db[ch] = (T)sg;
        }
        if (need_dx) {
            const T k = has_w ? rs * w[offset_of(lw, ch)] : rs;
            const T a = (T)(sg / (double)m), bb = (T)(sgx / (double)m);
            for (long long e = threadIdx.x; e < m; e += blockDim.x) {
                const long long i = bn_index(e, ch, c, hw);
                dx[i] = batch_stats ? k * (g[i] - a - (x[i] - mu) * rs * bb) : k * g[i];
            }
        }
    }
}

// running = (1 - momentum) running + momentum scale stat in place, in double as the CPU, with the products
// and the sum rounded separately (no fused multiply-add) so that both devices get the same bits.
template <typename T>
__device__ void bn_blend_impl(T* running, Strided lr, const T* stat, long long c, double momentum, double scale) {
    GRID_STRIDE(i, c) {
        const long long o = offset_of(lr, i);
        const double kept = __dmul_rn(1.0 - momentum, (double)running[o]);
        const double added = __dmul_rn(__dmul_rn(momentum, scale), (double)stat[i]);
        running[o] = (T)__dadd_rn(kept, added);
    }
}

// ---- entry points ------------------------------------------------------------------------------------------

#define NORM_KERNELS(T, SUFFIX)                                                                               \
    extern "C" __global__ void ln_fwd_##SUFFIX(const T* x, const T* w, Strided lw, int has_w, const T* b,     \
                                               Strided lb, int has_b, T* y, T* mean, T* rstd, long long rows, \
                                               long long d, double eps) {                                     \
        ln_fwd_impl<T>(x, w, lw, has_w, b, lb, has_b, y, mean, rstd, rows, d, eps);                            \
    }                                                                                                          \
    extern "C" __global__ void ln_bwd_##SUFFIX(const T* x, const T* w, Strided lw, int has_w, const T* mean,  \
                                               const T* rstd, const T* g, T* dx, double* partial,             \
                                               long long rows, long long d, long long chunk, int need_dx,     \
                                               int need_sums, int use_shared) {                               \
        ln_bwd_impl<T>(x, w, lw, has_w, mean, rstd, g, dx, partial, rows, d, chunk, need_dx, need_sums,        \
                       use_shared);                                                                            \
    }                                                                                                          \
    extern "C" __global__ void ln_bwd_reduce_##SUFFIX(const double* partial, T* dw, T* db, long long d,       \
                                                      long long blocks, int need_w, int need_b) {             \
        ln_bwd_reduce_impl<T>(partial, dw, db, d, blocks, need_w, need_b);                                     \
    }                                                                                                          \
    extern "C" __global__ void bn_fwd_train_##SUFFIX(const T* x, const T* w, Strided lw, int has_w,           \
                                                     const T* b, Strided lb, int has_b, T* y, T* mean,        \
                                                     T* var, T* rstd, long long n, long long c, long long hw, \
                                                     double eps) {                                            \
        bn_fwd_train_impl<T>(x, w, lw, has_w, b, lb, has_b, y, mean, var, rstd, n, c, hw, eps);                \
    }                                                                                                          \
    extern "C" __global__ void bn_fwd_eval_##SUFFIX(const T* x, const T* w, Strided lw, int has_w,            \
                                                    const T* b, Strided lb, int has_b, const T* rm,           \
                                                    Strided lrm, const T* rv, Strided lrv, T* y, T* mean,     \
                                                    T* var, T* rstd, long long n, long long c, long long hw,  \
                                                    double eps) {                                             \
        bn_fwd_eval_impl<T>(x, w, lw, has_w, b, lb, has_b, rm, lrm, rv, lrv, y, mean, var, rstd, n, c, hw,     \
                            eps);                                                                              \
    }                                                                                                          \
    extern "C" __global__ void bn_bwd_##SUFFIX(const T* x, const T* w, Strided lw, int has_w, const T* mean,  \
                                               const T* rstd, const T* g, T* dx, T* dw, T* db, long long n,   \
                                               long long c, long long hw, int batch_stats, int need_dx,       \
                                               int need_w, int need_b) {                                      \
        bn_bwd_impl<T>(x, w, lw, has_w, mean, rstd, g, dx, dw, db, n, c, hw, batch_stats, need_dx, need_w,     \
                       need_b);                                                                                \
    }                                                                                                          \
    extern "C" __global__ void bn_blend_##SUFFIX(T* running, Strided lr, const T* stat, long long c,          \
                                                 double momentum, double scale) {                             \
        bn_blend_impl<T>(running, lr, stat, c, momentum, scale);                                               \
    }

NORM_KERNELS(float, f32)
NORM_KERNELS(double, f64)
