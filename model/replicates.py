"""Readings summarised across a grid point's replicates, and the grid's effects on them, with intervals: small numpy
functions, free of torch, over one observation a trial.

- A trial's grid point is its axis values but the seed; its replicates are the trials of the same point.
- A time reading (when induction formed, when a role-edge appeared) that never happened is censored at the trial's
  last tokens, never dropped: its summary is the Kaplan-Meier median (the first time at which the estimate of
  "formed by then" reaches one half), None where more than half never formed. Other readings use the median.
- Intervals are 95% percentile bootstraps that resample replicates within each grid point (the grid's design is
  kept, only the seeds vary), so an axis value's interval pools its grid points as the estimate does. A grid point
  with fewer than MIN_REPLICATES replicates has too little spread to resample: intervals over it are None, with the
  reason.
- The effect of an axis: for each value, the reading's summary over every trial with that value, and the difference
  from the previous value with its interval (independent resamples of disjoint trials). A difference whose
  interval excludes zero is an effect beyond the seeds' noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
MIN_REPLICATES = 3
"""Seeds a grid point needs for an interval: two seeds give a bootstrap three distinct medians, too few to place the
ends of a 95% interval."""
ONE_REPLICATE = (f"fewer than {MIN_REPLICATES} seeds per grid point: too few to resample (launch with --seeds "
                 f"{MIN_REPLICATES} or more for intervals)")
NOT_REACHED = "not reached: half or more never formed"


@dataclass(frozen=True)
class Observation:
    """One trial's reading."""

    point: tuple[tuple[str, Any], ...]
    """The trial's grid point: (axis, value) pairs of every axis but the seed."""
    value: float | None
    """The reading; None: it never happened (censored at `end`) or was not measured (`end` None)."""
    end: float | None = None
    """For a time reading: the trial's last tokens, where a reading that never happened is censored."""

    @property
    def censored(self) -> bool:
        return self.value is None and self.end is not None

    @property
    def measured(self) -> bool:
        return self.value is not None or self.end is not None


@dataclass
class Summary:
    """A reading over a set of trials: its estimate, interval, and how many never reached it."""

    estimate: float | None
    low: float | None
    high: float | None
    trials: int
    never: int = 0
    reason: str | None = None
    """Why the estimate or an end of the interval is None."""

    def document(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "interval": [self.low, self.high], "trials": self.trials,
                "never": self.never, "reason": self.reason}


@dataclass
class AxisEffect:
    """A reading across one axis's values."""

    axis: str
    values: list[Any]
    summaries: list[Summary]
    differences: list[Summary] = field(default_factory=list)
    """Value i minus value i - 1, for i >= 1."""

    def document(self) -> dict[str, Any]:
        return {"axis": self.axis, "values": [
            {"value": value, **summary.document(),
             "difference": None if i == 0 else {"from": self.values[i - 1], **self.differences[i - 1].document()}}
            for i, (value, summary) in enumerate(zip(self.values, self.summaries))]}


def km_medians(times: np.ndarray, events: np.ndarray) -> np.ndarray:
    """Kaplan-Meier medians of each row of `times` [R, n] with `events` [R, n] (False: censored at that time): the
    first event time at which the survival estimate falls to one half or below; inf where it never does."""
    times, events = np.atleast_2d(times).astype(np.float64), np.atleast_2d(events).astype(bool)
    rows, count = times.shape
    if count == 0:
        return np.full(rows, np.inf)
    # by time, an event before a censoring at the same time (the censored trial was still at risk then)
    by_censoring = np.argsort(~events, axis=1, kind="stable")
    by_time = np.argsort(np.take_along_axis(times, by_censoring, 1), axis=1, kind="stable")
    order = np.take_along_axis(by_censoring, by_time, 1)
    ordered_times, ordered_events = np.take_along_axis(times, order, 1), np.take_along_axis(events, order, 1)
    at_risk = count - np.arange(count)
    survival = np.cumprod(np.where(ordered_events, 1.0 - 1.0 / at_risk, 1.0), axis=1)
    below = survival <= 0.5 + 1e-12
    first = below.argmax(axis=1)
    return np.where(below.any(axis=1), ordered_times[np.arange(rows), first], np.inf)


def formed_by(observations: list[Observation]) -> list[tuple[float, float]]:
    """The Kaplan-Meier estimate of "formed by t": (t, fraction) at each time something formed."""
    times = np.array([o.value if o.value is not None else o.end for o in observations if o.measured], dtype=float)
    events = np.array([o.value is not None for o in observations if o.measured], dtype=bool)
    order = np.lexsort((~events, times))
    survival, curve = 1.0, []
    for rank, index in enumerate(order):
        if events[index]:
            survival *= 1.0 - 1.0 / (len(order) - rank)
            if curve and curve[-1][0] == times[index]:  # tied times: one step
                curve.pop()
            curve.append((float(times[index]), round(1.0 - survival, 6)))
    return curve


def _statistic(values: np.ndarray, events: np.ndarray, time: bool) -> np.ndarray:
    """Each row's median (Kaplan-Meier for a time reading)."""
    return km_medians(values, events) if time else np.median(values, axis=1)


