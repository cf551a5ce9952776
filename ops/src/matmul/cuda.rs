//! CUDA matmul through cuBLAS ([`engine::cuda::CudaDevice::gemm_strided_batched`], row-major, transposes as
//! flags). The host-side work is a [`GemmPlan`]: how each operand's layout maps to cuBLAS terms, and which
//! strided-batched calls cover the batch. Running it enqueues at most one copy per operand and the calls;
//! nothing waits for the device.
//!
//! An operand's matrices, (rows, cols) with strides (rs, cs), are read in place when
//!
//! - cs = 1 (or cols = 1): stored as they are, leading dimension rs;
//! - rs = 1 (or rows = 1): stored transposed, as (cols, rows) with leading dimension cs, and cuBLAS told so;
//!
//! and the leading dimension covers a stored row (cuBLAS's rule; a stride-0 dim breaks it). Otherwise the
//! operand is copied to a contiguous buffer first, leaving its broadcast batch dims broadcast.
//!
//! Batch dims: one strided-batched call needs the matrices of each operand to sit one stride apart. The
//! longest run of trailing batch dims that collapses to one stride for both operands (a broadcast run has
//! stride 0) is that call's batch; the leading dims left over are looped on the host, one call each. When
//! that would take more than [`MAX_CALLS`] calls, the operand that stops the collapse is copied contiguous
//! over the whole batch instead, after which it collapses. A run that multiplies stacked A matrices by one
//! shared B is a single tall product (a Linear layer on (B, T, C)).
//!
//! The output is contiguous (..batch, m, n). k = 0 gives zeros (a fill, no cuBLAS); an empty output gives
//! nothing to do.

use engine::cuda::{CudaStorage, GemmConfig};
use engine::{DType, Error, Float, Layout, Result};

use super::Plan;

/// Most cuBLAS calls one product may take before an operand is copied so its batch collapses. A call costs
/// a few microseconds of launch and runs its matrices apart from the others' (small ones then underfill the
/// GPU), while a copy is one memory-bound pass, so looping pays only for a few leading batch indices, such
/// as the batch dim of attention heads split out of a (B, T, H, D) tensor.
const MAX_CALLS: usize = 8;

/// How cuBLAS reads the matrices of one operand: as stored (`trans` false, row-major with row stride `ld`)
/// or transposed (stored as the (cols, rows) row-major matrix with row stride `ld`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MatrixForm {
    trans: bool,
    ld: usize,
}

