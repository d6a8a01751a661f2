//! A Conv whose only reader is a ReLU or Clip runs as one fused kernel in the forward pass, and a
//! BatchNormalization with the ReLU after it as one pass; the fused result must equal the ops run
//! apart (which happens when the first op's output is needed).

use prost::Message;
use relprop::graph::{prepare_consts, run};
use relprop::tensor::Value;

mod common;
use common::{int, ints, tensor, vi};

fn data(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| (((i * 37 + seed * 11) % 29) as f32 - 14.0) / 7.0).collect()
}

/// x [1, 3, 9, 8] → Conv (depthwise or full) → activation; `conv_out` also makes the Conv's output a
/// graph output, which forbids the fusion.
fn outputs(act: &str, group: i64, conv_out: bool) -> Vec<Vec<f32>> {
    let m = 3;
    let cg = 3 / group;
    let mut nodes = vec![common::node(
        "Conv",
        "conv",
        &["x", "w", "b"],
        &["c"],
        vec![ints("pads", &[1, 0, 1, 2]), ints("strides", &[2, 1]), int("group", group)],
    )];
    let mut inits =
        vec![tensor("w", &[m, cg, 3, 3], data((m * cg * 9) as usize, 1)), tensor("b", &[m], vec![0.5, -0.25, 0.0])];
    match act {
        "Relu" => nodes.push(common::node("Relu", "act", &["c"], &["y"], vec![])),
        _ => {
            nodes.push(common::node("Clip", "act", &["c", "lo", "hi"], &["y"], vec![]));
            inits.push(tensor("lo", &[], vec![-1.0]));
            inits.push(tensor("hi", &[], vec![2.0]));
        }
    }
    let mut model = common::model(nodes, inits, vi("x", &[1, 3, 9, 8]), vi("y", &[1, 3, 5, 9]));
    if conv_out {
        model.graph.as_mut().unwrap().output.push(vi("c", &[1, 3, 5, 9]));
    }
    let g = relprop::onnx::load_bytes(&model.encode_to_vec(), std::path::Path::new(".")).unwrap();
    let consts = prepare_consts::<f32>(&g);
    let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 3, 9, 8]), data(3 * 9 * 8, 2)).unwrap();
    run(&g, &consts, vec![Value::F(x)]).unwrap().into_iter().map(|v| v.to_float().iter().copied().collect()).collect()
}

#[test]
fn fused_activation_equals_separate_ops() {
    for (act, lo, hi) in [("Relu", 0.0f32, f32::INFINITY), ("Clip", -1.0, 2.0)] {
        for group in [1, 3] {
            let fused = &outputs(act, group, false)[0];
            let apart = outputs(act, group, true);
            let (y, c) = (&apart[0], &apart[1]);
            assert!(c.iter().any(|&v| v < lo) && c.iter().any(|&v| v > lo), "{act}: the activation must bite");
            for ((f, y), c) in fused.iter().zip(y).zip(c) {
                assert_eq!(f, y, "{act} group {group}");
                assert_eq!(*y, c.max(lo).min(hi), "{act} group {group}");
            }
        }
    }
}

/// x [1, 4, 6, 5] → conv_a → ReLU → s; x → conv_t → t; conv_b(s) + skip → z (→ ReLU → y), where
/// the skip is t (read by the Add alone: its buffer becomes the output), s (the convolution's own
/// input) or x (a graph input); `apart` also makes conv_b's output a graph output, which forbids
/// the fusion. Returns the final output.
fn residual(skip: &str, swap: bool, relu: bool, apart: bool) -> Vec<f32> {
    let shape = [1, 4, 6, 5];
    let conv = |name: &str, x: &str, w: &str, b: &str, out: &str| {
        common::node("Conv", name, &[x, w, b], &[out], vec![ints("pads", &[1, 1, 1, 1])])
    };
    let mut nodes = vec![
        conv("conv_a", "x", "wa", "ba", "a"),
        common::node("Relu", "relu_a", &["a"], &["s"], vec![]),
        conv("conv_t", "x", "wt", "bt", "t"),
        conv("conv_b", "s", "wb", "bb", "c"),
        common::node("Add", "add", &if swap { [skip, "c"] } else { ["c", skip] }, &["z"], vec![]),
    ];
    let last = if relu {
        nodes.push(common::node("Relu", "relu_z", &["z"], &["y"], vec![]));
        "y"
    } else {
        "z"
    };
    let mut inits = Vec::new();
    for (k, n) in ["a", "t", "b"].iter().enumerate() {
        inits.push(tensor(&format!("w{n}"), &[4, 4, 3, 3], data(4 * 4 * 9, 3 + k).iter().map(|v| v / 4.0).collect()));
        inits.push(tensor(&format!("b{n}"), &[4], vec![0.5, -0.25, 0.0, 0.1]));
    }
    let mut model = common::model(nodes, inits, vi("x", &shape), vi(last, &shape));
    if apart {
        model.graph.as_mut().unwrap().output.push(vi("c", &shape));
    }
    // t is otherwise unused when the skip is another value.
    if skip != "t" {
        model.graph.as_mut().unwrap().output.push(vi("t", &shape));
    }
    let g = relprop::onnx::load_bytes(&model.encode_to_vec(), std::path::Path::new(".")).unwrap();
    let consts = prepare_consts::<f32>(&g);
    let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 4, 6, 5]), data(4 * 6 * 5, 4)).unwrap();
    run(&g, &consts, vec![Value::F(x)]).unwrap()[0].to_float().iter().copied().collect()
}

