//! Forward evaluation of the IR, node by node.

use super::ir::*;
use crate::error::{Error, Result, node_err};
use crate::ops::conv::{ConvGeom, conv2d_onto};
use crate::ops::elementwise::{self, BinOp, apply_inplace, repeat_pattern};
use crate::ops::gemm::{Mat, Threads, matmul};
use crate::ops::lstm::{LstmWeights, lstm_direction};
use crate::ops::pool::{PoolGeom, avg_pool, max_pool_values};
use crate::tensor::{Float, Value, array};
use ndarray::{ArrayD, Axis, IxDyn, Slice, Zip};
use std::borrow::Cow;

type R<T> = std::result::Result<T, String>;

/// Values of one evaluation, by [`ValueId`]; constants are looked up in the graph's cache.
pub struct Env<'g, T> {
    graph: &'g Graph,
    consts: &'g std::collections::HashMap<ValueId, Value<T>>,
    /// Computed values (inputs and node outputs) still alive.
    pub values: Vec<Option<Value<T>>>,
}

impl<'g, T: Float> Env<'g, T> {
    /// The value with this id, whether constant or computed.
    pub fn get(&self, id: ValueId) -> Option<&Value<T>> {
        self.values[id].as_ref().or_else(|| self.consts.get(&id))
    }

    /// The graph evaluated.
    pub fn graph(&self) -> &Graph {
        self.graph
    }
}

/// Checks the supplied inputs against the graph's declared inputs.
pub fn check_inputs<T: Float>(g: &Graph, inputs: &[Value<T>]) -> Result<()> {
    if inputs.len() != g.inputs.len() {
        let names: Vec<&str> = g.inputs.iter().map(|i| g.names[i.id].as_str()).collect();
        return Err(Error::Inputs(format!(
            "the model has {} input(s) ({}), {} given",
            g.inputs.len(),
            names.join(", "),
            inputs.len()
        )));
    }
    for (inp, v) in g.inputs.iter().zip(inputs) {
        let name = &g.names[inp.id];
        let ok_kind = matches!((inp.kind, v), (ElemKind::Float, Value::F(_)) | (ElemKind::Int, Value::I(_)));
        if !ok_kind {
            let expected = if inp.kind == ElemKind::Float { "floating-point" } else { "integer" };
            return Err(Error::InputDtype { name: name.clone(), expected: expected.into(), got: v.dtype().into() });
        }
        if let Some(dims) = &inp.dims {
            let matches = dims.len() == v.shape().len()
                && dims.iter().zip(v.shape()).all(|(d, &s)| match d {
                    Dim::Fixed(f) => *f == s,
                    Dim::Free(_) => true,
                });
            if !matches {
                return Err(Error::InputShape {
                    name: name.clone(),
                    expected: format_dims(dims),
                    got: format!("{:?}", v.shape()),
                });
            }
        }
    }
    Ok(())
}

/// Renders declared dims like `[N, 3, 224, 224]`.
pub fn format_dims(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => n.to_string(),
            Dim::Free(s) if s.is_empty() => "?".into(),
            Dim::Free(s) => s.clone(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Converts the graph's constants to precision `T` once, for repeated runs.
pub fn prepare_consts<T: Float>(g: &Graph) -> std::collections::HashMap<ValueId, Value<T>> {
    g.consts.iter().map(|(k, v)| (*k, v.to_value())).collect()
}

/// Runs the graph and returns its outputs.
pub fn run<T: Float>(
    g: &Graph,
    consts: &std::collections::HashMap<ValueId, Value<T>>,
    inputs: Vec<Value<T>>,
) -> Result<Vec<Value<T>>> {
    // Sample by sample where the graph keeps samples apart (see `batch`): faster, and only the
    // running samples' activations alive. Checked on the whole batch first, so that errors name
    // the shapes the caller gave.
    check_inputs(g, &inputs)?;
    crate::ops::on_pool(|| {
        if let Some(parts) = super::batch::split_samples(g, &inputs) {
            use rayon::prelude::*;
            let outs: Vec<Vec<Value<T>>> =
                parts.into_par_iter().with_max_len(1).map(|p| run_batch(g, consts, p)).collect::<Result<_>>()?;
            let mut cols: Vec<Vec<Value<T>>> = vec![Vec::new(); g.outputs.len()];
            for o in outs {
                cols.iter_mut().zip(o).for_each(|(c, v)| c.push(v));
            }
            return cols.iter().map(|c| super::batch::concat_values(c).map_err(Error::Invalid)).collect();
        }
        crate::ops::hot(|| run_batch(g, consts, inputs))
    })
}

/// [`run`] on the whole batch at once.
fn run_batch<T: Float>(
    g: &Graph,
    consts: &std::collections::HashMap<ValueId, Value<T>>,
    inputs: Vec<Value<T>>,
) -> Result<Vec<Value<T>>> {
    let env = run_keep(g, consts, inputs, &|_| false)?;
    g.outputs
        .iter()
        .map(|&o| {
            env.get(o).cloned().ok_or_else(|| Error::Invalid(format!("output '{}' was not computed", g.names[o])))
        })
        .collect()
}

/// Runs the graph, keeping the values for which `keep` is true (and the outputs); other values
/// are dropped after their last use to bound memory.
pub fn run_keep<'g, T: Float>(
    g: &'g Graph,
    consts: &'g std::collections::HashMap<ValueId, Value<T>>,
    inputs: Vec<Value<T>>,
    keep: &(dyn Fn(ValueId) -> bool + Sync),
) -> Result<Env<'g, T>> {
    check_inputs(g, &inputs)?;
    crate::ops::on_pool(|| run_keep_checked(g, consts, inputs, keep))
}

