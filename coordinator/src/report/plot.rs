//! `report --plot FILE.svg|FILE.png`: one image of a sweep. A panel per swept parameter (the
//! ranking metric against it), the Pareto frontier of two metrics (FVU against L0 unless
//! `--pareto` names others; the frontier comes from [`Report::pareto`], the code `--pareto`
//! runs), and the best trials in parallel coordinates, coloured by the metric.
//!
//! Drawn with plotters. Text is laid out with DejaVu Sans compiled into the binary, so a PNG
//! comes out the same on a machine without any font installed; an SVG names the family and
//! keeps its text as text.

use super::Report;
use crate::model::TrialStatus;
use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;
use std::path::{Path, PathBuf};

mod axis;
mod panels;

use axis::Scale;

/// The family every text of a plot is set in (registered with the embedded font).
const FONT: &str = "sans-serif";
/// Width of the image; rows of panels share it.
const WIDTH: u32 = 1440;
const TITLE_HEIGHT: u32 = 44;
const ROW_HEIGHT: u32 = 380;
const PARALLEL_HEIGHT: u32 = 440;
/// Panels in one row at most.
const COLUMNS: usize = 3;
/// Trials in the parallel-coordinates view without `--top`.
const DEFAULT_TOP: usize = 10;

/// The image formats `--plot` writes, known by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotFormat {
    Svg,
    Png,
}

impl PlotFormat {
    /// The format `path`'s extension names (either case); an error naming what it got.
    pub fn of(path: &Path) -> Result<PlotFormat, String> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext.to_ascii_lowercase().as_str() {
            "svg" => Ok(PlotFormat::Svg),
            "png" => Ok(PlotFormat::Png),
            "" => Err(format!(
                "`{}` has no extension; a plot is written as FILE.svg or FILE.png",
                path.display()
            )),
            _ => Err(format!(
                "cannot plot to a .{ext} file (`{}`); a plot is written as FILE.svg or FILE.png",
                path.display()
            )),
        }
    }
}

/// `--plot FILE`: a path whose extension is a format [`PlotFormat::of`] knows.
pub fn parse_target(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    PlotFormat::of(&path)?;
    Ok(path)
}

/// What the plot shows besides the report itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlotOptions {
    /// Trials in the parallel-coordinates view (default 10).
    pub top: Option<usize>,
    /// The frontier's metrics, as `--pareto X,Y`: X drawn up, Y across (default fvu, l0).
    pub frontier: Option<(String, String)>,
}

/// What a plot drew, for the line that says where it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drawn {
    pub trials: usize,
    pub panels: usize,
}

impl std::fmt::Display for Drawn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} trials in {} panels", self.trials, self.panels)
    }
}

/// Draws `report` into `path`, in the format its extension names.
pub fn write(report: &Report, path: &Path, options: &PlotOptions) -> anyhow::Result<Drawn> {
    let format = PlotFormat::of(path).map_err(anyhow::Error::msg)?;
    let (bytes, drawn) = render(report, format, options)?;
    std::fs::write(path, bytes).with_context(|| format!("writing the plot {}", path.display()))?;
    Ok(drawn)
}

/// The image file's bytes.
pub fn render(
    report: &Report,
    format: PlotFormat,
    options: &PlotOptions,
) -> anyhow::Result<(Vec<u8>, Drawn)> {
    register_font()?;
    let plan = Plan::new(report, options)?;
    let (w, h) = plan.size();
    let failed = |e: String| anyhow::anyhow!("drawing the plot: {e}");
    let bytes = match format {
        PlotFormat::Svg => {
            let mut text = String::new();
            {
                let root = SVGBackend::with_string(&mut text, (w, h)).into_drawing_area();
                plan.draw(&root).map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            text.into_bytes()
        }
        PlotFormat::Png => {
            let mut rgb = vec![0u8; (w * h * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
                plan.draw(&root).map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            encode_png(&rgb, w, h)?
        }
    };
    Ok((bytes, plan.drawn()))
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder.write_header().context("encoding the PNG")?;
    writer.write_image_data(rgb).context("encoding the PNG")?;
    writer.finish().context("encoding the PNG")?;
    Ok(out)
}

/// Makes the embedded font the one plotters lays text out with (once per process).
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    anyhow::ensure!(ok, "the embedded plot font could not be read");
    Ok(())
}

/// One trial as the plot sees it.
#[derive(Debug, Clone)]
struct Point<'a> {
    trial: u64,
    /// The ranking metric (finite).
    value: f64,
    pruned: bool,
    params: &'a std::collections::BTreeMap<String, Value>,
}

/// A swept parameter's panel.
#[derive(Debug, Clone)]
struct ParamPanel {
    name: String,
    scale: Scale,
}

/// The frontier panel's data.
#[derive(Debug, Clone)]
struct Frontier {
    /// Drawn up (`--pareto` X).
    up: String,
    /// Drawn across (`--pareto` Y; the frontier is sorted along it).
    across: String,
    /// Every trial with both metrics: (across, up).
    points: Vec<(f64, f64)>,
    /// The frontier, in order along `across`.
    line: Vec<(f64, f64)>,
}

/// Everything the image shows, worked out before drawing.
struct Plan<'a> {
    report: &'a Report,
    points: Vec<Point<'a>>,
    metric_scale: Scale,
    params: Vec<ParamPanel>,
    frontier: Option<Frontier>,
    /// The best trials, best first (indexes into `points`).
    top: Vec<usize>,
}

