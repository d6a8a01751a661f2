//! Kernels: pure functions on slices with their own tests.

pub mod conv;
mod depthwise16;
mod direct;
pub mod elementwise;
pub mod gemm;
pub mod lstm;
pub mod pool;
