//! The per-class part of an evaluation pass: [`ClassTally`] sums, over chunks of rows, what
//! [`ClassStats`] reports, inside the single pass of [`super::evaluate`].

use msae_shared::class_stats::{ClassStats, MAX_CELLS};

/// How many classes per-class statistics cover for `labels` (largest label + 1), or `None`
/// when there is nothing to cover or the table would be too large: labels that many are
/// sample ids rather than classes, and their tables would not fit in a message (or memory).
pub(super) fn class_count(labels: &[u32], stripes: usize) -> Option<usize> {
    let classes = labels.iter().map(|&c| c as usize + 1).max()?;
    if stripes == 0 {
        return None;
    }
    if classes.saturating_mul(stripes) > MAX_CELLS {
        tracing::warn!(
            classes,
            stripes,
            "labels span more than {MAX_CELLS} stripe-by-class cells; per-class statistics skipped"
        );
        return None;
    }
    Some(classes)
}

/// Per-class sums over some rows.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ClassTally {
    classes: usize,
    stripes: usize,
    rows: Vec<u64>,
    /// (stripes, classes) row-major.
    active: Vec<u64>,
    /// (stripes, classes) row-major; empty without router scores.
    score_sum: Vec<f64>,
    /// Squared reconstruction error per class.
    sse: Vec<f64>,
}

impl ClassTally {
    pub(super) fn new(classes: usize, stripes: usize, routing: bool) -> Self {
        let cells = classes * stripes;
        ClassTally {
            classes,
            stripes,
            rows: vec![0; classes],
            active: vec![0; cells],
            score_sum: if routing { vec![0.0; cells] } else { Vec::new() },
            sse: vec![0.0; classes],
        }
    }

    /// A row of class `class`, with its squared reconstruction error and, in routing mode, its
    /// router scores (one per stripe).
    pub(super) fn add_row(&mut self, class: usize, sse: f64, scores: Option<&[f32]>) {
        self.rows[class] += 1;
        self.sse[class] += sse;
        if let Some(scores) = scores
            && !self.score_sum.is_empty()
        {
            for (s, &v) in scores.iter().enumerate().take(self.stripes) {
                self.score_sum[s * self.classes + class] += v as f64;
            }
        }
    }

    /// Stripe `stripe` is active in a row of class `class`.
    pub(super) fn add_active(&mut self, class: usize, stripe: usize) {
        self.active[stripe * self.classes + class] += 1;
    }

    pub(super) fn merge(mut self, o: ClassTally) -> ClassTally {
        self.rows.iter_mut().zip(&o.rows).for_each(|(a, b)| *a += b);
        self.active.iter_mut().zip(&o.active).for_each(|(a, b)| *a += b);
        self.score_sum.iter_mut().zip(&o.score_sum).for_each(|(a, b)| *a += b);
        self.sse.iter_mut().zip(&o.sse).for_each(|(a, b)| *a += b);
        self
    }

    /// Means per class (0 for a class without rows), at input dimension `dim`.
    pub(super) fn finish(self, dim: usize) -> ClassStats {
        let rows = &self.rows;
        let per_class = |c: usize, sum: f64, per_row: usize| {
            let n = rows[c] as f64 * per_row as f64;
            if n > 0.0 { sum / n } else { 0.0 }
        };
        let mse: Vec<f64> = (0..self.classes).map(|c| per_class(c, self.sse[c], dim)).collect();
        let routing = (!self.score_sum.is_empty()).then(|| {
            let classes = self.classes;
            self.score_sum.iter().enumerate().map(|(i, &v)| per_class(i % classes, v, 1)).collect()
        });
        ClassStats::new(self.stripes, self.classes, self.rows, self.active, routing, mse)
            .expect("a tally's arrays have the shape it was made with")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_merge_into_means_per_class() {
        // Two stripes, two classes; class 1 appears in both chunks.
        let mut a = ClassTally::new(2, 2, true);
        a.add_row(1, 4.0, Some(&[1.0, 3.0]));
        a.add_active(1, 0);
        let mut b = ClassTally::new(2, 2, true);
        b.add_row(1, 2.0, Some(&[3.0, -1.0]));
        b.add_active(1, 0);
        b.add_active(1, 1);
        b.add_row(0, 1.0, Some(&[0.5, 0.5]));
        let s = a.merge(b).finish(2);
        assert_eq!(s.class_samples(), [1, 2]);
        assert_eq!((s.active(0, 1), s.active(1, 1), s.active(0, 0)), (2, 1, 0));
        assert_eq!(s.routing_score(0, 1), Some(2.0));
        assert_eq!(s.routing_score(1, 1), Some(1.0));
        assert_eq!(s.routing_score(1, 0), Some(0.5));
        // (4 + 2) / (2 rows * dim 2) and 1 / (1 * 2).
        assert_eq!(s.class_mse(), [0.5, 1.5]);
    }

    #[test]
    fn class_count_is_the_largest_label_plus_one_within_the_cell_limit() {
        assert_eq!(class_count(&[3, 0, 7], 30), Some(8));
        assert_eq!(class_count(&[], 30), None);
        assert_eq!(class_count(&[1], 0), None);
        assert_eq!(class_count(&[u32::MAX], 1), None, "ids, not classes");
        let widest = (MAX_CELLS / 4 - 1) as u32;
        assert_eq!(class_count(&[widest], 4), Some(MAX_CELLS / 4));
        assert_eq!(class_count(&[widest + 1], 4), None);
    }
}
