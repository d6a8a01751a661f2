//! Canonization: rewrites that keep the function but make LRP well defined (`DESIGN.md` §3).
//! Every pass reports what it changed; [`check`] runs both graphs and measures the deviation.

use crate::error::{Error, Result};
use crate::graph::{Graph, Node, Op, ValueId, prepare_consts, run, run_keep};
use crate::ops::conv::conv2d;
use crate::tensor::{Const, Float, Value, array};
use ndarray::{ArrayD, IxDyn};
use std::collections::HashMap;

/// How much to canonize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Conv/Gemm → BN folding, Identity/Dropout removal; other BatchNorms stay (pass rule).
    Minimal,
    /// Also BN → ReLU → Conv (DenseNet) as threshold-ReLU + conv with a spatially varying bias,
    /// and the head BN → ReLU → GlobalAveragePool → Gemm.
    Full,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "minimal" => Ok(Mode::Minimal),
            "full" => Ok(Mode::Full),
            _ => Err(format!("unknown canonization '{s}' (full or minimal)")),
        }
    }
}

/// Value shapes of one evaluation, by value id (the full mode's spatially varying biases depend
/// on the input size).
pub type Shapes = HashMap<ValueId, Vec<usize>>;

/// Evaluates `g` once and records every value's shape.
pub fn value_shapes<T: Float>(g: &Graph, inputs: &[Value<T>]) -> Result<Shapes> {
    let consts = prepare_consts::<T>(g);
    let env = run_keep(g, &consts, inputs.to_vec(), &|_| true)?;
    Ok((0..g.names.len()).filter_map(|v| env.get(v).map(|x| (v, x.shape().to_vec()))).collect())
}

/// Canonizes a copy of `g`; returns it with one line per change. `shapes` (from
/// [`value_shapes`]) is needed by the full mode when a folded shift meets a padded conv.
pub fn canonize(g: &Graph, mode: Mode, shapes: Option<&Shapes>) -> Result<(Graph, Vec<String>)> {
    let mut g = g.clone();
    let mut report = Vec::new();
    remove_identities(&mut g, &mut report);
    fold_linear_bn(&mut g, &mut report)?;
    if mode == Mode::Full {
        bn_relu_linear(&mut g, &mut report, shapes)?;
    }
    g.prune();
    Ok((g, report))
}

/// Runs `original` and `canonized` on `inputs`; returns max |Δ| / max |y| over the outputs.
pub fn check<T: Float>(original: &Graph, canonized: &Graph, inputs: &[Value<T>]) -> Result<f64> {
    let a = run(original, &prepare_consts::<T>(original), inputs.to_vec())?;
    let b = run(canonized, &prepare_consts::<T>(canonized), inputs.to_vec())?;
    let (mut d, mut m) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(&b) {
        let (x, y) = (x.to_float(), y.to_float());
        if x.shape() != y.shape() {
            return Err(Error::Invalid(format!(
                "canonization changed an output shape: {:?} vs {:?}",
                x.shape(),
                y.shape()
            )));
        }
        for (p, q) in x.iter().zip(y.iter()) {
            d = d.max((p.f64() - q.f64()).abs());
            m = m.max(p.f64().abs());
        }
    }
    Ok(if m > 0.0 { d / m } else { d })
}

fn rename_value(g: &mut Graph, from: ValueId, to: ValueId) {
    for n in &mut g.nodes {
        for i in n.inputs.iter_mut().flatten() {
            if *i == from {
                *i = to;
            }
        }
    }
    for o in &mut g.outputs {
        if *o == from {
            *o = to;
        }
    }
}

