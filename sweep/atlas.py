"""The grid's answer: which circuits grew under which hyperparameters, from storage alone.

One row per trial (its varying config, state, final losses, counts of heads by
label, the max of every head score, when induction heads formed), then for
every axis of the grid each score's mean and max grouped by the axis value,
and by pairs of axes; where `sweep analyse --what llc` ran, each trial's developmental stages (count and
boundary tokens) and their grouping by axis. Axes are ranked by how strongly the pattern scores
depend on them (RANK_SCORES: the largest spread of their group means), so
"induction heads formed only with layers = 2" comes first when it is true.
"""

from __future__ import annotations

import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from model.metrics import SCORE_NAMES as HEAD_SCORES
from model.metrics import current_labels

from .circuits import circuit_summary, preferred_task, trial_circuits
from .records import Experiment, TrialRecord
from .stages import trial_stages
from .storage import read_text
from .table import read_table, use_snapshot_formed_at

LABELS = ("induction", "previous_token", "first_token", "copying", "matters")
# The head types shown over the grid (tables, the report's small multiples).
GRID_SCORES = ("induction", "previous_token", "first_token", "copying")
# Axes are ranked by these pattern scores: measured on fixed probes, they move only when attention
# changes. Copying (an eigenvalue ratio of the OV circuit) swings widely in undertrained models,
# so it is shown but does not rank.
RANK_SCORES = ("induction", "previous_token", "duplicate_token", "first_token")
REPLICATE_AXIS = "seed"
"""Trials that differ only in their seed are replicates of one grid point."""
# Trial-level values grouped besides the head scores (not used to rank axes: not on the scores' scale).
TRIAL_VALUES = ("test_loss", "icl_score")


@dataclass
class AtlasRow:
    """One trial of the atlas."""

    trial_id: str
    config: dict[str, Any]
    status: str
    values: dict[str, float | None]
    """test_loss, icl_score, and `<score>_max` for every head score."""
    label_counts: dict[str, int]
    induction_formed_at: int | None
    prev_token_formed_at: int | None
    stages: int | None = None
    """Developmental stages from the LLC curve (`sweep analyse --what llc`); None without an LLC."""
    stage_boundaries: list[int] = field(default_factory=list)
    """Tokens of each stage's last snapshot."""
    circuit: dict[str, Any] | None = None
    """The causal circuit at the last snapshot (sweep.circuits.circuit_summary); None where none was found."""
    last_tokens: int | None = None
    """tokens_seen when the trial stopped: a reading that never happened is censored here."""

    def document(self, axes: list[str] = ()) -> dict[str, Any]:
        point = {axis: self.config.get(axis) for axis in axes}
        return {"trial_id": self.trial_id, "config": self.config, "grid_point": point,
                "seed": self.config.get(REPLICATE_AXIS), "status": self.status, **self.values,
                "heads_by_label": self.label_counts, "induction_formed_at": self.induction_formed_at,
                "prev_token_formed_at": self.prev_token_formed_at, "stages": self.stages,
                "stage_boundaries": self.stage_boundaries, "circuit": self.circuit}


