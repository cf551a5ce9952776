// The selective scan (ops/src/scan/mod.rs has the math; cuda.rs the launch planning).
//
// Work and bytes, per pass, with E = B*C*S*L state updates (f32):
//   forward  bytes 4 (4 BCL + 2 BSL + CS + 2C) + the saved chunk states 4 BCL S / chunk;
//            one exp per update, plus a softplus and a sigmoid per (b, c, t)
//   backward bytes 4 (7 BCL + 4 BSL + 2CS + 4C) + the saved states + the dB/dC partials 2 * 4 B NG S L
//            (written, then read by scan_bwd_sum); two exps per update (the tile pass and the recompute)
// At (B 64, C 384, L 3136, S 16): E = 1.23e9 updates = 3.85e7 warp-updates of 32, 72.9k per SM sub-partition.
//   forward (scan3, SASS of NVRTC 13.1 sm_90, per warp-update = per thread state update): the recurrence
//     6.1 instructions (per 4 steps x 4 states: 16 FMUL dt A, 16 MUFU.EX2, 16 FMUL dt u B, 16 FFMA h, 16 FFMA
//     y, 10 LDS.128, 1 STS.128), the dt/softplus pass ~2.2, the output pass ~1.4, the B/C copy ~0.8, saved
//     states and loop ~0.3: ~10.8 (was ~22.6 measured), 0.40 ms of issue at the first size; MUFU 1.25 a
//     update (16/clk/SM: 0.36 ms); bytes 1.26 GB + 0.15 GB of states = 0.34 ms at 4178 GB/s. NOTES.md has
//     the predictions.
//   backward: 2.2 GB + 0.15 GB states + 0.62 GB partials (12 groups) = 1.0 ms at copy speed. f32 S 9 .. 16
//     runs scan_bwd4 (SASS of NVRTC 13.5 sm_90, per warp-update, scan5): forward pass over the tile 5.2, a
//     turn of recompute + reverse + reductions + the block's dB/dC partial ~21.7 (~347 per 4 steps x 4
//     states), the (c, t) gradients after the tile ~2.3, gate and B/C passes ~3.6: ~33 -> 1.2 ms at full
//     issue (scan4, the (c, t) gradients inside the turn: ~37.5, measured 1.52e9 instructions, 3.3 ms);
//     MUFU ~2.5 a update (0.73 ms). The other instantiations (scan_bwd) ~38.5 with 3 blocks a SM and shuffle
//     chains; measured (H200, s4l4 before scan_bwd4) 4.80 ms = 30 % of issue. NOTES.md has the analysis and
//     predictions.
//
// Layout of a block: 32 * warps threads = G channels of one batch b x `lpc` lanes per channel; lane `grp` of
// a channel owns the SPL states n = grp * SPL + k (k < SPL; states past S are padding with A = B = C = 0,
// which stay 0). Every thread walks time sequentially, so a state's recurrence h = exp(dt A) h + dt B u is
// a chain of FMAs in registers with SPL independent chains per thread and no scan across threads. Time goes
// in tiles of `chunk` steps (the chunk of the saved states): per tile the block
//   1. loads the per-(c, t) inputs of its G channels coalesced along time and computes each (c, t)'s gates
//      once into shared memory; B and C of batch b are read by all G channels as 16-byte broadcasts;
//   2. runs the recurrence (forward: each lane's partial y = sum of its states' C h into its own row of
//      shared memory, summed over the channel's lanes by the output pass; backward: see below);
//   3. writes the per-(c, t) results back coalesced along time.
// The forward's layout and passes are described at scan_fwd; the backward's at scan_bwd.
//
// Backward (per tile, last to first): the state entering the tile is the forward's saved one; a forward pass
// over the tile keeps the state every TH steps in shared memory; then per sub-chunk of TH steps (last to
// first) the states and decays are recomputed into registers and the reverse recurrence
// gh[t] = C[t] gy[t] + exp(dt[t+1] A) gh[t+1] runs over them. Reductions, all in fixed orders (the engine is
// deterministic; no float atomics):
//   - over states (du, ddelta, y for dz): shuffles across the channel's lanes;
//   - over channels (dB, dC): a reduce-scatter with shuffles across the warp's channels, then the block's
//     warps in order in shared memory, written per block as a partial (B, NG, 2, S, L); scan_bwd_sum adds
//     the NG channel groups in order;
//   - over (batch, time) (dA, dD, ddelta_bias): per thread (dA) or per channel in shared memory (dD,
//     ddelta_bias) over the tiles, written per batch, summed over batches in order by scan_bwd_sum.

// Mirrors ops::scan::cuda::ScanParams (#[repr(C)]) field for field. Every tensor is contiguous:
// u, delta, z, out and their gradients (B, C, L); Bm, Cm, dB, dC (B, S, L); A (C, S); D, delta_bias (C);
// saved (B, C, n_chunks, S).
struct ScanParams {
    long long batch;     // B
    long long channels;  // C
    long long length;    // L
    long long states;    // S
    long long chunk;     // steps per tile and between saved states, a multiple of 8
    long long n_chunks;  // ceil(L / chunk)
    long long groups;    // NG: blocks per batch, ceil(C / G)
    int lpc;             // lanes per channel, a power of two <= 32
    int np;              // padded states, lpc * SPL
    int has_d;
    int has_z;
    int has_delta_bias;
    int delta_softplus;
    int pad0;
    int pad1;
};

static_assert(sizeof(ScanParams) == 88, "ScanParams must match ops::scan::cuda::ScanParams");

// Four elements loaded or stored as one 16-byte (f32) access.
template <typename T> struct __align__(4 * sizeof(T)) ScanV4 {
    T x, y, z, w;
};

// 2^x as one MUFU.EX2 (ex2.approx.ftz: ~2 ulp, subnormal results flushed to 0). exp2f would add a range
// check and two predicated multiplies per call for subnormal results, which a decay never needs. The
// emulator (emu/) defines SCAN_EX2 as exp2f.
#ifndef SCAN_EX2
__device__ __forceinline__ float scan_ex2_approx(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
#define SCAN_EX2(x) scan_ex2_approx(x)
#endif

// exp(x) for x = dt * (A * scale): f32 uses exp2 with A pre-scaled by log2(e) (one MUFU.EX2); f64 is exact.
template <typename T> struct ScanExp;
template <> struct ScanExp<float> {
    static __device__ __forceinline__ float scale() { return 1.4426950408889634f; }
    static __device__ __forceinline__ float exp(float x) { return SCAN_EX2(x); }
};
template <> struct ScanExp<double> {
    static __device__ __forceinline__ double scale() { return 1.0; }
    static __device__ __forceinline__ double exp(double x) { return m_exp(x); }
};

// Steps recomputed into registers at a time in the backward: 32 registers of states and 32 of decays.
template <typename T, int SPL> struct ScanShape {
    static constexpr int TH = (32 / SPL) * 4 / (int)sizeof(T);
    // Halving levels of the reduce-scatter of a thread's 2 SPL values (dB, dC of its states).
    static constexpr int HALVINGS = SPL == 4 ? 3 : 4;
};

// The per-(c, t) gates: PyTorch's softplus (threshold 20) and its derivative (as in scan/cpu.rs), the sigmoid
// of z. f64 (the gradient-check dtype) is exact; f32 takes the exps from MUFU.EX2 (__expf) and the divisions
// from MUFU.RCP (__fdividef), as Mamba's kernels built with --use_fast_math do, and keeps log1pf. The exact
// forms cost ~100 instructions per (c, t) (expf, log1pf, two IEEE divisions with their slow paths), more
// than the 16 state updates they feed.
template <typename T> struct ScanGate {
    static __device__ __forceinline__ T softplus(T x) { return x > T(20) ? x : m_log1p(m_exp(x)); }
    static __device__ __forceinline__ T softplus_grad(T x) { return x > T(20) ? T(1) : m_sigmoid(x); }
    static __device__ __forceinline__ T sigmoid(T x) { return m_sigmoid(x); }
};
template <> struct ScanGate<float> {
    // max(x, 0) + log1p(exp(-|x|)) (= PyTorch's form below its threshold 20, and x to the last bit past it), the
    // log1p as 2 atanh(s) with s = e / (2 + e) in [0, 1/3]: the odd series to s^13 (truncation < 2e-9
    // relative), so ~15 instructions, two of them MUFU, and no branches; log1pf took ~30 behind branches.
    static __device__ __forceinline__ float softplus(float x) {
        const float e = SCAN_EX2(-fabsf(x) * 1.4426950408889634f);  // exp(-|x|), 0 past -87 (ftz)
        const float s = __fdividef(e, 2.f + e), s2 = s * s;
        float q = 1.f / 13.f;
        q = fmaf(q, s2, 1.f / 11.f);
        q = fmaf(q, s2, 1.f / 9.f);
        q = fmaf(q, s2, 1.f / 7.f);
        q = fmaf(q, s2, 1.f / 5.f);
        q = fmaf(q, s2, 1.f / 3.f);
        q = fmaf(q, s2, 1.f);
        return fmaf(s + s, q, fmaxf(x, 0.f));
    }
    // e / (1 + e) with e = exp(x): 1 past the threshold, and 0 where e underflows.
    static __device__ __forceinline__ float softplus_grad(float x) {
        return x > 20.f ? 1.f : __fdividef(1.f, 1.f + SCAN_EX2(-x * 1.4426950408889634f));
    }
    // 1 / (1 + exp(-x)); exp(-x) = inf (x < -88) gives 0: __fdividef(1, inf) = 0. The exp as one MUFU.EX2
    // (__expf adds a range check and two predicated multiplies for subnormal results).
    static __device__ __forceinline__ float sigmoid(float x) {
        return __fdividef(1.f, 1.f + SCAN_EX2(-x * 1.4426950408889634f));
    }
};

template <typename T> __device__ __forceinline__ T scan_shfl_xor(T v, int o) {
    return __shfl_xor_sync(0xffffffffu, v, o);
}

// Sum over the `lpc` lanes of one channel (xor offsets below lpc stay inside the aligned group); every lane
// of the group gets the same bits.
template <typename T> __device__ __forceinline__ T scan_group_sum(T v, int lpc) {
    for (int o = 1; o < lpc; o <<= 1) v += scan_shfl_xor(v, o);
    return v;
}

// The emulator (emu/) checks the alignment of every vector access; the GPU faults on a misaligned one.
#ifndef SCAN_CHECK_ALIGNED
#define SCAN_CHECK_ALIGNED(ptr, bytes)
#endif

template <typename T, int N> __device__ __forceinline__ void scan_load(T (&dst)[N], const T* src) {
    static_assert(N % 4 == 0, "vector loads of 4");
    SCAN_CHECK_ALIGNED(src, 4 * sizeof(T));
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        const ScanV4<T> v = *reinterpret_cast<const ScanV4<T>*>(src + j);
        dst[j] = v.x;
        dst[j + 1] = v.y;
        dst[j + 2] = v.z;
        dst[j + 3] = v.w;
    }
}

