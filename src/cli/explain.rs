//! `relprop explain`: attributions for .npy inputs.

use super::run::{Precision, read_inputs};
use anyhow::{Context, Result, bail};
use clap::Args;
use relprop::attribution::{Baseline, Method, Settings, attribute, attribute_baseline, prepare};
use relprop::canonize::Mode;
use relprop::composite::{Composite, Override, Params};
use relprop::graph::{Graph, input_warnings};
use relprop::rules::Bounds;
use relprop::rules::grad::RuleOpts;
use relprop::tensor::{Float, Value};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Clone)]
pub struct ExplainArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Pictures (PNG/JPEG) or directories of pictures (searched recursively, sorted).
    pub inputs: Vec<PathBuf>,
    /// Input .npy for the first graph input, or NAME=FILE.npy (repeat for several inputs).
    #[arg(long, short)]
    pub input: Vec<String>,
    /// Preprocessing of pictures (and --mean/--std for z^B bounds).
    #[command(flatten)]
    pub pre: super::images::PreprocessFlags,
    /// Output directory for heatmaps, relevance and the summary (pictures).
    #[arg(long, default_value = "relprop-out")]
    pub out: PathBuf,
    /// One heatmap for each of the K best classes.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Contrastive: relevance for --target minus relevance for this class.
    #[arg(long)]
    pub versus: Option<String>,
    /// Heatmap normalisation: symmetric, absolute or unaligned.
    #[arg(long, default_value = "symmetric")]
    pub relevance_norm: String,
    /// Colour map: bwr, coldnhot, seismic, gray, hot, cold, wred, wblue, france, coolio, coleus, or a zennit colour-map source.
    #[arg(long, default_value = "bwr")]
    pub cmap: String,
    /// Colour-map level (zennit's): below 1 narrows the colour range, above 1 saturates earlier.
    #[arg(long, default_value_t = 1.0)]
    pub level: f64,
    /// Also write the heatmap blended onto the cropped picture.
    #[arg(long)]
    pub overlay: bool,
    /// Also write grid.png with every heatmap.
    #[arg(long)]
    pub grid: bool,
    /// Pictures per forward/backward batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Rewrite outputs that already exist.
    #[arg(long)]
    pub overwrite: bool,
    /// Explain a sentence (whitespace-tokenised with --vocab) instead of pictures or tensors.
    #[arg(long)]
    pub text: Option<String>,
    /// Vocabulary for --text: one token per line, the line number (from 0) is the id.
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// Lower-case --text before looking words up.
    #[arg(long)]
    pub lowercase: bool,
    /// Id for words missing from the vocabulary (default: reject them, naming the word).
    #[arg(long)]
    pub unk_id: Option<i64>,
    /// Explain a 16 kHz mono WAV file cut into Silero-VAD frames (--chunk samples plus --context before).
    #[arg(long)]
    pub wav: Option<PathBuf>,
    /// Samples per audio frame (without context).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Context samples before each audio frame.
    #[arg(long, default_value_t = 64)]
    pub context: usize,
    /// ε of the LSTM rule (Arras et al.).
    #[arg(long, default_value_t = 1e-3)]
    pub lstm_epsilon: f64,
    /// Bias factor of the LSTM rule and of ε on dense layers: 0 (bias and stabiliser absorb their
    /// share) or 1 (their share is spread over the inputs, conserving relevance).
    #[arg(long, default_value_t = 0.0)]
    pub lstm_bias_factor: f64,
    /// Attribution method: lrp, gradient, input_x_gradient, smoothgrad, integrated_gradients,
    /// occlusion or random. SmoothGrad and integrated gradients use the LRP composite's modified
    /// gradient when --composite is given (as zennit's attributors), the plain gradient otherwise.
    #[arg(long, default_value = "lrp")]
    pub method: String,
    /// SmoothGrad noise level: noise std = level × (max − min) per sample.
    #[arg(long, default_value_t = 0.1)]
    pub noise_level: f64,
    /// SmoothGrad / integrated-gradients samples.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Integrated-gradients baseline (.npy shaped like the input; default zeros).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Occlusion window.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Occlusion stride.
    #[arg(long, default_value_t = 8)]
    pub stride: usize,
    /// LRP composite (epsilon_plus, epsilon_plus_flat, epsilon_alpha2_beta1, epsilon_alpha2_beta1_flat,
    /// epsilon_gamma_box, excitation_backprop, guided_backprop, deconvnet, epsilon, gradient).
    #[arg(long)]
    pub composite: Option<String>,
    /// Rule override: OPTYPE=rule, name:GLOB=rule or #N=rule (repeatable; first match wins).
    #[arg(long = "rule")]
    pub rules: Vec<String>,
    /// TOML file with overrides ([[rule]] match = "...", rule = "...") and optionally composite = "...".
    #[arg(long)]
    pub rules_file: Option<PathBuf>,
    /// Target: argmax (default), a class index per sample (comma-separated), or a class name from --labels.
    #[arg(long)]
    pub target: Option<String>,
    /// Write the input relevance (same shape as the input) here.
    #[arg(long)]
    pub out_npy: Option<PathBuf>,
    /// z^B lower bounds per channel (instead of --mean/--std).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub low: Option<Vec<f64>>,
    /// z^B upper bounds per channel.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub high: Option<Vec<f64>>,
    /// Canonization: full or minimal.
    #[arg(long, default_value = "full")]
    pub canonize: String,
    /// Leave biases out of the backward pass.
    #[arg(long)]
    pub ignore_bias: bool,
    /// ε of the dense layers (and of every layer for --composite epsilon).
    #[arg(long, default_value_t = 1e-6)]
    pub epsilon: f64,
    /// γ of the conv layers in epsilon_gamma_box.
    #[arg(long, default_value_t = 0.25)]
    pub gamma: f64,
    /// Also write the relevance at these intermediate values (by value name) as NAME.npy next to --out-npy.
    #[arg(long = "keep")]
    pub keep: Vec<String>,
    /// Arithmetic precision.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
}

