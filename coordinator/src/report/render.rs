//! The report as text: an aligned table for people, RFC 4180 CSV for spreadsheets.

use super::columns::{CONFIG_PREFIX, flatten};
use super::{Report, ReportFormat};
use crate::model::TrialStatus;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

impl Report {
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

    /// The metric columns' names, in order.
    #[cfg(test)]
    pub(super) fn metric_columns(&self) -> Vec<String> {
        self.column_set().metrics.into_iter().map(|m| m.name).collect()
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
        let cols = self.column_set();
        if self.rows.is_empty() {
            // Rows can only be missing for want of completed trials: `top` is at least 1.
            out.push_str("no completed trials yet\n");
        } else {
            let mut header: Vec<String> = vec!["rank".into(), "trial".into()];
            header.extend(cols.params.iter().cloned());
            header.extend(cols.metrics.iter().map(|m| m.header.clone()));
            header.extend(["status", "attempts", "worker", "duration", "files"].map(String::from));
            header.extend(cols.config.iter().map(|p| format!("{CONFIG_PREFIX}{p}")));
            // Numbers right-aligned; parameters and settings are right-aligned only if every
            // value is a number.
            let configs: Vec<BTreeMap<String, Value>> = if cols.config.is_empty() {
                Vec::new()
            } else {
                self.rows
                    .iter()
                    .map(|r| r.config.as_ref().map(flatten).unwrap_or_default())
                    .collect()
            };
            let mut right = vec![true; 2];
            right.extend(
                cols.params.iter().map(|p| numeric(self.rows.iter().map(|r| r.params.get(p)))),
            );
            right.extend(cols.metrics.iter().map(|_| true));
            right.extend([false, true, false, true, false]);
            right.extend(cols.config.iter().map(|p| numeric(configs.iter().map(|c| c.get(p)))));
            let mut body = Cells::new(header.len(), self.rows.len());
            for (i, r) in self.rows.iter().enumerate() {
                body.push(r.rank);
                body.push(r.trial);
                for p in &cols.params {
                    match r.params.get(p) {
                        Some(v) => body.push(show_value(v)),
                        None => body.push("-"),
                    }
                }
                for m in &cols.metrics {
                    match r.metrics.get(&m.name) {
                        Some(Some(v)) => body.push(fmt_num(*v)),
                        Some(None) => body.push("nan"),
                        None => body.push("-"),
                    }
                }
                body.push(status_name(r.status));
                body.push(r.attempts);
                body.push(r.worker.as_deref().unwrap_or("-"));
                match r.duration_s {
                    Some(d) => body.push(fmt_duration(d)),
                    None => body.push("-"),
                }
                body.push(r.files.as_deref().unwrap_or("-"));
                for p in &cols.config {
                    match configs.get(i).and_then(|c| c.get(p)) {
                        Some(v) => body.push(show_value(v)),
                        None => body.push("-"),
                    }
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
            let header: Vec<String> =
                ["trial", "attempts", "worker", "reason"].map(String::from).to_vec();
            let mut body = Cells::new(header.len(), self.failed.len());
            for f in &self.failed {
                body.push(f.trial);
                body.push(f.attempts);
                body.push(f.worker.as_deref().unwrap_or("-"));
                body.push(reason_line(&f.reasons));
            }
            write_aligned(&mut out, &header, &body, &[true, true, false, false]);
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
        let cols = self.column_set();
        let mut header: Vec<String> = vec!["rank".into(), "trial".into()];
        header.extend(cols.params.iter().cloned());
        header.extend(cols.metrics.iter().map(|m| m.header.clone()));
        header.extend(["status", "attempts", "worker", "duration_s", "files"].map(String::from));
        header.extend(cols.config.iter().map(|p| format!("{CONFIG_PREFIX}{p}")));
        header.push("error".into());
        let mut out = String::new();
        csv_line(&mut out, &header);
        let settings = |config: Option<&Value>, cells: &mut Vec<String>| {
            let flat = config.map(flatten).unwrap_or_default();
            cells.extend(
                cols.config.iter().map(|p| flat.get(p).map(show_value).unwrap_or_default()),
            );
        };
        for r in &self.rows {
            let mut cells = vec![r.rank.to_string(), r.trial.to_string()];
            cells.extend(
                cols.params.iter().map(|p| r.params.get(p).map(show_value).unwrap_or_default()),
            );
            cells.extend(cols.metrics.iter().map(|m| match r.metrics.get(&m.name) {
                Some(Some(v)) => v.to_string(),
                Some(None) => "NaN".into(),
                None => String::new(),
            }));
            cells.extend([
                status_name(r.status).into(),
                r.attempts.to_string(),
                r.worker.clone().unwrap_or_default(),
                r.duration_s.map(|d| d.to_string()).unwrap_or_default(),
                r.files.clone().unwrap_or_default(),
            ]);
            settings(r.config.as_ref(), &mut cells);
            cells.push(String::new());
            csv_line(&mut out, &cells);
        }
        for f in &self.failed {
            let mut cells = vec![String::new(), f.trial.to_string()];
            cells.extend(
                cols.params.iter().map(|p| f.params.get(p).map(show_value).unwrap_or_default()),
            );
            cells.extend(cols.metrics.iter().map(|_| String::new()));
            cells.extend([
                "failed".into(),
                f.attempts.to_string(),
                f.worker.clone().unwrap_or_default(),
                String::new(),
                String::new(),
            ]);
            settings(f.config.as_ref(), &mut cells);
            cells.push(f.reasons.join("\n"));
            csv_line(&mut out, &cells);
        }
        out
    }
}

/// Whether a column of values is right-aligned: every value present is a number.
fn numeric<'a>(mut values: impl Iterator<Item = Option<&'a Value>>) -> bool {
    values.all(|v| v.is_none_or(Value::is_number))
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
pub(super) fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => fmt_num(n.as_f64().unwrap_or(f64::NAN)),
        other => other.to_string(),
    }
}

/// Six significant digits, trailing zeros trimmed; scientific notation for very small or
/// large magnitudes.
pub(super) fn fmt_num(x: f64) -> String {
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

pub(super) fn fmt_duration(s: f64) -> String {
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
