//! Depthwise convolution with sixteen channels in the lanes of one AVX-512 vector (f32).
//!
//! The per-plane kernel in [`super::conv`] puts sixteen output columns of one channel in a vector:
//! on 7×7 planes nine of the sixteen lanes idle, and a stride-2 plane must first be split by column
//! phase. Here sixteen channels are transposed into one interleaved plane (each pixel a vector),
//! so every lane works on every tap whatever the plane's width or stride, at the cost of a 16×16
//! in-register transpose on the way in and out. EfficientNet-Lite0's 7×7 depthwise layers ran 3–4×
//! behind onnxruntime's (which keeps its activations in this blocked layout) with the per-plane
//! kernel (per-node profiles of both, batch 1, one thread). Only 7-wide planes take it: on wider
//! ones the transposes cost more than the idle lanes (see [`pays`]).

use super::conv::ConvGeom;
use crate::tensor::Float;

/// Channels per vector.
pub(super) const LANES: usize = 16;
/// Output pixels per register block: eight accumulators, one weight vector and the loads fit in
/// the 32 vector registers with room to spare.
const BLOCK: usize = 8;

/// Whether the kernel runs here: f32 on a CPU with AVX-512F, unless `RELPROP_NO_AVX512` is set.
pub(super) fn available<T: Float>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && super::avx512()
}

/// Whether this kernel beats the per-plane one on output rows `ow` wide: on EfficientNet-Lite0's
/// 7×7 outputs it ran in 0.44–0.75 of the per-plane time (per-node profiles of the whole model,
/// six alternations; its VJPs on 7×7 planes 0.6–0.8 in `convbench`). On 14- and 28-wide 5×5
/// layers, which `convbench` alone ran faster, the model ran 1.1–1.4× slower, and on wider 3×3
/// planes the two transposes cost more than the idle lanes they save.
pub(super) fn pays(ow: usize) -> bool {
    ow <= 8
}

thread_local! {
    /// Buffers of finished scratches, reused by the next on this thread: fresh ones cost page
    /// faults and zeroing on every call (a fifth of the kernel's time in `perf` on `convbench`).
    static SPARE: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `len` values from this thread's spares (contents unspecified) or a new one.
fn take(len: usize) -> Vec<f32> {
    let mut v = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    v.resize(len, 0.0);
    v
}

impl Drop for Scratch {
    fn drop(&mut self) {
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            for v in [&mut self.buf, &mut self.out, &mut self.wv] {
                // Three per scratch; more would only hold memory.
                if s.len() < 3 {
                    s.push(std::mem::take(v));
                }
            }
        });
    }
}

/// Per-task scratch for one geometry: the interleaved, zero-padded input plane, the interleaved
/// output and the weights, tap-major with a vector per tap. The padding (and, when the input is
/// spread out, the slots between its values) is zeroed once: every group of channels writes the
/// same interior slots.
pub(super) struct Scratch {
    g: ConvGeom,
    /// The input is spread out by this factor (rows, columns) with zeros between (the VJP's
    /// upsampled output gradient); its planes are `(h − 1)/uh + 1` by `(w − 1)/uw + 1`.
    up: [usize; 2],
    oh: usize,
    ow: usize,
    /// Pixels per buffer row (the padded width, and room for the last block's overrun).
    wp: usize,
    buf: Vec<f32>,
    out: Vec<f32>,
    wv: Vec<f32>,
}

