"""circuit-sweep's model: a small attention-only transformer, its data, training and analysis.

Runs with PyTorch and Hugging Face libraries alone; never imports ray.
"""

from .config import ConfigError, DataConfig, ModelConfig, TrainConfig
from .train import CheckpointError, NonFiniteLossError, Trainer, load_checkpoint, load_checkpoint_tokenizer
from .transformer import Transformer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "Transformer",
    "load_checkpoint",
    "load_checkpoint_tokenizer",
]
