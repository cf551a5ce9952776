// Runs linattn.cu's kernels on the scan's CPU emulator (ops/src/scan/emu/cuda_emu.h: every thread a fiber,
// barriers as switch points, a seeded random thread order between them) against a float64 evaluation of the
// formulas of linattn/mod.rs, over shapes, head widths (every padded width), slicings and both dtypes.
// Outputs start as NaN, so an element no kernel writes fails; each case runs twice with different thread
// orders and must give the same bits (a missing barrier would not). Exit status 0 when every case passes.
//
//   g++ -std=c++17 -O1 -o /tmp/linattn_emu ops/src/linattn/emu/harness.cpp && /tmp/linattn_emu
#include "../../scan/emu/cuda_emu.h"

// The emulator runs a block's threads as fibers of one OS thread: `static` locals are what they share.
#undef __shared__
#define __shared__ static

// The tiled token pass checks its vector accesses' alignment here (a no-op on the GPU).
#define LA_CHECK_ALIGNED(ptr, bytes) emu::check_aligned((ptr), (bytes))

#include "../../../../engine/src/cuda/prelude.cuh"
#include "../../prelude.cuh"
#include "../linattn.cu"

#include <limits>
#include <string>

namespace {

struct Case {
    long long b, h, w, c, heads;
};

std::vector<double> uniform(std::mt19937_64& g, size_t n, double lo, double hi) {
    std::uniform_real_distribution<double> d(lo, hi);
    std::vector<double> v(n);
    for (auto& x : v) x = d(g);
    return v;
}

// RoPE's table as rope/cpu.rs builds it, in T.
template <typename T> std::vector<T> table(const Case& k, double base) {
    const long long q = k.c / 4;
    std::vector<T> theta(q), t;
    for (long long m = 0; m < q; ++m) theta[m] = T(1) / std::pow(T(base), T(m) / T(q));
    for (long long pos : {k.h, k.w})
        for (long long r = 0; r < pos; ++r)
            for (long long m = 0; m < q; ++m) {
                const T a = T(r) * theta[m];
                t.push_back(std::cos(a));
                t.push_back(std::sin(a));
            }
    return t;
}

struct Result {
    std::vector<double> out, kmean, kv, dqk, dv;
};

double phi(double x) { return x > 0 ? x + 1 : std::expm1(x) + 1; }

// The formulas of linattn/mod.rs in double, token by token.
Result reference(const Case& k, const std::vector<double>& qk, const std::vector<double>& v,
                 const std::vector<double>& g, const std::vector<double>& tab, double eps) {
    const long long B = k.b, N = k.h * k.w, C = k.c, Hh = k.heads, d = C / Hh, Q = C / 4;
    auto cs = [&](long long n, long long c, double& co, double& si) {
        const long long p = c / 2, row = p < Q ? n / k.w : k.h + n % k.w;
        co = tab[(row * Q + p % Q) * 2];
        si = tab[(row * Q + p % Q) * 2 + 1];
    };
    // f[n][c] = phi(raw), r = R f, over all channels of one half.
    auto feats = [&](long long b, long long n, int part, std::vector<double>& f, std::vector<double>& r) {
        for (long long c = 0; c < C; ++c) f[c] = phi(qk[(b * N + n) * 2 * C + part * C + c]);
        for (long long c = 0; c < C; c += 2) {
            double co, si;
            cs(n, c, co, si);
            r[c] = f[c] * co - f[c + 1] * si;
            r[c + 1] = f[c] * si + f[c + 1] * co;
        }
    };
    auto unrot = [&](long long n, std::vector<double>& x) {
        for (long long c = 0; c < C; c += 2) {
            double co, si;
            cs(n, c, co, si);
            const double a = x[c], b = x[c + 1];
            x[c] = a * co + b * si;
            x[c + 1] = -a * si + b * co;
        }
    };
    Result r;
    r.out.assign(B * N * C, 0);
    r.kmean.assign(B * C, 0);
    r.kv.assign(B * Hh * d * d, 0);
    r.dqk.assign(B * N * 2 * C, 0);
    r.dv.assign(B * N * C, 0);
    std::vector<double> q(C), qr(C), kk(C), kr(C), dkv(B * Hh * d * d, 0), dkm(B * C, 0), ds(B * N * Hh);
    for (long long b = 0; b < B; ++b) {
        for (long long n = 0; n < N; ++n) {
            feats(b, n, 1, kk, kr);
            for (long long c = 0; c < C; ++c) r.kmean[b * C + c] += kk[c] / N;
            for (long long h = 0; h < Hh; ++h)
                for (long long i = 0; i < d; ++i)
                    for (long long e = 0; e < d; ++e)
                        r.kv[((b * Hh + h) * d + i) * d + e] += kr[h * d + i] * v[(b * N + n) * C + h * d + e] / N;
        }
        for (long long n = 0; n < N; ++n) {
            feats(b, n, 0, q, qr);
            for (long long h = 0; h < Hh; ++h) {
                double dot = 0, dz = 0;
                for (long long j = 0; j < d; ++j) dot += q[h * d + j] * r.kmean[b * C + h * d + j];
                const double z = 1 / (dot + eps);
                for (long long e = 0; e < d; ++e) {
                    double o = 0;
                    for (long long i = 0; i < d; ++i) o += qr[h * d + i] * r.kv[((b * Hh + h) * d + i) * d + e];
                    r.out[(b * N + n) * C + h * d + e] = o * z;
                    dz += g[(b * N + n) * C + h * d + e] * o;
                }
                const double s = -dz * z * z;
                ds[(b * N + n) * Hh + h] = s;
                for (long long i = 0; i < d; ++i)
                    for (long long e = 0; e < d; ++e)
                        dkv[((b * Hh + h) * d + i) * d + e] += qr[h * d + i] * g[(b * N + n) * C + h * d + e] * z;
                for (long long j = 0; j < d; ++j) dkm[b * C + h * d + j] += s * q[h * d + j];
            }
        }
        for (long long n = 0; n < N; ++n) {
            feats(b, n, 0, q, qr);
            feats(b, n, 1, kk, kr);
            std::vector<double> dqr(C), dkr(C);
            for (long long h = 0; h < Hh; ++h) {
                double dot = 0;
                for (long long j = 0; j < d; ++j) dot += q[h * d + j] * r.kmean[b * C + h * d + j];
                const double z = 1 / (dot + eps);
                for (long long i = 0; i < d; ++i) {
                    double a = 0, bb = 0;
                    for (long long e = 0; e < d; ++e) {
                        a += g[(b * N + n) * C + h * d + e] * r.kv[((b * Hh + h) * d + i) * d + e];
                        bb += v[(b * N + n) * C + h * d + e] * dkv[((b * Hh + h) * d + i) * d + e];
                    }
                    dqr[h * d + i] = a * z;
                    dkr[h * d + i] = bb / N;
                }
                for (long long e = 0; e < d; ++e) {
                    double a = 0;
                    for (long long i = 0; i < d; ++i) a += kr[h * d + i] * dkv[((b * Hh + h) * d + i) * d + e];
                    r.dv[(b * N + n) * C + h * d + e] = a / N;
                }
            }
            unrot(n, dqr);
            unrot(n, dkr);
            for (long long c = 0; c < C; ++c) {
                const double s = ds[(b * N + n) * Hh + c / d];
                r.dqk[(b * N + n) * 2 * C + c] = (dqr[c] + s * r.kmean[b * C + c]) * std::min(q[c], 1.0);
                r.dqk[(b * N + n) * 2 * C + C + c] = (dkr[c] + dkm[b * C + c] / N) * std::min(kk[c], 1.0);
            }
        }
    }
    return r;
}

template <typename T> std::vector<T> cast(const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); }
template <typename T> std::vector<double> widen(const std::vector<T>& v) { return std::vector<double>(v.begin(), v.end()); }

