"""Export to TransformerLens: `HookedTransformerConfig` keyword arguments and a state dict in its layout.

    cfg = HookedTransformerConfig(**json.load(open("hooked_transformer_config.json")))
    model = HookedTransformer(cfg)
    model.load_state_dict(torch.load("state_dict.pt", weights_only=True))

gives the same logits and attention patterns as the checkpoint (tested with
transformer-lens 3.9); in 4.x, which removed HookedTransformer, the same files load
into `TransformerBridge.boot_native` through `convert_tl_checkpoint` (tested with 4.3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .transformer import Transformer

CONFIG_FILE = "hooked_transformer_config.json"
STATE_FILE = "state_dict.pt"


def hooked_transformer_config(model: Transformer) -> dict[str, Any]:
    cfg = model.cfg
    values: dict[str, Any] = {
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_ctx": cfg.seq_len,
        "d_head": cfg.d_head,
        "n_heads": cfg.n_heads,
        "d_vocab": cfg.vocab_size,
        "d_vocab_out": cfg.vocab_size,
        "attn_only": not cfg.mlp,
        "normalization_type": "LN" if cfg.norm == "ln" else None,
        "positional_embedding_type": "standard",
        "eps": 1e-5,  # nn.LayerNorm's default
        "default_prepend_bos": False,
    }
    if cfg.mlp:
        values |= {"d_mlp": cfg.mlp_width, "act_fn": "gelu"}  # exact (erf) GELU, as F.gelu
    return values


@torch.no_grad()
def transformer_lens_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights renamed and reshaped to TransformerLens' names; absent biases are zeros."""
    cfg = model.cfg
    state: dict[str, torch.Tensor] = {
        "embed.W_E": model.embed.weight,  # (vocab, C)
        "pos_embed.W_pos": model.pos_embed.weight,  # (n_ctx, C)
        "unembed.W_U": model.unembed.weight.T,  # (C, vocab)
        "unembed.b_U": torch.zeros(cfg.vocab_size),
    }
    if cfg.norm == "ln":
        state |= {"ln_final.w": model.ln_final.weight, "ln_final.b": model.ln_final.bias}
    for layer, block in enumerate(model.blocks):
        prefix = f"blocks.{layer}"
        attn = block.attn
        state |= {
            f"{prefix}.attn.W_Q": attn.W_Q,  # (nh, C, hs)
            f"{prefix}.attn.W_K": attn.W_K,
            f"{prefix}.attn.W_V": attn.W_V,
            f"{prefix}.attn.W_O": attn.W_O,  # (nh, hs, C)
            f"{prefix}.attn.b_Q": torch.zeros(cfg.n_heads, cfg.d_head),
            f"{prefix}.attn.b_K": torch.zeros(cfg.n_heads, cfg.d_head),
            f"{prefix}.attn.b_V": torch.zeros(cfg.n_heads, cfg.d_head),
            f"{prefix}.attn.b_O": torch.zeros(cfg.d_model),
            # buffers TransformerLens keeps in its state dict
            f"{prefix}.attn.mask": torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool).tril(),
            f"{prefix}.attn.IGNORE": torch.tensor(-torch.inf),
        }
        if cfg.norm == "ln":
            state |= {f"{prefix}.ln1.w": block.ln_attn.weight, f"{prefix}.ln1.b": block.ln_attn.bias}
        if cfg.mlp:
            state |= {
                f"{prefix}.mlp.W_in": block.mlp.up.weight.T,  # (C, d_mlp)
                f"{prefix}.mlp.b_in": block.mlp.up.bias,
                f"{prefix}.mlp.W_out": block.mlp.down.weight.T,  # (d_mlp, C)
                f"{prefix}.mlp.b_out": block.mlp.down.bias,
            }
            if cfg.norm == "ln":
                state |= {f"{prefix}.ln2.w": block.ln_mlp.weight, f"{prefix}.ln2.b": block.ln_mlp.bias}
    return {
        name: tensor.detach().cpu().float().contiguous() if tensor.is_floating_point() else tensor.cpu()
        for name, tensor in state.items()
    }


LOADING_README = """# A circuit-sweep export for TransformerLens

Load it with transformer-lens 3.x:

```python
import json, torch
from tokenizers import Tokenizer
from transformer_lens import HookedTransformer, HookedTransformerConfig

cfg = HookedTransformerConfig(**json.load(open("hooked_transformer_config.json")))
model = HookedTransformer(cfg)
model.load_state_dict(torch.load("state_dict.pt", weights_only=True))
tokenizer = Tokenizer.from_file("tokenizer.json")
tokens = torch.tensor([tokenizer.encode("This movie is").ids])
logits, cache = model.run_with_cache(tokens)  # cache["pattern", 0]: layer 0's attention patterns
```

With transformer-lens 4.x (HookedTransformer is gone; the same files load into a native TransformerBridge):

```python
import json, torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

cfg = TransformerBridgeConfig(**json.load(open("hooked_transformer_config.json")))
model = TransformerBridge.boot_native(cfg)
model.load_state_dict(convert_tl_checkpoint(torch.load("state_dict.pt", weights_only=True), cfg), strict=True)
```

The model has no BOS token: pass token ids as they are (`prepend_bos=False` for strings).
"""


def export_transformer_lens(model: Transformer, out: str | Path, tokenizer: Path | None = None) -> list[Path]:
    """Write hooked_transformer_config.json, state_dict.pt, the tokenizer and a README on loading them into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(hooked_transformer_config(model), indent=2))
    torch.save(transformer_lens_state_dict(model), out / STATE_FILE)
    written = [out / CONFIG_FILE, out / STATE_FILE]
    if tokenizer is not None and Path(tokenizer).is_file():
        (out / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
        written.append(out / "tokenizer.json")
    (out / "README.md").write_text(LOADING_README)
    return [*written, out / "README.md"]
