//! Rules on linear layers (Conv, Gemm, MatMul with constant weights): each rule is a modified
//! forward, a stabilised division, a VJP and a multiplication by the (modified) input,
//! `R_in = Σ_k x_k ⊙ Jᵀ_{w_k}(R / z)`, with zennit's modifiers and stabilisers.

use super::{Rule, stabilize};
use crate::ops::conv::{ConvGeom, conv2d, conv2d_then, conv2d_vjp, conv2d_vjp_sum, conv2d_vjp_then};
use crate::ops::elementwise::{map1, map2, update1, update2};
use crate::ops::gemm::{Mat, Threads, matmul};
use crate::ops::pool::valid_outputs;
use crate::tensor::Float;
use std::borrow::Cow;
use std::mem::MaybeUninit;

mod pointwise;

/// The geometry of a linear layer.
#[derive(Clone, Debug)]
pub enum LinearKind {
    /// A (grouped) convolution; `w` is [M, C/g, kh, kw].
    Conv(ConvGeom),
    /// `y[m×n] = x[m×k] · w[k×n]`, or `x · wᵀ` with `w` stored [n×k] when `transposed` (ONNX
    /// Gemm's transB, PyTorch's Linear): used in place, since copying VGG's 120 M head weights per
    /// pass (or per plan) costs more than the product.
    Dense {
        /// Rows (samples × positions).
        m: usize,
        /// Input features.
        k: usize,
        /// Output features.
        n: usize,
        /// Weights stored [n×k].
        transposed: bool,
    },
}

/// A linear layer with its parameters in the run's precision. The weights are borrowed from the
/// plan's constants where they can be used as they are (convolutions, MatMul), so that a backward
/// pass does not copy every layer's weights.
#[derive(Clone, Debug)]
pub struct LinearLayer<'a, T: Clone> {
    /// Geometry.
    pub kind: LinearKind,
    /// Weights (see [`LinearKind`]).
    pub w: std::borrow::Cow<'a, [T]>,
    /// Bias per output channel (conv: M) or feature (dense: N), or per output element (a
    /// canonized conv's spatially varying bias), borrowed from the graph where it can be.
    pub bias: Option<std::borrow::Cow<'a, [T]>>,
    /// Modified weights computed once per plan (see [`WeightCache`]); missing ones are made per call.
    pub cache: Option<&'a WeightCache<T>>,
}

/// A modified copy of a layer's weights that a rule needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightMod {
    /// `w⁺`.
    Pos,
    /// `w⁻`.
    Neg,
    /// `w²`.
    Square,
}

impl WeightMod {
    /// The modified weights.
    pub fn apply<T: Float>(self, w: &[T]) -> Vec<T> {
        match self {
            WeightMod::Pos => map(w, pos),
            WeightMod::Neg => map(w, neg),
            WeightMod::Square => map(w, |v| v * v),
        }
    }

    /// The modified weights worth computing once per plan for `rule` (the others are cheap or
    /// depend on the input's signs).
    pub fn for_rule(rule: &Rule) -> Vec<WeightMod> {
        match rule {
            Rule::ZPlus | Rule::Gamma(_) => vec![WeightMod::Pos],
            Rule::AlphaBeta { .. } => vec![WeightMod::Pos, WeightMod::Neg],
            Rule::WSquare => vec![WeightMod::Square],
            _ => vec![],
        }
    }
}

/// Modified weights of one layer, computed once per plan and composite.
#[derive(Debug, Default)]
pub struct WeightCache<T> {
    /// The modified weights by modification.
    pub map: std::collections::HashMap<WeightMod, Vec<T>>,
    /// The variants that depend on what the input and the relevance turn out to be, made on
    /// first use: `[w⁺ | w⁻]` stacked along the input channels and `|w|` (inputs with both
    /// signs), `w + γ·w⁺` for the rule's γ (no relevance at negative outputs).
    stacked: std::sync::OnceLock<Vec<T>>,
    abs: std::sync::OnceLock<Vec<T>>,
    gamma_weights: std::sync::OnceLock<Vec<T>>,
    /// The γ of the rule the cache was made for.
    gamma: Option<f64>,
    /// Weights on the input channels with negative values (see `negative_channels`), by what
    /// they are and the channels: the last few made, as the channels stay the same from input to
    /// input where a threshold ReLU decides them (the copy cost as much as the products it saved
    /// on DenseNet-121's 7×7 layers).
    on_channels: std::sync::Mutex<Vec<OnChannels<T>>>,
    /// z^B's shift per sample (see `box_shift`), for the input size and bounds it was made for.
    box_shift: std::sync::Mutex<Option<BoxShift<T>>>,
    /// The input channels that may hold values below zero, where the graph says so (a threshold
    /// ReLU writes the input: `Graph::signed_channels`): the x⁻ terms run on these whenever the
    /// input has negative values, so that their weights are made once.
    signed: Option<Vec<usize>>,
}

/// z^B's shift per sample with what it was made for: the input's spatial size (a dense layer's
/// features), the bounds.
type BoxShift<T> = ([usize; 2], Vec<f64>, Vec<f64>, std::sync::Arc<Vec<T>>);

/// Weights on a subset of input channels: what they are, the channels, the weights.
type OnChannels<T> = (Selected, Vec<usize>, std::sync::Arc<Vec<T>>);

/// Which weights on a subset of input channels (see [`WeightCache`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Selected {
    /// `w` on the channels.
    Plain,
    /// `w⁻` on the channels.
    Neg,
    /// `w⁺` on the channels.
    Pos,
    /// `[w⁺ | w⁻_s]`.
    Stacked,
}

impl<T: Float> WeightCache<T> {
    /// Computes the modifications `rule` wants for weights `w`.
    pub fn build(rule: &Rule, w: &[T]) -> Self {
        WeightCache {
            map: WeightMod::for_rule(rule).into_iter().map(|m| (m, m.apply(w))).collect(),
            stacked: Default::default(),
            abs: Default::default(),
            gamma_weights: Default::default(),
            gamma: if let Rule::Gamma(g) = rule { Some(*g) } else { None },
            on_channels: Default::default(),
            box_shift: Default::default(),
            signed: None,
        }
    }

    /// The cache of a layer whose input may be below zero on the channels `signed` alone.
    pub fn with_signed_channels(self, signed: Vec<usize>) -> Self {
        WeightCache { signed: Some(signed), ..self }
    }

    /// The input channels that may be below zero, where the graph named them.
    pub fn signed_channels(&self) -> Option<&[usize]> {
        self.signed.as_deref()
    }
}

/// `[w⁺ | w⁻]`: each output channel's row of `row` weights positive part, then negative part (the
/// weights of a convolution with twice the input channels, reading `[x⁺; x⁻]`).
fn stack_pos_neg<T: Float>(w: &[T], row: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(2 * w.len());
    for r in w.chunks(row.max(1)) {
        out.extend(r.iter().map(|&v| pos(v)));
        out.extend(r.iter().map(|&v| neg(v)));
    }
    out
}

/// The input channels `s` of a convolution's weights (`c` input channels of `kk` taps per output
/// channel), each weight mapped by `f`: the weights [m, |s|, kh, kw] of the same convolution on
/// those channels alone.
fn select_inputs<T: Float>(w: &[T], c: usize, kk: usize, s: &[usize], f: impl Fn(T) -> T) -> Vec<T> {
    let mut out = Vec::with_capacity(w.len() / c.max(1) * s.len());
    for r in w.chunks((c * kk).max(1)) {
        for &ch in s {
            out.extend(r[ch * kk..(ch + 1) * kk].iter().map(|&v| f(v)));
        }
    }
    out
}

/// `[w⁺ | w⁻_s]`: [`stack_pos_neg`] with the negative half on the input channels `s` only (the
/// weights of a convolution reading `[x⁺; x⁻_s]`).
fn stack_pos_neg_on<T: Float>(w: &[T], c: usize, kk: usize, s: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(w.len() / c.max(1) * (c + s.len()));
    for r in w.chunks((c * kk).max(1)) {
        out.extend(r.iter().map(|&v| pos(v)));
        for &ch in s {
            out.extend(r[ch * kk..(ch + 1) * kk].iter().map(|&v| neg(v)));
        }
    }
    out
}

/// For each of `c` channels, its index in the sorted subset `s`, or `usize::MAX` outside it.
fn index_in(c: usize, s: &[usize]) -> Vec<usize> {
    let mut at = vec![usize::MAX; c];
    s.iter().enumerate().for_each(|(j, &ch)| at[ch] = j);
    at
}

/// Per-channel input bounds for the z^B rule (input channel c: `low[c] ≤ x ≤ high[c]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Bounds {
    /// Lowest values (one per channel, or one for all).
    pub low: Vec<f64>,
    /// Highest values.
    pub high: Vec<f64>,
}

