//! The ranked report of a sweep: completed trials ordered by the sweep metric, then the trials
//! early termination pruned (ranked the same way, below every completed one: their metrics are
//! from before the end of training), failed trials apart with their reasons, and how many are
//! still queued or running.
//!
//! Built from stored records only, so it works on a database file as well as on a snapshot sent
//! by a running coordinator. Rendered as an aligned table for people, RFC 4180 CSV for
//! spreadsheets and dataframes (one row per trial, failed ones included with their error), or
//! pretty JSON that deserializes back into [`Report`].

use crate::model::{Goal, SweepRecord, TrialRecord, TrialStatus};
use crate::spec::{MetricSpec, SweepSpec};
use msae_shared::metrics;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// How many trials are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// The sweep's planned size while it runs (the trials stored once it is finished).
    pub total: usize,
    pub completed: usize,
    /// Stopped early by the sweep's early termination rule.
    #[serde(default)]
    pub pruned: usize,
    pub failed: usize,
    pub running: usize,
    /// Not started yet, whether the search has proposed them or not.
    pub queued: usize,
}

impl Counts {
    /// Counts of an unfinished sweep of `planned` trials: those not proposed yet are queued.
    pub fn plan(&mut self, planned: u64) {
        self.total = self.total.max(planned as usize);
        self.queued =
            self.total.saturating_sub(self.completed + self.pruned + self.failed + self.running);
    }
}

/// One completed or pruned trial, ranked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportRow {
    /// 1-based rank by the sweep metric: completed trials first (those without a finite value
    /// last among them), then pruned ones the same way.
    pub rank: usize,
    /// Trial index within the sweep.
    pub trial: u64,
    pub params: BTreeMap<String, Value>,
    /// The sweep metric and the key metrics the trial reported; `None` for a reported value
    /// that is not finite (NaN or infinite, e.g. a diverged run).
    pub metrics: BTreeMap<String, Option<f64>>,
    pub status: TrialStatus,
    pub attempts: u32,
    pub duration_s: Option<f64>,
    pub worker: Option<String>,
}

/// One failed trial with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedRow {
    pub trial: u64,
    pub params: BTreeMap<String, Value>,
    pub attempts: u32,
    /// The reason of each failed attempt, oldest first.
    pub reasons: Vec<String>,
    pub worker: Option<String>,
}

/// The ranked results of one sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub sweep: String,
    pub metric: String,
    pub goal: Goal,
    pub rows: Vec<ReportRow>,
    pub failed: Vec<FailedRow>,
    pub counts: Counts,
    /// With `repeats: N`: each parameter point, ranked by the mean of its repeats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub points: Vec<PointRow>,
    /// How the rows were narrowed (`--l0-band`, `--pareto`), said under the table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The L0 metric's name (`--l0-band`).
pub const L0: &str = metrics::L0;

/// One parameter point of a sweep with `repeats`, over its completed repeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointRow {
    /// 1-based rank by `mean`; points without a finite value rank last.
    pub rank: usize,
    /// The point's index in the search (its trials are `point * repeats ..`).
    pub point: u64,
    /// The parameters without the repeats' `seed`.
    pub params: BTreeMap<String, Value>,
    /// Completed repeats with a finite value of the metric.
    pub n: usize,
    /// Repeats without one (failed, pruned, still running or not run): such a point ranks
    /// after every point whose repeats all completed.
    pub missing: u64,
    pub mean: Option<f64>,
    /// Sample standard deviation (None below two values).
    pub std: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// The completed repeats' trial indexes.
    pub trials: Vec<u64>,
}

