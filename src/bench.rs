//! Forward, gradient and LRP passes of one model timed side by side, with peak memory per mode:
//! the measurement behind `relprop bench` and `cargo bench`.
//!
//! The modes run interleaved in one process (one pass of each per round), so that the machine's
//! drift, which on shared machines is larger than most differences worth measuring, hits every
//! mode alike; the ratios between modes of one run are what to compare.

use crate::attribution::{Method, Prepared, Settings, attribute, prepare};
use crate::canonize::Mode;
use crate::composite::{Composite, Params};
use crate::graph::{Dim, ElemKind, Graph, prepare_consts, run};
use crate::rules::Bounds;
use crate::rules::grad::RuleOpts;
use crate::tensor::Value;
use crate::{Error, Result};
use std::time::Instant;

/// What to time.
#[derive(Clone, Debug)]
pub struct Config {
    /// Input shape without the batch axis; `None` takes the model's declared one.
    pub shape: Option<Vec<usize>>,
    /// Batch sizes, each timed on its own.
    pub batch: Vec<usize>,
    /// LRP composites to time (by name, see [`Composite::named`]).
    pub composites: Vec<String>,
    /// Timed passes per mode after the warm-up; the median is reported.
    pub repeats: usize,
    /// Time the forward pass alone (no canonization, gradient or LRP).
    pub forward_only: bool,
}

/// One mode's result at one batch size.
#[derive(Clone, Debug)]
pub struct Row {
    /// Batch size.
    pub batch: usize,
    /// `forward`, `gradient` or `lrp <composite>`.
    pub mode: String,
    /// Median time of one pass.
    pub median_ms: f64,
    /// This mode's time over the gradient's (absent with `forward_only`).
    pub by_grad: Option<f64>,
    /// This mode's time over the forward pass's.
    pub by_fwd: f64,
    /// Peak resident memory of the process during one untimed pass of this mode, where the
    /// system can say (Linux).
    pub peak_mib: Option<f64>,
}

/// The header of the table whose lines [`Row`]'s `Display` writes.
pub fn header() -> String {
    format!("{:>5} {:<28} {:>11} {:>8} {:>8} {:>10}", "batch", "mode", "median ms", "÷ grad", "÷ fwd", "peak MiB")
}

impl std::fmt::Display for Row {
    /// One line of the table under [`header`]; "–" where there is no gradient mode to divide by
    /// (`forward_only`) or no peak (not Linux).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by_grad = self.by_grad.map_or("–".to_string(), |v| format!("{v:.2}"));
        let peak = self.peak_mib.map_or("–".to_string(), |v| format!("{v:.0}"));
        write!(
            f,
            "{:>5} {:<28} {:>11.2} {by_grad:>8} {:>8.2} {peak:>10}",
            self.batch, self.mode, self.median_ms, self.by_fwd
        )
    }
}

/// Checks `cfg` against `g` and returns the input shape without the batch axis that
/// [`run_bench`] uses: `cfg.shape`, or the model's declared one, which must then be fixed.
pub fn check(g: &Graph, cfg: &Config) -> Result<Vec<usize>> {
    if cfg.repeats == 0 || cfg.batch.is_empty() || cfg.batch.contains(&0) {
        return Err(Error::Invalid("bench needs at least one repetition and batch sizes above zero".into()));
    }
    if g.inputs.len() != 1 || g.inputs[0].kind != ElemKind::Float {
        return Err(Error::Invalid("bench needs a model with one floating-point input".into()));
    }
    let declared: Vec<usize> = g.inputs[0]
        .dims
        .as_ref()
        .map(|d| d.iter().skip(1).map(|d| if let Dim::Fixed(n) = d { *n } else { 0 }).collect())
        .unwrap_or_default();
    let shape = cfg.shape.clone().unwrap_or(declared);
    if shape.is_empty() || shape.contains(&0) {
        return Err(Error::Invalid(format!(
            "input '{}': its shape is not fixed; give the shape without the batch axis",
            g.names[g.inputs[0].id]
        )));
    }
    Ok(shape)
}

