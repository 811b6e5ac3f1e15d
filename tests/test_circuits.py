"""Circuits on hand-built models where the answer is known: OV, QK, skip-trigram and bigram tables,
mean ablation, and the in-context-learning score."""

import numpy as np
import pytest
import torch

from model.analysis import head_scores
from model.circuits import icl_score, mean_ablation, token_frequencies, token_tables
from model.config import ModelConfig, TrainConfig
from model.tokenizers import TextTokenizer, synthetic_tokenizer
from model.train import Trainer
from model.transformer import Transformer

VOCAB = 8


def hand_built(heads: int = 1, ov_shift: int = 1) -> Transformer:
    """One attention-only layer, no LayerNorm, one-hot embeddings: every circuit is a permutation we choose.

    OV of head 0 sends token a to a + `ov_shift`; its QK makes query a attend to key a + 3;
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
        W_O[:d_head, :VOCAB] = shift(ov_shift)  # value of a writes a + ov_shift
        attn.qkv.weight.copy_(torch.cat([W_Q.T, W_K.T, W_V.T]))
        attn.out.weight.copy_(W_O.T)
    return model.eval()


def names(i: int) -> str:
    return f"t{i}"


@pytest.mark.parametrize("ov_shift", [0, 1])  # 0: a copying head, whose OV circuit is the identity
def test_token_tables_read_the_circuits_off_the_weights(ov_shift):
    model = hand_built(ov_shift=ov_shift)
    frequencies = torch.arange(VOCAB, 0, -1)  # t0 most frequent
    tables = token_tables(model, names, frequencies)
    head = tables["heads"][0]
    assert [row["token"] for row in head["ov"]] == [f"t{i}" for i in range(VOCAB)]
    assert len(head["qk"]) == len(tables["direct_path"]) == VOCAB and len(head["skip_trigrams"]) >= VOCAB
    assert all(
        row["top"][0][0] == f"t{(i + ov_shift) % VOCAB}" for i, row in enumerate(head["ov"])
    )  # OV: a raises a + shift
    assert all(row["top"][0][0] == f"t{(i + 3) % VOCAB}" for i, row in enumerate(head["qk"]))  # QK: a attends a + 3
    assert all(row["top"][0][0] == row["token"] for row in tables["direct_path"])  # bigram path: identity
    # skip-trigrams "a ... a+3 -> a+3+shift": attend to a + 3, which raises a + 3 + shift
    for trigram in head["skip_trigrams"][:VOCAB]:
        a = int(trigram["a"][1:])
        assert trigram["b"] == f"t{(a + 3) % VOCAB}" and trigram["c"] == f"t{(a + 3 + ov_shift) % VOCAB}"


def test_token_tables_see_the_embeddings_through_layernorm():
    """Through a LayerNorm, the scale of the token embeddings changes neither what a token predicts directly nor
    what it attends to; a head's output, though, meets the final norm beside the embeddings, so its share shrinks
    as they grow: the OV table must scale by exactly that."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB * 8, d_model=32, n_heads=2, seq_len=8)).eval()
    frequencies = torch.arange(VOCAB * 8, 0, -1)
    with torch.no_grad():
        model.embed.weight.mul_(50.0)  # embeddings of unit scale, where LayerNorm's eps no longer matters
        for block in model.blocks:  # heads as sharp and loud as trained ones (QK and OV entries near 1)
            block.attn.qkv.weight.mul_(10.0)
            block.attn.out.weight.mul_(10.0)
        before = token_tables(model, names, frequencies)
        model.embed.weight.mul_(20.0)
    after = token_tables(model, names, frequencies)

    def values(rows, scale=1.0):
        return [
            (row["token"], [(token, pytest.approx(value * scale, abs=2e-4)) for token, value in row["top"]])
            for row in rows
        ]

    assert values(after["direct_path"]) == values(before["direct_path"])
    for table in (before["direct_path"], before["heads"][0]["qk"], before["heads"][0]["ov"]):  # logits, not vanishing
        assert max(abs(value) for row in table for _, value in row["top"]) > 0.1
    for head_before, head_after in zip(before["heads"], after["heads"]):
        assert values(head_after["qk"]) == values(head_before["qk"])
        assert [[t for t, _ in row["top"]] for row in head_after["ov"]] == [
            [t for t, _ in row["top"]] for row in head_before["ov"]
        ]
        assert values(head_after["ov"]) == values(head_before["ov"], scale=1 / 20)


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


# ---------------------------------------------------------------- icl_score of whole models

DATA_VOCAB, PERIOD = 32, 16  # windows r + r of 16 distinct tokens: seq_len 31 input positions


