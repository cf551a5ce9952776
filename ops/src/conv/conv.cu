// Convolution kernels (see conv/cuda.rs for how they are put together, conv/mod.rs for the math). The formulas
// and the order of every per-element sum are those of conv/cpu.rs, so the two devices differ by rounding only:
// an output adds its taps (i, j) in row-major order onto the bias; dx adds its taps in the same order.
//
// Tensors are contiguous and row-major: x (N, C, H, W), weight (O, C/G, kh, kw), y and g (N, O, OH, OW); a
// bias is any vector view, read through its `Strided`. Reductions (weight and bias gradients) run a block per
// output value or per (output, chunk) followed by an ordered sum of the chunks, accumulate in double and
// combine in a fixed order: the results do not depend on timing.
//
// Kernel names: <kernel>_<dtype>; the depthwise forward also has a 3x3 instance (dw_fwd_3x3_<dtype>) whose
// tap loops the compiler unrolls.

// Geometry of a conv2d call, mirrored by `Conv2dParams` in conv/cuda.rs (16 x i64, 128 bytes).
struct Conv2dParams {
    long long n, c, h, w;  // input
    long long o, kh, kw;   // output channels, kernel
    long long sh, sw, ph, pw, dh, dw;
    long long groups;
    long long oh, ow;  // output plane
};

static_assert(sizeof(Conv2dParams) == 128, "Conv2dParams must match conv/cuda.rs");

// Geometry of a causal conv1d call, mirrored by `Conv1dParams` in conv/cuda.rs.
struct Conv1dParams {
    long long b, c, l, k;
};

static_assert(sizeof(Conv1dParams) == 32, "Conv1dParams must match conv/cuda.rs");

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread. The order of
// the additions is fixed by the thread layout, so a launch of the same shape always gives the same bits.
__device__ __forceinline__ double conv_block_sum(double v) {
    __shared__ double scratch[32];
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // an earlier call's readers are done with scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0;
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
    return v;
}

// ---- depthwise conv2d (G = C = O) ------------------------------------------------------------------------

// y[n, c, a, b] = bias[c] + sum_{i, j} w[c, i, j] x[n, c, a sh - ph + i dh, b sw - pw + j dw]: one thread per
// output pixel. Neighbouring threads read neighbouring pixels of one plane and the same 9 weights, which the
// L1 cache serves; KH, KW > 0 fix the kernel size at compile time (0 reads it from p).
template <typename T, int KH, int KW>
__device__ void dw_fwd_impl(const T* x, const T* wt, const T* bias, Strided lb, int has_bias, T* y, Conv2dParams p) {
    const long long kh = KH > 0 ? KH : p.kh, kw = KW > 0 ? KW : p.kw;
    const long long total = p.n * p.c * p.oh * p.ow;
    GRID_STRIDE(e, total) {
        const long long b = e % p.ow, a = (e / p.ow) % p.oh, nc = e / (p.ow * p.oh), ch = nc % p.c;
        const T* xp = x + nc * p.h * p.w;
        const T* k = wt + ch * kh * kw;
        T acc = has_bias ? bias[offset_of(lb, ch)] : T(0);
        const long long ih0 = a * p.sh - p.ph, iw0 = b * p.sw - p.pw;
#pragma unroll
        for (long long i = 0; i < kh; ++i) {
            const long long ih = ih0 + i * p.dh;
            if (ih < 0 || ih >= p.h) continue;
#pragma unroll
            for (long long j = 0; j < kw; ++j) {
                const long long iw = iw0 + j * p.dw;
                if (iw < 0 || iw >= p.w) continue;
                acc += k[i * kw + j] * xp[ih * p.w + iw];
            }
        }
        y[e] = acc;
    }
}

