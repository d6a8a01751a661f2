//! Kernels: pure functions on slices with their own tests.

pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod lstm;
pub mod pool;
