//! CUDA backend tests. The ones that need a device skip without one (through [`test_device_or_skip`]) and
//! fail instead when `MILA_REQUIRE_CUDA=1`; the rest run everywhere.
//!
//! Outputs are checked against the CPU storage routines on fresh random inputs. Before an op allocates its
//! output, a block of the same size class is filled with NaN and returned to the pool, so the op's output
//! reuses it (asserted through the cache-hit count) and any element the kernel fails to write shows as NaN.

use std::sync::{Arc, Mutex, MutexGuard};

use super::*;
use crate::{CpuStorage, DType, Device, Error, Float, Generator, Layout, Storage, Tensor};

/// The device tests share device 0 and its pool, and the allocator assertions need nobody else allocating
/// meanwhile: each one holds this lock.
static GPU: Mutex<()> = Mutex::new(());

fn gpu(test: &str) -> Option<(MutexGuard<'static, ()>, Arc<CudaDevice>)> {
    let guard = GPU.lock().unwrap_or_else(|e| e.into_inner());
    test_device_or_skip(test).map(|dev| (guard, dev))
}

fn random(g: &mut Generator, n: usize, dtype: DType) -> CpuStorage {
    CpuStorage::from_f64(&g.normal_vec(n, 0.0, 1.0), dtype)
}

/// Puts a NaN-filled block of the class that `n` elements of `dtype` need at the top of the pool.
fn poison(dev: &Arc<CudaDevice>, n: usize, dtype: DType) {
    let mut s = CudaStorage::alloc(dev, n, dtype).unwrap();
    s.fill(f64::NAN).unwrap();
}

fn host(s: &CudaStorage) -> Vec<f64> {
    let cpu = s.to_cpu(&Layout::contiguous(&[s.len()])).unwrap();
    cpu.to_f64_vec(&Layout::contiguous(&[cpu.len()]))
}

fn assert_same(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}: element {i} is {g}, expected {w}");
    }
}

/// Views of a (4, 5, 6) buffer of 120 elements: every kind the engine makes.
fn views() -> Vec<(&'static str, Layout)> {
    let base = Layout::contiguous(&[4, 5, 6]);
    vec![
        ("contiguous", base.clone()),
        ("contiguous with offset", base.narrow(0, 1, 2).unwrap()),
        ("permuted", base.permute(&[2, 0, 1]).unwrap()),
        ("narrowed", base.narrow(1, 1, 3).unwrap().narrow(2, 2, 3).unwrap()),
        ("transposed and narrowed", base.permute(&[0, 2, 1]).unwrap().narrow(0, 3, 1).unwrap()),
        ("broadcast", Layout::contiguous(&[5, 1]).broadcast_as(&[3, 5, 4]).unwrap()),
        ("scalar", Layout::contiguous(&[120]).narrow(0, 17, 1).unwrap().reshape_view(&[]).unwrap()),
        ("empty", base.narrow(1, 2, 0).unwrap()),
    ]
}

// ---- everywhere ----------------------------------------------------------------------------------------

#[test]
fn kernel_names_carry_the_dtype() {
    assert_eq!(kernel_name::<f32>("gather"), "gather_f32");
    assert_eq!(kernel_name::<f64>("add_strided"), "add_strided_f64");
}

#[test]
fn library_report_lists_each_library_and_its_names() {
    let report = library_report();
    let names: Vec<&str> = report.iter().map(|l| l.name).collect();
    assert_eq!(names, ["libcuda", "libcublas", "libcublasLt", "libnvrtc"]);
    for lib in &report {
        assert!(!lib.candidates.is_empty(), "{lib}");
        let stem = lib.name.trim_start_matches("lib");
        assert!(lib.candidates.iter().any(|c| c.contains(stem)), "{lib}");
    }
    if is_available() {
        assert!(report[0].found, "a device is present, so libcuda was loaded");
        assert!(driver_version().is_some());
    }
}

#[test]
fn missing_cuda_is_an_error_not_a_panic() {
    // An ordinal past any machine's devices fails everywhere, without a driver too.
    match Tensor::zeros(&[2, 3], DType::F32, Device::Cuda(1_000_000)) {
        Err(Error::CudaUnavailable { ordinal: 1_000_000, reason }) => assert!(!reason.is_empty()),
        other => panic!("expected CudaUnavailable, got {other:?}"),
    }
    if is_available() {
        let _guard = GPU.lock().unwrap_or_else(|e| e.into_inner());
        let t = Tensor::zeros(&[2, 3], DType::F32, Device::Cuda(0)).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![0.0; 6]);
        return;
    }
    assert_eq!(device_count(), 0);
    assert!(unavailable_reason().is_some());
    let r = Tensor::zeros(&[2, 3], DType::F32, Device::Cuda(0));
    assert!(matches!(r, Err(Error::CudaUnavailable { ordinal: 0, .. })), "{r:?}");
    let host = Tensor::from_vec(vec![1.0f32, 2.0], &[2]).unwrap();
    assert!(matches!(host.to_device(Device::Cuda(0)), Err(Error::CudaUnavailable { .. })));
    if !require_cuda() {
        assert!(test_device_or_skip("missing_cuda_is_an_error_not_a_panic").is_none());
    }
}

/// The engine's own kernels compile with NVRTC for the H100 (sm_90): needs libnvrtc, not a GPU (see
/// ops' `every_module_compiles_for_sm_90`).
#[test]
fn storage_module_compiles_for_sm_90() {
    if !nvrtc_available() {
        if require_cuda() {
            panic!("MILA_REQUIRE_CUDA=1 but libnvrtc cannot be loaded");
        }
        eprintln!("skipping storage_module_compiles_for_sm_90: libnvrtc not found");
        return;
    }
    if let Err(e) = compile(storage::MODULE, storage::SOURCE, "sm_90") {
        panic!("{e}");
    }
}

// ---- on a device ---------------------------------------------------------------------------------------

