"""Checkpoint folders: their files, the manifest that proves them complete, and loading them.

A checkpoint holds model.safetensors, config.json (model, train and data
config), tokenizer.json, trainer_state.pt (exact resume), the analysis files
(heads.json, sample.txt, heatmaps/) and manifest.json, written last, with the
size of every other file. Reading a checkpoint's manifest and config needs no
torch, so the read-only commands start fast; torch is imported only to load
weights or trainer state.

torch, safetensors and the model are imported inside the functions that load: `sweep best` and `sweep results` read
manifests and configs without them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import CheckpointError, ConfigError, ModelConfig, from_dict

if TYPE_CHECKING:
    from .tokenizers import TextTokenizer
    from .transformer import Transformer

CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt")
# Every iteration's head scores up to this checkpoint, as the run that continues from it saw them.
HISTORY_FILE = "history.json"
# Written last into every checkpoint: the size of each other file. A checkpoint whose files
# do not match it (a copy cut short by a full disk or a dropped connection) is incomplete.
MANIFEST_FILE = "manifest.json"


def is_checkpoint(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return all((directory / name).is_file() for name in ("model.safetensors", "config.json"))


def file_sizes(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file under `directory`."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def write_manifest(directory: Path) -> None:
    sizes = {name: size for name, size in file_sizes(directory).items() if name != MANIFEST_FILE}
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": sizes}, indent=1))


def manifest_problem(manifest_text: str | None, sizes: dict[str, int]) -> str | None:
    """Why a checkpoint with these file sizes does not match its manifest, or None when it does.

    Checkpoints written before manifests existed (manifest_text None) are taken as they are.
    """
    if manifest_text is None:
        return None
    try:
        expected = json.loads(manifest_text)["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is cut short"
    for name, size in expected.items():
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} holds {sizes[name]} of its {size} bytes"
    return None


def check_complete(directory: Path) -> None:
    """CheckpointError when a local checkpoint folder does not match its manifest."""
    manifest = directory / MANIFEST_FILE
    problem = manifest_problem(manifest.read_text() if manifest.exists() else None, file_sizes(directory))
    if problem:
        raise CheckpointError(f"{directory} is an incomplete checkpoint ({problem}); use an earlier one")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file, not a checkpoint folder; give the folder that holds model.safetensors "
            f"({directory.parent})"
        )
    if not is_checkpoint(directory):
        raise CheckpointError(f"{directory} is not a checkpoint: model.safetensors and config.json are missing")
    check_complete(directory)
    try:
        return json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{directory}/config.json is not valid JSON ({error})") from None


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """trainer_state.pt through the weights-only unpickler: no code in a checkpoint ever runs."""
    import torch

    try:
        return torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no trainer_state.pt; it cannot resume training") from None
    except Exception as error:  # UnpicklingError, RuntimeError: refuse anything but tensors
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{directory}/trainer_state.pt was refused by the weights-only loader ({first_line[:160]})"
        ) from None


def load_checkpoint_tokenizer(directory: str | os.PathLike) -> TextTokenizer:
    """The tokenizer saved beside a checkpoint's weights."""
    from .tokenizers import TextTokenizer, tokenizer_from_path

    read_config(directory)  # a clear error when the folder is not a checkpoint
    return TextTokenizer(tokenizer_from_path(Path(directory) / "tokenizer.json"), "checkpoint")


def load_checkpoint(directory: str | os.PathLike, device: str = "cpu") -> Transformer:
    """The trained model of a checkpoint folder, in eval mode."""
    from safetensors.torch import load_file

    from .transformer import Transformer

    config = read_config(directory)
    try:
        model_cfg = from_dict(ModelConfig, config["model"])
    except (KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(f"{directory}/config.json holds no valid model config ({error})") from None
    model = Transformer(model_cfg)
    try:
        model.load_state_dict(load_file(Path(directory) / "model.safetensors", device=device))
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{directory}/model.safetensors does not match its config ({error})") from None
    return model.to(device).eval()


def swap_in(directory: Path, target: Path) -> Path:
    """Move a complete checkpoint folder to `target` (same file system), replacing the old one.

    `target` always holds a complete checkpoint: the old one moves aside first
    and is deleted only after the new one is in place.
    """
    previous = target.with_name(target.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(directory, target)
    shutil.rmtree(previous, ignore_errors=True)
    return target
