//! CPU kernels of the convolution family: depthwise direct loops, im2col + GEMM (the `gemm` crate) for dense
//! and grouped conv2d, and the causal depthwise conv1d. Inputs arrive contiguous; work is split over samples
//! or (sample, channel) planes with rayon.

use engine::{CpuStorage, Error, Float, Result, Storage};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{Conv1dGeom, Conv2dGeom};
use crate::util::{contiguous_slice, gathered, with_dtype, Grads, Needs, Operand};

/// Output positions `lo..hi` along one axis whose input index `o * stride + off` lies in `0..len`.
fn valid_range(out_len: usize, len: usize, stride: usize, off: isize) -> (usize, usize) {
    let lo = if off >= 0 { 0 } else { off.unsigned_abs().div_ceil(stride) };
    let room = len as isize - off; // o * stride < room
    let hi = if room <= 0 { 0 } else { (room as usize).div_ceil(stride).min(out_len) };
    (lo.min(hi), hi)
}

/// One kernel tap along a row: outputs `lo..hi` read input column `o * stride + off`, from `start` on.
/// Stride 1, the common case, walks plain slices that the compiler vectorises.
#[derive(Debug, Clone, Copy)]
struct Cols {
    lo: usize,
    hi: usize,
    stride: usize,
    start: usize,
}

impl Cols {
    fn new(out_len: usize, len: usize, stride: usize, off: isize) -> Cols {
        let (lo, hi) = valid_range(out_len, len, stride, off);
        let start = if lo < hi { ((lo * stride) as isize + off) as usize } else { 0 };
        Cols { lo, hi, stride, start }
    }

    /// f(out[o], input[o * stride + off]) for the valid outputs o.
    #[inline(always)]
    fn gather<T: Float>(&self, input: &[T], out: &mut [T], f: impl Fn(&mut T, T)) {
        let (out, n) = (&mut out[self.lo..self.hi], self.hi - self.lo);
        if self.stride == 1 {
            for (o, &v) in out.iter_mut().zip(&input[self.start..self.start + n]) {
                f(o, v);
            }
        } else {
            for (o, &v) in out.iter_mut().zip(input[self.start..].iter().step_by(self.stride)) {
                f(o, v);
            }
        }
    }

    /// f(input[o * stride + off], out[o]) for the valid outputs o: the transpose of `gather`.
    #[inline(always)]
    fn scatter<T: Float>(&self, out: &[T], input: &mut [T], f: impl Fn(&mut T, T)) {
        let out = &out[self.lo..self.hi];
        if self.stride == 1 {
            for (d, &v) in input[self.start..self.start + out.len()].iter_mut().zip(out) {
                f(d, v);
            }
        } else {
            for (d, &v) in input[self.start..].iter_mut().step_by(self.stride).zip(out) {
                f(d, v);
            }
        }
    }

    /// sum over the valid outputs o of out[o] input[o * stride + off].
    #[inline(always)]
    fn dot<T: Float>(&self, out: &[T], input: &[T]) -> T {
        let out = &out[self.lo..self.hi];
        if self.stride == 1 {
            // Eight running sums, so that the loop vectorises (one sum would chain every addition).
            let input = &input[self.start..self.start + out.len()];
            let mut acc = [T::ZERO; 8];
            let (oc, ic) = (out.chunks_exact(8), input.chunks_exact(8));
            let tail: T = oc.remainder().iter().zip(ic.remainder()).map(|(&a, &b)| a * b).sum();
            for (o8, i8) in oc.zip(ic) {
                for k in 0..8 {
                    acc[k] += o8[k] * i8[k];
                }
            }
            acc.iter().copied().sum::<T>() + tail
        } else {
            out.iter().zip(input[self.start..].iter().step_by(self.stride)).map(|(&a, &b)| a * b).sum()
        }
    }
}

impl Conv2dGeom {
    /// The columns of tap j along a row.
    fn cols(&self, j: usize) -> Cols {
        Cols::new(self.ow, self.w, self.stride.1, self.tap_offset(0, j).1)
    }

    /// Input offset of kernel tap (i, j) relative to the output position scaled by the stride.
    fn tap_offset(&self, i: usize, j: usize) -> (isize, isize) {
        (
            (i * self.dilation.0) as isize - self.padding.0 as isize,
            (j * self.dilation.1) as isize - self.padding.1 as isize,
        )
    }

