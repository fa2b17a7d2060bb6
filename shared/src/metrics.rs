//! The metrics msae knows: their stable names and, in [`TABLE`], what every consumer needs to
//! know about each (which way is better, whether the ranked report shows it, whether the
//! TensorBoard HParams table lists it). Reports, TensorBoard tags, sweep `metric.name` and the
//! spec's list of known metrics all come from here.

use serde::{Deserialize, Serialize};

/// Mean squared reconstruction error per element on the validation set.
pub const MSE: &str = "mse";
/// Fraction of variance unexplained: sum (x - x_hat)^2 / sum (x - mean(x))^2.
pub const FVU: &str = "fvu";
/// Mean number of non-zero codes per sample.
pub const L0: &str = "l0";
/// Mean number of stripes with any non-zero code per sample.
pub const ACTIVE_STRIPES: &str = "active_stripes";
/// Fraction of code neurons that never fired over the evaluation pass.
pub const DEAD_NEURONS: &str = "dead_neurons";
/// Fraction of stripes that never fired over the evaluation pass.
pub const DEAD_STRIPES: &str = "dead_stripes";
/// Entropy (nats) of the distribution of stripe activations over the evaluation pass.
pub const STRIPE_ENTROPY: &str = "stripe_entropy";
/// Mean over true features of the max cosine similarity with a decoder atom (synthetic data).
pub const MMCS: &str = "mmcs";
/// How well learned stripes match the true feature clusters, in [0, 1] (synthetic data).
pub const STRIPE_CLUSTER_MATCH: &str = "stripe_cluster_match";
/// Total loss (reconstruction + penalties) on the validation set.
pub const VAL_LOSS: &str = "val_loss";
/// Total loss on the last training batch.
pub const TRAIN_LOSS: &str = "train_loss";
/// Training steps taken.
pub const STEPS: &str = "steps";
/// Training throughput.
pub const SAMPLES_PER_SECOND: &str = "samples_per_s";

/// Which way a metric is better: the direction a sweep ranks (and a search optimises) it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    #[default]
    Minimize,
    Maximize,
}

impl Goal {
    /// Every goal's name, as sweeps, the CLI and the Report RPC spell it.
    pub const NAMES: &[&str] = &["minimize", "maximize"];

    /// The goal's name (`minimize`, `maximize`).
    pub fn name(self) -> &'static str {
        match self {
            Goal::Minimize => "minimize",
            Goal::Maximize => "maximize",
        }
    }

    /// The goal named `name`, if any.
    pub fn from_name(name: &str) -> Option<Goal> {
        match name {
            "minimize" => Some(Goal::Minimize),
            "maximize" => Some(Goal::Maximize),
            _ => None,
        }
    }
}

/// One row of [`TABLE`]: a standard metric and how each consumer treats it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// The stable name (one of the constants above; their docs say what it measures).
    pub name: &'static str,
    /// Which way it is better: the goal `report --metric NAME` ranks by when the sweep ranks
    /// by another metric.
    pub goal: Goal,
    /// Shown as a column of the ranked report (besides the sweep metric) when trials report it.
    pub report: bool,
    /// Listed as a metric of a sweep's TensorBoard HParams experiment (besides the sweep
    /// metric). Every scalar a trial reports is logged either way; this picks the HParams
    /// table's columns.
    pub tensorboard: bool,
}

const fn row(name: &'static str, goal: Goal, report: bool, tensorboard: bool) -> Metric {
    Metric { name, goal, report, tensorboard }
}

use Goal::{Maximize as MAX, Minimize as MIN};

/// Every standard metric a trial may report (per-class statistics are no metrics: see
/// [`crate::class_stats`]). The order is the report's column order.
#[rustfmt::skip]
pub const TABLE: &[Metric] = &[
    //   name                  goal  report tensorboard
    row(FVU,                   MIN,  true,  true),
    row(MSE,                   MIN,  true,  true),
    row(L0,                    MIN,  true,  true),
    row(ACTIVE_STRIPES,        MIN,  true,  false),
    row(DEAD_NEURONS,          MIN,  true,  false),
    row(DEAD_STRIPES,          MIN,  false, false),
    row(STRIPE_ENTROPY,        MIN,  false, false),
    row(MMCS,                  MAX,  true,  false),
    row(STRIPE_CLUSTER_MATCH,  MAX,  false, false),
    row(VAL_LOSS,              MIN,  false, false),
    row(TRAIN_LOSS,            MIN,  false, false),
    row(STEPS,                 MIN,  false, false),
    row(SAMPLES_PER_SECOND,    MAX,  false, false),
];

/// Every standard metric name, in [`TABLE`] order.
pub const STANDARD: [&str; TABLE.len()] = {
    let mut names = [""; TABLE.len()];
    let mut i = 0;
    while i < TABLE.len() {
        names[i] = TABLE[i].name;
        i += 1;
    }
    names
};

/// The row of the standard metric `name`.
pub fn get(name: &str) -> Option<&'static Metric> {
    TABLE.iter().find(|m| m.name == name)
}

/// The direction in which `name` is better: its row's goal; minimize for any other metric
/// (a runner's own).
pub fn natural_goal(name: &str) -> Goal {
    get(name).map_or(Goal::Minimize, |m| m.goal)
}

/// The metrics the ranked report shows besides the sweep metric, in column order.
pub fn in_report<'a>() -> impl Iterator<Item = &'a str> {
    TABLE.iter().filter(|m| m.report).map(|m| m.name)
}

/// The metrics a sweep's TensorBoard HParams experiment lists besides the sweep metric.
pub fn in_tensorboard<'a>() -> impl Iterator<Item = &'a str> {
    TABLE.iter().filter(|m| m.tensorboard).map(|m| m.name)
}

/// Whether `name` is a metric msae's trials report.
pub fn is_standard(name: &str) -> bool {
    STANDARD.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_unique_and_standard() {
        let mut names: Vec<&str> = STANDARD.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TABLE.len(), "a metric is listed twice");
        for m in TABLE {
            assert!(is_standard(m.name), "{}", m.name);
            assert_eq!(get(m.name), Some(m));
            assert_eq!(natural_goal(m.name), m.goal);
        }
        assert!(!is_standard("stripe_usage/class_2/stripe_3") && !is_standard("my_score"));
    }

    #[test]
    fn goals_follow_the_metric() {
        // Higher is better for feature recovery and throughput, lower for everything else.
        let max: Vec<&str> =
            TABLE.iter().filter(|m| m.goal == Goal::Maximize).map(|m| m.name).collect();
        assert_eq!(max, [MMCS, STRIPE_CLUSTER_MATCH, SAMPLES_PER_SECOND]);
        assert_eq!(natural_goal("my_score"), Goal::Minimize);
    }

    #[test]
    fn report_and_tensorboard_subsets() {
        let report: Vec<&str> = in_report().collect();
        assert_eq!(report, [FVU, MSE, L0, ACTIVE_STRIPES, DEAD_NEURONS, MMCS]);
        let tensorboard: Vec<&str> = in_tensorboard().collect();
        assert_eq!(tensorboard, [FVU, MSE, L0]);
    }

    #[test]
    fn goal_names_round_trip() {
        for name in Goal::NAMES {
            let goal = Goal::from_name(name).unwrap();
            assert_eq!(goal.name(), *name);
            assert_eq!(serde_json::to_value(goal).unwrap(), *name, "serde spells it the same");
        }
        assert_eq!(Goal::from_name("max"), None);
    }
}
