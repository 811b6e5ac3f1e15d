"""Causal circuits read back from the analysis table: each trial's circuit at every snapshot and when its edges
appeared (`sweep circuit`, the atlas and the report read them from here).

The rows are those `sweep analyse --what circuit:TASK` writes (model.measures, analysis `circuit:<task>`):
per snapshot, every edge's effect (a fraction of the clean-to-corrupted difference) with its 95% interval, change
in nats, EAP and EAP-IG estimates, the circuit's edges by rank, faithfulness with its interval, the null the
snapshot cleared and the robustness panel. An edge appeared at the first snapshot whose interval's lower end
cleared the edge threshold and stayed clear for `persist` more (model.intervals.appearance).

model.causal (torch) is imported only where circuits are computed: reading them back needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from model.config import ConfigError
from model.edges import (
    CIRCUIT_PREFIX,
    CIRCUIT_VERSION,
    COMPOSITION_KINDS,
    ROBUST_SPREAD,
    ZERO_ESTIMATE,
    CircuitConfig,
    circuit_analysis,
    edge_kind,
    jaccard,
    parse_circuit_analysis,
)
from model.intervals import Appearance, appearance
from model.roles import head_roles, role_edge, role_edges

from .analyse import analyse_experiment
from .records import Experiment
from .results import choose_trial
from .table import read_table
from .trajectory import find_snapshot

EDGE_MEASURES = ("edge_effect", "edge_effect_low", "edge_effect_high", "edge_change", "edge_eap", "edge_eap_ig")
RANK_MEASURES = ("circuit_rank", "other_rank")
SNAPSHOT_MEASURES = (
    "clean_metric",
    "corrupted_metric",
    "difference_se",
    "null_bound",
    "null_max",
    "does_task",
    "faithfulness",
    "faithfulness_low",
    "faithfulness_high",
    "target_reached",
    "circuit_edges",
    "panel_spread",
    "eap_ig_completeness_error",
    "eap_spearman",
    "eap_pearson",
    "eap_circuit_recall",
    "eap_zero",
    "eap_ig_spearman",
    "eap_ig_pearson",
    "eap_ig_circuit_recall",
    "eap_ig_zero",
)


@dataclass
class SnapshotCircuit:
    """One snapshot's circuit as the table holds it."""

    step: int
    tokens_seen: int
    values: dict[str, float | None]
    """SNAPSHOT_MEASURES and `panel:...` (None where NaN: no circuit, no agreement)."""
    edges: dict[str, dict[str, float | None]]
    """edge -> effect, effect_low, effect_high, change, eap, eap_ig."""
    circuit: list[str]
    """The circuit's edges, largest |effect| first."""
    other: list[str] = field(default_factory=list)
    """The other method's circuit, where it was found (ACDC beside the greedy prefix)."""

    @property
    def faithfulness(self) -> float | None:
        return self.values.get("faithfulness")

    @property
    def difference(self) -> float | None:
        clean, corrupted = self.values.get("clean_metric"), self.values.get("corrupted_metric")
        return None if clean is None or corrupted is None else corrupted - clean

    @property
    def panel(self) -> dict[str, float | None]:
        return {name.removeprefix("panel:"): value for name, value in self.values.items() if name.startswith("panel:")}

    def document(self) -> dict[str, Any]:
        """What a snapshot's circuit says of itself: the difference in nats beside faithfulness and its interval,
        whether the target was reached, the null, the panel."""
        values = self.values
        spread = values.get("panel_spread")
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "difference": self.difference,
            "clean_metric": values.get("clean_metric"), "corrupted_metric": values.get("corrupted_metric"),
            "difference_se": values.get("difference_se"), "null_bound": values.get("null_bound"),
            "does_task": bool(values.get("does_task")), "faithfulness": self.faithfulness,
            "faithfulness_interval": [values.get("faithfulness_low"), values.get("faithfulness_high")],
            "target_reached": None if values.get("target_reached") is None else bool(values["target_reached"]),
            "circuit_edges": len(self.circuit), "panel": self.panel, "panel_spread": spread,
            "robust": None if spread is None else spread <= ROBUST_SPREAD,
        }