impl Scratch {
    /// Scratch for `g` (one sample; `g.group == g.c == g.m` is the caller's to check) whose input
    /// is spread out by `up`.
    pub(super) fn new(g: &ConvGeom, up: [usize; 2]) -> Self {
        let (oh, ow) = g.out_hw().expect("geometry checked by caller");
        let hp = g.h + g.pads[0] + g.pads[2];
        let blocks = ow.div_ceil(BLOCK) * BLOCK;
        let wp = (g.w + g.pads[1] + g.pads[3]).max((blocks - 1) * g.stride[1] + (g.kw - 1) * g.dilation[1] + 1);
        let mut buf = take(hp * wp * LANES);
        if up == [1, 1] {
            // Only the padding: the loads overwrite the interior (zeroing all of a 112×112 plane's
            // buffer took a quarter of the layer's time).
            let (pt, pl) = (g.pads[0], g.pads[1]);
            let (top, bottom) = (pt * wp, (pt + g.h) * wp);
            buf[..top * LANES].fill(0.0);
            buf[bottom * LANES..].fill(0.0);
            for r in pt..pt + g.h {
                buf[r * wp * LANES..(r * wp + pl) * LANES].fill(0.0);
                buf[(r * wp + pl + g.w) * LANES..(r + 1) * wp * LANES].fill(0.0);
            }
        } else {
            buf.fill(0.0);
        }
        Scratch { g: *g, up, oh, ow, wp, buf, out: take(oh * ow * LANES), wv: take(g.kh * g.kw * LANES) }
    }

    /// Input plane size (rows, columns) before spreading.
    pub(super) fn input_hw(&self) -> (usize, usize) {
        ((self.g.h - 1) / self.up[0] + 1, (self.g.w - 1) / self.up[1] + 1)
    }

