//! CUDA paths of the convolution family (conv.cu). Inputs arrive contiguous (the op saves them so), but for
//! the depthwise conv of a channels-last view; outputs and gradients are new contiguous buffers. Everything is
//! enqueued on the device's stream; nothing waits.
//!
//! Depthwise conv2d of a channels-last view (x's memory (N, H, W, C), the MILA blocks' tokens seen as an image):
//! NHWC kernels ([`dwl_plan`]), y and dx (N, H, W, C) too, x read in place (nothing copied, nothing but the view
//! saved). Threads take V channels of a pixel (one 16-byte access when C and the pointers allow, else one
//! element; neighbouring threads, neighbouring channels: coalesced) and items of a strip of TW columns of one
//! row, the taps in registers, each input row of the strip loaded once (3x3 stride 1 and 2; other kernels
//! gather their taps with run-time loops). The weight and bias gradients: per-thread sums over at most a few
//! items, a block's threads added in order in double into a row of partials per block row, then `dw_reduce`
//! (deterministic, no atomics).
//!
//! Depthwise conv2d (G = C = O): tiled kernels ([`dw_plan`]). A block takes one channel, a few samples of it
//! (small planes) or one sample (large planes), and a band of output rows; it copies the x rows its band reads
//! (and, backward, the g rows) into shared memory with 16-byte loads, then each thread computes a vertical run
//! of outputs from the tile. The backward is one fused kernel: dx from the g tile (the transposed conv as a
//! gather, no atomics), and the block's sums of g x for every tap and of g (the bias) in registers, written as
//! one row of partials per block; `dw_reduce` adds each channel's rows in block order (deterministic). The 3x3
//! stride 1 and stride 2 convs have instances with unrolled taps; other kernels run-time loops. Planes too
//! wide for a tile fall back to untiled kernels: one thread per output (dx: per input) pixel, and the weight
//! gradient by blocks of (channel, chunk of samples) summed in double, then the chunks in order.
//!
//! Depthwise conv2d 3x3, stride 2, padding 1 (the patch merging's), NCHW: direct kernels ([`dw_s2_plan`])
//! before the tiled ones. A thread takes a column and a run of four output rows of one plane and loads the
//! input rows they read straight from global memory, every load of the item in flight at once (pairs of
//! columns, the column a warp's neighbour holds by a shuffle), with no shared-memory tile and no barrier
//! between loading and computing. The backward is one fused kernel with the same items: each writes the 8x2
//! block of dx it owns (a gather, no atomics) and adds its g x terms into per-thread tap and bias sums; a
//! block takes a range of one channel's items and writes one row of partials, which `dw_reduce` adds in order.
//!
//! Dense and grouped conv2d, forward: an implicit GEMM (`conv_igemm`: each block gathers the patches of its
//! 256 output pixels from x step by step over K = C/G kh kw, 32 output channels a block, FFMA; `conv_igemm_tap`
//! where C/G is a multiple of 8, with K in tap-major order so that a step reads 8 channels of one tap), except for
//! pointwise convs and in TF32 mode, which take the cuBLAS path below ([`Conv2dGeom::implicit_gemm`]).
//!
//! Dense and grouped conv2d, backward (and the forward's other cases): im2col + cuBLAS, per chunk of samples
//! small enough for the column buffer
//! ([`COLS_BUDGET`]). cols is (nb, C kh kw, OH OW); for sample s and group q, rows q K .. (q+1) K with
//! K = C/G kh kw are the group's patch matrix cols_sq (K, P), P = OH OW. Then
//!
//! | | product, per sample s and group q | then |
//! | --- | --- | --- |
//! | forward | y_sq (O/G, P) = W_q (O/G, K) cols_sq (+ y_sq, which holds the bias) | |
//! | dx | dcols_sq (K, P) = W_q^T g_sq | col2im (a gather: one writer per dx element) |
//! | dW | part_s,q (O/G, K) = g_sq cols_sq^T | sum over s in sample order |
//!
//! Each product over all (s, q) is a few strided-batched calls ([`grid_calls`]): one per group batched over
//! the chunk's samples, or one per sample batched over the groups, whichever loop is shorter. A 1x1 conv with
//! stride 1 and no padding reads x (and writes dx) in place of cols. The bias gradient is a block-per-channel
//! reduction of g, shared with the causal conv1d.
//!
//! Causal conv1d: one thread per output for the forward and dx, one block per (channel, tap) for the weight.

use std::sync::Arc;

use engine::cuda::{
    CudaDevice, CudaStorage, CudaView, CudaViewMut, DeviceRepr, GemmConfig, LaunchArgs, LaunchConfig, PushKernelArg,
    Strided,
};
use engine::{DType, Error, Float, Result, Storage};

use super::{Conv1dGeom, Conv2dGeom, Epilogue};
use crate::cuda::{elements, function, launch, launch_1d, optional, Module, View};
use crate::elementwise::Unary;
use crate::util::{Grads, Needs};

pub(crate) const MODULE: Module = Module { name: "ops_conv", body: include_str!("conv.cu") };

/// Most elements of the im2col buffer (and of its gradient) one chunk of samples may take: 256 MiB in f32.
/// Larger batches run in chunks, each a few cuBLAS calls, so memory stays bounded whatever N is.
const COLS_BUDGET: usize = 1 << 26;

/// Threads of the block-per-output reductions.
const BLOCK: u32 = 256;

/// Output positions one block of the depthwise weight gradient reduces (see `dw_bwd_w_impl`).
const DW_CHUNK: usize = 1 << 14;

/// `struct Conv2dParams` of conv.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Conv2dParams {
    n: i64,
    c: i64,
    h: i64,
    w: i64,
    o: i64,
    kh: i64,
    kw: i64,
    sh: i64,
    sw: i64,
    ph: i64,
    pw: i64,
    dh: i64,
    dw: i64,
    groups: i64,
    oh: i64,
    ow: i64,
}

/// `struct Conv1dParams` of conv.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Conv1dParams {
    b: i64,
    c: i64,
    l: i64,
    k: i64,
}

// The .cu side checks the same sizes with static_asserts.
const _: () = assert!(std::mem::size_of::<Conv2dParams>() == 128);
const _: () = assert!(std::mem::size_of::<Conv1dParams>() == 32);

// SAFETY: plain i64 fields in C layout with no padding, the layout of `struct Conv2dParams` in conv.cu.
unsafe impl DeviceRepr for Conv2dParams {}
// SAFETY: as above, for `struct Conv1dParams`.
unsafe impl DeviceRepr for Conv1dParams {}

/// `vals` as the i64s the kernels take. Sizes of tensors always fit; a user's stride, padding or dilation
/// might not, and is refused rather than wrapped.
fn to_i64<const N: usize>(op: &'static str, shape: &[usize], vals: [usize; N]) -> Result<[i64; N]> {
    let mut out = [0i64; N];
    for (o, v) in out.iter_mut().zip(vals) {
        *o = i64::try_from(v).map_err(|_| Error::invalid(op, format!("{v} does not fit in an i64"), shape))?;
    }
    Ok(out)
}

impl Conv2dParams {
    fn new(op: &'static str, g: &Conv2dGeom) -> Result<Self> {
        let [n, c, h, w, o, kh, kw, sh, sw, ph, pw, dh, dw, groups, oh, ow] = to_i64(
            op,
            &[g.n, g.c, g.h, g.w],
            [
                g.n,
                g.c,
                g.h,
                g.w,
                g.o,
                g.kh,
                g.kw,
                g.stride.0,
                g.stride.1,
                g.padding.0,
                g.padding.1,
                g.dilation.0,
                g.dilation.1,
                g.groups,
                g.oh,
                g.ow,
            ],
        )?;
        Ok(Conv2dParams { n, c, h, w, o, kh, kw, sh, sw, ph, pw, dh, dw, groups, oh, ow })
    }
}

impl Conv1dParams {
    fn new(op: &'static str, g: &Conv1dGeom) -> Result<Self> {
        let [b, c, l, k] = to_i64(op, &[g.b, g.c, g.l], [g.b, g.c, g.l, g.k])?;
        Ok(Conv1dParams { b, c, l, k })
    }
}

/// Launches `args` on a grid of (x, y) blocks of [`BLOCK`] threads, for the reductions with one block per
/// output. The kernels loop when the grid is capped below the number of outputs.
///
/// # Safety
/// As [`crate::cuda::launch`]: the arguments must match the kernel's parameters, and its indices stay inside
/// the buffers.
unsafe fn launch_blocks(op: &'static str, mut args: LaunchArgs<'_>, (x, y): (usize, usize)) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (x.clamp(1, 1 << 16) as u32, y.clamp(1, 1 << 10) as u32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: forwarded to the caller.
    unsafe { args.launch(cfg) }.map(|_| ()).map_err(|e| Error::Cuda { op, msg: format!("{e:?}") })
}

/// db[ch] = sum of g[s, ch, ..] over s < samples and the `per` elements of each (samples, channels, per) row.
fn channel_sum<T: Float>(
    op: &'static str,
    dev: &Arc<CudaDevice>,
    g: &CudaView<T>,
    [samples, channels, per]: [usize; 3],
) -> Result<CudaStorage> {
    let db = dev.alloc::<T>(channels)?;
    if channels > 0 {
        let f = function::<T>(dev, &MODULE, "channel_sum")?;
        let [s64, c64, p64] = to_i64(op, &[samples, channels, per], [samples, channels, per])?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(g).arg(db.as_slice()).arg(&s64).arg(&c64).arg(&p64);
        // SAFETY: channel_sum_<T>(const T* g, T* db, long long samples, long long channels, long long per)
        // reads g[0..samples channels per), the length of `g` (the gradient of a (samples, channels, per)
        // output), and writes db[0..channels), which `db` holds.
        unsafe { launch_blocks(op, args, (channels, 1))? };
    }
    CudaStorage::from_slice(dev, db)
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

// ---- conv2d ----------------------------------------------------------------------------------------------

pub(super) fn conv2d(x: View, w: View, bias: Option<View>, g: &Conv2dGeom) -> Result<CudaStorage> {
    let mut all = vec![x.0, w.0];
    all.extend(bias.map(|b| b.0));
    crate::util::same_cuda_dtypes("conv2d", &all)?;
    if g.is_depthwise() {
        by_dtype!(x.0.dtype(), depthwise_forward(x, w, bias, g))
    } else {
        by_dtype!(x.0.dtype(), dense_forward(x, w, bias, g))
    }
}

pub(super) fn conv2d_backward(x: View, w: View, gy: View, g: &Conv2dGeom, needs: Needs) -> Result<Grads<Storage>> {
    crate::util::same_cuda_dtypes("conv2d_backward", &[x.0, w.0, gy.0])?;
    let grads = if g.is_depthwise() {
        by_dtype!(x.0.dtype(), depthwise_backward(x, w, gy, g, needs))
    } else {
        by_dtype!(x.0.dtype(), dense_backward(x, w, gy, g, needs))
    }?;
    let s = |v: Option<CudaStorage>| v.map(Storage::Cuda);
    Ok(Grads { x: s(grads.x), w: s(grads.w), bias: s(grads.bias) })
}

// ---- depthwise conv2d: the tiled plan ------------------------------------------------------------------------

/// Threads of the tiled depthwise kernels.
const DW_THREADS: u32 = 256;

/// Shared memory one block of the tiled depthwise forward may take (the x tile), and of the backward (the x and
/// g tiles): under the 48 KiB a block gets without opting in, with room for the backward's static reduction
/// scratch, and small enough for several blocks a multiprocessor.
const DW_FWD_SHARED: usize = 24 << 10;
const DW_BWD_SHARED: usize = 40 << 10;

/// About how many outputs one block should produce: small planes are grouped until a block has this many.
const DW_OUTPUTS_PER_BLOCK: usize = 4096;

/// Blocks per multiprocessor the plan aims for at least (by splitting planes into bands) when there are few
/// planes: a grid of a few dozen blocks would leave most of the device idle.
const DW_MIN_BLOCKS_PER_SM: usize = 2;

/// `struct DwTile` of conv.cu, field for field: a depthwise conv's sizes and the tiling of its grid.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DwTile {
    n: i32,
    c: i32,
    h: i32,
    w: i32,
    oh: i32,
    ow: i32,
    kh: i32,
    kw: i32,
    sh: i32,
    sw: i32,
    ph: i32,
    pw: i32,
    dh: i32,
    dw: i32,
    /// Samples of one channel per block.
    planes: i32,
    /// ceil(n / planes).
    groups: i32,
    /// Output rows per band.
    rows: i32,
    /// ceil(oh / rows).
    bands: i32,
    /// Rows of one plane's x tile.
    xrows: i32,
    /// Rows of one plane's g tile (backward).
    grows: i32,
}

const _: () = assert!(std::mem::size_of::<DwTile>() == 80);

// SAFETY: plain i32 fields in C layout with no padding, the layout of `struct DwTile` in conv.cu.
unsafe impl DeviceRepr for DwTile {}

/// The instances of the tiled depthwise kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DwKernel {
    /// 3x3, stride 1, dilation 1 (the MILA blocks' cpe, lepe and dwc convs).
    K3S1,
    /// 3x3, stride 2, dilation 1 (the downsampling's depthwise conv).
    K3S2,
    /// Anything else, with run-time loops.
    Any,
}

impl DwKernel {
    fn of(g: &Conv2dGeom) -> DwKernel {
        match ((g.kh, g.kw), g.stride, g.dilation) {
            ((3, 3), (1, 1), (1, 1)) => DwKernel::K3S1,
            ((3, 3), (2, 2), (1, 1)) => DwKernel::K3S2,
            _ => DwKernel::Any,
        }
    }

    /// Output rows one thread takes per item (a vertical run: R in conv.cu).
    fn run(self) -> usize {
        match self {
            DwKernel::K3S1 | DwKernel::K3S2 => 4,
            DwKernel::Any => 1,
        }
    }

