// Prepended to the engine's own kernels (storage.cu) before NVRTC compiles them.
//
// `Strided` mirrors `engine::cuda::Strided` (#[repr(C)], 144 bytes) field for field, and has the same layout
// as the `Strided` of ops/src/prelude.cuh, so one Rust value can be passed to either. It is a view's shape,
// strides and offset in elements, with size-1 dims dropped and contiguous neighbours merged on the Rust side
// so that `rank` is as small as it can be. A kernel walks its output in row-major order with a 64-bit index
// i and finds each input's element with `offset_of`, which is a plain `offset + i` when the view is
// contiguous.

#define MAX_DIMS 8

struct Strided {
    long long shape[MAX_DIMS];
    long long strides[MAX_DIMS];
    long long offset;
    int rank;
    int contiguous;
};

static_assert(sizeof(Strided) == 144, "Strided must match engine::cuda::Strided");

__device__ __forceinline__ long long offset_of(const Strided& l, long long i) {
    if (l.contiguous) return l.offset + i;
    long long o = l.offset;
    for (int d = l.rank - 1; d >= 0; --d) {
        const long long s = l.shape[d];
        o += (i % s) * l.strides[d];
        i /= s;
    }
    return o;
}

// Grid-stride loop over n elements with a 64-bit index: tensors may hold more than 2^31 elements, and the
// grid is capped (CudaDevice::launch_config), so each thread visits several.
#define GRID_STRIDE(i, n)                                                                        \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n);   \
         i += (long long)blockDim.x * gridDim.x)

// ---- 16-byte accesses: the contiguous fast paths -------------------------------------------------------
//
// A Pack16<T> is 16 bytes of T (4 floats or 2 doubles), loaded and stored with one 128-bit instruction
// (LDG.E.128 / STG.E.128): a quarter of the load instructions of a float-by-float loop for the same bytes.
// Every pointer given to load16 / store16 must be 16-byte aligned. Elementwise kernels get that from the host,
// which checks each operand's address before it picks a vectorised kernel (engine::cuda::vector::plan) and
// launches the Strided form otherwise; reductions peel a scalar head off each row instead.

#define PACK16(T) ((int)(16 / sizeof(T)))

// Packs a thread takes per turn of a vectorised loop, every load issued before the first use: with 3 inputs,
// 12 loads of 16 bytes in flight per thread. Mirrored by engine::cuda::vector::UNROLL.
#define VEC_UNROLL 4

template <typename T> struct alignas(16) Pack16 {
    T v[16 / sizeof(T)];
};

__device__ __forceinline__ Pack16<float> load16(const float* p) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    Pack16<float> r;
    r.v[0] = q.x;
    r.v[1] = q.y;
    r.v[2] = q.z;
    r.v[3] = q.w;
    return r;
}

__device__ __forceinline__ Pack16<double> load16(const double* p) {
    const double2 q = __ldg(reinterpret_cast<const double2*>(p));
    Pack16<double> r;
    r.v[0] = q.x;
    r.v[1] = q.y;
    return r;
}

__device__ __forceinline__ void store16(float* p, const Pack16<float>& r) {
    *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
}

__device__ __forceinline__ void store16(double* p, const Pack16<double>& r) {
    *reinterpret_cast<double2*>(p) = make_double2(r.v[0], r.v[1]);
}

// An operand of a vectorised elementwise kernel, by its `period` (engine::cuda::vector::Flat): element i of the
// output reads p[i] (period 0: contiguous), p[0] (period 1: one value broadcast) or p[i % period] (a contiguous
// block of `period` elements repeated, e.g. a bias broadcast over rows; the host guarantees that period is a
// multiple of the pack width, so a pack never straddles two repeats).
template <typename T> __device__ __forceinline__ Pack16<T> operand16(const T* p, long long period, long long i) {
    if (period == 0) return load16(p + i);
    if (period == 1) {
        Pack16<T> r;
        const T v = p[0];
#pragma unroll
        for (int e = 0; e < PACK16(T); ++e) r.v[e] = v;
        return r;
    }
    return load16(p + i % period);
}

template <typename T> __device__ __forceinline__ T operand1(const T* p, long long period, long long i) {
    return p[period == 0 ? i : i % period];
}

// out_m[i] = f(in_0[i], ..., in_{K-1}[i]) for i < n, outputs contiguous and 16-byte aligned. `f(x, y)` maps
// `const T (&x)[K]` to `T (&y)[M]`. Grid-stride over packs at one-pack granularity (threads differ by at most
// one pack of work, whatever the grid): each turn a thread loads VEC_UNROLL packs of every input, packs
// `stride` apart so that a warp's loads stay 512 contiguous bytes, then computes and stores them. The
// n % PACK16 leftover elements go one to a thread.
template <int K, int M, typename T, typename F>
__device__ __forceinline__ void map16(const T* const (&in)[K], const long long (&period)[K], T* const (&out)[M],
                                      long long n, F f) {
    constexpr int W = PACK16(T);
    const long long packs = n / W;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long base = t; base < packs; base += stride * VEC_UNROLL) {
        Pack16<T> x[VEC_UNROLL][K];
#pragma unroll
        for (int u = 0; u < VEC_UNROLL; ++u) {
            const long long j = base + u * stride;
            if (j < packs) {
#pragma unroll
                for (int k = 0; k < K; ++k) x[u][k] = operand16(in[k], period[k], j * W);
            }
        }
#pragma unroll
        for (int u = 0; u < VEC_UNROLL; ++u) {
            const long long j = base + u * stride;
            if (j < packs) {
                Pack16<T> y[M];
#pragma unroll
                for (int e = 0; e < W; ++e) {
                    T xs[K], ys[M];
#pragma unroll
                    for (int k = 0; k < K; ++k) xs[k] = x[u][k].v[e];
                    f(xs, ys);
#pragma unroll
                    for (int m = 0; m < M; ++m) y[m].v[e] = ys[m];
                }
#pragma unroll
                for (int m = 0; m < M; ++m) store16(out[m] + j * W, y[m]);
            }
        }
    }
    const long long i = packs * W + t;
    if (i < n) {
        T xs[K], ys[M];
#pragma unroll
        for (int k = 0; k < K; ++k) xs[k] = operand1(in[k], period[k], i);
        f(xs, ys);
#pragma unroll
        for (int m = 0; m < M; ++m) out[m][i] = ys[m];
    }
}
