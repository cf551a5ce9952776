//! cuBLASLt products with a fused epilogue, for row-major operands described by the same [`GemmConfig`] as
//! [`CudaDevice::gemm_strided_batched`]:
//!
//! - [`CudaDevice::gemm_bias`]: `C = alpha op(A) op(B) + beta C + bias`, the bias broadcast over the rows of C
//!   (`bias[j]` is added to column j: a Linear layer's output feature). `CUBLASLT_EPILOGUE_BIAS`, or
//!   `CUBLASLT_EPILOGUE_RELU_BIAS` for `max(C, 0)` of that (a Linear layer followed by a ReLU).
//! - [`CudaDevice::gemm_bias_grad`]: `C = alpha op(A) op(B) + beta C` and, in the same kernel,
//!   `bgrad[i] = sum_p op(A)[i, p]` (the row sums of op(A)). `CUBLASLT_EPILOGUE_BGRADB`.
//!
//! Row-major to column-major, as in blas.rs: a row-major (r, c) matrix with row stride ld is, read
//! column-major, its (c, r) transpose with leading dimension ld. cuBLASLt therefore computes
//! `C^T = op(B)^T op(A)^T`: its "A" is our B (layout: the stored matrix as (cols, rows, ld), op T iff our B is
//! stored transposed), its "B" is our A, its m and n are our n and m, k stays. The column-major D = C^T is
//! (n x m):
//!
//! - `EPILOGUE_BIAS` adds a vector of D's row count (our n), broadcast along D's columns (our rows): bias[j]
//!   lands on every C[i, j]. For a Linear layer `Y (M, N) = X (M, K) W^T`, our A = X (as stored), our B = W
//!   stored (N, K) (trans_b): cuBLASLt sees A = W with op T, B = X with op N ("TN"), D (N x M), bias of N.
//! - `EPILOGUE_BGRADB` writes the sums of cuBLASLt's op(B) over the k dimension, one per column of D (our m):
//!   cuBLASLt's op(B) = op(A)^T, so `bgrad[i] = sum_p op(A)[i, p]`. For a Linear layer's weight gradient
//!   `dW (N, K) = g^T X` (our A = g stored (M, N), trans_a; our B = X (M, K)) it is the bias gradient
//!   `db[j] = sum_i g[i, j]`: cuBLASLt sees A = X with op N, B = g with op T ("NT"), as Transformer Engine's
//!   weight-gradient GEMM does.
//!
//! Compute types mirror blas.rs: f32 runs `CUBLAS_COMPUTE_32F`, or `CUBLAS_COMPUTE_32F_FAST_TF32` while
//! [`super::set_tf32`] is on (the cuBLAS path's `CUBLAS_TF32_TENSOR_OP_MATH`); f64 runs `CUBLAS_COMPUTE_64F`
//! with the same epilogues (PyTorch's fused addmm runs the f64 BIAS epilogue). Whether cuBLASLt has an f64
//! BGRADB kernel is not documented either way: where its heuristic offers none, the call falls back (below),
//! and the engine's CUDA test prints which combinations did.
//!
//! The handle is made on first use, once per device, with a workspace from the device's pool (32 MiB on
//! Hopper and later, 4 MiB before: NVIDIA's recommendation) that it keeps for the life of the device; every
//! call is enqueued on the device's one stream, so one workspace serves them all. The heuristic's choice is
//! cached per (sizes, leading dims, transposes, dtype, TF32, epilogue, pointer alignments): a repeated
//! product costs descriptor set-up and the launch, no heuristic query and no synchronisation.
//!
//! Both calls return `Ok(false)`, having enqueued nothing, when the fused form is not available for the
//! arguments, and the caller runs the unfused product instead: cuBLASLt offers no algorithm (cached, so it is
//! asked once), the batch is not 1, a size is 0, or the vector is not 16-byte aligned.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::sys::{
    self as lt, cublasComputeType_t, cublasLtEpilogue_t, cublasLtMatmulAlgo_t, cublasLtMatmulDescAttributes_t as Desc,
    cublasLtMatmulPreferenceAttributes_t as Pref, cudaDataType_t,
};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::alloc::PooledSlice;
use super::blas::tf32_enabled;
use super::device::{catch_panics, library_present, Library};
use super::{CudaDevice, GemmConfig, OrCuda};
use crate::{DType, Error, Float, Result};