def _resampled(groups: list[np.ndarray], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, sum of sizes] indices: each group's members drawn with replacement from that group alone."""
    return np.concatenate([group[rng.integers(0, len(group), size=(resamples, len(group)))] for group in groups],
                          axis=1)


@dataclass
class _Group:
    """The measured trials of one set of grid points, as arrays."""

    values: np.ndarray
    events: np.ndarray
    points: list[np.ndarray]
    never: int

    @classmethod
    def of(cls, observations: list[Observation]) -> _Group:
        measured = [o for o in observations if o.measured]
        values = np.array([o.value if o.value is not None else o.end for o in measured], dtype=np.float64)
        events = np.array([o.value is not None for o in measured], dtype=bool)
        points: dict[tuple, list[int]] = {}
        for index, observation in enumerate(measured):
            points.setdefault(observation.point, []).append(index)
        return cls(values, events, [np.array(p) for p in points.values()], int((~events).sum()))

    @property
    def replicated(self) -> bool:
        return bool(self.points) and all(len(p) >= MIN_REPLICATES for p in self.points)

    def estimate(self, time: bool) -> float:
        return float(_statistic(self.values[None], self.events[None], time)[0]) if len(self.values) else np.nan

    def bootstrap(self, time: bool, resamples: int, rng: np.random.Generator) -> np.ndarray:
        indices = _resampled(self.points, resamples, rng)
        return _statistic(self.values[indices], self.events[indices], time)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _interval(samples: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    """Percentile ends of bootstrap statistics; an end at infinity (past the end of training) is None."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail], method="inverted_cdf")
    return _finite(low), _finite(high)


def summarise(observations: list[Observation], time: bool, resamples: int = RESAMPLES, seed: int = 0,
              confidence: float = CONFIDENCE) -> Summary:
    """The median (Kaplan-Meier for a time reading) of `observations` with its bootstrap interval."""
    group = _Group.of(observations)
    if not len(group.values):
        return Summary(None, None, None, 0, reason="not measured")
    estimate = _finite(group.estimate(time))
    reason = None if estimate is not None else NOT_REACHED
    if not group.replicated:
        return Summary(estimate, None, None, len(group.values), group.never, reason or ONE_REPLICATE)
    low, high = _interval(group.bootstrap(time, resamples, np.random.default_rng(seed)), confidence)
    if reason is None and high is None:
        reason = "the interval's upper end is past the end of training (some resamples never formed)"
    return Summary(estimate, low, high, len(group.values), group.never, reason)


def _difference(first: _Group, second: _Group, time: bool, resamples: int, rng: np.random.Generator,
                confidence: float) -> Summary:
    """second minus first, with the interval of independent resamples of both."""
    before, after = first.estimate(time), second.estimate(time)
    estimate = _finite(after - before) if np.isfinite(before) and np.isfinite(after) else None
    trials = len(first.values) + len(second.values)
    reason = None if estimate is not None else NOT_REACHED
    if not (first.replicated and second.replicated):
        return Summary(estimate, None, None, trials, first.never + second.never, reason or ONE_REPLICATE)
    with np.errstate(invalid="ignore"):
        samples = second.bootstrap(time, resamples, rng) - first.bootstrap(time, resamples, rng)
    undefined = np.isnan(samples).mean()  # neither formed in this resample: no difference to take
    if undefined > (1 - confidence) / 2:
        return Summary(estimate, None, None, trials, first.never + second.never,
                       f"neither formed in {undefined:.0%} of the resamples")
    low, high = _interval(samples[~np.isnan(samples)], confidence)
    return Summary(estimate, low, high, trials, first.never + second.never, reason)


def _sortable(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def axis_effects(observations: list[Observation], time: bool, resamples: int = RESAMPLES, seed: int = 0,
                 confidence: float = CONFIDENCE) -> list[AxisEffect]:
    """For every axis of the observations' grid points that takes more than one value: the reading per value with
    its interval, and each value's difference from the previous one with its interval."""
    rng = np.random.default_rng(seed)
    axes = list(dict.fromkeys(axis for o in observations for axis, _ in o.point))
    effects = []
    for axis in axes:
        by_value: dict[Any, list[Observation]] = {}
        for observation in observations:
            by_value.setdefault(dict(observation.point).get(axis), []).append(observation)
        if len(by_value) < 2:
            continue
        values = sorted(by_value, key=_sortable)
        groups = [_Group.of(by_value[v]) for v in values]
        summaries = [summarise(by_value[v], time, resamples, int(rng.integers(2**31)), confidence) for v in values]
        differences = [_difference(groups[i - 1], groups[i], time, resamples, rng, confidence)
                       for i in range(1, len(values))]
        effects.append(AxisEffect(axis, values, summaries, differences))
    return effects


def jaccard_mean(sets: list[set[str]]) -> float | None:
    """The mean Jaccard overlap of every pair of sets (None with fewer than two, or where a pair is empty)."""
    overlaps = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1:] if a | b]
    return float(np.mean(overlaps)) if overlaps else None
