//! Live sweep progress on stderr: done / running / queued / failed and the best trial so far.
//!
//! On a terminal one status line is redrawn in place; otherwise (logs, CI) a line is printed
//! whenever the counts change, at most once every few seconds, so log files stay readable.

use crate::scheduler::Counts;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One status line for `counts`, e.g.
/// `[stripes] 12/36 done, 1 running, 23 queued, 0 failed; best fvu 0.0123 (trial 7)`.
/// Done counts the trials that ended without failing; those early termination stopped are
/// told apart, `12/36 done (5 pruned)`, in a sweep that has some. The best is a completed one.
pub fn status_line(counts: &Counts, metric: &str, elapsed: Duration) -> String {
    let pruned =
        if counts.pruned > 0 { format!(" ({} pruned)", counts.pruned) } else { String::new() };
    let mut line = format!(
        "[{}] {}/{} done{pruned}, {} running, {} queued, {} failed",
        counts.sweep,
        counts.completed + counts.pruned,
        counts.total,
        counts.running,
        counts.queued,
        counts.failed
    );
    if let Some(best) = counts.best {
        line.push_str(&format!("; best {metric} {:.6} (trial {})", best.value, best.index));
    }
    line.push_str(&format!("; {} workers; {}s", counts.workers, elapsed.as_secs()));
    line
}

/// The progress task.
pub struct ProgressDisplay;

impl ProgressDisplay {
    /// Draws until `stop` flips, then prints the final line.
    pub fn spawn(
        mut counts: watch::Receiver<Counts>,
        metric: String,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let started = Instant::now();
            let min_gap = if tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
            let mut last_printed = String::new();
            let mut last_time = Instant::now() - min_gap;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    changed = counts.changed() => if changed.is_err() { break },
                    _ = tick.tick() => {}
                }
                let c = counts.borrow().clone();
                let line = status_line(&c, &metric, started.elapsed());
                // Compare without the clock so an idle sweep does not print every tick.
                let key = line.rsplit_once(';').map(|(a, _)| a.to_string()).unwrap_or_default();
                if tty {
                    if last_time.elapsed() >= min_gap {
                        eprint!("\r\x1b[2K{line}");
                        let _ = std::io::stderr().flush();
                        last_time = Instant::now();
                    }
                } else if key != last_printed && last_time.elapsed() >= min_gap {
                    eprintln!("{line}");
                    last_printed = key;
                    last_time = Instant::now();
                }
            }
            let c = counts.borrow().clone();
            let line = status_line(&c, &metric, started.elapsed());
            if tty {
                eprintln!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Best;

    #[test]
    fn status_line_shows_counts_and_best() {
        let counts = Counts {
            sweep: "stripes".into(),
            total: 36,
            proposed: 36,
            queued: 23,
            running: 1,
            completed: 12,
            failed: 0,
            workers: 2,
            best: Some(Best { index: 7, value: 0.0123 }),
            ..Default::default()
        };
        let line = status_line(&counts, "fvu", Duration::from_secs(42));
        assert_eq!(
            line,
            "[stripes] 12/36 done, 1 running, 23 queued, 0 failed; best fvu 0.012300 (trial 7); 2 workers; 42s"
        );
        let pruned = Counts { completed: 7, pruned: 5, ..counts };
        assert_eq!(
            status_line(&pruned, "fvu", Duration::from_secs(42)),
            "[stripes] 12/36 done (5 pruned), 1 running, 23 queued, 0 failed; best fvu 0.012300 (trial 7); 2 workers; 42s"
        );
    }
}