/// The epilogues this module runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Epilogue {
    Bias,
    ReluBias,
    BiasGradA,
}

/// What the heuristic's answer depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AlgoKey {
    dtype: DType,
    tf32: bool,
    epilogue: Epilogue,
    /// Our row-major m, n, k, leading dims and transposes.
    dims: [usize; 6],
    trans: (bool, bool),
    /// Alignment in bytes (a power of two, at most 256) of A, B, C and the vector.
    align: [u32; 4],
}

/// A device's cuBLASLt handle, its workspace and the algorithms chosen so far.
pub(crate) struct BlasLt {
    handle: lt::cublasLtHandle_t,
    workspace: PooledSlice<u8>,
    /// `None`: cuBLASLt offered no algorithm for the key, the caller falls back.
    algos: HashMap<AlgoKey, Option<cublasLtMatmulAlgo_t>>,
}

// SAFETY: the handle is a pointer to cuBLASLt's context, which may be used from any thread as long as calls
// do not overlap; the struct lives behind the device's Mutex, which serialises them.
unsafe impl Send for BlasLt {}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: a live handle created by `new`, destroyed once. (Devices live for the process, so this runs
        // only if creation is abandoned.)
        let _ = unsafe { lt::cublasLtDestroy(self.handle) };
    }
}

/// Workspace bytes: NVIDIA's recommendation (32 MiB on Hopper and later, 4 MiB before).
pub(super) fn workspace_bytes(compute_capability: (u32, u32)) -> usize {
    if compute_capability.0 >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

impl BlasLt {
    pub(crate) fn new(dev: &CudaDevice) -> std::result::Result<Mutex<BlasLt>, String> {
        if !library_present(Library::CublasLt) {
            return Err(format!(
                "libcublasLt could not be loaded (searched {}); install the CUDA toolkit's cuBLAS or add it to LD_LIBRARY_PATH",
                Library::CublasLt.candidates().join(", ")
            ));
        }
        let workspace = dev
            .alloc::<u8>(workspace_bytes(dev.compute_capability()))
            .map_err(|e| format!("allocating the cuBLASLt workspace: {e}"))?;
        catch_panics("cublasLtCreate", || {
            dev.context().bind_to_thread().map_err(|e| format!("binding the context: {e:?}"))?;
            let mut handle = std::ptr::null_mut();
            // SAFETY: writes a new handle into `handle`.
            unsafe { lt::cublasLtCreate(&mut handle) }.result().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
            Ok(Mutex::new(BlasLt { handle, workspace, algos: HashMap::new() }))
        })
    }
}

/// The largest power of two (at most 256) dividing a device address.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

/// Owns a cuBLASLt descriptor and destroys it on drop (cuBLASLt's destroy calls only fail on a null
/// pointer, which these never hold).
struct Owned<T: Copy>(T, unsafe fn(T) -> lt::cublasStatus_t);

impl<T: Copy> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: the descriptor was created by the matching create call and is destroyed once.
        let _ = unsafe { (self.1)(self.0) };
    }
}

type LtResult<T> = std::result::Result<T, String>;

fn check(status: lt::cublasStatus_t, what: &str) -> LtResult<()> {
    status.result().map_err(|e| format!("{what}: {e:?}"))
}

/// Sets one attribute of a matmul descriptor from a plain value.
fn set_desc<V>(desc: lt::cublasLtMatmulDesc_t, attr: Desc, v: &V) -> LtResult<()> {
    // SAFETY: `desc` is live; cuBLASLt copies size_of::<V>() bytes from `v`, the attribute's documented type.
    check(
        unsafe { lt::cublasLtMatmulDescSetAttribute(desc, attr, v as *const V as *const c_void, size_of::<V>()) },
        &format!("setting {attr:?}"),
    )
}

fn set_pref<V>(pref: lt::cublasLtMatmulPreference_t, attr: Pref, v: &V) -> LtResult<()> {
    // SAFETY: as in `set_desc`.
    check(
        unsafe { lt::cublasLtMatmulPreferenceSetAttribute(pref, attr, v as *const V as *const c_void, size_of::<V>()) },
        &format!("setting {attr:?}"),
    )
}

