//! Argument parsing and the subcommands.

mod bench;
mod demo;
mod eval;
mod explain;
mod images;
mod run;
mod sequence;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Layer-wise Relevance Propagation for ONNX models.
#[derive(Parser)]
#[command(name = "relprop", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model: inputs, outputs, op histogram, parameters, unsupported ops.
    Inspect(run::InspectArgs),
    /// Run the forward pass on .npy inputs and write the outputs as .npy.
    Run(run::RunArgs),
    /// Explain predictions: relevance of every input element, as .npy.
    Explain(Box<explain::ExplainArgs>),
    /// Time forward, gradient and LRP per composite, with ratios and peak memory.
    Bench(bench::BenchArgs),
    /// Score explanations by region perturbation (MoRF/LeRF, AOPC, ABPC) for several methods.
    Eval(Box<eval::EvalArgs>),
    /// Classify and explain the bundled picture with the bundled model.
    Demo(demo::DemoArgs),
}

/// Entry point: runs the chosen subcommand and reports errors with their context.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => run::inspect(a),
        Command::Run(a) => run::run(a),
        Command::Demo(a) => demo::demo(a),
        Command::Eval(a) => eval::eval(*a),
        Command::Bench(a) => bench::bench(a),
        Command::Explain(a) => explain::explain(*a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
