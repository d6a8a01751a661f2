//! The user-facing attribution methods over one plan.

use crate::canonize::{Mode, canonize, check, value_shapes};
use crate::composite::{Composite, Params};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::graph::ValueId;
use crate::propagate::{Explanation, Plan, Seed, consts, explain, weight_caches};
use crate::rules::grad::RuleOpts;
use crate::rules::linear::WeightCache;
use crate::tensor::{Float, Value, array};
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
    /// Converted constants per precision, shared with the plans made by [`Prepared::with_method`].
    consts: Arc<Mutex<AnyCache>>,
    /// The rules' modified weights per precision (this plan's own).
    weights: Mutex<AnyCache>,
    /// This plan's own constants, if its graph has some its parent's lack (see `consts`).
    own_consts: Mutex<AnyCache>,
}

/// Values keyed by the precision's name ([`Float::NAME`]).
type AnyCache = HashMap<&'static str, Arc<dyn Any + Send + Sync>>;

/// The entry of `cache` for `T`, made by `make` on first use.
fn cached<T: Float, V: Any + Send + Sync>(cache: &Mutex<AnyCache>, make: impl Fn() -> V) -> Arc<V> {
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    let entry = c.entry(T::NAME).or_insert_with(|| Arc::new(make()) as Arc<dyn Any + Send + Sync>);
    match entry.clone().downcast() {
        Ok(v) => v,
        // Unreachable: the key is the type's name; rebuild rather than panic.
        Err(_) => Arc::new(make()),
    }
}

impl Prepared {
    /// The plan's constants in precision `T`, converted on first use.
    pub fn consts<T: Float>(&self) -> Arc<HashMap<ValueId, Value<T>>> {
        let c = cached::<T, _>(&self.consts, || consts::<T>(&self.plan));
        // A plan made by `with_method` shares its parent's constants when its graph has no others.
        if self.plan.graph.consts.keys().all(|k| c.contains_key(k)) {
            return c;
        }
        cached::<T, _>(&self.own_consts, || consts::<T>(&self.plan))
    }

    /// The rules' modified weights in precision `T`, made on first use.
    fn weights<T: Float>(&self, c: &HashMap<ValueId, Value<T>>) -> Arc<HashMap<usize, WeightCache<T>>> {
        cached::<T, _>(&self.weights, || weight_caches(&self.plan, c))
    }

    /// The same canonized graph with another method's rules, without canonizing and checking it
    /// again; shares the converted constants (one copy of the weights for several methods).
    pub fn with_method(&self, method: &Method, opts: RuleOpts) -> Result<Prepared> {
        let plan = Plan::new(self.plan.graph.clone(), &method.composite()?, opts)?;
        Ok(Prepared {
            plan,
            report: self.report.clone(),
            deviation: self.deviation,
            consts: self.consts.clone(),
            weights: Mutex::new(HashMap::new()),
            own_consts: Mutex::new(HashMap::new()),
        })
    }

    /// The explained output (logits) for `inputs`, without propagation.
    pub fn logits<T: Float>(&self, inputs: Vec<Value<T>>) -> Result<ndarray::ArrayD<T>> {
        let c = self.consts::<T>();
        // Sample by sample where the graph allows it, as `graph::run` (the evaluation scores
        // batches of perturbed copies through here).
        crate::graph::check_inputs(&self.plan.graph, &inputs)?;
        if let Some(parts) = crate::graph::batch::split_samples(&self.plan.graph, &inputs) {
            use rayon::prelude::*;
            let outs: Vec<ndarray::ArrayD<T>> =
                parts.into_par_iter().with_max_len(1).map(|x| self.logits_batch(&c, x)).collect::<Result<_>>()?;
            return crate::graph::batch::concat_samples(&outs).map_err(Error::Invalid);
        }
        self.logits_batch(&c, inputs)
    }

