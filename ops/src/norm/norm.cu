// Normalisation kernels (see norm/mod.rs for the math, norm/cuda.rs for the launches). Statistics and every
// sum accumulate in double whatever T is, as the CPU does (except layer_norm's register kernels, whose short
// per-row sums and per-thread column sums run in T: see there), and the values derived from them (mean, rstd,
// the scales) are rounded to T at the same points as in norm/cpu.rs, so the devices differ by summation order
// and rounding only.
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

// p + v rounded once and never fused with the product that made v: the tape's accumulation of a pending
// gradient p and an op's own v, as the layer_norm backward adds it when it stores dx.
__device__ __forceinline__ float ln_add_rn(float p, float v) { return __fadd_rn(p, v); }
__device__ __forceinline__ double ln_add_rn(double p, double v) { return __dadd_rn(p, v); }

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
                            T* dx, const T* pend, int has_pend, double* partial, long long rows, long long d,
                            long long chunk, int need_dx, int need_sums, int use_shared) {
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
                const T v = rs * (gy - a - (xr[k] - m) * rs * bb);
                dr[k] = has_pend ? ln_add_rn(pend[row * d + k], v) : v;
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

// dw[k] = sum over blocks of the partials of g xhat, db[k] of g, in block order, for both backward kernels'
// partials (blocks, 2 d): a block of 32 x 32 threads per 32 of the 2 d columns; thread (tx, ty) adds rows
// ty, ty + 32, ... of its column, then row ty = 0 adds the 32 sums in order. Fixed shape: deterministic, and
// 32-way parallel over the blocks (their count grows with the rows).
template <typename T>
__device__ void ln_bwd_reduce_impl(const double* partial, T* dw, T* db, long long d, long long blocks, int need_w,
                                   int need_b) {
    __shared__ double red[32][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (long long k0 = (long long)blockIdx.x * 32; k0 < 2 * d; k0 += (long long)gridDim.x * 32) {
        const long long k = k0 + tx;
        double s = 0.0;
        if (k < 2 * d) {
            for (long long blk = ty; blk < blocks; blk += 32) s += partial[blk * 2 * d + k];
        }
        __syncthreads();  // the previous column tile's readers of red are done
        red[ty][tx] = s;
        __syncthreads();
        if (ty == 0 && k < 2 * d) {
            double t = 0.0;
            for (int r = 0; r < 32; ++r) t += red[r][tx];
            if (k < d) {
                if (need_w) dw[k] = (T)t;
            } else if (need_b) {
                db[k - d] = (T)t;
            }
        }
    }
}

// ---- layer_norm, the row in registers --------------------------------------------------------------------
//
// For rows of d = nvec x 16 bytes with nvec <= 256 (f32: d a multiple of 4 up to 1024), x and g starting at
// 16-byte boundaries. A row is spread over a group of G lanes (G = min(32, nvec rounded up to a power of two),
// groups aligned within the warp): lane l of the group holds the row's vectors l, l + G, ..., NV of them (those
// past nvec are empty). A warp takes 32 / G rows per step, each thread RPT rows of its group, so that RPT NV
// 16-byte loads per tensor are in flight before the first sum. Row sums are butterflies within the group. The
// statistics sum in T here (a thread's up to 32 elements, then the group's tree): rounding to T is what the CPU
// does to mean and rstd anyway, and the float error of these short sums is far below it.

template <typename T> struct LnVec;
template <> struct LnVec<float> {
    typedef float4 type;
    static const int n = 4;
    static __device__ __forceinline__ float get(const float4& v, int e) { return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w; }
    static __device__ __forceinline__ float4 make(const float* a) { return make_float4(a[0], a[1], a[2], a[3]); }
};
template <> struct LnVec<double> {
    typedef double2 type;
    static const int n = 2;
    static __device__ __forceinline__ double get(const double2& v, int e) { return e == 0 ? v.x : v.y; }
    static __device__ __forceinline__ double2 make(const double* a) { return make_double2(a[0], a[1]); }
};

// The sum of v over the aligned group of G lanes (a power of two, at most 32), in every lane of the group.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int G) {
    for (int o = G >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Forward. Bytes: x read and y written once, mean and rstd written (8 bytes a row in f32): for (200704, 64)
// f32, 2 x 51.4 MB + 1.6 MB, about 0.035 ms on the H100 at the measured 2976 GB/s copy rate. Two passes over
// the registers (mean, then the squares about it), as the CPU.
template <typename T, int NV, int RPT>
__device__ void ln_fwd_reg_impl(const T* x, const T* w, Strided lw, int has_w, const T* b, Strided lb, int has_b,
                                T* y, T* mean, T* rstd, long long rows, int d, int G, double eps) {
    typedef typename LnVec<T>::type V;
    const int VN = LnVec<T>::n;
    const int nvec = d / VN, lane = threadIdx.x & 31, gl = lane & (G - 1), sub = lane / G;
    const int per_warp = (32 / G) * RPT;  // rows a warp takes per step
    T wr[NV][VN], br[NV][VN];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
#pragma unroll
        for (int e = 0; e < VN; ++e) {
            const bool valid = gl + G * k < nvec;
            const long long col = (long long)(gl + G * k) * VN + e;
            wr[k][e] = has_w && valid ? w[offset_of(lw, col)] : T(1);
            br[k][e] = has_b && valid ? b[offset_of(lb, col)] : T(0);
        }
    }
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long base = ((long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * per_warp; base < rows;
         base += warps * per_warp) {
        const long long r0 = base + (long long)sub * RPT;  // this group's first row
        V v[RPT][NV];
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                const T zero[4] = {T(0), T(0), T(0), T(0)};
                v[r][k] = LnVec<T>::make(zero);
                if (r0 + r < rows && gl + G * k < nvec) v[r][k] = *(const V*)(x + (r0 + r) * d + (gl + G * k) * VN);
            }
        }
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
            T s = T(0);
#pragma unroll
            for (int k = 0; k < NV; ++k) {
#pragma unroll
                for (int e = 0; e < VN; ++e) s += LnVec<T>::get(v[r][k], e);
            }
            const T m = group_sum(s, G) / (T)d;
            T q = T(0);
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                if (gl + G * k < nvec) {
#pragma unroll
                    for (int e = 0; e < VN; ++e) {
                        const T t = LnVec<T>::get(v[r][k], e) - m;
                        q += t * t;
                    }
                }
            }
            const T rs = T(1) / m_sqrt(group_sum(q, G) / (T)d + (T)eps);
            const long long row = r0 + r;
            if (row < rows) {
#pragma unroll
                for (int k = 0; k < NV; ++k) {
                    if (gl + G * k < nvec) {
                        T o[4];
#pragma unroll
                        for (int e = 0; e < VN; ++e) o[e] = (LnVec<T>::get(v[r][k], e) - m) * rs * wr[k][e] + br[k][e];
                        *(V*)(y + row * d + (gl + G * k) * VN) = LnVec<T>::make(o);
                    }
                }
                if (gl == 0) {
                    mean[row] = m;
                    rstd[row] = rs;
                }
            }
        }
    }
}

