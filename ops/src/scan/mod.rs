//! The selective (gated) scan of Mamba (docs/MILA.md, section 6): one op, one backward, gradients for every
//! input.
//!
//! Shapes: u, delta, z (B, C, L); A (C, S); Bm, Cm (B, S, L); D, delta_bias (C); output (B, C, L). Per batch
//! b, channel c, state n and time t = 0..L (h[-1] = 0):
//!
//! | | formula |
//! | --- | --- |
//! | input gate | dt[t] = softplus(delta[t] + delta_bias) (or delta[t] + delta_bias without softplus) |
//! | forget gate | dA[t,n] = exp(dt[t] A[n]), in (0, 1) for A < 0 |
//! | state | h[t,n] = dA[t,n] h[t-1,n] + dt[t] Bm[n,t] u[t] |
//! | readout | y[t] = sum_n Cm[n,t] h[t,n] + D u[t] |
//! | gate | out[t] = y[t] silu(z[t]) |
//!
//! Backward is the reverse-time scan. With gout = dL/dout, gy = gout silu(z) and the state cotangent
//! gh[t,n] = Cm[n,t] gy[t] + dA[t+1,n] gh[t+1,n] (gh[L] = 0):
//!
//! | input | gradient |
//! | --- | --- |
//! | z | gout y silu'(z), silu'(z) = s (1 + z (1 - s)), s = sigmoid(z) |
//! | u | D gy + sum_n gh dt Bm |
//! | delta | sum_n gh (A dA h[t-1] + Bm u), times softplus'(delta + delta_bias) = sigmoid(..) when enabled |
//! | delta_bias | the delta gradient summed over (b, t) |
//! | A | sum_{b,t} gh dt dA h[t-1] |
//! | Bm | sum_c gh dt u |
//! | Cm | sum_c gy h |
//! | D | sum_{b,t} gy u |
//!
//! softplus is PyTorch's (threshold 20: x itself above it, with derivative 1), as in Mamba's kernels.
//!
//! Memory: the forward never keeps the (B, C, S, L) state sequence. It saves only the state entering each
//! chunk of `chunk` steps, (B, C, ceil(L / chunk), S); backward walks the chunks from the last to the first,
//! recomputes the chunk's states from its saved entry (one forward pass over `chunk` steps), then runs the
//! reverse-time recurrence over them. The cost is one extra forward; the memory is S / chunk of the input's.
//!
//! Kernels: CPU in cpu.rs (forward) and backward.rs (the reverse-time scan), parallel over (batch, channel)
//! with rayon and deterministic reductions; CUDA in scan.cu (design, byte and exp counts in its header; launch
//! planning in cuda.rs), also deterministic, checked on the CPU by the emulator in emu/. `selective_scan_ref`
//! (reference.rs) is the plain f64 time loop for tests.

mod backward;
mod cpu;
pub(crate) mod cuda;
mod reference;

pub use reference::selective_scan_ref;

use engine::{Device, Error, Op, Result, Storage, Tensor};

use crate::util::{check_vector, same_dtype_device, saved_contiguous};

const OP: &str = "selective_scan";

/// Steps between saved states on the CPU: the backward recomputes at most this many states at a time. (The
/// CUDA kernels use their own tile, a multiple of 8 up to 32 steps, so that a tile's work fits in shared
/// memory; see cuda.rs.)
pub(crate) const DEFAULT_CHUNK: usize = 64;

/// Sizes of one scan, checked at op entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub channels: usize,
    pub length: usize,
    pub states: usize,
}

impl Dims {
    /// Saved states per (batch, channel) for a chunk of `chunk` steps.
    pub(crate) fn chunks(&self, chunk: usize) -> usize {
        self.length.div_ceil(chunk.max(1))
    }
}

/// Checks every operand's shape, dtype and device against u's and returns the sizes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    delta_bias: Option<&Tensor>,
) -> Result<Dims> {
    let &[batch, channels, length] = u.shape() else {
        return Err(Error::invalid(OP, "u must be (batch, channels, length)", u.shape()));
    };
    for t in [delta, a, b, c].into_iter().chain(d).chain(z).chain(delta_bias) {
        same_dtype_device(OP, u, t)?;
    }
    if delta.shape() != u.shape() {
        return Err(Error::ShapeMismatch { op: OP, lhs: u.shape().to_vec(), rhs: delta.shape().to_vec() });
    }
    if let Some(z) = z {
        if z.shape() != u.shape() {
            return Err(Error::ShapeMismatch { op: OP, lhs: u.shape().to_vec(), rhs: z.shape().to_vec() });
        }
    }
    let states = match a.shape() {
        &[ac, s] if ac == channels && s > 0 => s,
        _ => {
            return Err(Error::invalid(
                OP,
                format!("A must be (channels, states) with channels = {channels} (u's) and states >= 1"),
                a.shape(),
            ))
        }
    };
    for (what, m) in [("B", b), ("C", c)] {
        if m.shape() != [batch, states, length] {
            return Err(Error::invalid(
                OP,
                format!("{what} must be (batch, states, length) = [{batch}, {states}, {length}]"),
                m.shape(),
            ));
        }
    }
    check_vector(OP, "D", d, u, channels)?;
    check_vector(OP, "delta_bias", delta_bias, u, channels)?;
    Ok(Dims { batch, channels, length, states })
}

