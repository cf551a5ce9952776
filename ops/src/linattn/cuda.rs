//! CUDA path of the fused linear attention (linattn.cu): two launches forward (token slices' partial sums of
//! kv and k; then out, combining them), two backward (partial sums of dkv and dkmean with ds per token; then
//! dqk and dv: one block a slice for widths whose tiles fit, else q's half and k's half by separate blocks).
//! Everything is enqueued on the device's stream.

use engine::cuda::{kernel_name, CudaDevice, CudaFunction, CudaStorage, DeviceRepr, LaunchConfig, PushKernelArg};
use engine::{DType, Error, Float, Result};

use super::{Dims, OP};
use crate::cuda::{elements, function, Module, View};

pub(crate) const MODULE: Module = Module { name: "ops_linattn", body: include_str!("linattn.cu") };

/// `struct LinAttnParams` of linattn.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct LinAttnParams {
    batch: i64,
    tokens: i64,
    channels: i64,
    heads: i64,
    d: i64,
    grid_h: i64,
    grid_w: i64,
    span: i64,
    slices: i64,
    eps: f64,
    inv_n: f64,
}

// The .cu side checks the same size with a static_assert.
const _: () = assert!(std::mem::size_of::<LinAttnParams>() == 88);

// SAFETY: i64 and f64 fields only, #[repr(C)] without padding, the layout of `struct LinAttnParams`.
unsafe impl DeviceRepr for LinAttnParams {}

/// How the kernels cut the work: head width padded to `dp`, `slices` slices of `span` tokens per
/// (batch, head), `threads` per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub dp: usize,
    pub span: usize,
    pub slices: usize,
    pub threads: u32,
}

/// The kernels' padded head width for head width d: the next of 8, 16, 32, 64.
pub(crate) fn padded_width(d: usize, shape: &[usize]) -> Result<usize> {
    [8, 16, 32, 64].into_iter().find(|&w| d <= w).ok_or_else(|| {
        Error::invalid(OP, format!("head width {d} is above the CUDA kernels' 64 (use linear_attention_ref)"), shape)
    })
}

/// Threads a block of the kernels for padded width `dp`, as `LaCfg::NT`.
fn threads(dp: usize) -> u32 {
    if dp <= 8 {
        64
    } else {
        256
    }
}

/// The kernel `<base>_d<dp>_<dtype>` and the (batch, head, slice) blocks of one wave of it (`per` blocks a
/// slice: 2 for the backward's two-role token pass).
fn kernel<T: Float>(dev: &CudaDevice, base: &str, dp: usize, per: usize) -> Result<(String, CudaFunction, usize)> {
    let base = format!("{base}_d{dp}");
    let f = function::<T>(dev, &MODULE, &base)?;
    let wave = dev.wave(MODULE.name, &kernel_name::<T>(&base), &f, threads(dp))?;
    Ok((base, f, (wave / per).max(1)))
}

/// Whether the backward's token pass for padded width `dp` is linattn.cu's tiled kernel (one block a slice
/// doing dq, dk and dv), as `LaTok::TILED`: its three tiles and three d x d matrices fit 48 KiB of shared
/// memory (f32 up to width 32, f64 up to 16). Otherwise it is the two-role kernel, two blocks a slice.
pub(crate) fn tiled_tokens(dp: usize, elem_bytes: usize) -> bool {
    let threads = threads(dp) as usize;
    let tm = if elem_bytes == 4 { 2 } else { 1 }; // tokens a thread
    let tt = threads / (dp / 4) * tm; // tokens a tile
    let tile = dp * (tt + tm);
    (3 * tile + 3 * dp * dp) * elem_bytes <= 48 * 1024
}

/// Blocks of the backward's token pass a (batch, head, slice): `blockIdx.y` values.
fn token_roles(dp: usize, elem_bytes: usize) -> usize {
    if tiled_tokens(dp, elem_bytes) {
        1
    } else {
        2
    }
}

