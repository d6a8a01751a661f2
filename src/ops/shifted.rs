//! Stride-1 convolution as one matrix product per tap over shifted views of the padded input,
//! without im2col.
//!
//! With the input zero-padded to `hp × wp` planes and the output computed on a grid `oh` rows of
//! `wp` columns (the last `wp − ow` columns of each row are discarded), tap `(ki, kj)` reads every
//! input plane at one fixed offset `ki·d·wp + kj·d` from the output position: a plain strided
//! matrix, so `y = Σ_taps W_tap · shift_tap(x)` is nine products (3×3) with the input's channels
//! as their inner axis. im2col writes and re-reads nine copies of the input; here the products
//! read one, at the cost of `wp / ow` more columns. It pays where the weights are small beside the
//! activations (see [`applies`]): DenseNet-121's 3×3 128→32 layers, ResNet-50's 128-channel
//! 14×14 ones; where the Winograd kernel applies it is faster still.
//!
//! The register kernel drops the padding columns where the output is at most as wide as the
//! input: planes padded above and below only, a grid `w` wide, and the lanes whose tap would read
//! past their row's ends (the padding) masked off.
//!
//! The output is computed in blocks of columns, all taps of a block before the next, so that the
//! block's sums stay in cache between products; a block's finished rows are then written to the
//! output with bias, initial output and clamp. In f32 with AVX-512F the products are instead one
//! hand-written kernel ([`Registers`]) that keeps a block's sums in registers over every channel
//! and tap: the matrix product per tap packed its weights per sample and wrote its sums back per
//! tap, which the library's product cannot be told to skip.

use super::conv::ConvGeom;
use super::gemm::{Mat, SendPtr, Threads, matmul_raw};
use crate::tensor::Float;
use rayon::prelude::*;

/// Output columns (of the `oh × wp` grid) per block: the block's sums for 32–64 output channels
/// and its slice of a 128-channel input stay within the second-level cache.
const BLOCK: usize = 1024;

/// Whether the shifted products apply to `g`: one group, stride 1, a kernel larger than 1×1,
/// enough input channels that each product has an inner axis worth the call (stems with three
/// channels take the direct kernel or im2col), and weights at most eight times the input's size
/// (`kh·kw·m ≤ 8·h·w`). Each product packs its tap's weights from the kernel's layout, a strided
/// read, per sample: ResNet-50's 256-channel 14×14 and 512-channel 7×7 layers (weights 12× and
/// 94× their inputs) ran 1.07–1.13× their im2col time, its 128-channel 14×14 ones (6×) 0.77×,
/// DenseNet-121's 128→32 layers 0.56–0.9× (`convbench`, batches 1 and 8, `RELPROP_SHIFTED=off`
/// alternated). The register-blocked kernel packs nothing and takes weights up to 24 times the
/// input: ResNet-50's 256-channel 14×14 layers ran 0.92× their im2col time, its 512-channel 7×7
/// ones 1.28× (a 7×9 grid is 63 columns in tiles of 48).
pub(super) fn applies<T: Float>(g: &ConvGeom) -> bool {
    g.group == 1
        && g.stride == [1, 1]
        && g.kh * g.kw > 1
        && g.c >= 16
        && g.kh * g.kw * g.m <= if registers::<T>() { 24 } else { 8 } * g.h * g.w
        && enabled()
}

/// Whether the shifted products run at all: `RELPROP_SHIFTED=off` sends their layers to im2col
/// (for A/B timing in one binary).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::switch_on(&ON, "RELPROP_SHIFTED")
}