impl<T: Float> LinearLayer<'_, T> {
    /// The modified weights `m`, from the cache or made now.
    pub fn modified(&self, m: WeightMod) -> std::borrow::Cow<'_, [T]> {
        match self.cache.and_then(|c| c.map.get(&m)).filter(|v| v.len() == self.w.len()) {
            Some(v) => std::borrow::Cow::Borrowed(&v[..]),
            None => std::borrow::Cow::Owned(m.apply(&self.w)),
        }
    }

    /// `Σ_k Jᵀ_{w_k} g_k` in one pass (one col2im for convolutions).
    pub fn vjp_sum(&self, terms: &[(&[T], &[T])]) -> Vec<T> {
        match &self.kind {
            LinearKind::Conv(geom) => conv2d_vjp_sum(geom, terms),
            LinearKind::Dense { m, k, n, transposed } => {
                let mut dx = vec![T::zero(); m * k];
                for (i, (g, w)) in terms.iter().enumerate() {
                    matmul(
                        *m,
                        *k,
                        *n,
                        Mat::rows(g, *n),
                        dense_wt(w, *k, *n, *transposed),
                        &mut dx,
                        i > 0,
                        Threads::Pool,
                    );
                }
                dx
            }
        }
    }

    /// Output elements per sample-row and the number of rows: a conv's [M·oh·ow] per sample, a
    /// dense layer's [n] per row.
    fn out_rows(&self) -> (usize, usize) {
        match &self.kind {
            LinearKind::Conv(g) => {
                let (oh, ow) = g.out_hw().unwrap_or((0, 0));
                (g.m * oh * ow, g.n)
            }
            LinearKind::Dense { m, n, .. } => (*n, *m),
        }
    }
    /// Forward pass with the given (possibly modified) weights and bias.
    pub fn fwd(&self, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
        match &self.kind {
            LinearKind::Conv(g) => conv_biased(g, x, w, bias),
            LinearKind::Dense { m, k, n, transposed } => {
                let mut y = vec![T::zero(); m * n];
                let wm = if *transposed { Mat::rows_t(w, *k) } else { Mat::rows(w, *n) };
                matmul(*m, *n, *k, Mat::rows(x, *k), wm, &mut y, false, Threads::Pool);
                if let Some(b) = bias {
                    add_bias(&self.kind, &mut y, b, T::one());
                }
                y
            }
        }
    }

    /// `Jᵀ g` with the given weights.
    pub fn vjp(&self, g: &[T], w: &[T]) -> Vec<T> {
        self.vjp_sum(&[(g, w)])
    }

    /// The flat rule, `R_in = Jᵀ_1 (R / z_1)` with all-one weights and inputs and no bias, without
    /// running the all-ones layer: `z_1` counts each output's in-bounds inputs, and `Jᵀ_1 g`
    /// spreads the sum of `g` over a group's output channels back over its window, the same for
    /// every input channel of the group (a one-channel transposed convolution instead of an
    /// M-channel one, and no forward at all).
    fn flat(&self, r: &[T], stabilizer: f64) -> Vec<T> {
        match &self.kind {
            LinearKind::Conv(g) => {
                let (oh, ow) = g.out_hw().unwrap_or((0, 0));
                // In-bounds taps per output row and column: each tap adds one to the outputs it
                // lands inside the input for.
                let count = |size: usize, out: usize, ax: usize, k: usize| {
                    let mut n = vec![0usize; out];
                    for t in 0..k {
                        let valid = valid_outputs(size, out, g.stride[ax], t, g.dilation[ax], g.pads[ax]);
                        n[valid].iter_mut().for_each(|c| *c += 1);
                    }
                    n
                };
                let (rows, cols) = (count(g.h, oh, 0, g.kh), count(g.w, ow, 1, g.kw));
                let (cg, mg, ohw) = (g.c / g.group, g.m / g.group, oh * ow);
                let z: Vec<T> = (0..ohw)
                    .map(|p| super::stabilize(T::of((cg * rows[p / ow] * cols[p % ow]) as f64), stabilizer))
                    .collect();
                // Σ over each group's output channels of R / z_1.
                let mut gs = vec![T::zero(); g.n * g.group * ohw];
                for (s, gsum) in gs.chunks_mut(g.group * ohw).enumerate() {
                    for (m, plane) in r[s * g.m * ohw..(s + 1) * g.m * ohw].chunks(ohw).enumerate() {
                        let dst = &mut gsum[(m / mg) * ohw..(m / mg + 1) * ohw];
                        for ((d, &rv), &zv) in dst.iter_mut().zip(plane).zip(&z) {
                            *d += rv / zv;
                        }
                    }
                }
                let one = ConvGeom { c: g.group, m: g.group, ..*g };
                let ones = vec![T::one(); g.group * g.kh * g.kw];
                let spread = conv2d_vjp_sum(&one, &[(&gs, &ones)]);
                let hw = g.h * g.w;
                let mut out = vec![T::zero(); g.n * g.c * hw];
                for (s, o) in out.chunks_mut(g.c * hw).enumerate() {
                    for (c, plane) in o.chunks_mut(hw).enumerate() {
                        let src = (s * g.group + c / cg) * hw;
                        plane.copy_from_slice(&spread[src..src + hw]);
                    }
                }
                out
            }
            LinearKind::Dense { m, k, n, .. } => {
                // z_1 = k for every output; each input receives its row's Σ R / z_1.
                let z = super::stabilize(T::of(*k as f64), stabilizer);
                let mut out = vec![T::zero(); m * k];
                for (o, row) in out.chunks_mut(*k).zip(r.chunks(*n)) {
                    let total = row.iter().fold(T::zero(), |a, &v| a + v / z);
                    o.fill(total);
                }
                out
            }
        }
    }

    /// `w_lh = low_c·w⁺ + high_c·w⁻`, each weight scaled by the bounds of the input channel it
    /// reads (a conv's input channel, a dense layer's input feature); one bound serves all channels.
    fn box_weights(&self, low: &[f64], high: &[f64]) -> Vec<T> {
        let w = &self.w[..];
        let channel: Box<dyn Fn(usize) -> usize> = match &self.kind {
            LinearKind::Conv(g) => {
                let (cg, mg, kk) = (g.cg(), g.mg(), g.kh * g.kw);
                // Weight i belongs to output channel o = i / (cg·kk) and reads input channel
                // (o / mg)·cg + (i / kk) % cg.
                Box::new(move |i| (i / (cg * kk) / mg.max(1)) * cg + (i / kk.max(1)) % cg.max(1))
            }
            &LinearKind::Dense { n, k, transposed, .. } => {
                if transposed {
                    Box::new(move |i| i % k.max(1))
                } else {
                    Box::new(move |i| i / n.max(1))
                }
            }
        };
        let at = |b: &[f64], c: usize| T::of(b[c % b.len().max(1)]);
        w.iter().enumerate().map(|(i, &v)| at(low, channel(i)) * pos(v) + at(high, channel(i)) * neg(v)).collect()
    }

    /// `x⁺·w⁺ + x⁻·w⁻` (no bias) from the forward output `y` (with the stored bias): half of
    /// `x·w + |x|·|w|`, where `x·w` is `y` less the bias. One product with `|w|` instead of the two
    /// with w⁺ and w⁻ (or the stacked one of twice the size) that inputs of both signs need
    /// otherwise. The sum cancels where the mixed-sign terms dominate, as in the γ rule's
    /// regrouping: its error is the rounding of `|x|·|w|`, not of `x⁺·w⁺ + x⁻·w⁻`.
    fn pos_part(&self, x: &[T], y: &[T]) -> Vec<T> {
        let xa = map(x, |v| v.abs());
        let mut p = self.fwd(&xa, &abs_weights(self), None);
        drop(xa);
        let half = T::of(0.5);
        update1(&mut p, y, move |av, yv| half * (av + yv));
        if let Some(b) = &self.bias {
            add_bias(&self.kind, &mut p, b, -half);
        }
        p
    }
}

/// `y += sign · b` with the bias laid out as [`LinearLayer::fwd`] applies it: a convolution's per
/// output channel (`b.len() == m`) or spatially varying per sample (canonized DenseNet layers:
/// one value per output element of a sample), a dense layer's per output feature.
fn add_bias<T: Float>(kind: &LinearKind, y: &mut [T], b: &[T], sign: T) {
    // Runs of `inner` outputs share one bias value, cycling through `b`.
    let inner = match kind {
        LinearKind::Conv(g) if b.len() == g.m => g.out_hw().map_or(0, |(oh, ow)| oh * ow),
        _ => 1,
    };
    if inner == 0 || b.is_empty() {
        return;
    }
    if inner == 1 {
        y.chunks_mut(b.len()).for_each(|c| c.iter_mut().zip(b).for_each(|(v, bv)| *v += sign * *bv));
    } else {
        for (q, run) in y.chunks_mut(inner).enumerate() {
            let bv = sign * b[q % b.len()];
            run.iter_mut().for_each(|v| *v += bv);
        }
    }
}

/// A convolution with its bias: per channel in the kernel's epilogue, spatially varying after it.
fn conv_biased<T: Float>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    match bias {
        Some(b) if b.len() != g.m => {
            let mut y = conv2d(g, x, w, None);
            add_bias(&LinearKind::Conv(*g), &mut y, b, T::one());
            y
        }
        _ => conv2d(g, x, w, bias),
    }
}

/// The [n×k] matrix `wᵀ` of a dense layer's weights (see [`LinearKind::Dense`]).
fn dense_wt<T>(w: &[T], k: usize, n: usize, transposed: bool) -> Mat<'_, T> {
    if transposed { Mat::rows(w, k) } else { Mat::rows_t(w, n) }
}

