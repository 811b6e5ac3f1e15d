"""Circuits found causally, edge by edge: path patching, edge attribution patching and circuit discovery.

After Wang et al. 2022 and Goldowsky-Dill et al. 2023 (path patching), Conmy et al. 2023 (ACDC),
Syed et al. 2023 (edge attribution patching, EAP) and Hanna et al. 2024 (EAP-IG).

The graph. Nodes: the embedding (token + position, `embed`), each head's output (`0.2`), each
head's query, key and value inputs (`1.2.q`, `1.2.k`, `1.2.v`), each MLP (`mlp0`: its input as a
receiver, its output as a sender) and the logits. The residual stream at any point is the sum of
what the senders before it wrote (the attention output projection has no bias; an MLP's biases are
part of what it writes), so an edge is one sender's additive contribution to one receiver's input,
before the receiver's LayerNorm. A 2-layer attention-only model with H heads a layer has
3H^2 + 8H + 1 edges (81 at H = 4).

A task is clean inputs, corrupted inputs and a metric (`CircuitTask`). Patching edge s -> r runs
the model with the receiver r seeing the corrupted run's value of s in place of the clean one,
everything else clean (downstream of r included, which then sees r's changed output). Its effect
is the metric's change as a fraction of the full clean-to-corrupted difference. Only what differs
between the two runs can show: with the positions the same in both, an edge whose values come
from positions alone has no effect by construction.

Exact patching is the ground truth and the default: every edge is patched by itself, in batches
of forward passes that start at the receiver's layer from the cached clean run. EAP estimates all
edges from one backward pass, (corrupted - clean sender value) . gradient at the receiver input;
EAP-IG averages that gradient over k inputs interpolated from the corrupted to the clean
embedding. Both are linear estimates: through a saturated softmax (a sharp attention pattern, a
confident prediction) the gradient vanishes and they miss edges exact patching finds.

The circuit at a snapshot: the smallest set of edges, taken in order of exact effect, whose model
(those edges clean, every other edge carrying its corrupted value) recovers at least
`CircuitConfig.faithfulness` of the difference. ACDC-style pruning (reverse topological order) is
the other way to find one (`prune_circuit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import ConfigError
from .edges import INPUT_KINDS, LOGITS, CircuitConfig, Graph, build_graph
from .transformer import Transformer


def model_graph(model: Transformer) -> Graph:
    return build_graph(model.cfg.n_layers, model.cfg.n_heads, model.cfg.mlp)


# ---------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskInputs:
    """One task's inputs for one model: clean and corrupted token ids [B, T] of the same shape, and where
    and against what the metric is measured."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    positions: torch.Tensor
    """Query positions [P] whose next-token predictions the metric reads."""
    targets: torch.Tensor | None = None
    """[B, P] the clean next tokens at those positions (metrics on the clean tokens' loss)."""


Metric = Callable[[torch.Tensor, torch.Tensor, torch.nn.Linear, torch.Tensor | None], torch.Tensor]
"""(normalised residual at the metric's positions [V, B, P, d_model], the clean run's there [1, B, P, d_model],
the unembedding, the clean next tokens there [B, P] or None) -> the metric of every variant [V]; larger is
worse (a loss, a divergence)."""


@dataclass(frozen=True)
class CircuitTask:
    """A task: how to draw its inputs and what its metric is. Add one to TASKS to measure it everywhere."""

    name: str
    description: str
    inputs: Callable[[Transformer, "TaskData", torch.Generator, int], TaskInputs]
    """(model, the run's data, a seeded generator, sequences) -> TaskInputs."""
    metric: Metric
    metric_name: str


@dataclass(frozen=True)
class TaskData:
    """What a run's tasks may draw on."""

    held_out: torch.Tensor
    """[N, T+1] held-out windows (PAD_ID marks padding)."""
    tokens: torch.Tensor
    """Ids of the tokens the training data contains: a task never draws another (`<unk>` and the end-of-text
    token of the repeat task are never trained to be predicted)."""


