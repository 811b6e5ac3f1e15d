"""The one Tune function trainable: config dict -> model.Trainer -> tune.report per iteration."""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
import resource
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
from ray import tune
from tokenizers import Tokenizer

from model.checkpoint import MANIFEST_FILE, manifest_problem
from model.config import NonFiniteLossError
from model.tokenizers import TextTokenizer
from model.train import Trainer, run_iterations

from .names import FAILURE_MARKER, FINAL_FAILURES
from .plan import TrialSettings
from .space import data_key, trial_configs
from .storage import Storage, is_storage_full, open_storage, put_bytes
from .threads import adopt_threads, granted_threads
from .trajectory import SNAPSHOTS_FOLDER, StorageSnapshots

log = logging.getLogger(__name__)


class TrialOutOfMemory(RuntimeError):
    """The trial needs more memory than it was given."""


class GpuUnavailable(RuntimeError):
    """Ray gave the trial a GPU its node's torch cannot use."""


class GpuOutOfMemory(RuntimeError):
    """The trial's GPU ran out of memory: retried, unlike the trial's own memory limit."""


class StorageFull(OSError):
    """The experiment's storage has no room for the trial's checkpoint."""


def train_trial(config: dict[str, Any], datasets: dict[str, Any], settings: TrialSettings) -> None:
    """Train one configuration, reporting metrics and a checkpoint after every iteration.

    `datasets` maps `data_key(config)` to object-store refs of (train windows,
    test windows, tokenizer JSON), prepared once on the driver.
    """
    data_cfg, model_cfg, train_cfg = trial_configs(config)
    # As many torch threads as CPUs Ray reserved for the trial: more would oversubscribe the node.
    train_cfg = dataclasses.replace(train_cfg, threads=settings.threads)
    try:
        start_gpu(ray.get_gpu_ids(), ray.util.get_node_ip_address())
    except GpuUnavailable:
        _report_final_failure(settings, "gpu_unavailable", 0)  # a retry on the same node fails the same way
        raise
    limit_memory(settings.memory_per_trial_mb)
    train_windows, test_windows, tokenizer_json = ray.get(datasets[data_key(config)])
    tokenizer = TextTokenizer(Tokenizer.from_str(tokenizer_json), data_cfg.tokenizer)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    trainer = None
    try:
        trainer = Trainer(model_cfg, train_cfg, train_windows, test_windows, tokenizer, data_cfg)
        if settings.storage_uri:
            trainer.attach_snapshots(trial_snapshots(settings))
            clear_final_failures(settings)  # resumed: what ended it last time is for this run to say again
        checkpoint, reported = resume_point()
        if checkpoint:
            with checkpoint.as_directory() as directory:
                trainer.load_checkpoint(directory)
            log.info("resumed at tokens_seen=%d", trainer.tokens_seen)
        while trainer.iteration < reported and not trainer.finished:
            trainer.train_iteration()  # reported (and checkpointed) before the disk filled
        trial_id = tune.get_context().get_trial_id()

        def publish(metrics: dict[str, Any], directory) -> None:
            # `threads`: what this iteration trained with (more than the trial's own once idle CPUs are shared);
            # `formed_at_resolution`: whether formed_at was read at snapshots or iterations (its readers say which)
            report = {**metrics, "threads": torch.get_num_threads(),
                      "formed_at_resolution": trainer.formed_at_resolution}
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))
            adopt_threads(granted_threads(settings.experiment, trial_id, settings.threads))

        run_iterations(trainer, publish)
    except OSError as error:
        if not is_storage_full(error):
            raise
        # A full disk stays full: no retry, and the half-copied checkpoint was never registered.
        _report_final_failure(settings, "storage_full", trainer.tokens_seen if trainer else 0)
        raise StorageFull(
            errno.ENOSPC,
            f"storage_full: no space left for this trial's checkpoint ({str(error).splitlines()[0][:160]})",
        ) from None
    except NonFiniteLossError:
        _report_final_failure(settings, "nan_loss", trainer.tokens_seen)
        raise
    except torch.cuda.OutOfMemoryError as error:
        # The GPU's memory, not the trial's --memory-per-trial: another trial's peak on a shared GPU may have taken
        # it, so Tune retries the trial (--max-failures) from its checkpoint.
        raise GpuOutOfMemory(f"cuda_out_of_memory: the GPU ran out of memory ({str(error).splitlines()[0][:160]}); "
                             "retried from the last checkpoint; if it persists, lower batch_size or share each GPU "
                             "between fewer trials (--gpus-per-trial)") from None
    except (MemoryError, RuntimeError) as error:
        if not _is_out_of_memory(error):
            raise
        tokens_seen = trainer.tokens_seen if trainer else 0
        trainer = None  # free what can be freed before reporting
        _report_final_failure(settings, "out_of_memory", tokens_seen)
        raise TrialOutOfMemory(
            f"out_of_memory: this configuration needs more memory than the trial has "
            f"(--memory-per-trial {settings.memory_per_trial_mb or 'unset'} MB); "
            f"lower d_model, batch_size or seq_len, or give trials more memory ({str(error).splitlines()[0][:160]})"
        ) from None


