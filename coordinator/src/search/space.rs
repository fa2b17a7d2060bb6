//! The search space of the model-driven methods (argmin's solvers, Bayesian search).
//!
//! Parameters given as a constant, a `values` list or a `categorical` distribution are
//! *gridded*: every combination is a [`Cell`] with its own search of the numeric parameters.
//! Numeric distributions are searched in the unit box: coordinate `b` in [0, 1] maps to
//! `min + b (max - min)` (uniform, q_uniform before rounding to a multiple of q), to
//! `exp(ln min + b (ln max - ln min))` (log_uniform_values), or to one of the integers of
//! int_uniform, each owning an equal share of the box. Solvers without bounds (Nelder-Mead,
//! the annealer's steps) move freely; [`reflect`] folds any real coordinate back into the box.

use crate::spec::{Distribution, ParamSpec, SweepSpec, normalize_value, q_multiple, sample_value};
use serde_json::Value;
use std::collections::BTreeMap;

/// Most cells a model-driven search may grid (each runs its own solver).
pub const MAX_CELLS: u64 = 1_000;

/// One searched numeric parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Dim {
    pub name: String,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Linear { lo: f64, hi: f64 },
    Log { lo: f64, hi: f64 },
    Int { lo: i64, hi: i64 },
    Quantized { lo: f64, hi: f64, q: f64 },
}

impl Dim {
    /// The searched dimension of a numeric distribution; None for categorical.
    pub fn new(name: &str, d: &Distribution) -> Option<Dim> {
        let kind = match *d {
            Distribution::Uniform { min, max } => Kind::Linear { lo: min, hi: max },
            Distribution::LogUniformValues { min, max } => Kind::Log { lo: min, hi: max },
            Distribution::IntUniform { min, max } => Kind::Int { lo: min, hi: max },
            Distribution::QUniform { min, max, q } => Kind::Quantized { lo: min, hi: max, q },
            Distribution::Categorical { .. } => return None,
        };
        Some(Dim { name: name.to_string(), kind })
    }

    /// The parameter's value at box coordinate `b` (folded into [0, 1] first).
    pub fn value(&self, b: f64) -> Value {
        let b = reflect(b);
        match self.kind {
            Kind::Linear { lo, hi } => sample_value(&self.name, (lo + b * (hi - lo)).min(hi)),
            Kind::Log { lo, hi } => {
                let x = (lo.ln() + b * (hi.ln() - lo.ln())).exp();
                sample_value(&self.name, x.clamp(lo, hi))
            }
            Kind::Int { lo, hi } => {
                let span = (hi as f64 - lo as f64) + 1.0;
                let k = (b * span).floor().min(span - 1.0);
                Value::from(lo.saturating_add(k as i64).min(hi))
            }
            Kind::Quantized { lo, hi, q } => {
                let x = lo + b * (hi - lo);
                sample_value(&self.name, q_multiple((x / q).round(), q))
            }
        }
    }

    /// The width of one distinct value's share of the box (0 for a continuous dimension): a
    /// solver step shorter than this may not change the value.
    pub fn share(&self) -> f64 {
        match self.kind {
            Kind::Int { lo, hi } => 1.0 / (hi as f64 - lo as f64 + 1.0),
            Kind::Quantized { lo, hi, q } if hi > lo => (q / (hi - lo)).min(1.0),
            _ => 0.0,
        }
    }

    /// The box coordinate of a value this dimension produced (the centre of an integer's
    /// share); None for a non-number.
    pub fn coord(&self, v: &Value) -> Option<f64> {
        let x = v.as_f64()?;
        let b = match self.kind {
            Kind::Linear { lo, hi } | Kind::Quantized { lo, hi, .. } => (x - lo) / (hi - lo),
            Kind::Log { lo, hi } => (x.ln() - lo.ln()) / (hi.ln() - lo.ln()),
            Kind::Int { lo, hi } => (x - lo as f64 + 0.5) / (hi as f64 - lo as f64 + 1.0),
        };
        b.is_finite().then(|| b.clamp(0.0, 1.0))
    }
}

/// Folds a real coordinate into [0, 1] by mirroring at the bounds (a triangle wave), so an
/// unbounded solver stepping past a bound comes back inside instead of sticking to it.
pub fn reflect(u: f64) -> f64 {
    if !u.is_finite() {
        return 0.5;
    }
    let t = u.rem_euclid(2.0);
    if t > 1.0 { 2.0 - t } else { t }
}

/// The gridded part of a search: every combination of the non-numeric parameters.
#[derive(Debug, Clone)]
pub struct Space {
    /// Searched parameters, in name order.
    pub dims: Vec<Dim>,
    /// Gridded parameters and their values, in name order (the last varies fastest).
    pub axes: Vec<(String, Vec<Value>)>,
}

