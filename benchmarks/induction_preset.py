"""Time to first insight: `sweep launch --preset induction` from a baseline commit and from this tree, side by side.

Each is the whole command as a user runs it (Ray start-up, data, both trials, checkpoints, heatmaps,
snapshots), in a fresh process, alone, alternating baseline / this tree `--repeats` times. The baseline
runs from a `git worktree` of `--baseline` (default: main), importing its own code with this environment.
Printed per run: wall time, and its split read back from the experiment's own records:

- driver: wall time outside the trials (Python and Ray start-up, data, result reading, exit);
- trial start: from a trial's start to its first iteration's start (worker, data from the object store,
  model, first snapshot);
- steps: the training steps (tokens / the loop's tokens_per_second, summed over iterations);
- iteration rest: evaluation, head scores, checkpoint, heatmaps, snapshots, Tune's report.

Trials run side by side, so trial columns are the slower trial's. Then the ratio baseline / this tree of
the median wall times, and a check that the science held (induction_formed_at of the 2-layer trial).

    SWEEP_DATA_DIR=../shared/data python benchmarks/induction_preset.py [--baseline main] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(features)})"


@contextlib.contextmanager
def baseline_worktree(ref: str, scratch: Path):
    """A `git worktree` of `ref` inside `scratch` for the baseline's code, removed afterwards."""
    baseline = scratch / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(baseline), ref], cwd=REPO, check=True,
                   capture_output=True)
    try:
        yield baseline
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, check=False)


def run(code: Path, storage: Path, name: str, extra: list[str]) -> float:
    command = [sys.executable, "-m", "sweep.cli", "launch", "--preset", "induction", "--storage", str(storage),
               "--name", name, *extra]
    started = time.perf_counter()
    subprocess.run(command, cwd=code, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def split(storage: Path, name: str, wall: float) -> dict[str, float]:
    """The phases of one launch, from each trial's result.json."""
    trials = []
    for result in sorted((storage / name).glob("trial_*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        iterations = sum(line["time_this_iter_s"] for line in lines)
        steps, previous = 0.0, 0
        for line in lines:
            steps += (line["tokens_seen"] - previous) / line["tokens_per_second"]
            previous = line["tokens_seen"]
        started = lines[-1]["timestamp"] - lines[-1]["time_total_s"]
        first_iteration_start = lines[0]["timestamp"] - lines[0]["time_this_iter_s"]
        trials.append({"start": started, "end": lines[-1]["timestamp"], "setup": first_iteration_start - started,
                       "steps": steps, "rest": iterations - steps, "layers": lines[-1]["config"]["layers"],
                       "formed": lines[-1].get("induction_formed_at")})
    span = max(t["end"] for t in trials) - min(t["start"] for t in trials)
    slowest = max(trials, key=lambda t: t["steps"] + t["rest"])
    two_layers = next(t for t in trials if t["layers"] == 2)
    return {"wall": wall, "driver": wall - span, "trial start": slowest["setup"], "steps": slowest["steps"],
            "iteration rest": slowest["rest"], "formed_at": two_layers["formed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git ref measured against [main]")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--grid", action="append", default=[], help="--grid passed to both (a shorter run to try)")
    args = parser.parse_args()
    extra = [flag for grid in args.grid for flag in ("--grid", grid)]
    print(f"{cpu_name()}, {sys.version.split()[0]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="induction-bench-") as scratch:
        scratch = Path(scratch)
        with baseline_worktree(args.baseline, scratch) as baseline:
            rows: dict[str, list[dict[str, float]]] = {"baseline": [], "this tree": []}
            for repeat in range(args.repeats):
                for label, code in (("baseline", baseline), ("this tree", REPO)):
                    name = f"{label.replace(' ', '-')}-{repeat}"
                    wall = run(code, scratch / "results", name, extra)
                    rows[label].append(split(scratch / "results", name, wall))
                    print(label, " ".join(f"{k} {v:,.1f}" for k, v in rows[label][-1].items()), flush=True)
    print("\n| | wall | driver | trial start | steps | iteration rest | induction_formed_at (2 layers) |")
    print("|---|---|---|---|---|---|---|")
    for label, measured in rows.items():
        medians = {k: statistics.median(r[k] for r in measured) for k in measured[0] if k != "formed_at"}
        formed = sorted({r["formed_at"] for r in measured})
        print(f"| {label} | {medians['wall']:.1f} s | {medians['driver']:.1f} s | {medians['trial start']:.1f} s | "
              f"{medians['steps']:.1f} s | {medians['iteration rest']:.1f} s | {formed} |")
    walls = {label: statistics.median(r["wall"] for r in measured) for label, measured in rows.items()}
    ratio = walls["baseline"] / walls["this tree"]
    print(f"\nbaseline / this tree, wall: {ratio:.2f}x")


if __name__ == "__main__":
    main()