/// z^B bounds from the flags.
pub fn bounds(a: &ExplainArgs) -> Result<Option<Bounds>> {
    Ok(match (&a.low, &a.high, &a.pre.mean, &a.pre.std) {
        (Some(l), Some(h), _, _) => Some(Bounds { low: l.clone(), high: h.clone() }),
        (None, None, Some(m), Some(s)) => {
            if m.len() != s.len() {
                bail!("--mean has {} values, --std {}", m.len(), s.len());
            }
            Some(Bounds {
                low: m.iter().zip(s).map(|(m, s)| -m / s).collect(),
                high: m.iter().zip(s).map(|(m, s)| (1.0 - m) / s).collect(),
            })
        }
        (None, None, None, None) => None,
        _ => bail!("give both --low and --high, or both --mean and --std"),
    })
}

/// The settings the flags describe.
pub fn settings(a: &ExplainArgs, default_composite: Option<&str>) -> Result<(Settings, String)> {
    let mut name =
        a.composite.clone().or(default_composite.map(str::to_string)).unwrap_or_else(|| "epsilon_plus_flat".into());
    let mut overrides: Vec<Override> = Vec::new();
    for r in &a.rules {
        overrides.push(r.parse().map_err(anyhow::Error::msg).with_context(|| format!("--rule {r}"))?);
    }
    if let Some(f) = &a.rules_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let (base, ov) = Composite::overrides_from_toml(&text).with_context(|| format!("in {}", f.display()))?;
        if let Some(b) = base {
            name = b;
        }
        overrides.extend(ov);
    }
    let mut comp = Composite::named(&name, &Params { epsilon: a.epsilon, gamma: a.gamma })?;
    comp.overrides = overrides;
    let method = match a.method.as_str() {
        "smoothgrad" | "integrated_gradients" if a.composite.is_some() => Method::Lrp(Box::new(comp)),
        "smoothgrad" | "integrated_gradients" | "occlusion" | "random" => Method::Gradient,
        m => Method::parse(m, comp)?,
    };
    let mode: Mode = a.canonize.parse().map_err(anyhow::Error::msg)?;
    let s = Settings {
        method,
        canonize: mode,
        opts: RuleOpts {
            ignore_bias: a.ignore_bias,
            bounds: bounds(a)?,
            lstm_epsilon: a.lstm_epsilon,
            bias_factor: a.lstm_bias_factor,
            ..RuleOpts::default()
        },
        tolerance: if a.precision == Precision::F64 { 1e-9 } else { 1e-4 },
    };
    Ok((s, name))
}

/// The baseline method `--method` names, if any.
pub fn baseline_method(a: &ExplainArgs) -> Result<Option<Baseline>> {
    Ok(match a.method.as_str() {
        "smoothgrad" => Some(Baseline::SmoothGrad { noise_level: a.noise_level, samples: a.samples }),
        "integrated_gradients" => Some(Baseline::IntegratedGradients { samples: a.samples }),
        "occlusion" => Some(Baseline::Occlusion { window: a.window, stride: a.stride }),
        "random" => Some(Baseline::Random),
        _ => None,
    })
}

