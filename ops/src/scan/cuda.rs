//! CUDA paths of the scan (scan.cu, whose header has the design, the byte and exp counts and the expected
//! times).
//!
//! A block is 32 `warps` threads over G = 32 warps / lpc channels of one batch; each channel gets `lpc` lanes
//! (a power of two), each lane `spl` of its states (4, or 8 past 128 states: the two instantiations; and in
//! f32 a forward of 8 lanes of 2 for S 9 to 16 on small grids, [`forward_plan`]), so lpc * spl >= S and the
//! states past S are zero padding. Threads walk time in tiles of `tile` steps, which is also the chunk of the
//! saved states: the forward writes the state entering every tile, the backward walks the tiles in reverse and
//! recomputes a tile's states from it. The tile and the warps come from the shared memory a block needs
//! ([`forward_shared_bytes`], [`backward_shared_bytes`], mirrors of scan.cu's layouts): at most
//! [`SHARED_BUDGET`] so that three blocks share a multiprocessor.
//!
//! Reductions are deterministic (no atomics): the backward writes per-block partials of dB and dC (summed
//! over the block's channels) and per-batch partials of dA, dD and ddelta_bias, and `scan_bwd_sum` adds them
//! in a fixed order.

use std::sync::{Arc, RwLockReadGuard};

use engine::cuda::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use engine::cuda::{CudaDevice, CudaFunction, CudaStorage, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use engine::{DType, Error, Float, Result, Storage, Tensor};

use super::{Dims, Forward, Operands, ScanGrads, OP};
use crate::cuda::{function, Module};

pub(crate) const MODULE: Module = Module { name: "ops_scan", body: include_str!("scan.cu") };

/// Most states the kernels take: 32 lanes of 8 states.
pub(crate) const MAX_STATES: usize = 256;
/// Shared memory a block may take: three blocks per H100 multiprocessor (227 KiB) at Mamba's sizes.
const SHARED_BUDGET: usize = 96 << 10;
/// Shared memory a block may take without opting in to more (cuFuncSetAttribute).
const DEFAULT_SHARED: usize = 48 << 10;
/// The longest tile per dtype: 32 steps of f32, 16 of f64 (the same shared memory).
const fn max_tile(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 32,
        DType::F64 => 16,
    }
}
/// Tiles are whole numbers of this many steps (a multiple of every sub-chunk length, [`sub_chunk`]).
const TILE_STEP: usize = 8;

/// How the kernels split one scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// States per lane: the kernel instantiation (`scan_fwd_s4`, `scan_fwd_s8`).
    pub spl: usize,
    /// Lanes per channel, a power of two <= 32.
    pub lpc: usize,
    /// Warps per block: 1, 2 or 4 (scan.cu's kernels are built for at most 128 threads).
    pub warps: usize,
    /// Steps per tile, and between saved states.
    pub tile: usize,
}

impl Plan {
    /// Channels per block.
    fn channels(&self) -> usize {
        32 * self.warps / self.lpc
    }

    /// States padded to the lanes, lpc * spl.
    fn padded_states(&self) -> usize {
        self.lpc * self.spl
    }

    /// Blocks per batch.
    fn groups(&self, channels: usize) -> usize {
        channels.div_ceil(self.channels())
    }
}

/// (states per lane, lanes per channel) for S states, or an error past [`MAX_STATES`].
fn lanes(states: usize, shape: &[usize]) -> Result<(usize, usize)> {
    if states == 0 || states > MAX_STATES {
        return Err(Error::invalid(OP, format!("the CUDA kernels take 1 to {MAX_STATES} states, got {states}"), shape));
    }
    let spl = if states <= 128 { 4 } else { 8 };
    Ok((spl, states.div_ceil(spl).next_power_of_two()))
}

/// Steps the backward recomputes into registers at a time (`ScanShape::TH` in scan.cu).
fn sub_chunk(spl: usize, elem: usize) -> usize {
    (32 / spl) * 4 / elem
}

/// `elems` elements of `elem` bytes rounded up to 32 bytes (`scan_round` in scan.cu).
fn round(elems: usize, elem: usize) -> usize {
    let per = 32 / elem;
    elems.div_ceil(per) * per
}

