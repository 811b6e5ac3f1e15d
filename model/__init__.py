"""circuit-sweep's model: a small attention-only transformer, its data, training and analysis.

Runs with PyTorch and Hugging Face libraries alone; never imports ray. Names
are loaded on first use, so `import model.config` does not pull in torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "config",
    "ConfigError": "config",
    "DataConfig": "config",
    "ModelConfig": "config",
    "NonFiniteLossError": "config",
    "TrainConfig": "config",
    "Trainer": "train",
    "Transformer": "transformer",
    "load_checkpoint": "checkpoint",
    "load_checkpoint_tokenizer": "checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
