"""Training trajectories as data: the snapshot schedule, exactly-once snapshots, addressing them, and
`sweep analyse` over an experiment's snapshots (idempotent, resumable, local and S3)."""

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from model import ConfigError, ModelConfig, TrainConfig, Trainer
from model.config import DataConfig, parse_snapshots, snapshot_steps
from model.data import prepare_data
from model.edges import build_graph
from model.snapshots import FolderSnapshots, list_snapshots
from model.transformer import Transformer
from sweep.cli import main
from sweep.space import PRESETS, trial_schedule

from conftest import sweep

TINY = [
    "--tokenizer",
    "bytes",
    "--grid",
    "d_model=16",
    "--grid",
    "seq_len=16",
    "--grid",
    "batch_size=16",
    "--grid",
    "max_tokens=8192",
    "--grid",
    "eval_every_tokens=2048",
    "--grid",
    "lr=3e-3",
]


# ---------------------------------------------------------------- the schedule


def test_the_log_schedule_is_step_zero_powers_of_two_then_even_spacing_to_the_last_step():
    schedule = trial_schedule({**PRESETS["induction"].fixed, "layers": 2, "dataset": "repeat"})
    assert schedule.total_steps == 5860  # 12M tokens in steps of 32 x 64
    steps = snapshot_steps(parse_snapshots("log"), schedule)
    spacing = -(-5860 // 30)  # 196 steps, about 0.4M tokens: finer than the 1M-token iteration
    assert steps[:9] == [0, 1, 2, 4, 8, 16, 32, 64, 128]
    assert steps[9:] == [*range(spacing, 5860, spacing), 5860]
    assert len(steps) == 39 and steps == sorted(set(steps))
    # the count is known before training and does not depend on anything measured
    paper = trial_schedule({**PRESETS["paper"].fixed, "seq_len": 20})
    assert 30 <= len(snapshot_steps(parse_snapshots("log"), paper)) <= 42
    assert len(snapshot_steps(parse_snapshots("log:10"), schedule)) < len(steps)


def test_every_tokens_lists_and_none():
    schedule = trial_schedule({"seq_len": 16, "batch_size": 16, "max_tokens": 8192})  # 256 tokens a step, 32 steps
    assert snapshot_steps(parse_snapshots("every:2048"), schedule) == [0, 8, 16, 24, 32]
    assert snapshot_steps(parse_snapshots("0,1000,4096,8192"), schedule) == [
        0,
        4,
        16,
        32,
    ]  # the first step reaching each count
    assert snapshot_steps(parse_snapshots("1k,4k"), schedule) == [4, 16]
    assert snapshot_steps(parse_snapshots("none"), schedule) == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("sometimes", "is not a schedule"),
        ("every:0", "is not a schedule"),
        ("log:0", "is not a schedule"),
        ("4096,1024", "must increase"),
        ("0,9000", "past the end of training"),
        ("100,200", "falls in the same step"),
    ],
)
def test_a_schedule_that_cannot_be_honoured_is_refused(text, message):
    schedule = trial_schedule({"seq_len": 16, "batch_size": 16, "max_tokens": 8192})
    with pytest.raises(ConfigError, match=message):
        snapshot_steps(parse_snapshots(text), schedule)


def test_launch_refuses_a_bad_schedule_in_one_line_and_writes_nothing(reviews_file, tmp_path):
    storage = tmp_path / "results"
    result = CliRunner().invoke(
        main, ["launch", str(reviews_file), *TINY, "--storage", str(storage), "--snapshots", "0,100000"]
    )
    assert result.exit_code == 2, result.output
    assert "past the end of training" in result.output and len(result.output.strip().splitlines()) == 1
    assert not storage.exists() or not any(storage.iterdir())
    trained = CliRunner().invoke(
        main,
        ["train", str(reviews_file), "--tokenizer", "bytes", "--snapshots", "every:x", "--out", str(tmp_path / "r")],
    )
    assert trained.exit_code == 2 and "--snapshots 'every:x' is not a schedule" in trained.output
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- exactly once


