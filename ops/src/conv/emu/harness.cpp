// Runs conv.cu's channels-last depthwise kernels (dwl_*) on the CPU emulator of the scan (../../scan/emu) against
// a float64 reference of the conv and its gradients, over shapes, kernels, strides, paddings, dilations, both
// dtypes, both access widths (V = 16 / sizeof(T) and 1) and launch plans (the one conv/cuda.rs makes, and
// narrower blocks and shorter grids, so that threads walk several items); then the NCHW direct 3x3 stride-2
// kernels (dw_s2_*) over odd and even sides, one sample or channel, H or W of 1, the patch merging's sides and
// rows wider than a warp, x and dx aligned or not for pair accesses, the plan of conv/cuda.rs and narrower ones
// whose blocks end inside a warp, and with dx or the weight sums alone; their y and dx also bit for bit against
// the tiled stride-2 instance's; then the dense implicit-GEMM forward (conv_igemm, k channel-major and
// tap-major) against a float64 sum. Exit status 0 when every case passes.
//
//   g++ -std=c++17 -O1 -o /tmp/conv_emu ops/src/conv/emu/harness.cpp && /tmp/conv_emu
//
// (`/tmp/conv_emu quick`: the first cases only; `s2` or `s2-quick`: the NCHW direct 3x3 stride-2 kernels alone;
// `igemm`: conv_igemm alone.)
//
// Outputs start as NaN (an element a kernel leaves unwritten fails), shared memory is poisoned before each
// block, and each case runs with two fiber schedules: results that differ between them mean a race.
#include "../../scan/emu/cuda_emu.h"

// dw_block_sums' scratch: one static array for all the fibers of the block being run (see conv.cu).
#define DW_STATIC_SHARED static

inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

#include "../../../../engine/src/cuda/prelude.cuh"
#include "../../prelude.cuh"
#include "../conv.cu"

// The module's dynamic shared memory (conv.cu declares it extern), poisoned before every block.
__align__(16) unsigned char dw_smem[1 << 16];

#include <string>

