//! 2-d convolution (1-d is the 2-d case with height 1) and its input VJP (the transposed
//! convolution), by im2col / col2im and GEMM, with a direct kernel for depthwise layers where a
//! GEMM with one output row would waste the matrix unit.

use super::gemm::{Mat, Threads, matmul};
use crate::tensor::Float;
use rayon::prelude::*;

/// Geometry of a 2-d convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub m: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Strides (height, width).
    pub stride: [usize; 2],
    /// Dilations (height, width).
    pub dilation: [usize; 2],
    /// Pads: top, left, bottom, right.
    pub pads: [usize; 4],
    /// Number of groups.
    pub group: usize,
}

impl ConvGeom {
    /// Output height and width, or None when the kernel does not fit.
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        let eh = self.dilation[0] * (self.kh - 1) + 1;
        let ew = self.dilation[1] * (self.kw - 1) + 1;
        let ph = self.h + self.pads[0] + self.pads[2];
        let pw = self.w + self.pads[1] + self.pads[3];
        if ph < eh || pw < ew || self.stride[0] == 0 || self.stride[1] == 0 {
            return None;
        }
        Some((
            (ph - eh) / self.stride[0] + 1,
            (pw - ew) / self.stride[1] + 1,
        ))
    }

    fn cg(&self) -> usize {
        self.c / self.group
    }
    fn mg(&self) -> usize {
        self.m / self.group
    }
    fn kdim(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pads == [0; 4]
    }
    fn is_depthwise(&self) -> bool {
        self.cg() == 1 && self.group > 1
    }
}

/// Fills `col[kdim × oh·ow]` with the patches of one group of one sample (`x` is [cg, h, w]).
fn im2col<T: Float>(g: &ConvGeom, x: &[T], col: &mut [T], oh: usize, ow: usize) {
    let (h, w) = (g.h, g.w);
    let (sh, sw) = (g.stride[0], g.stride[1]);
    let (dh, dw) = (g.dilation[0], g.dilation[1]);
    let (pt, pl) = (g.pads[0] as isize, g.pads[1] as isize);
    let ohw = oh * ow;
    for ci in 0..g.cg() {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (ci * g.kh + ki) * g.kw + kj;
                let dst = &mut col[row * ohw..(row + 1) * ohw];
                for oy in 0..oh {
                    let iy = (oy * sh + ki * dh) as isize - pt;
                    let d = &mut dst[oy * ow..(oy + 1) * ow];
                    if iy < 0 || iy >= h as isize {
                        d.iter_mut().for_each(|v| *v = T::zero());
                        continue;
                    }
                    let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                    let off = (kj * dw) as isize - pl;
                    for (ox, v) in d.iter_mut().enumerate() {
                        let ix = (ox * sw) as isize + off;
                        *v = if ix >= 0 && ix < w as isize {
                            src[ix as usize]
                        } else {
                            T::zero()
                        };
                    }
                }
            }
        }
    }
}

/// Adds `col[kdim × oh·ow]` back onto the input positions of one group of one sample.
fn col2im<T: Float>(g: &ConvGeom, col: &[T], x: &mut [T], oh: usize, ow: usize) {
    let (h, w) = (g.h, g.w);
    let (sh, sw) = (g.stride[0], g.stride[1]);
    let (dh, dw) = (g.dilation[0], g.dilation[1]);
    let (pt, pl) = (g.pads[0] as isize, g.pads[1] as isize);
    let ohw = oh * ow;
    for ci in 0..g.cg() {
        let plane = &mut x[ci * h * w..(ci + 1) * h * w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (ci * g.kh + ki) * g.kw + kj;
                let src = &col[row * ohw..(row + 1) * ohw];
                for oy in 0..oh {
                    let iy = (oy * sh + ki * dh) as isize - pt;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * w..(iy as usize + 1) * w];
                    let off = (kj * dw) as isize - pl;
                    for (ox, v) in src[oy * ow..(oy + 1) * ow].iter().enumerate() {
                        let ix = (ox * sw) as isize + off;
                        if ix >= 0 && ix < w as isize {
                            dst[ix as usize] += *v;
                        }
                    }
                }
            }
        }
    }
}

