"""Snapshots: a run's weights on a schedule fixed before training, every one kept.

Tune's checkpoints rotate (they exist to resume); snapshots exist to be
analysed later, so their schedule never depends on a validation loss and
their count is known before the first step. A snapshot is a folder
`step_NNNNNNN/` holding `model.safetensors` and `snapshot.json` (step,
tokens_seen, config hash, the config, the weights' dtype and size), written
last: a snapshot without it, or whose weights differ in size from what it
records, is incomplete and never read. The run's tokenizer is written once
beside the snapshots (`tokenizer.json`).

Schedules (`--snapshots`, parsed and expanded to steps in model.config), in optimizer steps of `tokens_per_step`
tokens:
- `log` (default) or `log:N`: step 0, the powers of two below the spacing
  ceil(S / N) (N = 30), then every multiple of that spacing up to the last
  step S, which is always included: about 30-40 snapshots, dense early where
  circuits form fastest.
- `every:TOKENS`: every multiple of TOKENS (rounded up to whole steps), plus
  step 0 and the last step.
- `T1,T2,...`: these token counts, each taken at the first step that reaches it.
- `none`: no snapshots.

Listing snapshots needs no torch (`sweep snapshots` starts without it): writing and loading weights import it
inside the functions that do.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .transformer import Transformer

SNAPSHOT_FILE = "snapshot.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
SNAPSHOT_PATTERN = re.compile(r"^step_(\d+)$")
SNAPSHOT_DTYPES = ("float32", "bfloat16")


def snapshot_name(step: int) -> str:
    return f"step_{step:07d}"


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of a run's config: snapshots of the same run share it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_bytes(parameters: int, dtype: str) -> int:
    """Bytes of one snapshot's weights (the safetensors header aside)."""
    return parameters * (2 if dtype == "bfloat16" else 4)


def snapshot_files(
    model: Transformer, step: int, tokens_seen: int, config: dict[str, Any], dtype: str
) -> dict[str, bytes]:
    """The files of one snapshot, weights first: a writer must write SNAPSHOT_FILE last."""
    import torch
    from safetensors.torch import save

    cast = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    tensors = {name: value.detach().to("cpu", cast).contiguous() for name, value in model.state_dict().items()}
    weights = save(tensors)
    record = {
        "step": step,
        "tokens_seen": tokens_seen,
        "config_hash": config_hash(config),
        "dtype": dtype,
        "files": {WEIGHTS_FILE: len(weights)},
        "config": config,
    }
    return {WEIGHTS_FILE: weights, SNAPSHOT_FILE: json.dumps(record, indent=1).encode()}


def snapshot_problem(record_text: str | None, sizes: dict[str, int]) -> str | None:
    """Why a snapshot folder with these file sizes is incomplete, or None when it is whole."""
    if record_text is None:
        return f"{SNAPSHOT_FILE} is missing"
    try:
        expected = json.loads(record_text)["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{SNAPSHOT_FILE} is cut short"
    for name, size in expected.items():
        if sizes.get(name) != size:
            return f"{name} is missing or cut short"
    return None


class SnapshotWriter(Protocol):
    """Where a run writes its snapshots: a local folder (`sweep train`) or a trial's folder in storage."""

    def has(self, name: str) -> bool:
        """Whether snapshot `name` is already complete (a resumed run does not write it again)."""

    def write(self, name: str, files: dict[str, bytes]) -> None:
        """Write the files of snapshot `name` in order, each whole."""

    def write_tokenizer(self, text: str) -> None:
        """The run's tokenizer, once beside its snapshots."""


class FolderSnapshots:
    """Snapshots in a local folder: each file written whole (write, then rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def has(self, name: str) -> bool:
        folder = self.root / name
        record = folder / SNAPSHOT_FILE
        sizes = {p.name: p.stat().st_size for p in folder.glob("*") if p.is_file()} if folder.is_dir() else {}
        return snapshot_problem(record.read_text() if record.is_file() else None, sizes) is None

    def write(self, name: str, files: dict[str, bytes]) -> None:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, data in files.items():
            _write_whole(folder / file_name, data)

    def write_tokenizer(self, text: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / TOKENIZER_FILE).is_file():
            _write_whole(self.root / TOKENIZER_FILE, text.encode())


def _write_whole(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def list_snapshots(root: Path) -> list[dict[str, Any]]:
    """The complete snapshots in a local folder, by step: their snapshot.json records plus `path` and `bytes`."""
    found = []
    for folder in sorted(Path(root).glob("step_*")):
        if SNAPSHOT_PATTERN.match(folder.name) and FolderSnapshots(Path(root)).has(folder.name):
            record = json.loads((folder / SNAPSHOT_FILE).read_text())
            found.append({**record, "path": str(folder), "bytes": sum(record["files"].values())})
    return sorted(found, key=lambda r: r["step"])


def write_checkpoint_files(folder: Path) -> None:
    """Make a local snapshot folder (with tokenizer.json copied in) readable as a checkpoint:
    config.json from its record. `load_checkpoint` then loads it in float32 whatever its dtype."""
    record = json.loads((Path(folder) / SNAPSHOT_FILE).read_text())
    (Path(folder) / "config.json").write_text(json.dumps(record["config"], indent=2))


def model_from_snapshot(record: dict[str, Any], weights: bytes) -> Transformer:
    """The float32 model of a snapshot from its record and the bytes of its weights file, in eval mode."""
    import torch
    from safetensors.torch import load

    from .config import ModelConfig, from_dict
    from .transformer import Transformer

    model = Transformer(from_dict(ModelConfig, record["config"]["model"]))
    model.load_state_dict({name: tensor.to(torch.float32) for name, tensor in load(weights).items()})
    return model.eval()
