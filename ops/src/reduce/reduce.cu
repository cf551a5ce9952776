// Reductions. The input is viewed (through `lx`, the permuted layout: kept dims first, reduced dims last)
// as `outputs` rows of `group` elements. One warp reduces one task: a row, or with `splits` > 1 one of
// `splits` consecutive slices of a row, whose partial results a second launch reduces (splits = 1).
//
// ops: 0 sum, 1 max (NaN propagates), 2 count of elements equal to ref[row] (for max's backward).

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