impl<'a> Plan<'a> {
    fn new(report: &'a Report, options: &PlotOptions) -> anyhow::Result<Plan<'a>> {
        let points: Vec<Point> = report
            .rows
            .iter()
            .filter_map(|r| {
                let value = r.metrics.get(&report.metric).copied().flatten()?;
                Some(Point {
                    trial: r.trial,
                    value,
                    pruned: r.status == TrialStatus::Pruned,
                    params: &r.params,
                })
            })
            .collect();
        anyhow::ensure!(
            !points.is_empty(),
            "nothing to plot: no ranked trial of sweep {} reports a finite {}",
            report.sweep,
            report.metric
        );
        let values: Vec<f64> = points.iter().map(|p| p.value).collect();
        let metric_scale = Scale::numeric(&values, None).expect("finite values");
        let names = report.column_set().params;
        let params = names
            .into_iter()
            .filter_map(|name| {
                let values: Vec<&Value> =
                    points.iter().filter_map(|p| p.params.get(&name)).collect();
                let hint = report.param_scales.get(&name).copied();
                Scale::of_values(&values, hint).map(|scale| ParamPanel { name, scale })
            })
            .collect();
        let (up, across) = options
            .frontier
            .clone()
            .unwrap_or_else(|| (super::metrics::FVU.to_string(), super::L0.to_string()));
        let frontier = frontier(report, &up, &across);
        // Rows are ranked: completed trials first, best first.
        let n = options.top.unwrap_or(DEFAULT_TOP).min(points.len());
        Ok(Plan { report, points, metric_scale, params, frontier, top: (0..n).collect() })
    }

    /// The panels in rows: the parameters' then the frontier, at most [`COLUMNS`] a row.
    fn grid(&self) -> Vec<usize> {
        let cells = self.params.len() + usize::from(self.frontier.is_some());
        let columns = if cells == 4 { 2 } else { COLUMNS };
        let mut rows = vec![columns; cells / columns];
        if !cells.is_multiple_of(columns) {
            rows.push(cells % columns);
        }
        rows
    }

    fn has_parallel(&self) -> bool {
        !self.params.is_empty() && !self.top.is_empty()
    }

    fn size(&self) -> (u32, u32) {
        let rows = self.grid().len() as u32;
        let parallel = if self.has_parallel() { PARALLEL_HEIGHT } else { 0 };
        (WIDTH, TITLE_HEIGHT + rows * ROW_HEIGHT + parallel)
    }

    fn drawn(&self) -> Drawn {
        let panels = self.params.len()
            + usize::from(self.frontier.is_some())
            + usize::from(self.has_parallel());
        Drawn { trials: self.points.len(), panels }
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let (title, body) = root.split_vertically(TITLE_HEIGHT);
        let r = self.report;
        let pruned =
            if self.points.iter().any(|p| p.pruned) { ", orange rings: pruned early" } else { "" };
        title.draw_text(
            &format!(
                "sweep {}: {} ranked trials of {} by {} ({}); red: the best{pruned}",
                r.sweep,
                self.points.len(),
                r.counts.total,
                r.metric,
                r.goal.name()
            ),
            &(FONT, 22).into_font().color(&BLACK).pos(text_pos(HPos::Center, VPos::Center)),
            (WIDTH as i32 / 2, TITLE_HEIGHT as i32 / 2),
        )?;
        let grid = self.grid();
        let (panels, parallel) = body.split_vertically(grid.len() as u32 * ROW_HEIGHT);
        let mut cells = Vec::new();
        for (i, row) in panels.split_evenly((grid.len().max(1), 1)).into_iter().enumerate() {
            if let Some(&n) = grid.get(i) {
                cells.extend(row.split_evenly((1, n)));
            }
        }
        let mut cells = cells.into_iter();
        for p in &self.params {
            if let Some(area) = cells.next() {
                panels::parameter(&area, self, p)?;
            }
        }
        if let (Some(f), Some(area)) = (&self.frontier, cells.next()) {
            panels::frontier(&area, self, f)?;
        }
        if self.has_parallel() {
            panels::parallel(&parallel, self)?;
        }
        Ok(())
    }
}

fn text_pos(h: HPos, v: VPos) -> Pos {
    Pos::new(h, v)
}

/// The frontier of `up` and `across` among the report's rows (`None` when no row has both).
fn frontier(report: &Report, up: &str, across: &str) -> Option<Frontier> {
    let both = |r: &super::ReportRow| match (r.metrics.get(up), r.metrics.get(across)) {
        (Some(Some(u)), Some(Some(a))) => Some((*a, *u)),
        _ => None,
    };
    let points: Vec<(f64, f64)> = report.rows.iter().filter_map(both).collect();
    if points.is_empty() {
        return None;
    }
    let mut front = report.clone();
    front.pareto(up, across).ok()?;
    let line = front.rows.iter().filter_map(both).collect();
    Some(Frontier { up: up.to_string(), across: across.to_string(), points, line })
}

#[cfg(test)]
mod tests;
