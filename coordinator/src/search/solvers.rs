//! `nelder_mead`, `particle_swarm`, `simulated_annealing`: one argmin solver per cell of the
//! gridded parameters ([`super::space`]), all cells searching side by side.
//!
//! Each cell's solver runs on its own thread ([`super::oracle`]) and asks for points; a point
//! becomes a trial unless the search already has it (same parameters), in which case its stored
//! value (or the trial in flight) answers it. When every point of a cell's question is answered,
//! the answers go back and the solver's next question is read at once (solvers compute in
//! microseconds), so proposing never waits on a thread.
//!
//! A failed trial (or one without a finite metric) answers with the worst value its cell has
//! seen, counting the question's other answers, so a failure is never a solver error and the
//! answer does not depend on the order results arrived in.
//!
//! Resume ([`Strategy::restore`]): the solvers start again from the sweep seed, and every point
//! they ask for that a stored trial holds is answered from the store (or waits for that trial
//! if it is still queued or running). Each solver is deterministic given its answers, so it
//! retraces its path and proposes only points the store does not have.

use super::oracle::{self, Ask, Solver};
use super::space::{Cell, Space};
use super::{Outcome, Point, Proposal, Stored, Strategy};
use crate::spec::{Method, SweepSpec};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc::{self, Receiver, Sender};

/// One cell's solver and its open question.
struct CellState {
    params: Cell,
    answers_tx: Option<Sender<Vec<f64>>>,
    asks_rx: Receiver<Ask>,
    /// The open question's points and the answers so far (None: pending).
    question: Vec<Vec<f64>>,
    answers: Vec<Option<Option<f64>>>,
    /// Worst finite value this cell has been answered with.
    worst: Option<f64>,
    done: bool,
}

/// What the search knows about a parameter point.
#[derive(Debug, Clone, Copy)]
enum Known {
    /// A trial (queued, running, or proposed and not yet queued) will answer it.
    InFlight(u64),
    Finished(Option<f64>),
}

/// The strategy.
pub struct SolverSearch {
    space: Space,
    solver: Solver,
    iterations: u64,
    seed: u64,
    cells: Vec<CellState>,
    started: bool,
    /// Points by their canonical JSON.
    known: HashMap<String, Known>,
    /// (cell, position in its question) waiting for a trial.
    waiters: HashMap<u64, Vec<(usize, usize)>>,
    /// Canonical key of each trial index this search knows.
    keys: HashMap<u64, String>,
    /// New points to propose, their indexes assigned in order.
    pending: VecDeque<Point>,
    next_index: u64,
}

impl SolverSearch {
    /// The search of a validated spec whose method is one of argmin's.
    pub fn from_spec(spec: &SweepSpec) -> SolverSearch {
        let s = &spec.search;
        let solver = match spec.method {
            Method::ParticleSwarm => Solver::ParticleSwarm { population: s.population },
            Method::SimulatedAnnealing => Solver::SimulatedAnnealing {
                temperature: s.temperature,
                step: s.initial_simplex_scale,
            },
            _ => Solver::NelderMead { simplex_scale: s.initial_simplex_scale },
        };
        SolverSearch::new(Space::from_spec(spec), solver, s.iterations, s.seed.unwrap_or(spec.seed))
    }

    pub fn new(space: Space, solver: Solver, iterations: u64, seed: u64) -> SolverSearch {
        SolverSearch {
            space,
            solver,
            iterations,
            seed,
            cells: Vec::new(),
            started: false,
            known: HashMap::new(),
            waiters: HashMap::new(),
            keys: HashMap::new(),
            pending: VecDeque::new(),
            next_index: 0,
        }
    }

