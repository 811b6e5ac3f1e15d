"""Interruptions that lose nothing and say so: Ctrl-C, SIGTERM, a killed driver, a lost Ray node, a full
disk and an unreachable bucket, each one line and an experiment every command still reads and resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, reached_checkpoint, run_env, session_env, sweep, wait_for, write_reviews

TINY = [
    "--tokenizer",
    "bytes",
    "--grid",
    "d_model=16",
    "--grid",
    "seq_len=16",
    "--grid",
    "batch_size=16",
    "--grid",
    "eval_every_tokens=2048",
    "--grid",
    "lr=3e-3",
    "--no-early-stopping",
    "--snapshots",
    "every:4096",
]


@pytest.fixture
def reviews(tmp_path) -> Path:
    path = tmp_path / "reviews.jsonl"
    write_reviews(path, count=600)
    return path


def start(reviews, storage, name, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sweep.cli",
            "launch",
            str(reviews),
            *TINY,
            "--grid",
            "max_tokens=24576",
            "--grid",
            "heads=2,4",
            "--storage",
            str(storage),
            "--name",
            name,
            *extra,
        ],
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_checkpoint(storage: Path, name: str, process: subprocess.Popen, timeout: float = 180) -> None:
    """Until a trial has stored its third checkpoint or a later one."""
    wait_for(lambda: reached_checkpoint(storage / name / "trial_*", 2), timeout, "a trial's third checkpoint",
             alive=process)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_ray_cluster) -> dict:
    """Final results of the sweep the interrupted ones resume, launched once straight through (same data, same
    grid): what every interruption must end with."""
    root = tmp_path_factory.mktemp("straight")
    reviews = root / "reviews.jsonl"
    write_reviews(reviews, count=600)
    env = session_env(root) | shared_ray_cluster
    sweep("launch", reviews, *TINY, "--grid", "max_tokens=24576", "--grid", "heads=2,4", "--storage",
          root / "results", "--name", "straight", env=env, timeout=400)
    return final_losses(root / "results", "straight")


def final_losses(storage: Path, name: str) -> dict:
    rows = json.loads(
        sweep("best", name, "--storage", storage, "--metric", "test_loss", "--top", "10", "--json").stdout
    )["trials"]
    return {
        (row["config"]["heads"]): (row["status"], row["iterations"], round(row["metrics"]["test_loss"], 4))
        for row in rows
    }


@pytest.mark.usefixtures("no_stray_ray")
@pytest.mark.parametrize(
    "signals, exit_code", [((signal.SIGINT,), 130), ((signal.SIGINT, signal.SIGINT), 130), ((signal.SIGTERM,), 143)]
)
def test_a_signal_stops_the_sweep_in_one_line_and_resume_finishes_it_as_if_uninterrupted(
    reviews, tmp_path, signals, exit_code, uninterrupted
):
    storage = tmp_path / "results"
    process = start(reviews, storage, "sig")
    try:
        wait_for_checkpoint(storage, "sig", process)
        for number in signals:
            os.kill(process.pid, number)
            time.sleep(0.3)  # a person's second Ctrl-C comes a moment after the first: spacing, not a wait
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == exit_code, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted (") and "run `sweep resume sig`" in last, stderr
    assert "Tuner.restore" not in stderr and "Traceback" not in stderr and "stopped early" not in stderr, stderr
    status = sweep("status", "sig", "--storage", storage)
    assert "interrupted" in status.stdout and "running" not in status.stdout.lower(), status.stdout
    assert "`sweep resume sig` continues them" in status.stderr
    assert json.loads((storage / "sig" / "driver.json").read_text())["state"] == "interrupted"
    # one count everywhere: both trials were running when the signal came
    assert "2 unfinished" in stderr and "2 of 2 trials started (2 interrupted)" in status.stdout, (
        stderr,
        status.stdout,
    )

    resumed = sweep("resume", "sig", "--storage", storage, timeout=400)
    assert "resuming sig: 2 of 2 trials unfinished (2 interrupted)" in resumed.stderr, resumed.stderr
    # Ray's and Tune's own messages are in the log file, not on the terminal
    assert not any(word in resumed.stderr for word in ("Failed to fetch", "FileNotFoundError", "Traceback",
                                                       "WARNING", "(raylet)")), resumed.stderr
    assert final_losses(storage, "sig") == uninterrupted
    assert all(state == "TERMINATED" for state, _, _ in final_losses(storage, "sig").values())
    snapshots = json.loads(sweep("snapshots", "sig", "--storage", storage, "--json").stdout)["trials"]
    assert all(
        [row["tokens_seen"] for row in rows] == [0, 4096, 8192, 12288, 16384, 20480, 24576]
        for rows in snapshots.values()
    )


@pytest.mark.usefixtures("no_stray_ray")
def test_a_killed_driver_reads_as_interrupted_not_running(reviews, tmp_path):
    storage = tmp_path / "results"
    process = start(reviews, storage, "killed")
    try:
        wait_for_checkpoint(storage, "killed", process)
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
        process.wait(timeout=30)
    finally:
        process.kill()
    assert json.loads((storage / "killed" / "driver.json").read_text())["state"] == "running"  # it had no chance to say
    status = sweep("status", "killed", "--storage", storage)
    assert "running" not in status.stdout.lower() and "interrupted" in status.stdout, status.stdout
    assert "driver lost" in status.stderr
    # on another machine its process cannot be seen: its heartbeat going stale says the same
    env = run_env(SWEEP_DRIVER_STALE_SECONDS="0.5")
    record = json.loads((storage / "killed" / "driver.json").read_text())
    (storage / "killed" / "driver.json").write_text(json.dumps(record | {"host": "elsewhere"}))
    wait_for(lambda: "interrupted" in sweep("status", "killed", "--storage", storage, env=env).stdout, 30,
             "the stale heartbeat read as an interrupted driver", interval=0.5)


@pytest.mark.usefixtures("no_stray_ray")
def test_the_local_ray_node_lost_under_a_sweep_is_one_line_then_resume_finishes(reviews, tmp_path):
    storage = tmp_path / "results"
    process = start(reviews, storage, "lost")
    try:
        wait_for_checkpoint(storage, "lost", process)
        raylets = [pid for pid in _descendants(process.pid) if b"raylet" in _cmdline(pid)]
        assert raylets, "the sweep's own raylet was not found"
        for pid in raylets:  # only the Ray this sweep started: never another Ray on the machine
            os.kill(pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
    assert process.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: Ray's local node is gone") and "sweep resume lost" in last, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) < 30, stderr
    sweep("resume", "lost", "--storage", storage, timeout=400)
    assert all(
        state == "TERMINATED" and iterations == 12 for state, iterations, _ in final_losses(storage, "lost").values()
    )


def _descendants(pid: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


READ_COMMANDS = (["best", "--metric", "test_loss"], ["status"], ["results"], ["atlas"], ["snapshots"], ["circuit"])


def test_reading_an_s3_storage_with_no_server_fails_in_seconds(monkeypatch):
    """The commands that read open S3 impatiently: 2 attempts of a 2 s connect, 5 s a request (a sweep retries for
    minutes instead), and an unreachable endpoint is one line."""
    from click.testing import CliRunner

    from sweep import storage
    from sweep.cli import main

    assert {k: storage.s3_options(False)[k] for k in ("connect_timeout", "request_timeout", "max_attempts")} == {
        "connect_timeout": 2, "request_timeout": 5, "max_attempts": 2}
    assert storage.s3_options(True)["max_attempts"] == storage.PATIENT_ATTEMPTS
    opened = []

    def unreachable(patient):
        opened.append(patient)
        raise OSError("AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: curl error: Couldn't connect")

    monkeypatch.setattr(storage, "s3_filesystem", unreachable)
    for command in READ_COMMANDS:
        opened.clear()
        CliRunner().invoke(main, [*command, "--storage", "s3://bucket/prefix"])
        assert opened == [False], (command, opened)
    monkeypatch.undo()

    env = run_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    for command in READ_COMMANDS:
        result = sweep(*command, "--storage", "s3://bucket/prefix", check=False, env=env, timeout=60)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"Error: cannot reach the S3 endpoint {env['AWS_ENDPOINT_URL']} for s3://bucket/prefix: "
            "check AWS_ENDPOINT_URL and the network"
        ], result.stderr


def test_a_second_ctrl_c_before_tunes_end_still_prints_the_one_count_of_trials(capsys):
    """A second Ctrl-C stops the driver before Tune's end of the experiment, which prints the count of trials:
    launch and resume print it from the trials as Tune last showed them, once, counted as `sweep status` counts."""
    from types import SimpleNamespace

    from sweep.progress import ProgressCallback

    progress = ProgressCallback("test_loss", "min", max_iterations=4, trials=3)
    progress.setup()
    trials = [SimpleNamespace(trial_id=f"a_0000{i}", status="RUNNING", last_result={"training_iteration": 2},
                              config={}) for i in range(2)]
    progress.on_step_end(1, trials)
    capsys.readouterr()
    progress.summarize_interrupted()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "2 unfinished, 1 not started" in line, line
    progress.summarize_interrupted()  # said once
    assert capsys.readouterr().err == ""
