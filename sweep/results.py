"""Read experiments back from storage alone: no trainable, no running Ray, local or S3.

One recursive listing of the experiment gives every trial folder and
checkpoint; trial states come from Tune's newest experiment_state file, and
metrics from each trial's last result.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs

from model.checkpoint import HISTORY_FILE, MANIFEST_FILE, check_complete, manifest_problem, read_config
from model.config import ConfigError
from model.metrics import HEAD_HISTORY_KEY

from .driver import DRIVER_FILE, stopped_reason
from .names import (
    FAILURE_MARKER,
    FINAL_FAILURES,
    INTERRUPTED,
    REPORTED_METRICS,
    SWEEP_FILE,
    UNFINISHED,
    metric_mode,
)
from .records import Experiment, TrialRecord
from .space import planned_iterations, trial_schedule
from .storage import Storage, check_name, describe_storage_error, exists, read_text
from .table import use_snapshot_formed_at
from .trajectory import (
    SNAPSHOTS_FOLDER,
    Snapshot,
    SnapshotAddress,
    fetch_snapshot,
    find_snapshot,
    run_folder_snapshots,
    snapshots_in_listing,
)

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")
# A checkpoint counts only when all of these landed, each at the size its manifest records:
# a half-uploaded one is never "latest".
REQUIRED_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "trainer_state.pt",
    "heads.json",
    "sample.txt",
    "heatmaps/patterns.json",
)
# What a trial's results show as its metrics: what the trainer reports and the final-failure
# markers, not the fields Ray adds to every result (time_this_iter_s, iterations_since_restore...).
PUBLIC_METRICS = frozenset(REPORTED_METRICS) | frozenset(FINAL_FAILURES)
# Run settings older experiments kept inside the trial config.
RUN_SETTING_KEYS = ("sweep_metric", "sweep_mode", "cpus_per_trial", "memory_per_trial_mb")


def list_experiments(storage: Storage) -> list[dict[str, Any]]:
    """Experiments in the storage, oldest first: name, created, trials."""
    try:
        entries = storage.filesystem.get_file_info(pafs.FileSelector(storage.root, allow_not_found=True))
    except OSError as error:
        raise ConfigError(describe_storage_error(storage, error)) from None
    found = []
    for entry in entries:
        if entry.type != pafs.FileType.Directory:
            continue
        record_path = f"{entry.path}/{SWEEP_FILE}"
        if exists(storage, record_path):
            try:
                record = json.loads(read_text(storage, record_path))
            except (json.JSONDecodeError, UnicodeDecodeError):
                log.warning("%s is unreadable (cut short?); listed without its details", record_path)
                record = {"metric": "unreadable sweep.json"}
            found.append(
                {
                    "name": entry.base_name,
                    "created": record.get("created", ""),
                    "trials": record.get("trials"),
                    "metric": record.get("metric"),
                }
            )
    return sorted(found, key=lambda e: (e["created"], e["name"]))


def newest_experiment(storage: Storage) -> str:
    experiments = list_experiments(storage)
    if not experiments:
        raise ConfigError(f"no experiments in {storage.uri}; run `sweep launch` or pass --storage")
    return experiments[-1]["name"]


def load_experiment(storage: Storage, name: str | None) -> Experiment:
    """Every trial of an experiment with its state, last metrics and complete checkpoints."""
    try:
        return _load_experiment(storage, name)
    except OSError as error:  # pyarrow's errors for an unreachable, refusing or vanished storage
        raise ConfigError(describe_storage_error(storage, error)) from None


def has_snapshots(experiment: Experiment) -> bool:
    return any(trial.snapshots for trial in experiment.trials)


def has_results(experiment: Experiment) -> bool:
    return any(trial.iterations for trial in experiment.trials)


def newest_experiment_with(storage: Storage, needs: Callable[[Experiment], bool], what: str) -> Experiment:
    """The newest experiment in the storage that has what a command needs (snapshots, results): a throwaway launched
    last without them is passed over, not read and refused."""
    names = [entry["name"] for entry in reversed(list_experiments(storage))]
    if not names:
        raise ConfigError(f"no experiments in {storage.uri}; run `sweep launch` or pass --storage")
    for name in names:
        experiment = load_experiment(storage, name)
        if needs(experiment):
            return experiment
    raise ConfigError(f"no experiment in {storage.uri} has {what} (newest: {names[0]}); launch one with them, or "
                      "pass NAME")


def _load_experiment(storage: Storage, name: str | None) -> Experiment:
    if name and "/" in name and Path(name).exists():
        raise ConfigError(f"{name} is a folder, not an experiment name: this command reads an experiment by name "
                          "(`sweep list`); read a checkpoint or `sweep train` run folder with sweep heads, generate "
                          "or export")
    name = check_name(name) if name else newest_experiment(storage)
    root = storage.path(name)
    if not exists(storage, f"{root}/{SWEEP_FILE}"):
        raise ConfigError(f"no experiment {name!r} in {storage.uri}; `sweep list` shows the experiments there")
    try:
        record = json.loads(read_text(storage, f"{root}/{SWEEP_FILE}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(
            f"{storage.uri_of(root)}/{SWEEP_FILE} is unreadable (cut short?); the experiment's record is lost"
        ) from None
    listing = storage.filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    sizes = {info.path[len(root) + 1 :]: info.size for info in listing if info.type == pafs.FileType.File}
    files = set(sizes)
    states, state_readable = _trial_states(storage, root, files)
    state_found = any(re.match(r"^experiment_state-.*\.json$", f) for f in files)
    cap = (record.get("launch") or {}).get("max_iterations")
    driver = _json_file(storage, f"{root}/{DRIVER_FILE}") if DRIVER_FILE in files else None
    stopped = stopped_reason(driver)
    damaged: list[str] = []
    trial_dirs = sorted({path.split("/")[0] for path in files if path.startswith("trial_") and "/" in path})
    trials = []
    for directory in trial_dirs:
        trial_files = {p[len(directory) + 1 :] for p in files if p.startswith(directory + "/")}
        state = states.get(directory, {})
        last = state.get("last_result") or {}
        if not last or not state_readable or state.get("status") == "ERROR":
            # The newest snapshot was cut short (a full disk), or Tune saved it before an errored trial's last
            # report (its storage_full): the trial's own result.json may be further along.
            own = _last_result(storage, f"{root}/{directory}", trial_files)
            last = own if own.get("training_iteration", 0) >= last.get("training_iteration", 0) else last
        failed = [reason for reason in FINAL_FAILURES if last.get(reason)]
        if failed:  # the failure's report carries a sentinel metric (inf): the trial's numbers are its last real report
            last = _last_real_result(storage, f"{root}/{directory}", trial_files, last) | {failed[0]: 1.0}
        checkpoints, checkpoint_files = _complete_checkpoints(storage, f"{root}/{directory}", trial_files, sizes)
        status = state.get("status") or (
            "TERMINATED" if last.get("done") else "ERROR" if "error.txt" in trial_files else "UNKNOWN"
        )
        if any(last.get(reason) or f"{FAILURE_MARKER}{reason}" in trial_files for reason in FINAL_FAILURES):
            status = "ERROR"  # it reported a failure that ends it, whatever an older snapshot says
        elif stopped and status in UNFINISHED:
            status = INTERRUPTED  # no driver runs it: it is not running, whatever Tune last wrote
        error = _error_reason(storage, f"{root}/{directory}", trial_files, last) if status == "ERROR" else None
        config = _public_config(last.get("config") or _params(storage, f"{root}/{directory}", trial_files, damaged))
        trials.append(
            TrialRecord(
                trial_id=last.get("trial_id") or state.get("trial_id") or directory.removeprefix("trial_"),
                tune_status=status,
                config=config,
                metrics={k: v for k, v in last.items() if k in PUBLIC_METRICS},
                iterations=int(last.get("training_iteration", 0)),
                path=f"{root}/{directory}",
                planned_iterations=_planned(config, cap),
                checkpoints=[f"{root}/{directory}/{c}" for c in checkpoints],
                files=checkpoint_files,
                error=error,
                snapshots=snapshots_in_listing(
                    f"{root}/{directory}", {p: sizes[f"{directory}/{p}"] for p in trial_files}, _tokens_per_step(config)
                ),
                # formed_at read at every snapshot while training; older trials read it at iterations
                formed_at_resolution=last.get("formed_at_resolution", "iteration"),
            )
        )
    return Experiment(name, storage, record, trials, state_readable, state_found, driver, damaged)


def _public_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RUN_SETTING_KEYS}


def _tokens_per_step(config: dict[str, Any]) -> int | None:
    try:
        return trial_schedule(config).tokens_per_step
    except (ConfigError, KeyError, TypeError):
        return None


def _planned(config: dict[str, Any], cap: int | None) -> int | None:
    try:
        planned = planned_iterations(config)
    except (ConfigError, KeyError, TypeError):
        return None
    return min(planned, cap or planned)


def _trial_states(storage: Storage, root: str, files: set[str]) -> tuple[dict[str, dict[str, Any]], bool]:
    """Trial folder -> {status, trial_id, last_result} from the newest readable experiment_state
    file, and whether the newest one was readable."""
    snapshots = sorted(f for f in files if re.match(r"^experiment_state-.*\.json$", f))
    document, newest_readable = None, True
    for snapshot in reversed(snapshots):
        try:  # a snapshot cut short (a full disk) is passed over for an older one
            document = json.loads(read_text(storage, f"{root}/{snapshot}"))
            break
        except (json.JSONDecodeError, UnicodeDecodeError):
            newest_readable = False
            log.warning("%s/%s is cut short; reading the trials' own files instead", root, snapshot)
    if document is None:
        return {}, newest_readable
    states = {}
    for trial_json, metadata_json in document.get("trial_data", []):
        trial, metadata = json.loads(trial_json), json.loads(metadata_json)
        directory = trial.get("relative_logdir") or trial.get("custom_dirname")
        states[directory] = {
            "status": trial.get("status"),
            "trial_id": trial.get("trial_id"),
            "last_result": metadata.get("last_result") or {},
            "metadata_json": metadata_json,  # decoded only where the checkpoint Tune restores from is needed
        }
    return states, newest_readable


def restore_points(storage: Storage, name: str) -> dict[str, str]:
    """Trial folder -> the checkpoint Tune's newest state restores it from, for every trial Tune would go on with (not
    a finished one). That is the latest checkpoint its checkpoint manager holds; where that cannot be read, the one
    its last result names, or, when that result carried none (a final failure's report), the last one its result.json
    names up to that result."""
    root = storage.path(name)
    listing = storage.filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    files = {info.path[len(root) + 1 :] for info in listing if info.type == pafs.FileType.File}
    states, _ = _trial_states(storage, root, files)
    points = {}
    for directory, state in states.items():
        if not directory or state["status"] == "TERMINATED":
            continue
        last = state["last_result"]
        named = _tune_checkpoint_name(state["metadata_json"]) or last.get("checkpoint_dir_name")
        if not named and f"{directory}/result.json" in files:
            reported = _result_lines(read_text(storage, f"{root}/{directory}/result.json"))
            upto = last.get("training_iteration", 0)
            named = next((line["checkpoint_dir_name"] for line in reversed(reported)
                          if line.get("checkpoint_dir_name") and line.get("training_iteration", 0) <= upto), None)
        if named:
            points[directory] = named
    return points


def _tune_checkpoint_name(metadata_json: str) -> str | None:
    """The folder name of the latest checkpoint in a trial's saved run metadata: the one Tune restores it from."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata  # Tune's own reader of what it wrote

    try:
        manager = _TrainingRunMetadata.from_json_state(metadata_json).checkpoint_manager
        latest = manager.latest_checkpoint_result if manager else None
    except Exception as error:  # noqa: BLE001 (a state another Ray version wrote: fall back on the results)
        log.debug("cannot read the trial's checkpoint manager: %s", error)
        return None
    return latest.checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if latest and latest.checkpoint else None


def _last_result(storage: Storage, trial_path: str, trial_files: set[str]) -> dict[str, Any]:
    if "result.json" not in trial_files:
        return {}
    results = _result_lines(read_text(storage, f"{trial_path}/result.json"))
    return results[-1] if results else {}


def _last_real_result(
    storage: Storage, trial_path: str, trial_files: set[str], failure: dict[str, Any]
) -> dict[str, Any]:
    """The last result before a final failure's report (which reports the sweep's metric as inf); its config and ids
    kept; {} when the trial failed before reporting anything."""
    lines = _result_lines(read_text(storage, f"{trial_path}/result.json")) if "result.json" in trial_files else []
    real = [line for line in lines if not any(line.get(reason) for reason in FINAL_FAILURES)]
    kept = {k: failure[k] for k in ("trial_id", "config") if k in failure}
    return kept | (real[-1] if real else {"training_iteration": 0})


def _result_lines(text: str) -> list[dict[str, Any]]:
    """The results in a result.json, passing over blank lines and a last line cut short."""
    results = []
    for line in text.splitlines():
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return results


def _params(storage: Storage, trial_path: str, trial_files: set[str], damaged: list[str]) -> dict[str, Any]:
    """The trial's params.json; an empty or cut-short one (a full disk) is noted in `damaged` and read as {}."""
    if "params.json" not in trial_files:
        return {}
    config = _json_file(storage, f"{trial_path}/params.json")
    if config is None:
        damaged.append(f"{trial_path.rsplit('/', 1)[-1]}/params.json")
    return config or {}


def _json_file(storage: Storage, path: str) -> dict[str, Any] | None:
    """A small JSON file, or None when it is empty or cut short."""
    try:
        value = json.loads(read_text(storage, path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _complete_checkpoints(
    storage: Storage, trial_path: str, trial_files: set[str], sizes: dict[str, int]
) -> tuple[list[str], dict[str, list[str]]]:
    """Checkpoints holding every required file, each at the size its manifest records."""
    names = sorted({p.split("/")[0] for p in trial_files if CHECKPOINT_PATTERN.match(p.split("/")[0]) and "/" in p})
    trial_dir = trial_path.rsplit("/", 1)[-1]
    complete, contents = [], {}
    for name in names:
        inside = sorted(p[len(name) + 1 :] for p in trial_files if p.startswith(name + "/"))
        if not all(required in inside for required in REQUIRED_FILES):
            continue
        manifest = read_text(storage, f"{trial_path}/{name}/{MANIFEST_FILE}") if MANIFEST_FILE in inside else None
        if manifest_problem(manifest, {f: sizes[f"{trial_dir}/{name}/{f}"] for f in inside}) is None:
            complete.append(name)
            contents[name] = inside
    return complete, contents


def _error_reason(storage: Storage, trial_path: str, trial_files: set[str], last: dict[str, Any]) -> str:
    text = read_text(storage, f"{trial_path}/error.txt") if "error.txt" in trial_files else ""
    for marker in FINAL_FAILURES:
        if marker in text or last.get(marker) or f"{FAILURE_MARKER}{marker}" in trial_files:
            return marker
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "error"


def _checkpoint_history(storage: Storage, trial: TrialRecord) -> list[dict[str, Any]]:
    """The history rows in the trial's newest complete checkpoint ([] if it holds none)."""
    if not trial.checkpoints:
        return []
    newest = max(trial.checkpoints)
    if HISTORY_FILE not in trial.files.get(newest.rsplit("/", 1)[-1], []):
        return []
    return json.loads(read_text(storage, f"{newest}/{HISTORY_FILE}"))


def trial_history(storage: Storage, trial: TrialRecord) -> list[dict[str, Any]]:
    """Every reported result of a trial, in order, one per iteration: the last one reported. A resumed trial reports
    again what Tune's saved state had not recorded (a driver killed between a report and the state's save)."""
    path = f"{trial.path}/result.json"
    if not exists(storage, path):
        return []
    by_iteration = {}
    for line in _result_lines(read_text(storage, path)):
        by_iteration[line.get("training_iteration")] = line
    return list(by_iteration.values())


def reported_metrics(experiment: Experiment) -> list[str]:
    names = set()
    for trial in experiment.trials:
        names.update(k for k, v in trial.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return sorted(names)


def best_trials(experiment: Experiment, metric: str, mode: str | None = None, top: int = 1) -> list[TrialRecord]:
    """Trials ranked by their last reported `metric` (mode None: the metric's own direction);
    diverged and unreported trials are left out."""
    mode = mode or metric_mode(metric)
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode must be min or max, got {mode!r}")
    if metric not in reported_metrics(experiment):
        known = ", ".join(reported_metrics(experiment)) or "none yet"
        if metric not in REPORTED_METRICS:
            nearest = difflib.get_close_matches(metric, REPORTED_METRICS, n=1)
            hint = f" (did you mean {nearest[0]}?)" if nearest else ""
            raise ConfigError(f"--metric {metric!r} is not a metric{hint}; metrics: {', '.join(REPORTED_METRICS)}")
        raise ConfigError(f"--metric {metric!r} was never reported in {experiment.name}; reported: {known}")
    ranked = [
        t for t in experiment.trials
        if isinstance(t.metrics.get(metric), (int, float)) and math.isfinite(t.metrics[metric])
    ]
    ranked.sort(key=lambda t: t.metrics[metric], reverse=mode == "max")
    return ranked[:top]


def best_document(experiment: Experiment, metric: str, mode: str | None = None, top: int = 1) -> dict[str, Any]:
    """The `sweep best --json` document: the best trials with config, metrics and artifacts."""
    mode = mode or metric_mode(metric)
    storage = experiment.storage
    use_snapshot_formed_at(experiment)  # as every reader shows it: snapshot resolution where snapshots were scored
    trials = []
    ranked = best_trials(experiment, metric, mode, len(experiment.trials))
    for trial in ranked[:top]:
        checkpoint = trial.checkpoint
        heatmaps = []
        if checkpoint:
            inside = trial.files[checkpoint.rsplit("/", 1)[1]]
            heatmaps = [
                storage.uri_of(f"{checkpoint}/{p}") for p in inside if p.startswith("heatmaps/") and p.endswith(".png")
            ]
        trials.append({
            "trial_id": trial.trial_id,
            "status": trial.status,
            "config": trial.config,
            "metrics": trial.metrics,
            "iterations": trial.iterations,
            "planned_iterations": trial.planned_iterations,
            "formed_at_resolution": trial.formed_at_resolution,
            "checkpoint": storage.uri_of(checkpoint) if checkpoint else None,
            "heatmaps": heatmaps,
        })
    unranked = [t.trial_id for t in experiment.trials if t not in ranked]
    return {"experiment": experiment.name, "storage": storage.uri, "metric": metric, "mode": mode, "trials": trials,
            "unranked": unranked, "formed_at_resolution": experiment.formed_at_resolution}


def status_counts(experiment: Experiment) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in experiment.trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    return counts


def choose_trial(experiment: Experiment, trial: str) -> TrialRecord:
    """`best` (by the sweep's own metric) or a trial id."""
    if trial == "best":
        ranked = best_trials(experiment, experiment.record["metric"], experiment.record.get("mode"), 1)
        if not ranked:
            raise ConfigError(f"{experiment.name} has no trial with a finite {experiment.record['metric']} yet")
        return ranked[0]
    for record in experiment.trials:
        if trial in (record.trial_id, record.path.rsplit("/", 1)[1]):
            return record
    raise ConfigError(
        f"no trial {trial!r} in {experiment.name}; trials: {', '.join(t.trial_id for t in experiment.trials)}"
    )


def names_a_path(source: str | None) -> bool:
    """Whether SOURCE is a folder or file rather than an experiment name (names hold no '/')."""
    return bool(source) and ("/" in source or Path(source).exists())


def local_checkpoint(
    source: str | None, trial: str, storage: Storage, workdir: str, at: SnapshotAddress | None = None
) -> tuple[Path, str]:
    """A local folder holding the checkpoint SOURCE names, and a title for it.

    SOURCE is a checkpoint folder (taken as is), a `sweep train` run folder (its
    checkpoint/), or an experiment name (default: the newest), whose `trial` is fetched.
    With `at`, the run's snapshot at that step or token count instead (a run folder or an experiment).
    """
    if names_a_path(source):
        path = Path(source)
        if at is not None:
            run = path.parent if path.name == "checkpoint" else path
            if not (run / SNAPSHOTS_FOLDER).is_dir():
                raise ConfigError(
                    f"{source} holds no snapshots/: --step and --tokens-seen read a `sweep train` run folder "
                    "or an experiment"
                )
            snapshot = find_snapshot(run_folder_snapshots(run), at, str(run))
            return fetch_snapshot(None, snapshot, Path(workdir)), f"{run} {_snapshot_title(snapshot)}"
        if path.is_dir() and (path / "checkpoint").is_dir() and not (path / "config.json").exists():
            path = path / "checkpoint"  # a `sweep train` run folder
        if not path.exists():
            raise ConfigError(f"{source} does not exist; SOURCE is a checkpoint folder or an experiment name")
        read_config(path)  # one clear line when it is a file, not a checkpoint, or an incomplete one
        return path, str(path)
    experiment = load_experiment(storage, source)
    record = choose_trial(experiment, trial)
    if at is not None:
        snapshot = find_snapshot(record.snapshots, at, f"trial {record.trial_id} of {experiment.name}")
        title = f"{experiment.name} trial {record.trial_id} {_snapshot_title(snapshot)}"
        return fetch_snapshot(storage, snapshot, Path(workdir)), title
    if record.checkpoint is None:
        raise ConfigError(f"trial {record.trial_id} of {experiment.name} has no complete checkpoint yet")
    title = f"{experiment.name} trial {record.trial_id} ({record.checkpoint.rsplit('/', 1)[1]})"
    if not storage.is_s3:
        return Path(record.checkpoint), title
    target = Path(workdir) / "checkpoint"
    pafs.copy_files(
        record.checkpoint,
        str(target),
        source_filesystem=storage.filesystem,
        destination_filesystem=pafs.LocalFileSystem(),
    )
    check_complete(target)  # the download itself may have been cut short
    return target, title


def _snapshot_title(snapshot: Snapshot) -> str:
    return f"(snapshot at step {snapshot.step:,}, {snapshot.tokens_seen:,} tokens)"


def results_rows(experiment: Experiment) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of `sweep results --csv`: a row per trial with its state, config and last metrics.

    Config columns keep their names; a metric whose name is also a config key (lr) is `metric/lr`.
    """
    config_keys = sorted({k for t in experiment.trials for k in t.config})
    formed_by = ("induction_formed_by", "prev_token_formed_by")  # what a snapshot-resolution formed_at was read from
    metric_keys = [m for m in (*REPORTED_METRICS, *formed_by, *FINAL_FAILURES)
                   if any(m in t.metrics for t in experiment.trials)]

    def column(metric: str) -> str:
        return f"metric/{metric}" if metric in config_keys else metric

    rows = [
        {
            "trial_id": t.trial_id,
            "status": t.status,
            "iterations": t.iterations,
            "planned_iterations": t.planned_iterations,
            "error": t.error or "",
            **t.config,
            **{column(k): v for k, v in t.metrics.items()},
        }
        for t in experiment.trials
    ]
    columns = [
        "trial_id",
        "status",
        "iterations",
        "planned_iterations",
        "error",
        *config_keys,
        *map(column, metric_keys),
    ]
    return columns, rows


def head_history(source: str | None, trial: str, storage: Storage) -> tuple[str, list[dict[str, Any]]]:
    """(title, rows) of every head's scores at every iteration, from storage alone.

    SOURCE is a `sweep train` run folder (or its checkpoint/), read from its
    metrics.jsonl, or an experiment name (default: the newest) whose trial's
    result.json holds the history. Each row: iteration, tokens_seen, test_loss,
    icl_score (read beside the scores: a phase change moves all of them at once),
    heads ("layer.head" -> scores).
    """
    saved: list[dict[str, Any]] = []  # history rows a checkpoint carries
    if names_a_path(source):
        run = Path(source)
        if not (run / "metrics.jsonl").is_file() and (run.parent / "metrics.jsonl").is_file():
            run = run.parent  # the checkpoint/ folder of a run
        if not (run / "metrics.jsonl").is_file():
            raise ConfigError(
                f"{source} holds no metrics.jsonl: --history reads a `sweep train` run folder or an experiment"
            )
        lines, title = _result_lines((run / "metrics.jsonl").read_text()), str(run)
    else:
        experiment = load_experiment(storage, source)
        record = choose_trial(experiment, trial)
        # The newest checkpoint's own history fills the gaps: an iteration whose report died with its worker is there.
        saved, lines, title = (
            _checkpoint_history(storage, record),
            trial_history(storage, record),
            f"{experiment.name} trial {record.trial_id}",
        )
    reported = [
        {"iteration": line.get("training_iteration", line.get("iteration")), "heads": line[HEAD_HISTORY_KEY],
         **{key: line.get(key) for key in ("tokens_seen", "test_loss", "icl_score")}}
        for line in lines if isinstance(line.get(HEAD_HISTORY_KEY), dict)
    ]
    # A trial restored from an older checkpoint reports the iterations after it again: the later report is
    # the one its training went on from, so each iteration keeps its last row, a reported one over a saved one.
    by_iteration = {row["iteration"]: row for row in saved + reported}
    rows = [by_iteration[iteration] for iteration in sorted(by_iteration)]
    if not rows:
        raise ConfigError(f"{title} has no head history: it was trained by a version that kept none")
    return title, rows
