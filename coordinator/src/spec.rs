//! The sweep YAML: parsed, checked in full before any trial runs, and fingerprinted.
//!
//! The shape follows W&B Sweeps so it reads familiar:
//!
//! ```yaml
//! name: stripes                 # required, [A-Za-z0-9_.-]+
//! description: compare sparsity modes
//! metric: {name: fvu, goal: minimize}
//! method: grid                  # grid | random
//! run_cap: 100                  # required for random; caps any method
//! max_concurrent: 4
//! seed: 0                       # seeds the random search
//! max_attempts: 3               # per trial, retries included
//! timeout: 30m                  # per attempt: seconds, or "90s", "30m", "2h", "1h30m"
//! task: {kind: sae}             # sae | noop (analytic no-op runner), with sleep_ms
//! early_terminate: {type: asha, min_steps: 100}   # hyperband | asha | median (see below)
//! keep_weights: auto            # auto | all | none | {best: N}: trained SAEs kept (below)
//! base:                         # fixed trial-config values, dotted or nested
//!   steps: 600
//!   data.synthetic.noise_std: 0.01
//! parameters:                   # keys are trial-config paths
//!   layer_sparsity_mode: {values: [none, ordinary, lifetime]}
//!   lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}
//! ```
//!
//! Parameters: `value`; `values` (optionally with `probabilities`: then categorical); or a
//! `distribution` of `uniform` [min, max), `log_uniform_values` exp(uniform(ln min, ln max)),
//! `int_uniform` (inclusive), `q_uniform` round(uniform(min, max) / q) * q (q defaults to 1),
//! `categorical` (`values`, optional `probabilities`). As in W&B, `min`/`max` without a
//! distribution mean `int_uniform` when both are integers, else `uniform`; `q` alone means
//! `q_uniform`. Trial-config fields of integer type always receive JSON integers: integral
//! floats are converted, and samples of continuous distributions are rounded.
//!
//! Grid search enumerates `value`, `values` and `categorical`, and expands `int_uniform` and
//! `q_uniform` into their (at most [`MAX_GRID_EXPANSION`]) values; continuous distributions
//! are refused, and categorical `probabilities` play no part.
//!
//! `early_terminate:` stops trials whose metric falls behind, judged on the sweep metric at the
//! evaluation steps workers report ([`EarlyTerminate`]; the rules are in [`crate::prune`]):
//! `{type: hyperband, min_iter, max_iter, s, eta: 3}` (W&B's), `{type: asha, min_steps,
//! reduction_factor: 3, max_steps}` and `{type: median, warmup_steps: 0, min_trials: 5}`.
//!
//! `keep_weights:` says which completed trials' files (weights, config, metrics) workers upload
//! and the coordinator keeps beside its database ([`crate::weights`]): `auto` (the default)
//! keeps every trial's up to 64 MiB and the best 3 trials' whatever their size; `all`; `none`
//! (nothing uploaded); `{best: N}` the best N by the sweep metric.
//!
//! Validation, before anything runs, with the YAML line and column of the culprit:
//! - unknown keys everywhere, with a "did you mean" suggestion; names of methods, goals,
//!   distributions and task kinds likewise;
//! - every parameter and `base` key must be a trial-config path (suggestion from
//!   [`TrialConfig::suggest_path`]); a parameter may not also be set in `base`;
//! - value checks (min < max, q > 0, log_uniform min > 0, probabilities sum to 1, ...);
//! - every point is built into a [`TrialConfig`] and `validate()`d, so cross-field rules such as
//!   `stripe_k <= num_stripes` hold for the whole space. Grid: every point that will run (the
//!   first `run_cap`); a grid of more than [`MAX_CHECKED_POINTS`] runnable points is refused.
//!   Random: every combination of each parameter's edge values (min and the largest value below
//!   max for `uniform`, both bounds for the others, both rounded bounds for `q_uniform`, every
//!   value of a categorical); if there are more than [`MAX_CHECKED_POINTS`] such combinations,
//!   each parameter's edge values are checked on their own against `base`.

pub mod diff;
mod locate;
mod parse;
mod points;

use crate::model::Goal;
use crate::weights::KeepWeights;
use locate::{Seg, segs};
use msae_shared::RunnerKind;
use msae_shared::config::{ConfigError, TrialConfig};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

