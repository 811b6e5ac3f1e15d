"""Training: metrics, exact resume, checkpoints, divergence, safe loading."""

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

from model import CheckpointError, ModelConfig, NonFiniteLossError, TrainConfig, Trainer, load_checkpoint
from model.checkpoint import read_trainer_state
from model.config import DataConfig
from model.data import prepare_data
from model.metrics import REPORTED_METRICS

METRICS = {
    "train_loss", "test_loss", "test_accuracy", "test_perplexity", "tokens_seen", "tokens_per_second", "epoch", "lr",
    "induction_score_max", "prev_token_score_max", "first_token_score_max", "copying_score_max",
    "icl_score", "induction_formed_at", "prev_token_formed_at",
}


@pytest.fixture
def small_data(reviews_file):
    return prepare_data(DataConfig(dataset=str(reviews_file), tokenizer="bytes"), seq_len=16)


def make_trainer(data, **train_values) -> Trainer:
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2, seq_len=16)
    values = (
        dict(lr=3e-3, batch_size=8, max_tokens=2048, eval_every_tokens=512, eval_tokens=512, dtype="float32")
        | train_values
    )
    return Trainer(model_cfg, TrainConfig(**values), data.train, data.test, data.tokenizer)


def test_iterations_report_the_contract_metrics_and_loss_falls(small_data):
    trainer = make_trainer(small_data)
    history = []
    while not trainer.finished:
        history.append(trainer.train_iteration())
    assert len(history) == 4 == trainer.schedule.iterations
    assert all(set(m) == METRICS | {"head_scores"} for m in history)
    assert set(METRICS) == set(REPORTED_METRICS)  # what trials report is what --metric may name
    assert history[-1]["tokens_seen"] == 2048
    assert history[-1]["test_loss"] < history[0]["test_loss"] - 0.5
    assert all(np.isfinite([v for v in m.values() if isinstance(v, float)]).all() for m in history)
    # every head's scores at every iteration: the run's head history
    assert all(set(m["head_scores"]) == {f"{layer}.{head}" for layer in range(2) for head in range(4)} for m in history)
    # heavy analysis on a schedule: ablation on iteration 5k and the last, carried over in between
    ablated_at = trainer.heads_document["ablation_tokens_seen"]
    assert ablated_at == 2048 and all("ablation" in h for h in trainer.heads_document["heads"])


def test_resume_continues_exactly(small_data, tmp_path):
    straight = make_trainer(small_data)
    while not straight.finished:
        straight_metrics = straight.train_iteration()

    first = make_trainer(small_data)
    first.train_iteration()
    first.train_iteration()
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = make_trainer(small_data)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.tokens_seen == first.tokens_seen
    while not resumed.finished:
        resumed_metrics = resumed.train_iteration()
    assert resumed_metrics["train_loss"] == pytest.approx(straight_metrics["train_loss"], abs=1e-5)
    assert resumed_metrics["test_loss"] == pytest.approx(straight_metrics["test_loss"], abs=1e-5)
    # the head history carried by the checkpoint goes on: every iteration once, as in the straight run
    assert (
        [row["iteration"] for row in resumed.history] == [row["iteration"] for row in straight.history] == [1, 2, 3, 4]
    )
    assert json.loads((tmp_path / "ckpt" / "history.json").read_text()) == first.history


def test_checkpoint_round_trip_gives_the_same_loss(small_data, tmp_path):
    trainer = make_trainer(small_data)
    trainer.train_iteration()
    trainer.save_checkpoint(tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "trainer_state.pt",
        "heads.json",
        "heatmaps",
        "sample.txt",
    } <= names
    net = load_checkpoint(tmp_path / "ckpt")
    batch = torch.as_tensor(small_data.test[:8]).long()
    _, loss = net(batch[:, :-1], batch[:, 1:])
    trainer.model.eval()
    _, expected = trainer.model(batch[:, :-1], batch[:, 1:])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model"]["d_model"] == 32 and config["train"]["lr"] == 3e-3


def test_diverging_loss_stops_with_nan_loss(small_data):
    trainer = make_trainer(small_data, lr=1e4, grad_clip=0.0, warmup_fraction=0.0)
    with pytest.raises(NonFiniteLossError, match="^nan_loss"):
        while not trainer.finished:
            trainer.train_iteration()


def test_the_step_trains_on_the_same_rows_to_the_same_losses_as_a_plain_loop(small_data):
    """The step slices the epoch's permutation on the device and never asks it about padding or a non-finite loss:
    the same rows (the seeded numpy permutation, an epoch boundary crossed mid-batch) and the same losses, to the
    last digit, as a plain loop that builds the rows on the host and checks every loss at once."""
    size = 900  # rows a step: the windows' epoch ends inside the fourth batch
    trainer = make_trainer(small_data, batch_size=size, max_tokens=4 * size * 16)
    reference = make_trainer(small_data, batch_size=size, max_tokens=4 * size * 16)
    count = reference.train_windows.shape[0]
    assert 3 * size < count < 4 * size, count
    ours, theirs = [], []
    for step in range(4):
        ours.append(float(trainer.train_steps(step + 1)))
        sample = np.arange(step * size, (step + 1) * size)
        epochs, offsets = np.divmod(sample, count)
        rows = np.array([np.random.default_rng([0, int(e)]).permutation(count)[o] for e, o in zip(epochs, offsets)])
        assert torch.equal(trainer._batch_indices(step).cpu(), torch.from_numpy(rows))
        windows = reference.train_windows[torch.from_numpy(rows)].long()
        reference.model.train()
        loss = reference.model.training_loss(windows[:, :-1], windows[:, 1:])
        assert torch.isfinite(loss)
        reference.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.model.parameters(), reference.train_cfg.grad_clip)
        reference.optimizer.step()
        reference.scheduler.step()
        theirs.append(float(loss))
    assert ours == theirs


