//! Winograd's minimal filtering F(4×4, 3×3) for 3×3 stride-1 convolutions (Lavin and Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016), f32 only.
//!
//! Each 6×6 input tile d and 3×3 kernel g give a 4×4 output tile Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A: 36
//! products per output tile and input/output channel pair instead of 144. Summed over input
//! channels, the 36 element-wise products become 36 matrix products, [out ch × in ch] by
//! [in ch × tiles], for the `gemm` crate. im2col + GEMM ran ResNet-50's 3×3 layers at 1.6–2.2×
//! onnxruntime's time (per-node profiles, batch 1), whose NCHWc direct kernels two hand-written
//! prototypes did not match; a quarter of the multiplications closes that gap instead.
//!
//! The transforms use the points 0, ±1, ±2 (coefficients up to 8), so rounding grows: on the
//! tests' data the largest error is about 8e-6 of the largest output, 17× the im2col path's. Sums
//! that are exactly zero in a direct convolution (a window of zeros) come out as rounding-sized
//! values. On the random-weight bench models, heatmaps moved against float64 by relative L2
//! 3e-6 to 3e-3 (the im2col path: 1e-4 to 5e-3; ReLU masks that flip with the rounding dominate
//! both); `RELPROP_WINOGRAD=off` restores the direct sums.

use super::conv::ConvGeom;
use super::gemm::{Mat, SendPtr, Threads, matmul_ld};
use crate::tensor::Float;
use rayon::prelude::*;
use std::ops::Range;

/// Tile side (4 outputs + 2).
const ALPHA: usize = 6;
/// Transformed elements per tile.
const XI: usize = ALPHA * ALPHA;
/// Outputs per tile side.
const M: usize = 4;

/// Bytes of transformed inputs and products per block of tiles: the block's matrix products then
/// read them from the 2 MB L2 cache instead of memory.
const BLOCK_BYTES: usize = 3 << 20;

/// Whether `RELPROP_WINOGRAD=off` switched the kernel off (exact direct sums, or A/B timing in one
/// binary).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::switch_on(&ON, "RELPROP_WINOGRAD")
}

/// The geometry of one Winograd convolution of one sample: `c` input planes `h`×`w`, `k` output
/// planes `oh`×`ow`, padding `pt`, `pl` at the top and left (the rest follows from the sizes).
#[derive(Clone, Copy, Debug)]
pub(super) struct Geom {
    c: usize,
    k: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    pt: usize,
    pl: usize,
}

impl Geom {
    fn tiles(&self) -> (usize, usize) {
        (self.oh.div_ceil(M), self.ow.div_ceil(M))
    }

    /// The forward convolution's geometry, when the kernel applies.
    pub(super) fn forward<T: Float>(g: &ConvGeom) -> Option<Geom> {
        Geom::of(g).filter(|geom| geom.pays::<T>(g.n) && !super::shifted::beats_winograd::<T>(g))
    }

    /// The forward geometry of a 3×3 stride-1 group-1 convolution, whether or not it pays.
    pub(super) fn of(g: &ConvGeom) -> Option<Geom> {
        let shape_ok = g.group == 1 && g.kh == 3 && g.kw == 3 && g.stride == [1, 1] && g.dilation == [1, 1];
        let (oh, ow) = g.out_hw()?;
        shape_ok.then_some(Geom { c: g.c, k: g.m, h: g.h, w: g.w, oh, ow, pt: g.pads[0], pl: g.pads[1] })
    }

    /// The input VJP's geometry: a 3×3 stride-1 convolution of the output gradient with the
    /// flipped, transposed kernel, padded by 2 − p on each side (so pads above 2 do not apply).
    pub(super) fn vjp<T: Float>(g: &ConvGeom) -> Option<Geom> {
        let fwd = Geom::of(g)?;
        if g.pads.iter().any(|&p| p > 2) {
            return None;
        }
        let geom =
            Geom { c: g.m, k: g.c, h: fwd.oh, w: fwd.ow, oh: g.h, ow: g.w, pt: 2 - g.pads[0], pl: 2 - g.pads[1] };
        geom.pays::<T>(g.n).then_some(geom)
    }

