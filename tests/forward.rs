//! Forward parity: every fixture model against onnxruntime (f32) and a float64 reference
//! (onnx.reference on a float64 copy of the graph), both written by tools/reference.

use relprop::graph::{prepare_consts, run};
use relprop::tensor::{Float, Value};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_path(case: &str) -> PathBuf {
    let assets = root().join("assets/models");
    match case {
        "ppocr_cls" => assets.join("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        "silero_vad" => assets.join("silero_vad_16k_sequence.onnx"),
        "efficientnet_lite0" => assets.join("efficientnet_lite0.onnx"),
        _ => root().join("tests/fixtures").join(case).join("model.onnx"),
    }
}

fn numbered(dir: &Path, stem: &str, suffix: &str) -> Vec<PathBuf> {
    (0..).map(|k| dir.join(format!("{stem}_{k}{suffix}"))).take_while(|p| p.exists()).collect()
}

/// Runs `case` in precision T; returns (max |Δ|, max |y|) over all outputs.
fn check<T: Float>(case: &str, suffix: &str) -> (f64, f64) {
    let dir = root().join("tests/fixtures").join(case);
    let g = relprop::onnx::load(model_path(case)).unwrap();
    let inputs: Vec<Value<T>> =
        numbered(&dir, "input", ".npy").iter().map(|p| relprop::io::read_npy(p).unwrap()).collect();
    let consts = prepare_consts::<T>(&g);
    let outs = run(&g, &consts, inputs).unwrap();
    let refs = numbered(&dir, "output", suffix);
    assert_eq!(outs.len(), refs.len(), "{case}: output count");
    let (mut dmax, mut ymax) = (0.0f64, 0.0f64);
    for (o, r) in outs.iter().zip(&refs) {
        let r = relprop::io::read_npy::<f64>(r).unwrap().to_float();
        let o = o.to_float();
        assert_eq!(o.shape(), r.shape(), "{case}: output shape");
        for (a, b) in o.iter().zip(r.iter()) {
            dmax = dmax.max((a.f64() - b).abs());
            ymax = ymax.max(b.abs());
        }
    }
    (dmax, ymax)
}

const CASES: &[&str] = &[
    "vgg",
    "vgg_bn",
    "vgg_bn_unfolded",
    "vgg_wide",
    "resnet_basic",
    "resnet_bottleneck",
    "densenet",
    "mobilenet_block",
    "conv1d",
    "lstm_bi",
    "lstm_fwd",
    "lstm_stacked",
    "ppocr_cls",
    "silero_vad",
    "efficientnet_lite0",
];

#[test]
fn f32_matches_onnxruntime() {
    for case in CASES {
        let (d, y) = check::<f32>(case, ".ort.npy");
        eprintln!("{case:20} f32: max abs diff {d:.2e}, max abs y {y:.3e}");
        assert!(d <= 1e-4 * y, "{case}: max |Δ| = {d:e} exceeds 1e-4 · max |y| = {:e}", 1e-4 * y);
    }
}

#[test]
fn f64_matches_float64_reference() {
    for case in CASES {
        let (d, y) = check::<f64>(case, ".f64.npy");
        eprintln!("{case:20} f64: max abs diff {d:.2e}, max abs y {y:.3e}");
        assert!(d <= 1e-10 * y.max(1.0), "{case}: max |Δ| = {d:e} exceeds 1e-10");
    }
}