/// One combination of the gridded parameters.
pub type Cell = BTreeMap<String, Value>;

impl Space {
    /// The space of a validated spec.
    pub fn from_spec(spec: &SweepSpec) -> Space {
        let mut dims = Vec::new();
        let mut axes = Vec::new();
        for (name, p) in &spec.parameters {
            match p {
                ParamSpec::Distribution(d) if Dim::new(name, d).is_some() => {
                    dims.extend(Dim::new(name, d));
                }
                _ => {
                    let values = p.grid_values().unwrap_or_default();
                    axes.push((
                        name.clone(),
                        values.into_iter().map(|v| normalize_value(name, v)).collect(),
                    ));
                }
            }
        }
        Space { dims, axes }
    }

    /// Number of cells (1 when nothing is gridded).
    pub fn cells(&self) -> u64 {
        self.axes.iter().fold(1u64, |acc, (_, v)| acc.saturating_mul(v.len() as u64))
    }

    /// Cell `i` (mixed radix, last axis fastest).
    pub fn cell(&self, mut i: u64) -> Cell {
        let mut out = Cell::new();
        for (name, values) in self.axes.iter().rev() {
            let n = values.len().max(1) as u64;
            if let Some(v) = values.get((i % n) as usize) {
                out.insert(name.clone(), v.clone());
            }
            i /= n;
        }
        out
    }

    /// The full parameters of box point `b` in `cell`.
    pub fn point(&self, cell: &Cell, b: &[f64]) -> BTreeMap<String, Value> {
        let mut params = cell.clone();
        for (dim, &x) in self.dims.iter().zip(b) {
            params.insert(dim.name.clone(), dim.value(x));
        }
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dim(d: Distribution) -> Dim {
        Dim::new("x", &d).unwrap()
    }

    #[test]
    fn reflect_folds_into_the_box() {
        for (u, want) in [(0.25, 0.25), (1.25, 0.75), (-0.25, 0.25), (2.5, 0.5), (-1.5, 0.5)] {
            assert!((reflect(u) - want).abs() < 1e-12, "reflect({u})");
        }
        assert_eq!(reflect(f64::NAN), 0.5);
    }

    #[test]
    fn box_coordinates_map_to_each_distribution() {
        let lin = dim(Distribution::Uniform { min: 2.0, max: 4.0 });
        assert_eq!(lin.value(0.5), json!(3.0));
        assert_eq!(lin.value(1.5), json!(3.0), "reflected");
        let log = dim(Distribution::LogUniformValues { min: 1e-4, max: 1e-2 });
        assert!((log.value(0.5).as_f64().unwrap() - 1e-3).abs() < 1e-12);
        let int = dim(Distribution::IntUniform { min: 1, max: 3 });
        let ints: Vec<Value> = [0.0, 0.33, 0.34, 0.66, 0.67, 1.0].map(|b| int.value(b)).into();
        assert_eq!(ints, [json!(1), json!(1), json!(2), json!(2), json!(3), json!(3)]);
        let q = dim(Distribution::QUniform { min: 0.0, max: 1.0, q: 0.25 });
        assert_eq!(q.value(0.4), json!(0.5));
        // coord inverts value (to the centre of an integer's share).
        assert!((log.coord(&json!(1e-3)).unwrap() - 0.5).abs() < 1e-9);
        assert!((int.coord(&json!(2)).unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(int.value(int.coord(&json!(3)).unwrap()), json!(3));
    }

    #[test]
    fn categoricals_and_values_are_gridded_numbers_searched() {
        let spec = SweepSpec::parse(
            "name: s\nmethod: nelder_mead\nrun_cap: 10\nparameters:\n  lr:\n    distribution: log_uniform_values\n    min: 0.0001\n    max: 0.01\n  layer_sparsity_mode:\n    values: [ordinary, lifetime]\n  optimizer:\n    distribution: categorical\n    values: [adam, sgd, adamw]\n",
            "s.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let space = Space::from_spec(&spec);
        assert_eq!(space.dims.len(), 1);
        assert_eq!(space.cells(), 6);
        assert_eq!(space.cell(0)["layer_sparsity_mode"], json!("ordinary"));
        assert_eq!(space.cell(0)["optimizer"], json!("adam"));
        assert_eq!(space.cell(1)["optimizer"], json!("sgd"));
        assert_eq!(space.cell(5)["layer_sparsity_mode"], json!("lifetime"));
        let p = space.point(&space.cell(2), &[0.5]);
        assert_eq!(p["optimizer"], json!("adamw"));
        assert!((p["lr"].as_f64().unwrap() - 1e-3).abs() < 1e-12);
    }
}