    /// Elements of one input channel plane and of one output plane.
    fn planes(&self) -> (usize, usize) {
        (self.h * self.w, self.oh * self.ow)
    }

    /// Rows of the im2col matrix (and columns of a group's weight matrix): C/G kh kw.
    fn patch_len(&self) -> usize {
        self.c / self.groups * self.kh * self.kw
    }
}

/// A matrix inside a slice: element (r, c) at `r * rs + c * cs`. Transposes are strides, not copies.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }
    fn t(self) -> Self {
        Mat { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    /// One past the last element read (0 for an empty matrix).
    fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// dst (row-major, a.rows x b.cols) = a @ b, or dst += a @ b when `accumulate`.
fn matmul<T: Float>(dst: &mut [T], a: Mat<T>, b: Mat<T>, accumulate: bool, par: Parallelism) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || dst.len() != m * n || a.span() > a.data.len() || b.span() > b.data.len() {
        return Err(Error::Msg {
            context: "conv2d",
            msg: format!("internal: gemm operands {m}x{k} @ {}x{n} into {} elements", b.rows, dst.len()),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::ZERO);
        }
        return Ok(());
    }
    // SAFETY: the extents were checked above: a reads a.span() <= a.data.len() elements, b likewise, and dst
    // (m x n, row stride n) is exactly dst.len() elements; dst is a unique borrow, so it aliases neither input.
    // T is f32 or f64, the types gemm dispatches on.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// Threads for each GEMM when samples already run in parallel: all of them only for small batches.
fn gemm_parallelism(batch: usize) -> Parallelism {
    if batch >= rayon::current_num_threads() {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// cols (C/G kh kw, OH OW) from one group's channels `x` (C/G, H, W) of one sample.
fn im2col<T: Float>(x: &[T], g: &Conv2dGeom, cols: &mut [T]) {
    let (plane, p) = g.planes();
    let mut rows = cols.chunks_exact_mut(p);
    for xc in x.chunks_exact(plane) {
        for i in 0..g.kh {
            for j in 0..g.kw {
                let Some(row) = rows.next() else { return };
                let di = g.tap_offset(i, j).0;
                let (a_lo, a_hi) = valid_range(g.oh, g.h, g.stride.0, di);
                let cols = g.cols(j);
                for (a, out) in row.chunks_exact_mut(g.ow).enumerate() {
                    out.fill(T::ZERO);
                    if (a_lo..a_hi).contains(&a) {
                        let ih = ((a * g.stride.0) as isize + di) as usize;
                        cols.gather(&xc[ih * g.w..][..g.w], out, |o, v| *o = v);
                    }
                }
            }
        }
    }
}

/// dx (C/G, H, W) += the patches in `cols` put back where im2col took them from.
fn col2im<T: Float>(cols: &[T], g: &Conv2dGeom, dx: &mut [T]) {
    let (plane, p) = g.planes();
    let mut rows = cols.chunks_exact(p);
    for dxc in dx.chunks_exact_mut(plane) {
        for i in 0..g.kh {
            for j in 0..g.kw {
                let Some(row) = rows.next() else { return };
                let di = g.tap_offset(i, j).0;
                let (a_lo, a_hi) = valid_range(g.oh, g.h, g.stride.0, di);
                let cols = g.cols(j);
                for a in a_lo..a_hi {
                    let ih = ((a * g.stride.0) as isize + di) as usize;
                    cols.scatter(&row[a * g.ow..][..g.ow], &mut dxc[ih * g.w..][..g.w], |d, v| *d += v);
                }
            }
        }
    }
}

/// One depthwise plane: y (OH, OW) += conv of the plane `x` (H, W) with the filter `k` (kh, kw).
fn depthwise_plane<T: Float>(x: &[T], k: &[T], g: &Conv2dGeom, y: &mut [T]) {
    for i in 0..g.kh {
        for j in 0..g.kw {
            let wv = k[i * g.kw + j];
            let di = g.tap_offset(i, j).0;
            let (a_lo, a_hi) = valid_range(g.oh, g.h, g.stride.0, di);
            let cols = g.cols(j);
            for a in a_lo..a_hi {
                let ih = ((a * g.stride.0) as isize + di) as usize;
                cols.gather(&x[ih * g.w..][..g.w], &mut y[a * g.ow..][..g.ow], |o, v| *o += wv * v);
            }
        }
    }
}

/// The transpose of `depthwise_plane`: dx (H, W) += the scatter of gy (OH, OW) through the filter `k`.
fn depthwise_plane_backward<T: Float>(gy: &[T], k: &[T], g: &Conv2dGeom, dx: &mut [T]) {
    for i in 0..g.kh {
        for j in 0..g.kw {
            let wv = k[i * g.kw + j];
            let di = g.tap_offset(i, j).0;
            let (a_lo, a_hi) = valid_range(g.oh, g.h, g.stride.0, di);
            let cols = g.cols(j);
            for a in a_lo..a_hi {
                let ih = ((a * g.stride.0) as isize + di) as usize;
                cols.scatter(&gy[a * g.ow..][..g.ow], &mut dx[ih * g.w..][..g.w], |d, v| *d += wv * v);
            }
        }
    }
}

/// dk (kh, kw) += correlation of one input plane x (H, W) with its output gradient gy (OH, OW).
fn depthwise_plane_weight_grad<T: Float>(x: &[T], gy: &[T], g: &Conv2dGeom, dk: &mut [T]) {
    for i in 0..g.kh {
        for j in 0..g.kw {
            let di = g.tap_offset(i, j).0;
            let (a_lo, a_hi) = valid_range(g.oh, g.h, g.stride.0, di);
            let cols = g.cols(j);
            let mut acc = T::ZERO;
            for a in a_lo..a_hi {
                let ih = ((a * g.stride.0) as isize + di) as usize;
                acc += cols.dot(&gy[a * g.ow..][..g.ow], &x[ih * g.w..][..g.w]);
            }
            dk[i * g.kw + j] += acc;
        }
    }
}

pub(super) fn conv2d(x: Operand, w: Operand, bias: Option<Operand>, g: &Conv2dGeom) -> Result<CpuStorage> {
    fn run<T: Float>(x: &[T], w: Operand, bias: Option<Operand>, g: &Conv2dGeom) -> Result<Vec<T>> {
        const OP: &str = "conv2d";
        let w = contiguous_slice::<T>(OP, w.0, w.1)?;
        let bias = bias.map(|(s, l)| gathered::<T>(OP, s, l)).transpose()?;
        let (plane, p) = g.planes();
        let mut y = vec![T::ZERO; g.n * g.o * p];
        if y.is_empty() {
            return Ok(y);
        }
        // Every output plane starts at its bias; the kernels accumulate onto it.
        if let Some(b) = &bias {
            for (i, out) in y.chunks_exact_mut(p).enumerate() {
                out.fill(b[i % g.o]);
            }
        }
        if g.is_depthwise() {
            let taps = g.kh * g.kw;
            y.par_chunks_mut(p).enumerate().for_each(|(nc, out)| {
                let c = nc % g.c;
                depthwise_plane(&x[nc * plane..][..plane], &w[c * taps..][..taps], g, out);
            });
            return Ok(y);
        }
        let (cg, og, k) = (g.c / g.groups, g.o / g.groups, g.patch_len());
        let par = gemm_parallelism(g.n);
        y.par_chunks_mut(g.o * p).enumerate().try_for_each(|(n, yn)| {
            let mut cols = if g.is_pointwise() { Vec::new() } else { vec![T::ZERO; k * p] };
            for q in 0..g.groups {
                let xq = &x[(n * g.c + q * cg) * plane..][..cg * plane];
                let cols = if g.is_pointwise() {
                    xq
                } else {
                    im2col(xq, g, &mut cols);
                    &cols
                };
                let wq = Mat::row_major(&w[q * og * k..][..og * k], og, k);
                matmul(&mut yn[q * og * p..][..og * p], wq, Mat::row_major(cols, k, p), true, par)?;
            }
            Ok(())
        })?;
        Ok(y)
    }
    with_dtype!(x.0.dtype(), |T| Ok(T::into_storage(run::<T>(contiguous_slice("conv2d", x.0, x.1)?, w, bias, g)?)))
}

pub(super) fn conv2d_backward(
    x: Operand,
    w: Operand,
    gy: Operand,
    g: &Conv2dGeom,
    needs: Needs,
) -> Result<Grads<Storage>> {
    fn run<T: Float>(x: &[T], w: &[T], gy: &[T], g: &Conv2dGeom, needs: Needs) -> Result<Grads<Vec<T>>> {
        let (plane, p) = g.planes();
        let bias = needs.bias.then(|| {
            let mut db = vec![T::ZERO; g.o];
            for (i, out) in gy.chunks_exact(p).enumerate() {
                db[i % g.o] += out.iter().copied().sum::<T>();
            }
            db
        });
        if g.is_depthwise() {
            let taps = g.kh * g.kw;
            let dx = needs.x.then(|| {
                let mut dx = vec![T::ZERO; g.n * g.c * plane];
                dx.par_chunks_mut(plane.max(1)).enumerate().for_each(|(nc, dxp)| {
                    let c = nc % g.c;
                    depthwise_plane_backward(&gy[nc * p..][..p], &w[c * taps..][..taps], g, dxp);
                });
                dx
            });
            let dw = needs.w.then(|| {
                let mut dw = vec![T::ZERO; g.c * taps];
                dw.par_chunks_mut(taps).enumerate().for_each(|(c, dk)| {
                    for n in 0..g.n {
                        let nc = n * g.c + c;
                        depthwise_plane_weight_grad(&x[nc * plane..][..plane], &gy[nc * p..][..p], g, dk);
                    }
                });
                dw
            });
            return Ok(Grads { x: dx, w: dw, bias });
        }
        let (cg, og, k) = (g.c / g.groups, g.o / g.groups, g.patch_len());
        let par = gemm_parallelism(g.n);
        let dx = if needs.x && g.n * g.c * plane > 0 {
            let mut dx = vec![T::ZERO; g.n * g.c * plane];
            dx.par_chunks_mut(g.c * plane).enumerate().try_for_each(|(n, dxn)| {
                let mut dcols = if g.is_pointwise() { Vec::new() } else { vec![T::ZERO; k * p] };
                for q in 0..g.groups {
                    let gq = Mat::row_major(&gy[(n * g.o + q * og) * p..][..og * p], og, p);
                    let wq_t = Mat::row_major(&w[q * og * k..][..og * k], og, k).t();
                    let dxq = &mut dxn[q * cg * plane..][..cg * plane];
                    if g.is_pointwise() {
                        matmul(dxq, wq_t, gq, false, par)?;
                    } else {
                        matmul(&mut dcols, wq_t, gq, false, par)?;
                        col2im(&dcols, g, dxq);
                    }
                }
                Ok::<_, Error>(())
            })?;
            Some(dx)
        } else {
            needs.x.then(|| vec![T::ZERO; g.n * g.c * plane])
        };
        let dw = if needs.w {
            // Samples in chunks, one partial dW per chunk, summed in chunk order.
            let chunk = g.n.div_ceil(rayon::current_num_threads()).max(1);
            let partials = (0..g.n.div_ceil(chunk))
                .into_par_iter()
                .map(|ci| {
                    let mut dw = vec![T::ZERO; g.o * k];
                    let mut cols = if g.is_pointwise() { Vec::new() } else { vec![T::ZERO; k * p] };
                    for n in ci * chunk..((ci + 1) * chunk).min(g.n) {
                        for q in 0..g.groups {
                            let xq = &x[(n * g.c + q * cg) * plane..][..cg * plane];
                            let cols = if g.is_pointwise() {
                                xq
                            } else {
                                im2col(xq, g, &mut cols);
                                &cols
                            };
                            let gq = Mat::row_major(&gy[(n * g.o + q * og) * p..][..og * p], og, p);
                            let dwq = &mut dw[q * og * k..][..og * k];
                            matmul(dwq, gq, Mat::row_major(cols, k, p).t(), true, par)?;
                        }
                    }
                    Ok(dw)
                })
                .collect::<Result<Vec<_>>>()?;
            let mut total = vec![T::ZERO; g.o * k];
            for part in partials {
                for (t, v) in total.iter_mut().zip(part) {
                    *t += v;
                }
            }
            Some(total)
        } else {
            None
        };
        Ok(Grads { x: dx, w: dw, bias })
    }
    with_dtype!(x.0.dtype(), |T| {
        const OP: &str = "conv2d_backward";
        let grads = run::<T>(
            contiguous_slice(OP, x.0, x.1)?,
            contiguous_slice(OP, w.0, w.1)?,
            contiguous_slice(OP, gy.0, gy.1)?,
            g,
            needs,
        )?;
        Ok(grads.into_storage())
    })
}

pub(super) fn causal_conv1d(x: Operand, w: Operand, bias: Option<Operand>, g: &Conv1dGeom) -> Result<CpuStorage> {
    fn run<T: Float>(x: &[T], w: &[T], bias: Option<Vec<T>>, g: &Conv1dGeom) -> Vec<T> {
        let mut y = vec![T::ZERO; g.b * g.c * g.l];
        y.par_chunks_mut(g.l.max(1)).enumerate().for_each(|(bc, yr)| {
            let c = bc % g.c;
            let (xr, k) = (&x[bc * g.l..][..g.l], &w[c * g.k..][..g.k]);
            let b0 = bias.as_ref().map_or(T::ZERO, |b| b[c]);
            for (t, v) in yr.iter_mut().enumerate() {
                // Taps j with t + j - (k - 1) >= 0: j from (k - 1 - t) when t < k - 1.
                let j0 = (g.k - 1).saturating_sub(t);
                let mut acc = b0;
                for j in j0..g.k {
                    acc += k[j] * xr[t + j + 1 - g.k];
                }
                *v = acc;
            }
        });
        y
    }
    with_dtype!(x.0.dtype(), |T| {
        const OP: &str = "causal_conv1d";
        let bias = bias.map(|(s, l)| gathered::<T>(OP, s, l)).transpose()?;
        Ok(T::into_storage(run::<T>(contiguous_slice(OP, x.0, x.1)?, contiguous_slice(OP, w.0, w.1)?, bias, g)))
    })
}

pub(super) fn causal_conv1d_backward(
    x: Operand,
    w: Operand,
    gy: Operand,
    g: &Conv1dGeom,
    needs: Needs,
) -> Result<Grads<Storage>> {
    fn run<T: Float>(x: &[T], w: &[T], gy: &[T], g: &Conv1dGeom, needs: Needs) -> Grads<Vec<T>> {
        let l = g.l.max(1);
        let dx = needs.x.then(|| {
            let mut dx = vec![T::ZERO; g.b * g.c * g.l];
            dx.par_chunks_mut(l).enumerate().for_each(|(bc, dr)| {
                let c = bc % g.c;
                let (gr, k) = (&gy[bc * g.l..][..g.l], &w[c * g.k..][..g.k]);
                for (s, v) in dr.iter_mut().enumerate() {
                    // Output t = s + (k - 1) - j must be < L: j > s + k - 1 - L.
                    let j0 = (s + g.k).saturating_sub(g.l);
                    let mut acc = T::ZERO;
                    for j in j0..g.k {
                        acc += gr[s + g.k - 1 - j] * k[j];
                    }
                    *v = acc;
                }
            });
            dx
        });
        if !(needs.w || needs.bias) {
            return Grads { x: dx, w: None, bias: None };
        }
        // Per channel: the weight taps and the bias, summed over the batch and time.
        let per_channel: Vec<(Vec<T>, T)> = (0..g.c)
            .into_par_iter()
            .map(|c| {
                let mut dk = vec![T::ZERO; g.k];
                let mut db = T::ZERO;
                for b in 0..g.b {
                    let (xr, gr) = (&x[(b * g.c + c) * g.l..][..g.l], &gy[(b * g.c + c) * g.l..][..g.l]);
                    if needs.w {
                        for (j, d) in dk.iter_mut().enumerate() {
                            let lag = g.k - 1 - j; // y[t] reads x[t - lag]
                            *d += gr.iter().skip(lag).zip(xr).map(|(&gv, &xv)| gv * xv).sum::<T>();
                        }
                    }
                    db += gr.iter().copied().sum::<T>();
                }
                (dk, db)
            })
            .collect();
        let dw = needs.w.then(|| per_channel.iter().flat_map(|(dk, _)| dk.iter().copied()).collect());
        let bias = needs.bias.then(|| per_channel.iter().map(|&(_, db)| db).collect());
        Grads { x: dx, w: dw, bias }
    }
    with_dtype!(x.0.dtype(), |T| {
        const OP: &str = "causal_conv1d_backward";
        let grads = run::<T>(
            contiguous_slice(OP, x.0, x.1)?,
            contiguous_slice(OP, w.0, w.1)?,
            contiguous_slice(OP, gy.0, gy.1)?,
            g,
            needs,
        );
        Ok(grads.into_storage())
    })
}
