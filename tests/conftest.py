"""Shared fixtures: isolated caches, small data written by the tests, the real data mirror."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = (
    "the a movie film actor plot scene great bad boring funny story ending music camera love hate "
    "watch again never always really quite truly director script character was is were and but"
).split()


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Every test gets its own caches and never reaches the Hub or a real AWS account."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SWEEP_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("SWEEP_STORAGE", raising=False)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def write_reviews(path: Path, count: int = 400, seed: int = 0) -> list[str]:
    """Short pseudo-reviews as JSON lines; deterministic."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


@pytest.fixture
def reviews_file(tmp_path) -> Path:
    path = tmp_path / "reviews.jsonl"
    write_reviews(path)
    return path


@pytest.fixture
def data_mirror(monkeypatch) -> Path:
    """The real IMDB / WikiText-2 mirror beside the checkout."""
    assert SHARED_DATA.is_dir(), f"the data mirror {SHARED_DATA} is missing"
    monkeypatch.setenv("SWEEP_DATA_DIR", str(SHARED_DATA))
    return SHARED_DATA


def run_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this one plus `extra`."""
    env = dict(os.environ)
    env.update(extra)
    return env
