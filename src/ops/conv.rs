//! 2-d convolution (1-d is the 2-d case with height 1) and its input VJP (the transposed
//! convolution), by im2col / col2im and GEMM, with a direct kernel for depthwise layers where a
//! GEMM with one output row would waste the matrix unit.

use super::depthwise16::{self, LANES};
use super::direct;
use super::gemm::{Epilogue, Mat, SendPtr, Threads, matmul_raw};
use super::pointwise;
use super::pool::valid_outputs;
use super::shifted;
use super::winograd;
use crate::tensor::Float;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::Range;

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
        Some(((ph - eh) / self.stride[0] + 1, (pw - ew) / self.stride[1] + 1))
    }

    /// Input channels per group.
    pub fn cg(&self) -> usize {
        self.c / self.group
    }
    /// Output channels per group.
    pub fn mg(&self) -> usize {
        self.m / self.group
    }
    fn kdim(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pads == [0; 4]
    }
    /// One input channel per group, in several groups: the depthwise kernels take it.
    pub fn is_depthwise(&self) -> bool {
        self.cg() == 1 && self.group > 1
    }
}

/// Fills `col[kdim × rows·ow]` with the patches of output rows `rows` of one group of one sample
/// (`x` is [cg, h, w]), and returns that prefix of `col`. Every element of it is written (the padding
/// as zeros), so the buffer may start uninitialised: zero-filling ResNet-50's ~4 MB column buffers
/// per sample was a pass over memory as long as the copy itself.
fn im2col<'c, T: Float>(
    g: &ConvGeom,
    x: &[T],
    col: &'c mut [MaybeUninit<T>],
    rows: Range<usize>,
    ow: usize,
    threads: Threads,
) -> &'c [T] {
    let (h, w) = (g.h, g.w);
    let oh = rows.end;
    let span = rows.len() * ow;
    let taps = g.kh * g.kw;
    let fill = |ci: usize, dst: &mut [MaybeUninit<T>]| {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for ki in 0..g.kh {
            let ys = clip(valid_outputs(h, oh, g.stride[0], ki, g.dilation[0], g.pads[0]), &rows);
            for kj in 0..g.kw {
                let xs = valid_outputs(w, ow, g.stride[1], kj, g.dilation[1], g.pads[1]);
                let d = &mut dst[(ki * g.kw + kj) * span..(ki * g.kw + kj + 1) * span];
                zero(&mut d[..(ys.start - rows.start) * ow]);
                zero(&mut d[(ys.end - rows.start) * ow..]);
                for oy in ys.clone() {
                    let iy = oy * g.stride[0] + ki * g.dilation[0] - g.pads[0];
                    let src = &plane[iy * w..(iy + 1) * w];
                    let drow = &mut d[(oy - rows.start) * ow..(oy - rows.start + 1) * ow];
                    zero(&mut drow[..xs.start]);
                    zero(&mut drow[xs.end..]);
                    if xs.is_empty() {
                        continue;
                    }
                    let ix0 = xs.start * g.stride[1] + kj * g.dilation[1] - g.pads[1];
                    if g.stride[1] == 1 {
                        drow[xs.clone()].write_copy_of_slice(&src[ix0..ix0 + xs.len()]);
                    } else if g.stride[1] == 2 {
                        // Pairs, so that the compiler vectorises the gather with shuffles (step_by
                        // ran scalar); the last value may have no partner inside the row.
                        let (n, d) = (xs.len(), &mut drow[xs.clone()]);
                        for (v, p) in d[..n - 1].iter_mut().zip(src[ix0..ix0 + 2 * (n - 1)].chunks_exact(2)) {
                            v.write(p[0]);
                        }
                        d[n - 1].write(src[ix0 + 2 * (n - 1)]);
                    } else {
                        for (v, &s) in drow[xs.clone()].iter_mut().zip(src[ix0..].iter().step_by(g.stride[1])) {
                            v.write(s);
                        }
                    }
                }
            }
        }
    };
    let per = taps * span;
    match threads {
        Threads::Pool if g.cg() > 1 && g.cg() * per >= 1 << 15 => {
            col[..g.cg() * per].par_chunks_mut(per).enumerate().for_each(|(ci, d)| fill(ci, d))
        }
        _ => col[..g.cg() * per].chunks_mut(per).enumerate().for_each(|(ci, d)| fill(ci, d)),
    }
    // SAFETY: every element of the prefix was written above (each tap's rows are written or
    // zeroed, each row's columns copied or zeroed).
    unsafe { std::slice::from_raw_parts(col.as_ptr() as *const T, g.cg() * per) }
}

fn zero<T: Float>(d: &mut [MaybeUninit<T>]) {
    d.iter_mut().for_each(|v| {
        v.write(T::zero());
    });
}

/// `r ∩ within` (empty at `within`'s bounds when they do not meet).
fn clip(r: Range<usize>, within: &Range<usize>) -> Range<usize> {
    let start = r.start.clamp(within.start, within.end);
    start..r.end.clamp(start, within.end)
}

/// Output rows per im2col tile: the column buffer stays near 4 MB (whole-plane buffers reached
/// 115 MB on VGG-16's first layers, and the product then streamed them from memory).
fn tile_rows(kdim: usize, oh: usize, ow: usize) -> usize {
    ((1usize << 20) / (kdim * ow).max(1)).clamp(1, oh.max(1))
}

/// Adds `col[kdim × rows·ow]` (output rows `rows`) back onto the input positions of one group of
/// one sample.
fn col2im<T: Float>(g: &ConvGeom, col: &[T], x: &mut [T], rows: Range<usize>, ow: usize, threads: Threads) {
    let (h, w) = (g.h, g.w);
    let oh = rows.end;
    let span = rows.len() * ow;
    let taps = g.kh * g.kw;
    let planes = |ci: usize, plane: &mut [T]| {
        for ki in 0..g.kh {
            let ys = clip(valid_outputs(h, oh, g.stride[0], ki, g.dilation[0], g.pads[0]), &rows);
            for kj in 0..g.kw {
                let xs = valid_outputs(w, ow, g.stride[1], kj, g.dilation[1], g.pads[1]);
                if xs.is_empty() {
                    continue;
                }
                let row = ci * taps + ki * g.kw + kj;
                let src = &col[row * span..(row + 1) * span];
                for oy in ys.clone() {
                    let iy = oy * g.stride[0] + ki * g.dilation[0] - g.pads[0];
                    let dst = &mut plane[iy * w..(iy + 1) * w];
                    let o = (oy - rows.start) * ow;
                    let s = &src[o + xs.start..o + xs.end];
                    let ix0 = xs.start * g.stride[1] + kj * g.dilation[1] - g.pads[1];
                    if g.stride[1] == 1 {
                        for (d, &v) in dst[ix0..ix0 + s.len()].iter_mut().zip(s) {
                            *d += v;
                        }
                    } else if g.stride[1] == 2 && !s.is_empty() {
                        // Pairs, as in im2col: the strided loop ran scalar.
                        let n = s.len();
                        for (p, &v) in dst[ix0..ix0 + 2 * (n - 1)].chunks_exact_mut(2).zip(&s[..n - 1]) {
                            p[0] += v;
                        }
                        dst[ix0 + 2 * (n - 1)] += s[n - 1];
                    } else {
                        for (d, &v) in dst[ix0..].iter_mut().step_by(g.stride[1]).zip(s) {
                            *d += v;
                        }
                    }
                }
            }
        }
    };
    let hw = h * w;
    match threads {
        Threads::Pool if g.cg() > 1 && g.cg() * taps * span >= 1 << 15 => {
            x[..g.cg() * hw].par_chunks_mut(hw).enumerate().for_each(|(ci, p)| planes(ci, p))
        }
        _ => x[..g.cg() * hw].chunks_mut(hw).enumerate().for_each(|(ci, p)| planes(ci, p)),
    }
}

/// The depthwise input VJP as a forward depthwise convolution (and, at stride 1, any
/// convolution's, see [`shifted_vjp_geom`]): `dx[iy, ix] = Σ w[ki, kj] ·
/// up(dy)[iy + pt − ki·d, ix + pl − kj·d]`, where `up(dy)` holds `dy[oy, ox]` at `(oy·s, ox·s)`
/// and zeros between, is a stride-1 correlation of `up(dy)` with the flipped kernel, padded by
/// `(k − 1)·d − pad` before. Returns its geometry (one sample), or None for paddings wider than
/// the kernel, which this form cannot express.
fn depthwise_vjp_geom(g: &ConvGeom, oh: usize, ow: usize) -> Option<ConvGeom> {
    let (hu, wu) = ((oh - 1) * g.stride[0] + 1, (ow - 1) * g.stride[1] + 1);
    let (eh, ew) = ((g.kh - 1) * g.dilation[0], (g.kw - 1) * g.dilation[1]);
    let (pt, pl) = (eh.checked_sub(g.pads[0])?, ew.checked_sub(g.pads[1])?);
    // So that the output is h × w: hu + pt + pb − eh = h.
    let (pb, pr) = ((g.h + eh).checked_sub(hu + pt)?, (g.w + ew).checked_sub(wu + pl)?);
    Some(ConvGeom { n: 1, h: hu, w: wu, m: g.c, stride: [1, 1], pads: [pt, pl, pb, pr], ..*g })
}

/// `n` samples of `len` values each, written by `write(sample, its first element, threads)`,
/// which must write every element of its sample: samples in parallel with one thread each, or
/// one sample with the pool. The buffer starts uninitialised (a zero fill is a pass over memory
/// as long as the output); unit tests poison it, so that an element a kernel misses shows up as
/// NaN.
fn per_sample_uninit<T: Float>(n: usize, len: usize, write: impl Fn(usize, *mut T, Threads) + Sync) -> Vec<T> {
    let total = n * len;
    let mut out: Vec<T> = Vec::with_capacity(total);
    let op = SendPtr(out.as_mut_ptr());
    #[cfg(test)]
    // SAFETY: within the allocated capacity.
    (0..total).for_each(|i| unsafe { op.0.add(i).write(T::of(f64::NAN)) });
    let run = |s: usize, threads: Threads| {
        let op = &op;
        // SAFETY: sample s's part of the allocation, handed to one call alone.
        write(s, unsafe { op.0.add(s * len) }, threads)
    };
    if n > 1 {
        (0..n).into_par_iter().for_each(|s| run(s, Threads::One));
    } else if n == 1 {
        run(0, Threads::Pool);
    }
    // SAFETY: `write` wrote every element of every sample (its contract).
    unsafe { out.set_len(total) };
    out
}

/// The input VJP of a stride-1, one-group convolution as a forward one (one sample): the
/// correlation of [`depthwise_vjp_geom`] (nothing to spread out at stride 1), from the layer's
/// `m` channels to its `c`. None for other layers and for paddings wider than the kernel.
fn shifted_vjp_geom(g: &ConvGeom) -> Option<ConvGeom> {
    if g.group != 1 || g.stride != [1, 1] {
        return None;
    }
    let (oh, ow) = g.out_hw()?;
    depthwise_vjp_geom(g, oh, ow).map(|gv| ConvGeom { c: g.m, m: g.c, ..gv })
}

/// Output columns per register block of the depthwise kernel (one AVX2 vector of f32).
const DW_BLOCK: usize = 8;
/// Blocks computed together: independent sums hide the multiply-add latency (one chain of taps
/// into one register ran at a quarter of the machine's rate).
const DW_GROUP: usize = 4;

/// A depthwise plane, zero-padded on all sides, each row split by column phase modulo the stride
/// (see [`PhaseRows`]), so that every tap of every output block is one contiguous read at a
/// fixed offset. Kept per task: the padding is zeroed once and every plane's scatter rewrites the
/// same interior slots.
struct DwScratch<T> {
    ph: PhaseRows,
    buf: Vec<T>,
    /// Offset of each tap (row-major over the kernel) from its block's base.
    offs: Vec<usize>,
    /// Base offset of each output block, row-major.
    bases: Vec<usize>,
    /// Where each output block goes in the output plane, and how many of its values are inside.
    dsts: Vec<(usize, usize)>,
    /// The plane is spread out by this factor (rows, columns) with zeros between: the input VJP
    /// convolves the output gradient upsampled by the stride (see [`depthwise_vjp_geom`]).
    up: [usize; 2],
    /// The AVX-512 kernel's tile for this plane (f32 on CPUs that have it), see [`dw512`].
    wide: Option<dw512::Tile>,
    /// Output height and width, and the buffer offset between consecutive output rows.
    oh: usize,
    ow: usize,
    row_step: usize,
    /// The kernel's size when it is square (3×3 or 5×5) without dilation, else 0, and the
    /// stride between output rows: the AVX-512 kernel then reuses each loaded input row for every
    /// output row of its tile that reads it (see `dw512::reuse`).
    square: usize,
    stride: usize,
    /// Stride-2 square kernels in the AVX-512 kernel: the rows are copied as they are (padded,
    /// not split by column phase) and the kernel splits even and odd columns in registers (see
    /// `dw512::run_plain2`). Splitting while copying took ~30 % of these layers' time inside
    /// EfficientNet-Lite0.
    plain: bool,
    /// The next input plane the task loads (address, bytes): the AVX-512 kernel prefetches it,
    /// and the lines of the output plane after this one, while it computes this one. Each plane's
    /// copy-in otherwise waited on its input's misses, and its stores on their lines' reads:
    /// EfficientNet-Lite0's forward ran 0.95× at batch 8 and 0.98× at batch 1 on one thread
    /// (even on two; `fwdloop`, 6–8 alternations).
    next: (usize, usize),
}