/// The forward's dynamic shared memory in bytes (`scan_fwd_layout`): rows of 128 bytes of steps (the longest
/// tile) + 4 elements, for dt and dt u of each channel, B and C of each padded state, and each thread's partial
/// readout.
pub(crate) fn forward_shared_bytes(plan: Plan, elem: usize) -> usize {
    let (g, np) = (plan.channels(), plan.padded_states());
    let row = 128 / elem + 4;
    (2 * g + 2 * np + 32 * plan.warps) * row * elem
}

/// The backward's dynamic shared memory in bytes. f32 with 4 lanes of 4 states (`scan_bwd_s4l4_f32`, scan.cu's
/// `scan_bwd4_layout`): rows of 128 bytes + 4 elements for dt, dt u and dL/dy of each channel and for B and C
/// of each of the 16 states, the state entering every 4 steps per thread, and per warp the 16-byte dB/dC
/// exchange (8 channels x 32 values) and two turns of its sums. Otherwise (`scan_bwd_layout`): the (dt, dt u,
/// gy, u) tile, the softplus and gate derivatives, B and C, the sub-chunk entry states, the per-(c, t) sums,
/// the per-warp dB and dC, the dD and ddelta_bias accumulators.
pub(crate) fn backward_shared_bytes(plan: Plan, elem: usize) -> usize {
    let (t, g, np, w) = (plan.tile, plan.channels(), plan.padded_states(), plan.warps);
    if elem == 4 && plan.spl == 4 && plan.lpc == 4 {
        let row = 128 / elem + 4;
        return (3 * g * row + 32 * row + t / 4 * 32 * w * 4 + w * 8 * 32 * 4 + 2 * w * 32 * 4) * elem;
    }
    let th = sub_chunk(plan.spl, elem);
    let elems = round(4 * g * (t + 1), elem)
        + round(2 * t * (g + 1), elem)
        + round(t * (2 * np + 4), elem)
        + round(t / th * 32 * w * plan.spl, elem)
        + round(3 * g * (t + 1), elem)
        + round(w * t * (2 * np + 1), elem)
        + round(2 * g, elem);
    elems * elem
}

/// The most warps (4, 2 or 1) whose blocks fit [`SHARED_BUDGET`] with this tile.
fn fit_warps(spl: usize, lpc: usize, tile: usize, bytes: impl Fn(Plan) -> usize) -> Option<Plan> {
    [4, 2, 1].into_iter().map(|warps| Plan { spl, lpc, warps, tile }).find(|&p| bytes(p) <= SHARED_BUDGET)
}

/// The tile (the chunk of the saved states) the kernels use when `requested` steps are asked for: a multiple
/// of 8 from 8 to 32 (f32) or 16 (f64), no longer than `requested` unless that is under 8, and short enough
/// that the backward's blocks fit the shared memory.
pub(crate) fn cuda_chunk(requested: usize, states: usize, dtype: DType) -> Result<usize> {
    let (spl, lpc) = lanes(states, &[states])?;
    let elem = dtype.size_in_bytes();
    let mut tile = (requested / TILE_STEP * TILE_STEP).clamp(TILE_STEP, max_tile(dtype));
    while fit_warps(spl, lpc, tile, |p| backward_shared_bytes(p, elem)).is_none() {
        if tile == TILE_STEP {
            return Err(Error::invalid(OP, "internal: no tile fits the shared memory", &[states]));
        }
        tile -= TILE_STEP;
    }
    Ok(tile)
}

/// The forward's and the backward's plans for a tile from [`cuda_chunk`].
fn plans(states: usize, dtype: DType, tile: usize, shape: &[usize]) -> Result<(Plan, Plan)> {
    let (spl, lpc) = lanes(states, shape)?;
    let elem = dtype.size_in_bytes();
    let internal = || Error::invalid(OP, format!("internal: tile {tile} does not fit the shared memory"), shape);
    let fwd = fit_warps(spl, lpc, tile, |p| forward_shared_bytes(p, elem)).ok_or_else(internal)?;
    let bwd = fit_warps(spl, lpc, tile, |p| backward_shared_bytes(p, elem)).ok_or_else(internal)?;
    Ok((fwd, bwd))
}

/// Blocks of `scan_fwd_s4l4_f32` a multiprocessor holds (its launch bounds in scan.cu).
const FWD_S4L4_BLOCKS_PER_SM: usize = 6;

