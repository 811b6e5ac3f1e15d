"""Causal circuits (model/causal.py) on models where the answer is known: the graph, exact path patching against an
independent patch made with hooks on the model itself, EAP against the gradient it estimates, and discovery on
the hand-wired canonical induction circuit, on a head that writes nothing and on a random initialisation."""

import math

import pytest
import torch
from test_circuits import wire_induction_circuit

from model.analysis import head_scores
from model.causal import (
    TASKS,
    PatchedModel,
    TaskData,
    attribution_effects,
    exact_effects,
    find_circuit,
    get_task,
    greedy_circuit,
    induction_inputs,
    prune_circuit,
    text_inputs,
)
from model.config import ConfigError, ModelConfig
from model.edges import CircuitConfig, build_graph, edge_kind
from model.transformer import Transformer

VOCAB, LENGTH = 32, 32
WIRED = {"embed -> 0.0.v", "0.0 -> 1.0.k", "embed -> 1.0.q", "embed -> 1.0.v", "1.0 -> logits"}
"""The wired edges that carry token information: the previous-token head reads the token it moves (its value
from the embedding) and finds it by position alone (same in both runs); the induction head's key reads the
previous token (K-composition), its query and value read the current token, and only it writes what the
unembedding reads."""


def task_data(vocab: int = VOCAB, length: int = LENGTH) -> TaskData:
    return TaskData(held_out=torch.randint(0, vocab, (16, length + 1), generator=torch.Generator().manual_seed(1)),
                    tokens=torch.arange(vocab))


def wired(sharp: float = 20.0, heads: int = 1) -> Transformer:
    """The canonical induction circuit of test_circuits in head 0 of each layer; any other head reads its
    inputs but writes nothing (W_O = 0)."""
    single = Transformer(ModelConfig(vocab_size=VOCAB, d_model=4 * VOCAB, n_heads=1, n_layers=2, seq_len=LENGTH,
                                     norm="none"))
    wire_induction_circuit(single, sharp=sharp)
    if heads == 1:
        return single.eval()
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=4 * VOCAB * heads, n_heads=heads, n_layers=2,
                                    seq_len=LENGTH, norm="none"))
    width = 4 * VOCAB
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.embed.weight[:, :width] = single.embed.weight
        model.pos_embed.weight[:, :width] = single.pos_embed.weight
        model.unembed.weight[:, :width] = single.unembed.weight
        for block, source in zip(model.blocks, single.blocks):
            d_head = width
            for index in range(3):  # head 0: the wired weights; the others: random inputs, no output
                rows = slice(index * width * heads, index * width * heads + d_head)
                block.attn.qkv.weight[rows, :width] = source.attn.qkv.weight[index * width : (index + 1) * width]
                for head in range(1, heads):
                    others = slice(index * width * heads + head * d_head, index * width * heads + (head + 1) * d_head)
                    block.attn.qkv.weight[others] = torch.randn(d_head, width * heads, generator=generator)
            block.attn.out.weight[:width, :d_head] = source.attn.out.weight
    return model.eval()


def test_the_graph_has_3h2_plus_8h_plus_1_edges_in_two_attention_only_layers():
    for heads in (1, 4, 8):
        graph = build_graph(2, heads)
        assert len(graph.edges) == 3 * heads**2 + 8 * heads + 1
    graph = build_graph(2, 4)
    names = set(graph.edge_names)
    assert {"embed -> 0.2.q", "0.2 -> 1.2.k", "embed -> logits", "1.3 -> logits"} <= names
    assert "1.2 -> 0.1.q" not in names and "0.1 -> 0.2.k" not in names  # only earlier layers write to later ones
    # MLPs are nodes: each reads everything before it (its own layer's heads included) and writes to what follows
    mlp = build_graph(2, 2, mlp=True)
    assert {"0.1 -> mlp0", "mlp0 -> 1.0.v", "mlp0 -> mlp1", "mlp1 -> logits"} <= set(mlp.edge_names)
    assert "mlp0 -> 0.1.q" not in set(mlp.edge_names)
    assert edge_kind("0.2 -> 1.2.k") == "head -> k" and edge_kind("embed -> 0.2.v") == "embed -> v"
    assert edge_kind("mlp0 -> logits") == "mlp -> logits" and edge_kind("1.3 -> logits") == "head -> logits"


def random_model(mlp: bool, scale: float = 3.0) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=2, seq_len=12, mlp=mlp)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)  # patterns and predictions away from uniform: every edge moves the metric
    return model