template <typename T, int N> __device__ __forceinline__ void scan_store(T* dst, const T (&src)[N]) {
    static_assert(N % 4 == 0, "vector stores of 4");
    SCAN_CHECK_ALIGNED(dst, 4 * sizeof(T));
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        ScanV4<T> v;
        v.x = src[j];
        v.y = src[j + 1];
        v.z = src[j + 2];
        v.w = src[j + 3];
        *reinterpret_cast<ScanV4<T>*>(dst + j) = v;
    }
}

// A 16-byte global store of 4 f32 (st.global.v4: the output pass's vector store otherwise became four
// scalar stores, merged by the compiler with the scalar tail path); other types through scan_store.
template <typename T> __device__ __forceinline__ void scan_store_global(T* dst, const T (&src)[4]) {
    scan_store(dst, src);
}
#ifdef __CUDACC_RTC__
template <> __device__ __forceinline__ void scan_store_global<float>(float* dst, const float (&src)[4]) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(src[0]), "f"(src[1]), "f"(src[2]),
                 "f"(src[3])
                 : "memory");
}
#endif

// 4 consecutive elements of a row along time: one 16-byte access when `vec` (the row's vectors are whole),
// else the first n of them (n may exceed 4) as scalars, zeros loaded past n and nothing stored past n.
template <typename T> __device__ __forceinline__ void scan_load_tail(T (&dst)[4], const T* src, bool vec, int n) {
    if (vec) {
        scan_load(dst, src);
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = i < n ? src[i] : T(0);
    }
}

template <typename T> __device__ __forceinline__ void scan_store_tail(T* dst, const T (&src)[4], bool vec, int n) {
    if (vec) {
        scan_store_global(dst, src);
    } else {
        for (int i = 0; i < 4 && i < n; ++i) dst[i] = src[i];
    }
}

#ifndef SCAN_DYNAMIC_SMEM_BYTES
__device__ __forceinline__ unsigned scan_dynamic_smem_bytes() {
    unsigned r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}
#define SCAN_DYNAMIC_SMEM_BYTES() scan_dynamic_smem_bytes()
#endif

// Shared memory, in elements of T, regions rounded up to 32 bytes. cuda.rs mirrors these sizes
// (`forward_shared_bytes`, `backward_shared_bytes`); the kernels trap if the launch gave less.
__host__ __device__ inline long long scan_round(long long elems, int elem_bytes) {
    const long long per = 32 / elem_bytes;
    return (elems + per - 1) / per * per;
}

// The transposed B, C tile: BC[t * scan_bc_stride + which * np + n]; a multiple of 4 for vector loads.
__host__ __device__ inline int scan_bc_stride(int np) { return 2 * np + 4; }

// The forward's shared memory: rows of a fixed length, ROW = 128 bytes of steps (the longest tile) + 4
// elements of padding, so that every row offset in the recurrence is an immediate and the 16-byte accesses of
// consecutive rows fall in different banks. Regions (in rows): DT[ci] = dt of channel ci over the tile, DTU[ci]
// = dt u, BC[which np + k lpc + grp] = B (which 0) or C (which 1) of state n = grp SPL + k over the tile (the
// states of one k for consecutive lane groups in consecutive rows), Y[ci lpc + grp] = the lane group's
// partial sum over its states of C h, per step.
__host__ __device__ inline int scan_row(int elem_bytes) { return 128 / elem_bytes + 4; }

struct ScanFwdLayout {
    long long dt, dtu, bc, y, total;  // element offsets of the regions; total elements
};

__host__ __device__ inline ScanFwdLayout scan_fwd_layout(int g, int lpc, int np, int elem_bytes) {
    const long long row = scan_row(elem_bytes);
    ScanFwdLayout s;
    s.dt = 0;
    s.dtu = s.dt + g * row;
    s.bc = s.dtu + g * row;
    s.y = s.bc + 2LL * np * row;
    s.total = s.y + (long long)g * lpc * row;
    return s;
}

struct ScanBwdLayout {
    long long p4, e, bc, hs, q, dbc, acc, total;
};

__host__ __device__ inline ScanBwdLayout scan_bwd_layout(int tile, int g, int np, int warps, int spl, int th,
                                                        int elem_bytes) {
    ScanBwdLayout s;
    s.p4 = 0;
    s.e = s.p4 + scan_round(4LL * g * (tile + 1), elem_bytes);
    s.bc = s.e + scan_round(2LL * tile * (g + 1), elem_bytes);
    s.hs = s.bc + scan_round((long long)tile * scan_bc_stride(np), elem_bytes);
    s.q = s.hs + scan_round((long long)(tile / th) * 32 * warps * spl, elem_bytes);
    s.dbc = s.q + scan_round(3LL * g * (tile + 1), elem_bytes);
    s.acc = s.dbc + scan_round((long long)warps * tile * (2 * np + 1), elem_bytes);
    s.total = s.acc + scan_round(2LL * g, elem_bytes);
    return s;
}

#ifndef SCAN_SHARED_BASE
extern __shared__ __align__(32) unsigned char scan_smem[];
#define SCAN_SHARED_BASE() scan_smem
#endif

// Where a thread sits: batch b, first channel c0 of the block, its channel c (c < C when `valid`), its
// channel's index ci in the block, its lane group grp, and the channels per block G.
struct ScanThread {
    long long b, c0, c;
    int ci, grp, g, lane, warp, warps;
    bool valid;
};

__device__ __forceinline__ ScanThread scan_thread(const ScanParams& p, int lpc) {
    ScanThread th;
    const int threads = blockDim.x;
    th.g = threads / lpc;
    th.warps = threads >> 5;
    th.lane = threadIdx.x & 31;
    th.warp = threadIdx.x >> 5;
    th.ci = threadIdx.x / lpc;
    th.grp = threadIdx.x & (lpc - 1);
    th.b = blockIdx.x / p.groups;
    th.c0 = (blockIdx.x % p.groups) * th.g;
    th.c = th.c0 + th.ci;
    th.valid = th.c < p.channels;
    return th;
}

// The B, C tile of batch b for steps t0 .. t0 + tile, transposed, zero past S and past L: a warp per row
// (which, n), lanes along time (coalesced).
template <typename T>
__device__ __forceinline__ void scan_load_bc(const ScanParams& p, const ScanThread& th, long long t0, int len,
                                             int tile, const T* __restrict__ Bm, const T* __restrict__ Cm, T* bc) {
    const int stride = scan_bc_stride(p.np);
#pragma unroll 2
    for (int row = th.warp; row < 2 * p.np; row += th.warps) {
        const int which = row >= p.np ? 1 : 0, n = row - which * p.np;
        const T* src = (which ? Cm : Bm) + (th.b * p.states + n) * p.length + t0;
        for (int t = th.lane; t < tile; t += 32) bc[t * stride + row] = (n < p.states && t < len) ? src[t] : T(0);
    }
}

// A hint that the L2 fetch the line holding p (no registers, no wait; nothing in the emulator).
__device__ __forceinline__ void scan_prefetch_l2(const void* p) {
#ifdef __CUDACC_RTC__
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}

// A hint that the L2 fetch a row of a tile, len elements from src: its first and last element (at most two
// 128-byte lines).
template <typename T> __device__ __forceinline__ void scan_prefetch_row(const T* src, int len) {
    scan_prefetch_l2(src);
    scan_prefetch_l2(src + len - 1);
}

