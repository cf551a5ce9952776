//! CUDA paths of the normalisation family (norm.cu). Inputs arrive contiguous (the ops save them so); the
//! optional weight, bias and running statistics are read through their views. Nothing here waits for the
//! device.
//!
//! - layer_norm forward: one kernel; it saves mean and rstd per row. Rows of whole 16-byte vectors (f32: d a
//!   multiple of 4, up to 1024) are held in registers, a group of up to 32 lanes per row and several rows per
//!   thread ([`LnReg`]); other rows take one warp each.
//! - layer_norm backward: one kernel for dx and the dweight/dbias partial sums (each block owns a range of
//!   rows; see `ln_bwd_reg_impl` and `ln_bwd_impl`), then a small kernel that adds the blocks' partials column
//!   by column, 32 ways parallel over the blocks.
//! - batch_norm2d forward in training and backward: each channel's N H W elements are cut into slices until
//!   about a wave of blocks is busy ([`BnPlan`]). One slice a channel (many channels): one fused kernel, a
//!   block per channel (statistics or sums, then y or dx). Several: two kernels, one writing each slice's
//!   partial sums (double), the other combining its channel's partials in a fixed order, then y or dx over
//!   its slice. Eval forward: one block per (sample, channel) plane with the running statistics.
//! - the running statistics: an in-place blend kernel, launched by the op after the forward has released its
//!   read locks (a running buffer may share storage with an input or with the other buffer).

use engine::cuda::{kernel_name, CudaDevice, CudaFunction, CudaStorage, LaunchArgs, LaunchConfig, PushKernelArg};
use engine::{DType, Error, Float, Layout, Result, Storage};

use super::cpu::BatchNormOut;
use super::Stats;
use crate::cuda::{elements, function, launch, launch_1d, optional, Module, View};
use crate::util::{Grads, Needs};

pub(crate) const MODULE: Module = Module { name: "ops_norm", body: include_str!("norm.cu") };

/// Threads of the layer_norm backward's blocks: 8 warps, so a tile is 8 rows.
const LN_THREADS: u32 = 256;

/// Threads of batch_norm's training forward and backward blocks.
const BN_THREADS: u32 = 256;

/// Fewest elements a slice of a split channel gets: one batch of loads for each thread of a block (`BN_UNROLL`
/// = 4 in norm.cu), so that a slice is read in one round of loads per pass.
const BN_SLICE_MIN: usize = BN_THREADS as usize * 4;

/// How batch_norm2d's training forward and backward cut a channel's M = N H W elements: `splits` slices of
/// `per` consecutive elements (the last one shorter), one block each, `c * splits` blocks in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BnPlan {
    splits: usize,
    per: usize,
}

impl BnPlan {
    /// The plan for `c` channels of `m` elements on a device running `wave` blocks at once: channels are split
    /// until about a wave of blocks is busy (`wave / c` slices a channel, rounded up), but no slice gets fewer
    /// than [`BN_SLICE_MIN`] elements; with as many channels as a wave, or small ones, one slice a channel
    /// (the fused kernels). No slice is empty: `per` is rounded up, then `splits` is the slices it takes.
    fn new(c: usize, m: usize, wave: usize) -> BnPlan {
        let splits = wave.div_ceil(c.max(1)).clamp(1, (m / BN_SLICE_MIN).max(1));
        let per = m.div_ceil(splits).max(1);
        BnPlan { splits: m.div_ceil(per).max(1), per }
    }

    /// Blocks of a launch: one per (channel, slice).
    fn tasks(&self, c: usize) -> usize {
        c * self.splits
    }
}

/// Shared memory a kernel may take without the opt-in attribute (the same on every GPU since Volta).
const SHARED_DEFAULT: usize = 48 << 10;

/// Rows of layer_norm's register kernels: how a row of d elements spreads over a group of lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LnReg {
    /// Lanes per row (G in norm.cu): a power of two, at most 32.
    lanes: usize,
    /// 16-byte vectors a lane holds per row (the instance: 1, 2, 4 or 8).
    nv: usize,
    /// Rows a thread takes per step (RPT, fixed by the instance).
    rpt: usize,
}

impl LnReg {
    /// The layout for rows of `d` elements of `elem` bytes whose first element is `offset` elements into a
    /// 256-byte aligned buffer, or None (the one-warp-per-row kernels) unless the rows are whole 16-byte
    /// vectors starting at 16-byte boundaries, at most 256 of them (f32: d <= 1024).
    fn new(d: usize, elem: usize, offset: usize) -> Option<LnReg> {
        let vn = 16 / elem;
        let nvec = d / vn;
        if !d.is_multiple_of(vn) || !offset.is_multiple_of(vn) || nvec == 0 || nvec > 256 {
            return None;
        }
        let lanes = nvec.next_power_of_two().min(32);
        let nv = nvec.div_ceil(lanes).next_power_of_two();
        Some(LnReg { lanes, nv, rpt: (4 / nv).max(1) })
    }

    fn name(&self, backward: bool) -> String {
        format!("ln_{}_reg{}", if backward { "bwd" } else { "fwd" }, self.nv)
    }

    /// Rows a block of [`LN_THREADS`] takes per step.
    fn rows_per_step(&self) -> usize {
        LN_THREADS as usize / self.lanes * self.rpt
    }

