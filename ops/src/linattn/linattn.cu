// The fused linear attention core (see linattn/mod.rs for the math, cuda.rs for the launch plan).
//
// Operands are contiguous: qk (B, N, 2C), v and g (B, N, C), the RoPE table (H + W, C/4, 2) built on the host
// exactly as rope/cpu.rs builds it. Work is cut per (batch, head) into `slices` token slices of `span` tokens
// (a multiple of the tile); block x = (b h) slices + s. Reductions over tokens write one partial sum per slice,
// and the next kernel combines a (batch, head)'s partials in slice order: no atomics, the same bits every run.
//
// Templates on DP, the head width d padded to a power of two (8, 16, 32 or 64): padded channels hold zeros in
// shared memory and are never written. A block has NT threads; thread t owns column col = t % DP and the rows
// row0 + j ROWS (j < ...), ROWS = NT / DP, of a token tile [TT][DP] or of a d x d matrix, so that a warp's
// loads of a tile row are consecutive and its reads of the other operand are broadcasts.
//
//   linattn_fwd_reduce:  kv and k-sum partials per slice            reads k half of qk, v
//   linattn_fwd_out:     combines them (slice 0 writes kv, kmean), out = z (q~ kv)     reads q half
//   linattn_bwd_reduce:  ds = -z^2 (G . o), dkv and dkmean partials per slice         reads q half, g
//   linattn_bwd_tokens:  blockIdx.y 0: dq (q half of dqk); 1: dk (k half) and dv      reads all
//
// The padded tiles let every token loop run over the whole tile: padded tokens and channels are zeros, whose
// products add nothing.

struct LinAttnParams {
    long long batch, tokens, channels, heads, d;
    long long grid_h, grid_w;
    long long span;    // tokens per slice, a multiple of the tile
    long long slices;  // slices per (batch, head): ceil(tokens / span)
    double eps;        // added to q . kmean
    double inv_n;      // 1 / tokens
};

static_assert(sizeof(LinAttnParams) == 88, "LinAttnParams must match linattn/cuda.rs");

template <typename T, int DP> struct LaCfg {
    static constexpr int NT = DP <= 8 ? 64 : 256;  // threads
    // A token tile is 4 KiB, 2 KiB when a d x d matrix in T is over 16 KiB (f64, DP 64): shared memory stays
    // under the 48 KiB a block gets without opting in.
    static constexpr int TILE = (sizeof(T) * DP * DP > 16384 ? 2048 : 4096) / (int)sizeof(T);  // elements
    static constexpr int TT = TILE / DP;       // tokens per tile
    static constexpr int ROWS = NT / DP;       // rows a pass of the block covers
    static constexpr int PER_TILE = TT / ROWS; // tile rows per thread
    static constexpr int PER_MAT = DP / ROWS;  // d x d rows per thread
    static_assert(PER_TILE * ROWS == TT && PER_MAT * ROWS == DP, "tile and block must divide");
};

// phi(x) = elu(x) + 1, as the composition evaluates it.
template <typename T> __device__ __forceinline__ T la_phi(T x) { return x > T(0) ? x + T(1) : m_expm1(x) + T(1); }

// (cos, sin) of the RoPE pair of channel c of token n (pairs below C/4 turn with the row, the others with the
// column).
template <typename T>
__device__ __forceinline__ void la_angle(const T* table, const LinAttnParams& p, long long n, long long c, T& cs,
                                         T& sn) {
    // 32-bit division: the host checks that N and C fit in an int.
    const int pair = (int)(c >> 1), quarter = (int)(p.channels / 4);
    const unsigned nu = (unsigned)n, w = (unsigned)p.grid_w;
    const long long row = pair < quarter ? (long long)(nu / w) : p.grid_h + (long long)(nu % w);
    const T* e = table + (row * quarter + (pair < quarter ? pair : pair - quarter)) * 2;
    cs = e[0];
    sn = e[1];
}