    /// Starts every cell's solver and takes its first question.
    fn start(&mut self) {
        if self.started {
            return;
        }
        self.started = true;
        let shares: Vec<f64> = self.space.dims.iter().map(|d| d.share()).collect();
        for c in 0..self.space.cells() {
            let (asks_tx, asks_rx) = mpsc::channel();
            let (answers_tx, answers_rx) = mpsc::channel();
            let (solver, iterations) = (self.solver, self.iterations);
            let seed = super::random::point_seed(self.seed, c);
            let shares = shares.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("search-cell-{c}"))
                .spawn(move || oracle::run(solver, &shares, iterations, seed, asks_tx, answers_rx));
            if let Err(e) = spawned {
                tracing::error!("cannot start the solver of search cell {c}: {e}");
                continue;
            }
            self.cells.push(CellState {
                params: self.space.cell(c),
                answers_tx: Some(answers_tx),
                asks_rx,
                question: Vec::new(),
                answers: Vec::new(),
                worst: None,
                done: false,
            });
        }
        for c in 0..self.cells.len() {
            self.next_question(c);
        }
    }

    /// Reads cell `c`'s next question and answers what the search already knows; repeats while
    /// the whole question is answered from what is known.
    fn next_question(&mut self, c: usize) {
        loop {
            let ask = self.cells[c].asks_rx.recv().unwrap_or(Ask::Done);
            let points = match ask {
                Ask::Points(p) => p,
                Ask::Done => {
                    let cell = &mut self.cells[c];
                    cell.done = true;
                    cell.answers_tx = None;
                    return;
                }
            };
            let n = points.len();
            self.cells[c].answers = vec![None; n];
            for (j, b) in points.iter().enumerate() {
                let params = self.space.point(&self.cells[c].params, b);
                let key = canonical(&params);
                match self.known.get(&key) {
                    Some(Known::Finished(v)) => self.cells[c].answers[j] = Some(*v),
                    Some(Known::InFlight(index)) => {
                        self.waiters.entry(*index).or_default().push((c, j));
                    }
                    None => {
                        let index = self.next_index;
                        self.next_index += 1;
                        self.known.insert(key.clone(), Known::InFlight(index));
                        self.keys.insert(index, key);
                        self.waiters.entry(index).or_default().push((c, j));
                        self.pending.push_back(Point { index, params });
                    }
                }
            }
            self.cells[c].question = points;
            if !self.answer_if_complete(c) {
                return;
            }
        }
    }

    /// Sends cell `c` its answers when every one is in; failures get the worst value seen.
    /// Returns whether it did (the solver then has a new question to read).
    fn answer_if_complete(&mut self, c: usize) -> bool {
        let cell = &mut self.cells[c];
        if cell.answers.iter().any(Option::is_none) {
            return false;
        }
        let finite = cell.answers.iter().flatten().flatten().copied();
        let worst = finite
            .chain(cell.worst)
            .fold(None, |w: Option<f64>, v| Some(w.map_or(v, |w| w.max(v))));
        cell.worst = worst;
        let fail = worst.unwrap_or(f64::MAX);
        let values: Vec<f64> = cell.answers.iter().map(|a| a.flatten().unwrap_or(fail)).collect();
        cell.question.clear();
        cell.answers.clear();
        match &cell.answers_tx {
            Some(tx) if tx.send(values).is_ok() => true,
            _ => {
                cell.done = true;
                false
            }
        }
    }

    fn record(&mut self, index: u64, value: Option<f64>) {
        if let Some(key) = self.keys.get(&index) {
            self.known.insert(key.clone(), Known::Finished(value));
        }
        let mut ready = Vec::new();
        for (c, j) in self.waiters.remove(&index).unwrap_or_default() {
            if let Some(slot) = self.cells.get_mut(c).and_then(|cell| cell.answers.get_mut(j)) {
                *slot = Some(value);
                ready.push(c);
            }
        }
        ready.dedup();
        for c in ready {
            if self.answer_if_complete(c) {
                self.next_question(c);
            }
        }
    }
}

impl Strategy for SolverSearch {
    fn propose(&mut self) -> Proposal {
        self.start();
        match self.pending.pop_front() {
            Some(p) => Proposal::Point(p),
            None if self.cells.iter().all(|c| c.done) => Proposal::Done,
            None => Proposal::Wait,
        }
    }

    fn observe(&mut self, index: u64, value: Option<f64>) {
        self.start();
        self.record(index, value);
    }

    fn restores(&self) -> bool {
        true
    }