/// The forward's plan on a device of `multiprocessors`: [`plans`]' forward plan, except that f32 with 4 lanes
/// of 4 states (S 9 to 16) on a grid that fills at most half of the device's slots runs 8 lanes of 2 states
/// (`scan_fwd_s2l8_f32`): twice the blocks and warps for the same work. The forward is latency bound; at
/// (8, 1536) the 384 blocks of s4l4 give 2.9 a multiprocessor (11.6 warps), the 768 of s2l8 5.8 (23 warps, one
/// wave of the 7 a multiprocessor that s2l8 allows). The saved states do not depend on the lanes, so the
/// backward keeps its own plan.
fn forward_plan(plan: Plan, dims: Dims, dtype: DType, multiprocessors: usize) -> Plan {
    let small = 2 * dims.batch * plan.groups(dims.channels) <= FWD_S4L4_BLOCKS_PER_SM * multiprocessors;
    if dtype == DType::F32 && (plan.spl, plan.lpc) == (4, 4) && small {
        Plan { spl: 2, lpc: 8, ..plan }
    } else {
        plan
    }
}

/// Mirrors `struct ScanParams` in scan.cu field for field (a static_assert there checks the size).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ScanParams {
    batch: i64,
    channels: i64,
    length: i64,
    states: i64,
    chunk: i64,
    n_chunks: i64,
    groups: i64,
    lpc: i32,
    np: i32,
    has_d: i32,
    has_z: i32,
    has_delta_bias: i32,
    delta_softplus: i32,
    pad0: i32,
    pad1: i32,
}

const _: () = assert!(std::mem::size_of::<ScanParams>() == 88);

// SAFETY: integers only, #[repr(C)] with no padding (7 i64 then 8 i32), the layout of the .cu struct.
unsafe impl DeviceRepr for ScanParams {}

fn params(dims: Dims, plan: Plan, x: &Operands, delta_softplus: bool) -> Result<ScanParams> {
    let Dims { batch, channels, length, states } = dims;
    let i = |v: usize| i64::try_from(v).map_err(|_| Error::invalid(OP, "size does not fit in i64", x.u.shape()));
    Ok(ScanParams {
        batch: i(batch)?,
        channels: i(channels)?,
        length: i(length)?,
        states: i(states)?,
        chunk: i(plan.tile)?,
        n_chunks: i(dims.chunks(plan.tile))?,
        groups: i(plan.groups(channels))?,
        lpc: plan.lpc as i32,
        np: plan.padded_states() as i32,
        has_d: x.d.is_some() as i32,
        has_z: x.z.is_some() as i32,
        has_delta_bias: x.delta_bias.is_some() as i32,
        delta_softplus: delta_softplus as i32,
        pad0: 0,
        pad1: 0,
    })
}

/// One block per (batch, group of channels), with `shared` bytes of dynamic shared memory.
fn grid(dims: Dims, plan: Plan, shared: usize) -> Result<LaunchConfig> {
    let blocks = dims.batch * plan.groups(dims.channels);
    let blocks = u32::try_from(blocks).ok().filter(|&b| b < i32::MAX as u32).ok_or_else(|| {
        Error::invalid(OP, format!("{blocks} blocks exceed the CUDA grid"), &[dims.batch, dims.channels, dims.length])
    })?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (32 * plan.warps as u32, 1, 1),
        shared_mem_bytes: shared as u32,
    })
}

/// The instantiation of kernel `base` for this plan and dtype: in f32 `<base>_s4l4` (the lanes per channel
/// compiled in) for 4 lanes of 4 states (S = 9 to 16, Mamba's 16) and `scan_fwd_s2l8` for the forward's 8
/// lanes of 2 ([`forward_plan`]), else `<base>_s<spl>`, which takes any lane count (f64, the gradient-check
/// dtype, always: one instantiation less to compile).
fn instance(base: &str, plan: Plan, dtype: DType) -> String {
    match (dtype, plan.spl, plan.lpc) {
        (DType::F32, 4, 4) => format!("{base}_s4l4"),
        (DType::F32, 2, 8) => format!("{base}_s2l8"),
        (_, spl, _) => format!("{base}_s{spl}"),
    }
}