/// Tokens per tile, as `LaCfg::TT` of linattn.cu: 4 KiB tiles, 2 KiB when a d x d matrix is over 16 KiB.
pub(crate) fn tile_tokens(dp: usize, elem_bytes: usize) -> usize {
    let tile_bytes = if elem_bytes * dp * dp > 16384 { 2048 } else { 4096 };
    tile_bytes / elem_bytes / dp
}

/// The blocks one wave of each of a pass's two kernels holds, in (batch, head, slice) blocks: the reduction's
/// and the token pass's (whose grid the backward doubles: its wave counts half).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Waves {
    pub reduce: usize,
    pub tokens: usize,
}

impl Plan {
    /// Slices of whole tiles per (batch, head), chosen so that both kernels fill whole waves: for each slice
    /// count (up to the tiles, and to 4 waves of blocks) the cost is, per kernel, the waves it takes times
    /// one block's work in tiles plus a block's fixed cost (1 tile, and 1/8 of one for each partial sum the
    /// token pass combines); the cheapest count wins, the fewer slices on ties.
    pub(crate) fn new(dims: Dims, elem_bytes: usize, waves: Waves, shape: &[usize]) -> Result<Plan> {
        let dp = padded_width(dims.d, shape)?;
        let tt = tile_tokens(dp, elem_bytes);
        let tiles = dims.tokens.div_ceil(tt).max(1);
        let pairs = (dims.batch * dims.heads).max(1);
        let (wr, wt) = (waves.reduce.max(1), waves.tokens.max(1));
        let most = (4 * wr.max(wt)).div_ceil(pairs).clamp(1, tiles);
        let mut best: Option<(usize, usize, usize)> = None; // (cost in eighths of a tile, span, slices)
        for wanted in 1..=most {
            let span_tiles = tiles.div_ceil(wanted);
            let slices = tiles.div_ceil(span_tiles);
            let blocks = pairs * slices;
            let block = 8 * (span_tiles + 1) + slices;
            let cost = (blocks.div_ceil(wr) + blocks.div_ceil(wt)) * block;
            if best.is_none_or(|(c, _, _)| cost < c) {
                best = Some((cost, span_tiles * tt, slices));
            }
        }
        let (_, span, _) = best.expect("at least one slice count");
        let slices = dims.tokens.div_ceil(span).max(1);
        Ok(Plan { dp, span, slices, threads: threads(dp) })
    }

    /// `y` blocks (the backward's two halves) of each of the (batch, head, slice) blocks.
    fn config(&self, dims: Dims, y: u32, shape: &[usize]) -> Result<LaunchConfig> {
        let blocks = dims.batch * dims.heads * self.slices;
        let blocks = u32::try_from(blocks)
            .ok()
            .filter(|&b| b < i32::MAX as u32)
            .ok_or_else(|| Error::invalid(OP, format!("{blocks} blocks exceed the CUDA grid"), shape))?;
        Ok(LaunchConfig { grid_dim: (blocks, y, 1), block_dim: (self.threads, 1, 1), shared_mem_bytes: 0 })
    }
}

fn params(dims: Dims, plan: Plan, shape: &[usize]) -> Result<LinAttnParams> {
    // The kernels divide token indices and channels in 32 bits.
    if i32::try_from(dims.tokens).is_err() || i32::try_from(2 * dims.channels).is_err() {
        return Err(Error::invalid(OP, "tokens and channels must fit in an i32 on CUDA", shape));
    }
    let i = |v: usize| i64::try_from(v).map_err(|_| Error::invalid(OP, "size does not fit in i64", shape));
    Ok(LinAttnParams {
        batch: i(dims.batch)?,
        tokens: i(dims.tokens)?,
        channels: i(dims.channels)?,
        heads: i(dims.heads)?,
        d: i(dims.d)?,
        grid_h: i(dims.grid_h)?,
        grid_w: i(dims.grid_w)?,
        span: i(plan.span)?,
        slices: i(plan.slices)?,
        eps: dims.eps,
        inv_n: 1.0 / dims.tokens as f64,
    })
}

fn launch_error(kernel: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda { op: OP, msg: format!("launching {kernel}: {e:?}") }
}

