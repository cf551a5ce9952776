//! CUDA reductions (reduce.cu). Two ways, chosen per launch by the permuted input's layout:
//!
//! - Contiguous rows (the input is contiguous and the reduced dims are its innermost ones, so each output
//!   reduces one contiguous run: a full sum, a sum over the last dims): 16-byte loads, accumulation in double,
//!   one warp per row or blocks per row slice whose partials the last block combines in the same launch
//!   ([`RowsLaunch`]). Every element read once: at about the bandwidth of a copy.
//! - Any other layout: one warp per output element, or per slice of one when a row is long, reading through
//!   `offset_of`, the slices' partial results then reduced by a second launch. Sums of f32 accumulate in f32
//!   along a warp tree, which keeps the error near log2(n) ulps rather than n.
//!
//! Both are deterministic: fixed decompositions and combination orders, no float atomics.

use engine::cuda::{kernel_name, CudaDevice, CudaFunction, CudaSlice, CudaStorage, CudaView, PushKernelArg, Strided};
use engine::{DType, Error, Float, Layout, Result};

use super::{Plan, ReduceKind};
use crate::cuda::{function, launch, launch_1d, Module};

pub(crate) const MODULE: Module = Module { name: "ops_reduce", body: include_str!("reduce.cu") };

/// Elements one warp reduces before a row is split into slices (the strided kernel).
const SLICE: usize = 4096;

/// Threads a block of the contiguous-rows kernels (`ROW_THREADS` in reduce.cu).
const ROW_THREADS: usize = 256;

/// Rows shorter than this are reduced by one warp each.
const BLOCK_ROW_MIN: usize = 2048;

/// The fewest elements a block's slice of a split row gets.
const SPLIT_MIN: usize = 8192;

/// How a contiguous-rows reduction is launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowsLaunch {
    /// `reduce_rows_warp_*`: one warp per row, `blocks` blocks grid-striding over the rows.
    Warp { blocks: usize },
    /// `reduce_rows_block_*`: `splits` blocks per row, one launch of rows x splits blocks; with splits > 1 the
    /// last block to finish combines the partials.
    Block { splits: usize },
}

/// The launch for `rows` contiguous rows of `group` elements, given the blocks of one full wave of the block
/// kernel (`block_wave`) and of the warp kernel (`warp_wave`).
///
/// A row gets one warp when it is short, or when there are enough rows for every warp of a wave of blocks to
/// have its own (then a warp per row keeps the whole device busy with no block-wide combining). Otherwise a
/// row gets whole blocks, and rows too few to fill a wave are split into slices of at least [`SPLIT_MIN`]
/// elements until they do: a full sum of 64M floats runs as one wave of blocks, each combining ~64K elements.
pub(crate) fn rows_launch(rows: usize, group: usize, block_wave: usize, warp_wave: usize) -> RowsLaunch {
    let warps_per_block = ROW_THREADS / 32;
    if group < BLOCK_ROW_MIN || rows >= block_wave * warps_per_block {
        return RowsLaunch::Warp { blocks: rows.div_ceil(warps_per_block).clamp(1, warp_wave.max(1)) };
    }
    let splits = block_wave.div_ceil(rows).clamp(1, group.div_ceil(SPLIT_MIN));
    RowsLaunch::Block { splits }
}

#[derive(Clone, Copy)]
enum Kernel {
    Sum,
    Max,
    CountEq,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::Sum => "reduce_sum",
            Kernel::Max => "reduce_max",
            Kernel::CountEq => "reduce_count_eq",
        }
    }

    /// The op's name in the contiguous-rows kernels, `reduce_rows_{warp,block}_<op>`.
    fn op(self) -> &'static str {
        match self {
            Kernel::Sum => "sum",
            Kernel::Max => "max",
            Kernel::CountEq => "count_eq",
        }
    }
}

/// One launch: `out[task]` for `rows * splits` tasks of `x` viewed through `lx` as (rows, group).
#[allow(clippy::too_many_arguments)]
fn launch_reduce<T: Float>(
    dev: &CudaDevice,
    f: &CudaFunction,
    x: &CudaSlice<T>,
    lx: &Strided,
    reference: &CudaSlice<T>,
    out: &CudaSlice<T>,
    rows: usize,
    group: usize,
    splits: usize,
) -> Result<()> {
    let (rows64, group64, splits64) = (rows as i64, group as i64, splits as i64);
    let mut args = dev.stream().launch_builder(f);
    args.arg(x).arg(lx).arg(reference).arg(out).arg(&rows64).arg(&group64).arg(&splits64);
    // SAFETY: reduce_<op>(const T* x, Strided lx, const T* ref, T* out, long long outputs, long long group,
    // long long splits) reads x at lx-indices below rows * group, ref[0..rows) (count only), and writes
    // out[0..rows * splits), which `out` holds. One warp per task: 32 threads for each of the tasks.
    unsafe { launch("reduce", dev, args, rows * splits * 32) }
}