/// [`run_keep`] after the input check, on the pool.
fn run_keep_checked<'g, T: Float>(
    g: &'g Graph,
    consts: &'g std::collections::HashMap<ValueId, Value<T>>,
    inputs: Vec<Value<T>>,
    keep: &(dyn Fn(ValueId) -> bool + Sync),
) -> Result<Env<'g, T>> {
    let mut env = Env { graph: g, consts, values: vec![None; g.names.len()] };
    for (inp, v) in g.inputs.iter().zip(inputs) {
        env.values[inp.id] = Some(v);
    }
    let last = g.last_use();
    // RELPROP_PROFILE=1 prints the time per op type and the slowest nodes to stderr (for finding
    // hot spots).
    let profile = std::env::var_os("RELPROP_PROFILE").is_some();
    let mut prof: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    let mut slow: Vec<(f64, usize)> = Vec::new();
    // Nodes still to skip: they ran inside the convolution before them (see `fusion`).
    let mut fused_into_previous = 0usize;
    for (ni, node) in g.nodes.iter().enumerate() {
        if fused_into_previous > 0 {
            fused_into_previous -= 1;
            continue;
        }
        let t0 = profile.then(std::time::Instant::now);
        let fused = fusion(g, ni, &env, &last, keep).map_err(|m| node_err(&node.name, &node.op_type, m))?;
        let dies = |i: ValueId| last[i] == ni && !keep(i) && !g.inputs.iter().any(|x| x.id == i);
        // An element-wise op whose input dies here works in place: no new buffer, no second pass
        // over fresh memory.
        let reuse = node.input(0).filter(|&i| {
            last[i] == ni
                && !keep(i)
                && !g.inputs.iter().any(|x| x.id == i)
                && matches!(env.values[i], Some(Value::F(_)))
        });
        // BatchNormalization in one pass: in its input's buffer when that dies here, with a ReLU
        // that alone reads its output (see `batch_norm`).
        let bn = match (&node.op, node.input(0), node.outputs.first().copied().flatten()) {
            (Op::BatchNorm { epsilon }, Some(x), Some(o))
                if fused.is_none() && matches!(env.get(x), Some(Value::F(_))) =>
            {
                let relu = g.nodes.get(ni + 1).is_some_and(|n| {
                    matches!(n.op, Op::Relu) && n.input(0) == Some(o) && last[o] == ni + 1 && !keep(o)
                });
                Some((*epsilon, x, relu))
            }
            _ => None,
        };
        let f = match reuse {
            Some(_) => {
                let ins: Vec<Option<&Value<T>>> = node.inputs.iter().map(|i| i.and_then(|id| env.get(id))).collect();
                elementwise(node, &ins).map_err(|m| node_err(&node.name, &node.op_type, m))?
            }
            None => None,
        };
        let outs = if let Some(f) = &fused {
            // The residual operand becomes the output buffer: moved when this is its last use
            // (and the convolution does not read it), copied otherwise.
            let init = match f.skip {
                Some(s)
                    if last[s] == ni + 1
                        && !keep(s)
                        && !g.inputs.iter().any(|x| x.id == s)
                        && !node.inputs.contains(&Some(s)) =>
                {
                    env.values[s].take()
                }
                Some(s) => env.values[s].clone(),
                None => None,
            };
            let init = match init {
                Some(Value::F(a)) => Some(into_vec(a)),
                _ => None,
            };
            let ins: Vec<Option<&Value<T>>> = node.inputs.iter().map(|i| i.and_then(|id| env.get(id))).collect();
            fused_into_previous = f.nodes;
            eval_conv(node, &ins, f.clamp, init).map_err(|m| node_err(&node.name, &node.op_type, m))?
        } else if let Some((epsilon, x, relu)) = bn {
            // The input's own buffer when it dies here (`reuse` checked that it is a float).
            let owned = reuse
                .filter(|&i| i == x && node.inputs.iter().filter(|v| **v == Some(x)).count() == 1)
                .and_then(|i| match env.values[i].take() {
                    Some(Value::F(a)) => Some(a),
                    _ => None,
                });
            let ins: Vec<Option<&Value<T>>> = node.inputs.iter().map(|i| i.and_then(|id| env.get(id))).collect();
            let x: ndarray::CowArray<'_, T, ndarray::IxDyn> = match (owned, ins.first().copied().flatten()) {
                (Some(a), _) => a.into(),
                (None, Some(Value::F(a))) => a.view().into(),
                _ => return Err(node_err(&node.name, &node.op_type, "input 0 has not been computed")),
            };
            fused_into_previous = usize::from(relu);
            vec![Value::F(batch_norm(x, &ins, epsilon, relu).map_err(|m| node_err(&node.name, &node.op_type, m))?)]
        } else if let (Some(i), Some(f)) = (reuse, f) {
            let mut v = env.values[i].take();
            if let Some(Value::F(a)) = &mut v {
                f.apply(a);
            }
            v.into_iter().collect()
        } else if let Some(v) = binary_in_dying_input(node, &mut env, &dies) {
            vec![v]
        } else {
            let ins: Vec<Option<&Value<T>>> = node.inputs.iter().map(|i| i.and_then(|id| env.get(id))).collect();
            for (k, (i, v)) in node.inputs.iter().zip(&ins).enumerate() {
                if i.is_some() && v.is_none() {
                    return Err(node_err(&node.name, &node.op_type, format!("input {k} has not been computed")));
                }
            }
            eval_node(node, &ins)?
        };
        if let Some(t0) = t0 {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            // Convolutions by kind: their kernels differ (GEMM, im2col + GEMM, depthwise rows).
            let key = match &node.op {
                Op::Conv { group, .. } if *group > 1 => format!("{} depthwise/grouped", node.op_type),
                Op::Conv { .. }
                    if node
                        .input(1)
                        .and_then(|w| env.get(w))
                        .is_some_and(|w| w.shape().iter().skip(2).all(|&k| k == 1)) =>
                {
                    format!("{} 1x1", node.op_type)
                }
                _ => node.op_type.clone(),
            };
            let e = prof.entry(key).or_default();
            e.0 += ms;
            e.1 += 1;
            slow.push((ms, ni));
        }
        // The last fused node's output is the group's output.
        let out_ids =
            &g.nodes[ni + fused.as_ref().map_or(0, |f| f.nodes) + usize::from(bn.is_some_and(|b| b.2))].outputs;
        for (o, v) in out_ids.iter().zip(outs) {
            if let Some(o) = o {
                env.values[*o] = Some(v);
            }
        }
        for i in node.inputs.iter().flatten() {
            if last[*i] == ni && !keep(*i) && !g.inputs.iter().any(|x| x.id == *i) {
                env.values[*i] = None;
            }
        }
    }
    if profile {
        for (op, (ms, n)) in &prof {
            eprintln!("profile: {op:<20} {n:>4} nodes {ms:>9.3} ms");
        }
        slow.sort_by(|a, b| b.0.total_cmp(&a.0));
        // RELPROP_PROFILE=all lists every node, otherwise the slowest twelve.
        let top = if std::env::var("RELPROP_PROFILE").is_ok_and(|v| v == "all") { slow.len() } else { 12 };
        for (ms, ni) in slow.iter().take(top) {
            let n = &g.nodes[*ni];
            let shapes: Vec<String> =
                n.inputs.iter().flatten().filter_map(|v| env.get(*v)).map(|v| format!("{:?}", v.shape())).collect();
            eprintln!(
                "profile: {ms:>7.3} ms  {:<12} {} {} {}",
                n.op_type,
                n.name,
                shapes.join(" "),
                if let Op::Conv { group, .. } = n.op { format!("group {group}") } else { String::new() }
            );
        }
    }
    Ok(env)
}

/// Evaluates an Add/Sub/Mul/Div node in the buffer of a float input that dies here and already has
/// the output's shape; None (nothing taken) when no input qualifies.
fn binary_in_dying_input<T: Float>(
    node: &Node,
    env: &mut Env<'_, T>,
    dies: &dyn Fn(ValueId) -> bool,
) -> Option<Value<T>> {
    let op = bin_op(&node.op)?;
    let (a, b) = (node.input(0)?, node.input(1)?);
    if a == b || node.inputs.len() != 2 {
        return None;
    }
    for (k, (mine, other)) in [(a, b), (b, a)].into_iter().enumerate() {
        if !dies(mine) || !matches!(env.values[mine], Some(Value::F(_))) {
            continue;
        }
        let Some(Value::F(o)) = env.get(other) else { return None };
        let Some(Value::F(m)) = &env.values[mine] else { continue };
        if broadcast_shape(m.shape(), o.shape()).ok()? != m.shape() || !m.is_standard_layout() {
            continue;
        }
        let Some(Value::F(mut d)) = env.values[mine].take() else { continue };
        let Some(Value::F(o)) = env.get(other) else { return None };
        if binary_inplace(op, &mut d, o, k == 0) {
            return Some(Value::F(d));
        }
        env.values[mine] = Some(Value::F(d));
    }
    None
}

fn float<'a, T: Float>(ins: &[Option<&'a Value<T>>], i: usize) -> R<&'a ArrayD<T>> {
    match ins.get(i).copied().flatten() {
        Some(Value::F(a)) => Ok(a),
        Some(Value::I(_)) => Err(format!("input {i} must be floating point, got integers")),
        None => Err(format!("input {i} is required")),
    }
}

fn value<'a, T: Float>(ins: &[Option<&'a Value<T>>], i: usize) -> R<&'a Value<T>> {
    ins.get(i).copied().flatten().ok_or_else(|| format!("input {i} is required"))
}

fn ints<T: Float>(ins: &[Option<&Value<T>>], i: usize) -> R<Option<Vec<i64>>> {
    Ok(ins.get(i).copied().flatten().map(|v| v.to_int().iter().copied().collect()))
}

fn scalar<T: Float>(ins: &[Option<&Value<T>>], i: usize) -> R<Option<T>> {
    match ins.get(i).copied().flatten() {
        None => Ok(None),
        Some(v) => {
            let a = v.to_float();
            if a.len() != 1 {
                return Err(format!("input {i} must be a scalar, has shape {:?}", a.shape()));
            }
            Ok(a.iter().next().copied())
        }
    }
}

fn norm_axis(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// The broadcast shape of two shapes (numpy rules).
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> R<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(format!("shapes {a:?} and {b:?} do not broadcast"));
        };
    }
    Ok(out)
}

fn zip2<A: Clone, B: Clone, C>(a: &ArrayD<A>, b: &ArrayD<B>, f: impl Fn(A, B) -> C) -> R<ArrayD<C>> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    let av = a.broadcast(IxDyn(&shape)).ok_or("broadcast failed")?;
    let bv = b.broadcast(IxDyn(&shape)).ok_or("broadcast failed")?;
    Ok(Zip::from(&av).and(&bv).map_collect(|x, y| f(x.clone(), y.clone())))
}

fn binary<T: Float>(a: &Value<T>, b: &Value<T>, op: BinOp, fi: fn(i64, i64) -> i64) -> R<Value<T>> {
    let (x, y) = match (a, b) {
        (Value::I(x), Value::I(y)) => return Ok(Value::I(zip2(x, y, fi)?)),
        (Value::F(x), Value::F(y)) => (Cow::Borrowed(x), Cow::Borrowed(y)),
        _ => (Cow::Owned(a.to_float()), Cow::Owned(b.to_float())),
    };
    let shape = broadcast_shape(x.shape(), y.shape())?;
    // Copy the full-shape operand once and combine the other into it.
    for (full, other, left) in [(&x, &y, true), (&y, &x, false)] {
        if full.shape() == shape.as_slice() {
            let mut d = full.as_standard_layout().into_owned();
            if binary_inplace(op, &mut d, other, left) {
                return Ok(Value::F(d));
            }
        }
    }
    let f = match op {
        BinOp::Add => |a: T, b: T| a + b,
        BinOp::Sub => |a: T, b: T| a - b,
        BinOp::Mul => |a: T, b: T| a * b,
        BinOp::Div => |a: T, b: T| a / b,
    };
    Ok(Value::F(zip2(&x, &y, f)?))
}

/// `dst = op(dst, other)` (or `op(other, dst)` when `dst_is_left` is false) in place; false, with
/// `dst` untouched, when `other` does not broadcast to `dst` as a simple repeat.
fn binary_inplace<T: Float>(op: BinOp, dst: &mut ArrayD<T>, other: &ArrayD<T>, dst_is_left: bool) -> bool {
    let Some(rep) = repeat_pattern(dst.shape(), other.shape()) else { return false };
    let Some(d) = dst.as_slice_mut() else { return false };
    apply_inplace(op, d, &std_slice(other), rep, dst_is_left);
    true
}

/// The arithmetic of an Add/Sub/Mul/Div node.
fn bin_op(op: &Op) -> Option<BinOp> {
    Some(match op {
        Op::Add => BinOp::Add,
        Op::Sub => BinOp::Sub,
        Op::Mul => BinOp::Mul,
        Op::Div => BinOp::Div,
        _ => return None,
    })
}

