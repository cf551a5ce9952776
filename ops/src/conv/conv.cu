// Convolution kernels (see conv/cuda.rs for how they are put together, conv/mod.rs for the math). The formulas
// and the order of every per-element sum are those of conv/cpu.rs, so the two devices differ by rounding only:
// an output adds its taps (i, j) in row-major order onto the bias; dx adds its taps in the same order.
//
// Tensors are contiguous and row-major: x (N, C, H, W), weight (O, C/G, kh, kw), y and g (N, O, OH, OW), but for
// the channels-last depthwise kernels (dwl_*), which read and write (N, H, W, C); a bias is any vector view, read
// through its `Strided`. Reductions (weight and bias gradients) run a block per
// output value or per (output, chunk), or (the tiled depthwise backward) per tile, followed by an ordered sum of
// the chunks; they combine in double in a fixed order (the tiled depthwise backward sums each thread's few
// dozen terms in T first): the results do not depend on timing.
//
// Kernel names: <kernel>_<dtype>; the tiled depthwise kernels have one instance per fixed kernel size and
// stride (dw_fwd_3x3s1_<dtype>, ..., and dw_fwd_any_<dtype> with run-time loops); the channels-last ones also
// one per access width (dwl_fwd_3x3s1_vec_<dtype>: 16 bytes of channels a thread, dwl_fwd_3x3s1_one_<dtype>);
// the direct 3x3 stride-2 padding-1 ones are dw_s2_fwd_<dtype> and dw_s2_bwd_<dtype>.
//
// emu/harness.cpp runs the channels-last kernels and the direct stride-2 ones on the scan's CPU emulator against
// a float64 reference.

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

// ---- depthwise conv2d (G = C = O): tiled kernels ------------------------------------------------------------

// Launch plan of the tiled depthwise kernels, mirrored by `DwTile` in conv/cuda.rs (20 x i32, 80 bytes), which
// also computes it (`dw_plan`). Block b takes channel ch, samples n0 .. n0 + planes of it and a band of `rows`
// output rows: b = (ch groups + group) bands + band, so one channel's blocks are consecutive. Every size fits
// an int (the plan refuses larger ones); element offsets into the tensors are computed in 64 bits.
struct DwTile {
    int n, c, h, w, oh, ow;
    int kh, kw, sh, sw, ph, pw, dh, dw;
    int planes;  // samples of one channel per block
    int groups;  // ceil(n / planes)
    int rows;    // output rows per band
    int bands;   // ceil(oh / rows)
    int xrows;   // rows of one plane's x tile in shared memory (the most any band needs)
    int grows;   // rows of one plane's g tile (backward; the most any band needs)
};

static_assert(sizeof(DwTile) == 80, "DwTile must match conv/cuda.rs");

// All shared memory of this module's tiled kernels (dynamic, sized by the launch).
extern __shared__ __align__(16) unsigned char dw_smem[];

// n / d for 0 <= n < 2^31 by a multiply and a shift (d fixed per block, 1 <= d < 2^31): the integer division
// of the index decompositions costs three instructions instead of about twenty. m and s as PyTorch's
// IntDivider: s = ceil(log2 d), m = floor(2^32 (2^s - d) / d) + 1.
struct FastDiv {
    unsigned m, s;
};

__device__ __forceinline__ FastDiv fast_div(unsigned d) {
    unsigned s = 0;
    while (s < 31 && (1u << s) < d) ++s;
    const unsigned long long m = ((1ull << 32) * ((1ull << s) - d)) / d + 1;
    return FastDiv{(unsigned)m, s};
}

__device__ __forceinline__ int div_of(int n, FastDiv f) {
    return (int)((__umulhi((unsigned)n, f.m) + (unsigned)n) >> f.s);
}

// Floor and ceiling of a / b for b > 0 and any sign of a.
__device__ __forceinline__ int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
__device__ __forceinline__ int ceil_div(int a, int b) { return -floor_div(-a, b); }

// 16 bytes of T, for the vector loads of the tile copies.
template <typename T> struct Vec16;
template <> struct Vec16<float> {
    typedef float4 type;
    static const int n = 4;
    static __device__ __forceinline__ void put(float* d, float4 v) { d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w; }
    // Four values to d, 16-byte aligned.
    static __device__ __forceinline__ void store4(float* d, const float* v) { *(float4*)d = make_float4(v[0], v[1], v[2], v[3]); }
};
template <> struct Vec16<double> {
    typedef double2 type;
    static const int n = 2;
    static __device__ __forceinline__ void put(double* d, double2 v) { d[0] = v.x; d[1] = v.y; }
    static __device__ __forceinline__ void store4(double* d, const double* v) {
        ((double2*)d)[0] = make_double2(v[0], v[1]);
        ((double2*)d)[1] = make_double2(v[2], v[3]);
    }
};

// Copies a band of `planes` image planes into shared memory. Plane k of the band is plane `plane0 + k pstride`
// of `src` (planes of rows x cols elements); tile row t of each plane is image row r0 + t (r0 may be negative),
// for t < trows; rows outside the image are zeros. In the tile, plane k starts at k trows cols.
//
// The rows inside the image are one contiguous run of each plane, so the copy is a flat loop over
// planes x run with 16-byte loads when the runs and the planes keep 16-byte alignment (4 floats), else
// 4-byte loads; each thread has up to four loads in flight before it stores.
template <typename T>
__device__ void dw_load_tile(const T* src, long long plane0, long long pstride, int planes, int rows, int cols,
                             int r0, int trows, T* tile) {
    typedef typename Vec16<T>::type V;
    const int VN = Vec16<T>::n;
    const int t_lo = min(max(-r0, 0), trows), t_hi = min(max(rows - r0, t_lo), trows);
    const int count = (t_hi - t_lo) * cols;  // elements copied per plane
    const long long plane_elems = (long long)rows * cols;
    const T* first = src + plane0 * plane_elems + (long long)(r0 + t_lo) * cols;
    const int zeros = (trows - (t_hi - t_lo)) * cols;  // per plane
    if (zeros > 0) {
        const FastDiv dz = fast_div(zeros);
        for (int e = threadIdx.x; e < planes * zeros; e += blockDim.x) {
            const int k = div_of(e, dz), o = e - k * zeros;
            tile[k * trows * cols + (o < t_lo * cols ? o : o + count)] = T(0);
        }
    }
    if (count == 0) return;
    const bool vec = count % VN == 0 && (plane_elems * pstride) % VN == 0 &&
                     ((unsigned long long)first & 15) == 0;
    const int per = vec ? count / VN : count;  // loads per plane
    const int total = planes * per;
    const FastDiv dp = fast_div(per);
    for (int base = threadIdx.x; base < total; base += 4 * blockDim.x) {
        if (vec) {
            V v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int e = base + u * blockDim.x;
                if (e < total) {
                    const int k = div_of(e, dp), o = e - k * per;
                    v[u] = *(const V*)(first + k * pstride * plane_elems + (long long)o * VN);
                }
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int e = base + u * blockDim.x;
                if (e < total) {
                    const int k = div_of(e, dp), o = e - k * per;
                    Vec16<T>::put(tile + k * trows * cols + t_lo * cols + o * VN, v[u]);
                }
            }
        } else {
            T v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int e = base + u * blockDim.x;
                if (e < total) {
                    const int k = div_of(e, dp), o = e - k * per;
                    v[u] = first[k * pstride * plane_elems + o];
                }
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int e = base + u * blockDim.x;
                if (e < total) {
                    const int k = div_of(e, dp), o = e - k * per;
                    tile[k * trows * cols + t_lo * cols + o] = v[u];
                }
            }
        }
    }
}

// Where a block's work lies (see `DwBand` in conv/cuda.rs, which computes the same for the plan's tile sizes):
// output rows [a0, a1) for the forward and the weight gradient, input rows [r0, r1) for dx (the bands split
// both ranges), each rounded up to whole runs of `run` rows (a1r, r1r: the tiles hold the rows the last,
// partial run reads; nothing is written past a1 or r1), and the first g row of the backward's tile, gi0.
struct DwBand {
    int ch, n0, planes, a0, a1, a1r, r0, r1, r1r, gi0;
};

__device__ __forceinline__ DwBand dw_band(const DwTile& p, int run) {
    DwBand b;
    const int band = blockIdx.x % p.bands, rest = blockIdx.x / p.bands;
    const int group = rest % p.groups;
    b.ch = rest / p.groups;
    b.n0 = group * p.planes;
    b.planes = min(p.planes, p.n - b.n0);
    b.a0 = band * p.rows;
    b.a1 = min(p.oh, b.a0 + p.rows);
    b.a1r = b.a0 + (b.a1 - b.a0 + run - 1) / run * run;
    b.r0 = band == 0 ? 0 : min(p.h, b.a0 * p.sh);
    b.r1 = band == p.bands - 1 ? p.h : min(p.h, b.a1 * p.sh);
    b.r1r = b.r0 + (b.r1 - b.r0 + run - 1) / run * run;
    // dx row i reads g rows a with a sh - ph + t dh = i for some tap t; the weight gradient reads rows a0 .. a1r.
    b.gi0 = min(b.a0, ceil_div(b.r0 + p.ph - (p.kh - 1) * p.dh, p.sh));
    return b;
}

// Sums each of the K values of `v` over the block (blockDim.x a multiple of 32) and writes them to out[0..K):
// butterflies within the warps, then the warps' sums in warp order. The shape is fixed: the same launch
// always gives the same bits.
//
// The scratch is static shared memory; DW_STATIC_SHARED lets the CPU emulator (emu/harness.cpp) declare it as
// one array for all the threads of its block.
#ifndef DW_STATIC_SHARED
#define DW_STATIC_SHARED __shared__
#endif
template <int K>
__device__ void dw_block_sums(const double (&v)[K], double* out) {
    DW_STATIC_SHARED double red[32 * K];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int q = 0; q < K; ++q) {
        double s = v[q];
        for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
        if (lane == 0) red[warp * K + q] = s;
    }
    __syncthreads();
    if (threadIdx.x < K) {
        double s = 0.0;
        for (int w = 0; w < warps; ++w) s += red[w * K + threadIdx.x];
        out[threadIdx.x] = s;
    }
}

