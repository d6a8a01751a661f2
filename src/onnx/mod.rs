//! Reading ONNX files into the [`Graph`] IR.
//!
//! The protobuf structs in `proto.rs` were generated once from `onnx.proto` by `tools/protogen`
//! (`cargo run --manifest-path tools/protogen/Cargo.toml`, needs `protoc`); at run time only
//! `prost` is used.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto;

mod fold;

use crate::error::{Error, Result};
use crate::graph::{AutoPad, Dim, Direction, ElemKind, Graph, Input, Node, Op, PadMode, Window};
use crate::tensor::{Const, array};
use prost::Message;
use proto::{AttributeProto, ModelProto, NodeProto, TensorProto};
use std::collections::HashMap;
use std::path::Path;

pub use fold::fold_constants;

/// Loads an ONNX model file, resolves constants, and folds constant subgraphs.
pub fn load(path: impl AsRef<Path>) -> Result<Graph> {
    let path = path.as_ref();
    let (g, unsupported) = load_with(path, true)?;
    debug_assert!(unsupported.is_empty());
    Ok(g)
}

/// Loads a model, skipping nodes with unsupported operators instead of failing; returns the
/// graph (without those nodes, and unfolded) and `OpType (node 'name')` for each skipped node.
/// For `inspect`, which must describe models relprop cannot run.
pub fn load_lenient(path: impl AsRef<Path>) -> Result<(Graph, Vec<String>)> {
    load_with(path.as_ref(), false)
}

fn load_with(path: &Path, strict: bool) -> Result<(Graph, Vec<String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let model = decode(&bytes).map_err(|reason| Error::NotOnnx { path: path.to_path_buf(), reason })?;
    let (mut g, unsupported) = convert(&model, &dir, strict)?;
    if unsupported.is_empty() {
        fold_constants(&mut g)?;
    }
    Ok((g, unsupported))
}

/// Loads a model from bytes; external data is resolved relative to `dir`.
pub fn load_bytes(bytes: &[u8], dir: &Path) -> Result<Graph> {
    let model = decode(bytes).map_err(|reason| Error::NotOnnx { path: dir.join("<bytes>"), reason })?;
    let (mut g, _) = convert(&model, dir, true)?;
    fold_constants(&mut g)?;
    Ok(g)
}

fn decode(bytes: &[u8]) -> std::result::Result<ModelProto, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let m = ModelProto::decode(bytes)
        .map_err(|e| format!("protobuf decoding failed ({e}); the file may be truncated or not an ONNX model"))?;
    if m.ir_version.unwrap_or(0) <= 0 {
        return Err("it has no ir_version".into());
    }
    match &m.graph {
        Some(g) if !g.node.is_empty() || !g.output.is_empty() => Ok(m),
        _ => Err("it contains no graph".into()),
    }
}

/// Attribute lookup with ONNX defaults.
struct Attrs<'a> {
    node: &'a NodeProto,
    map: HashMap<&'a str, &'a AttributeProto>,
}

