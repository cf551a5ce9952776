// In-place optimizer updates, formula for formula those of optim/cpu.rs (the table in mod.rs). The
// hyperparameters come as doubles in one params struct per rule, derived on the host in f64 exactly as the
// CPU does (1 - dampening, lr / (1 - beta1^t), ...), and are rounded to T once here, as the CPU's
// `T::from_f64` does, so both devices apply the same constants.

struct SgdParams {
    double lr;
    double momentum;
    double one_minus_dampening;
    double weight_decay;
    int use_momentum;
    int nesterov;
    int first;
    int pad;
};

static_assert(sizeof(SgdParams) == 48, "SgdParams must match optim/cuda.rs");

struct AdamWParams {
    double step_size;  // lr / (1 - beta1^t)
    double decay;      // 1 - lr * weight_decay
    double beta1;
    double one_minus_beta1;
    double beta2;
    double one_minus_beta2;
    double bc2_sqrt;  // sqrt(1 - beta2^t)
    double eps;
    int amsgrad;
    int pad;
};

static_assert(sizeof(AdamWParams) == 72, "AdamWParams must match optim/cuda.rs");

// max that ignores a NaN operand, as Rust's f32::max / f64::max on the CPU.
__device__ __forceinline__ float opt_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double opt_max(double a, double b) { return fmax(a, b); }

// The hyperparameters rounded to T once, shared by the one-tensor and the multi-tensor kernels.
template <typename T>
struct SgdConsts {
    T lr, momentum, one_minus_dampening, weight_decay;
    __device__ explicit SgdConsts(const SgdParams& h)
        : lr((T)h.lr), momentum((T)h.momentum), one_minus_dampening((T)h.one_minus_dampening),
          weight_decay((T)h.weight_decay) {}
};

// Products and sums rounded one by one (no FMA contraction): the compiler contracts a * b + c differently
// in different kernels, so without these the one-tensor and multi-tensor kernels could differ in the last bit
// (seen on the H200 in f64); rounded separately they also follow the CPU's operation order exactly.
__device__ __forceinline__ float opt_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double opt_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float opt_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double opt_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float opt_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double opt_sub(double a, double b) { return __dsub_rn(a, b); }

// Element i of one SGD update. Both kernel families call this very function, so that a multi-tensor launch
// writes the same bits as one launch per tensor.
template <typename T>
__device__ __forceinline__ void sgd_elem(T* p, const T* g, T* buf, long long i, const SgdConsts<T>& c,
                                         const SgdParams& h) {
    T d = opt_add(g[i], opt_mul(c.weight_decay, p[i]));
    if (h.use_momentum) {
        const T b = h.first ? d : opt_add(opt_mul(c.momentum, buf[i]), opt_mul(c.one_minus_dampening, d));
        buf[i] = b;
        d = h.nesterov ? opt_add(d, opt_mul(c.momentum, b)) : b;
    }
    p[i] = opt_sub(p[i], opt_mul(c.lr, d));
}

template <typename T>
__device__ void sgd_impl(T* p, const T* g, T* buf, long long n, SgdParams h) {
    const SgdConsts<T> c(h);
    GRID_STRIDE(i, n) { sgd_elem<T>(p, g, buf, i, c, h); }
}

template <typename T>
struct AdamWConsts {
    T step_size, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps;
    __device__ explicit AdamWConsts(const AdamWParams& h)
        : step_size((T)h.step_size), decay((T)h.decay), beta1((T)h.beta1), one_minus_beta1((T)h.one_minus_beta1),
          beta2((T)h.beta2), one_minus_beta2((T)h.one_minus_beta2), bc2_sqrt((T)h.bc2_sqrt), eps((T)h.eps) {}
};

// Element i of one AdamW update (see sgd_elem). `vmax` is only touched with amsgrad (the host passes v in its
// place otherwise).
template <typename T>
__device__ __forceinline__ void adamw_elem(T* p, const T* g, T* m, T* v, T* vmax, long long i,
                                           const AdamWConsts<T>& c, int amsgrad) {
    const T gi = g[i];
    const T pi = opt_mul(p[i], c.decay);
    const T mi = opt_add(opt_mul(c.beta1, m[i]), opt_mul(c.one_minus_beta1, gi));
    const T vi = opt_add(opt_mul(c.beta2, v[i]), opt_mul(opt_mul(c.one_minus_beta2, gi), gi));
    m[i] = mi;
    v[i] = vi;
    T vhat = vi;
    if (amsgrad) {
        vhat = opt_max(vmax[i], vi);
        vmax[i] = vhat;
    }
    p[i] = opt_sub(pi, opt_mul(c.step_size, mi) / opt_add(m_sqrt(vhat) / c.bc2_sqrt, c.eps));
}

template <typename T>
__device__ void adamw_impl(T* p, const T* g, T* m, T* v, T* vmax, long long n, AdamWParams h) {
    const AdamWConsts<T> c(h);
    GRID_STRIDE(i, n) { adamw_elem<T>(p, g, m, v, vmax, i, c, h.amsgrad); }
}