/// A column-major layout of `rows` x `cols` with leading dimension `ld`.
fn layout(ty: cudaDataType_t, rows: usize, cols: usize, ld: usize) -> LtResult<Owned<lt::cublasLtMatrixLayout_t>> {
    let mut h = std::ptr::null_mut();
    // SAFETY: writes a new descriptor into `h`.
    check(
        unsafe { lt::cublasLtMatrixLayoutCreate(&mut h, ty, rows as u64, cols as u64, ld as i64) },
        "cublasLtMatrixLayoutCreate",
    )?;
    Ok(Owned(h, lt::cublasLtMatrixLayoutDestroy))
}

impl CudaDevice {
    pub(crate) fn blas_lt(&self) -> Result<&Mutex<BlasLt>> {
        self.blas_lt
            .get_or_init(|| BlasLt::new(self))
            .as_ref()
            .map_err(|msg| Error::Cublas { op: "cublasLt create", msg: msg.clone() })
    }

    /// `C = alpha op(A) op(B) + beta C + bias` for row-major operands (see [`GemmConfig`]; batch 1), with
    /// `bias[j]` added to every row's column j (`bias` holds at least n elements), in cuBLASLt's BIAS
    /// epilogue: one kernel; with `relu`, `max(that, 0)` (RELU_BIAS). `Ok(false)` when the fused form is not
    /// available (see the module docs): nothing was enqueued, run the product and the add instead.
    pub fn gemm_bias<T: Float>(
        &self,
        cfg: &GemmConfig,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
        c: &mut impl DevicePtrMut<T>,
        bias: &impl DevicePtr<T>,
        relu: bool,
    ) -> Result<bool> {
        const OP: &str = "gemm_bias";
        self.check_same_device(OP, &[a.stream(), b.stream(), c.stream(), bias.stream()])?;
        if bias.len() < cfg.n {
            let msg = format!("the bias has {} elements, the product {} columns", bias.len(), cfg.n);
            return Err(Error::invalid(OP, msg, &[cfg.m, cfg.n, cfg.k]));
        }
        let stream = self.stream();
        let (v, _record_v) = bias.device_ptr(stream);
        self.lt_matmul::<T>(OP, cfg, a, b, c, if relu { Epilogue::ReluBias } else { Epilogue::Bias }, v)
    }

    /// `C = alpha op(A) op(B) + beta C` for row-major operands (batch 1) and, in cuBLASLt's BGRADB epilogue
    /// of the same kernel, `bgrad[i] = sum_p op(A)[i, p]` for i < m (overwritten, not accumulated). For a
    /// Linear layer's `dW = g^T X` (A = g stored (rows, out), `trans_a`) that is its bias gradient.
    /// `Ok(false)` when the fused form is not available: nothing was enqueued.
    ///
    /// Measured on an H200, cuBLASLt runs these sums as a kernel of its own after the product
    /// (`globalKernelBgradAB_v2`, 130 us for a (200704, 64) g, about 3x a plain column sum), so ops' Linear
    /// backward does not use it.
    pub fn gemm_bias_grad<T: Float>(
        &self,
        cfg: &GemmConfig,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
        c: &mut impl DevicePtrMut<T>,
        bgrad: &mut impl DevicePtrMut<T>,
    ) -> Result<bool> {
        const OP: &str = "gemm_bias_grad";
        self.check_same_device(OP, &[a.stream(), b.stream(), c.stream(), bgrad.stream()])?;
        if bgrad.len() < cfg.m {
            let msg = format!("the bias gradient has {} elements, the product {} rows", bgrad.len(), cfg.m);
            return Err(Error::invalid(OP, msg, &[cfg.m, cfg.n, cfg.k]));
        }
        let stream = self.stream();
        let (v, _record_v) = bgrad.device_ptr_mut(stream);
        self.lt_matmul::<T>(OP, cfg, a, b, c, Epilogue::BiasGradA, v)
    }

