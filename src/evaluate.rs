//! Faithfulness of explanations: region perturbation (Samek et al. 2016) with most-relevant-first
//! (MoRF) and least-relevant-first (LeRF) orders, pixel flipping (1-pixel regions), AOPC and ABPC.
//!
//! Definitions: the input is cut into a grid of `patch × patch` regions (clipped at the borders);
//! each region's score is its summed relevance over channels; regions are replaced cumulatively in
//! MoRF (descending) or LeRF (ascending) order, giving `f(x⁰), …, f(x^L)` for the target's logit.
//! AOPC = mean over k = 0..L of f(x⁰) − f(x^k); area(curve) = mean over k of f(x^k);
//! ABPC = area(LeRF) − area(MoRF). Higher is better for both.

use crate::error::{Error, Result};
use ndarray::{Array3, Axis};
use rand::{Rng, SeedableRng};

/// Scores a batch of images: the target's logit for each.
pub type ScoreFn<'a> = dyn FnMut(&[Array3<f64>]) -> Result<Vec<f64>> + 'a;

/// Which regions go first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Most relevant first.
    MoRF,
    /// Least relevant first.
    LeRF,
}

/// What a removed region is replaced by.
#[derive(Clone, Debug, PartialEq)]
pub enum Perturb {
    /// The image's per-channel mean.
    Mean,
    /// A fixed value per channel (a black pixel after normalisation).
    Black(Vec<f64>),
    /// A blurred copy of the image (box blur of the patch size).
    Blur,
    /// Uniform noise in [low, high] per channel.
    Uniform(Vec<f64>, Vec<f64>),
}

impl Perturb {
    /// Parses `mean`, `black`, `blur` or `uniform`; `low`/`high` give black and the noise range.
    pub fn parse(s: &str, low: &[f64], high: &[f64]) -> Result<Perturb> {
        match s {
            "mean" => Ok(Perturb::Mean),
            "black" => Ok(Perturb::Black(low.to_vec())),
            "blur" => Ok(Perturb::Blur),
            "uniform" => Ok(Perturb::Uniform(low.to_vec(), high.to_vec())),
            _ => Err(Error::Invalid(format!("unknown perturbation '{s}' (mean, black, blur, uniform)"))),
        }
    }
}

/// Region-perturbation settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Region side in pixels (1: pixel flipping).
    pub patch: usize,
    /// Number of regions removed (L); capped by the number of regions.
    pub steps: usize,
    /// Replacement.
    pub perturb: Perturb,
    /// Seed for uniform noise.
    pub seed: u64,
    /// Images per model call.
    pub batch: usize,
}

/// The regions of an `h × w` grid in the given order of summed relevance (ties by position).
pub fn regions(relevance: &Array3<f64>, patch: usize, order: Order) -> Vec<(usize, usize)> {
    let (_, h, w) = relevance.dim();
    let p = patch.max(1);
    let map = relevance.sum_axis(Axis(0));
    let mut r: Vec<((usize, usize), f64)> = Vec::new();
    for y in (0..h).step_by(p) {
        for x in (0..w).step_by(p) {
            let s: f64 = map.slice(ndarray::s![y..(y + p).min(h), x..(x + p).min(w)]).sum();
            r.push(((y, x), s));
        }
    }
    match order {
        Order::MoRF => r.sort_by(|a, b| b.1.total_cmp(&a.1)),
        Order::LeRF => r.sort_by(|a, b| a.1.total_cmp(&b.1)),
    }
    r.into_iter().map(|(k, _)| k).collect()
}

fn box_blur(x: &Array3<f64>, k: usize) -> Array3<f64> {
    let (c, h, w) = x.dim();
    let r = (k / 2).max(1) as isize;
    Array3::from_shape_fn((c, h, w), |(ch, y, xx)| {
        let (mut s, mut n) = (0.0, 0.0);
        for dy in -r..=r {
            for dx in -r..=r {
                let (yy, xq) = (y as isize + dy, xx as isize + dx);
                if yy >= 0 && xq >= 0 && (yy as usize) < h && (xq as usize) < w {
                    s += x[[ch, yy as usize, xq as usize]];
                    n += 1.0;
                }
            }
        }
        s / n
    })
}