// Forward, the kernel size and stride fixed at compile time (dilation 1, stride S along both axes).
//
// Bytes: x read once (plus the halo rows of the bands: none when a block holds whole planes), y written once.
// On the H100, (64, 64, 56, 56) f32 is 2 x 51.4 MB: about 0.035 ms at the measured 2976 GB/s copy rate.
//
// The block copies its x band into shared memory, then each thread computes a vertical run of R = 4 output
// rows at one column: it reads the (R - 1) S + KH tile rows the run needs once each (KW values per row, the
// columns outside the image as zeros) and adds every value into the outputs whose taps meet it. Neighbouring
// threads take neighbouring columns: shared-memory reads without bank conflicts at S = 1, coalesced stores.
// Each output adds its taps in row-major order onto the bias, as the CPU.
template <typename T, int KH, int KW, int S>
__device__ void dw_fwd_tiled_impl(const T* x, const T* wt, const T* bias, Strided lb, int has_bias, T* y, DwTile p) {
    const int R = 4;
    T* tile = (T*)dw_smem;
    const DwBand bd = dw_band(p, R);
    dw_load_tile(x, (long long)bd.n0 * p.c + bd.ch, p.c, bd.planes, p.h, p.w, bd.a0 * S - p.ph, p.xrows, tile);
    T k[KH * KW];
#pragma unroll
    for (int t = 0; t < KH * KW; ++t) k[t] = wt[bd.ch * KH * KW + t];
    const T b0 = has_bias ? bias[offset_of(lb, bd.ch)] : T(0);
    __syncthreads();
    const int runs = (bd.a1 - bd.a0 + R - 1) / R, items = bd.planes * runs * p.ow;
    const FastDiv dow = fast_div(p.ow), druns = fast_div(runs);
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
        const int r = div_of(it, dow), b = it - r * p.ow;
        const int kk = div_of(r, druns), a = bd.a0 + (r - kk * runs) * R;
        const T* tp = tile + (kk * p.xrows + (a - bd.a0) * S) * p.w;  // tile row of output row a, tap row 0
        const int c0 = b * S - p.pw;
        bool ok[KW];
#pragma unroll
        for (int j = 0; j < KW; ++j) ok[j] = (unsigned)(c0 + j) < (unsigned)p.w;
        T acc[R];
#pragma unroll
        for (int v = 0; v < R; ++v) acc[v] = b0;
#pragma unroll
        for (int t = 0; t < (R - 1) * S + KH; ++t) {
            T xv[KW];
#pragma unroll
            for (int j = 0; j < KW; ++j) xv[j] = ok[j] ? tp[t * p.w + c0 + j] : T(0);
#pragma unroll
            for (int v = 0; v < R; ++v) {
                const int i = t - v * S;  // the tap row that meets tile row t in output row a + v
                if (i >= 0 && i < KH) {
#pragma unroll
                    for (int j = 0; j < KW; ++j) acc[v] += k[i * KW + j] * xv[j];
                }
            }
        }
        T* yp = y + (((long long)(bd.n0 + kk) * p.c + bd.ch) * p.oh + a) * p.ow + b;
#pragma unroll
        for (int v = 0; v < R; ++v) {
            if (a + v < bd.a1) yp[(long long)v * p.ow] = acc[v];
        }
    }
}

// Forward for any kernel size, stride and dilation: the same tiles, one output per item, run-time tap loops.
template <typename T>
__device__ void dw_fwd_tiled_any_impl(const T* x, const T* wt, const T* bias, Strided lb, int has_bias, T* y,
                                      DwTile p) {
    T* tile = (T*)dw_smem;
    const DwBand bd = dw_band(p, 1);
    dw_load_tile(x, (long long)bd.n0 * p.c + bd.ch, p.c, bd.planes, p.h, p.w, bd.a0 * p.sh - p.ph, p.xrows, tile);
    const T* k = wt + (long long)bd.ch * p.kh * p.kw;
    const T b0 = has_bias ? bias[offset_of(lb, bd.ch)] : T(0);
    __syncthreads();
    const int runs = bd.a1 - bd.a0, items = bd.planes * runs * p.ow;
    const FastDiv dow = fast_div(p.ow), druns = fast_div(runs);
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
        const int r = div_of(it, dow), b = it - r * p.ow;
        const int kk = div_of(r, druns), a = bd.a0 + (r - kk * runs);
        const T* tp = tile + (kk * p.xrows + (a - bd.a0) * p.sh) * p.w;
        const int c0 = b * p.sw - p.pw;
        T acc = b0;
        for (int i = 0; i < p.kh; ++i) {
            for (int j = 0; j < p.kw; ++j) {
                const int col = c0 + j * p.dw;
                if ((unsigned)col < (unsigned)p.w) acc += k[i * p.kw + j] * tp[i * p.dh * p.w + col];
            }
        }
        y[(((long long)(bd.n0 + kk) * p.c + bd.ch) * p.oh + a) * p.ow + b] = acc;
    }
}

// Backward, fused: dx, and the block's partial sums of the weight and bias gradients, from one copy of the
// block's g band (with the halo rows dx reads) and x band in shared memory. Kernel size and stride fixed at
// compile time as in the forward.
//
// Bytes: x and g read once, dx written once (plus halos, and blocks x 10 doubles of partials): for
// (64, 64, 56, 56) f32, 3 x 51.4 MB, about 0.052 ms on the H100 at the measured copy rate.
//
// - dx (need_dx): dx[i, j] = sum_{ti, tj} w[ti, tj] g[(i + ph - ti) / S, (j + pw - tj) / S] over the taps where
//   the divisions are exact and land in g. At S = 1 a thread takes a vertical run of R dx rows and reads each
//   g row of the run once (as the forward); otherwise each dx element gathers its taps. Taps in row-major order.
// - sums (need_sums): the thread's runs of outputs add g x into the KH KW tap sums and g into the bias sum, in
//   registers (T), then the block adds them in double (dw_block_sums) into part[block][0 .. KH KW + 1).
//   dw_reduce adds a channel's blocks in order.
template <typename T, int KH, int KW, int S>
__device__ void dw_bwd_tiled_impl(const T* x, const T* wt, const T* g, T* dx, double* part, DwTile p, int need_dx,
                                  int need_sums) {
    const int R = 4, TAPS = KH * KW;
    T* xt = (T*)dw_smem;
    T* gt = xt + p.planes * p.xrows * p.w;
    const DwBand bd = dw_band(p, R);
    const long long plane0 = (long long)bd.n0 * p.c + bd.ch;
    if (need_sums) dw_load_tile(x, plane0, p.c, bd.planes, p.h, p.w, bd.a0 * S - p.ph, p.xrows, xt);
    dw_load_tile(g, plane0, p.c, bd.planes, p.oh, p.ow, bd.gi0, p.grows, gt);
    T k[TAPS];
#pragma unroll
    for (int t = 0; t < TAPS; ++t) k[t] = wt[bd.ch * TAPS + t];
    __syncthreads();

    if (need_dx) {
        const int runs = (bd.r1 - bd.r0 + R - 1) / R, items = bd.planes * runs * p.w;
        const FastDiv dw_ = fast_div(p.w), druns = fast_div(max(runs, 1));  // a band may own no dx rows
        for (int it = threadIdx.x; it < items; it += blockDim.x) {
            const int r = div_of(it, dw_), j0 = it - r * p.w;
            const int kk = div_of(r, druns), i0 = bd.r0 + (r - kk * runs) * R;
            const T* gp = gt + kk * p.grows * p.ow;
            T acc[R];
#pragma unroll
            for (int v = 0; v < R; ++v) acc[v] = T(0);
            if (S == 1) {
                // Tile row t holds g row i0 + ph - (KH - 1) + t; dx row i0 + v meets it through tap row
                // ti = v + KH - 1 - t. Walking t downwards adds each output's taps in row-major order.
                const T* g0 = gp + (i0 + p.ph - (KH - 1) - bd.gi0) * p.ow;
                const int c0 = j0 + p.pw;  // g column of tap column 0
                bool ok[KW];
#pragma unroll
                for (int tj = 0; tj < KW; ++tj) ok[tj] = (unsigned)(c0 - tj) < (unsigned)p.ow;
#pragma unroll
                for (int t = R + KH - 2; t >= 0; --t) {
                    T gv[KW];
#pragma unroll
                    for (int tj = 0; tj < KW; ++tj) gv[tj] = ok[tj] ? g0[t * p.ow + c0 - tj] : T(0);
#pragma unroll
                    for (int v = 0; v < R; ++v) {
                        const int ti = v + KH - 1 - t;
                        if (ti >= 0 && ti < KH) {
#pragma unroll
                            for (int tj = 0; tj < KW; ++tj) acc[v] += k[ti * KW + tj] * gv[tj];
                        }
                    }
                }
            } else {
#pragma unroll
                for (int v = 0; v < R; ++v) {
#pragma unroll
                    for (int ti = 0; ti < KH; ++ti) {
                        const int ta = i0 + v + p.ph - ti;  // = a S for the g row a it reads, when exact
                        if (ta % S != 0) continue;
                        const T* grow = gp + (ta / S - bd.gi0) * p.ow;
#pragma unroll
                        for (int tj = 0; tj < KW; ++tj) {
                            const int tb = j0 + p.pw - tj;
                            if (tb % S != 0 || (unsigned)(tb / S) >= (unsigned)p.ow) continue;
                            acc[v] += k[ti * KW + tj] * grow[tb / S];
                        }
                    }
                }
            }
            T* dp = dx + (((long long)(bd.n0 + kk) * p.c + bd.ch) * p.h + i0) * p.w + j0;
#pragma unroll
            for (int v = 0; v < R; ++v) {
                if (i0 + v < bd.r1) dp[(long long)v * p.w] = acc[v];
            }
        }
    }

    if (need_sums) {
        T s[TAPS + 1];
#pragma unroll
        for (int q = 0; q <= TAPS; ++q) s[q] = T(0);
        const int runs = (bd.a1 - bd.a0 + R - 1) / R, items = bd.planes * runs * p.ow;
        const FastDiv dow = fast_div(p.ow), druns = fast_div(runs);
        for (int it = threadIdx.x; it < items; it += blockDim.x) {
            const int r = div_of(it, dow), b = it - r * p.ow;
            const int kk = div_of(r, druns), a = bd.a0 + (r - kk * runs) * R;
            T gv[R];
#pragma unroll
            for (int v = 0; v < R; ++v) {
                gv[v] = a + v < bd.a1 ? gt[(kk * p.grows + a + v - bd.gi0) * p.ow + b] : T(0);
                s[TAPS] += gv[v];
            }
            const T* tp = xt + (kk * p.xrows + (a - bd.a0) * S) * p.w;
            const int c0 = b * S - p.pw;
            bool ok[KW];
#pragma unroll
            for (int j = 0; j < KW; ++j) ok[j] = (unsigned)(c0 + j) < (unsigned)p.w;
#pragma unroll
            for (int t = 0; t < (R - 1) * S + KH; ++t) {
                T xv[KW];
#pragma unroll
                for (int j = 0; j < KW; ++j) xv[j] = ok[j] ? tp[t * p.w + c0 + j] : T(0);
#pragma unroll
                for (int v = 0; v < R; ++v) {
                    const int i = t - v * S;
                    if (i >= 0 && i < KH) {
#pragma unroll
                        for (int j = 0; j < KW; ++j) s[i * KW + j] += gv[v] * xv[j];
                    }
                }
            }
        }
        double sd[TAPS + 1];
#pragma unroll
        for (int q = 0; q <= TAPS; ++q) sd[q] = (double)s[q];
        dw_block_sums<TAPS + 1>(sd, part + (long long)blockIdx.x * (TAPS + 1));
    }
}

