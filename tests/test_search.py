"""Search beyond a grid: ranges, random and Optuna search, synchronous HyperBand, and early stopping
that leaves room for a phase change."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_sweeps import TINY, sweep, trial_results

from model.edges import edge_kind
from sweep.cli import main
from sweep.plan import LaunchConfig, plan_sweep
from sweep.schedulers import make_scheduler

from conftest import run_env, write_reviews
from waits import wait_for


@pytest.fixture
def reviews(tmp_path) -> Path:
    path = tmp_path / "reviews.jsonl"
    write_reviews(path, count=600)
    return path


@pytest.mark.parametrize(
    "grid, extra, message",
    [
        ("lr=loguniform:1e-2:1e-5", [], "--grid lr=loguniform:1e-2:1e-5: LOW must be below HIGH"),
        ("lr=loguniform:0:1", [], "loguniform needs LOW > 0"),
        ("lr=loguniform:1e-5", [], "use loguniform:LOW:HIGH"),
        ("lr=uniform:a:b", [], "LOW and HIGH must be numbers"),
        ("heads=uniform:1:8", [], "heads takes integers; use randint:A:B or choice:a,b"),
        ("lr=randint:1:3", [], "randint is for integer keys"),
        ("seq_len=randint:16:64", [], "seq_len takes a list or choice:a,b"),
        ("lr=normal:0:1", [], "unknown range 'normal'"),
        ("heads=choice:2,x", [], "every choice must be an integer"),
        ("lr=loguniform:1e-5:1e-2", [], "is a range to sample: add --search random or --search optuna"),
        (
            "heads=choice:3,4",
            ["--search", "random", "--grid", "d_model=64"],
            "--grid heads=3 does not divide --grid d_model=64",
        ),
        ("batch_size=randint:0:4", ["--search", "random"], "--grid batch_size=0 must be positive"),
        ("lr=1e-3", ["--scheduler", "hyperband", "--no-early-stopping"], "contradicts --no-early-stopping"),
        ("lr=1e-3", ["--grace-tokens", "999999999"], "--grace-tokens 999,999,999 is not below"),
        (
            "lr=1e-3",
            ["--scheduler", "hyperband", "--grace-tokens", "1000"],
            "--grace-tokens applies to --scheduler asha or halving",
        ),
        (
            "lr=1e-3",
            ["--scheduler", "halving", "--grace-tokens", "999999999"],
            "--grace-tokens 999,999,999 is not below",
        ),
        ("lr=1e-3", ["--scheduler", "halving", "--max-concurrent", "2"], "all must exist from the start"),
    ],
)
def test_bad_ranges_and_schedules_are_one_line(grid, extra, message, tmp_path, data_mirror):
    storage = tmp_path / "results"
    result = CliRunner().invoke(main, ["launch", "imdb", "--grid", grid, *extra, "--storage", str(storage)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not storage.exists()


def test_optuna_is_an_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    result = CliRunner().invoke(
        main,
        ["launch", "repeat", "--search", "optuna", "--grid", "lr=loguniform:1e-4:1e-2", "--storage", str(tmp_path)],
    )
    assert result.exit_code == 2 and "pip install 'circuit-sweep[optuna]'" in result.stderr


def test_the_plan_records_the_space_and_resume_reads_it_back(tmp_path):
    from sweep.plan import load_plan
    from sweep.storage import write_text

    plan = plan_sweep(
        LaunchConfig(
            dataset="repeat",
            preset="smoke",
            storage=str(tmp_path),
            name="ranges",
            search="random",
            num_samples=5,
            grid=("lr=loguniform:1e-4:1e-2", "heads=choice:2,4", "batch_size=randint:16:32"),
        )
    )
    record = plan.record()
    # as typed (messages echo it too); it parses back to the same values
    assert record["space"] == {"lr": "loguniform:1e-4:1e-2", "heads": "choice:2,4", "batch_size": "randint:16:32"}
    assert record["trials"] == 5 and "lr" not in record["fixed"] and record["search"] == "random"
    write_text(plan.storage, plan.storage.path("ranges", "sweep.json"), json.dumps(record))
    again = load_plan("ranges", str(tmp_path))
    assert {k: d.text for k, d in again.distributions.items()} == record["space"] and again.trial_count == 5
    assert again.distributions["lr"].values == (1e-4, 1e-2) and again.distributions == plan.distributions


def test_grace_tokens_make_asha_compare_on_tokens(tmp_path):
    plan = plan_sweep(LaunchConfig(dataset="", preset="induction", storage=str(tmp_path), early_stopping=True))
    scheduler = make_scheduler(plan)
    milestones = sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs)  # where ASHA compares trials
    assert plan.grace_tokens == 6_000_000 and scheduler._time_attr == "tokens_seen" and milestones[0] == 6_000_000
    assert plan_sweep(LaunchConfig(dataset="", preset="induction", storage=str(tmp_path))).scheduler == "fifo"
    assert (
        plan_sweep(
            LaunchConfig(dataset="repeat", preset="smoke", storage=str(tmp_path), metric="icl_score")
        ).launch.mode
        == "min"
    )


@pytest.mark.usefixtures("no_stray_ray", "shared_ray")
def test_random_search_samples_the_ranges(reviews, tmp_path):
    sweep(
        "launch",
        reviews,
        *TINY,
        "--grid",
        "lr=loguniform:1e-4:1e-2",
        "--grid",
        "heads=2",
        "--search",
        "random",
        "--num-samples",
        "3",
        "--storage",
        tmp_path / "results",
        "--name",
        "random",
    )
    results = trial_results(tmp_path / "results", "random")
    rates = [lines[0]["config"]["lr"] for lines in results.values()]
    assert len(rates) == 3 and len(set(rates)) == 3 and all(1e-4 <= r <= 1e-2 for r in rates)
    atlas = json.loads(sweep("atlas", "random", "--storage", tmp_path / "results", "--json").stdout)
    assert "lr" in atlas["axes"]  # a sampled range is an axis of the grid view


@pytest.mark.usefixtures("no_stray_ray")
def test_optuna_search_runs_and_resume_keeps_its_state(reviews, tmp_path):
    """Interrupted after its first trial, the search resumes with its own state: no trial repeats another's
    config (a fresh TPE sampler, seeded alike, would propose the first trial's again) and the sweep ends with
    exactly --num-samples trials."""
    storage = tmp_path / "results"
    process = subprocess.Popen(
        [sys.executable, "-m", "sweep.cli", "launch", str(reviews), *TINY, "--grid", "lr=loguniform:1e-4:1e-2",
         "--grid", "heads=choice:1,2", "--search", "optuna", "--num-samples", "3", "--max-concurrent", "1",
         "--storage", str(storage), "--name", "tpe"],
        env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )

    def finished() -> int:
        folders = list((storage / "tpe").glob("trial_*/result.json"))
        return sum(1 for f in folders if any('"done": true' in line for line in f.read_text().splitlines()))

    try:
        wait_for(lambda: finished() >= 1, 240, "a finished trial", alive=process, interval=0.2)
        os.kill(process.pid, signal.SIGINT)
        process.communicate(timeout=120)
    finally:
        process.kill()
    before = {name: lines[0]["config"] for name, lines in trial_results(storage, "tpe").items() if lines}
    assert 1 <= finished() < 3, before  # interrupted with the search unfinished
    sweep("resume", "tpe", "--storage", storage, timeout=400)
    results = trial_results(storage, "tpe")
    # ASHA lets the best one finish (an iteration reported before the interruption and again after it, from the
    # checkpoint before, counts once)
    assert len(results) == 3 and max(len({line["training_iteration"] for line in lines})
                                     for lines in results.values()) == 4
    configs = [(lines[0]["config"]["lr"], lines[0]["config"]["heads"]) for lines in results.values()]
    assert len(set(configs)) == 3, configs
    assert all(results[name][0]["config"] == config for name, config in before.items())
    assert all(
        1e-4 <= lines[0]["config"]["lr"] <= 1e-2 and lines[0]["config"]["heads"] in (1, 2) for lines in results.values()
    )
    state = list((tmp_path / "results" / "tpe").glob("searcher-state-*.pkl"))
    assert state, "Tune keeps the searcher's state beside the experiment for resume"


def trial_statuses(storage: Path, name: str) -> list[str]:
    from sweep.results import load_experiment
    from sweep.storage import open_storage

    return sorted(trial.status for trial in load_experiment(open_storage(str(storage)), name).trials)


@pytest.mark.usefixtures("no_stray_ray", "shared_ray")
def test_synchronous_halving_pauses_and_resumes_trials_without_losing_or_repeating_tokens(reviews, tmp_path):
    sweep("launch", reviews, *TINY, "--grid", "lr=3e-3,1e-3,3e-4,1e-6", "--grid", "heads=2", "--scheduler", "halving",
          "--reduction-factor", "2", "--cpus-per-trial", "1", "--storage", tmp_path / "results", "--name", "hb")
    results = trial_results(tmp_path / "results", "hb")
    per_iteration = 2048  # eval_every_tokens of TINY, a whole number of steps
    restored = 0
    for lines in results.values():
        tokens = [line["tokens_seen"] for line in lines]
        assert tokens == [per_iteration * (i + 1) for i in range(len(tokens))], tokens  # no gap, no repeat
        restored += any(line["iterations_since_restore"] < line["training_iteration"] for line in lines)
    assert restored >= 1, "no trial was paused and resumed from its checkpoint"
    # 4 trials, 4 iterations, halving by 2: all train 1 iteration, 2 go on to 2, 1 to 4
    assert sorted(len(lines) for lines in results.values()) == [1, 1, 2, 4]
    best = max(results.values(), key=len)
    assert best[0]["config"]["lr"] != 1e-6
    assert trial_statuses(tmp_path / "results", "hb") == [
        "STOPPED_EARLY",
        "STOPPED_EARLY",
        "STOPPED_EARLY",
        "TERMINATED",
    ]


@pytest.mark.usefixtures("no_stray_ray", "shared_ray")
def test_synchronous_halving_with_grace_tokens_compares_no_trial_before_them(reviews, tmp_path):
    sweep(
        "launch",
        reviews,
        *TINY,
        "--grid",
        "lr=3e-3,1e-3,3e-4,1e-6",
        "--grid",
        "heads=2",
        "--scheduler",
        "halving",
        "--reduction-factor",
        "2",
        "--grace-tokens",
        "4096",
        "--cpus-per-trial",
        "1",
        "--storage",
        tmp_path / "results",
        "--name",
        "hbg",
    )
    results = trial_results(tmp_path / "results", "hbg")
    # rungs at 4096 and 8192 tokens (2 and 4 iterations of 2048): all train to 4096, the best 2 go on to the end;
    # without grace tokens the same grid stops two trials after 1 iteration (the test above)
    assert sorted(lines[-1]["tokens_seen"] for lines in results.values()) == [4096, 4096, 8192, 8192]
    assert all(line["tokens_seen"] == 2048 * (i + 1) for lines in results.values() for i, line in enumerate(lines))
    finished = [lines for lines in results.values() if lines[-1]["tokens_seen"] == 8192]
    assert all(lines[0]["config"]["lr"] != 1e-6 for lines in finished)
    # a trial stopped while paused at a rung is saved as stopped, not left paused for `sweep resume` to train on
    assert trial_statuses(tmp_path / "results", "hbg") == ["STOPPED_EARLY", "STOPPED_EARLY", "TERMINATED", "TERMINATED"]


@pytest.mark.usefixtures("no_stray_ray")
def test_an_interrupted_halving_sweep_resumes_past_the_rungs_its_survivors_already_passed(reviews, tmp_path):
    """Resume gives the scheduler a fresh bracket holding the finished trials and the survivor, which is
    past several rungs already: it used to wait forever, for finished trials and for a rung behind it."""
    storage = tmp_path / "results"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sweep.cli",
            "launch",
            str(reviews),
            *TINY,
            "--grid",
            "max_tokens=65536",
            "--grid",
            "lr=3e-3,1e-3,3e-4,1e-6",
            "--grid",
            "heads=2",
            "--scheduler",
            "halving",
            "--cpus-per-trial",
            "1",
            "--storage",
            str(storage),
            "--name",
            "hbr",
        ],
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    def past_five_iterations() -> bool:  # read from result.json: checkpoints are rotated within a fraction of a second
        for result in storage.glob("hbr/trial_*/result.json"):
            for line in result.read_text().splitlines():
                try:
                    if json.loads(line)["training_iteration"] >= 5:
                        return True
                except ValueError:  # a line being written
                    pass
        return False

    try:  # killed once the last survivor is past the rungs at 1, 2 and 4 iterations
        wait_for(past_five_iterations, 180, "the survivor past five iterations", alive=process, interval=0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    sweep("resume", "hbr", "--storage", storage, timeout=300)
    assert trial_statuses(storage, "hbr") == ["STOPPED_EARLY", "STOPPED_EARLY", "STOPPED_EARLY", "TERMINATED"]
    survivor = max(trial_results(storage, "hbr").values(), key=len)
    assert survivor[-1]["training_iteration"] == 32 and survivor[-1]["tokens_seen"] == 65536


@pytest.mark.usefixtures("no_stray_ray", "shared_ray")
def test_grace_tokens_keep_every_trial_until_then(reviews, tmp_path):
    sweep(
        "launch",
        reviews,
        *TINY,
        "--grid",
        "lr=3e-3,1e-6",
        "--grid",
        "heads=2",
        "--max-concurrent",
        "1",
        "--grace-tokens",
        "6144",
        "--storage",
        tmp_path / "results",
        "--name",
        "grace",
    )
    results = trial_results(tmp_path / "results", "grace")
    # without grace tokens the 1e-6 trial stops after its first iteration (test_sweeps); here it trains to 6144 tokens
    # first
    assert sorted(lines[-1]["tokens_seen"] for lines in results.values()) == [6144, 8192]


def both_kept_to_the_grace_tokens(results: dict[str, list[dict]]) -> None:
    """The 2-layer trial trains to the end and forms induction heads; the 1-layer one reaches the 6M grace tokens."""
    by_layers = {lines[0]["config"]["layers"]: lines for lines in results.values()}
    assert len(by_layers[2]) == 12 and by_layers[2][-1]["induction_formed_at"] is not None
    assert by_layers[2][-1]["induction_score_max"] > 0.4
    assert by_layers[1][-1]["tokens_seen"] >= 6_000_000


@pytest.mark.slow
@pytest.mark.usefixtures("no_stray_ray", "shared_ray")
def test_synchronous_halving_on_the_induction_preset_keeps_the_model_that_forms_induction_heads(tmp_path):
    """Halving waits for both trials at the 6M grace tokens and keeps the better: by then the 2-layer model's
    induction heads have formed (3-4M) and its loss has left the 1-layer one's behind. Without grace tokens it
    stopped the 2-layer trial after its first iteration, before the phase change."""
    sweep("launch", "--preset", "induction", "--scheduler", "halving", "--storage", tmp_path / "results", "--name",
          "ind", timeout=900)
    both_kept_to_the_grace_tokens(trial_results(tmp_path / "results", "ind"))


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_the_induction_preset_with_early_stopping_keeps_the_model_that_forms_induction_heads(
    induction_experiment, tmp_path
):
    """Early stopping on test_loss (ASHA), but nothing compared before the preset's 6M grace tokens: ASHA is
    asynchronous, the faster 1-layer trial reaches the 6M rung first, alone, and goes on; the 2-layer trial forms
    its induction heads. Then storage alone, in new processes, answers when, where, and what circuit."""
    storage, name = induction_experiment
    results = trial_results(storage, name)
    both_kept_to_the_grace_tokens(results)
    # Storage alone, in new processes, answers when the induction heads formed, where, and the phase change.
    best = json.loads(sweep("best", name, "--storage", storage, "--metric", "induction_score_max", "--json").stdout)[
        "trials"
    ][0]
    assert best["config"]["layers"] == 2 and 1_000_000 <= best["metrics"]["induction_formed_at"] <= 6_000_000
    atlas = json.loads(sweep("atlas", name, "--storage", storage, "--json").stdout)
    assert atlas["axes"][0] == "layers"
    induction_heads = {group["value"]: group["induction_heads"]["mean"] for group in atlas["groups"]["layers"]}
    assert induction_heads[1] == 0 and induction_heads[2] >= 1
    history = json.loads(
        sweep("heads", name, "--storage", storage, "--trial", best["trial_id"], "--history", "--json").stdout
    )["history"]
    # formed_at is read at every snapshot while training: the iteration that holds it is where the in-context
    # learning score falls, and the snapshot itself shows an induction head
    formed_while_training = best["metrics"]["induction_formed_at"]
    formed = next(i for i, row in enumerate(history) if row["tokens_seen"] >= formed_while_training)
    assert formed >= 1 and history[formed]["icl_score"] < history[formed - 1]["icl_score"] - 0.1, history
    at_formed = json.loads(sweep("heads", name, "--storage", storage, "--trial", best["trial_id"], "--tokens-seen",
                                 str(formed_while_training), "--json").stdout)
    assert any("induction" in head["labels"] for head in at_formed["heads"]), at_formed["heads"]

    # Scoring every snapshot afterwards changes no reader's formed_at: one reading, whatever ran since.
    analysed = sweep("analyse", name, "--storage", storage, timeout=600)
    assert "measured" in analysed.stderr
    atlas = json.loads(sweep("atlas", name, "--storage", storage, "--json").stdout)
    assert atlas["formed_at_resolution"] == "snapshots"
    formed_at = {row["trial_id"]: row["induction_formed_at"] for row in atlas["trials"]}
    assert formed_at[best["trial_id"]] == formed_while_training, (formed_at, formed_while_training)
    # the 1-layer trial never forms induction heads
    assert [value for trial, value in formed_at.items() if trial != best["trial_id"]] == [None]
    import pyarrow.dataset as ds

    table = ds.dataset(str(storage / name / "analysis")).to_table().to_pandas()
    scores = table[(table.trial == best["trial_id"]) & (table.measure == "induction")]
    induction = scores.groupby("tokens_seen").value.max()
    jump = induction.diff().idxmax()  # the snapshot after the steepest rise of the best induction head
    tokens = list(induction.index)
    assert abs(tokens.index(jump) - tokens.index(formed_at[best["trial_id"]])) <= 1, induction.to_dict()
    formed = formed_at[best["trial_id"]]
    assert induction.loc[:formed].iloc[:-1].max() <= 0.4 < induction.loc[formed]

    # Developmental stages: the LLC at every snapshot has a stage boundary at the induction phase change of the
    # 2-layer trial (within one snapshot of its formed_at) and none there for the 1-layer trial.
    # (stages computes the LLC it needs at every snapshot first, as `sweep analyse --what llc` would)
    listed = json.loads(sweep("stages", name, "--storage", storage, "--json", timeout=900).stdout)["trials"]
    stages = {t["trial_id"]: t for t in listed}
    two = stages[best["trial_id"]]
    snapshot_tokens = [row["tokens_seen"] for row in two["llc"]]
    formed_index = snapshot_tokens.index(formed_at[best["trial_id"]])
    boundaries = two["llc_boundaries"]
    assert any(abs(snapshot_tokens.index(b["tokens"]) - formed_index) <= 1 for b in boundaries), boundaries
    assert two["circuits"]["induction_formed_at"]["tokens_seen"] == formed_at[best["trial_id"]]
    (one,) = [t for trial, t in stages.items() if trial != best["trial_id"]]
    near = [b for b in one["llc_boundaries"] if abs(b["tokens"] - formed_at[best["trial_id"]]) <= 2 * 401_408]
    assert not near, one["llc_boundaries"]
    # the boundaries are kept in the analysis table, the atlas groups them by axis, the report draws them
    table = ds.dataset(str(storage / name / "analysis")).to_table().to_pandas()
    stored = table[(table.analysis == "llc_stages") & (table.trial == best["trial_id"])]
    kept = sorted(int(v) for v in stored[stored.measure.str.startswith("llc_stage_")].value)
    assert kept == sorted(b["tokens"] for b in boundaries)
    atlas = json.loads(sweep("atlas", name, "--storage", storage, "--json").stdout)
    by_layers = {group["value"]: group for group in atlas["groups"]["layers"]}
    assert by_layers[2]["stages"]["mean"] == two["stages"] and by_layers[2]["stage_boundaries"] == kept

    # Causal circuits from storage alone (every edge patched at every snapshot): the 2-layer trial's final circuit
    # holds a previous-token head's K-composition into an induction head, recovers at least 90% of the
    # clean-to-corrupted difference, and that edge appeared within one snapshot of induction_formed_at; the
    # 1-layer trial's circuit is direct paths only (embedding -> head -> logits).
    circuits = json.loads(sweep("circuit", name, "--storage", storage, "--json", timeout=900).stdout)
    by_trial = {t["trial_id"]: t for t in circuits["trials"]}
    heads = json.loads(sweep("heads", name, "--storage", storage, "--trial", best["trial_id"], "--json").stdout)
    labels = {f"{h['layer']}.{h['head']}": h["labels"] for h in heads["heads"]}
    two_circuit = by_trial[best["trial_id"]]
    assert two_circuit["induction_formed_at"] == formed_while_training  # the one formed_at, in the circuit's JSON too

    def sender_receiver(edge: str) -> tuple[str, str]:
        sender, receiver = edge.split(" -> ")
        return sender, receiver.rsplit(".", 1)[0]

    k_edges = [c for c in two_circuit["circuit"] if c["kind"] == "head -> k"
               and "previous_token" in labels[sender_receiver(c["edge"])[0]]
               and "induction" in labels[sender_receiver(c["edge"])[1]]]
    assert k_edges and two_circuit["faithfulness"] >= 0.9, (two_circuit["circuit"], labels)
    tokens = [s["tokens_seen"] for s in two_circuit["snapshots"]]
    formed_index = tokens.index(formed_at[best["trial_id"]])
    assert any(abs(tokens.index(c["appeared"]["tokens_seen"]) - formed_index) <= 1 for c in k_edges), k_edges
    # The 2-layer trial does the task from the snapshot its induction heads formed at (within one), never before;
    # its circuit is robust across the panel, and EAP-IG's integral over the embedding's edges comes within 5% of
    # the difference it estimates.
    doing = [s["tokens_seen"] for s in two_circuit["snapshots"] if s["does_task"]]
    assert doing and abs(tokens.index(doing[0]) - formed_index) <= 1, (doing[:3], formed_at)
    assert two_circuit["robust"] and two_circuit["faithfulness_interval"][0] >= 0.85, two_circuit["panel"]
    assert abs(two_circuit["eap_ig_completeness_error"]) < 0.05, two_circuit["eap_ig_completeness_error"]
    # The task isolates induction: the 1-layer trial, which can copy from context but not look up what followed a
    # token, never does it; it does the copying control instead, through its heads' direct paths, which the 2-layer
    # trial, looking up successors that the control's shuffle broke, does not.
    (one,) = [t for trial, t in by_trial.items() if trial != best["trial_id"]]
    assert one["circuit"] == [] and not any(s["does_task"] for s in one["snapshots"]), one["snapshots"][-1]
    from model.causal import find_circuit
    from model.checkpoint import load_checkpoint
    from model.measures import run_probe
    from sweep.results import load_experiment
    from sweep.storage import open_storage

    for trial in load_experiment(open_storage(str(storage)), name).trials:
        model = load_checkpoint(trial.checkpoint)
        control = find_circuit(model, run_probe(json.loads((Path(trial.checkpoint) / "config.json").read_text()))
                               .task_data(), "copying")
        if trial.config["layers"] == 1:
            assert control.does_task and {edge_kind(e) for e in control.circuit} == {"embed -> v", "head -> logits"}
        else:
            assert not control.does_task, control.difference
    atlas = json.loads(sweep("atlas", name, "--storage", storage, "--json").stdout)
    by_layers = {group["value"]: group["circuit"] for group in atlas["groups"]["layers"]}
    assert "head -> k" in by_layers[2]["kinds"] and "head -> k" not in by_layers[1]["kinds"]

    # One formed_at per trial everywhere: best (with its default metric), results, the atlas, stages, the report
    by_loss = json.loads(sweep("best", name, "--storage", storage, "--json").stdout)
    readings = {row["trial_id"]: row["metrics"]["induction_formed_at"] for row in by_loss["trials"]}
    assert readings == formed_at and by_loss["formed_at_resolution"] == "snapshots", (readings, formed_at)
    sweep("results", name, "--storage", storage, "--csv", tmp_path / "results.csv")
    import csv

    rows = {r["trial_id"]: r["induction_formed_at"] for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert {t: int(v) if v else None for t, v in rows.items()} == formed_at
    assert two["circuits"]["induction_formed_at"]["tokens_seen"] == formed_at[best["trial_id"]]

    sweep("report", name, "--storage", storage, "--out", tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert 'id="stages"' in html and "LLC and essential dynamics of every trial" in html
    assert f"{formed_at[best['trial_id']]:,}" in html and "formed_at: the first snapshot" in html
    assert "<h3>Causal circuit on induction</h3>" in html and html.count('aria-label="circuit graph"') >= 3
    assert "Circuits by axis" in html


@pytest.mark.parametrize("iterations, factor, rungs, trials_at_rungs", [
    (4, 2, [1, 2, 4], [16, 8, 4]),
    (8, 2, [1, 2, 4, 8], [16, 8, 4, 2]),
    (8, 3, [1, 3, 8], [16, 6, 2]),
    (8, 4, [1, 4, 8], [16, 4, 1]),
    (20, 3, [1, 3, 9, 20], [16, 6, 2, 1]),
    (1, 2, [1], [16]),
])
def test_synchronous_halving_rungs_start_at_one_iteration_and_end_at_the_last(
    iterations, factor, rungs, trials_at_rungs
):
    from sweep.plan import halving_rungs
    from sweep.schedulers import synchronous_halving

    planned = halving_rungs(16, 1, iterations, factor)
    assert planned == list(zip(rungs, trials_at_rungs))
    # Tune's bracket, driven rung by rung, does what was planned (and what the launch line says)
    bracket = synchronous_halving(16, planned, factor)._create_bracket(0)
    seen = [(bracket._cumul_r, bracket._n)]
    while bracket._halves:
        bracket.successive_halving("test_loss", -1.0)
        seen.append((bracket._cumul_r, bracket._n))
    assert seen == planned


def test_synchronous_halving_on_tokens_starts_at_the_grace_tokens():
    from sweep.schedulers import synchronous_halving

    plan = plan_sweep(LaunchConfig(dataset="repeat", preset="induction", scheduler="halving", storage="unused"))
    # the end is whole steps past 12M tokens; a rung at 12M, one step before it, would compare the same results
    assert plan.max_tokens_seen == 12_001_280
    assert (plan.halving_time_attr, plan.halving_rungs) == ("tokens_seen", [(6_000_000, 2), (12_001_280, 1)])
    bracket = synchronous_halving(4, [(6_000_000, 4), (12_000_000, 2)], 2, "tokens_seen")._create_bracket(0)
    assert (bracket._time_attr, bracket._cumul_r, bracket._n, bracket._halves) == ("tokens_seen", 6_000_000, 4, 1)
    bracket.successive_halving("test_loss", -1.0)
    assert (bracket._cumul_r, bracket._n) == (12_000_000, 2)


def test_a_preset_s_grace_tokens_unused_by_hyperband_are_said(tmp_path):
    from sweep.plan import grace_tokens_unused

    def note(scheduler: str) -> str | None:
        return grace_tokens_unused(
            plan_sweep(LaunchConfig(dataset="repeat", preset="induction", scheduler=scheduler, storage=str(tmp_path)))
        )

    assert "6,000,000 grace tokens do not apply to --scheduler hyperband" in note("hyperband")
    assert note("asha") is None and note("halving") is None and note("fifo") is None


def test_asha_decides_after_a_resume_as_it_would_have_without_one(tmp_path):
    """Tune restores a sweep's scheduler empty: ASHA's rungs forget the results of the trials before the
    interruption, and a trial compared after it meets none of them. ReplayingASHA records each restored trial's
    results from its result.json as it is added, so the next decision is the uninterrupted sweep's."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    from sweep.schedulers import ReplayingASHA

    options = dict(time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2)
    histories = {"a": [2.0, 1.8, 1.6, 1.5], "b": [2.2, 2.0, 1.9, 1.8]}
    for trial_id, losses in histories.items():
        folder = tmp_path / "exp" / f"trial_{trial_id}"
        folder.mkdir(parents=True)
        lines = [{"training_iteration": i, "test_loss": loss} for i, loss in enumerate(losses, 1)]
        (folder / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))

    def scheduler(kind):
        made = kind(**({"storage_uri": str(tmp_path), "experiment": "exp"} if kind is ReplayingASHA else {}),
                    **options)
        made.set_search_properties("test_loss", "min")
        return pickle.loads(pickle.dumps(made))  # as Tune restores it: the object of the launch, empty

    live = scheduler(ReplayingASHA)
    for trial_id, losses in histories.items():  # the uninterrupted sweep sees the results as they come
        trial = SimpleNamespace(trial_id=f"live-{trial_id}")
        live.on_trial_add(None, trial)
        for iteration, loss in enumerate(losses, 1):
            live.on_trial_result(None, trial, {"training_iteration": iteration, "test_loss": loss})
        live.on_trial_complete(None, trial, {"training_iteration": len(losses), "test_loss": losses[-1]})
    replayed, forgetful = scheduler(ReplayingASHA), scheduler(AsyncHyperBandScheduler)
    for trial_id in histories:  # the resumed sweep adds the trials it restores
        replayed.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
        forgetful.on_trial_add(None, SimpleNamespace(trial_id=trial_id))

    def recorded(asha):
        return [sorted(values.values()) for _, values in asha._brackets[0]._rungs]

    assert recorded(replayed) == recorded(live) and recorded(forgetful) == [[], [], []]
    weak = {"training_iteration": 1, "test_loss": 2.5}  # a third trial, worse than both at the first rung
    decisions = []
    for asha in (live, replayed, forgetful):
        asha.on_trial_add(None, SimpleNamespace(trial_id="c"))
        decisions.append(asha.on_trial_result(None, SimpleNamespace(trial_id="c"), weak))
    assert decisions == [TrialScheduler.STOP, TrialScheduler.STOP, TrialScheduler.CONTINUE]