#[test]
fn round_trip_host_device_host() {
    let Some((_g, dev)) = gpu("round_trip_host_device_host") else { return };
    let mut g = Generator::new(11);
    for dtype in [DType::F32, DType::F64] {
        for n in [0, 1, 1000, 300_001] {
            let cpu = random(&mut g, n, dtype);
            let s = CudaStorage::from_cpu(0, &cpu).unwrap();
            assert_eq!((s.len(), s.dtype(), s.ordinal()), (n, dtype, dev.ordinal()));
            let want = cpu.to_f64_vec(&Layout::contiguous(&[n]));
            assert_same(&host(&s), &want, &format!("{dtype} n={n}"));
        }
    }
}

#[test]
fn fill_writes_every_element() {
    let Some((_g, dev)) = gpu("fill_writes_every_element") else { return };
    for dtype in [DType::F32, DType::F64] {
        for n in [1, 257, 1 << 20] {
            poison(&dev, n, dtype);
            let s = CudaStorage::full(0, n, -2.5, dtype).unwrap();
            assert_same(&host(&s), &vec![-2.5; n], &format!("fill {dtype} n={n}"));
        }
    }
}

#[test]
fn copy_strided_matches_cpu_for_every_view() {
    let Some((_g, dev)) = gpu("copy_strided_matches_cpu_for_every_view") else { return };
    let mut g = Generator::new(12);
    for dtype in [DType::F32, DType::F64] {
        let cpu = random(&mut g, 120, dtype);
        let s = CudaStorage::from_cpu(0, &cpu).unwrap();
        for (name, layout) in views() {
            let want = cpu.copy_contiguous(&layout).to_f64_vec(&Layout::contiguous(&[layout.numel()]));
            poison(&dev, layout.numel(), dtype);
            let hits = dev.memory_stats().num_cache_hits;
            let got = s.copy_strided(&layout).unwrap();
            assert_eq!(dev.memory_stats().num_cache_hits, hits + 1, "{name}: the output reused the poisoned block");
            assert_same(&host(&got), &want, &format!("copy_strided {dtype} {name}"));
            // to_cpu of the view directly (contiguous: one copy of the range; else a gather first).
            let direct = s.to_cpu(&layout).unwrap().to_f64_vec(&Layout::contiguous(&[layout.numel()]));
            assert_same(&direct, &want, &format!("to_cpu {dtype} {name}"));
        }
    }
}

#[test]
fn cast_matches_cpu_for_every_view() {
    let Some((_g, dev)) = gpu("cast_matches_cpu_for_every_view") else { return };
    let mut g = Generator::new(13);
    for (from, to) in [(DType::F32, DType::F64), (DType::F64, DType::F32), (DType::F32, DType::F32)] {
        // Values beyond f32's precision, so the f64 -> f32 rounding is exercised.
        let cpu = CpuStorage::from_f64(&g.normal_vec(120, 0.0, 1e3), from);
        let s = CudaStorage::from_cpu(0, &cpu).unwrap();
        for (name, layout) in views() {
            let want = cpu.cast(&layout, to).to_f64_vec(&Layout::contiguous(&[layout.numel()]));
            poison(&dev, layout.numel(), to);
            let got = s.cast(&layout, to).unwrap();
            assert_eq!(got.dtype(), to);
            assert_same(&host(&got), &want, &format!("cast {from}->{to} {name}"));
        }
    }
}

#[test]
fn add_same_shape_matches_cpu_for_strided_inputs() {
    let Some((_g, dev)) = gpu("add_same_shape_matches_cpu_for_strided_inputs") else { return };
    let mut g = Generator::new(14);
    for dtype in [DType::F32, DType::F64] {
        let (a, b) = (random(&mut g, 120, dtype), random(&mut g, 20, dtype));
        let cases = [
            // (6, 4, 5): a permuted, b a broadcast (4, 5).
            (
                Layout::contiguous(&[4, 5, 6]).permute(&[2, 0, 1]).unwrap(),
                Layout::contiguous(&[4, 5]).broadcast_as(&[6, 4, 5]).unwrap(),
            ),
            // (3, 4): a narrowed and transposed, b contiguous with an offset.
            (
                Layout::contiguous(&[4, 5, 6])
                    .narrow(1, 2, 1)
                    .unwrap()
                    .narrow(2, 1, 3)
                    .unwrap()
                    .reshape_view(&[4, 3])
                    .unwrap()
                    .permute(&[1, 0])
                    .unwrap(),
                Layout::contiguous(&[20]).narrow(0, 5, 12).unwrap().reshape_view(&[3, 4]).unwrap(),
            ),
            // Both contiguous: the kernel's fast path.
            (Layout::contiguous(&[20]), Layout::contiguous(&[20])),
        ];
        let (da, db) = (CudaStorage::from_cpu(0, &a).unwrap(), CudaStorage::from_cpu(0, &b).unwrap());
        for (i, (la, lb)) in cases.iter().enumerate() {
            let want = Storage::Cpu(a.clone()).add_same_shape(la, &Storage::Cpu(b.clone()), lb).unwrap();
            let want =
                want.to_cpu(&Layout::contiguous(&[la.numel()])).unwrap().to_f64_vec(&Layout::contiguous(&[la.numel()]));
            poison(&dev, la.numel(), dtype);
            let got = da.add_same_shape(la, &db, lb).unwrap();
            assert_same(&host(&got), &want, &format!("add {dtype} case {i}"));
        }
        // Mismatches are errors.
        assert!(matches!(
            da.add_same_shape(&Layout::contiguous(&[20]), &db, &Layout::contiguous(&[4, 5])),
            Err(Error::ShapeMismatch { .. })
        ));
        let other =
            CudaStorage::from_cpu(0, &random(&mut g, 20, if dtype == DType::F32 { DType::F64 } else { DType::F32 }))
                .unwrap();
        assert!(matches!(
            da.add_same_shape(&Layout::contiguous(&[20]), &other, &Layout::contiguous(&[20])),
            Err(Error::DTypeMismatch { .. })
        ));
        // A layout past the end of its buffer is refused before any kernel runs.
        assert!(db.copy_strided(&Layout::contiguous(&[21])).is_err());
    }
}

