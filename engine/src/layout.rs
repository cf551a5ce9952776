//! Shape, strides and offset: how a tensor's elements sit in its storage. Every movement op (reshape, permute,
//! transpose, narrow, expand) is a new `Layout` over the same storage; only `contiguous` copies.

use crate::{Error, Result};

/// Row-major strides of a contiguous tensor of this shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

/// NumPy broadcasting: align trailing dims; each pair must be equal or contain a 1.
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(Error::Broadcast { op, lhs: a.to_vec(), rhs: b.to_vec() }),
        };
    }
    Ok(out)
}

/// Resolves a possibly negative dim against a rank (`-1` is the last dim).
pub fn normalize_dim(op: &'static str, dim: isize, shape: &[usize]) -> Result<usize> {
    let rank = shape.len() as isize;
    let d = if dim < 0 { dim + rank } else { dim };
    if d < 0 || d >= rank {
        return Err(Error::DimOutOfRange { op, dim, shape: shape.to_vec() });
    }
    Ok(d as usize)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 }
    }

    pub fn new(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Self {
        debug_assert_eq!(shape.len(), strides.len());
        Layout { shape, strides, offset }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the elements are in row-major order with no gaps (size-1 dims may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// The range of storage elements this layout can touch (for bounds checks); empty when numel is 0.
    pub fn storage_span(&self) -> std::ops::Range<usize> {
        if self.numel() == 0 {
            return self.offset..self.offset;
        }
        let last: usize = self.shape.iter().zip(&self.strides).map(|(&d, &s)| (d - 1) * s).sum();
        self.offset..self.offset + last + 1
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Layout> {
        let rank = self.rank();
        let mut seen = vec![false; rank];
        if dims.len() != rank || dims.iter().any(|&d| d >= rank || std::mem::replace(&mut seen[d], true)) {
            return Err(Error::invalid("permute", format!("{dims:?} is not a permutation of 0..{rank}"), &self.shape));
        }
        Ok(Layout {
            shape: dims.iter().map(|&d| self.shape[d]).collect(),
            strides: dims.iter().map(|&d| self.strides[d]).collect(),
            offset: self.offset,
        })
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        if dim >= self.rank() || start + len > self.shape[dim] {
            return Err(Error::invalid(
                "narrow",
                format!("range {start}..{} out of bounds on dim {dim}", start + len),
                &self.shape,
            ));
        }
        let mut out = self.clone();
        out.shape[dim] = len;
        if len > 0 {
            out.offset += start * self.strides[dim];
        }
        Ok(out)
    }

    /// Expands to `shape` by broadcasting: new leading dims and size-1 dims get stride 0.
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Layout> {
        let err = || Error::Broadcast { op: "broadcast_as", lhs: self.shape.clone(), rhs: shape.to_vec() };
        if shape.len() < self.rank() {
            return Err(err());
        }
        let lead = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for (i, &d) in shape.iter().enumerate().skip(lead) {
            let (sd, ss) = (self.shape[i - lead], self.strides[i - lead]);
            strides[i] = if sd == d {
                ss
            } else if sd == 1 {
                0
            } else {
                return Err(err());
            };
        }
        Ok(Layout { shape: shape.to_vec(), strides, offset: self.offset })
    }

    /// A view with a new shape over the same elements, if the strides allow one without copying
    /// (PyTorch's `view` rule: each group of merged or split dims must be contiguous within itself).
    pub fn reshape_view(&self, shape: &[usize]) -> Option<Layout> {
        if self.is_contiguous() {
            return Some(Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: self.offset });
        }
        // Walk old dims (skipping size 1) and new dims, matching groups with equal element counts.
        let old: Vec<(usize, usize)> =
            self.shape.iter().zip(&self.strides).filter(|(&d, _)| d != 1).map(|(&d, &s)| (d, s)).collect();
        let mut strides = vec![0usize; shape.len()];
        let (mut oi, mut ni) = (0, 0);
        while ni < shape.len() {
            if shape[ni] == 1 {
                strides[ni] = 1;
                ni += 1;
                continue;
            }
            if oi >= old.len() {
                return None;
            }
            // Collect one group: old dims oi..oj whose product equals new dims ni..nj.
            let (mut op, mut np) = (old[oi].0, shape[ni]);
            let (mut oj, mut nj) = (oi + 1, ni + 1);
            while op != np {
                if op < np {
                    if oj >= old.len() {
                        return None;
                    }
                    op *= old[oj].0;
                    oj += 1;
                } else {
                    if nj >= shape.len() {
                        return None;
                    }
                    np *= shape[nj];
                    nj += 1;
                }
            }
            // The old group must be contiguous within itself.
            for k in oi..oj - 1 {
                if old[k].1 != old[k + 1].1 * old[k + 1].0 {
                    return None;
                }
            }
            let mut stride = old[oj - 1].1;
            for k in (ni..nj).rev() {
                strides[k] = stride;
                stride *= shape[k];
            }
            oi = oj;
            ni = nj;
        }
        if oi != old.len() {
            return None;
        }
        Some(Layout { shape: shape.to_vec(), strides, offset: self.offset })
    }

    /// Calls `f(start, len, stride)` for each run of the innermost dim, in row-major order: the elements are
    /// `start + k * stride` for `k < len`. Tight loops go inside `f`; the outer walk costs one step per run.
    #[inline]
    pub fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        let numel = self.numel();
        if numel == 0 {
            return;
        }
        if self.is_contiguous() {
            return f(self.offset, numel, 1);
        }
        // Merge dims that are contiguous with each other to make the innermost run as long as possible.
        let (shape, strides) = self.merged();
        let rank = shape.len();
        let (inner, inner_stride) = (shape[rank - 1], strides[rank - 1]);
        let mut idx = vec![0usize; rank.saturating_sub(1)];
        let mut pos = self.offset;
        loop {
            f(pos, inner, inner_stride);
            // Odometer increment over the outer dims.
            let mut d = rank - 1;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                pos += strides[d];
                if idx[d] < shape[d] {
                    break;
                }
                pos -= strides[d] * shape[d];
                idx[d] = 0;
            }
        }
    }

    /// Shape and strides with size-1 dims dropped and mergeable neighbours fused (at least one dim).
    fn merged(&self) -> (Vec<usize>, Vec<usize>) {
        let mut shape: Vec<usize> = Vec::with_capacity(self.rank());
        let mut strides: Vec<usize> = Vec::with_capacity(self.rank());
        for (&d, &s) in self.shape.iter().zip(&self.strides) {
            if d == 1 {
                continue;
            }
            match (shape.last_mut(), strides.last_mut()) {
                (Some(pd), Some(ps)) if *ps == s * d => {
                    *pd *= d;
                    *ps = s;
                }
                _ => {
                    shape.push(d);
                    strides.push(s);
                }
            }
        }
        if shape.is_empty() {
            shape.push(1);
            strides.push(1);
        }
        (shape, strides)
    }

    /// Storage offsets of every element in row-major order (for tests and slow reference paths).
    pub fn offsets(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.numel());
        self.for_each_run(|start, len, stride| out.extend((0..len).map(|k| start + k * stride)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_rules() {
        assert_eq!(broadcast_shape("t", &[3, 1, 5], &[4, 1]).unwrap(), vec![3, 4, 5]);
        assert_eq!(broadcast_shape("t", &[], &[2, 3]).unwrap(), vec![2, 3]);
        assert!(broadcast_shape("t", &[3, 2], &[3]).is_err());
    }

    #[test]
    fn permuted_offsets_follow_the_strides() {
        let l = Layout::contiguous(&[2, 3]).permute(&[1, 0]).unwrap();
        assert_eq!(l.offsets(), vec![0, 3, 1, 4, 2, 5]);
        assert!(!l.is_contiguous());
    }

    #[test]
    fn reshape_view_splits_and_refuses() {
        let l = Layout::contiguous(&[4, 6]).narrow(1, 0, 4).unwrap(); // (4, 4) with row stride 6
        let v = l.reshape_view(&[4, 2, 2]).unwrap();
        assert_eq!(v.strides(), &[6, 2, 1]);
        assert!(l.reshape_view(&[16]).is_none());
        let t = Layout::contiguous(&[2, 3]).permute(&[1, 0]).unwrap();
        assert!(t.reshape_view(&[6]).is_none());
        assert_eq!(t.reshape_view(&[3, 1, 2]).unwrap().offsets(), t.offsets());
    }
}
