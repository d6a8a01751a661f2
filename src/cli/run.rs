//! `relprop inspect` and `relprop run`.

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use relprop::graph::{Graph, format_dims, input_warnings, prepare_consts, run as forward};
use relprop::tensor::{Float, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Arithmetic precision of a run.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats.
    F32,
    /// 64-bit floats.
    F64,
}

#[derive(Args)]
pub struct InspectArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Also print the rule this composite assigns to every node (after canonization).
    #[arg(long)]
    composite: Option<String>,
    /// Canonization used with --composite: full or minimal.
    #[arg(long, default_value = "full")]
    canonize: String,
    /// Rule overrides as for explain (OPTYPE=rule, name:GLOB=rule, #N=rule).
    #[arg(long = "rule")]
    rules: Vec<String>,
}

/// Zero inputs of the declared shapes (free dimensions set to 1), for shape-dependent rewrites.
fn dummy_inputs(g: &Graph) -> Option<Vec<Value<f32>>> {
    g.inputs
        .iter()
        .map(|i| {
            let dims: Vec<usize> = i
                .dims
                .as_ref()?
                .iter()
                .map(|d| match d {
                    relprop::graph::Dim::Fixed(n) => *n,
                    relprop::graph::Dim::Free(_) => 1,
                })
                .collect();
            Some(match i.kind {
                relprop::graph::ElemKind::Float => Value::F(ndarray::ArrayD::zeros(ndarray::IxDyn(&dims))),
                relprop::graph::ElemKind::Int => Value::I(ndarray::ArrayD::zeros(ndarray::IxDyn(&dims))),
            })
        })
        .collect()
}

fn print_rules(g: &Graph, a: &InspectArgs, name: &str) -> Result<()> {
    let mode: relprop::canonize::Mode = a.canonize.parse().map_err(anyhow::Error::msg)?;
    let shapes = match (mode, dummy_inputs(g)) {
        (relprop::canonize::Mode::Full, Some(x)) => relprop::canonize::value_shapes(g, &x).ok(),
        _ => None,
    };
    let (cg, report) = relprop::canonize::canonize(g, mode, shapes.as_ref())?;
    let mut comp = relprop::composite::Composite::named(name, &relprop::composite::Params::default())?;
    for r in &a.rules {
        comp.overrides.push(r.parse().map_err(anyhow::Error::msg).with_context(|| format!("--rule {r}"))?);
    }
    let plan = relprop::propagate::Plan::new(cg, &comp, Default::default())?;
    println!("canonization ({}): {} change(s)", a.canonize, report.len());
    for line in &report {
        println!("  {line}");
    }
    println!("rules ({name}):");
    for (i, (n, r)) in plan.graph.nodes.iter().zip(&plan.rules).enumerate() {
        let rule = r.as_ref().map(|r| r.to_string()).unwrap_or_else(|| "-".into());
        println!("  #{i:<4} {:<20} {:<22} {}", n.op_type, rule, n.name);
    }
    println!("explained value: {}", plan.graph.names[plan.explained]);
    Ok(())
}

#[derive(Args)]
pub struct RunArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Pictures (PNG/JPEG) or directories: prints the top classes of each.
    pictures: Vec<PathBuf>,
    /// Picture preprocessing (or the model's MODEL.relprop.toml sidecar).
    #[command(flatten)]
    pre: super::images::PreprocessFlags,
    /// Classes to print per picture.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Input .npy file for the first graph input, or NAME=FILE.npy (repeat for several inputs).
    #[arg(long, short)]
    input: Vec<String>,
    /// Output .npy file for the first graph output, or NAME=FILE.npy (repeat for several).
    #[arg(long, short)]
    output: Vec<String>,
    /// Arithmetic precision.
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
}

