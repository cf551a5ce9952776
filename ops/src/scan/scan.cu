// The selective scan (ops/src/scan/mod.rs has the math; cuda.rs the launches and the design notes).
//
// Thread layout: a block of SCAN_THREADS threads covers (one batch b, SCAN_THREADS / lanes channels). Each
// channel gets `lanes` consecutive threads of one warp (a power of two <= 32); thread `lane` of a channel owns
// the states n = lane + k lanes, k < SPT (a template parameter, so that the states live in registers and a
// thread holding one state pays for no more), skipping n >= S. Time runs sequentially
// in every thread; the readout y = sum_n C h is a shuffle sum over the channel's lanes. Every thread of a
// block runs every step (threads past the last channel compute on channel 0's data and write nothing), so
// the full-warp shuffles and __syncthreads are always reached by all threads.
//
// Forward writes out and, every `chunk` steps, the state entering the chunk. Backward walks the chunks in
// reverse: it recomputes the chunk's states from the saved entry into shared memory, then runs the reverse
// recurrence over them. dA, dD, ddelta_bias (summed over batch and time) are kept per thread and added to
// global memory with one atomicAdd per thread at the end; dB and dC (summed over channels) are added per
// chunk into a shared (chunk, S) tile with shared-memory atomics, and the tile to global memory with one
// atomicAdd per (n, t) per block.

#define SCAN_THREADS 128

// Mirrors ops::scan::cuda::ScanParams (#[repr(C)]) field for field.
struct ScanParams {
    long long batch;     // B
    long long channels;  // C
    long long length;    // L
    long long states;    // S
    long long chunk;     // steps between saved states
    long long n_chunks;  // ceil(L / chunk)
    // u, delta, z, out and their gradients are (B, C, L) with unit time stride
    long long u_batch_stride;
    long long u_channel_stride;
    // Bm, Cm, dB, dC are (B, S, L) with unit time stride
    long long bc_batch_stride;
    long long bc_state_stride;
    // A, dA are (C, S) with unit state stride
    long long a_channel_stride;
    // the saved states are (B, C, n_chunks, S) with unit state stride
    long long saved_batch_stride;
    long long saved_channel_stride;
    long long saved_chunk_stride;
    int lanes;              // threads per channel, a power of two <= 32
    int states_per_thread;  // SPT of the kernel: ceil(S / lanes) rounded up to 1, 2, 4 or 8
    int has_d;
    int has_z;
    int has_delta_bias;
    int delta_softplus;
};

static_assert(sizeof(ScanParams) == 136, "ScanParams must match ops::scan::cuda::ScanParams");

// PyTorch's softplus (threshold 20) and its derivative, as in scan/cpu.rs.
template <typename T> __device__ __forceinline__ T scan_softplus(T x) {
    return x > T(20) ? x : m_log1p(m_exp(x));
}
template <typename T> __device__ __forceinline__ T scan_softplus_grad(T x) {
    return x > T(20) ? T(1) : m_sigmoid(x);
}

