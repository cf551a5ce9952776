// Elementwise kernels: unary forward/backward, broadcast binary forward/backward, comparisons, where.
// The formulas are those of elementwise/cpu.rs (see the table in mod.rs); keep the two in step.
// Kernel names: <family>_<op>_<dtype>, e.g. unary_fwd_exp_f32, binary_bwd_div_f64.
//
// Every kernel comes in two forms with the same formula (elementwise/cuda.rs picks one per launch through
// engine::cuda::vector::plan):
// - the Strided form, `<family>_<op>_<dtype>`: inputs as `Strided` views, element i found with `offset_of`;
//   any layout, one element per thread per turn.
// - the vectorised form, `<family>_<op>_vec_<dtype>`: inputs as a pointer to their first element and a period
//   (contiguous, one broadcast value, or a repeated row such as a bias), 16-byte loads and stores (`map16` in
//   the engine's prelude), 4 packs per input in flight per thread, a scalar tail; for flat, 16-byte aligned
//   operands only.
//
// Bytes moved, with n output elements of s bytes (s = 4 for f32), broadcast inputs counted once (they stay
// in cache): unary forward 2ns, unary backward 4ns, binary forward 3ns, binary backward 5ns, comparison 3ns,
// where 4ns. All are memory-bound (a few flops per element against 3 TB/s), so the target of the vectorised
// form is the bandwidth of a device-to-device copy (which moves 2ns): expected at about 0.9 of it on the H100
// (a copy is half reads, these are mostly reads, which the memory serves at least as fast). The Strided form
// of add measured 0.735 of the copy (2191 vs 2982 GB/s, 64M floats).

// ---- unary: y = f(x), dx = g * f'(x, y); a, b are the op's scalar parameters -------------------------

#define UNARY_OPS(X)                                                                                  \
    X(neg, -x, T(-1))                                                                                  \
    X(exp, m_exp(x), y)                                                                                \
    X(log, m_log(x), T(1) / x)                                                                         \
    X(sqrt, m_sqrt(x), T(0.5) / y)                                                                     \
    X(rsqrt, m_rsqrt(x), T(-0.5) * y * y * y)                                                          \
    X(abs, m_abs(x), (x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0))))                                    \
    X(relu, (x > T(0) ? x : T(0)), (x > T(0) ? T(1) : T(0)))                                           \
    X(gelu, T(0.5) * x * (T(1) + m_erf(x * T(0.70710678118654752440))),                                \
      T(0.5) * (T(1) + m_erf(x * T(0.70710678118654752440))) +                                         \
          x * T(0.39894228040143267794) * m_exp(T(-0.5) * x * x))                                      \
    X(silu, x * m_sigmoid(x), m_sigmoid(x) * (T(1) + x * (T(1) - m_sigmoid(x))))                        \
    X(elu, (x > T(0) ? x : a * m_expm1(x)), (x > T(0) ? T(1) : y + a))                                  \
    X(softplus, (a * x > b ? x : m_log1p(m_exp(a * x)) / a), (a * x > b ? T(1) : m_sigmoid(a * x)))     \
    X(sigmoid, m_sigmoid(x), y * (T(1) - y))                                                           \
    X(tanh, m_tanh(x), T(1) - y * y)                                                                   \
    X(powf, m_pow(x, a), (a == T(0) ? T(0) : a * m_pow(x, a - T(1))))                                  \
    X(add_scalar, x + a, T(1))                                                                         \
    X(mul_scalar, x * a, a)                                                                            \
    X(div_scalar, x / a, T(1) / a)                                                                     \
    X(clamp_min, (x < a ? a : x), (x >= a ? T(1) : T(0)))                                              \
    X(clamp_max, (x > a ? a : x), (x <= a ? T(1) : T(0)))

#define UNARY_VEC_EXTERN(NAME, T, SUFFIX)                                                             \
    extern "C" __global__ void unary_fwd_##NAME##_vec_##SUFFIX(const T* x, long long px, T* y, long long n, \
                                                               double a, double b) {                   \
        unary_fwd_vec_##NAME<T>(x, px, y, n, (T)a, (T)b);                                              \
    }                                                                                                  \
    extern "C" __global__ void unary_bwd_##NAME##_vec_##SUFFIX(const T* x, long long px, const T* y,  \
                                                               long long py, const T* g, long long pg, \
                                                               T* dx, long long n, double a, double b) { \
        unary_bwd_vec_##NAME<T>(x, px, y, py, g, pg, dx, n, (T)a, (T)b);                               \
    }