/// One half of a two-part rule: (selector, weights for x⁺, weights for x⁻, bias).
type Part<'a, T, S, B> = (S, &'a [T], &'a [T], Option<B>);

fn map<T: Float>(v: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    map1(v, f)
}

fn pos<T: Float>(v: T) -> T {
    v.max(T::zero())
}

fn neg<T: Float>(v: T) -> T {
    v.min(T::zero())
}

fn sum2<T: Float>(a: &[T], b: &[T]) -> Vec<T> {
    map2(a, b, |x, y| x + y)
}

/// `acc += scale · x ⊙ v`; the first term is written into `v`'s buffer (no zeroed accumulator).
fn add_product<T: Float>(acc: &mut Option<Vec<T>>, x: &[T], v: Vec<T>, scale: T) {
    add_product_of(acc, x, |xv| xv, v, scale)
}

/// `acc += scale · f(x) ⊙ v` (or `acc = …` when empty), `f` applied as x is read (x⁺ as a
/// tensor of its own was a pass more over layer-sized buffers).
fn add_product_of<T: Float>(acc: &mut Option<Vec<T>>, x: &[T], f: impl Fn(T) -> T + Sync, mut v: Vec<T>, scale: T) {
    match acc {
        Some(a) => update2(a, x, &v, move |a, xv, vv| a + scale * f(xv) * vv),
        None => {
            update1(&mut v, x, move |vv, xv| scale * f(xv) * vv);
            *acc = Some(v);
        }
    }
}

/// Relevance at the input of `layer` for upper relevance `r`, given its input `x` and cached
/// output `y` (bias included). `ignore_bias` removes the bias from every modified forward, as
/// zennit's `zero_params=['bias']`.
#[allow(clippy::too_many_arguments)] // the rule's full context; a struct would only rename it
pub fn relevance<T: Float>(
    layer: &LinearLayer<'_, T>,
    rule: &Rule,
    x: &[T],
    y: &[T],
    r: &[T],
    ignore_bias: bool,
    stabilizer: f64,
    bounds: Option<&Bounds>,
) -> Result<Vec<T>, String> {
    relevance_bf(layer, rule, x, Some(y), r, ignore_bias, stabilizer, bounds, 0.0)
}

/// One output plane of the γ rule (see `relevance_bf`): the forward output `y` (with its stored
/// bias), the incoming relevance `r` and `p` = x⁺·w⁺ + x⁻·w⁻.
struct GammaPlane<'a, T> {
    gamma: T,
    eps: f64,
    y: &'a [T],
    r: &'a [T],
    p: &'a [T],
}

impl<T: Float> GammaPlane<'_, T> {
    /// Writes the first `N` VJP seeds, every element (the buffers start uninitialised): `ga` for
    /// Jᵀ_w and `gb` for Jᵀ_{w⁺} (x⁺'s factor), and `gc`, the plain ratio g for Jᵀ_w (x⁻'s factor,
    /// see `relevance_bf`). Both output signs are computed and one selected (a branch per element
    /// ran scalar and took an eighth of ResNet-50's εγ□ pass). With `N` = 1 it returns whether
    /// some negative output has relevance (where ga alone is not the rule), else false.
    #[inline(always)]
    fn run<const N: usize>(
        &self,
        stored: impl Fn(usize) -> T,
        used: impl Fn(usize) -> T,
        ga: &mut [MaybeUninit<T>],
        gb: &mut [MaybeUninit<T>],
        gc: &mut [MaybeUninit<T>],
    ) -> bool {
        let gm = self.gamma;
        let eps = T::of(self.eps);
        let zero = T::zero();
        let seed = |j: usize, yv: T, rv: T, pv: T| {
            let (st, us) = (stored(j), used(j));
            let zw = yv - st;
            let zp = zw + gm * pv + us + gm * pos(us);
            let zn = zw + gm * (zw - pv) + us + gm * neg(us);
            let up = yv > zero;
            let z = if up { zp } else { zn };
            let g = rv / (z + if z >= zero { eps } else { -eps });
            // Outputs of exactly zero get no relevance.
            let g = if yv != zero { g } else { zero };
            let a = if up { g } else { (T::one() + gm) * g };
            let b = if up { gm * g } else { -gm * g };
            (a, b, g)
        };
        let inputs = self.y.iter().zip(self.r).zip(self.p);
        if N == 1 {
            let mut some = false;
            for (j, (ga, ((&yv, &rv), &pv))) in ga.iter_mut().zip(inputs).enumerate() {
                ga.write(seed(j, yv, rv, pv).0);
                some |= yv < zero && rv != zero;
            }
            return some;
        } else if N == 3 {
            let it = ga.iter_mut().zip(gb.iter_mut()).zip(gc.iter_mut()).zip(inputs);
            for (j, (((ga, gb), gc), ((&yv, &rv), &pv))) in it.enumerate() {
                let (a, b, g) = seed(j, yv, rv, pv);
                ga.write(a);
                gb.write(b);
                gc.write(g);
            }
        } else {
            for (j, ((ga, gb), ((&yv, &rv), &pv))) in ga.iter_mut().zip(gb.iter_mut()).zip(inputs).enumerate() {
                let (a, b, _) = seed(j, yv, rv, pv);
                ga.write(a);
                gb.write(b);
            }
        }
        false
    }
}

/// The input channels of a convolution's input `x` ([n, c, plane] per sample) where some value
/// is below zero, in order: x⁻ is zero on every other channel, so the rules' x⁻ terms need only
/// these (a canonized DenseNet's ThreshReLU outputs go below zero only on the channels whose
/// threshold is negative: 39 % of DenseNet-121's with the benchmark's BatchNorm statistics).
fn negative_channels<T: Float>(x: &[T], c: usize, plane: usize) -> Vec<usize> {
    use rayon::prelude::*;
    let per = c * plane;
    if per == 0 {
        return Vec::new();
    }
    let n = x.len() / per;
    (0..c)
        .into_par_iter()
        .with_min_len((1 << 14) / plane.max(1) + 1)
        .filter(|&ch| (0..n).any(|s| has_negative(&x[s * per + ch * plane..s * per + (ch + 1) * plane])))
        .collect()
}

/// Whether `v` has a value below zero: a branch-free fold per block, so that the scan vectorises
/// and still stops at the first block with one.
fn has_negative<T: Float>(v: &[T]) -> bool {
    let zero = T::zero();
    v.chunks(256).any(|b| b.iter().fold(false, |a, &v| a | (v < zero)))
}

/// Whether some channel of `on` has a value below zero in `x` ([n, c, plane] per sample).
fn any_negative_on<T: Float>(x: &[T], c: usize, plane: usize, on: &[usize]) -> bool {
    use rayon::prelude::*;
    let per = c * plane;
    if per == 0 {
        return false;
    }
    let n = x.len() / per;
    (0..n * on.len()).into_par_iter().with_min_len((1 << 14) / plane.max(1) + 1).any(|q| {
        let start = (q / on.len()) * per + on[q % on.len()] * plane;
        has_negative(&x[start..start + plane])
    })
}

/// Whether the x⁻ terms should run on `n` of a layer's `c` input channels alone rather than on all
/// of them: below three quarters. The subset's weights are a copy per channel set, cached per set,
/// but the sets follow the input: EfficientNet-Lite0's expansions read the unactivated projections,
/// below zero on 80–90 % of channels in sets that differ per image, and at batch 8 (samples on
/// separate calls) the cache missed on every call, its copies 5 % of εγ□'s cycles (`perf`).
/// With that many channels the full form's extra rows cost less than the copy; a canonized
/// DenseNet's sets (the channels of negative thresholds, 20–40 %) stay the same per model.
fn subset_pays(n: usize, c: usize) -> bool {
    n > 0 && 4 * n < 3 * c
}

/// `[x⁺; x⁻_s]` per sample, x⁻ on the channels `s`: the input of a convolution with more input
/// channels that, with `[w⁺ | w⁻_s]`, computes `x⁺·w⁺ + x⁻·w⁻` at once.
fn split_signs<T: Float>(g: &ConvGeom, x: &[T], s: &[usize]) -> Vec<T> {
    let (plane, hw) = (g.c * g.h * g.w, g.h * g.w);
    // Split straight from x: separate x⁺ and x⁻ tensors were two more passes and buffers.
    let mut x2 = Vec::with_capacity(x.len() / g.c.max(1) * (g.c + s.len()));
    for xs in x.chunks(plane.max(1)) {
        x2.extend(xs.iter().map(|&v| pos(v)));
        for &ch in s {
            x2.extend(xs[ch * hw..(ch + 1) * hw].iter().map(|&v| neg(v)));
        }
    }
    x2
}

/// A modified copy of the layer's weights, made once per plan and kept in the slot `cell` picks
/// from its cache when the layer's weights are the stored ones (and the slot fits), else per call.
fn lazily<'w, T: Float>(
    layer: &'w LinearLayer<'_, T>,
    cell: impl FnOnce(&'w WeightCache<T>) -> Option<&'w std::sync::OnceLock<Vec<T>>>,
    make: impl FnOnce(&[T]) -> Vec<T>,
) -> Cow<'w, [T]> {
    match layer.cache.and_then(cell) {
        Some(c) if matches!(layer.w, Cow::Borrowed(_)) => Cow::Borrowed(&c.get_or_init(|| make(&layer.w))[..]),
        _ => Cow::Owned(make(&layer.w)),
    }
}

