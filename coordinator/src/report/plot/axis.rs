//! How each plotted quantity is laid along an axis: linear, logarithmic or as categories, with
//! the range drawn and the position of a value in [0, 1] for parallel coordinates.

use super::super::ParamScale;
use super::super::render::show_value;
use serde_json::Value;

/// Values spanning at least this ratio (over a decade) go on a log axis: a linear one would
/// crowd the small values (the good FVUs) along its bottom.
const LOG_SPAN: f64 = 20.0;

/// How one quantity is laid out.
#[derive(Debug, Clone, PartialEq)]
pub enum Scale {
    /// The values' own extent (`lo` may equal `hi`).
    Linear { lo: f64, hi: f64 },
    /// Positive values; `lo` and `hi` are their extent.
    Log { lo: f64, hi: f64 },
    /// Distinct values as text, in their order along the axis.
    Categories(Vec<String>),
}

impl Scale {
    /// The scale of numbers: as `hint` says (the parameter's distribution), else logarithmic
    /// where the values span decades; never logarithmic unless all are positive. `None`
    /// without a finite value.
    pub fn numeric(values: &[f64], hint: Option<ParamScale>) -> Option<Scale> {
        let finite = values.iter().copied().filter(|v| v.is_finite());
        let lo = finite.clone().reduce(f64::min)?;
        let hi = finite.reduce(f64::max)?;
        let log = match hint {
            Some(ParamScale::Log) => true,
            Some(ParamScale::Linear) => false,
            None => hi / lo >= LOG_SPAN,
        };
        if lo > 0.0 && log { Some(Scale::Log { lo, hi }) } else { Some(Scale::Linear { lo, hi }) }
    }

    /// The scale of a parameter's values: categories when any is not a number (strings,
    /// booleans), ordered as text; numbers otherwise. `None` without a value.
    pub fn of_values(values: &[&Value], hint: Option<ParamScale>) -> Option<Scale> {
        if values.iter().all(|v| v.is_number()) {
            let numbers: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
            return Scale::numeric(&numbers, hint);
        }
        let mut names: Vec<String> = values.iter().map(|v| show_value(v)).collect();
        names.sort();
        names.dedup();
        (!names.is_empty()).then_some(Scale::Categories(names))
    }

    /// Where `value` sits along the axis: a number on a numeric axis, the category's index on
    /// a categorical one. `None` for a value the axis does not hold.
    pub fn coordinate(&self, value: &Value) -> Option<f64> {
        match self {
            Scale::Categories(names) => {
                let name = show_value(value);
                names.iter().position(|n| *n == name).map(|i| i as f64)
            }
            Scale::Log { .. } => value.as_f64().filter(|v| *v > 0.0),
            Scale::Linear { .. } => value.as_f64().filter(|v| v.is_finite()),
        }
    }

    /// A coordinate's place in [0, 1] between the ends of the values (0.5 when they are all
    /// equal): the parallel-coordinates axes.
    pub fn normalise(&self, x: f64) -> f64 {
        let (a, b, t) = match self {
            Scale::Linear { lo, hi } => (*lo, *hi, x),
            Scale::Log { lo, hi } => (lo.ln(), hi.ln(), x.ln()),
            Scale::Categories(names) => (0.0, names.len().saturating_sub(1) as f64, x),
        };
        if b > a { ((t - a) / (b - a)).clamp(0.0, 1.0) } else { 0.5 }
    }

    /// The range a chart draws: the values with a margin; a log axis reaches out to whole
    /// decades where fewer than two powers of ten would otherwise be labelled.
    pub fn drawn(&self) -> Drawn {
        match *self {
            Scale::Linear { lo, hi } => {
                let pad = if hi > lo { (hi - lo) * 0.06 } else { lo.abs().max(1.0) * 0.1 };
                Drawn::Linear(lo - pad, hi + pad)
            }
            Scale::Log { lo, hi } => {
                let pad = if hi > lo { (hi / lo).powf(0.06) } else { 1.25 };
                let (a, b) = (lo / pad, hi * pad);
                let powers = (b.log10().floor() - a.log10().ceil()) as i64 + 1;
                if powers >= 2 {
                    Drawn::Log(a, b)
                } else {
                    Drawn::Log(10f64.powf(a.log10().floor()), 10f64.powf(b.log10().ceil()))
                }
            }
            Scale::Categories(ref names) => Drawn::Linear(-0.5, names.len() as f64 - 0.5),
        }
    }