namespace {

struct Case {
    int n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw;
    int oh() const { return (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1; }
    int ow() const { return (w + 2 * pw - dw * (kw - 1) - 1) / sw + 1; }
};

enum Kernel { K3S1, K3S2, ANY };

Kernel kernel_of(const Case& k) {
    if (k.kh == 3 && k.kw == 3 && k.dh == 1 && k.dw == 1 && k.sh == k.sw && (k.sh == 1 || k.sh == 2))
        return k.sh == 1 ? K3S1 : K3S2;
    return ANY;
}

int strip_width(Kernel kern) { return kern == K3S1 ? 8 : 4; }

// Runs `f` as a launch of `grid` blocks of `threads`, one block after another.
void launch(unsigned grid, unsigned threads, unsigned smem, uint64_t seed, std::function<void()> f) {
    for (unsigned b = 0; b < grid; ++b) {
        std::memset(dw_smem, 0xff, sizeof(dw_smem));
        emu::run_block(b, grid, threads, smem, seed, [](void* f) { (*static_cast<std::function<void()>*>(f))(); },
                       &f);
    }
}

struct Ref {
    std::vector<double> y, dx, dw, db;
};

Ref reference(const Case& k, const std::vector<double>& x, const std::vector<double>& w,
              const std::vector<double>& b, const std::vector<double>& g) {
    const int oh = k.oh(), ow = k.ow(), taps = k.kh * k.kw;
    Ref r;
    r.y.assign((size_t)k.n * oh * ow * k.c, 0);
    r.dx.assign(x.size(), 0);
    r.dw.assign((size_t)k.c * taps, 0);
    r.db.assign(k.c, 0);
    for (int n = 0; n < k.n; ++n)
        for (int a = 0; a < oh; ++a)
            for (int bb = 0; bb < ow; ++bb)
                for (int c = 0; c < k.c; ++c) {
                    const size_t yi = (((size_t)n * oh + a) * ow + bb) * k.c + c;
                    double acc = b[c];
                    const double gv = g[yi];
                    r.db[c] += gv;
                    for (int i = 0; i < k.kh; ++i)
                        for (int j = 0; j < k.kw; ++j) {
                            const int ih = a * k.sh - k.ph + i * k.dh, iw = bb * k.sw - k.pw + j * k.dw;
                            if (ih < 0 || iw < 0 || ih >= k.h || iw >= k.w) continue;
                            const size_t xi = (((size_t)n * k.h + ih) * k.w + iw) * k.c + c;
                            const double wv = w[(size_t)c * taps + i * k.kw + j];
                            acc += wv * x[xi];
                            r.dx[xi] += gv * wv;
                            r.dw[(size_t)c * taps + i * k.kw + j] += gv * x[xi];
                        }
                    r.y[yi] = acc;
                }
    return r;
}

// ||a - b|| / ||b||, NaN when a holds a NaN.
double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (std::isnan(a[i])) return NAN;
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return num == 0 ? 0 : std::sqrt(num / den);
}

// The layout of a contiguous bias of c channels, as `strided` gives it on the Rust side.
// Same-shape cases whose residual forms (x + conv2d(x), g + dx) were checked, counted once per case and width.
static int residual_cases = 0;

static Strided bias_layout(int c) {
    Strided lb{};
    lb.shape[0] = c;
    lb.strides[0] = 1;
    lb.rank = 1;
    lb.contiguous = 1;
    return lb;
}

template <typename T> std::vector<double> widen(const std::vector<T>& v) { return {v.begin(), v.end()}; }

struct Plan {
    int bx, by, gx, gy;
};

// The plan of conv/cuda.rs (`dwl_plan`) for `items` items and `cv` channel vectors, on `sms` multiprocessors.
Plan rust_plan(int cv, long long items, bool sums, int sms) {
    Plan p;
    p.bx = std::min(cv, 32);
    p.by = 256 / p.bx;
    p.gx = (cv + p.bx - 1) / p.bx;
    const long long per_row = (items + p.by - 1) / p.by;
    if (sums) {
        p.gy = (int)std::max(1LL, (items + p.by * 4LL - 1) / (p.by * 4LL));
    } else {
        p.gy = (int)std::max(1LL, std::min(per_row, (long long)std::max(1, sms * 8 / p.gx)));
    }
    return p;
}

DwlTile tile_of(const Case& k, int V, const Plan& pl, int rows, int strips) {
    return DwlTile{k.n,  k.c,  k.h,  k.w,  k.oh(), k.ow(), k.kh,  k.kw,  k.sh,  k.sw,
                   k.ph, k.pw, k.dh, k.dw, k.c / V, pl.bx,  pl.gx, pl.gy, rows,  strips};
}

template <typename T, int V>
bool check_v(const Case& k, const Ref& ref, const std::vector<T>& x, const std::vector<T>& w,
             const std::vector<T>& b, const std::vector<T>& g, Plan (*plan)(int, long long, bool), double tol,
             const char* what) {
    const Kernel kern = kernel_of(k);
    const int tw = strip_width(kern), oh = k.oh(), ow = k.ow(), taps = k.kh * k.kw, cv = k.c / V;
    const char* names[] = {"3x3s1", "3x3s2", "any"};
    const std::string label = std::string(what) + " " + names[kern] + " V=" + std::to_string(V) + " n" +
                              std::to_string(k.n) + " c" + std::to_string(k.c) + " " + std::to_string(k.h) + "x" +
                              std::to_string(k.w) + " k" + std::to_string(k.kh) + "x" + std::to_string(k.kw) +
                              " s" + std::to_string(k.sh) + "," + std::to_string(k.sw) + " p" + std::to_string(k.ph) +
                              "," + std::to_string(k.pw) + " d" + std::to_string(k.dh) + "," + std::to_string(k.dw);
    const Strided lb = bias_layout(k.c);
    bool ok = true;
    std::vector<double> first[4];
    for (uint64_t seed : {1u, 2u}) {
        // Forward and dx with an epilogue (fwd: plain 0, residual 1, activations; dx: residual 0 or 1).
        const int fstrips = (ow + tw - 1) / tw;
        const Plan pf = plan(cv, (long long)k.n * oh * fstrips, false);
        const DwlTile tf = tile_of(k, V, pf, oh, fstrips);
        auto forward = [&](int epi) {
            std::vector<T> out((size_t)k.n * oh * ow * k.c, T(NAN));
            launch(pf.gx * pf.gy, pf.bx * pf.by, 0, seed, [&] {
                if (kern == K3S1) dwl_fwd_rows_impl<T, V, 3, 3, 1, 8>(x.data(), w.data(), b.data(), lb, 1, epi, out.data(), tf);
                if (kern == K3S2) dwl_fwd_rows_impl<T, V, 3, 3, 2, 4>(x.data(), w.data(), b.data(), lb, 1, epi, out.data(), tf);
                if (kern == ANY) dwl_fwd_any_impl<T, V, 4>(x.data(), w.data(), b.data(), lb, 1, epi, out.data(), tf);
            });
            return out;
        };
        const int dstrips = (k.w + tw - 1) / tw;
        const Plan pd = plan(cv, (long long)k.n * k.h * dstrips, false);
        const DwlTile td = tile_of(k, V, pd, k.h, dstrips);
        auto input_grad = [&](int residual) {
            std::vector<T> out(x.size(), T(NAN));
            launch(pd.gx * pd.gy, pd.bx * pd.by, 0, seed, [&] {
                if (kern == K3S1 && k.sh == 1) dwl_dx_rows_impl<T, V, 3, 3, 8>(g.data(), w.data(), out.data(), residual, td);
                if (kern == K3S2) dwl_dx_gather_impl<T, V, 3, 3, 2, 4>(g.data(), w.data(), out.data(), residual, td);
                if (kern == ANY) dwl_dx_gather_impl<T, V, 0, 0, 1, 4>(g.data(), w.data(), out.data(), residual, td);
            });
            return out;
        };
        const std::vector<T> y = forward(DWL_EPI_PLAIN), dx = input_grad(0);
        // With the output in the input's shape, the residual forms (x + conv2d(x) and g + dx) must be the
        // plain kernels' outputs plus x or g, bit for bit: the sums the composition forms.
        if (oh == k.h && ow == k.w) {
            const std::vector<T> yr = forward(DWL_EPI_RESIDUAL), dxr = input_grad(1);
            size_t bad = 0;
            for (size_t i = 0; i < y.size(); ++i) bad += !(yr[i] == x[i] + y[i]) + !(dxr[i] == g[i] + dx[i]);
            if (bad) {
                std::printf("FAIL %s: %zu residual outputs differ from the plain ones plus x or g\n", label.c_str(), bad);
                ok = false;
            }
            residual_cases += seed == 1;
        }
        // The activation epilogues: the plain output through the elementwise formula, bit for bit.
        for (int epi = DWL_EPI_RELU; epi <= DWL_EPI_GELU; ++epi) {
            const std::vector<T> ya = forward(epi);
            size_t bad = 0;
            for (size_t i = 0; i < y.size(); ++i) {
                T one[1] = {y[i]};
                dwl_activate<T, 1>(one, epi);
                bad += !(ya[i] == one[0]);
            }
            if (bad) {
                std::printf("FAIL %s: %zu outputs of epilogue %d differ from the plain ones activated\n", label.c_str(), bad, epi);
                ok = false;
            }
        }
        // Weight and bias partials, then dw_reduce.
        const Plan ps = plan(cv, (long long)k.n * oh * fstrips, true);
        const DwlTile ts = tile_of(k, V, ps, oh, fstrips);
        std::vector<double> part((size_t)k.c * ps.gy * (taps + 1), NAN);
        launch(ps.gx * ps.gy, ps.bx * ps.by, ps.bx * ps.by * V * 8, seed, [&] {
            if (kern == K3S1) dwl_sums_rows_impl<T, V, 3, 3, 1, 8>(x.data(), g.data(), part.data(), ts, 1);
            if (kern == K3S2) dwl_sums_rows_impl<T, V, 3, 3, 2, 4>(x.data(), g.data(), part.data(), ts, 1);
            if (kern == ANY) dwl_sums_any_impl<T, V, 4>(x.data(), g.data(), part.data(), ts, 1);
        });
        std::vector<T> dw((size_t)k.c * taps, T(NAN)), db(k.c, T(NAN));
        launch((k.c * 32 + 255) / 256, 256, 0, seed,
               [&] { dw_reduce_impl<T>(part.data(), dw.data(), db.data(), k.c, ps.gy, taps, 1, 1); });
        const std::vector<double> got[4] = {widen(y), widen(dx), widen(dw), widen(db)};
        const std::vector<double>* want[4] = {&ref.y, &ref.dx, &ref.dw, &ref.db};
        const char* parts[4] = {"y", "dx", "dw", "db"};
        for (int q = 0; q < 4; ++q) {
            const double e = rel_error(got[q], *want[q]);
            if (!(e <= tol)) {
                std::printf("FAIL %s: %s relative error %.3e\n", label.c_str(), parts[q], e);
                ok = false;
            }
            if (seed == 1) {
                first[q] = got[q];
            } else if (got[q] != first[q]) {
                std::printf("FAIL %s: %s differs between schedules (a race)\n", label.c_str(), parts[q]);
                ok = false;
            }
        }
    }
    if (ok) std::printf("ok   %s\n", label.c_str());
    return ok;
}

Plan plan_h200(int cv, long long items, bool sums) { return rust_plan(cv, items, sums, 132); }
Plan plan_one_sm(int cv, long long items, bool sums) { return rust_plan(cv, items, sums, 1); }
// Narrow blocks (at most 4 channel vectors a block, 8 rows of threads) and a grid of at most 3 rows: several
// blocks along the channels, threads with many items.
Plan plan_narrow(int cv, long long items, bool) {
    Plan p;
    p.bx = std::min(cv, 4);
    p.by = 8;
    p.gx = (cv + p.bx - 1) / p.bx;
    p.gy = (int)std::min(3LL, std::max(1LL, (items + p.by - 1) / p.by));
    return p;
}

template <typename T>
bool check(const Case& k, uint64_t seed, double tol) {
    std::mt19937_64 gen(seed);
    std::uniform_real_distribution<double> d(-1, 1);
    const int taps = k.kh * k.kw;
    std::vector<T> x((size_t)k.n * k.h * k.w * k.c), w((size_t)k.c * taps), b(k.c),
        g((size_t)k.n * k.oh() * k.ow() * k.c);
    for (auto* v : {&x, &w, &b, &g})
        for (auto& e : *v) e = T(d(gen));
    const Ref ref = reference(k, widen(x), widen(w), widen(b), widen(g));
    const int VEC = 16 / sizeof(T);
    bool ok = true;
    for (auto plan : {plan_h200, plan_one_sm, plan_narrow}) {
        const char* what = plan == plan_h200 ? "h200" : plan == plan_one_sm ? "1sm" : "narrow";
        if (k.c % VEC == 0) ok &= check_v<T, 16 / sizeof(T)>(k, ref, x, w, b, g, plan, tol, what);
        ok &= check_v<T, 1>(k, ref, x, w, b, g, plan, tol, what);
    }
    return ok;
}


// ---- the NCHW 3x3 stride-2 padding-1 direct kernels (dw_s2_fwd, dw_s2_bwd, then dw_reduce) -------------------

struct S2Case {
    int n, c, h, w;
    int oh() const { return (h - 1) / 2 + 1; }
    int ow() const { return (w - 1) / 2 + 1; }
};

// The plan of conv/cuda.rs (`dw_s2_plan`) with `threads` a block and at most `items` items a thread of the
// backward, or a chunk of `chunk` items a block when chunk > 0 (ranges that end inside a warp, many blocks a
// channel).
struct S2Plan {
    DwS2 p;
    int threads;
};

S2Plan s2_plan(const S2Case& k, int threads, int items, int chunk) {
    DwS2 p{};
    p.n = k.n;
    p.c = k.c;
    p.h = k.h;
    p.w = k.w;
    p.oh = k.oh();
    p.ow = k.ow();
    p.runs = (p.oh + DW_S2_RUN - 1) / DW_S2_RUN;
    p.items = p.runs * p.ow;
    p.span = p.n * p.items;
    p.total = p.c * p.span;
    if (chunk > 0) {
        p.chunk = chunk;
        p.per = (p.span + chunk - 1) / chunk;
    } else {
        const int most = threads * items;
        p.per = (p.span + most - 1) / most;
        p.chunk = (p.span + p.per - 1) / p.per;
    }
    return S2Plan{p, threads};
}

struct S2Ref {
    std::vector<double> y, dx, dw, db;
};

// The definition in float64: y[n, c, a, b] = bias[c] + sum_{i, j} w[c, i, j] x[n, c, 2a - 1 + i, 2b - 1 + j].
S2Ref s2_reference(const S2Case& k, const std::vector<double>& x, const std::vector<double>& w,
                   const std::vector<double>& b, const std::vector<double>& g) {
    const int oh = k.oh(), ow = k.ow();
    S2Ref r;
    r.y.assign((size_t)k.n * k.c * oh * ow, 0);
    r.dx.assign(x.size(), 0);
    r.dw.assign((size_t)k.c * 9, 0);
    r.db.assign(k.c, 0);
    for (int n = 0; n < k.n; ++n)
        for (int c = 0; c < k.c; ++c)
            for (int a = 0; a < oh; ++a)
                for (int bb = 0; bb < ow; ++bb) {
                    const size_t yi = (((size_t)n * k.c + c) * oh + a) * ow + bb;
                    double acc = b[c];
                    r.db[c] += g[yi];
                    for (int i = 0; i < 3; ++i)
                        for (int j = 0; j < 3; ++j) {
                            const int ih = 2 * a - 1 + i, iw = 2 * bb - 1 + j;
                            if (ih < 0 || iw < 0 || ih >= k.h || iw >= k.w) continue;
                            const size_t xi = (((size_t)n * k.c + c) * k.h + ih) * k.w + iw;
                            acc += w[c * 9 + i * 3 + j] * x[xi];
                            r.dx[xi] += g[yi] * w[c * 9 + i * 3 + j];
                            r.dw[c * 9 + i * 3 + j] += g[yi] * x[xi];
                        }
                    r.y[yi] = acc;
                }
    return r;
}

// One plan, one offset of x and dx in their buffers (0, or 1 element: pointers not aligned for pair accesses),
// and the three combinations of need_dx and need_sums, each run under two schedules.
template <typename T>
bool s2_check_plan(const S2Case& k, const S2Ref& ref, const std::vector<T>& x0, const std::vector<T>& w,
                   const std::vector<T>& b, const std::vector<T>& g, const S2Plan& pl, int shift, double tol,
                   const char* what) {
    const std::string label = std::string("s2 ") + what + (sizeof(T) == 4 ? " f32" : " f64") + " shift " +
                              std::to_string(shift) + " n" + std::to_string(k.n) + " c" + std::to_string(k.c) +
                              " " + std::to_string(k.h) + "x" + std::to_string(k.w) + " threads " +
                              std::to_string(pl.threads) + " chunk " + std::to_string(pl.p.chunk) + " per " +
                              std::to_string(pl.p.per);
    const DwS2 p = pl.p;
    std::vector<T> xbuf(x0.size() + shift);
    std::copy(x0.begin(), x0.end(), xbuf.begin() + shift);
    const T* x = xbuf.data() + shift;
    const Strided lb = bias_layout(k.c);
    bool ok = true;
    auto fail = [&](const char* part, const char* why, double e) {
        std::printf("FAIL %s: %s %s %.3e\n", label.c_str(), part, why, e);
        ok = false;
    };
    std::vector<double> first[4];
    double worst[4] = {0, 0, 0, 0};
    for (uint64_t seed : {1u, 2u}) {
        std::vector<T> y((size_t)k.n * k.c * k.oh() * k.ow(), T(NAN));
        const unsigned fgrid = (p.total + pl.threads - 1) / pl.threads;
        launch(fgrid, pl.threads, 0, seed,
               [&] { dw_s2_fwd_impl<T>(x, w.data(), b.data(), lb, 1, y.data(), p); });
        const double ey = rel_error(widen(y), ref.y);
        worst[0] = std::max(worst[0], ey);
        if (!(ey <= tol)) fail("y", "relative error", ey);
        for (int flags = 0; flags < 3; ++flags) {
            const int need_dx = flags != 1, need_sums = flags != 2;
            std::vector<T> dxbuf(x0.size() + shift, T(NAN));
            T* dx = dxbuf.data() + shift;
            std::vector<double> part((size_t)k.c * p.per * 10, NAN);
            launch(k.c * p.per, pl.threads, 0, seed, [&] {
                dw_s2_bwd_impl<T>(x, w.data(), g.data(), dx, part.data(), p, need_dx, need_sums);
            });
            std::vector<T> dw((size_t)k.c * 9, T(NAN)), db(k.c, T(NAN));
            if (need_sums) {
                launch((k.c * 32 + 255) / 256, 256, 0, seed,
                       [&] { dw_reduce_impl<T>(part.data(), dw.data(), db.data(), k.c, p.per, 9, 1, 1); });
            }
            std::vector<T> dxv(dx, dx + x0.size());
            if (need_dx) {
                const double e = rel_error(widen(dxv), ref.dx);
                worst[1] = std::max(worst[1], e);
                if (!(e <= tol)) fail("dx", "relative error", e);
            } else if (std::any_of(dxbuf.begin(), dxbuf.end(), [](T v) { return !std::isnan(v); })) {
                fail("dx", "written without need_dx", 0);
            }
            if (need_sums) {
                const double ew = rel_error(widen(dw), ref.dw), eb = rel_error(widen(db), ref.db);
                worst[2] = std::max(worst[2], ew);
                worst[3] = std::max(worst[3], eb);
                if (!(ew <= tol)) fail("dw", "relative error", ew);
                if (!(eb <= tol)) fail("db", "relative error", eb);
            } else if (std::any_of(part.begin(), part.end(), [](double v) { return !std::isnan(v); })) {
                fail("partials", "written without need_sums", 0);
            }
            if (flags == 0) {
                const std::vector<double> got[4] = {widen(y), widen(dxv), widen(dw), widen(db)};
                const char* parts[4] = {"y", "dx", "dw", "db"};
                for (int q = 0; q < 4; ++q) {
                    if (seed == 1) {
                        first[q] = got[q];
                    } else if (got[q] != first[q]) {
                        fail(parts[q], "differs between schedules (a race)", 0);
                    }
                }
            }
        }
    }
    if (ok)
        std::printf("ok   %s (y %.1e dx %.1e dw %.1e db %.1e)\n", label.c_str(), worst[0], worst[1], worst[2],
                    worst[3]);
    return ok;
}

// y and dx of the direct kernels against the tiled stride-2 instance (dw_fwd_tiled_impl / dw_bwd_tiled_impl
// <T, 3, 3, 2>) on a one-band, one-plane-a-block tiling: the same taps in the same order, so the same bits.
template <typename T>
bool s2_same_bits_as_tiled(const S2Case& k, const std::vector<T>& x, const std::vector<T>& w,
                           const std::vector<T>& b, const std::vector<T>& g) {
    const int oh = k.oh(), ow = k.ow(), run = 4;
    const int a1r = (oh + run - 1) / run * run, r1r = (k.h + run - 1) / run * run;
    const int xrows = (a1r - 1) * 2 + 3, grows = std::max(a1r, r1r / 2 + 1);
    const DwTile t{k.n, k.c, k.h, k.w, oh, ow, 3, 3, 2, 2, 1, 1, 1, 1, 1, k.n, oh, 1, xrows, grows};
    const unsigned smem = (unsigned)((xrows * k.w + grows * ow) * sizeof(T));
    if (smem > sizeof(dw_smem)) return true;  // too large for the harness's shared memory: not compared
    const Strided lb = bias_layout(k.c);
    const S2Plan pl = s2_plan(k, 256, 4, 0);
    std::vector<T> y1((size_t)k.n * k.c * oh * ow, T(NAN)), y2 = y1, dx1(x.size(), T(NAN)), dx2 = dx1;
    std::vector<double> part((size_t)k.c * pl.p.per * 10), tpart((size_t)k.c * k.n * 10);
    launch((pl.p.total + 255) / 256, 256, 0, 1,
           [&] { dw_s2_fwd_impl<T>(x.data(), w.data(), b.data(), lb, 1, y1.data(), pl.p); });
    launch(k.c * pl.p.per, 256, 0, 1,
           [&] { dw_s2_bwd_impl<T>(x.data(), w.data(), g.data(), dx1.data(), part.data(), pl.p, 1, 0); });
    launch(k.c * k.n, 256, smem, 1,
           [&] { dw_fwd_tiled_impl<T, 3, 3, 2>(x.data(), w.data(), b.data(), lb, 1, y2.data(), t); });
    launch(k.c * k.n, 256, smem, 1, [&] {
        dw_bwd_tiled_impl<T, 3, 3, 2>(x.data(), w.data(), g.data(), dx2.data(), tpart.data(), t, 1, 0);
    });
    const bool same = std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(T)) == 0 &&
                      std::memcmp(dx1.data(), dx2.data(), dx1.size() * sizeof(T)) == 0;
    if (!same)
        std::printf("FAIL s2 %s n%d c%d %dx%d: y or dx bits differ from the tiled kernel's\n",
                    sizeof(T) == 4 ? "f32" : "f64", k.n, k.c, k.h, k.w);
    return same;
}