/// Parses `--target`.
pub fn targets(spec: &Option<String>) -> Result<Option<Vec<usize>>> {
    match spec.as_deref() {
        None | Some("argmax") => Ok(None),
        Some(s) => Ok(Some(
            s.split(',')
                .map(|t| t.trim().parse::<usize>().with_context(|| format!("--target: '{t}' is not a class index")))
                .collect::<Result<_>>()?,
        )),
    }
}

fn explain_typed<T: Float>(a: &ExplainArgs, g: &Graph) -> Result<()> {
    let inputs = read_inputs::<T>(g, &a.input)?;
    for w in input_warnings(g, &inputs) {
        eprintln!("warning: {w}");
    }
    let (s, _) = settings(a, None)?;
    let p = prepare(g, &inputs, &s)?;
    for line in &p.report {
        eprintln!("canonize: {line}");
    }
    eprintln!("canonize: forward deviation {:.2e} (relative)", p.deviation);
    let t0 = std::time::Instant::now();
    let tg = targets(&a.target)?;
    let e = match baseline_method(a)? {
        None => attribute(&p, &s.method, inputs, tg.as_deref(), &a.keep)?,
        Some(b) => {
            // Baselines need only the logits for their targets and scores, not a full explanation.
            let Some(Value::F(x)) = inputs.first() else {
                bail!("--method {} needs a floating-point first input", a.method)
            };
            let base = match &a.baseline {
                Some(f) => Some(relprop::io::read_npy::<T>(f)?.to_float()),
                None => None,
            };
            let output = p.logits(inputs.clone())?;
            let targets = tg.clone().unwrap_or_else(|| relprop::propagate::argmax_rows(&output));
            let per = output.len() / output.shape()[0].max(1);
            let flat: Vec<T> = output.iter().copied().collect();
            let scores = targets
                .iter()
                .enumerate()
                .map(|(i, &t)| flat.get(i * per + t).map(|v| v.f64()).unwrap_or(f64::NAN))
                .collect();
            let r = attribute_baseline(&p, &s.method, &b, x, Some(&targets), base.as_ref(), 0)?;
            relprop::propagate::Explanation {
                relevance: vec![Some(r)],
                output,
                targets,
                scores,
                intermediate: Default::default(),
                dropped: 0.0,
            }
        }
    };
    let dt = t0.elapsed().as_secs_f64();
    let rel = e.relevance.iter().flatten().next().context("the model has no floating-point input to explain")?;
    let n = rel.shape()[0];
    let per = rel.len() / n.max(1);
    let flat: Vec<f64> = rel.iter().map(|v| v.f64()).collect();
    println!("{:>6} {:>8} {:>12} {:>12} {:>9}", "sample", "target", "logit", "sum R", "R/logit");
    for i in 0..n {
        let sr: f64 = flat[i * per..(i + 1) * per].iter().sum();
        println!("{i:>6} {:>8} {:>12.5} {:>12.5} {:>9.4}", e.targets[i], e.scores[i], sr, sr / e.scores[i]);
    }
    if e.dropped != 0.0 {
        eprintln!("note: relevance {:.4e} fell on padding and was dropped", e.dropped);
    }
    eprintln!("explained in {:.1} ms ({})", dt * 1e3, T::NAME);
    if let Some(out) = &a.out_npy {
        relprop::io::write_npy(out, &Value::F(rel.clone())).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
        for (name, r) in &e.intermediate {
            let safe: String = name
                .chars()
                .map(|c| if c.is_alphanumeric() || c == '.' || c == '_' || c == '-' { c } else { '_' })
                .collect();
            let path = out.with_file_name(format!("{safe}.npy"));
            relprop::io::write_npy(&path, &Value::F(r.clone()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

pub fn explain(a: ExplainArgs) -> Result<ExitCode> {
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().ok();
    }
    let g = relprop::onnx::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    if a.text.is_some() {
        return super::sequence::explain_text(&a, &g);
    }
    if a.wav.is_some() {
        return super::sequence::explain_audio(&a, &g);
    }
    if !a.inputs.is_empty() {
        if !a.input.is_empty() {
            bail!("give pictures or --input .npy files, not both");
        }
        let (side, side_path) = super::images::sidecar(&a.model)?;
        let (s, name) = settings(&a, side.composite.as_deref())?;
        let ok = super::images::explain_images(&a, &g, &s, &name, &side, side_path.as_deref())?;
        return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    if a.input.is_empty() {
        bail!("nothing to explain: give pictures, or --input FILE.npy");
    }
    match a.precision {
        Precision::F32 => explain_typed::<f32>(&a, &g)?,
        Precision::F64 => explain_typed::<f64>(&a, &g)?,
    }
    Ok(ExitCode::SUCCESS)
}