/// The points of a sweep with `repeats` (its completed trials grouped by point), ranked.
fn rank_points(trials: &[TrialRecord], metric: &str, goal: Goal, repeats: u64) -> Vec<PointRow> {
    let mut by_point: BTreeMap<u64, PointRow> = BTreeMap::new();
    let mut values: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for t in trials.iter().filter(|t| t.status == TrialStatus::Completed) {
        let point = t.index / repeats;
        let row = by_point.entry(point).or_insert_with(|| {
            let mut params = t.params.clone();
            params.remove(crate::search::repeat::SEED);
            PointRow {
                rank: 0,
                point,
                params,
                n: 0,
                missing: 0,
                mean: None,
                std: None,
                min: None,
                max: None,
                trials: Vec::new(),
            }
        });
        row.trials.push(t.index);
        if let Some(v) = t.metrics.get(metric).copied().filter(|v| v.is_finite()) {
            values.entry(point).or_default().push(v);
        }
    }
    let mut rows: Vec<PointRow> = by_point
        .into_values()
        .map(|mut row| {
            let vs = values.remove(&row.point).unwrap_or_default();
            let n = vs.len();
            row.n = n;
            row.missing = repeats.saturating_sub(n as u64);
            if n > 0 {
                let mean = vs.iter().sum::<f64>() / n as f64;
                row.mean = Some(mean);
                row.min = vs.iter().copied().reduce(f64::min);
                row.max = vs.iter().copied().reduce(f64::max);
                if n > 1 {
                    let var = vs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
                    row.std = Some(var.sqrt());
                }
            }
            row
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.missing > 0)
            .cmp(&(b.missing > 0))
            .then(compare(a.mean, b.mean, goal))
            .then(a.point.cmp(&b.point))
    });
    for (i, r) in rows.iter_mut().enumerate() {
        r.rank = i + 1;
    }
    rows
}

/// Output format of `msae-coordinator report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReportFormat {
    /// An aligned table.
    #[default]
    Table,
    /// RFC 4180 CSV, one row per trial (failed ones too).
    Csv,
    /// Pretty-printed JSON of the whole report.
    Json,
}

impl ReportFormat {
    /// The format's name, as the CLI and the Report RPC spell it.
    pub fn name(self) -> &'static str {
        match self {
            ReportFormat::Table => "table",
            ReportFormat::Csv => "csv",
            ReportFormat::Json => "json",
        }
    }

    /// The format named `name`, if any.
    pub fn from_name(name: &str) -> Option<ReportFormat> {
        [ReportFormat::Table, ReportFormat::Csv, ReportFormat::Json]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// The sweep a report is about: the one named, or else the most recently created. The error
/// says which sweeps there are.
pub fn pick_sweep<'a>(
    sweeps: &'a [SweepRecord],
    name: Option<&str>,
) -> Result<&'a SweepRecord, String> {
    match name {
        Some(name) => sweeps.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = sweeps.iter().map(|s| s.name.as_str()).collect();
            if names.is_empty() {
                format!("no sweep named {name:?} (there are no sweeps yet)")
            } else {
                format!("no sweep named {name:?} (sweeps: {})", names.join(", "))
            }
        }),
        None => sweeps.iter().max_by_key(|s| s.created_ms).ok_or_else(|| "no sweeps yet".into()),
    }
}