/// Binds `f` to the activation's scalar function, one monomorphic closure per arm.
macro_rules! with_act_fn {
    ($act:expr, |$f:ident| $body:expr) => {{
        let (zero, one) = (T::zero(), T::one());
        match $act {
            Act::Relu => {
                let $f = move |v: T| if v > zero { v } else { zero };
                $body
            }
            Act::Clip(lo, hi) => {
                let $f = move |v: T| elementwise::clamp(v, lo, hi);
                $body
            }
            Act::Leaky(al) => {
                let $f = move |v: T| if v >= zero { v } else { al * v };
                $body
            }
            Act::Sigmoid => {
                let $f = move |v: T| one / (one + (-v).exp());
                $body
            }
            Act::Tanh => {
                let $f = |v: T| v.tanh();
                $body
            }
            Act::HardSigmoid(al, b) => {
                let $f = move |v: T| elementwise::clamp(al * v + b, zero, one);
                $body
            }
            Act::HardSwish => {
                let (al, b) = (T::of(1.0 / 6.0), T::of(0.5));
                let $f = move |v: T| v * elementwise::clamp(al * v + b, zero, one);
                $body
            }
            Act::Sqrt => {
                let $f = |v: T| v.sqrt();
                $body
            }
        }
    }};
}

/// An element-wise activation with its parameters, applied in place by [`Act::apply`].
#[derive(Clone, Copy)]
enum Act<T> {
    Relu,
    Clip(T, T),
    Leaky(T),
    Sigmoid,
    Tanh,
    HardSigmoid(T, T),
    HardSwish,
    Sqrt,
}

impl<T: Float> Act<T> {
    /// Applies the activation in place; each arm is its own monomorphic loop (a boxed closure per
    /// element was 10× slower), split over threads for large tensors.
    fn apply(self, a: &mut ArrayD<T>) {
        fn run<T: Float>(a: &mut ArrayD<T>, f: impl Fn(T) -> T + Sync) {
            match a.as_slice_mut() {
                Some(s) if s.len() >= 1 << 16 => {
                    use rayon::prelude::*;
                    s.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
                }
                _ => a.mapv_inplace(f),
            }
        }
        with_act_fn!(self, |f| run(a, f))
    }

    /// The activation of `a` into a new array, in one pass (when the input is kept, copying it
    /// first and then applying in place read and wrote the data twice).
    fn apply_to(self, a: &ArrayD<T>) -> ArrayD<T> {
        fn run<T: Float>(a: &ArrayD<T>, f: impl Fn(T) -> T + Sync) -> ArrayD<T> {
            match a.as_slice() {
                // Chunks written into the uninitialised output (rayon's element-wise
                // `collect_into_vec` ran scalar).
                Some(s) => array(a.shape(), elementwise::map1(s, f)),
                None => a.mapv(f),
            }
        }
        with_act_fn!(self, |f| run(a, f))
    }
}

/// The activation a node computes on a float input (None for other ops).
fn elementwise<T: Float>(node: &Node, ins: &[Option<&Value<T>>]) -> R<Option<Act<T>>> {
    if !matches!(ins.first().copied().flatten(), Some(Value::F(_))) {
        return Ok(None);
    }
    Ok(match &node.op {
        Op::Relu => Some(Act::Relu),
        Op::Clip { min, max } => {
            let lo = scalar(ins, 1)?.or(min.map(T::of)).unwrap_or(T::neg_infinity());
            let hi = scalar(ins, 2)?.or(max.map(T::of)).unwrap_or(T::infinity());
            Some(Act::Clip(lo, hi))
        }
        Op::LeakyRelu { alpha } => Some(Act::Leaky(T::of(*alpha))),
        Op::Sigmoid => Some(Act::Sigmoid),
        Op::Tanh => Some(Act::Tanh),
        Op::HardSigmoid { alpha, beta } => Some(Act::HardSigmoid(T::of(*alpha), T::of(*beta))),
        Op::HardSwish => Some(Act::HardSwish),
        Op::Sqrt => Some(Act::Sqrt),
        _ => None,
    })
}

/// BatchNormalization `y = (x − mean)·scale/√(var + ε) + bias` per channel (then ReLU when
/// `relu`), in x's own buffer when it is owned (x dies here) or into a new array: one pass over
/// memory.
/// Cloning x and then scaling it in place, with the ReLU after it, was three (DenseNet-121's
/// BatchNorm and ReLU after each concatenation: 1.8 ms of its 19 ms forward).
fn batch_norm<T: Float>(
    x: ndarray::CowArray<'_, T, ndarray::IxDyn>,
    ins: &[Option<&Value<T>>],
    epsilon: f64,
    relu: bool,
) -> R<ArrayD<T>> {
    let params: Vec<Vec<T>> = (1..5).map(|i| float(ins, i).map(|a| std_slice(a).into_owned())).collect::<R<_>>()?;
    if x.ndim() < 2 {
        return Err(format!("input must have rank ≥ 2, got {:?}", x.shape()));
    }
    let c = x.shape()[1];
    if params.iter().any(|p| p.len() != c) {
        return Err(format!("scale/bias/mean/var must have {c} elements"));
    }
    let inner: usize = x.shape()[2..].iter().product();
    let (scale, shift): (Vec<T>, Vec<T>) = (0..c)
        .map(|ch| {
            let s = params[0][ch] / (params[3][ch] + T::of(epsilon)).sqrt();
            (s, params[1][ch] - params[2][ch] * s)
        })
        .unzip();
    // The ReLU as the Relu node computes it (NaN to zero included).
    let f = move |v: T, a: T, b: T| {
        let y = v * a + b;
        if !relu || y > T::zero() { y } else { T::zero() }
    };
    // One channel plane per task: a per-element channel index (a division) cost 10× the arithmetic.
    if x.is_owned() && x.is_standard_layout() {
        let mut y = x.into_owned();
        let ys = y.as_slice_mut().ok_or("non-contiguous BatchNormalization input")?;
        let plane = |(k, p): (usize, &mut [T])| {
            let (a, b) = (scale[k % c], shift[k % c]);
            p.iter_mut().for_each(|v| *v = f(*v, a, b));
        };
        if inner > 0 && ys.len() >= 1 << 16 {
            use rayon::prelude::*;
            ys.par_chunks_mut(inner).enumerate().for_each(plane);
        } else if inner > 0 {
            ys.chunks_mut(inner).enumerate().for_each(plane);
        }
        return Ok(y);
    }
    let xs = x.as_standard_layout();
    let xs = xs.as_slice().ok_or("non-contiguous BatchNormalization input")?;
    // Every element is written below: the buffer starts uninitialised (zeroing it was one more
    // pass).
    let mut out: Vec<T> = Vec::with_capacity(xs.len());
    let plane = |(k, (p, q)): (usize, (&mut [std::mem::MaybeUninit<T>], &[T]))| {
        let (a, b) = (scale[k % c], shift[k % c]);
        p.iter_mut().zip(q).for_each(|(o, &v)| {
            o.write(f(v, a, b));
        });
    };
    let ys = &mut out.spare_capacity_mut()[..xs.len()];
    if inner > 0 && xs.len() >= 1 << 16 {
        use rayon::prelude::*;
        ys.par_chunks_mut(inner).zip(xs.par_chunks(inner)).enumerate().for_each(plane);
    } else if inner > 0 {
        ys.chunks_mut(inner).zip(xs.chunks(inner)).enumerate().for_each(plane);
    }
    // SAFETY: the chunks above cover all xs.len() elements (inner > 0), or there are none.
    unsafe { out.set_len(if inner > 0 { xs.len() } else { 0 }) };
    let y = ArrayD::from_shape_vec(x.raw_dim(), out).map_err(|e| e.to_string())?;
    Ok(y)
}

fn unary<T: Float>(ins: &[Option<&Value<T>>], f: impl Fn(T) -> T) -> R<Vec<Value<T>>> {
    Ok(vec![Value::F(float(ins, 0)?.mapv(f))])
}

fn map_value<T: Float>(
    v: &Value<T>,
    f: impl Fn(&ArrayD<T>) -> R<ArrayD<T>>,
    g: impl Fn(&ArrayD<i64>) -> R<ArrayD<i64>>,
) -> R<Value<T>> {
    Ok(match v {
        Value::F(a) => Value::F(f(a)?),
        Value::I(a) => Value::I(g(a)?),
    })
}

fn reshape<A: Clone>(a: &ArrayD<A>, shape: &[usize]) -> R<ArrayD<A>> {
    let n: usize = shape.iter().product();
    if n != a.len() {
        return Err(format!("cannot reshape {:?} ({} elements) to {:?}", a.shape(), a.len(), shape));
    }
    let data: Vec<A> = a.iter().cloned().collect();
    Ok(array(shape, data))
}

fn reshape_target(input: &[usize], spec: &[i64], allowzero: bool) -> R<Vec<usize>> {
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => {
                out.push(*input.get(i).ok_or_else(|| format!("shape {spec:?} copies axis {i} of {input:?}"))?)
            }
            s if s >= 0 => out.push(s as usize),
            _ => return Err(format!("invalid target shape {spec:?}")),
        }
    }
    let total: usize = input.iter().product();
    if let Some(i) = infer {
        let rest: usize = out.iter().product();
        if rest == 0 || !total.is_multiple_of(rest) {
            return Err(format!("cannot reshape {input:?} to {spec:?}"));
        }
        out[i] = total / rest;
    }
    Ok(out)
}

