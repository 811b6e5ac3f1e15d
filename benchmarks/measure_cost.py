"""What the trainer measures at the study's shapes, from a baseline commit and from this tree, side by side in one
run: the evaluation each iteration (`evaluate_model`: test loss, accuracy, icl_score), the head scores each
iteration (`head_scores`) and formed_at's reading at every snapshot (`pattern_maxima`).

The study's models: GPT-2's vocabulary, seq_len 80, d_model 128 and 256, 2 layers of 8 heads, bf16 autocast for
the evaluation as the trainer runs it on a CPU with bf16, on the trainer's default held-out sample (50,000 tokens).
Each code runs in its own process, one after the other, with the same threads; a time is the median of 3 calls
after a warm-up.

    python benchmarks/measure_cost.py [--baseline main] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from induction_preset import REPO, baseline_worktree, cpu_name

MEASURE = r"""
import json, statistics, sys, time
import torch
from model.analysis import head_scores, pattern_maxima
from model.config import ModelConfig
from model.train import evaluate_model
from model.transformer import Transformer

d_model, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=50257, d_model=d_model, n_heads=8, n_layers=2, seq_len=80))
windows = torch.randint(0, 50257, (-(-50_000 // 80), 81), generator=torch.Generator().manual_seed(1))
autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def median_seconds(call):
    call()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        value = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


evaluation, metrics = median_seconds(lambda: evaluate_model(model, windows, 64, autocast))
scores, _ = median_seconds(lambda: head_scores(model, windows))
maxima, found = median_seconds(lambda: pattern_maxima(model, windows))
print(json.dumps({"evaluate_model": evaluation, "head_scores": scores, "pattern_maxima": maxima,
                  "test_loss": metrics["test_loss"], "induction_max": found["induction"]}))
"""
TIMED = ("evaluate_model", "head_scores", "pattern_maxima")


def measure(code: Path, d_model: int, threads: int) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(d_model), str(threads)], cwd=code, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git ref measured against [main]")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{cpu_name()}, {args.threads} threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="measure-cost-") as scratch:
        with baseline_worktree(args.baseline, Path(scratch)) as baseline:
            print("| d_model | measure | baseline s | this tree s | ratio |\n|---|---|---|---|---|")
            for d_model in (128, 256):
                old, new = measure(baseline, d_model, args.threads), measure(REPO, d_model, args.threads)
                for name in TIMED:
                    print(f"| {d_model} | {name} | {old[name]:.2f} | {new[name]:.2f} | {old[name] / new[name]:.2f}x |")
                print(f"| {d_model} | test_loss, induction max (baseline / this) | {old['test_loss']:.7f}, "
                      f"{old['induction_max']:.6f} | {new['test_loss']:.7f}, {new['induction_max']:.6f} | |",
                      flush=True)


if __name__ == "__main__":
    main()