void launch(unsigned grid, unsigned y, unsigned threads, uint64_t seed, std::function<void()> kernel) {
    for (unsigned by = 0; by < y; ++by) {
        blockIdx.y = by;
        gridDim.y = y;
        for (unsigned blk = 0; blk < grid; ++blk)
            emu::run_block(blk, grid, threads, 0, seed + by, [](void* f) { (*static_cast<std::function<void()>*>(f))(); },
                           &kernel);
    }
    blockIdx.y = 0;
    gridDim.y = 1;
}

#define LA_DISPATCH(DP, T, S, KERNEL, ...)                                        \
    switch (DP) {                                                                 \
        case 8: KERNEL##_d8_##S(__VA_ARGS__); break;                              \
        case 16: KERNEL##_d16_##S(__VA_ARGS__); break;                            \
        case 32: KERNEL##_d32_##S(__VA_ARGS__); break;                            \
        default: KERNEL##_d64_##S(__VA_ARGS__); break;                            \
    }

template <typename T> struct Names;

// The kernels of one dtype by padded width.
#define LA_NAMES(T, S)                                                                                       \
    template <> struct Names<T> {                                                                            \
        static void fwd_reduce(int dp, LinAttnParams p, const T* a, const T* b, const T* c, T* d, T* e) {    \
            LA_DISPATCH(dp, T, S, linattn_fwd_reduce, p, a, b, c, d, e)                                     \
        }                                                                                                    \
        static void fwd_out(int dp, LinAttnParams p, const T* a, const T* b, const T* c, const T* d, T* e,  \
                            T* f, T* g) {                                                                    \
            LA_DISPATCH(dp, T, S, linattn_fwd_out, p, a, b, c, d, e, f, g)                                  \
        }                                                                                                    \
        static void bwd_reduce(int dp, LinAttnParams p, const T* a, const T* b, const T* c, const T* d,     \
                               const T* e, T* f, T* g, T* h) {                                               \
            LA_DISPATCH(dp, T, S, linattn_bwd_reduce, p, a, b, c, d, e, f, g, h)                            \
        }                                                                                                    \
        static void bwd_tokens(int dp, LinAttnParams p, const T* a, const T* b, const T* c, const T* d,     \
                               const T* e, const T* f, const T* g, const T* h, const T* i, T* j, T* k) {     \
            LA_DISPATCH(dp, T, S, linattn_bwd_tokens, p, a, b, c, d, e, f, g, h, i, j, k)                   \
        }                                                                                                    \
        /* blockIdx.y values of the token pass: 1 tiled, 2 for the two-role kernel (cuda.rs tiled_tokens) */ \
        static unsigned token_roles(int dp) {                                                                \
            switch (dp) {                                                                                    \
                case 8: return LaTok<T, 8>::TILED ? 1 : 2;                                                   \
                case 16: return LaTok<T, 16>::TILED ? 1 : 2;                                                 \
                case 32: return LaTok<T, 32>::TILED ? 1 : 2;                                                 \
                default: return LaTok<T, 64>::TILED ? 1 : 2;                                                 \
            }                                                                                                \
        }                                                                                                    \
    };
