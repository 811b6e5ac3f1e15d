"""Training tokens/s of `sweep train repeat` at the induction preset's 2-layer shape: eager and compiled, 1 and 2
threads, from a baseline commit and from this tree, side by side in one run.

Each is one `sweep train` process, alone (no Ray), 4M tokens in 4 iterations; the rate is the median of the
iterations after the first (which pays for warm-up and compiling). Compile time is the first iteration's
extra time over the others.

    SWEEP_DATA_DIR=../shared/data python benchmarks/repeat_rates.py [--baseline main]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from induction_preset import REPO, baseline_worktree, cpu_name

SHAPE = ["--layers", "2", "--d-model", "64", "--heads", "4", "--seq-len", "64", "--lr", "1e-3", "--batch-size", "32",
         "--max-tokens", "4000000", "--eval-every-tokens", "1000000", "--snapshots", "none"]


def rate(code: Path, out: Path, threads: int, compiled: bool) -> tuple[float, float]:
    """(median tokens/s after the first iteration, seconds the first iteration took beyond them)."""
    command = [sys.executable, "-m", "sweep.cli", "train", "repeat", *SHAPE, "--threads", str(threads),
               "--compile" if compiled else "--no-compile", "--out", str(out)]
    subprocess.run(command, cwd=code, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = statistics.median(line["tokens_per_second"] for line in lines[1:])
    tokens = lines[0]["tokens_seen"]
    return later, tokens / lines[0]["tokens_per_second"] - tokens / later


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git ref measured against [main]")
    args = parser.parse_args()
    print(f"{cpu_name()}, {sys.version.split()[0]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="repeat-rates-") as scratch:
        scratch = Path(scratch)
        with baseline_worktree(args.baseline, scratch) as baseline:
            print("| threads | mode | baseline tokens/s | this tree tokens/s | ratio | compile s (baseline / this) |")
            print("|---|---|---|---|---|---|")
            for threads in (1, 2):
                for compiled in (False, True):
                    runs = [rate(code, scratch / f"{label}-{threads}-{compiled}", threads, compiled)
                            for label, code in (("baseline", baseline), ("tree", REPO))]
                    (old, old_compile), (new, new_compile) = runs
                    compile_cell = f"{old_compile:.1f} / {new_compile:.1f}" if compiled else ""
                    print(f"| {threads} | {'compiled' if compiled else 'eager'} | {old:,.0f} | {new:,.0f} | "
                          f"{new / old:.2f}x | {compile_cell} |", flush=True)


if __name__ == "__main__":
    main()
