//! The LRP engine against independent float64 formulas, conservation, canonization and the
//! bundled real models.

// The reference formulas are written as explicit index loops on purpose.
#![allow(clippy::needless_range_loop)]

use prost::Message;
use relprop::attribution::{Method, Settings, attribute, prepare};
use relprop::canonize::{Mode, canonize, check, value_shapes};
use relprop::composite::{Composite, Params};
use relprop::ops::conv::ConvGeom;
use relprop::rules::grad::RuleOpts;
use relprop::rules::linear::{WeightCache, relevance};
use relprop::rules::{Bounds, LinearKind, LinearLayer, Rule};
use relprop::tensor::{Const, Float, Value};
use std::path::PathBuf;

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A small deterministic generator (tests must not depend on a crate's random stream).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// The dense matrix M[j][k] (input j, output k) of a conv with weights `w`, by explicit loops.
fn conv_matrix(g: &ConvGeom, w: &[f64]) -> (Vec<Vec<f64>>, usize) {
    let (oh, ow) = g.out_hw().unwrap();
    let (cg, mg) = (g.c / g.group, g.m / g.group);
    let nin = g.c * g.h * g.w;
    let nout = g.m * oh * ow;
    let mut m = vec![vec![0.0; nout]; nin];
    for oc in 0..g.m {
        for oy in 0..oh {
            for ox in 0..ow {
                let k = (oc * oh + oy) * ow + ox;
                for cc in 0..cg {
                    let ci = (oc / mg) * cg + cc;
                    for ki in 0..g.kh {
                        for kj in 0..g.kw {
                            let iy = (oy * g.stride[0] + ki * g.dilation[0]) as isize - g.pads[0] as isize;
                            let ix = (ox * g.stride[1] + kj * g.dilation[1]) as isize - g.pads[1] as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                let j = (ci * g.h + iy as usize) * g.w + ix as usize;
                                m[j][k] += w[((oc * cg + cc) * g.kh + ki) * g.kw + kj];
                            }
                        }
                    }
                }
            }
        }
    }
    (m, nout)
}

/// Builds the layer's dense matrix with weights modified elementwise.
type MatFn<'a> = dyn Fn(&dyn Fn(f64) -> f64) -> Vec<Vec<f64>> + 'a;

fn stab(z: f64, e: f64) -> f64 {
    if z >= 0.0 { z + e } else { z - e }
}

