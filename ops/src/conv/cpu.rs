//! CPU kernels of the convolution family: depthwise direct loops, im2col + GEMM (the `gemm` crate) for dense
//! and grouped conv2d, and the causal depthwise conv1d. Inputs arrive contiguous; work is split over samples
//! or (sample, channel) planes with rayon.

use engine::{CpuStorage, Error, Float, Result, Storage};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{Conv1dGeom, Conv2dGeom};
use crate::matmul::cpu::gemm_fixed_order;
use crate::util::{channels_last_slice, contiguous_slice, gathered, with_dtype, Grads, Needs, Operand};

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
        gemm_fixed_order(
            (m, n, k),
            (dst.as_mut_ptr(), 1, n as isize),
            accumulate,
            (a.data.as_ptr(), a.cs as isize, a.rs as isize),
            (b.data.as_ptr(), b.cs as isize, b.rs as isize),
            T::ONE,
            T::ONE,
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

/// A (H, W) plane copied into the middle of a zero-filled (H + 2 ph, W + 2 pw) one, so that every kernel tap
/// of every output reads inside it and the loops need no bounds.
struct Padded<T> {
    data: Vec<T>,
    /// Row length of the padded plane.
    pw: usize,
}

impl<T: Float> Padded<T> {
    fn new(g: &Conv2dGeom) -> Self {
        let (hp, wp) = (g.h + 2 * g.padding.0, g.w + 2 * g.padding.1);
        Padded { data: vec![T::ZERO; hp * wp], pw: wp }
    }

    /// Copies the plane `x` (H, W) in; the border stays zero.
    fn load(&mut self, x: &[T], g: &Conv2dGeom) {
        for (r, xr) in x.chunks_exact(g.w).enumerate() {
            self.data[(r + g.padding.0) * self.pw + g.padding.1..][..g.w].copy_from_slice(xr);
        }
    }

    /// The padded row read by output row `a` through kernel row `i`, from the column of tap j = 0.
    #[inline(always)]
    fn row(&self, g: &Conv2dGeom, a: usize, i: usize) -> usize {
        (a * g.stride.0 + i * g.dilation.0) * self.pw
    }
}

/// f(y[b], x[b * stride + j0]) for the outputs b of one row: the unit stride walks plain slices that the
/// compiler vectorises.
#[inline(always)]
fn row_zip<T: Float>(y: &mut [T], x: &[T], stride: usize, f: impl Fn(&mut T, T)) {
    if stride == 1 {
        let n = y.len();
        for (o, &v) in y.iter_mut().zip(&x[..n]) {
            f(o, v);
        }
    } else {
        for (o, &v) in y.iter_mut().zip(x.iter().step_by(stride)) {
            f(o, v);
        }
    }
}

/// One depthwise plane: y (OH, OW) += conv of the padded plane `xp` with the filter `k` (kh, kw), the taps
/// added in (i, j) order as the unpadded loops did (a tap over the zero border adds an exact zero).
fn depthwise_plane<T: Float>(xp: &Padded<T>, k: &[T], g: &Conv2dGeom, y: &mut [T]) {
    for (a, yr) in y.chunks_exact_mut(g.ow).enumerate() {
        for i in 0..g.kh {
            let row = xp.row(g, a, i);
            for j in 0..g.kw {
                let wv = k[i * g.kw + j];
                row_zip(yr, &xp.data[row + j * g.dilation.1..], g.stride.1, |o, v| *o += wv * v);
            }
        }
    }
}

/// The transpose of `depthwise_plane`: the padded dxp += the scatter of gy (OH, OW) through the filter `k`,
/// tap by tap in (i, j) order.
fn depthwise_plane_backward<T: Float>(gy: &[T], k: &[T], g: &Conv2dGeom, dxp: &mut Padded<T>) {
    for i in 0..g.kh {
        for j in 0..g.kw {
            let wv = k[i * g.kw + j];
            for (a, gr) in gy.chunks_exact(g.ow).enumerate() {
                let row = dxp.row(g, a, i) + j * g.dilation.1;
                let dst = &mut dxp.data[row..];
                if g.stride.1 == 1 {
                    for (d, &v) in dst.iter_mut().zip(gr) {
                        *d += wv * v;
                    }
                } else {
                    for (d, &v) in dst.iter_mut().step_by(g.stride.1).zip(gr) {
                        *d += wv * v;
                    }
                }
            }
        }
    }
}

/// dk (kh, kw) += correlation of one padded input plane with its output gradient gy (OH, OW).
fn depthwise_plane_weight_grad<T: Float>(xp: &Padded<T>, gy: &[T], g: &Conv2dGeom, dk: &mut [T]) {
    for i in 0..g.kh {
        for j in 0..g.kw {
            let mut acc = T::ZERO;
            for (a, gr) in gy.chunks_exact(g.ow).enumerate() {
                let x = &xp.data[xp.row(g, a, i) + j * g.dilation.1..];
                if g.stride.1 == 1 {
                    acc += gr.iter().zip(x).map(|(&a, &b)| a * b).sum::<T>();
                } else {
                    acc += gr.iter().zip(x.iter().step_by(g.stride.1)).map(|(&a, &b)| a * b).sum::<T>();
                }
            }
            dk[i * g.kw + j] += acc;
        }
    }
}

/// (n, c) planes per rayon task of the depthwise kernels: enough work that a task outweighs its scheduling
/// (the MLLA planes are 8x8 and smaller).
fn planes_per_task(g: &Conv2dGeom) -> usize {
    (4096 / (g.h * g.w).max(1)).clamp(1, 64)
}

/// Depthwise conv2d over contiguous NCHW data, in tasks of whole (n, c) planes: y (N C, OH OW), each plane
/// already holding its bias.
fn depthwise_nchw<T: Float>(x: &[T], w: &[T], g: &Conv2dGeom, y: &mut [T]) {
    let (plane, p) = g.planes();
    let (taps, per) = (g.kh * g.kw, planes_per_task(g));
    y.par_chunks_mut(p * per).enumerate().for_each(|(t, ys)| {
        let mut xp = Padded::new(g);
        for (q, out) in ys.chunks_exact_mut(p).enumerate() {
            let nc = t * per + q;
            xp.load(&x[nc * plane..][..plane], g);
            depthwise_plane(&xp, &w[nc % g.c * taps..][..taps], g, out);
        }
    });
}

/// Input offset along one axis of output `o` through tap `i`, when it lies inside `0..len`.
#[inline(always)]
fn tap_index(o: usize, i: usize, stride: usize, dilation: usize, pad: usize, len: usize) -> Option<usize> {
    (o * stride + i * dilation).checked_sub(pad).filter(|&v| v < len)
}

/// The output index along one axis that reads input `v` through tap `i`, if any.
#[inline(always)]
fn tap_source(v: usize, i: usize, stride: usize, dilation: usize, pad: usize, out_len: usize) -> Option<usize> {
    let t = (v + pad).checked_sub(i * dilation)?;
    (t % stride == 0 && t / stride < out_len).then_some(t / stride)
}

/// The filter (C, 1, kh, kw) as (kh kw, C): one channel vector per tap, for the channels-last kernels.
fn taps_by_channel<T: Float>(w: &[T], g: &Conv2dGeom) -> Vec<T> {
    let taps = g.kh * g.kw;
    let mut out = vec![T::ZERO; taps * g.c];
    for (c, k) in w.chunks_exact(taps).enumerate() {
        for (t, &v) in k.iter().enumerate() {
            out[t * g.c + c] = v;
        }
    }
    out
}

/// o[c] += w[c] x[c] over one pixel's channels.
#[inline(always)]
fn axpy<T: Float>(o: &mut [T], w: &[T], x: &[T]) {
    for ((o, &w), &x) in o.iter_mut().zip(w).zip(x) {
        *o += w * x;
    }
}

/// Conv2d on channels-last data, depthwise or with one group: x (N, H, W, C) -> y (N, OH, OW, O).
pub(super) fn conv2d_nhwc(x: Operand, w: Operand, bias: Option<Operand>, g: &Conv2dGeom) -> Result<CpuStorage> {
    with_dtype!(x.0.dtype(), |T| {
        const OP: &str = "conv2d";
        let bias = bias.map(|(s, l)| gathered::<T>(OP, s, l)).transpose()?;
        let (xs, ws) = (channels_last_slice(OP, x.0, x.1)?, contiguous_slice(OP, w.0, w.1)?);
        let y = if g.is_depthwise() { depthwise_nhwc::<T>(xs, ws, bias, g) } else { dense_nhwc::<T>(xs, ws, bias, g)? };
        Ok(T::into_storage(y))
    })
}

/// The backward of [`conv2d_nhwc`], with x and gy channels-last; dx comes out channels-last too.
pub(super) fn conv2d_nhwc_backward(
    x: Operand,
    w: Operand,
    gy: Operand,
    g: &Conv2dGeom,
    needs: Needs,
) -> Result<Grads<Storage>> {
    with_dtype!(x.0.dtype(), |T| {
        const OP: &str = "conv2d_backward";
        let (xs, ws, gs) =
            (channels_last_slice(OP, x.0, x.1)?, contiguous_slice(OP, w.0, w.1)?, channels_last_slice(OP, gy.0, gy.1)?);
        let grads = if g.is_depthwise() {
            depthwise_nhwc_backward::<T>(xs, ws, gs, g, needs)
        } else {
            dense_nhwc_backward::<T>(xs, ws, gs, g, needs)?
        };
        Ok(grads.into_storage())
    })
}

/// Depthwise conv2d on channels-last data: x (N, H, W, C) -> y (N, OH, OW, C), vectorised along the
/// channels. Every output pixel starts at its bias and adds the taps in (i, j) order, as the NCHW kernel
/// does, so both give the same values.
fn depthwise_nhwc<T: Float>(x: &[T], w: &[T], bias: Option<Vec<T>>, g: &Conv2dGeom) -> Vec<T> {
    {
        let c = g.c;
        let wt = taps_by_channel(w, g);
        let mut y = engine::cpu_buffer(g.n * g.oh * g.ow * c);
        if y.is_empty() {
            return y;
        }
        y.par_chunks_mut(g.oh * g.ow * c).enumerate().for_each(|(n, yn)| {
            let xn = &x[n * g.h * g.w * c..][..g.h * g.w * c];
            for (pix, out) in yn.chunks_exact_mut(c).enumerate() {
                let (a, b) = (pix / g.ow, pix % g.ow);
                match &bias {
                    Some(bv) => out.copy_from_slice(bv),
                    None => out.fill(T::ZERO),
                }
                for i in 0..g.kh {
                    let Some(ih) = tap_index(a, i, g.stride.0, g.dilation.0, g.padding.0, g.h) else { continue };
                    for j in 0..g.kw {
                        let Some(iw) = tap_index(b, j, g.stride.1, g.dilation.1, g.padding.1, g.w) else {
                            continue;
                        };
                        axpy(out, &wt[(i * g.kw + j) * c..][..c], &xn[(ih * g.w + iw) * c..][..c]);
                    }
                }
            }
        });
        y
    }
}

/// Samples per task of the channels-last weight gradient: a fixed count, so that the partial sums, and so
/// the result, do not depend on the number of threads.
const NHWC_SAMPLES_PER_TASK: usize = 4;

/// The backward of [`depthwise_nhwc`]: dx channels-last, dw and db summed over fixed tasks of samples.
fn depthwise_nhwc_backward<T: Float>(x: &[T], w: &[T], gy: &[T], g: &Conv2dGeom, needs: Needs) -> Grads<Vec<T>> {
    {
        let (c, taps) = (g.c, g.kh * g.kw);
        let (xsz, ysz) = (g.h * g.w * c, g.oh * g.ow * c);
        let wt = taps_by_channel(w, g);
        // dx[ih, iw] gathers, tap by tap in (i, j) order, the outputs that read it: the order in which the
        // NCHW kernel's scatter adds them.
        let dx = needs.x.then(|| {
            let mut dx = engine::cpu_buffer(g.n * xsz);
            if xsz > 0 {
                dx.par_chunks_mut(xsz).enumerate().for_each(|(n, dxn)| {
                    let gn = &gy[n * ysz..][..ysz];
                    for (pix, out) in dxn.chunks_exact_mut(c).enumerate() {
                        let (ih, iw) = (pix / g.w, pix % g.w);
                        out.fill(T::ZERO);
                        for i in 0..g.kh {
                            let Some(a) = tap_source(ih, i, g.stride.0, g.dilation.0, g.padding.0, g.oh) else {
                                continue;
                            };
                            for j in 0..g.kw {
                                let Some(b) = tap_source(iw, j, g.stride.1, g.dilation.1, g.padding.1, g.ow) else {
                                    continue;
                                };
                                axpy(out, &wt[(i * g.kw + j) * c..][..c], &gn[(a * g.ow + b) * c..][..c]);
                            }
                        }
                    }
                });
            }
            dx
        });
        if !(needs.w || needs.bias) || ysz == 0 {
            let zeros = |on: bool, len: usize| on.then(|| vec![T::ZERO; len]);
            return Grads { x: dx, w: zeros(needs.w, c * taps), bias: zeros(needs.bias, c) };
        }
        // Per task of samples: (dw as (kh kw, C), db), summed in task order.
        let per = NHWC_SAMPLES_PER_TASK;
        let partials: Vec<(Vec<T>, Vec<T>)> = (0..g.n.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let (mut dw, mut db) = (vec![T::ZERO; taps * c], vec![T::ZERO; c]);
                for n in t * per..((t + 1) * per).min(g.n) {
                    let (xn, gn) = (&x[n * xsz..][..xsz], &gy[n * ysz..][..ysz]);
                    for (pix, gr) in gn.chunks_exact(c).enumerate() {
                        let (a, b) = (pix / g.ow, pix % g.ow);
                        for (d, &v) in db.iter_mut().zip(gr) {
                            *d += v;
                        }
                        if !needs.w {
                            continue;
                        }
                        for i in 0..g.kh {
                            let Some(ih) = tap_index(a, i, g.stride.0, g.dilation.0, g.padding.0, g.h) else {
                                continue;
                            };
                            for j in 0..g.kw {
                                let Some(iw) = tap_index(b, j, g.stride.1, g.dilation.1, g.padding.1, g.w) else {
                                    continue;
                                };
                                axpy(&mut dw[(i * g.kw + j) * c..][..c], gr, &xn[(ih * g.w + iw) * c..][..c]);
                            }
                        }
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dwt, mut db) = (vec![T::ZERO; taps * c], vec![T::ZERO; c]);
        for (pw, pb) in &partials {
            for (acc, &v) in dwt.iter_mut().zip(pw).chain(db.iter_mut().zip(pb)) {
                *acc += v;
            }
        }
        // Back to the filter's (C, 1, kh, kw) order.
        let dw = needs.w.then(|| {
            let mut dw = vec![T::ZERO; c * taps];
            for (t, row) in dwt.chunks_exact(c).enumerate() {
                for (ch, &v) in row.iter().enumerate() {
                    dw[ch * taps + t] = v;
                }
            }
            dw
        });
        Grads { x: dx, w: dw, bias: needs.bias.then_some(db) }
    }
}

pub(super) fn conv2d(x: Operand, w: Operand, bias: Option<Operand>, g: &Conv2dGeom) -> Result<CpuStorage> {
    fn run<T: Float>(x: &[T], w: Operand, bias: Option<Operand>, g: &Conv2dGeom) -> Result<Vec<T>> {
        const OP: &str = "conv2d";
        let w = contiguous_slice::<T>(OP, w.0, w.1)?;
        let bias = bias.map(|(s, l)| gathered::<T>(OP, s, l)).transpose()?;
        let (plane, p) = g.planes();
        let mut y = engine::cpu_buffer(g.n * g.o * p);
        if y.is_empty() {
            return Ok(y);
        }
        // Every output plane starts at its bias and the kernels accumulate onto it; without a bias the
        // depthwise kernel starts from zeros and the GEMMs overwrite.
        match &bias {
            Some(b) => {
                for (i, out) in y.chunks_exact_mut(p).enumerate() {
                    out.fill(b[i % g.o]);
                }
            }
            None if g.is_depthwise() => y.fill(T::ZERO),
            None => {}
        }
        if g.is_depthwise() {
            depthwise_nchw(x, w, g, &mut y);
            return Ok(y);
        }
        let (cg, og, k) = (g.c / g.groups, g.o / g.groups, g.patch_len());
        let par = gemm_parallelism(g.n);
        let new_cols = || if g.is_pointwise() { Vec::new() } else { vec![T::ZERO; k * p] };
        y.par_chunks_mut(g.o * p).enumerate().try_for_each_init(new_cols, |cols, (n, yn)| {
            for q in 0..g.groups {
                let xq = &x[(n * g.c + q * cg) * plane..][..cg * plane];
                let cols = if g.is_pointwise() {
                    xq
                } else {
                    im2col(xq, g, cols);
                    &cols[..]
                };
                let wq = Mat::row_major(&w[q * og * k..][..og * k], og, k);
                matmul(&mut yn[q * og * p..][..og * p], wq, Mat::row_major(cols, k, p), bias.is_some(), par)?;
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
            let per = planes_per_task(g);
            let dx = needs.x.then(|| {
                let mut dx = engine::cpu_buffer(g.n * g.c * plane);
                if plane > 0 {
                    dx.par_chunks_mut(plane * per).enumerate().for_each(|(t, dxs)| {
                        let mut dxp = Padded::new(g);
                        for (q, out) in dxs.chunks_exact_mut(plane).enumerate() {
                            let nc = t * per + q;
                            dxp.data.fill(T::ZERO);
                            depthwise_plane_backward(&gy[nc * p..][..p], &w[nc % g.c * taps..][..taps], g, &mut dxp);
                            for (r, row) in out.chunks_exact_mut(g.w).enumerate() {
                                row.copy_from_slice(&dxp.data[(r + g.padding.0) * dxp.pw + g.padding.1..][..g.w]);
                            }
                        }
                    });
                }
                dx
            });
            let dw = needs.w.then(|| {
                let mut dw = vec![T::ZERO; g.c * taps];
                dw.par_chunks_mut(taps).enumerate().with_min_len(per.div_ceil(g.n.max(1))).for_each(|(c, dk)| {
                    let mut xp = Padded::new(g);
                    for n in 0..g.n {
                        let nc = n * g.c + c;
                        xp.load(&x[nc * plane..][..plane], g);
                        depthwise_plane_weight_grad(&xp, &gy[nc * p..][..p], g, dk);
                    }
                });
                dw
            });
            return Ok(Grads { x: dx, w: dw, bias });
        }
        let (cg, og, k) = (g.c / g.groups, g.o / g.groups, g.patch_len());
        let par = gemm_parallelism(g.n);
        let dx = if needs.x && g.n * g.c * plane > 0 {
            // A pointwise conv's GEMM overwrites dx; col2im adds into zeros, set per sample.
            let mut dx = engine::cpu_buffer(g.n * g.c * plane);
            let new_dcols = || if g.is_pointwise() { Vec::new() } else { vec![T::ZERO; k * p] };
            dx.par_chunks_mut(g.c * plane).enumerate().try_for_each_init(new_dcols, |dcols, (n, dxn)| {
                if !g.is_pointwise() {
                    dxn.fill(T::ZERO);
                }
                for q in 0..g.groups {
                    let gq = Mat::row_major(&gy[(n * g.o + q * og) * p..][..og * p], og, p);
                    let wq_t = Mat::row_major(&w[q * og * k..][..og * k], og, k).t();
                    let dxq = &mut dxn[q * cg * plane..][..cg * plane];
                    if g.is_pointwise() {
                        matmul(dxq, wq_t, gq, false, par)?;
                    } else {
                        matmul(dcols, wq_t, gq, false, par)?;
                        col2im(dcols, g, dxq);
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

/// Rows (output pixels) per task of the channels-last dense conv: one im2col block and one GEMM each. A fixed
/// count of whole samples, so that the weight gradient's partial sums do not depend on the thread count.
fn nhwc_samples_per_task(g: &Conv2dGeom) -> usize {
    (2048 / (g.oh * g.ow).max(1)).clamp(1, g.n.max(1))
}

/// The filter (O, C, kh, kw) as (O, kh kw C): the order of a channels-last patch.
fn filter_taps_last<T: Float>(w: &[T], g: &Conv2dGeom) -> Vec<T> {
    let (taps, c) = (g.kh * g.kw, g.c);
    let mut out = vec![T::ZERO; g.o * taps * c];
    for (o, wo) in w.chunks_exact(c * taps).enumerate() {
        for (ch, k) in wo.chunks_exact(taps).enumerate() {
            for (t, &v) in k.iter().enumerate() {
                out[(o * taps + t) * c + ch] = v;
            }
        }
    }
    out
}

/// dst = src for one tap's channels. The stem's convs have 1 and 8 channels: copies of those sizes are
/// inlined moves instead of a call to memcpy per tap (a few hundred thousand taps per training step).
#[inline(always)]
fn copy_channels<T: Float>(dst: &mut [T], src: &[T]) {
    match (dst, src) {
        ([d], [s]) => *d = *s,
        (dst, src) => match (<&mut [T; 8]>::try_from(&mut *dst), <&[T; 8]>::try_from(src)) {
            (Ok(d), Ok(s)) => *d = *s,
            _ => dst.copy_from_slice(src),
        },
    }
}

/// cols (samples OH OW, kh kw C) of channels-last samples x (samples, H, W, C): one patch per output pixel,
/// zeros where a tap falls in the padding.
fn im2col_nhwc<T: Float>(x: &[T], g: &Conv2dGeom, cols: &mut [T]) {
    let (c, k) = (g.c, g.kh * g.kw * g.c);
    let (xs, ps) = (g.h * g.w * c, g.oh * g.ow);
    for (r, patch) in cols.chunks_exact_mut(k).enumerate() {
        let (n, pix) = (r / ps, r % ps);
        let (a, b) = (pix / g.ow, pix % g.ow);
        let xn = &x[n * xs..][..xs];
        // With dilation 1 along the width, a row of taps that lies inside the image is kw c contiguous elements.
        let whole_row = (b * g.stride.1).checked_sub(g.padding.1).filter(|&iw0| g.dilation.1 == 1 && iw0 + g.kw <= g.w);
        for i in 0..g.kh {
            let ih = tap_index(a, i, g.stride.0, g.dilation.0, g.padding.0, g.h);
            if let (Some(ih), Some(iw0)) = (ih, whole_row) {
                patch[i * g.kw * c..][..g.kw * c].copy_from_slice(&xn[(ih * g.w + iw0) * c..][..g.kw * c]);
                continue;
            }
            for j in 0..g.kw {
                let dst = &mut patch[(i * g.kw + j) * c..][..c];
                match (ih, tap_index(b, j, g.stride.1, g.dilation.1, g.padding.1, g.w)) {
                    (Some(ih), Some(iw)) => copy_channels(dst, &xn[(ih * g.w + iw) * c..][..c]),
                    _ => dst.fill(T::ZERO),
                }
            }
        }
    }
}

/// dx (samples, H, W, C) += the patches in `cols` put back where `im2col_nhwc` took them from.
fn col2im_nhwc<T: Float>(cols: &[T], g: &Conv2dGeom, dx: &mut [T]) {
    let (c, k) = (g.c, g.kh * g.kw * g.c);
    let (xs, ps) = (g.h * g.w * c, g.oh * g.ow);
    for (r, patch) in cols.chunks_exact(k).enumerate() {
        let (n, pix) = (r / ps, r % ps);
        let (a, b) = (pix / g.ow, pix % g.ow);
        let dxn = &mut dx[n * xs..][..xs];
        for i in 0..g.kh {
            let Some(ih) = tap_index(a, i, g.stride.0, g.dilation.0, g.padding.0, g.h) else { continue };
            for j in 0..g.kw {
                let Some(iw) = tap_index(b, j, g.stride.1, g.dilation.1, g.padding.1, g.w) else { continue };
                for (d, &v) in dxn[(ih * g.w + iw) * c..][..c].iter_mut().zip(&patch[(i * g.kw + j) * c..][..c]) {
                    *d += v;
                }
            }
        }
    }
}

/// Conv2d (groups 1) on channels-last data: per task of whole samples, the patches (rows, kh kw C) times the
/// filter (kh kw C, O) is the output (rows, O), already channels-last; a pointwise conv uses x as the
/// patches. The bias starts every row and the GEMM adds onto it.
fn dense_nhwc<T: Float>(x: &[T], w: &[T], bias: Option<Vec<T>>, g: &Conv2dGeom) -> Result<Vec<T>> {
    let (k, p) = (g.kh * g.kw * g.c, g.oh * g.ow);
    let wk = filter_taps_last(w, g);
    let mut y = engine::cpu_buffer(g.n * p * g.o);
    if y.is_empty() {
        return Ok(y);
    }
    if let Some(b) = &bias {
        for row in y.chunks_exact_mut(g.o) {
            row.copy_from_slice(b);
        }
    }
    let per = nhwc_samples_per_task(g);
    let par = gemm_parallelism(g.n.div_ceil(per));
    let wt = Mat::row_major(&wk, g.o, k).t();
    y.par_chunks_mut(per * p * g.o).enumerate().try_for_each_init(Vec::new, |cols, (t, yt)| {
        let rows = yt.len() / g.o;
        let xt = &x[t * per * g.h * g.w * g.c..][..rows / p * g.h * g.w * g.c];
        let patches = if g.is_pointwise() {
            xt
        } else {
            cols.resize(rows * k, T::ZERO);
            im2col_nhwc(xt, g, cols);
            &cols[..]
        };
        matmul(yt, Mat::row_major(patches, rows, k), wt, bias.is_some(), par)
    })?;
    Ok(y)
}

/// The backward of [`dense_nhwc`]: dx = col2im(g W) (g W itself when pointwise), and per task
/// dW += g^T patches and db += the column sums of g, the task partials summed in task order.
fn dense_nhwc_backward<T: Float>(x: &[T], w: &[T], gy: &[T], g: &Conv2dGeom, needs: Needs) -> Result<Grads<Vec<T>>> {
    let (k, p, taps) = (g.kh * g.kw * g.c, g.oh * g.ow, g.kh * g.kw);
    let (xs, ys) = (g.h * g.w * g.c, p * g.o);
    let per = nhwc_samples_per_task(g);
    let tasks = g.n.div_ceil(per);
    let par = gemm_parallelism(tasks);
    let wk = filter_taps_last(w, g);
    let dx = if needs.x && g.n * xs > 0 {
        let mut dx = engine::cpu_buffer(g.n * xs);
        dx.par_chunks_mut(per * xs).enumerate().try_for_each_init(Vec::new, |dcols, (t, dxt)| {
            let samples = dxt.len() / xs;
            let gt = Mat::row_major(&gy[t * per * ys..][..samples * ys], samples * p, g.o);
            let wm = Mat::row_major(&wk, g.o, k);
            if g.is_pointwise() {
                return matmul(dxt, gt, wm, false, par);
            }
            dcols.resize(samples * p * k, T::ZERO);
            matmul(dcols, gt, wm, false, par)?;
            dxt.fill(T::ZERO);
            col2im_nhwc(dcols, g, dxt);
            Ok(())
        })?;
        Some(dx)
    } else {
        needs.x.then(|| vec![T::ZERO; g.n * xs])
    };
    if !(needs.w || needs.bias) {
        return Ok(Grads { x: dx, w: None, bias: None });
    }
    let partials = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let samples = per.min(g.n - t * per);
            let gs = &gy[t * per * ys..][..samples * ys];
            let mut db = vec![T::ZERO; g.o];
            if needs.bias {
                for row in gs.chunks_exact(g.o) {
                    for (d, &v) in db.iter_mut().zip(row) {
                        *d += v;
                    }
                }
            }
            let mut dw = Vec::new();
            if needs.w {
                let xt = &x[t * per * xs..][..samples * xs];
                let cols;
                let patches = if g.is_pointwise() {
                    xt
                } else {
                    cols = {
                        let mut c = vec![T::ZERO; samples * p * k];
                        im2col_nhwc(xt, g, &mut c);
                        c
                    };
                    &cols[..]
                };
                dw = vec![T::ZERO; g.o * k];
                let gt = Mat::row_major(gs, samples * p, g.o).t();
                matmul(&mut dw, gt, Mat::row_major(patches, samples * p, k), false, par)?;
            }
            Ok((dw, db))
        })
        .collect::<Result<Vec<_>>>()?;
    let (mut dwk, mut db) = (vec![T::ZERO; if needs.w { g.o * k } else { 0 }], vec![T::ZERO; g.o]);
    for (pw, pb) in &partials {
        for (acc, &v) in dwk.iter_mut().zip(pw).chain(db.iter_mut().zip(pb)) {
            *acc += v;
        }
    }
    // Back to the filter's (O, C, kh, kw) order.
    let dw = needs.w.then(|| {
        let mut dw = vec![T::ZERO; g.o * k];
        for (o, row) in dwk.chunks_exact(k).enumerate() {
            for (t, tap) in row.chunks_exact(g.c).enumerate() {
                for (ch, &v) in tap.iter().enumerate() {
                    dw[(o * g.c + ch) * taps + t] = v;
                }
            }
        }
        dw
    });
    Ok(Grads { x: dx, w: dw, bias: needs.bias.then_some(db) })
}