template <typename T>
bool s2_check(const S2Case& k, uint64_t seed, double tol, bool quick) {
    std::mt19937_64 gen(seed);
    std::uniform_real_distribution<double> d(-1, 1);
    std::vector<T> x((size_t)k.n * k.c * k.h * k.w), w((size_t)k.c * 9), b(k.c),
        g((size_t)k.n * k.c * k.oh() * k.ow());
    for (auto* v : {&x, &w, &b, &g})
        for (auto& e : *v) e = T(d(gen));
    const S2Ref ref = s2_reference(k, widen(x), widen(w), widen(b), widen(g));
    bool ok = s2_check_plan<T>(k, ref, x, w, b, g, s2_plan(k, 256, 4, 0), 0, tol, "h200");
    ok &= s2_same_bits_as_tiled<T>(k, x, w, b, g);
    if (quick) return ok;
    ok &= s2_check_plan<T>(k, ref, x, w, b, g, s2_plan(k, 256, 4, 0), 1, tol, "h200");
    // 64 threads, ranges of 37 items: blocks end inside warps, several blocks a channel, several turns a thread.
    ok &= s2_check_plan<T>(k, ref, x, w, b, g, s2_plan(k, 64, 1, 37), 0, tol, "narrow");
    ok &= s2_check_plan<T>(k, ref, x, w, b, g, s2_plan(k, 32, 1, 100), 1, tol, "one warp");
    return ok;
}