// Backward for any kernel size, stride and dilation: the same tiles, one dx element per item gathering its
// taps, and the tap sums one tap at a time (a walk over the block's outputs per tap, from shared memory).
template <typename T>
__device__ void dw_bwd_tiled_any_impl(const T* x, const T* wt, const T* g, T* dx, double* part, DwTile p,
                                      int need_dx, int need_sums) {
    T* xt = (T*)dw_smem;
    T* gt = xt + p.planes * p.xrows * p.w;
    const DwBand bd = dw_band(p, 1);
    const long long plane0 = (long long)bd.n0 * p.c + bd.ch;
    if (need_sums) dw_load_tile(x, plane0, p.c, bd.planes, p.h, p.w, bd.a0 * p.sh - p.ph, p.xrows, xt);
    dw_load_tile(g, plane0, p.c, bd.planes, p.oh, p.ow, bd.gi0, p.grows, gt);
    const T* k = wt + (long long)bd.ch * p.kh * p.kw;
    __syncthreads();
    if (need_dx) {
        const int runs = bd.r1 - bd.r0, items = bd.planes * runs * p.w;
        const FastDiv dw_ = fast_div(p.w), druns = fast_div(max(runs, 1));
        for (int it = threadIdx.x; it < items; it += blockDim.x) {
            const int r = div_of(it, dw_), j0 = it - r * p.w;
            const int kk = div_of(r, druns), i0 = bd.r0 + (r - kk * runs);
            const T* gp = gt + kk * p.grows * p.ow;
            T acc = T(0);
            for (int ti = 0; ti < p.kh; ++ti) {
                const int ta = i0 + p.ph - ti * p.dh;
                if (ta % p.sh != 0) continue;
                const T* grow = gp + (ta / p.sh - bd.gi0) * p.ow;
                for (int tj = 0; tj < p.kw; ++tj) {
                    const int tb = j0 + p.pw - tj * p.dw;
                    if (tb % p.sw != 0 || (unsigned)(tb / p.sw) >= (unsigned)p.ow) continue;
                    acc += k[ti * p.kw + tj] * grow[tb / p.sw];
                }
            }
            dx[(((long long)(bd.n0 + kk) * p.c + bd.ch) * p.h + i0) * p.w + j0] = acc;
        }
    }
    if (need_sums) {
        const int taps = p.kh * p.kw, runs = bd.a1 - bd.a0, items = bd.planes * runs * p.ow;
        const FastDiv dow = fast_div(p.ow), druns = fast_div(runs);
        for (int q = 0; q <= taps; ++q) {
            const int ti = q / p.kw, tj = q % p.kw;
            T s = T(0);
            for (int it = threadIdx.x; it < items; it += blockDim.x) {
                const int r = div_of(it, dow), b = it - r * p.ow;
                const int kk = div_of(r, druns), a = bd.a0 + (r - kk * runs);
                const T gv = gt[(kk * p.grows + a - bd.gi0) * p.ow + b];
                if (q == taps) {
                    s += gv;
                } else {
                    const int col = b * p.sw - p.pw + tj * p.dw;
                    if ((unsigned)col < (unsigned)p.w)
                        s += gv * xt[(kk * p.xrows + (a - bd.a0) * p.sh + ti * p.dh) * p.w + col];
                }
            }
            const double sd[1] = {(double)s};
            __syncthreads();  // the previous tap's readers of dw_block_sums' scratch are done
            dw_block_sums<1>(sd, part + (long long)blockIdx.x * (taps + 1) + q);
        }
    }
}

// dw[ch, q] = sum of part[b][q] over channel ch's blocks b (consecutive: ch per, .. (ch + 1) per) in block
// order, q < taps, and db[ch] the same of q = taps: one warp per channel, lanes striding over the blocks, then
// a butterfly. Fixed shape: deterministic.
template <typename T>
__device__ void dw_reduce_impl(const double* part, T* dwt, T* db, int c, int per, int taps, int need_w,
                               int need_b) {
    const int lane = threadIdx.x & 31;
    const int warps = gridDim.x * (blockDim.x >> 5);
    for (int ch = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); ch < c; ch += warps) {
        for (int q = need_w ? 0 : taps; q <= (need_b ? taps : taps - 1); ++q) {
            double s = 0.0;
            for (int b = lane; b < per; b += 32) s += part[((long long)ch * per + b) * (taps + 1) + q];
            for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
            if (lane == 0) {
                if (q < taps) {
                    dwt[(long long)ch * taps + q] = (T)s;
                } else {
                    db[ch] = (T)s;
                }
            }
        }
    }
}

// ---- depthwise conv2d 3x3, stride 2, padding 1 (NCHW): direct kernels -----------------------------------------

// The patch merging's depthwise conv (MLLA-T at batch 128: (128, 512, 56, 56) -> 28x28, (128, 1024, 28, 28) ->
// 14x14, (128, 2048, 14, 14) -> 7x7), for any sizes. No shared-memory tile and no barrier between a load phase
// and a compute phase: each thread reads what its outputs need straight from global memory, all of an item's
// loads independent of each other and issued before the first use, so that the many loads in flight per
// thread hide the memory latency (the tiled kernels' blocks each waited for their whole tile, computed, then
// stored, leaving the memory idle in between).
//
// Items. An item is one output column b and a vertical run of R = DW_S2_RUN output rows a0 .. a0 + R of one
// plane (sample, channel). With padding 1, output (a, b) reads input rows 2a - 1 .. 2a + 1 and columns
// 2b - 1 .. 2b + 1, so an item reads the 2R + 1 input rows 2 a0 - 1 .. 2 a0 + 2R - 1 at columns 2b - 1, 2b,
// 2b + 1 (zeros outside the image). Items are numbered plane by plane, run by run, column by column, so the 32
// lanes of a warp take neighbouring columns of a row: lane L loads columns (2b, 2b + 1) of each row as one
// pair (8 bytes in f32, 16 in f64, when W is even) and takes column 2b - 1 from lane L - 1's pair with a
// shuffle (lanes whose left neighbour holds another row, or lane 0, load it themselves; b = 0 reads padding).
// A warp's pair loads are one contiguous stretch of the row, and each input element comes from DRAM once (the
// row two runs share, and the column at a warp's edge, come from cache).
//
// Backward, fused: the same items. Item (a0, b) writes the dx block of rows 2 a0 .. 2 a0 + 2R and columns
// 2b, 2b + 1 (these blocks tile dx exactly: OH = ceil(H / 2), OW = ceil(W / 2)); dx[i, j] gathers
// w[ti, tj] g[(i + 1 - ti) / 2, (j + 1 - tj) / 2] over the taps where both divisions are exact: the g rows
// a0 .. a0 + R at columns b and b + 1 (b + 1 from lane L + 1 by a shuffle). Taps in row-major order, as the
// tiled kernel and the CPU. The weight and bias sums: the item's outputs add g x into the 9 tap sums and g
// into the bias sum in registers (T); a block takes a range of one channel's items (sample by sample, `chunk`
// of them, a few per thread), adds its threads' sums in double (dw_block_sums) and writes one row of partials;
// dw_reduce adds each channel's rows in block order. No atomics: the same launch gives the same bits.
//
// Bytes (MLLA-T, f32): the forward reads x and writes y once: 1.80 GB over the three launches, 0.45 ms at
// 4 TB/s; the backward reads x and g and writes dx once: 3.24 GB, 0.81 ms (plus 10 doubles per block).

#define DW_S2_RUN 4

// The kernels (entry points below) run blocks of 256 threads (DW_S2_THREADS in conv/cuda.rs); the forward is
// bounded to 64 registers in f32 (4 blocks a multiprocessor; 2 in f64), which it fits without spilling
// (cuobjdump --dump-resource-usage on NVRTC's sm_90 CUBIN: forward 64, backward 74 registers in f32).

// A direct launch, mirrored by `DwS2` in conv/cuda.rs (12 x i32, 48 bytes), which computes it (`dw_s2_plan`).
// Every count fits an int (the plan checks); element offsets into the tensors are computed in 64 bits.
struct DwS2 {
    int n, c, h, w, oh, ow;
    int runs;   // ceil(oh / R): runs of output rows per plane
    int items;  // runs ow: items per plane
    int total;  // n c items: the forward's items, one a thread
    int span;   // n items: one channel's items in the backward
    int chunk;  // items of a channel one block of the backward takes (the last block of a channel may take fewer)
    int per;    // blocks per channel of the backward: ceil(span / chunk)
};

static_assert(sizeof(DwS2) == 48, "DwS2 must match conv/cuda.rs");

// Two neighbouring elements of a row, as one 8-byte (f32) or 16-byte (f64) access.
template <typename T> struct Pair2;
template <> struct Pair2<float> {
    typedef float2 type;
    static __device__ __forceinline__ float2 make(float a, float b) { return make_float2(a, b); }
};
template <> struct Pair2<double> {
    typedef double2 type;
    static __device__ __forceinline__ double2 make(double a, double b) { return make_double2(a, b); }
};

// Where an item lies in its plane: output rows a0 .. a0 + R, column b.
struct DwS2Item {
    int a0, b;
};

__device__ __forceinline__ DwS2Item dw_s2_item(int rest, FastDiv dow, int ow) {
    const int r = div_of(rest, dow);
    return DwS2Item{r * DW_S2_RUN, rest - r * ow};
}