LA_NAMES(float, f32)
LA_NAMES(double, f64)

// cuda.rs's Plan, for a device whose kernels hold `wr` (reductions) and `wt` (token passes) blocks a wave.
struct Plan {
    int dp, threads;
    long long span, slices;
};

Plan plan_for(const Case& k, int elem, long long wr, long long wt) {
    const long long d = k.c / k.heads, N = k.h * k.w;
    int dp = 8;
    while (dp < d) dp *= 2;
    const long long tt = (elem * dp * dp > 16384 ? 2048 : 4096) / elem / dp;
    const long long tiles = std::max(1LL, (N + tt - 1) / tt), pairs = std::max(1LL, k.b * k.heads);
    const long long most = std::min(tiles, std::max(1LL, (4 * std::max(wr, wt) + pairs - 1) / pairs));
    long long best = -1, span = tt;
    for (long long wanted = 1; wanted <= most; ++wanted) {
        const long long st = (tiles + wanted - 1) / wanted, sl = (tiles + st - 1) / st, bl = pairs * sl;
        const long long cost = ((bl + wr - 1) / wr + (bl + wt - 1) / wt) * (8 * (st + 1) + sl);
        if (best < 0 || cost < best) {
            best = cost;
            span = st * tt;
        }
    }
    return Plan{dp, dp <= 8 ? 64 : 256, span, std::max(1LL, (N + span - 1) / span)};
}

template <typename T> Result run(const Case& k, const Plan& plan, const std::vector<double>& qk_,
                                 const std::vector<double>& v_, const std::vector<double>& g_,
                                 const std::vector<T>& tab, double eps, uint64_t seed) {
    const long long B = k.b, N = k.h * k.w, C = k.c, Hh = k.heads, d = C / Hh;
    const T nan = std::numeric_limits<T>::quiet_NaN();
    auto qk = cast<T>(qk_), v = cast<T>(v_), g = cast<T>(g_);
    LinAttnParams p{B, N, C, Hh, d, k.h, k.w, plan.span, plan.slices, eps, 1.0 / N};
    const long long parts = B * Hh * plan.slices;
    const unsigned grid = (unsigned)parts;
    std::vector<T> part_kv(parts * d * d, nan), part_ks(parts * d, nan), out(B * N * C, nan), kmean(B * C, nan),
        kv(B * Hh * d * d, nan);
    launch(grid, 1, plan.threads, seed, [&] {
        Names<T>::fwd_reduce(plan.dp, p, qk.data(), v.data(), tab.data(), part_kv.data(), part_ks.data());
    });
    launch(grid, 1, plan.threads, seed, [&] {
        Names<T>::fwd_out(plan.dp, p, qk.data(), tab.data(), part_kv.data(), part_ks.data(), kv.data(), kmean.data(),
                          out.data());
    });
    std::vector<T> part_dkv(parts * d * d, nan), part_dkm(parts * d, nan), ds(B * Hh * N, nan),
        dqk(B * N * 2 * C, nan), dv(B * N * C, nan);
    launch(grid, 1, plan.threads, seed, [&] {
        Names<T>::bwd_reduce(plan.dp, p, qk.data(), tab.data(), kv.data(), kmean.data(), g.data(), part_dkv.data(),
                             part_dkm.data(), ds.data());
    });
    launch(grid, Names<T>::token_roles(plan.dp), plan.threads, seed, [&] {
        Names<T>::bwd_tokens(plan.dp, p, qk.data(), v.data(), tab.data(), kv.data(), kmean.data(), g.data(),
                             ds.data(), part_dkv.data(), part_dkm.data(), dqk.data(), dv.data());
    });
    return Result{widen(out), widen(kmean), widen(kv), widen(dqk), widen(dv)};
}