    /// The kernel's name: dw_fwd_<instance> or dw_bwd_<instance>.
    fn name(self, backward: bool) -> String {
        let instance = match self {
            DwKernel::K3S1 => "3x3s1",
            DwKernel::K3S2 => "3x3s2",
            DwKernel::Any => "any",
        };
        format!("dw_{}_{instance}", if backward { "bwd" } else { "fwd" })
    }
}

/// What one block of a plan works on, as `dw_band` of conv.cu computes it (the kernels derive it from the
/// block index; this copy sizes the tiles and is what the tests check): output rows a0 .. a1 (the forward and
/// the weight gradient), input rows r0 .. r1 (dx), each rounded up to whole runs (a1r, r1r), and the g rows
/// gi0 .. gi1 the backward's tile must hold (rows outside 0 .. OH are zeros there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DwBand {
    a0: i64,
    a1: i64,
    a1r: i64,
    r0: i64,
    r1: i64,
    r1r: i64,
    gi0: i64,
    gi1: i64,
}

impl DwBand {
    fn new(g: &Conv2dGeom, run: usize, rows: usize, bands: usize, band: usize) -> DwBand {
        let [h, oh, sh, ph, kh, dh, run, rows] =
            [g.h, g.oh, g.stride.0, g.padding.0, g.kh, g.dilation.0, run, rows].map(|v| v as i64);
        let round = |lo: i64, hi: i64| lo + (hi - lo + run - 1) / run * run;
        let a0 = band as i64 * rows;
        let a1 = oh.min(a0 + rows);
        let r0 = if band == 0 { 0 } else { h.min(a0 * sh) };
        let r1 = if band + 1 == bands { h } else { h.min(a1 * sh) };
        let (a1r, r1r) = (round(a0, a1), round(r0, r1));
        // dx row i reads the g rows a with a sh - ph + t dh = i for a tap t < kh: a from ceil((i + ph - (kh - 1)
        // dh) / sh) to floor((i + ph) / sh); the weight gradient reads rows a0 .. a1r.
        let gi0 = a0.min((r0 + ph - (kh - 1) * dh).div_euclid(sh) + i64::from((r0 + ph - (kh - 1) * dh) % sh != 0));
        let gi1 = a1r.max((r1r - 1 + ph).div_euclid(sh) + 1);
        DwBand { a0, a1, a1r, r0, r1, r1r, gi0, gi1 }
    }
}

/// A tiled depthwise launch: the instance, its tile and grid, and the dynamic shared memory per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DwPlan {
    kernel: DwKernel,
    tile: DwTile,
    blocks: usize,
    shared: usize,
}

/// Rows of a plane's x tile for bands of `rows` output rows: the last tap row of the last (rounded) run.
fn dw_xrows(g: &Conv2dGeom, run: usize, rows: usize) -> usize {
    (rows.div_ceil(run) * run - 1) * g.stride.0 + (g.kh - 1) * g.dilation.0 + 1
}

/// Rows of a plane's g tile: the most any band of `rows` output rows needs.
fn dw_grows(g: &Conv2dGeom, run: usize, rows: usize) -> usize {
    let bands = g.oh.div_ceil(rows);
    (0..bands).map(|b| DwBand::new(g, run, rows, bands, b)).map(|b| (b.gi1 - b.gi0) as usize).max().unwrap_or(0)
}

/// The tiling of a depthwise conv (forward, or the fused backward) on a device of `sms` multiprocessors with
/// `elem`-byte elements, or None when even a band of one run of rows of one plane overflows the shared memory
/// (very wide images: the untiled kernels take those) or a size does not fit the kernels' ints.
///
/// Whole planes when one fits: as many samples of a channel per block as make about
/// [`DW_OUTPUTS_PER_BLOCK`] outputs and fit the shared memory, balanced over the batch. Otherwise (and when
/// there would be too few blocks for the device) one plane in bands of output rows, a whole number of runs
/// each.
fn dw_plan(g: &Conv2dGeom, elem: usize, backward: bool, sms: usize) -> Option<DwPlan> {
    let kernel = DwKernel::of(g);
    let run = kernel.run();
    let budget = if backward { DW_BWD_SHARED } else { DW_FWD_SHARED };
    let bytes = |planes: usize, rows: usize| {
        let g_tile = if backward { dw_grows(g, run, rows) * g.ow } else { 0 };
        planes * (dw_xrows(g, run, rows) * g.w + g_tile) * elem
    };
    let fits = |v: usize| i32::try_from(v).is_ok();
    let sizes = [g.n, g.c, g.h * g.w, g.oh * g.ow, g.n * g.c, g.stride.0 * g.oh + g.kh * g.dilation.0 + g.padding.0];
    if g.n == 0 || g.c == 0 || !sizes.iter().all(|&v| fits(v)) || !fits(g.stride.1 * g.ow + g.kw * g.dilation.1) {
        return None;
    }
    let min_blocks = DW_MIN_BLOCKS_PER_SM * sms;
    let (mut planes, mut rows) = (1, g.oh);
    if bytes(1, g.oh) <= budget {
        let by_outputs = (DW_OUTPUTS_PER_BLOCK / (g.oh * g.ow)).max(1);
        let by_shared = budget / bytes(1, g.oh);
        let by_blocks = (g.n * g.c / min_blocks).max(1);
        planes = by_outputs.min(by_shared).min(by_blocks).min(g.n);
        planes = g.n.div_ceil(g.n.div_ceil(planes));
    } else {
        // The most rows (whole runs) whose tiles fit. Count down, first by the x tile alone (closed form), then
        // by both tiles (the g tile is no larger than the x tile, so only a few more steps).
        let rows_of = |m: usize| (m * run).min(g.oh);
        let mut m = g.oh.div_ceil(run);
        while m > 0 && dw_xrows(g, run, rows_of(m)) * g.w * elem > budget {
            m -= 1;
        }
        while m > 0 && bytes(1, rows_of(m)) > budget {
            m -= 1;
        }
        if m == 0 {
            return None;
        }
        rows = rows_of(m);
    }
    let groups = g.n.div_ceil(planes);
    if planes == 1 && g.c * groups * g.oh.div_ceil(rows) < min_blocks {
        // Few planes: bands of fewer rows, so that the grid covers the device.
        let bands = min_blocks.div_ceil(g.c * groups);
        rows = rows.min(g.oh.div_ceil(bands).div_ceil(run) * run).max(run.min(g.oh));
    }
    let bands = g.oh.div_ceil(rows);
    let blocks = g.c * groups * bands;
    let (xrows, grows) = (dw_xrows(g, run, rows), if backward { dw_grows(g, run, rows) } else { 0 });
    let shared = bytes(planes, rows);
    let v = [g.n, g.c, g.h, g.w, g.oh, g.ow, g.kh, g.kw, g.stride.0, g.stride.1, g.padding.0, g.padding.1];
    let v2 = [g.dilation.0, g.dilation.1, planes, groups, rows, bands, xrows, grows];
    if !fits(blocks) || !v.iter().chain(&v2).all(|&x| fits(x)) || !fits(planes * rows.div_ceil(run) * g.ow.max(g.w)) {
        return None;
    }
    let i = |v: usize| v as i32;
    let tile = DwTile {
        n: i(g.n),
        c: i(g.c),
        h: i(g.h),
        w: i(g.w),
        oh: i(g.oh),
        ow: i(g.ow),
        kh: i(g.kh),
        kw: i(g.kw),
        sh: i(g.stride.0),
        sw: i(g.stride.1),
        ph: i(g.padding.0),
        pw: i(g.padding.1),
        dh: i(g.dilation.0),
        dw: i(g.dilation.1),
        planes: i(planes),
        groups: i(groups),
        rows: i(rows),
        bands: i(bands),
        xrows: i(xrows),
        grows: i(grows),
    };
    Some(DwPlan { kernel, tile, blocks, shared })
}

/// Launches a tiled depthwise kernel by its plan: `blocks` blocks of [`DW_THREADS`], `shared` bytes.
///
/// # Safety
/// As [`crate::cuda::launch`].
unsafe fn launch_tiled(op: &'static str, args: LaunchArgs<'_>, plan: &DwPlan) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { launch_1d(op, args, plan.blocks, DW_THREADS as usize, plan.shared) }
}

// ---- depthwise conv2d 3x3, stride 2, padding 1: the direct kernels ------------------------------------------

/// Output rows one item of the direct stride-2 kernels covers (DW_S2_RUN in conv.cu).
const DW_S2_RUN: usize = 4;

/// Threads of a block of the direct stride-2 kernels: the most their `__launch_bounds__` in conv.cu allow.
const DW_S2_THREADS: usize = 256;

/// Most items a thread of the direct stride-2 backward takes (summing its weight and bias terms in T before
/// the block adds its threads in double): fewer blocks, so fewer partials and block reductions, while a
/// channel's items still make enough blocks for the device (MLLA-T's last merge: 2 per channel, 4096 in all).
const DW_S2_ITEMS: usize = 4;

/// `struct DwS2` of conv.cu, field for field: the items and the backward's blocks of a direct launch.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DwS2 {
    n: i32,
    c: i32,
    h: i32,
    w: i32,
    oh: i32,
    ow: i32,
    /// ceil(OH / DW_S2_RUN): runs of output rows per plane.
    runs: i32,
    /// runs OW: items per plane.
    items: i32,
    /// N C items: the forward's items, one a thread.
    total: i32,
    /// N items: one channel's items in the backward.
    span: i32,
    /// Items of a channel one backward block takes (the channel's last block may take fewer).
    chunk: i32,
    /// Backward blocks per channel: ceil(span / chunk).
    per: i32,
}

const _: () = assert!(std::mem::size_of::<DwS2>() == 48);

// SAFETY: plain i32 fields in C layout with no padding, the layout of `struct DwS2` in conv.cu.
unsafe impl DeviceRepr for DwS2 {}

/// The direct kernels' launch for a 3x3, stride 2, padding 1, dilation 1 depthwise conv (the patch merging's),
/// or None for any other conv, an empty one, or sizes past the kernels' ints (the tiled kernels take those).
/// Items (see conv.cu) are a column and a run of [`DW_S2_RUN`] output rows of one plane; the forward runs one
/// a thread, the backward gives each block an even share of one channel's items, at most [`DW_S2_ITEMS`] a
/// thread.
fn dw_s2_plan(g: &Conv2dGeom) -> Option<DwS2> {
    if (g.kh, g.kw, g.stride, g.padding, g.dilation) != (3, 3, (2, 2), (1, 1), (1, 1)) || g.n == 0 || g.c == 0 {
        return None;
    }
    let runs = g.oh.div_ceil(DW_S2_RUN);
    let items = runs * g.ow;
    let span = g.n * items;
    let total = g.c.checked_mul(span)?;
    let per = span.div_ceil(DW_S2_THREADS * DW_S2_ITEMS);
    let chunk = span.div_ceil(per);
    // Rows and columns the kernels index: up to 2 runs DW_S2_RUN + 1 and 2 OW + 1.
    let sizes = [g.n, g.c, g.h, g.w, g.oh, g.ow, runs, items, span, total, chunk, per, g.c * per];
    let fits = |v: usize| i32::try_from(v).is_ok();
    if !sizes.iter().all(|&v| fits(v)) || !fits(2 * runs * DW_S2_RUN + 1) || !fits(2 * g.ow + 1) {
        return None;
    }
    let i = |v: usize| v as i32;
    Some(DwS2 {
        n: i(g.n),
        c: i(g.c),
        h: i(g.h),
        w: i(g.w),
        oh: i(g.oh),
        ow: i(g.ow),
        runs: i(runs),
        items: i(items),
        total: i(total),
        span: i(span),
        chunk: i(chunk),
        per: i(per),
    })
}

fn depthwise_forward<T: Float>(x: View, w: View, bias: Option<View>, g: &Conv2dGeom) -> Result<CudaStorage> {
    const OP: &str = "conv2d";
    let dev = x.0.device();
    let n = g.n * g.c * g.oh * g.ow;
    let y = dev.alloc::<T>(n)?;
    if n > 0 {
        let (xv, wv) = (elements::<T>(OP, x)?, elements::<T>(OP, w)?);
        let (bv, lb, has_bias) = optional(OP, bias, &xv)?;
        if let Some(p) = dw_s2_plan(g) {
            let f = function::<T>(dev, &MODULE, "dw_s2_fwd")?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv).arg(&wv).arg(&bv).arg(&lb).arg(&has_bias).arg(y.as_slice()).arg(&p);
            // SAFETY: dw_s2_fwd_<T>(const T* x, const T* w, const T* bias, Strided lb, int has_bias, T* y, DwS2 p)
            // reads x[0..N C H W) and w[0..C 9), the lengths of the contiguous views (the op checked the shapes,
            // which p repeats), bias through lb (checked against its buffer by `strided`, read only when
            // has_bias), and writes y[0..N C OH OW), which `y` holds: thread t < p.total stores the outputs of
            // item t (rows below OH only); the threads past p.total store nothing.
            unsafe { launch_1d(OP, args, (p.total as usize).div_ceil(DW_S2_THREADS), DW_S2_THREADS, 0)? };
        } else if let Some(plan) = dw_plan(g, T::DTYPE.size_in_bytes(), false, dev.multiprocessor_count() as usize) {
            let f = function::<T>(dev, &MODULE, &plan.kernel.name(false))?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv).arg(&wv).arg(&bv).arg(&lb).arg(&has_bias).arg(y.as_slice()).arg(&plan.tile);
            // SAFETY: dw_fwd_<instance>_<T>(const T* x, const T* w, const T* bias, Strided lb, int has_bias, T* y,
            // DwTile p) reads x[0..N C H W) and w[0..C kh kw), the lengths of the contiguous views (the op checked
            // the shapes, which p repeats), bias through lb (checked against its buffer by `strided`, read only
            // when has_bias), and writes y[0..N C OH OW), which `y` holds. Block b < C groups bands works on
            // channel b / (groups bands), samples below N and output rows below OH only. Its tile of planes x
            // xrows x W elements is the dynamic shared memory `dw_plan` sized (tested in this file).
            unsafe { launch_tiled(OP, args, &plan)? };
        } else {
            let f = function::<T>(dev, &MODULE, "dw_fwd")?;
            let p = Conv2dParams::new(OP, g)?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv).arg(&wv).arg(&bv).arg(&lb).arg(&has_bias).arg(y.as_slice()).arg(&p);
            // SAFETY: dw_fwd_<T>(const T* x, const T* w, const T* bias, Strided lb, int has_bias, T* y,
            // Conv2dParams p) reads x[0..N C H W) and w[0..C kh kw), the lengths of the contiguous views, bias
            // through lb (checked by `strided`, read only when has_bias), and writes y[0..N C OH OW), which `y`
            // holds.
            unsafe { launch(OP, dev, args, n)? };
        }
    }
    CudaStorage::from_slice(dev, y)
}