impl<'a> Attrs<'a> {
    fn new(node: &'a NodeProto) -> Self {
        let map = node.attribute.iter().map(|a| (a.name.as_deref().unwrap_or(""), a)).collect();
        Attrs { node, map }
    }
    fn err(&self, msg: String) -> Error {
        crate::error::node_err(self.node.name.as_deref().unwrap_or(""), self.node.op_type.as_deref().unwrap_or(""), msg)
    }
    fn has(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }
    fn int(&self, k: &str, d: i64) -> i64 {
        self.map.get(k).and_then(|a| a.i).unwrap_or(d)
    }
    fn float(&self, k: &str, d: f64) -> f64 {
        self.map.get(k).and_then(|a| a.f).map(f64::from).unwrap_or(d)
    }
    fn ints(&self, k: &str) -> Option<Vec<i64>> {
        self.map.get(k).map(|a| a.ints.clone())
    }
    fn string(&self, k: &str) -> Option<String> {
        self.map.get(k).and_then(|a| a.s.as_ref()).map(|s| String::from_utf8_lossy(s).into_owned())
    }
    fn usizes(&self, k: &str) -> Result<Vec<usize>> {
        let v = self.ints(k).unwrap_or_default();
        v.iter()
            .map(|&x| usize::try_from(x).map_err(|_| self.err(format!("attribute {k} has a negative entry: {v:?}"))))
            .collect()
    }
    fn window(&self, with_kernel: bool) -> Result<Window> {
        let auto_pad = match self.string("auto_pad").as_deref() {
            None | Some("NOTSET") | Some("") => AutoPad::NotSet,
            Some("SAME_UPPER") => AutoPad::SameUpper,
            Some("SAME_LOWER") => AutoPad::SameLower,
            Some("VALID") => AutoPad::Valid,
            Some(o) => return Err(self.err(format!("unknown auto_pad '{o}'"))),
        };
        let kernel = if self.has("kernel_shape") { Some(self.usizes("kernel_shape")?) } else { None };
        if with_kernel && kernel.is_none() {
            return Err(self.err("kernel_shape is required".into()));
        }
        Ok(Window {
            kernel,
            strides: self.usizes("strides")?,
            dilations: self.usizes("dilations")?,
            pads: self.usizes("pads")?,
            auto_pad,
        })
    }
}

/// Converts a tensor to a constant, reading external data relative to `dir`.
pub fn tensor_to_const(t: &TensorProto, dir: &Path) -> Result<Const> {
    let name = t.name.clone().unwrap_or_default();
    let terr = |msg: String| Error::Tensor { tensor: name.clone(), msg };
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        dims.push(usize::try_from(d).map_err(|_| terr(format!("negative dimension in {:?}", t.dims)))?);
    }
    let n: usize = dims.iter().product();
    let dt = t.data_type.unwrap_or(0);
    let external;
    let raw: Option<&[u8]> = if t.data_location == Some(1) {
        let kv: HashMap<&str, &str> = t
            .external_data
            .iter()
            .map(|e| (e.key.as_deref().unwrap_or(""), e.value.as_deref().unwrap_or("")))
            .collect();
        let loc = kv.get("location").ok_or_else(|| terr("external data without a location".into()))?;
        let file = dir.join(loc);
        let bytes = std::fs::read(&file)
            .map_err(|e| terr(format!("external data file {} is missing or unreadable: {e}", file.display())))?;
        let off: usize = kv.get("offset").and_then(|s| s.parse().ok()).unwrap_or(0);
        let len: usize = kv.get("length").and_then(|s| s.parse().ok()).unwrap_or(bytes.len().saturating_sub(off));
        if off + len > bytes.len() {
            return Err(terr(format!(
                "external data file {} is shorter than offset {off} + length {len}",
                file.display()
            )));
        }
        external = bytes[off..off + len].to_vec();
        Some(&external)
    } else {
        t.raw_data.as_deref()
    };
    let width = match dt {
        1 | 6 | 12 => 4,
        2 | 3 | 9 => 1,
        4 | 5 | 10 | 16 => 2,
        7 | 11 | 13 => 8,
        _ => {
            return Err(terr(format!("unsupported element type {dt} ({})", dtype_name(dt))));
        }
    };
    if let Some(raw) = raw {
        if raw.len() != n * width {
            return Err(terr(format!("holds {} bytes, expected {} for shape {dims:?}", raw.len(), n * width)));
        }
        let chunks = raw.chunks_exact(width);
        let le = |c: &[u8]| {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(b)
        };
        return Ok(match dt {
            1 => Const::float32(array(&dims, chunks.map(|c| f32::from_bits(le(c) as u32)).collect())),
            11 => Const::float(array(&dims, chunks.map(|c| f64::from_bits(le(c))).collect())),
            10 => Const::float(array(&dims, chunks.map(|c| f16_to_f64(le(c) as u16)).collect())),
            16 => Const::float(array(&dims, chunks.map(|c| f32::from_bits((le(c) as u32) << 16) as f64).collect())),
            3 => Const::I(array(&dims, chunks.map(|c| c[0] as i8 as i64).collect())),
            5 => Const::I(array(&dims, chunks.map(|c| le(c) as u16 as i16 as i64).collect())),
            6 => Const::I(array(&dims, chunks.map(|c| le(c) as u32 as i32 as i64).collect())),
            _ => Const::I(array(&dims, chunks.map(|c| le(c) as i64).collect())),
        });
    }
    let check = |len: usize| {
        if len == n { Ok(()) } else { Err(terr(format!("holds {len} values, expected {n} for shape {dims:?}"))) }
    };
    Ok(match dt {
        1 => {
            check(t.float_data.len())?;
            Const::float32(array(&dims, t.float_data.clone()))
        }
        11 => {
            check(t.double_data.len())?;
            Const::float(array(&dims, t.double_data.clone()))
        }
        10 | 16 => {
            check(t.int32_data.len())?;
            let conv = |v: i32| {
                if dt == 10 { f16_to_f64(v as u16) } else { f32::from_bits((v as u32) << 16) as f64 }
            };
            Const::float(array(&dims, t.int32_data.iter().map(|&v| conv(v)).collect()))
        }
        7 => {
            check(t.int64_data.len())?;
            Const::I(array(&dims, t.int64_data.clone()))
        }
        12 | 13 => {
            check(t.uint64_data.len())?;
            Const::I(array(&dims, t.uint64_data.iter().map(|&v| v as i64).collect()))
        }
        _ => {
            check(t.int32_data.len())?;
            Const::I(array(&dims, t.int32_data.iter().map(|&v| v as i64).collect()))
        }
    })
}

