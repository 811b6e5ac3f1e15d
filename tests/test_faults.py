"""Faults a day-long sweep must survive: the S3 endpoint going away mid-sweep."""

import io
import re
import subprocess
import sys
import time

import boto3
import pytest
import torch
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
        checkpoints = sorted({re.match(rf"exp/outage/{trial}/(checkpoint_\d+)/", k).group(1) for k in objects if f"{trial}/checkpoint_" in k})
        for checkpoint in checkpoints:  # no half-written checkpoint left behind
            assert all(f"exp/outage/{trial}/{checkpoint}/{name}" in objects for name in REQUIRED), checkpoint
        # every trial trained to the end: its last checkpoint (written by the trial itself) says so
        assert checkpoints[-1] == "checkpoint_000019"
        state = torch.load(io.BytesIO(objects[f"exp/outage/{trial}/{checkpoints[-1]}/trainer_state.pt"]), weights_only=True)
        assert state["tokens_seen"] == 40960
