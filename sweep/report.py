"""One self-contained HTML report of an experiment: the document a researcher reads first.

Sections: what grew where (the atlas over the grid's axes), the dynamics of
every trial (Olsson's phase-change figure), the leaderboard, and for the top
trials the head atlas with ablation, the composition graph, the token tables
and an interactive attention viewer. Images, data and script are inlined: no
network, works offline.

matplotlib and model.analysis (torch) are imported inside the functions that draw.
"""

from __future__ import annotations

import base64
import html
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jinja2
import numpy as np

from model.edges import ROBUST_SPREAD
from model.metrics import current_labels

from .atlas import GRID_SCORES, Atlas, build_atlas
from .circuits import SnapshotCircuit, TrialCircuit, trial_circuits
from .effects import atlas_effects, effects_figure
from .figures import png, token_formatter
from .names import display_state, metric_mode
from .records import Experiment, TrialRecord
from .results import best_trials, status_counts, trial_history
from .space import SHAPE_KEYS
from .stages import trial_stages
from .storage import read_text
from .table import formed_at_caption, read_table, snapshot_history

VARYING = (*SHAPE_KEYS, "tokenizer", "batch_size")
LEADERBOARD_METRICS = (
    "test_loss",
    "test_accuracy",
    "icl_score",
    "induction_score_max",
    "prev_token_score_max",
    "copying_score_max",
    "induction_formed_at",
)
DYNAMICS = (("test_loss", "test loss", "nats per token"),
            ("induction_score_max", "induction score (max over heads)", "score"),
            ("prev_token_score_max", "previous-token score (max over heads)", "score"),
            ("icl_score", "in-context-learning score", "nats (late minus early tokens)"))
STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 1.5rem 2rem; color: #222; max-width: 84rem;
       line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 2px solid #444; padding-bottom: 0.2rem; margin-top: 2.5rem; }
