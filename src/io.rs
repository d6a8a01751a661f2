//! Reading and writing `.npy` tensors.

use crate::error::{Error, Result};
use crate::tensor::{Float, Value};
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

fn open(path: &Path) -> Result<BufReader<File>> {
    File::open(path).map(BufReader::new).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })
}

/// Reads a `.npy` file of float32/float64 (as floats) or int64/int32/uint8/bool (as integers).
pub fn read_npy<T: Float>(path: &Path) -> Result<Value<T>> {
    if let Ok(a) = ArrayD::<f32>::read_npy(open(path)?) {
        return Ok(Value::F(a.mapv(|v| T::of(v as f64))));
    }
    if let Ok(a) = ArrayD::<f64>::read_npy(open(path)?) {
        return Ok(Value::F(a.mapv(T::of)));
    }
    if let Ok(a) = ArrayD::<i64>::read_npy(open(path)?) {
        return Ok(Value::I(a));
    }
    if let Ok(a) = ArrayD::<i32>::read_npy(open(path)?) {
        return Ok(Value::I(a.mapv(i64::from)));
    }
    if let Ok(a) = ArrayD::<u8>::read_npy(open(path)?) {
        return Ok(Value::I(a.mapv(i64::from)));
    }
    if let Ok(a) = ArrayD::<bool>::read_npy(open(path)?) {
        return Ok(Value::I(a.mapv(i64::from)));
    }
    Err(Error::Invalid(format!(
        "{}: not a readable .npy array of float32, float64, int64, int32, uint8 or bool (C order)",
        path.display()
    )))
}

/// Writes a value as `.npy`: floats in the run's precision, integers as int64.
pub fn write_npy<T: Float>(path: &Path, v: &Value<T>) -> Result<()> {
    let f = File::create(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let w = std::io::BufWriter::new(f);
    let r = match v {
        Value::F(a) => {
            if T::NAME == "f32" {
                a.mapv(|x| x.f64() as f32).write_npy(w)
            } else {
                a.mapv(|x| x.f64()).write_npy(w)
            }
        }
        Value::I(a) => a.write_npy(w),
    };
    r.map_err(|e| Error::Invalid(format!("cannot write {}: {e}", path.display())))
}