impl<T: Float> DwScratch<T> {
    fn new(g: &ConvGeom, oh: usize, ow: usize) -> Self {
        let wide = dw512::tile::<T>(oh, ow);
        // Room for whole blocks: the last block may read up to a block's columns past ow, and a
        // wide tile's rows past oh.
        let (tile_rows, block) = wide.map_or((1, DW_BLOCK), |t| (t.rows(), t.cols()));
        let plain = wide.is_some()
            && g.kh == g.kw
            && matches!(g.kh, 3 | 5)
            && g.stride == [2, 2]
            && g.dilation == [1, 1]
            && dw512::plain_enabled();
        // Plain rows: padded column p at slot p, as at stride 1; a tile of outputs reads twice
        // its width of columns.
        let ph = if plain {
            PhaseRows::new(&ConvGeom { stride: [2, 1], ..*g }, 2 * ow.div_ceil(block) * block)
        } else {
            PhaseRows::new(g, ow.div_ceil(block) * block)
        };
        let tiled = (oh.div_ceil(tile_rows) * tile_rows - 1) * g.stride[0] + (g.kh - 1) * g.dilation[0] + 1;
        let rows = (g.h + g.pads[0] + g.pads[2]).max(tiled);
        let buf = vec![T::zero(); rows * ph.row];
        let offs = (0..g.kh)
            .flat_map(|ki| (0..g.kw).map(move |kj| (ki, kj)))
            .map(|(ki, kj)| ki * g.dilation[0] * ph.row + ph.start(kj))
            .collect();
        // The AVX2 kernel's block list; the AVX-512 kernel walks its tiles without one.
        let blocks = if wide.is_some() { 0 } else { oh };
        let mut bases: Vec<usize> = (0..blocks)
            .flat_map(|oy| (0..ow).step_by(DW_BLOCK).map(move |c0| (oy, c0)))
            .map(|(oy, c0)| oy * g.stride[0] * ph.row + c0)
            .collect();
        let mut dsts: Vec<(usize, usize)> = (0..blocks)
            .flat_map(|oy| (0..ow).step_by(DW_BLOCK).map(move |c0| (oy * ow + c0, DW_BLOCK.min(ow - c0))))
            .collect();
        // Whole groups only: the last group repeats the last block and stores nothing for the
        // copies. Left-over blocks computed one at a time waited on one chain of multiply-adds
        // (7×7 planes have seven blocks).
        while !bases.len().is_multiple_of(DW_GROUP) {
            bases.push(bases.last().copied().unwrap_or(0));
            dsts.push((0, 0));
        }
        let row_step = g.stride[0] * ph.row;
        let square =
            if g.kh == g.kw && matches!(g.kh, 3 | 5) && g.dilation == [1, 1] && g.stride[0] <= 2 { g.kh } else { 0 };
        DwScratch {
            ph,
            buf,
            offs,
            bases,
            dsts,
            up: [1, 1],
            wide,
            oh,
            ow,
            row_step,
            square,
            stride: g.stride[0],
            plain,
            next: (0, 0),
        }
    }
    /// Copies one plane in (its padding and, when upsampled, the slots between its values stay
    /// zero: every plane writes the same slots).
    fn load(&mut self, g: &ConvGeom, x: &[T]) {
        let row = self.ph.row;
        if self.up == [1, 1] {
            let dst = self.buf[g.pads[0] * row..].chunks_exact_mut(row);
            for (src, dst) in x.chunks_exact(g.w).zip(dst) {
                self.ph.scatter(src, dst);
            }
            return;
        }
        let [uh, uw] = self.up;
        let w = (g.w - 1) / uw + 1;
        for (r, src) in x.chunks_exact(w).enumerate() {
            let dst = &mut self.buf[(g.pads[0] + r * uh) * row + g.pads[1]..];
            for (d, &v) in dst.iter_mut().step_by(uw).zip(src) {
                *d = v;
            }
        }
    }
}

/// Depthwise forward for one channel: `out[oh×ow] = b + conv(x, k)`, clamped to `clamp` when given
/// (a fused ReLU/ReLU6). Register-blocked: [`DW_GROUP`] blocks of [`DW_BLOCK`] outputs keep their
/// sums in registers through all taps and are stored once.
///
/// # Safety
/// `out` must be valid for writes of the plane's `oh·ow` outputs, not aliased during the call, and
/// initialised when `accumulate` (otherwise it may be uninitialised: every output is written).
#[allow(clippy::too_many_arguments)]
unsafe fn depthwise_blocked<T: Float>(
    g: &ConvGeom,
    sc: &mut DwScratch<T>,
    x: &[T],
    k: &[T],
    b: T,
    out: *mut T,
    clamp: Option<(T, T)>,
    accumulate: bool,
) {
    sc.load(g, x);
    if let Some(tile) = sc.wide {
        // SAFETY: the caller's contract; the kernel checks its reads against the buffer.
        unsafe { dw512::plane(tile, sc, k, b, out, clamp, accumulate) };
        return;
    }
    let (buf, offs) = (&sc.buf, &sc.offs);
    let dsts = &sc.dsts;
    // Inlined: as a closure call per block, with a division and a remainder to find the block's
    // place, the store took a sixth of the kernel's time.
    #[inline(always)]
    fn store<T: Float>(
        out: *mut T,
        (at, n): (usize, usize),
        mut acc: [T; DW_BLOCK],
        clamp: Option<(T, T)>,
        accumulate: bool,
    ) {
        if let Some((lo, hi)) = clamp {
            acc.iter_mut().for_each(|v| *v = super::elementwise::clamp(*v, lo, hi));
        }
        // SAFETY: the destinations lie inside the plane (`DwScratch::new` places them, checked
        // below), which the caller makes valid; read only when accumulating onto initialised memory.
        unsafe {
            let o = out.add(at);
            if n == DW_BLOCK {
                // A fixed-size store; copy_from_slice of a variable length called memcpy per block.
                let o = o as *mut [T; DW_BLOCK];
                if accumulate {
                    let mut v = o.read();
                    v.iter_mut().zip(acc).for_each(|(o, a)| *o += a);
                    o.write(v);
                } else {
                    o.write(acc);
                }
            } else if accumulate {
                (0..n).for_each(|j| *o.add(j) += acc[j]);
            } else {
                (0..n).for_each(|j| o.add(j).write(acc[j]));
            }
        }
    }
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    assert!(dsts.iter().all(|&(at, n)| at + n <= oh * ow), "depthwise block writes past its plane");
    // Every read is inside the buffer: checked once here for the last block and the last tap
    // (bases and offsets only grow), so the inner loop carries no bounds checks. With them, the
    // loop spent more instructions on checks than on multiply-adds.
    let last = sc.bases.last().copied().unwrap_or(0) + offs.last().copied().unwrap_or(0) + DW_BLOCK;
    assert!(last <= buf.len(), "depthwise block reads past its plane");
    let read = |at: usize| -> &[T; DW_BLOCK] {
        debug_assert!(at + DW_BLOCK <= buf.len());
        // SAFETY: `at` is a base plus an offset, both at most the ones checked above.
        unsafe { &*(buf.as_ptr().add(at) as *const [T; DW_BLOCK]) }
    };
    let groups = sc.bases.chunks_exact(DW_GROUP);
    debug_assert!(groups.remainder().is_empty());
    let mut bi = 0;
    for base in groups {
        let base: &[usize; DW_GROUP] = base.try_into().expect("chunks_exact");
        let mut acc = [[b; DW_BLOCK]; DW_GROUP];
        for (&o, &wv) in offs.iter().zip(k) {
            for g in 0..DW_GROUP {
                let src = read(base[g] + o);
                for j in 0..DW_BLOCK {
                    acc[g][j] = wv.mul_add(src[j], acc[g][j]);
                }
            }
        }
        for a in acc {
            store(out, dsts[bi], a, clamp, accumulate);
            bi += 1;
        }
    }
}

/// The depthwise kernel with AVX-512 for f32, chosen at run time (the crate is built for AVX2):
/// sixteen lanes per vector, up to eight output rows per tile, and masked stores for the end of a
/// row, so that a 14- or 7-wide plane is one vector per row with no scalar tail. On
/// EfficientNet-Lite0's 14×14 and 7×7 layers the AVX2 kernel spent more instructions on its
/// 8-wide tiles' overhead and partial stores than on multiply-adds.
mod dw512 {
    use super::{DwScratch, Float};