/// The rule's formula as explicit sums over a dense matrix (one sample). `mat(f)` gives the matrix of
/// the layer with weights modified elementwise by f; `bias[k]` per output; `conn[j][k]` connectivity.
fn naive(rule: &Rule, x: &[f64], mat: &MatFn, bias: &[f64], r: &[f64], bounds: (&[f64], &[f64])) -> Vec<f64> {
    let nin = x.len();
    let nout = r.len();
    let w = mat(&|v| v);
    let wp = mat(&|v| v.max(0.0));
    let wn = mat(&|v| v.min(0.0));
    let conn = mat(&|_| 1.0);
    let pos = |v: f64| v.max(0.0);
    let neg = |v: f64| v.min(0.0);
    // contribution c[j][k] and denominator d[k]; R_j = Σ_k c[j][k] R_k / d[k]
    let mut out = vec![0.0; nin];
    let mut apply =
        |c: &dyn Fn(usize, usize) -> f64, d: &dyn Fn(usize) -> f64, scale: f64, active: &dyn Fn(usize) -> bool| {
            for k in 0..nout {
                if !active(k) {
                    continue;
                }
                let den = d(k);
                for (j, o) in out.iter_mut().enumerate() {
                    *o += scale * c(j, k) * r[k] / den;
                }
            }
        };
    let sum_over = |c: &dyn Fn(usize, usize) -> f64, k: usize| (0..nin).map(|j| c(j, k)).sum::<f64>();
    let z: Vec<f64> = (0..nout).map(|k| (0..nin).map(|j| x[j] * w[j][k]).sum::<f64>() + bias[k]).collect();
    match rule {
        Rule::Epsilon(e) => {
            let c = |j: usize, k: usize| x[j] * w[j][k];
            apply(&c, &|k| stab(z[k], *e), 1.0, &|_| true);
        }
        Rule::ZPlus | Rule::AlphaBeta { .. } => {
            let (a, b) = if let Rule::AlphaBeta { alpha, beta } = rule { (*alpha, *beta) } else { (1.0, 0.0) };
            let cp = |j: usize, k: usize| pos(x[j]) * wp[j][k] + neg(x[j]) * wn[j][k];
            let cn = |j: usize, k: usize| pos(x[j]) * wn[j][k] + neg(x[j]) * wp[j][k];
            apply(&cp, &|k| stab(sum_over(&cp, k) + pos(bias[k]), 1e-6), a, &|_| true);
            if b != 0.0 {
                apply(&cn, &|k| stab(sum_over(&cn, k) + neg(bias[k]), 1e-6), -b, &|_| true);
            }
        }
        Rule::Gamma(g) => {
            let wgp = |j: usize, k: usize| w[j][k] + g * wp[j][k];
            let wgn = |j: usize, k: usize| w[j][k] + g * wn[j][k];
            let cpos = |j: usize, k: usize| pos(x[j]) * wgp(j, k) + neg(x[j]) * wgn(j, k);
            let cneg = |j: usize, k: usize| pos(x[j]) * wgn(j, k) + neg(x[j]) * wgp(j, k);
            apply(&cpos, &|k| stab(sum_over(&cpos, k) + bias[k] + g * pos(bias[k]), 1e-6), 1.0, &|k| z[k] > 0.0);
            apply(&cneg, &|k| stab(sum_over(&cneg, k) + bias[k] + g * neg(bias[k]), 1e-6), 1.0, &|k| z[k] < 0.0);
        }
        Rule::ZBox => {
            let (l, h) = bounds;
            let c = |j: usize, k: usize| x[j] * w[j][k] - l[j] * wp[j][k] - h[j] * wn[j][k];
            apply(&c, &|k| stab(sum_over(&c, k), 1e-6), 1.0, &|_| true);
        }
        Rule::Flat => {
            let c = |j: usize, k: usize| conn[j][k];
            apply(&c, &|k| stab(sum_over(&c, k), 1e-6), 1.0, &|_| true);
        }
        Rule::WSquare => {
            let c = |j: usize, k: usize| w[j][k] * w[j][k];
            apply(&c, &|k| stab(sum_over(&c, k) + bias[k] * bias[k], 1e-6), 1.0, &|_| true);
        }
        _ => unreachable!(),
    }
    out
}

