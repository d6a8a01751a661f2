//! `relprop demo`: the bundled EfficientNet-Lite0 on the bundled cat picture.

use anyhow::{Context, Result};
use clap::Args;
use relprop::graph::{prepare_consts, run};
use relprop::preprocess::{Normalize, center_crop, load_rgb, resize_shorter, to_tensor};
use relprop::tensor::Value;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct DemoArgs {
    /// Output directory.
    #[arg(long, default_value = "relprop-demo")]
    out: PathBuf,
    /// Directory holding the bundled assets (models/, images/, labels/).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/assets"))]
    assets: PathBuf,
}

pub fn demo(a: DemoArgs) -> Result<ExitCode> {
    let model = a.assets.join("models/efficientnet_lite0.onnx");
    let image = a.assets.join("images/chelsea.png");
    let labels = relprop::labels::read_labels(&a.assets.join("labels/imagenet_classes.tsv"))?;
    let g = relprop::onnx::load(&model).with_context(|| format!("loading {}", model.display()))?;
    let img = center_crop(&resize_shorter(&load_rgb(&image)?, 256), 224)?;
    let x = to_tensor(
        &[img],
        &Normalize::affine(1.0 / 128.0, -127.0 / 128.0),
        false,
        false,
    )?;
    let y = run(
        &g,
        &prepare_consts::<f32>(&g),
        vec![Value::F(x.mapv(|v| v as f32))],
    )?;
    let logits: Vec<f64> = y[0].to_float().iter().map(|&v| v as f64).collect();
    let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = logits.iter().map(|v| (v - mx).exp()).sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]));
    println!("{} on {}:", model.display(), image.display());
    for &k in order.iter().take(5) {
        let name = labels.get(k).map(String::as_str).unwrap_or("?");
        println!("  {k:4}  {:6.3}  {name}", (logits[k] - mx).exp() / z);
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    Ok(ExitCode::SUCCESS)
}