    /// Stores a tile's sums `acc` (`R` output rows from `oy0` by `U` vectors of columns from
    /// `c0`): clamped to `bounds`, added onto the plane when accumulating, masked at the plane's
    /// edges. A macro, so that it inlines into each kernel (a function with the kernels' target
    /// feature may not be forced inline, and as a call per tile it cost the 14×14 planes ~5 %).
    /// Its caller's `unsafe` covers the stores: the tile's outputs lie inside `p.out`'s plane.
    macro_rules! store_tile {
        ($p:expr, $acc:expr, $oy0:expr, $c0:expr, $bounds:expr) => {{
            let (p, oy0, c0) = ($p, $oy0, $c0);
            let (oh, ow) = (p.oh, p.ow);
            for (r, acc) in $acc.iter().enumerate().take(oh - oy0) {
                for (u, &a) in acc.iter().enumerate() {
                    let c = c0 + 16 * u;
                    if c >= ow {
                        break;
                    }
                    let n = (ow - c).min(16);
                    let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
                    let mut v = a;
                    if let Some((lo, hi)) = $bounds {
                        // NaN passes through as in the scalar clamp: max and min return their
                        // second operand when either is NaN.
                        v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
                    }
                    let o = p.out.add((oy0 + r) * ow + c);
                    if p.accumulate {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, o));
                    }
                    _mm512_mask_storeu_ps(o, mask, v);
                }
            }
        }};
    }

    /// One tile's share of the prefetches of an [`Ahead`] (a prefetch does not fault); a macro
    /// for the reason `store_tile!` is one.
    macro_rules! ahead_step {
        ($ahead:expr, $p:expr) => {{
            let (ahead, p): (&mut Ahead, &Plane) = (&mut $ahead, $p);
            let (oh, ow) = (p.oh, p.ow);
            for _ in 0..ahead.per {
                if ahead.line < ahead.lines {
                    _mm_prefetch::<_MM_HINT_T0>((p.next.0 + 64 * ahead.line) as *const i8);
                    if 64 * ahead.line < oh * ow * 4 {
                        _mm_prefetch::<_MM_HINT_ET0>(p.out.wrapping_add(oh * ow + 16 * ahead.line) as *const i8);
                    }
                    ahead.line += 1;
                }
            }
        }};
    }

    /// Rows × vectors of sixteen outputs per tile.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Tile {
        R7U1,
        R8U1,
        R6U2,
        R4U4,
    }

    impl Tile {
        pub(super) fn rows(self) -> usize {
            match self {
                Tile::R7U1 => 7,
                Tile::R8U1 => 8,
                Tile::R6U2 => 6,
                Tile::R4U4 => 4,
            }
        }
        pub(super) fn cols(self) -> usize {
            16 * match self {
                Tile::R7U1 | Tile::R8U1 => 1,
                Tile::R6U2 => 2,
                Tile::R4U4 => 4,
            }
        }
    }

    /// The tile for an `oh × ow` output plane, or None where the AVX2 kernel runs (f64, CPUs
    /// without AVX-512F, `RELPROP_NO_AVX512` set, planes under four rows).
    pub(super) fn tile<T: Float>(oh: usize, ow: usize) -> Option<Tile> {
        if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() || oh < 4 || !available() {
            return None;
        }
        Some(match ow {
            0..=16 if oh.is_multiple_of(7) => Tile::R7U1,
            0..=16 => Tile::R8U1,
            17..=32 => Tile::R6U2,
            _ => Tile::R4U4,
        })
    }

    fn available() -> bool {
        super::super::avx512()
    }

    /// The loaded plane's outputs (see `depthwise_blocked`), `T` being f32 (checked by [`tile`]).
    ///
    /// # Safety
    /// As `depthwise_blocked`; the CPU has AVX-512F ([`tile`] checked it).
    pub(super) unsafe fn plane<T: Float>(
        tile: Tile,
        sc: &DwScratch<T>,
        k: &[T],
        b: T,
        out: *mut T,
        clamp: Option<(T, T)>,
        accumulate: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(std::any::TypeId::of::<T>(), std::any::TypeId::of::<f32>());
            let (oh, ow) = (sc.oh, sc.ow);
            // Every read is inside the buffer: the last tile's last tap, checked once.
            let last = (oh.div_ceil(tile.rows()) * tile.rows() - 1) * sc.row_step
                + (ow.div_ceil(tile.cols()) - 1) * tile.cols()
                + sc.offs.iter().copied().max().unwrap_or(0)
                + tile.cols();
            assert!(last <= sc.buf.len(), "depthwise tile reads past its plane");
            assert!(k.len() >= sc.offs.len(), "a weight per tap");
            let f = |v: T| v.to_f32().unwrap_or(0.0);
            let p = Plane {
                buf: sc.buf.as_ptr() as *const f32,
                row_step: sc.row_step,
                offs: &sc.offs,
                // SAFETY: T is f32 (asserted above).
                k: unsafe { std::slice::from_raw_parts(k.as_ptr() as *const f32, k.len()) },
                b: f(b),
                oh,
                ow,
                out: out as *mut f32,
                clamp: clamp.map(|(lo, hi)| (f(lo), f(hi))),
                accumulate,
                next: sc.next,
                row: sc.ph.row,
            };
            if sc.plain {
                // The last tile's last input row, and its columns: twice the tile's width from
                // twice its first column, plus the kernel's width less one.
                let k = sc.square;
                let last = (oh.div_ceil(tile.rows()) * tile.rows() - 1) * sc.row_step
                    + (k - 1) * sc.ph.row
                    + 2 * ow.div_ceil(tile.cols()) * tile.cols()
                    + k
                    - 1;
                assert!(last <= sc.buf.len() && sc.row_step == 2 * sc.ph.row, "depthwise tile reads past its plane");
                // SAFETY: AVX-512F is present ([`tile`]); reads checked above, writes as the caller's.
                unsafe {
                    match (tile, k) {
                        (Tile::R7U1, 3) => run_plain2::<7, 1, 3>(&p),
                        (Tile::R8U1, 3) => run_plain2::<8, 1, 3>(&p),
                        (Tile::R6U2, 3) => run_plain2::<6, 2, 3>(&p),
                        (Tile::R4U4, 3) => run_plain2::<4, 4, 3>(&p),
                        (Tile::R7U1, 5) => run_plain2::<7, 1, 5>(&p),
                        (Tile::R8U1, 5) => run_plain2::<8, 1, 5>(&p),
                        (Tile::R6U2, 5) => run_plain2::<6, 2, 5>(&p),
                        (Tile::R4U4, 5) => run_plain2::<4, 4, 5>(&p),
                        // `DwScratch::new` takes plain rows for 3×3 and 5×5 kernels alone.
                        _ => unreachable!("plain rows with a {k}×{k} kernel"),
                    }
                }
                return;
            }
            // SAFETY: AVX-512F is present ([`tile`]); reads checked above, writes as the caller's.
            unsafe {
                match (tile, sc.square, sc.stride) {
                    (Tile::R7U1, 3, 1) => run::<7, 1, 3, 1>(&p),
                    (Tile::R8U1, 3, 1) => run::<8, 1, 3, 1>(&p),
                    (Tile::R6U2, 3, 1) => run::<6, 2, 3, 1>(&p),
                    (Tile::R4U4, 3, 1) => run::<4, 4, 3, 1>(&p),
                    (Tile::R7U1, 3, 2) => run::<7, 1, 3, 2>(&p),
                    (Tile::R8U1, 3, 2) => run::<8, 1, 3, 2>(&p),
                    (Tile::R6U2, 3, 2) => run::<6, 2, 3, 2>(&p),
                    (Tile::R4U4, 3, 2) => run::<4, 4, 3, 2>(&p),
                    (Tile::R7U1, 5, 1) => run::<7, 1, 5, 1>(&p),
                    (Tile::R8U1, 5, 1) => run::<8, 1, 5, 1>(&p),
                    (Tile::R6U2, 5, 1) => run::<6, 2, 5, 1>(&p),
                    (Tile::R4U4, 5, 1) => run::<4, 4, 5, 1>(&p),
                    (Tile::R7U1, 5, 2) => run::<7, 1, 5, 2>(&p),
                    (Tile::R8U1, 5, 2) => run::<8, 1, 5, 2>(&p),
                    (Tile::R6U2, 5, 2) => run::<6, 2, 5, 2>(&p),
                    (Tile::R4U4, 5, 2) => run::<4, 4, 5, 2>(&p),
                    (Tile::R7U1, ..) => run::<7, 1, 0, 0>(&p),
                    (Tile::R8U1, ..) => run::<8, 1, 0, 0>(&p),
                    (Tile::R6U2, ..) => run::<6, 2, 0, 0>(&p),
                    (Tile::R4U4, ..) => run::<4, 4, 0, 0>(&p),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (tile, sc, k, b, out, clamp, accumulate);
            unreachable!("tile() returns None off x86-64");
        }
    }

    #[cfg(target_arch = "x86_64")]
    struct Plane<'a> {
        buf: *const f32,
        row_step: usize,
        offs: &'a [usize],
        k: &'a [f32],
        b: f32,
        oh: usize,
        ow: usize,
        out: *mut f32,
        clamp: Option<(f32, f32)>,
        accumulate: bool,
        next: (usize, usize),
        /// Length of one buffer row.
        row: usize,
    }

    /// # Safety
    /// AVX-512F present; every read of the tiles inside `buf`, every output inside `out`'s plane.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const R: usize, const U: usize, const K: usize, const S: usize>(p: &Plane) {
        use std::arch::x86_64::*;
        let (oh, ow) = (p.oh, p.ow);
        let bias = _mm512_set1_ps(p.b);
        // NaN passes through as in the scalar clamp: max and min return their second operand
        // when either is NaN.
        let bounds = p.clamp.map(|(lo, hi)| (_mm512_set1_ps(lo), _mm512_set1_ps(hi)));
        let mut ahead = Ahead::new(p, oh.div_ceil(R) * ow.div_ceil(16 * U));
        // Square kernels: the taps' weights in registers, the columns each kernel column reads.
        let mut wk = [_mm512_setzero_ps(); 25];
        let mut cols = [0usize; 5];
        if K > 0 {
            assert!(p.offs.len() == K * K && p.k.len() >= K * K && p.row_step == S * p.row);
            for (w, &v) in wk.iter_mut().zip(&p.k[..K * K]) {
                *w = _mm512_set1_ps(v);
            }
            for (c, &o) in cols.iter_mut().zip(&p.offs[..K]) {
                *c = o;
            }
            // Tap (ki, kj) reads row ki of the tile's input rows at column offset cols[kj].
            debug_assert!((0..K * K).all(|t| p.offs[t] == t / K * p.row + cols[t % K]));
        }
        for oy0 in (0..oh).step_by(R) {
            for c0 in (0..ow).step_by(16 * U) {
                ahead_step!(ahead, p);
                // SAFETY: inside the buffer (the caller's contract).
                let rows: [*const f32; R] = std::array::from_fn(|r| unsafe { p.buf.add((oy0 + r) * p.row_step + c0) });
                let mut acc = [[bias; U]; R];
                if K > 0 {
                    // SAFETY: the tile's input rows, the ones the per-tap loop below reads (the
                    // same addresses, each loaded once).
                    let base = unsafe { p.buf.add(oy0 * p.row_step + c0) };
                    // Each input row J as its own constant, so that the rows of `acc` it feeds
                    // are constants and the sums stay in registers.
                    macro_rules! rows {
                        ($($j:literal)*) => {
                            const { assert!(K == 0 || (R - 1) * S + K <= 20, "a tile reads at most twenty input rows") };
                            // SAFETY: as above; rows past (R − 1)·S + K return at once.
                            $(unsafe { reuse::<$j, R, U, K, S>(base, p.row, &cols, &wk, &mut acc) };)*
                        };
                    }
                    rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19);
                } else {
                    for (&o, &w) in p.offs.iter().zip(p.k) {
                        let wv = _mm512_set1_ps(w);
                        for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                            for (u, a) in acc.iter_mut().enumerate() {
                                // SAFETY: as above.
                                let v = unsafe { _mm512_loadu_ps(row.add(o + 16 * u)) };
                                *a = _mm512_fmadd_ps(wv, v, *a);
                            }
                        }
                    }
                }
                // SAFETY: the tile's outputs inside the plane (the caller's contract).
                unsafe { store_tile!(p, acc, oy0, c0, bounds) };
            }
        }
    }

    /// Prefetches of the task's next input plane (and of the lines of the output plane after
    /// this one), spread over this plane's tiles: each plane's copy-in otherwise waited on its
    /// input's misses, and its stores on their lines' reads (see `DwScratch::next`).
    #[cfg(target_arch = "x86_64")]
    struct Ahead {
        lines: usize,
        per: usize,
        line: usize,
    }

    #[cfg(target_arch = "x86_64")]
    impl Ahead {
        fn new(p: &Plane, tiles: usize) -> Self {
            let lines = p.next.1.div_ceil(64);
            Ahead { lines, per: lines.div_ceil(tiles.max(1)), line: 0 }
        }
    }

    /// Whether stride-2 layers take [`run_plain2`] (`RELPROP_DW_PLAIN=off` keeps them on the
    /// column-phase rows, for A/B timing in one binary).
    pub(super) fn plain_enabled() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        crate::ops::switch_on(&ON, "RELPROP_DW_PLAIN")
    }

    /// [`run`] for a stride-2 `K×K` kernel over plain padded rows: output column `c` reads padded
    /// columns `2c + kj`, so a vector of sixteen outputs reads thirty-two consecutive values per
    /// tap pair, which two loads and two permutes split into the even (`kj`) and odd (`kj + 1`)
    /// columns. Each input row's vectors feed every output row of the tile that reads them.
    ///
    /// # Safety
    /// AVX-512F present; the tile's reads inside `buf` (`plane` checks the last), every output
    /// inside `out`'s plane; `p.row` is the buffer's row length and `p.row_step` twice it.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_plain2<const R: usize, const U: usize, const K: usize>(p: &Plane) {
        use std::arch::x86_64::*;
        let (oh, ow) = (p.oh, p.ow);
        assert!(p.k.len() >= K * K && p.row_step == 2 * p.row);
        let bias = _mm512_set1_ps(p.b);
        let bounds = p.clamp.map(|(lo, hi)| (_mm512_set1_ps(lo), _mm512_set1_ps(hi)));
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let mut wk = [_mm512_setzero_ps(); 25];
        for (w, &v) in wk.iter_mut().zip(&p.k[..K * K]) {
            *w = _mm512_set1_ps(v);
        }
        let mut ahead = Ahead::new(p, oh.div_ceil(R) * ow.div_ceil(16 * U));
        for oy0 in (0..oh).step_by(R) {
            for c0 in (0..ow).step_by(16 * U) {
                ahead_step!(ahead, p);
                let mut acc = [[bias; U]; R];
                // SAFETY: the tile's first input row, inside the buffer (checked by the caller).
                let base = unsafe { p.buf.add(oy0 * 2 * p.row + 2 * c0) };
                // Each input row J as its own constant, so that the output rows it feeds are
                // constants and the sums stay in registers (as in `run`).
                macro_rules! rows {
                    ($($j:literal)*) => {
                        const { assert!((R - 1) * 2 + K <= 20, "a tile reads at most twenty input rows") };
                        // SAFETY: as above; rows past (R − 1)·2 + K return at once.
                        $(unsafe { plain2_row::<$j, R, U, K>(base, p.row, &wk, (even, odd), &mut acc) };)*
                    };
                }
                rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19);
                // SAFETY: the tile's outputs inside the plane (the caller's contract).
                unsafe { store_tile!(p, acc, oy0, c0, bounds) };
            }
        }
    }

    /// Input row `J` of a [`run_plain2`] tile: its even and odd columns per tap pair, each
    /// multiplied into the output rows `r` that read it (kernel row `J − 2r`).
    ///
    /// # Safety
    /// AVX-512F present; the tile's input rows lie inside the buffer.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // `u` indexes the loads' columns as well as `acc`
    unsafe fn plain2_row<const J: usize, const R: usize, const U: usize, const K: usize>(
        base: *const f32,
        row: usize,
        wk: &[std::arch::x86_64::__m512; 25],
        (even, odd): (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i),
        acc: &mut [[std::arch::x86_64::__m512; U]; R],
    ) {
        use std::arch::x86_64::*;
        if J >= (R - 1) * 2 + K {
            return;
        }
        // SAFETY: input row J of the tile (the caller's contract).
        let src = unsafe { base.add(J * row) };
        for u in 0..U {
            for pair in 0..K.div_ceil(2) {
                let kj = 2 * pair;
                // SAFETY: as above.
                let (a, b) =
                    unsafe { (_mm512_loadu_ps(src.add(32 * u + kj)), _mm512_loadu_ps(src.add(32 * u + kj + 16))) };
                let ve = _mm512_permutex2var_ps(a, even, b);
                let vo = _mm512_permutex2var_ps(a, odd, b);
                for ki in 0..K {
                    if J >= ki && (J - ki).is_multiple_of(2) && (J - ki) / 2 < R {
                        let r = (J - ki) / 2;
                        acc[r][u] = _mm512_fmadd_ps(wk[ki * K + kj], ve, acc[r][u]);
                        if kj + 1 < K {
                            acc[r][u] = _mm512_fmadd_ps(wk[ki * K + kj + 1], vo, acc[r][u]);
                        }
                    }
                }
            }
        }
    }

    /// Input row `J` of a tile of `R` output rows (`S` input rows apart) under a `K×K` kernel:
    /// each of its `K·U` vectors is loaded once and multiplied into every output row that reads
    /// it. The per-tap loop loaded each input vector once per output row that read it (up to
    /// `K` times), with most loads across two cache lines.
    ///
    /// # Safety
    /// AVX-512F present; the tile's input rows lie inside the buffer.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // `u` indexes the loads' columns as well as `acc`
    unsafe fn reuse<const J: usize, const R: usize, const U: usize, const K: usize, const S: usize>(
        base: *const f32,
        row: usize,
        cols: &[usize; 5],
        wk: &[std::arch::x86_64::__m512; 25],
        acc: &mut [[std::arch::x86_64::__m512; U]; R],
    ) {
        use std::arch::x86_64::*;
        if K == 0 || J >= (R - 1) * S + K {
            return;
        }
        // SAFETY: input row J of the tile (the caller's contract).
        let src = unsafe { base.add(J * row) };
        for kj in 0..K {
            for u in 0..U {
                // SAFETY: as above.
                let v = unsafe { _mm512_loadu_ps(src.add(cols[kj] + 16 * u)) };
                for ki in 0..K {
                    if J >= ki && (J - ki).is_multiple_of(S) && (J - ki) / S < R {
                        let r = (J - ki) / S;
                        acc[r][u] = _mm512_fmadd_ps(wk[ki * K + kj], v, acc[r][u]);
                    }
                }
            }
        }
    }
}

/// Depthwise input-VJP for one channel, `dx_plane += convᵀ(dy_plane, k)`, row by row: only for
/// paddings wider than the kernel, which the blocked form cannot express (see [`depthwise_vjp_geom`]).
fn depthwise_plane_t<T: Float>(g: &ConvGeom, dy: &[T], k: &[T], dx: &mut [T], oh: usize, ow: usize) {
    let ph = PhaseRows::new(g, ow);
    let mut buf = vec![T::zero(); g.h * ph.row];
    for oy in 0..oh {
        let drow = &dy[oy * ow..(oy + 1) * ow];
        for ki in 0..g.kh {
            let Some(iy) = (oy * g.stride[0] + ki * g.dilation[0]).checked_sub(g.pads[0]).filter(|&i| i < g.h) else {
                continue;
            };
            let row = &mut buf[iy * ph.row..(iy + 1) * ph.row];
            for kj in 0..g.kw {
                let wv = k[ki * g.kw + kj];
                let s = ph.start(kj);
                row[s..s + ow].iter_mut().zip(drow).for_each(|(a, &b)| *a += wv * b);
            }
        }
    }
    for iy in 0..g.h {
        ph.gather_add(&buf[iy * ph.row..(iy + 1) * ph.row], &mut dx[iy * g.w..(iy + 1) * g.w]);
    }
}

/// One input row, zero-padded left and right and split by column phase modulo the stride, so that
/// every tap reads (or, in the VJP, writes) a contiguous run of `ow` values whatever the stride:
/// padded column `p` lives at `(p % s) · len + p / s`.
pub(super) struct PhaseRows {
    stride: usize,
    dilation: usize,
    pad: usize,
    /// Length of one phase.
    len: usize,
    /// Length of one split row (`stride · len`).
    row: usize,
}