// Issues the loads of input rows 2 a0 - 1 + t (t < 2R + 1) at columns 2b - 1 + j (j < 3) of plane xp into
// v[t][j], zeros outside the image: columns 2b, 2b + 1 as a pair when `pairs` (W even and x aligned: every pair
// then lies in its row), column 2b - 1 only when the lane does not take it from lane L - 1 (`from_left`: lane
// L - 1 holds column b - 1 of the same rows), see dw_s2_x_from_left. All the loads of an item are issued before
// the first shuffle, which waits for them: a shuffle right after each row's load would wait for the rows one
// after another.
template <typename T, bool PAIRS>
__device__ __forceinline__ void dw_s2_load_x_as(const T* xp, int h, int w, DwS2Item it, bool from_left,
                                                T (&v)[2 * DW_S2_RUN + 1][3]) {
    const int c0 = 2 * it.b;
#pragma unroll
    for (int t = 0; t < 2 * DW_S2_RUN + 1; ++t) {
        const int row = 2 * it.a0 - 1 + t;
        const bool in = (unsigned)row < (unsigned)h;
        const T* rp = xp + (long long)(in ? row : 0) * w + c0;
        v[t][1] = v[t][2] = T(0);
        if (PAIRS) {
            if (in) {
                const typename Pair2<T>::type q = __ldg((const typename Pair2<T>::type*)rp);
                v[t][1] = q.x;
                v[t][2] = q.y;
            }
        } else {
            if (in) v[t][1] = __ldg(rp);
            if (in && c0 + 1 < w) v[t][2] = __ldg(rp + 1);
        }
        v[t][0] = !from_left && in && c0 > 0 ? __ldg(rp - 1) : T(0);
    }
}

template <typename T>
__device__ __forceinline__ void dw_s2_load_x(const T* xp, int h, int w, DwS2Item it, bool pairs, bool from_left,
                                             T (&v)[2 * DW_S2_RUN + 1][3]) {
    if (pairs) {
        dw_s2_load_x_as<T, true>(xp, h, w, it, from_left, v);
    } else {
        dw_s2_load_x_as<T, false>(xp, h, w, it, from_left, v);
    }
}

// Column 2b - 1 of each row from lane L - 1's column 2b - 1 (its v[t][2]), where `from_left`. Every lane of the
// warp must call this.
template <typename T>
__device__ __forceinline__ void dw_s2_x_from_left(bool from_left, T (&v)[2 * DW_S2_RUN + 1][3]) {
#pragma unroll
    for (int t = 0; t < 2 * DW_S2_RUN + 1; ++t) {
        const T left = __shfl_up_sync(0xffffffffu, v[t][2], 1);
        if (from_left) v[t][0] = left;
    }
}

// Forward: one item per thread; threads past the last item take a copy of it (their lanes still shuffle) and
// store nothing. Each output adds its taps in row-major order onto the bias, as the CPU.
template <typename T>
__device__ void dw_s2_fwd_impl(const T* x, const T* wt, const T* bias, Strided lb, int has_bias, T* y, DwS2 p) {
    const int R = DW_S2_RUN;
    const int id = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31;
    const int flat = min(id, p.total - 1);
    const int plane = div_of(flat, fast_div(p.items));
    const DwS2Item it = dw_s2_item(flat - plane * p.items, fast_div(p.ow), p.ow);
    const int ch = plane % p.c;
    const bool pairs = p.w % 2 == 0 && ((unsigned long long)x % (2 * sizeof(T))) == 0;
    const T* xp = x + (long long)plane * p.h * p.w;
    const bool from_left = lane > 0 && it.b > 0;
    T k[9];
#pragma unroll
    for (int t = 0; t < 9; ++t) k[t] = __ldg(wt + ch * 9 + t);
    const T b0 = has_bias ? bias[offset_of(lb, ch)] : T(0);
    T v[2 * R + 1][3];
    dw_s2_load_x(xp, p.h, p.w, it, pairs, from_left, v);
    dw_s2_x_from_left(from_left, v);
    if (id >= p.total) return;
    T* yp = y + (long long)plane * p.oh * p.ow + (long long)it.a0 * p.ow + it.b;
#pragma unroll
    for (int u = 0; u < R; ++u) {
        T acc = b0;
#pragma unroll
        for (int i = 0; i < 3; ++i) {
#pragma unroll
            for (int j = 0; j < 3; ++j) acc += k[i * 3 + j] * v[2 * u + i][j];
        }
        if (it.a0 + u < p.oh) yp[(long long)u * p.ow] = acc;
    }
}

// Backward: dx (need_dx) and the weight and bias partials (need_sums) of block b = ch per + piece, which takes
// items start .. end of channel ch (item q: sample q / items, the rest as in the forward), blockDim.x at a time.
// Every thread runs the same number of turns (the shuffles); turns past `end` repeat the last item, write
// nothing and add nothing. A turn issues all its loads (g, then x) before the shuffles that wait for them.
template <typename T>
__device__ void dw_s2_bwd_impl(const T* x, const T* wt, const T* g, T* dx, double* part, DwS2 p, int need_dx,
                               int need_sums) {
    const int R = DW_S2_RUN, lane = threadIdx.x & 31;
    const int ch = blockIdx.x / p.per, piece = blockIdx.x - ch * p.per;
    const int start = piece * p.chunk, end = min(p.span, start + p.chunk);
    const FastDiv ditems = fast_div(p.items), dow = fast_div(p.ow);
    const bool xpairs = p.w % 2 == 0 && ((unsigned long long)x % (2 * sizeof(T))) == 0;
    const bool dxpairs = p.w % 2 == 0 && ((unsigned long long)dx % (2 * sizeof(T))) == 0;
    T k[9];
#pragma unroll
    for (int t = 0; t < 9; ++t) k[t] = __ldg(wt + ch * 9 + t);
    T s[10];
#pragma unroll
    for (int q = 0; q < 10; ++q) s[q] = T(0);
    for (int base = start; base < end; base += blockDim.x) {
        const int q = base + threadIdx.x;
        const bool valid = q < end;
        const int flat = min(q, end - 1);
        const int smp = div_of(flat, ditems);
        const DwS2Item it = dw_s2_item(flat - smp * p.items, dow, p.ow);
        const long long plane = (long long)smp * p.c + ch;
        // g rows a0 .. a0 + R (zeros past OH) at columns b (gv[u][0]) and b + 1 (gv[u][1]: lane L + 1's column
        // b when it holds item q + 1 of the same row, else loaded; zero past OW).
        const T* gp = g + plane * p.oh * p.ow;
        const bool from_right = lane < 31 && q + 1 < end && it.b + 1 < p.ow;
        T gv[R + 1][2];
#pragma unroll
        for (int u = 0; u <= R; ++u) {
            const int row = it.a0 + u;
            const bool in = row < p.oh;
            const T* rp = gp + (long long)(in ? row : 0) * p.ow + it.b;
            gv[u][0] = in ? __ldg(rp) : T(0);
            gv[u][1] = !from_right && in && it.b + 1 < p.ow ? __ldg(rp + 1) : T(0);
        }
        const bool from_left = lane > 0 && it.b > 0;
        T v[2 * R + 1][3];
        if (need_sums) dw_s2_load_x(x + plane * p.h * p.w, p.h, p.w, it, xpairs, from_left, v);
#pragma unroll
        for (int u = 0; u <= R; ++u) {
            const T right = __shfl_down_sync(0xffffffffu, gv[u][0], 1);
            if (from_right) gv[u][1] = right;
        }
        if (need_dx && valid) {
            // dx row 2 a0 + e, columns 2b + f: tap (ti, tj) meets g row a0 + (e + 1 - ti) / 2 and column
            // b + (f + 1 - tj) / 2 when both are exact.
            T* dp = dx + plane * p.h * p.w + (long long)(2 * it.a0) * p.w + 2 * it.b;
#pragma unroll
            for (int e = 0; e < 2 * R; ++e) {
                T acc[2];
#pragma unroll
                for (int f = 0; f < 2; ++f) {
                    acc[f] = T(0);
#pragma unroll
                    for (int ti = 0; ti < 3; ++ti) {
#pragma unroll
                        for (int tj = 0; tj < 3; ++tj) {
                            if ((e + 1 - ti) % 2 == 0 && (f + 1 - tj) % 2 == 0)
                                acc[f] += k[ti * 3 + tj] * gv[(e + 1 - ti) / 2][(f + 1 - tj) / 2];
                        }
                    }
                }
                if (2 * it.a0 + e < p.h) {
                    T* rp = dp + (long long)e * p.w;
                    if (dxpairs) {
                        *(typename Pair2<T>::type*)rp = Pair2<T>::make(acc[0], acc[1]);
                    } else {
                        rp[0] = acc[0];
                        if (2 * it.b + 1 < p.w) rp[1] = acc[1];
                    }
                }
            }
        }
        if (need_sums) {
            dw_s2_x_from_left(from_left, v);
            if (valid) {
#pragma unroll
                for (int u = 0; u < R; ++u) {
                    const T gu = gv[u][0];  // zero past OH
                    s[9] += gu;
#pragma unroll
                    for (int i = 0; i < 3; ++i) {
#pragma unroll
                        for (int j = 0; j < 3; ++j) s[i * 3 + j] += gu * v[2 * u + i][j];
                    }
                }
            }
        }
    }
    if (need_sums) {
        double sd[10];
#pragma unroll
        for (int q = 0; q < 10; ++q) sd[q] = (double)s[q];
        dw_block_sums<10>(sd, part + (long long)blockIdx.x * 10);
    }
}

// ---- depthwise conv2d on channels-last data (G = C = O) ------------------------------------------------------

// x (N, H, W, C), y and g (N, OH, OW, C), dx (N, H, W, C), all row-major (a channels-last view's memory: the
// MILA block's tokens seen as an image), the weight (C, 1, kh, kw) contiguous. Neighbouring threads take
// neighbouring groups of V channels of one pixel, so every load and store of a warp is a run of consecutive
// bytes; V = 16 / sizeof(T) (one float4 or double2 access) when C and the pointers allow it, else 1. A thread
// keeps its channels' weight taps in registers and walks items (sample, row, strip of TW columns) of the
// output (the forward, the weight gradient) or of dx. The fixed-size instances read each input row of a strip
// once into registers ((TW - 1) S + KW pixels) and take every tap of every output of the strip from them.
//
// A block has bx threads along the channel vectors and by = blockDim.x / bx along the items; block b is
// (b % gx, b / gx) in the grid of gx blocks along the channel vectors and gy along the items.

// Launch plan of the channels-last depthwise kernels, mirrored by `DwlTile` in conv/cuda.rs (20 x i32, 80 bytes).
// Every size fits an int (the plan refuses larger ones); element offsets are computed in 64 bits.
struct DwlTile {
    int n, c, h, w, oh, ow;
    int kh, kw, sh, sw, ph, pw, dh, dw;
    int cv;      // channel vectors per pixel: c / V
    int bx;      // threads of a block along the channel vectors
    int gx;      // blocks along the channel vectors: ceil(cv / bx)
    int gy;      // blocks along the items
    int rows;    // rows of a sample the items walk: OH (forward, weight gradient) or H (dx)
    int strips;  // strips of TW columns per row: ceil(OW / TW) or ceil(W / TW)
};

