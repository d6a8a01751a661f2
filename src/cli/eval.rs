//! `relprop eval`: region perturbation (MoRF / LeRF), AOPC, ABPC and conservation for several
//! methods on the user's model and pictures, as a table, a CSV of every curve and a plot.

use super::explain::{ExplainArgs, settings};
use super::images::{collect, preprocess, sidecar};
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use relprop::attribution::{Baseline, Method, Prepared, Settings, attribute, attribute_baseline, prepare};
use relprop::composite::{Composite, Params};
use relprop::evaluate::{Config, Order, Perturb, abpc, aopc, curve, mean_se};
use relprop::tensor::Value;
use std::process::ExitCode;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    base: ExplainArgs,
    /// Methods: lrp:COMPOSITE, gradient, input_x_gradient, smoothgrad, integrated_gradients, occlusion, random.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lrp:epsilon_plus_flat,lrp:epsilon_gamma_box,gradient,smoothgrad,random"
    )]
    methods: Vec<String>,
    /// Region side in pixels (1: pixel flipping).
    #[arg(long, default_value_t = 8)]
    patch: usize,
    /// Regions removed per curve.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Replacement: mean, black, blur or uniform.
    #[arg(long, default_value = "mean")]
    perturb: String,
}

/// Per method: AOPC, ABPC and Σ R / logit per picture, and the summed curves.
#[derive(Default)]
struct Scores {
    aopc: Vec<f64>,
    abpc: Vec<f64>,
    ratio: Vec<f64>,
    morf: Vec<f64>,
    lerf: Vec<f64>,
}

struct MethodRun {
    name: String,
    prepared: Option<Prepared>,
    method: Method,
    baseline: Option<Baseline>,
}

