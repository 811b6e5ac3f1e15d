"""A snapshot's causal circuit on a task, with what a reviewer asks of it: the null it clears, intervals on every
effect and on faithfulness, the robustness panel, and how far the estimates (EAP, EAP-IG) agree with the truth.

After Wang et al. 2022 (path patching), Conmy et al. 2023 (ACDC), Syed et al. 2023 (EAP), Hanna et al. 2024
(EAP-IG) and Miller et al. 2024 (the robustness of circuit metrics). The pieces: model.tasks (inputs and
metrics), model.patching (the graph's computation, exact effects, the estimates), model.discovery (the circuit
and the panel), model.intervals (bootstrap and appearance).

- Does the model do the task? The clean run must beat the corrupted one by at least `min_difference` nats,
  `min_sigmas` standard errors of the per-sequence differences, and `null_factor` times the largest difference
  of `null_inits` fresh random initialisations of the same shape on the same inputs (the task's null; cached per
  shape). Otherwise there is nothing for a circuit to explain, and no effect is reported.
- Edge effect: the metric's change when that edge alone carries its corrupted value (exact, resample noising),
  as a fraction of the clean-to-corrupted difference; a percentile bootstrap over sequences gives its interval.
- The circuit: the shortest prefix by |effect| recovering `faithfulness` of the difference, pruned to the
  edges on a path from the embedding to the logits (or ACDC's, with `method` acdc), its faithfulness with an
  interval, and the robustness panel.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .discovery import greedy_circuit, kept_metric, panel_spread, prune_circuit, robustness_panel
from .edges import EMBED, ROBUST_SPREAD, ZERO_ESTIMATE, CircuitConfig
from .intervals import bootstrap_indices, ratio_interval
from .patching import PatchedModel, attribution_effects, exact_effects
from .paths import cache_dir
from .tasks import TaskData, TaskInputs, get_task
from .transformer import Transformer

NULL_SEED = 1_000_003
"""Seeds the null's random initialisations (the i-th is NULL_SEED + i): never a trial's own seed."""


# ---------------------------------------------------------------- the null


def _inputs(model: Transformer, data: TaskData, task: str, cfg: CircuitConfig) -> TaskInputs:
    return get_task(task).inputs(model, data, torch.Generator().manual_seed(cfg.seed), cfg.sequences, cfg.positions)


def _null_key(model: Transformer, data: TaskData, task: str, cfg: CircuitConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([asdict(model.cfg), task, cfg.sequences, cfg.positions, cfg.seed, cfg.null_inits],
                             sort_keys=True).encode())
    for tensor in (data.held_out, data.tokens):
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


_NULLS: dict[str, list[float]] = {}


def task_null(model: Transformer, data: TaskData, task: str, cfg: CircuitConfig = CircuitConfig()) -> list[float]:
    """The clean-to-corrupted difference of `null_inits` fresh random initialisations of `model`'s shape on the
    task's inputs (seeded; cached in this process and under the cache folder, per shape, task and data)."""
    key = _null_key(model, data, task, cfg)
    if key in _NULLS:
        return _NULLS[key]
    path = cache_dir() / "circuit-nulls" / f"{key}.json"
    try:
        _NULLS[key] = json.loads(path.read_text())
        return _NULLS[key]
    except (OSError, ValueError):
        pass
    differences = []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for index in range(cfg.null_inits):
            torch.manual_seed(NULL_SEED + index)
            untrained = Transformer(model.cfg).to(device).eval()
            patched = PatchedModel(untrained, _inputs(untrained, data, task, cfg), get_task(task))
            differences.append(patched.difference)
    _NULLS[key] = differences
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{id(differences)}.tmp")
        partial.write_text(json.dumps(differences))
        partial.replace(path)
    except OSError:  # a read-only cache only costs the recomputation
        pass
    return differences


# ---------------------------------------------------------------- the result


