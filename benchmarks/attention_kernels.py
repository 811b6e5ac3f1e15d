"""Forward + backward time of causal attention on CPU: flash kernel, math kernel, and written out.

Why `model/transformer.py` writes attention out (two batched matmuls and a softmax) on CPU up to
128 tokens, and leaves longer contexts to the fused flash kernel. Two head shapes: the study's
(batch 50, 8 heads of 32) and the induction preset's (batch 32, 4 heads of 16). Written out is
measured eagerly and under torch.compile (the induction preset compiles), always as the model runs
it: q scaled, q @ k^T in bf16, a cached causal bias, softmax, @ v. Ratios are against flash.

    python benchmarks/attention_kernels.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.transformer import causal_bias

REPEATS = 20
SHAPES = {"study (50 x 8 heads x 32)": (50, 8, 32), "induction (32 x 4 heads x 16)": (32, 4, 16)}


def written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q * (1.0 / q.shape[-1] ** 0.5)) @ k.transpose(-2, -1)
    scores = scores + causal_bias(q.shape[-2], q.device, scores.dtype)
    return scores.softmax(dim=-1) @ v


def milliseconds(attend, q, k, v) -> float:
    for _ in range(3):
        attend(q, k, v).sum().backward()
    started = time.perf_counter()
    for _ in range(REPEATS):
        attend(q, k, v).sum().backward()
    return (time.perf_counter() - started) / REPEATS * 1000


def sdpa(backend: SDPBackend):
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads [all]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    compiled = torch.compile(written_out, dynamic=False)
    print(f"bf16, forward + backward, ms per call, {torch.get_num_threads()} threads")
    for shape_name, (batch, heads, d_head) in SHAPES.items():
        print(shape_name)
        for seq_len in (20, 64, 80, 128, 192, 256, 512):
            q, k, v = (torch.randn(batch, heads, seq_len, d_head, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            flash = milliseconds(sdpa(SDPBackend.FLASH_ATTENTION), q, k, v)
            times = {"math": milliseconds(sdpa(SDPBackend.MATH), q, k, v),
                     "written out": milliseconds(written_out, q, k, v),
                     "written out, compiled": milliseconds(compiled, q, k, v)}
            cells = ", ".join(f"{name} {ms:7.2f} ({flash / ms:4.2f}x)" for name, ms in times.items())
            print(f"  T={seq_len:4d}: flash {flash:7.2f}, {cells}")


if __name__ == "__main__":
    main()
