//! Broadcasting binary arithmetic written into an existing buffer.
//!
//! ndarray's `Zip` over dynamic-rank broadcast views costs an index computation per element; the
//! broadcasts that networks use (same shape, scalar, per-channel `[1, C, 1, 1]`, squeeze-excitation
//! `[N, C, 1, 1]`) all have one operand repeat in runs, which these loops exploit.

use crate::tensor::Float;
use rayon::prelude::*;

/// A binary arithmetic operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`.
    Div,
}

/// How a broadcast operand maps onto a contiguous output: output element `f` reads operand element
/// `(f / inner) % period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repeat {
    /// Number of distinct operand elements before the pattern repeats.
    pub period: usize,
    /// Number of consecutive output elements that share one operand element.
    pub inner: usize,
}

/// The [`Repeat`] of operand shape `b` broadcast to `out`, when `b`'s non-unit axes form one
/// contiguous range that equals `out` there (None for other broadcasts, or if they do not broadcast).
pub fn repeat_pattern(out: &[usize], b: &[usize]) -> Option<Repeat> {
    if b.len() > out.len() {
        return None;
    }
    let pad = out.len() - b.len();
    let dim = |i: usize| if i < pad { 1 } else { b[i - pad] };
    let non_unit: Vec<usize> = (0..out.len()).filter(|&i| dim(i) != 1).collect();
    let total: usize = out.iter().product();
    let (Some(&s), Some(&e)) = (non_unit.first(), non_unit.last()) else {
        return Some(Repeat { period: 1, inner: total.max(1) });
    };
    if (s..=e).any(|i| dim(i) != out[i]) {
        return None;
    }
    Some(Repeat { period: out[s..=e].iter().product(), inner: out[e + 1..].iter().product() })
}

/// `v` limited to `[lo, hi]`, NaN passed on. Compares, not `Float::max`/`min`: those skip NaN
/// operands, which kept clamping loops scalar (and turned a NaN input into `lo`).
#[inline(always)]
pub fn clamp<T: Float>(v: T, lo: T, hi: T) -> T {
    let v = if v < lo { lo } else { v };
    if v > hi { hi } else { v }
}

/// Below this many elements one thread does the whole job (thread start-up would dominate).
const PAR_MIN: usize = 1 << 16;
const CHUNK: usize = 1 << 14;

/// `dst[f] = op(dst[f], b[r(f)])`, or `op(b[r(f)], dst[f])` when `dst_is_left` is false, where `r` is
/// the repeat pattern `rep` (see [`repeat_pattern`]). `b` must hold `rep.period` elements.
pub fn apply_inplace<T: Float>(op: BinOp, dst: &mut [T], b: &[T], rep: Repeat, dst_is_left: bool) {
    assert_eq!(b.len(), rep.period, "operand length differs from its repeat period");
    assert!(rep.inner > 0 || dst.is_empty(), "empty run length");
    match (op, dst_is_left) {
        (BinOp::Add, _) => run(dst, b, rep, |d, o| d + o),
        (BinOp::Mul, _) => run(dst, b, rep, |d, o| d * o),
        (BinOp::Sub, true) => run(dst, b, rep, |d, o| d - o),
        (BinOp::Sub, false) => run(dst, b, rep, |d, o| o - d),
        (BinOp::Div, true) => run(dst, b, rep, |d, o| d / o),
        (BinOp::Div, false) => run(dst, b, rep, |d, o| o / d),
    }
}

#[inline(always)]
fn run<T: Float>(dst: &mut [T], b: &[T], rep: Repeat, f: impl Fn(T, T) -> T + Sync + Copy) {
    if dst.len() >= PAR_MIN {
        dst.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| range(c, i * CHUNK, b, rep, f));
    } else {
        range(dst, 0, b, rep, f);
    }
}

