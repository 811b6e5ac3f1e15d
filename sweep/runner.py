"""Build, launch and resume a Ray Tune sweep."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from model.config import ConfigError
from model.data import check_dataset, prepare_data
from model.tokenizers import check_tokenizer_spec

from .space import PRESETS, build_grid, data_config, data_key, expand, parse_grid, validate_trials
from .storage import Storage, check_name, check_writable, exists, is_storage_full, open_storage, read_text, write_text

if TYPE_CHECKING:  # the trainable imports ray; the CLI must start without it
    from .trainable import FinalFailureCallback

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"  # our own record of how the sweep was launched (for resume and results)


class StorageFullError(ConfigError):
    """The storage filled up during the sweep."""


# Failures that would only repeat if retried: a trial reports one of these names as a metric,
# then errors once (sweep.trainable); results show the name as the trial's error.
FINAL_FAILURES = ("nan_loss", "out_of_memory", "storage_full")


@dataclass(frozen=True)
class LaunchConfig:
    """Everything `sweep launch` needs; the CLI flags map one to one."""

    dataset: str
    preset: str = "smoke"
    grid: tuple[str, ...] = ()
    name: str | None = None
    storage: str | None = None
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    memory_per_trial_mb: float = 0.0
    """Memory a trial reserves (Ray scheduling) and may use (enforced on Linux); 0: no limit."""
    max_concurrent: int = 0
    num_samples: int = 1
    metric: str = "test_loss"
    mode: str = "min"
    early_stopping: bool | None = None
    """ASHA on or off; None: the preset's choice."""
    grace_period: int = 1
    reduction_factor: int = 2
    max_iterations: int | None = None
    max_failures: int = 3
    wandb: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    """Values held fixed for every trial: DataConfig fields other than dataset, and `compile`."""

    def __post_init__(self) -> None:
        from .trainable import REPORTED_METRICS

        if self.metric not in REPORTED_METRICS:
            raise ConfigError(f"--metric {self.metric!r} is never reported; choose one of: {', '.join(REPORTED_METRICS)}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"--mode must be min or max, got {self.mode!r}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0 or self.memory_per_trial_mb < 0:
            raise ConfigError("--cpus-per-trial must be positive, --gpus-per-trial and --memory-per-trial non-negative")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("--grace-period must be >= 1 and --reduction-factor >= 2")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise ConfigError(f"--max-iterations must be >= 1, got {self.max_iterations}")
        if self.num_samples < 1 or self.max_concurrent < 0 or self.max_failures < 0:
            raise ConfigError("--num-samples must be >= 1, --max-concurrent and --max-failures >= 0")


@dataclass
class Plan:
    """A validated sweep, ready to hand to Ray."""

    launch: LaunchConfig
    name: str
    storage: Storage
    axes: dict[str, list[Any]]
    fixed: dict[str, Any]
    trials: list[dict[str, Any]]

    @property
    def early_stopping(self) -> bool:
        if self.launch.early_stopping is not None:
            return self.launch.early_stopping
        preset = PRESETS.get(self.launch.preset)
        return preset.early_stopping if preset else True

    @property
    def iterations(self) -> int:
        most = max(-(-t["max_tokens"] // t["eval_every_tokens"]) for t in self.trials)
        return min(most, self.launch.max_iterations or most)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name, "launch": asdict(self.launch), "axes": self.axes, "fixed": self.fixed,
            "metric": self.launch.metric, "mode": self.launch.mode, "early_stopping": self.early_stopping, "trials": len(self.trials) * self.launch.num_samples,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def default_name(dataset: str, preset: str) -> str:
    stem = Path(dataset).stem if os.sep in dataset or Path(dataset).suffix else dataset
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip("-.") or "data"
    return f"{stem}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan_sweep(launch: LaunchConfig) -> Plan:
    """Validate everything that can be checked without Ray; nothing is written yet."""
    preset = PRESETS.get(launch.preset)
    dataset = launch.dataset or (preset.dataset if preset else None)
    if not dataset:
        raise ConfigError(f"DATASET is missing: preset {launch.preset!r} needs one (imdb, wikitext-2, repeat or a path)")
    base = {"dataset": dataset, **launch.data, "sweep_metric": launch.metric, "sweep_mode": launch.mode,
            "cpus_per_trial": launch.cpus_per_trial, "memory_per_trial_mb": launch.memory_per_trial_mb}
    if launch.gpus_per_trial == 0:
        base["device"] = "cpu"
    axes, fixed = build_grid(launch.preset, parse_grid(launch.grid), base)
    trials = expand(axes, fixed)
    validate_trials(trials)
    check_dataset(data_config(fixed))
    if dataset != "repeat":
        for tokenizer in {t["tokenizer"] for t in trials}:
            check_tokenizer_spec(tokenizer)
    name = check_name(launch.name or default_name(dataset, launch.preset))
    storage = open_storage(launch.storage)
    plan = Plan(launch, name, storage, axes, fixed, trials)
    if plan.early_stopping and launch.grace_period > plan.iterations:
        raise ConfigError(f"--grace-period {launch.grace_period} is more than the {plan.iterations} iterations a trial makes; lower it")
    return plan


def preflight(plan: Plan) -> None:
    """Storage reachable and writable, and the experiment name free."""
    check_writable(plan.storage)
    if exists(plan.storage, plan.storage.path(plan.name)):
        raise ConfigError(
            f"experiment {plan.name!r} already exists in {plan.storage.uri}; "
            f"use `sweep resume {plan.name}` or choose another --name"
        )


def prepare_datasets(trials: list[dict[str, Any]], log_line: Callable[[str], None]) -> dict[str, Any]:
    """Tokenize and pack once per distinct (tokenizer, seq_len); put each in the object store."""
    import ray

    refs = {}
    for trial in trials:
        key = data_key(trial)
        if key in refs:
            continue
        data_cfg = data_config(trial)
        started = time.perf_counter()
        data = prepare_data(data_cfg, trial["seq_len"], log_line)
        log_line(f"data {key}: {data.train.shape[0]:,} train / {data.test.shape[0]:,} test windows in {time.perf_counter() - started:.1f}s")
        refs[key] = ray.put((data.train, data.test, data.tokenizer.backend.to_str()))
    return refs


CREDENTIAL_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}


def keep_credentials_out_of_trials() -> None:
    """Stop Tune copying the driver's AWS keys into every trial's runtime_env.

    Ray writes runtime_envs in plain text to its logs (runtime_env_agent.log)
    and keeps them in the GCS. Trials get credentials from their own node's
    AWS chain instead: the environment a local Ray inherits from the driver,
    an instance profile, or a Kubernetes Secret.
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - CREDENTIAL_VARIABLES


def init_ray(address: str | None, verbose: bool = False) -> None:
    import ray

    keep_credentials_out_of_trials()

    if ray.is_initialized():
        return
    # Our ProgressCallback is the sweep's view: keep Tune's own tables and sync warnings quiet.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=verbose)


def check_cluster_storage(storage: Storage, cpus_per_trial: float) -> None:
    """Trials on other nodes cannot write to this machine's disk."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # A head too small for a trial means trials go to workers the autoscaler adds later.
    elsewhere = len(nodes) > 1 or all(n["Resources"].get("CPU", 0) < cpus_per_trial for n in nodes)
    if elsewhere and not storage.is_s3:
        raise ConfigError(
            f"trials of this cluster run on other nodes but --storage {storage.uri} is a local path; "
            "pass --storage s3://bucket/prefix (or a path on a mount shared by every node)"
        )


def build_tuner(plan: Plan, datasets: dict[str, Any], failures: FinalFailureCallback, callbacks: list, restore: bool = False):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .trainable import train_trial

    launch = plan.launch
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, datasets=datasets),
        {"cpu": launch.cpus_per_trial, "gpu": launch.gpus_per_trial, "memory": int(launch.memory_per_trial_mb * 2**20)},
    )
    callbacks = [failures, *callbacks]
    if launch.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "circuit-sweep"), group=plan.name, excludes=["cpus_per_trial"]))
    filesystem = plan.storage.filesystem if plan.storage.is_s3 else None
    if restore:
        return tune.Tuner.restore(
            plan.storage.path(plan.name), trainable, resume_unfinished=True, resume_errored=True,
            storage_filesystem=filesystem,
        )
    param_space = {**plan.fixed, **{key: tune.grid_search(values) for key, values in plan.axes.items()}}
    scheduler = ASHAScheduler(
        time_attr="training_iteration", max_t=plan.iterations, grace_period=launch.grace_period,
        reduction_factor=launch.reduction_factor,
    ) if plan.early_stopping else FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=launch.metric, mode=launch.mode, scheduler=scheduler, num_samples=launch.num_samples,
            max_concurrent_trials=launch.max_concurrent or None,
            # A finished trial's worker process takes the next trial: no new Python, torch or
            # Ray worker start-up per trial (benchmarks/sweep_efficiency.py measures it).
            reuse_actors=True,
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.storage.root,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=launch.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=launch.metric, checkpoint_score_order=launch.mode
            ),
            stop={"training_iteration": plan.iterations},
            callbacks=callbacks,
            verbose=0,
        ),
    )


