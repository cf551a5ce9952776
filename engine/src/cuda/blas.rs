//! cuBLAS matrix products for row-major tensors: [`CudaDevice::gemm_strided_batched`] is the one place that
//! translates between our row-major layouts and cuBLAS's column-major convention.
//!
//! TF32: on Ampere and later, cuBLAS can run f32 products on tensor cores with 10-bit mantissas (about 1e-3
//! relative error instead of 1e-6). It is off unless [`set_tf32`] turns it on, process-wide; each device's
//! handle picks the setting up at its next product. f64 products are never affected.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use cudarc::cublas::{self, sys::cublasMath_t, sys::cublasOperation_t, CudaBlas};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::alloc::PooledSlice;
use super::device::{catch_panics, library_present, Library};
use super::{CudaDevice, OrCuda};
use crate::{DType, Error, Float, Result};

static TF32: AtomicBool = AtomicBool::new(false);

/// Allows (or forbids) TF32 tensor-core math in f32 matrix products on every device, from the next product
/// on. Off by default: gradient checks and CPU comparisons need full f32 precision.
pub fn set_tf32(enabled: bool) {
    TF32.store(enabled, Ordering::Relaxed);
}

pub fn tf32_enabled() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// A device's cuBLAS handle (bound to the device's stream), its workspace and the math mode last set on it.
pub(crate) struct Blas {
    handle: CudaBlas,
    tf32: bool,
    /// The handle's workspace, from the device's pool and set explicitly (`cublasSetWorkspace`), so that
    /// cuBLAS never allocates one of its own: a product captured into a CUDA graph then allocates nothing
    /// (graph.rs). Declared after `handle`, so it outlives it. Its size is NVIDIA's recommendation, the
    /// cuBLASLt workspace's.
    _workspace: PooledSlice<u8>,
}

impl Blas {
    pub(crate) fn new(dev: &CudaDevice) -> std::result::Result<Mutex<Blas>, String> {
        let stream = dev.stream();
        if !library_present(Library::Cublas) {
            return Err(format!(
                "libcublas could not be loaded (searched {}); install the CUDA toolkit's cuBLAS or add it to LD_LIBRARY_PATH",
                Library::Cublas.candidates().join(", ")
            ));
        }
        catch_panics("cublasCreate", || {
            // `CudaBlas::new` creates the handle and binds it to `stream`, so every product is stream ordered
            // with the kernels around it.
            let handle = CudaBlas::new(stream.clone()).map_err(|e| format!("cublasCreate: {e:?}"))?;
            let workspace = dev
                .alloc::<u8>(super::blaslt::workspace_bytes(dev.compute_capability()))
                .map_err(|e| format!("allocating the cuBLAS workspace: {e}"))?;
            let ptr = workspace.as_slice().device_ptr(stream).0;
            // SAFETY: a live handle; the workspace is a block of `workspace.len()` bytes that this struct owns
            // for the handle's life, used only by products enqueued on the device's one stream (in order).
            // `CudaBlas::new` has already bound the stream (cublasSetStream resets the workspace, so this must
            // come after it).
            unsafe {
                cublas::sys::cublasSetWorkspace_v2(*handle.handle(), ptr as *mut std::ffi::c_void, workspace.len())
            }
            .result()
            .map_err(|e| format!("cublasSetWorkspace: {e:?}"))?;
            Ok(Mutex::new(Blas { handle, tf32: false, _workspace: workspace }))
        })
    }

    /// Brings the handle's math mode in line with [`tf32_enabled`] (a host-side setting, no synchronisation).
    fn sync_math_mode(&mut self) -> Result<()> {
        let want = tf32_enabled();
        if self.tf32 != want {
            let mode = if want { cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH } else { cublasMath_t::CUBLAS_DEFAULT_MATH };
            // SAFETY: a live handle owned by this struct; we hold its lock.
            unsafe { cublas::sys::cublasSetMathMode(*self.handle.handle(), mode) }
                .result()
                .map_err(|e| Error::Cublas { op: "set_math_mode", msg: format!("{e:?}") })?;
            self.tf32 = want;
        }
        Ok(())
    }
}

