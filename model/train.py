"""The training loop and evaluation of one run.

A run is a sequence of iterations of `eval_every_tokens` training tokens;
after each comes an evaluation on a fixed held-out sample, the head analysis
and a checkpoint. `run_iterations` is the one loop: `sweep train` and the Ray
Tune trainable differ only in where they publish each iteration's metrics and
checkpoint. Checkpoint files and loading live in `model.checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .analysis import (
    AnalysisConfig,
    carry_ablation,
    head_history_entry,
    head_scores,
    pattern_maxima,
    repeat_prompt,
    score_summaries,
    write_analysis,
)
from .checkpoint import HISTORY_FILE, read_config, read_trainer_state, swap_in, write_manifest
from .circuits import icl_score, token_frequencies, token_tables
from .config import CheckpointError, ConfigError, DataConfig, ModelConfig, NonFiniteLossError, TrainConfig
from .data import check_data, prepare_data, repetition_warning
from .snapshots import FolderSnapshots, SnapshotWriter, snapshot_files, snapshot_name
from .tokenizers import TextTokenizer
from .transformer import PAD_ID, Transformer, logit_chunk_rows

log = logging.getLogger(__name__)

EVAL_SAMPLE_SEED = 1234  # the held-out sample is the same for every run of a dataset
__all__ = ["CheckpointError", "NonFiniteLossError", "Trainer", "run_iterations", "run_training"]


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        log.warning("--device %s requested but CUDA is not available; training on CPU", requested)
        return torch.device("cpu")
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively and faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_autocast_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if requested == "float32":
        return None
    if requested == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


class Trainer:
    """Owns the model, optimiser, schedule and data order of one run."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        train_windows: np.ndarray,
        test_windows: np.ndarray,
        tokenizer: TextTokenizer,
        data_cfg: DataConfig | None = None,
        analysis_cfg: AnalysisConfig = AnalysisConfig(),
    ) -> None:
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
            )
        if train_windows.shape[1] != model_cfg.seq_len + 1 or test_windows.shape[1] != model_cfg.seq_len + 1:
            raise ConfigError(f"data windows do not match --seq-len {model_cfg.seq_len}")
        self.model_cfg, self.train_cfg, self.data_cfg = model_cfg, train_cfg, data_cfg
        if data_cfg is not None and data_cfg.dataset == "repeat" and analysis_cfg.prompt == AnalysisConfig.prompt:
            # Prose means nothing to the synthetic vocabulary: probe it with a repeated run instead.
            analysis_cfg = dataclasses.replace(analysis_cfg, prompt=repeat_prompt(data_cfg.repeat_vocab))
        self.analysis_cfg = analysis_cfg
        self.tokenizer = tokenizer
        self.device = resolve_device(train_cfg.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # cuda:N: kernels, timings and synchronize() all on that GPU
        self.autocast_dtype = resolve_autocast_dtype(train_cfg.dtype, self.device)

        # Threads from the CPUs this run was given: two runs that each take every core run 5x slower.
        torch.set_num_threads(train_cfg.cpu_threads())
        torch.manual_seed(train_cfg.seed)
        self.model = Transformer(model_cfg).to(self.device)
        compile_model = train_cfg.compile and can_compile(self.device)
        self.forward = torch.compile(self.model) if compile_model else self.model
        # Training needs only the loss: the fused unembedding + cross entropy never forms the logits.
        self.training_loss = torch.compile(self.model.training_loss) if compile_model else self.model.training_loss
        self.optimizer = self._make_optimizer()
        self.schedule = train_cfg.schedule_for(model_cfg.seq_len)
        self.tokens_per_step = self.schedule.tokens_per_step
        self.total_steps = self.schedule.total_steps
        self.steps_per_iteration = self.schedule.steps_per_iteration
        warmup = int(train_cfg.warmup_fraction * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, self.total_steps, train_cfg.schedule)
        )
        # Windows live on the training device: batches are gathered there with no copy.
        self.train_windows = torch.as_tensor(np.array(train_windows, dtype=np.int32), device=self.device)
        # Known once, from the host's copy: the step never asks the device whether a batch holds padding.
        self.padded = bool((np.asarray(train_windows) < 0).any())
        self.eval_windows = torch.as_tensor(
            held_out_sample(test_windows, train_cfg.eval_tokens, model_cfg.seq_len), device=self.device
        )
        self.step = 0
        self.iteration = 0
        self._permutation_epoch = -1
        self._permutation: torch.Tensor | None = None
        self.last_metrics: dict[str, Any] = {}
        self.heads_document: dict[str, Any] | None = None
        self.circuits_document: dict[str, Any] | None = None
        self._frequencies: torch.Tensor | None = None
        # tokens_seen at the first snapshot (or, with no snapshots, iteration) whose best head's pattern score passed
        # the label threshold (Olsson's phase change): one reading, fixed while training, whatever runs later
        self.formed_at: dict[str, int | None] = {"induction_formed_at": None, "prev_token_formed_at": None}
        # Every iteration's head scores (history.json in each checkpoint): the run's own record of its
        # history, which a report lost when a worker died still leaves whole.
        self.history: list[dict[str, Any]] = []
        # Snapshots on the schedule fixed by the config, written through `snapshot_writer` when one is attached.
        self.snapshot_steps = train_cfg.snapshot_steps(model_cfg.seq_len)
        self._snapshot_set = frozenset(self.snapshot_steps)
        self.snapshot_writer: SnapshotWriter | None = None

    def attach_snapshots(self, writer: SnapshotWriter) -> None:
        """Write this run's snapshots (and its tokenizer, once) through `writer` from now on."""
        self.snapshot_writer = writer
        if self.snapshot_steps:
            writer.write_tokenizer(self.tokenizer.backend.to_str())

    def _snapshot(self) -> None:
        """Write the snapshot of the current step when it is scheduled and not already written.

        Snapshots are written before the checkpoint that passes them, and a resumed run
        trains the same weights again, so each is written exactly once with the same weights.
        """
        if self.snapshot_writer is None or self.step not in self._snapshot_set:
            return
        name = snapshot_name(self.step)
        if not self.snapshot_writer.has(name):
            dtype = self.train_cfg.snapshot_dtype
            files = snapshot_files(self.model, self.step, self.tokens_seen, self.run_config(), dtype)
            self.snapshot_writer.write(name, files)
        if None in self.formed_at.values():  # scored again on a resume's retraced steps: its state predates them
            with _tf32(self.device, allowed=False):
                self._mark_formed(pattern_maxima(self.model, self.eval_windows, self.analysis_cfg))

    @property
    def formed_at_resolution(self) -> str:
        """snapshot: formed_at is read at every snapshot while training; iteration: at every evaluation (no
        snapshots written)."""
        return "snapshot" if self.snapshot_writer is not None and self.snapshot_steps else "iteration"

    def _mark_formed(self, maxima: dict[str, float]) -> None:
        """formed_at for each head type whose best pattern score passes its threshold now, the first time."""
        cfg = self.analysis_cfg
        for key, score, threshold in (("induction_formed_at", "induction", cfg.induction_threshold),
                                      ("prev_token_formed_at", "previous_token", cfg.previous_token_threshold)):
            if self.formed_at[key] is None and maxima[score] > threshold:
                self.formed_at[key] = self.tokens_seen

    def run_config(self) -> dict[str, Any]:
        """The run's model, train and data config, as config.json and every snapshot record it."""
        config = {"model": asdict(self.model_cfg), "train": asdict(self.train_cfg)}
        if self.data_cfg is not None:
            config["data"] = asdict(self.data_cfg)
        return config

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": self.train_cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # The fused kernel updates every parameter in one pass (CPU and CUDA in torch >= 2.4).
        return torch.optim.AdamW(groups, lr=self.train_cfg.lr, betas=(0.9, 0.95), fused=True)

    @property
    def tokens_seen(self) -> int:
        return self.step * self.tokens_per_step

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def _batch_indices(self, step: int) -> torch.Tensor:
        """Rows of batch `step`: a fresh seeded permutation per epoch, so resuming needs only the step. The
        permutation lives on the device, sliced there: a step copies nothing from the host."""
        count, size = self.train_windows.shape[0], self.train_cfg.batch_size
        start, end = step * size, (step + 1) * size
        pieces = []
        while start < end:  # a batch that crosses an epoch's end takes the next epoch's first rows
            epoch, offset = divmod(start, count)
            taken = min(end - start, count - offset)
            pieces.append(self._epoch_permutation(epoch)[offset : offset + taken])
            start += taken
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._permutation_epoch:
            rng = np.random.default_rng([self.train_cfg.seed, epoch])
            rows = torch.from_numpy(rng.permutation(self.train_windows.shape[0]))
            if self.device.type == "cuda":
                rows = rows.pin_memory()  # one asynchronous copy an epoch
            self._permutation = rows.to(self.device, non_blocking=True)
            self._permutation_epoch = epoch
        return self._permutation

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )

    def train_iteration(self) -> dict[str, Any]:
        """Train one iteration, evaluate, and return the metrics of the contract."""
        last_step = min(self.step + self.steps_per_iteration, self.total_steps)
        steps = last_step - self.step
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss_sum = self.train_steps(last_step)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        self.iteration += 1
        metrics = {
            "train_loss": float(loss_sum) / max(steps, 1),
            **self.evaluate(),
            "tokens_seen": self.tokens_seen,
            "tokens_per_second": steps * self.tokens_per_step / max(elapsed, 1e-9),
            "epoch": self.step * self.train_cfg.batch_size / self.train_windows.shape[0],
            "lr": self.scheduler.get_last_lr()[0],
        }
        metrics.update(self.analyse())
        self.last_metrics = metrics
        self.history.append({key: metrics[key] for key in ("tokens_seen", "test_loss", "icl_score")}
                            | {"iteration": self.iteration, "heads": metrics["head_scores"]})
        return metrics

    def train_steps(self, last_step: int) -> torch.Tensor:
        """Optimizer steps up to `last_step`; returns the sum of their losses (a device tensor).

        Nothing in a step waits for the device: batch rows are sliced on it, whether a batch may hold padding is
        known from the host, and a non-finite loss is caught by a device flag read once, after the steps (and
        before any snapshot), raising NonFiniteLossError with the step it happened at.
        """
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # steps since `start`, or -1
        bad_loss = torch.zeros((), device=self.device)
        start = self.step
        counter = torch.zeros((), dtype=torch.long, device=self.device)
        self._snapshot()  # step 0: the initialisation
        with _tf32(self.device):
            while self.step < last_step:
                windows = self.train_windows[self._batch_indices(self.step)].long()
                with self._autocast():
                    loss = self.training_loss(windows[:, :-1], windows[:, 1:], self.padded)
                detached = loss.detach()
                newly_bad = ~torch.isfinite(detached) & (first_bad < 0)
                first_bad = torch.where(newly_bad, counter, first_bad)
                bad_loss = torch.where(newly_bad, detached.float(), bad_loss)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.train_cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                loss_sum += detached
                counter += 1
                self.step += 1
                if self.snapshot_writer is not None and self.step in self._snapshot_set:
                    self._stop_if_non_finite(first_bad, bad_loss, start)  # never a snapshot of poisoned weights
                self._snapshot()
        self._stop_if_non_finite(first_bad, bad_loss, start)
        return loss_sum

    def _stop_if_non_finite(self, first_bad: torch.Tensor, bad_loss: torch.Tensor, start: int) -> None:
        """A non-finite loss poisons the weights: the run stops, with the step and tokens where it happened."""
        steps_in = int(first_bad)  # the one read of the flag
        if steps_in >= 0:
            step = start + steps_in
            raise NonFiniteLossError(f"nan_loss: training loss became {float(bad_loss)} at step {step} "
                                     f"(tokens_seen {step * self.tokens_per_step}); lower --lr")

    def analyse(self) -> dict[str, Any]:
        """Head scores every iteration; ablation and token tables every `circuits_every` and on the last.

        Returns the per-iteration metrics of the analysis: score maxima, formed_at, and
        `head_scores` (every head's scores: the run's head history).
        """
        cfg = self.analysis_cfg
        heavy = self.finished or self.iteration % max(1, cfg.circuits_every) == 0
        document = head_scores(self.model, self.eval_windows, cfg, ablate=heavy)
        if heavy:
            document["ablation_tokens_seen"] = self.tokens_seen
            self.circuits_document = self.token_tables()
        else:
            document = carry_ablation(document, self.heads_document, cfg)
        self.heads_document = document
        summaries = score_summaries(document)
        if self.formed_at_resolution == "iteration":
            self._mark_formed({"induction": summaries["induction_score_max"],
                               "previous_token": summaries["prev_token_score_max"]})
        return {**summaries, **self.formed_at, "head_scores": head_history_entry(document)}

    def token_tables(self) -> dict[str, Any]:
        """circuits.json: the OV / QK / skip-trigram / bigram tables over the most frequent training tokens."""
        if self._frequencies is None:
            self._frequencies = token_frequencies(self.train_windows, self.model_cfg.vocab_size)
        decode = lambda i: self.tokenizer.token_strings([i])[0]  # noqa: E731
        return {"tokens_seen": self.tokens_seen, **token_tables(self.model, decode, self._frequencies)}

    def evaluate(self) -> dict[str, float]:
        """Loss, top-1 next-token accuracy, perplexity and icl_score on the fixed held-out sample."""
        batch = max(self.train_cfg.batch_size, 64)
        metrics = evaluate_model(self.model, self.eval_windows, batch, self._autocast, self.forward)
        self.model.train()
        return metrics

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: str | os.PathLike) -> Path:
        """Write model, configs, tokenizer, trainer state and the head analysis into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
            directory / "model.safetensors",
        )
        (directory / "config.json").write_text(json.dumps(self.run_config(), indent=2))
        self.tokenizer.save(directory / "tokenizer.json")
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "step": self.step,
            "iteration": self.iteration,
            "tokens_seen": self.tokens_seen,
            "metrics": {k: float(v) for k, v in self.last_metrics.items() if isinstance(v, (int, float))},
            "formed_at": dict(self.formed_at),
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        torch.save(state, directory / "trainer_state.pt")
        if self.heads_document is None:
            self.heads_document = head_scores(self.model, self.eval_windows, self.analysis_cfg, ablate=True)
        if self.circuits_document is None:
            self.circuits_document = self.token_tables()
        # heatmap PNGs in the last checkpoint only; patterns.json every time, for readers to draw from
        write_analysis(self.model, self.tokenizer, directory, self.heads_document, self.analysis_cfg, self.finished)
        (directory / "circuits.json").write_text(json.dumps(self.circuits_document))
        (directory / HISTORY_FILE).write_text(json.dumps(self.history))
        write_manifest(directory)
        return directory

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Restore weights, optimiser, schedule, RNG and position: training continues exactly."""
        directory = Path(directory)
        saved = read_config(directory)
        if ModelConfig(**saved["model"]) != self.model_cfg:
            raise CheckpointError(f"{directory} was trained with another model config; it cannot resume this run")
        self.model.load_state_dict(load_file(directory / "model.safetensors", device=str(self.device)))
        state = read_trainer_state(directory)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step = int(state["step"])
        self.iteration = int(state["iteration"])
        self.last_metrics = dict(state.get("metrics", {}))
        self.formed_at.update(state.get("formed_at", {}))
        history = directory / HISTORY_FILE
        self.history = (
            [row for row in json.loads(history.read_text()) if row["iteration"] <= self.iteration]
            if history.is_file()
            else []
        )


