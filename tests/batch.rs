//! Batches of samples that the graph keeps apart run (and are explained) one sample at a time
//! (`graph::batch`); the results must be those of the batch at once, in the same order.

use relprop::attribution::{Method, Settings, attribute, prepare};
use relprop::canonize::Mode;
use relprop::composite::{Composite, Params};
use relprop::graph::{batch_separable, prepare_consts, run, run_keep};
use relprop::rules::Bounds;
use relprop::rules::grad::RuleOpts;
use relprop::tensor::Value;
use std::path::PathBuf;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

fn load(case: &str) -> (relprop::graph::Graph, Value<f32>) {
    let dir = fixture(case);
    let g = relprop::onnx::load(dir.join("model.onnx")).unwrap();
    let x: Value<f32> = relprop::io::read_npy(&dir.join("input_0.npy")).unwrap();
    (g, x)
}

#[test]
fn cnn_fixtures_split_and_recurrent_ones_do_not() {
    for case in ["vgg", "vgg_bn", "resnet_basic", "resnet_bottleneck", "densenet", "mobilenet_block", "conv1d"] {
        let (g, x) = load(case);
        assert!(batch_separable(&g, &[x.shape().len()]), "{case}");
    }
    // Token ids [N, T] become a time-major sequence for the LSTM: samples must not be split.
    for case in ["lstm_bi", "lstm_fwd", "lstm_stacked"] {
        let (g, x) = load(case);
        assert!(!batch_separable(&g, &[x.shape().len()]), "{case}");
    }
}

fn max_diff(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn per_sample_forward_equals_the_batched_one() {
    for case in ["resnet_bottleneck", "densenet", "mobilenet_block", "conv1d"] {
        let (g, x) = load(case);
        let c = prepare_consts::<f32>(&g);
        let split = run(&g, &c, vec![x.clone()]).unwrap();
        // Keeping every value runs the batch at once.
        let env = run_keep(&g, &c, vec![x], &|_| true).unwrap();
        for (k, &o) in g.outputs.iter().enumerate() {
            let (Value::F(a), Some(Value::F(b))) = (&split[k], env.get(o)) else { panic!("{case}: float outputs") };
            assert!(max_diff(a, b) <= 1e-5 * b.iter().fold(1f32, |m, v| m.max(v.abs())), "{case} output {k}");
        }
    }
}

#[test]
fn per_sample_explanation_equals_the_batched_one() {
    let bounds = Bounds { low: vec![-3.0], high: vec![3.0] };
    for case in ["resnet_bottleneck", "densenet", "mobilenet_block"] {
        let (g, x) = load(case);
        for comp in ["epsilon_gamma_box", "epsilon_plus_flat"] {
            let method = Method::Lrp(Box::new(Composite::named(comp, &Params::default()).unwrap()));
            let s = Settings {
                method: method.clone(),
                canonize: Mode::Full,
                opts: RuleOpts { bounds: Some(bounds.clone()), ..RuleOpts::default() },
                tolerance: 1e-4,
            };
            let p = prepare(&g, std::slice::from_ref(&x), &s).unwrap();
            // The canonized graph (threshold ReLUs, folded biases) is what gets split: it must
            // qualify, or both sides below would be the batched path.
            assert!(batch_separable(&p.plan.graph, &[x.shape().len()]), "{case}: canonized graph");
            let split = attribute(&p, &method, vec![x.clone()], None, &[]).unwrap();
            // Asking for an intermediate relevance explains the batch at once.
            let pg = &p.plan.graph;
            let first = pg.nodes[0].outputs[0].unwrap();
            let batched = attribute(&p, &method, vec![x.clone()], None, &[pg.names[first].clone()]).unwrap();
            let (a, b) = (split.relevance[0].as_ref().unwrap(), batched.relevance[0].as_ref().unwrap());
            let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            assert!(max_diff(a, b) <= 1e-4 * scale, "{case} {comp}: {} vs scale {scale}", max_diff(a, b));
            assert!(max_diff(&split.output, &batched.output) <= 1e-5, "{case} {comp}");
            let logits = p.logits(vec![x.clone()]).unwrap();
            assert!(max_diff(&logits, &batched.output) <= 1e-5, "{case} {comp}: logits");
            assert_eq!(split.targets, batched.targets, "{case} {comp}");
            assert_eq!(split.scores.len(), batched.scores.len());
            for (s, b) in split.scores.iter().zip(&batched.scores) {
                assert!((s - b).abs() <= 1e-5 * b.abs().max(1.0), "{case} {comp}: score {s} vs {b}");
            }
            assert!((split.dropped - batched.dropped).abs() <= 1e-4 * batched.dropped.abs().max(1.0));
        }
    }
}
