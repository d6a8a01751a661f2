//! Class label files: one label per line, or ImageNet-style `index<TAB>wnid<TAB>names`.

use crate::error::{Error, Result};
use std::path::Path;

/// Reads class names; for tab-separated lines the last field is the name.
pub fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.rsplit('\t').next().unwrap_or(l).trim().to_string())
        .collect())
}

/// Softmax probabilities of a row of logits.
pub fn softmax(logits: &[f64]) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|v| (v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|v| v / z).collect()
}

/// The `k` best classes of a row of logits: (class, probability), best first.
pub fn top_k(logits: &[f64], k: usize) -> Vec<(usize, f64)> {
    let p = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]));
    order.into_iter().take(k).map(|i| (i, p[i])).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn top_k_orders_and_normalises() {
        let t = super::top_k(&[1.0, 3.0, 2.0], 2);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let s: f64 = super::softmax(&[1.0, 3.0, 2.0]).iter().sum();
        assert!((s - 1.0).abs() < 1e-15 && (t[0].1 - 0.665240955774822).abs() < 1e-12);
    }
}