bool s2_all(bool quick) {
    //  n  c   h   w
    const S2Case cases[] = {
        {2, 3, 9, 11},   // odd sides
        {2, 4, 8, 10},   // even sides (pair accesses)
        {1, 1, 7, 5},    // one sample, one channel
        {3, 2, 2, 2},    // 2x2 (the MNIST model's smallest)
        {1, 2, 1, 1},    // one pixel
        {2, 3, 1, 9},    // H = 1
        {2, 3, 9, 1},    // W = 1
        {2, 5, 14, 14},  // MLLA's last merge (7x7 out: a partial run)
        {2, 3, 28, 28},  // MLLA's second merge
        {1, 2, 56, 56},  // MLLA's first merge
        {3, 2, 13, 64},  // OW = 32: a warp is one row
        {1, 2, 5, 130},  // OW = 65: rows wider than a warp
        {2, 3, 17, 67},  // odd, wide
    };
    bool ok = true;
    int count = 0;
    for (const S2Case& k : cases) {
        if (quick && ++count > 5) break;
        ok &= s2_check<float>(k, 21, 1e-5, quick);
        ok &= s2_check<double>(k, 22, 1e-12, quick);
    }
    return ok;
}
}  // namespace

// ---- conv_igemm: the dense / grouped NCHW implicit-GEMM forward, channel-major and tap-major -----------------

