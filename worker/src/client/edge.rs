//! The worker's protocol edge. A `proto::Lease` becomes a [`LeasedTrial`] (or a [`BadLease`],
//! which is still answered, as a failed trial) the moment it arrives, and a [`TrialResult`]
//! becomes a `CompleteRequest` only when it is sent: the loop in between never reads a
//! generated type's strings or sentinel zeros. Evaluations and progress reports are built here
//! too ([`evaluation`], [`progress_request`]).

use crate::runner::Progress;
use msae_shared::class_stats::ClassStats;
use msae_shared::proto::{self, CompleteRequest, Lease, ProgressRequest};
use msae_shared::upload::TrialFiles;
use msae_shared::{RunnerKind, TrialConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Which lease a report is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LeaseRef {
    pub(super) lease_id: String,
    /// `{sweep}/{index}`; also names the trial's artifact directory.
    pub(super) trial_id: String,
    pub(super) attempt: u32,
}

/// A lease this worker can run.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LeasedTrial {
    pub(super) lease: LeaseRef,
    pub(super) runner: RunnerKind,
    /// Parsed and validated.
    pub(super) config: TrialConfig,
    /// For the noop runner: how long the trial pretends to work.
    pub(super) noop_sleep: Duration,
    /// How long the lease lives without a report; None when the coordinator did not say.
    pub(super) ttl: Option<Duration>,
    /// Wall-clock limit of the trial on this worker.
    pub(super) timeout: Option<Duration>,
    /// The coordinator wants the trial's files before its result, each at most this many
    /// bytes.
    pub(super) upload_limit: Option<u64>,
}

/// A lease that cannot run; `reason` goes back as the trial's error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub(super) struct BadLease {
    pub(super) lease: LeaseRef,
    pub(super) reason: String,
}

/// A lease as it arrived: runnable, or refused.
pub(super) type Received = Result<LeasedTrial, BadLease>;

/// The lease a received one names, runnable or not.
pub(super) fn lease_of(received: &Received) -> &LeaseRef {
    match received {
        Ok(trial) => &trial.lease,
        Err(bad) => &bad.lease,
    }
}

impl TryFrom<Lease> for LeasedTrial {
    type Error = BadLease;

    /// Checks the runner kind first, then the config, so the reason names the first problem.
    fn try_from(l: Lease) -> Result<Self, BadLease> {
        let lease = LeaseRef { lease_id: l.lease_id, trial_id: l.trial_id, attempt: l.attempt };
        let refuse = |reason: String| BadLease { lease: lease.clone(), reason };
        // The field's protocol default: a coordinator that does not set it means real training.
        let runner = match l.runner.as_str() {
            "" => RunnerKind::Sae,
            name => RunnerKind::try_from(name).map_err(|e| refuse(e.to_string()))?,
        };
        let config: TrialConfig = serde_json::from_str(&l.config_json).map_err(|e| {
            refuse(format!(
                "trial {}: config_json is not a valid trial config: {e}",
                lease.trial_id
            ))
        })?;
        config
            .validate()
            .map_err(|e| refuse(format!("trial {}: invalid trial config: {e}", lease.trial_id)))?;
        Ok(LeasedTrial {
            runner,
            config,
            noop_sleep: Duration::from_millis(l.noop_sleep_ms.into()),
            ttl: (l.ttl_ms > 0).then(|| Duration::from_millis(l.ttl_ms.into())),
            // Zero, negative and NaN mean no limit; so does one too long for a Duration, which
            // no trial could reach anyway.
            timeout: (l.timeout_s > 0.0)
                .then(|| Duration::try_from_secs_f64(l.timeout_s).ok())
                .flatten(),
            upload_limit: l.upload.then_some(l.upload_limit),
            lease,
        })
    }
}

/// How a trial ended.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Verdict {
    /// Ran to its end.
    Completed,
    /// Stopped on request (early stopping, a lost lease) with the metrics so far: reported as
    /// a success, and the coordinator decides what a stopped trial counts as.
    Stopped,
    /// Stopped because the coordinator's early termination pruned it, with the metrics so
    /// far: reported as a success marked pruned (the trial ends as pruned).
    Pruned,
    /// `permanent`: retrying cannot help (a diverged run, a config or data error).
    Failed { error: String, permanent: bool },
}

/// What a trial produced, to be reported.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TrialResult {
    pub(super) verdict: Verdict,
    pub(super) metrics: BTreeMap<String, f64>,
    /// The final evaluation's per-class statistics.
    pub(super) class_stats: Option<ClassStats>,
    /// Directory holding the weights and the resolved config, when one was written.
    pub(super) artifact: Option<PathBuf>,
    /// The files of a run that reached its end, to upload when the lease asks.
    pub(super) files: Option<Arc<TrialFiles>>,
    pub(super) final_step: u64,
    pub(super) duration: Duration,
}

