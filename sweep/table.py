"""The analysis table of an experiment, `<experiment>/analysis/`, read back, and what its readers take from it.

Parquet part files with the columns of SCHEMA (sweep.analyse writes them). Every reader of the table comes here:
`read_table`, the units already measured (`done_keys`), and the one rule for when a named circuit formed
(`formed_at`), so `best`, `results`, the atlas, `stages` and the report give one answer.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from model.metrics import INDUCTION_THRESHOLD, MATTERS_THRESHOLD, PREVIOUS_TOKEN_THRESHOLD, SUMMARY_METRICS

from .records import Experiment
from .storage import Storage

TABLE_FOLDER = "analysis"
SCHEMA = pa.schema(
    [
        ("trial", pa.string()),
        ("step", pa.int64()),
        ("tokens_seen", pa.int64()),
        ("layer", pa.int16()),
        ("head", pa.int16()),
        ("measure", pa.string()),
        ("value", pa.float64()),
        ("analysis", pa.string()),
        ("version", pa.int32()),
        # an edge of a causal circuit (analysis circuit:TASK): who writes and who reads; null for other rows
        ("sender", pa.string()),
        ("receiver", pa.string()),
    ]
)
def table_path(experiment: Experiment) -> str:
    return f"{experiment.path}/{TABLE_FOLDER}"


def table_parts(storage: Storage, folder: str) -> list[str]:
    infos = storage.filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))


def read_table(experiment: Experiment, columns: list[str] | None = None) -> pa.Table | None:
    """The experiment's analysis table (every part), or None when `sweep analyse` never ran on it."""
    parts = table_parts(experiment.storage, table_path(experiment))
    if not parts:
        return None
    tables = [_read_part(part, columns, experiment.storage) for part in parts]
    return pa.concat_tables(tables)


def _read_part(part: str, columns: list[str] | None, storage: Storage) -> pa.Table:
    """One part in SCHEMA's columns: a part written before a column existed (sender, receiver) reads it as null."""
    present = pq.read_schema(part, filesystem=storage.filesystem).names
    wanted = columns or SCHEMA.names
    table = pq.read_table(part, columns=[c for c in wanted if c in present], filesystem=storage.filesystem)
    for name in wanted:
        if name not in present:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return table.select(wanted)


def done_keys(table: pa.Table | None) -> set[tuple[str, int, str, int]]:
    """(trial, step, analysis, version) units already in the table."""
    if table is None or table.num_rows == 0:
        return set()
    units = (
        table.select(["trial", "step", "analysis", "version"])
        .group_by(["trial", "step", "analysis", "version"])
        .aggregate([])
    )
    return set(zip(*(units.column(name).to_pylist() for name in ("trial", "step", "analysis", "version"))))


FORMED = {"induction": ("induction_formed_at", INDUCTION_THRESHOLD), "previous_token": ("prev_token_formed_at",
                                                                                PREVIOUS_TOKEN_THRESHOLD)}
ABLATION_MEASURES = ("ablation_held_out", "ablation_repeated")


def formed_at(table: pa.Table) -> dict[str, dict[str, Any]]:
    """trial -> {induction_formed_at, induction_formed_by, prev_token_formed_at, prev_token_formed_by}: the
    tokens_seen of the first snapshot where the head type appears, by its pattern or by its use (None: never):

    - pattern: some head's score passes the label threshold (0.4);
    - use: some head with at least half the threshold's score costs the model more than the `matters`
      threshold (0.05 nats) when mean-ablated (where `sweep analyse --what ablation` measured it): a
      previous-token head at 0.35 whose removal costs 1.4 nats is in use before its pattern reads 0.4.
    """
    scores = table.filter(pc.and_(pc.equal(table["analysis"], "scores"),
                                  pc.is_in(table["measure"], pa.array(list(FORMED)))))
    ablation = table.filter(pc.and_(pc.equal(table["analysis"], "ablation"),
                                    pc.is_in(table["measure"], pa.array(list(ABLATION_MEASURES)))))
    cost: dict[tuple, float] = {}
    for trial, step, layer, head, value in zip(*(ablation[c].to_pylist() for c in ("trial", "step", "layer", "head",
                                                                                      "value"))):
        key = (trial, step, layer, head)
        cost[key] = max(cost.get(key, float("-inf")), value)
    snapshots: dict[tuple[str, int], dict[str, Any]] = {}
    columns = ("trial", "step", "tokens_seen", "layer", "head", "measure", "value")
    for trial, step, tokens, layer, head, measure, value in zip(*(scores[c].to_pylist() for c in columns)):
        entry = snapshots.setdefault((trial, step), {"tokens": tokens, "heads": []})
        entry["heads"].append((measure, layer, head, value))
    result: dict[str, dict[str, Any]] = {}
    for (trial, step), entry in sorted(snapshots.items(), key=lambda item: item[0][1]):
        found = result.setdefault(trial, {key: None for name, (key, _) in FORMED.items()}
                                  | {key.replace("_at", "_by"): None for key, _ in FORMED.values()})
        for name, (key, threshold) in FORMED.items():
            if found[key] is not None:
                continue
            heads = [(layer, head, value) for measure, layer, head, value in entry["heads"] if measure == name]
            if any(value > threshold for _, _, value in heads):
                found[key], found[key.replace("_at", "_by")] = entry["tokens"], "pattern"
            elif any(value >= threshold / 2 and cost.get((trial, step, layer, head), 0.0) > MATTERS_THRESHOLD
                     for layer, head, value in heads):
                found[key], found[key.replace("_at", "_by")] = entry["tokens"], "use"
    return result


