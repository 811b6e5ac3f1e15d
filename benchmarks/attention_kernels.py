"""Forward + backward time of causal attention, CPU flash kernel vs math kernel, at the sweep's context lengths.

Why `model/transformer.py` picks the math kernel on CPU up to 512 tokens.

    python benchmarks/attention_kernels.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BATCH, HEADS, D_HEAD, REPEATS = 50, 8, 32, 20


def milliseconds(backend: SDPBackend, q, k, v) -> float:
    with sdpa_kernel(backend):
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        started = time.perf_counter()
        for _ in range(REPEATS):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return (time.perf_counter() - started) / REPEATS * 1000


def main() -> None:
    torch.manual_seed(0)
    print(f"[{BATCH}, {HEADS}, T, {D_HEAD}] bf16, forward + backward, {torch.get_num_threads()} threads")
    for seq_len in (20, 64, 80, 128, 192, 256, 512):
        q, k, v = (torch.randn(BATCH, HEADS, seq_len, D_HEAD, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        flash = milliseconds(SDPBackend.FLASH_ATTENTION, q, k, v)
        math_kernel = milliseconds(SDPBackend.MATH, q, k, v)
        print(f"T={seq_len:4d}: flash {flash:7.2f} ms, math {math_kernel:7.2f} ms ({flash / math_kernel:4.2f}x)")


if __name__ == "__main__":
    main()
