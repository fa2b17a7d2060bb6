//! One trial: the runner works on a blocking thread while this task forwards its progress
//! (which renews the lease), sends heartbeats, and watches the time limit and shutdown. An
//! instant trial ([`TrialRunner::instant`]) runs on this task instead.

use super::delivery::Evaluations;
use super::edge::{LeaseRef, LeasedTrial, TrialResult, Verdict};
use super::stop::{StopCause, StopFlag};
use super::worker::Worker;
use crate::noop::NoopRunner;
use crate::runner::{Control, Progress, ProgressKind, RunOptions, TrialOutcome, TrialRunner};
use msae_shared::RunnerKind;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How a lease ended on this worker.
pub(super) enum Finished {
    /// Report this to the coordinator.
    Report(TrialResult),
    /// Hand the lease back (shutdown).
    Release(String),
}

impl Worker {
    fn runner_for(&self, trial: &LeasedTrial) -> Arc<dyn TrialRunner> {
        match trial.runner {
            RunnerKind::Sae => self.sae.clone(),
            RunnerKind::Noop => Arc::new(NoopRunner::new(trial.noop_sleep)),
        }
    }

    /// Where a trial's artifacts go: `{out_dir}/{sweep}/{index}`, path components sanitised.
    fn trial_out_dir(&self, lease: &LeaseRef) -> Option<PathBuf> {
        let mut dir = self.opts.out_dir.clone()?;
        for part in lease.trial_id.split('/') {
            let clean: String = part
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }
                })
                .collect();
            dir.push(if clean.is_empty() || clean.chars().all(|c| c == '.') {
                "_".to_string()
            } else {
                clean
            });
        }
        Some(dir)
    }

    /// Runs the trial on a blocking thread while this task reports progress and heartbeats.
    pub(super) async fn run_trial(&self, trial: &LeasedTrial, started: Instant) -> Finished {
        let lease = &trial.lease;
        let runner = self.runner_for(trial);
        let config = trial.config.clone();
        let stop = StopFlag::default();
        let (progress_tx, mut progress_rx) = watch::channel::<Option<Progress>>(None);
        // Samples are superseded by the next one (a watch); evaluations are queued so that
        // every one reaches the coordinator, at its own step.
        let evaluations = Evaluations::default();
        let callback_evaluations = evaluations.clone();
        let timeout = trial.timeout.unwrap_or_default();
        // A limit past the end of time is no limit.
        let deadline = trial.timeout.and_then(|t| started.checked_add(t));
        let options = RunOptions {
            gpu: self.opts.gpu,
            out_dir: self.trial_out_dir(lease),
            files: trial.upload_limit.is_some(),
        };

        let callback_stop = stop.clone();
        let instant = runner.instant(&config, &options);
        let work = move || {
            let mut callback = |progress: &Progress| -> Control {
                if progress.kind == ProgressKind::Evaluation {
                    callback_evaluations.push(progress);
                }
                progress_tx.send_replace(Some(progress.clone()));
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    callback_stop.set(StopCause::Timeout(timeout));
                }
                match callback_stop.get() {
                    Some(cause) => Control::Stop(cause.to_string()),
                    None => Control::Continue,
                }
            };
            runner.run(&config, &options, &mut callback)
        };
        let mut handle: Running = if instant {
            // Caught like a blocking thread's panic: a runner's bug fails its trial, not the
            // worker.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .map_err(|panic| panic_text(panic.as_ref()));
            Box::pin(std::future::ready(ran))
        } else {
            let thread = tokio::task::spawn_blocking(work);
            Box::pin(async move { thread.await.map_err(|e| e.to_string()) })
        };

        // Heartbeat at ttl/3 so a lease survives two lost reports; 10 s if the coordinator
        // gave no ttl.
        let heartbeat = match trial.ttl {
            Some(ttl) => (ttl / 3).max(Duration::from_millis(10)),
            None => Duration::from_secs(10),
        };
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Counted from the start, so a trial shorter than the interval sends no sample at all:
        // its result follows at once, and a sample would cost a round trip (and a wait for the
        // coordinator's next commit) on the way to it.
        let mut last_sent = started;
        let mut progress_open = true;
        let mut shutdown = self.shutdown.clone();
        let mut grace_until: Option<Instant> = None;

        let joined = loop {
            tokio::select! {
                joined = &mut handle => break Some(joined),
                changed = progress_rx.changed(), if progress_open => {
                    if changed.is_err() {
                        progress_open = false; // the runner returned; `handle` resolves next
                        continue;
                    }
                    // Samples at most every `progress_min_interval`; an evaluation at once
                    // (the coordinator's early termination judges it: a late verdict is
                    // training spent on a trial already lost).
                    if last_sent.elapsed() >= self.opts.progress_min_interval
                        || !evaluations.is_empty()
                    {
                        let latest = progress_rx.borrow_and_update().clone();
                        self.send_progress(lease, latest, &evaluations, &stop).await;
                        last_sent = Instant::now();
                    }
                }
                _ = ticker.tick() => {
                    let latest = progress_rx.borrow_and_update().clone();
                    self.send_progress(lease, latest, &evaluations, &stop).await;
                    last_sent = Instant::now();
                }
                () = sleep_until_opt(deadline), if stop.get().is_none() => {
                    tracing::warn!(trial = %lease.trial_id, timeout_s = timeout.as_secs_f64(),
                        "trial timed out; stopping it");
                    stop.set(StopCause::Timeout(timeout));
                }
                () = shutdown.wait(), if grace_until.is_none() => {
                    stop.set(StopCause::Shutdown);
                    grace_until = Some(Instant::now() + self.opts.stop_grace);
                }
                () = sleep_until_opt(grace_until) => {
                    tracing::warn!(trial = %lease.trial_id, grace = ?self.opts.stop_grace,
                        "the trial did not stop in time; handing its lease back anyway");
                    break None;
                }
            }
        };
        let duration = started.elapsed();
        let cause = stop.get();
        let Some(joined) = joined else {
            return Finished::Release(StopCause::Shutdown.to_string());
        };
        // Shutdown hands the lease back, unless the trial ran to its end anyway: then the
        // result is worth delivering.
        let ran_to_end = matches!(&joined, Ok(Ok(outcome)) if outcome.stopped.is_none());
        if let Some(c @ (StopCause::Shutdown | StopCause::Release(_))) = &cause
            && !ran_to_end
        {
            return Finished::Release(c.to_string());
        }
        // Evaluations made since the last report go out before the result.
        if !evaluations.is_empty() {
            self.send_progress(lease, None, &evaluations, &stop).await;
        }
        Finished::Report(result_of(joined, cause.as_ref(), duration))
    }
}

