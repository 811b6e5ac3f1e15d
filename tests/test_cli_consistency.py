"""What a newcomer meets: every read command defaults to the newest experiment, states and modes
read right, the record of a launch is true, and impossible requests fail before anything is written."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from model.config import ConfigError, TrainConfig
from sweep.cli import main
from sweep.plan import LaunchConfig, plan_sweep
from sweep.space import TRIAL_KEYS, planned_iterations

from conftest import run_env

RAY_NOISE = ("iterations_since_restore", "time_this_iter_s", "time_total_s")


def fake_experiment(storage: Path, name: str, trials: dict[str, dict], created: str = "2026-01-01T00:00:00") -> Path:
    """An experiment as Tune leaves it: sweep.json plus one result.json line per iteration of each trial."""
    root = storage / name
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(
        json.dumps(
            {
                "metric": "test_loss",
                "mode": "min",
                "trials": len(trials),
                "created": created,
                "launch": {"max_iterations": None},
            }
        )
    )
    for trial_id, spec in trials.items():
        config = {
            "seq_len": 16,
            "batch_size": 16,
            "max_tokens": 1024,
            "eval_every_tokens": 256,
            "lr": spec["lr"],
            "heads": 2,
            "d_model": 16,
        }
        lines = []
        for iteration, loss in enumerate(spec["losses"], 1):
            lines.append(
                {
                    "trial_id": trial_id,
                    "config": config,
                    "training_iteration": iteration,
                    "test_loss": loss,
                    "train_loss": loss + 0.1,
                    "tokens_seen": iteration * 256,
                    "induction_score_max": spec["induction"],
                    "time_this_iter_s": 0.5,
                    "iterations_since_restore": iteration,
                    "time_total_s": iteration * 0.5,
                    "done": iteration == len(spec["losses"]),
                    "induction_formed_at": spec.get("formed_at"),
                    **({"formed_at_resolution": spec["resolution"]} if "resolution" in spec else {}),
                }
            )
        (root / f"trial_{trial_id}").mkdir()
        (root / f"trial_{trial_id}" / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.fixture
def storage(tmp_path) -> Path:
    # 4 iterations planned (1024 tokens / 256 a step); trial b stopped after its first
    fake_experiment(
        tmp_path / "results",
        "older",
        {"z": {"lr": 1e-3, "losses": [3.0], "induction": 0.1}},
        created="2025-01-01T00:00:00",
    )
    fake_experiment(tmp_path / "results", "newest", {
        "a": {"lr": 1e-3, "losses": [3.0, 2.5, 2.2, 2.0], "induction": 0.2},
        "b": {"lr": 1e-6, "losses": [4.0], "induction": 0.6},
    })
    return tmp_path / "results"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_every_read_command_defaults_to_the_newest_experiment(tmp_path):
    """Newest by its record's `created`: not the first or last name, nor the folder written last."""
    storage = tmp_path / "results"
    fake_experiment(storage, "b-newest", {"n1": {"lr": 1e-3, "losses": [3.0, 2.0], "induction": 0.2}},
                    created="2026-06-01T00:00:00")
    fake_experiment(storage, "a-oldest", {"o1": {"lr": 1e-3, "losses": [3.0], "induction": 0.1}},
                    created="2025-01-01T00:00:00")
    fake_experiment(storage, "c-written-last", {"w1": {"lr": 1e-3, "losses": [3.0], "induction": 0.1}},
                    created="2026-01-01T00:00:00")
    os.utime(storage / "b-newest", (1, 1))  # the oldest folder on disk, whatever the file system's clock
    for command in (["status"], ["best"], ["results"], ["heads"], ["atlas"], ["report", "--out", tmp_path / "r.html"]):
        result = invoke(*command, "--storage", storage)
        shown = (tmp_path / "r.html").read_text() if command[0] == "report" else result.output
        if command == ["heads"]:  # no checkpoint in a fake experiment: the error names the newest one
            assert result.exit_code == 2 and "b-newest" in result.stderr, result.output
        else:
            assert result.exit_code == 0, (command, result.output)
            assert "b-newest" in shown and "n1" in shown, (command, shown[:400])
            assert not [n for n in ("a-oldest", "c-written-last", "o1", "w1") if re.search(rf"\b{n}\b", shown)], command


