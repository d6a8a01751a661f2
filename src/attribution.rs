//! The user-facing attribution methods over one plan.

use crate::canonize::{Mode, canonize, check, value_shapes};
use crate::composite::{Composite, Params};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::graph::ValueId;
use crate::propagate::{Explanation, Plan, Seed, consts, explain};
use crate::rules::grad::RuleOpts;
use crate::tensor::{Float, Value};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// An attribution method.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// Layer-wise Relevance Propagation with a composite.
    Lrp(Box<Composite>),
    /// d target / d input.
    Gradient,
    /// input ⊙ gradient.
    InputXGradient,
}

impl Method {
    /// Parses `lrp`, `gradient` or `input_x_gradient` (LRP takes the given composite).
    pub fn parse(name: &str, composite: Composite) -> Result<Method> {
        match name {
            "lrp" => Ok(Method::Lrp(Box::new(composite))),
            "gradient" => Ok(Method::Gradient),
            "input_x_gradient" => Ok(Method::InputXGradient),
            _ => Err(Error::Invalid(format!("unknown method '{name}' (lrp, gradient, input_x_gradient)"))),
        }
    }

    fn composite(&self) -> Result<Composite> {
        match self {
            Method::Lrp(c) => Ok((**c).clone()),
            _ => Composite::named("gradient", &Params::default()),
        }
    }
}

/// Settings of one attribution run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Method.
    pub method: Method,
    /// Canonization.
    pub canonize: Mode,
    /// Rule options (bias, stabiliser, z^B bounds).
    pub opts: RuleOpts,
    /// Fail when the canonized graph deviates more than this (relative) from the original.
    pub tolerance: f64,
}

/// A plan with the report of its canonization, and its constants converted once per precision.
pub struct Prepared {
    /// The plan.
    pub plan: Plan,
    /// What canonization changed.
    pub report: Vec<String>,
    /// Max |Δ| / max |y| between original and canonized outputs on the given inputs.
    pub deviation: f64,
    consts: Mutex<HashMap<&'static str, Arc<dyn Any + Send + Sync>>>,
}

impl Prepared {
    /// The plan's constants in precision `T`, converted on first use.
    pub fn consts<T: Float>(&self) -> Arc<HashMap<ValueId, Value<T>>> {
        let mut cache = self.consts.lock().unwrap_or_else(|e| e.into_inner());
        let entry =
            cache.entry(T::NAME).or_insert_with(|| Arc::new(consts::<T>(&self.plan)) as Arc<dyn Any + Send + Sync>);
        match entry.clone().downcast::<HashMap<ValueId, Value<T>>>() {
            Ok(c) => c,
            // Unreachable: the key is the type's name; rebuild rather than panic.
            Err(_) => Arc::new(consts::<T>(&self.plan)),
        }
    }

    /// The explained output (logits) for `inputs`, without propagation.
    pub fn logits<T: Float>(&self, inputs: Vec<Value<T>>) -> Result<ndarray::ArrayD<T>> {
        let c = self.consts::<T>();
        let p = &self.plan;
        let env = crate::graph::run_keep(&p.graph, &c, inputs, &|v| v == p.explained)?;
        match env.get(p.explained) {
            Some(Value::F(a)) => Ok(a.clone()),
            _ => Err(Error::Invalid("the explained output is not a float tensor".into())),
        }
    }
}

/// Canonizes `g` for `inputs`, checks the forward pass, and assigns rules.
pub fn prepare<T: Float>(g: &Graph, inputs: &[Value<T>], s: &Settings) -> Result<Prepared> {
    let shapes = if s.canonize == Mode::Full { Some(value_shapes(g, inputs)?) } else { None };
    let (cg, report) = canonize(g, s.canonize, shapes.as_ref())?;
    let deviation = check(g, &cg, inputs)?;
    if deviation > s.tolerance {
        return Err(Error::Invalid(format!(
            "canonization changed the model's output by {deviation:.3e} (relative), more than the tolerance {:.1e}",
            s.tolerance
        )));
    }
    let plan = Plan::new(cg, &s.method.composite()?, s.opts.clone())?;
    Ok(Prepared { plan, report, deviation, consts: Mutex::new(HashMap::new()) })
}

/// Runs the method on a prepared plan.
pub fn attribute<T: Float>(
    p: &Prepared,
    method: &Method,
    inputs: Vec<Value<T>>,
    targets: Option<&[usize]>,
    keep: &[String],
) -> Result<Explanation<T>> {
    let c = p.consts::<T>();
    let (seed, times_input) = match method {
        Method::Lrp(comp) if comp.is_gradient() && comp.name == "gradient" => (Seed::OneHot, false),
        Method::Lrp(_) => (Seed::OneHotTimesOutput, false),
        Method::Gradient => (Seed::OneHot, false),
        Method::InputXGradient => (Seed::OneHot, true),
    };
    let xs: Vec<Value<T>> = if times_input { inputs.clone() } else { vec![] };
    let mut e = explain(&p.plan, &c, inputs, targets, seed, keep)?;
    if times_input {
        for (r, x) in e.relevance.iter_mut().zip(&xs) {
            if let (Some(r), Value::F(x)) = (r.as_mut(), x) {
                *r *= x;
            }
        }
    }
    Ok(e)
}
