//! CUDA paths of the scan (scan.cu).
//!
//! Design: one block of 128 threads per (batch, group of channels). A channel gets `lanes` threads of one warp,
//! the next power of two >= S capped at 32, and each thread holds `states_per_thread` = ceil(S / lanes), rounded
//! up to 1, 2, 4 or 8 (one kernel instantiation each, so the states stay in registers and S <= 32 pays for one),
//! of its states (S = 16, Mamba's default: 16 lanes, one state each, 8 channels a block). Time is
//! sequential within a thread; the parallelism is B x C x min(S, 32) threads, which fills an H100 at Mamba's
//! sizes (B 8, C 1536: 196k threads). The readout sum over states is a warp shuffle.
//!
//! The forward saves the state entering every chunk. The backward walks the chunks in reverse and recomputes a
//! chunk's states into shared memory, (chunk, states_per_thread, 128) elements, so the chunk length trades
//! shared memory (and with it occupancy) against the memory of the saved states: `cuda_chunk` keeps the
//! recomputed states at most [`STATE_TILE_BYTES`] per thread (chunk 64 for f32, 32 for f64 at S <= 32).
//!
//! Reductions: dA, dD and ddelta_bias are summed per thread over time and added with one atomicAdd per
//! thread; dB and dC (sums over channels) go through a shared (chunk, S) tile per block, then one global
//! atomicAdd per element and block. Atomics make the f32 and f64 results depend on the order blocks finish
//! (roundoff only); the CPU path is the deterministic one.

use std::sync::{Arc, RwLockReadGuard};

use engine::cuda::{CudaDevice, CudaStorage, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use engine::{DType, Error, Float, Result, Storage, Tensor};

use super::{Dims, Forward, Operands, ScanGrads, OP};
use crate::cuda::{function, Module};

pub(crate) const MODULE: Module = Module { name: "ops_scan", body: include_str!("scan.cu") };

/// Threads of a block (SCAN_THREADS in scan.cu).
const THREADS: usize = 128;
/// Most states one thread holds (the largest SPT instantiated in scan.cu): with 32 lanes, S <= 256.
const MAX_STATES_PER_THREAD: usize = 8;
/// Shared memory per thread for the backward's recomputed states.
const STATE_TILE_BYTES: usize = 256;
/// Dynamic shared memory a block may take without opting in.
const MAX_SHARED_BYTES: usize = 48 << 10;

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
    u_batch_stride: i64,
    u_channel_stride: i64,
    bc_batch_stride: i64,
    bc_state_stride: i64,
    a_channel_stride: i64,
    saved_batch_stride: i64,
    saved_channel_stride: i64,
    saved_chunk_stride: i64,
    lanes: i32,
    states_per_thread: i32,
    has_d: i32,
    has_z: i32,
    has_delta_bias: i32,
    delta_softplus: i32,
}

const _: () = assert!(std::mem::size_of::<ScanParams>() == 136);

// SAFETY: integers only, #[repr(C)] with no padding (14 i64 then 6 i32), the layout of the .cu struct.
unsafe impl DeviceRepr for ScanParams {}

/// (lanes, states per thread) for S states: the states per thread are rounded up to a power of two, the
/// instantiations of scan.cu (1, 2, 4, 8).
fn lanes(states: usize) -> (usize, usize) {
    let lanes = states.next_power_of_two().min(32);
    (lanes, states.div_ceil(lanes).next_power_of_two())
}

/// `scan_fwd` / `scan_bwd` for this many states, e.g. `scan_bwd_s1`.
fn kernel(base: &str, states: usize) -> String {
    format!("{base}_s{}", lanes(states).1)
}

/// The backward's dynamic shared memory for a chunk: the recomputed states and the dB, dC tiles.
fn shared_bytes(chunk: usize, states: usize, elem: usize) -> usize {
    let (_, spt) = lanes(states);
    (chunk * spt * THREADS + 2 * chunk * states) * elem
}

/// The chunk the CUDA kernels use when `requested` is asked for: no longer than the state tile allows.
pub(crate) fn cuda_chunk(requested: usize, states: usize, dtype: DType) -> usize {
    let elem = dtype.size_in_bytes();
    let (_, spt) = lanes(states);
    let mut chunk = requested.min(STATE_TILE_BYTES / (spt * elem)).max(1);
    while chunk > 1 && shared_bytes(chunk, states, elem) > MAX_SHARED_BYTES {
        chunk -= 1;
    }
    chunk
}

