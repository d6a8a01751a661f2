//! Times the matrix product on square and convolution-like shapes (a profiling aid:
//! `cargo run --release --example gemmbench`).
use relprop::ops::gemm::{Mat, Threads, matmul};
use std::time::Instant;
fn main() {
    // On a pool thread, as relprop's own passes run (see `ops::on_pool`).
    relprop::ops::on_pool(body);
}

fn body() {
    for &(m, n, k) in &[
        (2048, 2048, 2048),
        (256, 196, 1024),
        (64, 3136, 576),
        (512, 49, 4608),
        (64, 3136, 256),
        (32, 3136, 1152),
        (32, 784, 1152),
        (128, 3136, 256),
        // EfficientNet-Lite0's pointwise convolutions at batch 1 (m = out channels, n = pixels).
        (96, 12544, 16),
        (144, 3136, 24),
        (24, 3136, 144),
        (480, 196, 80),
        (672, 196, 112),
        (112, 196, 672),
        (1152, 49, 192),
        (192, 49, 1152),
        (1280, 49, 320),
    ] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        for threads in [Threads::One, Threads::Pool] {
            matmul(m, n, k, Mat::rows(&a, k), Mat::rows(&b, n), &mut c, false, threads);
            let reps = (2e10 / (2.0 * (m * n * k) as f64)).clamp(3.0, 200.0) as usize;
            let t0 = Instant::now();
            for _ in 0..reps {
                matmul(m, n, k, Mat::rows(&a, k), Mat::rows(&b, n), &mut c, false, threads);
            }
            let dt = t0.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{m:5}x{n:5}x{k:5} {threads:?}: {:7.3} ms {:6.1} GFLOP/s",
                dt * 1e3,
                2.0 * (m * n * k) as f64 / dt / 1e9
            );
        }
    }
}