    /// The text of a tick at `x`: a category's name at its index (nothing between), or the
    /// number.
    pub fn label(&self, x: f64) -> String {
        match self {
            Scale::Categories(names) => {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            }
            _ => super::super::render::fmt_num(x),
        }
    }

    /// Ticks to ask the chart for.
    pub fn ticks(&self) -> usize {
        match self {
            Scale::Categories(names) => names.len(),
            _ => 6,
        }
    }

    pub fn is_log(&self) -> bool {
        matches!(self, Scale::Log { .. })
    }
}

/// The range a chart axis spans.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Drawn {
    Linear(f64, f64),
    Log(f64, f64),
}

/// A spread of categorical points around their category (±0.2), the same for a trial in
/// every panel, so points of one category do not hide each other.
pub fn jitter(trial: u64) -> f64 {
    let h = trial.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    (h as f64 / (1u64 << 24) as f64 - 0.5) * 0.4
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scales_follow_the_values() {
        let log = Some(ParamScale::Log);
        assert_eq!(Scale::numeric(&[1.0, 5.0], None), Some(Scale::Linear { lo: 1.0, hi: 5.0 }));
        assert_eq!(Scale::numeric(&[1.0, 5.0], log), Some(Scale::Log { lo: 1.0, hi: 5.0 }));
        assert!(Scale::numeric(&[1e-4, 1e-2], None).unwrap().is_log(), "two decades");
        assert!(!Scale::numeric(&[1.0, 19.0], None).unwrap().is_log(), "not quite");
        let uniform = Some(ParamScale::Linear);
        assert!(!Scale::numeric(&[1e-4, 1e-2], uniform).unwrap().is_log(), "drawn evenly");
        assert!(!Scale::numeric(&[0.0, 1e-2, 10.0], log).unwrap().is_log(), "a zero");
        assert_eq!(Scale::numeric(&[f64::NAN], None), None);
        let modes = [json!("b"), json!("a"), json!("b")];
        let refs: Vec<&Value> = modes.iter().collect();
        let s = Scale::of_values(&refs, None).unwrap();
        assert_eq!(s, Scale::Categories(vec!["a".into(), "b".into()]));
        assert_eq!(s.coordinate(&json!("b")), Some(1.0));
        assert_eq!((s.label(1.0), s.label(0.5)), ("b".to_string(), String::new()));
        assert_eq!(s.drawn(), Drawn::Linear(-0.5, 1.5));
    }

    #[test]
    fn normalised_positions_and_log_ranges() {
        let lin = Scale::Linear { lo: 2.0, hi: 4.0 };
        assert_eq!((lin.normalise(2.0), lin.normalise(3.0), lin.normalise(4.0)), (0.0, 0.5, 1.0));
        assert_eq!(Scale::Linear { lo: 3.0, hi: 3.0 }.normalise(3.0), 0.5);
        let log = Scale::Log { lo: 1e-3, hi: 1e-1 };
        assert!((log.normalise(1e-2) - 0.5).abs() < 1e-12);
        // Less than a decade: widened to whole decades so the axis has labels.
        let Drawn::Log(a, b) = (Scale::Log { lo: 2e-3, hi: 8e-3 }).drawn() else { panic!() };
        assert_eq!((a, b), (1e-3, 1e-2));
        let Drawn::Log(a, b) = log.drawn() else { panic!() };
        assert!(a < 1e-3 && b > 1e-1 && b < 1.0, "{a} {b}");
        assert!((0..1000).map(jitter).all(|j| j.abs() <= 0.2));
    }
}
