//! Tracing setup shared by the binaries: concise logs on stderr, `RUST_LOG` to change the level.

/// Install a stderr subscriber with an `EnvFilter` (default `info`). Safe to call twice.
pub fn init() {
    init_with_default("info");
}

/// [`init`] with another default level (benchmarks print tables and want only warnings).
pub fn init_with_default(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