def test_trials_stopped_early_show_as_stopped_early_with_their_iteration(storage, tmp_path):
    table = invoke("results", "--storage", storage).output
    assert "stopped early at 1/4" in table and "terminated" in table and "TERMINATED" not in table  # one spelling
    assert "1 stopped early, 1 terminated" in invoke("status", "--storage", storage).output
    assert "b stopped early at 1/4" in invoke("status", "--storage", storage).output
    document = json.loads(invoke("best", "--storage", storage, "--metric", "induction_score_max", "--json").output)
    assert document["trials"][0]["status"] == "STOPPED_EARLY" and document["trials"][0]["planned_iterations"] == 4
    assert invoke("results", "--storage", storage, "--csv", tmp_path / "r.csv").exit_code == 0
    import csv

    rows = {row["trial_id"]: row for row in csv.DictReader((tmp_path / "r.csv").open())}
    assert rows["b"]["status"] == "STOPPED_EARLY" and rows["a"]["status"] == "TERMINATED"
    assert not set(RAY_NOISE) & set(rows["a"])  # Ray's bookkeeping is not a metric
    assert invoke("report", "--storage", storage, "--out", tmp_path / "r.html").exit_code == 0
    assert "stopped early at 1/4" in (tmp_path / "r.html").read_text()


def test_best_infers_the_mode_from_the_metric(storage):
    by_score = json.loads(invoke("best", "--storage", storage, "--metric", "induction_score_max", "--json").output)
    assert by_score["mode"] == "max" and [t["trial_id"] for t in by_score["trials"]] == ["b", "a"]
    by_loss = json.loads(invoke("best", "--storage", storage, "--metric", "test_loss", "--json").output)
    assert by_loss["mode"] == "min" and by_loss["trials"][0]["trial_id"] == "a"
    overridden = json.loads(
        invoke("best", "--storage", storage, "--metric", "induction_score_max", "--mode", "min", "--json").output
    )
    assert overridden["trials"][0]["trial_id"] == "a"
    unreported = invoke("best", "--storage", storage, "--metric", "icl_score")
    listed = unreported.stderr.split("reported:")[1]
    assert unreported.exit_code == 2 and "test_loss" in listed and not any(noise in listed for noise in RAY_NOISE)
    unknown = invoke("best", "--storage", storage, "--metric", "bleu")
    assert unknown.exit_code == 2 and "--metric 'bleu' is not a metric" in unknown.stderr


def test_help_names_the_metrics_and_no_missing_documents():
    text = invoke("best", "-h").output
    assert "DESIGN.md" not in text and "induction_score_max" in text and "test_accuracy" in text
    assert "ray://HEAD_IP:10001" in invoke("launch", "-h").output


def test_a_file_given_as_a_checkpoint_is_named_as_a_file(tmp_path):
    weights = tmp_path / "checkpoint" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    for command in ("heads", "heatmaps", "export"):
        extra = ["--out", tmp_path / "x"] if command != "heads" else []
        result = invoke(command, weights, *extra)
        assert result.exit_code == 2
        assert f"{weights} is a file, not a checkpoint folder" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_launch_record_is_true(tmp_path):
    plan = plan_sweep(LaunchConfig(dataset="repeat", preset="smoke", storage=str(tmp_path)))
    record = plan.record()
    assert set(record["axes"]) == {"lr", "heads"}
    assert not {"lr", "heads"} & set(record["fixed"])  # what varies is not also listed as fixed
    assert record["mode"] == "min" and not {"sweep_metric", "cpus_per_trial"} & set(record["fixed"])
    scored = plan_sweep(
        LaunchConfig(dataset="repeat", preset="smoke", storage=str(tmp_path), metric="induction_score_max")
    )
    assert scored.launch.mode == "max"


def test_one_count_of_iterations(tmp_path):
    # 100000 tokens, 33000 an iteration, 1024 tokens a step: 98 steps of 33 -> 3 iterations, not 4
    config = {"max_tokens": 100_000, "eval_every_tokens": 33_000, "batch_size": 32, "seq_len": 32}
    assert planned_iterations(config) == 3
    plan = plan_sweep(
        LaunchConfig(
            dataset="repeat", preset="smoke", storage=str(tmp_path), grid=tuple(f"{k}={v}" for k, v in config.items())
        )
    )
    assert plan.iterations == 3
    assert TrainConfig(max_tokens=100_000, eval_every_tokens=33_000, batch_size=32).schedule_for(32).iterations == 3


def test_the_trial_key_table_drives_train_and_launch(tmp_path, monkeypatch):
    train_help = invoke("train", "-h").output
    for key in TRIAL_KEYS:
        assert "--" + key.replace("_", "-") in train_help
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "train",
        "repeat",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "8",
        "--max-tokens",
        "256",
        "--eval-every-tokens",
        "256",
        "--weight-decay",
        "0.2",
        "--warmup-fraction",
        "0",
        "--threads",
        "1",
        "--out",
        "run",
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert (
        saved["train"]["weight_decay"] == 0.2
        and saved["train"]["warmup_fraction"] == 0
        and saved["model"]["n_heads"] == 2
    )
    assert "1 threads" in result.output


