//! The `msae-worker` program, built inside the test crate so end-to-end tests can run it as a
//! real process.
fn main() -> std::process::ExitCode {
    msae_worker::cli::main()
}