// ---- Multi-tensor updates ------------------------------------------------------------------------------
//
// One launch updates up to N tensors (PyTorch's multi_tensor_apply idea): the host fills a table, passed by
// value as the kernel's only parameter (at most 4 KiB, the classic kernel-parameter limit), with each
// tensor's addresses (ptr[k][i]: operand k of tensor i, at its first element), its length, the running count
// of MT_CHUNK-element chunks up to and including it, and which of the MT_SETS hyperparameter sets it takes
// (param groups differ in lr and weight decay). Blocks stride over the chunks of all tensors; a block finds
// its chunk's tensor by a binary search of the running counts and its threads stride over the chunk. The
// host splits a tensor longer than a u32 can count into several entries.

#define MT_SETS 4
#define MT_CHUNK 4096

template <typename P, int DEPTH, int N>
struct MultiTable {
    P sets[MT_SETS];
    unsigned long long ptr[DEPTH][N];
    unsigned int len[N];
    unsigned int chunk_end[N];
    int count;
    unsigned char set[N];  // N % 8 == 4: with `count`, the struct ends on an 8-byte boundary with no padding
};

// SGD (p, g, buf); AdamW (p, g, m, v); AdamW with amsgrad (p, g, m, v, vmax); one tensor x with a double per
// set (the factor of scale_multi; unused by sum_squares_multi). Sizes as in optim/cuda.rs.
typedef MultiTable<SgdParams, 3, 116> SgdTable;
typedef MultiTable<AdamWParams, 4, 92> AdamWTable;
typedef MultiTable<AdamWParams, 5, 76> AdamWMaxTable;
typedef MultiTable<double, 1, 236> ScalarTable;
static_assert(sizeof(SgdTable) == 4024, "SgdTable must match optim/cuda.rs");
static_assert(sizeof(AdamWTable) == 4064, "AdamWTable must match optim/cuda.rs");
static_assert(sizeof(AdamWMaxTable) == 4016, "AdamWMaxTable must match optim/cuda.rs");
static_assert(sizeof(ScalarTable) == 4048, "ScalarTable must match optim/cuda.rs");

// Threads per block of the multi-tensor kernels (MT_THREADS in optim/cuda.rs), a power of two.
#define MT_THREADS 256

// The tensor of chunk c (the first whose running count exceeds c), and the chunk's element range in it.
template <typename Table>
__device__ __forceinline__ int mt_locate(const Table& t, unsigned int c, long long* start, long long* end) {
    int lo = 0, hi = t.count - 1;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (t.chunk_end[mid] > c) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    const unsigned int first = lo == 0 ? 0u : t.chunk_end[lo - 1];
    *start = (long long)(c - first) * MT_CHUNK;
    *end = min(*start + MT_CHUNK, (long long)t.len[lo]);
    return lo;
}

template <typename T>
__device__ void sgd_multi_impl(const SgdTable& t) {
    const unsigned int chunks = t.chunk_end[t.count - 1];
    for (unsigned int c = blockIdx.x; c < chunks; c += gridDim.x) {
        long long start, end;
        const int k = mt_locate(t, c, &start, &end);
        const SgdParams& h = t.sets[t.set[k]];
        const SgdConsts<T> consts(h);
        T* p = (T*)t.ptr[0][k];
        const T* g = (const T*)t.ptr[1][k];
        T* buf = (T*)t.ptr[2][k];
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) sgd_elem<T>(p, g, buf, i, consts, h);
    }
}

// The chunk loop of the multi-tensor AdamW kernels: `params_of(k)` gives tensor k's AdamWParams. Table is
// AdamWTable (vmax untouched: v stands in for it) or AdamWMaxTable.
template <typename T, typename Table, int AMSGRAD, typename ParamsOf>
__device__ __forceinline__ void adamw_chunks(const Table& t, ParamsOf params_of) {
    const unsigned int chunks = t.chunk_end[t.count - 1];
    for (unsigned int c = blockIdx.x; c < chunks; c += gridDim.x) {
        long long start, end;
        const int k = mt_locate(t, c, &start, &end);
        const AdamWConsts<T> consts(params_of(k));
        T* p = (T*)t.ptr[0][k];
        const T* g = (const T*)t.ptr[1][k];
        T* m = (T*)t.ptr[2][k];
        T* v = (T*)t.ptr[3][k];
        // The last operand: vmax in an AdamWMaxTable, v again in an AdamWTable (never touched there).
        T* vmax = (T*)t.ptr[sizeof(t.ptr) / sizeof(t.ptr[0]) - 1][k];
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            adamw_elem<T>(p, g, m, v, vmax, i, consts, AMSGRAD);
        }
    }
}

// Hyperparameters from the table: the set of each tensor's param group.
template <typename T, typename Table, int AMSGRAD>
__device__ void adamw_multi_impl(const Table& t) {
    adamw_chunks<T, Table, AMSGRAD>(t, [&](int k) -> const AdamWParams& { return t.sets[t.set[k]]; });
}

