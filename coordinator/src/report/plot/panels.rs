//! The three kinds of panel: the metric against one parameter, the Pareto frontier, and the
//! best trials in parallel coordinates.

use super::axis::{Drawn, Scale, jitter};
use super::{FONT, Frontier, ParamPanel, Plan, text_pos};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

type Result<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

const POINT: RGBColor = RGBColor(31, 119, 180);
const PRUNED: RGBColor = RGBColor(230, 140, 30);
const BEST: RGBColor = RGBColor(200, 30, 45);
const GRID: RGBColor = RGBColor(225, 225, 225);
const LABEL: u32 = 13;
const DESC: u32 = 15;
const CAPTION: u32 = 17;

/// How a point is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Trial,
    Pruned,
    /// The best trial, or a point on the frontier.
    Highlight,
}

/// One scatter panel, before its axes' types are fixed.
struct Scatter<'s> {
    caption: String,
    x_desc: String,
    y_desc: String,
    x: &'s Scale,
    y: &'s Scale,
    points: Vec<(f64, f64, Mark)>,
    /// Joined in order (the frontier).
    line: Vec<(f64, f64)>,
}

/// The ranking metric against the parameter `p`, a point per trial (the best in red).
pub(super) fn parameter<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    plan: &Plan,
    p: &ParamPanel,
) -> Result<DB> {
    let categorical = matches!(p.scale, Scale::Categories(_));
    let mut points: Vec<(f64, f64, Mark)> = plan
        .points
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let x = p.scale.coordinate(t.params.get(&p.name)?)?;
            let x = if categorical { x + jitter(t.trial) } else { x };
            let mark = if i == 0 {
                Mark::Highlight
            } else if t.pruned {
                Mark::Pruned
            } else {
                Mark::Trial
            };
            Some((x, t.value, mark))
        })
        .collect();
    // The best trial on top of the others.
    points.reverse();
    let log = if p.scale.is_log() { ", log scale" } else { "" };
    let scatter = Scatter {
        caption: format!("{} vs {} ({} trials)", plan.report.metric, p.name, points.len()),
        x_desc: format!("{}{log}", p.name),
        y_desc: axis_desc(&plan.report.metric, &plan.metric_scale),
        x: &p.scale,
        y: &plan.metric_scale,
        points,
        line: Vec::new(),
    };
    scatter_panel(area, &scatter)
}

/// Every trial with both metrics, the frontier joined in red.
pub(super) fn frontier<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    _plan: &Plan,
    f: &Frontier,
) -> Result<DB> {
    let across: Vec<f64> = f.points.iter().map(|p| p.0).collect();
    let up: Vec<f64> = f.points.iter().map(|p| p.1).collect();
    let (Some(x), Some(y)) = (Scale::numeric(&across, None), Scale::numeric(&up, None)) else {
        return Ok(());
    };
    let mut points: Vec<(f64, f64, Mark)> =
        f.points.iter().map(|&(a, u)| (a, u, Mark::Trial)).collect();
    points.extend(f.line.iter().map(|&(a, u)| (a, u, Mark::Highlight)));
    let scatter = Scatter {
        caption: format!(
            "Pareto frontier of {} and {} ({} of {} trials)",
            f.up,
            f.across,
            f.line.len(),
            f.points.len()
        ),
        x_desc: axis_desc(&f.across, &x),
        y_desc: axis_desc(&f.up, &y),
        x: &x,
        y: &y,
        points,
        line: f.line.clone(),
    };
    scatter_panel(area, &scatter)
}

fn axis_desc(name: &str, scale: &Scale) -> String {
    if scale.is_log() { format!("{name}, log scale") } else { name.to_string() }
}

