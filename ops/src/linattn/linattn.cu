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
//   linattn_bwd_tokens:  dq, dk (the two halves of dqk) and dv by one block a slice (la_bwd_tokens_tiled), or,
//                        where its tiles do not fit, blockIdx.y 0: dq; 1: dk and dv         reads all
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
    // Blocks a multiprocessor must hold (__launch_bounds__' second argument, which caps the registers at
    // 65536 / (NT * MIN)), for f32 at widths 16 and 32 (MLLA's case); elsewhere the compiler's choice.
    // NVRTC 13.2, sm_90, f32 d32: fwd_reduce 39 registers (6 blocks), fwd_out 64 (4; 8 bytes spilled),
    // bwd_reduce 80 (3; 28/48 bytes spill stores/loads), bwd_tokens (tiled) 80 (3; 76/48) - uncapped 44, 80,
    // 86, 123 (NOTES.md).
    static constexpr bool CAP = sizeof(T) == 4 && (DP == 16 || DP == 32);
    static constexpr int MIN_FWD_REDUCE = CAP ? 6 : 1;
    static constexpr int MIN_FWD_OUT = CAP ? 4 : 1;
    static constexpr int MIN_BWD_REDUCE = CAP ? 3 : 1;
    static constexpr int MIN_BWD_TOKENS = CAP ? 3 : 1;
};

// phi(x) = elu(x) + 1, as the composition evaluates it.
template <typename T> __device__ __forceinline__ T la_phi(T x) { return x > T(0) ? x + T(1) : m_expm1(x) + T(1); }

// One (cos, sin) entry of the RoPE table, read as one 8- (f32) or 16-byte (f64) word.
template <typename T> struct __align__(2 * sizeof(T)) LaCS {
    T c, s;
};

// A thread's channel c = h d + col of a head and the RoPE table column it turns with, and the grid position
// (gy, gx) of its token n0 + row0 + j ROWS, kept up to date token by token (one division a tile, not one a
// token: the position advances by ROWS tokens with a subtraction, or a few when W < ROWS).
struct LaPos {
    long long table_row0;  // 0 when the pair turns with the row (pair < C/4), H when with the column
    int by_row;            // pair < C/4
    int tcol;              // the pair's column in the table, below C/4
    unsigned gy, gx;       // the token's grid row and column

    __device__ __forceinline__ LaPos(const LinAttnParams& p, long long c, long long n) {
        const int pair = (int)(c >> 1), quarter = (int)(p.channels / 4);
        by_row = pair < quarter;
        tcol = by_row ? pair : pair - quarter;
        table_row0 = by_row ? 0 : p.grid_h;
        // 32-bit division: the host checks that N and C fit in an int.
        const unsigned w = (unsigned)p.grid_w;
        gy = (unsigned)n / w;
        gx = (unsigned)n - gy * w;
    }
    __device__ __forceinline__ void advance(unsigned tokens, unsigned w) {
        gx += tokens;
        while (gx >= w) {
            gx -= w;
            ++gy;
        }
    }
    // (cos, sin) of the thread's pair at its token.
    template <typename T>
    __device__ __forceinline__ LaCS<T> angle(const T* table, const LinAttnParams& p) const {
        const long long row = table_row0 + (by_row ? gy : gx);
        return *reinterpret_cast<const LaCS<T>*>(table + (row * (p.channels / 4) + tcol) * 2);
    }
};

// The value of lane ^ 1, the other channel of the thread's RoPE pair (col ^ 1 is in the same warp for every
// DP). Every lane of the warp must call it.
template <typename T> __device__ __forceinline__ T la_partner(T x) { return __shfl_xor_sync(0xffffffffu, x, 1); }

