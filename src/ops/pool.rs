//! Max and average pooling over the last two axes (1-d pooling uses height 1), and their VJPs.

use crate::tensor::Float;
use rayon::prelude::*;

/// Geometry of a 2-d pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    /// Number of planes (batch × channels).
    pub planes: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel (height, width).
    pub kernel: [usize; 2],
    /// Strides.
    pub stride: [usize; 2],
    /// Dilations.
    pub dilation: [usize; 2],
    /// Pads: top, left, bottom, right.
    pub pads: [usize; 4],
    /// Round the output size up (PyTorch/ONNX `ceil_mode`).
    pub ceil_mode: bool,
    /// Average pooling: count padded positions in the divisor.
    pub count_include_pad: bool,
}

fn out_len(len: usize, k: usize, s: usize, d: usize, pb: usize, pe: usize, ceil: bool) -> Option<usize> {
    let eff = d * (k - 1) + 1;
    let total = len + pb + pe;
    if total < eff || s == 0 {
        return None;
    }
    let span = total - eff;
    let mut o = if ceil { span.div_ceil(s) + 1 } else { span / s + 1 };
    // A window that would start inside the trailing padding is dropped (PyTorch and onnxruntime).
    if ceil && (o - 1) * s >= len + pb {
        o -= 1;
    }
    Some(o)
}

impl PoolGeom {
    /// Output height and width, or None if the window does not fit.
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        Some((
            out_len(
                self.h,
                self.kernel[0],
                self.stride[0],
                self.dilation[0],
                self.pads[0],
                self.pads[2],
                self.ceil_mode,
            )?,
            out_len(
                self.w,
                self.kernel[1],
                self.stride[1],
                self.dilation[1],
                self.pads[1],
                self.pads[3],
                self.ceil_mode,
            )?,
        ))
    }
}

/// Max pooling; returns the output and, per output element, the flat index of the winning input
/// element within its plane (first maximal element on ties, as PyTorch). Windows that lie wholly
/// in padding yield -inf and index `u32::MAX`. Loops run tap by tap in window order (so a later
/// tap wins only when strictly greater) over whole output rows, as [`max_pool_values`].
pub fn max_pool<T: Float>(g: &PoolGeom, x: &[T]) -> (Vec<T>, Vec<u32>) {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    let ohw = oh * ow;
    let cols = tap_columns(g, ow);
    let mut out = vec![T::neg_infinity(); g.planes * ohw];
    let mut idx = vec![u32::MAX; g.planes * ohw];
    out.par_chunks_mut(ohw).zip(idx.par_chunks_mut(ohw)).enumerate().for_each(|(p, (o, ix))| {
        let plane = &x[p * g.h * g.w..(p + 1) * g.h * g.w];
        for (oy, (orow, irow)) in o.chunks_exact_mut(ow).zip(ix.chunks_exact_mut(ow)).enumerate() {
            row_argmax(g, &cols, plane, oy, orow, irow);
        }
    });
    (out, idx)
}

/// Per tap column kj, the output columns whose tap lands inside the input.
fn tap_columns(g: &PoolGeom, ow: usize) -> Vec<std::ops::Range<usize>> {
    (0..g.kernel[1]).map(|kj| valid_outputs(g.w, ow, g.stride[1], kj, g.dilation[1], g.pads[1])).collect()
}

