"""Circuits on hand-built models where the answer is known: OV, QK, skip-trigram and bigram tables,
mean ablation, and the in-context-learning score."""

import torch

from model.circuits import icl_score, mean_ablation, token_frequencies, token_tables
from model.config import ModelConfig
from model.transformer import Transformer

VOCAB = 8


def hand_built(heads: int = 1) -> Transformer:
    """One attention-only layer, no LayerNorm, one-hot embeddings: every circuit is a permutation we choose.

    OV of head 0 sends token a to a + 1; its QK makes query a attend to key a + 3;
    the direct path W_E W_U is the identity (each token predicts itself).
    """
    d_head = VOCAB
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=VOCAB * heads, n_heads=heads, seq_len=8, norm="none"))
    width = VOCAB * heads
    with torch.no_grad():
        eye = torch.eye(VOCAB)
        shift = lambda k: torch.roll(eye, k, dims=1)  # noqa: E731  row a has its 1 at a + k
        embed = torch.zeros(VOCAB, width)
        embed[:, :VOCAB] = eye
        model.embed.weight.copy_(embed)
        model.pos_embed.weight.zero_()
        model.unembed.weight.copy_(embed)  # W_U = W_E^T: reads the first VOCAB dims back
        attn = model.blocks[0].attn
        W_Q, W_K, W_V = torch.zeros(width, width), torch.zeros(width, width), torch.zeros(width, width)
        W_O = torch.zeros(width, width)
        W_Q[:VOCAB, :d_head] = 4 * eye
        W_K[:VOCAB, :d_head] = 4 * shift(-3)  # key token b lands where query b - 3 looks: a attends a + 3
        W_V[:VOCAB, :d_head] = eye
        W_O[:d_head, :VOCAB] = shift(1)  # value of a writes a + 1
        attn.qkv.weight.copy_(torch.cat([W_Q.T, W_K.T, W_V.T]))
        attn.out.weight.copy_(W_O.T)
    return model.eval()


def names(i: int) -> str:
    return f"t{i}"


def test_token_tables_read_the_circuits_off_the_weights():
    model = hand_built()
    frequencies = torch.arange(VOCAB, 0, -1)  # t0 most frequent
    tables = token_tables(model, names, frequencies)
    head = tables["heads"][0]
    assert [row["token"] for row in head["ov"]] == [f"t{i}" for i in range(VOCAB)]
    assert all(row["top"][0][0] == f"t{(i + 1) % VOCAB}" for i, row in enumerate(head["ov"]))  # OV: a raises a + 1
    assert all(row["top"][0][0] == f"t{(i + 3) % VOCAB}" for i, row in enumerate(head["qk"]))  # QK: a attends a + 3
    assert all(row["top"][0][0] == row["token"] for row in tables["direct_path"])  # bigram path: identity
    # skip-trigrams "a ... a+3 -> a+4": attend to a + 3, which raises a + 4
    for trigram in head["skip_trigrams"][:VOCAB]:
        a = int(trigram["a"][1:])
        assert trigram["b"] == f"t{(a + 3) % VOCAB}" and trigram["c"] == f"t{(a + 4) % VOCAB}"


def test_token_tables_stay_within_the_frequent_tokens():
    model = Transformer(ModelConfig(vocab_size=5000, d_model=32, n_heads=2, n_layers=2, seq_len=8))
    frequencies = token_frequencies(torch.randint(0, 300, (64, 9)), 5000)
    tables = token_tables(model, names, frequencies)
    assert tables["frequent_tokens"] <= 300
    used = {int(row["token"][1:]) for head in tables["heads"] for row in head["ov"]}
    assert used <= set(frequencies.nonzero().flatten().tolist())
    assert "qk" in tables["heads"][0] and "qk" not in tables["heads"][2]  # layer-0 QK only
    assert not any("skip_trigrams" in head for head in tables["heads"])  # 2 layers: no skip-trigram reading


def test_mean_ablation_costs_nothing_for_a_head_that_writes_nothing():
    model = hand_built(heads=2)  # head 1 has W_O = 0: the model cannot be using it
    held_out = torch.randint(0, VOCAB, (16, 9))
    repeated = torch.randint(0, VOCAB, (16, 4)).repeat(1, 2)
    rises = mean_ablation(model, held_out, repeated, period=4)
    assert rises[0][1] == {"held_out": 0.0, "repeated": 0.0}
    assert abs(rises[0][0]["held_out"]) > 1e-3  # head 0 moves the logits: replacing it by its mean changes the loss


def test_icl_score_is_late_loss_minus_early_loss():
    losses = torch.linspace(5.0, 3.0, 20)  # loss falls along the context
    assert abs(icl_score(losses) - ((losses[18] + losses[19]) / 2 - losses[2])) < 1e-6
    assert icl_score(losses) < 0 and icl_score(torch.full((20,), 4.0)) == 0.0
