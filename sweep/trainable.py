"""The one Tune function trainable: config dict -> model.Trainer -> tune.report per iteration."""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from typing import Any

import ray
import torch
from ray import tune
from tokenizers import Tokenizer

from model.analysis import SUMMARY_METRICS
from model.tokenizers import TextTokenizer
from model.train import NonFiniteLossError, Trainer

from .space import data_key, trial_configs

log = logging.getLogger(__name__)

# Every metric name a trial reports: what --metric may choose from.
REPORTED_METRICS = (
    "train_loss", "test_loss", "test_accuracy", "test_perplexity", "tokens_seen", "tokens_per_second", "epoch", "lr",
    *SUMMARY_METRICS,
)


def train_trial(config: dict[str, Any], datasets: dict[str, Any]) -> None:
    """Train one configuration, reporting metrics and a checkpoint after every iteration.

    `datasets` maps `data_key(config)` to object-store refs of (train windows,
    test windows, tokenizer JSON), prepared once on the driver.
    """
    data_cfg, model_cfg, train_cfg = trial_configs(config)
    torch.set_num_threads(max(1, int(config.get("cpus_per_trial", 1))))
    train_windows, test_windows, tokenizer_json = ray.get(datasets[data_key(config)])
    tokenizer = TextTokenizer(Tokenizer.from_str(tokenizer_json), data_cfg.tokenizer)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    if train_cfg.device != "cpu" and not torch.cuda.is_available() and ray.get_gpu_ids():
        log.warning("trial was given a GPU by Ray but CUDA is not available; training on CPU")
    trainer = Trainer(model_cfg, train_cfg, train_windows, test_windows, tokenizer, data_cfg)

    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(directory)
        log.info("resumed at tokens_seen=%d", trainer.tokens_seen)

    while not trainer.finished:
        try:
            metrics = trainer.train_iteration()
        except NonFiniteLossError:
            # Tell the driver first (NanLossCallback turns retries off), then fail the trial.
            metric, mode = config["sweep_metric"], config["sweep_mode"]
            tune.report({"nan_loss": 1.0, metric: math.inf if mode == "min" else -math.inf, "tokens_seen": trainer.tokens_seen})
            raise
        with tempfile.TemporaryDirectory(prefix="sweep-checkpoint-") as directory:
            trainer.save_checkpoint(directory)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


class NanLossCallback(tune.Callback):
    """A diverged trial errors once with reason nan_loss: retrying it would diverge again."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("nan_loss"):
            trial.max_failures = 0
