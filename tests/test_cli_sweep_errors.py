"""Mistakes on the sweep commands: exit 2, one line naming the fix, nothing written, no Ray started."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from sweep.cli import main

from conftest import free_port, wait_for


@pytest.fixture
def storage(tmp_path):
    return tmp_path / "results"


@pytest.mark.parametrize(
    "args, message",
    [
        (["launch", "imdb", "--preset", "giant"], "unknown preset 'giant'; presets: paper, smoke, induction"),
        (["launch", "imdb", "--grid", "dropout=0.1"], "--grid key 'dropout' is unknown"),
        (["launch", "imdb", "--grid", "lr=fast"], "--grid lr=fast: expected a number"),
        (["launch", "imdb", "--grid", "heads=2.5"], "--grid heads=2.5: expected an integer"),
        (["launch", "imdb", "--grid", "mlp=maybe"], "--grid mlp=maybe: expected on/off"),
        (["launch", "imdb", "--grid", "lr"], "must look like key=v1,v2"),
        (
            ["launch", "imdb", "--grid", "heads=3", "--grid", "d_model=64"],
            "--grid heads=3 does not divide --grid d_model=64",
        ),
        (["launch", "imdb", "--grid", "seq_len=99999"], "--grid seq_len=99999 must be between 2 and"),
        (["launch", "imdb", "--grid", "lr=-1"], "--grid lr=-1.0 must be positive"),
        (["launch", "imdb", "--grid", "batch_size=0"], "--grid batch_size=0 must be positive"),
        (["launch", "no-such-data"], "unknown dataset 'no-such-data'"),
        (["launch", "/no/such/reviews.parquet"], "dataset path '/no/such/reviews.parquet' does not exist"),
        (["launch", "imdb", "--grid", "tokenizer=bpe:2048,bpe:x"], "N in bpe:N must be an integer"),
        (["launch", "imdb", "--grid", "max_tokens=10"], "--grid max_tokens=10 is less than one step"),
        (["launch", "imdb", "--metric", "test_los"], "is never reported (did you mean test_loss?)"),
        (["launch", "imdb", "--gpus-per-trial", "2"], "--gpus-per-trial 2: a trial trains on one GPU"),
        (["launch"], "DATASET is missing"),
        (["launch", "imdb", "--tokenizer", "bpe:x"], "N in bpe:N must be an integer"),
        (["launch", "imdb", "--metric", "accuracy"], "--metric 'accuracy' is never reported"),
        (["launch", "imdb", "--name", "../escape"], "is not allowed"),
        (["launch", "imdb", "--name", "/abs"], "is not allowed"),
        (["launch", "imdb", "--grace-period", "9"], "--grace-period 9 is more than the 4 iterations"),
        (["launch", "imdb", "--max-iterations", "0"], "--max-iterations must be >= 1, got 0"),
        (["launch", "imdb", "--storage", "ftp://host/x"], "only local paths and s3://bucket/prefix"),
        (["launch", "imdb", "--storage", "s3://Bad_Bucket/x"], "not a valid s3://bucket/prefix"),
        (["best", "--metric", "test_loss"], "no experiments in"),
        (["best", "ghost"], "no experiment 'ghost'"),
        (["status", "ghost"], "no experiment 'ghost'"),
        (["resume", "ghost"], "no experiment 'ghost'"),
        (["heads", "ghost"], "no experiment 'ghost'"),
    ],
)
def test_sweep_mistakes(args, message, storage, data_mirror):
    if "--storage" not in args:
        args = [*args, "--storage", str(storage)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not storage.exists() or not any(storage.iterdir())


def test_a_bpe_tokenizer_is_a_grid_value_and_readers_name_the_problem(storage, tmp_path, data_mirror):
    """`--grid tokenizer=bpe:2048` is a list of tokenizers, not a range; a folder given where an experiment name is
    read, and a metric typo, are said as such."""
    from sweep.plan import LaunchConfig, plan_sweep

    plan = plan_sweep(LaunchConfig(dataset="imdb", preset="smoke", storage=str(storage), grid=("tokenizer=bpe:2048",)))
    assert plan.fixed["tokenizer"] == "bpe:2048"
    plan = plan_sweep(LaunchConfig(dataset="imdb", preset="smoke", storage=str(storage),
                                   grid=("tokenizer=bpe:2048,bytes",)))
    assert plan.axes["tokenizer"] == ["bpe:2048", "bytes"]
    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    for command in ("results", "best", "status", "atlas"):
        result = CliRunner().invoke(main, [command, str(folder), "--storage", str(storage)])
        assert result.exit_code == 2 and "is a folder, not an experiment name" in result.stderr, result.output
    from test_cli_consistency import fake_experiment

    fake_experiment(storage, "one", {"a": {"lr": 1e-3, "losses": [3.0], "induction": 0.1}})
    result = CliRunner().invoke(main, ["best", "--storage", str(storage), "--metric", "test_los"])
    assert result.exit_code == 2 and "--metric 'test_los' is not a metric (did you mean test_loss?)" in result.stderr


def test_missing_bucket_and_unreachable_endpoint(s3_server, monkeypatch, tmp_path, data_mirror):
    result = CliRunner().invoke(main, ["launch", "imdb", "--storage", "s3://no-such-bucket/x"])
    assert result.exit_code == 2 and "bucket 'no-such-bucket' does not exist" in result.stderr
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    result = CliRunner().invoke(main, ["launch", "imdb", "--storage", "s3://bucket/x"])
    assert result.exit_code == 2 and "cannot reach the S3 endpoint http://127.0.0.1:9" in result.stderr


def test_read_only_storage(tmp_path, data_mirror):
    storage = tmp_path / "readonly"
    storage.mkdir()
    storage.chmod(0o500)
    try:
        if os.access(storage, os.W_OK):  # root ignores permission bits: use a file in the way instead
            storage.chmod(0o700)
            storage = tmp_path / "file-in-the-way"
            storage.write_text("")
        result = CliRunner().invoke(main, ["launch", "imdb", "--storage", str(storage / "sub")])
        assert result.exit_code == 2 and "is not writable" in result.stderr
    finally:
        (tmp_path / "readonly").chmod(0o700)


def test_metric_never_reported_lists_the_reported_ones(tmp_path):
    experiment = tmp_path / "results" / "exp"
    (experiment / "trial_a").mkdir(parents=True)
    (experiment / "sweep.json").write_text(
        json.dumps({"metric": "test_loss", "mode": "min", "trials": 1, "created": "x"})
    )
    (experiment / "trial_a" / "result.json").write_text(
        json.dumps({"test_loss": 3.0, "training_iteration": 1, "done": True}) + "\n"
    )
    result = CliRunner().invoke(main, ["best", "exp", "--metric", "icl_score", "--storage", str(tmp_path / "results")])
    assert result.exit_code == 2
    assert "--metric 'icl_score' was never reported in exp; reported: test_loss" in result.stderr
    unknown = CliRunner().invoke(main, ["best", "exp", "--metric", "bleu", "--storage", str(tmp_path / "results")])
    assert unknown.exit_code == 2 and "--metric 'bleu' is not a metric; metrics: train_loss" in unknown.stderr


def test_wrong_credentials(tmp_path, monkeypatch, data_mirror):
    """A moto server that checks credentials: the bucket exists, but these keys are refused."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="1")  # only the bucket creation is unauthenticated
    moto = str(Path(sys.executable).with_name("moto_server"))
    server = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        def answers() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                return True
            except OSError:
                return False

        wait_for(answers, 30, "the moto server starting", interval=0.2)
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                     aws_access_key_id="x", aws_secret_access_key="y").create_bucket(Bucket="bucket")
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDWRONG")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        result = CliRunner().invoke(main, ["launch", "imdb", "--storage", "s3://bucket/exp"])
        assert result.exit_code == 2, result.output
        assert "S3 refused the credentials for s3://bucket/exp" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_trial_given_a_gpu_without_cuda_fails_in_one_line():
    """Never a silent CPU run in a GPU's place (the tests run with CUDA hidden)."""
    from sweep.trainable import GpuUnavailable, start_gpu

    start_gpu([], "10.0.0.1")  # no GPU given: nothing to start
    with pytest.raises(GpuUnavailable, match=r"^gpu_unavailable: Ray gave this trial GPU 0 on node 10.0.0.1, but CUDA "
                                             r"is not available there"):
        start_gpu([0], "10.0.0.1")


@pytest.mark.parametrize("args, option", [
    (["export", "demo", "--trial", "t1"], "Missing option '--out'"),
    (["launch", "imdb", "--bogus"], "No such option '--bogus'"),
    (["heads", "demo", "--tokens-seen", "-5"], "Invalid value for '--tokens-seen'"),
    (["launch", "--preset", "induction", "--seeds", "0"], "Invalid value for '--seeds'"),
])
def test_click_usage_errors_are_one_line_naming_the_option(args, option):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and option in result.stderr and "Usage:" not in result.stderr