// Hints that the L2 fetch the forward's next tile (steps t .. t + len): the rows of u, delta and z of the
// block's G channels from c0 and the batch's B and C rows, a row a thread (~20 instructions a tile and thread).
// Pass 1, the B/C copy and the output pass then wait for L2 hits instead of DRAM.
template <typename T>
__device__ __forceinline__ void scan_prefetch_tile(const T* u, const T* delta, const T* z, const T* Bm,
                                                   const T* Cm, long long b, long long c0, int G, long long C,
                                                   long long S, long long L, long long t, int len, int tid,
                                                   int threads) {
    const long long rows = 3LL * G + 2 * S;
    for (long long r = tid; r < rows; r += threads) {
        const T* src;
        if (r < 3LL * G) {
            const int which = r < G ? 0 : r < 2 * G ? 1 : 2;
            const long long cc = c0 + r - (long long)which * G;
            const T* base = which == 0 ? u : which == 1 ? delta : z;
            if (cc >= C || base == nullptr) continue;
            src = base + (b * C + cc) * L + t;
        } else {
            const long long j = r - 3LL * G, which = j >= S, n = j - which * S;
            src = (which ? Cm : Bm) + (b * S + n) * L + t;
        }
        scan_prefetch_row(src, len);
    }
}

// Whether p suits a ScanV4 access (device allocations do; a host buffer in the emulator may not).
template <typename T> __device__ __forceinline__ bool scan_aligned(const T* p) {
    return (reinterpret_cast<unsigned long long>(p) & (4 * sizeof(T) - 1)) == 0;
}

// A thread's SPL states n0 .. n0 + SPL of channel row `row` (b C + c) at chunk kc of the saved states: one
// vector access per 4 states when SPL and S are multiples of 4 (then so is the offset) and the buffer is
// aligned, else one per state < S.
template <typename T, int SPL>
__device__ __forceinline__ void scan_save_states(const ScanParams& p, long long row, long long kc, int n0,
                                                 const T (&h)[SPL], T* __restrict__ saved) {
    T* dst = saved + (row * p.n_chunks + kc) * p.states + n0;
    if constexpr (SPL % 4 == 0) {
        if ((p.states & 3) == 0 && n0 + SPL <= p.states && scan_aligned(dst)) {
            scan_store(dst, h);
            return;
        }
    }
#pragma unroll
    for (int k = 0; k < SPL; ++k)
        if (n0 + k < p.states) dst[k] = h[k];
}

template <typename T, int SPL>
__device__ __forceinline__ void scan_load_states(const ScanParams& p, long long row, long long kc, int n0,
                                                 T (&h)[SPL], const T* __restrict__ saved) {
    const T* src = saved + (row * p.n_chunks + kc) * p.states + n0;
    if constexpr (SPL % 4 == 0) {
        if ((p.states & 3) == 0 && n0 + SPL <= p.states && scan_aligned(src)) {
            scan_load(h, src);
            return;
        }
    }
#pragma unroll
    for (int k = 0; k < SPL; ++k) h[k] = n0 + k < p.states ? src[k] : T(0);
}

// A thread's walk over the (channel, 4-step) vectors of a tile, G channels x tile / 4 vectors, j = tid,
// tid + threads, ...: (ci, v) = (j / nv, j % nv), stepped without divisions.
struct ScanVecWalk {
    int ci, v, dci, dv, nv;
    __device__ __forceinline__ ScanVecWalk(int tid, int threads, int nv_) : nv(nv_) {
        ci = tid / nv;
        v = tid - ci * nv;
        dci = threads / nv;
        dv = threads - dci * nv;
    }
    __device__ __forceinline__ void next() {
        ci += dci;
        v += dv;
        if (v >= nv) {
            v -= nv;
            ++ci;
        }
    }
};

// The walk two vectors at a time: both vectors' global loads (`load(ci, v)`, returning registers) are issued
// before either is used (`use(ci, v, regs)`), so that a thread waits for memory once a pair instead of once a
// vector. Used by the B/C copy (one pair a thread at S 16, tile 32). Pass 1 and the output pass keep their
// one-vector loops: paired, their registers (two vectors' inputs) spilled in the forward's recurrence at its
// 80-register bound, and the forward measured slower (2026-11-29, H200: 0.761 -> 0.781 ms, first size).
template <typename Load, typename Use>
__device__ __forceinline__ void scan_walk_pairs(int tid, int threads, int nv, int count, Load load, Use use) {
    for (ScanVecWalk w(tid, threads, nv); w.ci < count;) {
        const int ci0 = w.ci, v0 = w.v;
        w.next();
        const int ci1 = w.ci, v1 = w.v;
        const bool has1 = ci1 < count;
        w.next();
        const auto r0 = load(ci0, v0);
        const auto r1 = load(has1 ? ci1 : ci0, has1 ? v1 : v0);  // a repeat of the first (cache hits) when alone
        use(ci0, v0, r0);
        if (has1) use(ci1, v1, r1);
    }
}

// Four elements of T in registers (a lambda's return value in scan_walk_pairs).
template <typename T> struct ScanQuad {
    T v[4];
};

// B and C of one batch over a tile into shared rows (forward and backward alike): B0 and C0 point at state 0's
// first step of the tile (rows of L steps per state), len steps are valid; zero past S and past len. Row
// which np + k lpc + grp holds state grp SPL + k (which 0: B, 1: C), one 4-step vector per thread and turn.
template <typename T, int SPL, int ROW>
__device__ __forceinline__ void scan_stage_bc(const T* __restrict__ B0, const T* __restrict__ C0, int S,
                                              long long L, int len, int np, int lpc, bool vec, T* __restrict__ BC,
                                              int tid, int threads, int nv) {
    auto load = [&](int ci, int v) {
        const int t4 = 4 * v, which = ci >= np ? 1 : 0, n = ci - which * np;
        ScanQuad<T> q;
        if (n < S && t4 < len) {
            scan_load_tail(q.v, (which ? C0 : B0) + n * L + t4, vec, len - t4);
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) q.v[i] = T(0);
        }
        return q;
    };
    auto use = [&](int ci, int v, const ScanQuad<T>& q) {
        const int which = ci >= np ? 1 : 0, n = ci - which * np, grp = n / SPL, k = n - grp * SPL;
        scan_store(BC + (which * np + k * lpc + grp) * ROW + 4 * v, q.v);
    };
    scan_walk_pairs(tid, threads, nv, 2 * np, load, use);
}

