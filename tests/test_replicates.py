"""Replicates, roles and the grid's effects: seeds that differ, summaries that count the runs that never formed, heads
matched by what they do, and effects whose intervals tell a real shift from the seeds' noise."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_causal import task_data, wired
from test_sweeps import TINY, trial_results

from model.causal import find_circuit
from model.config import ConfigError
from model.replicates import ONE_REPLICATE, Observation, axis_effects, formed_by, km_medians, summarise
from model.roles import head_roles, role_edges
from model.transformer import Transformer
from sweep.plan import LaunchConfig, plan_sweep

from conftest import sweep, write_reviews


def test_a_grid_point_where_half_never_formed_reports_the_kaplan_meier_median_not_the_formed_half():
    point = (("batch_size", 16),)
    formed = [Observation(point, 1e6), Observation(point, 2e6)]
    never = [Observation(point, None, end=8e6), Observation(point, None, end=8e6)]
    summary = summarise(formed + never, time=True)
    # the survival estimate reaches one half at 2M (3/4, then 3/4 x 2/3); the formed half alone would say 1.5M
    assert summary.estimate == 2e6 and summary.never == 2 and summary.trials == 4
    assert formed_by(formed + never) == [(1e6, 0.25), (2e6, 0.5)]
    # three of four never formed: there is no median, and the summary says why instead of dropping them
    mostly_never = summarise([Observation(point, 1e6), *never, Observation(point, None, end=8e6)], time=True)
    assert mostly_never.estimate is None and mostly_never.never == 3 and "never formed" in mostly_never.reason
    # nothing measured (trials that stopped before a first report): no curve, no median, no error
    assert formed_by([Observation(point, None)]) == [] and summarise([Observation(point, None)], time=True).trials == 0
    # a censored trial stays at risk at its own time: an event at 8M before the censoring counts
    assert km_medians(np.array([[8e6, 8e6]]), np.array([[False, True]]))[0] == 8e6


@pytest.fixture
def reviews(tmp_path) -> Path:
    path = tmp_path / "reviews.jsonl"
    write_reviews(path, count=600)
    return path


def _synthetic(shift: float, seeds: int = 6, seed: int = 0) -> list[Observation]:
    """Formation times over batch x context where batch moves them by `shift` and context does nothing."""
    rng = np.random.default_rng(seed)
    observations = []
    for batch in (16, 64):
        for context in (64, 96):
            for _ in range(seeds):
                value = 3e6 + (shift if batch == 64 else 0.0) + rng.normal(0, 2e5)
                observations.append(Observation((("batch_size", batch), ("seq_len", context)), value, end=8e6))
    return observations


def test_an_axis_that_shifts_formation_is_told_from_one_that_does_nothing():
    effects = {e.axis: e for e in axis_effects(_synthetic(shift=1e6), time=True)}
    batch, context = effects["batch_size"].differences[0], effects["seq_len"].differences[0]
    assert batch.low > 0 and abs(batch.estimate - 1e6) < 3e5  # the known shift, its interval clear of zero
    assert context.low < 0 < context.high  # no effect: the interval holds zero
    # with no shift at all neither axis shows one
    for effect in axis_effects(_synthetic(shift=0.0, seed=1), time=True):
        assert effect.differences[0].low < 0 < effect.differences[0].high


def test_one_seed_per_grid_point_gives_estimates_without_intervals_and_says_why():
    observations = [Observation((("layers", layers),), value, end=8e6) for layers, value in ((1, None), (2, 3e6))]
    effect = axis_effects(observations, time=True)[0]
    assert effect.summaries[1].estimate == 3e6 and effect.summaries[1].low is None
    assert effect.summaries[1].reason == ONE_REPLICATE and effect.differences[0].reason
    assert effect.summaries[0].estimate is None and effect.summaries[0].never == 1


def _permute_heads(model: Transformer, layer: int, order: list[int]) -> Transformer:
    """The same model with layer `layer`'s heads renumbered: head i becomes head order[i]."""
    block, cfg = model.blocks[layer].attn, model.cfg
    d_head, heads = cfg.d_model // cfg.n_heads, cfg.n_heads
    with torch.no_grad():
        qkv = block.qkv.weight.view(3, heads, d_head, cfg.d_model).clone()
        out = block.out.weight.view(cfg.d_model, heads, d_head).clone()
        for old, new in enumerate(order):
            block.qkv.weight.view(3, heads, d_head, cfg.d_model)[:, new] = qkv[:, old]
            block.out.weight.view(cfg.d_model, heads, d_head)[:, new] = out[:, old]
    return model


