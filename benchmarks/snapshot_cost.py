"""What snapshots cost: their overhead on training, their bytes, `sweep analyse`'s throughput, and
reading a 1,000-trial x 40-snapshot analysis table.

- Overhead: seconds of one snapshot write (weights to safetensors bytes, written whole to a local
  folder) against seconds of the real trial loop's steps, scaled to the preset trial's step and
  snapshot counts (`--snapshots log`). Ratio = snapshot seconds / training seconds of a whole trial.
- Analyse: seconds to measure one snapshot (loss and scores, one thread, as a Ray task does).
- Table: a synthetic table of 1,000 trials x 40 snapshots x 8 heads of scores written as 20 parts,
  then read back and reduced to formed_at, as atlas, results and the report do.

    python benchmarks/snapshot_cost.py
    python benchmarks/snapshot_cost.py --smoke-test
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.config import ModelConfig, TrainConfig, parse_snapshots, snapshot_steps
from model.measures import Probe, measure_model
from model.snapshots import FolderSnapshots, snapshot_files
from model.tokenizers import TextTokenizer, byte_tokenizer
from model.train import Trainer

# name -> (vocab, d_model, heads, layers, seq_len, batch, max_tokens): the presets' trials
SHAPES = {
    "smoke": (2048, 32, 4, 1, 32, 32, 200_000),
    "induction (2 layers)": (66, 64, 4, 2, 64, 32, 12_000_000),
    "paper (largest)": (50257, 256, 8, 2, 80, 50, 20_000_000),
}


def trainer_for(shape: tuple, threads: int) -> Trainer:
    vocab, d_model, heads, layers, seq_len, batch, max_tokens = shape
    windows = np.random.default_rng(0).integers(0, vocab, size=(4096, seq_len + 1), dtype=np.int32)
    tokenizer = TextTokenizer(byte_tokenizer(), "bytes")
    model_cfg = ModelConfig(
        vocab_size=max(vocab, tokenizer.vocab_size), d_model=d_model, n_heads=heads, n_layers=layers, seq_len=seq_len
    )
    train_cfg = TrainConfig(
        batch_size=batch, max_tokens=max_tokens, eval_every_tokens=max_tokens, threads=threads, snapshots="none"
    )
    return Trainer(model_cfg, train_cfg, windows, windows[:1024], tokenizer)


def step_seconds(trainer: Trainer, steps: int) -> float:
    """Seconds of one step of the trial loop (forward, backward, AdamW), after warm-up."""
    trainer.model.train()

    def run(count: int) -> None:
        for step in range(count):
            windows = trainer.train_windows[trainer._batch_indices(step)].long()
            with trainer._autocast():
                loss = trainer.training_loss(windows[:, :-1], windows[:, 1:])
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()

    run(3)
    started = time.perf_counter()
    run(steps)
    return (time.perf_counter() - started) / steps


def overhead(name: str, shape: tuple, steps: int, writes: int, threads: int) -> None:
    trainer = trainer_for(shape, threads)
    per_step = step_seconds(trainer, steps)
    schedule = trainer.schedule
    count = len(snapshot_steps(parse_snapshots("log"), schedule))
    config = trainer.run_config()
    with tempfile.TemporaryDirectory() as folder:
        writer = FolderSnapshots(Path(folder))
        started = time.perf_counter()
        for index in range(writes):
            writer.write(f"step_{index:07d}", snapshot_files(trainer.model, index, 0, config, "float32"))
        per_write = (time.perf_counter() - started) / writes
        size = sum(p.stat().st_size for p in Path(folder, "step_0000000").iterdir())
    training = per_step * schedule.total_steps
    print(
        f"{name:22s} {schedule.total_steps:6d} steps x {per_step * 1e3:7.2f} ms = {training:8.1f} s training; "
        f"{count} snapshots x {per_write * 1e3:6.1f} ms = {count * per_write:5.2f} s "
        f"(ratio {count * per_write / training:.4f}); {size / 1e6:7.2f} MB each, {count * size / 1e6:8.1f} MB a trial"
    )


def analyse_rate(repeats: int) -> None:
    trainer = trainer_for(SHAPES["induction (2 layers)"], threads=1)
    windows = np.random.default_rng(1).integers(0, 66, size=(800, 65), dtype=np.int32)
    probe = Probe(torch.as_tensor(windows))
    torch.set_num_threads(1)
    for names in (("loss", "scores"), ("loss", "scores", "ablation", "composition")):
        measure_model(trainer.model, probe, names)
        started = time.perf_counter()
        for _ in range(repeats):
            measure_model(trainer.model, probe, names)
        per = (time.perf_counter() - started) / repeats
        print(
            f"analyse {'+'.join(names):34s} {per:.3f} s a snapshot on 1 thread: "
            f"{2 / per:.1f} snapshots/s with 2 tasks at once"
        )


def table_read(trials: int, snapshots: int, parts: int) -> None:
    from sweep.table import SCHEMA, formed_at

    heads, names = 8, ("previous_token", "induction", "duplicate_token", "first_token", "current_token", "copying")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        per_part = trials // parts
        started = time.perf_counter()
        for part in range(parts):
            count = per_part * snapshots * heads * len(names)
            trial = np.repeat(np.arange(part * per_part, (part + 1) * per_part), snapshots * heads * len(names))
            step = np.tile(np.repeat(np.arange(snapshots) * 100, heads * len(names)), per_part)
            columns = {
                "trial": pa.array([f"t{t:05d}" for t in trial]),
                "step": step,
                "tokens_seen": step * 2048,
                "layer": np.tile(np.repeat(np.arange(heads) // 4, len(names)), per_part * snapshots).astype(np.int16),
                "head": np.tile(np.repeat(np.arange(heads) % 4, len(names)), per_part * snapshots).astype(np.int16),
                "measure": pa.array(np.tile(np.array(names), per_part * snapshots * heads)),
                "value": rng.random(count),
                "analysis": pa.array(["scores"] * count),
                "version": np.ones(count, dtype=np.int32),
            }
            pq.write_table(pa.table(columns, schema=SCHEMA), f"{folder}/part-{part:03d}.parquet", compression="zstd")
        written = time.perf_counter() - started
        size = sum(p.stat().st_size for p in Path(folder).iterdir())
        started = time.perf_counter()
        table = pa.concat_tables(
            pq.read_table(p, columns=["trial", "step", "tokens_seen", "measure", "value", "analysis"])
            for p in sorted(Path(folder).iterdir())
        )
        read = time.perf_counter() - started
        started = time.perf_counter()
        formed = formed_at(table)
        reduced = time.perf_counter() - started
    print(
        f"table of {trials} trials x {snapshots} snapshots: {table.num_rows:,} rows in {parts} parts, "
        f"{size / 1e6:.1f} MB "
        f"(written in {written:.1f} s); read {read:.2f} s, formed_at of {len(formed)} trials {reduced:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="A few steps of each, to check the script runs.")
    parser.add_argument(
        "--threads", type=int, default=1, help="Torch threads a trial uses (1: two trials share 2 cores)."
    )
    args = parser.parse_args()
    steps, writes, repeats = (2, 2, 1) if args.smoke_test else (30, 10, 5)
    torch.set_num_threads(args.threads)
    for name, shape in SHAPES.items():
        overhead(name, shape, steps, writes, args.threads)
    analyse_rate(repeats)
    table_read(*((20, 5, 2) if args.smoke_test else (1000, 40, 20)))


if __name__ == "__main__":
    main()