@dataclass
class Atlas:
    experiment: str
    axes: list[str]
    """Varying axes, strongest dependence first."""
    rows: list[AtlasRow]
    groups: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """axis -> one entry per value: {value, trials, <value name>: {mean, max}}."""
    pairs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """"axis1 x axis2" -> one entry per value pair (means only)."""
    spread: dict[str, dict[str, float]] = field(default_factory=dict)
    """axis -> score -> spread of the group means (max - min)."""
    formed_at_resolution: str = "iterations"
    """induction_formed_at is the first iteration, or (from the analysis table) the first snapshot,
    past the threshold."""
    circuit_task: str | None = None
    """The task of the trials' causal circuits (`sweep analyse --what circuit`); None: none found yet."""
    seeds: list[Any] = field(default_factory=list)
    """The seeds of the trials where there are several: each grid point's replicates (`sweep effects`)."""
    seed_spread: dict[str, float] = field(default_factory=dict)
    """`<score>_max` -> the largest spread (max - min) of that score among one grid point's replicates: how far
    seeds alone move it. Empty without replicates."""

    def noise(self, axis: str) -> str:
        """Whether the axis's strongest spread is beyond the seeds' own, in words for the tables."""
        name, spread = self.strongest(axis)
        if not self.seed_spread:
            return "seeds' noise unknown: one seed a grid point"
        within = self.seed_spread[f"{name}_max"]
        return (f"beyond the seeds' spread of {within:.2f}" if spread > within
                else f"within the seeds' spread of {within:.2f}: no clear dependence")

    @property
    def columns(self) -> list[str]:
        """The config keys a table of trials shows: the axes, and the seed where trials are replicates."""
        return [*self.axes, *([REPLICATE_AXIS] if self.seeds else [])]

    def strongest(self, axis: str) -> tuple[str, float]:
        """The ranking score that depends most on `axis`, and its spread."""
        ranked = {name: self.spread[axis][f"{name}_max"] for name in RANK_SCORES}
        name = max(ranked, key=ranked.get)
        return name, ranked[name]

    def document(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "axes": self.axes, "spread": self.spread,
                "trials": [r.document(self.axes) for r in self.rows], "groups": self.groups, "pairs": self.pairs,
                "formed_at_resolution": self.formed_at_resolution, "circuit_task": self.circuit_task,
                "seeds": self.seeds, "seed_spread": self.seed_spread}


def score_names() -> list[str]:
    return [f"{score}_max" for score in HEAD_SCORES]


def _heads_document(experiment: Experiment, trial: TrialRecord) -> dict[str, Any] | None:
    if trial.checkpoint is None:
        return None
    try:
        return current_labels(json.loads(read_text(experiment.storage, f"{trial.checkpoint}/heads.json")))
    except (OSError, json.JSONDecodeError):
        return None


def _row(trial: TrialRecord, heads: dict[str, Any] | None) -> AtlasRow:
    values: dict[str, float | None] = {name: _finite(trial.metrics.get(name)) for name in TRIAL_VALUES}
    counts = {label: 0 for label in LABELS}
    for score in HEAD_SCORES:
        values[f"{score}_max"] = (
            max((h["scores"][score] for h in heads["heads"] if score in h["scores"]), default=None) if heads else None
        )
    if heads:
        for head in heads["heads"]:
            for label in head["labels"]:
                if label in counts:
                    counts[label] += 1
    return AtlasRow(trial.trial_id, trial.config, trial.status, values, counts,
                    trial.metrics.get("induction_formed_at"), trial.metrics.get("prev_token_formed_at"),
                    last_tokens=trial.metrics.get("tokens_seen"))


def _finite(value: Any) -> float | None:
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def _summary(rows: list[AtlasRow], names: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"trials": len(rows)}
    for name in names:
        present = [r.values[name] for r in rows if r.values.get(name) is not None]
        summary[name] = (
            {"mean": sum(present) / len(present), "max": max(present)} if present else {"mean": None, "max": None}
        )
    induction = [r.label_counts["induction"] for r in rows]
    summary["induction_heads"] = {"mean": sum(induction) / len(induction), "max": max(induction)}
    stages = [r.stages for r in rows if r.stages is not None]
    summary["stages"] = {"mean": sum(stages) / len(stages) if stages else None, "max": max(stages, default=None)}
    summary["stage_boundaries"] = sorted(b for r in rows for b in r.stage_boundaries)
    summary["circuit"] = _circuit_group([r.circuit for r in rows if r.circuit is not None])
    return summary