fn transpose<A: Clone>(a: &ArrayD<A>, perm: &[usize]) -> ArrayD<A> {
    a.view().permuted_axes(IxDyn(perm)).as_standard_layout().into_owned()
}

fn slice_axis<A: Clone>(a: &ArrayD<A>, axis: usize, start: i64, end: i64, step: i64) -> ArrayD<A> {
    let sl = if step > 0 {
        Slice::new(start as isize, Some(end as isize), step as isize)
    } else {
        // ndarray walks a negative-step range from its end: [end+1, start+1) backwards.
        Slice::new((end + 1) as isize, Some((start + 1) as isize), step as isize)
    };
    if (step > 0 && start >= end) || (step < 0 && start <= end) {
        let mut shape = a.shape().to_vec();
        shape[axis] = 0;
        return ArrayD::from_shape_vec(IxDyn(&shape), vec![]).expect("empty array");
    }
    a.slice_axis(Axis(axis), sl).to_owned()
}

/// Clamps ONNX slice bounds for an axis of length `len` (spec semantics, including negative steps).
fn clamp_slice(start: i64, end: i64, step: i64, len: usize) -> (i64, i64) {
    let l = len as i64;
    let fix = |v: i64| if v < 0 { v + l } else { v };
    let (s, e) = (fix(start), fix(end));
    if step > 0 { (s.clamp(0, l), e.clamp(0, l)) } else { (s.clamp(-1, l - 1), e.clamp(-1, l - 1)) }
}

fn concat<A: Clone>(arrs: &[&ArrayD<A>], axis: usize) -> R<ArrayD<A>> {
    // Contiguous parts that agree off `axis`: per index of the axes before it, each part holds one
    // contiguous run, copied whole (ndarray's general concatenate assigns through strided views;
    // DenseNet-121's 58 growing concatenations were a sixth of its forward pass).
    if let Some(first) = arrs.first() {
        let agree = |a: &&ArrayD<A>| {
            a.as_slice().is_some()
                && a.ndim() == first.ndim()
                && a.shape().iter().zip(first.shape()).enumerate().all(|(d, (n, m))| d == axis || n == m)
        };
        if axis < first.ndim() && arrs.iter().all(agree) {
            let outer: usize = first.shape()[..axis].iter().product();
            let mut shape = first.shape().to_vec();
            shape[axis] = arrs.iter().map(|a| a.shape()[axis]).sum();
            let mut out = Vec::with_capacity(shape.iter().product());
            for o in 0..outer {
                for a in arrs {
                    let run = a.len() / outer;
                    out.extend_from_slice(&a.as_slice().unwrap_or(&[])[o * run..(o + 1) * run]);
                }
            }
            return ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| format!("cannot concatenate: {e}"));
        }
    }
    let views: Vec<_> = arrs.iter().map(|a| a.view()).collect();
    ndarray::concatenate(Axis(axis), &views).map_err(|e| format!("cannot concatenate: {e}"))
}

fn gather<A: Clone>(a: &ArrayD<A>, idx: &ArrayD<i64>, axis: usize) -> R<ArrayD<A>> {
    let len = a.shape()[axis] as i64;
    let mut flat = Vec::with_capacity(idx.len());
    for &i in idx.iter() {
        let j = if i < 0 { i + len } else { i };
        if j < 0 || j >= len {
            return Err(format!("index {i} is out of range for axis {axis} of size {len}"));
        }
        flat.push(j as usize);
    }
    let sel = a.select(Axis(axis), &flat);
    let mut shape: Vec<usize> = a.shape()[..axis].to_vec();
    shape.extend_from_slice(idx.shape());
    shape.extend_from_slice(&a.shape()[axis + 1..]);
    reshape(&sel, &shape)
}

fn pad_array<A: Clone>(a: &ArrayD<A>, pads: &[i64], mode: PadMode, fill: A) -> R<ArrayD<A>> {
    let r = a.ndim();
    if pads.len() != 2 * r {
        return Err(format!("pads {pads:?} must have 2 × rank = {} entries", 2 * r));
    }
    let mut shape = Vec::with_capacity(r);
    for d in 0..r {
        let n = a.shape()[d] as i64 + pads[d] + pads[d + r];
        if n < 0 {
            return Err(format!("pads {pads:?} remove more than axis {d} holds"));
        }
        if mode == PadMode::Reflect
            && (pads[d] >= a.shape()[d] as i64 || pads[d + r] >= a.shape()[d] as i64)
            && (pads[d] > 0 || pads[d + r] > 0)
        {
            return Err(format!("reflect pads {pads:?} must be smaller than axis {d} ({})", a.shape()[d]));
        }
        shape.push(n as usize);
    }
    let src = a.as_standard_layout();
    let mut idx = vec![0usize; r];
    let out = ArrayD::from_shape_fn(IxDyn(&shape), |ix| {
        for d in 0..r {
            let len = a.shape()[d] as i64;
            let mut p = ix[d] as i64 - pads[d];
            if p < 0 || p >= len {
                match mode {
                    PadMode::Constant => return fill.clone(),
                    PadMode::Edge => p = p.clamp(0, len - 1),
                    PadMode::Reflect => {
                        let period = 2 * (len - 1).max(1);
                        p = p.rem_euclid(period);
                        if p >= len {
                            p = period - p;
                        }
                    }
                }
            }
            idx[d] = p as usize;
        }
        src[IxDyn(&idx)].clone()
    });
    Ok(out)
}

struct Geom2 {
    stride: [usize; 2],
    dilation: [usize; 2],
    pads: [usize; 4],
}

/// Resolves a 1-d or 2-d window to 2-d form, computing `auto_pad`.
fn window2(win: &Window, spatial: &[usize], kernel: &[usize]) -> R<Geom2> {
    let nd = spatial.len();
    if nd == 0 || nd > 2 || kernel.len() != nd {
        return Err(format!("only 1-d and 2-d windows are supported (spatial shape {spatial:?}, kernel {kernel:?})"));
    }
    let get = |v: &Vec<usize>, i: usize, d: usize| if v.is_empty() { d } else { v[i] };
    if !win.strides.is_empty() && win.strides.len() != nd || !win.dilations.is_empty() && win.dilations.len() != nd {
        return Err("strides/dilations do not match the spatial rank".into());
    }
    let strides: Vec<usize> = (0..nd).map(|i| get(&win.strides, i, 1)).collect();
    let dil: Vec<usize> = (0..nd).map(|i| get(&win.dilations, i, 1)).collect();
    let mut pb = vec![0; nd];
    let mut pe = vec![0; nd];
    match win.auto_pad {
        AutoPad::NotSet => {
            if !win.pads.is_empty() {
                if win.pads.len() != 2 * nd {
                    return Err(format!("pads {:?} must have {} entries", win.pads, 2 * nd));
                }
                pb.copy_from_slice(&win.pads[..nd]);
                pe.copy_from_slice(&win.pads[nd..]);
            }
        }
        AutoPad::Valid => {}
        AutoPad::SameUpper | AutoPad::SameLower => {
            for i in 0..nd {
                let out = spatial[i].div_ceil(strides[i]);
                let eff = dil[i] * (kernel[i] - 1) + 1;
                let total = ((out - 1) * strides[i] + eff).saturating_sub(spatial[i]);
                let small = total / 2;
                if win.auto_pad == AutoPad::SameUpper {
                    pb[i] = small;
                    pe[i] = total - small;
                } else {
                    pb[i] = total - small;
                    pe[i] = small;
                }
            }
        }
    }
    Ok(if nd == 1 {
        Geom2 { stride: [1, strides[0]], dilation: [1, dil[0]], pads: [0, pb[0], 0, pe[0]] }
    } else {
        Geom2 { stride: [strides[0], strides[1]], dilation: [dil[0], dil[1]], pads: [pb[0], pb[1], pe[0], pe[1]] }
    })
}

/// The 2-d geometry of a Conv node for input shape `x` and weight shape `w`.
pub fn conv_geom(win: &Window, group: usize, x: &[usize], w: &[usize]) -> R<ConvGeom> {
    if x.len() != w.len() || !(x.len() == 3 || x.len() == 4) {
        return Err(format!("input {x:?} and weight {w:?} must both be rank 3 or both rank 4"));
    }
    let spatial = &x[2..];
    let kernel = &w[2..];
    if let Some(k) = &win.kernel
        && k.as_slice() != kernel
    {
        return Err(format!("kernel_shape {k:?} does not match weight {w:?}"));
    }
    let g2 = window2(win, spatial, kernel)?;
    let (h, wd, kh, kw) = if x.len() == 3 { (1, x[2], 1, w[2]) } else { (x[2], x[3], w[2], w[3]) };
    if group == 0 || x[1] != w[1] * group || !w[0].is_multiple_of(group) {
        return Err(format!("input channels {} and weight {w:?} do not fit group = {group}", x[1]));
    }
    let g = ConvGeom {
        n: x[0],
        c: x[1],
        h,
        w: wd,
        m: w[0],
        kh,
        kw,
        stride: g2.stride,
        dilation: g2.dilation,
        pads: g2.pads,
        group,
    };
    if g.out_hw().is_none() || kh == 0 || kw == 0 {
        return Err(format!("kernel {kernel:?} does not fit input {x:?} with pads {:?}", g.pads));
    }
    Ok(g)
}

