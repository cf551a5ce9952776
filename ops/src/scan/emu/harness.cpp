// Runs scan.cu's kernels on the CPU emulator (cuda_emu.h) against a float64 reference of the scan and its
// gradients, over sizes, options and launch plans; see README.md here. Exit status 0 when every case passes.
#include "cuda_emu.h"

// The sources as NVRTC sees them: the engine's prelude, the ops prelude, the scan.
#include "../../../../engine/src/cuda/prelude.cuh"
#include "../../prelude.cuh"
#include "../scan.cu"

#include <string>

namespace {

struct Case {
    long long b, c, l, s;
    bool d, z, bias, softplus;
};

// The backward's plan; the forward's is the same unless fspl is set (cuda.rs `forward_plan`: f32 S 9 .. 16 on
// small grids runs scan_fwd_s2l8, 8 lanes of 2 states, with the backward's warps and tile).
struct Plan {
    int spl, lpc, warps, tile;
    int fspl = 0, flpc = 0;
};

std::vector<double> uniform(std::mt19937_64& g, size_t n, double lo, double hi) {
    std::uniform_real_distribution<double> d(lo, hi);
    std::vector<double> v(n);
    for (auto& x : v) x = d(g);
    return v;
}

struct Inputs {
    std::vector<double> u, delta, a, bm, cm, d, z, bias, gout;
};

Inputs inputs(const Case& k, uint64_t seed) {
    std::mt19937_64 g(seed);
    const size_t bcl = k.b * k.c * k.l, bsl = k.b * k.s * k.l;
    Inputs x;
    x.u = uniform(g, bcl, -2, 2);
    x.delta = k.softplus ? uniform(g, bcl, -2, 1) : uniform(g, bcl, 0.01, 1);
    x.a = uniform(g, k.c * k.s, -2, -0.1);
    x.bm = uniform(g, bsl, -1.5, 1.5);
    x.cm = uniform(g, bsl, -1.5, 1.5);
    x.d = uniform(g, k.c, -1, 1);
    x.z = uniform(g, bcl, -2, 2);
    x.bias = k.softplus ? uniform(g, k.c, -0.5, 0.5) : uniform(g, k.c, 0, 0.5);
    x.gout = uniform(g, bcl, -1, 1);
    return x;
}

struct Result {
    std::vector<double> out, du, ddelta, da, db, dc, dd, dz, dbias;
};

double softplus(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }
double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

// The definition: the full state sequence, then the reverse-time recurrence.
Result reference(const Case& k, const Inputs& x) {
    const long long B = k.b, C = k.c, L = k.l, S = k.s;
    Result r;
    r.out.assign(B * C * L, 0);
    r.du.assign(B * C * L, 0);
    r.ddelta.assign(B * C * L, 0);
    r.dz.assign(B * C * L, 0);
    r.da.assign(C * S, 0);
    r.db.assign(B * S * L, 0);
    r.dc.assign(B * S * L, 0);
    r.dd.assign(C, 0);
    r.dbias.assign(C, 0);
    std::vector<double> h(S * L), e(S * L), dt(L), raw(L), y(L);
    for (long long b = 0; b < B; ++b)
        for (long long c = 0; c < C; ++c) {
            const long long row = (b * C + c) * L;
            const double bias = k.bias ? x.bias[c] : 0, dv = k.d ? x.d[c] : 0;
            for (long long t = 0; t < L; ++t) {
                raw[t] = x.delta[row + t] + bias;
                dt[t] = k.softplus ? softplus(raw[t]) : raw[t];
                double yy = dv * x.u[row + t];
                for (long long n = 0; n < S; ++n) {
                    const double prev = t ? h[n * L + t - 1] : 0;
                    e[n * L + t] = std::exp(dt[t] * x.a[c * S + n]);
                    h[n * L + t] = e[n * L + t] * prev + dt[t] * x.bm[(b * S + n) * L + t] * x.u[row + t];
                    yy += x.cm[(b * S + n) * L + t] * h[n * L + t];
                }
                y[t] = yy;
                const double zv = x.z[row + t];
                r.out[row + t] = k.z ? yy * zv * sigmoid(zv) : yy;
            }
            std::vector<double> carry(S, 0);
            for (long long t = L - 1; t >= 0; --t) {
                const double g = x.gout[row + t], zv = x.z[row + t], s = sigmoid(zv);
                const double gy = k.z ? g * zv * s : g;
                if (k.z) r.dz[row + t] = g * y[t] * s * (1 + zv * (1 - s));
                double du = dv * gy, ddt = 0;
                const double u = x.u[row + t];
                for (long long n = 0; n < S; ++n) {
                    const long long bs = (b * S + n) * L + t;
                    const double gh = x.cm[bs] * gy + carry[n];
                    const double prev = t ? h[n * L + t - 1] : 0;
                    r.dc[bs] += gy * h[n * L + t];
                    r.db[bs] += gh * dt[t] * u;
                    du += gh * dt[t] * x.bm[bs];
                    ddt += gh * (x.a[c * S + n] * e[n * L + t] * prev + x.bm[bs] * u);
                    r.da[c * S + n] += gh * dt[t] * e[n * L + t] * prev;
                    carry[n] = e[n * L + t] * gh;
                }
                const double gd = k.softplus ? (raw[t] > 20 ? ddt : ddt * sigmoid(raw[t])) : ddt;
                r.du[row + t] = du;
                r.ddelta[row + t] = gd;
                r.dd[c] += gy * u;
                r.dbias[c] += gd;
            }
        }
    return r;
}

template <typename T> std::vector<T> cast(const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); }