// LPC: lanes per channel fixed at compile time (the row offsets of the recurrence become immediates), or 0
// for p.lpc at run time.
//
// Per tile: (1) dt = softplus(delta + bias) and dt u of the block's (channel, step)s, each once, 4 steps a
// thread with 16-byte loads, into DT and DTU; B and C into BC (rows along time, 16-byte copies); then, past
// the barrier, the next tile's rows are hinted into the L2 (scan_prefetch_tile); (2) the recurrence, 4 steps a
// turn: one 16-byte load each of dt, dt u and of the B and C of each state (4 steps),
// then per step and state 1 FMUL + 1 MUFU.EX2 (the decay), 1 FMUL + 1 FFMA (h), 1 FFMA (y); the lane's
// partial y of the 4 steps is one 16-byte store into its Y row (no shuffles); (3) out = (sum of the channel's
// Y rows, in lane order, + D u) z sigmoid(z), 4 steps a thread, u and z read again (L2 hits) so that
// neither takes shared memory or registers across the recurrence. Barriers: after (1) and after (2) only.
template <typename T, int SPL, int LPC>
__device__ void scan_fwd(const ScanParams p, const T* __restrict__ u, const T* __restrict__ delta,
                         const T* __restrict__ A, const T* __restrict__ Bm, const T* __restrict__ Cm,
                         const T* __restrict__ D, const T* __restrict__ z, const T* __restrict__ delta_bias,
                         T* __restrict__ out, T* __restrict__ saved) {
    constexpr int ROW = 128 / (int)sizeof(T) + 4;  // scan_row
    const int lpc = LPC ? LPC : p.lpc;
    const ScanThread th = scan_thread(p, lpc);
    const int tile = (int)p.chunk, np = LPC ? LPC * SPL : p.np, G = th.g;
    const ScanFwdLayout lay = scan_fwd_layout(G, lpc, np, (int)sizeof(T));
    if ((unsigned long long)lay.total * sizeof(T) > SCAN_DYNAMIC_SMEM_BYTES() || tile > ROW - 4 || (tile & 3))
        __trap();
    T* smem = reinterpret_cast<T*>(SCAN_SHARED_BASE());
    T* DT = smem + lay.dt;
    T* DTU = smem + lay.dtu;
    T* BC = smem + lay.bc;
    T* Y = smem + lay.y;
    const long long C = p.channels, L = p.length, S = p.states;
    const int threads = blockDim.x, tid = threadIdx.x, nv = tile / 4;
    // 16-byte global accesses along time when every row starts on a vector (L a multiple of 4, aligned
    // buffers); then a tile's vectors are whole or wholly past L.
    const bool vec = (L & 3) == 0 && scan_aligned(u) && scan_aligned(delta) && scan_aligned(out) &&
                     scan_aligned(Bm) && scan_aligned(Cm) && (!p.has_z || scan_aligned(z));

    T a2[SPL], h[SPL];
#pragma unroll
    for (int k = 0; k < SPL; ++k) {
        const int n = th.grp * SPL + k;
        a2[k] = (th.valid && n < S) ? A[th.c * S + n] * ScanExp<T>::scale() : T(0);
        h[k] = T(0);
    }
    const T* DTc = DT + th.ci * ROW;
    const T* DTUc = DTU + th.ci * ROW;
    const T* BCg = BC + th.grp * ROW;
    T* Yt = Y + tid * ROW;
    for (long long kc = 0; kc < p.n_chunks; ++kc) {
        const long long t0 = kc * tile;
        const int len = (int)min((long long)tile, L - t0);
        if (th.valid) scan_save_states<T, SPL>(p, th.b * C + th.c, kc, th.grp * SPL, h, saved);
        // 1. dt and dt u; zero past C and past L (dt = 0 keeps h).
        {
            ScanVecWalk w(tid, threads, nv);
            for (; w.ci < G; w.next()) {
                const int t4 = 4 * w.v;
                const long long cc = th.c0 + w.ci;
                T dt[4], dtu[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) dt[i] = dtu[i] = T(0);
                if (cc < C && t4 < len) {
                    const T bias = p.has_delta_bias ? delta_bias[cc] : T(0);
                    const long long r = (th.b * C + cc) * L + t0 + t4;
                    T x[4], dl[4];
                    scan_load_tail(x, u + r, vec, len - t4);
                    scan_load_tail(dl, delta + r, vec, len - t4);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        T d = dl[i] + bias;
                        if (p.delta_softplus) d = ScanGate<T>::softplus(d);
                        if (vec || t4 + i < len) {  // vectors are whole when vec
                            dt[i] = d;
                            dtu[i] = d * x[i];
                        }
                    }
                }
                scan_store(DT + w.ci * ROW + t4, dt);
                scan_store(DTU + w.ci * ROW + t4, dtu);
            }
        }
        scan_stage_bc<T, SPL, ROW>(Bm + th.b * S * L + t0, Cm + th.b * S * L + t0, (int)S, L, len, np, lpc, vec,
                                   BC, tid, threads, nv);
        __syncthreads();
        if (kc + 1 < p.n_chunks)
            scan_prefetch_tile(u, delta, p.has_z ? z : nullptr, Bm, Cm, th.b, th.c0, G, C, S, L, t0 + tile,
                               (int)min((long long)tile, L - t0 - tile), tid, threads);
        // 2. The recurrence, 4 steps a turn; padded steps (dt = 0) leave h as it is.
#pragma unroll(SPL * sizeof(T) <= 16 ? 2 : 1)
        for (int t = 0; t < tile; t += 4) {
            T dt[4], dtu[4], y[4];
            scan_load(dt, DTc + t);
            scan_load(dtu, DTUc + t);
            // With few registers of B and C (f32, 4 states) all of the 4 steps' are loaded first; else state by
            // state. Either way y sums the thread's states in state order.
            constexpr int HB = SPL * sizeof(T) <= 16 ? SPL : 1;  // states whose B, C are held at once
#pragma unroll
            for (int k0 = 0; k0 < SPL; k0 += HB) {
                T bq[HB][4], cq[HB][4];
#pragma unroll
                for (int j = 0; j < HB; ++j) {
                    scan_load(bq[j], BCg + (k0 + j) * lpc * ROW + t);
                    scan_load(cq[j], BCg + (np + (k0 + j) * lpc) * ROW + t);
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int j = 0; j < HB; ++j) {
                        const int k = k0 + j;
                        const T a = ScanExp<T>::exp(dt[i] * a2[k]);
                        h[k] = a * h[k] + dtu[i] * bq[j][i];
                        y[i] = k == 0 ? cq[j][i] * h[k] : y[i] + cq[j][i] * h[k];
                    }
                }
            }
            scan_store(Yt + t, y);
        }
        __syncthreads();
        // 3. out = (y + D u) z sigmoid(z), 4 steps a thread.
        {
            ScanVecWalk w(tid, threads, nv);
            for (; w.ci < G; w.next()) {
                const int t4 = 4 * w.v;
                const long long cc = th.c0 + w.ci;
                if (cc >= C || t4 >= len) continue;
                T y[4];
                scan_load(y, Y + w.ci * lpc * ROW + t4);
                for (int g = 1; g < lpc; ++g) {
                    T yg[4];
                    scan_load(yg, Y + (w.ci * lpc + g) * ROW + t4);
#pragma unroll
                    for (int i = 0; i < 4; ++i) y[i] += yg[i];
                }
                const T d = p.has_d ? D[cc] : T(0);
                const long long r = (th.b * C + cc) * L + t0 + t4;
                T x[4], zv[4], o[4];
                scan_load_tail(x, u + r, vec, len - t4);
                if (p.has_z) scan_load_tail(zv, z + r, vec, len - t4);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    o[i] = y[i] + d * x[i];
                    if (p.has_z) o[i] *= zv[i] * ScanGate<T>::sigmoid(zv[i]);
                }
                scan_store_tail(out + r, o, vec, len - t4);
            }
        }
        // No barrier here: the output pass reads only Y, which the next tile writes after the barrier that ends
        // its pass 1 and B/C copy; those write DT, DTU and BC, which this tile's recurrence finished reading
        // before the barrier above. A warp done with its output vectors goes on to the next tile's loads.
    }
}

// Reduce-scatter over the warp's channels of a thread's 2 SPL values v (dB of its states, then dC): at level
// i the lanes whose channel bit i is set keep the upper half of the values and send the lower half to the
// partner lane (xor lpc << i), the others the reverse. After `halvings` = min(levels, HALVINGS) levels a
// lane holds `2 SPL >> halvings` values, indices base + j of the original 2 SPL, summed over 2^halvings
// channels; any further levels (more channels than values) sum the single value over the rest, and then only
// the lanes with ch >> halvings == 0 hold distinct sums. Fixed order: deterministic.
template <typename T, int SPL>
__device__ __forceinline__ void scan_reduce_scatter(T (&v)[2 * SPL], int lpc, int ch, int levels, int halvings) {
    constexpr int H = ScanShape<T, SPL>::HALVINGS;
#pragma unroll
    for (int i = 0; i < H; ++i) {
        if (i < halvings) {
            const int half = (2 * SPL) >> (i + 1);
            const bool up = (ch >> i) & 1;
#pragma unroll
            for (int j = 0; j < SPL; ++j) {
                if (j < half) {
                    const T send = up ? v[j] : v[j + half];
                    const T keep = up ? v[j + half] : v[j];
                    v[j] = keep + scan_shfl_xor(send, lpc << i);
                }
            }
        }
    }
    for (int i = H; i < levels; ++i) v[0] += scan_shfl_xor(v[0], lpc << i);
}

// Where value j of a thread's reduce-scatter result goes in its warp's DBC row: index base + j of the
// original 2 SPL values (dB of the thread's states, then dC), base from the channel bits that chose halves.
template <int SPL> __device__ __forceinline__ int scan_dbc_slot(int grp, int ch, int halvings, int np, int j) {
    int base = 0;
    for (int i = 0; i < halvings; ++i)
        if ((ch >> i) & 1) base += (2 * SPL) >> (i + 1);
    const int idx = base + j, which = idx >= SPL ? 1 : 0;
    return which * np + grp * SPL + idx - which * SPL;
}