/// Fixes the axes' coordinate types (linear or log, each way) and draws.
fn scatter_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, s: &Scatter) -> Result<DB> {
    match (s.x.drawn(), s.y.drawn()) {
        (Drawn::Linear(a, b), Drawn::Linear(c, d)) => scatter_on(area, s, a..b, c..d),
        (Drawn::Linear(a, b), Drawn::Log(c, d)) => scatter_on(area, s, a..b, (c..d).log_scale()),
        (Drawn::Log(a, b), Drawn::Linear(c, d)) => scatter_on(area, s, (a..b).log_scale(), c..d),
        (Drawn::Log(a, b), Drawn::Log(c, d)) => {
            scatter_on(area, s, (a..b).log_scale(), (c..d).log_scale())
        }
    }
}

fn scatter_on<DB, X, Y>(area: &DrawingArea<DB, Shift>, s: &Scatter, x: X, y: Y) -> Result<DB>
where
    DB: DrawingBackend,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&s.caption, (FONT, CAPTION))
        .margin(14)
        .x_label_area_size(52)
        .y_label_area_size(76)
        .build_cartesian_2d(x, y)?;
    let x_label = |v: &f64| s.x.label(*v);
    let y_label = |v: &f64| s.y.label(*v);
    chart
        .configure_mesh()
        .x_labels(s.x.ticks())
        .y_labels(s.y.ticks())
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .x_desc(s.x_desc.as_str())
        .y_desc(s.y_desc.as_str())
        .label_style((FONT, LABEL))
        .axis_desc_style((FONT, DESC))
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .draw()?;
    if !s.line.is_empty() {
        chart.draw_series(LineSeries::new(s.line.iter().copied(), BEST.stroke_width(2)))?;
    }
    chart.draw_series(s.points.iter().map(|&(x, y, mark)| {
        let style = match mark {
            Mark::Trial => POINT.mix(0.75).filled(),
            Mark::Pruned => PRUNED.stroke_width(2),
            Mark::Highlight => BEST.filled(),
        };
        Circle::new((x, y), if mark == Mark::Highlight { 5 } else { 4 }, style)
    }))?;
    Ok(())
}

/// One axis of the parallel-coordinates view.
struct ParallelAxis<'p> {
    name: &'p str,
    scale: &'p Scale,
}