impl Report {
    /// Rank the completed `trials` of `sweep` by `metric` towards `goal`, then the pruned ones;
    /// keep the best `top`.
    pub fn build(
        sweep: &SweepRecord,
        metric: &str,
        goal: Goal,
        trials: &[TrialRecord],
        top: Option<usize>,
    ) -> Report {
        let mut counts = Counts { total: trials.len(), ..Counts::default() };
        let mut completed: Vec<&TrialRecord> = Vec::new();
        let mut failed = Vec::new();
        for t in trials {
            match t.status {
                TrialStatus::Completed => {
                    counts.completed += 1;
                    completed.push(t);
                }
                TrialStatus::Pruned => {
                    counts.pruned += 1;
                    completed.push(t);
                }
                TrialStatus::Failed => {
                    counts.failed += 1;
                    failed.push(FailedRow {
                        trial: t.index,
                        params: t.params.clone(),
                        attempts: t.attempt,
                        reasons: t.errors.clone(),
                        worker: t.worker.clone(),
                    });
                }
                TrialStatus::Running => counts.running += 1,
                TrialStatus::Queued => counts.queued += 1,
            }
        }
        let value = |t: &TrialRecord| t.metrics.get(metric).copied().filter(|v| v.is_finite());
        // Each trial's value looked up once, not at every comparison: on 100,000 trials the
        // map lookups were most of the sort's time.
        let mut keyed: Vec<(Option<f64>, &TrialRecord)> =
            completed.into_iter().map(|t| (value(t), t)).collect();
        let pruned = |t: &TrialRecord| t.status == TrialStatus::Pruned;
        keyed.sort_by(|(x, a), (y, b)| {
            pruned(a).cmp(&pruned(b)).then(compare(*x, *y, goal)).then(a.index.cmp(&b.index))
        });
        let mut completed: Vec<&TrialRecord> = keyed.into_iter().map(|(_, t)| t).collect();
        if let Some(n) = top {
            completed.truncate(n);
        }
        let rows = completed
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let metrics = std::iter::once(metric)
                    .chain(metrics::in_report())
                    .filter_map(|m| {
                        t.metrics
                            .get(m)
                            .map(|v| (m.to_string(), Some(*v).filter(|v| v.is_finite())))
                    })
                    .collect();
                ReportRow {
                    rank: i + 1,
                    trial: t.index,
                    params: t.params.clone(),
                    metrics,
                    status: t.status,
                    attempts: t.attempt,
                    duration_s: t.duration_s,
                    worker: t.worker.clone(),
                }
            })
            .collect();
        failed.sort_by_key(|f| f.trial);
        Report {
            sweep: sweep.name.clone(),
            metric: metric.to_string(),
            goal,
            rows,
            failed,
            counts,
            points: Vec::new(),
            note: None,
        }
    }

    /// [`Report::build`] with the metric and goal of the sweep's own YAML. `metric_override`
    /// ranks by another metric, in that metric's natural direction
    /// ([`metrics::natural_goal`]) unless `goal_override` says otherwise. A stored YAML that no
    /// longer validates (the trial config changed since) still yields its `metric:` block when
    /// it can be read at all. An override that is no known metric is refused
    /// ([`check_rank_metric`]).
    pub fn for_sweep(
        sweep: &SweepRecord,
        trials: &[TrialRecord],
        top: Option<usize>,
        metric_override: Option<&str>,
        goal_override: Option<Goal>,
    ) -> Result<Report, String> {
        let (spec_metric, spec_planned, repeats) = match SweepSpec::parse(&sweep.yaml, &sweep.name)
        {
            Ok(spec) => (spec.metric.clone(), spec.planned_trials(), spec.repeats),
            Err(e) => {
                tracing::warn!(sweep = %sweep.name, "stored sweep YAML does not validate any more ({e}); reading its metric block only");
                (metric_block(&sweep.yaml).unwrap_or_default(), None, 1)
            }
        };
        if let Some(m) = metric_override {
            check_rank_metric(m, &spec_metric.name, trials)?;
        }
        let metric = metric_override.unwrap_or(&spec_metric.name);
        // Another metric than the sweep's ranks in its own natural direction.
        let goal = goal_override.unwrap_or(if metric == spec_metric.name {
            spec_metric.goal
        } else {
            metrics::natural_goal(metric)
        });
        let mut report = Report::build(sweep, metric, goal, trials, top);
        if repeats > 1 {
            report.points = rank_points(trials, metric, goal, repeats);
            if let Some(n) = top {
                report.points.truncate(n);
            }
        }
        if !sweep.finished
            && let Some(planned) = spec_planned
        {
            report.counts.plan(planned);
        }
        Ok(report)
    }

    /// Keeps the ranked rows whose `metric` lies in [lo, hi] (rows without it go), ranked again;
    /// refuses a metric no row reports.
    pub fn within(&mut self, metric: &str, lo: f64, hi: f64) -> Result<(), String> {
        self.require(metric)?;
        self.rows
            .retain(|r| matches!(r.metrics.get(metric), Some(Some(v)) if (lo..=hi).contains(v)));
        self.rerank();
        self.note = Some(format!("only trials with {metric} in [{lo}, {hi}]"));
        Ok(())
    }

    /// Keeps the Pareto frontier of metrics `x` and `y`, each in its natural direction: the rows
    /// no other row beats on both (ties are not beaten), sorted by `y` then `x`.
    pub fn pareto(&mut self, x: &str, y: &str) -> Result<(), String> {
        self.require(x)?;
        self.require(y)?;
        let orient = |m: &str, v: f64| match metrics::natural_goal(m) {
            Goal::Minimize => v,
            Goal::Maximize => -v,
        };
        let mut points: Vec<(f64, f64, ReportRow)> = self
            .rows
            .drain(..)
            .filter_map(|r| {
                let (Some(Some(a)), Some(Some(b))) = (r.metrics.get(x), r.metrics.get(y)) else {
                    return None;
                };
                Some((orient(x, *a), orient(y, *b), r))
            })
            .collect();
        // Sorted by y, then x: a row is on the frontier when its x beats every earlier row's.
        points.sort_by(|a, b| {
            a.1.total_cmp(&b.1).then(a.0.total_cmp(&b.0)).then(a.2.trial.cmp(&b.2.trial))
        });
        let mut best_x = f64::INFINITY;
        let mut last: Option<(f64, f64)> = None;
        for (px, py, row) in points {
            let tie = last == Some((px, py));
            if px < best_x || tie {
                best_x = best_x.min(px);
                last = Some((px, py));
                self.rows.push(row);
            }
        }
        self.rerank();
        let arrow =
            |m: &str| if metrics::natural_goal(m) == Goal::Minimize { "lower" } else { "higher" };
        self.note = Some(format!(
            "Pareto frontier of {x} ({} is better) and {y} ({} is better), sorted by {y}",
            arrow(x),
            arrow(y)
        ));
        Ok(())
    }

    fn require(&self, metric: &str) -> Result<(), String> {
        if self.rows.iter().any(|r| r.metrics.contains_key(metric)) || self.rows.is_empty() {
            return Ok(());
        }
        let known: BTreeSet<&str> =
            self.rows.iter().flat_map(|r| r.metrics.keys().map(String::as_str)).collect();
        Err(format!(
            "no ranked trial reports `{metric}`; the report's metrics are {}",
            known.into_iter().collect::<Vec<_>>().join(", ")
        ))
    }

    fn rerank(&mut self) {
        for (i, r) in self.rows.iter_mut().enumerate() {
            r.rank = i + 1;
        }
    }

    /// The report as text in `format`.
    pub fn render(&self, format: ReportFormat) -> String {
        match format {
            ReportFormat::Table => self.table(),
            ReportFormat::Csv => self.csv(),
            ReportFormat::Json => {
                let mut s = serde_json::to_string_pretty(self).expect("a report serializes");
                s.push('\n');
                s
            }
        }
    }

    /// Metric columns: the sweep metric first, then the key metrics any row has.
    fn metric_columns(&self) -> Vec<String> {
        let present: BTreeSet<&str> =
            self.rows.iter().flat_map(|r| r.metrics.keys().map(String::as_str)).collect();
        std::iter::once(self.metric.as_str())
            .chain(metrics::in_report().filter(|m| *m != self.metric && present.contains(m)))
            .map(str::to_string)
            .collect()
    }

    fn param_columns(&self) -> Vec<String> {
        let names: BTreeSet<&String> = self
            .rows
            .iter()
            .flat_map(|r| r.params.keys())
            .chain(self.failed.iter().flat_map(|f| f.params.keys()))
            .collect();
        names.into_iter().cloned().collect()
    }

    fn table(&self) -> String {
        let goal = self.goal.name();
        let c = &self.counts;
        // Pruned trials are only mentioned in sweeps that have some.
        let pruned = if c.pruned > 0 { format!(", {} pruned", c.pruned) } else { String::new() };
        let mut out = format!(
            "sweep {}: {} trials: {} completed{pruned}, {} failed, {} running, {} queued; ranked by {} ({goal})\n",
            self.sweep, c.total, c.completed, c.failed, c.running, c.queued, self.metric
        );
        if let Some(note) = &self.note {
            let _ = writeln!(out, "{note}:");
        }
        let metric_cols = self.metric_columns();
        let param_cols = self.param_columns();
        if self.rows.is_empty() {
            // Rows can only be missing for want of completed trials: `top` is at least 1.
            out.push_str("no completed trials yet\n");
        } else {
            let mut header: Vec<String> = vec!["rank".into(), "trial".into()];
            header.extend(metric_cols.iter().cloned());
            header.extend(param_cols.iter().cloned());
            header.extend(["status", "attempts", "duration"].map(String::from));
            // Numbers right-aligned; parameters are right-aligned only if every value is a number.
            let mut right = vec![true; 2 + metric_cols.len()];
            right.extend(
                param_cols.iter().map(|p| {
                    self.rows.iter().all(|r| r.params.get(p).is_none_or(Value::is_number))
                }),
            );
            right.extend([false, true, true]);
            let mut body = Cells::new(header.len(), self.rows.len());
            for r in &self.rows {
                body.push(r.rank);
                body.push(r.trial);
                for m in &metric_cols {
                    match r.metrics.get(m) {
                        Some(Some(v)) => body.push(fmt_num(*v)),
                        Some(None) => body.push("nan"),
                        None => body.push("-"),
                    }
                }
                for p in &param_cols {
                    match r.params.get(p) {
                        Some(v) => body.push(show_value(v)),
                        None => body.push("-"),
                    }
                }
                body.push(status_name(r.status));
                body.push(r.attempts);
                match r.duration_s {
                    Some(d) => body.push(fmt_duration(d)),
                    None => body.push("-"),
                }
            }
            write_aligned(&mut out, &header, &body, &right);
            let lacking: Vec<String> = self
                .rows
                .iter()
                .filter(|r| !matches!(r.metrics.get(&self.metric), Some(Some(_))))
                .map(|r| r.trial.to_string())
                .collect();
            if !lacking.is_empty() {
                let _ = writeln!(
                    out,
                    "note: trial{} {} reported no finite {}; ranked after every trial that did",
                    if lacking.len() == 1 { "" } else { "s" },
                    lacking.join(", "),
                    self.metric
                );
            }
            if self.rows.iter().any(|r| r.status == TrialStatus::Pruned) {
                let _ = writeln!(
                    out,
                    "note: pruned trials were stopped early by early_terminate; their metrics are \
                     from the step they reached, and they rank after every completed trial"
                );
            }
        }
        if !self.failed.is_empty() {
            let _ = writeln!(out, "\nfailed trials ({}):", self.failed.len());
            let header: Vec<String> = ["trial", "attempts", "reason"].map(String::from).to_vec();
            let mut body = Cells::new(header.len(), self.failed.len());
            for f in &self.failed {
                body.push(f.trial);
                body.push(f.attempts);
                body.push(reason_line(&f.reasons));
            }
            write_aligned(&mut out, &header, &body, &[true, true, false]);
        }
        if !self.points.is_empty() {
            self.points_table(&mut out);
        }
        out
    }

    /// The points of a sweep with `repeats`, by the mean of each point's repeats.
    fn points_table(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\npoints ranked by mean {} ({}) over their repeats:",
            self.metric,
            self.goal.name()
        );
        let names: BTreeSet<&String> = self.points.iter().flat_map(|p| p.params.keys()).collect();
        let mut header: Vec<String> =
            ["rank", "point", "mean", "std", "min", "max", "n", "missing"]
                .map(String::from)
                .to_vec();
        header.extend(names.iter().map(|n| n.to_string()));
        header.push("trials".into());
        let mut right = vec![true; 8];
        right.extend(
            names
                .iter()
                .map(|n| self.points.iter().all(|p| p.params.get(*n).is_none_or(Value::is_number))),
        );
        right.push(false);
        let num = |x: Option<f64>| x.map(fmt_num).unwrap_or_else(|| "-".into());
        let mut body = Cells::new(header.len(), self.points.len());
        for p in &self.points {
            body.push(p.rank);
            body.push(p.point);
            body.push(num(p.mean));
            body.push(num(p.std));
            body.push(num(p.min));
            body.push(num(p.max));
            body.push(p.n);
            body.push(p.missing);
            for n in &names {
                match p.params.get(*n) {
                    Some(v) => body.push(show_value(v)),
                    None => body.push("-"),
                }
            }
            body.push(p.trials.iter().map(u64::to_string).collect::<Vec<_>>().join(","));
        }
        write_aligned(out, &header, &body, &right);
    }

    fn csv(&self) -> String {
        let metric_cols = self.metric_columns();
        let param_cols = self.param_columns();
        let mut header: Vec<String> =
            ["rank", "trial", "status", "attempts", "duration_s"].map(String::from).to_vec();
        header.extend(metric_cols.iter().cloned());
        header.extend(param_cols.iter().cloned());
        header.push("error".into());
        let mut out = String::new();
        csv_line(&mut out, &header);
        for r in &self.rows {
            let mut cells = vec![
                r.rank.to_string(),
                r.trial.to_string(),
                status_name(r.status).into(),
                r.attempts.to_string(),
                r.duration_s.map(|d| d.to_string()).unwrap_or_default(),
            ];
            cells.extend(metric_cols.iter().map(|m| match r.metrics.get(m) {
                Some(Some(v)) => v.to_string(),
                Some(None) => "NaN".into(),
                None => String::new(),
            }));
            cells.extend(
                param_cols.iter().map(|p| r.params.get(p).map(show_value).unwrap_or_default()),
            );
            cells.push(String::new());
            csv_line(&mut out, &cells);
        }
        for f in &self.failed {
            let mut cells = vec![
                String::new(),
                f.trial.to_string(),
                "failed".into(),
                f.attempts.to_string(),
                String::new(),
            ];
            cells.extend(metric_cols.iter().map(|_| String::new()));
            cells.extend(
                param_cols.iter().map(|p| f.params.get(p).map(show_value).unwrap_or_default()),
            );
            cells.push(f.reasons.join("\n"));
            csv_line(&mut out, &cells);
        }
        out
    }
}