/// One sample's convolution, summed over `terms` of (input `[c, h, w]`, kernel): writes
/// `[m, oh, ow]` at `out`, adding onto what is there when `accumulate`, with `bias` added and the
/// result clamped to `clamp`. Kernels are `[m, c, kh, kw]`, or with `transposed` the forward kernel
/// `[c, m, kh, kw]` of a layer whose input VJP this is (read flipped and transposed in place).
///
/// # Safety
/// `out` must be valid for writes of `m·oh·ow` elements, not aliased during the call, and
/// initialised when `accumulate` (it may be uninitialised otherwise: every element is written).
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
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    let (c, m, h, w) = (g.c, g.m, g.h, g.w);
    let [pt, pl, pb, pr] = g.pads;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    let plane = hp * wp;
    let [dh, dw] = g.dilation;
    let kk = g.kh * g.kw;
    assert!(!terms.is_empty(), "at least one term");
    // Layers at most as wide out as in ("same" ones) in the register kernel: planes without
    // padding columns, the grid `w` wide (its last `w − ow` columns discarded), the taps' reads
    // past a row's ends masked off (see `Registers::wrap`). With padding columns the grid
    // computed `wp / ow` times the outputs: 16/14 on 14×14 planes, 9/7 on 7×7 ones. Where the
    // padding is under a sixteenth of the row it does not pay: the per-column masks and the
    // rows' alignment cost 56×56 layers 1–3 % (`convbench`, one thread), more than their 58/56.
    let compact = registers::<T>() && pl + pr <= (g.kw - 1) * dw && 16 * (pl + pr) >= w && g.kw <= KW_MAX;
    if compact {
        let plane = hp * w;
        let xps: Vec<Vec<T>> = terms
            .iter()
            .map(|(x, wt)| {
                assert_eq!(x.len(), c * h * w, "input size");
                assert_eq!(wt.len(), kk * m * c, "kernel size");
                // [pl zeros][c planes of pt zero rows, the input's h rows, pb zero rows][pr zeros]:
                // tap (ki, kj) of grid column q reads plane slot q + ki·d·w + kj·d − pl, at
                // buffer offset q + ki·d·w + kj·d from the plane's start less pl.
                let len = pl + c * plane + pr;
                let mut xp: Vec<T> = Vec::with_capacity(len);
                let buf = &mut xp.spare_capacity_mut()[..len];
                let zero = |d: &mut [std::mem::MaybeUninit<T>]| {
                    d.iter_mut().for_each(|v| {
                        v.write(T::zero());
                    })
                };
                let (head, rest) = buf.split_at_mut(pl);
                let (planes, tail) = rest.split_at_mut(c * plane);
                zero(head);
                zero(tail);
                let fill = |(d, src): (&mut [std::mem::MaybeUninit<T>], &[T])| {
                    let (top, rest) = d.split_at_mut(pt * w);
                    let (mid, bottom) = rest.split_at_mut(h * w);
                    zero(top);
                    mid.write_copy_of_slice(src);
                    zero(bottom);
                };
                if threads == Threads::Pool && c * plane >= 1 << 15 {
                    planes.par_chunks_mut(plane).zip(x.par_chunks_exact(h * w)).for_each(fill);
                } else {
                    planes.chunks_mut(plane).zip(x.chunks_exact(h * w)).for_each(fill);
                }
                // SAFETY: the head, every plane's slots and the tail were written above.
                unsafe { xp.set_len(len) };
                xp
            })
            .collect();
        #[cfg(target_arch = "x86_64")]
        {
            let shifts = std::array::from_fn(|kj| (kj * dw) as isize - pl as isize);
            let grid = Grid { width: w, plane, wrap: Some((w, shifts)) };
            // SAFETY: registers() holds (f32, AVX-512F); `out` as the caller promises; the grid's
            // rows are w ≥ ow wide, the planes built above as `Grid` describes.
            unsafe { registers_sample(g, terms, &xps, &grid, transposed, bias, clamp, out, accumulate, threads) };
            return;
        }
    }
    // The last tap's view of the last plane runs (kw − 1)·d past it; those values reach only the
    // discarded columns, but must exist.
    let xps: Vec<Vec<T>> = terms
        .iter()
        .map(|(x, wt)| {
            assert_eq!(x.len(), c * h * w, "input size");
            assert_eq!(wt.len(), kk * m * c, "kernel size");
            // In one pass, zeros only where there is padding (zeroing all, then copying the
            // rows in, wrote the input twice); planes split over the pool at batch 1 (one thread
            // copying while the other waited was 5 % of DenseNet-121's 3×3 layers).
            let pad_plane = |src: &[T], dst: &mut [std::mem::MaybeUninit<T>]| {
                let zero = |d: &mut [std::mem::MaybeUninit<T>]| {
                    d.iter_mut().for_each(|v| {
                        v.write(T::zero());
                    })
                };
                let (top, rest) = dst.split_at_mut(pt * wp);
                zero(top);
                for (row, d) in src.chunks_exact(w).zip(rest.chunks_exact_mut(wp)) {
                    zero(&mut d[..pl]);
                    d[pl..pl + w].write_copy_of_slice(row);
                    zero(&mut d[pl + w..]);
                }
                zero(&mut rest[h * wp..]);
            };
            let len = c * plane + (g.kw - 1) * dw;
            let mut xp: Vec<T> = Vec::with_capacity(len);
            let (planes, tail) = xp.spare_capacity_mut()[..len].split_at_mut(c * plane);
            tail.iter_mut().for_each(|v| {
                v.write(T::zero());
            });
            if threads == Threads::Pool && c * plane >= 1 << 15 {
                planes.par_chunks_mut(plane).zip(x.par_chunks_exact(h * w)).for_each(|(d, s)| pad_plane(s, d));
            } else {
                planes.chunks_mut(plane).zip(x.chunks_exact(h * w)).for_each(|(d, s)| pad_plane(s, d));
            }
            // SAFETY: every plane's hp·wp slots and the tail were written above.
            unsafe { xp.set_len(len) };
            debug_assert_eq!(xp.len(), c * plane + (g.kw - 1) * dw);
            xp
        })
        .collect();
    let np = oh * wp;
    let workers = if threads == Threads::Pool { rayon::current_num_threads().max(1) } else { 1 };
    #[cfg(target_arch = "x86_64")]
    if registers::<T>() && g.kw <= KW_MAX {
        // SAFETY: registers() holds (f32, AVX-512F); `out` as the caller promises; the padded
        // planes built above as `Grid` describes.
        let grid = Grid { width: wp, plane, wrap: None };
        unsafe { registers_sample(g, terms, &xps, &grid, transposed, bias, clamp, out, accumulate, threads) };
        return;
    }
    // Blocks of grid columns, at least one per thread, on 16-column boundaries that keep the
    // products' vector tails at the blocks' ends. (Splitting the output channels instead pays
    // only where they outnumber the columns, which the weight bound in `applies` rules out for
    // 3×3 kernels.)
    let blocks = np.div_ceil(BLOCK).max(workers).min(np.div_ceil(16));
    let step = np.div_ceil(blocks).div_ceil(16) * 16;
    let blocks = np.div_ceil(step);
    let op = SendPtr(out);
    let block = |bi: usize| {
        let (lo, hi) = (bi * step, ((bi + 1) * step).min(np));
        let len = hi - lo;
        let mut acc: Vec<T> = Vec::with_capacity(m * len);
        let mut first = true;
        for ((_, wt), xp) in terms.iter().zip(&xps) {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let t = ki * g.kw + kj;
                    // Tap t's m × c matrix, read in place from the kernel.
                    let a = if transposed {
                        Mat { data: &wt[kk - 1 - t..], rs: kk, cs: m * kk }
                    } else {
                        Mat { data: &wt[t..], rs: c * kk, cs: kk }
                    };
                    let b = Mat { data: &xp[ki * dh * wp + kj * dw + lo..], rs: plane, cs: 1 };
                    // SAFETY: `acc` has capacity m·len; the first product writes all of it
                    // before any later one reads it (they accumulate).
                    unsafe { matmul_raw(m, len, c, a, b, acc.as_mut_ptr(), m * len, len, !first, Threads::One, None) };
                    first = false;
                }
            }
        }
        // SAFETY: written by the first product above.
        unsafe { acc.set_len(m * len) };
        let op = &op;
        // The block's columns lie in output rows lo / wp ..= (hi − 1) / wp; each row's first ow
        // columns are outputs.
        for oy in lo / wp..=(hi - 1) / wp {
            let (c0, c1) = ((oy * wp).max(lo), (oy * wp + ow).min(hi));
            if c0 >= c1 {
                continue;
            }
            for mi in 0..m {
                let src = &acc[mi * len + c0 - lo..mi * len + c1 - lo];
                let b = bias.map_or(T::zero(), |b| b[mi]);
                // SAFETY: outputs (mi, oy, c0 − oy·wp ..) of this sample; blocks cover disjoint
                // columns, so no two write the same element.
                unsafe { store(op.0.add(mi * oh * ow + oy * ow + c0 - oy * wp), src, b, clamp, accumulate) };
            }
        }
    };
    if blocks > 1 && threads == Threads::Pool {
        (0..blocks).into_par_iter().for_each(block);
    } else {
        (0..blocks).for_each(block);
    }
}

