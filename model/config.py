"""Typed, validated configuration for the model, its data and its training.

Defaults are the study's values (d_model 256, 8 heads, 1 layer, seq_len 20,
lr 1e-4, batch 50, AdamW). Fields a user can set carry their user-facing key
(`trial_key`): it is the `--grid` key of a sweep and, with dashes, the flag of
`sweep train`, so both command lines are built from these dataclasses alone.
A failed check raises `ConfigError` naming the offending values; it renders
them as flags (`--heads 3`) unless the caller renders them its own way
(`--grid heads=3` on a sweep).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

MAX_SEQ_LEN = 4096  # size cap of the learned positional table


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the setting and the fix.

    `template` may hold `{field}` placeholders for dataclass fields whose
    values are in `values`; `render` fills them in, by default as flags.
    """

    def __init__(self, template: str, values: dict[str, Any] | None = None) -> None:
        self.template = template
        self.values = dict(values or {})
        super().__init__(self.render(flag_form))

    def render(self, name_value: Callable[[str, Any], str]) -> str:
        return self.template.format(**{name: name_value(name, value) for name, value in self.values.items()})


class NonFiniteLossError(RuntimeError):
    """Training diverged; the message starts with `nan_loss` so sweeps can tell it apart."""


class CheckpointError(ValueError):
    """A folder that is not a readable checkpoint."""


def setting(default: Any, key: str | None = None, help: str = "") -> Any:
    """A dataclass field; `key` makes it a user setting (grid key and `sweep train` flag)."""
    return field(default=default, metadata={"trial_key": key, "help": help} if key else {})


def trial_key_of(field_name: str) -> str:
    """The user-facing key of a dataclass field (n_heads -> heads); the field name if it has none."""
    for cls in (ModelConfig, TrainConfig, DataConfig):
        for item in dataclasses.fields(cls):
            if item.name == field_name and item.metadata.get("trial_key"):
                return item.metadata["trial_key"]
    return field_name


def flag_form(field_name: str, value: Any) -> str:
    """`--heads 3`: how `sweep train` and the dataclasses name a value."""
    return f"--{trial_key_of(field_name).replace('_', '-')} {value}"


