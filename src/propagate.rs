//! Propagation: a forward pass that keeps what the rules need, then the reverse topological pass
//! from the seed to the inputs; relevance from several consumers of one value is summed.

use crate::error::{Error, Result, node_err};
use crate::graph::{Graph, Op, ValueId, prepare_consts, run_keep};
use crate::rules::Rule;
use crate::rules::grad::{RuleOpts, backward};
use crate::rules::linear::WeightCache;
use crate::tensor::{Float, Value};
use ndarray::ArrayD;
use std::collections::HashMap;

/// How the relevance at the explained output starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seed {
    /// `one_hot(target) · output` (zennit's LRP convention: the result sums to the logit).
    OneHotTimesOutput,
    /// `one_hot(target)` (gradients: d logit / d input).
    OneHot,
}

/// A graph with one rule per node, ready to explain inputs.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The (canonized) graph.
    pub graph: Graph,
    /// The rule of each node (None: the node carries no relevance).
    pub rules: Vec<Option<Rule>>,
    /// Options for every rule.
    pub opts: RuleOpts,
    /// The value explained: the first output, or the logits before a final Softmax.
    pub explained: ValueId,
    /// Which values depend on a graph input.
    pub variable: Vec<bool>,
}

/// Which values depend on a graph input.
pub fn variables(g: &Graph) -> Vec<bool> {
    let mut var = vec![false; g.names.len()];
    for i in &g.inputs {
        var[i.id] = true;
    }
    for n in &g.nodes {
        // Shape and Cast-to-int results do not carry relevance.
        if matches!(n.op, Op::Shape { .. }) {
            continue;
        }
        if n.inputs.iter().flatten().any(|v| var[*v]) {
            for o in n.outputs.iter().flatten() {
                var[*o] = true;
            }
        }
    }
    var
}

/// The value to explain: output 0, or the logits before a final Softmax or Sigmoid (possibly
/// followed by reshapes): explaining a probability with LRP is ill-defined, and the logit is what
/// zennit users explain.
pub fn explained_value(g: &Graph) -> Result<ValueId> {
    let out = *g.outputs.first().ok_or_else(|| Error::Invalid("the graph has no outputs".into()))?;
    let producers = g.producers();
    let mut v = out;
    let mut passed = Vec::new();
    while let Some(p) = producers[v] {
        let n = &g.nodes[p];
        match n.op {
            Op::Softmax { .. } | Op::Sigmoid => {
                let x = n.input(0).unwrap_or(out);
                // Only if the reshapes after the activation keep one value per logit.
                return Ok(if passed.iter().all(|&q: &usize| g.nodes[q].inputs.iter().flatten().count() <= 2) {
                    x
                } else {
                    out
                });
            }
            Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze { .. } | Op::Identity => {
                passed.push(p);
                match n.input(0) {
                    Some(x) => v = x,
                    None => break,
                }
            }
            _ => break,
        }
    }
    Ok(out)
}

/// Whether `v` is a gate: (through shape ops and constant scalings) a Sigmoid, HardSigmoid, or a
/// Clip of a shifted value (the `clip(x + 3, 0, 6)` of a decomposed hard-swish).
fn is_gate(g: &Graph, producers: &[Option<usize>], mut v: ValueId) -> bool {
    for _ in 0..16 {
        let Some(p) = producers[v] else { return false };
        let n = &g.nodes[p];
        let constant = |i: usize| n.input(i).is_some_and(|x| g.consts.contains_key(&x));
        match n.op {
            Op::Sigmoid | Op::HardSigmoid { .. } => return true,
            Op::Clip { .. } => {
                return n.input(0).and_then(|x| producers[x]).is_some_and(|q| {
                    let m = &g.nodes[q];
                    matches!(m.op, Op::Add | Op::Sub) && m.inputs.iter().flatten().any(|x| g.consts.contains_key(x))
                });
            }
            Op::Mul | Op::Div | Op::Add | Op::Sub if constant(1) => v = n.input(0).unwrap_or(v),
            Op::Mul | Op::Add if constant(0) => v = n.input(1).unwrap_or(v),
            Op::Reshape { .. }
            | Op::Flatten { .. }
            | Op::Unsqueeze { .. }
            | Op::Squeeze { .. }
            | Op::Expand
            | Op::Identity
            | Op::Cast { .. } => v = n.input(0).unwrap_or(v),
            _ => return false,
        }
    }
    false
}