impl PhaseRows {
    pub(super) fn new(g: &ConvGeom, ow: usize) -> Self {
        let s = g.stride[1];
        let wp = g.w + g.pads[1] + g.pads[3];
        // Every tap's run must fit: (ow − 1) + t / s < len for all taps t = kj · d.
        let len = wp.div_ceil(s).max(ow - 1 + (g.kw - 1) * g.dilation[1] / s + 1);
        PhaseRows { stride: s, dilation: g.dilation[1], pad: g.pads[1], len, row: s * len }
    }
    /// Length of one split row.
    pub(super) fn row_len(&self) -> usize {
        self.row
    }
    /// Where tap `kj`'s run of `ow` values starts.
    pub(super) fn start(&self, kj: usize) -> usize {
        let t = kj * self.dilation;
        (t % self.stride) * self.len + t / self.stride
    }
    /// Calls `f(first column, first slot, count)` for each phase: columns `first + j·s` live at
    /// slots `first slot + j` (integer division per column was the kernel's main cost).
    fn phases(&self, cols: usize, mut f: impl FnMut(usize, usize, usize)) {
        let s = self.stride;
        for phase in 0..s {
            // First column c with (c + pad) % s == phase.
            let c0 = (phase + s - self.pad % s) % s;
            if c0 >= cols {
                continue;
            }
            f(c0, phase * self.len + (c0 + self.pad) / s, (cols - c0).div_ceil(s));
        }
    }
    /// Slot of column `c`.
    fn slot(&self, c: usize) -> usize {
        let p = c + self.pad;
        (p % self.stride) * self.len + p / self.stride
    }
    /// Stride 2 as pairs of columns: (even, odd) padded columns go to the same slot of the two
    /// phases, a loop the compiler vectorises with shuffles (a strided loop per phase ran scalar
    /// and was the depthwise kernels' main cost). Returns the first paired column, its slot and the
    /// number of pairs; the caller places the columns before and after them.
    fn pairs(&self, cols: usize) -> (usize, usize, usize) {
        let c0 = self.pad % 2;
        let npairs = cols.saturating_sub(c0) / 2;
        (c0, (c0 + self.pad) / 2, npairs)
    }
    pub(super) fn scatter<T: Float>(&self, src: &[T], dst: &mut [T]) {
        match self.stride {
            1 => dst[self.pad..self.pad + src.len()].copy_from_slice(src),
            2 => {
                let (c0, slot, np) = self.pairs(src.len());
                let (d0, d1) = dst.split_at_mut(self.len);
                let (d0, d1) = (&mut d0[slot..slot + np], &mut d1[slot..slot + np]);
                let ps = &src[c0..c0 + 2 * np];
                // Eight pairs at a time as fixed-size arrays, which the compiler turns into vector
                // shuffles (the loop over single pairs ran scalar: 70 % of a stride-2 depthwise
                // convolution's time went to this copy).
                let full = np / 8 * 8;
                for ((e, o), p) in
                    d0[..full].chunks_exact_mut(8).zip(d1[..full].chunks_exact_mut(8)).zip(ps.chunks_exact(16))
                {
                    let p: &[T; 16] = p.try_into().expect("chunks_exact");
                    e.copy_from_slice(&std::array::from_fn::<T, 8, _>(|j| p[2 * j]));
                    o.copy_from_slice(&std::array::from_fn::<T, 8, _>(|j| p[2 * j + 1]));
                }
                for j in full..np {
                    d0[j] = ps[2 * j];
                    d1[j] = ps[2 * j + 1];
                }
                for c in (0..c0).chain(c0 + 2 * np..src.len()) {
                    dst[self.slot(c)] = src[c];
                }
            }
            _ => self.phases(src.len(), |c0, slot, n| {
                for (d, &v) in dst[slot..slot + n].iter_mut().zip(src[c0..].iter().step_by(self.stride)) {
                    *d = v;
                }
            }),
        }
    }
    fn gather_add<T: Float>(&self, src: &[T], dst: &mut [T]) {
        match self.stride {
            1 => dst.iter_mut().zip(&src[self.pad..]).for_each(|(a, &b)| *a += b),
            2 => {
                let (c0, slot, np) = self.pairs(dst.len());
                let (s0, s1) = src.split_at(self.len);
                let pairs = dst[c0..c0 + 2 * np].chunks_exact_mut(2);
                for ((&a, &b), p) in s0[slot..slot + np].iter().zip(&s1[slot..slot + np]).zip(pairs) {
                    p[0] += a;
                    p[1] += b;
                }
                for c in (0..c0).chain(c0 + 2 * np..dst.len()) {
                    dst[c] += src[self.slot(c)];
                }
            }
            _ => {
                let s = self.stride;
                self.phases(dst.len(), |c0, slot, n| {
                    for (a, &v) in dst[c0..].iter_mut().step_by(s).zip(&src[slot..slot + n]) {
                        *a += v;
                    }
                });
            }
        }
    }
}

/// How many channels one parallel task takes: about four tasks per thread, each with enough
/// work (≥ 64k multiply-adds) that rayon's scheduling does not dominate; all in one task when
/// the caller is already parallel.
fn channels_per_task(channels: usize, macs_per_channel: usize, threads: Threads) -> usize {
    if threads == Threads::One {
        return channels.max(1);
    }
    let by_count = channels.div_ceil(4 * rayon::current_num_threads()).max(1);
    let by_work = (1usize << 16).div_ceil(macs_per_channel.max(1));
    by_count.max(by_work).min(channels.max(1))
}

/// Whether convolutions of this geometry in `T` (and their input VJPs) take the Winograd kernel
/// (`RELPROP_WINOGRAD=off` switches it off): for tests and diagnostics.
pub fn takes_winograd<T: Float>(g: &ConvGeom) -> bool {
    winograd::Geom::forward::<T>(g).is_some() && winograd::Geom::vjp::<T>(g).is_some()
}

/// Forward convolution. `x` is [n, c, h, w], `wt` is [m, c/group, kh, kw], `bias` is `[m]`;
/// returns [n, m, oh, ow]. The caller checks the geometry (see [`ConvGeom::out_hw`]).
pub fn conv2d<T: Float>(g: &ConvGeom, x: &[T], wt: &[T], bias: Option<&[T]>) -> Vec<T> {
    conv2d_clamped(g, x, wt, bias, None)
}

/// [`conv2d`] followed by clamping every output to `[lo, hi]` (a fused ReLU or ReLU6: the clamp
/// runs while the output is still in cache instead of as a separate pass over memory).
pub fn conv2d_clamped<T: Float>(g: &ConvGeom, x: &[T], wt: &[T], bias: Option<&[T]>, clamp: Option<(T, T)>) -> Vec<T> {
    conv2d_onto(g, x, wt, bias, clamp, None)
}

/// [`conv2d_clamped`] of `init + conv(x)`: a residual sum computed by the convolution, which
/// accumulates onto `init` (its buffer becomes the output) instead of a separate pass adding two
/// tensors. `init` is [n, m, oh, ow]; not for depthwise convolutions (their kernel stores).
pub fn conv2d_onto<T: Float>(
    g: &ConvGeom,
    x: &[T],
    wt: &[T],
    bias: Option<&[T]>,
    clamp: Option<(T, T)>,
    init: Option<Vec<T>>,
) -> Vec<T> {
    conv2d_post(g, x, wt, bias, clamp, init, None)
}

/// What runs on a convolution's output planes as soon as they are written: `post(sample,
/// channels, planes)` gets the planes of those output channels of that sample (contiguous, `oh·ow`
/// each), and may rewrite them. Depthwise kernels call it per channel or group of channels, while
/// the planes are in cache (LRP's ratio after its modified forward, its multiply by the input
/// after its VJP: each was a pass over memory); the other kernels per sample.
pub type Post<'a, T> = &'a (dyn Fn(usize, Range<usize>, &mut [T]) + Sync);

/// [`conv2d_clamped`] with `post` on its output planes (see [`Post`]).
pub fn conv2d_then<T: Float>(g: &ConvGeom, x: &[T], wt: &[T], bias: Option<&[T]>, post: Post<'_, T>) -> Vec<T> {
    conv2d_post(g, x, wt, bias, None, None, Some(post))
}

/// [`conv2d_onto`] with an optional `post` (see [`Post`]).
fn conv2d_post<T: Float>(
    g: &ConvGeom,
    x: &[T],
    wt: &[T],
    bias: Option<&[T]>,
    clamp: Option<(T, T)>,
    init: Option<Vec<T>>,
    post: Option<Post<'_, T>>,
) -> Vec<T> {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    let ohw = oh * ow;
    let (cg, mg, kdim) = (g.cg(), g.mg(), g.kdim());
    let depthwise = g.is_depthwise();
    let total = g.n * g.m * ohw;
    // The caller checks both (a silently ignored initial output would be a wrong sum).
    assert!(
        init.as_ref().is_none_or(|v| !depthwise && v.len() == total),
        "an initial output needs a non-depthwise convolution and the output's length"
    );
    // The GEMM paths add the bias and clamp in the product's epilogue, while each part of the
    // output is still in cache (a bias fill before the product and a clamp pass after it were two
    // more passes over memory); the depthwise kernel writes its bias and clamp itself.
    let accumulate = init.is_some();
    // Without an initial output the kernels write every element without reading it, so the
    // buffer starts uninitialised: zeroing it first was a pass over memory as long as the
    // product's own (EfficientNet-Lite0's forward 11.9 -> 10.1 ms).
    let mut out = init.unwrap_or_else(|| Vec::with_capacity(total));
    let op = SendPtr(out.as_mut_ptr());
    // Unit tests poison the buffer so that an element the kernels miss shows up as NaN.
    #[cfg(test)]
    if !accumulate {
        // SAFETY: within the allocated capacity.
        (0..total).for_each(|i| unsafe { op.0.add(i).write(T::of(f64::NAN)) });
    }
    // 3×3 stride-1 layers: the transformed kernels, once for all samples (see `winograd`).
    let wino = winograd::Geom::forward::<T>(g).map(|geom| (geom, winograd::Weights::new(&geom, wt, false)));
    // The stem kernel's packed weights, once for all samples; not where the Winograd kernel runs
    // (3×3 layers with 16 or 17 input channels qualify for both, and it takes precedence).
    let stem = (wino.is_none() && direct::pays::<T>(g)).then(|| direct::Direct::new(g, wt, bias, clamp));
    // Other stride-1 layers with small kernels: one product per tap over shifted views (see
    // `shifted`).
    let shift = wino.is_none() && stem.is_none() && shifted::applies::<T>(g);
    // Stride-2 layers: the same kernel over the input's four phases (see `shifted::sample_stride2`).
    let shift2 = wino.is_none() && stem.is_none() && !shift && shifted::applies_stride2::<T>(g);
    // Writes one sample's outputs at `ys`, [m, oh, ow].
    let sample = |s: usize, xs: &[T], ys: *mut T, threads: Threads| {
        if depthwise {
            // SAFETY: ys holds this sample's outputs, initialised when accumulating.
            unsafe { depthwise_sample(g, s, xs, wt, bias, clamp, ys, accumulate, threads, post) };
            return;
        }
        if let Some((geom, u)) = &wino {
            let epi = winograd::Epi {
                bias: bias.map(super::as_f32),
                clamp: clamp.map(|(lo, hi)| (lo.f64() as f32, hi.f64() as f32)),
                accumulate,
            };
            // SAFETY: ys holds this sample's outputs, initialised when accumulating.
            unsafe { winograd::sample(geom, &[(xs, u)], ys, epi, threads) };
            return;
        }
        // Few input channels (a stem): the direct kernel, no im2col (see `direct`).
        if let Some(d) = &stem {
            // SAFETY: pays() checked; ys holds this sample's outputs, initialised when accumulating.
            unsafe { d.sample(xs, ys, accumulate, threads) };
            return;
        }
        if shift {
            // SAFETY: ys holds this sample's outputs, initialised when accumulating.
            unsafe { shifted::sample(g, &[(xs, wt)], false, bias, clamp, ys, accumulate, threads) };
            return;
        }
        if shift2 {
            // SAFETY: applies_stride2 checked; ys holds this sample's outputs, initialised when
            // accumulating.
            unsafe { shifted::sample_stride2(g, xs, wt, bias, clamp, ys, accumulate, threads) };
            return;
        }
        // 1×1 with few input channels: the register kernel with its epilogue (see `pointwise`).
        if pointwise::applies::<T>(g) {
            // SAFETY: applies checked; ys holds this sample's outputs, initialised when
            // accumulating.
            unsafe { pointwise::sample(g, &[(xs, wt)], false, bias, clamp, ys, accumulate, threads) };
            return;
        }
        // 1×1: one tile, the whole plane (tiles that stay in cache from bias to clamp measured no
        // faster on EfficientNet-Lite0, smaller ones slower: the product's packing repeats per tile).
        let tile = if g.is_pointwise() { oh } else { tile_rows(kdim, oh, ow) }.max(1);
        let mut col: Vec<MaybeUninit<T>> = Vec::with_capacity(if g.is_pointwise() { 0 } else { kdim * tile * ow });
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { col.set_len(col.capacity()) };
        // Unit tests poison it, so that an element im2col misses shows up as NaN.
        #[cfg(test)]
        col.iter_mut().for_each(|v| {
            v.write(T::of(f64::NAN));
        });
        for gi in 0..g.group {
            let xg = &xs[gi * cg * g.h * g.w..(gi + 1) * cg * g.h * g.w];
            let a = Mat::rows(&wt[gi * mg * kdim..(gi + 1) * mg * kdim], kdim);
            for oy0 in (0..oh).step_by(tile) {
                let rows = oy0..(oy0 + tile).min(oh);
                let span = rows.len() * ow;
                // The tile's input columns: the pixels themselves (1×1) or their patches.
                let b = if g.is_pointwise() {
                    Mat { data: &xg[oy0 * ow..], rs: ohw, cs: 1 }
                } else {
                    Mat::rows(im2col(g, xg, &mut col, rows, ow, threads), span)
                };
                // The tile's outputs: columns oy0·ow.. of each output channel (row stride oh·ow).
                // One pass for both: the part is larger than L1, and a bias pass then a clamp
                // pass read and wrote it twice from L2 (4 % of EfficientNet-Lite0's forward
                // cycles in `perf`).
                let epi = |row: usize, _: usize, seg: &mut [T]| {
                    let bv = bias.map_or(T::zero(), |b| b[gi * mg + row]);
                    match clamp {
                        Some((lo, hi)) => seg.iter_mut().for_each(|v| *v = super::elementwise::clamp(*v + bv, lo, hi)),
                        None => seg.iter_mut().for_each(|v| *v += bv),
                    }
                };
                let epi: Option<Epilogue<T>> = (bias.is_some() || clamp.is_some()).then_some(&epi);
                let start = gi * mg * ohw + oy0 * ow;
                // SAFETY: the block lies inside this sample's [m, oh, ow] outputs; the product
                // writes it before the epilogue reads it, and reads it only when accumulating
                // onto an initial output.
                unsafe {
                    matmul_raw(mg, span, kdim, a, b, ys.add(start), g.m * ohw - start, ohw, accumulate, threads, epi)
                };
            }
        }
    };
    let xsz = g.c * g.h * g.w;
    let ysz = g.m * ohw;
    // The other kernels' outputs meet `post` per sample, after the whole sample is written.
    let sample = |s: usize, xs: &[T], ys: *mut T, threads: Threads| {
        sample(s, xs, ys, threads);
        if let (Some(post), false) = (post, depthwise) {
            // SAFETY: sample s's outputs, all written above, by this call alone.
            post(s, 0..g.m, unsafe { std::slice::from_raw_parts_mut(ys, ysz) });
        }
    };
    if g.n > 1 {
        (0..g.n).into_par_iter().for_each(|s| {
            let op = &op;
            // SAFETY: sample s's own outputs.
            sample(s, &x[s * xsz..(s + 1) * xsz], unsafe { op.0.add(s * ysz) }, Threads::One)
        });
    } else if g.n == 1 {
        sample(0, &x[..xsz], op.0, Threads::Pool);
    }
    // SAFETY: every element was written above (the kernels cover each output once per sample), or
    // came initialised in `init`.
    unsafe { out.set_len(total) };
    out
}