nav.toc { background: #f6f6f6; padding: 0.6rem 1rem; border-radius: 0.4rem; }
nav.toc ol { margin: 0.3rem 0; } nav.toc a { text-decoration: none; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; } td.text { text-align: left; }
.wide { overflow-x: auto; max-width: 100%; max-height: 32rem; overflow-y: auto; }
.wide td:first-child, .wide th:first-child {
  position: sticky; left: 0; background: #fff; z-index: 1; white-space: nowrap; }
.wide th:first-child { background: #f3f3f3; z-index: 2; }
td.labels { white-space: nowrap; }
pre { background: #f7f7f7; padding: 0.8rem; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3rem 0; }
section.trial { border-top: 1px dashed #888; margin-top: 2rem; }
.label { background: #e6f0ff; border-radius: 0.3rem; padding: 0 0.3rem; margin-right: 0.2rem; }
.label.matters { background: #ffe3c2; }
.note { color: #555; font-size: 0.9rem; }
.viewer { border: 1px solid #ccc; border-radius: 0.4rem; padding: 0.6rem; margin: 0.8rem 0; }
.viewer .tokens { font-family: ui-monospace, monospace; line-height: 2.1; margin: 0.5rem 0; }
.viewer .tok { padding: 0.15rem 0.2rem; margin: 0 1px; border-radius: 0.2rem; cursor: pointer; border: 1px solid #ddd;
  white-space: pre; }
.viewer .tok.query { outline: 2px solid #c00; }
.viewer .readout { font-size: 0.9rem; color: #333; min-height: 1.3rem; }
.columns { display: flex; flex-wrap: wrap; gap: 1.5rem; } .columns > div { flex: 1 1 22rem; }
.masonry { column-width: 24rem; column-gap: 1.5rem; } .masonry > div { break-inside: avoid; margin-bottom: 0.8rem; }
.masonry table { width: 100%; }
"""
# Counts the images that decoded, so a headless browser can tell the report rendered whole,
# and runs every attention viewer: click (or hover) a token to see where a head attends from it.
SCRIPT = """
function initViewer(root) {
  var data = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
  var select = root.querySelector('select'), box = root.querySelector('.tokens');
  var readout = root.querySelector('.readout');
  var query = data.tokens.length - 1, spans = [];
  data.tokens.forEach(function (token, position) {
    var span = document.createElement('span');
    span.className = 'tok'; span.textContent = token; span.setAttribute('data-position', String(position));
    span.addEventListener('click', function () { query = position; render(); });
    span.addEventListener('mouseenter', function () { query = position; render(); });
    box.appendChild(span); spans.push(span);
  });
  select.addEventListener('change', render);
  function render() {
    var parts = select.value.split('.'), layer = +parts[0], head = +parts[1];
    var row = data.patterns[layer][head][query], best = 0;
    spans.forEach(function (span, key) {
      var weight = key <= query ? row[key] : 0;
      if (weight > row[best]) { best = key; }
      span.style.background = 'rgba(230, 110, 0, ' + weight.toFixed(3) + ')';
      span.title = 'attention ' + weight.toFixed(3);
      span.classList.toggle('query', key === query);
    });
    var predicted = data.predictions ? ' \u00b7 the model predicts next: ' + data.predictions[query].map(function (p) {
      return JSON.stringify(p[0]) + ' ' + (100 * p[1]).toFixed(0) + '%'; }).join(', ') : '';
    readout.textContent = 'head ' + select.value + ', query ' + JSON.stringify(data.tokens[query]) +
      ' (position ' + query + '): attends most to ' + JSON.stringify(data.tokens[best]) +
      ' (position ' + best + ', ' + row[best].toFixed(2) + ')' + predicted;
    root.setAttribute('data-query', String(query));
  }
  render();
}
window.addEventListener('load', function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-images-loaded', String(loaded));
  document.querySelectorAll('.viewer').forEach(initViewer);
  document.body.setAttribute('data-ready', '1');
});
"""


def build_report(experiment: Experiment, top: int = 3) -> str:
    metric = experiment.record["metric"]
    mode = experiment.record.get("mode") or metric_mode(metric)
    ranked = best_trials(experiment, metric, mode, len(experiment.trials)) if _reported(experiment, metric) else []
    leaders = ranked[:top]
    table = read_table(experiment)
    atlas = build_atlas(experiment, table)
    with ThreadPoolExecutor(max_workers=16) as pool:
        histories = dict(
            zip(
                (t.trial_id for t in experiment.trials),
                pool.map(lambda t: trial_history(experiment.storage, t), experiment.trials),
            )
        )
    counts = ", ".join(f"{n} {display_state(state)}" for state, n in sorted(status_counts(experiment).items()))
    stage_documents = [d for d in trial_stages(experiment, table) if d["llc"]]
    circuits = trial_circuits(experiment, table, atlas.circuit_task) if atlas.circuit_task else {}
    boundaries = {d["trial_id"]: [b["tokens"] for b in d["llc_boundaries"]] for d in stage_documents}
    with ThreadPoolExecutor(max_workers=16) as pool:
        heads = dict(zip((t.trial_id for t in leaders), pool.map(lambda t: _heads_of(experiment, t), leaders)))
    # every trial's ablation chart on one scale: 0.04 and 2.9 nats must not look equally tall
    rises = [v for d in heads.values() if d for h in d["heads"] for v in (h.get("ablation") or {}).values()]
    scale = (min(0.0, *rises) * 1.1, max(0.05, *rises) * 1.1) if rises else None
    sections = [
        ("grid", "What grew where", _grid_section(atlas)),
        *(
            (("effects", "What changes the circuit", effects),)
            if (effects := _effects_section(atlas, experiment.record.get("fixed") or {}))
            else ()
        ),
        ("dynamics", "Dynamics of every trial", _dynamics_section(experiment, histories | snapshot_history(table))),
        *(
            (("stages", "Developmental stages", stages),)
            if (stages := _stages_section(experiment, stage_documents))
            else ()
        ),
        ("leaderboard", "Leaderboard", _leaderboard(experiment, ranked, metric)),
        *(
            (
                f"trial-{trial.trial_id}",
                f"#{rank} {trial.trial_id}",
                _trial_section(experiment, trial, metric, heads[trial.trial_id], scale)
                + _circuit_section(
                    circuits.get(trial.trial_id), trial, atlas.circuit_task, boundaries.get(trial.trial_id, [])
                ),
            )
            for rank, trial in enumerate(leaders, 1)
        ),
    ]
    toc = "".join(f'<li><a href="#{anchor}">{_e(title)}</a></li>' for anchor, title, _ in sections)
    body = "\n".join(
        [
            f"<h1>{_e(experiment.name)}</h1>",
            f"<p>storage <code>{_e(experiment.storage.uri)}</code> &middot; ranked by <b>{_e(metric)}</b> ({_e(mode)}) "
            "&middot; "
            f"{len(experiment.trials)} trials: {_e(counts)} &middot; created "
            f"{_e(experiment.record.get('created', ''))}</p>",
            f'<nav class="toc"><b>Contents</b><ol>{toc}</ol></nav>',
            *(f'<section id="{anchor}"><h2>{_e(title)}</h2>{content}</section>' for anchor, title, content in sections),
        ]
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(experiment.name)}: circuit-sweep report</title><style>{STYLE}</style>"
        f"<script>{SCRIPT}</script></head><body>\n{body}\n</body></html>\n"
    )


TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("sweep", "templates"), autoescape=True,
                               trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
TEMPLATES.filters["fixed"] = lambda value, digits=2: _fixed(value, digits)
TEMPLATES.filters["reading"] = lambda value, time: (
    "-" if value is None else f"{value / 1e6:.3g}M" if time and abs(value) >= 1e5 else f"{value:.4g}")
EFFECT_READINGS = ("formed_at", "does_task_from", "faithfulness", "test_loss")
"""The readings the report's effects section shows (`sweep effects --reading` has them all)."""


def _effects_section(atlas: Atlas, fixed: dict[str, Any]) -> str | None:
    """What changes the circuit: each reading per axis value over seeds, with intervals, and each grid point's
    replicates matched by role; None where there is neither an axis nor a replicate."""
    found = atlas_effects(atlas, fixed)
    documents = [found[name] for name in EFFECT_READINGS if name in found and found[name]["effects"]]
    formed = found.get("formed_at")
    if not documents and not (formed and max(formed["replicates"]) > 1):
        return None
    for document in documents:
        document["figure"] = (base64.b64encode(effects_figure(document)).decode()
                              if document["reading"] == "formed_at" else None)
    points = []
    for entry in (formed or {}).get("points", []):
        fractions = entry["role_edges"]
        points.append(entry | {"label": " ".join(f"{k}={v}" for k, v in entry["point"].items()) or "-",
                               "everywhere": [e for e, f in fractions.items() if f == 1.0],
                               "somewhere": [f"{e} ({f:.0%})" for e, f in fractions.items() if f < 1.0]})
    return TEMPLATES.get_template("effects.html").render(
        documents=documents, points=points, replicates=(formed or documents[0])["replicates"],
        note=(formed or documents[0])["note"])


def _reported(experiment: Experiment, metric: str) -> bool:
    return any(isinstance(t.metrics.get(metric), (int, float)) for t in experiment.trials)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fixed(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return _e(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None or value == "" else _e(value)


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


# ---------------------------------------------------------------- what grew where


def _grid_section(atlas: Atlas) -> str:
    parts = [
        "<p class=\"note\">Each head score's max over a trial's heads (latest checkpoint), averaged over the trials "
        "that share "
        "a value of an axis. Axes are ordered by how strongly the pattern scores (induction, previous-token, "
        "duplicate-token, "
        "first-token) depend on them: the spread of these means.</p>"
    ]
    if atlas.axes:
        spread = ", ".join(
            f"<b>{_e(axis)}</b> ({atlas.strongest(axis)[0]} means differ by {atlas.strongest(axis)[1]:.2f})"
            for axis in atlas.axes
        )
        parts.append(f"<p>Axes by dependence: {spread}.</p>")
        parts.append(_image(_grid_figure(atlas), "head scores over the grid's axes"))
        parts.append(_group_tables(atlas))
        if atlas.circuit_task:
            parts.append(_circuit_groups(atlas))
    else:
        parts.append("<p>The experiment varies no axis.</p>")
    parts.append("<h3>Atlas: every trial</h3>" + _atlas_table(atlas)
                 + f'<p class="note">{_e(formed_at_caption(atlas.formed_at_resolution))}</p>')
    return "\n".join(parts)


def _grid_figure(atlas: Atlas) -> bytes:
    """Small multiples: one panel per head score, over the two strongest axes (a heatmap) or the strongest one
    (bars)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.3 * len(GRID_SCORES), 3.2), dpi=80, layout="constrained")
    if len(atlas.axes) >= 2:
        first, second = atlas.axes[:2]
        entries = atlas.pairs[f"{first} x {second}"]
        rows = sorted({json.dumps(e[first]) for e in entries}, key=_order)
        columns = sorted({json.dumps(e[second]) for e in entries}, key=_order)
        for index, score in enumerate(GRID_SCORES):
            axes = figure.add_subplot(1, len(GRID_SCORES), index + 1)
            grid = [[math.nan] * len(columns) for _ in rows]
            for entry in entries:
                value = entry.get(f"{score}_max")
                if value is not None:
                    grid[rows.index(json.dumps(entry[first]))][columns.index(json.dumps(entry[second]))] = value
            image = axes.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
            for r, row in enumerate(grid):
                for c, value in enumerate(row):
                    if not math.isnan(value):
                        axes.text(
                            c,
                            r,
                            f"{value:.2f}",
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="white" if value < 0.6 else "black",
                        )
            axes.set_xticks(range(len(columns)), [json.loads(c) for c in columns], fontsize=8)
            axes.set_yticks(range(len(rows)), [json.loads(r) for r in rows], fontsize=8)
            axes.set_xlabel(second, fontsize=9)
            axes.set_ylabel(first, fontsize=9)
            axes.set_title(score, fontsize=10)
        figure.colorbar(image, ax=figure.axes, fraction=0.02)
    else:
        axis = atlas.axes[0]
        entries = atlas.groups[axis]
        for index, score in enumerate(GRID_SCORES):
            axes = figure.add_subplot(1, len(GRID_SCORES), index + 1)
            means = [e[f"{score}_max"]["mean"] or 0.0 for e in entries]
            axes.bar(range(len(entries)), means, color="#4477aa")
            axes.set_xticks(range(len(entries)), [str(e["value"]) for e in entries], fontsize=8)
            axes.set_ylim(min(0.0, *means), 1)
            axes.set_xlabel(axis, fontsize=9)
            axes.set_title(score, fontsize=10)
    return png(figure)


def _order(text: str) -> tuple:
    value = json.loads(text)
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def _group_tables(atlas: Atlas) -> str:
    head = "".join(
        f"<th>{_e(c)}</th>"
        for c in ("axis", "value", "trials", *(f"{s} mean / max" for s in GRID_SCORES), "induction heads", "test_loss")
    )
    rows = []
    for axis in atlas.axes:
        for entry in atlas.groups[axis]:
            cells = [_e(axis), _e(entry["value"]), str(entry["trials"])]
            for score in GRID_SCORES:
                value = entry[f"{score}_max"]
                cells.append(f"{value['mean']:.2f} / {value['max']:.2f}" if value["mean"] is not None else "-")
            cells.append(f"{entry['induction_heads']['mean']:.1f}")
            loss = entry["test_loss"]["mean"]
            cells.append(f"{loss:.3f}" if loss is not None else "-")
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<div class="wide"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _circuit_groups(atlas: Atlas) -> str:
    """For every axis value, the edge kinds of its trials' causal circuits: how many circuits hold each kind and
    when it appeared (the first edge of the kind to pass the edge threshold, mean tokens)."""
    head = "".join(f"<th>{_e(c)}</th>" for c in ("axis", "value", "circuits", "edges (mean)", "faithfulness",
                                                   "edge kind", "in circuits", "edges of the kind",
                                                   "first appeared (median)", "never"))
    rows = []
    for axis in atlas.axes:
        for entry in atlas.groups[axis]:
            group = entry["circuit"]
            if group is None:
                continue
            kinds = list(group["kinds"].items()) or [("none", None)]
            for index, (kind, values) in enumerate(kinds):
                first = [_e(axis), _e(entry["value"]), f"{group['with_circuit']}/{group['trials']}",
                         f"{group['edges']:.1f}", _number(group["faithfulness"])] if index == 0 else [""] * 5
                cells = [_e(kind), f"{values['trials']}/{group['trials']}", f"{values['edges']:.1f}",
                         _number(None if values["first_tokens"] is None else round(values["first_tokens"])),
                         f"{values['never']} of {values['of']}"] if values else [_e(kind), "-", "-", "-", "-"]
                rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in first + cells) + "</tr>")
    note = (f'<p class="note">Causal circuits on the <b>{_e(atlas.circuit_task)}</b> task at each trial\'s last '
            "snapshot (`sweep circuit`), by edge kind: <code>head -&gt; k</code> is K-composition, "
            "<code>embed -&gt; v</code> a head's value read from the embedding, <code>head -&gt; logits</code> a "
            "head's direct path. First appeared: the median over the group's trials of when the first edge of that "
            "kind appeared, a trial where it never did counted as later than every snapshot (censored, never "
            "dropped; no median where half or more never did).</p>")
    return f'<h3>Circuits by axis</h3>{note}<div class="wide"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _atlas_table(atlas: Atlas) -> str:
    labels = ("induction", "previous_token", "matters")
    staged = any(row.stages is not None for row in atlas.rows)
    columns = ("trial", *atlas.columns, "induction formed at", *(("stages",) if staged else ()), "status", "test_loss",
               "icl_score", *(f"{s} max" for s in GRID_SCORES), *(f"{label} heads" for label in labels))
    rows = []
    for row in atlas.rows:
        stages = (_number(row.stages),) if staged else ()
        cells = [_e(row.trial_id), *(_e(row.config.get(a)) for a in atlas.columns), _number(row.induction_formed_at),
                 *stages,
                 _e(display_state(row.status)), _number(row.values["test_loss"]),
                 _number(row.values["icl_score"]), *(_number(row.values[f"{s}_max"]) for s in GRID_SCORES),
                 *(str(row.label_counts[label]) for label in labels)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    return f'<div class="wide"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


# ---------------------------------------------------------------- dynamics


def _dynamics_section(experiment: Experiment, histories: dict[str, list[dict]]) -> str:
    if not any(histories.values()):
        return "<p>No iterations reported yet.</p>"
    resolution = ("at every snapshot `sweep analyse` scored" if experiment.formed_at_resolution == "snapshots"
                  else "at every iteration, or snapshot where `sweep analyse` scored them")
    note = ('<p class="note">Every trial over training tokens (Olsson et al.\'s phase-change figure), ' + resolution +
            ": test loss beside the induction and previous-token scores and the in-context-learning score (loss late "
            "in the context minus early; lower = more use of context). A dot marks where a trial's induction heads "
            f"formed ({_e(formed_at_caption(experiment.formed_at_resolution))}).</p>")
    return note + _image(_dynamics_figure(experiment, histories), "dynamics of every trial")


def _dynamics_figure(experiment: Experiment, histories: dict[str, list[dict]]) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 7.2), dpi=80, layout="constrained")
    panels = [figure.add_subplot(2, 2, i + 1) for i in range(len(DYNAMICS))]
    many = len(histories) > 12
    labels = _short_labels(experiment.trials)
    for index, trial in enumerate(experiment.trials):
        history = [r for r in histories[trial.trial_id] if isinstance(r.get("tokens_seen"), (int, float))]
        if not history:
            continue
        tokens = [r["tokens_seen"] for r in history]
        color = f"C{index % 10}"
        for axes, (key, _, _) in zip(panels, DYNAMICS):
            values = [
                r.get(key) if isinstance(r.get(key), (int, float)) and math.isfinite(r.get(key)) else math.nan
                for r in history
            ]
            axes.plot(tokens, values, color=color, linewidth=0.9 if many else 1.4, alpha=0.6 if many else 0.9,
                      label=None if many else labels[trial.trial_id])
        formed = trial.metrics.get("induction_formed_at")
        scores = [(t, r.get("induction_score_max")) for t, r in zip(tokens, history)
                  if isinstance(r.get("induction_score_max"), (int, float))]
        if isinstance(formed, (int, float)) and scores:  # (formed_at may fall between iterations: a snapshot's)
            at = float(np.interp(formed, [t for t, _ in scores], [v for _, v in scores]))
            panels[1].plot([formed], [at], marker="o", color=color, markersize=7, markeredgecolor="black")
    for axes, (key, title, unit) in zip(panels, DYNAMICS):
        if key.endswith("_score_max"):
            axes.set_ylim(0, 1)  # scores live in [0, 1]: noise should look like noise
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("training tokens", fontsize=8)
        axes.set_ylabel(unit, fontsize=8)
        axes.xaxis.set_major_formatter(token_formatter())
        axes.tick_params(labelsize=8)
    if not many and experiment.trials:  # below the panels: never over the curves it names
        handles, names = panels[0].get_legend_handles_labels()  # one entry a trial, not one a panel
        figure.legend(handles, names, loc="outside lower center", ncols=min(4, len(names)), fontsize=8, frameon=False)
    return png(figure)


def _short_labels(trials: list[TrialRecord]) -> dict[str, str]:
    """Legend labels: the trial id and only the config keys that differ between these trials."""
    keys = [k for k in (*SHAPE_KEYS, "tokenizer", "batch_size", "seed")
            if len({json.dumps(t.config.get(k), default=str) for t in trials}) > 1]
    return {t.trial_id: " ".join([t.trial_id, *(f"{k}={t.config.get(k)}" for k in keys)]) for t in trials}


# ---------------------------------------------------------------- developmental stages

STAGE_TRIALS = 10  # curves drawn; more are unreadable on one panel (`sweep stages` lists them all)


def _stages_section(experiment: Experiment, documents: list[dict[str, Any]]) -> str | None:
    """The LLC curve of every trial with its stage boundaries and circuits, and its essential-dynamics
    trajectory; None where `sweep analyse --what llc` never ran."""
    if not documents:
        return None
    shown = documents[:STAGE_TRIALS]
    more = f" The first {STAGE_TRIALS} of {len(documents)} trials; `sweep stages` lists them all."
    note = (
        '<p class="note">The local learning coefficient (LLC, by SGLD at every snapshot) over training '
        "tokens, after Hoogland et al. 2024: its critical points bound the developmental stages (dashed lines: "
        "the end of each stage); the band spans the SGLD chains' estimates at each snapshot. Markers: where induction "
        "heads (triangle) and previous-token heads (square) "
        "formed. Right: the "
        "same trials' essential dynamics, the model's outputs on a fixed batch projected on their first two "
        "principal components across snapshots (circle: the first snapshot, x: a turning point)."
        + (more if len(documents) > len(shown) else "")
        + "</p>"
    )
    by_id = {t.trial_id: t for t in experiment.trials}
    return note + _image(_stages_figure(shown, by_id), "LLC and essential dynamics of every trial")


def _stages_figure(documents: list[dict[str, Any]], trials: dict[str, TrialRecord]) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5.4), dpi=80, layout="constrained")
    llc_axes, ed_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    labels = _short_labels([trials[d["trial_id"]] for d in documents if d["trial_id"] in trials])
    for index, document in enumerate(documents):
        color = f"C{index % 10}"
        tokens = [p["tokens_seen"] for p in document["llc"]]
        values = [p["llc"] for p in document["llc"]]
        positive = [(t, v) for t, v in zip(tokens, values) if t > 0]
        llc_axes.plot([t for t, _ in positive], [v for _, v in positive], color=color, marker=".", linewidth=1.4,
                      label=labels.get(document["trial_id"], document["trial_id"]))
        ranges = [(p["tokens_seen"], *p["chains"]) for p in document["llc"] if p["tokens_seen"] > 0 and p.get("chains")]
        if ranges:  # the chains' spread, not a standard error: from a few chains one would look more precise than it is
            llc_axes.fill_between([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges], color=color,
                                  alpha=0.15, linewidth=0)
        for boundary in document["llc_boundaries"]:
            llc_axes.axvline(boundary["tokens"], color=color, linestyle="--", linewidth=0.9, alpha=0.7)
        for name, marker in (("induction_formed_at", "^"), ("prev_token_formed_at", "s")):
            circuit = document["circuits"].get(name)
            if circuit and positive:
                nearest = min(positive, key=lambda p: abs(math.log(p[0]) - math.log(max(circuit["tokens_seen"], 1))))
                llc_axes.plot([circuit["tokens_seen"]], [nearest[1]], marker=marker, color=color, markersize=9,
                              markeredgecolor="black", linestyle="none")
        trajectory = [p for p in document.get("essential_dynamics", []) if None not in p["pc"][:2]]
        if trajectory:
            xs, ys = [p["pc"][0] for p in trajectory], [p["pc"][1] for p in trajectory]
            ed_axes.plot(xs, ys, color=color, linewidth=1.2, marker=".", markersize=4)
            ed_axes.plot(xs[:1], ys[:1], marker="o", color=color, markersize=8, markeredgecolor="black",
                         linestyle="none")
            turning = set(document["essential_dynamics_turning_points"])
            turns = [(x, y) for x, y, p in zip(xs, ys, trajectory) if p["tokens_seen"] in turning]
            if turns:
                ed_axes.plot([x for x, _ in turns], [y for _, y in turns], marker="x", color="black", markersize=8,
                             linestyle="none")
    llc_axes.set_xscale("log")
    llc_axes.xaxis.set_major_formatter(token_formatter())
    llc_axes.set_xlabel("training tokens (log)", fontsize=9)
    llc_axes.set_ylabel("LLC", fontsize=9)
    llc_axes.set_title("local learning coefficient", fontsize=10)
    ed_axes.set_xlabel("PC 1", fontsize=9)
    ed_axes.set_ylabel("PC 2", fontsize=9)
    ed_axes.set_title("essential dynamics", fontsize=10)
    for axes in (llc_axes, ed_axes):
        axes.tick_params(labelsize=8)
    figure.legend(loc="outside lower center", ncols=min(4, len(documents)), fontsize=8, frameon=False)
    return png(figure)


def _trial_label(trial: TrialRecord) -> str:
    varying = " ".join(f"{k}={trial.config[k]}" for k in SHAPE_KEYS if k in trial.config)
    return f"{trial.trial_id} {varying}"


# ---------------------------------------------------------------- leaderboard


def _leaderboard(experiment: Experiment, ranked: list[TrialRecord], metric: str) -> str:
    unranked = [t for t in experiment.trials if t not in ranked]
    metrics = [metric, *(m for m in LEADERBOARD_METRICS if m != metric)]
    head = "".join(f"<th>{_e(c)}</th>" for c in ("# trial", "status", "iterations", *metrics, *VARYING, "error"))
    rows = []
    for rank, trial in enumerate([*ranked, *unranked], 1):
        place = rank if trial in ranked else "-"
        cells = [f"{place}&nbsp;{trial.trial_id}", _e(trial.status_text), str(trial.iterations)]
        cells += [_number(trial.metrics.get(m, "")) for m in metrics]
        cells += [_e(trial.config.get(k, "")) for k in VARYING]
        cells.append(_e(trial.error or ""))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<div class=\"wide\"><table><tr>{head}</tr>{''.join(rows)}</table></div>"


# ---------------------------------------------------------------- top trials


def _heads_of(experiment: Experiment, trial: TrialRecord) -> dict[str, Any] | None:
    """heads.json of the trial's latest checkpoint (None without one)."""
    if trial.checkpoint is None:
        return None
    return current_labels(json.loads(read_text(experiment.storage, f"{trial.checkpoint}/heads.json")))


def _trial_section(experiment: Experiment, trial: TrialRecord, metric: str, heads: dict[str, Any] | None,
                   scale: tuple[float, float] | None) -> str:
    storage = experiment.storage
    parts = [
        f"<p><b>{_e(metric)} {_number(trial.metrics.get(metric))}</b> &middot; " + " ".join(
            f"<code>{_e(k)}={_e(trial.config[k])}</code>" for k in VARYING if k in trial.config) + "</p>",
    ]
    checkpoint = trial.checkpoint
    if checkpoint is None:
        return "\n".join(parts) + "<p>No complete checkpoint.</p>"
    files = trial.files[checkpoint.rsplit("/", 1)[1]]
    parts.append(f"<p>checkpoint <code>{_e(storage.uri_of(checkpoint))}</code></p>")
    parts.append("<h3>Head atlas</h3>" + _heads_table(heads))
    charts = []
    if any("ablation" in h for h in heads["heads"]):
        charts.append("<div><h3>Ablation</h3>" + _image(_ablation_figure(heads, scale), f"ablation of {trial.trial_id}")
                      + '<p class="note">One scale for every trial shown.</p></div>')
    if len({h["layer"] for h in heads["heads"]}) > 1:
        charts.append("<div><h3>Composition</h3>" + _composition_svg(heads, trial.config) + "</div>")
    if charts:
        parts.append('<div class="columns">' + "".join(charts) + "</div>")
    if "circuits.json" in files:
        parts.append(
            "<h3>What the heads do in tokens</h3>"
            + _token_tables(json.loads(read_text(storage, f"{checkpoint}/circuits.json")))
        )
    parts.append(f"<h3>Sample</h3><pre>{_e(read_text(storage, f'{checkpoint}/sample.txt').strip())}</pre>")
    if "heatmaps/patterns.json" in files:
        parts.append(
            "<h3>Attention viewer</h3>"
            + _viewer(json.loads(read_text(storage, f"{checkpoint}/heatmaps/patterns.json")), heads)
        )
    parts.append("<h3>Attention heatmaps</h3>")
    grids = sorted(p for p in files if p.startswith("heatmaps/layer") and "_head" not in p and p.endswith(".png"))
    if grids:
        for name in grids:
            with storage.filesystem.open_input_stream(f"{checkpoint}/{name}") as stream:
                parts.append(_image(stream.read(), name))
    elif "heatmaps/patterns.json" in files:  # a checkpoint between heatmap renders: drawn from its patterns
        from model.analysis import png_heatmaps

        document = json.loads(read_text(storage, f"{checkpoint}/heatmaps/patterns.json"))
        for name, png in sorted(png_heatmaps(document, per_head=False).items()):
            parts.append(_image(png, f"heatmaps/{name}"))
    return '<div class="trial">' + "\n".join(parts) + "</div>"


def _heads_table(document: dict[str, Any]) -> str:
    if not document["heads"]:
        return "<p>No heads.</p>"
    names = list(document["heads"][0]["scores"])
    ablated = any("ablation" in h for h in document["heads"])
    extra = ["ablate: held-out", "ablate: repeated"] if ablated else []
    # the head and its labels first: what a reader looks for, visible without scrolling
    head = "".join(f"<th>{_e(c)}</th>" for c in ("head", "labels", *(n.replace("_", " ") for n in names), *extra))
    rows = []
    for entry in document["heads"]:
        labels = "".join(f'<span class="label {_e(label)}">{_e(label)}</span>' for label in entry["labels"]) or "-"
        cells = [f"{entry['layer']}.{entry['head']}", *(f"{entry['scores'][n]:.2f}" for n in names)]
        if ablated:
            cells += [f"{entry['ablation'][k]:+.3f}" if "ablation" in entry else "-" for k in ("held_out", "repeated")]
        rows.append(f"<tr><td>{cells[0]}</td><td class=\"text labels\">{labels}</td>"
                    + "".join(f"<td>{c}</td>" for c in cells[1:]) + "</tr>")
    return f"<div class=\"wide\"><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _ablation_figure(document: dict[str, Any], scale: tuple[float, float] | None = None) -> bytes:
    from matplotlib.figure import Figure

    heads = [h for h in document["heads"] if "ablation" in h]
    names = [f"{h['layer']}.{h['head']}" for h in heads]
    figure = Figure(figsize=(max(4.0, 0.45 * len(heads) + 1.5), 3.0), dpi=80)
    axes = figure.add_subplot()
    positions = range(len(heads))
    axes.bar(
        [p - 0.2 for p in positions],
        [h["ablation"]["held_out"] for h in heads],
        width=0.4,
        label="held-out text",
        color="#4477aa",
    )
    axes.bar(
        [p + 0.2 for p in positions],
        [h["ablation"]["repeated"] for h in heads],
        width=0.4,
        label="repeated tokens",
        color="#ee6677",
    )
    axes.axhline(0, color="#444", linewidth=0.8)
    axes.set_xticks(list(positions), names, fontsize=8)
    axes.set_xlabel("head (layer.head)", fontsize=9)
    axes.set_ylabel("loss rise when mean-ablated (nats)", fontsize=8)
    if scale is not None:
        axes.set_ylim(*scale)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return png(figure)


def _composition_svg(document: dict[str, Any], config: dict[str, Any]) -> str:
    """Earlier-layer heads -> later-layer heads: the paths whose composition score stands above its null (the same
    heads' scores in the order they cannot compose, model.analysis.composition_null), width = the excess over the
    null's mean, on one scale for Q (blue), K (red) and V (green)."""
    from model.analysis import COMPOSITION_SIGMAS, composition_excess

    layers = sorted({h["layer"] for h in document["heads"]})
    heads = max(h["head"] for h in document["heads"]) + 1
    null = document.get("composition_null")
    against = "the same heads in the order they cannot compose (later-layer outputs into earlier-layer inputs)"
    if null is None:  # a heads.json written before the null existed
        null, against = document.get("composition_baseline"), "random matrices of the same shapes"
    if null is None:
        return '<p class="note">This heads.json predates composition baselines: no path is drawn.</p>'
    width, height = 120 + 150 * (len(layers) - 1), 40 + 34 * heads
    x = {layer: 60 + 150 * i for i, layer in enumerate(layers)}
    y = {head: 30 + 34 * head for head in range(heads)}
    colors = {"q": "#4477aa", "k": "#ee6677", "v": "#228833"}
    composition = document.get("composition", {})
    paths = []
    for kind in colors:
        for l1, by_head in enumerate(composition.get(kind, [])):
            for h1, by_layer in enumerate(by_head):
                for l2, row in enumerate(by_layer):
                    for h2, value in enumerate(row):
                        if value is not None and (excess := composition_excess(value, null[kind])) is not None:
                            paths.append((excess, kind, l1, h1, l2, h2, value))
    strongest = max((p[0] for p in paths), default=0.0)
    edges = []
    for excess, kind, l1, h1, l2, h2, value in sorted(paths):  # the strongest drawn last, on top
        offset = {"q": -4, "k": 0, "v": 4}[kind]
        edges.append(f'<line x1="{x[l1] + 14}" y1="{y[h1] + offset}" x2="{x[l2] - 14}" y2="{y[h2] + offset}" '
                     f'stroke="{colors[kind]}" stroke-width="{1 + 8 * excess / max(strongest, 1e-9):.1f}" '
                     f'stroke-opacity="{0.15 + 0.75 * excess / max(strongest, 1e-9):.2f}">'
                     f'<title>{kind.upper()}-composition {l1}.{h1} -&gt; {l2}.{h2}: {value:.3f} '
                     f'(null {null[kind]["mean"]:.3f} &#177; {null[kind]["std"]:.3f}; '
                     f'excess {excess:+.3f})</title></line>')
    labels = {(h["layer"], h["head"]): h["labels"] for h in document["heads"]}
    nodes = []
    for layer in layers:
        for head in range(heads):
            tags = labels.get((layer, head), [])
            fill = "#ffd27f" if "induction" in tags else "#a6d0ff" if "previous_token" in tags else "#eee"
            nodes.append(
                f'<circle cx="{x[layer]}" cy="{y[head]}" r="13" fill="{fill}" stroke="#555"><title>{layer}.{head}: '
                f'{", ".join(tags) or "no label"}</title></circle><text x="{x[layer]}" y="{y[head] + 4}" '
                'font-size="10" '
                f'text-anchor="middle">{layer}.{head}</text>'
            )
    top = sorted(paths, reverse=True)[:3]
    listed = "; ".join(f"{kind.upper()} {l1}.{h1}&#8594;{l2}.{h2} {value:.3f} (+{excess:.3f})"
                       for excess, kind, l1, h1, l2, h2, value in top) or "none"
    null_line = ", ".join(f"{kind.upper()} {b['mean']:.3f} &#177; {b['std']:.3f}" for kind, b in null.items())
    legend = (
        f'<p class="note">Lines: the paths whose composition score stands more than {COMPOSITION_SIGMAS:g} '
        f"standard deviations above {against} ({null_line}), and above every one of those, "
        '<span style="color:#4477aa">Q</span>, <span style="color:#ee6677">K</span>, '
        '<span style="color:#228833">V</span>; width: the excess over that mean, '
        f"one scale for all three (hover a line for its numbers). Strongest: {listed}. Nodes: "
        '<span style="background:#ffd27f">induction</span>, <span style="background:#a6d0ff">previous-token</span>.</p>'
    )
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="composition graph">{"".join(edges)}'
            f'{"".join(nodes)}</svg>{legend}')


def _token_tables(document: dict[str, Any]) -> str:
    def rows(entries: list[dict[str, Any]], limit: int = 8) -> str:
        return "".join(
            f'<tr><td class="text"><code>{_e(repr(e["token"]))}</code></td><td class="text">'
            + " ".join(f"<code>{_e(repr(t))}</code> {v:+.3g}" for t, v in e["top"][:4]) + "</td></tr>"
            for e in entries[:limit]
        )

    parts = [
        f'<p class="note">Read from the weights over the {document["frequent_tokens"]} most frequent training tokens '
        "(each token embedding alone through the LayerNorms, so the numbers are logits and attention scores). OV: the "
        "output tokens a source token raises when attended to. QK (layer 0): the key "
        "tokens a query token attends to.</p>",
        '<div class="masonry">',
    ]
    parts.append(
        f"<div><b>direct path (bigrams)</b><table><tr><th>token</th><th>raises "
        f"next</th></tr>{rows(document['direct_path'])}</table></div>"
    )
    for head in document["heads"]:
        name = f"{head['layer']}.{head['head']}"
        # each table its own block: the page flows them into columns without gaps
        block = [f"<div><b>head {name} OV</b><table><tr><th>source</th><th>raises</th></tr>{rows(head['ov'])}"
                 "</table></div>"]
        if "qk" in head:
            block.append(f"<div><b>head {name} QK</b><table><tr><th>query</th><th>attends to</th></tr>"
                         f"{rows(head['qk'], 5)}</table></div>")
        if head.get("skip_trigrams"):
            trigrams = "".join(
                f'<tr><td class="text"><code>{_e(repr(t["a"]))} ... {_e(repr(t["b"]))} -&gt; '
                f'{_e(repr(t["c"]))}</code></td>'
                f"<td>{t['qk']:+.3g}</td><td>{t['ov']:+.3g}</td><td>{t['score']:.3g}</td></tr>"
                for t in head["skip_trigrams"][:8]
            )
            block.append(f"<div><b>head {name} skip-trigrams</b><table><tr><th>A ... B -&gt; C</th>"
                         "<th>A-&gt;B attention</th>"
                         f"<th>B-&gt;C logit</th><th>score</th></tr>{trigrams}</table></div>")
        parts.append("".join(block))
    parts.append("</div>")
    return "".join(parts)


def _viewer(patterns: dict[str, Any], heads: dict[str, Any]) -> str:
    options = "".join(
        f'<option value="{h["layer"]}.{h["head"]}">head {h["layer"]}.{h["head"]}'
        f'{" (" + ", ".join(h["labels"]) + ")" if h["labels"] else ""}</option>'
        for h in heads["heads"]
    )
    data = json.dumps({"tokens": patterns["tokens"], "patterns": patterns["patterns"],
                       "predictions": patterns.get("predictions")}).replace("</", "<\\/")
    return (
        '<div class="viewer"><label>Head <select>' + options + '</select></label>'
        '<span class="note"> &middot; click or hover a token: the shading shows where the head attends from it, and '
        'below, what the model predicts after it</span>'
        '<div class="tokens"></div><div class="readout"></div>'
        f'<script type="application/json">{data}</script></div>'
    )


# ---------------------------------------------------------------- causal circuits

EDGE_COLORS = {"q": "#4477aa", "k": "#ee6677", "v": "#228833", "logits": "#555555", "mlp": "#aa7733"}
CURVES = 10  # edges drawn over training; more are unreadable on one panel (`sweep circuit` lists them all)


def _circuit_section(circuit: TrialCircuit | None, trial: TrialRecord, task: str | None, boundaries: list[int]) -> str:
    """The trial's causal circuit: its graph at the last snapshot and where induction heads formed, its edges'
    effects over training beside formed_at and the LLC stages, and the order its edges appeared."""
    if circuit is None:
        return ""
    last = circuit.last
    formed = trial.metrics.get("induction_formed_at")
    at_formed = next(
        (s for s in circuit.snapshots if isinstance(formed, (int, float)) and s.tokens_seen >= formed), None
    )
    graphs = [(last, "at the last snapshot")]
    if at_formed is not None and at_formed.step != last.step:
        graphs.insert(0, (at_formed, "where induction heads formed (induction_formed_at)"))
    settings = circuit.settings
    note = (
        f'<p class="note">Every edge patched alone on the <b>{_e(task)}</b> task (path patching: the receiver sees '
        "the corrupted run's value of the sender, everything else clean). The circuit: the fewest edges, by |effect| "
        f"and connected from the embedding to the logits, that recover {settings.faithfulness:.0%} of the "
        "clean-to-corrupted difference with every other edge corrupted (faithfulness, with its 95% bootstrap "
        "interval over the task's sequences). "
        "Lines: the circuit's edges into a head's <span style=\"color:#4477aa\">query</span>, "
        '<span style="color:#ee6677">key</span> or <span style="color:#228833">value</span>, or into the '
        "logits; width: the edge's effect (the metric's rise when it alone is corrupted, as a fraction of the "
        "difference). Below: those edges' effects over training; an edge appeared between the last snapshot below "
        f"and the first where its interval's lower end reached {settings.edge_threshold:g} and stayed for "
        f"{settings.persist} more.</p>"
    )
    summary = last.document()
    if last.circuit:
        faithful = summary["faithfulness"]
        low, high = summary["faithfulness_interval"]
        missed = "" if summary["target_reached"] is not False else (
            f" <b>{settings.faithfulness:g} not reached</b>: the most faithful prefix is shown.")
        panel = ", ".join(f"{_e(name)} {_fixed(value)}" for name, value in summary["panel"].items())
        verdict = "robust" if summary["robust"] else f"<b>not robust</b> (spread above {ROBUST_SPREAD:g})"
        note += (f"<p>At the last snapshot: faithfulness {faithful:.2f} [{_fixed(low)}, {_fixed(high)}] of a "
                 f"{summary['difference']:.3f}-nat difference ({summary['clean_metric']:.3f} clean, "
                 f"{summary['corrupted_metric']:.3f} corrupted; the null of untrained models "
                 f"{_fixed(summary['null_bound'], 3)} nats).{missed} Robustness panel (Miller et al. 2024: ablation / "
                 f"direction / metric): {panel}; spread {_fixed(summary['panel_spread'])}: {verdict}.</p>")
    else:
        note += (f"<p>At the last snapshot the model does not do the task: the clean run beats the corrupted one by "
                 f"{_fixed(summary['difference'], 3)} nats ({_fixed(summary['clean_metric'], 3)} clean, "
                 f"{_fixed(summary['corrupted_metric'], 3)} corrupted), below what it must clear (0.02 nats, 4 "
                 f"standard errors, and the null of untrained models {_fixed(summary['null_bound'], 3)} nats).</p>")
    figures = "".join(f"<div>{_circuit_svg(snapshot, title, circuit)}</div>" for snapshot, title in graphs)
    parts = [f"<h3>Causal circuit</h3>{note}", f'<div class="columns">{figures}</div>']
    if len(circuit.snapshots) > 1 and last.circuit:
        parts.append(_image(_circuit_effects_figure(circuit, formed, boundaries), f"circuit edges of {trial.trial_id}"))
    rows = []
    for position, edge in enumerate(circuit.order(), 1):
        entry = circuit.edge_document(edge, last)
        appeared = entry["appeared"]
        when = "-" if not appeared else (f"{appeared['after_tokens']:,} - {appeared['tokens_seen']:,}"
                                         if appeared["after_tokens"] is not None else f"by {appeared['tokens_seen']:,}")
        low, high = entry["interval"]
        cells = [str(position), f"<code>{_e(edge)}</code>", _e(entry["kind"]),
                 "-" if entry["effect"] is None else f"{entry['effect']:+.2f}",
                 "-" if low is None else f"[{low:+.2f}, {high:+.2f}]", f"{entry['change']:+.3f}",
                 *("-" if entry[k] is None else f"{entry[k]:+.2f}" for k in ("eap", "eap_ig")), when]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if rows:
        head = "".join(f"<th>{_e(c)}</th>" for c in ("#", "edge", "kind", "effect", "95% interval", "change (nats)",
                                                       "EAP", "EAP-IG", "appeared (tokens)"))
        parts.append(f'<p>The order the circuit\'s edges appeared in:</p><div class="wide"><table><tr>{head}</tr>'
                     f'{"".join(rows)}</table></div>')
    return "\n".join(parts)


def _node_positions(
    circuit: TrialCircuit, snapshot: SnapshotCircuit
) -> tuple[dict[str, tuple[float, float]], int, int]:
    """x, y of every node: the embedding left, one column a layer (heads, then its MLP), the logits right."""
    names = {name for edge in snapshot.edges for name in edge.split(" -> ")}
    heads = sorted({n.rsplit(".", 1)[0] if n.count(".") == 2 else n for n in names if n[0].isdigit()},
                   key=lambda n: tuple(int(p) for p in n.split(".")))
    layers = max((int(n.split(".")[0]) for n in heads), default=-1) + 1
    per_layer = max((int(n.split(".")[1]) for n in heads), default=-1) + 1
    mlps = sum(1 for n in names if n.startswith("mlp")) > 0
    rows = per_layer + (1 if mlps else 0)
    height = 50 + 56 * rows
    positions = {"embed": (50.0, height / 2), "logits": (110.0 + 170 * layers, height / 2)}
    for name in heads:
        layer, head = (int(p) for p in name.split("."))
        positions[name] = (160.0 + 170 * layer, 40.0 + 56 * head)
    for layer in range(layers):
        positions[f"mlp{layer}"] = (160.0 + 170 * layer, 40.0 + 56 * per_layer)
    return positions, int(positions["logits"][0] + 60), int(height)


def _circuit_svg(snapshot: SnapshotCircuit, title: str, circuit: TrialCircuit) -> str:
    """The circuit at one snapshot: nodes by layer, its edges drawn with width = effect."""
    positions, width, height = _node_positions(circuit, snapshot)
    effects = {e: snapshot.edges[e]["effect"] or 0.0 for e in snapshot.circuit}
    strongest = max(effects.values(), default=1.0) or 1.0
    edges = []
    for edge in sorted(snapshot.circuit, key=lambda e: effects[e]):  # the strongest drawn last, on top
        sender, receiver = edge.split(" -> ")
        kind = (
            receiver.rsplit(".", 1)[1]
            if receiver.count(".") == 2
            else "mlp"
            if receiver.startswith("mlp")
            else "logits"
        )
        target = receiver.rsplit(".", 1)[0] if kind in "qkv" else receiver
        x1, y1 = positions[sender]
        x2, y2 = positions[target]
        y2 += {"q": -8, "k": 0, "v": 8}.get(kind, 0)
        x1, x2 = x1 + 16, x2 - 16
        middle = (x1 + x2) / 2
        share = max(effects[edge], 0.0) / strongest
        edges.append(f'<path d="M {x1:.0f} {y1:.0f} C {middle:.0f} {y1:.0f}, {middle:.0f} {y2:.0f}, {x2:.0f} {y2:.0f}" '
                     f'fill="none" stroke="{EDGE_COLORS[kind]}" stroke-width="{1 + 7 * share:.1f}" '
                     f'stroke-opacity="{0.35 + 0.6 * share:.2f}"><title>{_e(edge)}: effect {effects[edge]:+.2f}</title>'
                     "</path>")
    used = {n for e in snapshot.circuit for n in e.split(" -> ")}
    used |= {n.rsplit(".", 1)[0] for n in used if n.count(".") == 2}
    nodes = []
    for name, (x, y) in positions.items():
        if name.startswith("mlp") and not any(e.startswith(name) or e.endswith(name) for e in snapshot.edges):
            continue
        faded = "" if name in used else ' opacity="0.35"'
        if name in ("embed", "logits"):
            nodes.append(f'<rect x="{x - 30}" y="{y - 13}" width="60" height="26" rx="5" fill="#eee" stroke="#555"'
                         f'{faded}></rect><text x="{x}" y="{y + 4}" font-size="11" text-anchor="middle">{name}</text>')
        else:
            nodes.append(f'<circle cx="{x}" cy="{y}" r="15" fill="#f6f6f6" stroke="#555"{faded}></circle>'
                         f'<text x="{x}" y="{y + 4}" font-size="10" text-anchor="middle"{faded}>{_e(name)}</text>')
    faithful = "-" if snapshot.faithfulness is None else f"{snapshot.faithfulness:.2f}"
    caption = (f"<p><b>{_e(title)}</b>: {snapshot.tokens_seen:,} tokens, {len(snapshot.circuit)} of "
               f"{len(snapshot.edges)} edges, faithfulness {faithful}</p>") if snapshot.circuit else (
        f"<p><b>{_e(title)}</b>: {snapshot.tokens_seen:,} tokens, no circuit (the model does not do the task)</p>")
    return (f'{caption}<svg width="{width}" height="{height}" role="img" aria-label="circuit graph">'
            f'{"".join(edges)}{"".join(nodes)}</svg>')


def _circuit_effects_figure(circuit: TrialCircuit, formed: Any, boundaries: list[int]) -> bytes:
    """The effect of each of the final circuit's edges at every snapshot, beside formed_at and the LLC stages."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.2), dpi=80, layout="constrained")
    axes = figure.add_subplot()
    last = circuit.last
    shown = sorted(last.circuit, key=lambda e: -(last.edges[e]["effect"] or 0))[:CURVES]
    snapshots = [s for s in circuit.snapshots if s.tokens_seen > 0]
    tokens = [s.tokens_seen for s in snapshots]
    for index, edge in enumerate(shown):
        values = [s.edges.get(edge, {}).get("effect") for s in snapshots]
        axes.plot(tokens, [math.nan if v is None else v for v in values], color=f"C{index % 10}", marker=".",
                  linewidth=1.3, label=edge)
    axes.axhline(circuit.settings.edge_threshold, color="#888", linewidth=0.8, linestyle=":")
    for boundary in boundaries:
        axes.axvline(boundary, color="#999", linestyle="--", linewidth=0.9)
    if isinstance(formed, (int, float)) and formed > 0:
        axes.axvline(formed, color="black", linewidth=1.2)
        axes.annotate("induction formed", (formed, 1), xycoords=("data", "axes fraction"), fontsize=8,
                      xytext=(3, -12), textcoords="offset points")
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(token_formatter())
    axes.xaxis.set_minor_formatter(token_formatter())
    axes.set_xlabel("training tokens (log); dashed: LLC stage ends, dotted: the edge threshold", fontsize=9)
    axes.set_ylabel("effect (fraction of the difference)", fontsize=9)
    axes.set_title(f"effects of the circuit's edges over training ({min(CURVES, len(last.circuit))} of "
                   f"{len(last.circuit)})", fontsize=10)
    axes.tick_params(labelsize=8)
    figure.legend(loc="outside right center", fontsize=8, frameon=False)
    return png(figure)