/// How [`registers_sample`]'s input planes are laid out: rows `width` long (the grid's width),
/// `plane` values per channel, and, for planes without padding columns, the row length and the
/// kernel columns' shifts (see [`Registers::wrap`]).
#[cfg(target_arch = "x86_64")]
struct Grid {
    width: usize,
    plane: usize,
    wrap: Option<(usize, [isize; KW_MAX])>,
}

/// One sample's stride-1 convolution in the register kernel, over each term's input planes
/// `xps` laid out as `grid` says (see [`sample`], whose arguments the others are).
///
/// # Safety
/// f32 with AVX-512F ([`registers`]); `out` as [`sample`] requires; `xps` as `grid` describes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn registers_sample<T: Float>(
    g: &ConvGeom,
    terms: &[(&[T], &[T])],
    xps: &[Vec<T>],
    grid: &Grid,
    transposed: bool,
    bias: Option<&[T]>,
    clamp: Option<(T, T)>,
    out: *mut T,
    accumulate: bool,
    threads: Threads,
) {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    let (c, m, kk) = (g.c, g.m, g.kh * g.kw);
    let [dh, dw] = g.dilation;
    let width = grid.width;
    let f = |v: &[T]| {
        // SAFETY: T is f32 (the caller's contract).
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const f32, v.len()) }
    };
    let kk_off: Vec<usize> = (0..g.kh).flat_map(|ki| (0..g.kw).map(move |kj| ki * dh * width + kj * dw)).collect();
    // Weight (oc, ic, tap t) at oc·so + ic·sc + toff[t]: the kernel [m, c, kh, kw], or the
    // forward kernel [c, m, kh, kw] of a VJP read flipped and transposed.
    let (so, sc) = if transposed { (kk, m * kk) } else { (c * kk, kk) };
    let toff: Vec<usize> = (0..kk).map(|t| if transposed { kk - 1 - t } else { t }).collect();
    let rows: Vec<usize> = (0..g.kh).map(|ki| ki * dh * width).collect();
    let ts: Vec<Term> = terms
        .iter()
        .zip(xps)
        .map(|((_, wt), xp)| Term { x: f(xp), w: f(wt), offs: &kk_off, toff: &toff, rows: &rows })
        .collect();
    let k = Registers { ts: &ts, c, m, plane: grid.plane, np: oh * width, so, sc, kh: g.kh, kw: g.kw, wrap: grid.wrap };
    let bias: Option<Vec<f32>> = bias.map(|b| b.iter().map(|v| v.f64() as f32).collect());
    let clamp = clamp.map(|(lo, hi)| (lo.f64() as f32, hi.f64() as f32));
    let workers = if threads == Threads::Pool { rayon::current_num_threads().max(1) } else { 1 };
    // SAFETY: AVX-512F present; `out` as the caller promises, T being f32.
    unsafe { k.run(out as *mut f32, oh, ow, width, bias.as_deref(), clamp, accumulate, workers) };
}