/// A runner at work: its outcome, or why it panicked.
type Running = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<anyhow::Result<TrialOutcome>, String>> + Send>,
>;

/// A panic's message, when it carried one.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned());
    message.unwrap_or_else(|| "a panic without a message".into())
}

/// The result of a runner that returned (or panicked). A local timeout that cut the run short
/// is a failure (with the metrics reached); a prune that cut it short is a pruned result; any
/// other stop (coordinator early stopping, lost lease) is reported with the metrics so far, and
/// the coordinator decides what it counts as. A run that ended before the stop took effect is
/// completed, whatever the stop was.
fn result_of(
    joined: Result<anyhow::Result<TrialOutcome>, String>,
    cause: Option<&StopCause>,
    duration: Duration,
) -> TrialResult {
    let outcome = match joined {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) => {
            let permanent = crate::train::is_permanent(&error);
            return TrialResult::failed(format!("{error:#}"), permanent, duration);
        }
        Err(panic) => {
            return TrialResult::failed(format!("trial runner panicked: {panic}"), false, duration);
        }
    };
    let verdict = match cause {
        // A timeout that struck after the last step did not cut anything short.
        Some(cause @ StopCause::Timeout(_)) if outcome.stopped.is_some() => {
            Verdict::Failed { error: cause.to_string(), permanent: false }
        }
        Some(StopCause::Pruned(_)) if outcome.stopped.is_some() => Verdict::Pruned,
        _ if outcome.stopped.is_some() => Verdict::Stopped,
        _ => Verdict::Completed,
    };
    TrialResult {
        verdict,
        final_step: outcome
            .metrics
            .get(msae_shared::metrics::STEPS)
            .map_or(0, |s| s.max(0.0) as u64),
        metrics: outcome.metrics,
        class_stats: outcome.class_stats,
        artifact: outcome.artifact,
        files: outcome.files.map(std::sync::Arc::new),
        duration,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_millis(500);

    fn outcome(stopped: Option<&str>) -> TrialOutcome {
        TrialOutcome {
            metrics: [("steps".to_string(), 40.0), ("fvu".to_string(), 0.5)].into(),
            class_stats: None,
            artifact: Some(PathBuf::from("/out/t")),
            files: None,
            stopped: stopped.map(str::to_string),
        }
    }

    #[test]
    fn a_run_to_its_end_is_completed_with_its_final_step() {
        let r = result_of(Ok(Ok(outcome(None))), None, D);
        assert_eq!(r.verdict, Verdict::Completed);
        assert_eq!((r.final_step, r.duration), (40, D));
        assert_eq!(r.artifact, Some(PathBuf::from("/out/t")));
        assert_eq!(r.metrics["fvu"], 0.5);
    }

    #[test]
    fn a_run_stopped_on_request_is_stopped_with_the_metrics_so_far() {
        let coordinator = StopCause::Coordinator("early stop".into());
        let r = result_of(Ok(Ok(outcome(Some("early stop")))), Some(&coordinator), D);
        assert_eq!(r.verdict, Verdict::Stopped);
        assert_eq!(r.final_step, 40);
        let lost = StopCause::LeaseLost("gone".into());
        assert_eq!(result_of(Ok(Ok(outcome(Some("x")))), Some(&lost), D).verdict, Verdict::Stopped);
    }

    #[test]
    fn a_prune_that_cut_the_run_short_is_pruned_with_the_metrics_so_far() {
        let prune = StopCause::Pruned("asha".into());
        let r = result_of(Ok(Ok(outcome(Some("pruned")))), Some(&prune), D);
        assert_eq!(r.verdict, Verdict::Pruned);
        assert_eq!((r.final_step, r.metrics["fvu"]), (40, 0.5));
        // Told after its last step: the finished run is a completed one.
        let late = result_of(Ok(Ok(outcome(None))), Some(&prune), D);
        assert_eq!(late.verdict, Verdict::Completed);
    }

    #[test]
    fn a_timeout_fails_the_trial_only_when_it_cut_the_run_short() {
        let timeout = StopCause::Timeout(Duration::from_millis(200));
        let cut = result_of(Ok(Ok(outcome(Some("timeout")))), Some(&timeout), D);
        assert_eq!(
            cut.verdict,
            Verdict::Failed {
                error: "trial exceeded its timeout of 0.2 s".into(),
                permanent: false
            }
        );
        assert_eq!(cut.final_step, 40, "the metrics reached are kept");
        let late = result_of(Ok(Ok(outcome(None))), Some(&timeout), D);
        assert_eq!(late.verdict, Verdict::Completed);
    }

    #[test]
    fn negative_or_missing_steps_give_final_step_zero() {
        let mut o = outcome(None);
        o.metrics.insert("steps".into(), -3.0);
        assert_eq!(result_of(Ok(Ok(o)), None, D).final_step, 0);
        let mut o = outcome(None);
        o.metrics.remove("steps");
        assert_eq!(result_of(Ok(Ok(o)), None, D).final_step, 0);
    }

    #[test]
    fn a_runner_error_fails_the_trial_permanently_only_when_retrying_cannot_help() {
        let r = result_of(Ok(Err(anyhow::anyhow!("disk full").context("saving"))), None, D);
        assert_eq!(
            r.verdict,
            Verdict::Failed { error: "saving: disk full".into(), permanent: false }
        );
        assert!(r.metrics.is_empty() && r.final_step == 0);
        let invalid: msae_shared::TrialConfig = serde_json::from_str(r#"{"lr": -1.0}"#).unwrap();
        let config = crate::train::TrainError::Config(invalid.validate().unwrap_err());
        let r = result_of(Ok(Err(config.into())), None, D);
        assert!(matches!(r.verdict, Verdict::Failed { permanent: true, .. }), "{r:?}");
    }

    #[test]
    fn a_runner_panic_fails_the_trial() {
        let r = result_of(Err("boom".into()), None, D);
        assert!(
            matches!(&r.verdict, Verdict::Failed { error, permanent: false }
                if error.starts_with("trial runner panicked")),
            "{r:?}"
        );
    }
}
