//! argmin's solvers driven by trials: each cell's solver runs on a thread of its own, and its
//! cost function, instead of computing anything, hands the points to evaluate to the search
//! ([`Ask`]) and blocks until their values come back. argmin's solvers are written as loops
//! over synchronous cost calls; this turns each into an ask/tell object without rewriting it.
//!
//! A swarm asks for its whole population in one `bulk_cost` call, so every particle becomes a
//! trial at once; Nelder-Mead and the annealer ask for one point at a time. Coordinates are
//! unit-box ones (see [`super::space`]); every random choice comes from a generator seeded by
//! (sweep seed, cell), so the same answers give the same asks.

use argmin::core::{CostFunction, Error, Executor};
use argmin::solver::neldermead::NelderMead;
use argmin::solver::particleswarm::ParticleSwarm;
use argmin::solver::simulatedannealing::{Anneal, SimulatedAnnealing};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::borrow::Borrow;
use std::cell::RefCell;
use std::sync::mpsc::{Receiver, Sender};

use super::space::reflect;

/// What a cell's solver says to the search.
#[derive(Debug, Clone, PartialEq)]
pub enum Ask {
    /// Evaluate these unit-box points; the answers go back in the same order.
    Points(Vec<Vec<f64>>),
    /// The solver stopped (iterations spent or converged).
    Done,
}

/// Which argmin solver, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Solver {
    NelderMead { simplex_scale: f64 },
    ParticleSwarm { population: usize },
    SimulatedAnnealing { temperature: f64, step: f64 },
}

/// The cost function of one cell: every evaluation is a question to the search.
struct Oracle {
    asks: Sender<Ask>,
    answers: Receiver<Vec<f64>>,
    /// The annealer's perturbations: normal steps of `step` box units.
    rng: RefCell<StdRng>,
    step: f64,
    /// Questions asked so far, and how many the solver's start-up asks: argmin's Nelder-Mead
    /// unwraps its start-up costs, so a search that goes away then gets placeholder values
    /// (the solver's later questions fail and end it).
    asked: std::cell::Cell<u64>,
    startup_asks: u64,
}

impl CostFunction for Oracle {
    type Param = Vec<f64>;
    type Output = f64;

    fn cost(&self, p: &Vec<f64>) -> Result<f64, Error> {
        Ok(self.bulk_cost(std::slice::from_ref(p))?[0])
    }

    fn bulk_cost<P>(&self, params: &[P]) -> Result<Vec<f64>, Error>
    where
        P: Borrow<Vec<f64>> + argmin::core::SyncAlias,
    {
        let points = params.iter().map(|p| p.borrow().iter().map(|&u| reflect(u)).collect());
        self.asked.set(self.asked.get() + 1);
        // A closed channel means the search is gone (coordinator stopping): end the solver.
        let answer = self
            .asks
            .send(Ask::Points(points.collect()))
            .ok()
            .and_then(|_| self.answers.recv().ok());
        let values = match answer {
            Some(values) => values,
            None if self.asked.get() <= self.startup_asks => vec![f64::MAX; params.len()],
            None => return Err(stopped()),
        };
        if values.len() != params.len() {
            return Err(Error::msg("the search answered a different number of points"));
        }
        Ok(values)
    }
}

impl Anneal for Oracle {
    type Param = Vec<f64>;
    type Output = Vec<f64>;
    type Float = f64;

    /// Moves every coordinate by a normal step of a fixed size, folded back into the box. The
    /// temperature only decides which moves are accepted: steps that shrank with it left the
    /// annealer near its start.
    fn anneal(&self, p: &Vec<f64>, _extent: f64) -> Result<Vec<f64>, Error> {
        let mut rng = self.rng.borrow_mut();
        Ok(p.iter()
            .map(|&u| {
                let z: f64 = rng.sample(StandardNormal);
                reflect(u + self.step * z)
            })
            .collect())
    }
}

fn stopped() -> Error {
    Error::msg("the search stopped")
}

