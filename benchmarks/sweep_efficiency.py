"""Sweep-level numbers: ASHA's savings on a 16-trial grid, and the overhead of running trials through Ray.

ASHA efficiency: the same 16-trial grid (smoke shapes, 8 iterations a trial)
is swept with no early stopping (the full grid), and with ASHA at reduction
factor 2 and 4, with 2 trials at a time (one CPU each) and with all 16 at
once (0.125 CPU each). Printed: the best test loss each found, relative to
the full grid's, and the trial-iterations each spent, relative to the full
grid's.

Schedulers: the same grid under asha, halving (synchronous successive
halving) and hyperband (Tune's brackets), 2 and 16 trials at once, against
fifo (every trial to its end); `--only halving` runs fifo and halving alone.
Search: 64 random samples of lr (log-uniform) and d_model under each
scheduler against all 64 to the end, and Optuna's TPE against random search
at equal compute (16 trials each); `--only optuna` compares the two over
three seeds.

Sweep overhead: 8 identical short trials (`--num-samples 8`) as a sweep on 2
CPUs, against the same 8 trainings run back to back in this process with one
thread each, divided by the concurrency (2). The sweep's wall time is the
whole `sweep launch` command: Ray start-up, trial actors, checkpoints and
heatmaps written to storage, result reading.

    SWEEP_DATA_DIR=../shared/data python benchmarks/sweep_efficiency.py \
        [--only asha|schedulers|halving|search|optuna|overhead]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model.data import prepare_data
from model.train import Trainer
from sweep.plan import LaunchConfig, plan_sweep
from sweep.results import load_experiment
from sweep.space import PRESETS, trial_configs
from sweep.storage import open_storage

GRID = ("lr=3e-4,1e-3,3e-3,1e-2", "heads=2,4", "d_model=16,32")
ITERATIONS = 8
SMOKE = PRESETS["smoke"].fixed
EVAL_EVERY = SMOKE["max_tokens"] // ITERATIONS


def launch(dataset: str, storage: Path, name: str, *flags: str) -> float:
    command = [
        sys.executable,
        "-m",
        "sweep.cli",
        "launch",
        dataset,
        "--preset",
        "smoke",
        "--storage",
        str(storage),
        "--name",
        name,
        "--grid",
        f"eval_every_tokens={EVAL_EVERY}",
        *flags,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def summary(storage: Path, name: str) -> tuple[float, int]:
    experiment = load_experiment(open_storage(str(storage)), name)
    best = min(t.metrics["test_loss"] for t in experiment.trials if "test_loss" in t.metrics)
    return best, sum(t.iterations for t in experiment.trials)


def asha_efficiency(dataset: str, storage: Path) -> None:
    grid = [flag for axis in GRID for flag in ("--grid", axis)]
    all_at_once = ("--cpus-per-trial", "0.125")  # 16 trials share the 2 CPUs, all running at once
    launch(dataset, storage, "full-grid", *grid, "--grace-period", str(ITERATIONS), *all_at_once)
    full_best, full_iterations = summary(storage, "full-grid")
    print(f"full grid: 16 trials, {full_iterations} trial-iterations, best test_loss {full_best:.4f}", flush=True)
    # ASHA is asynchronous: a trial reaching a rung before any other is compared with nothing
    # and goes on. How many trials run at once therefore decides how much it can stop.
    for concurrency, resources in ((2, ("--cpus-per-trial", "1")), (16, all_at_once)):
        for factor in (2, 4):
            name = f"asha-rf{factor}-c{concurrency}"
            wall = launch(
                dataset, storage, name, *grid, "--grace-period", "1", "--reduction-factor", str(factor), *resources
            )
            best, iterations = summary(storage, name)
            print(f"ASHA, {concurrency:2d} trials at once, reduction factor {factor}: best test_loss {best:.4f} "
                  f"({(best / full_best - 1) * 100:+.2f}% vs full grid), {iterations} trial-iterations "
                  f"({iterations / full_iterations:.0%} of the full grid's), {wall:.0f}s", flush=True)


def report(name: str, storage: Path, full_best: float, full_iterations: int, wall: float) -> None:
    best, iterations = summary(storage, name)
    print(f"{name:28s} best test_loss {best:.4f} ({(best / full_best - 1) * 100:+.2f}% vs all trials to the end), "
          f"{iterations:4d} trial-iterations ({iterations / full_iterations:4.0%}), {wall:4.0f}s", flush=True)


def scheduler_efficiency(dataset: str, storage: Path, halving_only: bool = False) -> None:
    """asha / halving / hyperband against fifo on the 16-trial grid, 2 and 16 trials at once."""
    grid = [flag for axis in GRID for flag in ("--grid", axis)]
    wall = launch(dataset, storage, "grid-fifo", *grid, "--scheduler", "fifo", "--cpus-per-trial", "0.125")
    full_best, full_iterations = summary(storage, "grid-fifo")
    report("grid-fifo", storage, full_best, full_iterations, wall)
    runs = [("halving", 2), ("halving", 3), ("halving", 4)]
    if not halving_only:
        runs += [("asha", 2), ("hyperband", 2)]
    for scheduler, factor in runs:
        for concurrency, cpus in ((2, "1"), (16, "0.125")):
            if (scheduler == "halving" and concurrency == 16 and factor != 2) or (halving_only and concurrency == 16):
                continue  # synchronous: the same decisions as with 2 at once
            name = f"grid-{scheduler}-rf{factor}-c{concurrency}"
            wall = launch(
                dataset,
                storage,
                name,
                *grid,
                "--scheduler",
                scheduler,
                "--reduction-factor",
                str(factor),
                "--cpus-per-trial",
                cpus,
            )
            report(name, storage, full_best, full_iterations, wall)


def search_efficiency(dataset: str, storage: Path) -> None:
    """A 64-sample random search over lr and d_model, all trials to the end and under each scheduler;
    then Optuna's TPE against random search at equal compute (16 trials each, no early stopping)."""
    space = [
        "--grid",
        "lr=loguniform:1e-4:3e-2",
        "--grid",
        "d_model=choice:16,24,32,48,64",
        "--grid",
        "heads=2",
        "--search",
        "random",
    ]
    samples = ["--num-samples", "64", "--cpus-per-trial", "0.125"]
    wall = launch(dataset, storage, "random64-fifo", *space, *samples, "--scheduler", "fifo")
    full_best, full_iterations = summary(storage, "random64-fifo")
    report("random64-fifo", storage, full_best, full_iterations, wall)
    for scheduler in ("asha", "halving", "hyperband"):
        name = f"random64-{scheduler}"
        wall = launch(dataset, storage, name, *space, *samples, "--scheduler", scheduler, "--reduction-factor", "2")
        report(name, storage, full_best, full_iterations, wall)
    optuna_against_random(dataset, storage, seeds=(0,))