/// Times `cfg`'s modes on `g` for each batch size (in the calling thread's rayon pool), calling
/// `report` with each batch's rows as they are done. The input is deterministic, in [-1, 1); the
/// z^B rule's bounds are [-1, 1]. Warm-up: at least one round of every mode and half a second (a
/// fresh process's first passes fault memory in and start the pool's threads).
pub fn run_bench(g: &Graph, cfg: &Config, mut report: impl FnMut(&[Row])) -> Result<Vec<Row>> {
    let shape = check(g, cfg)?;
    let consts = prepare_consts::<f32>(g);
    let mut rows = Vec::new();
    for &n in &cfg.batch {
        let mut full = vec![n];
        full.extend(&shape);
        let len: usize = full.iter().product();
        let data: Vec<f32> = (0..len).map(|i| ((i * 2654435761) % 2000) as f32 / 1000.0 - 1.0).collect();
        let x = Value::F(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&full), data)
                .map_err(|e| Error::Invalid(format!("input of shape {full:?}: {e}")))?,
        );
        let opts = RuleOpts { bounds: Some(Bounds { low: vec![-1.0], high: vec![1.0] }), ..RuleOpts::default() };
        let mut modes: Vec<(String, Option<(Prepared, Method)>)> = vec![("forward".into(), None)];
        if !cfg.forward_only {
            let grad = Method::Gradient;
            let s = Settings { method: grad.clone(), canonize: Mode::Full, opts: opts.clone(), tolerance: 1e-4 };
            let base = prepare(g, std::slice::from_ref(&x), &s)?;
            // One canonization and one converted copy of the weights serve every method.
            for c in &cfg.composites {
                let m = Method::Lrp(Box::new(Composite::named(c, &Params::default())?));
                modes.push((format!("lrp {c}"), Some((base.with_method(&m, opts.clone())?, m))));
            }
            modes.insert(1, ("gradient".into(), Some((base, grad))));
        }
        let call = |m: &Option<(Prepared, Method)>| -> Result<()> {
            match m {
                None => {
                    run(g, &consts, vec![x.clone()])?;
                }
                Some((p, method)) => {
                    attribute(p, method, vec![x.clone()], None, &[])?;
                }
            }
            Ok(())
        };
        // With one warm-up pass EfficientNet-Lite0's batch-1 forward (5 ms) read 1.4–3.3×
        // onnxruntime's warm session between rounds.
        let warm = Instant::now();
        loop {
            for (_, m) in &modes {
                call(m)?;
            }
            if warm.elapsed().as_secs_f64() >= 0.5 {
                break;
            }
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for _ in 0..cfg.repeats {
            for (k, (_, m)) in modes.iter().enumerate() {
                let t0 = Instant::now();
                call(m)?;
                times[k].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        // Peak memory in one more untimed pass per mode: the reset returns freed memory to the
        // system, and the timed passes would pay for faulting it back in.
        let mut peaks = Vec::with_capacity(modes.len());
        for (_, m) in &modes {
            let can_reset = reset_peak();
            call(m)?;
            peaks.push(if can_reset { peak_mib() } else { None });
        }
        let med: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        let batch_rows: Vec<Row> = modes
            .iter()
            .zip(&med)
            .zip(peaks)
            .map(|(((name, _), &ms), peak_mib)| Row {
                batch: n,
                mode: name.clone(),
                median_ms: ms,
                by_grad: (!cfg.forward_only).then(|| ms / med[1]),
                by_fwd: ms / med[0],
                peak_mib,
            })
            .collect();
        report(&batch_rows);
        rows.extend(batch_rows);
    }
    Ok(rows)
}

/// Resets the process's peak-RSS counter (Linux); returns whether it worked. Memory the last
/// mode freed goes back to the system first: mimalloc returns it only after a delay, and the
/// counter starts from the resident size, so a mode's peak included what the one before it had
/// left (VGG-16's forward read 2 683 MiB, above its gradient's 2 054). Under another allocator
/// the collection finds nothing to do.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A MobileNet block (expansion, depthwise, projection; 8 kB) from the test fixtures.
    fn tiny() -> Graph {
        let mut g =
            crate::onnx::load(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mobilenet_block/model.onnx"))
                .expect("fixture loads");
        g.free_batch();
        g
    }

    #[test]
    fn every_mode_gets_a_row_per_batch_with_ratios_to_its_own_run() {
        let g = tiny();
        let cfg = Config {
            shape: None,
            batch: vec![1, 2],
            composites: vec!["epsilon_plus_flat".into()],
            repeats: 3,
            forward_only: false,
        };
        let mut reported = 0;
        let rows = run_bench(&g, &cfg, |r| reported += r.len()).expect("bench runs");
        assert_eq!(reported, rows.len());
        let modes: Vec<(usize, &str)> = rows.iter().map(|r| (r.batch, r.mode.as_str())).collect();
        assert_eq!(
            modes,
            [
                (1, "forward"),
                (1, "gradient"),
                (1, "lrp epsilon_plus_flat"),
                (2, "forward"),
                (2, "gradient"),
                (2, "lrp epsilon_plus_flat")
            ]
        );
        for b in rows.chunks(3) {
            assert!(b.iter().all(|r| r.median_ms > 0.0));
            assert_eq!(b[0].by_fwd, 1.0);
            assert_eq!(b[1].by_grad, Some(1.0));
            assert!((b[2].by_grad.unwrap() - b[2].median_ms / b[1].median_ms).abs() < 1e-12);
            assert!((b[2].by_fwd - b[2].median_ms / b[0].median_ms).abs() < 1e-12);
        }
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let g = tiny();
        let cfg = |batch: Vec<usize>, repeats, composites: Vec<String>| Config {
            shape: None,
            batch,
            composites,
            repeats,
            forward_only: false,
        };
        assert!(run_bench(&g, &cfg(vec![1], 0, vec![]), |_| ()).is_err());
        assert!(run_bench(&g, &cfg(vec![0], 1, vec![]), |_| ()).is_err());
        assert!(run_bench(&g, &cfg(vec![1], 1, vec!["no_such_composite".into()]), |_| ()).is_err());
        assert!(check(&g, &Config { shape: Some(vec![]), ..cfg(vec![1], 1, vec![]) }).is_err());
        assert!(run_bench(&g, &cfg(vec![], 1, vec![]), |_| ()).is_err());
        let rows = run_bench(&g, &Config { forward_only: true, ..cfg(vec![1], 1, vec![]) }, |_| ()).expect("forward");
        assert!(rows.len() == 1 && rows[0].by_grad.is_none());
    }
}
