"""Intervals on circuit readings and when an edge appears (model/intervals.py), on series whose answer is known."""

import numpy as np

from model.intervals import appearance, bootstrap_indices, mean_interval, ratio_interval

TOKENS = [0, 1000, 2000, 4000, 8000, 16000, 32000, 64000]


def test_a_transient_spike_is_not_an_appearance():
    lows = [0.0, 0.3, 0.0, 0.05, 0.2, 0.25, 0.3, 0.3]  # above 0.1 once at 1000 tokens, then for good from 8000
    found = appearance(lows, TOKENS, threshold=0.1, persist=2)
    assert (found.index, found.tokens_after, found.tokens_at) == (4, 4000, 8000)
    # without persistence the spike would read as the appearance
    assert appearance(lows, TOKENS, threshold=0.1, persist=0).tokens_at == 1000


def test_an_edge_clear_at_the_last_snapshots_appears_there_and_a_missing_reading_is_below():
    assert appearance([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.2], TOKENS, 0.1, 2).tokens_at == 32000
    assert appearance([None, 0.5, 0.5, None, 0.5, 0.5, 0.5, 0.5], TOKENS, 0.1, 2).tokens_at == 8000
    assert appearance([0.5] * 8, TOKENS, 0.1, 2).tokens_after is None  # clear from the first snapshot on
    assert appearance([0.05] * 8, TOKENS, 0.1, 2) is None


def test_the_bootstrap_interval_of_a_ratio_covers_the_truth_and_narrows_with_more_sequences():
    rng = np.random.default_rng(0)
    widths = []
    for sequences in (16, 256):
        covered = 0
        for trial in range(40):
            denominators = rng.normal(2.0, 0.5, sequences)
            numerators = 0.3 * denominators + rng.normal(0.0, 0.2, sequences)  # true ratio 0.3
            low, high = ratio_interval(numerators[None], denominators, bootstrap_indices(sequences, seed=trial))
            covered += low[0] <= 0.3 <= high[0]
            widths.append(high[0] - low[0])
        assert covered >= 34, covered  # a 95% interval misses the truth in about 2 of 40
    assert np.mean(widths[40:]) < 0.4 * np.mean(widths[:40])
    low, high = mean_interval(np.array([1.0, 1.0, 1.0]), bootstrap_indices(3))
    assert low == high == 1.0