    /// f32, enough channels that the products are not all packing, and enough tiles in the
    /// batch (`n` samples) that the transformed weights, four times the kernel's size and written
    /// on every call, are shared by many products: with 16 tiles (a 14×14 plane) at batch 1 their
    /// 9.4 MB for 256 channels cost more than the products saved. And at least half as many
    /// output channels as input ones: the input transform, per input channel, is shared by
    /// fewer products otherwise (DenseNet's 128→32 layers ran 1.0–1.25× their im2col time in
    /// `convbench` on the AMD EPYC machine, while their VJPs, 32→128, ran 0.5–0.9×).
    pub(super) fn pays<T: Float>(&self, n: usize) -> bool {
        let (th, tw) = self.tiles();
        std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && enabled()
            && self.c >= 16
            && self.k >= 16
            && 2 * self.k >= self.c
            && th * tw >= 16
            && n * th * tw >= 40
    }
}

/// Stores eight transformed values at `dst`: past the caches where `dst` is 32-byte aligned. The
/// transformed kernels are four times the kernel's size and written on every call (VGG-16's
/// 512-channel layers: 37.7 MB), more than the L3 cache holds: ordinary stores read each line
/// first and evict the activations the next layers read (VGG-16 ε+♭ 0.92× with these at batch 1,
/// its forward 0.94×, alternated `attrloop`/`fwdloop` rounds).
///
/// # Safety
/// `dst` must be valid for eight writes.
#[inline(always)]
unsafe fn store8(dst: *mut f32, v: &[f32; 8]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    if (dst as usize).is_multiple_of(32) {
        // SAFETY: aligned and valid by the caller; AVX is enabled at compile time.
        unsafe { std::arch::x86_64::_mm256_stream_ps(dst, std::arch::x86_64::_mm256_loadu_ps(v.as_ptr())) };
        return;
    }
    // A vector store, where a copy of eight elements called memmove.
    // SAFETY: valid by the caller.
    unsafe { dst.cast::<[f32; 8]>().write_unaligned(*v) };
}

/// Transformed kernels, [36][k][c]: `U_ξ = (G g Gᵀ)_ξ` for each output/input channel pair.
pub(super) struct Weights(Vec<f32>);

impl Weights {
    /// From a [k][c][3][3] kernel (`vjp` false), or from the forward kernel [c][k][3][3] of the
    /// geometry's VJP, flipped and transposed (`vjp` true).
    pub(super) fn new<T: Float>(geom: &Geom, wt: &[T], vjp: bool) -> Weights {
        let wt = super::as_f32(wt);
        let (k, c) = (geom.k, geom.c);
        assert_eq!(wt.len(), k * c * 9, "kernel size");
        // Uninitialised: every element is written below (zeroing it was a tenth of a small
        // layer's time).
        let mut u: Vec<f32> = Vec::with_capacity(XI * k * c);
        let up = SendPtr(u.as_mut_ptr());
        const L: usize = 8;
        // Output channels split over the threads: 256 × 256 kernels took 2 ms on one.
        let rows = k.div_ceil(8 * rayon::current_num_threads()).max(1);
        (0..k.div_ceil(rows)).into_par_iter().for_each(|b| {
            let up = &up;
            for (r, s0) in (b * rows..((b + 1) * rows).min(k)).flat_map(|r| (0..c).step_by(L).map(move |s0| (r, s0))) {
                let lanes = L.min(c - s0);
                // The 3×3 taps of `lanes` kernels, one lane each (nine contiguous taps per kernel).
                let mut g = [[0f32; L]; 9];
                for l in 0..lanes {
                    let s = s0 + l;
                    let taps: &[f32; 9] = if vjp { &wt[(s * k + r) * 9..][..9] } else { &wt[(r * c + s) * 9..][..9] }
                        .try_into()
                        .expect("nine taps");
                    for (t, gt) in g.iter_mut().enumerate() {
                        gt[l] = if vjp { taps[8 - t] } else { taps[t] };
                    }
                }
                // G applied down the columns (gc[i][q]), then along the rows (uu[i][j]).
                let mut gc = [[0f32; L]; ALPHA * 3];
                for q in 0..3 {
                    g_transform(&g[q], &g[3 + q], &g[6 + q], &mut gc, q, 3);
                }
                let mut uu = [[0f32; L]; XI];
                for i in 0..ALPHA {
                    g_transform(&gc[3 * i], &gc[3 * i + 1], &gc[3 * i + 2], &mut uu, ALPHA * i, 1);
                }
                for (xi, v) in uu.iter().enumerate() {
                    let at = (xi * k + r) * c + s0;
                    // SAFETY: within the capacity; row r of each ξ belongs to this task.
                    unsafe {
                        if lanes == L {
                            store8(up.0.add(at), v);
                        } else {
                            std::ptr::copy_nonoverlapping(v.as_ptr(), up.0.add(at), lanes);
                        }
                    }
                }
            }
            // Streaming stores are weakly ordered: each block of rows fences its own before the
            // pool's join hands the buffer to the products, on whichever thread ran it.
            #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
            // SAFETY: SSE is part of x86_64.
            unsafe {
                std::arch::x86_64::_mm_sfence()
            };
        });
        // SAFETY: the loops above wrote every (ξ, r, s).
        unsafe { u.set_len(XI * k * c) };
        Weights(u)
    }
}

