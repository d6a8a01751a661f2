//! Graph data structures.

use crate::tensor::Const;
use std::collections::HashMap;

/// Index of a value (tensor) in a [`Graph`].
pub type ValueId = usize;

/// One dimension of a declared input shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A symbolic or unknown size (e.g. a dynamic batch).
    Free(String),
}

/// Element family of a graph input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemKind {
    /// float32, float64 or float16.
    Float,
    /// Any integer or boolean type.
    Int,
}

/// A declared graph input.
#[derive(Clone, Debug)]
pub struct Input {
    /// Value id.
    pub id: ValueId,
    /// Declared shape, if any.
    pub dims: Option<Vec<Dim>>,
    /// Declared element family.
    pub kind: ElemKind,
}

/// How `auto_pad` asks for padding to be computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoPad {
    /// Explicit `pads`.
    NotSet,
    /// Output = ceil(input / stride), extra padding at the end.
    SameUpper,
    /// Output = ceil(input / stride), extra padding at the start.
    SameLower,
    /// No padding.
    Valid,
}

/// Window attributes shared by Conv and the pooling ops (1-d or 2-d).
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// Kernel shape (None for Conv: taken from the weight).
    pub kernel: Option<Vec<usize>>,
    /// Strides (empty = all 1).
    pub strides: Vec<usize>,
    /// Dilations (empty = all 1).
    pub dilations: Vec<usize>,
    /// Pads, ONNX order: all begins then all ends (empty = zeros).
    pub pads: Vec<usize>,
    /// Auto padding.
    pub auto_pad: AutoPad,
}

/// Pad mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadMode {
    /// Fill with a constant.
    Constant,
    /// Mirror without repeating the edge.
    Reflect,
    /// Repeat the edge.
    Edge,
}

/// LSTM direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Forward in time.
    Forward,
    /// Backward in time.
    Reverse,
    /// Both, outputs stacked on the direction axis.
    Bidirectional,
}

