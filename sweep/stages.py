"""`sweep stages`: developmental stages of every trial from its stored snapshots (Hoogland et al. 2024).

Two readings of when a model's structure changed, tied to the named circuits:
- the LLC curve over log tokens (`sweep analyse --what llc` fills the table), whose critical
  points (model.llc.stage_boundaries) bound the stages, each rising or falling;
- essential dynamics: the model's outputs on a fixed probe batch at every snapshot, PCA across
  the snapshots, and the trajectory's turning points (model.llc.essential_dynamics). Computed
  here as one Ray task per trial (it needs all of a trial's snapshots at once) and stored in the
  table as analysis `essential_dynamics` (ed_pc1..3 per snapshot, ed_turning_point).
Then each named circuit's formed_at (first snapshot past the label threshold) is placed in its stage.

torch, Ray and the LLC are imported inside the functions that compute: the atlas and the report read stages without
them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from model.config import ConfigError
from model.snapshots import SNAPSHOT_FILE, WEIGHTS_FILE, model_from_snapshot

from .analyse import Task, _probe_key, _run_config, write_part
from .records import Experiment, TrialRecord
from .storage import open_storage
from .table import done_keys, read_table, trial_formed_at

ED_VERSION = 3
ED_PROBE_WINDOWS = 16
# Stored LLC stage boundaries (analysis "llc_stages"): one unit per trial at its last LLC snapshot, so a
# trial whose LLC grew (a resumed trial, a backfill) gets its boundaries again at the new last snapshot.
STAGES_VERSION = 1
BOUNDARY_MEASURES = {"rising": "llc_stage_rising_until", "falling": "llc_stage_falling_until",
                     "plateau": "llc_stage_plateau_until"}


def load_snapshot_model(storage, path: str):
    """The model of one stored snapshot folder."""
    with storage.filesystem.open_input_stream(f"{path}/{SNAPSHOT_FILE}") as stream:
        record = json.loads(stream.read())
    with storage.filesystem.open_input_stream(f"{path}/{WEIGHTS_FILE}") as stream:
        weights = stream.read()
    return model_from_snapshot(record, weights)


def essential_dynamics_task(storage_uri: str, snapshot_paths: list[str], probe) -> dict[str, Any]:
    """A Ray task: one trial's snapshots -> its essential-dynamics trajectory and turning points."""
    import torch

    from model.llc import essential_dynamics, output_features

    torch.set_num_threads(1)
    storage = open_storage(storage_uri)
    windows = probe.held_out[:ED_PROBE_WINDOWS]
    features = [output_features(load_snapshot_model(storage, path), windows) for path in snapshot_paths]
    return essential_dynamics(features)


def calibrate_llc(experiment: Experiment, trial: TrialRecord, step: int | None = None) -> dict[str, Any]:
    """devinterp's calibration on one snapshot (default: the trial's last): the LLC for a grid of eps and
    gamma, each judged stable or not (model.llc.calibrate), with the settings `--what llc` uses now."""
    from model.llc import calibrate, largest_stable
    from model.measures import llc_problem, run_probe

    if not trial.snapshots:
        raise ConfigError(f"trial {trial.trial_id} has no snapshots to calibrate on")
    if step is None:
        snapshot = trial.snapshots[-1]
    else:
        matches = [s for s in trial.snapshots if s.step == step]
        if not matches:
            steps = ", ".join(str(s.step) for s in trial.snapshots)
            raise ConfigError(f"--step {step}: trial {trial.trial_id} has no snapshot there; its steps: {steps}")
        snapshot = matches[0]
    model = load_snapshot_model(experiment.storage, snapshot.path)
    loss, sample, samples_per_batch, config = llc_problem(run_probe(_run_config(trial)))
    rows = calibrate(model, loss, sample, samples_per_batch, config=config)
    pick = largest_stable(rows)
    return {"trial_id": trial.trial_id, "step": snapshot.step, "tokens_seen": snapshot.tokens_seen,
            "current": asdict(config) | {"n_beta": config.resolved_n_beta(samples_per_batch)}, "rows": rows,
            "largest_stable": pick}


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

    from .cluster import init_ray

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