/// G·(a, b, c) for eight lanes, into `o[at + i·stride]` for i in 0..6.
#[inline(always)]
fn g_transform(a: &[f32; 8], b: &[f32; 8], c: &[f32; 8], o: &mut [[f32; 8]], at: usize, stride: usize) {
    for l in 0..8 {
        let (a, b, c) = (a[l], b[l], c[l]);
        // Products by reciprocals, not divisions (a rounding apart).
        o[at][l] = a * 0.25;
        o[at + stride][l] = -(a + b + c) * (1.0 / 6.0);
        o[at + 2 * stride][l] = -(a - b + c) * (1.0 / 6.0);
        o[at + 3 * stride][l] = a * (1.0 / 24.0) + b * (1.0 / 12.0) + c * (1.0 / 6.0);
        o[at + 4 * stride][l] = a * (1.0 / 24.0) - b * (1.0 / 12.0) + c * (1.0 / 6.0);
        o[at + 5 * stride][l] = c;
    }
}

/// Eight lanes of each of `N` rows at column `c`.
#[inline(always)]
fn lanes<const N: usize>(rows: &[&[f32]; N], c: usize) -> [[f32; 8]; N] {
    std::array::from_fn(|i| rows[i][c..c + 8].try_into().expect("eight lanes"))
}

