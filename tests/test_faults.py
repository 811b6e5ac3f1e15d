"""Faults a day-long sweep must survive: the S3 endpoint going away, the storage filling up."""

import io
import json
import math
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from conftest import free_port, reached_checkpoint, run_env, s3_keys, s3_objects, wait_for, write_reviews

REQUIRED = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "trainer_state.pt",
    "heads.json",
    "sample.txt",
    "heatmaps/patterns.json",
)


OUTAGE_S = 10
"""An iteration of these trials takes well under a second: a 10 s outage spans many checkpoint uploads."""


@pytest.mark.usefixtures("no_stray_ray")
def test_s3_outage_mid_sweep_is_ridden_out(tmp_path, monkeypatch):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIDOUTAGE",
        "AWS_SECRET_ACCESS_KEY": "outage-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="outage")  # moto state outlives servers in this process: a bucket of its own
    reviews = tmp_path / "reviews.jsonl"
    write_reviews(reviews, count=600)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sweep.cli",
            "launch",
            str(reviews),
            "--tokenizer",
            "bytes",
            "--grid",
            "d_model=16",
            "--grid",
            "seq_len=16",
            "--grid",
            "batch_size=16",
            "--grid",
            "max_tokens=40960",
            "--grid",
            "eval_every_tokens=2048",
            "--grid",
            "lr=3e-3",
            "--grid",
            "heads=2,4",
            "--grace-period",
            "20",
            "--storage",
            "s3://outage/exp",
            "--name",
            "outage",
        ],
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: any(key.startswith("exp/outage/") and key.endswith("checkpoint_000002/heads.json")
                             for key in s3_keys(client, "outage")), 180, "a checkpoint reaching storage",
                 alive=process, interval=0.5)
        server.stop()  # the endpoint is gone for OUTAGE_S: several checkpoints' uploads fail and are retried...
        time.sleep(OUTAGE_S)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # ...and back, with its data (moto keeps state in this process)
        output, _ = process.communicate(timeout=400)
        assert process.returncode == 0, output
        objects = s3_objects(client, "outage")
    finally:
        process.kill()
        server.stop()
    trials = sorted({re.match(r"exp/outage/(trial_[^/]+)/", k).group(1) for k in objects if "/trial_" in k})
    assert len(trials) == 2
    for trial in trials:
        checkpoints = sorted(
            {
                re.match(rf"exp/outage/{trial}/(checkpoint_\d+)/", k).group(1)
                for k in objects
                if f"{trial}/checkpoint_" in k
            }
        )
        for checkpoint in checkpoints:  # no half-written checkpoint left behind
            assert all(f"exp/outage/{trial}/{checkpoint}/{name}" in objects for name in REQUIRED), checkpoint
        # every trial trained to the end: its last checkpoint (written by the trial itself) says so
        assert checkpoints[-1] == "checkpoint_000019", output[-4000:]
        state = torch.load(
            io.BytesIO(objects[f"exp/outage/{trial}/{checkpoints[-1]}/trainer_state.pt"]), weights_only=True
        )
        assert state["tokens_seen"] == 40960


