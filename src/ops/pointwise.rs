//! 1×1 convolutions with few input channels, as EfficientNet-Lite0's expansions are (16 to 40
//! channels in, six times as many out): a hand-written AVX-512 kernel that keeps a block of output
//! channels by 32 pixels in registers over all input channels and applies the bias, the initial
//! output and the clamp there before its one store. The library's product packed its operands per
//! call, and the epilogue then re-read the output, six times the input's size, for the bias and
//! the ReLU6: the 16→96 layer on 112×112 took 0.14 ms that way, 0.10 without the epilogue
//! (`CLAMP=1 convbench "pw 16" fwd`). The same kernel takes deeper 1×1 layers whose weights are
//! small beside their plane, and 1×1 input VJPs (the kernel read transposed).
//!
//! [`Split`] holds the products that LRP's z⁺ makes over inputs of both signs, with its ratio and
//! its multiply by the input in their epilogues (see there).

use super::conv::ConvGeom;
use super::gemm::{SendPtr, Threads};
use crate::tensor::Float;
use rayon::prelude::*;

/// Input channels up to which the kernel takes any plane: a run's inputs stay in L1 (a run of
/// [`SPAN`] pixels by 64 channels is 32 KB).
const C_MAX: usize = 64;
/// Deeper layers take the kernel where their weights are at most this many times their plane:
/// each run of [`SPAN`] pixels reads all the weights, without the packing that lets the library's
/// product reuse them from registers. ResNet-50's 128→512 28×28 layer (84 weights a pixel) ran
/// 0.90× the product's time and 256→64 56×56 (5) 0.91×, DenseNet-121's 512→128 28×28 (84) 0.89×;
/// its 1024→128 14×14 (669) ran 1.7× and EfficientNet-Lite0's 1152→192 7×7 (4514) 1.8×
/// (`MIN=1 CLAMP=1 convbench`, two threads).
const WEIGHTS_PER_PIXEL: usize = 96;
/// Output channels per register block.
const RO: usize = 8;
/// Pixels per register block: two vectors.
const COLS: usize = 32;
/// Pixels per run of blocks: every channel block of these pixels before the next run, so that
/// each output row is written in runs of this many pixels (a run per block wrote 96 rows 128
/// bytes at a time) while the run's inputs stay in L1.
const SPAN: usize = 128;

/// Whether the kernel takes `g`: f32 with AVX-512F, a plain 1×1 convolution (one group, stride 1,
/// no padding) with at most [`C_MAX`] input channels or at most [`WEIGHTS_PER_PIXEL`] weights per
/// pixel; `RELPROP_POINTWISE=off` sends it to the library product (for A/B timing in one binary).
pub(super) fn applies<T: Float>(g: &ConvGeom) -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && super::avx512()
        && g.group == 1
        && g.kh == 1
        && g.kw == 1
        && g.stride == [1, 1]
        && g.pads == [0; 4]
        && (g.c <= C_MAX || g.m * g.c <= WEIGHTS_PER_PIXEL * g.h * g.w)
        && enabled()
}

/// Whether the kernel takes the input VJP of a 1×1 layer, `gv` being that VJP as a forward
/// convolution (from the layer's m channels to its c): as [`applies`], less the VJPs onto few
/// channels from many, where the library's product was faster. EfficientNet-Lite0's 16→96
/// 112×112 and 24→144 56×56 layers' VJPs ran 1.05× and 1.07× its time in the kernel, their
/// 96→24 one 0.7×, ResNet-50's 64→256 56×56 and 512→128 28×28 0.9× (`MIN=1 convbench`,
/// alternated runs).
pub(super) fn applies_vjp<T: Float>(gv: &ConvGeom) -> bool {
    applies::<T>(gv) && (gv.c <= C_MAX || gv.m >= 64)
}

/// Whether the kernel runs at all (`RELPROP_POINTWISE=off` turns it off).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::switch_on(&ON, "RELPROP_POINTWISE")
}