/// Depthwise forward for one output channel: `out[oh×ow] (+)= conv(x_plane, k)`.
fn depthwise_plane<T: Float>(g: &ConvGeom, x: &[T], k: &[T], out: &mut [T], oh: usize, ow: usize) {
    let (h, w) = (g.h as isize, g.w as isize);
    let (pt, pl) = (g.pads[0] as isize, g.pads[1] as isize);
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            let wv = k[ki * g.kw + kj];
            let off_x = (kj * g.dilation[1]) as isize - pl;
            for oy in 0..oh {
                let iy = (oy * g.stride[0] + ki * g.dilation[0]) as isize - pt;
                if iy < 0 || iy >= h {
                    continue;
                }
                let src = &x[(iy * w) as usize..((iy + 1) * w) as usize];
                let dst = &mut out[oy * ow..(oy + 1) * ow];
                // Valid ox range: 0 <= ox*sw + off_x < w.
                let sw = g.stride[1] as isize;
                let lo = if off_x < 0 {
                    ((-off_x) + sw - 1) / sw
                } else {
                    0
                };
                let hi = if w - off_x <= 0 {
                    0
                } else {
                    ((w - off_x - 1) / sw + 1).min(ow as isize)
                };
                for ox in lo..hi {
                    dst[ox as usize] += wv * src[(ox * sw + off_x) as usize];
                }
            }
        }
    }
}

/// Depthwise input-VJP for one channel: `dx_plane += convᵀ(dy_plane, k)`.
fn depthwise_plane_t<T: Float>(
    g: &ConvGeom,
    dy: &[T],
    k: &[T],
    dx: &mut [T],
    oh: usize,
    ow: usize,
) {
    let (h, w) = (g.h as isize, g.w as isize);
    let (pt, pl) = (g.pads[0] as isize, g.pads[1] as isize);
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            let wv = k[ki * g.kw + kj];
            let off_x = (kj * g.dilation[1]) as isize - pl;
            let sw = g.stride[1] as isize;
            let lo = if off_x < 0 {
                ((-off_x) + sw - 1) / sw
            } else {
                0
            };
            let hi = if w - off_x <= 0 {
                0
            } else {
                ((w - off_x - 1) / sw + 1).min(ow as isize)
            };
            for oy in 0..oh {
                let iy = (oy * g.stride[0] + ki * g.dilation[0]) as isize - pt;
                if iy < 0 || iy >= h {
                    continue;
                }
                let dst = &mut dx[(iy * w) as usize..((iy + 1) * w) as usize];
                let src = &dy[oy * ow..(oy + 1) * ow];
                for ox in lo..hi {
                    dst[(ox * sw + off_x) as usize] += wv * src[ox as usize];
                }
            }
        }
    }
}

/// Forward convolution. `x` is [n, c, h, w], `wt` is [m, c/group, kh, kw], `bias` is [m];
/// returns [n, m, oh, ow]. The caller checks the geometry (see [`ConvGeom::out_hw`]).
pub fn conv2d<T: Float>(g: &ConvGeom, x: &[T], wt: &[T], bias: Option<&[T]>) -> Vec<T> {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    let ohw = oh * ow;
    let (cg, mg, kdim) = (g.cg(), g.mg(), g.kdim());
    let mut out = vec![T::zero(); g.n * g.m * ohw];
    let sample = |xs: &[T], ys: &mut [T], threads: Threads| {
        if g.is_depthwise() {
            let work = |(oc, yplane): (usize, &mut [T])| {
                let ci = oc / mg;
                let xp = &xs[ci * g.h * g.w..(ci + 1) * g.h * g.w];
                depthwise_plane(
                    g,
                    xp,
                    &wt[oc * g.kh * g.kw..(oc + 1) * g.kh * g.kw],
                    yplane,
                    oh,
                    ow,
                );
            };
            if threads == Threads::Pool {
                ys.par_chunks_mut(ohw).enumerate().for_each(work);
            } else {
                ys.chunks_mut(ohw).enumerate().for_each(work);
            }
            return;
        }
        let mut col = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![T::zero(); kdim * ohw]
        };
        for gi in 0..g.group {
            let xg = &xs[gi * cg * g.h * g.w..(gi + 1) * cg * g.h * g.w];
            let b = if g.is_pointwise() {
                Mat::rows(xg, ohw)
            } else {
                im2col(g, xg, &mut col, oh, ow);
                Mat::rows(&col[..], ohw)
            };
            let a = Mat::rows(&wt[gi * mg * kdim..(gi + 1) * mg * kdim], kdim);
            matmul(
                mg,
                ohw,
                kdim,
                a,
                b,
                &mut ys[gi * mg * ohw..(gi + 1) * mg * ohw],
                false,
                threads,
            );
        }
    };
    let xsz = g.c * g.h * g.w;
    let ysz = g.m * ohw;
    if g.n > 1 {
        out.par_chunks_mut(ysz)
            .zip(x.par_chunks(xsz))
            .for_each(|(ys, xs)| sample(xs, ys, Threads::One));
    } else if g.n == 1 {
        sample(&x[..xsz], &mut out[..], Threads::Pool);
    }
    if let Some(b) = bias {
        out.par_chunks_mut(ohw).enumerate().for_each(|(i, plane)| {
            let bv = b[i % g.m];
            plane.iter_mut().for_each(|v| *v += bv);
        });
    }
    out
}

