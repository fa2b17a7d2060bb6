//! Search strategies: one trait for grid, random, argmin's solvers and Bayesian search.
//!
//! Grid and random propose a fixed sequence from the sweep seed, so a restarted coordinator
//! resumes them by replaying: it creates the strategy again, and for each stored trial takes
//! the next proposal (which must match) and feeds back its stored result. The result-driven
//! methods' proposals depend on the order results arrived in, which a restart does not keep;
//! they are handed the stored trials instead ([`Strategy::restore`]).
//!
//! - [`grid`], [`random`]: fixed sequences.
//! - [`solvers`] (with [`oracle`] and [`space`]): `nelder_mead`, `particle_swarm`,
//!   `simulated_annealing`, one argmin solver per cell of the gridded parameters.
//! - [`bayes`]: tree-structured Parzen estimators.
//! - [`repeat`]: `repeats: N` around any of them.

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

    /// Whether a resumed sweep hands this strategy its stored trials ([`Strategy::restore`])
    /// instead of replaying proposals in index order.
    fn restores(&self) -> bool {
        false
    }

    /// The stored trials of a resumed sweep, in index order (called once, before anything
    /// else, and only when [`Strategy::restores`]). New proposals continue after the last index.
    fn restore(&mut self, _stored: &[Stored]) {}
}

/// A trial of a resumed sweep, as [`Strategy::restore`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub index: u64,
    pub params: BTreeMap<String, serde_json::Value>,
    pub outcome: Outcome,
}

/// Where a stored trial stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Queued or running: its result will come through [`Strategy::observe`].
    Pending,
    /// Finished, with its oriented metric (None: failed or no finite metric).
    Finished(Option<f64>),
}

/// The next index of a search whose i-th point depends only on i (grid, random): 0..len in
/// order, then None. Replaying such a search after a restart gives the same points.
pub(crate) fn next_index(next: &mut u64, len: u64) -> Option<u64> {
    (*next < len).then(|| {
        *next += 1;
        *next - 1
    })
}

pub mod bayes;
pub mod grid;
pub mod oracle;
pub mod random;
pub mod repeat;
pub mod solvers;
pub mod space;

/// The strategy for a validated sweep spec.
pub fn make_strategy(spec: &crate::spec::SweepSpec) -> Box<dyn Strategy> {
    use crate::spec::Method;
    let inner: Box<dyn Strategy> = match spec.method {
        Method::Grid => Box::new(grid::GridSearch::from_spec(spec)),
        Method::Random => Box::new(random::RandomSearch::from_spec(spec)),
        Method::NelderMead | Method::ParticleSwarm | Method::SimulatedAnnealing => {
            Box::new(solvers::SolverSearch::from_spec(spec))
        }
        Method::Bayes => Box::new(bayes::BayesSearch::from_spec(spec)),
    };
    if spec.repeats > 1 {
        Box::new(repeat::Repeated::new(inner, spec.repeats, spec.base_seed()))
    } else {
        inner
    }
}