fn storage<T: Float>(dev: &std::sync::Arc<CudaDevice>, s: engine::cuda::PooledSlice<T>) -> Result<CudaStorage> {
    CudaStorage::from_slice(dev, s)
}

/// Forward: (out (B, N, C), kmean (B, C), kv (B, heads, d, d)) from the contiguous qk, v and the RoPE table.
pub(super) fn forward(qk: View, v: View, table: View, dims: Dims) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    fn run<T: Float>(qk: View, v: View, table: View, dims: Dims) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
        let dev = qk.0.device();
        let Dims { batch, tokens, channels, heads, d, .. } = dims;
        let shape = qk.1.shape();
        let out = dev.alloc::<T>(batch * tokens * channels)?;
        let kmean = dev.alloc::<T>(batch * channels)?;
        let kv = dev.alloc::<T>(batch * heads * d * d)?;
        if batch * tokens > 0 {
            let dp = padded_width(d, shape)?;
            let (reduce, f_reduce, wr) = kernel::<T>(dev, "linattn_fwd_reduce", dp, 1)?;
            let (out_k, f_out, wt) = kernel::<T>(dev, "linattn_fwd_out", dp, 1)?;
            let waves = Waves { reduce: wr, tokens: wt };
            let plan = Plan::new(dims, T::DTYPE.size_in_bytes(), waves, shape)?;
            let p = params(dims, plan, shape)?;
            let parts = batch * heads * plan.slices;
            let part_kv = dev.alloc::<T>(parts * d * d)?;
            let part_ks = dev.alloc::<T>(parts * d)?;
            let (qkv, vv, tv) = (elements::<T>(OP, qk)?, elements::<T>(OP, v)?, elements::<T>(OP, table)?);
            let cfg = plan.config(dims, 1, shape)?;

            let (base, f) = (reduce, f_reduce);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&p).arg(&qkv).arg(&vv).arg(&tv).arg(part_kv.as_slice()).arg(part_ks.as_slice());
            // SAFETY: linattn_fwd_reduce_d<DP>_<T>(LinAttnParams, qk, v, table, part_kv, part_ks) matches the
            // arguments. qk (B, N, 2C), v (B, N, C) and the table (H + W, C/4, 2) are contiguous views of exactly
            // their numel, checked at op entry against `dims`, which `p` carries; the kernel reads qk and v at
            // tokens n < N of batches b < B and channels below C, the table at rows below H + W (n / W < H), and
            // writes part_kv at (block, i < d, e < d) and part_ks at (block, i < d) for the B heads slices
            // blocks of `cfg`, which is what was allocated.
            unsafe { args.launch(cfg) }.map_err(|e| launch_error(&base, e))?;

            let (base, f) = (out_k, f_out);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&p).arg(&qkv).arg(&tv).arg(part_kv.as_slice()).arg(part_ks.as_slice());
            args.arg(kv.as_slice()).arg(kmean.as_slice()).arg(out.as_slice());
            // SAFETY: linattn_fwd_out_d<DP>_<T>(LinAttnParams, qk, table, part_kv, part_ks, kv, kmean, out)
            // matches the arguments; it reads qk and the table as above and the partials the previous launch
            // wrote (same plan, same stream), and writes kv (B heads d d), kmean (B C) and out (B N C) at
            // in-range indices only, as allocated above.
            unsafe { args.launch(cfg) }.map_err(|e| launch_error(&base, e))?;
        }
        Ok((storage(dev, out)?, storage(dev, kmean)?, storage(dev, kv)?))
    }
    crate::util::same_cuda_dtypes(OP, &[qk.0, v.0, table.0])?;
    match qk.0.dtype() {
        DType::F32 => run::<f32>(qk, v, table, dims),
        DType::F64 => run::<f64>(qk, v, table, dims),
    }
}