/// The operators of the IR with their attributes parsed and defaulted.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Convolution (1-d or 2-d).
    Conv {
        /// Window.
        win: Window,
        /// Groups.
        group: usize,
    },
    /// `alpha·A'·B' + beta·C`.
    Gemm {
        /// Scale of the product.
        alpha: f64,
        /// Scale of C.
        beta: f64,
        /// Transpose A.
        trans_a: bool,
        /// Transpose B.
        trans_b: bool,
    },
    /// numpy-style matrix product.
    MatMul,
    /// Inference-mode batch normalisation over axis 1.
    BatchNorm {
        /// Variance stabiliser.
        epsilon: f64,
    },
    /// max(x, 0).
    Relu,
    /// Clamp to [min, max]; opset ≥ 11 gives the bounds as inputs 1 and 2.
    Clip {
        /// Lower bound from the attribute (opset < 11).
        min: Option<f64>,
        /// Upper bound from the attribute (opset < 11).
        max: Option<f64>,
    },
    /// x for x ≥ 0, alpha·x otherwise.
    LeakyRelu {
        /// Negative slope.
        alpha: f64,
    },
    /// Logistic function.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// clamp(alpha·x + beta, 0, 1).
    HardSigmoid {
        /// Slope.
        alpha: f64,
        /// Offset.
        beta: f64,
    },
    /// x · clamp(x/6 + 1/2, 0, 1).
    HardSwish,
    /// Softmax; `legacy` (opset < 13) flattens from `axis` on.
    Softmax {
        /// Axis.
        axis: i64,
        /// Opset < 13 semantics.
        legacy: bool,
    },
    /// Element-wise sum (broadcasting).
    Add,
    /// Element-wise difference.
    Sub,
    /// Element-wise product.
    Mul,
    /// Element-wise quotient.
    Div,
    /// Element-wise power.
    Pow,
    /// Element-wise square root.
    Sqrt,
    /// Max pooling.
    MaxPool {
        /// Window.
        win: Window,
        /// Round output size up.
        ceil_mode: bool,
    },
    /// Average pooling.
    AveragePool {
        /// Window.
        win: Window,
        /// Round output size up.
        ceil_mode: bool,
        /// Count padding in the divisor.
        count_include_pad: bool,
    },
    /// Mean over all spatial axes, keeping them as size 1.
    GlobalAveragePool,
    /// Reshape to 2-d at `axis`.
    Flatten {
        /// Split axis.
        axis: i64,
    },
    /// Reshape to the shape in input 1.
    Reshape {
        /// A 0 in the shape means 0, not "copy".
        allowzero: bool,
    },
    /// Axis permutation (None: reverse).
    Transpose {
        /// Permutation.
        perm: Option<Vec<usize>>,
    },
    /// Remove size-1 axes (attribute before opset 13, input 1 after).
    Squeeze {
        /// Axes from the attribute.
        axes: Option<Vec<i64>>,
    },
    /// Insert size-1 axes.
    Unsqueeze {
        /// Axes from the attribute.
        axes: Option<Vec<i64>>,
    },
    /// Join along an axis.
    Concat {
        /// Axis.
        axis: i64,
    },
    /// Strided slice (attributes before opset 10, inputs after).
    Slice {
        /// Starts attribute.
        starts: Option<Vec<i64>>,
        /// Ends attribute.
        ends: Option<Vec<i64>>,
        /// Axes attribute.
        axes: Option<Vec<i64>>,
    },
    /// Split along an axis into the node's outputs.
    Split {
        /// Axis.
        axis: i64,
        /// Sizes from the attribute (opset < 13).
        split: Option<Vec<i64>>,
    },
    /// Padding (attributes before opset 11, inputs after).
    Pad {
        /// Mode.
        mode: PadMode,
        /// Pads attribute.
        pads: Option<Vec<i64>>,
        /// Fill value attribute.
        value: f64,
    },
    /// Index along an axis.
    Gather {
        /// Axis.
        axis: i64,
    },
    /// ONNX LSTM.
    Lstm {
        /// Hidden size.
        hidden: usize,
        /// Direction.
        direction: Direction,
        /// Batch-major layout (layout = 1).
        batch_first: bool,
    },
    /// Copy.
    Identity,
    /// Inference-mode dropout (identity).
    Dropout,
    /// Shape of the input as int64.
    Shape {
        /// First axis.
        start: i64,
        /// End axis (exclusive).
        end: Option<i64>,
    },
    /// Element type change.
    Cast {
        /// Convert to floats (else integers).
        to_float: bool,
    },
    /// A tensor of a given shape filled with one value.
    ConstantOfShape {
        /// Fill value.
        value: Const,
    },
    /// Arithmetic progression.
    Range,
    /// Broadcast to a shape.
    Expand,
    /// Per-channel threshold ReLU made by canonization from BN → ReLU: channel c keeps x where
    /// `(x − t_c)·d_c > 0` and outputs `t_c` elsewhere; `d_c = 0` marks a constant channel (γ = 0),
    /// which outputs 0.
    ThreshRelu {
        /// Thresholds per channel.
        thresholds: Vec<f64>,
        /// Directions per channel: +1, −1 or 0.
        dirs: Vec<i8>,
    },
}

/// Whether a threshold ReLU's channel with threshold `t` and direction `d` may output values below
/// zero: it keeps values above a negative threshold (or fills with it), or keeps values below its
/// threshold from an input that may be negative; a constant channel (`d` = 0) outputs 0.
fn thresh_channel_signed(t: f64, d: i8, input_nonneg: bool) -> bool {
    d != 0 && (t < 0.0 || (d < 0 && !input_nonneg))
}

impl Op {
    /// An element-wise function of its first input (further inputs, as Clip's bounds, are
    /// constants): the output has the input's shape.
    pub fn is_activation(&self) -> bool {
        matches!(
            self,
            Op::Relu
                | Op::Clip { .. }
                | Op::LeakyRelu { .. }
                | Op::Sigmoid
                | Op::Tanh
                | Op::HardSigmoid { .. }
                | Op::HardSwish
                | Op::Identity
                | Op::ThreshRelu { .. }
        )
    }

