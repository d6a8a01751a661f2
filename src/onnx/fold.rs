//! Constant folding: nodes whose inputs are all constants are evaluated once at import, so that
//! shape subgraphs (Shape → Gather → Concat → Reshape ...) on constants disappear.

use crate::error::Result;
use crate::graph::{Graph, eval_node};
use crate::tensor::{Const, Value};

/// Folds constant nodes (evaluated in f64) and removes nodes whose outputs nobody reads.
pub fn fold_constants(g: &mut Graph) -> Result<()> {
    let nodes = std::mem::take(&mut g.nodes);
    let mut kept = Vec::with_capacity(nodes.len());
    for node in nodes {
        let all_const = node.inputs.iter().flatten().all(|v| g.consts.contains_key(v))
            && node.inputs.iter().flatten().next().is_some();
        if !all_const {
            kept.push(node);
            continue;
        }
        let vals: Vec<Option<Value<f64>>> = node.inputs.iter().map(|i| i.map(|id| g.consts[&id].to_value())).collect();
        let refs: Vec<Option<&Value<f64>>> = vals.iter().map(Option::as_ref).collect();
        let outs = eval_node(&node, &refs)?;
        for (o, v) in node.outputs.iter().zip(outs) {
            if let Some(o) = o {
                g.consts.insert(*o, Const::from_value(&v));
            }
        }
    }
    g.nodes = kept;
    g.prune();
    Ok(())
}
