//! Parsing and validation of the sweep YAML into a [`SweepSpec`] (see the parent module for
//! the rules). Works on the YAML as a JSON value; positions for messages come from
//! [`super::locate`], looked up only when something is wrong.

use super::locate::{Seg, locate, segs};
use super::*;
use msae_shared::yaml;
use std::collections::HashMap;

/// The closest of `candidates` to `name`, if close enough to be a likely typo.
fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    msae_shared::suggest::closest(name, candidates)
}

fn did_you_mean(s: Option<&str>) -> String {
    s.map(|s| format!("; did you mean `{s}`?")).unwrap_or_default()
}

/// Compact JSON of a value for messages.
pub(super) fn show(v: &Value) -> String {
    v.to_string()
}

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "metric",
    "method",
    "run_cap",
    "max_concurrent",
    "seed",
    "base",
    "parameters",
    "max_attempts",
    "timeout",
    "task",
    "search",
    "repeats",
    "early_terminate",
    "keep_weights",
];
const SEARCH_KEYS: &[&str] =
    &["population", "initial_simplex_scale", "iterations", "temperature", "startup_trials", "seed"];
const METRIC_KEYS: &[&str] = &["name", "goal", "custom"];
const TASK_KEYS: &[&str] = &["kind", "sleep_ms"];
const HYPERBAND_KEYS: &[&str] = &["type", "min_iter", "max_iter", "s", "eta"];
const ASHA_KEYS: &[&str] = &["type", "min_steps", "reduction_factor", "max_steps"];
const MEDIAN_KEYS: &[&str] = &["type", "warmup_steps", "min_trials"];
const PARAM_KEYS: &[&str] =
    &["value", "values", "distribution", "min", "max", "q", "probabilities"];

/// Parse state: the text (to locate nodes) and the source name.
pub(super) struct Parser<'a> {
    pub(super) text: &'a str,
    pub(super) source: &'a str,
}

type Obj = Map<String, Value>;