    /// The ONNX operator type names relprop supports.
    pub const SUPPORTED: &'static [&'static str] = &[
        "Add",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "Div",
        "Dropout",
        "Expand",
        "Flatten",
        "Gather",
        "Gemm",
        "GlobalAveragePool",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "LSTM",
        "LeakyRelu",
        "MatMul",
        "MaxPool",
        "Mul",
        "Pad",
        "Pow",
        "Range",
        "Relu",
        "Reshape",
        "Shape",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Transpose",
        "Unsqueeze",
    ];
}

/// One node of the graph.
#[derive(Clone, Debug)]
pub struct Node {
    /// Node name (unique; generated when the model has none).
    pub name: String,
    /// The operator.
    pub op: Op,
    /// The ONNX op type it came from (for messages).
    pub op_type: String,
    /// Inputs; `None` for an omitted optional input.
    pub inputs: Vec<Option<ValueId>>,
    /// Outputs; `None` for an unused optional output.
    pub outputs: Vec<Option<ValueId>>,
}

impl Node {
    /// The i-th input, if present.
    pub fn input(&self, i: usize) -> Option<ValueId> {
        self.inputs.get(i).copied().flatten()
    }
}

/// A computation graph with constants, in topological order.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Value names, indexed by id.
    pub names: Vec<String>,
    /// Graph inputs (excluding constants).
    pub inputs: Vec<Input>,
    /// Graph outputs.
    pub outputs: Vec<ValueId>,
    /// Declared shapes of the outputs, where the model gives them.
    pub output_dims: Vec<Option<Vec<Dim>>>,
    /// Constant values (initializers and folded results).
    pub consts: HashMap<ValueId, Const>,
    /// Nodes in topological order.
    pub nodes: Vec<Node>,
    /// Opset of the default domain.
    pub opset: i64,
}

impl Graph {
    /// Adds a new value and returns its id.
    pub fn add_value(&mut self, name: impl Into<String>) -> ValueId {
        self.names.push(name.into());
        self.names.len() - 1
    }

    /// Looks a value up by name.
    pub fn value_id(&self, name: &str) -> Option<ValueId> {
        self.names.iter().position(|n| n == name)
    }

    /// Number of parameters (elements of float constants).
    pub fn parameter_count(&self) -> usize {
        self.consts.values().filter(|c| matches!(c, Const::F(_) | Const::F32(_))).map(|c| c.len()).sum()
    }

    /// Op-type histogram, sorted by count then name.
    pub fn op_histogram(&self) -> Vec<(String, usize)> {
        let mut h: HashMap<&str, usize> = HashMap::new();
        for n in &self.nodes {
            *h.entry(n.op_type.as_str()).or_default() += 1;
        }
        let mut v: Vec<(String, usize)> = h.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// For each value, the index of the last node that reads it (or `usize::MAX` for outputs).
    pub fn last_use(&self) -> Vec<usize> {
        let mut last = vec![0usize; self.names.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                last[*v] = i;
            }
        }
        for &o in &self.outputs {
            last[o] = usize::MAX;
        }
        last
    }

    /// Removes nodes that contribute to no graph output, and constants nobody reads.
    pub fn prune(&mut self) {
        let mut live: std::collections::HashSet<usize> = self.outputs.iter().copied().collect();
        let mut keep = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate().rev() {
            if n.outputs.iter().flatten().any(|o| live.contains(o)) {
                keep[i] = true;
                live.extend(n.inputs.iter().flatten().copied());
            }
        }
        let mut k = keep.into_iter();
        self.nodes.retain(|_| k.next().unwrap_or(false));
        self.consts.retain(|id, _| live.contains(id));
    }

    /// For each value, the nodes (index, input slot) that read it.
    pub fn consumers(&self) -> Vec<Vec<(usize, usize)>> {
        let mut c = vec![Vec::new(); self.names.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for (slot, v) in n.inputs.iter().enumerate() {
                if let Some(v) = v {
                    c[*v].push((i, slot));
                }
            }
        }
        c
    }

    /// The index of the node producing each value, if any.
    pub fn producers(&self) -> Vec<Option<usize>> {
        let mut p = vec![None; self.names.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for o in n.outputs.iter().flatten() {
                p[*o] = Some(i);
            }
        }
        p
    }

