//! Runs an attribution repeatedly for profiling:
//! Uses mimalloc like the relprop binary, so that its timings match.
//! `RELPROP_PROFILE=1 target/release/examples/attrloop MODEL.onnx gradient|COMPOSITE [N] [BATCH]`.
use relprop::attribution::{Method, Settings, attribute, prepare};
use relprop::canonize::Mode;
use relprop::composite::{Composite, Params};
use relprop::rules::Bounds;
use relprop::rules::grad::RuleOpts;
use relprop::tensor::Value;
fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let mut g = relprop::onnx::load(&a[1])?;
    g.free_batch();
    let n: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let batch: usize = a.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let len = batch * 3 * 224 * 224;
    let data: Vec<f32> = (0..len).map(|i| ((i * 2654435761) % 2000) as f32 / 1000.0 - 1.0).collect();
    let x = Value::F(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[batch, 3, 224, 224]), data)?);
    let method = match a[2].as_str() {
        "gradient" => Method::Gradient,
        c => Method::Lrp(Box::new(Composite::named(c, &Params::default())?)),
    };
    let opts = RuleOpts { bounds: Some(Bounds { low: vec![-1.0], high: vec![1.0] }), ..RuleOpts::default() };
    let s = Settings { method: method.clone(), canonize: Mode::Full, opts, tolerance: 1e-4 };
    let p = prepare(&g, std::slice::from_ref(&x), &s)?;
    let mut t = Vec::new();
    for _ in 0..n {
        let t0 = std::time::Instant::now();
        attribute(&p, &method, vec![x.clone()], None, &[])?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    println!("median {:.2} ms, min {:.2} ms", t[t.len() / 2], t[0]);
    Ok(())
}
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
