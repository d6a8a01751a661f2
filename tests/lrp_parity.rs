//! LRP parity with zennit 0.5.1 (tools/reference/zennit_refs.py) on the CNN fixtures: per sample
//! relative L2 ≤ 1e-2, cosine ≥ 0.9999, and the same Σ R / logit within 1e-3.

use relprop::attribution::{Method, Settings, attribute, prepare};
use relprop::canonize::Mode;
use relprop::composite::{Composite, Params};
use relprop::rules::Bounds;
use relprop::rules::grad::RuleOpts;
use relprop::tensor::Value;
use std::path::PathBuf;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

fn imagenet_bounds() -> Bounds {
    let mean = [0.485, 0.456, 0.406];
    let std = [0.229, 0.224, 0.225];
    Bounds {
        low: (0..3).map(|c| (0.0 - mean[c]) / std[c]).collect(),
        high: (0..3).map(|c| (1.0 - mean[c]) / std[c]).collect(),
    }
}

/// (relative L2, cosine, our Σ R / logit, zennit's Σ R / logit) per sample.
fn compare(case: &str, composite: &str) -> Vec<(f64, f64, f64, f64)> {
    let dir = fixture(case);
    let g = relprop::onnx::load(dir.join("model.onnx")).unwrap();
    let x: Value<f32> = relprop::io::read_npy(&dir.join("input_0.npy")).unwrap();
    let targets: Vec<usize> =
        relprop::io::read_npy::<f32>(&dir.join("targets.npy")).unwrap().to_int().iter().map(|&t| t as usize).collect();
    let reference = relprop::io::read_npy::<f64>(&dir.join(format!("zennit_{composite}.npy"))).unwrap().to_float();
    let params = Params { epsilon: if composite == "epsilon" { 1e-9 } else { 1e-6 }, ..Params::default() };
    let method = if composite == "gradient" {
        Method::Gradient
    } else {
        Method::Lrp(Box::new(Composite::named(composite, &params).unwrap()))
    };
    let s = Settings {
        method: method.clone(),
        canonize: Mode::Minimal,
        opts: RuleOpts { bounds: Some(imagenet_bounds()), ..RuleOpts::default() },
        tolerance: 1e-4,
    };
    let p = prepare(&g, std::slice::from_ref(&x), &s).unwrap();
    let e = attribute(&p, &method, vec![x], Some(&targets), &[]).unwrap();
    let ours = e.relevance[0].as_ref().unwrap();
    let n = ours.shape()[0];
    let per = ours.len() / n;
    let (a, b): (Vec<f64>, Vec<f64>) = (ours.iter().map(|&v| v as f64).collect(), reference.iter().copied().collect());
    (0..n)
        .map(|i| {
            let (sa, sb) = (&a[i * per..(i + 1) * per], &b[i * per..(i + 1) * per]);
            let dot: f64 = sa.iter().zip(sb).map(|(x, y)| x * y).sum();
            let na = sa.iter().map(|x| x * x).sum::<f64>().sqrt();
            let nb = sb.iter().map(|x| x * x).sum::<f64>().sqrt();
            let diff = sa.iter().zip(sb).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
            let logit = e.scores[i];
            (diff / nb, dot / (na * nb), sa.iter().sum::<f64>() / logit, sb.iter().sum::<f64>() / logit)
        })
        .collect()
}

const COMPOSITES: &[&str] = &[
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1_flat",
    "epsilon_plus",
    "excitation_backprop",
    "guided_backprop",
    "deconvnet",
    "epsilon",
    "gradient",
];

fn check_case(case: &str) {
    let mut failures = Vec::new();
    for comp in COMPOSITES {
        for (i, (rl2, cos, ours, theirs)) in compare(case, comp).into_iter().enumerate() {
            eprintln!(
                "{case:18} {comp:26} sample {i}: rel L2 {rl2:.2e}  cosine {cos:.7}  ΣR/logit {ours:.5} vs zennit {theirs:.5}"
            );
            // Σ R / logit within 1e-3, relative to max(1, |ratio|) since guided backprop's ratio
            // reaches 20. ε = 1e-9 is ill-conditioned where z ≈ 0: on the DenseNet fixture zennit's
            // own f64 run differs from ours by 8e-4 because its BN merge rounds differently from
            // the exporter's (measured with tools/reference), so that composite gets 2e-3.
            let tol = if comp == &"epsilon" { 2e-3 } else { 1e-3 };
            let ratio_ok = comp == &"gradient" || (ours - theirs).abs() <= tol * theirs.abs().max(1.0);
            if !(rl2 <= 1e-2 && cos >= 0.9999 && ratio_ok) {
                failures.push(format!(
                    "{comp} sample {i}: rel L2 {rl2:.2e}, cosine {cos:.6}, ratio {ours:.5} vs {theirs:.5}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{case}: {failures:#?}");
}

#[test]
fn vgg_matches_zennit() {
    check_case("vgg");
}

/// 16 to 32 channels on 48×48 and 24×24 planes: the 3×3 layers after the first take the Winograd
/// kernel in f32 (asserted), forward and VJP, under every composite.
#[test]
fn vgg_wide_matches_zennit() {
    use relprop::ops::conv::{ConvGeom, takes_winograd};
    let base = ConvGeom {
        n: 2,
        c: 16,
        h: 48,
        w: 48,
        m: 24,
        kh: 3,
        kw: 3,
        stride: [1, 1],
        dilation: [1, 1],
        pads: [1; 4],
        group: 1,
    };
    let on = std::env::var("RELPROP_WINOGRAD").map_or(true, |v| v != "off");
    for g in [base, ConvGeom { c: 24, m: 32, h: 24, w: 24, ..base }] {
        assert_eq!(takes_winograd::<f32>(&g), on, "{g:?}");
    }
    check_case("vgg_wide");
}

#[test]
fn vgg_bn_matches_zennit() {
    check_case("vgg_bn");
}

#[test]
fn resnet_basic_matches_zennit() {
    check_case("resnet_basic");
}

#[test]
fn resnet_bottleneck_matches_zennit() {
    check_case("resnet_bottleneck");
}

#[test]
fn densenet_matches_zennit() {
    check_case("densenet");
}