/// The maxima and their flat indices in `plane` of output row `oy` into `orow` and `irow`, which
/// start at -inf and `u32::MAX`.
fn row_argmax<T: Float>(
    g: &PoolGeom,
    cols: &[std::ops::Range<usize>],
    plane: &[T],
    oy: usize,
    orow: &mut [T],
    irow: &mut [u32],
) {
    let [sy, sx] = g.stride;
    let [dy, dx] = g.dilation;
    for ki in 0..g.kernel[0] {
        let Some(iy) = (oy * sy + ki * dy).checked_sub(g.pads[0]).filter(|&iy| iy < g.h) else {
            continue;
        };
        let row = &plane[iy * g.w..(iy + 1) * g.w];
        for (kj, r) in cols.iter().enumerate() {
            if r.is_empty() {
                continue;
            }
            let ix0 = r.start * sx + kj * dx - g.pads[1];
            let (n, o, oi) = (r.len(), &mut orow[r.clone()], &mut irow[r.clone()]);
            let base = (iy * g.w + ix0) as u32;
            // NaN propagates like PyTorch: the first NaN wins; the first in-bounds tap is taken
            // even when it is -inf. Written as selects over slices (a gather by computed index
            // ran scalar).
            let step = |(j, ((b, bi), &v)): (usize, ((&mut T, &mut u32), &T))| {
                #[allow(clippy::eq_op)] // v != v is the NaN test
                let take = v > *b || *bi == u32::MAX || (v != v && *b == *b);
                *b = if take { v } else { *b };
                *bi = if take { base + (j * sx) as u32 } else { *bi };
            };
            let dst = o.iter_mut().zip(oi.iter_mut());
            match sx {
                1 => dst.zip(&row[ix0..ix0 + n]).enumerate().for_each(step),
                2 => {
                    let pairs = row[ix0..ix0 + 2 * n - 1].chunks(2).map(|p| &p[0]);
                    dst.zip(pairs).enumerate().for_each(step)
                }
                _ => dst.zip(row[ix0..].iter().step_by(sx)).enumerate().for_each(step),
            }
        }
    }
}

/// VJP of max pooling from its input `x`: each output's gradient goes to its window's winning
/// element (as [`max_pool`]'s index), found one output row at a time. Computing the whole index
/// array first and scattering from it wrote and read two plane-sized buffers: VGG-16's first
/// pool's VJP took 9 ms, five times its forward.
pub fn max_pool_vjp_from_input<T: Float>(g: &PoolGeom, x: &[T], dy: &[T]) -> Vec<T> {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    let (ohw, hw) = (oh * ow, g.h * g.w);
    let cols = tap_columns(g, ow);
    let mut dx = vec![T::zero(); g.planes * hw];
    dx.par_chunks_mut(hw).enumerate().for_each_init(
        || (vec![T::neg_infinity(); ow], vec![u32::MAX; ow]),
        |(best, bi), (p, d)| {
            let plane = &x[p * hw..(p + 1) * hw];
            for (oy, dyrow) in dy[p * ohw..(p + 1) * ohw].chunks_exact(ow).enumerate() {
                best.iter_mut().for_each(|v| *v = T::neg_infinity());
                bi.iter_mut().for_each(|v| *v = u32::MAX);
                row_argmax(g, &cols, plane, oy, best, bi);
                for (&i, &gv) in bi.iter().zip(dyrow) {
                    if i != u32::MAX {
                        d[i as usize] += gv;
                    }
                }
            }
        },
    );
    dx
}

/// The output positions `o` along one axis whose tap `k` lands inside the input: `o·s + k·d − pad ∈ [0, len)`.
pub(crate) fn valid_outputs(
    len: usize,
    out: usize,
    s: usize,
    k: usize,
    d: usize,
    pad: usize,
) -> std::ops::Range<usize> {
    let off = k * d;
    // o·s ≥ pad − off
    let lo = if pad > off { (pad - off).div_ceil(s) } else { 0 };
    // o·s ≤ len − 1 + pad − off
    let hi = if len + pad > off { (len - 1 + pad - off) / s + 1 } else { 0 };
    lo.min(out)..hi.min(out).max(lo.min(out))
}

