"""Causal circuits (model/causal.py) on models where the answer is known: the graph, exact path patching against an
independent patch made with hooks on the model itself, EAP against the gradient it estimates, and discovery on
the hand-wired canonical induction circuit, on a head that writes nothing and on a random initialisation."""

import math

import pytest
import torch
from test_circuits import wire_induction_circuit

from model.analysis import head_scores
from model.causal import find_circuit
from model.config import ConfigError, ModelConfig
from model.discovery import connected_edges, faithfulness, greedy_circuit, kept_metric, prune_circuit
from model.edges import CircuitConfig, build_graph, edge_kind
from model.patching import PatchedModel, attribution_effects, exact_effects
from model.tasks import TASKS, TaskData, copying_inputs, get_task, induction_inputs, text_inputs
from model.transformer import Transformer

VOCAB, LENGTH = 32, 32
WIRED = {"embed -> 0.0.v", "0.0 -> 1.0.k", "embed -> 1.0.q", "embed -> 1.0.v", "1.0 -> logits"}
"""The wired edges that carry token information: the previous-token head reads the token it moves (its value
from the embedding) and finds it by position alone (same in both runs); the induction head's key reads the
previous token (K-composition), its query and value read the current token (its query edge shows: the corrupted
run's second copy holds other tokens), and only it writes what the unembedding reads."""


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


def patched_model(model: Transformer, task: str = "induction", sequences: int = 8, positions: int = 8,
                  **options) -> PatchedModel:
    inputs = TASKS[task].inputs(model, task_data(20, 12), torch.Generator().manual_seed(0), sequences, positions)
    return PatchedModel(model, inputs, TASKS[task], **options)


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
    changes = exact_effects(patched).mean(-1)
    edges = len(patched.graph.edges)
    masks = torch.ones(edges, edges) - torch.eye(edges)  # each edge alone corrupted, from layer 0
    general = patched.evaluate(masks).mean(-1) - patched.clean_metric
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
    finite = (patched.evaluate(masks).mean(-1) - patched.clean_metric) / step
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
    assert result.target_reached and result.faithfulness_low <= result.faithfulness <= result.faithfulness_high
    lows = dict(zip(result.edges, result.effect_low))
    assert all(lows[edge] >= 0.1 for edge in WIRED)  # every wired edge matters beyond its interval
    # the panel: the circuit holds under resample and mean ablation, noising and denoising, loss and KL
    assert set(result.panel) == {f"{k}/{d}/{m}" for k in ("resample", "mean") for d in ("noising", "denoising")
                                 for m in ("loss", "kl")}
    assert result.panel["resample/noising/loss"] == pytest.approx(result.faithfulness, abs=1e-4)
    assert result.robust and result.panel_spread <= 0.2, result.panel
    # ACDC-style pruning in reverse topological order keeps the same edges
    inputs = induction_inputs(wired(), task_data(), torch.Generator().manual_seed(0), 32, 8)
    kept, faithful = prune_circuit(PatchedModel(wired(), inputs, get_task("induction")), 0.1)
    names = build_graph(2, 1).edge_names
    assert {names[i] for i in kept} == WIRED and faithful >= 0.95


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
    assert not result.does_task and result.effects == [None] * len(result.edges) and result.gate()
    assert result.circuit == [] and result.faithfulness is None and result.above_threshold() == []
    assert all(math.isnan(c) for c in result.change)  # nothing to explain: no edge is patched


def test_eap_agrees_with_exact_patching_until_the_attention_saturates():
    soft = find_circuit(wired(sharp=2.0), task_data(), "induction")
    assert set(soft.circuit) == WIRED
    estimated = [e for e, value in zip(soft.edges, soft.fractions(soft.eap)) if value >= 0.1]
    assert set(estimated) == WIRED and soft.agreement(soft.eap)["spearman"] > 0.85
    # Sharp attention: the softmax's gradient vanishes, and EAP misses the query, key and value edges that
    # exact patching finds (the K-composition edge above all)
    sharp = find_circuit(wired(sharp=20.0), task_data(), "induction")
    exact, eap = dict(zip(sharp.edges, sharp.effects)), dict(zip(sharp.edges, sharp.fractions(sharp.eap)))
    for edge in ("0.0 -> 1.0.k", "embed -> 1.0.q", "embed -> 0.0.v"):
        assert exact[edge] > 0.5 and abs(eap[edge]) < 0.05, (edge, exact[edge], eap[edge])