/// The 2-d geometry of a pooling node for input shape `x`.
pub fn pool_geom(win: &Window, x: &[usize], ceil_mode: bool, count_include_pad: bool) -> R<PoolGeom> {
    if !(x.len() == 3 || x.len() == 4) {
        return Err(format!("pooling needs a rank 3 or 4 input, got {x:?}"));
    }
    let kernel = win.kernel.clone().ok_or("kernel_shape is required")?;
    let g2 = window2(win, &x[2..], &kernel)?;
    let (h, w, k) = if x.len() == 3 { (1, x[2], [1, kernel[0]]) } else { (x[2], x[3], [kernel[0], kernel[1]]) };
    let g = PoolGeom {
        planes: x[0] * x[1],
        h,
        w,
        kernel: k,
        stride: g2.stride,
        dilation: g2.dilation,
        pads: g2.pads,
        ceil_mode,
        count_include_pad,
    };
    if g.out_hw().is_none() || k.contains(&0) {
        return Err(format!("kernel {kernel:?} does not fit input {x:?}"));
    }
    Ok(g)
}

fn pool_out_shape(x: &[usize], oh: usize, ow: usize) -> Vec<usize> {
    if x.len() == 3 { vec![x[0], x[1], ow] } else { vec![x[0], x[1], oh, ow] }
}

/// numpy-style matmul of float arrays.
pub fn matmul_nd<T: Float>(a: &ArrayD<T>, b: &ArrayD<T>) -> R<ArrayD<T>> {
    if a.ndim() == 0 || b.ndim() == 0 {
        return Err("MatMul operands must have rank ≥ 1".into());
    }
    let a2 = if a.ndim() == 1 { a.view().insert_axis(Axis(0)).to_owned() } else { a.clone() };
    let b2 = if b.ndim() == 1 { b.view().insert_axis(Axis(1)).to_owned() } else { b.clone() };
    let (m, k) = (a2.shape()[a2.ndim() - 2], a2.shape()[a2.ndim() - 1]);
    let (k2, n) = (b2.shape()[b2.ndim() - 2], b2.shape()[b2.ndim() - 1]);
    if k != k2 {
        return Err(format!("MatMul shapes {:?} and {:?} do not align", a.shape(), b.shape()));
    }
    let batch = broadcast_shape(&a2.shape()[..a2.ndim() - 2], &b2.shape()[..b2.ndim() - 2])?;
    let mut sa = batch.clone();
    sa.extend([m, k]);
    let mut sb = batch.clone();
    sb.extend([k, n]);
    let av = a2.broadcast(IxDyn(&sa)).ok_or("broadcast failed")?.as_standard_layout().into_owned();
    let bv = b2.broadcast(IxDyn(&sb)).ok_or("broadcast failed")?.as_standard_layout().into_owned();
    let nb: usize = batch.iter().product();
    let (ad, bd) = (av.as_slice().ok_or("layout")?, bv.as_slice().ok_or("layout")?);
    let mut out = vec![T::zero(); nb * m * n];
    for i in 0..nb {
        matmul(
            m,
            n,
            k,
            Mat::rows(&ad[i * m * k..(i + 1) * m * k], k),
            Mat::rows(&bd[i * k * n..(i + 1) * k * n], n),
            &mut out[i * m * n..(i + 1) * m * n],
            false,
            Threads::Pool,
        );
    }
    let mut shape = batch;
    if a.ndim() > 1 {
        shape.push(m);
    }
    if b.ndim() > 1 {
        shape.push(n);
    }
    Ok(array(&shape, out))
}

fn std_slice<T: Clone>(a: &ArrayD<T>) -> std::borrow::Cow<'_, [T]> {
    match a.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.iter().cloned().collect()),
    }
}

fn softmax<T: Float>(x: &ArrayD<T>, axis: usize, legacy: bool) -> ArrayD<T> {
    let shape = x.shape().to_vec();
    let (outer, inner_len, stride) = if legacy {
        let o: usize = shape[..axis].iter().product();
        (o, shape[axis..].iter().product::<usize>(), 1)
    } else {
        let o: usize = shape[..axis].iter().product::<usize>() * shape[axis + 1..].iter().product::<usize>();
        (o, shape[axis], shape[axis + 1..].iter().product::<usize>())
    };
    let data = std_slice(x);
    let mut out = data.to_vec();
    for o in 0..outer {
        let base = if legacy { o * inner_len } else { (o / stride) * inner_len * stride + o % stride };
        let idx = |j: usize| base + j * stride;
        let mx = (0..inner_len).map(|j| data[idx(j)]).fold(T::neg_infinity(), T::max);
        let mut s = T::zero();
        for j in 0..inner_len {
            let e = (data[idx(j)] - mx).exp();
            out[idx(j)] = e;
            s += e;
        }
        for j in 0..inner_len {
            out[idx(j)] /= s;
        }
    }
    array(&shape, out)
}

fn lstm<T: Float>(
    node: &Node,
    ins: &[Option<&Value<T>>],
    hidden: usize,
    direction: Direction,
    batch_first: bool,
) -> R<Vec<Value<T>>> {
    let mut x = float(ins, 0)?.clone();
    let w = float(ins, 1)?;
    let r = float(ins, 2)?;
    if x.ndim() != 3 {
        return Err(format!("X must be rank 3, got {:?}", x.shape()));
    }
    if batch_first {
        x = transpose(&x, &[1, 0, 2]);
    }
    if ins.get(7).copied().flatten().is_some() {
        return Err("peephole weights (input P) are not supported".into());
    }
    let (seq, batch, isz) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let dirs = if direction == Direction::Bidirectional { 2 } else { 1 };
    let hs = hidden;
    if w.shape() != [dirs, 4 * hs, isz] || r.shape() != [dirs, 4 * hs, hs] {
        return Err(format!(
            "W {:?} / R {:?} do not match directions {dirs}, hidden {hs}, input {isz}",
            w.shape(),
            r.shape()
        ));
    }
    if let Some(sl) = ins.get(4).copied().flatten()
        && sl.to_int().iter().any(|&l| l != seq as i64)
    {
        return Err("sequence_lens shorter than the sequence are not supported".into());
    }
    let b = match ins.get(3).copied().flatten() {
        Some(_) => {
            let b = float(ins, 3)?;
            if b.shape() != [dirs, 8 * hs] {
                return Err(format!("B has shape {:?}, expected [{dirs}, {}]", b.shape(), 8 * hs));
            }
            b.clone()
        }
        None => ArrayD::zeros(IxDyn(&[dirs, 8 * hs])),
    };
    let state = |i: usize| -> R<ArrayD<T>> {
        match ins.get(i).copied().flatten() {
            Some(_) => {
                let s = float(ins, i)?;
                let s = if batch_first { transpose(s, &[1, 0, 2]) } else { s.clone() };
                if s.shape() != [dirs, batch, hs] {
                    return Err(format!(
                        "initial state {i} has shape {:?}, expected [{dirs}, {batch}, {hs}]",
                        s.shape()
                    ));
                }
                Ok(s)
            }
            None => Ok(ArrayD::zeros(IxDyn(&[dirs, batch, hs]))),
        }
    };
    let (h0, c0) = (state(5)?, state(6)?);
    let xs = std_slice(&x);
    let mut y = vec![T::zero(); seq * dirs * batch * hs];
    let mut yh = vec![T::zero(); dirs * batch * hs];
    let mut yc = vec![T::zero(); dirs * batch * hs];
    for d in 0..dirs {
        let wd = std_slice(w).to_vec();
        let rd = std_slice(r).to_vec();
        let bd = std_slice(&b).to_vec();
        let g4 = 4 * hs;
        let bsum: Vec<T> = (0..g4).map(|k| bd[d * 8 * hs + k] + bd[d * 8 * hs + g4 + k]).collect();
        let wts = LstmWeights {
            w: &wd[d * g4 * isz..(d + 1) * g4 * isz],
            r: &rd[d * g4 * hs..(d + 1) * g4 * hs],
            b: &bsum,
            hidden: hs,
            input: isz,
        };
        let h0d = std_slice(&h0)[d * batch * hs..(d + 1) * batch * hs].to_vec();
        let c0d = std_slice(&c0)[d * batch * hs..(d + 1) * batch * hs].to_vec();
        let reverse = direction == Direction::Reverse || d == 1;
        let tr = lstm_direction(&xs, seq, batch, &wts, &h0d, &c0d, reverse);
        for (s, &t) in tr.times.iter().enumerate() {
            let dst = ((t * dirs + d) * batch) * hs;
            y[dst..dst + batch * hs].copy_from_slice(&tr.h[s]);
        }
        if let (Some(h), Some(c)) = (tr.h.last(), tr.c.last()) {
            yh[d * batch * hs..(d + 1) * batch * hs].copy_from_slice(h);
            yc[d * batch * hs..(d + 1) * batch * hs].copy_from_slice(c);
        } else {
            yh[d * batch * hs..(d + 1) * batch * hs].copy_from_slice(&h0d);
            yc[d * batch * hs..(d + 1) * batch * hs].copy_from_slice(&c0d);
        }
    }
    let _ = node;
    let mut ya = array(&[seq, dirs, batch, hs], y);
    let mut yha = array(&[dirs, batch, hs], yh);
    let mut yca = array(&[dirs, batch, hs], yc);
    if batch_first {
        ya = transpose(&ya, &[2, 0, 1, 3]);
        yha = transpose(&yha, &[1, 0, 2]);
        yca = transpose(&yca, &[1, 0, 2]);
    }
    Ok(vec![Value::F(ya), Value::F(yha), Value::F(yca)])
}

