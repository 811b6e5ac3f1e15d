"""One self-contained HTML report of an experiment: images inlined, no network, works offline."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any

from .names import metric_mode
from .results import Experiment, TrialRecord, best_trials, status_counts, trial_history
from .space import SHAPE_KEYS
from .storage import read_text

VARYING = (*SHAPE_KEYS, "tokenizer", "batch_size")
LEADERBOARD_METRICS = (
    "test_loss", "test_accuracy", "icl_score", "induction_score_max", "prev_token_score_max", "copying_score_max", "induction_formed_at",
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 80rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
.wide { overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
pre { background: #f7f7f7; padding: 0.8rem; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3rem 0; }
section.trial { border-top: 2px solid #444; margin-top: 2rem; }
.label { background: #e6f0ff; border-radius: 0.3rem; padding: 0 0.3rem; margin-right: 0.2rem; }
"""
# Counts the images that decoded, so a headless browser can tell the report rendered whole.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-images-loaded', String(loaded));
});
"""


def build_report(experiment: Experiment, top: int = 3) -> str:
    metric = experiment.record["metric"]
    mode = experiment.record.get("mode") or metric_mode(metric)
    ranked = best_trials(experiment, metric, mode, len(experiment.trials)) if _reported(experiment, metric) else []
    leaders = ranked[:top]
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(status_counts(experiment).items()))
    parts = [
        f"<h1>{_e(experiment.name)}</h1>",
        f"<p>storage <code>{_e(experiment.storage.uri)}</code> &middot; ranked by <b>{_e(metric)}</b> ({_e(mode)}) &middot; "
        f"{len(experiment.trials)} trials: {_e(counts.replace('_', ' '))} &middot; created {_e(experiment.record.get('created', ''))}</p>",
        "<h2>Leaderboard</h2>",
        _leaderboard(experiment, ranked, metric),
    ]
    if leaders:
        parts += ["<h2>Loss curves of the top trials</h2>", _image(_loss_curves(experiment, leaders), "test loss curves")]
    for rank, trial in enumerate(leaders, 1):
        parts.append(_trial_section(experiment, trial, rank, metric))
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(experiment.name)}: circuit-sweep report</title><style>{STYLE}</style>"
        f"<script>{CHECK_SCRIPT}</script></head><body>\n{body}\n</body></html>\n"
    )


def _reported(experiment: Experiment, metric: str) -> bool:
    return any(isinstance(t.metrics.get(metric), (int, float)) for t in experiment.trials)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return _e(value)


def _leaderboard(experiment: Experiment, ranked: list[TrialRecord], metric: str) -> str:
    unranked = [t for t in experiment.trials if t not in ranked]
    metrics = [metric, *(m for m in LEADERBOARD_METRICS if m != metric)]
    head = "".join(f"<th>{_e(c)}</th>" for c in ("#", "trial", "status", "iterations", *metrics, *VARYING, "error"))
    rows = []
    for rank, trial in enumerate([*ranked, *unranked], 1):
        cells = [str(rank) if trial in ranked else "-", trial.trial_id, _e(trial.status_text), str(trial.iterations)]
        cells += [_number(trial.metrics.get(m, "")) for m in metrics]
        cells += [_e(trial.config.get(k, "")) for k in VARYING]
        cells.append(_e(trial.error or ""))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<div class=\"wide\"><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _loss_curves(experiment: Experiment, trials: list[TrialRecord]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4), dpi=90)
    axes = figure.add_subplot()
    for trial in trials:
        history = [r for r in trial_history(experiment.storage, trial) if isinstance(r.get("test_loss"), (int, float)) and math.isfinite(r["test_loss"])]
        tokens = [r["tokens_seen"] for r in history]
        (line,) = axes.plot(tokens, [r["test_loss"] for r in history], marker="o", label=trial.trial_id)
        axes.plot(tokens, [r["train_loss"] for r in history], linestyle="--", alpha=0.5, color=line.get_color())
    axes.set_xlabel("training tokens")
    axes.set_ylabel("loss (solid: test, dashed: train)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _trial_section(experiment: Experiment, trial: TrialRecord, rank: int, metric: str) -> str:
    storage = experiment.storage
    parts = [
        f'<section class="trial"><h2>#{rank} {_e(trial.trial_id)}: {_e(metric)} {_number(trial.metrics.get(metric))}</h2>',
        "<p>" + " ".join(f"<code>{_e(k)}={_e(trial.config[k])}</code>" for k in VARYING if k in trial.config) + "</p>",
    ]
    checkpoint = trial.checkpoint
    if checkpoint is None:
        parts.append("<p>No complete checkpoint.</p></section>")
        return "\n".join(parts)
    files = trial.files[checkpoint.rsplit("/", 1)[1]]
    parts.append(f"<p>checkpoint <code>{_e(storage.uri_of(checkpoint))}</code></p>")
    parts.append(f"<h3>Sample</h3><pre>{_e(read_text(storage, f'{checkpoint}/sample.txt').strip())}</pre>")
    heads = json.loads(read_text(storage, f"{checkpoint}/heads.json"))
    parts.append("<h3>Head atlas</h3>" + _atlas(heads))
    parts.append("<h3>Attention heatmaps</h3>")
    for name in sorted(p for p in files if p.startswith("heatmaps/layer") and "_head" not in p and p.endswith(".png")):
        with storage.filesystem.open_input_stream(f"{checkpoint}/{name}") as stream:
            parts.append(_image(stream.read(), name))
    parts.append("</section>")
    return "\n".join(parts)


def _atlas(document: dict[str, Any]) -> str:
    if not document["heads"]:
        return "<p>No heads.</p>"
    names = list(document["heads"][0]["scores"])
    head = "".join(f"<th>{_e(c)}</th>" for c in ("layer", "head", *names, "labels"))
    rows = []
    for entry in document["heads"]:
        labels = "".join(f'<span class="label">{_e(label)}</span>' for label in entry["labels"]) or "-"
        cells = [str(entry["layer"]), str(entry["head"]), *(f"{entry['scores'][n]:.2f}" for n in names)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f'<td class="text">{labels}</td></tr>')
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"