def test_the_greedy_circuit_is_a_connected_prefix_by_absolute_effect_that_reaches_the_target_one_edge_before():
    patched = patched_model(random_model(mlp=False), "text")
    changes = exact_effects(patched).mean(-1)
    found = greedy_circuit(patched, changes, 0.9, 0.0)
    order = changes.abs().argsort(descending=True).tolist()
    assert found.reached and found.faithfulness >= 0.9
    prefixes = [connected_edges(patched.graph, order[:size]) for size in range(1, len(order) + 1)]
    size = next(size for size, kept in enumerate(prefixes, 1) if sorted(kept) == sorted(found.kept))
    shorter = faithfulness(patched, kept_metric(patched, [prefixes[size - 2]]))
    assert float(shorter[0]) < 0.9 and set(found.kept) <= set(order[:size])
    # a linear scan of every prefix (the unhurried search) stops at the same one here
    scanned = faithfulness(patched, kept_metric(patched, prefixes))
    assert int((scanned >= 0.9).nonzero()[0]) == size - 1


def test_only_edges_on_a_path_from_the_embedding_to_the_logits_are_kept():
    graph = build_graph(2, 2)
    name = {edge: index for index, edge in enumerate(graph.edge_names)}
    chosen = [name[e] for e in ("embed -> 0.0.v", "0.0 -> 1.0.k", "1.0 -> logits",  # a path
                                "embed -> 0.1.q",  # into a head whose output goes nowhere
                                "1.1 -> logits")]  # out of a head nothing reaches
    kept = {graph.edge_names[i] for i in connected_edges(graph, chosen)}
    assert kept == {"embed -> 0.0.v", "0.0 -> 1.0.k", "1.0 -> logits"}


def test_a_joint_mask_of_several_edges_matches_forward_hooks():
    """Several edges corrupted at once (noising): each corrupted edge carries the corrupted run's value and every
    other edge what its sender computes in this very run, made with hooks on the model itself."""
    model = random_model(mlp=False)
    patched = patched_model(model)
    names = patched.graph.edge_names
    corrupted = ["embed -> 0.1.k", "0.0 -> 1.1.v", "0.1 -> 1.0.q", "1.0 -> logits", "embed -> logits"]
    mask = torch.ones(1, len(names))
    mask[0, [names.index(e) for e in corrupted]] = 0.0
    assert float(patched.evaluate(mask).mean()) == pytest.approx(hooked_joint_patch(model, patched, corrupted),
                                                                  abs=2e-5)


def hooked_joint_patch(model: Transformer, patched: PatchedModel, corrupted: list[str]) -> float:
    inputs, heads, width = patched.inputs, model.cfg.n_heads, model.cfg.d_model
    d_head = model.cfg.d_head

    def head_outputs(store: dict[str, torch.Tensor]) -> list:
        """Hooks that record each head's output as the model computes it."""
        hooks = []
        for layer, block in enumerate(model.blocks):
            def capture(module, args, layer=layer):
                z = args[0].reshape(*args[0].shape[:2], heads, d_head)
                for head in range(heads):
                    store[f"{layer}.{head}"] = z[:, :, head] @ model.blocks[layer].attn.W_O[head]
            hooks.append(block.attn.out.register_forward_pre_hook(capture))
        return hooks

    reference = {"embed": model.embed(inputs.corrupted) + model.pos_embed(torch.arange(inputs.corrupted.shape[1]))}
    capturing = head_outputs(reference)
    model(inputs.corrupted)
    for hook in capturing:
        hook.remove()
    current = {"embed": model.embed(inputs.clean) + model.pos_embed(torch.arange(inputs.clean.shape[1]))}
    hooks = head_outputs(current)

    def shift(receiver: str) -> torch.Tensor:
        return sum((reference[s] - current[s] for s, r in (e.split(" -> ") for e in corrupted) if r == receiver),
                   torch.zeros_like(current["embed"]))

    for layer, block in enumerate(model.blocks):
        residual = {}
        hooks.append(block.ln_attn.register_forward_pre_hook(lambda m, args, r=residual: r.__setitem__("x", args[0])))

        def replace(module, args, out, layer=layer, block=block, residual=residual):
            out, before = out.clone(), residual["x"]  # (calling ln_attn below records its input again)
            for head in range(heads):
                for index, kind in enumerate("qkv"):
                    columns = slice(index * width + head * d_head, index * width + (head + 1) * d_head)
                    moved = block.ln_attn(before + shift(f"{layer}.{head}.{kind}")) @ module.weight.T
                    out[..., columns] = moved[..., columns]
            return out
        hooks.append(block.attn.qkv.register_forward_hook(replace))
    hooks.append(model.ln_final.register_forward_pre_hook(lambda module, args: (args[0] + shift("logits"),)))
    logits = model(inputs.clean)
    for hook in hooks:
        hook.remove()
    log_probs = logits[:, inputs.positions].float().log_softmax(-1)
    return float(-log_probs.gather(-1, inputs.targets[..., None]).mean())


