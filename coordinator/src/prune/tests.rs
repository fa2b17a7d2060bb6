//! The rules on scripted metric curves, with the trials they stop worked out by hand in the
//! comments.

use super::*;

/// Feeds evaluations `(trial, step, value)` in arrival order, as the scheduler does: each is
/// recorded, then judged; a stopped trial reports nothing more. Returns the stops.
fn run(rule: &EarlyTerminate, goal: Goal, events: &[(u64, u64, f64)]) -> Vec<(u64, u64)> {
    let mut history = History::new(goal);
    let mut stopped: Vec<(u64, u64)> = Vec::new();
    for &(trial, step, value) in events {
        if stopped.iter().any(|(t, _)| *t == trial) {
            continue;
        }
        history.record(trial, step, value);
        if let Decision::Stop(_) = decide(rule, &history, trial, step) {
            stopped.push((trial, step));
        }
    }
    stopped
}

/// One trial after the other (one worker): each curve is (step, value) pairs.
fn sequential(curves: &[&[(u64, f64)]]) -> Vec<(u64, u64, f64)> {
    let mut out = Vec::new();
    for (t, curve) in curves.iter().enumerate() {
        out.extend(curve.iter().map(|&(s, v)| (t as u64, s, v)));
    }
    out
}

fn every_100(values: &[f64]) -> Vec<(u64, f64)> {
    values.iter().enumerate().map(|(i, v)| ((i as u64 + 1) * 100, *v)).collect()
}

#[test]
fn brackets_and_rungs_follow_the_keys() {
    let hb = |min_iter, max_iter, s, eta| EarlyTerminate::Hyperband { min_iter, max_iter, s, eta };
    // W&B's examples: min_iter 3 -> [3, 9, 27, 81, ...]; max_iter 27, s 2 -> [27/3, 27/9].
    assert_eq!(hb(Some(3), None, None, 3).rungs()[..4], [3, 9, 27, 81]);
    assert_eq!(hb(None, Some(27), Some(2), 3).rungs(), [3, 9]);
    assert_eq!(hb(None, Some(27), Some(5), 3).rungs(), [1, 3, 9], "bands below 1 are dropped");
    assert_eq!(hb(Some(3), None, Some(2), 3).rungs(), [3, 9]);
    assert_eq!(hb(Some(3), Some(27), None, 3).rungs(), [3, 9]);
    assert_eq!(hb(Some(1), None, None, 2).rungs().len(), 64, "capped, never overflowing");
    let asha = EarlyTerminate::Asha { min_steps: 100, reduction_factor: 2, max_steps: Some(800) };
    assert_eq!(asha.rungs(), [100, 200, 400]);
    let median = EarlyTerminate::Median { warmup_steps: 0, min_trials: 1 };
    assert!(median.rungs().is_empty());
}

#[test]
fn hyperband_stops_the_trials_below_the_bracket_threshold() {
    // Brackets at 100, 300 (900 is never reached); eta 3; minimize; one trial after another.
    let rule = EarlyTerminate::Hyperband { min_iter: Some(100), max_iter: None, s: None, eta: 3 };
    let curves = [
        every_100(&[1.0, 0.8, 0.6, 0.5]),
        every_100(&[0.9, 0.7, 0.5, 0.4]),
        every_100(&[1.2, 1.1, 1.0, 0.9]),
        every_100(&[0.95, 0.9, 0.85, 0.8]),
    ];
    let events = sequential(&curves.iter().map(Vec::as_slice).collect::<Vec<_>>());
    // T0: alone at every bracket. T1 @100: [0.9, 1.0], position 2/3 = 0: 0.9, its own: goes
    // on; @300: [0.5, 0.6], position 0: 0.5, its own. T2 @100: [0.9, 1.0, 1.2], position
    // 3/3 = 1: 1.0 < 1.2: stopped. T3 @100: [0.9, 0.95, 1.0, 1.2], position 1: 0.95, its own;
    // @200 (still bracket 100): best 0.9; @300: [0.5, 0.6, 0.85] (T2 never got there),
    // position 1: 0.6 < 0.85: stopped.
    assert_eq!(run(&rule, Goal::Minimize, &events), [(2, 100), (3, 300)]);
}

#[test]
fn hyperband_maximizes_with_max_iter_brackets_and_trials_side_by_side() {
    // max_iter 270, s 2, eta 3: brackets 270/3 = 90 and 90/3 = 30. Maximize. Three trials
    // report every 30 steps side by side, T1 first at each step.
    let rule =
        EarlyTerminate::Hyperband { min_iter: None, max_iter: Some(270), s: Some(2), eta: 3 };
    let curves: [[f64; 4]; 3] =
        [[0.5, 0.6, 0.7, 0.75], [0.4, 0.65, 0.72, 0.8], [0.45, 0.5, 0.55, 0.6]];
    let mut events = Vec::new();
    for (k, step) in [30u64, 60, 90, 120].into_iter().enumerate() {
        for t in [1u64, 0, 2] {
            events.push((t, step, curves[t as usize][k]));
        }
    }
    // @30: T1 alone; T0: [0.5, 0.4] position 0: 0.5, its own; T2: [0.5, 0.45, 0.4]
    // position 1: 0.45, its own (not worse). @60 (bracket 30): best so far 0.65, 0.6, 0.5,
    // all at least 0.45. @90: T1 alone; T0: [0.72, 0.7] position 0: 0.72 > 0.7: stopped; T2:
    // [0.72, 0.7, 0.55] position 1: 0.7 > 0.55: stopped. @120: T1's best 0.8 passes.
    assert_eq!(run(&rule, Goal::Maximize, &events), [(0, 90), (2, 90)]);
}

