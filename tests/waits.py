"""One bounded wait for every test: poll a condition until it holds, never longer than a deadline."""

from __future__ import annotations

import subprocess
import time
from typing import Any, Callable


def wait_for(condition: Callable[[], Any], timeout: float, what: str, alive: subprocess.Popen | None = None,
             interval: float = 0.1, required: bool = True) -> Any:
    """`condition()`'s first true value, polled every `interval` s. After `timeout` s: an AssertionError naming
    `what` (or, with required=False, the last false value); at once if the process `alive` ends first."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if alive is not None and alive.poll() is not None:
            output = alive.communicate()
            raise AssertionError(f"{what}: the process ended first (exit {alive.returncode}): "
                                 f"{''.join(part or '' for part in output)[-3000:]}")
        if time.monotonic() >= deadline:
            assert not required, f"{what}: not within {timeout:g} s"
            return value
        time.sleep(interval)
    return value
