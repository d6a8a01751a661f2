//! Composites: which rule each node gets. A composite is plain data — rules per kind of layer,
//! an optional rule for the first linear layer, and user overrides by op type, node name (glob)
//! or position — resolved once per graph into one rule per node.

use crate::error::{Error, Result};
use crate::graph::{Graph, Node, Op, ValueId};
use crate::rules::Rule;
use std::str::FromStr;

/// Which nodes a special first-layer rule may apply to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstLayer {
    /// Convolutions only (zennit's `Convolution`).
    Conv,
    /// Convolutions and dense layers (zennit's `Linear`).
    Linear,
}

/// A node matcher of a user override.
#[derive(Clone, Debug, PartialEq)]
pub enum Matcher {
    /// ONNX op type, e.g. `Conv`.
    OpType(String),
    /// Node name glob (`*`, `?`).
    Name(String),
    /// Node index in the (canonized) graph's topological order, as `inspect` prints it.
    Position(usize),
}

impl Matcher {
    fn matches(&self, index: usize, node: &Node) -> bool {
        match self {
            Matcher::OpType(t) => node.op_type.eq_ignore_ascii_case(t),
            Matcher::Name(p) => glob(p.as_bytes(), node.name.as_bytes()),
            Matcher::Position(i) => *i == index,
        }
    }
}

/// `*` and `?` matching; written out because node-name globs need nothing more.
fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// A user override: nodes matching `matcher` get `rule`.
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    /// Which nodes.
    pub matcher: Matcher,
    /// Their rule.
    pub rule: Rule,
}

impl FromStr for Override {
    type Err = String;
    /// `OPTYPE=rule`, `name:GLOB=rule` or `#N=rule`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (m, r) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("rule override '{s}' must look like Conv=gamma(0.5), name:GLOB=rule or #N=rule"))?;
        let m = m.trim();
        let matcher = if let Some(g) = m.strip_prefix("name:") {
            Matcher::Name(g.to_string())
        } else if let Some(n) = m.strip_prefix('#') {
            Matcher::Position(n.parse().map_err(|_| format!("bad position '{m}' in '{s}'"))?)
        } else if m.is_empty() {
            return Err(format!("empty matcher in '{s}'"));
        } else {
            Matcher::OpType(m.to_string())
        };
        Ok(Override { matcher, rule: r.parse()? })
    }
}

/// Rules per kind of layer (zennit's layer map), a first-layer rule, and overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct Composite {
    /// Name, for messages.
    pub name: String,
    /// Convolutions.
    pub conv: Rule,
    /// Dense layers (Gemm, MatMul with a constant weight).
    pub dense: Rule,
    /// The first linear layer's rule, and which layers count.
    pub first: Option<(FirstLayer, Rule)>,
    /// Element-wise activations and left-over BatchNorms.
    pub activation: Rule,
    /// ReLU specifically (guided backprop, deconvnet), if not `activation`.
    pub relu: Option<Rule>,
    /// Sums of two tensors and average pooling.
    pub sum: Rule,
    /// Products of a signal and a gate.
    pub gate: Rule,
    /// User overrides, first match wins.
    pub overrides: Vec<Override>,
}

/// The named composites.
pub const NAMES: &[&str] = &[
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
    "excitation_backprop",
    "guided_backprop",
    "deconvnet",
    "epsilon",
    "gradient",
];

/// Parameters of the named composites.
#[derive(Clone, Debug)]
pub struct Params {
    /// ε of the dense layers (and of every layer for `epsilon`).
    pub epsilon: f64,
    /// γ of the conv layers in `epsilon_gamma_box`.
    pub gamma: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params { epsilon: 1e-6, gamma: 0.25 }
    }
}

impl Composite {
    /// A named composite with zennit's semantics and defaults.
    pub fn named(name: &str, p: &Params) -> Result<Composite> {
        let base = Composite {
            name: name.to_string(),
            conv: Rule::ZPlus,
            dense: Rule::Epsilon(p.epsilon),
            first: None,
            activation: Rule::Pass,
            relu: None,
            sum: Rule::Norm,
            gate: Rule::SignalTakesAll,
            overrides: vec![],
        };
        let grad = Composite {
            conv: Rule::Gradient,
            dense: Rule::Gradient,
            activation: Rule::Gradient,
            sum: Rule::Gradient,
            gate: Rule::Gradient,
            ..base.clone()
        };
        let flat = Some((FirstLayer::Linear, Rule::Flat));
        let ab = Rule::AlphaBeta { alpha: 2.0, beta: 1.0 };
        Ok(match name {
            "epsilon_plus" => base,
            "epsilon_plus_flat" => Composite { first: flat, ..base },
            "epsilon_alpha2_beta1" => Composite { conv: ab, ..base },
            "epsilon_alpha2_beta1_flat" => Composite { conv: ab, first: flat, ..base },
            "epsilon_gamma_box" => {
                Composite { conv: Rule::Gamma(p.gamma), first: Some((FirstLayer::Conv, Rule::ZBox)), ..base }
            }
            // zennit: z⁺ on every linear layer, norm on sums and average pooling, gradient elsewhere.
            "excitation_backprop" => Composite { conv: Rule::ZPlus, dense: Rule::ZPlus, sum: Rule::Norm, ..grad },
            "guided_backprop" => Composite { relu: Some(Rule::GuidedBackprop), ..grad },
            "deconvnet" => Composite { relu: Some(Rule::DeconvNet), ..grad },
            "epsilon" => {
                let r = if p.epsilon == 0.0 { Rule::Zero } else { Rule::Epsilon(p.epsilon) };
                Composite { conv: r.clone(), dense: r, ..base }
            }
            "gradient" => grad,
            _ => {
                return Err(Error::Invalid(format!("unknown composite '{name}'; composites: {}", NAMES.join(", "))));
            }
        })
    }