fn remove_identities(g: &mut Graph, report: &mut Vec<String>) {
    let mut k = 0;
    while k < g.nodes.len() {
        let n = &g.nodes[k];
        if matches!(n.op, Op::Identity | Op::Dropout)
            && let (Some(src), Some(Some(out))) = (n.input(0), n.outputs.first().copied())
        {
            let mask_used = n
                .outputs
                .get(1)
                .copied()
                .flatten()
                .is_some_and(|m| g.consumers()[m].len() + g.outputs.iter().filter(|o| **o == m).count() > 0);
            if !mask_used {
                report.push(format!("removed {} '{}'", n.op_type, n.name));
                let is_out = g.outputs.contains(&out);
                if is_out && (g.is_input(src) || g.consts.contains_key(&src)) {
                    k += 1;
                    continue;
                }
                rename_value(g, out, src);
                g.nodes.remove(k);
                continue;
            }
        }
        k += 1;
    }
}

fn const_f(g: &Graph, v: Option<ValueId>) -> Option<ArrayD<f64>> {
    match g.consts.get(&v?) {
        Some(c @ (Const::F(_) | Const::F32(_))) => c.f64s(),
        _ => None,
    }
}

/// BatchNorm as a per-channel affine map `a·x + c`; None unless all parameters are constants.
fn bn_affine(g: &Graph, n: &Node) -> Option<(Vec<f64>, Vec<f64>)> {
    let Op::BatchNorm { epsilon } = n.op else {
        return None;
    };
    let p: Vec<ArrayD<f64>> = (1..5).map(|i| const_f(g, n.input(i))).collect::<Option<_>>()?;
    let c = p[0].len();
    if p.iter().any(|a| a.len() != c) {
        return None;
    }
    let (gamma, beta, mean, var) = (p[0].as_slice()?, p[1].as_slice()?, p[2].as_slice()?, p[3].as_slice()?);
    let a: Vec<f64> = (0..c).map(|i| gamma[i] / (var[i] + epsilon).sqrt()).collect();
    let cc: Vec<f64> = (0..c).map(|i| beta[i] - mean[i] * a[i]).collect();
    Some((a, cc))
}

fn single_consumer(g: &Graph, v: ValueId) -> Option<usize> {
    let cons = g.consumers();
    if cons[v].len() == 1 && !g.outputs.contains(&v) { Some(cons[v][0].0) } else { None }
}

fn add_const(g: &mut Graph, name: String, c: Const) -> ValueId {
    let id = g.add_value(name);
    g.consts.insert(id, c);
    id
}

