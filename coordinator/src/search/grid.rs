//! Grid search: the cartesian product of every parameter's values, in a fixed order.
//!
//! Parameters are taken in `BTreeMap` (name) order and the last one varies fastest, so point
//! `i` is a pure function of `i` (a mixed-radix decode). Resume replays the same sequence, and
//! `run_cap` truncates it. Results are ignored: the grid is fixed in advance.

use super::{Point, Proposal, Strategy, next_index};
use crate::spec::{SweepSpec, normalize_value};
use serde_json::Value;
use std::collections::BTreeMap;

/// The grid strategy.
#[derive(Debug, Clone)]
pub struct GridSearch {
    /// (parameter path, its values) in proposal order.
    axes: Vec<(String, Vec<Value>)>,
    /// Points that will be proposed: the grid size, capped by run_cap.
    len: u64,
    next: u64,
}

impl GridSearch {
    /// A grid over `axes` (each must be non-empty), capped at `run_cap` points.
    pub fn new(axes: Vec<(String, Vec<Value>)>, run_cap: Option<u64>) -> Self {
        let size = axes
            .iter()
            .try_fold(1u64, |acc, (_, v)| acc.checked_mul(v.len() as u64))
            .unwrap_or(u64::MAX);
        let len = run_cap.map_or(size, |cap| cap.min(size));
        GridSearch { axes, len, next: 0 }
    }

    /// The grid of a validated spec. A parameter that cannot be enumerated (only possible for a
    /// spec that did not come from [`SweepSpec::parse`]) makes an empty grid, logged as an error.
    pub fn from_spec(spec: &SweepSpec) -> Self {
        let mut axes = Vec::with_capacity(spec.parameters.len());
        for (name, p) in &spec.parameters {
            match p.grid_values() {
                Ok(values) if !values.is_empty() => axes.push((
                    name.clone(),
                    values.into_iter().map(|v| normalize_value(name, v)).collect(),
                )),
                Ok(_) => {
                    tracing::error!(sweep = %spec.name, parameter = %name, "no values: empty grid");
                    return GridSearch { axes: Vec::new(), len: 0, next: 0 };
                }
                Err(e) => {
                    tracing::error!(sweep = %spec.name, parameter = %name, "{e}: empty grid");
                    return GridSearch { axes: Vec::new(), len: 0, next: 0 };
                }
            }
        }
        GridSearch::new(axes, spec.run_cap)
    }

    /// Number of points this grid proposes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the grid proposes nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The parameters of point `index` (index < len).
    pub fn point_at(&self, index: u64) -> BTreeMap<String, Value> {
        let mut rest = index;
        let mut params = BTreeMap::new();
        for (name, values) in self.axes.iter().rev() {
            let n = values.len() as u64;
            params.insert(name.clone(), values[(rest % n) as usize].clone());
            rest /= n;
        }
        params
    }
}

impl Strategy for GridSearch {
    fn propose(&mut self) -> Proposal {
        match next_index(&mut self.next, self.len) {
            Some(index) => Proposal::Point(Point { index, params: self.point_at(index) }),
            None => Proposal::Done,
        }
    }

    fn observe(&mut self, _index: u64, _value: Option<f64>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn drain(s: &mut dyn Strategy) -> Vec<Point> {
        let mut out = Vec::new();
        loop {
            match s.propose() {
                Proposal::Point(p) => out.push(p),
                Proposal::Done => return out,
                Proposal::Wait => panic!("grid never waits"),
            }
        }
    }

    fn axes() -> Vec<(String, Vec<Value>)> {
        vec![
            ("a".into(), vec![json!(1), json!(2)]),
            ("b".into(), vec![json!("x"), json!("y"), json!("z")]),
        ]
    }

    #[test]
    fn order_last_parameter_fastest() {
        let points = drain(&mut GridSearch::new(axes(), None));
        assert_eq!(points.len(), 6);
        let seen: Vec<(Value, Value)> =
            points.iter().map(|p| (p.params["a"].clone(), p.params["b"].clone())).collect();
        assert_eq!(
            seen,
            vec![
                (json!(1), json!("x")),
                (json!(1), json!("y")),
                (json!(1), json!("z")),
                (json!(2), json!("x")),
                (json!(2), json!("y")),
                (json!(2), json!("z")),
            ]
        );
        assert!(points.iter().enumerate().all(|(i, p)| p.index == i as u64));
    }

    #[test]
    fn run_cap_truncates_and_stays_done() {
        let mut g = GridSearch::new(axes(), Some(4));
        let points = drain(&mut g);
        assert_eq!(points.len(), 4);
        assert_eq!(points[3].params["a"], json!(2));
        assert_eq!(g.propose(), Proposal::Done);
        assert_eq!(GridSearch::new(axes(), Some(100)).len(), 6);
    }

    #[test]
    fn no_parameters_is_one_point() {
        let points = drain(&mut GridSearch::new(Vec::new(), None));
        assert_eq!(points.len(), 1);
        assert!(points[0].params.is_empty());
    }

    #[test]
    fn observe_is_ignored() {
        let mut g = GridSearch::new(axes(), None);
        let first = drain(&mut g.clone());
        let mut second = Vec::new();
        while let Proposal::Point(p) = g.propose() {
            g.observe(p.index, Some(-1.0));
            g.observe(p.index, None);
            second.push(p);
        }
        assert_eq!(first, second);
    }

    #[test]
    fn from_spec_expands_and_normalizes() {
        let spec = SweepSpec::parse(
            "name: g\nmethod: grid\nparameters:\n  layer_k: {values: [4.0, 8]}\n  \
             stripe_dim: {distribution: int_uniform, min: 15, max: 17}\n",
            "g.yaml",
        )
        .unwrap();
        let points = drain(&mut GridSearch::from_spec(&spec));
        assert_eq!(points.len(), 6);
        assert_eq!(points[0].params["layer_k"], json!(4));
        assert!(points[0].params["layer_k"].is_u64(), "integer field gets an integer");
        let dims: Vec<Value> = points[..3].iter().map(|p| p.params["stripe_dim"].clone()).collect();
        assert_eq!(dims, vec![json!(15), json!(16), json!(17)]);
    }
}