/// Whether a stride-2 convolution takes the register kernel over its input's four phases (see
/// [`sample_stride2`]): f32 with AVX-512F, one group, no dilation, at least 16 input channels,
/// weights at most 24 times the output plane (as [`applies`] bounds them by the input plane) and
/// within L2 (each tile of columns reads them all: ResNet-50's 256-channel 28→14 layer, 2.4 MB
/// of weights, ran even with im2col, its 128-channel 56→28 one 0.84×; one thread, per-node
/// profiles alternated).
pub(super) fn applies_stride2<T: Float>(g: &ConvGeom) -> bool {
    registers::<T>()
        && g.group == 1
        && g.stride == [2, 2]
        && g.dilation == [1, 1]
        && g.kh * g.kw > 1
        && g.kw <= KW_MAX
        && g.c >= 16
        && g.out_hw().is_some_and(|(oh, ow)| g.kh * g.kw * g.m <= 24 * oh * ow)
        && weights_fit_l2(g)
        && enabled()
}

/// One sample's stride-2 convolution as stride-1 shifted products over the input's four phases:
/// phase (p, q) holds the padded input's rows p, p + 2, … and columns q, q + 2, …, and output
/// (i, j) sums tap (ki, kj) of phase (ki mod 2, kj mod 2) at (i + ki/2, j + kj/2). Each tap reads
/// one phase, so with a channel's four phases side by side the register kernel reads them as one
/// plane with nine taps at their own offsets and wastes no multiply; im2col wrote and re-read nine
/// patches per output (ResNet-50's stride-2 3×3 layers ran 1.3–1.5× onnxruntime's time that way,
/// one thread, per-node profiles). Arguments as [`sample`] with one term.
///
/// # Safety
/// As [`sample`]; [`applies_stride2`] holds for `g`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sample_stride2<T: Float>(
    g: &ConvGeom,
    x: &[T],
    wt: &[T],
    bias: Option<&[T]>,
    clamp: Option<(T, T)>,
    out: *mut T,
    accumulate: bool,
    threads: Threads,
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(applies_stride2::<T>(g), "stride-2 register kernel on {g:?}");
        let (oh, ow) = g.out_hw().expect("geometry checked by caller");
        let (c, m, h, w, kk) = (g.c, g.m, g.h, g.w, g.kh * g.kw);
        assert_eq!(x.len(), c * h * w, "input size");
        assert_eq!(wt.len(), kk * m * c, "kernel size");
        let [pt, pl, ..] = g.pads;
        // SAFETY: T is f32 (applies_stride2 checked it).
        let (x, wf) = unsafe {
            (
                std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()),
                std::slice::from_raw_parts(wt.as_ptr() as *const f32, wt.len()),
            )
        };
        // Phase planes: the rows and columns the taps read for the outputs, the grid `wq` wide,
        // the four phases of a channel side by side, so that the kernel reads one channel's nine
        // taps as it reads a stride-1 layer's (four terms of one to four taps each ran 1.2× the
        // im2col time: the per-channel overhead outweighed the multiplies).
        let (hq, wq) = (oh + (g.kh - 1) / 2, ow + (g.kw - 1) / 2);
        let pq = hq * wq;
        let plane = 4 * pq;
        // The last tap of the grid's last column reads (kw − 1)/2 past the last plane.
        let len = c * plane + (g.kw - 1) / 2;
        // Uninitialised, every slot written once below: zeros where the phase reads padding (a zero
        // fill first wrote the whole buffer twice). Unit tests poison it first, so that a slot the
        // copy misses shows up as NaN in the outputs that read it.
        let mut xs: Vec<f32> = Vec::with_capacity(len);
        let buf = &mut xs.spare_capacity_mut()[..len];
        #[cfg(test)]
        buf.iter_mut().for_each(|v| {
            v.write(f32::NAN);
        });
        let zero = |d: &mut [std::mem::MaybeUninit<f32>]| {
            d.iter_mut().for_each(|v| {
                v.write(0.0);
            })
        };
        let fill = |(ci, d): (usize, &mut [std::mem::MaybeUninit<f32>])| {
            let src = &x[ci * h * w..(ci + 1) * h * w];
            for (ph, d) in d.chunks_exact_mut(pq).enumerate() {
                let (p, q) = (ph / 2, ph % 2);
                // Columns j whose padded column 2j + q is input column 2j + q − pl in 0..w.
                let j0 = pl.saturating_sub(q).div_ceil(2).min(wq);
                let j1 = (w + pl).saturating_sub(q).div_ceil(2).clamp(j0, wq);
                let from = (2 * j0 + q).saturating_sub(pl);
                // The copy below writes all of j0..j1 (zip stops at the shorter side).
                assert!(j0 == j1 || from + 2 * (j1 - j0 - 1) < w, "phase columns past the input row");
                for (i, row) in d.chunks_exact_mut(wq).enumerate() {
                    // Padded row 2i + p is input row 2i + p − pt.
                    let Some(r) = (2 * i + p).checked_sub(pt).filter(|&r| r < h) else {
                        zero(row);
                        continue;
                    };
                    let (left, rest) = row.split_at_mut(j0);
                    let (mid, right) = rest.split_at_mut(j1 - j0);
                    zero(left);
                    mid.iter_mut().zip(src[r * w + from.min(w)..(r + 1) * w].iter().step_by(2)).for_each(|(d, &v)| {
                        d.write(v);
                    });
                    zero(right);
                }
            }
        };
        let (planes, tail) = buf.split_at_mut(c * plane);
        zero(tail);
        if threads == Threads::Pool && c * plane >= 1 << 15 {
            planes.par_chunks_mut(plane).enumerate().for_each(fill);
        } else {
            planes.chunks_mut(plane).enumerate().for_each(fill);
        }
        // SAFETY: every plane's slots (zeros or copies, row by row) and the tail were written.
        unsafe { xs.set_len(len) };
        // Tap (ki, kj) reads phase (ki mod 2, kj mod 2) at (ki/2, kj/2).
        let (mut offs, mut toff) = (Vec::new(), Vec::new());
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                offs.push(((ki % 2) * 2 + kj % 2) * pq + ki / 2 * wq + kj / 2);
                toff.push(ki * g.kw + kj);
            }
        }
        let rows: Vec<usize> = (0..4).flat_map(|ph| (0..g.kh.div_ceil(2)).map(move |r| ph * pq + r * wq)).collect();
        let ts = [Term { x: &xs, w: wf, offs: &offs, toff: &toff, rows: &rows }];
        let k = Registers { ts: &ts, c, m, plane, np: oh * wq, so: c * kk, sc: kk, kh: g.kh, kw: g.kw, wrap: None };
        let bias: Option<Vec<f32>> = bias.map(|b| b.iter().map(|v| v.f64() as f32).collect());
        let clamp = clamp.map(|(lo, hi)| (lo.f64() as f32, hi.f64() as f32));
        let workers = if threads == Threads::Pool { rayon::current_num_threads().max(1) } else { 1 };
        // SAFETY: AVX-512F present (applies_stride2); `out` as the caller promises, T being f32.
        unsafe { k.run(out as *mut f32, oh, ow, wq, bias.as_deref(), clamp, accumulate, workers) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "applies_stride2 is false off x86-64: {g:?} {x:p} {wt:p} {bias:?} {clamp:?} {out:p} {accumulate} {threads:?}"
    );
}

