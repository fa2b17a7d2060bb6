//! Process-level helpers shared by the binaries: shutdown signals, CPU accounting, and how a
//! binary ends (its error printed once per cause; a closed stdout is a normal end).

use std::io::Write;

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// User + system CPU seconds of this process, all threads (Unix; 0 elsewhere).
///
/// From the process CPU clock, in nanoseconds: /proc's counters move in 10 ms ticks, and a
/// short run (a 60-trial bench) can finish with its coordinator still at 0 ticks.
pub fn process_cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec for the call's duration.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    cpu_seconds_from("/proc/self/stat").unwrap_or(0.0)
}

/// CPU seconds (user + system) of process `pid` so far; None without /proc or the process.
pub fn cpu_seconds_of(pid: u32) -> Option<f64> {
    cpu_seconds_from(&format!("/proc/{pid}/stat"))
}

fn cpu_seconds_from(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13)?.iter().filter_map(|v| v.parse::<f64>().ok()).sum();
    Some(ticks / 100.0) // USER_HZ is 100 on every Linux we target.
}

/// A binary's exit: the error with its causes ([`error_chain`]) on stderr and a failure status,
/// or success. An error caused by a closed stdout (EPIPE: `msae-coordinator report | head`) is
/// a normal end: the reader has all it wanted, so the exit is silent and successful.
pub fn exit_code<E>(result: Result<(), E>) -> std::process::ExitCode
where
    // `AsRef`, not `Into<Box<dyn Error>>`: anyhow's conversion into a box hides the error's
    // type behind its own wrapper, and the EPIPE `io::Error` could no longer be recognised.
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    let Err(e) = result else { return std::process::ExitCode::SUCCESS };
    let e: &(dyn std::error::Error + 'static) = e.as_ref();
    if is_broken_pipe(e) {
        return std::process::ExitCode::SUCCESS;
    }
    // stderr may be closed too; nothing is left to tell then.
    let _ = writeln!(std::io::stderr(), "error: {}", error_chain(e));
    std::process::ExitCode::FAILURE
}

/// Writes `text` and a newline to stdout and flushes. Unlike `println!`, a closed stdout is an
/// error to return (and [`exit_code`] ends quietly on it), not a panic.
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// True when `e` or one of its causes is an EPIPE write error.
pub fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// `error: cause: cause` on one line, each cause once. An error whose message already ends
/// with its cause's (`cannot read {path}: {source}` that also returns `source`) does not get it
/// appended a second time.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut last = text.clone();
    let mut next = e.source();
    while let Some(cause) = next {
        let message = cause.to_string();
        if !message.is_empty() && !last.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        last = message;
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn process_cpu_seconds_sees_a_few_milliseconds_of_work() {
        let before = process_cpu_seconds();
        // A fixed amount of work (a few milliseconds of CPU), not of time: on a busy machine
        // this thread may wait for a core, and waiting is not CPU.
        let mut x = 1u64;
        for _ in 0..4_000_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let spent = process_cpu_seconds() - before;
        // Finer than /proc's 10 ms ticks, which would often read 0 here.
        assert!(spent > 0.0005, "{spent} s of CPU for the loop");
    }

    /// An error that, like many, puts its cause in its message and also returns it.
    #[derive(Debug, thiserror::Error)]
    #[error("{path}: cannot read: {source}")]
    struct Doubled {
        path: String,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading data")]
    struct Outer(#[source] Doubled);

    /// Item 12b: each cause once, however the errors spell it.
    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(21);
        let e = Outer(Doubled { path: "x.npy".into(), source: io });
        let text = error_chain(&e);
        assert_eq!(text, format!("loading data: x.npy: cannot read: {}", e.0.source));
        assert_eq!(text.matches("os error 21").count(), 1, "{text}");
    }

    /// Item 10: a closed stdout, however deep in the chain, ends the program successfully.
    #[test]
    fn broken_pipe_is_a_normal_end() {
        let pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(is_broken_pipe(&pipe));
        let wrapped = Outer(Doubled { path: "stdout".into(), source: pipe });
        assert!(is_broken_pipe(&wrapped));
        assert!(!is_broken_pipe(&std::io::Error::from(std::io::ErrorKind::NotFound)));
        let code = |c: std::process::ExitCode| format!("{c:?}");
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(wrapped);
        assert_eq!(code(exit_code(Err::<(), _>(boxed))), code(std::process::ExitCode::SUCCESS));
        let boom: Box<dyn std::error::Error + Send + Sync> = "boom".into();
        assert_eq!(code(exit_code(Err::<(), _>(boom))), code(std::process::ExitCode::FAILURE));
    }
}