def mounted_tmpfs(path: Path, size: str):
    """A tmpfs of `size` at `path` (mounting needs root, which CI has); unmounted after."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    return path


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MiB tmpfs: room for the sweep's footprint at launch, filled by another writer once trials have
    checkpointed (fill_up)."""
    mount = mounted_tmpfs(tmp_path / "disk", "16m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_up(disk: Path) -> None:
    """Another process's file takes every byte left on the disk (none, when the sweep's own writes took the last)."""
    try:
        # unbuffered: a write the full disk cuts short leaves nothing for close() to flush (and fail on)
        ballast = open(disk / "ballast", "wb", buffering=0)
    except OSError:  # already full: not even room for the file's entry
        return
    with ballast:
        try:
            while True:
                ballast.write(b"\0" * 65536)
        except OSError:
            pass


def test_a_local_storage_without_room_for_the_sweep_is_refused_before_any_trial(tmp_path, data_mirror):
    """launch says the sweep's footprint (snapshots and checkpoints) and refuses a disk without room for it."""
    disk = mounted_tmpfs(tmp_path / "small", "1m")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sweep.cli", "launch", "imdb", "--preset", "smoke", "--storage", str(disk),
             "--name", "big"], env=run_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith(f"Error: --storage {disk} has ")
        assert "the sweep needs about" in result.stderr and "storage: about" in result.stderr
        assert not list(disk.iterdir())  # nothing written
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.usefixtures("no_stray_ray")
def test_storage_filling_up_mid_sweep_is_one_clear_error_and_leaves_no_checkpoint_looking_valid(tmp_path, tiny_disk):
    from model.checkpoint import CheckpointError, check_complete
    from sweep.results import load_experiment
    from sweep.storage import open_storage

    reviews = tmp_path / "reviews.jsonl"
    write_reviews(reviews, count=600)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sweep.cli",
            "launch",
            str(reviews),
            "--tokenizer",
            "bytes",
            "--grid",
            "d_model=16",
            "--grid",
            "seq_len=16",
            "--grid",
            "batch_size=16",
            "--grid",
            "max_tokens=40960",
            "--grid",
            "eval_every_tokens=2048",
            "--grid",
            "lr=3e-3",
            "--grid",
            "heads=2,4",
            "--grace-period",
            "20",
            "--storage",
            str(tiny_disk),
            "--name",
            "full",
        ],
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # after the trials first report
    wait_for(lambda: reached_checkpoint(tiny_disk / "full" / "trial_*", 2), 300, "a third checkpoint", alive=process,
             interval=0.05)
    fill_up(tiny_disk)
    _, stderr = process.communicate(timeout=400)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("Error: --storage") and "is full" in last_line, last_line
    # Ray's tracebacks and its sentinel metric stay out of sight (in the log file; -v shows them)
    assert not any(word in result.stderr for word in ("Traceback", "NaN", " inf")), result.stderr
    assert "storage_full at tokens_seen" in result.stderr

    # What the disk holds reads back, and nothing half-written passes for complete.
    experiment = load_experiment(open_storage(str(tiny_disk)), "full")
    assert len(experiment.trials) == 2
    # The trial that met the full disk reads back as storage_full: its report's line in result.json may find no
    # room, but the empty file `final_failure-storage_full` it leaves in its folder always does.
    recorded = [t for t in experiment.trials if (Path(t.path) / "final_failure-storage_full").is_file()]
    assert recorded, [sorted(p.name for p in Path(t.path).iterdir()) for t in experiment.trials]
    assert all(t.status == "ERROR" and t.error == "storage_full" for t in recorded), [
        (t.status, t.error) for t in experiment.trials
    ]
    on_disk = sorted(tiny_disk.glob("full/trial_*/checkpoint_*"))
    assert on_disk, "no checkpoint reached the disk before it filled"
    listed = {Path(c) for trial in experiment.trials for c in trial.checkpoints}
    for checkpoint in on_disk:
        if checkpoint in listed:
            check_complete(checkpoint)
        elif (checkpoint / "manifest.json").exists():
            with pytest.raises(CheckpointError, match="incomplete checkpoint"):
                check_complete(checkpoint)
    shown = subprocess.run([sys.executable, "-m", "sweep.cli", "results", "full", "--storage", str(tiny_disk)],
                           env=run_env(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "storage_full" in shown.stdout and " inf " not in shown.stdout, shown.stdout  # no sentinel metric shown
    for trial in recorded:  # its numbers are its last real report's, not the failure's
        from sweep.results import _result_lines  # the disk may have cut its last line short

        lines = _result_lines((Path(trial.path) / "result.json").read_text())
        real = [line for line in lines if "storage_full" not in line]
        assert trial.iterations == (real[-1]["training_iteration"] if real else 0)
        assert all(math.isfinite(value) for value in trial.metrics.values() if isinstance(value, float))

    # Every reader reads the experiment, on the full disk and on a copy with room, and says it stopped.
    roomy = tmp_path / "roomy"
    shutil.copytree(tiny_disk, roomy, ignore=shutil.ignore_patterns("ballast"))
    for storage in (tiny_disk, roomy):
        for command in (["status"], ["best", "--metric", "test_loss"], ["results"], ["atlas"], ["snapshots"], ["list"],
                        ["report", "--out", str(tmp_path / "report.html")]):
            name = ["full"] if command[0] != "list" else []
            read = subprocess.run([sys.executable, "-m", "sweep.cli", *command, *name, "--storage", str(storage)],
                                  env=run_env(), capture_output=True, text=True, timeout=120)
            assert "Traceback" not in read.stderr, (command, read.stderr)
            # `best` has nothing to rank when the disk filled before any result was kept: one line, exit 2
            lines = read.stderr.strip().splitlines()
            said_nothing_to_rank = bool(lines) and lines[-1].startswith("Error: --metric")
            assert read.returncode == 0 or (read.returncode == 2 and command[0] == "best" and said_nothing_to_rank), \
                (command, read.stderr)
        status = subprocess.run([sys.executable, "-m", "sweep.cli", "status", "full", "--storage", str(storage)],
                                env=run_env(), capture_output=True, text=True, timeout=60)
        assert "running" not in status.stdout.lower(), status.stdout

    # With room again, `sweep resume` finishes the sweep from the copy of Tune's state kept before the disk filled.
    resumed = subprocess.run([sys.executable, "-m", "sweep.cli", "resume", "full", "--storage", str(roomy)],
                             env=run_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = load_experiment(open_storage(str(roomy)), "full")
    assert [(t.status, t.iterations) for t in finished.trials] == [("TERMINATED", 20)] * 2, (
        [(Path(t.path).name, t.status, t.iterations, t.error) for t in finished.trials], resumed.stderr[-3000:])
    for trial in finished.trials:
        assert sorted(p.name for p in Path(trial.path).glob("checkpoint_*"))[-1] == "checkpoint_000019"


def test_tunes_state_cut_short_by_a_full_disk_is_put_back_from_the_driver_s_whole_copies(tmp_path):
    """Tune uploads its state over the old files, so a full disk leaves them cut short (the searcher's pickle often
    empty), and Tune, unable to read one, starts the sweep over. The driver's copies are taken only of files that
    read whole, and resume puts them back for every damaged file, the searcher's included."""
    from sweep.driver import TUNE_STATE_COPIES, TuneStateCopies, damaged_tune_state, restore_tune_state
    from sweep.storage import open_storage

    storage, root = open_storage(str(tmp_path)), tmp_path / "full"
    root.mkdir()
    state = json.dumps({"trial_data": [], "runner_data": {}}).encode()
    searcher = pickle.dumps({"_counter": 2, "_finished": True, "_live_trials": {"a_00000", "a_00001"}})
    files = {"experiment_state-2026-12-03_00-00-00.json": state, "basic-variant-state-2026-12-03_00-00-00.json":
             searcher, "searcher-state-2026-12-03_00-00-00.pkl": searcher}
    for name, data in files.items():
        (root / name).write_bytes(data)
    copies = TuneStateCopies(storage, "full")
    copies.refresh()
    assert damaged_tune_state(storage, "full") == []

    # The disk fills: each file is cut short, one to nothing; a refresh keeps the whole copies.
    (root / "experiment_state-2026-12-03_00-00-00.json").write_bytes(state[:9])
    (root / "basic-variant-state-2026-12-03_00-00-00.json").write_bytes(b"")
    (root / "searcher-state-2026-12-03_00-00-00.pkl").write_bytes(searcher[: len(searcher) // 2])
    copies.refresh()
    assert {p.name: p.read_bytes() for p in (root / TUNE_STATE_COPIES).iterdir()} == files
    assert sorted(damaged_tune_state(storage, "full")) == sorted(files)

    assert sorted(restore_tune_state(storage, "full")) == sorted(files)
    assert {name: (root / name).read_bytes() for name in files} == files
    assert damaged_tune_state(storage, "full") == []
    assert len(list((root / TUNE_STATE_COPIES).glob("damaged-*"))) == 3  # the damaged files are kept, not deleted

    # A damaged file without a whole copy: nothing is moved, and resume refuses (runner.resume_sweep).
    (root / "basic-variant-state-2026-12-03_00-00-00.json").write_bytes(b"")
    (root / TUNE_STATE_COPIES / "basic-variant-state-2026-12-03_00-00-00.json").unlink()
    assert restore_tune_state(storage, "full") == []
    assert damaged_tune_state(storage, "full") == ["basic-variant-state-2026-12-03_00-00-00.json"]


def test_a_trial_that_reported_storage_full_reads_back_as_that_error_past_a_cut_short_snapshot(tmp_path):
    """On a full disk the newest experiment_state is cut short and the older one still says RUNNING: the
    trial's own result.json, further along, decides."""
    from sweep.results import load_experiment
    from sweep.storage import open_storage

    root = tmp_path / "full"
    (root / "trial_a_00000").mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"created": "2026-11-28T00:00:00"}))
    trial = {"status": "RUNNING", "trial_id": "a_00000", "relative_logdir": "trial_a_00000"}
    older = {"last_result": {"training_iteration": 2, "test_loss": 3.0, "config": {"lr": 0.001}}}
    (root / "experiment_state-2026-11-28_00-00-00.json").write_text(
        json.dumps({"trial_data": [[json.dumps(trial), json.dumps(older)]]})
    )
    (root / "experiment_state-2026-11-28_00-00-09.json").write_text('{"trial_data": [["{\\"status')
    lines = [{"training_iteration": i, "test_loss": 3.0, "config": {"lr": 0.001}} for i in (1, 2)]
    lines.append({"training_iteration": 3, "storage_full": 1.0, "test_loss": float("inf"), "config": {"lr": 0.001}})
    (root / "trial_a_00000" / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (record,) = load_experiment(open_storage(str(tmp_path)), "full").trials
    # its numbers are those of its last real report, not the failure's (iteration 3, test_loss inf)
    assert (record.status, record.error, record.iterations) == ("ERROR", "storage_full", 2)
    assert record.metrics["test_loss"] == 3.0 and record.metrics["storage_full"] == 1.0


def test_an_experiment_record_cut_short_is_listed_as_unreadable_not_a_crash(tmp_path):
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "sweep.json").write_text('{"created": "2026-11-24T10:00:00", "tri')
    result = subprocess.run([sys.executable, "-m", "sweep.cli", "list", "--storage", str(tmp_path)],
                            env=run_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cut" in result.stdout and "unreadable sweep.json" in result.stdout


def test_records_are_written_whole_or_not_at_all(tmp_path):
    """A disk that fills half-way through a write: the write fails in one line, the old record survives whole,
    and no partial file is left."""
    import dataclasses
    import errno

    from model.config import ConfigError
    from sweep.storage import open_storage, read_text, write_text

    storage = open_storage(str(tmp_path))
    write_text(storage, storage.path("exp", "sweep.json"), '{"a": 1}')
    assert read_text(storage, storage.path("exp", "sweep.json")) == '{"a": 1}'

    class FillsHalfWay:
        """The local filesystem, except that a write stops half-way with ENOSPC."""

        def __init__(self, filesystem) -> None:
            self.filesystem = filesystem

        def __getattr__(self, name):
            return getattr(self.filesystem, name)

        def open_output_stream(self, path, *args, **kwargs):
            stream = self.filesystem.open_output_stream(path, *args, **kwargs)

            class HalfWritten:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    stream.close()

                def write(self, data):
                    stream.write(data[: len(data) // 2])
                    stream.flush()
                    raise OSError(errno.ENOSPC, "No space left on device")

            return HalfWritten()

    full = dataclasses.replace(storage, filesystem=FillsHalfWay(storage.filesystem))
    with pytest.raises(ConfigError, match="is full; free space or pick another --storage"):
        write_text(full, full.path("exp", "sweep.json"), '{"a": 2, "b": "a record twice as long as the old one"}')
    assert read_text(storage, storage.path("exp", "sweep.json")) == '{"a": 1}'
    assert [p.name for p in (tmp_path / "exp").iterdir()] == ["sweep.json"]  # no partial file left


@pytest.mark.parametrize(
    "cut_short", [pickle.UnpicklingError("pickle data was truncated"), EOFError(), ValueError("bad JSON")]
)
def test_ray_files_cut_short_by_a_full_disk_end_in_the_storage_full_line(tmp_path, cut_short):
    """Which of Ray's files the full disk cuts short first is a race; every one ends the same way."""
    from sweep.plan import LaunchConfig, plan_sweep
    from sweep.runner import StorageFullError, _fit
    from sweep.trainable import FinalFailureCallback

    class CutShort:
        def fit(self):
            raise cut_short

    failures = FinalFailureCallback()
    failures.reasons["trial_1"] = "storage_full"
    plan = plan_sweep(LaunchConfig(dataset="imdb", storage=str(tmp_path), name="full"))
    with pytest.raises(StorageFullError, match="is full"):
        _fit(CutShort(), plan, failures)
    with pytest.raises(type(cut_short)):  # without a storage_full trial the error is a different problem: shown as is
        _fit(CutShort(), plan, FinalFailureCallback())
