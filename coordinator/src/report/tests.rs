//! Tests of the ranked report: ranking, narrowing and each rendering.

use super::render::{fmt_duration, fmt_num};
use super::*;
use serde_json::json;

fn sweep(yaml: &str) -> SweepRecord {
    SweepRecord {
        name: "s".into(),
        yaml: yaml.into(),
        fingerprint: "0".into(),
        created_ms: 0,
        proposed: 0,
        finished: false,
        uid: None,
    }
}

fn trial(index: u64, status: TrialStatus, metrics: &[(&str, f64)]) -> TrialRecord {
    TrialRecord {
        sweep: "s".into(),
        index,
        params: [
            ("lr".to_string(), json!(0.001 * (index + 1) as f64)),
            ("mode".to_string(), json!("a,b")),
        ]
        .into_iter()
        .collect(),
        config: json!({}).into(),
        status,
        attempt: 1,
        lease: None,
        step: 0,
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        progress: BTreeMap::new(),
        curve: Vec::new(),
        errors: Vec::new(),
        worker: Some("w1".into()),
        artifact: None,
        weights: None,
        created_ms: 0,
        finished_ms: None,
        duration_s: Some(1.5),
    }
}

fn sample() -> Vec<TrialRecord> {
    let mut failed = trial(4, TrialStatus::Failed, &[]);
    failed.attempt = 3;
    failed.errors =
        vec!["lease expired".into(), "worker said: \"out of memory\"\nbacktrace".into()];
    vec![
        trial(0, TrialStatus::Completed, &[("fvu", 0.30), ("l0", 8.0)]),
        trial(1, TrialStatus::Completed, &[("fvu", 0.10), ("l0", 4.0)]),
        trial(2, TrialStatus::Completed, &[("l0", 2.0)]),
        trial(3, TrialStatus::Completed, &[("fvu", 0.20), ("mse", 0.01)]),
        failed,
        trial(5, TrialStatus::Running, &[]),
        trial(6, TrialStatus::Queued, &[]),
        trial(7, TrialStatus::Completed, &[("fvu", f64::NAN)]),
    ]
}

/// Ranking options with the table's columns.
fn opts(top: Option<usize>, metric: Option<&str>, goal: Option<Goal>) -> ReportOptions {
    ReportOptions { top, metric: metric.map(str::to_string), goal, columns: Columns::default() }
}

fn order(r: &Report) -> Vec<u64> {
    r.rows.iter().map(|r| r.trial).collect()
}

#[test]
fn an_unknown_rank_metric_is_refused_with_a_suggestion() {
    let trials = sample();
    let e = check_rank_metric("fuv", "fvu", &trials).unwrap_err();
    assert!(e.contains("unknown metric `fuv`; did you mean `fvu`?"), "{e}");
    check_rank_metric("foo", "foo", &trials).unwrap(); // the sweep's own (custom) metric
    check_rank_metric("mmcs", "fvu", &trials).unwrap();
    let mut custom = trials.clone();
    custom[0].metrics.insert("my_score".into(), 1.0);
    check_rank_metric("my_score", "fvu", &custom).unwrap();
}

/// The metric table drives the report: its `report` rows are the columns after the sweep
/// metric (in table order), and `--metric NAME` ranks in the row's goal.
#[test]
fn metric_table_drives_columns_and_override_goals() {
    let every: Vec<(&str, f64)> = metrics::STANDARD.iter().map(|m| (*m, 1.0)).collect();
    let trials = vec![trial(0, TrialStatus::Completed, &every)];
    let r =
        Report::build(&sweep(""), "my_score", Goal::Minimize, &trials, None, &Columns::default());
    let shown: Vec<&str> = metrics::TABLE.iter().filter(|m| m.report).map(|m| m.name).collect();
    // The ranking metric takes its place in the order like any other (a custom one after the
    // standard ones).
    let mut want: Vec<String> = shown.iter().map(|m| m.to_string()).collect();
    want.push("my_score".to_string());
    assert_eq!(r.metric_columns(), want);
    let keys: BTreeSet<&str> = r.rows[0].metrics.keys().map(String::as_str).collect();
    assert_eq!(keys, shown.into_iter().collect(), "no trial reported my_score");

    let yaml = "name: s\nmethod: grid\nmetric: {name: my_score, goal: maximize, custom: true}\n";
    for m in metrics::TABLE {
        let r = Report::for_sweep(&sweep(yaml), &trials, &opts(None, Some(m.name), None)).unwrap();
        assert_eq!((r.metric.as_str(), r.goal), (m.name, m.goal));
    }
}

