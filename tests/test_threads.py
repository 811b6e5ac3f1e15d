"""Idle CPUs at a sweep's tail: shared among the running trials only once no trial can still need them."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import ray.experimental.internal_kv as internal_kv
import torch

from sweep import threads
from sweep.threads import SpareThreads, adopt_threads, share_threads

from conftest import run_env, wait_for, write_reviews


def test_idle_cpus_are_shared_evenly_the_trial_most_behind_first():
    assert share_threads(["a"], 1, 2) == {"a": 2}
    assert share_threads(["a", "b"], 1, 2) == {"a": 1, "b": 1}  # nothing idle
    assert share_threads(["a", "b"], 1, 5) == {"a": 3, "b": 2}
    assert share_threads(["a", "b", "c"], 2, 4) == {"a": 2, "b": 2, "c": 2}  # already more than the node
    assert share_threads([], 1, 8) == {}


class FakeStore:
    def __init__(self, monkeypatch, nodes=1, free=3, outside=0.0):
        self.values: dict[bytes, str] = {}
        self.free, self.outside = free, outside
        monkeypatch.setattr(threads.OutsideLoad, "read", lambda _: self.outside)
        monkeypatch.setattr(internal_kv, "_internal_kv_initialized", lambda: True)
        monkeypatch.setattr(internal_kv, "_internal_kv_put",
                            lambda key, value, overwrite, namespace: self.values.__setitem__(key, value))
        monkeypatch.setattr(internal_kv, "_internal_kv_del", lambda key, namespace: self.values.pop(key))
        monkeypatch.setattr(internal_kv, "_internal_kv_get",
                            lambda key, namespace: self.values.get(key, "").encode() or None)
        monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True}] * nodes)
        monkeypatch.setattr("ray.available_resources", lambda: {"CPU": float(self.free)})

    def shares(self, experiment="exp"):
        return {key.decode().rsplit("/", 1)[1]: int(value) for key, value in self.values.items()
                if f"/{experiment}/" in key.decode()}


def trial(trial_id, status, iteration=0):
    return SimpleNamespace(trial_id=trial_id, status=status, last_result={"training_iteration": iteration})


def test_driver_shares_idle_cpus_only_when_no_trial_waits_and_takes_them_back(monkeypatch):
    store = FakeStore(monkeypatch, free=3)  # 5 CPUs; the two running trials hold one each
    lines = []
    spare = SpareThreads("exp", own_threads=1, trial_count=3, log_line=lines.append)
    # a trial still pending, or not yet made by Tune: nothing is shared
    spare._update([trial("a", "RUNNING"), trial("b", "RUNNING"), trial("c", "PENDING")])
    spare._update([trial("a", "RUNNING"), trial("b", "RUNNING")])
    assert store.shares() == {} and lines == []
    # every trial made, one finished: its CPU and the idle ones go to the two left, the one most behind first
    spare._update([trial("a", "RUNNING", 7), trial("b", "RUNNING", 3), trial("c", "TERMINATED", 10)])
    assert store.shares() == {"b": 3, "a": 2}
    assert lines == ["b trains with 3 threads from its next iteration (idle CPUs)",
                     "a trains with 2 threads from its next iteration (idle CPUs)"]
    # another job takes two of the free CPUs: the shares shrink to what is left
    store.free = 1
    spare._update([trial("a", "RUNNING", 8), trial("b", "RUNNING", 4), trial("c", "TERMINATED", 10)])
    assert store.shares() == {"b": 2, "a": 1}
    # Tune restarts a failed trial: every share goes back at once
    spare._update([trial("a", "RUNNING", 7), trial("b", "RUNNING", 4), trial("c", "PENDING")])
    assert store.shares() == {"a": 1, "b": 1}
    # finished trials' keys are removed
    spare._update([trial("a", "TERMINATED"), trial("b", "ERROR"), trial("c", "TERMINATED")])
    assert store.values == {}
    # a trial reads its share, never less than its own threads; without a share, its own
    store.values[threads.threads_key("exp", "a")] = "3"
    assert threads.granted_threads("exp", "a", 1) == 3 and threads.granted_threads("exp", "b", 1) == 1
    assert threads.granted_threads("exp", "a", 4) == 4


def test_cpus_free_in_ray_but_busy_outside_it_are_not_shared(monkeypatch):
    """Another user's job holds no Ray resource: what processes outside Ray keep busy is taken from the share, and
    it shrinks as the load comes (a 2-core machine beside a CPU hog gave one trial 2 threads at a quarter of its
    1-thread speed)."""
    store = FakeStore(monkeypatch, free=3, outside=2.9)
    spare = SpareThreads("exp", own_threads=1, trial_count=2)
    spare._update([trial("a", "RUNNING", 3), trial("b", "TERMINATED", 10)])
    assert store.shares() == {}  # its own thread only: nothing published
    store.outside = 0.8  # the load went away but for this driver and a little: two of Ray's three free CPUs
    spare._update([trial("a", "RUNNING", 4), trial("b", "TERMINATED", 10)])
    assert store.shares() == {"a": 3}
    store.outside = 3.0  # it came back: the share goes back at the next report
    spare._update([trial("a", "RUNNING", 5), trial("b", "TERMINATED", 10)])
    assert store.shares() == {"a": 1}


def test_the_load_outside_ray_is_measured_over_a_window():
    meter = threads.OutsideLoad()
    assert meter.read() is None  # no window yet
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:  # the busy loop's CPU shows within a window or two of measuring
        busy = wait_for(lambda: (meter.read() or 0.0) >= 0.5 and meter.busy, 3 * threads.MEASURE_MIN_S + 2,
                        "the busy loop measured as load")
    finally:
        hog.kill()
        hog.wait()
    assert busy is not None and 0.5 <= busy <= os.cpu_count() + 0.5  # the busy loop, one CPU (and the rest)


def test_nothing_is_shared_on_a_cluster_of_several_nodes(monkeypatch):
    store = FakeStore(monkeypatch, nodes=2, free=6)
    SpareThreads("exp", 1, 2)._update([trial("a", "RUNNING"), trial("b", "TERMINATED")])
    assert store.shares() == {}


def test_the_driver_callback_pickles_without_its_console():
    spare = SpareThreads("exp", 2, 5, log_line=print)
    import pickle

    restored = pickle.loads(pickle.dumps(spare))
    assert (restored.experiment, restored.own_threads, restored.trial_count, restored.log_line) == ("exp", 2, 5, None)


def test_a_trial_adopts_its_threads():
    before = torch.get_num_threads()
    try:
        adopt_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("no_stray_ray", "shared_ray")
def test_the_last_trial_of_a_sweep_trains_on_the_cpus_the_others_left(tmp_path):
    reviews = tmp_path / "reviews.jsonl"
    write_reviews(reviews, count=600)
    storage = tmp_path / "results"
    launched = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "launch", str(reviews), "--tokenizer", "bytes", "--grid", "d_model=16",
         "--grid", "seq_len=16", "--grid", "batch_size=16", "--grid", "lr=3e-3", "--grid", "heads=2",
         "--grid", "eval_every_tokens=16384", "--grid", "max_tokens=16384,655360", "--no-early-stopping",
         "--storage", str(storage), "--name", "tail"],
        env=run_env(), capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    results = {}
    for path in (storage / "tail").glob("trial_*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        results[lines[-1]["config"]["max_tokens"]] = lines
    long = results[655360]
    assert len(long) == 40 and "trains with" in launched.stdout + launched.stderr
    # its own thread at first (beside the short trial), the node's idle CPUs once the short trial ended
    assert long[-1]["threads"] > long[0]["threads"] and long[-1]["threads"] >= 2
