"""Causal circuits read back from the analysis table: each trial's circuit at every snapshot and when its edges
appeared (`sweep circuit`, the atlas and the report read them from here).

The rows are those `sweep analyse --what circuit:TASK` writes (model.measures, analysis `circuit:<task>`):
per snapshot, every edge's effect (a fraction of the clean-to-corrupted difference), change in nats, EAP and
EAP-IG estimates, and the circuit's edges by rank. An edge appeared at the first snapshot whose effect passed
the edge threshold (model.causal.CircuitConfig.edge_threshold).

model.causal (torch) is imported only where circuits are computed: reading them back needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from model.config import ConfigError
from model.edges import CIRCUIT_PREFIX, CIRCUIT_VERSION, COMPOSITION_KINDS, CircuitConfig, edge_kind

from .analyse import analyse_experiment
from .records import Experiment
from .results import choose_trial
from .table import read_table
from .trajectory import find_snapshot

EDGE_MEASURES = ("edge_effect", "edge_change", "edge_eap", "edge_eap_ig")
SNAPSHOT_MEASURES = (
    "clean_metric",
    "corrupted_metric",
    "difference_se",
    "faithfulness",
    "circuit_edges",
    "eap_spearman",
    "eap_pearson",
    "eap_circuit_recall",
    "eap_ig_spearman",
    "eap_ig_pearson",
    "eap_ig_circuit_recall",
)


@dataclass
class SnapshotCircuit:
    """One snapshot's circuit as the table holds it."""

    step: int
    tokens_seen: int
    values: dict[str, float | None]
    """SNAPSHOT_MEASURES (None where NaN: no circuit, no agreement)."""
    edges: dict[str, dict[str, float | None]]
    """edge -> effect, change, eap, eap_ig."""
    circuit: list[str]
    """The circuit's edges, largest effect first."""

    @property
    def faithfulness(self) -> float | None:
        return self.values.get("faithfulness")


@dataclass
class TrialCircuit:
    """A trial's circuit at every analysed snapshot, and when each edge appeared."""

    trial_id: str
    config: dict[str, Any]
    snapshots: list[SnapshotCircuit]
    threshold: float
    appeared: dict[str, SnapshotCircuit] = field(default_factory=dict)
    """edge -> the first snapshot where its effect reached the threshold."""

    def __post_init__(self) -> None:
        for snapshot in self.snapshots:
            for edge, values in snapshot.edges.items():
                effect = values["effect"]
                if edge not in self.appeared and effect is not None and effect >= self.threshold:
                    self.appeared[edge] = snapshot

    @property
    def last(self) -> SnapshotCircuit:
        return self.snapshots[-1]

    def at(self, step: int) -> SnapshotCircuit | None:
        return next((s for s in self.snapshots if s.step == step), None)

    def order(self, snapshot: SnapshotCircuit | None = None) -> list[str]:
        """The circuit's edges (at `snapshot`, default the last) in the order they appeared; an edge of the circuit
        that never passed the threshold alone comes last."""
        chosen = snapshot or self.last
        never = math.inf
        return sorted(chosen.circuit, key=lambda e: (self.appeared[e].step if e in self.appeared else never,
                                                     chosen.circuit.index(e)))

    def kinds(self, snapshot: SnapshotCircuit | None = None) -> dict[str, dict[str, Any]]:
        """The circuit's edges by kind (`head -> k`...): how many, and the tokens at which the first appeared."""
        found: dict[str, dict[str, Any]] = {}
        for edge in (snapshot or self.last).circuit:
            entry = found.setdefault(edge_kind(edge), {"edges": 0, "first_tokens": None})
            entry["edges"] += 1
            if edge in self.appeared:
                tokens = self.appeared[edge].tokens_seen
                entry["first_tokens"] = tokens if entry["first_tokens"] is None else min(entry["first_tokens"], tokens)
        return found

    def edge_document(self, edge: str, snapshot: SnapshotCircuit) -> dict[str, Any]:
        first = self.appeared.get(edge)
        return {"edge": edge, "kind": edge_kind(edge), **snapshot.edges[edge],
                "rank": snapshot.circuit.index(edge) + 1 if edge in snapshot.circuit else None,
                "appeared": {"step": first.step, "tokens_seen": first.tokens_seen} if first else None}

    def document(self, snapshot: SnapshotCircuit | None = None) -> dict[str, Any]:
        """The `sweep circuit --json` entry of this trial at `snapshot` (default the last)."""
        chosen = snapshot or self.last
        return {
            "trial_id": self.trial_id, "config": self.config,
            "snapshot": {"step": chosen.step, "tokens_seen": chosen.tokens_seen},
            **{name: chosen.values.get(name) for name in ("clean_metric", "corrupted_metric", "faithfulness")},
            "edges_in_graph": len(chosen.edges),
            "circuit": [self.edge_document(edge, chosen) for edge in chosen.circuit],
            "order": self.order(chosen),
            "kinds": self.kinds(chosen),
            "agreement": {estimate: {name: chosen.values.get(f"{estimate}_{name}")
                                     for name in ("spearman", "pearson", "circuit_recall")}
                          for estimate in ("eap", "eap_ig")},
            "snapshots": [{"step": s.step, "tokens_seen": s.tokens_seen, "faithfulness": s.faithfulness,
                           "circuit_edges": len(s.circuit)} for s in self.snapshots],
        }


def analysis_name(task: str) -> str:
    return f"{CIRCUIT_PREFIX}{task}"


def tasks_in(table: pa.Table | None) -> list[str]:
    """The circuit tasks the table holds at the current version."""
    if table is None:
        return []
    rows = table.filter(pc.and_(pc.starts_with(table["analysis"], CIRCUIT_PREFIX),
                                pc.equal(table["version"], CIRCUIT_VERSION)))
    return sorted(name.removeprefix(CIRCUIT_PREFIX) for name in pc.unique(rows["analysis"]).to_pylist())


