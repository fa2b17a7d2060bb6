//! `bayes`: tree-structured Parzen estimators (TPE; Bergstra et al. 2011), the sampler behind
//! Optuna's default and the same family as W&B's `bayes`.
//!
//! The first `startup_trials` points are random (as [`super::random`] draws them). After that,
//! the finished trials are split into the best ~10% ("good", at most 25; Optuna's rule) and the
//! rest; for each parameter on its own, 24 candidates are drawn from the good trials' density
//! `l` and the one with the largest `l / g` (g: the rest's density) is proposed. Numeric
//! parameters live in the unit box of [`super::space`] (log-scaled ones in log space) with a
//! Parzen density of truncated Gaussians, one per trial plus a wide prior, each as wide as the
//! gap to its neighbours; categorical and `values` parameters have smoothed counts. A failed
//! trial counts as the worst.
//!
//! Asynchronous: a proposal never waits for results, so N workers keep N trials in flight; each
//! point's random draws come from (seed, index), and the model from the trials finished when it
//! is proposed. Resume needs no replay: the stored trials are the history
//! ([`Strategy::restore`]), and the search continues after the last one.

use super::space::Dim;
use super::{Outcome, Point, Proposal, Stored, Strategy};
use crate::spec::{Distribution, ParamSpec, SweepSpec, normalize_value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde_json::Value;
use std::collections::BTreeMap;

/// Candidates drawn per parameter per proposal (Optuna's `n_ei_candidates`).
const CANDIDATES: usize = 24;

#[derive(Debug, Clone)]
enum Param {
    Fixed(Value),
    Numeric(Dim),
    Choice(Vec<Value>),
}

type Params = BTreeMap<String, Value>;

/// The strategy.
pub struct BayesSearch {
    params: Vec<(String, Param)>,
    /// The spec's parameters, for the random start-up draws.
    random: super::random::RandomSearch,
    seed: u64,
    startup: u64,
    len: u64,
    next: u64,
    /// Every proposed point and its result (None while in flight).
    history: BTreeMap<u64, (Params, Option<Option<f64>>)>,
}

impl BayesSearch {
    pub fn from_spec(spec: &SweepSpec) -> BayesSearch {
        let params = spec
            .parameters
            .iter()
            .map(|(name, p)| {
                let param = match p {
                    ParamSpec::Value(v) => Param::Fixed(normalize_value(name, v.clone())),
                    ParamSpec::Values(vs)
                    | ParamSpec::Distribution(Distribution::Categorical { values: vs, .. }) => {
                        Param::Choice(vs.iter().map(|v| normalize_value(name, v.clone())).collect())
                    }
                    ParamSpec::Distribution(d) => match Dim::new(name, d) {
                        Some(dim) => Param::Numeric(dim),
                        None => Param::Fixed(Value::Null),
                    },
                };
                (name.clone(), param)
            })
            .collect();
        let seed = spec.search.seed.unwrap_or(spec.seed);
        let all = spec.parameters.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        BayesSearch {
            params,
            random: super::random::RandomSearch::new(all, seed, spec.run_cap.unwrap_or(0)),
            seed,
            startup: spec.search.startup_trials,
            len: spec.run_cap.unwrap_or(0),
            next: 0,
            history: BTreeMap::new(),
        }
    }

    /// The point of proposal `index` given the trials finished now; `attempt` > 0 draws again
    /// (a new random stream) when an earlier draw repeated a known point.
    fn point(&self, index: u64, attempt: u64) -> Params {
        let mut done: Vec<(&Params, f64)> = self
            .history
            .values()
            .filter_map(|(p, r)| {
                r.map(|v| (p, v.filter(|v| v.is_finite()).unwrap_or(f64::INFINITY)))
            })
            .collect();
        if (done.len() as u64) < self.startup.max(1) {
            return self.random.point_at(index + attempt * self.len.max(1));
        }
        done.sort_by(|a, b| a.1.total_cmp(&b.1));
        let n_good = done.len().div_ceil(10).clamp(1, 25);
        let (good, bad) = done.split_at(n_good);
        let stream =
            super::random::point_seed(self.seed ^ 0x7BE5, index) ^ attempt.wrapping_mul(0x9E37);
        let mut rng = StdRng::seed_from_u64(stream);
        let mut out = Params::new();
        for (name, param) in &self.params {
            let value = match param {
                Param::Fixed(v) => v.clone(),
                Param::Numeric(dim) => {
                    let coords = |set: &[(&Params, f64)]| -> Vec<f64> {
                        set.iter()
                            .filter_map(|(p, _)| p.get(name).and_then(|v| dim.coord(v)))
                            .collect()
                    };
                    let (l, g) = (Parzen::new(&coords(good)), Parzen::new(&coords(bad)));
                    let best = (0..CANDIDATES)
                        .map(|_| l.sample(&mut rng))
                        .max_by(|a, b| {
                            (l.log_pdf(*a) - g.log_pdf(*a))
                                .total_cmp(&(l.log_pdf(*b) - g.log_pdf(*b)))
                        })
                        .unwrap_or(0.5);
                    dim.value(best)
                }
                Param::Choice(values) => {
                    let weights = |set: &[(&Params, f64)]| -> Vec<f64> {
                        let mut w = vec![1.0; values.len()];
                        for (p, _) in set {
                            if let Some(i) =
                                p.get(name).and_then(|v| values.iter().position(|x| x == v))
                            {
                                w[i] += 1.0;
                            }
                        }
                        let total: f64 = w.iter().sum();
                        w.iter().map(|x| x / total).collect()
                    };
                    let (l, g) = (weights(good), weights(bad));
                    let best = (0..CANDIDATES)
                        .map(|_| draw(&l, rng.random::<f64>()))
                        .max_by(|&a, &b| (l[a] / g[a]).total_cmp(&(l[b] / g[b])).then(b.cmp(&a)))
                        .unwrap_or(0);
                    values[best].clone()
                }
            };
            out.insert(name.clone(), value);
        }
        out
    }
}

impl Strategy for BayesSearch {
    fn propose(&mut self) -> Proposal {
        if self.next >= self.len {
            return Proposal::Done;
        }
        let index = self.next;
        self.next += 1;
        // A point already tried (or in flight) teaches nothing new: draw again, a few times
        // (a small discrete space may have nothing new left, and then a repeat is proposed).
        let known = |p: &Params| self.history.values().any(|(q, _)| q == p);
        let mut params = self.point(index, 0);
        for attempt in 1..=8 {
            if !known(&params) {
                break;
            }
            params = self.point(index, attempt);
        }
        // The model keeps choosing known points (a small discrete space): explore at random.
        for attempt in 1..=32 {
            if !known(&params) {
                break;
            }
            params = self.random.point_at(index + attempt * self.len.max(1));
        }
        self.history.insert(index, (params.clone(), None));
        Proposal::Point(Point { index, params })
    }

    fn observe(&mut self, index: u64, value: Option<f64>) {
        if let Some(entry) = self.history.get_mut(&index) {
            entry.1 = Some(value);
        }
    }

    fn restores(&self) -> bool {
        true
    }

    fn restore(&mut self, stored: &[Stored]) {
        for t in stored {
            let result = match t.outcome {
                Outcome::Pending => None,
                Outcome::Finished(v) => Some(v),
            };
            self.history.insert(t.index, (t.params.clone(), result));
            self.next = self.next.max(t.index + 1);
        }
    }
}

/// The index `u` (in [0, 1)) falls on in the cumulative weights.
fn draw(weights: &[f64], u: f64) -> usize {
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if u < acc {
            return i;
        }
    }
    weights.len().saturating_sub(1)
}