/// One sample of a depthwise convolution (see [`conv2d_onto`]) into `ys`, its `[m, oh, ow]`
/// outputs, with `post` on each channel's plane (or group of planes) as it is written.
///
/// # Safety
/// `ys` valid for writes of the sample's outputs, not aliased during the call, and initialised
/// when `accumulate`.
#[allow(clippy::too_many_arguments)] // the convolution's full context; a struct would only rename it
unsafe fn depthwise_sample<T: Float>(
    g: &ConvGeom,
    s: usize,
    xs: &[T],
    wt: &[T],
    bias: Option<&[T]>,
    clamp: Option<(T, T)>,
    ys: *mut T,
    accumulate: bool,
    threads: Threads,
    post: Option<Post<'_, T>>,
) {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    let (ohw, mg, kk) = (oh * ow, g.mg(), g.kh * g.kw);
    let ys = SendPtr(ys);
    // Channels c0..c0 + n of the sample. A function of the whole `SendPtr` (a closure would
    // capture its raw pointer field, which is not Sync).
    let planes = |ys: &SendPtr<T>, c0: usize, n: usize| {
        // SAFETY: the caller's buffer; each task owns the planes it writes.
        unsafe { std::slice::from_raw_parts_mut(ys.0.add(c0 * ohw), n * ohw) }
    };
    // Small planes: sixteen channels per vector instead of sixteen columns of one channel
    // (see `depthwise16`).
    if mg == 1 && depthwise16::available::<T>() && depthwise16::pays(ow) {
        let groups = g.m.div_ceil(LANES);
        let per = channels_per_task(groups, ohw * kk * LANES, threads);
        (0..groups.div_ceil(per)).into_par_iter().for_each(|t| {
            let mut sc = depthwise16::Scratch::new(g, [1, 1]);
            for gi in t * per..((t + 1) * per).min(groups) {
                let c0 = gi * LANES;
                let n = LANES.min(g.m - c0);
                let hw = g.h * g.w;
                // SAFETY: T is f32 with AVX-512F (checked above); planes c0..c0 + n of this
                // sample, written by this task alone.
                unsafe {
                    sc.run(
                        n,
                        &xs[c0 * hw..],
                        hw,
                        &wt[c0 * kk..],
                        bias.map(|b| &b[c0..]),
                        ys.0.add(c0 * ohw),
                        clamp,
                        accumulate,
                    )
                };
                if let Some(post) = post {
                    post(s, c0..c0 + n, planes(&ys, c0, n));
                }
            }
        });
        return;
    }
    let per = channels_per_task(g.m, ohw * kk, threads);
    (0..g.m.div_ceil(per)).into_par_iter().for_each(|t| {
        let mut sc = DwScratch::new(g, oh, ow);
        for oc in t * per..((t + 1) * per).min(g.m) {
            // Output channel oc reads input channel oc / mg (mg > 1: a channel multiplier).
            let xp = &xs[oc / mg * g.h * g.w..(oc / mg + 1) * g.h * g.w];
            let b = bias.map_or(T::zero(), |b| b[oc]);
            sc.next = if oc + 1 < ((t + 1) * per).min(g.m) {
                let nx = &xs[(oc + 1) / mg * g.h * g.w..];
                (nx.as_ptr() as usize, g.h * g.w * std::mem::size_of::<T>())
            } else {
                (0, 0)
            };
            // SAFETY: plane oc of this sample, written by this task alone.
            unsafe {
                let plane = ys.0.add(oc * ohw);
                depthwise_blocked(g, &mut sc, xp, &wt[oc * kk..(oc + 1) * kk], b, plane, clamp, accumulate)
            };
            if let Some(post) = post {
                post(s, oc..oc + 1, planes(&ys, oc, 1));
            }
        }
    });
}

/// Input VJP of [`conv2d`] (a transposed convolution): given `dy` [n, m, oh, ow], returns
/// `dx` [n, c, h, w] = Jᵀ dy. Output padding is implied by the stored input size.
pub fn conv2d_vjp<T: Float>(g: &ConvGeom, dy: &[T], wt: &[T]) -> Vec<T> {
    conv2d_vjp_sum(g, &[(dy, wt)])
}

/// `Σ_k Jᵀ_{w_k} dy_k` for several (output gradient, weights) pairs of one geometry, with one
/// col2im (the matrix products accumulate into one column buffer). LRP's γ and αβ rules need two.
pub fn conv2d_vjp_sum<T: Float>(g: &ConvGeom, terms: &[(&[T], &[T])]) -> Vec<T> {
    vjp_post(g, terms, None)
}

/// [`conv2d_vjp`] with `post` on its output planes, the input's channels (see [`Post`]).
pub fn conv2d_vjp_then<T: Float>(g: &ConvGeom, dy: &[T], wt: &[T], post: Post<'_, T>) -> Vec<T> {
    let mut dx = vjp_post(g, &[(dy, wt)], Some(post));
    // Depthwise layers ran it per plane; the other kernels' outputs meet it per sample here.
    if !g.is_depthwise() {
        let xsz = g.c * g.h * g.w;
        dx.par_chunks_mut(xsz.max(1)).enumerate().for_each(|(s, dxs)| post(s, 0..g.c, dxs));
    }
    dx
}

/// [`conv2d_vjp_sum`], with `post` on each plane as the depthwise kernels write it (the other
/// kernels leave it to the caller).
fn vjp_post<T: Float>(g: &ConvGeom, terms: &[(&[T], &[T])], post: Option<Post<'_, T>>) -> Vec<T> {
    let (oh, ow) = g.out_hw().expect("geometry checked by caller");
    let ohw = oh * ow;
    let (cg, mg, kdim) = (g.cg(), g.mg(), g.kdim());
    let hw = g.h * g.w;
    if terms.is_empty() {
        return vec![T::zero(); g.n * g.c * hw];
    }
    if g.is_pointwise() && !g.is_depthwise() {
        return pointwise_vjp_sum(g, terms);
    }
    let xsz = g.c * hw;
    let ysz = g.m * ohw;
    fn part<T>(dy: &[T], s: usize, len: usize) -> &[T] {
        &dy[s * len..(s + 1) * len]
    }
    // 3×3 stride-1 layers (see `winograd`): the transformed kernels, flipped and transposed, once
    // for all samples, and an uninitialised output, since the kernel writes every element (the
    // other paths accumulate into zeros; a zero fill is a pass over memory as long as the output).
    let registers = shifted_vjp_geom(g).filter(|gv| shifted::beats_winograd_vjp::<T>(gv));
    if let Some(geom) = winograd::Geom::vjp::<T>(g).filter(|_| registers.is_none()) {
        let us: Vec<_> = terms.iter().map(|(_, wt)| winograd::Weights::new(&geom, wt, true)).collect();
        return per_sample_uninit(g.n, xsz, |s, dxs, threads| {
            let ts: Vec<(&[T], &winograd::Weights)> =
                terms.iter().zip(&us).map(|((dy, _), u)| (part(dy, s, ysz), u)).collect();
            let epi = winograd::Epi { bias: None, clamp: None, accumulate: false };
            // SAFETY: sample s's [c, h, w] input gradient, the VJP geometry's output.
            unsafe { winograd::sample(&geom, &ts, dxs, epi, threads) };
        });
    }
    // Stride-1 layers with small weights and at most 64 output channels: the shifted products of
    // the output gradient with the flipped, transposed kernel (see `shifted`), into an
    // uninitialised output as above. DenseNet-121's 32→128 VJPs on 14×14 planes ran 0.6× their
    // im2col time; a 128→128 one on 14×14 1.15× (`convbench`, batch 1), so wider layers keep
    // im2col and col2im, unless the register-blocked kernel takes them (`registers` above, ahead
    // of Winograd too: see `shifted::beats_winograd_vjp`).
    if let Some(gv) = registers.or_else(|| shifted_vjp_geom(g).filter(|gv| gv.c <= 64 && shifted::applies::<T>(gv))) {
        return per_sample_uninit(g.n, xsz, |s, dxs, threads| {
            let ts: Vec<(&[T], &[T])> = terms.iter().map(|(dy, wt)| (part(dy, s, ysz), *wt)).collect();
            // SAFETY: sample s's [c, h, w] input gradient, the VJP geometry's output.
            unsafe { shifted::sample(&gv, &ts, true, None, None, dxs, false, threads) };
        });
    }
    let mut dx = vec![T::zero(); g.n * g.c * hw];
    let vjp_geom = if g.is_depthwise() { depthwise_vjp_geom(g, oh, ow) } else { None };
    // `s`: the sample index.
    let sample = |s: usize, dxs: &mut [T], threads: Threads| {
        // As in the forward: sixteen channels per vector on small planes.
        if let Some(gv) = vjp_geom
            && mg == 1
            && depthwise16::available::<T>()
            && depthwise16::pays(g.w)
        {
            let kk = g.kh * g.kw;
            let groups = g.c.div_ceil(LANES);
            let per = channels_per_task(groups, ohw * kk * LANES * terms.len(), threads);
            dxs.par_chunks_mut(hw * per * LANES).enumerate().for_each(|(t, block)| {
                let mut sc = depthwise16::Scratch::new(&gv, g.stride);
                let mut flipped = vec![T::zero(); kk * LANES];
                for (i, dxg) in block.chunks_mut(hw * LANES).enumerate() {
                    let c0 = (t * per + i) * LANES;
                    let n = dxg.len() / hw;
                    for (k, (dy, wt)) in terms.iter().enumerate() {
                        for (f, w) in flipped.chunks_exact_mut(kk).zip(wt[c0 * kk..(c0 + n) * kk].chunks_exact(kk)) {
                            f.iter_mut().zip(w.iter().rev()).for_each(|(f, &v)| *f = v);
                        }
                        let dyg = &part(dy, s, ysz)[c0 * ohw..];
                        // SAFETY: T is f32 with AVX-512F (checked above); dxg is this task's
                        // initialised planes c0..c0 + n, the VJP geometry's outputs.
                        unsafe { sc.run(n, dyg, ohw, &flipped, None, dxg.as_mut_ptr(), None, k > 0) };
                    }
                    if let Some(post) = post {
                        post(s, c0..c0 + n, dxg);
                    }
                }
            });
            return;
        }
        if let Some(gv) = vjp_geom {
            let kk = g.kh * g.kw;
            let per = channels_per_task(g.c, ohw * mg * kk * terms.len(), threads);
            dxs.par_chunks_mut(hw * per).enumerate().for_each(|(t, block)| {
                let mut sc = DwScratch::new(&gv, g.h, g.w);
                sc.up = g.stride;
                let mut flipped = vec![T::zero(); kk];
                for (i, dxp) in block.chunks_mut(hw).enumerate() {
                    // Input channel ci gets the VJPs of its mg output channels, summed.
                    let ci = t * per + i;
                    let mut first = true;
                    for (dy, wt) in terms {
                        for oc in ci * mg..(ci + 1) * mg {
                            flipped.iter_mut().zip(wt[oc * kk..(oc + 1) * kk].iter().rev()).for_each(|(f, &v)| *f = v);
                            let dyp = &part(dy, s, ysz)[oc * ohw..(oc + 1) * ohw];
                            // SAFETY: dxp is this task's initialised [h, w] plane, the VJP
                            // geometry's output.
                            unsafe {
                                depthwise_blocked(
                                    &gv,
                                    &mut sc,
                                    dyp,
                                    &flipped,
                                    T::zero(),
                                    dxp.as_mut_ptr(),
                                    None,
                                    !first,
                                )
                            };
                            first = false;
                        }
                    }
                    if let Some(post) = post {
                        post(s, ci..ci + 1, dxp);
                    }
                }
            });
            return;
        }
        // Padding wider than the kernel (see depthwise_vjp_geom): the row kernel.
        if g.is_depthwise() {
            let work = |(ci, xplane): (usize, &mut [T])| {
                for (dy, wt) in terms {
                    let dys = part(dy, s, ysz);
                    for oc in ci * mg..(ci + 1) * mg {
                        let k = &wt[oc * g.kh * g.kw..(oc + 1) * g.kh * g.kw];
                        depthwise_plane_t(g, &dys[oc * ohw..(oc + 1) * ohw], k, xplane, oh, ow);
                    }
                }
                if let Some(post) = post {
                    post(s, ci..ci + 1, xplane);
                }
            };
            let per = channels_per_task(g.c, ohw * mg * g.kh * g.kw * terms.len(), threads);
            dxs.par_chunks_mut(hw * per).enumerate().for_each(|(t, block)| {
                block.chunks_mut(hw).enumerate().for_each(|(k, plane)| work((t * per + k, plane)))
            });
            return;
        }
        let tile = tile_rows(kdim, oh, ow);
        // Uninitialised: the first term's product writes each tile's columns before anything
        // reads them (a zero fill was a pass over memory per sample and tile).
        let mut col: Vec<MaybeUninit<T>> = Vec::with_capacity(if g.is_pointwise() { 0 } else { kdim * tile * ow });
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { col.set_len(col.capacity()) };
        // colᵀ for small tiles (see `transposed_pays`).
        let mut flipped: Vec<MaybeUninit<T>> =
            Vec::with_capacity(if transposed_pays(tile * ow) { col.len() } else { 0 });
        // SAFETY: as above.
        unsafe { flipped.set_len(flipped.capacity()) };
        #[cfg(test)]
        col.iter_mut().for_each(|v| {
            v.write(T::of(f64::NAN));
        });
        for gi in 0..g.group {
            let dxg = &mut dxs[gi * cg * hw..(gi + 1) * cg * hw];
            for oy0 in (0..oh).step_by(tile) {
                let rows = oy0..(oy0 + tile).min(oh);
                let span = rows.len() * ow;
                let cp = col.as_mut_ptr() as *mut T;
                let flip = !flipped.is_empty();
                for (k, (dy, wt)) in terms.iter().enumerate() {
                    let wg = &wt[gi * mg * kdim..(gi + 1) * mg * kdim];
                    let dyg = &part(dy, s, ysz)[gi * mg * ohw + oy0 * ow..];
                    // SAFETY (both arms): kdim·span ≤ each buffer's length; the first term writes
                    // without reading, the later ones accumulate onto what it wrote.
                    if flip {
                        // colᵀ [span, kdim] = dyᵀ · w, transposed into col below.
                        let a = Mat { data: dyg, rs: 1, cs: ohw };
                        let tp = flipped.as_mut_ptr() as *mut T;
                        unsafe {
                            matmul_raw(
                                span,
                                kdim,
                                mg,
                                a,
                                Mat::rows(wg, kdim),
                                tp,
                                kdim * span,
                                kdim,
                                k > 0,
                                threads,
                                None,
                            )
                        };
                    } else {
                        // The tile's columns of dy: row stride oh·ow.
                        let b = Mat { data: dyg, rs: ohw, cs: 1 };
                        unsafe {
                            matmul_raw(
                                kdim,
                                span,
                                mg,
                                Mat::rows_t(wg, kdim),
                                b,
                                cp,
                                kdim * span,
                                span,
                                k > 0,
                                threads,
                                None,
                            )
                        };
                    }
                }
                if flip {
                    // SAFETY: written by the products above (terms is not empty); col has room
                    // for kdim·span elements, each written by the transpose.
                    unsafe {
                        let src = std::slice::from_raw_parts(flipped.as_ptr() as *const T, kdim * span);
                        transpose(src, span, kdim, cp, span, threads);
                    }
                }
                // SAFETY: written by the products above (terms is not empty, checked on entry).
                let filled = unsafe { std::slice::from_raw_parts(cp as *const T, kdim * span) };
                col2im(g, filled, dxg, rows, ow, threads);
            }
        }
    };
    if g.n > 1 {
        dx.par_chunks_mut(xsz).enumerate().for_each(|(s, dxs)| sample(s, dxs, Threads::One));
    } else if g.n == 1 {
        sample(0, &mut dx[..], Threads::Pool);
    }
    dx
}

