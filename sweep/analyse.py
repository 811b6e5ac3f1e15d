"""`sweep analyse`: model/'s measures mapped over every (trial, snapshot) of an experiment as Ray tasks.

Results go to one columnar table per experiment, `<experiment>/analysis/`: Parquet
part files with the columns of SCHEMA, each written whole by one flush of one
run, with the measures' definitions and the probe in its schema metadata. A
reader opens every part (a handful per analyse run, never one per snapshot).
A (trial, step, analysis, version) already in the table is never computed
again, so a second run computes nothing, an interrupted run goes on where it
stopped, and a measure added later backfills into a finished sweep.

torch, Ray and model.measures are imported inside the functions that measure: planning and reading the table need
neither, and `sweep atlas` reads without them.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from model.config import ConfigError

from .records import Experiment, TrialRecord
from .space import trial_configs
from .storage import open_storage, write_bytes
from .table import SCHEMA, done_keys, read_table, table_path
from .trajectory import Snapshot

FLUSH_SECONDS = 20.0
"""A run writes what it has computed at least this often: an interruption loses less than this."""


@dataclass(frozen=True)
class Task:
    """One snapshot of one trial and the measures it still lacks."""

    trial: TrialRecord
    snapshot: Snapshot
    measures: tuple[str, ...]


def plan_tasks(experiment: Experiment, measures: tuple[str, ...], trials: list[TrialRecord]) -> list[Task]:
    """Every (trial, snapshot) with the measures the table does not hold at their current version."""
    from model.measures import get_measure

    done = done_keys(read_table(experiment, ["trial", "step", "analysis", "version"]))
    versions = {m: get_measure(m).version for m in measures}
    tasks = []
    for trial in trials:
        for snapshot in trial.snapshots:
            missing = tuple(m for m in measures if (trial.trial_id, snapshot.step, m, versions[m]) not in done)
            if missing:
                tasks.append(Task(trial, snapshot, missing))
    return tasks


def choose_trials(experiment: Experiment, wanted: tuple[str, ...]) -> list[TrialRecord]:
    if not wanted:
        return experiment.trials
    known = {t.trial_id: t for t in experiment.trials}
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise ConfigError(
            f"--trials {','.join(unknown)}: no such trial in {experiment.name}; trials: {', '.join(known)}"
        )
    return [known[t] for t in wanted]


def _probe_key(trial: TrialRecord) -> str:
    data, model, train = trial_configs(trial.config)
    return json.dumps([data.__dict__, model.seq_len, train.eval_tokens], sort_keys=True, default=str)


def _run_config(trial: TrialRecord) -> dict[str, Any]:
    data, model, train = trial_configs(trial.config)
    return {"model": asdict(model), "train": asdict(train), "data": asdict(data)}


def measure_snapshot(storage_uri: str, snapshot_path: str, probe, measures: tuple[str, ...]) -> dict[str, list]:
    """A Ray task: load one snapshot from storage and measure it (one thread: tasks run side by side)."""
    import torch

    from model.measures import measure_model
    from model.snapshots import SNAPSHOT_FILE, WEIGHTS_FILE, model_from_snapshot

    torch.set_num_threads(1)
    storage = open_storage(storage_uri)
    with storage.filesystem.open_input_stream(f"{snapshot_path}/{SNAPSHOT_FILE}") as stream:
        record = json.loads(stream.read())
    with storage.filesystem.open_input_stream(f"{snapshot_path}/{WEIGHTS_FILE}") as stream:
        weights = stream.read()
    return measure_model(model_from_snapshot(record, weights), probe, measures)


def analyse_experiment(
    experiment: Experiment,
    measures: tuple[str, ...],
    trials: list[TrialRecord],
    address: str | None = None,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Compute what the table lacks, as Ray tasks, flushing finished snapshots to the table as they come.

    Returns counts: tasks planned and done, rows written, parts written, and the measures computed.
    """
    import ray

    from model.measures import get_measure, run_probe

    from .cluster import init_ray

    tasks = plan_tasks(experiment, measures, trials)
    computed = tuple(m for m in measures if any(m in task.measures for task in tasks))
    counts = {"tasks": len(tasks), "done": 0, "rows": 0, "parts": 0, "measures": computed}
    if not tasks:
        return counts
    init_ray(address, verbose)
    probes: dict[str, Any] = {}
    for trial in {t.trial.trial_id: t.trial for t in tasks}.values():
        key = _probe_key(trial)
        if key not in probes:
            probes[key] = ray.put(run_probe(_run_config(trial)))
    remote = ray.remote(num_cpus=1, max_retries=2)(measure_snapshot)
    pending = {
        remote.remote(experiment.storage.uri, task.snapshot.path, probes[_probe_key(task.trial)], task.measures): task
        for task in tasks
    }
    definitions = {name: {"version": get_measure(name).version, "description": get_measure(name).description}
                   for name in measures}
    buffer: list[tuple[Task, dict[str, list]]] = []
    flushed_at = time.monotonic()
    on_progress(0, len(tasks))
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                buffer.append((pending.pop(ref), ray.get(ref)))
                counts["done"] += 1
            on_progress(counts["done"], len(tasks))
            if buffer and (not pending or time.monotonic() - flushed_at > FLUSH_SECONDS):
                counts["rows"] += write_part(experiment, buffer, definitions)
                counts["parts"] += 1
                buffer, flushed_at = [], time.monotonic()
    finally:
        if buffer:  # an interrupted run keeps what it finished
            counts["rows"] += write_part(experiment, buffer, definitions)
            counts["parts"] += 1
    return counts


def write_part(
    experiment: Experiment,
    results: list[tuple[Task, dict[str, list]]],
    definitions: dict[str, Any],
    versions: dict[str, int] | None = None,
) -> int:
    """One Parquet part holding whole (trial, snapshot, measure) units, written whole; returns its rows.

    `versions`: of analyses that are not per-snapshot measures (essential dynamics); the measures' own otherwise.
    A row is (layer, head, measure, value), or with an edge's (sender, receiver) after them."""
    from model.measures import get_measure

    versions = versions or {}
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for task, by_measure in results:
        for name, rows in by_measure.items():
            version = versions.get(name) or get_measure(name).version
            for row in rows:
                layer, head, measure, value, *edge = row
                sender, receiver = edge or (None, None)
                items = (task.trial.trial_id, task.snapshot.step, task.snapshot.tokens_seen, layer, head, measure,
                         value, name, version, sender, receiver)
                for column, item in zip(SCHEMA.names, items):
                    columns[column].append(item)
    table = pa.table(columns, schema=SCHEMA.with_metadata({"measures": json.dumps(definitions)}))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
    path = f"{table_path(experiment)}/{name}"
    write_bytes(experiment.storage, path, sink.getvalue().to_pybytes())
    return table.num_rows