/// Bᵀ·(d0..d5) over whole rows: `o[i][t]` from `d[·][t]` for t < n, a multiple of eight.
// Eight lanes at a time, in fixed-size arrays: with a loop over n, the compiler's unrolled
// vector loop skipped rows of 16 lanes and ran them as scalars.
#[inline(always)]
fn b_rows(d: [&[f32]; ALPHA], mut o: [&mut [f32]; ALPHA], n: usize) {
    debug_assert!(n.is_multiple_of(8));
    for c in (0..n).step_by(8) {
        let [d0, d1, d2, d3, d4, d5] = lanes(&d, c);
        let mut r = [[0f32; 8]; ALPHA];
        for l in 0..8 {
            let (d0, d1, d2, d3, d4, d5) = (d0[l], d1[l], d2[l], d3[l], d4[l], d5[l]);
            r[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
            r[1][l] = -4.0 * (d1 + d2) + d3 + d4;
            r[2][l] = 4.0 * (d1 - d2) - d3 + d4;
            r[3][l] = 2.0 * (d3 - d1) - d2 + d4;
            r[4][l] = 2.0 * (d1 - d3) - d2 + d4;
            r[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
        }
        for (o, r) in o.iter_mut().zip(&r) {
            o[c..c + 8].copy_from_slice(r);
        }
    }
}

/// Aᵀ·(m0..m5) over whole rows (n a multiple of eight).
#[inline(always)]
fn a_rows(m: [&[f32]; ALPHA], mut o: [&mut [f32]; M], n: usize) {
    debug_assert!(n.is_multiple_of(8));
    for c in (0..n).step_by(8) {
        let [m0, m1, m2, m3, m4, m5] = lanes(&m, c);
        let mut r = [[0f32; 8]; M];
        for l in 0..8 {
            let (p12, d12, p34, d34) = (m1[l] + m2[l], m1[l] - m2[l], m3[l] + m4[l], m3[l] - m4[l]);
            r[0][l] = m0[l] + p12 + p34;
            r[1][l] = d12 + 2.0 * d34;
            r[2][l] = p12 + 4.0 * p34;
            r[3][l] = d12 + 8.0 * d34 + m5[l];
        }
        for (o, r) in o.iter_mut().zip(&r) {
            o[c..c + 8].copy_from_slice(r);
        }
    }
}

/// Tiles per chunk of a tile row in the output transform (its row buffers' length).
const CHUNK: usize = 64;

/// The row length of the transformed inputs and products for `tiles` tiles: room for a chunk's
/// last vector to run up to seven lanes past the block's tiles (the transforms compute whole
/// vectors; a tile row of 14 tiles was otherwise 6 scalar lanes in 14).
fn padded(tiles: usize) -> usize {
    tiles.next_multiple_of(8) + 8
}

/// Writes the transformed input tiles `tiles` (row-major over the sample's tile grid) of one
/// sample `x` [c][h][w], input channels `chans`, into `v` [36][c][ld] (see [`padded`] for the
/// row length `ld`).
///
/// # Safety
/// `v` is valid for 36·c·ld writes, and no other thread writes these channels' rows.
unsafe fn transform_input(geom: &Geom, x: &[f32], tiles: Range<usize>, chans: Range<usize>, v: *mut f32, ld: usize) {
    let (_, tw) = geom.tiles();
    assert!(ld >= padded(tiles.len()) && chans.end <= geom.c, "transformed input size");
    if tiles.is_empty() {
        return;
    }
    // The input rows under the block's tile rows, zero-padded: `pad[r][4t + q]`, columns from
    // −pl. The padding is written once; each channel overwrites the image's part.
    let ty0 = tiles.start / tw;
    let rows = M * ((tiles.end - 1) / tw - ty0 + 1) + 2;
    // Whole vectors of tiles (the lanes past tw are scratch), and one more quad for columns 4, 5.
    let twp = tw.next_multiple_of(8);
    let wp = M * (twp + 1);
    let mut pad = vec![0f32; rows * wp];
    // Each padded row split by column phase, `ph[r][q][t]` = `pad[r][4t + q]`, so that every
    // read of the row transform is contiguous.
    let mut ph = vec![0f32; rows * M * (twp + 1)];
    // The rows' transforms along the rows, `hr[j][r][t]`, with a vector of slack for the
    // vertical transform's last chunk.
    let hl = twp + 8;
    let mut hr = vec![0f32; ALPHA * rows * hl];
    let vp = v;
    let y0 = (M * ty0) as isize - geom.pt as isize;
    // Image rows and columns inside the padded block.
    let r_in = (-y0).max(0) as usize..((geom.h as isize - y0).max(0) as usize).min(rows);
    let wcopy = geom.w.min(wp - geom.pl.min(wp));
    for ci in chans {
        let plane = &x[ci * geom.h * geom.w..(ci + 1) * geom.h * geom.w];
        // All rows first: reading a row right after copying it stalled on store forwarding (a
        // third of this function's time in `perf`).
        for r in r_in.clone() {
            let y = (y0 + r as isize) as usize;
            pad[r * wp + geom.pl..r * wp + geom.pl + wcopy].copy_from_slice(&plane[y * geom.w..y * geom.w + wcopy]);
        }
        for r in 0..rows {
            let prow = &pad[r * wp..(r + 1) * wp];
            let phr = &mut ph[r * M * (twp + 1)..(r + 1) * M * (twp + 1)];
            let (p0, rest) = phr.split_at_mut(twp + 1);
            let (p1, rest) = rest.split_at_mut(twp + 1);
            let (p2, p3) = rest.split_at_mut(twp + 1);
            for (t, quad) in prow.chunks_exact(M).enumerate() {
                (p0[t], p1[t], p2[t], p3[t]) = (quad[0], quad[1], quad[2], quad[3]);
            }
            let out = std::array::from_fn(|j| {
                let at = (j * rows + r) * hl;
                // SAFETY: row r of hr's plane j, disjoint for different j.
                unsafe { std::slice::from_raw_parts_mut(hr.as_mut_ptr().add(at), hl) }
            });
            b_rows([&p0[..], &p1[..], &p2[..], &p3[..], &p0[1..], &p1[1..]], out, twp);
        }
        let mut t = tiles.start;
        while t < tiles.end {
            let (ty, tx0) = (t / tw, t % tw);
            let n = (tw - tx0).min(tiles.end - t);
            // Whole vectors: the lanes past n are scratch, overwritten by the next tile row's
            // or channel's, or in the slack past the block.
            let np = n.next_multiple_of(8);
            let r0 = M * (ty - ty0);
            let col = t - tiles.start;
            for j in 0..ALPHA {
                let d = std::array::from_fn(|i| &hr[(j * rows + r0 + i) * hl + tx0..][..np]);
                let out = std::array::from_fn(|i| {
                    let at = ((i * ALPHA + j) * geom.c + ci) * ld + col;
                    // SAFETY: col + np ≤ padded(tiles) ≤ ld, so each range lies in its row of v
                    // (the caller's contract), and the six rows (different i) are disjoint.
                    unsafe { std::slice::from_raw_parts_mut(vp.add(at), np) }
                });
                b_rows(d, out, np);
            }
            t += n;
        }
    }
}

/// What the output transform does with each output row besides storing it.
#[derive(Clone, Copy)]
pub(super) struct Epi<'a> {
    /// Per output channel.
    pub bias: Option<&'a [f32]>,
    /// Clamp to [lo, hi] after the bias (and after adding the initial output).
    pub clamp: Option<(f32, f32)>,
    /// Add onto the output's current values.
    pub accumulate: bool,
}

/// Writes the outputs of tiles `tiles` from their products `mm` [36][k][ld].
///
/// # Safety
/// `out` is valid for this sample's [k][oh][ow] outputs, initialised when accumulating, and no
/// other thread writes the rows of these tiles.
unsafe fn transform_output(
    geom: &Geom,
    mm: &[f32],
    ld: usize,
    tiles: Range<usize>,
    ks: Range<usize>,
    out: &SendPtr<f32>,
    epi: Epi,
) {
    let (_, tw) = geom.tiles();
    let mut wv = [[[0f32; 64]; M]; ALPHA];
    let mut o = [[0f32; 64]; M];
    let mut row = [0f32; M * CHUNK];
    for kc in ks {
        let b = epi.bias.map_or(0.0, |b| b[kc]);
        let mut t = tiles.start;
        while t < tiles.end {
            let (ty, tx0) = (t / tw, t % tw);
            let n = CHUNK.min(tw - tx0).min(tiles.end - t);
            let np = n.next_multiple_of(8);
            let col = t - tiles.start;
            // Aᵀ down each tile column j, then along the rows.
            for (j, wj) in wv.iter_mut().enumerate() {
                let m = std::array::from_fn(|i| {
                    let at = ((i * ALPHA + j) * geom.k + kc) * ld + col;
                    &mm[at..at + np]
                });
                let [w0, w1, w2, w3] = wj;
                a_rows(m, [&mut w0[..], &mut w1[..], &mut w2[..], &mut w3[..]], np);
            }
            for a in 0..M {
                let y = M * ty + a;
                if y >= geom.oh {
                    break;
                }
                let [o0, o1, o2, o3] = &mut o;
                a_rows(wv.each_ref().map(|s| &s[a][..]), [&mut o0[..], &mut o1[..], &mut o2[..], &mut o3[..]], np);
                for tt in 0..n {
                    for (bq, ob) in o.iter().enumerate() {
                        row[M * tt + bq] = ob[tt];
                    }
                }
                let x0 = M * tx0;
                let len = (M * n).min(geom.ow - x0);
                // SAFETY: row y, columns x0..x0 + len of plane kc lie in this sample's outputs.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add((kc * geom.oh + y) * geom.ow + x0), len) };
                let src = &row[..len];
                if epi.accumulate {
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s + b);
                } else {
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s + b);
                }
                if let Some((lo, hi)) = epi.clamp {
                    dst.iter_mut().for_each(|d| *d = super::elementwise::clamp(*d, lo, hi));
                }
            }
            t += n;
        }
    }
}