/// One sample's convolution summed over `terms` of (input `[c, h·w]`, kernel): writes `[m, h·w]`
/// at `out` as `clamp(Σ conv + bias [+ out])`. Kernels are `[m, c]`, or with `transposed` the
/// forward kernel `[c, m]` of a layer whose input VJP this is (read transposed in place).
///
/// # Safety
/// [`applies`] holds for `g`; `out` is valid for writes of `m·h·w` elements, not aliased during
/// the call, and initialised when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sample<T: Float>(
    g: &ConvGeom,
    terms: &[(&[T], &[T])],
    transposed: bool,
    bias: Option<&[T]>,
    clamp: Option<(T, T)>,
    out: *mut T,
    accumulate: bool,
    threads: Threads,
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(applies::<T>(g), "pointwise kernel on {g:?}");
        let (c, m, hw) = (g.c, g.m, g.h * g.w);
        assert!(terms.iter().all(|(x, wt)| x.len() == c * hw && wt.len() == m * c), "input or kernel size");
        assert!(bias.is_none_or(|b| b.len() == m), "bias size");
        let f = super::as_f32::<T>;
        let ts: Vec<(&[f32], &[f32])> = terms.iter().map(|(x, wt)| (f(x), f(wt))).collect();
        // Weight (output channel o, input channel i) at o·so + i·sc.
        let (so, sc) = if transposed { (1, m) } else { (c, 1) };
        let k = Kernel {
            ts: &ts,
            so,
            sc,
            bias: bias.map(f),
            clamp: clamp.map(|(lo, hi)| (lo.f64() as f32, hi.f64() as f32)),
            c,
            hw,
            accumulate,
        };
        let spans = hw.div_ceil(SPAN);
        let blocks = m.div_ceil(RO);
        let workers = if threads == Threads::Pool { rayon::current_num_threads().max(1) } else { 1 };
        // Runs of spans, a few per thread (a thread slowed by another job hands its rest over);
        // on planes of fewer spans than that, runs of channel blocks as well.
        let (col_parts, oc_parts) = if workers > 1 && m * hw * c >= 1 << 18 {
            let cols = spans.min(4 * workers);
            (cols, (4 * workers).div_ceil(cols).min(blocks))
        } else {
            (1, 1)
        };
        let (col_per, oc_per) = (spans.div_ceil(col_parts), blocks.div_ceil(oc_parts));
        let op = SendPtr(out as *mut f32);
        let part = |p: usize| {
            let op = &op;
            let (cp, opart) = (p % col_parts, p / col_parts);
            let oc = opart * oc_per * RO..((opart + 1) * oc_per * RO).min(m);
            for s in cp * col_per..((cp + 1) * col_per).min(spans) {
                // SAFETY: AVX-512F present (applies); the span's pixels and channels exist, and
                // parts write disjoint pixels or channels of `out`.
                unsafe { k.span(s * SPAN..((s + 1) * SPAN).min(hw), oc.clone(), op.0) };
            }
        };
        let parts = col_parts * oc_parts;
        if parts > 1 {
            (0..parts).into_par_iter().with_max_len(1).for_each(part);
        } else {
            part(0);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "applies is false off x86-64: {g:?} {} {transposed} {bias:?} {clamp:?} {out:p} {accumulate} {threads:?}",
        terms.len()
    );
}