/// The scan's operands, detached and contiguous (copied only when they were not): what the kernels read and
/// what the op keeps for its backward.
pub(crate) struct Operands {
    pub u: Tensor,
    pub delta: Tensor,
    pub a: Tensor,
    pub b: Tensor,
    pub c: Tensor,
    pub d: Option<Tensor>,
    pub z: Option<Tensor>,
    pub delta_bias: Option<Tensor>,
}

/// What a forward kernel returns: the output (B, C, L), the chunk-entry states (B, C, chunks, S) and the chunk
/// length it used.
pub(crate) struct Forward {
    pub out: Storage,
    pub states: Storage,
    pub chunk: usize,
}

/// Gradients from a backward kernel, one per input; `None` for an optional input that was not given.
pub(crate) struct ScanGrads<S> {
    pub u: S,
    pub delta: S,
    pub a: S,
    pub b: S,
    pub c: S,
    pub d: Option<S>,
    pub z: Option<S>,
    pub delta_bias: Option<S>,
}

/// The scan's node on the tape: the operands, the chunk-entry states and how the forward ran.
struct SelectiveScan {
    x: Operands,
    /// (B, C, chunks, S): the state entering each chunk (zeros for the first).
    states: Tensor,
    dims: Dims,
    chunk: usize,
    delta_softplus: bool,
}

impl Op for SelectiveScan {
    fn name(&self) -> &'static str {
        OP
    }

    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = g.contiguous()?;
        let grads = match g.device() {
            Device::Cpu => backward::backward(&self.x, &self.states, &g, self.dims, self.delta_softplus, self.chunk)?,
            Device::Cuda(_) => cuda::backward(&self.x, &self.states, &g, self.dims, self.delta_softplus, self.chunk)?,
        };
        let Dims { batch, channels, length, states } = self.dims;
        let t = |s: Storage, shape: &[usize]| Tensor::from_storage(s, shape).map(Some);
        let (bcl, bsl) = ([batch, channels, length], [batch, states, length]);
        // The recorded input order: u, delta, A, B, C, then D, z, delta_bias where given.
        let mut out =
            vec![t(grads.u, &bcl)?, t(grads.delta, &bcl)?, t(grads.a, &[channels, states])?, t(grads.b, &bsl)?];
        out.push(t(grads.c, &bsl)?);
        for (s, shape) in [(grads.d, &[channels][..]), (grads.z, &bcl[..]), (grads.delta_bias, &[channels][..])] {
            if let Some(s) = s {
                out.push(t(s, shape)?);
            }
        }
        Ok(out)
    }
}

/// Mamba's selective scan (docs/MILA.md, section 6): u, delta, z (B, C, L); A (C, S); B, C (B, S, L); D and
/// delta_bias (C). Returns out (B, C, L), with out = (sum_n C h + D u) silu(z) and
/// h[t] = exp(dt A) h[t-1] + dt B u, dt = softplus(delta + delta_bias) when `delta_softplus`, else
/// delta + delta_bias. D, z and delta_bias are optional (no skip, no gate, no bias). Differentiable in every
/// input; inputs may be any views.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    delta_bias: Option<&Tensor>,
    delta_softplus: bool,
) -> Result<Tensor> {
    selective_scan_chunked(u, delta, a, b, c, d, z, delta_bias, delta_softplus, DEFAULT_CHUNK)
}

/// [`selective_scan`] saving the state every `chunk` steps (CUDA rounds it to its tiles, see cuda.rs): tests pick
/// small chunks to put chunk boundaries inside short sequences.
#[allow(clippy::too_many_arguments)]
pub(crate) fn selective_scan_chunked(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    delta_bias: Option<&Tensor>,
    delta_softplus: bool,
    chunk: usize,
) -> Result<Tensor> {
    let dims = check(u, delta, a, b, c, d, z, delta_bias)?;
    if chunk == 0 {
        return Err(Error::invalid(OP, "the chunk length must be at least 1", u.shape()));
    }
    let saved = |t: Option<&Tensor>| t.map(saved_contiguous).transpose();
    let x = Operands {
        u: saved_contiguous(u)?,
        delta: saved_contiguous(delta)?,
        a: saved_contiguous(a)?,
        b: saved_contiguous(b)?,
        c: saved_contiguous(c)?,
        d: saved(d)?,
        z: saved(z)?,
        delta_bias: saved(delta_bias)?,
    };
    // Dispatch on the device rather than on a storage guard: the kernels lock every operand themselves, and u
    // may share its storage with them.
    let fwd = match u.device() {
        Device::Cpu => cpu::forward(&x, dims, delta_softplus, chunk)?,
        Device::Cuda(_) => cuda::forward(&x, dims, delta_softplus, chunk)?,
    };
    let states = Tensor::from_storage(fwd.states, &[dims.batch, dims.channels, dims.chunks(fwd.chunk), dims.states])?;
    let mut inputs = vec![u, delta, a, b, c];
    inputs.extend(d);
    inputs.extend(z);
    inputs.extend(delta_bias);
    let shape = [dims.batch, dims.channels, dims.length];
    Ok(Tensor::from_op(fwd.out, &shape, &inputs, || SelectiveScan {
        x,
        states,
        dims,
        chunk: fwd.chunk,
        delta_softplus,
    }))
}

#[cfg(test)]
mod tests;