    /// Whether every rule is a gradient rule (the seed is then one-hot, not one-hot × output).
    pub fn is_gradient(&self) -> bool {
        let all = [&self.conv, &self.dense, &self.activation, &self.sum];
        all.iter().all(|r| r.is_gradient_like()) && self.overrides.iter().all(|o| o.rule.is_gradient_like())
    }

    /// Reads overrides (and optionally a base composite name) from a TOML file:
    /// `composite = "epsilon_plus"` and `[[rule]] match = "Conv" rule = "gamma(0.5)"`.
    pub fn overrides_from_toml(text: &str) -> Result<(Option<String>, Vec<Override>)> {
        #[derive(serde::Deserialize)]
        struct File {
            composite: Option<String>,
            #[serde(default)]
            rule: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(rename = "match")]
            matcher: String,
            rule: String,
        }
        let f: File = toml::from_str(text).map_err(|e| Error::Invalid(format!("rule file: {e}")))?;
        let ov = f
            .rule
            .iter()
            .map(|e| format!("{}={}", e.matcher, e.rule).parse::<Override>().map_err(Error::Invalid))
            .collect::<Result<Vec<_>>>()?;
        Ok((f.composite, ov))
    }

    /// Resolves one rule per node of `g` (None where a node carries no relevance).
    /// `variable[v]` says whether value v depends on a graph input.
    pub fn assign(&self, g: &Graph, variable: &[bool]) -> Result<Vec<Option<Rule>>> {
        let is_var = |v: Option<ValueId>| v.is_some_and(|v| variable[v]);
        let mut first_done = false;
        let mut out = Vec::with_capacity(g.nodes.len());
        for (i, n) in g.nodes.iter().enumerate() {
            if !n.inputs.iter().any(|v| is_var(*v)) || !n.outputs.iter().any(|v| is_var(*v)) {
                out.push(None);
                continue;
            }
            let nvars = n.inputs.iter().filter(|v| is_var(**v)).count();
            let linear = matches!(n.op, Op::Conv { .. } | Op::Gemm { .. } | Op::MatMul)
                && is_var(n.input(0))
                && !is_var(n.input(1));
            let mut rule = match &n.op {
                _ if linear => {
                    let is_conv = matches!(n.op, Op::Conv { .. });
                    match &self.first {
                        Some((kind, r)) if !first_done && (is_conv || *kind == FirstLayer::Linear) => {
                            first_done = true;
                            r.clone()
                        }
                        _ => {
                            first_done = true;
                            if is_conv { self.conv.clone() } else { self.dense.clone() }
                        }
                    }
                }
                Op::Relu => self.relu.clone().unwrap_or_else(|| self.activation.clone()),
                Op::Clip { .. }
                | Op::LeakyRelu { .. }
                | Op::Sigmoid
                | Op::Tanh
                | Op::HardSigmoid { .. }
                | Op::HardSwish
                | Op::ThreshRelu { .. }
                | Op::BatchNorm { .. }
                | Op::Sqrt => self.activation.clone(),
                Op::Pow if !is_var(n.input(1)) => self.activation.clone(),
                Op::Add | Op::Sub if nvars == 2 => self.sum.clone(),
                Op::Add | Op::Sub | Op::Mul | Op::Div
                    if nvars == 1 && (is_var(n.input(0)) || matches!(n.op, Op::Add | Op::Mul)) =>
                {
                    // Shifting or scaling by a constant: like an activation.
                    self.activation.clone()
                }
                Op::Mul if nvars == 2 => match self.gate {
                    Rule::SignalTakesAll => Rule::SignalTakesAll,
                    ref r => r.clone(),
                },
                Op::AveragePool { .. } | Op::GlobalAveragePool => self.sum.clone(),
                Op::Lstm { .. } if !self.is_gradient() => Rule::Lstm,
                Op::MaxPool { .. }
                | Op::Flatten { .. }
                | Op::Reshape { .. }
                | Op::Transpose { .. }
                | Op::Squeeze { .. }
                | Op::Unsqueeze { .. }
                | Op::Concat { .. }
                | Op::Slice { .. }
                | Op::Split { .. }
                | Op::Pad { .. }
                | Op::Gather { .. }
                | Op::Expand
                | Op::Identity
                | Op::Dropout
                | Op::Softmax { .. } => Rule::Gradient,
                _ if self.is_gradient() => Rule::Gradient,
                _ => {
                    return Err(crate::error::node_err(
                        &n.name,
                        &n.op_type,
                        "has no defined relevance behaviour in this composite",
                    ));
                }
            };
            if let Some(o) = self.overrides.iter().find(|o| o.matcher.matches(i, n)) {
                rule = o.rule.clone();
            }
            out.push(Some(rule));
        }
        Ok(out)
    }
}