class CountingSnapshots(FolderSnapshots):
    def __init__(self, root):
        super().__init__(root)
        self.written = []

    def write(self, name, files):
        self.written.append(name)
        super().write(name, files)


def _trainer(data, snapshots="every:512"):
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2, seq_len=16)
    train_cfg = TrainConfig(
        lr=3e-3,
        batch_size=8,
        max_tokens=4096,
        eval_every_tokens=1024,
        eval_tokens=512,
        dtype="float32",
        snapshots=snapshots,
        threads=1,
    )
    return Trainer(model_cfg, train_cfg, data.train, data.test, data.tokenizer)


def test_a_killed_and_resumed_run_writes_every_snapshot_once_with_the_uninterrupted_weights(reviews_file, tmp_path):
    data = prepare_data(DataConfig(dataset=str(reviews_file), tokenizer="bytes"), seq_len=16)
    straight = _trainer(data)
    straight.attach_snapshots(FolderSnapshots(tmp_path / "straight"))
    while not straight.finished:
        straight.train_iteration()
    expected = [0, 4, 8, 12, 16, 20, 24, 28, 32]  # every 512 tokens of 128 a step, 32 steps
    assert [s["step"] for s in list_snapshots(tmp_path / "straight")] == expected == straight.snapshot_steps

    first = _trainer(data)
    first.attach_snapshots(CountingSnapshots(tmp_path / "resumed"))
    first.train_iteration()
    first.train_iteration()
    first.save_checkpoint(tmp_path / "checkpoint")  # the last checkpoint before the worker dies...
    first.train_iteration()  # ...which still wrote the snapshots of a third iteration
    cut_short = tmp_path / "resumed" / "step_0000024"
    (cut_short / "snapshot.json").unlink()  # the worker died while writing this one
    second = _trainer(data)
    second.load_checkpoint(tmp_path / "checkpoint")
    writer = CountingSnapshots(tmp_path / "resumed")
    second.attach_snapshots(writer)
    while not second.finished:
        second.train_iteration()
    # the resumed run wrote what was missing and nothing twice
    assert writer.written == ["step_0000024", "step_0000028", "step_0000032"]
    assert [s["step"] for s in list_snapshots(tmp_path / "resumed")] == expected
    for step in expected:
        name = f"step_{step:07d}"
        for file in ("model.safetensors", "snapshot.json"):
            assert (tmp_path / "resumed" / name / file).read_bytes() == (
                tmp_path / "straight" / name / file
            ).read_bytes(), (name, file)


