"""The TransformerLens export reproduces our logits and attention patterns in HookedTransformer."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformer_lens import HookedTransformer, HookedTransformerConfig

from model.config import ModelConfig
from model.export import export_transformer_lens
from model.transformer import Transformer


def perturbed_model(**overrides) -> Transformer:
    """A random model whose norms are not the identity, so every weight is exercised."""
    torch.manual_seed(0)
    values = dict(vocab_size=97, d_model=32, n_heads=4, n_layers=2, seq_len=16) | overrides
    model = Transformer(ModelConfig(**values))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("overrides", [{}, {"mlp": True}, {"norm": "none"}, {"mlp": True, "n_layers": 1}])
def test_hooked_transformer_reproduces_logits_and_patterns(tmp_path, overrides):
    model = perturbed_model(**overrides)
    export_transformer_lens(model, tmp_path)
    config = HookedTransformerConfig(**json.loads((tmp_path / "hooked_transformer_config.json").read_text()))
    hooked = HookedTransformer(config)
    hooked.load_state_dict(torch.load(tmp_path / "state_dict.pt", weights_only=True), strict=True)
    hooked.eval()
    tokens = torch.randint(0, 97, (3, 16))
    logits, patterns = model.run_with_patterns(tokens)
    hooked_logits, cache = hooked.run_with_cache(tokens)
    assert torch.allclose(hooked_logits, logits, atol=1e-4)
    for layer, pattern in enumerate(patterns):
        assert torch.allclose(cache[f"blocks.{layer}.attn.hook_pattern"], pattern, atol=1e-5)


def test_sweep_export_command(tmp_path, reviews_file):
    from sweep.cli import main

    runner = CliRunner()
    trained = runner.invoke(
        main,
        [
            "train",
            str(reviews_file),
            "--tokenizer",
            "bytes",
            "--heads",
            "2",
            "--d-model",
            "16",
            "--seq-len",
            "16",
            "--batch-size",
            "8",
            "--max-tokens",
            "256",
            "--eval-every-tokens",
            "256",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(
        main,
        ["export", str(tmp_path / "run" / "checkpoint"), "--format", "transformer-lens", "--out", str(tmp_path / "tl")],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "tl" / "hooked_transformer_config.json").read_text())
    assert config["d_vocab"] == 257 and config["attn_only"] is True
    bad = runner.invoke(main, ["export", str(tmp_path), "--format", "transformer-lens", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "is not a checkpoint" in bad.stderr