/// Puts the signal first in every product of two variables, so that "signal takes all" gives
/// relevance to input 0; returns the names of products where neither or both look like gates.
fn order_gates(g: &mut Graph, variable: &[bool]) -> Vec<String> {
    let producers = g.producers();
    let mut unclear = Vec::new();
    for k in 0..g.nodes.len() {
        let n = &g.nodes[k];
        if !matches!(n.op, Op::Mul) {
            continue;
        }
        let (Some(a), Some(b)) = (n.input(0), n.input(1)) else {
            continue;
        };
        if !(variable[a] && variable[b]) {
            continue;
        }
        match (is_gate(g, &producers, a), is_gate(g, &producers, b)) {
            (true, false) => g.nodes[k].inputs.swap(0, 1),
            (false, true) => {}
            _ => unclear.push(g.nodes[k].name.clone()),
        }
    }
    unclear
}

impl Plan {
    /// Builds a plan from a canonized graph and its rules.
    pub fn new(mut graph: Graph, composite: &crate::composite::Composite, opts: RuleOpts) -> Result<Plan> {
        let variable = variables(&graph);
        let unclear = order_gates(&mut graph, &variable);
        let rules = composite.assign(&graph, &variable)?;
        for (n, r) in graph.nodes.iter().zip(&rules) {
            if r == &Some(Rule::SignalTakesAll) && unclear.contains(&n.name) {
                return Err(node_err(
                    &n.name,
                    &n.op_type,
                    "cannot tell the signal from the gate in this product; give it a rule, e.g. --rule 'name:NODE=gradient'",
                ));
            }
        }
        let explained = explained_value(&graph)?;
        Ok(Plan { graph, rules, opts, explained, variable })
    }
}

/// The result of explaining a batch.
#[derive(Clone, Debug)]
pub struct Explanation<T> {
    /// Relevance per graph input (None for integer inputs), shaped like the input.
    pub relevance: Vec<Option<ArrayD<T>>>,
    /// The explained output (logits), [batch, classes].
    pub output: ArrayD<T>,
    /// The explained class per sample.
    pub targets: Vec<usize>,
    /// The explained score per sample (output at the target).
    pub scores: Vec<f64>,
    /// Relevance at requested intermediate values, by name.
    pub intermediate: HashMap<String, ArrayD<T>>,
    /// Relevance that reached no input (e.g. on padding), summed over the batch.
    pub dropped: f64,
}

/// Explains `inputs` with `plan`: forward, seed at the targets (argmax when None), backward.
/// `keep` names intermediate values whose relevance is returned too.
pub fn explain<T: Float>(
    plan: &Plan,
    consts: &HashMap<ValueId, Value<T>>,
    weights: &HashMap<usize, WeightCache<T>>,
    inputs: Vec<Value<T>>,
    targets: Option<&[usize]>,
    seed: Seed,
    keep: &[String],
) -> Result<Explanation<T>> {
    // Sample by sample where the graph keeps samples apart (see `graph::batch`), as the forward
    // pass does; with intermediate relevance requested, or targets that do not fit the batch (an
    // error the batched path reports), the batch at once.
    crate::graph::check_inputs(&plan.graph, &inputs)?;
    crate::ops::on_pool(|| {
        let fits = |n: usize| targets.is_none_or(|t| t.len() == n || t.len() == 1);
        if keep.is_empty()
            && let Some(parts) = crate::graph::batch::split_samples(&plan.graph, &inputs).filter(|p| fits(p.len()))
        {
            use rayon::prelude::*;
            let es: Vec<Explanation<T>> = parts
                .into_par_iter()
                .enumerate()
                .with_max_len(1)
                .map(|(s, p)| {
                    let t = targets.map(|t| if t.len() == 1 { t } else { &t[s..s + 1] });
                    explain_batch(plan, consts, weights, p, t, seed, keep)
                })
                .collect::<Result<_>>()?;
            return join_samples(es);
        }
        crate::ops::hot(|| explain_batch(plan, consts, weights, inputs, targets, seed, keep))
    })
}