/// A Parzen density on [0, 1]: truncated Gaussians at each observation and a wide prior at the
/// centre, equally weighted, each as wide as the larger gap to its neighbours.
struct Parzen {
    mus: Vec<f64>,
    sigmas: Vec<f64>,
}

impl Parzen {
    fn new(xs: &[f64]) -> Parzen {
        let mut mus: Vec<f64> = xs.to_vec();
        mus.push(0.5);
        mus.sort_by(f64::total_cmp);
        let n = mus.len();
        let min_sigma = 1.0 / (n as f64 + 1.0).min(100.0);
        let sigmas = (0..n)
            .map(|i| {
                let left = if i == 0 { mus[0] } else { mus[i] - mus[i - 1] };
                let right = if i + 1 == n { 1.0 - mus[i] } else { mus[i + 1] - mus[i] };
                left.max(right).clamp(min_sigma, 1.0)
            })
            .collect::<Vec<_>>();
        // The prior keeps its full width: it is what lets the search leave the good region.
        let mut p = Parzen { mus, sigmas };
        if let Some(i) = p.mus.iter().position(|&m| m == 0.5) {
            p.sigmas[i] = 1.0;
        }
        p
    }

    fn sample(&self, rng: &mut StdRng) -> f64 {
        let i = rng.random_range(0..self.mus.len());
        for _ in 0..32 {
            let x = self.mus[i] + self.sigmas[i] * rng.sample::<f64, _>(StandardNormal);
            if (0.0..=1.0).contains(&x) {
                return x;
            }
        }
        self.mus[i].clamp(0.0, 1.0)
    }

    fn log_pdf(&self, x: f64) -> f64 {
        let k = self.mus.len() as f64;
        let density: f64 = self
            .mus
            .iter()
            .zip(&self.sigmas)
            .map(|(&m, &s)| {
                let mass = phi((1.0 - m) / s) - phi(-m / s);
                let z = (x - m) / s;
                (-0.5 * z * z).exp() / (s * (2.0 * std::f64::consts::PI).sqrt() * mass.max(1e-12))
            })
            .sum::<f64>()
            / k;
        density.max(1e-300).ln()
    }
}

