"""Seconds to prepare IMDB (25k train + 25k test reviews): cold, with a cached tokenizer, fully cached.

Preparation = read the parquet mirror, train the BPE tokenizer (cold only),
tokenize every review with the Rust batch encoder (all cores), pack into
windows, write the window cache. A sweep does this once per distinct
(tokenizer, seq_len) on the driver; a second sweep reads the cache.

    SWEEP_DATA_DIR=../shared/data python benchmarks/data_prep.py
"""

from __future__ import annotations

import os
import tempfile
import time

from model.config import DataConfig
from model.data import prepare_data


def timed(cfg: DataConfig, seq_len: int) -> tuple[float, int]:
    started = time.perf_counter()
    data = prepare_data(cfg, seq_len)
    return time.perf_counter() - started, len(data.train) + len(data.test)


def main() -> None:
    cfg = DataConfig(dataset="imdb", tokenizer="bpe:8192")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SWEEP_CACHE_DIR"] = cache
        cold, windows = timed(cfg, 80)
        print(f"cold (BPE training + tokenize + pack, seq_len 80): {cold:6.1f}s, {windows:,} windows")
        tokenizer_cached, windows = timed(cfg, 50)
        print(f"tokenizer cached, new seq_len 50 (tokenize + pack): {tokenizer_cached:6.1f}s, {windows:,} windows")
        cached, _ = timed(cfg, 80)
        print(f"fully cached (a second sweep), seq_len 80:           {cached:6.1f}s")


if __name__ == "__main__":
    main()