// The transposed depthwise conv as a gather: dx[n, c, ih, iw] = sum over the taps (i, j) that read (ih, iw)
// from some output (a, b) of w[c, i, j] g[n, c, a, b]. Each dx element has one writer: no atomics.
template <typename T>
__device__ void dw_bwd_dx_impl(const T* g, const T* wt, T* dx, Conv2dParams p) {
    const long long total = p.n * p.c * p.h * p.w;
    GRID_STRIDE(e, total) {
        const long long iw = e % p.w, ih = (e / p.w) % p.h, nc = e / (p.w * p.h), ch = nc % p.c;
        const T* gp = g + nc * p.oh * p.ow;
        const T* k = wt + ch * p.kh * p.kw;
        T acc = T(0);
        for (long long i = 0; i < p.kh; ++i) {
            // Output row a reads input row a sh - ph + i dh = ih.
            const long long ta = ih + p.ph - i * p.dh;
            if (ta < 0 || ta % p.sh != 0 || ta / p.sh >= p.oh) continue;
            const long long a = ta / p.sh;
            for (long long j = 0; j < p.kw; ++j) {
                const long long tb = iw + p.pw - j * p.dw;
                if (tb < 0 || tb % p.sw != 0 || tb / p.sw >= p.ow) continue;
                acc += k[i * p.kw + j] * gp[a * p.ow + tb / p.sw];
            }
        }
        dx[e] = acc;
    }
}

// dw[c, i, j] = sum_{n, a, b} g[n, c, a, b] x[n, c, a sh - ph + i dh, b sw - pw + j dw], first pass: block
// (blockIdx.x, blockIdx.y) = (channel, chunk of `spc` samples) writes its chunk's sum for every tap to
// part[chunk][channel][tap] (sum_partials adds the chunks in order). The block walks its chunk once per tap:
// the chunk is small (a few thousand positions), so the walks after the first are served from cache, and the
// grid has channels x chunks blocks however few channels there are.
template <typename T>
__device__ void dw_bwd_w_impl(const T* x, const T* g, T* part, Conv2dParams p, long long spc, long long chunks) {
    const long long taps = p.kh * p.kw, per = p.oh * p.ow;
    for (long long ch = blockIdx.x; ch < p.c; ch += gridDim.x) {
        for (long long k = blockIdx.y; k < chunks; k += gridDim.y) {
            const long long s0 = k * spc, count = (min(p.n, s0 + spc) - s0) * per;
            for (long long tap = 0; tap < taps; ++tap) {
                const long long i = tap / p.kw, j = tap % p.kw;
                double acc = 0.0;
                for (long long e = threadIdx.x; e < count; e += blockDim.x) {
                    const long long b = e % p.ow, a = (e / p.ow) % p.oh, plane = (s0 + e / per) * p.c + ch;
                    const long long ih = a * p.sh - p.ph + i * p.dh, iw = b * p.sw - p.pw + j * p.dw;
                    if (ih < 0 || ih >= p.h || iw < 0 || iw >= p.w) continue;
                    acc += (double)(g[(plane * p.oh + a) * p.ow + b] * x[(plane * p.h + ih) * p.w + iw]);
                }
                acc = conv_block_sum(acc);
                if (threadIdx.x == 0) part[(k * p.c + ch) * taps + tap] = (T)acc;
            }
        }
    }
}

// ---- what every conv shares -------------------------------------------------------------------------------

// db[ch] = sum_{s, q} g[s, ch, q] for g (samples, channels, per): one block per channel (conv2d's bias with
// per = OH OW, conv1d's with per = L).
template <typename T>
__device__ void channel_sum_impl(const T* g, T* db, long long samples, long long channels, long long per) {
    for (long long ch = blockIdx.x; ch < channels; ch += gridDim.x) {
        double acc = 0.0;
        for (long long e = threadIdx.x; e < samples * per; e += blockDim.x) {
            acc += (double)g[((e / per) * channels + ch) * per + e % per];
        }
        acc = conv_block_sum(acc);
        if (threadIdx.x == 0) db[ch] = (T)acc;
    }
}

// ---- dense and grouped conv2d: im2col + cuBLAS --------------------------------------------------------------

// y[n, o, q] = bias[o] for all of y, which the products then accumulate onto (beta = 1), as the CPU does.
template <typename T>
__device__ void bias_fill_impl(const T* bias, Strided lb, T* y, long long total, long long o, long long per) {
    GRID_STRIDE(e, total) { y[e] = bias[offset_of(lb, (e / per) % o)]; }
}