def test_heads_matched_by_role_give_the_same_role_edges_whatever_their_indices():
    original = find_circuit(wired(heads=2), task_data(), "induction")
    permuted_model = _permute_heads(_permute_heads(wired(heads=2), 0, [1, 0]), 1, [1, 0])
    permuted = find_circuit(permuted_model, task_data(), "induction")
    assert set(original.circuit) != set(permuted.circuit)  # by head index the two circuits share no head edge
    assert head_roles(original.circuit) == {"0.0": "previous_token", "1.0": "induction"}
    assert head_roles(permuted.circuit) == {"0.1": "previous_token", "1.1": "induction"}
    expected = {"embed -> previous_token.v", "previous_token -> induction.k", "embed -> induction.q",
                "embed -> induction.v", "induction -> logits"}
    assert set(role_edges(original.circuit)) == set(role_edges(permuted.circuit)) == expected


def test_roles_of_a_copying_head_and_of_a_head_off_the_induction_path():
    assert head_roles(["embed -> 0.1.v", "0.1 -> logits", "embed -> logits"]) == {"0.1": "copying"}
    roles = head_roles(["0.0 -> 1.2.k", "1.2 -> logits", "0.3 -> 1.2.q", "embed -> 1.1.v", "1.1 -> logits"])
    assert roles == {"0.0": "previous_token", "0.3": "other", "1.1": "copying", "1.2": "induction"}
    assert role_edges(["0.0 -> 1.2.k", "0.0 -> 1.1.k", "1.1 -> logits", "1.2 -> logits"]) == {
        "previous_token -> induction.k": 2, "induction -> logits": 2}


def test_seeds_and_num_samples_repeat_grid_points_with_distinct_seeds(tmp_path):
    for options in (["--seeds", "3"], ["--num-samples", "3"]):
        plan = plan_sweep(LaunchConfig(dataset="", preset="induction", storage=str(tmp_path), grid=("layers=2",),
                                       seeds=int(options[1]) if options[0] == "--seeds" else None,
                                       num_samples=int(options[1]) if options[0] == "--num-samples" else 1))
        assert plan.axes == {"seed": [0, 1, 2]} and plan.trial_count == 3 and plan.launch.num_samples == 1
    started = plan_sweep(LaunchConfig(dataset="", preset="induction", storage=str(tmp_path), seeds=2,
                                      grid=("seed=7",)))
    assert started.axes["seed"] == [7, 8]
    for wrong in (dict(seeds=2, num_samples=2), dict(seeds=2, search="random", grid=("lr=loguniform:1e-4:1e-2",)),
                  dict(seeds=2, grid=("seed=1,2",))):
        with pytest.raises(ConfigError):
            plan_sweep(LaunchConfig(dataset="", preset="induction", storage=str(tmp_path), **wrong))
    assert plan_sweep(LaunchConfig(dataset="", preset="formation", storage=str(tmp_path))).trial_count == 12


@pytest.mark.usefixtures("no_stray_ray", "shared_ray")
def test_num_samples_and_seeds_train_replicates_that_differ_and_record_their_seeds(reviews, tmp_path):
    storage = tmp_path / "results"
    for name, option in (("samples", "--num-samples"), ("seeds", "--seeds")):
        sweep("launch", reviews, *TINY, "--grid", "heads=2", "--grid", "lr=1e-3", option, "2", "--storage", storage,
              "--name", name)
        results = trial_results(storage, name)
        seeds = sorted(lines[-1]["config"]["seed"] for lines in results.values())
        losses = {lines[-1]["test_loss"] for lines in results.values()}
        assert seeds == [0, 1] and len(losses) == 2, (seeds, losses)
    best = json.loads(sweep("best", "seeds", "--storage", storage, "--top", "2", "--json").stdout)
    assert sorted(t["config"]["seed"] for t in best["trials"]) == [0, 1]
    effects = json.loads(sweep("effects", "seeds", "--storage", storage, "--reading", "test_loss", "--json").stdout)
    (point,) = effects["points"]
    assert sorted(point["seeds"]) == [0, 1] and effects["replicates"] == [2]
    # two seeds give an estimate but too few resamples for an interval, and say so
    assert point["summary"]["estimate"] is not None and point["summary"]["interval"] == [None, None]
    assert "fewer than 3 seeds" in point["summary"]["reason"]


