//! relprop: Layer-wise Relevance Propagation for ONNX models.
//!
//! The pipeline (see `DESIGN.md`): [`onnx`] imports a file into a [`graph::Graph`], which
//! [`graph::run`] evaluates with the kernels in [`ops`].

#![warn(missing_docs)]

pub mod attribution;
pub mod bench;
pub mod canonize;
pub mod composite;
pub mod error;
pub mod evaluate;
pub mod graph;
pub mod io;
pub mod labels;
pub mod onnx;
pub mod ops;
pub mod preprocess;
pub mod propagate;
pub mod render;
pub mod rules;
pub mod tensor;

pub use error::{Error, Result};
