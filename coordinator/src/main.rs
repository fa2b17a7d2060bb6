//! `msae-coordinator`: thin binary over the msae-coordinator library.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    msae_coordinator::cli::main()
}
