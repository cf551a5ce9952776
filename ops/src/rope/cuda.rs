//! CUDA path of RoPE-2D (rope.cu): one grid-stride launch per rotation, reading x through its view and the
//! uploaded (H + W, C/4, 2) table.

use engine::cuda::{CudaStorage, DeviceRepr, PushKernelArg};
use engine::{DType, Error, Float, Layout, Result};

use super::{Direction, Grid};
use crate::cuda::{function, launch, Module};

pub(crate) const MODULE: Module = Module { name: "ops_rope", body: include_str!("rope.cu") };

/// `struct RopeParams` of rope.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RopeParams {
    h: i64,
    w: i64,
    c: i64,
    pairs: i64,
    sign: i32,
    /// Explicit padding to a multiple of 8 bytes, so that no byte handed to the driver is uninitialised.
    pad: i32,
}

// The .cu side checks the same size with a static_assert.
const _: () = assert!(std::mem::size_of::<RopeParams>() == 40);

// SAFETY: plain i64 and i32 fields in C layout with explicit padding, the layout of `struct RopeParams`.
unsafe impl DeviceRepr for RopeParams {}

/// y = x (B, N, C) rotated pairwise by the table's angles (`Backward`: by their negatives), contiguous.
pub(super) fn rotate(
    x: &CudaStorage,
    lx: &Layout,
    table: &CudaStorage,
    lt: &Layout,
    grid: Grid,
    dir: Direction,
) -> Result<CudaStorage> {
    fn run<T: Float>(
        x: &CudaStorage,
        lx: &Layout,
        table: &CudaStorage,
        lt: &Layout,
        grid: Grid,
        dir: Direction,
    ) -> Result<CudaStorage> {
        const OP: &str = "rope2d";
        let dev = x.device();
        let n = lx.numel();
        let y = dev.alloc::<T>(n)?;
        if n > 0 {
            if !lt.is_contiguous() || lt.numel() != (grid.h + grid.w) * grid.c / 2 {
                return Err(Error::invalid(OP, "internal: the table is not a contiguous (H + W, C/4, 2)", lt.shape()));
            }
            let sx = x.strided(OP, lx)?;
            let tv = table
                .slice::<T>()?
                .try_slice(lt.offset()..lt.offset() + lt.numel())
                .ok_or_else(|| Error::invalid(OP, "internal: the table exceeds its storage", lt.shape()))?;
            let p = RopeParams {
                h: grid.h as i64,
                w: grid.w as i64,
                c: grid.c as i64,
                pairs: (n / 2) as i64,
                sign: if dir == Direction::Forward { 1 } else { -1 },
                pad: 0,
            };
            let f = function::<T>(dev, &MODULE, "rope")?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(x.slice::<T>()?).arg(&sx).arg(&tv).arg(y.as_slice()).arg(&p);
            // SAFETY: rope_<T>(const T* x, Strided lx, const T* table, T* y, RopeParams p) reads x through lx
            // at indices below 2 pairs = n (checked against its buffer by `strided`), the table at rows below
            // H + W of C/2 entries (its length, checked above), and writes y[0..n), which `y` holds. The op
            // checked that x is (B, H W, C) with C a multiple of 4.
            unsafe { launch(OP, dev, args, n / 2)? };
        }
        CudaStorage::from_slice(dev, y)
    }
    crate::util::same_cuda_dtypes("rope2d", &[x, table])?;
    match x.dtype() {
        DType::F32 => run::<f32>(x, lx, table, lt, grid, dir),
        DType::F64 => run::<f64>(x, lx, table, lt, grid, dir),
    }
}