    fn check_same_device(&self, op: &'static str, streams: &[&Arc<CudaStream>]) -> Result<()> {
        for s in streams {
            let ordinal = s.context().ordinal();
            if ordinal != self.ordinal() {
                return Err(Error::DeviceMismatch {
                    op,
                    lhs: crate::Device::Cuda(self.ordinal()),
                    rhs: crate::Device::Cuda(ordinal),
                });
            }
        }
        Ok(())
    }

    /// The shared body: `vector` is the bias (read) or the bias gradient (written).
    #[allow(clippy::too_many_arguments)]
    fn lt_matmul<T: Float>(
        &self,
        op: &'static str,
        cfg: &GemmConfig,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
        c: &mut impl DevicePtrMut<T>,
        epilogue: Epilogue,
        vector: u64,
    ) -> Result<bool> {
        cfg.check(a.len(), b.len(), c.len())?;
        if cfg.batch != 1 || cfg.m == 0 || cfg.n == 0 || cfg.k == 0 || !vector.is_multiple_of(16) {
            return Ok(false);
        }
        let mut blas = self.blas_lt()?.lock().unwrap_or_else(|e| e.into_inner());
        let blas = &mut *blas;
        self.context().bind_to_thread().or_cuda(op)?;
        let stream = self.stream();
        let (a_ptr, _record_a) = a.device_ptr(stream);
        let (b_ptr, _record_b) = b.device_ptr(stream);
        let (c_ptr, _record_c) = c.device_ptr_mut(stream);
        let (w_ptr, _record_w) = blas.workspace.as_slice().device_ptr(stream);
        let workspace = blas.workspace.len();
        let tf32 = T::DTYPE == DType::F32 && tf32_enabled();
        let key = AlgoKey {
            dtype: T::DTYPE,
            tf32,
            epilogue,
            dims: [cfg.m, cfg.n, cfg.k, cfg.lda, cfg.ldb, cfg.ldc],
            trans: (cfg.trans_a, cfg.trans_b),
            align: [alignment(a_ptr), alignment(b_ptr), alignment(c_ptr), alignment(vector)],
        };
        let fail = |msg: String| Error::Cublas {
            op,
            msg: format!("{msg} for {cfg:?} ({} on cuda:{}, epilogue {epilogue:?})", T::DTYPE, self.ordinal()),
        };
        let (ty, compute) = match T::DTYPE {
            DType::F32 if tf32 => (cudaDataType_t::CUDA_R_32F, cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32),
            DType::F32 => (cudaDataType_t::CUDA_R_32F, cublasComputeType_t::CUBLAS_COMPUTE_32F),
            DType::F64 => (cudaDataType_t::CUDA_R_64F, cublasComputeType_t::CUBLAS_COMPUTE_64F),
        };

        // The descriptors, in cuBLASLt's column-major terms (module docs): its A is our B, its B our A.
        let mut desc = std::ptr::null_mut();
        // SAFETY: writes a new descriptor into `desc`; the scale type is the element type (alpha, beta below).
        check(unsafe { lt::cublasLtMatmulDescCreate(&mut desc, compute, ty) }, "cublasLtMatmulDescCreate")
            .map_err(fail)?;
        let desc = Owned(desc, lt::cublasLtMatmulDescDestroy);
        // cublasOperation_t: 0 = N, 1 = T (an int32 attribute).
        let (op_a, op_b) = (cfg.trans_b as i32, cfg.trans_a as i32);
        let ep = match epilogue {
            Epilogue::Bias => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::ReluBias => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
            Epilogue::BiasGradA => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
        };
        let (stored_a, stored_b) = (cfg.stored_a(), cfg.stored_b());
        let set_up = || -> LtResult<_> {
            set_desc(desc.0, Desc::CUBLASLT_MATMUL_DESC_TRANSA, &op_a)?;
            set_desc(desc.0, Desc::CUBLASLT_MATMUL_DESC_TRANSB, &op_b)?;
            set_desc(desc.0, Desc::CUBLASLT_MATMUL_DESC_EPILOGUE, &ep)?;
            set_desc(desc.0, Desc::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &vector)?;
            // Each stored row-major (rows, cols) matrix is a column-major (cols, rows) one.
            let la = layout(ty, stored_b.1, stored_b.0, cfg.ldb)?;
            let lb = layout(ty, stored_a.1, stored_a.0, cfg.lda)?;
            let ld = layout(ty, cfg.n, cfg.m, cfg.ldc)?;
            Ok((la, lb, ld))
        };
        let (la, lb, ld) = set_up().map_err(fail)?;

        let algo = match blas.algos.get(&key) {
            Some(found) => *found,
            None => {
                let found = heuristic(blas.handle, desc.0, (la.0, lb.0, ld.0), workspace, &key).map_err(fail)?;
                blas.algos.insert(key, found);
                found
            }
        };
        let Some(algo) = algo else { return Ok(false) };

        let (alpha32, beta32) = (cfg.alpha as f32, cfg.beta as f32);
        let (alpha, beta): (*const c_void, *const c_void) = match T::DTYPE {
            DType::F32 => (&alpha32 as *const f32 as _, &beta32 as *const f32 as _),
            DType::F64 => (&cfg.alpha as *const f64 as _, &cfg.beta as *const f64 as _),
        };
        // SAFETY: `check` bounded every operand inside its buffer; the pointers are live device buffers of this
        // device of element type T (the layouts' type); the vector holds m or n elements as the epilogue needs
        // (checked by the callers); alpha and beta are host values of the scale type that outlive the call;
        // the algorithm was chosen for these descriptors and the workspace is ours, used only on this stream.
        let status = unsafe {
            lt::cublasLtMatmul(
                blas.handle,
                desc.0,
                alpha,
                b_ptr as *const c_void,
                la.0,
                a_ptr as *const c_void,
                lb.0,
                beta,
                c_ptr as *const c_void,
                ld.0,
                c_ptr as *mut c_void,
                ld.0,
                &algo,
                w_ptr as *mut c_void,
                workspace,
                stream.cu_stream() as lt::cudaStream_t,
            )
        };
        check(status, "cublasLtMatmul").map_err(fail)?;
        Ok(true)
    }
}