// Runs the block function of a kernel over the grid.
void launch(unsigned grid, unsigned threads, unsigned smem, uint64_t seed, std::function<void()> kernel) {
    for (unsigned blk = 0; blk < grid; ++blk)
        emu::run_block(blk, grid, threads, smem, seed, [](void* f) { (*static_cast<std::function<void()>*>(f))(); },
                       &kernel);
}

template <typename T> T nan_of() { return std::numeric_limits<T>::quiet_NaN(); }

template <typename T> Result run(const Case& k, const Inputs& in, const Plan& plan, uint64_t seed) {
    const long long B = k.b, C = k.c, L = k.l, S = k.s;
    const int threads = 32 * plan.warps, nch = (L + plan.tile - 1) / plan.tile;
    // The kernel parameters for lpc lanes of spl states (cuda.rs `params`).
    auto params = [&](int spl, int lpc) {
        const int G = threads / lpc;
        ScanParams p{};
        p.batch = B;
        p.channels = C;
        p.length = L;
        p.states = S;
        p.chunk = plan.tile;
        p.n_chunks = nch;
        p.groups = (C + G - 1) / G;
        p.lpc = lpc;
        p.np = lpc * spl;
        p.has_d = k.d;
        p.has_z = k.z;
        p.has_delta_bias = k.bias;
        p.delta_softplus = k.softplus;
        return p;
    };
    const bool s2l8 = plan.fspl == 2 && plan.flpc == 8;
    const ScanParams fp = s2l8 ? params(2, 8) : params(plan.spl, plan.lpc), p = params(plan.spl, plan.lpc);
    const int G = threads / plan.lpc, np = plan.lpc * plan.spl;
    const long long ng = p.groups;
    auto u = cast<T>(in.u), delta = cast<T>(in.delta), a = cast<T>(in.a), bm = cast<T>(in.bm), cm = cast<T>(in.cm);
    auto d = cast<T>(in.d), z = cast<T>(in.z), bias = cast<T>(in.bias), gout = cast<T>(in.gout);
    const T nan = nan_of<T>();
    std::vector<T> out(B * C * L, nan), saved(B * C * nch * S, nan);
    const int e = sizeof(T);
    const unsigned fsmem = scan_fwd_layout(threads / fp.lpc, fp.lpc, fp.np, e).total * e;
    const int th = (32 / plan.spl) * 4 / e;
    // cuda.rs's choice of instantiation: f32 with 4 lanes of 4 states runs scan_bwd4.
    const bool bwd4 = sizeof(T) == 4 && plan.spl == 4 && plan.lpc == 4;
    const unsigned bsmem = bwd4 ? scan_bwd4_layout(plan.tile, plan.warps).total * e
                                : scan_bwd_layout(plan.tile, G, np, plan.warps, plan.spl, th, e).total * e;
    const unsigned grid = B * ng;
    const T* D = k.d ? d.data() : u.data();
    const T* Z = k.z ? z.data() : u.data();
    const T* BI = k.bias ? bias.data() : u.data();
    launch(B * fp.groups, threads, fsmem, seed, [&] {
        if (sizeof(T) == 4 && s2l8)  // cuda.rs's choice of instantiation
            scan_fwd<T, 2, 8>(fp, u.data(), delta.data(), a.data(), bm.data(), cm.data(), D, Z, BI, out.data(),
                              saved.data());
        else if (sizeof(T) == 4 && plan.spl == 4 && plan.lpc == 4)
            scan_fwd<T, 4, 4>(fp, u.data(), delta.data(), a.data(), bm.data(), cm.data(), D, Z, BI, out.data(),
                              saved.data());
        else if (plan.spl == 4)
            scan_fwd<T, 4, 0>(fp, u.data(), delta.data(), a.data(), bm.data(), cm.data(), D, Z, BI, out.data(),
                              saved.data());
        else
            scan_fwd<T, 8, 0>(fp, u.data(), delta.data(), a.data(), bm.data(), cm.data(), D, Z, BI, out.data(),
                              saved.data());
    });
    std::vector<T> du(B * C * L, nan), ddelta(B * C * L, nan), dz(B * C * L, nan);
    std::vector<T> part_bc(B * ng * 2 * S * L, nan), part_a(B * C * S, nan), part_d(B * C, nan),
        part_bias(B * C, nan);
    launch(grid, threads, bsmem, seed, [&] {
        T* DZ = k.z ? dz.data() : du.data();
        T* PD = k.d ? part_d.data() : du.data();
        T* PB = k.bias ? part_bias.data() : du.data();
        if constexpr (sizeof(T) == 4) {
            if (bwd4) {
                scan_bwd4(p, u.data(), delta.data(), a.data(), bm.data(), cm.data(), D, Z, BI, saved.data(),
                          gout.data(), du.data(), ddelta.data(), DZ, part_bc.data(), part_a.data(), PD, PB);
                return;
            }
        }
        if (plan.spl == 4 && plan.lpc == 4)  // f64 (f32 took scan_bwd4)
            scan_bwd<T, 4, 4>(p, u.data(), delta.data(), a.data(), bm.data(), cm.data(), D, Z, BI, saved.data(),
                              gout.data(), du.data(), ddelta.data(), DZ, part_bc.data(), part_a.data(), PD, PB);
        else if (plan.spl == 4)
            scan_bwd<T, 4, 0>(p, u.data(), delta.data(), a.data(), bm.data(), cm.data(), D, Z, BI, saved.data(),
                           gout.data(), du.data(), ddelta.data(), DZ, part_bc.data(), part_a.data(), PD, PB);
        else
            scan_bwd<T, 8, 0>(p, u.data(), delta.data(), a.data(), bm.data(), cm.data(), D, Z, BI, saved.data(),
                           gout.data(), du.data(), ddelta.data(), DZ, part_bc.data(), part_a.data(), PD, PB);
    });
    std::vector<T> db(B * S * L, nan), dc(B * S * L, nan), da(C * S, nan), dd(C, nan), dbias(C, nan);
    launch(3, 64, 0, seed, [&] {
        scan_bwd_sum<T>(p, part_bc.data(), part_a.data(), part_d.data(), part_bias.data(), db.data(), dc.data(),
                        da.data(), dd.data(), dbias.data());
    });
    auto f = [](const std::vector<T>& v) { return std::vector<double>(v.begin(), v.end()); };
    Result r;
    r.out = f(out);
    r.du = f(du);
    r.ddelta = f(ddelta);
    r.da = f(da);
    r.db = f(db);
    r.dc = f(dc);
    r.dd = k.d ? f(dd) : std::vector<double>();
    r.dz = k.z ? f(dz) : std::vector<double>();
    r.dbias = k.bias ? f(dbias) : std::vector<double>();
    return r;
}

