//! Which columns a report carries and in what order: `--metrics` and `--config`, the full trial
//! config flattened into dotted paths, and the one column order the table and the CSV share
//! (identity, swept parameters, metrics, status, attempts, worker, duration, the rest of the
//! config).

use super::{Report, ReportFormat};
use msae_shared::metrics;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Which metrics each row carries (`report --metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MetricColumns {
    /// The ranking metric and the standard metrics the metric table marks for the report: what
    /// fits a terminal.
    #[default]
    Key,
    /// Every metric the trial reported.
    All,
    /// These names (in the report's column order, not the order given) and the ranking metric.
    Pick(Vec<String>),
}

impl MetricColumns {
    /// The selection a format shows when none is asked for: machine formats carry everything.
    pub fn default_for(format: ReportFormat) -> MetricColumns {
        match format {
            ReportFormat::Table => MetricColumns::Key,
            ReportFormat::Csv | ReportFormat::Json => MetricColumns::All,
        }
    }

    /// `key`, `all`, or metric names separated by commas.
    pub fn parse(text: &str) -> Result<MetricColumns, String> {
        match text.trim() {
            "key" => return Ok(MetricColumns::Key),
            "all" => return Ok(MetricColumns::All),
            _ => {}
        }
        let mut names: Vec<String> = Vec::new();
        for name in text.split(',').map(str::trim) {
            if name.is_empty() {
                return Err(format!(
                    "`{text}` is not `key`, `all` or metric names separated by commas (e.g. fvu,l0)"
                ));
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        Ok(MetricColumns::Pick(names))
    }

    /// The text [`MetricColumns::parse`] reads back.
    pub fn name(&self) -> String {
        match self {
            MetricColumns::Key => "key".into(),
            MetricColumns::All => "all".into(),
            MetricColumns::Pick(names) => names.join(","),
        }
    }

    /// Whether a row keeps `metric` when the report ranks by `rank_metric`.
    pub fn keeps(&self, metric: &str, rank_metric: &str) -> bool {
        metric == rank_metric
            || match self {
                MetricColumns::Key => metrics::get(metric).is_some_and(|m| m.report),
                MetricColumns::All => true,
                MetricColumns::Pick(names) => names.iter().any(|n| n == metric),
            }
    }

    /// Refuses a picked name that is no standard metric, not the sweep's own and reported by
    /// no trial, suggesting the closest: a typo would otherwise give a column of `-`.
    pub fn check(&self, sweep_metric: &str, reported: &BTreeSet<&str>) -> Result<(), String> {
        if let MetricColumns::Pick(names) = self {
            for name in names {
                super::check_known_metric(name, sweep_metric, reported)?;
            }
        }
        Ok(())
    }
}

/// How much of each trial's config the report carries (`report --config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ConfigColumns {
    /// The swept parameters only.
    #[default]
    Swept,
    /// The whole resolved trial config: the swept parameters, then every other setting as a
    /// `config.PATH` column.
    Full,
}

impl ConfigColumns {
    /// The selection a format shows when none is asked for.
    pub fn default_for(format: ReportFormat) -> ConfigColumns {
        match format {
            ReportFormat::Table => ConfigColumns::Swept,
            ReportFormat::Csv | ReportFormat::Json => ConfigColumns::Full,
        }
    }

    /// The name as the CLI and the Report RPC spell it.
    pub fn name(self) -> &'static str {
        match self {
            ConfigColumns::Swept => "swept",
            ConfigColumns::Full => "full",
        }
    }

    pub fn from_name(name: &str) -> Option<ConfigColumns> {
        [ConfigColumns::Swept, ConfigColumns::Full].into_iter().find(|c| c.name() == name)
    }
}

/// Both column selections of one report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Columns {
    pub metrics: MetricColumns,
    pub config: ConfigColumns,
}