def test_snapshot_records_and_bfloat16_weights(reviews_file, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "train",
            str(reviews_file),
            "--tokenizer",
            "bytes",
            "--d-model",
            "16",
            "--heads",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "16",
            "--max-tokens",
            "4096",
            "--eval-every-tokens",
            "2048",
            "--snapshots",
            "0,1024,4096",
            "--snapshot-dtype",
            "bfloat16",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    records = list_snapshots(tmp_path / "run" / "snapshots")
    assert [(r["step"], r["tokens_seen"]) for r in records] == [(0, 0), (4, 1024), (16, 4096)]
    assert len({r["config_hash"] for r in records}) == 1 and records[0]["dtype"] == "bfloat16"
    assert records[0]["config"]["model"]["d_model"] == 16
    parameters = ModelConfig(**records[0]["config"]["model"]).parameter_count
    assert parameters == sum(p.numel() for p in Transformer(ModelConfig(**records[0]["config"]["model"])).parameters())
    assert records[0]["bytes"] < parameters * 2 + 4096  # two bytes a weight, and a small header and record
    assert (tmp_path / "run" / "snapshots" / "tokenizer.json").is_file()


# ---------------------------------------------------------------- addressing


@pytest.fixture
def trained_run(reviews_file, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "train",
            str(reviews_file),
            "--tokenizer",
            "bytes",
            "--d-model",
            "16",
            "--heads",
            "2",
            "--layers",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "16",
            "--max-tokens",
            "4096",
            "--eval-every-tokens",
            "2048",
            "--snapshots",
            "every:1024",
            "--prompt",
            "the movie",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_every_command_reads_a_snapshot_by_step_or_tokens(trained_run, tmp_path):
    runner = CliRunner()
    listed = json.loads(runner.invoke(main, ["snapshots", str(trained_run), "--json"]).output)
    (rows,) = listed["trials"].values()
    assert [(r["step"], r["tokens_seen"]) for r in rows] == [(0, 0), (4, 1024), (8, 2048), (12, 3072), (16, 4096)]
    heads = json.loads(
        runner.invoke(main, ["heads", str(trained_run), "--step", "8", "--json"], catch_exceptions=False).output
    )
    assert len(heads["heads"]) == 4 and all("ablation" in h for h in heads["heads"])
    at_init = json.loads(runner.invoke(main, ["heads", str(trained_run), "--tokens-seen", "0", "--json"]).output)
    assert at_init["heads"] != heads["heads"]
    # the last snapshot is the final weights: the same scores the final checkpoint recorded
    last = json.loads(runner.invoke(main, ["heads", str(trained_run), "--step", "16", "--json"]).output)
    final = json.loads((trained_run / "checkpoint" / "heads.json").read_text())
    assert len(last["heads"]) == len(final["heads"]) == 4
    for ours, recorded in zip(last["heads"], final["heads"]):
        assert ours["scores"] == pytest.approx(recorded["scores"], abs=1e-3)
    sample = runner.invoke(
        main, ["generate", str(trained_run), "--step", "4", "--prompt", "the movie", "--tokens", "5"]
    )
    assert sample.exit_code == 0 and sample.output.startswith("the movie")
    pictures = runner.invoke(main, ["heatmaps", str(trained_run), "--step", "4", "--out", str(tmp_path / "maps")])
    assert pictures.exit_code == 0 and len(list((tmp_path / "maps").glob("layer*_head*.png"))) == 4
    exported = runner.invoke(main, ["export", str(trained_run), "--step", "8", "--out", str(tmp_path / "tl")])
    assert exported.exit_code == 0, exported.output
    assert {p.name for p in (tmp_path / "tl").iterdir()} >= {
        "hooked_transformer_config.json",
        "state_dict.pt",
        "tokenizer.json",
        "README.md",
    }


def test_the_export_at_a_snapshot_gives_transformer_lens_the_snapshot_logits(trained_run, tmp_path):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from model.snapshots import model_from_snapshot

    assert (
        CliRunner().invoke(main, ["export", str(trained_run), "--step", "8", "--out", str(tmp_path / "tl")]).exit_code
        == 0
    )
    hooked = HookedTransformer(
        HookedTransformerConfig(**json.loads((tmp_path / "tl" / "hooked_transformer_config.json").read_text()))
    )
    hooked.load_state_dict(torch.load(tmp_path / "tl" / "state_dict.pt", weights_only=True))
    folder = trained_run / "snapshots" / "step_0000008"
    ours = model_from_snapshot(
        json.loads((folder / "snapshot.json").read_text()), (folder / "model.safetensors").read_bytes()
    )
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hooked(tokens), ours(tokens), atol=1e-4)


TL4_LOAD = """
import json, sys, torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
folder, expected = sys.argv[1], torch.load(sys.argv[2])
cfg = TransformerBridgeConfig(**json.load(open(f"{folder}/hooked_transformer_config.json")))
bridge = TransformerBridge.boot_native(cfg)
state = convert_tl_checkpoint(torch.load(f"{folder}/state_dict.pt", weights_only=True), cfg)
bridge.load_state_dict(state, strict=True)
with torch.no_grad():
    print(float((bridge(expected["tokens"]) - expected["logits"]).abs().max()))
"""


def test_the_export_at_a_snapshot_loads_in_transformer_lens_4_with_our_logits(trained_run, tmp_path):
    """TransformerLens 4.x cannot share an environment with 3.9: tests/setup gives it .venv-tl4."""
    from model.snapshots import model_from_snapshot

    python = Path(__file__).resolve().parent.parent / ".venv-tl4" / "bin" / "python"
    assert python.is_file(), "tests/setup makes .venv-tl4 with transformer-lens 4.x"
    assert (
        CliRunner()
        .invoke(main, ["export", str(trained_run), "--tokens-seen", "2048", "--out", str(tmp_path / "tl")])
        .exit_code
        == 0
    )
    folder = trained_run / "snapshots" / "step_0000008"
    ours = model_from_snapshot(
        json.loads((folder / "snapshot.json").read_text()), (folder / "model.safetensors").read_bytes()
    )
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"tokens": tokens, "logits": ours(tokens)}, tmp_path / "ours.pt")
    result = subprocess.run(
        [str(python), "-c", TL4_LOAD, str(tmp_path / "tl"), str(tmp_path / "ours.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "5"], "no snapshot at --step 5; nearest: --step 4, --step 8 ("),
        (["--tokens-seen", "1500"], "nearest: --tokens-seen 1024, --tokens-seen 2048 ("),
        (["--step", "99"], "nearest: --step 16 ("),
        (["--step", "4", "--tokens-seen", "1024"], "--step and --tokens-seen both name a snapshot; give one"),
    ],
)
def test_an_address_that_does_not_exist_names_the_nearest_snapshots(trained_run, args, message):
    result = CliRunner().invoke(main, ["heads", str(trained_run), *args])
    assert result.exit_code == 2 and message in result.output.replace("\n", " ")
    assert len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- sweep analyse


def test_a_table_part_written_before_edges_were_stored_still_reads(tmp_path):
    """Parts without the sender and receiver columns read them as null beside parts that have them."""
    import pyarrow as pa

    from sweep.storage import open_storage
    from sweep.table import SCHEMA, read_table

    folder = tmp_path / "exp" / "analysis"
    folder.mkdir(parents=True)
    old = pa.table({"trial": ["a"], "step": [0], "tokens_seen": [0], "layer": [-1], "head": [-1],
                    "measure": ["test_loss"], "value": [3.0], "analysis": ["loss"], "version": [1]},
                   schema=pa.schema([SCHEMA.field(n) for n in SCHEMA.names if n not in ("sender", "receiver")]))
    pq.write_table(old, folder / "part-old.parquet")
    new = pa.table({**{n: old[n].to_pylist() for n in old.column_names}, "measure": ["edge_effect"],
                    "analysis": ["circuit:induction"], "sender": ["embed"], "receiver": ["logits"]}, schema=SCHEMA)
    pq.write_table(new, folder / "part-new.parquet")

    class Experiment:
        storage, path = open_storage(str(tmp_path)), str(tmp_path / "exp")

    table = read_table(Experiment())
    assert table.schema.names == SCHEMA.names
    assert sorted(zip(table["measure"].to_pylist(), table["sender"].to_pylist())) == [
        ("edge_effect", "embed"), ("test_loss", None)]


def _table_rows(folder: Path) -> list[tuple]:
    table = pq.ParquetDataset(str(folder)).read()
    rows = zip(
        *(
            table.column(c).to_pylist()
            for c in ("trial", "step", "tokens_seen", "layer", "head", "measure", "value", "analysis", "version")
        )
    )
    return sorted(rows)


@pytest.mark.usefixtures("no_stray_ray")  # its own Ray: a driver interrupted with tasks pending churns the cluster
def test_analyse_maps_every_snapshot_once_resumes_after_an_interruption_and_backfills(reviews_file, tmp_path):
    from sweep.analyse import analyse_experiment
    from sweep.results import load_experiment
    from sweep.storage import open_storage

    storage = tmp_path / "results"
    sweep(
        "launch",
        reviews_file,
        *TINY,
        "--grid",
        "heads=2,4",
        "--snapshots",
        "every:2048",
        "--no-early-stopping",
        "--storage",
        storage,
        "--name",
        "snap",
    )
    experiment = load_experiment(open_storage(str(storage)), "snap")
    assert [[s.step for s in t.snapshots] for t in experiment.trials] == [[0, 8, 16, 24, 32]] * 2

    shutil.copytree(storage / "snap", tmp_path / "copy" / "snap")
    # interrupted after 3 of the 10 snapshots: what was finished is in the table
    done = []

    def interrupt(finished, total):
        done.append(finished)
        if finished >= 3:
            raise KeyboardInterrupt

    import ray

    try:
        with pytest.raises(KeyboardInterrupt):
            analyse_experiment(experiment, ("loss", "scores"), experiment.trials, on_progress=interrupt)
    finally:
        # this process's Ray: left running, it would die with the next test's cleanup, and take pytest along
        ray.shutdown()
    partial = _table_rows(storage / "snap" / "analysis")
    assert 3 <= len({(r[0], r[1]) for r in partial}) < 10
    resumed = sweep("analyse", "snap", "--storage", storage, "--what", "loss,scores")
    assert "measured" in resumed.stderr
    again = sweep("analyse", "snap", "--storage", storage, "--what", "loss,scores")
    assert "nothing to compute" in again.stderr  # a second run computes nothing
    uninterrupted = sweep("analyse", "snap", "--storage", tmp_path / "copy", "--what", "loss,scores")
    assert "measured 10 snapshots" in uninterrupted.stderr
    assert _table_rows(storage / "snap" / "analysis") == _table_rows(tmp_path / "copy" / "snap" / "analysis")

    # a measure added later backfills into the finished sweep, and only it is computed
    backfill = sweep("analyse", "snap", "--storage", storage, "--what", "loss,scores,ablation")
    assert "measured 10 snapshots (ablation)" in backfill.stderr
    rows = _table_rows(storage / "snap" / "analysis")
    assert {r[7] for r in rows} == {"loss", "scores", "ablation"}
    assert len([r for r in rows if r[5] == "test_loss"]) == 10  # one per snapshot, none twice
    # the scores of the last snapshot are the trial's final heads.json
    trial = experiment.trials[0]
    final = json.loads((Path(trial.checkpoint) / "heads.json").read_text())
    last = {(r[3], r[4], r[5]): r[6] for r in rows if r[0] == trial.trial_id and r[1] == 32 and r[7] == "scores"}
    for head in final["heads"]:
        for name, value in head["scores"].items():
            assert last[(head["layer"], head["head"], name)] == pytest.approx(value, abs=1e-4), name

    # the LLC's eps x gamma calibration on one stored snapshot, printed, with the setting to pick
    calibration = sweep("analyse", "snap", "--storage", storage, "--what", "llc-calibrate", "--trials",
                        trial.trial_id, "--step", "16").stdout
    assert f"LLC calibration on trial {trial.trial_id}, step 16" in calibration
    verdict = "largest stable eps" in calibration or "no setting is stable" in calibration
    assert calibration.count("\n") >= 12 and verdict
    refused = sweep("analyse", "snap", "--storage", storage, "--what", "llc-calibrate", "--step", "5", check=False)
    assert refused.returncode == 2 and "no snapshot there; its steps: 0, 8, 16, 24, 32" in refused.stderr

    # `sweep circuit` patches every edge at every snapshot once (what the table lacks), then reads it back
    circuit = json.loads(sweep("circuit", "snap", "--storage", storage, "--trial", trial.trial_id, "--json").stdout)
    assert circuit["task"] == "induction" and circuit["computed_snapshots"] == 5  # that trial's snapshots
    (one,) = circuit["trials"]
    assert one["snapshot"]["step"] == 32 and [s["step"] for s in one["snapshots"]] == [0, 8, 16, 24, 32]
    graph = build_graph(trial.config["layers"], trial.config["heads"], trial.config["mlp"])
    assert one["edges_in_graph"] == len(graph.edges) and one["order"] == sorted(one["order"], key=lambda e: next(
        (c["appeared"] or {"step": 10**9})["step"] for c in one["circuit"] if c["edge"] == e))
    rows = _table_rows(storage / "snap" / "analysis")
    assert {(r[0], r[1]) for r in rows if r[7] == "circuit:induction"} == {
        (trial.trial_id, s) for s in (0, 8, 16, 24, 32)
    }
    again = sweep("circuit", "snap", "--storage", storage, "--trial", trial.trial_id, "--json")
    assert json.loads(again.stdout)["computed_snapshots"] == 0  # read back, nothing computed twice
    at = json.loads(sweep("circuit", "snap", "--storage", storage, "--trial", trial.trial_id, "--step", "16",
                          "--json").stdout)
    assert at["trials"][0]["snapshot"]["step"] == 16
    overview = sweep("circuit", "snap", "--storage", storage)  # every trial: the other one's snapshots now
    assert all(t.trial_id in overview.stdout for t in experiment.trials) and "faithfulness" in overview.stdout
    rows = _table_rows(storage / "snap" / "analysis")
    assert len({(r[0], r[1]) for r in rows if r[7] == "circuit:induction"}) == 10
    # mistakes: one line, exit 2, nothing computed or written
    parts = sorted((storage / "snap" / "analysis").iterdir())
    other = experiment.trials[1]
    shutil.rmtree(Path(other.path) / "snapshots")  # a trial trained before snapshots existed
    for args, message in (
        (["--task", "copy"], "unknown circuit task 'copy'; tasks: induction, copying, text"),
        (["--trial", trial.trial_id, "--step", "5"], "has no snapshot at --step 5; nearest: --step 0, --step 8"),
        (["--step", "8"], "--step 8 names a snapshot of one trial: give --trial"),
        (["--trial", other.trial_id], f"trial {other.trial_id} of snap has no snapshots"),
    ):
        failed = sweep("circuit", "snap", "--storage", storage, *args, check=False)
        assert failed.returncode == 2 and message in failed.stderr and len(failed.stderr.strip().splitlines()) == 1, \
            failed.stderr
    assert sorted((storage / "snap" / "analysis").iterdir()) == parts


@pytest.mark.usefixtures("no_stray_ray")
def test_analyse_on_s3_and_snapshots_listed_from_storage_alone(s3_server, reviews_file):
    sweep(
        "launch",
        reviews_file,
        *TINY,
        "--grid",
        "heads=2",
        "--snapshots",
        "every:4096",
        "--storage",
        "s3://bucket/exp",
        "--name",
        "s3snap",
    )
    listed = json.loads(sweep("snapshots", "s3snap", "--storage", "s3://bucket/exp", "--json").stdout)
    (rows,) = listed["trials"].values()
    assert [r["tokens_seen"] for r in rows] == [0, 4096, 8192]
    first = sweep("analyse", "s3snap", "--storage", "s3://bucket/exp")
    assert "measured 3 snapshots" in first.stderr
    second = sweep("analyse", "s3snap", "--storage", "s3://bucket/exp")
    assert "nothing to compute" in second.stderr
    keys = [
        item["Key"] for item in s3_server.list_objects_v2(Bucket="bucket", Prefix="exp/s3snap/analysis/")["Contents"]
    ]
    assert len(keys) == 1 and keys[0].endswith(".parquet")
    heads = json.loads(
        sweep("heads", "s3snap", "--storage", "s3://bucket/exp", "--tokens-seen", "4096", "--json").stdout
    )
    assert len(heads["heads"]) == 2


def test_storage_advice_names_only_settings_that_would_change_the_footprint(tmp_path):
    from sweep.plan import LaunchConfig, plan_sweep, storage_advice

    paper = storage_advice(plan_sweep(LaunchConfig(dataset="imdb", preset="paper", storage=str(tmp_path))))
    assert "bfloat16" not in paper and "smaller N than 10" in paper  # the preset writes log:10 in bf16 already
    induction = storage_advice(plan_sweep(LaunchConfig(dataset="", preset="induction", storage=str(tmp_path))))
    assert "--snapshot-dtype bfloat16" in induction and "smaller N than 30" in induction