#[test]
fn ranks_minimize_with_missing_and_nan_last() {
    let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), None, &Columns::default());
    assert_eq!(order(&r), vec![1, 3, 0, 2, 7]);
    assert_eq!(r.rows.iter().map(|r| r.rank).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(r.rows[0].metrics["fvu"], Some(0.10));
    assert_eq!(r.rows[0].metrics["l0"], Some(4.0));
    assert_eq!(r.rows[4].metrics["fvu"], None, "NaN kept as a non-finite value");
    assert!(!r.rows[3].metrics.contains_key("fvu"), "missing stays missing");
    assert_eq!(
        r.counts,
        Counts { total: 8, completed: 5, pruned: 0, failed: 1, running: 1, queued: 1 }
    );
    let table = r.render(ReportFormat::Table);
    assert!(
        table.contains(
            "note: trials 2, 7 reported no finite fvu; ranked after every trial that did"
        ),
        "{table}"
    );
}

#[test]
fn counts_of_an_unfinished_sweep_cover_its_planned_size() {
    // Regression: an interrupted 12-trial grid reported "8 trials ... 1 queued".
    let yaml =
        "name: s\nmethod: grid\nparameters:\n  seed: {values: [0,1,2,3,4,5,6,7,8,9,10,11]}\n";
    let r = Report::for_sweep(&sweep(yaml), &sample(), &opts(None, None, None)).unwrap();
    assert_eq!(
        r.counts,
        Counts { total: 12, completed: 5, pruned: 0, failed: 1, running: 1, queued: 5 }
    );
    let mut done = sweep(yaml);
    done.finished = true;
    let r = Report::for_sweep(&done, &sample(), &opts(None, None, None)).unwrap();
    assert_eq!(r.counts.total, 8, "a finished sweep is what it ran");
}

#[test]
fn ranks_maximize() {
    let r = Report::build(&sweep(""), "fvu", Goal::Maximize, &sample(), None, &Columns::default());
    assert_eq!(order(&r), vec![0, 3, 1, 2, 7]);
    let r = Report::build(&sweep(""), "l0", Goal::Maximize, &sample(), None, &Columns::default());
    assert_eq!(order(&r), vec![0, 1, 2, 3, 7]);
}

#[test]
fn top_n_keeps_the_best() {
    let r =
        Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), Some(2), &Columns::default());
    assert_eq!(order(&r), vec![1, 3]);
    assert_eq!(r.counts.completed, 5, "counts cover every trial");
    assert_eq!(r.failed.len(), 1);
}

#[test]
fn failed_listed_apart_with_reasons() {
    let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), None, &Columns::default());
    assert!(r.rows.iter().all(|row| row.status == TrialStatus::Completed));
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].trial, 4);
    assert_eq!(r.failed[0].attempts, 3);
    assert_eq!(r.failed[0].reasons.len(), 2);
    let table = r.render(ReportFormat::Table);
    assert!(table.contains("failed trials (1):"), "{table}");
    assert!(table.contains("worker said: \"out of memory\" (and 1 earlier)"), "{table}");
    assert!(!table.contains("backtrace"), "table keeps one line per reason");
}

#[test]
fn table_is_aligned() {
    let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), None, &Columns::default());
    let table = r.render(ReportFormat::Table);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("sweep s: 8 trials: 5 completed, 1 failed, 1 running, 1 queued"),
        "{table}"
    );
    let header = lines[1];
    assert!(header.starts_with("rank  trial"), "{table}");
    for col in ["fvu", "mse", "l0", "lr", "mode", "status", "attempts", "duration"] {
        assert!(header.contains(col), "{col} in {header}");
    }
    // Right-aligned numeric column: every row ends the fvu column at the same offset.
    let end = header.find("fvu").unwrap() + 3;
    for row in &lines[2..7] {
        let cell = row[..end].rsplit(' ').next().unwrap();
        assert!(!cell.is_empty(), "fvu column misaligned in {row:?}\n{table}");
    }
    assert!(
        lines[2].contains("0.1") && lines[2].contains("a,b") && lines[2].contains("1.5s"),
        "{table}"
    );
    assert!(lines[6].contains("nan"), "{table}");
}