/// Per-sample explanations as one of the whole batch.
fn join_samples<T: Float>(es: Vec<Explanation<T>>) -> Result<Explanation<T>> {
    let join = |parts: Vec<ArrayD<T>>| crate::graph::batch::concat_samples(&parts).map_err(Error::Invalid);
    // Per input, its samples' relevance (None where an input gets none, e.g. token ids).
    let mut rel: Vec<Option<Vec<ArrayD<T>>>> = vec![Some(Vec::new()); es.first().map_or(0, |e| e.relevance.len())];
    let (mut output, mut targets, mut scores, mut dropped) = (Vec::new(), Vec::new(), Vec::new(), 0.0);
    for e in es {
        for (acc, r) in rel.iter_mut().zip(e.relevance) {
            match (acc.as_mut(), r) {
                (Some(a), Some(r)) => a.push(r),
                _ => *acc = None,
            }
        }
        output.push(e.output);
        targets.extend(e.targets);
        scores.extend(e.scores);
        dropped += e.dropped;
    }
    Ok(Explanation {
        relevance: rel.into_iter().map(|r| r.map(join).transpose()).collect::<Result<_>>()?,
        output: join(output)?,
        targets,
        scores,
        intermediate: HashMap::new(),
        dropped,
    })
}

/// [`explain`] on the whole batch at once.
fn explain_batch<T: Float>(
    plan: &Plan,
    consts: &HashMap<ValueId, Value<T>>,
    weights: &HashMap<usize, WeightCache<T>>,
    inputs: Vec<Value<T>>,
    targets: Option<&[usize]>,
    seed: Seed,
    keep: &[String],
) -> Result<Explanation<T>> {
    let g = &plan.graph;
    let keep_ids: Vec<ValueId> = keep
        .iter()
        .map(|n| g.value_id(n).ok_or_else(|| Error::Invalid(format!("no value named '{n}' in the graph"))))
        .collect::<Result<_>>()?;
    let needed = needed_values(plan);
    let env = run_keep(g, consts, inputs, &|v| needed[v])?;
    let out = match env.get(plan.explained) {
        Some(Value::F(a)) => a.clone(),
        _ => {
            return Err(Error::Invalid(format!(
                "the explained output '{}' is not a float tensor",
                g.names[plan.explained]
            )));
        }
    };
    if out.ndim() < 1 {
        return Err(Error::Invalid("the explained output must have a batch axis".into()));
    }
    let batch = out.shape()[0];
    let per = out.len() / batch.max(1);
    let flat = out
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((batch, per))
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let targets: Vec<usize> = match targets {
        Some(t) if t.len() == batch => t.to_vec(),
        Some(t) if t.len() == 1 => vec![t[0]; batch],
        Some(t) => {
            return Err(Error::Invalid(format!("{} targets given for a batch of {batch}", t.len())));
        }
        None => argmax_rows(&out),
    };
    if let Some(&t) = targets.iter().find(|&&t| t >= per) {
        return Err(Error::Invalid(format!("target {t} is out of range: the output has {per} classes")));
    }
    let scores: Vec<f64> = targets.iter().enumerate().map(|(b, &t)| flat[[b, t]].f64()).collect();
    let mut seed_arr = ndarray::Array2::<T>::zeros((batch, per));
    for (b, &t) in targets.iter().enumerate() {
        seed_arr[[b, t]] = match seed {
            Seed::OneHotTimesOutput => flat[[b, t]],
            Seed::OneHot => T::one(),
        };
    }
    let mut rel: Vec<Option<ArrayD<T>>> = vec![None; g.names.len()];
    rel[plan.explained] =
        Some(seed_arr.into_dyn().into_shape_with_order(out.shape()).map_err(|e| Error::Invalid(e.to_string()))?);
    let mut intermediate = HashMap::new();
    let mut dropped = 0.0;
    // RELPROP_PROFILE=1 prints the backward time per op type and rule to stderr, as the forward does;
    // RELPROP_PROFILE=all per node.
    let profile = std::env::var_os("RELPROP_PROFILE").is_some();
    let per_node = std::env::var("RELPROP_PROFILE").is_ok_and(|v| v == "all");
    let mut prof: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    for (ni, (n, rule)) in g.nodes.iter().zip(&plan.rules).enumerate().rev() {
        let t0 = profile.then(std::time::Instant::now);
        let r_out: Vec<Option<&ArrayD<T>>> = n.outputs.iter().map(|o| o.and_then(|o| rel[o].as_ref())).collect();
        if r_out.iter().all(Option::is_none) {
            continue;
        }
        let Some(rule) = rule else { continue };
        if let Some((o, i)) = pass_through(n, rule, &env, &rel, &plan.variable, &keep_ids) {
            // Pass: the relevance moves to the input as it is (copying it cost ResNet-50's 49
            // ReLUs 45 ms at batch 8).
            let r = rel[o].take();
            match (&mut rel[i], r) {
                (Some(acc), Some(r)) => *acc += &r,
                (slot, r) => *slot = r,
            }
            continue;
        }
        let ins: Vec<Option<&Value<T>>> = n.inputs.iter().map(|i| i.and_then(|id| env.get(id))).collect();
        let outs: Vec<Option<&Value<T>>> = n.outputs.iter().map(|o| o.and_then(|id| env.get(id))).collect();
        // Variables that carry relevance: float tensors, and the integer indices of an embedding lookup.
        let var: Vec<bool> = n
            .inputs
            .iter()
            .enumerate()
            .map(|(slot, i)| {
                i.is_some_and(|v| {
                    plan.variable[v]
                        && (matches!(env.get(v), Some(Value::F(_)))
                            || (matches!(n.op, Op::Gather { .. }) && slot == 1)
                            // An activation's input, not kept when its rule reads the output.
                            || (env.get(v).is_none() && n.op.is_activation() && slot == 0))
                })
            })
            .collect();
        let b = backward(n, rule, &plan.opts, &ins, &outs, &r_out, &var, weights.get(&ni))
            .map_err(|m| node_err(&n.name, &n.op_type, format!("{rule}: {m}")))?;
        dropped += b.dropped;
        for o in n.outputs.iter().flatten() {
            if keep_ids.contains(o)
                && let Some(r) = rel[*o].take()
            {
                intermediate.insert(g.names[*o].clone(), r);
            } else {
                rel[*o] = None;
            }
        }
        for (i, r) in n.inputs.iter().zip(b.inputs) {
            if let (Some(i), Some(r)) = (i, r) {
                match &mut rel[*i] {
                    Some(acc) if acc.shape() == r.shape() => *acc += &r,
                    Some(acc) => {
                        return Err(node_err(
                            &n.name,
                            &n.op_type,
                            format!("relevance shapes {:?} and {:?} disagree", acc.shape(), r.shape()),
                        ));
                    }
                    slot => *slot = Some(r),
                }
            }
        }
        if let Some(t0) = t0 {
            let key = if per_node {
                let shape = |v: Option<&Value<T>>| v.map(|v| format!("{:?}", v.shape())).unwrap_or_default();
                format!("{ni:04} {} {rule} {} {}", n.op_type, n.name, shape(ins.first().copied().flatten()))
            } else {
                format!("{} {rule}", n.op_type)
            };
            let e = prof.entry(key).or_default();
            e.0 += t0.elapsed().as_secs_f64() * 1e3;
            e.1 += 1;
        }
    }
    for (k, (ms, c)) in &prof {
        eprintln!("profile backward: {k:<40} {c:>4} nodes {ms:>9.3} ms");
    }
    let relevance = g
        .inputs
        .iter()
        .map(|i| match env.get(i.id) {
            Some(Value::F(x)) => Some(rel[i.id].take().unwrap_or_else(|| ArrayD::zeros(x.raw_dim()))),
            Some(Value::I(x)) => Some(rel[i.id].take().unwrap_or_else(|| ArrayD::zeros(x.raw_dim()))),
            None => None,
        })
        .collect();
    for &k in &keep_ids {
        if let Some(r) = rel[k].take() {
            intermediate.insert(g.names[k].clone(), r);
        }
    }
    Ok(Explanation { relevance, output: out, targets, scores, intermediate, dropped })
}