// cols (nb, C, kh, kw, OH OW) for samples n0 .. n0 + nb: row (c, i, j) of sample s holds x[n0 + s, c, ih, iw]
// for every output position, 0 in the padding. Read per group q, rows q C/G kh kw .. are the (C/G kh kw, OH OW)
// matrix of the group's patches.
template <typename T>
__device__ void im2col_impl(const T* x, T* cols, Conv2dParams p, long long n0, long long nb) {
    const long long per = p.oh * p.ow;
    const long long total = nb * p.c * p.kh * p.kw * per;
    GRID_STRIDE(e, total) {
        const long long q = e % per;
        long long t = e / per;
        const long long j = t % p.kw;
        t /= p.kw;
        const long long i = t % p.kh;
        t /= p.kh;  // t = s C + c, the plane within the chunk
        const long long ih = (q / p.ow) * p.sh - p.ph + i * p.dh, iw = (q % p.ow) * p.sw - p.pw + j * p.dw;
        const bool inside = ih >= 0 && ih < p.h && iw >= 0 && iw < p.w;
        cols[e] = inside ? x[((n0 * p.c + t) * p.h + ih) * p.w + iw] : T(0);
    }
}

// The adjoint of im2col as a gather: dx[n0 + s, c, ih, iw] = sum of the dcols entries im2col would have read it
// into, taps (i, j) in row-major order. One writer per dx element: no atomics, and the order is fixed.
template <typename T>
__device__ void col2im_impl(const T* dcols, T* dx, Conv2dParams p, long long n0, long long nb) {
    const long long per = p.oh * p.ow;
    const long long total = nb * p.c * p.h * p.w;
    GRID_STRIDE(e, total) {
        const long long iw = e % p.w, ih = (e / p.w) % p.h, plane = e / (p.w * p.h);
        const T* rows = dcols + plane * p.kh * p.kw * per;
        T acc = T(0);
        for (long long i = 0; i < p.kh; ++i) {
            const long long ta = ih + p.ph - i * p.dh;
            if (ta < 0 || ta % p.sh != 0 || ta / p.sh >= p.oh) continue;
            const long long a = ta / p.sh;
            for (long long j = 0; j < p.kw; ++j) {
                const long long tb = iw + p.pw - j * p.dw;
                if (tb < 0 || tb % p.sw != 0 || tb / p.sw >= p.ow) continue;
                acc += rows[(i * p.kw + j) * per + a * p.ow + tb / p.sw];
            }
        }
        dx[n0 * p.c * p.h * p.w + e] = acc;
    }
}

// out[e] (+)= sum_{s < nb} part[s len + e]: the per-sample weight gradients of one chunk of samples summed in
// sample order (added to the earlier chunks' total when `accumulate`).
template <typename T>
__device__ void sum_partials_impl(const T* part, T* out, long long len, long long nb, int accumulate) {
    GRID_STRIDE(e, len) {
        double acc = accumulate ? (double)out[e] : 0.0;
        for (long long s = 0; s < nb; ++s) acc += (double)part[s * len + e];
        out[e] = (T)acc;
    }
}

// ---- causal depthwise conv1d ----------------------------------------------------------------------------

// y[b, c, t] = bias[c] + sum_{j >= k - 1 - t} w[c, j] x[b, c, t + j - (k - 1)]: one thread per output.
template <typename T>
__device__ void cc1d_fwd_impl(const T* x, const T* wt, const T* bias, Strided lb, int has_bias, T* y, Conv1dParams p) {
    GRID_STRIDE(e, p.b * p.c * p.l) {
        const long long t = e % p.l, row = e / p.l, ch = row % p.c;
        const T* xr = x + row * p.l;
        const T* k = wt + ch * p.k;
        T acc = has_bias ? bias[offset_of(lb, ch)] : T(0);
        for (long long j = max(0LL, p.k - 1 - t); j < p.k; ++j) acc += k[j] * xr[t + j - (p.k - 1)];
        y[e] = acc;
    }
}

// dx[b, c, s] = sum_{j : s + k - 1 - j < L} g[b, c, s + k - 1 - j] w[c, j]: one thread per input element.
template <typename T>
__device__ void cc1d_bwd_dx_impl(const T* g, const T* wt, T* dx, Conv1dParams p) {
    GRID_STRIDE(e, p.b * p.c * p.l) {
        const long long s = e % p.l, row = e / p.l, ch = row % p.c;
        const T* gr = g + row * p.l;
        const T* k = wt + ch * p.k;
        T acc = T(0);
        for (long long j = max(0LL, s + p.k - p.l); j < p.k; ++j) acc += gr[s + p.k - 1 - j] * k[j];
        dx[e] = acc;
    }
}

