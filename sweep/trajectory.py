"""Snapshots in storage: the plan launch prints, the trial's writer, listing and addressing them.

A trial writes its snapshots into `<experiment>/trial_<id>/snapshots/step_NNNNNNN/`
beside Tune's rotating checkpoints, with the trial's tokenizer once in
`snapshots/tokenizer.json`. Each file is written whole (an S3 PUT; locally, a
rename) and `snapshot.json` last, so a snapshot is complete exactly when both
of its files are listed: listing an experiment opens no snapshot file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from model.config import ConfigError
from model.snapshots import (
    SNAPSHOT_FILE,
    SNAPSHOT_PATTERN,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    list_snapshots,
    snapshot_name,
    weights_bytes,
    write_checkpoint_files,
)

from .space import SHAPE_KEYS, data_key, trial_configs
from .storage import Storage, exists, put_bytes

SNAPSHOTS_FOLDER = "snapshots"


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def trial_snapshot_plan(trials: list[dict[str, Any]], vocab_sizes: dict[str, int]) -> list[dict[str, Any]]:
    """Per distinct shape of the trials: snapshots each writes, bytes of one, bytes of one checkpoint, and how many
    trials share it."""
    rows: dict[str, dict[str, Any]] = {}
    for trial in trials:
        vocab = vocab_sizes.get(data_key(trial), 2)
        _, model, train = trial_configs(trial, vocab_size=vocab)
        count = len(train.snapshot_steps(model.seq_len))
        size = weights_bytes(model.parameter_count, train.snapshot_dtype)
        shape = " ".join(f"{k}={trial[k]}" for k in SHAPE_KEYS if k in trial and k != "lr") + f" vocab={vocab}"
        row = rows.setdefault(shape, {"shape": shape, "snapshots": count, "bytes_each": size, "trials": 0,
                                      "checkpoint_bytes": checkpoint_bytes(model.parameter_count, vocab)})
        row["trials"] += 1
    return list(rows.values())


# What a checkpoint holds besides the float32 weights: AdamW's two moments (trainer_state.pt), the tokenizer
# (26 bytes a token of GPT-2's tokenizer.json, 60 of a bpe:N one with its merges) and the small files (heads,
# patterns, circuits, the last checkpoint's heatmap PNGs).
OPTIMIZER_BYTES_PER_PARAMETER = 8
TOKENIZER_BYTES_PER_TOKEN = 60
SMALL_FILES_BYTES = 500_000


def checkpoint_bytes(parameters: int, vocab: int) -> int:
    """About how many bytes one of a trial's checkpoints takes."""
    return (parameters * (4 + OPTIMIZER_BYTES_PER_PARAMETER) + vocab * TOKENIZER_BYTES_PER_TOKEN
            + SMALL_FILES_BYTES)


class StorageSnapshots:
    """A trial's snapshots in the experiment's storage (local or S3)."""

    def __init__(self, storage: Storage, folder: str) -> None:
        self.storage, self.folder = storage, folder

    def has(self, name: str) -> bool:
        return exists(self.storage, f"{self.folder}/{name}/{SNAPSHOT_FILE}")

    def write(self, name: str, files: dict[str, bytes]) -> None:
        for file_name, data in files.items():  # snapshot.json comes last: it marks the snapshot complete
            put_bytes(self.storage, f"{self.folder}/{name}/{file_name}", data)

    def write_tokenizer(self, text: str) -> None:
        if not exists(self.storage, f"{self.folder}/{TOKENIZER_FILE}"):
            put_bytes(self.storage, f"{self.folder}/{TOKENIZER_FILE}", text.encode())


@dataclass(frozen=True)
class Snapshot:
    """One complete snapshot: where it is and what it holds."""

    step: int
    tokens_seen: int
    bytes: int
    path: str
    """Its folder: a storage path, or a local path for a `sweep train` run."""