/// Largest number of points checked before a sweep starts.
pub const MAX_CHECKED_POINTS: u64 = 100_000;
/// Largest number of values an `int_uniform` or `q_uniform` parameter expands to in a grid.
pub const MAX_GRID_EXPANSION: u64 = 1_000;

/// A sweep file that cannot be run, with where and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecError {
    /// The file (or other source name) the YAML came from.
    pub source: String,
    /// 1-based line of the culprit, when known.
    pub line: Option<usize>,
    /// 1-based column of the culprit, when known.
    pub column: Option<usize>,
    pub message: String,
}

// Not derived with thiserror: it would take the `source` field for the error's cause.
impl std::error::Error for SpecError {}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.source, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.source, self.message),
            _ => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

/// The metric the sweep optimises and ranks by.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricSpec {
    /// A metric name reported by trials (see `msae_shared::metrics`); default `fvu`.
    pub name: String,
    pub goal: Goal,
    /// `custom: true` declares a metric that is not a standard one (a runner of one's own
    /// reports it); otherwise an unknown name is refused.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub custom: bool,
}

impl Default for MetricSpec {
    fn default() -> Self {
        MetricSpec {
            name: msae_shared::metrics::FVU.to_string(),
            goal: Goal::Minimize,
            custom: false,
        }
    }
}

/// Search method. Grid and random propose a fixed sequence; the others choose each point from
/// the results so far ([`crate::search`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The cartesian product of the parameters' values.
    Grid,
    /// `run_cap` independent samples, reproducible from (seed, index).
    Random,
    /// argmin's Nelder-Mead simplex over the numeric parameters, one per gridded cell.
    NelderMead,
    /// argmin's particle swarm, one swarm per gridded cell, a population evaluated at once.
    ParticleSwarm,
    /// argmin's simulated annealing, one annealer per gridded cell.
    SimulatedAnnealing,
    /// Tree-structured Parzen estimators over the whole (mixed) space, asynchronous.
    Bayes,
}

impl Method {
    /// The names accepted in `method:`.
    pub const NAMES: &'static [&'static str] =
        &["grid", "random", "nelder_mead", "particle_swarm", "simulated_annealing", "bayes"];

    /// The YAML name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Grid => "grid",
            Method::Random => "random",
            Method::NelderMead => "nelder_mead",
            Method::ParticleSwarm => "particle_swarm",
            Method::SimulatedAnnealing => "simulated_annealing",
            Method::Bayes => "bayes",
        }
    }

    fn from_name(name: &str) -> Option<Method> {
        [
            Method::Grid,
            Method::Random,
            Method::NelderMead,
            Method::ParticleSwarm,
            Method::SimulatedAnnealing,
            Method::Bayes,
        ]
        .into_iter()
        .find(|m| m.name() == name)
    }

    /// Whether this is one of argmin's solvers (numeric parameters searched, the rest gridded).
    pub fn is_argmin(self) -> bool {
        matches!(self, Method::NelderMead | Method::ParticleSwarm | Method::SimulatedAnnealing)
    }
}

/// Settings of the result-driven methods (the `search:` block), with their defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchSettings {
    /// particle_swarm: particles per swarm (default 8).
    pub population: usize,
    /// nelder_mead: edge of the initial simplex around the box centre, in unit-box coordinates
    /// (default 0.25); simulated_annealing: the step at temperature 1 likewise.
    pub initial_simplex_scale: f64,
    /// Solver iterations per cell (default 100); `run_cap` bounds the trials of every method.
    pub iterations: u64,
    /// simulated_annealing: initial temperature, in units of the metric (default 0.05).
    pub temperature: f64,
    /// bayes: random trials before the model is used (default 10).
    pub startup_trials: u64,
    /// Seed of the search (default: the sweep's `seed`).
    pub seed: Option<u64>,
}

impl Default for SearchSettings {
    fn default() -> Self {
        SearchSettings {
            population: 8,
            initial_simplex_scale: 0.25,
            iterations: 100,
            temperature: 0.05,
            startup_trials: 10,
            seed: None,
        }
    }
}

impl SearchSettings {
    fn is_default(&self) -> bool {
        *self == SearchSettings::default()
    }
}