thread_local! {
    /// The last block's buffers on this thread, for the next: fresh ones cost page faults and
    /// zeroing on every block (a tenth of the kernel's time in `perf`). Everything in them is
    /// written before it is read.
    static SPARE: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// The first `len` elements of `buf`, growing it if needed.
fn grown(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// One sample: `out` [k][oh][ow] (+)= Σ_terms conv(x_t, U_t), with the epilogue. `terms` pairs each
/// input [c][h][w] with its transformed kernel; the products of all terms sum before one output
/// transform (LRP's γ rule needs two).
///
/// # Safety
/// `out` is valid for the sample's k·oh·ow outputs, initialised when accumulating, and not aliased
/// during the call.
pub(super) unsafe fn sample<T: Float>(
    geom: &Geom,
    terms: &[(&[T], &Weights)],
    out: *mut T,
    epi: Epi,
    threads: Threads,
) {
    let (th, tw) = geom.tiles();
    let total = th * tw;
    let out = SendPtr(out.cast::<f32>());
    // Blocks of tiles whose transformed inputs and products fit the budget.
    let per_tile = XI * (geom.c + geom.k) * std::mem::size_of::<f32>();
    let by_cache = (total * per_tile).div_ceil(BLOCK_BYTES).clamp(1, total);
    let nthreads = if threads == Threads::Pool { rayon::current_num_threads() } else { 1 };
    if nthreads > 1 && by_cache < 2 * nthreads {
        // Fewer cache-sized blocks than two per thread: one block (up to 3 × BLOCK_BYTES on two
        // threads), each stage split over the threads (input channels, then the 36 products, then
        // output channels). Blocks per thread made products of 25 columns on 28×28 planes, slower
        // than im2col's.
        let ld = padded(total);
        let (mut vbuf, mut mbuf) = SPARE.take();
        let vp = SendPtr(grown(&mut vbuf, XI * geom.c * ld).as_mut_ptr());
        let mp = SendPtr(grown(&mut mbuf, XI * geom.k * ld).as_mut_ptr());
        let split = |n: usize| n.div_ceil(4 * nthreads).max(1);
        for (ti, (x, u)) in terms.iter().enumerate() {
            let x = super::as_f32(x);
            let per = split(geom.c);
            (0..geom.c.div_ceil(per)).into_par_iter().for_each(|i| {
                let vp = &vp;
                let chans = i * per..((i + 1) * per).min(geom.c);
                // SAFETY: v holds 36·c·ld elements; each task writes its own channels' rows.
                unsafe { transform_input(geom, x, 0..total, chans, vp.0, ld) };
            });
            (0..XI).into_par_iter().for_each(|xi| {
                let (vp, mp) = (&vp, &mp);
                // SAFETY: the ξ-th products and inputs, written above; each task writes its own ξ.
                let (m, v) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(mp.0.add(xi * geom.k * ld), geom.k * ld),
                        std::slice::from_raw_parts(vp.0.add(xi * geom.c * ld), geom.c * ld),
                    )
                };
                let a = Mat::rows(&u.0[xi * geom.k * geom.c..(xi + 1) * geom.k * geom.c], geom.c);
                matmul_ld(geom.k, total, geom.c, a, Mat { data: v, rs: ld, cs: 1 }, m, ld, ti > 0, Threads::One);
            });
        }
        let per = split(geom.k);
        (0..geom.k.div_ceil(per)).into_par_iter().for_each(|i| {
            let mp = &mp;
            // SAFETY: the products are complete; the caller's contract for `out`; each task
            // writes its own output channels.
            let mm = unsafe { std::slice::from_raw_parts(mp.0, XI * geom.k * ld) };
            unsafe { transform_output(geom, mm, ld, 0..total, i * per..((i + 1) * per).min(geom.k), &out, epi) };
        });
        SPARE.set((vbuf, mbuf));
        return;
    }
    let nblocks = by_cache.div_ceil(nthreads) * nthreads;
    let nblocks = nblocks.clamp(1, total);
    let block = |bi: usize| {
        let tiles = bi * total / nblocks..(bi + 1) * total / nblocks;
        let nb = tiles.len();
        let ld = padded(nb);
        let (mut vbuf, mut mbuf) = SPARE.take();
        let v = grown(&mut vbuf, XI * geom.c * ld);
        let mm = grown(&mut mbuf, XI * geom.k * ld);
        for (ti, (x, u)) in terms.iter().enumerate() {
            // SAFETY: v holds 36·c·ld elements, this task's own.
            unsafe { transform_input(geom, super::as_f32(x), tiles.clone(), 0..geom.c, v.as_mut_ptr(), ld) };
            for (xi, m) in mm.chunks_exact_mut(geom.k * ld).enumerate() {
                let a = Mat::rows(&u.0[xi * geom.k * geom.c..(xi + 1) * geom.k * geom.c], geom.c);
                let b = Mat { data: &v[xi * geom.c * ld..(xi + 1) * geom.c * ld], rs: ld, cs: 1 };
                matmul_ld(geom.k, nb, geom.c, a, b, m, ld, ti > 0, Threads::One);
            }
        }
        // SAFETY: the caller's contract; blocks write disjoint tiles.
        unsafe { transform_output(geom, mm, ld, tiles, 0..geom.k, &out, epi) };
        SPARE.set((vbuf, mbuf));
    };
    if nblocks > 1 && nthreads > 1 {
        (0..nblocks).into_par_iter().for_each(block);
    } else {
        (0..nblocks).for_each(block);
    }
}