template <typename T, int SPL, int LPC>
__device__ void scan_bwd(const ScanParams p, const T* __restrict__ u, const T* __restrict__ delta,
                         const T* __restrict__ A, const T* __restrict__ Bm, const T* __restrict__ Cm,
                         const T* __restrict__ D, const T* __restrict__ z, const T* __restrict__ delta_bias,
                         const T* __restrict__ saved, const T* __restrict__ gout, T* __restrict__ du,
                         T* __restrict__ ddelta, T* __restrict__ dz, T* __restrict__ part_bc,
                         T* __restrict__ part_a, T* __restrict__ part_d, T* __restrict__ part_bias) {
    constexpr int TH = ScanShape<T, SPL>::TH;
    const int lpc = LPC ? LPC : p.lpc;
    const ScanThread th = scan_thread(p, lpc);
    const int tile = (int)p.chunk, np = LPC ? LPC * SPL : p.np, G = th.g;
    const ScanBwdLayout lay = scan_bwd_layout(tile, G, np, th.warps, SPL, TH, (int)sizeof(T));
    if ((unsigned long long)lay.total * sizeof(T) > SCAN_DYNAMIC_SMEM_BYTES()) __trap();
    T* smem = reinterpret_cast<T*>(SCAN_SHARED_BASE());
    ScanV4<T>* P = reinterpret_cast<ScanV4<T>*>(smem + lay.p4);  // P[ci (tile+1) + t] = (dt, dt u, gy, u)
    T* E = smem + lay.e;      // E[t (G+1) + ci] = softplus'(delta + bias); E[tile (G+1) + ..] = dL/dz / y
    T* BC = smem + lay.bc;    // BC[t bcs + which np + n]
    T* HS = smem + lay.hs;    // HS[(s threads + tid) SPL + k]: the state entering sub-chunk s
    T* Q = smem + lay.q;      // Q[(j G + ci) (tile+1) + t], j: sum_n gh B, sum_n A gh a h[t-1], sum_n C h
    T* DBC = smem + lay.dbc;  // DBC[(warp tile + t) (2 np + 1) + which np + n]: dB, dC summed over the warp
    T* ACC = smem + lay.acc;  // ACC[ci], ACC[G + ci]: dD and ddelta_bias of the block's channels
    const int bcs = scan_bc_stride(np), dbs = 2 * np + 1;
    const long long C = p.channels, L = p.length, S = p.states;
    const int threads = blockDim.x, tid = threadIdx.x;
    const int ch = th.lane / lpc;  // the thread's channel among the warp's 32 / lpc
    int levels = 0;
    while ((lpc << levels) < 32) ++levels;  // log2 of the warp's channels
    const int halvings = levels < ScanShape<T, SPL>::HALVINGS ? levels : ScanShape<T, SPL>::HALVINGS;
    const int live = (2 * SPL) >> halvings;  // values per lane after the reduce-scatter
    const bool writer = (ch >> halvings) == 0;  // the lanes holding distinct sums
    const int slot = scan_dbc_slot<SPL>(th.grp, ch, halvings, np, 0);  // where its first value goes

    T a2[SPL], av[SPL], carry[SPL], da[SPL];
#pragma unroll
    for (int k = 0; k < SPL; ++k) {
        const int n = th.grp * SPL + k;
        av[k] = (th.valid && n < S) ? A[th.c * S + n] : T(0);
        a2[k] = av[k] * ScanExp<T>::scale();
        carry[k] = T(0);  // exp(dt[t+1] A) gh[t+1], zero after the last step
        da[k] = T(0);
    }
    for (int i = tid; i < 2 * G; i += threads) ACC[i] = T(0);

    for (long long kc = p.n_chunks - 1; kc >= 0; --kc) {
        const long long t0 = kc * tile;
        const int len = (int)min((long long)tile, L - t0);
        // The state entering the tile, loaded first so that its latency overlaps step 1.
        T h[SPL];
        if (th.valid) {
            scan_load_states<T, SPL>(p, th.b * C + th.c, kc, th.grp * SPL, h, saved);
        } else {
#pragma unroll
            for (int k = 0; k < SPL; ++k) h[k] = T(0);
        }
        // 1. Per-(c, t) inputs, each once; zero past C and past L (dt = 0 and gy = 0: no contribution).
#pragma unroll 4
        for (int ci = th.warp; ci < G; ci += th.warps) {  // a warp per channel row, lanes along time
            const long long cc = th.c0 + ci;
            const T bias = (cc < C && p.has_delta_bias) ? delta_bias[cc] : T(0);
            for (int t = th.lane; t < tile; t += 32) {
                ScanV4<T> v;
                v.x = v.y = v.z = v.w = T(0);
                T spg = T(0), gz = T(0);
                if (cc < C && t < len) {
                    const long long r = (th.b * C + cc) * L + t0 + t;
                    const T x = u[r];
                    const T raw = delta[r] + bias;
                    T dt = raw;
                    spg = T(1);
                    if (p.delta_softplus) {
                        dt = ScanGate<T>::softplus(raw);
                        spg = ScanGate<T>::softplus_grad(raw);
                    }
                    const T g = gout[r];
                    T gy = g;
                    if (p.has_z) {
                        const T zv = z[r];
                        const T s = ScanGate<T>::sigmoid(zv);
                        gy = g * zv * s;
                        gz = g * s * (T(1) + zv * (T(1) - s));
                    }
                    v.x = dt;
                    v.y = dt * x;
                    v.z = gy;
                    v.w = x;
                }
                P[ci * (tile + 1) + t] = v;
                E[t * (G + 1) + ci] = spg;
                E[(tile + t) * (G + 1) + ci] = gz;
            }
        }
        scan_load_bc(p, th, t0, len, tile, Bm, Cm, BC);
        __syncthreads();

        const ScanV4<T>* Pc = P + th.ci * (tile + 1);
        // 2a. Forward over the tile, keeping the state entering every sub-chunk of TH steps.
        for (int s = 0; s < tile / TH; ++s) {
            scan_store(HS + ((long long)s * threads + tid) * SPL, h);
#pragma unroll
            for (int i = 0; i < TH; ++i) {
                const int t = s * TH + i;
                const ScanV4<T> v = Pc[t];
                T bv[SPL];
                scan_load(bv, BC + t * bcs + th.grp * SPL);
#pragma unroll
                for (int k = 0; k < SPL; ++k) h[k] = ScanExp<T>::exp(v.x * a2[k]) * h[k] + v.y * bv[k];
            }
        }
        // 2b. Sub-chunks last to first: recompute states and decays, then the reverse-time recurrence.
        for (int s = tile / TH - 1; s >= 0; --s) {
            T he[SPL], hs[TH][SPL], ex[TH][SPL];
            scan_load(he, HS + ((long long)s * threads + tid) * SPL);
#pragma unroll
            for (int i = 0; i < TH; ++i) {
                const int t = s * TH + i;
                const ScanV4<T> v = Pc[t];
                T bv[SPL];
                scan_load(bv, BC + t * bcs + th.grp * SPL);
#pragma unroll
                for (int k = 0; k < SPL; ++k) {
                    ex[i][k] = ScanExp<T>::exp(v.x * a2[k]);
                    hs[i][k] = ex[i][k] * (i > 0 ? hs[i - 1][k] : he[k]) + v.y * bv[k];
                }
            }
#pragma unroll
            for (int i = TH - 1; i >= 0; --i) {
                const int t = s * TH + i;
                const ScanV4<T> v = Pc[t];  // (dt, dt u, gy, u)
                T bv[SPL], cv[SPL], r[2 * SPL];
                scan_load(bv, BC + t * bcs + th.grp * SPL);
                scan_load(cv, BC + t * bcs + np + th.grp * SPL);
                T sgb = T(0), sagh = T(0), ys = T(0);
#pragma unroll
                for (int k = 0; k < SPL; ++k) {
                    const T gh = cv[k] * v.z + carry[k];  // gh[t] = C[t] gy[t] + exp(dt[t+1] A) gh[t+1]
                    const T hb = ex[i][k] * (i > 0 ? hs[i - 1][k] : he[k]);  // exp(dt A) h[t-1]
                    const T ghb = gh * hb;
                    r[k] = gh * v.y;            // dB: gh dt u
                    r[SPL + k] = v.z * hs[i][k];  // dC: gy h
                    sgb += gh * bv[k];
                    sagh += av[k] * ghb;
                    da[k] += ghb * v.x;
                    ys += cv[k] * hs[i][k];
                    carry[k] = ex[i][k] * gh;
                }
                scan_reduce_scatter<T, SPL>(r, lpc, ch, levels, halvings);
                T* row = DBC + (th.warp * tile + t) * dbs;
                if (live == 1) {
                    // Mamba's S = 16 (4 lanes of 4 states, 8 channels a warp) and every S <= 32.
                    if (writer) row[slot] = r[0];
                } else {
                    // Fewer channels than values a warp (S > 32): no levels past the halvings, every lane writes.
#pragma unroll
                    for (int j = 0; j < 2 * SPL; ++j)
                        if (j < live) row[scan_dbc_slot<SPL>(th.grp, ch, halvings, np, j)] = r[j];
                }
                for (int o = 1; o < lpc; o <<= 1) {  // over the channel's lanes
                    sgb += scan_shfl_xor(sgb, o);
                    sagh += scan_shfl_xor(sagh, o);
                    ys += scan_shfl_xor(ys, o);
                }
                if (th.grp == 0) {
                    Q[(0 * G + th.ci) * (tile + 1) + t] = sgb;
                    Q[(1 * G + th.ci) * (tile + 1) + t] = sagh;
                    Q[(2 * G + th.ci) * (tile + 1) + t] = ys;
                }
            }
        }
        __syncthreads();

        // 3a. Per-(c, t) gradients, one warp per channel row, coalesced along time; dD and ddelta_bias summed
        // over the row (a warp sum) into the channel's accumulator, which only this warp touches.
        for (int ci = th.warp; ci < G; ci += th.warps) {
            const long long cc = th.c0 + ci;
            if (cc >= C) break;
            const T d = p.has_d ? D[cc] : T(0);
            const long long r0 = (th.b * C + cc) * L + t0;
            T sum_d = T(0), sum_bias = T(0);
            for (int t0w = 0; t0w < len; t0w += 32) {
                const int t = t0w + th.lane;
                if (t < len) {
                    const ScanV4<T> v = P[ci * (tile + 1) + t];  // (dt, dt u, gy, u)
                    const T sgb = Q[(0 * G + ci) * (tile + 1) + t];
                    const T sagh = Q[(1 * G + ci) * (tile + 1) + t];
                    const T ys = Q[(2 * G + ci) * (tile + 1) + t];
                    du[r0 + t] = v.x * sgb + d * v.z;
                    const T gd = (sagh + v.w * sgb) * E[t * (G + 1) + ci];
                    ddelta[r0 + t] = gd;
                    if (p.has_z) dz[r0 + t] = E[(tile + t) * (G + 1) + ci] * (ys + d * v.w);
                    sum_d += v.z * v.w;
                    sum_bias += gd;
                }
            }
            for (int o = 16; o > 0; o >>= 1) {
                sum_d += scan_shfl_xor(sum_d, o);
                sum_bias += scan_shfl_xor(sum_bias, o);
            }
            if (th.lane == 0) {
                ACC[ci] += sum_d;
                ACC[G + ci] += sum_bias;
            }
        }
        // 3b. dB, dC of the tile summed over the block's warps in order: the block's partial.
        for (int v = th.warp; v < 2 * (int)S; v += th.warps) {  // v = which S + n: a warp per row
            const int which = v >= S ? 1 : 0, n = v - which * (int)S;
            T* dst = part_bc + ((th.b * p.groups + blockIdx.x % p.groups) * 2 * S + v) * L + t0;
            for (int t = th.lane; t < len; t += 32) {
                T sum = T(0);
                for (int w = 0; w < th.warps; ++w) sum += DBC[(w * tile + t) * dbs + which * np + n];
                dst[t] = sum;
            }
        }
        __syncthreads();  // the tile's buffers are read before the next tile overwrites them
    }
    if (th.valid) {
#pragma unroll
        for (int k = 0; k < SPL; ++k) {
            const int n = th.grp * SPL + k;
            if (n < S) part_a[(th.b * C + th.c) * S + n] = da[k];
        }
    }
    for (int ci = tid; ci < G; ci += threads) {
        const long long cc = th.c0 + ci;
        if (cc < C) {
            if (p.has_d) part_d[th.b * C + cc] = ACC[ci];
            if (p.has_delta_bias) part_bias[th.b * C + cc] = ACC[G + ci];
        }
    }
}

