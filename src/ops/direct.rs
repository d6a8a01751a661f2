//! Direct convolution for layers with few input channels (a network's stem), f32 with AVX-512.
//!
//! im2col + GEMM suits layers whose patches are long; a stem's are 27 values (3×3 over RGB) or
//! 147 (7×7), so im2col writes a matrix as large as the product reads, and the product's inner
//! axis is too short for its kernel. Here each input row is copied once, split by column phase
//! (see [`PhaseRows`]), and every tap of a block of 32 output columns is one contiguous load that
//! eight output channels' multiply-adds share. EfficientNet-Lite0's stem ran 1.9× onnxruntime's
//! time through im2col (per-node profiles at batch 1).

use super::conv::{ConvGeom, PhaseRows};
use super::gemm::{SendPtr, Threads};
use crate::tensor::Float;
use rayon::prelude::*;

/// Output channels per register block.
const R: usize = 8;
/// Output columns per register block (two vectors of sixteen).
const COLS: usize = 32;

/// Whether the direct kernel runs for `g` here: f32 on a CPU with AVX-512F (unless
/// `RELPROP_NO_AVX512` is set), one group, a kernel larger than 1×1 whose patches have at most 160
/// values, and rows of at least 32 outputs.
pub(super) fn pays<T: Float>(g: &ConvGeom) -> bool {
    let (_, ow) = g.out_hw().unwrap_or((0, 0));
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && g.group == 1
        && g.kh * g.kw > 1
        && g.c * g.kh * g.kw <= 160
        && ow >= COLS
        && super::avx512()
}

/// A stem convolution prepared once per call: the weights packed for the kernel, the biases and
/// the tap offsets, shared by every sample (at batch 8 each sample repacked them).
pub(super) struct Direct {
    g: ConvGeom,
    ph: PhaseRows,
    /// Padded input rows per channel.
    hp: usize,
    /// Offset of each tap (c, ki, kj) from an output row's base, in the weights' order.
    offs: Vec<usize>,
    /// Weights by block of R output channels, tap-major: [m/R][tap][R] (zeros past m).
    wp: Vec<f32>,
    bv: Vec<f32>,
    clamp: Option<(f32, f32)>,
}

impl Direct {
    /// Prepares `g` (for which [`pays`] holds, `T` being f32) with weights `wt`, `bias` and the
    /// output clamp.
    pub(super) fn new<T: Float>(g: &ConvGeom, wt: &[T], bias: Option<&[T]>, clamp: Option<(T, T)>) -> Self {
        assert_eq!(std::any::TypeId::of::<T>(), std::any::TypeId::of::<f32>());
        let (_, ow) = g.out_hw().expect("geometry checked by caller");
        let taps = g.c * g.kh * g.kw;
        assert!(wt.len() >= g.m * taps, "convolution weights too small");
        let f = |v: T| v.to_f32().unwrap_or(0.0);
        // Each padded input row split by column phase, with room for the last block's overrun.
        let ph = PhaseRows::new(g, ow.div_ceil(COLS) * COLS);
        let row = ph.row_len();
        let hp = g.h + g.pads[0] + g.pads[2];
        let offs = (0..g.c)
            .flat_map(|ci| (0..g.kh).flat_map(move |ki| (0..g.kw).map(move |kj| (ci, ki, kj))))
            .map(|(ci, ki, kj)| ci * hp * row + ki * g.dilation[0] * row + ph.start(kj))
            .collect();
        let blocks = g.m.div_ceil(R);
        let mut wp = vec![0.0f32; blocks * taps * R];
        for oc in 0..g.m {
            for t in 0..taps {
                wp[(oc / R * taps + t) * R + oc % R] = f(wt[oc * taps + t]);
            }
        }
        let mut bv = vec![0.0f32; blocks * R];
        if let Some(b) = bias {
            (0..g.m).for_each(|oc| bv[oc] = f(b[oc]));
        }
        let clamp = clamp.map(|(lo, hi)| (f(lo), f(hi)));
        Direct { g: *g, ph, hp, offs, wp, bv, clamp }
    }

