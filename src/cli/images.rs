//! Pictures in, heatmaps out: preprocessing flags and sidecar files, targets, batched runs with a
//! progress bar, per-picture outputs and a summary; bad files are reported and skipped.

use super::explain::ExplainArgs;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use relprop::attribution::{Prepared, Settings, attribute, attribute_baseline, prepare};
use relprop::graph::{Dim, Graph};
use relprop::preprocess::{Normalize, Preprocess, Rgb};
use relprop::render::{ColorMap, Norm, channel_sum, colorize, normalize, overlay, write_png};
use relprop::tensor::Value;
use std::path::{Path, PathBuf};

/// Picture preprocessing flags, shared by explain, eval and run.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PreprocessFlags {
    /// Preprocessing preset: imagenet (256/224/ImageNet mean, std) or efficientnet-lite (256/224/(p−127)/128).
    #[arg(long)]
    pub preprocess: Option<String>,
    /// Resize the shorter side to N pixels (bilinear, as PIL).
    #[arg(long)]
    pub resize: Option<usize>,
    /// Centre crop to N × N.
    #[arg(long)]
    pub crop: Option<usize>,
    /// Per-channel mean of the input normalisation (gives z^B its bounds (0−mean)/std, (1−mean)/std).
    #[arg(long, value_delimiter = ',')]
    pub mean: Option<Vec<f64>>,
    /// Per-channel std of the input normalisation.
    #[arg(long, value_delimiter = ',')]
    pub std: Option<Vec<f64>>,
    /// Pixel scale on 0..255 values (instead of --mean/--std).
    #[arg(long, allow_hyphen_values = true)]
    pub scale: Option<f64>,
    /// Offset added after --scale.
    #[arg(long, allow_hyphen_values = true)]
    pub offset: Option<f64>,
    /// Input layout: nchw or nhwc.
    #[arg(long)]
    pub layout: Option<String>,
    /// Channel order: rgb or bgr.
    #[arg(long)]
    pub channels: Option<String>,
    /// Class names, one per line (or ImageNet-style index<TAB>wnid<TAB>names).
    #[arg(long)]
    pub labels: Option<PathBuf>,
}

/// A model's sidecar `MODEL.relprop.toml`: its preprocessing, labels and default composite.
#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// A preset name (imagenet, efficientnet-lite).
    pub preprocess: Option<String>,
    /// Shorter side after resizing.
    pub resize: Option<usize>,
    /// Centre crop.
    pub crop: Option<usize>,
    /// Mean on 0..1 pixels.
    pub mean: Option<Vec<f64>>,
    /// Std on 0..1 pixels.
    pub std: Option<Vec<f64>>,
    /// Scale on 0..255 pixels.
    pub scale: Option<f64>,
    /// Offset after scaling.
    pub offset: Option<f64>,
    /// nchw or nhwc.
    pub layout: Option<String>,
    /// rgb or bgr.
    pub channels: Option<String>,
    /// Labels file, relative to the model.
    pub labels: Option<PathBuf>,
    /// Default composite.
    pub composite: Option<String>,
}

/// Class names from --labels, else from the sidecar (relative to it), else none.
pub fn labels(flags: &PreprocessFlags, side: &Sidecar, side_path: Option<&Path>) -> Result<Vec<String>> {
    let path = flags
        .labels
        .clone()
        .or_else(|| side.labels.as_ref().map(|l| side_path.and_then(Path::parent).unwrap_or(Path::new(".")).join(l)));
    Ok(match path {
        Some(p) => relprop::labels::read_labels(&p)?,
        None => Vec::new(),
    })
}