/// The best trials as lines across an axis per parameter and one for the metric, each axis
/// spanning its values over every trial; a colour bar beside says which colour is which value.
pub(super) fn parallel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    plan: &Plan,
) -> Result<DB> {
    let metric = plan.report.metric.as_str();
    let mut axes: Vec<ParallelAxis> =
        plan.params.iter().map(|p| ParallelAxis { name: &p.name, scale: &p.scale }).collect();
    axes.push(ParallelAxis { name: metric, scale: &plan.metric_scale });
    let (w, _) = area.dim_in_pixel();
    let (main, legend) = area.split_horizontally(w.saturating_sub(170));
    let last = (axes.len() - 1) as f64;
    let mut chart = ChartBuilder::on(&main)
        .caption(
            format!(
                "best {} trials by {metric} ({}) in parallel coordinates",
                plan.top.len(),
                plan.report.goal.name()
            ),
            (FONT, CAPTION),
        )
        .margin(20)
        .margin_left(90)
        .margin_right(100)
        .build_cartesian_2d(-0.02..last + 0.02, -0.16..1.06)?;
    let values: Vec<f64> = plan.top.iter().map(|&i| plan.points[i].value).collect();
    let (best, worst) = (values[0], *values.last().unwrap_or(&values[0]));
    // Colours spread the lines' values the way the metric's axis does (log or linear).
    let (lo, hi) = (best.min(worst), best.max(worst));
    let colours =
        if plan.metric_scale.is_log() { Scale::Log { lo, hi } } else { Scale::Linear { lo, hi } };
    let shade = |v: f64| match colours.normalise(v) {
        _ if hi <= lo => 0.0,
        t if best <= worst => t,
        t => 1.0 - t,
    };
    // Worst first, so the best lie on top.
    for &i in plan.top.iter().rev() {
        let t = &plan.points[i];
        let ys: Option<Vec<(f64, f64)>> = axes
            .iter()
            .enumerate()
            .map(|(k, a)| {
                let x = if k + 1 == axes.len() {
                    Some(t.value)
                } else {
                    a.scale.coordinate(t.params.get(a.name)?)
                };
                Some((k as f64, a.scale.normalise(x?)))
            })
            .collect();
        if let Some(line) = ys {
            chart.draw_series(LineSeries::new(line, ramp(shade(t.value)).stroke_width(2)))?;
        }
    }
    let label = (FONT, LABEL).into_font().color(&BLACK);
    let name = (FONT, DESC).into_font().color(&BLACK).pos(text_pos(HPos::Center, VPos::Top));
    let right = label.clone().pos(text_pos(HPos::Left, VPos::Center));
    for (k, a) in axes.iter().enumerate() {
        let x = k as f64;
        chart.draw_series(LineSeries::new([(x, 0.0), (x, 1.0)], BLACK.stroke_width(1)))?;
        let log = if a.scale.is_log() { " (log)" } else { "" };
        chart.draw_series([EmptyElement::at((x, 0.0))
            + Text::new(format!("{}{log}", a.name), (0, 26), name.clone())])?;
        let ticks: Vec<(f64, String)> = match a.scale {
            Scale::Categories(names) => names
                .iter()
                .enumerate()
                .map(|(i, n)| (a.scale.normalise(i as f64), n.clone()))
                .collect(),
            Scale::Linear { lo, hi } | Scale::Log { lo, hi } if lo == hi => {
                vec![(0.5, a.scale.label(*lo))]
            }
            Scale::Linear { lo, hi } | Scale::Log { lo, hi } => {
                vec![(0.0, a.scale.label(*lo)), (1.0, a.scale.label(*hi))]
            }
        };
        for (y, text) in ticks {
            // On a pale box: lines converge on the values they share.
            let (w, h) = main.estimate_text_size(&text, &right)?;
            let (w, h) = (w as i32, h as i32);
            chart.draw_series([EmptyElement::at((x, y))
                + Rectangle::new(
                    [(4, -h / 2 - 2), (w + 8, h / 2 + 2)],
                    WHITE.mix(0.85).filled(),
                )
                + Circle::new((0, 0), 2, BLACK.filled())
                + Text::new(text, (6, 0), right.clone())])?;
        }
    }
    colour_bar(&legend, metric, best, worst)
}

/// A vertical bar from the best value (top) to the worst of the lines drawn.
fn colour_bar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    metric: &str,
    best: f64,
    worst: f64,
) -> Result<DB> {
    let (top, bottom, x0, x1) = (70, 330, 20, 40);
    let steps = 60;
    for s in 0..steps {
        let y0 = top + (bottom - top) * s / steps;
        let y1 = top + (bottom - top) * (s + 1) / steps;
        let colour = ramp(s as f64 / (steps - 1) as f64);
        area.draw(&Rectangle::new([(x0, y0), (x1, y1)], colour.filled()))?;
    }
    let style = (FONT, LABEL).into_font().color(&BLACK);
    let left = style.clone().pos(text_pos(HPos::Left, VPos::Center));
    area.draw_text(metric, &style.pos(text_pos(HPos::Left, VPos::Bottom)), (x0, top - 12))?;
    let fmt = super::super::render::fmt_num;
    area.draw_text(&format!("{} best", fmt(best)), &left, (x1 + 6, top))?;
    area.draw_text(&fmt(worst), &left, (x1 + 6, bottom))?;
    Ok(())
}

/// The line colour at `t` in [0, 1]: dark red for the best, through orange and light blue, to
/// dark blue for the worst (every shade stays visible on white).
fn ramp(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 4] =
        [(178.0, 24.0, 43.0), (239.0, 138.0, 98.0), (103.0, 169.0, 207.0), (33.0, 102.0, 172.0)];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}