impl Parser<'_> {
    pub(super) fn err(&self, at: &[Seg], message: impl Into<String>) -> SpecError {
        // Blame the nearest existing ancestor if the node itself is absent.
        let mut loc = None;
        for n in (0..=at.len()).rev() {
            if let Some(l) = locate(self.text, &at[..n]) {
                loc = Some(l);
                break;
            }
        }
        SpecError {
            source: self.source.to_string(),
            line: loc.map(|l| l.0),
            column: loc.map(|l| l.1),
            message: message.into(),
        }
    }

    fn check_keys(
        &self,
        obj: &Obj,
        allowed: &[&str],
        at: &[Seg],
        what: &str,
    ) -> Result<(), SpecError> {
        for key in obj.keys() {
            if !allowed.contains(&key.as_str()) {
                let mut p = at.to_vec();
                p.push(Seg::Key(key.clone()));
                return Err(self.err(
                    &p,
                    format!(
                        "unknown key `{key}` in {what}{}",
                        did_you_mean(suggest(key, allowed.iter().copied()))
                    ),
                ));
            }
        }
        Ok(())
    }

    fn string(&self, obj: &Obj, key: &str, at: &[Seg]) -> Result<Option<String>, SpecError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => {
                Err(self
                    .err(&child(at, key), format!("`{key}` must be a string, not {}", show(other))))
            }
        }
    }

    fn bool(&self, obj: &Obj, key: &str, at: &[Seg]) -> Result<Option<bool>, SpecError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.err(
                &child(at, key),
                format!("`{key}` must be true or false, not {}", show(other)),
            )),
        }
    }

    fn uint(&self, obj: &Obj, key: &str, at: &[Seg]) -> Result<Option<u64>, SpecError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.err(
                    &child(at, key),
                    format!("`{key}` must be a non-negative integer, not {}", show(v)),
                )
            }),
        }
    }

    fn choice<T>(
        &self,
        obj: &Obj,
        key: &str,
        at: &[Seg],
        names: &[&str],
        from: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, SpecError> {
        let Some(s) = self.string(obj, key, at)? else { return Ok(None) };
        from(&s).map(Some).ok_or_else(|| {
            self.err(
                &child(at, key),
                format!(
                    "`{key}` must be one of {}, not `{s}`{}",
                    names.join(", "),
                    did_you_mean(suggest(&s, names.iter().copied()))
                ),
            )
        })
    }

    fn object<'o>(
        &self,
        obj: &'o Obj,
        key: &str,
        at: &[Seg],
    ) -> Result<Option<&'o Obj>, SpecError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(other) => Err(self
                .err(&child(at, key), format!("`{key}` must be a mapping, not {}", show(other)))),
        }
    }

    pub(super) fn parse(&self) -> Result<SweepSpec, SpecError> {
        let root = yaml::to_json_value(self.text).map_err(|e| SpecError {
            source: self.source.to_string(),
            line: e.location.map(|l| l.0),
            column: e.location.map(|l| l.1),
            message: e.message.clone(),
        })?;
        let Value::Object(top) = root else {
            return Err(
                self.err(&[], "a sweep file must be a mapping (name:, method:, parameters:, ...)")
            );
        };
        let here: &[Seg] = &[];
        self.check_keys(&top, TOP_KEYS, here, "the sweep")?;

        let name =
            self.string(&top, "name", here)?.ok_or_else(|| self.err(here, "missing `name`"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(self.err(
                &segs!["name"],
                format!("name `{name}` may only use letters, digits, `_`, `.` and `-`"),
            ));
        }
        let description = self.string(&top, "description", here)?;

        let mut metric = MetricSpec::default();
        if let Some(m) = self.object(&top, "metric", here)? {
            let at = segs!["metric"];
            self.check_keys(m, METRIC_KEYS, &at, "metric")?;
            if let Some(n) = self.string(m, "name", &at)? {
                metric.name = n;
            }
            let goal = self.choice(m, "goal", &at, Goal::NAMES, Goal::from_name)?;
            metric.goal = goal.unwrap_or_default();
            metric.custom = self.bool(m, "custom", &at)?.unwrap_or(false);
            if !metric.custom && !msae_shared::metrics::is_standard(&metric.name) {
                // A misspelt metric would run the whole sweep with nothing to rank by.
                return Err(self.err(
                    &segs!["metric", "name"],
                    format!(
                        "unknown metric `{}`{}; standard metrics: {}; a runner's own metric \
                         needs `custom: true`",
                        metric.name,
                        did_you_mean(suggest(
                            &metric.name,
                            msae_shared::metrics::STANDARD.iter().copied()
                        )),
                        msae_shared::metrics::STANDARD.join(", ")
                    ),
                ));
            }
        }

        let method = self
            .choice(&top, "method", here, Method::NAMES, Method::from_name)?
            .ok_or_else(|| {
                self.err(here, format!("missing `method` (one of {})", Method::NAMES.join(", ")))
            })?;

        let run_cap = self.uint(&top, "run_cap", here)?;
        if run_cap == Some(0) {
            return Err(self.err(&segs!["run_cap"], "`run_cap` must be at least 1"));
        }
        if matches!(method, Method::Random | Method::Bayes) && run_cap.is_none() {
            return Err(self.err(
                &segs!["method"],
                format!("method {} needs `run_cap` (the number of trials)", method.name()),
            ));
        }
        let max_concurrent = self.uint(&top, "max_concurrent", here)?;
        if max_concurrent == Some(0) {
            return Err(self.err(&segs!["max_concurrent"], "`max_concurrent` must be at least 1"));
        }
        let seed = self.uint(&top, "seed", here)?.unwrap_or(0);
        let max_attempts = self.uint(&top, "max_attempts", here)?.unwrap_or(3);
        if max_attempts == 0 || max_attempts > u64::from(u32::MAX) {
            return Err(self.err(
                &segs!["max_attempts"],
                format!("`max_attempts` must be at least 1, not {max_attempts}"),
            ));
        }
        let timeout = match top.get("timeout") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                parse_duration(v)
                    .map_err(|m| self.err(&segs!["timeout"], format!("`timeout`: {m}")))?,
            ),
        };

        let mut task = TaskSpec::default();
        if let Some(t) = self.object(&top, "task", here)? {
            let at = segs!["task"];
            self.check_keys(t, TASK_KEYS, &at, "task")?;
            task.kind = self
                .choice(t, "kind", &at, &RunnerKind::ALL.map(RunnerKind::as_str), |s| {
                    s.parse().ok()
                })?
                .unwrap_or_default();
            task.sleep_ms = self.uint(t, "sleep_ms", &at)?.unwrap_or(0);
        }

        let search = self.search(&top, method)?;
        let repeats = self.uint(&top, "repeats", here)?.unwrap_or(1);
        if !(1..=1000).contains(&repeats) {
            return Err(
                self.err(&segs!["repeats"], format!("`repeats` must be 1 to 1000, not {repeats}"))
            );
        }
        let early_terminate = match self.object(&top, "early_terminate", here)? {
            Some(e) => Some(self.early_terminate(e)?),
            None => None,
        };

        let keep_weights = self.keep_weights(&top, here)?;

        let mut base_leaves: HashMap<String, Vec<Seg>> = HashMap::new();
        let mut base = Value::Object(Map::new());
        if let Some(b) = self.object(&top, "base", here)? {
            self.normalize_base(b, &segs!["base"], "", &mut base, &mut base_leaves)?;
        }
        let Value::Object(base) = base else { unreachable!("base is built as an object") };

        let mut parameters = BTreeMap::new();
        if let Some(ps) = self.object(&top, "parameters", here)? {
            for (pname, raw) in ps {
                let at = segs!["parameters", pname.as_str()];
                if !TrialConfig::has_path(pname) {
                    return Err(self.err(
                        &at,
                        format!(
                            "parameter `{pname}` is not a trial-config field{}",
                            did_you_mean(TrialConfig::suggest_path(pname).as_deref())
                        ),
                    ));
                }
                if let Some(b) = base_leaves.keys().find(|b| {
                    *b == pname
                        || b.starts_with(&format!("{pname}."))
                        || pname.starts_with(&format!("{b}."))
                }) {
                    return Err(self.err(
                        &at,
                        format!("parameter `{pname}` is also set in `base` (as `{b}`): keep one"),
                    ));
                }
                parameters.insert(pname.clone(), self.param(pname, raw, &at)?);
            }
        }

        let spec = SweepSpec {
            name,
            description,
            metric,
            method,
            run_cap,
            max_concurrent: max_concurrent.map(|n| n as usize),
            seed,
            base,
            parameters,
            max_attempts: max_attempts as u32,
            timeout,
            task,
            search,
            repeats,
            early_terminate,
            keep_weights,
        };
        if repeats > 1 && spec.early_terminate.is_some() {
            return Err(self.err(
                &segs!["early_terminate"],
                "early_terminate with repeats would prune a point's seeds against each other: use one of them",
            ));
        }
        if let Some(cap) = spec.run_cap
            && repeats > 1
            && !cap.is_multiple_of(repeats)
        {
            return Err(self.err(
                &segs!["run_cap"],
                format!("`run_cap` ({cap}) must be a multiple of `repeats` ({repeats}), so every point trains all its repeats"),
            ));
        }
        if repeats > 1 && spec.parameters.contains_key(crate::search::repeat::SEED) {
            return Err(self.err(
                &segs!["parameters", "seed"],
                "`seed` is what `repeats` varies: sweep it or repeat, not both",
            ));
        }
        self.check_search(&spec)?;
        self.check_points(&spec, &base_leaves)?;
        self.check_evaluations(&spec, &base_leaves)?;
        Ok(spec)
    }

    /// The `search:` block: each setting checked against the range it needs; a block for a
    /// method that reads none of it is refused rather than ignored.
    fn search(&self, top: &Obj, method: Method) -> Result<SearchSettings, SpecError> {
        let mut s = SearchSettings::default();
        let Some(b) = self.object(top, "search", &[])? else { return Ok(s) };
        let at = segs!["search"];
        self.check_keys(b, SEARCH_KEYS, &at, "search")?;
        if matches!(method, Method::Grid | Method::Random) {
            return Err(self.err(
                &at,
                format!(
                    "`search:` configures result-driven methods; method {} reads none of it",
                    method.name()
                ),
            ));
        }
        if let Some(n) = self.uint(b, "population", &at)? {
            if !(2..=10_000).contains(&n) {
                return Err(self.err(
                    &child(&at, "population"),
                    format!("`population` must be 2 to 10000, not {n}"),
                ));
            }
            s.population = n as usize;
        }
        if let Some(n) = self.uint(b, "iterations", &at)? {
            if !(1..=100_000).contains(&n) {
                return Err(self.err(
                    &child(&at, "iterations"),
                    format!("`iterations` must be 1 to 100000, not {n}"),
                ));
            }
            s.iterations = n;
        }
        if let Some(n) = self.uint(b, "startup_trials", &at)? {
            s.startup_trials = n;
        }
        if let Some(x) = self.float(b, "initial_simplex_scale", &at)? {
            if !(x > 0.0 && x <= 1.0) {
                return Err(self.err(
                    &child(&at, "initial_simplex_scale"),
                    format!(
                        "`initial_simplex_scale` must be in (0, 1] (unit-box coordinates), not {x}"
                    ),
                ));
            }
            s.initial_simplex_scale = x;
        }
        if let Some(x) = self.float(b, "temperature", &at)? {
            if x <= 0.0 {
                return Err(self.err(
                    &child(&at, "temperature"),
                    format!("`temperature` must be above 0, not {x}"),
                ));
            }
            s.temperature = x;
        }
        s.seed = self.uint(b, "seed", &at)?;
        Ok(s)
    }

    /// What a result-driven method needs of the parameters.
    fn check_search(&self, spec: &SweepSpec) -> Result<(), SpecError> {
        if !spec.method.is_argmin() {
            return Ok(());
        }
        let space = crate::search::space::Space::from_spec(spec);
        if space.dims.is_empty() {
            return Err(self.err(
                &segs!["parameters"],
                format!(
                    "method {} searches numeric parameters (uniform, log_uniform_values, int_uniform, q_uniform) and there are none: use method: grid",
                    spec.method.name()
                ),
            ));
        }
        let cells = space.cells();
        if spec.method == Method::ParticleSwarm
            && let Some(cap) = spec.run_cap
            && cap < cells * spec.search.population as u64
        {
            return Err(self.err(
                &segs!["run_cap"],
                format!(
                    "`run_cap` ({cap}) is less than one generation of every swarm ({cells} cells x population {}): raise run_cap or lower search.population",
                    spec.search.population
                ),
            ));
        }
        if cells > crate::search::space::MAX_CELLS {
            return Err(self.err(
                &segs!["parameters"],
                format!(
                    "method {} runs one solver per combination of the `values`/categorical parameters; these make {cells}, at most {} are allowed",
                    spec.method.name(),
                    crate::search::space::MAX_CELLS
                ),
            ));
        }
        Ok(())
    }

    /// `keep_weights`: `auto` (default), `all`, `none`, or `{best: N}` with N >= 1.
    fn keep_weights(&self, top: &Obj, here: &[Seg]) -> Result<KeepWeights, SpecError> {
        let at = child(here, "keep_weights");
        let wrong = |v: &Value| {
            self.err(
                &at,
                format!("`keep_weights` must be auto, all, none or {{best: N}}, not {}", show(v)),
            )
        };
        match top.get("keep_weights") {
            None | Some(Value::Null) => Ok(KeepWeights::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Ok(KeepWeights::Auto),
                "all" => Ok(KeepWeights::All),
                "none" => Ok(KeepWeights::None),
                _ => Err(self.err(
                    &at,
                    format!(
                        "`keep_weights` must be auto, all, none or {{best: N}}, not {s:?}{}",
                        did_you_mean(suggest(s, ["auto", "all", "none"].into_iter()))
                    ),
                )),
            },
            Some(Value::Object(m)) => {
                self.check_keys(m, &["best"], &at, "keep_weights")?;
                match self.uint(m, "best", &at)? {
                    Some(n) if n >= 1 => Ok(KeepWeights::Best(n)),
                    Some(n) => Err(self.err(
                        &child(&at, "best"),
                        format!("`keep_weights.best` must be at least 1, not {n} (use none)"),
                    )),
                    None => Err(wrong(&Value::Object(m.clone()))),
                }
            }
            Some(other) => Err(wrong(other)),
        }
    }

    /// The `early_terminate:` block: its `type` first, then that type's keys and values.
    fn early_terminate(&self, e: &Obj) -> Result<EarlyTerminate, SpecError> {
        let at = segs!["early_terminate"];
        let kind = self
            .choice(e, "type", &at, EarlyTerminate::NAMES, |s| {
                EarlyTerminate::NAMES.iter().copied().find(|n| *n == s)
            })?
            .ok_or_else(|| {
                self.err(&at, "early_terminate needs `type` (hyperband, asha or median)")
            })?;
        let keys = match kind {
            "hyperband" => HYPERBAND_KEYS,
            "asha" => ASHA_KEYS,
            _ => MEDIAN_KEYS,
        };
        self.check_keys(e, keys, &at, &format!("early_terminate (type {kind})"))?;
        // A step count or a number of brackets or trials: an integer, at least `min`.
        let at_least = |key: &str, min: u64| -> Result<Option<u64>, SpecError> {
            match self.uint(e, key, &at)? {
                Some(v) if v < min => Err(self.err(
                    &child(&at, key),
                    format!("early_terminate: `{key}` must be at least {min}, not {v}"),
                )),
                v => Ok(v),
            }
        };
        let rule = match kind {
            "hyperband" => {
                let eta = at_least("eta", 2)?.unwrap_or(3);
                let min_iter = at_least("min_iter", 1)?;
                let max_iter = at_least("max_iter", 1)?;
                let s = at_least("s", 1)?;
                match (min_iter, max_iter, s) {
                    (None, None, _) => {
                        return Err(self.err(
                            &at,
                            "hyperband needs `min_iter` (the first bracket), or `max_iter` \
                             with `s` (the number of brackets)",
                        ));
                    }
                    (None, Some(_), None) => {
                        return Err(self.err(
                            &child(&at, "max_iter"),
                            "hyperband with `max_iter` and no `min_iter` needs `s` (the number \
                             of brackets below max_iter)",
                        ));
                    }
                    (Some(min), Some(max), _) if min >= max => {
                        return Err(self.err(
                            &child(&at, "min_iter"),
                            format!(
                                "hyperband: min_iter ({min}) must be less than max_iter ({max})"
                            ),
                        ));
                    }
                    _ => {}
                }
                let rule = EarlyTerminate::Hyperband { min_iter, max_iter, s, eta };
                if rule.rungs().is_empty() {
                    return Err(self.err(
                        &child(&at, "max_iter"),
                        format!("hyperband: no bracket, max_iter / eta is below 1 (eta {eta})"),
                    ));
                }
                rule
            }
            "asha" => {
                let min_steps = at_least("min_steps", 1)?.ok_or_else(|| {
                    self.err(&at, "asha needs `min_steps` (the step of the first rung)")
                })?;
                let reduction_factor = at_least("reduction_factor", 2)?.unwrap_or(3);
                let max_steps = at_least("max_steps", 1)?;
                if let Some(max) = max_steps
                    && max <= min_steps
                {
                    return Err(self.err(
                        &child(&at, "max_steps"),
                        format!(
                            "asha: max_steps ({max}) must be greater than min_steps ({min_steps})"
                        ),
                    ));
                }
                EarlyTerminate::Asha { min_steps, reduction_factor, max_steps }
            }
            _ => EarlyTerminate::Median {
                warmup_steps: self.uint(e, "warmup_steps", &at)?.unwrap_or(0),
                min_trials: at_least("min_trials", 1)?.unwrap_or(5),
            },
        };
        Ok(rule)
    }

    /// Early termination judges the evaluations made during training: a sweep whose trials
    /// make none (`eval_every: 0` in base, not swept) would prune nothing, silently.
    fn check_evaluations(
        &self,
        spec: &SweepSpec,
        base_leaves: &HashMap<String, Vec<Seg>>,
    ) -> Result<(), SpecError> {
        if spec.early_terminate.is_none() || spec.parameters.contains_key("eval_every") {
            return Ok(());
        }
        if spec.base.get("eval_every").and_then(Value::as_u64) == Some(0) {
            let at = base_leaves.get("eval_every").cloned().unwrap_or_default();
            return Err(self.err(
                &at,
                "early_terminate judges the evaluations made during training, and \
                 `eval_every: 0` makes none: set eval_every to a step count",
            ));
        }
        Ok(())
    }

    fn float(&self, obj: &Obj, key: &str, at: &[Seg]) -> Result<Option<f64>, SpecError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).map(Some).ok_or_else(|| {
                self.err(&child(at, key), format!("`{key}` must be a number, not {}", show(v)))
            }),
        }
    }

    /// Fold `b` (dotted or nested keys) into `out`, checking each key is a config path and
    /// recording where each leaf was written.
    fn normalize_base(
        &self,
        b: &Obj,
        at: &[Seg],
        prefix: &str,
        out: &mut Value,
        leaves: &mut HashMap<String, Vec<Seg>>,
    ) -> Result<(), SpecError> {
        for (k, v) in b {
            let full = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            let here = child(at, k);
            if !TrialConfig::has_path(&full) {
                return Err(self.err(
                    &here,
                    format!(
                        "`{full}` in base is not a trial-config field{}",
                        did_you_mean(TrialConfig::suggest_path(&full).as_deref())
                    ),
                ));
            }
            if let (Value::Object(inner), Some(Value::Object(_))) = (v, default_at(&full)) {
                self.normalize_base(inner, &here, &full, out, leaves)?;
                continue;
            }
            if let Some(prev) = leaves.keys().find(|p| {
                *p == &full
                    || p.starts_with(&format!("{full}."))
                    || full.starts_with(&format!("{p}."))
            }) {
                return Err(
                    self.err(&here, format!("`{full}` is set twice in base (also as `{prev}`)"))
                );
            }
            let value = normalize_value(&full, v.clone());
            // Type errors are independent of other fields, so check each leaf on its own: the
            // whole-config error of serde would not say which key is wrong.
            let mut single = Value::Object(Map::new());
            set_path(&mut single, &full, value.clone())
                .map_err(|e| self.err(&here, e.to_string()))?;
            if let Err(e) = TrialConfig::from_value(single) {
                return Err(self
                    .err(&here, format!("base `{full}`: value {}: {}", show(&value), e.message)));
            }
            set_path(out, &full, value).map_err(|e| self.err(&here, e.to_string()))?;
            leaves.insert(full, here);
        }
        Ok(())
    }

    fn param(&self, pname: &str, raw: &Value, at: &[Seg]) -> Result<ParamSpec, SpecError> {
        let Value::Object(p) = raw else {
            return Err(self.err(
                at,
                format!("parameter `{pname}` must be a mapping with `value`, `values` or `distribution`, not {}", show(raw)),
            ));
        };
        self.check_keys(p, PARAM_KEYS, at, &format!("parameter `{pname}`"))?;
        let has = |k: &str| p.contains_key(k);
        let forbid = |keys: &[&str], why: &str| -> Result<(), SpecError> {
            match keys.iter().find(|k| has(k)) {
                Some(k) => {
                    Err(self.err(&child(at, k), format!("parameter `{pname}`: `{k}` {why}")))
                }
                None => Ok(()),
            }
        };

        if has("value") {
            forbid(
                &["values", "distribution", "min", "max", "q", "probabilities"],
                "cannot be combined with `value`",
            )?;
            return Ok(ParamSpec::Value(normalize_value(pname, p["value"].clone())));
        }

        let dist_name = self.choice(p, "distribution", at, Distribution::NAMES, |s| {
            Some(s.to_string()).filter(|s| Distribution::NAMES.contains(&s.as_str()))
        })?;
        let dist_name = match dist_name {
            Some(d) => d,
            None if has("values") => {
                forbid(&["min", "max", "q"], "cannot be combined with `values`")?;
                let values = self.values(p, pname, at)?;
                return match self.probabilities(p, pname, at, values.len())? {
                    Some(probs) => Ok(ParamSpec::Distribution(Distribution::Categorical {
                        values,
                        probabilities: Some(probs),
                    })),
                    None => Ok(ParamSpec::Values(values)),
                };
            }
            // W&B infers the distribution from the keys present.
            None if has("q") => "q_uniform".to_string(),
            None if has("min") || has("max") => {
                let ints = ["min", "max"]
                    .iter()
                    .all(|k| p.get(*k).is_some_and(|v| v.is_i64() || v.is_u64()));
                if ints { "int_uniform" } else { "uniform" }.to_string()
            }
            None => {
                return Err(self.err(
                    at,
                    format!("parameter `{pname}` needs `value`, `values` or `distribution`"),
                ));
            }
        };

        let num = |k: &str| -> Result<f64, SpecError> {
            match p.get(k) {
                None => Err(self.err(at, format!("parameter `{pname}`: {dist_name} needs `{k}`"))),
                Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    self.err(
                        &child(at, k),
                        format!(
                            "parameter `{pname}`: `{k}` must be a finite number, not {}",
                            show(v)
                        ),
                    )
                }),
            }
        };
        let min_max = || -> Result<(f64, f64), SpecError> {
            let (min, max) = (num("min")?, num("max")?);
            if min >= max {
                return Err(self.err(
                    &child(at, "min"),
                    format!("parameter `{pname}`: min ({min}) must be less than max ({max})"),
                ));
            }
            Ok((min, max))
        };
        let dist = match dist_name.as_str() {
            "categorical" => {
                forbid(&["min", "max", "q"], "does not apply to categorical")?;
                if !has("values") {
                    return Err(
                        self.err(at, format!("parameter `{pname}`: categorical needs `values`"))
                    );
                }
                let values = self.values(p, pname, at)?;
                let probabilities = self.probabilities(p, pname, at, values.len())?;
                Distribution::Categorical { values, probabilities }
            }
            other => {
                forbid(&["values", "probabilities"], &format!("does not apply to {other}"))?;
                if other != "q_uniform" {
                    forbid(&["q"], &format!("does not apply to {other} (only to q_uniform)"))?;
                }
                let (min, max) = min_max()?;
                match other {
                    "uniform" => Distribution::Uniform { min, max },
                    "log_uniform_values" => {
                        if min <= 0.0 {
                            return Err(self.err(&child(at, "min"), format!("parameter `{pname}`: log_uniform_values needs min > 0, not {min}")));
                        }
                        Distribution::LogUniformValues { min, max }
                    }
                    "int_uniform" => {
                        for k in ["min", "max"] {
                            if !p[k].is_i64()
                                && !p[k].is_u64()
                                && p[k].as_f64().is_none_or(|x| x.fract() != 0.0)
                            {
                                return Err(self.err(&child(at, k), format!("parameter `{pname}`: int_uniform needs an integer `{k}`, not {}", show(&p[k]))));
                            }
                        }
                        Distribution::IntUniform { min: min as i64, max: max as i64 }
                    }
                    "q_uniform" => {
                        let q = if has("q") { num("q")? } else { 1.0 };
                        if q <= 0.0 {
                            return Err(self.err(
                                &child(at, "q"),
                                format!("parameter `{pname}`: q must be > 0, not {q}"),
                            ));
                        }
                        Distribution::QUniform { min, max, q }
                    }
                    _ => unreachable!("distribution names are checked"),
                }
            }
        };
        Ok(ParamSpec::Distribution(dist))
    }

    fn values(&self, p: &Obj, pname: &str, at: &[Seg]) -> Result<Vec<Value>, SpecError> {
        match &p["values"] {
            Value::Array(vs) if !vs.is_empty() => {
                Ok(vs.iter().map(|v| normalize_value(pname, v.clone())).collect())
            }
            other => Err(self.err(
                &child(at, "values"),
                format!(
                    "parameter `{pname}`: `values` must be a non-empty list, not {}",
                    show(other)
                ),
            )),
        }
    }

    fn probabilities(
        &self,
        p: &Obj,
        pname: &str,
        at: &[Seg],
        n: usize,
    ) -> Result<Option<Vec<f64>>, SpecError> {
        let Some(raw) = p.get("probabilities") else { return Ok(None) };
        let here = child(at, "probabilities");
        let Value::Array(items) = raw else {
            return Err(self.err(
                &here,
                format!("parameter `{pname}`: `probabilities` must be a list of numbers"),
            ));
        };
        let mut probs = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item.as_f64() {
                Some(x) if x.is_finite() && x >= 0.0 => probs.push(x),
                _ => {
                    let mut at_i = here.clone();
                    at_i.push(Seg::Index(i));
                    return Err(self.err(
                        &at_i,
                        format!(
                            "parameter `{pname}`: probability {} must be a number >= 0",
                            show(item)
                        ),
                    ));
                }
            }
        }
        if probs.len() != n {
            return Err(self.err(
                &here,
                format!("parameter `{pname}`: {} probabilities for {n} values", probs.len()),
            ));
        }
        let sum: f64 = probs.iter().sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(
                self.err(&here, format!("parameter `{pname}`: probabilities sum to {sum}, not 1"))
            );
        }
        Ok(Some(probs))
    }
}

