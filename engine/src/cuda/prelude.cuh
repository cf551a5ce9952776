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
