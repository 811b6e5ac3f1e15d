"""Size and load time of `sweep report` for a 96-trial experiment (the paper grid), and `sweep atlas` on 200 trials.

The experiment is laid out as Tune leaves it: one real checkpoint (a short
`sweep train` run with 2 layers and 8 heads) copied into 96 trial folders
whose configs vary over the paper grid's axes, each with 12 iterations of
results (head history included) whose scores depend on the axes. The report
is built from storage alone, then opened in headless Chromium with Selenium:
load time is the browser's own navigation timing (loadEventEnd), and the
viewer must be ready.

    python benchmarks/report_size.py
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

from sweep.cli import main as cli
from sweep.report import build_report
from sweep.results import load_experiment
from sweep.storage import open_storage

AXES = {
    "seq_len": [20, 50, 80],
    "lr": [1e-4, 1e-3],
    "heads": [4, 8],
    "d_model": [128, 256],
    "layers": [1, 2],
    "mlp": [False, True],
}
ITERATIONS = 12


def make_experiment(root: Path, count: int = 96, name: str = "grid96") -> Path:
    run = root / "run"
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "repeat",
            "--layers",
            "2",
            "--heads",
            "8",
            "--d-model",
            "64",
            "--seq-len",
            "64",
            "--batch-size",
            "8",
            "--max-tokens",
            "2048",
            "--eval-every-tokens",
            "2048",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 0, result.output
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    storage = root / "results"
    experiment = storage / name
    rng = random.Random(0)
    grid = itertools.product(range(3), itertools.product(*AXES.values()))  # seeds x the paper grid
    for index, (seed, values) in zip(range(count), grid):
        config = dict(zip(AXES, values)) | {
            "seed": seed,
            "batch_size": 50,
            "max_tokens": 12_000_000,
            "eval_every_tokens": 1_000_000,
            "tokenizer": "gpt2",
        }
        trial = experiment / f"trial_{index:05d}"
        shutil.copytree(run / "checkpoint", trial / "checkpoint_000011")
        lines = []
        for iteration in range(1, ITERATIONS + 1):
            grows = config["layers"] == 2 and iteration > 3
            entry = line | {
                "training_iteration": iteration,
                "trial_id": f"{index:05d}",
                "config": config,
                "tokens_seen": iteration * 1_000_000,
                "test_loss": 5.0 - 0.1 * iteration - rng.random() * 0.2,
                "induction_score_max": (0.7 if grows else 0.05) + rng.random() * 0.05,
                "done": iteration == ITERATIONS,
            }
            lines.append(json.dumps(entry))
        (trial / "result.json").write_text("\n".join(lines) + "\n")
    (experiment / "sweep.json").write_text(
        json.dumps(
            {
                "metric": "test_loss",
                "mode": "min",
                "trials": count,
                "created": "2026-01-01T00:00:00",
                "axes": AXES,
                "launch": {"max_iterations": None},
            }
        )
    )
    return storage


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        storage = make_experiment(Path(directory))
        started = time.perf_counter()
        page = build_report(load_experiment(open_storage(str(storage)), "grid96"), top=3)
        built = time.perf_counter() - started
        out = Path(directory) / "report.html"
        out.write_text(page)
        print(f"96 trials: report built in {built:.1f} s, {out.stat().st_size / 1e6:.2f} MB")
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from test_report import open_in_chromium

        driver = open_in_chromium(out, Path(directory) / "shot.png")
        try:
            deadline = time.time() + 60
            while driver.execute_script("return document.body && document.body.getAttribute('data-ready')") != "1":
                assert time.time() < deadline, "report did not finish loading"
                time.sleep(0.05)
            timing = driver.execute_script(
                "var t = performance.timing; return [t.domContentLoadedEventEnd - t.navigationStart, t.loadEventEnd - "
                "t.navigationStart]"
            )
            print(
                f"chromium: DOMContentLoaded {timing[0] / 1000:.2f} s, load (images decoded, viewers ready) "
                f"{timing[1] / 1000:.2f} s"
            )
        finally:
            driver.quit()
        make_experiment(Path(directory) / "large", count=200, name="grid200")
        started = time.perf_counter()
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "sweep.cli",
                "atlas",
                "grid200",
                "--storage",
                str(Path(directory) / "large" / "results"),
            ],
            capture_output=True,
            text=True,
        )
        assert listing.returncode == 0, listing.stderr
        print(
            f"200 trials: `sweep atlas` (a fresh process, start-up included) took {time.perf_counter() - started:.1f} s"
        )


if __name__ == "__main__":
    main()
