//! Tests of `report --plot`: the panels and series an SVG holds, a PNG that decodes to the
//! planned size with text and points in it, the layout, and what is refused.

use super::*;
use crate::model::{SweepRecord, TrialRecord};
use crate::report::{Columns, ConfigColumns, MetricColumns, ReportOptions};
use serde_json::json;
use std::collections::BTreeMap;

const YAML: &str = "name: s\nmethod: random\nrun_cap: 8\nparameters:\n  \
    lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-1}\n  \
    layer_k: {distribution: int_uniform, min: 2, max: 32}\n  \
    layer_sparsity_mode: {values: [ordinary, boosted]}\n";

/// (fvu, l0) per trial: the frontier is trials 1 (l0 10), 2 (15) and 0 (20); trial 7 was
/// pruned.
const DATA: [(f64, f64); 8] = [
    (0.10, 20.0),
    (0.20, 10.0),
    (0.15, 15.0),
    (0.30, 12.0),
    (0.12, 25.0),
    (0.40, 11.0),
    (0.25, 18.0),
    (0.50, 30.0),
];

fn trials(metrics: impl Fn(f64, f64) -> Vec<(&'static str, f64)>) -> Vec<TrialRecord> {
    DATA.iter()
        .enumerate()
        .map(|(i, &(fvu, l0))| TrialRecord {
            sweep: "s".into(),
            index: i as u64,
            params: BTreeMap::from([
                ("lr".to_string(), json!(1e-4 * 3f64.powi(i as i32))),
                ("layer_k".to_string(), json!(2 + 4 * i)),
                ("layer_sparsity_mode".to_string(), json!(["ordinary", "boosted"][i % 2])),
            ]),
            config: json!({}).into(),
            status: if i == 7 { TrialStatus::Pruned } else { TrialStatus::Completed },
            attempt: 1,
            lease: None,
            step: 0,
            metrics: metrics(fvu, l0).into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            progress: BTreeMap::new(),
            curve: Vec::new(),
            errors: Vec::new(),
            worker: Some("w".into()),
            artifact: None,
            weights: None,
            created_ms: 0,
            finished_ms: None,
            duration_s: Some(1.0),
        })
        .collect()
}

fn report_of(trials: &[TrialRecord]) -> Report {
    let sweep = SweepRecord {
        name: "s".into(),
        yaml: YAML.into(),
        fingerprint: "0".into(),
        created_ms: 0,
        proposed: 8,
        finished: true,
        uid: None,
    };
    let options = ReportOptions {
        columns: Columns { metrics: MetricColumns::All, config: ConfigColumns::Swept },
        ..ReportOptions::default()
    };
    Report::for_sweep(&sweep, trials, &options).unwrap()
}

fn report() -> Report {
    report_of(&trials(|fvu, l0| vec![("fvu", fvu), ("l0", l0), ("mse", fvu / 10.0)]))
}

/// The text of every `<text>` element.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..t.find("</text>")?];
            Some(body.trim().to_string())
        })
        .collect()
}

#[test]
fn svg_has_a_panel_per_parameter_the_frontier_and_the_best_trials() {
    let options = PlotOptions { top: Some(3), frontier: None };
    let (bytes, drawn) = render(&report(), PlotFormat::Svg, &options).unwrap();
    assert_eq!(drawn, Drawn { trials: 8, panels: 5 });
    let svg = String::from_utf8(bytes).unwrap();
    assert!(svg.len() > 10_000, "{} bytes", svg.len());
    let texts = texts(&svg);
    for want in [
        "fvu vs layer_k (8 trials)",
        "fvu vs layer_sparsity_mode (8 trials)",
        "fvu vs lr (8 trials)",
        "lr, log scale",
        "layer_k",
        "layer_sparsity_mode",
        "Pareto frontier of fvu and l0 (3 of 8 trials)",
        "l0",
        "best 3 trials by fvu (minimize) in parallel coordinates",
        "lr (log)",
        "boosted",
        "ordinary",
        "0.1 best",
    ] {
        assert!(texts.iter().any(|t| t == want), "no text {want:?} in {texts:?}");
    }
    assert!(texts[0].starts_with("sweep s: 8 ranked trials of 8 by fvu (minimize)"), "{texts:?}");
    assert!(texts[0].ends_with("orange rings: pruned early"), "{:?}", texts[0]);
    // The points: 8 in each parameter panel, 8 in the frontier's and its 3 again in red (tick
    // marks of the parallel axes are smaller).
    let points = svg.matches(" r=\"4\"").count() + svg.matches(" r=\"5\"").count();
    assert_eq!(points, 3 * 8 + 8 + 3, "{svg}");
    // The frontier joins its three points: one polyline of three vertices in its colour.
    let red = svg
        .split("<polyline")
        .skip(1)
        .filter(|p| p.contains("stroke=\"#C81E2D\""))
        .map(|p| p[..p.find("/>").unwrap()].to_string())
        .collect::<Vec<_>>();
    assert!(red.iter().any(|p| p.matches(',').count() == 3), "{red:?}");
}

