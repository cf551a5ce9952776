// A CPU emulator for the scan's CUDA source, for checking kernels where there is no GPU (see README.md here).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another.
// __syncthreads and the warp shuffles are barriers at which fibers switch. Between barriers the fibers of a
// block run in a random order (seeded), so that a missing barrier (one thread reading shared memory that
// another writes in the same interval) shows up as results that change with the seed. A block whose
// threads disagree on the barriers they reach (divergent __syncthreads, a shuffle not reached by the whole
// warp) is reported as a deadlock.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <random>
#include <vector>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct emu_dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename A, typename B> inline auto min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B> inline auto max(A a, B b) { return a > b ? a : b; }

inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline double __longlong_as_double(long long x) {
    double f;
    std::memcpy(&f, &x, 8);
    return f;
}
inline void __trap() {
    std::fprintf(stderr, "emu: __trap\n");
    std::abort();
}

namespace emu {

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false;
    // The barrier generation this fiber waits to pass (0: not waiting).
    const uint64_t* wait_on = nullptr;
    uint64_t wait_gen = 0;
    unsigned tid = 0;
};

struct Block {
    std::vector<Fiber> fibers;
    ucontext_t sched;
    Fiber* current = nullptr;
    // Block barrier.
    uint64_t block_gen = 1;
    unsigned block_arrived = 0;
    // Warp barriers and the shuffle exchange slots.
    uint64_t warp_gen[32] = {};
    unsigned warp_arrived[32] = {};
    uint64_t slots[32][32] = {};
    unsigned live_in_warp[32] = {};
    std::mt19937_64 rng;
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
};

inline Block* g_block = nullptr;
// The block's dynamic shared memory: exactly the bytes the launch gives (heap, so that AddressSanitizer sees
// an access past its end), 32-byte aligned as on the GPU.
inline unsigned char* g_smem = nullptr;
inline unsigned g_smem_bytes = 0;

inline void yield_to_scheduler() {
    Fiber* f = g_block->current;
    swapcontext(&f->ctx, &g_block->sched);
}

inline void wait_until_passed(const uint64_t* gen, uint64_t my_gen) {
    Fiber* f = g_block->current;
    f->wait_on = gen;
    f->wait_gen = my_gen;
    while (*gen == my_gen) yield_to_scheduler();
    f->wait_on = nullptr;
}

inline void syncthreads() {
    Block* b = g_block;
    const uint64_t my = b->block_gen;
    if (++b->block_arrived == b->fibers.size()) {
        b->block_arrived = 0;
        ++b->block_gen;
        yield_to_scheduler();  // let the others run in a fresh random order
        return;
    }
    wait_until_passed(&b->block_gen, my);
}

inline void syncwarp(unsigned warp) {
    Block* b = g_block;
    const uint64_t my = b->warp_gen[warp];
    if (++b->warp_arrived[warp] == b->live_in_warp[warp]) {
        b->warp_arrived[warp] = 0;
        ++b->warp_gen[warp];
        return;
    }
    wait_until_passed(&b->warp_gen[warp], my);
}

// Lane L gets lane src(L)'s v, or its own v when src(L) lies outside the warp (as __shfl_up_sync and
// __shfl_down_sync leave the lanes whose source is past the warp's edge).
template <typename T, typename Src> inline T shfl_from(T v, Src src) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    if (g_block->live_in_warp[warp] != 32) {
        std::fprintf(stderr, "emu: full-mask shuffle in a partial warp\n");
        std::abort();
    }
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    g_block->slots[warp][lane] = bits;
    syncwarp(warp);
    const int from = src((int)lane);
    const uint64_t got = from >= 0 && from < 32 ? g_block->slots[warp][from] : bits;
    syncwarp(warp);  // every lane has read before any writes its next value
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

template <typename T> inline T shfl_xor(T v, int mask) {
    return shfl_from(v, [mask](int lane) { return lane ^ mask; });
}
template <typename T> inline T shfl_up(T v, int d) {
    return shfl_from(v, [d](int lane) { return lane - d; });
}
template <typename T> inline T shfl_down(T v, int d) {
    return shfl_from(v, [d](int lane) { return lane + d; });
}

inline void trampoline(unsigned lo, unsigned hi) {
    (void)lo;
    (void)hi;
    Block* b = g_block;
    b->body(b->arg);
    b->current->done = true;
    swapcontext(&b->current->ctx, &b->sched);
}

// Runs body(arg) as one block of `threads` threads with `smem` bytes of dynamic shared memory, filled with a
// poison pattern (NaN for floats and doubles) so that reads of unwritten shared memory show up.
inline void run_block(unsigned block, unsigned grid, unsigned threads, unsigned smem, uint64_t seed,
                      void (*body)(void*), void* arg) {
    Block b;
    b.rng.seed(seed * 1000003u + block);
    b.body = body;
    b.arg = arg;
    b.fibers.resize(threads);
    for (unsigned w = 0; w < 32; ++w) b.live_in_warp[w] = 0;
    for (unsigned t = 0; t < threads; ++t) ++b.live_in_warp[t / 32];
    g_smem = static_cast<unsigned char*>(std::aligned_alloc(32, smem == 0 ? 32 : (smem + 31) / 32 * 32));
    std::memset(g_smem, 0xff, smem);
    g_smem_bytes = smem;
    g_block = &b;
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = b.fibers[t];
        f.tid = t;
        f.stack.resize(256 * 1024);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, (void (*)())trampoline, 2, 0u, 0u);
    }
    blockIdx.x = block;
    gridDim.x = grid;
    blockDim.x = threads;
    std::vector<unsigned> order(threads);
    for (unsigned t = 0; t < threads; ++t) order[t] = t;
    for (;;) {
        bool all_done = true, progress = false;
        std::shuffle(order.begin(), order.end(), b.rng);
        for (unsigned t : order) {
            Fiber& f = b.fibers[t];
            if (f.done) continue;
            all_done = false;
            if (f.wait_on && *f.wait_on == f.wait_gen) continue;  // still blocked
            b.current = &f;
            threadIdx.x = t;
            swapcontext(&b.sched, &f.ctx);
            progress = true;
        }
        if (all_done) break;
        if (!progress) {
            std::fprintf(stderr, "emu: deadlock in block %u (threads disagree on barriers)\n", block);
            std::abort();
        }
    }
    g_block = nullptr;
    std::free(g_smem);
    g_smem = nullptr;
}

inline void check_aligned(const void* p, unsigned bytes) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
        std::fprintf(stderr, "emu: a %u-byte vector access at a misaligned address\n", bytes);
        std::abort();
    }
}

}  // namespace emu

// The fast-math intrinsics the scan's f32 gates and decays use, exact here.
#define SCAN_EX2(x) std::exp2(x)
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor((v), (o))
#define __shfl_up_sync(mask, v, d) emu::shfl_up((v), (d))
#define __shfl_down_sync(mask, v, d) emu::shfl_down((v), (d))
#define __syncwarp() emu::syncwarp(threadIdx.x / 32)
#define SCAN_DYNAMIC_SMEM_BYTES() emu::g_smem_bytes
#define SCAN_SHARED_BASE() emu::g_smem
#define SCAN_CHECK_ALIGNED(ptr, bytes) emu::check_aligned((ptr), (bytes))

// The 16-byte vector types and the read-only load that engine/src/cuda/prelude.cuh's load16/store16 use.
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
template <typename T> inline T __ldg(const T* p) {
    emu::check_aligned(p, alignof(T));
    return *p;
}