/// The layer's weights on the input channels `s` as `what` says (a convolution with `c` input
/// channels of `kk` taps), from the cache where the same were made before.
fn on_channels<T: Float>(
    layer: &LinearLayer<'_, T>,
    what: Selected,
    c: usize,
    kk: usize,
    s: &[usize],
) -> std::sync::Arc<Vec<T>> {
    let make = || {
        std::sync::Arc::new(match what {
            Selected::Plain => select_inputs(&layer.w, c, kk, s, |v| v),
            Selected::Neg => select_inputs(&layer.w, c, kk, s, neg),
            Selected::Pos => select_inputs(&layer.w, c, kk, s, pos),
            Selected::Stacked => stack_pos_neg_on(&layer.w, c, kk, s),
        })
    };
    let cache = match layer.cache {
        Some(cache) if matches!(layer.w, Cow::Borrowed(_)) => cache,
        _ => return make(),
    };
    // A poisoned lock held only finished entries.
    let mut list = cache.on_channels.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, w)) = list.iter().find(|(k, ch, _)| *k == what && ch == s) {
        return w.clone();
    }
    let w = make();
    if list.len() >= 4 {
        list.remove(0);
    }
    list.push((what, s.to_vec(), w.clone()));
    w
}

/// `[w⁺ | w⁻]` of a convolution.
fn stacked_weights<'w, T: Float>(layer: &'w LinearLayer<'_, T>, g: &ConvGeom) -> Cow<'w, [T]> {
    let row = g.c * g.kh * g.kw;
    lazily(layer, |c| Some(&c.stacked), |w| stack_pos_neg(w, row))
}

/// `|w|`.
fn abs_weights<'w, T: Float>(layer: &'w LinearLayer<'_, T>) -> Cow<'w, [T]> {
    lazily(layer, |c| Some(&c.abs), |w| map(w, |v| v.abs()))
}

/// `w + γ·w⁺`, the γ rule's weights for positive outputs (cached for the γ of the plan's rule).
fn gamma_weights<'w, T: Float>(layer: &'w LinearLayer<'_, T>, gamma: f64) -> Cow<'w, [T]> {
    let gm = T::of(gamma);
    lazily(layer, |c| (c.gamma == Some(gamma)).then_some(&c.gamma_weights), |w| map(w, move |v| v + gm * pos(v)))
}

/// Whether some output below zero has relevance (else the γ rule's seeds for negative outputs
/// vanish).
fn negatives_carry_some<T: Float>(y: &[T], r: &[T]) -> bool {
    let z = T::zero();
    y.iter().zip(r).fold(false, |n, (&yv, &rv)| n | (yv < z && rv != z))
}

/// Whether a plain convolution's output is larger than its input, where the stacked form of a
/// two-sign rule pays (it saves passes over the output and adds passes over the input; DenseNet's
/// 1×1 convolutions, inputs four times their outputs, were 8 % slower with it).
fn stacking_pays(g: &ConvGeom) -> bool {
    g.group == 1 && g.out_hw().is_some_and(|(oh, ow)| g.m * oh * ow > g.c * g.h * g.w)
}

/// The z⁺ rule's relevance at a plain convolution's input whose values have both signs:
/// `x⁺ ⊙ Jᵀ_{w⁺} g + x⁻ ⊙ Jᵀ_{w⁻} g` with `g = r / (x⁺·w⁺ + x⁻·w⁻ + b⁺)`, computed as a
/// convolution with more input channels (`[x⁺; x⁻]`, `[w⁺ | w⁻]`): one forward and one VJP.
/// `p`, when given, is `x⁺·w⁺ + x⁻·w⁻` made from the forward output (see `pos_part`), and the
/// stacked forward is skipped. With `neg_on`, the input channels that have negative values where
/// not all do, the x⁻ half holds those channels alone.
#[allow(clippy::too_many_arguments)] // the rule's full context; a struct would only rename it
fn stacked_zplus<T: Float>(
    layer: &LinearLayer<'_, T>,
    g: &ConvGeom,
    x: &[T],
    r: &[T],
    bias: Option<&[T]>,
    stabilizer: f64,
    p: Option<Vec<T>>,
    neg_on: Option<&[usize]>,
) -> Vec<T> {
    let all: Vec<usize>;
    let s = match neg_on {
        Some(s) => s,
        None => {
            all = (0..g.c).collect();
            &all
        }
    };
    let ns = s.len();
    let g2 = ConvGeom { c: g.c + ns, ..*g };
    let sel;
    let w2 = match neg_on {
        Some(s) => {
            sel = on_channels(layer, Selected::Stacked, g.c, g.kh * g.kw, s);
            Cow::Borrowed(&sel[..])
        }
        None => stacked_weights(layer, g),
    };
    let w2 = &w2[..];
    let plane = g.h * g.w;
    let mut z = match p {
        Some(mut p) => {
            if let Some(b) = bias {
                add_bias(&layer.kind, &mut p, b, T::one());
            }
            p
        }
        // The stacked geometry has the same outputs, so the bias applies as to the plain one.
        None => conv_biased(&g2, &split_signs(g, x, s), w2, bias),
    };
    update1(&mut z, r, move |zv, rv| rv / stabilize(zv, stabilizer));
    let d = conv2d_vjp(&g2, &z, w2);
    // d holds [Jᵀ_{w⁺} g; Jᵀ_{w⁻} g] per sample: x⁺ times the first half plus x⁻ times the second.
    let mut out = Vec::with_capacity(x.len());
    for (dsm, xs) in d.chunks(((g.c + ns) * plane).max(1)).zip(x.chunks((g.c * plane).max(1))) {
        let (dp, dn) = dsm.split_at(g.c * plane);
        if neg_on.is_none() {
            out.extend(dp.iter().zip(dn).zip(xs).map(|((a, b), &xv)| *a * pos(xv) + *b * neg(xv)));
        } else {
            let at = out.len();
            out.extend(dp.iter().zip(xs).map(|(a, &xv)| *a * pos(xv)));
            for (j, &ch) in s.iter().enumerate() {
                let o = &mut out[at + ch * plane..at + (ch + 1) * plane];
                let (dr, xr) = (&dn[j * plane..(j + 1) * plane], &xs[ch * plane..(ch + 1) * plane]);
                o.iter_mut().zip(dr).zip(xr).for_each(|((o, &b), &xv)| *o += b * neg(xv));
            }
        }
    }
    out
}

/// `out += scale · x⁻ ⊙ Jᵀ_w seed` for a plain convolution whose input `x` is below zero only on
/// the input channels `s`: the VJP runs on those channels alone (`ws`, the weights w on them), x⁻
/// being zero on the others.
fn add_neg_product<T: Float>(g: &ConvGeom, out: &mut [T], x: &[T], seed: &[T], ws: &[T], s: &[usize], scale: T) {
    use rayon::prelude::*;
    let d = conv2d_vjp(&ConvGeom { c: s.len(), ..*g }, seed, ws);
    let (plane, ns, at) = (g.h * g.w, s.len(), index_in(g.c, s));
    out.par_chunks_mut(plane.max(1))
        .zip(x.par_chunks(plane.max(1)))
        .with_min_len((1 << 12) / plane.max(1) + 1)
        .enumerate()
        .for_each(|(q, (o, xs))| {
            let (smp, j) = (q / g.c.max(1), at[q % g.c.max(1)]);
            if j != usize::MAX {
                let dr = &d[(smp * ns + j) * plane..(smp * ns + j + 1) * plane];
                o.iter_mut().zip(xs).zip(dr).for_each(|((o, &xv), &dv)| *o += scale * neg(xv) * dv);
            }
        });
}

/// The γ rule's relevance from x⁺'s factor `f` (F⁺, in its own buffer) and the plain ratio `gc`:
/// `|x| ⊙ F⁺ + k·x⁻ ⊙ Jᵀ_w gc` (see `relevance_bf`), the second VJP on the channels `neg_on` alone
/// where only those have negative values.
fn with_neg_part<T: Float>(
    layer: &LinearLayer<'_, T>,
    mut f: Vec<T>,
    x: &[T],
    gc: &[T],
    neg_on: Option<&[usize]>,
    k: T,
) -> Vec<T> {
    match (neg_on, &layer.kind) {
        (Some(s), LinearKind::Conv(g)) => {
            update1(&mut f, x, |fv, xv| xv.abs() * fv);
            let ws = on_channels(layer, Selected::Plain, g.c, g.kh * g.kw, s);
            add_neg_product(g, &mut f, x, gc, &ws, s, k);
        }
        _ => {
            let plain = layer.vjp(gc, &layer.w);
            update2(&mut f, x, &plain, move |fv, xv, pv| xv.abs() * fv + k * neg(xv) * pv);
        }
    }
    f
}