#[test]
fn png_decodes_to_the_planned_size_with_text_and_points() {
    let (bytes, drawn) = render(&report(), PlotFormat::Png, &PlotOptions::default()).unwrap();
    assert_eq!(drawn.panels, 5);
    assert!(bytes.len() > 20_000, "{} bytes", bytes.len());
    let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
    let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut rgb).unwrap();
    // Three parameter panels and the frontier in two rows, the parallel view below.
    assert_eq!((info.width, info.height), (WIDTH, TITLE_HEIGHT + 2 * ROW_HEIGHT + PARALLEL_HEIGHT));
    let pixel = |x: u32, y: u32| {
        let i = ((y * info.width + x) * 3) as usize;
        (rgb[i], rgb[i + 1], rgb[i + 2])
    };
    // The title is drawn with the embedded font: dark pixels in its band.
    let dark_title = (0..TITLE_HEIGHT)
        .flat_map(|y| (0..WIDTH).map(move |x| (x, y)))
        .filter(|&(x, y)| pixel(x, y).0 < 100)
        .count();
    assert!(dark_title > 300, "{dark_title} dark pixels in the title");
    let red = (0..info.height)
        .flat_map(|y| (0..WIDTH).map(move |x| (x, y)))
        .filter(|&(x, y)| matches!(pixel(x, y), (r, g, b) if r > 150 && g < 60 && b < 70))
        .count();
    assert!(red > 100, "{red} red pixels: the best trial and the frontier");
}

#[test]
fn without_the_frontier_metrics_there_is_no_frontier_panel() {
    let r = report_of(&trials(|fvu, _| vec![("fvu", fvu)]));
    let (bytes, drawn) = render(&r, PlotFormat::Svg, &PlotOptions::default()).unwrap();
    assert_eq!(drawn, Drawn { trials: 8, panels: 4 });
    let svg = String::from_utf8(bytes).unwrap();
    assert!(!svg.contains("Pareto"));
    // `--pareto` picks the frontier's metrics.
    let r = report_of(&trials(|fvu, l0| vec![("fvu", fvu), ("mmcs", 1.0 - fvu), ("l0", l0)]));
    let options = PlotOptions { top: None, frontier: Some(("mmcs".into(), "l0".into())) };
    let (bytes, _) = render(&r, PlotFormat::Svg, &options).unwrap();
    let texts = texts(&String::from_utf8(bytes).unwrap());
    assert!(texts.iter().any(|t| t.starts_with("Pareto frontier of mmcs and l0")), "{texts:?}");
}

#[test]
fn nothing_to_plot_is_an_error_that_says_why() {
    let r = report_of(&trials(|_, l0| vec![("l0", l0)]));
    let e = render(&r, PlotFormat::Png, &PlotOptions::default()).unwrap_err().to_string();
    assert!(e.contains("no ranked trial of sweep s reports a finite fvu"), "{e}");
}

#[test]
fn the_format_comes_from_the_extension() {
    assert_eq!(PlotFormat::of(Path::new("out/sweep.svg")), Ok(PlotFormat::Svg));
    assert_eq!(PlotFormat::of(Path::new("sweep.PNG")), Ok(PlotFormat::Png));
    let e = PlotFormat::of(Path::new("sweep.jpg")).unwrap_err();
    assert!(e.contains(".jpg") && e.contains("sweep.jpg") && e.contains("FILE.svg"), "{e}");
    let e = parse_target("sweep").unwrap_err();
    assert!(e.contains("`sweep` has no extension"), "{e}");
    // Writing refuses it too, before drawing anything.
    let dir = tempfile::tempdir().unwrap();
    let e = write(&report(), &dir.path().join("a.pdf"), &PlotOptions::default()).unwrap_err();
    assert!(e.to_string().contains("cannot plot to a .pdf file"), "{e}");
    assert!(!dir.path().join("a.pdf").exists());
}

#[test]
fn panels_fill_rows_of_at_most_three() {
    let r = report();
    let mut plan = Plan::new(&r, &PlotOptions::default()).unwrap();
    let template = plan.params[0].clone();
    let mut rows = Vec::new();
    for n in 1..=7 {
        plan.params = vec![template.clone(); n];
        rows.push(plan.grid());
    }
    // The frontier is one more cell; four cells make two rows of two.
    let want: [&[usize]; 7] = [&[2], &[3], &[2, 2], &[3, 2], &[3, 3], &[3, 3, 1], &[3, 3, 2]];
    assert_eq!(rows, want.map(<[usize]>::to_vec));
}