/// One strided batched product in row-major terms: for each `b < batch`,
/// `C_b = alpha * op(A_b) * op(B_b) + beta * C_b`, with `op(A_b)` of shape (m, k), `op(B_b)` (k, n) and
/// `C_b` (m, n). Matrix `b` of an operand starts `b * stride` elements into its buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmConfig {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `op(A) = A^T`: each A is stored (k, m) instead of (m, k). A flag to cuBLAS, never a copy.
    pub trans_a: bool,
    /// `op(B) = B^T`: each B is stored (n, k) instead of (k, n).
    pub trans_b: bool,
    /// Elements between consecutive rows of A as stored (at least its column count).
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    /// Elements between consecutive matrices; 0 uses one matrix for the whole batch (A and B only).
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub alpha: f64,
    pub beta: f64,
}

impl GemmConfig {
    /// Densely packed row-major operands, `C = op(A) op(B)` (alpha 1, beta 0).
    pub fn contiguous(batch: usize, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        GemmConfig {
            batch,
            m,
            n,
            k,
            trans_a,
            trans_b,
            // cuBLAS wants leading dimensions of at least 1, even for empty matrices.
            lda: (if trans_a { m } else { k }).max(1),
            ldb: (if trans_b { k } else { n }).max(1),
            ldc: n.max(1),
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// (rows, cols) of each A and B as stored.
    pub(super) fn stored_a(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    pub(super) fn stored_b(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// Rejects what would make cuBLAS read or write outside the buffers, or overflow its int arguments.
    pub(super) fn check(&self, a_len: usize, b_len: usize, c_len: usize) -> Result<()> {
        let dims = [self.batch, self.m, self.n, self.k];
        let bad = |msg: String| Error::invalid("gemm_strided_batched", msg, &dims);
        let ints = [
            ("batch", self.batch),
            ("m", self.m),
            ("n", self.n),
            ("k", self.k),
            ("lda", self.lda),
            ("ldb", self.ldb),
            ("ldc", self.ldc),
        ];
        for (what, v) in ints {
            if v > i32::MAX as usize {
                return Err(bad(format!("{what} = {v} exceeds cuBLAS's 32-bit limit")));
            }
        }
        for (what, v) in [("stride_a", self.stride_a), ("stride_b", self.stride_b), ("stride_c", self.stride_c)] {
            if v > i64::MAX as usize {
                return Err(bad(format!("{what} = {v} exceeds i64")));
            }
        }
        let operands = [
            ("A", self.stored_a(), self.lda, self.stride_a, a_len),
            ("B", self.stored_b(), self.ldb, self.stride_b, b_len),
            ("C", (self.m, self.n), self.ldc, self.stride_c, c_len),
        ];
        for (what, (rows, cols), ld, stride, len) in operands {
            if ld < cols.max(1) {
                return Err(bad(format!("{what} has {cols} columns but a row stride of {ld}")));
            }
            if self.batch == 0 || rows == 0 || cols == 0 {
                continue;
            }
            // The last element touched: matrix batch-1, row rows-1, column cols-1.
            let extent = (self.batch - 1)
                .checked_mul(stride)
                .and_then(|x| x.checked_add((rows - 1).checked_mul(ld)?))
                .and_then(|x| x.checked_add(cols));
            match extent {
                Some(e) if e <= len => {}
                _ => {
                    return Err(bad(format!(
                        "{what} ({rows}x{cols}, row stride {ld}, batch stride {stride}) overruns its buffer of {len} elements"
                    )))
                }
            }
        }
        if self.batch > 1 && self.m > 0 && self.n > 0 && self.stride_c < (self.m - 1) * self.ldc + self.n {
            return Err(bad(format!("the output matrices overlap (stride_c = {})", self.stride_c)));
        }
        Ok(())
    }
}

impl CudaDevice {
    /// `C_b = alpha op(A_b) op(B_b) + beta C_b` for row-major operands (see [`GemmConfig`]), f32 or f64,
    /// enqueued on this device's stream. TF32 applies to f32 when [`set_tf32`] enabled it. Operands may be
    /// [`cudarc::driver::CudaSlice`]s or views of them (offset with `slice(start..)`).
    pub fn gemm_strided_batched<T: Float>(
        &self,
        cfg: &GemmConfig,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
        c: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        const OP: &str = "gemm_strided_batched";
        for ordinal in [a.stream().context().ordinal(), b.stream().context().ordinal(), c.stream().context().ordinal()]
        {
            if ordinal != self.ordinal() {
                return Err(Error::DeviceMismatch {
                    op: OP,
                    lhs: crate::Device::Cuda(self.ordinal()),
                    rhs: crate::Device::Cuda(ordinal),
                });
            }
        }
        cfg.check(a.len(), b.len(), c.len())?;
        if cfg.batch == 0 || cfg.m == 0 || cfg.n == 0 {
            return Ok(());
        }
        let mut blas = self.blas()?.lock().unwrap_or_else(|e| e.into_inner());
        blas.sync_math_mode()?;
        self.context().bind_to_thread().or_cuda(OP)?;
        let stream = self.stream();
        let (a_ptr, _record_a) = a.device_ptr(stream);
        let (b_ptr, _record_b) = b.device_ptr(stream);
        let (c_ptr, _record_c) = c.device_ptr_mut(stream);

        // Row-major to column-major. Read column-major, a row-major (r, c) matrix with row stride ld is its
        // transpose: a (c, r) matrix with leading dimension ld. So cuBLAS sees the transpose of each stored
        // matrix, and we ask it for C^T = op(B)^T op(A)^T: B goes first, m and n swap, k stays, and the leading
        // dimensions are our row strides unchanged. The transpose flags carry over as they are: for an operand
        // stored as is, op(X)^T is the stored matrix's transpose, which is what cuBLAS sees (OP_N); for one
        // stored transposed, op(X)^T is the stored matrix itself, the transpose of what cuBLAS sees (OP_T).
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let (m, n, k) = (cfg.n as i32, cfg.m as i32, cfg.k as i32);
        let (lda, ldb, ldc) = (cfg.ldb as i32, cfg.lda as i32, cfg.ldc as i32);
        let (stride_a, stride_b, stride_c) = (cfg.stride_b as i64, cfg.stride_a as i64, cfg.stride_c as i64);
        let (trans_a, trans_b) = (op(cfg.trans_b), op(cfg.trans_a));
        let batch = cfg.batch as i32;
        let handle = *blas.handle.handle();
        // SAFETY: `check` bounded every matrix of every operand inside its buffer and the int arguments inside
        // i32; the pointers are live device buffers of this device (checked above) of element type T, which is
        // f32 in the first arm and f64 in the second; alpha and beta are host values that outlive the call.
        let r = unsafe {
            match T::DTYPE {
                DType::F32 => {
                    let (alpha, beta) = (cfg.alpha as f32, cfg.beta as f32);
                    cublas::result::sgemm_strided_batched(
                        handle,
                        trans_a,
                        trans_b,
                        m,
                        n,
                        k,
                        &alpha,
                        b_ptr as *const f32,
                        lda,
                        stride_a,
                        a_ptr as *const f32,
                        ldb,
                        stride_b,
                        &beta,
                        c_ptr as *mut f32,
                        ldc,
                        stride_c,
                        batch,
                    )
                }
                DType::F64 => {
                    let (alpha, beta) = (cfg.alpha, cfg.beta);
                    cublas::result::dgemm_strided_batched(
                        handle,
                        trans_a,
                        trans_b,
                        m,
                        n,
                        k,
                        &alpha,
                        b_ptr as *const f64,
                        lda,
                        stride_a,
                        a_ptr as *const f64,
                        ldb,
                        stride_b,
                        &beta,
                        c_ptr as *mut f64,
                        ldc,
                        stride_c,
                        batch,
                    )
                }
            }
        };
        r.map_err(|e| Error::Cublas { op: OP, msg: format!("{e:?} for {cfg:?}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_config_rejects_overruns_and_overlaps() {
        let cfg = GemmConfig::contiguous(2, 3, 4, 5, false, true);
        assert_eq!((cfg.lda, cfg.ldb, cfg.ldc), (5, 5, 4));
        assert!(cfg.check(30, 40, 24).is_ok());
        assert!(cfg.check(29, 40, 24).is_err());
        assert!(cfg.check(30, 40, 23).is_err());
        assert!(GemmConfig { lda: 4, ..cfg }.check(100, 100, 100).is_err());
        assert!(GemmConfig { stride_c: 0, ..cfg }.check(100, 100, 100).is_err());
        // A broadcast operand (stride 0) needs one matrix only.
        assert!(GemmConfig { stride_b: 0, ..cfg }.check(30, 20, 24).is_ok());
        // Empty products touch nothing.
        assert!(GemmConfig::contiguous(0, 3, 4, 5, false, false).check(0, 0, 0).is_ok());
        assert!(GemmConfig::contiguous(2, 3, 4, 0, false, false).check(0, 0, 24).is_ok());
    }
}
