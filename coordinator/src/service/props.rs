//! Property tests of hostile input: the sweep YAML parser, the trial config, the RPC edge's
//! conversions, and a live server fed junk around a stored result. None may panic; every
//! refusal is `invalid_argument` (or the documented status); a stored result stays as it was.

use super::*;
use crate::spec::SweepSpec;
use msae_shared::TrialConfig;
use proptest::prelude::*;

const SWEEP: &str = "name: p\nmethod: grid\nmetric: {name: fvu, goal: minimize}\n\
    base: {steps: 100}\nparameters:\n  lr: {values: [0.001, 0.01]}\n  layer_k: {min: 2, max: 8}\n";

/// Text that is often almost valid: a valid sweep with a span replaced by junk, or junk alone.
fn yamlish() -> impl Strategy<Value = String> {
    let junk = prop_oneof![
        "\\PC{0,40}",
        Just("{".to_string()),
        Just(": :".to_string()),
        Just("\t".to_string()),
        Just("- [".to_string()),
        Just("1e999".to_string()),
        Just("-0".to_string()),
        Just("&a *a".to_string()),
        Just("\u{0}".to_string()),
    ];
    prop_oneof![
        junk.clone(),
        (0..SWEEP.len(), 0..20usize, junk).prop_map(|(at, len, junk)| {
            let at = (0..=at).rev().find(|i| SWEEP.is_char_boundary(*i)).unwrap_or(0);
            let end = (at + len).min(SWEEP.len());
            let end =
                (end..=SWEEP.len()).find(|i| SWEEP.is_char_boundary(*i)).unwrap_or(SWEEP.len());
            format!("{}{junk}{}", &SWEEP[..at], &SWEEP[end..])
        }),
    ]
}

/// Any string, with a bias to control characters and very long ones.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,12}",
        "[\\x00-\\x1f]{1,4}",
        Just(String::new()),
        Just("x".repeat(MAX_ID_LEN + 1)),
        Just("trial\nforged log line".to_string()),
    ]
}

fn hostile_number() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        Just(f64::MAX),
        Just(f64::MIN_POSITIVE),
    ]
}

fn metrics() -> impl Strategy<Value = HashMap<String, f64>> {
    proptest::collection::hash_map(hostile_text(), hostile_number(), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_sweep_parser_never_panics_and_locates_its_errors(text in yamlish()) {
        if let Err(e) = SweepSpec::parse(&text, "p.yaml") {
            let shown = e.to_string();
            prop_assert!(shown.starts_with("p.yaml"), "{shown}");
        }
    }

    #[test]
    fn trial_configs_never_panic(text in yamlish(), lr in hostile_number(), k in any::<usize>()) {
        let _ = TrialConfig::from_yaml(&text);
        let cfg = TrialConfig { lr, layer_k: k, ..TrialConfig::default() };
        if let Err(e) = cfg.validate() {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn completions_are_refused_as_invalid_or_keep_only_finite_metrics(
        lease in hostile_text(),
        worker in hostile_text(),
        error in hostile_text(),
        duration in hostile_number(),
        metrics in metrics(),
        success in any::<bool>(),
        lease_next in any::<bool>(),
        wait_ms in any::<u32>(),
    ) {
        let r = proto::CompleteRequest {
            lease_id: lease,
            success,
            metrics,
            error,
            duration_s: duration,
            lease_next,
            worker_id: worker,
            wait_ms,
            ..Default::default()
        };
        match Completion::try_from(r) {
            Ok(c) => {
                prop_assert!(c.outcome.metrics.values().all(|v| v.is_finite()));
                prop_assert!(c.next.is_none_or(|n| n.wait <= MAX_WAIT));
                prop_assert!(!c.lease_id.chars().any(char::is_control));
            }
            Err(s) => prop_assert_eq!(s.code(), tonic::Code::InvalidArgument),
        }
    }

    #[test]
    fn progress_reports_are_refused_as_invalid_or_keep_only_finite_scalars(
        lease in hostile_text(),
        scalars in metrics(),
        evals in proptest::collection::vec((any::<u64>(), metrics()), 0..4),
        step in any::<u64>(),
    ) {
        let r = proto::ProgressRequest {
            lease_id: lease,
            step,
            scalars,
            evaluations: evals
                .into_iter()
                .map(|(step, scalars)| proto::Evaluation { step, scalars, ..Default::default() })
                .collect(),
        };
        match ProgressUpdate::try_from(r) {
            Ok(p) => {
                prop_assert!(p.report.scalars.values().all(|v| v.is_finite()));
                prop_assert!(p.report.evaluations.windows(2).all(|w| w[0].step <= w[1].step));
            }
            Err(s) => prop_assert_eq!(s.code(), tonic::Code::InvalidArgument),
        }
    }

    #[test]
    fn report_requests_are_refused_as_invalid_or_understood(
        sweep in hostile_text(),
        metric in hostile_text(),
        goal in hostile_text(),
        format in hostile_text(),
        top in proptest::option::of(any::<u64>()),
    ) {
        let r = proto::ReportRequest { sweep, metric, goal, format, top, ..Default::default() };
        if let Err(s) = ReportQuery::try_from(r) {
            prop_assert_eq!(s.code(), tonic::Code::InvalidArgument);
        }
    }
}