/// The gradients of a depthwise conv2d, each only where needed.
fn depthwise_backward<T: Float>(
    x: View,
    w: View,
    gy: View,
    g: &Conv2dGeom,
    needs: Needs,
) -> Result<Grads<CudaStorage>> {
    const OP: &str = "conv2d_backward";
    let dev = x.0.device();
    if let Some(p) = dw_s2_plan(g) {
        return depthwise_backward_s2::<T>(x, w, gy, g, needs, &p);
    }
    let Some(plan) = dw_plan(g, T::DTYPE.size_in_bytes(), true, dev.multiprocessor_count() as usize) else {
        return depthwise_backward_untiled::<T>(x, w, gy, g, needs);
    };
    let (xv, wv, gv) = (elements::<T>(OP, x)?, elements::<T>(OP, w)?, elements::<T>(OP, gy)?);
    let need_sums = needs.w || needs.bias;
    let taps = g.kh * g.kw;
    let dx = dev.alloc::<T>(if needs.x { g.n * g.c * g.h * g.w } else { 0 })?;
    let part = dev.alloc::<f64>(if need_sums { plan.blocks * (taps + 1) } else { 1 })?;
    let f = function::<T>(dev, &MODULE, &plan.kernel.name(true))?;
    let flags = [i32::from(needs.x), i32::from(need_sums)];
    // Without a dx to write, g's buffer stands in for the pointer (the kernel never writes it then); likewise
    // the partials.
    let dx_arg = if needs.x { dx.as_slice().as_view() } else { gv.slice(..) };
    let part_arg = part.as_slice().as_view();
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&xv).arg(&wv).arg(&gv).arg(&dx_arg).arg(&part_arg).arg(&plan.tile).arg(&flags[0]).arg(&flags[1]);
    // SAFETY: dw_bwd_<instance>_<T>(const T* x, const T* w, const T* g, T* dx, double* part, DwTile p,
    // int need_dx, int need_sums) reads x[0..N C H W) (only when need_sums), w[0..C kh kw) and g[0..N C OH OW),
    // the contiguous views' lengths (the op checked the shapes, which p repeats); it writes dx[0..N C H W) only
    // when need_dx (then `dx` holds that many), and part[0..blocks (kh kw + 1)) only when need_sums (then
    // `part` holds that many). Its x and g tiles are the dynamic shared memory `dw_plan` sized.
    unsafe { launch_tiled(OP, args, &plan)? };
    // The launch above wrote every row of the partials (blocks = C per) when need_sums.
    let (dw, bias) = reduce_partials::<T>(dev, &part_arg, g.c, plan.blocks / g.c, taps, needs)?;
    Ok(Grads { x: needs.x.then(|| CudaStorage::from_slice(dev, dx)).transpose()?, w: dw, bias })
}

/// The gradients of a 3x3, stride 2, padding 1 depthwise conv by the direct kernels (`p` from [`dw_s2_plan`]):
/// dx and the weight and bias partials in one launch, then `dw_reduce` over each channel's `per` rows.
fn depthwise_backward_s2<T: Float>(
    x: View,
    w: View,
    gy: View,
    g: &Conv2dGeom,
    needs: Needs,
    p: &DwS2,
) -> Result<Grads<CudaStorage>> {
    const OP: &str = "conv2d_backward";
    const TAPS: usize = 9;
    let dev = x.0.device();
    let (xv, wv, gv) = (elements::<T>(OP, x)?, elements::<T>(OP, w)?, elements::<T>(OP, gy)?);
    let need_sums = needs.w || needs.bias;
    let blocks = g.c * p.per as usize;
    let dx = dev.alloc::<T>(if needs.x { g.n * g.c * g.h * g.w } else { 0 })?;
    let part = dev.alloc::<f64>(if need_sums { blocks * (TAPS + 1) } else { 1 })?;
    let f = function::<T>(dev, &MODULE, "dw_s2_bwd")?;
    let flags = [i32::from(needs.x), i32::from(need_sums)];
    // Without a dx to write, g's buffer stands in for the pointer (the kernel never writes it then); likewise
    // the partials.
    let dx_arg = if needs.x { dx.as_slice().as_view() } else { gv.slice(..) };
    let part_arg = part.as_slice().as_view();
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&xv).arg(&wv).arg(&gv).arg(&dx_arg).arg(&part_arg).arg(p).arg(&flags[0]).arg(&flags[1]);
    // SAFETY: dw_s2_bwd_<T>(const T* x, const T* w, const T* g, T* dx, double* part, DwS2 p, int need_dx,
    // int need_sums) reads x[0..N C H W) (only when need_sums), w[0..C 9) and g[0..N C OH OW), the contiguous
    // views' lengths (the op checked the shapes, which p repeats); it writes dx[0..N C H W) only when need_dx
    // (then `dx` holds that many: item (a0, b) of a plane writes rows 2 a0 .. 2 a0 + 8 below H, columns 2b,
    // 2b + 1 below W), and part[0..C per 10) only when need_sums (then `part` holds that many): block
    // b < C per writes row b. Its only shared memory is dw_block_sums' static scratch.
    unsafe { launch_1d(OP, args, blocks, DW_S2_THREADS, 0)? };
    // The launch above wrote every row of the partials (blocks = C per) when need_sums.
    let (dw, bias) = reduce_partials::<T>(dev, &part_arg, g.c, p.per as usize, TAPS, needs)?;
    Ok(Grads { x: needs.x.then(|| CudaStorage::from_slice(dev, dx)).transpose()?, w: dw, bias })
}

/// The gradients of a depthwise conv whose planes are too wide for the tiles: dx by a gather per element, the
/// weight gradient by blocks of (channel, chunk of samples) and the bias gradient by a block per channel.
fn depthwise_backward_untiled<T: Float>(
    x: View,
    w: View,
    gy: View,
    g: &Conv2dGeom,
    needs: Needs,
) -> Result<Grads<CudaStorage>> {
    const OP: &str = "conv2d_backward";
    let dev = x.0.device();
    let (xv, wv, gv) = (elements::<T>(OP, x)?, elements::<T>(OP, w)?, elements::<T>(OP, gy)?);
    let p = Conv2dParams::new(OP, g)?;
    let dx = if needs.x {
        let n = g.n * g.c * g.h * g.w;
        let dx = dev.alloc::<T>(n)?;
        if n > 0 {
            let f = function::<T>(dev, &MODULE, "dw_bwd_dx")?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&gv).arg(&wv).arg(dx.as_slice()).arg(&p);
            // SAFETY: dw_bwd_dx_<T>(const T* g, const T* w, T* dx, Conv2dParams p) reads g[0..N C OH OW) and
            // w[0..C kh kw), the views' lengths, and writes dx[0..N C H W), which `dx` holds.
            unsafe { launch(OP, dev, args, n)? };
        }
        Some(CudaStorage::from_slice(dev, dx)?)
    } else {
        None
    };
    let dw = if needs.w {
        let len = g.c * g.kh * g.kw;
        let dw = dev.alloc::<T>(len)?;
        if len > 0 {
            // Chunks of about DW_CHUNK output positions: enough work per block, and few enough elements that a
            // block's walks over its chunk, one per tap, after the first come from cache.
            let spc = DW_CHUNK.div_ceil((g.oh * g.ow).max(1)).clamp(1, g.n.max(1));
            let chunks = g.n.div_ceil(spc).max(1);
            let part = dev.alloc::<T>(chunks * len)?;
            let f = function::<T>(dev, &MODULE, "dw_bwd_w")?;
            let [spc64, chunks64] = to_i64(OP, &[g.n], [spc, chunks])?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv).arg(&gv).arg(part.as_slice()).arg(&p).arg(&spc64).arg(&chunks64);
            // SAFETY: dw_bwd_w_<T>(const T* x, const T* g, T* part, Conv2dParams p, long long spc,
            // long long chunks) reads x[0..N C H W) and g[0..N C OH OW), the views' lengths (samples below
            // min(N, (k + 1) spc) only), and writes part[0..chunks C kh kw), which `part` holds; the kernel
            // loops over the channels and chunks past the grid.
            unsafe { launch_blocks(OP, args, (g.c, chunks))? };
            let sum = function::<T>(dev, &MODULE, "sum_partials")?;
            // One pass over all chunks: nothing earlier to accumulate onto.
            let (len64, accumulate) = (len as i64, 0i32);
            let mut args = dev.stream().launch_builder(&sum);
            args.arg(part.as_slice()).arg(dw.as_slice()).arg(&len64).arg(&chunks64).arg(&accumulate);
            // SAFETY: sum_partials_<T>(const T* part, T* out, long long len, long long nb, int accumulate)
            // reads part[0..chunks len), written above, and writes out[0..len), which `dw` holds.
            unsafe { launch(OP, dev, args, len)? };
        }
        Some(CudaStorage::from_slice(dev, dw)?)
    } else {
        None
    };
    let bias = needs.bias.then(|| channel_sum(OP, dev, &gv, [g.n, g.o, g.oh * g.ow])).transpose()?;
    Ok(Grads { x: dx, w: dw, bias })
}

// ---- depthwise conv2d on channels-last data ------------------------------------------------------------------

/// Threads of a block of the channels-last depthwise kernels.
const DWL_THREADS: usize = 256;

/// Blocks per multiprocessor the forward and dx grids aim for (256-thread blocks: a full multiprocessor's
/// threads); past that each thread walks more items, reusing its weight taps.
const DWL_BLOCKS_PER_SM: usize = 8;

/// Most items (strips of one row) a thread of the weight gradient walks, summing in T before the block sums in
/// double: with strips of 8 outputs, a few dozen terms per tap.
const DWL_SUM_ITEMS: usize = 4;

/// `struct DwlTile` of conv.cu, field for field: a depthwise conv's sizes and the grid of the channels-last
/// kernels.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DwlTile {
    n: i32,
    c: i32,
    h: i32,
    w: i32,
    oh: i32,
    ow: i32,
    kh: i32,
    kw: i32,
    sh: i32,
    sw: i32,
    ph: i32,
    pw: i32,
    dh: i32,
    dw: i32,
    /// Channel vectors per pixel: C / V.
    cv: i32,
    /// Threads of a block along the channel vectors (the rest of the block walks items).
    bx: i32,
    /// Blocks along the channel vectors: ceil(cv / bx).
    gx: i32,
    /// Blocks along the items.
    gy: i32,
    /// Rows of a sample the items walk: OH (forward, weight gradient) or H (dx).
    rows: i32,
    /// Strips of TW columns per row.
    strips: i32,
}

const _: () = assert!(std::mem::size_of::<DwlTile>() == 80);

// SAFETY: plain i32 fields in C layout with no padding, the layout of `struct DwlTile` in conv.cu.
unsafe impl DeviceRepr for DwlTile {}

/// The three launches of the channels-last depthwise conv.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DwlPhase {
    /// y from x: items are (sample, output row, strip of output columns).
    Forward,
    /// dx from g: items are (sample, input row, strip of input columns).
    InputGrad,
    /// The weight and bias partials from x and g: items as the forward's.
    Sums,
}

/// A channels-last depthwise launch: kernel name, tile, grid, block and dynamic shared memory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DwlPlan {
    name: String,
    tile: DwlTile,
    blocks: usize,
    threads: usize,
    shared: usize,
}

/// Whether every size the channels-last kernels index with fits their ints (with room for the item loops'
/// last step), and nothing is empty (the NCHW path handles empty convs).
fn dwl_fits(g: &Conv2dGeom) -> bool {
    let fits = |v: usize| i32::try_from(v).is_ok();
    let items = g.n * g.h.max(g.oh) * g.w.max(g.ow); // at least the items of any phase
    let sizes = [g.n, g.c, g.h, g.w, g.oh, g.ow, g.kh, g.kw, g.padding.0, g.padding.1, g.dilation.0, g.dilation.1];
    g.is_depthwise()
        && g.n * g.c * g.h * g.w * g.oh * g.ow > 0
        && sizes.iter().all(|&v| fits(v))
        && fits(2 * items + 2 * DWL_THREADS)
        && fits(g.stride.0 * g.oh + g.kh * g.dilation.0 + g.padding.0)
        && fits(g.stride.1 * g.ow + g.kw * g.dilation.1 + g.padding.1 + 8)
        && fits(g.c * g.kh * g.kw)
}

