//! z⁺ and γ on plain 1×1 convolutions, with the modified forward, the stabilised ratios (the
//! seeds) and the VJPs fused over tiles of pixels. Unfused, each step is a pass over layer-sized
//! buffers: on EfficientNet-Lite0's expansion convolutions, whose outputs are six times their
//! inputs, the forward, the three seed buffers and the VJPs' reads of them made γ cost 4–9× the
//! gradient's VJP of the same layer. Per tile everything in between stays in cache: only x, y and
//! r are read from memory and R is written. A 1×1 convolution is a matrix product per sample
//! (input [c, hw], output [m, hw]), so a tile of pixels is a block of columns and needs no halo.

use super::{GammaPlane, neg, pos};
use crate::ops::as_f32;
use crate::ops::conv::ConvGeom;
use crate::ops::gemm::{Mat, SendPtr, Threads, matmul_raw};
use crate::ops::pointwise as ops_pointwise;
use crate::rules::stabilize;
use crate::tensor::Float;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Whether `g` is a plain 1×1 convolution (one group, stride 1, no padding; the dilation of a
/// 1×1 kernel changes nothing) with planes large enough for the fusion to pay. On 14×14 and 7×7
/// planes the layer's buffers fit in cache anyway, and tiles of a few dozen pixels made the
/// products repack the weights per tile: EfficientNet-Lite0's head was 1.5× slower fused, while
/// its 28×28 to 112×112 expansions ran 0.6–0.8× the unfused time (`RELPROP_PROFILE=all`).
pub(super) fn pays(g: &ConvGeom) -> bool {
    let plain = g.kh == 1 && g.kw == 1 && g.stride == [1, 1] && g.pads == [0; 4] && g.group == 1;
    plain && g.h * g.w >= 512
}

/// A layer's bias as the rules see it: per output channel, or spatially varying (one value per
/// output element of a sample, as canonized DenseNet layers have), or none.
#[derive(Clone, Copy)]
pub(super) enum Bias<'a, T> {
    /// No bias.
    None,
    /// One value per output channel.
    Channel(&'a [T]),
    /// One value per output element of a sample, [m, hw].
    Varying(&'a [T]),
}

impl<'a, T: Float> Bias<'a, T> {
    /// Classifies `b` for a layer with `m` output channels and `hw` pixels (spatially varying when
    /// it has a value per output element, as the unfused path reads it).
    pub(super) fn of(b: Option<&'a [T]>, m: usize, hw: usize) -> Self {
        match b {
            Some(b) if b.len() == m * hw => Bias::Varying(b),
            Some(b) if !b.is_empty() => Bias::Channel(b),
            _ => Bias::None,
        }
    }

    /// Output channel `i`'s bias over the tile's columns `cols`: one value, or a slice.
    fn row(&self, i: usize, cols: &Range<usize>, hw: usize) -> Result<T, &'a [T]> {
        match *self {
            Bias::None => Ok(T::zero()),
            Bias::Channel(b) => Ok(b[i % b.len()]),
            Bias::Varying(b) => Err(&b[i * hw + cols.start..i * hw + cols.end]),
        }
    }
}

/// What a rule's tiles share: the geometry and the weights as matrices.
pub(super) struct Layer<'a, T> {
    /// Input channels.
    pub c: usize,
    /// Output channels.
    pub m: usize,
    /// Pixels per sample.
    pub hw: usize,
    /// Samples.
    pub n: usize,
    /// The weights [m, c].
    pub w: &'a [T],
    /// `w⁺` [m, c].
    pub wp: &'a [T],
    /// `[w⁺ | w⁻]` [m, 2c], for z⁺ over inputs with negative values (its VJP, and its forward
    /// where the output was not kept).
    pub stacked: Option<&'a [T]>,
    /// `|w|` [m, c], for the forward `x⁺·w⁺ + x⁻·w⁻` of inputs with negative values from the
    /// layer's output (see `LinearLayer::pos_part`).
    pub abs: Option<&'a [T]>,
    /// The input channels with negative values, where not all have them (x⁻ is zero on the
    /// others): `stacked` is then `[w⁺ | w⁻_neg]` [m, c + |neg|], and γ's x⁻ term reads `wneg`.
    pub neg: Option<&'a [usize]>,
    /// `w` on the channels `neg` [m, |neg|], for γ's x⁻ term.
    pub wneg: Option<&'a [T]>,
}

/// Buffers one thread reuses across its tiles.
#[derive(Default)]
struct Scratch<T> {
    xs: Vec<MaybeUninit<T>>,
    p: Vec<MaybeUninit<T>>,
    s: Vec<MaybeUninit<T>>,
    d: Vec<MaybeUninit<T>>,
}

/// `len` elements of `v`, grown as needed (their contents are whatever the last tile left).
fn room<T>(v: &mut Vec<MaybeUninit<T>>, len: usize) -> &mut [MaybeUninit<T>] {
    if v.len() < len {
        v.resize_with(len, MaybeUninit::uninit);
    }
    &mut v[..len]
}

