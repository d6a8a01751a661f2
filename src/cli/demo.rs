//! `relprop demo`: the bundled EfficientNet-Lite0 on the bundled cat picture: top-5 classes and
//! heatmaps for three LRP composites and the gradient, plus an overlay.

use anyhow::{Context, Result};
use clap::Args;
use relprop::attribution::{Method, Settings, attribute, prepare};
use relprop::canonize::Mode;
use relprop::composite::{Composite, Params};
use relprop::preprocess::Preprocess;
use relprop::render::{ColorMap, Norm, channel_sum, colorize, normalize, overlay, write_png};
use relprop::rules::grad::RuleOpts;
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
    let pre = Preprocess::preset("efficientnet-lite")?;
    let picture = pre.picture(&image)?;
    let x = Value::F(pre.tensor(std::slice::from_ref(&picture))?.mapv(|v| v as f32));
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let palette = ColorMap::get("bwr")?.palette(1.0);
    let mut first = true;
    let mut written = Vec::new();
    let mut base: Option<relprop::attribution::Prepared> = None;
    for name in ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat", "gradient"] {
        let method = if name == "gradient" {
            Method::Gradient
        } else {
            Method::Lrp(Box::new(Composite::named(name, &Params::default())?))
        };
        let s = Settings {
            method: method.clone(),
            canonize: Mode::Full,
            opts: RuleOpts { bounds: Some(pre.bounds()), ..RuleOpts::default() },
            tolerance: 1e-4,
        };
        // Canonize and check once; the other methods reuse that plan's graph and constants.
        let p = match &base {
            None => prepare(&g, std::slice::from_ref(&x), &s)?,
            Some(b) => b.with_method(&method, s.opts.clone())?,
        };
        let t0 = std::time::Instant::now();
        let e = attribute(&p, &method, vec![x.clone()], None, &[])?;
        let dt = t0.elapsed().as_secs_f64();
        if first {
            let logits: Vec<f64> = e.output.iter().map(|&v| v as f64).collect();
            println!("{} on {}:", model.display(), image.display());
            for (k, prob) in relprop::labels::top_k(&logits, 5) {
                println!("  {k:4}  {prob:6.3}  {}", labels.get(k).map(String::as_str).unwrap_or("?"));
            }
            first = false;
        }
        let r = e.relevance[0].as_ref().context("no relevance")?.mapv(|v| v as f64);
        let map = channel_sum(&r.index_axis(ndarray::Axis(0), 0))?;
        let v = normalize(map.view(), Norm::Symmetric);
        let heat = colorize(v.view(), &palette);
        let path = a.out.join(format!("chelsea_{name}.png"));
        write_png(&path, &heat)?;
        written.push(path);
        if name == "epsilon_plus_flat" {
            let path = a.out.join("chelsea_epsilon_plus_flat_overlay.png");
            write_png(&path, &overlay(&picture, &heat, v.view(), 0.8))?;
            written.push(path);
        }
        let sr: f64 = r.sum();
        println!("  {name:<26} target {} ΣR/logit {:>8.4}  {:6.0} ms", e.targets[0], sr / e.scores[0], dt * 1e3);
        if base.is_none() {
            base = Some(p);
        }
    }
    let path = a.out.join("chelsea_input.png");
    write_png(&path, &picture)?;
    written.push(path);
    println!("wrote {} files to {}/:", written.len(), a.out.display());
    for w in &written {
        println!("  {}", w.file_name().and_then(|f| f.to_str()).unwrap_or(""));
    }
    Ok(ExitCode::SUCCESS)
}