/// The task block.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct TaskSpec {
    /// What each trial runs (`sae`, or the analytic `noop` runner of orchestration tests and
    /// benchmarks).
    pub kind: RunnerKind,
    /// Milliseconds a trial sleeps before reporting (used by the noop runner).
    pub sleep_ms: u64,
}

/// Early termination (`early_terminate:`): which rule stops trials whose sweep metric falls
/// behind, at the evaluation steps workers report. Steps are training steps. The rules
/// themselves are in [`crate::prune`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EarlyTerminate {
    /// W&B's hyperband (its non-strict mode): brackets at `min_iter * eta^k` steps (at most `s`
    /// of them, all below `max_iter` when given), or, without `min_iter`, at
    /// `floor(max_iter / eta^k)` for k = 1..=s. At every evaluation a trial is judged at the
    /// last bracket it reached: it stops when its best value so far is worse than the value
    /// ranked `floor(n / eta)` (0-based, best first) among the n trials' values at that bracket.
    Hyperband { min_iter: Option<u64>, max_iter: Option<u64>, s: Option<u64>, eta: u64 },
    /// Asynchronous successive halving: rungs at `min_steps * reduction_factor^k` (below
    /// `max_steps` when given); a trial reaching a rung continues only if its value there is
    /// among the best `max(1, floor(n / reduction_factor))` of the n trials that reached it so
    /// far (itself included).
    Asha { min_steps: u64, reduction_factor: u64, max_steps: Option<u64> },
    /// Optuna's MedianPruner: at a step past `warmup_steps`, a trial stops when its best value so
    /// far is worse than the median of the other trials' values at that same step, once at
    /// least `min_trials` other trials have reported there.
    Median { warmup_steps: u64, min_trials: u64 },
}

/// Bracket and rung lists stop before this many entries (the steps grow geometrically, so
/// more would overflow long before).
pub const MAX_RUNGS: usize = 64;

impl EarlyTerminate {
    /// The names accepted in `early_terminate.type`.
    pub const NAMES: &'static [&'static str] = &["hyperband", "asha", "median"];

    /// The YAML name.
    pub fn name(&self) -> &'static str {
        match self {
            EarlyTerminate::Hyperband { .. } => "hyperband",
            EarlyTerminate::Asha { .. } => "asha",
            EarlyTerminate::Median { .. } => "median",
        }
    }

    /// The steps at which hyperband brackets or ASHA rungs judge trials, ascending (empty for
    /// the median rule, which judges at every evaluation step).
    pub fn rungs(&self) -> Vec<u64> {
        match *self {
            EarlyTerminate::Hyperband { min_iter: Some(min), max_iter, s, eta } => {
                geometric(min, eta, max_iter, s)
            }
            EarlyTerminate::Hyperband { min_iter: None, max_iter, s, eta } => {
                // W&B: band = max_iter; s times: band /= eta, kept while >= 1.
                let (Some(max), Some(s)) = (max_iter, s) else { return Vec::new() };
                let mut out = Vec::new();
                let mut band = max as f64;
                for _ in 0..s.min(MAX_RUNGS as u64) {
                    band /= eta as f64;
                    if band < 1.0 {
                        break;
                    }
                    out.push(band as u64);
                }
                out.sort_unstable();
                out.dedup();
                out
            }
            EarlyTerminate::Asha { min_steps, reduction_factor, max_steps } => {
                geometric(min_steps, reduction_factor, max_steps, None)
            }
            EarlyTerminate::Median { .. } => Vec::new(),
        }
    }
}

/// `first * factor^k` for k = 0, 1, ...: below `below` when given, at most `count` of them.
fn geometric(first: u64, factor: u64, below: Option<u64>, count: Option<u64>) -> Vec<u64> {
    let mut out = Vec::new();
    let mut step = Some(first);
    let limit = count.map_or(MAX_RUNGS, |c| (c as usize).min(MAX_RUNGS));
    while let Some(s) = step {
        if out.len() >= limit || below.is_some_and(|b| s >= b) {
            break;
        }
        out.push(s);
        step = s.checked_mul(factor);
    }
    out
}

/// A random distribution (W&B Sweeps semantics).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "distribution", rename_all = "snake_case")]
pub enum Distribution {
    /// Uniform in [min, max).
    Uniform { min: f64, max: f64 },
    /// exp(uniform(ln min, ln max)), 0 < min < max.
    LogUniformValues { min: f64, max: f64 },
    /// Integers in [min, max].
    IntUniform { min: i64, max: i64 },
    /// round(uniform(min, max) / q) * q.
    QUniform { min: f64, max: f64, q: f64 },
    /// One of `values`, equally likely or with `probabilities` (same length, sum 1).
    Categorical { values: Vec<Value>, probabilities: Option<Vec<f64>> },
}