// Sums v[k] over the DP lanes of each tile row (the threads of one token), every thread of the row getting
// the same bits: butterfly shuffles within a warp; for DP 64, whose rows span two warps, the two warps'
// sums through `scratch` (PER_TILE * NT / 32 elements, which this call may overwrite only after a barrier
// since the last call's reads) and a barrier. Every thread of the block must call it.
template <typename T, int DP, int K> __device__ __forceinline__ void la_row_sums(T (&v)[K], T* scratch) {
    constexpr int FIRST = DP < 32 ? DP / 2 : 16;
#pragma unroll
    for (int o = FIRST; o > 0; o >>= 1) {
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    }
    if constexpr (DP > 32) {
        constexpr int WARPS = LaCfg<T, DP>::NT / 32;
        const int warp = threadIdx.x / 32, first = warp & ~1;
        if (threadIdx.x % 32 == 0) {
#pragma unroll
            for (int k = 0; k < K; ++k) scratch[k * WARPS + warp] = v[k];
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = scratch[k * WARPS + first] + scratch[k * WARPS + first + 1];
    }
}

// Elements the row-sum scratch needs (1 when the shuffles suffice).
template <typename T, int DP> struct LaScratch {
    static constexpr int ELEMS = DP > 32 ? LaCfg<T, DP>::PER_TILE * LaCfg<T, DP>::NT / 32 : 1;
};

// VW consecutive elements of shared memory from a 16-byte aligned address, as one 16-byte load.
template <typename T> struct LaVec {
    static constexpr int VW = 16 / (int)sizeof(T);
};
template <typename T> __device__ __forceinline__ void la_ld16(const T* s, T (&v)[LaVec<T>::VW]) {
    if constexpr (sizeof(T) == 4) {
        const float4 q = *reinterpret_cast<const float4*>(s);
        v[0] = q.x;
        v[1] = q.y;
        v[2] = q.z;
        v[3] = q.w;
    } else {
        const double2 q = *reinterpret_cast<const double2*>(s);
        v[0] = q.x;
        v[1] = q.y;
    }
}

// row . w over i = 0 .. DP - 1 in order, the row (a shared tile row, 16-byte aligned, the same for the whole
// warp or a broadcast) read 16 bytes at a time.
template <typename T, int DP> __device__ __forceinline__ T la_dot_row(const T* row, const T (&w)[DP]) {
    constexpr int VW = LaVec<T>::VW;
    T acc = T(0);
#pragma unroll
    for (int i = 0; i < DP; i += VW) {
        T x[VW];
        la_ld16(row + i, x);
#pragma unroll
        for (int k = 0; k < VW; ++k) acc += x[k] * w[i + k];
    }
    return acc;
}

// x[j] = phi of the raw channel of head h in `part` (0: q, 1: k) of the thread's token n0 + row0 + j ROWS
// (below n_end; zero elsewhere and in padded channels) and, with ROT, r[j] = its rotation (R f) at that
// channel. The partner channel's phi comes from the neighbouring lane.
template <typename T, int DP, bool ROT>
__device__ __forceinline__ void la_features(const T* qk, const T* table, const LinAttnParams& p, long long b,
                                            long long h, int part, long long n0, long long n_end,
                                            T (&x)[LaCfg<T, DP>::PER_TILE], T (&r)[LaCfg<T, DP>::PER_TILE]) {
    using C = LaCfg<T, DP>;
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
    const long long c = h * p.d + col, c2 = 2 * p.channels;
    const bool live_col = col < p.d;
    const T* raw = qk + b * p.tokens * c2 + part * p.channels;
    LaPos pos(p, c, n0 + row0);
#pragma unroll
    for (int j = 0; j < C::PER_TILE; ++j) {
        const long long n = n0 + row0 + j * C::ROWS;
        const bool live = live_col && n < n_end;
        const T v = live ? la_phi(raw[n * c2 + c]) : T(0);
        x[j] = v;
        if constexpr (ROT) {
            // The pair partner c ^ 1 lies in the same head (d is even), on lane ^ 1.
            const T vp = la_partner(v);
            T y = T(0);
            if (live) {
                const LaCS<T> e = pos.angle(table, p);
                y = (c & 1) ? vp * e.s + v * e.c : v * e.c - vp * e.s;
            }
            r[j] = y;
        }
        pos.advance(C::ROWS, (unsigned)p.grid_w);
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

// The thread's own elements of the tile rows, as la_load_rows stores them, in registers.
template <typename T, int DP>
__device__ __forceinline__ void la_rows(const T* x, const LinAttnParams& p, long long b, long long h, long long n0,
                                        long long n_end, T (&v)[LaCfg<T, DP>::PER_TILE]) {
    using C = LaCfg<T, DP>;
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
#pragma unroll
    for (int j = 0; j < C::PER_TILE; ++j) {
        const long long n = n0 + row0 + j * C::ROWS;
        v[j] = (n < n_end && col < p.d) ? x[(b * p.tokens + n) * p.channels + h * p.d + col] : T(0);
    }
}

// The gradient dx of channel c's rotated value from the rotated gradients of c (own) and of its partner:
// R^T on the pair (re, im): dx_re = g_re cos + g_im sin, dx_im = -g_re sin + g_im cos.
template <typename T> __device__ __forceinline__ T la_unrotate(long long c, T own, T partner, T cs, T sn) {
    return (c & 1) ? own * cs - partner * sn : own * cs + partner * sn;
}

// Sums each thread's per-column partial `v` over the ROWS threads of its column, in row order, into the
// first DP threads' return value, through `buf` (NT elements). Ends with the block past a barrier after
// which buf may be reused; must be entered after a barrier that ends the last use of buf.
template <typename T, int DP> __device__ __forceinline__ T la_column_total(T v, T* buf) {
    using C = LaCfg<T, DP>;
    buf[threadIdx.x] = v;
    __syncthreads();
    T total = T(0);
    if (threadIdx.x < DP) {
        for (int r = 0; r < C::ROWS; ++r) total += buf[r * DP + threadIdx.x];
    }
    return total;
}

// ---- forward ----------------------------------------------------------------------------------------------

template <typename T, int DP>
__device__ void la_fwd_reduce(LinAttnParams p, const T* qk, const T* v, const T* table, T* part_kv, T* part_ks) {
    using C = LaCfg<T, DP>;
    constexpr int VW = LaVec<T>::VW;
    __shared__ __align__(16) T skr[C::TILE], sv[C::TILE];
    const long long bh = blockIdx.x / p.slices, s = blockIdx.x % p.slices;
    const long long b = bh / p.heads, h = bh % p.heads;
    const long long n_begin = s * p.span, n_end = min(p.tokens, n_begin + p.span);
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
    // Rows row0 PER_MAT .. + PER_MAT of kv's column col: one 16-byte broadcast load of k~ a token.
    T acc[C::PER_MAT];
#pragma unroll
    for (int j = 0; j < C::PER_MAT; ++j) acc[j] = T(0);
    T ksum = T(0);  // column col over this thread's tokens
    for (long long n0 = n_begin; n0 < n_end; n0 += C::TT) {
        // The next tile's loads are issued before the barrier, under the other warps' math on this one.
        T x[C::PER_TILE], r[C::PER_TILE], vv[C::PER_TILE];
        la_features<T, DP, true>(qk, table, p, b, h, 1, n0, n_end, x, r);
        la_rows<T, DP>(v, p, b, h, n0, n_end, vv);
        __syncthreads();  // the previous tile is consumed
#pragma unroll
        for (int j = 0; j < C::PER_TILE; ++j) {
            const int t = row0 + j * C::ROWS;
            skr[t * DP + col] = r[j];
            sv[t * DP + col] = vv[j];
            ksum += x[j];
        }
        __syncthreads();
#pragma unroll 4
        for (int t = 0; t < C::TT; ++t) {
            const T ve = sv[t * DP + col];
            const T* kr = skr + t * DP + row0 * C::PER_MAT;
            if constexpr (C::PER_MAT % VW == 0) {
#pragma unroll
                for (int j = 0; j < C::PER_MAT; j += VW) {
                    T k4[VW];
                    la_ld16(kr + j, k4);
#pragma unroll
                    for (int u = 0; u < VW; ++u) acc[j + u] += k4[u] * ve;
                }
            } else {
#pragma unroll
                for (int j = 0; j < C::PER_MAT; ++j) acc[j] += kr[j] * ve;
            }
        }
    }
    __syncthreads();  // sv is free
    const T ktotal = la_column_total<T, DP>(ksum, sv);
    const long long d = p.d, slot = bh * p.slices + s;
    if (col < d) {
#pragma unroll
        for (int j = 0; j < C::PER_MAT; ++j) {
            const int i = row0 * C::PER_MAT + j;
            if (i < d) part_kv[(slot * d + i) * d + col] = acc[j];
        }
    }
    if (threadIdx.x < d) part_ks[slot * d + threadIdx.x] = ktotal;
}

template <typename T, int DP>
__device__ void la_fwd_out(LinAttnParams p, const T* qk, const T* table, const T* part_kv, const T* part_ks,
                           T* kv, T* kmean, T* out) {
    using C = LaCfg<T, DP>;
    __shared__ __align__(16) T skv[DP * DP], skm[DP], sqr[C::TILE], scratch[LaScratch<T, DP>::ELEMS];
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
    const T kmc = skm[col];
    const T eps = T(p.eps);
    for (long long n0 = n_begin; n0 < n_end; n0 += C::TT) {
        // q and q~ of the thread's tokens; q . kmean per token summed across the row's lanes (all warps busy,
        // no shared-memory pass).
        T x[C::PER_TILE], r[C::PER_TILE], dot[C::PER_TILE];
        la_features<T, DP, true>(qk, table, p, b, h, 0, n0, n_end, x, r);
#pragma unroll
        for (int j = 0; j < C::PER_TILE; ++j) dot[j] = x[j] * kmc;
        la_row_sums<T, DP, C::PER_TILE>(dot, scratch);
        __syncthreads();  // the previous tile is consumed
#pragma unroll
        for (int j = 0; j < C::PER_TILE; ++j) sqr[(row0 + j * C::ROWS) * DP + col] = r[j];
        __syncthreads();
#pragma unroll
        for (int j = 0; j < C::PER_TILE; ++j) {
            const int t = row0 + j * C::ROWS;
            const long long n = n0 + t;
            const T o = la_dot_row<T, DP>(sqr + t * DP, kvc);
            const T z = T(1) / (dot[j] + eps);
            if (n < n_end && col < d) out[(b * p.tokens + n) * p.channels + h * d + col] = o * z;
        }
    }
}

// ---- backward ---------------------------------------------------------------------------------------------

template <typename T, int DP>
__device__ void la_bwd_reduce(LinAttnParams p, const T* qk, const T* table, const T* kv, const T* kmean,
                              const T* g, T* part_dkv, T* part_dkm, T* ds) {
    using C = LaCfg<T, DP>;
    constexpr int VW = LaVec<T>::VW;
    __shared__ __align__(16) T sqr[C::TILE], sdg[C::TILE], scratch[2 * LaScratch<T, DP>::ELEMS];
    const long long bh = blockIdx.x / p.slices, s = blockIdx.x % p.slices;
    const long long b = bh / p.heads, h = bh % p.heads;
    const long long n_begin = s * p.span, n_end = min(p.tokens, n_begin + p.span);
    const long long d = p.d;
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
    const T kmc = col < d ? kmean[b * p.channels + h * d + col] : T(0);
    T kvc[DP];  // column col of kv
#pragma unroll
    for (int i = 0; i < DP; ++i) kvc[i] = (i < d && col < d) ? kv[(bh * d + i) * d + col] : T(0);
    T acc[C::PER_MAT];  // rows row0 PER_MAT .. + PER_MAT of dkv's column col
#pragma unroll
    for (int j = 0; j < C::PER_MAT; ++j) acc[j] = T(0);
    T dkm = T(0);  // column col over this thread's tokens
    const T eps = T(p.eps);
    for (long long n0 = n_begin; n0 < n_end; n0 += C::TT) {
        T x[C::PER_TILE], r[C::PER_TILE], gv[C::PER_TILE];
        la_features<T, DP, true>(qk, table, p, b, h, 0, n0, n_end, x, r);
        la_rows<T, DP>(g, p, b, h, n0, n_end, gv);
        __syncthreads();  // the previous tile is consumed
#pragma unroll
        for (int j = 0; j < C::PER_TILE; ++j) sqr[(row0 + j * C::ROWS) * DP + col] = r[j];
        __syncthreads();
        // o = q~ kv per element; per token G . o and q . kmean across the row's lanes.
        T sums[2 * C::PER_TILE];
#pragma unroll
        for (int j = 0; j < C::PER_TILE; ++j) {
            const int t = row0 + j * C::ROWS;
            sums[j] = gv[j] * la_dot_row<T, DP>(sqr + t * DP, kvc);
            sums[C::PER_TILE + j] = x[j] * kmc;
        }
        la_row_sums<T, DP, 2 * C::PER_TILE>(sums, scratch);
#pragma unroll
        for (int j = 0; j < C::PER_TILE; ++j) {
            const int t = row0 + j * C::ROWS;
            const long long n = n0 + t;
            const T z = T(1) / (sums[C::PER_TILE + j] + eps);
            const T dsv = -(sums[j] * z * z);
            if (col == 0 && n < n_end) ds[bh * p.tokens + n] = dsv;
            sdg[t * DP + col] = gv[j] * z;  // dout = z G
            dkm += dsv * x[j];
        }
        __syncthreads();
#pragma unroll 4
        for (int t = 0; t < C::TT; ++t) {
            const T de = sdg[t * DP + col];
            const T* qr = sqr + t * DP + row0 * C::PER_MAT;
            if constexpr (C::PER_MAT % VW == 0) {
#pragma unroll
                for (int j = 0; j < C::PER_MAT; j += VW) {
                    T q4[VW];
                    la_ld16(qr + j, q4);
#pragma unroll
                    for (int u = 0; u < VW; ++u) acc[j + u] += q4[u] * de;
                }
            } else {
#pragma unroll
                for (int j = 0; j < C::PER_MAT; ++j) acc[j] += qr[j] * de;
            }
        }
    }
    __syncthreads();  // sdg is free
    const T dkm_total = la_column_total<T, DP>(dkm, sdg);
    const long long slot = bh * p.slices + s;
    if (col < d) {
#pragma unroll
        for (int j = 0; j < C::PER_MAT; ++j) {
            const int i = row0 * C::PER_MAT + j;
            if (i < d) part_dkv[(slot * d + i) * d + col] = acc[j];
        }
    }
    if (threadIdx.x < d) part_dkm[slot * d + threadIdx.x] = dkm_total;
}

// Shared memory of la_bwd_tokens_split, in elements of T: the larger of its two roles.
template <typename T, int DP> struct LaBwdTokensSmem {
    using C = LaCfg<T, DP>;
    // Role 0: the tile G, the row-sum scratch.
    static constexpr int Q = C::TILE + LaScratch<T, DP>::ELEMS;
    // Role 1: dkv with rows padded to DP + 1 (column reads without bank conflicts), dkmean, the tiles k~
    // and v (at DP (DP + 2) elements: 16-byte aligned).
    static constexpr int K = DP * (DP + 1) + DP + 2 * C::TILE;
    static constexpr int ELEMS = Q > K ? Q : K;
};

// The two-role token pass, for the widths whose tiles do not fit la_bwd_tokens_tiled's layout (f32 DP 64,
// f64 DP 32 and 64): blockIdx.y 0 computes dq, 1 dk and dv, one element per thread and token.
template <typename T, int DP>
__device__ void la_bwd_tokens_split(LinAttnParams p, const T* qk, const T* v, const T* table, const T* kv, const T* kmean,
                              const T* g, const T* ds, const T* part_dkv, const T* part_dkm, T* dqk, T* dv) {
    using C = LaCfg<T, DP>;
    constexpr int VW = LaVec<T>::VW;
    __shared__ __align__(16) T smem[LaBwdTokensSmem<T, DP>::ELEMS];
    const long long bh = blockIdx.x / p.slices, s = blockIdx.x % p.slices;
    const long long b = bh / p.heads, h = bh % p.heads;
    const long long n_begin = s * p.span, n_end = min(p.tokens, n_begin + p.span);
    const long long d = p.d, c2 = 2 * p.channels;
    const T inv_n = T(p.inv_n);
    const int col = threadIdx.x % DP, row0 = threadIdx.x / DP;
    const long long c = h * d + col;  // this thread's channel
    const unsigned w = (unsigned)p.grid_w;
    if (blockIdx.y == 0) {
        // dq = R^T (z G kv^T) + ds kmean, times phi'(.) = min(q, 1).
        T* sg = smem;
        T* scratch = sg + C::TILE;
        const T kmc = col < d ? kmean[b * p.channels + c] : T(0);
        const T eps = T(p.eps);
        T kvr[DP];  // row col of kv
#pragma unroll
        for (int e = 0; e < DP; ++e) kvr[e] = (e < d && col < d) ? kv[(bh * d + col) * d + e] : T(0);
        for (long long n0 = n_begin; n0 < n_end; n0 += C::TT) {
            T x[C::PER_TILE], unused[C::PER_TILE], gv[C::PER_TILE], dsv[C::PER_TILE], dot[C::PER_TILE];
            la_features<T, DP, false>(qk, table, p, b, h, 0, n0, n_end, x, unused);
            la_rows<T, DP>(g, p, b, h, n0, n_end, gv);
#pragma unroll
            for (int j = 0; j < C::PER_TILE; ++j) {
                const long long n = n0 + row0 + j * C::ROWS;
                dsv[j] = n < n_end ? ds[bh * p.tokens + n] : T(0);
                dot[j] = x[j] * kmc;
            }
            la_row_sums<T, DP, C::PER_TILE>(dot, scratch);
            __syncthreads();  // the previous tile is consumed
#pragma unroll
            for (int j = 0; j < C::PER_TILE; ++j) sg[(row0 + j * C::ROWS) * DP + col] = gv[j];
            __syncthreads();
            LaPos pos(p, c, n0 + row0);
#pragma unroll
            for (int j = 0; j < C::PER_TILE; ++j) {
                const int t = row0 + j * C::ROWS;
                const long long n = n0 + t;
                const T own = la_dot_row<T, DP>(sg + t * DP, kvr) * (T(1) / (dot[j] + eps));
                const T partner = la_partner(own);
                if (n < n_end && col < d) {
                    const LaCS<T> e = pos.angle(table, p);
                    const T back = la_unrotate(c, own, partner, e.c, e.s);
                    const T q = x[j];
                    dqk[(b * p.tokens + n) * c2 + c] = (back + dsv[j] * kmc) * (q < T(1) ? q : T(1));
                }
                pos.advance(C::ROWS, w);
            }
        }
    } else {
        // dk = R^T ((1/N) v dkv^T) + dkmean / N, times min(k, 1); dv = (1/N) k~ dkv.
        constexpr int LD = DP + 1;
        T* sdkv = smem;
        T* sdkm = sdkv + DP * LD;
        T* skr = sdkm + DP;
        T* sv = skr + C::TILE;
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
        const T dkm_n = sdkm[col] * inv_n;
        for (long long n0 = n_begin; n0 < n_end; n0 += C::TT) {
            T x[C::PER_TILE], r[C::PER_TILE], vv[C::PER_TILE];
            la_features<T, DP, true>(qk, table, p, b, h, 1, n0, n_end, x, r);
            la_rows<T, DP>(v, p, b, h, n0, n_end, vv);
            __syncthreads();  // the previous tile is consumed
#pragma unroll
            for (int j = 0; j < C::PER_TILE; ++j) {
                const int t = row0 + j * C::ROWS;
                skr[t * DP + col] = r[j];
                sv[t * DP + col] = vv[j];
            }
            __syncthreads();
            LaPos pos(p, c, n0 + row0);
#pragma unroll
            for (int j = 0; j < C::PER_TILE; ++j) {
                const int t = row0 + j * C::ROWS;
                const long long n = n0 + t;
                const bool live = n < n_end && col < d;
                const T dkr = la_dot_row<T, DP>(sv + t * DP, dkvr);
                T dvv = T(0);
#pragma unroll
                for (int e = 0; e < DP; e += VW) {
                    T k4[VW];
                    la_ld16(skr + t * DP + e, k4);
#pragma unroll
                    for (int u = 0; u < VW; ++u) dvv += k4[u] * sdkv[(e + u) * LD + col];
                }
                if (live) dv[(b * p.tokens + n) * p.channels + c] = dvv * inv_n;
                const T own = dkr * inv_n;
                const T partner = la_partner(own);
                if (live) {
                    const LaCS<T> e = pos.angle(table, p);
                    const T back = la_unrotate(c, own, partner, e.c, e.s);
                    const T k = x[j];
                    dqk[(b * p.tokens + n) * c2 + p.channels + c] = (back + dkm_n) * (k < T(1) ? k : T(1));
                }
                pos.advance(C::ROWS, w);
            }
        }
    }
}

// ---- backward token pass, tiled --------------------------------------------------------------------------
//
// One block computes all three products for its tokens (a grid of one block a slice), a tile of TT tokens at
// a time, as small matrix products with the d x d matrices in shared memory:
//
//   dq~ = (z G) kv^T,   dk~ = v dkv^T / N,   dv = k~ dkv / N
//
// Thread t owns the 4 channels c0 = 4 (t % CG) .. c0 + 3 (two whole RoPE pairs) of the TM consecutive tokens
// TM (t / CG) .. + TM of the tile. So its global loads and stores are 4 channels wide (16 bytes in f32 when
// d % 4 == 0), it rotates and unrotates its pairs without other threads, and in each product it keeps its
// TM x 4 block of the result in registers: per reduction index e, one TM-wide shared load of the transposed
// operand tile [e][token] (a broadcast over the CG threads of a token) and one 4-wide load of the matrix row
// [e][c0 ..] feed 4 TM FMAs (was: 1 FMA a shared load for dv, 4 for dk and dq). q . kmean is a butterfly over
// the CG lanes of a token. Padded channels are zeros; tokens past the slice are loaded as the slice's last
// token (no branch around the loads) and never stored.
template <typename T, int DP> struct LaTok {
    static constexpr int NT = LaCfg<T, DP>::NT;
    static constexpr int CG = DP / 4;                  // threads a token
    static constexpr int TM = sizeof(T) == 4 ? 2 : 1;  // tokens a thread
    static constexpr int TT = NT / CG * TM;            // tokens a tile
    // Row stride of the transposed tiles: padded by TM (keeps TM-element alignment; with f32 DP 32 a warp's
    // transposing stores then hit every bank equally often).
    static constexpr int LDA = TT + TM;
    static constexpr int TILE = DP * LDA;
    // Three tiles (z G, v, k~) and three matrices (kv^T, dkv^T, dkv).
    static constexpr int ELEMS = 3 * TILE + 3 * DP * DP;
    // Mirrored by cuda.rs `tiled_tokens`: f32 DP <= 32, f64 DP <= 16.
    static constexpr bool TILED = ELEMS * (int)sizeof(T) <= 48 * 1024;
    static_assert(TILE * sizeof(T) % 16 == 0, "the tiles and matrices must stay 16-byte aligned");
    static_assert(NT % CG == 0, "a token's threads must not straddle blocks");
};

#ifndef LA_CHECK_ALIGNED
#define LA_CHECK_ALIGNED(ptr, bytes)
#endif

// Two consecutive elements (one RoPE pair, 8- or 16-byte aligned) of global memory; zeros when !live.
template <typename T> __device__ __forceinline__ void la_ld2(const T* ptr, bool live, T& a, T& b) {
    LA_CHECK_ALIGNED(ptr, 2 * sizeof(T));
    if constexpr (sizeof(T) == 4) {
        const float2 v = live ? *reinterpret_cast<const float2*>(ptr) : make_float2(0.f, 0.f);
        a = v.x;
        b = v.y;
    } else {
        const double2 v = live ? *reinterpret_cast<const double2*>(ptr) : make_double2(0.0, 0.0);
        a = v.x;
        b = v.y;
    }
}

// Channels c0 .. c0 + 3 of a token: the pairs live0 (c0 < d) and live1 (c0 + 2 < d), zeros elsewhere. With
// vec4 (d % 4 == 0: the address is 16-byte aligned and the two pairs live or dead together) f32 takes one
// 16-byte load.
template <typename T>
__device__ __forceinline__ void la_ld4(const T* ptr, bool vec4, bool live0, bool live1, T (&x)[4]) {
    if constexpr (sizeof(T) == 4) {
        if (vec4) {
            LA_CHECK_ALIGNED(ptr, 16);
            const float4 v = live0 ? *reinterpret_cast<const float4*>(ptr) : make_float4(0.f, 0.f, 0.f, 0.f);
            x[0] = v.x;
            x[1] = v.y;
            x[2] = v.z;
            x[3] = v.w;
            return;
        }
    }
    la_ld2(ptr, live0, x[0], x[1]);
    la_ld2(ptr + 2, live1, x[2], x[3]);
}

// Stores what la_ld4 loads.
template <typename T>
__device__ __forceinline__ void la_st4(T* ptr, bool vec4, bool live0, bool live1, const T (&x)[4]) {
    if constexpr (sizeof(T) == 4) {
        if (vec4) {
            LA_CHECK_ALIGNED(ptr, 16);
            if (live0) *reinterpret_cast<float4*>(ptr) = make_float4(x[0], x[1], x[2], x[3]);
            return;
        }
        LA_CHECK_ALIGNED(ptr, 8);
        if (live0) *reinterpret_cast<float2*>(ptr) = make_float2(x[0], x[1]);
        if (live1) *reinterpret_cast<float2*>(ptr + 2) = make_float2(x[2], x[3]);
    } else {
        LA_CHECK_ALIGNED(ptr, 16);
        if (live0) *reinterpret_cast<double2*>(ptr) = make_double2(x[0], x[1]);
        if (live1) *reinterpret_cast<double2*>(ptr + 2) = make_double2(x[2], x[3]);
    }
}

// N consecutive elements of shared memory (N = 1, or 2 as one 8-byte f32 load), N-element aligned.
template <typename T, int N> __device__ __forceinline__ void la_lds(const T* ptr, T (&x)[N]) {
    if constexpr (N == 2 && sizeof(T) == 4) {
        LA_CHECK_ALIGNED(ptr, 8);
        const float2 v = *reinterpret_cast<const float2*>(ptr);
        x[0] = v.x;
        x[1] = v.y;
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) x[i] = ptr[i];
    }
}

// Stores what la_lds loads.
template <typename T, int N> __device__ __forceinline__ void la_sts(T* ptr, const T (&x)[N]) {
    if constexpr (N == 2 && sizeof(T) == 4) {
        LA_CHECK_ALIGNED(ptr, 8);
        *reinterpret_cast<float2*>(ptr) = make_float2(x[0], x[1]);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) ptr[i] = x[i];
    }
}

// acc[m][u] = sum over e = 0 .. DP - 1, in order, of at[e][tok + m] m[e][c0 + u]: the thread's block of
// (tile rows) x (matrix), the tile stored transposed (row stride LDA), the matrix with rows of DP.
template <typename T, int DP>
__device__ __forceinline__ void la_tile_mm(const T* at, const T* mat, int tok, int c0,
                                           T (&acc)[LaTok<T, DP>::TM][4]) {
    using K = LaTok<T, DP>;
    constexpr int VW = LaVec<T>::VW;
#pragma unroll
    for (int m = 0; m < K::TM; ++m) {
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[m][u] = T(0);
    }
#pragma unroll
    for (int e = 0; e < DP; ++e) {
        T a[K::TM], w[4];
        la_lds<T, K::TM>(at + e * K::LDA + tok, a);
#pragma unroll
        for (int u = 0; u < 4; u += VW) {
            T q[VW];
            la_ld16(mat + e * DP + c0 + u, q);
#pragma unroll
            for (int i = 0; i < VW; ++i) w[u + i] = q[i];
        }
#pragma unroll
        for (int m = 0; m < K::TM; ++m) {
#pragma unroll
            for (int u = 0; u < 4; ++u) acc[m][u] += a[m] * w[u];
        }
    }
}

template <typename T, int DP>
__device__ void la_bwd_tokens_tiled(LinAttnParams p, const T* qk, const T* v, const T* table, const T* kv,
                                    const T* kmean, const T* g, const T* ds, const T* part_dkv,
                                    const T* part_dkm, T* dqk, T* dv) {
    using K = LaTok<T, DP>;
    constexpr int TM = K::TM, LDA = K::LDA;
    __shared__ __align__(16) T smem[K::ELEMS];
    T* sg = smem;               // (z G)^T: [channel][token], rows of LDA
    T* sv = sg + K::TILE;       // v^T
    T* sk = sv + K::TILE;       // k~^T
    T* skvt = sk + K::TILE;     // kv^T: [e][i]
    T* sdkvt = skvt + DP * DP;  // dkv^T
    T* sdkv = sdkvt + DP * DP;  // dkv: [i][e]
    const long long bh = blockIdx.x / p.slices, s = blockIdx.x % p.slices;
    const long long b = bh / p.heads, h = bh % p.heads;
    const long long n_begin = s * p.span, n_end = min(p.tokens, n_begin + p.span);
    const int d = (int)p.d;
    const long long C = p.channels, c2 = 2 * C;
    // The matrices, padded with zeros; dkv combines the slices' partial sums in slice order.
    for (int x = threadIdx.x; x < DP * DP; x += K::NT) {
        const int i = x / DP, e = x % DP;
        T a = T(0), m = T(0);
        if (i < d && e < d) {
            a = kv[(bh * d + i) * d + e];
            for (long long k = 0; k < p.slices; ++k) m += part_dkv[((bh * p.slices + k) * d + i) * d + e];
        }
        skvt[e * DP + i] = a;
        sdkvt[e * DP + i] = m;
        sdkv[i * DP + e] = m;
    }
    const int cg = threadIdx.x % K::CG, tok = (threadIdx.x / K::CG) * TM, c0 = 4 * cg;
    const bool live0 = c0 < d, live1 = c0 + 2 < d, vec4 = d % 4 == 0;
    const long long ch = h * d + c0;  // the thread's first channel
    const T inv_n = T(p.inv_n), eps = T(p.eps);
    T km[4], dkm[4];  // kmean, dkmean / N at the thread's channels
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const bool live = c0 + u < d;
        km[u] = live ? kmean[b * C + ch + u] : T(0);
        T val = T(0);
        if (live) {
            for (long long k = 0; k < p.slices; ++k) val += part_dkm[(bh * p.slices + k) * d + c0 + u];
        }
        dkm[u] = val * inv_n;
    }
    // RoPE: pair j (channels ch + 2 j, + 1) turns with table row gy when pair < C/4, else H + gx; its entry
    // is table[tbase[j] + (gy or gx) * 2 (C/4)].
    const long long quarter = C / 4, q2 = 2 * quarter;
    long long tbase[2];
    bool trow[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const long long pair = (ch >> 1) + j;
        trow[j] = pair < quarter;
        tbase[j] = trow[j] ? 2 * pair : p.grid_h * q2 + 2 * (pair - quarter);
    }
    const unsigned w = (unsigned)p.grid_w, ylast = (unsigned)p.grid_h - 1;
    for (long long n0 = n_begin; n0 < n_end; n0 += K::TT) {
        T xq[TM][4], xk[TM][4], gz[TM][4], vv[TM][4], dsv[TM];
        LaCS<T> cs[TM][2];
        long long row[TM];  // b N + the token (the slice's last one for tokens past it)
        bool live_n[TM];
        // 32-bit division: the host checks that N fits in an int.
        unsigned gy = (unsigned)(n0 + tok) / w, gx = (unsigned)(n0 + tok) - gy * w;
#pragma unroll
        for (int m = 0; m < TM; ++m) {
            const long long n = n0 + tok + m;
            live_n[m] = n < n_end;
            const long long nn = live_n[m] ? n : n_end - 1;
            row[m] = b * p.tokens + nn;
            T qraw[4], kraw[4];
            la_ld4(qk + row[m] * c2 + ch, vec4, live0, live1, qraw);
            la_ld4(qk + row[m] * c2 + C + ch, vec4, live0, live1, kraw);
            la_ld4(g + row[m] * C + ch, vec4, live0, live1, gz[m]);
            la_ld4(v + row[m] * C + ch, vec4, live0, live1, vv[m]);
            dsv[m] = ds[bh * p.tokens + nn];
            const unsigned ty = gy < ylast ? gy : ylast;  // tokens past the grid (never stored) stay in the table
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const bool live = j == 0 ? live0 : live1;
                const long long at = tbase[j] + (long long)(trow[j] ? ty : gx) * q2;
                cs[m][j] = live ? *reinterpret_cast<const LaCS<T>*>(table + at) : LaCS<T>{T(0), T(0)};
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const bool live = u < 2 ? live0 : live1;
                xq[m][u] = live ? la_phi(qraw[u]) : T(0);
                xk[m][u] = live ? la_phi(kraw[u]) : T(0);
            }
            if (++gx == w) {
                gx = 0;
                ++gy;
            }
        }
        // z = 1 / (q . kmean + eps) per token: the thread's 4 channels, then a butterfly over the token's lanes.
        T kr[TM][4];
#pragma unroll
        for (int m = 0; m < TM; ++m) {
            T dot = xq[m][0] * km[0] + xq[m][1] * km[1] + xq[m][2] * km[2] + xq[m][3] * km[3];
#pragma unroll
            for (int o = 1; o < K::CG; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            const T z = T(1) / (dot + eps);
#pragma unroll
            for (int u = 0; u < 4; ++u) gz[m][u] *= z;  // dout = z G
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const T re = xk[m][2 * j], im = xk[m][2 * j + 1], c = cs[m][j].c, sn = cs[m][j].s;
                kr[m][2 * j] = re * c - im * sn;
                kr[m][2 * j + 1] = re * sn + im * c;
            }
        }
        __syncthreads();  // the previous tile's products are done
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            T a[TM], bq[TM], cq[TM];
#pragma unroll
            for (int m = 0; m < TM; ++m) {
                a[m] = gz[m][u];
                bq[m] = vv[m][u];
                cq[m] = kr[m][u];
            }
            la_sts<T, TM>(sg + (c0 + u) * LDA + tok, a);
            la_sts<T, TM>(sv + (c0 + u) * LDA + tok, bq);
            la_sts<T, TM>(sk + (c0 + u) * LDA + tok, cq);
        }
        __syncthreads();
        T acc[TM][4], o[4];
        // dq = (R^T dq~ + ds kmean) min(q, 1); R^T on a pair (re, im): (re c + im s, im c - re s).
        la_tile_mm<T, DP>(sg, skvt, tok, c0, acc);
