//! Rules on linear layers (Conv, Gemm, MatMul with constant weights): each rule is a modified
//! forward, a stabilised division, a VJP and a multiplication by the (modified) input,
//! `R_in = Σ_k x_k ⊙ Jᵀ_{w_k}(R / z)`, with zennit's modifiers and stabilisers.

use super::{Rule, stabilize};
use crate::ops::conv::{ConvGeom, conv2d, conv2d_vjp};
use crate::ops::gemm::{Mat, Threads, matmul};
use crate::tensor::Float;

/// The geometry of a linear layer.
#[derive(Clone, Debug)]
pub enum LinearKind {
    /// A (grouped) convolution; `w` is [M, C/g, kh, kw].
    Conv(ConvGeom),
    /// `y[m×n] = x[m×k] · w[k×n]`.
    Dense {
        /// Rows (samples × positions).
        m: usize,
        /// Input features.
        k: usize,
        /// Output features.
        n: usize,
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
    /// Bias per output channel (conv: M) or feature (dense: N).
    pub bias: Option<Vec<T>>,
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
    /// Forward pass with the given (possibly modified) weights and bias.
    pub fn fwd(&self, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
        match &self.kind {
            LinearKind::Conv(g) => match bias {
                Some(b) if b.len() != g.m => {
                    // A spatially varying bias (canonized DenseNet layers), added per sample.
                    let mut y = conv2d(g, x, w, None);
                    for chunk in y.chunks_mut(b.len()) {
                        chunk.iter_mut().zip(b).for_each(|(v, bv)| *v += *bv);
                    }
                    y
                }
                _ => conv2d(g, x, w, bias),
            },
            LinearKind::Dense { m, k, n } => {
                let mut y = vec![T::zero(); m * n];
                matmul(*m, *n, *k, Mat::rows(x, *k), Mat::rows(w, *n), &mut y, false, Threads::Pool);
                if let Some(b) = bias {
                    for row in y.chunks_mut(*n) {
                        row.iter_mut().zip(b).for_each(|(v, bv)| *v += *bv);
                    }
                }
                y
            }
        }
    }

    /// `Jᵀ g` with the given weights.
    pub fn vjp(&self, g: &[T], w: &[T]) -> Vec<T> {
        match &self.kind {
            LinearKind::Conv(geom) => conv2d_vjp(geom, g, w),
            LinearKind::Dense { m, k, n } => {
                let mut dx = vec![T::zero(); m * k];
                matmul(*m, *k, *n, Mat::rows(g, *n), Mat::rows_t(w, *n), &mut dx, false, Threads::Pool);
                dx
            }
        }
    }

    /// A tensor shaped like the input holding `per_channel[c]` in input channel c.
    fn fill_channels(&self, len: usize, per_channel: &[f64]) -> Vec<T> {
        let (c, block) = match &self.kind {
            LinearKind::Conv(g) => (g.c, g.h * g.w),
            LinearKind::Dense { k, .. } => (*k, 1),
        };
        (0..len).map(|i| T::of(per_channel[((i / block) % c) % per_channel.len()])).collect()
    }
}

/// One half of a two-part rule: (selector, weights for x⁺, weights for x⁻, bias).
type Part<'a, T, S, B> = (S, &'a [T], &'a [T], Option<B>);

fn map<T: Float>(v: &[T], f: impl Fn(T) -> T) -> Vec<T> {
    v.iter().map(|&a| f(a)).collect()
}

fn pos<T: Float>(v: T) -> T {
    v.max(T::zero())
}

fn neg<T: Float>(v: T) -> T {
    v.min(T::zero())
}

fn ones<T: Float>(_: T) -> T {
    T::one()
}

fn sum2<T: Float>(a: &[T], b: &[T]) -> Vec<T> {
    a.iter().zip(b).map(|(x, y)| *x + *y).collect()
}

/// `acc += scale · x ⊙ v`.
fn acc_mul<T: Float>(acc: &mut [T], x: &[T], v: &[T], scale: T) {
    acc.iter_mut().zip(x.iter().zip(v)).for_each(|(a, (xv, vv))| *a += scale * *xv * *vv);
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
    relevance_bf(layer, rule, x, y, r, ignore_bias, stabilizer, bounds, 0.0)
}

/// [`relevance`] with Arras et al.'s bias factor for the ε rule on dense layers: a share
/// `bias_factor · (b_k + ε·sign z_k) / K` of each output's relevance goes to each of its K inputs.
#[allow(clippy::too_many_arguments)]
pub fn relevance_bf<T: Float>(
    layer: &LinearLayer<'_, T>,
    rule: &Rule,
    x: &[T],
    y: &[T],
    r: &[T],
    ignore_bias: bool,
    stabilizer: f64,
    bounds: Option<&Bounds>,
    bias_factor: f64,
) -> Result<Vec<T>, String> {
    let w = &layer.w[..];
    let b = if ignore_bias { None } else { layer.bias.as_deref() };
    let div = |z: &[T], eps: f64| -> Vec<T> { z.iter().zip(r).map(|(&zv, &rv)| rv / stabilize(zv, eps)).collect() };
    let bm = |f: fn(T) -> T| b.map(|b| map(b, f));
    let mut out = vec![T::zero(); x.len()];
    match rule {
        Rule::Epsilon(_) | Rule::Zero => {
            // ε reuses the cached forward output unless the bias must be left out.
            let z_own;
            let z = if ignore_bias && layer.bias.is_some() {
                z_own = layer.fwd(x, w, None);
                &z_own[..]
            } else {
                y
            };
            let g: Vec<T> = match rule {
                Rule::Epsilon(eps) => div(z, *eps),
                _ => z.iter().zip(r).map(|(&zv, &rv)| if zv == T::zero() { T::zero() } else { rv / zv }).collect(),
            };
            acc_mul(&mut out, x, &layer.vjp(&g, w), T::one());
            if let (Rule::Epsilon(eps), true, LinearKind::Dense { m, k, n }) = (rule, bias_factor != 0.0, &layer.kind) {
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
            let (xp, xn) = (map(x, pos), map(x, neg));
            let (wp, wn) = (map(w, pos), map(w, neg));
            let has_neg = xn.iter().any(|v| *v != T::zero());
            // Positive part: x⁺w⁺ + x⁻w⁻ (+ b⁺); negative part: x⁺w⁻ + x⁻w⁺ (+ b⁻).
            let parts: [Part<T, f64, Vec<T>>; 2] = [(alpha, &wp, &wn, bm(pos)), (-beta, &wn, &wp, bm(neg))];
            for (scale, w_for_pos, w_for_neg, bias) in parts {
                if scale == 0.0 {
                    continue;
                }
                let mut z = layer.fwd(&xp, w_for_pos, bias.as_deref());
                if has_neg {
                    z = sum2(&z, &layer.fwd(&xn, w_for_neg, None));
                }
                let g = div(&z, stabilizer);
                acc_mul(&mut out, &xp, &layer.vjp(&g, w_for_pos), T::of(scale));
                if has_neg {
                    acc_mul(&mut out, &xn, &layer.vjp(&g, w_for_neg), T::of(scale));
                }
            }
        }
        Rule::Gamma(gamma) => {
            let gm = T::of(*gamma);
            let (xp, xn) = (map(x, pos), map(x, neg));
            let wgp: Vec<T> = w.iter().map(|&v| v + gm * pos(v)).collect();
            let wgn: Vec<T> = w.iter().map(|&v| v + gm * neg(v)).collect();
            let bgp = b.map(|b| b.iter().map(|&v| v + gm * pos(v)).collect::<Vec<T>>());
            let bgn = b.map(|b| b.iter().map(|&v| v + gm * neg(v)).collect::<Vec<T>>());
            let has_neg = xn.iter().any(|v| *v != T::zero());
            // Outputs with z > 0 use (x⁺, w+γw⁺) + (x⁻, w+γw⁻); those with z < 0 the mirror image.
            let parts: [Part<T, bool, &Vec<T>>; 2] =
                [(true, &wgp, &wgn, bgp.as_ref()), (false, &wgn, &wgp, bgn.as_ref())];
            for (positive, w_for_pos, w_for_neg, bias) in parts {
                let mut z = layer.fwd(&xp, w_for_pos, bias.map(|v| &v[..]));
                if has_neg {
                    z = sum2(&z, &layer.fwd(&xn, w_for_neg, None));
                }
                let g: Vec<T> = z
                    .iter()
                    .zip(r.iter().zip(y))
                    .map(|(&zv, (&rv, &yv))| {
                        let on = if positive { yv > T::zero() } else { yv < T::zero() };
                        if on { rv / stabilize(zv, stabilizer) } else { T::zero() }
                    })
                    .collect();
                acc_mul(&mut out, &xp, &layer.vjp(&g, w_for_pos), T::one());
                if has_neg {
                    acc_mul(&mut out, &xn, &layer.vjp(&g, w_for_neg), T::one());
                }
            }
        }
        Rule::ZBox => {
            let bd = bounds.ok_or("the zbox rule needs input bounds (--mean/--std or --low/--high)")?;
            let low = layer.fill_channels(x.len(), &bd.low);
            let high = layer.fill_channels(x.len(), &bd.high);
            let (wp, wn) = (map(w, pos), map(w, neg));
            let z0 = if ignore_bias && layer.bias.is_some() { layer.fwd(x, w, None) } else { y.to_vec() };
            let zl = layer.fwd(&low, &wp, bm(pos).as_deref());
            let zh = layer.fwd(&high, &wn, bm(neg).as_deref());
            let z: Vec<T> = z0.iter().zip(zl.iter().zip(&zh)).map(|(a, (l, h))| *a - *l - *h).collect();
            let g = div(&z, stabilizer);
            acc_mul(&mut out, x, &layer.vjp(&g, w), T::one());
            acc_mul(&mut out, &low, &layer.vjp(&g, &wp), -T::one());
            acc_mul(&mut out, &high, &layer.vjp(&g, &wn), -T::one());
        }
        Rule::Flat | Rule::WSquare => {
            let wm: Vec<T> = if matches!(rule, Rule::Flat) { map(w, ones) } else { map(w, |v| v * v) };
            // zennit: flat zeroes the bias; w² squares it unless it is ignored.
            let bias = if matches!(rule, Rule::Flat) { None } else { bm(|v| v * v) };
            let one = vec![T::one(); x.len()];
            let z = layer.fwd(&one, &wm, bias.as_deref());
            out = layer.vjp(&div(&z, stabilizer), &wm);
        }
        other => return Err(format!("rule {other} does not apply to a linear layer")),
    }
    Ok(out)
}