// The f32 backward for 4 lanes of 4 states (S = 9 .. 16, Mamba's 16): scan_bwd_s4l4_f32 (scan4, scan5).
// NOTES.md has the analysis; in short, against scan_bwd above: 16-byte shared rows of fixed length (scan_row,
// as the forward's), 4 steps a turn everywhere, a sub-chunk of recomputed states is one turn (32 registers of
// states and decays instead of 64), the reductions moved off the shuffles:
//   - over the channel's 4 lanes (du, ddelta, dz): a reduce-scatter of the 4 steps' 3 sums (9 shuffles a
//     turn instead of 24), after which lane grp holds step grp's sums; the warp stores them (3 scalar
//     stores a lane) into its part of the turn's HS slot, whose entry states the turn has just read, and after
//     the tile a pass over the (channel, 4-step) vectors finishes the (c, t) gradients with 16-byte accesses
//     (pass 3: the sums, dt and gy from shared memory, u, delta, dL/dout, z read again, cache hits; scan5:
//     in the turn this was ~90 instructions of scalar loads, 64-bit addresses and gates a (c, t), now ~37);
//   - over the warp's 8 channels (dB, dC): each thread stores gh and h of its 4 states' 4 steps as 8 16-byte
//     rows of a per-warp buffer RED; lane v then sums value v (dB = gh dt u or dC = gy h of one state, 4
//     steps) over the 8 channels in order, the products fused into the sum (8 + 8 LDS.128, 4 FMUL + 28 FFMA
//     a lane and turn; the threads' 32 FMUL of the products are gone), into W;
//   - over the block's warps: after the turn's barrier, one warp adds W over the warps in order and writes
//     the block's partial with 16-byte stores; scan_bwd_sum adds the groups as before.
// Shared memory (floats, rows of 36): per channel the rows dt, dt u, dL/dy, BC (as the forward), HS (the
// state entering every turn, per thread), RED (8 channels x 32 values x 4 steps per warp, the value index
// swizzled so that stores and loads are conflict-free), W (per warp 32 values x 4 steps, two turns).
struct ScanBwd4Layout {
    long long rows, bc, hs, red, w, total;  // offsets in floats
};

__host__ __device__ inline ScanBwd4Layout scan_bwd4_layout(int tile, int warps) {
    const long long row = scan_row(4), g = 8LL * warps;
    ScanBwd4Layout s;
    s.rows = 0;  // channel ci: rows 3 ci (dt), 3 ci + 1 (dt u), 3 ci + 2 (dL/dy): one base, immediate offsets
    s.bc = s.rows + 3 * g * row;
    s.hs = s.bc + 32 * row;
    s.red = s.hs + (long long)(tile / 4) * 32 * warps * 4;
    s.w = s.red + warps * 8LL * 32 * 4;
    s.total = s.w + 2LL * warps * 32 * 4;
    return s;
}

// The 16-byte slot of value v (0 .. 31: which 16 + k 4 + grp) of channel cw (0 .. 7) in a warp's RED: odd
// channels swap the halves of each group of 8 values so that the 8 lanes of a quarter-warp store to 8
// different bank groups (lanes (cw, grp) and (cw + 1, grp) would otherwise be 512 bytes apart).
__device__ __forceinline__ int scan_red_slot(int cw, int v) { return cw * 32 + (v ^ ((cw & 1) << 2)); }

// Sums of a thread's 4 steps, reduce-scattered over the 4 lanes of its channel: lane grp returns the total
// (over the 4 lanes, in a fixed order) of step grp. Level 1 (lanes grp ^ 1) splits odd and even steps,
// level 2 (grp ^ 2) the two that are left.
__device__ __forceinline__ float scan_lane_scatter(const float (&v)[4], bool b0, bool b1) {
    float o[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const float send = b0 ? v[2 * j] : v[2 * j + 1];
        const float keep = b0 ? v[2 * j + 1] : v[2 * j];
        o[j] = keep + scan_shfl_xor(send, 1);  // step 2 j + b0
    }
    const float send = b1 ? o[0] : o[1];
    const float keep = b1 ? o[1] : o[0];
    return keep + scan_shfl_xor(send, 2);  // step 2 b1 + b0
}