#pragma unroll
        for (int m = 0; m < TM; ++m) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const T re = acc[m][2 * j], im = acc[m][2 * j + 1], c = cs[m][j].c, sn = cs[m][j].s;
                const T back[2] = {re * c + im * sn, im * c - re * sn};
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const int u = 2 * j + i;
                    const T q = xq[m][u];
                    o[u] = (back[i] + dsv[m] * km[u]) * (q < T(1) ? q : T(1));
                }
            }
            if (live_n[m]) la_st4(dqk + row[m] * c2 + ch, vec4, live0, live1, o);
        }
        // dk = (R^T dk~ / N + dkmean / N) min(k, 1)
        la_tile_mm<T, DP>(sv, sdkvt, tok, c0, acc);
#pragma unroll
        for (int m = 0; m < TM; ++m) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const T re = acc[m][2 * j] * inv_n, im = acc[m][2 * j + 1] * inv_n;
                const T c = cs[m][j].c, sn = cs[m][j].s;
                const T back[2] = {re * c + im * sn, im * c - re * sn};
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const int u = 2 * j + i;
                    const T k = xk[m][u];
                    o[u] = (back[i] + dkm[u]) * (k < T(1) ? k : T(1));
                }
            }
            if (live_n[m]) la_st4(dqk + row[m] * c2 + C + ch, vec4, live0, live1, o);
        }
        // dv = k~ dkv / N
        la_tile_mm<T, DP>(sk, sdkv, tok, c0, acc);
