//! Early termination: the rules of `early_terminate:` ([`EarlyTerminate`]) as pure functions.
//!
//! The scheduler keeps a [`History`]: every trial's sweep metric at every evaluation step its
//! worker reported, whatever the trial's state now (running, completed, pruned, failed). When
//! a running trial reports an evaluation, [`decide`] says whether it should stop, from that
//! history alone. Values are compared oriented by the sweep's goal (smaller is better for
//! `minimize`); reasons print them as reported.
//!
//! A trial's value *at* a bracket or rung step is the value of its first evaluation at or after
//! that step (Ray Tune's ASHA does the same with its milestones), so rungs need not fall on the
//! evaluation steps; for a fair comparison they should (make `min_steps`/`min_iter` a multiple
//! of `eval_every`).
//!
//! - **hyperband** (W&B's, its default non-strict mode): at every evaluation a trial is judged
//!   at the last bracket it has reached. With the n trials that reached that bracket (itself
//!   included, whatever their state) sorted best first, the threshold is the value at 0-based
//!   position `floor(n / eta)`; the trial stops when its best value so far is worse. W&B counts
//!   brackets in logged metric values; here they are training steps.
//! - **asha**: a trial is judged once per rung, by the evaluation that reaches it: it continues
//!   only if its value there is among the best `max(1, floor(n / reduction_factor))` of the n
//!   trials that have reached that rung so far, itself included (ties continue). Optuna's
//!   `SuccessiveHalvingPruner` uses the same count.
//! - **median**: at every evaluation step `s >= warmup_steps`, a trial stops when its best value
//!   so far is worse than the median of the other trials' values at exactly step `s` (the mean
//!   of the two middle ones for an even count), once at least `min_trials` other trials have a
//!   value there. Optuna's `MedianPruner` compares with completed trials only; here every other
//!   trial that reported at that step counts, so a sweep whose trials run side by side prunes
//!   before any has finished.
//!
//! Each decision scans the history: O(trials) per evaluation, which is nothing beside an
//! evaluation of a model.

use crate::model::Goal;
use crate::spec::EarlyTerminate;
use std::collections::BTreeMap;

/// Every trial's sweep metric at each evaluation step reported, as reported (not oriented).
#[derive(Debug, Clone)]
pub struct History {
    goal: Goal,
    /// trial index -> step -> value.
    curves: BTreeMap<u64, BTreeMap<u64, f64>>,
}

impl History {
    /// An empty history of a sweep optimising towards `goal`.
    pub fn new(goal: Goal) -> History {
        History { goal, curves: BTreeMap::new() }
    }

    /// Records `trial`'s value at `step`, replacing one recorded there before (a later attempt
    /// of the trial). Non-finite values are not recorded.
    pub fn record(&mut self, trial: u64, step: u64, value: f64) {
        if value.is_finite() {
            self.curves.entry(trial).or_default().insert(step, value);
        }
    }

    /// The recorded curve of `trial` (step -> value).
    pub fn curve(&self, trial: u64) -> Option<&BTreeMap<u64, f64>> {
        self.curves.get(&trial)
    }

    /// Smaller is better.
    fn oriented(&self, v: f64) -> f64 {
        match self.goal {
            Goal::Minimize => v,
            Goal::Maximize => -v,
        }
    }

    /// The first evaluation of `trial` at or after `step`: (its step, its value).
    fn first_from(&self, trial: u64, step: u64) -> Option<(u64, f64)> {
        self.curves.get(&trial)?.range(step..).next().map(|(s, v)| (*s, *v))
    }

    /// The best value of `trial` at the steps up to `step` (reported value).
    fn best_until(&self, trial: u64, step: u64) -> Option<f64> {
        self.curves
            .get(&trial)?
            .range(..=step)
            .map(|(_, v)| *v)
            .min_by(|a, b| self.oriented(*a).total_cmp(&self.oriented(*b)))
    }