    /// (chunk, blocks) of the backward, for a device that holds `resident` blocks at once: blocks own chunks
    /// of whole steps, as many blocks as run at once (one wave, balanced), unless a thread would then add more
    /// than [`LN_ROWS_PER_THREAD`] rows into its dweight/dbias registers (T): then whole waves more.
    fn backward_chunks(&self, rows: usize, resident: usize) -> (usize, usize) {
        let step = self.rows_per_step();
        let max_chunk = step * (LN_ROWS_PER_THREAD / self.rpt);
        let resident = resident.max(1);
        let waves = rows.div_ceil(resident * max_chunk).max(1);
        let chunk = rows.div_ceil(resident * waves).next_multiple_of(step);
        (chunk, rows.div_ceil(chunk).max(1))
    }
}

/// Blocks of `f` (of [`LN_THREADS`] threads and `shared` bytes) the device runs at once.
fn resident_blocks(dev: &CudaDevice, f: &CudaFunction, shared: usize) -> Result<usize> {
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(LN_THREADS, shared, None)
        .map_err(|e| Error::Cuda { op: "layer_norm", msg: format!("occupancy: {e:?}") })?;
    Ok(per_sm.max(1) as usize * dev.multiprocessor_count() as usize)
}

/// Most rows one thread of the register backward sums in T before the sums go to double.
const LN_ROWS_PER_THREAD: usize = 32;

/// Launches `args` on `blocks` blocks of `threads` threads with `shared` bytes of dynamic shared memory.
///
/// # Safety
/// As [`crate::cuda::launch`]: the arguments must match the kernel's parameters, and its indices stay inside
/// the buffers.
unsafe fn launch_blocks(
    op: &'static str,
    args: LaunchArgs<'_>,
    blocks: usize,
    threads: u32,
    shared: usize,
) -> Result<()> {
    // The kernels loop over the blocks past a capped grid.
    // SAFETY: forwarded to the caller.
    unsafe { launch_1d(op, args, blocks.clamp(1, 1 << 16), threads as usize, shared) }
}

/// Runs `$f::<f32>` or `$f::<f64>` by the dtype.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
        }
    };
}

/// Errs unless the CUDA storages of `xs` (the given ones) share one dtype and device.
fn same_dtypes(op: &'static str, xs: &[Option<&CudaStorage>]) -> Result<()> {
    let all: Vec<&CudaStorage> = xs.iter().flatten().copied().collect();
    crate::util::same_cuda_dtypes(op, &all)
}

fn cuda_storage(dev: &std::sync::Arc<CudaDevice>, s: engine::cuda::PooledSlice<impl Float>) -> Result<Storage> {
    Ok(Storage::Cuda(CudaStorage::from_slice(dev, s)?))
}

// ---- layer_norm ----------------------------------------------------------------------------------------

/// Forward: (y, mean, rstd) with one mean and rstd per row of the last dim.
pub(super) fn layer_norm(x: View, w: Option<View>, b: Option<View>, eps: f64) -> Result<(Storage, Storage, Storage)> {
    fn run<T: Float>(x: View, w: Option<View>, b: Option<View>, eps: f64) -> Result<(Storage, Storage, Storage)> {
        const OP: &str = "layer_norm";
        let dev = x.0.device();
        let d = x.1.shape().last().copied().unwrap_or(1).max(1);
        let rows = x.1.numel() / d;
        let (y, mean, rstd) = (dev.alloc::<T>(rows * d)?, dev.alloc::<T>(rows)?, dev.alloc::<T>(rows)?);
        if rows > 0 {
            let xv = elements::<T>(OP, x)?;
            let (wv, lw, has_w) = optional(OP, w, &xv)?;
            let (bv, lb, has_b) = optional(OP, b, &xv)?;
            let rows64 = rows as i64;
            if let Some(plan) = LnReg::new(d, T::DTYPE.size_in_bytes(), x.1.offset()) {
                let f = function::<T>(dev, &MODULE, &plan.name(false))?;
                let (d32, lanes) = (d as i32, plan.lanes as i32);
                let mut args = dev.stream().launch_builder(&f);
                args.arg(&xv).arg(&wv).arg(&lw).arg(&has_w).arg(&bv).arg(&lb).arg(&has_b);
                args.arg(y.as_slice()).arg(mean.as_slice()).arg(rstd.as_slice()).arg(&rows64).arg(&d32).arg(&lanes);
                args.arg(&eps);
                // As many blocks as run at once (each warp strides over the rows), or fewer for few rows.
                let blocks = rows.div_ceil(plan.rows_per_step()).min(resident_blocks(dev, &f, 0)?);
                // SAFETY: ln_fwd_reg<NV>_<T>(const T* x, const T* w, Strided lw, int has_w, const T* b,
                // Strided lb, int has_b, T* y, T* mean, T* rstd, long long rows, int d, int G, double eps) reads
                // x[0..rows d), the contiguous view's length, with 16-byte loads (the view starts at a multiple
                // of 16 bytes into its buffer, checked by `LnReg::new`, and buffers start at 256-byte
                // boundaries), w and b through their views below d (checked by `strided`, read only when
                // flagged), and writes y[0..rows d), mean[0..rows) and rstd[0..rows), which the buffers hold
                // (y is a fresh, aligned buffer). Rows are grid-strided over the warps.
                unsafe { launch_blocks(OP, args, blocks, LN_THREADS, 0)? };
                return Ok((cuda_storage(dev, y)?, cuda_storage(dev, mean)?, cuda_storage(dev, rstd)?));
            }
            let f = function::<T>(dev, &MODULE, "ln_fwd")?;
            let d64 = d as i64;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv).arg(&wv).arg(&lw).arg(&has_w).arg(&bv).arg(&lb).arg(&has_b);
            args.arg(y.as_slice()).arg(mean.as_slice()).arg(rstd.as_slice()).arg(&rows64).arg(&d64).arg(&eps);
            // SAFETY: ln_fwd_<T>(const T* x, const T* w, Strided lw, int has_w, const T* b, Strided lb,
            // int has_b, T* y, T* mean, T* rstd, long long rows, long long d, double eps) reads x[0..rows d),
            // the contiguous view's length, w and b through their views at indices below d (checked against
            // their buffers by `strided`; vectors of d elements, checked by the op; read only when flagged),
            // and writes y[0..rows d), mean[0..rows) and rstd[0..rows), which the buffers hold. One warp per
            // row: 32 threads for each row.
            unsafe { launch(OP, dev, args, rows * 32)? };
        }
        Ok((cuda_storage(dev, y)?, cuda_storage(dev, mean)?, cuda_storage(dev, rstd)?))
    }
    same_dtypes("layer_norm", &[Some(x.0), w.map(|v| v.0), b.map(|v| v.0)])?;
    by_dtype!(x.0.dtype(), run(x, w, b, eps))
}

