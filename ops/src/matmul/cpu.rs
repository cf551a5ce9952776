//! CPU matmul through the `gemm` crate, which takes any row and column strides: transposed, sliced and
//! broadcast (stride-0) operands go in as they are. The output is contiguous (..c, m, n).

use engine::{CpuStorage, Error, Float, Layout, Result};
use gemm::Parallelism;
use rayon::prelude::*;

use super::Plan;

/// Products with fewer multiply-adds than this run on one thread: below it the cost of waking the pool
/// outweighs the work.
const PARALLEL_MIN: usize = 64 * 64 * 64;

/// Storage offset of each batch's matrix, in row-major batch order (stride 0 on broadcast dims).
fn batch_offsets(layout: &Layout, batch: &[usize]) -> Vec<usize> {
    let r = batch.len();
    Layout::new(batch.to_vec(), layout.strides()[..r].to_vec(), layout.offset()).offsets()
}

/// The last two strides of a layout, as gemm's (row, column) strides.
fn matrix_strides(layout: &Layout) -> (isize, isize) {
    let s = layout.strides();
    let r = s.len();
    (s[r - 2] as isize, s[r - 1] as isize)
}

/// The longest run of the summed dimension that `gemm` sums in one block on every machine.
///
/// `gemm` splits k into blocks whose length it derives from the L1 cache it detects at run time (never
/// below 512, and the blocks made even: k_iter = ceil(k / kc), then kc = ceil(k / k_iter)); a block's
/// products are summed in registers and then added to the output. So for k > 512 the summation order, and
/// with it the result's bits, would depend on the machine. [`gemm_fixed_order`] cuts k itself, as `gemm`
/// does on a machine whose block is 512, and hands `gemm` one block at a time: every x86-64 machine with
/// AVX2 and FMA (the same micro-kernels) then gives the same bits for the same inputs.
pub(crate) const GEMM_K_BLOCK: usize = 512;