/// Order two metric values so the better comes first; missing (or non-finite) values last.
/// Checks a metric to rank by (`report --metric`): a standard metric, the sweep's own, or one
/// that some completed trial reported. Otherwise an error that suggests the closest name, so a
/// typo cannot produce a report whose every value is `-`.
pub fn check_rank_metric(
    metric: &str,
    sweep_metric: &str,
    trials: &[TrialRecord],
) -> Result<(), String> {
    if metric == sweep_metric || metrics::is_standard(metric) {
        return Ok(());
    }
    let reported: BTreeSet<&str> = trials
        .iter()
        .filter(|t| matches!(t.status, TrialStatus::Completed | TrialStatus::Pruned))
        .flat_map(|t| t.metrics.keys().map(String::as_str))
        .collect();
    if reported.contains(metric) {
        return Ok(());
    }
    let known: BTreeSet<&str> = metrics::STANDARD.iter().copied().chain(reported).collect();
    let close = msae_shared::suggest::closest(metric, known.iter().copied())
        .map(|c| format!("; did you mean `{c}`?"))
        .unwrap_or_default();
    Err(format!(
        "unknown metric `{metric}`{close} (no trial reported it); metrics: {}",
        known.into_iter().collect::<Vec<_>>().join(", ")
    ))
}

