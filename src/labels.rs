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
