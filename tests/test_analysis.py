"""Head scores on hand-built inputs, and heads.json for a real model."""

import json
import math

import pytest
import torch

from model.analysis import (
    AnalysisConfig,
    composition_baseline,
    composition_excess,
    composition_null,
    composition_scores,
    copying_scores,
    head_scores,
    pattern_scores,
    repeated_token_scores,
    write_analysis,
)
from model.config import ModelConfig
from model.tokenizers import TextTokenizer, byte_tokenizer
from model.transformer import Transformer

T = 10


def one_hot_pattern(key_of_query) -> torch.Tensor:
    """[1, 1, T, T] pattern where query i attends only to key key_of_query(i)."""
    pattern = torch.zeros(1, 1, T, T)
    for i in range(T):
        pattern[0, 0, i, key_of_query(i)] = 1.0
    return pattern


def test_previous_token_pattern():
    scores = pattern_scores(one_hot_pattern(lambda i: max(i - 1, 0)))
    assert scores["previous_token"].item() == pytest.approx(1.0)
    assert scores["first_token"].item() == pytest.approx(1 / (T - 1))  # only query 1, whose previous is 0
    assert scores["current_token"].item() == pytest.approx(1 / T)  # only query 0 attends to itself


def test_current_and_first_token_patterns():
    assert pattern_scores(one_hot_pattern(lambda i: i))["current_token"].item() == pytest.approx(1.0)
    first = pattern_scores(one_hot_pattern(lambda i: 0))
    assert first["first_token"].item() == pytest.approx(1.0)
    assert first["previous_token"].item() == pytest.approx(1 / (T - 1))


def test_induction_and_duplicate_patterns():
    period = T // 2
    induction = one_hot_pattern(lambda i: i - period + 1 if i >= period else 0)
    scores = repeated_token_scores(induction, period)
    assert scores["induction"].item() == pytest.approx(1.0)
    assert scores["duplicate_token"].item() == pytest.approx(0.0)
    duplicate = one_hot_pattern(lambda i: i - period if i >= period else 0)
    scores = repeated_token_scores(duplicate, period)
    assert scores["duplicate_token"].item() == pytest.approx(1.0)
    assert scores["induction"].item() == pytest.approx(0.0)


def model_with_ov(sign: float) -> Transformer:
    """One head whose full OV circuit is sign * identity on a square vocabulary."""
    cfg = ModelConfig(vocab_size=8, d_model=8, n_heads=1, n_layers=1, seq_len=4, norm="none")
    model = Transformer(cfg)
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(8))
        model.unembed.weight.copy_(torch.eye(8))
        model.blocks[0].attn.qkv.weight[16:].copy_(torch.eye(8))  # W_V
        model.blocks[0].attn.out.weight.copy_(sign * torch.eye(8))  # W_O
    return model


def test_copying_score_of_identity_and_its_negative():
    assert copying_scores(model_with_ov(1.0)).item() == pytest.approx(1.0)
    assert copying_scores(model_with_ov(-1.0)).item() == pytest.approx(-1.0)


def test_copying_score_matches_dense_eigenvalues():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, d_model=16, n_heads=2, n_layers=1, seq_len=4))
    attn = model.blocks[0].attn
    for head in range(2):
        full = model.embed.weight @ attn.W_V[head] @ attn.W_O[head] @ model.unembed.weight.T  # (vocab, vocab)
        eigenvalues = torch.linalg.eigvals(full.double())
        expected = eigenvalues.real.sum() / eigenvalues.abs().sum()
        assert copying_scores(model)[0, head].item() == pytest.approx(expected.item(), abs=1e-4)


def test_composition_scores_detect_a_wired_path():
    cfg = ModelConfig(vocab_size=8, d_model=8, n_heads=2, n_layers=2, seq_len=4, norm="none")
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        first, second = model.blocks[0].attn, model.blocks[1].attn
        first.qkv.weight.zero_()
        first.out.weight.zero_()
        # head 0 of layer 0 writes dims 0-3 into dims 4-7
        first.qkv.weight[16:20, 0:4] = torch.eye(4)
        first.out.weight[4:8, 0:4] = torch.eye(4)
        second.qkv.weight.zero_()
        # head 1 of layer 1 reads keys from dims 4-7, queries from dims 0-3
        second.qkv.weight[4:8, 0:4] = torch.eye(4)  # W_Q head 1
        second.qkv.weight[12:16, 4:8] = torch.eye(4)  # W_K head 1
        second.qkv.weight[0:4, 0:4] = torch.eye(4)  # W_Q head 0 (no key): stays 0
    scores = composition_scores(model)
    assert scores["k"][0][0][1][1] == pytest.approx(0.5)
    assert scores["q"][0][0][1][1] == pytest.approx(0.0)
    assert scores["k"][0][1][1][1] == 0.0  # a head that writes nothing composes with nothing
    assert scores["k"][1][0][0][0] is None  # later -> earlier is not a composition


