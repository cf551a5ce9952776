// The engine's storage-level kernels (see cuda/storage.rs): fill, strided gather, dtype cast and same-shape
// add (element by element, or in 16-byte packs for flat inputs). Compiled by NVRTC after prelude.cuh as the
// module "engine_storage". Every kernel writes a contiguous output `out[0..n)` in row-major order of the input
// view(s).
//
// Names: <op>_f32 / <op>_f64 by element type; the casts name both types (cast_f32_to_f64).

template <typename T>
__device__ void fill_impl(T* out, long long n, T value) {
    GRID_STRIDE(i, n) { out[i] = value; }
}

// out[i] = src[offset_of(ls, i)]: makes a strided view contiguous. (A contiguous view never gets here: the
// Rust side copies it with one device-to-device memcpy.)
template <typename T>
__device__ void gather_impl(const T* src, Strided ls, T* out, long long n) {
    GRID_STRIDE(i, n) { out[i] = src[offset_of(ls, i)]; }
}

template <typename S, typename D>
__device__ void cast_impl(const S* src, Strided ls, D* out, long long n) {
    GRID_STRIDE(i, n) { out[i] = (D)src[offset_of(ls, i)]; }
}

// out[i] = a[offset_of(la, i)] + b[offset_of(lb, i)] for two views of the same shape (gradient accumulation).
template <typename T>
__device__ void add_strided_impl(const T* a, Strided la, const T* b, Strided lb, T* out, long long n) {
    if (la.contiguous && lb.contiguous) {
        const T* pa = a + la.offset;
        const T* pb = b + lb.offset;
        GRID_STRIDE(i, n) { out[i] = pa[i] + pb[i]; }
    } else {
        GRID_STRIDE(i, n) { out[i] = a[offset_of(la, i)] + b[offset_of(lb, i)]; }
    }
}

// The vectorised form of add_strided for flat inputs (engine::cuda::vector::plan picks it): 2 reads and 1 write
// of n elements, 12 bytes an f32 element, in 16-byte accesses. Expected at about 0.9 of a device-to-device
// copy's bandwidth (read + write counted), against 0.74 for the element-by-element loop above.
template <typename T>
__device__ void add_vec_impl(const T* a, long long pa, const T* b, long long pb, T* out, long long n) {
    const T* in[2] = {a, b};
    const long long period[2] = {pa, pb};
    T* const outs[1] = {out};
    map16<2, 1>(in, period, outs, n, [](const T(&x)[2], T(&y)[1]) { y[0] = x[0] + x[1]; });
}

// The fill value travels as a double for both dtypes so the Rust side passes one argument type.
extern "C" __global__ void fill_f32(float* out, long long n, double value) { fill_impl<float>(out, n, (float)value); }
extern "C" __global__ void fill_f64(double* out, long long n, double value) { fill_impl<double>(out, n, value); }

extern "C" __global__ void gather_f32(const float* src, Strided ls, float* out, long long n) {
    gather_impl<float>(src, ls, out, n);
}
extern "C" __global__ void gather_f64(const double* src, Strided ls, double* out, long long n) {
    gather_impl<double>(src, ls, out, n);
}

extern "C" __global__ void cast_f32_to_f64(const float* src, Strided ls, double* out, long long n) {
    cast_impl<float, double>(src, ls, out, n);
}
extern "C" __global__ void cast_f64_to_f32(const double* src, Strided ls, float* out, long long n) {
    cast_impl<double, float>(src, ls, out, n);
}

extern "C" __global__ void add_strided_f32(const float* a, Strided la, const float* b, Strided lb, float* out,
                                           long long n) {
    add_strided_impl<float>(a, la, b, lb, out, n);
}
extern "C" __global__ void add_strided_f64(const double* a, Strided la, const double* b, Strided lb, double* out,
                                           long long n) {
    add_strided_impl<double>(a, la, b, lb, out, n);
}

extern "C" __global__ void add_vec_f32(const float* a, long long pa, const float* b, long long pb, float* out,
                                       long long n) {
    add_vec_impl<float>(a, pa, b, pb, out, n);
}
extern "C" __global__ void add_vec_f64(const double* a, long long pa, const double* b, long long pb, double* out,
                                       long long n) {
    add_vec_impl<double>(a, pa, b, pb, out, n);
}