/// Reads `MODEL.relprop.toml` next to the model, if there is one.
pub fn sidecar(model: &Path) -> Result<(Sidecar, Option<PathBuf>)> {
    let path = model.with_extension("relprop.toml");
    if !path.exists() {
        return Ok((Sidecar::default(), None));
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let s: Sidecar = toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
    Ok((s, Some(path)))
}

fn three(v: &[f64], what: &str) -> Result<[f64; 3]> {
    match v {
        [a] => Ok([*a; 3]),
        [a, b, c] => Ok([*a, *b, *c]),
        _ => bail!("{what} needs 1 or 3 values, got {}", v.len()),
    }
}

/// The preprocessing from flags, falling back to the sidecar, then to nothing.
pub fn preprocess(a: &PreprocessFlags, side: &Sidecar) -> Result<Preprocess> {
    let preset = a.preprocess.clone().or(side.preprocess.clone());
    let mut p = match preset {
        Some(name) => Preprocess::preset(&name)?,
        None => Preprocess::default(),
    };
    p.resize = a.resize.or(side.resize).or(p.resize);
    p.crop = a.crop.or(side.crop).or(p.crop);
    let mean = a.mean.clone().or(side.mean.clone());
    let std = a.std.clone().or(side.std.clone());
    match (mean, std) {
        (Some(m), Some(s)) => p.norm = Normalize::mean_std(three(&m, "--mean")?, three(&s, "--std")?),
        (None, None) => {}
        _ => bail!("give both --mean and --std"),
    }
    let scale = a.scale.or(side.scale);
    let offset = a.offset.or(side.offset);
    if scale.is_some() || offset.is_some() {
        p.norm = Normalize::affine(scale.unwrap_or(1.0), offset.unwrap_or(0.0));
    }
    match a.layout.clone().or(side.layout.clone()).as_deref() {
        None | Some("nchw") => p.nhwc = false,
        Some("nhwc") => p.nhwc = true,
        Some(o) => bail!("--layout must be nchw or nhwc, got '{o}'"),
    }
    match a.channels.clone().or(side.channels.clone()).as_deref() {
        None | Some("rgb") => p.bgr = false,
        Some("bgr") => p.bgr = true,
        Some(o) => bail!("--channels must be rgb or bgr, got '{o}'"),
    }
    Ok(p)
}

/// Expands files and directories (recursively, sorted) into picture paths.
pub fn collect(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut stack = vec![p.clone()];
            let mut found = Vec::new();
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
                    let path = e?.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if matches!(
                        path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
                        Some("png" | "jpg" | "jpeg")
                    ) {
                        found.push(path);
                    }
                }
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Checks the picture tensor against the model's declared input shape.
fn check_shape(g: &Graph, shape: &[usize]) -> Result<()> {
    let inp = g.inputs.first().context("the model has no inputs")?;
    if let Some(d) = &inp.dims {
        let ok = d.len() == shape.len()
            && d.iter().zip(shape).skip(1).all(|(d, s)| matches!(d, Dim::Free(_)) || *d == Dim::Fixed(*s));
        if !ok {
            bail!(
                "the preprocessed pictures have shape {:?} (N first), the model expects {}; adjust --resize/--crop/--layout",
                shape,
                relprop::graph::format_dims(d)
            );
        }
    }
    Ok(())
}

/// What to explain for one picture.
#[derive(Clone, Debug, PartialEq)]
enum Target {
    Argmax,
    Index(usize),
    TopK(usize),
}

fn parse_target(spec: Option<&str>, labels: &[String]) -> Result<Option<usize>> {
    match spec {
        None | Some("argmax") => Ok(None),
        Some(s) => {
            if let Ok(i) = s.parse::<usize>() {
                return Ok(Some(i));
            }
            let low = s.to_lowercase();
            let hit = labels
                .iter()
                .position(|l| l.to_lowercase() == low)
                .or_else(|| labels.iter().position(|l| l.split(',').any(|p| p.trim().to_lowercase() == low)));
            match hit {
                Some(i) => Ok(Some(i)),
                None if labels.is_empty() => bail!("target '{s}' is a name, but no --labels file was given"),
                None => bail!("no class named '{s}' in the labels"),
            }
        }
    }
}

/// One row of summary.json / summary.csv.
#[derive(serde::Serialize, Clone, Debug)]
pub struct Row {
    file: String,
    target: Option<usize>,
    label: Option<String>,
    probability: Option<f64>,
    logit: Option<f64>,
    sum_relevance: Option<f64>,
    ratio: Option<f64>,
    positive_fraction: Option<f64>,
    seconds: Option<f64>,
    heatmap: Option<String>,
    error: Option<String>,
}

fn write_summary(out: &Path, rows: &[Row]) -> Result<()> {
    let json = serde_json::to_string_pretty(rows)?;
    std::fs::write(out.join("summary.json"), json)?;
    let mut csv = String::from(
        "file,target,label,probability,logit,sum_relevance,ratio,positive_fraction,seconds,heatmap,error\n",
    );
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{}\n",
            quote(&r.file),
            r.target.map(|t| t.to_string()).unwrap_or_default(),
            quote(r.label.as_deref().unwrap_or("")),
            opt(r.probability),
            opt(r.logit),
            opt(r.sum_relevance),
            opt(r.ratio),
            opt(r.positive_fraction),
            opt(r.seconds),
            quote(r.heatmap.as_deref().unwrap_or("")),
            quote(r.error.as_deref().unwrap_or("")),
        ));
    }
    std::fs::write(out.join("summary.csv"), csv)?;
    Ok(())
}

/// The method's short tag for file names.
fn method_tag(a: &ExplainArgs, name: &str) -> String {
    if a.method == "lrp" { name.to_string() } else { a.method.clone() }
}