// AdamWParams from 8 doubles in its field order (the amsgrad flag being the kernel's).
__device__ __forceinline__ AdamWParams adamw_params_from(const double* hk, int amsgrad) {
    AdamWParams h;
    h.step_size = hk[0];
    h.decay = hk[1];
    h.beta1 = hk[2];
    h.one_minus_beta1 = hk[3];
    h.beta2 = hk[4];
    h.one_minus_beta2 = hk[5];
    h.bc2_sqrt = hk[6];
    h.eps = hk[7];
    h.amsgrad = amsgrad;
    h.pad = 0;
    return h;
}

// The same update with each tensor's hyperparameters read from device memory when the kernel runs, not from
// the table: `hyper` holds 8 doubles per tensor (adamw_params_from), and t.set[k] is tensor k's index into it
// (the host passes `hyper` advanced to the table's first tensor). A launch captured into a CUDA graph thus
// applies the values written there before each replay (the learning rate of the schedule, the bias
// corrections of the step count). Per element the same code as adamw_multi_impl, so the same values give the
// same bits.
template <typename T, typename Table, int AMSGRAD>
__device__ void adamw_multi_hyper_impl(const Table& t, const double* hyper) {
    adamw_chunks<T, Table, AMSGRAD>(t, [&](int k) { return adamw_params_from(hyper + 8 * (int)t.set[k], AMSGRAD); });
}

template <typename T>
__device__ void scale_impl(T* x, long long n, double factor) {
    const T f = (T)factor;
    GRID_STRIDE(i, n) { x[i] *= f; }
}

// x *= factor of its set, element for element as scale_impl.
template <typename T>
__device__ void scale_multi_impl(const ScalarTable& t) {
    const unsigned int chunks = t.chunk_end[t.count - 1];
    for (unsigned int c = blockIdx.x; c < chunks; c += gridDim.x) {
        long long start, end;
        const int k = mt_locate(t, c, &start, &end);
        const T f = (T)t.sets[t.set[k]];
        T* x = (T*)t.ptr[0][k];
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) x[i] *= f;
    }
}

// The sum of squares of every element of the table's tensors (the global gradient norm): each block adds
// the squares of its chunks in double, its threads' sums are added in a fixed tree, and thread 0 writes the
// block's partial to partials[blockIdx.x]; the host sums the partials, so the result is the same run to run
// (on one device: the grid follows its multiprocessor count).
template <typename T>
__device__ void sum_squares_multi_impl(const ScalarTable& t, double* partials) {
    __shared__ double sums[MT_THREADS];
    double acc = 0.0;
    const unsigned int chunks = t.chunk_end[t.count - 1];
    for (unsigned int c = blockIdx.x; c < chunks; c += gridDim.x) {
        long long start, end;
        const int k = mt_locate(t, c, &start, &end);
        const T* x = (const T*)t.ptr[0][k];
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            const double xi = (double)x[i];
            acc += xi * xi;
        }
    }
    sums[threadIdx.x] = acc;
    __syncthreads();
    for (int s = MT_THREADS / 2; s > 0; s /= 2) {
        if (threadIdx.x < s) sums[threadIdx.x] += sums[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = sums[0];
}

#define OPTIM_KERNELS(T, SUFFIX)                                                                          \
    extern "C" __global__ void sgd_step_##SUFFIX(T* p, const T* g, T* buf, long long n, SgdParams h) {     \
        sgd_impl<T>(p, g, buf, n, h);                                                                      \
    }                                                                                                      \
    extern "C" __global__ void adamw_step_##SUFFIX(T* p, const T* g, T* m, T* v, T* vmax, long long n,     \
                                                   AdamWParams h) {                                        \
        adamw_impl<T>(p, g, m, v, vmax, n, h);                                                             \
    }                                                                                                      \
    extern "C" __global__ void scale_##SUFFIX(T* x, long long n, double factor) {                          \
        scale_impl<T>(x, n, factor);                                                                       \
    }                                                                                                      \
    extern "C" __global__ void sgd_multi_##SUFFIX(SgdTable t) { sgd_multi_impl<T>(t); }                    \
    extern "C" __global__ void adamw_multi_##SUFFIX(AdamWTable t) { adamw_multi_impl<T, AdamWTable, 0>(t); } \
    extern "C" __global__ void adamw_multi_max_##SUFFIX(AdamWMaxTable t) {                                 \
        adamw_multi_impl<T, AdamWMaxTable, 1>(t);                                                          \
    }                                                                                                      \
    extern "C" __global__ void adamw_multi_hyper_##SUFFIX(AdamWTable t, const double* hyper) {             \
        adamw_multi_hyper_impl<T, AdamWTable, 0>(t, hyper);                                                \
    }                                                                                                      \
    extern "C" __global__ void adamw_multi_max_hyper_##SUFFIX(AdamWMaxTable t, const double* hyper) {      \
        adamw_multi_hyper_impl<T, AdamWMaxTable, 1>(t, hyper);                                             \
    }                                                                                                      \
    extern "C" __global__ void scale_multi_##SUFFIX(ScalarTable t) { scale_multi_impl<T>(t); }             \
    extern "C" __global__ void sum_squares_multi_##SUFFIX(ScalarTable t, double* partials) {               \
        sum_squares_multi_impl<T>(t, partials);                                                            \
    }

OPTIM_KERNELS(float, f32)
OPTIM_KERNELS(double, f64)