/// The vectorised add (engine::cuda::vector): large flat inputs whose length is not a multiple of the pack width,
/// offsets that keep or break 16-byte alignment (the latter must fall back to the strided kernel), a bias-like
/// repeat and a scalar broadcast; bit-exact against the CPU, outputs poisoned.
#[test]
fn add_same_shape_vectorised_and_fallback_paths_match_cpu() {
    let Some((_g, dev)) = gpu("add_same_shape_vectorised_and_fallback_paths_match_cpu") else { return };
    let mut g = Generator::new(16);
    const N: usize = 300_001; // 4 * 75_000 + 1: a one-element scalar tail for f32 and f64 alike
    for dtype in [DType::F32, DType::F64] {
        let (a, b) = (random(&mut g, N + 16, dtype), random(&mut g, N + 16, dtype));
        let flat = |start: usize| Layout::contiguous(&[N + 16]).narrow(0, start, N).unwrap();
        let rows = |start: usize, period: usize| {
            Layout::contiguous(&[N + 16]).narrow(0, start, period).unwrap().broadcast_as(&[1000, period]).unwrap()
        };
        let cases = [
            ("both aligned", flat(0), flat(4)),
            ("a at element 1: misaligned, strided kernel", flat(1), flat(0)),
            ("b at element 3: misaligned, strided kernel", flat(8), flat(3)),
            ("b at element 2: aligned for f64 only", flat(0), flat(2)),
            (
                "scalar b at element 5",
                flat(0),
                Layout::contiguous(&[N + 16]).narrow(0, 5, 1).unwrap().broadcast_as(&[N]).unwrap(),
            ),
        ];
        let row_cases = [
            ("bias of 300 over 1000 rows", Layout::contiguous(&[1000, 300]), rows(0, 300)),
            ("bias of 299: not whole packs, strided kernel", Layout::contiguous(&[1000, 299]), rows(0, 299)),
            ("bias of 300 at element 1: misaligned", Layout::contiguous(&[1000, 300]), rows(1, 300)),
        ];
        let (da, db) = (CudaStorage::from_cpu(0, &a).unwrap(), CudaStorage::from_cpu(0, &b).unwrap());
        for (name, la, lb) in cases.iter().chain(&row_cases) {
            let want = Storage::Cpu(a.clone()).add_same_shape(la, &Storage::Cpu(b.clone()), lb).unwrap();
            let n = la.numel();
            let want = want.to_cpu(&Layout::contiguous(&[n])).unwrap().to_f64_vec(&Layout::contiguous(&[n]));
            poison(&dev, n, dtype);
            let got = da.add_same_shape(la, &db, lb).unwrap();
            assert_same(&host(&got), &want, &format!("add {dtype} {name}"));
        }
    }
}

#[test]
fn allocator_reuses_freed_blocks() {
    let Some((_g, dev)) = gpu("allocator_reuses_freed_blocks") else { return };
    dev.empty_cache().unwrap();
    let n = 12_345;
    let a = CudaStorage::alloc(&dev, n, DType::F32).unwrap();
    let after_first = dev.memory_stats();
    drop(a);
    let after_drop = dev.memory_stats();
    let class = after_first.in_use_bytes - after_drop.in_use_bytes;
    assert_eq!(class, alloc::size_class(n * 4).unwrap());
    assert_eq!(after_drop.reserved_bytes, after_first.reserved_bytes, "the block stays reserved, cached");

    // Same size, then another size of the same class: both served from the pool.
    let b = CudaStorage::alloc(&dev, n, DType::F32).unwrap();
    let st = dev.memory_stats();
    assert_eq!(st.num_allocs, after_drop.num_allocs, "no driver allocation");
    assert_eq!(st.num_cache_hits, after_drop.num_cache_hits + 1);
    drop(b);
    let c = CudaStorage::alloc(&dev, n + 3, DType::F32).unwrap();
    assert_eq!(dev.memory_stats().num_allocs, after_drop.num_allocs);
    drop(c);

    // Peak tracking.
    dev.reset_peak();
    let base = dev.memory_stats();
    assert_eq!(base.peak_bytes, base.in_use_bytes);
    let big = CudaStorage::alloc(&dev, 3 << 20, DType::F64).unwrap();
    let grown = dev.memory_stats();
    assert_eq!(grown.peak_bytes, base.in_use_bytes + alloc::size_class(24 << 20).unwrap());
    drop(big);
    assert_eq!(dev.memory_stats().peak_bytes, grown.peak_bytes);

    // Emptying the cache gives every free block back.
    dev.empty_cache().unwrap();
    let st = dev.memory_stats();
    assert_eq!(st.reserved_bytes, st.in_use_bytes);
    let _d = CudaStorage::alloc(&dev, n, DType::F32).unwrap();
    assert_eq!(dev.memory_stats().num_allocs, st.num_allocs + 1, "a miss after emptying");
}

#[test]
fn nvrtc_errors_carry_the_log() {
    let Some((_g, dev)) = gpu("nvrtc_errors_carry_the_log") else { return };
    const BROKEN: &str = "extern \"C\" __global__ void broken_f32(float* x) { x[0] = not_declared_anywhere; }";
    match dev.function("test_broken", BROKEN, "broken_f32") {
        Err(Error::Nvrtc { module, log }) => {
            assert_eq!(module, "test_broken");
            assert!(log.contains("not_declared_anywhere"), "the log names the culprit: {log}");
        }
        other => panic!("expected an NVRTC error, got {other:?}"),
    }
    const FINE: &str = "extern \"C\" __global__ void fine_f32(float* x) { x[0] = 1.0f; }";
    assert!(dev.function("test_fine", FINE, "fine_f32").is_ok());
    assert!(dev.function("test_fine", FINE, "fine_f32").is_ok(), "cached");
    assert!(matches!(dev.function("test_fine", FINE, "absent_f32"), Err(Error::Cuda { .. })));
    assert!(matches!(dev.function("test_fine", BROKEN, "fine_f32"), Err(Error::Cuda { .. })), "one name, one source");
}