@dataclass
class TrialCircuit:
    """A trial's circuit at every analysed snapshot, and when each edge appeared."""

    trial_id: str
    config: dict[str, Any]
    snapshots: list[SnapshotCircuit]
    settings: CircuitConfig = field(default_factory=CircuitConfig)
    appeared: dict[str, Appearance] = field(default_factory=dict)
    """edge -> where it appeared: the first snapshot whose interval's lower end cleared the edge threshold and
    stayed clear for `persist` more, with the snapshot before it."""

    def __post_init__(self) -> None:
        tokens = [s.tokens_seen for s in self.snapshots]
        for edge in {edge for snapshot in self.snapshots for edge in snapshot.edges}:
            lows = [s.edges.get(edge, {}).get("effect_low") for s in self.snapshots]
            found = appearance(lows, tokens, self.settings.edge_threshold, self.settings.persist)
            if found is not None:
                self.appeared[edge] = found

    @property
    def last(self) -> SnapshotCircuit:
        return self.snapshots[-1]

    def at(self, step: int) -> SnapshotCircuit | None:
        return next((s for s in self.snapshots if s.step == step), None)

    def appeared_step(self, edge: str) -> int | None:
        found = self.appeared.get(edge)
        return None if found is None else self.snapshots[found.index].step

    def order(self, snapshot: SnapshotCircuit | None = None) -> list[str]:
        """The circuit's edges (at `snapshot`, default the last) in the order they appeared; an edge of the circuit
        that never appeared by itself comes last."""
        chosen = snapshot or self.last
        never = math.inf
        return sorted(chosen.circuit, key=lambda e: (self.appeared[e].tokens_at if e in self.appeared else never,
                                                     chosen.circuit.index(e)))

    def kinds(self, snapshot: SnapshotCircuit | None = None) -> dict[str, dict[str, Any]]:
        """The circuit's edges by kind (`head -> k`...): how many, and the tokens at which the first appeared."""
        found: dict[str, dict[str, Any]] = {}
        for edge in (snapshot or self.last).circuit:
            entry = found.setdefault(edge_kind(edge), {"edges": 0, "first_tokens": None})
            entry["edges"] += 1
            if edge in self.appeared:
                tokens = self.appeared[edge].tokens_at
                entry["first_tokens"] = tokens if entry["first_tokens"] is None else min(entry["first_tokens"], tokens)
        return found

    def appeared_kinds(self) -> dict[str, int]:
        """Edge kind -> the tokens at which its first edge appeared, over every edge that appeared (in the last
        circuit or not): a kind that appeared and was later replaced still appeared."""
        found: dict[str, int] = {}
        for edge, where in self.appeared.items():
            kind = edge_kind(edge)
            found[kind] = min(found.get(kind, where.tokens_at), where.tokens_at)
        return dict(sorted(found.items()))

    def roles(self) -> dict[str, str]:
        """head -> its role in the last snapshot's circuit (model.roles): what replicates are matched by."""
        return head_roles(self.last.circuit)

    def role_appeared(self) -> dict[str, int]:
        """role-edge -> the tokens at which its first edge appeared (heads named by their roles at the end)."""
        roles, found = self.roles(), {}
        for edge, where in self.appeared.items():
            name = role_edge(edge, roles)
            found[name] = min(found.get(name, where.tokens_at), where.tokens_at)
        return dict(sorted(found.items()))

    def does_task_from(self) -> int | None:
        """tokens_seen of the first snapshot from which the model does the task at every later snapshot."""
        found = None
        for snapshot in self.snapshots:
            found = (found or snapshot.tokens_seen) if snapshot.values.get("does_task") else None
        return found

    def edge_document(self, edge: str, snapshot: SnapshotCircuit) -> dict[str, Any]:
        first = self.appeared.get(edge)
        values = snapshot.edges[edge]
        return {"edge": edge, "kind": edge_kind(edge), **values,
                "interval": [values.get("effect_low"), values.get("effect_high")],
                "rank": snapshot.circuit.index(edge) + 1 if edge in snapshot.circuit else None,
                "appeared": {"step": self.snapshots[first.index].step, "tokens_seen": first.tokens_at,
                             "after_tokens": first.tokens_after} if first else None}

    def document(self, snapshot: SnapshotCircuit | None = None) -> dict[str, Any]:
        """The `sweep circuit --json` entry of this trial at `snapshot` (default the last)."""
        chosen = snapshot or self.last
        values = chosen.values
        agreement = {}
        for estimate in ("eap", "eap_ig"):
            zero = bool(values.get(f"{estimate}_zero"))
            reason = "no edge was patched" if not values.get("does_task") else ZERO_ESTIMATE if zero else None
            agreement[estimate] = {name: None if reason else values.get(f"{estimate}_{name}")
                                   for name in ("spearman", "pearson", "circuit_recall")}
            agreement[estimate]["reason"] = reason
        overlap = jaccard(chosen.circuit, chosen.other) if chosen.other else None
        return {
            "trial_id": self.trial_id, "config": self.config, "snapshot": {"step": chosen.step,
                                                                           "tokens_seen": chosen.tokens_seen},
            **chosen.document(),
            "edges_in_graph": len(chosen.edges),
            "circuit": [self.edge_document(edge, chosen) for edge in chosen.circuit],
            "other_circuit": chosen.other, "overlap": overlap,
            "order": self.order(chosen),
            "kinds": self.kinds(chosen),
            "agreement": agreement,
            "eap_ig_completeness_error": values.get("eap_ig_completeness_error"),
            "snapshots": [s.document() for s in self.snapshots],
        }


def tasks_in(table: pa.Table | None) -> list[str]:
    """The circuit tasks the table holds at the current version (by either method)."""
    if table is None:
        return []
    rows = table.filter(pc.and_(pc.starts_with(table["analysis"], CIRCUIT_PREFIX),
                                pc.equal(table["version"], CIRCUIT_VERSION)))
    found = (parse_circuit_analysis(name) for name in pc.unique(rows["analysis"]).to_pylist())
    return sorted({parsed[0] for parsed in found if parsed is not None})


