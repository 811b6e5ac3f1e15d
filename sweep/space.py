"""Presets and --grid overrides: the hyperparameter grid of a sweep.

A trial's config is a flat dict of plain values: the trial keys below (one
table, read from the model's config dataclasses: key, field, parser,
default, help) plus the data options. `trial_configs` turns it into the
model's dataclasses.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from model.config import ConfigError, DataConfig, ModelConfig, TrainConfig, trial_key_of


def parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    raise ValueError("use on/off")


@dataclass(frozen=True)
class TrialKey:
    """A setting of one trial: its --grid key, where it lives, how to parse it, its default and help."""

    key: str
    owner: type
    field_name: str
    default: Any
    help: str

    @property
    def parse(self) -> Callable[[str], Any]:
        kind = type(self.default)
        return parse_bool if kind is bool else kind

    @property
    def kind_name(self) -> str:
        return {bool: "on/off", int: "an integer", float: "a number"}.get(type(self.default), "text")


def _trial_keys() -> dict[str, TrialKey]:
    keys = {}
    for owner in (ModelConfig, TrainConfig, DataConfig):
        for item in dataclasses.fields(owner):
            key = item.metadata.get("trial_key")
            if key:
                keys[key] = TrialKey(key, owner, item.name, item.default, item.metadata["help"])
    return keys


# The one table of trial keys: --grid keys, `sweep train` options, defaults and help all come from here.
TRIAL_KEYS: dict[str, TrialKey] = _trial_keys()
TRIAL_DEFAULTS: dict[str, Any] = {key: spec.default for key, spec in TRIAL_KEYS.items()}
# Shown in tables and used to name trials: the axes the study varied.
SHAPE_KEYS = ("seq_len", "lr", "heads", "d_model", "layers", "mlp")


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
        if key not in TRIAL_KEYS:
            raise ConfigError(f"--grid key {key!r} is unknown; keys: {', '.join(TRIAL_KEYS)}")
        axes[key] = [_parse_value(key, value.strip()) for value in raw.split(",")]
    return axes


def _parse_value(key: str, value: str) -> Any:
    spec = TRIAL_KEYS[key]
    try:
        return spec.parse(value)
    except ValueError:
        raise ConfigError(f"--grid {key}={value}: expected {spec.kind_name}") from None


def build_grid(preset_name: str, overrides: dict[str, list[Any]], base: dict[str, Any]) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """(axes, fixed) of a sweep: the preset, then --grid overrides, then the data options in `base`.

    A key is either an axis or fixed, never both: `fixed` is what every trial shares.
    """
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    axes = {k: list(v) for k, v in preset.axes.items()} | {k: list(v) for k, v in overrides.items()}
    for key in [k for k, v in axes.items() if len(v) == 1]:
        base = base | {key: axes.pop(key)[0]}  # one value is no axis
    fixed = {k: v for k, v in (TRIAL_DEFAULTS | preset.fixed | base).items() if k not in axes}
    return axes, fixed


def expand(axes: dict[str, list[Any]], fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """Every trial config of the grid, in grid order."""
    keys = list(axes)
    return [fixed | dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def data_config(config: dict[str, Any]) -> DataConfig:
    """The DataConfig of a trial config dict (its data keys only)."""
    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in config.items() if k in names})


def _owned(config: dict[str, Any], owner: type) -> dict[str, Any]:
    """The dataclass fields of `owner` set by a trial config's keys."""
    return {spec.field_name: config[key] for key, spec in TRIAL_KEYS.items() if spec.owner is owner and key in config}


def trial_configs(config: dict[str, Any], vocab_size: int = 2) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    """The dataclasses of one trial config dict; raises ConfigError naming the values."""
    data = data_config(config)
    model = ModelConfig(vocab_size=vocab_size, **_owned(config, ModelConfig))
    train = TrainConfig(**_owned(config, TrainConfig), device=config.get("device", "auto"), compile=config.get("compile", False))
    return data, model, train


def planned_iterations(config: dict[str, Any]) -> int:
    """Iterations a trial of this config makes: the trainer's own count."""
    _, model, train = trial_configs(config)
    return train.schedule_for(model.seq_len).iterations


def validate_trials(trials: list[dict[str, Any]], axes: dict[str, list[Any]], typed: dict[str, list[Any]]) -> None:
    """Build every trial's configs before Ray starts, so a bad grid value fails in a second.

    The message names values as the user gave them: `--grid heads=3` for what
    they typed, `d_model=64` for what the preset or a default set.
    """
    def as_given(field_name: str, value: Any) -> str:
        key = trial_key_of(field_name)
        return f"--grid {key}={value}" if key in typed else f"{key}={value}"

    for trial in trials:
        try:
            trial_configs(trial)
        except ConfigError as error:
            varying = ", ".join(f"{k}={trial[k]}" for k in axes)
            where = f" (in the trial {varying})" if varying else ""
            raise ConfigError(error.render(as_given) + where) from None


def data_key(config: dict[str, Any]) -> str:
    """Trials with the same key share one tokenized, packed dataset."""
    return f"{config['tokenizer']}|{config['seq_len']}"
