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
//! The output is computed in blocks of columns, all taps of a block before the next, so that the
//! block's sums stay in cache between products; a block's finished rows are then written to the
//! output with bias, initial output and clamp.

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
/// alternated).
pub(super) fn applies(g: &ConvGeom) -> bool {
    g.group == 1
        && g.stride == [1, 1]
        && g.kh * g.kw > 1
        && g.c >= 16
        && g.kh * g.kw * g.m <= 8 * g.h * g.w
        && enabled()
}

/// Whether the shifted products run at all: `RELPROP_SHIFTED=off` sends their layers to im2col
/// (for A/B timing in one binary).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RELPROP_SHIFTED").map_or(true, |v| v != "off"))
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
    // The last tap's view of the last plane runs (kw − 1)·d past it; those values reach only the
    // discarded columns, but must exist.
    let xps: Vec<Vec<T>> = terms
        .iter()
        .map(|(x, wt)| {
            assert_eq!(x.len(), c * h * w, "input size");
            assert_eq!(wt.len(), kk * m * c, "kernel size");
            // In one pass, zeros only where there is padding (zeroing all, then copying the
            // rows in, wrote the input twice).
            let zeros = |xp: &mut Vec<T>, n: usize| xp.extend(std::iter::repeat_n(T::zero(), n));
            let mut xp = Vec::with_capacity(c * plane + (g.kw - 1) * dw);
            for src in x.chunks_exact(h * w) {
                zeros(&mut xp, pt * wp);
                for row in src.chunks_exact(w) {
                    zeros(&mut xp, pl);
                    xp.extend_from_slice(row);
                    zeros(&mut xp, pr);
                }
                zeros(&mut xp, pb * wp);
            }
            zeros(&mut xp, (g.kw - 1) * dw);
            debug_assert_eq!(xp.len(), c * plane + (g.kw - 1) * dw);
            xp
        })
        .collect();
    let np = oh * wp;
    let workers = if threads == Threads::Pool { rayon::current_num_threads().max(1) } else { 1 };
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