static_assert(sizeof(DwlTile) == 80, "DwlTile must match conv/cuda.rs");

// V channels of one pixel: one 16-byte access (V = 16 / sizeof(T); the pointer 16-byte aligned) or one element.
template <typename T, int V> struct DwlIo {
    static __device__ __forceinline__ void load(T (&r)[V], const T* p) {
        const Pack16<T> q = load16(p);
#pragma unroll
        for (int l = 0; l < V; ++l) r[l] = q.v[l];
    }
    static __device__ __forceinline__ void store(T* p, const T (&r)[V]) {
        Pack16<T> q;
#pragma unroll
        for (int l = 0; l < V; ++l) q.v[l] = r[l];
        store16(p, q);
    }
};
template <typename T> struct DwlIo<T, 1> {
    static __device__ __forceinline__ void load(T (&r)[1], const T* p) { r[0] = p[0]; }
    static __device__ __forceinline__ void store(T* p, const T (&r)[1]) { p[0] = r[0]; }
};

// V channels of pixel (row, col) of a (rows, cols, C) image at `img` (already offset to the thread's first
// channel), zeros outside the image.
template <typename T, int V>
__device__ __forceinline__ void dwl_pixel(T (&r)[V], const T* img, int row, int col, int rows, int cols, int c) {
    if ((unsigned)row < (unsigned)rows && (unsigned)col < (unsigned)cols) {
        DwlIo<T, V>::load(r, img + ((long long)row * cols + col) * c);
    } else {
#pragma unroll
        for (int l = 0; l < V; ++l) r[l] = T(0);
    }
}

// A residual's term, for convs whose output has the input's shape (stride 1, 'same' padding): r[l] = v[l] +
// r[l] with v the pixel at `at`, the sum the composition x + conv2d(x) (or its gradient g + dx) forms.
template <typename T, int V> __device__ __forceinline__ void dwl_add_same_pixel(T (&r)[V], const T* at) {
    T v[V];
    DwlIo<T, V>::load(v, at);
#pragma unroll
    for (int l = 0; l < V; ++l) r[l] = v[l] + r[l];
}

// What the forward kernels do to an output as they store it (`epi`; conv/cuda.rs `DwlEpilogue`): nothing, add
// the input (x + conv2d(x)), or an activation, each the elementwise kernels' formula (elementwise.cu), so
// that the result has the bits of the separate pass.
#define DWL_EPI_PLAIN 0
#define DWL_EPI_RESIDUAL 1
#define DWL_EPI_RELU 2
#define DWL_EPI_SILU 3
#define DWL_EPI_GELU 4

template <typename T, int V> __device__ __forceinline__ void dwl_activate(T (&r)[V], int epi) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
        const T x = r[l];
        if (epi == DWL_EPI_RELU) r[l] = (x > T(0) ? x : T(0));
        if (epi == DWL_EPI_SILU) r[l] = x * m_sigmoid(x);
        if (epi == DWL_EPI_GELU) r[l] = T(0.5) * x * (T(1) + m_erf(x * T(0.70710678118654752440)));
    }
}

// Where a thread stands: its channel vector (cv < p.cv, or past the channels: no items then), its first item and
// the step between its items.
struct DwlThread {
    int cv, first, step;
};

__device__ __forceinline__ DwlThread dwl_thread(const DwlTile& p) {
    const int tx = threadIdx.x % p.bx, ty = threadIdx.x / p.bx, by = blockDim.x / p.bx;
    DwlThread t;
    t.cv = (blockIdx.x % p.gx) * p.bx + tx;
    t.first = (blockIdx.x / p.gx) * by + ty;
    t.step = p.gy * by;
    return t;
}

// The thread's weight taps: k[t][l] = w[c0 + l, 0, t / KW, t % KW].
template <typename T, int V, int TAPS>
__device__ __forceinline__ void dwl_taps(T (&k)[TAPS][V], const T* wt, int c0) {
#pragma unroll
    for (int t = 0; t < TAPS; ++t) {
#pragma unroll
        for (int l = 0; l < V; ++l) k[t][l] = wt[(long long)(c0 + l) * TAPS + t];
    }
}

// Forward, the kernel size and stride fixed (dilation 1): y[n, a, b, c] = bias[c] + sum_{i, j} w[c, i, j]
// x[n, a S - ph + i, b S - pw + j, c] for a strip of TW outputs b of row a. For each tap row i the strip's
// (TW - 1) S + KW input pixels are loaded once; each output adds its taps in row-major order onto the bias.
//
// Bytes: x read once from memory (each row by the KH output rows that need it, through the cache), y written
// once: for (128, 64, 56, 56) f32, 2 x 102.8 MB.
template <typename T, int V, int KH, int KW, int S, int TW>
__device__ void dwl_fwd_rows_impl(const T* x, const T* wt, const T* bias, Strided lb, int has_bias, int epi, T* y, DwlTile p) {
    const DwlThread th = dwl_thread(p);
    if (th.cv >= p.cv) return;
    const int c0 = th.cv * V, IN = (TW - 1) * S + KW;
    T k[KH * KW][V], b0[V];
    dwl_taps<T, V, KH * KW>(k, wt, c0);
#pragma unroll
    for (int l = 0; l < V; ++l) b0[l] = has_bias ? bias[offset_of(lb, c0 + l)] : T(0);
    const int items = p.n * p.oh * p.strips;
    for (int it = th.first; it < items; it += th.step) {
        const int strip = it % p.strips, r = it / p.strips, a = r % p.oh, n = r / p.oh;
        const int bs = strip * TW, col0 = bs * S - p.pw;
        const T* xn = x + (long long)n * p.h * p.w * p.c + c0;
        T acc[TW][V];
#pragma unroll
        for (int u = 0; u < TW; ++u) {
#pragma unroll
            for (int l = 0; l < V; ++l) acc[u][l] = b0[l];
        }
#pragma unroll
        for (int i = 0; i < KH; ++i) {
            const int ih = a * S - p.ph + i;
            if ((unsigned)ih >= (unsigned)p.h) continue;
            T xv[IN][V];
#pragma unroll
            for (int t = 0; t < IN; ++t) dwl_pixel<T, V>(xv[t], xn, ih, col0 + t, p.h, p.w, p.c);
#pragma unroll
            for (int u = 0; u < TW; ++u) {
#pragma unroll
                for (int j = 0; j < KW; ++j) {
#pragma unroll
                    for (int l = 0; l < V; ++l) acc[u][l] += k[i * KW + j][l] * xv[u * S + j][l];
                }
            }
        }
        T* yp = y + (((long long)n * p.oh + a) * p.ow + bs) * p.c + c0;
#pragma unroll
        for (int u = 0; u < TW; ++u) {
            if (bs + u >= p.ow) continue;
            if (epi == DWL_EPI_RESIDUAL) dwl_add_same_pixel<T, V>(acc[u], xn + ((long long)a * p.w + bs + u) * p.c);
            if (epi >= DWL_EPI_RELU) dwl_activate<T, V>(acc[u], epi);
            DwlIo<T, V>::store(yp + (long long)u * p.c, acc[u]);
        }
    }
}

// Forward for any kernel size, stride and dilation: each output of the strip gathers its taps (row-major).
template <typename T, int V, int TW>
__device__ void dwl_fwd_any_impl(const T* x, const T* wt, const T* bias, Strided lb, int has_bias, int epi, T* y, DwlTile p) {
    const DwlThread th = dwl_thread(p);
    if (th.cv >= p.cv) return;
    const int c0 = th.cv * V, taps = p.kh * p.kw;
    T b0[V];
#pragma unroll
    for (int l = 0; l < V; ++l) b0[l] = has_bias ? bias[offset_of(lb, c0 + l)] : T(0);
    const int items = p.n * p.oh * p.strips;
    for (int it = th.first; it < items; it += th.step) {
        const int strip = it % p.strips, r = it / p.strips, a = r % p.oh, n = r / p.oh;
        const int bs = strip * TW;
        const T* xn = x + (long long)n * p.h * p.w * p.c + c0;
        T acc[TW][V];
#pragma unroll
        for (int u = 0; u < TW; ++u) {
#pragma unroll
            for (int l = 0; l < V; ++l) acc[u][l] = b0[l];
        }
        for (int i = 0; i < p.kh; ++i) {
            const int ih = a * p.sh - p.ph + i * p.dh;
            if ((unsigned)ih >= (unsigned)p.h) continue;
            for (int j = 0; j < p.kw; ++j) {
                T kv[V];
#pragma unroll
                for (int l = 0; l < V; ++l) kv[l] = wt[(long long)(c0 + l) * taps + i * p.kw + j];
#pragma unroll
                for (int u = 0; u < TW; ++u) {
                    const int iw = (bs + u) * p.sw - p.pw + j * p.dw;
                    if ((unsigned)iw >= (unsigned)p.w) continue;
                    T xv[V];
                    DwlIo<T, V>::load(xv, xn + ((long long)ih * p.w + iw) * p.c);
#pragma unroll
                    for (int l = 0; l < V; ++l) acc[u][l] += kv[l] * xv[l];
                }
            }
        }
        T* yp = y + (((long long)n * p.oh + a) * p.ow + bs) * p.c + c0;
#pragma unroll
        for (int u = 0; u < TW; ++u) {
            if (bs + u >= p.ow) continue;
            if (epi == DWL_EPI_RESIDUAL) dwl_add_same_pixel<T, V>(acc[u], xn + ((long long)a * p.w + bs + u) * p.c);
            if (epi >= DWL_EPI_RELU) dwl_activate<T, V>(acc[u], epi);
            DwlIo<T, V>::store(yp + (long long)u * p.c, acc[u]);
        }
    }
}