/// One sample's operands as f32.
#[cfg(target_arch = "x86_64")]
struct Kernel<'a> {
    /// The (input, kernel) pairs summed.
    ts: &'a [(&'a [f32], &'a [f32])],
    /// The kernels' strides per output and per input channel.
    so: usize,
    sc: usize,
    bias: Option<&'a [f32]>,
    clamp: Option<(f32, f32)>,
    c: usize,
    hw: usize,
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl Kernel<'_> {
    /// Output channels `oc` (from a multiple of [`RO`]) of pixels `px` (at most [`SPAN`]).
    ///
    /// # Safety
    /// AVX-512F present; `px` lies in `0..hw` and `oc` in `0..m`; `out` as [`sample`] describes it.
    #[target_feature(enable = "avx512f")]
    unsafe fn span(&self, px: std::ops::Range<usize>, oc: std::ops::Range<usize>, out: *mut f32) {
        for oc0 in oc.clone().step_by(RO) {
            for q0 in px.clone().step_by(COLS) {
                let n = COLS.min(px.end - q0);
                let mk = [mask(n), mask(n.saturating_sub(16))];
                // The first block of a run of pixels fetches the next run's inputs (see `block`).
                let ahead = oc0 == oc.start && q0 + COLS < px.end;
                macro_rules! go {
                    ($($r:literal)*) => {
                        match (RO.min(oc.end - oc0), n > 16) {
                            $(($r, false) => self.block::<$r, 1>(oc0, q0, mk, out, ahead),
                              ($r, true) => self.block::<$r, 2>(oc0, q0, mk, out, ahead),)*
                            _ => unreachable!("one to eight channels"),
                        }
                    };
                }
                // SAFETY: channels oc0.. and pixels q0..q0 + n exist (the lanes past them are
                // masked off).
                unsafe { go!(1 2 3 4 5 6 7 8) }
            }
        }
    }

    /// Output channels `oc0..oc0 + R` of the `P` vectors of pixels from `q0`, their lanes `mk`.
    ///
    /// # Safety
    /// AVX-512F present; the channels and the unmasked pixels exist.
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize, const P: usize>(
        &self,
        oc0: usize,
        q0: usize,
        mk: [u16; 2],
        out: *mut f32,
        ahead: bool,
    ) {
        use std::arch::x86_64::*;
        let (c, hw, so, sc) = (self.c, self.hw, self.so, self.sc);
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for &(x, w) in self.ts {
            let xq = x[q0..].as_ptr();
            let wr = w[oc0 * so..].as_ptr();
            for ci in 0..c {
                if ahead {
                    // The next 32 pixels of this channel: each channel is a row of its own, short
                    // runs the hardware prefetcher follows poorly across a hundred rows (in the
                    // model, EfficientNet-Lite0's 16→96 112×112 layer 0.200 → 0.188 ms, its 32→16
                    // one 0.051 → 0.045; per-node profiles alternated).
                    for l in 0..2 {
                        _mm_prefetch::<_MM_HINT_T0>(xq.wrapping_add(ci * hw + COLS + 16 * l) as *const i8);
                    }
                }
                let mut xv = [_mm512_setzero_ps(); P];
                for (p, v) in xv.iter_mut().enumerate() {
                    // SAFETY: input channel ci's unmasked pixels from q0 (masked lanes are not read).
                    *v = unsafe { _mm512_maskz_loadu_ps(mk[p], xq.wrapping_add(ci * hw + 16 * p)) };
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: output channel oc0 + r's weight of input ci.
                    let w = _mm512_set1_ps(unsafe { *wr.add(r * so + ci * sc) });
                    for (a, &v) in a.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(w, v, *a);
                    }
                }
            }
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let o = out.wrapping_add((oc0 + r) * hw + q0);
            let b = _mm512_set1_ps(self.bias.map_or(0.0, |b| b[oc0 + r]));
            for (p, a) in a.iter_mut().enumerate() {
                // Summed as the other kernels' epilogues sum: (conv + bias) + initial output.
                let mut v = _mm512_add_ps(*a, b);
                if self.accumulate {
                    // SAFETY: the initialised output's unmasked lanes.
                    v = _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(mk[p], o.wrapping_add(16 * p)) }, v);
                }
                if let Some((lo, hi)) = self.clamp {
                    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
                }
                // SAFETY: the output's unmasked lanes of this block.
                unsafe { _mm512_mask_storeu_ps(o.wrapping_add(16 * p), mk[p], v) };
            }
        }
    }
}

/// Whether [`Split`]'s kernels run: AVX-512F present and neither `RELPROP_POINTWISE` nor
/// `RELPROP_SPLIT` is `off` (for A/B timing in one binary).
pub fn split_available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::avx512() && enabled() && super::switch_on(&ON, "RELPROP_SPLIT")
}

