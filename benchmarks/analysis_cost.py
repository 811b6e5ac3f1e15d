"""Seconds of per-iteration analysis against seconds of training, at the smoke, induction and paper shapes.

An iteration trains `eval_every_tokens` tokens, evaluates, then analyses the
heads. The light analysis (pattern, copying and composition scores, the head
history) runs every iteration; the heavy one (mean ablation of every head and
the token tables of circuits.json) every `circuits_every` iterations and on the
last. Training time per iteration is measured from steps of the real trial loop
and scaled to the iteration's step count; all in one process, one after the other.

    python benchmarks/analysis_cost.py
    python benchmarks/analysis_cost.py --smoke-test
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from model.analysis import AnalysisConfig, head_scores
from model.config import ModelConfig, TrainConfig
from model.tokenizers import TextTokenizer, byte_tokenizer
from model.train import Trainer

# name -> (vocab, d_model, heads, layers, seq_len, batch, eval_every_tokens): the presets' shapes
SHAPES = {
    "smoke": (2048, 32, 4, 1, 32, 32, 50_000),
    "induction": (66, 64, 4, 2, 64, 32, 1_000_000),
    "paper (largest)": (50257, 256, 8, 2, 80, 50, 1_000_000),
}


def seconds(function, repeats: int) -> float:
    function()  # warm up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def measure(name: str, shape: tuple, steps: int, repeats: int) -> None:
    vocab, d_model, heads, layers, seq_len, batch, eval_every = shape
    rng = np.random.default_rng(0)
    windows = rng.integers(0, vocab, size=(4096, seq_len + 1), dtype=np.int32)
    tokenizer = TextTokenizer(byte_tokenizer(), "bytes")
    model_cfg = ModelConfig(
        vocab_size=max(vocab, tokenizer.vocab_size), d_model=d_model, n_heads=heads, n_layers=layers, seq_len=seq_len
    )
    train_cfg = TrainConfig(
        batch_size=batch, max_tokens=steps * batch * seq_len, eval_every_tokens=steps * batch * seq_len
    )
    trainer = Trainer(model_cfg, train_cfg, windows, windows[:1024], tokenizer)
    cfg = AnalysisConfig()
    started = time.perf_counter()
    while trainer.step < steps:  # the trial loop's own steps, without the analysis at the iteration's end
        batch_windows = trainer.train_windows[trainer._batch_indices(trainer.step)].long()
        with trainer._autocast():
            loss = trainer.training_loss(batch_windows[:, :-1], batch_windows[:, 1:])
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        trainer.step += 1
    step_seconds = (time.perf_counter() - started) / steps
    iteration_steps = -(-eval_every // (batch * seq_len))
    train_seconds = step_seconds * iteration_steps + seconds(trainer.evaluate, 1)
    light = seconds(lambda: head_scores(trainer.model, trainer.eval_windows, cfg), repeats)
    ablation = seconds(lambda: head_scores(trainer.model, trainer.eval_windows, cfg, ablate=True), repeats) - light
    tables = seconds(trainer.token_tables, repeats)
    heavy = ablation + tables
    amortised = light + heavy / cfg.circuits_every
    print(
        f"{name:16s} iteration {train_seconds:7.2f} s training | light {light:6.3f} s ({light / train_seconds:6.2%}) | "
        f"heavy {heavy:6.2f} s (ablation {ablation:5.2f}, tables {tables:5.2f}; {heavy / train_seconds:6.2%}) | "
        f"every iteration with heavy every {cfg.circuits_every}: {amortised / train_seconds:6.2%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="a few steps of the smallest shape only")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, shape in SHAPES.items():
        measure(name, shape, steps=3 if args.smoke_test else 30, repeats=1 if args.smoke_test else 3)
        if args.smoke_test:
            break


if __name__ == "__main__":
    main()