/// The values the rules read in the backward pass, which the forward pass keeps: the inputs and
/// outputs of every node that carries relevance, except what its rule does not read (see
/// [`Rule::reads_nothing`], [`Rule::reads_output`] and [`Rule::reads_output_over_signed_input`]).
/// What is not kept is freed as soon as the forward pass is done with it, and a convolution whose
/// output is not kept runs fused with the activation after it.
fn needed_values(plan: &Plan) -> Vec<bool> {
    let g = &plan.graph;
    let mut needed = vec![false; g.names.len()];
    needed[plan.explained] = true;
    let nonneg = g.nonnegative();
    for (n, r) in g.nodes.iter().zip(&plan.rules) {
        let Some(r) = r else { continue };
        if activation_pass(n, r, &plan.variable) {
            continue;
        }
        for (slot, v) in n.inputs.iter().enumerate() {
            if let Some(v) = v
                && (slot > 0 || r.reads_input(&n.op))
            {
                needed[*v] = true;
            }
        }
        let signed = || n.input(0).is_some_and(|v| !nonneg[v]);
        if r.reads_output(&n.op) || (r.reads_output_over_signed_input(&n.op) && signed() && narrowing(g, n)) {
            for v in n.outputs.iter().flatten() {
                needed[*v] = true;
            }
        }
    }
    needed
}