/// Products of one sample's 1×1 layer that take an input's two signs with their own weights, over
/// tiles of pixels, with LRP's epilogues in registers: `Σᵢ w⁺ᵢ·x⁺ᵢ + Σⱼ w⁻ⱼ·x⁻ⱼ` (z⁺ over inputs
/// of both signs) and its transposed product. The library's product needed `[x⁺; x⁻]` copied
/// out per tile, packed both operands per tile, and a pass each for the ratio and for the
/// multiply by the input.
pub struct Split<'a> {
    /// The sample's input, `[c, hw]`.
    pub x: &'a [f32],
    /// Pixels per channel.
    pub hw: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels.
    pub m: usize,
    /// `[w⁺ | w⁻]` `[m, c + s]`: w⁺ on every input channel, then w⁻ on the `s` channels that
    /// have negative values (x⁻ is zero on the others).
    pub w2: &'a [f32],
    /// Each input channel's column in `w2` of its w⁻, as [`Split::columns`] makes them (built once
    /// per layer, not per tile).
    pub wn: &'a [usize],
}

impl Split<'_> {
    /// The w⁻ columns of `c` input channels in `[w⁺ | w⁻]` whose w⁻ half holds the channels `neg`
    /// in order; a channel without negative values takes its w⁺ column (only its lanes with
    /// x < 0 read it, and it has none).
    pub fn columns(c: usize, neg: &[usize]) -> Vec<usize> {
        let mut wn: Vec<usize> = (0..c).collect();
        for (j, &i) in neg.iter().enumerate() {
            wn[i] = c + j;
        }
        wn
    }

    /// The stacked weights' row length, `c` plus the channels with negative values.
    fn k2(&self) -> usize {
        self.w2.len() / self.m.max(1)
    }

    /// Panics unless the kernels may run on these operands: `x` `[c, hw]`, `w2` `[m, k2]` with
    /// `k2` in `c..=2c`, every w⁻ column inside it, `cols` inside the plane.
    fn check(&self, cols: &std::ops::Range<usize>, what: &str) {
        let (c, m, hw, k2) = (self.c, self.m, self.hw, self.k2());
        assert!(split_available(), "the sign-split kernels need AVX-512F");
        assert!(
            self.x.len() == c * hw && self.w2.len() == m * k2 && (c..=2 * c).contains(&k2) && cols.end <= hw,
            "sign-split {what}: sizes"
        );
        assert!(self.wn.len() == c && self.wn.iter().all(|&j| j < k2), "sign-split {what}: w⁻ columns");
    }
    /// The stabilised ratios of the tile `cols`: `out[o, p] = r[o, p] / s(z[o, p] + bias[o, p])`,
    /// the bias one value per output channel (`m` of them) or per output (`m·hw`, a spatially
    /// varying one),
    /// `z` the sign-split product, `s(v) = v ± eps` with the sign of `v` (+ at 0, zennit's);
    /// `r` is the sample's `[m, hw]`, `out` the tile's `[m, cols.len()]`, written whole.
    ///
    /// # Panics
    /// Where a size disagrees or [`split_available`] is false.
    pub fn ratio(
        &self,
        cols: std::ops::Range<usize>,
        r: &[f32],
        bias: Option<&[f32]>,
        eps: f32,
        out: &mut [std::mem::MaybeUninit<f32>],
    ) {
        let (m, hw, tl) = (self.m, self.hw, cols.len());
        self.check(&cols, "ratio");
        assert!(r.len() == m * hw && out.len() == m * tl, "sign-split ratio: sizes");
        assert!(bias.is_none_or(|b| b.len() == m || b.len() == m * hw), "sign-split ratio: bias");
        #[cfg(target_arch = "x86_64")]
        for oc0 in (0..m).step_by(RO) {
            for q0 in cols.clone().step_by(COLS) {
                let n = COLS.min(cols.end - q0);
                let mk = [mask(n), mask(n.saturating_sub(16))];
                macro_rules! go {
                    ($($r:literal)*) => {
                        match (RO.min(m - oc0), n > 16) {
                            $(($r, false) => self.ratio_block::<$r, 1>(oc0, q0, cols.start, mk, r, bias, eps, out),
                              ($r, true) => self.ratio_block::<$r, 2>(oc0, q0, cols.start, mk, r, bias, eps, out),)*
                            _ => unreachable!("one to eight channels"),
                        }
                    };
                }
                // SAFETY: AVX-512F present (asserted); the sizes asserted above bound every
                // unmasked lane.
                unsafe { go!(1 2 3 4 5 6 7 8) }
            }
        }
    }

    /// The tile's relevance from its ratios `g` (`[m, cols.len()]`): for input channel i,
    /// `x⁺·Σₒ w⁺[o, i]·g[o] + x⁻·Σₒ w⁻[o, j]·g[o]` (j its place in `neg`), written at `out`, the
    /// sample's `[c, hw]` (this tile's columns only).
    ///
    /// # Panics
    /// Where a size disagrees or [`split_available`] is false.
    ///
    /// # Safety
    /// `out` must be valid for writes of the sample's `c·hw` elements and the tile's columns not
    /// written by anyone else during the call.
    pub unsafe fn vjp(&self, cols: std::ops::Range<usize>, g: &[f32], out: *mut f32) {
        let (c, m, tl) = (self.c, self.m, cols.len());
        self.check(&cols, "VJP");
        assert!(g.len() == m * tl, "sign-split VJP: ratios");
        #[cfg(target_arch = "x86_64")]
        for ic0 in (0..c).step_by(RI) {
            for q0 in cols.clone().step_by(COLS) {
                let n = COLS.min(cols.end - q0);
                let mk = [mask(n), mask(n.saturating_sub(16))];
                macro_rules! go {
                    ($($r:literal)*) => {
                        match (RI.min(c - ic0), n > 16) {
                            $(($r, false) => self.vjp_block::<$r, 1>(ic0, q0, cols.start, mk, g, out),
                              ($r, true) => self.vjp_block::<$r, 2>(ic0, q0, cols.start, mk, g, out),)*
                            _ => unreachable!("one to four channels"),
                        }
                    };
                }
                // SAFETY: AVX-512F present (asserted); the sizes asserted above bound every
                // unmasked lane, and `out` as the caller promises.
                unsafe { go!(1 2 3 4) }
            }
        }
    }

    /// Output channels `oc0..oc0 + R` of [`Split::ratio`] over the `P` vectors from pixel `q0`:
    /// `Σ w⁺·x⁺ + w⁻·x⁻` (one multiply-add per weight and lane on channels without negative
    /// values, two on the others), then the bias and the stabilised ratio.
    ///
    /// # Safety
    /// AVX-512F present; the channels and unmasked pixels exist.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn ratio_block<const R: usize, const P: usize>(
        &self,
        oc0: usize,
        q0: usize,
        c0: usize,
        mk: [u16; 2],
        r: &[f32],
        bias: Option<&[f32]>,
        eps: f32,
        out: &mut [std::mem::MaybeUninit<f32>],
    ) {
        use std::arch::x86_64::*;
        let (c, hw) = (self.c, self.hw);
        let k2 = self.k2();
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        let xq = self.x[q0..].as_ptr();
        let wr = self.w2[oc0 * k2..].as_ptr();
        let zero = _mm512_setzero_ps();
        for (ci, &wcol) in self.wn.iter().enumerate().take(c) {
            let (mut xp, mut xn) = ([zero; P], [zero; P]);
            for p in 0..P {
                // SAFETY: channel ci's unmasked pixels from q0.
                let x = unsafe { _mm512_maskz_loadu_ps(mk[p], xq.wrapping_add(ci * hw + 16 * p)) };
                xp[p] = _mm512_max_ps(x, zero);
                xn[p] = _mm512_min_ps(x, zero);
            }
            if wcol == ci {
                // No negative values: x⁺ alone.
                for (o, a) in acc.iter_mut().enumerate() {
                    // SAFETY: output channel oc0 + o's w⁺ of input ci.
                    let wp = unsafe { _mm512_set1_ps(*wr.add(o * k2 + ci)) };
                    for p in 0..P {
                        a[p] = _mm512_fmadd_ps(wp, xp[p], a[p]);
                    }
                }
                continue;
            }
            for (o, a) in acc.iter_mut().enumerate() {
                // SAFETY: output channel oc0 + o's w⁺ and w⁻ of input ci.
                let (wp, wq) =
                    unsafe { (_mm512_set1_ps(*wr.add(o * k2 + ci)), _mm512_set1_ps(*wr.add(o * k2 + wcol))) };
                for p in 0..P {
                    a[p] = _mm512_fmadd_ps(wq, xn[p], _mm512_fmadd_ps(wp, xp[p], a[p]));
                }
            }
        }
        let tl = out.len() / self.m;
        let e = _mm512_set1_ps(eps);
        for (o, a) in acc.iter().enumerate() {
            let b = bias.filter(|b| b.len() == self.m).map_or(0.0, |b| b[oc0 + o]);
            let b = _mm512_set1_ps(b);
            let plane = bias.filter(|b| b.len() != self.m);
            for (p, &a) in a.iter().enumerate() {
                let b = match plane {
                    // SAFETY: output channel oc0 + o's unmasked pixels of the bias plane.
                    Some(bp) => unsafe {
                        _mm512_maskz_loadu_ps(mk[p], bp.as_ptr().wrapping_add((oc0 + o) * hw + q0 + 16 * p))
                    },
                    None => b,
                };
                let z = _mm512_add_ps(a, b);
                // z + eps where z ≥ 0, z − eps elsewhere.
                let nonneg = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(z, zero);
                let s = _mm512_mask_add_ps(_mm512_sub_ps(z, e), nonneg, z, e);
                // SAFETY: output channel oc0 + o's unmasked pixels of the tile.
                unsafe {
                    let rv = _mm512_maskz_loadu_ps(mk[p], r.as_ptr().wrapping_add((oc0 + o) * hw + q0 + 16 * p));
                    let dst = (out.as_mut_ptr() as *mut f32).wrapping_add((oc0 + o) * tl + q0 - c0 + 16 * p);
                    // Masked lanes divide zero by a stabilised zero: finite, and not stored.
                    _mm512_mask_storeu_ps(dst, mk[p], _mm512_div_ps(rv, s));
                }
            }
        }
    }

    /// Input channels `ic0..ic0 + R` of [`Split::vjp`] over the `P` vectors from pixel `q0`: the
    /// sums over w⁺ and over w⁻, then `x⁺·Σw⁺g + x⁻·Σw⁻g` (a per-lane choice of w⁺ or w⁻ by the
    /// input's sign, one sum instead of two, ran 10–15 % slower: the blend per weight and lane
    /// cost what it saved).
    ///
    /// # Safety
    /// AVX-512F present; the channels and unmasked pixels exist; `out` as [`Split::vjp`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn vjp_block<const R: usize, const P: usize>(
        &self,
        ic0: usize,
        q0: usize,
        c0: usize,
        mk: [u16; 2],
        g: &[f32],
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let (hw, m) = (self.hw, self.m);
        let k2 = self.k2();
        let tl = g.len() / m;
        let zero = _mm512_setzero_ps();
        let mut accp = [[zero; P]; R];
        let mut accn = [[zero; P]; R];
        let wcol: [usize; R] = std::array::from_fn(|r| self.wn[ic0 + r]);
        let gq = g[q0 - c0..].as_ptr();
        for o in 0..m {
            let mut gv = [zero; P];
            for (p, v) in gv.iter_mut().enumerate() {
                // SAFETY: output channel o's unmasked ratios of the tile.
                *v = unsafe { _mm512_maskz_loadu_ps(mk[p], gq.wrapping_add(o * tl + 16 * p)) };
            }
            let wr = self.w2[o * k2..].as_ptr();
            for r in 0..R {
                // SAFETY: row o's w⁺ of channel ic0 + r and its w⁻ column.
                let (wp, wq) = unsafe { (_mm512_set1_ps(*wr.add(ic0 + r)), _mm512_set1_ps(*wr.add(wcol[r]))) };
                for p in 0..P {
                    accp[r][p] = _mm512_fmadd_ps(wp, gv[p], accp[r][p]);
                    accn[r][p] = _mm512_fmadd_ps(wq, gv[p], accn[r][p]);
                }
            }
        }
        for r in 0..R {
            for p in 0..P {
                // SAFETY: channel ic0 + r's unmasked pixels, as the caller promises.
                unsafe {
                    let at = (ic0 + r) * hw + q0 + 16 * p;
                    let x = _mm512_maskz_loadu_ps(mk[p], self.x.as_ptr().wrapping_add(at));
                    let v = _mm512_fmadd_ps(
                        _mm512_max_ps(x, zero),
                        accp[r][p],
                        _mm512_mul_ps(_mm512_min_ps(x, zero), accn[r][p]),
                    );
                    _mm512_mask_storeu_ps(out.wrapping_add(at), mk[p], v);
                }
            }
        }
    }
}