#[test]
fn csv_quotes_per_rfc4180() {
    let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), None, &Columns::default());
    let csv = r.render(ReportFormat::Csv);
    let records: Vec<&str> = csv.split("\r\n").collect();
    assert_eq!(
        records[0],
        "rank,trial,lr,mode,fvu,mse,l0,status,attempts,worker,duration_s,files,error"
    );
    assert_eq!(records[1], "1,1,0.002,\"a,b\",0.1,,4,completed,1,w1,1.5,,");
    // The failed trial: quotes doubled, the newline kept inside the quoted field.
    let failed =
        csv.split("\r\n").find(|l| l.starts_with(",4,0.005,\"a,b\",,,,failed,3,w1,,")).unwrap();
    assert!(
        failed.ends_with("\"lease expired\nworker said: \"\"out of memory\"\"\nbacktrace\""),
        "{failed}"
    );
    assert!(csv.contains("NaN"));
}

#[test]
fn json_round_trips() {
    let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), None, &Columns::default());
    let text = r.render(ReportFormat::Json);
    let back: Report = serde_json::from_str(&text).unwrap();
    assert_eq!(back, r);
}

#[test]
fn for_sweep_uses_the_spec_metric_and_goal() {
    let yaml = "name: s\nmethod: grid\nmetric: {name: l0, goal: maximize}\n";
    let r = Report::for_sweep(&sweep(yaml), &sample(), &opts(None, None, None)).unwrap();
    assert_eq!((r.metric.as_str(), r.goal), ("l0", Goal::Maximize));
    assert_eq!(order(&r)[0], 0);
    // Another metric ranks in its natural direction, unless a goal is given.
    let r = Report::for_sweep(&sweep(yaml), &sample(), &opts(None, Some("fvu"), None)).unwrap();
    assert_eq!((r.metric.as_str(), r.goal), ("fvu", Goal::Minimize));
    let r = Report::for_sweep(&sweep(yaml), &sample(), &opts(None, Some("mmcs"), None)).unwrap();
    assert_eq!((r.metric.as_str(), r.goal), ("mmcs", Goal::Maximize));
    let r =
        Report::for_sweep(&sweep(yaml), &sample(), &opts(None, Some("fvu"), Some(Goal::Maximize)))
            .unwrap();
    assert_eq!((r.metric.as_str(), r.goal), ("fvu", Goal::Maximize));
    // A stored YAML that no longer validates still gives its metric block.
    let stale = "name: s\nmethod: grid\nmetric: {name: mse, goal: maximize}\nparameters:\n  old_field: {values: [1]}\n";
    let r = Report::for_sweep(&sweep(stale), &sample(), &opts(None, None, None)).unwrap();
    assert_eq!((r.metric.as_str(), r.goal), ("mse", Goal::Maximize));
}

#[test]
fn pruned_trials_rank_below_every_completed_one_and_say_so() {
    let mut trials = sample();
    // Pruned at better values than any completed trial: still ranked after them all.
    trials.push(trial(8, TrialStatus::Pruned, &[("fvu", 0.05)]));
    trials.push(trial(9, TrialStatus::Pruned, &[("fvu", 0.01)]));
    trials.push(trial(10, TrialStatus::Pruned, &[]));
    let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &trials, None, &Columns::default());
    assert_eq!(order(&r), vec![1, 3, 0, 2, 7, 9, 8, 10]);
    assert_eq!((r.counts.completed, r.counts.pruned, r.counts.total), (5, 3, 11));
    assert_eq!(r.rows[5].status, TrialStatus::Pruned);
    let table = r.render(ReportFormat::Table);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("sweep s: 11 trials: 5 completed, 3 pruned, 1 failed, 1 running"),
        "{table}"
    );
    assert!(lines[7].contains("pruned") && lines[7].contains("0.01"), "{table}");
    assert!(table.contains("note: pruned trials were stopped early"), "{table}");
    let csv = r.render(ReportFormat::Csv);
    assert!(csv.contains("\r\n6,9,0.01,\"a,b\",0.01,,,pruned,1,w1,1.5,"), "{csv}");
    let back: Report = serde_json::from_str(&r.render(ReportFormat::Json)).unwrap();
    assert_eq!(back, r);
    // A report written before pruning existed (no `pruned` count) still reads.
    let old = r#"{"total":1,"completed":1,"failed":0,"running":0,"queued":0}"#;
    let counts: Counts = serde_json::from_str(old).unwrap();
    assert_eq!(counts.pruned, 0);
    // Top N: pruned trials only fill what completed ones leave.
    let top =
        Report::build(&sweep(""), "fvu", Goal::Minimize, &trials, Some(6), &Columns::default());
    assert_eq!(order(&top), vec![1, 3, 0, 2, 7, 9]);
}

