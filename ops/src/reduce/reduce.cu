// Reductions. The input is viewed (through `lx`, the permuted layout: kept dims first, reduced dims last)
// as `outputs` rows of `group` elements.
//
// ops: 0 sum, 1 max (NaN propagates), 2 count of elements equal to ref[row] (for max's backward).
//
// Two kernel families (reduce/cuda.rs picks one per launch):
// - reduce_rows_{warp,block}_<op>: the rows are contiguous (the input is, and the reduced dims are its innermost
//   ones: a full sum, a sum over the last dims). 16-byte loads, accumulation in double; see below.
// - reduce_<op>: any layout, element by element through `offset_of`; one warp per task: a row, or with
//   `splits` > 1 one of `splits` consecutive slices of a row, whose partial results a second launch of the same
//   kernel reduces (splits = 1). Bytes: each element read once, as below, but 4 bytes a load and the index
//   arithmetic of offset_of per element: measured at 0.745 of the copy bandwidth on a contiguous 64M-float sum
//   (when it served those too); now it serves permuted and column reductions, whose reads are not coalesced
//   in general, so expect less there.

#define WARPS_PER_BLOCK 8

template <typename T, int OP> __device__ __forceinline__ T identity() {
    return OP == 1 ? m_neg_inf<T>() : T(0);
}

template <typename T, int OP> __device__ __forceinline__ T combine(T a, T b) {
    if (OP == 1) return (m_isnan(a) || a > b) ? a : ((m_isnan(b) || b > a) ? b : a);
    return a + b;
}

template <typename T, int OP>
__device__ void reduce_impl(const T* x, Strided lx, const T* ref, T* out, long long outputs, long long group,
                            long long splits) {
    const int lane = threadIdx.x & 31;
    const long long warp = (long long)blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    const long long tasks = outputs * splits;
    const long long warps = (long long)gridDim.x * WARPS_PER_BLOCK;
    for (long long task = warp; task < tasks; task += warps) {
        const long long row = task / splits, s = task % splits;
        const long long per = (group + splits - 1) / splits;
        const long long lo = s * per;
        const long long hi = min(group, lo + per);
        T acc = identity<T, OP>();
        const T r = OP == 2 ? ref[row] : T(0);
        for (long long j = lo + lane; j < hi; j += 32) {
            T v = x[offset_of(lx, row * group + j)];
            if (OP == 2) v = (v == r || (m_isnan(v) && m_isnan(r))) ? T(1) : T(0);
            acc = combine<T, OP>(acc, v);
        }
        for (int d = 16; d > 0; d >>= 1) acc = combine<T, OP>(acc, __shfl_down_sync(0xffffffffu, acc, d));
        if (lane == 0) out[task] = acc;
    }
}

#define REDUCE_KERNEL(NAME, OP, T, SUFFIX)                                                             \
    extern "C" __global__ void reduce_##NAME##_##SUFFIX(const T* x, Strided lx, const T* ref, T* out,  \
                                                        long long outputs, long long group,            \
                                                        long long splits) {                            \
        reduce_impl<T, OP>(x, lx, ref, out, outputs, group, splits);                                   \
    }

REDUCE_KERNEL(sum, 0, float, f32)
REDUCE_KERNEL(sum, 0, double, f64)
REDUCE_KERNEL(max, 1, float, f32)
REDUCE_KERNEL(max, 1, double, f64)
REDUCE_KERNEL(count_eq, 2, float, f32)
REDUCE_KERNEL(count_eq, 2, double, f64)

// dL/dx of max: element i of the permuted view (row i / group) gets g[row] / count[row] where it equals
// y[row]; `ldest` maps i to its place in a contiguous tensor of the input's shape.
template <typename T>
__device__ void max_bwd_impl(const T* x, Strided lx, const T* y, const T* g, const T* count, T* dx,
                             Strided ldest, long long n, long long group) {
    GRID_STRIDE(i, n) {
        const long long row = i / group;
        const T v = x[offset_of(lx, i)];
        const bool hit = v == y[row] || (m_isnan(v) && m_isnan(y[row]));
        dx[offset_of(ldest, i)] = hit ? g[row] / count[row] : T(0);
    }
}

