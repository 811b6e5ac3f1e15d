"""The Ray a sweep runs on: starting or joining it (credentials kept out of trials), and checking before any trial
that it can run one at all."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

import ray
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized
from ray.tune.execution import class_cache

from model.config import ConfigError

from .plan import Plan

log = logging.getLogger(__name__)


CREDENTIAL_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}


def keep_credentials_out_of_trials() -> None:
    """Stop Tune copying the driver's AWS keys into every trial's runtime_env.

    Ray writes runtime_envs in plain text to its logs (runtime_env_agent.log)
    and keeps them in the GCS. Trials get credentials from their own node's
    AWS chain instead: the environment a local Ray inherits from the driver,
    an instance profile, or a Kubernetes Secret.
    """
    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - CREDENTIAL_VARIABLES


def init_ray(address: str | None, verbose: bool = False) -> None:
    keep_credentials_out_of_trials()

    if ray.is_initialized():
        return
    # Our ProgressCallback is the sweep's view: keep Tune's own tables and sync warnings quiet.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not verbose:
        # Ray announces its token authentication on every start; the README explains the token once.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=verbose)
    except (ConnectionError, RuntimeError) as error:
        if address is None:
            raise
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        token = (" (is RAY_AUTH_MODE=token set, with the cluster's token in ~/.ray/auth_token?)"
                 if "uth" in str(error) else "")
        raise ConfigError(f"cannot join the Ray cluster at --address {address}: {first[:200]}{token}") from None


def _describe(resources: dict[str, float]) -> str:
    def count(amount: float, unit: str) -> str:
        return f"{amount:g} {unit}" + ("" if amount == 1 else "s")

    gpus, memory = resources.get("GPU", 0), resources.get("memory", 0)
    parts = [count(resources.get("CPU", 0), "CPU"), count(gpus, "GPU") if gpus else "no GPU"]
    return ", ".join(parts + ([f"{memory / 2**30:.1f} GiB memory"] if memory else []))


def _autoscaler_running(wait_s: float = 15.0) -> bool:
    """Whether the cluster's autoscaler reports: then nodes may be added for what no node has now.

    Its monitor writes a status every few seconds; a cluster started a moment ago may not have one yet.
    """
    if not _internal_kv_initialized():
        return False
    deadline = time.monotonic() + wait_s
    while True:
        raw = _internal_kv_get("__autoscaling_status")
        try:
            # the first statuses carry load metrics only; the autoscaler's report follows its first update
            if raw and json.loads(raw).get("autoscaler_report"):
                return True
        except (json.JSONDecodeError, AttributeError):
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def check_cluster(plan: Plan, local: bool, log_line: Callable[[str], None]) -> None:
    """Before anything is written: some node can run a trial, and trials can reach the storage.

    A trial no node can ever hold would wait forever; on the local machine (or
    a cluster without an autoscaler) that is a one-line error naming what the
    cluster has. Trials on other nodes cannot write to this machine's disk.
    """
    launch = plan.launch
    need = {"CPU": launch.cpus_per_trial, "GPU": launch.gpus_per_trial, "memory": launch.memory_per_trial_mb * 2**20}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fitting = [r for r in nodes if all(r.get(kind, 0) >= amount for kind, amount in need.items() if amount)]
    autoscaling = not local and not fitting and _autoscaler_running()
    if not fitting:
        largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
        wanted = _describe(need)
        where = "this machine (local Ray)" if local else f"the largest of its {len(nodes)} nodes"
        if not autoscaling:
            raise ConfigError(
                f"no node can run a trial: each needs {wanted} but {where} has {_describe(largest)}; "
                "lower --cpus-per-trial / --gpus-per-trial / --memory-per-trial or join a larger cluster with --address"
            )
        log_line(f"no node has {wanted} for a trial yet; waiting for the autoscaler to add one (Ctrl-C if it cannot)")
    elsewhere = len(nodes) > 1 or not fitting
    if elsewhere and not plan.storage.is_s3:
        raise ConfigError(
            f"trials of this cluster may run on other nodes but --storage {plan.storage.uri} is a local path; "
            "pass --storage s3://bucket/prefix (or a path on a mount shared by every node)"
        )
