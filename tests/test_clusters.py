"""Sweeps on real multi-node Ray clusters started here: the fake multinode autoscaler."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_env, s3_objects, write_reviews

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's fixed head node id


def ray_cli(*args, env, timeout=180):
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.cluster
@pytest.mark.usefixtures("no_stray_ray")
def test_fake_multinode_cluster_autoscales_gpu_workers_for_a_sweep(tmp_path, s3_server):
    env = run_env(RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="token")
    started = ray_cli("start", "--head", "--num-cpus=0", "--include-dashboard=false",
                      f"--autoscaling-config={REPO / 'cluster' / 'fake-multinode.yaml'}", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        reviews = tmp_path / "reviews.jsonl"
        write_reviews(reviews, count=600)
        launch = subprocess.run(
            [sys.executable, "-m", "sweep.cli", "launch", str(reviews), "--tokenizer", "bytes", "--grid", "d_model=16",
             "--grid", "seq_len=16", "--grid", "max_tokens=8192", "--grid", "eval_every_tokens=2048", "--grid", "lr=3e-3",
             "--grid", "heads=2,4", "--gpus-per-trial", "0.5", "--address", "auto", "--storage", "s3://bucket/fake", "--name", "fake"],
            env=env, capture_output=True, text=True, timeout=400,
        )
        assert launch.returncode == 0, launch.stdout + launch.stderr
        probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr
        nodes, trial_nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        workers = [n for n in nodes if n["id"] != HEAD_NODE_ID]
        assert len(workers) >= 1 and all(n["gpu"] == 1 for n in workers)  # added by the autoscaler
        assert trial_nodes and HEAD_NODE_ID not in trial_nodes  # every trial ran on a worker
    finally:
        ray_cli("stop", "--force", env=env)
    best = subprocess.run([sys.executable, "-m", "sweep.cli", "best", "--storage", "s3://bucket/fake", "--json"],
                          env=run_env(), capture_output=True, text=True, timeout=120)
    document = json.loads(best.stdout)
    assert len(document["trials"]) == 2 and all(t["status"] == "TERMINATED" and t["iterations"] == 4 for t in document["trials"])
    assert any(key.endswith("/heads.json") for key in s3_objects(s3_server))


# Run inside the cluster: alive nodes, and the nodes that ran a trial actor.
PROBE = """
import json, ray
from ray._private import state
ray.init(address="auto", log_to_driver=False)
nodes = [{"id": n["NodeID"], "gpu": n["Resources"].get("GPU", 0)} for n in ray.nodes() if n["Alive"]]
actors = state.actors().values()
trial_nodes = sorted({a["Address"]["NodeID"] for a in actors if a.get("ActorClassName", "").endswith("ImplicitFunc")})
print(json.dumps([nodes, trial_nodes]))
"""
