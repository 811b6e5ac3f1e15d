"""A model's edge graph by name, and the settings circuits are found with: free of torch, so the commands that
read circuits back from storage (`sweep circuit`, the atlas) name edges without loading the training stack.

Nodes: `embed` (token + position embedding), each head's output (`0.2`), each head's query, key and value
inputs (`1.2.q`, `1.2.k`, `1.2.v`), each MLP (`mlp0`: its input as a receiver, its output as a sender) and
`logits`. An edge is written `sender -> receiver`; model.causal computes on this graph.
"""

from __future__ import annotations

from dataclasses import dataclass

CIRCUIT_PREFIX = "circuit:"
"""The analysis table names a circuit measure `circuit:<task>` (the greedy circuit) or `circuit:<task>:acdc`."""
CIRCUIT_VERSION = 2
"""2: per-sequence intervals, the null of untrained models, isolating tasks, |effect| discovery, the panel."""

EMBED, LOGITS = "embed", "logits"
INPUT_KINDS = ("q", "k", "v")
METHODS = ("greedy", "acdc")
ROBUST_SPREAD = 0.2
"""A circuit whose faithfulness moves by more than this across the robustness panel is flagged as not robust."""


@dataclass(frozen=True)
class CircuitConfig:
    """How circuits are measured and found; recorded with every result (docs/circuits.md states each choice)."""

    sequences: int = 32
    """Clean (and as many corrupted) sequences every effect is averaged over; the intervals resample them."""
    positions: int = 8
    """Query positions read per sequence, evenly spaced over those the task measures: at a 50,257-token
    vocabulary the unembedding of every patched variant is the cost of a circuit."""
    faithfulness: float = 0.9
    """The circuit is the shortest prefix of the edges by |exact effect| that recovers this fraction."""
    min_effect: float = 0.01
    """Discovery considers the edges whose |effect| alone is at least this fraction of the difference: when they
    do not reach the target together, the circuit is reported as missing it."""
    edge_threshold: float = 0.1
    """An edge matters at a snapshot when the lower end of its effect's interval reaches this fraction."""
    persist: int = 2
    """An edge appears at the first snapshot where it matters and keeps mattering for this many snapshots more."""
    min_difference: float = 0.02
    """Nats: below this clean-to-corrupted difference the model does not do the task, and has no circuit."""
    min_sigmas: float = 4.0
    """Nor below this many standard errors of the per-sequence differences."""
    null_inits: int = 4
    """Fresh random initialisations of the model's shape whose difference is the task's null."""
    null_factor: float = 2.0
    """Nor below this multiple of the largest difference of the null: an untrained model's text KL grows with
    d_model (0.012 nats at 64, 0.024 at 128, 0.045 at 256), well above min_difference."""
    ig_steps: int = 10
    """EAP-IG: interpolation steps from the corrupted to the clean embedding, at their midpoints (Hanna et al. 2024
    use 5; at 5 the completeness error on the induction preset's 2-layer model is 0.049, at 10 a quarter of it)."""
    method: str = "greedy"
    """greedy: the prefix by |effect|; acdc: pruning in reverse topological order (both recorded either way)."""
    acdc_threshold: float = 0.02
    """ACDC removes an edge whose removal moves the metric by less than this fraction of the difference."""
    seed: int = 0
    """Seeds the task's inputs and the bootstrap: every snapshot of a run is measured on the same ones."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown circuit method {self.method!r}; methods: {', '.join(METHODS)}")


# ---------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Graph:
    """Senders, receivers and edges of a model, in the order the computation visits them."""

    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]
    """(sender index, receiver index), every sender before the receiver it writes to."""
    layers: int
    heads: int
    mlp: bool

    @property
    def edge_names(self) -> list[str]:
        return [f"{self.senders[s]} -> {self.receivers[r]}" for s, r in self.edges]

    def edge_index(self, sender: str, receiver: str) -> int:
        return self._index[(self.senders.index(sender), self.receivers.index(receiver))]

    @property
    def _index(self) -> dict[tuple[int, int], int]:
        return {edge: i for i, edge in enumerate(self.edges)}

    def senders_before(self, layer: int, mlp: bool = False) -> int:
        """How many senders write before layer `layer`'s attention (with `mlp`: before its MLP)."""
        per_layer = self.heads + (1 if self.mlp else 0)
        return 1 + layer * per_layer + (self.heads if mlp else 0)


def build_graph(layers: int, heads: int, mlp: bool = False) -> Graph:
    """The edge graph of a model with these shapes."""
    senders = [EMBED]
    receivers: list[str] = []
    edges: list[tuple[int, int]] = []
    for layer in range(layers):
        before = len(senders)
        for kind in INPUT_KINDS:
            for head in range(heads):
                receivers.append(f"{layer}.{head}.{kind}")
                edges += [(s, len(receivers) - 1) for s in range(before)]
        senders += [f"{layer}.{head}" for head in range(heads)]
        if mlp:
            receivers.append(f"mlp{layer}")
            edges += [(s, len(receivers) - 1) for s in range(len(senders))]
            senders.append(f"mlp{layer}")
    receivers.append(LOGITS)
    edges += [(s, len(receivers) - 1) for s in range(len(senders))]
    return Graph(tuple(senders), tuple(receivers), tuple(edges), layers, heads, mlp)


def edge_kind(edge: str) -> str:
    """What an edge is, whatever its heads: `embed -> q` (a head's query read from the embedding),
    `head -> k` (K-composition), `head -> logits` (a head's direct path), `embed -> logits` (bigrams),
    `mlp -> v`, `head -> mlp`..."""
    sender, receiver = edge.split(" -> ")

    def node(name: str, receiving: bool) -> str:
        if name in (EMBED, LOGITS) or name.startswith("mlp"):
            return "mlp" if name.startswith("mlp") else name
        return name.rsplit(".", 1)[1] if receiving else "head"

    return f"{node(sender, False)} -> {node(receiver, True)}"


COMPOSITION_KINDS = {"head -> q": "Q-composition", "head -> k": "K-composition", "head -> v": "V-composition"}


def circuit_analysis(task: str, method: str = "greedy") -> str:
    """The analysis table's name of the circuit measure on `task` found by `method`."""
    return f"{CIRCUIT_PREFIX}{task}" + ("" if method == "greedy" else f":{method}")


def parse_circuit_analysis(name: str) -> tuple[str, str] | None:
    """(task, method) of a circuit measure's name; None for another measure."""
    if not name.startswith(CIRCUIT_PREFIX):
        return None
    task, _, method = name[len(CIRCUIT_PREFIX):].partition(":")
    return (task, method or "greedy") if (method or "greedy") in METHODS else None


ZERO_ESTIMATE = "the estimate is identically zero at the clean run (a KL metric's gradient vanishes there)"


def jaccard(first: list[str], second: list[str]) -> float | None:
    """|A & B| / |A | B| of two circuits' edges (None when both are empty)."""
    union = set(first) | set(second)
    return len(set(first) & set(second)) / len(union) if union else None