/// The launch of one phase on a device of `sms` multiprocessors, V = `lanes` channels per thread (1, or
/// 16 bytes' worth), or None when [`dwl_fits`] refuses the conv.
///
/// A block: bx = min(C / V, 32) threads along the channel vectors, 256 / bx along the items. Grid: enough
/// blocks along the channels to cover them; along the items, for the forward and dx, at most about
/// [`DWL_BLOCKS_PER_SM`] blocks a multiprocessor in all (threads then walk several items, one set of weight
/// taps in registers), and for the weight gradient enough that no thread walks more than [`DWL_SUM_ITEMS`]
/// (one row of partials per block row; `dw_reduce` adds them in order).
fn dwl_plan(g: &Conv2dGeom, phase: DwlPhase, lanes: usize, sms: usize) -> Option<DwlPlan> {
    if !dwl_fits(g) || lanes == 0 || !g.c.is_multiple_of(lanes) {
        return None;
    }
    let kernel = DwKernel::of(g);
    let (instance, tw) = match kernel {
        DwKernel::K3S1 => ("3x3s1", 8),
        DwKernel::K3S2 => ("3x3s2", 4),
        DwKernel::Any => ("any", 4),
    };
    let (phase_name, rows, width) = match phase {
        DwlPhase::Forward => ("fwd", g.oh, g.ow),
        DwlPhase::InputGrad => ("dx", g.h, g.w),
        DwlPhase::Sums => ("sums", g.oh, g.ow),
    };
    let strips = width.div_ceil(tw);
    let cv = g.c / lanes;
    let bx = cv.min(32);
    let by = DWL_THREADS / bx;
    let gx = cv.div_ceil(bx);
    let items = g.n * rows * strips;
    let gy = match phase {
        DwlPhase::Sums => items.div_ceil(by * DWL_SUM_ITEMS),
        _ => items.div_ceil(by).min((DWL_BLOCKS_PER_SM * sms / gx).max(1)),
    }
    .max(1);
    let blocks = gx * gy;
    if i32::try_from(blocks).is_err() {
        return None;
    }
    let i = |v: usize| v as i32;
    let tile = DwlTile {
        n: i(g.n),
        c: i(g.c),
        h: i(g.h),
        w: i(g.w),
        oh: i(g.oh),
        ow: i(g.ow),
        kh: i(g.kh),
        kw: i(g.kw),
        sh: i(g.stride.0),
        sw: i(g.stride.1),
        ph: i(g.padding.0),
        pw: i(g.padding.1),
        dh: i(g.dilation.0),
        dw: i(g.dilation.1),
        cv: i(cv),
        bx: i(bx),
        gx: i(gx),
        gy: i(gy),
        rows: i(rows),
        strips: i(strips),
    };
    let threads = bx * by;
    let shared = if phase == DwlPhase::Sums { threads * lanes * std::mem::size_of::<f64>() } else { 0 };
    let width_name = if lanes > 1 { "vec" } else { "one" };
    Some(DwlPlan { name: format!("dwl_{phase_name}_{instance}_{width_name}"), tile, blocks, threads, shared })
}

/// Whether a depthwise conv of a channels-last input runs in that layout on CUDA ([`conv2d_nhwc`]).
pub(super) fn channels_last_supported(g: &Conv2dGeom) -> bool {
    dwl_fits(g)
}

/// Launches a channels-last depthwise kernel by its plan.
///
/// # Safety
/// As [`crate::cuda::launch`].
unsafe fn launch_dwl(op: &'static str, args: LaunchArgs<'_>, plan: &DwlPlan) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { launch_1d(op, args, plan.blocks, plan.threads, plan.shared) }
}

/// A channels-last view's elements (memory (N, H, W, C) from its offset) as a range of its buffer, and whether
/// that range starts 16-byte aligned.
fn channels_last_elements<'a, T: Float>(op: &'static str, (s, layout): View<'a>) -> Result<(CudaView<'a, T>, bool)> {
    if !crate::util::is_channels_last(layout) {
        return Err(Error::invalid(op, "internal: kernel input is not channels-last", layout.shape()));
    }
    let (start, n) = (layout.offset(), layout.numel());
    let whole = s.slice::<T>()?;
    let address = engine::cuda::vector::address(whole, s.device().stream()) + (start * T::DTYPE.size_in_bytes()) as u64;
    let view = whole
        .try_slice(start..start + n)
        .ok_or_else(|| Error::invalid(op, "internal: view exceeds its storage", layout.shape()))?;
    Ok((view, address.is_multiple_of(16)))
}

/// V for a launch whose channels-last operands are `aligned`: 16 bytes of T when C allows it and every operand
/// starts aligned (new buffers do), else 1.
fn dwl_lanes<T: Float>(g: &Conv2dGeom, aligned: &[bool]) -> usize {
    let v = 16 / T::DTYPE.size_in_bytes();
    if g.c.is_multiple_of(v) && aligned.iter().all(|&a| a) {
        v
    } else {
        1
    }
}

/// Depthwise conv2d of a channels-last x (memory (N, H, W, C)): y (N, OH, OW, C) row-major, the memory of a
/// channels-last (N, C, OH, OW) view. [`channels_last_supported`] must hold. `epi` is what the kernel does to
/// each output as it stores it: nothing, x + conv2d(x) (the output in x's shape), or an activation
/// ([`epilogue_code`] says which it can do).
pub(super) fn conv2d_nhwc(x: View, w: View, bias: Option<View>, g: &Conv2dGeom, epi: Epilogue) -> Result<CudaStorage> {
    let mut all = vec![x.0, w.0];
    all.extend(bias.map(|b| b.0));
    crate::util::same_cuda_dtypes("conv2d", &all)?;
    by_dtype!(x.0.dtype(), depthwise_nhwc_forward(x, w, bias, g, epi))
}

/// The forward kernels' `epi` (DWL_EPI_* in conv.cu) for an epilogue, None for an activation they lack.
pub(super) fn epilogue_code(epi: Epilogue) -> Option<i32> {
    match epi {
        Epilogue::Plain => Some(0),
        Epilogue::Residual => Some(1),
        Epilogue::Act(Unary::Relu) => Some(2),
        Epilogue::Act(Unary::Silu) => Some(3),
        Epilogue::Act(Unary::Gelu) => Some(4),
        Epilogue::Act(_) => None,
    }
}

/// `residual` for a kernel, refused unless the output has the input's shape.
fn residual_flag(op: &'static str, g: &Conv2dGeom, residual: bool) -> Result<i32> {
    if residual && (g.oh, g.ow, g.o) != (g.h, g.w, g.c) {
        return Err(Error::invalid(
            op,
            "internal: a residual conv's output must have its input's shape",
            &[g.n, g.c, g.h, g.w],
        ));
    }
    Ok(i32::from(residual))
}

fn depthwise_nhwc_forward<T: Float>(
    x: View,
    w: View,
    bias: Option<View>,
    g: &Conv2dGeom,
    epi: Epilogue,
) -> Result<CudaStorage> {
    const OP: &str = "conv2d";
    let dev = x.0.device();
    let (xv, x_aligned) = channels_last_elements::<T>(OP, x)?;
    let wv = elements::<T>(OP, w)?;
    let (bv, lb, has_bias) = optional(OP, bias, &xv)?;
    let lanes = dwl_lanes::<T>(g, &[x_aligned]);
    let sms = dev.multiprocessor_count() as usize;
    let plan = dwl_plan(g, DwlPhase::Forward, lanes, sms)
        .ok_or_else(|| Error::invalid(OP, "internal: no channels-last plan", &[g.n, g.c, g.h, g.w]))?;
    residual_flag(OP, g, epi == Epilogue::Residual)?;
    let no_code = || Error::invalid(OP, "internal: no such epilogue in the kernels", &[g.n, g.c, g.h, g.w]);
    let code = epilogue_code(epi).ok_or_else(no_code)?;
    let y = dev.alloc::<T>(g.n * g.oh * g.ow * g.c)?;
    let f = function::<T>(dev, &MODULE, &plan.name)?;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&xv).arg(&wv).arg(&bv).arg(&lb).arg(&has_bias).arg(&code).arg(y.as_slice()).arg(&plan.tile);
    // SAFETY: dwl_fwd_<instance>_<width>_<T>(const T* x, const T* w, const T* bias, Strided lb, int has_bias,
    // int epi, T* y, DwlTile p) reads x[0..N H W C) (the channels-last view's elements, `xv`; with the residual
    // epilogue x at y's own indices, inside since OH OW = H W), w[0..C kh kw) (contiguous, the op checked the shapes,
    // which p repeats) and bias through lb (checked by `strided`, read only when has_bias), and writes
    // y[0..N OH OW C), which `y` holds. Threads take channel vectors below p.cv and items below
    // N OH strips only; with V > 1 (the _vec kernels) C is a multiple of V and x starts 16-byte aligned
    // (`dwl_lanes`), y being a new buffer, so every 16-byte access is aligned.
    unsafe { launch_dwl(OP, args, &plan)? };
    CudaStorage::from_slice(dev, y)
}

/// The gradients of [`conv2d_nhwc`], with x and gy channels-last: dx (N, H, W, C) row-major (a channels-last
/// view's memory), the weight and bias gradients in their own shapes. With `residual`, dx = gy + the conv's
/// dx (the gradient of x + conv2d(x)).
pub(super) fn conv2d_nhwc_backward(
    x: View,
    w: View,
    gy: View,
    g: &Conv2dGeom,
    needs: Needs,
    residual: bool,
) -> Result<Grads<Storage>> {
    crate::util::same_cuda_dtypes("conv2d_backward", &[x.0, w.0, gy.0])?;
    let grads = by_dtype!(x.0.dtype(), depthwise_nhwc_backward(x, w, gy, g, needs, residual))?;
    let s = |v: Option<CudaStorage>| v.map(Storage::Cuda);
    Ok(Grads { x: s(grads.x), w: s(grads.w), bias: s(grads.bias) })
}

fn depthwise_nhwc_backward<T: Float>(
    x: View,
    w: View,
    gy: View,
    g: &Conv2dGeom,
    needs: Needs,
    residual: bool,
) -> Result<Grads<CudaStorage>> {
    const OP: &str = "conv2d_backward";
    let residual = residual_flag(OP, g, residual)?;
    let dev = x.0.device();
    let sms = dev.multiprocessor_count() as usize;
    let no_plan = || Error::invalid(OP, "internal: no channels-last plan", &[g.n, g.c, g.h, g.w]);
    let (xv, x_aligned) = channels_last_elements::<T>(OP, x)?;
    let (gv, g_aligned) = channels_last_elements::<T>(OP, gy)?;
    let wv = elements::<T>(OP, w)?;
    let dx = if needs.x {
        let plan = dwl_plan(g, DwlPhase::InputGrad, dwl_lanes::<T>(g, &[g_aligned]), sms).ok_or_else(no_plan)?;
        let dx = dev.alloc::<T>(g.n * g.h * g.w * g.c)?;
        let f = function::<T>(dev, &MODULE, &plan.name)?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(&gv).arg(&wv).arg(dx.as_slice()).arg(&residual).arg(&plan.tile);
        // SAFETY: dwl_dx_<instance>_<width>_<T>(const T* g, const T* w, T* dx, int residual, DwlTile p) reads
        // g[0..N OH OW C) (the channels-last view's elements; with residual also at dx's own indices, inside since
        // OH OW = H W) and w[0..C kh kw), and writes dx[0..N H W C), which `dx` holds;
        // threads take channel vectors below p.cv and items below N H strips only. With V > 1, g starts aligned
        // and C is a multiple of V (`dwl_lanes`); dx is a new buffer.
        unsafe { launch_dwl(OP, args, &plan)? };
        Some(CudaStorage::from_slice(dev, dx)?)
    } else {
        None
    };
    if !(needs.w || needs.bias) {
        return Ok(Grads { x: dx, w: None, bias: None });
    }
    let taps = g.kh * g.kw;
    let plan = dwl_plan(g, DwlPhase::Sums, dwl_lanes::<T>(g, &[x_aligned, g_aligned]), sms).ok_or_else(no_plan)?;
    let per = plan.tile.gy as usize;
    let part = dev.alloc::<f64>(g.c * per * (taps + 1))?;
    let f = function::<T>(dev, &MODULE, &plan.name)?;
    let need_w = i32::from(needs.w);
    // Without the weight gradient x is never read: g's buffer stands in.
    let x_arg = if needs.w { xv.slice(..) } else { gv.slice(..) };
    let part_arg = part.as_slice().as_view();
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&x_arg).arg(&gv).arg(&part_arg).arg(&plan.tile).arg(&need_w);
    // SAFETY: dwl_sums_<instance>_<width>_<T>(const T* x, const T* g, double* part, DwlTile p, int need_w) reads
    // x[0..N H W C) only when need_w (then `x_arg` is x's elements) and g[0..N OH OW C), and writes
    // part[(c gy + row) (taps + 1) + q] for c < C, row < gy = p.gy, q <= taps: inside the C gy (taps + 1)
    // doubles `part` holds. Its scratch is threads x V doubles of dynamic shared memory, as the plan gives.
    // Alignment as for dx, with x too when V > 1.
    unsafe { launch_dwl(OP, args, &plan)? };
    // The launch above wrote the C per rows of the partials (entries q < taps only when need_w, the only ones
    // read then).
    let (dw, bias) = reduce_partials::<T>(dev, &part_arg, g.c, per, taps, needs)?;
    Ok(Grads { x: dx, w: dw, bias })
}

