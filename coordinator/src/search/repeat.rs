//! `repeats: N`: every point of the search trains N times, with trial-config seeds `seed`,
//! `seed + 1`, ..., and the search sees the mean of the N results.
//!
//! Point `i` of the inner search becomes trials `i N .. i N + N - 1` (the `seed` parameter
//! added), so the mapping is arithmetic and survives a restart. The inner search observes point
//! `i` once all of its repeats are final: the mean of their results, or nothing (a failure,
//! which the searches answer with the worst value) when any repeat failed.

use super::{Outcome, Point, Proposal, Stored, Strategy};
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};

/// The trial-config field the repeats vary.
pub const SEED: &str = "seed";

/// An inner strategy with each point repeated.
pub struct Repeated {
    inner: Box<dyn Strategy>,
    n: u64,
    /// The trial seed of repeat 0.
    base_seed: u64,
    queue: VecDeque<Point>,
    /// Per inner point: the results of its repeats so far (None: failed).
    results: BTreeMap<u64, Vec<Option<f64>>>,
}

impl Repeated {
    pub fn new(inner: Box<dyn Strategy>, n: u64, base_seed: u64) -> Repeated {
        Repeated { inner, n: n.max(1), base_seed, queue: VecDeque::new(), results: BTreeMap::new() }
    }

    fn expand(&mut self, p: Point) {
        for r in 0..self.n {
            let mut params = p.params.clone();
            params.insert(SEED.to_string(), Value::from(self.base_seed + r));
            self.queue.push_back(Point { index: p.index * self.n + r, params });
        }
    }

    /// Records repeat `index`'s result; returns the inner point's mean once all are in.
    fn record(&mut self, index: u64, value: Option<f64>) -> Option<(u64, Option<f64>)> {
        let point = index / self.n;
        let rs = self.results.entry(point).or_default();
        rs.push(value);
        if (rs.len() as u64) < self.n {
            return None;
        }
        // A repeat without a finite result makes the point a failure for the search (which then
        // answers with the worst value): a configuration that diverges on some seeds is bad.
        let finite: Vec<f64> = rs.iter().flatten().copied().filter(|v| v.is_finite()).collect();
        let mean =
            (finite.len() == rs.len()).then(|| finite.iter().sum::<f64>() / finite.len() as f64);
        Some((point, mean))
    }
}

impl Strategy for Repeated {
    fn propose(&mut self) -> Proposal {
        if self.queue.is_empty() {
            match self.inner.propose() {
                Proposal::Point(p) => self.expand(p),
                other => return other,
            }
        }
        self.queue.pop_front().map(Proposal::Point).unwrap_or(Proposal::Wait)
    }

    fn observe(&mut self, index: u64, value: Option<f64>) {
        if let Some((point, mean)) = self.record(index, value) {
            self.inner.observe(point, mean);
        }
    }

    fn restores(&self) -> bool {
        self.inner.restores()
    }

    fn restore(&mut self, stored: &[Stored]) {
        let mut inner: BTreeMap<u64, Stored> = BTreeMap::new();
        for t in stored {
            let point = t.index / self.n;
            let mut params = t.params.clone();
            params.remove(SEED);
            let entry = inner.entry(point).or_insert(Stored {
                index: point,
                params,
                outcome: Outcome::Pending,
            });
            if let Outcome::Finished(v) = t.outcome
                && let Some((_, mean)) = self.record(t.index, v)
            {
                entry.outcome = Outcome::Finished(mean);
            }
        }
        // A point whose repeats were not all proposed before the stop: the rest follow first.
        let stored_count = stored.len() as u64;
        if let Some(last) = inner.values().last()
            && !stored_count.is_multiple_of(self.n)
        {
            let mut p = Point { index: last.index, params: last.params.clone() };
            let have = stored_count % self.n;
            p.params.remove(SEED);
            for r in have..self.n {
                let mut params = p.params.clone();
                params.insert(SEED.to_string(), Value::from(self.base_seed + r));
                self.queue.push_back(Point { index: p.index * self.n + r, params });
            }
        }
        let inner: Vec<Stored> = inner.into_values().collect();
        self.inner.restore(&inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::tests::ListStrategy;

    #[test]
    fn each_point_repeats_with_consecutive_seeds_and_the_search_sees_the_mean() {
        let inner = ListStrategy::new(2);
        let observed = inner.observed.clone();
        let mut s = Repeated::new(Box::new(inner), 3, 10);
        let mut points = Vec::new();
        while let Proposal::Point(p) = s.propose() {
            points.push(p);
        }
        let seeds: Vec<(u64, Value)> =
            points.iter().map(|p| (p.index, p.params[SEED].clone())).collect();
        assert_eq!(
            seeds,
            [
                (0, 10.into()),
                (1, 11.into()),
                (2, 12.into()),
                (3, 10.into()),
                (4, 11.into()),
                (5, 12.into())
            ]
        );
        s.observe(0, Some(1.0));
        s.observe(2, Some(3.0));
        assert!(observed.lock().unwrap().is_empty(), "not before every repeat is in");
        s.observe(1, Some(2.0));
        s.observe(3, Some(1.0));
        s.observe(4, None);
        s.observe(5, Some(1.0));
        assert_eq!(
            *observed.lock().unwrap(),
            vec![(0, Some(2.0)), (1, None)],
            "the mean of (1, 2, 3); a point with a failed repeat is a failure"
        );
    }

    #[test]
    fn a_restored_search_finishes_a_point_s_repeats_then_continues() {
        let spec = crate::spec::SweepSpec::parse(
            "name: r\nmethod: bayes\nrun_cap: 30\nrepeats: 3\nbase: {seed: 7}\nparameters:\n  lr: {distribution: log_uniform_values, min: 0.0001, max: 0.01}\n",
            "r.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.planned_trials(), Some(30));
        let mut first = crate::search::make_strategy(&spec);
        let points: Vec<Point> = (0..5)
            .map(|_| match first.propose() {
                Proposal::Point(p) => p,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(points[3].params[SEED], 7);
        assert_eq!(points[4].params[SEED], 8);
        let stored: Vec<Stored> = points
            .iter()
            .map(|p| Stored {
                index: p.index,
                params: p.params.clone(),
                outcome: Outcome::Finished(Some(0.5)),
            })
            .collect();
        let mut resumed = crate::search::make_strategy(&spec);
        resumed.restore(&stored);
        let Proposal::Point(p5) = resumed.propose() else { panic!("no point") };
        assert_eq!(p5.index, 5);
        assert_eq!(p5.params[SEED], 9);
        assert_eq!(p5.params["lr"], points[3].params["lr"], "the third repeat of point 1");
        let Proposal::Point(p6) = resumed.propose() else { panic!("no point") };
        assert_eq!((p6.index, p6.params[SEED].clone()), (6, Value::from(7)));
    }
}
