//! The library's error type: every variant names what was wrong and where.

use std::path::PathBuf;

/// Errors from importing, checking and evaluating a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a (complete) ONNX model.
    #[error("{path} is not a valid ONNX model: {reason}")]
    NotOnnx {
        /// The file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// The model uses operators relprop does not implement.
    #[error("unsupported operator(s): {ops}\nsupported operators: {supported}")]
    Unsupported {
        /// `OpType (node 'name')` items.
        ops: String,
        /// The supported operator list.
        supported: String,
    },
    /// A node's attributes, inputs or shapes are invalid.
    #[error("node '{node}' ({op}): {msg}")]
    Node {
        /// Node name.
        node: String,
        /// ONNX op type.
        op: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor stored in the model could not be decoded.
    #[error("tensor '{tensor}': {msg}")]
    Tensor {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        msg: String,
    },
    /// A user-supplied input has the wrong shape.
    #[error("input '{name}': expected shape {expected}, got {got}")]
    InputShape {
        /// Graph input name.
        name: String,
        /// The model's declared shape.
        expected: String,
        /// The supplied shape.
        got: String,
    },
    /// A user-supplied input has the wrong element type.
    #[error("input '{name}': expected {expected} data, got {got}")]
    InputDtype {
        /// Graph input name.
        name: String,
        /// The model's declared type.
        expected: String,
        /// The supplied type.
        got: String,
    },
    /// Inputs do not match the graph's inputs by name or count.
    #[error("{0}")]
    Inputs(String),
    /// Any other invalid request.
    #[error("{0}")]
    Invalid(String),
}

/// Shorthand for results with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds a [`Error::Node`].
pub fn node_err(node: &str, op: &str, msg: impl Into<String>) -> Error {
    Error::Node { node: node.to_string(), op: op.to_string(), msg: msg.into() }
}