impl Columns {
    /// The selections asked for, each defaulting to what `format` shows.
    pub fn for_format(
        format: ReportFormat,
        metrics: Option<MetricColumns>,
        config: Option<ConfigColumns>,
    ) -> Columns {
        Columns {
            metrics: metrics.unwrap_or_else(|| MetricColumns::default_for(format)),
            config: config.unwrap_or_else(|| ConfigColumns::default_for(format)),
        }
    }
}

/// The leaves of a config object under dotted paths (`data.synthetic.input_dim`). Arrays are
/// leaves: their elements have no names to make a column of.
pub fn flatten(config: &Value) -> BTreeMap<String, Value> {
    fn walk(value: &Value, path: &mut String, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, v) in map {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    walk(v, path, out);
                    path.truncate(len);
                }
            }
            leaf => {
                out.insert(path.clone(), leaf.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    if !config.is_null() {
        walk(config, &mut String::new(), &mut out);
    }
    out
}

/// Metric names in column order: the metric table's order, then other names alphabetically.
pub fn metric_order<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let names: BTreeSet<&str> = names.into_iter().collect();
    let standard = metrics::STANDARD.iter().copied().filter(|m| names.contains(m));
    let extra = names.iter().copied().filter(|m| metrics::get(m).is_none());
    standard.chain(extra).map(str::to_string).collect()
}

/// A metric column: the metric's name and the header it shows under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricColumn {
    pub name: String,
    /// The name, or `metric.NAME` where a swept parameter has the same name (sweeping `steps`
    /// and reporting the `steps` metric).
    pub header: String,
}

/// The variable columns of a rendered report, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSet {
    /// Swept parameters, alphabetically.
    pub params: Vec<String>,
    pub metrics: Vec<MetricColumn>,
    /// Config paths other than the swept parameters (and what lies below them); shown as
    /// `config.PATH`.
    pub config: Vec<String>,
}

/// The prefix of the config columns that are not swept parameters: it keeps them apart from
/// metrics of the same name (`steps`, the setting, and `steps`, the metric).
pub const CONFIG_PREFIX: &str = "config.";

impl Report {
    /// The columns this report's rows fill: the ranking metric always, every other metric some
    /// row carries, and config paths only where rows carry a config.
    pub fn column_set(&self) -> ColumnSet {
        let params: BTreeSet<&str> = self
            .rows
            .iter()
            .flat_map(|r| r.params.keys())
            .chain(self.failed.iter().flat_map(|f| f.params.keys()))
            .map(String::as_str)
            .collect();
        let present = self
            .rows
            .iter()
            .flat_map(|r| r.metrics.keys().map(String::as_str))
            .chain([self.metric.as_str()]);
        let metrics = metric_order(present)
            .into_iter()
            .map(|name| {
                let header = if params.contains(name.as_str()) {
                    format!("metric.{name}")
                } else {
                    name.clone()
                };
                MetricColumn { name, header }
            })
            .collect();
        let swept = |path: &str| {
            params.iter().any(|p| {
                path == *p || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'.'))
            })
        };
        let config: BTreeSet<String> = self
            .rows
            .iter()
            .filter_map(|r| r.config.as_ref())
            .chain(self.failed.iter().filter_map(|f| f.config.as_ref()))
            .flat_map(|c| flatten(c).into_keys())
            .filter(|path| !swept(path))
            .collect();
        ColumnSet {
            params: params.into_iter().map(str::to_string).collect(),
            metrics,
            config: config.into_iter().collect(),
        }
    }

    /// Drops the metrics `columns` does not keep from every row (after narrowing, which may
    /// need metrics the rendered report does not show).
    pub fn keep_metrics(&mut self, columns: &MetricColumns) {
        let rank = self.metric.clone();
        for row in &mut self.rows {
            row.metrics.retain(|m, _| columns.keeps(m, &rank));
        }
    }

    /// Every metric name some ranked row reports.
    pub fn reported_metrics(&self) -> BTreeSet<&str> {
        self.rows.iter().flat_map(|r| r.metrics.keys().map(String::as_str)).collect()
    }
}