/// The in-place form of (rows, cols) matrices with strides (rs, cs), if cuBLAS can read them so. rows and
/// cols are at least 1 here; a size-1 dim's stride is never used, so any value will do for it.
fn matrix_form(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<MatrixForm> {
    if cols == 1 || cs == 1 {
        let ld = if rows == 1 { cols } else { rs };
        if ld >= cols {
            return Some(MatrixForm { trans: false, ld });
        }
    }
    if rows == 1 || rs == 1 {
        let ld = if cols == 1 { rows } else { cs };
        if ld >= rows {
            return Some(MatrixForm { trans: true, ld });
        }
    }
    None
}

/// The first of the trailing batch dims that collapse to one stride: dims `j..` of `shape` visit matrices
/// `stride` apart in row-major order, for some `stride` (0 when they are all broadcast). Size-1 dims always
/// join; a dim joins the run inside it when its stride is that run's stride times its length.
fn collapse_start(shape: &[usize], strides: &[usize]) -> usize {
    let mut start = shape.len();
    // (matrices, stride) of the run collapsed so far.
    let mut run: Option<(usize, usize)> = None;
    for d in (0..shape.len()).rev() {
        if shape[d] != 1 {
            run = match run {
                None => Some((shape[d], strides[d])),
                Some((count, stride)) if stride.checked_mul(count) == Some(strides[d]) => {
                    Some((count * shape[d], stride))
                }
                Some(_) => break,
            };
        }
        start = d;
    }
    start
}

/// The stride between consecutive matrices of the collapsed dims `start..` (0 when they hold one matrix).
fn run_stride(shape: &[usize], strides: &[usize], start: usize) -> usize {
    (start..shape.len()).rev().find(|&d| shape[d] > 1).map_or(0, |d| strides[d])
}

/// One operand as cuBLAS reads it.
#[derive(Debug, Clone, PartialEq)]
struct OperandPlan {
    /// The view of the input to copy into a new contiguous buffer first, when it cannot be read in place.
    copy: Option<Layout>,
    /// The operand broadcast to (..batch, rows, cols), over the input's storage or over the copy.
    layout: Layout,
    form: MatrixForm,
}

impl OperandPlan {
    /// `lx` is the operand broadcast to (..batch, rows, cols), rows and cols at least 1.
    fn new(lx: &Layout, rows: usize, cols: usize) -> Result<OperandPlan> {
        let r = lx.rank();
        let (rs, cs) = (lx.strides()[r - 2], lx.strides()[r - 1]);
        if let Some(form) = matrix_form(rows, cols, rs, cs) {
            return Ok(OperandPlan { copy: None, layout: lx.clone(), form });
        }
        // Copy the operand's own matrices only: broadcast batch dims become size 1 in the copied view and
        // are broadcast again over the copy, so a (k, n) weight shared by a batch is copied once.
        let mut own = lx.shape().to_vec();
        for (d, size) in own.iter_mut().enumerate().take(r - 2) {
            if lx.strides()[d] == 0 {
                *size = 1;
            }
        }
        let layout = Layout::contiguous(&own).broadcast_as(lx.shape())?;
        Ok(OperandPlan {
            copy: Some(Layout::new(own, lx.strides().to_vec(), lx.offset())),
            layout,
            form: MatrixForm { trans: false, ld: cols },
        })
    }

    /// Copies the whole broadcast operand `lx` contiguous, (..batch, rows, cols), so that its batch collapses.
    fn materialize(&mut self, lx: &Layout, cols: usize) {
        *self = OperandPlan {
            copy: Some(lx.clone()),
            layout: Layout::contiguous(lx.shape()),
            form: MatrixForm { trans: false, ld: cols },
        };
    }

    /// Where the operand's batch dims stop collapsing (see [`collapse_start`]).
    fn collapse_start(&self, batch: &[usize]) -> usize {
        collapse_start(batch, &self.layout.strides()[..batch.len()])
    }

    /// The storage offset of the first matrix of each call, for calls over batch dims `..start` in row-major
    /// order (one call, at the layout's offset, when `start` is 0).
    fn call_offsets(&self, batch: &[usize], start: usize) -> Vec<usize> {
        let strides = self.layout.strides()[..start].to_vec();
        Layout::new(batch[..start].to_vec(), strides, self.layout.offset()).offsets()
    }
}

/// The cuBLAS calls of one product with m, n, k >= 1 and a non-empty batch.
#[derive(Debug, Clone, PartialEq)]
struct GemmPlan {
    a: OperandPlan,
    b: OperandPlan,
    /// Shared by every call: `batch` is the number of matrices one call covers.
    cfg: GemmConfig,
    /// Per call, where its first matrix of A, B and C starts in their buffers (A's and B's being the input's
    /// storage or the copy).
    calls: Vec<[usize; 3]>,
}

impl GemmPlan {
    /// `la` is A broadcast to (..batch, m, k), `lb` is B broadcast to (..batch, k, n).
    fn new(la: &Layout, lb: &Layout, plan: &Plan) -> Result<GemmPlan> {
        let (m, k, n, batch) = (plan.m, plan.k, plan.n, plan.batch.as_slice());
        let mut a = OperandPlan::new(la, m, k)?;
        let mut b = OperandPlan::new(lb, k, n)?;
        let leading = |start: usize| -> usize { batch[..start].iter().product() };
        // At most two rounds: a materialized operand collapses over its whole batch.
        for _ in 0..2 {
            let (sa, sb) = (a.collapse_start(batch), b.collapse_start(batch));
            if leading(sa.max(sb)) <= MAX_CALLS {
                break;
            }
            if leading(sa) >= leading(sb) {
                a.materialize(la, k);
            } else {
                b.materialize(lb, n);
            }
        }
        let start = a.collapse_start(batch).max(b.collapse_start(batch));
        let inner: usize = batch[start..].iter().product();
        let mut cfg = GemmConfig {
            batch: inner,
            m,
            n,
            k,
            trans_a: a.form.trans,
            trans_b: b.form.trans,
            lda: a.form.ld,
            ldb: b.form.ld,
            ldc: n,
            stride_a: run_stride(batch, a.layout.strides(), start),
            stride_b: run_stride(batch, b.layout.strides(), start),
            stride_c: m * n,
            alpha: 1.0,
            beta: 0.0,
        };
        // One B for the whole run, and A's matrices stacked as the rows of one tall matrix (as stored, each
        // starting m rows after the last): the run is one (inner m, k) @ (k, n) product, whose rows C's run
        // already holds in order. cuBLAS runs that far better than a batch of short products (a Linear layer
        // on a (B, T, C) input is this case).
        let stacked = !cfg.trans_a && cfg.stride_a == m * cfg.lda && cfg.stride_b == 0;
        if inner > 1 && stacked && inner * m <= i32::MAX as usize {
            cfg = GemmConfig { batch: 1, m: inner * m, stride_a: 0, stride_c: inner * m * n, ..cfg };
        }
        let (a_offsets, b_offsets) = (a.call_offsets(batch, start), b.call_offsets(batch, start));
        let calls =
            a_offsets.into_iter().zip(b_offsets).enumerate().map(|(i, (ao, bo))| [ao, bo, i * inner * m * n]).collect();
        Ok(GemmPlan { a, b, cfg, calls })
    }
}

/// C = A B for `la` (..batch, m, k) over `a` and `lb` (..batch, k, n) over `b`: contiguous (..batch, m, n).
pub(super) fn matmul(a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout, plan: &Plan) -> Result<CudaStorage> {
    crate::util::same_cuda_dtypes("matmul", &[a, b])?;
    match a.dtype() {
        DType::F32 => run::<f32>(a, la, b, lb, plan),
        DType::F64 => run::<f64>(a, la, b, lb, plan),
    }
}

fn run<T: Float>(a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout, plan: &Plan) -> Result<CudaStorage> {
    let dev = a.device();
    let out_shape = plan.out_shape();
    let numel = out_shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid("matmul", "the result has more elements than fit in memory", &out_shape))?;
    if numel == 0 {
        return CudaStorage::alloc(dev, 0, T::DTYPE);
    }
    if plan.k == 0 {
        // Every entry is an empty sum.
        let mut c = CudaStorage::alloc(dev, numel, T::DTYPE)?;
        c.fill(0.0)?;
        return Ok(c);
    }
    for (what, l, s) in [("A", la, a), ("B", lb, b)] {
        if l.storage_span().end > s.len() {
            let msg = format!("operand {what} (strides {:?}, offset {}) exceeds its storage", l.strides(), l.offset());
            return Err(Error::invalid("matmul", msg, l.shape()));
        }
    }
    let gp = GemmPlan::new(la, lb, plan)?;
    // The copies, if any, are enqueued before the products on the device's one stream.
    let a_copy = gp.a.copy.as_ref().map(|l| a.copy_strided(l)).transpose()?;
    let b_copy = gp.b.copy.as_ref().map(|l| b.copy_strided(l)).transpose()?;
    let sa = a_copy.as_ref().unwrap_or(a).slice::<T>()?;
    let sb = b_copy.as_ref().unwrap_or(b).slice::<T>()?;
    let mut out = dev.alloc::<T>(numel)?;
    let mut c = out.view_mut();
    let outside = |what: &str, at: usize| {
        Error::invalid("matmul", format!("operand {what} starts at {at}, outside its buffer"), &out_shape)
    };
    for &[ao, bo, co] in &gp.calls {
        // gemm_strided_batched bounds-checks each call's matrices against these views.
        let av = sa.try_slice(ao..).ok_or_else(|| outside("A", ao))?;
        let bv = sb.try_slice(bo..).ok_or_else(|| outside("B", bo))?;
        let mut cv = c.try_slice_mut(co..).ok_or_else(|| outside("C", co))?;
        dev.gemm_strided_batched::<T>(&gp.cfg, &av, &bv, &mut cv)?;
    }
    CudaStorage::from_slice(dev, out)
}