/// The depthwise backwards' last step: dw (C, taps) and db (C) from `part`, `per` rows of `taps + 1` doubles
/// per channel (each row a block's sums of the taps' terms, then of the bias's), added in row order by
/// `dw_reduce` (deterministic). Only what `needs` asks for is made; neither, with no launch, when it asks for
/// neither. The caller has written `part[0..c per (taps + 1))` (the taps' entries at least when `needs.w`).
fn reduce_partials<T: Float>(
    dev: &Arc<CudaDevice>,
    part: &CudaView<'_, f64>,
    c: usize,
    per: usize,
    taps: usize,
    needs: Needs,
) -> Result<(Option<CudaStorage>, Option<CudaStorage>)> {
    const OP: &str = "conv2d_backward";
    if !(needs.w || needs.bias) {
        return Ok((None, None));
    }
    let (dw, db) = (dev.alloc::<T>(if needs.w { c * taps } else { 0 })?, dev.alloc::<T>(c)?);
    let f = function::<T>(dev, &MODULE, "dw_reduce")?;
    let [c32, per32, taps32] = [c, per, taps].map(|v| v as i32);
    let (need_w, need_b) = (i32::from(needs.w), i32::from(needs.bias));
    // Without a dw to write, db's buffer stands in (never written through that pointer then).
    let dw_arg = if needs.w { dw.as_slice().as_view() } else { db.as_slice().as_view() };
    let mut args = dev.stream().launch_builder(&f);
    args.arg(part).arg(&dw_arg).arg(db.as_slice()).arg(&c32).arg(&per32).arg(&taps32);
    args.arg(&need_w).arg(&need_b);
    // SAFETY: dw_reduce_<T>(const double* part, T* dw, T* db, int c, int per, int taps, int need_w, int need_b)
    // reads part[0..c per (taps + 1)) (written by the caller, the taps' entries read only when need_w), and
    // writes dw[0..c taps) only when need_w (then `dw` holds that many) and db[0..c), which `db` holds. One
    // warp per channel: the kernel loops over the channels past its grid.
    unsafe { launch(OP, dev, args, c * 32)? };
    let s = |v| CudaStorage::from_slice(dev, v);
    Ok((needs.w.then(|| s(dw)).transpose()?, needs.bias.then(|| s(db)).transpose()?))
}

/// Output columns (sample, pixel) and output channels of one block of conv_igemm.
const IGEMM_COLS: usize = 256;
const IGEMM_ROWS: usize = 32;

impl Conv2dGeom {
    /// Whether the forward runs as an implicit GEMM (conv_igemm: the patches gathered from x as the product
    /// needs them, no column buffer): every conv but a pointwise one (cuBLAS reads x itself as the columns
    /// then) and but in TF32 mode (cuBLAS's tensor cores outrun FFMA), when its sizes index in the kernel's
    /// ints (with room for the grid) and fit the grid.
    fn implicit_gemm(&self) -> bool {
        let limit = i32::MAX as usize - (1 << 24);
        let (_, og, k, p) = self.gemm_dims();
        !self.is_pointwise()
            && !engine::cuda::tf32_enabled()
            && self.n * p < limit
            && self.c * self.h * self.w < limit
            && k < limit
            && og.div_ceil(IGEMM_ROWS) <= 65535
            && self.groups <= 65535
            && (self.n * p).div_ceil(IGEMM_COLS) <= i32::MAX as usize
    }

    /// The conv whose forward is this one's dx, when conv_igemm can run it: for stride 1, dilation 1 and one
    /// group, dx[n, c] = sum_o conv(g[n, o], w[o, c] flipped in both directions) with padding k - 1 - p on
    /// each side (needs p < k), i.e. a conv of g (N, O, OH, OW) with the weight wt[c, o, i, j] =
    /// w[o, c, kh - 1 - i, kw - 1 - j] (conv.cu `flip_weight`), answering (N, C, H, W).
    fn input_grad_conv(&self) -> Option<Conv2dGeom> {
        let plain = self.stride == (1, 1) && self.dilation == (1, 1) && self.groups == 1 && !self.is_pointwise();
        if !plain || self.padding.0 >= self.kh || self.padding.1 >= self.kw {
            return None;
        }
        let t = Conv2dGeom {
            n: self.n,
            c: self.o,
            h: self.oh,
            w: self.ow,
            o: self.c,
            kh: self.kh,
            kw: self.kw,
            stride: (1, 1),
            padding: (self.kh - 1 - self.padding.0, self.kw - 1 - self.padding.1),
            dilation: (1, 1),
            groups: 1,
            oh: self.h,
            ow: self.w,
        };
        // OH = H + 2 ph - kh + 1, so t's output is H x W: checked, not assumed.
        let same =
            self.oh + 2 * t.padding.0 + 1 == self.h + self.kh && self.ow + 2 * t.padding.1 + 1 == self.w + self.kw;
        (same && t.implicit_gemm()).then_some(t)
    }

    /// (C/G, O/G, K = C/G kh kw, P = OH OW): the sizes of the per-group products.
    fn gemm_dims(&self) -> (usize, usize, usize, usize) {
        let cg = self.c / self.groups;
        (cg, self.o / self.groups, cg * self.kh * self.kw, self.oh * self.ow)
    }

    /// Samples per chunk: as many as keep the column buffer within [`COLS_BUDGET`], at least one.
    fn chunk(&self) -> usize {
        let per_sample = self.c * self.kh * self.kw * self.oh * self.ow;
        (COLS_BUDGET / per_sample.max(1)).clamp(1, self.n.max(1))
    }
}

/// Where matrix (s, q) of a product's operand starts: `base + s per_sample + q per_group` elements into its
/// buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    base: usize,
    per_sample: usize,
    per_group: usize,
}

/// One cuBLAS call: the config and where its first A, B and C matrices start in their buffers.
#[derive(Debug, Clone, PartialEq)]
struct GemmCall {
    cfg: GemmConfig,
    a: usize,
    b: usize,
    c: usize,
}

/// The calls computing `C_sq = alpha op(A_sq) op(B_sq) + beta C_sq` for s < samples, q < groups, with
/// `shape` giving m, n, k, the transposes, leading dimensions, alpha and beta. One strided-batched call per
/// group batched over the samples, or per sample batched over the groups, whichever makes fewer calls.
fn grid_calls(shape: GemmConfig, [a, b, c]: [Place; 3], samples: usize, groups: usize) -> Vec<GemmCall> {
    let by_group = groups <= samples;
    let (outer, batch) = if by_group { (groups, samples) } else { (samples, groups) };
    // (first matrix, stride between the batch's matrices) of an operand in call i.
    let at = |p: Place, i: usize| {
        if by_group {
            (p.base + i * p.per_group, p.per_sample)
        } else {
            (p.base + i * p.per_sample, p.per_group)
        }
    };
    (0..if batch == 0 { 0 } else { outer })
        .map(|i| {
            let ((a0, sa), (b0, sb), (c0, sc)) = (at(a, i), at(b, i), at(c, i));
            let cfg = GemmConfig { batch, stride_a: sa, stride_b: sb, stride_c: sc, ..shape };
            GemmCall { cfg, a: a0, b: b0, c: c0 }
        })
        .collect()
}

/// The three products of the dense path (see the module notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Product {
    /// y = W cols (onto the bias when beta is 1).
    Forward,
    /// dcols = W^T g (dx itself for a pointwise conv).
    InputGrad,
    /// part = g cols^T, one (O, K) partial per sample of the chunk.
    WeightGrad,
}

/// The calls of `product` for samples n0 .. n0 + nb. Operands: the weight (O, K) from 0; cols and dcols
/// (nb, C kh kw, P) from 0, or for a pointwise conv x and dx (N, C, P) at sample n0; y and g (N, O, P) at
/// sample n0; the partials (nb, O, K) from 0. Returned in (A, B, C) order as the product names them.
fn conv_calls(g: &Conv2dGeom, product: Product, n0: usize, nb: usize, beta: f64) -> Vec<GemmCall> {
    let (cg, og, k, p) = g.gemm_dims();
    let weight = Place { base: 0, per_sample: 0, per_group: og * k };
    let cols = if g.is_pointwise() {
        Place { base: n0 * g.c * p, per_sample: g.c * p, per_group: cg * p }
    } else {
        Place { base: 0, per_sample: g.c * g.kh * g.kw * p, per_group: k * p }
    };
    let out = Place { base: n0 * g.o * p, per_sample: g.o * p, per_group: og * p };
    let (shape, places) = match product {
        Product::Forward => (GemmConfig::contiguous(1, og, p, k, false, false), [weight, cols, out]),
        Product::InputGrad => (GemmConfig::contiguous(1, k, p, og, true, false), [weight, out, cols]),
        Product::WeightGrad => {
            let part = Place { base: 0, per_sample: g.o * k, per_group: og * k };
            (GemmConfig::contiguous(1, og, k, p, false, true), [out, cols, part])
        }
    };
    grid_calls(GemmConfig { beta, ..shape }, places, nb, g.groups)
}

/// Enqueues `calls` over the buffers a, b, c (each call's operands start at its offsets).
fn run_calls<T: Float>(
    dev: &CudaDevice,
    calls: &[GemmCall],
    a: &CudaView<T>,
    b: &CudaView<T>,
    c: &mut CudaViewMut<T>,
) -> Result<()> {
    let outside = |what: &str, at: usize| Error::Cuda {
        op: "conv2d",
        msg: format!("internal: GEMM operand {what} starts at {at}, outside its buffer"),
    };
    for call in calls {
        // gemm_strided_batched bounds-checks every matrix of the call against these views.
        let av = a.try_slice(call.a..).ok_or_else(|| outside("A", call.a))?;
        let bv = b.try_slice(call.b..).ok_or_else(|| outside("B", call.b))?;
        let mut cv = c.try_slice_mut(call.c..).ok_or_else(|| outside("C", call.c))?;
        dev.gemm_strided_batched::<T>(&call.cfg, &av, &bv, &mut cv)?;
    }
    Ok(())
}

/// Whether a chunk of `nb` samples indexes in the ints of im2col_fast and col2im_fast: its cols (counted in
/// whole groups of 4 positions) and its dx, with room for a grid-stride step (at most 2^24 threads) past the end.
fn fits_fast_kernels(g: &Conv2dGeom, nb: usize) -> bool {
    let limit = i32::MAX as usize - (1 << 24);
    let cols = nb * g.c * g.kh * g.kw * (g.oh * g.ow).next_multiple_of(4);
    cols < limit && nb * g.c * g.h * g.w < limit
}

/// cols (nb, C kh kw, OH OW) of samples n0 .. n0 + nb of x.
fn im2col<T: Float>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    cols: &CudaView<T>,
    g: &Conv2dGeom,
    p: &Conv2dParams,
    n0: usize,
    nb: usize,
) -> Result<()> {
    const OP: &str = "conv2d_im2col";
    let n = nb * g.c * g.kh * g.kw * g.oh * g.ow;
    let n0_64 = to_i64(OP, &[nb], [n0])?[0];
    if fits_fast_kernels(g, nb) {
        let f = function::<T>(dev, &MODULE, "im2col_fast")?;
        let nb32 = nb as i32;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(x).arg(cols).arg(p).arg(&n0_64).arg(&nb32);
        // SAFETY: im2col_fast_<T>(const T* x, T* cols, Conv2dParams p, long long n0, int nb) reads x at samples
        // n0 .. n0 + nb <= N of the contiguous (N, C, H, W) view, only at in-range (ih, iw), and writes
        // cols[0..nb C kh kw OH OW), which the chunk's buffer holds (sized for the largest chunk; 16-byte stores
        // only when OH OW is a multiple of 4, so at 16-byte offsets into the 256-byte aligned buffer). Its int
        // indices fit (`fits_fast_kernels`). One thread per 4 positions of a row.
        unsafe { launch(OP, dev, args, n.div_ceil(4)) }
    } else {
        let f = function::<T>(dev, &MODULE, "im2col")?;
        let nb64 = to_i64(OP, &[nb], [nb])?[0];
        let mut args = dev.stream().launch_builder(&f);
        args.arg(x).arg(cols).arg(p).arg(&n0_64).arg(&nb64);
        // SAFETY: im2col_<T>(const T* x, T* cols, Conv2dParams p, long long n0, long long nb) reads x at
        // samples n0 .. n0 + nb <= N of the contiguous (N, C, H, W) view, only at in-range (ih, iw), and writes
        // cols[0..nb C kh kw OH OW), which the chunk's buffer holds (sized for the largest chunk).
        unsafe { launch(OP, dev, args, n) }
    }
}

fn dense_forward<T: Float>(x: View, w: View, bias: Option<View>, g: &Conv2dGeom) -> Result<CudaStorage> {
    const OP: &str = "conv2d";
    let dev = x.0.device();
    let (_, _, k, p) = g.gemm_dims();
    let n_out = g.n * g.o * p;
    let mut y = CudaStorage::alloc(dev, n_out, T::DTYPE)?;
    if n_out == 0 {
        return Ok(y);
    }
    let (xv, wv) = (elements::<T>(OP, x)?, elements::<T>(OP, w)?);
    if k > 0 && g.implicit_gemm() {
        let b = optional(OP, bias, &xv)?;
        implicit_gemm(OP, dev, &xv, &wv, b, g, &mut y.slice_mut::<T>()?)?;
        return Ok(y);
    }
    if let Some((bs, bl)) = bias {
        // y starts at the bias and the products add onto it (beta = 1), as the CPU's accumulating GEMM.
        let lb = bs.strided(OP, bl)?;
        let f = function::<T>(dev, &MODULE, "bias_fill")?;
        let [n64, o64, p64] = to_i64(OP, &[g.n, g.o, p], [n_out, g.o, p])?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(bs.slice::<T>()?).arg(&lb).arg(y.slice::<T>()?).arg(&n64).arg(&o64).arg(&p64);
        // SAFETY: bias_fill_<T>(const T* bias, Strided lb, T* y, long long total, long long o, long long per)
        // reads bias at lb-offsets of indices below o (checked against its buffer by `strided`; the bias has o
        // elements) and writes y[0..total), which `y` holds.
        unsafe { launch(OP, dev, args, n_out)? };
    } else if k == 0 || g.n == 0 {
        // No input channels: every output is an empty sum.
        y.fill(0.0)?;
    }
    if k == 0 || g.n == 0 {
        return Ok(y);
    }
    let params = Conv2dParams::new(OP, g)?;
    let nb = g.chunk();
    let cols = if g.is_pointwise() { None } else { Some(dev.alloc::<T>(nb * g.c * g.kh * g.kw * p)?) };
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    let mut yv = y.slice_mut::<T>()?;
    for n0 in (0..g.n).step_by(nb) {
        let nbc = nb.min(g.n - n0);
        let source = match &cols {
            Some(c) => {
                im2col(dev, &xv, &c.view(), g, &params, n0, nbc)?;
                c.view()
            }
            None => xv.slice(..),
        };
        run_calls(dev, &conv_calls(g, Product::Forward, n0, nbc, beta), &wv, &source, &mut yv)?;
    }
    Ok(y)
}