/// Max pooling values only (the forward pass needs no indices). Each output row takes the maximum
/// over the window's input rows, then over its columns, tap by tap over whole rows with the bounds
/// hoisted, which is several times faster than per-window checks.
/// NaN wins, as in [`max_pool`].
pub fn max_pool_values<T: Float>(g: &PoolGeom, x: &[T]) -> Vec<T> {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    let ohw = oh * ow;
    let [sy, sx] = g.stride;
    let [dy, dx] = g.dilation;
    let cols: Vec<std::ops::Range<usize>> =
        (0..g.kernel[1]).map(|kj| valid_outputs(g.w, ow, sx, kj, dx, g.pads[1])).collect();
    // Filled per plane by its task (a fill of the whole output on the calling thread left the
    // other idle).
    let mut out: Vec<T> = Vec::with_capacity(g.planes * ohw);
    // Per output row, the maximum over the window's rows first (contiguous passes that vectorise),
    // then over its columns: kh + kw passes instead of kh · kw strided ones (ResNet-50's 3×3
    // stride-2 stem pool ran at 5× onnxruntime's time with the latter).
    out.spare_capacity_mut()[..g.planes * ohw].par_chunks_mut(ohw).enumerate().for_each_init(
        || vec![T::neg_infinity(); g.w],
        |vm, (p, o)| {
            o.iter_mut().for_each(|v| {
                v.write(T::neg_infinity());
            });
            // SAFETY: every element was initialised just above.
            let o = unsafe { &mut *(o as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
            let plane = &x[p * g.h * g.w..(p + 1) * g.h * g.w];
            for (oy, orow) in o.chunks_exact_mut(ow).enumerate() {
                vm.iter_mut().for_each(|v| *v = T::neg_infinity());
                for ki in 0..g.kernel[0] {
                    let Some(iy) = (oy * sy + ki * dy).checked_sub(g.pads[0]).filter(|&iy| iy < g.h) else {
                        continue;
                    };
                    vm.iter_mut().zip(&plane[iy * g.w..(iy + 1) * g.w]).for_each(|(b, &v)| *b = pick(*b, v));
                }
                let row = &vm[..];
                for (kj, r) in cols.iter().enumerate() {
                    if r.is_empty() {
                        continue;
                    }
                    let ix0 = r.start * sx + kj * dx - g.pads[1];
                    let (n, o) = (r.len(), &mut orow[r.clone()]);
                    // A select, not a branch (random data mispredicted half the compares: ResNet-50's
                    // max pool took 37 ms at batch 8), and stride 2 through pairs, which vectorises.
                    match sx {
                        1 => o.iter_mut().zip(&row[ix0..ix0 + n]).for_each(|(b, &v)| *b = pick(*b, v)),
                        2 => {
                            let pairs = row[ix0..ix0 + 2 * (n - 1)].chunks_exact(2);
                            o[..n - 1].iter_mut().zip(pairs).for_each(|(b, p)| *b = pick(*b, p[0]));
                            o[n - 1] = pick(o[n - 1], row[ix0 + 2 * (n - 1)]);
                        }
                        _ => o.iter_mut().zip(row[ix0..].iter().step_by(sx)).for_each(|(b, &v)| *b = pick(*b, v)),
                    }
                }
            }
        },
    );
    // SAFETY: each plane's task initialised its ohw elements; the planes cover the output.
    unsafe { out.set_len(g.planes * ohw) };
    out
}

/// The running maximum after seeing `v`; a NaN wins and stays.
#[inline(always)]
fn pick<T: Float>(best: T, v: T) -> T {
    #[allow(clippy::eq_op)] // v != v is the NaN test
    if v > best || v != v { v } else { best }
}

/// The window of output (oy, ox) clipped to the input, and its divisor.
fn avg_window(g: &PoolGeom, oy: usize, ox: usize) -> ([isize; 4], usize) {
    let y0 = (oy * g.stride[0]) as isize - g.pads[0] as isize;
    let x0 = (ox * g.stride[1]) as isize - g.pads[1] as isize;
    let y1 = (y0 + g.kernel[0] as isize).min((g.h + g.pads[2]) as isize);
    let x1 = (x0 + g.kernel[1] as isize).min((g.w + g.pads[3]) as isize);
    let padded = ((y1 - y0) * (x1 - x0)).max(0) as usize;
    let (cy0, cx0) = (y0.max(0), x0.max(0));
    let (cy1, cx1) = (y1.min(g.h as isize), x1.min(g.w as isize));
    let inner = ((cy1 - cy0).max(0) * (cx1 - cx0).max(0)) as usize;
    let div = if g.count_include_pad { padded } else { inner };
    ([cy0, cx0, cy1, cx1], div)
}

/// Whether every window lies inside the plane (no padding, none cut off by ceil_mode): then all
/// divide by the window's size and the separable paths below apply.
fn avg_windows_inside(g: &PoolGeom, oh: usize, ow: usize) -> bool {
    g.pads == [0; 4] && (oh - 1) * g.stride[0] + g.kernel[0] <= g.h && (ow - 1) * g.stride[1] + g.kernel[1] <= g.w
}

/// Average pooling (dilation 1).
pub fn avg_pool<T: Float>(g: &PoolGeom, x: &[T]) -> Vec<T> {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    if oh == 0 || ow == 0 {
        return Vec::new();
    }
    if avg_windows_inside(g, oh, ow) {
        return avg_pool_inside(g, x, oh, ow);
    }
    avg_pool_windows(g, x, oh, ow)
}

/// [`avg_pool`] window by window: any padding, divisor per window.
fn avg_pool_windows<T: Float>(g: &PoolGeom, x: &[T], oh: usize, ow: usize) -> Vec<T> {
    let ohw = oh * ow;
    let mut out = vec![T::zero(); g.planes * ohw];
    out.par_chunks_mut(ohw).enumerate().for_each(|(p, o)| {
        let plane = &x[p * g.h * g.w..(p + 1) * g.h * g.w];
        for oy in 0..oh {
            for ox in 0..ow {
                let ([y0, x0, y1, x1], div) = avg_window(g, oy, ox);
                let mut s = T::zero();
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        s += plane[iy as usize * g.w + ix as usize];
                    }
                }
                o[oy * ow + ox] = if div == 0 { T::zero() } else { s / T::of(div as f64) };
            }
        }
    });
    out
}