/// A dense row-major operand for the fused Linear products: `storage` from element `offset` on.
pub(super) struct Dense<'a> {
    pub storage: &'a CudaStorage,
    pub offset: usize,
}

impl Dense<'_> {
    fn view<T: Float>(&self, op: &'static str, len: usize) -> Result<engine::cuda::CudaView<'_, T>> {
        let end = self.offset.checked_add(len);
        end.and_then(|end| self.storage.slice::<T>().ok()?.try_slice(self.offset..end)).ok_or_else(|| {
            let msg = format!("{len} elements from {} exceed the storage ({})", self.offset, self.storage.len());
            Error::invalid(op, msg, &[len])
        })
    }
}

/// `x W^T + b` for x (rows, k), W (n, k) and b (n), all dense: one cuBLASLt product with the bias in its
/// epilogue, contiguous (rows, n). `None` when cuBLASLt has no fused form for it (see
/// [`engine::cuda::CudaDevice::gemm_bias`]); the caller runs the product and the add instead.
/// `X W^T + b` (or `max(X W^T + b, 0)` with `relu`) as one cuBLASLt product with the bias (and ReLU) in its
/// epilogue, for dense X (rows, k), W (n, k), b (n); None when cuBLASLt offers no fused form (the caller
/// composes).
pub(super) fn linear_bias(
    x: Dense,
    w: Dense,
    b: Dense,
    rows: usize,
    k: usize,
    n: usize,
    relu: bool,
) -> Result<Option<CudaStorage>> {
    crate::util::same_cuda_dtypes("linear", &[x.storage, w.storage, b.storage])?;
    match x.storage.dtype() {
        DType::F32 => linear_bias_t::<f32>(x, w, b, rows, k, n, relu),
        DType::F64 => linear_bias_t::<f64>(x, w, b, rows, k, n, relu),
    }
}