fn f16_to_f64(h: u16) -> f64 {
    let s = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = ((h >> 10) & 0x1f) as i32;
    let m = (h & 0x3ff) as f64;
    match e {
        0 => s * m * 2f64.powi(-24),
        31 => {
            if m == 0.0 {
                s * f64::INFINITY
            } else {
                f64::NAN
            }
        }
        _ => s * (1.0 + m / 1024.0) * 2f64.powi(e - 15),
    }
}

fn dtype_name(dt: i32) -> &'static str {
    match dt {
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "float64",
        12 => "uint32",
        13 => "uint64",
        14 => "complex64",
        15 => "complex128",
        16 => "bfloat16",
        _ => "unknown",
    }
}

fn is_float_type(dt: i32) -> bool {
    matches!(dt, 1 | 10 | 11 | 16)
}

fn convert(model: &ModelProto, dir: &Path, strict: bool) -> Result<(Graph, Vec<String>)> {
    let gp = model.graph.as_ref().ok_or_else(|| Error::Invalid("model has no graph".into()))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .unwrap_or(1);
    if !(7..=23).contains(&opset) {
        return Err(Error::Invalid(format!("opset {opset} of the default domain is not supported (7 to 23 are)")));
    }
    let mut g = Graph { opset, ..Default::default() };
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut id_of = |g: &mut Graph, name: &str| -> usize {
        if let Some(&i) = ids.get(name) {
            return i;
        }
        let i = g.add_value(name);
        ids.insert(name.to_string(), i);
        i
    };
    for t in &gp.initializer {
        let id = id_of(&mut g, t.name.as_deref().unwrap_or(""));
        g.consts.insert(id, tensor_to_const(t, dir)?);
    }
    for vi in &gp.input {
        let name = vi.name.clone().unwrap_or_default();
        let id = id_of(&mut g, &name);
        if g.consts.contains_key(&id) {
            continue;
        }
        let (dims, kind) = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(proto::type_proto::Value::TensorType(tt)) => {
                let dims = value_dims(vi);
                let et = tt.elem_type.unwrap_or(1);
                if et == 8 {
                    return Err(Error::Invalid(format!("input '{name}' is a string tensor, which is not supported")));
                }
                (dims, if is_float_type(et) { ElemKind::Float } else { ElemKind::Int })
            }
            _ => return Err(Error::Invalid(format!("input '{name}' is not a tensor"))),
        };
        g.inputs.push(Input { id, dims, kind });
    }
    let mut unsupported = Vec::new();
    for (k, np) in gp.node.iter().enumerate() {
        let op_type = np.op_type.clone().unwrap_or_default();
        let name = match np.name.as_deref() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("{op_type}_{k}"),
        };
        if !matches!(np.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
            unsupported.push(format!("{}:{op_type} (node '{name}')", np.domain.as_deref().unwrap_or("")));
            continue;
        }
        if op_type == "Constant" {
            let c = constant_node(np, dir)?;
            if let Some(out) = np.output.first() {
                let id = id_of(&mut g, out);
                g.consts.insert(id, c);
            }
            continue;
        }
        let op = match parse_op(np, &op_type, opset)? {
            Some(op) => op,
            None => {
                unsupported.push(format!("{op_type} (node '{name}')"));
                continue;
            }
        };
        let inputs = np.input.iter().map(|s| if s.is_empty() { None } else { Some(id_of(&mut g, s)) }).collect();
        let outputs = np.output.iter().map(|s| if s.is_empty() { None } else { Some(id_of(&mut g, s)) }).collect();
        g.nodes.push(Node { name, op, op_type, inputs, outputs });
    }
    if strict && !unsupported.is_empty() {
        return Err(Error::Unsupported { ops: unsupported.join(", "), supported: Op::SUPPORTED.join(", ") });
    }
    for vi in &gp.output {
        let name = vi.name.clone().unwrap_or_default();
        let id = match ids.get(&name) {
            Some(&id) => id,
            None if !strict => continue,
            None => {
                return Err(Error::Invalid(format!("graph output '{name}' is produced by no node")));
            }
        };
        g.outputs.push(id);
        g.output_dims.push(value_dims(vi));
    }
    if strict {
        toposort(&mut g)?;
    }
    Ok((g, unsupported))
}