/// Nodes after a Conv that run inside its kernel: a residual Add (`skip` is its other operand,
/// which the convolution accumulates onto) and a ReLU or constant-bound Clip (`clamp`). `nodes` is
/// how many nodes after the Conv this covers.
struct Fused<T> {
    skip: Option<ValueId>,
    clamp: Option<(T, T)>,
    nodes: usize,
}

/// What can run inside Conv node `ni` (see [`Fused`]): each fused node is the only reader of the
/// value before it, which is not kept, and the Add's other operand is already computed with the
/// convolution's output shape. Fusing saves a pass over memory per node (EfficientNet-Lite0 has 33
/// ReLU6 after convolutions; ResNet-50 16 residual sums, each followed by a ReLU).
fn fusion<T: Float>(
    g: &Graph,
    ni: usize,
    env: &Env<'_, T>,
    last: &[usize],
    keep: &dyn Fn(ValueId) -> bool,
) -> R<Option<Fused<T>>> {
    let node = &g.nodes[ni];
    let (Op::Conv { win, group }, Some(Some(y))) = (&node.op, node.outputs.first()) else {
        return Ok(None);
    };
    // `v`, made by node k - 1, is read by node k alone, and is neither kept nor a graph input.
    let only_reader = |v: ValueId, k: usize| {
        g.nodes.get(k).is_some_and(|n| last[v] == k && n.inputs.iter().filter(|i| **i == Some(v)).count() == 1)
            && !keep(v)
            && !g.inputs.iter().any(|x| x.id == v)
    };
    let mut out = *y;
    let mut f = Fused { skip: None, clamp: None, nodes: 0 };
    if only_reader(out, ni + 1)
        && let Op::Add = g.nodes[ni + 1].op
        && let [Some(a), Some(b)] = g.nodes[ni + 1].inputs[..]
        && let Some(Some(z)) = g.nodes[ni + 1].outputs.first()
    {
        let skip = if a == out { b } else { a };
        // The operand must be computed, of the output's shape, and the convolution not depthwise
        // (its kernel stores instead of accumulating).
        let shapes =
            (env.values[skip].as_ref(), node.input(0).and_then(|i| env.get(i)), node.input(1).and_then(|i| env.get(i)));
        if let (Some(Value::F(s)), Some(x), Some(w)) = shapes
            && *group == 1
            && let Ok(geom) = conv_geom(win, *group, x.shape(), w.shape())
            && let Some((oh, ow)) = geom.out_hw()
            && s.shape() == conv_out_shape(x.shape(), geom.m, oh, ow)
        {
            f.skip = Some(skip);
            f.nodes = 1;
            out = *z;
        }
    }
    let k = ni + 1 + f.nodes;
    if only_reader(out, k) && g.nodes[k].input(0) == Some(out) {
        let next = &g.nodes[k];
        f.clamp = match &next.op {
            Op::Relu => Some((T::zero(), T::infinity())),
            Op::Clip { min, max } => {
                let bound = |k: usize, attr: Option<f64>, default: T| -> R<Option<T>> {
                    match next.inputs.get(k).copied().flatten() {
                        None => Ok(Some(attr.map(T::of).unwrap_or(default))),
                        // A constant bound; one that is not a scalar is left to the Clip itself to
                        // report, under its own name.
                        Some(id) if env.values[id].is_none() => Ok(env
                            .get(id)
                            .and_then(|v| scalar(&[Some(v)], 0).ok())
                            .map(|s| s.or(attr.map(T::of)).unwrap_or(default))),
                        // A computed bound: evaluate the Clip on its own.
                        Some(_) => Ok(None),
                    }
                };
                match (bound(1, *min, T::neg_infinity())?, bound(2, *max, T::infinity())?) {
                    (Some(lo), Some(hi)) => Some((lo, hi)),
                    _ => None,
                }
            }
            _ => None,
        };
        if f.clamp.is_some() {
            f.nodes += 1;
        }
    }
    Ok((f.nodes > 0).then_some(f))
}

/// A Conv node's output, clamped to `clamp` when an activation was fused into it.
fn eval_conv<T: Float>(
    node: &Node,
    ins: &[Option<&Value<T>>],
    clamp: Option<(T, T)>,
    init: Option<Vec<T>>,
) -> R<Vec<Value<T>>> {
    let Op::Conv { win, group } = &node.op else {
        return Err(format!("{} is not a convolution", node.op_type));
    };
    let group = *group;
    let x = float(ins, 0)?;
    let w = float(ins, 1)?;
    let g = conv_geom(win, group, x.shape(), w.shape())?;
    let bias = match ins.get(2).copied().flatten() {
        Some(_) => {
            let b = float(ins, 2)?;
            let (oh, ow) = g.out_hw().ok_or("geometry")?;
            if b.len() != g.m && b.len() != g.m * oh * ow {
                return Err(format!("bias has {} elements, expected {}", b.len(), g.m));
            }
            Some(std_slice(b).into_owned())
        }
        None => None,
    };
    let per_channel = bias.as_ref().is_none_or(|b| b.len() == g.m);
    let (b, c) = if per_channel { (bias.as_deref(), clamp) } else { (None, None) };
    if init.as_ref().is_some_and(|v| g.group > 1 || v.len() != g.n * g.m * g.out_hw().map_or(0, |(h, w)| h * w)) {
        return Err("the residual operand fused into this convolution does not fit its output".into());
    }
    let mut y = conv2d_onto(&g, &std_slice(x), &std_slice(w), b, c, init);
    if let (false, Some(b)) = (per_channel, &bias) {
        // A spatially varying bias [M, OH, OW] (made by canonization), added per sample.
        for chunk in y.chunks_mut(b.len()) {
            chunk.iter_mut().zip(b).for_each(|(v, bv)| *v += *bv);
        }
        if let Some((lo, hi)) = clamp {
            y.iter_mut().for_each(|v| *v = elementwise::clamp(*v, lo, hi));
        }
    }
    let (oh, ow) = g.out_hw().ok_or("geometry")?;
    Ok(vec![Value::F(array(&conv_out_shape(x.shape(), g.m, oh, ow), y))])
}

/// A convolution's output shape: the input's, with `m` channels and the pooled spatial size.
fn conv_out_shape(x: &[usize], m: usize, oh: usize, ow: usize) -> Vec<usize> {
    pool_out_shape(x, oh, ow).iter().enumerate().map(|(i, &d)| if i == 1 { m } else { d }).collect()
}

/// A tensor's elements in standard order, without a copy when it already has that layout.
fn into_vec<T: Float>(a: ArrayD<T>) -> Vec<T> {
    if a.is_standard_layout() {
        let len = a.len();
        let (mut v, off) = a.into_raw_vec_and_offset();
        let off = off.unwrap_or(0);
        if off == 0 && v.len() == len {
            return v;
        }
        v.truncate(off + len);
        return v.split_off(off);
    }
    a.iter().cloned().collect()
}

/// Evaluates one node on its inputs.
pub fn eval_node<T: Float>(node: &Node, ins: &[Option<&Value<T>>]) -> Result<Vec<Value<T>>> {
    eval_inner(node, ins).map_err(|m| node_err(&node.name, &node.op_type, m))
}