// Backward, fused. Bytes: x and g read, dx written once, plus mean and rstd read and blocks x 2 d doubles of
// partials: for (200704, 64) f32, 3 x 51.4 MB + 1.6 MB, about 0.053 ms on the H100 at the measured copy rate.
//
// Block b owns rows [b chunk, (b + 1) chunk), walked as in the forward. dx (need_dx) is the CPU's
// rstd (gy - mean(gy) - xhat mean(gy xhat)) with gy = g w, its two means by group butterflies. The weight and
// bias sums (need_sums) add g xhat and g into the thread's registers (its columns are the same in every row;
// at most chunk / (blockDim / G) rows each, which the launch keeps at 32 or fewer), then into doubles: a
// butterfly over the warp's groups, and the warps in order through shared memory (2 d doubles) into
// partial[b][0 .. 2 d), for ln_bwd_reduce.
template <typename T, int NV, int RPT>
__device__ void ln_bwd_reg_impl(const T* x, const T* w, Strided lw, int has_w, const T* mean, const T* rstd,
                                const T* g, T* dx, const T* pend, int has_pend, double* partial, long long rows,
                                int d, int G, long long chunk, int need_dx, int need_sums) {
    extern __shared__ double ln_acc[];
    typedef typename LnVec<T>::type V;
    const int VN = LnVec<T>::n;
    const int nvec = d / VN, lane = threadIdx.x & 31, gl = lane & (G - 1), sub = lane / G, warp = threadIdx.x >> 5;
    const int per_warp = (32 / G) * RPT;
    T wr[NV][VN], aw[NV][VN], ab[NV][VN];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
#pragma unroll
        for (int e = 0; e < VN; ++e) {
            const long long col = (long long)(gl + G * k) * VN + e;
            wr[k][e] = has_w && gl + G * k < nvec ? w[offset_of(lw, col)] : T(1);
            aw[k][e] = ab[k][e] = T(0);
        }
    }
    const long long b0 = (long long)blockIdx.x * chunk, b1 = min(rows, b0 + chunk);
    for (long long base = b0 + (long long)warp * per_warp; base < b1; base += (long long)(blockDim.x >> 5) * per_warp) {
        const long long r0 = base + (long long)sub * RPT;
        V xv[RPT][NV], gv[RPT][NV];
        T m[RPT], rs[RPT];
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
            const bool row_ok = r0 + r < b1;
            m[r] = row_ok ? mean[r0 + r] : T(0);
            rs[r] = row_ok ? rstd[r0 + r] : T(0);
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                const T zero[4] = {T(0), T(0), T(0), T(0)};
                xv[r][k] = gv[r][k] = LnVec<T>::make(zero);
                if (row_ok && gl + G * k < nvec) {
                    xv[r][k] = *(const V*)(x + (r0 + r) * d + (gl + G * k) * VN);
                    gv[r][k] = *(const V*)(g + (r0 + r) * d + (gl + G * k) * VN);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
            if (need_sums) {
#pragma unroll
                for (int k = 0; k < NV; ++k) {
#pragma unroll
                    for (int e = 0; e < VN; ++e) {
                        const T gk = LnVec<T>::get(gv[r][k], e);
                        aw[k][e] += gk * ((LnVec<T>::get(xv[r][k], e) - m[r]) * rs[r]);
                        ab[k][e] += gk;
                    }
                }
            }
            if (need_dx) {
                T s1 = T(0), s2 = T(0);
#pragma unroll
                for (int k = 0; k < NV; ++k) {
#pragma unroll
                    for (int e = 0; e < VN; ++e) {
                        const T gy = LnVec<T>::get(gv[r][k], e) * wr[k][e];
                        s1 += gy;
                        s2 += gy * ((LnVec<T>::get(xv[r][k], e) - m[r]) * rs[r]);
                    }
                }
                const T a = group_sum(s1, G) / (T)d, bb = group_sum(s2, G) / (T)d;
                if (r0 + r < b1) {
#pragma unroll
                    for (int k = 0; k < NV; ++k) {
                        if (gl + G * k < nvec) {
                            T o[4];
                            const long long at = (r0 + r) * d + (gl + G * k) * VN;
                            const V pv = has_pend ? *(const V*)(pend + at) : gv[r][k];
#pragma unroll
                            for (int e = 0; e < VN; ++e) {
                                const T gy = LnVec<T>::get(gv[r][k], e) * wr[k][e];
                                const T xh = (LnVec<T>::get(xv[r][k], e) - m[r]) * rs[r];
                                const T v = rs[r] * (gy - a - xh * bb);
                                o[e] = has_pend ? ln_add_rn(LnVec<T>::get(pv, e), v) : v;
                            }
                            *(V*)(dx + (r0 + r) * d + (gl + G * k) * VN) = LnVec<T>::make(o);
                        }
                    }
                }
            }
        }
    }
    if (need_sums) {
        double sw[NV][VN], sb[NV][VN];
#pragma unroll
        for (int k = 0; k < NV; ++k) {
#pragma unroll
            for (int e = 0; e < VN; ++e) {
                sw[k][e] = (double)aw[k][e];
                sb[k][e] = (double)ab[k][e];
                for (int o = G; o < 32; o <<= 1) {
                    sw[k][e] += __shfl_xor_sync(0xffffffffu, sw[k][e], o);
                    sb[k][e] += __shfl_xor_sync(0xffffffffu, sb[k][e], o);
                }
            }
        }
        for (int wp = 0; wp < (int)(blockDim.x >> 5); ++wp) {
            if (warp == wp && lane < G) {
#pragma unroll
                for (int k = 0; k < NV; ++k) {
                    if (gl + G * k < nvec) {
#pragma unroll
                        for (int e = 0; e < VN; ++e) {
                            const int col = (gl + G * k) * VN + e;
                            ln_acc[col] = (wp == 0 ? 0.0 : ln_acc[col]) + sw[k][e];
                            ln_acc[d + col] = (wp == 0 ? 0.0 : ln_acc[d + col]) + sb[k][e];
                        }
                    }
                }
            }
            __syncthreads();
        }
        double* out = partial + (long long)blockIdx.x * 2 * d;
        for (int k = threadIdx.x; k < 2 * d; k += blockDim.x) out[k] = ln_acc[k];
    }
}