// Fills tile f[TT][DP] with phi of the raw channels of head h in `part` (0: q, 1: k) for tokens
// n0 .. n0 + TT (below n_end), and r (when given) with their rotation R f; zeros elsewhere.
template <typename T, int DP>
__device__ __forceinline__ void la_load_features(const T* qk, const T* table, const LinAttnParams& p, long long b,
                                                 long long h, int part, long long n0, long long n_end, T* f,
                                                 T* r) {
    using C = LaCfg<T, DP>;
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
#pragma unroll
    for (int j = 0; j < C::PER_TILE; ++j) {
        const int t = row0 + j * C::ROWS;
        const long long n = n0 + t;
        T x = T(0), y = T(0);
        if (n < n_end && col < p.d) {
            const long long c = h * p.d + col;
            const T* raw = qk + (b * p.tokens + n) * 2 * p.channels + part * p.channels;
            x = la_phi(raw[c]);
            if (r) {
                // The pair partner c ^ 1 lies in the same head (d is even).
                const T xp = la_phi(raw[c ^ 1]);
                T cs, sn;
                la_angle(table, p, n, c, cs, sn);
                y = (c & 1) ? xp * sn + x * cs : x * cs - xp * sn;
            }
        }
        f[t * DP + col] = x;
        if (r) r[t * DP + col] = y;
    }
}

// Fills tile s[TT][DP] with the channels of head h of a (B, N, C) tensor for tokens n0 .. n0 + TT; zeros elsewhere.
template <typename T, int DP>
__device__ __forceinline__ void la_load_rows(const T* x, const LinAttnParams& p, long long b, long long h,
                                             long long n0, long long n_end, T* s) {
    using C = LaCfg<T, DP>;
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
#pragma unroll
    for (int j = 0; j < C::PER_TILE; ++j) {
        const int t = row0 + j * C::ROWS;
        const long long n = n0 + t;
        s[t * DP + col] = (n < n_end && col < p.d) ? x[(b * p.tokens + n) * p.channels + h * p.d + col] : T(0);
    }
}

// The gradient dx of channel c's rotated value from the rotated gradients of c (own) and of its partner:
// R^T on the pair (re, im): dx_re = g_re cos + g_im sin, dx_im = -g_re sin + g_im cos.
template <typename T> __device__ __forceinline__ T la_unrotate(long long c, T own, T partner, T cs, T sn) {
    return (c & 1) ? own * cs - partner * sn : own * cs + partner * sn;
}

// ---- forward ----------------------------------------------------------------------------------------------

template <typename T, int DP>
__device__ void la_fwd_reduce(LinAttnParams p, const T* qk, const T* v, const T* table, T* part_kv, T* part_ks) {
    using C = LaCfg<T, DP>;
    __shared__ T sk[C::TILE], skr[C::TILE], sv[C::TILE];
    const long long bh = blockIdx.x / p.slices, s = blockIdx.x % p.slices;
    const long long b = bh / p.heads, h = bh % p.heads;
    const long long n_begin = s * p.span, n_end = min(p.tokens, n_begin + p.span);
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
    T acc[C::PER_MAT];
#pragma unroll
    for (int j = 0; j < C::PER_MAT; ++j) acc[j] = T(0);
    T ksum = T(0);
    for (long long n0 = n_begin; n0 < n_end; n0 += C::TT) {
        __syncthreads();  // the previous tile is consumed
        la_load_features<T, DP>(qk, table, p, b, h, 1, n0, n_end, sk, skr);
        la_load_rows<T, DP>(v, p, b, h, n0, n_end, sv);
        __syncthreads();
#pragma unroll 4
        for (int t = 0; t < C::TT; ++t) {
            const T ve = sv[t * DP + col];
#pragma unroll
            for (int j = 0; j < C::PER_MAT; ++j) acc[j] += skr[t * DP + row0 + j * C::ROWS] * ve;
        }
        if (threadIdx.x < DP) {
            for (int t = 0; t < C::TT; ++t) ksum += sk[t * DP + threadIdx.x];
        }
    }
    const long long d = p.d, slot = bh * p.slices + s;
    if (col < d) {
#pragma unroll
        for (int j = 0; j < C::PER_MAT; ++j) {
            const int i = row0 + j * C::ROWS;
            if (i < d) part_kv[(slot * d + i) * d + col] = acc[j];
        }
    }
    if (threadIdx.x < d) part_ks[slot * d + threadIdx.x] = ksum;
}