fn value_dims(vi: &proto::ValueInfoProto) -> Option<Vec<Dim>> {
    match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(proto::type_proto::Value::TensorType(tt)) => tt.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) if *v > 0 => Dim::Fixed(*v as usize),
                    Some(proto::tensor_shape_proto::dimension::Value::DimParam(p)) => Dim::Free(p.clone()),
                    _ => Dim::Free(String::new()),
                })
                .collect()
        }),
        _ => None,
    }
}

fn constant_node(np: &NodeProto, dir: &Path) -> Result<Const> {
    let a = Attrs::new(np);
    let at = |k: &str| a.map.get(k).copied();
    if let Some(t) = at("value").and_then(|x| x.t.as_ref()) {
        return tensor_to_const(t, dir);
    }
    if let Some(v) = at("value_float").and_then(|x| x.f) {
        return Ok(Const::float(array(&[], vec![v as f64])));
    }
    if let Some(v) = at("value_int").and_then(|x| x.i) {
        return Ok(Const::I(array(&[], vec![v])));
    }
    if let Some(x) = at("value_floats") {
        return Ok(Const::float(array(&[x.floats.len()], x.floats.iter().map(|&v| v as f64).collect())));
    }
    if let Some(x) = at("value_ints") {
        return Ok(Const::I(array(&[x.ints.len()], x.ints.clone())));
    }
    Err(a.err("Constant without a supported value attribute".into()))
}