def evaluator(windows: np.ndarray) -> Trainer:
    """A Trainer whose held-out sample is `windows`: its evaluate() is the icl_score every iteration reports."""
    tokenizer = TextTokenizer(synthetic_tokenizer(DATA_VOCAB), "synthetic")
    model_cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=4 * tokenizer.vocab_size, n_heads=1, n_layers=2,
                            seq_len=windows.shape[1] - 1, norm="none")
    train_cfg = TrainConfig(
        batch_size=8, max_tokens=1000, eval_every_tokens=1000, eval_tokens=windows.size, dtype="float32"
    )
    return Trainer(model_cfg, train_cfg, windows, windows, tokenizer)


def repeated_windows(rows: int) -> np.ndarray:
    generator = np.random.default_rng(0)
    first = np.stack([generator.permutation(DATA_VOCAB)[:PERIOD] for _ in range(rows)])
    return np.concatenate([first, first], axis=1).astype(np.int32)  # [rows, 2n]: r + r


def wire_induction_circuit(model: Transformer, sharp: float = 20.0) -> None:
    """Two attention-only layers built to copy: the canonical induction circuit.

    Residual blocks (one-hot): token | position | previous token | output. Layer 0's head
    attends from position i to i - 1 (positions only) and writes that token into "previous
    token"; layer 1's head matches the current token against each key's previous token, so in
    the second copy of r + r it attends to the token after the earlier occurrence and writes it
    into "output", which alone the unembedding reads.
    """
    vocab, length = model.cfg.vocab_size, model.cfg.seq_len
    token, position, previous, output = (slice(k * vocab, (k + 1) * vocab) for k in range(4))
    position = slice(vocab, vocab + length)  # fits: 4 * vocab >= 3 * vocab + length
    width, eye = model.cfg.d_model, torch.eye(vocab)
    scale = sharp * width ** 0.25  # q . k / sqrt(d_head) = sharp^2 on a match
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.embed.weight[:, token] = eye
        model.pos_embed.weight[:, position] = torch.eye(length)
        previous_token, induction = model.blocks[0].attn, model.blocks[1].attn
        q, k, v, o = (torch.zeros(width, width) for _ in range(4))  # x @ W (row vectors), one head of width d_model
        q[position, :length] = scale * torch.eye(length)
        k[position, :length] = scale * torch.roll(torch.eye(length), 1, dims=1)  # key j answers query j + 1
        k[position.stop - 1, :length] = 0  # (the roll would wrap the last position round to the first)
        v[token, :vocab], o[:vocab, previous] = eye, eye
        previous_token.qkv.weight.copy_(torch.cat([q.T, k.T, v.T]))
        previous_token.out.weight.copy_(o.T)
        q, k, v, o = (torch.zeros(width, width) for _ in range(4))
        q[token, :vocab], k[previous, :vocab] = scale * eye, scale * eye  # query a finds keys preceded by a
        v[token, :vocab], o[:vocab, output] = eye, eye
        induction.qkv.weight.copy_(torch.cat([q.T, k.T, v.T]))
        induction.out.weight.copy_(o.T)
        model.unembed.weight[:, output] = sharp * eye


def test_icl_score_of_a_perfect_copier_on_repeated_tokens_is_strongly_negative():
    trainer = evaluator(repeated_windows(64))
    wire_induction_circuit(trainer.model)
    metrics = trainer.evaluate()
    # Early in the window nothing repeats (loss of a guess among 34 tokens, at least); in the last
    # tenth every token is copied from the first half (loss near 0).
    assert metrics["icl_score"] < -3.0, metrics


def test_icl_score_of_a_model_that_ignores_its_context_is_about_zero():
    trainer = evaluator(repeated_windows(512))
    with torch.no_grad():  # a random bigram model: attention writes nothing, positions add nothing
        for block in trainer.model.blocks:
            block.attn.out.weight.zero_()
        trainer.model.pos_embed.weight.zero_()
    metrics = trainer.evaluate()
    assert metrics["test_loss"] > 3.0 and abs(metrics["icl_score"]) < 0.1, metrics


def test_the_wired_induction_circuit_is_read_back_by_the_head_scores_ablation_and_composition():
    trainer = evaluator(repeated_windows(64))
    wire_induction_circuit(trainer.model)
    document = head_scores(trainer.model, trainer.eval_windows, ablate=True)
    previous_token, induction = document["heads"]
    assert previous_token["scores"]["previous_token"] > 0.95 and {"previous_token", "matters"} <= set(
        previous_token["labels"]
    )
    # The probe draws r without repeats, so the hand-wired head scores near what an ideal one does (1.0; its
    # softmax is finite).
    assert induction["scores"]["induction"] > 0.95 and {"induction", "matters"} <= set(induction["labels"])
    assert induction["ablation"]["repeated"] > 1.0  # removing it costs the copy
    # The previous-token head feeds the induction head's keys only: K-composition, no Q or V path.
    composition = document["composition"]
    assert (
        composition["k"][0][0][1][0] > 0.1 and composition["q"][0][0][1][0] == 0 and composition["v"][0][0][1][0] == 0
    )