/// Planes per parallel task of the separable paths: about 64k input values each (one task per
/// plane left DenseNet's 7×7 transitions with more scheduling than work).
fn planes_per_task(g: &PoolGeom) -> usize {
    (1usize << 16).div_ceil((g.h * g.w).max(1)).max(1)
}

/// [`avg_pool`] where every window is inside: each output row sums its window's input rows
/// (whole rows, which vectorise), then the row's windows. DenseNet-121's 2×2 transitions ran
/// 6× onnxruntime's time window by window (a divisor and bounds per output).
fn avg_pool_inside<T: Float>(g: &PoolGeom, x: &[T], oh: usize, ow: usize) -> Vec<T> {
    let (ohw, hw, w) = (oh * ow, g.h * g.w, g.w);
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let div = T::of((kh * kw) as f64);
    let mut out = vec![T::zero(); g.planes * ohw];
    let per = planes_per_task(g);
    out.par_chunks_mut(ohw * per).enumerate().for_each(|(t, os)| {
        let mut acc = vec![T::zero(); w];
        for (i, o) in os.chunks_mut(ohw).enumerate() {
            let plane = &x[(t * per + i) * hw..(t * per + i + 1) * hw];
            for (oy, orow) in o.chunks_mut(ow).enumerate() {
                let rows = &plane[oy * sh * w..(oy * sh + kh) * w];
                acc.copy_from_slice(&rows[..w]);
                for r in rows[w..].chunks_exact(w) {
                    acc.iter_mut().zip(r).for_each(|(a, &v)| *a += v);
                }
                for (ox, v) in orow.iter_mut().enumerate() {
                    let win = &acc[ox * sw..ox * sw + kw];
                    *v = win[1..].iter().fold(win[0], |s, &a| s + a) / div;
                }
            }
        }
    });
    out
}

/// VJP of average pooling.
pub fn avg_pool_vjp<T: Float>(g: &PoolGeom, dy: &[T]) -> Vec<T> {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    if oh > 0 && ow > 0 && avg_windows_inside(g, oh, ow) {
        return avg_pool_vjp_inside(g, dy, oh, ow);
    }
    let ohw = oh * ow;
    let hw = g.h * g.w;
    let mut dx = vec![T::zero(); g.planes * hw];
    dx.par_chunks_mut(hw).enumerate().for_each(|(p, d)| {
        for oy in 0..oh {
            for ox in 0..ow {
                let ([y0, x0, y1, x1], div) = avg_window(g, oy, ox);
                if div == 0 {
                    continue;
                }
                let v = dy[p * ohw + oy * ow + ox] / T::of(div as f64);
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        d[iy as usize * g.w + ix as usize] += v;
                    }
                }
            }
        }
    });
    dx
}