// ||got - want|| / ||want||, or / max(||want||, sqrt(size)) with `floor`: for one token, out_n = z (q . k) v
// is v up to eps, so dq is eps / (q . k)^2 small, a difference of two O(1) terms, and its relative error is
// all roundoff.
double rel_error(const std::vector<double>& got, const std::vector<double>& want, bool floor = false) {
    if (got.size() != want.size()) return INFINITY;
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (std::isnan(got[i])) return NAN;
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    if (floor) den = std::max(den, (double)want.size());
    return num == 0 ? 0 : std::sqrt(num / den);
}

template <typename T> bool check(const Case& k, long long wr, long long wt, uint64_t seed, double tol) {
    std::mt19937_64 gen(seed);
    const long long N = k.h * k.w;
    const auto qk = uniform(gen, k.b * N * 2 * k.c, -2, 2), v = uniform(gen, k.b * N * k.c, -1.5, 1.5),
               g = uniform(gen, k.b * N * k.c, -1, 1);
    const double eps = 1e-6;
    const auto tab = table<T>(k, 10000.0);
    const Result want = reference(k, widen(cast<T>(qk)), widen(cast<T>(v)), widen(cast<T>(g)),
                                  widen(tab), eps);
    const Plan plan = plan_for(k, sizeof(T), wr, wt);
    const Result got = run<T>(k, plan, qk, v, g, tab, eps, seed);
    const Result again = run<T>(k, plan, qk, v, g, tab, eps, seed + 7777);
    const char* names[] = {"out", "kmean", "kv", "dqk", "dv"};
    const std::vector<double>* a[] = {&got.out, &got.kmean, &got.kv, &got.dqk, &got.dv};
    const std::vector<double>* b[] = {&again.out, &again.kmean, &again.kv, &again.dqk, &again.dv};
    const std::vector<double>* w[] = {&want.out, &want.kmean, &want.kv, &want.dqk, &want.dv};
    bool ok = true;
    std::string msg;
    for (int i = 0; i < 5; ++i) {
        const double e = rel_error(*a[i], *w[i], N == 1);
        if (!(e <= tol)) {
            ok = false;
            msg += std::string(" ") + names[i] + "=" + std::to_string(e);
        }
        if (std::memcmp(a[i]->data(), b[i]->data(), a[i]->size() * 8) != 0) {
            ok = false;
            msg += std::string(" ") + names[i] + " depends on the thread order (a race)";
        }
    }
    std::printf("%s %s B%lld %lldx%lld C%lld heads %lld | dp %d span %lld slices %lld%s\n", ok ? "ok  " : "FAIL",
                sizeof(T) == 4 ? "f32" : "f64", k.b, k.h, k.w, k.c, k.heads, plan.dp, plan.span, plan.slices,
                msg.c_str());
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    // Head widths 2 .. 64 (every padded width, some padded), N = 1, one row, odd grids; the wave sizes
    // vary the slicing (many slices, a last slice shorter than the others, one slice).
    const Case cases[] = {
        {2, 3, 5, 8, 2},  {1, 1, 1, 4, 1},  {3, 4, 4, 16, 1}, {2, 2, 7, 12, 3}, {1, 6, 2, 24, 2},
        {1, 7, 7, 64, 2}, {1, 1, 40, 8, 2}, {1, 5, 9, 64, 1}, {1, 9, 10, 96, 2}, {1, 8, 8, 128, 4},
        {2, 3, 3, 32, 2},
        // Head widths 2 mod 4 (the tiled token pass's 2-channel path) with an odd C/4, and a token count
        // past two of its 64-token f32 tiles at width 32.
        {2, 3, 4, 12, 2}, {1, 5, 5, 20, 2}, {1, 6, 11, 60, 2}, {1, 13, 11, 64, 2},
    };
    for (const Case& k : cases)
        for (long long waves : {256, 4, 1}) {
            ok &= check<float>(k, waves * 3 / 2, waves, 11, 1e-5);
            ok &= check<double>(k, waves * 3 / 2, waves, 12, 1e-12);
        }
    std::printf(ok ? "all passed\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
