//! Random search: `run_cap` independent samples, with W&B Sweeps' distributions.
//!
//! Point `i` is drawn from its own generator, `StdRng::seed_from_u64(mix(seed, i))`, so it is
//! a pure function of (seed, i): a resumed sweep replays identical points whatever happened in
//! between, and points do not depend on each other. Parameters are sampled in name order.
//! Results are ignored.

use super::{Point, Proposal, Strategy, next_index};
use crate::spec::{Distribution, ParamSpec, SweepSpec, q_multiple, sample_value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeMap;

/// The random strategy.
#[derive(Debug, Clone)]
pub struct RandomSearch {
    params: Vec<(String, ParamSpec)>,
    seed: u64,
    len: u64,
    next: u64,
}

impl RandomSearch {
    /// `run_cap` samples of `params` from `seed`.
    pub fn new(params: Vec<(String, ParamSpec)>, seed: u64, run_cap: u64) -> Self {
        RandomSearch { params, seed, len: run_cap, next: 0 }
    }

    /// The random search of a validated spec (a spec without run_cap proposes nothing).
    pub fn from_spec(spec: &SweepSpec) -> Self {
        if spec.run_cap.is_none() {
            tracing::error!(sweep = %spec.name, "random search without run_cap proposes nothing");
        }
        let params = spec.parameters.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        RandomSearch::new(params, spec.seed, spec.run_cap.unwrap_or(0))
    }

    /// The parameters of point `index`: a pure function of (seed, index).
    pub fn point_at(&self, index: u64) -> BTreeMap<String, Value> {
        let mut rng = StdRng::seed_from_u64(point_seed(self.seed, index));
        self.params.iter().map(|(name, p)| (name.clone(), sample(name, p, &mut rng))).collect()
    }
}

impl Strategy for RandomSearch {
    fn propose(&mut self) -> Proposal {
        match next_index(&mut self.next, self.len) {
            Some(index) => Proposal::Point(Point { index, params: self.point_at(index) }),
            None => Proposal::Done,
        }
    }

    fn observe(&mut self, _index: u64, _value: Option<f64>) {}
}

/// SplitMix64 finaliser: decorrelates nearby seeds and indexes.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The seed of point `index`; hashing the sweep seed first keeps (s, i) and (i, s) apart.
pub(crate) fn point_seed(seed: u64, index: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ index)
}

/// One sample of parameter `path` (integer trial-config fields get integers).
pub fn sample(path: &str, p: &ParamSpec, rng: &mut StdRng) -> Value {
    match p {
        ParamSpec::Value(v) => v.clone(),
        ParamSpec::Values(vs) => vs[rng.random_range(0..vs.len())].clone(),
        ParamSpec::Distribution(d) => match d {
            Distribution::Uniform { min, max } => sample_value(path, rng.random_range(*min..*max)),
            Distribution::LogUniformValues { min, max } => {
                let x = rng.random_range(min.ln()..max.ln()).exp();
                // exp(ln x) may round a hair outside the bounds.
                sample_value(path, x.clamp(*min, *max))
            }
            Distribution::IntUniform { min, max } => Value::from(rng.random_range(*min..=*max)),
            Distribution::QUniform { min, max, q } => {
                let x = rng.random_range(*min..*max);
                sample_value(path, q_multiple((x / q).round(), *q))
            }
            Distribution::Categorical { values, probabilities } => match probabilities {
                None => values[rng.random_range(0..values.len())].clone(),
                Some(probs) => values[weighted_index(probs, rng.random::<f64>())].clone(),
            },
        },
    }
}

