"""Where the project keeps what it downloads and derives, and where an offline data mirror is: read by the data and
the tokenizers alike."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where tokenizers and packed windows are cached (env SWEEP_CACHE_DIR)."""
    return Path(os.environ.get("SWEEP_CACHE_DIR", Path.home() / ".cache" / "circuit-sweep"))


def data_mirror() -> Path | None:
    """The offline mirror of datasets and tokenizers (env SWEEP_DATA_DIR), or None: the Hub."""
    mirror = os.environ.get("SWEEP_DATA_DIR")
    return Path(mirror).expanduser() if mirror else None