#define UNARY_KERNELS(NAME, FWD, BWD)                                                                 \
    template <typename T>                                                                              \
    __device__ void unary_fwd_##NAME(const T* xs, Strided lx, T* ys, long long n, T a, T b) {          \
        GRID_STRIDE(i, n) {                                                                            \
            T x = xs[offset_of(lx, i)];                                                                \
            ys[i] = FWD;                                                                               \
        }                                                                                              \
    }                                                                                                  \
    template <typename T>                                                                              \
    __device__ void unary_bwd_##NAME(const T* xs, Strided lx, const T* ysv, Strided ly, const T* gs,   \
                                     Strided lg, T* dx, long long n, T a, T b) {                       \
        GRID_STRIDE(i, n) {                                                                            \
            T x = xs[offset_of(lx, i)];                                                                \
            T y = ysv[offset_of(ly, i)];                                                               \
            dx[i] = gs[offset_of(lg, i)] * (BWD);                                                      \
        }                                                                                              \
    }                                                                                                  \
    template <typename T>                                                                              \
    __device__ void unary_fwd_vec_##NAME(const T* xs, long long px, T* ys, long long n, T a, T b) {    \
        const T* in[1] = {xs};                                                                         \
        const long long period[1] = {px};                                                              \
        T* const out[1] = {ys};                                                                        \
        map16<1, 1>(in, period, out, n, [=](const T(&v)[1], T(&r)[1]) {                                \
            const T x = v[0];                                                                          \
            r[0] = FWD;                                                                                \
        });                                                                                            \
    }                                                                                                  \
    template <typename T>                                                                              \
    __device__ void unary_bwd_vec_##NAME(const T* xs, long long px, const T* ysv, long long py,        \
                                         const T* gs, long long pg, T* dx, long long n, T a, T b) {    \
        const T* in[3] = {xs, ysv, gs};                                                                \
        const long long period[3] = {px, py, pg};                                                      \
        T* const out[1] = {dx};                                                                        \
        map16<3, 1>(in, period, out, n, [=](const T(&v)[3], T(&r)[1]) {                                \
            const T x = v[0], y = v[1], g = v[2];                                                      \
            r[0] = g * (BWD);                                                                          \
        });                                                                                            \
    }                                                                                                  \
    UNARY_VEC_EXTERN(NAME, float, f32)                                                                 \
    UNARY_VEC_EXTERN(NAME, double, f64)                                                                \
    extern "C" __global__ void unary_fwd_##NAME##_f32(const float* x, Strided lx, float* y,            \
                                                      long long n, double a, double b) {               \
        unary_fwd_##NAME<float>(x, lx, y, n, (float)a, (float)b);                                      \
    }                                                                                                  \
    extern "C" __global__ void unary_fwd_##NAME##_f64(const double* x, Strided lx, double* y,          \
                                                      long long n, double a, double b) {               \
        unary_fwd_##NAME<double>(x, lx, y, n, a, b);                                                   \
    }                                                                                                  \
    extern "C" __global__ void unary_bwd_##NAME##_f32(const float* x, Strided lx, const float* y,      \
                                                      Strided ly, const float* g, Strided lg,          \
                                                      float* dx, long long n, double a, double b) {    \
        unary_bwd_##NAME<float>(x, lx, y, ly, g, lg, dx, n, (float)a, (float)b);                       \
    }                                                                                                  \
    extern "C" __global__ void unary_bwd_##NAME##_f64(const double* x, Strided lx, const double* y,    \
                                                      Strided ly, const double* g, Strided lg,         \
                                                      double* dx, long long n, double a, double b) {   \
        unary_bwd_##NAME<double>(x, lx, y, ly, g, lg, dx, n, a, b);                                    \
    }

UNARY_OPS(UNARY_KERNELS)

// ---- binary: y = f(a, b) over the broadcast shape; backward writes (g df/da, g df/db) ---------------

template <typename T> __device__ __forceinline__ T pick_max(T a, T b) { return (m_isnan(a) || a > b) ? a : b; }
template <typename T> __device__ __forceinline__ T pick_min(T a, T b) { return (m_isnan(a) || a < b) ? a : b; }

#define BINARY_OPS(X)                                                                                 \
    X(add, a + b, g, g)                                                                                \
    X(sub, a - b, g, -g)                                                                               \
    X(mul, a * b, g * b, g * a)                                                                        \
    X(div, a / b, g / b, -g * a / (b * b))                                                             \
    X(maximum, pick_max(a, b), (a > b ? g : (b > a ? T(0) : g * T(0.5))),                              \
      (b > a ? g : (a > b ? T(0) : g * T(0.5))))                                                       \
    X(minimum, pick_min(a, b), (a < b ? g : (b < a ? T(0) : g * T(0.5))),                              \
      (b < a ? g : (a < b ? T(0) : g * T(0.5))))