#[test]
fn every_rule_equals_its_float64_formula_on_random_layers() {
    let rules = [
        Rule::Epsilon(1e-6),
        Rule::Epsilon(0.1),
        Rule::ZPlus,
        Rule::AlphaBeta { alpha: 2.0, beta: 1.0 },
        Rule::AlphaBeta { alpha: 1.5, beta: 0.5 },
        Rule::Gamma(0.25),
        Rule::Gamma(1.0),
        Rule::ZBox,
        Rule::Flat,
        Rule::WSquare,
    ];
    let base = ConvGeom {
        n: 1,
        c: 2,
        h: 5,
        w: 6,
        m: 3,
        kh: 3,
        kw: 3,
        stride: [2, 1],
        dilation: [1, 1],
        pads: [1, 0, 1, 2],
        group: 1,
    };
    let geoms = [
        base,
        ConvGeom { c: 4, m: 4, group: 4, stride: [1, 2], dilation: [1, 2], pads: [0, 2, 1, 1], ..base },
        // Groups with several input and output channels each.
        ConvGeom { c: 4, m: 6, group: 2, ..base },
        // An output larger than its input (an expansion): z⁺ over mixed signs runs stacked.
        ConvGeom { c: 3, m: 8, kh: 1, kw: 1, stride: [1, 1], pads: [0; 4], ..base },
        // Three input channels, for inputs negative on two of them (see `xsome` below).
        ConvGeom { c: 3, m: 4, ..base },
        // A 1×1 layer on a plane of 528 pixels: z⁺ and γ run fused over tiles of pixels.
        ConvGeom { m: 3, h: 24, w: 22, kh: 1, kw: 1, stride: [1, 1], pads: [0; 4], ..base },
        // 1 600 outputs, more than γ's first look covers (see the mixed relevance below); γ only,
        // as the naive sums on it take seconds.
        ConvGeom { m: 4, h: 20, w: 20, stride: [1, 1], pads: [1; 4], ..base },
    ];
    let gamma_only = |g: &ConvGeom| g.kh > 1 && g.h * g.w * g.m > 1024;
    let mut rng = Lcg(7);
    for trial in 0..3 {
        // Dense layers (input mixed-sign, like a first layer or after a non-ReLU activation).
        let (k, n) = (5, 4);
        let x = rng.vec(k);
        let w = rng.vec(k * n);
        let b = rng.vec(n);
        let r = rng.vec(n);
        let low: Vec<f64> = (0..k).map(|_| -1.5).collect();
        let high: Vec<f64> = (0..k).map(|_| 1.5).collect();
        let layer = LinearLayer {
            kind: LinearKind::Dense { m: 1, k, n, transposed: false },
            w: w.clone().into(),
            bias: Some(b.clone().into()),
            cache: None,
        };
        let mat = |f: &dyn Fn(f64) -> f64| (0..k).map(|j| (0..n).map(|kk| f(w[j * n + kk])).collect()).collect();
        let y = layer.fwd(&x, &w, Some(&b));
        let xabs: Vec<f64> = x.iter().map(|v| v.abs()).collect();
        let yabs = layer.fwd(&xabs, &w, Some(&b));
        for rule in &rules {
            let bounds = Bounds { low: vec![-1.5], high: vec![1.5] };
            let got = relevance(&layer, rule, &x, &y, &r, false, 1e-6, Some(&bounds)).unwrap();
            let want = naive(rule, &x, &mat, &b, &r, (&low, &high));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-10 * (1.0 + w.abs()), "dense {rule} trial {trial}: {g} vs {w}");
            }
            let r_relu: Vec<f64> = r.iter().zip(&y).map(|(&rv, &yv)| if yv < 0.0 { 0.0 } else { rv }).collect();
            let got = relevance(&layer, rule, &x, &y, &r_relu, false, 1e-6, Some(&bounds)).unwrap();
            let want_relu = naive(rule, &x, &mat, &b, &r_relu, (&low, &high));
            for (g, w) in got.iter().zip(&want_relu) {
                assert!((g - w).abs() <= 1e-10 * (1.0 + w.abs()), "dense {rule} ReLU trial {trial}: {g} vs {w}");
            }
            // The same layer with its weights stored [n×k] (Gemm transB) gives the same relevance.
            let wt: Vec<f64> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let lt = LinearLayer {
                kind: LinearKind::Dense { m: 1, k, n, transposed: true },
                w: wt.into(),
                bias: Some(b.clone().into()),
                cache: None,
            };
            let gt = relevance(&lt, rule, &x, &y, &r, false, 1e-6, Some(&bounds)).unwrap();
            for (g, w) in gt.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-10 * (1.0 + w.abs()), "dense transposed {rule}: {g} vs {w}");
            }
            let cache = WeightCache::build(rule, &w);
            let cached = LinearLayer { cache: Some(&cache), ..layer.clone() };
            let got = relevance(&cached, rule, &xabs, &yabs, &r, false, 1e-6, Some(&bounds)).unwrap();
            let want = naive(rule, &xabs, &mat, &b, &r, (&low, &high));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-10 * (1.0 + w.abs()), "dense {rule} x ≥ 0 trial {trial}: {g} vs {w}");
            }
            // ignore_bias: the formula with b = 0 (γ is left out: its output-sign masks keep the
            // biased output, as zennit's unmodified fifth forward does).
            if !matches!(rule, Rule::Gamma(_)) {
                let got = relevance(&layer, rule, &x, &y, &r, true, 1e-6, Some(&bounds)).unwrap();
                let want = naive(rule, &x, &mat, &vec![0.0; n], &r, (&low, &high));
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-10 * (1.0 + w.abs()), "dense {rule} ignoring bias: {g} vs {w}");
                }
            }
        }
        // Convolutions, including a depthwise one with dilation and asymmetric pads.
        for geom in &geoms {
            let (oh, ow) = geom.out_hw().unwrap();
            let nin = geom.c * geom.h * geom.w;
            let x = rng.vec(nin);
            let w = rng.vec(geom.m * (geom.c / geom.group) * 9);
            let b = rng.vec(geom.m);
            let r = rng.vec(geom.m * oh * ow);
            let layer = LinearLayer {
                kind: LinearKind::Conv(*geom),
                w: w.clone().into(),
                bias: Some(b.clone().into()),
                cache: None,
            };
            let bias_k: Vec<f64> = (0..geom.m * oh * ow).map(|kk| b[kk / (oh * ow)]).collect();
            let mat = |f: &dyn Fn(f64) -> f64| {
                let wf: Vec<f64> = w.iter().map(|&v| f(v)).collect();
                conv_matrix(geom, &wf).0
            };
            // Connectivity for flat must count real connections only: f ≡ 1 gives exactly that.
            let lows = [-1.0, -2.0, -0.5, -1.2];
            let highs = [1.0, 2.5, 0.7, 1.1];
            let low: Vec<f64> = (0..nin).map(|j| lows[j / (geom.h * geom.w)]).collect();
            let high: Vec<f64> = (0..nin).map(|j| highs[j / (geom.h * geom.w)]).collect();
            let bounds = Bounds { low: lows[..geom.c].to_vec(), high: highs[..geom.c].to_vec() };
            // Mixed-sign inputs, non-negative ones (as after a ReLU, where the rules skip the x⁻
            // terms and γ regroups its forwards), and negative values on the even channels only
            // (as a canonized DenseNet's threshold ReLUs give: the x⁻ terms run on the channels
            // with negative values alone), with and without the per-plan weight cache.
            let xabs: Vec<f64> = x.iter().map(|v| v.abs()).collect();
            let plane = geom.h * geom.w;
            let xsome: Vec<f64> =
                x.iter().enumerate().map(|(j, &v)| if (j / plane).is_multiple_of(2) { v } else { v.abs() }).collect();
            assert!(xsome[..plane].iter().any(|&v| v < 0.0));
            for x in [&x, &xabs, &xsome] {
                let y = layer.fwd(x, &w, Some(&b));
                for rule in rules.iter().filter(|r| !gamma_only(geom) || matches!(r, Rule::Gamma(_))) {
                    let want = naive(rule, x, &mat, &bias_k, &r, (&low, &high));
                    let cache = WeightCache::build(rule, &w);
                    let cached = LinearLayer { cache: Some(&cache), ..layer.clone() };
                    for l in [&layer, &cached] {
                        let got = relevance(l, rule, x, &y, &r, false, 1e-6, Some(&bounds)).unwrap();
                        for (g, w) in got.iter().zip(&want) {
                            assert!((g - w).abs() <= 1e-10 * (1.0 + w.abs()), "conv {geom:?} {rule}: {g} vs {w}");
                        }
                    }
                    // For γ: no relevance at negative outputs, as under a ReLU (it then runs one
                    // seed), and none there only in the first 1 200 outputs (its first look
                    // passes, its one-seed pass finds the rest and falls back).
                    let r_relu: Vec<f64> = r.iter().zip(&y).map(|(&rv, &yv)| if yv < 0.0 { 0.0 } else { rv }).collect();
                    let r_mixed: Vec<f64> = (0..r.len()).map(|i| if i < 1200 { r_relu[i] } else { r[i] }).collect();
                    let masked = if matches!(rule, Rule::Gamma(_)) {
                        &[(&r_relu, "ReLU"), (&r_mixed, "mixed")][..]
                    } else {
                        &[]
                    };
                    for &(rr, what) in masked {
                        let want = naive(rule, x, &mat, &bias_k, rr, (&low, &high));
                        for l in [&layer, &cached] {
                            let got = relevance(l, rule, x, &y, rr, false, 1e-6, Some(&bounds)).unwrap();
                            for (g, w) in got.iter().zip(&want) {
                                assert!(
                                    (g - w).abs() <= 1e-10 * (1.0 + w.abs()),
                                    "conv {geom:?} {rule} {what}: {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A bias-free ReLU network: Conv → ReLU → MaxPool → Conv(stride 2) → ReLU → Flatten → Gemm.
/// The sign-split rules (z⁺, αβ, γ) over inputs of both signs, in f32, against the float64 formula
/// on layers of realistic depth, one output channel with all-negative weights (its z⁺ is made of
/// the few x⁻ terms only): a guard for regroupings of the sign-split sums that cancel in f32, as
/// x⁺·w⁺ + x⁻·w⁻ = (x·w + |x|·|w|) / 2, which the rules use where the output is at hand (its error
/// here was 1e-6 of the largest value; a 1e-4 change of the ½ fails this test).
#[test]
fn sign_split_rules_in_f32_stay_at_the_float64_formula() {
    let mut rng = Lcg(11);
    let base = ConvGeom {
        n: 1,
        c: 48,
        h: 6,
        w: 6,
        m: 12,
        kh: 3,
        kw: 3,
        stride: [1, 1],
        dilation: [1, 1],
        pads: [1, 1, 1, 1],
        group: 1,
    };
    // A 3×3 layer and a 1×1 expansion (the stacked VJP).
    for geom in [base, ConvGeom { m: 96, kh: 1, kw: 1, pads: [0; 4], ..base }] {
        let (oh, ow) = geom.out_hw().unwrap();
        let kk = geom.c * geom.kh * geom.kw;
        // Mostly positive inputs, as after a shifted activation.
        let x: Vec<f64> = rng.vec(geom.c * geom.h * geom.w).iter().map(|v| v + 0.6).collect();
        let mut w = rng.vec(geom.m * kk);
        w[..kk].iter_mut().for_each(|v| *v = -v.abs() - 0.01);
        let b: Vec<f64> = rng.vec(geom.m).iter().map(|v| 0.1 * v).collect();
        let r = rng.vec(geom.m * oh * ow);
        let bias_k: Vec<f64> = (0..geom.m * oh * ow).map(|k| b[k / (oh * ow)]).collect();
        let mat = |f: &dyn Fn(f64) -> f64| {
            let wf: Vec<f64> = w.iter().map(|&v| f(v)).collect();
            conv_matrix(&geom, &wf).0
        };
        let f32s = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let layer =
            LinearLayer { kind: LinearKind::Conv(geom), w: f32s(&w).into(), bias: Some(f32s(&b).into()), cache: None };
        let x32 = f32s(&x);
        let y = layer.fwd(&x32, &layer.w, layer.bias.as_deref());
        for rule in [Rule::ZPlus, Rule::AlphaBeta { alpha: 2.0, beta: 1.0 }, Rule::Gamma(0.25)] {
            let want = naive(&rule, &x, &mat, &bias_k, &r, (&[], &[]));
            let got = relevance(&layer, &rule, &x32, &y, &f32s(&r), false, 1e-6, None).unwrap();
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = got.iter().zip(&want).map(|(&g, w)| (g as f64 - w).abs()).fold(0f64, f64::max);
            assert!(err <= 1e-5 * scale, "{geom:?} {rule}: max error {err:.2e} of {scale:.2e}");
        }
    }
}

fn bias_free_net() -> PathBuf {
    use common::*;
    let mut rng = Lcg(3);
    let mut f = |n: usize| rng.vec(n).into_iter().map(|v| v as f32).collect::<Vec<f32>>();
    let nodes = vec![
        node("Conv", "conv1", &["x", "w1"], &["c1"], vec![ints("pads", &[1, 1, 1, 1])]),
        node("Relu", "relu1", &["c1"], &["r1"], vec![]),
        node("MaxPool", "pool", &["r1"], &["p1"], vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])]),
        node("Conv", "conv2", &["p1", "w2"], &["c2"], vec![ints("strides", &[2, 2]), ints("pads", &[1, 1, 1, 1])]),
        node("Relu", "relu2", &["c2"], &["r2"], vec![]),
        node("Flatten", "flatten", &["r2"], &["fl"], vec![]),
        node("Gemm", "fc", &["fl", "w3"], &["y"], vec![]),
    ];
    let inits =
        vec![tensor("w1", &[4, 3, 3, 3], f(108)), tensor("w2", &[5, 4, 3, 3], f(180)), tensor("w3", &[20, 3], f(60))];
    let m = model(nodes, inits, vi("x", &[2, 3, 8, 8]), vi("y", &[2, 3]));
    let path = std::env::temp_dir().join(format!("relprop-bias-free-{}.onnx", std::process::id()));
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    path
}

fn epsilon_zero() -> Method {
    Method::Lrp(Box::new(Composite::named("epsilon", &Params { epsilon: 0.0, ..Params::default() }).unwrap()))
}

fn conservation<T: Float>(
    model: &std::path::Path,
    x: Value<T>,
    mode: Mode,
    ignore_bias: bool,
    targets: Option<&[usize]>,
) -> Vec<(f64, f64)> {
    let g = relprop::onnx::load(model).unwrap();
    let s = Settings {
        method: epsilon_zero(),
        canonize: mode,
        opts: RuleOpts { ignore_bias, stabilizer: 1e-30, ..RuleOpts::default() },
        tolerance: 1e-4,
    };
    let p = prepare(&g, std::slice::from_ref(&x), &s).unwrap();
    let e = attribute(&p, &s.method, vec![x], targets, &[]).unwrap();
    let r = e.relevance[0].as_ref().unwrap();
    let n = r.shape()[0];
    let per = r.len() / n;
    let flat: Vec<f64> = r.iter().map(|v| v.f64()).collect();
    (0..n).map(|i| (flat[i * per..(i + 1) * per].iter().sum::<f64>(), e.scores[i])).collect()
}

#[test]
fn bias_free_relu_network_conserves_the_logit() {
    let model = bias_free_net();
    let mut rng = Lcg(11);
    let x64 = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3, 8, 8]), rng.vec(384)).unwrap();
    for (i, (sr, logit)) in conservation(&model, Value::F(x64.mapv(|v| v as f32)), Mode::Minimal, false, Some(&[0, 2]))
        .into_iter()
        .enumerate()
    {
        eprintln!("f32 sample {i}: ΣR = {sr:.9}, logit = {logit:.9}");
        assert!((sr - logit).abs() <= 1e-5 * logit.abs(), "f32: {sr} vs {logit}");
    }
    for (i, (sr, logit)) in
        conservation(&model, Value::F(x64), Mode::Minimal, false, Some(&[0, 2])).into_iter().enumerate()
    {
        eprintln!("f64 sample {i}: ΣR = {sr:.15}, logit = {logit:.15}");
        assert!((sr - logit).abs() <= 1e-12 * logit.abs(), "f64: {sr} vs {logit}");
    }
}

#[test]
fn densenet_full_canonization_keeps_the_function_and_conserves() {
    let model = root().join("tests/fixtures/densenet/model.onnx");
    let g = relprop::onnx::load(&model).unwrap();
    let x: Value<f64> = relprop::io::read_npy(&root().join("tests/fixtures/densenet/input_0.npy")).unwrap();
    let shapes = value_shapes(&g, std::slice::from_ref(&x)).unwrap();
    let (full, report) = canonize(&g, Mode::Full, Some(&shapes)).unwrap();
    assert!(report.iter().filter(|l| l.contains("threshold ReLU")).count() == 6, "{report:#?}");
    assert!(!full.nodes.iter().any(|n| n.op_type == "BatchNormalization"), "every BN is folded");
    let dev = check(&g, &full, std::slice::from_ref(&x)).unwrap();
    eprintln!("full canonization deviation (f64): {dev:.2e}");
    assert!(dev < 1e-12);
    // ε → 0 with biases left out of the backward pass conserves the logit exactly, through threshold
    // ReLUs, concatenations, pooling and the spatially varying biases.
    for (sr, logit) in conservation(&model, x.clone(), Mode::Full, true, None) {
        eprintln!("full, zero rule, ignore bias: ΣR = {sr:.12}, logit {logit:.12}");
        assert!((sr - logit).abs() <= 1e-9 * logit.abs());
    }
    // The default composite gives a finite explanation.
    let s = Settings {
        method: Method::Lrp(Box::new(Composite::named("epsilon_plus_flat", &Params::default()).unwrap())),
        canonize: Mode::Full,
        opts: RuleOpts::default(),
        tolerance: 1e-9,
    };
    let p = prepare(&g, std::slice::from_ref(&x), &s).unwrap();
    let e = attribute(&p, &s.method, vec![x], None, &[]).unwrap();
    assert!(e.relevance[0].as_ref().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn bn_channel_with_zero_gamma_gives_no_inf_or_nan() {
    let model = root().join("tests/fixtures/densenet/model.onnx");
    let mut g = relprop::onnx::load(&model).unwrap();
    // Zero γ of channel 1 of every BatchNorm.
    let scales: Vec<usize> =
        g.nodes.iter().filter(|n| n.op_type == "BatchNormalization").filter_map(|n| n.input(1)).collect();
    let mut zeroed = 0;
    for s in scales {
        match g.consts.get_mut(&s) {
            Some(Const::F(a)) => a[[1]] = 0.0,
            Some(Const::F32(a)) => a[[1]] = 0.0,
            _ => continue,
        }
        zeroed += 1;
    }
    assert!(zeroed > 0, "the fixture has BatchNorm scales to zero");
    let x: Value<f64> = relprop::io::read_npy(&root().join("tests/fixtures/densenet/input_0.npy")).unwrap();
    let shapes = value_shapes(&g, std::slice::from_ref(&x)).unwrap();
    let (full, _) = canonize(&g, Mode::Full, Some(&shapes)).unwrap();
    for c in full.consts.values() {
        if let Some(a) = c.f64s() {
            assert!(a.iter().all(|v| v.is_finite()));
        }
    }
    assert!(check(&g, &full, std::slice::from_ref(&x)).unwrap() < 1e-12);
}

fn explain_everything(model: &str, x: Value<f32>, bounds: Bounds) {
    let g = relprop::onnx::load(root().join("assets/models").join(model)).unwrap();
    for name in relprop::composite::NAMES {
        let method = Method::Lrp(Box::new(Composite::named(name, &Params::default()).unwrap()));
        for mode in [Mode::Full, Mode::Minimal] {
            let s = Settings {
                method: method.clone(),
                canonize: mode,
                opts: RuleOpts { bounds: Some(bounds.clone()), ..RuleOpts::default() },
                tolerance: 1e-4,
            };
            let p = prepare(&g, std::slice::from_ref(&x), &s).unwrap_or_else(|e| panic!("{model} {name}: {e}"));
            let e =
                attribute(&p, &method, vec![x.clone()], None, &[]).unwrap_or_else(|e| panic!("{model} {name}: {e}"));
            let r = e.relevance[0].as_ref().unwrap();
            assert_eq!(r.shape(), x.shape());
            assert!(r.iter().all(|v| v.is_finite()), "{model} {name}: non-finite relevance");
            let s: f64 = r.iter().map(|&v| v as f64).sum();
            eprintln!("{model} {name:26} {mode:?}: target {} ΣR/logit {:.4}", e.targets[0], s / e.scores[0]);
        }
    }
}

#[test]
fn efficientnet_lite0_explains_under_every_composite() {
    let x = relprop::io::read_npy(&root().join("tests/fixtures/efficientnet_lite0/input_0.npy")).unwrap();
    explain_everything("efficientnet_lite0.onnx", x, Bounds { low: vec![-127.0 / 128.0], high: vec![1.0] });
}

#[test]
fn ppocr_classifier_explains_under_every_composite() {
    let x = relprop::io::read_npy(&root().join("tests/fixtures/ppocr_cls/input_0.npy")).unwrap();
    explain_everything("ch_ppocr_mobile_v2.0_cls_infer.onnx", x, Bounds { low: vec![-1.0], high: vec![1.0] });
}

#[test]
fn relevance_at_intermediate_values_is_returned_and_conserved() {
    let model = bias_free_net();
    let g = relprop::onnx::load(&model).unwrap();
    let mut rng = Lcg(5);
    let x = Value::F(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3, 8, 8]), rng.vec(384)).unwrap());
    let s = Settings {
        method: epsilon_zero(),
        canonize: Mode::Minimal,
        opts: RuleOpts { stabilizer: 1e-30, ..RuleOpts::default() },
        tolerance: 1e-9,
    };
    let p = prepare(&g, std::slice::from_ref(&x), &s).unwrap();
    let keep = ["p1".to_string(), "r2".to_string()];
    let e = attribute::<f64>(&p, &s.method, vec![x], Some(&[1, 1]), &keep).unwrap();
    let total: f64 = e.scores.iter().sum();
    for name in &keep {
        let r = e.intermediate.get(name).unwrap_or_else(|| panic!("no relevance kept for {name}"));
        let sum: f64 = r.iter().sum();
        assert!((sum - total).abs() <= 1e-12 * total.abs().max(1.0), "{name}: {sum} vs {total}");
    }
    assert_eq!(e.intermediate["p1"].shape(), &[2, 4, 4, 4]);
}