def trial_formed_at(experiment: Experiment, table: pa.Table | None) -> dict[str, dict[str, Any]]:
    """trial -> its formed_at readings as every reader shows them. A trial that read formed_at at its snapshots
    while training (`formed_at_resolution` snapshot) keeps that reading whatever ran since: the analysis table
    never changes it. Only a trial trained before that (the trainer's reading at iterations) takes the table's
    finer reading where `sweep analyse` scored its snapshots."""
    from_table = formed_at(table) if table is not None else {}
    found = {}
    for trial in experiment.trials:
        if trial.formed_at_resolution == "snapshot":
            found[trial.trial_id] = {key: trial.metrics.get(key) for key, _ in FORMED.values()} | {
                key.replace("_at", "_by"): "pattern" for key, _ in FORMED.values()}
        elif trial.trial_id in from_table:
            found[trial.trial_id] = from_table[trial.trial_id]
    return found


def use_snapshot_formed_at(experiment: Experiment, table: pa.Table | None = None) -> bool:
    """Give each trial trained before formed_at was read at snapshots (its iteration reading) the finer reading of
    the analysis table (read here unless given), where `sweep analyse` scored its snapshots; each trial says which it
    holds (`formed_at_resolution`). True if any trial holds a snapshot reading."""
    if table is None and any(t.formed_at_resolution != "snapshot" for t in experiment.trials):
        table = read_table(experiment, ["trial", "step", "tokens_seen", "layer", "head", "measure", "value",
                                        "analysis"])
    from_table = formed_at(table) if table is not None else {}
    for trial in experiment.trials:
        if trial.formed_at_resolution != "snapshot":
            refined = from_table.get(trial.trial_id)
            if refined:
                trial.metrics.update(refined)
                trial.formed_at_resolution = "snapshot"
    return any(t.formed_at_resolution == "snapshot" for t in experiment.trials)


def formed_at_caption(resolution: str) -> str:
    """What formed_at counts, in one line, for every table and figure that shows it."""
    snapshot = (f"the first snapshot where a head's pattern score passed {INDUCTION_THRESHOLD:g}, read while "
                f"training (marked (use): a trial trained before that, read from `sweep analyse`'s table, where half "
                f"that score and a mean-ablation cost past {MATTERS_THRESHOLD:g} nats count too)")
    iteration = f"the first iteration whose best head scored past {INDUCTION_THRESHOLD:g}"
    return "formed_at: " + {"snapshots": snapshot, "iterations": iteration}.get(
        resolution, f"{snapshot} where the trial has snapshots, else {iteration}")


def snapshot_history(table: pa.Table | None) -> dict[str, list[dict[str, Any]]]:
    """trial -> one row a scored snapshot, by tokens: tokens_seen, test_loss and icl_score (analysis `loss`) and each
    summarised head score's max over heads (analysis `scores`): the trainer's per-iteration history, at the
    snapshots' finer resolution."""
    if table is None:
        return {}
    wanted = pc.or_(pc.equal(table["analysis"], "loss"), pc.equal(table["analysis"], "scores"))
    rows = table.filter(wanted)
    by_score = {score: metric for metric, score in SUMMARY_METRICS.items()}
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for trial, tokens, analysis, measure, value in zip(*(rows[c].to_pylist() for c in ("trial", "tokens_seen",
                                                                                       "analysis", "measure",
                                                                                       "value"))):
        entry = found.setdefault(trial, {}).setdefault(tokens, {"tokens_seen": tokens})
        if analysis == "loss":
            entry[measure] = value
        elif measure in by_score:
            entry[by_score[measure]] = max(entry.get(by_score[measure], float("-inf")), value)
    return {trial: [entry for _, entry in sorted(entries.items()) if len(entry) > 1]
            for trial, entries in found.items() if sum(1 for e in entries.values() if "induction_score_max" in e) > 1}
