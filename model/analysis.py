"""What the heads learned: attention patterns, heatmaps and head scores.

Score definitions follow DESIGN.md ("Head scores"), after Elhage et al. 2021
and Olsson et al. 2022. Patterns come from the model's explicit-softmax path
(`run_with_patterns`, or `attention_patterns` without the logits), so analysis never needs a second model.

matplotlib is imported only to draw heatmaps.
"""

from __future__ import annotations

import copy
import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .circuits import mean_ablation
from .generate import generate
from .metrics import (
    COPYING_THRESHOLD,
    INDUCTION_THRESHOLD,
    MATTERS_THRESHOLD,
    PREVIOUS_TOKEN_THRESHOLD,
    SCORE_NAMES,
    SUMMARY_METRICS,
    label_matters,
)
from .tokenizers import TextTokenizer
from .transformer import Transformer


@dataclass(frozen=True)
class AnalysisConfig:
    """How heads are probed and labelled."""

    prompt: str = "This movie is"
    """Prompt continued by top-k sampling and drawn as heatmaps (--prompt)."""
    sample_tokens: int = 7
    """Tokens sampled after the prompt."""
    top_k: int = 10
    """k of top-k sampling."""
    seed: int = 0
    """Seeds sampling and the random-token probes."""
    probe_sequences: int = 32
    """Sequences averaged over for every pattern score."""
    induction_threshold: float = INDUCTION_THRESHOLD
    previous_token_threshold: float = PREVIOUS_TOKEN_THRESHOLD
    first_token_threshold: float = 0.8
    copying_threshold: float = COPYING_THRESHOLD
    matters_threshold: float = MATTERS_THRESHOLD
    """A head `matters` when mean-ablating it raises held-out or repeated-token loss by more (nats)."""
    circuits_every: int = 5
    """Ablation and token tables (the heavy parts) run every N iterations and always on the last."""
    ablation_sequences: int = 16
    """Held-out windows (and repeated-token sequences) each ablation is measured on."""

    def thresholds(self) -> dict[str, float]:
        return {
            "induction": self.induction_threshold,
            "previous_token": self.previous_token_threshold,
            "first_token": self.first_token_threshold,
            "copying": self.copying_threshold,
        }