/// Whether a VJP product over `span` output pixels runs faster with its output transposed
/// (pixels as rows) and then transposed back: the `gemm` crate lays its kernels' 64-row side
/// along the output's contiguous axis, and on 7×7 planes (49 pixels) read against weights with a
/// long inner axis the product ran 2.5× slower than the transposed one (`examples/vjpshape.rs`,
/// ResNet-50's 3×3 layers on 7×7 planes: 41 → 100 GFLOP/s on one thread; `convbench` with the
/// transpose: VJP 3.5 → 1.7–1.9 ms). On 14×14 planes the product alone gains 1.3×, but the layer
/// did not: 1.6 → 2.0–2.5 ms with an element-wise transpose, and equal within the noise with the
/// gathered, threaded one (`convbench`, 3 alternating runs), so only small planes take this form.
fn transposed_pays(span: usize) -> bool {
    span < 128
}

/// `dst[j·ld + i] = src[i·cols + j]` for a row-major `src` of `rows × cols`: eight source rows at a
/// time, each destination row's eight values gathered from them and stored together, destination
/// rows split over the pool's threads when `threads` allows (element by element on one thread,
/// the transpose of a 196 × 2304 buffer took back what the transposed product gained).
///
/// # Safety
/// `dst` must be valid for writes at every `j·ld + i`, and not aliased during the call.
unsafe fn transpose<T: Float>(src: &[T], rows: usize, cols: usize, dst: *mut T, ld: usize, threads: Threads) {
    const R: usize = 8;
    assert!(src.len() >= rows * cols && (cols == 0 || rows <= ld), "transpose out of bounds");
    let dp = SendPtr(dst);
    let part = |js: Range<usize>| {
        let dp = &dp;
        let full = rows / R * R;
        for i0 in (0..full).step_by(R) {
            let rs: [&[T]; R] = std::array::from_fn(|r| &src[(i0 + r) * cols..(i0 + r + 1) * cols]);
            for j in js.clone() {
                let v: [T; R] = std::array::from_fn(|r| rs[r][j]);
                // SAFETY: j < cols and i0 + R ≤ rows ≤ ld: inside dst by the caller's contract.
                unsafe { (dp.0.add(j * ld + i0) as *mut [T; R]).write_unaligned(v) };
            }
        }
        for i in full..rows {
            let row = &src[i * cols..(i + 1) * cols];
            for j in js.clone() {
                // SAFETY: as above.
                unsafe { dp.0.add(j * ld + i).write(row[j]) };
            }
        }
    };
    match threads {
        Threads::Pool if rows * cols >= 1 << 15 => {
            let per = cols.div_ceil(4 * rayon::current_num_threads()).max(64);
            (0..cols.div_ceil(per)).into_par_iter().for_each(|t| part(t * per..((t + 1) * per).min(cols)));
        }
        _ => part(0..cols),
    }
}