struct DenseCase {
    int n, c, h, w, o, kh, kw, sh, sw, ph, pw, dh, dw, groups;
    int oh() const { return (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1; }
    int ow() const { return (w + 2 * pw - dw * (kw - 1) - 1) / sw + 1; }
};

// Runs conv_igemm_impl<T, TAP> over its whole grid (blockIdx.y, .z set here, .x by the emulator) and checks y
// against a float64 sum with a bound of the summation's rounding (2 K eps times the sum of the terms' sizes);
// two fiber schedules must give the same bits.
template <typename T, bool TAP>
bool igemm_check(const DenseCase& k, uint64_t seed) {
    const int oh = k.oh(), ow = k.ow(), cg = k.c / k.groups, og = k.o / k.groups, taps = k.kh * k.kw;
    const Conv2dParams p{k.n, k.c, k.h, k.w, k.o, k.kh, k.kw, k.sh, k.sw, k.ph, k.pw, k.dh, k.dw, k.groups, oh, ow};
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    auto draw = [&](size_t len) {
        std::vector<T> v(len);
        for (auto& e : v) e = T(nd(rng));
        return v;
    };
    const std::vector<T> x = draw((size_t)k.n * k.c * k.h * k.w), w = draw((size_t)k.o * cg * taps), b = draw(k.o);
    const Strided lb = bias_layout(k.o);
    const long long cols = (long long)k.n * oh * ow;
    const unsigned gx = (unsigned)((cols + 255) / 256), gy = (unsigned)((og + 31) / 32);
    std::vector<T> runs[2];
    for (int r = 0; r < 2; ++r) {
        runs[r].assign((size_t)k.n * k.o * oh * ow, T(NAN));
        for (unsigned z = 0; z < (unsigned)k.groups; ++z)
            for (unsigned yb = 0; yb < gy; ++yb) {
                blockIdx.y = yb;
                blockIdx.z = z;
                gridDim.y = gy;
                gridDim.z = k.groups;
                launch(gx, 256, 0, seed + 7 * r, [&] {
                    conv_igemm_impl<T, TAP>(x.data(), w.data(), b.data(), lb, 1, runs[r].data(), p);
                });
            }
        blockIdx.y = blockIdx.z = 0;
        gridDim.y = gridDim.z = 1;
    }
    const double eps = sizeof(T) == 4 ? 6e-8 : 1.2e-16;
    bool ok = true;
    int bad = 0;
    for (int n = 0; n < k.n; ++n)
        for (int o = 0; o < k.o; ++o)
            for (int a = 0; a < oh; ++a)
                for (int bb = 0; bb < ow; ++bb) {
                    const int q = o / og;
                    double ref = b[o], size = std::fabs((double)b[o]);
                    for (int c = 0; c < cg; ++c)
                        for (int i = 0; i < k.kh; ++i)
                            for (int j = 0; j < k.kw; ++j) {
                                const int ih = a * k.sh - k.ph + i * k.dh, iw = bb * k.sw - k.pw + j * k.dw;
                                if (ih < 0 || ih >= k.h || iw < 0 || iw >= k.w) continue;
                                const double t = (double)w[((size_t)o * cg + c) * taps + i * k.kw + j] *
                                                 (double)x[(((size_t)n * k.c + q * cg + c) * k.h + ih) * k.w + iw];
                                ref += t;
                                size += std::fabs(t);
                            }
                    const size_t yi = (((size_t)n * k.o + o) * oh + a) * ow + bb;
                    const double got = runs[0][yi];
                    const double bound = 2.0 * (cg * taps + 1) * eps * size + 1e-300;
                    const bool same = std::memcmp(&runs[0][yi], &runs[1][yi], sizeof(T)) == 0;
                    if (!(std::fabs(got - ref) <= bound) || !same) {
                        if (bad++ < 3)
                            std::printf("igemm %s TAP=%d n%d c%d %dx%d o%d k%dx%d s%d p%d,%d d%d g%d: y[%d,%d,%d,%d] = %.17g, "
                                        "expected %.17g (bound %.3g)%s\n",
                                        sizeof(T) == 4 ? "f32" : "f64", (int)TAP, k.n, k.c, k.h, k.w, k.o, k.kh, k.kw,
                                        k.sh, k.ph, k.pw, k.dh, k.groups, n, o, a, bb, got, ref, bound,
                                        same ? "" : " (schedules differ)");
                        ok = false;
                    }
                }
    return ok;
}

bool igemm_all() {
    //  n  c   h   w   o  kh kw sh sw ph pw dh dw groups
    const DenseCase cases[] = {
        {2, 32, 12, 10, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1},  // the stem's 3x3 (C/G 32: tap-major)
        {2, 32, 13, 11, 40, 3, 3, 2, 2, 1, 1, 1, 1, 1},  // stride 2, two tiles of output channels
        {3, 8, 9, 7, 6, 3, 3, 1, 1, 2, 2, 1, 1, 1},      // dx's geometry of a padding-0 conv (padding 2)
        {2, 16, 9, 8, 6, 5, 3, 1, 1, 2, 0, 1, 1, 1},     // 5x3, padding (2, 0)
        {2, 16, 9, 8, 8, 3, 3, 1, 1, 2, 3, 2, 3, 2},     // dilated, two groups of 8 channels
        {1, 8, 3, 2, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1},      // a plane smaller than the kernel's reach
        {2, 3, 17, 15, 32, 3, 3, 2, 2, 1, 1, 1, 1, 1},   // the stem's first conv (C 3: channel-major only)
        {2, 12, 7, 9, 9, 3, 2, 1, 1, 1, 0, 1, 1, 3},     // groups of 4 channels
    };
    bool ok = true;
    for (const DenseCase& k : cases) {
        const bool tap = (k.c / k.groups) % 8 == 0;
        ok &= igemm_check<float, false>(k, 31);
        ok &= igemm_check<double, false>(k, 32);
        if (tap) {
            ok &= igemm_check<float, true>(k, 33);
            ok &= igemm_check<double, true>(k, 34);
        }
    }
    std::printf("conv_igemm: %s\n", ok ? "ok" : "FAILURES");
    return ok;
}

int main(int argc, char** argv) {
    const std::string arg = argc > 1 ? argv[1] : "";
    const bool quick = arg == "quick" || arg == "s2-quick";
    if (arg == "igemm") {  // the implicit-GEMM forward alone
        const bool ok = igemm_all();
        return ok ? 0 : 1;
    }
    if (arg == "s2" || arg == "s2-quick") {  // the direct stride-2 kernels alone
        const bool ok = s2_all(quick);
        std::printf(ok ? "all passed\n" : "FAILURES\n");
        return ok ? 0 : 1;
    }
    bool ok = true;
    //  n  c   h   w  kh kw sh sw ph pw dh dw
    const Case cases[] = {
        {2, 8, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1},    // 3x3 s1 p1, C a multiple of 4
        {2, 6, 7, 5, 3, 3, 1, 1, 1, 1, 1, 1},     // C not a multiple of 4 (f64: of 2)
        {3, 5, 6, 9, 3, 3, 1, 1, 0, 0, 1, 1},     // padding 0, odd C
        {2, 4, 1, 7, 3, 3, 1, 1, 1, 1, 1, 1},     // H = 1
        {2, 4, 6, 1, 3, 3, 1, 1, 1, 1, 1, 1},     // W = 1
        {1, 4, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1},     // one pixel
        {2, 12, 17, 19, 3, 3, 1, 1, 2, 2, 1, 1},  // padding 2, strips with a partial last one
        {2, 8, 9, 11, 3, 3, 2, 2, 1, 1, 1, 1},    // 3x3 s2 p1
        {2, 8, 8, 10, 3, 3, 2, 2, 1, 1, 1, 1},    // 3x3 s2, even sides
        {3, 5, 7, 6, 3, 3, 2, 2, 0, 0, 1, 1},     // 3x3 s2 p0, odd C
        {2, 4, 2, 2, 3, 3, 2, 2, 1, 1, 1, 1},     // 3x3 s2 on 2x2 (the MNIST model's smallest)
        {2, 8, 11, 9, 5, 5, 2, 2, 2, 2, 1, 1},    // 5x5 s2
        {2, 4, 9, 10, 3, 2, 2, 1, 1, 0, 1, 1},    // 3x2, stride (2, 1)
        {2, 6, 9, 8, 3, 3, 1, 1, 2, 3, 2, 3},     // dilated
        {2, 4, 5, 6, 1, 1, 1, 1, 0, 0, 1, 1},     // 1x1
        {1, 72, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1},    // 72 channels: more than 32 vectors of one (two blocks along C)
        {4, 40, 14, 14, 3, 3, 1, 1, 1, 1, 1, 1},  // several items per thread in the H200 plan's sums
    };
    int count = 0;
    for (const Case& k : cases) {
        if (quick && ++count > 6) break;
        ok &= check<float>(k, 11, 1e-5);
        ok &= check<double>(k, 12, 1e-12);
    }
    std::printf("residual forms checked in %d case-widths\n", residual_cases);
    ok &= residual_cases > 0;
    ok &= s2_all(quick);
    ok &= igemm_all();
    std::printf(ok ? "all passed\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