__device__ void scan_bwd4(const ScanParams p, const float* __restrict__ u, const float* __restrict__ delta,
                          const float* __restrict__ A, const float* __restrict__ Bm, const float* __restrict__ Cm,
                          const float* __restrict__ D, const float* __restrict__ z,
                          const float* __restrict__ delta_bias, const float* __restrict__ saved,
                          const float* __restrict__ gout, float* __restrict__ du, float* __restrict__ ddelta,
                          float* __restrict__ dz, float* __restrict__ part_bc, float* __restrict__ part_a,
                          float* __restrict__ part_d, float* __restrict__ part_bias) {
    constexpr int SPL = 4, LPC = 4, NP = 16, ROW = 36;  // ROW = scan_row(4)
    const ScanThread th = scan_thread(p, LPC);
    const int tile = (int)p.chunk, G = th.g, warps = th.warps;
    const ScanBwd4Layout lay = scan_bwd4_layout(tile, warps);
    if ((unsigned long long)lay.total * 4 > SCAN_DYNAMIC_SMEM_BYTES() || tile > ROW - 4 || (tile & 3)) __trap();
    float* smem = reinterpret_cast<float*>(SCAN_SHARED_BASE());
    float* ROWS = smem + lay.rows;
    float* BC = smem + lay.bc;
    float* HS = smem + lay.hs;
    float* RED = smem + lay.red + th.warp * 8 * 32 * 4;
    float* W = smem + lay.w;
    const long long C = p.channels, L = p.length, S = p.states;
    const int threads = blockDim.x, tid = threadIdx.x, nv = tile / 4, cw = th.ci & 7;
    const bool b0 = th.grp & 1, b1 = (th.grp >> 1) & 1;
    const bool vec = (L & 3) == 0 && scan_aligned(u) && scan_aligned(delta) && scan_aligned(gout) &&
                     scan_aligned(Bm) && scan_aligned(Cm) && scan_aligned(du) && scan_aligned(ddelta) &&
                     (!p.has_z || (scan_aligned(z) && scan_aligned(dz)));
    const bool vec_part = (L & 3) == 0 && scan_aligned(part_bc);

    float a2[SPL], carry[SPL], da[SPL];
#pragma unroll
    for (int k = 0; k < SPL; ++k) {
        const int n = th.grp * SPL + k;
        a2[k] = (th.valid && n < S) ? A[th.c * S + n] * 1.4426950408889634f : 0.f;
        carry[k] = 0.f;  // exp(dt[t+1] A) gh[t+1], zero after the last step
        da[k] = 0.f;
    }
    const float* DTc = ROWS + 3 * th.ci * ROW;
    const float* DTUc = DTc + ROW;
    const float* GYc = DTc + 2 * ROW;
    const float* BCg = BC + th.grp * ROW;  // B of state grp 4 + k: row k 4 (+ grp); C: row 16 + k 4
    // Pass 3 (the per-(c, t) gradients) maps lane l to channel fch = 8 warp + (l & 7) of the warp's 8 and to
    // the 4-step vectors v = l >> 3, + 4, ... of the tile; its dD and ddelta_bias sums cover the whole sequence.
    const int fch = 8 * th.warp + (th.lane & 7), fq = th.lane >> 3;
    const long long fc = th.c0 + fch;
    const bool fvalid = fc < C;
    const float fd = (fvalid && p.has_d) ? D[fc] : 0.f;
    const float fbias = (fvalid && p.has_delta_bias) ? delta_bias[fc] : 0.f;
    const float* FDT = ROWS + 3 * fch * ROW;  // its dt row; dL/dy 2 rows further
    const long long frow = (th.b * C + fc) * L;
    float sum_d = 0.f, sum_bias = 0.f;
    // The row this thread prefetches into the L2 a tile ahead of pass 1 (null: none): lane grp of its channel
    // u, delta, dL/dout or z (grp 0 .. 3). B and C are not: the batch's NG blocks share them, and the first
    // to load a tile's brings it into the L2 for the others.
    const float* pf_row = nullptr;
    if (th.valid && (th.grp < 3 || p.has_z))
        pf_row = (th.grp == 0 ? u : th.grp == 1 ? delta : th.grp == 2 ? gout : z) + (th.b * C + th.c) * L;
    // RED slots as two bases and immediate offsets: the thread's dB of state k goes to slot
    // scan_red_slot(cw, 4 k + grp) = cw 32 + grp + 4 (k ^ odd), i.e. base + 16 k + (odd ? -16 : 16) for odd k
    // and base + 16 k + (odd ? 16 : 0) for even k (floats); its dC 64 floats further. Lane v reads
    // scan_red_slot(c2, v) = c2 32 + v for even c2 and c2 32 + (v ^ 4) for odd c2.
    const int odd = cw & 1;
    float* red_even = RED + (cw * 32 + th.grp) * 4 + odd * 16;
    float* red_odd = RED + (cw * 32 + th.grp) * 4 - odd * 16;
    const float* red_lane_even = RED + th.lane * 4;
    const float* red_lane_odd = RED + (th.lane ^ 4) * 4;

    for (long long kc = p.n_chunks - 1; kc >= 0; --kc) {
        const long long t0 = kc * tile;
        const int len = (int)min((long long)tile, L - t0);
        float h[SPL];
        if (th.valid) {
            scan_load_states<float, SPL>(p, th.b * C + th.c, kc, th.grp * SPL, h, saved);
        } else {
#pragma unroll
            for (int k = 0; k < SPL; ++k) h[k] = 0.f;
        }
        // 1. dt, dt u and dL/dy of the block's (channel, step)s, 4 steps a thread; zero past C and past L (dt
        // = 0 keeps h, gy = 0 adds nothing).
        {
            ScanVecWalk w(tid, threads, nv);
            for (; w.ci < G; w.next()) {
                const int t4 = 4 * w.v;
                const long long cc = th.c0 + w.ci;
                float dt[4], dtu[4], gy[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) dt[i] = dtu[i] = gy[i] = 0.f;
                if (cc < C && t4 < len) {
                    const float bc = p.has_delta_bias ? delta_bias[cc] : 0.f;
                    const long long r = (th.b * C + cc) * L + t0 + t4;
                    float x[4], dl[4], g[4], zv[4];
                    scan_load_tail(x, u + r, vec, len - t4);
                    scan_load_tail(dl, delta + r, vec, len - t4);
                    scan_load_tail(g, gout + r, vec, len - t4);
                    if (p.has_z) scan_load_tail(zv, z + r, vec, len - t4);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        float d = dl[i] + bc;
                        if (p.delta_softplus) d = ScanGate<float>::softplus(d);
                        float gyi = g[i];
                        if (p.has_z) gyi = g[i] * zv[i] * ScanGate<float>::sigmoid(zv[i]);
                        if (vec || t4 + i < len) {  // vectors are whole when vec
                            dt[i] = d;
                            dtu[i] = d * x[i];
                            gy[i] = gyi;
                        }
                    }
                }
                scan_store(ROWS + 3 * w.ci * ROW + t4, dt);
                scan_store(ROWS + (3 * w.ci + 1) * ROW + t4, dtu);
                scan_store(ROWS + (3 * w.ci + 2) * ROW + t4, gy);
            }
        }
        scan_stage_bc<float, SPL, ROW>(Bm + th.b * S * L + t0, Cm + th.b * S * L + t0, (int)S, L, len, NP, LPC,
                                       vec, BC, tid, threads, nv);
        __syncthreads();
        // The previous tile's per-(c, t) inputs of pass 1, into the L2 while this tile's turns run (~30k cycles
        // a tile at Mamba's sizes): pass 1 otherwise waits for DRAM once a tile, the block's warps at its
        // barrier.
        if (kc > 0 && pf_row) scan_prefetch_row(pf_row + t0 - tile, tile);
        // 2a. Forward over the tile, keeping the state entering every turn of 4 steps.
        for (int s = 0; s < nv; ++s) {
            scan_store(HS + ((long long)s * threads + tid) * SPL, h);
            float dt[4], dtu[4];
            scan_load(dt, DTc + 4 * s);
            scan_load(dtu, DTUc + 4 * s);
#pragma unroll
            for (int k = 0; k < SPL; ++k) {
                float bq[4];
                scan_load(bq, BCg + k * LPC * ROW + 4 * s);
#pragma unroll
                for (int i = 0; i < 4; ++i) h[k] = SCAN_EX2(dt[i] * a2[k]) * h[k] + dtu[i] * bq[i];
            }
        }
        // 2b. Turns last to first: recompute the turn's states and decays, run the reverse-time recurrence,
        // reduce.
        for (int s = nv - 1; s >= 0; --s) {
            const int tl = 4 * s;  // the turn's first step
            float he[SPL], dt[4], dtu[4], gy[4];
            scan_load(he, HS + ((long long)s * threads + tid) * SPL);
            scan_load(dt, DTc + tl);
            scan_load(dtu, DTUc + tl);
            scan_load(gy, GYc + tl);
            float hs[4][SPL], ex[4][SPL];
#pragma unroll
            for (int k = 0; k < SPL; ++k) {
                float bq[4];
                scan_load(bq, BCg + k * LPC * ROW + tl);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    ex[i][k] = SCAN_EX2(dt[i] * a2[k]);
                    hs[i][k] = ex[i][k] * (i > 0 ? hs[i - 1][k] : he[k]) + dtu[i] * bq[i];
                }
            }
            float sgb[4], sagh[4], ys[4];  // per step: sum over the thread's states of gh B, A gh a h[t-1], C h
#pragma unroll
            for (int k = 0; k < SPL; ++k) {
                float bq[4], cq[4], gq[4], hq[4];
                scan_load(bq, BCg + k * LPC * ROW + tl);
                scan_load(cq, BCg + (NP + k * LPC) * ROW + tl);
#pragma unroll
                for (int i = 3; i >= 0; --i) {
                    const float gh = cq[i] * gy[i] + carry[k];  // gh[t] = C[t] gy[t] + exp(dt[t+1] A) gh[t+1]
                    carry[k] = ex[i][k] * gh;
                    const float ghb = carry[k] * (i > 0 ? hs[i - 1][k] : he[k]);  // gh exp(dt A) h[t-1]
                    // dB = the sum over channels of gh dt u, dC of gy h: the reducing lane makes the products,
                    // fused into its sum.
                    gq[i] = gh;
                    hq[i] = hs[i][k];
                    sgb[i] = k == 0 ? gh * bq[i] : sgb[i] + gh * bq[i];
                    sagh[i] = k == 0 ? a2[k] * ghb : sagh[i] + a2[k] * ghb;
                    ys[i] = k == 0 ? cq[i] * hs[i][k] : ys[i] + cq[i] * hs[i][k];
                    da[k] += ghb * dt[i];
                }
                float* red = (k & 1 ? red_odd : red_even) + 16 * k;  // = RED + scan_red_slot(cw, 4 k + grp) 4
                scan_store(red, gq);
                scan_store(red + 64, hq);
            }
            // The channel's 3 sums of step tl + grp (lane grp's after the scatter) for pass 3, into the warp's
            // part of HS slot s (read above, so free now: the __syncwarp orders the reads before these stores):
            // Q[j 32 + lane] = sum j of channel cw, step tl + grp, i.e. the 4 steps of a channel's sum j are one
            // 16-byte vector at Q + j 32 + 4 cw.
            const float tsgb = scan_lane_scatter(sgb, b0, b1);
            const float tsagh = scan_lane_scatter(sagh, b0, b1);
            const float tys = scan_lane_scatter(ys, b0, b1);
            __syncwarp();
            {
                float* Q = HS + ((long long)s * threads + 32 * th.warp) * SPL;
                Q[th.lane] = tsgb;
                Q[32 + th.lane] = tsagh;
                Q[64 + th.lane] = tys;
            }
            // dB, dC of the turn over the warp's 8 channels, in channel order: lane v owns value v (v < 16: dB,
            // the sum of gh dt u; else dC, of gy h), the channel's dt u or gy read from its row.
            {
                const float* wrow = ROWS + (3 * 8 * th.warp + (th.lane < 16 ? 1 : 2)) * ROW + tl;
                float acc[4], x[4], wv[4];
                scan_load(x, red_lane_even);
                scan_load(wv, wrow);
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[i] = x[i] * wv[i];
#pragma unroll
                for (int c2 = 1; c2 < 8; ++c2) {
                    scan_load(x, (c2 & 1 ? red_lane_odd : red_lane_even) + c2 * 128);  // scan_red_slot(c2, lane)
                    scan_load(wv, wrow + c2 * 3 * ROW);
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[i] = fmaf(x[i], wv[i], acc[i]);
                }
                scan_store(W + (((s & 1) * warps + th.warp) * 32 + th.lane) * 4, acc);
            }
            __syncthreads();
            // Over the block's warps in order: the block's partial of the turn, written by one warp.
            if (th.warp == (s & (warps - 1))) {  // warps is 1, 2 or 4 (cuda.rs): s % warps without a division
                const int v = th.lane, which = v >> 4, n = (v & 3) * SPL + ((v >> 2) & 3);
                if (n < S && tl < len) {
                    const float* Ws = W + (s & 1) * warps * 32 * 4 + v * 4;
                    float acc[4];
                    scan_load(acc, Ws);
                    for (int w2 = 1; w2 < warps; ++w2) {
                        float x[4];
                        scan_load(x, Ws + w2 * 32 * 4);
#pragma unroll
                        for (int i = 0; i < 4; ++i) acc[i] += x[i];
                    }
                    float* dst = part_bc + (((th.b * p.groups + blockIdx.x % p.groups) * 2 + which) * S + n) * L + t0 + tl;
                    scan_store_tail(dst, acc, vec_part, len - tl);  // vec_part: len is a multiple of 4
                }
            }
        }
        // 3. The tile's per-(c, t) gradients, 4 steps a lane with 16-byte accesses: the channel sums of turn v
        // from Q in its HS slot (written by this warp, ordered by the turns' barriers), dt and dL/dy from the
        // channel's rows, u, delta, dL/dout and z read again (cache hits), softplus' derivative and the sigmoid
        // recomputed. Zeros past len (rows, sums and loads) add nothing to dD and ddelta_bias.
        if (fvalid) {
            for (int v = fq; v < nv && 4 * v < len; v += 4) {
                const int t4 = 4 * v, n = len - t4;
                const float* Q = HS + ((long long)v * threads + 32 * th.warp) * SPL + 4 * (fch & 7);
                float sgb[4], sagh[4], ys[4], dt[4], gy[4], x[4], dl[4], g[4], zv[4];
                scan_load(sgb, Q);
                scan_load(sagh, Q + 32);
                scan_load(ys, Q + 64);
                scan_load(dt, FDT + t4);
                scan_load(gy, FDT + 2 * ROW + t4);
                const long long r = frow + t0 + t4;
                scan_load_tail(x, u + r, vec, n);
                scan_load_tail(dl, delta + r, vec, n);
                if (p.has_z) {
                    scan_load_tail(g, gout + r, vec, n);
                    scan_load_tail(zv, z + r, vec, n);
                }
                float gu[4], gd[4], gz[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float spg = p.delta_softplus ? ScanGate<float>::softplus_grad(dl[i] + fbias) : 1.f;
                    gu[i] = fmaf(dt[i], sgb[i], fd * gy[i]);
                    gd[i] = fmaf(sagh[i], 0.6931471805599453f, x[i] * sgb[i]) * spg;  // a2 = A log2(e)
                    if (p.has_z) {
                        const float sg = ScanGate<float>::sigmoid(zv[i]);
                        gz[i] = g[i] * sg * (1.f + zv[i] * (1.f - sg)) * fmaf(fd, x[i], ys[i]);
                    }
                    sum_d = fmaf(gy[i], x[i], sum_d);
                    sum_bias += gd[i];
                }
                scan_store_tail(du + r, gu, vec, n);
                scan_store_tail(ddelta + r, gd, vec, n);
                if (p.has_z) scan_store_tail(dz + r, gz, vec, n);
            }
        }
        __syncthreads();  // pass 3's reads of the rows and of HS come before the next tile's passes 1 and 2a
    }
    if (th.valid) {
#pragma unroll
        for (int k = 0; k < SPL; ++k) {
            const int n = th.grp * SPL + k;
            if (n < S) part_a[(th.b * C + th.c) * S + n] = da[k];
        }
    }
    // dD, ddelta_bias over the channel's 4 pass-3 lanes (l & 7 fixed; each summed its own vectors over the
    // whole sequence).
    sum_d += scan_shfl_xor(sum_d, 8);
    sum_d += scan_shfl_xor(sum_d, 16);
    sum_bias += scan_shfl_xor(sum_bias, 8);
    sum_bias += scan_shfl_xor(sum_bias, 16);
    if (fvalid && fq == 0) {
        if (p.has_d) part_d[th.b * C + fc] = sum_d;
        if (p.has_delta_bias) part_bias[th.b * C + fc] = sum_bias;
    }
}

