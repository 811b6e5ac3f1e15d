"""Live view of a running sweep: a rich panel on a terminal, plain log lines otherwise."""

from __future__ import annotations

import math
import time

from ray import tune
from rich.console import Console
from rich.live import Live
from rich.table import Table

from model.config import ConfigError

from .driver import interruption
from .names import FINAL_FAILURES
from .space import planned_iterations


class ProgressCallback(tune.Callback):
    """Counts trials by state and tracks the best metric so far."""

    def __init__(self, metric: str, mode: str, max_iterations: int | None = None, trials: int | None = None) -> None:
        """`max_iterations`: the --max-iterations cap, if any; each trial's own count comes from its config.
        `trials`: how many the sweep makes (Tune creates them as it goes)."""
        self.metric, self.mode, self.max_iterations, self.trials = metric, mode, max_iterations, trials
        self._console: Console | None = None
        self._live: Live | None = None
        self.unfinished: set[str] = set()
        """Trials that had not finished when the sweep was last seen uninterrupted."""
        self._seen: list = []  # the trials as Tune last showed them
        self._summarized = False

    def __getstate__(self):
        # Tune pickles callbacks into the experiment state; consoles stay behind.
        return {"metric": self.metric, "mode": self.mode, "max_iterations": self.max_iterations, "trials": self.trials}

    def __setstate__(self, state):
        self.__init__(**state)

    def setup(self, **info) -> None:
        self._console = Console(stderr=True, soft_wrap=True)
        self.started = time.time()
        self.best: tuple[float, str] | None = None
        self.counts = {"running": 0, "stopped early": 0, "done": 0, "errored": 0, "pending": 0}
        if self._console.is_terminal:
            self._live = Live(self._render(), console=self._console, refresh_per_second=2, transient=False)
            self._live.start()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
            if better:
                self.best = (value, trial.trial_id)
        if self._live is None:
            failure = next((reason for reason in FINAL_FAILURES if result.get(reason)), None)
            if failure:  # the report that ends the trial carries a sentinel metric (inf), not a measurement
                self._log(f"{trial.trial_id} {failure} at tokens_seen {result.get('tokens_seen', 0):,}")
            elif isinstance(value, float):
                self._log(f"{trial.trial_id} iter {result.get('training_iteration')} {self.metric} {value:.4f}")
            else:
                self._log(f"{trial.trial_id} iter {result.get('training_iteration')}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if self._live is None:
            done = trial.last_result.get("training_iteration", 0)
            planned = self._planned(trial)
            state = "done" if done >= planned else f"stopped early at {done}/{planned}"
            self._log(f"{trial.trial_id} {state}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if self._live is None:
            self._log(f"{trial.trial_id} errored")

    def on_step_end(self, iteration, trials, **info) -> None:
        self._seen = trials

        if not interruption():
            self.unfinished = {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")}
        self.counts = {"running": 0, "stopped early": 0, "done": 0, "errored": 0, "pending": 0}
        for trial in trials:
            if trial.status == "RUNNING":
                self.counts["running"] += 1
            elif trial.status == "ERROR":
                self.counts["errored"] += 1
            elif trial.status == "TERMINATED":
                finished = trial.last_result.get("training_iteration", 0) >= self._planned(trial)
                self.counts["done" if finished else "stopped early"] += 1
            else:
                self.counts["pending"] += 1
        if self._live is not None:
            self._live.update(self._render())

    def _planned(self, trial) -> int:
        try:
            planned = planned_iterations(trial.config)
        except (ConfigError, KeyError, TypeError):
            return self.max_iterations or 0
        return min(planned, self.max_iterations or planned)

    def on_experiment_end(self, trials, **info) -> None:
        self.on_step_end(0, trials)
        if self._live is not None:
            self._live.stop()
            self._live = None
        self._log(self._summary(trials))
        self._summarized = True

    def summarize_interrupted(self) -> None:
        """The summary line Tune's end of the experiment would have printed, when a second Ctrl-C stopped the
        driver before Tune got there: the counts of the trials as Tune last showed them."""
        if self._summarized or self._console is None or not self._seen:
            return
        if self._live is not None:
            self._live.stop()
            self._live = None
        self._log(self._summary(self._seen, interrupted=True))
        self._summarized = True

    def _summary(self, trials: list, interrupted: bool = False) -> str:
        # Interrupted, Tune stopped the running trials: they did not finish, whatever their state says now.
        if interrupted or interruption():
            self.counts = self._interrupted_counts(trials)
        counts = ", ".join(f"{n} {state}" for state, n in self.counts.items() if n)
        best = f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else f"no {self.metric} yet"
        return f"[{time.time() - self.started:6.0f}s] {counts or 'starting'}; {best}"

    def _interrupted_counts(self, trials: list) -> dict[str, int]:
        """The sweep's trials as `sweep status` and `sweep resume` count them: finished (done, stopped early,
        errored) before the interruption, unfinished when it came, and not started yet."""
        counts = {"done": 0, "stopped early": 0, "errored": 0, "unfinished": 0, "not started": 0}
        for trial in trials:
            if trial.trial_id in self.unfinished:
                counts["unfinished"] += 1
            elif trial.status == "ERROR":
                counts["errored"] += 1
            else:
                done = trial.last_result.get("training_iteration", 0) >= self._planned(trial)
                counts["done" if done else "stopped early"] += 1
        counts["not started"] = max(0, (self.trials or len(trials)) - len(trials))
        return counts

    def _render(self) -> Table:
        table = Table(title="sweep", show_header=True)
        for state in self.counts:
            table.add_column(state, justify="right")
        table.add_column(f"best {self.metric}")
        table.add_column("elapsed", justify="right")
        best = f"{self.best[0]:.4f} ({self.best[1]})" if self.best else "-"
        table.add_row(*(str(n) for n in self.counts.values()), best, f"{time.time() - self.started:.0f}s")
        return table

    def _log(self, line: str) -> None:
        if self._console is not None:
            self._console.print(line, highlight=False)
