"""Finding a circuit from exact effects, and measuring it: the greedy prefix by |effect|, ACDC-style pruning
(Conmy et al. 2023), the edges on a path from the embedding to the logits, and the robustness panel of Miller et
al. 2024 (faithfulness under resample and mean ablation, noising and denoising, two metrics).

Faithfulness of a kept edge set is (M_ablated - M_kept) / (M_ablated - M_clean): 1 when the kept edges alone
recover the model's behaviour, 0 when they recover none of it. It can exceed 1: the kept edges can do better than
the whole model, when edges left out worked against the task; it is shown as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .edges import EMBED, LOGITS, Graph
from .patching import ABLATIONS, DIRECTIONS, Ablation, PatchedModel
from .tasks import CircuitTask, TaskInputs
from .transformer import Transformer


def _receiver_node(receiver: str) -> str | None:
    """The node a receiver belongs to: `1.2.k` -> head `1.2`, `mlp0` -> `mlp0`, the logits -> None."""
    if receiver == LOGITS:
        return None
    return receiver if receiver.startswith("mlp") else receiver.rsplit(".", 1)[0]


def connected_edges(graph: Graph, kept: list[int]) -> list[int]:
    """The edges of `kept` on a path from the embedding to the logits through kept edges, in `kept`'s order."""
    chosen = set(kept)
    reachable = {EMBED}
    for index, (sender, receiver) in enumerate(graph.edges):  # senders come before the receivers they write to
        node = _receiver_node(graph.receivers[receiver])
        if index in chosen and graph.senders[sender] in reachable and node is not None:
            reachable.add(node)
    useful: set[str] = set()
    for index in reversed(range(len(graph.edges))):
        sender, receiver = graph.edges[index]
        node = _receiver_node(graph.receivers[receiver])
        if index in chosen and (node is None or node in useful):
            useful.add(graph.senders[sender])

    def on_a_path(index: int) -> bool:
        sender, receiver = graph.edges[index]
        node = _receiver_node(graph.receivers[receiver])
        return graph.senders[sender] in reachable and (node is None or node in useful)

    return [index for index in kept if on_a_path(index)]


def kept_masks(patched: PatchedModel, kept: list[list[int]]) -> torch.Tensor:
    masks = torch.zeros(len(kept), len(patched.graph.edges), device=patched.device)
    for row, ids in enumerate(kept):
        masks[row, ids] = 1.0
    return masks


def kept_metric(patched: PatchedModel, kept: list[list[int]]) -> torch.Tensor:
    """For each set of kept edge ids (resample noising): the metric per sequence [K, B] with only them clean
    (faithfulness() turns it into the fraction of the difference recovered)."""
    return patched.evaluate(kept_masks(patched, kept))


def faithfulness(patched: PatchedModel, values: torch.Tensor) -> torch.Tensor:
    """Faithfulness [K] of per-sequence metrics [K, B] of kept sets, under resample noising."""
    return (patched.corrupted_metric - values.mean(-1)) / patched.difference


@dataclass(frozen=True)
class Discovery:
    """A circuit found: its edge ids, the metric per sequence with only them kept, and whether it reached the
    faithfulness target (when not: the best prefix, and how far it got)."""

    kept: list[int]
    values: torch.Tensor
    """[B] the metric of each sequence with only the circuit kept."""
    faithfulness: float
    reached: bool


def greedy_circuit(patched: PatchedModel, change: torch.Tensor, target: float, min_effect: float) -> Discovery:
    """The shortest prefix of the edges by |exact effect| (largest first, among those whose |effect| is at least
    `min_effect` of the difference), pruned to the edges on a path from the embedding to the logits, whose model
    recovers `target` of the difference, found by bisection over the prefixes' lengths (a prefix's faithfulness
    grows with its length but for noise: the prefix found reaches the target and the one an edge shorter does not).
    When even the longest does not reach it, the most faithful prefix measured is returned, marked as missing."""
    floor = min_effect * abs(patched.difference)
    order = [i for i in change.abs().argsort(descending=True).tolist() if abs(float(change[i])) >= floor]
    measured: dict[int, tuple[list[int], torch.Tensor, float]] = {}

    def measure(size: int) -> float:
        if size not in measured:
            kept = connected_edges(patched.graph, order[:size])
            values = kept_metric(patched, [kept])[0]
            measured[size] = (kept, values, float(faithfulness(patched, values[None])[0]))
        return measured[size][2]

    if not order:  # no edge moves the metric
        return Discovery([], patched.corrupted_values, 0.0, False)
    if measure(len(order)) < target:
        kept, values, faithful = max(measured.values(), key=lambda entry: entry[2])
        return Discovery(kept, values, faithful, False)
    low, high = 0, len(order)  # measure(high) reaches the target; a prefix of `low` edges does not (or is empty)
    while high - low > 1:
        middle = (low + high) // 2
        if measure(middle) >= target:
            high = middle
        else:
            low = middle
    kept, values, faithful = measured[high]
    return Discovery(kept, values, faithful, True)


def prune_circuit(patched: PatchedModel, threshold: float) -> tuple[list[int], float]:
    """ACDC-style (Conmy et al. 2023): from the whole graph, visit the receivers in reverse topological order
    and remove each incoming edge whose removal, given the edges already removed, moves the metric by less than
    `threshold` of the difference (either way). Of two heads that back each other up, the one visited first is
    removed (the other still carries the behaviour) and the other kept. Returns the kept edges, on a path from
    the embedding to the logits, and their faithfulness."""
    graph = patched.graph
    mask = torch.ones(1, len(graph.edges), device=patched.device)
    current = float(patched.evaluate(mask)[0].mean())
    for receiver in reversed(range(len(graph.receivers))):
        for edge in [i for i, (_, r) in enumerate(graph.edges) if r == receiver]:
            trial = mask.clone()
            trial[0, edge] = 0.0
            value = float(patched.evaluate(trial)[0].mean())
            if abs(value - current) < threshold * abs(patched.difference):
                mask, current = trial, value
    kept = connected_edges(graph, mask[0].nonzero().flatten().tolist())
    return kept, float(faithfulness(patched, kept_metric(patched, [kept]))[0])


def robustness_panel(model: Transformer, inputs: TaskInputs, task: CircuitTask, kept: list[int],
                     min_difference: float) -> dict[str, float | None]:
    """Faithfulness of the kept edges under each ablation x direction x metric (Miller et al. 2024), keyed
    `resample/noising/loss`...; None where the ablated model differs from the clean one by less than
    `min_difference` nats (there is nothing to recover)."""
    panel: dict[str, float | None] = {}
    metrics = (task.metric, task.second_metric)
    for kind in ABLATIONS:
        for direction in DIRECTIONS:
            patched = PatchedModel(model, inputs, task, Ablation(kind, direction))
            ablated, circuit = patched.evaluate(kept_masks(patched, [[], kept]), metrics=metrics).mean(-1).unbind(-1)
            for index, metric in enumerate(metrics):
                clean = float(patched.metric(patched.clean_residual, metric).mean())
                scale = float(ablated[index]) - clean
                panel[f"{kind}/{direction}/{metric.name}"] = (
                    (float(ablated[index]) - float(circuit[index])) / scale if abs(scale) >= min_difference else None)
    return panel


def panel_spread(panel: dict[str, float | None]) -> float | None:
    values = [value for value in panel.values() if value is not None]
    return max(values) - min(values) if values else None