fn reduce_into<T: Float>(
    dev: &CudaDevice,
    kernel: Kernel,
    x: &CudaSlice<T>,
    lx: &Layout,
    reference: Option<&CudaSlice<T>>,
    rows: usize,
    group: usize,
) -> Result<engine::cuda::PooledSlice<T>> {
    let out = dev.alloc::<T>(rows)?;
    if rows == 0 {
        return Ok(out);
    }
    // The reference is only read by count_eq; pass the output as a placeholder pointer otherwise.
    let reference = reference.unwrap_or(out.as_slice());
    if lx.is_contiguous() {
        reduce_rows(dev, kernel, x, lx, reference, &out, rows, group)?;
        return Ok(out);
    }
    if is_columns(lx, rows) {
        reduce_cols(dev, kernel, x, lx, reference, &out, group, rows)?;
        return Ok(out);
    }
    let f = function::<T>(dev, &MODULE, kernel.name())?;
    let sx = Strided::new(lx)?;
    let splits = if group > 2 * SLICE { group.div_ceil(SLICE) } else { 1 };
    if splits == 1 {
        launch_reduce(dev, &f, x, &sx, reference, out.as_slice(), rows, group, 1)?;
        return Ok(out);
    }
    let partial = dev.alloc::<T>(rows * splits)?;
    launch_reduce(dev, &f, x, &sx, reference, partial.as_slice(), rows, group, splits)?;
    // Partial counts add up; partial sums and maxima combine with their own op.
    let second = match kernel {
        Kernel::CountEq => function::<T>(dev, &MODULE, Kernel::Sum.name())?,
        _ => f,
    };
    let lp = Strided::new(&Layout::contiguous(&[rows, splits]))?;
    launch_reduce(dev, &second, partial.as_slice(), &lp, reference, out.as_slice(), rows, splits, 1)?;
    Ok(out)
}

/// The contiguous-rows kernels: `lx` is contiguous, so its elements are `rows * group` consecutive ones from
/// its offset.
#[allow(clippy::too_many_arguments)]
fn reduce_rows<T: Float>(
    dev: &CudaDevice,
    kernel: Kernel,
    x: &CudaSlice<T>,
    lx: &Layout,
    reference: &CudaSlice<T>,
    out: &CudaSlice<T>,
    rows: usize,
    group: usize,
) -> Result<()> {
    let o = lx.offset();
    let xs: CudaView<T> = x
        .try_slice(o..o + rows * group)
        .ok_or_else(|| Error::invalid("reduce", "internal: view exceeds its storage", lx.shape()))?;
    let block_name = format!("reduce_rows_block_{}", kernel.op());
    let warp_name = format!("reduce_rows_warp_{}", kernel.op());
    let fb = function::<T>(dev, &MODULE, &block_name)?;
    let fw = function::<T>(dev, &MODULE, &warp_name)?;
    let block_wave = dev.wave(MODULE.name, &kernel_name::<T>(&block_name), &fb, ROW_THREADS as u32)?;
    let warp_wave = dev.wave(MODULE.name, &kernel_name::<T>(&warp_name), &fw, ROW_THREADS as u32)?;
    let (rows64, group64) = (rows as i64, group as i64);
    let config = |blocks: usize| engine::cuda::LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ROW_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let cuda_err = |e| Error::Cuda { op: "reduce", msg: format!("{e:?}") };
    match rows_launch(rows, group, block_wave, warp_wave) {
        RowsLaunch::Warp { blocks } => {
            let mut args = dev.stream().launch_builder(&fw);
            args.arg(&xs).arg(reference).arg(out).arg(&rows64).arg(&group64);
            // SAFETY: reduce_rows_warp_<op>(const T* x, const T* ref, T* out, long long rows, long long group)
            // reads x[0..rows * group), which `xs` holds, ref[0..rows) (count_eq only; the max's output, rows
            // elements) and writes out[0..rows), which `out` holds.
            unsafe { args.launch(config(blocks)) }.map_err(cuda_err)?;
        }
        RowsLaunch::Block { splits } => {
            let blocks = rows * splits;
            if blocks > i32::MAX as usize {
                return Err(Error::invalid("reduce", "too many rows for one launch", lx.shape()));
            }
            let part = dev.alloc::<f64>(if splits > 1 { blocks } else { 1 })?;
            let splits64 = splits as i64;
            let mut args = dev.stream().launch_builder(&fb);
            args.arg(&xs).arg(reference).arg(out).arg(part.as_slice()).arg(&rows64).arg(&group64).arg(&splits64);
            // SAFETY: reduce_rows_block_<op>(const T* x, const T* ref, T* out, double* part, long long rows,
            // long long group, long long splits), launched with exactly rows * splits blocks (one per task):
            // reads x[0..rows * group) (`xs`), ref[0..rows) (count_eq only), writes part[0..rows * splits) when
            // splits > 1 (`part` holds that many) and out[0..rows).
            unsafe { args.launch(config(blocks)) }.map_err(cuda_err)?;
        }
    }
    Ok(())
}

