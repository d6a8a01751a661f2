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

/// Reads a 16 kHz mono WAV file (16-bit integer or 32-bit float) as samples in [-1, 1].
pub fn read_wav(path: &Path, rate: u32) -> Result<Vec<f32>> {
    let r =
        hound::WavReader::open(path).map_err(|e| Error::Invalid(format!("cannot read WAV {}: {e}", path.display())))?;
    let spec = r.spec();
    if spec.sample_rate != rate || spec.channels != 1 {
        return Err(Error::Invalid(format!(
            "{}: {} Hz with {} channel(s); the model needs {rate} Hz mono (e.g. sox IN.wav -r {rate} -c 1 OUT.wav)",
            path.display(),
            spec.sample_rate,
            spec.channels
        )));
    }
    let bad = |e: hound::Error| Error::Invalid(format!("{}: {e}", path.display()));
    match spec.sample_format {
        hound::SampleFormat::Float => r.into_samples::<f32>().collect::<std::result::Result<_, _>>().map_err(bad),
        hound::SampleFormat::Int => {
            let scale = (1i64 << (spec.bits_per_sample - 1)) as f32;
            r.into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 / scale))
                .collect::<std::result::Result<_, _>>()
                .map_err(bad)
        }
    }
}