/// Conv → BN and Gemm → BN: scale the weights per output channel, fold the shift into the bias.
fn fold_linear_bn(g: &mut Graph, report: &mut Vec<String>) -> Result<()> {
    let mut k = 0;
    while k < g.nodes.len() {
        let n = g.nodes[k].clone();
        let out = match n.outputs.first().copied().flatten() {
            Some(o) => o,
            None => {
                k += 1;
                continue;
            }
        };
        let foldable = matches!(n.op, Op::Conv { .. } | Op::Gemm { .. });
        let bn_idx = if foldable { single_consumer(g, out) } else { None };
        let Some(bi) = bn_idx else {
            k += 1;
            continue;
        };
        let bn = g.nodes[bi].clone();
        let (Some((a, c)), Some(w)) = (bn_affine(g, &bn), const_f(g, n.input(1))) else {
            k += 1;
            continue;
        };
        let bias = match n.input(2) {
            Some(b) => match const_f(g, Some(b)) {
                Some(b) => Some(b),
                None => {
                    k += 1;
                    continue;
                }
            },
            None => None,
        };
        let m = a.len();
        let (new_w, new_b) = match &n.op {
            Op::Conv { .. } => {
                if w.shape()[0] != m {
                    k += 1;
                    continue;
                }
                let per = w.len() / m;
                let ws = w.as_standard_layout();
                let nw: Vec<f64> = ws.iter().enumerate().map(|(i, &v)| v * a[i / per]).collect();
                let b0 = bias.map(|b| b.iter().copied().collect::<Vec<_>>()).unwrap_or_else(|| vec![0.0; m]);
                if b0.len() != m {
                    k += 1;
                    continue;
                }
                let nb: Vec<f64> = (0..m).map(|i| b0[i] * a[i] + c[i]).collect();
                (array(w.shape(), nw), nb)
            }
            Op::Gemm { beta, trans_b, .. } => {
                let ncols = if *trans_b { w.shape()[0] } else { w.shape()[1] };
                if ncols != m {
                    k += 1;
                    continue;
                }
                let mut nw = w.as_standard_layout().into_owned();
                for ((r, cidx), v) in nw.indexed_iter_mut().map(|(ix, v)| ((ix[0], ix[1]), v)) {
                    *v *= a[if *trans_b { r } else { cidx }];
                }
                let b0: Vec<f64> = match bias {
                    Some(b) => match b.broadcast(IxDyn(&[m])) {
                        Some(bb) => bb.iter().map(|v| v * beta).collect(),
                        None => {
                            k += 1;
                            continue;
                        }
                    },
                    None => vec![0.0; m],
                };
                let nb: Vec<f64> = (0..m).map(|i| b0[i] * a[i] + c[i]).collect();
                (nw, nb)
            }
            _ => unreachable!("foldable checked above"),
        };
        let wid = add_const(g, format!("{}.folded_weight", n.name), Const::float(new_w));
        let bid = add_const(g, format!("{}.folded_bias", n.name), Const::float(array(&[m], new_b)));
        let bn_out = bn.outputs.first().copied().flatten();
        let node = &mut g.nodes[k];
        node.inputs = vec![n.input(0), Some(wid), Some(bid)];
        if let Op::Gemm { beta, .. } = &mut node.op {
            *beta = 1.0;
        }
        if let Some(bo) = bn_out {
            node.outputs[0] = Some(bo);
        }
        report.push(format!("folded BatchNormalization '{}' into {} '{}'", bn.name, n.op_type, n.name));
        g.nodes.remove(bi);
        if bi < k {
            k -= 1;
        }
    }
    Ok(())
}

/// BN → ReLU → Conv/GAP→Gemm: ReLU(BN(x)) = BN(ThreshReLU(x)); the BN then folds into the
/// consumers. With padding the conv's folded bias varies over space: conv_w(broadcast shift).
fn bn_relu_linear(g: &mut Graph, report: &mut Vec<String>, shapes: Option<&Shapes>) -> Result<()> {
    let mut k = 0;
    while k < g.nodes.len() {
        let bn = g.nodes[k].clone();
        let Some((a, c)) = bn_affine(g, &bn) else {
            k += 1;
            continue;
        };
        let Some(bn_out) = bn.outputs.first().copied().flatten() else {
            k += 1;
            continue;
        };
        let Some(ri) = single_consumer(g, bn_out).filter(|&i| matches!(g.nodes[i].op, Op::Relu)) else {
            k += 1;
            continue;
        };
        let Some(relu_out) = g.nodes[ri].outputs.first().copied().flatten() else {
            k += 1;
            continue;
        };
        let cons = g.consumers()[relu_out].clone();
        if g.outputs.contains(&relu_out) || cons.is_empty() {
            k += 1;
            continue;
        }
        // Every consumer must be a Conv reading it as input 0 with constant weights, or the head
        // GlobalAveragePool → Flatten → Gemm.
        let mut plans = Vec::new();
        let mut ok = true;
        for &(ci, slot) in &cons {
            let cn = &g.nodes[ci];
            match cn.op {
                Op::Conv { .. } if slot == 0 && const_f(g, cn.input(1)).is_some() => plans.push((ci, None)),
                Op::GlobalAveragePool => match head_gemm(g, ci) {
                    Some(gi) => plans.push((ci, Some(gi))),
                    None => ok = false,
                },
                _ => ok = false,
            }
        }
        if !ok {
            k += 1;
            continue;
        }
        let relu_name = g.nodes[ri].name.clone();
        // Threshold t = μ − β·s/γ is where BN(x) = 0, i.e. t = −c/a.
        let thresholds: Vec<f64> = a.iter().zip(&c).map(|(&ai, &ci)| if ai != 0.0 { -ci / ai } else { 0.0 }).collect();
        let dirs: Vec<i8> = a
            .iter()
            .map(|&ai| {
                if ai > 0.0 {
                    1
                } else if ai < 0.0 {
                    -1
                } else {
                    0
                }
            })
            .collect();
        // A constant channel (γ = 0) outputs ReLU(β) whatever x is: slope 0, shift max(c, 0).
        let c_eff: Vec<f64> = a.iter().zip(&c).map(|(&ai, &ci)| if ai == 0.0 { ci.max(0.0) } else { ci }).collect();
        for (ci, head) in plans {
            match head {
                None => fold_affine_into_conv(g, ci, &a, &c_eff, shapes)?,
                Some(gi) => fold_affine_into_gemm(g, gi, &a, &c_eff)?,
            }
        }
        // The BN node becomes the threshold ReLU writing the ReLU's output; the ReLU goes.
        let node = &mut g.nodes[k];
        node.op = Op::ThreshRelu { thresholds, dirs };
        node.op_type = "ThreshRelu".into();
        node.inputs.truncate(1);
        node.outputs = vec![Some(relu_out)];
        report.push(format!(
            "BatchNormalization '{}' → ReLU '{}': threshold ReLU, BN folded into its {} consumer(s)",
            bn.name,
            relu_name,
            cons.len()
        ));
        g.nodes.remove(ri);
        if ri < k {
            k -= 1;
        }
        k += 1;
    }
    Ok(())
}

