#!/usr/bin/env python3
"""Search quality on one SAE objective: argmin's methods against the grid, bayes against Optuna.

The objective is the validation FVU of the modular SAE on the synthetic default at a fixed layer
k (8), 300 steps, over the learning rate (log 1e-4..1e-1), stripe_k (1..16) and the layer
sparsity mode (ordinary or boosted), with ordinary stripe sparsity.

- grid: 6 learning rates x 6 stripe_k values x 2 modes = 72 trials.
- nelder_mead, particle_swarm, simulated_annealing: run_cap 36 (half the grid) per seed; each
  searches (lr, stripe_k) in one cell per mode. Printed: the best FVU each reached and the trial
  at which it first reached the grid's best (or did not).
- bayes against Optuna's TPE sampler (optuna.samplers.TPESampler, its defaults) at the same
  budget (--budget, default 30) and seeds; Optuna's objective runs `msae-worker train --json`
  on the same trial config. Printed: best FVU per seed and the median over seeds.

    python3 coordinator/bench/search_quality.py
    python3 coordinator/bench/search_quality.py --seeds 0,1,2 --budget 30

Needs `cargo build --release -p msae-coordinator -p msae-worker`, and optuna (`pip install optuna`).
"""

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import tempfile

BASE = {
    "steps": 300,
    "eval_every": 0,
    "layer_k": 8,
    "stripe_sparsity_mode": "ordinary",
}
LR = (1e-4, 1e-1)
STRIPE_K = (1, 16)
MODES = ["ordinary", "boosted"]


def yaml_of(name, method, seed, run_cap, parameters, extra=""):
    lines = [f"name: {name}", "metric: {name: fvu, goal: minimize}", f"method: {method}",
             f"seed: {seed}"]
    if run_cap:
        lines.append(f"run_cap: {run_cap}")
    lines.append("base: " + json.dumps(BASE))
    lines.append("parameters:")
    for k, v in parameters.items():
        lines.append(f"  {k}: " + json.dumps(v))
    return "\n".join(lines) + "\n" + extra


def searched():
    return {
        "lr": {"distribution": "log_uniform_values", "min": LR[0], "max": LR[1]},
        "stripe_k": {"distribution": "int_uniform", "min": STRIPE_K[0], "max": STRIPE_K[1]},
        "layer_sparsity_mode": {"values": MODES},
    }


def run_sweep(coordinator, text, workdir, tag):
    path = os.path.join(workdir, tag + ".yaml")
    db = os.path.join(workdir, tag + ".redb")
    with open(path, "w") as f:
        f.write(text)
    subprocess.run([coordinator, path, "--db", db], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    out = subprocess.run([coordinator, "report", "--db", db, "--format", "csv"], check=True,
                         capture_output=True, text=True).stdout
    rows = [r for r in csv.DictReader(io.StringIO(out)) if r["status"] == "completed"]
    # (trial index, fvu) in proposal order.
    return sorted((int(r["trial"]), float(r["fvu"])) for r in rows if r["fvu"])


def optuna_best(worker, seed, budget, workdir):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        cfg = dict(BASE)
        cfg["lr"] = trial.suggest_float("lr", *LR, log=True)
        cfg["stripe_k"] = trial.suggest_int("stripe_k", *STRIPE_K)
        cfg["layer_sparsity_mode"] = trial.suggest_categorical("layer_sparsity_mode", MODES)
        path = os.path.join(workdir, f"optuna-{seed}-{trial.number}.yaml")
        with open(path, "w") as f:
            json.dump(cfg, f)
        out = subprocess.run([worker, "train", "--config", path, "--json"], check=True,
                             capture_output=True, text=True,
                             env={**os.environ, "RUST_LOG": "warn"}).stdout
        return json.loads(out.strip().splitlines()[-1])["fvu"]

    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=budget)
    return study.best_value


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coordinator", default="target/release/msae-coordinator")
    p.add_argument("--worker", default="target/release/msae-worker")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=30)
    p.add_argument("--skip-optuna", action="store_true")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as work:
        lrs = [LR[0] * (LR[1] / LR[0]) ** (i / 5) for i in range(6)]
        grid_params = {"lr": {"values": [float(f"{x:.6g}") for x in lrs]},
                       "stripe_k": {"values": [1, 2, 4, 6, 10, 16]},
                       "layer_sparsity_mode": {"values": MODES}}
        grid = run_sweep(args.coordinator, yaml_of("grid", "grid", 0, None, grid_params), work,
                         "grid")
        grid_best = min(v for _, v in grid)
        print(f"grid: {len(grid)} trials, best FVU {grid_best:.5f}")
        half = len(grid) // 2
        for method in ["nelder_mead", "particle_swarm", "simulated_annealing"]:
            for seed in seeds:
                extra = "search: {population: 6}\n" if method == "particle_swarm" else ""
                text = yaml_of(method, method, seed, half, searched(), extra)
                res = run_sweep(args.coordinator, text, work, f"{method}-{seed}")
                best = min(v for _, v in res)
                reach = next((i + 1 for i, (_, v) in enumerate(res) if v <= grid_best), None)
                print(f"{method:20} seed {seed}: {len(res)} trials, best FVU {best:.5f} "
                      f"({best / grid_best:.3f}x grid's best); grid's best reached at trial "
                      f"{reach if reach else '-'}")
        bayes, optuna = [], []
        for seed in seeds:
            text = yaml_of("bayes", "bayes", seed, args.budget, searched(),
                           "search: {startup_trials: 10}\n")
            res = run_sweep(args.coordinator, text, work, f"bayes-{seed}")
            bayes.append(min(v for _, v in res))
            if not args.skip_optuna:
                optuna.append(optuna_best(args.worker, seed, args.budget, work))
            print(f"budget {args.budget}, seed {seed}: bayes best FVU {bayes[-1]:.5f}"
                  + (f", Optuna TPE {optuna[-1]:.5f}" if optuna else ""))
        print(f"median over seeds: bayes {statistics.median(bayes):.5f}"
              + (f", Optuna TPE {statistics.median(optuna):.5f}" if optuna else ""))


if __name__ == "__main__":
    main()
