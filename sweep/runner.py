"""Build, launch and resume a Ray Tune sweep.

`plan_sweep` (launch) and `load_plan` (resume) make the one Plan of a sweep:
everything checked that can be checked without Ray. The runner then starts
Ray, checks the cluster can run a trial at all, and only then writes the
experiment's record and hands the plan to Tune.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from model.config import ConfigError
from model.data import check_data, prepare_data, repetition_warning

from .names import GRACE_TOKEN_SCHEDULERS, REPORTED_METRICS, SCHEDULERS, SWEEP_FILE, metric_mode
from .space import (
    PRESETS,
    Distribution,
    build_grid,
    data_config,
    data_key,
    parse_distribution,
    parse_grid,
    planned_iterations,
    probe_trials,
    trial_schedule,
    validate_trials,
)
from .storage import Storage, check_name, check_writable, exists, is_storage_full, open_storage, read_text, write_text

if TYPE_CHECKING:  # the trainable imports ray; the CLI must start without it
    from .trainable import FinalFailureCallback

log = logging.getLogger(__name__)


class StorageFullError(ConfigError):
    """The storage filled up during the sweep."""


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
    mode: str | None = None
    """min or max; None: the metric's natural direction (losses min, scores and accuracy max)."""
    early_stopping: bool | None = None
    """ASHA on or off; None: the preset's choice."""
    search: str = "grid"
    """grid (every combination), random (num_samples draws of the ranges per grid point) or optuna (TPE, num_samples trials)."""
    scheduler: str | None = None
    """asha, halving, hyperband or fifo (see SCHEDULERS); None: asha or fifo from early_stopping."""
    grace_tokens: int | None = None
    """No trial is compared before this many training tokens; None: the preset's, else --grace-period iterations."""
    grace_period: int = 1
    reduction_factor: int = 2
    max_iterations: int | None = None
    max_failures: int = 3
    wandb: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    """Values held fixed for every trial: DataConfig fields other than dataset, and the run settings
    (`compile`, `snapshots`, `snapshot_dtype`)."""

    def __post_init__(self) -> None:
        if self.metric not in REPORTED_METRICS:
            import difflib

            nearest = difflib.get_close_matches(self.metric, REPORTED_METRICS, n=1)
            hint = f" (did you mean {nearest[0]}?)" if nearest else ""
            raise ConfigError(f"--metric {self.metric!r} is never reported{hint}; choose one of: "
                              f"{', '.join(REPORTED_METRICS)}")
        if self.mode is None:
            object.__setattr__(self, "mode", metric_mode(self.metric))
        if self.mode not in ("min", "max"):
            raise ConfigError(f"--mode must be min or max, got {self.mode!r}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0 or self.memory_per_trial_mb < 0:
            raise ConfigError("--cpus-per-trial must be positive, --gpus-per-trial and --memory-per-trial non-negative")
        if self.gpus_per_trial > 1:
            raise ConfigError(f"--gpus-per-trial {self.gpus_per_trial:g}: a trial trains on one GPU; give 1, or a "
                              "fraction to share one GPU between trials (0.5: two trials a GPU)")
        if self.search not in ("grid", "random", "optuna"):
            raise ConfigError(f"--search must be grid, random or optuna, got {self.search!r}")
        if self.scheduler not in (None, *SCHEDULERS):
            raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.scheduler not in (None, "fifo") and self.early_stopping is False:
            raise ConfigError(f"--scheduler {self.scheduler} stops trials early; it contradicts --no-early-stopping")
        if self.grace_tokens is not None and self.grace_tokens < 1:
            raise ConfigError(f"--grace-tokens must be positive, got {self.grace_tokens}")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("--grace-period must be >= 1 and --reduction-factor >= 2")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise ConfigError(f"--max-iterations must be >= 1, got {self.max_iterations}")
        if self.num_samples < 1 or self.max_concurrent < 0 or self.max_failures < 0:
            raise ConfigError("--num-samples must be >= 1, --max-concurrent and --max-failures >= 0")


@dataclass(frozen=True)
class TrialSettings:
    """How every trial runs, apart from what it trains: passed with `tune.with_parameters`,
    so the searched config holds hyperparameters only."""

    metric: str
    mode: str
    cpus_per_trial: float
    memory_per_trial_mb: float
    storage_uri: str = ""
    """Where trials write their snapshots: <storage>/<experiment>/trial_<id>/snapshots/."""
    experiment: str = ""

    @property
    def threads(self) -> int:
        """Torch threads of a trial: the CPUs Ray reserved for it, at least one."""
        return max(1, int(self.cpus_per_trial))


@dataclass
class Plan:
    """A validated sweep, ready to hand to Ray."""

    launch: LaunchConfig
    name: str
    storage: Storage
    axes: dict[str, list[Any]]
    fixed: dict[str, Any]
    trials: list[dict[str, Any]]
    """The grid's trials, with each searched range at its probe values: validated, and their data prepared."""
    distributions: dict[str, Distribution] = field(default_factory=dict)
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    """data_key -> the tokenizer's vocabulary, once the data is prepared."""

    @property
    def scheduler(self) -> str:
        if self.launch.scheduler:
            return self.launch.scheduler
        early = self.launch.early_stopping
        if early is None:
            preset = PRESETS.get(self.launch.preset)
            early = preset.early_stopping if preset else True
        return "asha" if early else "fifo"

    @property
    def early_stopping(self) -> bool:
        return self.scheduler != "fifo"

    @property
    def grace_tokens(self) -> int | None:
        if self.launch.grace_tokens is not None:
            return self.launch.grace_tokens
        preset = PRESETS.get(self.launch.preset)
        return preset.grace_tokens if preset else None

    @property
    def max_tokens_seen(self) -> int:
        """tokens_seen at the end of the longest trial (whole steps)."""
        return max(trial_schedule(t).final_tokens for t in self.trials)

    @property
    def trial_count(self) -> int:
        """Trials the sweep runs: the grid's points x samples, or the samples alone for optuna."""
        if self.launch.search == "optuna":
            return self.launch.num_samples
        return math.prod(len(v) for v in self.axes.values()) * self.launch.num_samples

    @property
    def halving_time_attr(self) -> str:
        """What halving's rungs count: tokens_seen from the grace tokens, else iterations."""
        return "tokens_seen" if self.grace_tokens is not None else "training_iteration"

    @property
    def halving_rungs(self) -> list[tuple[int, int]]:
        """Synchronous halving's rungs, (where, trials that train to it), from --grace-tokens or --grace-period."""
        if self.grace_tokens is not None:
            iteration_tokens = min(trial_schedule(t).steps_per_iteration * trial_schedule(t).tokens_per_step for t in self.trials)
            return halving_rungs(self.trial_count, self.grace_tokens, self.max_tokens_seen, self.launch.reduction_factor, iteration_tokens)
        return halving_rungs(self.trial_count, self.launch.grace_period, self.iterations, self.launch.reduction_factor)

    @property
    def optuna_concurrency(self) -> int:
        """Optuna trials at once: TPE learns only from finished trials, so a few at a time."""
        return self.launch.max_concurrent or 4

    def trial_iterations(self, config: dict[str, Any]) -> int:
        """Iterations a trial of `config` makes: the trainer's count, capped by --max-iterations."""
        planned = planned_iterations(config)
        return min(planned, self.launch.max_iterations or planned)

    @property
    def iterations(self) -> int:
        """The most iterations any trial makes: ASHA's max_t."""
        return max(self.trial_iterations(t) for t in self.trials)

    @property
    def settings(self) -> TrialSettings:
        launch = self.launch
        return TrialSettings(launch.metric, launch.mode, launch.cpus_per_trial, launch.memory_per_trial_mb,
                             self.storage.uri, self.name)

    def snapshot_plan(self) -> list[dict[str, Any]]:
        """Per distinct trial shape: its snapshot count and bytes (what launch says before any trial runs)."""
        from .trajectory import trial_snapshot_plan

        return trial_snapshot_plan(self.trials, self.vocab_sizes)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name, "launch": asdict(self.launch), "axes": self.axes, "fixed": self.fixed,
            "space": {key: d.text for key, d in self.distributions.items()}, "search": self.launch.search,
            "metric": self.launch.metric, "mode": self.launch.mode, "early_stopping": self.early_stopping,
            "scheduler": self.scheduler, "grace_tokens": self.grace_tokens if self.scheduler in GRACE_TOKEN_SCHEDULERS else None,
            "trials": self.trial_count, "max_iterations": self.launch.max_iterations,
            "snapshots": {"schedule": self.fixed.get("snapshots", "log"),
                          "dtype": self.fixed.get("snapshot_dtype", "float32"), "per_trial": self.snapshot_plan()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def default_name(dataset: str, preset: str) -> str:
    stem = Path(dataset).stem if os.sep in dataset or Path(dataset).suffix else dataset
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip("-.") or "data"
    return f"{stem}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


REPEAT_TOKENIZER = "--tokenizer does not apply to the repeat task: it has its own vocabulary of random tokens"


def plan_sweep(launch: LaunchConfig) -> Plan:
    """Validate everything that can be checked without Ray; nothing is written yet."""
    preset = PRESETS.get(launch.preset)
    dataset = launch.dataset or (preset.dataset if preset else None)
    if not dataset:
        raise ConfigError(f"DATASET is missing: preset {launch.preset!r} needs one (imdb, wikitext-2, repeat or a path)")
    if launch.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--wandb needs the wandb package: pip install 'circuit-sweep[wandb]'") from None
    base = {"dataset": dataset, **launch.data}
    if launch.gpus_per_trial == 0:
        base["device"] = "cpu"
    overrides = parse_grid(launch.grid)
    axes, distributions, fixed = build_grid(launch.preset, overrides, base)
    if dataset == "repeat":  # its own vocabulary: the trials record repeat:N, and a --tokenizer is refused
        if "tokenizer" in launch.data or "tokenizer" in overrides:
            raise ConfigError(REPEAT_TOKENIZER)
        fixed["tokenizer"] = data_config(fixed).tokenizer
    if distributions and launch.search == "grid":
        first = next(iter(distributions.values()))
        raise ConfigError(f"--grid {first.key}={first.text} is a range to sample: add --search random or --search optuna (and --num-samples N)")
    if launch.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("--search optuna needs the optuna package: pip install 'circuit-sweep[optuna]'") from None
    trials = probe_trials(axes, distributions, fixed)
    validate_trials(trials, {**axes, **distributions}, overrides)
    for config in {data_key(t): t for t in trials}.values():
        check_data(data_config(config))
    name = check_name(launch.name or default_name(dataset, launch.preset))
    storage = open_storage(launch.storage)
    plan = Plan(launch, name, storage, axes, fixed, trials, distributions)
    if plan.scheduler in ("halving", "hyperband") and (launch.max_concurrent or launch.search == "optuna"):
        # Tune then creates trials a few at a time, and a synchronous rung would compare the first few alone
        raise ConfigError(
            f"--scheduler {plan.scheduler} compares every trial at each rung, so all must exist from the start: "
            "limit trials at once with --cpus-per-trial instead of --max-concurrent, and search with grid or random"
        )
    if plan.scheduler not in GRACE_TOKEN_SCHEDULERS and launch.grace_tokens is not None:
        raise ConfigError(f"--grace-tokens applies to --scheduler asha or halving; {plan.scheduler}'s rungs are set by --reduction-factor")
    if plan.scheduler in GRACE_TOKEN_SCHEDULERS and plan.grace_tokens is not None:
        if plan.grace_tokens >= plan.max_tokens_seen:
            raise ConfigError(f"--grace-tokens {plan.grace_tokens:,} is not below the {plan.max_tokens_seen:,} tokens a trial trains; lower it")
    elif plan.early_stopping and launch.grace_period > plan.iterations:
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


def prepare_datasets(plan: Plan, log_line: Callable[[str], None]) -> dict[str, Any]:
    """Tokenize and pack once per distinct (tokenizer, seq_len); put each in the object store."""
    import ray

    refs = {}
    for trial in plan.trials:
        key = data_key(trial)
        if key in refs:
            continue
        data_cfg = data_config(trial)
        started = time.perf_counter()
        data = prepare_data(data_cfg, trial["seq_len"], log_line)
        log_line(f"data {key}: {data.train.shape[0]:,} train / {data.test.shape[0]:,} test windows in {time.perf_counter() - started:.1f}s")
        longest = max(int(t.get("max_tokens", 0)) for t in plan.trials if data_key(t) == key)
        if warning := repetition_warning(data_cfg, data.train, longest):
            log_line(warning)
        refs[key] = ray.put((data.train, data.test, data.tokenizer.backend.to_str()))
        plan.vocab_sizes[key] = data.tokenizer.vocab_size
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
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

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
    import ray

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


def build_tuner(
    plan: Plan, datasets: dict[str, Any], failures: FinalFailureCallback, callbacks: list, restore: bool = False,
    log_line: Callable[[str], None] | None = None,
):
    from ray import tune

    from .threads import SpareThreads
    from .trainable import train_trial

    launch = plan.launch
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, datasets=datasets, settings=plan.settings),
        {"cpu": launch.cpus_per_trial, "gpu": launch.gpus_per_trial, "memory": int(launch.memory_per_trial_mb * 2**20)},
    )
    callbacks = [failures, SpareThreads(plan.name, plan.settings.threads, plan.trial_count, log_line), *callbacks]
    if launch.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "circuit-sweep"), group=plan.name))
    filesystem = plan.storage.filesystem if plan.storage.is_s3 else None
    if restore:
        return tune.Tuner.restore(
            plan.storage.path(plan.name), trainable, resume_unfinished=True, resume_errored=True,
            storage_filesystem=filesystem,
        )
    search_alg, param_space = make_search(plan)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=launch.metric, mode=launch.mode, scheduler=make_scheduler(plan), search_alg=search_alg, num_samples=launch.num_samples,
            # A finished trial's worker process takes the next trial: no new Python, torch or
            # Ray worker start-up per trial (benchmarks/sweep_efficiency.py measures it).
            reuse_actors=True,
            # sweep.trainable.trial_snapshots finds a trial's folder by this name
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.storage.root,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=launch.max_failures),
            # Every snapshot is kept for analysis; a checkpoint only resumes the trial: its latest is all it needs
            # (STORAGE_CHECKPOINTS counts the one being written beside it).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            stop={"training_iteration": plan.iterations},
            callbacks=callbacks,
            verbose=0,
        ),
    )