/// Parses a node's op type and attributes; `None` for an unsupported op type.
fn parse_op(np: &NodeProto, op_type: &str, opset: i64) -> Result<Option<Op>> {
    let a = Attrs::new(np);
    let op = match op_type {
        "Conv" => Op::Conv { win: a.window(false)?, group: a.int("group", 1).max(1) as usize },
        "Gemm" => Op::Gemm {
            alpha: a.float("alpha", 1.0),
            beta: a.float("beta", 1.0),
            trans_a: a.int("transA", 0) != 0,
            trans_b: a.int("transB", 0) != 0,
        },
        "MatMul" => Op::MatMul,
        "BatchNormalization" => Op::BatchNorm { epsilon: a.float("epsilon", 1e-5) },
        "Relu" => Op::Relu,
        "Clip" => {
            if opset < 11 {
                Op::Clip { min: Some(a.float("min", f32::MIN as f64)), max: Some(a.float("max", f32::MAX as f64)) }
            } else {
                Op::Clip { min: None, max: None }
            }
        }
        "LeakyRelu" => Op::LeakyRelu { alpha: a.float("alpha", 0.01) },
        "Sigmoid" => Op::Sigmoid,
        "Tanh" => Op::Tanh,
        "HardSigmoid" => Op::HardSigmoid { alpha: a.float("alpha", 0.2), beta: a.float("beta", 0.5) },
        "HardSwish" => Op::HardSwish,
        "Softmax" => Op::Softmax { axis: a.int("axis", if opset < 13 { 1 } else { -1 }), legacy: opset < 13 },
        "Add" => Op::Add,
        "Sub" => Op::Sub,
        "Mul" => Op::Mul,
        "Div" => Op::Div,
        "Pow" => Op::Pow,
        "Sqrt" => Op::Sqrt,
        "MaxPool" => {
            if a.int("storage_order", 0) != 0 {
                return Err(a.err("storage_order = 1 is not supported".into()));
            }
            Op::MaxPool { win: a.window(true)?, ceil_mode: a.int("ceil_mode", 0) != 0 }
        }
        "AveragePool" => Op::AveragePool {
            win: a.window(true)?,
            ceil_mode: a.int("ceil_mode", 0) != 0,
            count_include_pad: a.int("count_include_pad", 0) != 0,
        },
        "GlobalAveragePool" => Op::GlobalAveragePool,
        "Flatten" => Op::Flatten { axis: a.int("axis", 1) },
        "Reshape" => Op::Reshape { allowzero: a.int("allowzero", 0) != 0 },
        "Transpose" => Op::Transpose { perm: if a.has("perm") { Some(a.usizes("perm")?) } else { None } },
        "Squeeze" => Op::Squeeze { axes: if opset < 13 { a.ints("axes") } else { None } },
        "Unsqueeze" => {
            if opset < 13 && !a.has("axes") {
                return Err(a.err("the axes attribute is required before opset 13".into()));
            }
            Op::Unsqueeze { axes: if opset < 13 { a.ints("axes") } else { None } }
        }
        "Concat" => Op::Concat { axis: a.int("axis", if opset < 4 { 1 } else { i64::MIN }) }.require_axis(&a)?,
        "Slice" => {
            if opset < 10 {
                Op::Slice {
                    starts: Some(a.ints("starts").unwrap_or_default()),
                    ends: Some(a.ints("ends").unwrap_or_default()),
                    axes: a.ints("axes"),
                }
            } else {
                Op::Slice { starts: None, ends: None, axes: None }
            }
        }
        "Split" => Op::Split { axis: a.int("axis", 0), split: if opset < 13 { a.ints("split") } else { None } },
        "Pad" => {
            let mode = match a.string("mode").as_deref() {
                None | Some("constant") => PadMode::Constant,
                Some("reflect") => PadMode::Reflect,
                Some("edge") => PadMode::Edge,
                Some(m) => return Err(a.err(format!("pad mode '{m}' is not supported"))),
            };
            if opset < 11 {
                Op::Pad { mode, pads: Some(a.ints("pads").unwrap_or_default()), value: a.float("value", 0.0) }
            } else {
                Op::Pad { mode, pads: None, value: 0.0 }
            }
        }
        "Gather" => Op::Gather { axis: a.int("axis", 0) },
        "LSTM" => {
            let direction = match a.string("direction").as_deref() {
                None | Some("forward") => Direction::Forward,
                Some("reverse") => Direction::Reverse,
                Some("bidirectional") => Direction::Bidirectional,
                Some(d) => return Err(a.err(format!("unknown direction '{d}'"))),
            };
            if a.has("clip") || a.int("input_forget", 0) != 0 {
                return Err(a.err("the clip and input_forget attributes are not supported".into()));
            }
            if let Some(acts) = a.map.get("activations") {
                let names: Vec<String> =
                    acts.strings.iter().map(|s| String::from_utf8_lossy(s).to_lowercase()).collect();
                if names.chunks(3).any(|c| c != ["sigmoid", "tanh", "tanh"]) {
                    return Err(a.err(format!("activations {names:?} are not supported (only Sigmoid, Tanh, Tanh)")));
                }
            }
            let hidden = a.int("hidden_size", 0);
            if hidden <= 0 {
                return Err(a.err("hidden_size is required".into()));
            }
            Op::Lstm { hidden: hidden as usize, direction, batch_first: a.int("layout", 0) != 0 }
        }
        "Identity" => Op::Identity,
        "Dropout" => Op::Dropout,
        "Shape" => Op::Shape { start: a.int("start", 0), end: if a.has("end") { Some(a.int("end", 0)) } else { None } },
        "Cast" => {
            let to = a.int("to", 1) as i32;
            if to == 8 {
                return Err(a.err("casting to string is not supported".into()));
            }
            Op::Cast { to_float: is_float_type(to) }
        }
        "ConstantOfShape" => {
            let value = match a.map.get("value").and_then(|x| x.t.as_ref()) {
                Some(t) => tensor_to_const(t, Path::new("."))?,
                None => Const::float(array(&[1], vec![0.0])),
            };
            Op::ConstantOfShape { value }
        }
        "Range" => Op::Range,
        "Expand" => Op::Expand,
        _ => return Ok(None),
    };
    Ok(Some(op))
}

