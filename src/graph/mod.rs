//! The typed graph IR: nodes with an [`Op`], values by id, topological order.

pub mod batch;
pub mod eval;
pub mod ir;

pub use batch::batch_separable;
pub use eval::{Env, check_inputs, eval_node, format_dims, input_warnings, prepare_consts, run, run_keep};
pub use ir::*;
