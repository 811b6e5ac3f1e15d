"""Presets and --grid overrides: the hyperparameter grid of a sweep.

A trial's config is a flat dict of plain values: the trial keys below (one
table, read from the model's config dataclasses: key, field, parser,
default, help) plus the data options. `trial_configs` turns it into the
model's dataclasses.

Ray is imported only to build Tune's search domains: parsing and validating a grid need no Ray.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from model.config import ConfigError, DataConfig, ModelConfig, Schedule, TrainConfig, trial_key_of


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
# What names one trial among others in a line of text: its shape, batch and seed (replicates differ by seed alone).
IDENTITY_KEYS = (*SHAPE_KEYS, "batch_size", "seed")


@dataclass(frozen=True)
class Preset:
    """A named grid: axes searched, values held fixed, and the dataset it was made for."""

    description: str
    axes: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    early_stopping: bool = True
    """ASHA stops weak trials; off for grids that are comparisons, where every trial must finish."""
    grace_tokens: int | None = None
    """With early stopping, no trial is compared before this many training tokens (a phase change comes first)."""
    seeds: int = 1
    """Replicates of every grid point, each with its own seed (--seeds overrides it)."""


PRESETS = {
    # The study's grid: 3 x 2 x 2 x 2 x 2 x 2 = 96 trials. An iteration is a fixed
    # token budget, so ASHA can act inside the long WikiText epochs.
    "paper": Preset(
        "the study's 96-trial grid (gpt2 tokens, batch 50, AdamW)",
        axes={
            "seq_len": [20, 50, 80],
            "lr": [1e-4, 1e-3],
            "heads": [4, 8],
            "d_model": [128, 256],
            "layers": [1, 2],
            "mlp": [False, True],
        },
        # No torch.compile by default: since the fused loss, compiled and eager steps run at the
        # same speed on CPU (benchmarks/RESULTS.md) and compiling costs ~15 s per trial; --compile turns it on.
        # Snapshots at the GPT-2 vocabulary are 52-109 MB of float32 each: the default log schedule would
        # be about 300 GB for the grid. 10 evenly spaced after the powers of two, in bf16: about 80 GB.
        fixed={
            "tokenizer": "gpt2",
            "batch_size": 50,
            "max_tokens": 20_000_000,
            "eval_every_tokens": 1_000_000,
            "snapshots": "log:10",
            "snapshot_dtype": "bfloat16",
        },
    ),
    "smoke": Preset(
        "4 tiny trials that finish in minutes on a laptop CPU",
        axes={"lr": [3e-4, 3e-3], "heads": [2, 4]},
        fixed={
            "tokenizer": "bpe:2048",
            "d_model": 32,
            "seq_len": 32,
            "layers": 1,
            "batch_size": 32,
            "max_tokens": 200_000,
            "eval_every_tokens": 50_000,
        },
    ),
    "induction": Preset(
        "1- vs 2-layer attention-only models on the synthetic repeat task",
        axes={"layers": [1, 2]},
        # Not compiled: with attention written out, compiled steps are only 1.1x faster at this shape, and the
        # first run on a machine compiles for 30 s more than eager training takes (benchmarks/RESULTS.md).
        fixed={
            "d_model": 64,
            "heads": 4,
            "seq_len": 64,
            "lr": 1e-3,
            "batch_size": 32,
            "max_tokens": 12_000_000,
            "eval_every_tokens": 1_000_000,
        },
        dataset="repeat",
        # A comparison, not a search: the 2-layer model's loss falls below the 1-layer one's only
        # once its induction heads form (3-4M tokens), so ASHA would stop it first. With
        # --early-stopping, nothing is compared before 6M tokens, after the phase change.
        early_stopping=False,
        grace_tokens=6_000_000,
    ),
    "formation": Preset(
        "when induction heads form, against batch size and context length, 3 seeds a point (repeat task)",
        axes={"batch_size": [16, 64], "seq_len": [64, 96]},
        # The induction preset's 2-layer model. Measured on 2 CPU cores before choosing the grid: at batch 16 and
        # context 64 induction forms near 3.5M tokens; batch 64 and context 96 push it past 6M; context 32 and 48
        # never form within 8M (benchmarks/RESULTS.md). An iteration every 250k tokens sets formed_at's resolution.
        fixed={
            "layers": 2,
            "d_model": 64,
            "heads": 4,
            "lr": 1e-3,
            "max_tokens": 8_000_000,
            "eval_every_tokens": 250_000,
            "snapshots": "every:500000",
        },
        dataset="repeat",
        early_stopping=False,  # a measurement of every point: each trial runs to the end
        seeds=3,
    ),
}


def parse_grid(overrides: tuple[str, ...] | list[str]) -> dict[str, list[Any] | Distribution]:
    """`key=v1,v2` (a grid axis) or `key=kind:...` (a searched range) strings, typed; bad ones raise ConfigError."""
    axes: dict[str, list[Any] | Distribution] = {}
    for override in overrides:
        key, separator, raw = override.partition("=")
        key, raw = key.strip().replace("-", "_"), raw.strip()
        if not separator or not raw:
            raise ConfigError(f"--grid {override!r} must look like key=v1,v2 or key=loguniform:A:B")
        if key not in TRIAL_KEYS:
            raise ConfigError(f"--grid key {key!r} is unknown; keys: {', '.join(TRIAL_KEYS)}")
        kind = raw.partition(":")[0]
        # a range is kind:..., except for tokenizer, whose values (bpe:N, paths) hold colons of their own
        if ":" in raw and kind.isalpha() and (key != "tokenizer" or kind == "choice"):
            if kind not in DISTRIBUTIONS:
                raise ConfigError(
                    f"--grid {key}={raw}: unknown range {kind!r}; use {', '.join(f'{d}:' for d in DISTRIBUTIONS)} or a "
                    "list"
                )
            axes[key] = parse_distribution(key, raw)
        else:
            axes[key] = [_parse_value(key, value.strip()) for value in raw.split(",")]
    return axes


def _parse_value(key: str, value: str) -> Any:
    spec = TRIAL_KEYS[key]
    try:
        return spec.parse(value)
    except ValueError:
        raise ConfigError(f"--grid {key}={value}: expected {spec.kind_name}") from None


def build_grid(
    preset_name: str, overrides: dict[str, list[Any] | Distribution], base: dict[str, Any]
) -> tuple[dict[str, list[Any]], dict[str, Distribution], dict[str, Any]]:
    """(axes, distributions, fixed) of a sweep: the preset, then --grid overrides, then the data options in `base`.

    A key is an axis (a list), a distribution (a searched range) or fixed, never two of these.
    """
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    distributions = {k: v for k, v in overrides.items() if isinstance(v, Distribution)}
    axes = {k: list(v) for k, v in preset.axes.items() if k not in distributions}
    axes |= {k: list(v) for k, v in overrides.items() if not isinstance(v, Distribution)}
    for key in [k for k, v in axes.items() if len(v) == 1]:
        base = base | {key: axes.pop(key)[0]}  # one value is no axis
    fixed = {
        k: v for k, v in (TRIAL_DEFAULTS | preset.fixed | base).items() if k not in axes and k not in distributions
    }
    return axes, distributions, fixed


DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
# Data is tokenized and packed once per (tokenizer, seq_len) before the sweep: those keys take lists or choice: only.
DATA_KEYS = ("tokenizer", "seq_len")


@dataclass(frozen=True)
class Distribution:
    """A searched range of one trial key: `loguniform:A:B`, `uniform:A:B`, `randint:A:B` (A..B inclusive),
    `choice:a,b,c`."""

    key: str
    kind: str
    values: tuple
    typed: str = field(default="", compare=False)
    """As the user wrote it (`loguniform:1e-4:1e-2`), so messages echo that rather than 0.0001."""

    @property
    def text(self) -> str:
        if self.typed:
            return self.typed
        separator = "," if self.kind == "choice" else ":"
        return f"{self.kind}:{separator.join(str(v) for v in self.values)}"

    def domain(self):
        """The Ray Tune search domain."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        return tune.choice(list(self.values))

    def probes(self) -> list[Any]:
        """Values every combination is validated with before Ray starts: the ends (and middle) of a range, every
        choice."""
        if self.kind == "choice":
            return list(self.values)
        low, high = self.values
        if self.kind == "randint":
            return list(range(low, high + 1)) if high - low < 16 else [low, (low + high) // 2, high]
        middle = math.sqrt(low * high) if self.kind == "loguniform" else (low + high) / 2
        return [low, middle, high]


def parse_distribution(key: str, raw: str) -> Distribution:
    """`kind:...` into a Distribution; ConfigError naming what the user typed when it is not one."""
    kind, _, rest = raw.partition(":")
    spec = TRIAL_KEYS[key]
    typed = f"--grid {key}={raw}"
    if kind == "choice":
        try:
            values = tuple(spec.parse(v.strip()) for v in rest.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"{typed}: every choice must be {spec.kind_name}") from None
        if not values:
            raise ConfigError(f"{typed}: give choice:a,b,c")
        return Distribution(key, kind, values, raw)
    if key in DATA_KEYS:
        raise ConfigError(
            f"{typed}: {key} takes a list or choice:a,b (its data is prepared once per value before the sweep)"
        )
    parts = rest.split(":")
    if len(parts) != 2:
        raise ConfigError(f"{typed}: use {kind}:LOW:HIGH")
    if kind == "randint":
        if not isinstance(spec.default, int) or isinstance(spec.default, bool):
            raise ConfigError(f"{typed}: randint is for integer keys; {key} takes loguniform:A:B or uniform:A:B")
        parse = int
    else:
        if not isinstance(spec.default, float):
            raise ConfigError(f"{typed}: {key} takes integers; use randint:A:B or choice:a,b")
        parse = float
    try:
        low, high = (parse(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{typed}: LOW and HIGH must be {'integers' if parse is int else 'numbers'}") from None
    if not low < high:
        raise ConfigError(f"{typed}: LOW must be below HIGH")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{typed}: loguniform needs LOW > 0")
    return Distribution(key, kind, (low, high), raw)


def probe_trials(
    axes: dict[str, list[Any]], distributions: dict[str, Distribution], fixed: dict[str, Any], limit: int = 5000
) -> list[dict[str, Any]]:
    """The grid's trials with every distribution at its probe values: what is validated and prepared before Ray
    starts."""
    probes = {**axes, **{k: d.probes() for k, d in distributions.items()}}
    count = math.prod(len(v) for v in probes.values())
    if count > limit:
        raise ConfigError(
            f"the search space has {count:,} combinations of grid values and range ends to check; narrow it below "
            f"{limit:,}"
        )
    return expand(probes, fixed)


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
    run_settings = {name: config[name] for name in RUN_SETTINGS if name in config}
    train = TrainConfig(**_owned(config, TrainConfig), device=config.get("device", "auto"), **run_settings)
    return data, model, train


# TrainConfig fields a sweep holds fixed for every trial (sweep launch flags, not --grid keys).
RUN_SETTINGS = ("compile", "snapshots", "snapshot_dtype")


def trial_schedule(config: dict[str, Any]) -> Schedule:
    """Steps, iterations and final tokens of a trial of this config: the trainer's own count."""
    _, model, train = trial_configs(config)
    return train.schedule_for(model.seq_len)


def planned_iterations(config: dict[str, Any]) -> int:
    """Iterations a trial of this config makes."""
    return trial_schedule(config).iterations


def validate_trials(trials: list[dict[str, Any]], axes: dict[str, Any], typed: dict[str, Any]) -> None:
    """Build every trial's configs before Ray starts, so a bad grid value fails in a second.

    The message names values as the user gave them: `--grid heads=3` for what
    they typed, `d_model=64` for what the preset or a default set.
    """
    def as_given(field_name: str, value: Any) -> str:
        key = trial_key_of(field_name)
        return f"--grid {key}={value}" if key in typed else f"{key}={value}"

    for trial in trials:
        try:
            _, model, train = trial_configs(trial)
            train.snapshot_steps(model.seq_len)  # a schedule this trial cannot honour fails here
        except ConfigError as error:
            varying = ", ".join(f"{k}={trial[k]}" for k in axes)
            where = f" (in the trial {varying})" if varying else ""
            raise ConfigError(error.render(as_given) + where) from None


def data_key(config: dict[str, Any]) -> str:
    """Trials with the same key share one tokenized, packed dataset."""
    return f"{config['tokenizer']}|{config['seq_len']}"
