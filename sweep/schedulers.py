"""The sweep's searcher and scheduler (grid, random or Optuna; ASHA, synchronous halving, HyperBand or FIFO), built
from its Plan, and made to survive `sweep resume`.

Tune pickles the scheduler with the Tuner at launch and unpickles that, empty, on restore: ASHA's rungs start
again with no result in them, and a resumed sweep would stop trials the
same sweep uninterrupted kept, or keep ones it stopped.
`ReplayingASHA` gives every restored trial's recorded results back to its rungs as it is added.
"""

from __future__ import annotations

import logging
import warnings

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, HyperBandScheduler
from ray.tune.schedulers.hyperband import _Bracket
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from .plan import Plan
from .results import _result_lines
from .storage import exists, open_storage, read_text

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
        storage = open_storage(self.storage_uri)
        path = storage.path(self.experiment, f"trial_{trial_id}", "result.json")
        try:
            return _result_lines(read_text(storage, path)) if exists(storage, path) else []
        except OSError as error:  # the scheduler then decides on what it sees from now on, as Tune's own would
            log.warning("cannot read %s to replay its results into ASHA: %s", path, error)
            return []


def make_search(plan: Plan):
    """The search algorithm and its space: every grid point (with seeded draws of the ranges), or Optuna's TPE."""
    if plan.launch.search == "optuna":
        grid = {key: tune.choice(values) for key, values in plan.axes.items()}
        search_alg = ConcurrencyLimiter(OptunaSearch(sampler=tpe_sampler(plan)), max_concurrent=plan.optuna_concurrency)
    else:
        # seeded: the same --grid seed draws the same random-search samples again
        grid = {key: tune.grid_search(values) for key, values in plan.axes.items()}
        search_alg = BasicVariantGenerator(
            max_concurrent=plan.launch.max_concurrent, random_state=plan.fixed.get("seed", 0)
        )
    return search_alg, {**plan.fixed, **grid, **{key: d.domain() for key, d in plan.distributions.items()}}


def tpe_sampler(plan: Plan):
    """Optuna's TPE, sized to the budget. TPE proposes from the results so far, so it runs a few trials
    at a time, and its random start-up is a quarter of the trials (at least one batch, at most Optuna's
    default of 10): with the default, a 16-trial search would be 10 random trials and 6 guided ones.
    Trials still running count as bad results (constant liar), so a batch is not 4 proposals of one point."""
    import optuna

    startup = min(10, max(plan.optuna_concurrency, plan.trial_count // 4))
    with warnings.catch_warnings():  # multivariate and constant_liar are marked experimental: not the user's concern
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=plan.fixed.get("seed", 0), n_startup_trials=startup, multivariate=True, constant_liar=True
        )


def make_scheduler(plan: Plan):
    """ASHA (asynchronous), synchronous halving or HyperBand (pausing trials at their rungs) or FIFO (every trial to
    its end).

    With grace tokens, ASHA and halving compare trials on tokens_seen: none before the
    grace tokens, then at rungs of grace x reduction factor^k tokens, so trials are
    judged at equal training, after a phase change the grace period leaves room for.
    Without, their first rung is --grace-period iterations.
    """
    launch = plan.launch
    if plan.scheduler == "halving":
        return synchronous_halving(
            plan.trial_count, plan.halving_rungs, launch.reduction_factor, plan.halving_time_attr
        )
    if plan.scheduler == "hyperband":
        return hyperband_saving_stopped_trials()(
            time_attr="training_iteration", max_t=plan.iterations, reduction_factor=launch.reduction_factor
        )
    if plan.scheduler == "fifo":
        return FIFOScheduler()
    where = {"storage_uri": plan.storage.uri, "experiment": plan.name}
    if plan.grace_tokens is not None:
        return ReplayingASHA(**where, time_attr="tokens_seen", max_t=plan.max_tokens_seen,
                             grace_period=plan.grace_tokens, reduction_factor=launch.reduction_factor)
    return ReplayingASHA(**where, time_attr="training_iteration", max_t=plan.iterations,
                         grace_period=launch.grace_period, reduction_factor=launch.reduction_factor)


def hyperband_saving_stopped_trials():
    """Tune's HyperBandScheduler, except that a paused trial it stops at a rung is saved as TERMINATED,
    and that a resumed sweep's finished trials stay out of its brackets.

    Tune stops such a trial (it has no actor) without marking its state to be written again, so the
    experiment state in storage kept it PAUSED: `sweep status` showed it paused and `sweep resume`
    would have trained it on.
    """
    class HyperBand(HyperBandScheduler):
        def on_trial_add(self, tune_controller, trial):
            # `sweep resume` adds the finished trials too; in a bracket they would count as live trials that
            # never reach its rung, and it would wait for them forever
            if trial.status != Trial.TERMINATED:
                super().on_trial_add(tune_controller, trial)

        def _process_bracket(self, tune_controller, bracket):
            paused = [trial for trial in bracket.current_trials() if trial.status == Trial.PAUSED]
            action = super()._process_bracket(tune_controller, bracket)
            for trial in paused:
                if trial.status == Trial.TERMINATED:
                    tune_controller._mark_trial_to_checkpoint(trial)
            return action

    return HyperBand


def synchronous_halving(
    trials: int, rungs: list[tuple[int, int]], reduction_factor: int, time_attr: str = "training_iteration"
):
    """Synchronous successive halving (Jamieson & Talwalkar 2016), built on Tune's HyperBandScheduler:
    one bracket holding every trial of the sweep, with the given rungs (iterations, or tokens_seen).

    Every trial trains to the first rung and pauses (its checkpoint is kept); when all have, the
    best ceil(n / rf) resume and train to the next rung, and so on up to the last. Tune's HyperBand
    would first fill its most cautious brackets, which train their trials to the end, and its own
    first rung, max_t / rf^s, rounds down to 0 or up past 1 unless max_t is a power of rf.
    """
    first_rung, max_t = rungs[0][0], rungs[-1][0]

    class SynchronousHalving(hyperband_saving_stopped_trials()):
        def _create_bracket(self, s):
            return _Bracket(time_attr=self._time_attr, max_trials=trials, init_t_attr=first_rung, max_t_attr=max_t,
                            eta=reduction_factor, s=len(rungs) - 1, stop_last_trials=self._stop_last_trials)

        def _process_bracket(self, tune_controller, bracket):
            # `sweep resume` gives a fresh bracket only the unfinished trials, the survivors of earlier
            # rungs, already past its first rungs: halve again until the next rung is ahead of them.
            # Otherwise every trial would pause at a rung already behind it, and the sweep would wait forever.
            action = super()._process_bracket(tune_controller, bracket)
            while (
                action == self.PAUSE and bracket.current_trials() and bracket.cur_iter_done() and not bracket.finished()
            ):
                action = super()._process_bracket(tune_controller, bracket)
            return action

    scheduler = SynchronousHalving(time_attr=time_attr, max_t=max_t, reduction_factor=reduction_factor)
    scheduler._get_n0 = lambda s: trials  # one bracket for the whole sweep
    scheduler._get_r0 = lambda s: first_rung  # never "too small"
    return scheduler
