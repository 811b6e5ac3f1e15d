"""Circuits read from the weights and tested by ablation (Elhage et al. 2021; Olsson et al. 2022).

- `mean_ablation`: each head's output z (before W_O) replaced by its mean over
  the held-out batch and positions; the rise in held-out loss and in loss on
  the second half of random repeated tokens says whether the model uses it.
- `token_tables`: the OV circuit W_E W_V W_O W_U of every head, the QK circuit
  of layer-0 heads, 1-layer skip-trigrams and the direct path W_E W_U, all
  restricted to the K most frequent training tokens and computed through the
  d_head-sized factors: no vocab x vocab matrix is ever formed. Each token
  embedding passes through a LayerNorm's centring and scaling as it would alone
  (no positions), so the tables are in logits and attention scores the model
  could produce; the gains are folded into the weights that read the norm, and
  its bias, the same shift for every token, is left out. A head's output meets
  the final LayerNorm in a residual stream of other content: it is scaled as a
  token embedding would be there, on average over the frequent tokens.
- `icl_score`: loss late in the context minus loss early in it (Olsson et al.).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .transformer import PAD_ID, Transformer


def icl_score(position_loss: torch.Tensor) -> float:
    """Mean loss over the last tenth of the positions minus the loss at position floor(T/10).

    `position_loss` is the mean loss at each of the T input positions. Olsson et
    al. use "loss at token 500 minus loss at token 50"; scaled to short contexts.
    Negative: later tokens are predicted better, the model uses its context.
    """
    length = position_loss.shape[0]
    last = max(1, length // 10)
    return float(position_loss[length - last :].mean() - position_loss[length // 10])


# ---------------------------------------------------------------- ablation


def _token_losses(model: Transformer, tokens: torch.Tensor, chunk_rows: int = 2048) -> torch.Tensor:
    """Per-position next-token loss [B, T-1] of windows `tokens` [B, T]; pad targets give NaN.

    The unembedding runs in chunks of positions: the [tokens, vocab] logits are never formed whole.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    residual, _ = model._residual(inputs, return_patterns=False)
    flat, flat_targets = residual.reshape(-1, residual.shape[-1]), targets.reshape(-1)
    losses = torch.empty(flat.shape[0], device=flat.device)
    for start in range(0, flat.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        logits = model.unembed(flat[rows]).float()
        losses[rows] = F.cross_entropy(logits, flat_targets[rows].clamp_min(0).long(), reduction="none")
    losses[flat_targets == PAD_ID] = float("nan")
    return losses.view(targets.shape)


@torch.no_grad()
def mean_ablation(
    model: Transformer, held_out: torch.Tensor, repeated: torch.Tensor, period: int
) -> list[list[dict[str, float]]]:
    """[layer][head] -> {"held_out": loss rise, "repeated": loss rise} under mean ablation.

    `held_out` [B, T+1] windows (PAD_ID marks padding); `repeated` [B, 2n] random
    tokens r + r with n = `period`: its loss is taken on the second copy, from the
    second repeated token on (the first cannot be predicted from context).
    """
    d_head, heads = model.cfg.d_head, model.cfg.n_heads
    real = (held_out[:, :-1] != PAD_ID).reshape(-1)  # positions whose z enters the mean
    captured: list[torch.Tensor] = []
    hooks = [
        block.attn.out.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        for block in model.blocks
    ]
    try:
        clean = _token_losses(model, held_out)  # one pass records every layer's z
    finally:
        for hook in hooks:
            hook.remove()
    means = [
        z.reshape(-1, heads * d_head)[real].float().mean(0).to(z.dtype) for z in captured
    ]  # per layer: (heads * d_head,)

    def losses() -> torch.Tensor:
        return torch.stack(
            [_token_losses(model, held_out).nanmean(), _token_losses(model, repeated)[:, period:].mean()]
        )

    base = torch.stack([clean.nanmean(), _token_losses(model, repeated)[:, period:].mean()])
    measured = []  # device tensors, read once at the end
    for layer in range(model.cfg.n_layers):
        for head in range(heads):
            columns = slice(head * d_head, (head + 1) * d_head)

            def replace(z: torch.Tensor, columns=columns, mean=means[layer][columns]) -> torch.Tensor:
                z = z.clone()
                z[..., columns] = mean
                return z

            hook = model.blocks[layer].attn.out.register_forward_pre_hook(
                lambda module, args, replace=replace: (replace(args[0]),)
            )
            try:
                measured.append(losses() - base)
            finally:
                hook.remove()
    rises = torch.stack(measured).tolist()
    return [[{"held_out": held, "repeated": rep} for held, rep in rises[layer * heads : (layer + 1) * heads]]
            for layer in range(model.cfg.n_layers)]


# ---------------------------------------------------------------- token tables


@dataclass(frozen=True)
class TableConfig:
    """Sizes of the token tables in circuits.json."""

    frequent_tokens: int = 2000
    """K: sources, queries and outputs are restricted to the K most frequent training tokens."""
    rows: int = 40
    """Source (query) tokens listed per table, most frequent first."""
    top: int = 5
    """Output (key) tokens listed per source (query)."""
    skip_trigrams: int = 30
    """Skip-trigrams listed per head of a 1-layer model."""


def token_frequencies(windows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Count of every token id in training windows [N, T+1] (pads ignored)."""
    flat = windows.reshape(-1)
    return torch.bincount(flat[flat >= 0].long().cpu(), minlength=vocab_size)[:vocab_size]


def _gain(norm: torch.nn.Module, width: int) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    return weight.detach().float() if weight is not None else torch.ones(width)


def _normalised(norm: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Rows as a LayerNorm centres and scales them, before its gain (folded into what reads it) and bias."""
    if isinstance(norm, torch.nn.LayerNorm):
        return F.layer_norm(rows, norm.normalized_shape, eps=norm.eps)
    return rows


def _mean_scale(norm: torch.nn.Module, rows: torch.Tensor) -> float:
    """The factor a LayerNorm scales these rows by, on average (1 without a norm)."""
    if isinstance(norm, torch.nn.LayerNorm):
        centred = rows - rows.mean(dim=1, keepdim=True)
        return float((centred.pow(2).mean(dim=1) + norm.eps).rsqrt().mean())
    return 1.0


@torch.no_grad()
def token_tables(
    model: Transformer, decode: Callable[[int], str], frequencies: torch.Tensor, cfg: TableConfig = TableConfig()
) -> dict[str, Any]:
    """The circuits.json document: OV, layer-0 QK, skip-trigram and bigram tables over frequent tokens."""
    device = next(model.parameters()).device
    k = min(cfg.frequent_tokens, int((frequencies > 0).sum()) or model.cfg.vocab_size)
    ids = frequencies.float().topk(k).indices.to(device)  # most frequent first
    width = model.cfg.d_model
    embeddings = model.embed.weight.detach().float()[ids]  # (K, C): token embeddings only, no positions
    W_U = model.unembed.weight.detach().float()[ids].T * _gain(model.ln_final, width).to(device)[:, None]  # (C, K)
    W_U_heads = W_U * _mean_scale(model.ln_final, embeddings)  # what a head writes, as the final norm scales it
    names = _Names(decode, ids.tolist())  # decoded on first use: the tables name a few hundred of the K tokens
    rows = min(cfg.rows, k)

    def table(scores: torch.Tensor, source_names: _Names, target_names: _Names) -> list[dict[str, Any]]:
        top = scores[:rows].topk(min(cfg.top, scores.shape[1]), dim=1)
        values, indices = top.values.tolist(), top.indices.tolist()  # one copy to the host a table
        return [
            {"token": source_names[r], "top": [[target_names[c], round(v, 4)] for v, c in zip(values[r], indices[r])]}
            for r in range(rows)
        ]

    document: dict[str, Any] = {
        "frequent_tokens": k,
        "token_ids": ids[:rows].tolist(),
        # bigrams: what each token raises as the next one
        "direct_path": table(_normalised(model.ln_final, embeddings) @ W_U, names, names),
        "heads": [],
    }
    for layer, block in enumerate(model.blocks):
        gain = _gain(block.ln_attn, width).to(device)[:, None]
        W_E = _normalised(block.ln_attn, embeddings)  # what this layer's attention reads of each token
        attn = block.attn
        W_Q, W_K = attn.W_Q.detach().float() * gain, attn.W_K.detach().float() * gain  # (nh, C, hs)
        W_V, W_O = attn.W_V.detach().float() * gain, attn.W_O.detach().float()
        for head in range(model.cfg.n_heads):
            ov = (W_E @ W_V[head]) @ (W_O[head] @ W_U_heads)  # (K, hs) @ (hs, K): through the factors
            entry: dict[str, Any] = {"layer": layer, "head": head, "ov": table(ov, names, names)}
            if layer == 0:
                qk = (W_E @ W_Q[head]) @ (W_E @ W_K[head]).T / math.sqrt(model.cfg.d_head)  # (K queries, K keys)
                entry["qk"] = table(qk, names, names)
                if model.cfg.n_layers == 1:
                    entry["skip_trigrams"] = _skip_trigrams(qk, ov, names, cfg.skip_trigrams)
            document["heads"].append(entry)
    return document


class _Names:
    """Position in the frequent-token list -> decoded string, decoding each token once, when first asked."""

    def __init__(self, decode: Callable[[int], str], ids: list[int]) -> None:
        self.decode, self.ids, self.cache = decode, ids, {}

    def __getitem__(self, position: int) -> str:
        if position not in self.cache:
            self.cache[position] = self.decode(self.ids[position])
        return self.cache[position]


def _skip_trigrams(qk: torch.Tensor, ov: torch.Tensor, names: _Names, count: int) -> list[dict[str, Any]]:
    """Top "A ... B -> C": query A attends to key B (QK, centred per query) and B raises C (OV, centred per source).

    Scored by the product of the two centred entries, the size of the logit
    change "B earlier in the context" makes to "C next" when A is the current token.
    """
    attend = qk - qk.mean(dim=1, keepdim=True)  # (A, B)
    raise_ = ov - ov.mean(dim=1, keepdim=True)  # (B, C)
    best_c = raise_.max(dim=1)  # each B's strongest output
    scores = attend * best_c.values[None, :]  # (A, B)
    # the best `count` of each row first, then of those: one flat top-k over K^2 entries is 5x slower on CPU
    per_row = scores.topk(min(count, scores.shape[1]), dim=1)
    top = per_row.values.flatten().topk(min(count, per_row.values.numel()))
    keys, best = per_row.indices.flatten().tolist(), best_c.indices.tolist()  # to the host once
    found = []  # (score, a, b, c)
    for value, flat in zip(top.values.tolist(), top.indices.tolist()):
        b = keys[flat]
        found.append((value, flat // per_row.indices.shape[1], b, best[b]))
    if not found:
        return []
    _, rows_a, keys_b, outs_c = zip(*found)
    qk = attend[list(rows_a), list(keys_b)].tolist()  # the two centred entries behind each score, one copy each
    ov = raise_[list(keys_b), list(outs_c)].tolist()
    return [
        {"a": names[a], "b": names[b], "c": names[c], "score": round(value, 4), "qk": round(q, 4), "ov": round(o, 4)}
        for (value, a, b, c), q, o in zip(found, qk, ov)
    ]
