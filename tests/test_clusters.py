"""Sweeps on real multi-node Ray clusters started here: the fake multinode autoscaler."""

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, OwnRay, free_port, run_env, s3_objects, wait_for, write_reviews

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's fixed head node id


def ray_cli(*args, env, timeout=180):
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


def cluster_token(tmp_path) -> Path:
    """A Ray token of the test's own: `ray start` with RAY_AUTH_MODE=token needs one and never makes one."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    return token


@pytest.mark.cluster
@pytest.mark.usefixtures("no_stray_ray")
def test_fake_multinode_cluster_autoscales_gpu_workers_for_a_sweep(tmp_path, s3_server):
    import yaml

    from conftest import ray_process_ids

    before = ray_process_ids()
    env = run_env(RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster_token(tmp_path)))
    # Its GPUs are logical: a raylet refuses to start with one when CUDA_VISIBLE_DEVICES lists none (tests hide CUDA)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    ray = OwnRay()
    config = yaml.safe_load((REPO / "cluster" / "fake-multinode.yaml").read_text())
    config["provider"]["gcs_address"] = ray.address  # its worker "nodes" join this Ray, not one on port 6379
    (tmp_path / "fake-multinode.yaml").write_text(yaml.safe_dump(config))
    started = ray_cli("start", "--head", "--num-cpus=0", "--include-dashboard=false", *ray.start_args(),
                      f"--autoscaling-config={tmp_path / 'fake-multinode.yaml'}", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        reviews = tmp_path / "reviews.jsonl"
        write_reviews(reviews, count=600)
        args = [
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
            "max_tokens=8192",
            "--grid",
            "eval_every_tokens=2048",
            "--grid",
            "lr=3e-3",
            "--grid",
            "heads=2,4",
            "--gpus-per-trial",
            "0.5",
            "--address",
            ray.address,
            "--name",
            "fake",
            "--no-early-stopping",
        ]  # both trials train to the end: ASHA's verdict is not what this checks
        local = subprocess.run(
            [*args, "--storage", str(tmp_path / "local")], env=env, capture_output=True, text=True, timeout=200
        )
        assert local.returncode == 2 and "is a local path; pass --storage s3://" in local.stderr, local.stderr
        assert not (tmp_path / "local" / "fake").exists()
        launch = subprocess.run(
            [*args, "--storage", "s3://bucket/fake"], env=env, capture_output=True, text=True, timeout=400
        )
        assert launch.returncode == 0, launch.stdout + launch.stderr
        probe = subprocess.run([sys.executable, "-c", PROBE, ray.address], env=env, capture_output=True, text=True,
                               timeout=120)
        assert probe.returncode == 0, probe.stderr
        nodes, trial_nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        workers = [n for n in nodes if n["id"] != HEAD_NODE_ID]
        assert len(workers) >= 1 and all(n["gpu"] == 1 for n in workers)  # added by the autoscaler
        assert trial_nodes and HEAD_NODE_ID not in trial_nodes  # every trial ran on a worker
    finally:
        ray.stop()
    assert not wait_for_ray_gone(before), "stopping the test's own Ray left Ray processes behind"
    best = subprocess.run([sys.executable, "-m", "sweep.cli", "best", "--storage", "s3://bucket/fake", "--json"],
                          env=run_env(), capture_output=True, text=True, timeout=120)
    document = json.loads(best.stdout)
    states = [(t["trial_id"], t["status"], t["iterations"]) for t in document["trials"]]
    assert len(states) == 2, states
    assert all(status == "TERMINATED" and iterations == 4 for _, status, iterations in states), states
    assert any(key.endswith("/heads.json") for key in s3_objects(s3_server))


# Run inside the cluster: alive nodes, and the nodes that ran a trial actor.
PROBE = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], log_to_driver=False)
nodes = [{"id": n["NodeID"], "gpu": n["Resources"].get("GPU", 0)} for n in ray.nodes() if n["Alive"]]
actors = state.actors().values()
trial_nodes = sorted({a["Address"]["NodeID"] for a in actors if a.get("ActorClassName", "").endswith("ImplicitFunc")})
print(json.dumps([nodes, trial_nodes]))
"""