impl TrialResult {
    /// A failure without metrics.
    pub(super) fn failed(error: String, permanent: bool, duration: Duration) -> Self {
        TrialResult {
            verdict: Verdict::Failed { error, permanent },
            metrics: BTreeMap::new(),
            class_stats: None,
            artifact: None,
            files: None,
            final_step: 0,
            duration,
        }
    }

    pub(super) fn success(&self) -> bool {
        !matches!(self.verdict, Verdict::Failed { .. })
    }

    pub(super) fn error(&self) -> &str {
        match &self.verdict {
            Verdict::Failed { error, .. } => error,
            Verdict::Completed | Verdict::Stopped | Verdict::Pruned => "",
        }
    }
}

/// The lease request a result carries along, so one round trip both reports and leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NextLease {
    pub(super) worker_id: String,
    pub(super) wait_ms: u32,
}

/// The one place a result becomes a `CompleteRequest`.
pub(super) fn complete_request(
    lease: &LeaseRef,
    result: &TrialResult,
    next: Option<&NextLease>,
) -> CompleteRequest {
    let (success, error, permanent) = match &result.verdict {
        Verdict::Completed | Verdict::Stopped | Verdict::Pruned => (true, String::new(), false),
        Verdict::Failed { error, permanent } => (false, error.clone(), *permanent),
    };
    CompleteRequest {
        lease_id: lease.lease_id.clone(),
        success,
        metrics: result.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        error,
        artifact: result.artifact.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        duration_s: result.duration.as_secs_f64(),
        final_step: result.final_step,
        permanent,
        lease_next: next.is_some(),
        worker_id: next.map(|n| n.worker_id.clone()).unwrap_or_default(),
        wait_ms: next.map_or(0, |n| n.wait_ms),
        pruned: result.verdict == Verdict::Pruned,
        class_stats: result.class_stats.as_ref().map(class_stats_message),
    }
}

/// Per-class statistics as the protocol carries them.
fn class_stats_message(c: &ClassStats) -> proto::ClassStats {
    // `MAX_CELLS` keeps both counts far below u32::MAX.
    proto::ClassStats {
        num_stripes: c.num_stripes() as u32,
        num_classes: c.num_classes() as u32,
        class_samples: c.class_samples().to_vec(),
        stripe_class_active: c.active_counts().to_vec(),
        routing_score_mean: c.routing_scores().map(<[f64]>::to_vec).unwrap_or_default(),
        class_mse: c.class_mse().to_vec(),
    }
}

/// An evaluation's progress report as the protocol carries it.
pub(super) fn evaluation(p: &Progress) -> proto::Evaluation {
    proto::Evaluation {
        step: p.step,
        scalars: p.scalars.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        class_stats: p.class_stats.as_ref().map(class_stats_message),
    }
}

/// Most bytes of per-class statistics one progress report carries. Evaluations pile up while
/// the coordinator is away; with their statistics all aboard, the report that finally goes out
/// could pass the 4 MB message limit and be refused for ever, and the lease with it.
pub(super) const CLASS_STATS_BUDGET: usize = 2 << 20;

