"""Typed, validated configuration for the model, its data and its training.

Defaults are the study's values (d_model 256, 8 heads, 1 layer, seq_len 20,
lr 1e-4, batch 50, AdamW). Every check raises `ConfigError` with a message that
names the command-line flag, so the CLI can print it as one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

MAX_SEQ_LEN = 4096  # size cap of the learned positional table


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the flag and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only transformer."""

    vocab_size: int = 50257
    """Number of token ids the embedding and unembedding cover."""
    d_model: int = 256
    """Width of the residual stream (--d-model)."""
    n_heads: int = 8
    """Attention heads per layer (--heads); must divide d_model."""
    n_layers: int = 1
    """Number of blocks (--layers)."""
    mlp: bool = False
    """Add an MLP after attention in each block (--mlp/--no-mlp)."""
    d_mlp: int = 0
    """MLP hidden width; 0 means 4 * d_model."""
    seq_len: int = 20
    """Context length and size of the positional table (--seq-len)."""
    norm: Literal["ln", "none"] = "ln"
    """Pre-norm LayerNorm in each block and before the unembedding, or none."""

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        _require(self.d_model >= 1, f"--d-model must be positive, got {self.d_model}")
        _require(self.n_heads >= 1, f"--heads must be positive, got {self.n_heads}")
        _require(
            self.d_model % self.n_heads == 0,
            f"--heads {self.n_heads} does not divide --d-model {self.d_model}; "
            "pick heads that divide the embedding size",
        )
        _require(self.n_layers >= 1, f"--layers must be positive, got {self.n_layers}")
        _require(self.d_mlp >= 0, f"d_mlp must be >= 0, got {self.d_mlp}")
        _require(
            2 <= self.seq_len <= MAX_SEQ_LEN,
            f"--seq-len must be between 2 and {MAX_SEQ_LEN}, got {self.seq_len}",
        )
        _require(self.norm in ("ln", "none"), f"norm must be 'ln' or 'none', got {self.norm!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation settings of one training run."""

    lr: float = 1e-4
    """Peak AdamW learning rate (--lr)."""
    batch_size: int = 50
    """Sequences per optimiser step (--batch-size)."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on norms)."""
    warmup_fraction: float = 0.05
    """Share of the steps spent warming the learning rate up linearly."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate decay after warmup: cosine to 10% of the peak, or constant."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    max_tokens: int = 2_000_000
    """Training tokens of the whole run (--max-tokens)."""
    eval_every_tokens: int = 200_000
    """Training tokens per iteration; evaluation and a checkpoint follow each (--eval-every-tokens)."""
    eval_tokens: int = 50_000
    """Size of the fixed held-out sample of the test split used for evaluation."""
    seed: int = 0
    """Seeds initialisation, data order and sampling (--seed)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N (--device); auto picks CUDA when present."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype: auto is bf16 on CUDA and on CPUs with native bf16, else fp32."""
    compile: bool = False
    """Wrap the model in torch.compile (--compile)."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _require(self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(
            0 <= self.warmup_fraction < 1,
            f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}",
        )
        _require(
            self.schedule in ("cosine", "constant"),
            f"schedule must be 'cosine' or 'constant', got {self.schedule!r}",
        )
        _require(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        _require(self.max_tokens >= 1, f"--max-tokens must be positive, got {self.max_tokens}")
        _require(
            self.eval_every_tokens >= 1,
            f"--eval-every-tokens must be positive, got {self.eval_every_tokens}",
        )
        _require(self.eval_tokens >= 1, f"eval_tokens must be positive, got {self.eval_tokens}")
        _require(
            self.dtype in ("auto", "float32", "bfloat16"),
            f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}",
        )
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )

    @property
    def iterations(self) -> int:
        """Number of evaluate-and-checkpoint iterations the run makes."""
        return -(-self.max_tokens // self.eval_every_tokens)


@dataclass(frozen=True)
class DataConfig:
    """Which text to train on and how to turn it into token windows."""

    dataset: str = "imdb"
    """imdb, wikitext, wikitext-2, repeat, or a path to local files (DATASET)."""
    tokenizer: str = "gpt2"
    """gpt2, bert, bpe:N, bytes, or a path to a tokenizer (--tokenizer)."""
    text_column: str = "text"
    """Column holding the text in parquet / jsonl files (--text-column)."""
    train_split: str = "train"
    """Split trained on (--train-split)."""
    test_split: str = "test"
    """Held-out split evaluated on (--test-split)."""
    clean: bool = False
    """Lowercase and strip `<br />` as the study did (--clean)."""
    pack: bool = True
    """Join documents and cut windows so no token is lost; off truncates and pads (--no-pack)."""
    repeat_vocab: int = 64
    """Vocabulary of the synthetic `repeat` task; about the window size, so most tokens recur in a window."""

    def __post_init__(self) -> None:
        _require(bool(self.dataset), "DATASET must not be empty")
        _require(bool(self.text_column), "--text-column must not be empty")
        _require(self.repeat_vocab >= 8, f"repeat_vocab must be >= 8, got {self.repeat_vocab}")


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from the keys of `values` it knows, ignoring the rest."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in names})