    /// [`Prepared::logits`] of the whole batch at once.
    fn logits_batch<T: Float>(
        &self,
        c: &HashMap<ValueId, Value<T>>,
        inputs: Vec<Value<T>>,
    ) -> Result<ndarray::ArrayD<T>> {
        let p = &self.plan;
        let env = crate::graph::run_keep(&p.graph, c, inputs, &|v| v == p.explained)?;
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
    Ok(Prepared {
        plan,
        report,
        deviation,
        consts: Arc::new(Mutex::new(HashMap::new())),
        weights: Mutex::new(HashMap::new()),
        own_consts: Mutex::new(HashMap::new()),
    })
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
    let weights = p.weights::<T>(&c);
    let (seed, times_input) = match method {
        Method::Lrp(comp) if comp.is_gradient() && comp.name == "gradient" => (Seed::OneHot, false),
        Method::Lrp(_) => (Seed::OneHotTimesOutput, false),
        Method::Gradient => (Seed::OneHot, false),
        Method::InputXGradient => (Seed::OneHot, true),
    };
    let xs: Vec<Value<T>> = if times_input { inputs.clone() } else { vec![] };
    let mut e = explain(&p.plan, &c, &weights, inputs, targets, seed, keep)?;
    if times_input {
        for (r, x) in e.relevance.iter_mut().zip(&xs) {
            if let (Some(r), Value::F(x)) = (r.as_mut(), x) {
                *r *= x;
            }
        }
    }
    Ok(e)
}

/// A baseline attribution method over a prepared plan (zennit's definitions).
#[derive(Clone, Debug, PartialEq)]
pub enum Baseline {
    /// Mean of the plan's attribution at `samples` noisy copies (noise std = level × (max − min)
    /// per sample; the last copy is noise-free, as zennit).
    SmoothGrad {
        /// Noise level.
        noise_level: f64,
        /// Number of copies.
        samples: usize,
    },
    /// (x − baseline) ⊙ mean of the attribution along the straight path (right Riemann sum).
    IntegratedGradients {
        /// Number of steps.
        samples: usize,
    },
    /// Score of the input with everything but a sliding window set to zero, added to the window.
    Occlusion {
        /// Window side.
        window: usize,
        /// Stride.
        stride: usize,
    },
    /// Uniform noise in [−1, 1): a control.
    Random,
}

/// Runs a baseline method; `seed` makes the noise reproducible. `baseline` (IG) defaults to zeros.
pub fn attribute_baseline<T: Float>(
    p: &Prepared,
    method: &Method,
    b: &Baseline,
    x: &ndarray::ArrayD<T>,
    targets: Option<&[usize]>,
    baseline: Option<&ndarray::ArrayD<T>>,
    seed: u64,
) -> Result<ndarray::ArrayD<T>> {
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = x.shape()[0];
    let per = x.len() / n.max(1);
    let one = |input: ndarray::ArrayD<T>, t: Option<&[usize]>| -> Result<ndarray::ArrayD<T>> {
        let e = attribute(p, method, vec![Value::F(input)], t, &[])?;
        e.relevance.into_iter().next().flatten().ok_or_else(|| Error::Invalid("no relevance for the input".into()))
    };
    // Fix the targets first, so that noisy copies explain the same class.
    let fixed: Vec<usize> = match targets {
        Some(t) => t.to_vec(),
        None => crate::propagate::argmax_rows(&p.logits(vec![Value::F(x.clone())])?),
    };
    match b {
        Baseline::SmoothGrad { noise_level, samples } => {
            let xs = x.as_standard_layout().into_owned();
            let flat: Vec<T> = xs.iter().copied().collect();
            let std: Vec<f64> = (0..n)
                .map(|i| {
                    let s = &flat[i * per..(i + 1) * per];
                    let (lo, hi) =
                        s.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v.f64()), b.max(v.f64())));
                    noise_level * (hi - lo)
                })
                .collect();
            let mut acc = ndarray::ArrayD::<T>::zeros(x.raw_dim());
            let k = (*samples).max(1);
            for it in 0..k {
                let noisy: Vec<T> = flat
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| {
                        if it == k - 1 {
                            v
                        } else {
                            let z: f64 = StandardNormal.sample(&mut rng);
                            v + T::of(z * std[j / per])
                        }
                    })
                    .collect();
                let r = one(array(x.shape(), noisy), Some(&fixed))?;
                acc = acc + r.mapv(|v| v / T::of(k as f64));
            }
            Ok(acc)
        }
        Baseline::IntegratedGradients { samples } => {
            let zero = ndarray::ArrayD::<T>::zeros(x.raw_dim());
            let base = baseline.unwrap_or(&zero);
            if base.shape() != x.shape() {
                return Err(Error::Invalid(format!(
                    "baseline shape {:?} differs from the input {:?}",
                    base.shape(),
                    x.shape()
                )));
            }
            let k = (*samples).max(1);
            let mut acc = ndarray::ArrayD::<T>::zeros(x.raw_dim());
            for it in 1..=k {
                let alpha = T::of(it as f64 / k as f64);
                let path = base + &((x - base) * alpha);
                acc = acc + one(path, Some(&fixed))?.mapv(|v| v / T::of(k as f64));
            }
            Ok(acc * &(x - base))
        }
        Baseline::Occlusion { window, stride } => {
            if x.ndim() < 3 {
                return Err(Error::Invalid("occlusion needs [N, C, ...] inputs".into()));
            }
            let (h, w) = if x.ndim() == 4 { (x.shape()[2], x.shape()[3]) } else { (1, x.shape()[2]) };
            let (wh, ww) = (if h == 1 { 1 } else { (*window).min(h) }, (*window).min(w));
            let (sh, sw) = (if h == 1 { 1 } else { (*stride).max(1) }, (*stride).max(1));
            let mut out = ndarray::ArrayD::<T>::zeros(x.raw_dim());
            let xs = x.as_standard_layout().into_owned();
            let four = x.ndim() == 4;
            for y0 in (0..h).step_by(sh) {
                for x0 in (0..w).step_by(sw) {
                    let inside = |yy: usize, xx: usize| yy >= y0 && yy < y0 + wh && xx >= x0 && xx < x0 + ww;
                    let mut occl = xs.clone();
                    for (ix, v) in occl.indexed_iter_mut() {
                        let (yy, xx): (usize, usize) = if four { (ix[2], ix[3]) } else { (0, ix[2]) };
                        if !inside(yy, xx) {
                            *v = T::zero();
                        }
                    }
                    let logits = p.logits(vec![Value::F(occl)])?;
                    let lper = logits.len() / n;
                    let lf: Vec<T> = logits.iter().copied().collect();
                    for (ix, v) in out.indexed_iter_mut() {
                        let (yy, xx): (usize, usize) = if four { (ix[2], ix[3]) } else { (0, ix[2]) };
                        if inside(yy, xx) {
                            let s = ix[0];
                            *v += lf[s * lper + fixed[s]];
                        }
                    }
                }
            }
            Ok(out)
        }
        Baseline::Random => {
            let v: Vec<T> = (0..x.len()).map(|_| T::of(rng.random::<f64>() * 2.0 - 1.0)).collect();
            Ok(array(x.shape(), v))
        }
    }
}