def repeat_prompt(vocab_size: int, length: int = 8) -> str:
    """A prompt for the synthetic task: a run of tokens and the start of its repeat."""
    tokens = [f"t{(7 * i + 3) % vocab_size}" for i in range(length)]
    return " ".join(tokens + tokens[: length // 2])


# ---------------------------------------------------------------- pattern scores


def pattern_scores(patterns: torch.Tensor, query_is_real: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """previous/current/first-token scores per head from patterns [batch, heads, q, k]."""
    batch, heads, length, _ = patterns.shape
    if query_is_real is None:
        query_is_real = torch.ones(batch, length, dtype=torch.bool, device=patterns.device)
    weight = query_is_real[:, None, :].float().expand(batch, heads, length)  # (B, nh, T)
    positions = torch.arange(length, device=patterns.device)
    previous = patterns[:, :, positions[1:], positions[:-1]]  # (B, nh, T-1)
    current = patterns.diagonal(dim1=-2, dim2=-1)  # (B, nh, T)
    first = patterns[:, :, 1:, 0]  # (B, nh, T-1)

    def mean(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (values * w).sum(dim=(0, 2)) / w.sum(dim=(0, 2)).clamp_min(1)

    return {
        "previous_token": mean(previous, weight[:, :, 1:]),
        "current_token": mean(current, weight),
        "first_token": mean(first, weight[:, :, 1:]),
    }


def repeated_token_scores(patterns: torch.Tensor, period: int) -> dict[str, torch.Tensor]:
    """duplicate-token and induction scores per head on x = r + r, |r| = period."""
    positions = torch.arange(period, 2 * period, device=patterns.device)
    duplicate = patterns[:, :, positions, positions - period]  # (B, nh, n)
    induction = patterns[:, :, positions, positions - period + 1]  # (B, nh, n)
    return {"duplicate_token": duplicate.mean(dim=(0, 2)), "induction": induction.mean(dim=(0, 2))}


# ---------------------------------------------------------------- weight scores


@torch.no_grad()
def copying_scores(model: Transformer) -> torch.Tensor:
    """[layers, heads]: Re(sum l) / sum |l| over eigenvalues l of the full OV circuit.

    The nonzero eigenvalues of W_E W_V W_O W_U equal those of W_V W_O W_U W_E,
    a d_head x d_head matrix, so the vocab x vocab product is never formed.
    """
    W_E = model.embed.weight.double()  # (vocab, C)
    W_U = model.unembed.weight.double().T  # (C, vocab)
    unembed_embed = W_U @ W_E  # (C, C)
    scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.float64)
    for layer, block in enumerate(model.blocks):
        W_V, W_O = block.attn.W_V.double(), block.attn.W_O.double()  # (nh, C, hs), (nh, hs, C)
        circuit = W_O @ unembed_embed @ W_V  # (nh, hs, hs): cyclic permutation of W_V W_O W_U W_E
        eigenvalues = torch.linalg.eigvals(circuit)  # (nh, hs)
        scores[layer] = eigenvalues.real.sum(-1) / eigenvalues.abs().sum(-1).clamp_min(1e-12)
    return scores.float()


@torch.no_grad()
def composition_scores(model: Transformer) -> dict[str, list]:
    """Q-, K- and V-composition of every earlier-layer head into every later-layer head.

    Nested [layer1][head1][layer2][head2]; pairs where layer2 <= layer1 are null.
    """
    layers, heads = model.cfg.n_layers, model.cfg.n_heads
    W_QK = []  # per layer: (nh, C, C)
    W_OV = []
    for block in model.blocks:
        attn = block.attn
        W_QK.append((attn.W_Q @ attn.W_K.transpose(1, 2)).double())
        W_OV.append((attn.W_V @ attn.W_O).double())
    results = {
        kind: [[[[None] * heads for _ in range(layers)] for _ in range(heads)] for _ in range(layers)] for kind in "qkv"
    }
    for layer1 in range(layers):
        for layer2 in range(layer1 + 1, layers):
            ov1 = W_OV[layer1][:, None]  # (nh1, 1, C, C)
            norm_ov1 = ov1.flatten(-2).norm(dim=-1)  # (nh1, 1)
            for kind, second in (("q", W_QK[layer2]), ("k", W_QK[layer2].transpose(1, 2)), ("v", W_OV[layer2])):
                product_norm = (ov1 @ second[None]).flatten(-2).norm(dim=-1)  # (nh1, nh2)
                score = product_norm / (norm_ov1 * second.flatten(-2).norm(dim=-1)[None]).clamp_min(1e-12)
                for head1, row in enumerate(score.tolist()):  # one copy to the host for the whole layer pair
                    results[kind][layer1][head1][layer2] = row
    return results


# Random draws behind the composition baseline, and how many of its standard deviations above its mean a path
# must stand to count: the random scores' 99.9th percentile is 3.0-3.5 sd above the mean (skewed right), so 4 sd
# keeps the 48 paths of a random 2-layer, 4-head model below it.
BASELINE_DRAWS = 512
COMPOSITION_SIGMAS = 4.0


def composition_baseline(model: Transformer, draws: int = BASELINE_DRAWS, seed: int = 0) -> dict[str, dict[str, float]]:
    """Elhage et al.'s baseline for the composition scores of `model`: see `random_composition`."""
    attention = model.blocks[0].attn
    return random_composition(attention.W_Q.shape[1], attention.W_Q.shape[2], draws, seed)


def random_composition(
    d_model: int, d_head: int, draws: int = BASELINE_DRAWS, seed: int = 0
) -> dict[str, dict[str, float]]:
    """`_random_composition`, computed once per shape in a process (heads.json is written every iteration)."""
    return copy.deepcopy(_random_composition(d_model, d_head, draws, seed))


@functools.lru_cache(maxsize=16)
@torch.no_grad()
def _random_composition(d_model: int, d_head: int, draws: int, seed: int) -> dict[str, dict[str, float]]:
    """The composition score of random matrices with a model's shapes (one head's W_Q, W_K, W_V, W_O in each
    layer), over `draws` Gaussian draws: mean and standard deviation per kind. The score is a ratio of norms,
    unchanged by scaling either matrix, so matching the shapes matches the norms too. A trained path means
    something only well above it (COMPOSITION_SIGMAS).

    The d_model x d_model products are never formed: ||V1 (O1 Q2) K2^T||_F^2 = tr(V1^T V1 M K2^T K2 M^T) with
    M = O1 Q2, all d_head x d_head, so the draws cost little at any width."""
    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": []}
    for start in range(0, draws, 128):
        count = min(128, draws - start)

        def gaussian(*shape: int) -> torch.Tensor:
            return torch.randn(count, *shape, generator=generator, dtype=torch.float64)

        V1, O1, Q2, K2, V2, O2 = (gaussian(d_model, d_head), gaussian(d_head, d_model), gaussian(d_model, d_head),
                                  gaussian(d_model, d_head), gaussian(d_model, d_head), gaussian(d_head, d_model))
        gram = lambda m: m.transpose(1, 2) @ m  # noqa: E731  (d_head x d_head)
        trace = lambda m: m.diagonal(dim1=1, dim2=2).sum(-1)  # noqa: E731
        v1, o1, o2 = gram(V1), O1 @ O1.transpose(1, 2), O2 @ O2.transpose(1, 2)
        q2, k2 = gram(Q2), gram(K2)
        ov1_norm2 = trace(v1 @ o1)
        for kind, middle, right, second_norm2 in (
            ("q", O1 @ Q2, k2, trace(q2 @ k2)),
            ("k", O1 @ K2, q2, trace(q2 @ k2)),
            ("v", O1 @ V2, o2, trace(gram(V2) @ o2)),
        ):
            product_norm2 = trace(v1 @ middle @ right @ middle.transpose(1, 2))
            scores[kind].append((product_norm2 / (ov1_norm2 * second_norm2)).sqrt())
    result = {}
    for kind, chunks in scores.items():
        values = torch.cat(chunks)
        result[kind] = {"mean": float(values.mean()), "std": float(values.std()), "draws": draws}
    return result


@torch.no_grad()
def composition_null(model: Transformer) -> dict[str, dict[str, float]] | None:
    """The scores a trained model's heads give in the order they cannot compose: every later-layer head's output
    into every earlier-layer head's query, key and value (information flows the other way). These pairs share
    the trained matrices' spectra and the subspaces all heads read and write, which random matrices lack (a trained
    model clears a random baseline on nearly every path), and have no causal role. Per kind: mean, std and max
    over the pairs; None for a 1-layer model."""
    if model.cfg.n_layers < 2:
        return None
    QK = [(b.attn.W_Q @ b.attn.W_K.transpose(1, 2)).double() for b in model.blocks]  # per layer: (nh, C, C)
    OV = [(b.attn.W_V @ b.attn.W_O).double() for b in model.blocks]
    scores: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": []}
    for earlier in range(model.cfg.n_layers):
        for later in range(earlier + 1, model.cfg.n_layers):
            ov = OV[later][:, None]  # (nh later, 1, C, C): written by the later head, read by the earlier one
            for kind, second in (("q", QK[earlier]), ("k", QK[earlier].transpose(1, 2)), ("v", OV[earlier])):
                norms = ov.flatten(-2).norm(dim=-1) * second.flatten(-2).norm(dim=-1)[None]
                scores[kind].append(((ov @ second[None]).flatten(-2).norm(dim=-1) / norms.clamp_min(1e-12)).flatten())
    result = {}
    for kind, parts in scores.items():
        values = torch.cat(parts)
        mean, std, top = torch.stack([values.mean(), values.std(), values.max()]).tolist()
        result[kind] = {"mean": mean, "std": std, "max": top, "pairs": int(values.numel())}
    return result


def composition_excess(score: float, null: dict[str, float]) -> float | None:
    """How far a path's score stands above its kind's null mean, or None unless it stands above the null: above
    every backward pair (`max`, composition_null) and COMPOSITION_SIGMAS standard deviations above their mean.
    (A heads.json written before the null existed holds the random baseline, without a max.)"""
    excess = score - null["mean"]
    above = excess > COMPOSITION_SIGMAS * null["std"] and score > null.get("max", float("-inf"))
    return excess if above else None


# ---------------------------------------------------------------- all scores of a model


def repeated_tokens(model_cfg, cfg: AnalysisConfig = AnalysisConfig()) -> torch.Tensor:
    """The repeated-token probe [probe_sequences, 2n]: random tokens r of length n = seq_len // 2, then r again.

    r is drawn without replacement when the vocabulary has n tokens, so every token of the second copy
    occurs once before it and an ideal induction or duplicate-token head scores 1.0 (with repeats inside r
    it would split its attention among them: 0.77 at the repeat task's vocabulary of 66).
    """
    period = model_cfg.seq_len // 2
    generator = torch.Generator().manual_seed(cfg.seed)
    if model_cfg.vocab_size >= period:
        random_tokens = torch.stack([torch.randperm(model_cfg.vocab_size, generator=generator)[:period]
                                     for _ in range(cfg.probe_sequences)])
    else:
        random_tokens = torch.randint(0, model_cfg.vocab_size, (cfg.probe_sequences, period), generator=generator)
    return torch.cat([random_tokens, random_tokens], dim=1)  # (B, 2n)


def ideal_repeated_scores(tokens: torch.Tensor, period: int) -> dict[str, float]:
    """What an ideal head scores on this probe: it attends equally to every earlier match of its query token
    (duplicate-token: the same token; induction: the token after it), so 1.0 when r has no repeats."""
    batch, length = tokens.shape
    queries = torch.arange(period, length)
    same = tokens[:, queries, None] == tokens[:, None, :]  # (B, n, 2n): key k holds the query's token
    before = torch.arange(length)[None, :] < queries[:, None]  # (n, 2n)
    duplicate_matches = (same & before).sum(-1).clamp_min(1)
    follows = torch.zeros_like(same)
    follows[:, :, 1:] = same[:, :, :-1]  # key k follows an occurrence of the query's token
    induction_matches = (follows & (torch.arange(length)[None, :] <= queries[:, None])).sum(-1).clamp_min(1)
    return {"duplicate_token": float((1 / duplicate_matches.float()).mean()),
            "induction": float((1 / induction_matches.float()).mean())}


PROBE_VERSION = 2
"""Version of the head-score definitions and probes: 2 draws r without replacement (an ideal head scores 1.0)."""


def probe_record(model_cfg, cfg: AnalysisConfig, held_out_sequences: int, ideal: dict[str, float]) -> dict[str, Any]:
    """How the scores of a heads.json were measured: stored beside them."""
    period = model_cfg.seq_len // 2
    return {
        "version": PROBE_VERSION,
        "held_out": {"sequences": held_out_sequences, "tokens": model_cfg.seq_len,
                     "scores": ["previous_token", "current_token", "first_token"]},
        "repeated": {"sequences": cfg.probe_sequences, "period": period, "vocabulary": model_cfg.vocab_size,
                     "seed": cfg.seed,
                     "distinct": model_cfg.vocab_size >= period, "ideal_head": ideal,
                     "scores": ["duplicate_token", "induction"],
                     "scaled": "raw" if min(ideal.values()) > 0.999
                     else "fraction of the ideal head's score on this probe"},
        "copying": "Re(sum of eigenvalues) / sum of |eigenvalues| of W_V W_O W_U W_E (Elhage et al. 2021)",
        "thresholds": cfg.thresholds(),
    }


def _pattern_scores(model: Transformer, tokens: torch.Tensor, cfg: AnalysisConfig):
    """Every layer's pattern scores ({name: [heads]}) on the held-out probe and on r + r, the repeated probe, and
    the ideal head's scores on it."""
    patterns = model.attention_patterns(tokens)
    per_layer = [pattern_scores(p.float(), tokens >= 0) for p in patterns]
    period = model.cfg.seq_len // 2
    repeated = repeated_tokens(model.cfg, cfg).to(tokens.device)
    ideal = ideal_repeated_scores(repeated.cpu(), period)
    repeat_patterns = model.attention_patterns(repeated)
    for scores, pattern in zip(per_layer, repeat_patterns):
        # where r had to repeat tokens (a tiny vocabulary), as a fraction of what an ideal head scores here
        raw = repeated_token_scores(pattern.float(), period)
        scores.update({name: value / ideal[name] for name, value in raw.items()})
    return per_layer, repeated, ideal


@torch.no_grad()
def pattern_maxima(model: Transformer, held_out: torch.Tensor, cfg: AnalysisConfig = AnalysisConfig()
                   ) -> dict[str, float]:
    """Each pattern score's max over heads, as head_scores computes them (the same probes and code): what formed_at
    is read from at every snapshot while training."""
    was_training = model.training
    model.eval()
    tokens = held_out[: cfg.probe_sequences, : model.cfg.seq_len].to(next(model.parameters()).device).long()
    per_layer, _, _ = _pattern_scores(model, tokens, cfg)
    model.train(was_training)
    names = per_layer[0].keys()
    return {name: max(float(scores[name].float().max()) for scores in per_layer) for name in names}


@torch.no_grad()
def head_scores(
    model: Transformer, held_out: torch.Tensor, cfg: AnalysisConfig = AnalysisConfig(), ablate: bool = False
) -> dict[str, Any]:
    """The heads.json document: every head's scores and labels, plus composition.

    `held_out` is [N, T+1] windows of the test split (PAD_ID marks padding).
    With `ablate`, every head is also mean-ablated (`ablation` per head, label `matters`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = held_out[: cfg.probe_sequences, : model.cfg.seq_len].to(device).long()
    windows = held_out[: cfg.ablation_sequences].to(device).long()
    per_layer, repeated, ideal = _pattern_scores(model, tokens, cfg)
    period = model.cfg.seq_len // 2
    copying = copying_scores(model)
    ablation = mean_ablation(model, windows, repeated[: cfg.ablation_sequences], period) if ablate else None
    model.train(was_training)

    thresholds = cfg.thresholds()
    heads = []
    # to the host once: every layer's scores [layer][name] -> per-head lists
    per_layer = [{name: values.float().tolist() for name, values in scores.items()} for scores in per_layer]
    copying = copying.tolist()
    for layer, scores in enumerate(per_layer):
        for head in range(model.cfg.n_heads):
            values = {name: scores[name][head] for name in SCORE_NAMES if name != "copying"}
            values["copying"] = copying[layer][head]
            values = {name: values[name] for name in SCORE_NAMES}
            # copying is labelled only beside `matters` (label_matters): an OV circuit that copies but costs nothing
            # when removed says nothing of what the model does
            labels = [name for name, limit in thresholds.items() if values[name] > limit and name != "copying"]
            entry = {"layer": layer, "head": head, "scores": values, "labels": labels}
            if ablation is not None:
                entry["ablation"] = {k: round(v, 5) for k, v in ablation[layer][head].items()}
            heads.append(entry)
    probe = probe_record(model.cfg, cfg, int(tokens.shape[0]), ideal)
    document = {"heads": heads, "composition": composition_scores(model), "probe": probe}
    if model.cfg.n_layers > 1:
        document["composition_baseline"] = composition_baseline(model)  # random matrices: a reference value
        document["composition_null"] = composition_null(model)  # what a path must clear to count
    return label_matters(document, cfg.matters_threshold) if ablation is not None else document


def carry_ablation(document: dict[str, Any], previous: dict[str, Any] | None, cfg: AnalysisConfig) -> dict[str, Any]:
    """Between scheduled ablations, keep the last measured one (and its tokens_seen) in heads.json."""
    if previous is None or "ablation_tokens_seen" not in previous:
        return document
    for head, old in zip(document["heads"], previous["heads"]):
        if "ablation" in old:
            head["ablation"] = old["ablation"]
    document["ablation_tokens_seen"] = previous["ablation_tokens_seen"]
    return label_matters(document, cfg.matters_threshold)


def head_history_entry(document: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every head's scores, keyed "layer.head": one line of a run's head history."""
    return {f"{h['layer']}.{h['head']}": {k: round(v, 4) for k, v in h["scores"].items()} for h in document["heads"]}


def score_summaries(heads_document: dict[str, Any]) -> dict[str, float]:
    """The per-iteration Tune metrics: each summarised score's max over heads."""
    return {
        metric: max(h["scores"][score] for h in heads_document["heads"]) for metric, score in SUMMARY_METRICS.items()
    }


# ---------------------------------------------------------------- heatmaps


# Next-token predictions kept per position of the sample (the report's viewer shows them on hover).
TOP_PREDICTIONS = 5


@torch.no_grad()
def sample_and_patterns(
    model: Transformer, tokenizer: TextTokenizer, cfg: AnalysisConfig
) -> tuple[list[int], list[np.ndarray], list[list[tuple[int, float]]]]:
    """Continue the prompt by top-k sampling; patterns of the whole sequence, one [heads, q, k] per layer, and
    the model's top next-token predictions (id, probability) at every position."""
    prompt_ids = tokenizer.encode(cfg.prompt)[: model.cfg.seq_len - 1]
    if not prompt_ids:
        raise ValueError("--prompt is empty after tokenization; give some text")
    ids = generate(model, prompt_ids, cfg.sample_tokens, cfg.top_k, cfg.seed)[-model.cfg.seq_len :]
    device = next(model.parameters()).device
    logits, patterns = model.run_with_patterns(torch.tensor([ids], device=device))
    top = logits[0].float().softmax(-1).topk(min(TOP_PREDICTIONS, logits.shape[-1]), dim=-1)
    predictions = [list(zip(i.tolist(), [round(v, 4) for v in p.tolist()])) for i, p in zip(top.indices, top.values)]
    return ids, [p[0].float().cpu().numpy() for p in patterns], predictions


def write_analysis(
    model: Transformer,
    tokenizer: TextTokenizer,
    directory: Path,
    heads_document: dict[str, Any],
    cfg: AnalysisConfig = AnalysisConfig(),
    pngs: bool = True,
) -> None:
    """heads.json, sample.txt and heatmaps/ (patterns.json, and with `pngs` the PNGs) inside a checkpoint folder.

    Drawing the PNGs is most of a small model's checkpoint time (about 2 s at the induction shape, 40% of an
    iteration): trials draw them in their last checkpoint only, and readers draw them from patterns.json
    when a checkpoint has none (`png_heatmaps`)."""
    directory = Path(directory)
    (directory / "heads.json").write_text(json.dumps(heads_document, indent=1))
    ids = render_heatmaps(model, tokenizer, directory / "heatmaps", cfg, pngs)
    (directory / "sample.txt").write_text(tokenizer.readable(ids) + "\n")


def render_heatmaps(
    model: Transformer, tokenizer: TextTokenizer, directory: Path, cfg: AnalysisConfig, pngs: bool = True
) -> list[int]:
    """The prompt continued by sampling, its patterns.json (with the model's top next-token predictions at each
    position) and, with `pngs`, its attention heatmaps in `directory`; returns the sample's token ids."""
    ids, patterns, predictions = sample_and_patterns(model, tokenizer, cfg)
    named = [[(tokenizer.token_strings([token])[0], probability) for token, probability in position]
             for position in predictions]
    document = {
        "token_ids": ids,
        "tokens": tokenizer.token_strings(ids),
        "patterns": [np.round(p, 5).tolist() for p in patterns],  # [layer][head][q][k]
        "predictions": named,  # [position][rank] = [token, probability]
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "patterns.json").write_text(json.dumps(document))
    if pngs:
        for name, png in png_heatmaps(document).items():
            (directory / name).write_bytes(png)
    return ids


def png_heatmaps(document: dict[str, Any], per_head: bool = True) -> dict[str, bytes]:
    """File name -> PNG of a patterns.json document: one grid a layer (`layer0.png`), and with `per_head` one a
    head (`layer0_head1.png`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = document["tokens"]
    shown = [repr(label)[1:-1] for label in labels]  # newlines and tabs stay visible
    pngs = {}

    def png(figure) -> bytes:
        buffer = io.BytesIO()
        FigureCanvasAgg(figure).print_png(buffer)
        return buffer.getvalue()

    for layer, layer_patterns in enumerate(np.asarray(p, dtype=np.float32) for p in document["patterns"]):
        heads = layer_patterns.shape[0]
        for head in range(heads if per_head else 0):
            figure = Figure(figsize=(4.2, 3.6), dpi=80)
            axes = figure.add_subplot()
            _draw_pattern(figure, axes, layer_patterns[head], shown, f"layer {layer} head {head}", colorbar=True)
            figure.tight_layout()
            pngs[f"layer{layer}_head{head}.png"] = png(figure)
        # Two heads a row, each large enough to read its token labels, and one colour bar for the layer.
        columns = min(heads, 2)
        rows = -(-heads // columns)
        side = min(6.5, max(4.2, 0.16 * len(labels)))
        figure = Figure(figsize=(side * columns + 0.9, side * rows), dpi=80, layout="constrained")
        for head in range(heads):
            axes = figure.add_subplot(rows, columns, head + 1)
            title = f"layer {layer} head {head}"
            image = _draw_pattern(figure, axes, layer_patterns[head], shown, title, colorbar=False)
        figure.colorbar(image, ax=figure.axes, fraction=0.03, pad=0.02, label="attention weight")
        pngs[f"layer{layer}.png"] = png(figure)
    return pngs


def _draw_pattern(figure, axes, pattern: np.ndarray, labels: list[str], title: str, colorbar: bool):
    image = axes.imshow(pattern, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ticks = range(len(labels))
    axes.set_xticks(ticks, labels, rotation=90, fontsize=8)
    axes.set_yticks(ticks, labels, fontsize=8)
    axes.set_xlabel("key", fontsize=9)
    axes.set_ylabel("query", fontsize=9)
    axes.set_title(title, fontsize=10)
    if colorbar:
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    return image