#pragma unroll
        for (int m = 0; m < TM; ++m) {
#pragma unroll
            for (int u = 0; u < 4; ++u) o[u] = acc[m][u] * inv_n;
            if (live_n[m]) la_st4(dv + row[m] * C + ch, vec4, live0, live1, o);
        }
    }
}

template <typename T, int DP>
__device__ __forceinline__ void la_bwd_tokens(LinAttnParams p, const T* qk, const T* v, const T* table, const T* kv,
                                              const T* kmean, const T* g, const T* ds, const T* part_dkv,
                                              const T* part_dkm, T* dqk, T* dv) {
    if constexpr (LaTok<T, DP>::TILED) {
        la_bwd_tokens_tiled<T, DP>(p, qk, v, table, kv, kmean, g, ds, part_dkv, part_dkm, dqk, dv);
    } else {
        la_bwd_tokens_split<T, DP>(p, qk, v, table, kv, kmean, g, ds, part_dkv, part_dkm, dqk, dv);
    }
}

#define LA_KERNELS(T, S, DP)                                                                                     \
    extern "C" __global__ void __launch_bounds__(LaCfg<T, DP>::NT, LaCfg<T, DP>::MIN_FWD_REDUCE)                     \
        linattn_fwd_reduce_d##DP##_##S(LinAttnParams p, const T* qk, const T* v, const T* table, T* part_kv,    \
                                       T* part_ks) {                                                             \
        la_fwd_reduce<T, DP>(p, qk, v, table, part_kv, part_ks);                                                \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(LaCfg<T, DP>::NT, LaCfg<T, DP>::MIN_FWD_OUT)                     \
        linattn_fwd_out_d##DP##_##S(LinAttnParams p, const T* qk, const T* table, const T* part_kv,             \
                                    const T* part_ks, T* kv, T* kmean, T* out) {                                 \
        la_fwd_out<T, DP>(p, qk, table, part_kv, part_ks, kv, kmean, out);                                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(LaCfg<T, DP>::NT, LaCfg<T, DP>::MIN_BWD_REDUCE)                     \
        linattn_bwd_reduce_d##DP##_##S(LinAttnParams p, const T* qk, const T* table, const T* kv,               \
                                       const T* kmean, const T* g, T* part_dkv, T* part_dkm, T* ds) {           \
        la_bwd_reduce<T, DP>(p, qk, table, kv, kmean, g, part_dkv, part_dkm, ds);                               \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(LaCfg<T, DP>::NT, LaCfg<T, DP>::MIN_BWD_TOKENS)        \
        linattn_bwd_tokens_d##DP##_##S(              \
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