def trial_circuits(experiment: Experiment, table: pa.Table | None, task: str = "induction") -> dict[str, TrialCircuit]:
    """trial -> its circuit over the snapshots the table holds for `task` (trials without any are left out)."""
    if table is None:
        return {}
    rows = table.filter(pc.and_(pc.equal(table["analysis"], analysis_name(task)),
                                pc.equal(table["version"], CIRCUIT_VERSION)))
    if rows.num_rows == 0:
        return {}
    columns = ("trial", "step", "tokens_seen", "measure", "value", "sender", "receiver")
    by_snapshot: dict[tuple[str, int], dict[str, Any]] = {}
    for trial, step, tokens, measure, value, sender, receiver in zip(*(rows[c].to_pylist() for c in columns)):
        entry = by_snapshot.setdefault((trial, step), {"tokens": tokens, "values": {}, "edges": {}, "ranks": {}})
        value = None if value is None or not math.isfinite(value) else value
        if sender is None:
            entry["values"][measure] = value
        elif measure == "circuit_rank":
            entry["ranks"][f"{sender} -> {receiver}"] = value
        elif measure in EDGE_MEASURES:
            entry["edges"].setdefault(f"{sender} -> {receiver}", {})[measure.removeprefix("edge_")] = value
    threshold = CircuitConfig().edge_threshold
    configs = {t.trial_id: t.config for t in experiment.trials}
    found: dict[str, list[SnapshotCircuit]] = {}
    for (trial, step), entry in sorted(by_snapshot.items(), key=lambda item: (item[0][0], item[0][1])):
        circuit = sorted(entry["ranks"], key=entry["ranks"].get)
        found.setdefault(trial, []).append(SnapshotCircuit(step, entry["tokens"], entry["values"], entry["edges"],
                                                           circuit))
    return {trial: TrialCircuit(trial, configs.get(trial, {}), snapshots, threshold)
            for trial, snapshots in found.items() if trial in configs}


def composition_edges(circuit: list[str]) -> list[str]:
    """The circuit's edges from one head into a later head's query, key or value."""
    return [edge for edge in circuit if edge_kind(edge) in COMPOSITION_KINDS]


def circuit_summary(circuit: TrialCircuit) -> dict[str, Any]:
    """What the atlas shows of a trial's circuit at its last snapshot: its size, faithfulness, composition edges,
    its edges by kind, and when the first and the last of its edges appeared."""
    last = circuit.last
    appeared = [circuit.appeared[e].tokens_seen for e in last.circuit if e in circuit.appeared]
    composition = composition_edges(last.circuit)
    composed = [circuit.appeared[e].tokens_seen for e in composition if e in circuit.appeared]
    return {"edges": len(last.circuit), "faithfulness": last.faithfulness, "composition_edges": len(composition),
            "composition_appeared_at": min(composed, default=None), "first_appeared_at": min(appeared, default=None),
            "complete_at": max(appeared, default=None), "kinds": circuit.kinds()}


def preferred_task(table: pa.Table | None) -> str | None:
    """The task the atlas and the report show: induction where the table holds it, else the first it holds."""
    tasks = tasks_in(table)
    return "induction" if "induction" in tasks else (tasks[0] if tasks else None)


@dataclass(frozen=True)
class CircuitRequest:
    """What `sweep circuit` asks for: a task, one trial or all, and optionally one snapshot."""

    task: str = "induction"
    trial: str | None = None
    """A trial id, `best` (by the sweep's metric), or None: every trial with snapshots."""
    at: Any = None
    """A SnapshotAddress (sweep.trajectory), or None: the last snapshot."""


def circuits_of(experiment: Experiment, request: CircuitRequest, analyse=None) -> dict[str, Any]:
    """The circuits `request` names: computed first where the analysis table lacks them (`analyse(trials,
    measures)`, default sweep.analyse.analyse_experiment on a local Ray), then read back. Every mistake (an
    unknown task, trial or step, a trial without snapshots) is a ConfigError raised before anything is computed
    or written."""
    from model.causal import get_task

    get_task(request.task)
    if request.at is not None and request.trial is None:
        raise ConfigError(f"{request.at.text} names a snapshot of one trial: give --trial")
    if request.trial is not None:
        trials = [choose_trial(experiment, request.trial)]
        if not trials[0].snapshots:
            raise ConfigError(f"trial {trials[0].trial_id} of {experiment.name} has no snapshots: its circuit is "
                              "found on them (launched with --snapshots none, or before snapshots existed)")
    else:
        trials = [t for t in experiment.trials if t.snapshots]
        if not trials:
            raise ConfigError(f"{experiment.name} has no snapshots to find circuits on "
                              "(launched with --snapshots none, or before snapshots existed)")
    chosen = find_snapshot(trials[0].snapshots, request.at, f"trial {trials[0].trial_id} of {experiment.name}") \
        if request.at is not None else None
    if analyse is None:
        def analyse(chosen, measures):
            return analyse_experiment(experiment, measures, chosen)
    counts = analyse(trials, (analysis_name(request.task),))
    found = trial_circuits(experiment, read_table(experiment), request.task)
    documents = []
    for trial in trials:
        circuit = found[trial.trial_id]
        documents.append(circuit.document(circuit.at(chosen.step) if chosen else None))
    return {"experiment": experiment.name, "task": request.task, "edge_threshold": CircuitConfig().edge_threshold,
            "faithfulness_target": CircuitConfig().faithfulness, "computed_snapshots": counts["done"],
            "trials": documents}