#[test]
fn number_formatting() {
    assert_eq!(fmt_num(0.1), "0.1");
    assert_eq!(fmt_num(0.123456789), "0.123457");
    assert_eq!(fmt_num(12.0), "12");
    assert_eq!(fmt_num(0.00012), "1.2e-4");
    assert_eq!(fmt_num(1234567.0), "1.2346e6");
    assert_eq!(fmt_duration(75.0), "1m15s");
}

#[test]
fn repeats_rank_points_by_their_mean_with_the_spread() {
    let yaml = "name: s\nmethod: grid\nrepeats: 2\nparameters:\n  lr: {values: [0.001, 0.002]}\n";
    let with_seed = |index: u64, status: TrialStatus, metrics: &[(&str, f64)]| {
        let mut t = trial(index, status, metrics);
        let lr = [0.001, 0.002][(index / 2) as usize];
        t.params = [("lr".to_string(), json!(lr)), ("seed".to_string(), json!(index % 2))]
            .into_iter()
            .collect();
        t
    };
    let trials = [
        with_seed(0, TrialStatus::Completed, &[("fvu", 0.2)]),
        with_seed(1, TrialStatus::Completed, &[("fvu", 0.4)]),
        with_seed(2, TrialStatus::Completed, &[("fvu", 0.1)]),
        with_seed(3, TrialStatus::Failed, &[]),
    ];
    let r = Report::for_sweep(&sweep(yaml), &trials, &opts(None, None, None)).unwrap();
    assert_eq!(r.points.len(), 2);
    // Point 1 has the better mean (0.1) but a failed repeat: it ranks after point 0.
    let (best, second) = (&r.points[0], &r.points[1]);
    assert_eq!((best.rank, best.point, best.n, best.missing), (1, 0, 2, 0));
    assert_eq!((best.min, best.max), (Some(0.2), Some(0.4)));
    assert!((best.mean.unwrap() - 0.3).abs() < 1e-12);
    assert!((best.std.unwrap() - 0.02f64.sqrt()).abs() < 1e-12);
    assert_eq!((second.point, second.n, second.missing, second.mean), (1, 1, 1, Some(0.1)));
    assert_eq!((second.std, second.trials.clone()), (None, vec![2]));
    assert!(!best.params.contains_key("seed"), "the repeats' seed is not a parameter");
    let text = r.render(ReportFormat::Table);
    assert!(text.contains("points ranked by mean fvu (minimize) over their repeats"), "{text}");
    assert!(text.contains("0,1"), "{text}");
    // Without repeats there are no points, and the JSON has no points key.
    let plain =
        Report::for_sweep(&sweep("name: s\nmethod: grid\n"), &trials, &opts(None, None, None))
            .unwrap();
    assert!(plain.points.is_empty());
    assert!(!plain.render(ReportFormat::Json).contains("\"points\""));
}