/// # Safety
/// Every element of `v` must have been written.
unsafe fn init<T>(v: &[MaybeUninit<T>]) -> &[T] {
    // SAFETY: by the caller.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const T, v.len()) }
}

/// `Jᵀ_w s` for one tile: `w` [rows, m] read transposed times the seeds `s` [m, tl], into `dst`
/// (rows of stride `stride`, `len` elements valid), added onto it with `accumulate`.
///
/// # Safety
/// As [`matmul_raw`]: `dst` valid for `rows` rows of `tl` at stride `stride` within `len`,
/// initialised when `accumulate`, and not aliased during the call.
#[allow(clippy::too_many_arguments)] // a product's full shape; a struct would only rename it
unsafe fn vjp_tile<T: Float>(
    rows: usize,
    m: usize,
    w: &[T],
    s: &[T],
    tl: usize,
    dst: *mut T,
    len: usize,
    stride: usize,
    accumulate: bool,
) {
    // SAFETY: by the caller.
    unsafe {
        matmul_raw(
            rows,
            tl,
            m,
            Mat::rows_t(w, rows),
            Mat::rows(s, tl),
            dst,
            len,
            stride,
            accumulate,
            Threads::One,
            None,
        )
    }
}

impl<T: Float> Layer<'_, T> {
    /// Whether the input has negative values.
    fn signed(&self) -> bool {
        self.stacked.is_some() || self.abs.is_some()
    }

    /// Input channels with negative values (all of them unless `neg` says otherwise).
    fn ns(&self) -> usize {
        self.neg.map_or(self.c, |s| s.len())
    }

    /// The channel of x⁻'s row `j` (of `ns`).
    fn neg_channel(&self, j: usize) -> usize {
        self.neg.map_or(j, |s| s[j])
    }

    /// Each channel's row in x⁻'s rows, or `usize::MAX` (none), when `neg` picks channels.
    fn neg_rows(&self) -> Option<Vec<usize>> {
        self.neg.map(|s| super::index_in(self.c, s))
    }

    /// Pixels per tile: the tile's buffers (about 3c + 4m values per pixel) near 512 kB, in
    /// multiples of 16 (the kernels' vector width), and at least two tiles per thread at batch 1
    /// so that both cores work.
    pub(super) fn tile(&self) -> usize {
        let per_pixel = (3 * self.c + 4 * self.m).max(1) * std::mem::size_of::<T>();
        let mut t = ((1usize << 19) / per_pixel).max(16) / 16 * 16;
        if self.n == 1 {
            let spread = self.hw.div_ceil(2 * rayon::current_num_threads()).div_ceil(16) * 16;
            t = t.min(spread.max(16));
        }
        t.min(self.hw).max(1)
    }

    /// Runs `body(sample, columns, scratch, out)` on every tile, in parallel; `out` is the
    /// output's base pointer (samples [c, hw]), whose tile each call must write in full.
    fn each_tile(&self, t: usize, body: impl Fn(usize, Range<usize>, &mut Scratch<T>, *mut T) + Sync) -> Vec<T> {
        let total = self.n * self.c * self.hw;
        let mut out: Vec<T> = Vec::with_capacity(total);
        let op = SendPtr(out.as_mut_ptr());
        let per = self.hw.div_ceil(t);
        // One scratch per pool thread (and one for a caller outside the pool), so that buffers
        // are allocated per call, not per tile (rayon's `for_each_init` makes one per job, and
        // every tile is its own job here). Nothing inside `body` re-enters the pool while its
        // thread holds the lock.
        let slots: Vec<std::sync::Mutex<Scratch<T>>> =
            (0..=rayon::current_num_threads()).map(|_| Default::default()).collect();
        (0..self.n * per).into_par_iter().with_max_len(1).for_each(|task| {
            let (s, k) = (task / per, task % per);
            let op = &op;
            let slot = rayon::current_thread_index().map_or(slots.len() - 1, |i| i.min(slots.len() - 2));
            // A poisoned slot held only scratch values, which every tile overwrites before reading.
            let mut sc = slots[slot].lock().unwrap_or_else(|e| e.into_inner());
            body(s, k * t..((k + 1) * t).min(self.hw), &mut sc, op.0);
        });
        // SAFETY: the tiles cover every column of every sample, and each call writes its tile's
        // elements of all c rows.
        unsafe { out.set_len(total) };
        out
    }

    /// The modified forward of one tile into `p` [m, cols]: `w⁺·x` for non-negative inputs,
    /// otherwise `x⁺·w⁺ + x⁻·w⁻`, from the output `out` (sample s's [m, hw] with its stored bias)
    /// as `½(y − b + |w|·|x|)` where `abs` and `out` are at hand, else as `[w⁺ | w⁻]·[x⁺; x⁻]`
    /// (the tile's only copy of x is |x| or the split).
    fn forward(&self, xs: &[T], cols: &Range<usize>, sc: &mut Scratch<T>, out: Option<(&[T], Bias<'_, T>)>) {
        let (c, m, hw, tl) = (self.c, self.m, self.hw, cols.len());
        let p = room(&mut sc.p, m * tl).as_mut_ptr() as *mut T;
        if let (Some(wa), Some((ys, stored))) = (self.abs, out) {
            let xa = room(&mut sc.xs, c * tl);
            for i in 0..c {
                let src = &xs[i * hw + cols.start..i * hw + cols.end];
                xa[i * tl..(i + 1) * tl].iter_mut().zip(src).for_each(|(d, &v)| {
                    d.write(v.abs());
                });
            }
            // SAFETY: all c rows written above.
            let xa = unsafe { init(xa) };
            // SAFETY: p holds m·tl elements, written by the product.
            unsafe {
                matmul_raw(m, tl, c, Mat::rows(wa, c), Mat::rows(xa, tl), p, m * tl, tl, false, Threads::One, None)
            };
            // SAFETY: written by the product.
            let p = unsafe { std::slice::from_raw_parts_mut(p, m * tl) };
            let half = T::of(0.5);
            for (i, row) in p.chunks_mut(tl).enumerate() {
                let yr = &ys[i * hw + cols.start..i * hw + cols.end];
                match stored.row(i, cols, hw) {
                    Ok(b) => row.iter_mut().zip(yr).for_each(|(a, &yv)| *a = half * (*a + yv - b)),
                    Err(bs) => row.iter_mut().zip(yr).zip(bs).for_each(|((a, &yv), &b)| *a = half * (*a + yv - b)),
                }
            }
            return;
        }
        match self.stacked {
            Some(w2) => {
                let k2 = c + self.ns();
                let x2 = room(&mut sc.xs, k2 * tl);
                for i in 0..c {
                    let src = &xs[i * hw + cols.start..i * hw + cols.end];
                    x2[i * tl..(i + 1) * tl].iter_mut().zip(src).for_each(|(d, &v)| {
                        d.write(pos(v));
                    });
                }
                for j in 0..self.ns() {
                    let i = self.neg_channel(j);
                    let src = &xs[i * hw + cols.start..i * hw + cols.end];
                    x2[(c + j) * tl..(c + j + 1) * tl].iter_mut().zip(src).for_each(|(d, &v)| {
                        d.write(neg(v));
                    });
                }
                // SAFETY: all c + ns rows written above.
                let x2 = unsafe { init(x2) };
                // SAFETY: p holds m·tl elements, written by the product.
                unsafe {
                    matmul_raw(
                        m,
                        tl,
                        k2,
                        Mat::rows(w2, k2),
                        Mat::rows(x2, tl),
                        p,
                        m * tl,
                        tl,
                        false,
                        Threads::One,
                        None,
                    )
                };
            }
            None => {
                let b = Mat { data: &xs[cols.start..], rs: hw, cs: 1 };
                // SAFETY: as above.
                unsafe { matmul_raw(m, tl, c, Mat::rows(self.wp, c), b, p, m * tl, tl, false, Threads::One, None) };
            }
        }
    }
}