def copying_head(vocab: int = 40, length: int = 32, scale: float = 20.0) -> Transformer:
    """One head attending uniformly to everything before it (zero queries and keys) whose OV circuit copies: it
    raises every token in context, in proportion to how often it occurs there. The embedding (one-hot tokens) and
    what the head writes sit in separate halves of the residual stream, and the unembedding reads only the head's."""
    model = Transformer(ModelConfig(vocab_size=vocab, d_model=2 * vocab, n_heads=1, n_layers=1, seq_len=length,
                                    norm="none"))
    tokens, written = slice(0, vocab), slice(vocab, 2 * vocab)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.embed.weight[:, tokens] = torch.eye(vocab)
        value = torch.zeros(2 * vocab, 2 * vocab)  # x @ value (row vectors): the token, as it is
        value[tokens, tokens] = torch.eye(vocab)
        model.blocks[0].attn.qkv.weight[4 * vocab :] = value.T
        out = torch.zeros(2 * vocab, 2 * vocab)
        out[tokens, written] = torch.eye(vocab)
        model.blocks[0].attn.out.weight.copy_(out.T)
        model.unembed.weight[:, written] = scale * torch.eye(vocab)
    return model.eval()


def test_a_copying_head_does_the_copying_control_and_not_induction():
    """The induction task keeps the tokens in context the same: only induction tells its runs apart, so a head
    that copies whatever is in context has no induction circuit; the copying control finds it (its value from the
    embedding, its output into the logits), and the canonical induction circuit does not do the control."""
    copier, data = copying_head(), task_data(40, 32)
    induction = find_circuit(copier, data, "induction")
    assert not induction.does_task and induction.circuit == [], (induction.difference, induction.gate())
    copying = find_circuit(copier, data, "copying")
    assert copying.does_task and set(copying.circuit) == {"embed -> 0.0.v", "0.0 -> logits"}, copying.circuit
    assert copying.difference > 0.5
    control = find_circuit(wired(), task_data(), "copying")
    assert control.difference < 0.25 * find_circuit(wired(), task_data(), "induction").difference


def test_the_old_induction_corruption_let_a_copying_head_pass():
    """The broken counterpart of the check above: against 2n fresh tokens (the corruption before this one: the
    clean next tokens mostly out of context) the copying head beats the corrupted run beyond the old gate, so a
    task built that way credits copying as induction."""
    copier = copying_head(vocab=200)
    inputs = induction_inputs(copier, task_data(200, 32), torch.Generator().manual_seed(0), 32, 8)
    generator = torch.Generator().manual_seed(1)
    fresh = torch.stack([torch.randperm(200, generator=generator)[:32] for _ in range(32)])
    task = TASKS["induction"]
    broken = PatchedModel(copier, type(inputs)(inputs.clean, fresh, inputs.positions, inputs.targets), task)
    isolated = PatchedModel(copier, inputs, task)
    assert broken.difference > 0.05 and broken.difference > 4 * broken.difference_se, broken.difference
    assert isolated.difference < 0.02, isolated.difference


@pytest.mark.parametrize("d_model", [64, 128, 256])
def test_untrained_models_of_the_study_s_shapes_do_not_do_the_text_task(d_model):
    """GPT-2's vocabulary, seq_len 80: an untrained model's KL between a clean and a corrupted window grows with
    d_model, above the fixed 0.02-nat floor at 128 and 256; the null of untrained models of the same shape is
    what keeps it from having a circuit (without the null, the gate alone would pass it at 128 and 256)."""
    torch.manual_seed(7)
    model = Transformer(ModelConfig(vocab_size=50257, d_model=d_model, n_heads=8, n_layers=2, seq_len=80)).eval()
    windows = torch.randint(0, 50257, (64, 81), generator=torch.Generator().manual_seed(3))
    data = TaskData(windows, windows.unique())
    result = find_circuit(model, data, "text")
    assert not result.does_task and result.circuit == [], result.gate()
    if d_model >= 128:  # the floor and the standard errors alone would let it through
        assert result.difference > CircuitConfig().min_difference, result.difference
        assert result.difference > CircuitConfig().min_sigmas * result.difference_se
        assert "does not clear the null" in result.gate()