// Sum over the `lanes` threads of one channel: xor offsets below `lanes` stay inside the aligned group.
template <typename T> __device__ __forceinline__ T group_sum(T v, int lanes) {
    for (int o = lanes >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Where this thread sits: batch, channel (clamped to a valid one when past the end), lane, activity.
struct ScanThread {
    long long b;
    long long c;
    int lane;
    bool active;
};

__device__ __forceinline__ ScanThread scan_thread(const ScanParams& p) {
    const int per_block = SCAN_THREADS / p.lanes;
    const long long blocks_per_batch = (p.channels + per_block - 1) / per_block;
    ScanThread th;
    th.b = blockIdx.x / blocks_per_batch;
    const long long c = (blockIdx.x % blocks_per_batch) * per_block + threadIdx.x / p.lanes;
    th.active = c < p.channels;
    th.c = th.active ? c : 0;
    th.lane = threadIdx.x & (p.lanes - 1);
    return th;
}

template <typename T, int SPT>
__device__ void scan_fwd(const ScanParams p, const T* __restrict__ u, const T* __restrict__ delta,
                         const T* __restrict__ A, const T* __restrict__ Bm, const T* __restrict__ Cm,
                         const T* __restrict__ D, const T* __restrict__ z, const T* __restrict__ delta_bias,
                         T* __restrict__ out, T* __restrict__ saved) {
    const ScanThread th = scan_thread(p);
    const long long row = th.b * p.u_batch_stride + th.c * p.u_channel_stride;
    const long long bc = th.b * p.bc_batch_stride;
    const long long sv = th.b * p.saved_batch_stride + th.c * p.saved_channel_stride;
    const T d = p.has_d ? D[th.c] : T(0);
    const T bias = p.has_delta_bias ? delta_bias[th.c] : T(0);
    T h[SPT], a[SPT];
#pragma unroll
    for (int k = 0; k < SPT; ++k) {
        const long long n = th.lane + (long long)k * p.lanes;
        h[k] = T(0);
        a[k] = (n < p.states) ? A[th.c * p.a_channel_stride + n] : T(0);
    }
    for (long long t = 0; t < p.length; ++t) {
        if (t % p.chunk == 0 && th.active) {
#pragma unroll
            for (int k = 0; k < SPT; ++k) {
                const long long n = th.lane + (long long)k * p.lanes;
                if (n < p.states) saved[sv + (t / p.chunk) * p.saved_chunk_stride + n] = h[k];
            }
        }
        const T x = u[row + t];
        T dt = delta[row + t] + bias;
        if (p.delta_softplus) dt = scan_softplus(dt);
        T y = T(0);
#pragma unroll
        for (int k = 0; k < SPT; ++k) {
            const long long n = th.lane + (long long)k * p.lanes;
            if (n < p.states) {
                h[k] = m_exp(dt * a[k]) * h[k] + dt * Bm[bc + n * p.bc_state_stride + t] * x;
                y += Cm[bc + n * p.bc_state_stride + t] * h[k];
            }
        }
        y = group_sum(y, p.lanes);
        if (th.lane == 0 && th.active) {
            y += d * x;
            if (p.has_z) {
                const T zv = z[row + t];
                y *= zv * m_sigmoid(zv);
            }
            out[row + t] = y;
        }
    }
}

// Dynamic shared memory: the chunk's recomputed states, (chunk, states_per_thread, SCAN_THREADS) so that a
// warp's accesses are consecutive, then the dB and dC tiles, (2, chunk, S).
template <typename T, int SPT>
__device__ void scan_bwd(const ScanParams p, const T* __restrict__ u, const T* __restrict__ delta,
                         const T* __restrict__ A, const T* __restrict__ Bm, const T* __restrict__ Cm,
                         const T* __restrict__ D, const T* __restrict__ z, const T* __restrict__ delta_bias,
                         const T* __restrict__ saved, const T* __restrict__ gout, T* __restrict__ du,
                         T* __restrict__ ddelta, T* __restrict__ dA, T* __restrict__ dB, T* __restrict__ dC,
                         T* __restrict__ dD, T* __restrict__ dz, T* __restrict__ ddelta_bias) {
    extern __shared__ __align__(16) unsigned char scan_smem[];
    T* hs = reinterpret_cast<T*>(scan_smem);
    T* tile = hs + p.chunk * p.states_per_thread * SCAN_THREADS;  // dB at tile[i S + n], dC at tile[(chunk + i) S + n]
    const ScanThread th = scan_thread(p);
    const int tid = threadIdx.x;
    const long long row = th.b * p.u_batch_stride + th.c * p.u_channel_stride;
    const long long bc = th.b * p.bc_batch_stride;
    const long long sv = th.b * p.saved_batch_stride + th.c * p.saved_channel_stride;
    const T d = p.has_d ? D[th.c] : T(0);
    const T bias = p.has_delta_bias ? delta_bias[th.c] : T(0);
    const int tile_len = (int)(2 * p.chunk * p.states);
    T a[SPT], h0[SPT], carry[SPT], da_acc[SPT];
#pragma unroll
    for (int k = 0; k < SPT; ++k) {
        const long long n = th.lane + (long long)k * p.lanes;
        a[k] = (n < p.states) ? A[th.c * p.a_channel_stride + n] : T(0);
        carry[k] = T(0);  // dA[t+1] gh[t+1], zero after the last step
        da_acc[k] = T(0);
    }
    T dd_acc = T(0), dbias_acc = T(0);
    for (long long kc = p.n_chunks - 1; kc >= 0; --kc) {
        const long long t0 = kc * p.chunk;
        const int len = (int)min(p.chunk, p.length - t0);
        for (int i = tid; i < tile_len; i += SCAN_THREADS) tile[i] = T(0);
        // Recompute the chunk's states from its saved entry; each thread reads back only its own.
        T h[SPT];
#pragma unroll
        for (int k = 0; k < SPT; ++k) {
            const long long n = th.lane + (long long)k * p.lanes;
            h0[k] = (n < p.states) ? saved[sv + kc * p.saved_chunk_stride + n] : T(0);
            h[k] = h0[k];
        }
        for (int i = 0; i < len; ++i) {
            const long long t = t0 + i;
            const T x = u[row + t];
            T dt = delta[row + t] + bias;
            if (p.delta_softplus) dt = scan_softplus(dt);
#pragma unroll
            for (int k = 0; k < SPT; ++k) {
                const long long n = th.lane + (long long)k * p.lanes;
                if (n < p.states) {
                    h[k] = m_exp(dt * a[k]) * h[k] + dt * Bm[bc + n * p.bc_state_stride + t] * x;
                    hs[(i * p.states_per_thread + k) * SCAN_THREADS + tid] = h[k];
                }
            }
        }
        __syncthreads();  // the tile is zeroed before any thread adds to it
        for (int i = len - 1; i >= 0; --i) {
            const long long t = t0 + i;
            const T x = u[row + t];
            const T raw = delta[row + t] + bias;
            const T dt = p.delta_softplus ? scan_softplus(raw) : raw;
            const T g = gout[row + t];
            // y again, for the gate's gradient (dividing it out of `out` is unstable where silu(z) is near 0).
            T y = T(0);
#pragma unroll
            for (int k = 0; k < SPT; ++k) {
                const long long n = th.lane + (long long)k * p.lanes;
                if (n < p.states)
                    y += Cm[bc + n * p.bc_state_stride + t] * hs[(i * p.states_per_thread + k) * SCAN_THREADS + tid];
            }
            y = group_sum(y, p.lanes) + d * x;
            T gy = g, gz = T(0);
            if (p.has_z) {
                const T zv = z[row + t];
                const T s = m_sigmoid(zv);
                gy = g * zv * s;
                gz = g * y * s * (T(1) + zv * (T(1) - s));
            }
            T du_part = T(0), ddt_part = T(0);
#pragma unroll
            for (int k = 0; k < SPT; ++k) {
                const long long n = th.lane + (long long)k * p.lanes;
                if (n < p.states) {
                    const T ht = hs[(i * p.states_per_thread + k) * SCAN_THREADS + tid];
                    const T hp = i > 0 ? hs[((i - 1) * p.states_per_thread + k) * SCAN_THREADS + tid] : h0[k];
                    const T e = m_exp(dt * a[k]);
                    const T bm = Bm[bc + n * p.bc_state_stride + t];
                    const T cm = Cm[bc + n * p.bc_state_stride + t];
                    const T gh = cm * gy + carry[k];  // gh[t] = C[t] gy[t] + dA[t+1] gh[t+1]
                    if (th.active) {
                        atomicAdd(&tile[i * p.states + n], gh * dt * x);
                        atomicAdd(&tile[(p.chunk + i) * p.states + n], gy * ht);
                    }
                    du_part += gh * dt * bm;
                    ddt_part += gh * (a[k] * e * hp + bm * x);
                    da_acc[k] += gh * dt * e * hp;
                    carry[k] = e * gh;
                }
            }
            du_part = group_sum(du_part, p.lanes);
            ddt_part = group_sum(ddt_part, p.lanes);
            if (th.lane == 0 && th.active) {
                const T gd = p.delta_softplus ? ddt_part * scan_softplus_grad(raw) : ddt_part;
                du[row + t] = du_part + d * gy;
                ddelta[row + t] = gd;
                if (p.has_z) dz[row + t] = gz;
                dd_acc += gy * x;
                dbias_acc += gd;
            }
        }
        __syncthreads();  // every shared add of this chunk is in
        for (int j = tid; j < p.states * len; j += SCAN_THREADS) {
            const int n = j / len, i = j % len;  // consecutive threads, consecutive times: coalesced in dB, dC
            const long long at = th.b * p.bc_batch_stride + n * p.bc_state_stride + t0 + i;
            atomicAdd(&dB[at], tile[i * p.states + n]);
            atomicAdd(&dC[at], tile[(p.chunk + i) * p.states + n]);
        }
        __syncthreads();  // the tile is read before the next chunk zeroes it
    }
    if (th.active) {
#pragma unroll
        for (int k = 0; k < SPT; ++k) {
            const long long n = th.lane + (long long)k * p.lanes;
            if (n < p.states) atomicAdd(&dA[th.c * p.a_channel_stride + n], da_acc[k]);
        }
        if (th.lane == 0) {
            if (p.has_d) atomicAdd(&dD[th.c], dd_acc);
            if (p.has_delta_bias) atomicAdd(&ddelta_bias[th.c], dbias_acc);
        }
    }
}

// Kernel names: scan_fwd_s<SPT>_<dtype>, scan_bwd_s<SPT>_<dtype>.
#define SCAN_KERNELS(T, SUFFIX, SPT)                                                                   \
    extern "C" __global__ void __launch_bounds__(SCAN_THREADS)                                        \
        scan_fwd_s##SPT##_##SUFFIX(const ScanParams p, const T* u, const T* delta, const T* A,         \
                                   const T* Bm, const T* Cm, const T* D, const T* z,                  \
                                   const T* delta_bias, T* out, T* saved) {                           \
        scan_fwd<T, SPT>(p, u, delta, A, Bm, Cm, D, z, delta_bias, out, saved);                        \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(SCAN_THREADS)                                        \
        scan_bwd_s##SPT##_##SUFFIX(const ScanParams p, const T* u, const T* delta, const T* A,         \
                                   const T* Bm, const T* Cm, const T* D, const T* z,                  \
                                   const T* delta_bias, const T* saved, const T* gout, T* du,         \
                                   T* ddelta, T* dA, T* dB, T* dC, T* dD, T* dz, T* ddelta_bias) {    \
        scan_bwd<T, SPT>(p, u, delta, A, Bm, Cm, D, z, delta_bias, saved, gout, du, ddelta, dA, dB,   \
                         dC, dD, dz, ddelta_bias);                                                     \
    }

SCAN_KERNELS(float, f32, 1)
SCAN_KERNELS(float, f32, 2)
SCAN_KERNELS(float, f32, 4)
SCAN_KERNELS(float, f32, 8)
SCAN_KERNELS(double, f64, 1)
SCAN_KERNELS(double, f64, 2)
SCAN_KERNELS(double, f64, 4)
SCAN_KERNELS(double, f64, 8)