double rel_error(const std::vector<double>& got, const std::vector<double>& want) {
    if (got.size() != want.size()) return INFINITY;
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (std::isnan(got[i])) return NAN;
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    return num == 0 ? 0 : std::sqrt(num / den);
}

bool same_bits(const Result& a, const Result& b) {
    const std::vector<double>* x[] = {&a.out, &a.du, &a.ddelta, &a.da, &a.db, &a.dc, &a.dd, &a.dz, &a.dbias};
    const std::vector<double>* y[] = {&b.out, &b.du, &b.ddelta, &b.da, &b.db, &b.dc, &b.dd, &b.dz, &b.dbias};
    for (int i = 0; i < 9; ++i)
        if (x[i]->size() != y[i]->size() ||
            (!x[i]->empty() && std::memcmp(x[i]->data(), y[i]->data(), x[i]->size() * 8) != 0))
            return false;
    return true;
}

// The largest relative errors seen (output, gradients), per dtype.
double g_worst_f32[2] = {0, 0}, g_worst_f64[2] = {0, 0};

template <typename T> bool check(const Case& k, const Plan& plan, uint64_t seed, double tol_out, double tol_grad) {
    const Inputs in = inputs(k, seed);
    const Result want = reference(k, in);
    const Result got = run<T>(k, in, plan, seed);
    const Result again = run<T>(k, in, plan, seed + 7777);  // another thread order: a race changes bits
    const char* names[] = {"out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"};
    const std::vector<double>* g[] = {&got.out, &got.du, &got.ddelta, &got.da, &got.db,
                                      &got.dc,  &got.dd, &got.dz,     &got.dbias};
    const std::vector<double>* w[] = {&want.out, &want.du, &want.ddelta, &want.da, &want.db,
                                      &want.dc,  &want.dd, &want.dz,     &want.dbias};
    const bool present[] = {true, true, true, true, true, true, k.d, k.z, k.bias};
    bool ok = true;
    std::string msg;
    double worst_out = 0, worst_grad = 0;
    for (int i = 0; i < 9; ++i) {
        if (!present[i]) continue;
        const double e = rel_error(*g[i], *w[i]);
        double& worst = i == 0 ? worst_out : worst_grad;
        worst = std::isnan(e) || e > worst ? e : worst;
        const double tol = i == 0 ? tol_out : tol_grad;
        if (!(e <= tol)) {
            ok = false;
            msg += std::string(" ") + names[i] + "=" + std::to_string(e);
        }
    }
    if (!same_bits(got, again)) {
        ok = false;
        msg += " (results depend on the thread order: a race)";
    }
    const std::string fwd = plan.fspl ? " (fwd spl " + std::to_string(plan.fspl) + " lpc " + std::to_string(plan.flpc) + ")" : "";
    std::printf("%s %s B%lld C%lld L%lld S%lld d%d z%d bias%d sp%d | spl %d lpc %d warps %d tile %d%s | out %.1e grad %.1e%s\n",
                ok ? "ok  " : "FAIL", sizeof(T) == 4 ? "f32" : "f64", k.b, k.c, k.l, k.s, k.d, k.z, k.bias,
                k.softplus, plan.spl, plan.lpc, plan.warps, plan.tile, fwd.c_str(), worst_out, worst_grad, msg.c_str());
    double* all = sizeof(T) == 4 ? g_worst_f32 : g_worst_f64;
    all[0] = std::max(all[0], worst_out);
    all[1] = std::max(all[1], worst_grad);
    return ok;
}

