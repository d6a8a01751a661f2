//! Times a convolution VJP's matrix product in its forms: `vjpshape KDIM SPAN MG [pool]` (the
//! product `col[KDIM×SPAN] = wᵀ · dy` of a layer with MG output channels, weights [MG, KDIM]).
//! Prints, with GFLOP/s: the forward's product in transposed form (`yᵀ = colᵀ · wᵀ`, slower: not
//! used), then the VJP's product as the im2col path takes it on large planes (weights read
//! transposed), the same with the weights stored transposed, the transposed product
//! `colᵀ = dyᵀ · w` (small planes), and the forward product of the same size (a profiling aid for
//! `ops::conv::transposed_pays`).
use relprop::ops::gemm::{Mat, Threads, matmul};
use std::time::Instant;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn time(f: &mut dyn FnMut()) -> f64 {
    let mut t = Vec::new();
    for _ in 0..100 {
        let t0 = Instant::now();
        f();
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}
fn main() {
    // On a pool thread, as relprop's own passes run (see `ops::on_pool`).
    relprop::ops::on_pool(body);
}

fn body() {
    let a: Vec<usize> = std::env::args().skip(1).take(3).map(|s| s.parse().unwrap()).collect();
    let (kd, sp, mg) = (a[0], a[1], a[2]);
    let th = if std::env::args().nth(4).is_some_and(|t| t == "pool") { Threads::Pool } else { Threads::One };
    let w: Vec<f32> = (0..mg * kd).map(|i| (i % 7) as f32 * 0.1).collect();
    let wt: Vec<f32> = (0..mg * kd).map(|i| w[(i % mg) * kd + i / mg]).collect();
    let dy: Vec<f32> = (0..mg * sp).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; kd * sp];
    let gf = |ms: f64| 2.0 * (kd * sp * mg) as f64 / ms / 1e6;
    let t1 = time(&mut || matmul(kd, sp, mg, Mat::rows_t(&w, kd), Mat::rows(&dy, sp), &mut c, false, th));
    let t2 = time(&mut || matmul(kd, sp, mg, Mat::rows(&wt, mg), Mat::rows(&dy, sp), &mut c, false, th));
    // transposed output: cT (sp × kd) = dyT · W
    let t3 = time(&mut || matmul(sp, kd, mg, Mat::rows_t(&dy, sp), Mat::rows(&w, kd), &mut c, false, th));
    let mut f = vec![0f32; mg * sp];
    let t4 = time(&mut || matmul(mg, sp, kd, Mat::rows(&w, kd), Mat::rows(&c, sp), &mut f, false, th));
    // The forward's transposed form: yᵀ [sp × mg] = colᵀ · wᵀ, with col [kd × sp] as computed.
    let mut yt = vec![0f32; sp * mg];
    let t5 = time(&mut || matmul(sp, mg, kd, Mat { data: &c, rs: 1, cs: sp }, Mat::rows_t(&w, kd), &mut yt, false, th));
    println!("fwd transposed {t5:.3} ms {:.0}", gf(t5));
    println!(
        "cur {t1:.3} ms {:.0} | Wt stored {t2:.3} {:.0} | out transposed {t3:.3} {:.0} | fwd {t4:.3} {:.0}",
        gf(t1),
        gf(t2),
        gf(t3),
        gf(t4)
    );
}