#[test]
fn asha_keeps_the_top_fraction_at_each_rung() {
    // Rungs 100, 200 (max_steps 400 excludes 400), reduction factor 2, minimize, sequential.
    let rule = EarlyTerminate::Asha { min_steps: 100, reduction_factor: 2, max_steps: Some(400) };
    let curves = [
        every_100(&[0.9, 0.7, 0.6, 0.5]),
        every_100(&[0.8, 0.75, 0.7, 0.65]),
        every_100(&[1.0, 0.9, 0.8, 0.7]),
        every_100(&[0.85, 0.6, 0.5, 0.4]),
        every_100(&[0.7, 0.72, 0.6, 0.5]),
    ];
    let events = sequential(&curves.iter().map(Vec::as_slice).collect::<Vec<_>>());
    // T0 alone. T1 @100: [0.8, 0.9], keep max(1, 2/2) = 1: 0.8 is it; @200: [0.7, 0.75],
    // keep 1: 0.75 out. T2 @100: [0.8, 0.9, 1.0], keep 1: out. T3 @100: [0.8, 0.85, 0.9,
    // 1.0], keep 2: 0.85 in; @200: [0.6, 0.7, 0.75], keep 1: 0.6 in. T4 @100: five values,
    // keep 2: [0.7, 0.8]: in; @200: [0.6, 0.7, 0.72, 0.75], keep 2: 0.72 out.
    assert_eq!(run(&rule, Goal::Minimize, &events), [(1, 200), (2, 100), (4, 200)]);
}

#[test]
fn asha_judges_a_rung_at_the_first_evaluation_past_it_once() {
    // Rungs 100, 200, 400, ...; evaluations every 250 steps: the one at 250 reaches rungs 100
    // and 200, the one at 500 rung 400.
    let rule = EarlyTerminate::Asha { min_steps: 100, reduction_factor: 2, max_steps: None };
    let mut history = History::new(Goal::Minimize);
    history.record(0, 250, 0.5);
    assert_eq!(decide(&rule, &history, 0, 250), Decision::Continue);
    history.record(0, 500, 0.4);
    assert_eq!(decide(&rule, &history, 0, 500), Decision::Continue);
    history.record(1, 250, 0.6);
    match decide(&rule, &history, 1, 250) {
        Decision::Stop(reason) => {
            assert!(reason.contains("rung 100 (step 250)"), "{reason}");
            assert!(reason.contains("best 1 of the 2 trials"), "{reason}");
        }
        Decision::Continue => panic!("0.6 is worse than 0.5 at rung 100"),
    }
    // Step 500 reaches only rung 400, where 0.35 beats T0's 0.4: the rungs judged at 250 (where
    // T1 was the worse) are not judged again.
    history.record(1, 500, 0.35);
    assert_eq!(decide(&rule, &history, 1, 500), Decision::Continue);
    // An evaluation not in the history is not judged.
    assert_eq!(decide(&rule, &history, 7, 250), Decision::Continue);
}

#[test]
fn median_stops_a_best_so_far_worse_than_the_others_median_after_warmup() {
    // Warmup 200 steps, at least 2 other trials at the step; minimize; sequential.
    let rule = EarlyTerminate::Median { warmup_steps: 200, min_trials: 2 };
    let curves = [
        every_100(&[1.0, 0.8, 0.6]),
        every_100(&[0.9, 0.85, 0.7]),
        every_100(&[1.5, 0.9, 0.65]),
        every_100(&[0.5, 0.95, 0.9]),
        every_100(&[1.2, 1.0, 0.5]),
    ];
    let events = sequential(&curves.iter().map(Vec::as_slice).collect::<Vec<_>>());
    // T0: no others. T1 @200, @300: one other, fewer than 2. T2 @100: warmup; @200: others
    // [0.8, 0.85], median 0.825 < best 0.9: stopped. T3 @200: others [0.8, 0.85, 0.9],
    // median 0.85 > its best so far 0.5 (from step 100, inside the warmup); @300: others
    // [0.6, 0.7] (T2 stopped at 200), median 0.65 > 0.5: goes on. T4 @200: others [0.8, 0.85,
    // 0.9, 0.95], median 0.875 < best 1.0: stopped, although it would have ended best.
    assert_eq!(run(&rule, Goal::Minimize, &events), [(2, 200), (4, 200)]);
}

#[test]
fn median_maximizes_and_compares_the_same_step_only() {
    let rule = EarlyTerminate::Median { warmup_steps: 0, min_trials: 1 };
    let events = [(0, 10, 0.5), (1, 10, 0.4), (2, 10, 0.6), (3, 15, 0.1), (3, 20, 0.2)];
    // T1: 0.4 below the median 0.5 of [0.5]: stopped. T2: above the median 0.45 of [0.5,
    // 0.4]. T3: nobody else reported at 15 or 20.
    assert_eq!(run(&rule, Goal::Maximize, &events), [(1, 10)]);
    let mut history = History::new(Goal::Maximize);
    for (t, s, v) in events {
        history.record(t, s, v);
    }
    match decide(&rule, &history, 1, 10) {
        Decision::Stop(reason) => assert_eq!(
            reason,
            "median: best 0.4 so far at step 10 is worse than the median 0.55 of 2 other trials \
             there"
        ),
        Decision::Continue => panic!("0.4 is below the median 0.55 of [0.5, 0.6]"),
    }
}

#[test]
fn a_later_attempt_replaces_values_and_non_finite_ones_are_ignored() {
    let mut history = History::new(Goal::Minimize);
    history.record(0, 100, 0.9);
    history.record(0, 100, 0.7);
    history.record(0, 200, f64::NAN);
    assert_eq!(history.curve(0).unwrap(), &BTreeMap::from([(100, 0.7)]));
    assert!(history.curve(1).is_none());
}
