"""Top-k sampling, as the study continued "This movie is"."""

from __future__ import annotations

import torch

from .transformer import Transformer


@torch.no_grad()
def generate(
    model: Transformer, prompt_ids: list[int], new_tokens: int = 7, top_k: int = 10, seed: int = 0
) -> list[int]:
    """Prompt ids followed by `new_tokens` sampled ids; the context slides past seq_len."""
    if not prompt_ids:
        raise ValueError("the prompt is empty after tokenization; give a non-empty --prompt")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    was_training = model.training
    model.eval()
    for _ in range(new_tokens):
        context = torch.tensor([ids[-model.cfg.seq_len :]], device=device)
        logits = model(context)[0, -1].float().cpu()  # (vocab,)
        top_values, top_ids = logits.topk(min(top_k, logits.shape[-1]))
        choice = torch.multinomial(top_values.softmax(-1), 1, generator=generator)
        ids.append(int(top_ids[choice]))
    model.train(was_training)
    return ids