#[test]
fn pareto_frontier_and_l0_band_of_a_hand_made_set() {
    // (fvu, l0): 0 (0.10, 20) 1 (0.20, 10) 2 (0.15, 15) 3 (0.30, 12) dominated by 1,
    // 4 (0.12, 25) dominated by 0, 5 (0.40, 5), 6 (0.20, 10) ties 1.
    let data = [
        (0.10, 20.0),
        (0.20, 10.0),
        (0.15, 15.0),
        (0.30, 12.0),
        (0.12, 25.0),
        (0.40, 5.0),
        (0.20, 10.0),
    ];
    let trials: Vec<TrialRecord> = data
        .iter()
        .enumerate()
        .map(|(i, (f, l))| trial(i as u64, TrialStatus::Completed, &[("fvu", *f), ("l0", *l)]))
        .collect();
    let base =
        Report::for_sweep(&sweep("name: s\nmethod: grid\n"), &trials, &opts(None, None, None))
            .unwrap();
    let mut p = base.clone();
    p.pareto("fvu", "l0").unwrap();
    let order: Vec<u64> = p.rows.iter().map(|r| r.trial).collect();
    assert_eq!(order, [5, 1, 6, 2, 0], "sorted by l0; 3 and 4 are dominated");
    assert_eq!(p.rows.iter().map(|r| r.rank).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert!(
        p.render(ReportFormat::Table).contains("Pareto frontier of fvu (lower is better) and l0")
    );
    let mut band = base.clone();
    band.within(L0, 10.0, 15.0).unwrap();
    let order: Vec<u64> = band.rows.iter().map(|r| r.trial).collect();
    assert_eq!(order, [2, 1, 6, 3], "l0 in [10, 15], ranked by fvu");
    assert!(band.render(ReportFormat::Table).contains("only trials with l0 in [10, 15]"));
    let e = base.clone().pareto("fvu", "nonsense").unwrap_err();
    assert!(e.contains("no ranked trial reports `nonsense`"), "{e}");
}

/// Trials whose configs nest, whose metrics run past the key ones, and whose bookkeeping
/// differs: trial 0 (two attempts on gpu-3, 75 s), trial 1 (one on w1), trial 2 failed.
fn configured() -> Vec<TrialRecord> {
    let metrics: &[(&str, f64)] = &[
        ("zeta", 1.0),
        ("steps", 100.0),
        ("fvu", 0.2),
        ("stripe_usage/class_0/stripe_1", 0.5),
        ("l0", 8.0),
        ("mmcs", 0.9),
    ];
    let mut trials: Vec<TrialRecord> = (0..3)
        .map(|i| {
            let mut t = trial(i, TrialStatus::Completed, metrics);
            t.config = json!({
                "lr": t.params["lr"],
                "mode": "a,b",
                "steps": 100,
                "layers": [1, 2],
                "data": {"source": "synthetic", "synthetic": {"input_dim": 64, "clusters": 8}}
            })
            .into();
            t
        })
        .collect();
    trials[0].metrics.insert("fvu".into(), 0.1);
    trials[0].attempt = 2;
    trials[0].worker = Some("gpu-3".into());
    trials[0].duration_s = Some(75.0);
    trials[0].weights =
        Some(crate::weights::StoredWeights { dir: "s/0".into(), files: Default::default() });
    trials[2].status = TrialStatus::Failed;
    trials[2].metrics.clear();
    trials[2].errors = vec!["boom".into()];
    trials[2].worker = None;
    trials
}

fn with_columns(trials: &[TrialRecord], metrics: MetricColumns, config: ConfigColumns) -> Report {
    let options =
        ReportOptions { columns: Columns { metrics, config }, ..ReportOptions::default() };
    Report::for_sweep(&sweep("name: s\nmethod: grid\n"), trials, &options).unwrap()
}

/// Issue 10: the columns and their order: swept parameters, metrics in the metric table's
/// order then others alphabetically, status, attempts, worker, duration, then every other
/// setting of the config under its dotted path.
#[test]
fn full_config_and_every_metric_in_a_stable_order() {
    let r = with_columns(&configured(), MetricColumns::All, ConfigColumns::Full);
    let csv = r.render(ReportFormat::Csv);
    let lines: Vec<&str> = csv.split("\r\n").collect();
    assert_eq!(
        lines[0],
        "rank,trial,lr,mode,fvu,l0,mmcs,steps,stripe_usage/class_0/stripe_1,zeta,status,\
         attempts,worker,duration_s,files,config.data.source,config.data.synthetic.clusters,\
         config.data.synthetic.input_dim,config.layers,config.steps,error"
    );
    assert_eq!(
        lines[1],
        "1,0,0.001,\"a,b\",0.1,8,0.9,100,0.5,1,completed,2,gpu-3,75,s/0,synthetic,8,64,\"[1,2]\",100,"
    );
    assert_eq!(
        lines[2],
        "2,1,0.002,\"a,b\",0.2,8,0.9,100,0.5,1,completed,1,w1,1.5,,synthetic,8,64,\"[1,2]\",100,"
    );
    assert_eq!(lines[3], ",2,0.003,\"a,b\",,,,,,,failed,1,,,,synthetic,8,64,\"[1,2]\",100,boom");
    // The table: the same order, readable values.
    let table = r.render(ReportFormat::Table);
    let header = table.lines().nth(1).unwrap();
    let names: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(names[..4], ["rank", "trial", "lr", "mode"]);
    assert_eq!(names[10..15], ["status", "attempts", "worker", "duration", "files"]);
    assert_eq!(names.last(), Some(&"config.steps"));
    let first: Vec<&str> = table.lines().nth(2).unwrap().split_whitespace().collect();
    assert_eq!(
        first[10..],
        ["completed", "2", "gpu-3", "1m15s", "s/0", "synthetic", "8", "64", "[1,2]", "100"]
    );
    assert!(
        table.contains("    2         1  -       boom"),
        "failed rows name their worker: {table}"
    );
    // The JSON keeps each row's whole config, nested, and reads back.
    let json = r.render(ReportFormat::Json);
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
    assert_eq!(back.rows[0].config.as_ref().unwrap()["data"]["synthetic"]["input_dim"], 64);
}

/// `--metrics`: the key set by default in the table, a pick (in column order, with the ranking
/// metric), and a typo refused with a suggestion; `--config swept` reads no config.
#[test]
fn metric_picks_and_the_key_set() {
    let trials = configured();
    let header = |r: &Report| r.render(ReportFormat::Csv).split("\r\n").next().unwrap().to_string();
    let key = with_columns(&trials, MetricColumns::Key, ConfigColumns::Swept);
    assert_eq!(
        header(&key),
        "rank,trial,lr,mode,fvu,l0,mmcs,status,attempts,worker,duration_s,files,error"
    );
    let pick = MetricColumns::parse("zeta, l0,zeta").unwrap();
    assert_eq!(pick, MetricColumns::Pick(vec!["zeta".into(), "l0".into()]));
    let picked = with_columns(&trials, pick.clone(), ConfigColumns::Swept);
    assert_eq!(
        header(&picked),
        "rank,trial,lr,mode,fvu,l0,zeta,status,attempts,worker,duration_s,files,error"
    );
    assert!(picked.rows.iter().all(|r| r.config.is_none()));
    // Narrowing first, then the pick: the same rows as picking at once.
    let mut all = with_columns(&trials, MetricColumns::All, ConfigColumns::Swept);
    all.keep_metrics(&pick);
    assert_eq!(all, picked);
    let options = ReportOptions {
        columns: Columns { metrics: MetricColumns::parse("l00").unwrap(), ..Columns::default() },
        ..ReportOptions::default()
    };
    let e = Report::for_sweep(&sweep("name: s\nmethod: grid\n"), &trials, &options).unwrap_err();
    assert!(e.contains("unknown metric `l00`; did you mean `l0`?"), "{e}");
    let e = MetricColumns::parse("fvu,,l0").unwrap_err();
    assert!(e.contains("fvu,,l0"), "{e}");
    assert_eq!(MetricColumns::parse(&MetricColumns::All.name()), Ok(MetricColumns::All));
    // The formats' defaults.
    let csv = Columns::for_format(ReportFormat::Csv, None, None);
    assert_eq!((csv.metrics, csv.config), (MetricColumns::All, ConfigColumns::Full));
    assert_eq!(Columns::for_format(ReportFormat::Table, None, None), Columns::default());
}

/// A swept parameter and a metric of one name (sweeping `steps`) get distinct headers.
#[test]
fn a_metric_named_like_a_parameter_is_told_apart() {
    let mut trials = configured();
    for t in &mut trials {
        t.params.insert("steps".into(), json!(100));
    }
    let r = with_columns(&trials, MetricColumns::All, ConfigColumns::Full);
    let csv = r.render(ReportFormat::Csv);
    let header: Vec<&str> = csv.split("\r\n").next().unwrap().split(',').collect();
    let unique: BTreeSet<&str> = header.iter().copied().collect();
    assert_eq!(unique.len(), header.len(), "{header:?}");
    assert_eq!(header[2..5], ["lr", "mode", "steps"]);
    assert!(header.contains(&"metric.steps"));
    assert!(!header.contains(&"config.steps"), "the swept setting is not repeated");
}

#[test]
fn configs_flatten_into_dotted_paths() {
    let flat = columns::flatten(&json!({"a": {"b": {"c": 1}, "d": []}, "e": null, "f": {}}));
    let keys: Vec<&str> = flat.keys().map(String::as_str).collect();
    assert_eq!(keys, ["a.b.c", "a.d", "e", "f"]);
    assert!(columns::flatten(&Value::Null).is_empty());
}