pub(super) fn child(at: &[Seg], key: &str) -> Vec<Seg> {
    let mut p = at.to_vec();
    p.push(Seg::Key(key.to_string()));
    p
}

pub(super) fn join(a: &[Seg], b: &[Seg]) -> Vec<Seg> {
    let mut p = a.to_vec();
    p.extend_from_slice(b);
    p
}

/// Seconds as a number, or a string of `<number><unit>` parts (ms, s, m, h, d): "90s", "1h30m".
fn parse_duration(v: &Value) -> Result<Duration, String> {
    let secs = match v {
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Value::String(s) => {
            let s = s.trim();
            let mut total = 0.0;
            let mut rest = s;
            if rest.is_empty() {
                return Err("empty duration".into());
            }
            while !rest.is_empty() {
                let num_len =
                    rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
                let unit_len = rest[num_len..]
                    .find(|c: char| c.is_ascii_digit() || c == '.')
                    .unwrap_or(rest.len() - num_len);
                let (num, unit) = (&rest[..num_len], rest[num_len..num_len + unit_len].trim());
                let x: f64 = num
                    .parse()
                    .map_err(|_| format!("`{s}` is not a duration like 90s, 30m, 2h or 1h30m"))?;
                let scale = match unit {
                    "" | "s" | "sec" | "secs" => 1.0,
                    "ms" => 1e-3,
                    "m" | "min" | "mins" => 60.0,
                    "h" | "hr" | "hours" => 3600.0,
                    "d" | "days" => 86400.0,
                    u => return Err(format!("unknown unit `{u}` in `{s}` (use ms, s, m, h or d)")),
                };
                total += x * scale;
                rest = &rest[num_len + unit_len..];
            }
            total
        }
        other => {
            return Err(format!(
                "{} is not a duration (seconds, or like 90s, 30m, 2h)",
                show(other)
            ));
        }
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{} must be a positive duration", show(v)));
    }
    Ok(Duration::from_secs_f64(secs))
}
