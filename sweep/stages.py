"""`sweep stages`: developmental stages of every trial from its stored snapshots (Hoogland et al. 2024).

Two readings of when a model's structure changed, tied to the named circuits:
- the LLC curve over log tokens (`sweep analyse --what llc` fills the table), whose critical
  points (model.llc.stage_boundaries) bound the stages, each rising or falling;
- essential dynamics: the model's outputs on a fixed probe batch at every snapshot, PCA across
  the snapshots, and the trajectory's turning points (model.llc.essential_dynamics). Computed
  here as one Ray task per trial (it needs all of a trial's snapshots at once) and stored in the
  table as analysis `essential_dynamics` (ed_pc1..3 per snapshot, ed_turning_point).
Then each named circuit's formed_at (first snapshot past the label threshold) is placed in its stage.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from .analyse import Task, formed_at, read_table, write_part
from .results import Experiment, TrialRecord

ED_VERSION = 2
ED_PROBE_WINDOWS = 16


def essential_dynamics_task(storage_uri: str, snapshot_paths: list[str], probe) -> dict[str, Any]:
    """A Ray task: one trial's snapshots -> its essential-dynamics trajectory and turning points."""
    import torch

    from model.llc import essential_dynamics, output_features
    from model.snapshots import SNAPSHOT_FILE, WEIGHTS_FILE, model_from_snapshot

    from .storage import open_storage

    torch.set_num_threads(1)
    storage = open_storage(storage_uri)
    windows = probe.held_out[:ED_PROBE_WINDOWS]
    features = []
    for path in snapshot_paths:
        with storage.filesystem.open_input_stream(f"{path}/{SNAPSHOT_FILE}") as stream:
            record = json.loads(stream.read())
        with storage.filesystem.open_input_stream(f"{path}/{WEIGHTS_FILE}") as stream:
            weights = stream.read()
        features.append(output_features(model_from_snapshot(record, weights), windows))
    return essential_dynamics(features)


def ensure_essential_dynamics(
    experiment: Experiment,
    trials: list[TrialRecord],
    address: str | None,
    verbose: bool = False,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> int:
    """Compute essential dynamics for the trials the table lacks it for (or whose snapshots grew); returns how many."""
    import ray

    from model.measures import run_probe

    from .analyse import _probe_key, _run_config
    from .runner import init_ray

    table = read_table(experiment, ["trial", "step", "analysis", "version"])
    done: dict[str, int] = {}
    if table is not None:
        rows = table.filter(
            pc.and_(pc.equal(table["analysis"], "essential_dynamics"), pc.equal(table["version"], ED_VERSION))
        )
        for entry in rows.group_by("trial").aggregate([("step", "count_distinct")]).to_pylist():
            done[entry["trial"]] = entry["step_count_distinct"]
    missing = [t for t in trials if len(t.snapshots) >= 4 and done.get(t.trial_id, 0) < len(t.snapshots)]
    if not missing:
        return 0
    init_ray(address, verbose)
    probes: dict[str, Any] = {}
    remote = ray.remote(num_cpus=1, max_retries=2)(essential_dynamics_task)
    pending = {}
    for trial in missing:
        key = _probe_key(trial)
        if key not in probes:
            probes[key] = ray.put(run_probe(_run_config(trial)))
        pending[remote.remote(experiment.storage.uri, [s.path for s in trial.snapshots], probes[key])] = trial
    finished = []
    on_progress(0, len(pending))
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        trial = pending.pop(ready[0])
        result = ray.get(ready[0])
        turning = set(result["turning_points"])
        for snapshot, point in zip(trial.snapshots, result["trajectory"]):
            rows = [(-1, -1, f"ed_pc{k + 1}", float(value)) for k, value in enumerate(point)]
            rows += [(-1, -1, "ed_turning_point", 1.0)] if trial.snapshots.index(snapshot) in turning else []
            finished.append((Task(trial, snapshot, ("essential_dynamics",)), {"essential_dynamics": rows}))
        on_progress(len(missing) - len(pending), len(missing))
    write_part(
        experiment,
        finished,
        {
            "essential_dynamics": {
                "version": ED_VERSION,
                "description": "PCA of the log-probs on 16 held-out windows across a trial's snapshots "
                "(Hoogland et al. 2024)",
            }
        },
        versions={"essential_dynamics": ED_VERSION},
    )
    return len(missing)


def trial_stages(experiment: Experiment, table: pa.Table | None) -> list[dict[str, Any]]:
    """Per trial: LLC at each snapshot, stage boundaries (LLC and essential dynamics), and where the named
    circuits fall."""
    from model.llc import stage_boundaries
    from model.measures import MEASURES
    from model.metrics import INDUCTION_THRESHOLD, PREVIOUS_TOKEN_THRESHOLD

    if table is None:
        return []
    formed = formed_at(table, {"induction": INDUCTION_THRESHOLD, "previous_token": PREVIOUS_TOKEN_THRESHOLD})
    documents = []
    for trial in experiment.trials:
        mine = table.filter(pc.equal(table["trial"], trial.trial_id))
        llc = _series(mine, "llc", "llc", MEASURES["llc"].version)
        turning = _series(mine, "essential_dynamics", "ed_turning_point", ED_VERSION)
        boundaries = stage_boundaries([t for t, _ in llc], [v for _, v in llc])
        circuits = {name: tokens for name, tokens in (formed.get(trial.trial_id) or {}).items() if tokens is not None}
        ends = [b["tokens"] for b in boundaries]
        documents.append(
            {
                "trial_id": trial.trial_id,
                "config": trial.config,
                "llc": [{"tokens_seen": t, "llc": v} for t, v in llc],
                "llc_boundaries": boundaries,
                "essential_dynamics_turning_points": [t for t, _ in turning],
                "circuits": {
                    name: {"tokens_seen": tokens, "stage": sum(1 for end in ends if end < tokens) + 1}
                    for name, tokens in circuits.items()
                },
                "stages": len(boundaries) + 1 if llc else 0,
            }
        )
    return documents


def _series(table: pa.Table, analysis: str, measure: str, version: int) -> list[tuple[int, float]]:
    """(tokens_seen, value) of one measure at its current version, by tokens."""
    rows = table.filter(
        pc.and_(
            pc.and_(pc.equal(table["analysis"], analysis), pc.equal(table["measure"], measure)),
            pc.equal(table["version"], version),
        )
    )
    values = {}
    for tokens, value in zip(rows["tokens_seen"].to_pylist(), rows["value"].to_pylist()):
        if value is not None and math.isfinite(value):
            values[tokens] = value
    return sorted(values.items())