template <typename T, int DP>
__device__ void la_fwd_out(LinAttnParams p, const T* qk, const T* table, const T* part_kv, const T* part_ks,
                           T* kv, T* kmean, T* out) {
    using C = LaCfg<T, DP>;
    __shared__ T skv[DP * DP], skm[DP], sq[C::TILE], sqr[C::TILE], sz[C::TT];
    const long long bh = blockIdx.x / p.slices, s = blockIdx.x % p.slices;
    const long long b = bh / p.heads, h = bh % p.heads;
    const long long n_begin = s * p.span, n_end = min(p.tokens, n_begin + p.span);
    const long long d = p.d;
    const T inv_n = T(p.inv_n);
    // Combine the slices' partial sums in slice order; slice 0 keeps them for the backward.
    for (int e = threadIdx.x; e < DP * DP; e += C::NT) {
        const int i = e / DP, j = e % DP;
        T val = T(0);
        if (i < d && j < d) {
            for (long long k = 0; k < p.slices; ++k) val += part_kv[((bh * p.slices + k) * d + i) * d + j];
            val *= inv_n;
            if (s == 0) kv[(bh * d + i) * d + j] = val;
        }
        skv[e] = val;
    }
    if (threadIdx.x < DP) {
        T val = T(0);
        if (threadIdx.x < d) {
            for (long long k = 0; k < p.slices; ++k) val += part_ks[(bh * p.slices + k) * d + threadIdx.x];
            val *= inv_n;
            if (s == 0) kmean[b * p.channels + h * d + threadIdx.x] = val;
        }
        skm[threadIdx.x] = val;
    }
    __syncthreads();
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
    T kvc[DP];  // column col of kv
#pragma unroll
    for (int i = 0; i < DP; ++i) kvc[i] = skv[i * DP + col];
    for (long long n0 = n_begin; n0 < n_end; n0 += C::TT) {
        __syncthreads();
        la_load_features<T, DP>(qk, table, p, b, h, 0, n0, n_end, sq, sqr);
        __syncthreads();
        for (int t = threadIdx.x; t < C::TT; t += C::NT) {
            T dot = T(0);
#pragma unroll
            for (int j = 0; j < DP; ++j) dot += sq[t * DP + j] * skm[j];
            sz[t] = T(1) / (dot + T(p.eps));
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < C::PER_TILE; ++j) {
            const int t = row0 + j * C::ROWS;
            const long long n = n0 + t;
            T o = T(0);
#pragma unroll
            for (int i = 0; i < DP; ++i) o += sqr[t * DP + i] * kvc[i];
            if (n < n_end && col < d) out[(b * p.tokens + n) * p.channels + h * d + col] = o * sz[t];
        }
    }
}

// ---- backward ---------------------------------------------------------------------------------------------