    /// One sample's convolution `ys = b + conv(xs, wt)` ([m, oh, ow]), added onto `ys` when
    /// `accumulate`, then clamped.
    ///
    /// # Safety
    /// The CPU has AVX-512F ([`pays`]); `T` is f32; `ys` is valid for the sample's `m·oh·ow`
    /// outputs, initialised when `accumulate`, and not aliased during the call.
    pub(super) unsafe fn sample<T: Float>(&self, xs: &[T], ys: *mut T, accumulate: bool, threads: Threads) {
        assert_eq!(std::any::TypeId::of::<T>(), std::any::TypeId::of::<f32>());
        let g = &self.g;
        let (oh, ow) = g.out_hw().expect("geometry checked by caller");
        assert!(xs.len() >= g.c * g.h * g.w, "convolution input too small");
        // SAFETY: T is f32 (asserted above).
        let xs = unsafe { std::slice::from_raw_parts(xs.as_ptr() as *const f32, xs.len()) };
        let (ph, hp) = (&self.ph, self.hp);
        let row = ph.row_len();
        let mut buf = vec![0.0f32; g.c * hp * row];
        // Rows over the pool at batch 1 (the copy on the calling thread left the other idle).
        let fill = |(k, dst): (usize, &mut [f32])| {
            let (ci, r) = (k / hp, k % hp);
            if let Some(iy) = r.checked_sub(g.pads[0]).filter(|&iy| iy < g.h) {
                ph.scatter(&xs[(ci * g.h + iy) * g.w..(ci * g.h + iy + 1) * g.w], dst);
            }
        };
        if threads == Threads::Pool {
            buf.par_chunks_exact_mut(row).enumerate().with_min_len(16).for_each(fill);
        } else {
            buf.chunks_exact_mut(row).enumerate().for_each(fill);
        }
        // Every read inside the buffer: the last row's last block's last tap.
        let last = (oh - 1) * g.stride[0] * row
            + (ow.div_ceil(COLS) - 1) * COLS
            + self.offs.iter().max().copied().unwrap_or(0)
            + COLS;
        assert!(last <= buf.len(), "direct convolution reads past its buffer");
        let k = Kernel {
            buf: &buf,
            offs: &self.offs,
            wp: &self.wp,
            bv: &self.bv,
            m: g.m,
            oh,
            ow,
            row_step: g.stride[0] * row,
            clamp: self.clamp,
            accumulate,
        };
        let out = SendPtr(ys as *mut f32);
        let rows = |r: std::ops::Range<usize>| {
            let out = &out;
            // SAFETY: AVX-512F present (pays); reads checked above; each call writes its own rows.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                k.rows(r, out.0)
            };
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (r, out);
                unreachable!("pays() is false off x86-64");
            }
        };
        // Rows split over the threads, a few blocks each so that a slow core does not hold the rest.
        let per = match threads {
            Threads::Pool => oh.div_ceil(4 * rayon::current_num_threads()).max(1),
            Threads::One => oh,
        };
        (0..oh.div_ceil(per)).into_par_iter().with_max_len(1).for_each(|t| rows(t * per..((t + 1) * per).min(oh)));
    }
}

struct Kernel<'a> {
    buf: &'a [f32],
    offs: &'a [usize],
    wp: &'a [f32],
    bv: &'a [f32],
    m: usize,
    oh: usize,
    ow: usize,
    row_step: usize,
    clamp: Option<(f32, f32)>,
    accumulate: bool,
}

impl Kernel<'_> {
    /// Output rows `rows` of every channel.
    ///
    /// # Safety
    /// AVX-512F present; reads inside `buf` (checked by the caller); `out` valid for [m, oh, ow].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows(&self, rows: std::ops::Range<usize>, out: *mut f32) {
        use std::arch::x86_64::*;
        let taps = self.offs.len();
        let (oh, ow) = (self.oh, self.ow);
        let bounds = self.clamp.map(|(lo, hi)| (_mm512_set1_ps(lo), _mm512_set1_ps(hi)));
        let buf = self.buf.as_ptr();
        for oy in rows {
            for c0 in (0..ow).step_by(COLS) {
                // SAFETY: inside the buffer (checked by the caller).
                let base = unsafe { buf.add(oy * self.row_step + c0) };
                for blk in 0..self.m.div_ceil(R) {
                    let wb = &self.wp[blk * taps * R..(blk + 1) * taps * R];
                    let mut acc: [[__m512; 2]; R] = std::array::from_fn(|r| [_mm512_set1_ps(self.bv[blk * R + r]); 2]);
                    for (t, &o) in self.offs.iter().enumerate() {
                        // SAFETY: as above.
                        let (v0, v1) = unsafe { (_mm512_loadu_ps(base.add(o)), _mm512_loadu_ps(base.add(o + 16))) };
                        let w = &wb[t * R..(t + 1) * R];
                        for (a, &wv) in acc.iter_mut().zip(w) {
                            let wv = _mm512_set1_ps(wv);
                            a[0] = _mm512_fmadd_ps(wv, v0, a[0]);
                            a[1] = _mm512_fmadd_ps(wv, v1, a[1]);
                        }
                    }
                    for (r, a) in acc.iter().enumerate() {
                        let oc = blk * R + r;
                        if oc >= self.m {
                            break;
                        }
                        for (u, &v) in a.iter().enumerate() {
                            let c = c0 + 16 * u;
                            if c >= ow {
                                break;
                            }
                            let n = (ow - c).min(16);
                            let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
                            // SAFETY: channel oc's row oy, columns c..c + n, inside [m, oh, ow].
                            unsafe {
                                let o = out.add((oc * oh + oy) * ow + c);
                                // The initial output is part of the clamped sum.
                                let v =
                                    if self.accumulate { _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, o)) } else { v };
                                // NaN passes through as in the scalar clamp.
                                let v = bounds.map_or(v, |(lo, hi)| _mm512_min_ps(hi, _mm512_max_ps(lo, v)));
                                _mm512_mask_storeu_ps(o, mask, v);
                            }
                        }
                    }
                }
            }
        }
    }
}