def store_llc_stages(experiment: Experiment, table: pa.Table | None) -> int:
    """Write every trial's LLC stage boundaries into the analysis table where it lacks them at the trial's
    last LLC snapshot (one row per boundary: measure llc_stage_<kind>_until, value its tokens, plus
    llc_stages, the count); returns the trials written."""
    if table is None:
        return 0
    done = done_keys(table)
    results = []
    for document in trial_stages(experiment, table):
        trial = next(t for t in experiment.trials if t.trial_id == document["trial_id"])
        if len(document["llc"]) < 4:
            continue
        last = max((s for s in trial.snapshots if s.tokens_seen == document["llc"][-1]["tokens_seen"]),
                   key=lambda s: s.step, default=None)
        if last is None or (trial.trial_id, last.step, "llc_stages", STAGES_VERSION) in done:
            continue
        rows = [(-1, -1, BOUNDARY_MEASURES[b["kind"]], float(b["tokens"])) for b in document["llc_boundaries"]]
        rows.append((-1, -1, "llc_stages", float(document["stages"])))
        results.append((Task(trial, last, ("llc_stages",)), {"llc_stages": rows}))
    if results:
        description = ("critical points of the LLC over log tokens (model.llc.stage_boundaries): each row a stage's "
                       "last snapshot (value: tokens) by what the LLC did through it, and llc_stages, the count")
        write_part(experiment, results, {"llc_stages": {"version": STAGES_VERSION, "description": description}},
                   versions={"llc_stages": STAGES_VERSION})
    return len(results)


def trial_stages(experiment: Experiment, table: pa.Table | None) -> list[dict[str, Any]]:
    """Per trial: LLC at each snapshot, stage boundaries (LLC and essential dynamics), and where the named
    circuits fall."""
    from model.llc import stage_boundaries
    from model.measures import get_measure

    if table is None:
        return []
    formed = trial_formed_at(experiment, table)
    documents = []
    for trial in experiment.trials:
        mine = table.filter(pc.equal(table["trial"], trial.trial_id))
        llc = _series(mine, "llc", "llc", get_measure("llc").version)
        chains = _chain_ranges(mine, get_measure("llc").version)
        turning = _series(mine, "essential_dynamics", "ed_turning_point", ED_VERSION)
        components = [dict(_series(mine, "essential_dynamics", f"ed_pc{k}", ED_VERSION)) for k in (1, 2, 3)]
        trajectory = [{"tokens_seen": t, "pc": [c.get(t) for c in components]} for t in sorted(components[0])]
        boundaries = stage_boundaries([t for t, _ in llc], [v for _, v in llc])
        mine_formed = formed.get(trial.trial_id) or {}
        circuits = {name: tokens for name, tokens in mine_formed.items() if name.endswith("_at") and tokens is not None}
        ends = [b["tokens"] for b in boundaries]
        documents.append(
            {
                "trial_id": trial.trial_id,
                "config": trial.config,
                "llc": [{"tokens_seen": t, "llc": v, "chains": chains.get(t)} for t, v in llc],
                "llc_boundaries": boundaries,
                "essential_dynamics_turning_points": [t for t, _ in turning],
                "essential_dynamics": trajectory,
                "circuits": {
                    name: {"tokens_seen": tokens, "stage": sum(1 for end in ends if end < tokens) + 1,
                           "by": mine_formed[name.replace("_at", "_by")]}
                    for name, tokens in circuits.items()
                },
                "stages": len(boundaries) + 1 if llc else 0,
            }
        )
    return documents


def _chain_ranges(table: pa.Table, version: int) -> dict[int, list[float]]:
    """tokens_seen -> [lowest, highest] of the SGLD chains' LLC estimates at that snapshot (diverged chains aside)."""
    rows = table.filter(pc.and_(pc.and_(pc.equal(table["analysis"], "llc"), pc.equal(table["measure"], "llc_chain")),
                                pc.equal(table["version"], version)))
    found: dict[int, list[float]] = {}
    for tokens, value in zip(rows["tokens_seen"].to_pylist(), rows["value"].to_pylist()):
        if value is not None and math.isfinite(value):
            found.setdefault(tokens, []).append(value)
    return {tokens: [min(values), max(values)] for tokens, values in found.items()}


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
