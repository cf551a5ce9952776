//! Every op of the gradient-check suite on CUDA against the CPU: the same fresh random inputs (broadcast and
//! non-contiguous views included, as the suite builds them), outputs and every input's gradient, f32 and
//! f64. New device allocations are poisoned with NaN, so an element a kernel leaves unwritten fails.
//! Without a device these tests print a skip line (and fail under MILA_REQUIRE_CUDA=1).

use engine::cuda::{poison_new_allocations, test_device_or_skip};
use engine::{DType, Device, Error, Generator, Tensor};
use ops::{suite, Binary, Cmp, Unary};

/// ||a - b|| / ||b|| over all elements (0 when both are zero).
fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if num == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The larger of two errors, NaN if either is (`f64::max` would drop a NaN and let a broken gradient pass).
fn worse(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn every_op_matches_cpu(dtype: DType, tol: f64) {
    let _serial = crate::cuda_serial();
    let Some(_dev) = test_device_or_skip("every_op_matches_cpu") else { return };
    let _poison = poison_new_allocations();
    let mut failures = Vec::new();
    for (i, case) in suite::cases().iter().enumerate() {
        let seed = 1000 + i as u64;
        let cpu = suite::inputs(case, seed, dtype, Device::Cpu).unwrap();
        let gpu: Vec<Tensor> = cpu.iter().map(|t| t.to_device(Device::Cuda(0)).unwrap()).collect();
        if !case.cuda {
            // No CUDA kernel yet: the op must say so, and the mark goes once it has one.
            match suite::forward_backward(case, &gpu, seed) {
                Err(Error::Unsupported { .. }) => println!("{dtype} {:<28} no CUDA path yet", case.name),
                other => failures.push(format!("{}: marked CPU-only, but CUDA gave {:?}", case.name, other.err())),
            }
            continue;
        }
        let (y_cpu, g_cpu) = suite::forward_backward(case, &cpu, seed).unwrap();
        let (y_gpu, g_gpu) = match suite::forward_backward(case, &gpu, seed) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        assert_eq!(y_gpu.device(), Device::Cuda(0), "{}", case.name);
        let mut worst = rel_error(&y_gpu, &y_cpu);
        for (a, b) in g_gpu.iter().zip(&g_cpu) {
            match (a, b) {
                (Some(a), Some(b)) => worst = worse(worst, rel_error(a, b)),
                (None, None) => {}
                _ => failures.push(format!("{}: a gradient exists on one device only", case.name)),
            }
        }
        println!("{dtype} {:<28} worst relative error {worst:.2e}", case.name);
        if worst.is_nan() || worst > tol {
            failures.push(format!("{}: relative error {worst:.3e} > {tol:e}", case.name));
        }
    }
    assert!(failures.is_empty(), "{dtype}: {} ops differ from the CPU:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_op_matches_cpu_f32() {
    every_op_matches_cpu(DType::F32, 1e-5);
}

#[test]
fn every_op_matches_cpu_f64() {
    every_op_matches_cpu(DType::F64, 1e-12);
}

#[test]
fn cuda_results_stay_on_the_device_until_read() {
    let _serial = crate::cuda_serial();
    let Some(dev) = test_device_or_skip("cuda_results_stay_on_the_device_until_read") else { return };
    let x = Tensor::from_vec(vec![1.0f32, -2.0, 3.0], &[3]).unwrap().to_device(Device::Cuda(0)).unwrap();
    let y = ops::relu(&ops::mul_scalar(&x, 2.0).unwrap()).unwrap();
    assert_eq!(y.device(), Device::Cuda(0));
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![2.0, 0.0, 6.0]);
    // One warm-up pass while `y` is alive (it holds a block the loop cannot take), then the pool is warm:
    // the same shapes again allocate nothing new from the driver and are served from the cache.
    let _ = ops::relu(&ops::mul_scalar(&x, 2.0).unwrap()).unwrap();
    let before = dev.memory_stats();
    for _ in 0..3 {
        let _ = ops::relu(&ops::mul_scalar(&x, 2.0).unwrap()).unwrap();
    }
    let after = dev.memory_stats();
    assert_eq!(after.num_allocs, before.num_allocs, "driver allocations after warm-up");
    assert_eq!(after.num_cache_hits, before.num_cache_hits + 6, "two buffers a pass, from the cache");
}

// ---- the fast paths at size ------------------------------------------------------------------------------

type Func = Box<dyn Fn(&[Tensor]) -> engine::Result<Tensor>>;

/// `f` of leaves over the same values on the CPU and on CUDA, forward and (with `grad`) backward with one
/// fixed random output gradient: the worst relative error of the output and of every leaf's gradient.
fn cuda_vs_cpu(cpu: &[Tensor], gpu: &[Tensor], f: &Func, grad: bool) -> engine::Result<f64> {
    let run = |bases: &[Tensor]| -> engine::Result<(Tensor, Vec<Option<Tensor>>)> {
        // Fresh leaves over the shared storage, so that no gradient carries over from an earlier check.
        let xs = bases.iter().map(|t| t.detach().requires_grad_(true)).collect::<engine::Result<Vec<_>>>()?;
        let y = f(&xs)?;
        if !grad {
            return Ok((y, Vec::new()));
        }
        let gy = Tensor::rand(y.shape(), -1.0, 1.0, y.dtype(), Device::Cpu, &mut Generator::new(77))?;
        y.backward_with(&gy.to_device(y.device())?)?;
        Ok((y, xs.iter().map(|x| x.grad()).collect()))
    };
    let (y_cpu, g_cpu) = run(cpu)?;
    let (y_gpu, g_gpu) = run(gpu)?;
    assert_eq!(y_gpu.device(), Device::Cuda(0));
    let mut worst = rel_error(&y_gpu, &y_cpu);
    for (a, b) in g_gpu.iter().zip(&g_cpu) {
        match (a, b) {
            (Some(a), Some(b)) => worst = worse(worst, rel_error(a, b)),
            (None, None) => {}
            _ => return Ok(f64::NAN), // a gradient on one device only
        }
    }
    Ok(worst)
}

/// Elements of the inputs of most checks: no multiple of 4, so every vectorised kernel has a scalar tail.
const N: usize = (1 << 20) + 3;
/// Elements of the large checks: more than one wave of 16-byte packs (at most 132 SMs x 8 blocks x 256 threads
/// x 4 packs = 4.3M floats), so the grid-stride loops take several turns, for both dtypes.
const BIG: usize = (5 << 20) + 1;

const UNARY: [Unary; 19] = [
    Unary::Neg,
    Unary::Exp,
    Unary::Log,
    Unary::Sqrt,
    Unary::Rsqrt,
    Unary::Abs,
    Unary::Relu,
    Unary::Gelu,
    Unary::Silu,
    Unary::Elu(0.7),
    Unary::Softplus { beta: 1.5, threshold: 2.0 },
    Unary::Sigmoid,
    Unary::Tanh,
    Unary::Powf(2.5),
    Unary::AddScalar(0.3),
    Unary::MulScalar(-1.7),
    Unary::DivScalar(3.0),
    Unary::ClampMin(0.1),
    Unary::ClampMax(-0.2),
];

const BINARY: [Binary; 6] = [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div, Binary::Maximum, Binary::Minimum];
const CMP: [Cmp; 6] = [Cmp::Eq, Cmp::Ne, Cmp::Lt, Cmp::Le, Cmp::Gt, Cmp::Ge];

/// `len` elements of leaf `x` from element `start`, as `shape`: a contiguous view at that offset. An f32 view is
/// 16-byte aligned when `start` is a multiple of 4, an f64 one when it is even; the others must take the
/// strided kernels.
fn at(x: &Tensor, start: usize, shape: &[usize]) -> engine::Result<Tensor> {
    let len = shape.iter().product();
    let shape: Vec<isize> = shape.iter().map(|&d| d as isize).collect();
    ops::reshape(&ops::narrow(x, 0, start, len)?, &shape)
}

/// The checks, each `(name, uses the large inputs, f, with gradients)`. Leaf 0 holds values in [-3, 3], leaf 1
/// values in [0.2, 2] (for log, sqrt, powf and divisors; also sums, which then do not cancel).
fn fast_path_checks() -> Vec<(String, bool, Func, bool)> {
    let mut v: Vec<(String, bool, Func, bool)> = Vec::new();
    for op in UNARY {
        let positive = matches!(op, Unary::Log | Unary::Sqrt | Unary::Rsqrt | Unary::Powf(_));
        let leaf = usize::from(positive);
        for start in [0, 1, 2] {
            let f: Func = Box::new(move |x| ops::unary(op, &at(&x[leaf], start, &[N])?));
            v.push((format!("{} of {N} from element {start}", op.name()), false, f, true));
        }
        // A row of 256 repeated over 1000 rows (period 256) and at an odd offset (strided).
        for start in [0, 1] {
            let f: Func = Box::new(move |x| ops::unary(op, &ops::expand(&at(&x[leaf], start, &[256])?, &[1000, 256])?));
            v.push((format!("{} of a row of 256 from element {start}, over 1000 rows", op.name()), false, f, true));
        }
    }
    for op in BINARY {
        for (sa, sb) in [(0, 0), (1, 0), (0, 2), (4, 8), (3, 5)] {
            let f: Func = Box::new(move |x| ops::binary(op, &at(&x[0], sa, &[N])?, &at(&x[1], sb, &[N])?));
            v.push((format!("{} of {N}, a from {sa}, b from {sb}", op.name()), false, f, true));
        }
        // A bias over rows: whole packs (256), half packs for f32 (250), misaligned (from element 1).
        for (c, sb) in [(256, 0), (250, 0), (256, 1)] {
            let f: Func = Box::new(move |x| ops::binary(op, &at(&x[0], 0, &[4000, c])?, &at(&x[1], sb, &[c])?));
            v.push((format!("{} of (4000, {c}) and a bias of {c} from element {sb}", op.name()), false, f, true));
        }
        // A scalar at an odd offset, on either side.
        let f: Func = Box::new(move |x| ops::binary(op, &at(&x[0], 0, &[N])?, &at(&x[1], 3, &[])?));
        v.push((format!("{} of {N} and a scalar", op.name()), false, f, true));
        let f: Func = Box::new(move |x| ops::binary(op, &at(&x[0], 5, &[])?, &at(&x[1], 1, &[N])?));
        v.push((format!("{} of a scalar and {N} from element 1", op.name()), false, f, true));
    }
    for op in [Binary::Add, Binary::Mul] {
        for (sa, sb) in [(0, 4), (1, 0)] {
            let f: Func = Box::new(move |x| ops::binary(op, &at(&x[0], sa, &[BIG])?, &at(&x[1], sb, &[BIG])?));
            v.push((format!("{} of {BIG}, a from {sa}, b from {sb}", op.name()), true, f, true));
        }
    }
    for op in CMP {
        for start in [0, 1] {
            // Ties wherever a >= 0.
            let f: Func = Box::new(move |x| {
                let a = at(&x[0], start, &[N])?;
                ops::compare(op, &a, &ops::maximum_scalar(&a, 0.0)?)
            });
            v.push((format!("{} of {N} from element {start}", op.name()), false, f, false));
        }
        let f: Func = Box::new(move |x| ops::compare_scalar(op, &at(&x[0], 0, &[N])?, 0.5));
        v.push((format!("{} of {N} and a scalar", op.name()), false, f, false));
    }
    for (sa, sb) in [(0, 0), (1, 0), (0, 6)] {
        let f: Func = Box::new(move |x| {
            let a = at(&x[0], sa, &[N])?;
            let cond = ops::compare_scalar(Cmp::Gt, &a.detach(), 0.0)?;
            ops::where_(&cond, &a, &at(&x[1], sb, &[N])?)
        });
        v.push((format!("where of {N}, a from {sa}, b from {sb}"), false, f, true));
    }
    // Reductions: full sums and maxima of every length class (packs plus a tail, shorter than a pack) at every
    // alignment, and over the last dim of rows that take the warp kernel, the split block kernel and both
    // with misaligned rows.
    for len in [BIG, N, 4097, 7, 1] {
        for start in [0, 1, 2, 3] {
            let big = len == BIG;
            let f: Func = Box::new(move |x| ops::sum_all(&at(&x[1], start, &[len])?));
            v.push((format!("sum_all of {len} from element {start}"), big, f, true));
            let f: Func = Box::new(move |x| ops::max(&at(&x[0], start, &[len])?, &[], false));
            v.push((format!("max of {len} from element {start}"), big, f, true));
        }
    }
    for (rows, cols) in [(4000, 256), (20_000, 3), (64, 16_384), (3, 100_003), (2, 2047), (1, 1)] {
        for start in [0, 1] {
            let f: Func = Box::new(move |x| ops::sum(&at(&x[1], start, &[rows, cols])?, &[-1], false));
            v.push((format!("sum over the last dim of ({rows}, {cols}) from element {start}"), false, f, true));
            let f: Func = Box::new(move |x| ops::max(&at(&x[0], start, &[rows, cols])?, &[-1], true));
            v.push((format!("max over the last dim of ({rows}, {cols}) from element {start}"), false, f, true));
        }
    }
    // Down the columns of row-major matrices (the reduced dims before the kept ones: bias gradients): one block
    // of columns and many row slices, widths off the 32-column blocks, a single slice, reduced dims split in
    // two, size-1 dims among them; max also takes its backward's count through the same kernel.
    for (shape, dims) in [
        (vec![8192, 16], vec![0]),
        (vec![8192, 100], vec![0]),
        (vec![3, 5], vec![0]),
        (vec![100_000, 3], vec![0]),
        (vec![64, 4097], vec![0]),
        (vec![16, 64, 1, 24], vec![0, 1]),
        (vec![1, 7, 33, 1], vec![1]),
        (vec![16_000, 64], vec![0]),
        (vec![1000, 1000], vec![0]),
    ] {
        for start in [0, 1] {
            let (s, d) = (shape.clone(), dims.clone());
            let f: Func = Box::new(move |x| ops::sum(&at(&x[1], start, &s)?, &d, false));
            v.push((format!("sum over dims {dims:?} of {shape:?} from element {start}"), false, f, true));
            let (s, d) = (shape.clone(), dims.clone());
            let f: Func = Box::new(move |x| ops::max(&at(&x[0], start, &s)?, &d, true));
            v.push((format!("max over dims {dims:?} of {shape:?} from element {start}"), false, f, true));
        }
    }
    // Linear layers at size (the bias in the cuBLASLt epilogues): MILA-like tokens, odd widths, x and the bias
    // at odd offsets (x 4-byte aligned: an algorithm for that alignment; the bias not 16-byte aligned: the
    // unfused fallback); act_linear's products.
    for (xshape, n) in [(vec![2, 196, 64], 192), (vec![197, 67], 131)] {
        let k = xshape[xshape.len() - 1];
        for (sx, sb) in [(0, 0), (1, 0), (0, 1)] {
            let xs = xshape.clone();
            let f: Func = Box::new(move |x| {
                ops::linear(&at(&x[0], sx, &xs)?, &at(&x[1], 0, &[n, k])?, Some(&at(&x[1], n * k + sb, &[n])?))
            });
            v.push((format!("linear {xshape:?} -> {n}, x from element {sx}, bias from {sb}"), false, f, true));
        }
    }
    let f: Func = Box::new(|x| {
        let h = at(&x[0], 0, &[4, 49, 256])?;
        ops::act_linear(&h, Unary::Gelu, &at(&x[1], 0, &[64, 256])?, Some(&at(&x[1], 64 * 256, &[64])?))
    });
    v.push(("act_linear (196, 256) -> 64".into(), false, f, true));
    // Copies: narrow's backward writes the gradient into a slice of zeros with copy_into (contiguous ranges
    // at odd offsets: one memcpy); a transposed source takes the copy kernel.
    for start in [1, 3] {
        let f: Func = Box::new(move |x| ops::mul_scalar(&at(&x[0], start, &[N - 8])?, 2.0));
        v.push((format!("copy_into of narrow's gradient, from element {start}"), false, f, true));
    }
    let f: Func = Box::new(|x| ops::concat(&[at(&x[0], 1, &[300, 200])?, ops::t(&at(&x[1], 0, &[200, 300])?)?], 0));
    v.push(("concat of a view and a transposed view".into(), false, f, true));
    v
}

/// The vectorised elementwise kernels, the contiguous-rows reductions and the memcpy copies, with their
/// fallbacks, at sizes and offsets the suite's small cases never reach (see `fast_path_checks`); outputs and
/// gradients against the CPU, new device allocations poisoned with NaN.
fn fast_paths_match_cpu(dtype: DType, tol: f64) {
    let _serial = crate::cuda_serial();
    let Some(_dev) = test_device_or_skip("fast_paths_match_cpu") else { return };
    let _poison = poison_new_allocations();
    let mut g = Generator::new(2024);
    let mut inputs = |len: usize| -> (Vec<Tensor>, Vec<Tensor>) {
        let cpu = vec![
            Tensor::rand(&[len + 8], -3.0, 3.0, dtype, Device::Cpu, &mut g).unwrap(),
            Tensor::rand(&[len + 8], 0.2, 2.0, dtype, Device::Cpu, &mut g).unwrap(),
        ];
        let gpu = cpu.iter().map(|t| t.to_device(Device::Cuda(0)).unwrap()).collect();
        (cpu, gpu)
    };
    let (small, big) = (inputs(N), inputs(BIG));
    let mut failures = Vec::new();
    for (name, large, f, grad) in fast_path_checks() {
        let (cpu, gpu) = if large { &big } else { &small };
        match cuda_vs_cpu(cpu, gpu, &f, grad) {
            Ok(worst) => {
                println!("{dtype} {name:<72} worst relative error {worst:.2e}");
                if worst.is_nan() || worst > tol {
                    failures.push(format!("{name}: relative error {worst:.3e} > {tol:e}"));
                }
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    // Accuracy of the f32 full sum (float64 accumulation) against a float64 sum of the same values, relative to
    // sum |x|: the scale of a summation's rounding error, since the signed sum itself cancels.
    let x = &big.1[0];
    let want: Vec<f64> = big.0[0].to_vec_f64().unwrap();
    let got = ops::sum_all(x).unwrap().to_scalar().unwrap();
    let (exact, scale) = (want.iter().sum::<f64>(), want.iter().map(|v| v.abs()).sum::<f64>());
    let error = (got - exact).abs() / scale;
    println!("{dtype} sum_all of {} signed values: error over sum |x| {error:.2e}", want.len());
    let bound = if dtype == DType::F32 { 1e-7 } else { 1e-14 };
    if error.is_nan() || error > bound {
        failures.push(format!("sum_all accuracy: error over sum |x| {error:.3e} > {bound:e}"));
    }
    assert!(failures.is_empty(), "{dtype}: {} checks differ from the CPU:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn fast_paths_match_cpu_f32() {
    fast_paths_match_cpu(DType::F32, 1e-5);
}

#[test]
fn fast_paths_match_cpu_f64() {
    fast_paths_match_cpu(DType::F64, 1e-12);
}