/// A plan derived with `with_method` (shared canonization and constants) explains exactly as a
/// plan prepared from scratch for that method, in both precisions.
#[test]
fn derived_plans_equal_fresh_ones() {
    let g = relprop::onnx::load(root().join("tests/fixtures/resnet_basic/model.onnx")).unwrap();
    let x: Value<f32> = relprop::io::read_npy(&root().join("tests/fixtures/resnet_basic/input_0.npy")).unwrap();
    let opts = RuleOpts { bounds: Some(Bounds { low: vec![-3.0], high: vec![3.0] }), ..RuleOpts::default() };
    let settings =
        |m: &Method| Settings { method: m.clone(), canonize: Mode::Full, opts: opts.clone(), tolerance: 1e-4 };
    let base = prepare(&g, std::slice::from_ref(&x), &settings(&Method::Gradient)).unwrap();
    for name in ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat"] {
        let m = Method::Lrp(Box::new(Composite::named(name, &Params::default()).unwrap()));
        let derived = base.with_method(&m, opts.clone()).unwrap();
        let fresh = prepare(&g, std::slice::from_ref(&x), &settings(&m)).unwrap();
        let a = attribute(&derived, &m, vec![x.clone()], None, &[]).unwrap();
        let b = attribute(&fresh, &m, vec![x.clone()], None, &[]).unwrap();
        assert_eq!(a.relevance[0], b.relevance[0], "{name}");
        let x64 = Value::F(match &x {
            Value::F(a) => a.mapv(|v| v as f64),
            Value::I(_) => unreachable!(),
        });
        let a = attribute(&derived, &m, vec![x64.clone()], None, &[]).unwrap();
        let b = attribute(&fresh, &m, vec![x64.clone()], None, &[]).unwrap();
        assert_eq!(a.relevance[0], b.relevance[0], "{name} f64");
        assert!(a.relevance[0].as_ref().unwrap().iter().any(|v| *v != 0.0), "{name}: all-zero relevance");
    }
}
