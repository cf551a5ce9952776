// dst[view ld][i] = src[view ls][i] for i over the common shape in row-major order.
//
// Only for views that are not both contiguous (copy/cuda.rs sends those to one device-to-device memcpy, at
// the copy bandwidth: 1.0 of the `copy` ceiling). Bytes: n elements read and n written, 2ns; the index
// arithmetic of offset_of per element (a division and a modulo per merged dim) makes it slower than a
// memcpy: measured at 0.618 of the copy bandwidth when it also served contiguous views (64M floats).

template <typename T>
__device__ void copy_impl(const T* src, Strided ls, T* dst, Strided ld, long long n) {
    GRID_STRIDE(i, n) { dst[offset_of(ld, i)] = src[offset_of(ls, i)]; }
}

extern "C" __global__ void copy_strided_f32(const float* src, Strided ls, float* dst, Strided ld, long long n) {
    copy_impl<float>(src, ls, dst, ld, n);
}

extern "C" __global__ void copy_strided_f64(const double* src, Strided ls, double* dst, Strided ld,
                                            long long n) {
    copy_impl<double>(src, ls, dst, ld, n);
}