/// A module precompiled by two threads at once, while a third asks for its kernel, is compiled once and
/// loaded once; afterwards `function` compiles nothing; a module that does not compile is reported with
/// its log, and the others load all the same.
#[test]
fn precompile_compiles_and_loads_each_module_once() {
    let Some((_g, dev)) = gpu("precompile_compiles_and_loads_each_module_once") else { return };
    const ONE: &str = "extern \"C\" __global__ void one_f32(float* x) { x[0] = 1.0f; }";
    const TWO: &str = "extern \"C\" __global__ void two_f32(float* x) { x[0] = 2.0f; }";
    let modules = [("test_precompile_one", ONE), ("test_precompile_two", TWO)];
    let background = dev.precompile_in_background(modules.to_vec()).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| dev.precompile(&modules).unwrap());
        s.spawn(|| dev.function("test_precompile_two", TWO, "two_f32").unwrap());
    });
    background.join().unwrap().unwrap();
    for (name, _) in modules {
        assert!(dev.is_loaded(name), "{name}");
        assert_eq!(dev.compile_count(name), 1, "{name} compiled once");
    }
    dev.function("test_precompile_one", ONE, "one_f32").unwrap();
    dev.function("test_precompile_two", TWO, "two_f32").unwrap();
    assert_eq!(dev.compile_count("test_precompile_one"), 1, "found loaded");
    assert_eq!(dev.compile_count("test_precompile_two"), 1, "found loaded");
    dev.precompile(&modules).unwrap();
    assert_eq!(dev.compile_count("test_precompile_one"), 1, "nothing to do");

    const BROKEN: &str = "extern \"C\" __global__ void broken_f32(float* x) { x[0] = not_declared_here; }";
    const FINE: &str = "extern \"C\" __global__ void fine_f32(float* x) { x[0] = 3.0f; }";
    match dev.precompile(&[("test_precompile_broken", BROKEN), ("test_precompile_fine", FINE)]) {
        Err(Error::Nvrtc { module, log }) => {
            assert_eq!(module, "test_precompile_broken");
            assert!(log.contains("not_declared_here"), "the log names the culprit: {log}");
        }
        other => panic!("expected an NVRTC error, got {other:?}"),
    }
    assert!(!dev.is_loaded("test_precompile_broken"));
    assert!(dev.is_loaded("test_precompile_fine"));
    assert!(matches!(dev.function("test_precompile_broken", BROKEN, "broken_f32"), Err(Error::Nvrtc { .. })));
    assert!(
        matches!(dev.precompile(&[("test_precompile_fine", BROKEN)]), Err(Error::Cuda { .. })),
        "one name, one source"
    );
}

/// The pattern ops follow (see the example in mod.rs): a custom elementwise kernel through the public API.
#[test]
fn custom_elementwise_kernel_through_the_public_api() {
    let Some((_g, dev)) = gpu("custom_elementwise_kernel_through_the_public_api") else { return };
    const SRC: &str = concat!(
        include_str!("prelude.cuh"),
        r#"
template <typename T> __device__ void axpb(const T* x, Strided lx, T* y, long long n, double a, double b) {
    GRID_STRIDE(i, n) { y[i] = (T)a * x[offset_of(lx, i)] + (T)b; }
}
extern "C" __global__ void axpb_f32(const float* x, Strided lx, float* y, long long n, double a, double b) { axpb(x, lx, y, n, a, b); }
extern "C" __global__ void axpb_f64(const double* x, Strided lx, double* y, long long n, double a, double b) { axpb(x, lx, y, n, a, b); }
"#
    );
    fn axpb<T: Float>(x: &CudaStorage, layout: &Layout, a: f64, b: f64) -> crate::Result<CudaStorage> {
        let dev = x.device();
        let f = dev.function("test_axpb", SRC, &kernel_name::<T>("axpb"))?;
        let n = layout.numel();
        let out = dev.alloc::<T>(n)?;
        let (lx, n64) = (x.strided("axpb", layout)?, n as i64);
        let mut launch = dev.stream().launch_builder(&f);
        launch.arg(x.slice::<T>()?).arg(&lx).arg(out.as_slice()).arg(&n64).arg(&a).arg(&b);
        // SAFETY: axpb_<T>(const T* x, Strided lx, T* y, long long n, double a, double b) reads x inside the
        // layout (a view of x's buffer) and writes y[0..n), which holds n elements.
        unsafe { launch.launch(dev.launch_config(n)) }
            .map_err(|e| Error::Cuda { op: "axpb", msg: format!("{e:?}") })?;
        CudaStorage::from_slice(dev, out)
    }
    let mut g = Generator::new(15);
    // 2^21 elements: more than one grid's worth of threads, so the grid-stride loop takes several turns.
    let cpu = random(&mut g, 1 << 21, DType::F32);
    let x = CudaStorage::from_cpu(0, &cpu).unwrap();
    let layout = Layout::contiguous(&[1 << 10, 1 << 11]).permute(&[1, 0]).unwrap();
    poison(&dev, 1 << 21, DType::F32);
    let y = axpb::<f32>(&x, &layout, 3.0, -1.0).unwrap();
    let want: Vec<f64> = cpu.copy_contiguous(&layout).to_f64_vec(&Layout::contiguous(&[1 << 21]));
    let want: Vec<f64> = want.iter().map(|&v| (3.0f32 * v as f32 + -1.0f32) as f64).collect();
    let got = host(&y);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "element {i}: {g} vs {w}");
    }
    assert!(matches!(axpb::<f64>(&x, &layout, 1.0, 0.0), Err(Error::DTypeMismatch { .. })));
}