fn params(dims: Dims, chunk: usize, x: &Operands, delta_softplus: bool) -> Result<ScanParams> {
    let Dims { batch, channels, length, states } = dims;
    let (lanes, spt) = lanes(states);
    if spt > MAX_STATES_PER_THREAD {
        return Err(Error::invalid(
            OP,
            format!("the CUDA kernels take at most {} states, got {states}", 32 * MAX_STATES_PER_THREAD),
            x.a.shape(),
        ));
    }
    let n_chunks = dims.chunks(chunk);
    let i = |v: usize| i64::try_from(v).map_err(|_| Error::invalid(OP, "size does not fit in i64", x.u.shape()));
    Ok(ScanParams {
        batch: i(batch)?,
        channels: i(channels)?,
        length: i(length)?,
        states: i(states)?,
        chunk: i(chunk)?,
        n_chunks: i(n_chunks)?,
        u_batch_stride: i(channels * length)?,
        u_channel_stride: i(length)?,
        bc_batch_stride: i(states * length)?,
        bc_state_stride: i(length)?,
        a_channel_stride: i(states)?,
        saved_batch_stride: i(channels * n_chunks * states)?,
        saved_channel_stride: i(n_chunks * states)?,
        saved_chunk_stride: i(states)?,
        lanes: lanes as i32,
        states_per_thread: spt as i32,
        has_d: x.d.is_some() as i32,
        has_z: x.z.is_some() as i32,
        has_delta_bias: x.delta_bias.is_some() as i32,
        delta_softplus: delta_softplus as i32,
    })
}

/// One block per (batch, group of 128 / lanes channels).
fn grid(dims: Dims, shared: usize) -> Result<LaunchConfig> {
    let (lanes, _) = lanes(dims.states);
    let blocks = dims.batch * dims.channels.div_ceil(THREADS / lanes);
    let blocks = u32::try_from(blocks).ok().filter(|&b| b < i32::MAX as u32).ok_or_else(|| {
        Error::invalid(OP, format!("{blocks} blocks exceed the CUDA grid"), &[dims.batch, dims.channels, dims.length])
    })?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: shared as u32 })
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
        let chunk = cuda_chunk(chunk, dims.states, T::DTYPE);
        let p = params(dims, chunk, x, delta_softplus)?;
        let Dims { batch, channels, length, states } = dims;
        let out = dev.alloc::<T>(batch * channels * length)?;
        let saved = dev.alloc::<T>(batch * channels * dims.chunks(chunk) * states)?;
        if batch * channels * length > 0 {
            let v = Views::new(x, &[]);
            let view = |t: &Tensor| v.view::<T>(t);
            let (u, delta, a, b, c) = (view(&x.u)?, view(&x.delta)?, view(&x.a)?, view(&x.b)?, view(&x.c)?);
            // Absent operands are never read (their flags are 0); u stands in as a valid pointer.
            let opt = |t: &Option<Tensor>| view(t.as_ref().unwrap_or(&x.u));
            let (d, z, bias) = (opt(&x.d)?, opt(&x.z)?, opt(&x.delta_bias)?);
            let base = kernel("scan_fwd", dims.states);
            let (name, f) = (engine::cuda::kernel_name::<T>(&base), function::<T>(&dev, &MODULE, &base)?);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&p).arg(&u).arg(&delta).arg(&a).arg(&b).arg(&c).arg(&d).arg(&z).arg(&bias);
            args.arg(out.as_slice()).arg(saved.as_slice());
            // SAFETY: scan_fwd_s<SPT>_<T>(ScanParams, u, delta, A, Bm, Cm, D, z, delta_bias, out, saved) matches the
            // arguments. Every operand was checked against `dims` at op entry and is a contiguous view of
            // exactly its numel, and `p`'s strides are those contiguous strides; blocks cover b < B and
            // clamp c < C, reading u/delta/z at (b, c, t < L), A at (c, n < S), Bm/Cm at (b, n < S, t < L),
            // D/delta_bias at c only when given. Writes: out at (b, c, t) (B C L elements allocated) and
            // saved at (b, c, k < chunks, n < S) (B C chunks S allocated).
            unsafe { args.launch(grid(dims, 0)?) }.map_err(|e| launch_error(&name, e))?;
        }
        Ok(Forward {
            out: Storage::Cuda(CudaStorage::from_slice(&dev, out)?),
            states: Storage::Cuda(CudaStorage::from_slice(&dev, saved)?),
            chunk,
        })
    }
    match x.u.dtype() {
        DType::F32 => run::<f32>(x, dims, delta_softplus, chunk),
        DType::F64 => run::<f64>(x, dims, delta_softplus, chunk),
    }
}

/// A zero-filled buffer of `n` elements: the target of atomic adds.
fn zeros<T: Float>(dev: &Arc<CudaDevice>, n: usize) -> Result<CudaStorage> {
    let mut s = CudaStorage::alloc(dev, n, T::DTYPE)?;
    s.fill(0.0)?;
    Ok(s)
}

