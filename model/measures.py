"""Measures of one model's weights on a fixed probe: the rows of an experiment's analysis table.

An analysis is a function of (weights, probe data, definition). Each entry of
MEASURES turns a model and its probe into rows (layer, head, measure, value),
layer and head -1 for what belongs to the whole model. `sweep analyse` maps
them over every stored snapshot; the trainer's own per-iteration readings use
the same functions (`evaluate_model`, `head_scores`, `mean_ablation`). A
measure's `version` goes with every row: change a definition, raise its
version, and `sweep analyse` computes it again for every snapshot.

A measure added here next month backfills into last month's sweeps: name it in
`sweep analyse --what`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .analysis import (
    AnalysisConfig,
    composition_baseline,
    composition_null,
    composition_scores,
    head_scores,
    repeated_tokens,
)
from .causal import find_circuit
from .checkpoint import load_checkpoint, load_checkpoint_tokenizer
from .circuits import mean_ablation, token_frequencies, token_tables
from .config import ConfigError, DataConfig, ModelConfig, TrainConfig, from_dict
from .data import prepare_data
from .edges import (
    CIRCUIT_PREFIX,
    CIRCUIT_VERSION,
    METHODS,
    ZERO_ESTIMATE,
    CircuitConfig,
    circuit_analysis,
    parse_circuit_analysis,
)
from .llc import LLCConfig, estimate_llc
from .metrics import SCORE_NAMES
from .tasks import TASKS, TaskData
from .train import evaluate_model, held_out_sample
from .transformer import Transformer

Row = tuple[int, int, str, float]  # (layer, head, measure, value); -1, -1 for the whole model
EdgeRow = tuple[int, int, str, float, str, str]  # ... plus the edge's sender and receiver (causal circuits)
WHOLE_MODEL = -1


@dataclass(frozen=True)
class Probe:
    """The fixed data every snapshot of a run is measured on."""

    held_out: torch.Tensor
    """[N, T+1] windows: the run's held-out sample of the test split (the trainer evaluates on the same)."""
    analysis: AnalysisConfig = AnalysisConfig()
    training_tokens: torch.Tensor | None = None
    """Ids of the tokens the training split contains (the circuit tasks draw only these); None: the held-out
    windows' tokens."""
    circuits: CircuitConfig = CircuitConfig()

    def task_data(self) -> TaskData:
        tokens = self.training_tokens
        if tokens is None:
            tokens = self.held_out[self.held_out >= 0].unique()
        return TaskData(self.held_out, tokens)

    def definition(self) -> dict[str, Any]:
        """What the probe is, stored beside the measures it gave."""
        return {
            "held_out_windows": int(self.held_out.shape[0]),
            "window_tokens": int(self.held_out.shape[1] - 1),
            "probe_sequences": self.analysis.probe_sequences,
            "ablation_sequences": self.analysis.ablation_sequences,
            "seed": self.analysis.seed,
        }


@dataclass(frozen=True)
class Measure:
    """One analysis of the table: its version, what it is, and how it is computed."""

    name: str
    version: int
    description: str
    compute: Callable[[Transformer, Probe], list[Row | EdgeRow]]


def _loss_rows(model: Transformer, probe: Probe) -> list[Row]:
    metrics = evaluate_model(model, probe.held_out)
    return [
        (WHOLE_MODEL, WHOLE_MODEL, name, float(metrics[name])) for name in ("test_loss", "test_accuracy", "icl_score")
    ]


def _score_rows(model: Transformer, probe: Probe) -> list[Row]:
    document = head_scores(model, probe.held_out, probe.analysis, ablate=False)
    return [(h["layer"], h["head"], name, float(h["scores"][name])) for h in document["heads"] for name in SCORE_NAMES]


def _device(model: Transformer) -> torch.device:
    return next(model.parameters()).device


