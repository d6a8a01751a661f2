//! Times max pooling (values, with indices, the VJP relprop runs) on ResNet-50's stem pool at batch 8 (a profiling aid).
use relprop::ops::pool::{PoolGeom, max_pool, max_pool_values, max_pool_vjp_from_input};
use std::time::Instant;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() {
    // On a pool thread, as relprop's own passes run (see `ops::on_pool`).
    relprop::ops::on_pool(body);
}

fn body() {
    let g = PoolGeom {
        planes: 8 * 64,
        h: 112,
        w: 112,
        kernel: [3, 3],
        stride: [2, 2],
        dilation: [1, 1],
        pads: [1; 4],
        ceil_mode: false,
        count_include_pad: false,
    };
    let x: Vec<f32> = (0..g.planes * g.h * g.w).map(|i| ((i * 2654435761) % 2000) as f32 / 1000.0 - 1.0).collect();
    let time = |name: &str, f: &dyn Fn()| {
        let mut t: Vec<f64> = (0..20)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        println!("{name:12} median {:.2} ms", t[t.len() / 2]);
    };
    let y = max_pool_values(&g, &x);
    time("values", &|| {
        std::hint::black_box(max_pool_values(&g, &x));
    });
    time("indexed", &|| {
        std::hint::black_box(max_pool(&g, &x));
    });
    time("vjp", &|| {
        std::hint::black_box(max_pool_vjp_from_input(&g, &x, &y));
    });
}