// ---- batch_norm2d over (N, H, W) per channel -------------------------------------------------------------
//
// x is (N, C, HW) contiguous: the M = N HW elements of channel ch lie in N planes of HW elements, the plane of
// sample s at (s C + ch) HW. Element e of the channel (0 <= e < M) is position e % HW of sample e / HW's plane.
//
// Work is cut into tasks: each channel into `splits` slices of `per` consecutive elements, slice k holding
// [k per, min(M, (k + 1) per)) (none empty: see `BnPlan` in cuda.rs), task t = ch splits + k. Blocks stride
// over the tasks (the launches give one block per task when the grid allows). Thread j of a block takes the
// slice's elements lo + j, lo + j + blockDim, ...: neighbouring threads read neighbouring addresses within a
// plane, and a walker (BnWalk) follows (plane, position) by additions, with no division per element.
//
// With splits = 1 a block owns a whole channel and one fused kernel does an op (bn_fwd_train, bn_bwd). With
// splits > 1 an op takes two launches: the first kernel (bn_fwd_stats, bn_bwd_sums) writes each task's partial
// sums, two doubles, to part[2 t] and part[2 t + 1]; the second (bn_fwd_apply, bn_bwd_dx) works out its
// channel's totals from the channel's partials, the same way in every warp of every block (so all get the same
// bits), then makes its elementwise pass over its slice. No atomics: fixed decompositions and orders, the same
// bits run after run.