/// Whether `lx` (kept dims first, reduced dims last, `kept` elements kept) is a row-major (R, K) matrix read
/// down its columns: the kept dims make one contiguous run of K = `kept` elements (unit inner stride), and the
/// reduced dims step over whole runs in row-major order. Dims of size 1 are skipped.
pub(crate) fn is_columns(lx: &Layout, kept: usize) -> bool {
    let (shape, strides) = (lx.shape(), lx.strides());
    let (mut expected, mut seen, mut split) = (1usize, 1usize, shape.len());
    // The kept dims are a prefix whose sizes multiply to `kept`: the first one at which the product is reached.
    for (d, &n) in shape.iter().enumerate() {
        if seen == kept {
            split = d;
            break;
        }
        seen *= n;
    }
    if seen != kept || kept < 2 {
        return false;
    }
    let row_major = |dims: std::ops::Range<usize>, expected: &mut usize| {
        dims.rev().all(|d| {
            let ok = shape[d] == 1 || strides[d] == *expected;
            *expected *= shape[d];
            ok
        })
    };
    row_major(0..split, &mut expected) && row_major(split..shape.len(), &mut expected)
}

/// The columns kernel (`reduce_cols_*`): `out[k]` reduces the `r` rows of column k of the (r, k) matrix at
/// `lx`'s offset. Blocks of 32 columns; the rows split over more blocks until a wave of them is busy, with at
/// least [`COL_MIN_ROWS`] rows a block; split rows leave a partial a slice and column, which a second launch
/// (`reduce_cols_finish_*`, a warp a column) combines.
#[allow(clippy::too_many_arguments)]
fn reduce_cols<T: Float>(
    dev: &CudaDevice,
    kernel: Kernel,
    x: &CudaSlice<T>,
    lx: &Layout,
    reference: &CudaSlice<T>,
    out: &CudaSlice<T>,
    r: usize,
    k: usize,
) -> Result<()> {
    let o = lx.offset();
    let xs: CudaView<T> = x
        .try_slice(o..o + r * k)
        .ok_or_else(|| Error::invalid("reduce", "internal: view exceeds its storage", lx.shape()))?;
    let name = format!("reduce_cols_{}", kernel.op());
    let f = function::<T>(dev, &MODULE, &name)?;
    let wave = dev.wave(MODULE.name, &kernel_name::<T>(&name), &f, COL_THREADS as u32)?;
    let (blocks_x, splits) = cols_launch(r, k, wave);
    if blocks_x > i32::MAX as usize / 4 || splits > 65535 {
        return Err(Error::invalid("reduce", "too many columns for one launch", lx.shape()));
    }
    let per = r.div_ceil(splits);
    let part = dev.alloc::<f64>(if splits > 1 { splits * k } else { 1 })?;
    let (r64, k64, per64) = (r as i64, k as i64, per as i64);
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&xs).arg(reference).arg(out).arg(part.as_slice()).arg(&r64).arg(&k64).arg(&per64);
    let config = engine::cuda::LaunchConfig {
        grid_dim: (blocks_x as u32, splits as u32, 1),
        block_dim: (COL_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: reduce_cols_<op>(const T* x, const T* ref, T* out, double* part, long long R, long long K,
    // long long per) with a (ceil(K / 32), splits) grid of COL_THREADS threads: reads x[0..R K) (`xs` holds it),
    // ref[0..K) (count_eq only: the max's output, K elements), writes part[0..splits K) when splits > 1 (`part`
    // holds that many), else out[0..K) (`out` holds K = rows elements).
    unsafe { args.launch(config) }.map_err(|e| Error::Cuda { op: "reduce", msg: format!("{e:?}") })?;
    if splits == 1 {
        return Ok(());
    }
    let name = format!("reduce_cols_finish_{}", kernel.op());
    let f = function::<T>(dev, &MODULE, &name)?;
    let splits64 = splits as i64;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(part.as_slice()).arg(out).arg(&k64).arg(&splits64);
    // SAFETY: reduce_cols_finish_<op>(const double* part, T* out, long long K, long long splits), one warp a
    // column over ceil(K / 8) blocks of COL_THREADS (8 warps): reads part[0..splits K), which the launch above
    // wrote, and writes out[0..K).
    unsafe { launch_1d("reduce", args, k.div_ceil(COL_THREADS / 32), COL_THREADS, 0) }
}

/// Threads a block of the columns kernel (`COL_WARPS * 32` in reduce.cu).
const COL_THREADS: usize = 256;

/// The fewest rows a block of the columns kernel reduces when the rows are split.
const COL_MIN_ROWS: usize = 64;

/// The grid of the columns kernel for an (r, k) matrix: `k / 32` blocks across, and the rows split until a
/// wave of blocks (`wave`) is busy, each slice at least [`COL_MIN_ROWS`] rows.
pub(crate) fn cols_launch(r: usize, k: usize, wave: usize) -> (usize, usize) {
    let blocks_x = k.div_ceil(32).max(1);
    let splits = wave.div_ceil(blocks_x).clamp(1, r.div_ceil(COL_MIN_ROWS).max(1));
    (blocks_x, splits)
}

fn rows(plan: &Plan) -> usize {
    plan.out_shape.iter().product()
}

pub(super) fn reduce(x: &CudaStorage, layout: &Layout, plan: &Plan, kind: ReduceKind) -> Result<CudaStorage> {
    fn run<T: Float>(x: &CudaStorage, layout: &Layout, plan: &Plan, kind: ReduceKind) -> Result<CudaStorage> {
        let dev = x.device();
        if plan.group == 0 {
            // A sum over nothing is 0 (max over nothing was refused before).
            let mut s = CudaStorage::alloc(dev, rows(plan), T::DTYPE)?;
            s.fill(0.0)?;
            return Ok(s);
        }
        let kernel = match kind {
            ReduceKind::Sum => Kernel::Sum,
            ReduceKind::Max => Kernel::Max,
        };
        let lx = layout.permute(&plan.perm)?;
        let out = reduce_into::<T>(dev, kernel, x.slice::<T>()?, &lx, None, rows(plan), plan.group)?;
        CudaStorage::from_slice(dev, out)
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x, layout, plan, kind),
        DType::F64 => run::<f64>(x, layout, plan, kind),
    }
}

/// dL/dx of max: g[row] / ties to each element equal to the row's max.
pub(super) fn max_backward(
    x: &CudaStorage,
    layout: &Layout,
    y: &CudaStorage,
    g: &CudaStorage,
    plan: &Plan,
) -> Result<CudaStorage> {
    fn run<T: Float>(
        x: &CudaStorage,
        layout: &Layout,
        y: &CudaStorage,
        g: &CudaStorage,
        plan: &Plan,
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let n = layout.numel();
        let lx = layout.permute(&plan.perm)?;
        let count = reduce_into::<T>(
            dev,
            Kernel::CountEq,
            x.slice::<T>()?,
            &lx,
            Some(y.slice::<T>()?),
            rows(plan),
            plan.group,
        )?;
        let dx = dev.alloc::<T>(n)?;
        if n > 0 {
            let f = function::<T>(dev, &MODULE, "max_bwd")?;
            let sx = Strided::new(&lx)?;
            let dest = Strided::new(&Layout::contiguous(layout.shape()).permute(&plan.perm)?)?;
            let (n64, group64) = (n as i64, plan.group as i64);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(x.slice::<T>()?).arg(&sx).arg(y.slice::<T>()?).arg(g.slice::<T>()?).arg(count.as_slice());
            args.arg(dx.as_slice()).arg(&dest).arg(&n64).arg(&group64);
            // SAFETY: max_bwd(x, lx, y, g, count, dx, ldest, n, group): y, g, count hold n / group rows; dest
            // is a permutation of a contiguous layout of n elements, so every write lands in `dx`.
            unsafe { launch("max_backward", dev, args, n)? };
        }
        CudaStorage::from_slice(dev, dx)
    }
    crate::util::same_cuda_dtypes("max_backward", &[x, y, g])?;
    match x.dtype() {
        DType::F32 => run::<f32>(x, layout, y, g, plan),
        DType::F64 => run::<f64>(x, layout, y, g, plan),
    }
}
