//! Times the sign-split kernels (`ops::pointwise::Split`) on one thread over tiles of a layer, as
//! LRP's z⁺ runs them on inputs of both signs:
//! `target/release/examples/splitbench [C M HW TILE]` (EfficientNet-Lite0's 16→96 112×112 layer by default).
use relprop::ops::pointwise::{Split, split_available};
use std::time::Instant;
fn main() {
    let a: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
    let (c, m, hw, tile) = match a[..] {
        [c, m, hw, t] => (c, m, hw, t),
        _ => (16, 96, 112 * 112, 288),
    };
    if !split_available() {
        eprintln!("the sign-split kernels need AVX-512F");
        return;
    }
    let x: Vec<f32> = (0..c * hw).map(|i| (i as f32 * 0.37).sin()).collect();
    let w2: Vec<f32> = (0..m * 2 * c).map(|i| 0.05 * (i as f32 * 0.11).cos()).collect();
    let r: Vec<f32> = (0..m * hw).map(|i| (i as f32 * 0.23).sin()).collect();
    let bias = vec![0.1f32; m];
    let neg: Vec<usize> = (0..c).collect();
    let wn = Split::columns(c, &neg);
    let k = Split { x: &x, hw, c, m, w2: &w2, wn: &wn };
    let mut g = vec![std::mem::MaybeUninit::<f32>::uninit(); m * tile];
    let mut out = vec![0f32; c * hw];
    let mut times = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let (mut tr, mut tv) = (0.0, 0.0);
        for t0 in (0..hw).step_by(tile) {
            let cols = t0..(t0 + tile).min(hw);
            let gl = m * cols.len();
            let s = Instant::now();
            k.ratio(cols.clone(), &r, Some(&bias), 1e-6, &mut g[..gl]);
            tr += s.elapsed().as_secs_f64();
            // SAFETY: ratio wrote the first gl elements.
            let gs = unsafe { std::slice::from_raw_parts(g.as_ptr() as *const f32, gl) };
            let s = Instant::now();
            // SAFETY: out holds the sample's c·hw elements.
            unsafe { k.vjp(cols, gs, out.as_mut_ptr()) };
            tv += s.elapsed().as_secs_f64();
        }
        times.0.push(tr * 1e3);
        times.1.push(tv * 1e3);
    }
    times.0.sort_by(f64::total_cmp);
    times.1.sort_by(f64::total_cmp);
    let flops = 2.0 * 2.0 * (c * m * hw) as f64;
    println!(
        "c {c} m {m} hw {hw} tile {tile}: ratio {:.3} ms ({:.0} GFLOP/s)  vjp {:.3} ms ({:.0} GFLOP/s)",
        times.0[15],
        flops / times.0[15] / 1e6,
        times.1[15],
        flops / times.1[15] / 1e6
    );
    std::hint::black_box(&out);
}