// dx at stride 1 (dilation 1), the kernel size fixed: dx[n, ih, iw, c] = sum_{i, j} w[c, i, j]
// g[n, ih + ph - i, iw + pw - j, c] (g is 0 outside), for a strip of TW pixels iw of row ih. For each tap row i
// the strip's TW + KW - 1 g pixels are loaded once; taps added in row-major order, as the CPU.
template <typename T, int V, int KH, int KW, int TW>
__device__ void dwl_dx_rows_impl(const T* g, const T* wt, T* dx, int residual, DwlTile p) {
    const DwlThread th = dwl_thread(p);
    if (th.cv >= p.cv) return;
    const int c0 = th.cv * V, IN = TW + KW - 1;
    T k[KH * KW][V];
    dwl_taps<T, V, KH * KW>(k, wt, c0);
    const int items = p.n * p.h * p.strips;
    for (int it = th.first; it < items; it += th.step) {
        const int strip = it % p.strips, r = it / p.strips, ih = r % p.h, n = r / p.h;
        const int js = strip * TW, col0 = js + p.pw - (KW - 1);  // the g column dx column js reads by tap KW - 1
        const T* gn = g + (long long)n * p.oh * p.ow * p.c + c0;
        T acc[TW][V];
#pragma unroll
        for (int u = 0; u < TW; ++u) {
#pragma unroll
            for (int l = 0; l < V; ++l) acc[u][l] = T(0);
        }
#pragma unroll
        for (int i = 0; i < KH; ++i) {
            const int a = ih + p.ph - i;
            if ((unsigned)a >= (unsigned)p.oh) continue;
            T gv[IN][V];
#pragma unroll
            for (int t = 0; t < IN; ++t) dwl_pixel<T, V>(gv[t], gn, a, col0 + t, p.oh, p.ow, p.c);
#pragma unroll
            for (int u = 0; u < TW; ++u) {
#pragma unroll
                for (int j = 0; j < KW; ++j) {
#pragma unroll
                    for (int l = 0; l < V; ++l) acc[u][l] += k[i * KW + j][l] * gv[u + KW - 1 - j][l];
                }
            }
        }
        T* dp = dx + (((long long)n * p.h + ih) * p.w + js) * p.c + c0;
#pragma unroll
        for (int u = 0; u < TW; ++u) {
            if (js + u >= p.w) continue;
            if (residual) dwl_add_same_pixel<T, V>(acc[u], gn + ((long long)ih * p.ow + js + u) * p.c);
            DwlIo<T, V>::store(dp + (long long)u * p.c, acc[u]);
        }
    }
}

// dx as a gather for any stride: dx[n, ih, iw, c] = sum over the taps (i, j) through which some output (a, b)
// reads (ih, iw) of w[c, i, j] g[n, a, b, c], in row-major tap order. KH > 0: a KH x KW kernel with stride S
// and dilation 1 fixed at compile time (the taps in registers); KH = 0: sizes, strides and dilations from p.
template <typename T, int V, int KH, int KW, int S, int TW>
__device__ void dwl_dx_gather_impl(const T* g, const T* wt, T* dx, int residual, DwlTile p) {
    const DwlThread th = dwl_thread(p);
    if (th.cv >= p.cv) return;
    const int c0 = th.cv * V;
    const int kh = KH ? KH : p.kh, kw = KH ? KW : p.kw, sh = KH ? S : p.sh, sw = KH ? S : p.sw;
    const int dh = KH ? 1 : p.dh, dwd = KH ? 1 : p.dw, taps = kh * kw;
    T k[KH ? KH * KW : 1][V];
    if (KH) dwl_taps<T, V, KH ? KH * KW : 1>(k, wt, c0);
    const int items = p.n * p.h * p.strips;
    for (int it = th.first; it < items; it += th.step) {
        const int strip = it % p.strips, r = it / p.strips, ih = r % p.h, n = r / p.h;
        const int js = strip * TW;
        T acc[TW][V];
#pragma unroll
        for (int u = 0; u < TW; ++u) {
#pragma unroll
            for (int l = 0; l < V; ++l) acc[u][l] = T(0);
        }
#pragma unroll
        for (int i = 0; i < kh; ++i) {
            const int ta = ih + p.ph - i * dh;  // = a sh for the g row a it reads, when exact
            if (ta < 0 || ta % sh != 0 || ta / sh >= p.oh) continue;
            const T* grow = g + ((long long)n * p.oh + ta / sh) * p.ow * p.c + c0;
#pragma unroll
            for (int j = 0; j < kw; ++j) {
                T kv[V];
#pragma unroll
                for (int l = 0; l < V; ++l) {
                    kv[l] = KH ? k[KH ? i * KW + j : 0][l] : wt[(long long)(c0 + l) * taps + i * kw + j];
                }
#pragma unroll
                for (int u = 0; u < TW; ++u) {
                    const int tb = js + u + p.pw - j * dwd;
                    if (tb < 0 || tb % sw != 0 || tb / sw >= p.ow) continue;
                    T gv[V];
                    DwlIo<T, V>::load(gv, grow + (long long)(tb / sw) * p.c);
#pragma unroll
                    for (int l = 0; l < V; ++l) acc[u][l] += kv[l] * gv[l];
                }
            }
        }
        T* dp = dx + (((long long)n * p.h + ih) * p.w + js) * p.c + c0;
#pragma unroll
        for (int u = 0; u < TW; ++u) {
            if (js + u >= p.w) continue;
            if (residual) dwl_add_same_pixel<T, V>(acc[u], g + (((long long)n * p.oh + ih) * p.ow + js + u) * p.c + c0);
            DwlIo<T, V>::store(dp + (long long)u * p.c, acc[u]);
        }
    }
}

// Adds s[q][l] over the threads of the block that share a channel vector, in thread order, and writes the sums
// as partials: part[(c gy + block row) qs + q0 + q] for the block's channels c. Scratch: blockDim.x V doubles
// of dynamic shared memory. Every thread of the block calls it (it has barriers).
template <typename T, int V, int Q>
__device__ void dwl_block_partials(const T (&s)[Q][V], double* part, const DwlTile& p, int q0, int qs) {
    double* red = (double*)dw_smem;
    const int by = blockDim.x / p.bx, byi = blockIdx.x / p.gx;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
#pragma unroll
        for (int l = 0; l < V; ++l) red[threadIdx.x * V + l] = (double)s[q][l];
        __syncthreads();
        if ((int)threadIdx.x < p.bx * V) {
            const int tx = threadIdx.x / V, l = threadIdx.x % V, cv = (blockIdx.x % p.gx) * p.bx + tx;
            double acc = 0.0;
            for (int y = 0; y < by; ++y) acc += red[(y * p.bx + tx) * V + l];
            if (cv < p.cv) part[((long long)(cv * V + l) * p.gy + byi) * qs + q0 + q] = acc;
        }
        __syncthreads();  // the readers are done before the next round writes
    }
}

// Weight and bias gradient partials, the kernel size and stride fixed (dilation 1): over the thread's items,
// s[i KW + j] += g[n, a, b] x[n, a S - ph + i, b S - pw + j] and s[KH KW] += g[n, a, b] (each channel), with the
// strip's g pixels and, per tap row, its (TW - 1) S + KW x pixels loaded once; in T over the thread's few
// items (the plan gives each at most a few), then the block's threads in double (dwl_block_partials).
// Without need_w only the bias sums are made (x is not read).
template <typename T, int V, int KH, int KW, int S, int TW>
__device__ void dwl_sums_rows_impl(const T* x, const T* g, double* part, DwlTile p, int need_w) {
    const int TAPS = KH * KW, IN = (TW - 1) * S + KW;
    const DwlThread th = dwl_thread(p);
    const int c0 = th.cv * V;
    T s[TAPS + 1][V];
#pragma unroll
    for (int q = 0; q <= TAPS; ++q) {
#pragma unroll
        for (int l = 0; l < V; ++l) s[q][l] = T(0);
    }
    const int items = th.cv < p.cv ? p.n * p.oh * p.strips : 0;
    for (int it = th.first; it < items; it += th.step) {
        const int strip = it % p.strips, r = it / p.strips, a = r % p.oh, n = r / p.oh;
        const int bs = strip * TW, col0 = bs * S - p.pw;
        const T* gn = g + (long long)n * p.oh * p.ow * p.c + c0;
        const T* xn = x + (long long)n * p.h * p.w * p.c + c0;
        T gv[TW][V];
#pragma unroll
        for (int u = 0; u < TW; ++u) {
            dwl_pixel<T, V>(gv[u], gn, a, bs + u, p.oh, p.ow, p.c);
#pragma unroll
            for (int l = 0; l < V; ++l) s[TAPS][l] += gv[u][l];
        }
        if (!need_w) continue;
#pragma unroll
        for (int i = 0; i < KH; ++i) {
            const int ih = a * S - p.ph + i;
            if ((unsigned)ih >= (unsigned)p.h) continue;
            T xv[IN][V];
#pragma unroll
            for (int t = 0; t < IN; ++t) dwl_pixel<T, V>(xv[t], xn, ih, col0 + t, p.h, p.w, p.c);
#pragma unroll
            for (int j = 0; j < KW; ++j) {
#pragma unroll
                for (int u = 0; u < TW; ++u) {
#pragma unroll
                    for (int l = 0; l < V; ++l) s[i * KW + j][l] += gv[u][l] * xv[u * S + j][l];
                }
            }
        }
    }
    dwl_block_partials<T, V, TAPS + 1>(s, part, p, 0, TAPS + 1);
}

// Weight and bias gradient partials for any kernel size, stride and dilation: one tap at a time (q < kh kw; q =
// kh kw is the bias), each a walk over the thread's items. Without need_w only the bias partials are written.
template <typename T, int V, int TW>
__device__ void dwl_sums_any_impl(const T* x, const T* g, double* part, DwlTile p, int need_w) {
    const DwlThread th = dwl_thread(p);
    const int c0 = th.cv * V, taps = p.kh * p.kw;
    const int items = th.cv < p.cv ? p.n * p.oh * p.strips : 0;
    for (int q = need_w ? 0 : taps; q <= taps; ++q) {
        const int i = q / p.kw, j = q % p.kw;
        T s[1][V];
#pragma unroll
        for (int l = 0; l < V; ++l) s[0][l] = T(0);
        for (int it = th.first; it < items; it += th.step) {
            const int strip = it % p.strips, r = it / p.strips, a = r % p.oh, n = r / p.oh;
            const int bs = strip * TW, ih = a * p.sh - p.ph + i * p.dh;
            const T* gn = g + (long long)n * p.oh * p.ow * p.c + c0;
            const T* xn = x + (long long)n * p.h * p.w * p.c + c0;
#pragma unroll
            for (int u = 0; u < TW; ++u) {
                if (bs + u >= p.ow) continue;
                T gv[V], xv[V];
                DwlIo<T, V>::load(gv, gn + ((long long)a * p.ow + bs + u) * p.c);
                if (q == taps) {
#pragma unroll
                    for (int l = 0; l < V; ++l) s[0][l] += gv[l];
                } else {
                    dwl_pixel<T, V>(xv, xn, ih, (bs + u) * p.sw - p.pw + j * p.dw, p.h, p.w, p.c);
#pragma unroll
                    for (int l = 0; l < V; ++l) s[0][l] += gv[l] * xv[l];
                }
            }
        }
        dwl_block_partials<T, V, 1>(s, part, p, q, taps + 1);
    }
}

// ---- depthwise conv2d: the untiled kernels, for planes too wide for a tile in shared memory -----------------