def _require(condition: bool, template: str, **values: Any) -> None:
    if not condition:
        raise ConfigError(template, values)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only transformer."""

    vocab_size: int = 50257
    """Number of token ids the embedding and unembedding cover."""
    d_model: int = setting(256, "d_model", "Residual stream width.")
    n_heads: int = setting(8, "heads", "Attention heads per layer; must divide d_model.")
    n_layers: int = setting(1, "layers", "Transformer blocks.")
    mlp: bool = setting(False, "mlp", "Add an MLP after attention in each block (attention-only by default).")
    d_mlp: int = 0
    """MLP hidden width; 0 means 4 * d_model."""
    seq_len: int = setting(20, "seq_len", "Context length (and size of the positional table).")
    norm: Literal["ln", "none"] = "ln"
    """Pre-norm LayerNorm in each block and before the unembedding, or none."""

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 2, "{vocab_size} must be >= 2", vocab_size=self.vocab_size)
        _require(self.d_model >= 1, "{d_model} must be positive", d_model=self.d_model)
        _require(self.n_heads >= 1, "{n_heads} must be positive", n_heads=self.n_heads)
        _require(
            self.d_model % self.n_heads == 0,
            "{n_heads} does not divide {d_model}; pick heads that divide the embedding size",
            n_heads=self.n_heads, d_model=self.d_model,
        )
        _require(self.n_layers >= 1, "{n_layers} must be positive", n_layers=self.n_layers)
        _require(self.d_mlp >= 0, "{d_mlp} must be >= 0", d_mlp=self.d_mlp)
        _require(
            2 <= self.seq_len <= MAX_SEQ_LEN, f"{{seq_len}} must be between 2 and {MAX_SEQ_LEN}", seq_len=self.seq_len
        )
        _require(self.norm in ("ln", "none"), "{norm} must be 'ln' or 'none'", norm=self.norm)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model

    @property
    def parameter_count(self) -> int:
        """Parameters of the Transformer of this shape (what a snapshot stores), counted without torch."""
        d, norm = self.d_model, (2 * self.d_model if self.norm == "ln" else 0)
        block = norm + 4 * d * d  # LayerNorm, then Q, K, V and O without biases
        if self.mlp:
            block += norm + 2 * d * self.mlp_width + self.mlp_width + d
        return 2 * self.vocab_size * d + self.seq_len * d + norm + self.n_layers * block


@dataclass(frozen=True)
class Schedule:
    """How a run's tokens split into optimiser steps and iterations: the one count every caller uses."""

    tokens_per_step: int
    total_steps: int
    steps_per_iteration: int

    @property
    def iterations(self) -> int:
        """Evaluate-and-checkpoint iterations of the run (the last one may be shorter)."""
        return -(-self.total_steps // self.steps_per_iteration)

    @property
    def final_tokens(self) -> int:
        """tokens_seen when the run ends: whole steps, so at least max_tokens."""
        return self.total_steps * self.tokens_per_step


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation settings of one training run."""

    lr: float = setting(1e-4, "lr", "Peak AdamW learning rate.")
    batch_size: int = setting(50, "batch_size", "Sequences per optimiser step.")
    weight_decay: float = setting(0.01, "weight_decay", "AdamW weight decay on matrices (not on norms).")
    warmup_fraction: float = setting(0.05, "warmup_fraction", "Share of the steps spent warming the learning rate up.")
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate decay after warmup: cosine to 10% of the peak, or constant."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    max_tokens: int = setting(2_000_000, "max_tokens", "Training tokens of the whole run.")
    eval_every_tokens: int = setting(
        200_000, "eval_every_tokens", "Training tokens per iteration; evaluation and a checkpoint follow each."
    )
    eval_tokens: int = 50_000
    """Size of the fixed held-out sample of the test split used for evaluation."""
    seed: int = setting(0, "seed", "Seeds initialisation, data order and sampling.")
    device: str = "auto"
    """auto, cpu, cuda or cuda:N (--device); auto picks CUDA when present."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype: auto is bf16 on CUDA and on CPUs with native bf16, else fp32."""
    compile: bool = False
    """Wrap the model in torch.compile (--compile)."""
    threads: int = 0
    """CPU threads for torch (--threads); 0: the CPUs this process may run on."""
    snapshots: str = "log"
    """Snapshot schedule (--snapshots): log, log:N, every:TOKENS, token counts T1,T2,... or none (model.snapshots)."""
    snapshot_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the snapshot weights (--snapshot-dtype): bfloat16 halves their bytes."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "{lr} must be positive", lr=self.lr)
        _require(self.batch_size >= 1, "{batch_size} must be positive", batch_size=self.batch_size)
        _require(self.weight_decay >= 0, "{weight_decay} must be >= 0", weight_decay=self.weight_decay)
        _require(
            0 <= self.warmup_fraction < 1, "{warmup_fraction} must be in [0, 1)", warmup_fraction=self.warmup_fraction
        )
        _require(
            self.schedule in ("cosine", "constant"), "{schedule} must be 'cosine' or 'constant'", schedule=self.schedule
        )
        _require(self.grad_clip >= 0, "{grad_clip} must be >= 0", grad_clip=self.grad_clip)
        _require(self.max_tokens >= 1, "{max_tokens} must be positive", max_tokens=self.max_tokens)
        _require(
            self.eval_every_tokens >= 1,
            "{eval_every_tokens} must be positive",
            eval_every_tokens=self.eval_every_tokens,
        )
        _require(self.eval_tokens >= 1, "{eval_tokens} must be positive", eval_tokens=self.eval_tokens)
        _require(
            self.dtype in ("auto", "float32", "bfloat16"), "{dtype} must be auto, float32 or bfloat16", dtype=self.dtype
        )
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "{device} must be auto, cpu, cuda or cuda:N", device=self.device,
        )
        _require(self.threads >= 0, "{threads} must be >= 0", threads=self.threads)
        _require(self.snapshot_dtype in ("float32", "bfloat16"), "--snapshot-dtype must be float32 or bfloat16")
        parse_snapshots(self.snapshots)  # a ConfigError naming --snapshots when it is no schedule

    def schedule_for(self, seq_len: int) -> Schedule:
        """Steps and iterations of this run for windows of `seq_len` tokens; ConfigError when max_tokens is less
        than one optimizer step (the run would be one step of a whole batch, whatever it asked for)."""
        tokens_per_step = self.batch_size * seq_len
        _require(self.max_tokens >= tokens_per_step, "{max_tokens} is less than one step ({batch_size} x seq_len "
                 f"{seq_len} = {tokens_per_step:,} tokens); train for at least that many tokens",
                 max_tokens=self.max_tokens, batch_size=self.batch_size)
        return Schedule(
            tokens_per_step=tokens_per_step,
            total_steps=max(1, -(-self.max_tokens // tokens_per_step)),
            steps_per_iteration=max(1, -(-self.eval_every_tokens // tokens_per_step)),
        )

    def snapshot_steps(self, seq_len: int) -> list[int]:
        """Steps after which the run writes a snapshot (0: before training); ConfigError if it cannot honour them."""
        return snapshot_steps(parse_snapshots(self.snapshots), self.schedule_for(seq_len))

    def cpu_threads(self) -> int:
        """Threads torch should use: --threads, else every CPU this process may run on (taskset, cgroups)."""
        return self.threads or available_cpus()


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class DataConfig:
    """Which text to train on and how to turn it into token windows."""

    dataset: str = "imdb"
    """imdb, wikitext, wikitext-2, repeat, or a path to local files (DATASET)."""
    tokenizer: str = setting("gpt2", "tokenizer", "gpt2, bert, bpe:N, bytes or a tokenizer path.")
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
        _require(self.repeat_vocab >= 8, "{repeat_vocab} must be >= 8", repeat_vocab=self.repeat_vocab)
        if self.dataset == "repeat":
            # the task brings its own vocabulary: records say so rather than a tokenizer it never used
            object.__setattr__(self, "tokenizer", f"repeat:{self.repeat_vocab}")


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from the keys of `values` it knows, ignoring the rest."""
    names = {item.name for item in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in names})


# ---------------------------------------------------------------- the snapshot schedule
#
# Beside the schedule it is read against (Schedule): `--snapshots` is a TrainConfig setting, parsed and expanded to
# optimizer steps here, without torch; model.snapshots writes and reads the snapshots themselves.


DEFAULT_EVEN_SNAPSHOTS = 30


@dataclass(frozen=True)
class SnapshotSpec:
    """A parsed `--snapshots` value."""

    kind: str
    """log, every, tokens or none."""
    even: int = DEFAULT_EVEN_SNAPSHOTS
    """log: snapshots spaced evenly after the powers of two."""
    every_tokens: int = 0
    tokens: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        if self.kind == "log":
            return "log" if self.even == DEFAULT_EVEN_SNAPSHOTS else f"log:{self.even}"
        if self.kind == "every":
            return f"every:{self.every_tokens}"
        if self.kind == "tokens":
            return ",".join(str(t) for t in self.tokens)
        return "none"


def parse_snapshots(text: str) -> SnapshotSpec:
    """`log`, `log:N`, `every:TOKENS`, `T1,T2,...` or `none`; ConfigError naming --snapshots otherwise."""
    raw = str(text).strip().replace("_", "")
    kind, _, value = raw.partition(":")
    try:
        if raw == "none":
            return SnapshotSpec("none")
        if kind == "log":
            even = int(value) if value else DEFAULT_EVEN_SNAPSHOTS
            if even < 1:
                raise ValueError
            return SnapshotSpec("log", even=even)
        if kind == "every":
            every = _token_count(value)
            if every < 1:
                raise ValueError
            return SnapshotSpec("every", every_tokens=every)
        tokens = tuple(_token_count(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(
            f"--snapshots {text!r} is not a schedule: use log, log:N, every:TOKENS, "
            "a list of token counts (0,1e6,4e6) or none"
        ) from None
    if any(t < 0 for t in tokens):
        raise ConfigError(f"--snapshots {text!r}: token counts must be >= 0")
    if any(b <= a for a, b in zip(tokens, tokens[1:])):
        raise ConfigError(f"--snapshots {text!r}: token counts must increase")
    return SnapshotSpec("tokens", tokens=tokens)


def _token_count(text: str) -> int:
    """An integer token count; `4e6` and `4M` read as 4,000,000."""
    text = text.strip()
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1) if text else 1
    number = float(text[:-1] if scale != 1 else text)
    if not math.isfinite(number) or number != int(number * scale) / scale:
        raise ValueError(text)
    return int(round(number * scale))


def snapshot_steps(spec: SnapshotSpec, schedule: Schedule) -> list[int]:
    """The optimizer steps after which a run of `schedule` writes a snapshot (step 0: before training)."""
    last, per_step = schedule.total_steps, schedule.tokens_per_step
    if spec.kind == "none":
        return []
    if spec.kind == "log":
        spacing = max(1, math.ceil(last / spec.even))
        powers = [2**k for k in range(max(1, spacing).bit_length()) if 2**k < spacing]
        return sorted({0, *powers, *range(spacing, last, spacing), last})
    if spec.kind == "every":
        spacing = max(1, math.ceil(spec.every_tokens / per_step))
        return sorted({0, *range(spacing, last, spacing), last})
    final_tokens = schedule.final_tokens
    steps = []
    for tokens in spec.tokens:
        if tokens > final_tokens:
            raise ConfigError(
                f"--snapshots {spec.text}: {tokens:,} tokens is past the end of training ({final_tokens:,} tokens); "
                "list counts up to max_tokens"
            )
        step = math.ceil(tokens / per_step)
        if steps and step == steps[-1]:
            raise ConfigError(
                f"--snapshots {spec.text}: {tokens:,} tokens falls in the same step of {per_step:,} tokens "
                "as the count "
                "before it; space the counts at least a step apart"
            )
        steps.append(step)
    return steps