// Loads a thread has in flight at once in the slice loops below (one batch of indices, then their loads).
#define BN_UNROLL 4

// A thread's walk over the elements e0, e0 + step, e0 + 2 step, ... of channel ch: `e` the element of the
// channel, `base + p` its index in x (base the start of its plane, p its position in the plane). One division
// when it starts; each step adds (step / HW) planes and step % HW positions, carrying one plane when p
// overflows (step % HW < HW, so one carry at most).
struct BnWalk {
    long long e, base, p;
    long long step, dbase, dp, hw, plane;
    __device__ BnWalk(long long e0, long long step_, long long ch, long long c, long long hw_) {
        hw = hw_;
        plane = c * hw_;
        step = step_;
        dbase = (step_ / hw_) * plane;
        dp = step_ % hw_;
        e = e0;
        base = (e0 / hw_) * plane + ch * hw_;
        p = e0 % hw_;
    }
    __device__ __forceinline__ long long index() const { return base + p; }
    __device__ __forceinline__ void next() {
        e += step;
        base += dbase;
        p += dp;
        if (p >= hw) {
            p -= hw;
            base += plane;
        }
    }
};

// Calls f(i, cnt) for this thread's elements of [lo, hi) of channel ch in batches: i[0..cnt) the x-indices of up
// to BN_UNROLL consecutive elements of its walk (cnt >= 1), so that f can issue all their loads before using any.
// Only threads with an element in the range start a walk (HW > 0 then, since lo < hi <= N HW).
template <typename F>
__device__ __forceinline__ void bn_slice_batches(long long ch, long long c, long long hw, long long lo, long long hi,
                                                 F f) {
    if (lo + (long long)threadIdx.x >= hi) return;
    BnWalk w(lo + threadIdx.x, blockDim.x, ch, c, hw);
    while (w.e < hi) {
        long long i[BN_UNROLL];
        int k = 0;
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u) {
            if (w.e < hi) {
                i[u] = w.index();
                w.next();
                k = u + 1;
            }
        }
        f(i, k);
    }
}

// Elements a thread holds at once in bn_slice_moments: a chunk of the slice is blockDim.x BN_CHUNK elements.
#define BN_CHUNK 16

