//! The `relprop` command-line tool: a thin layer over the library.

mod cli;

// Explanations allocate and free many large activation buffers per pass; the system allocator
// hands them back to the kernel and takes page faults to get them again (~10 % of a ResNet-50 LRP
// pass in perf), mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_t` in mimalloc.h; the Rust
/// bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Freed buffers stay committed instead of going back to the kernel 10 ms later: a pass frees
    // and allocates activations of the same sizes again and again, and each fresh page cost a
    // page fault and the kernel's clearing (10 % of an EfficientNet-Lite0 LRP pass in perf; 4.5 %
    // faster with it off). Peak memory is unchanged; memory is returned when the process exits.
    // SAFETY: sets an allocator option; called before any thread is started.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    cli::main()
}
