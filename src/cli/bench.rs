//! `relprop bench`: forward, gradient and LRP times per composite, interleaved in one process so
//! that the machine's drift hits every mode alike, with peak memory per mode (the measurement is
//! [`relprop::bench`]; this prints it).

use anyhow::{Context, Result};
use clap::Args;
use relprop::bench::{Config, check, run_bench};
use std::path::PathBuf;
use std::process::ExitCode;

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

pub fn bench(a: BenchArgs) -> Result<ExitCode> {
    rayon::ThreadPoolBuilder::new().num_threads(a.threads).build_global().ok();
    let mut g = relprop::onnx::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    // Benchmarks run every batch size, also on models exported with a fixed batch of 1.
    g.free_batch();
    let cfg = Config {
        shape: a.shape.clone(),
        batch: a.batch.clone(),
        composites: a.composites.clone(),
        repeats: a.repeats,
        forward_only: a.forward_only,
    };
    let shape = check(&g, &cfg).with_context(|| format!("benchmarking {}", a.model.display()))?;
    if !a.json {
        println!(
            "model {}  input [N, {}]  threads {}",
            a.model.display(),
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
            a.threads
        );
        println!("{}", relprop::bench::header());
    }
    let model = a.model.display().to_string();
    run_bench(&g, &cfg, |rows| {
        for r in rows {
            if a.json {
                println!(
                    "{{\"model\":{},\"batch\":{},\"threads\":{},\"mode\":\"{}\",\"median_ms\":{:.3},\"peak_mib\":{:.1}}}",
                    serde_json::to_string(&model).unwrap_or_default(),
                    r.batch,
                    a.threads,
                    r.mode,
                    r.median_ms,
                    r.peak_mib.unwrap_or(0.0)
                );
            } else {
                println!("{r}");
            }
        }
    })
    .with_context(|| format!("benchmarking {}", a.model.display()))?;
    Ok(ExitCode::SUCCESS)
}
