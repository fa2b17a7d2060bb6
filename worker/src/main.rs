//! `msae-worker`: thin binary over the msae-worker library.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    msae_worker::cli::main()
}