@pytest.fixture
def sshd(tmp_path):
    """An sshd of our own on 127.0.0.1 (free port, own host key, one authorized key), stopped after."""
    import getpass
    import socket

    folder = tmp_path / "sshd"
    folder.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    # every command a client sends goes through this script (SSH_ORIGINAL_COMMAND); a test may rewrite it
    node_command = folder / "node-command"
    node_command.write_text('#!/bin/bash\nexec /bin/bash -c "$SSH_ORIGINAL_COMMAND"\n')
    node_command.chmod(0o755)
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nAuthorizedKeysFile "
        f"{folder / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nPidFile {folder / 'sshd.pid'}\nForceCommand {node_command}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    server = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")], stderr=subprocess.DEVNULL
    )
    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(listening, 30, "sshd starting", alive=server, interval=0.2)
    yield {"port": port, "key": folder / "client_key", "user": getpass.getuser(), "node_command": node_command}
    server.terminate()
    server.wait(timeout=10)


@pytest.mark.cluster
@pytest.mark.usefixtures("no_stray_ray")
def test_ray_up_over_ssh_runs_a_sweep_then_ray_down(tmp_path, sshd):

    import yaml

    from conftest import ray_process_ids

    before = ray_process_ids()
    venv_bin = str(Path(sys.executable).parent)
    config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": sshd["user"], "ssh_private_key": str(sshd["key"]),
                      "ssh_proxy_command": f"{sys.executable} {REPO / 'tests' / 'ssh_proxy.py'} {sshd['port']}"}
    # The template copies the client's token to every node; here the "node" is this machine, so the copy
    # lands in the test's folder instead of ~/.ray, and the start commands are pointed at it.
    token = cluster_token(tmp_path)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    node_token = tmp_path / "node" / "auth_token"
    config["file_mounts"] = {str(tmp_path / "synced"): str(REPO), str(node_token): str(token)}
    config["setup_commands"] = []  # this machine already has the environment the template would build
    # The "node" is this machine, which may run other Ray instances: the head gets its own ports and temp dir,
    # and the bare `ray stop` that `ray up` and `ray down` run on a node stops only this test's Ray.
    ray = OwnRay()
    own_ports = " ".join([*ray.start_args(), f"--object-manager-port={free_port()}"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[key] = [c.replace("~/circuit-sweep-venv/bin/", venv_bin + "/").replace(
            "export RAY_AUTH_MODE=token;", f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={node_token};").replace(
            "--port=6379", own_ports).replace(f"{venv_bin}/ray stop", "ray stop") for c in config[key]]
    assert ray.address.split(":")[1] in " ".join(config["head_start_ray_commands"])
    stop_own_ray = f"{sys.executable} {REPO / 'tests' / 'own_ray.py'} {ray.temp_dir}"
    rewrite = f'"${{SSH_ORIGINAL_COMMAND//ray stop/{stop_own_ray}}}"'
    sshd["node_command"].write_text(f"#!/bin/bash\nexec /bin/bash -c {rewrite}\n")
    cluster_yaml = tmp_path / "local.yaml"
    cluster_yaml.write_text(yaml.safe_dump(config))
    env = run_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    try:
        run_sweep_on_ssh_cluster(tmp_path, cluster_yaml, env, ray.address)
        assert not wait_for_ray_gone(before), "ray down left Ray processes behind"
    finally:
        ray.stop()  # only when `ray down` failed is anything left to stop
    best = json.loads(
        subprocess.run(
            [sys.executable, "-m", "sweep.cli", "best", "--storage", str(tmp_path / "results"), "--json"],
            env=run_env(),
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    )
    assert best["experiment"] == "on-ssh" and best["trials"][0]["config"]["lr"] == 3e-3


def wait_for_ray_gone(before: set[int], timeout: float = 30) -> set[int]:
    """The Ray processes started since `before` still there after `timeout` seconds."""
    from conftest import ray_process_ids

    wait_for(lambda: not ray_process_ids() - before, timeout, "Ray stopping", interval=0.5, required=False)
    return ray_process_ids() - before


def run_sweep_on_ssh_cluster(tmp_path, cluster_yaml, env, address):
    """ray up, a sweep through --address, ray down."""
    up = ray_cli("up", "-y", "--no-config-cache", str(cluster_yaml), env=env, timeout=300)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    try:
        assert (tmp_path / "synced" / "sweep" / "cli.py").is_file()  # the working tree was synced
        reviews = tmp_path / "reviews.jsonl"
        write_reviews(reviews, count=600)
        launch = subprocess.run(
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
                "max_tokens=8192",
                "--grid",
                "eval_every_tokens=2048",
                "--grid",
                "lr=3e-3,1e-3",
                "--grid",
                "heads=2",
                "--address",
                address,
                "--storage",
                str(tmp_path / "results"),
                "--name",
                "on-ssh",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert launch.returncode == 0, launch.stdout + launch.stderr
    finally:
        down = ray_cli("down", "-y", str(cluster_yaml), env=env, timeout=180)
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
