//! Planning the vectorised ("flat") launches of elementwise kernels: which kernel form runs for which
//! operand layouts, and how many blocks it gets. Pure functions of layouts and addresses, so the choices are
//! unit-tested without a device (tests at the end of this file).
//!
//! An elementwise kernel comes in two forms. The Strided form takes each input as a [`Strided`] view and
//! finds element i with `offset_of` (a division and a modulo per merged dim): it handles any layout. The
//! vectorised form (`map16` in prelude.cuh) takes each input as a pointer to its first element and a *period*
//! ([`Flat`]), reads and writes 16 bytes per instruction, and is chosen by [`plan`] when every input is
//! [`Flat`] and every pointer it would dereference 16 bytes at a time is 16-byte aligned. A view whose offset
//! breaks the alignment (a narrow starting at an odd element, say) falls back to the Strided form, which makes
//! no alignment assumption beyond the element's own.
//!
//! [`Strided`]: super::Strided

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig};

use crate::Layout;

/// Bytes of one vector access (float4 / double2).
pub const VECTOR_BYTES: usize = 16;

/// Packs of 16 bytes a thread loads per turn of the vectorised loop: `VEC_UNROLL` in prelude.cuh.
pub const UNROLL: usize = 4;

/// Threads per block of the vectorised kernels.
pub const THREADS: u32 = 256;

/// How the vectorised kernels find an input's element for output index i, given a pointer `p` to the input's
/// first element (its layout's offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flat {
    /// `p[i]`: the view is contiguous.
    Contiguous,
    /// `p[0]`: every element is the same one (a scalar broadcast; all strides 0).
    Scalar,
    /// `p[i % period]`: a contiguous block of `period` elements repeated over the leading dims (a bias of shape
    /// (C,) broadcast over (N, C), say).
    Repeat(usize),
}

impl Flat {
    /// The flat form of `layout`, if it has one.
    pub fn of(layout: &Layout) -> Option<Flat> {
        if layout.is_contiguous() {
            return Some(Flat::Contiguous);
        }
        let (shape, strides) = (layout.shape(), layout.strides());
        // The broadcast dims (size > 1, stride 0) must all come before the repeated block.
        let k = match (0..shape.len()).rev().find(|&d| shape[d] > 1 && strides[d] == 0) {
            Some(d) => d + 1,
            None => return None, // no broadcast dim, and not contiguous: a permutation or a narrow
        };
        if (0..k).any(|d| shape[d] > 1 && strides[d] != 0) {
            return None;
        }
        let block = Layout::new(shape[k..].to_vec(), strides[k..].to_vec(), layout.offset());
        if !block.is_contiguous() {
            return None;
        }
        match block.numel() {
            1 => Some(Flat::Scalar),
            p => Some(Flat::Repeat(p)),
        }
    }

    /// The kernel argument: 0 contiguous, 1 scalar, else the repeat's period.
    pub fn period(self) -> i64 {
        match self {
            Flat::Contiguous => 0,
            Flat::Scalar => 1,
            Flat::Repeat(p) => p as i64,
        }
    }

    /// Elements of the buffer the kernel reads from the first one on, for an output of `numel` elements.
    pub fn span(self, numel: usize) -> usize {
        match self {
            Flat::Contiguous => numel,
            Flat::Scalar => 1.min(numel),
            Flat::Repeat(p) => p.min(numel),
        }
    }
}

/// The kernel form an elementwise launch uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// The vectorised form, with each input's [`Flat`] form in order.
    Vector(Vec<Flat>),
    /// The Strided form: some input has no flat form, or a pointer is not 16-byte aligned.
    Strided,
}

/// Chooses the kernel form for inputs `(layout, base address of its buffer)` over one output shape, and
/// contiguous outputs at `outputs`, with elements of `elem_bytes` bytes.
///
/// Vector needs every input flat and each 16-byte access aligned: the outputs' addresses, and the address of the
/// first element of every contiguous or repeated input (`base + offset * elem_bytes`), are multiples of 16, and
/// a repeat's period is a whole number of 16-byte packs. A scalar input is read one element at a time, so its
/// address may be anything.
pub fn plan(inputs: &[(&Layout, u64)], outputs: &[u64], elem_bytes: usize) -> Path {
    let width = (VECTOR_BYTES / elem_bytes) as u64;
    let aligned = |addr: u64| addr.is_multiple_of(VECTOR_BYTES as u64);
    if !outputs.iter().all(|&a| aligned(a)) {
        return Path::Strided;
    }
    let mut flats = Vec::with_capacity(inputs.len());
    for &(layout, base) in inputs {
        let Some(flat) = Flat::of(layout) else { return Path::Strided };
        let first = base + (layout.offset() * elem_bytes) as u64;
        let ok = match flat {
            Flat::Contiguous => aligned(first),
            Flat::Scalar => true,
            Flat::Repeat(p) => aligned(first) && (p as u64).is_multiple_of(width),
        };
        if !ok {
            return Path::Strided;
        }
        flats.push(flat);
    }
    Path::Vector(flats)
}

