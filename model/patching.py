"""A model's computation as its edge graph: exact path patching of every edge, EAP and EAP-IG.

After Wang et al. 2022 and Goldowsky-Dill et al. 2023 (path patching), Syed et al. 2023 (edge attribution
patching, EAP) and Hanna et al. 2024 (EAP-IG).

The residual stream at any point is the sum of what the senders before it wrote (the attention output projection
has no bias; an MLP's biases are part of what it writes), so an edge is one sender's additive contribution to one
receiver's input, before the receiver's LayerNorm (model.edges names the graph).

Patching an edge set (a mask, 1 for the kept edges) follows Miller et al. 2024's two directions:
- noising (the default): the model runs on the clean input; every edge outside the kept set carries its ablated
  value, every kept edge what its sender computes in this run;
- denoising: the model runs on the ablated input; every kept edge carries its clean-run value, every other edge
  what its sender computes in this run.
and two ablations: resample (the corrupted run's values) and mean (each sender's value averaged over the corrupted
sequences, position by position). Exact patching of one edge at a time and the circuit are found with resample
noising; the robustness panel (model.discovery) measures the circuit under all four.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError
from .edges import INPUT_KINDS, LOGITS, Graph, build_graph
from .tasks import CircuitTask, Metric, TaskInputs
from .transformer import Transformer

ABLATIONS = ("resample", "mean")
DIRECTIONS = ("noising", "denoising")


@dataclass(frozen=True)
class Ablation:
    """How the edges left out of a set are patched (Miller et al. 2024)."""

    kind: str = "resample"
    direction: str = "noising"

    def __post_init__(self) -> None:
        if self.kind not in ABLATIONS or self.direction not in DIRECTIONS:
            raise ConfigError(f"unknown ablation {self.kind}/{self.direction}; kinds {ABLATIONS}, directions "
                              f"{DIRECTIONS}")


def model_graph(model: Transformer) -> Graph:
    return build_graph(model.cfg.n_layers, model.cfg.n_heads, model.cfg.mlp)


class PatchedModel:
    """A model's computation as its graph: every receiver's input assembled edge by edge, so any set of
    edges can be kept (a mask), forward passes batched over masks ("variants")."""

    def __init__(self, model: Transformer, inputs: TaskInputs, task: CircuitTask, ablation: Ablation = Ablation(),
                 metric: Metric | None = None) -> None:
        self.model, self.inputs, self.task, self.ablation = model, inputs, task, ablation
        self.metric_function = metric or task.metric
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
        self.noising = ablation.direction == "noising"
        self._references: dict[str, Any] = {}
        with torch.no_grad():
            self.clean_embed = self._embed(inputs.clean)
            self.corrupted_embed = self._embed(inputs.corrupted)
            corrupted, corrupted_residual = self.run(None, self.corrupted_embed)
            self.corrupted_senders = torch.stack([s[0] for s in corrupted])  # (S, B, T, D)
            clean, self.clean_residual = self.run(None, self.clean_embed)
            self.clean_senders = clean  # each (1, B, T, D)
            if ablation.kind == "mean":
                ablated = self.corrupted_senders.mean(1, keepdim=True).expand_as(self.corrupted_senders)
                ablated_embed = self.corrupted_embed.mean(1, keepdim=True).expand_as(self.corrupted_embed)
            else:
                ablated, ablated_embed = self.corrupted_senders, self.corrupted_embed
            # noising: kept edges carry the current run, the others `fixed` (ablated) values; denoising: kept
            # edges carry `fixed` (clean) values, the others the current run on the ablated input
            self.base_embed = self.clean_embed if self.noising else ablated_embed
            self.fixed = ablated if self.noising else torch.stack([s[0] for s in clean])
            self.fixed_prefix = torch.cat([torch.zeros_like(self.fixed[:1]), self.fixed.cumsum(0)])
            self.clean_values = self.metric(self.clean_residual)[0]  # [B]
            self.corrupted_values = self.metric(corrupted_residual)[0]
            self.clean_metric = float(self.clean_values.mean())
            self.corrupted_metric = float(self.corrupted_values.mean())
            differences = self.corrupted_values - self.clean_values
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
        """Receivers' inputs: each edge carries its sender's current value or its fixed one, as the mask and the
        direction say. `edge_ids` [senders, *receivers]; returns [V, B, T, *receivers, D]."""
        count = edge_ids.shape[0]
        current = torch.stack([s.expand(variants, -1, -1, -1) for s in senders[:count]])  # (s, V, B, T, D)
        extra = (1,) * (edge_ids.dim() - 1)
        if masks is None:
            total = current.sum(0)  # (V, B, T, D)
            return total.reshape(*total.shape[:3], *extra, total.shape[-1]).expand(
                *total.shape[:3], *edge_ids.shape[1:], total.shape[-1])
        kept = masks[:, edge_ids]  # (V, s, *receivers)
        weights = kept if self.noising else 1 - kept  # each edge's weight on its current value
        difference = current - self.fixed[:count, None]  # (s, V, B, T, D)
        letters = "chm"[: edge_ids.dim() - 1]
        mixed = torch.einsum(f"vs{letters},svbtd->vbt{letters}d", weights, difference)
        return mixed + self.fixed_prefix[count].reshape(1, *self.fixed_prefix.shape[1:3], *extra, -1)

    def run(self, masks: torch.Tensor | None, embed: torch.Tensor, start_layer: int = 0,
            probes: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every sender's value [V, B, T, D] and the normalised final residual, with each edge patched as `masks`
        [V, E] says (None: every edge carries the current run). Layers before `start_layer` take the cached clean
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
        """The metric of every variant and sequence [V, B] from the residual stream [V, B, T, D] after layer
        `layer`'s attention (`after_mlp`: after its MLP; the logits' input when `layer` is the number of layers):
        the rest runs as the model's own blocks."""
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

    def metric(self, residual: torch.Tensor, metric: Metric | None = None) -> torch.Tensor:
        """The metric (default: this model's) of every variant and sequence [V, B] from the normalised final
        residual [V, B, T, D]."""
        metric = metric or self.metric_function
        positions = self.inputs.positions.to(self.device)
        if metric.name not in self._references:  # what the metric needs of the clean run, prepared once
            self._references[metric.name] = metric.reference(self.clean_residual[:, :, positions], self.model.unembed,
                                                             self.targets)
        return metric(residual[:, :, positions], self._references[metric.name], self.model.unembed)

    @property
    def targets(self) -> torch.Tensor | None:
        return None if self.inputs.targets is None else self.inputs.targets.to(self.device)

    @property
    def difference(self) -> float:
        return self.corrupted_metric - self.clean_metric

    def evaluate(self, masks: torch.Tensor, start_layer: int = 0, chunk: int | None = None,
                 metrics: tuple[Metric, ...] = ()) -> torch.Tensor:
        """The metric of every variant and sequence [V, B] with the edges patched as `masks` [V, E] says, in
        chunks of variants; with `metrics`, each of them [M, V, B] from the same forward passes."""
        chunk = chunk or self._chunk()
        values = []
        embed = self.base_embed if start_layer == 0 else self.clean_embed
        with torch.no_grad():
            for start in range(0, masks.shape[0], chunk):
                part = masks[start : start + chunk].to(self.device)
                _, residual = self.run(part, embed, start_layer)
                values.append(torch.stack([self.metric(residual, m) for m in metrics]) if metrics
                              else self.metric(residual))
        if not values:
            return torch.zeros(*((len(metrics),) if metrics else ()), 0, len(self.clean_values), device=self.device)
        return torch.cat(values, dim=-2)

    def _chunk(self) -> int:
        """Variants a forward pass holds at once: about 2^24 floats of receiver inputs."""
        batch, length = self.inputs.clean.shape
        per_variant = batch * length * self.cfg.d_model * max(3 * self.cfg.n_heads, len(self.graph.senders))
        return max(1, 2**24 // per_variant)


# ---------------------------------------------------------------- effects


def exact_effects(patched: PatchedModel) -> torch.Tensor:
    """Every edge patched alone (resample noising): the metric's change in nats, per sequence [E, B].

    Patching s -> r changes only r's input, by (corrupted - clean value of s): only r's head (or MLP) is
    computed again, and everything after it sees one changed residual stream, so the rest runs as the
    model's own blocks. Variants are batched by the receiver's layer.
    """
    if patched.ablation != Ablation():
        raise ConfigError("exact effects are resample noising: patch one edge of the clean run at a time")
    graph, model = patched.graph, patched.model
    clean = torch.cat(patched.clean_senders)  # (S, B, T, D)
    delta = patched.corrupted_senders - clean
    prefix = torch.cat([torch.zeros_like(clean[:1]), clean.cumsum(0)])  # residual before each sender
    changes = torch.empty(len(graph.edges), clean.shape[1], device=patched.device)
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
                changes[torch.tensor(ids, device=patched.device)] = finished - patched.clean_values
    return changes


def _receiver_layer(receiver: str, layers: int) -> int:
    if receiver == LOGITS:
        return layers
    return int(receiver.removeprefix("mlp").split(".")[0])


def attribution_effects(patched: PatchedModel, steps: int = 1) -> torch.Tensor:
    """EAP (steps 1: the gradient at the clean run) or EAP-IG (the gradient averaged over `steps` inputs
    interpolated from the corrupted to the clean embedding at the midpoints of equal intervals, Hanna et al.
    2024): for every edge, (corrupted - clean sender value) . d metric / d receiver input, in nats [E]."""
    alphas = [1.0] if steps == 1 else [(step - 0.5) / steps for step in range(1, steps + 1)]
    gradients: list[torch.Tensor] | None = None
    for alpha in alphas:
        embed = patched.corrupted_embed + alpha * (patched.clean_embed - patched.corrupted_embed)
        probes: list[torch.Tensor] = []
        with torch.enable_grad():
            _, residual = patched.run(None, embed, probes=probes)
            found = torch.autograd.grad(patched.metric(residual).mean(), probes)
        gradients = list(found) if gradients is None else [g + f for g, f in zip(gradients, found)]
    gradients = [g / len(alphas) for g in gradients]
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