// dw[c, j] = sum_{b, t >= lag} g[b, c, t] x[b, c, t - lag] with lag = k - 1 - j: one block per (channel, tap).
template <typename T>
__device__ void cc1d_bwd_w_impl(const T* x, const T* g, T* dwt, Conv1dParams p) {
    for (long long ch = blockIdx.x; ch < p.c; ch += gridDim.x) {
        for (long long j = blockIdx.y; j < p.k; j += gridDim.y) {
            const long long lag = p.k - 1 - j;
            double acc = 0.0;
            for (long long e = threadIdx.x; e < p.b * p.l; e += blockDim.x) {
                const long long t = e % p.l, row = (e / p.l) * p.c + ch;
                if (t >= lag) acc += (double)(g[row * p.l + t] * x[row * p.l + t - lag]);
            }
            acc = conv_block_sum(acc);
            if (threadIdx.x == 0) dwt[ch * p.k + j] = (T)acc;
        }
    }
}

// ---- entry points ------------------------------------------------------------------------------------------

#define CONV_KERNELS(T, SUFFIX)                                                                              \
    extern "C" __global__ void dw_fwd_##SUFFIX(const T* x, const T* w, const T* bias, Strided lb,             \
                                               int has_bias, T* y, Conv2dParams p) {                          \
        dw_fwd_impl<T, 0, 0>(x, w, bias, lb, has_bias, y, p);                                                 \
    }                                                                                                          \
    extern "C" __global__ void dw_fwd_3x3_##SUFFIX(const T* x, const T* w, const T* bias, Strided lb,         \
                                                   int has_bias, T* y, Conv2dParams p) {                      \
        dw_fwd_impl<T, 3, 3>(x, w, bias, lb, has_bias, y, p);                                                 \
    }                                                                                                          \
    extern "C" __global__ void dw_bwd_dx_##SUFFIX(const T* g, const T* w, T* dx, Conv2dParams p) {            \
        dw_bwd_dx_impl<T>(g, w, dx, p);                                                                        \
    }                                                                                                          \
    extern "C" __global__ void dw_bwd_w_##SUFFIX(const T* x, const T* g, T* part, Conv2dParams p,             \
                                                 long long spc, long long chunks) {                           \
        dw_bwd_w_impl<T>(x, g, part, p, spc, chunks);                                                          \
    }                                                                                                          \
    extern "C" __global__ void channel_sum_##SUFFIX(const T* g, T* db, long long samples, long long channels, \
                                                    long long per) {                                          \
        channel_sum_impl<T>(g, db, samples, channels, per);                                                    \
    }                                                                                                          \
    extern "C" __global__ void bias_fill_##SUFFIX(const T* bias, Strided lb, T* y, long long total,          \
                                                  long long o, long long per) {                               \
        bias_fill_impl<T>(bias, lb, y, total, o, per);                                                         \
    }                                                                                                          \
    extern "C" __global__ void im2col_##SUFFIX(const T* x, T* cols, Conv2dParams p, long long n0,            \
                                               long long nb) {                                                \
        im2col_impl<T>(x, cols, p, n0, nb);                                                                    \
    }                                                                                                          \
    extern "C" __global__ void col2im_##SUFFIX(const T* dcols, T* dx, Conv2dParams p, long long n0,          \
                                               long long nb) {                                                \
        col2im_impl<T>(dcols, dx, p, n0, nb);                                                                  \
    }                                                                                                          \
    extern "C" __global__ void sum_partials_##SUFFIX(const T* part, T* out, long long len, long long nb,     \
                                                     int accumulate) {                                        \
        sum_partials_impl<T>(part, out, len, nb, accumulate);                                                  \
    }                                                                                                          \
    extern "C" __global__ void cc1d_fwd_##SUFFIX(const T* x, const T* w, const T* bias, Strided lb,           \
                                                 int has_bias, T* y, Conv1dParams p) {                        \
        cc1d_fwd_impl<T>(x, w, bias, lb, has_bias, y, p);                                                      \
    }                                                                                                          \
    extern "C" __global__ void cc1d_bwd_dx_##SUFFIX(const T* g, const T* w, T* dx, Conv1dParams p) {          \
        cc1d_bwd_dx_impl<T>(g, w, dx, p);                                                                      \
    }                                                                                                          \
    extern "C" __global__ void cc1d_bwd_w_##SUFFIX(const T* x, const T* g, T* dw, Conv1dParams p) {           \
        cc1d_bwd_w_impl<T>(x, g, dw, p);                                                                       \
    }

CONV_KERNELS(float, f32)
CONV_KERNELS(double, f64)