/// The standard normal CDF (Abramowitz and Stegun 7.1.26 for erf; error below 1.5e-7).
fn phi(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    0.5 * (1.0 + if x >= 0.0 { erf } else { -erf })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(run_cap: u64, seed: u64) -> SweepSpec {
        let text = format!(
            "name: b\nmethod: bayes\nrun_cap: {run_cap}\nseed: {seed}\nparameters:\n  lr:\n    distribution: log_uniform_values\n    min: 0.00001\n    max: 0.1\n  layer_k:\n    distribution: int_uniform\n    min: 1\n    max: 32\n  optimizer:\n    values: [adam, sgd, adamw]\n"
        );
        SweepSpec::parse(&text, "b.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn objective(p: &Params) -> f64 {
        let lr = p["lr"].as_f64().unwrap().log10();
        let k = p["layer_k"].as_f64().unwrap();
        let opt = if p["optimizer"] == "adamw" { 0.0 } else { 0.5 };
        (lr + 3.0).powi(2) + ((k - 20.0) / 8.0).powi(2) + opt
    }

    fn run(s: &mut BayesSearch, in_flight: usize) -> Vec<(u64, f64)> {
        let mut running = std::collections::VecDeque::new();
        let mut out = Vec::new();
        loop {
            while running.len() < in_flight {
                match s.propose() {
                    Proposal::Point(p) => running.push_back(p),
                    _ => break,
                }
            }
            let Some(p) = running.pop_front() else { break };
            let v = objective(&p.params);
            out.push((p.index, v));
            s.observe(p.index, Some(v));
        }
        out
    }

    #[test]
    fn the_model_beats_random_search_at_the_same_budget() {
        let (mut tpe_wins, mut total) = (0, 0);
        for seed in 0..5 {
            let mut tpe = BayesSearch::from_spec(&spec(60, seed));
            let best_tpe = run(&mut tpe, 4).iter().map(|r| r.1).fold(f64::MAX, f64::min);
            let mut random = super::super::random::RandomSearch::from_spec(&spec(60, seed));
            let mut best_random = f64::MAX;
            while let Proposal::Point(p) = random.propose() {
                best_random = best_random.min(objective(&p.params));
            }
            total += 1;
            if best_tpe < best_random {
                tpe_wins += 1;
            }
        }
        assert!(tpe_wins >= 4, "TPE beat random in {tpe_wins} of {total} seeds");
    }

    #[test]
    fn startup_points_are_random_search_points_and_proposals_never_wait() {
        let mut s = BayesSearch::from_spec(&spec(30, 4));
        let random = super::super::random::RandomSearch::from_spec(&spec(30, 4));
        for i in 0..10 {
            match s.propose() {
                Proposal::Point(p) => assert_eq!(p.params, random.point_at(i)),
                other => panic!("{other:?}"),
            }
        }
        // With nothing observed, the model is not used and nothing waits.
        assert!(matches!(s.propose(), Proposal::Point(_)));
    }

    #[test]
    fn a_restored_search_continues_after_the_stored_trials() {
        let mut first = BayesSearch::from_spec(&spec(20, 1));
        let done = run(&mut first, 2);
        let stored: Vec<Stored> = (0..12u64)
            .map(|i| Stored {
                index: i,
                params: first.history[&i].0.clone(),
                outcome: if i < 10 {
                    Outcome::Finished(Some(done.iter().find(|d| d.0 == i).unwrap().1))
                } else {
                    Outcome::Pending
                },
            })
            .collect();
        let mut resumed = BayesSearch::from_spec(&spec(20, 1));
        resumed.restore(&stored);
        let mut n = 0;
        while let Proposal::Point(p) = resumed.propose() {
            assert!(p.index >= 12);
            n += 1;
        }
        assert_eq!(n, 8, "run_cap counts the stored trials");
    }

    #[test]
    fn phi_is_the_normal_cdf() {
        for (z, want) in [(0.0, 0.5), (1.0, 0.841_344_7), (-1.96, 0.024_997_9)] {
            assert!((phi(z) - want).abs() < 1e-6, "phi({z})");
        }
    }

    #[test]
    fn a_small_discrete_space_is_covered_before_points_repeat() {
        // 3 x 4 = 12 points; 12 proposals should try most of them, not retrain a few.
        let spec = SweepSpec::parse(
            "name: d\nmethod: bayes\nrun_cap: 12\nsearch: {startup_trials: 3}\nparameters:\n  layer_k: {distribution: int_uniform, min: 1, max: 4}\n  optimizer: {values: [adam, sgd, adamw]}\n",
            "d.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut s = BayesSearch::from_spec(&spec);
        let mut seen = std::collections::BTreeSet::new();
        while let Proposal::Point(p) = s.propose() {
            seen.insert(serde_json::to_string(&p.params).unwrap());
            s.observe(p.index, Some(p.params["layer_k"].as_f64().unwrap()));
        }
        assert!(seen.len() >= 10, "{} distinct points of 12", seen.len());
    }
}
