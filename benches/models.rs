//! `cargo bench`: the measurement `relprop bench` prints (forward, gradient and LRP per composite,
//! with ratios and peak memory, modes interleaved in one process) for the bundled
//! EfficientNet-Lite0 and for the torchvision models in `bench-models/` where
//! `tools/reference/export_bench_models.py` wrote them (not committed: ~0.9 GB).
//!
//! `cargo bench -- resnet50` runs the models whose name contains the filter;
//! `RELPROP_BENCH_BATCH=1` (default `1,8`), `RELPROP_BENCH_THREADS` (default 2) and
//! `RELPROP_BENCH_REPEATS` (default 5) change the run. `tools/reference/bench.py` adds onnxruntime,
//! zennit and PyTorch on the same files and writes the table of `docs/benchmarks.md`.

use relprop::bench::{Config, header, run_bench};
use std::path::{Path, PathBuf};

// As in the relprop binary: the passes allocate and free many large buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; the first other argument filters the models by name.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let threads = env_or("RELPROP_BENCH_THREADS", 2usize);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let batch: Vec<usize> = std::env::var("RELPROP_BENCH_BATCH")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .map(|b| b.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("RELPROP_BENCH_BATCH: {e}"))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut models: Vec<PathBuf> = vec![root.join("assets/models/efficientnet_lite0.onnx")];
    models.extend(
        ["resnet50", "densenet121", "vgg16"]
            .iter()
            .map(|m| root.join("bench-models").join(format!("{m}.onnx")))
            .filter(|p| p.exists()),
    );
    let cfg = Config {
        shape: None,
        batch,
        composites: vec!["epsilon_plus_flat".into(), "epsilon_gamma_box".into()],
        repeats: env_or("RELPROP_BENCH_REPEATS", 5usize),
        forward_only: false,
    };
    for path in models {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let mut g = relprop::onnx::load(&path)?;
        // Every batch size, also on models exported with a fixed batch of 1.
        g.free_batch();
        println!("model {}  threads {threads}", path.display());
        println!("{}", header());
        run_bench(&g, &cfg, |rows| rows.iter().for_each(|r| println!("{r}")))?;
    }
    Ok(())
}