const COLORS: [[u8; 3]; 8] = [
    [214, 39, 40],
    [31, 119, 180],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

pub fn eval(a: EvalArgs) -> Result<ExitCode> {
    let b = &a.base;
    if let Some(t) = b.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().ok();
    }
    let mut g = relprop::onnx::load(&b.model).with_context(|| format!("loading {}", b.model.display()))?;
    // Perturbed copies are evaluated in batches, also for models exported with a fixed batch of 1.
    g.free_batch();
    let (side, _) = sidecar(&b.model)?;
    let pre = preprocess(&b.pre, &side)?;
    let bounds = pre.bounds();
    let perturb = Perturb::parse(&a.perturb, &bounds.low, &bounds.high)?;
    let files = collect(&b.inputs)?;
    if files.is_empty() {
        bail!("no pictures given");
    }
    let (base_settings, _) = settings(b, side.composite.as_deref())?;
    let mut runs: Vec<MethodRun> = Vec::new();
    for m in &a.methods {
        let (method, baseline) = match m.as_str() {
            s if s.starts_with("lrp:") => (
                Method::Lrp(Box::new(Composite::named(&s[4..], &Params { epsilon: b.epsilon, gamma: b.gamma })?)),
                None,
            ),
            "gradient" => (Method::Gradient, None),
            "input_x_gradient" => (Method::InputXGradient, None),
            "smoothgrad" => {
                (Method::Gradient, Some(Baseline::SmoothGrad { noise_level: b.noise_level, samples: b.samples }))
            }
            "integrated_gradients" => (Method::Gradient, Some(Baseline::IntegratedGradients { samples: b.samples })),
            "occlusion" => (Method::Gradient, Some(Baseline::Occlusion { window: b.window, stride: b.stride })),
            "random" => (Method::Gradient, Some(Baseline::Random)),
            o => bail!(
                "unknown method '{o}' (lrp:COMPOSITE, gradient, input_x_gradient, smoothgrad, integrated_gradients, occlusion, random)"
            ),
        };
        runs.push(MethodRun { name: m.clone(), prepared: None, method, baseline });
    }
    let cfg = Config { patch: a.patch, steps: a.steps, perturb, seed: 7, batch: b.batch_size.max(1) };
    let bar = ProgressBar::new((files.len() * runs.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut scorer: Option<Prepared> = None;
    let mut results: Vec<Scores> = (0..runs.len()).map(|_| Scores::default()).collect();
    let mut csv = String::from("method,file,order,step,logit\n");
    let t_all = std::time::Instant::now();
    for f in &files {
        let pic = match pre.picture(f) {
            Ok(p) => p,
            Err(e) => {
                bar.suspend(|| eprintln!("error: {}: {e}", f.display()));
                bar.inc(runs.len() as u64);
                continue;
            }
        };
        let x64 = pre.tensor(std::slice::from_ref(&pic))?;
        let x = x64.mapv(|v| v as f32);
        let xv = Value::F(x.clone());
        if scorer.is_none() {
            let s = Settings { method: Method::Gradient, ..base_settings.clone() };
            let mut s = s;
            s.opts.bounds = Some(bounds.clone());
            scorer = Some(prepare(&g, std::slice::from_ref(&xv), &s)?);
        }
        let sc = scorer.as_ref().context("scorer")?;
        let logits0 = sc.logits(vec![xv.clone()])?;
        let target = match super::explain::targets(&b.target)? {
            Some(t) => t[0],
            None => logits0.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0,
        };
        let logit = logits0.iter().nth(target).copied().unwrap_or(0.0) as f64;
        let x3 = x64.index_axis(ndarray::Axis(0), 0).to_owned().into_dimensionality::<ndarray::Ix3>()?;
        for (k, run) in runs.iter_mut().enumerate() {
            bar.set_message(format!("{} on {}", run.name, f.file_name().and_then(|s| s.to_str()).unwrap_or("")));
            if run.prepared.is_none() {
                let mut s = Settings { method: run.method.clone(), ..base_settings.clone() };
                s.opts.bounds = Some(bounds.clone());
                // The scorer's canonized plan serves every method (one canonization, one copy of the weights).
                run.prepared = Some(match &scorer {
                    Some(sc) => sc.with_method(&s.method, s.opts.clone())?,
                    None => prepare(&g, std::slice::from_ref(&xv), &s)?,
                });
            }
            let p = run.prepared.as_ref().context("prepared")?;
            let rel = match &run.baseline {
                None => attribute(p, &run.method, vec![xv.clone()], Some(&[target]), &[])?.relevance[0]
                    .clone()
                    .context("relevance")?,
                Some(bl) => attribute_baseline(p, &run.method, bl, &x, Some(&[target]), None, 11)?,
            };
            let r3 = rel
                .mapv(|v| v as f64)
                .index_axis(ndarray::Axis(0), 0)
                .to_owned()
                .into_dimensionality::<ndarray::Ix3>()?;
            let mut score = |imgs: &[ndarray::Array3<f64>]| -> relprop::Result<Vec<f64>> {
                let views: Vec<_> = imgs.iter().map(|i| i.view().insert_axis(ndarray::Axis(0))).collect();
                let batch = ndarray::concatenate(ndarray::Axis(0), &views)
                    .map_err(|e| relprop::Error::Invalid(e.to_string()))?;
                let out = sc.logits(vec![Value::F(batch.mapv(|v| v as f32).into_dyn())])?;
                let per = out.len() / imgs.len();
                Ok(out.iter().map(|&v| v as f64).collect::<Vec<_>>().chunks(per).map(|c| c[target]).collect())
            };
            let morf = curve(&x3, &r3, Order::MoRF, &cfg, &mut score)?;
            let lerf = curve(&x3, &r3, Order::LeRF, &cfg, &mut score)?;
            let res = &mut results[k];
            res.aopc.push(aopc(&morf));
            res.abpc.push(abpc(&morf, &lerf));
            res.ratio.push(r3.sum() / logit);
            if res.morf.is_empty() {
                res.morf = vec![0.0; morf.len()];
                res.lerf = vec![0.0; lerf.len()];
            }
            res.morf.iter_mut().zip(&morf).for_each(|(acc, v)| *acc += v);
            res.lerf.iter_mut().zip(&lerf).for_each(|(acc, v)| *acc += v);
            for (order, c) in [("morf", &morf), ("lerf", &lerf)] {
                for (step, v) in c.iter().enumerate() {
                    csv.push_str(&format!("{},\"{}\",{order},{step},{v:.6}\n", run.name, f.display()));
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let secs = t_all.elapsed().as_secs_f64();
    std::fs::create_dir_all(&b.out)?;
    std::fs::write(b.out.join("eval.csv"), csv)?;
    let best = results
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.abpc.is_empty())
        .max_by(|x, y| mean_se(&x.1.abpc).0.total_cmp(&mean_se(&y.1.abpc).0))
        .map(|(i, _)| i);
    println!(
        "{} picture(s), patch {}, {} steps, perturbation {}; {secs:.1} s",
        files.len(),
        a.patch,
        a.steps,
        a.perturb
    );
    println!("{:<28} {:>20} {:>20} {:>18}", "method", "AOPC (MoRF)", "ABPC", "Σ R / logit");
    let mut series = Vec::new();
    for (k, (run, r)) in runs.iter().zip(&results).enumerate() {
        let (am, ase) = mean_se(&r.aopc);
        let (bm, bse) = mean_se(&r.abpc);
        let (cm, cse) = mean_se(&r.ratio);
        let mark = if Some(k) == best { "  ← best ABPC" } else { "" };
        println!("{:<28} {am:>11.3} ± {ase:<6.3} {bm:>11.3} ± {bse:<6.3} {cm:>9.3} ± {cse:<6.3}{mark}", run.name);
        let n = r.aopc.len().max(1) as f64;
        let color = COLORS[k % COLORS.len()];
        series.push(relprop::render::Series {
            label: format!("{} MoRF", run.name),
            color,
            dashed: false,
            values: r.morf.iter().map(|v| v / n).collect(),
        });
        series.push(relprop::render::Series {
            label: format!("{} LeRF", run.name),
            color,
            dashed: true,
            values: r.lerf.iter().map(|v| v / n).collect(),
        });
    }
    let img = relprop::render::line_plot(&series, "Region perturbation", "regions removed", "target logit");
    relprop::render::write_png(&b.out.join("eval.png"), &img)?;
    println!("wrote {} and {}", b.out.join("eval.csv").display(), b.out.join("eval.png").display());
    Ok(ExitCode::SUCCESS)
}