fn compare(a: Option<f64>, b: Option<f64>, goal: Goal) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => match goal {
            Goal::Minimize => x.total_cmp(&y),
            Goal::Maximize => y.total_cmp(&x),
        },
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// The `metric:` block of a YAML text that may not validate as a whole any more.
fn metric_block(yaml_text: &str) -> Option<MetricSpec> {
    let root = msae_shared::yaml::to_json_value(yaml_text).ok()?;
    let m = root.get("metric")?;
    let mut spec = MetricSpec::default();
    if let Some(name) = m.get("name").and_then(Value::as_str) {
        spec.name = name.to_string();
    }
    if let Some(goal) = m.get("goal").and_then(Value::as_str).and_then(Goal::from_name) {
        spec.goal = goal;
    }
    Some(spec)
}

fn status_name(s: TrialStatus) -> &'static str {
    s.name()
}

/// The last reason, first line only, for the one-line table (the CSV and JSON keep them all).
fn reason_line(reasons: &[String]) -> String {
    match reasons.last() {
        None => "(no reason recorded)".into(),
        Some(r) => {
            let line = r.lines().next().unwrap_or("").trim();
            if reasons.len() > 1 {
                format!("{line} (and {} earlier)", reasons.len() - 1)
            } else {
                line.to_string()
            }
        }
    }
}

