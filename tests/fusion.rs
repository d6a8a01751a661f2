//! A Conv whose only reader is a ReLU or Clip runs as one fused kernel in the forward pass; the
//! fused result must equal the two ops run apart (which happens when the Conv's output is needed).

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
