"""Launch and resume a Ray Tune sweep from its Plan (sweep.plan): start Ray, check the cluster can run a trial at all,
prepare the data once, and only then write the experiment's record and hand the plan to Tune; every way the sweep can
stop ends in one line and a record saying it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs
from ray import tune

from model.config import ConfigError
from model.paths import cache_dir
from model.tokenizers import vocabulary_size

from .cluster import check_cluster, init_ray
from .datasets import prepare_datasets
from .driver import (
    TUNE_STATE_COPIES,
    DriverRecord,
    RayWatch,
    damaged_tune_state,
    ray_output_to,
    restore_tune_state,
)
from .names import SWEEP_FILE, display_state
from .plan import Plan, check_room, grace_tokens_unused, preflight, snapshot_summary
from .results import load_experiment, restore_points, status_counts
from .schedulers import make_scheduler, make_search
from .space import data_key
from .storage import Storage, is_storage_full, write_text
from .threads import SpareThreads
from .trainable import FinalFailureCallback, train_trial

log = logging.getLogger(__name__)


class StorageFullError(ConfigError):
    """The storage filled up during the sweep."""


def build_tuner(
    plan: Plan, datasets: dict[str, Any], failures: FinalFailureCallback, callbacks: list, restore: bool = False,
    log_line: Callable[[str], None] | None = None,
):
    launch = plan.launch
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, datasets=datasets, settings=plan.settings),
        {"cpu": launch.cpus_per_trial, "gpu": launch.gpus_per_trial, "memory": int(launch.memory_per_trial_mb * 2**20)},
    )
    callbacks = [failures, SpareThreads(plan.name, plan.settings.threads, plan.trial_count, log_line), *callbacks]
    if launch.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback  # wandb is an extra: imported only when asked for

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
            metric=launch.metric,
            mode=launch.mode,
            scheduler=make_scheduler(plan),
            search_alg=search_alg,
            num_samples=launch.num_samples,
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


def launch_sweep(
    plan: Plan, callbacks: list = (), log_line: Callable[[str], None] = print, verbose: bool = False
) -> Plan:
    """Preflight, start Ray, check the cluster, prepare data once, then run every trial to the end."""
    preflight(plan)
    init_ray(plan.launch.address, verbose)
    check_cluster(plan, plan.launch.address is None, log_line)
    log_line(
        f"experiment {plan.name}: {plan.trial_count} trials ({plan.launch.search} search, {plan.scheduler}), up to "
        f"{plan.iterations} "
        f"iterations each, storage {plan.storage.uri}"
    )
    if plan.scheduler == "halving":
        unit = "tokens" if plan.halving_time_attr == "tokens_seen" else "iterations"
        log_line(f"halving: rungs at {', '.join(f'{at:,}' for at, _ in plan.halving_rungs)} {unit}, "
                 f"reached by {', '.join(str(count) for _, count in plan.halving_rungs)} trials")
    if note := grace_tokens_unused(plan):
        log_line(note)
    # the footprint before any data is read: the vocabularies are known from the tokenizers
    plan.vocab_sizes.update({data_key(t): vocabulary_size(t["tokenizer"]) for t in plan.trials})
    log_line(snapshot_summary(plan))
    check_room(plan)
    datasets = prepare_datasets(plan, log_line)
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
    experiment = load_experiment(plan.storage, plan.name)
    return sum(1 for t in experiment.trials
               if t.status == "ERROR" and t.error and any(m in t.error for m in NODE_LOSS_MARKERS))


def driver_log_path(name: str) -> Path:
    return cache_dir() / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def storage_full_message(plan: Plan) -> str:
    return (
        f"--storage {plan.storage.uri} is full: trials stopped with storage_full; free space and run `sweep resume "
        f"{plan.name}` (`sweep results {plan.name}` lists what finished; incomplete checkpoints are never used)"
    )


def stand_in_for_missing_checkpoints(storage: Storage, name: str) -> list[str]:
    """Tune restores a trial from the checkpoint its state names and refuses one that no longer exists, which a kept
    copy of its state (after a full disk) or a state saved just before Tune rotated that checkpoint away may name.
    An empty folder stands in for each: the trial finds it incomplete and retraces from its newest whole checkpoint
    before it, or from the start (sweep.trainable.resume_point). Returns the stand-ins made."""
    made = []
    for directory, checkpoint in restore_points(storage, name).items():
        path = f"{storage.path(name)}/{directory}/{checkpoint}"
        if storage.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            storage.filesystem.create_dir(path)
            made.append(f"{directory}/{checkpoint}")
    return made


def resume_sweep(
    plan: Plan,
    callbacks: list = (),
    log_line: Callable[[str], None] = print,
    verbose: bool = False,
    address: str | None = None,
) -> Plan:
    """Restore an interrupted sweep: unfinished and errored trials go on from their checkpoints."""
    experiment = load_experiment(plan.storage, plan.name)
    # Tune restores a state file it cannot read by starting the sweep over: every file must read whole first.
    if damaged := damaged_tune_state(plan.storage, plan.name):
        restored = restore_tune_state(plan.storage, plan.name)
        if not restored:
            raise ConfigError(
                f"experiment {plan.name!r} cannot be resumed: Ray Tune's state in storage ({', '.join(damaged)}) was "
                "cut short (the storage filled up?) and no whole copy of it was kept; launch it again under a new "
                "--name"
            )
        log_line(f"{', '.join(restored)} {'was' if len(restored) == 1 else 'were'} cut short: resuming from the "
                 f"copies the driver kept (the damaged files are kept in {TUNE_STATE_COPIES}/)")
        experiment = load_experiment(plan.storage, plan.name)
    if not experiment.state_found:
        raise ConfigError(
            f"experiment {plan.name!r} cannot be resumed: Ray Tune never saved its state (the launch stopped "
            "before any trial started); launch it again"
        )
    unfinished = [t for t in experiment.trials if t.tune_status != "TERMINATED"]
    not_started = max(0, plan.trial_count - len(experiment.trials))
    if experiment.trials and not unfinished and not not_started:
        states = ", ".join(f"{n} {display_state(state)}" for state, n in sorted(status_counts(experiment).items()))
        raise ConfigError(f"experiment {plan.name!r} already finished: {len(experiment.trials)} trials ({states}); "
                          "nothing to resume")
    stood_in = stand_in_for_missing_checkpoints(plan.storage, plan.name)
    if stood_in:
        log_line(f"checkpoints Tune's state names are gone ({', '.join(stood_in)}): those trials retrace from their "
                 "newest whole checkpoint before it, or from the start")
    init_ray(address, verbose)
    check_cluster(plan, address is None, log_line)
    errored = sum(1 for t in unfinished if t.tune_status == "ERROR")
    parts = [f"{n} {what}" for n, what in ((len(unfinished) - errored, "interrupted"), (errored, "errored"),
                                          (not_started, "not started")) if n]
    replay = "; ASHA's rungs hold the results they held when it stopped" if plan.scheduler == "asha" else ""
    log_line(f"resuming {plan.name}: {len(unfinished) + not_started} of {plan.trial_count} trials unfinished "
             f"({', '.join(parts)}){replay}")
    datasets = prepare_datasets(plan, log_line)
    failures = FinalFailureCallback()
    _fit(lambda: build_tuner(plan, datasets, failures, list(callbacks), restore=True), plan, failures, verbose)
    return plan
