"""Presets and --grid overrides: the hyperparameter grid of a sweep.

A trial's config is a flat dict of plain values (the keys below plus the data
options); `trial_configs` turns it into the model's dataclasses.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from model.config import ConfigError, DataConfig, ModelConfig, TrainConfig

# --grid key -> parser of one value
GRID_KEYS = {
    "seq_len": int,
    "lr": float,
    "heads": int,
    "d_model": int,
    "layers": int,
    "mlp": "bool",
    "tokenizer": str,
    "batch_size": int,
    "max_tokens": int,
    "eval_every_tokens": int,
    "seed": int,
}
# Keys every trial config carries, with defaults when neither preset nor grid sets them.
TRIAL_DEFAULTS: dict[str, Any] = {
    "seq_len": 20, "lr": 1e-4, "heads": 8, "d_model": 256, "layers": 1, "mlp": False, "tokenizer": "gpt2",
    "batch_size": 50, "max_tokens": 2_000_000, "eval_every_tokens": 200_000, "seed": 0, "compile": False,
}


@dataclass(frozen=True)
class Preset:
    """A named grid: axes searched, values held fixed, and the dataset it was made for."""

    description: str
    axes: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    early_stopping: bool = True
    """ASHA stops weak trials; off for grids that are comparisons, where every trial must finish."""


PRESETS = {
    # The study's grid: 3 x 2 x 2 x 2 x 2 x 2 = 96 trials. An iteration is a fixed
    # token budget, so ASHA can act inside the long WikiText epochs.
    "paper": Preset(
        "the study's 96-trial grid (gpt2 tokens, batch 50, AdamW)",
        axes={"seq_len": [20, 50, 80], "lr": [1e-4, 1e-3], "heads": [4, 8], "d_model": [128, 256], "layers": [1, 2], "mlp": [False, True]},
        # No torch.compile by default: since the fused loss, compiled and eager steps run at the
        # same speed on CPU (benchmarks/RESULTS.md) and compiling costs ~15 s per trial; --compile turns it on.
        fixed={"tokenizer": "gpt2", "batch_size": 50, "max_tokens": 20_000_000, "eval_every_tokens": 1_000_000},
    ),
    "smoke": Preset(
        "4 tiny trials that finish in minutes on a laptop CPU",
        axes={"lr": [3e-4, 3e-3], "heads": [2, 4]},
        fixed={"tokenizer": "bpe:2048", "d_model": 32, "seq_len": 32, "layers": 1, "batch_size": 32,
               "max_tokens": 200_000, "eval_every_tokens": 50_000},
    ),
    "induction": Preset(
        "1- vs 2-layer attention-only models on the synthetic repeat task",
        axes={"layers": [1, 2]},
        fixed={"d_model": 64, "heads": 4, "seq_len": 64, "lr": 1e-3, "batch_size": 32,
               "max_tokens": 12_000_000, "eval_every_tokens": 1_000_000},
        dataset="repeat",
        # A comparison, not a search: the 2-layer model's loss falls below the 1-layer one's only
        # once its induction heads form (3-4M tokens), so ASHA would stop it first.
        early_stopping=False,
    ),
}


def parse_grid(overrides: tuple[str, ...] | list[str]) -> dict[str, list[Any]]:
    """`key=v1,v2` strings into typed value lists; bad keys or values raise ConfigError."""
    axes: dict[str, list[Any]] = {}
    for override in overrides:
        key, separator, raw = override.partition("=")
        key = key.strip().replace("-", "_")
        if not separator or not raw.strip():
            raise ConfigError(f"--grid {override!r} must look like key=v1,v2")
        if key not in GRID_KEYS:
            raise ConfigError(f"--grid key {key!r} is unknown; keys: {', '.join(GRID_KEYS)}")
        axes[key] = [_parse_value(key, value.strip()) for value in raw.split(",")]
    return axes


def _parse_value(key: str, value: str) -> Any:
    kind = GRID_KEYS[key]
    if kind == "bool":
        lowered = value.lower()
        if lowered in ("on", "true", "1", "yes"):
            return True
        if lowered in ("off", "false", "0", "no"):
            return False
        raise ConfigError(f"--grid {key}={value}: use on/off")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"--grid {key}={value}: expected {'an integer' if kind is int else 'a number'}") from None


def build_grid(preset_name: str, overrides: dict[str, list[Any]], base: dict[str, Any]) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """(axes, fixed) of a sweep: the preset, then --grid overrides, then the data options in `base`."""
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    axes = {k: list(v) for k, v in preset.axes.items()}
    fixed = TRIAL_DEFAULTS | preset.fixed | base
    for key, values in overrides.items():
        fixed.pop(key, None)
        axes[key] = values
    for key in [k for k, v in axes.items() if len(v) == 1]:
        fixed[key] = axes.pop(key)[0]  # one value is no axis
    return axes, fixed


def expand(axes: dict[str, list[Any]], fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """Every trial config of the grid, in grid order."""
    keys = list(axes)
    return [fixed | dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def data_config(config: dict[str, Any]) -> DataConfig:
    """The DataConfig of a trial config dict (its data keys only)."""
    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in config.items() if k in names})


def trial_configs(config: dict[str, Any], vocab_size: int = 2) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    """The dataclasses of one trial config dict; raises ConfigError naming the flag."""
    data = data_config(config)
    model = ModelConfig(
        vocab_size=vocab_size, d_model=config["d_model"], n_heads=config["heads"], n_layers=config["layers"],
        mlp=config["mlp"], seq_len=config["seq_len"],
    )
    train = TrainConfig(
        lr=config["lr"], batch_size=config["batch_size"], max_tokens=config["max_tokens"],
        eval_every_tokens=config["eval_every_tokens"], seed=config["seed"], device=config.get("device", "auto"),
        compile=config.get("compile", False),
    )
    return data, model, train


def validate_trials(trials: list[dict[str, Any]]) -> None:
    """Build every trial's configs before Ray starts, so a bad grid value fails in a second."""
    for trial in trials:
        try:
            trial_configs(trial)
        except ConfigError as error:
            varying = ", ".join(f"{k}={trial[k]}" for k in GRID_KEYS if k in trial)
            raise ConfigError(f"{error} (in the trial {varying})") from None


def data_key(config: dict[str, Any]) -> str:
    """Trials with the same key share one tokenized, packed dataset."""
    return f"{config['tokenizer']}|{config['seq_len']}"