    /// Every trial's value at rung `step` (its first evaluation at or after it), best first.
    fn at_rung(&self, step: u64) -> Vec<(u64, f64)> {
        let mut values: Vec<(u64, f64)> =
            self.curves.keys().filter_map(|&t| Some((t, self.first_from(t, step)?.1))).collect();
        values
            .sort_by(|a, b| self.oriented(a.1).total_cmp(&self.oriented(b.1)).then(a.0.cmp(&b.0)));
        values
    }

    /// Whether `a` is strictly worse than `b`.
    fn worse(&self, a: f64, b: f64) -> bool {
        self.oriented(a) > self.oriented(b)
    }
}

/// What a rule decided about a trial's latest evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Continue,
    /// Stop the trial now; why, in words.
    Stop(String),
}

/// Whether `trial`, whose evaluation at `step` is in `history` already, should stop under
/// `rule`. Pure: the same history gives the same answer. Only the trial's own values at steps
/// up to `step` count (a report may carry several evaluations; each is judged in turn).
pub fn decide(rule: &EarlyTerminate, history: &History, trial: u64, step: u64) -> Decision {
    let Some(value) = history.curve(trial).and_then(|c| c.get(&step).copied()) else {
        return Decision::Continue;
    };
    match *rule {
        EarlyTerminate::Hyperband { eta, .. } => {
            let Some(bracket) = rule.rungs().into_iter().rev().find(|b| *b <= step) else {
                return Decision::Continue;
            };
            let values = history.at_rung(bracket);
            let Some(best) = history.best_until(trial, step) else { return Decision::Continue };
            // W&B: sorted(values)[int(n / eta)]; the trial itself is among the n.
            let position = (values.len() as u64 / eta).min(values.len() as u64 - 1) as usize;
            let threshold = values[position].1;
            if history.worse(best, threshold) {
                return Decision::Stop(format!(
                    "hyperband: best {} so far at step {step} is worse than {}, the value ranked \
                     {} of the {} trials at bracket {bracket}",
                    num(best),
                    num(threshold),
                    position + 1,
                    values.len()
                ));
            }
            Decision::Continue
        }
        EarlyTerminate::Asha { reduction_factor, .. } => {
            for rung in rule.rungs().into_iter().filter(|r| *r <= step) {
                // Judged once per rung: by the evaluation that reached it.
                if history.first_from(trial, rung).map(|(s, _)| s) != Some(step) {
                    continue;
                }
                let values = history.at_rung(rung);
                let keep = (values.len() as u64 / reduction_factor).max(1) as usize;
                let cutoff = values[keep - 1].1;
                if history.worse(value, cutoff) {
                    return Decision::Stop(format!(
                        "asha: {} at rung {rung} (step {step}) is not among the best {keep} of \
                         the {} trials that reached it (cutoff {})",
                        num(value),
                        values.len(),
                        num(cutoff)
                    ));
                }
            }
            Decision::Continue
        }
        EarlyTerminate::Median { warmup_steps, min_trials } => {
            if step < warmup_steps {
                return Decision::Continue;
            }
            let mut others: Vec<f64> = history
                .curves
                .iter()
                .filter(|(t, _)| **t != trial)
                .filter_map(|(_, c)| c.get(&step).copied())
                .collect();
            if (others.len() as u64) < min_trials || others.is_empty() {
                return Decision::Continue;
            }
            others.sort_by(f64::total_cmp);
            let n = others.len();
            let median =
                if n % 2 == 1 { others[n / 2] } else { (others[n / 2 - 1] + others[n / 2]) / 2.0 };
            let Some(best) = history.best_until(trial, step) else { return Decision::Continue };
            if history.worse(best, median) {
                return Decision::Stop(format!(
                    "median: best {} so far at step {step} is worse than the median {} of {} \
                     other trials there",
                    num(best),
                    num(median),
                    n
                ));
            }
            Decision::Continue
        }
    }
}

/// A value for a reason: six significant digits.
fn num(v: f64) -> String {
    format!("{v:.6}").trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests;