/// Whether a linear node has no more output channels (features) than input ones, judged from its
/// constant weights: where z⁺ and αβ make their two-sign forward from the kept output (see
/// [`Rule::reads_output_over_signed_input`]). On wider outputs, as EfficientNet-Lite0's six-fold
/// expansions, reading the kept output cost more than the product it saves (an earlier session's
/// per-node times: 16 → 96 channels at 112×112 1.31 → 1.96 ms), and keeping it takes memory.
fn narrowing(g: &crate::graph::Graph, n: &crate::graph::Node) -> bool {
    let Some(w) = n.input(1).and_then(|v| g.consts.get(&v)) else { return false };
    let d = w.shape();
    match (&n.op, d.len()) {
        // [M, C/group, k...]: the input has C/group channels per group.
        (Op::Conv { group, .. }, r) if r >= 3 => d[0] <= d[1] * (*group).max(1),
        (Op::Gemm { trans_b: true, .. }, 2) => d[0] <= d[1],
        (Op::Gemm { trans_b: false, .. } | Op::MatMul, 2) => d[1] <= d[0],
        _ => false,
    }
}

/// An activation under the pass rule with one output and its first input the only variable one:
/// its relevance moves to that input as it is, with no value of the forward pass.
fn activation_pass(n: &crate::graph::Node, rule: &Rule, variable: &[bool]) -> bool {
    rule.reads_nothing(&n.op)
        && n.outputs.len() == 1
        && n.inputs.first().is_some_and(|i| i.is_some())
        && n.inputs.iter().skip(1).flatten().all(|v| !variable[*v])
}

/// For a node under the pass rule whose one output carries relevance of its one variable input's
/// shape (an activation), that (output, input); the general path handles every other case.
fn pass_through<T: Float>(
    n: &crate::graph::Node,
    rule: &Rule,
    env: &crate::graph::Env<T>,
    rel: &[Option<ArrayD<T>>],
    variable: &[bool],
    keep: &[ValueId],
) -> Option<(ValueId, ValueId)> {
    // An embedding lookup's integer indices count as its variable input in the general path.
    if !matches!(rule, Rule::Pass) || matches!(n.op, Op::Gather { .. }) {
        return None;
    }
    let [Some(o)] = n.outputs[..] else { return None };
    // An activation's input has the output's shape (and may not have been kept).
    if activation_pass(n, rule, variable)
        && let Some(Some(i)) = n.inputs.first().copied()
        && variable[i]
    {
        let r = rel[o].as_ref()?;
        let same = rel[i].as_ref().is_none_or(|a| a.shape() == r.shape());
        return (same && !keep.contains(&o) && i != o).then_some((o, i));
    }
    let mut vars = n.inputs.iter().flatten().filter(|&&v| variable[v] && matches!(env.get(v), Some(Value::F(_))));
    let (Some(&i), None) = (vars.next(), vars.next()) else { return None };
    let same = match (env.get(i), &rel[o]) {
        (Some(Value::F(x)), Some(r)) => {
            x.shape() == r.shape() && rel[i].as_ref().is_none_or(|a| a.shape() == r.shape())
        }
        _ => false,
    };
    (same && !keep.contains(&o) && i != o).then_some((o, i))
}

