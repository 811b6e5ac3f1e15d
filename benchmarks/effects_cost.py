"""Seconds for `sweep effects` over a 1,000-trial table: every axis's effect on formed_at with its bootstrap
intervals (2,000 resamples of the seeds within each grid point, Kaplan-Meier medians), each grid point's replicates,
and the same for every reading `sweep atlas --json` carries.

The table: batch size (4 values) x context (5) x learning rate (5) x layers (2) = 200 grid points x 5 seeds, with
formation times that move with batch and context, and a quarter of the trials that never form (censored at the end
of training); every trial holds a causal circuit of role-edges. The target: under 5 s.

The baseline, measured in the same run: the Kaplan-Meier medians of the same resamples computed one resample at a
time in plain Python (the textbook loop), against model.replicates.km_medians's arrays.

    .venv/bin/python benchmarks/effects_cost.py [--trials-per-point 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from model.replicates import km_medians
from sweep.atlas import Atlas, AtlasRow
from sweep.effects import atlas_effects, effects_document

AXES = {"batch_size": [8, 16, 32, 64], "seq_len": [32, 48, 64, 96, 128], "lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
        "layers": [1, 2]}
ROLE_EDGES = ["embed -> previous_token.v", "previous_token -> induction.k", "embed -> induction.q",
              "embed -> induction.v", "induction -> logits"]


def synthetic_atlas(seeds: int, rng: np.random.Generator) -> Atlas:
    rows = []
    for index, values in enumerate(np.array(np.meshgrid(*AXES.values(), indexing="ij")).reshape(len(AXES), -1).T):
        config = dict(zip(AXES, values.tolist()))
        for seed in range(seeds):
            formed = 1e5 * np.sqrt(config["batch_size"] * config["seq_len"]) * rng.lognormal(0, 0.2)
            never = rng.random() < 0.25
            edges = {edge: 1 + int(rng.integers(0, 3)) for edge in ROLE_EDGES if rng.random() < 0.9}
            circuit = {"edges": sum(edges.values()), "faithfulness": float(rng.uniform(0.85, 1.0)),
                       "role_edges": edges, "role_appeared": {e: formed for e in edges},
                       "does_task_from": None if never else formed, "circuit": [f"edge {i}" for i in range(9)]}
            rows.append(AtlasRow(f"t{index:04d}_{seed}", config | {"seed": seed}, "TERMINATED",
                                 {"test_loss": float(rng.normal(3.6, 0.05))}, {}, None if never else int(formed),
                                 None, circuit=circuit, last_tokens=int(2e7)))
    return Atlas("synthetic", list(AXES), rows, seeds=list(range(seeds)))


def python_km_median(times: list[float], events: list[bool]) -> float:
    order = sorted(range(len(times)), key=lambda i: (times[i], not events[i]))
    survival = 1.0
    for rank, i in enumerate(order):
        if events[i]:
            survival *= 1 - 1 / (len(order) - rank)
            if survival <= 0.5 + 1e-12:
                return times[i]
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials-per-point", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    atlas = synthetic_atlas(args.trials_per_point, rng)
    print(f"{len(atlas.rows)} trials; CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores")

    start = time.perf_counter()
    document = effects_document(atlas, {}, "formed_at")
    formed_at = time.perf_counter() - start
    start = time.perf_counter()
    every = atlas_effects(atlas, {})
    all_readings = time.perf_counter() - start
    batch = next(e for e in document["effects"] if e["axis"] == "batch_size")["values"]
    print(f"sweep effects --reading formed_at: {formed_at:.2f} s (target 5 s: {formed_at / 5:.2f}x of it); "
          f"batch 8 -> 64: {[round(v['estimate'] or 0) for v in batch]}")
    print(f"every reading ({', '.join(every)}): {all_readings:.2f} s")

    # the baseline: the same Kaplan-Meier medians, one resample at a time
    values = rng.uniform(1e6, 1e7, size=(2000, 250))
    events = rng.random((2000, 250)) > 0.25
    start = time.perf_counter()
    vectorised = km_medians(values, events)
    fast = time.perf_counter() - start
    start = time.perf_counter()
    looped = [python_km_median(list(v), list(e)) for v, e in zip(values, events)]
    slow = time.perf_counter() - start
    assert np.allclose(vectorised, looped)
    print(f"Kaplan-Meier medians of 2,000 resamples of 250 trials: arrays {fast * 1e3:.0f} ms, a Python loop "
          f"{slow * 1e3:.0f} ms ({slow / fast:.0f}x)")


if __name__ == "__main__":
    main()