/// The kernel `base` for this plan's instantiation, allowed `shared` bytes of dynamic shared memory.
fn kernel<T: Float>(dev: &CudaDevice, base: &str, plan: Plan, shared: usize) -> Result<(String, CudaFunction)> {
    let base = instance(base, plan, T::DTYPE);
    let (name, f) = (engine::cuda::kernel_name::<T>(&base), function::<T>(dev, &MODULE, &base)?);
    if shared > DEFAULT_SHARED {
        let limit = dev
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| launch_error(&name, e))?;
        if shared > limit.max(0) as usize {
            return Err(Error::Cuda {
                op: OP,
                msg: format!("{name} needs {shared} bytes of shared memory, the device allows {limit}"),
            });
        }
        f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32)
            .map_err(|e| launch_error(&name, e))?;
    }
    Ok((name, f))
}

/// Read guards on the operands' storages, one per distinct storage (operands may share one, e.g. D and
/// delta_bias cut from one parameter, and a lock is not taken twice), held while a kernel is enqueued.
struct Views<'a> {
    owners: Vec<&'a Tensor>,
    guards: Vec<RwLockReadGuard<'a, Storage>>,
}

impl<'a> Views<'a> {
    fn new(x: &'a Operands, extra: &[&'a Tensor]) -> Self {
        let all = [&x.u, &x.delta, &x.a, &x.b, &x.c]
            .into_iter()
            .chain([&x.d, &x.z, &x.delta_bias].into_iter().filter_map(|t| t.as_ref()))
            .chain(extra.iter().copied());
        let mut owners: Vec<&Tensor> = Vec::new();
        for t in all {
            if !owners.iter().any(|o| o.same_storage(t)) {
                owners.push(t);
            }
        }
        let guards = owners.iter().map(|t| t.storage()).collect();
        Views { owners, guards }
    }

    /// The elements of `t` (one of the tensors given to `new`, contiguous) as a view of its buffer.
    fn view<T: Float>(&self, t: &Tensor) -> Result<CudaView<'_, T>> {
        let i = self
            .owners
            .iter()
            .position(|o| o.same_storage(t))
            .ok_or_else(|| Error::invalid(OP, "internal: operand not held", t.shape()))?;
        let (o, n) = (t.layout().offset(), t.numel());
        self.guards[i]
            .as_cuda(OP)?
            .slice::<T>()?
            .try_slice(o..o + n)
            .ok_or_else(|| Error::invalid(OP, "internal: view exceeds its buffer", t.shape()))
    }
}

fn device(x: &Operands) -> Result<Arc<CudaDevice>> {
    Ok(x.u.storage().as_cuda(OP)?.device().clone())
}

fn launch_error(kernel: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda { op: OP, msg: format!("launching {kernel}: {e:?}") }
}

/// Forward: out (B, C, L) and the chunk-entry states (B, C, chunks, S), with the chunk actually used.
pub(super) fn forward(x: &Operands, dims: Dims, delta_softplus: bool, chunk: usize) -> Result<Forward> {
    fn run<T: Float>(x: &Operands, dims: Dims, delta_softplus: bool, chunk: usize) -> Result<Forward> {
        let dev = device(x)?;
        let tile = cuda_chunk(chunk, dims.states, T::DTYPE)?;
        let (plan, _) = plans(dims.states, T::DTYPE, tile, x.a.shape())?;
        let plan = forward_plan(plan, dims, T::DTYPE, dev.multiprocessor_count() as usize);
        let shared = forward_shared_bytes(plan, T::DTYPE.size_in_bytes());
        let p = params(dims, plan, x, delta_softplus)?;
        let Dims { batch, channels, length, states } = dims;
        let out = dev.alloc::<T>(batch * channels * length)?;
        let saved = dev.alloc::<T>(batch * channels * dims.chunks(tile) * states)?;
        if batch * channels * length > 0 {
            let v = Views::new(x, &[]);
            let view = |t: &Tensor| v.view::<T>(t);
            let (u, delta, a, b, c) = (view(&x.u)?, view(&x.delta)?, view(&x.a)?, view(&x.b)?, view(&x.c)?);
            // Absent operands are never read (their flags are 0); u stands in as a valid pointer.
            let opt = |t: &Option<Tensor>| view(t.as_ref().unwrap_or(&x.u));
            let (d, z, bias) = (opt(&x.d)?, opt(&x.z)?, opt(&x.delta_bias)?);
            let (name, f) = kernel::<T>(&dev, "scan_fwd", plan, shared)?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&p).arg(&u).arg(&delta).arg(&a).arg(&b).arg(&c).arg(&d).arg(&z).arg(&bias);
            args.arg(out.as_slice()).arg(saved.as_slice());
            // SAFETY: scan_fwd_s<SPL>_<T>(ScanParams, u, delta, A, Bm, Cm, D, z, delta_bias, out, saved) matches
            // the arguments. Every operand was checked against `dims` at op entry and is a contiguous view of
            // exactly its numel, which is how the kernel indexes them (scan.cu's ScanParams); blocks cover
            // b < B and channels c < C (threads past C read and write nothing of theirs), reading u, delta, z at
            // (b, c, t < L), A at (c, n < S), Bm, Cm at (b, n < S, t < L), D, delta_bias at c only when given.
            // Writes: out at (b, c, t) (B C L allocated) and saved at (b, c, k < chunks(tile), n < S) (allocated
            // above). The dynamic shared memory is `forward_shared_bytes`, the kernel's layout, which it checks.
            unsafe { args.launch(grid(dims, plan, shared)?) }.map_err(|e| launch_error(&name, e))?;
        }
        Ok(Forward {
            out: Storage::Cuda(CudaStorage::from_slice(&dev, out)?),
            states: Storage::Cuda(CudaStorage::from_slice(&dev, saved)?),
            chunk: tile,
        })
    }
    match x.u.dtype() {
        DType::F32 => run::<f32>(x, dims, delta_softplus, chunk),
        DType::F64 => run::<f64>(x, dims, delta_softplus, chunk),
    }
}

