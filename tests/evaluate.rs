//! Region perturbation: a linear model with a known answer, the random control, and Quantus's
//! RegionPerturbation on a fixture model (tools/reference).

use ndarray::Array3;
use relprop::evaluate::{Config, Order, Perturb, abpc, aopc, curve, mean_se};
use relprop::graph::{prepare_consts, run};
use relprop::tensor::Value;
use std::path::PathBuf;

fn cfg(patch: usize, steps: usize) -> Config {
    Config { patch, steps, perturb: Perturb::Black(vec![0.0]), seed: 1, batch: 4 }
}

#[test]
fn linear_model_morf_removes_the_logit_fastest_with_the_aopc_computed_by_hand() {
    // f(x) = Σ w ⊙ x on one 4×4 channel; exact relevance R = w ⊙ x; 2×2 regions, replaced by 0.
    let x = Array3::from_shape_fn((1, 4, 4), |(_, y, xx)| 1.0 + (y * 4 + xx) as f64 * 0.1);
    let w = Array3::from_shape_fn((1, 4, 4), |(_, y, xx)| [3.0, -1.0, 0.5, 2.0][(y / 2) * 2 + xx / 2]);
    let r = &w * &x;
    let f = |img: &Array3<f64>| (img * &w).sum();
    let mut score = |imgs: &[Array3<f64>]| -> relprop::Result<Vec<f64>> { Ok(imgs.iter().map(f).collect()) };
    let morf = curve(&x, &r, Order::MoRF, &cfg(2, 4), &mut score).unwrap();
    let lerf = curve(&x, &r, Order::LeRF, &cfg(2, 4), &mut score).unwrap();
    assert_eq!(morf[0], lerf[0], "both curves start at f(x)");
    // Region sums of R: top-left 3·(1.0+1.1+1.4+1.5) = 15.0, top-right −(1.2+1.3+1.6+1.7) = −5.8,
    // bottom-left 0.5·(1.8+1.9+2.2+2.3) = 4.1, bottom-right 2·(2.0+2.1+2.4+2.5) = 18.0; f(x) = 31.3.
    let drops = [18.0, 15.0, 4.1, -5.8];
    let mut expected = vec![31.3];
    for d in drops {
        let last = *expected.last().unwrap();
        expected.push(last - d);
    }
    for (a, b) in morf.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-12, "{morf:?} vs {expected:?}");
    }
    // AOPC by hand: mean of 0, 18, 33, 37.1, 31.3.
    let by_hand = (0.0 + 18.0 + 33.0 + 37.1 + 31.3) / 5.0;
    assert!((aopc(&morf) - by_hand).abs() < 1e-12);
    // No other order of the four regions removes the logit faster (higher AOPC).
    let regions = [(0usize, 0usize), (0, 2), (2, 0), (2, 2)];
    let perms = [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0], [1, 3, 0, 2], [0, 2, 3, 1]];
    for p in perms {
        let mut img = x.clone();
        let mut c = vec![f(&img)];
        for &k in &p {
            let (y0, x0) = regions[k];
            img.slice_mut(ndarray::s![.., y0..y0 + 2, x0..x0 + 2]).fill(0.0);
            c.push(f(&img));
        }
        assert!(aopc(&c) <= aopc(&morf) + 1e-12);
    }
    assert!(abpc(&morf, &lerf) > 0.0);
}

#[test]
fn random_attribution_has_abpc_near_zero() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut scores = Vec::new();
    for _ in 0..300 {
        let x = Array3::from_shape_fn((2, 8, 8), |_| rng.random::<f64>());
        let w = Array3::from_shape_fn((2, 8, 8), |_| rng.random::<f64>() * 2.0 - 1.0);
        let r = Array3::from_shape_fn((2, 8, 8), |_| rng.random::<f64>() * 2.0 - 1.0);
        let mut score =
            |imgs: &[Array3<f64>]| -> relprop::Result<Vec<f64>> { Ok(imgs.iter().map(|i| (i * &w).sum()).collect()) };
        let m = curve(&x, &r, Order::MoRF, &cfg(2, 16), &mut score).unwrap();
        let l = curve(&x, &r, Order::LeRF, &cfg(2, 16), &mut score).unwrap();
        assert_eq!(m[0], l[0]);
        scores.push(abpc(&m, &l));
    }
    let (mean, se) = mean_se(&scores);
    eprintln!("random ABPC over 300 inputs: {mean:.4} ± {se:.4}");
    assert!(mean.abs() < 3.0 * se, "{mean} ± {se}");
}

#[test]
fn curves_equal_quantus_region_perturbation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let g = relprop::onnx::load(root.join("tests/fixtures/vgg/model.onnx")).unwrap();
    let consts = prepare_consts::<f64>(&g);
    let x = relprop::io::read_npy::<f64>(&root.join("tests/fixtures/vgg/input_0.npy")).unwrap().to_float();
    let q = root.join("tests/fixtures/quantus");
    let a = relprop::io::read_npy::<f64>(&q.join("attribution.npy")).unwrap().to_float();
    let y: Vec<usize> =
        relprop::io::read_npy::<f64>(&q.join("targets.npy")).unwrap().to_int().iter().map(|&v| v as usize).collect();
    for (order, name) in [(Order::MoRF, "morf"), (Order::LeRF, "lerf")] {
        let reference = relprop::io::read_npy::<f64>(&q.join(format!("quantus_{name}.npy"))).unwrap().to_float();
        for b in 0..2 {
            let xi = x.index_axis(ndarray::Axis(0), b).to_owned().into_dimensionality::<ndarray::Ix3>().unwrap();
            let ai = a.index_axis(ndarray::Axis(0), b).to_owned().into_dimensionality::<ndarray::Ix3>().unwrap();
            let mut score = |imgs: &[Array3<f64>]| -> relprop::Result<Vec<f64>> {
                let views: Vec<_> = imgs.iter().map(|i| i.view().insert_axis(ndarray::Axis(0))).collect();
                let batch = ndarray::concatenate(ndarray::Axis(0), &views).unwrap();
                let out = run(&g, &consts, vec![Value::F(batch.into_dyn())])?[0].to_float();
                Ok(out.outer_iter().map(|row| row[y[b]]).collect())
            };
            let ours = curve(&xi, &ai, order, &cfg(4, 20), &mut score).unwrap();
            // Quantus records f(x⁰) − f(x^k) for k = 1..L.
            let theirs: Vec<f64> = reference.index_axis(ndarray::Axis(0), b).iter().copied().collect();
            assert_eq!(theirs.len(), 20);
            for k in 1..=20 {
                let d = ours[0] - ours[k];
                assert!((d - theirs[k - 1]).abs() < 1e-5, "{name} sample {b} step {k}: {d} vs {}", theirs[k - 1]);
            }
        }
    }
}