    /// Convolves `n ≤ 16` channels: input plane `l` at `x[l·xs..]`, its kernel at `k[l·kk..]`, its
    /// bias `bias[l]`; output plane `l` at `out + l·oh·ow`. The convolution is clamped to `clamp`
    /// and then, when `accumulate`, added onto what is there (the VJP's later terms; the forward
    /// never accumulates onto a depthwise output, see `conv2d_onto`).
    ///
    /// # Safety
    /// `T` is f32 and the CPU has AVX-512F ([`available`]); `out` is valid for `n` output planes,
    /// initialised when `accumulate`, and not aliased during the call.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run<T: Float>(
        &mut self,
        n: usize,
        x: &[T],
        xs: usize,
        k: &[T],
        bias: Option<&[T]>,
        out: *mut T,
        clamp: Option<(T, T)>,
        accumulate: bool,
    ) {
        assert_eq!(std::any::TypeId::of::<T>(), std::any::TypeId::of::<f32>());
        let kk = self.g.kh * self.g.kw;
        let (ih, iw) = self.input_hw();
        assert!(n <= LANES && n > 0, "one to sixteen channels");
        assert!((n - 1) * xs + ih * iw <= x.len(), "an input plane per channel");
        assert!(k.len() >= n * kk && bias.is_none_or(|b| b.len() >= n), "a kernel and a bias per channel");
        // SAFETY: T is f32 (asserted above).
        let (x, k) = unsafe {
            (
                std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()),
                std::slice::from_raw_parts(k.as_ptr() as *const f32, k.len()),
            )
        };
        // Absent lanes keep zero weights, so their sums stay finite and are never stored.
        self.wv.iter_mut().for_each(|v| *v = 0.0);
        for l in 0..n {
            for t in 0..kk {
                self.wv[t * LANES + l] = k[l * kk + t];
            }
        }
        let mut b = [0.0f32; LANES];
        if let Some(bias) = bias {
            (0..n).for_each(|l| b[l] = bias[l].to_f32().unwrap_or(0.0));
        }
        let f = |v: T| v.to_f32().unwrap_or(0.0);
        let clamp = clamp.map(|(lo, hi)| (f(lo), f(hi)));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (the caller's contract); the kernels check their own bounds.
        unsafe {
            self.load(n, x, xs);
            self.compute(&b, clamp);
            self.store(n, out as *mut f32, accumulate);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, b, clamp, out, accumulate);
            unreachable!("available() is false off x86-64");
        }
    }

    /// Transposes the `n` input planes into the interleaved buffer, sixteen pixels at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(&mut self, n: usize, x: &[f32], xs: usize) {
        use std::arch::x86_64::*;
        let (ih, iw) = self.input_hw();
        let [uh, uw] = self.up;
        let (pt, pl) = (self.g.pads[0], self.g.pads[1]);
        // The last pixel's vector lies inside the buffer; every other store is before it.
        assert!(((pt + (ih - 1) * uh) * self.wp + pl + (iw - 1) * uw + 1) * LANES <= self.buf.len());
        let bp = self.buf.as_mut_ptr();
        for y in 0..ih {
            let row = (pt + y * uh) * self.wp + pl;
            for x0 in (0..iw).step_by(LANES) {
                let cnt = (iw - x0).min(LANES);
                let mask: __mmask16 = if cnt == LANES { 0xffff } else { (1u16 << cnt) - 1 };
                let mut r = [_mm512_setzero_ps(); LANES];
                for (l, r) in r.iter_mut().enumerate().take(n) {
                    // SAFETY: plane l's row y, columns x0..x0 + cnt (asserted in `run`).
                    *r = unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr().add(l * xs + y * iw + x0)) };
                }
                transpose(&mut r);
                for (j, &v) in r.iter().enumerate().take(cnt) {
                    // SAFETY: pixel (y, x0 + j) of the spread, padded plane (asserted above).
                    unsafe { _mm512_storeu_ps(bp.add((row + (x0 + j) * uw) * LANES), v) };
                }
            }
        }
    }

    /// The interleaved output: each output pixel's sums over the taps, eight pixels of a row at a
    /// time. Strides 1 and 2 are constants in their own copies of the loop, so that each block's
    /// eight loads are one register plus fixed offsets (with the stride read at run time, address
    /// arithmetic took as many instructions as the multiply-adds).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn compute(&mut self, b: &[f32; LANES], clamp: Option<(f32, f32)>) {
        // SAFETY: AVX-512F is present (the caller's contract).
        unsafe {
            match self.g.stride[1] {
                1 => self.compute_s::<1>(b, clamp),
                2 => self.compute_s::<2>(b, clamp),
                _ => self.compute_s::<0>(b, clamp),
            }
        }
    }

    /// [`Self::compute`] with column stride `S`, or the geometry's when `S` is 0.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn compute_s<const S: usize>(&mut self, b: &[f32; LANES], clamp: Option<(f32, f32)>) {
        use std::arch::x86_64::*;
        let g = &self.g;
        let (oh, ow, wp) = (self.oh, self.ow, self.wp);
        let ([s0, s1], [d0, d1]) = (g.stride, g.dilation);
        let s1 = if S == 0 { s1 } else { S };
        assert_eq!(s1, g.stride[1]);
        let (kh, kw) = (g.kh, g.kw);
        // Every read inside the buffer: the last block's last tap (rows and columns only grow).
        let blocks = ow.div_ceil(BLOCK) * BLOCK;
        let last = ((oh - 1) * s0 + (kh - 1) * d0) * wp + (blocks - 1) * s1 + (kw - 1) * d1;
        assert!((last + 1) * LANES <= self.buf.len(), "depthwise block reads past its plane");
        assert!(self.out.len() >= oh * ow * LANES && self.wv.len() >= kh * kw * LANES);
        let (buf, wv, op) = (self.buf.as_ptr(), self.wv.as_ptr(), self.out.as_mut_ptr());
        // SAFETY: b has sixteen values.
        let bias = unsafe { _mm512_loadu_ps(b.as_ptr()) };
        let bounds = clamp.map(|(lo, hi)| (_mm512_set1_ps(lo), _mm512_set1_ps(hi)));
        for oy in 0..oh {
            for ox0 in (0..ow).step_by(BLOCK) {
                let mut acc = [bias; BLOCK];
                for ki in 0..kh {
                    // SAFETY: inside the buffer (asserted above).
                    let row = unsafe { buf.add(((oy * s0 + ki * d0) * wp + ox0 * s1) * LANES) };
                    // SAFETY: row ki's weights.
                    let wrow = unsafe { wv.add(ki * kw * LANES) };
                    for kj in 0..kw {
                        // SAFETY: tap (ki, kj)'s weights, and pixels inside the buffer (asserted).
                        unsafe {
                            let w = _mm512_loadu_ps(wrow.add(kj * LANES));
                            let base = row.add(kj * d1 * LANES);
                            for (j, a) in acc.iter_mut().enumerate() {
                                *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(base.add(j * s1 * LANES)), *a);
                            }
                        }
                    }
                }
                for (j, &a) in acc.iter().enumerate().take(ow - ox0) {
                    // NaN passes through as in the scalar clamp (max and min return their second
                    // operand when either is NaN).
                    let v = bounds.map_or(a, |(lo, hi)| _mm512_min_ps(hi, _mm512_max_ps(lo, a)));
                    // SAFETY: output pixel (oy, ox0 + j) < oh·ow (asserted above).
                    unsafe { _mm512_storeu_ps(op.add((oy * ow + ox0 + j) * LANES), v) };
                }
            }
        }
    }

    /// Transposes the interleaved output back into `n` planes of `oh·ow`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(&mut self, n: usize, out: *mut f32, accumulate: bool) {
        use std::arch::x86_64::*;
        let ohw = self.oh * self.ow;
        let src = self.out.as_ptr();
        for p0 in (0..ohw).step_by(LANES) {
            let cnt = (ohw - p0).min(LANES);
            let mask: __mmask16 = if cnt == LANES { 0xffff } else { (1u16 << cnt) - 1 };
            let mut r = [_mm512_setzero_ps(); LANES];
            for (j, r) in r.iter_mut().enumerate().take(cnt) {
                // SAFETY: pixel p0 + j < oh·ow of the interleaved output.
                *r = unsafe { _mm512_loadu_ps(src.add((p0 + j) * LANES)) };
            }
            transpose(&mut r);
            for (l, &v) in r.iter().enumerate().take(n) {
                // SAFETY: plane l's pixels p0..p0 + cnt (the caller's contract).
                unsafe {
                    let o = out.add(l * ohw + p0);
                    let v = if accumulate { _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, o)) } else { v };
                    _mm512_mask_storeu_ps(o, mask, v);
                }
            }
        }
    }
}