fn linear_bias_t<T: Float>(
    x: Dense,
    w: Dense,
    b: Dense,
    rows: usize,
    k: usize,
    n: usize,
    relu: bool,
) -> Result<Option<CudaStorage>> {
    let dev = x.storage.device();
    // Y (rows, n) = X (rows, k) @ op(W), W stored (n, k): trans_b.
    let cfg = GemmConfig::contiguous(1, rows, n, k, false, true);
    let mut out = dev.alloc::<T>(rows * n)?;
    let (xv, wv, bv) = (x.view::<T>("linear", rows * k)?, w.view::<T>("linear", n * k)?, b.view::<T>("linear", n)?);
    if dev.gemm_bias::<T>(&cfg, &xv, &wv, &mut out.view_mut(), &bv, relu)? {
        Ok(Some(CudaStorage::from_slice(dev, out)?))
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    //! The plans run on the host: a loop with the semantics [`GemmConfig`] documents stands in for cuBLAS, so
    //! every layout mapping is checked against the reference without a GPU.

    use engine::{CpuStorage, Generator, Storage, Tensor};
    use proptest::prelude::*;

    use super::*;
    use crate::testing::randn;
    use crate::view::{expand, narrow, permute, t};

    /// `C_b = op(A_b) op(B_b)` as GemmConfig defines it, reading A and B from `offset` on; panics (failing
    /// the test) on any read outside the buffers and on a leading dimension cuBLAS would refuse.
    fn host_gemm(cfg: &GemmConfig, a: &[f64], ao: usize, b: &[f64], bo: usize, c: &mut [f64], co: usize) {
        let stored_cols_a = if cfg.trans_a { cfg.m } else { cfg.k };
        let stored_cols_b = if cfg.trans_b { cfg.k } else { cfg.n };
        assert!(cfg.lda >= stored_cols_a && cfg.ldb >= stored_cols_b && cfg.ldc >= cfg.n, "{cfg:?}");
        for batch in 0..cfg.batch {
            for i in 0..cfg.m {
                for j in 0..cfg.n {
                    let mut acc = 0.0;
                    for p in 0..cfg.k {
                        let ai = if cfg.trans_a { p * cfg.lda + i } else { i * cfg.lda + p };
                        let bi = if cfg.trans_b { j * cfg.ldb + p } else { p * cfg.ldb + j };
                        acc += a[ao + batch * cfg.stride_a + ai] * b[bo + batch * cfg.stride_b + bi];
                    }
                    c[co + batch * cfg.stride_c + i * cfg.ldc + j] = acc;
                }
            }
        }
    }

    fn host_buffer(x: &Tensor) -> Vec<f64> {
        match &*x.storage() {
            Storage::Cpu(CpuStorage::F64(v)) => v.clone(),
            s => panic!("expected f64 CPU storage, got {s:?}"),
        }
    }

    /// Runs `a @ b` (both of rank 2+) through the plan on the host; also returns the plan.
    fn run_plan(a: &Tensor, b: &Tensor) -> (Tensor, GemmPlan) {
        let plan = Plan::new(a.shape(), b.shape(), a.shape(), b.shape()).unwrap();
        let (la, lb) = (plan.expand(a, plan.m, plan.k).unwrap(), plan.expand(b, plan.k, plan.n).unwrap());
        let gp = GemmPlan::new(&la, &lb, &plan).unwrap();
        let source = |x: &Tensor, op: &OperandPlan| {
            let v = host_buffer(x);
            match &op.copy {
                Some(l) => CpuStorage::gather(&v, l),
                None => v,
            }
        };
        let (av, bv) = (source(a, &gp.a), source(b, &gp.b));
        let out_shape = plan.out_shape();
        let mut c = vec![f64::NAN; out_shape.iter().product()];
        for &[ao, bo, co] in &gp.calls {
            host_gemm(&gp.cfg, &av, ao, &bv, bo, &mut c, co);
        }
        (Tensor::from_vec(c, &out_shape).unwrap(), gp)
    }

    fn assert_matches_reference(a: &Tensor, b: &Tensor) -> GemmPlan {
        let (got, gp) = run_plan(a, b);
        let want = crate::matmul_ref(a, b).unwrap();
        assert_eq!(got.shape(), want.shape());
        for (x, y) in got.to_vec_f64().unwrap().iter().zip(want.to_vec_f64().unwrap()) {
            assert!((x - y).abs() <= 1e-12, "{:?} @ {:?}: {x} vs {y} with {gp:?}", a.shape(), b.shape());
        }
        gp
    }

    #[test]
    fn matrix_forms_read_unit_stride_rows_or_columns_in_place() {
        let form = |trans, ld| Some(MatrixForm { trans, ld });
        // Contiguous, row-sliced (row stride 9), transposed, transposed slice.
        assert_eq!(matrix_form(4, 5, 5, 1), form(false, 5));
        assert_eq!(matrix_form(4, 5, 9, 1), form(false, 9));
        assert_eq!(matrix_form(4, 5, 1, 4), form(true, 4));
        assert_eq!(matrix_form(4, 5, 1, 7), form(true, 7));
        // Vectors: a row (1, k) whatever its column stride, a column (k, 1) whatever its row stride.
        assert_eq!(matrix_form(1, 5, 0, 1), form(false, 5));
        assert_eq!(matrix_form(1, 5, 99, 3), form(true, 3));
        assert_eq!(matrix_form(5, 1, 3, 99), form(false, 3));
        // Stride-0 rows or columns, rows that overlap, and no unit stride at all must be copied.
        assert_eq!(matrix_form(4, 5, 0, 1), None);
        assert_eq!(matrix_form(4, 5, 1, 0), None);
        assert_eq!(matrix_form(4, 5, 3, 1), None);
        assert_eq!(matrix_form(4, 5, 10, 2), None);
        assert_eq!(matrix_form(5, 1, 0, 1), None);
    }

    #[test]
    fn batch_dims_collapse_from_the_inside_out() {
        // Contiguous: all of it. Broadcast everywhere: all of it (stride 0).
        assert_eq!(collapse_start(&[2, 3, 4], &[240, 80, 20]), 0);
        assert_eq!(collapse_start(&[2, 3, 4], &[0, 0, 0]), 0);
        assert_eq!(run_stride(&[2, 3, 4], &[0, 0, 0], 0), 0);
        // Heads split out of (B, T, H, D): (B, H) with strides (T H D, D) stop after H.
        assert_eq!(collapse_start(&[2, 4], &[5 * 4 * 8, 8]), 1);
        assert_eq!(run_stride(&[2, 4], &[160, 8], 1), 8);
        // A broadcast dim outside a real one, and the reverse, do not collapse.
        assert_eq!(collapse_start(&[2, 3], &[12, 0]), 1);
        assert_eq!(collapse_start(&[2, 3], &[0, 12]), 1);
        // Size-1 dims join whatever their stride; no batch dims at all is one matrix.
        assert_eq!(collapse_start(&[2, 1, 3], &[36, 7, 12]), 0);
        assert_eq!(collapse_start(&[], &[]), 0);
        assert_eq!(run_stride(&[1, 1], &[5, 5], 0), 0);
    }

    #[test]
    fn layouts_map_to_the_planned_cublas_calls() {
        // Plain 2-D: one call, nothing copied.
        let gp = assert_matches_reference(&randn(&[5, 7], 1), &randn(&[7, 3], 2));
        assert_eq!((gp.a.copy.is_none(), gp.b.copy.is_none(), gp.calls.len()), (true, true, 1));
        assert_eq!((gp.cfg.lda, gp.cfg.ldb, gp.cfg.trans_a, gp.cfg.trans_b), (7, 3, false, false));
        // Both transposed: flags, no copies, leading dims the stored rows.
        let gp = assert_matches_reference(&t(&randn(&[7, 5], 3)).unwrap(), &t(&randn(&[3, 7], 4)).unwrap());
        assert_eq!((gp.cfg.trans_a, gp.cfg.trans_b, gp.cfg.lda, gp.cfg.ldb), (true, true, 5, 7));
        assert!(gp.a.copy.is_none() && gp.b.copy.is_none());
        // Sliced: row stride 9 and an offset, read in place.
        let a = narrow(&randn(&[6, 9], 5), 1, 2, 7).unwrap();
        let gp = assert_matches_reference(&a, &narrow(&randn(&[9, 3], 6), 0, 1, 7).unwrap());
        assert_eq!((gp.a.copy.is_none(), gp.cfg.lda, gp.calls[0][0], gp.calls[0][1]), (true, 9, 2, 3));
        // A weight shared by a batch: one (12, 5) @ (5, 2) product, with or without row slicing.
        let gp = assert_matches_reference(&randn(&[3, 4, 5], 7), &t(&randn(&[2, 5], 8)).unwrap());
        assert_eq!((gp.calls.len(), gp.cfg.batch, gp.cfg.m, gp.cfg.trans_b), (1, 1, 12, true));
        let a = narrow(&randn(&[3, 4, 7], 20), 2, 1, 5).unwrap();
        let gp = assert_matches_reference(&a, &randn(&[5, 2], 21));
        assert_eq!((gp.calls.len(), gp.cfg.batch, gp.cfg.m, gp.cfg.lda), (1, 1, 12, 7));
        // Not when A is transposed: a batch of 3 with B's stride 0.
        let gp = assert_matches_reference(&t(&randn(&[3, 5, 4], 22)).unwrap(), &randn(&[5, 2], 23));
        assert_eq!((gp.calls.len(), gp.cfg.batch, gp.cfg.stride_a, gp.cfg.stride_b), (1, 3, 20, 0));
        // Broadcast both ways, (2, 1) against (1, 3): the batch does not collapse, two calls of three.
        let gp = assert_matches_reference(&randn(&[2, 1, 4, 3], 9), &randn(&[3, 3, 6], 10));
        assert_eq!((gp.calls.len(), gp.cfg.batch, gp.cfg.stride_a, gp.cfg.stride_b), (2, 3, 0, 18));
        assert!(gp.a.copy.is_none() && gp.b.copy.is_none());
        // Heads out of (B, T, H, D) with B = 3: three calls over H, nothing copied.
        let q = permute(&randn(&[3, 5, 2, 4], 11), &[0, 2, 1, 3]).unwrap(); // (3, 2, 5, 4)
        let k = permute(&randn(&[3, 6, 2, 4], 12), &[0, 2, 3, 1]).unwrap(); // (3, 2, 4, 6), transposed
        let gp = assert_matches_reference(&q, &k);
        assert_eq!((gp.calls.len(), gp.cfg.batch, gp.cfg.stride_a, gp.cfg.stride_b), (3, 2, 4, 4));
        assert_eq!((gp.cfg.lda, gp.cfg.trans_b, gp.cfg.ldb), (8, true, 8));
        assert!(gp.a.copy.is_none() && gp.b.copy.is_none());
        // The same with B = 12 would take 12 calls: q is copied instead and one call covers the batch.
        let q = permute(&randn(&[12, 5, 2, 4], 13), &[0, 2, 1, 3]).unwrap();
        let gp = assert_matches_reference(&q, &randn(&[12, 2, 4, 6], 14));
        assert_eq!((gp.a.copy.is_some(), gp.b.copy.is_none(), gp.calls.len(), gp.cfg.batch), (true, true, 1, 24));
        // Both blocking: both copied.
        let k = permute(&randn(&[12, 6, 2, 4], 15), &[0, 2, 3, 1]).unwrap();
        let gp = assert_matches_reference(&q, &k);
        assert_eq!((gp.a.copy.is_some(), gp.b.copy.is_some(), gp.calls.len()), (true, true, 1));
        // Stride-0 rows and columns are copied, and only once for a broadcast batch.
        let a = expand(&randn(&[1, 5], 16), &[4, 5]).unwrap();
        let b = expand(&randn(&[5, 1], 17), &[5, 3]).unwrap();
        let gp = assert_matches_reference(&a, &b);
        assert!(gp.a.copy.is_some() && gp.b.copy.is_some());
        let w = expand(&randn(&[5, 1], 18), &[5, 3]).unwrap();
        let gp = assert_matches_reference(&randn(&[6, 4, 5], 19), &w);
        assert_eq!(gp.b.copy.as_ref().unwrap().shape(), &[1, 5, 3]);
        assert_eq!((gp.calls.len(), gp.cfg.stride_b), (1, 0));
    }

    /// A random product over views: batch dims permuted or not, operands transposed, sliced, broadcast
    /// along batch dims or along a matrix dim.
    #[derive(Debug, Clone)]
    struct Views {
        batch: Vec<usize>,
        mkn: (usize, usize, usize),
        /// Per operand: (transposed, batch dims reversed in storage, sliced, one batch dim set to 1 (if any),
        /// rows repeated by expand).
        a: (bool, bool, bool, Option<usize>, bool),
        b: (bool, bool, bool, Option<usize>, bool),
        seed: u64,
    }

    fn views() -> impl Strategy<Value = Views> {
        let operand =
            || (any::<bool>(), any::<bool>(), any::<bool>(), prop::option::of(0usize..4), prop::bool::weighted(0.2));
        (prop::collection::vec(1usize..4, 0..4), (1usize..5, 1usize..5, 1usize..5), operand(), operand(), any::<u64>())
            .prop_map(|(batch, mkn, a, b, seed)| Views { batch, mkn, a, b, seed })
    }

    impl Views {
        /// An operand of shape (..batch, rows, cols), built as the flags say.
        fn operand(&self, which: u64, rows: usize, cols: usize) -> Tensor {
            let (trans, reversed, sliced, one, repeated) = if which == 0 { self.a } else { self.b };
            let mut batch = self.batch.clone();
            if let Some(d) = one.filter(|&d| d < batch.len()) {
                batch[d] = 1;
            }
            let r = batch.len();
            let mut g = Generator::new(self.seed.wrapping_add(which));
            let mut draw = |shape: &[usize]| {
                Tensor::randn(shape, 0.0, 1.0, engine::DType::F64, engine::Device::Cpu, &mut g).unwrap()
            };
            // The matrix as stored: transposed means (cols, rows); sliced adds a column of padding.
            let (sr, sc) = if trans { (cols, rows) } else { (rows, cols) };
            let (sr, sc0) = (if repeated { 1 } else { sr }, sc + sliced as usize);
            let stored_batch: Vec<usize> = if reversed { batch.iter().rev().copied().collect() } else { batch.clone() };
            let mut x = draw(&[stored_batch, vec![sr, sc0]].concat());
            if reversed {
                let perm: Vec<usize> = (0..r).rev().chain([r, r + 1]).collect();
                x = permute(&x, &perm).unwrap();
            }
            if sliced {
                x = narrow(&x, -1, 1, sc).unwrap();
            }
            if repeated {
                x = expand(&x, &[batch.clone(), vec![if trans { cols } else { rows }, sc]].concat()).unwrap();
            }
            if trans {
                x = t(&x).unwrap();
            }
            x
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn planned_calls_match_the_reference_on_random_views(v in views()) {
            let (m, k, n) = v.mkn;
            let (a, b) = (v.operand(0, m, k), v.operand(1, k, n));
            prop_assert_eq!(a.shape()[a.rank() - 2..].to_vec(), vec![m, k]);
            assert_matches_reference(&a, &b);
        }
    }
}
