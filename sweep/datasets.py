"""A sweep's data, prepared once on the driver: tokenized and packed per distinct (tokenizer, seq_len), put in
Ray's object store, and handed to every trial by reference."""

from __future__ import annotations

import time
from typing import Any, Callable

import ray

from model.data import prepare_data, repetition_warning

from .plan import Plan
from .space import data_config, data_key


def prepare_datasets(plan: Plan, log_line: Callable[[str], None]) -> dict[str, Any]:
    """Tokenize and pack once per distinct (tokenizer, seq_len); put each in the object store."""
    refs = {}
    for trial in plan.trials:
        key = data_key(trial)
        if key in refs:
            continue
        data_cfg = data_config(trial)
        started = time.perf_counter()
        data = prepare_data(data_cfg, trial["seq_len"], log_line)
        log_line(
            f"data {key}: {data.train.shape[0]:,} train / {data.test.shape[0]:,} test windows in "
            f"{time.perf_counter() - started:.1f}s"
        )
        longest = max(int(t.get("max_tokens", 0)) for t in plan.trials if data_key(t) == key)
        if warning := repetition_warning(data_cfg, data.train, longest):
            log_line(warning)
        refs[key] = ray.put((data.train, data.test, data.tokenizer.backend.to_str()))
        plan.vocab_sizes[key] = data.tokenizer.vocab_size
    return refs