/// The z^B rule's shift per sample, `b + 1·w_lh` (the stored bias and the bounds' forward of
/// ones, see `relevance_bf`): the same for every sample, and for every input of one size, so made
/// once per plan where the layer has a cache (it was a forward of the first layer per call, and
/// per sample: ResNet-50's 7×7 stem).
fn box_shift<T: Float>(layer: &LinearLayer<'_, T>, wlh: &[T], bd: &Bounds) -> std::sync::Arc<Vec<T>> {
    // The layer on one sample (row), with its input's size as the key.
    let (kind, dims) = match &layer.kind {
        LinearKind::Conv(g) => (LinearKind::Conv(ConvGeom { n: 1, ..*g }), [g.h, g.w]),
        &LinearKind::Dense { k, n, transposed, .. } => (LinearKind::Dense { m: 1, k, n, transposed }, [k, 0]),
    };
    let make = || {
        let one = LinearLayer { kind: kind.clone(), w: Cow::Borrowed(&layer.w[..]), bias: None, cache: None };
        let ins = match &kind {
            LinearKind::Conv(g) => g.c * g.h * g.w,
            LinearKind::Dense { k, .. } => *k,
        };
        std::sync::Arc::new(one.fwd(&vec![T::one(); ins], wlh, layer.bias.as_deref()))
    };
    let cache = match layer.cache {
        Some(cache)
            if matches!(layer.w, Cow::Borrowed(_))
                && layer.bias.as_ref().is_none_or(|b| matches!(b, Cow::Borrowed(_))) =>
        {
            cache
        }
        _ => return make(),
    };
    let mut slot = cache.box_shift.lock().unwrap_or_else(|e| e.into_inner());
    match &*slot {
        Some((d, lo, hi, v)) if *d == dims && *lo == bd.low && *hi == bd.high => v.clone(),
        _ => {
            let v = make();
            *slot = Some((dims, bd.low.clone(), bd.high.clone(), v.clone()));
            v
        }
    }
}

/// z^B's ratio `r / (y − shift)`, stabilised, with the per-sample `shift` repeated over the samples.
fn box_ratio<T: Float>(y: &[T], r: &[T], shift: &[T], eps: f64) -> Vec<T> {
    use rayon::prelude::*;
    const PART: usize = 1 << 14;
    let per = shift.len().max(1);
    let mut z: Vec<T> = Vec::with_capacity(y.len());
    // Sample by sample, so that the loop zips straight slices and vectorises (an index into the
    // shift that wraps at the sample's end kept it scalar: a division per element).
    for ((zs, ys), rs) in z.spare_capacity_mut()[..y.len()].chunks_mut(per).zip(y.chunks(per)).zip(r.chunks(per)) {
        zs.par_chunks_mut(PART).zip(ys.par_chunks(PART)).zip(rs.par_chunks(PART)).zip(shift.par_chunks(PART)).for_each(
            |(((zp, yp), rp), sp)| {
                for (((o, &yv), &rv), &sv) in zp.iter_mut().zip(yp).zip(rp).zip(sp) {
                    o.write(rv / stabilize(yv - sv, eps));
                }
            },
        );
    }
    // SAFETY: the samples' parts cover all y.len() elements, each written above.
    unsafe { z.set_len(y.len()) };
    z
}