def patched_model(model: Transformer, task: str = "induction", sequences: int = 8) -> PatchedModel:
    inputs = TASKS[task].inputs(model, task_data(20, 12), torch.Generator().manual_seed(0), sequences)
    return PatchedModel(model, inputs, TASKS[task])


@pytest.mark.parametrize("mlp", [False, True])
def test_the_graph_run_is_the_model_with_every_edge_clean_and_the_corrupted_run_with_none(mlp):
    model = random_model(mlp)
    patched = patched_model(model)
    edges = len(patched.graph.edges)
    for mask, tokens in (
        (torch.ones(1, edges), patched.inputs.clean),
        (torch.zeros(1, edges), patched.inputs.corrupted),
    ):
        _, residual = patched.run(mask, patched.clean_embed)
        assert torch.allclose(model.unembed(residual[0]), model(tokens), atol=1e-5)


def hooked_patch(model: Transformer, patched: PatchedModel, sender: str, receiver: str) -> float:
    """The metric with edge sender -> receiver patched, made with hooks on the model itself: the receiver's input
    gets (corrupted - clean value of the sender) added, every other input as in the clean run."""
    inputs = patched.inputs

    def values(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        found = {"embed": model.embed(tokens) + model.pos_embed(torch.arange(tokens.shape[1]))}
        hooks = []
        for layer, block in enumerate(model.blocks):
            def heads(module, args, layer=layer):
                z = args[0].reshape(*args[0].shape[:2], model.cfg.n_heads, model.cfg.d_head)
                for head in range(model.cfg.n_heads):
                    found[f"{layer}.{head}"] = z[:, :, head] @ model.blocks[layer].attn.W_O[head]
            hooks.append(block.attn.out.register_forward_pre_hook(heads))
            if block.mlp is not None:
                hooks.append(block.mlp.register_forward_hook(
                    lambda module, args, out, layer=layer: found.__setitem__(f"mlp{layer}", out)))
        model(tokens)
        for hook in hooks:
            hook.remove()
        return found

    delta = values(inputs.corrupted)[sender] - values(inputs.clean)[sender]
    hooks = []
    if receiver == "logits":
        hooks.append(model.ln_final.register_forward_pre_hook(lambda module, args: (args[0] + delta,)))
    elif receiver.startswith("mlp"):
        block = model.blocks[int(receiver[3:])]
        hooks.append(block.ln_mlp.register_forward_pre_hook(lambda module, args: (args[0] + delta,)))
    else:
        layer, head, kind = receiver.split(".")
        block, index = model.blocks[int(layer)], "qkv".index(kind)
        residual = {}
        hooks.append(block.ln_attn.register_forward_pre_hook(lambda module, args: residual.__setitem__("x", args[0])))
        width, d_head = model.cfg.d_model, model.cfg.d_head
        columns = slice(index * width + int(head) * d_head, index * width + (int(head) + 1) * d_head)

        def replace(module, args, out):
            out = out.clone()
            out[..., columns] = (block.ln_attn(residual["x"] + delta) @ module.weight.T)[..., columns]
            return out
        hooks.append(block.attn.qkv.register_forward_hook(replace))
    logits = model(inputs.clean)
    for hook in hooks:
        hook.remove()
    log_probs = logits[:, inputs.positions].float().log_softmax(-1)
    return float(-log_probs.gather(-1, inputs.targets[..., None]).mean())


@pytest.mark.parametrize("mlp", [False, True])
def test_exact_patching_of_every_edge_matches_a_patch_made_with_hooks_and_the_general_masked_run(mlp):
    model = random_model(mlp)
    patched = patched_model(model)
    changes = exact_effects(patched)
    edges = len(patched.graph.edges)
    masks = torch.ones(edges, edges) - torch.eye(edges)  # each edge alone corrupted, from layer 0
    general = patched.evaluate(masks) - patched.clean_metric
    assert torch.allclose(changes, general, atol=1e-5)
    assert changes.abs().min() > 0 and changes.abs().max() > 0.01  # every edge moves this model's metric
    with torch.no_grad():
        for index, name in enumerate(patched.graph.edge_names):
            sender, receiver = name.split(" -> ")
            hooked = hooked_patch(model, patched, sender, receiver) - patched.clean_metric
            assert changes[index].item() == pytest.approx(hooked, abs=2e-5), name


@pytest.mark.parametrize("task", ["induction", "text"])
def test_eap_is_the_first_order_change_of_patching_every_edge(task):
    """EAP's estimate is -d metric / d mask at the clean run (the receiver input is corrupted + mask * (current -
    corrupted)): a finite difference of the mask must give it. On the text task the metric, a KL divergence
    from the clean run, has zero gradient there: EAP is zero by construction."""
    patched = patched_model(random_model(mlp=True), task)
    eap = attribution_effects(patched, steps=1)
    edges = len(patched.graph.edges)
    step = 3e-3
    masks = torch.ones(edges, edges) - step * torch.eye(edges)
    finite = (patched.evaluate(masks) - patched.clean_metric) / step
    if task == "text":
        assert eap.abs().max() < 1e-4 and patched.clean_metric == pytest.approx(0.0, abs=1e-5)
    else:
        assert eap.abs().max() > 0.02
        assert torch.allclose(eap, finite, atol=5e-4 + 0.02 * eap.abs().max())


def test_discovery_finds_exactly_the_wired_induction_circuit():
    result = find_circuit(wired(), task_data(), "induction")
    assert set(result.circuit) == WIRED
    assert result.faithfulness >= 0.95
    assert set(result.above_threshold()) == WIRED  # no other edge matters alone
    others = [abs(c) for e, c in zip(result.edges, result.change) if e not in WIRED]
    assert max(others) < 1e-5  # positions alone (the previous-token head's q and k) are the same in both runs
    assert result.clean_metric < 0.1 < 3.0 < result.corrupted_metric
    # ACDC-style pruning in reverse topological order keeps the same edges
    inputs = induction_inputs(wired(), task_data(), torch.Generator().manual_seed(0), 32)
    kept, faithfulness = prune_circuit(PatchedModel(wired(), inputs, get_task("induction")), 0.1)
    names = build_graph(2, 1).edge_names
    assert {names[i] for i in kept} == WIRED and faithfulness >= 0.95


def test_a_head_that_writes_nothing_has_no_edge():
    result = find_circuit(wired(heads=2), task_data(), "induction")
    assert set(result.circuit) == WIRED
    silent = {"0.1", "1.1"}  # they read their inputs but write nothing

    def through_silent(edge: str) -> bool:
        sender, receiver = edge.split(" -> ")
        return sender in silent or receiver.rsplit(".", 1)[0] in silent

    changes = [(e, c) for e, c in zip(result.edges, result.change) if through_silent(e)]
    assert len(changes) == 17  # into 0.1 (3) and 1.1 (9), out of 0.1 (4) and 1.1 (1)
    assert all(abs(change) < 1e-5 for _, change in changes), changes
    assert not any(through_silent(e) for e in result.above_threshold())


def test_a_random_initialisation_has_no_circuit():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=66, d_model=64, n_heads=4, n_layers=2, seq_len=64)).eval()
    result = find_circuit(model, task_data(64, 64), "induction")
    # it cannot use the repeat: the two runs differ by noise, within a few standard errors
    assert abs(result.difference) < CircuitConfig().min_sigmas * result.difference_se
    assert not result.does_task and result.effects == [None] * len(result.edges)
    assert result.circuit == [] and result.faithfulness is None and result.above_threshold() == []
    assert max(abs(c) for c in result.change) < 0.02