impl Distribution {
    /// The YAML names, in the order of the variants.
    pub const NAMES: &'static [&'static str] =
        &["uniform", "log_uniform_values", "int_uniform", "q_uniform", "categorical"];

    /// Numeric bounds (for bounded optimisers), None for categorical.
    pub fn bounds(&self) -> Option<(f64, f64)> {
        match *self {
            Distribution::Uniform { min, max }
            | Distribution::LogUniformValues { min, max }
            | Distribution::QUniform { min, max, .. } => Some((min, max)),
            Distribution::IntUniform { min, max } => Some((min as f64, max as f64)),
            Distribution::Categorical { .. } => None,
        }
    }
}

/// How one parameter varies.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamSpec {
    /// A constant.
    Value(Value),
    /// A list: the grid's axis; equally likely in random search.
    Values(Vec<Value>),
    /// A distribution.
    Distribution(Distribution),
}

impl ParamSpec {
    /// The values a grid enumerates, in order (int_uniform and q_uniform expanded).
    pub fn grid_values(&self) -> Result<Vec<Value>, String> {
        match self {
            ParamSpec::Value(v) => Ok(vec![v.clone()]),
            ParamSpec::Values(vs) => Ok(vs.clone()),
            ParamSpec::Distribution(d) => match d {
                Distribution::Categorical { values, .. } => Ok(values.clone()),
                Distribution::IntUniform { min, max } => {
                    let n = (*max as i128 - *min as i128 + 1) as u128;
                    if n > MAX_GRID_EXPANSION as u128 {
                        return Err(format!(
                            "int_uniform [{min}, {max}] has {n} values; grid expands at most \
                             {MAX_GRID_EXPANSION}: use `values`, or method: random"
                        ));
                    }
                    Ok((*min..=*max).map(Value::from).collect())
                }
                Distribution::QUniform { min, max, q } => {
                    let (lo, hi) = ((min / q).round(), (max / q).round());
                    let n = hi - lo + 1.0;
                    if n.is_nan() || n > MAX_GRID_EXPANSION as f64 {
                        return Err(format!(
                            "q_uniform [{min}, {max}] step {q} has {n} values; grid expands at \
                             most {MAX_GRID_EXPANSION}: use `values`, or method: random"
                        ));
                    }
                    Ok((0..n as i64).map(|i| number(q_multiple(lo + i as f64, *q))).collect())
                }
                Distribution::Uniform { .. } | Distribution::LogUniformValues { .. } => {
                    Err("a continuous distribution cannot be enumerated by a grid: use `values` \
                     (or int_uniform / q_uniform), or method: random"
                        .to_string())
                }
            },
        }
    }

    /// The values whose acceptance implies (for monotone constraints) that every sample is
    /// accepted, each with the YAML path (below the parameter) to blame if it is refused.
    fn edge_values(&self) -> Vec<(Value, Vec<Seg>)> {
        match self {
            ParamSpec::Value(v) => vec![(v.clone(), segs!["value"].to_vec())],
            ParamSpec::Values(vs)
            | ParamSpec::Distribution(Distribution::Categorical { values: vs, .. }) => vs
                .iter()
                .enumerate()
                .map(|(i, v)| (v.clone(), segs!["values", i].to_vec()))
                .collect(),
            ParamSpec::Distribution(d) => match *d {
                // Samples lie in [min, max): the largest one is the float just below max.
                Distribution::Uniform { min, max } => {
                    vec![
                        (number(min), segs!["min"].to_vec()),
                        (number(max.next_down().max(min)), segs!["max"].to_vec()),
                    ]
                }
                Distribution::LogUniformValues { min, max } => {
                    vec![(number(min), segs!["min"].to_vec()), (number(max), segs!["max"].to_vec())]
                }
                Distribution::IntUniform { min, max } => {
                    vec![
                        (Value::from(min), segs!["min"].to_vec()),
                        (Value::from(max), segs!["max"].to_vec()),
                    ]
                }
                Distribution::QUniform { min, max, q } => vec![
                    (number(q_multiple((min / q).round(), q)), segs!["min"].to_vec()),
                    (number(q_multiple((max / q).round(), q)), segs!["max"].to_vec()),
                ],
                Distribution::Categorical { .. } => unreachable!("handled above"),
            },
        }
    }
}

