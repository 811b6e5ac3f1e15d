"""Seconds per snapshot of `sweep analyse --what circuit`: exact patching of every edge, EAP, EAP-IG and the
greedy circuit, at the induction preset's shape and at d_model 256 / 8 heads, on one thread (an analysis task's).

The baseline, measured in the same run: exact patching as one whole masked forward pass per edge (every
receiver's input assembled edge by edge from layer 0), which `exact_effects` replaces by computing only the
patched receiver's head and running the rest as the model's own blocks.

    .venv/bin/python benchmarks/circuit_cost.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from model.causal import TASKS, PatchedModel, TaskData, attribution_effects, exact_effects, greedy_circuit
from model.config import ModelConfig
from model.edges import CircuitConfig
from model.transformer import Transformer

SHAPES = {
    "induction preset (d_model 64, 4 heads, seq 64, vocab 66)": dict(d_model=64, n_heads=4, seq_len=64, vocab_size=66),
    "d_model 256, 8 heads, seq 64, vocab 66": dict(d_model=256, n_heads=8, seq_len=64, vocab_size=66),
    "d_model 256, 8 heads, seq 80, vocab 50257 (the paper's largest)": dict(d_model=256, n_heads=8, seq_len=80,
                                                                           vocab_size=50257),
}


def cpu_name() -> str:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    flags = next((line for line in lines if line.startswith("flags")), "")
    extras = [flag for flag in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {flag}" in flags]
    return f"{name} ({', '.join(extras[:2])})"


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large-vocab", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s)")
    cfg = CircuitConfig()
    for name, shape in SHAPES.items():
        if args.skip_large_vocab and shape["vocab_size"] > 1000:
            continue
        torch.manual_seed(0)
        model = Transformer(ModelConfig(n_layers=2, **shape)).eval()
        data = TaskData(torch.zeros(2, shape["seq_len"] + 1, dtype=torch.long), torch.arange(64))
        inputs = TASKS["induction"].inputs(model, data, torch.Generator().manual_seed(0), cfg.sequences)
        patched = PatchedModel(model, inputs, TASKS["induction"])
        edges = len(patched.graph.edges)
        repeats = 1 if shape["vocab_size"] > 1000 else args.repeats
        baseline = best_of(repeats, lambda: patched.evaluate(torch.ones(edges, edges) - torch.eye(edges)))
        timings = {
            "setup (clean and corrupted runs)": best_of(
                repeats, lambda: PatchedModel(model, inputs, TASKS["induction"])
            ),
            "exact patching, every edge": best_of(repeats, lambda: exact_effects(patched)),
            "EAP": best_of(repeats, lambda: attribution_effects(patched, 1)),
            f"EAP-IG ({cfg.ig_steps} steps)": best_of(repeats, lambda: attribution_effects(patched, cfg.ig_steps)),
        }
        changes = exact_effects(patched)
        timings["greedy circuit (prefixes until 90%)"] = best_of(repeats, lambda: greedy_circuit(patched, changes.abs(),
                                                                                               cfg.faithfulness))
        print(f"\n{name}: {edges} edges, {cfg.sequences} sequences")
        print(f"  baseline: exact patching as one whole masked pass an edge  {baseline:8.3f} s")
        for label, seconds in timings.items():
            print(f"  {label:<58} {seconds:8.3f} s  ({seconds / baseline:.3f} x the baseline)")
        total = sum(timings.values())
        print(f"  {'a snapshot in all (what `--what circuit` computes)':<58} {total:8.3f} s  "
              f"({baseline / timings['exact patching, every edge']:.1f}x faster exact patching than the baseline)")


if __name__ == "__main__":
    main()