/// The layer_norm gradients; with `pend` (a contiguous view of x's shape: a gradient already pending for x),
/// dx = pend + the layer norm's own, added as the kernel stores it (see `ln_add_rn`).
pub(super) fn layer_norm_backward(
    x: View,
    w: Option<View>,
    mean: View,
    rstd: View,
    g: View,
    pend: Option<View>,
    needs: Needs,
) -> Result<Grads<Storage>> {
    fn run<T: Float>(
        x: View,
        w: Option<View>,
        mean: View,
        rstd: View,
        g: View,
        pend: Option<View>,
        needs: Needs,
    ) -> Result<Grads<Storage>> {
        const OP: &str = "layer_norm_backward";
        let dev = x.0.device();
        let d = x.1.shape().last().copied().unwrap_or(1).max(1);
        let rows = x.1.numel() / d;
        let need_sums = needs.w || needs.bias;
        let dx = dev.alloc::<T>(if needs.x { rows * d } else { 0 })?;
        let (dw, db) = (dev.alloc::<T>(d)?, dev.alloc::<T>(d)?);
        if rows == 0 {
            // No rows: dx is empty and the sums are empty sums.
            let zeros = || {
                let mut z = CudaStorage::alloc(dev, d, T::DTYPE)?;
                z.fill(0.0)?;
                Ok::<_, Error>(Storage::Cuda(z))
            };
            let dx = needs.x.then(|| cuda_storage(dev, dx)).transpose()?;
            return Ok(Grads { x: dx, w: needs.w.then(zeros).transpose()?, bias: needs.bias.then(zeros).transpose()? });
        }
        let (xv, gv) = (elements::<T>(OP, x)?, elements::<T>(OP, g)?);
        let (mv, rv) = (elements::<T>(OP, mean)?, elements::<T>(OP, rstd)?);
        let (wv, lw, has_w) = optional(OP, w, &xv)?;
        let elem = T::DTYPE.size_in_bytes();
        let pv = pend.map(|p| elements::<T>(OP, p)).transpose()?;
        let pend_aligned = pend.is_none_or(|p| (p.1.offset() * elem).is_multiple_of(16));
        let reg =
            LnReg::new(d, elem, x.1.offset()).filter(|_| (g.1.offset() * elem).is_multiple_of(16) && pend_aligned);
        // Without a pending gradient g's buffer stands in for its pointer (never read then).
        let has_pend = i32::from(pv.is_some() && needs.x);
        let pend_arg = pv.as_ref().map_or(gv.slice(..), |p| p.slice(..));
        let sms = dev.multiprocessor_count() as usize;
        // The old kernel's two accumulators (g xhat, g) per column, in shared memory when they fit, else in
        // `partial` itself; the register kernel's 2 d doubles of shared memory for adding its warps in order.
        let shared = 2 * d * std::mem::size_of::<f64>();
        let use_shared = shared <= SHARED_DEFAULT;
        let reg_f = reg.map(|plan| function::<T>(dev, &MODULE, &plan.name(true))).transpose()?;
        let (chunk, blocks) = match (reg, &reg_f) {
            (Some(plan), Some(f)) => plan.backward_chunks(rows, resident_blocks(dev, f, shared)?),
            _ => {
                // Blocks: up to 4 a multiprocessor, each owning `chunk` consecutive rows (at least one tile of
                // 8).
                let warps = (LN_THREADS / 32) as usize;
                let chunk = rows.div_ceil(rows.div_ceil(warps).clamp(1, sms * 4));
                (chunk, rows.div_ceil(chunk))
            }
        };
        let partial = dev.alloc::<f64>(if need_sums { blocks * 2 * d } else { 1 })?;
        let [rows64, d64, chunk64] = [rows as i64, d as i64, chunk as i64];
        // Without a dx to write, g's buffer stands in for the pointer (the kernel never writes it then).
        let dx_arg = if needs.x { dx.as_slice().as_view() } else { gv.slice(..) };
        if let (Some(plan), Some(f)) = (reg, reg_f) {
            let (d32, lanes) = (d as i32, plan.lanes as i32);
            let flags = [i32::from(needs.x), i32::from(need_sums)];
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv).arg(&wv).arg(&lw).arg(&has_w).arg(&mv).arg(&rv).arg(&gv).arg(&dx_arg);
            args.arg(&pend_arg).arg(&has_pend);
            args.arg(partial.as_slice()).arg(&rows64).arg(&d32).arg(&lanes).arg(&chunk64).arg(&flags[0]).arg(&flags[1]);
            // SAFETY: ln_bwd_reg<NV>_<T>(const T* x, const T* w, Strided lw, int has_w, const T* mean,
            // const T* rstd, const T* g, T* dx, const T* pend, int has_pend, double* partial, long long rows,
            // int d, int G, long long chunk, int need_dx, int need_sums) reads x and g (and pend when has_pend)
            // at [0..rows d) with 16-byte loads (the views start at multiples of 16 bytes, checked above, in
            // 256-byte aligned buffers; pend is a contiguous view of x's shape, its elements `pv`), mean and rstd at [0..rows)
            // (the views' lengths), w through lw below d (checked by `strided`, read only when has_w); it
            // writes dx[0..rows d) only when need_dx (a fresh buffer of rows d elements then) and
            // partial[0..blocks 2 d) only when need_sums (then `partial` holds that many); blocks * chunk >=
            // rows, and block b touches rows of its own chunk. The dynamic shared memory is 2 d doubles
            // (d <= 1024: at most 16 KiB), as the kernel indexes it.
            unsafe { launch_blocks(OP, args, blocks, LN_THREADS, if need_sums { shared } else { 0 })? };
        } else {
            let f = function::<T>(dev, &MODULE, "ln_bwd")?;
            let flags = [i32::from(needs.x), i32::from(need_sums), i32::from(use_shared)];
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv).arg(&wv).arg(&lw).arg(&has_w).arg(&mv).arg(&rv).arg(&gv).arg(&dx_arg);
            args.arg(&pend_arg).arg(&has_pend).arg(partial.as_slice());
            args.arg(&rows64).arg(&d64).arg(&chunk64).arg(&flags[0]).arg(&flags[1]).arg(&flags[2]);
            // SAFETY: ln_bwd_<T>(const T* x, const T* w, Strided lw, int has_w, const T* mean, const T* rstd,
            // const T* g, T* dx, const T* pend, int has_pend, double* partial, long long rows, long long d,
            // long long chunk, int need_dx, int need_sums, int use_shared) reads x and g (and pend when
            // has_pend: a contiguous view of x's shape, its elements `pv`) at [0..rows d), mean and rstd at [0..rows) (the
            // views' lengths), w through lw below d (checked by `strided`, read only when has_w); it writes
            // dx[0..rows d) only when need_dx (then `dx` holds rows d elements) and partial[0..blocks 2 d) only
            // when need_sums (then `partial` holds that many); blocks * chunk >= rows, and block b touches rows
            // of its own chunk. The dynamic shared memory is 2 d doubles when use_shared, as the kernel
            // indexes it.
            unsafe { launch_blocks(OP, args, blocks, LN_THREADS, if use_shared { shared } else { 0 })? };
        }
        if need_sums {
            let f = function::<T>(dev, &MODULE, "ln_bwd_reduce")?;
            let (blocks64, need_w, need_b) = (blocks as i64, i32::from(needs.w), i32::from(needs.bias));
            let mut args = dev.stream().launch_builder(&f);
            args.arg(partial.as_slice()).arg(dw.as_slice()).arg(db.as_slice()).arg(&d64).arg(&blocks64);
            args.arg(&need_w).arg(&need_b);
            let cfg = LaunchConfig {
                grid_dim: ((2 * d).div_ceil(32).clamp(1, 1 << 16) as u32, 1, 1),
                block_dim: (32, 32, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: ln_bwd_reduce_<T>(const double* partial, T* dw, T* db, long long d, long long blocks,
            // int need_w, int need_b) reads partial[0..blocks 2 d), which the launch above filled, and writes
            // dw[0..d) and db[0..d), which both buffers hold; blocks of 32 x 32 threads, as the kernel's
            // indexing of its shared tile assumes, looping over the column tiles past the grid.
            unsafe { args.launch(cfg) }.map_err(|e| Error::Cuda { op: OP, msg: format!("{e:?}") })?;
        }
        Ok(Grads {
            x: needs.x.then(|| cuda_storage(dev, dx)).transpose()?,
            w: needs.w.then(|| cuda_storage(dev, dw)).transpose()?,
            bias: needs.bias.then(|| cuda_storage(dev, db)).transpose()?,
        })
    }
    same_dtypes(
        "layer_norm_backward",
        &[Some(x.0), w.map(|v| v.0), Some(mean.0), Some(rstd.0), Some(g.0), pend.map(|v| v.0)],
    )?;
    by_dtype!(x.0.dtype(), run(x, w, mean, rstd, g, pend, needs))
}

// ---- batch_norm2d --------------------------------------------------------------------------------------

/// (N, C, H W) of an NCHW layout.
fn nchw(layout: &Layout) -> (usize, usize, usize) {
    match layout.shape() {
        &[n, c, h, w] => (n, c, h * w),
        _ => (0, 0, 0),
    }
}

/// Forward with the batch statistics, or with `fixed` (running mean, running var) when given.
pub(super) fn batch_norm(
    x: View,
    w: Option<View>,
    b: Option<View>,
    fixed: Option<(View, View)>,
    eps: f64,
) -> Result<BatchNormOut> {
    fn run<T: Float>(
        x: View,
        w: Option<View>,
        b: Option<View>,
        fixed: Option<(View, View)>,
        eps: f64,
    ) -> Result<BatchNormOut> {
        const OP: &str = "batch_norm2d";
        let dev = x.0.device();
        let (n, c, hw) = nchw(x.1);
        let y = dev.alloc::<T>(n * c * hw)?;
        let (mean, var, rstd) = (dev.alloc::<T>(c)?, dev.alloc::<T>(c)?, dev.alloc::<T>(c)?);
        if c > 0 {
            let xv = elements::<T>(OP, x)?;
            let (wv, lw, has_w) = optional(OP, w, &xv)?;
            let (bv, lb, has_b) = optional(OP, b, &xv)?;
            let [n64, c64, hw64] = [n as i64, c as i64, hw as i64];
            match fixed {
                None => {
                    let stats_f = function::<T>(dev, &MODULE, "bn_fwd_stats")?;
                    let wave = dev.wave(MODULE.name, &kernel_name::<T>("bn_fwd_stats"), &stats_f, BN_THREADS)?;
                    let plan = BnPlan::new(c, n * hw, wave);
                    if plan.splits == 1 {
                        let f = function::<T>(dev, &MODULE, "bn_fwd_train")?;
                        let mut args = dev.stream().launch_builder(&f);
                        args.arg(&xv).arg(&wv).arg(&lw).arg(&has_w).arg(&bv).arg(&lb).arg(&has_b).arg(y.as_slice());
                        args.arg(mean.as_slice()).arg(var.as_slice()).arg(rstd.as_slice());
                        args.arg(&n64).arg(&c64).arg(&hw64).arg(&eps);
                        // SAFETY: bn_fwd_train_<T>(const T* x, const T* w, Strided lw, int has_w, const T* b,
                        // Strided lb, int has_b, T* y, T* mean, T* var, T* rstd, long long n, long long c,
                        // long long hw, double eps) reads x[0..n c hw), the contiguous view's length, w and b
                        // through their views below c (checked by `strided`, read only when flagged), and
                        // writes y[0..n c hw) and mean, var, rstd [0..c), which the buffers hold. Blocks
                        // stride over the channels; no shared memory beyond the kernel's static arrays.
                        unsafe { launch_blocks(OP, args, c, BN_THREADS, 0)? };
                    } else {
                        let tasks = plan.tasks(c);
                        let part = dev.alloc::<f64>(2 * tasks)?;
                        let [splits64, per64] = [plan.splits as i64, plan.per as i64];
                        let mut args = dev.stream().launch_builder(&stats_f);
                        args.arg(&xv).arg(part.as_slice()).arg(&n64).arg(&c64).arg(&hw64).arg(&splits64).arg(&per64);
                        // SAFETY: bn_fwd_stats_<T>(const T* x, double* part, long long n, long long c,
                        // long long hw, long long splits, long long per) reads x[0..n c hw), the contiguous
                        // view's length (slice k of a channel covers elements [k per, min(n hw, (k + 1) per))),
                        // and writes part[0..2 c splits), which `part` holds. Blocks stride over the c splits
                        // tasks.
                        unsafe { launch_blocks(OP, args, tasks, BN_THREADS, 0)? };
                        let f = function::<T>(dev, &MODULE, "bn_fwd_apply")?;
                        let mut args = dev.stream().launch_builder(&f);
                        args.arg(&xv).arg(&wv).arg(&lw).arg(&has_w).arg(&bv).arg(&lb).arg(&has_b).arg(part.as_slice());
                        args.arg(y.as_slice()).arg(mean.as_slice()).arg(var.as_slice()).arg(rstd.as_slice());
                        args.arg(&n64).arg(&c64).arg(&hw64).arg(&splits64).arg(&per64).arg(&eps);
                        // SAFETY: bn_fwd_apply_<T>(const T* x, const T* w, Strided lw, int has_w, const T* b,
                        // Strided lb, int has_b, const double* part, T* y, T* mean, T* var, T* rstd, long long n,
                        // long long c, long long hw, long long splits, long long per, double eps) reads
                        // x[0..n c hw) (the view's length), w and b through their views below c (checked by
                        // `strided`, read only when flagged), part[0..2 c splits), which the launch before
                        // filled on the same stream, and writes y[0..n c hw) and mean, var, rstd [0..c), which
                        // the buffers hold. Blocks stride over the c splits tasks.
                        unsafe { launch_blocks(OP, args, tasks, BN_THREADS, 0)? };
                    }
                }
                Some((rm, rv)) => {
                    let (rmv, lrm) = (rm.0.slice::<T>()?, rm.0.strided(OP, rm.1)?);
                    let (rvv, lrv) = (rv.0.slice::<T>()?, rv.0.strided(OP, rv.1)?);
                    // One block per plane, no wider than a plane (7x7 planes would leave most of 256 idle).
                    let threads = hw.next_multiple_of(32).clamp(32, 256) as u32;
                    let f = function::<T>(dev, &MODULE, "bn_fwd_eval")?;
                    let mut args = dev.stream().launch_builder(&f);
                    args.arg(&xv).arg(&wv).arg(&lw).arg(&has_w).arg(&bv).arg(&lb).arg(&has_b);
                    args.arg(rmv).arg(&lrm).arg(rvv).arg(&lrv).arg(y.as_slice());
                    args.arg(mean.as_slice()).arg(var.as_slice()).arg(rstd.as_slice());
                    args.arg(&n64).arg(&c64).arg(&hw64).arg(&eps);
                    // SAFETY: bn_fwd_eval_<T>(x, w, lw, has_w, b, lb, has_b, const T* rm, Strided lrm,
                    // const T* rv, Strided lrv, T* y, T* mean, T* var, T* rstd, n, c, hw, eps) reads
                    // x[0..n c hw), the view's length, the per-channel operands through their views below c
                    // (checked by `strided`; vectors of c elements, checked by the op), and writes
                    // y[0..n c hw) and mean, var, rstd [0..c), which the buffers hold.
                    unsafe { launch_blocks(OP, args, n * c, threads, 0)? };
                }
            }
        }
        Ok(BatchNormOut {
            y: cuda_storage(dev, y)?,
            mean: cuda_storage(dev, mean)?,
            var: cuda_storage(dev, var)?,
            rstd: cuda_storage(dev, rstd)?,
        })
    }
    let (rm, rv) = (fixed.map(|f| f.0 .0), fixed.map(|f| f.1 .0));
    same_dtypes("batch_norm2d", &[Some(x.0), w.map(|v| v.0), b.map(|v| v.0), rm, rv])?;
    by_dtype!(x.0.dtype(), run(x, w, b, fixed, eps))
}

pub(super) fn batch_norm_backward(
    x: View,
    w: Option<View>,
    mean: View,
    rstd: View,
    g: View,
    stats: Stats,
    needs: Needs,
) -> Result<Grads<Storage>> {
    fn run<T: Float>(
        x: View,
        w: Option<View>,
        mean: View,
        rstd: View,
        g: View,
        stats: Stats,
        needs: Needs,
    ) -> Result<Grads<Storage>> {
        const OP: &str = "batch_norm2d_backward";
        let dev = x.0.device();
        let (n, c, hw) = nchw(x.1);
        let dx = dev.alloc::<T>(if needs.x { n * c * hw } else { 0 })?;
        let (dw, db) = (dev.alloc::<T>(c)?, dev.alloc::<T>(c)?);
        if c > 0 {
            let (xv, gv) = (elements::<T>(OP, x)?, elements::<T>(OP, g)?);
            let (mv, rv) = (elements::<T>(OP, mean)?, elements::<T>(OP, rstd)?);
            let (wv, lw, has_w) = optional(OP, w, &xv)?;
            let [n64, c64, hw64] = [n as i64, c as i64, hw as i64];
            let flags =
                [i32::from(stats == Stats::Batch), i32::from(needs.x), i32::from(needs.w), i32::from(needs.bias)];
            // Without a dx to write, g's buffer stands in for the pointer (the kernel never writes it then).
            let dx_arg = if needs.x { dx.as_slice().as_view() } else { gv.slice(..) };
            let sums_f = function::<T>(dev, &MODULE, "bn_bwd_sums")?;
            let wave = dev.wave(MODULE.name, &kernel_name::<T>("bn_bwd_sums"), &sums_f, BN_THREADS)?;
            let plan = BnPlan::new(c, n * hw, wave);
            if plan.splits == 1 {
                let f = function::<T>(dev, &MODULE, "bn_bwd")?;
                let mut args = dev.stream().launch_builder(&f);
                args.arg(&xv).arg(&wv).arg(&lw).arg(&has_w).arg(&mv).arg(&rv).arg(&gv).arg(&dx_arg);
                args.arg(dw.as_slice()).arg(db.as_slice()).arg(&n64).arg(&c64).arg(&hw64);
                args.arg(&flags[0]).arg(&flags[1]).arg(&flags[2]).arg(&flags[3]);
                // SAFETY: bn_bwd_<T>(const T* x, const T* w, Strided lw, int has_w, const T* mean,
                // const T* rstd, const T* g, T* dx, T* dw, T* db, long long n, long long c, long long hw,
                // int batch_stats, int need_dx, int need_w, int need_b) reads x and g at [0..n c hw) and mean,
                // rstd at [0..c) (the views' lengths), w through lw below c (checked by `strided`, read only
                // when has_w), writes dx[0..n c hw) only when need_dx (then `dx` holds that many) and dw, db
                // [0..c), which both hold. Blocks stride over the channels.
                unsafe { launch_blocks(OP, args, c, BN_THREADS, 0)? };
            } else {
                let tasks = plan.tasks(c);
                let need_sums = needs.w || needs.bias || (needs.x && stats == Stats::Batch);
                let part = dev.alloc::<f64>(if need_sums { 2 * tasks } else { 1 })?;
                let [splits64, per64] = [plan.splits as i64, plan.per as i64];
                if need_sums {
                    let mut args = dev.stream().launch_builder(&sums_f);
                    args.arg(&xv).arg(&mv).arg(&rv).arg(&gv).arg(part.as_slice());
                    args.arg(&n64).arg(&c64).arg(&hw64).arg(&splits64).arg(&per64);
                    // SAFETY: bn_bwd_sums_<T>(const T* x, const T* mean, const T* rstd, const T* g,
                    // double* part, long long n, long long c, long long hw, long long splits, long long per)
                    // reads x and g at [0..n c hw) and mean, rstd at [0..c) (the views' lengths; slice k of a
                    // channel covers elements [k per, min(n hw, (k + 1) per))), and writes part[0..2 c splits),
                    // which `part` holds then. Blocks stride over the c splits tasks.
                    unsafe { launch_blocks(OP, args, tasks, BN_THREADS, 0)? };
                }
                let f = function::<T>(dev, &MODULE, "bn_bwd_dx")?;
                let need_sums32 = i32::from(need_sums);
                let mut args = dev.stream().launch_builder(&f);
                args.arg(&xv).arg(&wv).arg(&lw).arg(&has_w).arg(&mv).arg(&rv).arg(&gv).arg(part.as_slice());
                args.arg(&dx_arg).arg(dw.as_slice()).arg(db.as_slice()).arg(&n64).arg(&c64).arg(&hw64);
                args.arg(&splits64).arg(&per64).arg(&flags[0]).arg(&flags[1]).arg(&flags[2]).arg(&flags[3]);
                args.arg(&need_sums32);
                // SAFETY: bn_bwd_dx_<T>(const T* x, const T* w, Strided lw, int has_w, const T* mean,
                // const T* rstd, const T* g, const double* part, T* dx, T* dw, T* db, long long n, long long c,
                // long long hw, long long splits, long long per, int batch_stats, int need_dx, int need_w,
                // int need_b, int need_sums) reads x and g at [0..n c hw) and mean, rstd at [0..c) (the views'
                // lengths), w through lw below c (checked by `strided`, read only when has_w), part[0..2 c
                // splits) only when need_sums (filled by the launch before, on the same stream); it writes
                // dx[0..n c hw) only when need_dx (then `dx` holds that many) and dw, db [0..c), which both
                // hold. Blocks stride over the c splits tasks.
                unsafe { launch_blocks(OP, args, tasks, BN_THREADS, 0)? };
            }
        }
        Ok(Grads {
            x: needs.x.then(|| cuda_storage(dev, dx)).transpose()?,
            w: needs.w.then(|| cuda_storage(dev, dw)).transpose()?,
            bias: needs.bias.then(|| cuda_storage(dev, db)).transpose()?,
        })
    }
    same_dtypes("batch_norm2d_backward", &[Some(x.0), w.map(|v| v.0), Some(mean.0), Some(rstd.0), Some(g.0)])?;
    by_dtype!(x.0.dtype(), run(x, w, mean, rstd, g, stats, needs))
}

/// running[i] = (1 - momentum) running[i] + momentum scale stat[i], in place through `layout`, in f64.
pub(super) fn blend_into(
    op: &'static str,
    running: &mut CudaStorage,
    layout: &Layout,
    stat: &CudaStorage,
    momentum: f64,
    scale: f64,
) -> Result<()> {
    fn run<T: Float>(
        op: &'static str,
        running: &mut CudaStorage,
        layout: &Layout,
        stat: &CudaStorage,
        momentum: f64,
        scale: f64,
    ) -> Result<()> {
        let c = layout.numel();
        if c == 0 {
            return Ok(());
        }
        let dev = running.device().clone();
        let lr = running.strided(op, layout)?;
        let ls = Layout::contiguous(&[c]);
        let sv = elements::<T>(op, (stat, &ls))?;
        let f = function::<T>(&dev, &MODULE, "bn_blend")?;
        let c64 = c as i64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(running.slice::<T>()?).arg(&lr).arg(&sv).arg(&c64).arg(&momentum).arg(&scale);
        // SAFETY: bn_blend_<T>(T* running, Strided lr, const T* stat, long long c, double momentum, double
        // scale) reads and writes running through lr at indices below c (checked against its buffer by
        // `strided`; no element is reached twice, checked by the caller) and reads stat[0..c), the view's
        // length. The caller's write lock keeps anything else from touching the buffer.
        unsafe { launch(op, &dev, args, c) }
    }
    // Two threads writing one element through a broadcast view would race; the CPU's sequential loop would
    // blend it repeatedly. Neither is a running statistic, so such a view is refused.
    if layout.shape().iter().zip(layout.strides()).any(|(&n, &s)| n > 1 && s == 0) {
        return Err(Error::invalid(op, "a running buffer must not be a broadcast view", layout.shape()));
    }
    crate::util::same_cuda_dtypes(op, &[running, stat])?;
    by_dtype!(running.dtype(), run(op, running, layout, stat, momentum, scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_rows_spread_over_lane_groups_of_whole_vectors() {
        // (d, elem) -> (lanes, vectors a lane, rows a thread): the bench's 64 f32 channels are 16 vectors, a
        // group of 16 lanes holding one each, two rows a warp, four a thread.
        let plan = |d, elem| LnReg::new(d, elem, 0).map(|p| (p.lanes, p.nv, p.rpt));
        assert_eq!(plan(64, 4), Some((16, 1, 4)));
        assert_eq!(plan(64, 8), Some((32, 1, 4)));
        assert_eq!(plan(12, 4), Some((4, 1, 4)));
        assert_eq!(plan(132, 4), Some((32, 2, 2)));
        assert_eq!(plan(520, 4), Some((32, 8, 1)));
        assert_eq!(plan(1024, 4), Some((32, 8, 1)));
        assert_eq!(plan(512, 8), Some((32, 8, 1)));
        // Not whole vectors, too long, or not starting at a 16-byte boundary.
        assert_eq!(plan(7, 4), None);
        assert_eq!(plan(3, 8), None);
        assert_eq!(plan(1028, 4), None);
        assert_eq!(LnReg::new(64, 4, 2), None);
        assert!(LnReg::new(64, 4, 64).is_some());
        for (d, elem) in [(4, 4), (20, 4), (64, 4), (132, 4), (1024, 4), (2, 8), (130, 8), (512, 8)] {
            let p = LnReg::new(d, elem, 0).unwrap();
            let nvec = d * elem / 16;
            // The lanes hold every vector, and no lane is wholly idle unless the row has fewer vectors.
            assert!(p.lanes * p.nv >= nvec && p.lanes * (p.nv / 2) < nvec, "{d} {elem}: {p:?}");
            assert!(p.lanes.is_power_of_two() && p.lanes <= 32 && [1, 2, 4, 8].contains(&p.nv));
        }
    }

    #[test]
    fn batch_norm_channels_split_until_a_wave_is_busy() {
        let plan = |c, m, wave| {
            let p = BnPlan::new(c, m, wave);
            (p.splits, p.per)
        };
        // The MNIST step's (128, 8, 16, 16) on an H100 holding 4 blocks of 256 a multiprocessor (528; ptxas
        // gives the kernels 52 to 64 registers): 32 slices of 1024 a channel (capped by the slice minimum), 256
        // blocks; (128, 64, 8, 8): 8 of 1024.
        assert_eq!(plan(8, 32_768, 528), (32, 1024));
        assert_eq!(plan(64, 8192, 528), (8, 1024));
        // Big channels: ceil(528 / 8) = 66 slices of ceil(10^6 / 66) elements.
        assert_eq!(plan(8, 1_000_000, 528), (66, 15_152));
        // (64, 3, 37, 41): 176 slices would leave under 1024 elements each; 94 slices of 1033 (the last 1019).
        assert_eq!(plan(3, 64 * 37 * 41, 528), (94, 1033));
        // A wave of channels or more, or channels too small to split: one slice a channel (the fused kernels).
        assert_eq!(plan(528, 1_000_000, 528), (1, 1_000_000));
        assert_eq!(plan(1200, 48 * 48, 528), (1, 2304));
        assert_eq!(plan(64, 98, 528), (1, 98));
        assert_eq!(plan(64, 1024, 528), (1, 1024));
        assert_eq!(plan(3, 2047, 528), (1, 2047));
        assert_eq!(plan(3, 2048, 528), (2, 1024));
        // No elements (an empty batch's backward): one slice, nothing to walk.
        assert_eq!(plan(5, 0, 528), (1, 1));
        for c in [1, 2, 3, 7, 8, 64, 100, 500, 527, 528, 1055, 1056, 5000] {
            for m in [2, 1023, 1024, 1025, 2047, 4096, 32_768, 97_088, 100_003, 1 << 22] {
                for wave in [1, 132, 528, 1056] {
                    let p = BnPlan::new(c, m, wave);
                    let what = format!("c {c} m {m} wave {wave}: {p:?}");
                    // The slices cover the channel, none empty, and split ones hold at least the minimum.
                    assert!(p.splits >= 1 && p.splits * p.per >= m && (p.splits - 1) * p.per < m, "{what}");
                    assert!(p.splits == 1 || p.per >= BN_SLICE_MIN, "{what}");
                    // Split only while the channels alone leave part of a wave idle, and into no more blocks
                    // than a wave rounded up to whole channels.
                    assert!(p.splits == 1 || (c < wave && p.tasks(c) < wave + c), "{what}");
                }
            }
        }
    }

    #[test]
    fn layer_norm_backward_chunks_bound_the_rows_a_thread_sums() {
        let p = LnReg::new(64, 4, 0).unwrap();
        for rows in [1, 63, 64, 65, 200_704, 10_000_000] {
            let (chunk, blocks) = p.backward_chunks(rows, 396);
            assert!(chunk % p.rows_per_step() == 0 && blocks * chunk >= rows && (blocks - 1) * chunk < rows, "{rows}");
            // Each thread adds at most LN_ROWS_PER_THREAD rows into its registers.
            assert!(chunk / (LN_THREADS as usize / p.lanes) <= LN_ROWS_PER_THREAD, "{rows}");
        }
        // The bench's rows on an H100 holding 3 blocks a multiprocessor: one wave of 32 rows a thread; twice
        // the rows, two waves.
        assert_eq!(p.backward_chunks(200_704, 396), (512, 392));
        assert_eq!(p.backward_chunks(2 * 200_704, 396).1, 784);
        assert_eq!(p.backward_chunks(10, 396), (64, 1));
    }
}