/// Runs `solver` over the box of `shares` (one per dimension: the width of one distinct value,
/// 0 if continuous) for at most `iterations` iterations, asking through `asks` and reading
/// answers from `answers`; says [`Ask::Done`] when it ends.
pub fn run(
    solver: Solver,
    shares: &[f64],
    iterations: u64,
    seed: u64,
    asks: Sender<Ask>,
    answers: Receiver<Vec<f64>>,
) {
    let step = match solver {
        Solver::SimulatedAnnealing { step, .. } => step,
        _ => 0.0,
    };
    let dims = shares.len();
    let startup_asks = match solver {
        Solver::NelderMead { .. } => dims as u64 + 1,
        _ => 1,
    };
    let oracle = Oracle {
        asks: asks.clone(),
        answers,
        rng: RefCell::new(StdRng::seed_from_u64(seed ^ 0x00A1_1EA1)),
        step,
        asked: std::cell::Cell::new(0),
        startup_asks,
    };
    let outcome = match solver {
        Solver::NelderMead { simplex_scale } => {
            let centre = vec![0.5; dims];
            let mut simplex = vec![centre.clone()];
            // Each vertex moves one coordinate down from the centre by at least one value's
            // share, so an integer dimension's vertices are different points.
            for (d, share) in shares.iter().enumerate() {
                let mut v = centre.clone();
                v[d] -= simplex_scale.max(*share);
                simplex.push(v);
            }
            let nm = NelderMead::new(simplex).with_sd_tolerance(1e-9);
            nm.and_then(|nm| {
                Executor::new(oracle, nm)
                    .configure(|s| s.max_iters(iterations))
                    .run()
                    .map(|r| r.state().get_best_cost())
            })
        }
        Solver::ParticleSwarm { population } => {
            let pso = ParticleSwarm::new((vec![0.0; dims], vec![1.0; dims]), population)
                .with_rng_generator(StdRng::seed_from_u64(seed));
            Executor::new(oracle, pso)
                .configure(|s| s.max_iters(iterations))
                .run()
                .map(|r| r.state().get_best_cost())
        }
        Solver::SimulatedAnnealing { temperature, .. } => {
            SimulatedAnnealing::new_with_rng(temperature, StdRng::seed_from_u64(seed)).and_then(
                |sa| {
                    Executor::new(oracle, sa)
                        .configure(|s| s.param(vec![0.5; dims]).max_iters(iterations))
                        .run()
                        .map(|r| r.state().get_best_cost())
                },
            )
        }
    };
    if let Err(e) = outcome {
        tracing::debug!("solver ended: {e}");
    }
    let _ = asks.send(Ask::Done);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    /// Drives a solver on a quadratic bowl with its minimum at 0.3 in every coordinate, the
    /// way the search does, and returns the points asked and the best value seen.
    fn drive(solver: Solver, dims: usize, iterations: u64, seed: u64) -> (Vec<Vec<f64>>, f64) {
        let (ask_tx, ask_rx) = channel();
        let (ans_tx, ans_rx) = channel();
        let t = std::thread::spawn(move || {
            run(solver, &vec![0.0; dims], iterations, seed, ask_tx, ans_rx)
        });
        let (mut asked, mut best) = (Vec::new(), f64::MAX);
        while let Ok(Ask::Points(points)) = ask_rx.recv() {
            let values: Vec<f64> = points
                .iter()
                .map(|p| p.iter().map(|x| (x - 0.3) * (x - 0.3)).sum::<f64>())
                .collect();
            best = values.iter().fold(best, |b, v| b.min(*v));
            asked.extend(points);
            ans_tx.send(values).unwrap();
        }
        t.join().unwrap();
        (asked, best)
    }

    #[test]
    fn every_solver_finds_the_bowls_minimum_inside_the_box() {
        for solver in [
            Solver::NelderMead { simplex_scale: 0.25 },
            Solver::ParticleSwarm { population: 8 },
            Solver::SimulatedAnnealing { temperature: 0.05, step: 0.25 },
        ] {
            let (asked, best) = drive(solver, 2, 60, 7);
            assert!(best < 1e-2, "{solver:?}: best {best}");
            assert!(asked.iter().flatten().all(|x| (0.0..=1.0).contains(x)), "{solver:?}");
        }
    }

    #[test]
    fn same_seed_same_asks_and_a_swarm_asks_its_population_at_once() {
        let a = drive(Solver::ParticleSwarm { population: 5 }, 3, 4, 11);
        let b = drive(Solver::ParticleSwarm { population: 5 }, 3, 4, 11);
        assert_eq!(a.0, b.0);
        let c = drive(Solver::ParticleSwarm { population: 5 }, 3, 4, 12);
        assert_ne!(a.0, c.0);

        let (ask_tx, ask_rx) = channel();
        let (_ans_tx, ans_rx) = channel::<Vec<f64>>();
        std::thread::spawn(move || {
            run(Solver::ParticleSwarm { population: 5 }, &[0.0; 3], 4, 1, ask_tx, ans_rx)
        });
        match ask_rx.recv().unwrap() {
            Ask::Points(p) => assert_eq!(p.len(), 5),
            Ask::Done => panic!("no population"),
        }
    }

    #[test]
    fn a_dropped_search_ends_the_solver() {
        let (ask_tx, ask_rx) = channel();
        let (ans_tx, ans_rx) = channel::<Vec<f64>>();
        let t = std::thread::spawn(move || {
            run(Solver::NelderMead { simplex_scale: 0.25 }, &[0.0; 2], 100, 1, ask_tx, ans_rx)
        });
        assert!(matches!(ask_rx.recv().unwrap(), Ask::Points(_)));
        drop(ans_tx);
        t.join().unwrap();
        assert!(ask_rx.iter().any(|a| a == Ask::Done));
    }
}