/// The heuristic's first algorithm for the descriptors, `None` when it has none.
fn heuristic(
    handle: lt::cublasLtHandle_t,
    desc: lt::cublasLtMatmulDesc_t,
    (la, lb, ld): (lt::cublasLtMatrixLayout_t, lt::cublasLtMatrixLayout_t, lt::cublasLtMatrixLayout_t),
    workspace: usize,
    key: &AlgoKey,
) -> LtResult<Option<cublasLtMatmulAlgo_t>> {
    let mut pref = std::ptr::null_mut();
    // SAFETY: writes a new descriptor into `pref`.
    check(unsafe { lt::cublasLtMatmulPreferenceCreate(&mut pref) }, "cublasLtMatmulPreferenceCreate")?;
    let pref = Owned(pref, lt::cublasLtMatmulPreferenceDestroy);
    set_pref(pref.0, Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(workspace as u64))?;
    // cuBLASLt assumes 256-byte aligned operands unless told otherwise (the key carries the alignments, so an
    // algorithm is reused only for pointers aligned as well).
    let [a, b, c, _] = key.align;
    set_pref(pref.0, Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &b)?;
    set_pref(pref.0, Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &a)?;
    set_pref(pref.0, Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c)?;
    set_pref(pref.0, Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &c)?;
    // SAFETY: a zeroed result is a valid bit pattern for this plain C struct; cuBLASLt fills it.
    let mut result: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
    let mut count = 0;
    // SAFETY: live descriptors; room for the one result requested.
    let status =
        unsafe { lt::cublasLtMatmulAlgoGetHeuristic(handle, desc, la, lb, ld, ld, pref.0, 1, &mut result, &mut count) };
    match status {
        lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS if count > 0 && result.state.result().is_ok() => {
            Ok(Some(result.algo))
        }
        lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS | lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => Ok(None),
        other => Err(format!("cublasLtMatmulAlgoGetHeuristic: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignments_are_powers_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0104), 4);
        assert_eq!(alignment(0x7f00_0000_0110), 16);
        assert_eq!(alignment(0x7f00_0000_0180), 128);
        assert_eq!(workspace_bytes((9, 0)), 32 << 20);
        assert_eq!(workspace_bytes((8, 6)), 4 << 20);
    }
}