/// The device address of `s`'s first element, for [`plan`]'s alignment checks. (Event tracking is off on our
/// contexts, so asking for the pointer records and waits for nothing.)
pub fn address<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// Blocks for a grid-stride vectorised launch over `n` elements of `elem_bytes` bytes: enough for every thread
/// to have `UNROLL` packs, and at most one wave (`slots` = multiprocessors x resident blocks of the kernel), so
/// that no block waits for another to finish and the threads' shares differ by one pack at most.
pub fn grid(n: usize, elem_bytes: usize, slots: usize) -> u32 {
    let packs = n / (VECTOR_BYTES / elem_bytes);
    let per_block = THREADS as usize * UNROLL;
    packs.div_ceil(per_block).clamp(1, slots.max(1)) as u32
}

/// The launch configuration of [`grid`] blocks of [`THREADS`].
pub fn launch_config(n: usize, elem_bytes: usize, slots: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid(n, elem_bytes, slots), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 256-byte aligned base address, as the caching allocator hands out.
    const BASE: u64 = 0x7f00_0000_0000;

    fn contiguous(shape: &[usize]) -> Layout {
        Layout::contiguous(shape)
    }

    #[test]
    fn flat_forms_of_the_common_layouts() {
        assert_eq!(Flat::of(&contiguous(&[4, 5])), Some(Flat::Contiguous));
        assert_eq!(Flat::of(&contiguous(&[])), Some(Flat::Contiguous));
        // Contiguous with an offset (a narrow of the leading dim) is still contiguous.
        assert_eq!(Flat::of(&contiguous(&[6, 5]).narrow(0, 1, 3).unwrap()), Some(Flat::Contiguous));
        // A scalar broadcast, and a (1, 1) broadcast.
        assert_eq!(Flat::of(&contiguous(&[]).broadcast_as(&[3, 4]).unwrap()), Some(Flat::Scalar));
        assert_eq!(Flat::of(&contiguous(&[1, 1]).broadcast_as(&[3, 4]).unwrap()), Some(Flat::Scalar));
        // A bias (C,) over (N, C), and (1, 1, C) over (B, N, C): repeats of C.
        assert_eq!(Flat::of(&contiguous(&[8]).broadcast_as(&[5, 8]).unwrap()), Some(Flat::Repeat(8)));
        assert_eq!(Flat::of(&contiguous(&[1, 1, 8]).broadcast_as(&[2, 3, 8]).unwrap()), Some(Flat::Repeat(8)));
        // (3, 8) over (2, 3, 8): a repeat of 24.
        assert_eq!(Flat::of(&contiguous(&[3, 8]).broadcast_as(&[2, 3, 8]).unwrap()), Some(Flat::Repeat(24)));
        // Broadcast inside the block (a per-channel (C, 1, 1) over (B, C, H, W)), a column (N, 1) over (N, C),
        // a transpose and a narrow of the inner dim have no flat form.
        assert_eq!(Flat::of(&contiguous(&[3, 1, 1]).broadcast_as(&[2, 3, 4, 4]).unwrap()), None);
        assert_eq!(Flat::of(&contiguous(&[5, 1]).broadcast_as(&[5, 8]).unwrap()), None);
        assert_eq!(Flat::of(&contiguous(&[4, 5]).permute(&[1, 0]).unwrap()), None);
        assert_eq!(Flat::of(&contiguous(&[4, 6]).narrow(1, 0, 4).unwrap()), None);
        // A block that is not contiguous inside: (2, 8) narrowed to (2, 4), broadcast over a new leading dim.
        let narrowed = contiguous(&[2, 8]).narrow(1, 0, 4).unwrap();
        assert_eq!(Flat::of(&narrowed.broadcast_as(&[3, 2, 4]).unwrap()), None);
        // One row of it is contiguous, so broadcast over rows it repeats.
        let row = narrowed.narrow(0, 1, 1).unwrap();
        assert_eq!(Flat::of(&row.broadcast_as(&[3, 4]).unwrap()), Some(Flat::Repeat(4)));
    }

    #[test]
    fn periods_and_spans() {
        assert_eq!((Flat::Contiguous.period(), Flat::Scalar.period(), Flat::Repeat(12).period()), (0, 1, 12));
        assert_eq!((Flat::Contiguous.span(10), Flat::Scalar.span(10), Flat::Repeat(4).span(12)), (10, 1, 4));
        assert_eq!(Flat::Scalar.span(0), 0);
    }

    #[test]
    fn aligned_flat_inputs_take_the_vector_path() {
        let (a, b) = (contiguous(&[1000, 7]), contiguous(&[7000]).reshape_view(&[1000, 7]).unwrap());
        assert_eq!(plan(&[(&a, BASE), (&b, BASE + 4096)], &[BASE], 4), Path::Vector(vec![Flat::Contiguous; 2]));
        // Element counts that are not a multiple of the pack width are fine: the kernel has a scalar tail.
        let odd = contiguous(&[1001]);
        assert_eq!(plan(&[(&odd, BASE)], &[BASE], 4), Path::Vector(vec![Flat::Contiguous]));
        // A bias over rows (period 8, two float4 packs) and a scalar at an odd address.
        let bias = contiguous(&[8]).broadcast_as(&[100, 8]).unwrap();
        let scalar = contiguous(&[9]).narrow(0, 3, 1).unwrap().reshape_view(&[]).unwrap().broadcast_as(&[100, 8]);
        let x = contiguous(&[100, 8]);
        assert_eq!(
            plan(&[(&x, BASE), (&bias, BASE), (&scalar.unwrap(), BASE)], &[BASE], 4),
            Path::Vector(vec![Flat::Contiguous, Flat::Repeat(8), Flat::Scalar])
        );
        // f64: a period of 2 doubles is one pack.
        let bias2 = contiguous(&[2]).broadcast_as(&[100, 2]).unwrap();
        assert_eq!(plan(&[(&bias2, BASE)], &[BASE], 8), Path::Vector(vec![Flat::Repeat(2)]));
    }

    #[test]
    fn misaligned_views_fall_back_to_the_strided_form() {
        // A contiguous view starting at element 1, 2 or 3 of an f32 buffer is not 16-byte aligned; at 4 it is.
        let base = contiguous(&[64, 10]);
        for start in 1..4 {
            let v = contiguous(&[640]).narrow(0, start, 600).unwrap();
            assert_eq!(plan(&[(&v, BASE)], &[BASE], 4), Path::Strided, "f32 offset {start}");
        }
        let v = contiguous(&[640]).narrow(0, 4, 600).unwrap();
        assert_eq!(plan(&[(&v, BASE)], &[BASE], 4), Path::Vector(vec![Flat::Contiguous]));
        // f64: offset 1 breaks it, offset 2 does not.
        let v = contiguous(&[640]).narrow(0, 1, 600).unwrap();
        assert_eq!(plan(&[(&v, BASE)], &[BASE], 8), Path::Strided);
        let v = contiguous(&[640]).narrow(0, 2, 600).unwrap();
        assert_eq!(plan(&[(&v, BASE)], &[BASE], 8), Path::Vector(vec![Flat::Contiguous]));
        // One misaligned input sends the whole launch to the strided form, whatever the others.
        let odd_rows = base.narrow(0, 1, 63).unwrap(); // offset 10 floats = 40 bytes
        assert_eq!(plan(&[(&contiguous(&[63, 10]), BASE), (&odd_rows, BASE)], &[BASE], 4), Path::Strided);
        // A misaligned buffer (never from the allocator, but checked all the same) and a misaligned output.
        assert_eq!(plan(&[(&base, BASE + 4)], &[BASE], 4), Path::Strided);
        assert_eq!(plan(&[(&base, BASE)], &[BASE + 8], 4), Path::Strided);
        // A repeat whose period is not a whole number of packs, or whose block starts off a boundary.
        let bias = contiguous(&[6]).broadcast_as(&[10, 6]).unwrap();
        assert_eq!(plan(&[(&bias, BASE)], &[BASE], 4), Path::Strided);
        let bias = contiguous(&[9]).narrow(0, 1, 8).unwrap().broadcast_as(&[10, 8]).unwrap();
        assert_eq!(plan(&[(&bias, BASE)], &[BASE], 4), Path::Strided);
        // No flat form at all.
        let t = contiguous(&[8, 8]).permute(&[1, 0]).unwrap();
        assert_eq!(plan(&[(&t, BASE)], &[BASE], 4), Path::Strided);
    }

    #[test]
    fn grids_fill_one_wave_at_most() {
        let slots = 132 * 8;
        // 64M floats: 16M packs, far more than one wave of 1024 packs a block: one full wave.
        assert_eq!(grid(64 << 20, 4, slots), slots as u32);
        // Small: one block even for nothing or a tail only; a block per 1024 packs otherwise.
        assert_eq!(grid(0, 4, slots), 1);
        assert_eq!(grid(3, 4, slots), 1);
        assert_eq!(grid(4 * 1024 + 1, 4, slots), 1);
        assert_eq!(grid(4 * 1024 * 5 + 3, 4, slots), 5);
        assert_eq!(grid(4 * 1024 * 5 + 4, 4, slots), 6);
        assert_eq!(grid(2 * 1024 * 5, 8, slots), 5);
        assert_eq!(grid(1 << 30, 4, 0), 1, "a zero slot count still launches");
        assert_eq!(launch_config(1 << 20, 4, slots).block_dim, (THREADS, 1, 1));
    }
}