def snapshots_in_listing(trial_path: str, sizes: dict[str, int], tokens_per_step: int | None) -> list[Snapshot]:
    """Complete snapshots of a trial from its files' sizes (paths relative to the trial folder), by step."""
    found = []
    prefix = f"{SNAPSHOTS_FOLDER}/"
    names = {p.split("/")[1] for p in sizes if p.startswith(prefix) and p.count("/") == 2}
    for name in names:
        match = SNAPSHOT_PATTERN.match(name)
        weights, record = f"{prefix}{name}/{WEIGHTS_FILE}", f"{prefix}{name}/{SNAPSHOT_FILE}"
        if match and weights in sizes and record in sizes:
            step = int(match.group(1))
            tokens = step * tokens_per_step if tokens_per_step else -1
            found.append(Snapshot(step, tokens, sizes[weights] + sizes[record], f"{trial_path}/{prefix}{name}"))
    return sorted(found, key=lambda s: s.step)


def run_folder_snapshots(run: Path) -> list[Snapshot]:
    """The complete snapshots of a `sweep train` run folder."""
    return [
        Snapshot(r["step"], r["tokens_seen"], r["bytes"], r["path"]) for r in list_snapshots(run / SNAPSHOTS_FOLDER)
    ]


@dataclass(frozen=True)
class SnapshotAddress:
    """`--step N` or `--tokens-seen N`: one snapshot of a run."""

    step: int | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if self.step is not None and self.tokens is not None:
            raise ConfigError("--step and --tokens-seen both name a snapshot; give one")

    @property
    def text(self) -> str:
        return f"--step {self.step}" if self.step is not None else f"--tokens-seen {self.tokens}"


def find_snapshot(snapshots: list[Snapshot], address: SnapshotAddress, title: str) -> Snapshot:
    """The snapshot at `address`; a ConfigError naming the nearest ones when there is none."""
    if not snapshots:
        raise ConfigError(f"{title} has no snapshots (trained with --snapshots none, or by a version that wrote none)")
    key = (lambda s: s.step) if address.step is not None else (lambda s: s.tokens_seen)
    wanted = address.step if address.step is not None else address.tokens
    for snapshot in snapshots:
        if key(snapshot) == wanted:
            return snapshot
    before = [s for s in snapshots if key(s) < wanted][-1:]
    after = [s for s in snapshots if key(s) > wanted][:1]
    unit = "--step" if address.step is not None else "--tokens-seen"
    named = ", ".join(f"{unit} {key(s)}" for s in before + after)
    raise ConfigError(f"{title} has no snapshot at {address.text}; nearest: {named} (`sweep snapshots` lists them all)")


def fetch_snapshot(storage: Storage | None, snapshot: Snapshot, workdir: Path) -> Path:
    """A local checkpoint folder of a snapshot (weights, config.json, tokenizer.json): what load_checkpoint reads.

    `storage` None: the snapshot is a local folder of a `sweep train` run.
    """
    target = Path(workdir) / snapshot_name(snapshot.step)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = snapshot.path.rsplit("/", 1)[0] + f"/{TOKENIZER_FILE}"
    for source, name in (
        (f"{snapshot.path}/{WEIGHTS_FILE}", WEIGHTS_FILE),
        (f"{snapshot.path}/{SNAPSHOT_FILE}", SNAPSHOT_FILE),
        (tokenizer, TOKENIZER_FILE),
    ):
        if storage is None:
            shutil.copyfile(source, target / name)
        else:
            with storage.filesystem.open_input_stream(source) as stream, open(target / name, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
    write_checkpoint_files(target)
    return target


def snapshot_rows(snapshots: list[Snapshot]) -> list[dict[str, Any]]:
    return [{"step": s.step, "tokens_seen": s.tokens_seen, "bytes": s.bytes} for s in snapshots]


def storage_listing(storage: Storage, folder: str) -> dict[str, int]:
    """Relative path -> size of every file under `folder` (one recursive listing)."""
    infos = storage.filesystem.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    return {info.path[len(folder) + 1 :]: info.size for info in infos if info.type == pafs.FileType.File}