// The plan cuda.rs makes for S states (spl, lpc), with the given warps and tile.
Plan plan_for(long long s, int warps, int tile) {
    const int spl = s <= 128 ? 4 : 8;
    int lpc = 1;
    while (lpc * spl < s) lpc *= 2;
    return Plan{spl, lpc, warps, tile};
}

}  // namespace

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "quick";
    bool ok = true;
    const Case cases[] = {
        {2, 5, 9, 3, true, true, true, true},      {1, 3, 1, 1, true, true, true, false},
        {1, 3, 70, 16, true, true, true, true},    {2, 37, 130, 16, true, true, true, true},
        {1, 4, 33, 40, true, true, true, false},   {1, 2, 20, 256, true, true, true, true},
        {2, 9, 41, 16, false, false, false, false}, {1, 70, 17, 5, false, true, false, true},
        {1, 3, 25, 130, true, false, true, true},  {2, 33, 16, 8, true, true, false, true},
        {2, 40, 136, 16, true, true, true, true},  {1, 5, 44, 1, true, true, true, true},
    };
    for (const Case& k : cases) {
        const int tiles64[] = {32, 8};
        for (int warps : {4, 1}) {
            for (int tile : tiles64) {
                ok &= check<float>(k, plan_for(k.s, warps, tile), 11, 1e-5, 1e-4);
                ok &= check<double>(k, plan_for(k.s, warps, tile == 32 ? 16 : 8), 12, 1e-12, 1e-12);
                if (quick) break;
            }
            if (quick) break;
        }
    }
    // A plan with more lanes per channel than S needs (padding states in every lane group).
    ok &= check<float>({1, 6, 19, 3, true, true, true, true}, Plan{4, 4, 2, 16}, 13, 1e-5, 1e-4);
    ok &= check<double>({1, 6, 19, 3, true, true, true, true}, Plan{8, 2, 2, 8}, 14, 1e-12, 1e-12);
    // scan_bwd4 (f32, 4 lanes of 4 states: S 9 .. 16) over its own edge cases: L = 1, L not a multiple of 4
    // (scalar global accesses) nor of the tile, channels past a block's, every option on and off, each of
    // the plans cuda.rs may make (1, 2, 4 warps; tiles 8 .. 32).
    const Case cases4[] = {
        {1, 3, 1, 16, true, true, true, true},       {2, 5, 1, 9, false, false, false, false},
        {1, 33, 37, 16, true, true, true, true},     {2, 8, 64, 16, false, true, false, true},
        {1, 17, 45, 12, true, false, true, false},   {3, 9, 100, 16, true, true, false, false},
        {1, 40, 33, 16, false, false, true, true},   {2, 3, 96, 15, true, true, true, true},
    };
    for (const Case& k : cases4) {
        for (int warps : {4, 2, 1}) {
            for (int tile : {32, 24, 8}) {
                ok &= check<float>(k, plan_for(k.s, warps, tile), 15 + warps + tile, 1e-5, 1e-4);
                if (quick) break;
            }
            if (quick && warps != 4) break;
        }
    }
    // scan_fwd_s2l8 (f32 S 9 .. 16 on small grids, cuda.rs `forward_plan`) over the same cases, with the
    // backward's plan (scan_bwd4 reads the states it saved): 2 states a lane, so S = 9, 12, 15 leave lanes with
    // one or two padding states; ragged L, L = 1, channels past a block's (16 a block).
    for (const Case& k : cases4) {
        for (int tile : {32, 8}) {
            Plan plan = plan_for(k.s, 4, tile);
            plan.fspl = 2;
            plan.flpc = 8;
            ok &= check<float>(k, plan, 40 + tile, 1e-5, 1e-4);
            if (quick) break;
        }
    }
    std::printf("largest relative errors: f32 output %.2e, gradients %.2e; f64 output %.2e, gradients %.2e\n",
                g_worst_f32[0], g_worst_f32[1], g_worst_f64[0], g_worst_f64[1]);
    std::printf(ok ? "all passed\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