def start_gpu(gpu_ids: list, node: str) -> None:
    """A trial Ray gave a GPU starts CUDA before anything else (before the memory limit: CUDA reserves a large
    address space as it starts); without CUDA it fails in one line, never a silent CPU run in a GPU's place."""
    if not gpu_ids:
        return
    if not torch.cuda.is_available() and os.environ.get("RAY_FAKE_CLUSTER") == "1":
        log.warning("GPU %s is a logical GPU of Ray's fake multinode cluster: training on CPU", gpu_ids)
        return
    if not torch.cuda.is_available():
        raise GpuUnavailable(
            f"gpu_unavailable: Ray gave this trial GPU {', '.join(map(str, gpu_ids))} on node {node}, "
            "but CUDA is not available there (its driver, CUDA_VISIBLE_DEVICES, a CPU build of torch?)"
        )
    torch.cuda.init()


def trial_snapshots(settings: TrialSettings) -> StorageSnapshots:
    """This trial's snapshot folder in the experiment's storage (the trial folders are trial_<id>)."""
    storage, folder = trial_folder(settings)
    return StorageSnapshots(storage, f"{folder}/{SNAPSHOTS_FOLDER}")


def trial_folder(settings: TrialSettings) -> tuple[Storage, str]:
    storage = open_storage(settings.storage_uri)
    return storage, storage.path(settings.experiment, f"trial_{tune.get_context().get_trial_id()}")


def resume_point() -> tuple[tune.Checkpoint | None, int]:
    """Tune's checkpoint for this trial, and 0. When that one is gone (Tune's state was restored from the copy
    kept before the disk filled, and the checkpoint it names was replaced since): the newest whole one before
    it (or none: the start), and the iterations Tune counts as done, which the trial retraces unreported, so
    its iterations stay Tune's (training is seeded: the retraced steps are the same)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None or _whole(checkpoint.filesystem, checkpoint.path):
        return checkpoint, 0
    filesystem = checkpoint.filesystem
    trial_folder, named = checkpoint.path.rstrip("/").rsplit("/", 1)
    index = _checkpoint_index(named)
    candidates = sorted(
        (info.path for info in filesystem.get_file_info(pafs.FileSelector(trial_folder))
         if info.type == pafs.FileType.Directory and -1 < _checkpoint_index(info.base_name) < index),
        reverse=True,
    )
    earlier = next((tune.Checkpoint(path, filesystem) for path in candidates if _whole(filesystem, path)), None)
    log.warning("checkpoint %s is gone; retracing its iterations from %s", checkpoint.path,
                earlier.path if earlier else "the start")
    return earlier, index + 1


def _checkpoint_index(name: str) -> int:
    match = re.fullmatch(r"checkpoint_(\d+)", name)
    return int(match.group(1)) if match else -1


def _whole(filesystem: pafs.FileSystem, path: str) -> bool:
    """Whether a checkpoint folder holds every file its manifest lists, at the listed sizes."""
    try:
        listing = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        prefix = len(path.rstrip("/")) + 1
        sizes = {info.path[prefix:]: info.size for info in listing if info.type == pafs.FileType.File}
        with filesystem.open_input_stream(f"{path.rstrip('/')}/{MANIFEST_FILE}") as stream:
            manifest = stream.read().decode()
    except (OSError, FileNotFoundError):
        return False
    return manifest_problem(manifest, sizes) is None


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)


def clear_final_failures(settings: TrialSettings) -> None:
    storage, folder = trial_folder(settings)
    for reason in FINAL_FAILURES:
        try:
            storage.filesystem.delete_file(f"{folder}/{FAILURE_MARKER}{reason}")
        except (FileNotFoundError, OSError):
            pass


def _report_final_failure(settings: TrialSettings, reason: str, tokens_seen: int) -> None:
    """Tell the driver first (FinalFailureCallback turns retries off), then the trial raises. The reason is
    also kept as an empty file in the trial's folder (FAILURE_MARKER): a full disk that has no room for the
    report's line in result.json still takes a file of no bytes."""
    if settings.storage_uri:
        storage, folder = trial_folder(settings)
        try:
            put_bytes(storage, f"{folder}/{FAILURE_MARKER}{reason}", b"")
        except OSError as error:
            log.warning("could not keep %s in the trial's folder: %s", reason, error)
    worst = math.inf if settings.mode == "min" else -math.inf
    tune.report({reason: 1.0, settings.metric: worst, "tokens_seen": tokens_seen})


def limit_memory(megabytes: float) -> None:
    """Cap this worker's private memory at its current use plus `megabytes` (Linux RLIMIT_DATA).

    A trial that outgrows its share then fails alone with out_of_memory instead
    of driving the whole node into the kernel's OOM killer.
    """
    if not megabytes:
        return
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        log.warning("cannot read /proc/self/status; --memory-per-trial is used for scheduling only")
        return
    in_use = int(re.search(r"VmData:\s+(\d+) kB", status).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (in_use + int(megabytes * 2**20), resource.RLIM_INFINITY))


class FinalFailureCallback(tune.Callback):
    """A diverged, out-of-memory or storage-full trial errors once: a retry would fail the same way."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}  # trial id -> the final failure it reported

    def on_trial_result(self, iteration, trials, trial, result, **info):
        for reason in FINAL_FAILURES:
            if result.get(reason):
                trial.max_failures = 0
                self.reasons[trial.trial_id] = reason

    def saw(self, reason: str) -> bool:
        return reason in self.reasons.values()