def test_eap_agrees_with_exact_patching_until_the_attention_saturates():
    soft = find_circuit(wired(sharp=2.0), task_data(), "induction")
    assert set(soft.circuit) == WIRED
    estimated = [e for e, value in zip(soft.edges, soft.fractions(soft.eap)) if value >= 0.1]
    assert set(estimated) == WIRED and soft.agreement(soft.eap)["spearman"] > 0.9
    # Sharp attention: the softmax's gradient vanishes, and EAP misses the query, key and value edges that
    # exact patching finds (the K-composition edge above all)
    sharp = find_circuit(wired(sharp=20.0), task_data(), "induction")
    exact, eap = dict(zip(sharp.edges, sharp.effects)), dict(zip(sharp.edges, sharp.fractions(sharp.eap)))
    for edge in ("0.0 -> 1.0.k", "embed -> 1.0.q", "embed -> 0.0.v"):
        assert exact[edge] > 1.0 and abs(eap[edge]) < 0.05, (edge, exact[edge], eap[edge])


def test_the_greedy_circuit_is_the_shortest_prefix_by_effect_that_reaches_the_target():
    patched = patched_model(random_model(mlp=False), "text")
    changes = exact_effects(patched)
    kept, faithfulness = greedy_circuit(patched, changes, 0.9)
    order = [i for i in changes.argsort(descending=True).tolist() if changes[i] > 0]
    assert kept == order[: len(kept)] and faithfulness >= 0.9
    masks = torch.zeros(len(kept), len(changes))
    for size in range(1, len(kept) + 1):
        masks[size - 1, order[:size]] = 1.0
    shorter = (patched.corrupted_metric - patched.evaluate(masks)) / patched.difference
    assert (shorter[:-1] < 0.9).all() and shorter[-1].item() == pytest.approx(faithfulness, abs=1e-5)