// y[n, c, a, b] = bias[c] + sum_{i, j} w[c, i, j] x[n, c, a sh - ph + i dh, b sw - pw + j dw]: one thread per
// output pixel.
template <typename T>
__device__ void dw_fwd_impl(const T* x, const T* wt, const T* bias, Strided lb, int has_bias, T* y, Conv2dParams p) {
    const long long kh = p.kh, kw = p.kw;
    const long long total = p.n * p.c * p.oh * p.ow;
    GRID_STRIDE(e, total) {
        const long long b = e % p.ow, a = (e / p.ow) % p.oh, nc = e / (p.ow * p.oh), ch = nc % p.c;
        const T* xp = x + nc * p.h * p.w;
        const T* k = wt + ch * kh * kw;
        T acc = has_bias ? bias[offset_of(lb, ch)] : T(0);
        const long long ih0 = a * p.sh - p.ph, iw0 = b * p.sw - p.pw;
        for (long long i = 0; i < kh; ++i) {
            const long long ih = ih0 + i * p.dh;
            if (ih < 0 || ih >= p.h) continue;
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

// Implicit-GEMM forward of a dense or grouped conv2d: per group q, y_q (O/G, N P) = W_q (O/G, K) cols_q (K, N P)
// with K = C/G kh kw, the columns of cols gathered from x as they are needed, never stored. Block (bx, by, q)
// computes the tile of output channels by 32 .. by 32 + 32 and columns (sample, pixel) bx 256 .. bx 256 + 256
// of group q, stepping over K by 8: each thread gathers its column's 8 values (and one weight) for the next
// step into registers while the block multiplies the current step's tiles from shared memory (two buffers,
// one barrier a step); each thread accumulates 8 channels x 4 columns. A warp shares its 8 channels (a
// broadcast read) and reads 32 x 4 neighbouring columns (conflict-free 16-byte reads). Sums over k in order,
// then the bias is added. TAP (conv_igemm_tap, C/G a multiple of 8) orders k tap-major (below); its f32 instance is
// capped at 80 registers (3 blocks a multiprocessor, no spills), as the channel-major one compiles (78).
//
// Work: 2 N O OH OW C/G kh kw flops; for the bench's (128, 32, 112, 112) -> 32 3x3 f32, 29.6 GFLOP: about
// 0.9 ms on the H100 at a predicted 33 TFLOP/s of FFMA (its peak is about 67; x is read through the caches,
// so the 0.41 GB of x and y are not the limit).
template <typename T, bool TAP>
__device__ void conv_igemm_impl(const T* x, const T* wt, const T* bias, Strided lb, int has_bias, T* y,
                                Conv2dParams p) {
    const int BM = 32, BN = 256, BK = 8, TM = 8, TN = 4;
    typedef typename Vec16<T>::type V;
    const int VN = Vec16<T>::n;
    DW_STATIC_SHARED __align__(16) T As[2][BK][BM];
    DW_STATIC_SHARED __align__(16) T Bs[2][BK][BN];
    const int og = (int)(p.o / p.groups), cg = (int)(p.c / p.groups);
    const int kh = (int)p.kh, kw = (int)p.kw, khw = kh * kw, K = cg * khw;
    const int h = (int)p.h, w = (int)p.w, P = (int)(p.oh * p.ow), ow = (int)p.ow;
    const int dh = (int)p.dh, dw = (int)p.dw;
    const int np = (int)(p.n * P);
    const int grp = blockIdx.z, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, tid = threadIdx.x;
    const FastDiv dP = fast_div(P), dow = fast_div(ow), dkhw = fast_div(khw), dkw = fast_div(kw);

    // The column this thread gathers: sample s, output pixel (a, b).
    const int col = n0 + tid;
    const bool col_ok = col < np;
    const int s = col_ok ? div_of(col, dP) : 0, q = col - s * P;
    const int a = div_of(q, dow), b = q - a * ow;
    const int ih0 = a * (int)p.sh - (int)p.ph, iw0 = b * (int)p.sw - (int)p.pw;
    const T* xs = x + ((long long)s * p.c + (long long)grp * cg) * h * w;
    // The weight this thread loads: row am, column ak of the step's (32, 8) tile of W_q.
    const int am = tid / BK, ak = tid % BK;
    const bool a_ok = m0 + am < og;
    const T* wrow = wt + ((long long)grp * og + m0 + (a_ok ? am : 0)) * K;

    T bv[BK], av;
    // TAP (conv_igemm_tap, for C/G a multiple of 8): tap-major order, k = tap C/G + c, so that a step's 8
    // values are 8 channels of one tap at one pixel: one bounds check and one address a step, the next channel
    // hw further (channel-major, k = c kh kw + tap as W stores it, takes a division and a bounds check per
    // value). Either way the sum over k runs in a fixed order.
    const FastDiv dcg = fast_div(TAP ? cg : 1);
    const long long hw = (long long)h * w;
    auto gather_tap = [&](int k0) {
        const int t = div_of(k0, dcg), c0 = k0 - t * cg;
        const int i = div_of(t, dkw), j = t - i * kw;
        const int ih = ih0 + i * dh, iw = iw0 + j * dw;
        const bool ok = col_ok && (unsigned)ih < (unsigned)h && (unsigned)iw < (unsigned)w;
        const T* px = xs + (ok ? c0 * hw + ih * w + iw : 0);
#pragma unroll
        for (int u = 0; u < BK; ++u) {
            bv[u] = ok ? *px : T(0);
            px += hw;
        }
        av = a_ok ? wrow[(c0 + ak) * khw + t] : T(0);
    };
    // The step's values at k0 .. k0 + 8 into bv and av.
    // (c, i, j) of k and the pixel it reads walk along with k; offsets within a sample fit an int (checked).
    auto gather_channels = [&](int k0) {
        const int c = div_of(k0, dkhw), r = k0 - c * khw;
        int i = div_of(r, dkw), j = r - i * kw;
        int coff = c * h * w, ih = ih0 + i * dh, iw = iw0 + j * dw;
#pragma unroll
        for (int u = 0; u < BK; ++u) {
            const bool ok = col_ok && k0 + u < K && (unsigned)ih < (unsigned)h && (unsigned)iw < (unsigned)w;
            bv[u] = ok ? xs[coff + ih * w + iw] : T(0);
            iw += dw;
            if (++j == kw) {
                j = 0;
                iw = iw0;
                ih += dh;
                if (++i == kh) {
                    i = 0;
                    ih = ih0;
                    coff += h * w;
                }
            }
        }
        av = a_ok && k0 + ak < K ? wrow[k0 + ak] : T(0);
    };
    auto gather = [&](int k0) {
        if constexpr (TAP) {
            gather_tap(k0);
        } else {
            gather_channels(k0);
        }
    };
    auto put = [&](int buf) {
#pragma unroll
        for (int u = 0; u < BK; ++u) Bs[buf][u][tid] = bv[u];
        As[buf][ak][am] = av;
    };

    const int tr = tid / (BN / TN), tc = tid % (BN / TN);  // a warp: one tr, 32 neighbouring tc
    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    }
    const int steps = (K + BK - 1) / BK;
    gather(0);
    put(0);
    __syncthreads();
    for (int st = 0; st < steps; ++st) {
        const int cur = st & 1;
        if (st + 1 < steps) gather((st + 1) * BK);
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            T am_[TM], bn_[TN];
#pragma unroll
            for (int v = 0; v < TM / VN; ++v) Vec16<T>::put(am_ + v * VN, ((const V*)&As[cur][k][tr * TM])[v]);
#pragma unroll
            for (int v = 0; v < TN / VN; ++v) Vec16<T>::put(bn_ + v * VN, ((const V*)&Bs[cur][k][tc * TN])[v]);
#pragma unroll
            for (int i = 0; i < TM; ++i) {
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += am_[i] * bn_[j];
            }
        }
        if (st + 1 < steps) put(cur ^ 1);
        __syncthreads();
    }

    // y[s, q o, pixel] for the thread's 8 channels and 4 columns (neighbouring pixels, possibly across samples).
    const int c0 = n0 + tc * TN;
    if (c0 >= np) return;
    const int s0 = div_of(c0, dP), q0 = c0 - s0 * P;
    const bool vec = P % 4 == 0;  // then the 4 columns are one sample's, at a 16-byte boundary
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + tr * TM + i;
        if (m >= og) continue;
        const long long o = (long long)grp * og + m;
        const T b0 = has_bias ? bias[offset_of(lb, o)] : T(0);
        T v[TN];
#pragma unroll
        for (int j = 0; j < TN; ++j) v[j] = b0 + acc[i][j];
        if (vec) {
            Vec16<T>::store4(y + ((long long)s0 * p.o + o) * P + q0, v);
        } else {
            int ss = s0, qq = q0;
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                if (c0 + j < np) y[((long long)ss * p.o + o) * P + qq] = v[j];
                if (++qq == P) {
                    qq = 0;
                    ++ss;
                }
            }
        }
    }
}

// im2col_impl's result by a cheaper walk, for chunks whose cols and dx index in an int (the launch checks):
// each thread writes 4 consecutive positions q of one row (c, i, j) of one sample, with a 16-byte store when
// OH OW is a multiple of 4, and finds (s, c, i, j) and (a, b) by FastDiv once per 4 elements instead of
// 64-bit divisions per element. Reads of x go along a row of the image (neighbouring threads, neighbouring
// pixels).
//
// Bytes: cols written once (nb C kh kw OH OW elements), x read about kh kw times through the cache: for the
// bench's (128, 32, 112, 112) 3x3 f32, 1.85 GB of cols, about 0.62 ms at the H100's copy rate (the GEMM then
// reads them once more).
template <typename T>
__device__ void im2col_fast_impl(const T* x, T* cols, Conv2dParams p, long long n0, int nb) {
    const int per = (int)(p.oh * p.ow), ow = (int)p.ow, w = (int)p.w, h = (int)p.h, kw = (int)p.kw, kh = (int)p.kh;
    const int groups = (per + 3) / 4, rows = nb * (int)p.c * kh * kw;
    const FastDiv dg = fast_div(groups), dkw = fast_div(kw), dkh = fast_div(kh), dow = fast_div(ow);
    const bool vec = per % 4 == 0;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < rows * groups; e += blockDim.x * gridDim.x) {
        const int t = div_of(e, dg), q0 = (e - t * groups) * 4;
        const int tk = div_of(t, dkw), j = t - tk * kw;
        const int plane = div_of(tk, dkh), i = tk - plane * kh;  // plane = s C + c within the chunk
        const T* xp = x + (n0 * p.c + plane) * p.h * p.w;
        int a = div_of(q0, dow), b = q0 - a * ow;
        T v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int ih = a * (int)p.sh - (int)p.ph + i * (int)p.dh, iw = b * (int)p.sw - (int)p.pw + j * (int)p.dw;
            v[u] = q0 + u < per && (unsigned)ih < (unsigned)h && (unsigned)iw < (unsigned)w ? xp[ih * w + iw] : T(0);
            if (++b == ow) {
                b = 0;
                ++a;
            }
        }
        T* out = cols + (long long)t * per + q0;
        if (vec) {
            Vec16<T>::store4(out, v);
        } else {
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                if (q0 + u < per) out[u] = v[u];
            }
        }
    }
}