/// Input channels per register block of [`Split::vjp`] (each holds its inputs and its sums).
const RI: usize = 4;

/// The lanes of a vector that hold the first `n` of its sixteen pixels.
fn mask(n: usize) -> u16 {
    if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel against a float64 sum, over widths with and without a partial last vector,
    /// channel counts with partial register blocks, bias, clamp, an initial output, two terms
    /// and kernels read transposed.
    #[test]
    fn equals_the_direct_sum() {
        let g0 = ConvGeom {
            n: 1,
            c: 3,
            m: 3,
            h: 1,
            w: 1,
            kh: 1,
            kw: 1,
            stride: [1, 1],
            pads: [0; 4],
            dilation: [1, 1],
            group: 1,
        };
        if !applies::<f32>(&g0) {
            return;
        }
        // The last two: channel blocks split over threads on a one-run plane; a deep layer on a
        // plane large enough for its weights.
        let shapes = [
            (16, 96, 12, 12),
            (5, 11, 7, 7),
            (64, 9, 3, 5),
            (1, 1, 1, 1),
            (24, 17, 17, 16),
            (8, 1030, 6, 6),
            (130, 16, 8, 8),
        ];
        for &(c, m, h, w) in &shapes {
            let g = ConvGeom { c, m, h, w, ..g0 };
            assert!(applies::<f32>(&g), "{g:?}");
            let hw = h * w;
            let x: Vec<f32> = (0..c * hw).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03).collect();
            let x2: Vec<f32> = (0..c * hw).map(|i| ((i * 41 % 97) as f32 - 48.0) * 0.02).collect();
            let wt: Vec<f32> = (0..m * c).map(|i| ((i * 53 % 89) as f32 - 44.0) * 0.02).collect();
            let wt2: Vec<f32> = (0..m * c).map(|i| ((i * 29 % 83) as f32 - 41.0) * 0.03).collect();
            let bias: Vec<f32> = (0..m).map(|i| i as f32 * 0.1 - 0.4).collect();
            let init: Vec<f32> = (0..m * hw).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let cases = [
                (false, None, false, 1, false),
                (true, Some((0.0, 0.6)), false, 1, false),
                (true, None, true, 1, false),
                (false, None, false, 2, true),
                (true, Some((-0.5, 0.5)), true, 2, false),
            ];
            for (use_bias, clamp, acc, nt, transposed) in cases {
                let mut out = if acc { init.clone() } else { vec![f32::NAN; m * hw] };
                let b = use_bias.then_some(&bias[..]);
                let terms: [(&[f32], &[f32]); 2] = [(&x, &wt), (&x2, &wt2)];
                // SAFETY: applies holds; out holds m·hw initialised values.
                unsafe { sample(&g, &terms[..nt], transposed, b, clamp, out.as_mut_ptr(), acc, Threads::Pool) };
                // Weight (o, ci): [m, c], or transposed [c, m].
                let at = |w: &[f32], o: usize, ci: usize| w[if transposed { ci * m + o } else { o * c + ci }] as f64;
                for o in 0..m {
                    for p in 0..hw {
                        let mut s: f64 = (0..nt)
                            .map(|t| {
                                let (x, w) = terms[t];
                                (0..c).map(|ci| at(w, o, ci) * x[ci * hw + p] as f64).sum::<f64>()
                            })
                            .sum();
                        s += b.map_or(0.0, |b| b[o] as f64);
                        if acc {
                            s += init[o * hw + p] as f64;
                        }
                        if let Some((lo, hi)) = clamp {
                            s = s.clamp(lo as f64, hi as f64);
                        }
                        let got = out[o * hw + p] as f64;
                        assert!((got - s).abs() <= 1e-4 * (1.0 + s.abs()), "c {c} m {m} out ({o}, {p}): {got} vs {s}");
                    }
                }
            }
        }
    }

    /// [`Split`]'s ratio and VJP against float64 sums, with every channel signed and with a
    /// subset (x⁻ zero elsewhere), a bias per channel and per output, tiles with partial vectors.
    #[test]
    fn split_kernels_equal_the_sums() {
        if !split_available() {
            return;
        }
        let (c, m, hw) = (11, 10, 45);
        let val = |i: usize, k: usize| ((i * k % 97) as f32 - 48.0) * 0.021;
        let x_all: Vec<f32> = (0..c * hw).map(|i| val(i, 37)).collect();
        let r: Vec<f32> = (0..m * hw).map(|i| val(i, 41)).collect();
        let w: Vec<f32> = (0..m * c).map(|i| val(i, 53)).collect();
        let bias_c: Vec<f32> = (0..m).map(|i| 0.05 * i as f32).collect();
        let bias_p: Vec<f32> = (0..m * hw).map(|i| val(i, 29).abs()).collect();
        for neg in [(0..c).collect::<Vec<usize>>(), vec![1, 4, 10]] {
            // Channels outside `neg` are non-negative.
            let x: Vec<f32> =
                x_all.iter().enumerate().map(|(i, &v)| if neg.contains(&(i / hw)) { v } else { v.abs() }).collect();
            let k2 = c + neg.len();
            let mut w2 = vec![0.0f32; m * k2];
            for o in 0..m {
                for i in 0..c {
                    w2[o * k2 + i] = w[o * c + i].max(0.0);
                }
                for (j, &i) in neg.iter().enumerate() {
                    w2[o * k2 + c + j] = w[o * c + i].min(0.0);
                }
            }
            let wn = Split::columns(c, &neg);
            let k = Split { x: &x, hw, c, m, w2: &w2, wn: &wn };
            for bias in [&bias_c[..], &bias_p[..]] {
                for cols in [0..hw, 3..40, 17..18] {
                    let tl = cols.len();
                    let mut g = vec![std::mem::MaybeUninit::new(f32::NAN); m * tl];
                    k.ratio(cols.clone(), &r, Some(bias), 0.3, &mut g);
                    // SAFETY: ratio wrote every element.
                    let g: Vec<f32> = g.iter().map(|v| unsafe { v.assume_init() }).collect();
                    let mut out = vec![f32::NAN; c * hw];
                    // SAFETY: out holds the sample's c·hw elements.
                    unsafe { k.vjp(cols.clone(), &g, out.as_mut_ptr()) };
                    for (t, p) in cols.clone().enumerate() {
                        let mut want = vec![0.0f64; c];
                        for o in 0..m {
                            let share = |i: usize| {
                                let (xv, wv) = (x[i * hw + p] as f64, w[o * c + i] as f64);
                                xv.max(0.0) * wv.max(0.0) + xv.min(0.0) * wv.min(0.0)
                            };
                            let b = if bias.len() == m { bias[o] } else { bias[o * hw + p] } as f64;
                            let z = (0..c).map(share).sum::<f64>() + b;
                            let gv = r[o * hw + p] as f64 / if z >= 0.0 { z + 0.3 } else { z - 0.3 };
                            let got = g[o * tl + t] as f64;
                            assert!((got - gv).abs() <= 1e-4 * (1.0 + gv.abs()), "ratio ({o}, {p}): {got} vs {gv}");
                            (0..c).for_each(|i| want[i] += share(i) * gv);
                        }
                        for (i, &wv) in want.iter().enumerate() {
                            let got = out[i * hw + p] as f64;
                            assert!((got - wv).abs() <= 1e-4 * (1.0 + wv.abs()), "vjp ({i}, {p}): {got} vs {wv}");
                        }
                    }
                    // Only the tile's columns are written.
                    assert!(out.iter().enumerate().all(|(i, v)| cols.contains(&(i % hw)) != v.is_nan()));
                }
            }
        }
    }
}