/// C_b = alpha op(A_b) op(B_b) + beta C_b, the naive way, in f64.
fn gemm_reference(cfg: &GemmConfig, a: &[f64], b: &[f64], c: &[f64]) -> Vec<f64> {
    let mut out = c.to_vec();
    for bi in 0..cfg.batch {
        for i in 0..cfg.m {
            for j in 0..cfg.n {
                let mut acc = 0.0;
                for p in 0..cfg.k {
                    let av = if cfg.trans_a {
                        a[bi * cfg.stride_a + p * cfg.lda + i]
                    } else {
                        a[bi * cfg.stride_a + i * cfg.lda + p]
                    };
                    let bv = if cfg.trans_b {
                        b[bi * cfg.stride_b + j * cfg.ldb + p]
                    } else {
                        b[bi * cfg.stride_b + p * cfg.ldb + j]
                    };
                    acc += av * bv;
                }
                let o = bi * cfg.stride_c + i * cfg.ldc + j;
                out[o] = cfg.alpha * acc + cfg.beta * c[o];
            }
        }
    }
    out
}

fn gemm_case<T: Float + DeviceRepr>(dev: &CudaDevice, g: &mut Generator, cfg: GemmConfig, tol: f64) {
    let (ar, ac) = if cfg.trans_a { (cfg.k, cfg.m) } else { (cfg.m, cfg.k) };
    let (br, bc) = if cfg.trans_b { (cfg.n, cfg.k) } else { (cfg.k, cfg.n) };
    let len = |stride: usize, rows: usize, ld: usize, cols: usize| (cfg.batch - 1) * stride + (rows - 1) * ld + cols;
    // Round the inputs to T first, so that the reference sees exactly what the device does.
    let draw = |g: &mut Generator, n: usize| -> Vec<f64> {
        g.normal_vec(n, 0.0, 1.0).into_iter().map(|v| T::from_f64(v).to_f64()).collect()
    };
    let a = draw(g, len(cfg.stride_a, ar, cfg.lda, ac));
    let b = draw(g, len(cfg.stride_b, br, cfg.ldb, bc));
    let c = draw(g, len(cfg.stride_c, cfg.m, cfg.ldc, cfg.n));
    let to_t = |v: &[f64]| -> Vec<T> { v.iter().map(|&x| T::from_f64(x)).collect() };
    let (da, db) = (dev.htod(&to_t(&a)).unwrap(), dev.htod(&to_t(&b)).unwrap());
    let mut dc = dev.htod(&to_t(&c)).unwrap();
    dev.gemm_strided_batched::<T>(&cfg, da.as_slice(), db.as_slice(), &mut dc.view_mut()).unwrap();
    let got: Vec<f64> = dev.dtoh(dc.as_slice()).unwrap().into_iter().map(|v: T| v.to_f64()).collect();
    let want = gemm_reference(&cfg, &a, &b, &c);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{} {cfg:?}: element {i} is {g}, expected {w}", T::DTYPE);
    }
}

#[test]
fn gemm_strided_batched_matches_a_naive_loop() {
    let Some((_g, dev)) = gpu("gemm_strided_batched_matches_a_naive_loop") else { return };
    set_tf32(false);
    let mut g = Generator::new(16);
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            let dense = GemmConfig { alpha: 1.5, beta: 0.5, ..GemmConfig::contiguous(3, 5, 7, 4, trans_a, trans_b) };
            // Padded rows (row stride beyond the column count) and a B shared by the whole batch.
            let padded = GemmConfig {
                lda: dense.lda + 2,
                ldb: dense.ldb + 3,
                ldc: dense.ldc + 1,
                stride_a: (dense.lda + 2) * 7,
                stride_b: 0,
                stride_c: 5 * (dense.ldc + 1) + 4,
                ..dense
            };
            for cfg in [dense, padded] {
                gemm_case::<f32>(&dev, &mut g, cfg, 1e-5);
                gemm_case::<f64>(&dev, &mut g, cfg, 1e-12);
            }
        }
    }
    // A product large enough for cuBLAS to pick tensor-core kernels, with TF32 off and on.
    let big = GemmConfig::contiguous(2, 96, 80, 256, true, false);
    gemm_case::<f32>(&dev, &mut g, big, 1e-4);
    set_tf32(true);
    gemm_case::<f32>(&dev, &mut g, big, 2e-2);
    gemm_case::<f64>(&dev, &mut g, big, 1e-12);
    set_tf32(false);
    gemm_case::<f32>(&dev, &mut g, big, 1e-4);
    // Bad configurations are errors, not out-of-bounds reads.
    let cfg = GemmConfig::contiguous(2, 3, 4, 5, false, false);
    let small = dev.alloc::<f32>(10).unwrap();
    let mut out = dev.alloc::<f32>(24).unwrap();
    assert!(matches!(
        dev.gemm_strided_batched::<f32>(&cfg, small.as_slice(), small.as_slice(), &mut out.view_mut()),
        Err(Error::InvalidArgument { .. })
    ));
}

/// One fused cuBLASLt product (batch 1) against the naive loop: `gemm_bias` (C = op(A) op(B) + bias per
/// column) or `gemm_bias_grad` (C = op(A) op(B) and the row sums of op(A)). Fresh N(0, 1) inputs; C starts
/// as NaN, so an element left unwritten fails. Where cuBLASLt offers no algorithm the call must say so
/// (`Ok(false)`); `require` makes that a failure (the orientations a Linear layer uses, in f32, and the f64
/// bias, which PyTorch's fused addmm also runs), otherwise it is printed.
fn gemm_lt_case<T: Float + DeviceRepr>(
    dev: &CudaDevice,
    g: &mut Generator,
    cfg: GemmConfig,
    grad: bool,
    require: bool,
    tol: f64,
) {
    gemm_lt_act_case::<T>(dev, g, cfg, grad, false, require, tol)
}