def test_the_tasks_draw_only_trained_tokens_and_corrupt_every_position():
    model = Transformer(ModelConfig(vocab_size=66, d_model=16, n_heads=2, n_layers=2, seq_len=64))
    trained = torch.arange(64)  # the repeat task's t0..t63: never <unk> (64) or <|endoftext|> (65)
    inputs = induction_inputs(model, TaskData(torch.zeros(4, 65, dtype=torch.long), trained),
                              torch.Generator().manual_seed(0), 16)
    clean, corrupted = inputs.clean, inputs.corrupted
    assert clean.shape == corrupted.shape == (16, 64)
    assert torch.equal(clean[:, :32], clean[:, 32:]) and int(clean.max()) < 64 and int(corrupted.max()) < 64
    assert all(len(set(row.tolist())) == 32 for row in clean) and all(len(set(row.tolist())) == 64 for row in corrupted)
    assert (clean != corrupted).all()
    assert inputs.positions.tolist() == list(range(32, 63)) and torch.equal(inputs.targets, clean[:, 33:])
    windows = torch.randint(0, 50, (6, 65), generator=torch.Generator().manual_seed(0))
    windows[0, 10] = -1  # a padded window is never drawn
    text = text_inputs(model, TaskData(windows, trained), torch.Generator().manual_seed(0), 32)
    assert len(text.clean) == 5 and torch.equal(text.corrupted, text.clean.roll(1, dims=0))
    assert not (text.clean < 0).any()
    with pytest.raises(ConfigError, match="unknown circuit task 'copy'; tasks: induction, text"):
        get_task("copy")
    with pytest.raises(ConfigError, match="without padding"):
        text_inputs(model, TaskData(windows[:1], trained), torch.Generator(), 4)


def test_the_text_task_measures_kl_to_the_clean_run():
    model = random_model(mlp=False)
    result = find_circuit(model, TaskData(task_data(20, 12).held_out, torch.arange(20)), "text")
    assert result.clean_metric == pytest.approx(0.0, abs=1e-5) and result.corrupted_metric > 0.1
    assert result.faithfulness >= 0.9 and 0 < len(result.circuit) < len(result.edges)
    assert all(math.isfinite(value) for value in result.eap_ig)


def test_copying_is_labelled_only_where_the_head_copies_and_matters():
    """Copying is a property of the OV circuit's eigenvalues, unchanged by its scale: the induction head's OV circuit
    copies, and so does a head writing the same circuit 10^4 times more quietly; only the induction head, which
    matters, is labelled copying."""
    model = wired(heads=2)
    width = 4 * VOCAB
    with torch.no_grad():
        attn = model.blocks[1].attn
        values = slice(2 * width * 2 + width, 2 * width * 2 + 2 * width)  # head 1's value rows of qkv
        attn.qkv.weight[values] = attn.qkv.weight[2 * width * 2 : 2 * width * 2 + width]
        attn.out.weight[:, width:] = 1e-4 * attn.out.weight[:, :width]
    repeated = torch.randint(0, VOCAB, (16, LENGTH // 2), generator=torch.Generator().manual_seed(0)).repeat(1, 2)
    document = head_scores(model, torch.cat([repeated, repeated[:, :1]], dim=1), ablate=True)
    loud, quiet = (h for h in document["heads"] if h["layer"] == 1)
    assert loud["scores"]["copying"] > 0.9 and quiet["scores"]["copying"] > 0.9
    assert {"copying", "matters"} <= set(loud["labels"]) and not {"copying", "matters"} & set(quiet["labels"])
    unablated = head_scores(model, repeated, ablate=False)
    assert not any("copying" in head["labels"] for head in unablated["heads"])  # whether it matters is unknown
