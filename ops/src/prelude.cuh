// Shared by every ops kernel (prepended to each family's .cu before NVRTC compiles it).
//
// `Strided` mirrors `ops::cuda::Strided` (#[repr(C)]): a view's shape, strides and offset in elements. A
// kernel walks its output in row-major order with index i and finds each input's element with
// `offset_of`, which is a plain `offset + i` when the view is contiguous.

#define MAX_DIMS 8

struct Strided {
    long long shape[MAX_DIMS];
    long long strides[MAX_DIMS];
    long long offset;
    int rank;
    int contiguous;
};

__device__ __forceinline__ long long offset_of(const Strided& l, long long i) {
    if (l.contiguous) return l.offset + i;
    long long o = l.offset;
    for (int d = l.rank - 1; d >= 0; --d) {
        long long s = l.shape[d];
        o += (i % s) * l.strides[d];
        i /= s;
    }
    return o;
}

// Overloads so templates can call one name for float and double.
__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double m_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }
__device__ __forceinline__ float m_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float m_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double m_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float m_rsqrt(float x) { return 1.0f / sqrtf(x); }
__device__ __forceinline__ double m_rsqrt(double x) { return 1.0 / sqrt(x); }
__device__ __forceinline__ float m_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double m_abs(double x) { return fabs(x); }
__device__ __forceinline__ float m_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double m_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float m_erf(float x) { return erff(x); }
__device__ __forceinline__ double m_erf(double x) { return erf(x); }
__device__ __forceinline__ float m_pow(float x, float p) { return powf(x, p); }
__device__ __forceinline__ double m_pow(double x, double p) { return pow(x, p); }
__device__ __forceinline__ float m_sin(float x) { return sinf(x); }
__device__ __forceinline__ double m_sin(double x) { return sin(x); }
__device__ __forceinline__ float m_cos(float x) { return cosf(x); }
__device__ __forceinline__ double m_cos(double x) { return cos(x); }

template <typename T> __device__ __forceinline__ bool m_isnan(T x) { return x != x; }

template <typename T> __device__ __forceinline__ T m_sigmoid(T x) {
    // Two branches so that exp(-x) never overflows.
    if (x >= T(0)) return T(1) / (T(1) + m_exp(-x));
    T e = m_exp(x);
    return e / (T(1) + e);
}

// Grid-stride loop over n elements.
#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)