/// Transposes sixteen vectors of sixteen f32 as a 16×16 matrix: 32-bit and 64-bit interleaves
/// within 128-bit lanes, then two rounds of 128-bit lane shuffles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose(r: &mut [std::arch::x86_64::__m512; LANES]) {
    use std::arch::x86_64::*;
    let t: [__m512; LANES] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 { _mm512_unpacklo_ps(a, b) } else { _mm512_unpackhi_ps(a, b) }
    });
    // u[4q + j]: in 128-bit lane L, column 4L + j of rows 4q..4q + 4.
    let u: [__m512; LANES] = std::array::from_fn(|i| {
        let (q, j) = (i / 4, i % 4);
        let lo = _mm512_castps_pd(t[4 * q + j / 2]);
        let hi = _mm512_castps_pd(t[4 * q + 2 + j / 2]);
        _mm512_castpd_ps(if j % 2 == 0 { _mm512_unpacklo_pd(lo, hi) } else { _mm512_unpackhi_pd(lo, hi) })
    });
    for j in 0..4 {
        let v = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
        let v1 = _mm512_shuffle_f32x4::<0xdd>(u[j], u[4 + j]);
        let w = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
        let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + j], u[12 + j]);
        r[j] = _mm512_shuffle_f32x4::<0x88>(v, w);
        r[4 + j] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
        r[8 + j] = _mm512_shuffle_f32x4::<0xdd>(v, w);
        r[12 + j] = _mm512_shuffle_f32x4::<0xdd>(v1, w1);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps_rows_and_columns() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        use std::arch::x86_64::*;
        let m: Vec<f32> = (0..LANES * LANES).map(|i| i as f32).collect();
        // SAFETY: AVX-512F checked above; each row has sixteen values.
        let mut r: [__m512; LANES] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(m[i * LANES..].as_ptr()) });
        // SAFETY: as above.
        unsafe { transpose(&mut r) };
        let mut t = vec![0.0f32; LANES * LANES];
        for (i, v) in r.iter().enumerate() {
            // SAFETY: sixteen values per row.
            unsafe { _mm512_storeu_ps(t[i * LANES..].as_mut_ptr(), *v) };
        }
        for i in 0..LANES {
            for j in 0..LANES {
                assert_eq!(t[i * LANES + j], m[j * LANES + i], "({i}, {j})");
            }
        }
    }
}