/// Follows GlobalAveragePool → Flatten/Reshape → Gemm; returns the Gemm's node index.
fn head_gemm(g: &Graph, gap: usize) -> Option<usize> {
    let out = g.nodes[gap].outputs.first().copied().flatten()?;
    let f = single_consumer(g, out)?;
    if !matches!(g.nodes[f].op, Op::Flatten { axis: 1 }) {
        return None;
    }
    let fo = g.nodes[f].outputs.first().copied().flatten()?;
    let gi = single_consumer(g, fo)?;
    match &g.nodes[gi].op {
        Op::Gemm { trans_a: false, .. }
            if const_f(g, g.nodes[gi].input(1)).is_some() && g.nodes[gi].input(0) == Some(fo) =>
        {
            Some(gi)
        }
        _ => None,
    }
}

/// conv(a·u + c) = conv_{w·a}(u) + conv_w(c) (the second term with the conv's zero padding).
fn fold_affine_into_conv(g: &mut Graph, ci: usize, a: &[f64], c: &[f64], shapes: Option<&Shapes>) -> Result<()> {
    let n = g.nodes[ci].clone();
    let Op::Conv { win, group } = &n.op else {
        return Ok(());
    };
    let w = const_f(g, n.input(1)).ok_or_else(|| Error::Invalid("conv weight".into()))?;
    let cin = w.shape()[1] * group;
    if cin != a.len() {
        return Err(crate::error::node_err(
            &n.name,
            &n.op_type,
            format!("has {cin} input channels, the BatchNorm before it {}", a.len()),
        ));
    }
    let ws = w.as_standard_layout().into_owned();
    let cg = w.shape()[1];
    let per = ws.len() / w.shape()[0];
    let khw = per / cg;
    let mg = w.shape()[0] / group;
    let nw: Vec<f64> = ws
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let oc = i / per;
            let ic = (oc / mg) * cg + (i % per) / khw;
            v * a[ic]
        })
        .collect();
    let shift_zero = c.iter().all(|&v| v == 0.0);
    let b0 = const_f(g, n.input(2));
    let m = w.shape()[0];
    let new_bias = if shift_zero {
        b0.map(|b| b.iter().copied().collect::<Vec<_>>()).unwrap_or_else(|| vec![0.0; m])
    } else {
        let xs = n.input(0).and_then(|v| shapes?.get(&v)).ok_or_else(|| {
            crate::error::node_err(&n.name, &n.op_type, "full canonization needs the value shapes of a forward pass")
        })?;
        if xs.len() != 4 {
            return Err(crate::error::node_err(
                &n.name,
                &n.op_type,
                "full canonization supports 2-d convolutions only",
            ));
        }
        let (h, wd) = (xs[2], xs[3]);
        let geom = crate::graph::eval::conv_geom(win, *group, &[1, cin, h, wd], w.shape())
            .map_err(|e| crate::error::node_err(&n.name, &n.op_type, e))?;
        let shift: Vec<f64> = (0..cin * h * wd).map(|i| c[i / (h * wd)]).collect();
        let b = b0.map(|b| b.iter().copied().collect::<Vec<_>>());
        let per_ch = b.as_ref().filter(|b| b.len() == m);
        let mut t = conv2d(&geom, &shift, &ws.iter().copied().collect::<Vec<_>>(), per_ch.map(|v| &v[..]));
        if let Some(b) = b.filter(|b| b.len() != m) {
            t.iter_mut().zip(&b).for_each(|(x, y)| *x += *y);
        }
        t
    };
    let bshape = if new_bias.len() == m { vec![m] } else { vec![m, new_bias.len() / m] };
    let wid = add_const(g, format!("{}.bn_weight", n.name), Const::float(array(w.shape(), nw)));
    let bid = add_const(g, format!("{}.bn_bias", n.name), Const::float(array(&bshape, new_bias)));
    g.nodes[ci].inputs = vec![n.input(0), Some(wid), Some(bid)];
    Ok(())
}