#[test]
fn fused_residual_sum_equals_separate_ops() {
    for skip in ["t", "s", "x"] {
        for swap in [false, true] {
            for relu in [false, true] {
                let fused = residual(skip, swap, relu, false);
                let apart = residual(skip, swap, relu, true);
                assert!(apart.iter().any(|&v| v < 0.0) || relu, "the sum must have both signs");
                assert!(apart.contains(&0.0) || !relu, "the ReLU must bite");
                for (f, a) in fused.iter().zip(&apart) {
                    assert!((f - a).abs() <= 1e-5 * (1.0 + a.abs()), "skip {skip} swap {swap} relu {relu}: {f} vs {a}");
                }
            }
        }
    }
}

/// x [1, 3, 4, 5] → Concat(x, x) → BatchNormalization → ReLU → y, or BatchNormalization on x
/// itself (`on_input`); `cat_out` and `bn_out` also make the Concat's or the BatchNormalization's
/// output a graph output. Returns every graph output. The forward runs BatchNormalization and
/// the ReLU after it as one pass, in the Concat's buffer when nothing else reads it.
fn batch_norm(on_input: bool, cat_out: bool, bn_out: bool) -> Vec<Vec<f32>> {
    let c = if on_input { 3 } else { 6 };
    let src = if on_input { "x" } else { "cat" };
    let mut nodes = vec![
        common::node("BatchNormalization", "bn", &[src, "g", "b", "mean", "var"], &["n"], vec![]),
        common::node("Relu", "relu", &["n"], &["y"], vec![]),
    ];
    if !on_input {
        nodes.insert(0, common::node("Concat", "cat", &["x", "x"], &["cat"], vec![int("axis", 1)]));
    }
    let param = |name: &str, seed: usize, shift: f32| {
        tensor(name, &[c], data(c as usize, seed).iter().map(|v| v + shift).collect())
    };
    let inits = vec![param("g", 3, 0.0), param("b", 4, 0.0), param("mean", 5, 0.0), param("var", 6, 2.5)];
    let mut model = common::model(nodes, inits, vi("x", &[1, 3, 4, 5]), vi("y", &[1, c, 4, 5]));
    if cat_out {
        model.graph.as_mut().unwrap().output.push(vi("cat", &[1, c, 4, 5]));
    }
    if bn_out {
        model.graph.as_mut().unwrap().output.push(vi("n", &[1, c, 4, 5]));
    }
    let g = relprop::onnx::load_bytes(&model.encode_to_vec(), std::path::Path::new(".")).unwrap();
    let consts = prepare_consts::<f32>(&g);
    let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 3, 4, 5]), data(60, 2)).unwrap();
    run(&g, &consts, vec![Value::F(x)]).unwrap().into_iter().map(|v| v.to_float().iter().copied().collect()).collect()
}

#[test]
fn batch_norm_and_relu_in_one_pass_equal_the_formula() {
    for (on_input, cat_out, bn_out) in
        [(false, false, false), (false, true, false), (false, false, true), (true, false, false), (true, false, true)]
    {
        let outs = batch_norm(on_input, cat_out, bn_out);
        let c = if on_input { 3 } else { 6 };
        let x = data(60, 2);
        let p = |seed: usize, shift: f32| data(c, seed).iter().map(|v| (v + shift) as f64).collect::<Vec<f64>>();
        let (gm, bt, mean, var) = (p(3, 0.0), p(4, 0.0), p(5, 0.0), p(6, 2.5));
        let case = format!("on_input {on_input} cat_out {cat_out} bn_out {bn_out}");
        let (mut neg, mut pos) = (false, false);
        for (i, &y) in outs[0].iter().enumerate() {
            let ch = i / 20;
            let xv = x[(ch % 3) * 20 + i % 20] as f64;
            let n = (xv - mean[ch]) * gm[ch] / (var[ch] + 1e-5).sqrt() + bt[ch];
            (neg, pos) = (neg || n < 0.0, pos || n > 0.0);
            assert!((y as f64 - n.max(0.0)).abs() < 1e-5, "{case} output {i}: {y} vs {}", n.max(0.0));
            if bn_out {
                let got = outs[outs.len() - 1][i] as f64;
                assert!((got - n).abs() < 1e-5, "{case} BatchNormalization output {i}: {got} vs {n}");
            }
        }
        assert!(neg && pos, "{case}: the ReLU must bite");
        if cat_out {
            let x2: Vec<f32> = x.iter().chain(&x).copied().collect();
            assert_eq!(outs[1], x2, "{case}: the Concat's output must survive");
        }
    }
}