/// [`avg_pool_vjp`] where every window is inside: each output row's shares are spread over one
/// input row's columns, then added to the window's rows whole.
fn avg_pool_vjp_inside<T: Float>(g: &PoolGeom, dy: &[T], oh: usize, ow: usize) -> Vec<T> {
    let (ohw, hw, w) = (oh * ow, g.h * g.w, g.w);
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let div = T::of((kh * kw) as f64);
    let mut dx = vec![T::zero(); g.planes * hw];
    let per = planes_per_task(g);
    dx.par_chunks_mut(hw * per).enumerate().for_each(|(t, ds)| {
        let mut spread = vec![T::zero(); w];
        for (i, d) in ds.chunks_mut(hw).enumerate() {
            let dyp = &dy[(t * per + i) * ohw..(t * per + i + 1) * ohw];
            for (oy, drow) in dyp.chunks_exact(ow).enumerate() {
                spread.fill(T::zero());
                for (ox, &v) in drow.iter().enumerate() {
                    let v = v / div;
                    spread[ox * sw..ox * sw + kw].iter_mut().for_each(|a| *a += v);
                }
                for r in d[oy * sh * w..(oy * sh + kh) * w].chunks_exact_mut(w) {
                    r.iter_mut().zip(&spread).for_each(|(a, &v)| *a += v);
                }
            }
        }
    });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(h: usize, w: usize, k: usize, s: usize, pads: [usize; 4], ceil: bool) -> PoolGeom {
        PoolGeom {
            planes: 2,
            h,
            w,
            kernel: [k, k],
            stride: [s, s],
            dilation: [1, 1],
            pads,
            ceil_mode: ceil,
            count_include_pad: false,
        }
    }

    /// The per-window loop: the reference for [`max_pool`]'s tap-by-tap order. Returns the output and, per output element, the flat index of the winning input
    /// element within its plane (first maximal element on ties, as PyTorch). Windows that lie wholly
    /// in padding yield -inf and index `u32::MAX`.
    fn max_pool_naive<T: Float>(g: &PoolGeom, x: &[T]) -> (Vec<T>, Vec<u32>) {
        let (oh, ow) = g.out_hw().expect("geometry checked by caller");
        let ohw = oh * ow;
        let mut out = vec![T::neg_infinity(); g.planes * ohw];
        let mut idx = vec![u32::MAX; g.planes * ohw];
        out.par_chunks_mut(ohw).zip(idx.par_chunks_mut(ohw)).enumerate().for_each(|(p, (o, ix))| {
            let plane = &x[p * g.h * g.w..(p + 1) * g.h * g.w];
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best = T::neg_infinity();
                    let mut bi = u32::MAX;
                    for ki in 0..g.kernel[0] {
                        let iy = (oy * g.stride[0] + ki * g.dilation[0]) as isize - g.pads[0] as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        for kj in 0..g.kernel[1] {
                            let ix = (ox * g.stride[1] + kj * g.dilation[1]) as isize - g.pads[1] as isize;
                            if ix < 0 || ix >= g.w as isize {
                                continue;
                            }
                            let k = iy as usize * g.w + ix as usize;
                            let v = plane[k];
                            // NaN propagates like PyTorch: a NaN wins.
                            if v > best || bi == u32::MAX || v.is_nan() && !best.is_nan() {
                                best = v;
                                bi = k as u32;
                            }
                        }
                    }
                    o[oy * ow + ox] = best;
                    ix[oy * ow + ox] = bi;
                }
            }
        });
        (out, idx)
    }

    #[test]
    fn output_sizes_follow_pytorch() {
        // torch.nn.MaxPool2d(3, 2, ceil_mode=True) on 112 → 56; floor → 55.
        assert_eq!(geom(112, 112, 3, 2, [0; 4], true).out_hw(), Some((56, 56)));
        assert_eq!(geom(112, 112, 3, 2, [0; 4], false).out_hw(), Some((55, 55)));
        // ceil with padding drops a window starting in the padding: 5, k2, s2, pad 1 → 3.
        assert_eq!(geom(5, 5, 2, 2, [1, 1, 1, 1], true).out_hw(), Some((3, 3)));
        assert_eq!(geom(6, 6, 3, 2, [1, 1, 1, 1], false).out_hw(), Some((3, 3)));
    }

    #[test]
    fn max_pool_values_equal_indexed_pooling_on_many_geometries() {
        for (h, w, k, st, d, pads, ceil) in [
            (7, 9, 3, 2, 1, [1, 1, 1, 1], false),
            (7, 9, 3, 2, 1, [1, 0, 2, 1], true),
            (8, 8, 2, 2, 1, [0; 4], false),
            (9, 7, 3, 1, 2, [2, 2, 2, 2], false),
            (5, 5, 5, 3, 1, [2, 1, 2, 2], true),
            (1, 11, 1, 1, 1, [0; 4], false),
            (12, 37, 3, 2, 1, [1, 1, 1, 1], false),
            (12, 38, 3, 2, 1, [1, 1, 1, 1], true),
        ] {
            let mut g = geom(h, w, k, st, pads, ceil);
            g.dilation = [d, d];
            let mut x: Vec<f32> = (0..2 * h * w).map(|i| ((i * 37) % 17) as f32 - 8.0).collect();
            x[h * w + 3] = f32::NAN;
            x[1] = f32::NEG_INFINITY;
            let (y, iy) = max_pool(&g, &x);
            let (yn, ixn) = max_pool_naive(&g, &x);
            assert_eq!(iy, ixn, "indices for {h}x{w} k{k} s{st} d{d} {pads:?}");
            for (a, b) in y.iter().zip(&yn) {
                assert!(a == b || a.is_nan() && b.is_nan());
            }
            // The VJP from the input scatters to the naive indices (ties to the first, NaN
            // winning, overlapping windows adding up).
            let dy: Vec<f32> = (0..y.len()).map(|i| (i % 7) as f32 + 1.0).collect();
            let (oh, ow) = g.out_hw().unwrap();
            let mut want = vec![0.0f32; x.len()];
            for (o, &i) in ixn.iter().enumerate() {
                if i != u32::MAX {
                    want[o / (oh * ow) * h * w + i as usize] += dy[o];
                }
            }
            assert_eq!(max_pool_vjp_from_input(&g, &x, &dy), want, "VJP for {h}x{w} k{k} s{st} d{d} {pads:?}");
            let z = max_pool_values(&g, &x);
            assert_eq!(y.len(), z.len());
            for (a, b) in y.iter().zip(&z) {
                assert!(a == b || a.is_nan() && b.is_nan(), "{a} vs {b} for {h}x{w} k{k} s{st} d{d} {pads:?}");
            }
        }
    }

    #[test]
    fn max_pool_matches_naive_and_ties_pick_first() {
        let g = geom(5, 6, 3, 2, [1, 0, 1, 1], true);
        let x: Vec<f64> = (0..2 * 30).map(|i| ((i * 7) % 5) as f64).collect();
        let (y, idx) = max_pool(&g, &x);
        let (oh, ow) = g.out_hw().unwrap();
        for p in 0..2 {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best = f64::NEG_INFINITY;
                    let mut bi = usize::MAX;
                    for iy in (oy * 2) as isize - 1..(oy * 2) as isize + 2 {
                        for ix in (ox * 2) as isize..(ox * 2) as isize + 3 {
                            if iy >= 0 && ix >= 0 && iy < 5 && ix < 6 {
                                let k = iy as usize * 6 + ix as usize;
                                if x[p * 30 + k] > best {
                                    best = x[p * 30 + k];
                                    bi = k;
                                }
                            }
                        }
                    }
                    let o = p * oh * ow + oy * ow + ox;
                    assert_eq!(y[o], best);
                    assert_eq!(idx[o] as usize, bi);
                }
            }
        }
        assert_eq!(max_pool_values(&g, &x), y);
        let dy: Vec<f64> = (0..y.len()).map(|i| i as f64 + 1.0).collect();
        // The VJP routes each output's gradient to its index above: nothing lost, nothing elsewhere.
        let dx = max_pool_vjp_from_input(&g, &x, &dy);
        assert!((dx.iter().sum::<f64>() - dy.iter().sum::<f64>()).abs() < 1e-12);
        let mut want = vec![0.0; x.len()];
        for (o, &i) in idx.iter().enumerate() {
            want[o / (oh * ow) * 30 + i as usize] += dy[o];
        }
        assert_eq!(dx, want);
    }

    #[test]
    fn avg_pool_inside_matches_windows() {
        // Windows wholly inside (the separable paths): 2×2 stride 2 on odd planes (the last row
        // and column dropped), overlapping 3×3 stride 1 and 2, non-square kernels, 1×1; against
        // the window-by-window forward and, for the VJP, against scattering each output's share.
        let cases = [
            (7, 9, [2, 2], [2, 2]),
            (8, 8, [3, 3], [1, 1]),
            (9, 7, [3, 3], [2, 2]),
            (6, 10, [2, 3], [1, 2]),
            (5, 5, [1, 1], [1, 1]),
        ];
        for (h, w, kernel, stride) in cases {
            let g = PoolGeom { planes: 5, kernel, stride, ..geom(h, w, 1, 1, [0; 4], false) };
            let (oh, ow) = g.out_hw().unwrap();
            assert!(avg_windows_inside(&g, oh, ow), "{g:?}");
            let x: Vec<f64> = (0..5 * h * w).map(|i| ((i * 37) % 23) as f64 * 0.25 - 2.0).collect();
            let want = avg_pool_windows(&g, &x, oh, ow);
            let got = avg_pool(&g, &x);
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{g:?}: {a} vs {b}");
            }
            let dy: Vec<f64> = (0..want.len()).map(|i| ((i * 11) % 7) as f64 - 3.0).collect();
            let mut dwant = vec![0.0; x.len()];
            for (o, &v) in dy.iter().enumerate() {
                let (p, oy, ox) = (o / (oh * ow), o / ow % oh, o % ow);
                for iy in oy * stride[0]..oy * stride[0] + kernel[0] {
                    for ix in ox * stride[1]..ox * stride[1] + kernel[1] {
                        dwant[p * h * w + iy * w + ix] += v / (kernel[0] * kernel[1]) as f64;
                    }
                }
            }
            let dgot = avg_pool_vjp(&g, &dy);
            for (a, b) in dgot.iter().zip(&dwant) {
                assert!((a - b).abs() < 1e-12, "{g:?} vjp: {a} vs {b}");
            }
        }
        // Padding or a window cut off by ceil_mode takes the window-by-window path.
        let g = geom(7, 7, 2, 2, [0; 4], true);
        assert!(!avg_windows_inside(&g, 4, 4));
    }

    #[test]
    fn avg_pool_vjp_is_adjoint() {
        for include in [false, true] {
            let mut g = geom(7, 5, 3, 2, [1, 1, 1, 0], true);
            g.count_include_pad = include;
            let x: Vec<f64> = (0..2 * 35).map(|i| ((i * 13) % 7) as f64 - 3.0).collect();
            let y = avg_pool(&g, &x);
            let dy: Vec<f64> = (0..y.len()).map(|i| ((i * 3) % 5) as f64 - 2.0).collect();
            let dx = avg_pool_vjp(&g, &dy);
            let lhs: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
            assert!((lhs - rhs).abs() < 1e-10);
        }
        // Corner with include_pad: window [-1,2)x[-1,2) on 7x5 has 4 real of 9 positions.
        let mut g = geom(7, 5, 3, 2, [1, 1, 1, 0], false);
        let x = vec![1.0f64; 70];
        assert_eq!(avg_pool(&g, &x)[0], 1.0);
        g.count_include_pad = true;
        assert!((avg_pool(&g, &x)[0] - 4.0 / 9.0).abs() < 1e-15);
    }
}
