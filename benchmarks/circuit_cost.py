"""Seconds for one snapshot's causal circuit on one CPU thread (an analysis task's): the null, exact patching of
every edge with intervals, EAP, EAP-IG, the circuit and the robustness panel, at the induction preset's shape and
at the paper's largest (vocab 50257, d_model 256, 8 heads, 2 layers, seq_len 80) on the text task.

The baseline, measured in the same run: the same snapshot through model/causal.py as it was at --baseline (git
show, loaded as a module of its own). And the unhurried computation: today's code reading every position of every
sequence instead of 8 (`--positions`), whose circuit the fast one should match.

The model: a random initialisation with its weights scaled by 3, so that it "does" the task (an untrained model of
the shape does not clear the null, and then nothing is patched at all: that would time nothing).

    .venv/bin/python benchmarks/circuit_cost.py [--threads 1] [--baseline 1ec7811] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from model.causal import find_circuit, task_null
from model.config import ModelConfig
from model.edges import CircuitConfig, jaccard
from model.tasks import TaskData
from model.transformer import Transformer

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    "induction preset's shape (d_model 64, 4 heads, seq 64, vocab 66), text": (
        dict(d_model=64, n_heads=4, seq_len=64, vocab_size=66), "text"),
    "paper's largest (d_model 256, 8 heads, seq 80, vocab 50257), text": (
        dict(d_model=256, n_heads=8, seq_len=80, vocab_size=50257), "text"),
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


def old_causal(commit: str):
    """model/causal.py as it was at `commit`, imported as model.causal_baseline (its relative imports resolve to
    today's model package, which it only uses for the transformer, the graph and ConfigError)."""
    source = subprocess.run(["git", "show", f"{commit}:model/causal.py"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / "causal_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("model.causal_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def timed(work):
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", default="1ec7811", help="the commit whose model/causal.py is the baseline")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    os.environ["SWEEP_CACHE_DIR"] = tempfile.mkdtemp()  # the null is timed as a first snapshot of its shape meets it
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s)")
    baseline = None if args.skip_baseline else old_causal(args.baseline)
    cfg = CircuitConfig()
    for name, (shape, task) in SHAPES.items():
        torch.manual_seed(0)
        model = Transformer(ModelConfig(n_layers=2, **shape)).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(3.0)
        vocab, length = shape["vocab_size"], shape["seq_len"]
        windows = torch.randint(0, vocab, (64, length + 1), generator=torch.Generator().manual_seed(3))
        data = TaskData(windows, windows.unique())
        print(f"\n{name}")
        null, seconds_null = timed(lambda: task_null(model, data, task, cfg))
        print(f"  null ({cfg.null_inits} untrained models, once a shape)        {seconds_null:8.1f} s")
        fast, seconds_fast = timed(lambda: find_circuit(model, data, task, cfg, null=null))
        print(f"  circuit, intervals, estimates, panel ({cfg.positions} positions)   {seconds_fast:8.1f} s   "
              f"{len(fast.circuit)} edges, faithfulness {fast.faithfulness}, reached {fast.target_reached}, "
              f"panel spread {fast.panel_spread}")
        print(f"  a snapshot in all                                          {seconds_null + seconds_fast:8.1f} s")
        full = replace(cfg, positions=length)
        slow, seconds_slow = timed(lambda: find_circuit(model, data, task, full, null=task_null(model, data, task,
                                                                                                    full)))
        print(f"  unhurried: every position                                  {seconds_slow:8.1f} s   "
              f"{len(slow.circuit)} edges, faithfulness {slow.faithfulness}; the two circuits' overlap "
              f"(Jaccard) {jaccard(fast.circuit, slow.circuit)}")
        if baseline is not None:
            old_inputs = baseline.TaskData(data.held_out, data.tokens)
            old, seconds_old = timed(lambda: baseline.find_circuit(model, old_inputs, task, baseline.CircuitConfig()))
            print(f"  baseline: model/causal.py at {args.baseline}                     {seconds_old:8.1f} s   "
                  f"{len(old.circuit)} edges ({seconds_old / (seconds_null + seconds_fast):.1f}x the time of "
                  "today's snapshot, null included)")


if __name__ == "__main__":
    main()
