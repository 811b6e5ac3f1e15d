"""The plan of a sweep: its launch settings, the grid's trials validated, the storage they need, and what each
trial is told.

`plan_sweep` (launch) and `load_plan` (resume) make the one Plan of a sweep: everything checked that can be
checked without Ray. sweep.runner then starts Ray, checks the cluster can run a trial at all, and only then
writes the experiment's record and hands the plan to Tune.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from model.config import ConfigError
from model.data import check_data

from .names import GRACE_TOKEN_SCHEDULERS, REPORTED_METRICS, SCHEDULERS, SWEEP_FILE, metric_mode
from .results import newest_experiment
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
from .storage import Storage, check_name, check_writable, exists, open_storage, read_text
from .trajectory import human_bytes, trial_snapshot_plan


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
    """Grid search: replicates of every grid point, each with its own seed (as --seeds); random: draws a point."""
    seeds: int | None = None
    """Replicates of every grid point with seeds seed, seed+1, ... (a `seed` axis); None: the preset's (1 if none)."""
    metric: str = "test_loss"
    mode: str | None = None
    """min or max; None: the metric's natural direction (losses min, scores and accuracy max)."""
    early_stopping: bool | None = None
    """ASHA on or off; None: the preset's choice."""
    search: str = "grid"
    """grid (every combination), random (num_samples draws of the ranges per grid point) or optuna (TPE, num_samples
    trials)."""
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
        if self.seeds is not None and self.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {self.seeds}")


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
            iteration_tokens = min(
                trial_schedule(t).steps_per_iteration * trial_schedule(t).tokens_per_step for t in self.trials
            )
            return halving_rungs(
                self.trial_count,
                self.grace_tokens,
                self.max_tokens_seen,
                self.launch.reduction_factor,
                iteration_tokens,
            )
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
        return trial_snapshot_plan(self.trials, self.vocab_sizes)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "launch": asdict(self.launch),
            "axes": self.axes,
            "fixed": self.fixed,
            "space": {key: d.text for key, d in self.distributions.items()},
            "search": self.launch.search,
            "metric": self.launch.metric,
            "mode": self.launch.mode,
            "early_stopping": self.early_stopping,
            "scheduler": self.scheduler,
            "grace_tokens": self.grace_tokens if self.scheduler in GRACE_TOKEN_SCHEDULERS else None,
            "trials": self.trial_count,
            "max_iterations": self.launch.max_iterations,
            "snapshots": {
                "schedule": self.fixed.get("snapshots", "log"),
                "dtype": self.fixed.get("snapshot_dtype", "float32"),
                "per_trial": self.snapshot_plan(),
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def default_name(dataset: str, preset: str) -> str:
    stem = Path(dataset).stem if os.sep in dataset or Path(dataset).suffix else dataset
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip("-.") or "data"
    return f"{stem}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


REPEAT_TOKENIZER = "--tokenizer does not apply to the repeat task: it has its own vocabulary of random tokens"


def replicates_as_seeds(launch: LaunchConfig, overrides: dict[str, Any]) -> LaunchConfig:
    """The launch with its replicates as a number of seeds: a grid's --num-samples repeats are seeds too (the same
    seed would train the same trial again), and a preset's seeds apply unless --seeds is given."""
    preset = PRESETS.get(launch.preset)
    if launch.seeds is not None and launch.num_samples > 1 and launch.search == "grid":
        raise ConfigError(f"--seeds {launch.seeds} and --num-samples {launch.num_samples} both repeat the grid's "
                          "points with new seeds: give one")
    if launch.search == "grid" and launch.num_samples > 1:
        launch = replace(launch, seeds=launch.num_samples, num_samples=1)
    if launch.seeds is not None and launch.seeds > 1 and launch.search != "grid":
        raise ConfigError(f"--seeds replicates the points of a grid; --search {launch.search} draws a new point each "
                          "trial: use --search grid")
    if launch.seeds is None:
        launch = replace(launch, seeds=preset.seeds if preset and launch.search == "grid" else 1)
    if launch.seeds > 1 and "seed" in overrides and not (isinstance(overrides["seed"], list)
                                                          and len(overrides["seed"]) == 1):
        raise ConfigError(f"--grid seed=... and {launch.seeds} seeds a grid point both set the seeds: give --seeds N "
                          "(with --grid seed=FIRST to start elsewhere than 0) or the --grid list")
    return launch


def plan_sweep(launch: LaunchConfig) -> Plan:
    """Validate everything that can be checked without Ray; nothing is written yet."""
    preset = PRESETS.get(launch.preset)
    dataset = launch.dataset or (preset.dataset if preset else None)
    if not dataset:
        raise ConfigError(
            f"DATASET is missing: preset {launch.preset!r} needs one (imdb, wikitext-2, repeat or a path)"
        )
    if launch.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--wandb needs the wandb package: pip install 'circuit-sweep[wandb]'") from None
    base = {"dataset": dataset, **launch.data}
    if launch.gpus_per_trial == 0:
        base["device"] = "cpu"
    overrides = parse_grid(launch.grid)
    launch = replicates_as_seeds(launch, overrides)
    axes, distributions, fixed = build_grid(launch.preset, overrides, base)
    if launch.seeds and launch.seeds > 1:
        first = fixed.pop("seed")
        axes["seed"] = list(range(first, first + launch.seeds))
    if dataset == "repeat":  # its own vocabulary: the trials record repeat:N, and a --tokenizer is refused
        if "tokenizer" in launch.data or "tokenizer" in overrides:
            raise ConfigError(REPEAT_TOKENIZER)
        fixed["tokenizer"] = data_config(fixed).tokenizer
    if distributions and launch.search == "grid":
        first = next(iter(distributions.values()))
        raise ConfigError(
            f"--grid {first.key}={first.text} is a range to sample: add --search random or --search optuna (and "
            "--num-samples N)"
        )
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
        raise ConfigError(
            f"--grace-tokens applies to --scheduler asha or halving; {plan.scheduler}'s rungs are set by "
            "--reduction-factor"
        )
    if plan.scheduler in GRACE_TOKEN_SCHEDULERS and plan.grace_tokens is not None:
        if plan.grace_tokens >= plan.max_tokens_seen:
            raise ConfigError(
                f"--grace-tokens {plan.grace_tokens:,} is not below the {plan.max_tokens_seen:,} tokens a trial "
                "trains; lower it"
            )
    elif plan.early_stopping and launch.grace_period > plan.iterations:
        raise ConfigError(
            f"--grace-period {launch.grace_period} is more than the {plan.iterations} iterations a trial makes; lower "
            "it"
        )
    return plan


def preflight(plan: Plan) -> None:
    """Storage reachable and writable, and the experiment name free."""
    check_writable(plan.storage)
    if exists(plan.storage, plan.storage.path(plan.name)):
        raise ConfigError(
            f"experiment {plan.name!r} already exists in {plan.storage.uri}; "
            f"use `sweep resume {plan.name}` or choose another --name"
        )


def halving_rungs(
    trials: int, first_rung: int, max_t: int, reduction_factor: int, step: int = 1
) -> list[tuple[int, int]]:
    """Synchronous halving's rungs as (where, trials that train to it): first_rung x rf^k, the last one at
    max_t, keeping ceil(n / rf) trials at each, as Tune's HyperBand bracket does. A rung less than one
    step (an iteration's tokens) before max_t becomes max_t: it would compare the same results."""
    rungs = [(first_rung, trials)]
    while rungs[-1][0] < max_t:
        at, count = rungs[-1]
        following = at * reduction_factor if max_t - at * reduction_factor >= step else max_t
        rungs.append((following, math.ceil(count / reduction_factor)))
    return rungs


def grace_tokens_unused(plan: Plan) -> str | None:
    """A line for a preset's grace tokens that the chosen scheduler cannot use (an explicit --grace-tokens is
    refused)."""
    if plan.grace_tokens is None or plan.scheduler in GRACE_TOKEN_SCHEDULERS or plan.scheduler == "fifo":
        return None
    return (
        f"note: the {plan.launch.preset} preset's {plan.grace_tokens:,} grace tokens do not apply to --scheduler "
        f"{plan.scheduler} "
        f"(its brackets set their own rungs, and may compare trials before a phase change); asha and halving use them"
    )


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
    folder = Path(plan.storage.root)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    needed = storage_footprint(plan)
    if needed["total"] > free:
        raise ConfigError(
            f"--storage {plan.storage.uri} has {human_bytes(free)} free; the sweep needs about "
            f"{human_bytes(needed['total'])} (snapshots {human_bytes(needed['snapshots'])}, checkpoints "
            f"{human_bytes(needed['checkpoints'])}): free space, pick another --storage, or {storage_advice(plan)}")


def storage_advice(plan: Plan) -> str:
    """What would shrink the sweep's footprint, naming only settings that would change it."""
    schedule = plan.fixed.get("snapshots", "log")
    options = []
    if schedule != "none":
        options.append("fewer snapshots (--snapshots log:N with a smaller N than "
                       f"{schedule.partition(':')[2] or 30}, or none)" if schedule.startswith("log") else
                       "fewer snapshots (--snapshots log:10 or none)")
    if plan.fixed.get("snapshot_dtype", "float32") != "bfloat16":
        options.append("--snapshot-dtype bfloat16 (halves the snapshots)")
    options.append("fewer trials (--grid with fewer values: every trial keeps its latest checkpoint)")
    return ", ".join(options)


def snapshot_summary(plan: Plan) -> str:
    """One line: the sweep's storage footprint, and how many snapshots each trial writes and their bytes."""
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
            + (f"; to shrink it: {storage_advice(plan)}" if total > 50e9 else ""))


def load_plan(name: str | None, storage_uri: str | None) -> Plan:
    """The Plan of an experiment already in storage (default: the newest), from its sweep.json."""
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
        raise ConfigError(
            f"{storage.uri_of(record_path)} is unreadable (cut short?); the experiment cannot be resumed"
        ) from None
    trials = probe_trials(record["axes"], distributions, record["fixed"])
    return Plan(launch, name, storage, record["axes"], record["fixed"], trials, distributions)
