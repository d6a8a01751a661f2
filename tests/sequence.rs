//! Sequences: Silero VAD explained on a synthetic speech recording, and text in / HTML out.

use relprop::attribution::{Method, Settings, attribute, prepare};
use relprop::canonize::Mode;
use relprop::composite::{Composite, Params};
use relprop::rules::grad::RuleOpts;
use relprop::tensor::Value;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn silero_vad_puts_relevance_on_speech_not_silence() {
    // assets/audio/speech.wav (tools/make_speech.sh): 1 s silence, speech until 4.58 s, 1 s silence.
    let samples = relprop::io::read_wav(&root().join("assets/audio/speech.wav"), 16000).unwrap();
    assert_eq!(samples.len(), 89244);
    let frames = relprop::preprocess::audio_frames(&samples, 512, 64);
    let zeros = || Value::F(ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 1, 128])));
    let inputs = vec![Value::F(frames.into_dyn()), zeros(), zeros()];
    let g = relprop::onnx::load(root().join("assets/models/silero_vad_16k_sequence.onnx")).unwrap();
    for name in ["epsilon_plus", "epsilon"] {
        let method = Method::Lrp(Box::new(Composite::named(name, &Params::default()).unwrap()));
        let s = Settings { method: method.clone(), canonize: Mode::Full, opts: RuleOpts::default(), tolerance: 1e-4 };
        let p = prepare(&g, &inputs, &s).unwrap();
        let e = attribute(&p, &method, inputs.clone(), None, &[]).unwrap();
        let r = e.relevance[0].as_ref().unwrap().mapv(|v| v as f64).into_dimensionality::<ndarray::Ix2>().unwrap();
        let rel = relprop::preprocess::audio_relevance(r.view(), samples.len(), 512, 64);
        assert!(rel.iter().all(|v| v.is_finite()));
        let mean_abs = |a: usize, b: usize| rel[a..b].iter().map(|v| v.abs()).sum::<f64>() / (b - a) as f64;
        let silence = (mean_abs(0, 15_000) + mean_abs(75_000, 89_244)) / 2.0;
        let speech = mean_abs(17_000, 72_000);
        let ratio = silence / speech;
        eprintln!("{name}: mean |R| on silence / on speech = {ratio:.2e}");
        // Measured when this test was written: 1.8e-6 (epsilon_plus) and 1.7e-4 (epsilon).
        assert!(ratio < 1e-3, "{name}: silence carries {ratio:e} of the speech relevance");
        // The initial states h and c are inputs too; their relevance comes back as well.
        assert_eq!(e.relevance.len(), 3);
    }
}

#[test]
fn text_in_html_and_terminal_out() {
    let out = std::env::temp_dir().join(format!("relprop-text-{}", std::process::id()));
    let run = |extra: &[&str]| {
        let mut args = vec![
            "explain",
            "tests/fixtures/lstm_bi/model.onnx",
            "--vocab",
            "tests/fixtures/lstm_bi/vocab.txt",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_relprop")).args(&args).current_dir(root()).output().unwrap()
    };
    let o = run(&["--text", "The movie was GREAT", "--lowercase", "--composite", "epsilon", "--lstm-bias-factor", "1"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("the(") && stdout.contains("great("), "{stdout}");
    let html = std::fs::read_to_string(out.join("text.html")).unwrap();
    assert!(html.contains(">great</span>") && html.contains("title=\"relevance ") && html.contains("legend"), "{html}");
    // With bias factor 1, tokens plus initial states give the score back.
    let score: f64 = stdout.split("score ").nth(1).unwrap().split(')').next().unwrap().parse().unwrap();
    let toks: f64 = stdout.split("Σ R = ").nth(1).unwrap().lines().next().unwrap().trim().parse().unwrap();
    let init: f64 = stdout
        .split("initial states (and other constants): ")
        .nth(1)
        .map(|s| s.lines().next().unwrap().trim().parse().unwrap())
        .unwrap_or(0.0);
    assert!((toks + init - score).abs() < 1e-3, "{toks} + {init} vs {score}");
    let o = run(&["--text", "the xylophone"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("'xylophone'"));
    let o = run(&["--text", "the xylophone", "--unk-id", "0"]);
    assert!(o.status.success());
}