def _ablation_rows(model: Transformer, probe: Probe) -> list[Row]:
    cfg = probe.analysis
    windows = probe.held_out[: cfg.ablation_sequences].long().to(_device(model))
    repeated = repeated_tokens(model.cfg, cfg)[: cfg.ablation_sequences].to(_device(model))
    rises = mean_ablation(model, windows, repeated, model.cfg.seq_len // 2)
    return [
        (layer, head, f"ablation_{kind}", float(value))
        for layer, row in enumerate(rises)
        for head, rise in enumerate(row)
        for kind, value in rise.items()
    ]


def _composition_rows(model: Transformer, probe: Probe) -> list[Row]:
    """Rows of the later head: `k_composition_from_0.1` is the K-composition of head 0.1 into it."""
    scores = composition_scores(model)
    rows = []
    for kind, nested in scores.items():
        for layer1, heads1 in enumerate(nested):
            for head1, later in enumerate(heads1):
                for layer2, heads2 in enumerate(later):
                    rows += [
                        (layer2, head2, f"{kind}_composition_from_{layer1}.{head1}", float(value))
                        for head2, value in enumerate(heads2)
                        if value is not None
                    ]
    if model.cfg.n_layers > 1:  # the random baseline (Elhage et al.), and the null each score is read against
        for kind, baseline in composition_baseline(model).items():
            rows += [(WHOLE_MODEL, WHOLE_MODEL, f"{kind}_composition_baseline_{stat}", baseline[stat])
                     for stat in ("mean", "std")]
        for kind, null in composition_null(model).items():
            rows += [(WHOLE_MODEL, WHOLE_MODEL, f"{kind}_composition_null_{stat}", null[stat])
                     for stat in ("mean", "std", "max")]
    return rows


def llc_problem(probe: Probe):
    """The LLC's batches and loss for a snapshot: next-token loss on the probe's held-out windows, with the
    settings every snapshot of an experiment shares. Returns (loss, sample_batch, samples_per_batch, config)."""
    config = LLCConfig(seed=probe.analysis.seed)
    windows = probe.held_out.long()
    seq_len = windows.shape[1] - 1

    def sample(generator: torch.Generator) -> torch.Tensor:
        return windows[torch.randint(0, windows.shape[0], (config.batch_size,), generator=generator)]

    def loss(net: Transformer, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(_device(net))  # the probe lives on the host; the net wherever it was put
        return net.training_loss(batch[:, :-1], batch[:, 1:])

    return loss, sample, config.batch_size * seq_len, config


def _llc_rows(model: Transformer, probe: Probe) -> list[Row]:
    """The local learning coefficient at the snapshot's weights, by SGLD on the held-out windows, with its
    standard error, every chain's estimate, the diverged chains and the settings (the same for every snapshot)."""
    loss, sample, samples_per_batch, config = llc_problem(probe)
    estimate = estimate_llc(model, loss, sample, samples_per_batch, config)
    rows: list[Row] = [
        (WHOLE_MODEL, WHOLE_MODEL, "llc", _or_nan(estimate.llc)),
        (WHOLE_MODEL, WHOLE_MODEL, "llc_std_error", _or_nan(estimate.std_error)),
        (WHOLE_MODEL, WHOLE_MODEL, "llc_init_loss", estimate.init_loss),
        (WHOLE_MODEL, WHOLE_MODEL, "llc_diverged_chains", float(len(estimate.diverged))),
    ]
    rows += [(WHOLE_MODEL, chain, "llc_chain", _or_nan(value)) for chain, value in enumerate(estimate.chain_llcs)]
    rows += [
        (WHOLE_MODEL, WHOLE_MODEL, f"llc_setting_{name}", float(value))
        for name, value in estimate.settings.items()
        if isinstance(value, (int, float))
    ]
    return rows


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _circuit_rows(task: str, method: str) -> Callable[[Transformer, Probe], list[Row | EdgeRow]]:
    def compute(model: Transformer, probe: Probe) -> list[Row | EdgeRow]:
        """Every edge's exact effect (fraction of the clean-to-corrupted difference; NaN where the model does not
        do the task) with its interval, its change in nats, its EAP and EAP-IG estimates; the circuit's edges by
        rank (and the other method's); and the snapshot's metrics, the null, faithfulness with its interval, the
        robustness panel and the estimates' agreement with exact patching."""
        result = find_circuit(model, probe.task_data(), task, replace(probe.circuits, method=method))
        whole = {
            "clean_metric": result.clean_metric, "corrupted_metric": result.corrupted_metric,
            "difference_se": result.difference_se, "null_bound": result.null_bound,
            "null_max": max(result.null, default=float("nan")), "does_task": float(result.does_task),
            "faithfulness": _or_nan(result.faithfulness), "faithfulness_low": _or_nan(result.faithfulness_low),
            "faithfulness_high": _or_nan(result.faithfulness_high),
            "target_reached": _or_nan(result.target_reached), "circuit_edges": float(len(result.circuit)),
            "panel_spread": _or_nan(result.panel_spread),
            "eap_ig_completeness_error": _or_nan(result.completeness_error),
            **{f"panel:{key}": _or_nan(value) for key, value in result.panel.items()},
        }
        rows: list[Row | EdgeRow] = [(WHOLE_MODEL, WHOLE_MODEL, name, value) for name, value in whole.items()]
        for estimate, values in (("eap", result.eap), ("eap_ig", result.eap_ig)):
            agreement = result.agreement(values)
            rows += [(WHOLE_MODEL, WHOLE_MODEL, f"{estimate}_{name}", _or_nan(agreement[name]))
                     for name in ("spearman", "pearson", "circuit_recall")]
            rows.append((WHOLE_MODEL, WHOLE_MODEL, f"{estimate}_zero", float(agreement["reason"] == ZERO_ESTIMATE)))
        ranks = {"circuit_rank": result.circuit, "other_rank": result.other_circuit or []}
        fractions = result.fractions
        columns = {"edge_effect": result.effects, "edge_effect_low": result.effect_low,
                   "edge_effect_high": result.effect_high, "edge_change": result.change,
                   "edge_eap": fractions(result.eap), "edge_eap_ig": fractions(result.eap_ig)}
        for index, edge in enumerate(result.edges):
            sender, receiver = edge.split(" -> ")
            rows += [(WHOLE_MODEL, WHOLE_MODEL, name, _or_nan(values[index]), sender, receiver)
                     for name, values in columns.items()]
            for name, circuit in ranks.items():
                if edge in circuit:
                    rows.append((WHOLE_MODEL, WHOLE_MODEL, name, float(circuit.index(edge) + 1), sender, receiver))
        return rows

    return compute


def circuit_measure(task: str, method: str = "greedy") -> Measure:
    """The causal circuit on `task` (model.tasks.TASKS) found by `method` as a measure of the table:
    `circuit:<task>` (the greedy prefix) or `circuit:<task>:acdc` (ACDC, the greedy circuit recorded beside it)."""
    chosen = TASKS[task]
    cfg = CircuitConfig()
    found = (f"shortest prefix by |effect| recovering {cfg.faithfulness:g} of the difference, connected"
             if method == "greedy" else
             f"ACDC in reverse topological order at threshold {cfg.acdc_threshold:g}, the greedy prefix beside it")
    description = (f"causal circuit on {task} ({chosen.description}): exact path patching of every edge with 95% "
                   f"bootstrap intervals, EAP and EAP-IG ({cfg.ig_steps} midpoint steps); the null of "
                   f"{cfg.null_inits} untrained models; circuit: {found}; the robustness panel; {cfg.sequences} "
                   f"sequences x {cfg.positions} positions (model.causal)")
    return Measure(circuit_analysis(task, method), CIRCUIT_VERSION, description, _circuit_rows(task, method))


MEASURES: dict[str, Measure] = {
    measure.name: measure
    for measure in (
        Measure("loss", 1, "test_loss, test_accuracy and icl_score on the held-out sample", _loss_rows),
        Measure("scores", 2, "every head's pattern and copying scores (DESIGN.md, Head scores)", _score_rows),
        Measure(
            "ablation", 1, "each head's mean-ablation rise in held-out and repeated-token loss (nats)", _ablation_rows
        ),
        Measure(
            "composition",
            3,
            "Q-, K- and V-composition of every earlier head into every later one, each kind's random baseline "
            "(mean, std over random matrices of the same shapes) and its null (mean, std, max over the heads' "
            "backward pairs: later-layer outputs into earlier-layer inputs)",
            _composition_rows,
        ),
        Measure(
            "llc",
            2,
            "local learning coefficient by SGLD at the snapshot (model.llc.LLCConfig), on the held-out windows",
            _llc_rows,
        ),
    )
}
DEFAULT_MEASURES = ("loss", "scores")


def get_measure(name: str) -> Measure:
    """A measure by its name in the table: one of MEASURES, or `circuit:<task>` for every task in TASKS (a task
    added in Python is a measure at once)."""
    circuit = parse_circuit_analysis(name)
    if circuit is not None and circuit[0] in TASKS:
        return circuit_measure(*circuit)
    return MEASURES[name]


def measure_names(with_acdc: bool = True) -> list[str]:
    """Every measure's name; `all` leaves ACDC's circuits out (their search is sequential: ask for them by name)."""
    methods = METHODS if with_acdc else ("greedy",)
    return [*MEASURES, *(circuit_analysis(task, method) for method in methods for task in TASKS)]


def parse_measures(text: str) -> tuple[str, ...]:
    """`--what a,b`: known measure names, in the table's order (`circuit` is `circuit:induction`); `all` for
    every one."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return tuple(measure_names(with_acdc=False))
    names = [f"{CIRCUIT_PREFIX}induction" if name == "circuit" else name for name in names]
    unknown = [name for name in names if name not in measure_names()]
    if unknown or not names:
        tasks = f"circuit:TASK or circuit:TASK:acdc with TASK one of {', '.join(TASKS)}"
        raise ConfigError(f"--what {text!r}: unknown measure {', '.join(unknown) or '(none)'}; measures: "
                          f"{', '.join(MEASURES)}, circuit ({tasks}) or all")
    return tuple(dict.fromkeys(names))


@torch.no_grad()
def measure_model(model: Transformer, probe: Probe, names: tuple[str, ...]) -> dict[str, list[Row | EdgeRow]]:
    """Rows of each named measure for one model."""
    model.eval()
    return {name: get_measure(name).compute(model, probe) for name in names}


def run_probe(run_config: dict[str, Any], data=None) -> Probe:
    """The probe of a run from its config (config.json or a snapshot's record): the trainer's held-out sample.

    `data` is the run's prepared data when the caller has it; otherwise it is prepared (from the cache).
    """
    model_cfg = from_dict(ModelConfig, run_config["model"])
    train_cfg = from_dict(TrainConfig, run_config.get("train", {}))
    data_cfg = from_dict(DataConfig, run_config.get("data", {}))
    if data is None:
        data = prepare_data(data_cfg, model_cfg.seq_len)
    windows = held_out_sample(np.asarray(data.test), train_cfg.eval_tokens, model_cfg.seq_len)
    return Probe(torch.as_tensor(windows), training_tokens=training_tokens(np.asarray(data.train)))


def training_tokens(windows: np.ndarray) -> torch.Tensor:
    """The ids that occur in training windows (pads aside)."""
    flat = windows.reshape(-1)
    return torch.as_tensor(np.flatnonzero(np.bincount(flat[flat >= 0])))


def checkpoint_document(checkpoint, which: str) -> dict[str, Any]:
    """heads.json (`heads`: scores, ablation, labels, composition) or circuits.json (`circuits`: token tables)
    of a checkpoint folder that does not hold it, such as a snapshot's: computed from its weights and run data."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    model = load_checkpoint(checkpoint)
    data = prepare_data(from_dict(DataConfig, config.get("data", {})), model.cfg.seq_len)
    if which == "heads":
        probe = run_probe(config, data)
        return head_scores(model, probe.held_out, probe.analysis, ablate=True)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    frequencies = token_frequencies(torch.as_tensor(np.asarray(data.train)), model.cfg.vocab_size)
    return token_tables(model, lambda i: tokenizer.token_strings([i])[0], frequencies)