fn eval_inner<T: Float>(node: &Node, ins: &[Option<&Value<T>>]) -> R<Vec<Value<T>>> {
    if let Some(act) = elementwise(node, ins)? {
        return Ok(vec![Value::F(act.apply_to(float(ins, 0)?))]);
    }
    let one = |v: Value<T>| Ok(vec![v]);
    match &node.op {
        Op::Conv { .. } => eval_conv(node, ins, None, None),
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            let a = float(ins, 0)?;
            let b = float(ins, 1)?;
            if a.ndim() != 2 || b.ndim() != 2 {
                return Err(format!("A {:?} and B {:?} must be 2-d", a.shape(), b.shape()));
            }
            let (m, k) = if *trans_a { (a.shape()[1], a.shape()[0]) } else { (a.shape()[0], a.shape()[1]) };
            let (k2, n) = if *trans_b { (b.shape()[1], b.shape()[0]) } else { (b.shape()[0], b.shape()[1]) };
            if k != k2 {
                return Err(format!("A {:?} and B {:?} do not align", a.shape(), b.shape()));
            }
            let (ad, bd) = (std_slice(a), std_slice(b));
            let am = if *trans_a { Mat::rows_t(&ad, m) } else { Mat::rows(&ad, k) };
            let bm = if *trans_b { Mat::rows_t(&bd, k) } else { Mat::rows(&bd, n) };
            let mut out = vec![T::zero(); m * n];
            matmul(m, n, k, am, bm, &mut out, false, Threads::Pool);
            let mut y = array(&[m, n], out);
            if *alpha != 1.0 {
                y.mapv_inplace(|v| v * T::of(*alpha));
            }
            if let Some(c) = ins.get(2).copied().flatten() {
                let c = c.to_float();
                let cb = c
                    .broadcast(IxDyn(&[m, n]))
                    .ok_or_else(|| format!("C {:?} does not broadcast to [{m}, {n}]", c.shape()))?;
                let bt = T::of(*beta);
                Zip::from(&mut y).and(&cb).for_each(|v, &cv| *v += bt * cv);
            }
            one(Value::F(y))
        }
        Op::MatMul => one(Value::F(matmul_nd(float(ins, 0)?, float(ins, 1)?)?)),
        Op::BatchNorm { epsilon } => one(Value::F(batch_norm(float(ins, 0)?.view().into(), ins, *epsilon, false)?)),
        Op::Relu => unary(ins, |v| if v > T::zero() { v } else { T::zero() }),
        Op::Clip { min, max } => {
            let lo = match scalar(ins, 1)? {
                Some(v) => v,
                None => min.map(T::of).unwrap_or(T::neg_infinity()),
            };
            let hi = match scalar(ins, 2)? {
                Some(v) => v,
                None => max.map(T::of).unwrap_or(T::infinity()),
            };
            match value(ins, 0)? {
                Value::I(a) => one(Value::I(a.mapv(|v| v.clamp(lo.f64() as i64, hi.f64() as i64)))),
                Value::F(_) => unary(ins, |v| elementwise::clamp(v, lo, hi)),
            }
        }
        Op::LeakyRelu { alpha } => {
            let a = T::of(*alpha);
            unary(ins, |v| if v >= T::zero() { v } else { a * v })
        }
        Op::Sigmoid => unary(ins, |v| T::one() / (T::one() + (-v).exp())),
        Op::Tanh => unary(ins, |v| v.tanh()),
        Op::HardSigmoid { alpha, beta } => {
            let (a, b) = (T::of(*alpha), T::of(*beta));
            unary(ins, |v| elementwise::clamp(a * v + b, T::zero(), T::one()))
        }
        Op::HardSwish => {
            let (a, b) = (T::of(1.0 / 6.0), T::of(0.5));
            unary(ins, |v| v * elementwise::clamp(a * v + b, T::zero(), T::one()))
        }
        Op::Softmax { axis, legacy } => {
            let x = float(ins, 0)?;
            let ax = norm_axis(*axis, x.ndim())?;
            one(Value::F(softmax(x, ax, *legacy)))
        }
        Op::Add => one(binary(value(ins, 0)?, value(ins, 1)?, BinOp::Add, |a, b| a.wrapping_add(b))?),
        Op::Sub => one(binary(value(ins, 0)?, value(ins, 1)?, BinOp::Sub, |a, b| a.wrapping_sub(b))?),
        Op::Mul => one(binary(value(ins, 0)?, value(ins, 1)?, BinOp::Mul, |a, b| a.wrapping_mul(b))?),
        Op::Div => {
            let (a, b) = (value(ins, 0)?, value(ins, 1)?);
            if let (Value::I(_), Value::I(y)) = (a, b)
                && y.iter().any(|&v| v == 0)
            {
                return Err("integer division by zero".into());
            }
            one(binary(a, b, BinOp::Div, |a, b| a / b)?)
        }
        Op::Pow => one(Value::F(zip2(&value(ins, 0)?.to_float(), &value(ins, 1)?.to_float(), |a: T, b: T| {
            if b == T::of(2.0) { a * a } else { a.powf(b) }
        })?)),
        Op::Sqrt => unary(ins, |v| v.sqrt()),
        Op::MaxPool { win, ceil_mode } => {
            if node.outputs.get(1).copied().flatten().is_some() {
                return Err("the Indices output of MaxPool is not supported".into());
            }
            let x = float(ins, 0)?;
            let g = pool_geom(win, x.shape(), *ceil_mode, false)?;
            let y = max_pool_values(&g, &std_slice(x));
            let (oh, ow) = g.out_hw().ok_or("geometry")?;
            one(Value::F(array(&pool_out_shape(x.shape(), oh, ow), y)))
        }
        Op::AveragePool { win, ceil_mode, count_include_pad } => {
            let x = float(ins, 0)?;
            if win.dilations.iter().any(|&d| d != 1) {
                return Err("dilated average pooling is not supported".into());
            }
            let g = pool_geom(win, x.shape(), *ceil_mode, *count_include_pad)?;
            let y = avg_pool(&g, &std_slice(x));
            let (oh, ow) = g.out_hw().ok_or("geometry")?;
            one(Value::F(array(&pool_out_shape(x.shape(), oh, ow), y)))
        }
        Op::GlobalAveragePool => {
            let x = float(ins, 0)?;
            if x.ndim() < 3 {
                return Err(format!("input must have rank ≥ 3, got {:?}", x.shape()));
            }
            let (n, c) = (x.shape()[0], x.shape()[1]);
            let inner: usize = x.shape()[2..].iter().product();
            let xs = std_slice(x);
            let out: Vec<T> =
                xs.chunks(inner.max(1)).map(|p| p.iter().copied().sum::<T>() / T::of(inner as f64)).collect();
            let mut shape = vec![n, c];
            shape.extend(std::iter::repeat_n(1, x.ndim() - 2));
            one(Value::F(array(&shape, out)))
        }
        Op::Flatten { axis } => {
            let v = value(ins, 0)?;
            let r = v.shape().len() as i64;
            let ax = if *axis < 0 { axis + r } else { *axis };
            if ax < 0 || ax > r {
                return Err(format!("axis {axis} is out of range for rank {r}"));
            }
            let outer: usize = v.shape()[..ax as usize].iter().product();
            let inner: usize = v.shape()[ax as usize..].iter().product();
            one(map_value(v, |a| reshape(a, &[outer, inner]), |a| reshape(a, &[outer, inner]))?)
        }
        Op::Reshape { allowzero } => {
            let v = value(ins, 0)?;
            let spec = ints(ins, 1)?.ok_or("the shape input is required")?;
            let target = reshape_target(v.shape(), &spec, *allowzero)?;
            one(map_value(v, |a| reshape(a, &target), |a| reshape(a, &target))?)
        }
        Op::Transpose { perm } => {
            let v = value(ins, 0)?;
            let r = v.shape().len();
            let p: Vec<usize> = perm.clone().unwrap_or_else(|| (0..r).rev().collect());
            let mut sorted = p.clone();
            sorted.sort_unstable();
            if sorted != (0..r).collect::<Vec<_>>() {
                return Err(format!("perm {p:?} is not a permutation of rank {r}"));
            }
            one(map_value(v, |a| Ok(transpose(a, &p)), |a| Ok(transpose(a, &p)))?)
        }
        Op::Squeeze { axes } => {
            let v = value(ins, 0)?;
            let axes = match axes {
                Some(a) => Some(a.clone()),
                None => ints(ins, 1)?,
            };
            let r = v.shape().len();
            let drop: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&x| norm_axis(x, r)).collect::<R<_>>()?,
                None => (0..r).filter(|&i| v.shape()[i] == 1).collect(),
            };
            if drop.iter().any(|&i| v.shape()[i] != 1) {
                return Err(format!("cannot squeeze axes {drop:?} of shape {:?}", v.shape()));
            }
            let shape: Vec<usize> = (0..r).filter(|i| !drop.contains(i)).map(|i| v.shape()[i]).collect();
            one(map_value(v, |a| reshape(a, &shape), |a| reshape(a, &shape))?)
        }
        Op::Unsqueeze { axes } => {
            let v = value(ins, 0)?;
            let axes = match axes {
                Some(a) => a.clone(),
                None => ints(ins, 1)?.ok_or("the axes input is required")?,
            };
            let r = v.shape().len() + axes.len();
            let mut ax: Vec<usize> = axes.iter().map(|&a| norm_axis(a, r)).collect::<R<_>>()?;
            ax.sort_unstable();
            let mut shape = v.shape().to_vec();
            for a in ax {
                shape.insert(a, 1);
            }
            one(map_value(v, |a| reshape(a, &shape), |a| reshape(a, &shape))?)
        }
        Op::Concat { axis } => {
            let vals: Vec<&Value<T>> = ins.iter().flatten().copied().collect();
            let first = vals.first().ok_or("no inputs")?;
            let ax = norm_axis(*axis, first.shape().len())?;
            if vals.iter().all(|v| matches!(v, Value::I(_))) {
                let arrs: Vec<ArrayD<i64>> = vals.iter().map(|v| v.to_int()).collect();
                one(Value::I(concat(&arrs.iter().collect::<Vec<_>>(), ax)?))
            } else {
                // Float parts as they are (converting each one copied every part before the concatenation).
                let arrs: Vec<Cow<ArrayD<T>>> = vals
                    .iter()
                    .map(|v| match v {
                        Value::F(a) => Cow::Borrowed(a),
                        Value::I(_) => Cow::Owned(v.to_float()),
                    })
                    .collect();
                one(Value::F(concat(&arrs.iter().map(|a| a.as_ref()).collect::<Vec<_>>(), ax)?))
            }
        }
        Op::Slice { starts, ends, axes } => {
            let v = value(ins, 0)?;
            let (st, en, ax, steps) = match (starts, ends) {
                (Some(s), Some(e)) => (s.clone(), e.clone(), axes.clone(), None),
                _ => (
                    ints(ins, 1)?.ok_or("starts is required")?,
                    ints(ins, 2)?.ok_or("ends is required")?,
                    ints(ins, 3)?,
                    ints(ins, 4)?,
                ),
            };
            let r = v.shape().len();
            let ax: Vec<usize> = match ax {
                Some(a) => a.iter().map(|&x| norm_axis(x, r)).collect::<R<_>>()?,
                None => (0..st.len()).collect(),
            };
            let steps = steps.unwrap_or_else(|| vec![1; st.len()]);
            if en.len() != st.len() || ax.len() != st.len() || steps.len() != st.len() {
                return Err("starts, ends, axes and steps must have equal lengths".into());
            }
            let mut out = v.clone();
            for i in 0..st.len() {
                if steps[i] == 0 {
                    return Err("slice step 0".into());
                }
                let (s, e) = clamp_slice(st[i], en[i], steps[i], out.shape()[ax[i]]);
                out = map_value(
                    &out,
                    |a| Ok(slice_axis(a, ax[i], s, e, steps[i])),
                    |a| Ok(slice_axis(a, ax[i], s, e, steps[i])),
                )?;
            }
            one(out)
        }
        Op::Split { axis, split } => {
            let v = value(ins, 0)?;
            let ax = norm_axis(*axis, v.shape().len())?;
            let len = v.shape()[ax];
            let nout = node.outputs.len();
            let sizes: Vec<usize> = match split.clone().or(ints(ins, 1)?) {
                Some(s) => s.iter().map(|&x| x.max(0) as usize).collect(),
                None => {
                    let chunk = len.div_ceil(nout.max(1));
                    (0..nout).map(|i| chunk.min(len.saturating_sub(i * chunk))).collect()
                }
            };
            if sizes.iter().sum::<usize>() != len || sizes.len() != nout {
                return Err(format!("split sizes {sizes:?} do not cover axis {ax} of length {len} in {nout} outputs"));
            }
            let mut start = 0;
            let mut outs = Vec::new();
            for s in sizes {
                let (a, b) = (start as i64, (start + s) as i64);
                outs.push(map_value(v, |x| Ok(slice_axis(x, ax, a, b, 1)), |x| Ok(slice_axis(x, ax, a, b, 1)))?);
                start += s;
            }
            Ok(outs)
        }
        Op::Pad { mode, pads, value: fill } => {
            let v = value(ins, 0)?;
            let r = v.shape().len();
            let mut p = match pads {
                Some(p) => p.clone(),
                None => ints(ins, 1)?.ok_or("the pads input is required")?,
            };
            let fill = match scalar(ins, 2)? {
                Some(f) => f.f64(),
                None => *fill,
            };
            if let Some(axes) = ints(ins, 3)? {
                let mut full = vec![0; 2 * r];
                let n = axes.len();
                if p.len() != 2 * n {
                    return Err(format!("pads {p:?} do not match axes {axes:?}"));
                }
                for (k, &a) in axes.iter().enumerate() {
                    let a = norm_axis(a, r)?;
                    full[a] = p[k];
                    full[a + r] = p[k + n];
                }
                p = full;
            }
            one(map_value(v, |a| pad_array(a, &p, *mode, T::of(fill)), |a| pad_array(a, &p, *mode, fill as i64))?)
        }
        Op::Gather { axis } => {
            let v = value(ins, 0)?;
            let idx = value(ins, 1)?.to_int();
            let ax = norm_axis(*axis, v.shape().len())?;
            one(map_value(v, |a| gather(a, &idx, ax), |a| gather(a, &idx, ax))?)
        }
        Op::Lstm { hidden, direction, batch_first } => lstm(node, ins, *hidden, *direction, *batch_first),
        Op::Identity => one(value(ins, 0)?.clone()),
        Op::ThreshRelu { thresholds, dirs } => {
            let x = float(ins, 0)?;
            if x.ndim() < 2 || x.shape()[1] != thresholds.len() {
                return Err(format!("input {:?} does not have {} channels", x.shape(), thresholds.len()));
            }
            let c = thresholds.len();
            let inner: usize = x.shape()[2..].iter().product();
            let mut y = x.as_standard_layout().into_owned();
            let ys = y.as_slice_mut().ok_or("non-contiguous ThreshRelu output")?;
            // Per channel plane (a per-element channel index cost 10× the comparison).
            let plane = |(k, p): (usize, &mut [T])| {
                let (t, d) = (T::of(thresholds[k % c]), dirs[k % c]);
                let dv = T::of(d as f64);
                p.iter_mut().for_each(|v| {
                    *v = if d == 0 {
                        T::zero()
                    } else if (*v - t) * dv > T::zero() {
                        *v
                    } else {
                        t
                    }
                });
            };
            if inner > 0 {
                use rayon::prelude::*;
                ys.par_chunks_mut(inner).enumerate().for_each(plane);
            }
            one(Value::F(y))
        }
        Op::Dropout => {
            let v = value(ins, 0)?.clone();
            let mask = Value::I(ArrayD::from_elem(IxDyn(v.shape()), 1));
            Ok(vec![v, mask])
        }
        Op::Shape { start, end } => {
            let s = value(ins, 0)?.shape();
            let r = s.len() as i64;
            let fix = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (a, b) = (fix(*start), fix(end.unwrap_or(r)));
            let dims: Vec<i64> = if a < b { s[a..b].iter().map(|&d| d as i64).collect() } else { vec![] };
            one(Value::I(array(&[dims.len()], dims)))
        }
        Op::Cast { to_float } => {
            let v = value(ins, 0)?;
            one(if *to_float { Value::F(v.to_float()) } else { Value::I(v.to_int()) })
        }
        Op::ConstantOfShape { value: c } => {
            let shape: Vec<usize> =
                ints(ins, 0)?.ok_or("shape input is required")?.iter().map(|&d| d.max(0) as usize).collect();
            one(match c {
                crate::tensor::Const::F(a) => {
                    Value::F(ArrayD::from_elem(IxDyn(&shape), T::of(a.iter().next().copied().unwrap_or(0.0))))
                }
                crate::tensor::Const::F32(a) => {
                    Value::F(ArrayD::from_elem(IxDyn(&shape), T::of(a.iter().next().map_or(0.0, |&v| v as f64))))
                }
                crate::tensor::Const::I(a) => {
                    Value::I(ArrayD::from_elem(IxDyn(&shape), a.iter().next().copied().unwrap_or(0)))
                }
            })
        }
        Op::Range => {
            let (s, l, d) = (value(ins, 0)?, value(ins, 1)?, value(ins, 2)?);
            if let (Value::I(s), Value::I(l), Value::I(d)) = (s, l, d) {
                let (s, l, d) = (
                    s.iter().next().copied().unwrap_or(0),
                    l.iter().next().copied().unwrap_or(0),
                    d.iter().next().copied().unwrap_or(1),
                );
                if d == 0 {
                    return Err("delta is 0".into());
                }
                let n = ((l - s) as f64 / d as f64).ceil().max(0.0) as usize;
                let v: Vec<i64> = (0..n as i64).map(|i| s + i * d).collect();
                one(Value::I(array(&[n], v)))
            } else {
                let f = |v: &Value<T>| v.to_float().iter().next().copied().unwrap_or(T::zero()).f64();
                let (s, l, d) = (f(s), f(l), f(d));
                if d == 0.0 {
                    return Err("delta is 0".into());
                }
                let n = ((l - s) / d).ceil().max(0.0) as usize;
                let v: Vec<T> = (0..n).map(|i| T::of(s + i as f64 * d)).collect();
                one(Value::F(array(&[n], v)))
            }
        }
        Op::Expand => {
            let v = value(ins, 0)?;
            let shape: Vec<usize> =
                ints(ins, 1)?.ok_or("shape input is required")?.iter().map(|&d| d.max(0) as usize).collect();
            let target = broadcast_shape(v.shape(), &shape)?;
            one(map_value(
                v,
                |a| Ok(a.broadcast(IxDyn(&target)).ok_or("broadcast failed")?.to_owned()),
                |a| Ok(a.broadcast(IxDyn(&target)).ok_or("broadcast failed")?.to_owned()),
            )?)
        }
    }
}