// The sum S of x over [lo, hi) of channel ch and the sum Q of its squares about its mean S / (hi - lo), in every
// thread of the block (double), with one read of x. The slice goes in chunks of blockDim.x BN_CHUNK elements:
// each thread loads its (up to) BN_CHUNK elements of the chunk into registers, all loads in flight together;
// the chunk's sum s_c (block_sum), then its squares about its own mean q_c from the registers (two passes, as
// the CPU, without reading x twice: re-reading a slice of ~200 KB per block came from DRAM, which held the
// kernel at ~0.8 TB/s); then the chunk joins the running totals by Chan's exact update
//     Q += q_c + (s_c / n_c - S / n)^2 n n_c / (n + n_c),    S += s_c,    n += n_c
// whose terms are all >= 0 (nothing cancels). Chunks in order, block_sum's fixed tree: the same bits every run.
template <typename T>
__device__ void bn_slice_moments(const T* x, long long ch, long long c, long long hw, long long lo, long long hi,
                                 double& s_out, double& q_out) {
    const long long chunk = (long long)blockDim.x * BN_CHUNK;
    double s_tot = 0.0, q_tot = 0.0;
    long long n = 0;
    // One walk for the whole slice: a chunk's BN_CHUNK steps of blockDim.x bring the thread to its element of
    // the next chunk.
    BnWalk w(lo + threadIdx.x, blockDim.x, ch, c, hw);
    for (long long c0 = lo; c0 < hi; c0 += chunk) {
        const long long nc = min(hi, c0 + chunk) - c0;
        T v[BN_CHUNK];
        int cnt = 0;
#pragma unroll
        for (int u = 0; u < BN_CHUNK; ++u) {
            if (w.e < hi) {
                v[u] = x[w.index()];
                w.next();
                cnt = u + 1;
            }
        }
        double s = 0.0;
#pragma unroll
        for (int u = 0; u < BN_CHUNK; ++u)
            if (u < cnt) s += (double)v[u];
        const double sc = block_sum(s);
        const double mc = sc / (double)nc;
        double q = 0.0;
#pragma unroll
        for (int u = 0; u < BN_CHUNK; ++u) {
            if (u < cnt) {
                const double t = (double)v[u] - mc;
                q += t * t;
            }
        }
        const double qc = block_sum(q);
        if (n == 0) {
            s_tot = sc;
            q_tot = qc;
        } else {
            const double d = mc - s_tot / (double)n;
            q_tot += qc + d * d * ((double)n * (double)nc / (double)(n + nc));
            s_tot += sc;
        }
        n += nc;
    }
    s_out = s_tot;
    q_out = q_tot;
}

// y = (x - mean) scale + shift over [lo, hi) of channel ch, in T (the CPU's order).
template <typename T>
__device__ void bn_slice_apply(const T* x, T* y, long long ch, long long c, long long hw, long long lo, long long hi,
                               T mean_t, T scale, T shift) {
    bn_slice_batches(ch, c, hw, lo, hi, [&](const long long(&i)[BN_UNROLL], int cnt) {
        T v[BN_UNROLL];
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u)
            if (u < cnt) v[u] = x[i[u]];
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u)
            if (u < cnt) y[i[u]] = (v[u] - mean_t) * scale + shift;
    });
}

// Channel ch's saved statistics and its y over [lo, hi), from its mean and biased variance v: rstd =
// 1 / sqrt(v + eps), scale = rstd w rounded once (the CPU's order). `save`: this block writes mean, var, rstd.
template <typename T>
__device__ __forceinline__ void bn_fwd_finish(const T* x, const T* w, const Strided& lw, int has_w, const T* b,
                                              const Strided& lb, int has_b, T* y, T* mean, T* var, T* rstd,
                                              long long ch, long long c, long long hw, long long lo, long long hi,
                                              double mu, double v, double eps, bool save) {
    const double r = 1.0 / sqrt(v + eps);
    const T mean_t = (T)mu;
    const T scale = (T)(r * (has_w ? (double)w[offset_of(lw, ch)] : 1.0));
    const T shift = has_b ? b[offset_of(lb, ch)] : T(0);
    bn_slice_apply(x, y, ch, c, hw, lo, hi, mean_t, scale, shift);
    if (save && threadIdx.x == 0) {
        mean[ch] = mean_t;
        var[ch] = (T)v;
        rstd[ch] = (T)r;
    }
}

// Training, fused (splits = 1): a block per channel computes the batch mean and biased variance (one read,
// bn_slice_moments, double), writes y and saves mean, var and rstd (var feeds the running update, rstd the backward).
template <typename T>
__device__ void bn_fwd_train_impl(const T* x, const T* w, Strided lw, int has_w, const T* b, Strided lb, int has_b,
                                  T* y, T* mean, T* var, T* rstd, long long n, long long c, long long hw,
                                  double eps) {
    const long long m = n * hw;
    for (long long ch = blockIdx.x; ch < c; ch += gridDim.x) {
        double sum, squares;
        bn_slice_moments(x, ch, c, hw, 0, m, sum, squares);
        const double mu = sum / (double)m, v = squares / (double)m;
        bn_fwd_finish(x, w, lw, has_w, b, lb, has_b, y, mean, var, rstd, ch, c, hw, 0, m, mu, v, eps, true);
    }
}

// Training, split, launch 1 of 2: task t's slice sum S and its sum of squares about the slice's own mean Q
// (bn_slice_moments: one read of the slice) to part[2 t], part[2 t + 1].
template <typename T>
__device__ void bn_fwd_stats_impl(const T* x, double* part, long long n, long long c, long long hw, long long splits,
                                  long long per) {
    const long long m = n * hw;
    for (long long t = blockIdx.x; t < c * splits; t += gridDim.x) {
        const long long ch = t / splits, lo = (t % splits) * per, hi = min(m, lo + per);
        double s, q;
        bn_slice_moments(x, ch, c, hw, lo, hi, s, q);
        if (threadIdx.x == 0) {
            part[2 * t] = s;
            part[2 * t + 1] = q;
        }
    }
}