def trial_circuits(experiment: Experiment, table: pa.Table | None, task: str = "induction",
                   method: str = "greedy") -> dict[str, TrialCircuit]:
    """trial -> its circuit found by `method` over the snapshots the table holds for `task` (trials without any are
    left out)."""
    if table is None:
        return {}
    rows = table.filter(pc.and_(pc.equal(table["analysis"], circuit_analysis(task, method)),
                                pc.equal(table["version"], CIRCUIT_VERSION)))
    if rows.num_rows == 0:
        return {}
    columns = ("trial", "step", "tokens_seen", "measure", "value", "sender", "receiver")
    by_snapshot: dict[tuple[str, int], dict[str, Any]] = {}
    for trial, step, tokens, measure, value, sender, receiver in zip(*(rows[c].to_pylist() for c in columns)):
        entry = by_snapshot.setdefault((trial, step), {"tokens": tokens, "values": {}, "edges": {},
                                                       **{rank: {} for rank in RANK_MEASURES}})
        value = None if value is None or not math.isfinite(value) else value
        if sender is None:
            entry["values"][measure] = value
        elif measure in RANK_MEASURES:
            entry[measure][f"{sender} -> {receiver}"] = value
        elif measure in EDGE_MEASURES:
            entry["edges"].setdefault(f"{sender} -> {receiver}", {})[measure.removeprefix("edge_")] = value
    configs = {t.trial_id: t.config for t in experiment.trials}
    found: dict[str, list[SnapshotCircuit]] = {}
    for (trial, step), entry in sorted(by_snapshot.items(), key=lambda item: (item[0][0], item[0][1])):
        circuit = sorted(entry["circuit_rank"], key=entry["circuit_rank"].get)
        other = sorted(entry["other_rank"], key=entry["other_rank"].get)
        found.setdefault(trial, []).append(SnapshotCircuit(step, entry["tokens"], entry["values"], entry["edges"],
                                                           circuit, other))
    return {trial: TrialCircuit(trial, configs.get(trial, {}), snapshots)
            for trial, snapshots in found.items() if trial in configs}


def composition_edges(circuit: list[str]) -> list[str]:
    """The circuit's edges from one head into a later head's query, key or value."""
    return [edge for edge in circuit if edge_kind(edge) in COMPOSITION_KINDS]


def circuit_summary(circuit: TrialCircuit) -> dict[str, Any]:
    """What the atlas shows of a trial's circuit at its last snapshot: its size, faithfulness, composition edges,
    its edges by kind, and when the first and the last of its edges appeared."""
    last = circuit.last
    appeared = [circuit.appeared[e].tokens_at for e in last.circuit if e in circuit.appeared]
    composition = composition_edges(last.circuit)
    composed = [circuit.appeared[e].tokens_at for e in composition if e in circuit.appeared]
    return {"edges": len(last.circuit), "faithfulness": last.faithfulness, "difference": last.difference,
            "faithfulness_interval": [last.values.get("faithfulness_low"), last.values.get("faithfulness_high")],
            "target_reached": last.document()["target_reached"], "robust": last.document()["robust"],
            "composition_edges": len(composition),
            "composition_appeared_at": min(composed, default=None), "first_appeared_at": min(appeared, default=None),
            "complete_at": max(appeared, default=None), "kinds": circuit.kinds(),
            "appeared_kinds": circuit.appeared_kinds(), "last_tokens": last.tokens_seen,
            "roles": circuit.roles(), "role_edges": role_edges(last.circuit, circuit.roles()),
            "role_appeared": circuit.role_appeared(), "does_task_from": circuit.does_task_from(),
            "circuit": list(last.circuit)}


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
    method: str = "greedy"
    """greedy (the prefix by |effect|) or acdc (ACDC's, with the greedy circuit and their overlap beside it)."""


def circuits_of(experiment: Experiment, request: CircuitRequest, analyse=None) -> dict[str, Any]:
    """The circuits `request` names: computed first where the analysis table lacks them (`analyse(trials,
    measures)`, default sweep.analyse.analyse_experiment on a local Ray), then read back. Every mistake (an
    unknown task, trial or step, a trial without snapshots) is a ConfigError raised before anything is computed
    or written."""
    from model.tasks import get_task

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
    counts = analyse(trials, (circuit_analysis(request.task, request.method),))
    found = trial_circuits(experiment, read_table(experiment), request.task, request.method)
    documents = []
    for trial in trials:
        circuit = found[trial.trial_id]
        documents.append(circuit.document(circuit.at(chosen.step) if chosen else None)
                         | {key: trial.metrics.get(key) for key in ("induction_formed_at", "prev_token_formed_at")})
    settings = CircuitConfig()
    return {"experiment": experiment.name, "task": request.task, "method": request.method,
            "edge_threshold": settings.edge_threshold,
            "persist": settings.persist, "faithfulness_target": settings.faithfulness,
            "robust_spread": ROBUST_SPREAD, "computed_snapshots": counts["done"],
            "trials": documents}