/// The ratios `g = r / (z + b⁺)` of a tile, in place of its modified forward `z` [m, cols].
fn ratios<T: Float>(z: &mut [T], rs: &[T], cols: &Range<usize>, hw: usize, bias: Bias<'_, T>, eps: f64) {
    let tl = cols.len();
    for (i, row) in z.chunks_mut(tl).enumerate() {
        let rr = &rs[i * hw + cols.start..i * hw + cols.end];
        match bias.row(i, cols, hw) {
            Ok(b) => {
                let b = pos(b);
                row.iter_mut().zip(rr).for_each(|(z, &rv)| *z = rv / stabilize(*z + b, eps));
            }
            Err(bs) => row.iter_mut().zip(rr).zip(bs).for_each(|((z, &rv), &b)| *z = rv / stabilize(*z + pos(b), eps)),
        }
    }
}

/// For the register kernels of z⁺ over inputs of both signs: the stacked weights as f32 and each
/// channel's w⁻ column in them, where T is f32, the kernels are available and every
/// input channel has negative values. The kernels' VJP makes both sums on every channel; where
/// only some are signed the library's product over `[w⁺ | w⁻]` on those alone did less work
/// (DenseNet-121's 1×1 layers ran 1.05–1.15× slower in the kernels; per-node profiles
/// alternated).
fn split_kernels<'a, T: Float>(l: &Layer<'a, T>) -> Option<(&'a [f32], Vec<usize>)> {
    let f32_ = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
    let w2 = l.stacked.filter(|_| f32_ && l.neg.is_none() && ops_pointwise::split_available())?;
    let neg: Vec<usize> = (0..l.ns()).map(|j| l.neg_channel(j)).collect();
    Some((as_f32(w2), ops_pointwise::Split::columns(l.c, &neg)))
}

