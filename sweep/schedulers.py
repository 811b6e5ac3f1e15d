"""Schedulers that survive `sweep resume`: Tune keeps a scheduler's object but not what it recorded.

Tune pickles the scheduler with the Tuner at launch and unpickles that, empty, on restore: ASHA's rungs start
again with no result in them, and a resumed sweep would stop trials the
same sweep uninterrupted kept, or keep ones it stopped.
`ReplayingASHA` gives every restored trial's recorded results back to its rungs as it is added.
"""

from __future__ import annotations

import logging

from ray.tune.schedulers import AsyncHyperBandScheduler

log = logging.getLogger(__name__)


class ReplayingASHA(AsyncHyperBandScheduler):
    """ASHA whose rungs, on resume, hold what they held when the sweep stopped: each trial's results in its
    result.json are recorded as ASHA recorded them the first time (only the decisions still to make are made)."""

    def __init__(self, storage_uri: str, experiment: str, **options) -> None:
        super().__init__(**options)
        self.storage_uri, self.experiment = storage_uri, experiment

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for result in self._recorded(trial.trial_id):
            if self._time_attr in result and self._metric in result:
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])

    def _recorded(self, trial_id: str) -> list[dict]:
        """The results a trial reported before the sweep stopped ([] for a new trial)."""
        from .results import _result_lines
        from .storage import exists, open_storage, read_text

        storage = open_storage(self.storage_uri)
        path = storage.path(self.experiment, f"trial_{trial_id}", "result.json")
        try:
            return _result_lines(read_text(storage, path)) if exists(storage, path) else []
        except OSError as error:  # the scheduler then decides on what it sees from now on, as Tune's own would
            log.warning("cannot read %s to replay its results into ASHA: %s", path, error)
            return []
