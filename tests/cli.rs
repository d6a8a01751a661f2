//! The `relprop` binary: subcommands, exact flag spellings, errors and exit codes.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn relprop(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_relprop")).args(args).current_dir(root()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("relprop-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn run_writes_the_forward_output() {
    let out = tmp("y.npy");
    let (code, stdout, stderr) = relprop(&[
        "run",
        "tests/fixtures/resnet_basic/model.onnx",
        "--input",
        "tests/fixtures/resnet_basic/input_0.npy",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("shape [2, 10]"), "{stdout}");
    let ours = relprop::io::read_npy::<f64>(&out).unwrap().to_float();
    let ort =
        relprop::io::read_npy::<f64>(&root().join("tests/fixtures/resnet_basic/output_0.ort.npy")).unwrap().to_float();
    let d = ours.iter().zip(ort.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn explain_writes_relevance_and_prints_the_ratio() {
    let out = tmp("r.npy");
    let (code, stdout, stderr) = relprop(&[
        "explain",
        "tests/fixtures/vgg/model.onnx",
        "--input",
        "tests/fixtures/vgg/input_0.npy",
        "--composite",
        "epsilon_gamma_box",
        "--mean",
        "0.485,0.456,0.406",
        "--std",
        "0.229,0.224,0.225",
        "--target",
        "3,7",
        "--out-npy",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let r = relprop::io::read_npy::<f64>(&out).unwrap().to_float();
    assert_eq!(r.shape(), &[2, 3, 32, 32]);
    // The printed Σ R of sample 0 equals the file's.
    let s0: f64 = r.index_axis(ndarray::Axis(0), 0).sum();
    let line = stdout.lines().find(|l| l.trim_start().starts_with("0 ")).expect("a row for sample 0");
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[1], "3");
    let printed: f64 = cols[3].parse().unwrap();
    assert!((printed - s0).abs() < 1e-4 * (1.0 + s0.abs()), "{printed} vs {s0}");
}

#[test]
fn explain_rejects_unknown_names_clearly() {
    let (code, _, stderr) = relprop(&[
        "explain",
        "tests/fixtures/vgg/model.onnx",
        "--input",
        "tests/fixtures/vgg/input_0.npy",
        "--composite",
        "nope",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown composite 'nope'") && stderr.contains("epsilon_plus_flat"), "{stderr}");
    let (code, _, stderr) = relprop(&[
        "explain",
        "tests/fixtures/vgg/model.onnx",
        "--input",
        "tests/fixtures/vgg/input_0.npy",
        "--rule",
        "Conv=gamma(x)",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--rule Conv=gamma(x)") && stderr.contains("bad number"), "{stderr}");
    let (code, _, stderr) = relprop(&[
        "explain",
        "tests/fixtures/vgg/model.onnx",
        "--input",
        "tests/fixtures/vgg/input_0.npy",
        "--composite",
        "epsilon_gamma_box",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("zbox") && stderr.contains("--mean"), "{stderr}");
    let (code, _, stderr) = relprop(&[
        "explain",
        "tests/fixtures/vgg/model.onnx",
        "--input",
        "tests/fixtures/vgg/input_0.npy",
        "--target",
        "12",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("target 12 is out of range"), "{stderr}");
}

#[test]
fn inspect_prints_ops_and_the_rules_of_a_composite() {
    let (code, stdout, stderr) = relprop(&[
        "inspect",
        "tests/fixtures/resnet_basic/model.onnx",
        "--composite",
        "epsilon_plus_flat",
        "--rule",
        "#5=gamma(0.5)",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("[batch, 3, 32, 32]"), "{stdout}");
    let rules: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with('#')).collect();
    assert!(rules[0].contains("Conv") && rules[0].contains("flat"), "{}", rules[0]);
    assert!(rules[5].contains("gamma(0.5)"), "{}", rules[5]);
    assert!(rules.iter().any(|l| l.contains("Add") && l.contains("norm")));
    assert!(rules.iter().any(|l| l.contains("Gemm") && l.contains("epsilon(1e-6)")));
}

#[test]
fn pictures_with_one_corrupt_file_give_heatmaps_for_the_others_and_fail_at_the_end() {
    let dir = tmp("pictures");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::copy(root().join("assets/images/chelsea.png"), dir.join("a_chelsea.png")).unwrap();
    std::fs::copy(root().join("assets/images/coffee.png"), dir.join("sub/c_coffee.png")).unwrap();
    std::fs::write(dir.join("b_broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let out = tmp("pictures-out");
    let (code, stdout, stderr) = relprop(&[
        "explain",
        "assets/models/efficientnet_lite0.onnx",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--overlay",
        "--grid",
    ]);
    assert_ne!(code, 0, "a failed input must give a non-zero exit code");
    assert!(stderr.contains("b_broken.png"), "the bad file is named on stderr: {stderr}");
    assert!(out.join("a_chelsea_282_epsilon_plus_flat.png").exists(), "{stdout}");
    assert!(out.join("a_chelsea_282_epsilon_plus_flat_overlay.png").exists());
    assert!(out.join("c_coffee_967_epsilon_plus_flat.npy").exists());
    assert!(out.join("grid.png").exists());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let rows = summary.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let bad = rows.iter().find(|r| r["file"].as_str().unwrap().ends_with("b_broken.png")).unwrap();
    assert!(bad["error"].as_str().unwrap().contains("decode"), "{bad}");
    let cat = rows.iter().find(|r| r["file"].as_str().unwrap().ends_with("a_chelsea.png")).unwrap();
    assert_eq!(cat["label"], "tiger cat");
    assert!(std::fs::read_to_string(out.join("summary.csv")).unwrap().lines().count() == 4);
    // A second run skips what exists.
    let (_, _, stderr) = relprop(&[
        "explain",
        "assets/models/efficientnet_lite0.onnx",
        dir.join("a_chelsea.png").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stderr.contains("skip"), "{stderr}");
}

#[test]
fn targets_by_name_and_contrastive() {
    let out = tmp("targets-out");
    let (code, stdout, stderr) = relprop(&[
        "explain",
        "assets/models/efficientnet_lite0.onnx",
        "assets/images/chelsea.png",
        "--out",
        out.to_str().unwrap(),
        "--target",
        "Egyptian cat",
        "--versus",
        "282",
        "--composite",
        "epsilon_gamma_box",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("285"), "{stdout}");
    assert!(out.join("chelsea_285_vs282_epsilon_gamma_box.png").exists());
    let (code, _, stderr) = relprop(&[
        "explain",
        "assets/models/efficientnet_lite0.onnx",
        "assets/images/chelsea.png",
        "--out",
        out.to_str().unwrap(),
        "--target",
        "unicorn",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("no class named 'unicorn'"), "{stderr}");
    // A wrong crop size is caught against the model's input shape.
    let (code, _, stderr) = relprop(&[
        "explain",
        "assets/models/efficientnet_lite0.onnx",
        "assets/images/chelsea.png",
        "--out",
        out.to_str().unwrap(),
        "--crop",
        "200",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("[1, 3, 200, 200]") && stderr.contains("[1, 3, 224, 224]"), "{stderr}");
}

#[test]
fn demo_writes_its_heatmaps_and_finds_the_cat() {
    let out = tmp("demo-out");
    let (code, stdout, stderr) = relprop(&["demo", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let top = stdout.lines().nth(1).unwrap();
    assert!(top.trim_start().starts_with("282") && top.contains("tiger cat"), "{stdout}");
    for f in [
        "chelsea_epsilon_plus_flat.png",
        "chelsea_epsilon_gamma_box.png",
        "chelsea_epsilon_alpha2_beta1_flat.png",
        "chelsea_gradient.png",
        "chelsea_epsilon_plus_flat_overlay.png",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
}

#[test]
fn bench_prints_every_mode_and_forward_only_just_the_forward() {
    let m = "tests/fixtures/mobilenet_block/model.onnx";
    let (code, stdout, stderr) = relprop(&["bench", m, "--batch", "1,2", "--repeats", "1", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let modes: Vec<&str> = stdout.lines().filter_map(|l| l.split("\"mode\":\"").nth(1)?.split('"').next()).collect();
    let each = ["forward", "gradient", "lrp epsilon_plus_flat", "lrp epsilon_gamma_box"];
    assert_eq!(modes, [each, each].concat(), "{stdout}");
    let (code, stdout, stderr) = relprop(&["bench", m, "--batch", "2", "--repeats", "1", "--forward-only"]);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with('2')).collect();
    assert!(rows.len() == 1 && rows[0].contains("forward") && rows[0].contains('–'), "{stdout}");
}
