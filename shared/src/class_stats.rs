//! [`ClassStats`]: what one evaluation pass over labelled data says per class (label): how many
//! samples of the class activate each stripe, the router's mean score per class and stripe in
//! routing mode, and the reconstruction error per class. Workers compute them; the coordinator
//! logs them to TensorBoard. They travel beside an evaluation's scalars rather than inside
//! them, so stored metrics and reports keep a handful of names however many classes there are.

/// Most stripe-by-class cells one [`ClassStats`] may hold. At this size one evaluation's
/// statistics stay near 1 MB on the wire, well below the protocol's 4 MB message limit.
pub const MAX_CELLS: usize = 1 << 16;

/// Per-class statistics of one evaluation pass; the arrays always agree in shape (checked by
/// [`ClassStats::new`]). Stripe-by-class arrays are row-major: index `s * num_classes + c`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassStats {
    num_stripes: usize,
    num_classes: usize,
    class_samples: Vec<u64>,
    active: Vec<u64>,
    routing_score: Option<Vec<f64>>,
    class_mse: Vec<f64>,
}

/// Arrays that do not describe one stripe-by-class table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("class statistics: {0}")]
pub struct ShapeError(String);

impl ClassStats {
    /// Checks that `class_samples` and `class_mse` have `num_classes` entries, `active` and
    /// `routing_score` (when given) `num_stripes * num_classes`, that the table is not empty and
    /// has at most [`MAX_CELLS`] cells, and that no count exceeds its class's samples.
    pub fn new(
        num_stripes: usize,
        num_classes: usize,
        class_samples: Vec<u64>,
        active: Vec<u64>,
        routing_score: Option<Vec<f64>>,
        class_mse: Vec<f64>,
    ) -> Result<Self, ShapeError> {
        let err = |m: String| Err(ShapeError(m));
        if num_stripes == 0 || num_classes == 0 {
            return err(format!("{num_stripes} stripes x {num_classes} classes is empty"));
        }
        let cells = match num_stripes.checked_mul(num_classes) {
            Some(c) if c <= MAX_CELLS => c,
            _ => {
                return err(format!(
                    "{num_stripes} stripes x {num_classes} classes exceeds {MAX_CELLS} cells"
                ));
            }
        };
        let lengths = [
            ("class_samples", class_samples.len(), num_classes),
            ("class_mse", class_mse.len(), num_classes),
            ("stripe_class_active", active.len(), cells),
            ("routing_score_mean", routing_score.as_ref().map_or(cells, Vec::len), cells),
        ];
        for (name, got, want) in lengths {
            if got != want {
                return err(format!("{name} has {got} entries, expected {want}"));
            }
        }
        for (i, &n) in active.iter().enumerate() {
            let c = i % num_classes;
            if n > class_samples[c] {
                return err(format!(
                    "stripe {} is active for {n} samples of class {c}, which has {}",
                    i / num_classes,
                    class_samples[c]
                ));
            }
        }
        Ok(ClassStats { num_stripes, num_classes, class_samples, active, routing_score, class_mse })
    }

    pub fn num_stripes(&self) -> usize {
        self.num_stripes
    }

    /// Largest label + 1 (labels below it without samples included).
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The classes that have at least one sample, ascending.
    pub fn present_classes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_classes).filter(|&c| self.class_samples[c] > 0)
    }

    /// Samples per class.
    pub fn class_samples(&self) -> &[u64] {
        &self.class_samples
    }

    /// Samples of class `class` for which stripe `stripe` is active.
    pub fn active(&self, stripe: usize, class: usize) -> u64 {
        self.active[stripe * self.num_classes + class]
    }

    /// Every [`active`](Self::active) count, row-major by stripe.
    pub fn active_counts(&self) -> &[u64] {
        &self.active
    }

    /// Mean router score of `stripe` over the samples of `class`; `None` outside routing mode.
    pub fn routing_score(&self, stripe: usize, class: usize) -> Option<f64> {
        self.routing_score.as_ref().map(|r| r[stripe * self.num_classes + class])
    }

    /// Every [`routing_score`](Self::routing_score), row-major by stripe.
    pub fn routing_scores(&self) -> Option<&[f64]> {
        self.routing_score.as_deref()
    }

    /// Reconstruction MSE per element over the samples of each class.
    pub fn class_mse(&self) -> &[f64] {
        &self.class_mse
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_by_three(active: Vec<u64>, routing: Option<Vec<f64>>) -> Result<ClassStats, ShapeError> {
        ClassStats::new(2, 3, vec![4, 0, 2], active, routing, vec![0.5, 0.0, 0.25])
    }

    #[test]
    fn reads_stripe_major_cells() {
        let s =
            two_by_three(vec![1, 0, 2, 4, 0, 0], Some(vec![0.1, 0.0, 0.3, 0.4, 0.0, 0.6])).unwrap();
        assert_eq!((s.active(0, 2), s.active(1, 0)), (2, 4));
        assert_eq!(s.routing_score(1, 2), Some(0.6));
        assert_eq!(s.present_classes().collect::<Vec<_>>(), [0, 2]);
        let plain = two_by_three(vec![0; 6], None).unwrap();
        assert_eq!(plain.routing_score(0, 0), None);
    }

    #[test]
    fn refuses_arrays_of_another_shape() {
        let e = two_by_three(vec![0; 5], None).unwrap_err().to_string();
        assert!(e.contains("stripe_class_active has 5 entries, expected 6"), "{e}");
        let e = two_by_three(vec![0; 6], Some(vec![0.0; 3])).unwrap_err().to_string();
        assert!(e.contains("routing_score_mean has 3 entries"), "{e}");
        let e = two_by_three(vec![0, 1, 0, 0, 0, 0], None).unwrap_err().to_string();
        assert!(e.contains("stripe 0 is active for 1 samples of class 1, which has 0"), "{e}");
        assert!(ClassStats::new(0, 3, vec![0; 3], vec![], None, vec![0.0; 3]).is_err());
        let wide = MAX_CELLS + 1;
        let e = ClassStats::new(1, wide, vec![0; wide], vec![0; wide], None, vec![0.0; wide]);
        assert!(e.unwrap_err().to_string().contains("exceeds"));
    }
}