/// The index whose cumulative probability first exceeds `u` in [0, 1); the last index with a
/// non-zero weight when rounding leaves `u` past the total.
fn weighted_index(probs: &[f64], u: f64) -> usize {
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return i;
        }
    }
    probs.iter().rposition(|p| *p > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(params: &str, seed: u64, run_cap: u64) -> SweepSpec {
        let text = format!(
            "name: r\nmethod: random\nrun_cap: {run_cap}\nseed: {seed}\nparameters:\n{params}"
        );
        SweepSpec::parse(&text, "r.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn drain(s: &mut RandomSearch) -> Vec<Point> {
        let mut out = Vec::new();
        while let Proposal::Point(p) = s.propose() {
            out.push(p);
        }
        out
    }

    const MIXED: &str = "  lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}\n  \
                         layer_k: {distribution: int_uniform, min: 2, max: 9}\n  \
                         l1_weight: {distribution: uniform, min: 0.0, max: 0.5}\n  \
                         kl_target: {distribution: q_uniform, min: 0.05, max: 0.5, q: 0.05}\n  \
                         optimizer: {values: [adam, adamw, sgd]}\n";

    #[test]
    fn run_cap_points_then_done() {
        let mut r = RandomSearch::from_spec(&spec(MIXED, 1, 25));
        let points = drain(&mut r);
        assert_eq!(points.len(), 25);
        assert!(points.iter().enumerate().all(|(i, p)| p.index == i as u64));
        assert_eq!(r.propose(), Proposal::Done);
    }

    #[test]
    fn reproducible_by_index_and_seed() {
        let s = spec(MIXED, 7, 50);
        let all = drain(&mut RandomSearch::from_spec(&s));
        let again = drain(&mut RandomSearch::from_spec(&s));
        assert_eq!(all, again);
        // Point i alone, out of order, equals the i-th proposal (what resume relies on).
        let r = RandomSearch::from_spec(&s);
        for i in [49u64, 0, 17, 3] {
            assert_eq!(r.point_at(i), all[i as usize].params);
        }
        let other = drain(&mut RandomSearch::from_spec(&spec(MIXED, 8, 50)));
        assert_ne!(all, other, "another seed gives other points");
        assert_ne!(all[0].params, all[1].params, "points differ from each other");
    }

    #[test]
    fn bounds_and_integer_types() {
        let r = RandomSearch::from_spec(&spec(MIXED, 3, 2000));
        for i in 0..2000 {
            let p = r.point_at(i);
            let lr = p["lr"].as_f64().unwrap();
            assert!((1e-4..=1e-2).contains(&lr), "lr {lr}");
            let k = &p["layer_k"];
            assert!(k.is_u64() && (2..=9).contains(&k.as_u64().unwrap()), "layer_k {k}");
            let l1 = p["l1_weight"].as_f64().unwrap();
            assert!((0.0..0.5).contains(&l1), "l1 {l1}");
            let kl = p["kl_target"].as_f64().unwrap();
            let steps = kl / 0.05;
            assert!((steps - steps.round()).abs() < 1e-9 && (0.05..=0.5).contains(&kl), "kl {kl}");
            assert!(["adam", "adamw", "sgd"].contains(&p["optimizer"].as_str().unwrap()));
        }
    }

    #[test]
    fn rough_frequencies() {
        let n = 6000;
        let r = RandomSearch::from_spec(&spec(MIXED, 11, n));
        let mut k_counts = [0usize; 10];
        let mut lr_low = 0;
        for i in 0..n {
            let p = r.point_at(i);
            k_counts[p["layer_k"].as_u64().unwrap() as usize] += 1;
            // Log-uniform: half the mass below the geometric mean 1e-3.
            if p["lr"].as_f64().unwrap() < 1e-3 {
                lr_low += 1;
            }
        }
        for (k, c) in k_counts.iter().enumerate().skip(2) {
            // 8 equally likely values, both ends included: 750 expected each.
            assert!((600..900).contains(c), "layer_k {k}: {c}");
        }
        assert!((2700..3300).contains(&lr_low), "log-uniform below the midpoint: {lr_low}");
    }

    #[test]
    fn categorical_probabilities() {
        let s = spec(
            "  optimizer: {distribution: categorical, values: [adam, sgd, adamw], probabilities: [0.7, 0.0, 0.3]}\n",
            5,
            4000,
        );
        let r = RandomSearch::from_spec(&s);
        let mut adam = 0;
        for i in 0..4000 {
            match r.point_at(i)["optimizer"].as_str().unwrap() {
                "adam" => adam += 1,
                "adamw" => {}
                other => panic!("zero-probability value drawn: {other}"),
            }
        }
        assert!((2650..2950).contains(&adam), "adam {adam} of 4000 at p = 0.7");
        assert_eq!(weighted_index(&[0.5, 0.5, 0.0], 0.999_999_999_9), 1);
    }

    #[test]
    fn continuous_samples_on_integer_fields_are_integers() {
        let r = RandomSearch::from_spec(&spec(
            "  stripe_dim: {distribution: log_uniform_values, min: 4, max: 64}\n",
            2,
            300,
        ));
        for i in 0..300 {
            let d = &r.point_at(i)["stripe_dim"];
            assert!(d.is_u64() && (4..=64).contains(&d.as_u64().unwrap()), "{d}");
        }
    }

    #[test]
    fn observe_is_ignored() {
        let s = spec(MIXED, 4, 10);
        let plain = drain(&mut RandomSearch::from_spec(&s));
        let mut r = RandomSearch::from_spec(&s);
        let mut observed = Vec::new();
        while let Proposal::Point(p) = r.propose() {
            r.observe(p.index, Some(p.index as f64));
            observed.push(p);
        }
        assert_eq!(plain, observed);
        assert_eq!(json!(observed.len()), json!(10));
    }
}