/// A parameter value for display: strings bare, numbers short, anything else as JSON.
fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => fmt_num(n.as_f64().unwrap_or(f64::NAN)),
        other => other.to_string(),
    }
}

/// Six significant digits, trailing zeros trimmed; scientific notation for very small or
/// large magnitudes.
fn fmt_num(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return x.to_string();
    }
    let mag = x.abs().log10().floor() as i32;
    if !(-3..6).contains(&mag) {
        let s = format!("{x:.4e}");
        // 1.2300e-5 -> 1.23e-5
        return match s.split_once('e') {
            Some((m, e)) => format!("{}e{e}", trim_zeros(m)),
            None => s,
        };
    }
    let decimals = (5 - mag).max(0) as usize;
    trim_zeros(&format!("{x:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { s }
}

fn fmt_duration(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

/// The cells of a table body, row after row, in one buffer: a 100,000-row report has 1.6
/// million cells, and a `String` each made up most of rendering's time and memory.
pub(crate) struct Cells {
    text: String,
    /// End offset of each cell in `text`.
    ends: Vec<usize>,
    columns: usize,
}

impl Cells {
    pub(crate) fn new(columns: usize, rows: usize) -> Cells {
        Cells {
            text: String::with_capacity(rows * columns * 6),
            ends: Vec::with_capacity(rows * columns),
            columns,
        }
    }

    pub(crate) fn push(&mut self, cell: impl std::fmt::Display) {
        let _ = write!(self.text, "{cell}");
        self.ends.push(self.text.len());
    }

    fn rows(&self) -> impl Iterator<Item = impl Iterator<Item = &str>> {
        (0..self.ends.len() / self.columns.max(1)).map(move |row| {
            (row * self.columns..(row + 1) * self.columns).map(move |i| {
                let start = if i == 0 { 0 } else { self.ends[i - 1] };
                &self.text[start..self.ends[i]]
            })
        })
    }
}

/// Columns separated by two spaces, padded to the widest cell (in characters).
pub(crate) fn write_aligned(out: &mut String, header: &[String], body: &Cells, right: &[bool]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in body.rows() {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    out.reserve(body.text.len() + body.ends.len() * 2);
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let start = out.len();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if right.get(i).copied().unwrap_or(false) {
                out.extend(std::iter::repeat_n(' ', pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        // No trailing blanks (a left-aligned last column pads).
        let end = start + out[start..].trim_end().len();
        out.truncate(end);
        out.push('\n');
    };
    line(&mut header.iter().map(String::as_str));
    for mut row in body.rows() {
        line(&mut row);
    }
}

/// One RFC 4180 record: fields with a comma, quote, CR or LF are quoted, quotes doubled; CRLF.
fn csv_line(out: &mut String, cells: &[String]) {
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if cell.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&cell.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(cell);
        }
    }
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
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
            config: json!({}),
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
        let r = Report::build(&sweep(""), "my_score", Goal::Minimize, &trials, None);
        let shown: Vec<&str> = metrics::TABLE.iter().filter(|m| m.report).map(|m| m.name).collect();
        let mut want = vec!["my_score".to_string()];
        want.extend(shown.iter().map(|m| m.to_string()));
        assert_eq!(r.metric_columns(), want);
        let keys: BTreeSet<&str> = r.rows[0].metrics.keys().map(String::as_str).collect();
        assert_eq!(keys, shown.into_iter().collect(), "no trial reported my_score");

        let yaml =
            "name: s\nmethod: grid\nmetric: {name: my_score, goal: maximize, custom: true}\n";
        for m in metrics::TABLE {
            let r = Report::for_sweep(&sweep(yaml), &trials, None, Some(m.name), None).unwrap();
            assert_eq!((r.metric.as_str(), r.goal), (m.name, m.goal));
        }
    }

    #[test]
    fn ranks_minimize_with_missing_and_nan_last() {
        let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), None);
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
        let r = Report::for_sweep(&sweep(yaml), &sample(), None, None, None).unwrap();
        assert_eq!(
            r.counts,
            Counts { total: 12, completed: 5, pruned: 0, failed: 1, running: 1, queued: 5 }
        );
        let mut done = sweep(yaml);
        done.finished = true;
        let r = Report::for_sweep(&done, &sample(), None, None, None).unwrap();
        assert_eq!(r.counts.total, 8, "a finished sweep is what it ran");
    }

    #[test]
    fn ranks_maximize() {
        let r = Report::build(&sweep(""), "fvu", Goal::Maximize, &sample(), None);
        assert_eq!(order(&r), vec![0, 3, 1, 2, 7]);
        let r = Report::build(&sweep(""), "l0", Goal::Maximize, &sample(), None);
        assert_eq!(order(&r), vec![0, 1, 2, 3, 7]);
    }

    #[test]
    fn top_n_keeps_the_best() {
        let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), Some(2));
        assert_eq!(order(&r), vec![1, 3]);
        assert_eq!(r.counts.completed, 5, "counts cover every trial");
        assert_eq!(r.failed.len(), 1);
    }

    #[test]
    fn failed_listed_apart_with_reasons() {
        let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), None);
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
        let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), None);
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
        let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), None);
        let csv = r.render(ReportFormat::Csv);
        let records: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(records[0], "rank,trial,status,attempts,duration_s,fvu,mse,l0,lr,mode,error");
        assert_eq!(records[1], "1,1,completed,1,1.5,0.1,,4,0.002,\"a,b\",");
        // The failed trial: quotes doubled, the newline kept inside the quoted field.
        let failed = csv.split("\r\n").find(|l| l.starts_with(",4,failed")).unwrap();
        assert!(
            failed.ends_with("\"lease expired\nworker said: \"\"out of memory\"\"\nbacktrace\""),
            "{failed}"
        );
        assert!(csv.contains("NaN"));
    }

    #[test]
    fn json_round_trips() {
        let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &sample(), None);
        let text = r.render(ReportFormat::Json);
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn for_sweep_uses_the_spec_metric_and_goal() {
        let yaml = "name: s\nmethod: grid\nmetric: {name: l0, goal: maximize}\n";
        let r = Report::for_sweep(&sweep(yaml), &sample(), None, None, None).unwrap();
        assert_eq!((r.metric.as_str(), r.goal), ("l0", Goal::Maximize));
        assert_eq!(order(&r)[0], 0);
        // Another metric ranks in its natural direction, unless a goal is given.
        let r = Report::for_sweep(&sweep(yaml), &sample(), None, Some("fvu"), None).unwrap();
        assert_eq!((r.metric.as_str(), r.goal), ("fvu", Goal::Minimize));
        let r = Report::for_sweep(&sweep(yaml), &sample(), None, Some("mmcs"), None).unwrap();
        assert_eq!((r.metric.as_str(), r.goal), ("mmcs", Goal::Maximize));
        let r = Report::for_sweep(&sweep(yaml), &sample(), None, Some("fvu"), Some(Goal::Maximize))
            .unwrap();
        assert_eq!((r.metric.as_str(), r.goal), ("fvu", Goal::Maximize));
        // A stored YAML that no longer validates still gives its metric block.
        let stale = "name: s\nmethod: grid\nmetric: {name: mse, goal: maximize}\nparameters:\n  old_field: {values: [1]}\n";
        let r = Report::for_sweep(&sweep(stale), &sample(), None, None, None).unwrap();
        assert_eq!((r.metric.as_str(), r.goal), ("mse", Goal::Maximize));
    }

    #[test]
    fn pruned_trials_rank_below_every_completed_one_and_say_so() {
        let mut trials = sample();
        // Pruned at better values than any completed trial: still ranked after them all.
        trials.push(trial(8, TrialStatus::Pruned, &[("fvu", 0.05)]));
        trials.push(trial(9, TrialStatus::Pruned, &[("fvu", 0.01)]));
        trials.push(trial(10, TrialStatus::Pruned, &[]));
        let r = Report::build(&sweep(""), "fvu", Goal::Minimize, &trials, None);
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
        assert!(csv.contains("\r\n6,9,pruned,1,1.5,0.01,"), "{csv}");
        let back: Report = serde_json::from_str(&r.render(ReportFormat::Json)).unwrap();
        assert_eq!(back, r);
        // A report written before pruning existed (no `pruned` count) still reads.
        let old = r#"{"total":1,"completed":1,"failed":0,"running":0,"queued":0}"#;
        let counts: Counts = serde_json::from_str(old).unwrap();
        assert_eq!(counts.pruned, 0);
        // Top N: pruned trials only fill what completed ones leave.
        let top = Report::build(&sweep(""), "fvu", Goal::Minimize, &trials, Some(6));
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
        let yaml =
            "name: s\nmethod: grid\nrepeats: 2\nparameters:\n  lr: {values: [0.001, 0.002]}\n";
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
        let r = Report::for_sweep(&sweep(yaml), &trials, None, None, None).unwrap();
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
        let plain = Report::for_sweep(&sweep("name: s\nmethod: grid\n"), &trials, None, None, None)
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
        let base = Report::for_sweep(&sweep("name: s\nmethod: grid\n"), &trials, None, None, None)
            .unwrap();
        let mut p = base.clone();
        p.pareto("fvu", "l0").unwrap();
        let order: Vec<u64> = p.rows.iter().map(|r| r.trial).collect();
        assert_eq!(order, [5, 1, 6, 2, 0], "sorted by l0; 3 and 4 are dominated");
        assert_eq!(p.rows.iter().map(|r| r.rank).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert!(
            p.render(ReportFormat::Table)
                .contains("Pareto frontier of fvu (lower is better) and l0")
        );
        let mut band = base.clone();
        band.within(L0, 10.0, 15.0).unwrap();
        let order: Vec<u64> = band.rows.iter().map(|r| r.trial).collect();
        assert_eq!(order, [2, 1, 6, 3], "l0 in [10, 15], ranked by fvu");
        assert!(band.render(ReportFormat::Table).contains("only trials with l0 in [10, 15]"));
        let e = base.clone().pareto("fvu", "nonsense").unwrap_err();
        assert!(e.contains("no ranked trial reports `nonsense`"), "{e}");
    }
}
