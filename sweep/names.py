"""Names shared by the sweep modules; imports nothing heavy, so every module may import it."""

from __future__ import annotations

from model.metrics import REPORTED_METRICS, SUMMARY_METRICS, metric_mode

SWEEP_FILE = "sweep.json"  # our own record of how the sweep was launched (for resume and results)

# Failures that would only repeat if retried: a trial reports one of these names as a metric,
# then errors once (sweep.trainable); results show the name as the trial's error.
FINAL_FAILURES = ("nan_loss", "out_of_memory", "storage_full")

# The public status of a trial Tune stopped before its last iteration (ASHA, or a stop rule).
STOPPED_EARLY = "STOPPED_EARLY"

__all__ = ["FINAL_FAILURES", "REPORTED_METRICS", "STOPPED_EARLY", "SUMMARY_METRICS", "SWEEP_FILE", "metric_mode"]