/// z⁺ (`x⁺·w⁺ + x⁻·w⁻ + b⁺` over its sum) on a plain 1×1 convolution, in tiles of `t` pixels (see
/// [`Layer::tile`]): `x` [n, c, hw], `r` [n, m, hw]; `bias` is the layer's bias the rule uses (its
/// positive part is taken here); `y` the forward output with its `stored` bias, when kept.
#[allow(clippy::too_many_arguments)] // the rule's full context; a struct would only rename it
pub(super) fn zplus<T: Float>(
    l: &Layer<'_, T>,
    t: usize,
    x: &[T],
    y: Option<&[T]>,
    r: &[T],
    stored: Bias<'_, T>,
    bias: Bias<'_, T>,
    eps: f64,
) -> Vec<T> {
    let (c, m, hw) = (l.c, l.m, l.hw);
    let rows = l.neg_rows();
    // Inputs of both signs in f32 with AVX-512: the register kernels (see `ops::pointwise::Split`)
    // for the VJP, and for the forward with its ratio unless the kept output gives the forward
    // with one product of |x| and |w|.
    let split = split_kernels::<T>(l).map(|(w2, wn)| {
        let ratio = l.abs.is_none() || y.is_none();
        let b: Vec<f32> = match bias {
            Bias::Channel(b) => (0..m).map(|i| pos(b[i % b.len()]).f64() as f32).collect(),
            Bias::Varying(b) => b.iter().map(|&v| pos(v).f64() as f32).collect(),
            Bias::None => vec![0.0; m],
        };
        (w2, wn, ratio.then_some(b))
    });
    l.each_tile(t, |s, cols, sc, out| {
        let tl = cols.len();
        let xs = &x[s * c * hw..(s + 1) * c * hw];
        let rs = &r[s * m * hw..(s + 1) * m * hw];
        if let Some((w2, wn, b)) = &split {
            let k = ops_pointwise::Split { x: as_f32(xs), hw, c, m, w2, wn };
            if let Some(b) = b {
                let g = room(&mut sc.p, m * tl);
                // SAFETY: T is f32 (split_kernels checked it); the same memory, uninitialised.
                let g = unsafe { &mut *(g as *mut [MaybeUninit<T>] as *mut [MaybeUninit<f32>]) };
                k.ratio(cols.clone(), as_f32(rs), Some(b), eps as f32, g);
            } else {
                l.forward(xs, &cols, sc, y.map(|y| (&y[s * m * hw..(s + 1) * m * hw], stored)));
                // SAFETY: the forward wrote all m·tl elements (T is f32 here).
                let z = unsafe { std::slice::from_raw_parts_mut(sc.p.as_mut_ptr() as *mut T, m * tl) };
                ratios(z, rs, &cols, hw, bias, eps);
            }
            // SAFETY: sc.p's first m·tl elements were written above (T is f32).
            let g = unsafe { std::slice::from_raw_parts(sc.p.as_ptr() as *const f32, m * tl) };
            // SAFETY: this tile's columns of sample s, written by this task alone.
            unsafe { k.vjp(cols, g, out.add(s * c * hw) as *mut f32) };
            return;
        }
        l.forward(xs, &cols, sc, y.map(|y| (&y[s * m * hw..(s + 1) * m * hw], stored)));
        // SAFETY: the forward wrote all m·tl elements.
        let g = unsafe { std::slice::from_raw_parts_mut(sc.p.as_mut_ptr() as *mut T, m * tl) };
        ratios(g, rs, &cols, hw, bias, eps);
        let g: &[T] = g;
        // SAFETY (both arms): this tile's columns of sample s, [c rows of hw], written by this
        // task alone; the products write every element before it is read.
        let base = unsafe { out.add(s * c * hw + cols.start) };
        let rest = (l.n - s) * c * hw - cols.start;
        match l.stacked {
            Some(w2) => {
                // [Jᵀ_{w⁺} g; Jᵀ_{w⁻} g], then x⁺ times the first half plus x⁻ times the second
                // (whose rows are the channels with negative values).
                let k2 = c + l.ns();
                let d = room(&mut sc.d, k2 * tl).as_mut_ptr() as *mut T;
                unsafe { vjp_tile(k2, m, w2, g, tl, d, k2 * tl, tl, false) };
                let d = unsafe { std::slice::from_raw_parts(d as *const T, k2 * tl) };
                for i in 0..c {
                    let xr = &xs[i * hw + cols.start..i * hw + cols.end];
                    let dp = &d[i * tl..(i + 1) * tl];
                    // Uninitialised until here: written, not assigned through a reference.
                    let o = unsafe { std::slice::from_raw_parts_mut(base.add(i * hw) as *mut MaybeUninit<T>, tl) };
                    let j = rows.as_ref().map_or(i, |at| at[i]);
                    if j == usize::MAX {
                        o.iter_mut().zip(xr).zip(dp).for_each(|((o, &xv), &a)| {
                            o.write(a * pos(xv));
                        });
                    } else {
                        let dn = &d[(c + j) * tl..(c + j + 1) * tl];
                        o.iter_mut().zip(xr).zip(dp.iter().zip(dn)).for_each(|((o, &xv), (&a, &b))| {
                            o.write(a * pos(xv) + b * neg(xv));
                        });
                    }
                }
            }
            None => {
                unsafe { vjp_tile(c, m, l.wp, g, tl, base, rest, hw, false) };
                for i in 0..c {
                    let xr = &xs[i * hw + cols.start..i * hw + cols.end];
                    let o = unsafe { std::slice::from_raw_parts_mut(base.add(i * hw), tl) };
                    o.iter_mut().zip(xr).for_each(|(o, &xv)| *o *= xv);
                }
            }
        }
    })
}