/// `k * q`, rounded to q's own decimal places so 3 * 0.1 gives 0.3, not 0.30000000000000004.
pub fn q_multiple(k: f64, q: f64) -> f64 {
    let x = k * q;
    let text = format!("{q}");
    match text.split_once('.') {
        Some((_, frac)) if !text.contains('e') && frac.len() <= 15 => {
            format!("{x:.prec$}", prec = frac.len()).parse().unwrap_or(x)
        }
        _ => x,
    }
}

/// A JSON number from an f64 (non-finite values become null, which the config refuses).
pub fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null)
}

/// A parsed and validated sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepSpec {
    pub name: String,
    pub description: Option<String>,
    pub metric: MetricSpec,
    pub method: Method,
    /// Most trials to propose; required for random, caps any method.
    pub run_cap: Option<u64>,
    /// Most trials running at once (None: as many as workers ask for).
    pub max_concurrent: Option<usize>,
    /// Seed of the random search.
    pub seed: u64,
    /// Fixed trial-config values, normalised to nested objects (`a.b: 1` becomes `a: {b: 1}`).
    pub base: Map<String, Value>,
    /// Swept parameters by dotted trial-config path.
    pub parameters: BTreeMap<String, ParamSpec>,
    /// Attempts per trial before it is failed (>= 1).
    pub max_attempts: u32,
    /// Wall-clock limit of one attempt.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Option<Duration>,
    pub task: TaskSpec,
    /// Settings of the result-driven methods (left out of the fingerprint while default, so
    /// sweeps written before they existed keep theirs).
    #[serde(skip_serializing_if = "SearchSettings::is_default")]
    pub search: SearchSettings,
    /// Trainings of each point, with trial seeds `seed`, `seed + 1`, ... (default 1; left out
    /// of the fingerprint when 1).
    #[serde(skip_serializing_if = "is_one")]
    pub repeats: u64,
    /// Early termination of trials that fall behind (None: every trial runs to its end).
    /// Absent from the fingerprint when not set, so sweeps stored before it keep theirs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_terminate: Option<EarlyTerminate>,
    /// Which completed trials keep their files at the coordinator. Not in the fingerprint: it
    /// changes no result, so a resumed sweep may keep more or fewer.
    #[serde(skip)]
    pub keep_weights: KeepWeights,
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

fn ser_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    d.map(|d| d.as_secs_f64()).serialize(s)
}

impl SweepSpec {
    /// Make relative `data.path` and `data.labels` base values relative to `dir`, the sweep
    /// file's directory: the files a sweep names must not depend on where the coordinator was
    /// started, and local workers read them from that process's current directory.
    pub fn resolve_data_paths(&mut self, dir: &std::path::Path) {
        let resolve = |v: &mut Value| {
            if let Value::String(p) = v
                && std::path::Path::new(p.as_str()).is_relative()
            {
                *p = dir.join(&*p).display().to_string();
            }
        };
        if let Some(Value::Object(data)) = self.base.get_mut("data") {
            for key in ["path", "labels"] {
                if let Some(v) = data.get_mut(key) {
                    resolve(v);
                }
            }
        }
        // Swept paths too (`data.path: {values: [a.npy, b.npy]}`).
        for key in ["data.path", "data.labels"] {
            match self.parameters.get_mut(key) {
                Some(ParamSpec::Value(v)) => resolve(v),
                Some(ParamSpec::Values(vs))
                | Some(ParamSpec::Distribution(Distribution::Categorical { values: vs, .. })) => {
                    vs.iter_mut().for_each(resolve)
                }
                _ => {}
            }
        }
    }

    /// Parse and fully validate a sweep YAML. `source` names the file in messages.
    pub fn parse(text: &str, source: &str) -> Result<SweepSpec, SpecError> {
        parse::Parser { text, source }.parse()
    }

