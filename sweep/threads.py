"""Idle CPUs at a sweep's tail train the trials still running.

A trial trains with as many torch threads as CPUs Ray reserved for it, so trials never oversubscribe a
node. Once every trial of a sweep has started, a finished trial's CPUs sit idle while the last ones train
on: on the induction preset the 1-layer trial ends about 25 s before the 2-layer one. Then, and only
then, the driver shares a one-node cluster's free CPUs (those no Ray task or actor of any job holds)
among the running trials, through Ray's key-value store, and each trial takes its share up after its
next report. The driver recounts at every trial's start, report and end, so CPUs that another job takes
(a second sweep, `sweep analyse`) are given back within an iteration or two.

Free in Ray's count is not idle: a process outside Ray (another user's job, a build) holds no Ray resource. So a
share is also reduced by the CPUs that processes outside Ray's workers kept busy since the driver last looked
(their CPU time, through psutil): under real load no trial takes more threads, and one that had some gives them back
within an iteration. A trial's own threads, lent ones included, are Ray's workers: lending never reads as load.
(torch's CPU kernels sum in an order that depends on the thread count: a trial given more threads at the tail
differs from one that was not in the 7th digit of its losses. A trial's numbers are exact to the digit for the same
thread schedule.)

No trial of the sweep waits for CPUs while shares are out, so none can start on a CPU another trial took.
A trial Tune restarts after a failure waits again: the driver takes every share back at once, and the
trials give them up at their next iteration, so the node is oversubscribed for one iteration at most.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import ray
from ray import tune
from ray.experimental import internal_kv

log = logging.getLogger(__name__)

KEY_NAMESPACE = "circuit-sweep"


def threads_key(experiment: str, trial_id: str) -> bytes:
    return f"threads/{experiment}/{trial_id}".encode()


def share_threads(running: list[str], own_threads: int, node_cpus: int) -> dict[str, int]:
    """Threads of each running trial (most behind first): its own, plus an even share of the CPUs none uses."""
    spare = node_cpus - own_threads * len(running)
    if spare < 1 or not running:
        return {trial: own_threads for trial in running}
    extra, leftover = divmod(spare, len(running))
    return {trial: own_threads + extra + (1 if rank < leftover else 0) for rank, trial in enumerate(running)}


def granted_threads(experiment: str, trial_id: str, own_threads: int) -> int:
    """The threads this trial may train with now: its share of idle CPUs when the driver gave one, else its own."""
    if not experiment or not internal_kv._internal_kv_initialized():
        return own_threads
    value = internal_kv._internal_kv_get(threads_key(experiment, trial_id), namespace=KEY_NAMESPACE)
    return max(own_threads, int(value)) if value else own_threads


def adopt_threads(threads: int) -> None:
    """Train with `threads` torch threads from now on (a no-op when already so)."""
    import torch

    if torch.get_num_threads() != threads:
        log.info("training with %d threads from now on", threads)
        torch.set_num_threads(threads)


MEASURE_MIN_S = 1.0
"""Idle CPUs are measured over at least this long (a shorter window after a burst of reports is noise)."""


class OutsideLoad:
    """CPUs busy outside Ray's workers on this node since the previous reading (another user's job, a build, this
    driver): the CPU time of every process not titled `ray::...`, over the wall time between readings. Ray's own
    workers are Ray's count; the threads lent to this sweep's trials are theirs, so lending never reads as load."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._last = (time.monotonic(), self._times())
        self.busy: float | None = None
        """None until a window of MEASURE_MIN_S has passed."""

    def _times(self) -> dict[int, float]:
        found = {}
        for process in self._psutil.process_iter(["name", "cpu_times"]):
            name, times = process.info["name"] or "", process.info["cpu_times"]
            if times is not None and not name.startswith("ray::"):
                found[process.pid] = times.user + times.system
        return found

    def read(self) -> float | None:
        now = time.monotonic()
        before, previous = self._last
        if now - before >= MEASURE_MIN_S:
            times = self._times()
            # a process started since the last reading counts whole; one that ended is gone from both
            used = sum(max(0.0, total - previous.get(pid, 0.0)) for pid, total in times.items())
            self.busy = used / (now - before)
            self._last = (now, times)
        return self.busy


class SpareThreads(tune.Callback):
    """Driver side: publishes each running trial's threads whenever a trial starts, ends or fails."""

    def __init__(self, experiment: str, own_threads: int, trial_count: int,
                 log_line: Callable[[str], None] | None = None) -> None:
        """`trial_count`: trials the sweep will run; until Tune has made them all, nothing is shared."""
        self.experiment, self.own_threads, self.trial_count = experiment, own_threads, trial_count
        self.log_line = log_line
        self.published: dict[str, int] = {}
        self.outside_load = OutsideLoad()

    def __getstate__(self):
        # Tune pickles callbacks into the experiment state; the console's log function stays behind.
        return {"experiment": self.experiment, "own_threads": self.own_threads, "trial_count": self.trial_count}

    def __setstate__(self, state):
        self.__init__(**state)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._update(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._update(trials, ended=trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trials, ended=trial)

    def _update(self, trials, ended=None) -> None:
        """Publish each running trial's threads; `ended`: a trial Tune has not yet marked as ended."""
        if not internal_kv._internal_kv_initialized():
            return
        running = sorted((t for t in trials if t.status == "RUNNING" and t is not ended),
                         key=lambda t: t.last_result.get("training_iteration", 0))
        waiting = any(t.status in ("PENDING", "PAUSED") for t in trials) or len(trials) < self.trial_count
        if waiting or len([node for node in ray.nodes() if node.get("Alive")]) != 1:
            shares = {t.trial_id: self.own_threads for t in running}
        else:
            # Free in Ray's count (reserved by nobody) less what processes outside Ray keep busy
            free = int(ray.available_resources().get("CPU", 0))
            outside = self.outside_load.read()
            free = max(0, round(free - outside)) if outside is not None else 0
            shares = share_threads([t.trial_id for t in running], self.own_threads,
                                   self.own_threads * len(running) + free)
        for trial_id in set(self.published) - set(shares):
            internal_kv._internal_kv_del(threads_key(self.experiment, trial_id), namespace=KEY_NAMESPACE)
            del self.published[trial_id]
        for trial_id, threads in shares.items():
            if self.published.get(trial_id, self.own_threads) != threads:
                internal_kv._internal_kv_put(threads_key(self.experiment, trial_id), str(threads), overwrite=True,
                                 namespace=KEY_NAMESPACE)
                if self.log_line and threads > self.own_threads:
                    self.log_line(f"{trial_id} trains with {threads} threads from its next iteration (idle CPUs)")
            self.published[trial_id] = threads
