//! Tracing setup shared by the binaries: concise logs on stderr, `RUST_LOG` to change the level.

use std::io::{IsTerminal, Write};

/// Install a stderr subscriber with an `EnvFilter` (default `info`). Safe to call twice.
pub fn init() {
    init_with_default("info");
}

/// [`init`] with another default level (benchmarks print tables and want only warnings).
pub fn init_with_default(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let tty = std::io::stderr().is_terminal();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(tty).with_target(false);
    let _ = if tty {
        builder.with_writer(|| LineClearingStderr { cleared: false }).try_init()
    } else {
        builder.with_writer(std::io::stderr).try_init()
    };
}

/// On a terminal, a log line first erases the line it lands on: a live status line redrawn
/// with `\r` (the coordinator's progress) would otherwise be glued to the log's start.
struct LineClearingStderr {
    cleared: bool,
}

impl Write for LineClearingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if !self.cleared {
            err.write_all(b"\r\x1b[2K")?;
            self.cleared = true;
        }
        err.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
