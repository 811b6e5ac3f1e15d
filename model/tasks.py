"""Circuit tasks: clean inputs, corrupted inputs and a metric, each built so that only the mechanism a task names
tells the two runs apart.

- `induction`: clean r + r (n random tokens, repeated). Corrupted: each copy of r shuffled on its own, so the
  same tokens are in context at every position of the second copy and only a lookup of what followed the
  current token's earlier occurrence tells the runs apart. A head that copies whatever is in context (uniform
  attention, a copying OV circuit) predicts the clean next tokens equally well in both runs and has no circuit
  here. The second copy's tokens differ, so an induction head's query edges can show; a shuffle of the first
  copy alone would keep the queries' tokens and hide them (docs/circuits.md says how the choice was made).
- `copying`, the control: clean shuffle(r) + r, the next tokens somewhere in context but never after the
  current token; corrupted: n tokens not in r, then r. Only copying from context tells these apart; an
  induction head, looking up a successor the shuffle broke, does about as badly in both.
- `text`: held-out windows against another window's tokens; KL of the patched next-token distribution from the
  clean one.

Metrics return one value per variant and sequence ([V, B]): per-sequence values give the intervals. Larger is
worse (a loss, a divergence). Each task reads at most `positions` query positions per sequence (evenly spaced
over the positions it measures): at a 50,257-token vocabulary the unembedding of every patched variant is the
cost of a circuit, and a few positions from each of many sequences carry more information than many positions
of few.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import ConfigError
from .transformer import Transformer


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


class Metric:
    """A metric of next-token predictions, larger is worse: `reference` prepares once what it needs of the clean run
    (its normalised residual at the metric's positions [1, B, P, d_model], the clean next tokens [B, P] or None), and
    calling it gives the metric of every variant and sequence [V, B] from their residuals [V, B, P, d_model]."""

    name = ""

    def reference(self, clean: torch.Tensor, unembed: torch.nn.Linear, targets: torch.Tensor | None) -> Any:
        return targets

    def __call__(self, residual: torch.Tensor, reference: Any, unembed: torch.nn.Linear) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class TaskData:
    """What a run's tasks may draw on."""

    held_out: torch.Tensor
    """[N, T+1] held-out windows (PAD_ID marks padding)."""
    tokens: torch.Tensor
    """Ids of the tokens the training data contains: a task never draws another (`<unk>` and the end-of-text
    token of the repeat task are never trained to be predicted)."""


@dataclass(frozen=True)
class CircuitTask:
    """A task: how to draw its inputs and what its metric is. Add one to TASKS to measure it everywhere."""

    name: str
    description: str
    inputs: Callable[[Transformer, TaskData, torch.Generator, int, int], TaskInputs]
    """(model, the run's data, a seeded generator, sequences, positions per sequence) -> TaskInputs."""
    metric: Metric
    second_metric: Metric
    """The robustness panel's other metric (Miller et al. 2024): KL for a loss task, loss for a KL task."""


def _rows_per_chunk(variants: int, unembed: torch.nn.Linear) -> int:
    """Rows of every variant unembedded at once: about 2^24 logits (the vocabulary may be 50,257 wide)."""
    return max(1, 2**24 // (unembed.weight.shape[0] * variants))


def _logsumexp(unembed: torch.nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """log sum exp of the logits of every variant and row [V, n] from residuals [V, n, d_model], in chunks: the
    logits are never all held, nor a log-softmax written out."""
    variants, rows, _ = residual.shape
    found = torch.empty(variants, rows, device=residual.device)
    step = _rows_per_chunk(variants, unembed)
    for start in range(0, rows, step):
        found[:, start : start + step] = unembed(residual[:, start : start + step]).float().logsumexp(-1)
    return found


class NextTokenLoss(Metric):
    """Mean cross entropy of the clean next tokens per variant and sequence: log sum exp of the logits minus the
    target's logit."""

    name = "loss"

    def reference(self, clean, unembed, targets):
        if targets is None:
            raise ConfigError("a loss metric needs the clean next tokens")
        return unembed.weight[targets].float()  # [B, P, d_model]: each target's unembedding row

    def __call__(self, residual, reference, unembed):
        variants, batch, positions, width = residual.shape
        target_logits = (residual.float() * reference).sum(-1)  # [V, B, P]
        normaliser = _logsumexp(unembed, residual.reshape(variants, -1, width)).reshape(variants, batch, positions)
        return (normaliser - target_logits).mean(-1)


class KLToClean(Metric):
    """Mean KL(clean next-token distribution p || patched one q) per variant and sequence. With logits x W^T,
    KL = sum p log p - x . (p W) + logsumexp(x W^T): the clean run's share (sum p log p and p W, a d_model-vector a
    position) is computed once; a variant costs one log sum exp."""

    name = "kl"

    def reference(self, clean, unembed, targets):
        flat = clean.reshape(-1, clean.shape[-1])
        negentropy = torch.empty(len(flat), device=clean.device)
        direction = torch.empty_like(flat, dtype=torch.float32)
        step = _rows_per_chunk(1, unembed)
        for start in range(0, len(flat), step):
            log_p = unembed(flat[start : start + step]).float().log_softmax(-1)
            p = log_p.exp()
            negentropy[start : start + step] = (p * log_p).sum(-1)
            direction[start : start + step] = p @ unembed.weight.float()
        shape = clean.shape[1:3]
        return negentropy.reshape(shape), direction.reshape(*shape, -1)

    def __call__(self, residual, reference, unembed):
        negentropy, direction = reference
        variants, batch, positions, width = residual.shape
        normaliser = _logsumexp(unembed, residual.reshape(variants, -1, width)).reshape(variants, batch, positions)
        return (negentropy - (residual.float() * direction).sum(-1) + normaliser).mean(-1)


next_token_loss, kl_to_clean = NextTokenLoss(), KLToClean()


def _spaced(first: int, last: int, count: int) -> torch.Tensor:
    """At most `count` positions evenly spaced from `first` to `last` (inclusive)."""
    return torch.linspace(first, last, min(count, last - first + 1)).round().long().unique()


def _distinct_rows(tokens: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[count, length] random draws from `tokens`, each row without repeats where there are enough tokens."""
    if len(tokens) >= length:
        return torch.stack([tokens[torch.randperm(len(tokens), generator=generator)[:length]] for _ in range(count)])
    return tokens[torch.randint(0, len(tokens), (count, length), generator=generator)]


def _shuffled(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each row's tokens in a random order that moves every token where the row allows it (a derangement by
    rejection; a row of one repeated token stays as it is)."""
    shuffled = rows.clone()
    for index, row in enumerate(rows):
        for _ in range(100):
            order = torch.randperm(len(row), generator=generator)
            if not (row[order] == row).any():
                break
        shuffled[index] = row[order]
    return shuffled


def _periods(model: Transformer, task: str) -> int:
    period = model.cfg.seq_len // 2
    if period < 2:
        raise ConfigError(f"the {task} task needs seq_len >= 4 (the model's is {model.cfg.seq_len})")
    return period


def induction_inputs(model: Transformer, data: TaskData, generator: torch.Generator, sequences: int,
                     positions: int) -> TaskInputs:
    """Clean: random tokens r of length n = seq_len // 2 repeated, r + r (distinct where the vocabulary allows,
    as the head-score probe draws them). Corrupted: shuffle(r) + shuffle'(r), each copy deranged on its own: the
    same bag of tokens in context everywhere, the successor of each token changed. Measured on the second copy
    from its second token on."""
    period = _periods(model, "induction")
    first = _distinct_rows(data.tokens, sequences, period, generator)
    clean = torch.cat([first, first], dim=1)
    corrupted = torch.cat([_shuffled(first, generator), _shuffled(first, generator)], dim=1)
    measured = _spaced(period, 2 * period - 2, positions)
    return TaskInputs(clean, corrupted, measured, clean[:, measured + 1])


def copying_inputs(model: Transformer, data: TaskData, generator: torch.Generator, sequences: int,
                   positions: int) -> TaskInputs:
    """Clean: shuffle(r) + r, every next token of the second copy somewhere in context, never after the current
    token. Corrupted: n tokens outside r, then r (where the vocabulary has 2n tokens). Measured on the second
    copy from its second token on."""
    period = _periods(model, "copying")
    drawn = _distinct_rows(data.tokens, sequences, 2 * period, generator)
    first, outside = drawn[:, :period], drawn[:, period:]
    clean = torch.cat([_shuffled(first, generator), first], dim=1)
    corrupted = torch.cat([outside, first], dim=1)
    measured = _spaced(period, 2 * period - 2, positions)
    return TaskInputs(clean, corrupted, measured, clean[:, measured + 1])


def text_inputs(model: Transformer, data: TaskData, generator: torch.Generator, sequences: int,
                positions: int) -> TaskInputs:
    """Clean: held-out windows without padding. Corrupted: each window's tokens taken from another window.
    Measured at evenly spaced positions; the targets (the windows' own next tokens) serve the loss metric."""
    length = model.cfg.seq_len
    whole = data.held_out[(data.held_out[:, : length + 1] >= 0).all(dim=1), : length + 1]
    if len(whole) < 2:
        raise ConfigError("the text task needs at least 2 held-out windows without padding "
                          "(train with --pack, the default)")
    windows = whole[torch.randperm(len(whole), generator=generator)[:sequences]]
    clean = windows[:, :length]
    measured = _spaced(0, length - 1, positions)
    return TaskInputs(clean, clean.roll(1, dims=0), measured, windows[:, measured + 1])


TASKS: dict[str, CircuitTask] = {
    "induction": CircuitTask(
        "induction", "r + r against each copy shuffled on its own; loss of the clean next tokens on the second copy",
        induction_inputs, next_token_loss, kl_to_clean),
    "copying": CircuitTask(
        "copying", "shuffle(r) + r against tokens outside r, then r; loss of the clean next tokens on the second "
        "copy (the control: copying from context, not induction)", copying_inputs, next_token_loss, kl_to_clean),
    "text": CircuitTask(
        "text", "held-out windows against another window's tokens; KL to the clean next-token distribution",
        text_inputs, kl_to_clean, next_token_loss),
}


def get_task(name: str) -> CircuitTask:
    if name not in TASKS:
        raise ConfigError(f"unknown circuit task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]
