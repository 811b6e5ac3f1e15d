"""The scientific check: induction heads form in 2 layers and not in 1 (Olsson et al. 2022).

Both runs use the `induction` preset's shape and budget (d_model 64, 4 heads,
seq_len 64, 12M tokens of the synthetic `repeat` task), about 2.5 minutes for
two layers on a 2-core CPU.
"""

import json

import torch
from click.testing import CliRunner

from model.analysis import composition_scores
from model.checkpoint import read_config
from model.config import ModelConfig
from model.transformer import Transformer
from sweep.cli import main
from sweep.space import PRESETS

PRESET = PRESETS["induction"].fixed
FLAGS = {"d_model": "--d-model", "heads": "--heads", "seq_len": "--seq-len", "lr": "--lr",
         "batch_size": "--batch-size", "max_tokens": "--max-tokens", "eval_every_tokens": "--eval-every-tokens"}


def train_repeat(layers: int, out) -> dict:
    """`sweep train repeat` with the preset's values; returns the final checkpoint's heads.json."""
    args = ["train", "repeat", "--layers", str(layers), "--out", str(out), "--seed", "0"]
    for key, flag in FLAGS.items():
        args += [flag, str(PRESET[key])]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "checkpoint" / "heads.json").read_text())


def scores(heads: dict, layer: int, name: str) -> list[float]:
    return [head["scores"][name] for head in heads["heads"] if head["layer"] == layer]


def test_two_layers_grow_an_induction_head_fed_by_a_previous_token_head(tmp_path):
    heads = train_repeat(2, tmp_path / "two")
    induction = scores(heads, 1, "induction")
    best = max(range(len(induction)), key=induction.__getitem__)
    assert induction[best] > 0.4, induction

    # Its keys are built from a layer-0 previous-token head: of all layer-0 heads, a
    # previous-token head composes most strongly into its keys, well above the
    # K-composition of the same shapes at initialisation.
    k_into_best = [heads["composition"]["k"][0][head][1][best] for head in range(len(induction))]
    source = max(range(len(k_into_best)), key=k_into_best.__getitem__)
    assert scores(heads, 0, "previous_token")[source] > 0.4, (k_into_best, scores(heads, 0, "previous_token"))
    torch.manual_seed(0)
    untrained = Transformer(ModelConfig(**read_config(tmp_path / "two" / "checkpoint")["model"]))
    k_at_init = composition_scores(untrained)["k"][0]
    baseline = sum(k_at_init[h1][1][h2] for h1 in range(len(induction)) for h2 in range(len(induction))) / len(induction) ** 2
    assert k_into_best[source] > 1.5 * baseline, (k_into_best, baseline)


def test_one_layer_cannot_do_induction(tmp_path):
    heads = train_repeat(1, tmp_path / "one")
    assert max(scores(heads, 0, "induction")) < 0.2

