//! Bad input gets a clear error that names what is wrong, never a panic or a wrong answer.

use prost::Message;
use relprop::Error;
use relprop::graph::{input_warnings, prepare_consts, run};
use relprop::onnx::proto;

mod common;
use common::{tensor, vi};

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> proto::NodeProto {
    common::node(op, name, inputs, outputs, vec![])
}

fn model(nodes: Vec<proto::NodeProto>, inits: Vec<proto::TensorProto>) -> proto::ModelProto {
    common::model(nodes, inits, vi("x", &[1, 4]), vi("y", &[1, 4]))
}
use relprop::tensor::Value;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("relprop-errors-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn vgg() -> PathBuf {
    root().join("tests/fixtures/vgg/model.onnx")
}

#[test]
fn truncated_file_is_rejected_at_every_cut() {
    let bytes = std::fs::read(vgg()).unwrap();
    for frac in [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99] {
        let cut = (bytes.len() as f64 * frac) as usize;
        let p = tmp(&format!("cut{cut}.onnx"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = relprop::onnx::load(&p).expect_err("a truncated model must not load");
        let msg = e.to_string();
        eprintln!("{frac}: {msg}");
        let named = match &e {
            Error::NotOnnx { path, reason } => path == &p && !reason.is_empty(),
            Error::Tensor { tensor, .. } => !tensor.is_empty(),
            Error::Node { node, .. } => !node.is_empty(),
            Error::Invalid(m) => m.contains("produced by no node"),
            _ => false,
        };
        assert!(named, "{msg}");
    }
}

#[test]
fn non_onnx_file_is_rejected() {
    let e = relprop::onnx::load(root().join("assets/images/chelsea.png")).unwrap_err();
    assert!(matches!(e, Error::NotOnnx { .. }), "{e}");
    assert!(e.to_string().contains("chelsea.png"), "{e}");
    let e = relprop::onnx::load(root().join("does-not-exist.onnx")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("does-not-exist.onnx"), "{e}");
}

#[test]
fn unsupported_op_names_type_node_and_supported_list() {
    let m = model(vec![node("Erf", "my_erf", &["x"], &["t"]), node("Relu", "r", &["t"], &["y"])], vec![]);
    let p = tmp("erf.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    let e = relprop::onnx::load(&p).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Unsupported { .. }), "{msg}");
    assert!(msg.contains("Erf") && msg.contains("my_erf") && msg.contains("Conv") && msg.contains("LSTM"), "{msg}");
    // inspect's lenient loader still describes the model.
    let (_, unsupported) = relprop::onnx::load_lenient(&p).unwrap();
    assert_eq!(unsupported, vec!["Erf (node 'my_erf')".to_string()]);
}

#[test]
fn missing_external_data_names_file_and_tensor() {
    let mut w = tensor("weights", &[4], vec![]);
    w.data_location = Some(1);
    w.external_data =
        vec![proto::StringStringEntryProto { key: Some("location".into()), value: Some("weights.bin".into()) }];
    let m = model(vec![node("Add", "add", &["x", "weights"], &["y"])], vec![w]);
    let dir = tmp("ext");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("ext.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    let msg = relprop::onnx::load(&p).unwrap_err().to_string();
    assert!(msg.contains("weights.bin") && msg.contains("'weights'"), "{msg}");
    // With the file present, external data loads and is used.
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join("weights.bin"), data).unwrap();
    let g = relprop::onnx::load(&p).unwrap();
    let x = Value::F(ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 4])));
    let y = run(&g, &prepare_consts(&g), vec![x]).unwrap();
    assert_eq!(y[0].to_float().iter().copied().collect::<Vec<f32>>(), vec![1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn wrong_input_shape_and_dtype_name_the_input() {
    let g = relprop::onnx::load(vgg()).unwrap();
    let consts = prepare_consts::<f32>(&g);
    let x = Value::F(ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 3, 31, 32])));
    let msg = run(&g, &consts, vec![x]).unwrap_err().to_string();
    assert!(msg.contains("'input'") && msg.contains("[batch, 3, 32, 32]") && msg.contains("[2, 3, 31, 32]"), "{msg}");
    let x = Value::I(ndarray::ArrayD::<i64>::zeros(ndarray::IxDyn(&[2, 3, 32, 32])));
    let msg = run(&g, &consts, vec![x]).unwrap_err().to_string();
    assert!(msg.contains("'input'") && msg.contains("floating-point") && msg.contains("int64"), "{msg}");
    let msg = run(&g, &consts, vec![]).unwrap_err().to_string();
    assert!(msg.contains("1 input") && msg.contains("0 given"), "{msg}");
}

#[test]
fn nan_and_inf_inputs_are_warned_about() {
    let g = relprop::onnx::load(vgg()).unwrap();
    let mut a = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 32, 32]));
    a[[0, 0, 0, 0]] = f32::NAN;
    a[[0, 1, 0, 0]] = f32::INFINITY;
    let w = input_warnings(&g, &[Value::F(a)]);
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("'input'") && w[0].contains("1 NaN") && w[0].contains("1 infinite"), "{}", w[0]);
}

#[test]
fn shape_errors_inside_the_graph_name_the_node() {
    // A Reshape whose target does not fit the input.
    let shape = proto::TensorProto {
        name: Some("shape".into()),
        dims: vec![2],
        data_type: Some(7),
        int64_data: vec![3, 3],
        ..Default::default()
    };
    let m = model(vec![node("Reshape", "bad_reshape", &["x", "shape"], &["y"])], vec![shape]);
    let p = tmp("reshape.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    let g = relprop::onnx::load(&p).unwrap();
    let x = Value::F(ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 4])));
    let msg = run(&g, &prepare_consts(&g), vec![x]).unwrap_err().to_string();
    assert!(msg.contains("bad_reshape") && msg.contains("Reshape") && msg.contains("[1, 4]"), "{msg}");
}
