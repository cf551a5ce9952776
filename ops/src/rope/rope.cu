// RoPE-2D rotation (see rope/mod.rs for the math, rope/cpu.rs for the table). One thread per channel pair of
// x (B, N, C), read through its view; y contiguous. The table (H + W, C/4, 2) of (cos, sin) is built on the
// host exactly as the CPU builds it and uploaded, so both devices rotate by the same rounded angles. `sign` is
// +1 for the forward rotation, -1 for its transpose (the backward).

struct RopeParams {
    long long h, w, c;
    long long pairs;  // B N C / 2
    int sign;
    int pad;
};

static_assert(sizeof(RopeParams) == 40, "RopeParams must match rope/cuda.rs");

template <typename T>
__device__ void rope_impl(const T* x, Strided lx, const T* table, T* y, RopeParams p) {
    const long long half = p.c / 2, quarter = p.c / 4;
    GRID_STRIDE(i, p.pairs) {
        const long long pair = i % half, tok = (i / half) % (p.h * p.w);
        // Pairs 0..C/4 turn by the token row's angle (table row r), the others by its column's (row H + c).
        const long long row = pair < quarter ? tok / p.w : p.h + tok % p.w;
        const T* cs = table + (row * quarter + pair % quarter) * 2;
        const T cos_a = cs[0], sin_a = p.sign > 0 ? cs[1] : -cs[1];
        const T re = x[offset_of(lx, 2 * i)], im = x[offset_of(lx, 2 * i + 1)];
        y[2 * i] = re * cos_a - im * sin_a;
        y[2 * i + 1] = re * sin_a + im * cos_a;
    }
}

extern "C" __global__ void rope_f32(const float* x, Strided lx, const float* table, float* y, RopeParams p) {
    rope_impl<float>(x, lx, table, y, p);
}

extern "C" __global__ void rope_f64(const double* x, Strided lx, const double* table, double* y, RopeParams p) {
    rope_impl<double>(x, lx, table, y, p);
}
