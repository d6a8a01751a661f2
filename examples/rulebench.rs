//! Times z⁺ on one convolution (1×1 unless K says otherwise) as a canonized DenseNet's layers see it (input of both signs on
//! a subset of channels, spatially varying bias, output kept) against the gradient's VJP of the
//! same layer: `target/release/examples/rulebench [C M H SIGNED%]` (DenseNet-121's 736→128 14×14
//! layer with 39 % signed channels by default; CHANNEL_BIAS=1, NO_OUTPUT=1 and AFTER_RELU=1 with
//! 100 % for EfficientNet-Lite0's expansions; RULE=gamma(0.25) for another rule; DEPTHWISE=1). A profiling aid for `rules::linear`.
use relprop::ops::conv::{ConvGeom, conv2d, conv2d_vjp};
use relprop::rules::Rule;
use relprop::rules::linear::{LinearKind, LinearLayer, WeightCache, relevance_bf};
use std::borrow::Cow;
use std::time::Instant;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn time(n: usize, f: &mut dyn FnMut()) -> f64 {
    let mut t = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        f();
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
    let (c, m, h, pct, k) = match a[..] {
        [c, m, h, p] => (c, m, h, p, 1),
        [c, m, h, p, k] => (c, m, h, p, k),
        _ => (736, 128, 14, 39, 1),
    };
    let hw = h * h;
    // DEPTHWISE=1: one group per channel (M = C).
    let group = if std::env::var_os("DEPTHWISE").is_some() { c } else { 1 };
    let g = ConvGeom { n: 1, c, h, w: h, m, kh: k, kw: k, stride: [1, 1], dilation: [1, 1], pads: [k / 2; 4], group };
    let signed: Vec<usize> = (0..c).filter(|i| (i * 37) % 100 < pct).collect();
    let sset: std::collections::HashSet<usize> = signed.iter().copied().collect();
    // ThreshReLU-like values: zero below a threshold, negative only on the signed channels.
    let x: Vec<f32> = (0..c * hw)
        .map(|i| {
            let v = ((i as f32) * 0.37).sin() + 0.2;
            let ch = i / hw;
            if sset.contains(&ch) { if v < -0.5 { 0.0 } else { v } } else { v.max(0.0) }
        })
        .collect();
    let w: Vec<f32> = (0..m * c / group * k * k).map(|i| 0.05 * ((i as f32) * 0.11).cos()).collect();
    // CHANNEL_BIAS=1: a bias per output channel (EfficientNet-Lite0's layers), else per element.
    let per_channel = std::env::var_os("CHANNEL_BIAS").is_some();
    let bias: Vec<f32> = (0..if per_channel { m } else { m * hw }).map(|i| 0.1 * ((i as f32) * 0.013).sin()).collect();
    let mut y = conv2d(&g, &x, &w, None);
    y.iter_mut().enumerate().for_each(|(i, v)| *v += bias[if per_channel { i / hw } else { i }]);
    // NO_OUTPUT=1: the forward output not kept (z⁺ on layers wider than their input).
    let kept = std::env::var_os("NO_OUTPUT").is_none().then_some(&y[..]);
    // AFTER_RELU=1: no relevance where the output is below zero (a ReLU follows the layer).
    let after_relu = std::env::var_os("AFTER_RELU").is_some();
    let r: Vec<f32> =
        (0..m * hw).map(|i| if after_relu && y[i] <= 0.0 { 0.0 } else { ((i as f32) * 0.23).sin().abs() }).collect();
    // The graph names the signed channels where a threshold ReLU writes the input (DenseNet);
    // at 100 % (EfficientNet-Lite0's expansions read unactivated projections) it names none.
    // RULE=gamma(0.25) (any rule of a linear layer) instead of z⁺.
    let rule: Rule = std::env::var("RULE").unwrap_or_else(|_| "zplus".into()).parse().expect("a rule");
    let cache = WeightCache::build(&rule, &w);
    let cache = if pct < 100 { cache.with_signed_channels(signed.clone()) } else { cache };
    let layer = LinearLayer {
        kind: LinearKind::Conv(g),
        w: Cow::Borrowed(&w),
        bias: Some(Cow::Borrowed(&bias)),
        cache: Some(&cache),
    };
    let n = 200;
    relprop::ops::hot(|| {
        let tz = time(n, &mut || {
            std::hint::black_box(relevance_bf(&layer, &rule, &x, kept, &r, false, 1e-6, None, 0.0).expect("the rule"));
        });
        let tg = time(n, &mut || {
            std::hint::black_box(conv2d_vjp(&g, &r, &w));
        });
        let tf = time(n, &mut || {
            std::hint::black_box(conv2d(&g, &x, &w, None));
        });
        println!(
            "c {c} m {m} {h}x{h} k {k} signed {}: {rule} {tz:.3} ms  vjp {tg:.3} ms  fwd {tf:.3} ms  rule/vjp {:.2}",
            signed.len(),
            tz / tg
        );
    });
}