    /// Stable hash of the canonical JSON of the spec (keys sorted, numbers normalised): the
    /// same for any formatting, comments or key order, different for any changed value.
    pub fn fingerprint(&self) -> String {
        let value = serde_json::to_value(self).expect("a sweep spec serializes");
        let mut canonical = String::from("msae-sweep-v1:");
        write_canonical(&value, &mut canonical);
        format!("{:016x}", fnv1a64(canonical.as_bytes()))
    }

    /// The trial config of one point: `base` merged with `params` (dotted paths into nested
    /// objects), parsed and validated, returned as the full config JSON (defaults filled in).
    pub fn trial_config(&self, params: &BTreeMap<String, Value>) -> Result<Value, ConfigError> {
        let cfg = self.build_config(params)?;
        Ok(serde_json::to_value(cfg).expect("a trial config serializes"))
    }

    /// The trial-config seed of a point's first repeat: `base`'s `seed`, else the default.
    pub fn base_seed(&self) -> u64 {
        self.base.get("seed").and_then(Value::as_u64).unwrap_or(TrialConfig::default().seed)
    }

    /// Number of trials the sweep will propose, when known in advance (grid, or a run cap).
    pub fn planned_trials(&self) -> Option<u64> {
        let points = self.planned_points();
        match (points, self.run_cap) {
            (Some(p), Some(cap)) => Some(p.saturating_mul(self.repeats).min(cap)),
            (p, _) => p.map(|p| p.saturating_mul(self.repeats)),
        }
    }

    fn planned_points(&self) -> Option<u64> {
        match self.method {
            Method::Grid => {
                let n = self.parameters.values().try_fold(1u64, |acc, p| {
                    p.grid_values().ok().and_then(|v| acc.checked_mul(v.len() as u64))
                });
                match (n, self.run_cap) {
                    (Some(n), Some(cap)) => Some(n.min(cap)),
                    (n, None) => n,
                    (None, cap) => cap,
                }
            }
            // Random and bayes run exactly run_cap; argmin's solvers at most (they may converge
            // first, and without run_cap their iterations bound them).
            _ => self.run_cap,
        }
    }

    fn build_config(&self, params: &BTreeMap<String, Value>) -> Result<TrialConfig, ConfigError> {
        let mut value = Value::Object(self.base.clone());
        for (p, v) in params {
            set_path(&mut value, p, normalize_value(p, v.clone()))?;
        }
        let cfg = TrialConfig::from_value(value)?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Insert `value` at dotted `path`, creating objects on the way.
fn set_path(root: &mut Value, path: &str, value: Value) -> Result<(), ConfigError> {
    let mut node = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let Value::Object(map) = node else {
            return Err(ConfigError::new(path, "a parent of this field is not a block"));
        };
        if parts.peek().is_none() {
            map.insert(part.to_string(), value);
            return Ok(());
        }
        node = map.entry(part.to_string()).or_insert_with(|| Value::Object(Map::new()));
    }
    Ok(())
}

/// The default trial config as JSON: field types and paths are read from it.
static DEFAULT_CONFIG: LazyLock<Value> = LazyLock::new(TrialConfig::schema_value);

fn default_at(path: &str) -> Option<&'static Value> {
    path.split('.').try_fold(&*DEFAULT_CONFIG, |v, part| v.get(part))
}

/// Whether the trial-config field at `path` is an integer.
pub fn is_integer_field(path: &str) -> bool {
    default_at(path).is_some_and(|v| v.is_u64() || v.is_i64())
}

/// Integral floats written for integer fields (`8.0`) become integers; all else is unchanged.
pub fn normalize_value(path: &str, v: Value) -> Value {
    match v.as_f64() {
        Some(x) if v.is_f64() && x.fract() == 0.0 && x.abs() < 9.0e15 && is_integer_field(path) => {
            Value::from(x as i64)
        }
        _ => v,
    }
}

/// A sampled number as the JSON the field at `path` takes: rounded for integer fields.
pub fn sample_value(path: &str, x: f64) -> Value {
    if is_integer_field(path) && x.is_finite() { Value::from(x.round() as i64) } else { number(x) }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// JSON with object keys sorted at every level (independent of serde_json's map order).
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        // Integral floats print like integers so `8` and `8.0` hash alike.
        Value::Number(n)
            if n.is_f64() && n.as_f64().is_some_and(|x| x.fract() == 0.0 && x.abs() < 9.0e15) =>
        {
            out.push_str(&(n.as_f64().unwrap_or(0.0) as i64).to_string());
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests;
