//! Per-class statistics ([`ClassStats`]) in TensorBoard's terms, as the original logged them:
//! the trial's run gets the reconstruction error of each class, and every stripe a run of its
//! own under the trial's (`stripe_07`), holding per class how many evaluation samples activate
//! it and, in routing mode, its mean router score. Tags are the same in every stripe run, so
//! TensorBoard draws the stripes of a trial on one chart per class.
//!
//! Only classes with samples are logged (a label below the largest that never occurs has
//! nothing to say), and only finite values.

use msae_shared::class_stats::ClassStats;

/// Trial run: `mse_by_class/{class}`, the reconstruction MSE per element over the class's
/// evaluation samples.
pub const MSE_BY_CLASS: &str = "mse_by_class";
/// Stripe run: `class_activations/{class}`, the class's evaluation samples in which the stripe
/// has a non-zero code.
pub const CLASS_ACTIVATIONS: &str = "class_activations";
/// Stripe run (routing mode): `routing_score/{class}`, the stripe's mean router score over the
/// class's evaluation samples.
pub const ROUTING_SCORE: &str = "routing_score";

/// The run directory of stripe `stripe` among `num_stripes`, under the trial's: `stripe_07`,
/// zero-padded (to two digits at least) so that runs list in stripe order.
pub fn stripe_run(stripe: usize, num_stripes: usize) -> String {
    let width = num_stripes.saturating_sub(1).to_string().len().max(2);
    format!("stripe_{stripe:0width$}")
}

/// The scalars of the trial's own run.
pub fn trial_scalars(c: &ClassStats) -> Vec<(String, f64)> {
    c.present_classes()
        .map(|class| (format!("{MSE_BY_CLASS}/{class}"), c.class_mse()[class]))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// Every stripe's run directory name and scalars, in stripe order.
pub fn stripe_scalars(c: &ClassStats) -> Vec<(String, Vec<(String, f64)>)> {
    (0..c.num_stripes())
        .map(|s| {
            let mut scalars = Vec::new();
            for class in c.present_classes() {
                scalars.push((format!("{CLASS_ACTIVATIONS}/{class}"), c.active(s, class) as f64));
                if let Some(score) = c.routing_score(s, class).filter(|v| v.is_finite()) {
                    scalars.push((format!("{ROUTING_SCORE}/{class}"), score));
                }
            }
            (stripe_run(s, c.num_stripes()), scalars)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_runs_sort_in_stripe_order() {
        assert_eq!(stripe_run(7, 30), "stripe_07");
        assert_eq!(stripe_run(0, 1), "stripe_00");
        assert_eq!(stripe_run(99, 100), "stripe_99");
        assert_eq!(stripe_run(5, 101), "stripe_005");
    }

    #[test]
    fn only_present_classes_and_finite_values_are_logged() {
        // Two stripes, classes 0 and 2 present (1 absent); a NaN score and a NaN loss.
        let c = ClassStats::new(
            2,
            3,
            vec![3, 0, 5],
            vec![1, 0, 5, 3, 0, 0],
            Some(vec![0.5, 0.0, f64::NAN, -1.0, 0.0, 2.0]),
            vec![0.25, 0.0, f64::NAN],
        )
        .unwrap();
        assert_eq!(trial_scalars(&c), [("mse_by_class/0".to_string(), 0.25)]);
        let runs = stripe_scalars(&c);
        let tags = |run: usize| -> Vec<(&str, f64)> {
            runs[run].1.iter().map(|(t, v)| (t.as_str(), *v)).collect()
        };
        assert_eq!((runs[0].0.as_str(), runs[1].0.as_str()), ("stripe_00", "stripe_01"));
        assert_eq!(
            tags(0),
            [("class_activations/0", 1.0), ("routing_score/0", 0.5), ("class_activations/2", 5.0)]
        );
        assert_eq!(
            tags(1),
            [
                ("class_activations/0", 3.0),
                ("routing_score/0", -1.0),
                ("class_activations/2", 0.0),
                ("routing_score/2", 2.0)
            ]
        );
    }
}
