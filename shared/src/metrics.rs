//! Stable metric names. Reports, TensorBoard tags and sweep `metric.name` use these strings.

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
/// Prefix of per-class stripe usage: `stripe_usage/class_{c}/stripe_{s}` is the fraction of
/// validation samples of class c for which stripe s was active.
pub const CLASS_STRIPE_USAGE_PREFIX: &str = "stripe_usage";

/// Name of the per-class stripe usage metric for class `class` and stripe `stripe`.
pub fn class_stripe_usage(class: usize, stripe: usize) -> String {
    format!("{CLASS_STRIPE_USAGE_PREFIX}/class_{class}/stripe_{stripe}")
}

/// Every standard metric name a trial may report (besides the per-class usage family).
pub const STANDARD: &[&str] = &[
    MSE,
    FVU,
    L0,
    ACTIVE_STRIPES,
    DEAD_NEURONS,
    DEAD_STRIPES,
    STRIPE_ENTROPY,
    MMCS,
    STRIPE_CLUSTER_MATCH,
    VAL_LOSS,
    TRAIN_LOSS,
    STEPS,
    SAMPLES_PER_SECOND,
];

/// Whether `name` is a metric msae's trials report: a standard name or a per-class usage name.
pub fn is_standard(name: &str) -> bool {
    STANDARD.contains(&name)
        || name
            .strip_prefix(CLASS_STRIPE_USAGE_PREFIX)
            .is_some_and(|rest| rest.starts_with("/class_"))
}