def _circuit_group(circuits: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The circuits of a group of trials: mean size and faithfulness, and per edge kind how many of the trials'
    final circuits hold it and when its first edge appeared. A trial where the kind never appeared is censored at
    its last snapshot, never dropped: the median counts it as later than any snapshot ("never in k of n")."""
    if not circuits:
        return None
    found = [c for c in circuits if c["edges"]]
    kinds = sorted({kind for c in circuits for kind in (*c["kinds"], *c.get("appeared_kinds", {}))})
    faithful = [c["faithfulness"] for c in found if c["faithfulness"] is not None]
    summary: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        holding = [c["kinds"][kind]["edges"] for c in circuits if kind in c["kinds"]]
        first = [c.get("appeared_kinds", {}).get(kind) for c in circuits]
        summary[kind] = {"trials": len(holding), "edges": sum(holding) / len(holding) if holding else 0.0,
                         "first_tokens": censored_median(first), "never": sum(t is None for t in first),
                         "of": len(first)}
    return {
        "trials": len(circuits), "with_circuit": len(found),
        "edges": sum(c["edges"] for c in circuits) / len(circuits),
        "faithfulness": sum(faithful) / len(faithful) if faithful else None,
        "kinds": summary,
    }


def censored_median(times: list[int | None]) -> float | None:
    """The median time with None (never, censored at the end) counted as later than every time; None when half or
    more never reached it."""
    ordered = sorted(times, key=lambda t: (t is None, t or 0))
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    if not ordered or any(t is None for t in middle):
        return None
    return sum(middle) / len(middle)


def _key(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def build_atlas(experiment: Experiment, table=None) -> Atlas:
    """The atlas of an experiment: every trial's latest heads.json read in parallel (S3 round trips overlap);
    formed_at at snapshot resolution where `sweep analyse` scored the snapshots. `table`: the analysis table,
    when the caller has read it."""
    table = read_table(experiment) if table is None else table
    use_snapshot_formed_at(experiment, table)
    trials = experiment.trials
    with ThreadPoolExecutor(max_workers=16) as pool:
        documents = list(pool.map(lambda t: _heads_document(experiment, t), trials))
    rows = [_row(trial, heads) for trial, heads in zip(trials, documents)]
    _add_stages(experiment, rows, table)
    task = _add_circuits(experiment, rows, table)
    declared = [*(experiment.record.get("axes") or {}), *(experiment.record.get("space") or {})]
    for key in experiment.record.get("space") or {}:
        rows = _binned(rows, key)
    seen = {k for r in rows for k in r.config}
    varying = [a for a in declared if a in seen] or sorted(
        k for k in seen if len({_key(r.config.get(k)) for r in rows}) > 1
    )
    varying = [a for a in varying if len({_key(r.config.get(a)) for r in rows}) > 1]
    names = [*score_names(), *TRIAL_VALUES]
    atlas = Atlas(experiment.name, [], rows, formed_at_resolution=experiment.formed_at_resolution, circuit_task=task)
    seeds = sorted({r.config.get(REPLICATE_AXIS) for r in rows}, key=_sortable_value)
    varying = [a for a in varying if a != REPLICATE_AXIS]  # seeds are replicates of a grid point (sweep effects)
    for axis in varying:
        values = sorted({_key(r.config.get(axis)) for r in rows}, key=_sortable)
        entries = []
        for value in values:
            group = [r for r in rows if _key(r.config.get(axis)) == value]
            entries.append({"value": group[0].config.get(axis), **_summary(group, names)})
        atlas.groups[axis] = entries
        atlas.spread[axis] = {}
        for name in score_names():
            means = [e[name]["mean"] for e in entries if e[name]["mean"] is not None]
            atlas.spread[axis][name] = round(max(means) - min(means), 4) if len(means) > 1 else 0.0
    atlas.axes = sorted(varying, key=lambda a: -atlas.strongest(a)[1])
    atlas.seeds = seeds if len(seeds) > 1 else []
    if atlas.seeds:
        atlas.seed_spread = _seed_spread(rows, varying)
    for first, second in itertools.combinations(atlas.axes, 2):
        entries = []
        for value1, value2 in itertools.product(
            *(sorted({_key(r.config.get(a)) for r in rows}, key=_sortable) for a in (first, second))
        ):
            group = [r for r in rows if _key(r.config.get(first)) == value1 and _key(r.config.get(second)) == value2]
            if group:
                summary = _summary(group, names)
                entries.append(
                    {
                        first: group[0].config.get(first),
                        second: group[0].config.get(second),
                        "trials": len(group),
                        **{name: summary[name]["mean"] for name in names},
                        "induction_heads": summary["induction_heads"]["mean"],
                        "stages": summary["stages"]["mean"],
                    }
                )
        atlas.pairs[f"{first} x {second}"] = entries
    return atlas


def _seed_spread(rows: list[AtlasRow], axes: list[str]) -> dict[str, float]:
    """Each ranking score's largest spread among the replicates of one grid point."""
    points: dict[str, list[AtlasRow]] = {}
    for row in rows:
        points.setdefault(json.dumps([row.config.get(a) for a in axes], default=str), []).append(row)
    spread = {}
    for name in (f"{score}_max" for score in RANK_SCORES):
        spans = [max(v) - min(v) for group in points.values()
                 if len(v := [r.values[name] for r in group if r.values.get(name) is not None]) > 1]
        spread[name] = round(max(spans, default=0.0), 4)
    return spread


def _add_circuits(experiment: Experiment, rows: list[AtlasRow], table) -> str | None:
    """Each trial's causal circuit at its last snapshot, where the analysis table holds it; returns its task."""
    task = preferred_task(table)
    if task is None:
        return None
    found = trial_circuits(experiment, table, task)
    for row in rows:
        if row.trial_id in found:
            row.circuit = circuit_summary(found[row.trial_id])
    return task


def _add_stages(experiment: Experiment, rows: list[AtlasRow], table) -> None:
    """Each trial's LLC stages, where the analysis table holds its LLC curve."""
    by_trial = {d["trial_id"]: d for d in trial_stages(experiment, table) if d["llc"]}
    for row in rows:
        if document := by_trial.get(row.trial_id):
            row.stages = document["stages"]
            row.stage_boundaries = [b["tokens"] for b in document["llc_boundaries"]]


def _binned(rows: list[AtlasRow], key: str) -> list[AtlasRow]:
    """Sampled values of `key` (a searched range) grouped into quartiles, labelled by their ends; lists stay as they
    are."""
    values = sorted({r.config[key] for r in rows if isinstance(r.config.get(key), (int, float))})
    if len(values) <= 6:
        return rows
    edges = [values[min(len(values) - 1, round(q * (len(values) - 1)))] for q in (0, 0.25, 0.5, 0.75, 1)]
    for row in rows:
        value = row.config.get(key)
        if isinstance(value, (int, float)):
            upper = next(i for i in range(1, 5) if value <= edges[i] or i == 4)
            row.config = row.config | {key: f"{edges[upper - 1]:.3g}-{edges[upper]:.3g}"}
    return rows


def _sortable_value(value: Any) -> tuple:
    return _sortable(_key(value))


def _sortable(text: str) -> tuple:
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)


def atlas_rows_csv(atlas: Atlas) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of `sweep atlas --csv`: a row per trial."""
    circuit_columns = ("edges", "faithfulness", "composition_edges", "composition_appeared_at", "complete_at")
    columns = [
        "trial_id",
        *atlas.columns,
        "status",
        *TRIAL_VALUES,
        *score_names(),
        *(f"{label}_heads" for label in LABELS),
        "induction_formed_at",
        "prev_token_formed_at",
        "stages",
        "stage_boundaries",
        *(f"circuit_{name}" for name in circuit_columns),
    ]
    rows = []
    for row in atlas.rows:
        circuit = row.circuit or {}
        rows.append(
            {
                "trial_id": row.trial_id,
                **{a: row.config.get(a) for a in atlas.columns},
                "status": row.status,
                **row.values,
                **{f"{label}_heads": n for label, n in row.label_counts.items()},
                "induction_formed_at": row.induction_formed_at,
                "prev_token_formed_at": row.prev_token_formed_at,
                "stages": row.stages,
                "stage_boundaries": " ".join(str(b) for b in row.stage_boundaries),
                **{f"circuit_{name}": circuit.get(name) for name in circuit_columns},
            }
        )
    return columns, rows
