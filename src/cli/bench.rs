//! `relprop bench`: forward, gradient and LRP times per composite, interleaved in one process so
//! that the machine's drift hits every mode alike, with peak memory per mode.

use anyhow::{Context, Result, bail};
use clap::Args;
use relprop::attribution::{Method, Settings, attribute, prepare};
use relprop::canonize::Mode;
use relprop::composite::{Composite, Params};
use relprop::graph::{ElemKind, prepare_consts, run};
use relprop::rules::Bounds;
use relprop::rules::grad::RuleOpts;
use relprop::tensor::Value;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Input shape without the batch axis (default: the model's declared shape).
    #[arg(long, value_delimiter = ',')]
    shape: Option<Vec<usize>>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// LRP composites to time.
    #[arg(long, value_delimiter = ',', default_value = "epsilon_plus_flat,epsilon_gamma_box")]
    composites: Vec<String>,
    /// Timed repetitions per mode (after a warm-up of at least one round and half a second); the
    /// median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Time the forward pass only (no canonization, gradient or LRP): for alternating short runs
    /// with another runtime.
    #[arg(long)]
    forward_only: bool,
}

/// Resets the process's peak-RSS counter (Linux); returns whether it worked. Memory the last
/// mode freed goes back to the system first: mimalloc returns it only after a delay, and the
/// counter starts from the resident size, so a mode's peak included what the one before it had
/// left (VGG-16's forward read 2 683 MiB, above its gradient's 2 054).
fn reset_peak() -> bool {
    // SAFETY: mi_collect only frees memory that no live allocation uses; it runs on every thread
    // that allocates (the caller and the pool's workers), each collecting its own heap.
    rayon::broadcast(|_| unsafe { libmimalloc_sys::mi_collect(true) });
    // SAFETY: as above, for this thread's heap.
    unsafe { libmimalloc_sys::mi_collect(true) };
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident memory since the last reset, in MiB (Linux).
fn peak_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn bench(a: BenchArgs) -> Result<ExitCode> {
    rayon::ThreadPoolBuilder::new().num_threads(a.threads).build_global().ok();
    let mut g = relprop::onnx::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    // Benchmarks run every batch size, also on models exported with a fixed batch of 1.
    g.free_batch();
    if g.inputs.len() != 1 || g.inputs[0].kind != ElemKind::Float {
        bail!("bench needs a model with one floating-point input");
    }
    let declared: Vec<usize> = g.inputs[0]
        .dims
        .as_ref()
        .map(|d| d.iter().skip(1).map(|d| if let relprop::graph::Dim::Fixed(n) = d { *n } else { 0 }).collect())
        .unwrap_or_default();
    let shape = a.shape.clone().unwrap_or(declared);
    if shape.is_empty() || shape.contains(&0) {
        bail!("the model's input shape is not fixed; give --shape C,H,W");
    }
    let consts = prepare_consts::<f32>(&g);
    if !a.json {
        println!(
            "model {}  input [N, {}]  threads {}",
            a.model.display(),
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
            a.threads
        );
        println!("{:>5} {:<28} {:>11} {:>8} {:>8} {:>10}", "batch", "mode", "median ms", "÷ grad", "÷ fwd", "peak MiB");
    }
    for &n in &a.batch {
        let mut full = vec![n];
        full.extend(&shape);
        let len: usize = full.iter().product();
        // A deterministic input in [-1, 1).
        let data: Vec<f32> = (0..len).map(|i| ((i * 2654435761) % 2000) as f32 / 1000.0 - 1.0).collect();
        let x = Value::F(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&full), data)?);
        let opts = RuleOpts { bounds: Some(Bounds { low: vec![-1.0], high: vec![1.0] }), ..RuleOpts::default() };
        let mut modes: Vec<(String, Option<(relprop::attribution::Prepared, Method)>)> = vec![("forward".into(), None)];
        if !a.forward_only {
            let grad = Method::Gradient;
            let s = Settings { method: grad.clone(), canonize: Mode::Full, opts: opts.clone(), tolerance: 1e-4 };
            let base = prepare(&g, std::slice::from_ref(&x), &s)?;
            // One canonization and one converted copy of the weights serve every method.
            for c in &a.composites {
                let m = Method::Lrp(Box::new(Composite::named(c, &Params::default())?));
                modes.push((format!("lrp {c}"), Some((base.with_method(&m, opts.clone())?, m))));
            }
            modes.insert(1, ("gradient".into(), Some((base, grad))));
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        let call = |m: &Option<(relprop::attribution::Prepared, Method)>| -> Result<()> {
            match m {
                None => {
                    run(&g, &consts, vec![x.clone()])?;
                }
                Some((p, method)) => {
                    attribute(p, method, vec![x.clone()], None, &[])?;
                }
            }
            Ok(())
        };
        // Warm-up: at least one round and half a second. A fresh process's first passes fault in
        // memory and start the pool's threads; with one warm-up pass EfficientNet-Lite0's batch-1
        // forward (5 ms) read 1.4–3.3× onnxruntime's warm session between rounds.
        let warm = Instant::now();
        loop {
            for (_, m) in &modes {
                call(m)?;
            }
            if warm.elapsed().as_secs_f64() >= 0.5 {
                break;
            }
        }
        for _ in 0..a.repeats {
            for (k, (_, m)) in modes.iter().enumerate() {
                let t0 = Instant::now();
                call(m)?;
                times[k].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        // Peak memory in one more untimed pass per mode: the reset returns freed memory to the
        // system, and the timed passes would pay for faulting it back in.
        let mut peaks: Vec<f64> = vec![0.0; modes.len()];
        for (k, (_, m)) in modes.iter().enumerate() {
            let can_reset = reset_peak();
            call(m)?;
            if can_reset {
                peaks[k] = peak_mib().unwrap_or(0.0);
            }
        }
        let med: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        for (k, (name, _)) in modes.iter().enumerate() {
            if a.json {
                println!(
                    "{{\"model\":\"{}\",\"batch\":{n},\"threads\":{},\"mode\":\"{name}\",\"median_ms\":{:.3},\"peak_mib\":{:.1}}}",
                    a.model.display(),
                    a.threads,
                    med[k],
                    peaks[k]
                );
            } else {
                // Without a gradient mode (--forward-only) there is no ratio to it.
                let by_grad = if a.forward_only { "–".to_string() } else { format!("{:.2}", med[k] / med[1]) };
                println!("{n:>5} {name:<28} {:>11.2} {by_grad:>8} {:>8.2} {:>10.0}", med[k], med[k] / med[0], peaks[k]);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
