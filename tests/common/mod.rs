//! Builders for small ONNX models in tests (prost structs, no Python).
#![allow(dead_code)]

use relprop::onnx::proto;

/// A float32 initializer.
pub fn tensor(name: &str, dims: &[i64], data: Vec<f32>) -> proto::TensorProto {
    proto::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        float_data: data,
        ..Default::default()
    }
}

/// A float32 graph input or output with a fixed shape.
pub fn vi(name: &str, dims: &[i64]) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{Dimension, dimension::Value as D};
    let shape = proto::TensorShapeProto {
        dim: dims.iter().map(|&d| Dimension { value: Some(D::DimValue(d)), ..Default::default() }).collect(),
    };
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(shape),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A node with a name, inputs, outputs and attributes.
pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<proto::AttributeProto>,
) -> proto::NodeProto {
    proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn ints(name: &str, v: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto { name: Some(name.into()), ints: v.to_vec(), r#type: Some(7), ..Default::default() }
}

/// An integer attribute.
pub fn int(name: &str, v: i64) -> proto::AttributeProto {
    proto::AttributeProto { name: Some(name.into()), i: Some(v), r#type: Some(2), ..Default::default() }
}

/// A model (IR 8, opset 13) around a graph with one input and one output.
pub fn model(
    nodes: Vec<proto::NodeProto>,
    inits: Vec<proto::TensorProto>,
    input: proto::ValueInfoProto,
    output: proto::ValueInfoProto,
) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
        graph: Some(proto::GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![input],
            output: vec![output],
            name: Some("g".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}