/// `dst = clamp(src + b [+ dst])` for `src.len()` elements.
///
/// # Safety
/// `dst` valid for writes of `src.len()` elements, initialised when `accumulate`.
#[inline]
unsafe fn store<T: Float>(dst: *mut T, src: &[T], b: T, clamp: Option<(T, T)>, accumulate: bool) {
    let f = |v: T| clamp.map_or(v, |(lo, hi)| super::elementwise::clamp(v, lo, hi));
    // SAFETY: within the caller's bound; read only when accumulating onto initialised memory.
    unsafe {
        if accumulate {
            for (i, &s) in src.iter().enumerate() {
                *dst.add(i) = f(*dst.add(i) + s + b);
            }
        } else {
            for (i, &s) in src.iter().enumerate() {
                dst.add(i).write(f(s + b));
            }
        }
    }
}

/// Whether the register-blocked kernel takes a forward convolution that the Winograd kernel
/// would: planes of at most 16 Winograd tiles (14×14 outputs), where the transforms are shared by
/// few products. At batch 8 (`convbench`, one thread per sample) ResNet-50's 256-channel 14×14
/// layers ran 0.78× their Winograd time, its 128-channel ones 0.63×, VGG-16's 512-channel ones
/// 0.93×. Also 28×28 planes (49 tiles) with at least 64 output channels and weights that stay in
/// L2: a model's forward runs sample by sample (see `graph::batch`), so the Winograd kernel
/// transforms the weights per sample and streams the transformed ones, four times the size, from
/// memory. ResNet-50's 128-channel 28×28 layers ran 0.90× (one thread and two, `convbench` at
/// batch 1), its forward 0.97× at batch 8 and 0.98× at batch 1; DenseNet-121's 128→32 ones ran
/// even and its forward 1.01× (they stay with Winograd), and VGG-16's 512-channel ones, whose
/// 9 MB of weights do not stay in cache, 1.25× at two threads. Likewise 56×56 planes (196 tiles):
/// ResNet-50's 64-channel layers ran 0.92× at batch 8 in `convbench` and even at batch 1, its
/// forward 0.97× at batch 8 and even at batch 1, gradient 0.97× and ε+♭ 0.96× at batch 8
/// (alternated rounds).
pub(super) fn beats_winograd<T: Float>(g: &ConvGeom) -> bool {
    registers::<T>()
        && applies::<T>(g)
        && g.out_hw().is_some_and(|(oh, ow)| {
            let tiles = oh.div_ceil(4) * ow.div_ceil(4);
            tiles <= 16 || (tiles <= 196 && g.m >= 64 && weights_fit_l2(g))
        })
}

