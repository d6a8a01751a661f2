//! Kernels: pure functions on slices with their own tests.

pub mod conv;
mod depthwise16;
mod direct;
pub mod elementwise;
pub mod gemm;
pub mod lstm;
pub mod pool;
mod winograd;

/// Whether the hand-written AVX-512 kernels run: the CPU has AVX-512F (the crate is built for AVX2
/// and dispatches at run time) and `RELPROP_NO_AVX512` is not set (for A/B timing in one binary).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE
        .get_or_init(|| std::is_x86_feature_detected!("avx512f") && std::env::var_os("RELPROP_NO_AVX512").is_none())
}
/// No AVX-512 kernels off x86-64.
#[cfg(not(target_arch = "x86_64"))]
fn avx512() -> bool {
    false
}
