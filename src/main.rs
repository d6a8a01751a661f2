//! The `relprop` command-line tool: a thin layer over the library.

mod cli;

// Explanations allocate and free many large activation buffers per pass; the system allocator
// hands them back to the kernel and takes page faults to get them again (~10 % of a ResNet-50 LRP
// pass in perf), mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