def test_effects_of_an_experiment_without_seeds_read_one_replicate(induction_experiment, tmp_path):
    storage, name = induction_experiment
    document = json.loads(sweep("effects", name, "--storage", storage, "--json", "--figure",
                                tmp_path / "effects.png").stdout)
    assert document["replicates"] == [1] and document["note"] == ONE_REPLICATE
    (layers,) = document["effects"]
    one, two = layers["values"]
    assert one["value"] == 1 and one["estimate"] is None and one["never"] == 1  # censored, not dropped
    assert two["value"] == 2 and two["estimate"] > 0 and two["interval"] == [None, None]
    assert (tmp_path / "effects.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wrong = sweep("effects", name, "--storage", storage, "--reading", "nonsense", check=False)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1 and "readings:" in wrong.stderr


def test_an_axis_ranks_by_dependence_only_beyond_the_seeds_spread():
    from sweep.atlas import RANK_SCORES, Atlas

    spread = {axis: {f"{s}_max": value for s in RANK_SCORES} for axis, value in (("lr", 0.02), ("layers", 0.9))}
    atlas = Atlas("x", ["layers", "lr"], [], spread=spread)
    assert atlas.noise("lr") == "seeds' noise unknown: one seed a grid point"
    atlas.seed_spread = {f"{s}_max": 0.17 for s in RANK_SCORES}
    assert atlas.noise("lr").startswith("within the seeds' spread of 0.17: no clear dependence")
    assert atlas.noise("layers") == "beyond the seeds' spread of 0.17"


def test_a_role_edge_reading_takes_the_edge_however_spaced_and_refuses_one_no_circuit_holds():
    """`--reading appeared:ROLE-EDGE`: the edge's first appearance per grid point, censored where a circuit lacks
    it; the arrow's spacing does not matter; a misspelt role-edge is one clear error naming those held."""
    from sweep.atlas import Atlas, AtlasRow
    from sweep.effects import effects_document

    edge = "previous_token -> induction.k"

    def row(index: int, batch: int, appeared: int | None) -> AtlasRow:
        circuit = {"circuit": ["0.1 -> 1.0.k"], "role_edges": {edge: 1} if appeared else {"other -> logits": 1},
                   "role_appeared": {edge: appeared} if appeared else {}}
        return AtlasRow(f"t{index}", {"batch_size": batch, "seed": index % 3}, "TERMINATED", {}, {}, None, None,
                        circuit=circuit, last_tokens=8_000_000)

    rows = [row(i, 16, 2_000_000 + 250_000 * i) for i in range(3)]
    rows += [row(3, 64, 3_000_000), row(4, 64, 3_500_000), row(5, 64, None)]
    atlas = Atlas("x", ["batch_size", "seed"], rows)
    document = effects_document(atlas, {}, "appeared:previous_token->induction.k")
    assert document["reading"] == f"appeared:{edge}" and document["time"]
    small, large = document["points"]
    assert small["summary"]["estimate"] == 2_250_000 and small["role_edges"] == {edge: 1.0}
    assert large["summary"]["never"] == 1 and large["summary"]["estimate"] == 3_500_000  # censored, not dropped
    with pytest.raises(ConfigError, match="no trial's circuit holds the role-edge 'previous_token -> induction.q'; "
                                          "role-edges here: previous_token -> induction.k"):
        effects_document(atlas, {}, "appeared:previous_token -> induction.q")
    bare = Atlas("y", ["batch_size"], [AtlasRow("t", {"batch_size": 16}, "TERMINATED", {}, {}, None, None)])
    with pytest.raises(ConfigError, match=r"no trial has a causal circuit yet \(`sweep circuit y` finds them\)"):
        effects_document(bare, {}, f"appeared:{edge}")