/// Applies `f` to `dst`, which starts at flat output position `start`.
#[inline(always)]
fn range<T: Float>(dst: &mut [T], start: usize, b: &[T], rep: Repeat, f: impl Fn(T, T) -> T + Copy) {
    let end = start + dst.len();
    let mut pos = start;
    if rep.inner == 1 {
        // Element-wise runs against a slice of `b` up to the end of its period.
        while pos < end {
            let k = pos % rep.period;
            let len = (rep.period - k).min(end - pos);
            let d = &mut dst[pos - start..pos - start + len];
            for (x, &y) in d.iter_mut().zip(&b[k..k + len]) {
                *x = f(*x, y);
            }
            pos += len;
        }
    } else {
        // Runs of one operand value.
        while pos < end {
            let blk = pos / rep.inner;
            let len = ((blk + 1) * rep.inner).min(end) - pos;
            let y = b[blk % rep.period];
            for x in &mut dst[pos - start..pos - start + len] {
                *x = f(*x, y);
            }
            pos += len;
        }
    }
}

/// `f(a[i], b[i])` for every i, in parallel for long slices (the LRP rules' stabilised divisions:
/// a single thread left the other core idle for a whole pass over memory).
pub fn map2<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    assert_eq!(a.len(), b.len(), "map2 operands differ in length");
    // Written straight into the new buffer (no zero-filling pass first), a chunk per task: rayon's
    // element-wise `collect_into_vec` ran scalar, 8 % of EfficientNet-Lite0's εγ□ pass.
    let mut out = Vec::with_capacity(a.len());
    let body = |o: &mut [std::mem::MaybeUninit<T>], a: &[T], b: &[T]| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            o.write(f(a, b));
        }
    };
    let spare = &mut out.spare_capacity_mut()[..a.len()];
    if a.len() >= PAR_MIN {
        spare
            .par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .zip(b.par_chunks(CHUNK))
            .for_each(|((o, a), b)| body(o, a, b));
    } else {
        body(spare, a, b);
    }
    // SAFETY: the loops above wrote all `a.len()` elements.
    unsafe { out.set_len(a.len()) };
    out
}

/// `f(a[i])` for every i, in parallel for long slices, a chunk per task written into the new
/// buffer (see [`map2`]).
pub fn map1<T: Float>(a: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = Vec::with_capacity(a.len());
    let body = |o: &mut [std::mem::MaybeUninit<T>], a: &[T]| {
        for (o, &a) in o.iter_mut().zip(a) {
            o.write(f(a));
        }
    };
    let spare = &mut out.spare_capacity_mut()[..a.len()];
    if a.len() >= PAR_MIN {
        spare.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(o, a)| body(o, a));
    } else {
        body(spare, a);
    }
    // SAFETY: the loops above wrote all `a.len()` elements.
    unsafe { out.set_len(a.len()) };
    out
}

/// `a[i] = f(a[i], b[i], c[i])` for every i, in parallel for long slices.
pub fn update2<T: Float>(a: &mut [T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T + Sync) {
    assert!(a.len() == b.len() && a.len() == c.len(), "update2 operands differ in length");
    let body = |(a, (b, c)): (&mut [T], (&[T], &[T]))| {
        for ((a, &b), &c) in a.iter_mut().zip(b).zip(c) {
            *a = f(*a, b, c);
        }
    };
    if a.len() >= PAR_MIN {
        a.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK).zip(c.par_chunks(CHUNK))).for_each(body);
    } else {
        body((a, (b, c)));
    }
}

