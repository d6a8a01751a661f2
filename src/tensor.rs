//! Element types and the dynamically typed value that flows through a graph.

use ndarray::{ArrayD, IxDyn};
use std::fmt::Debug;

/// A floating-point element type the kernels are generic over (f32 or f64).
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + Copy
    + Send
    + Sync
    + Debug
    + Default
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::ops::DivAssign
    + ndarray::ScalarOperand
    + ndarray::LinalgScalar
    + 'static
{
    /// Converts from f64 (rounding for f32).
    fn of(x: f64) -> Self;
    /// Converts to f64 exactly.
    fn f64(self) -> f64;
    /// Short name used in messages ("f32", "f64").
    const NAME: &'static str;
}

impl Float for f32 {
    #[inline]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn f64(self) -> f64 {
        self as f64
    }
    const NAME: &'static str = "f32";
}

impl Float for f64 {
    #[inline]
    fn of(x: f64) -> Self {
        x
    }
    #[inline]
    fn f64(self) -> f64 {
        self
    }
    const NAME: &'static str = "f64";
}

/// A tensor value during evaluation: floating point data in the run's precision, or integers
/// (shapes, indices, token ids), which ONNX graphs mix freely.
#[derive(Clone, Debug)]
pub enum Value<T> {
    /// Floating point data.
    F(ArrayD<T>),
    /// Integer data (int64 and every other integer or boolean type, widened).
    I(ArrayD<i64>),
}

impl<T: Float> Value<T> {
    /// The shape of the value.
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F(a) => a.shape(),
            Value::I(a) => a.shape(),
        }
    }

    /// Short type name for messages.
    pub fn dtype(&self) -> &'static str {
        match self {
            Value::F(_) => T::NAME,
            Value::I(_) => "int64",
        }
    }

    /// The value as floats, converting integers.
    pub fn to_float(&self) -> ArrayD<T> {
        match self {
            Value::F(a) => a.clone(),
            Value::I(a) => a.mapv(|v| T::of(v as f64)),
        }
    }

    /// The value as integers, truncating floats toward zero.
    pub fn to_int(&self) -> ArrayD<i64> {
        match self {
            Value::F(a) => a.mapv(|v| v.f64() as i64),
            Value::I(a) => a.clone(),
        }
    }
}

/// A constant stored in a graph, in its original element family; converted once to the run's
/// precision by the evaluator so that one imported graph serves f32 and f64 runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Const {
    /// Float data in f64 (f64 sources and values computed by canonization), shared between a graph
    /// and its canonized copies.
    F(ndarray::ArcArray<f64, ndarray::IxDyn>),
    /// Float data from f32 sources, kept as f32: half the memory of f64 and exactly the same values
    /// (VGG-16's weights are 550 MB so, 1.1 GB in f64).
    F32(ndarray::ArcArray<f32, ndarray::IxDyn>),
    /// Integer or boolean data.
    I(ArrayD<i64>),
}

impl Const {
    /// A float constant.
    pub fn float(a: ArrayD<f64>) -> Const {
        Const::F(a.into_shared())
    }

    /// A float constant read from f32 data.
    pub fn float32(a: ArrayD<f32>) -> Const {
        Const::F32(a.into_shared())
    }

    /// The float data in f64 (None for integers).
    pub fn f64s(&self) -> Option<ArrayD<f64>> {
        match self {
            Const::F(a) => Some(a.to_owned()),
            Const::F32(a) => Some(a.mapv(|v| v as f64)),
            Const::I(_) => None,
        }
    }

    /// The shape of the constant.
    pub fn shape(&self) -> &[usize] {
        match self {
            Const::F32(a) => a.shape(),
            Const::F(a) => a.shape(),
            Const::I(a) => a.shape(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    /// Whether the constant has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts into a run-time value of precision `T`.
    pub fn to_value<T: Float>(&self) -> Value<T> {
        match self {
            Const::F(a) => Value::F(a.mapv(T::of)),
            Const::F32(a) => Value::F(a.mapv(|v| T::of(v as f64))),
            Const::I(a) => Value::I(a.clone()),
        }
    }

    /// Converts a run-time value back into a constant (used by constant folding).
    pub fn from_value<T: Float>(v: &Value<T>) -> Const {
        match v {
            Value::F(a) => Const::float(a.mapv(|x| x.f64())),
            Value::I(a) => Const::I(a.clone()),
        }
    }

    /// Integer view of the constant (floats truncated).
    pub fn to_ints(&self) -> Vec<i64> {
        match self {
            Const::F(a) => a.iter().map(|&x| x as i64).collect(),
            Const::F32(a) => a.iter().map(|&x| x as i64).collect(),
            Const::I(a) => a.iter().copied().collect(),
        }
    }

    /// Float view of the constant.
    pub fn to_floats(&self) -> ArrayD<f64> {
        match self {
            Const::F(a) => a.to_owned(),
            Const::F32(a) => a.mapv(|x| x as f64),
            Const::I(a) => a.mapv(|x| x as f64),
        }
    }
}

/// Builds an f-array from a shape and data; the caller guarantees the length matches.
pub fn array<T: Clone>(shape: &[usize], data: Vec<T>) -> ArrayD<T> {
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape and data length agree by construction")
}
