"""Faults a day-long sweep must survive: the S3 endpoint going away mid-sweep."""

import json
import re
import subprocess
import sys
import time

import boto3
import pytest
from moto.server import ThreadedMotoServer

from conftest import free_port, run_env, s3_keys, s3_objects, write_reviews

REQUIRED = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt", "heads.json", "sample.txt", "heatmaps/patterns.json")


@pytest.mark.usefixtures("no_stray_ray")
def test_s3_outage_mid_sweep_is_ridden_out(tmp_path, monkeypatch):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIDOUTAGE", "AWS_SECRET_ACCESS_KEY": "outage-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="outage")  # moto state outlives servers in this process: a bucket of its own
    reviews = tmp_path / "reviews.jsonl"
    write_reviews(reviews, count=600)
    process = subprocess.Popen(
        [sys.executable, "-m", "sweep.cli", "launch", str(reviews), "--tokenizer", "bytes", "--grid", "d_model=16", "--grid", "seq_len=16",
         "--grid", "batch_size=16", "--grid", "max_tokens=40960", "--grid", "eval_every_tokens=2048", "--grid", "lr=3e-3",
         "--grid", "heads=2,4", "--grace-period", "20", "--storage", "s3://outage/exp", "--name", "outage"],
        env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 180
        while not any(key.startswith("exp/outage/") and key.endswith("checkpoint_000002/heads.json") for key in s3_keys(client, "outage")):
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "no checkpoint reached storage"
            time.sleep(0.5)
        server.stop()  # the endpoint is gone...
        time.sleep(20)
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
        lines = [json.loads(line) for line in objects[f"exp/outage/{trial}/result.json"].decode().splitlines() if line.strip()]
        assert lines[-1]["training_iteration"] == 20 and lines[-1]["tokens_seen"] == 40960
        checkpoints = {re.match(rf"exp/outage/{trial}/(checkpoint_\d+)/", k).group(1) for k in objects if f"{trial}/checkpoint_" in k}
        for checkpoint in checkpoints:  # no half-written checkpoint left behind
            assert all(f"exp/outage/{trial}/{checkpoint}/{name}" in objects for name in REQUIRED), checkpoint


@pytest.mark.usefixtures("no_stray_ray")
def test_out_of_memory_ends_one_trial_not_the_sweep(tmp_path):
    reviews = tmp_path / "reviews.jsonl"
    write_reviews(reviews, count=600)
    storage = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "launch", str(reviews), "--tokenizer", "bytes", "--grid", "d_model=16,4096",
         "--grid", "heads=2", "--grid", "seq_len=16", "--grid", "batch_size=16", "--grid", "max_tokens=4096",
         "--grid", "eval_every_tokens=2048", "--grid", "lr=3e-3", "--memory-per-trial", "400", "--max-failures", "3",
         "--storage", str(storage), "--name", "oom"],
        env=run_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = subprocess.run([sys.executable, "-m", "sweep.cli", "results", "oom", "--storage", str(storage), "--csv", str(tmp_path / "oom.csv")],
                           env=run_env(), capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    import csv

    rows = {row["d_model"]: row for row in csv.DictReader(open(tmp_path / "oom.csv"))}
    assert rows["4096"]["status"] == "ERROR" and rows["4096"]["error"] == "out_of_memory"
    assert rows["16"]["status"] == "TERMINATED" and rows["16"]["iterations"] == "2"
    error_file = next((storage / "oom").glob("trial_*/error.txt"))
    assert error_file.read_text().count("Failure #") == 1  # not retried
