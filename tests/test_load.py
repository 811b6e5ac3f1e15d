"""Load: a 200-trial sweep on local Ray completes, the driver's memory stays bounded, results stay quick to read."""

import re
import time
from pathlib import Path

import pytest
import ray
from ray import tune

from sweep.plan import LaunchConfig, plan_sweep
from sweep.results import best_document, load_experiment
from sweep.runner import launch_sweep
from sweep.storage import open_storage

from conftest import write_reviews

TRIALS = 200
GROWTH_MB = 1.0
READS_PER_TRIAL = 1  # the manifest of the one checkpoint Tune keeps
EXPERIMENT_READS = 5  # sweep.json, Tune's state, the driver's record


class CountingFilesystem:
    """A filesystem that counts the calls made to it."""

    def __init__(self, filesystem) -> None:
        self.filesystem, self.counts = filesystem, {"get_file_info": 0, "open_input_stream": 0}

    def __getattr__(self, name):
        attribute = getattr(self.filesystem, name)
        if name not in self.counts:
            return attribute

        def counted(*args, **kwargs):
            self.counts[name] += 1
            return attribute(*args, **kwargs)

        return counted


class CountedStorage:
    @staticmethod
    def of(storage):
        import dataclasses

        return dataclasses.replace(storage, filesystem=CountingFilesystem(storage.filesystem))


def driver_rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


class RssAtTrials(tune.Callback):
    """The driver's resident memory when the 20th and the last trial complete."""

    def __init__(self) -> None:
        self.completed = 0
        self.rss: dict[int, float] = {}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed += 1
        if self.completed in (20, TRIALS):
            self.rss[self.completed] = driver_rss_mb()


@pytest.mark.slow
def test_200_trial_sweep(tmp_path):
    reviews = tmp_path / "reviews.jsonl"
    write_reviews(reviews, count=300)
    launch = LaunchConfig(
        dataset=str(reviews), preset="smoke", name="load", storage=str(tmp_path / "results"), num_samples=TRIALS,
        grid=("lr=3e-3", "heads=1", "d_model=8", "seq_len=8", "batch_size=4", "max_tokens=64", "eval_every_tokens=64"),
        data={"tokenizer": "bytes"},
    )
    rss = RssAtTrials()
    try:
        launch_sweep(plan_sweep(launch), [rss], log_line=lambda line: None)
    finally:
        ray.shutdown()
    storage = CountedStorage.of(open_storage(str(tmp_path / "results")))
    started = time.perf_counter()
    experiment = load_experiment(storage, "load")
    document = best_document(experiment, "test_loss", "min", 5)
    seconds = time.perf_counter() - started
    growth = (rss.rss[TRIALS] - rss.rss[20]) / (TRIALS - 20)
    print(f"\ndriver RSS at trial 20: {rss.rss.get(20):.0f} MB, at trial {TRIALS}: {rss.rss.get(TRIALS):.0f} MB "
          f"({growth:.2f} MB a trial); reading {len(experiment.trials)} trials for `sweep best` took {seconds:.1f} s, "
          f"{storage.filesystem.counts}")
    assert len(experiment.trials) == TRIALS and all(t.status == "TERMINATED" for t in experiment.trials)
    assert len(document["trials"]) == 5
    # bounded: the driver's memory may grow by at most GROWTH_MB a trial (Tune keeps a small record of each)
    assert growth < GROWTH_MB, rss.rss
    # quick to read: one recursive listing of the experiment, a few reads of the experiment's own files and one small
    # read a trial (its checkpoint's manifest); a trial's last result comes from Tune's state, never its result.json
    counts = storage.filesystem.counts
    assert counts["get_file_info"] <= 10, counts
    assert counts["open_input_stream"] <= READS_PER_TRIAL * TRIALS + EXPERIMENT_READS, counts
