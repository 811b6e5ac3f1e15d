"""Intervals on circuit readings, and when an edge appears: small numpy functions, free of torch, so the readers of
the analysis table use the same definitions as the code that computes it.

- Every effect and faithfulness is a ratio of means over the task's sequences (the metric's change over the
  clean-to-corrupted difference). Its interval is a percentile bootstrap over sequences: the sequences are
  resampled with replacement, numerator and denominator together.
- An edge appears at the first snapshot whose interval's lower end clears the threshold and stays clear for the
  next `persist` snapshots (all that remain, near the end of training); it is reported as the tokens between the
  last snapshot below and that first one, since training in between was not looked at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 1000


def bootstrap_indices(sequences: int, seed: int = 0, resamples: int = RESAMPLES) -> np.ndarray:
    """[resamples, sequences] indices of sequences drawn with replacement (seeded: the same for every snapshot)."""
    return np.random.default_rng(seed).integers(0, sequences, size=(resamples, sequences))


def ratio_interval(numerators: np.ndarray, denominators: np.ndarray, indices: np.ndarray,
                   confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of mean(numerators[..., b]) / mean(denominators[b]) over sequences b.

    `numerators` [..., B], `denominators` [B], `indices` from bootstrap_indices; returns (low, high), each [...].
    """
    numerators = np.asarray(numerators, dtype=np.float64)
    denominators = np.asarray(denominators, dtype=np.float64)
    tops = numerators[..., indices].mean(-1)  # [..., R]
    bottoms = denominators[indices].mean(-1)  # [R]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = tops / bottoms
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(ratios, [tail, 100 - tail], axis=-1)
    return low, high


def mean_interval(values: np.ndarray, indices: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-sequence `values` [B]."""
    means = np.asarray(values, dtype=np.float64)[indices].mean(-1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Appearance:
    """Where an edge appeared: between the last snapshot below the threshold and the first that stays above."""

    index: int
    """Index of the first snapshot of the run above the threshold."""
    tokens_after: int | None
    """tokens_seen of the last snapshot below it (None: it cleared the threshold at the first snapshot)."""
    tokens_at: int


def appearance(lows: list[float | None], tokens: list[int], threshold: float, persist: int) -> Appearance | None:
    """The first snapshot whose lower end `lows[i]` clears `threshold` and stays clear for the next `persist`
    snapshots (or to the last one); None if there is none. A missing value (the model did not do the task) is
    below the threshold."""
    clear = [low is not None and np.isfinite(low) and low >= threshold for low in lows]
    for index, passed in enumerate(clear):
        if passed and all(clear[index : index + persist + 1]):
            return Appearance(index, tokens[index - 1] if index > 0 else None, tokens[index])
    return None