#define BINARY_VEC_EXTERN(NAME, T, SUFFIX)                                                            \
    extern "C" __global__ void binary_fwd_##NAME##_vec_##SUFFIX(const T* a, long long pa, const T* b,  \
                                                                long long pb, T* y, long long n) {     \
        binary_fwd_vec_##NAME<T>(a, pa, b, pb, y, n);                                                  \
    }                                                                                                  \
    extern "C" __global__ void binary_bwd_##NAME##_vec_##SUFFIX(const T* a, long long pa, const T* b,  \
                                                                long long pb, const T* g, long long pg, \
                                                                T* da, T* db, long long n) {           \
        binary_bwd_vec_##NAME<T>(a, pa, b, pb, g, pg, da, db, n);                                      \
    }

#define BINARY_KERNELS(NAME, FWD, DA, DB)                                                             \
    template <typename T>                                                                              \
    __device__ void binary_fwd_##NAME(const T* as, Strided la, const T* bs, Strided lb, T* ys,         \
                                      long long n) {                                                   \
        GRID_STRIDE(i, n) {                                                                            \
            T a = as[offset_of(la, i)];                                                                \
            T b = bs[offset_of(lb, i)];                                                                \
            ys[i] = FWD;                                                                               \
        }                                                                                              \
    }                                                                                                  \
    template <typename T>                                                                              \
    __device__ void binary_bwd_##NAME(const T* as, Strided la, const T* bs, Strided lb, const T* gs,   \
                                      Strided lg, T* da, T* db, long long n) {                         \
        GRID_STRIDE(i, n) {                                                                            \
            T a = as[offset_of(la, i)];                                                                \
            T b = bs[offset_of(lb, i)];                                                                \
            T g = gs[offset_of(lg, i)];                                                                \
            da[i] = DA;                                                                                \
            db[i] = DB;                                                                                \
        }                                                                                              \
    }                                                                                                  \
    template <typename T>                                                                              \
    __device__ void binary_fwd_vec_##NAME(const T* as, long long pa, const T* bs, long long pb, T* ys, \
                                          long long n) {                                               \
        const T* in[2] = {as, bs};                                                                     \
        const long long period[2] = {pa, pb};                                                          \
        T* const out[1] = {ys};                                                                        \
        map16<2, 1>(in, period, out, n, [](const T(&v)[2], T(&r)[1]) {                                \
            const T a = v[0], b = v[1];                                                                \
            r[0] = FWD;                                                                                \
        });                                                                                            \
    }                                                                                                  \
    template <typename T>                                                                              \
    __device__ void binary_bwd_vec_##NAME(const T* as, long long pa, const T* bs, long long pb,        \
                                          const T* gs, long long pg, T* da, T* db, long long n) {      \
        const T* in[3] = {as, bs, gs};                                                                 \
        const long long period[3] = {pa, pb, pg};                                                      \
        T* const out[2] = {da, db};                                                                    \
        map16<3, 2>(in, period, out, n, [](const T(&v)[3], T(&r)[2]) {                                 \
            const T a = v[0], b = v[1], g = v[2];                                                      \
            r[0] = DA;                                                                                 \
            r[1] = DB;                                                                                 \
        });                                                                                            \
    }                                                                                                  \
    BINARY_VEC_EXTERN(NAME, float, f32)                                                                \
    BINARY_VEC_EXTERN(NAME, double, f64)                                                               \
    extern "C" __global__ void binary_fwd_##NAME##_f32(const float* a, Strided la, const float* b,     \
                                                       Strided lb, float* y, long long n) {            \
        binary_fwd_##NAME<float>(a, la, b, lb, y, n);                                                  \
    }                                                                                                  \
    extern "C" __global__ void binary_fwd_##NAME##_f64(const double* a, Strided la, const double* b,   \
                                                       Strided lb, double* y, long long n) {           \
        binary_fwd_##NAME<double>(a, la, b, lb, y, n);                                                 \
    }                                                                                                  \
    extern "C" __global__ void binary_bwd_##NAME##_f32(const float* a, Strided la, const float* b,     \
                                                       Strided lb, const float* g, Strided lg,         \
                                                       float* da, float* db, long long n) {            \
        binary_bwd_##NAME<float>(a, la, b, lb, g, lg, da, db, n);                                      \
    }                                                                                                  \
    extern "C" __global__ void binary_bwd_##NAME##_f64(const double* a, Strided la, const double* b,   \
                                                       Strided lb, const double* g, Strided lg,        \
                                                       double* da, double* db, long long n) {          \
        binary_bwd_##NAME<double>(a, la, b, lb, g, lg, da, db, n);                                     \
    }