/// Gemm(GAP(a·u + c)) = Gemm_{a·W}(GAP(u)) + W·c.
fn fold_affine_into_gemm(g: &mut Graph, gi: usize, a: &[f64], c: &[f64]) -> Result<()> {
    let n = g.nodes[gi].clone();
    let Op::Gemm { alpha, beta, trans_b, .. } = n.op else {
        return Ok(());
    };
    let w = const_f(g, n.input(1)).ok_or_else(|| Error::Invalid("gemm weight".into()))?;
    let (kdim, ndim) = if trans_b { (w.shape()[1], w.shape()[0]) } else { (w.shape()[0], w.shape()[1]) };
    if kdim != a.len() {
        return Err(crate::error::node_err(
            &n.name,
            &n.op_type,
            format!("has {kdim} inputs, the BatchNorm before it {}", a.len()),
        ));
    }
    let mut nw = w.as_standard_layout().into_owned();
    let mut shift = vec![0.0; ndim];
    for (ix, v) in nw.indexed_iter_mut() {
        let (kk, nn) = if trans_b { (ix[1], ix[0]) } else { (ix[0], ix[1]) };
        shift[nn] += alpha * *v * c[kk];
        *v *= a[kk];
    }
    let b0: Vec<f64> = match const_f(g, n.input(2)) {
        Some(b) => b
            .broadcast(IxDyn(&[ndim]))
            .map(|bb| bb.iter().map(|v| v * beta).collect())
            .unwrap_or_else(|| vec![0.0; ndim]),
        None => vec![0.0; ndim],
    };
    let nb: Vec<f64> = (0..ndim).map(|i| b0[i] + shift[i]).collect();
    let wid = add_const(g, format!("{}.bn_weight", n.name), Const::float(nw));
    let bid = add_const(g, format!("{}.bn_bias", n.name), Const::float(array(&[ndim], nb)));
    let node = &mut g.nodes[gi];
    node.inputs = vec![n.input(0), Some(wid), Some(bid)];
    if let Op::Gemm { beta, .. } = &mut node.op {
        *beta = 1.0;
    }
    Ok(())
}