template <typename T, int DP>
__device__ void la_bwd_reduce(LinAttnParams p, const T* qk, const T* table, const T* kv, const T* kmean,
                              const T* g, T* part_dkv, T* part_dkm, T* ds) {
    using C = LaCfg<T, DP>;
    __shared__ T skm[DP], sq[C::TILE], sqr[C::TILE], sg[C::TILE], sprod[C::TILE], sz[C::TT], sds[C::TT];
    const long long bh = blockIdx.x / p.slices, s = blockIdx.x % p.slices;
    const long long b = bh / p.heads, h = bh % p.heads;
    const long long n_begin = s * p.span, n_end = min(p.tokens, n_begin + p.span);
    const long long d = p.d;
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
    if (threadIdx.x < DP) skm[threadIdx.x] = threadIdx.x < d ? kmean[b * p.channels + h * d + threadIdx.x] : T(0);
    T kvc[DP];  // column col of kv
#pragma unroll
    for (int i = 0; i < DP; ++i) kvc[i] = (i < d && col < d) ? kv[(bh * d + i) * d + col] : T(0);
    T acc[C::PER_MAT];
#pragma unroll
    for (int j = 0; j < C::PER_MAT; ++j) acc[j] = T(0);
    T dkm = T(0);
    for (long long n0 = n_begin; n0 < n_end; n0 += C::TT) {
        __syncthreads();
        la_load_features<T, DP>(qk, table, p, b, h, 0, n0, n_end, sq, sqr);
        la_load_rows<T, DP>(g, p, b, h, n0, n_end, sg);
        __syncthreads();
        // o = q~ kv, times G, per element; the normaliser per token.
#pragma unroll
        for (int j = 0; j < C::PER_TILE; ++j) {
            const int t = row0 + j * C::ROWS;
            T o = T(0);
#pragma unroll
            for (int i = 0; i < DP; ++i) o += sqr[t * DP + i] * kvc[i];
            sprod[t * DP + col] = sg[t * DP + col] * o;
        }
        __syncthreads();
        for (int t = threadIdx.x; t < C::TT; t += C::NT) {
            T dz = T(0), dot = T(0);
#pragma unroll
            for (int e = 0; e < DP; ++e) {
                dz += sprod[t * DP + e];
                dot += sq[t * DP + e] * skm[e];
            }
            const T z = T(1) / (dot + T(p.eps));
            const T dsv = -(dz * z * z);
            sz[t] = z;
            sds[t] = dsv;
            if (n0 + t < n_end) ds[bh * p.tokens + n0 + t] = dsv;
        }
        __syncthreads();
        // dout = z G, in place (each thread its own elements).
#pragma unroll
        for (int j = 0; j < C::PER_TILE; ++j) {
            const int t = row0 + j * C::ROWS;
            sg[t * DP + col] *= sz[t];
        }
        __syncthreads();
#pragma unroll 4
        for (int t = 0; t < C::TT; ++t) {
            const T de = sg[t * DP + col];
#pragma unroll
            for (int j = 0; j < C::PER_MAT; ++j) acc[j] += sqr[t * DP + row0 + j * C::ROWS] * de;
        }
        if (threadIdx.x < DP) {
            for (int t = 0; t < C::TT; ++t) dkm += sds[t] * sq[t * DP + threadIdx.x];
        }
    }
    const long long slot = bh * p.slices + s;
    if (col < d) {
#pragma unroll
        for (int j = 0; j < C::PER_MAT; ++j) {
            const int i = row0 + j * C::ROWS;
            if (i < d) part_dkv[(slot * d + i) * d + col] = acc[j];
        }
    }
    if (threadIdx.x < d) part_dkm[slot * d + threadIdx.x] = dkm;
}

// Shared memory of la_bwd_tokens, in elements of T: the larger of its two roles.
template <typename T, int DP> struct LaBwdTokensSmem {
    using C = LaCfg<T, DP>;
    // Role 0: kmean, the tiles q, G, dq~, and z, ds per token.
    static constexpr int Q = DP + 3 * C::TILE + 2 * C::TT;
    // Role 1: dkv with rows padded to DP + 1 (column reads without bank conflicts), dkmean, the tiles k, k~,
    // v, dk~.
    static constexpr int K = DP * (DP + 1) + DP + 4 * C::TILE;
    static constexpr int ELEMS = Q > K ? Q : K;
};

