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

template <typename T>
__device__ void sgd_impl(T* p, const T* g, T* buf, long long n, SgdParams h) {
    const T lr = (T)h.lr, momentum = (T)h.momentum, one_minus_dampening = (T)h.one_minus_dampening;
    const T weight_decay = (T)h.weight_decay;
    GRID_STRIDE(i, n) {
        T d = g[i] + weight_decay * p[i];
        if (h.use_momentum) {
            const T b = h.first ? d : momentum * buf[i] + one_minus_dampening * d;
            buf[i] = b;
            d = h.nesterov ? d + momentum * b : b;
        }
        p[i] -= lr * d;
    }
}

// `vmax` is only touched with amsgrad (the host passes v in its place otherwise).
template <typename T>
__device__ void adamw_impl(T* p, const T* g, T* m, T* v, T* vmax, long long n, AdamWParams h) {
    const T step_size = (T)h.step_size, decay = (T)h.decay, beta1 = (T)h.beta1;
    const T one_minus_beta1 = (T)h.one_minus_beta1, beta2 = (T)h.beta2, one_minus_beta2 = (T)h.one_minus_beta2;
    const T bc2_sqrt = (T)h.bc2_sqrt, eps = (T)h.eps;
    GRID_STRIDE(i, n) {
        const T gi = g[i];
        const T pi = p[i] * decay;
        const T mi = beta1 * m[i] + one_minus_beta1 * gi;
        const T vi = beta2 * v[i] + one_minus_beta2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        T vhat = vi;
        if (h.amsgrad) {
            vhat = opt_max(vmax[i], vi);
            vmax[i] = vhat;
        }
        p[i] = pi - step_size * mi / (m_sqrt(vhat) / bc2_sqrt + eps);
    }
}

template <typename T>
__device__ void scale_impl(T* x, long long n, double factor) {
    const T f = (T)factor;
    GRID_STRIDE(i, n) { x[i] *= f; }
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
    }

OPTIM_KERNELS(float, f32)
OPTIM_KERNELS(double, f64)
