"""Names shared by the sweep modules; imports nothing heavy, so every module may import it."""

from __future__ import annotations

from model.metrics import REPORTED_METRICS, SUMMARY_METRICS, metric_mode

SWEEP_FILE = "sweep.json"  # our own record of how the sweep was launched (for resume and results)

# Failures that would only repeat if retried: a trial reports one of these names as a metric,
# then errors once (sweep.trainable); results show the name as the trial's error.
FINAL_FAILURES = ("nan_loss", "out_of_memory", "storage_full", "gpu_unavailable")
# A trial that fails finally leaves an empty file `final_failure-<reason>` in its folder, whatever else it could write.
FAILURE_MARKER = "final_failure-"

# The public status of a trial Tune stopped before its last iteration (ASHA, or a stop rule).
STOPPED_EARLY = "STOPPED_EARLY"

# The public status of a trial that was running (or waiting) when its driver stopped: `sweep resume` continues it.
INTERRUPTED = "INTERRUPTED"


def display_state(state: str) -> str:
    """A trial state as every table and summary line shows it (`terminated`, `stopped early`, `interrupted`);
    --json keeps Tune's names (`TERMINATED`)."""
    return state.lower().replace("_", " ")


# Ray Tune's states of a trial that has not ended.
UNFINISHED = ("RUNNING", "PENDING", "PAUSED")

# --scheduler choices, as the CLI's help explains them.
SCHEDULERS = {
    "asha": "asynchronous successive halving: a trial is compared with those that reached its rung before it",
    "halving": "synchronous successive halving: trials pause at each rung until all have reached it, then the best 1/N "
               "go on",
    "hyperband": "Tune's HyperBand: brackets of synchronous halving, from the most cautious to the most aggressive",
    "fifo": "no early stopping: every trial trains to its end",
}

# Schedulers whose first rung --grace-tokens (or a preset's) can set: HyperBand's brackets set their own.
GRACE_TOKEN_SCHEDULERS = ("asha", "halving")

__all__ = [
    "FINAL_FAILURES", "GRACE_TOKEN_SCHEDULERS", "INTERRUPTED", "UNFINISHED", "REPORTED_METRICS", "SCHEDULERS",
    "STOPPED_EARLY", "SUMMARY_METRICS", "SWEEP_FILE", "display_state", "metric_mode",
]
