"""Trial-loop tokens/s in fp32 vs bf16 autocast, and what `--dtype auto` picks here.

bf16 pays off only where the CPU multiplies bf16 natively (AMX or
AVX512-BF16); elsewhere the matmuls are emulated. `--dtype auto` reads
/proc/cpuinfo and picks bf16 only on such CPUs. This prints both rates side by
side so the choice can be checked on any machine.

    python benchmarks/autocast_dtype.py
    python benchmarks/autocast_dtype.py --smoke-test
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from model.config import ModelConfig, TrainConfig
from model.tokenizers import TextTokenizer, synthetic_tokenizer
from model.train import Trainer, cpu_has_native_bf16, resolve_autocast_dtype

SHAPES = {
    "induction preset (vocab 64, d_model 64, 2 layers, seq 64, batch 32)": dict(
        vocab=64, d_model=64, heads=4, layers=2, seq_len=64, batch=32
    ),
    "study shape (vocab 8192, d_model 256, 1 layer, seq 80, batch 50)": dict(
        vocab=8192, d_model=256, heads=8, layers=1, seq_len=80, batch=50
    ),
    "gpt2 vocabulary (vocab 50257, d_model 128, 1 layer, seq 64, batch 50)": dict(
        vocab=50257, d_model=128, heads=8, layers=1, seq_len=64, batch=50
    ),
}


def tokens_per_second(shape: dict, dtype: str, steps: int) -> float:
    torch.manual_seed(0)
    windows = np.random.default_rng(0).integers(1, shape["vocab"], size=(1024, shape["seq_len"] + 1), dtype=np.int32)
    tokenizer = TextTokenizer(synthetic_tokenizer(shape["vocab"]), "synthetic")  # only its size matters
    model_cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=shape["d_model"], n_heads=shape["heads"],
                            n_layers=shape["layers"], seq_len=shape["seq_len"])
    tokens = shape["batch"] * shape["seq_len"]
    train_cfg = TrainConfig(lr=1e-3, batch_size=shape["batch"], max_tokens=tokens * (steps + 3) * 2,
                            eval_every_tokens=tokens * steps, eval_tokens=tokens, dtype=dtype)
    trainer = Trainer(model_cfg, train_cfg, windows, windows[:64], tokenizer)
    trainer.steps_per_iteration = 3
    trainer.train_iteration()  # warm-up
    trainer.steps_per_iteration = steps
    return trainer.train_iteration()["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per measurement (bf16 without AMX takes minutes)")
    parser.add_argument("--smoke-test", action="store_true", help="2 steps per measurement")
    args = parser.parse_args()
    steps = 2 if args.smoke_test else args.steps
    auto = resolve_autocast_dtype("auto", torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}, "
          f"--dtype auto picks {auto or 'float32'}")
    for name, shape in SHAPES.items():
        fp32 = tokens_per_second(shape, "float32", steps)
        bf16 = tokens_per_second(shape, "bfloat16", steps)
        print(f"{name}: float32 {fp32:9,.0f} tok/s, bfloat16 {bf16:9,.0f} tok/s ({bf16 / fp32:5.2f}x)", flush=True)


if __name__ == "__main__":
    main()