extern "C" __global__ void max_bwd_f32(const float* x, Strided lx, const float* y, const float* g,
                                       const float* count, float* dx, Strided ldest, long long n,
                                       long long group) {
    max_bwd_impl<float>(x, lx, y, g, count, dx, ldest, n, group);
}

extern "C" __global__ void max_bwd_f64(const double* x, Strided lx, const double* y, const double* g,
                                       const double* count, double* dx, Strided ldest, long long n,
                                       long long group) {
    max_bwd_impl<double>(x, lx, y, g, count, dx, ldest, n, group);
}

// ---- contiguous rows: 16-byte loads ---------------------------------------------------------------------
//
// x holds `rows` rows of `group` elements back to back. Bytes: every element read once (4 bytes an f32), one
// output per row written: a pure read stream, which the H100 serves at least as fast as a copy's mix of reads
// and writes. Expected at about 0.9 of the device-to-device copy bandwidth for a full f32 sum of 64M
// elements (the element-by-element kernel above measured 0.745).
//
// Each thread accumulates its share in double: a pack's elements are first combined in T pairwise ((x0 + x1)
// + (x2 + x3) for float4), then added to the double accumulator; lanes and warps combine by shuffles and
// shared memory in a fixed order. For sums of f32 that keeps the rounding error near that of a float64
// summation (each f32 pack sum is exact to 2 ulps of its 4 terms), at no cost a memory-bound loop notices;
// for max and counts the double is exact. No float atomics: results are the same bits run after run.
//
// Alignment: row r starts at x + r * group, which is 16-byte aligned only if group (and x) allow. Each thread
// group (warp or block) therefore takes the first elements of its slice, up to the next 16-byte boundary, one
// at a time, then packs, then the remainder one at a time: any offset and any group size are safe.

#define ROW_THREADS 256

template <typename T, int OP> __device__ __forceinline__ T element(T v, T r) {
    if (OP == 2) return (v == r || (m_isnan(v) && m_isnan(r))) ? T(1) : T(0);
    return v;
}

template <int OP> __device__ __forceinline__ double warp_combine(double acc) {
    for (int d = 16; d > 0; d >>= 1) acc = combine<double, OP>(acc, __shfl_down_sync(0xffffffffu, acc, d));
    return acc;
}

// Thread t of nt's share of p[0..len): element by element up to the first 16-byte boundary, then packs t,
// t + nt, ... (VEC_UNROLL of them loaded before the first is used), then the elements after the last pack.
template <typename T, int OP>
__device__ __forceinline__ double thread_share(const T* p, long long len, T r, int t, int nt) {
    constexpr int W = PACK16(T);
    const long long misaligned = (long long)((reinterpret_cast<unsigned long long>(p) / sizeof(T)) % W);
    const long long head = min(len, (long long)((W - misaligned) % W));
    double acc = identity<double, OP>();
    if (t < head) acc = combine<double, OP>(acc, (double)element<T, OP>(p[t], r));
    const T* q = p + head;
    const long long packs = (len - head) / W;
    for (long long j = t; j < packs; j += (long long)nt * VEC_UNROLL) {
        Pack16<T> v[VEC_UNROLL];
#pragma unroll
        for (int u = 0; u < VEC_UNROLL; ++u) {
            const long long k = j + (long long)u * nt;
            if (k < packs) v[u] = load16(q + k * W);
        }
#pragma unroll
        for (int u = 0; u < VEC_UNROLL; ++u) {
            if (j + (long long)u * nt < packs) {
                T w[W];
#pragma unroll
                for (int e = 0; e < W; ++e) w[e] = element<T, OP>(v[u].v[e], r);
#pragma unroll
                for (int h = W / 2; h > 0; h >>= 1) {
#pragma unroll
                    for (int e = 0; e < h; ++e) w[e] = combine<T, OP>(w[e], w[e + h]);
                }
                acc = combine<double, OP>(acc, (double)w[0]);
            }
        }
    }
    for (long long i = head + packs * W + t; i < len; i += nt) acc = combine<double, OP>(acc, (double)element<T, OP>(p[i], r));
    return acc;
}