def _wired_k_composition(d_model: int = 64, heads: int = 4) -> Transformer:
    """Head 0.0 writes its residual dims 0..h-1 into h..2h-1; head 1.1 reads its keys from h..2h-1: a perfect
    K-composition path of rank h (score 1/sqrt(h)), and no other path."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8, d_model=d_model, n_heads=heads, n_layers=2, seq_len=4, norm="none")
    model = Transformer(cfg)
    h = d_model // heads
    with torch.no_grad():
        first, second = model.blocks[0].attn, model.blocks[1].attn
        for attention in (first, second):
            attention.qkv.weight.zero_()
            attention.out.weight.zero_()
        first.qkv.weight[2 * d_model : 2 * d_model + h, 0:h] = torch.eye(h)  # W_V of head 0
        first.out.weight[h : 2 * h, 0:h] = torch.eye(h)  # W_O of head 0
        second.qkv.weight[h : 2 * h, 0:h] = torch.eye(h)  # W_Q of head 1 reads dims 0..h-1
        second.qkv.weight[d_model + h : d_model + 2 * h, h : 2 * h] = torch.eye(h)  # W_K of head 1 reads h..2h-1
    return model


def test_a_wired_composition_path_stands_far_above_the_random_baseline_and_a_random_models_do_not():
    wired = _wired_k_composition()
    baseline = composition_baseline(wired)
    scores = composition_scores(wired)
    assert scores["k"][0][0][1][1] == pytest.approx(1 / math.sqrt(16))  # rank 16: the score's ceiling is 0.25
    assert baseline["k"]["mean"] == pytest.approx(0.125, abs=0.01)  # random 64 x 64 products of rank 16
    excess = composition_excess(scores["k"][0][0][1][1], baseline["k"])
    assert excess is not None and excess > 10 * baseline["k"]["std"]
    standing = [(kind, l1, h1, h2) for kind, nested in scores.items() for l1, by_head in enumerate(nested)
                for h1, by_layer in enumerate(by_head) for h2, value in enumerate(by_layer[1])
                if value is not None and composition_excess(value, baseline[kind]) is not None]
    assert standing == [("k", 0, 0, 1)]  # the one wired path, nothing else
    torch.manual_seed(0)
    random_model = Transformer(ModelConfig(vocab_size=66, d_model=64, n_heads=4, n_layers=2, seq_len=16))
    random_scores = composition_scores(random_model)
    paths = [(value, kind) for kind, nested in random_scores.items() for by_head in nested[0] for value in by_head[1]]
    assert len(paths) == 48 and all(composition_excess(v, baseline[kind]) is None for v, kind in paths)
    # the baseline is a property of the shapes alone: it goes into heads.json and the measure's rows
    assert head_scores(random_model, torch.randint(0, 66, (4, 17)))["composition_baseline"] == baseline
    # The null a path must clear: the same heads in the order they cannot compose. The wired path clears it (its
    # backward pairs write nothing); none of the random model's 48 paths does.
    wired_null = composition_null(wired)
    standing = [(kind, l1, h1, h2) for kind, nested in scores.items() for l1, by_head in enumerate(nested)
                for h1, by_layer in enumerate(by_head) for h2, value in enumerate(by_layer[1])
                if value is not None and composition_excess(value, wired_null[kind]) is not None]
    assert standing == [("k", 0, 0, 1)]
    null = composition_null(random_model)
    assert null["k"]["pairs"] == 16 and null["k"]["mean"] == pytest.approx(0.125, abs=0.01)
    assert all(composition_excess(v, null[kind]) is None for v, kind in paths)


def test_heads_document_and_files(tmp_path):
    torch.manual_seed(0)
    tokenizer = TextTokenizer(byte_tokenizer(), "bytes")
    model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_heads=4, n_layers=2, seq_len=24))
    held_out = torch.randint(0, 256, (8, 24))
    document = head_scores(model, held_out)
    assert len(document["heads"]) == 8
    head = document["heads"][5]
    assert (head["layer"], head["head"]) == (1, 1)
    assert set(head["scores"]) == {
        "previous_token",
        "current_token",
        "first_token",
        "duplicate_token",
        "induction",
        "copying",
    }
    assert all(-1.0 <= v <= 1.0 for h in document["heads"] for v in h["scores"].values())
    assert len(document["composition"]["q"]) == 2 and len(document["composition"]["q"][0][0][1]) == 4
    write_analysis(model, tokenizer, tmp_path, document, AnalysisConfig(prompt="This movie is"))
    saved = json.loads((tmp_path / "heads.json").read_text())
    assert saved == json.loads(json.dumps(document))
    patterns = json.loads((tmp_path / "heatmaps" / "patterns.json").read_text())
    assert len(patterns["tokens"]) == len("This movie is") + 7
    assert len(patterns["patterns"]) == 2 and len(patterns["patterns"][0]) == 4
    pngs = sorted(p.name for p in (tmp_path / "heatmaps").glob("*.png"))
    assert len(pngs) == 2 * 4 + 2
    assert (tmp_path / "sample.txt").read_text().startswith("This movie is")


def test_labels_follow_thresholds():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, seq_len=8))
    low = head_scores(model, torch.randint(0, 50, (4, 8)), AnalysisConfig(previous_token_threshold=-1.0))
    assert len(low["heads"]) == 2 and all("previous_token" in h["labels"] for h in low["heads"])
    high = head_scores(model, torch.randint(0, 50, (4, 8)), AnalysisConfig(previous_token_threshold=2.0))
    assert len(high["heads"]) == 2 and not any("previous_token" in h["labels"] for h in high["heads"])


def ideal_patterns(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, 1, 2n, 2n]: a head that attends equally to every earlier match of its query's token (duplicate_token)
    or to every token that follows one (induction), and to itself where nothing matches."""
    batch, length = tokens.shape
    pattern = torch.zeros(batch, 1, length, length)
    for b in range(batch):
        for i in range(length):
            keys = [k for k in range(i) if tokens[b, k] == tokens[b, i]] if kind == "duplicate_token" else \
                   [k for k in range(1, i + 1) if tokens[b, k - 1] == tokens[b, i]]
            for k in keys or [i]:
                pattern[b, 0, i, k] = 1 / len(keys or [i])
    return pattern


