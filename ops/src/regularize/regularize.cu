// The stochastic regularisers' one kernel: y[i] = x[i] mask[i / block], the mask drawn on the host (see
// regularize/mod.rs) so that a seed gives the same mask on every device. x and the mask are read through their
// views (x need not be contiguous: i is its row-major index); y is contiguous.

template <typename T>
__device__ void scale_blocks_impl(const T* x, Strided lx, const T* mask, Strided lm, T* y, long long n,
                                  long long block) {
    GRID_STRIDE(i, n) { y[i] = x[offset_of(lx, i)] * mask[offset_of(lm, i / block)]; }
}

extern "C" __global__ void scale_blocks_f32(const float* x, Strided lx, const float* mask, Strided lm, float* y,
                                            long long n, long long block) {
    scale_blocks_impl<float>(x, lx, mask, lm, y, n, block);
}

extern "C" __global__ void scale_blocks_f64(const double* x, Strided lx, const double* mask, Strided lm,
                                            double* y, long long n, long long block) {
    scale_blocks_impl<double>(x, lx, mask, lm, y, n, block);
}

// The residual with drop path: y[i] = x[i] + t[i] mask[i / block], the product rounded before the add (no
// contraction into an FMA), so the bits are those of scale_blocks followed by the add.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename T>
__device__ void add_scaled_blocks_impl(const T* x, Strided lx, const T* t, Strided lt, const T* mask, Strided lm,
                                       T* y, long long n, long long block) {
    GRID_STRIDE(i, n) { y[i] = x[offset_of(lx, i)] + mul_rn(t[offset_of(lt, i)], mask[offset_of(lm, i / block)]); }
}

extern "C" __global__ void add_scaled_blocks_f32(const float* x, Strided lx, const float* t, Strided lt,
                                                 const float* mask, Strided lm, float* y, long long n,
                                                 long long block) {
    add_scaled_blocks_impl<float>(x, lx, t, lt, mask, lm, y, n, block);
}

extern "C" __global__ void add_scaled_blocks_f64(const double* x, Strided lx, const double* t, Strided lt,
                                                 const double* mask, Strided lm, double* y, long long n,
                                                 long long block) {
    add_scaled_blocks_impl<double>(x, lx, t, lt, mask, lm, y, n, block);
}