/// Input VJP of [`conv2d`] (a transposed convolution): given `dy` [n, m, oh, ow], returns
/// `dx` [n, c, h, w] = Jᵀ dy. Output padding is implied by the stored input size.
pub fn conv2d_vjp<T: Float>(g: &ConvGeom, dy: &[T], wt: &[T]) -> Vec<T> {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    let ohw = oh * ow;
    let (cg, mg, kdim) = (g.cg(), g.mg(), g.kdim());
    let hw = g.h * g.w;
    let mut dx = vec![T::zero(); g.n * g.c * hw];
    let sample = |dys: &[T], dxs: &mut [T], threads: Threads| {
        if g.is_depthwise() {
            let work = |(ci, xplane): (usize, &mut [T])| {
                for oc in ci * mg..(ci + 1) * mg {
                    let k = &wt[oc * g.kh * g.kw..(oc + 1) * g.kh * g.kw];
                    depthwise_plane_t(g, &dys[oc * ohw..(oc + 1) * ohw], k, xplane, oh, ow);
                }
            };
            if threads == Threads::Pool {
                dxs.par_chunks_mut(hw).enumerate().for_each(work);
            } else {
                dxs.chunks_mut(hw).enumerate().for_each(work);
            }
            return;
        }
        let mut col = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![T::zero(); kdim * ohw]
        };
        for gi in 0..g.group {
            let a = Mat::rows_t(&wt[gi * mg * kdim..(gi + 1) * mg * kdim], kdim);
            let b = Mat::rows(&dys[gi * mg * ohw..(gi + 1) * mg * ohw], ohw);
            let dxg = &mut dxs[gi * cg * hw..(gi + 1) * cg * hw];
            if g.is_pointwise() {
                matmul(kdim, ohw, mg, a, b, dxg, false, threads);
            } else {
                matmul(kdim, ohw, mg, a, b, &mut col, false, threads);
                col2im(g, &col, dxg, oh, ow);
            }
        }
    };
    let xsz = g.c * hw;
    let ysz = g.m * ohw;
    if g.n > 1 {
        dx.par_chunks_mut(xsz)
            .zip(dy.par_chunks(ysz))
            .for_each(|(dxs, dys)| sample(dys, dxs, Threads::One));
    } else if g.n == 1 {
        sample(&dy[..ysz], &mut dx[..], Threads::Pool);
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(g: &ConvGeom, x: &[f64], wt: &[f64]) -> Vec<f64> {
        let (oh, ow) = g.out_hw().unwrap();
        let (cg, mg) = (g.c / g.group, g.m / g.group);
        let mut y = vec![0.0; g.n * g.m * oh * ow];
        for n in 0..g.n {
            for oc in 0..g.m {
                let gi = oc / mg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = 0.0;
                        for cc in 0..cg {
                            let ci = gi * cg + cc;
                            for ki in 0..g.kh {
                                for kj in 0..g.kw {
                                    let iy = (oy * g.stride[0] + ki * g.dilation[0]) as isize
                                        - g.pads[0] as isize;
                                    let ix = (ox * g.stride[1] + kj * g.dilation[1]) as isize
                                        - g.pads[1] as isize;
                                    if iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < g.h
                                        && (ix as usize) < g.w
                                    {
                                        s += x[((n * g.c + ci) * g.h + iy as usize) * g.w
                                            + ix as usize]
                                            * wt[((oc * cg + cc) * g.kh + ki) * g.kw + kj];
                                    }
                                }
                            }
                        }
                        y[((n * g.m + oc) * oh + oy) * ow + ox] = s;
                    }
                }
            }
        }
        y
    }

    fn data(len: usize, seed: usize) -> Vec<f64> {
        (0..len)
            .map(|i| (((i * 37 + seed * 11) % 29) as f64 - 14.0) / 7.0)
            .collect()
    }

    fn geoms() -> Vec<ConvGeom> {
        let base = ConvGeom {
            n: 1,
            c: 3,
            h: 7,
            w: 9,
            m: 4,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            dilation: [1, 1],
            pads: [1, 1, 1, 1],
            group: 1,
        };
        vec![
            base,
            ConvGeom {
                n: 2,
                stride: [2, 2],
                pads: [0, 0, 1, 1],
                ..base
            },
            ConvGeom {
                stride: [2, 3],
                pads: [2, 0, 1, 3],
                dilation: [2, 1],
                ..base
            },
            ConvGeom {
                kh: 1,
                kw: 1,
                pads: [0; 4],
                n: 3,
                ..base
            },
            ConvGeom {
                c: 6,
                m: 6,
                group: 6,
                n: 2,
                kh: 5,
                kw: 5,
                pads: [2, 1, 2, 3],
                stride: [2, 2],
                ..base
            },
            ConvGeom {
                c: 4,
                m: 8,
                group: 4,
                kh: 3,
                kw: 2,
                ..base
            },
            ConvGeom {
                c: 6,
                m: 4,
                group: 2,
                h: 1,
                kh: 1,
                kw: 4,
                pads: [0, 2, 0, 1],
                ..base
            },
            ConvGeom {
                h: 5,
                w: 5,
                kh: 5,
                kw: 5,
                pads: [0; 4],
                stride: [3, 3],
                ..base
            },
        ]
    }

    #[test]
    fn conv_matches_naive() {
        for g in geoms() {
            let x = data(g.n * g.c * g.h * g.w, 1);
            let wt = data(g.m * (g.c / g.group) * g.kh * g.kw, 2);
            let bias = data(g.m, 3);
            let y = conv2d(&g, &x, &wt, Some(&bias));
            let mut r = naive(&g, &x, &wt);
            let (oh, ow) = g.out_hw().unwrap();
            for (i, v) in r.iter_mut().enumerate() {
                *v += bias[(i / (oh * ow)) % g.m];
            }
            for (a, b) in y.iter().zip(&r) {
                assert!((a - b).abs() < 1e-10, "{g:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn conv_vjp_is_adjoint_of_conv() {
        // <conv(x), dy> = <x, convᵀ(dy)> for every x, dy: checks the VJP against the naive forward.
        for g in geoms() {
            let (oh, ow) = g.out_hw().unwrap();
            let x = data(g.n * g.c * g.h * g.w, 4);
            let wt = data(g.m * (g.c / g.group) * g.kh * g.kw, 5);
            let dy = data(g.n * g.m * oh * ow, 6);
            let y = naive(&g, &x, &wt);
            let dx = conv2d_vjp(&g, &dy, &wt);
            let lhs: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
            assert!(
                (lhs - rhs).abs() < 1e-9 * (1.0 + lhs.abs()),
                "{g:?}: {lhs} vs {rhs}"
            );
            // And elementwise against the naive Jacobian-transpose (one-hot probes).
            for probe in [0, dx.len() / 2, dx.len() - 1] {
                let mut e = vec![0.0; x.len()];
                e[probe] = 1.0;
                let col = naive(&g, &e, &wt);
                let want: f64 = col.iter().zip(&dy).map(|(a, b)| a * b).sum();
                assert!((dx[probe] - want).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn conv_f32_close_to_f64() {
        for g in geoms() {
            let x = data(g.n * g.c * g.h * g.w, 7);
            let wt = data(g.m * (g.c / g.group) * g.kh * g.kw, 8);
            let y64 = conv2d(&g, &x, &wt, None);
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let w32: Vec<f32> = wt.iter().map(|&v| v as f32).collect();
            let y32 = conv2d(&g, &x32, &w32, None);
            for (a, b) in y32.iter().zip(&y64) {
                assert!((*a as f64 - b).abs() < 1e-4);
            }
        }
    }
}