/// Whether `g`'s f32 weights stay in a core's L2 cache (1 MiB) while the register kernel reads
/// them once per tile of columns.
fn weights_fit_l2(g: &ConvGeom) -> bool {
    g.c / g.group * g.m * g.kh * g.kw * 4 <= 1 << 20
}

/// Whether the register-blocked kernel takes an input VJP (`gv`: the VJP as a convolution of the
/// output gradient) ahead of the Winograd kernel and of im2col: planes of at most 16 Winograd
/// tiles, and of at most 49 (28×28) where the VJP reads at most 64 gradient channels. `convbench`,
/// against the earlier choice: DenseNet-121's 32→128 VJPs on 28×28 and 14×14 planes 0.85× and
/// 0.52× at batch 8 (Winograd), 0.75× and 1.0× at batch 1; ResNet-50's 14×14 ones 0.64×–0.82×
/// (Winograd at batch 8, im2col at batch 1); VGG-16's 512-channel 14×14 ones 0.89–0.93×.
/// DenseNet's 56×56 and ResNet-50's 128-channel 28×28 VJPs stay with Winograd.
pub(super) fn beats_winograd_vjp<T: Float>(gv: &ConvGeom) -> bool {
    registers::<T>()
        && applies::<T>(gv)
        && gv.out_hw().is_some_and(|(oh, ow)| {
            let tiles = oh.div_ceil(4) * ow.div_ceil(4);
            tiles <= 16 || (gv.c <= 64 && tiles <= 49)
        })
}

/// Whether the register-blocked kernel ([`Registers`]) runs: f32 with AVX-512F.
fn registers<T: Float>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && super::avx512() && registers_on()
}

/// Whether the register-blocked kernel may run (`RELPROP_SHIFTED=gemm` sends its layers to one matrix
/// product per tap, for A/B timing in one binary).
fn registers_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RELPROP_SHIFTED").map_or(true, |v| v != "gemm"))
}

/// Output channels per register block (`Registers::run` dispatches the remainders 1..7).
const RO: usize = 8;
const _: () = assert!(RO == 8, "Registers::run's dispatch covers blocks of up to eight channels");
/// Input channels ahead that the kernel prefetches weights for: inside a model a layer's weights
/// come from memory, and a VJP reads them flipped and transposed, runs of 8·9 values 9·c apart,
/// which the hardware prefetcher missed (ResNet-50's 256-channel 14×14 VJPs took 1.14 ms per node
/// in the model against 0.57 in `convbench`; 0.57 with the prefetch).
const WPF: usize = 4;
/// Vectors of sixteen grid columns per register block.
const RP: usize = 3;

/// The shifted products with the sums in registers (f32, AVX-512F): a block of `RO` output
/// channels by `RP`·16 grid columns accumulates every input channel and tap of every term before
/// it is stored, and reads the weights in place (a broadcast per output channel and tap), so
/// nothing is packed per call. The matrix product per tap packed its tap's weights per sample and
/// wrote and re-read the block's sums once per tap: DenseNet-121's 3×3 128→32 layers ran at 0.68
/// of the machine's peak multiply-adds that way, onnxruntime's direct kernels at 0.95.
#[cfg(target_arch = "x86_64")]
struct Registers<'a> {
    /// The terms summed.
    ts: &'a [Term<'a>],
    c: usize,
    m: usize,
    plane: usize,
    /// Grid columns (`oh·wp`).
    np: usize,
    /// The weights' strides per output and per input channel.
    so: usize,
    sc: usize,
    /// The kernel's size: the terms' taps are its rows and columns in order.
    kh: usize,
    kw: usize,
    /// For a grid without padding columns, its width and each kernel column's shift from the
    /// output column: a lane whose column plus the shift leaves `0..width` reads the next or the
    /// last row, and is masked off (the padding it stands for is zero).
    wrap: Option<(usize, [isize; KW_MAX])>,
}

/// The widest kernel whose layers the register kernel computes on a grid without padding columns.
const KW_MAX: usize = 8;

/// One term of [`Registers`]' sums: padded input planes, weights, and the taps that read them.
#[cfg(target_arch = "x86_64")]
struct Term<'a> {
    /// The padded input planes.
    x: &'a [f32],
    /// The weights.
    w: &'a [f32],
    /// Each tap's offset in the padded plane.
    offs: &'a [usize],
    /// Each tap's offset in the weights.
    toff: &'a [usize],
    /// Each kernel row's offset in the padded plane (for prefetching).
    rows: &'a [usize],
}