/// The index of the largest value in each sample (row of the first axis) of `out`.
pub fn argmax_rows<T: Float>(out: &ArrayD<T>) -> Vec<usize> {
    let batch = out.shape().first().copied().unwrap_or(1).max(1);
    let per = out.len() / batch;
    let flat: Vec<T> = out.iter().copied().collect();
    flat.chunks(per.max(1))
        .map(|row| row.iter().enumerate().fold((0, T::neg_infinity()), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0)
        .collect()
}

/// The modified weights of the plan's linear layers that their rules need (w⁺ for z⁺ and γ, w⁻ for
/// αβ and z^B, ...), computed once so that each explanation borrows them; keyed by node index.
pub fn weight_caches<T: Float>(plan: &Plan, consts: &HashMap<ValueId, Value<T>>) -> HashMap<usize, WeightCache<T>> {
    let g = &plan.graph;
    let work: Vec<(usize, &Rule, &[T])> = g
        .nodes
        .iter()
        .zip(&plan.rules)
        .enumerate()
        .filter_map(|(k, (n, rule))| {
            let rule = rule.as_ref()?;
            let Some(Value::F(w)) = consts.get(&n.input(1)?) else { return None };
            let ws = w.as_slice()?;
            // Only weights the rules use as stored (see rules::grad::linear_layer).
            let as_stored = match &n.op {
                Op::Conv { .. } => true,
                Op::Gemm { alpha, .. } => *alpha == 1.0 && w.ndim() == 2,
                Op::MatMul => w.ndim() == 2,
                _ => false,
            };
            as_stored.then_some((k, rule, ws))
        })
        .collect();
    // A convolution reading a threshold ReLU (a canonized DenseNet) knows which input channels
    // may be negative; per-channel thresholds only, one group.
    let signed = g.signed_channels();
    let signed_of = |k: usize| -> Option<Vec<usize>> {
        let n = &g.nodes[k];
        let Op::Conv { group: 1, .. } = n.op else { return None };
        let s = signed.get(&n.input(0)?)?;
        let c = g.consts.get(&n.input(1)?)?.shape().get(1).copied()?;
        s.iter().all(|&ch| ch < c).then(|| s.clone())
    };
    use rayon::prelude::*;
    work.into_par_iter()
        .map(|(k, rule, ws)| {
            let cache = WeightCache::build(rule, ws);
            (
                k,
                rule,
                match signed_of(k) {
                    Some(s) => cache.with_signed_channels(s),
                    None => cache,
                },
            )
        })
        // z^B keeps its shift per sample there (made on first use), the others what they map.
        .filter(|(_, rule, c)| !c.map.is_empty() || matches!(rule, Rule::ZBox))
        .map(|(k, _, c)| (k, c))
        .collect()
}

/// Converts the plan's constants once for repeated explanations.
pub fn consts<T: Float>(plan: &Plan) -> HashMap<ValueId, Value<T>> {
    prepare_consts(&plan.graph)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::{Method, Settings, prepare};
    use crate::canonize::Mode;
    use crate::composite::{Composite, Params};
    use crate::rules::Bounds;
    use crate::rules::grad::RuleOpts;

    fn plan(composite: &str) -> Plan {
        plan_of("vgg", composite)
    }

    /// The plan for a fixture's input and model (the bundled one for EfficientNet-Lite0).
    fn plan_of(fixture: &str, composite: &str) -> Plan {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("tests/fixtures").join(fixture);
        let model = match fixture {
            "efficientnet_lite0" => root.join("assets/models/efficientnet_lite0.onnx"),
            _ => dir.join("model.onnx"),
        };
        let g = crate::onnx::load(model).unwrap();
        let x: Value<f32> = crate::io::read_npy(&dir.join("input_0.npy")).unwrap();
        let method = Method::Lrp(Box::new(Composite::named(composite, &Params::default()).unwrap()));
        let opts = RuleOpts { bounds: Some(Bounds { low: vec![-3.0], high: vec![3.0] }), ..RuleOpts::default() };
        let s = Settings { method, canonize: Mode::Full, opts, tolerance: 1e-4 };
        prepare(&g, &[x], &s).unwrap().plan
    }

    #[test]
    fn every_zbox_and_sign_split_layer_has_a_weight_cache() {
        // z^B keeps its shift per sample in the cache, z⁺ and γ their modified weights: a layer
        // left without one recomputes them on every call.
        let p = plan_of("vgg", "epsilon_gamma_box");
        let caches = weight_caches::<f32>(&p, &consts::<f32>(&p));
        let mut seen = 0;
        for (k, (n, r)) in p.graph.nodes.iter().zip(&p.rules).enumerate() {
            if matches!(n.op, Op::Conv { .. }) && matches!(r, Some(Rule::ZBox | Rule::Gamma(_) | Rule::ZPlus)) {
                assert!(caches.contains_key(&k), "{} ({:?}) has no weight cache", n.name, r);
                seen += 1;
            }
        }
        assert!(p.rules.iter().any(|r| matches!(r, Some(Rule::ZBox))) && seen >= 3, "{seen} layers");
    }

    #[test]
    fn convolutions_after_threshold_relus_know_their_signed_channels() {
        // A canonized DenseNet: each BN → ReLU → Conv is a threshold ReLU and a convolution, whose
        // input is below zero only on the channels with a negative threshold (or kept below one).
        let p = plan_of("densenet", "epsilon_plus_flat");
        let caches = weight_caches::<f32>(&p, &consts::<f32>(&p));
        let g = &p.graph;
        let (mut seen, mut signed) = (0, 0);
        for (k, n) in g.nodes.iter().enumerate() {
            let (Op::Conv { .. }, Some(c)) = (&n.op, caches.get(&k)) else { continue };
            let producer = g.nodes.iter().find(|m| m.outputs.first() == Some(&n.input(0)));
            match producer.map(|m| &m.op) {
                Some(Op::ThreshRelu { thresholds, dirs }) => {
                    let want: Vec<usize> = (0..thresholds.len())
                        .filter(|&ch| dirs[ch] != 0 && (thresholds[ch] < 0.0 || dirs[ch] < 0))
                        .collect();
                    assert_eq!(c.signed_channels(), Some(&want[..]), "{}", n.name);
                    seen += 1;
                    signed += usize::from(!want.is_empty() && want.len() < thresholds.len());
                }
                _ => assert_eq!(c.signed_channels(), None, "{} reads no threshold ReLU", n.name),
            }
        }
        assert!(
            seen >= 2 && signed >= 1,
            "{seen} convolutions after threshold ReLUs, {signed} signed on some channels"
        );
    }

    /// The convolutions' outputs that feed a ReLU, and whether the forward pass keeps each.
    fn conv_outputs_kept(p: &Plan) -> Vec<bool> {
        let g = &p.graph;
        let needed = needed_values(p);
        g.nodes
            .iter()
            .filter(|n| matches!(n.op, Op::Conv { .. }))
            .filter_map(|n| n.outputs[0])
            .filter(|&y| g.nodes.iter().any(|m| matches!(m.op, Op::Relu) && m.input(0) == Some(y)))
            .map(|y| needed[y])
            .collect()
    }

    #[test]
    fn forward_keeps_only_what_the_rules_read() {
        // z⁺ makes its own denominators and the ReLUs pass relevance on: no convolution output
        // before a ReLU is kept, so each runs fused with its ReLU.
        let p = plan("epsilon_plus_flat");
        let kept = conv_outputs_kept(&p);
        assert!(kept.len() >= 2, "the fixture has convolutions before ReLUs");
        assert!(kept.iter().all(|k| !k), "{kept:?}");
        // Their inputs are still kept (z⁺ reads them).
        let needed = needed_values(&p);
        for (n, r) in p.graph.nodes.iter().zip(&p.rules) {
            if matches!(n.op, Op::Conv { .. }) && r.is_some() {
                assert!(needed[n.input(0).unwrap()], "input of {} not kept", n.name);
            }
        }
        // γ divides by the cached forward output: kept.
        let kept = conv_outputs_kept(&plan("epsilon_gamma_box"));
        assert!(kept.iter().all(|k| *k), "{kept:?}");
        // The gradient's ReLU masks read the ReLU's output, which is kept; the convolutions'
        // outputs are not.
        let p = plan("gradient");
        let kept = conv_outputs_kept(&p);
        assert!(kept.iter().all(|k| !k), "{kept:?}");
        let needed = needed_values(&p);
        for n in p.graph.nodes.iter().filter(|n| matches!(n.op, Op::Relu)) {
            assert!(needed[n.outputs[0].unwrap()], "output of {} not kept", n.name);
        }
    }

    #[test]
    fn z_plus_keeps_its_output_over_signed_inputs_of_narrowing_layers() {
        // DenseNet, fully canonized: 1×1 layers read threshold ReLUs (thresholds below zero: inputs
        // of both signs) and feed a ReLU; EfficientNet-Lite0's expansions read the projections
        // (no activation) and feed a ReLU6. Nothing else reads those outputs, so one is kept
        // exactly where z⁺ makes its forward from it: where the layer does not widen (DenseNet's
        // 1×1 layers, not the six-fold expansions). Outputs before a ReLU over non-negative inputs
        // are not kept: `forward_keeps_only_what_the_rules_read`.
        for (fixture, narrow_ones) in [("densenet", true), ("efficientnet_lite0", false)] {
            let p = plan_of(fixture, "epsilon_plus_flat");
            let g = &p.graph;
            let needed = needed_values(&p);
            let (nonneg, consumers) = (g.nonnegative(), g.consumers());
            let mut seen = [0, 0];
            for (n, r) in g.nodes.iter().zip(&p.rules) {
                let (Some(x), Some(y)) = (n.input(0), n.outputs[0]) else { continue };
                let into_act = consumers[y].iter().all(|&(i, _)| matches!(g.nodes[i].op, Op::Relu | Op::Clip { .. }));
                if !matches!(n.op, Op::Conv { .. }) || r.as_ref() != Some(&Rule::ZPlus) || nonneg[x] || !into_act {
                    continue;
                }
                let w = g.consts.get(&n.input(1).unwrap()).unwrap().shape().to_vec();
                let narrow = w[0] <= w[1];
                assert_eq!(needed[y], narrow, "{fixture} {}: weights {w:?}", n.name);
                seen[narrow as usize] += 1;
            }
            assert!(seen[narrow_ones as usize] >= 4, "{fixture}: {seen:?} (widening, not)");
        }
    }

    #[test]
    fn narrowing_compares_output_with_input_channels() {
        use crate::graph::ir::{AutoPad, Node, Window};
        let win = Window { kernel: None, strides: vec![], dilations: vec![], pads: vec![], auto_pad: AutoPad::NotSet };
        let conv = |group| Op::Conv { win: win.clone(), group };
        let gemm = |trans_b| Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b };
        // (op, weight shape, whether the output has no more channels or features than the input)
        let cases = [
            (conv(1), vec![8, 4, 1, 1], false),
            (conv(1), vec![4, 8, 1, 1], true),
            (conv(1), vec![8, 8, 3, 3], true),
            (conv(8), vec![8, 1, 3, 3], true), // depthwise
            (conv(4), vec![16, 1, 3, 3], false),
            (gemm(true), vec![10, 20], true),   // [n, k]
            (gemm(false), vec![10, 20], false), // [k, n]
            (Op::MatMul, vec![20, 10], true),
        ];
        for (op, shape, want) in cases {
            let mut g = Graph::default();
            let x = g.add_value("x");
            let w = g.add_value("w");
            g.consts.insert(w, crate::tensor::Const::float(ArrayD::zeros(ndarray::IxDyn(&shape))));
            let y = g.add_value("y");
            let n = Node {
                name: "n".into(),
                op,
                op_type: "T".into(),
                inputs: vec![Some(x), Some(w)],
                outputs: vec![Some(y)],
            };
            assert_eq!(narrowing(&g, &n), want, "{:?} {shape:?}", n.op);
        }
    }
}