// One warp per row (rows short enough, or many enough, that a row needs no more threads): grid-stride over rows.
template <typename T, int OP>
__device__ void rows_warp_impl(const T* x, const T* ref, T* out, long long rows, long long group) {
    const int lane = threadIdx.x & 31;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long row = warp; row < rows; row += warps) {
        const T r = OP == 2 ? ref[row] : T(0);
        const double acc = warp_combine<OP>(thread_share<T, OP>(x + row * group, group, r, lane, 32));
        if (lane == 0) out[row] = (T)acc;
    }
}

// Blocks of a split launch that have finished, counted by atomicInc, which wraps it back to 0 when the last
// block of the grid increments it: every launch finds it at 0. Sound because all of a device's work runs on
// one stream (engine::cuda), so two split launches of this module never overlap.
__device__ unsigned int rows_blocks_done;

// One block per task: row `task / splits`, slice `task % splits` of it (splits consecutive slices of whole
// packs). With splits = 1 the block writes the row's result. Otherwise it writes its partial (a double) and
// the last block of the grid to finish combines every row's partials in slice order: one launch, and the same
// result whichever block finishes last.
template <typename T, int OP>
__device__ void rows_block_impl(const T* x, const T* ref, T* out, double* part, long long rows, long long group,
                                long long splits) {
    __shared__ double warp_acc[ROW_THREADS / 32];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const long long task = blockIdx.x;
    const long long row = task / splits, s = task % splits;
    constexpr int W = PACK16(T);
    const long long per = ((group + splits - 1) / splits + W - 1) / W * W;
    const long long lo = min(group, s * per), hi = min(group, lo + per);
    const T r = OP == 2 ? ref[row] : T(0);
    double acc = warp_combine<OP>(thread_share<T, OP>(x + row * group + lo, hi - lo, r, threadIdx.x, blockDim.x));
    if (lane == 0) warp_acc[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < warps ? warp_acc[lane] : identity<double, OP>();
        acc = warp_combine<OP>(acc);
    }
    if (splits == 1) {
        if (threadIdx.x == 0) out[row] = (T)acc;
        return;
    }
    if (threadIdx.x == 0) {
        part[task] = acc;
        __threadfence(); // the partial is visible device-wide before the count says so
        last = atomicInc(&rows_blocks_done, gridDim.x - 1) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (long long rr = warp; rr < rows; rr += warps) {
        double a = identity<double, OP>();
        // __ldcg: read at L2, where the other blocks' partials are, not from a stale L1 line.
        for (long long j = lane; j < splits; j += 32) a = combine<double, OP>(a, __ldcg(part + rr * splits + j));
        a = warp_combine<OP>(a);
        if (lane == 0) out[rr] = (T)a;
    }
}

#define ROWS_KERNELS(NAME, OP, T, SUFFIX)                                                              \
    extern "C" __global__ void reduce_rows_warp_##NAME##_##SUFFIX(const T* x, const T* ref, T* out,    \
                                                                  long long rows, long long group) {   \
        rows_warp_impl<T, OP>(x, ref, out, rows, group);                                               \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                          \
        reduce_rows_block_##NAME##_##SUFFIX(const T* x, const T* ref, T* out, double* part,            \
                                            long long rows, long long group, long long splits) {       \
        rows_block_impl<T, OP>(x, ref, out, part, rows, group, splits);                                \
    }

ROWS_KERNELS(sum, 0, float, f32)
ROWS_KERNELS(sum, 0, double, f64)
ROWS_KERNELS(max, 1, float, f32)
ROWS_KERNELS(max, 1, double, f64)
ROWS_KERNELS(count_eq, 2, float, f32)
ROWS_KERNELS(count_eq, 2, double, f64)