def test_sweep_train_takes_threads_from_the_cpus_it_may_use(tmp_path):
    """Two runs that each take every core collapse: by default a run uses only the CPUs it was given."""
    command = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        "-m",
        "sweep.cli",
        "train",
        "repeat",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "8",
        "--max-tokens",
        "128",
        "--eval-every-tokens",
        "128",
        "--out",
        tmp_path / "run",
    ]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=run_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1 threads" in result.stderr


def test_wandb_is_an_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    result = invoke("launch", "repeat", "--wandb", "--storage", tmp_path / "results")
    assert result.exit_code == 2 and "pip install 'circuit-sweep[wandb]'" in result.stderr
    assert not (tmp_path / "results").exists()


def test_read_commands_start_without_torch_or_ray(storage):
    probe = (
        "import sys; from sweep.cli import main\n"
        f"for args in (['list'], ['status'], ['best'], ['results']):\n"
        f"    try: main([*args, '--storage', {str(storage)!r}], standalone_mode=False)\n"
        "    except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=run_env(), timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.usefixtures("no_stray_ray", "shared_ray")
@pytest.mark.parametrize(
    "request_args, wanted",
    [
        (["--gpus-per-trial", "1"], "each needs 1 CPU, 1 GPU but this machine (local Ray) has"),
        (
            ["--cpus-per-trial", str((os.cpu_count() or 2) + 2)],
            f"each needs {(os.cpu_count() or 2) + 2} CPUs, no GPU but this machine (local Ray) has",
        ),
    ],
)
def test_a_request_no_node_can_meet_fails_before_anything_is_written(request_args, wanted, tmp_path):
    storage = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "launch", "repeat", *request_args, "--storage", str(storage)],
        capture_output=True,
        text=True,
        env=run_env(CUDA_VISIBLE_DEVICES=""),
        timeout=180,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert wanted in result.stderr and "other nodes" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # nor Ray's token notice
    assert not storage.exists() or not any(storage.iterdir())


def test_an_output_path_that_cannot_be_written_is_one_line(storage, tmp_path):
    for command in (["results", "--csv"], ["atlas", "--csv"], ["report", "--out"]):
        target = tmp_path / "missing" / "out.file"
        result = invoke(*command, target, "--storage", storage)
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.strip() == f"Error: cannot write {target}: No such file or directory; pick a writable path"


def test_best_by_when_a_circuit_formed_shows_token_counts_and_names_the_trials_it_could_not_rank(tmp_path):
    fake_experiment(tmp_path, "formed", {
        "early": {"lr": 1e-3, "losses": [3.0, 2.0], "induction": 0.6, "formed_at": 512},
        "late": {"lr": 1e-3, "losses": [3.0, 2.1], "induction": 0.5, "formed_at": 4_005_888.0},
        "never": {"lr": 1e-6, "losses": [4.0, 3.9], "induction": 0.1},
    })
    shown = invoke("best", "formed", "--storage", tmp_path, "--metric", "induction_formed_at", "--top", "5").output
    assert "4,005,888" in shown and "4005888.0000" not in shown
    assert shown.index("early") < shown.index("late")  # formed_at ranks earliest first
    assert "not ranked (the circuit never formed): 1 trial, never" in shown
    document = json.loads(
        invoke("best", "formed", "--storage", tmp_path, "--metric", "induction_formed_at", "--json").output)
    assert document["unranked"] == ["never"]


def test_a_searched_range_is_echoed_as_typed(tmp_path):
    result = invoke("launch", "repeat", "--preset", "smoke", "--grid", "lr=loguniform:1e-4:1e-2", "--storage", tmp_path)
    assert result.exit_code == 2 and "lr=loguniform:1e-4:1e-2" in result.output and "0.0001" not in result.output


def test_the_repeat_task_records_its_own_vocabulary_and_refuses_a_tokenizer(tmp_path):
    plan = plan_sweep(LaunchConfig(dataset="repeat", preset="induction", storage=str(tmp_path)))
    assert plan.record()["fixed"]["tokenizer"] == "repeat:64" and {t["tokenizer"] for t in plan.trials} == {"repeat:64"}
    induction = {"dataset": "repeat", "preset": "induction", "storage": str(tmp_path)}
    for launch in (LaunchConfig(**induction, data={"tokenizer": "bytes"}),
                   LaunchConfig(**induction, grid=("tokenizer=bytes,gpt2",))):
        with pytest.raises(ConfigError, match="does not apply to the repeat task"):
            plan_sweep(launch)
    refused = invoke("train", "repeat", "--tokenizer", "bpe:512", "--out", tmp_path / "run")
    assert refused.exit_code == 2 and "does not apply to the repeat task" in refused.output
    assert not (tmp_path / "run").exists()