@pytest.mark.parametrize("vocab", [8, 66, 50257])  # 8 < n: r must repeat tokens; 66: the repeat task; 50257: gpt2
@pytest.mark.parametrize("kind", ["induction", "duplicate_token"])
def test_an_ideal_head_scores_one_on_the_probe_of_every_vocabulary(vocab, kind):
    from model.analysis import AnalysisConfig, ideal_repeated_scores, repeated_tokens

    model_cfg = ModelConfig(vocab_size=vocab, d_model=8, n_heads=1, n_layers=1, seq_len=64)
    tokens = repeated_tokens(model_cfg, AnalysisConfig(probe_sequences=8))
    period = 32
    raw = repeated_token_scores(ideal_patterns(tokens, kind), period)[kind].item()
    ideal = ideal_repeated_scores(tokens, period)[kind]
    assert raw / ideal == pytest.approx(1.0, abs=0.01)  # what heads.json reports
    if vocab >= period:  # r without repeats: the raw score itself is 1.0
        assert raw == pytest.approx(1.0, abs=0.01) and ideal == 1.0
    else:
        assert ideal < 0.9


def test_heads_json_records_how_its_scores_were_measured():
    from model.analysis import PROBE_VERSION, head_scores

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=66, d_model=16, n_heads=2, n_layers=1, seq_len=64))
    held_out = torch.randint(0, 66, (8, 65))
    probe = head_scores(model, held_out)["probe"]
    assert probe["version"] == PROBE_VERSION
    expected = {"sequences": 32, "period": 32, "vocabulary": 66, "seed": 0, "distinct": True, "ideal_head": None,
                "scores": ["duplicate_token", "induction"], "scaled": "raw"}
    assert probe["repeated"] | {"ideal_head": None} == expected
    assert probe["held_out"]["sequences"] == 8 and probe["thresholds"]["induction"] == 0.4