/// [`relevance`] with Arras et al.'s bias factor for the ε rule on dense layers: a share
/// `bias_factor · (b_k + ε·sign z_k) / K` of each output's relevance goes to each of its K inputs.
#[allow(clippy::too_many_arguments)]
pub fn relevance_bf<T: Float>(
    layer: &LinearLayer<'_, T>,
    rule: &Rule,
    x: &[T],
    y: Option<&[T]>,
    r: &[T],
    ignore_bias: bool,
    stabilizer: f64,
    bounds: Option<&Bounds>,
    bias_factor: f64,
) -> Result<Vec<T>, String> {
    let w = &layer.w[..];
    let b = if ignore_bias { None } else { layer.bias.as_deref() };
    // The forward output, for the rules that read it (see Rule::reads_output); z⁺ and αβ use it
    // where it was kept.
    let y_kept = y;
    let y = || y.ok_or_else(|| format!("rule {rule} needs the layer's forward output, which was not kept"));
    let div = |z: &[T], eps: f64| -> Vec<T> { map2(z, r, move |zv, rv| rv / stabilize(zv, eps)) };
    // Generic in `f`, not a function pointer: an indirect call per element kept the map scalar
    // (two of them were a fifth of z⁺'s time on DenseNet-121's 14×14 layers).
    fn bias_map<T: Float>(b: Option<&[T]>, f: impl Fn(T) -> T + Sync) -> Option<Vec<T>> {
        b.map(|b| map(b, f))
    }
    // Most layers follow a ReLU: their input has no negative part, and the rules' x⁻ terms vanish.
    // On a plain convolution, the channels with negative values, where not all of them (`neg_on`):
    // the x⁻ terms' VJPs then run on those channels alone. Only the sign-split rules read either
    // (the scan is a pass over the input, which ε, z^B, flat and w² never needed).
    let signs_matter = matches!(rule, Rule::ZPlus | Rule::AlphaBeta { .. } | Rule::Gamma(_));
    let (has_neg, neg_on) = match &layer.kind {
        _ if !signs_matter => (false, None),
        LinearKind::Conv(g) if g.group == 1 => {
            // The graph's set of channels that may be negative where it has one (a threshold
            // ReLU's channels with a negative threshold; the others are non-negative by
            // construction, and x⁻ is zero on those of the set without negative values here, so
            // the terms are the same): only those are scanned, and only for one negative value
            // (the full scan was a tenth of z⁺'s time on DenseNet-121's 14×14 layers).
            let s = match layer.cache.and_then(|c| c.signed.as_ref()) {
                Some(sup) if any_negative_on(x, g.c, g.h * g.w, sup) => sup.clone(),
                Some(_) => Vec::new(),
                None => negative_channels(x, g.c, g.h * g.w),
            };
            (!s.is_empty(), subset_pays(s.len(), g.c).then_some(s))
        }
        _ => {
            use rayon::prelude::*;
            (x.par_chunks(1 << 14).any(has_negative), None)
        }
    };
    let neg_on = neg_on.as_deref();
    // x⁺ and x⁻ as tensors, made only by the paths that need them (the stacked forms split x as
    // they read it).
    let xp_cell = std::cell::OnceCell::new();
    let xp = || -> &[T] { xp_cell.get_or_init(|| if has_neg { Cow::Owned(map(x, pos)) } else { Cow::Borrowed(x) }) };
    let xn_cell = std::cell::OnceCell::new();
    let xn = || -> Option<&[T]> { xn_cell.get_or_init(|| has_neg.then(|| map(x, neg))).as_deref() };
    // z⁺ and γ on 1×1 convolutions over large planes: fused per tile of pixels.
    if let (Rule::ZPlus | Rule::Gamma(_), LinearKind::Conv(g)) = (rule, &layer.kind)
        && pointwise::pays(g)
    {
        let gamma = matches!(rule, Rule::Gamma(_));
        // With inputs of both signs, the forward comes from the output where it is at hand (γ
        // always reads it) and z⁺'s VJP takes the stacked weights.
        let wp = layer.modified(WeightMod::Pos);
        let sel =
            neg_on.map(|s| on_channels(layer, if gamma { Selected::Plain } else { Selected::Stacked }, g.c, 1, s));
        let w2 = (has_neg && !gamma).then(|| match &sel {
            Some(sel) => Cow::Borrowed(&sel[..]),
            None => stacked_weights(layer, g),
        });
        let wa = (has_neg && (gamma || y_kept.is_some())).then(|| abs_weights(layer));
        let wneg = sel.as_deref().filter(|_| gamma);
        let pl = pointwise::Layer {
            c: g.c,
            m: g.m,
            hw: g.h * g.w,
            n: g.n,
            w,
            wp: &wp,
            stacked: w2.as_deref(),
            abs: wa.as_deref(),
            neg: neg_on,
            wneg: wneg.map(|v| &v[..]),
        };
        let used = pointwise::Bias::of(b, g.m, pl.hw);
        let stored = pointwise::Bias::of(layer.bias.as_deref(), g.m, pl.hw);
        return Ok(match rule {
            Rule::Gamma(gamma) => {
                let wg = gamma_weights(layer, *gamma);
                pointwise::gamma(&pl, pl.tile(), x, y()?, r, stored, used, T::of(*gamma), stabilizer, Some(&wg))
            }
            _ => pointwise::zplus(&pl, pl.tile(), x, y_kept, r, stored, used, stabilizer),
        });
    }
    let mut out: Option<Vec<T>> = None;
    match rule {
        Rule::Epsilon(_) | Rule::Zero => {
            // ε reuses the cached forward output unless the bias must be left out.
            let z_own;
            let z = if ignore_bias && layer.bias.is_some() {
                z_own = layer.fwd(x, w, None);
                &z_own[..]
            } else {
                y()?
            };
            let g: Vec<T> = match rule {
                Rule::Epsilon(eps) => div(z, *eps),
                _ => z.iter().zip(r).map(|(&zv, &rv)| if zv == T::zero() { T::zero() } else { rv / zv }).collect(),
            };
            add_product(&mut out, x, layer.vjp(&g, w), T::one());
            if let (Rule::Epsilon(eps), true, LinearKind::Dense { m, k, n, .. }, Some(out)) =
                (rule, bias_factor != 0.0, &layer.kind, out.as_mut())
            {
                let (m, k, n) = (*m, *k, *n);
                for row in 0..m {
                    let mut share = T::zero();
                    for col in 0..n {
                        let zv = z[row * n + col];
                        let bv = b.map(|b| b[col]).unwrap_or(T::zero());
                        let s = if zv >= T::zero() { T::of(*eps) } else { -T::of(*eps) };
                        share += (bv + s) * g[row * n + col];
                    }
                    let add = T::of(bias_factor) * share / T::of(k as f64);
                    out[row * k..(row + 1) * k].iter_mut().for_each(|o| *o += add);
                }
            }
        }
        Rule::ZPlus | Rule::AlphaBeta { .. } => {
            let (alpha, beta) = match rule {
                Rule::AlphaBeta { alpha, beta } => (*alpha, *beta),
                _ => (1.0, 0.0),
            };
            let wp = layer.modified(WeightMod::Pos);
            // w⁻ serves the negative part, and the positive part's x⁻ terms unless they run in
            // the stacked form below or on a subset of channels (their own weights) after a
            // forward made from the output (made per call, it was EfficientNet-Lite0's head's
            // largest cost after its products).
            let stacked = has_neg && matches!(&layer.kind, LinearKind::Conv(g) if stacking_pays(g));
            let wn = if beta != 0.0 || (has_neg && !stacked && (neg_on.is_none() || y_kept.is_none())) {
                layer.modified(WeightMod::Neg)
            } else {
                Vec::new().into()
            };
            // Positive part: x⁺w⁺ + x⁻w⁻ (+ b⁺); negative part: x⁺w⁻ + x⁻w⁺ (+ b⁻). Over inputs of
            // both signs with the output kept, the positive part is one product (see pos_part)
            // and the negative part x·w less it.
            let mut from_output: [Option<Vec<T>>; 2] = [None, None];
            if let (true, Some(y)) = (has_neg, y_kept) {
                let p = layer.pos_part(x, y);
                if beta != 0.0 {
                    let mut q = map2(y, &p, |yv, pv| yv - pv);
                    if let Some(bs) = &layer.bias {
                        add_bias(&layer.kind, &mut q, bs, -T::one());
                    }
                    from_output[1] = Some(q);
                }
                from_output[0] = Some(p);
            }
            let parts: [Part<T, f64, Vec<T>>; 2] = [
                (alpha, &wp, &wn, if alpha != 0.0 { bias_map(b, pos) } else { None }),
                (-beta, &wn, &wp, if beta != 0.0 { bias_map(b, neg) } else { None }),
            ];
            for (k, (scale, w_for_pos, w_for_neg, bias)) in parts.into_iter().enumerate() {
                if scale == 0.0 {
                    continue;
                }
                // The part without its bias, when made from the output above.
                let from_output = from_output[k].take();
                // A plain convolution over inputs of both signs: the positive part as one
                // convolution of [x⁺; x⁻] with [w⁺ | w⁻] and one VJP, instead of two of each and a
                // sum (EfficientNet-Lite0's expansion convolutions read the unactivated projections).
                if let (0, true, LinearKind::Conv(g)) = (k, has_neg, &layer.kind)
                    && stacking_pays(g)
                {
                    let mut r_in = stacked_zplus(layer, g, x, r, bias.as_deref(), stabilizer, from_output, neg_on);
                    let sc = T::of(scale);
                    match &mut out {
                        Some(a) => update1(a, &r_in, move |a, v| a + sc * v),
                        None => {
                            r_in.iter_mut().for_each(|v| *v = sc * *v);
                            out = Some(r_in);
                        }
                    }
                    continue;
                }
                // A depthwise convolution over a non-negative input: the ratio runs on each output
                // plane as the forward writes it, and the multiply by x⁺ on each input plane as
                // the VJP writes it, while they are in cache (two passes over memory before).
                if let (false, None, LinearKind::Conv(geom)) = (has_neg, &from_output, &layer.kind)
                    && geom.is_depthwise()
                    && bias.as_ref().is_none_or(|b| b.len() == geom.m)
                {
                    let (oh, ow) = geom.out_hw().ok_or("a convolution whose kernel does not fit its input")?;
                    let (ohw, hw) = (oh * ow, geom.h * geom.w);
                    let (osz, isz) = (geom.m * ohw, geom.c * hw);
                    let ratio = |s: usize, ch: std::ops::Range<usize>, planes: &mut [T]| {
                        let rr = &r[s * osz + ch.start * ohw..s * osz + ch.end * ohw];
                        planes.iter_mut().zip(rr).for_each(|(z, &rv)| *z = rv / stabilize(*z, stabilizer));
                    };
                    let g = conv2d_then(geom, x, w_for_pos, bias.as_deref(), &ratio);
                    let sc = T::of(scale);
                    let times_x = |s: usize, ch: std::ops::Range<usize>, planes: &mut [T]| {
                        let xs = &x[s * isz + ch.start * hw..s * isz + ch.end * hw];
                        planes.iter_mut().zip(xs).for_each(|(v, &xv)| *v = sc * pos(xv) * *v);
                    };
                    let v = conv2d_vjp_then(geom, &g, w_for_pos, &times_x);
                    match &mut out {
                        Some(a) => update1(a, &v, |a, v| a + v),
                        None => out = Some(v),
                    }
                    continue;
                }
                let z = match from_output {
                    Some(mut z) => {
                        if let Some(b) = &bias {
                            add_bias(&layer.kind, &mut z, b, T::one());
                        }
                        z
                    }
                    None => {
                        let z = layer.fwd(xp(), w_for_pos, bias.as_deref());
                        match xn() {
                            Some(xn) => sum2(&z, &layer.fwd(xn, w_for_neg, None)),
                            None => z,
                        }
                    }
                };
                // The stabilised ratio in z's own buffer (a new one cost a pass over fresh memory).
                let mut g = z;
                update1(&mut g, r, move |zv, rv| rv / stabilize(zv, stabilizer));
                add_product_of(&mut out, x, pos, layer.vjp(&g, w_for_pos), T::of(scale));
                if let (Some(s), LinearKind::Conv(geom), Some(o)) = (neg_on, &layer.kind, out.as_mut()) {
                    // w⁻ for the positive part, w⁺ for the negative one.
                    let what = if k == 0 { Selected::Neg } else { Selected::Pos };
                    let ws = on_channels(layer, what, geom.c, geom.kh * geom.kw, s);
                    add_neg_product(geom, o, x, &g, &ws, s, T::of(scale));
                } else if let Some(xn) = xn() {
                    add_product(&mut out, xn, layer.vjp(&g, w_for_neg), T::of(scale));
                }
            }
        }
        Rule::Gamma(gamma) => {
            let y = y()?;
            // Outputs with z > 0 use x⁺(w+γw⁺) + x⁻(w+γw⁻) (+ b + γb⁺), those with z < 0 the mirror
            // image. Both regroup around the cached x·w (the output less its stored bias) and one
            // modified forward A = x⁺·w⁺ + x⁻·w⁻: the first is x·w + γA, the second x·w + γ(x·w − A)
            // since the four products sum to x·w. With seeds g⁺ (z > 0) and g⁻ (z < 0), x⁺'s factor
            // (w+γw⁺)ᵀg⁺ + (w+γw⁻)ᵀg⁻ is Jᵀ_w (g⁺ + (1+γ)g⁻) + Jᵀ_{w⁺} γ(g⁺ − g⁻) as w⁻ = w − w⁺,
            // and x⁻'s factor is the same with g⁺ and g⁻ in swapped roles. The seeds of the two
            // factors sum to (2+γ)·g (g = g⁺ + g⁻), so x⁻'s factor is (2+γ)·Jᵀ_w g − x⁺'s factor,
            // and R = |x| ⊙ F⁺ + (2+γ)·x⁻ ⊙ Jᵀ_w g: two VJPs for non-negative inputs, three with x⁻
            // (instead of eight products), and one forward instead of four.
            let gm = T::of(*gamma);
            let wp = layer.modified(WeightMod::Pos);
            let p = if has_neg { layer.pos_part(x, y) } else { layer.fwd(x, &wp, None) };
            let (per, rows) = layer.out_rows();
            let inner = match &layer.kind {
                LinearKind::Conv(g) => per / g.m.max(1),
                LinearKind::Dense { .. } => 1,
            };
            let inner = inner.max(1);
            let nch = per / inner;
            // Output element j of plane q (= row · channels + channel c) has a stored bias and a
            // bias the rule uses, per channel or spatially varying (per == bias length).
            // `n` seeds: ga; ga and gb; or ga, gb and the plain ratio gc (for inputs with a
            // negative part).
            let seeds = |n: usize| {
                // Set by a plane of the one-seed pass where a negative output has relevance.
                let some = std::sync::atomic::AtomicBool::new(false);
                let len = per * rows;
                let (lb, lc) = (if n >= 2 { len } else { 0 }, if n >= 3 { len } else { 0 });
                let (mut ga, mut gb, mut gc) =
                    (Vec::with_capacity(len), Vec::with_capacity(lb), Vec::with_capacity(lc));
                let plane = |q: usize,
                             ga: &mut [MaybeUninit<T>],
                             gb: &mut [MaybeUninit<T>],
                             gc: &mut [MaybeUninit<T>]| {
                    let c = q % nch.max(1);
                    let span = q * inner..(q + 1) * inner;
                    let (yq, rq, pq) = (&y[span.clone()], &r[span.clone()], &p[span]);
                    let args = GammaPlane { gamma: gm, eps: stabilizer, y: yq, r: rq, p: pq };
                    fn bias_of<T: Float>(bias: Option<&[T]>, per: usize, c: usize, inner: usize) -> Result<T, &[T]> {
                        match bias {
                            Some(bs) if bs.len() == per => Err(&bs[c * inner..(c + 1) * inner]),
                            Some(bs) => Ok(bs[c % bs.len()]),
                            None => Ok(T::zero()),
                        }
                    }
                    // Monomorphised per bias kind, so that the common per-channel case vectorises.
                    macro_rules! go {
                        ($st:expr, $us:expr) => {
                            match n {
                                1 => args.run::<1>($st, $us, ga, gb, gc),
                                2 => args.run::<2>($st, $us, ga, gb, gc),
                                _ => args.run::<3>($st, $us, ga, gb, gc),
                            }
                        };
                    }
                    let found = match (bias_of(layer.bias.as_deref(), per, c, inner), bias_of(b, per, c, inner)) {
                        (Ok(s), Ok(u)) => go!(|_| s, |_| u),
                        (Ok(s), Err(u)) => go!(|_| s, |j| u[j]),
                        (Err(s), Ok(u)) => go!(|j| s[j], |_| u),
                        (Err(s), Err(u)) => go!(|j| s[j], |j| u[j]),
                    };
                    if found {
                        some.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                };
                let sa = &mut ga.spare_capacity_mut()[..len];
                let (sb, sc) = (&mut gb.spare_capacity_mut()[..lb], &mut gc.spare_capacity_mut()[..lc]);
                // The seeds not asked for get empty slices. Planes run in parallel when large (a
                // single thread left the other core idle).
                let par = inner >= 1 << 10 && len >= 1 << 16;
                macro_rules! planes {
                    ($chunks:ident) => {
                        match n {
                            1 => sa.$chunks(inner).enumerate().for_each(|(q, a)| plane(q, a, &mut [], &mut [])),
                            2 => sa
                                .$chunks(inner)
                                .zip(sb.$chunks(inner))
                                .enumerate()
                                .for_each(|(q, (a, b))| plane(q, a, b, &mut [])),
                            _ => sa
                                .$chunks(inner)
                                .zip(sb.$chunks(inner))
                                .zip(sc.$chunks(inner))
                                .enumerate()
                                .for_each(|(q, ((a, b), c))| plane(q, a, b, c)),
                        }
                    };
                }
                if par {
                    use rayon::prelude::*;
                    planes!(par_chunks_mut);
                } else {
                    planes!(chunks_mut);
                }
                // SAFETY: the planes cover all `len` elements (per · rows = planes · inner), and
                // `run` writes each of them (and of gb and gc where asked).
                unsafe {
                    ga.set_len(len);
                    gb.set_len(lb);
                    gc.set_len(lc);
                }
                (ga, gb, gc, some.into_inner())
            };
            // Where no output below zero carries relevance (a ReLU follows, and the layer above
            // multiplies by its input, which is zero there), g⁻ = 0: ga = g⁺ and gb = γ·ga, so
            // x⁺'s factor is one VJP, Jᵀ_{w+γw⁺} ga, and x⁻'s plain ratio is ga too. A look at
            // the first outputs settles most layers without a ReLU after them; the one-seed pass
            // checks the rest as it goes (a separate pass over y and r cost 2 % of VGG-16's εγ□).
            let head = y.len().min(1 << 10);
            let collapsed = if negatives_carry_some(&y[..head], &r[..head]) {
                None
            } else {
                let (ga, _, _, some) = seeds(1);
                (!some).then_some(ga)
            };
            let k = T::of(2.0 + *gamma);
            match (collapsed, has_neg) {
                (Some(ga), false) => {
                    add_product(&mut out, x, layer.vjp(&ga, &gamma_weights(layer, *gamma)), T::one());
                }
                (Some(ga), true) => {
                    let f = layer.vjp(&ga, &gamma_weights(layer, *gamma));
                    out = Some(with_neg_part(layer, f, x, &ga, neg_on, k));
                }
                (None, true) => {
                    let (ga, gb, gc, _) = seeds(3);
                    let f = layer.vjp_sum(&[(&ga, w), (&gb, &wp)]);
                    drop((ga, gb));
                    out = Some(with_neg_part(layer, f, x, &gc, neg_on, k));
                }
                (None, false) => {
                    let (ga, gb, _, _) = seeds(2);
                    add_product(&mut out, x, layer.vjp_sum(&[(&ga, w), (&gb, &wp)]), T::one());
                }
            }
        }
        Rule::ZBox => {
            let bd = bounds.ok_or("the zbox rule needs input bounds (--mean/--std or --low/--high)")?;
            // z = (x·w + b) − (l·w⁺ + b⁺) − (h·w⁻ + b⁻) = x·w − 1·w_lh with w_lh = l_c·w⁺ + h_c·w⁻ per
            // input channel c: the bounds are constant per channel, so the two bound forwards are
            // one forward of ones and their VJPs, l ⊙ Jᵀ_{w⁺}g + h ⊙ Jᵀ_{w⁻}g, are one, Jᵀ_{w_lh}g
            // (input channel c of a VJP reads only the weights of input channel c). The bias
            // cancels, with or without `ignore_bias`.
            let wlh = layer.box_weights(&bd.low, &bd.high);
            let z = box_ratio(y()?, r, &box_shift(layer, &wlh, bd), stabilizer);
            add_product(&mut out, x, layer.vjp(&z, w), T::one());
            let bound_part = layer.vjp(&z, &wlh);
            if let Some(o) = out.as_mut() {
                update1(o, &bound_part, |a, v| a - v);
            }
        }
        Rule::Flat => out = Some(layer.flat(r, stabilizer)),
        Rule::WSquare => {
            let wm = layer.modified(WeightMod::Square);
            // zennit: w² squares the bias unless it is ignored.
            let bias = bias_map(b, |v| v * v);
            let one = vec![T::one(); x.len()];
            let z = layer.fwd(&one, &wm, bias.as_deref());
            out = Some(layer.vjp(&div(&z, stabilizer), &wm));
        }
        other => return Err(format!("rule {other} does not apply to a linear layer")),
    }
    Ok(out.unwrap_or_else(|| vec![T::zero(); x.len()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator of values in [-1, 1).
    fn uniform(mut seed: u64) -> impl FnMut() -> f64 {
        move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    /// The rules' x⁻ terms on the channels with negative values alone: a batch whose samples have
    /// them on different channels gives each sample's relevance alone (where each sample's own
    /// channels are used), weights taken from the cache for one set of channels never serve
    /// another (calls alternate between sets on one cache), and the graph's superset of such
    /// channels gives the same relevance.
    #[test]
    fn negative_channel_subsets_match_per_sample_and_uncached_runs() {
        let close = |got: &[f64], want: &[f64], what: &str| {
            assert_eq!(got.len(), want.len(), "{what}");
            for (a, w) in got.iter().zip(want) {
                assert!((a - w).abs() <= 1e-10 * (1.0 + w.abs()), "{what}: {a} vs {w}");
            }
        };
        let mut next = uniform(5);
        let base = ConvGeom {
            n: 2,
            c: 4,
            h: 5,
            w: 6,
            m: 3,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            dilation: [1, 1],
            pads: [1; 4],
            group: 1,
        };
        // A 3×3 layer, an expansion (z⁺ stacked) and a 1×1 layer on a plane of 576 (fused tiles).
        let geoms = [
            base,
            ConvGeom { m: 40, kh: 1, kw: 1, pads: [0; 4], ..base },
            ConvGeom { h: 24, w: 24, kh: 1, kw: 1, pads: [0; 4], ..base },
        ];
        let rules = [Rule::ZPlus, Rule::Gamma(0.25), Rule::AlphaBeta { alpha: 2.0, beta: 1.0 }];
        for g in geoms {
            let (hw, kk) = (g.h * g.w, g.kh * g.kw);
            let (oh, ow) = g.out_hw().unwrap();
            let w: Vec<f64> = (0..g.m * g.c * kk).map(|_| next()).collect();
            let b: Vec<f64> = (0..g.m).map(|_| next()).collect();
            // Sample 0 negative on channel 0, sample 1 on channel 2; then both on 3 (sets under
            // the three quarters where the full form takes over, see `subset_pays`).
            let input = |neg: [&[usize]; 2], next: &mut dyn FnMut() -> f64| -> Vec<f64> {
                (0..2 * g.c * hw)
                    .map(|i| {
                        let v = next();
                        if neg[i / (g.c * hw)].contains(&(i / hw % g.c)) { v } else { v.abs() }
                    })
                    .collect()
            };
            let xs = [input([&[0], &[2]], &mut next), input([&[3], &[3]], &mut next)];
            let r: Vec<f64> = (0..2 * g.m * oh * ow).map(|_| next()).collect();
            for rule in &rules {
                let cache = WeightCache::build(rule, &w);
                let layer = |n: usize| LinearLayer {
                    kind: LinearKind::Conv(ConvGeom { n, ..g }),
                    w: Cow::Owned(w.clone()),
                    bias: Some(Cow::Owned(b.clone())),
                    cache: None,
                };
                // Borrowed weights, as the plan's constants, so that the cache is used.
                let cached = LinearLayer { w: Cow::Borrowed(&w[..]), cache: Some(&cache), ..layer(2) };
                for x in [&xs[0], &xs[1], &xs[0]] {
                    let y = cached.fwd(x, &w, Some(&b));
                    let got = relevance(&cached, rule, x, &y, &r, false, 1e-6, None).unwrap();
                    let fresh = relevance(&layer(2), rule, x, &y, &r, false, 1e-6, None).unwrap();
                    assert_eq!(got, fresh, "{rule} {g:?}: cached against fresh");
                    let (xh, yh, rh) = (x.len() / 2, y.len() / 2, r.len() / 2);
                    for smp in 0..2 {
                        let one = layer(1);
                        let xs1 = &x[smp * xh..(smp + 1) * xh];
                        let want = relevance(
                            &one,
                            rule,
                            xs1,
                            &y[smp * yh..(smp + 1) * yh],
                            &r[smp * rh..(smp + 1) * rh],
                            false,
                            1e-6,
                            None,
                        )
                        .unwrap();
                        close(&got[smp * xh..(smp + 1) * xh], &want, &format!("{rule} {g:?} sample {smp}"));
                        // With the graph's superset of channels that may be negative (which
                        // holds every channel with negative values by construction, and is
                        // trusted): the x⁻ terms run on all of its channels, {0, 2} for the first
                        // input (each sample negative on one of them), {1, 3} for the second; and
                        // on an input without negative values, none (x⁻ is zero).
                        let (ys, rs) = (&y[smp * yh..(smp + 1) * yh], &r[smp * rh..(smp + 1) * rh]);
                        let sup = if std::ptr::eq(x, &xs[1]) { vec![1, 3] } else { vec![0, 2] };
                        let signed = WeightCache::build(rule, &w).with_signed_channels(sup);
                        let wide = LinearLayer { w: Cow::Borrowed(&w[..]), cache: Some(&signed), ..layer(1) };
                        let got = relevance(&wide, rule, xs1, ys, rs, false, 1e-6, None).unwrap();
                        close(&got, &want, &format!("{rule} {g:?} superset {smp}"));
                        // z⁺ and αβ without the kept output make their own forward.
                        if !matches!(rule, Rule::Gamma(_)) {
                            let got = relevance_bf(&wide, rule, xs1, None, rs, false, 1e-6, None, 0.0).unwrap();
                            close(&got, &want, &format!("{rule} {g:?} superset, output not kept {smp}"));
                        }
                        let xa: Vec<f64> = xs1.iter().map(|v| v.abs()).collect();
                        let ya = one.fwd(&xa, &w, Some(&b));
                        let want = relevance(&one, rule, &xa, &ya, rs, false, 1e-6, None).unwrap();
                        let got = relevance(&wide, rule, &xa, &ya, rs, false, 1e-6, None).unwrap();
                        close(&got, &want, &format!("{rule} {g:?} superset, no negative values {smp}"));
                    }
                    // A batch whose negative values are all in its second sample, under the
                    // superset: the scan finds them there.
                    let xb: Vec<f64> = x.iter().enumerate().map(|(i, &v)| if i < xh { v.abs() } else { v }).collect();
                    let yb = cached.fwd(&xb, &w, Some(&b));
                    let sup = if std::ptr::eq(x, &xs[1]) { vec![1, 3] } else { vec![0, 2] };
                    let signed = WeightCache::build(rule, &w).with_signed_channels(sup);
                    let wide = LinearLayer { w: Cow::Borrowed(&w[..]), cache: Some(&signed), ..layer(2) };
                    let got = relevance(&wide, rule, &xb, &yb, &r, false, 1e-6, None).unwrap();
                    let want = relevance(&layer(2), rule, &xb, &yb, &r, false, 1e-6, None).unwrap();
                    close(&got, &want, &format!("{rule} {g:?} superset, negative values in sample 1"));
                }
            }
        }
    }

    /// z^B with its shift per sample from the plan's cache: a batch equals its samples one by
    /// one, and calls that alternate bounds and input sizes on one cache equal uncached ones.
    #[test]
    fn box_shift_from_the_cache_follows_bounds_and_sizes() {
        let mut next = uniform(9);
        let g = ConvGeom {
            n: 2,
            c: 3,
            h: 6,
            w: 5,
            m: 4,
            kh: 3,
            kw: 3,
            stride: [2, 1],
            dilation: [1, 1],
            pads: [1, 0, 1, 1],
            group: 1,
        };
        let w: Vec<f64> = (0..g.m * g.c * 9).map(|_| next()).collect();
        let b: Vec<f64> = (0..g.m).map(|_| next()).collect();
        let cache = WeightCache::build(&Rule::ZBox, &w);
        let narrow = Bounds { low: vec![-1.0, -2.0, -0.5], high: vec![1.5, 2.0, 0.5] };
        let wide = Bounds { low: vec![-3.0], high: vec![3.0] };
        // The last size has more outputs than a part of the ratio's parallel loop (16 384), not
        // a multiple of a sample's.
        for (h, wd, bd) in [(6, 5, &narrow), (6, 5, &wide), (8, 5, &narrow), (6, 5, &narrow), (96, 48, &wide)] {
            let geom = ConvGeom { h, w: wd, ..g };
            let (oh, ow) = geom.out_hw().unwrap();
            let x: Vec<f64> = (0..2 * g.c * h * wd).map(|_| next()).collect();
            let r: Vec<f64> = (0..2 * g.m * oh * ow).map(|_| next()).collect();
            fn layer<'a>(
                n: usize,
                geom: ConvGeom,
                w: &'a [f64],
                b: &'a [f64],
                cache: Option<&'a WeightCache<f64>>,
            ) -> LinearLayer<'a, f64> {
                LinearLayer {
                    kind: LinearKind::Conv(ConvGeom { n, ..geom }),
                    w: Cow::Borrowed(w),
                    bias: Some(Cow::Borrowed(b)),
                    cache,
                }
            }
            let layer = |n, cache| layer(n, geom, &w, &b, cache);
            let y = layer(2, None).fwd(&x, &w, Some(&b));
            let got = relevance(&layer(2, Some(&cache)), &Rule::ZBox, &x, &y, &r, false, 1e-6, Some(bd)).unwrap();
            let fresh = relevance(&layer(2, None), &Rule::ZBox, &x, &y, &r, false, 1e-6, Some(bd)).unwrap();
            assert_eq!(got, fresh, "h {h} bounds {bd:?}");
            let (xh, yh) = (x.len() / 2, y.len() / 2);
            for smp in 0..2 {
                let (xs, ys, rs) = (&x[smp * xh..][..xh], &y[smp * yh..][..yh], &r[smp * yh..][..yh]);
                let want = relevance(&layer(1, None), &Rule::ZBox, xs, ys, rs, false, 1e-6, Some(bd)).unwrap();
                for (a, e) in got[smp * xh..][..xh].iter().zip(&want) {
                    assert!((a - e).abs() <= 1e-12 * (1.0 + e.abs()), "h {h} sample {smp}: {a} vs {e}");
                }
            }
        }
    }

    #[test]
    fn flat_without_the_ones_layer_equals_running_it() {
        // Batched and grouped, with stride, dilation and uneven pads; and a dense layer with rows.
        let g = ConvGeom {
            n: 2,
            c: 4,
            h: 6,
            w: 7,
            m: 6,
            kh: 3,
            kw: 2,
            stride: [2, 1],
            dilation: [1, 2],
            pads: [1, 2, 0, 1],
            group: 2,
        };
        let (oh, ow) = g.out_hw().unwrap();
        let kinds = [
            (LinearKind::Conv(g), g.n * g.m * oh * ow, g.n * g.c * g.h * g.w, g.m * 2 * 6),
            (LinearKind::Dense { m: 3, k: 5, n: 4, transposed: false }, 12, 15, 20),
        ];
        for (kind, nout, nin, nw) in kinds {
            let r: Vec<f64> = (0..nout).map(|i| ((i * 7) % 11) as f64 - 5.0).collect();
            let layer = LinearLayer { kind, w: vec![0.5; nw].into(), bias: None, cache: None };
            let ones_w = vec![1.0; nw];
            let z = layer.fwd(&vec![1.0; nin], &ones_w, None);
            let want = layer.vjp(&map2(&z, &r, |zv, rv| rv / stabilize(zv, 1e-6)), &ones_w);
            let got = layer.flat(&r, 1e-6);
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12 * (1.0 + b.abs()), "{:?}: {a} vs {b}", layer.kind);
            }
        }
    }
}