/// `gemm_lt_case`, and with `relu` (not with `grad`) the RELU_BIAS epilogue: C = max(op(A) op(B) + bias, 0).
fn gemm_lt_act_case<T: Float + DeviceRepr>(
    dev: &CudaDevice,
    g: &mut Generator,
    cfg: GemmConfig,
    grad: bool,
    relu: bool,
    require: bool,
    tol: f64,
) {
    let (ar, ac) = if cfg.trans_a { (cfg.k, cfg.m) } else { (cfg.m, cfg.k) };
    let (br, bc) = if cfg.trans_b { (cfg.n, cfg.k) } else { (cfg.k, cfg.n) };
    let draw = |g: &mut Generator, n: usize| -> Vec<f64> {
        g.normal_vec(n, 0.0, 1.0).into_iter().map(|v| T::from_f64(v).to_f64()).collect()
    };
    let a = draw(g, (ar - 1) * cfg.lda + ac);
    let b = draw(g, (br - 1) * cfg.ldb + bc);
    let bias = draw(g, if grad { cfg.m } else { cfg.n });
    let c = vec![0.0; (cfg.m - 1) * cfg.ldc + cfg.n];
    let to_t = |v: &[f64]| -> Vec<T> { v.iter().map(|&x| T::from_f64(x)).collect() };
    let (da, db) = (dev.htod(&to_t(&a)).unwrap(), dev.htod(&to_t(&b)).unwrap());
    let mut dc = dev.htod(&to_t(&vec![f64::NAN; c.len()])).unwrap();
    let mut dv = dev.htod(&to_t(&if grad { vec![f64::NAN; bias.len()] } else { bias.clone() })).unwrap();
    let fused = if grad {
        dev.gemm_bias_grad::<T>(&cfg, da.as_slice(), db.as_slice(), &mut dc.view_mut(), &mut dv.view_mut()).unwrap()
    } else {
        dev.gemm_bias::<T>(&cfg, da.as_slice(), db.as_slice(), &mut dc.view_mut(), dv.as_slice(), relu).unwrap()
    };
    if !fused {
        assert!(!require, "{} {cfg:?} (grad {grad}): cuBLASLt offered no algorithm", T::DTYPE);
        println!("{} {cfg:?} (grad {grad}): no cuBLASLt algorithm, the caller falls back", T::DTYPE);
        return;
    }
    let mut want = gemm_reference(&cfg, &a, &b, &c);
    if !grad {
        for i in 0..cfg.m {
            for j in 0..cfg.n {
                want[i * cfg.ldc + j] += bias[j];
                if relu {
                    want[i * cfg.ldc + j] = want[i * cfg.ldc + j].max(0.0);
                }
            }
        }
    }
    let got: Vec<f64> = dev.dtoh(dc.as_slice()).unwrap().into_iter().map(|v: T| v.to_f64()).collect();
    for i in 0..cfg.m {
        for j in 0..cfg.n {
            let (g, w) = (got[i * cfg.ldc + j], want[i * cfg.ldc + j]);
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{} {cfg:?} (grad {grad}): C[{i}, {j}] is {g}, expected {w}",
                T::DTYPE
            );
        }
    }
    if grad {
        let got: Vec<f64> = dev.dtoh(dv.as_slice()).unwrap().into_iter().map(|v: T| v.to_f64()).collect();
        for i in 0..cfg.m {
            let w: f64 = (0..cfg.k).map(|p| if cfg.trans_a { a[p * cfg.lda + i] } else { a[i * cfg.lda + p] }).sum();
            assert!(
                (got[i] - w).abs() <= tol * (1.0 + w.abs()),
                "{} {cfg:?}: bgrad[{i}] is {}, expected {w}",
                T::DTYPE,
                got[i]
            );
        }
    }
}