#[cfg(target_arch = "x86_64")]
impl Registers<'_> {
    /// Writes one sample's `[m, oh, ow]` outputs at `out` (adding onto them when `accumulate`),
    /// split over `workers` threads.
    ///
    /// # Safety
    /// AVX-512F present; `out` valid for `m·oh·ow` writes, initialised when `accumulate`, not
    /// aliased during the call; each term's padded input holds the grid's reads (as `sample`
    /// builds it).
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &self,
        out: *mut f32,
        oh: usize,
        ow: usize,
        wp: usize,
        bias: Option<&[f32]>,
        clamp: Option<(f32, f32)>,
        accumulate: bool,
        workers: usize,
    ) {
        const COLS: usize = RP * 16;
        let tiles = self.np.div_ceil(COLS);
        let ocb = self.m.div_ceil(RO);
        // Work items: runs of column tiles by runs of channel blocks. Columns where there are
        // many (each item then reads its inputs from its own cache), channel blocks where the
        // plane is small beside the weights (a 7×7 plane is one or two tiles).
        let (col_parts, oc_parts) = if workers == 1 {
            (1, 1)
        } else if tiles >= 4 * workers {
            (4 * workers, 1)
        } else {
            (tiles.min(workers), (4 * workers).div_ceil(tiles.min(workers)).min(ocb))
        };
        let col_per = tiles.div_ceil(col_parts);
        let oc_per = ocb.div_ceil(oc_parts);
        let col_parts = tiles.div_ceil(col_per);
        let oc_parts = ocb.div_ceil(oc_per);
        // Per column tile, the load masks of each kernel column's vectors: the tile's columns
        // that exist, less (on a grid without padding columns) the lanes whose tap falls outside
        // their row.
        // Serial, before the parallel items, so kept cheap: one division per tile (a division
        // per lane and kernel column cost a 56×56 layer ~3 %).
        let kw = self.kw.min(KW_MAX);
        let masks: Vec<[[u16; RP]; KW_MAX]> = (0..tiles)
            .map(|t| {
                let q0 = t * COLS;
                let mut mk = [[0u16; RP]; KW_MAX];
                let (width, shift) = self.wrap.unwrap_or((usize::MAX, [0; KW_MAX]));
                let mut col = q0 % width;
                for (l, q) in (q0..(q0 + COLS).min(self.np)).enumerate() {
                    for (kj, mk) in mk.iter_mut().enumerate().take(kw) {
                        let c = col as isize + shift[kj];
                        if c >= 0 && (c as usize) < width {
                            mk[l / 16] |= 1 << (l % 16);
                        }
                    }
                    debug_assert_eq!(col, q % width);
                    col += 1;
                    if col == width {
                        col = 0;
                    }
                }
                mk
            })
            .collect();
        let op = SendPtr(out);
        let item = |i: usize| {
            let (cp, opart) = (i % col_parts, i / col_parts);
            let op = &op;
            let mut tmp = [0.0f32; RO * COLS];
            for b in opart * oc_per..((opart + 1) * oc_per).min(ocb) {
                let oc0 = b * RO;
                let nr = RO.min(self.m - oc0);
                let span = cp * col_per..((cp + 1) * col_per).min(tiles);
                for (t, mk) in span.clone().zip(&masks[span]) {
                    let q0 = t * COLS;
                    let n = COLS.min(self.np - q0);
                    // Only the vectors that hold columns: a plane's last tile may need one of
                    // three (a 7×7 plane is 49 columns, tiles of 48 and 1).
                    macro_rules! go {
                        ($($r:literal)*) => {
                            match (nr.min(RO), n.div_ceil(16), self.wrap.is_some()) {
                                $(($r, 1, false) => self.tile::<$r, 1, false>(oc0, q0, mk, &mut tmp),
                                  ($r, 2, false) => self.tile::<$r, 2, false>(oc0, q0, mk, &mut tmp),
                                  ($r, _, false) => self.tile::<$r, RP, false>(oc0, q0, mk, &mut tmp),
                                  ($r, 1, true) => self.tile::<$r, 1, true>(oc0, q0, mk, &mut tmp),
                                  ($r, 2, true) => self.tile::<$r, 2, true>(oc0, q0, mk, &mut tmp),
                                  ($r, _, true) => self.tile::<$r, RP, true>(oc0, q0, mk, &mut tmp),)*
                                _ => unreachable!("one to eight channels"),
                            }
                        };
                    }
                    // SAFETY: AVX-512F present; columns q0..q0 + n of the grid and channels
                    // oc0..oc0 + nr exist (the reads past them are masked off).
                    unsafe { go!(1 2 3 4 5 6 7 8) }
                    // The tile's columns lie in output rows q0 / wp ..= (q0 + n − 1) / wp; each
                    // row's first ow columns are outputs.
                    for oy in q0 / wp..=(q0 + n - 1) / wp {
                        let (c0, c1) = ((oy * wp).max(q0), (oy * wp + ow).min(q0 + n));
                        if c0 >= c1 {
                            continue;
                        }
                        for r in 0..nr {
                            let src = &tmp[r * COLS + c0 - q0..r * COLS + c1 - q0];
                            let bv = bias.map_or(0.0, |b| b[oc0 + r]);
                            // SAFETY: outputs (oc0 + r, oy, c0 − oy·wp ..) of this sample; items
                            // cover disjoint channels × columns.
                            unsafe {
                                store(
                                    op.0.add((oc0 + r) * oh * ow + oy * ow + c0 - oy * wp),
                                    src,
                                    bv,
                                    clamp,
                                    accumulate,
                                )
                            };
                        }
                    }
                }
            }
        };
        let items = col_parts * oc_parts;
        if items > 1 {
            (0..items).into_par_iter().with_max_len(1).for_each(item);
        } else {
            item(0);
        }
    }

    /// Sums of `R` output channels from `oc0` over grid columns `q0..q0 + n` (n ≤ `RP`·16) into
    /// `tmp` ([R][RP·16]).
    ///
    /// # Safety
    /// AVX-512F present; the channels and columns exist.
    /// With `WRAP` (a grid without padding columns) each kernel column has its own masks; without
    /// it every tap takes the tile's (held in registers: loading a mask per tap and vector cost
    /// the 56×56 layers 8 %).
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const P: usize, const WRAP: bool>(
        &self,
        oc0: usize,
        q0: usize,
        masks: &[[u16; RP]; KW_MAX],
        tmp: &mut [f32; RO * RP * 16],
    ) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        let (kh, kw) = (self.kh, self.kw);
        debug_assert!(kw <= KW_MAX);
        for term in self.ts {
            debug_assert!(term.offs.len() == kh * kw && term.toff.len() == kh * kw);
            let (xp, wt) = (term.x, term.w);
            for ci in 0..self.c {
                // SAFETY: plane ci's grid columns from q0, and channel ci's weights of channels
                // oc0.. (the caller's bounds).
                let xc = unsafe { xp.as_ptr().add(ci * self.plane + q0) };
                let wc = unsafe { wt.as_ptr().add(oc0 * self.so + ci * self.sc) };
                if ci + 1 < self.c {
                    for &r in term.rows {
                        for l in 0..=RP {
                            // The next plane's rows under this tile (a prefetch does not fault).
                            _mm_prefetch::<_MM_HINT_T0>(xc.wrapping_add(self.plane + r + 16 * l) as *const i8);
                        }
                    }
                }
                if ci + WPF < self.c {
                    // The weights WPF channels ahead, from memory when the layer's weights are
                    // larger than the cache (a prefetch does not fault): one line per output
                    // channel, or every line of the block's run when they lie side by side (VJPs).
                    let ahead = wc.wrapping_add(WPF * self.sc);
                    if self.so < 16 {
                        for l in (0..R * self.so + 15).step_by(16) {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
                        }
                    } else {
                        for r in 0..R {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(r * self.so) as *const i8);
                        }
                    }
                }
                // Tap (o, tw, its kernel column's masks): the multiply-adds of its P vectors into
                // the R channels' sums (a macro: as a closure capturing the sums, they left the
                // registers).
                macro_rules! tap {
                    ($o:expr, $tw:expr, $mk:expr) => {{
                        let (o, tw, mk): (usize, usize, &[u16; RP]) = ($o, $tw, $mk);
                        let mut xv = [_mm512_setzero_ps(); P];
                        for (p, v) in xv.iter_mut().enumerate() {
                            // SAFETY: unmasked lanes read the grid's columns inside the tile and
                            // their rows (masked lanes are not read).
                            *v = unsafe { _mm512_maskz_loadu_ps(mk[p], xc.wrapping_add(o + 16 * p)) };
                        }
                        for (r, a) in acc.iter_mut().enumerate() {
                            // SAFETY: channel oc0 + r's weight of input ci, tap tw.
                            let w = _mm512_set1_ps(unsafe { *wc.add(r * self.so + tw) });
                            for (a, &v) in a.iter_mut().zip(&xv) {
                                *a = _mm512_fmadd_ps(w, v, *a);
                            }
                        }
                    }};
                }
                if WRAP {
                    for (offs, toff) in term.offs.chunks_exact(kw).zip(term.toff.chunks_exact(kw)) {
                        for ((&o, &tw), mk) in offs.iter().zip(toff).zip(masks) {
                            tap!(o, tw, mk);
                        }
                    }
                } else {
                    let mk = &masks[0];
                    for (&o, &tw) in term.offs.iter().zip(term.toff) {
                        tap!(o, tw, mk);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (p, &v) in a.iter().enumerate() {
                // SAFETY: inside tmp.
                unsafe { _mm512_storeu_ps(tmp.as_mut_ptr().add(r * RP * 16 + 16 * p), v) };
            }
        }
    }
}