/// `gemm::gemm` (dst = alpha dst + beta lhs rhs, dst read only when `read_dst`) with the summed dimension cut
/// into blocks of at most [`GEMM_K_BLOCK`], one call each, in order: the same bits on every machine.
///
/// # Safety
/// As `gemm::gemm`: for i < m, j < n, p < k, `lhs + i lhs_rs + p lhs_cs`, `rhs + p rhs_rs + j rhs_cs` and
/// `dst + i dst_rs + j dst_cs` lie in live allocations, and dst aliases neither input.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_fixed_order<T: Float>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_cs, dst_rs): (*mut T, isize, isize),
    read_dst: bool,
    (lhs, lhs_cs, lhs_rs): (*const T, isize, isize),
    (rhs, rhs_cs, rhs_rs): (*const T, isize, isize),
    alpha: T,
    beta: T,
    parallelism: Parallelism,
) {
    // One call even for k = 0 (gemm then scales or clears dst as asked).
    let blocks = k.div_ceil(GEMM_K_BLOCK).max(1);
    let kc = k.div_ceil(blocks);
    for b in 0..blocks {
        let (k0, len) = (b * kc, kc.min(k - b * kc));
        // The first block applies the caller's alpha and read_dst; later ones add onto what is there.
        let (read, a) = if b == 0 { (read_dst, alpha) } else { (true, T::ONE) };
        gemm::gemm(
            m,
            n,
            len,
            dst,
            dst_cs,
            dst_rs,
            read,
            lhs.offset(k0 as isize * lhs_cs),
            lhs_cs,
            lhs_rs,
            rhs.offset(k0 as isize * rhs_rs),
            rhs_cs,
            rhs_rs,
            a,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// C = A B for one matrix of each; `c` is row-major (m, n).
///
/// # Safety
/// Every element `a_off + i * a_rs + p * a_cs` (i < m, p < k) must lie in `a`, likewise for `b`, and `c`
/// must hold m * n elements.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_one<T: Float>(
    plan: &Plan,
    c: &mut [T],
    a: &[T],
    a_off: usize,
    (a_rs, a_cs): (isize, isize),
    b: &[T],
    b_off: usize,
    (b_rs, b_cs): (isize, isize),
    parallelism: Parallelism,
) {
    gemm_fixed_order(
        (plan.m, plan.n, plan.k),
        (c.as_mut_ptr(), 1, plan.n as isize),
        false,
        (a.as_ptr().add(a_off), a_cs, a_rs),
        (b.as_ptr().add(b_off), b_cs, b_rs),
        T::ZERO, // scales the old dst, which is not read
        T::ONE,  // scales A B
        parallelism,
    )
}

/// When B is the same matrix for every batch (stride 0 on all batch dims) and A's batch dims run on from its
/// rows with one stride, the batched product is one (batches m, k) @ (k, n) product: the row stride of A,
/// C's row-major layout and B are the same either way. Returns A's row stride then; None otherwise.
fn folded_rows(la: &Layout, lb: &Layout, plan: &Plan) -> Option<isize> {
    let r = plan.batch.len();
    if r == 0 || lb.strides()[..r].iter().zip(&plan.batch).any(|(&s, &d)| s != 0 && d != 1) {
        return None;
    }
    let (a_rs, _) = matrix_strides(la);
    // Walking the batch dims inwards, each must step by the size of everything inside it.
    let mut inner = plan.m * a_rs as usize;
    for (&d, &s) in plan.batch.iter().zip(&la.strides()[..r]).rev() {
        if d != 1 && s != inner {
            return None;
        }
        inner *= d;
    }
    Some(a_rs)
}

fn matmul_typed<T: Float>(a: &[T], la: &Layout, b: &[T], lb: &Layout, plan: &Plan) -> Result<Vec<T>> {
    let (m, k, n) = (plan.m, plan.k, plan.n);
    let batches: usize = plan.batch.iter().product();
    if batches > 1 && k > 0 && m > 0 && n > 0 {
        if let Some(a_rs) = folded_rows(la, lb, plan) {
            // One tall product instead of `batches` small ones (a Linear layer on (B, N, C) tokens).
            if la.storage_span().end > a.len() || lb.storage_span().end > b.len() {
                return Err(Error::invalid("matmul", "operand view exceeds its storage", la.shape()));
            }
            let folded = Plan { batch: Vec::new(), m: batches * m, k, n };
            let mut c = engine::cpu_buffer(batches * m * n);
            let par = if batches * m * n * k >= PARALLEL_MIN { Parallelism::Rayon(0) } else { Parallelism::None };
            // SAFETY: A's rows (batches m of them, stride a_rs) and columns are the elements of `la`, whose span
            // was checked; B is its first batch matrix, inside `lb`'s span; c holds batches m n elements.
            unsafe {
                gemm_one(
                    &folded,
                    &mut c,
                    a,
                    la.offset(),
                    (a_rs, matrix_strides(la).1),
                    b,
                    lb.offset(),
                    matrix_strides(lb),
                    par,
                )
            };
            return Ok(c);
        }
    }
    // gemm overwrites every element without reading it (read_dst false), so a reused buffer is fine; with
    // k = 0 every entry is an empty sum and the zeros are the answer.
    let mut c = if k == 0 { vec![T::ZERO; batches * m * n] } else { engine::cpu_buffer(batches * m * n) };
    if c.is_empty() || k == 0 {
        return Ok(c);
    }
    // gemm reads through raw pointers: check here that both views stay inside their buffers.
    if la.storage_span().end > a.len() || lb.storage_span().end > b.len() {
        return Err(Error::invalid("matmul", "operand view exceeds its storage", la.shape()));
    }
    let (a_offs, b_offs) = (batch_offsets(la, &plan.batch), batch_offsets(lb, &plan.batch));
    let (a_st, b_st) = (matrix_strides(la), matrix_strides(lb));
    let per_matrix = m * n * k;
    // SAFETY (both calls below): offsets and strides come from `la` and `lb`, whose spans were checked
    // against `a` and `b` above, and each chunk of `c` holds exactly m * n elements.
    if per_matrix < PARALLEL_MIN && batches > 1 && batches * per_matrix >= PARALLEL_MIN {
        // Many small products: one thread per matrix beats splitting each tiny matrix.
        c.par_chunks_mut(m * n)
            .zip(a_offs.par_iter().zip(&b_offs))
            .for_each(|(c, (&ao, &bo))| unsafe { gemm_one(plan, c, a, ao, a_st, b, bo, b_st, Parallelism::None) });
    } else {
        let par = if per_matrix >= PARALLEL_MIN { Parallelism::Rayon(0) } else { Parallelism::None };
        for ((c, &ao), &bo) in c.chunks_mut(m * n).zip(&a_offs).zip(&b_offs) {
            unsafe { gemm_one(plan, c, a, ao, a_st, b, bo, b_st, par) };
        }
    }
    Ok(c)
}

/// The dtype dispatch of the CPU matmul.
pub(super) fn matmul(a: &CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout, plan: &Plan) -> Result<CpuStorage> {
    match (a, b) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => Ok(CpuStorage::F32(matmul_typed(a, la, b, lb, plan)?)),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => Ok(CpuStorage::F64(matmul_typed(a, la, b, lb, plan)?)),
        _ => Err(Error::DTypeMismatch { op: "matmul", lhs: a.dtype(), rhs: b.dtype() }),
    }
}