#[test]
fn gemm_bias_and_bias_grad_match_a_naive_loop() {
    let Some((_g, dev)) = gpu("gemm_bias_and_bias_grad_match_a_naive_loop") else { return };
    set_tf32(false);
    let mut g = Generator::new(19);
    // A Linear layer's forward: X (M, K) W^T + b with W stored (N, K); odd sizes, then padded rows.
    for (m, n, k) in [(5, 3, 7), (1, 1, 1), (37, 13, 29), (64, 48, 96), (130, 257, 33)] {
        let cfg = GemmConfig::contiguous(1, m, n, k, false, true);
        gemm_lt_case::<f32>(&dev, &mut g, cfg, false, true, 1e-5);
        gemm_lt_case::<f64>(&dev, &mut g, cfg, false, true, 1e-12);
        let padded = GemmConfig { lda: k + 3, ldc: n + 1, ..cfg };
        // With the ReLU: f32 must fuse (a Linear + ReLU uses it), f64 may fall back.
        gemm_lt_act_case::<f32>(&dev, &mut g, cfg, false, true, true, 1e-5);
        gemm_lt_act_case::<f64>(&dev, &mut g, cfg, false, true, false, 1e-12);
        gemm_lt_case::<f32>(&dev, &mut g, padded, false, false, 1e-5);
        gemm_lt_case::<f64>(&dev, &mut g, padded, false, false, 1e-12);
        // The weight gradient: dW (N, K) = g^T X with g stored (M, N), and db = the column sums of g.
        let wgrad = GemmConfig::contiguous(1, n, k, m, true, false);
        gemm_lt_case::<f32>(&dev, &mut g, wgrad, true, true, 1e-5);
        gemm_lt_case::<f64>(&dev, &mut g, wgrad, true, false, 1e-12);
    }
    // Every transpose combination.
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            let cfg = GemmConfig::contiguous(1, 9, 6, 11, trans_a, trans_b);
            for grad in [false, true] {
                gemm_lt_case::<f32>(&dev, &mut g, cfg, grad, false, 1e-5);
                gemm_lt_case::<f64>(&dev, &mut g, cfg, grad, false, 1e-12);
            }
        }
    }
    // Large enough for tensor cores, with TF32 off, on, and off again (the cached algorithms are per setting).
    let big = GemmConfig::contiguous(1, 256, 192, 320, false, true);
    gemm_lt_case::<f32>(&dev, &mut g, big, false, true, 1e-4);
    set_tf32(true);
    gemm_lt_case::<f32>(&dev, &mut g, big, false, true, 2e-2);
    gemm_lt_case::<f32>(&dev, &mut g, GemmConfig::contiguous(1, 192, 320, 256, true, false), true, true, 2e-2);
    gemm_lt_case::<f64>(&dev, &mut g, big, false, true, 1e-12);
    set_tf32(false);
    gemm_lt_case::<f32>(&dev, &mut g, big, false, true, 1e-4);
    // Not fused: a batch, an empty size, a misaligned bias; nothing is enqueued and the caller falls back.
    let a = dev.alloc::<f32>(64).unwrap();
    let mut c = dev.alloc::<f32>(64).unwrap();
    let batched = GemmConfig::contiguous(2, 2, 2, 2, false, true);
    assert!(!dev
        .gemm_bias::<f32>(&batched, a.as_slice(), a.as_slice(), &mut c.view_mut(), a.as_slice(), false)
        .unwrap());
    let empty = GemmConfig::contiguous(1, 2, 2, 0, false, true);
    assert!(!dev.gemm_bias::<f32>(&empty, a.as_slice(), a.as_slice(), &mut c.view_mut(), a.as_slice(), false).unwrap());
    let cfg = GemmConfig::contiguous(1, 2, 2, 2, false, true);
    let off = a.as_slice().slice(1..);
    assert!(!dev.gemm_bias::<f32>(&cfg, a.as_slice(), a.as_slice(), &mut c.view_mut(), &off, false).unwrap());
    // Bad arguments are errors: a bias shorter than the row, operands that overrun their buffers.
    let short = a.as_slice().slice(0..1);
    assert!(matches!(
        dev.gemm_bias::<f32>(&cfg, a.as_slice(), a.as_slice(), &mut c.view_mut(), &short, false),
        Err(Error::InvalidArgument { .. })
    ));
    let big_cfg = GemmConfig::contiguous(1, 9, 9, 9, false, true);
    assert!(matches!(
        dev.gemm_bias::<f32>(&big_cfg, a.as_slice(), a.as_slice(), &mut c.view_mut(), a.as_slice(), false),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn tensors_move_between_host_and_device() {
    let Some((_g, _dev)) = gpu("tensors_move_between_host_and_device") else { return };
    let mut g = Generator::new(17);
    let x = Tensor::randn(&[3, 4, 5], 0.0, 1.0, DType::F32, Device::Cpu, &mut g).unwrap();
    let xd = x.to_device(Device::Cuda(0)).unwrap();
    assert_eq!(xd.device(), Device::Cuda(0));
    assert_eq!(xd.to_vec::<f32>().unwrap(), x.to_vec::<f32>().unwrap());
    assert_eq!(xd.to_device(Device::Cpu).unwrap().to_vec::<f32>().unwrap(), x.to_vec::<f32>().unwrap());
    // A permuted view made contiguous on the device matches the same on the host.
    let perm = x.layout().permute(&[2, 0, 1]).unwrap();
    let want = x.with_layout(perm.clone()).contiguous().unwrap().to_vec::<f32>().unwrap();
    let got = xd.with_layout(perm).contiguous().unwrap();
    assert_eq!(got.device(), Device::Cuda(0));
    assert_eq!(got.to_vec::<f32>().unwrap(), want);
    // dtype casts and gradient accumulation on the device.
    let x64 = xd.to_dtype(DType::F64).unwrap();
    assert_eq!(x64.to_vec_f64().unwrap(), x.to_vec_f64().unwrap());
    let twice = xd.accumulate(&xd).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(twice, x.to_vec::<f32>().unwrap().iter().map(|v| v + v).collect::<Vec<_>>());
    assert_eq!(Tensor::ones(&[2, 2], DType::F64, Device::Cuda(0)).unwrap().to_vec::<f64>().unwrap(), vec![1.0; 4]);
}

/// Ops enqueue and return: with a slow kernel at the head of the stream, a run of storage ops, pool reuse
/// and a matrix product must come back long before the device gets to them.
#[test]
fn ops_do_not_wait_for_the_device() {
    let Some((_g, dev)) = gpu("ops_do_not_wait_for_the_device") else { return };
    const SPIN: &str = r#"extern "C" __global__ void spin(long long cycles) {
        long long start = clock64();
        while (clock64() - start < cycles) {}
    }"#;
    let spin = dev.function("test_spin", SPIN, "spin").unwrap();
    let mut g = Generator::new(18);
    let x = CudaStorage::from_cpu(0, &random(&mut g, 4096, DType::F32)).unwrap();
    let view = Layout::contiguous(&[64, 64]).permute(&[1, 0]).unwrap();
    let cfg = GemmConfig::contiguous(1, 64, 64, 64, false, true);
    let run_ops = || {
        for _ in 0..20 {
            let y = x.copy_strided(&view).unwrap();
            let z = y.cast(&view, DType::F64).unwrap();
            let mut w = x.add_same_shape(&view, &y, &view).unwrap();
            w.fill(0.5).unwrap();
            let mut c = dev.alloc::<f32>(4096).unwrap();
            dev.gemm_strided_batched::<f32>(
                &cfg,
                x.slice::<f32>().unwrap(),
                w.slice::<f32>().unwrap(),
                &mut c.view_mut(),
            )
            .unwrap();
            drop((z, c));
        }
    };
    run_ops(); // compiles the kernels, creates the cuBLAS handle and fills the pool
    dev.synchronize().unwrap();

    let cycles: i64 = 2_000_000_000; // about a second at H100 clocks
    let start = std::time::Instant::now();
    let mut launch = dev.stream().launch_builder(&spin);
    launch.arg(&cycles);
    // SAFETY: spin(long long cycles) touches no memory.
    unsafe { launch.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 }) }.unwrap();
    run_ops();
    let enqueued = start.elapsed();
    dev.synchronize().unwrap();
    let finished = start.elapsed();
    assert!(finished.as_secs_f64() > 0.3, "the spin kernel ran ({finished:?})");
    assert!(enqueued < finished / 4, "ops waited for the device: enqueued in {enqueued:?}, finished in {finished:?}");
}