/// Enqueues conv_igemm: y = conv(x, w) + bias for the contiguous NCHW x and weight of `g`, whose sizes pass
/// [`Conv2dGeom::implicit_gemm`] (y holds N O OH OW elements).
fn implicit_gemm<T: Float>(
    op: &'static str,
    dev: &CudaDevice,
    x: &CudaView<T>,
    w: &CudaView<T>,
    (bv, lb, has_bias): (CudaView<T>, Strided, i32),
    g: &Conv2dGeom,
    y: &mut CudaViewMut<T>,
) -> Result<()> {
    let p = g.oh * g.ow;
    let (og, cols) = (g.o / g.groups, g.n * p);
    if x.len() < g.n * g.c * g.h * g.w || w.len() < g.o * (g.c / g.groups) * g.kh * g.kw || y.len() < g.n * g.o * p {
        return Err(Error::Cuda { op, msg: "internal: conv_igemm operand shorter than its geometry".into() });
    }
    // Tap-major k where a group's channels fill whole steps of 8 (conv.cu): one address a step, not one a value.
    let name = if (g.c / g.groups).is_multiple_of(8) { "conv_igemm_tap" } else { "conv_igemm" };
    let f = function::<T>(dev, &MODULE, name)?;
    let params = Conv2dParams::new(op, g)?;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(x).arg(w).arg(&bv).arg(&lb).arg(&has_bias).arg(y).arg(&params);
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(IGEMM_COLS) as u32, og.div_ceil(IGEMM_ROWS) as u32, g.groups as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: conv_igemm[_tap]_<T>(const T* x, const T* w, const T* bias, Strided lb, int has_bias, T* y,
    // Conv2dParams p) reads x[0..N C H W) and w[0..O C/G kh kw) (checked above against the views' lengths),
    // only at in-range pixels and k < C/G kh kw, bias through lb (checked by `strided`, read only when
    // has_bias), and writes y[0..N O OH OW), which `y` holds (checked above), with 16-byte stores only when
    // OH OW is a multiple of 4 (y starts a fresh 256-byte aligned buffer). Block (bx, by, q) covers columns
    // below N OH OW and channels below O/G of group q < G only; its int indices fit (`implicit_gemm`, which
    // the callers checked). 256 threads, as its tiles assume.
    unsafe { args.launch(cfg) }.map_err(|e| Error::Cuda { op, msg: format!("{e:?}") })?;
    Ok(())
}

/// The gradients of a dense or grouped conv2d, each only where needed.
fn dense_backward<T: Float>(x: View, w: View, gy: View, g: &Conv2dGeom, needs: Needs) -> Result<Grads<CudaStorage>> {
    const OP: &str = "conv2d_backward";
    let dev = x.0.device();
    let (xv, wv, gv) = (elements::<T>(OP, x)?, elements::<T>(OP, w)?, elements::<T>(OP, gy)?);
    let (_, _, k, p) = g.gemm_dims();
    let params = Conv2dParams::new(OP, g)?;
    let nb = g.chunk();
    let cols_len = nb * g.c * g.kh * g.kw * p;
    // Nothing to multiply: no samples or no input channels (the gradients are then all zeros or empty).
    let empty = g.n == 0 || k == 0;

    let dx = if needs.x {
        let mut dx = CudaStorage::alloc(dev, g.n * g.c * g.h * g.w, T::DTYPE)?;
        if !empty && g.is_pointwise() {
            let mut dxv = dx.slice_mut::<T>()?;
            for n0 in (0..g.n).step_by(nb) {
                let nbc = nb.min(g.n - n0);
                run_calls(dev, &conv_calls(g, Product::InputGrad, n0, nbc, 0.0), &wv, &gv, &mut dxv)?;
            }
        } else if let Some(t) = g.input_grad_conv().filter(|_| !empty) {
            // dx is the stride-1 conv of g with the flipped, transposed weight: conv_igemm, no column buffer.
            let wt = dev.alloc::<T>(g.o * k)?;
            let f = function::<T>(dev, &MODULE, "flip_weight")?;
            let [o64, c64, taps64] = to_i64(OP, &[g.o, g.c], [g.o, g.c, g.kh * g.kw])?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&wv).arg(wt.as_slice()).arg(&o64).arg(&c64).arg(&taps64);
            // SAFETY: flip_weight_<T>(const T* w, T* wt, long long o, long long c, long long taps) reads
            // w[0..o c taps) (the contiguous (O, C, kh, kw) weight of a one-group conv) and writes
            // wt[0..o c taps), which `wt` holds (O K = O C kh kw elements).
            unsafe { launch(OP, dev, args, g.o * k)? };
            let none = optional(OP, None, &gv)?;
            implicit_gemm(OP, dev, &gv, &wt.view(), none, &t, &mut dx.slice_mut::<T>()?)?;
        } else if !empty {
            let mut dcols = dev.alloc::<T>(cols_len)?;
            for n0 in (0..g.n).step_by(nb) {
                let nbc = nb.min(g.n - n0);
                run_calls(dev, &conv_calls(g, Product::InputGrad, n0, nbc, 0.0), &wv, &gv, &mut dcols.view_mut())?;
                let n = nbc * g.c * g.h * g.w;
                let n0_64 = to_i64(OP, &[nbc], [n0])?[0];
                if fits_fast_kernels(g, nbc) {
                    let f = function::<T>(dev, &MODULE, "col2im_fast")?;
                    let nb32 = nbc as i32;
                    let mut args = dev.stream().launch_builder(&f);
                    args.arg(dcols.as_slice()).arg(dx.slice::<T>()?).arg(&params).arg(&n0_64).arg(&nb32);
                    // SAFETY: col2im_fast_<T>(const T* dcols, T* dx, Conv2dParams p, long long n0, int nb) reads
                    // dcols[0..nb C kh kw OH OW) (the buffer holds the largest chunk) and writes dx at samples
                    // n0 .. n0 + nb <= N of the (N, C, H, W) buffer `dx`; its int indices fit
                    // (`fits_fast_kernels`).
                    unsafe { launch(OP, dev, args, n)? };
                } else {
                    let f = function::<T>(dev, &MODULE, "col2im")?;
                    let nb64 = to_i64(OP, &[nbc], [nbc])?[0];
                    let mut args = dev.stream().launch_builder(&f);
                    args.arg(dcols.as_slice()).arg(dx.slice::<T>()?).arg(&params).arg(&n0_64).arg(&nb64);
                    // SAFETY: col2im_<T>(const T* dcols, T* dx, Conv2dParams p, long long n0, long long nb)
                    // reads dcols[0..nb C kh kw OH OW) (the buffer holds the largest chunk) and writes dx at
                    // samples n0 .. n0 + nb <= N of the (N, C, H, W) buffer `dx`.
                    unsafe { launch(OP, dev, args, n)? };
                }
            }
        }
        Some(dx)
    } else {
        None
    };

    let dw = if needs.w {
        let len = g.o * k;
        let mut dw = CudaStorage::alloc(dev, len, T::DTYPE)?;
        if empty {
            dw.fill(0.0)?;
        } else {
            let mut part = dev.alloc::<T>(nb * len)?;
            let cols = if g.is_pointwise() { None } else { Some(dev.alloc::<T>(cols_len)?) };
            let sum = function::<T>(dev, &MODULE, "sum_partials")?;
            for n0 in (0..g.n).step_by(nb) {
                let nbc = nb.min(g.n - n0);
                let source = match &cols {
                    Some(c) => {
                        im2col(dev, &xv, &c.view(), g, &params, n0, nbc)?;
                        c.view()
                    }
                    None => xv.slice(..),
                };
                run_calls(dev, &conv_calls(g, Product::WeightGrad, n0, nbc, 0.0), &gv, &source, &mut part.view_mut())?;
                let [len64, nb64] = to_i64(OP, &[len], [len, nbc])?;
                let accumulate = i32::from(n0 > 0);
                let mut args = dev.stream().launch_builder(&sum);
                args.arg(part.as_slice()).arg(dw.slice::<T>()?).arg(&len64).arg(&nb64).arg(&accumulate);
                // SAFETY: sum_partials_<T>(const T* part, T* out, long long len, long long nb, int accumulate)
                // reads part[0..nb len) (the buffer holds the largest chunk's partials) and reads and writes
                // out[0..len), which `dw` holds.
                unsafe { launch(OP, dev, args, len)? };
            }
        }
        Some(dw)
    } else {
        None
    };
    let bias = needs.bias.then(|| channel_sum(OP, dev, &gv, [g.n, g.o, p])).transpose()?;
    Ok(Grads { x: dx, w: dw, bias })
}

// ---- causal conv1d -----------------------------------------------------------------------------------------

pub(super) fn causal_conv1d(x: View, w: View, bias: Option<View>, g: &Conv1dGeom) -> Result<CudaStorage> {
    fn run<T: Float>(x: View, w: View, bias: Option<View>, g: &Conv1dGeom) -> Result<CudaStorage> {
        const OP: &str = "causal_conv1d";
        let dev = x.0.device();
        let n = g.b * g.c * g.l;
        let y = dev.alloc::<T>(n)?;
        if n > 0 {
            let (xv, wv) = (elements::<T>(OP, x)?, elements::<T>(OP, w)?);
            let (bv, lb, has_bias) = optional(OP, bias, &xv)?;
            let f = function::<T>(dev, &MODULE, "cc1d_fwd")?;
            let p = Conv1dParams::new(OP, g)?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv).arg(&wv).arg(&bv).arg(&lb).arg(&has_bias).arg(y.as_slice()).arg(&p);
            // SAFETY: cc1d_fwd_<T>(const T* x, const T* w, const T* bias, Strided lb, int has_bias, T* y,
            // Conv1dParams p) reads x[0..B C L) and w[0..C k), the views' lengths, bias through lb (checked by
            // `strided`, read only when has_bias), and writes y[0..B C L), which `y` holds.
            unsafe { launch(OP, dev, args, n)? };
        }
        CudaStorage::from_slice(dev, y)
    }
    let mut all = vec![x.0, w.0];
    all.extend(bias.map(|b| b.0));
    crate::util::same_cuda_dtypes("causal_conv1d", &all)?;
    by_dtype!(x.0.dtype(), run(x, w, bias, g))
}

pub(super) fn causal_conv1d_backward(
    x: View,
    w: View,
    gy: View,
    g: &Conv1dGeom,
    needs: Needs,
) -> Result<Grads<Storage>> {
    fn run<T: Float>(x: View, w: View, gy: View, g: &Conv1dGeom, needs: Needs) -> Result<Grads<Storage>> {
        const OP: &str = "causal_conv1d_backward";
        let dev = x.0.device();
        let (xv, wv, gv) = (elements::<T>(OP, x)?, elements::<T>(OP, w)?, elements::<T>(OP, gy)?);
        let p = Conv1dParams::new(OP, g)?;
        let n = g.b * g.c * g.l;
        let dx = if needs.x {
            let dx = dev.alloc::<T>(n)?;
            if n > 0 {
                let f = function::<T>(dev, &MODULE, "cc1d_bwd_dx")?;
                let mut args = dev.stream().launch_builder(&f);
                args.arg(&gv).arg(&wv).arg(dx.as_slice()).arg(&p);
                // SAFETY: cc1d_bwd_dx_<T>(const T* g, const T* w, T* dx, Conv1dParams p) reads g[0..B C L) and
                // w[0..C k), the views' lengths, and writes dx[0..B C L), which `dx` holds.
                unsafe { launch(OP, dev, args, n)? };
            }
            Some(Storage::Cuda(CudaStorage::from_slice(dev, dx)?))
        } else {
            None
        };
        let dw = if needs.w {
            let dw = dev.alloc::<T>(g.c * g.k)?;
            if g.c * g.k > 0 {
                let f = function::<T>(dev, &MODULE, "cc1d_bwd_w")?;
                let mut args = dev.stream().launch_builder(&f);
                args.arg(&xv).arg(&gv).arg(dw.as_slice()).arg(&p);
                // SAFETY: cc1d_bwd_w_<T>(const T* x, const T* g, T* dw, Conv1dParams p) reads x and g at
                // [0..B C L), the views' lengths, and writes dw[0..C k), which `dw` holds.
                unsafe { launch_blocks(OP, args, (g.c, g.k))? };
            }
            Some(Storage::Cuda(CudaStorage::from_slice(dev, dw)?))
        } else {
            None
        };
        let bias = needs.bias.then(|| channel_sum(OP, dev, &gv, [g.b, g.c, g.l])).transpose()?.map(Storage::Cuda);
        Ok(Grads { x: dx, w: dw, bias })
    }
    crate::util::same_cuda_dtypes("causal_conv1d_backward", &[x.0, w.0, gy.0])?;
    by_dtype!(x.0.dtype(), run(x, w, gy, g, needs))
}

#[cfg(test)]
mod tests {
    //! The dense path's products on the host: a loop with the semantics [`GemmConfig`] documents stands in for
    //! cuBLAS, and im2col / col2im / the partial sums are the definitions conv.cu implements, so every call's
    //! offsets, strides and transposes are checked against the CPU conv without a GPU.

    use engine::{DType, Tensor};

    use super::*;
    use crate::testing::{assert_close, randn};

