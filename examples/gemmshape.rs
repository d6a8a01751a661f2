//! Times one matrix product shape, the median of 200 calls: `gemmshape M N K [pool]` (a profiling
//! aid for the shapes `RELPROP_PROFILE` shows; `gemmbench` runs a fixed list).
use relprop::ops::gemm::{Mat, Threads, matmul};
use std::time::Instant;
fn main() {
    // On a pool thread, as relprop's own passes run (see `ops::on_pool`).
    relprop::ops::on_pool(body);
}

fn body() {
    let a: Vec<usize> = std::env::args().skip(1).take(3).map(|s| s.parse().expect("M N K")).collect();
    assert_eq!(a.len(), 3, "usage: gemmshape M N K [pool]");
    let threads = if std::env::args().nth(4).is_some_and(|t| t == "pool") { Threads::Pool } else { Threads::One };
    let (m, n, k) = (a[0], a[1], a[2]);
    let x = vec![0.5f32; m * k];
    let y = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let mut t = Vec::new();
    for _ in 0..200 {
        let t0 = Instant::now();
        matmul(m, n, k, Mat::rows(&x, k), Mat::rows(&y, n), &mut c, false, threads);
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    let gf = 2.0 * (m * n * k) as f64 / t[t.len() / 2] / 1e6;
    println!("median {:.3} ms  {gf:.1} GFLOP/s", t[t.len() / 2]);
}