    fn restore(&mut self, stored: &[Stored]) {
        for t in stored {
            let key = canonical(&t.params);
            let known = match t.outcome {
                Outcome::Pending => Known::InFlight(t.index),
                Outcome::Finished(v) => Known::Finished(v),
            };
            self.known.insert(key.clone(), known);
            self.keys.insert(t.index, key);
            self.next_index = self.next_index.max(t.index + 1);
        }
        self.start();
    }
}

/// The identity of a parameter point: its JSON with every non-integer number written to 12
/// significant digits. Stored points come back through a JSON parse that may move a float by
/// an ulp, so exact text would miss them.
fn canonical(params: &BTreeMap<String, Value>) -> String {
    let mut out = String::new();
    for (k, v) in params {
        out.push_str(k);
        out.push('=');
        match v {
            Value::Number(n) if n.is_f64() => {
                out.push_str(&format!("{:.11e}", n.as_f64().unwrap_or(f64::NAN)));
            }
            other => out.push_str(&other.to_string()),
        }
        out.push(';');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(method: &str, extra: &str) -> SweepSpec {
        let text = format!(
            "name: s\nmethod: {method}\nrun_cap: 40\nseed: 3\n{extra}parameters:\n  lr:\n    distribution: uniform\n    min: 0.001\n    max: 1.0\n  layer_k:\n    distribution: int_uniform\n    min: 1\n    max: 20\n  optimizer:\n    values: [adam, sgd]\n"
        );
        SweepSpec::parse(&text, "s.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    /// The objective: distance of (lr, layer_k) from (0.3, 12), sgd a little worse.
    fn objective(p: &BTreeMap<String, Value>) -> f64 {
        let lr = p["lr"].as_f64().unwrap();
        let k = p["layer_k"].as_f64().unwrap();
        let penalty = if p["optimizer"] == "sgd" { 0.1 } else { 0.0 };
        (lr - 0.3).powi(2) + ((k - 12.0) / 20.0).powi(2) + penalty
    }

    /// Runs the search with `workers` trials in flight, completing the oldest first; `fail`
    /// says which indexes fail. Returns every proposed point.
    fn run(
        s: &mut dyn Strategy,
        cap: usize,
        workers: usize,
        fail: &dyn Fn(u64) -> bool,
    ) -> Vec<Point> {
        let mut all = Vec::new();
        let mut running: VecDeque<Point> = VecDeque::new();
        loop {
            while running.len() < workers && all.len() < cap {
                match s.propose() {
                    Proposal::Point(p) => {
                        assert_eq!(p.index, all.len() as u64, "indexes are contiguous");
                        all.push(p.clone());
                        running.push_back(p);
                    }
                    Proposal::Wait | Proposal::Done => break,
                }
            }
            let Some(p) = running.pop_front() else { break };
            let v = (!fail(p.index)).then(|| objective(&p.params));
            s.observe(p.index, v);
        }
        all
    }

    #[test]
    fn each_method_improves_on_its_first_points_and_cells_run_side_by_side() {
        for method in ["nelder_mead", "particle_swarm", "simulated_annealing"] {
            let mut s = SolverSearch::from_spec(&spec(method, ""));
            // Both optimizer cells have a point in flight before any result comes back.
            let (a, b) = match (s.propose(), s.propose()) {
                (Proposal::Point(a), Proposal::Point(b)) => (a, b),
                other => panic!("{method}: {other:?}"),
            };
            if method != "particle_swarm" {
                assert_ne!(a.params["optimizer"], b.params["optimizer"], "{method}");
            }
            s.observe(a.index, Some(objective(&a.params)));
            s.observe(b.index, Some(objective(&b.params)));
            let mut s = SolverSearch::from_spec(&spec(method, ""));
            let all = run(&mut s, 80, 4, &|_| false);
            let best = all.iter().map(|p| objective(&p.params)).fold(f64::MAX, f64::min);
            let first = objective(&all[0].params);
            // The annealer starts at the box centre and explores: it must improve, the others converge.
            let enough =
                if method == "simulated_annealing" { best < 0.6 * first } else { best < 0.01 };
            assert!(best < first && enough, "{method}: best {best}, first {first}");
        }
    }

    #[test]
    fn a_swarm_dispatches_its_population_at_once() {
        let mut s = SolverSearch::from_spec(&spec("particle_swarm", "search:\n  population: 6\n"));
        let mut n = 0;
        while let Proposal::Point(_) = s.propose() {
            n += 1;
        }
        assert_eq!(n, 12, "6 particles in each of the 2 cells");
    }

    #[test]
    fn failures_answer_with_the_worst_value_and_the_search_goes_on() {
        let mut s = SolverSearch::from_spec(&spec("nelder_mead", ""));
        let all = run(&mut s, 40, 2, &|i| i % 3 == 1);
        assert_eq!(all.len(), 40, "failures never stop the search");
    }

    #[test]
    fn a_resumed_search_proposes_no_stored_point_again() {
        for method in ["nelder_mead", "particle_swarm", "simulated_annealing"] {
            let mut first = SolverSearch::from_spec(&spec(method, ""));
            let done = run(&mut first, 15, 3, &|_| false);
            // Keep 15 points: the first 12 finished, the last 3 still running.
            let stored: Vec<Stored> = done
                .iter()
                .map(|p| Stored {
                    index: p.index,
                    params: p.params.clone(),
                    outcome: if p.index < 12 {
                        Outcome::Finished(Some(objective(&p.params)))
                    } else {
                        Outcome::Pending
                    },
                })
                .collect();
            let mut resumed = SolverSearch::from_spec(&spec(method, ""));
            resumed.restore(&stored);
            let mut seen: std::collections::HashSet<String> =
                done.iter().map(|p| canonical(&p.params)).collect();
            for _ in 0..3 {
                match resumed.propose() {
                    Proposal::Point(p) => {
                        assert!(p.index >= 15, "{method}: index {}", p.index);
                        assert!(seen.insert(canonical(&p.params)), "{method}: proposed again");
                    }
                    Proposal::Wait => {
                        for t in &stored[12..] {
                            resumed.observe(t.index, Some(objective(&t.params)));
                        }
                    }
                    Proposal::Done => panic!("{method}: done early"),
                }
            }
        }
    }

    #[test]
    fn a_point_is_known_again_after_a_json_round_trip_that_moves_a_float() {
        let a: BTreeMap<String, Value> =
            [("lr".to_string(), serde_json::json!(0.000_099_999_999_999_999_92))].into();
        let b: BTreeMap<String, Value> =
            [("lr".to_string(), serde_json::json!(0.000_099_999_999_999_999_93))].into();
        assert_eq!(canonical(&a), canonical(&b));
        let c: BTreeMap<String, Value> = [("lr".to_string(), serde_json::json!(0.0001001))].into();
        assert_ne!(canonical(&a), canonical(&c));
        let k: BTreeMap<String, Value> = [("layer_k".to_string(), serde_json::json!(7))].into();
        assert_eq!(canonical(&k), "layer_k=7;");
    }

    #[test]
    fn a_stored_float_comes_back_as_the_same_point() {
        // Moved by an ulp through JSON without serde_json's float_roundtrip (review finding).
        let p: BTreeMap<String, Value> =
            [("lr".to_string(), serde_json::json!(f64::from_bits(0x3fab_aa2e_aa4c_17bc)))].into();
        let back: BTreeMap<String, Value> =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(p, back);
        assert_eq!(canonical(&p), canonical(&back));
    }

    #[test]
    fn nelder_mead_tries_both_values_of_a_two_integer_dimension() {
        let spec = SweepSpec::parse(
            "name: s\nmethod: nelder_mead\nrun_cap: 10\nparameters:\n  layer_k: {distribution: int_uniform, min: 1, max: 2}\n",
            "s.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut s = SolverSearch::from_spec(&spec);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            match s.propose() {
                Proposal::Point(p) => {
                    seen.insert(p.params["layer_k"].as_i64().unwrap());
                    s.observe(p.index, Some(p.params["layer_k"].as_f64().unwrap()));
                }
                _ => break,
            }
        }
        assert_eq!(seen, [1, 2].into(), "the simplex's vertices are different integers");
    }
}