@dataclass
class CircuitResult:
    """One snapshot's circuit on one task: every edge's effect with its interval, the circuit, its faithfulness
    with its interval, the robustness panel, the estimates and the null."""

    task: str
    edges: list[str]
    clean_metric: float
    corrupted_metric: float
    difference_se: float
    """Standard error of the clean-to-corrupted difference over the task's sequences."""
    null: list[float]
    """The difference of each of the null's random initialisations."""
    change: list[float]
    """Exact patching: the metric's change in nats when the edge alone is corrupted (mean over sequences)."""
    effect_low: list[float]
    effect_high: list[float]
    """The change's 95% bootstrap interval as a fraction of the difference (NaN where the model does not do the
    task)."""
    eap: list[float]
    eap_ig: list[float]
    circuit: list[str] = field(default_factory=list)
    """The circuit's edges, largest |effect| first (empty: the model does not do the task)."""
    faithfulness: float | None = None
    faithfulness_low: float | None = None
    faithfulness_high: float | None = None
    target_reached: bool | None = None
    """Whether the circuit reached the faithfulness target (when not: the most faithful prefix)."""
    other_circuit: list[str] | None = None
    """With method acdc, the greedy circuit beside it (and the other way round when asked for)."""
    panel: dict[str, float | None] = field(default_factory=dict)
    config: CircuitConfig = field(default_factory=CircuitConfig)

    @property
    def difference(self) -> float:
        return self.corrupted_metric - self.clean_metric

    @property
    def null_bound(self) -> float:
        """The difference the model must reach to clear the null."""
        return self.config.null_factor * max(self.null, default=0.0)

    @property
    def does_task(self) -> bool:
        return self.gate() is None

    def gate(self) -> str | None:
        """Why the model does not do the task (None: it does)."""
        cfg = self.config
        if self.difference < cfg.min_difference:
            return f"difference {self.difference:.4f} nats is below {cfg.min_difference:g}"
        if self.difference < cfg.min_sigmas * self.difference_se:
            return f"difference {self.difference:.4f} nats is within {cfg.min_sigmas:g} standard errors"
        if self.difference < self.null_bound:
            return (f"difference {self.difference:.4f} nats does not clear the null ({cfg.null_factor:g} x "
                    f"{max(self.null):.4f} nats of untrained models of this shape)")
        return None

    def fractions(self, values: list[float]) -> list[float | None]:
        """Changes as fractions of the clean-to-corrupted difference (None where the model does not do the task)."""
        return [value / self.difference if self.does_task else None for value in values]

    @property
    def effects(self) -> list[float | None]:
        return self.fractions(self.change)

    def above_threshold(self) -> list[str]:
        """Edges that matter: the lower end of the effect's interval >= the edge threshold."""
        if not self.does_task:
            return []
        return [e for e, low in zip(self.edges, self.effect_low) if low >= self.config.edge_threshold]

    @property
    def panel_spread(self) -> float | None:
        return panel_spread(self.panel)

    @property
    def robust(self) -> bool | None:
        spread = self.panel_spread
        return None if spread is None else spread <= ROBUST_SPREAD

    def estimate_is_zero(self, estimates: list[float]) -> bool:
        scale = max((abs(value) for value in self.change), default=0.0)
        return max((abs(value) for value in estimates), default=0.0) <= max(1e-9, 1e-6 * scale)

    def agreement(self, estimates: list[float]) -> dict[str, Any]:
        """How an estimate ranks the edges against exact patching: Spearman and Pearson over all edges, and the
        fraction of the circuit among the estimate's top |circuit| edges; null, with the reason, where the
        estimate is identically zero (rounding noise would give numbers that mean nothing)."""
        if not self.does_task:
            return {"spearman": None, "pearson": None, "circuit_recall": None, "reason": "no edge was patched"}
        if self.estimate_is_zero(estimates):
            return {"spearman": None, "pearson": None, "circuit_recall": None, "reason": ZERO_ESTIMATE}
        exact = torch.tensor(self.change, dtype=torch.float64)
        estimate = torch.tensor(estimates, dtype=torch.float64)
        top = set(self.edges[i] for i in estimate.abs().argsort(descending=True)[: len(self.circuit)].tolist())
        recall = len(top & set(self.circuit)) / len(self.circuit) if self.circuit else None
        return {"spearman": _correlation(_ranks(exact), _ranks(estimate)), "pearson": _correlation(exact, estimate),
                "circuit_recall": recall, "reason": None}

    @property
    def completeness_error(self) -> float | None:
        """EAP-IG over the embedding's edges against the true difference, as a fraction of it (the integrated
        gradient along the input's path sums to the difference; the midpoint rule's error is what remains)."""
        if abs(self.difference) < 1e-12:
            return None
        total = sum(value for edge, value in zip(self.edges, self.eap_ig) if edge.startswith(f"{EMBED} -> "))
        return (total - self.difference) / self.difference

    def document(self) -> dict[str, Any]:
        effects, eap, eap_ig = self.effects, self.fractions(self.eap), self.fractions(self.eap_ig)
        return {
            "task": self.task, "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric,
            "difference": self.difference, "difference_se": self.difference_se, "does_task": self.does_task,
            "gate": self.gate(), "null": self.null, "null_bound": self.null_bound,
            "faithfulness": self.faithfulness, "faithfulness_interval": [self.faithfulness_low,
                                                                         self.faithfulness_high],
            "target_reached": self.target_reached, "circuit": self.circuit, "other_circuit": self.other_circuit,
            "panel": self.panel, "panel_spread": self.panel_spread, "robust": self.robust,
            "edges": [{"edge": e, "effect": effects[i], "interval": [_finite(self.effect_low[i]),
                                                                     _finite(self.effect_high[i])],
                       "change": _finite(self.change[i]), "eap": eap[i], "eap_ig": eap_ig[i]}
                      for i, e in enumerate(self.edges)],
            "agreement": {"eap": self.agreement(self.eap), "eap_ig": self.agreement(self.eap_ig)},
            "eap_ig_completeness_error": self.completeness_error,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    for value in values.unique():  # ties share their mean rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    scale = float(a.norm() * b.norm())
    return float((a * b).sum()) / scale if scale > 0 else None


# ---------------------------------------------------------------- finding it


@torch.no_grad()  # EAP and EAP-IG turn gradients on for their own backward passes
def find_circuit(model: Transformer, data: TaskData, task: str = "induction",
                 cfg: CircuitConfig = CircuitConfig(), null: list[float] | None = None) -> CircuitResult:
    """Exact effects (with intervals), EAP and EAP-IG of every edge of `model` on `task`; where the model does the
    task, its circuit, the circuit's faithfulness (with its interval) and the robustness panel. `null`: the task's
    null differences, computed (and cached) when not given."""
    chosen = get_task(task)
    was_training = model.training
    model.eval()
    try:
        inputs = _inputs(model, data, task, cfg)
        patched = PatchedModel(model, inputs, chosen)
        edges = patched.graph.edge_names
        unmeasured = [math.nan] * len(edges)
        result = CircuitResult(
            task, edges, patched.clean_metric, patched.corrupted_metric, patched.difference_se,
            null if null is not None else task_null(model, data, task, cfg), unmeasured, unmeasured, unmeasured,
            unmeasured, unmeasured, config=cfg)
        if not result.does_task:  # nothing for a circuit to explain: no edge is patched
            return result
        per_sequence = exact_effects(patched)  # [E, B] nats
        differences = (patched.corrupted_values - patched.clean_values).cpu().numpy()
        indices = bootstrap_indices(len(differences), cfg.seed)
        low, high = ratio_interval(per_sequence.cpu().numpy(), differences, indices)
        change = per_sequence.mean(-1)
        result.change, result.effect_low, result.effect_high = change.tolist(), low.tolist(), high.tolist()
        result.eap = attribution_effects(patched, steps=1).tolist()
        result.eap_ig = attribution_effects(patched, steps=cfg.ig_steps).tolist()
        greedy = greedy_circuit(patched, change, cfg.faithfulness, cfg.min_effect)
        kept, values, reached = greedy.kept, greedy.values, greedy.reached
        if cfg.method == "acdc":
            kept, faithful = prune_circuit(patched, cfg.acdc_threshold)
            result.other_circuit = [edges[i] for i in greedy.kept]
            values = kept_metric(patched, [kept])[0]
            reached = faithful >= cfg.faithfulness
        kept_values = (patched.corrupted_values - values).cpu().numpy()
        faithful_low, faithful_high = ratio_interval(kept_values, differences, indices)
        result.circuit = [edges[i] for i in kept]
        result.faithfulness = float(kept_values.mean() / differences.mean())
        result.faithfulness_low, result.faithfulness_high = float(faithful_low), float(faithful_high)
        result.target_reached = bool(reached)
        result.panel = robustness_panel(model, inputs, chosen, kept, cfg.min_difference)
        return result
    finally:
        model.train(was_training)