// ---- columns: sums down the rows of a row-major (R, K) matrix ----------------------------------------------
//
// The reduced dims come before the kept ones in memory (a bias gradient: (B N, C) summed over its rows; the
// broadcast operand's gradient of (B, N, C) + (N, C)): output k reduces x[k], x[K + k], x[2K + k], ...
// The strided kernel above gives each output one warp whose lanes walk down a column, 32 sectors a load for
// 4 useful bytes each. Here the lanes of a warp take 32 neighbouring columns of one row (one 128-byte line),
// the block's COL_WARPS warps take interleaved rows, and gridDim.y blocks split the rows into `per`-row
// slices. Bytes: every element read once, coalesced.
//
// Accumulation in double, the warps' partials combined in warp order. With gridDim.y > 1 each block writes
// its partials (one double a column) and a second launch, reduce_cols_finish, adds the slices of a column in
// one warp: lane l takes slices l, l + 32, ..., then the warp's fixed shuffle tree. (A last-block-finishes
// tail, as the rows kernel has, left one block walking splits x K partials alone: ~500 dependent L2 loads a
// column for a 64-column bias gradient, more than the main pass took.) Same bits run after run.

#define COL_WARPS 8

template <typename T, int OP>
__device__ void cols_impl(const T* x, const T* ref, T* out, double* part, long long R, long long K, long long per) {
    __shared__ double warp_acc[COL_WARPS][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long col = (long long)blockIdx.x * 32 + lane;
    const long long s = blockIdx.y;
    const long long lo = min(R, s * per), hi = min(R, lo + per);
    double acc = identity<double, OP>();
    if (col < K) {
        const T r = OP == 2 ? ref[col] : T(0);
#pragma unroll 4
        for (long long row = lo + warp; row < hi; row += COL_WARPS)
            acc = combine<double, OP>(acc, (double)element<T, OP>(x[row * K + col], r));
    }
    warp_acc[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && col < K) {
        for (int w = 1; w < COL_WARPS; ++w) acc = combine<double, OP>(acc, warp_acc[w][lane]);
        if (gridDim.y == 1)
            out[col] = (T)acc;
        else
            part[s * K + col] = acc;
    }
}

// out[c] = the combination of part[j K + c] over the `splits` slices j: one warp a column, COL_WARPS columns
// a block.
template <typename T, int OP> __device__ void cols_finish_impl(const double* part, T* out, long long K, long long splits) {
    const int lane = threadIdx.x & 31;
    const long long c = (long long)blockIdx.x * COL_WARPS + (threadIdx.x >> 5);
    if (c >= K) return;
    double a = identity<double, OP>();
#pragma unroll 4
    for (long long j = lane; j < splits; j += 32) a = combine<double, OP>(a, part[j * K + c]);
    a = warp_combine<OP>(a);
    if (lane == 0) out[c] = (T)a;
}

#define COLS_KERNEL(NAME, OP, T, SUFFIX)                                                               \
    extern "C" __global__ void __launch_bounds__(COL_WARPS * 32)                                       \
        reduce_cols_##NAME##_##SUFFIX(const T* x, const T* ref, T* out, double* part, long long R,     \
                                      long long K, long long per) {                                    \
        cols_impl<T, OP>(x, ref, out, part, R, K, per);                                                \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(COL_WARPS * 32)                                       \
        reduce_cols_finish_##NAME##_##SUFFIX(const double* part, T* out, long long K, long long splits) { \
        cols_finish_impl<T, OP>(part, out, K, splits);                                                 \
    }

COLS_KERNEL(sum, 0, float, f32)
COLS_KERNEL(sum, 0, double, f64)
COLS_KERNEL(max, 1, float, f32)
COLS_KERNEL(max, 1, double, f64)
COLS_KERNEL(count_eq, 2, float, f32)
COLS_KERNEL(count_eq, 2, double, f64)