/// A zero-filled buffer of `n` elements.
fn zeros<T: Float>(dev: &Arc<CudaDevice>, n: usize) -> Result<CudaStorage> {
    let mut s = CudaStorage::alloc(dev, n, T::DTYPE)?;
    s.fill(0.0)?;
    Ok(s)
}

/// Backward: every input's gradient for the output cotangent `g`, from the saved chunk-entry states of a
/// forward that used `chunk` (a tile from [`cuda_chunk`]).
pub(super) fn backward(
    x: &Operands,
    states: &Tensor,
    g: &Tensor,
    dims: Dims,
    delta_softplus: bool,
    chunk: usize,
) -> Result<ScanGrads<Storage>> {
    fn run<T: Float>(
        x: &Operands,
        states: &Tensor,
        g: &Tensor,
        dims: Dims,
        delta_softplus: bool,
        chunk: usize,
    ) -> Result<ScanGrads<Storage>> {
        let dev = device(x)?;
        let Dims { batch, channels, length, states: s } = dims;
        let bcl = batch * channels * length;
        let st = Storage::Cuda;
        let opt_zeros = |t: &Option<Tensor>, n: usize| t.as_ref().map(|_| zeros::<T>(&dev, n).map(st)).transpose();
        if bcl == 0 {
            // Nothing flows back: every gradient is zero (dA, dB, dC may still have elements).
            return Ok(ScanGrads {
                u: st(zeros::<T>(&dev, bcl)?),
                delta: st(zeros::<T>(&dev, bcl)?),
                a: st(zeros::<T>(&dev, channels * s)?),
                b: st(zeros::<T>(&dev, batch * s * length)?),
                c: st(zeros::<T>(&dev, batch * s * length)?),
                d: opt_zeros(&x.d, channels)?,
                z: opt_zeros(&x.z, bcl)?,
                delta_bias: opt_zeros(&x.delta_bias, channels)?,
            });
        }
        let (_, plan) = plans(s, T::DTYPE, chunk, x.a.shape())?;
        if plan.tile != chunk || !chunk.is_multiple_of(TILE_STEP) {
            return Err(Error::invalid(OP, format!("internal: saved states at chunk {chunk}"), x.u.shape()));
        }
        let shared = backward_shared_bytes(plan, T::DTYPE.size_in_bytes());
        let p = params(dims, plan, x, delta_softplus)?;
        let groups = plan.groups(channels);
        // Every element of these is written by the kernels (see the SAFETY notes).
        let alloc = |n: usize| CudaStorage::alloc(&dev, n, T::DTYPE);
        let (du, ddelta) = (alloc(bcl)?, alloc(bcl)?);
        let dz = x.z.as_ref().map(|_| alloc(bcl)).transpose()?;
        let (da, db, dc) = (alloc(channels * s)?, alloc(batch * s * length)?, alloc(batch * s * length)?);
        let dd = x.d.as_ref().map(|_| alloc(channels)).transpose()?;
        let dbias = x.delta_bias.as_ref().map(|_| alloc(channels)).transpose()?;
        // Partials: dB and dC per (batch, channel group), dA per batch, dD and ddelta_bias per batch.
        let part_bc = dev.alloc::<T>(batch * groups * 2 * s * length)?;
        let part_a = dev.alloc::<T>(batch * channels * s)?;
        let part_d = dev.alloc::<T>(if x.d.is_some() { batch * channels } else { 0 })?;
        let part_bias = dev.alloc::<T>(if x.delta_bias.is_some() { batch * channels } else { 0 })?;
        {
            let v = Views::new(x, &[states, g]);
            let view = |t: &Tensor| v.view::<T>(t);
            let (u, delta, a, b, c) = (view(&x.u)?, view(&x.delta)?, view(&x.a)?, view(&x.b)?, view(&x.c)?);
            let opt = |t: &Option<Tensor>| view(t.as_ref().unwrap_or(&x.u));
            let (d, z, bias) = (opt(&x.d)?, opt(&x.z)?, opt(&x.delta_bias)?);
            let (saved, gout) = (view(states)?, view(g)?);
            // Absent outputs are never written (their flags are 0); du stands in as a valid pointer.
            let dz_s = dz.as_ref().unwrap_or(&du).slice::<T>()?;
            let part_d_s = if x.d.is_some() { part_d.as_slice() } else { du.slice::<T>()? };
            let part_bias_s = if x.delta_bias.is_some() { part_bias.as_slice() } else { du.slice::<T>()? };
            let (name, f) = kernel::<T>(&dev, "scan_bwd", plan, shared)?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&p).arg(&u).arg(&delta).arg(&a).arg(&b).arg(&c).arg(&d).arg(&z).arg(&bias).arg(&saved).arg(&gout);
            args.arg(du.slice::<T>()?).arg(ddelta.slice::<T>()?).arg(dz_s);
            args.arg(part_bc.as_slice()).arg(part_a.as_slice()).arg(part_d_s).arg(part_bias_s);
            // SAFETY: scan_bwd_s<SPL>_<T>(ScanParams, u, delta, A, Bm, Cm, D, z, delta_bias, saved, gout, du,
            // ddelta, dz, part_bc, part_a, part_d, part_bias) matches the arguments. Reads are the forward's plus
            // saved (B, C, chunks, S), made by the forward with this tile, and gout (B, C, L), contiguous views
            // of exactly their numel. Writes, each element exactly once: du, ddelta, dz at (b, c < C, t < L);
            // part_bc at (b, group < groups, 2, S, t < L), part_a at (b, c < C, n < S), part_d and part_bias
            // at (b, c < C) only when D and delta_bias are given: the sizes allocated above. The dynamic shared
            // memory is `backward_shared_bytes`, the kernel's layout, which it checks.
            unsafe { args.launch(grid(dims, plan, shared)?) }.map_err(|e| launch_error(&name, e))?;

            let sum = engine::cuda::kernel_name::<T>("scan_bwd_sum");
            let f = function::<T>(&dev, &MODULE, "scan_bwd_sum")?;
            let dd_s = dd.as_ref().unwrap_or(&da).slice::<T>()?;
            let dbias_s = dbias.as_ref().unwrap_or(&da).slice::<T>()?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&p).arg(part_bc.as_slice()).arg(part_a.as_slice()).arg(part_d_s).arg(part_bias_s);
            args.arg(db.slice::<T>()?).arg(dc.slice::<T>()?).arg(da.slice::<T>()?).arg(dd_s).arg(dbias_s);
            let n = 2 * batch * s * length + channels * s + 2 * channels;
            // SAFETY: scan_bwd_sum_<T>(ScanParams, part_bc, part_a, part_d, part_bias, dB, dC, dA, dD,
            // ddelta_bias) matches the arguments. For i < n it reads the partials written by scan_bwd above (at
            // the indices listed there; part_d and part_bias only when their flags are set) and writes dB, dC
            // (B S L each), dA (C S), dD and ddelta_bias (C) only when given: the buffers allocated above.
            unsafe { args.launch(dev.launch_config(n)) }.map_err(|e| launch_error(&sum, e))?;
        }
        Ok(ScanGrads {
            u: st(du),
            delta: st(ddelta),
            a: st(da),
            b: st(db),
            c: st(dc),
            d: dd.map(st),
            z: dz.map(st),
            delta_bias: dbias.map(st),
        })
    }
    match x.u.dtype() {
        DType::F32 => run::<f32>(x, states, g, dims, delta_softplus, chunk),
        DType::F64 => run::<f64>(x, states, g, dims, delta_softplus, chunk),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::DEFAULT_CHUNK;

    fn plan(spl: usize, lpc: usize, warps: usize, tile: usize) -> Plan {
        Plan { spl, lpc, warps, tile }
    }

    #[test]
    fn lanes_cover_every_state_count() {
        assert_eq!(lanes(1, &[]).unwrap(), (4, 1));
        assert_eq!(lanes(4, &[]).unwrap(), (4, 1));
        assert_eq!(lanes(5, &[]).unwrap(), (4, 2));
        assert_eq!(lanes(16, &[]).unwrap(), (4, 4));
        assert_eq!(lanes(40, &[]).unwrap(), (4, 16));
        assert_eq!(lanes(128, &[]).unwrap(), (4, 32));
        assert_eq!(lanes(129, &[]).unwrap(), (8, 32));
        assert_eq!(lanes(256, &[]).unwrap(), (8, 32));
        assert!(lanes(0, &[]).is_err());
        assert!(lanes(MAX_STATES + 1, &[]).is_err());
        for s in 1..=MAX_STATES {
            let (spl, lpc) = lanes(s, &[]).unwrap();
            assert!(lpc * spl >= s && lpc.is_power_of_two() && lpc <= 32 && [4, 8].contains(&spl), "S = {s}");
            // The fewest lanes that hold S: half as many would not.
            assert!(lpc == 1 || lpc / 2 * spl < s, "S = {s}");
        }
    }

    #[test]
    fn shared_memory_mirrors_the_kernel_layouts() {
        // Bytes from scan.cu's scan_fwd_layout / scan_bwd_layout (printed by the emulator harness, emu/).
        for (p, elem, fwd, bwd) in [
            (plan(4, 4, 4, 32), 4, 32256, 55296),
            (plan(4, 4, 1, 8), 4, 11520, 14208),
            (plan(4, 4, 4, 16), 8, 35840, 77312),
            (plan(4, 1, 2, 32), 4, 28800, 84224),
            (plan(8, 32, 1, 8), 8, 87360, 74848),
            (plan(4, 16, 4, 24), 4, 39168, 75744),
            (plan(8, 32, 2, 8), 4, 83520, 54176),
        ] {
            assert_eq!(forward_shared_bytes(p, elem), fwd, "{p:?} {elem}");
            assert_eq!(backward_shared_bytes(p, elem), bwd, "{p:?} {elem}");
        }
    }

    #[test]
    fn mamba_sizes_get_full_blocks_and_tiles_of_32() {
        // S = 16 in f32: 4 lanes of 4 states, 32 channels a block, saved states every 32 steps; four
        // backward blocks (54 KiB each, + 1 KiB the hardware keeps a block) fit an H100 multiprocessor.
        let tile = cuda_chunk(DEFAULT_CHUNK, 16, DType::F32).unwrap();
        assert_eq!(tile, 32);
        let (fwd, bwd) = plans(16, DType::F32, tile, &[]).unwrap();
        assert_eq!(fwd, plan(4, 4, 4, 32));
        assert_eq!(bwd, plan(4, 4, 4, 32));
        assert_eq!(bwd.channels(), 32);
        assert_eq!((bwd.groups(384), bwd.groups(1536)), (12, 48));
        assert!(4 * (backward_shared_bytes(bwd, 4) + 1024) <= 227 << 10);
        // f64 keeps the same blocks with half the tile.
        let tile = cuda_chunk(DEFAULT_CHUNK, 16, DType::F64).unwrap();
        assert_eq!(plans(16, DType::F64, tile, &[]).unwrap().1, plan(4, 4, 4, 16));
    }

    #[test]
    fn tiles_are_whole_sub_chunks_and_fit_the_budget() {
        for dtype in [DType::F32, DType::F64] {
            let elem = dtype.size_in_bytes();
            for s in 1..=MAX_STATES {
                for requested in [1, 4, 8, 9, 20, 33, DEFAULT_CHUNK, 1000] {
                    let tile = cuda_chunk(requested, s, dtype).unwrap();
                    assert!(
                        tile.is_multiple_of(TILE_STEP) && (TILE_STEP..=max_tile(dtype)).contains(&tile),
                        "{dtype} S {s}"
                    );
                    assert!(tile <= requested.max(TILE_STEP), "{dtype} S {s}: tile {tile} for {requested}");
                    // The backward is handed the forward's tile: asking again gives it back.
                    assert_eq!(cuda_chunk(tile, s, dtype).unwrap(), tile, "{dtype} S {s}");
                    let (fwd, bwd) = plans(s, dtype, tile, &[]).unwrap();
                    for p in [fwd, bwd] {
                        assert_eq!(p.tile, tile);
                        assert!(tile.is_multiple_of(sub_chunk(p.spl, elem)), "{dtype} S {s}");
                        assert!(p.channels() >= 1 && 32 * p.warps % p.lpc == 0, "{p:?}");
                    }
                    assert!(forward_shared_bytes(fwd, elem) <= SHARED_BUDGET, "{dtype} S {s}");
                    assert!(backward_shared_bytes(bwd, elem) <= SHARED_BUDGET, "{dtype} S {s}");
                }
            }
        }
        assert!(cuda_chunk(64, MAX_STATES + 1, DType::F32).is_err());
    }

    #[test]
    fn four_lanes_of_four_states_get_the_compiled_lane_count() {
        // In f32, Mamba's S = 16 and every S from 9 run scan_*_s4l4; the rest the kernels taking any lane count.
        for s in 1..=MAX_STATES {
            let (spl, lpc) = lanes(s, &[]).unwrap();
            let p = plan(spl, lpc, 4, 32);
            let want = if (9..=16).contains(&s) { "scan_fwd_s4l4".to_string() } else { format!("scan_fwd_s{spl}") };
            assert_eq!(instance("scan_fwd", p, DType::F32), want, "S = {s}");
            assert_eq!(instance("scan_fwd", p, DType::F64), format!("scan_fwd_s{spl}"), "S = {s}");
        }
        // scan.cu instantiates the specialised kernels for f32 only: the forward's template with the lane count
        // compiled in, and the backward's own kernel (scan_bwd4).
        assert!(MODULE.body.contains("SCAN_FWD_KERNEL(float, f32, s4l4, 4, 4,"));
        assert!(MODULE.body.contains("SCAN_FWD_KERNEL(float, f32, s2l8, 2, 8,"));
        assert_eq!(instance("scan_fwd", plan(2, 8, 4, 32), DType::F32), "scan_fwd_s2l8");
        assert!(MODULE.body.contains("SCAN_BWD_KERNEL(float, f32, s4l4, 4, scan_bwd4)"));
        assert!(!MODULE.body.contains("f64, s4l4"));
    }

    #[test]
    fn small_f32_grids_get_the_forward_of_8_lanes_of_2_states() {
        let tile = cuda_chunk(DEFAULT_CHUNK, 16, DType::F32).unwrap();
        let (fwd, _) = plans(16, DType::F32, tile, &[]).unwrap();
        let dims = |batch, channels| Dims { batch, channels, length: 4096, states: 16 };
        // The bench's sizes on an H100/H200 (132 multiprocessors): (64, 384) fills 768 of 792 slots and keeps
        // s4l4; (8, 1536) has 384 blocks and gets s2l8 (768 blocks, 27 KiB each, 7 a multiprocessor).
        assert_eq!(forward_plan(fwd, dims(64, 384), DType::F32, 132), fwd);
        let small = forward_plan(fwd, dims(8, 1536), DType::F32, 132);
        assert_eq!(small, plan(2, 8, 4, 32));
        assert_eq!(small.groups(1536), 96);
        assert_eq!(forward_shared_bytes(small, 4), 27648);
        assert!(7 * (forward_shared_bytes(small, 4) + 1024) <= 227 << 10);
        // f64 and other state counts keep their plans.
        let (fwd64, _) = plans(16, DType::F64, 16, &[]).unwrap();
        assert_eq!(forward_plan(fwd64, dims(8, 1536), DType::F64, 132), fwd64);
        let (fwd40, _) = plans(40, DType::F32, tile, &[]).unwrap();
        assert_eq!(forward_plan(fwd40, dims(1, 3), DType::F32, 132), fwd40);
    }

    #[test]
    fn sub_chunks_hold_32_registers_of_states() {
        assert_eq!(sub_chunk(4, 4), 8);
        assert_eq!(sub_chunk(8, 4), 4);
        assert_eq!(sub_chunk(4, 8), 4);
        assert_eq!(sub_chunk(8, 8), 2);
    }
}
