"""Invariants of the transformer: masks, the two attention paths, padding, learning."""

import pytest
import torch

from model import transformer
from model.config import ConfigError, ModelConfig
from model.transformer import PAD_ID, Transformer, unembed_cross_entropy


def tiny(**overrides) -> Transformer:
    values = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=2, seq_len=12) | overrides
    torch.manual_seed(0)
    return Transformer(ModelConfig(**values)).eval()


def test_patterns_are_causal_and_rows_sum_to_one():
    model = tiny()
    tokens = torch.randint(0, 50, (3, 12))
    _, patterns = model.run_with_patterns(tokens)
    assert len(patterns) == 2
    for pattern in patterns:
        assert pattern.shape == (3, 4, 12, 12)
        assert torch.allclose(pattern.sum(-1), torch.ones(3, 4, 12), atol=1e-5)
        above_diagonal = torch.ones(12, 12, dtype=torch.bool).triu(1)
        assert pattern[..., above_diagonal].abs().max() == 0
    # the head scores read the same patterns without the unembedding
    assert all(torch.equal(a, b) for a, b in zip(model.attention_patterns(tokens), patterns, strict=True))


@pytest.mark.parametrize("kernel", ["written out", "sdpa"])
@pytest.mark.parametrize("mlp, padded", [(False, False), (True, False), (False, True)])
def test_training_attention_agrees_with_the_pattern_path(mlp, padded, kernel, monkeypatch):
    """Both training paths (written out on CPU up to 256 tokens, the fused kernel beyond and on GPU)
    give the logits and gradients of the explicit path that returns the patterns."""
    if kernel == "sdpa":
        monkeypatch.setattr(transformer, "CPU_EXPLICIT_ATTENTION_MAX_LEN", 0)
    model = tiny(mlp=mlp)
    tokens = torch.randint(0, 50, (4, 12))
    if padded:
        tokens[0, 7:] = PAD_ID
    fused = model(tokens)
    explicit, _ = model.run_with_patterns(tokens)
    assert torch.allclose(fused, explicit, atol=1e-5)
    targets = torch.randint(0, 50, (4, 12))
    gradients = []
    for run in (lambda: model(tokens), lambda: model._run(tokens, return_patterns=True)[0]):
        model.zero_grad()
        torch.nn.functional.cross_entropy(run().reshape(-1, 50), targets.reshape(-1)).backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
    for fast, reference in zip(*gradients):
        assert torch.allclose(fast, reference, atol=1e-6)


def test_padding_never_gives_nan_and_pads_are_not_attended():
    model = tiny()
    tokens = torch.randint(0, 50, (3, 12))
    tokens[0, 5:] = PAD_ID  # right padding
    tokens[1, :4] = PAD_ID  # left padding: early rows have no real key at all
    tokens[2, :] = PAD_ID  # nothing real
    targets = tokens.roll(-1, dims=1)
    logits, loss = model(tokens, targets)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(loss)
    _, patterns = model.run_with_patterns(tokens)
    assert all(torch.isfinite(p).all() for p in patterns)
    # a real query after the pads never looks at a pad key
    assert patterns[0][1, :, 6, :4].abs().max() == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_ignores_padded_targets():
    model = tiny()
    tokens = torch.randint(0, 50, (2, 12))
    targets = torch.randint(0, 50, (2, 12))
    padded = targets.clone()
    padded[:, 8:] = PAD_ID
    _, full = model(tokens, targets)
    _, partial = model(tokens, padded)
    logits = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 50), targets[:, :8].reshape(-1))
    assert torch.allclose(partial, expected, atol=1e-5)
    assert not torch.allclose(full, partial)


@pytest.mark.parametrize("chunk_size", [5, 4096])
def test_fused_training_loss_matches_logits_loss_and_gradients(chunk_size):
    """The fused unembedding + cross entropy is the same loss, with the same gradients, as the logits path."""
    tokens = torch.randint(0, 50, (3, 12))
    targets = torch.randint(0, 50, (3, 12))
    targets[1, 7:] = PAD_ID
    reference, fused = tiny().train(), tiny().train()
    _, expected = reference(tokens, targets)
    (2 * expected).backward()
    residual, _ = fused._residual(tokens, return_patterns=False)
    loss = unembed_cross_entropy(residual.reshape(-1, 32), fused.unembed.weight, targets.reshape(-1), chunk_size)
    (2 * loss).backward()
    assert torch.allclose(loss, expected, atol=1e-5)
    for (name, a), b in zip(reference.named_parameters(), fused.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_fused_training_loss_under_bf16_autocast_is_close():
    model = tiny().train()
    tokens, targets = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    _, expected = model(tokens, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_loss(tokens, targets)
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) < 0.02
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_per_head_weights_reconstruct_attention_output():
    model = tiny(n_layers=1)
    attn = model.blocks[0].attn
    x = torch.randn(2, 12, 32)
    output, pattern = attn(x, None, return_pattern=True)
    v = torch.einsum("btc,hcd->bhtd", x, attn.W_V)
    q = torch.einsum("btc,hcd->bhtd", x, attn.W_Q)
    k = torch.einsum("btc,hcd->bhtd", x, attn.W_K)
    scores = (q @ k.transpose(-1, -2)) / (8**0.5)
    scores = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(scores.softmax(-1), pattern, atol=1e-5)
    rebuilt = torch.einsum("bhqk,bhkd,hdc->bqc", pattern, v, attn.W_O)
    assert torch.allclose(rebuilt, output, atol=1e-5)


def test_tiny_model_overfits_one_batch():
    model = tiny(n_layers=1, d_model=64).train()
    tokens = torch.randint(0, 50, (4, 13))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_longer_input_than_context_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize(
    "values, flag",
    [
        (dict(d_model=64, n_heads=3), "--heads 3 does not divide --d-model 64"),
        (dict(seq_len=1), "--seq-len"),
        (dict(seq_len=100_000), "--seq-len"),
        (dict(n_layers=0), "--layers"),
    ],
)
def test_invalid_model_config_names_the_flag(values, flag):
    with pytest.raises(ConfigError, match=flag):
        ModelConfig(**values)