/// Backward: (dqk (B, N, 2C), dv (B, N, C)) for the cotangent g, from the forward's kmean and kv.
pub(super) fn backward(
    qk: View,
    v: View,
    table: View,
    kmean: View,
    kv: View,
    g: View,
    dims: Dims,
) -> Result<(CudaStorage, CudaStorage)> {
    fn run<T: Float>(
        qk: View,
        v: View,
        table: View,
        kmean: View,
        kv: View,
        g: View,
        dims: Dims,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let dev = qk.0.device();
        let Dims { batch, tokens, channels, heads, d, .. } = dims;
        let shape = qk.1.shape();
        let dqk = dev.alloc::<T>(batch * tokens * 2 * channels)?;
        let dv = dev.alloc::<T>(batch * tokens * channels)?;
        if batch * tokens > 0 {
            let dp = padded_width(d, shape)?;
            let (reduce, f_reduce, wr) = kernel::<T>(dev, "linattn_bwd_reduce", dp, 1)?;
            let roles = token_roles(dp, T::DTYPE.size_in_bytes());
            let (tokens_k, f_tokens, wt) = kernel::<T>(dev, "linattn_bwd_tokens", dp, roles)?;
            let waves = Waves { reduce: wr, tokens: wt };
            let plan = Plan::new(dims, T::DTYPE.size_in_bytes(), waves, shape)?;
            let p = params(dims, plan, shape)?;
            let parts = batch * heads * plan.slices;
            let part_dkv = dev.alloc::<T>(parts * d * d)?;
            let part_dkm = dev.alloc::<T>(parts * d)?;
            let ds = dev.alloc::<T>(batch * heads * tokens)?;
            let (qkv, vv, tv) = (elements::<T>(OP, qk)?, elements::<T>(OP, v)?, elements::<T>(OP, table)?);
            let (kmv, kvv, gv) = (elements::<T>(OP, kmean)?, elements::<T>(OP, kv)?, elements::<T>(OP, g)?);

            let (base, f) = (reduce, f_reduce);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&p).arg(&qkv).arg(&tv).arg(&kvv).arg(&kmv).arg(&gv);
            args.arg(part_dkv.as_slice()).arg(part_dkm.as_slice()).arg(ds.as_slice());
            // SAFETY: linattn_bwd_reduce_d<DP>_<T>(LinAttnParams, qk, table, kv, kmean, g, part_dkv, part_dkm, ds)
            // matches the arguments. qk, the table, kv (B heads d d), kmean (B C) and g (B N C) are contiguous
            // views of their numel (the saved tensors of the forward with these dims, g checked by the engine
            // against the output's shape); reads stay below those sizes; writes go to part_dkv (block, d, d),
            // part_dkm (block, d) and ds (B heads N) as allocated.
            unsafe { args.launch(plan.config(dims, 1, shape)?) }.map_err(|e| launch_error(&base, e))?;

            let (base, f) = (tokens_k, f_tokens);
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&p).arg(&qkv).arg(&vv).arg(&tv).arg(&kvv).arg(&kmv).arg(&gv).arg(ds.as_slice());
            args.arg(part_dkv.as_slice()).arg(part_dkm.as_slice()).arg(dqk.as_slice()).arg(dv.as_slice());
            // SAFETY: linattn_bwd_tokens_d<DP>_<T>(LinAttnParams, qk, v, table, kv, kmean, g, ds, part_dkv,
            // part_dkm, dqk, dv) matches the arguments; it reads the operands above and what the previous launch
            // wrote (same plan, same stream), and writes dqk (B N 2C) and dv (B N C) at in-range indices, every
            // element once: the tiled kernel (`roles` 1) all of a slice's in one block, the two-role kernel across
            // its two halves (blockIdx.y 0: q's channels, 1: k's channels and dv).
            unsafe { args.launch(plan.config(dims, roles as u32, shape)?) }.map_err(|e| launch_error(&base, e))?;
        }
        Ok((storage(dev, dqk)?, storage(dev, dv)?))
    }
    crate::util::same_cuda_dtypes(OP, &[qk.0, v.0, table.0, kmean.0, kv.0, g.0])?;
    match qk.0.dtype() {
        DType::F32 => run::<f32>(qk, v, table, kmean, kv, g, dims),
        DType::F64 => run::<f64>(qk, v, table, kmean, kv, g, dims),
    }
}
