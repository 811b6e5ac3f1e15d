"""What an experiment read back from storage is: its trials, each with its state, metrics, checkpoints and snapshots
(sweep.results reads them; every reader takes these records)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .names import STOPPED_EARLY, display_state
from .storage import Storage
from .trajectory import Snapshot


@dataclass
class TrialRecord:
    trial_id: str
    tune_status: str
    """Ray Tune's state: PENDING, RUNNING, TERMINATED, ERROR..."""
    config: dict[str, Any]
    metrics: dict[str, Any]
    iterations: int
    path: str
    planned_iterations: int | None = None
    """Iterations the trial makes when nothing stops it; None when its config is unknown."""
    checkpoints: list[str] = field(default_factory=list)
    """Complete checkpoint folders, oldest first."""
    files: dict[str, list[str]] = field(default_factory=dict)
    """Files of each complete checkpoint, relative to it."""
    error: str | None = None
    snapshots: list[Snapshot] = field(default_factory=list)
    """Complete snapshots, by step."""
    formed_at_resolution: str = "iteration"
    """What its induction_formed_at and prev_token_formed_at count: the trainer's first iteration past the
    threshold, or (once `sweep analyse` scored its snapshots) the first snapshot (sweep.table.formed_at)."""

    @property
    def checkpoint(self) -> str | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def stopped_early(self) -> bool:
        """Terminated by the scheduler (ASHA) before its last iteration."""
        planned = self.planned_iterations
        return self.tune_status == "TERMINATED" and planned is not None and self.iterations < planned

    @property
    def status(self) -> str:
        """The state users see: Tune's, except that a trial ASHA stopped is STOPPED_EARLY."""
        return STOPPED_EARLY if self.stopped_early else self.tune_status

    @property
    def status_text(self) -> str:
        """For tables: `stopped early at 2/4` instead of a bare state."""
        if self.stopped_early:
            return f"stopped early at {self.iterations}/{self.planned_iterations}"
        return display_state(self.tune_status)


@dataclass
class Experiment:
    name: str
    storage: Storage
    record: dict[str, Any]
    trials: list[TrialRecord]
    state_readable: bool = True
    """False when Tune's newest state file was cut short: the experiment cannot be resumed."""
    state_found: bool = True
    """False when Tune never saved its state: the launch stopped before the sweep began."""
    driver: dict[str, Any] | None = None
    """driver.json: whether a driver runs the sweep, or how the last one stopped (None: an older experiment)."""
    damaged: list[str] = field(default_factory=list)
    """Ray's trial records that were empty or cut short (a full disk): read around, from what else is there."""

    @property
    def formed_at_resolution(self) -> str:
        """snapshots, iterations, or mixed (snapshots where `sweep analyse` scored them, else iterations)."""
        kinds = {t.formed_at_resolution for t in self.trials}
        return "snapshots" if kinds == {"snapshot"} else "iterations" if kinds <= {"iteration"} else "mixed"

    @property
    def path(self) -> str:
        return self.storage.path(self.name)