template <typename T, int DP>
__device__ void la_bwd_tokens(LinAttnParams p, const T* qk, const T* v, const T* table, const T* kv, const T* kmean,
                              const T* g, const T* ds, const T* part_dkv, const T* part_dkm, T* dqk, T* dv) {
    using C = LaCfg<T, DP>;
    __shared__ T smem[LaBwdTokensSmem<T, DP>::ELEMS];
    const long long bh = blockIdx.x / p.slices, s = blockIdx.x % p.slices;
    const long long b = bh / p.heads, h = bh % p.heads;
    const long long n_begin = s * p.span, n_end = min(p.tokens, n_begin + p.span);
    const long long d = p.d, c2 = 2 * p.channels;
    const T inv_n = T(p.inv_n);
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
    const long long c = h * d + col;  // this thread's channel
    if (blockIdx.y == 0) {
        // dq = R^T (z G kv^T) + ds kmean, times phi'(.) = min(q, 1).
        T* skm = smem;
        T* sq = skm + DP;
        T* sg = sq + C::TILE;
        T* sdqr = sg + C::TILE;
        T* sz = sdqr + C::TILE;
        T* sds = sz + C::TT;
        if (threadIdx.x < DP) skm[threadIdx.x] = threadIdx.x < d ? kmean[b * p.channels + h * d + threadIdx.x] : T(0);
        T kvr[DP];  // row col of kv
#pragma unroll
        for (int e = 0; e < DP; ++e) kvr[e] = (e < d && col < d) ? kv[(bh * d + col) * d + e] : T(0);
        for (long long n0 = n_begin; n0 < n_end; n0 += C::TT) {
            __syncthreads();
            la_load_features<T, DP>(qk, table, p, b, h, 0, n0, n_end, sq, (T*)nullptr);
            la_load_rows<T, DP>(g, p, b, h, n0, n_end, sg);
            __syncthreads();
            for (int t = threadIdx.x; t < C::TT; t += C::NT) {
                T dot = T(0);
#pragma unroll
                for (int e = 0; e < DP; ++e) dot += sq[t * DP + e] * skm[e];
                sz[t] = T(1) / (dot + T(p.eps));
                sds[t] = n0 + t < n_end ? ds[bh * p.tokens + n0 + t] : T(0);
            }
            __syncthreads();
#pragma unroll
            for (int j = 0; j < C::PER_TILE; ++j) {
                const int t = row0 + j * C::ROWS;
                T acc = T(0);
#pragma unroll
                for (int e = 0; e < DP; ++e) acc += sg[t * DP + e] * kvr[e];
                sdqr[t * DP + col] = acc * sz[t];
            }
            __syncthreads();
#pragma unroll
            for (int j = 0; j < C::PER_TILE; ++j) {
                const int t = row0 + j * C::ROWS;
                const long long n = n0 + t;
                if (n < n_end && col < d) {
                    T cs, sn;
                    la_angle(table, p, n, c, cs, sn);
                    const T back = la_unrotate(c, sdqr[t * DP + col], sdqr[t * DP + (col ^ 1)], cs, sn);
                    const T q = sq[t * DP + col];
                    dqk[(b * p.tokens + n) * c2 + c] = (back + sds[t] * skm[col]) * (q < T(1) ? q : T(1));
                }
            }
        }
    } else {
        // dk = R^T ((1/N) v dkv^T) + dkmean / N, times min(k, 1); dv = (1/N) k~ dkv.
        constexpr int LD = DP + 1;
        T* sdkv = smem;
        T* sdkm = sdkv + DP * LD;
        T* sk = sdkm + DP;
        T* skr = sk + C::TILE;
        T* sv = skr + C::TILE;
        T* sdkr = sv + C::TILE;
        // Combine the slices' partial sums in slice order.
        for (int e = threadIdx.x; e < DP * DP; e += C::NT) {
            const int i = e / DP, j = e % DP;
            T val = T(0);
            if (i < d && j < d) {
                for (long long k = 0; k < p.slices; ++k) val += part_dkv[((bh * p.slices + k) * d + i) * d + j];
            }
            sdkv[i * LD + j] = val;
        }
        if (threadIdx.x < DP) {
            T val = T(0);
            if (threadIdx.x < d) {
                for (long long k = 0; k < p.slices; ++k) val += part_dkm[(bh * p.slices + k) * d + threadIdx.x];
            }
            sdkm[threadIdx.x] = val;
        }
        __syncthreads();
        T dkvr[DP];  // row col of dkv
#pragma unroll
        for (int e = 0; e < DP; ++e) dkvr[e] = sdkv[col * LD + e];
        for (long long n0 = n_begin; n0 < n_end; n0 += C::TT) {
            __syncthreads();
            la_load_features<T, DP>(qk, table, p, b, h, 1, n0, n_end, sk, skr);
            la_load_rows<T, DP>(v, p, b, h, n0, n_end, sv);
            __syncthreads();
#pragma unroll
            for (int j = 0; j < C::PER_TILE; ++j) {
                const int t = row0 + j * C::ROWS;
                const long long n = n0 + t;
                T dkr = T(0), dvv = T(0);
#pragma unroll
                for (int e = 0; e < DP; ++e) {
                    dkr += sv[t * DP + e] * dkvr[e];
                    dvv += skr[t * DP + e] * sdkv[e * LD + col];
                }
                sdkr[t * DP + col] = dkr * inv_n;
                if (n < n_end && col < d) dv[(b * p.tokens + n) * p.channels + c] = dvv * inv_n;
            }
            __syncthreads();
#pragma unroll
            for (int j = 0; j < C::PER_TILE; ++j) {
                const int t = row0 + j * C::ROWS;
                const long long n = n0 + t;
                if (n < n_end && col < d) {
                    T cs, sn;
                    la_angle(table, p, n, c, cs, sn);
                    const T back = la_unrotate(c, sdkr[t * DP + col], sdkr[t * DP + (col ^ 1)], cs, sn);
                    const T k = sk[t * DP + col];
                    dqk[(b * p.tokens + n) * c2 + p.channels + c] = (back + sdkm[col] * inv_n) * (k < T(1) ? k : T(1));
                }
            }
        }
    }
}