// Channel ch's mean and biased variance from its slices' partials (bn_fwd_stats), in every lane of the warp:
//     mean = sum_k S_k / M,    var = sum_k [Q_k + n_k (S_k / n_k - mean)^2] / M
// with n_k the slice's elements. Exact in exact arithmetic (the squares about the channel's mean are each
// slice's squares about its own mean plus n_k times the squared shift), and every term is >= 0, so nothing
// cancels: as accurate as the two passes over the channel. Lane j adds slices j, j + 32, ... in order, then the
// butterfly adds the lanes, giving every lane of every warp that calls it the same bits.
__device__ __forceinline__ void bn_combine_moments(const double* part, long long ch, long long splits, long long per,
                                                   long long m, double& mu, double& v) {
    const int lane = threadIdx.x & 31;
    const double* pc = part + 2 * ch * splits;
    double s = 0.0;
    for (long long k = lane; k < splits; k += 32) s += pc[2 * k];
    mu = warp_sum(s) / (double)m;
    double q = 0.0;
    for (long long k = lane; k < splits; k += 32) {
        const double nk = (double)(min(m, (k + 1) * per) - k * per);
        const double d = pc[2 * k] / nk - mu;
        q += pc[2 * k + 1] + nk * d * d;
    }
    v = warp_sum(q) / (double)m;
}

// Training, split, launch 2 of 2: each task combines its channel's partials (every warp alike) and writes y
// over its slice; the task of slice 0 saves the channel's mean, var and rstd.
template <typename T>
__device__ void bn_fwd_apply_impl(const T* x, const T* w, Strided lw, int has_w, const T* b, Strided lb, int has_b,
                                  const double* part, T* y, T* mean, T* var, T* rstd, long long n, long long c,
                                  long long hw, long long splits, long long per, double eps) {
    const long long m = n * hw;
    for (long long t = blockIdx.x; t < c * splits; t += gridDim.x) {
        const long long ch = t / splits, k = t % splits, lo = k * per, hi = min(m, lo + per);
        double mu, v;
        bn_combine_moments(part, ch, splits, per, m, mu, v);
        bn_fwd_finish(x, w, lw, has_w, b, lb, has_b, y, mean, var, rstd, ch, c, hw, lo, hi, mu, v, eps, k == 0);
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

// The backward's per-channel sums over [lo, hi) of channel ch, in every thread of the block (double):
// sg = sum g and sgx = sum g xhat, each product g (x - mean) rstd rounded in T first (the CPU's order).
template <typename T>
__device__ void bn_slice_grad_sums(const T* x, const T* g, T mu, T rs, long long ch, long long c, long long hw,
                                   long long lo, long long hi, double& sg, double& sgx) {
    double a = 0.0, b = 0.0;
    bn_slice_batches(ch, c, hw, lo, hi, [&](const long long(&i)[BN_UNROLL], int cnt) {
        T gv[BN_UNROLL], xv[BN_UNROLL];
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u) {
            if (u < cnt) {
                gv[u] = g[i[u]];
                xv[u] = x[i[u]];
            }
        }
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u) {
            if (u < cnt) {
                a += (double)gv[u];
                b += (double)(gv[u] * (xv[u] - mu) * rs);
            }
        }
    });
    sg = block_sum(a);
    sgx = block_sum(b);
}

// Channel ch's dw, db (thread 0, when `save`) and dx over [lo, hi) from its sums sg, sgx over all M elements:
// dx = rstd w (g - mean(g) - xhat mean(g xhat)) with the batch statistics, rstd w g with the running ones.
template <typename T>
__device__ __forceinline__ void bn_bwd_finish(const T* x, const T* w, const Strided& lw, int has_w, const T* g,
                                              T* dx, T* dw, T* db, T mu, T rs, long long ch, long long c,
                                              long long hw, long long lo, long long hi, long long m, double sg,
                                              double sgx, int batch_stats, int need_dx, int need_w, int need_b,
                                              bool save) {
    if (save && threadIdx.x == 0) {
        if (need_w) dw[ch] = (T)sgx;
        if (need_b) db[ch] = (T)sg;
    }
    if (!need_dx) return;
    const T k = has_w ? rs * w[offset_of(lw, ch)] : rs;
    const T a = (T)(sg / (double)m), bb = (T)(sgx / (double)m);
    bn_slice_batches(ch, c, hw, lo, hi, [&](const long long(&i)[BN_UNROLL], int cnt) {
        T gv[BN_UNROLL], xv[BN_UNROLL];
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u) {
            if (u < cnt) {
                gv[u] = g[i[u]];
                xv[u] = batch_stats ? x[i[u]] : T(0);
            }
        }
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u)
            if (u < cnt) dx[i[u]] = batch_stats ? k * (gv[u] - a - (xv[u] - mu) * rs * bb) : k * gv[u];
    });
}