def _log_probs(unembed: torch.nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    return unembed(rows).float().log_softmax(-1)


def _rows_per_chunk(variants: int, unembed: torch.nn.Linear) -> int:
    """Rows of every variant unembedded at once: about 2^24 logits (the vocabulary may be 50,257 wide)."""
    return max(1, 2**24 // (unembed.weight.shape[0] * variants))


def next_token_loss(residual: torch.Tensor, clean: torch.Tensor, unembed: torch.nn.Linear,
                    targets: torch.Tensor | None) -> torch.Tensor:
    """Mean cross entropy of the clean next tokens `targets` [B, P] per variant, unembedded in chunks."""
    variants, batch, positions, width = residual.shape
    flat = residual.reshape(variants, batch * positions, width)
    flat_targets = targets.reshape(-1)
    total = torch.zeros(variants, device=residual.device)
    step = _rows_per_chunk(variants, unembed)
    for start in range(0, flat.shape[1], step):
        rows = flat[:, start : start + step]
        log_probs = _log_probs(unembed, rows)  # (V, n, vocab)
        picked = log_probs.gather(-1, flat_targets[start : start + step].expand(variants, -1)[..., None])
        total -= picked[..., 0].sum(-1)
    return total / flat.shape[1]


def kl_to_clean(residual: torch.Tensor, clean: torch.Tensor, unembed: torch.nn.Linear,
                targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(clean next-token distribution || patched one) per variant, over every measured position."""
    variants, batch, positions, width = residual.shape
    flat, flat_clean = residual.reshape(variants, -1, width), clean.reshape(-1, width)
    total = torch.zeros(variants, device=residual.device)
    step = _rows_per_chunk(variants + 1, unembed)
    for start in range(0, flat.shape[1], step):
        reference = _log_probs(unembed, flat_clean[start : start + step])  # (n, vocab)
        patched = _log_probs(unembed, flat[:, start : start + step])  # (V, n, vocab)
        total += (reference.exp() * (reference - patched)).sum(-1).sum(-1)
    return total / flat.shape[1]


def _distinct_rows(tokens: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[count, length] random draws from `tokens`, each row without repeats where there are enough tokens."""
    if len(tokens) >= length:
        return torch.stack([tokens[torch.randperm(len(tokens), generator=generator)[:length]] for _ in range(count)])
    return tokens[torch.randint(0, len(tokens), (count, length), generator=generator)]


def _differ_everywhere(clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """Swap tokens within each corrupted row until no position holds its clean token (rows keep their tokens,
    so a row without repeats stays without repeats)."""
    corrupted = corrupted.clone()
    for row in range(corrupted.shape[0]):
        for i in (clean[row] == corrupted[row]).nonzero().flatten().tolist():
            for j in range(corrupted.shape[1]):
                a, b = corrupted[row, i].item(), corrupted[row, j].item()
                if j != i and b != clean[row, i] and a != clean[row, j]:
                    corrupted[row, i], corrupted[row, j] = b, a
                    break
    return corrupted


def induction_inputs(model: Transformer, data: TaskData, generator: torch.Generator, sequences: int) -> TaskInputs:
    """Clean: random tokens r of length n = seq_len // 2 repeated, r + r (distinct where the vocabulary
    allows, as the head-score probe draws them). Corrupted: 2n fresh random tokens that do not repeat (where
    the training vocabulary has 2n tokens), differing from the clean ones at every position. Measured on the
    second copy from its second token on: what only a model that looks back can predict."""
    period = model.cfg.seq_len // 2
    if period < 2:
        raise ConfigError(f"the induction task needs seq_len >= 4 (the model's is {model.cfg.seq_len})")
    first = _distinct_rows(data.tokens, sequences, period, generator)
    clean = torch.cat([first, first], dim=1)
    corrupted = _differ_everywhere(clean, _distinct_rows(data.tokens, sequences, 2 * period, generator))
    positions = torch.arange(period, 2 * period - 1)
    return TaskInputs(clean, corrupted, positions, clean[:, positions + 1])


def text_inputs(model: Transformer, data: TaskData, generator: torch.Generator, sequences: int) -> TaskInputs:
    """Clean: held-out windows without padding. Corrupted: each window's tokens taken from another window.
    Measured at every position."""
    length = model.cfg.seq_len
    whole = data.held_out[(data.held_out[:, :length] >= 0).all(dim=1), :length]
    if len(whole) < 2:
        raise ConfigError("the text task needs at least 2 held-out windows without padding "
                          "(train with --pack, the default)")
    clean = whole[torch.randperm(len(whole), generator=generator)[:sequences]]
    return TaskInputs(clean, clean.roll(1, dims=0), torch.arange(length))


TASKS: dict[str, CircuitTask] = {
    "induction": CircuitTask(
        "induction", "r + r against 2n fresh tokens; loss of the clean next tokens on the second copy",
        induction_inputs, next_token_loss, "loss"),
    "text": CircuitTask(
        "text", "held-out windows against another window's tokens; KL to the clean next-token distribution",
        text_inputs, kl_to_clean, "kl"),
}


def get_task(name: str) -> CircuitTask:
    if name not in TASKS:
        raise ConfigError(f"unknown circuit task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------- running the graph


class PatchedModel:
    """A model's computation as its graph: every receiver's input assembled edge by edge, so any set of
    edges can carry its corrupted value (a mask), forward passes batched over masks ("variants")."""

    def __init__(self, model: Transformer, inputs: TaskInputs, task: CircuitTask) -> None:
        self.model, self.inputs, self.task = model, inputs, task
        self.graph = model_graph(model)
        self.device = next(model.parameters()).device
        self.cfg = model.cfg
        self.attention = []  # per layer: (W_Q, W_K, W_V [H, D, dh], W_O [H, dh, D])
        for block in model.blocks:
            attn = block.attn
            self.attention.append(tuple(w.detach().float() for w in (attn.W_Q, attn.W_K, attn.W_V, attn.W_O)))
        self._index = {edge: i for i, edge in enumerate(self.graph.edges)}
        self.attention_edges = [self._receiver_edges(layer) for layer in range(self.cfg.n_layers)]
        self.mlp_edges = [self._mlp_edges(layer) for layer in range(self.cfg.n_layers)] if self.cfg.mlp else []
        logits = self.graph.receivers.index(LOGITS)
        self.logit_edges = torch.tensor([self._index[(s, logits)] for s in range(len(self.graph.senders))],
                                        device=self.device)
        with torch.no_grad():
            self.clean_embed = self._embed(inputs.clean)
            self.corrupted_embed = self._embed(inputs.corrupted)
            corrupted, corrupted_residual = self.run(None, self.corrupted_embed)
            self.corrupted_senders = torch.stack([s[0] for s in corrupted])  # (S, B, T, D)
            clean, self.clean_residual = self.run(None, self.clean_embed)
            self.clean_senders = clean  # each (1, B, T, D)
            # what the receivers see of the corrupted run before each point: sums over the senders before it
            self.corrupted_prefix = torch.cat([torch.zeros_like(self.corrupted_senders[:1]),
                                               self.corrupted_senders.cumsum(0)])
            self.clean_metric = float(self.metric(self.clean_residual)[0])
            self.corrupted_metric = float(self.metric(corrupted_residual)[0])
            differences = self.per_sequence(corrupted_residual) - self.per_sequence(self.clean_residual)
            self.difference_se = float(differences.std() / math.sqrt(len(differences)))

    # --- pieces of the graph

    def _receiver_edges(self, layer: int) -> torch.Tensor:
        """[senders before layer, 3, H] edge ids into layer `layer`'s query, key and value inputs."""
        before, heads = self.graph.senders_before(layer), self.cfg.n_heads
        ids = torch.empty(before, 3, heads, dtype=torch.long)
        for kind_index, kind in enumerate(INPUT_KINDS):
            for head in range(heads):
                receiver = self.graph.receivers.index(f"{layer}.{head}.{kind}")
                for sender in range(before):
                    ids[sender, kind_index, head] = self._index[(sender, receiver)]
        return ids.to(self.device)

    def _mlp_edges(self, layer: int) -> torch.Tensor:
        before = self.graph.senders_before(layer, mlp=True)
        receiver = self.graph.receivers.index(f"mlp{layer}")
        return torch.tensor([self._index[(s, receiver)] for s in range(before)], device=self.device)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=self.device)
        embed = self.model.embed(tokens.to(self.device)) + self.model.pos_embed(positions)
        return embed.float()[None]  # (1, B, T, D)

    def _assemble(self, senders: list[torch.Tensor], masks: torch.Tensor | None, edge_ids: torch.Tensor,
                  variants: int) -> torch.Tensor:
        """Receivers' inputs: every sender's current value where its edge is clean (mask 1), its corrupted
        value where not. `edge_ids` [senders, *receivers]; returns [V, B, T, *receivers, D]."""
        count = edge_ids.shape[0]
        current = torch.stack([s.expand(variants, -1, -1, -1) for s in senders[:count]])  # (s, V, B, T, D)
        extra = (1,) * (edge_ids.dim() - 1)
        if masks is None:
            total = current.sum(0)  # (V, B, T, D)
            return total.reshape(*total.shape[:3], *extra, total.shape[-1]).expand(
                *total.shape[:3], *edge_ids.shape[1:], total.shape[-1])
        weights = masks[:, edge_ids]  # (V, s, *receivers)
        difference = current - self.corrupted_senders[:count, None]  # (s, V, B, T, D)
        letters = "chm"[: edge_ids.dim() - 1]
        mixed = torch.einsum(f"vs{letters},svbtd->vbt{letters}d", weights, difference)
        return mixed + self.corrupted_prefix[count].reshape(1, *self.corrupted_prefix.shape[1:3], *extra, -1)

    def run(self, masks: torch.Tensor | None, embed: torch.Tensor, start_layer: int = 0,
            probes: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every sender's value [V, B, T, D] and the normalised final residual, with each edge clean or
        corrupted as `masks` [V, E] says (None: all clean). Layers before `start_layer` take the cached clean
        run (their inputs must be all clean). With `probes`, each receiver group's input gets a zero tensor
        added, appended to `probes`: gradients with respect to them are gradients at the receivers."""
        variants = 1 if masks is None else masks.shape[0]
        senders: list[torch.Tensor] = [embed]
        for layer, block in enumerate(self.model.blocks):
            if layer < start_layer:
                senders += self.clean_senders[len(senders) : self.graph.senders_before(layer + 1)]
                continue
            inputs = self._probe(self._assemble(senders, masks, self.attention_edges[layer], variants), probes)
            senders += self._heads(layer, block.ln_attn(inputs))
            if block.mlp is not None:
                mlp_input = self._probe(self._assemble(senders, masks, self.mlp_edges[layer], variants), probes)
                senders.append(block.mlp(block.ln_mlp(mlp_input)).float())
        return senders, self.final_residual(senders, masks, probes)

    def final_residual(self, senders: list[torch.Tensor], masks: torch.Tensor | None = None,
                       probes: list[torch.Tensor] | None = None) -> torch.Tensor:
        variants = max(s.shape[0] for s in senders) if masks is None else masks.shape[0]
        inputs = self._probe(self._assemble(senders, masks, self.logit_edges[:, None], variants)[..., 0, :], probes)
        return self.model.ln_final(inputs)

    @staticmethod
    def _probe(inputs: torch.Tensor, probes: list[torch.Tensor] | None) -> torch.Tensor:
        if probes is None:
            return inputs
        probe = torch.zeros_like(inputs, requires_grad=True)
        probes.append(probe)
        return inputs + probe

    def _heads(self, layer: int, normalised: torch.Tensor) -> list[torch.Tensor]:
        """Each head's output [V, B, T, D] from its own query, key and value inputs [V, B, T, 3, H, D]."""
        W_Q, W_K, W_V, W_O = self.attention[layer]
        q = torch.einsum("vbthd,hde->vbhte", normalised[:, :, :, 0], W_Q)  # (V, B, H, T, dh)
        k = torch.einsum("vbthd,hde->vbhte", normalised[:, :, :, 1], W_K)
        v = torch.einsum("vbthd,hde->vbhte", normalised[:, :, :, 2], W_V)
        length = q.shape[-2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (V, B, H, T, T)
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("vbhte,hed->vbhtd", pattern @ v, W_O)  # (V, B, H, T, D)
        return [out[:, :, head] for head in range(out.shape[2])]

    def head_with_input(self, layer: int, head: int, kind: int, inputs: torch.Tensor) -> torch.Tensor:
        """What head `layer.head` writes [V, B, T, D] when its input `kind` (0 q, 1 k, 2 v) is `inputs`
        [V, B, T, D] and its other two inputs are clean."""
        clean = self.model.blocks[layer].ln_attn(self._clean_prefix(self.graph.senders_before(layer)))
        replaced = self.model.blocks[layer].ln_attn(inputs)
        weights = self.attention[layer]
        q, k, v = ((replaced if index == kind else clean) @ weights[index][head] for index in range(3))  # (V, B, T, dh)
        length = q.shape[-2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (V, B, T, T)
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        return (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v) @ weights[3][head]

    def _clean_prefix(self, count: int) -> torch.Tensor:
        return torch.cat(self.clean_senders[:count]).sum(0)

    def finish(self, residual: torch.Tensor, layer: int, after_mlp: bool = False) -> torch.Tensor:
        """The metric of every variant from the residual stream [V, B, T, D] after layer `layer`'s attention
        (`after_mlp`: after its MLP; the logits' input when `layer` is the number of layers): the rest runs as
        the model's own blocks."""
        values = []
        batch, length, width = residual.shape[1:]
        chunk = max(1, 2**22 // (batch * length * max(width, self.model.unembed.weight.shape[0] // 8)))
        for start in range(0, residual.shape[0], chunk):
            x = residual[start : start + chunk].reshape(-1, length, width)  # (V * B, T, D)
            if layer < len(self.model.blocks):
                block = self.model.blocks[layer]
                if block.mlp is not None and not after_mlp:
                    x = x + block.mlp(block.ln_mlp(x))
                for later in self.model.blocks[layer + 1 :]:
                    x, _ = later(x, None)
            values.append(self.metric(self.model.ln_final(x).reshape(-1, batch, length, width)))
        return torch.cat(values)

    # --- the metric

    def metric(self, residual: torch.Tensor) -> torch.Tensor:
        """The task's metric of every variant [V] from the normalised final residual [V, B, T, D]."""
        positions = self.inputs.positions.to(self.device)
        return self.task.metric(residual[:, :, positions], self.clean_residual[:, :, positions], self.model.unembed,
                                self.targets)

    def per_sequence(self, residual: torch.Tensor) -> torch.Tensor:
        """The metric of each sequence [B] of one run's normalised final residual [1, B, T, D]."""
        positions = self.inputs.positions.to(self.device)
        targets = self.targets
        return torch.cat(
            [
                self.task.metric(
                    residual[:, b : b + 1, positions],
                    self.clean_residual[:, b : b + 1, positions],
                    self.model.unembed,
                    None if targets is None else targets[b : b + 1],
                )
                for b in range(residual.shape[1])
            ]
        )

    @property
    def targets(self) -> torch.Tensor | None:
        return None if self.inputs.targets is None else self.inputs.targets.to(self.device)

    @property
    def difference(self) -> float:
        return self.corrupted_metric - self.clean_metric

    def evaluate(self, masks: torch.Tensor, start_layer: int = 0, chunk: int | None = None) -> torch.Tensor:
        """The metric with each edge clean or corrupted as `masks` [V, E] says, in chunks of variants."""
        chunk = chunk or self._chunk()
        values = []
        with torch.no_grad():
            for start in range(0, masks.shape[0], chunk):
                part = masks[start : start + chunk].to(self.device)
                _, residual = self.run(part, self.clean_embed, start_layer)
                values.append(self.metric(residual))
        return torch.cat(values) if values else torch.zeros(0, device=self.device)

    def _chunk(self) -> int:
        """Variants a forward pass holds at once: about 2^24 floats of receiver inputs."""
        batch, length = self.inputs.clean.shape
        per_variant = batch * length * self.cfg.d_model * max(3 * self.cfg.n_heads, len(self.graph.senders))
        return max(1, 2**24 // per_variant)


# ---------------------------------------------------------------- effects


def exact_effects(patched: PatchedModel) -> torch.Tensor:
    """Every edge patched alone: the metric's change in nats [E].

    Patching s -> r changes only r's input, by (corrupted - clean value of s): only r's head (or MLP) is
    computed again, and everything after it sees one changed residual stream, so the rest runs as the
    model's own blocks. Variants are batched by the receiver's layer.
    """
    graph, model = patched.graph, patched.model
    clean = torch.cat(patched.clean_senders)  # (S, B, T, D)
    delta = patched.corrupted_senders - clean
    prefix = torch.cat([torch.zeros_like(clean[:1]), clean.cumsum(0)])  # residual before each sender
    changes = torch.empty(len(graph.edges), device=patched.device)
    with torch.no_grad():
        # stages: each layer's head inputs, its MLP's input, ..., the logits; each stage's variants go on together
        stages = [(layer, mlp) for layer in range(graph.layers) for mlp in (False, True)] + [(graph.layers, True)]
        for layer, after_mlp in stages:
            ids, residuals = [], []
            for receiver, name in enumerate(graph.receivers):
                if (_receiver_layer(name, graph.layers), name.startswith("mlp") or name == LOGITS) != (
                    layer,
                    after_mlp,
                ):
                    continue
                count = sum(1 for _, r in graph.edges if r == receiver)
                inputs = prefix[count] + delta[:count]  # (senders, B, T, D): the receiver's patched inputs
                if name == LOGITS:
                    residuals.append(inputs)
                elif name.startswith("mlp"):
                    block = model.blocks[layer]
                    written = block.mlp(block.ln_mlp(inputs)) - clean[count]
                    residuals.append(prefix[count + 1] + written)
                else:
                    head, kind = int(name.split(".")[1]), INPUT_KINDS.index(name.split(".")[2])
                    written = patched.head_with_input(layer, head, kind, inputs) - clean[count + head]
                    residuals.append(prefix[graph.senders_before(layer, mlp=True)] + written)
                ids += [patched._index[(s, receiver)] for s in range(count)]
            if ids:
                residual = torch.cat(residuals)
                finished = patched.finish(residual, layer, after_mlp)
                changes[torch.tensor(ids, device=patched.device)] = finished - patched.clean_metric
    return changes


def _receiver_layer(receiver: str, layers: int) -> int:
    if receiver == LOGITS:
        return layers
    return int(receiver.removeprefix("mlp").split(".")[0])


def attribution_effects(patched: PatchedModel, steps: int = 1) -> torch.Tensor:
    """EAP (steps 1: the gradient at the clean run) or EAP-IG (the gradient averaged over `steps` inputs
    interpolated from the corrupted to the clean embedding, Hanna et al. 2024): for every edge,
    (corrupted - clean sender value) . d metric / d receiver input, in nats [E]."""
    gradients: list[torch.Tensor] | None = None
    for step in range(1, steps + 1):
        alpha = step / steps
        embed = patched.corrupted_embed + alpha * (patched.clean_embed - patched.corrupted_embed)
        probes: list[torch.Tensor] = []
        with torch.enable_grad():
            _, residual = patched.run(None, embed, probes=probes)
            found = torch.autograd.grad(patched.metric(residual).sum(), probes)
        gradients = list(found) if gradients is None else [g + f for g, f in zip(gradients, found)]
    gradients = [g / steps for g in gradients]
    clean = torch.stack([s[0] for s in patched.clean_senders])  # (S, B, T, D)
    delta = patched.corrupted_senders - clean  # (S, B, T, D)
    graph, cfg = patched.graph, patched.cfg
    estimates = torch.empty(len(graph.edges), device=patched.device)
    groups = []  # (edge ids [senders, *receivers], gradient [B, T, *receivers, D]) in the order run() probed
    for layer in range(cfg.n_layers):
        groups.append(patched.attention_edges[layer])
        if cfg.mlp:
            groups.append(patched.mlp_edges[layer][:, None])
    groups.append(patched.logit_edges[:, None])
    for ids, gradient in zip(groups, gradients):
        gradient = gradient[0].reshape(*gradient.shape[1:3], -1, gradient.shape[-1])  # (B, T, R, D)
        senders = ids.shape[0]
        values = torch.einsum("sbtd,btrd->sr", delta[:senders], gradient)
        estimates[ids.reshape(senders, -1).flatten()] = values.flatten()
    return estimates


# ---------------------------------------------------------------- the circuit


@dataclass
class CircuitResult:
    """One snapshot's circuit on one task: every edge's effect, the circuit and its faithfulness."""

    task: str
    edges: list[str]
    clean_metric: float
    corrupted_metric: float
    difference_se: float
    """Standard error of the clean-to-corrupted difference over the task's sequences."""
    change: list[float]
    """Exact patching: the metric's change in nats when the edge alone is corrupted."""
    eap: list[float]
    eap_ig: list[float]
    circuit: list[str] = field(default_factory=list)
    """The circuit's edges, largest effect first (empty: the model does not do the task)."""
    faithfulness: float | None = None
    config: CircuitConfig = field(default_factory=CircuitConfig)

    @property
    def difference(self) -> float:
        return self.corrupted_metric - self.clean_metric

    @property
    def does_task(self) -> bool:
        """Whether the clean run beats the corrupted one by more than min_difference nats and min_sigmas
        standard errors: otherwise there is nothing for a circuit to explain."""
        return (self.difference >= self.config.min_difference
                and self.difference >= self.config.min_sigmas * self.difference_se)

    def fractions(self, values: list[float]) -> list[float | None]:
        """Changes as fractions of the clean-to-corrupted difference (None where the model does not do the task)."""
        return [value / self.difference if self.does_task else None for value in values]

    @property
    def effects(self) -> list[float | None]:
        return self.fractions(self.change)

    def above_threshold(self) -> list[str]:
        """Edges that matter alone: effect >= the edge threshold."""
        return [e for e, effect in zip(self.edges, self.effects)
                if effect is not None and effect >= self.config.edge_threshold]

    def agreement(self, estimates: list[float]) -> dict[str, float | None]:
        """How an estimate ranks the edges against exact patching: Spearman and Pearson over all edges, and the
        fraction of the circuit among the estimate's top |circuit| edges."""
        exact = torch.tensor(self.change, dtype=torch.float64)
        estimate = torch.tensor(estimates, dtype=torch.float64)
        top = set(self.edges[i] for i in estimate.argsort(descending=True)[: len(self.circuit)].tolist())
        recall = len(top & set(self.circuit)) / len(self.circuit) if self.circuit else None
        return {"spearman": _correlation(_ranks(exact), _ranks(estimate)), "pearson": _correlation(exact, estimate),
                "circuit_recall": recall}

    def document(self) -> dict[str, Any]:
        effects, eap, eap_ig = self.effects, self.fractions(self.eap), self.fractions(self.eap_ig)
        return {
            "task": self.task, "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric,
            "difference": self.difference, "difference_se": self.difference_se, "does_task": self.does_task,
            "faithfulness": self.faithfulness,
            "circuit": self.circuit,
            "edges": [{"edge": e, "effect": effects[i], "change": self.change[i], "eap": eap[i], "eap_ig": eap_ig[i]}
                      for i, e in enumerate(self.edges)],
            "agreement": {"eap": self.agreement(self.eap), "eap_ig": self.agreement(self.eap_ig)},
        }


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


def faithfulness_of(patched: PatchedModel, kept: list[list[int]]) -> torch.Tensor:
    """For each set of kept edge ids: (corrupted - metric with only them clean) / (corrupted - clean)."""
    masks = torch.zeros(len(kept), len(patched.graph.edges), device=patched.device)
    for row, ids in enumerate(kept):
        masks[row, ids] = 1.0
    values = patched.evaluate(masks)
    return (patched.corrupted_metric - values) / patched.difference


def greedy_circuit(patched: PatchedModel, change: torch.Tensor, target: float) -> tuple[list[int], float]:
    """The smallest prefix of the edges by exact effect (largest first) whose model recovers `target` of the
    difference, and its faithfulness. Prefixes are measured in batches, stopping at the first that reaches it."""
    order = change.argsort(descending=True).tolist()
    order = [i for i in order if change[i] > 0]
    best = (order, float("nan"))
    chunk = patched._chunk()
    for start in range(0, len(order), chunk):
        sizes = list(range(start + 1, min(len(order), start + chunk) + 1))
        faithful = faithfulness_of(patched, [order[:size] for size in sizes])
        reached = (faithful >= target).nonzero().flatten().tolist()
        if reached:
            return order[: sizes[reached[0]]], float(faithful[reached[0]])
        best = (order, float(faithful[-1]))
    return best


def prune_circuit(patched: PatchedModel, threshold: float) -> tuple[list[int], float]:
    """ACDC-style (Conmy et al. 2023): from the whole graph, visit the receivers in reverse topological order
    and remove each incoming edge whose corruption, given the edges already removed, moves the metric by less
    than `threshold` of the difference. Returns the kept edges and their faithfulness."""
    graph = patched.graph
    mask = torch.ones(1, len(graph.edges), device=patched.device)
    current = float(patched.evaluate(mask)[0])
    for receiver in reversed(range(len(graph.receivers))):
        for edge in [i for i, (_, r) in enumerate(graph.edges) if r == receiver]:
            trial = mask.clone()
            trial[0, edge] = 0.0
            value = float(patched.evaluate(trial)[0])
            if value - current < threshold * patched.difference:
                mask, current = trial, value
    kept = mask[0].nonzero().flatten().tolist()
    return kept, (patched.corrupted_metric - current) / patched.difference


def find_circuit(model: Transformer, data: TaskData, task: str = "induction",
                 cfg: CircuitConfig = CircuitConfig()) -> CircuitResult:
    """Exact effects, EAP and EAP-IG of every edge of `model` on `task`, and its circuit (greedy by effect)."""
    chosen = get_task(task)
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator().manual_seed(cfg.seed)
        inputs = chosen.inputs(model, data, generator, cfg.sequences)
        patched = PatchedModel(model, inputs, chosen)
        change = exact_effects(patched)
        eap = attribution_effects(patched, steps=1)
        eap_ig = attribution_effects(patched, steps=cfg.ig_steps)
        result = CircuitResult(task, patched.graph.edge_names, patched.clean_metric, patched.corrupted_metric,
                               patched.difference_se, change.tolist(), eap.tolist(), eap_ig.tolist(), config=cfg)
        if result.does_task:
            kept, faithful = greedy_circuit(patched, change, cfg.faithfulness)
            result.circuit, result.faithfulness = [result.edges[i] for i in kept], faithful
        return result
    finally:
        model.train(was_training)
