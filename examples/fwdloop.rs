//! Runs a model's forward pass repeatedly for profiling: `perf record target/release/examples/fwdloop MODEL.onnx X.npy [N]`.
use relprop::graph::{prepare_consts, run};
// The binary's allocator, so that the profile matches `relprop`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let g = relprop::onnx::load(&a[1]).unwrap();
    let x: relprop::tensor::Value<f32> = relprop::io::read_npy(std::path::Path::new(&a[2])).unwrap();
    let c = prepare_consts::<f32>(&g);
    let n: usize = a.get(3).map(|s| s.parse().unwrap()).unwrap_or(30);
    let mut t = Vec::new();
    for _ in 0..n {
        let t0 = std::time::Instant::now();
        std::hint::black_box(run(&g, &c, vec![x.clone()]).unwrap());
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    println!("median {:.2} ms, min {:.2} ms", t[t.len() / 2], t[0]);
}