/// A progress report: the latest sample and every pending evaluation. Per-class statistics
/// beyond [`CLASS_STATS_BUDGET`] are left out, oldest first (their scalars still go): the most
/// recent are the ones worth plotting.
pub(super) fn progress_request(
    lease_id: &str,
    step: u64,
    scalars: BTreeMap<String, f64>,
    mut evaluations: Vec<proto::Evaluation>,
) -> ProgressRequest {
    let mut used = 0usize;
    let mut left_out = 0usize;
    for e in evaluations.iter_mut().rev() {
        if let Some(c) = &e.class_stats {
            used = used.saturating_add(prost::Message::encoded_len(c));
            if used > CLASS_STATS_BUDGET {
                e.class_stats = None;
                left_out += 1;
            }
        }
    }
    if left_out > 0 {
        tracing::warn!(
            left_out,
            evaluations = evaluations.len(),
            "too many evaluations waiting: the oldest go without their per-class statistics"
        );
    }
    ProgressRequest {
        lease_id: lease_id.to_string(),
        step,
        scalars: scalars.into_iter().collect(),
        evaluations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(runner: &str, config_json: String) -> Lease {
        Lease {
            lease_id: "l1".into(),
            trial_id: "sweep/3".into(),
            sweep: "sweep".into(),
            attempt: 2,
            config_json,
            ttl_ms: 900,
            timeout_s: 1.5,
            runner: runner.into(),
            noop_sleep_ms: 40,
            upload: false,
            upload_limit: 0,
        }
    }

    fn valid_json() -> String {
        serde_json::to_string(&TrialConfig { steps: 7, ..TrialConfig::default() }).unwrap()
    }

    fn lease_ref() -> LeaseRef {
        LeaseRef { lease_id: "l1".into(), trial_id: "sweep/3".into(), attempt: 2 }
    }

    #[test]
    fn a_good_lease_becomes_a_leased_trial() {
        let trial = LeasedTrial::try_from(lease("noop", valid_json())).unwrap();
        assert_eq!(trial.lease, lease_ref());
        assert_eq!(trial.runner, RunnerKind::Noop);
        assert_eq!(trial.config, TrialConfig { steps: 7, ..TrialConfig::default() });
        assert_eq!(trial.noop_sleep, Duration::from_millis(40));
        assert_eq!(trial.ttl, Some(Duration::from_millis(900)));
        assert_eq!(trial.timeout, Some(Duration::from_millis(1500)));
        let sae = LeasedTrial::try_from(lease("sae", valid_json())).unwrap();
        assert_eq!(sae.runner, RunnerKind::Sae);
    }

    #[test]
    fn an_unset_runner_kind_means_sae_and_unset_limits_mean_none() {
        let mut l = lease("", valid_json());
        l.ttl_ms = 0;
        l.timeout_s = 0.0;
        let trial = LeasedTrial::try_from(l).unwrap();
        assert_eq!(trial.runner, RunnerKind::Sae);
        assert_eq!((trial.ttl, trial.timeout), (None, None));
        for timeout_s in [-1.0, f64::NAN, f64::INFINITY, 1e300] {
            let mut l = lease("sae", valid_json());
            l.timeout_s = timeout_s;
            assert_eq!(LeasedTrial::try_from(l).unwrap().timeout, None, "{timeout_s}");
        }
    }

    #[test]
    fn an_unknown_runner_kind_is_refused_by_name() {
        let bad = LeasedTrial::try_from(lease("quantum", valid_json())).unwrap_err();
        assert_eq!(bad.lease, lease_ref(), "the refusal still names the lease to report");
        assert_eq!(bad.reason, r#"unknown trial runner kind "quantum" (expected "sae" or "noop")"#);
        assert_eq!(bad.to_string(), bad.reason);
        // The kind is checked before the config.
        let both = LeasedTrial::try_from(lease("Sae", "{".into())).unwrap_err();
        assert!(both.reason.contains("\"Sae\""), "{}", both.reason);
    }

    #[test]
    fn a_bad_config_is_refused_with_the_trial_and_the_reason() {
        let bad = LeasedTrial::try_from(lease("sae", "{not json".into())).unwrap_err();
        assert_eq!(bad.lease, lease_ref());
        assert!(
            bad.reason.starts_with("trial sweep/3: config_json is not a valid trial config: "),
            "{}",
            bad.reason
        );
        let unknown_key = LeasedTrial::try_from(lease("sae", r#"{"lrr": 1.0}"#.into()));
        assert!(unknown_key.unwrap_err().reason.contains("not a valid trial config"));
        let invalid = LeasedTrial::try_from(lease("noop", r#"{"lr": -1.0}"#.into())).unwrap_err();
        assert!(
            invalid.reason.starts_with("trial sweep/3: invalid trial config: ")
                && invalid.reason.contains("lr"),
            "{}",
            invalid.reason
        );
    }

    fn result(verdict: Verdict) -> TrialResult {
        TrialResult {
            verdict,
            metrics: [("fvu".to_string(), 0.25), ("steps".to_string(), 7.0)].into(),
            class_stats: None,
            artifact: Some(PathBuf::from("/out/sweep/3")),
            files: None,
            final_step: 7,
            duration: Duration::from_millis(1250),
        }
    }

    #[test]
    fn a_completed_result_is_a_success_with_everything() {
        let r = complete_request(&lease_ref(), &result(Verdict::Completed), None);
        let expected = CompleteRequest {
            lease_id: "l1".into(),
            success: true,
            metrics: [("fvu".to_string(), 0.25), ("steps".to_string(), 7.0)].into(),
            error: String::new(),
            artifact: "/out/sweep/3".into(),
            duration_s: 1.25,
            final_step: 7,
            permanent: false,
            lease_next: false,
            worker_id: String::new(),
            wait_ms: 0,
            pruned: false,
            class_stats: None,
        };
        assert_eq!(r, expected);
    }

    /// Two stripes, three classes (class 1 without samples), routing scores given.
    fn class_stats() -> ClassStats {
        ClassStats::new(
            2,
            3,
            vec![4, 0, 2],
            vec![1, 0, 2, 4, 0, 0],
            Some(vec![0.5, 0.0, -1.0, 2.0, 0.0, 0.25]),
            vec![0.125, 0.0, 0.5],
        )
        .unwrap()
    }

    #[test]
    fn class_statistics_travel_row_major_with_the_evaluation_and_the_result() {
        let p = Progress {
            step: 40,
            scalars: [("val_loss".to_string(), 0.5)].into(),
            class_stats: Some(class_stats()),
            kind: crate::runner::ProgressKind::Evaluation,
            ..Progress::default()
        };
        let e = evaluation(&p);
        assert_eq!((e.step, e.scalars["val_loss"]), (40, 0.5));
        let want = proto::ClassStats {
            num_stripes: 2,
            num_classes: 3,
            class_samples: vec![4, 0, 2],
            stripe_class_active: vec![1, 0, 2, 4, 0, 0],
            routing_score_mean: vec![0.5, 0.0, -1.0, 2.0, 0.0, 0.25],
            class_mse: vec![0.125, 0.0, 0.5],
        };
        assert_eq!(e.class_stats.as_ref(), Some(&want));
        let done = TrialResult { class_stats: Some(class_stats()), ..result(Verdict::Completed) };
        assert_eq!(complete_request(&lease_ref(), &done, None).class_stats, Some(want));
        let plain = Progress { class_stats: None, ..p };
        assert_eq!(evaluation(&plain).class_stats, None);
    }

    #[test]
    fn a_report_keeps_the_newest_class_statistics_within_its_budget() {
        let one = evaluation(&Progress { class_stats: Some(class_stats()), ..Progress::default() });
        let size = prost::Message::encoded_len(one.class_stats.as_ref().unwrap());
        let fit = CLASS_STATS_BUDGET / size;
        let pending: Vec<proto::Evaluation> =
            (0..fit as u64 + 3).map(|step| proto::Evaluation { step, ..one.clone() }).collect();
        let r = progress_request("l1", 9, BTreeMap::new(), pending);
        assert_eq!(r.evaluations.len(), fit + 3, "every evaluation goes, scalars and all");
        let with: Vec<u64> =
            r.evaluations.iter().filter(|e| e.class_stats.is_some()).map(|e| e.step).collect();
        assert_eq!(with, (3..fit as u64 + 3).collect::<Vec<_>>(), "the oldest lose them");
        assert!(r.evaluations.iter().all(|e| e.scalars == one.scalars));
        let few = progress_request("l1", 9, BTreeMap::new(), vec![one.clone(), one]);
        assert!(few.evaluations.iter().all(|e| e.class_stats.is_some()));
    }

    #[test]
    fn a_pruned_result_is_a_success_marked_pruned_with_the_metrics_so_far() {
        let pruned = result(Verdict::Pruned);
        assert!(pruned.success() && pruned.error().is_empty());
        let r = complete_request(&lease_ref(), &pruned, None);
        assert!(r.success && r.pruned && !r.permanent && r.error.is_empty());
        assert_eq!((r.final_step, r.metrics["fvu"]), (7, 0.25));
        assert!(!complete_request(&lease_ref(), &result(Verdict::Stopped), None).pruned);
    }

    #[test]
    fn a_stopped_result_is_a_success_with_the_metrics_so_far() {
        let stopped = result(Verdict::Stopped);
        assert!(stopped.success() && stopped.error().is_empty());
        let r = complete_request(&lease_ref(), &stopped, None);
        assert!(r.success && r.error.is_empty() && !r.permanent);
        assert_eq!((r.final_step, r.metrics["fvu"]), (7, 0.25));
    }

    #[test]
    fn a_failed_result_carries_its_error_and_permanence() {
        let failed = result(Verdict::Failed { error: "diverged".into(), permanent: true });
        assert!(!failed.success());
        assert_eq!(failed.error(), "diverged");
        let r = complete_request(&lease_ref(), &failed, None);
        assert!(!r.success && r.permanent);
        assert_eq!(r.error, "diverged");
        assert_eq!(r.metrics.len(), 2, "metrics reached before the failure still go out");
        let bare = TrialResult::failed("boom".into(), false, Duration::from_millis(10));
        let r = complete_request(&lease_ref(), &bare, None);
        assert!(!r.success && !r.permanent && r.metrics.is_empty() && r.artifact.is_empty());
        assert_eq!((r.error.as_str(), r.final_step, r.duration_s), ("boom", 0, 0.01));
    }

    #[test]
    fn the_next_lease_request_rides_along_only_when_asked_for() {
        let next = NextLease { worker_id: "w7".into(), wait_ms: 50 };
        let r = complete_request(&lease_ref(), &result(Verdict::Completed), Some(&next));
        assert!(r.lease_next);
        assert_eq!((r.worker_id.as_str(), r.wait_ms), ("w7", 50));
    }
}