def make_search(plan: Plan):
    """The search algorithm and its space: every grid point (with seeded draws of the ranges), or Optuna's TPE."""
    from ray import tune

    if plan.launch.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        grid = {key: tune.choice(values) for key, values in plan.axes.items()}
        search_alg = ConcurrencyLimiter(OptunaSearch(sampler=tpe_sampler(plan)), max_concurrent=plan.optuna_concurrency)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # seeded: the same --grid seed draws the same random-search samples again
        grid = {key: tune.grid_search(values) for key, values in plan.axes.items()}
        search_alg = BasicVariantGenerator(max_concurrent=plan.launch.max_concurrent, random_state=plan.fixed.get("seed", 0))
    return search_alg, {**plan.fixed, **grid, **{key: d.domain() for key, d in plan.distributions.items()}}


def tpe_sampler(plan: Plan):
    """Optuna's TPE, sized to the budget. TPE proposes from the results so far, so it runs a few trials
    at a time, and its random start-up is a quarter of the trials (at least one batch, at most Optuna's
    default of 10): with the default, a 16-trial search would be 10 random trials and 6 guided ones.
    Trials still running count as bad results (constant liar), so a batch is not 4 proposals of one point."""
    import optuna

    startup = min(10, max(plan.optuna_concurrency, plan.trial_count // 4))
    with warnings.catch_warnings():  # multivariate and constant_liar are marked experimental: not the user's concern
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=plan.fixed.get("seed", 0), n_startup_trials=startup, multivariate=True, constant_liar=True)


def make_scheduler(plan: Plan):
    """ASHA (asynchronous), synchronous halving or HyperBand (pausing trials at their rungs) or FIFO (every trial to its end).

    With grace tokens, ASHA and halving compare trials on tokens_seen: none before the
    grace tokens, then at rungs of grace x reduction factor^k tokens, so trials are
    judged at equal training, after a phase change the grace period leaves room for.
    Without, their first rung is --grace-period iterations.
    """
    from ray.tune.schedulers import FIFOScheduler

    launch = plan.launch
    if plan.scheduler == "halving":
        return synchronous_halving(plan.trial_count, plan.halving_rungs, launch.reduction_factor, plan.halving_time_attr)
    if plan.scheduler == "hyperband":
        return hyperband_saving_stopped_trials()(time_attr="training_iteration", max_t=plan.iterations, reduction_factor=launch.reduction_factor)
    if plan.scheduler == "fifo":
        return FIFOScheduler()
    from .schedulers import ReplayingASHA

    where = {"storage_uri": plan.storage.uri, "experiment": plan.name}
    if plan.grace_tokens is not None:
        return ReplayingASHA(**where, time_attr="tokens_seen", max_t=plan.max_tokens_seen,
                             grace_period=plan.grace_tokens, reduction_factor=launch.reduction_factor)
    return ReplayingASHA(**where, time_attr="training_iteration", max_t=plan.iterations,
                         grace_period=launch.grace_period, reduction_factor=launch.reduction_factor)


def hyperband_saving_stopped_trials():
    """Tune's HyperBandScheduler, except that a paused trial it stops at a rung is saved as TERMINATED,
    and that a resumed sweep's finished trials stay out of its brackets.

    Tune stops such a trial (it has no actor) without marking its state to be written again, so the
    experiment state in storage kept it PAUSED: `sweep status` showed it paused and `sweep resume`
    would have trained it on.
    """
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import HyperBandScheduler

    class HyperBand(HyperBandScheduler):
        def on_trial_add(self, tune_controller, trial):
            # `sweep resume` adds the finished trials too; in a bracket they would count as live trials that
            # never reach its rung, and it would wait for them forever
            if trial.status != Trial.TERMINATED:
                super().on_trial_add(tune_controller, trial)

        def _process_bracket(self, tune_controller, bracket):
            paused = [trial for trial in bracket.current_trials() if trial.status == Trial.PAUSED]
            action = super()._process_bracket(tune_controller, bracket)
            for trial in paused:
                if trial.status == Trial.TERMINATED:
                    tune_controller._mark_trial_to_checkpoint(trial)
            return action

    return HyperBand


def halving_rungs(trials: int, first_rung: int, max_t: int, reduction_factor: int, step: int = 1) -> list[tuple[int, int]]:
    """Synchronous halving's rungs as (where, trials that train to it): first_rung x rf^k, the last one at
    max_t, keeping ceil(n / rf) trials at each, as Tune's HyperBand bracket does. A rung less than one
    step (an iteration's tokens) before max_t becomes max_t: it would compare the same results."""
    rungs = [(first_rung, trials)]
    while rungs[-1][0] < max_t:
        at, count = rungs[-1]
        following = at * reduction_factor if max_t - at * reduction_factor >= step else max_t
        rungs.append((following, math.ceil(count / reduction_factor)))
    return rungs


def synchronous_halving(trials: int, rungs: list[tuple[int, int]], reduction_factor: int, time_attr: str = "training_iteration"):
    """Synchronous successive halving (Jamieson & Talwalkar 2016), built on Tune's HyperBandScheduler:
    one bracket holding every trial of the sweep, with the given rungs (iterations, or tokens_seen).

    Every trial trains to the first rung and pauses (its checkpoint is kept); when all have, the
    best ceil(n / rf) resume and train to the next rung, and so on up to the last. Tune's HyperBand
    would first fill its most cautious brackets, which train their trials to the end, and its own
    first rung, max_t / rf^s, rounds down to 0 or up past 1 unless max_t is a power of rf.
    """
    from ray.tune.schedulers.hyperband import _Bracket

    first_rung, max_t = rungs[0][0], rungs[-1][0]

    class SynchronousHalving(hyperband_saving_stopped_trials()):
        def _create_bracket(self, s):
            return _Bracket(time_attr=self._time_attr, max_trials=trials, init_t_attr=first_rung, max_t_attr=max_t,
                            eta=reduction_factor, s=len(rungs) - 1, stop_last_trials=self._stop_last_trials)

        def _process_bracket(self, tune_controller, bracket):
            # `sweep resume` gives a fresh bracket only the unfinished trials, the survivors of earlier
            # rungs, already past its first rungs: halve again until the next rung is ahead of them.
            # Otherwise every trial would pause at a rung already behind it, and the sweep would wait forever.
            action = super()._process_bracket(tune_controller, bracket)
            while action == self.PAUSE and bracket.current_trials() and bracket.cur_iter_done() and not bracket.finished():
                action = super()._process_bracket(tune_controller, bracket)
            return action

    scheduler = SynchronousHalving(time_attr=time_attr, max_t=max_t, reduction_factor=reduction_factor)
    scheduler._get_n0 = lambda s: trials  # one bracket for the whole sweep
    scheduler._get_r0 = lambda s: first_rung  # never "too small"
    return scheduler


def grace_tokens_unused(plan: Plan) -> str | None:
    """A line for a preset's grace tokens that the chosen scheduler cannot use (an explicit --grace-tokens is refused)."""
    if plan.grace_tokens is None or plan.scheduler in GRACE_TOKEN_SCHEDULERS or plan.scheduler == "fifo":
        return None
    return (f"note: the {plan.launch.preset} preset's {plan.grace_tokens:,} grace tokens do not apply to --scheduler {plan.scheduler} "
            f"(its brackets set their own rungs, and may compare trials before a phase change); asha and halving use them")


STORAGE_CHECKPOINTS = 2
"""Checkpoints a trial holds at once: its latest, and the next while it is written."""


def storage_footprint(plan: Plan) -> dict[str, float]:
    """Bytes the sweep writes, about: every snapshot, and STORAGE_CHECKPOINTS checkpoints a trial."""
    rows = plan.snapshot_plan()
    scale = plan.trial_count / len(plan.trials)  # the probe trials stand for the sweep's trials
    snapshots = sum(row["snapshots"] * row["bytes_each"] * row["trials"] for row in rows) * scale
    checkpoints = sum(STORAGE_CHECKPOINTS * row["checkpoint_bytes"] * row["trials"] for row in rows) * scale
    return {"snapshots": snapshots, "checkpoints": checkpoints, "total": snapshots + checkpoints}


def check_room(plan: Plan) -> None:
    """A local --storage without room for the sweep's footprint is refused before any trial runs."""
    if plan.storage.is_s3:
        return
    from .trajectory import human_bytes

    folder = Path(plan.storage.root)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    needed = storage_footprint(plan)
    if needed["total"] > free:
        raise ConfigError(
            f"--storage {plan.storage.uri} has {human_bytes(free)} free; the sweep needs about "
            f"{human_bytes(needed['total'])} (snapshots {human_bytes(needed['snapshots'])}, checkpoints "
            f"{human_bytes(needed['checkpoints'])}): free space, pick another --storage, or write fewer snapshots "
            "(--snapshots log:10 or none, --snapshot-dtype bfloat16)")


def snapshot_summary(plan: Plan) -> str:
    """One line: the sweep's storage footprint, and how many snapshots each trial writes and their bytes."""
    from .trajectory import human_bytes

    rows = plan.snapshot_plan()
    footprint = storage_footprint(plan)
    checkpoint = f"checkpoints {human_bytes(footprint['checkpoints'])} (the latest of each trial, and the next)"
    schedule = plan.fixed.get("snapshots", "log")
    if not any(row["snapshots"] for row in rows):
        return f"storage: about {human_bytes(footprint['total'])}: {checkpoint}; snapshots none (--snapshots none)"
    total = footprint["snapshots"]
    head = (f"storage: about {human_bytes(footprint['total'])}: {checkpoint}; "
            f"snapshots ({schedule}, {plan.fixed.get('snapshot_dtype', 'float32')}): ")
    if len(rows) <= 2:
        per_trial = "; ".join(f"{row['snapshots']} x {human_bytes(row['bytes_each'])} a trial ({row['shape']})"
                              for row in rows)
        return f"{head}{per_trial}; about {human_bytes(total)} for the sweep"
    counts = sorted(row["snapshots"] for row in rows)
    sizes = sorted(row["bytes_each"] for row in rows)
    trial_bytes = sorted(row["snapshots"] * row["bytes_each"] for row in rows)
    return (f"{head}{counts[0]}-{counts[-1]} a trial of {human_bytes(sizes[0])}-{human_bytes(sizes[-1])} each "
            f"({human_bytes(trial_bytes[0])}-{human_bytes(trial_bytes[-1])} a trial); "
            f"about {human_bytes(total)} for the sweep"
            + ("; --snapshot-dtype bfloat16 halves it, --snapshots log:10 or none cut it" if total > 50e9 else ""))


def launch_sweep(plan: Plan, callbacks: list = (), log_line: Callable[[str], None] = print, verbose: bool = False) -> Plan:
    """Preflight, start Ray, check the cluster, prepare data once, then run every trial to the end."""
    preflight(plan)
    init_ray(plan.launch.address, verbose)
    check_cluster(plan, plan.launch.address is None, log_line)
    log_line(
        f"experiment {plan.name}: {plan.trial_count} trials ({plan.launch.search} search, {plan.scheduler}), up to {plan.iterations} "
        f"iterations each, storage {plan.storage.uri}"
    )
    if plan.scheduler == "halving":
        unit = "tokens" if plan.halving_time_attr == "tokens_seen" else "iterations"
        log_line(f"halving: rungs at {', '.join(f'{at:,}' for at, _ in plan.halving_rungs)} {unit}, "
                 f"reached by {', '.join(str(count) for _, count in plan.halving_rungs)} trials")
    if note := grace_tokens_unused(plan):
        log_line(note)
    datasets = prepare_datasets(plan, log_line)
    log_line(snapshot_summary(plan))
    check_room(plan)
    from .trainable import FinalFailureCallback

    failures = FinalFailureCallback()
    tuner = build_tuner(plan, datasets, failures, list(callbacks), log_line=log_line)
    # Written only now that every check has passed: a failed launch leaves nothing behind.
    write_text(plan.storage, plan.storage.path(plan.name, SWEEP_FILE), json.dumps(plan.record(), indent=2))
    _fit(tuner, plan, failures, verbose)
    return plan


def _fit(tuner, plan: Plan, failures: FinalFailureCallback, verbose: bool = False) -> None:
    """Run the sweep under the driver's record; every way it can stop ends in one line and a record saying it.

    `tuner` is a Tuner, or a function making one (Tuner.restore reads the trials' files, and says what it misses):
    made here, so that Ray's own output (state dumps, trial tracebacks, Tune's hints) goes to the log file with the
    rest, unless `verbose`.
    """
    from .driver import DriverRecord, RayWatch, ray_output_to

    log_path = None if verbose else driver_log_path(plan.name)
    # the terminal, even while Ray's output is logged
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    with DriverRecord(plan.storage, plan.name) as driver, ray_output_to(log_path), RayWatch(driver, say):
        try:
            (tuner() if callable(tuner) else tuner).fit()
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            raise driver.interrupted(driver.signal or "SIGINT") from None
        except Exception as error:
            # With the disk full, Ray's own state, result and error files are cut short too (EOFError, bad JSON,
            # a truncated pickle): any failure once a trial reported storage_full is that, not a second problem.
            if failures.saw("storage_full") or is_storage_full(error):
                driver.close("interrupted", "storage full")
                raise StorageFullError(storage_full_message(plan)) from None
            if lost := ray_lost(error):
                driver.close("interrupted", f"Ray {lost}")
                details = f" (Ray's messages: {log_path})" if log_path else ""
                raise RayLostError(f"interrupted: the Ray {lost}; every trial's last checkpoint is kept; "
                                   f"run `sweep resume {plan.name}` once Ray is back{details}") from None
            first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            driver.close("failed", f"{type(error).__name__}: {first_line}")
            raise
        if failures.saw("storage_full"):
            driver.close("interrupted", "storage full")
            raise StorageFullError(storage_full_message(plan))
        if driver.signal:
            raise driver.interrupted(driver.signal)
        if lost := trials_lost_with_their_node(plan):
            driver.close("interrupted", f"Ray node lost under {lost} trials")
            raise RayLostError(f"interrupted: the Ray node under {lost} trials was lost (their workers died with it); "
                               f"every trial's last checkpoint is kept; run `sweep resume {plan.name}`")
        driver.close("finished")


class RayLostError(RuntimeError):
    """The Ray cluster (or the local Ray node) went away under the sweep; `sweep resume` continues it."""


def ray_lost(error: BaseException) -> str | None:
    """What was lost, when `error` says the Ray node or cluster went away under the driver."""
    text = f"{type(error).__name__}: {error}"
    for marker, what in (("raylet", "node lost: its raylet died"), ("GCS", "cluster lost: its GCS is unreachable"),
                         ("gcs_server", "cluster lost: its GCS is unreachable"), ("RaySystemError", "node lost"),
                         ("node has been marked dead", "node lost"), ("Failed to connect", "cluster unreachable")):
        if marker in text:
            return what
    return None


# What Ray's error says when a trial's worker went away with its node, not through the trial's own fault.
NODE_LOSS_MARKERS = ("actor is unavailable", "ActorUnavailableError", "RpcError", "raylet", "node died", "Node died",
                     "was marked dead", "ActorDiedError")


def trials_lost_with_their_node(plan: Plan) -> int:
    """How many trials ended in an error that says their worker or node went away (0: none)."""
    from .results import load_experiment

    experiment = load_experiment(plan.storage, plan.name)
    return sum(1 for t in experiment.trials
               if t.status == "ERROR" and t.error and any(m in t.error for m in NODE_LOSS_MARKERS))


def driver_log_path(name: str) -> Path:
    from model.data import cache_dir

    return cache_dir() / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def storage_full_message(plan: Plan) -> str:
    return (
        f"--storage {plan.storage.uri} is full: trials stopped with storage_full; free space and run `sweep resume "
        f"{plan.name}` (`sweep results {plan.name}` lists what finished; incomplete checkpoints are never used)"
    )


def load_plan(name: str | None, storage_uri: str | None) -> Plan:
    """The Plan of an experiment already in storage (default: the newest), from its sweep.json."""
    from .results import newest_experiment

    storage = open_storage(storage_uri)
    check_writable(storage)  # an unreachable or full storage fails here in seconds, before Ray starts
    name = check_name(name) if name else newest_experiment(storage)
    record_path = storage.path(name, SWEEP_FILE)
    if not exists(storage, record_path):
        raise ConfigError(f"no experiment {name!r} in {storage.uri}; `sweep list` shows the experiments there")
    try:
        record = json.loads(read_text(storage, record_path))
        launch = LaunchConfig(**(record["launch"] | {"grid": tuple(record["launch"]["grid"])}))
        distributions = {key: parse_distribution(key, text) for key, text in record.get("space", {}).items()}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{storage.uri_of(record_path)} is unreadable (cut short?); the experiment cannot be resumed") from None
    trials = probe_trials(record["axes"], distributions, record["fixed"])
    return Plan(launch, name, storage, record["axes"], record["fixed"], trials, distributions)


def resume_sweep(plan: Plan, callbacks: list = (), log_line: Callable[[str], None] = print, verbose: bool = False, address: str | None = None) -> Plan:
    """Restore an interrupted sweep: unfinished and errored trials go on from their checkpoints."""
    from .driver import TUNE_STATE_COPIES, restore_tune_state
    from .results import load_experiment

    experiment = load_experiment(plan.storage, plan.name)
    if not experiment.state_readable:
        restored = restore_tune_state(plan.storage, plan.name)
        if not restored:
            raise ConfigError(
                f"experiment {plan.name!r} cannot be resumed: Ray Tune's state file in storage was cut short "
                "(the storage filled up?) and no whole copy of it was kept; launch it again under a new --name"
            )
        log_line(f"{', '.join(restored)} was cut short: resuming from the copy the driver kept "
                 f"(the damaged file is kept in {TUNE_STATE_COPIES}/)")
        experiment = load_experiment(plan.storage, plan.name)
    if not experiment.state_found:
        raise ConfigError(
            f"experiment {plan.name!r} cannot be resumed: Ray Tune never saved its state (the launch stopped "
            "before any trial started); launch it again"
        )
    unfinished = [t for t in experiment.trials if t.tune_status != "TERMINATED"]
    not_started = max(0, plan.trial_count - len(experiment.trials))
    if experiment.trials and not unfinished and not not_started:
        from .names import display_state
        from .results import status_counts

        states = ", ".join(f"{n} {display_state(state)}" for state, n in sorted(status_counts(experiment).items()))
        raise ConfigError(f"experiment {plan.name!r} already finished: {len(experiment.trials)} trials ({states}); "
                          "nothing to resume")
    init_ray(address, verbose)
    check_cluster(plan, address is None, log_line)
    errored = sum(1 for t in unfinished if t.tune_status == "ERROR")
    parts = [f"{n} {what}" for n, what in ((len(unfinished) - errored, "interrupted"), (errored, "errored"),
                                          (not_started, "not started")) if n]
    replay = "; ASHA's rungs hold the results they held when it stopped" if plan.scheduler == "asha" else ""
    log_line(f"resuming {plan.name}: {len(unfinished) + not_started} of {plan.trial_count} trials unfinished "
             f"({', '.join(parts)}){replay}")
    datasets = prepare_datasets(plan, log_line)
    from .trainable import FinalFailureCallback

    failures = FinalFailureCallback()
    _fit(lambda: build_tuner(plan, datasets, failures, list(callbacks), restore=True), plan, failures, verbose)
    return plan