impl Op {
    fn require_axis(self, a: &Attrs) -> Result<Op> {
        if let Op::Concat { axis: i64::MIN } = self {
            return Err(a.err("the axis attribute is required".into()));
        }
        Ok(self)
    }
}

/// Orders nodes so that each runs after its producers; rejects cycles and dangling inputs.
fn toposort(g: &mut Graph) -> Result<()> {
    let n = g.nodes.len();
    let mut producer: HashMap<usize, usize> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        for o in node.outputs.iter().flatten() {
            producer.insert(*o, i);
        }
    }
    let available = |v: usize, g: &Graph| g.consts.contains_key(&v) || g.inputs.iter().any(|x| x.id == v);
    for node in &g.nodes {
        for &v in node.inputs.iter().flatten() {
            if !producer.contains_key(&v) && !available(v, g) {
                return Err(crate::error::node_err(
                    &node.name,
                    &node.op_type,
                    format!("input '{}' is produced by no node and is not an input or initializer", g.names[v]),
                ));
            }
        }
    }
    let mut state = vec![0u8; n];
    let mut order = Vec::with_capacity(n);
    for start in 0..n {
        if state[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, false)];
        while let Some((i, done)) = stack.pop() {
            if done {
                state[i] = 2;
                order.push(i);
                continue;
            }
            if state[i] != 0 {
                continue;
            }
            state[i] = 1;
            stack.push((i, true));
            for &v in g.nodes[i].inputs.iter().flatten() {
                if let Some(&p) = producer.get(&v) {
                    if state[p] == 1 {
                        return Err(Error::Invalid(format!(
                            "the graph has a cycle through node '{}'",
                            g.nodes[p].name
                        )));
                    }
                    if state[p] == 0 {
                        stack.push((p, false));
                    }
                }
            }
        }
    }
    let old = std::mem::take(&mut g.nodes);
    let mut slots: Vec<Option<Node>> = old.into_iter().map(Some).collect();
    g.nodes = order.into_iter().filter_map(|i| slots[i].take()).collect();
    Ok(())
}