/// Runs the picture pipeline. Returns whether every input succeeded.
pub fn explain_images(
    a: &ExplainArgs,
    g: &Graph,
    settings: &Settings,
    composite_name: &str,
    side: &Sidecar,
    side_path: Option<&Path>,
) -> Result<bool> {
    let pre = preprocess(&a.pre, side)?;
    let labels = labels(&a.pre, side, side_path)?;
    let mut settings = settings.clone();
    if settings.opts.bounds.is_none() {
        settings.opts.bounds = Some(pre.bounds());
    }
    let files = collect(&a.inputs)?;
    if files.is_empty() {
        bail!("no pictures found in {:?}", a.inputs);
    }
    let out = a.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let targets = match (&a.target, a.top_k) {
        (_, Some(k)) => Target::TopK(k),
        (t, None) => match parse_target(t.as_deref(), &labels)? {
            Some(i) => Target::Index(i),
            None => Target::Argmax,
        },
    };
    let versus = match &a.versus {
        Some(v) => Some(parse_target(Some(v), &labels)?.context("--versus needs a class")?),
        None => None,
    };
    let cmap = ColorMap::get(&a.cmap)?;
    let palette = cmap.palette(a.level);
    let norm: Norm = a.relevance_norm.parse().map_err(anyhow::Error::msg)?;
    let declared_batch_one =
        g.inputs.first().and_then(|i| i.dims.as_ref()).and_then(|d| d.first()).is_some_and(|d| *d == Dim::Fixed(1));
    let batch_size = if declared_batch_one { 1 } else { a.batch_size.max(1) };
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} pictures  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let tag = method_tag(a, composite_name);
    let mut rows: Vec<Row> = Vec::new();
    let mut heat_tiles: Vec<Rgb> = Vec::new();
    let mut all_ok = true;
    let mut prepared: Option<(Vec<usize>, Prepared)> = None;
    for chunk in files.chunks(batch_size) {
        let t0 = std::time::Instant::now();
        let mut pics = Vec::new();
        let mut names = Vec::new();
        for f in chunk {
            match pre.picture(f) {
                Ok(p) => {
                    pics.push(p);
                    names.push(f.clone());
                }
                Err(e) => {
                    all_ok = false;
                    bar.suspend(|| eprintln!("error: {}: {e}", f.display()));
                    rows.push(Row { file: f.display().to_string(), error: Some(e.to_string()), ..empty_row() });
                }
            }
        }
        bar.inc((chunk.len() - pics.len()) as u64);
        if pics.is_empty() {
            write_summary(&out, &rows)?;
            continue;
        }
        let result = (|| -> Result<Vec<Row>> {
            let x = pre.tensor(&pics)?;
            check_shape(g, x.shape())?;
            let x = Value::F(x.mapv(|v| v as f32));
            if prepared.as_ref().is_none_or(|(s, _)| s.as_slice() != x.shape()) {
                prepared = Some((x.shape().to_vec(), prepare(g, std::slice::from_ref(&x), &settings)?));
            }
            let p = &prepared.as_ref().context("prepared")?.1;
            // The logits of the batch, for argmax / top-k and probabilities.
            let lg = p.logits(vec![x.clone()])?;
            let per = lg.len() / lg.shape()[0].max(1);
            let logits: Vec<Vec<f64>> =
                lg.iter().map(|&v| v as f64).collect::<Vec<_>>().chunks(per.max(1)).map(|c| c.to_vec()).collect();
            let kmax = if let Target::TopK(k) = targets { k } else { 1 };
            let mut rows = Vec::new();
            for k in 0..kmax {
                let tgt: Vec<usize> = logits
                    .iter()
                    .map(|l| match targets {
                        Target::Index(i) => i,
                        Target::Argmax => argsort(l)[0],
                        Target::TopK(_) => argsort(l)[k.min(l.len() - 1)],
                    })
                    .collect();
                if let Some(&t) = tgt.iter().find(|&&t| t >= logits[0].len()) {
                    bail!("target {t} is out of range: the model has {} classes", logits[0].len());
                }
                let explain_for = |t: &[usize]| -> Result<ndarray::ArrayD<f64>> {
                    let r = match (super::explain::baseline_method(a)?, &x) {
                        (Some(b), Value::F(xf)) => attribute_baseline(p, &settings.method, &b, xf, Some(t), None, 0)?,
                        _ => attribute(p, &settings.method, vec![x.clone()], Some(t), &[])?.relevance[0]
                            .clone()
                            .context("no relevance")?,
                    };
                    Ok(r.mapv(|v| v as f64))
                };
                let vs = versus.map(|b| format!("_vs{b}")).unwrap_or_default();
                let bases: Vec<PathBuf> = names
                    .iter()
                    .zip(&tgt)
                    .map(|(n, t)| {
                        out.join(format!("{}_{t}{vs}_{tag}", n.file_stem().and_then(|s| s.to_str()).unwrap_or("input")))
                    })
                    .collect();
                // Outputs that exist are kept (unless --overwrite) and their relevance is read back
                // for the summary instead of being computed again.
                let skip = !a.overwrite
                    && bases.iter().all(|b| b.with_extension("png").exists() && b.with_extension("npy").exists());
                let rel = if skip {
                    None
                } else {
                    let mut rel = explain_for(&tgt)?;
                    if let Some(b) = versus {
                        rel = rel - explain_for(&vec![b; tgt.len()])?;
                    }
                    Some(rel)
                };
                let secs = t0.elapsed().as_secs_f64() / names.len() as f64;
                for (i, name) in names.iter().enumerate() {
                    let base = &bases[i];
                    let heat_path = base.with_extension("png");
                    let ri: ndarray::ArrayD<f64> = match &rel {
                        None => {
                            bar.suspend(|| eprintln!("skip: {} exists (use --overwrite)", heat_path.display()));
                            relprop::io::read_npy::<f64>(&base.with_extension("npy"))?.to_float()
                        }
                        Some(rel) => {
                            let ri = rel.index_axis(ndarray::Axis(0), i);
                            let ri = if pre.nhwc { ri.permuted_axes(ndarray::IxDyn(&[2, 0, 1])) } else { ri };
                            let ri = ri.to_owned();
                            let map = channel_sum(&ri.view())?;
                            let v = normalize(map.view(), norm);
                            let heat = colorize(v.view(), &palette);
                            write_png(&heat_path, &heat)?;
                            if a.overlay {
                                let name =
                                    format!("{}_overlay.png", base.file_name().and_then(|s| s.to_str()).unwrap_or("x"));
                                write_png(&base.with_file_name(name), &overlay(&pics[i], &heat, v.view(), 0.8))?;
                            }
                            if a.grid {
                                heat_tiles.push(heat);
                            }
                            relprop::io::write_npy(&base.with_extension("npy"), &Value::F(ri.clone()))?;
                            ri
                        }
                    };
                    let sr: f64 = ri.sum();
                    let pos: f64 = ri.iter().filter(|v| **v > 0.0).sum();
                    let abs: f64 = ri.iter().map(|v| v.abs()).sum();
                    let probs = relprop::labels::softmax(&logits[i]);
                    let logit = logits[i][tgt[i]];
                    rows.push(Row {
                        file: name.display().to_string(),
                        target: Some(tgt[i]),
                        label: labels.get(tgt[i]).cloned(),
                        probability: Some(probs[tgt[i]]),
                        logit: Some(logit),
                        sum_relevance: Some(sr),
                        ratio: Some(sr / logit),
                        positive_fraction: Some(if abs > 0.0 { pos / abs } else { 0.0 }),
                        seconds: Some(secs),
                        heatmap: Some(heat_path.display().to_string()),
                        error: None,
                    });
                }
            }
            Ok(rows)
        })();
        match result {
            Ok(r) => rows.extend(r),
            Err(e) => {
                all_ok = false;
                for n in &names {
                    bar.suspend(|| eprintln!("error: {}: {e:#}", n.display()));
                    rows.push(Row { file: n.display().to_string(), error: Some(format!("{e:#}")), ..empty_row() });
                }
            }
        }
        bar.inc(names.len() as u64);
        write_summary(&out, &rows)?;
    }
    bar.finish_and_clear();
    if a.grid && !heat_tiles.is_empty() {
        let cols = (heat_tiles.len() as f64).sqrt().ceil() as usize;
        write_png(&out.join("grid.png"), &relprop::render::grid(&heat_tiles, cols)?)?;
    }
    println!("{:<28} {:>6} {:<24} {:>7} {:>9} {:>9}", "file", "target", "label", "prob", "logit", "R/logit");
    for r in &rows {
        match &r.error {
            Some(e) => println!("{:<28} error: {e}", short(&r.file)),
            None => println!(
                "{:<28} {:>6} {:<24} {:>7.3} {:>9.3} {:>9.4}",
                short(&r.file),
                r.target.unwrap_or(0),
                short(r.label.as_deref().unwrap_or("")),
                r.probability.unwrap_or(0.0),
                r.logit.unwrap_or(0.0),
                r.ratio.unwrap_or(0.0)
            ),
        }
    }
    println!("outputs in {} (summary.json, summary.csv)", out.display());
    Ok(all_ok)
}

fn short(s: &str) -> String {
    let s = Path::new(s).file_name().and_then(|f| f.to_str()).unwrap_or(s);
    s.chars().take(24).collect()
}

fn argsort(v: &[f64]) -> Vec<usize> {
    let mut i: Vec<usize> = (0..v.len()).collect();
    i.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    i
}

fn empty_row() -> Row {
    Row {
        file: String::new(),
        target: None,
        label: None,
        probability: None,
        logit: None,
        sum_relevance: None,
        ratio: None,
        positive_fraction: None,
        seconds: None,
        heatmap: None,
        error: None,
    }
}