/// `a[i] = f(a[i], b[i])` for every i, in parallel for long slices.
pub fn update1<T: Float>(a: &mut [T], b: &[T], f: impl Fn(T, T) -> T + Sync) {
    assert_eq!(a.len(), b.len(), "update1 operands differ in length");
    let body = |(a, b): (&mut [T], &[T])| {
        for (a, &b) in a.iter_mut().zip(b) {
            *a = f(*a, b);
        }
    };
    if a.len() >= PAR_MIN {
        a.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK)).for_each(body);
    } else {
        body((a, b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn, Zip};

    fn reference(op: BinOp, a: &ArrayD<f64>, b: &ArrayD<f64>) -> ArrayD<f64> {
        let shape = a.shape().to_vec();
        let bv = b.broadcast(IxDyn(&shape)).unwrap();
        Zip::from(a).and(&bv).map_collect(|&x, &y| match op {
            BinOp::Add => x + y,
            BinOp::Sub => x - y,
            BinOp::Mul => x * y,
            BinOp::Div => x / y,
        })
    }

    fn filled(shape: &[usize], seed: usize) -> ArrayD<f64> {
        let n: usize = shape.iter().product();
        ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|i| ((i * 7 + seed) % 13) as f64 + 0.5).collect()).unwrap()
    }

    #[test]
    fn patterns_of_common_broadcasts() {
        assert_eq!(repeat_pattern(&[2, 3, 4, 5], &[2, 3, 4, 5]), Some(Repeat { period: 120, inner: 1 }));
        assert_eq!(repeat_pattern(&[2, 3, 4, 5], &[]), Some(Repeat { period: 1, inner: 120 }));
        assert_eq!(repeat_pattern(&[2, 3, 4, 5], &[1, 3, 1, 1]), Some(Repeat { period: 3, inner: 20 }));
        assert_eq!(repeat_pattern(&[2, 3, 4, 5], &[3, 1, 1]), Some(Repeat { period: 3, inner: 20 }));
        assert_eq!(repeat_pattern(&[2, 3, 4, 5], &[2, 3, 1, 1]), Some(Repeat { period: 6, inner: 20 }));
        assert_eq!(repeat_pattern(&[2, 3, 4, 5], &[5]), Some(Repeat { period: 5, inner: 1 }));
        assert_eq!(repeat_pattern(&[2, 3, 4, 5], &[2, 1, 1, 5]), None);
        assert_eq!(repeat_pattern(&[2, 3], &[4]), None);
        assert_eq!(repeat_pattern(&[3], &[2, 3]), None);
    }

    #[test]
    fn inplace_matches_broadcast_reference_both_sides() {
        // Large enough to take the threaded path too.
        for out in [vec![2usize, 3, 4, 5], vec![2, 64, 33, 31]] {
            let c = out[1];
            let cases: Vec<Vec<usize>> =
                vec![out.clone(), vec![], vec![1, c, 1, 1], vec![out[0], c, 1, 1], vec![out[3]], vec![c, 1, 1]];
            for bs in cases {
                let a = filled(&out, 1);
                let b = filled(&bs, 3);
                let rep = repeat_pattern(&out, &bs).unwrap();
                for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div] {
                    let mut d = a.clone();
                    apply_inplace(op, d.as_slice_mut().unwrap(), b.as_slice().unwrap(), rep, true);
                    assert_eq!(d, reference(op, &a, &b), "{op:?} {out:?} {bs:?}");
                    // Right-hand side in place: dst holds b broadcast... here dst is the full-shape `a`
                    // playing the right operand.
                    let mut d = a.clone();
                    apply_inplace(op, d.as_slice_mut().unwrap(), b.as_slice().unwrap(), rep, false);
                    let bb = b.broadcast(IxDyn(&out)).unwrap().to_owned();
                    assert_eq!(d, reference(op, &bb, &a), "{op:?} right {out:?} {bs:?}");
                }
            }
        }
    }

    #[test]
    fn parallel_maps_match_serial() {
        for n in [0, 5, PAR_MIN - 1, PAR_MIN + CHUNK / 3] {
            let a: Vec<f64> = (0..n).map(|i| (i % 17) as f64 - 8.0).collect();
            let b: Vec<f64> = (0..n).map(|i| (i % 5) as f64 + 0.5).collect();
            let m = map2(&a, &b, |x, y| x / y);
            assert!(m.iter().enumerate().all(|(i, &v)| v == a[i] / b[i]));
            let mut u = a.clone();
            update2(&mut u, &a, &b, |s, x, y| s + x * y);
            assert!(u.iter().enumerate().all(|(i, &v)| v == a[i] + a[i] * b[i]));
            let mut u = b.clone();
            update1(&mut u, &a, |s, x| s - x);
            assert!(u.iter().enumerate().all(|(i, &v)| v == b[i] - a[i]));
        }
    }
}