    /// For each value a threshold ReLU writes, the channels that may hold values below zero: those
    /// that keep values under a negative threshold or fill with one, or keep values below their
    /// threshold from an input that may be negative. The others never go below zero, so the rules'
    /// x⁻ terms on a layer reading the value need only these, the same ones for every input (a
    /// scan per input finds sets that vary from image to image where a channel happens to stay
    /// at or above zero, and the weights on each set are a copy).
    pub fn signed_channels(&self) -> HashMap<ValueId, Vec<usize>> {
        let nn = self.nonnegative();
        let mut out = HashMap::new();
        for n in &self.nodes {
            let (Op::ThreshRelu { thresholds, dirs }, Some(&Some(o))) = (&n.op, n.outputs.first()) else { continue };
            let input_nonneg = n.input(0).is_some_and(|v| nn[v]);
            let signed = thresholds
                .iter()
                .zip(dirs)
                .enumerate()
                .filter(|&(_, (&t, &d))| thresh_channel_signed(t, d, input_nonneg))
                .map(|(c, _)| c)
                .collect();
            out.insert(o, signed);
        }
        out
    }

    /// For each value, whether it is non-negative by construction: the output of a ReLU, of a
    /// clamp at or above zero, a sigmoid or softmax, a threshold ReLU whose kept and filled values
    /// cannot be negative, and the pooling, reshaping, joins, sums and products of such values;
    /// non-negative constants. False where it may be negative (graph inputs, linear layers, the
    /// rest): the rules use it to keep what inputs of both signs need. Constants are read only
    /// where an op's answer depends on them (a clamp's bound, a sum's operand), never a layer's
    /// weights: this runs per explanation.
    pub fn nonnegative(&self) -> Vec<bool> {
        let konst = |v: ValueId| match self.consts.get(&v) {
            Some(Const::F(a)) => a.iter().all(|x| *x >= 0.0),
            Some(Const::F32(a)) => a.iter().all(|x| *x >= 0.0),
            Some(Const::I(a)) => a.iter().all(|x| *x >= 0),
            None => false,
        };
        let mut nn = vec![false; self.names.len()];
        for n in &self.nodes {
            let at = |v: ValueId| nn[v] || konst(v);
            let input = |i: usize| n.input(i).is_some_and(at);
            let all = || n.inputs.iter().flatten().all(|&v| at(v));
            let out = match &n.op {
                Op::Relu | Op::Sigmoid | Op::Softmax { .. } | Op::HardSigmoid { .. } | Op::Sqrt => true,
                Op::Clip { min, .. } => min.is_some_and(|m| m >= 0.0) || input(1),
                Op::ThreshRelu { thresholds, dirs } => {
                    thresholds.iter().zip(dirs).all(|(&t, &d)| !thresh_channel_signed(t, d, input(0)))
                }
                Op::MaxPool { .. }
                | Op::AveragePool { .. }
                | Op::GlobalAveragePool
                | Op::Flatten { .. }
                | Op::Reshape { .. }
                | Op::Transpose { .. }
                | Op::Squeeze { .. }
                | Op::Unsqueeze { .. }
                | Op::Slice { .. }
                | Op::Split { .. }
                | Op::Identity
                | Op::Dropout
                | Op::Expand
                | Op::Gather { .. } => input(0),
                Op::Pad { value, .. } => input(0) && n.input(2).map_or(*value >= 0.0, at),
                Op::Concat { .. } | Op::Add | Op::Mul => all(),
                _ => false,
            };
            for o in n.outputs.iter().flatten() {
                nn[*o] = out;
            }
        }
        nn
    }

    /// Makes the first input's batch axis free, for models exported with a fixed batch of 1 whose
    /// operators do not depend on it (callers that run other batch sizes on purpose: bench, eval).
    pub fn free_batch(&mut self) {
        if let Some(d) = self.inputs.first_mut().and_then(|i| i.dims.as_mut()).and_then(|d| d.first_mut()) {
            *d = Dim::Free("batch".into());
        }
    }

