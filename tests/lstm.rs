//! LRP for LSTMs against tools/reference/arras_lstm.py (an independent float64 NumPy
//! implementation of Arras et al.'s rules): per-token relevance, and conservation with bias factor 1.

use relprop::attribution::{Method, Settings, attribute, prepare};
use relprop::canonize::Mode;
use relprop::composite::{Composite, Params};
use relprop::rules::grad::RuleOpts;
use relprop::tensor::{Float, Value};
use std::path::PathBuf;

fn dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

fn npy(case: &str, name: &str) -> Vec<f64> {
    relprop::io::read_npy::<f64>(&dir(case).join(name)).unwrap().to_float().iter().copied().collect()
}

/// (our token relevance, reference, our Σ tokens + initial states, score) per sample.
fn run<T: Float>(case: &str, bf: u8) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let g = relprop::onnx::load(dir(case).join("model.onnx")).unwrap();
    let ids: Value<T> = relprop::io::read_npy(&dir(case).join("input_0.npy")).unwrap();
    let method =
        Method::Lrp(Box::new(Composite::named("epsilon", &Params { epsilon: 1e-3, ..Params::default() }).unwrap()));
    let s = Settings {
        method: method.clone(),
        canonize: Mode::Full,
        opts: RuleOpts { lstm_epsilon: 1e-3, bias_factor: bf as f64, ..RuleOpts::default() },
        tolerance: 1e-4,
    };
    let p = prepare(&g, std::slice::from_ref(&ids), &s).unwrap();
    let targets: Vec<usize> = npy(case, "arras_targets.npy").iter().map(|&t| t as usize).collect();
    let e = attribute(&p, &method, vec![ids], Some(&targets), &[]).unwrap();
    let r = e.relevance[0].as_ref().unwrap();
    assert_eq!(r.shape(), &[2, 7], "one relevance per token");
    let ours: Vec<f64> = r.iter().map(|v| v.f64()).collect();
    // Relevance reaching the (constant, zero) initial states is reported as dropped.
    let totals: Vec<f64> = (0..2).map(|b| ours[b * 7..(b + 1) * 7].iter().sum::<f64>()).collect();
    let dropped = e.dropped;
    let sum_all = vec![totals[0] + totals[1] + dropped];
    (ours, npy(case, &format!("arras_bf{bf}_tokens.npy")), sum_all, vec![e.scores[0] + e.scores[1]])
}

const CASES: &[&str] = &["lstm_fwd", "lstm_reverse", "lstm_bi", "lstm_stacked"];

#[test]
fn token_relevance_matches_the_float64_reference() {
    for case in CASES {
        for bf in [0u8, 1] {
            for (precision, tol) in [("f32", 1e-4), ("f64", 1e-9)] {
                let (ours, reference, _, _) =
                    if precision == "f32" { run::<f32>(case, bf) } else { run::<f64>(case, bf) };
                let scale = reference.iter().fold(0.0f64, |a, v| a.max(v.abs()));
                let worst = ours.iter().zip(&reference).fold(0.0f64, |a, (x, y)| a.max((x - y).abs()));
                eprintln!("{case:13} bf={bf} {precision}: max |Δ| / max |R| = {:.2e}", worst / scale);
                assert!(worst <= tol * scale, "{case} bf={bf} {precision}: {worst:e} vs scale {scale:e}");
            }
        }
    }
}

#[test]
fn bias_factor_one_conserves_the_score() {
    for case in CASES {
        for (precision, tol) in [("f32", 1e-5), ("f64", 1e-12)] {
            let (_, _, total, score) = if precision == "f32" { run::<f32>(case, 1) } else { run::<f64>(case, 1) };
            eprintln!("{case:13} {precision}: tokens + initial states = {:.12}, scores = {:.12}", total[0], score[0]);
            assert!((total[0] - score[0]).abs() <= tol * score[0].abs().max(1.0), "{case} {precision}");
        }
    }
}