/// Backward: every input's gradient for the output cotangent `g`, from the saved chunk-entry states.
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
        let p = params(dims, chunk, x, delta_softplus)?;
        let Dims { batch, channels, length, states: s } = dims;
        let bcl = batch * channels * length;
        // Written in full by the kernel (every (b, c, t) by its channel's first lane).
        let (du, ddelta) = (CudaStorage::alloc(&dev, bcl, T::DTYPE)?, CudaStorage::alloc(&dev, bcl, T::DTYPE)?);
        let dz = x.z.as_ref().map(|_| CudaStorage::alloc(&dev, bcl, T::DTYPE)).transpose()?;
        // Accumulated with atomics.
        let (da, db, dc) = (
            zeros::<T>(&dev, channels * s)?,
            zeros::<T>(&dev, batch * s * length)?,
            zeros::<T>(&dev, batch * s * length)?,
        );
        let dd = x.d.as_ref().map(|_| zeros::<T>(&dev, channels)).transpose()?;
        let dbias = x.delta_bias.as_ref().map(|_| zeros::<T>(&dev, channels)).transpose()?;
        if bcl > 0 {
            let v = Views::new(x, &[states, g]);
            let view = |t: &Tensor| v.view::<T>(t);
            let (u, delta, a, b, c) = (view(&x.u)?, view(&x.delta)?, view(&x.a)?, view(&x.b)?, view(&x.c)?);
            let opt = |t: &Option<Tensor>| view(t.as_ref().unwrap_or(&x.u));
            let (d, z, bias) = (opt(&x.d)?, opt(&x.z)?, opt(&x.delta_bias)?);
            let (saved, gout) = (view(states)?, view(g)?);
            // Absent gradients are never written (their flags are 0); du stands in as a valid pointer.
            let (dd_s, dz_s, dbias_s) = (
                dd.as_ref().unwrap_or(&du).slice::<T>()?,
                dz.as_ref().unwrap_or(&du).slice::<T>()?,
                dbias.as_ref().unwrap_or(&du).slice::<T>()?,
            );
            let base = kernel("scan_bwd", dims.states);
            let (name, f) = (engine::cuda::kernel_name::<T>(&base), function::<T>(&dev, &MODULE, &base)?);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&p).arg(&u).arg(&delta).arg(&a).arg(&b).arg(&c).arg(&d).arg(&z).arg(&bias).arg(&saved).arg(&gout);
            args.arg(du.slice::<T>()?).arg(ddelta.slice::<T>()?).arg(da.slice::<T>()?).arg(db.slice::<T>()?);
            args.arg(dc.slice::<T>()?).arg(dd_s).arg(dz_s).arg(dbias_s);
            let shared = shared_bytes(chunk, s, T::DTYPE.size_in_bytes());
            // SAFETY: scan_bwd_s<SPT>_<T>(ScanParams, u, delta, A, Bm, Cm, D, z, delta_bias, saved, gout, du, ddelta,
            // dA, dB, dC, dD, dz, ddelta_bias) matches the arguments. Reads are those of the forward plus
            // saved (B, C, chunks, S), made by the forward with this `chunk`, and gout (B, C, L). Writes: du,
            // ddelta, dz at (b, c, t), dA at (c, n), dB/dC at (b, n, t), dD/ddelta_bias at c, all inside the
            // buffers allocated above for those shapes (dD, dz, ddelta_bias only when given). The dynamic
            // shared memory is `shared_bytes(chunk, ..)`, what the kernel indexes, at most 48 KiB
            // (`cuda_chunk` chose the chunk).
            unsafe { args.launch(grid(dims, shared)?) }.map_err(|e| launch_error(&name, e))?;
        }
        let st = Storage::Cuda;
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

    #[test]
    fn lanes_and_instantiations_cover_every_state_count() {
        assert_eq!(lanes(1), (1, 1));
        assert_eq!(lanes(3), (4, 1));
        assert_eq!(lanes(16), (16, 1));
        assert_eq!(lanes(33), (32, 2));
        assert_eq!(lanes(40), (32, 2));
        assert_eq!(lanes(65), (32, 4));
        assert_eq!(lanes(256), (32, 8));
        for s in 1..=256 {
            let (lanes, spt) = lanes(s);
            assert!(lanes * spt >= s && THREADS.is_multiple_of(lanes) && [1, 2, 4, 8].contains(&spt), "S = {s}");
            assert_eq!(kernel("scan_bwd", s), format!("scan_bwd_s{spt}"));
        }
    }

    #[test]
    fn chunks_fit_the_shared_memory() {
        assert_eq!(cuda_chunk(64, 16, DType::F32), 64);
        assert_eq!(cuda_chunk(64, 16, DType::F64), 32);
        assert_eq!(cuda_chunk(3, 16, DType::F64), 3);
        for dtype in [DType::F32, DType::F64] {
            for s in 1..=256 {
                let chunk = cuda_chunk(DEFAULT_CHUNK, s, dtype);
                assert!((1..=DEFAULT_CHUNK).contains(&chunk), "{dtype} S = {s}");
                assert!(shared_bytes(chunk, s, dtype.size_in_bytes()) <= MAX_SHARED_BYTES, "{dtype} S = {s}");
            }
        }
    }
}