    /// `C_b = alpha op(A_b) op(B_b) + beta C_b` as GemmConfig defines it, A, B, C read from their offsets on;
    /// panics (failing the test) on any access outside the buffers, on a leading dimension cuBLAS would refuse
    /// and on output matrices that overlap.
    fn host_gemm(call: &GemmCall, a: &[f64], b: &[f64], c: &mut [f64]) {
        let cfg = &call.cfg;
        let stored_cols_a = if cfg.trans_a { cfg.m } else { cfg.k };
        let stored_cols_b = if cfg.trans_b { cfg.k } else { cfg.n };
        assert!(cfg.lda >= stored_cols_a && cfg.ldb >= stored_cols_b && cfg.ldc >= cfg.n, "{cfg:?}");
        assert!(cfg.batch <= 1 || cfg.stride_c >= (cfg.m - 1) * cfg.ldc + cfg.n, "overlapping outputs: {cfg:?}");
        for batch in 0..cfg.batch {
            for i in 0..cfg.m {
                for j in 0..cfg.n {
                    let mut acc = 0.0;
                    for p in 0..cfg.k {
                        let ai = if cfg.trans_a { p * cfg.lda + i } else { i * cfg.lda + p };
                        let bi = if cfg.trans_b { j * cfg.ldb + p } else { p * cfg.ldb + j };
                        acc += a[call.a + batch * cfg.stride_a + ai] * b[call.b + batch * cfg.stride_b + bi];
                    }
                    let ci = call.c + batch * cfg.stride_c + i * cfg.ldc + j;
                    c[ci] = cfg.alpha * acc + if cfg.beta == 0.0 { 0.0 } else { cfg.beta * c[ci] };
                }
            }
        }
    }

    /// im2col_impl of conv.cu: cols (nb, C, kh, kw, OH OW) of samples n0 .. n0 + nb.
    fn host_im2col(x: &[f64], g: &Conv2dGeom, n0: usize, nb: usize) -> Vec<f64> {
        let p = g.oh * g.ow;
        let mut cols = vec![0.0; nb * g.c * g.kh * g.kw * p];
        for (e, v) in cols.iter_mut().enumerate() {
            let (q, t) = (e % p, e / p);
            let (j, i, plane) = (t % g.kw, t / g.kw % g.kh, t / g.kw / g.kh);
            let ih = ((q / g.ow) * g.stride.0 + i * g.dilation.0) as isize - g.padding.0 as isize;
            let iw = ((q % g.ow) * g.stride.1 + j * g.dilation.1) as isize - g.padding.1 as isize;
            if ih >= 0 && iw >= 0 && (ih as usize) < g.h && (iw as usize) < g.w {
                *v = x[((n0 * g.c + plane) * g.h + ih as usize) * g.w + iw as usize];
            }
        }
        cols
    }

    /// col2im of conv.cu (as a scatter, its adjoint's definition): dx at samples n0 .. n0 + nb += dcols.
    fn host_col2im(dcols: &[f64], g: &Conv2dGeom, n0: usize, nb: usize, dx: &mut [f64]) {
        let p = g.oh * g.ow;
        for (e, &v) in dcols.iter().enumerate().take(nb * g.c * g.kh * g.kw * p) {
            let (q, t) = (e % p, e / p);
            let (j, i, plane) = (t % g.kw, t / g.kw % g.kh, t / g.kw / g.kh);
            let ih = ((q / g.ow) * g.stride.0 + i * g.dilation.0) as isize - g.padding.0 as isize;
            let iw = ((q % g.ow) * g.stride.1 + j * g.dilation.1) as isize - g.padding.1 as isize;
            if ih >= 0 && iw >= 0 && (ih as usize) < g.h && (iw as usize) < g.w {
                dx[((n0 * g.c + plane) * g.h + ih as usize) * g.w + iw as usize] += v;
            }
        }
    }

    /// (y, dx, dw) of the dense path run on the host in chunks of `nb` samples, y onto the bias.
    fn run_dense(x: &[f64], w: &[f64], b: &[f64], gy: &[f64], g: &Conv2dGeom, nb: usize) -> [Vec<f64>; 3] {
        let (_, _, k, p) = g.gemm_dims();
        let mut y: Vec<f64> = (0..g.n * g.o * p).map(|e| b[e / p % g.o]).collect();
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![f64::NAN; g.o * k];
        for n0 in (0..g.n).step_by(nb) {
            let nbc = nb.min(g.n - n0);
            let cols = if g.is_pointwise() { x.to_vec() } else { host_im2col(x, g, n0, nbc) };
            for call in conv_calls(g, Product::Forward, n0, nbc, 1.0) {
                host_gemm(&call, w, &cols, &mut y);
            }
            if g.is_pointwise() {
                for call in conv_calls(g, Product::InputGrad, n0, nbc, 0.0) {
                    host_gemm(&call, w, gy, &mut dx);
                }
            } else {
                let mut dcols = vec![f64::NAN; cols.len()];
                for call in conv_calls(g, Product::InputGrad, n0, nbc, 0.0) {
                    host_gemm(&call, w, gy, &mut dcols);
                }
                host_col2im(&dcols, g, n0, nbc, &mut dx);
            }
            let mut part = vec![f64::NAN; nbc * g.o * k];
            for call in conv_calls(g, Product::WeightGrad, n0, nbc, 0.0) {
                host_gemm(&call, gy, &cols, &mut part);
            }
            // sum_partials_impl: the chunk's samples in order, onto the earlier chunks' total.
            for (e, d) in dw.iter_mut().enumerate() {
                let prev = if n0 > 0 { *d } else { 0.0 };
                *d = prev + (0..nbc).map(|s| part[s * g.o * k + e]).sum::<f64>();
            }
        }
        [y, dx, dw]
    }

    #[test]
    fn the_dense_products_match_the_cpu_conv_in_any_chunking() {
        // (x, O, kernel, stride, padding, dilation, groups): grouped with more groups than samples and fewer,
        // pointwise with groups, stride and dilation, and a channel multiplier (G = C, O = 2C).
        type Cfg = ([usize; 4], usize, (usize, usize), (usize, usize), (usize, usize), (usize, usize), usize);
        let cfgs: [Cfg; 7] = [
            ([3, 3, 7, 6], 4, (3, 3), (2, 2), (1, 1), (1, 1), 1),
            ([2, 4, 5, 7], 6, (3, 2), (2, 1), (1, 1), (1, 1), 2),
            ([3, 6, 5, 4], 3, (2, 2), (1, 1), (2, 0), (2, 1), 3),
            ([1, 4, 7, 5], 2, (3, 3), (1, 1), (2, 1), (2, 2), 2),
            ([3, 4, 3, 5], 6, (1, 1), (1, 1), (0, 0), (1, 1), 2),
            ([2, 3, 4, 4], 5, (1, 1), (2, 2), (0, 0), (1, 1), 1),
            ([2, 3, 5, 5], 6, (3, 3), (1, 1), (1, 1), (1, 1), 3),
        ];
        for (i, (xs, o, k, stride, padding, dilation, groups)) in cfgs.into_iter().enumerate() {
            let seed = 10 * i as u64;
            let x = randn(&xs, seed).requires_grad_(true).unwrap();
            let w = randn(&[o, xs[1] / groups, k.0, k.1], seed + 1).requires_grad_(true).unwrap();
            let b = randn(&[o], seed + 2).requires_grad_(true).unwrap();
            let y = crate::conv2d(&x, &w, Some(&b), stride, padding, dilation, groups).unwrap();
            let gy = randn(y.shape(), seed + 3);
            y.backward_with(&gy).unwrap();
            let g = Conv2dGeom::new(&xs, w.shape(), stride, padding, dilation, groups).unwrap();
            let v = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec_f64().unwrap();
            let want = [v(&y), v(&x.grad().unwrap()), v(&w.grad().unwrap())];
            for nb in 1..=xs[0] {
                let got = run_dense(&v(&x), &v(&w), &v(&b), &v(&gy), &g, nb);
                for (what, (got, want)) in ["y", "dx", "dw"].iter().zip(got.iter().zip(&want)) {
                    assert_close(got, want, 1e-12, &format!("config {i} chunk {nb} {what}"));
                }
            }
        }
    }