pub fn inspect(a: InspectArgs) -> Result<ExitCode> {
    let (g, unsupported) =
        relprop::onnx::load_lenient(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    println!("model: {}", a.model.display());
    println!("opset: {}   nodes: {}   parameters: {}", g.opset, g.nodes.len(), g.parameter_count());
    println!("inputs:");
    for i in &g.inputs {
        let dims = i.dims.as_ref().map(|d| format_dims(d)).unwrap_or_else(|| "[?]".into());
        let kind = if i.kind == relprop::graph::ElemKind::Float { "float" } else { "int" };
        println!("  {:<24} {kind:<6} {dims}", g.names[i.id]);
    }
    println!("outputs:");
    for (o, d) in g.outputs.iter().zip(&g.output_dims) {
        let dims = d.as_ref().map(|d| format_dims(d)).unwrap_or_else(|| "[?]".into());
        println!("  {:<24} {dims}", g.names[*o]);
    }
    println!("ops:");
    for (op, n) in g.op_histogram() {
        println!("  {op:<24} {n}");
    }
    if unsupported.is_empty() {
        println!("unsupported ops: none");
        if let Some(name) = &a.composite {
            let g = relprop::onnx::load(&a.model)?;
            print_rules(&g, &a, name)?;
        }
        Ok(ExitCode::SUCCESS)
    } else {
        println!("unsupported ops: {}", unsupported.join(", "));
        Ok(ExitCode::from(2))
    }
}

/// Splits `NAME=FILE` specs; a bare FILE goes to the position's default name.
fn named(specs: &[String], names: &[String], what: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for (k, s) in specs.iter().enumerate() {
        match s.split_once('=') {
            Some((n, f)) if names.iter().any(|x| x == n) => out.push((n.to_string(), PathBuf::from(f))),
            Some((n, _)) if !std::path::Path::new(s).exists() => {
                bail!("the model has no {what} named '{n}'; it has: {}", names.join(", "))
            }
            _ => {
                let n = names
                    .get(k)
                    .with_context(|| format!("more {what} files than the model's {} {what}s", names.len()))?;
                out.push((n.clone(), PathBuf::from(s)));
            }
        }
    }
    Ok(out)
}

/// Reads the inputs named on the command line in the graph's input order.
pub fn read_inputs<T: Float>(g: &Graph, specs: &[String]) -> Result<Vec<Value<T>>> {
    let names: Vec<String> = g.inputs.iter().map(|i| g.names[i.id].clone()).collect();
    let given = named(specs, &names, "input")?;
    let mut vals = Vec::new();
    for n in &names {
        let (_, path) = given
            .iter()
            .find(|(k, _)| k == n)
            .with_context(|| format!("no file given for input '{n}' (use --input {n}=FILE.npy)"))?;
        vals.push(relprop::io::read_npy::<T>(path).with_context(|| format!("reading input '{n}'"))?);
    }
    Ok(vals)
}

fn run_typed<T: Float>(a: &RunArgs, g: &Graph) -> Result<()> {
    let inputs = read_inputs::<T>(g, &a.input)?;
    for w in input_warnings(g, &inputs) {
        eprintln!("warning: {w}");
    }
    let consts = prepare_consts::<T>(g);
    let t0 = Instant::now();
    let outs = forward(g, &consts, inputs)?;
    let dt = t0.elapsed();
    let names: Vec<String> = g.outputs.iter().map(|o| g.names[*o].clone()).collect();
    for (n, v) in names.iter().zip(&outs) {
        println!("{n}: shape {:?} ({})", v.shape(), v.dtype());
    }
    println!("forward: {:.1} ms ({})", dt.as_secs_f64() * 1e3, T::NAME);
    for (n, path) in named(&a.output, &names, "output")? {
        let k = names.iter().position(|x| *x == n).context("output name")?;
        relprop::io::write_npy(&path, &outs[k]).with_context(|| format!("writing output '{n}'"))?;
        println!("wrote {} ({n})", path.display());
    }
    Ok(())
}

/// Classifies pictures: top-k classes with probabilities (softmax of the first output).
fn run_pictures(a: &RunArgs, g: &Graph) -> Result<ExitCode> {
    let (side, side_path) = super::images::sidecar(&a.model)?;
    let pre = super::images::preprocess(&a.pre, &side)?;
    let labels = super::images::labels(&a.pre, &side, side_path.as_deref())?;
    let consts = prepare_consts::<f32>(g);
    let mut ok = true;
    for f in super::images::collect(&a.pictures)? {
        let result = (|| -> Result<Vec<f64>> {
            let pic = pre.picture(&f)?;
            let x = Value::F(pre.tensor(std::slice::from_ref(&pic))?.mapv(|v| v as f32));
            let y = forward(g, &consts, vec![x])?;
            Ok(y[0].to_float().iter().map(|&v| v as f64).collect())
        })();
        match result {
            Ok(logits) => {
                println!("{}:", f.display());
                for (k, prob) in relprop::labels::top_k(&logits, a.top_k) {
                    println!(
                        "  {k:5}  {prob:6.3}  {:9.3}  {}",
                        logits[k],
                        labels.get(k).map(String::as_str).unwrap_or("")
                    );
                }
            }
            Err(e) => {
                ok = false;
                eprintln!("error: {}: {e:#}", f.display());
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub fn run(a: RunArgs) -> Result<ExitCode> {
    let g = relprop::onnx::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    if !a.pictures.is_empty() {
        return run_pictures(&a, &g);
    }
    if a.input.is_empty() {
        anyhow::bail!("nothing to run: give pictures, or --input FILE.npy");
    }
    match a.precision {
        Precision::F32 => run_typed::<f32>(&a, &g)?,
        Precision::F64 => run_typed::<f64>(&a, &g)?,
    }
    Ok(ExitCode::SUCCESS)
}