def test_acdc_keeps_one_of_two_heads_that_back_each_other_up():
    """Two identical induction heads in layer 1, each writing the whole answer. Alone, each edge of either looks
    small (4% of the difference: the other backs it up), so a prefix by single-edge effect needs many edges;
    ACDC (reverse topological order) removes the first head it visits into the logits (1.0) and keeps the other,
    which then carries the behaviour alone. Under resample ablation a removed head still writes its corrupted
    answer, which costs those 4%: at a threshold below that both are kept (docs/circuits.md)."""
    model = wired(heads=2)
    width = 4 * VOCAB
    with torch.no_grad():
        attn = model.blocks[1].attn
        for index in range(3):  # head 1 of layer 1 reads what head 0 reads
            rows = slice(index * width * 2, index * width * 2 + width)
            attn.qkv.weight[index * width * 2 + width : index * width * 2 + 2 * width] = attn.qkv.weight[rows]
        attn.out.weight[:, width:] = attn.out.weight[:, :width]
    inputs = induction_inputs(model, task_data(), torch.Generator().manual_seed(0), 32, 8)
    patched = PatchedModel(model, inputs, get_task("induction"))
    names = patched.graph.edge_names
    single = exact_effects(patched).mean(-1) / patched.difference
    assert 0.02 < float(single[names.index("1.0 -> logits")]) < 0.05
    kept, faithful = prune_circuit(patched, 0.05)
    assert {names[i] for i in kept} == {"embed -> 0.0.v", "0.0 -> 1.1.k", "embed -> 1.1.q", "embed -> 1.1.v",
                                        "1.1 -> logits"} and faithful >= 0.9, faithful
    both, _ = prune_circuit(patched, 0.02)
    assert {"1.0 -> logits", "1.1 -> logits"} <= {names[i] for i in both}


def test_the_tasks_draw_only_trained_tokens_and_keep_what_their_mechanism_does_not_read():
    model = Transformer(ModelConfig(vocab_size=66, d_model=16, n_heads=2, n_layers=2, seq_len=64))
    trained = torch.arange(64)  # the repeat task's t0..t63: never <unk> (64) or <|endoftext|> (65)
    data = TaskData(torch.zeros(4, 65, dtype=torch.long), trained)
    inputs = induction_inputs(model, data, torch.Generator().manual_seed(0), 16, 8)
    clean, corrupted = inputs.clean, inputs.corrupted
    assert clean.shape == corrupted.shape == (16, 64)
    assert torch.equal(clean[:, :32], clean[:, 32:]) and int(clean.max()) < 64 and int(corrupted.max()) < 64
    assert all(len(set(row.tolist())) == 32 for row in clean)
    # each copy holds the same tokens in both runs (the bag in context is unchanged), every one moved
    for half in (slice(0, 32), slice(32, 64)):
        assert torch.equal(corrupted[:, half].sort(-1).values, clean[:, half].sort(-1).values)
        assert (clean[:, half] != corrupted[:, half]).all()
    assert len(inputs.positions) == 8 and int(inputs.positions.min()) == 32 and int(inputs.positions.max()) == 62
    assert torch.equal(inputs.targets, clean[:, inputs.positions + 1])
    copying = copying_inputs(model, data, torch.Generator().manual_seed(0), 16, 8)
    first, second = copying.clean[:, :32], copying.clean[:, 32:]
    assert torch.equal(first.sort(-1).values, second.sort(-1).values) and (first != second).all()
    assert torch.equal(copying.corrupted[:, 32:], second)  # the queries' tokens are the same in both runs
    assert all(not set(a.tolist()) & set(b.tolist()) for a, b in zip(copying.corrupted[:, :32], second))
    windows = torch.randint(0, 50, (6, 65), generator=torch.Generator().manual_seed(0))
    windows[0, 10] = -1  # a padded window is never drawn
    text = text_inputs(model, TaskData(windows, trained), torch.Generator().manual_seed(0), 32, 8)
    assert len(text.clean) == 5 and torch.equal(text.corrupted, text.clean.roll(1, dims=0))
    assert not (text.clean < 0).any() and text.targets.shape == (5, 8)
    with pytest.raises(ConfigError, match="unknown circuit task 'copy'; tasks: induction, copying, text"):
        get_task("copy")
    with pytest.raises(ConfigError, match="without padding"):
        text_inputs(model, TaskData(windows[:1], trained), torch.Generator(), 4, 8)


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


def test_the_method_names_its_measure_and_all_leaves_acdc_out():
    from model.edges import circuit_analysis, parse_circuit_analysis
    from model.measures import get_measure, parse_measures

    assert circuit_analysis("text") == "circuit:text" and circuit_analysis("text", "acdc") == "circuit:text:acdc"
    assert parse_circuit_analysis("circuit:text:acdc") == ("text", "acdc")
    assert parse_circuit_analysis("circuit:induction") == ("induction", "greedy")
    assert parse_circuit_analysis("circuit:text:bogus") is None and parse_circuit_analysis("scores") is None
    assert "ACDC" in get_measure("circuit:copying:acdc").description
    everything = parse_measures("all")
    assert "circuit:copying" in everything and not any(name.endswith(":acdc") for name in everything)
    assert parse_measures("circuit:text:acdc") == ("circuit:text:acdc",)
    with pytest.raises(ConfigError, match="circuit:TASK:acdc"):
        parse_measures("circuit:text:fast")
