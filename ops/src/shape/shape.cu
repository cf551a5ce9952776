// index_select and its backward. The tensor is seen as (outer, size, inner) around the selected dim and the
// selection as (outer, nidx, inner): element i = (o, j, r) of the selection is element (o, idx[j], r) of the
// tensor, at row-major position (o * size + idx[j]) * inner + r. Indices are below `size` (checked on the
// host before upload).

__device__ __forceinline__ long long selected(long long i, const long long* idx, long long nidx, long long size,
                                              long long inner) {
    const long long r = i % inner;
    const long long q = i / inner;
    return ((q / nidx) * size + idx[q % nidx]) * inner + r;
}

// y[i] = x[selected(i)], x read through its view, y contiguous.
template <typename T>
__device__ void index_select_impl(const T* x, Strided lx, const long long* idx, T* y, long long n, long long nidx,
                                  long long size, long long inner) {
    GRID_STRIDE(i, n) { y[i] = x[offset_of(lx, selected(i, idx, nidx, size, inner))]; }
}

// dx[selected(i)] += g[i] into a zeroed contiguous dx. A repeated index sends several threads to one element,
// so the adds are atomic (atomicAdd on double needs sm_60, older than any GPU the CUDA 13 NVRTC targets).
template <typename T>
__device__ void index_add_impl(const T* g, Strided lg, const long long* idx, T* dx, long long n, long long nidx,
                               long long size, long long inner) {
    GRID_STRIDE(i, n) { atomicAdd(dx + selected(i, idx, nidx, size, inner), g[offset_of(lg, i)]); }
}

#define SHAPE_KERNELS(T, SUFFIX)                                                                         \
    extern "C" __global__ void index_select_##SUFFIX(const T* x, Strided lx, const long long* idx, T* y,   \
                                                     long long n, long long nidx, long long size,         \
                                                     long long inner) {                                   \
        index_select_impl<T>(x, lx, idx, y, n, nidx, size, inner);                                        \
    }                                                                                                      \
    extern "C" __global__ void index_add_##SUFFIX(const T* g, Strided lg, const long long* idx, T* dx,     \
                                                  long long n, long long nidx, long long size,            \
                                                  long long inner) {                                      \
        index_add_impl<T>(g, lg, idx, dx, n, nidx, size, inner);                                          \
    }

SHAPE_KERNELS(float, f32)
SHAPE_KERNELS(double, f64)