    /// Whether a value is a graph input.
    pub fn is_input(&self, v: ValueId) -> bool {
        self.inputs.iter().any(|i| i.id == v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Single-output nodes `v0, v1, …` after one graph input `x`; each entry is (op, the value ids
    /// it reads, constant inputs after them).
    fn chain(ops: Vec<(Op, Vec<usize>, Vec<Const>)>) -> Graph {
        let mut g = Graph {
            names: vec!["x".into()],
            inputs: vec![Input { id: 0, dims: None, kind: ElemKind::Float }],
            ..Default::default()
        };
        for (k, (op, ins, consts)) in ops.into_iter().enumerate() {
            let mut inputs: Vec<Option<ValueId>> = ins.into_iter().map(Some).collect();
            for c in consts {
                let id = g.add_value(format!("c{k}"));
                g.consts.insert(id, c);
                inputs.push(Some(id));
            }
            let y = g.add_value(format!("v{k}"));
            g.nodes.push(Node { name: format!("n{k}"), op, op_type: "T".into(), inputs, outputs: vec![Some(y)] });
        }
        g
    }

    #[test]
    fn threshold_relus_name_the_channels_that_may_be_negative() {
        let thresh = |t: Vec<f64>, d: Vec<i8>| Op::ThreshRelu { thresholds: t, dirs: d };
        // Channels: kept above 0.5; filled with −0.1; constant; kept below 0.5 of a signed input;
        // kept above −2; kept below −0.3.
        let (t, d) = (vec![0.5, -0.1, -1.0, 0.5, -2.0, -0.3], vec![1, 1, 0, -1, 1, -1]);
        let g = chain(vec![
            (thresh(t.clone(), d.clone()), vec![0], vec![]), // v0, of the signed input
            (Op::Relu, vec![0], vec![]),                     // v1
            (thresh(t, d), vec![2], vec![]),                 // v2, of ReLU(x)
        ]);
        let s = g.signed_channels();
        let of = |k: usize| s.get(&g.value_id(&format!("v{k}")).unwrap_or_default()).cloned();
        assert_eq!(of(0), Some(vec![1, 3, 4, 5]));
        // Below 0.5 of a non-negative input stays at or above zero.
        assert_eq!(of(2), Some(vec![1, 4, 5]));
        assert_eq!(of(1), None, "not a threshold ReLU");
    }

    #[test]
    fn nonnegative_values_follow_the_ops() {
        let scalar = |v: f64| Const::float(ndarray::arr0(v).into_dyn());
        let clip = || Op::Clip { min: None, max: None };
        let thresh = |t: Vec<f64>, d: Vec<i8>| Op::ThreshRelu { thresholds: t, dirs: d };
        // Value ids: x is 0, v0 1, v1 2, v2 3, v3 4, v4 5 (constants take ids too, from v6 on).
        let g = chain(vec![
            (Op::Relu, vec![0], vec![]),                            // v0: ReLU(x)
            (Op::Identity, vec![0], vec![]),                        // v1: x
            (Op::Add, vec![1, 1], vec![]),                          // v2: v0 + v0
            (Op::Add, vec![1, 2], vec![]),                          // v3: v0 + v1
            (Op::Concat { axis: 1 }, vec![1, 3], vec![]),           // v4: [v0, v2]
            (Op::GlobalAveragePool, vec![5], vec![]),               // v5: of v4
            (clip(), vec![0], vec![scalar(0.0)]),                   // v6: x clamped at 0
            (clip(), vec![0], vec![scalar(-1.0)]),                  // v7: x clamped at −1
            (thresh(vec![0.5, 0.0], vec![1, 0]), vec![0], vec![]),  // v8
            (thresh(vec![0.5, -0.1], vec![1, 1]), vec![0], vec![]), // v9: fills −0.1
            (thresh(vec![0.5], vec![-1]), vec![0], vec![]),         // v10: keeps x < 0.5
            (thresh(vec![0.5], vec![-1]), vec![1], vec![]),         // v11: the same of v0
            (Op::Mul, vec![1], vec![scalar(-2.0)]),                 // v12: −2·v0
            (Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: false }, vec![1], vec![]), // v13
        ]);
        let nn = g.nonnegative();
        assert!(!nn[0], "the graph input");
        let want = [true, false, true, false, true, true, true, false, true, false, false, true, false, false];
        for (k, w) in want.iter().enumerate() {
            let id = g.value_id(&format!("v{k}")).unwrap_or_default();
            assert_eq!(nn[id], *w, "value {} (node {k})", g.names[id]);
        }
    }
}