    #[test]
    fn grid_calls_loop_over_the_shorter_of_samples_and_groups() {
        let shape = GemmConfig::contiguous(1, 2, 3, 4, false, false);
        let a = Place { base: 5, per_sample: 0, per_group: 8 };
        let b = Place { base: 0, per_sample: 100, per_group: 12 };
        let c = Place { base: 7, per_sample: 50, per_group: 6 };
        // 2 groups, 4 samples: a call per group, batched over the samples.
        let calls = grid_calls(shape, [a, b, c], 4, 2);
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[1].a, calls[1].b, calls[1].c), (13, 12, 13));
        assert_eq!(
            (calls[1].cfg.batch, calls[1].cfg.stride_a, calls[1].cfg.stride_b, calls[1].cfg.stride_c),
            (4, 0, 100, 50)
        );
        // 3 groups, 2 samples: a call per sample, batched over the groups.
        let calls = grid_calls(shape, [a, b, c], 2, 3);
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[1].a, calls[1].b, calls[1].c), (5, 100, 57));
        assert_eq!(
            (calls[1].cfg.batch, calls[1].cfg.stride_a, calls[1].cfg.stride_b, calls[1].cfg.stride_c),
            (3, 8, 12, 6)
        );
        assert!(grid_calls(shape, [a, b, c], 0, 3).is_empty());
    }

    /// Geometries for the depthwise plan: the bench's and the MILA blocks', odd sizes, strides, paddings and
    /// dilations, tall and wide planes, one sample and many channels.
    fn dw_geometries() -> Vec<Conv2dGeom> {
        let geom = |[n, c, h, w]: [usize; 4], k: (usize, usize), s: usize, p: (usize, usize), d: usize| {
            Conv2dGeom::new(&[n, c, h, w], &[c, 1, k.0, k.1], (s, s), p, (d, d), c).ok()
        };
        let mut v = vec![];
        for [n, c, hw] in [[64, 64, 56], [64, 128, 28], [64, 256, 14], [64, 512, 7], [128, 64, 56], [1, 64, 56]] {
            v.push(geom([n, c, hw, hw], (3, 3), 1, (1, 1), 1));
            v.push(geom([n, c, hw, hw], (3, 3), 2, (1, 1), 1));
        }
        for x in [[2, 3, 5, 6], [3, 5, 17, 19], [1, 2, 1, 1], [1, 1, 200, 37], [2, 2, 500, 30], [1, 3, 40, 200]] {
            v.push(geom(x, (3, 3), 1, (1, 1), 1));
            v.push(geom(x, (3, 3), 2, (1, 1), 1));
            v.push(geom(x, (3, 3), 1, (0, 0), 1));
            v.push(geom(x, (3, 3), 1, (2, 2), 1));
            v.push(geom(x, (1, 1), 1, (0, 0), 1));
            if x[2] >= 5 && x[3] >= 5 {
                v.push(geom(x, (5, 5), 2, (2, 2), 1));
                v.push(geom(x, (3, 3), 1, (2, 2), 2));
                v.push(geom(x, (3, 2), 3, (0, 1), 1));
            }
        }
        v.into_iter().flatten().collect()
    }

    #[test]
    fn dw_plan_tiles_hold_every_row_a_band_reads() {
        for g in dw_geometries() {
            for (elem, backward, sms) in [(4, false, 132), (4, true, 132), (8, true, 132), (8, false, 1), (4, true, 1)]
            {
                let what = format!("{g:?} elem {elem} backward {backward} sms {sms}");
                let Some(plan) = dw_plan(&g, elem, backward, sms) else { panic!("no plan: {what}") };
                let t = plan.tile;
                let budget = if backward { DW_BWD_SHARED } else { DW_FWD_SHARED };
                assert!(plan.shared <= budget, "{what}: {plan:?}");
                assert!(
                    t.planes >= 1 && t.planes as usize <= g.n && t.groups as usize == g.n.div_ceil(t.planes as usize)
                );
                assert_eq!(plan.blocks, g.c * t.groups as usize * t.bands as usize, "{what}");
                let (run, rows, bands) = (plan.kernel.run(), t.rows as usize, t.bands as usize);
                assert_eq!(bands, g.oh.div_ceil(rows), "{what}");
                let tile_bytes = t.planes as usize * (t.xrows as usize * g.w + t.grows as usize * g.ow) * elem;
                assert_eq!(plan.shared, tile_bytes, "{what}");
                let [sh, ph, kh, dh] = [g.stride.0, g.padding.0, g.kh, g.dilation.0].map(|v| v as i64);
                let (mut next_a, mut next_r) = (0, 0);
                for band in 0..bands {
                    let b = DwBand::new(&g, run, rows, bands, band);
                    // The bands split the output rows and the input rows, in order.
                    assert_eq!((b.a0, b.r0), (next_a, next_r), "{what} band {band}");
                    assert!(b.a1 > b.a0 && b.r1 >= b.r0, "{what} band {band}: {b:?}");
                    (next_a, next_r) = (b.a1, b.r1);
                    // Every x row the forward and the weight gradient read, rounded runs included.
                    let x0 = b.a0 * sh - ph;
                    for a in b.a0..b.a1r {
                        for i in 0..kh {
                            let row = a * sh - ph + i * dh - x0;
                            assert!((0..i64::from(t.xrows)).contains(&row), "{what} band {band}: x row {row}");
                        }
                    }
                    if backward {
                        // Every g row dx reads, and the rows of the weight gradient's outputs.
                        let in_tile = |a: i64| (b.gi0..b.gi0 + i64::from(t.grows)).contains(&a);
                        for i in b.r0..b.r1r {
                            for tap in 0..kh {
                                let ta = i + ph - tap * dh;
                                assert!(ta % sh != 0 || in_tile(ta.div_euclid(sh)), "{what} band {band}: dx row {i}");
                            }
                        }
                        assert!((b.a0..b.a1r).all(in_tile), "{what} band {band}: {b:?}");
                    }
                }
                assert_eq!((next_a, next_r), (g.oh as i64, g.h as i64), "{what}");
            }
        }
    }

    #[test]
    fn dw_plans_of_the_mila_shapes() {
        let geom = |x: [usize; 4], s: usize| Conv2dGeom::new(&x, &[x[1], 1, 3, 3], (s, s), (1, 1), (1, 1), x[1]);
        // The bench's conv: a block per whole 56x56 plane, forward and backward (f32); f64's backward tiles
        // would overflow the budget, so it runs two bands.
        let g = geom([64, 64, 56, 56], 1).unwrap();
        let f = dw_plan(&g, 4, false, 132).unwrap();
        assert_eq!((f.kernel, f.tile.planes, f.tile.bands, f.blocks), (DwKernel::K3S1, 1, 1, 4096));
        assert_eq!(f.shared, 58 * 56 * 4);
        let b = dw_plan(&g, 4, true, 132).unwrap();
        assert_eq!((b.tile.planes, b.tile.bands, b.tile.xrows, b.tile.grows), (1, 1, 58, 58));
        assert_eq!(dw_plan(&g, 8, true, 132).unwrap().tile.bands, 2);
        // 7x7 planes: the batch's 64 samples of a channel in one block.
        let g = geom([64, 512, 7, 7], 1).unwrap();
        let f = dw_plan(&g, 4, false, 132).unwrap();
        assert_eq!((f.tile.planes, f.tile.groups, f.blocks), (64, 1, 512));
        // Stride 2 (padding 1 runs the direct kernels instead: `dw_s2_plan`).
        assert_eq!(dw_plan(&geom([64, 512, 28, 28], 2).unwrap(), 4, true, 132).unwrap().kernel, DwKernel::K3S2);
        // One sample of few channels: bands of whole runs, so that the grid has a few blocks per multiprocessor.
        let g = geom([1, 4, 56, 56], 1).unwrap();
        let f = dw_plan(&g, 4, false, 132).unwrap();
        assert_eq!((f.tile.rows, f.tile.bands, f.blocks), (4, 14, 56));
        // Planes too wide for even one run of rows fall back to the untiled kernels.
        assert!(dw_plan(&geom([1, 2, 3, 1100], 1).unwrap(), 8, false, 132).is_none());
        assert!(dw_plan(&geom([1, 2, 3, 900], 1).unwrap(), 4, true, 132).is_none());
        assert!(dw_plan(&geom([1, 2, 3, 800], 1).unwrap(), 4, true, 132).is_some());
        let dilated = Conv2dGeom::new(&[2, 3, 9, 9], &[3, 1, 3, 3], (1, 1), (2, 2), (2, 2), 3).unwrap();
        assert_eq!(dw_plan(&dilated, 4, true, 132).unwrap().kernel, DwKernel::Any);
    }

    #[test]
    fn dw_s2_plans_cover_every_item_and_dx_element() {
        for g in dw_geometries() {
            let s2 = (g.kh, g.kw, g.stride, g.padding, g.dilation) == (3, 3, (2, 2), (1, 1), (1, 1));
            let Some(p) = dw_s2_plan(&g) else {
                assert!(!s2, "{g:?}: no direct plan");
                continue;
            };
            assert!(s2, "{g:?}: a direct plan for another conv");
            let [runs, items, span, chunk, per] = [p.runs, p.items, p.span, p.chunk, p.per].map(|v| v as usize);
            assert_eq!((runs, items, span), (g.oh.div_ceil(DW_S2_RUN), runs * g.ow, g.n * items), "{g:?}");
            assert_eq!(p.total as usize, g.c * span, "{g:?}");
            // The blocks of a channel take every item once, none is empty, and no thread more than DW_S2_ITEMS.
            assert!(chunk * per >= span && chunk * (per - 1) < span, "{g:?}: {p:?}");
            assert!(chunk <= DW_S2_THREADS * DW_S2_ITEMS, "{g:?}: {p:?}");
            // The items' dx blocks (rows 2 a0 .. 2 a0 + 2 DW_S2_RUN, columns 2b, 2b + 1) reach every dx element.
            assert!(2 * runs * DW_S2_RUN >= g.h && 2 * g.ow >= g.w, "{g:?}");
        }
    }

    #[test]
    fn dw_s2_plans_of_the_mlla_t_merges() {
        let geom = |x: [usize; 4]| Conv2dGeom::new(&x, &[x[1], 1, 3, 3], (2, 2), (1, 1), (1, 1), x[1]).unwrap();
        // (runs, items a plane, a channel's items, chunk, blocks a channel) of the three patch mergings at batch 128.
        let plan = |x| dw_s2_plan(&geom(x)).map(|p| (p.runs, p.items, p.span, p.chunk, p.per));
        assert_eq!(plan([128, 512, 56, 56]), Some((7, 196, 25088, 1004, 25)));
        assert_eq!(plan([128, 1024, 28, 28]), Some((4, 56, 7168, 1024, 7)));
        assert_eq!(plan([128, 2048, 14, 14]), Some((2, 14, 1792, 896, 2)));
        // Other paddings keep the tiled kernels.
        let p0 = Conv2dGeom::new(&[2, 3, 8, 8], &[3, 1, 3, 3], (2, 2), (0, 0), (1, 1), 3).unwrap();
        assert!(dw_s2_plan(&p0).is_none());
        assert_eq!(dw_plan(&p0, 4, true, 132).unwrap().kernel, DwKernel::K3S2);
    }

    #[test]
    fn dwl_plans_cover_every_channel_and_item() {
        for g in dw_geometries() {
            for (phase, lanes, sms) in [
                (DwlPhase::Forward, 4, 132),
                (DwlPhase::InputGrad, 2, 132),
                (DwlPhase::Sums, 1, 132),
                (DwlPhase::Forward, 1, 1),
                (DwlPhase::Sums, 4, 1),
            ] {
                let what = format!("{g:?} {phase:?} V {lanes} sms {sms}");
                let Some(plan) = dwl_plan(&g, phase, lanes, sms) else {
                    // Only C not a multiple of V is refused among these sizes.
                    assert!(g.c % lanes != 0, "{what}");
                    continue;
                };
                let t = plan.tile;
                let (bx, gx, gy) = (t.bx as usize, t.gx as usize, t.gy as usize);
                let by = plan.threads / bx;
                assert_eq!(t.cv as usize * lanes, g.c, "{what}");
                assert!(plan.threads <= DWL_THREADS && plan.threads == bx * by && by >= 1, "{what}");
                assert!(gx * bx >= g.c / lanes && (gx - 1) * bx < g.c / lanes, "{what}");
                assert_eq!(plan.blocks, gx * gy, "{what}");
                let tw = if DwKernel::of(&g) == DwKernel::K3S1 { 8 } else { 4 };
                let (rows, width) = if phase == DwlPhase::InputGrad { (g.h, g.w) } else { (g.oh, g.ow) };
                assert_eq!((t.rows as usize, t.strips as usize), (rows, width.div_ceil(tw)), "{what}");
                let items = g.n * rows * width.div_ceil(tw);
                assert!(gy * by < items + by, "{what}: no row of blocks without items");
                if phase == DwlPhase::Sums {
                    assert!(items.div_ceil(gy * by) <= DWL_SUM_ITEMS, "{what}");
                    assert_eq!(plan.shared, plan.threads * lanes * 8, "{what}");
                } else {
                    assert!(gy <= (DWL_BLOCKS_PER_SM * sms / gx).max(1), "{what}");
                    assert_eq!(plan.shared, 0, "{what}");
                }
                let phase_name = ["fwd", "dx", "sums"][phase as usize];
                let instance = ["3x3s1", "3x3s2", "any"][DwKernel::of(&g) as usize];
                let width_name = if lanes > 1 { "vec" } else { "one" };
                assert_eq!(plan.name, format!("dwl_{phase_name}_{instance}_{width_name}"), "{what}");
            }
        }
    }

    #[test]
    fn dwl_plans_of_the_mila_shapes() {
        let geom = |x: [usize; 4], s: usize| Conv2dGeom::new(&x, &[x[1], 1, 3, 3], (s, s), (1, 1), (1, 1), x[1]);
        // MLLA-T's stage 1 at batch 128 in f32: 16 float4 vectors of channels a pixel, so blocks of 16 x 16
        // threads; 7 strips of 8 columns a row; about 8 blocks a multiprocessor, 3 items a thread.
        let g = geom([128, 64, 56, 56], 1).unwrap();
        let f = dwl_plan(&g, DwlPhase::Forward, 4, 132).unwrap();
        assert_eq!(f.name, "dwl_fwd_3x3s1_vec");
        assert_eq!((f.tile.cv, f.tile.bx, f.tile.gx, f.tile.strips, f.threads, f.shared), (16, 16, 1, 7, 256, 0));
        assert_eq!(f.blocks, 1056);
        // The weight gradient: at most 4 items a thread, 784 rows of partials a channel.
        let s = dwl_plan(&g, DwlPhase::Sums, 4, 132).unwrap();
        assert_eq!((s.name.as_str(), s.tile.gy, s.shared), ("dwl_sums_3x3s1_vec", 784, 256 * 4 * 8));
        // Stage 4: 512 channels of 7x7, two blocks along the channels; f64 pairs.
        let g = geom([128, 512, 7, 7], 1).unwrap();
        let d = dwl_plan(&g, DwlPhase::InputGrad, 2, 132).unwrap();
        assert_eq!((d.tile.cv, d.tile.bx, d.tile.gx, d.tile.strips, d.threads), (256, 32, 8, 1, 256));
        // Stride 2 and C not a multiple of 4.
        let g = geom([8, 6, 28, 28], 2).unwrap();
        assert_eq!(dwl_plan(&g, DwlPhase::InputGrad, 1, 132).unwrap().name, "dwl_dx_3x3s2_one");
        assert!(dwl_plan(&g, DwlPhase::Forward, 4, 132).is_none());
        // Empty convs stay on the NCHW path.
        assert!(!channels_last_supported(&geom([0, 4, 5, 5], 1).unwrap()));
        assert!(channels_last_supported(&geom([1, 4, 1, 1], 1).unwrap()));
    }

    #[test]
    fn the_forward_is_an_implicit_gemm_but_for_pointwise_convs() {
        let geom = |x: [usize; 4], w: [usize; 4], s, p, groups| Conv2dGeom::new(&x, &w, s, p, (1, 1), groups).unwrap();
        // The bench's conv, a grouped one and the stem's stride-2 conv.
        assert!(geom([128, 32, 112, 112], [32, 32, 3, 3], (1, 1), (1, 1), 1).implicit_gemm());
        assert!(geom([4, 16, 9, 9], [64, 4, 3, 3], (2, 2), (1, 1), 4).implicit_gemm());
        assert!(geom([8, 3, 224, 224], [32, 3, 3, 3], (2, 2), (1, 1), 1).implicit_gemm());
        // A 1x1 conv with stride 1 and no padding: cuBLAS reads x as the columns; one with stride 2 gathers.
        assert!(!geom([8, 64, 14, 14], [128, 64, 1, 1], (1, 1), (0, 0), 1).implicit_gemm());
        assert!(geom([8, 64, 14, 14], [128, 64, 1, 1], (2, 2), (0, 0), 1).implicit_gemm());
        // Columns past the kernel's ints.
        assert!(!geom([1 << 16, 1, 128, 256], [1, 1, 1, 3], (1, 1), (0, 1), 1).implicit_gemm());
    }

    #[test]
    fn a_stride_one_dense_dx_is_a_conv_of_g() {
        let geom = |x: [usize; 4], w: [usize; 4], s, p, groups| Conv2dGeom::new(&x, &w, s, p, (1, 1), groups).unwrap();
        // The stem's 3x3 padding-1 conv: dx is a 3x3 padding-1 conv of g (32 -> 32 channels, 112 x 112).
        let t = geom([128, 32, 112, 112], [32, 32, 3, 3], (1, 1), (1, 1), 1).input_grad_conv().unwrap();
        assert_eq!((t.n, t.c, t.h, t.w, t.o, t.oh, t.ow), (128, 32, 112, 112, 32, 112, 112));
        assert_eq!((t.padding, t.stride, t.groups), ((1, 1), (1, 1), 1));
        // Channels swap; no padding becomes k - 1; an even kernel with padding 1 (OH = H + 1) comes back to H.
        let t = geom([2, 5, 9, 8], [7, 5, 3, 3], (1, 1), (0, 0), 1).input_grad_conv().unwrap();
        assert_eq!((t.c, t.h, t.w, t.o, t.padding, t.oh, t.ow), (7, 7, 6, 5, (2, 2), 9, 8));
        let t = geom([2, 3, 6, 5], [4, 3, 2, 2], (1, 1), (1, 1), 1).input_grad_conv().unwrap();
        assert_eq!((t.h, t.w, t.padding, t.oh, t.ow), (7, 6, (0, 0), 6, 5));
        // Not for stride 2, groups, a padding as large as the kernel, or a 1x1 conv (cuBLAS without cols).
        assert!(geom([8, 3, 224, 224], [32, 3, 3, 3], (2, 2), (1, 1), 1).input_grad_conv().is_none());
        assert!(geom([4, 16, 9, 9], [64, 4, 3, 3], (1, 1), (1, 1), 4).input_grad_conv().is_none());
        assert!(geom([2, 3, 5, 6], [4, 3, 3, 3], (1, 1), (3, 3), 1).input_grad_conv().is_none());
        assert!(geom([8, 64, 14, 14], [128, 64, 1, 1], (1, 1), (0, 0), 1).input_grad_conv().is_none());
    }

    #[test]
    fn chunks_keep_the_column_buffer_within_budget() {
        let g = Conv2dGeom::new(&[256, 64, 56, 56], &[64, 64, 3, 3], (1, 1), (1, 1), (1, 1), 1).unwrap();
        let nb = g.chunk();
        assert!(nb >= 1 && nb * 64 * 9 * 56 * 56 <= COLS_BUDGET, "{nb}");
        let small = Conv2dGeom::new(&[8, 3, 8, 8], &[4, 3, 3, 3], (1, 1), (1, 1), (1, 1), 1).unwrap();
        assert_eq!(small.chunk(), 8);
    }
}
