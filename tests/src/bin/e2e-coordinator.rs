//! The `msae-coordinator` program, built inside the test crate so end-to-end tests can run it
//! as a real process (cargo only exposes a package's own binaries to its tests).
fn main() -> std::process::ExitCode {
    msae_coordinator::cli::main()
}