// col2im_impl's result with int indices and FastDiv, for chunks that fit an int (the launch checks).
template <typename T>
__device__ void col2im_fast_impl(const T* dcols, T* dx, Conv2dParams p, long long n0, int nb) {
    const int per = (int)(p.oh * p.ow), ow = (int)p.ow, oh = (int)p.oh, w = (int)p.w, h = (int)p.h;
    const int kh = (int)p.kh, kw = (int)p.kw, sh = (int)p.sh, sw = (int)p.sw, ph = (int)p.ph, pw = (int)p.pw;
    const int dh = (int)p.dh, dw = (int)p.dw, total = nb * (int)p.c * h * w;
    const FastDiv dwd = fast_div(w), dhd = fast_div(h);
    T* out = dx + n0 * p.c * p.h * p.w;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += blockDim.x * gridDim.x) {
        const int r = div_of(e, dwd), iw = e - r * w;
        const int plane = div_of(r, dhd), ih = r - plane * h;
        const T* rows = dcols + (long long)plane * kh * kw * per;
        T acc = T(0);
        for (int i = 0; i < kh; ++i) {
            const int ta = ih + ph - i * dh;
            if (ta < 0 || (sh != 1 && ta % sh != 0)) continue;
            const int a = sh == 1 ? ta : ta / sh;
            if (a >= oh) continue;
            for (int j = 0; j < kw; ++j) {
                const int tb = iw + pw - j * dw;
                if (tb < 0 || (sw != 1 && tb % sw != 0)) continue;
                const int b = sw == 1 ? tb : tb / sw;
                if (b < ow) acc += rows[(i * kw + j) * per + a * ow + b];
            }
        }
        out[e] = acc;
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

// wt[c][o][t] = w[o][c][taps - 1 - t]: a one-group conv's weight with its taps flipped in both directions and
// its channels swapped, the weight of the stride-1 conv that is its dx (conv/cuda.rs `input_grad_conv`).
template <typename T>
__device__ void flip_weight_impl(const T* w, T* wt, long long o, long long c, long long taps) {
    GRID_STRIDE(e, o * c * taps) {
        const long long t = e % taps, oc = e / taps, oo = oc % o, cc = oc / o;
        wt[e] = w[(oo * c + cc) * taps + (taps - 1 - t)];
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

// The tiled depthwise pair of one instance: dw_fwd_<NAME>_<dtype> and dw_bwd_<NAME>_<dtype>.
#define DW_TILED(T, SUFFIX, NAME, FWD, BWD)                                                                   \
    extern "C" __global__ void dw_fwd_##NAME##_##SUFFIX(const T* x, const T* w, const T* bias, Strided lb,    \
                                                        int has_bias, T* y, DwTile p) {                       \
        FWD(x, w, bias, lb, has_bias, y, p);                                                                   \
    }                                                                                                          \
    extern "C" __global__ void dw_bwd_##NAME##_##SUFFIX(const T* x, const T* w, const T* g, T* dx,            \
                                                        double* part, DwTile p, int need_dx, int need_sums) { \
        BWD(x, w, g, dx, part, p, need_dx, need_sums);                                                         \
    }

#define CONV_KERNELS(T, SUFFIX)                                                                              \
    extern "C" __global__ void dw_fwd_##SUFFIX(const T* x, const T* w, const T* bias, Strided lb,             \
                                               int has_bias, T* y, Conv2dParams p) {                          \
        dw_fwd_impl<T>(x, w, bias, lb, has_bias, y, p);                                                        \
    }                                                                                                          \
    DW_TILED(T, SUFFIX, 3x3s1, (dw_fwd_tiled_impl<T, 3, 3, 1>), (dw_bwd_tiled_impl<T, 3, 3, 1>))             \
    DW_TILED(T, SUFFIX, 3x3s2, (dw_fwd_tiled_impl<T, 3, 3, 2>), (dw_bwd_tiled_impl<T, 3, 3, 2>))             \
    DW_TILED(T, SUFFIX, any, dw_fwd_tiled_any_impl<T>, dw_bwd_tiled_any_impl<T>)                              \
    extern "C" __global__ void __launch_bounds__(256, 16 / sizeof(T))                                         \
        dw_s2_fwd_##SUFFIX(const T* x, const T* w, const T* bias, Strided lb, int has_bias, T* y, DwS2 p) {   \
        dw_s2_fwd_impl<T>(x, w, bias, lb, has_bias, y, p);                                                    \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        dw_s2_bwd_##SUFFIX(const T* x, const T* w, const T* g, T* dx, double* part, DwS2 p, int need_dx,      \
                           int need_sums) {                                                                   \
        dw_s2_bwd_impl<T>(x, w, g, dx, part, p, need_dx, need_sums);                                          \
    }                                                                                                         \
    extern "C" __global__ void dw_reduce_##SUFFIX(const double* part, T* dw, T* db, int c, int per, int taps, \
                                                  int need_w, int need_b) {                                   \
        dw_reduce_impl<T>(part, dw, db, c, per, taps, need_w, need_b);                                         \
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
    extern "C" __global__ void conv_igemm_##SUFFIX(const T* x, const T* w, const T* bias, Strided lb,         \
                                                   int has_bias, T* y, Conv2dParams p) {                      \
        conv_igemm_impl<T, false>(x, w, bias, lb, has_bias, y, p);                                             \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 12 / sizeof(T))                                         \
        conv_igemm_tap_##SUFFIX(const T* x, const T* w, const T* bias, Strided lb,                            \
                                int has_bias, T* y, Conv2dParams p) {                                         \
        conv_igemm_impl<T, true>(x, w, bias, lb, has_bias, y, p);                                              \
    }                                                                                                          \
    extern "C" __global__ void im2col_fast_##SUFFIX(const T* x, T* cols, Conv2dParams p, long long n0,       \
                                                    int nb) {                                                 \
        im2col_fast_impl<T>(x, cols, p, n0, nb);                                                               \
    }                                                                                                          \
    extern "C" __global__ void col2im_fast_##SUFFIX(const T* dcols, T* dx, Conv2dParams p, long long n0,     \
                                                    int nb) {                                                 \
        col2im_fast_impl<T>(dcols, dx, p, n0, nb);                                                             \
    }                                                                                                          \
    extern "C" __global__ void flip_weight_##SUFFIX(const T* w, T* wt, long long o, long long c,               \
                                                    long long taps) {                                          \
        flip_weight_impl<T>(w, wt, o, c, taps);                                                                \
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

// The channels-last depthwise kernels of one dtype, each with V = VEC (16-byte accesses: _vec) and V = 1 (_one):
// dwl_{fwd,dx,sums}_{3x3s1,3x3s2,any}_{vec,one}_<dtype>.
#define DWL_V(T, SUFFIX, VNAME, V)                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 2) dwl_fwd_3x3s1_##VNAME##_##SUFFIX(const T* x, const T* w, const T* bias,        \
                                                                Strided lb, int has_bias, int epi, T* y, DwlTile p) {  \
        dwl_fwd_rows_impl<T, V, 3, 3, 1, 8>(x, w, bias, lb, has_bias, epi, y, p);                                   \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 2) dwl_fwd_3x3s2_##VNAME##_##SUFFIX(const T* x, const T* w, const T* bias,        \
                                                                Strided lb, int has_bias, int epi, T* y, DwlTile p) {  \
        dwl_fwd_rows_impl<T, V, 3, 3, 2, 4>(x, w, bias, lb, has_bias, epi, y, p);                                   \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 2) dwl_fwd_any_##VNAME##_##SUFFIX(const T* x, const T* w, const T* bias,          \
                                                              Strided lb, int has_bias, int epi, T* y, DwlTile p) {    \
        dwl_fwd_any_impl<T, V, 4>(x, w, bias, lb, has_bias, epi, y, p);                                             \
    }                                                                                                          \
    extern "C" __global__ void dwl_dx_3x3s1_##VNAME##_##SUFFIX(const T* g, const T* w, T* dx, int residual, DwlTile p) {    \
        dwl_dx_rows_impl<T, V, 3, 3, 8>(g, w, dx, residual, p);                                                          \
    }                                                                                                          \
    extern "C" __global__ void dwl_dx_3x3s2_##VNAME##_##SUFFIX(const T* g, const T* w, T* dx, int residual, DwlTile p) {    \
        dwl_dx_gather_impl<T, V, 3, 3, 2, 4>(g, w, dx, residual, p);                                                     \
    }                                                                                                          \
    extern "C" __global__ void dwl_dx_any_##VNAME##_##SUFFIX(const T* g, const T* w, T* dx, int residual, DwlTile p) {      \
        dwl_dx_gather_impl<T, V, 0, 0, 1, 4>(g, w, dx, residual, p);                                                     \
    }                                                                                                          \
    extern "C" __global__ void dwl_sums_3x3s1_##VNAME##_##SUFFIX(const T* x, const T* g, double* part,        \
                                                                 DwlTile p, int need_w) {                     \
        dwl_sums_rows_impl<T, V, 3, 3, 1, 8>(x, g, part, p, need_w);                                           \
    }                                                                                                          \
    extern "C" __global__ void dwl_sums_3x3s2_##VNAME##_##SUFFIX(const T* x, const T* g, double* part,        \
                                                                 DwlTile p, int need_w) {                     \
        dwl_sums_rows_impl<T, V, 3, 3, 2, 4>(x, g, part, p, need_w);                                           \
    }                                                                                                          \
    extern "C" __global__ void dwl_sums_any_##VNAME##_##SUFFIX(const T* x, const T* g, double* part,          \
                                                               DwlTile p, int need_w) {                       \
        dwl_sums_any_impl<T, V, 4>(x, g, part, p, need_w);                                                     \
    }

#define DWL_KERNELS(T, SUFFIX) \
    DWL_V(T, SUFFIX, vec, PACK16(T)) \
    DWL_V(T, SUFFIX, one, 1)

CONV_KERNELS(float, f32)
CONV_KERNELS(double, f64)
DWL_KERNELS(float, f32)
DWL_KERNELS(double, f64)
