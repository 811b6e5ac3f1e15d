"""Training tokens/s: the study's step vs our trial loop, measured side by side in one run.

The study's step is rebuilt faithfully: one nn.MultiheadAttention layer called
with need_weights=True and average_attn_weights=False, a key padding mask on id
0 plus a causal mask, a token embedding with max_norm=1, learned positions, a
full-vocabulary nn.Linear unembedding, and nn.CrossEntropyLoss against one-hot
float targets; AdamW lr 1e-4, batch 50. TransformerLens runs its
HookedTransformer (attn_only=True, same shape) through the same loop.
Peak RSS after each measurement is printed too (it only grows within a
process, so read it as "at most").

    python benchmarks/train_throughput.py            # both shapes
    python benchmarks/train_throughput.py --smoke-test
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from torch import nn

from model.config import ModelConfig, TrainConfig
from model.tokenizers import TextTokenizer, byte_tokenizer
from model.train import Trainer

SHAPES = {
    "study (vocab 50257, seq 20)": dict(vocab=50257, seq_len=20),
    "offline (bpe:8192, seq 80)": dict(vocab=8192, seq_len=80),
}
D_MODEL, HEADS, BATCH = 256, 8, 50


class StudyModel(nn.Module):
    def __init__(self, vocab: int, seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, D_MODEL, max_norm=1)
        self.pos = nn.Embedding(seq_len, D_MODEL)
        self.attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.unembed = nn.Linear(D_MODEL, vocab)

    def forward(self, tokens):
        seq_len = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(seq_len))
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
        out, weights = self.attn(
            x, x, x, key_padding_mask=tokens == 0, attn_mask=causal, need_weights=True, average_attn_weights=False
        )
        return self.unembed(out + x)


def study_tokens_per_second(vocab: int, seq_len: int, steps: int, windows: torch.Tensor) -> float:
    torch.manual_seed(0)
    model = StudyModel(vocab, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    def step(i):
        batch = windows[(i * BATCH) % (len(windows) - BATCH):][:BATCH]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        one_hot = torch.nn.functional.one_hot(targets, vocab).float()
        loss = loss_fn(logits.reshape(-1, vocab), one_hot.reshape(-1, vocab))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step(0)  # warm-up
    started = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return steps * BATCH * seq_len / (time.perf_counter() - started)


def transformer_lens_tokens_per_second(vocab: int, seq_len: int, steps: int, windows: torch.Tensor) -> float:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=D_MODEL, n_heads=HEADS, d_head=D_MODEL // HEADS, n_ctx=seq_len + 1, d_vocab=vocab,
        attn_only=True, normalization_type="LN", positional_embedding_type="standard", device="cpu", seed=0,
    )
    model = HookedTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(i):
        batch = windows[(i * BATCH) % (len(windows) - BATCH):][:BATCH]
        loss = model(batch, return_type="loss")  # seq_len + 1 tokens: seq_len next-token predictions
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)
    started = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return steps * BATCH * seq_len / (time.perf_counter() - started)


def peak_memory() -> str:
    """Peak RSS of this process, and peak allocated GPU memory when there is a GPU."""
    note = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB"
    if torch.cuda.is_available():
        note += f", peak GPU allocated {torch.cuda.max_memory_allocated() / 2**20:,.0f} MB"
    return note


def our_tokens_per_second(vocab: int, seq_len: int, steps: int, windows: np.ndarray, compile: bool) -> float:
    model_cfg = ModelConfig(vocab_size=vocab, d_model=D_MODEL, n_heads=HEADS, n_layers=1, seq_len=seq_len)
    tokens = BATCH * seq_len
    train_cfg = TrainConfig(
        lr=1e-4,
        batch_size=BATCH,
        max_tokens=tokens * (steps + 1) * 2,
        eval_every_tokens=tokens * steps,
        eval_tokens=tokens,
        compile=compile,
    )
    tokenizer = TextTokenizer(byte_tokenizer(), "bytes")  # only its vocab size matters here
    trainer = Trainer(model_cfg, train_cfg, windows, windows[:64], tokenizer)
    trainer.steps_per_iteration = 3
    trainer.train_iteration()  # warm-up (and compilation)
    trainer.steps_per_iteration = steps
    return trainer.train_iteration()["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke-test", action="store_true", help="3 steps per measurement")
    args = parser.parse_args()
    steps = 3 if args.smoke_test else args.steps
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {steps} steps each, d_model {D_MODEL}, {HEADS} "
        f"heads, batch {BATCH}"
    )
    for name, shape in SHAPES.items():
        rng = np.random.default_rng(0)
        windows = rng.integers(1, shape["vocab"], size=(4096, shape["seq_len"] + 1), dtype=np.int32)
        study = study_tokens_per_second(shape["vocab"], shape["seq_len"], steps, torch.as_tensor(windows).long())
        print(f"{name}: study step {study:8,.0f} tok/s ({peak_memory()})", flush=True)
        lens = transformer_lens_tokens_per_second(
            shape["vocab"], shape["seq_len"], steps, torch.as_tensor(windows).long()
        )
        print(f"{name}: TransformerLens {lens:8,.0f} tok/s ({lens / study:4.2f}x)", flush=True)
        eager = our_tokens_per_second(shape["vocab"], shape["seq_len"], steps, windows, compile=False)
        print(
            f"{name}: trial loop {eager:8,.0f} tok/s ({eager / study:4.2f}x study, {eager / lens:4.2f}x "
            "TransformerLens)",
            flush=True,
        )
        compiled = our_tokens_per_second(shape["vocab"], shape["seq_len"], steps, windows, compile=True)
        print(
            f"{name}: trial loop compiled {compiled:8,.0f} tok/s ({compiled / study:4.2f}x study, "
            f"{compiled / lens:4.2f}x TransformerLens)"
            f" ({peak_memory()})",
            flush=True,
        )


if __name__ == "__main__":
    main()