@contextlib.contextmanager
def _tf32(device: torch.device, allowed: bool = True):
    """TF32 matmuls for the training step only, on a GPU: analysis and evaluation keep full fp32, so scores near a
    label's threshold read the same as on a CPU (`allowed=False`: full fp32 again inside the step, for a snapshot's
    scores)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def can_compile(device: torch.device) -> bool:
    """torch.compile's CPU backend builds C++: without a compiler the run trains eagerly, and says so."""
    compilers = (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")
    if device.type != "cpu" or any(shutil.which(name) for name in compilers):
        return True
    log.warning("torch.compile needs a C++ compiler (g++) on CPU and none was found: training eagerly")
    return False


@torch.no_grad()
def evaluate_model(
    model: Transformer, windows: torch.Tensor, batch_size: int = 64, autocast=contextlib.nullcontext, forward=None
) -> dict[str, float]:
    """Loss, top-1 next-token accuracy, perplexity and icl_score of `model` on windows [N, T+1] (PAD_ID: padding).

    The trainer's evaluation each iteration and `sweep analyse` at every snapshot both measure with this.
    """
    model.eval()
    forward = model if forward is None else forward  # (a compiled module has no truth value)
    seq_len = windows.shape[1] - 1
    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    position_loss = torch.zeros(seq_len, device=device)
    position_count = torch.zeros(seq_len, device=device)
    for batch in windows.split(batch_size):
        batch = batch.to(device).long()
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast():
            logits = forward(inputs)
        real = targets != PAD_ID
        losses, predicted = _losses_and_predictions(logits, targets.clamp_min(0))
        loss_sum += float(losses[real].sum())
        position_loss += (losses * real).sum(0)
        position_count += real.sum(0)
        correct += int((predicted == targets)[real].sum())
        count += int(real.sum())
    test_loss = loss_sum / max(count, 1)
    return {
        "test_loss": test_loss,
        "test_accuracy": correct / max(count, 1),
        "test_perplexity": math.exp(min(test_loss, 50.0)),
        "icl_score": icl_score(position_loss / position_count.clamp_min(1)),
    }


def _losses_and_predictions(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross entropy (in fp32) and top-1 prediction of logits [B, T, V].

    In chunks of positions whose fp32 logits fit in cache (`logit_chunk_rows`, as the training loss): at the
    GPT-2 vocabulary on CPU this is 3x faster than one fp32 copy of the batch, a cross entropy over the vocabulary
    as a strided dimension and an argmax over bf16 (benchmarks/RESULTS.md, "What the trainer measures, at the GPT-2
    vocabulary").
    """
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    rows = logit_chunk_rows(logits.shape[-1], logits.device)
    losses = torch.empty(flat.shape[0], device=logits.device)
    predicted = torch.empty(flat.shape[0], dtype=torch.long, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start : start + rows].float()
        losses[start : start + rows] = torch.nn.functional.cross_entropy(chunk, flat_targets[start : start + rows],
                                                                         reduction="none")
        predicted[start : start + rows] = chunk.argmax(-1)
    return losses.view(targets.shape), predicted.view(targets.shape)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup, then constant or cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def held_out_sample(test_windows: np.ndarray, eval_tokens: int, seq_len: int) -> np.ndarray:
    """A fixed, seeded sample of test windows worth about `eval_tokens` tokens."""
    count = min(len(test_windows), max(1, -(-eval_tokens // seq_len)))
    rows = np.random.default_rng(EVAL_SAMPLE_SEED).permutation(len(test_windows))[:count]
    return np.array(test_windows[np.sort(rows)], dtype=np.int32)


def run_iterations(
    trainer: Trainer, publish: Callable[[dict[str, Any], Path], None], scratch: Path | None = None
) -> dict[str, Any]:
    """The loop of every run: train an iteration, write its checkpoint into a fresh folder
    (inside `scratch`, so `publish` may move it), and hand metrics and folder to `publish`."""
    metrics: dict[str, Any] = {}
    while not trainer.finished:
        metrics = trainer.train_iteration()
        with tempfile.TemporaryDirectory(prefix="checkpoint-", dir=scratch, ignore_cleanup_errors=True) as directory:
            trainer.save_checkpoint(directory)
            publish(metrics, Path(directory))
    return metrics


def run_training(
    data_cfg: DataConfig,
    model_values: dict[str, Any],
    train_cfg: TrainConfig,
    out: Path,
    analysis_cfg: AnalysisConfig = AnalysisConfig(),
    on_iteration=lambda metrics, trainer: None,
    log=lambda message: None,
) -> dict[str, Any]:
    """One complete run into `out`: metrics.jsonl (a line per iteration), checkpoint/ and snapshots/."""
    ModelConfig(**model_values)  # fail on bad shapes before any data is read
    check_data(data_cfg)
    out = Path(out)
    if (out / "metrics.jsonl").exists() or (out / "checkpoint").exists():
        raise ConfigError(f"--out {out} already holds a run; choose another --out or delete it")
    data = prepare_data(data_cfg, model_values.get("seq_len", ModelConfig.seq_len), log)
    model_cfg = ModelConfig(**(model_values | {"vocab_size": data.tokenizer.vocab_size}))
    trainer = Trainer(model_cfg, train_cfg, data.train, data.test, data.tokenizer, data_cfg, analysis_cfg)
    if warning := repetition_warning(data_cfg, data.train, train_cfg.max_tokens):
        log(warning)
    log(
        f"training on {trainer.device} (autocast {trainer.autocast_dtype or 'off'}, {torch.get_num_threads()} "
        "threads), "
        f"{trainer.total_steps} steps in {trainer.schedule.iterations} iterations"
    )
    out.mkdir(parents=True, exist_ok=True)
    trainer.attach_snapshots(FolderSnapshots(out / "snapshots"))
    if trainer.snapshot_steps:
        log(f"snapshots: {len(trainer.snapshot_steps)} into {out / 'snapshots'} ({train_cfg.snapshots})")
    with (out / "metrics.jsonl").open("w") as lines:

        def publish(metrics: dict[str, Any], directory: Path) -> None:
            swap_in(directory, out / "checkpoint")
            lines.write(json.dumps({"iteration": trainer.iteration, **metrics}) + "\n")
            lines.flush()
            on_iteration(metrics, trainer)

        return run_iterations(trainer, publish, scratch=out)
