//! Kernels: pure functions on slices with their own tests.

pub mod conv;
pub mod gemm;
pub mod lstm;
pub mod pool;