/// Warnings about inputs that are legal but probably wrong (NaN or infinite values).
pub fn input_warnings<T: Float>(g: &Graph, inputs: &[Value<T>]) -> Vec<String> {
    let mut w = Vec::new();
    for (inp, v) in g.inputs.iter().zip(inputs) {
        if let Value::F(a) = v {
            let nan = a.iter().filter(|x| x.is_nan()).count();
            let inf = a.iter().filter(|x| x.is_infinite()).count();
            if nan + inf > 0 {
                w.push(format!(
                    "input '{}' contains {nan} NaN and {inf} infinite value(s) of {}",
                    g.names[inp.id],
                    a.len()
                ));
            }
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(shape: &[usize], start: i64) -> ArrayD<i64> {
        let n: usize = shape.iter().product();
        ArrayD::from_shape_vec(IxDyn(shape), (0..n as i64).map(|v| v + start).collect()).unwrap()
    }

    #[test]
    fn concat_equals_ndarray_on_every_axis() {
        for axis in 0..3 {
            let mut s1 = vec![2, 3, 4];
            let mut s2 = s1.clone();
            s2[axis] = 5;
            s1[axis] = 1;
            let (a, b, c) = (arr(&s1, 0), arr(&s2, 100), arr(&s1, 1000));
            let want = ndarray::concatenate(Axis(axis), &[a.view(), b.view(), c.view()]).unwrap();
            assert_eq!(concat(&[&a, &b, &c], axis).unwrap(), want, "axis {axis}");
        }
        // A part that is not contiguous takes ndarray's path; mismatched parts are an error.
        let t = arr(&[4, 3, 2], 0).reversed_axes();
        let a = arr(&[2, 1, 4], 50);
        let want = ndarray::concatenate(Axis(1), &[t.view(), a.view()]).unwrap();
        assert_eq!(concat(&[&t, &a], 1).unwrap(), want);
        assert!(concat(&[&arr(&[2, 3], 0), &arr(&[3, 3], 0)], 1).is_err());
    }
}
