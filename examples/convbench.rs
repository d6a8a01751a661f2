//! Times the convolution kernels on EfficientNet-like layers (a profiling aid: `cargo run --release --example convbench`).
use relprop::ops::conv::{ConvGeom, conv2d_clamped, conv2d_vjp};
use std::time::Instant;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() {
    // On a pool thread, as relprop's own passes run (see `ops::on_pool`).
    relprop::ops::on_pool(body);
}

fn body() {
    // BATCH=8 times the batch-8 path (samples split over threads, one thread per product).
    let batch = std::env::var("BATCH").ok().and_then(|b| b.parse().ok()).unwrap_or(1);
    let base = ConvGeom {
        n: batch,
        c: 96,
        h: 112,
        w: 112,
        m: 96,
        kh: 3,
        kw: 3,
        stride: [1, 1],
        dilation: [1, 1],
        pads: [1, 1, 1, 1],
        group: 96,
    };
    let cases = [
        ("dw3x3 s1 96x112", base),
        ("dw3x3 s2 96x112", ConvGeom { stride: [2, 2], pads: [0, 0, 1, 1], ..base }),
        ("dw5x5 s1 1152x7", ConvGeom { c: 1152, m: 1152, group: 1152, h: 7, w: 7, kh: 5, kw: 5, pads: [2; 4], ..base }),
        ("pw 16->96 112", ConvGeom { c: 16, m: 96, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("pw 96->24 56", ConvGeom { c: 96, m: 24, h: 56, w: 56, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("pw 192->1152 7", ConvGeom { c: 192, m: 1152, h: 7, w: 7, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        (
            "stem 3->32 s2",
            ConvGeom { c: 3, m: 32, h: 224, w: 224, stride: [2, 2], pads: [0, 0, 1, 1], group: 1, ..base },
        ),
        ("r50 3x3 64 56", ConvGeom { c: 64, m: 64, h: 56, w: 56, group: 1, ..base }),
        ("r50 1x1 64->64 56", ConvGeom { c: 64, m: 64, h: 56, w: 56, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("r50 1x1 64->256 56", ConvGeom { c: 64, m: 256, h: 56, w: 56, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("dn 1x1 64->128 56", ConvGeom { c: 64, m: 128, h: 56, w: 56, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("pw 40->240 28", ConvGeom { c: 40, m: 240, h: 28, w: 28, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("pw 24->144 56", ConvGeom { c: 24, m: 144, h: 56, w: 56, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("pw 80->480 14", ConvGeom { c: 80, m: 480, h: 14, w: 14, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("pw 480->80 14", ConvGeom { c: 480, m: 80, h: 14, w: 14, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("pw 1152->192 7", ConvGeom { c: 1152, m: 192, h: 7, w: 7, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        (
            "r50 1x1 128->512 28",
            ConvGeom { c: 128, m: 512, h: 28, w: 28, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base },
        ),
        ("pw 240->40 28", ConvGeom { c: 240, m: 40, h: 28, w: 28, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("pw 144->40 28", ConvGeom { c: 144, m: 40, h: 28, w: 28, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("r50 1x1 256->64 56", ConvGeom { c: 256, m: 64, h: 56, w: 56, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("r50 3x3 128 28", ConvGeom { c: 128, m: 128, h: 28, w: 28, group: 1, ..base }),
        ("vgg 3x3 64 224", ConvGeom { c: 64, m: 64, h: 224, w: 224, group: 1, ..base }),
        ("vgg 3x3 256 56", ConvGeom { c: 256, m: 256, h: 56, w: 56, group: 1, ..base }),
        ("vgg 3x3 512 28", ConvGeom { c: 512, m: 512, h: 28, w: 28, group: 1, ..base }),
        ("vgg 3x3 512 14", ConvGeom { c: 512, m: 512, h: 14, w: 14, group: 1, ..base }),
        ("dn 1x1 256->128 56", ConvGeom { c: 256, m: 128, h: 56, w: 56, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        ("dn 1x1 512->128 28", ConvGeom { c: 512, m: 128, h: 28, w: 28, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base }),
        (
            "dn 1x1 1024->128 14",
            ConvGeom { c: 1024, m: 128, h: 14, w: 14, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base },
        ),
        ("dn 3x3 128->32 56", ConvGeom { c: 128, m: 32, h: 56, w: 56, group: 1, ..base }),
        ("dn 3x3 128->32 28", ConvGeom { c: 128, m: 32, h: 28, w: 28, group: 1, ..base }),
        ("dn 3x3 128->32 14", ConvGeom { c: 128, m: 32, h: 14, w: 14, group: 1, ..base }),
        ("r50 3x3 128 14", ConvGeom { c: 128, m: 128, h: 14, w: 14, group: 1, ..base }),
        ("r50 3x3 256 14", ConvGeom { c: 256, m: 256, h: 14, w: 14, group: 1, ..base }),
        (
            "r50 1x1 1024->256 14",
            ConvGeom { c: 1024, m: 256, h: 14, w: 14, kh: 1, kw: 1, pads: [0; 4], group: 1, ..base },
        ),
        ("r50 3x3 512 7", ConvGeom { c: 512, m: 512, h: 7, w: 7, group: 1, ..base }),
        (
            "r50 stem 7x7 s2",
            ConvGeom { c: 3, m: 64, h: 224, w: 224, kh: 7, kw: 7, stride: [2, 2], pads: [3; 4], group: 1, ..base },
        ),
    ];
    // EfficientNet-Lite0's depthwise layers: (channels, size, kernel, stride).
    let eff: Vec<(String, ConvGeom)> = [
        (32, 112, 3, 1),
        (96, 112, 3, 2),
        (144, 56, 3, 1),
        (144, 56, 5, 2),
        (240, 28, 5, 1),
        (240, 28, 3, 2),
        (480, 14, 3, 1),
        (480, 14, 5, 1),
        (672, 14, 5, 1),
        (672, 14, 5, 2),
        (1152, 7, 5, 1),
        (1152, 7, 3, 1),
    ]
    .into_iter()
    .map(|(c, hw, k, s)| {
        let p = k / 2;
        // TF-style "same" padding of the exported model: stride 2 pads only the end, less at the start.
        let pads = if s == 1 { [p; 4] } else { [p - 1, p - 1, p, p] };
        let g = ConvGeom { c, m: c, group: c, h: hw, w: hw, kh: k, kw: k, stride: [s, s], pads, ..base };
        (format!("eff dw{k} s{s} {c}x{hw}"), g)
    })
    .collect();
    let only = std::env::args().nth(1);
    // A second argument "fwd" skips the VJPs (for profiling the forward kernels alone).
    let fwd_only = std::env::args().nth(2).is_some_and(|a| a == "fwd");
    let cases = cases.into_iter().map(|(n, g)| (n.to_string(), g)).chain(eff);
    for (name, g) in cases {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let x: Vec<f32> = (0..g.n * g.c * g.h * g.w).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..g.m * (g.c / g.group) * g.kh * g.kw).map(|i| 0.05 * (i as f32 * 0.11).cos()).collect();
        let (oh, ow) = g.out_hw().unwrap();
        let dy: Vec<f32> = (0..g.n * g.m * oh * ow)
            .map(|i| {
                std::env::var("DYSCALE").ok().and_then(|s| s.parse::<f32>().ok()).unwrap_or(1e-3)
                    * (i as f32 * 0.23).sin()
            })
            .collect();
        let flops = 2.0 * (g.n * g.m * oh * ow * (g.c / g.group) * g.kh * g.kw) as f64;
        // CLAMP=1 adds a bias and a ReLU6 clamp, as the layers of EfficientNet-Lite0 run them.
        let epi = std::env::var_os("CLAMP").is_some();
        let bias: Vec<f32> = (0..g.m).map(|i| 0.01 * i as f32).collect();
        let bias = epi.then_some(&bias[..]);
        let clamp = epi.then_some((0.0, 6.0));
        for _ in 0..3 {
            conv2d_clamped(&g, &x, &w, bias, clamp);
        }
        // The median of many single calls: this machine's speed drifts, and a mean hides it.
        let time = |f: &dyn Fn()| {
            let mut t: Vec<f64> = (0..60)
                .map(|_| {
                    // FLUSH=1 evicts the caches before each call (a layer inside a model finds its
                    // weights and inputs in memory, not in the cache).
                    if std::env::var_os("FLUSH").is_some() {
                        let mut junk = vec![1u8; 64 << 20];
                        junk.iter_mut().step_by(64).for_each(|b| *b = b.wrapping_add(1));
                        std::hint::black_box(&junk);
                    }
                    let t0 = Instant::now();
                    f();
                    t0.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            // MIN=1 reports the fastest call instead (steadier when other machines share the host).
            if std::env::var_os("MIN").is_some() { t[0] } else { t[t.len() / 2] }
        };
        let dt = time(&|| {
            std::hint::black_box(conv2d_clamped(&g, &x, &w, bias, clamp));
        });
        let dtv = if fwd_only {
            f64::NAN
        } else {
            time(&|| {
                std::hint::black_box(conv2d_vjp(&g, &dy, &w));
            })
        };
        println!(
            "{name:18} fwd {:7.3} ms {:6.1} GFLOP/s   vjp {:7.3} ms {:6.1} GFLOP/s",
            dt * 1e3,
            flops / dt / 1e9,
            dtv * 1e3,
            flops / dtv / 1e9
        );
    }
}
