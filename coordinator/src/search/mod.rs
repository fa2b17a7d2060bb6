//! Search strategies: one trait for grid, random and (next) argmin-driven methods.
//!
//! A strategy proposes points in a deterministic order from the sweep seed, so a restarted
//! coordinator resumes by replaying: it creates the strategy again, and for each stored trial
//! takes the next proposal (which must match) and feeds back its stored result.

use std::collections::BTreeMap;

/// One proposed parameter assignment (dotted trial-config paths to JSON values).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// 0-based proposal index; becomes the trial index.
    pub index: u64,
    pub params: BTreeMap<String, serde_json::Value>,
}

/// What the strategy says when asked for a point.
#[derive(Debug, Clone, PartialEq)]
pub enum Proposal {
    Point(Point),
    /// Nothing to propose until more results are observed (model-based methods).
    Wait,
    /// The search is over.
    Done,
}

/// A search strategy. `observe` receives the metric of a finished trial (None if it failed or
/// did not report the metric); values are oriented so that *smaller is better* (the caller
/// negates maximised metrics).
pub trait Strategy: Send {
    fn propose(&mut self) -> Proposal;
    fn observe(&mut self, index: u64, value: Option<f64>);
}

/// The next index of a search whose i-th point depends only on i (grid, random): 0..len in
/// order, then None. Replaying such a search after a restart gives the same points.
pub(crate) fn next_index(next: &mut u64, len: u64) -> Option<u64> {
    (*next < len).then(|| {
        *next += 1;
        *next - 1
    })
}

pub mod grid;
pub mod random;

/// The strategy for a validated sweep spec. New methods (the argmin-driven ones) add a match
/// arm here and a variant to [`crate::spec::Method`].
pub fn make_strategy(spec: &crate::spec::SweepSpec) -> Box<dyn Strategy> {
    match spec.method {
        crate::spec::Method::Grid => Box::new(grid::GridSearch::from_spec(spec)),
        crate::spec::Method::Random => Box::new(random::RandomSearch::from_spec(spec)),
    }
}