def test_a_non_finite_loss_stops_the_run_at_its_step_and_writes_no_snapshot_after_it(small_data, tmp_path):
    from model.snapshots import FolderSnapshots, list_snapshots

    trainer = make_trainer(small_data, snapshots="every:128", max_tokens=1024, eval_every_tokens=1024)
    trainer.attach_snapshots(FolderSnapshots(tmp_path / "snapshots"))
    honest, calls = trainer.training_loss, []

    def poisoned(*args):
        calls.append(1)
        loss = honest(*args)
        return loss * float("nan") if len(calls) == 4 else loss  # step 3 (from 0) goes non-finite

    trainer.training_loss = poisoned
    with pytest.raises(NonFiniteLossError, match=r"^nan_loss: training loss became nan at step 3 \(tokens_seen 384\)"):
        trainer.train_iteration()
    written = [row["step"] for row in list_snapshots(tmp_path / "snapshots")]
    assert written == [0, 1, 2, 3]  # the weights after step 3's update are poisoned: no snapshot of them


class Bomb:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_bomb_in_checkpoint_is_refused(small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(small_data)
    trainer.save_checkpoint(tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / "trainer_state.pt", "wb") as handle:
        pickle.dump({"step": Bomb()}, handle)
    with pytest.raises(CheckpointError, match="refused by the weights-only loader"):
        read_trainer_state(tmp_path / "ckpt")
    with pytest.raises(CheckpointError):
        make_trainer(small_data).load_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "PWNED").exists()


def test_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(tmp_path)


def test_an_iteration_whose_report_was_lost_is_read_from_the_checkpoint_history(small_data, tmp_path):
    """A worker that dies after storing its checkpoint but before its report reaches the driver leaves a gap in
    result.json; the trial resumes from that checkpoint, whose history.json still holds the iteration."""
    from sweep.results import head_history
    from sweep.storage import open_storage

    trainer = make_trainer(small_data)
    while not trainer.finished:
        trainer.train_iteration()
    trial = tmp_path / "lost" / "trial_a_00000"
    trainer.save_checkpoint(trial / "checkpoint_000003")
    (tmp_path / "lost" / "sweep.json").write_text(json.dumps({"created": "2026-11-28T00:00:00"}))
    reported = [
        {
            "training_iteration": row["iteration"],
            "tokens_seen": row["tokens_seen"],
            "head_scores": row["heads"],
            "config": {},
        }
        for row in trainer.history
        if row["iteration"] != 3
    ]
    (trial / "result.json").write_text("".join(json.dumps(line) + "\n" for line in reported))
    _, rows = head_history("lost", "a_00000", open_storage(str(tmp_path)))
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    assert rows[2]["heads"] == trainer.history[2]["heads"] and rows[2]["tokens_seen"] == 1536


def test_heatmap_pictures_come_with_the_last_checkpoint_and_are_drawn_from_patterns_before_it(small_data, tmp_path):
    from click.testing import CliRunner

    from model.analysis import png_heatmaps
    from sweep.cli import main

    trainer = make_trainer(small_data)  # 4 iterations; pictures in the last checkpoint only
    trainer.analysis_cfg = dataclasses.replace(trainer.analysis_cfg, circuits_every=1)  # heavy analysis every time
    trainer.train_iteration()
    between = trainer.save_checkpoint(tmp_path / "first")
    patterns = json.loads((between / "heatmaps" / "patterns.json").read_text())
    assert not list((between / "heatmaps").glob("*.png")) and len(patterns["predictions"]) == len(patterns["tokens"])
    while not trainer.finished:
        trainer.train_iteration()
    last = trainer.save_checkpoint(tmp_path / "last")
    assert {p.name for p in (last / "heatmaps").glob("*.png")} == set(png_heatmaps(json.loads(
        (last / "heatmaps" / "patterns.json").read_text())))  # 8 heads and 2 layer grids
    # a reader of the checkpoint in between draws the same pictures from its patterns.json
    drawn = CliRunner().invoke(main, ["heatmaps", str(between), "--out", str(tmp_path / "maps")])
    assert drawn.exit_code == 0, drawn.output
    assert len(list((tmp_path / "maps").glob("layer*_head*.png"))) == 8 and (tmp_path / "maps" / "layer1.png").is_file()


def test_a_compiled_trainer_trains_and_evaluates_like_the_eager_one(small_data):
    eager, compiled = make_trainer(small_data, max_tokens=512), make_trainer(small_data, max_tokens=512, compile=True)
    first, second = eager.train_iteration(), compiled.train_iteration()
    assert second["test_loss"] == pytest.approx(first["test_loss"], abs=2e-3)  # fp32: the same steps, fused
    assert second["tokens_seen"] == first["tokens_seen"] == 512