def launch_sweep(launch: LaunchConfig, callbacks: list = (), log_line: Callable[[str], None] = print, verbose: bool = False) -> Plan:
    """Plan, preflight, start Ray, prepare data once, then run every trial to the end."""
    plan = plan_sweep(launch)
    preflight(plan)
    init_ray(launch.address, verbose)
    check_cluster_storage(plan.storage, launch.cpus_per_trial)
    log_line(f"experiment {plan.name}: {len(plan.trials) * launch.num_samples} trials, up to {plan.iterations} iterations each, storage {plan.storage.uri}")
    datasets = prepare_datasets(plan.trials, log_line)
    from .trainable import FinalFailureCallback

    failures = FinalFailureCallback()
    tuner = build_tuner(plan, datasets, failures, list(callbacks))
    # Written only now that every check has passed: a failed launch leaves nothing behind.
    write_text(plan.storage, plan.storage.path(plan.name, SWEEP_FILE), json.dumps(plan.record(), indent=2))
    _fit(tuner, plan, failures)
    return plan


def _fit(tuner, plan: Plan, failures: FinalFailureCallback) -> None:
    """Run the sweep; a sweep that ran out of storage ends in one clear error, not half-results."""
    try:
        tuner.fit()
    except (OSError, EOFError, ValueError) as error:
        # With the disk full, Ray's own state and result files are cut short too (EOFError, bad JSON).
        if failures.saw("storage_full") or is_storage_full(error):
            raise StorageFullError(storage_full_message(plan)) from None
        raise
    if failures.saw("storage_full"):
        raise StorageFullError(storage_full_message(plan))