def test_a_head_type_forms_where_its_pattern_or_its_use_first_appears():
    """Previous-token heads at 0.35 whose removal costs 1.4 nats are in use before their pattern reads 0.4: formed_at
    takes the first snapshot where either appears, and says which; a head whose removal costs nothing forms only by
    its pattern."""
    import pyarrow as pa

    from sweep.table import SCHEMA, formed_at

    rows = []

    def add(trial, step, layer, head, analysis, measure, value):
        rows.append({"trial": trial, "step": step, "tokens_seen": step * 1000, "layer": layer, "head": head,
                     "measure": measure, "value": value, "analysis": analysis, "version": 1, "sender": None,
                     "receiver": None})

    for step, (score, cost) in enumerate([(0.1, 0.01), (0.35, 1.4), (0.45, 1.6)]):  # used at step 1, 0.4 at step 2
        add("used", step, 0, 0, "scores", "previous_token", score)
        add("used", step, 0, 0, "ablation", "ablation_repeated", cost)
        add("used", step, 1, 0, "scores", "induction", [0.05, 0.5, 0.9][step])
    for step, score in enumerate([0.1, 0.35, 0.45]):  # the same pattern, costing nothing when removed
        add("idle", step, 0, 0, "scores", "previous_token", score)
        add("idle", step, 0, 0, "ablation", "ablation_repeated", 0.01)
    found = formed_at(pa.Table.from_pylist(rows, schema=SCHEMA))
    assert (found["used"]["prev_token_formed_at"], found["used"]["prev_token_formed_by"]) == (1000, "use")
    assert (found["used"]["induction_formed_at"], found["used"]["induction_formed_by"]) == (1000, "pattern")
    assert (found["idle"]["prev_token_formed_at"], found["idle"]["prev_token_formed_by"]) == (2000, "pattern")
    assert found["idle"]["induction_formed_at"] is None


def _write_induction_scores(experiment: Path) -> None:
    """An analysis table whose scores put a head past 0.4 at 384 tokens: the snapshot before the iteration's 512."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sweep.table import SCHEMA

    (experiment / "analysis").mkdir()
    rows = [{"trial": "a", "step": step, "tokens_seen": tokens, "layer": 1, "head": 0, "measure": "induction",
             "value": value, "analysis": "scores", "version": 2, "sender": None, "receiver": None}
            for step, tokens, value in ((0, 0, 0.1), (1, 384, 0.5), (2, 512, 0.6))]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), experiment / "analysis" / "part-a.parquet")


def test_best_reads_formed_at_as_results_do_whatever_the_metric(tmp_path):
    """`sweep best --json` gives one formed_at per trial, the finest available, with the default metric as with
    --metric induction_formed_at, and says its resolution."""


    storage = tmp_path / "results"
    fake_experiment(storage, "formed", {"a": {"lr": 1e-3, "losses": [3.0, 2.0], "induction": 0.6, "formed_at": 512}})
    _write_induction_scores(storage / "formed")
    by_loss = json.loads(invoke("best", "formed", "--storage", storage, "--json").output)
    by_formed = json.loads(invoke("best", "formed", "--storage", storage, "--metric", "induction_formed_at",
                                  "--json").output)
    for document in (by_loss, by_formed):
        assert document["trials"][0]["metrics"]["induction_formed_at"] == 384  # the snapshot, not the iteration
        assert document["formed_at_resolution"] == "snapshots"
    assert "384" in invoke("results", "formed", "--storage", storage).output


def test_formed_at_read_while_training_is_the_one_reading_whatever_ran_since(tmp_path):
    """A trial that read formed_at at its snapshots while training keeps it: `sweep analyse` scoring its snapshots
    (or measuring their ablation) afterwards changes no reader's answer."""


    storage = tmp_path / "results"
    fake_experiment(storage, "formed", {"a": {"lr": 1e-3, "losses": [3.0, 2.0], "induction": 0.6, "formed_at": 512,
                                              "resolution": "snapshot"}})
    before = json.loads(invoke("best", "formed", "--storage", storage, "--json").output)
    _write_induction_scores(storage / "formed")
    after = json.loads(invoke("best", "formed", "--storage", storage, "--json").output)
    for document in (before, after):
        assert document["trials"][0]["metrics"]["induction_formed_at"] == 512
        assert document["formed_at_resolution"] == "snapshots"
    atlas = json.loads(invoke("atlas", "formed", "--storage", storage, "--json").output)
    assert atlas["trials"][0]["induction_formed_at"] == 512