/// The scores `f(x⁰), …, f(x^L)` of one image `x` [C, H, W] as its regions are removed in
/// `order`. `score` evaluates a batch of images and returns the target's score for each.
pub fn curve(
    x: &Array3<f64>,
    relevance: &Array3<f64>,
    order: Order,
    cfg: &Config,
    score: &mut ScoreFn,
) -> Result<Vec<f64>> {
    if x.dim() != relevance.dim() {
        return Err(Error::Invalid(format!("relevance {:?} and input {:?} differ in shape", relevance.dim(), x.dim())));
    }
    let (c, h, w) = x.dim();
    let p = cfg.patch.max(1);
    let order_list = regions(relevance, p, order);
    let steps = cfg.steps.min(order_list.len());
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let fill: Array3<f64> = match &cfg.perturb {
        Perturb::Mean => {
            let m: Vec<f64> = (0..c).map(|ch| x.index_axis(Axis(0), ch).mean().unwrap_or(0.0)).collect();
            Array3::from_shape_fn((c, h, w), |(ch, _, _)| m[ch])
        }
        Perturb::Black(v) => Array3::from_shape_fn((c, h, w), |(ch, _, _)| v[ch % v.len().max(1)]),
        Perturb::Blur => box_blur(x, p.max(3)),
        Perturb::Uniform(lo, hi) => Array3::from_shape_fn((c, h, w), |(ch, _, _)| {
            let (a, b) = (lo[ch % lo.len().max(1)], hi[ch % hi.len().max(1)]);
            a + (b - a) * rng.random::<f64>()
        }),
    };
    let mut cur = x.clone();
    let mut out = Vec::with_capacity(steps + 1);
    let mut pending: Vec<Array3<f64>> = vec![cur.clone()];
    for &(y0, x0) in order_list.iter().take(steps) {
        let sl = ndarray::s![.., y0..(y0 + p).min(h), x0..(x0 + p).min(w)];
        cur.slice_mut(sl).assign(&fill.slice(sl));
        pending.push(cur.clone());
        if pending.len() >= cfg.batch.max(1) {
            out.extend(score(&pending)?);
            pending.clear();
        }
    }
    if !pending.is_empty() {
        out.extend(score(&pending)?);
    }
    Ok(out)
}

/// AOPC of a MoRF curve: mean over k of f(x⁰) − f(x^k).
pub fn aopc(curve: &[f64]) -> f64 {
    let f0 = curve.first().copied().unwrap_or(0.0);
    curve.iter().map(|v| f0 - v).sum::<f64>() / curve.len().max(1) as f64
}

/// Area under a curve: the mean of its values.
pub fn area(curve: &[f64]) -> f64 {
    curve.iter().sum::<f64>() / curve.len().max(1) as f64
}

/// ABPC = area(LeRF) − area(MoRF).
pub fn abpc(morf: &[f64], lerf: &[f64]) -> f64 {
    area(lerf) - area(morf)
}

/// Mean and standard error.
pub fn mean_se(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if n == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    let var = if n > 1.0 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_sort_and_cover_the_image() {
        let r = Array3::from_shape_fn((1, 4, 6), |(_, y, x)| (y * 6 + x) as f64);
        let m = regions(&r, 2, Order::MoRF);
        assert_eq!(m.len(), 6);
        assert_eq!(m[0], (2, 4));
        assert_eq!(*regions(&r, 2, Order::LeRF).first().unwrap(), (0, 0));
    }

    #[test]
    fn aopc_and_abpc_by_hand() {
        assert_eq!(aopc(&[4.0, 2.0, 1.0, 1.0]), (0.0 + 2.0 + 3.0 + 3.0) / 4.0);
        assert_eq!(abpc(&[4.0, 2.0], &[4.0, 4.0]), 1.0);
    }
}