def storage_full_message(plan: Plan) -> str:
    return (
        f"--storage {plan.storage.uri} is full: trials stopped with storage_full; free space or pick another --storage "
        f"and launch again (`sweep results {plan.name}` lists what finished; incomplete checkpoints are never used)"
    )


def load_plan(name: str, storage_uri: str | None) -> Plan:
    """The Plan of an experiment already in storage, from its sweep.json."""
    storage = open_storage(storage_uri)
    check_name(name)
    record_path = storage.path(name, SWEEP_FILE)
    if not exists(storage, record_path):
        raise ConfigError(f"no experiment {name!r} in {storage.uri}; `sweep list` shows the experiments there")
    record = json.loads(read_text(storage, record_path))
    launch_values = record["launch"] | {"grid": tuple(record["launch"]["grid"])}
    launch = LaunchConfig(**launch_values)
    return Plan(launch, name, storage, record["axes"], record["fixed"], expand(record["axes"], record["fixed"]))


def resume_sweep(name: str, storage_uri: str | None, address: str | None = None, callbacks: list = (), log_line: Callable[[str], None] = print, verbose: bool = False) -> Plan:
    """Restore an interrupted sweep: unfinished and errored trials go on from their checkpoints."""
    from .results import load_experiment

    plan = load_plan(name, storage_uri)
    experiment = load_experiment(plan.storage, name)
    if not experiment.state_readable:
        raise ConfigError(
            f"experiment {name!r} cannot be resumed: Ray Tune's state file in storage was cut short "
            "(the storage filled up?); launch it again under a new --name"
        )
    unfinished = [t for t in experiment.trials if t.status != "TERMINATED"]
    if experiment.trials and not unfinished and len(experiment.trials) >= len(plan.trials):
        raise ConfigError(f"experiment {name!r} already finished: all {len(experiment.trials)} trials terminated; nothing to resume")
    init_ray(address, verbose)
    check_cluster_storage(plan.storage, plan.launch.cpus_per_trial)
    log_line(f"resuming {name}: {len(unfinished)} of {len(experiment.trials)} trials unfinished")
    datasets = prepare_datasets(plan.trials, log_line)
    from .trainable import FinalFailureCallback

    failures = FinalFailureCallback()
    _fit(build_tuner(plan, datasets, failures, list(callbacks), restore=True), plan, failures)
    return plan
