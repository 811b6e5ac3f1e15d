"""Sweeps end to end on local Ray: S3 storage, ASHA, fault tolerance, resume, W&B, results."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    S3_SECRET,
    ray_process_ids,
    reached_checkpoint,
    run_env,
    s3_objects,
    sweep,
    wait_for,
    write_reviews,
)

# Tiny trials on a small local file: seconds each.
TINY = ["--tokenizer", "bytes", "--grid", "d_model=16", "--grid", "seq_len=16", "--grid", "batch_size=16",
        "--grid", "max_tokens=8192", "--grid", "eval_every_tokens=2048"]


@pytest.fixture
def reviews(tmp_path) -> Path:
    path = tmp_path / "reviews.jsonl"
    write_reviews(path, count=600)
    return path


def trial_results(storage: Path, name: str) -> dict[str, list[dict]]:
    """Every trial's reported results, by trial folder. A trial that has not reported yet (its folder made, no
    result.json) is left out, and so is a line a killed driver left half-written (Tune ends each line it writes
    with a newline)."""
    results = {}
    for folder in sorted((storage / name).glob("trial_*")):
        path = folder / "result.json"
        if path.is_file():
            whole = path.read_text().rpartition("\n")[0]
            results[folder.name] = [json.loads(line) for line in whole.splitlines() if line.strip()]
    return results


@pytest.mark.usefixtures("no_stray_ray")
def test_smoke_sweep_on_s3_then_best_from_a_fresh_process(s3_server, data_mirror):
    launched = sweep("launch", "imdb", "--preset", "smoke", "--storage", "s3://bucket/exp", "--name", "imdb-smoke")
    # every Ray session's logs on the machine (session_latest may be another run's by now)
    logs = [p for p in Path("/tmp/ray").glob("session_2*/logs/**/*") if p.is_file()]
    assert logs, "no Ray logs to scan"
    assert S3_SECRET not in launched.stdout + launched.stderr
    assert "storage: about" in launched.stderr and "checkpoints" in launched.stderr  # the footprint, said first
    assert "next: sweep atlas imdb-smoke" in launched.stdout
    assert not [p for p in logs if S3_SECRET.encode() in p.read_bytes()]  # nor in any Ray log
    best = json.loads(sweep("best", "--storage", "s3://bucket/exp", "--metric", "test_loss", "--json").stdout)
    assert best["experiment"] == "imdb-smoke" and best["storage"] == "s3://bucket/exp"
    top = best["trials"][0]
    assert top["status"] == "TERMINATED" and top["iterations"] == 4
    assert top["config"]["lr"] == 3e-3  # the smoke grid's good learning rate wins
    objects = s3_objects(s3_server)
    prefix = top["checkpoint"].removeprefix("s3://bucket/")
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "trainer_state.pt",
        "heads.json",
        "sample.txt",
        "heatmaps/patterns.json",
    ):
        assert f"{prefix}/{name}" in objects, name
    assert top["heatmaps"] and all(h.startswith("s3://bucket/exp/imdb-smoke/") for h in top["heatmaps"])
    assert all(h.removeprefix("s3://bucket/") in objects for h in top["heatmaps"])
    # every trial's latest checkpoint holds the analysis files
    checkpoints = {re.match(r"^(.*/checkpoint_\d+)/", key).group(1) for key in objects if "/checkpoint_" in key}
    assert len(checkpoints) >= 4
    for checkpoint in checkpoints:
        assert f"{checkpoint}/heads.json" in objects and f"{checkpoint}/sample.txt" in objects
    # credentials come from the environment only: never written into storage
    assert not [key for key, body in objects.items() if S3_SECRET.encode() in body]


@pytest.mark.usefixtures("no_stray_ray", "shared_ray")
def test_asha_stops_a_clearly_bad_learning_rate_early(reviews, tmp_path):
    sweep("launch", reviews, *TINY, "--grid", "lr=3e-3,1e-6", "--grid", "heads=2", "--max-concurrent", "1",
          "--storage", tmp_path / "results", "--name", "asha", "--grace-period", "1", "--reduction-factor", "2")
    results = trial_results(tmp_path / "results", "asha")
    iterations = sorted(len(lines) for lines in results.values())
    assert iterations == [1, 4]  # the 1e-6 trial stopped at the first rung
    table = sweep("results", "asha", "--storage", tmp_path / "results").stdout
    assert "terminated" in table and "TERMINATED" not in table  # one spelling in every table

    # Without early stopping (the induction preset's choice: a comparison) every trial trains to the end.
    sweep("launch", reviews, *TINY, "--grid", "lr=3e-3,1e-6", "--grid", "heads=2", "--max-concurrent", "1",
          "--storage", tmp_path / "results", "--name", "fifo", "--no-early-stopping")
    assert sorted(len(lines) for lines in trial_results(tmp_path / "results", "fifo").values()) == [4, 4]


def test_the_induction_preset_lets_both_models_finish(tmp_path):
    from sweep.plan import LaunchConfig, plan_sweep

    assert plan_sweep(LaunchConfig(dataset="", preset="induction", storage=str(tmp_path))).early_stopping is False
    assert plan_sweep(
        LaunchConfig(dataset="", preset="induction", storage=str(tmp_path), early_stopping=True)
    ).early_stopping
    assert plan_sweep(LaunchConfig(dataset=str(tmp_path), preset="smoke", storage=str(tmp_path))).early_stopping


@pytest.mark.usefixtures("no_stray_ray", "shared_ray")
def test_nan_trial_errors_once_and_the_others_finish(reviews, tmp_path):
    sweep("launch", reviews, *TINY, "--grid", "lr=1e-3,1e4", "--grid", "heads=2", "--storage", tmp_path / "results",
          "--name", "nan", "--grace-period", "4", "--max-failures", "3")
    status = sweep("status", "nan", "--storage", tmp_path / "results").stdout
    assert "1 error" in status and "1 terminated" in status
    rows = {row["lr"]: row for row in _csv_rows(tmp_path, "nan")}
    assert rows["10000.0"]["error"] == "nan_loss"
    assert rows["0.001"]["status"] == "TERMINATED" and rows["0.001"]["iterations"] == "4"
    error_file = next((tmp_path / "results" / "nan").glob("trial_*/error.txt"))
    assert error_file.read_text().count("Failure #") == 1  # not retried


def _csv_rows(tmp_path, name):
    import csv

    sweep("results", name, "--storage", tmp_path / "results", "--csv", tmp_path / f"{name}.csv")
    with open(tmp_path / f"{name}.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.usefixtures("no_stray_ray")
def test_killed_trial_worker_resumes_from_its_checkpoint(reviews, tmp_path):
    storage = tmp_path / "results"
    process = subprocess.Popen(
        [sys.executable, "-m", "sweep.cli", "launch", str(reviews), *TINY, "--grid", "max_tokens=40960",
         "--grid", "lr=3e-3", "--grid", "heads=2", "--storage", str(storage), "--name", "kill", "--grace-period", "20"],
        env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(lambda: reached_checkpoint(storage / "kill" / "trial_*", 2), 180, "a trial's third checkpoint",
                 alive=process, interval=0.2)
        killed = _kill_trial_workers()
        assert killed, "no trial worker found to kill"
        output, _ = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 0, output
    (lines,) = trial_results(storage, "kill").values()
    assert lines[-1]["tokens_seen"] == 40960 and lines[-1]["training_iteration"] == 20
    restored = [line for line in lines if line["iterations_since_restore"] < line["training_iteration"]]
    assert restored, "the trial never restarted"
    # the restarted worker continued from the checkpoint: no gap, nothing trained twice
    assert all(line["tokens_seen"] == 2048 * line["training_iteration"] for line in lines)
    # every head's history survives the restart and the checkpoints' rotation (2 kept of 20), read from storage alone
    assert (
        len(list(storage.glob("kill/trial_*/checkpoint_*"))) <= 3
    )  # the 2 best, and the latest if it is not one of them
    history = json.loads(sweep("heads", "kill", "--storage", storage, "--history", "--json").stdout)["history"]
    assert [row["iteration"] for row in history] == list(range(1, 21))
    assert [row["tokens_seen"] for row in history] == [2048 * i for i in range(1, 21)]
    assert all(set(row["heads"]) == {"0.0", "0.1"} for row in history)
    best = json.loads(sweep("best", "kill", "--storage", storage, "--metric", "test_loss", "--json").stdout)["trials"][
        0
    ]
    assert {"induction_formed_at", "prev_token_formed_at", "icl_score"} <= set(best["metrics"])


def _kill_trial_workers() -> list[int]:
    """This test's trial workers (never those of a test running beside it, nor the shared Ray's)."""
    killed, mine = [], ray_process_ids()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) in mine:
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if (command.startswith(b"ray::ImplicitFunc") or b"ray::ImplicitFunc.train" in command):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


@pytest.mark.usefixtures("no_stray_ray")
def test_driver_killed_then_resume_finishes_every_trial_once(reviews, tmp_path):
    storage = tmp_path / "results"
    process = subprocess.Popen(
        [sys.executable, "-m", "sweep.cli", "launch", str(reviews), *TINY, "--grid", "max_tokens=20480",
         "--grid", "lr=1e-3,3e-3", "--grid", "heads=2,4", "--storage", str(storage), "--name", "driver",
         "--grace-period", "10", "--max-concurrent", "2"],
        env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    def finished() -> set[str]:
        """The trials Tune's saved state records as finished. (A trial whose last report says done, killed before
        Tune saved that, is one Tune goes on with: it retraces its last iteration and reports it again.)"""
        from sweep.results import _trial_states
        from sweep.storage import open_storage

        store = open_storage(str(storage))
        files = {path.name for path in (storage / "driver").glob("experiment_state-*.json")}
        try:
            states, _ = _trial_states(store, store.path("driver"), files)
        except (OSError, ValueError):  # caught mid-write
            return set()
        return {directory for directory, state in states.items() if state["status"] == "TERMINATED"}

    try:  # killed once a trial has finished and the others have not: resume must leave the finished one alone
        wait_for(lambda: (storage / "driver").is_dir() and finished(), 180, "a finished trial", alive=process,
                 interval=0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    before = trial_results(storage, "driver")
    finished_before = finished()
    assert finished_before and len(finished_before) < 4, finished_before
    sweep("resume", "driver", "--storage", storage, timeout=400)
    rows = _csv_rows(tmp_path, "driver")
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    assert all(r["status"] == "TERMINATED" and r["iterations"] == "10" for r in rows), rows
    after = trial_results(storage, "driver")
    for name in finished_before:  # finished trials were not re-run
        assert after[name] == before[name]
    again = sweep("resume", "driver", "--storage", storage, check=False)
    assert again.returncode == 2 and "already finished" in again.stderr


@pytest.mark.usefixtures("no_stray_ray")
def test_resume_goes_on_when_the_checkpoint_tunes_state_names_is_gone(reviews, tmp_path):
    """Tune restores a trial from the checkpoint its state names and refuses one that is gone (a kept copy of the
    state after a full disk names one Tune has rotated away since, or a state saved just before the rotation):
    resume stands an empty folder in for it, and the trial retraces Tune's iterations from the start unreported."""
    from sweep.results import restore_points
    from sweep.storage import open_storage

    storage = tmp_path / "results"
    process = subprocess.Popen(
        [sys.executable, "-m", "sweep.cli", "launch", str(reviews), *TINY, "--grid", "max_tokens=40960",
         "--grid", "lr=1e-3", "--grid", "heads=2", "--storage", str(storage), "--name", "gone"],
        env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )

    def named() -> dict[str, str]:
        try:
            return restore_points(open_storage(str(storage)), "gone")
        except (OSError, ValueError):  # no experiment yet, or Tune's state caught mid-write
            return {}

    try:  # killed once Tune's state names a checkpoint past the first
        wait_for(lambda: (storage / "gone").is_dir() and any(c != "checkpoint_000000" for c in named().values()),
                 180, "a checkpoint after the first", alive=process, interval=0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    ((trial, checkpoint),) = named().items()
    shutil.rmtree(storage / "gone" / trial / checkpoint, ignore_errors=True)
    assert not (storage / "gone" / trial / checkpoint).exists()
    before = len(trial_results(storage, "gone")[trial])
    resumed = sweep("resume", "gone", "--storage", storage, timeout=400)
    assert f"are gone ({trial}/{checkpoint})" in resumed.stdout + resumed.stderr
    lines = trial_results(storage, "gone")[trial]
    after = lines[before:]  # what the resumed run reported: Tune's iterations go on where its state left them
    assert after and after[-1]["training_iteration"] == 20 and after[-1]["tokens_seen"] == 40960, after
    assert [line["tokens_seen"] for line in after] == [2048 * line["training_iteration"] for line in after]
    rows = _csv_rows(tmp_path, "gone")
    assert [(r["status"], r["iterations"]) for r in rows] == [("TERMINATED", "20")], rows


def test_resume_stands_in_for_the_checkpoint_tunes_checkpoint_manager_holds(tmp_path):
    """Tune restores a trial from the latest checkpoint its checkpoint manager holds. After a final failure's report
    (no checkpoint of its own) on a full disk, result.json may lack the lines naming that checkpoint: the stand-in
    goes where Tune will look, not where the results point."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    from sweep.runner import stand_in_for_missing_checkpoints
    from sweep.storage import open_storage

    root = tmp_path / "full"
    folder = root / "trial_a_00000"
    (folder / "checkpoint_000002").mkdir(parents=True)
    metadata = _TrainingRunMetadata()
    metadata.checkpoint_manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
    metadata.checkpoint_manager.register_checkpoint(
        _TrainingResult(Checkpoint(str(folder / "checkpoint_000004")), {"training_iteration": 5}))
    metadata.last_result = {"training_iteration": 6, "storage_full": 1.0}  # the failure's report names none
    trial = {"status": "ERROR", "trial_id": "a_00000", "relative_logdir": folder.name}
    (root / "experiment_state-2026-12-03_00-00-00.json").write_text(
        json.dumps({"trial_data": [[json.dumps(trial), metadata.get_json_state()]]}))
    # The disk kept the results only up to checkpoint_000002 (iterations 4 and 5 found no room).
    lines = [{"training_iteration": i, "checkpoint_dir_name": f"checkpoint_{i - 1:06d}"} for i in (1, 2, 3)]
    (folder / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))

    made = stand_in_for_missing_checkpoints(open_storage(str(tmp_path)), "full")
    assert made == ["trial_a_00000/checkpoint_000004"]
    assert (folder / "checkpoint_000004").is_dir() and not list((folder / "checkpoint_000004").iterdir())
    assert stand_in_for_missing_checkpoints(open_storage(str(tmp_path)), "full") == []  # it exists now


def test_a_trial_history_holds_one_result_per_iteration_after_a_resume_reported_one_again(tmp_path):
    """A driver killed between a trial's last report and Tune saving its state: resume retraces that iteration and
    reports it again. The history readers (the report's curves, `sweep heads --history`) read it once."""
    from sweep.results import load_experiment, trial_history
    from sweep.storage import open_storage

    root = tmp_path / "driver"
    (root / "trial_a_00000").mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"created": "2026-12-03T00:00:00"}))
    lines = [{"training_iteration": i, "test_loss": 4.0 - i / 10, "done": i == 3, "iterations_since_restore": i}
             for i in (1, 2, 3)]
    lines.append(lines[-1] | {"iterations_since_restore": 1})  # the resumed run's report of iteration 3
    (root / "trial_a_00000" / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    storage = open_storage(str(tmp_path))
    (trial,) = load_experiment(storage, "driver").trials
    history = trial_history(storage, trial)
    assert [row["training_iteration"] for row in history] == [1, 2, 3]
    assert history[-1]["iterations_since_restore"] == 1  # the last report of an iteration stands


@pytest.mark.usefixtures("no_stray_ray")  # its own Ray: Tune logs to W&B from an actor, in the Ray's environment
def test_wandb_offline_run_files(reviews, tmp_path):
    env = run_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb-dir"), WANDB_SILENT="true")
    sweep("launch", reviews, *TINY, "--grid", "lr=3e-3", "--grid", "heads=2", "--storage", tmp_path / "results",
          "--name", "wb", "--wandb", env=env)
    runs = list((tmp_path / "wandb-dir").rglob("offline-run-*"))
    assert runs, "no offline W&B run was written"
    logs = [path for run in runs for path in run.iterdir() if path.suffix == ".wandb"]
    assert logs
    # the run's history holds the trial's metrics (an empty run writes a .wandb file too)
    assert any(b"test_loss" in path.read_bytes() and b"induction_score_max" in path.read_bytes() for path in logs)
