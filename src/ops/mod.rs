//! Kernels: pure functions on slices with their own tests.

pub mod conv;
mod depthwise16;
mod direct;
pub mod elementwise;
pub mod gemm;
pub mod lstm;
pub mod pointwise;
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

/// `s` as f32, for the kernels written for f32 alone.
///
/// # Panics
/// Where T is not f32.
pub fn as_f32<T: crate::tensor::Float>(s: &[T]) -> &[f32] {
    assert!(std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>(), "an f32-only kernel on another type");
    // SAFETY: T is f32 (checked above).
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
}

/// Whether the A/B switch `var` leaves its kernel on (anything but `off`), read once into `cell`:
/// the kernels' `RELPROP_*=off` variables, for timing two paths in one binary.
fn switch_on(cell: &'static std::sync::OnceLock<bool>, var: &str) -> bool {
    *cell.get_or_init(|| std::env::var(var).map_or(true, |v| v != "off"))
}

/// Set while a [`hot`] call keeps the pool's other threads busy: one at a time (see there).
static HOT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Threads spinning for a [`hot`] call (for its test: they must stop when it returns).
static SPINNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `f` (on a thread of rayon's pool) with the pool's other threads kept awake: each spins,
/// taking the jobs the kernels' parallel loops hand out, until `f` returns. Between two loops an
/// idle rayon worker goes to sleep within microseconds, and each loop then woke it through the
/// kernel: at batch 1, where a model's pass is a hundred short loops with serial work between
/// them, the scheduler's share of the cycles was 13 % (`perf`, EfficientNet-Lite0's forward);
/// onnxruntime's pool spins the same way. Only for passes with no parallelism around them (a
/// spinning thread that took a job of an outer parallel loop could wait on a pass that waits on
/// that job): the callers use it on a whole batch, never inside a per-sample loop, and a second
/// call while one runs spins nothing more. Each spinner runs in bounded slices (see `spin`).
pub fn hot<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    on_pool(|| {
        if rayon::current_num_threads() < 2 || HOT.swap(true, Ordering::AcqRel) {
            return f();
        }
        // Cleared when `f` returns or unwinds, so that the spinners always stop.
        struct Done(Arc<AtomicBool>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
                HOT.store(false, Ordering::Release);
            }
        }
        let done = Done(Arc::new(AtomicBool::new(false)));
        let flag = done.0.clone();
        let me = rayon::current_thread_index();
        rayon::spawn_broadcast(move |ctx| {
            if Some(ctx.index()) != me {
                spin(flag.clone(), me);
            }
        });
        f()
    })
}

/// How long one spinner runs before it hands over to a fresh job (see [`spin`]).
const SPIN_SLICE: std::time::Duration = std::time::Duration::from_micros(50);

/// One spinner of a [`hot`] call: takes jobs until `flag` is set, for at most [`SPIN_SLICE`], then
/// spawns its successor and returns. A worker can start the spinner nested inside a job of the
/// very pass it spins for (it took that job between its check of its broadcast queue and its
/// steal, and then found the spinner while the job waited on a join); spinning there until the
/// pass ends waited on the pass that waited on the job (`fwdloop` hung after some thousand
/// EfficientNet-Lite0 passes, the test below within two hundred calls). A bounded spinner lets the
/// job go on; its successor, spawned onto this worker's own queue, keeps the thread spinning.
fn spin(flag: std::sync::Arc<std::sync::atomic::AtomicBool>, me: Option<usize>) {
    use std::sync::atomic::Ordering;
    if rayon::current_thread_index() == me {
        // The caller's own thread took a successor: it has the pass to run.
        return;
    }
    SPINNING.fetch_add(1, Ordering::AcqRel);
    let t0 = std::time::Instant::now();
    // The clock read every 64 rounds: read every round it was 4 % of an explanation's samples in
    // `perf` (on the spinning thread, between the jobs it takes).
    let mut rounds = 0u32;
    while !flag.load(Ordering::Acquire) {
        rounds = rounds.wrapping_add(1);
        if rounds.is_multiple_of(64) && t0.elapsed() > SPIN_SLICE {
            SPINNING.fetch_sub(1, Ordering::AcqRel);
            rayon::spawn(move || spin(flag, me));
            return;
        }
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
    SPINNING.fetch_sub(1, Ordering::AcqRel);
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

#[cfg(test)]
mod tests {
    use super::hot;
    use rayon::prelude::*;

    /// A parallel loop inside, nested calls, concurrent calls from several threads and a panic
    /// inside all come back with `f`'s result, and afterwards the spinners stop and every pool
    /// thread takes new work (a hang becomes a failure through the watchdog).
    #[test]
    fn hot_returns_and_lets_the_pool_go() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let sum: u64 = hot(|| (0..100_000u64).into_par_iter().sum());
            assert_eq!(sum, 99_999 * 100_000 / 2);
            assert_eq!(hot(|| hot(|| 7)), 7);
            let threads: Vec<_> = (0..4u64)
                .map(|i| std::thread::spawn(move || hot(|| (0..10_000u64).into_par_iter().map(|v| v * i).sum::<u64>())))
                .collect();
            for (i, t) in threads.into_iter().enumerate() {
                assert_eq!(t.join().unwrap(), i as u64 * 9_999 * 10_000 / 2);
            }
            assert!(std::panic::catch_unwind(|| hot(|| panic!("inside a hot pass"))).is_err());
            let reached: usize = rayon::broadcast(|_| 1usize).into_iter().sum();
            assert_eq!(reached, rayon::current_num_threads());
            // Other tests' passes may spin for a while; none spins forever.
            let t0 = std::time::Instant::now();
            while super::SPINNING.load(std::sync::atomic::Ordering::Acquire) > 0 {
                assert!(t0.elapsed().as_secs() < 20, "spinners left running after hot() returned");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(60)).expect("hot() left the pool busy or failed");
    }

    /// Back-to-back calls with nested parallel loops, on more threads than cores so that the OS
    /// preempts workers mid-way: a worker still spinning for the last call could take a job of
    /// the next one before that call's spinner, then run the new spinner nested inside the job,
    /// which the call waits on (a hang in `fwdloop` after some thousand passes).
    #[test]
    fn hot_back_to_back_calls_never_hang() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) + 2;
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let iters: u64 = std::env::var("HOT_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
            for i in 0..iters {
                let got = pool.install(|| {
                    hot(|| {
                        (0..16u64)
                            .into_par_iter()
                            .map(|j| (0..(j + i % 7) * 50).into_par_iter().map(|v| v % 3).sum::<u64>())
                            .sum::<u64>()
                    })
                });
                let want: u64 = (0..16u64).map(|j| (0..(j + i % 7) * 50).map(|v| v % 3).sum::<u64>()).sum();
                assert_eq!(got, want, "call {i}");
            }
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(120)).expect("back-to-back hot() calls hung or failed");
    }
}