// The fused backward (splits = 1), one block per channel: the sums where dw, db or the training dx need them,
// then dw, db and dx.
template <typename T>
__device__ void bn_bwd_impl(const T* x, const T* w, Strided lw, int has_w, const T* mean, const T* rstd, const T* g,
                            T* dx, T* dw, T* db, long long n, long long c, long long hw, int batch_stats,
                            int need_dx, int need_w, int need_b) {
    const long long m = n * hw;
    const bool need_sums = need_w || need_b || (need_dx && batch_stats);
    for (long long ch = blockIdx.x; ch < c; ch += gridDim.x) {
        const T mu = mean[ch], rs = rstd[ch];
        double sg = 0.0, sgx = 0.0;
        if (need_sums) bn_slice_grad_sums(x, g, mu, rs, ch, c, hw, 0, m, sg, sgx);
        bn_bwd_finish(x, w, lw, has_w, g, dx, dw, db, mu, rs, ch, c, hw, 0, m, m, sg, sgx, batch_stats, need_dx,
                      need_w, need_b, true);
    }
}

// Backward, split, launch 1 of 2 (only where the sums are needed): task t's slice sums sg, sgx to part[2 t],
// part[2 t + 1].
template <typename T>
__device__ void bn_bwd_sums_impl(const T* x, const T* mean, const T* rstd, const T* g, double* part, long long n,
                                 long long c, long long hw, long long splits, long long per) {
    const long long m = n * hw;
    for (long long t = blockIdx.x; t < c * splits; t += gridDim.x) {
        const long long ch = t / splits, lo = (t % splits) * per, hi = min(m, lo + per);
        double sg, sgx;
        bn_slice_grad_sums(x, g, mean[ch], rstd[ch], ch, c, hw, lo, hi, sg, sgx);
        if (threadIdx.x == 0) {
            part[2 * t] = sg;
            part[2 * t + 1] = sgx;
        }
    }
}

// Backward, split, launch 2 of 2: each task adds its channel's partials (need_sums; every warp alike: lane j
// takes slices j, j + 32, ... in order, then the butterfly), the task of slice 0 writes dw and db, and each
// writes dx over its slice (need_dx). `part` is read only when need_sums.
template <typename T>
__device__ void bn_bwd_dx_impl(const T* x, const T* w, Strided lw, int has_w, const T* mean, const T* rstd,
                               const T* g, const double* part, T* dx, T* dw, T* db, long long n, long long c,
                               long long hw, long long splits, long long per, int batch_stats, int need_dx,
                               int need_w, int need_b, int need_sums) {
    const long long m = n * hw;
    const int lane = threadIdx.x & 31;
    for (long long t = blockIdx.x; t < c * splits; t += gridDim.x) {
        const long long ch = t / splits, k = t % splits, lo = k * per, hi = min(m, lo + per);
        if (!need_dx && k != 0) continue;  // only dw and db to write: the task of slice 0 does
        double sg = 0.0, sgx = 0.0;
        if (need_sums) {
            const double* pc = part + 2 * ch * splits;
            for (long long j = lane; j < splits; j += 32) {
                sg += pc[2 * j];
                sgx += pc[2 * j + 1];
            }
            sg = warp_sum(sg);
            sgx = warp_sum(sgx);
        }
        bn_bwd_finish(x, w, lw, has_w, g, dx, dw, db, mean[ch], rstd[ch], ch, c, hw, lo, hi, m, sg, sgx,
                      batch_stats, need_dx, need_w, need_b, k == 0);
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

// The register-row layer_norm pair of NV vectors a thread per row and RPT rows a thread per step:
// ln_fwd_reg<NV>_<dtype> and ln_bwd_reg<NV>_<dtype>.
#define LN_REG(T, SUFFIX, NV, RPT)                                                                            \
    extern "C" __global__ void ln_fwd_reg##NV##_##SUFFIX(const T* x, const T* w, Strided lw, int has_w,      \
                                                         const T* b, Strided lb, int has_b, T* y, T* mean,    \
                                                         T* rstd, long long rows, int d, int G, double eps) { \
        ln_fwd_reg_impl<T, NV, RPT>(x, w, lw, has_w, b, lb, has_b, y, mean, rstd, rows, d, G, eps);            \
    }                                                                                                          \
    extern "C" __global__ void ln_bwd_reg##NV##_##SUFFIX(                                                     \
        const T* x, const T* w, Strided lw, int has_w, const T* mean, const T* rstd, const T* g, T* dx,       \
        const T* pend, int has_pend, double* partial, long long rows, int d, int G, long long chunk,           \
        int need_dx, int need_sums) {                                                                          \
        ln_bwd_reg_impl<T, NV, RPT>(x, w, lw, has_w, mean, rstd, g, dx, pend, has_pend, partial, rows, d, G,   \
                                    chunk, need_dx, need_sums);                                                \
    }