#[test]
fn device_is_usable_from_several_threads() {
    let Some((_g, _dev)) = gpu("device_is_usable_from_several_threads") else { return };
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut g = Generator::new(100 + t);
                for _ in 0..20 {
                    let cpu = random(&mut g, 777, DType::F64);
                    let s = CudaStorage::from_cpu(0, &cpu).unwrap();
                    let l = Layout::contiguous(&[7, 111]).permute(&[1, 0]).unwrap();
                    let got = s.copy_strided(&l).unwrap().to_cpu(&Layout::contiguous(&[777])).unwrap();
                    assert_eq!(
                        got.to_f64_vec(&Layout::contiguous(&[777])),
                        cpu.copy_contiguous(&l).to_f64_vec(&Layout::contiguous(&[777]))
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

// ---- CUDA graphs -----------------------------------------------------------------------------------------

fn f32_storage(v: &[f32]) -> CudaStorage {
    CudaStorage::from_cpu(0, &CpuStorage::F32(v.to_vec())).unwrap()
}

#[test]
fn a_captured_graph_replays_its_work_on_new_inputs() {
    let Some((_g, dev)) = gpu("a_captured_graph_replays_its_work_on_new_inputs") else { return };
    let l = Layout::contiguous(&[4]);
    let mut x = f32_storage(&[1.0, 2.0, 3.0, 4.0]);
    // Warm-up: compiles and loads the storage module outside the capture.
    drop(x.add_same_shape(&l, &x, &l).unwrap());
    let pool_before = dev.memory_stats().graph_pool_bytes;
    let (graph, y) = dev
        .capture(|| {
            // An upload inside the capture is frozen into the graph with its values.
            let c = f32_storage(&[10.0, 20.0, 30.0, 40.0]);
            let t = x.add_same_shape(&l, &c, &l)?; // freed inside the capture: the private pool keeps it
            t.add_same_shape(&l, &x, &l) // x + c + x
        })
        .unwrap();
    assert!(!dev.is_capturing());
    assert_eq!(graph.frozen_uploads(), 1);
    assert!(dev.memory_stats().graph_pool_bytes > pool_before, "{}", dev.memory_stats());
    graph.replay().unwrap();
    assert_same(&host(&y), &[12.0, 24.0, 36.0, 48.0], "first replay");
    // New input values written in place (same address) are what the next replay reads.
    x.write_from_cpu(0, &CpuStorage::F32(vec![0.0, 1.0, 0.0, 1.0])).unwrap();
    // Many uploads through the staging ring and allocations of the graph's class outside it: neither may
    // disturb the frozen upload nor the graph's blocks.
    let outside: Vec<CudaStorage> = (0..20).map(|i| f32_storage(&[-(i as f32); 4])).collect();
    graph.replay().unwrap();
    graph.replay().unwrap();
    assert_same(&host(&y), &[10.0, 22.0, 30.0, 42.0], "replay after new inputs");
    for (i, s) in outside.iter().enumerate() {
        assert_same(&host(s), &[-(i as f64); 4], "a block allocated outside the graph");
    }
    drop(graph);
    assert_eq!(dev.memory_stats().graph_pool_bytes, pool_before, "the private pool is released with its graph");
    // y outlives the graph; its block goes to the general pool when dropped.
    assert_same(&host(&y), &[10.0, 22.0, 30.0, 42.0], "y after the graph is gone");
}

#[test]
fn a_fed_buffer_is_not_rewritten_by_replays_of_earlier_work() {
    let Some((_g, dev)) = gpu("a_fed_buffer_is_not_rewritten_by_replays_of_earlier_work") else { return };
    let l = Layout::contiguous(&[4]);
    let x = f32_storage(&[1.0, 2.0, 3.0, 4.0]);
    drop(x.add_same_shape(&l, &x, &l).unwrap());
    let (graph, (fed, y)) = dev
        .capture(|| {
            // Captured work writes a block of the fed buffer's class, which is freed inside the capture ...
            drop(x.add_same_shape(&l, &x, &l)?);
            // ... so an ordinary allocation here would get that block back, and every replay would write
            // 2x into it after the host had filled it. An untouched allocation does not.
            let fed = CudaStorage::alloc_untouched(&dev, 4, DType::F32)?;
            let y = x.add_same_shape(&l, &fed, &l)?;
            Ok((fed, y))
        })
        .unwrap();
    let mut fed = fed;
    for (step, values) in [[10.0f32, 20.0, 30.0, 40.0], [-1.0, -2.0, 0.5, 8.0]].iter().enumerate() {
        fed.write_from_cpu(0, &CpuStorage::F32(values.to_vec())).unwrap();
        graph.replay().unwrap();
        let want: Vec<f64> = values.iter().zip([1.0, 2.0, 3.0, 4.0]).map(|(&v, x)| v as f64 + x).collect();
        assert_same(&host(&y), &want, &format!("replay {step} reads the values fed before it"));
    }
}

#[test]
fn waiting_during_a_capture_fails_it_cleanly() {
    let Some((_g, dev)) = gpu("waiting_during_a_capture_fails_it_cleanly") else { return };
    let s = f32_storage(&[1.0, 2.0]);
    let l = Layout::contiguous(&[2]);
    let pool_before = dev.memory_stats().graph_pool_bytes;
    let err = dev
        .capture(|| {
            let t = s.add_same_shape(&l, &s, &l)?;
            t.to_cpu(&l) // waits for the device: refused
        })
        .err()
        .expect("a read-back inside a capture must fail");
    assert!(err.to_string().contains("CUDA graph"), "{err}");
    let err = dev.capture(|| dev.synchronize()).err().expect("synchronize inside a capture must fail");
    assert!(err.to_string().contains("CUDA graph"), "{err}");
    assert!(!dev.is_capturing());
    assert_eq!(dev.memory_stats().graph_pool_bytes, pool_before);
    // The stream works as before.
    let t = s.add_same_shape(&l, &s, &l).unwrap();
    assert_same(&host(&t), &[2.0, 4.0], "after the failed captures");
    dev.synchronize().unwrap();
}