#define LA_KERNELS(T, S, DP)                                                                                     \
    extern "C" __global__ void __launch_bounds__(LaCfg<T, DP>::NT)                                               \
        linattn_fwd_reduce_d##DP##_##S(LinAttnParams p, const T* qk, const T* v, const T* table, T* part_kv,    \
                                       T* part_ks) {                                                             \
        la_fwd_reduce<T, DP>(p, qk, v, table, part_kv, part_ks);                                                \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(LaCfg<T, DP>::NT)                                               \
        linattn_fwd_out_d##DP##_##S(LinAttnParams p, const T* qk, const T* table, const T* part_kv,             \
                                    const T* part_ks, T* kv, T* kmean, T* out) {                                 \
        la_fwd_out<T, DP>(p, qk, table, part_kv, part_ks, kv, kmean, out);                                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(LaCfg<T, DP>::NT)                                               \
        linattn_bwd_reduce_d##DP##_##S(LinAttnParams p, const T* qk, const T* table, const T* kv,               \
                                       const T* kmean, const T* g, T* part_dkv, T* part_dkm, T* ds) {           \
        la_bwd_reduce<T, DP>(p, qk, table, kv, kmean, g, part_dkv, part_dkm, ds);                               \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(LaCfg<T, DP>::NT) linattn_bwd_tokens_d##DP##_##S(              \
        LinAttnParams p, const T* qk, const T* v, const T* table, const T* kv, const T* kmean, const T* g,      \
        const T* ds, const T* part_dkv, const T* part_dkm, T* dqk, T* dv) {                                      \
        la_bwd_tokens<T, DP>(p, qk, v, table, kv, kmean, g, ds, part_dkv, part_dkm, dqk, dv);                   \
    }

LA_KERNELS(float, f32, 8)
LA_KERNELS(float, f32, 16)
LA_KERNELS(float, f32, 32)
LA_KERNELS(float, f32, 64)
LA_KERNELS(double, f64, 8)
LA_KERNELS(double, f64, 16)
LA_KERNELS(double, f64, 32)
LA_KERNELS(double, f64, 64)