#define NORM_KERNELS(T, SUFFIX)                                                                               \
    extern "C" __global__ void ln_fwd_##SUFFIX(const T* x, const T* w, Strided lw, int has_w, const T* b,     \
                                               Strided lb, int has_b, T* y, T* mean, T* rstd, long long rows, \
                                               long long d, double eps) {                                     \
        ln_fwd_impl<T>(x, w, lw, has_w, b, lb, has_b, y, mean, rstd, rows, d, eps);                            \
    }                                                                                                          \
    extern "C" __global__ void ln_bwd_##SUFFIX(const T* x, const T* w, Strided lw, int has_w, const T* mean,  \
                                               const T* rstd, const T* g, T* dx, const T* pend, int has_pend, \
                                               double* partial, long long rows, long long d, long long chunk, \
                                               int need_dx, int need_sums, int use_shared) {                  \
        ln_bwd_impl<T>(x, w, lw, has_w, mean, rstd, g, dx, pend, has_pend, partial, rows, d, chunk, need_dx,   \
                       need_sums, use_shared);                                                                 \
    }                                                                                                          \
    LN_REG(T, SUFFIX, 1, 4)                                                                                   \
    LN_REG(T, SUFFIX, 2, 2)                                                                                   \
    LN_REG(T, SUFFIX, 4, 1)                                                                                   \
    LN_REG(T, SUFFIX, 8, 1)                                                                                   \
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
    extern "C" __global__ void bn_fwd_stats_##SUFFIX(const T* x, double* part, long long n, long long c,      \
                                                     long long hw, long long splits, long long per) {         \
        bn_fwd_stats_impl<T>(x, part, n, c, hw, splits, per);                                                  \
    }                                                                                                          \
    extern "C" __global__ void bn_fwd_apply_##SUFFIX(const T* x, const T* w, Strided lw, int has_w,           \
                                                     const T* b, Strided lb, int has_b, const double* part,   \
                                                     T* y, T* mean, T* var, T* rstd, long long n,             \
                                                     long long c, long long hw, long long splits,             \
                                                     long long per, double eps) {                             \
        bn_fwd_apply_impl<T>(x, w, lw, has_w, b, lb, has_b, part, y, mean, var, rstd, n, c, hw, splits, per,   \
                             eps);                                                                             \
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
    extern "C" __global__ void bn_bwd_sums_##SUFFIX(const T* x, const T* mean, const T* rstd, const T* g,     \
                                                    double* part, long long n, long long c, long long hw,     \
                                                    long long splits, long long per) {                        \
        bn_bwd_sums_impl<T>(x, mean, rstd, g, part, n, c, hw, splits, per);                                    \
    }                                                                                                          \
    extern "C" __global__ void bn_bwd_dx_##SUFFIX(                                                            \
        const T* x, const T* w, Strided lw, int has_w, const T* mean, const T* rstd, const T* g,              \
        const double* part, T* dx, T* dw, T* db, long long n, long long c, long long hw, long long splits,    \
        long long per, int batch_stats, int need_dx, int need_w, int need_b, int need_sums) {                 \
        bn_bwd_dx_impl<T>(x, w, lw, has_w, mean, rstd, g, part, dx, dw, db, n, c, hw, splits, per,             \
                          batch_stats, need_dx, need_w, need_b, need_sums);                                    \
    }                                                                                                          \
    extern "C" __global__ void bn_blend_##SUFFIX(T* running, Strided lr, const T* stat, long long c,          \
                                                 double momentum, double scale) {                             \
        bn_blend_impl<T>(running, lr, stat, c, momentum, scale);                                               \
    }

NORM_KERNELS(float, f32)
NORM_KERNELS(double, f64)