// The deterministic second pass of the backward: dB, dC summed over the NG channel groups in order, dA, dD,
// ddelta_bias over the batches in order. One thread per output element.
template <typename T>
__device__ void scan_bwd_sum(const ScanParams p, const T* __restrict__ part_bc, const T* __restrict__ part_a,
                             const T* __restrict__ part_d, const T* __restrict__ part_bias, T* __restrict__ dB,
                             T* __restrict__ dC, T* __restrict__ dA, T* __restrict__ dD,
                             T* __restrict__ ddelta_bias) {
    const long long B = p.batch, C = p.channels, S = p.states, L = p.length, NG = p.groups;
    const long long nbc = B * S * L, total = 2 * nbc + C * S + 2 * C;
    GRID_STRIDE(i, total) {
        if (i < 2 * nbc) {
            const long long which = i / nbc, r = i - which * nbc;  // r = (b S + n) L + t
            const long long b = r / (S * L), q = r - b * S * L;
            T sum = T(0);
            for (long long g = 0; g < NG; ++g) sum += part_bc[((b * NG + g) * 2 + which) * S * L + q];
            (which ? dC : dB)[r] = sum;
        } else if (i < 2 * nbc + C * S) {
            const long long j = i - 2 * nbc;
            T sum = T(0);
            for (long long b = 0; b < B; ++b) sum += part_a[b * C * S + j];
            dA[j] = sum;
        } else {
            const long long j = i - 2 * nbc - C * S;
            const bool is_d = j < C;
            const long long c = is_d ? j : j - C;
            if (is_d ? p.has_d : p.has_delta_bias) {
                const T* part = is_d ? part_d : part_bias;
                T sum = T(0);
                for (long long b = 0; b < B; ++b) sum += part[b * C + c];
                (is_d ? dD : ddelta_bias)[c] = sum;
            }
        }
    }
}

// Kernel names: scan_fwd_s<SPL>[l<LPC>]_<dtype>, scan_bwd_..., scan_bwd_sum_<dtype>. At most 4 warps a block
// (cuda.rs plans 1, 2 or 4). Blocks per multiprocessor to keep registers for: the f32 forward asks for 6
// (<= 80 registers; 6 x 31.5 KiB of shared memory fit, 7 would not with the 1 KiB a block the hardware keeps,
// and 6 x 132 SMs hold the 768 blocks of Mamba's (64, 384) in one wave); s8 (S > 128, whose 90 KiB of B/C
// rows allow 2 blocks) asks for 3. NVRTC 13.1 for sm_90 (`-Xptxas -v`), scan3: scan_fwd_s4l4_f32 72
// registers, no spills (was 80 with 12 bytes); s4 79 / none; s8 122 / none; f64 s4 128, s8 126, none. The
// backward's 66 KiB allow 3 blocks (at most 168 registers: s4 157, s8 168, no spills); scan_bwd4 (s4l4 f32)
// takes 54 KiB at tile 32, 4 blocks (128 registers, NVRTC 13.5: 128, no spills; it was 168). f64, the
// gradient-check dtype, gets twice the registers per block. scan_fwd_s2l8_f32 (scan5: 8 lanes of 2 states,
// the forward of grids under half a wave of s4l4, e.g. (8, 1536)) takes 27 KiB and asks for 7 blocks (<= 72
// registers; 8 would need 8 x 28 KiB of shared memory): NVRTC 13.5 70 registers, no spills.
#define SCAN_MAX_THREADS 128

#define SCAN_FWD_KERNEL(T, SUFFIX, NAME, SPL, LPC, FWD_MIN)                                         \
    extern "C" __global__ void __launch_bounds__(SCAN_MAX_THREADS, FWD_MIN)                              \
        scan_fwd_##NAME##_##SUFFIX(const ScanParams p, const T* u, const T* delta, const T* A, const T* Bm, \
                                   const T* Cm, const T* D, const T* z, const T* delta_bias, T* out,      \
                                   T* saved) {                                                            \
        scan_fwd<T, SPL, LPC>(p, u, delta, A, Bm, Cm, D, z, delta_bias, out, saved);                      \
    }

#define SCAN_BWD_KERNEL(T, SUFFIX, NAME, BWD_MIN, BODY)                                                   \
    extern "C" __global__ void __launch_bounds__(SCAN_MAX_THREADS, BWD_MIN)                              \
        scan_bwd_##NAME##_##SUFFIX(const ScanParams p, const T* u, const T* delta, const T* A, const T* Bm, \
                                   const T* Cm, const T* D, const T* z, const T* delta_bias,              \
                                   const T* saved, const T* gout, T* du, T* ddelta, T* dz, T* part_bc,    \
                                   T* part_a, T* part_d, T* part_bias) {                                  \
        BODY(p, u, delta, A, Bm, Cm, D, z, delta_bias, saved, gout, du, ddelta, dz, part_bc, part_a,      \
             part_d, part_bias);                                                                          \
    }

#define SCAN_KERNELS(T, SUFFIX, NAME, SPL, LPC, FWD_MIN, BWD_MIN) \
    SCAN_FWD_KERNEL(T, SUFFIX, NAME, SPL, LPC, FWD_MIN)           \
    SCAN_BWD_KERNEL(T, SUFFIX, NAME, BWD_MIN, (scan_bwd<T, SPL, LPC>))

// scan_<dir>_s<SPL>_<dtype> take any lanes per channel; scan_<dir>_s4l4_f32 are S = 9 .. 16 (Mamba's 16)
// (4 lanes of 4 states) with the lane count compiled in; their backward is scan_bwd4 (54 KiB of shared
// memory at tile 32: 4 blocks a multiprocessor, so at most 128 registers). scan_fwd_s2l8_f32 is their
// forward for small grids: twice the threads a channel (cuda.rs `forward_plan`).
SCAN_KERNELS(float, f32, s4, 4, 0, 6, 3)
SCAN_KERNELS(float, f32, s8, 8, 0, 3, 3)
SCAN_FWD_KERNEL(float, f32, s4l4, 4, 4, 6)
SCAN_FWD_KERNEL(float, f32, s2l8, 2, 8, 7)
SCAN_BWD_KERNEL(float, f32, s4l4, 4, scan_bwd4)
SCAN_KERNELS(double, f64, s4, 4, 0, 4, 1)
SCAN_KERNELS(double, f64, s8, 8, 0, 4, 1)

extern "C" __global__ void scan_bwd_sum_f32(const ScanParams p, const float* part_bc, const float* part_a,
                                            const float* part_d, const float* part_bias, float* dB, float* dC,
                                            float* dA, float* dD, float* ddelta_bias) {
    scan_bwd_sum<float>(p, part_bc, part_a, part_d, part_bias, dB, dC, dA, dD, ddelta_bias);
}
extern "C" __global__ void scan_bwd_sum_f64(const ScanParams p, const double* part_bc, const double* part_a,
                                            const double* part_d, const double* part_bias, double* dB,
                                            double* dC, double* dA, double* dD, double* ddelta_bias) {
    scan_bwd_sum<double>(p, part_bc, part_a, part_d, part_bias, dB, dC, dA, dD, ddelta_bias);
}
