"""`sweep train` and `sweep generate` end to end, and their one-line errors."""

import json

import pytest
from click.testing import CliRunner

from sweep.cli import main

SMALL = ["--tokenizer", "bytes", "--layers", "1", "--heads", "2", "--d-model", "16", "--seq-len", "16",
         "--batch-size", "8", "--max-tokens", "1024", "--eval-every-tokens", "512", "--lr", "3e-3"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_train_writes_metrics_and_a_complete_checkpoint(reviews_file, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", reviews_file, *SMALL, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    final = json.loads(result.stdout[result.stdout.index("{"):])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2]
    assert final["tokens_seen"] == lines[-1]["tokens_seen"] == 1024
    checkpoint = out / "checkpoint"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt", "heads.json", "sample.txt",
                 "heatmaps/patterns.json", "heatmaps/layer0_head0.png", "heatmaps/layer0.png"):
        assert (checkpoint / name).is_file(), name
    assert not list(tmp_path.glob("run/*.partial"))
    assert set(json.loads((checkpoint / "manifest.json").read_text())["files"]) >= {
        "model.safetensors",
        "heatmaps/layer0.png",
    }

    generated = invoke("generate", checkpoint, "--prompt", "the movie", "--tokens", "5")
    assert generated.exit_code == 0
    assert generated.stdout.startswith("the movie") and len(generated.stdout.strip()) > len("the movie")


def test_train_refuses_to_overwrite_a_run(reviews_file, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    result = CliRunner().invoke(main, ["train", str(reviews_file), *SMALL, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "already holds a run" in result.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "no-such-dataset"], "unknown dataset 'no-such-dataset'"),
        (["train", "repeat", "--heads", "3", "--d-model", "64"], "--heads 3 does not divide --d-model 64"),
        (["train", "repeat", "--seq-len", "100000"], "--seq-len 100000 must be between 2 and"),
        (["train", "repeat", "--lr", "0"], "--lr 0.0 must be positive"),
        (["train", "repeat", "--batch-size", "0"], "--batch-size 0 must be positive"),
        (["train", "imdb", "--tokenizer", "nonsense"], "--tokenizer 'nonsense'"),
        (["generate", "."], "is not a checkpoint"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, message, tmp_path, monkeypatch, data_mirror):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_cut_short_is_refused_by_every_reader(reviews_file, tmp_path):
    out = tmp_path / "run"
    assert invoke("train", reviews_file, *SMALL, "--out", out).exit_code == 0
    with (out / "checkpoint" / "trainer_state.pt").open("r+b") as state:
        state.truncate(100)  # as a full disk or a dropped connection leaves it
    for command in (["heads", out / "checkpoint"], ["generate", out / "checkpoint"],
                    ["export", out / "checkpoint", "--format", "transformer-lens", "--out", tmp_path / "tl"]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert "incomplete checkpoint (trainer_state.pt holds 100 of its" in result.stderr
    assert not (tmp_path / "tl").exists()


def test_diverging_run_stops_with_a_clear_error(reviews_file, tmp_path):
    result = CliRunner().invoke(
        main, ["train", str(reviews_file), *SMALL[:-2], "--lr", "1e5", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: nan_loss")


def test_gpt2_without_the_hub_or_a_mirrored_copy_is_one_line(tmp_path, monkeypatch, data_mirror):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "imdb").symlink_to(data_mirror / "imdb")  # the data, but no tokenizers/gpt2
    monkeypatch.setenv("SWEEP_DATA_DIR", str(mirror))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "imdb", "--tokenizer", "gpt2", "--max-tokens", "100"])
    assert result.exit_code == 2
    assert "gpt2 needs the Hugging Face Hub, which is unreachable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_history_and_token_tables_of_a_run(reviews_file, tmp_path):
    out = tmp_path / "run"
    assert invoke("train", reviews_file, *SMALL, "--out", out).exit_code == 0
    history = json.loads(invoke("heads", out, "--history", "--json").output)
    iterations = len((out / "metrics.jsonl").read_text().splitlines())
    assert len(history["history"]) == iterations and all(row["tokens_seen"] for row in history["history"])
    assert all(isinstance(row["icl_score"], float) and row["test_loss"] > 0 for row in history["history"])
    assert set(history["history"][0]["heads"]["0.0"]) >= {"previous_token", "induction", "copying"}
    assert "head history of" in invoke("heads", out, "--history").output
    circuits = json.loads(invoke("heads", out / "checkpoint", "--tokens", "--head", "0.1", "--json").output)
    assert [(h["layer"], h["head"]) for h in circuits["heads"]] == [(0, 1)] and circuits["heads"][0]["ov"]
    assert "OV: a token attended to raises" in invoke("heads", out, "--tokens").output
    atlas = invoke("heads", out).output
    assert "ablate: held-out" in atlas  # the last iteration always ablates
    bad = invoke("heads", out, "--tokens", "--head", "7.7")
    assert bad.exit_code == 2 and "--head 7.7 is not a head of" in bad.stderr


def test_the_matters_threshold_can_be_changed_when_reading(reviews_file, tmp_path):
    out = tmp_path / "run"
    assert invoke("train", reviews_file, *SMALL, "--out", out).exit_code == 0
    everything = json.loads(invoke("heads", out, "--matters-threshold", "-1", "--json").output)
    nothing = json.loads(invoke("heads", out, "--matters-threshold", "100", "--json").output)
    assert len(everything["heads"]) == len(nothing["heads"]) > 0
    assert all("matters" in h["labels"] for h in everything["heads"])
    assert not any("matters" in h["labels"] for h in nothing["heads"])
