//! Kernels: pure functions on slices with their own tests.

pub mod conv;
mod depthwise16;
mod direct;
pub mod elementwise;
pub mod gemm;
pub mod lstm;
pub mod pool;
mod shifted;
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

/// Runs `f` on a thread of rayon's pool, or in place when already on one. The kernels' parallel
/// loops, called from outside the pool, hand their work to it and put the caller to sleep until
/// it is done: two thread switches per loop, and the calling core idle meanwhile. From a worker,
/// the loop's first half runs on the caller while the other workers, still spinning from the
/// last loop, take the rest. EfficientNet-Lite0's batch-1 forward ran in 0.85 of the time
/// (`fwdloop`, 2 threads, 5 alternations on the AMD EPYC machine).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() { f() } else { rayon::scope(|_| f()) }
}
