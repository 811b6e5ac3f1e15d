"""Shared fixtures: isolated caches, small data written by the tests, the real data mirror."""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from own_ray import OwnRay, free_port  # noqa: F401 (used by the tests through conftest)
from waits import wait_for  # noqa: F401 (likewise)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# The README's command gives SWEEP_DATA_DIR relative to the checkout; tests change directory.
if os.environ.get("SWEEP_DATA_DIR"):
    os.environ["SWEEP_DATA_DIR"] = str(Path(os.environ["SWEEP_DATA_DIR"]).resolve())
# Tables are read back at the width a pipe gets (200 columns), whatever terminal runs the suite.
os.environ.pop("COLUMNS", None)

WORDS = (
    "the a movie film actor plot scene great bad boring funny story ending music camera love hate "
    "watch again never always really quite truly director script character was is were and but"
).split()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: deselected (not skipped) where there is none, run on a GPU machine."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch, request):
    """Every test gets its own caches and never reaches the Hub or a real AWS account; every test but a `gpu` one
    runs on the CPU, in this process and the ones it starts, even on a machine with a GPU."""
    if not request.node.get_closest_marker("gpu"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    global TEST_OWNER
    TEST_OWNER = f"test-{uuid.uuid4().hex}"
    monkeypatch.setenv(OWNER_VARIABLE, TEST_OWNER)  # inherited by every process the test starts (ray_process_ids)
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SWEEP_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("SWEEP_STORAGE", raising=False)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def write_reviews(path: Path, count: int = 400, seed: int = 0) -> list[str]:
    """Short pseudo-reviews as JSON lines; deterministic."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


@pytest.fixture
def reviews_file(tmp_path) -> Path:
    path = tmp_path / "reviews.jsonl"
    write_reviews(path)
    return path


@pytest.fixture
def data_mirror(monkeypatch) -> Path:
    """The real IMDB / WikiText-2 mirror beside the checkout."""
    assert SHARED_DATA.is_dir(), f"the data mirror {SHARED_DATA} is missing"
    monkeypatch.setenv("SWEEP_DATA_DIR", str(SHARED_DATA))
    return SHARED_DATA


def run_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this one plus `extra`."""
    env = dict(os.environ)
    env.update(extra)
    return env


def sweep(*args, env=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    """Run the `sweep` CLI in a fresh process, as a user would."""
    result = subprocess.run([sys.executable, "-m", "sweep.cli", *map(str, args)], capture_output=True, text=True,
                            env=env or run_env(), timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def reached_checkpoint(trials: Path, index: int) -> bool:
    """Whether a trial folder matched by `trials` (a glob) holds checkpoint `index` or a later one. Tune keeps
    the two best, so a given checkpoint of a fast trial may be gone a moment after it is written."""
    return any(int(path.parent.name.rsplit("_", 1)[1]) >= index
               for path in trials.parent.glob(f"{trials.name}/checkpoint_*/heads.json"))


OWNER_VARIABLE = "SWEEP_TEST_OWNER"
TEST_OWNER = ""
"""The running test's mark: processes it starts inherit it, those of a test running beside it carry theirs,
and the session's shared Ray carries `shared`."""


def _owner(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{OWNER_VARIABLE}=".encode()
    return next((item[len(prefix):].decode() for item in environ if item.startswith(prefix)), None)


def ray_process_ids() -> set[int]:
    """PIDs of this test's Ray processes (raylet, GCS, workers), read from /proc: those carrying its mark or none
    (a Ray started over SSH gets a fresh environment), never the session's shared Ray or another worker's test's."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if any(
            name in command
            for name in (
                b"raylet",
                b"gcs_server",
                b"ray::",
                b"default_worker.py",
                b"ray/dashboard",
                b"log_monitor.py",
                b"ray/autoscaler",
            )
        ) and _owner(int(entry.name)) in (TEST_OWNER, None):
            found.add(int(entry.name))
    return found


@pytest.fixture
def no_stray_ray():
    """Stop any Ray process a test started (a SIGKILLed driver leaves its cluster behind): a Ray whose driver
    ended normally is gone within a second or two; what is left after STRAY_GRACE_S is killed."""
    before = ray_process_ids()
    yield
    wait_for(lambda: not ray_process_ids() - before, STRAY_GRACE_S, "a driver's own Ray stopping", required=False)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ray_process_ids() - before:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        wait_for(lambda: not ray_process_ids() - before, 5, "stray Ray processes stopping", required=False)


STRAY_GRACE_S = 5.0
"""A driver's own Ray stops within 1-2 s of the driver; one a killed driver left never stops by itself."""


# ---------------------------------------------------------------- one Ray for the session

RAY_CLI = str(Path(sys.executable).with_name("ray"))


def session_env(root: Path) -> dict[str, str]:
    """What isolated_environment gives a test, for processes that outlive one (the shared Ray's workers)."""
    env = run_env(SWEEP_CACHE_DIR=str(root / "cache"), HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1",
                  WANDB_MODE="offline", AWS_EC2_METADATA_DISABLED="true", CUDA_VISIBLE_DEVICES="",
                  **{OWNER_VARIABLE: "shared"})
    env.pop("SWEEP_STORAGE", None)
    return env


@pytest.fixture(scope="session")
def shared_ray_cluster(tmp_path_factory):
    """One Ray started once for every test that only needs a running Ray (a sweep, `sweep analyse`): a launch
    joins it through RAY_ADDRESS instead of starting and stopping one of its own (3-5 s each). Tests that kill
    Ray's nodes or drivers, need S3 credentials in the trials, or start a cluster of their own keep their own."""
    root = tmp_path_factory.mktemp("shared-ray")
    token = root / "auth_token"  # `ray start` with token authentication needs a token and never makes one
    token.write_text(secrets.token_hex(32))
    ray = OwnRay()
    joining = {"RAY_ADDRESS": ray.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = session_env(root) | joining
    started = subprocess.run([RAY_CLI, "start", "--head", "--include-dashboard=false", *ray.start_args()], env=env,
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield joining
    finally:
        ray.stop(timeout=10)


@pytest.fixture
def shared_ray(shared_ray_cluster, monkeypatch):
    """The sweeps this test starts in new processes join the session's Ray (not one in this process: Ray reads
    RAY_AUTH_MODE once, when it is first imported)."""
    for name, value in shared_ray_cluster.items():
        monkeypatch.setenv(name, value)
    return shared_ray_cluster


@pytest.fixture
def s3_server(monkeypatch):
    """A moto S3 server on 127.0.0.1 with a bucket named `bucket`; env points the AWS chain at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets in this process across servers: start every test from an empty S3
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSWEEPTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="bucket")
    yield client
    server.stop()


S3_SECRET = "sweep-test-secret-4f1c9e"


def s3_keys(client, bucket: str = "bucket") -> list[str]:
    return [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for item in page.get("Contents", [])
    ]


def s3_objects(client, bucket: str = "bucket") -> dict[str, bytes]:
    """Every object's bytes; keys deleted between listing and reading (old checkpoints) are skipped."""
    objects = {}
    for key in s3_keys(client, bucket):
        try:
            objects[key] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            continue
    return objects


# ---------------------------------------------------------------- experiments trained once, read many times


@pytest.fixture(scope="session")
def induction_experiment(shared_ray_cluster, tmp_path_factory) -> tuple[Path, str]:
    """The induction preset launched once (ASHA on test_loss, nothing compared before its 6M grace tokens): the
    2-layer trial forms induction heads, the 1-layer one cannot. Its readers (the preset's end-to-end check, the
    scientific checks, the circuits) read it; a test that would change what another reads copies it."""
    root = tmp_path_factory.mktemp("induction")
    storage = root / "results"
    env = session_env(root) | shared_ray_cluster
    launched = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "launch", "--preset", "induction", "--scheduler", "asha", "--storage",
         str(storage), "--name", "ind"], env=env, capture_output=True, text=True, timeout=900)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    return storage, "ind"
