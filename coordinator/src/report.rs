//! The ranked report of a sweep: completed trials ordered by the sweep metric, then the trials
//! early termination pruned (ranked the same way, below every completed one: their metrics are
//! from before the end of training), failed trials apart with their reasons, and how many are
//! still queued or running.
//!
//! Built from stored records only, so it works on a database file as well as on a snapshot sent
//! by a running coordinator. Rendered as an aligned table for people, RFC 4180 CSV for
//! spreadsheets and dataframes (one row per trial, failed ones included with their error), or
//! pretty JSON that deserializes back into [`Report`]. Which metrics and how much of each
//! trial's config the rows carry is chosen by [`Columns`] ([`columns`]); `report --plot` draws
//! the report ([`plot`]).

use crate::model::{Goal, SweepRecord, TrialRecord, TrialStatus};
use crate::spec::{Distribution, MetricSpec, ParamSpec, SweepSpec};
use msae_shared::metrics;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

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
    /// Where the coordinator keeps the trial's files (weights, config, metrics): `SWEEP/INDEX`
    /// in the weights directory beside the database; None when it keeps none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<String>,
    /// The trial's whole config as it ran, with `--config full` (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
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
    /// As [`ReportRow::config`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
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
    /// The axis each swept parameter's distribution calls for in a plot; parameters swept over
    /// a list of values are left out (their values decide).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub param_scales: BTreeMap<String, ParamScale>,
}

/// The axis a parameter's distribution calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamScale {
    /// `log_uniform_values`.
    Log,
    /// `uniform`, `int_uniform`, `q_uniform`: drawn evenly, so shown evenly even where the
    /// values happen to span decades.
    Linear,
}

impl ParamScale {
    /// The axis `param`'s distribution calls for, if it is a numeric distribution.
    fn of(param: &ParamSpec) -> Option<ParamScale> {
        match param {
            ParamSpec::Distribution(Distribution::LogUniformValues { .. }) => Some(ParamScale::Log),
            ParamSpec::Distribution(
                Distribution::Uniform { .. }
                | Distribution::IntUniform { .. }
                | Distribution::QUniform { .. },
            ) => Some(ParamScale::Linear),
            _ => None,
        }
    }
}

/// What a report ranks by and which columns it carries: the `report` flags, and the fields of
/// the Report RPC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportOptions {
    /// Keep the best N.
    pub top: Option<usize>,
    /// Rank by this metric instead of the sweep's.
    pub metric: Option<String>,
    pub goal: Option<Goal>,
    pub columns: Columns,
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
    /// keep the best `top`; carry the metrics and config `columns` asks for.
    pub fn build(
        sweep: &SweepRecord,
        metric: &str,
        goal: Goal,
        trials: &[TrialRecord],
        top: Option<usize>,
        columns: &Columns,
    ) -> Report {
        let config = |t: &TrialRecord| {
            (columns.config == ConfigColumns::Full && !t.config.is_null())
                .then(|| t.config.to_value())
        };
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
                        config: config(t),
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
                let finite = |v: f64| Some(v).filter(|v| v.is_finite());
                let metrics = match &columns.metrics {
                    // The usual table: a handful of lookups rather than a pass over every
                    // metric (a trial may report hundreds of per-class usage values).
                    MetricColumns::Key => std::iter::once(metric)
                        .chain(metrics::in_report())
                        .filter_map(|m| t.metrics.get(m).map(|v| (m.to_string(), finite(*v))))
                        .collect(),
                    keep => t
                        .metrics
                        .iter()
                        .filter(|(m, _)| keep.keeps(m, metric))
                        .map(|(m, v)| (m.clone(), finite(*v)))
                        .collect(),
                };
                ReportRow {
                    rank: i + 1,
                    trial: t.index,
                    params: t.params.clone(),
                    metrics,
                    status: t.status,
                    attempts: t.attempt,
                    duration_s: t.duration_s,
                    worker: t.worker.clone(),
                    files: t.weights.as_ref().map(|w| w.dir.clone()),
                    config: config(t),
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
            param_scales: BTreeMap::new(),
        }
    }

    /// [`Report::build`] with the metric and goal of the sweep's own YAML. `options.metric`
    /// ranks by another metric, in that metric's natural direction
    /// ([`metrics::natural_goal`]) unless `options.goal` says otherwise. A stored YAML that no
    /// longer validates (the trial config changed since) still yields its `metric:` block when
    /// it can be read at all. An override or a picked metric that is no known metric is
    /// refused ([`check_rank_metric`]).
    pub fn for_sweep(
        sweep: &SweepRecord,
        trials: &[TrialRecord],
        options: &ReportOptions,
    ) -> Result<Report, String> {
        let (top, metric_override, goal_override) =
            (options.top, options.metric.as_deref(), options.goal);
        let (spec_metric, spec_planned, repeats, param_scales) = match SweepSpec::parse(
            &sweep.yaml,
            &sweep.name,
        ) {
            Ok(spec) => {
                let scales = spec
                    .parameters
                    .iter()
                    .filter_map(|(name, p)| Some((name.clone(), ParamScale::of(p)?)))
                    .collect();
                (spec.metric.clone(), spec.planned_trials(), spec.repeats, scales)
            }
            Err(e) => {
                tracing::warn!(sweep = %sweep.name, "stored sweep YAML does not validate any more ({e}); reading its metric block only");
                (metric_block(&sweep.yaml).unwrap_or_default(), None, 1, BTreeMap::new())
            }
        };
        if let Some(m) = metric_override {
            check_rank_metric(m, &spec_metric.name, trials)?;
        }
        if let MetricColumns::Pick(names) = &options.columns.metrics {
            for m in names {
                check_rank_metric(m, &spec_metric.name, trials)?;
            }
        }
        let metric = metric_override.unwrap_or(&spec_metric.name);
        // Another metric than the sweep's ranks in its own natural direction.
        let goal = goal_override.unwrap_or(if metric == spec_metric.name {
            spec_metric.goal
        } else {
            metrics::natural_goal(metric)
        });
        let mut report = Report::build(sweep, metric, goal, trials, top, &options.columns);
        report.param_scales = param_scales;
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
}

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
    check_known_metric(metric, sweep_metric, &reported)
}

/// [`check_rank_metric`] against the names `reported` by the trials.
pub(crate) fn check_known_metric(
    metric: &str,
    sweep_metric: &str,
    reported: &BTreeSet<&str>,
) -> Result<(), String> {
    if metric == sweep_metric || metrics::is_standard(metric) || reported.contains(metric) {
        return Ok(());
    }
    let known: BTreeSet<&str> =
        metrics::STANDARD.iter().copied().chain(reported.iter().copied()).collect();
    let close = msae_shared::suggest::closest(metric, known.iter().copied())
        .map(|c| format!("; did you mean `{c}`?"))
        .unwrap_or_default();
    Err(format!(
        "unknown metric `{metric}`{close} (no trial reported it); metrics: {}",
        known.into_iter().collect::<Vec<_>>().join(", ")
    ))
}

/// Order two metric values so the better comes first; missing (or non-finite) values last.
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

pub mod columns;
pub mod plot;
mod render;
#[cfg(test)]
mod tests;

pub use columns::{Columns, ConfigColumns, MetricColumns};

pub(crate) use render::{Cells, write_aligned};
