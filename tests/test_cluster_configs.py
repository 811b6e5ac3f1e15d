"""Cluster configs: valid for Ray's own launcher, offline, and safe (token auth, no open ports, no keys)."""

import re
from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
SECRET_PATTERNS = (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*\S")


def test_ray_cluster_yaml_passes_rays_validation():
    config = prepare_config(yaml.safe_load((REPO / "ray-cluster.yaml").read_text()))  # nothing here contacts AWS
    validate_config(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no trials
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    (gpu,) = workers
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 4
    assert re.match(r"^g[456]\.", gpu["node_config"]["InstanceType"])
    for node in config["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]  # S3 through an instance profile
    assert config["docker"]["worker_image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any("pip install" in c and "torch" in c for c in config["setup_commands"])


def test_ray_cluster_yaml_is_locked_down():
    text = (REPO / "ray-cluster.yaml").read_text()
    config = yaml.safe_load(text)
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # every node holds the token
    assert "--dashboard-host=0.0.0.0" not in starts and "--dashboard-host=127.0.0.1" in starts
    assert "security_group" not in text.lower() or "0.0.0.0/0" not in text
    assert not any(re.search(pattern, text) for pattern in SECRET_PATTERNS)


def _kuberay_spec(document):
    return document["spec"]["rayClusterSpec"] if document["kind"] == "RayJob" else document["spec"]


def test_kuberay_manifests():
    for name in ("raycluster.yaml", "rayjob.yaml"):
        text = (REPO / "cluster" / "kuberay" / name).read_text()
        document = yaml.safe_load(text)
        assert document["apiVersion"] == "ray.io/v1"
        spec = _kuberay_spec(document)
        assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        (gpu,) = spec["workerGroupSpecs"]
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 4
        (container,) = gpu["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        env = {e["name"]: e for e in container["env"]}
        assert spec["authOptions"] == {"mode": "token"}  # the operator makes the token and hands it to every pod
        assert "AWS_ENDPOINT_URL" in env
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[key]["valueFrom"] and "value" not in env[key]  # from a Secret only
        assert not any(re.search(pattern, text) for pattern in SECRET_PATTERNS[:1])
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert job["spec"]["entrypoint"].startswith("sweep launch imdb --preset paper --address auto --storage s3://")