def optuna_against_random(dataset: str, storage: Path, seeds: tuple[int, ...]) -> None:
    """Optuna's TPE against random search at equal compute: 16 trials each, 4 at a time, no early stopping,
    on the same space and seeds (`--grid seed=N` seeds both the draws and the models)."""
    space = ["--grid", "lr=loguniform:1e-4:3e-2", "--grid", "d_model=choice:16,24,32,48,64", "--grid", "heads=2"]
    found: dict[str, list[float]] = {"random": [], "optuna": []}
    for seed in seeds:
        for search in found:
            name = f"{search}16-seed{seed}"
            wall = launch(
                dataset,
                storage,
                name,
                *space,
                "--grid",
                f"seed={seed}",
                "--search",
                search,
                "--num-samples",
                "16",
                "--scheduler",
                "fifo",
                "--cpus-per-trial",
                "0.5",
                "--max-concurrent",
                "4",
            )
            best, _ = summary(storage, name)
            found[search].append(best)
            print(f"{name:18s} best test_loss {best:.4f}, {wall:4.0f}s", flush=True)
    for search, bests in found.items():
        print(f"{search}: mean best test_loss {sum(bests) / len(bests):.4f} over seeds {list(seeds)}", flush=True)


def sweep_overhead(dataset: str, storage: Path) -> None:
    trials, concurrency = 8, 2
    grid = ("lr=1e-3", "heads=2", f"eval_every_tokens={EVAL_EVERY}")
    wall = launch(
        dataset,
        storage,
        "overhead",
        *(f for axis in grid for f in ("--grid", axis)),
        "--num-samples",
        str(trials),
        "--grace-period",
        str(ITERATIONS),
        "--max-concurrent",
        str(concurrency),
    )
    # The same trial config, trained in this process exactly as a trial does: iterations, each
    # followed by a full checkpoint (weights, optimizer, head scores, heatmaps, sample).
    config = plan_sweep(LaunchConfig(dataset=dataset, grid=grid, storage=str(storage))).trials[0]
    data_cfg, model_cfg, train_cfg = trial_configs(config)
    data = prepare_data(data_cfg, model_cfg.seq_len)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data.tokenizer.vocab_size)
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(trials):
            trainer = Trainer(
                model_cfg, dataclasses.replace(train_cfg, seed=index), data.train, data.test, data.tokenizer, data_cfg
            )
            while not trainer.finished:
                trainer.train_iteration()
                trainer.save_checkpoint(Path(scratch) / f"{index}-{trainer.iteration}")
    serial = time.perf_counter() - started
    ideal = serial / concurrency
    print(
        f"{trials} identical trials: sweep {wall:.1f}s, back to back in one process {serial:.1f}s / {concurrency} = "
        f"{ideal:.1f}s; "
        f"overhead {wall / ideal:.2f}x, {(wall - ideal) / (trials / concurrency):.1f}s per trial slot",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="imdb")
    parser.add_argument("--only", choices=("asha", "schedulers", "halving", "search", "optuna", "overhead"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with tempfile.TemporaryDirectory() as storage:
        # One untimed run fills the tokenized-data cache, so no measurement pays for tokenizing.
        launch(
            args.dataset,
            Path(storage),
            "warm-up",
            "--grid",
            "lr=1e-3",
            "--grid",
            "heads=2",
            "--grid",
            "max_tokens=8192",
            "--grid",
            "eval_every_tokens=8192",
        )
        if args.only in (None, "asha"):
            asha_efficiency(args.dataset, Path(storage))
        if args.only in (None, "schedulers"):
            scheduler_efficiency(args.dataset, Path(storage))
        if args.only == "halving":
            scheduler_efficiency(args.dataset, Path(storage), halving_only=True)
        if args.only == "optuna":
            optuna_against_random(args.dataset, Path(storage), seeds=(0, 1, 2))
        if args.only in (None, "search"):
            search_efficiency(args.dataset, Path(storage))
        if args.only in (None, "overhead"):
            sweep_overhead(args.dataset, Path(storage))


if __name__ == "__main__":
    main()