BINARY_OPS(BINARY_KERNELS)

// ---- comparisons (1 / 0 in the inputs' dtype) and where ------------------------------------------------

#define CMP_OPS(X) X(eq, ==) X(ne, !=) X(lt, <) X(le, <=) X(gt, >) X(ge, >=)

#define CMP_KERNELS(NAME, OP)                                                                         \
    template <typename T>                                                                              \
    __device__ void cmp_##NAME(const T* as, Strided la, const T* bs, Strided lb, T* ys, long long n) { \
        GRID_STRIDE(i, n) { ys[i] = (as[offset_of(la, i)] OP bs[offset_of(lb, i)]) ? T(1) : T(0); }    \
    }                                                                                                  \
    template <typename T>                                                                              \
    __device__ void cmp_vec_##NAME(const T* as, long long pa, const T* bs, long long pb, T* ys,         \
                                   long long n) {                                                      \
        const T* in[2] = {as, bs};                                                                     \
        const long long period[2] = {pa, pb};                                                          \
        T* const out[1] = {ys};                                                                        \
        map16<2, 1>(in, period, out, n,                                                                \
                    [](const T(&v)[2], T(&r)[1]) { r[0] = (v[0] OP v[1]) ? T(1) : T(0); });            \
    }                                                                                                  \
    extern "C" __global__ void cmp_##NAME##_vec_f32(const float* a, long long pa, const float* b,      \
                                                    long long pb, float* y, long long n) {             \
        cmp_vec_##NAME<float>(a, pa, b, pb, y, n);                                                     \
    }                                                                                                  \
    extern "C" __global__ void cmp_##NAME##_vec_f64(const double* a, long long pa, const double* b,    \
                                                    long long pb, double* y, long long n) {            \
        cmp_vec_##NAME<double>(a, pa, b, pb, y, n);                                                    \
    }                                                                                                  \
    extern "C" __global__ void cmp_##NAME##_f32(const float* a, Strided la, const float* b,            \
                                                Strided lb, float* y, long long n) {                   \
        cmp_##NAME<float>(a, la, b, lb, y, n);                                                         \
    }                                                                                                  \
    extern "C" __global__ void cmp_##NAME##_f64(const double* a, Strided la, const double* b,          \
                                                Strided lb, double* y, long long n) {                  \
        cmp_##NAME<double>(a, la, b, lb, y, n);                                                        \
    }

CMP_OPS(CMP_KERNELS)

template <typename T>
__device__ void where_impl(const T* c, Strided lc, const T* a, Strided la, const T* b, Strided lb, T* y,
                           long long n) {
    GRID_STRIDE(i, n) { y[i] = c[offset_of(lc, i)] != T(0) ? a[offset_of(la, i)] : b[offset_of(lb, i)]; }
}

extern "C" __global__ void where_f32(const float* c, Strided lc, const float* a, Strided la, const float* b,
                                     Strided lb, float* y, long long n) {
    where_impl<float>(c, lc, a, la, b, lb, y, n);
}

extern "C" __global__ void where_f64(const double* c, Strided lc, const double* a, Strided la,
                                     const double* b, Strided lb, double* y, long long n) {
    where_impl<double>(c, lc, a, la, b, lb, y, n);
}

template <typename T>
__device__ void where_vec_impl(const T* c, long long pc, const T* a, long long pa, const T* b, long long pb, T* y,
                               long long n) {
    const T* in[3] = {c, a, b};
    const long long period[3] = {pc, pa, pb};
    T* const out[1] = {y};
    map16<3, 1>(in, period, out, n, [](const T(&v)[3], T(&r)[1]) { r[0] = v[0] != T(0) ? v[1] : v[2]; });
}

extern "C" __global__ void where_vec_f32(const float* c, long long pc, const float* a, long long pa, const float* b,
                                         long long pb, float* y, long long n) {
    where_vec_impl<float>(c, pc, a, pa, b, pb, y, n);
}

extern "C" __global__ void where_vec_f64(const double* c, long long pc, const double* a, long long pa,
                                         const double* b, long long pb, double* y, long long n) {
    where_vec_impl<double>(c, pc, a, pa, b, pb, y, n);
}