/// [`conv2d_vjp_sum`] of a 1×1 convolution (not depthwise): per sample and group one product per
/// term, straight from dy. The first product writes every element of dx, so dx starts
/// uninitialised (zeroing it was a pass over memory as long as the products' output).
fn pointwise_vjp_sum<T: Float>(g: &ConvGeom, terms: &[(&[T], &[T])]) -> Vec<T> {
    let (hw, cg, mg) = (g.h * g.w, g.cg(), g.mg());
    let (xsz, ysz, total) = (g.c * hw, g.m * hw, g.n * g.c * hw);
    // The register kernel where it takes the VJP as a forward 1×1 convolution from the layer's
    // m channels to its c (see `pointwise`), the kernel read transposed in place.
    let gv = ConvGeom { n: 1, c: g.m, m: g.c, ..*g };
    if g.group == 1 && pointwise::applies_vjp::<T>(&gv) {
        return per_sample_uninit(g.n, xsz, |s, dxs, threads| {
            let ts: Vec<(&[T], &[T])> = terms.iter().map(|(dy, wt)| (&dy[s * ysz..(s + 1) * ysz], *wt)).collect();
            // SAFETY: applies checked; sample s's [c, h, w] input gradient, written whole.
            unsafe { pointwise::sample(&gv, &ts, true, None, None, dxs, false, threads) };
        });
    }
    let mut dx: Vec<T> = Vec::with_capacity(total);
    let dp = SendPtr(dx.as_mut_ptr());
    // Unit tests poison it, so that an element the products miss shows up as NaN.
    #[cfg(test)]
    // SAFETY: within the allocated capacity.
    (0..total).for_each(|i| unsafe { dp.0.add(i).write(T::of(f64::NAN)) });
    let sample = |s: usize, threads: Threads| {
        let dp = &dp;
        // dxᵀ of one group for small planes (see `transposed_pays`), reused across groups.
        let mut t: Vec<T> = Vec::with_capacity(if transposed_pays(hw) { hw * cg } else { 0 });
        for gi in 0..g.group {
            let start = s * xsz + gi * cg * hw;
            if transposed_pays(hw) {
                // dxᵀ [hw, cg] = dyᵀ · w, then transposed into place.
                for (k, (dy, wt)) in terms.iter().enumerate() {
                    let a = Mat { data: &dy[s * ysz + gi * mg * hw..s * ysz + (gi + 1) * mg * hw], rs: 1, cs: hw };
                    let b = Mat::rows(&wt[gi * mg * cg..(gi + 1) * mg * cg], cg);
                    // SAFETY: the buffer's capacity is hw·cg; the first term writes every element
                    // without reading, the later ones accumulate onto what it wrote.
                    unsafe { matmul_raw(hw, cg, mg, a, b, t.as_mut_ptr(), hw * cg, cg, k > 0, threads, None) };
                }
                // SAFETY: written above (terms is not empty); the destination is group gi of
                // sample s, [cg, h, w], written by this call alone.
                unsafe {
                    t.set_len(hw * cg);
                    transpose(&t, hw, cg, dp.0.add(start), hw, threads);
                    t.set_len(0);
                }
                continue;
            }
            for (k, (dy, wt)) in terms.iter().enumerate() {
                let a = Mat::rows_t(&wt[gi * mg * cg..(gi + 1) * mg * cg], cg);
                let b = Mat::rows(&dy[s * ysz + gi * mg * hw..s * ysz + (gi + 1) * mg * hw], hw);
                // SAFETY: group gi of sample s, [cg, h, w], written by this call alone; the first
                // term writes without reading, the later ones accumulate onto what it wrote.
                unsafe { matmul_raw(cg, hw, mg, a, b, dp.0.add(start), cg * hw, hw, k > 0, threads, None) };
            }
        }
    };
    if g.n > 1 {
        (0..g.n).into_par_iter().for_each(|s| sample(s, Threads::One));
    } else if g.n == 1 {
        sample(0, Threads::Pool);
    }
    // SAFETY: the groups' blocks cover every sample's [c, h, w]; terms is not empty (checked by
    // the caller), so the first product wrote each element.
    unsafe { dx.set_len(total) };
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
                                    let iy = (oy * g.stride[0] + ki * g.dilation[0]) as isize - g.pads[0] as isize;
                                    let ix = (ox * g.stride[1] + kj * g.dilation[1]) as isize - g.pads[1] as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                        s += x[((n * g.c + ci) * g.h + iy as usize) * g.w + ix as usize]
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
        (0..len).map(|i| (((i * 37 + seed * 11) % 29) as f64 - 14.0) / 7.0).collect()
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
            ConvGeom { n: 2, stride: [2, 2], pads: [0, 0, 1, 1], ..base },
            ConvGeom { stride: [2, 3], pads: [2, 0, 1, 3], dilation: [2, 1], ..base },
            ConvGeom { kh: 1, kw: 1, pads: [0; 4], n: 3, ..base },
            // Grouped 1×1 over several samples: the VJP's blocks per sample and group.
            ConvGeom { c: 6, m: 4, group: 2, kh: 1, kw: 1, pads: [0; 4], n: 2, ..base },
            ConvGeom { c: 6, m: 6, group: 6, n: 2, kh: 5, kw: 5, pads: [2, 1, 2, 3], stride: [2, 2], ..base },
            ConvGeom { c: 4, m: 8, group: 4, kh: 3, kw: 2, ..base },
            ConvGeom { c: 6, m: 4, group: 2, h: 1, kh: 1, kw: 4, pads: [0, 2, 0, 1], ..base },
            ConvGeom { h: 5, w: 5, kh: 5, kw: 5, pads: [0; 4], stride: [3, 3], ..base },
            // Depthwise: stride 2 with odd and even pads, dilation, a channel multiplier (the
            // row kernels), a plane narrower than a register block, small late-layer planes.
            ConvGeom { m: 3, group: 3, h: 40, w: 39, stride: [2, 2], dilation: [1, 2], pads: [1, 2, 0, 3], ..base },
            ConvGeom { m: 6, group: 3, h: 17, w: 18, kh: 5, kw: 5, pads: [2, 2, 2, 2], ..base },
            ConvGeom { m: 3, group: 3, h: 36, w: 37, stride: [2, 2], pads: [0, 0, 1, 1], n: 2, ..base },
            ConvGeom { c: 5, m: 5, group: 5, h: 7, w: 7, kh: 5, kw: 5, pads: [2; 4], n: 2, ..base },
            ConvGeom { c: 4, m: 4, group: 4, h: 14, w: 13, stride: [2, 2], pads: [0, 1, 1, 1], ..base },
            ConvGeom { c: 2, m: 2, group: 2, h: 6, w: 3, stride: [3, 1], pads: [1, 0, 2, 1], ..base },
            ConvGeom { c: 3, m: 3, group: 3, h: 1, w: 20, kh: 1, kw: 5, stride: [1, 2], pads: [0, 2, 0, 2], ..base },
            // Outputs large enough for a product in several parts (by columns, then by rows),
            // each with its bias and clamp epilogue.
            ConvGeom { c: 2, m: 32, h: 100, w: 90, kh: 1, kw: 1, pads: [0; 4], ..base },
            ConvGeom { c: 3, m: 700, h: 20, w: 20, ..base },
            // Padding wider than the kernel: the VJP takes the general row kernel.
            ConvGeom { c: 2, m: 2, group: 2, h: 5, w: 6, pads: [3, 1, 1, 4], ..base },
            // Several im2col tiles (see tile_rows): 576 × 48 columns per row, 37 rows per tile.
            ConvGeom { c: 64, m: 5, h: 48, w: 48, ..base },
            ConvGeom { c: 64, m: 5, h: 96, w: 95, stride: [2, 2], pads: [1, 0, 1, 1], ..base },
            // Small planes with long columns: the VJPs' transposed products, transposed back on
            // both threads (see `transposed_pays`), with an im2col matrix and a 1×1 one.
            ConvGeom { c: 96, m: 8, h: 7, w: 7, ..base },
            ConvGeom { c: 700, m: 4, h: 7, w: 7, kh: 1, kw: 1, pads: [0; 4], ..base },
        ]
    }

    /// `conv2d_then` and `conv2d_vjp_then` equal the plain convolution and VJP with `post` applied
    /// afterwards, once on every plane of every sample (depthwise kernels call it per plane or
    /// group of planes as they write them, the others per sample): in f64 on every geometry, and
    /// in f32 on depthwise layers that the sixteen-channel and the wide-plane kernels take.
    #[test]
    fn post_runs_once_on_every_plane() {
        fn check<T: Float>(g: &ConvGeom, f: impl Fn(&[f64]) -> Vec<T>, tol: f64) {
            let (oh, ow) = g.out_hw().unwrap();
            let (ohw, hw) = (oh * ow, g.h * g.w);
            let x = f(&data(g.n * g.c * hw, 1));
            let wt = f(&data(g.m * (g.c / g.group) * g.kh * g.kw, 2));
            let bias = f(&data(g.m, 3));
            let dy = f(&data(g.n * g.m * ohw, 4));
            // v ↦ 2v + s + c/8 on channel c of sample s; counts the calls per plane.
            let mark = |s: usize, c: usize, v: T| T::of(2.0) * v + T::of(s as f64 + c as f64 / 8.0);
            for forward in [true, false] {
                let (planes_of, len) = if forward { (g.m, ohw) } else { (g.c, hw) };
                let seen = std::sync::Mutex::new(vec![0usize; g.n * planes_of]);
                let post = |s: usize, ch: Range<usize>, planes: &mut [T]| {
                    assert_eq!(planes.len(), ch.len() * len, "{g:?}: planes of {ch:?}");
                    for (k, c) in ch.enumerate() {
                        seen.lock().unwrap()[s * planes_of + c] += 1;
                        planes[k * len..(k + 1) * len].iter_mut().for_each(|v| *v = mark(s, c, *v));
                    }
                };
                let (got, mut want) = if forward {
                    (conv2d_then(g, &x, &wt, Some(&bias), &post), conv2d(g, &x, &wt, Some(&bias)))
                } else {
                    (conv2d_vjp_then(g, &dy, &wt, &post), conv2d_vjp(g, &dy, &wt))
                };
                for (i, v) in want.iter_mut().enumerate() {
                    *v = mark(i / (planes_of * len), i / len % planes_of, *v);
                }
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a.f64() - b.f64()).abs() <= tol * (1.0 + b.f64().abs()),
                        "{g:?}: {} vs {}",
                        a.f64(),
                        b.f64()
                    );
                }
                assert!(seen.into_inner().unwrap().iter().all(|&k| k == 1), "{g:?}: a plane met post other than once");
            }
        }
        for g in geoms() {
            check::<f64>(&g, |v| v.to_vec(), 1e-12);
        }
        let dw = |c: usize, h: usize, k: usize, s: usize, n: usize| ConvGeom {
            n,
            c,
            h,
            w: h,
            m: c,
            kh: k,
            kw: k,
            stride: [s, s],
            dilation: [1, 1],
            pads: if s == 1 { [k / 2; 4] } else { [k / 2 - 1, k / 2 - 1, k / 2, k / 2] },
            group: c,
        };
        for g in [dw(40, 7, 5, 1, 2), dw(20, 14, 3, 2, 1), dw(24, 56, 3, 1, 1), dw(18, 28, 5, 2, 2)] {
            check::<f32>(&g, |v| v.iter().map(|&a| a as f32).collect(), 1e-5);
        }
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
    fn conv_onto_an_initial_output_adds_it_before_the_clamp() {
        for g in geoms().into_iter().filter(|g| !g.is_depthwise()) {
            let (oh, ow) = g.out_hw().unwrap();
            let x = data(g.n * g.c * g.h * g.w, 9);
            let wt = data(g.m * (g.c / g.group) * g.kh * g.kw, 10);
            let bias = data(g.m, 11);
            let init = data(g.n * g.m * oh * ow, 12);
            for clamp in [None, Some((-0.5, 1.5))] {
                let y = conv2d_onto(&g, &x, &wt, Some(&bias), clamp, Some(init.clone()));
                let r = conv2d(&g, &x, &wt, Some(&bias));
                for ((a, b), i) in y.iter().zip(&r).zip(&init) {
                    let (lo, hi) = clamp.unwrap_or((f64::NEG_INFINITY, f64::INFINITY));
                    assert!((a - (b + i).clamp(lo, hi)).abs() < 1e-12, "{g:?}");
                }
            }
        }
    }

    #[test]
    fn clamped_conv_is_conv_then_clamp() {
        for g in geoms() {
            let x = data(g.n * g.c * g.h * g.w, 9);
            let wt = data(g.m * (g.c / g.group) * g.kh * g.kw, 10);
            let bias = data(g.m, 11);
            let y = conv2d_clamped(&g, &x, &wt, Some(&bias), Some((-0.5, 1.5)));
            let r = conv2d(&g, &x, &wt, Some(&bias));
            assert!(r.iter().any(|&v| v < -0.5) && r.iter().any(|&v| v > 1.5), "{g:?}: clamp not exercised");
            for (a, b) in y.iter().zip(&r) {
                assert_eq!(*a, b.clamp(-0.5, 1.5), "{g:?}");
            }
        }
    }

    #[test]
    fn f32_direct_kernel_matches_float64() {
        // Stem-like layers (few input channels) that take the direct kernel where the CPU has
        // AVX-512: stride 2 with uneven pads, a 7×7 kernel, output channels not a multiple of
        // eight, a row not a multiple of 32, dilation, two samples; with bias, a clamp, and
        // accumulated onto an initial output.
        let base = geoms()[0];
        let cases = [
            ConvGeom {
                n: 1,
                c: 3,
                m: 32,
                h: 70,
                w: 70,
                kh: 3,
                kw: 3,
                stride: [2, 2],
                pads: [0, 0, 1, 1],
                group: 1,
                ..base
            },
            ConvGeom { n: 2, c: 3, m: 12, h: 72, w: 75, kh: 7, kw: 7, stride: [2, 2], pads: [3; 4], group: 1, ..base },
            ConvGeom {
                n: 1,
                c: 2,
                m: 9,
                h: 20,
                w: 45,
                kh: 3,
                kw: 3,
                dilation: [2, 1],
                pads: [2, 1, 1, 0],
                group: 1,
                ..base
            },
        ];
        for g in cases {
            #[cfg(target_arch = "x86_64")]
            assert_eq!(
                direct::pays::<f32>(&g),
                std::is_x86_feature_detected!("avx512f") && std::env::var_os("RELPROP_NO_AVX512").is_none(),
                "{g:?}"
            );
            let (oh, ow) = g.out_hw().unwrap();
            let x = data(g.n * g.c * g.h * g.w, 3);
            let wt = data(g.m * g.c * g.kh * g.kw, 4);
            let bias = data(g.m, 5);
            let init = data(g.n * g.m * oh * ow, 6);
            let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let y = conv2d_onto(&g, &f(&x), &f(&wt), Some(&f(&bias)), Some((-0.5, 0.5)), Some(f(&init)));
            let want: Vec<f64> = naive(&g, &x, &wt)
                .iter()
                .enumerate()
                .map(|(i, v)| (v + bias[(i / (oh * ow)) % g.m] + init[i]).clamp(-0.5, 0.5))
                .collect();
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-5, "{g:?} output {i}: {a} vs {b}");
            }
        }
    }

    /// 3×3 stride-1 layers that take the Winograd kernel: partial tiles at the right and bottom
    /// edges, pads 0–2 on either side; one sample with the pool (the stages split over threads),
    /// two samples with one block each, and two samples in two blocks of 300 tiles each, whose
    /// boundary falls inside a tile row of 24 (the last); with bias, clamp and an initial output.
    fn winograd_geoms() -> Vec<ConvGeom> {
        let base = ConvGeom {
            n: 1,
            c: 16,
            h: 40,
            w: 40,
            m: 20,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            dilation: [1, 1],
            pads: [1; 4],
            group: 1,
        };
        vec![
            base,
            ConvGeom { n: 2, c: 17, m: 16, h: 43, w: 39, pads: [0, 2, 1, 2], ..base },
            ConvGeom { n: 2, c: 24, m: 33, h: 97, w: 95, pads: [2, 0, 0, 1], ..base },
            // Fewer than half as many outputs as inputs (DenseNet's 128→32): the VJP only.
            ConvGeom { c: 40, m: 16, ..base },
        ]
    }

    /// Stride-1 layers with at least 16 input channels (the shifted products, see `shifted`):
    /// 3×3 with pads 1, none, and uneven ones, 5×3 dilated, a 1×7 row kernel; one sample (blocks
    /// over the pool, 34×36 = 1 224 grid columns in two blocks whose boundary falls inside a
    /// row) and two (one thread each).
    #[test]
    fn shifted_products_match_naive() {
        let base = ConvGeom { h: 34, w: 34, ..winograd_geoms()[0] };
        let geoms = [
            base,
            ConvGeom { n: 2, c: 20, h: 9, w: 11, pads: [0; 4], ..base },
            ConvGeom { c: 17, m: 5, h: 13, w: 10, pads: [2, 0, 1, 3], ..base },
            ConvGeom { n: 2, h: 15, w: 12, kh: 5, dilation: [2, 1], pads: [4, 1, 3, 0], ..base },
            ConvGeom { m: 7, h: 6, w: 20, kh: 1, kw: 7, pads: [0, 3, 0, 3], ..base },
            ConvGeom { c: 18, m: 24, h: 8, w: 9, kh: 1, kw: 7, pads: [0, 6, 0, 5], ..base },
            // Wider products: 40 outputs, and a VJP with 40 (uneven padding).
            ConvGeom { m: 40, h: 12, w: 12, ..base },
            ConvGeom { c: 40, h: 12, w: 12, pads: [1, 0, 2, 1], ..base },
        ];
        let mut vjps = 0;
        for g in geoms {
            assert!(shifted::applies::<f64>(&g), "{g:?}");
            let (oh, ow) = g.out_hw().unwrap();
            let (x, wt, bias, init, plain) = layer_data(&g, 21);
            // f64 takes the shifted products wherever they apply (no Winograd, no stem kernel).
            let y = conv2d_onto(&g, &x, &wt, Some(&bias), Some((-0.4, 0.6)), Some(init.clone()));
            for (i, (a, b)) in y.iter().zip(&plain).enumerate() {
                let want = (b + bias[(i / (oh * ow)) % g.m] + init[i]).clamp(-0.4, 0.6);
                assert!((a - want).abs() < 1e-12, "{g:?} output {i}: {a} vs {want}");
            }
            let y = conv2d(&g, &x, &wt, None);
            for (i, (a, b)) in y.iter().zip(&plain).enumerate() {
                assert!((a - b).abs() < 1e-12, "{g:?} output {i}: {a} vs {b}");
            }
            // f32 where neither the Winograd nor the stem kernel takes the layer.
            if winograd::Geom::forward::<f32>(&g).is_none() && !direct::pays::<f32>(&g) {
                let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
                let y = conv2d(&g, &f(&x), &f(&wt), Some(&f(&bias)));
                for (i, (a, b)) in y.iter().zip(&plain).enumerate() {
                    let want = b + bias[(i / (oh * ow)) % g.m];
                    assert!((*a as f64 - want).abs() < 1e-4, "{g:?} f32 output {i}: {a} vs {want}");
                }
            }
            // The input VJP of two terms (LRP's γ rule) against the naive transposed loop.
            let (w2, dy, dy2, want) = two_term_vjp(&g, &wt, 25);
            vjps += usize::from(shifted_vjp_geom(&g).filter(|gv| gv.c <= 64 && shifted::applies::<f64>(gv)).is_some());
            let got = conv2d_vjp_sum(&g, &[(&dy, &wt), (&dy2, &w2)]);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-12, "{g:?} vjp input {i}: {a} vs {b}");
            }
        }
        assert!(vjps >= 4, "the VJPs' shifted path ran on {vjps} geometries");
    }

    /// The shifted products in f32 (the register-blocked kernel where the CPU has AVX-512F, one
    /// matrix product per tap elsewhere) against the float64 loops: forward with bias, clamp and
    /// an initial output, and the input VJP summed over two terms (the transposed weights read in
    /// place). Output channels 5, 7, 11, 20, 21, 40, 48 and 64 leave most remainders of the blocks of
    /// eight; 8×8 and 6×6 planes are fewer grid tiles than threads' shares, so the work splits
    /// over channel blocks; the 6×6 64-channel and 7×7 48-channel geometries take the kernel only
    /// in f32 (weights above eight times the input).
    #[test]
    fn shifted_products_f32_match_naive() {
        let base = ConvGeom { h: 34, w: 34, ..winograd_geoms()[0] };
        let geoms = [
            ConvGeom { c: 17, m: 5, h: 13, w: 10, pads: [2, 0, 1, 3], ..base },
            ConvGeom { n: 2, h: 15, w: 12, kh: 5, dilation: [2, 1], pads: [4, 1, 3, 0], ..base },
            ConvGeom { m: 7, h: 6, w: 20, kh: 1, kw: 7, pads: [0, 3, 0, 3], ..base },
            ConvGeom { c: 40, m: 21, h: 8, w: 8, pads: [1, 0, 2, 1], ..base },
            ConvGeom { c: 16, m: 40, h: 12, w: 12, pads: [0; 4], ..base },
            ConvGeom { n: 2, c: 24, m: 11, h: 34, w: 33, ..base },
            ConvGeom { c: 16, m: 64, h: 6, w: 6, ..base },
            ConvGeom { c: 32, m: 48, h: 7, w: 7, pads: [2, 1, 0, 1], ..base },
            // Three 14×14 samples: Winograd would pay, the register kernel takes them instead.
            ConvGeom { n: 3, c: 32, m: 32, h: 14, w: 14, ..base },
            // A VJP that reads 72 gradient channels: the register kernel, not im2col.
            ConvGeom { c: 16, m: 72, h: 10, w: 10, ..base },
            // Grids without padding columns (as wide out as in): dilated columns, and all the
            // padding on one side.
            ConvGeom { c: 16, m: 9, h: 9, w: 11, dilation: [1, 2], pads: [2, 2, 2, 2], ..base },
            ConvGeom { c: 20, m: 6, h: 8, w: 9, pads: [0, 2, 2, 0], ..base },
        ];
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let (mut wide, mut vjps, mut wide_vjps) = (0, 0, 0);
        for g in geoms {
            assert!(shifted::applies::<f32>(&g) || !crate::ops::avx512(), "{g:?}");
            if g.h == 14 && std::env::var("RELPROP_WINOGRAD").map_or(true, |v| v != "off") {
                assert!(winograd::Geom::of(&g).is_some_and(|w| w.pays::<f32>(g.n)), "{g:?}");
                assert_eq!(winograd::Geom::forward::<f32>(&g).is_none(), crate::ops::avx512(), "{g:?}");
            }
            wide += usize::from(!shifted::applies::<f64>(&g));
            if winograd::Geom::forward::<f32>(&g).is_some() || direct::pays::<f32>(&g) {
                continue;
            }
            let (oh, ow) = g.out_hw().unwrap();
            let (x, wt, bias, init, plain) = layer_data(&g, 31);
            // Sums of up to 40·9 products of values up to 2: f32 rounding stays far below 1e-3.
            let y = conv2d_onto(&g, &f(&x), &f(&wt), Some(&f(&bias)), Some((-3.0, 4.0)), Some(f(&init)));
            for (i, (a, b)) in y.iter().zip(&plain).enumerate() {
                let want = (b + bias[(i / (oh * ow)) % g.m] + init[i]).clamp(-3.0, 4.0);
                assert!((*a as f64 - want).abs() < 1e-3, "{g:?} output {i}: {a} vs {want}");
            }
            // Unclamped as well: the clamp above hides every output beyond it.
            let y = conv2d_onto(&g, &f(&x), &f(&wt), Some(&f(&bias)), None, Some(f(&init)));
            for (i, (a, b)) in y.iter().zip(&plain).enumerate() {
                let want = b + bias[(i / (oh * ow)) % g.m] + init[i];
                assert!((*a as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "{g:?} output {i}: {a} vs {want}");
            }
            let (w2, dy, dy2, want) = two_term_vjp(&g, &wt, 35);
            let (dy, dy2, wt, w2) = (f(&dy), f(&dy2), f(&wt), f(&w2));
            let registers = shifted_vjp_geom(&g).is_some_and(|gv| shifted::beats_winograd_vjp::<f32>(&gv));
            wide_vjps += usize::from(registers && g.m > 64);
            vjps += usize::from(
                registers
                    || (winograd::Geom::vjp::<f32>(&g).is_none()
                        && shifted_vjp_geom(&g).is_some_and(|gv| gv.c <= 64 && shifted::applies::<f32>(&gv))),
            );
            let got = conv2d_vjp_sum(&g, &[(&dy, &wt), (&dy2, &w2)]);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-3, "{g:?} vjp input {i}: {a} vs {b}");
            }
        }
        assert!(!crate::ops::avx512() || wide == 2, "{wide} geometries only for the register kernel");
        assert!(vjps >= 4, "the VJPs' shifted path ran on {vjps} geometries");
        assert!(!crate::ops::avx512() || wide_vjps == 1, "{wide_vjps} VJPs of more than 64 channels");
    }

    /// Stride-2 layers over the input's four phases (`shifted::sample_stride2`), against the naive
    /// loops: odd and even sizes and uneven pads (phases of unequal extent), 3×3, 5×4, 2×3 and 3×1
    /// kernels (phases with one to nine taps, and a kernel one column wide, which reads only two
    /// phases), output channels that leave block remainders, batches of two, with bias, initial
    /// output and clamp.
    #[test]
    fn stride2_phases_f32_match_naive() {
        let base = ConvGeom { stride: [2, 2], ..winograd_geoms()[0] };
        let geoms = [
            ConvGeom { c: 16, m: 20, h: 21, w: 18, pads: [1, 0, 1, 1], ..base },
            ConvGeom { n: 2, c: 17, m: 9, h: 24, w: 25, kh: 5, kw: 4, pads: [2, 1, 2, 2], ..base },
            ConvGeom { c: 32, m: 33, h: 16, w: 16, kh: 2, kw: 3, pads: [0, 1, 1, 0], ..base },
            ConvGeom { n: 2, c: 16, m: 8, h: 19, w: 20, kh: 3, kw: 1, pads: [1, 0, 0, 0], ..base },
        ];
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        for g in geoms {
            assert_eq!(shifted::applies_stride2::<f32>(&g), crate::ops::avx512(), "{g:?}");
            assert!(!shifted::applies_stride2::<f64>(&g) && !direct::pays::<f32>(&g), "{g:?}");
            let (oh, ow) = g.out_hw().unwrap();
            let (x, wt, bias, init, plain) = layer_data(&g, 41);
            for clamp in [Some((-3.0, 4.0)), None] {
                let y = conv2d_onto(&g, &f(&x), &f(&wt), Some(&f(&bias)), clamp, Some(f(&init)));
                for (i, (a, b)) in y.iter().zip(&plain).enumerate() {
                    let v = b + bias[(i / (oh * ow)) % g.m] + init[i];
                    let want = clamp.map_or(v, |(lo, hi)| v.clamp(lo as f64, hi as f64));
                    assert!((*a as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "{g:?} output {i}: {a} vs {want}");
                }
            }
            // Without bias or initial output: every element written (the buffer starts poisoned).
            let y = conv2d(&g, &f(&x), &f(&wt), None);
            for (i, (a, b)) in y.iter().zip(&plain).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()), "{g:?} output {i}: {a} vs {b}");
            }
        }
    }

    /// Input, kernel, bias and initial output of `g` from `seed` on, with the naive loops' output
    /// (without bias).
    #[allow(clippy::type_complexity)] // five named parts, returned once
    fn layer_data(g: &ConvGeom, seed: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (oh, ow) = g.out_hw().unwrap();
        let x = data(g.n * g.c * g.h * g.w, seed);
        let wt = data(g.m * g.c * g.kh * g.kw, seed + 1);
        let bias = data(g.m, seed + 2);
        let init = data(g.n * g.m * oh * ow, seed + 3);
        let plain = naive(g, &x, &wt);
        (x, wt, bias, init, plain)
    }

    /// A second kernel and two output gradients from `seed` on, with the two-term input VJP
    /// `Jᵀ_wt dy + Jᵀ_w2 dy2` of the naive loops (LRP's γ rule sums such terms).
    fn two_term_vjp(g: &ConvGeom, wt: &[f64], seed: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (oh, ow) = g.out_hw().unwrap();
        let w2 = data(g.m * g.c * g.kh * g.kw, seed);
        let dy = data(g.n * g.m * oh * ow, seed + 1);
        let dy2 = data(g.n * g.m * oh * ow, seed + 2);
        let mut want = naive_vjp(g, &dy, wt);
        want.iter_mut().zip(naive_vjp(g, &dy2, &w2)).for_each(|(a, b)| *a += b);
        (w2, dy, dy2, want)
    }

    /// `dx = Jᵀ dy` of [`naive`], loop by loop.
    fn naive_vjp(g: &ConvGeom, dy: &[f64], wt: &[f64]) -> Vec<f64> {
        let (oh, ow) = g.out_hw().unwrap();
        let (cg, mg) = (g.cg(), g.mg());
        let mut dx = vec![0.0; g.n * g.c * g.h * g.w];
        for n in 0..g.n {
            for mi in 0..g.m {
                let gi = mi / mg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let v = dy[((n * g.m + mi) * oh + oy) * ow + ox];
                        for cl in 0..cg {
                            let ci = gi * cg + cl;
                            for ki in 0..g.kh {
                                let iy = (oy * g.stride[0] + ki * g.dilation[0]) as isize - g.pads[0] as isize;
                                if iy < 0 || iy >= g.h as isize {
                                    continue;
                                }
                                for kj in 0..g.kw {
                                    let ix = (ox * g.stride[1] + kj * g.dilation[1]) as isize - g.pads[1] as isize;
                                    if ix < 0 || ix >= g.w as isize {
                                        continue;
                                    }
                                    dx[((n * g.c + ci) * g.h + iy as usize) * g.w + ix as usize] +=
                                        wt[((mi * cg + cl) * g.kh + ki) * g.kw + kj] * v;
                                }
                            }
                        }
                    }
                }
            }
        }
        dx
    }

    #[test]
    fn f32_winograd_matches_float64() {
        for g in winograd_geoms() {
            let on = std::env::var("RELPROP_WINOGRAD").map_or(true, |v| v != "off");
            assert_eq!(winograd::Geom::forward::<f32>(&g).is_some(), on && 2 * g.m >= g.c, "{g:?}");
            assert_eq!(winograd::Geom::vjp::<f32>(&g).is_some(), on, "{g:?}");
            let (oh, ow) = g.out_hw().unwrap();
            let x = data(g.n * g.c * g.h * g.w, 3);
            let wt = data(g.m * g.c * 9, 4);
            let bias = data(g.m, 5);
            let init = data(g.n * g.m * oh * ow, 6);
            let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let plain = naive(&g, &x, &wt);
            // Rounding relative to the largest output (the transforms mix a tile's values).
            let tol = 2.5e-5 * plain.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let y = conv2d(&g, &f(&x), &f(&wt), None);
            let err = y.iter().zip(&plain).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            eprintln!("{g:?} max err {err:e} tol {tol:e}");
            for (i, (a, b)) in y.iter().zip(&plain).enumerate() {
                assert!((*a as f64 - b).abs() < tol, "{g:?} output {i}: {a} vs {b}");
            }
            // The input VJP of two terms (LRP's γ rule), against float64's im2col path.
            let w2 = data(g.m * g.c * 9, 7);
            let dy = data(g.n * g.m * oh * ow, 8);
            let dy2 = data(g.n * g.m * oh * ow, 9);
            let want = conv2d_vjp_sum(&g, &[(&dy, &wt), (&dy2, &w2)]);
            let got = conv2d_vjp_sum(&g, &[(&f(&dy)[..], &f(&wt)[..]), (&f(&dy2)[..], &f(&w2)[..])]);
            let vtol = 2.5e-5 * want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            eprintln!("{g:?} vjp max err {err:e} tol {vtol:e}");
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < vtol, "{g:?} vjp input {i}: {a} vs {b}");
            }
            let (lo, hi) = (-20.0, 15.0);
            let y = conv2d_onto(&g, &f(&x), &f(&wt), Some(&f(&bias)), Some((lo as f32, hi as f32)), Some(f(&init)));
            for (i, (a, b)) in y.iter().zip(&plain).enumerate() {
                let want = (b + bias[(i / (oh * ow)) % g.m] + init[i]).clamp(lo, hi);
                assert!((*a as f64 - want).abs() < tol, "{g:?} output {i}: {a} vs {want}");
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
            assert!((lhs - rhs).abs() < 1e-9 * (1.0 + lhs.abs()), "{g:?}: {lhs} vs {rhs}");
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
    fn f32_depthwise_takes_the_avx512_kernel_where_the_cpu_has_it() {
        // Otherwise the test below would check only the AVX2 kernel and pass with the AVX-512 one
        // never chosen.
        #[cfg(target_arch = "x86_64")]
        {
            let wanted = std::is_x86_feature_detected!("avx512f") && std::env::var_os("RELPROP_NO_AVX512").is_none();
            for (oh, ow) in [(7, 7), (14, 14), (28, 28), (56, 56), (8, 40)] {
                assert_eq!(dw512::tile::<f32>(oh, ow).is_some(), wanted, "{oh}×{ow}");
            }
        }
        assert_eq!(dw512::tile::<f64>(14, 14), None);
        // Likewise the channel-vector kernel on 7-wide planes.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            depthwise16::available::<f32>(),
            std::is_x86_feature_detected!("avx512f") && std::env::var_os("RELPROP_NO_AVX512").is_none()
        );
        assert!(!depthwise16::available::<f64>());
        assert!(depthwise16::pays(7) && !depthwise16::pays(14));
        assert_eq!(dw512::tile::<f32>(1, 20), None, "planes under four rows take the AVX2 kernel");
    }

    #[test]
    fn f32_depthwise_kernels_match_float64() {
        // The f32 kernels (AVX-512 where the CPU has it, AVX2 otherwise) against the naive f64
        // loop: forward with bias and a ReLU6 clamp, and the two-term VJP (whose later terms
        // accumulate onto the plane).
        let base = geoms()[0];
        let mut cases: Vec<ConvGeom> = geoms().into_iter().filter(|g| g.is_depthwise()).collect();
        for (c, hw, k, s) in [(3, 7, 5, 1), (2, 14, 3, 1), (2, 14, 5, 2), (2, 28, 5, 1), (2, 40, 3, 2), (2, 56, 3, 1)] {
            let p = k / 2;
            let pads = if s == 1 { [p; 4] } else { [p - 1, p - 1, p, p] };
            cases.push(ConvGeom { c, m: c, group: c, h: hw, w: hw, kh: k, kw: k, stride: [s, s], pads, ..base });
        }
        // Sixteen channels per vector on 7-wide outputs: more than one group of sixteen with a
        // tail, stride 2, dilation with uneven pads, and two samples.
        for (c, hw, k, s) in [(20, 7, 3, 1), (37, 14, 5, 2)] {
            let p = k / 2;
            let pads = if s == 1 { [p; 4] } else { [p - 1, p - 1, p, p] };
            cases.push(ConvGeom { c, m: c, group: c, h: hw, w: hw, kh: k, kw: k, stride: [s, s], pads, ..base });
        }
        cases.push(ConvGeom {
            n: 2,
            c: 33,
            m: 33,
            group: 33,
            h: 9,
            w: 8,
            dilation: [2, 1],
            pads: [2, 1, 1, 0],
            ..base
        });
        // A plane not a multiple of seven rows high, and one of 17–32 columns.
        cases.push(ConvGeom { c: 2, m: 2, group: 2, h: 10, w: 9, ..base });
        cases.push(ConvGeom { c: 2, m: 2, group: 2, h: 9, w: 25, ..base });
        // Stride 2 over plain rows (`dw512::run_plain2`): both kernel sizes in each tile shape
        // (outputs 14, 15, 28 and 56 wide), TF-style and symmetric padding, odd sizes.
        for (hw, k, pads) in [
            (28, 3, [0, 0, 1, 1]),
            (30, 5, [1, 1, 2, 2]),
            (56, 5, [1, 1, 2, 2]),
            (112, 3, [0, 0, 1, 1]),
            (29, 3, [1; 4]),
            (27, 5, [2; 4]),
        ] {
            cases.push(ConvGeom { c: 3, m: 3, group: 3, h: hw, w: hw, kh: k, kw: k, stride: [2, 2], pads, ..base });
        }
        cases.push(ConvGeom { c: 2, m: 2, group: 2, h: 23, w: 37, kh: 5, kw: 5, stride: [2, 2], pads: [2; 4], ..base });
        cases.push(ConvGeom { c: 2, m: 2, group: 2, h: 41, w: 20, stride: [2, 2], pads: [0, 1, 1, 0], ..base });
        for g in cases {
            let (oh, ow) = g.out_hw().unwrap();
            let x = data(g.n * g.c * g.h * g.w, 7);
            let wt = data(g.m * (g.c / g.group) * g.kh * g.kw, 8);
            let bias = data(g.m, 9);
            let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let y = conv2d_clamped(&g, &f(&x), &f(&wt), Some(&f(&bias)), Some((0.0, 0.6)));
            let sums: Vec<f64> =
                naive(&g, &x, &wt).iter().enumerate().map(|(i, v)| v + bias[(i / (oh * ow)) % g.m]).collect();
            let scale = sums.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (i, (a, b)) in y.iter().zip(&sums).enumerate() {
                let b = b.clamp(0.0, 0.6);
                assert!((*a as f64 - b).abs() < 1e-6 * scale, "{g:?} output {i}: {a} vs {b}");
            }
            let (dy1, dy2, w2) = (data(g.n * g.m * oh * ow, 10), data(g.n * g.m * oh * ow, 11), data(wt.len(), 12));
            let dx = conv2d_vjp_sum(&g, &[(&f(&dy1), &f(&wt)), (&f(&dy2), &f(&w2))]);
            let want: Vec<f64> =
                conv2d_vjp(&g, &dy1, &wt).iter().zip(conv2d_vjp(&g, &dy2, &w2)).map(|(a, b)| a + b).collect();
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (i, (a, b)) in dx.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-6 * scale, "{g:?} input {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn vjp_sum_is_sum_of_vjps() {
        for g in geoms() {
            let (oh, ow) = g.out_hw().unwrap();
            let (w1, w2) =
                (data(g.m * (g.c / g.group) * g.kh * g.kw, 12), data(g.m * (g.c / g.group) * g.kh * g.kw, 13));
            let (d1, d2) = (data(g.n * g.m * oh * ow, 14), data(g.n * g.m * oh * ow, 15));
            let sum = conv2d_vjp_sum(&g, &[(&d1, &w1), (&d2, &w2)]);
            let (a, b) = (conv2d_vjp(&g, &d1, &w1), conv2d_vjp(&g, &d2, &w2));
            for (i, v) in sum.iter().enumerate() {
                assert!((v - a[i] - b[i]).abs() < 1e-10, "{g:?}");
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
            // f32 rounding grows with the number of products summed (700 in the longest).
            let tol = 1e-4 * (g.kdim() as f64 / 64.0).max(1.0);
            for (a, b) in y32.iter().zip(&y64) {
                assert!((*a as f64 - b).abs() < tol, "{g:?}: {a} vs {b}");
            }
        }
    }
}