/// γ on a plain 1×1 convolution, the regrouped form of `relevance_bf` (see there) per tile of `t`
/// pixels: `y` is the forward output with the layer's stored bias, `stored` that bias and `used`
/// the one the rule adds (none when the bias is ignored). With `collapsed`, `w + γ·w⁺` [m, c], a
/// tile where no negative output carries relevance takes one seed and one VJP for x⁺'s factor
/// (checked per tile, on values the tile reads anyway).
#[allow(clippy::too_many_arguments)] // the rule's full context; a struct would only rename it
pub(super) fn gamma<T: Float>(
    l: &Layer<'_, T>,
    t: usize,
    x: &[T],
    y: &[T],
    r: &[T],
    stored: Bias<'_, T>,
    used: Bias<'_, T>,
    gamma: T,
    eps: f64,
    collapsed: Option<&[T]>,
) -> Vec<T> {
    let (c, m, hw) = (l.c, l.m, l.hw);
    let plain = l.signed();
    let k = T::of(2.0) + gamma;
    let rows = l.neg_rows();
    l.each_tile(t, |s, cols, sc, out| {
        let tl = cols.len();
        let xs = &x[s * c * hw..(s + 1) * c * hw];
        let (ys, rs) = (&y[s * m * hw..(s + 1) * m * hw], &r[s * m * hw..(s + 1) * m * hw]);
        let collapsed = collapsed.filter(|_| {
            (0..m).all(|i| {
                let span = i * hw + cols.start..i * hw + cols.end;
                !super::negatives_carry_some(&ys[span.clone()], &rs[span])
            })
        });
        // Seeds: ga alone when collapsed (it is also the plain ratio), else ga, gb (and gc).
        let n = if collapsed.is_some() { 1 } else { 2 + plain as usize };
        l.forward(xs, &cols, sc, Some((ys, stored)));
        // SAFETY: written by the forward.
        let p = unsafe { init(&sc.p[..m * tl]) };
        // Seeds [ga; gb] (Jᵀ_w's and Jᵀ_{w⁺}'s) and, with x⁻, the plain ratio gc; ga alone when
        // collapsed.
        let seeds = room(&mut sc.s, n * m * tl);
        let (ga, rest) = seeds.split_at_mut(m * tl);
        let (gb, gc) = rest.split_at_mut(if n >= 2 { m * tl } else { 0 });
        for i in 0..m {
            let span = i * hw + cols.start..i * hw + cols.end;
            let args = GammaPlane { gamma, eps, y: &ys[span.clone()], r: &rs[span], p: &p[i * tl..(i + 1) * tl] };
            let a = &mut ga[i * tl..(i + 1) * tl];
            let b: &mut [MaybeUninit<T>] = if n >= 2 { &mut gb[i * tl..(i + 1) * tl] } else { &mut [] };
            let cc: &mut [MaybeUninit<T>] = if n >= 3 { &mut gc[i * tl..(i + 1) * tl] } else { &mut [] };
            macro_rules! go {
                ($st:expr, $us:expr) => {
                    match n {
                        1 => args.run::<1>($st, $us, a, b, cc),
                        2 => args.run::<2>($st, $us, a, b, cc),
                        _ => args.run::<3>($st, $us, a, b, cc),
                    }
                };
            }
            // (Whether a negative output has relevance was settled above for the tile.)
            let _ = match (stored.row(i, &cols, hw), used.row(i, &cols, hw)) {
                (Ok(st), Ok(us)) => go!(|_| st, |_| us),
                (Ok(st), Err(us)) => go!(|_| st, |j| us[j]),
                (Err(st), Ok(us)) => go!(|j| st[j], |_| us),
                (Err(st), Err(us)) => go!(|j| st[j], |j| us[j]),
            };
        }
        // SAFETY: `run` wrote every element of the n seeds.
        let (ga, gb) = unsafe { (init(ga), init(gb)) };
        // SAFETY (below): this tile's columns of sample s, written by this task alone; the first
        // product writes every element before the second accumulates onto it.
        let base = unsafe { out.add(s * c * hw + cols.start) };
        let rest = (l.n - s) * c * hw - cols.start;
        // F⁺ = Jᵀ_w ga + Jᵀ_{w⁺} gb, or Jᵀ_{w+γw⁺} ga when collapsed, straight into the output.
        unsafe {
            match collapsed {
                Some(wg) => vjp_tile(c, m, wg, ga, tl, base, rest, hw, false),
                None => {
                    vjp_tile(c, m, l.w, ga, tl, base, rest, hw, false);
                    vjp_tile(c, m, l.wp, gb, tl, base, rest, hw, true);
                }
            }
        }
        if plain {
            // R = |x| ⊙ F⁺ + (2+γ)·x⁻ ⊙ Jᵀ_w g.
            let gc = if collapsed.is_some() { ga } else { unsafe { init(gc) } };
            // Jᵀ_w g on the channels with negative values (all, or those `neg` names).
            let (ns, wn) = (l.ns(), l.wneg.unwrap_or(l.w));
            let d = room(&mut sc.d, ns * tl).as_mut_ptr() as *mut T;
            unsafe { vjp_tile(ns, m, wn, gc, tl, d, ns * tl, tl, false) };
            let d = unsafe { std::slice::from_raw_parts(d as *const T, ns * tl) };
            for i in 0..c {
                let xr = &xs[i * hw + cols.start..i * hw + cols.end];
                let o = unsafe { std::slice::from_raw_parts_mut(base.add(i * hw), tl) };
                match rows.as_ref().map_or(i, |at| at[i]) {
                    usize::MAX => o.iter_mut().zip(xr).for_each(|(o, &xv)| *o *= xv),
                    j => {
                        let dr = &d[j * tl..(j + 1) * tl];
                        o.iter_mut().zip(xr).zip(dr).for_each(|((o, &xv), &pv)| *o = xv.abs() * *o + k * neg(xv) * pv)
                    }
                }
            }
        } else {
            for i in 0..c {
                let xr = &xs[i * hw + cols.start..i * hw + cols.end];
                let o = unsafe { std::slice::from_raw_parts_mut(base.add(i * hw), tl) };
                o.iter_mut().zip(xr).for_each(|(o, &xv)| *o *= xv);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator.
    fn data(len: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn stab(z: f64, e: f64) -> f64 {
        if z >= 0.0 { z + e } else { z - e }
    }

    /// z⁺ and γ by their definitions, per sample as explicit sums over the 1×1 convolution's
    /// contributions `x_j·w_kj` (zennit's forms: z⁺'s x⁺w⁺ + x⁻w⁻ + b⁺; γ's x⁺(w+γw⁺) +
    /// x⁻(w+γw⁻) + b + γb⁺ where the output is positive, the mirror image where negative, nothing
    /// at zero). `b` is the stored bias (which decides γ's output sign), `bu` the one the rule adds.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        gamma: Option<f64>,
        c: usize,
        m: usize,
        hw: usize,
        x: &[f64],
        w: &[f64],
        b: &[f64],
        bu: &[f64],
        r: &[f64],
    ) -> Vec<f64> {
        let (p, n) = (|v: f64| v.max(0.0), |v: f64| v.min(0.0));
        let mut out = vec![0.0; x.len()];
        for s in 0..x.len() / (c * hw) {
            for k in 0..m {
                for q in 0..hw {
                    let xs = |j: usize| x[(s * c + j) * hw + q];
                    let bk = b[k * hw + q];
                    let y: f64 = (0..c).map(|j| xs(j) * w[k * c + j]).sum::<f64>() + bk;
                    let contrib = |j: usize| -> f64 {
                        let (xv, wv) = (xs(j), w[k * c + j]);
                        match gamma {
                            None => p(xv) * p(wv) + n(xv) * n(wv),
                            Some(g) if y > 0.0 => p(xv) * (wv + g * p(wv)) + n(xv) * (wv + g * n(wv)),
                            Some(g) => p(xv) * (wv + g * n(wv)) + n(xv) * (wv + g * p(wv)),
                        }
                    };
                    let bu = bu[k * hw + q];
                    let bias = match gamma {
                        None => p(bu),
                        Some(g) if y > 0.0 => bu + g * p(bu),
                        Some(g) => bu + g * n(bu),
                    };
                    if gamma.is_some() && y == 0.0 {
                        continue;
                    }
                    let z: f64 = (0..c).map(contrib).sum::<f64>() + bias;
                    let rv = r[(s * m + k) * hw + q];
                    for j in 0..c {
                        out[(s * c + j) * hw + q] += contrib(j) * rv / stab(z, 1e-6);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn fused_tiles_equal_the_rules_formulas() {
        let (c, m) = (5, 7);
        for (n, hw) in [(1, 37), (2, 64), (3, 20)] {
            let x = data(n * c * hw, 1);
            let w = data(m * c, 2);
            let r = data(n * m * hw, 3);
            let bc = data(m, 4);
            let bv = data(m * hw, 5);
            let wp: Vec<f64> = w.iter().map(|&v| pos(v)).collect();
            let w2 = super::super::stack_pos_neg(&w, c);
            let xabs: Vec<f64> = x.iter().map(|v| v.abs()).collect();
            let y_of = |x: &[f64], b: &[f64]| -> Vec<f64> {
                let mut y = vec![0.0; n * m * hw];
                for s in 0..n {
                    for k in 0..m {
                        for q in 0..hw {
                            y[(s * m + k) * hw + q] =
                                (0..c).map(|j| x[(s * c + j) * hw + q] * w[k * c + j]).sum::<f64>() + b[k * hw + q];
                        }
                    }
                }
                y
            };
            let per_channel: Vec<f64> = (0..m * hw).map(|i| bc[i / hw]).collect();
            let wabs: Vec<f64> = w.iter().map(|v| v.abs()).collect();
            // Mixed signs (the forward stacked, or from the output with |w|; the plain ratio) and
            // non-negative inputs; a bias per channel, spatially varying, and none; tiles of one,
            // several (with a short last one) and all pixels.
            // Negative values on channels 1 and 4 only, with the x⁻ terms on those.
            let some = [1, 4];
            let xsome: Vec<f64> =
                x.iter().enumerate().map(|(i, &v)| if some.contains(&(i / hw % c)) { v } else { v.abs() }).collect();
            let w2some = super::super::stack_pos_neg_on(&w, c, 1, &some);
            let wnsome = super::super::select_inputs(&w, c, 1, &some, |v| v);
            let forms = [
                (&x, true, false, false),
                (&x, true, true, false),
                (&xabs, false, false, false),
                (&xsome, true, false, true),
                (&xsome, true, true, true),
            ];
            for (xv, signs, from_output, on_some) in forms {
                let l = Layer {
                    c,
                    m,
                    hw,
                    n,
                    w: &w,
                    wp: &wp,
                    stacked: signs.then_some(if on_some { &w2some[..] } else { &w2[..] }),
                    abs: from_output.then_some(&wabs[..]),
                    neg: on_some.then_some(&some[..]),
                    wneg: on_some.then_some(&wnsome[..]),
                };
                for (bias, full) in [(Bias::Channel(&bc[..]), &per_channel), (Bias::Varying(&bv[..]), &bv)] {
                    let y = y_of(xv, full);
                    let yk = from_output.then_some(&y[..]);
                    let r_relu: Vec<f64> = r.iter().zip(&y).map(|(&rv, &yv)| if yv < 0.0 { 0.0 } else { rv }).collect();
                    // Masked in the first 16 columns of every plane only.
                    let r_mixed: Vec<f64> = (0..r.len()).map(|i| if i % hw < 16 { r_relu[i] } else { r[i] }).collect();
                    assert!(r_relu.iter().zip(&r).any(|(a, b)| a != b) && r_relu.iter().any(|&v| v != 0.0));
                    let wg: Vec<f64> = w.iter().map(|&v| v + 0.25 * pos(v)).collect();
                    for t in [16, hw.div_ceil(2), hw] {
                        let check = |got: Vec<f64>, want: Vec<f64>, what: &str| {
                            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                                assert!(
                                    (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
                                    "{what} n {n} hw {hw} tile {t} signs {signs} {from_output} at {i}: {a} vs {b}"
                                );
                            }
                        };
                        check(
                            zplus(&l, t, xv, yk, &r, bias, bias, 1e-6),
                            naive(None, c, m, hw, xv, &w, full, full, &r),
                            "z+",
                        );
                        check(
                            gamma(&l, t, xv, &y, &r, bias, bias, 0.25, 1e-6, None),
                            naive(Some(0.25), c, m, hw, xv, &w, full, full, &r),
                            "gamma",
                        );
                        // No relevance at negative outputs (as under a ReLU): one seed, w + γw⁺;
                        // where some have relevance, the full form (per tile: on the mixed
                        // relevance the first tiles collapse and the last do not).
                        for rr in [&r, &r_relu, &r_mixed] {
                            check(
                                gamma(&l, t, xv, &y, rr, bias, bias, 0.25, 1e-6, Some(&wg)),
                                naive(Some(0.25), c, m, hw, xv, &w, full, full, rr),
                                "gamma collapsed",
                            );
                        }
                    }
                    // The bias left out of the rule (z⁺ without b⁺; γ's sign still from the output
                    // with its stored bias).
                    let zero = vec![0.0; m * hw];
                    check_close(
                        zplus(&l, hw, xv, yk, &r, bias, Bias::None, 1e-6),
                        naive(None, c, m, hw, xv, &w, &zero, &zero, &r),
                    );
                    check_close(
                        gamma(&l, 16, xv, &y, &r, bias, Bias::None, 1.0, 1e-6, None),
                        naive(Some(1.0), c, m, hw, xv, &w, full, &zero, &r),
                    );
                }
            }
        }
    }

    /// z⁺ in f32 over inputs of both signs against the float64 formula. With every channel
    /// signed it takes the register kernels where AVX-512F is present (`ops::pointwise::Split`):
    /// the bias per channel, per output or none in the kernel's ratio, or the forward from the
    /// kept output with the ratio outside it; with some channels signed, the library's product.
    /// Planes and tiles with partial vectors.
    #[test]
    fn zplus_in_f32_equals_the_formula() {
        let (c, m) = (19, 13);
        for (n, hw) in [(1, 37), (2, 70)] {
            let x = data(n * c * hw, 11);
            let w = data(m * c, 12);
            let r = data(n * m * hw, 13);
            let bc = data(m, 14);
            let bv = data(m * hw, 15);
            let some = [0, 3, 4, 18];
            let xsome: Vec<f64> =
                x.iter().enumerate().map(|(i, &v)| if some.contains(&(i / hw % c)) { v } else { v.abs() }).collect();
            let f = |v: &[f64]| -> Vec<f32> { v.iter().map(|&v| v as f32).collect() };
            // The formula on the inputs and weights as f32 has them.
            let back = |v: &[f32]| -> Vec<f64> { v.iter().map(|&v| v as f64).collect() };
            let (w32, bc32, bv32) = (f(&w), f(&bc), f(&bv));
            let (wf, bcf, bvf) = (back(&w32), back(&bc32), back(&bv32));
            let wp: Vec<f32> = w32.iter().map(|&v| pos(v)).collect();
            let wabs: Vec<f32> = w32.iter().map(|v| v.abs()).collect();
            let w2 = super::super::stack_pos_neg(&w32, c);
            let w2some = super::super::stack_pos_neg_on(&w32, c, 1, &some);
            let per_channel: Vec<f64> = (0..m * hw).map(|i| bcf[i / hw]).collect();
            let zero = vec![0.0; m * hw];
            for (xv, on_some) in [(&x, false), (&xsome, true)] {
                let x32 = f(xv);
                let xf = back(&x32);
                for from_output in [false, true] {
                    let l = Layer {
                        c,
                        m,
                        hw,
                        n,
                        w: &w32,
                        wp: &wp,
                        stacked: Some(if on_some { &w2some[..] } else { &w2[..] }),
                        abs: from_output.then_some(&wabs[..]),
                        neg: on_some.then_some(&some[..]),
                        wneg: None,
                    };
                    let cases = [
                        (Bias::Channel(&bc32[..]), &per_channel),
                        (Bias::Varying(&bv32[..]), &bvf),
                        (Bias::None, &zero),
                    ];
                    for (bias, full) in cases {
                        // The kept output with its stored bias, as the forward pass computed it.
                        let y: Vec<f32> = (0..n * m * hw)
                            .map(|i| {
                                let (s, k, q) = (i / (m * hw), i / hw % m, i % hw);
                                let z: f64 = (0..c).map(|j| xf[(s * c + j) * hw + q] * wf[k * c + j]).sum();
                                (z + full[k * hw + q]) as f32
                            })
                            .collect();
                        let yk = from_output.then_some(&y[..]);
                        let r32 = f(&r);
                        for t in [16, 48, hw] {
                            let got = zplus(&l, t.min(hw), &x32, yk, &r32, bias, bias, 0.5);
                            let want = naive_eps(c, m, hw, &xf, &wf, full, &back(&r32), 0.5);
                            for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                                assert!(
                                    (a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                                    "n {n} hw {hw} tile {t} some {on_some} kept {from_output} at {i}: {a} vs {b}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// z⁺ by its formula in float64 with the stabiliser `eps`: `x⁺·w⁺ + x⁻·w⁻ + b⁺` per output,
    /// each input's share `x⁺·w⁺ + x⁻·w⁻` of its relevance over that sum.
    #[allow(clippy::too_many_arguments)]
    fn naive_eps(c: usize, m: usize, hw: usize, x: &[f64], w: &[f64], b: &[f64], r: &[f64], eps: f64) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        let n = x.len() / (c * hw);
        for s in 0..n {
            for k in 0..m {
                for q in 0..hw {
                    let share = |j: usize| {
                        let xv = x[(s * c + j) * hw + q];
                        let wv = w[k * c + j];
                        xv.max(0.0) * wv.max(0.0) + xv.min(0.0) * wv.min(0.0)
                    };
                    let z: f64 = (0..c).map(share).sum::<f64>() + b[k * hw + q].max(0.0);
                    let g = r[(s * m + k) * hw + q] / stab(z, eps);
                    for j in 0..c {
                        out[(s * c + j) * hw + q] += share(j) * g;
                    }
                }
            }
        }
        out
    }

    fn check_close(got: Vec<f64>, want: Vec<f64>) {
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn tiles_cover_the_plane_in_vector_multiples() {
        let w = [0.0f32; 4];
        for (n, hw, c, m) in [(1, 12544, 16, 96), (1, 784, 40, 240), (8, 3136, 24, 144), (1, 600, 2000, 2000)] {
            let l = Layer { c, m, hw, n, w: &w, wp: &w, stacked: None, abs: None, neg: None, wneg: None };
            let t = l.tile();
            assert!(t >= 1 && t <= hw, "tile {t} of {hw}");
            assert!(t == hw || t.is_multiple_of(16), "tile {t} of {hw} not a multiple of 16");
            if n == 1 {
                assert!(hw.div_ceil(t) >= 2.min(hw.div_ceil(16)), "one tile of {hw} at batch 1");
            }
        }
    }
}
