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
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

from model.edges import ROBUST_SPREAD
from model.metrics import current_labels
from model.roles import role_edge

from .atlas import GRID_SCORES, Atlas, build_atlas
from .circuits import SnapshotCircuit, TrialCircuit, tasks_in, trial_circuits
from .effects import atlas_effects, effects_figure
from .figures import png, token_formatter
from .names import display_state, metric_mode
from .records import Experiment, TrialRecord
from .results import best_trials, status_counts, trial_history
from .space import IDENTITY_KEYS, SHAPE_KEYS
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
    # every task the table holds, the atlas's first (induction where there is one)
    tasks = sorted(tasks_in(table), key=lambda task: task != atlas.circuit_task)
    by_task = {task: trial_circuits(experiment, table, task) for task in tasks}
    circuits = by_task.get(atlas.circuit_task, {})
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
                _trial_section(experiment, trial, metric, heads[trial.trial_id], scale, circuits.get(trial.trial_id))
                + Markup("").join(_circuit_section(by_task[task].get(trial.trial_id), trial, task,
                                                   boundaries.get(trial.trial_id, [])) for task in tasks),
            )
            for rank, trial in enumerate(leaders, 1)
        ),
    ]
    return _render("report.html", name=experiment.name, storage=experiment.storage.uri, metric=metric, mode=mode,
                   trials=len(experiment.trials), counts=counts, created=experiment.record.get("created", ""),
                   sections=[{"anchor": anchor, "title": title, "html": html} for anchor, title, html in sections])


TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("sweep", "templates"), autoescape=True,
                               trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
TEMPLATES.filters["fixed"] = lambda value, digits=2: _fixed(value, digits)
# a token in quotes, its whitespace visible; never re-escaped (a partial UTF-8 byte already reads `\xae`)
TEMPLATES.filters["token"] = lambda text: "'" + str(text).replace("\n", "\\n").replace("\t", "\\t") + "'"
TEMPLATES.filters["reading"] = lambda value, time: (
    "-" if value is None else f"{value / 1e6:.3g}M" if time and abs(value) >= 1e5
    else f"{value:,.0f}" if time else f"{value:.4g}")  # tokens as whole numbers, never 2.15e+04
EFFECT_READINGS = ("formed_at", "does_task_from", "faithfulness", "test_loss")
"""The readings the report's effects section shows (`sweep effects --reading` has them all)."""


def _effects_section(atlas: Atlas, fixed: dict[str, Any]) -> Markup | None:
    """What changes the circuit: each reading per axis value over seeds, with intervals, and each grid point's
    replicates matched by role; None where there is neither an axis nor a replicate."""
    found = atlas_effects(atlas, fixed, EFFECT_READINGS)
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
    return _render("effects.html", documents=documents, points=points,
                   replicates=(formed or documents[0])["replicates"], note=(formed or documents[0])["note"])


def _reported(experiment: Experiment, metric: str) -> bool:
    return any(isinstance(t.metrics.get(metric), (int, float)) for t in experiment.trials)


def _fixed(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None or value == "" else str(value)


def _b64(png_bytes: bytes) -> str:
    """An image for the templates' `image` macro (data: URL payload)."""
    return base64.b64encode(png_bytes).decode()


def _render(template: str, **values: Any) -> Markup:
    return Markup(TEMPLATES.get_template(template).render(**values))


# ---------------------------------------------------------------- what grew where


def _grid_section(atlas: Atlas) -> Markup:
    axes = [{"axis": axis, "score": atlas.strongest(axis)[0], "spread": atlas.strongest(axis)[1],
             "noise": atlas.noise(axis)} for axis in atlas.axes]
    left_out = [s for s in GRID_SCORES if s not in _informative_scores(atlas)]
    return _render("grid.html", axes=axes, figure=_b64(_grid_figure(atlas)) if atlas.axes else None, left_out=left_out,
                   uninformative=UNINFORMATIVE_SPREAD,
                   group_columns=GROUP_COLUMNS, group_rows=_group_rows(atlas), circuit_task=atlas.circuit_task,
                   circuit_columns=CIRCUIT_GROUP_COLUMNS, circuit_rows=_circuit_group_rows(atlas),
                   atlas_columns=_atlas_columns(atlas), atlas_rows=_atlas_rows(atlas), trials=len(atlas.rows),
                   with_circuit=sum(row.circuit is not None for row in atlas.rows),
                   caption=formed_at_caption(atlas.formed_at_resolution))


UNINFORMATIVE_SPREAD = 0.02
"""A head score whose max is within this of one value in every trial draws a panel that says nothing."""


def _informative_scores(atlas: Atlas) -> list[str]:
    """The grid's head scores that differ between trials (copying is ~1.00 for every trial of the repeat task);
    at least one is kept."""
    def spread(score: str) -> float:
        values = [row.values.get(f"{score}_max") for row in atlas.rows]
        values = [v for v in values if v is not None]
        return max(values) - min(values) if values else 0.0

    return [s for s in GRID_SCORES if spread(s) > UNINFORMATIVE_SPREAD] or list(GRID_SCORES[:1])


def _grid_figure(atlas: Atlas) -> bytes:
    """Small multiples: one panel per head score, over the two strongest axes (a heatmap) or the strongest one
    (bars)."""
    from matplotlib.figure import Figure

    shown = _informative_scores(atlas)
    figure = Figure(figsize=(3.3 * len(shown), 3.2), dpi=80, layout="constrained")
    if len(atlas.axes) >= 2:
        first, second = atlas.axes[:2]
        entries = atlas.pairs[f"{first} x {second}"]
        rows = sorted({json.dumps(e[first]) for e in entries}, key=_order)
        columns = sorted({json.dumps(e[second]) for e in entries}, key=_order)
        for index, score in enumerate(shown):
            axes = figure.add_subplot(1, len(shown), index + 1)
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
        for index, score in enumerate(shown):
            axes = figure.add_subplot(1, len(shown), index + 1)
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


GROUP_COLUMNS = ("axis", "value", "trials", *(f"{s} mean / max" for s in GRID_SCORES), "induction heads", "test_loss")
CIRCUIT_GROUP_COLUMNS = ("axis", "value", "circuits", "edges (mean)", "faithfulness", "edge kind", "in circuits",
                         "edges of the kind", "first appeared (median)", "never")


def _group_rows(atlas: Atlas) -> list[list[str]]:
    rows = []
    for axis in atlas.axes:
        for entry in atlas.groups[axis]:
            cells = [axis, str(entry["value"]), str(entry["trials"])]
            for score in GRID_SCORES:
                value = entry[f"{score}_max"]
                cells.append(f"{value['mean']:.2f} / {value['max']:.2f}" if value["mean"] is not None else "-")
            cells.append(f"{entry['induction_heads']['mean']:.1f}")
            loss = entry["test_loss"]["mean"]
            cells.append(f"{loss:.3f}" if loss is not None else "-")
            rows.append(cells)
    return rows


def _circuit_group_rows(atlas: Atlas) -> list[list[str]]:
    """For every axis value, the edge kinds of its trials' causal circuits: how many circuits hold each kind and
    when it appeared (the first edge of the kind to pass the edge threshold, median tokens, censored)."""
    rows = []
    for axis in atlas.axes:
        for entry in atlas.groups[axis]:
            group = entry["circuit"]
            if group is None:
                continue
            kinds = list(group["kinds"].items()) or [("none", None)]
            for index, (kind, values) in enumerate(kinds):
                first = [axis, str(entry["value"]), f"{group['with_circuit']}/{group['trials']}",
                         f"{group['edges']:.1f}", _number(group["faithfulness"])] if index == 0 else [""] * 5
                cells = [kind, f"{values['trials']}/{group['trials']}", f"{values['edges']:.1f}",
                         _number(None if values["first_tokens"] is None else round(values["first_tokens"])),
                         f"{values['never']} of {values['of']}"] if values else [kind, "-", "-", "-", "-"]
                rows.append(first + cells)
    return rows


ATLAS_LABELS = ("induction", "previous_token", "matters")


def _atlas_columns(atlas: Atlas) -> list[str]:
    staged = any(row.stages is not None for row in atlas.rows)
    return ["trial", *atlas.columns, "induction formed at", *(("stages",) if staged else ()), "status", "test_loss",
            "icl_score", *(f"{s} max" for s in GRID_SCORES), *(f"{label} heads" for label in ATLAS_LABELS)]


def _atlas_rows(atlas: Atlas) -> list[list[str]]:
    staged = any(row.stages is not None for row in atlas.rows)
    return [[row.trial_id, *(str(row.config.get(a)) for a in atlas.columns), _number(row.induction_formed_at),
             *((_number(row.stages),) if staged else ()), display_state(row.status), _number(row.values["test_loss"]),
             _number(row.values["icl_score"]), *(_number(row.values[f"{s}_max"]) for s in GRID_SCORES),
             *(str(row.label_counts[label]) for label in ATLAS_LABELS)]
            for row in atlas.rows]


# ---------------------------------------------------------------- dynamics


def _dynamics_section(experiment: Experiment, histories: dict[str, list[dict]]) -> Markup:
    if not any(histories.values()):
        return _render("dynamics.html", figure=None)
    resolution = ("at every snapshot" if experiment.formed_at_resolution == "snapshots"
                  else "at every iteration, or snapshot where the trial has them")
    return _render("dynamics.html", figure=_b64(_dynamics_figure(experiment, histories)), resolution=resolution,
                   caption=formed_at_caption(experiment.formed_at_resolution))


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
    keys = [k for k in (*IDENTITY_KEYS, "tokenizer")
            if len({json.dumps(t.config.get(k), default=str) for t in trials}) > 1]
    return {t.trial_id: " ".join([t.trial_id, *(f"{k}={t.config.get(k)}" for k in keys)]) for t in trials}


# ---------------------------------------------------------------- developmental stages

STAGE_TRIALS = 10  # curves drawn; more are unreadable on one panel (`sweep stages` lists them all)


def _stages_section(experiment: Experiment, documents: list[dict[str, Any]]) -> Markup | None:
    """The LLC curve of every trial with its stage boundaries and circuits, and its essential-dynamics
    trajectory; None where `sweep analyse --what llc` never ran."""
    if not documents:
        return None
    shown = documents[:STAGE_TRIALS]
    by_id = {t.trial_id: t for t in experiment.trials}
    return _render("stages.html", figure=_b64(_stages_figure(shown, by_id)), shown=len(shown), total=len(documents))


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
            # each trial's own PCA: its axes are its own, so each is scaled to its extent, never read against another's
            xs, ys = [p["pc"][0] for p in trajectory], [p["pc"][1] for p in trajectory]
            x_extent, y_extent = max(map(abs, xs)) or 1.0, max(map(abs, ys)) or 1.0
            xs, ys = [x / x_extent for x in xs], [y / y_extent for y in ys]
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
    ed_axes.set_xlabel("the trial's own PC 1 (scaled to its extent)", fontsize=9)
    ed_axes.set_ylabel("its own PC 2 (scaled)", fontsize=9)
    ed_axes.set_title("essential dynamics: each trial's PCA, not one basis", fontsize=10)
    for axes in (llc_axes, ed_axes):
        axes.tick_params(labelsize=8)
    figure.legend(loc="outside lower center", ncols=min(4, len(documents)), fontsize=8, frameon=False)
    return png(figure)


def _trial_label(trial: TrialRecord) -> str:
    varying = " ".join(f"{k}={trial.config[k]}" for k in IDENTITY_KEYS if k in trial.config)
    return f"{trial.trial_id} {varying}"


# ---------------------------------------------------------------- leaderboard


def _leaderboard(experiment: Experiment, ranked: list[TrialRecord], metric: str) -> Markup:
    unranked = [t for t in experiment.trials if t not in ranked]
    metrics = [metric, *(m for m in LEADERBOARD_METRICS if m != metric)]
    rows = []
    for rank, trial in enumerate([*ranked, *unranked], 1):
        place = rank if trial in ranked else "-"
        rows.append([f"{place}\u00a0{trial.trial_id}", trial.status_text, str(trial.iterations),
                     *(_number(trial.metrics.get(m, "")) for m in metrics),
                     *(str(trial.config.get(k, "")) for k in VARYING), trial.error or ""])
    columns = ("# trial", "status", "iterations", *metrics, *VARYING, "error")
    return TEMPLATES.get_template("macros.html").module.table(columns, rows)


# ---------------------------------------------------------------- top trials


def _heads_of(experiment: Experiment, trial: TrialRecord) -> dict[str, Any] | None:
    """heads.json of the trial's latest checkpoint (None without one)."""
    if trial.checkpoint is None:
        return None
    return current_labels(json.loads(read_text(experiment.storage, f"{trial.checkpoint}/heads.json")))


def _trial_section(experiment: Experiment, trial: TrialRecord, metric: str, heads: dict[str, Any] | None,
                   scale: tuple[float, float] | None, circuit: TrialCircuit | None = None) -> Markup:
    storage = experiment.storage
    values: dict[str, Any] = {"metric": metric, "value": _number(trial.metrics.get(metric)), "trial_id": trial.trial_id,
                              "config": [(k, trial.config[k]) for k in VARYING if k in trial.config]}
    checkpoint = trial.checkpoint
    if checkpoint is None:
        return _render("trial.html", checkpoint=None, **values)
    files = trial.files[checkpoint.rsplit("/", 1)[1]]
    ablation = (_b64(_ablation_figure(heads, scale)) if any("ablation" in h for h in heads["heads"]) else None)
    composition = (_composition_svg(heads, circuit) if len({h["layer"] for h in heads["heads"]}) > 1 else None)
    tokens = (_render("tokens.html", document=json.loads(read_text(storage, f"{checkpoint}/circuits.json")))
              if "circuits.json" in files else None)
    viewer = (_viewer(json.loads(read_text(storage, f"{checkpoint}/heatmaps/patterns.json")), heads)
              if "heatmaps/patterns.json" in files else None)
    heatmaps = []
    grids = sorted(p for p in files if p.startswith("heatmaps/layer") and "_head" not in p and p.endswith(".png"))
    for name in grids:
        with storage.filesystem.open_input_stream(f"{checkpoint}/{name}") as stream:
            heatmaps.append((name, _b64(stream.read())))
    if not grids and "heatmaps/patterns.json" in files:  # a checkpoint between heatmap renders: drawn from its patterns
        from model.analysis import png_heatmaps

        document = json.loads(read_text(storage, f"{checkpoint}/heatmaps/patterns.json"))
        heatmaps = [(f"heatmaps/{name}", _b64(image)) for name, image in sorted(png_heatmaps(document,
                                                                                            per_head=False).items())]
    return _render("trial.html", checkpoint=storage.uri_of(checkpoint), heads=_heads_table(heads), ablation=ablation,
                   composition=composition, tokens=tokens,
                   sample=read_text(storage, f"{checkpoint}/sample.txt").strip(), viewer=viewer, heatmaps=heatmaps,
                   **values)


def _heads_table(document: dict[str, Any]) -> dict[str, Any]:
    """The head atlas: the head and its labels first (what a reader looks for, visible without scrolling), then its
    scores and ablation."""
    if not document["heads"]:
        return {"columns": [], "rows": []}
    names = list(document["heads"][0]["scores"])
    ablated = any("ablation" in h for h in document["heads"])
    extra = ["ablate: held-out", "ablate: repeated"] if ablated else []
    rows = []
    for entry in document["heads"]:
        cells = [f"{entry['scores'][n]:.2f}" for n in names]
        if ablated:
            cells += [f"{entry['ablation'][k]:+.3f}" if "ablation" in entry else "-" for k in ("held_out", "repeated")]
        rows.append({"name": f"{entry['layer']}.{entry['head']}", "labels": entry["labels"], "cells": cells})
    return {"columns": ["head", "labels", *(n.replace("_", " ") for n in names), *extra], "rows": rows}


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


def _composition_svg(document: dict[str, Any], circuit: TrialCircuit | None = None) -> Markup:
    """Earlier-layer heads -> later-layer heads: the paths whose composition score stands above its null (the same
    heads' scores in the order they cannot compose, model.analysis.composition_null), width = the excess over the
    null's mean, on one scale for Q (blue), K (red) and V (green). Where the trial has a causal circuit, the
    strongest paths that no causal edge carries are named as such: the causal circuit leads."""
    from model.analysis import COMPOSITION_SIGMAS, composition_excess

    layers = sorted({h["layer"] for h in document["heads"]})
    heads = max(h["head"] for h in document["heads"]) + 1
    null = document.get("composition_null")
    against = "the same heads in the order they cannot compose (later-layer outputs into earlier-layer inputs)"
    if null is None:  # a heads.json written before the null existed
        null, against = document.get("composition_baseline"), "random matrices of the same shapes"
    if null is None:
        return _render("composition.html", null_found=False)
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
    lines = []
    for excess, kind, l1, h1, l2, h2, value in sorted(paths):  # the strongest drawn last, on top
        offset = {"q": -4, "k": 0, "v": 4}[kind]
        share = excess / max(strongest, 1e-9)
        lines.append({"x1": x[l1] + 14, "y1": y[h1] + offset, "x2": x[l2] - 14, "y2": y[h2] + offset,
                      "color": colors[kind], "width": 1 + 8 * share, "opacity": 0.15 + 0.75 * share,
                      "title": f"{kind.upper()}-composition {l1}.{h1} -> {l2}.{h2}: {value:.3f} (null "
                               f"{null[kind]['mean']:.3f} \u00b1 {null[kind]['std']:.3f}; excess {excess:+.3f})"})
    labels = {(h["layer"], h["head"]): h["labels"] for h in document["heads"]}
    nodes = []
    for layer in layers:
        for head in range(heads):
            tags = labels.get((layer, head), [])
            fill = "#ffd27f" if "induction" in tags else "#a6d0ff" if "previous_token" in tags else "#eee"
            nodes.append({"x": x[layer], "y": y[head], "fill": fill, "name": f"{layer}.{head}",
                          "tags": ", ".join(tags) or "no label"})
    top = sorted(paths, reverse=True)[:3]
    listed = "; ".join(f"{kind.upper()} {l1}.{h1}\u2192{l2}.{h2} {value:.3f} (+{excess:.3f})"
                       for excess, kind, l1, h1, l2, h2, value in top) or "none"
    carried = set(circuit.last.circuit) if circuit is not None and circuit.last.circuit else None
    uncarried = "" if carried is None else "; ".join(
        f"{kind.upper()} {l1}.{h1}\u2192{l2}.{h2}" for _, kind, l1, h1, l2, h2, _ in top
        if f"{l1}.{h1} -> {l2}.{h2}.{kind}" not in carried)
    null_line = ", ".join(f"{kind.upper()} {b['mean']:.3f} \u00b1 {b['std']:.3f}" for kind, b in null.items())
    return _render("composition.html", null_found=True, width=120 + 150 * (len(layers) - 1), height=40 + 34 * heads,
                   lines=lines, nodes=nodes, sigmas=f"{COMPOSITION_SIGMAS:g}", against=against, null_line=null_line,
                   strongest=listed, uncarried=uncarried)


def _viewer(patterns: dict[str, Any], heads: dict[str, Any]) -> dict[str, Any]:
    """The attention viewer's head choices and data (the page's script draws it)."""
    options = [{"value": f"{h['layer']}.{h['head']}",
                "text": f"head {h['layer']}.{h['head']}" + (f" ({', '.join(h['labels'])})" if h["labels"] else "")}
               for h in heads["heads"]]
    return {"options": options, "data": {"tokens": patterns["tokens"], "patterns": patterns["patterns"],
                                         "predictions": patterns.get("predictions")}}


# ---------------------------------------------------------------- causal circuits

EDGE_COLORS = {"q": "#4477aa", "k": "#ee6677", "v": "#228833", "logits": "#555555", "mlp": "#aa7733"}
CURVES = 10  # edges drawn over training; more are unreadable on one panel (`sweep circuit` lists them all)


def _circuit_section(circuit: TrialCircuit | None, trial: TrialRecord, task: str | None,
                     boundaries: list[int]) -> Markup | str:
    """The trial's causal circuit: its graph at the last snapshot and where induction heads formed, its edges'
    effects over training beside formed_at and the LLC stages, and the order its edges appeared (by head and by
    role)."""
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
    roles = circuit.roles()
    order = []
    for edge in circuit.order():
        entry = circuit.edge_document(edge, last)
        appeared = entry["appeared"]
        when = "-" if not appeared else (f"{appeared['after_tokens']:,} - {appeared['tokens_seen']:,}"
                                         if appeared["after_tokens"] is not None else f"by {appeared['tokens_seen']:,}")
        low, high = entry["interval"]
        order.append({"edge": edge, "role_edge": role_edge(edge, roles), "cells": [
            entry["kind"], "-" if entry["effect"] is None else f"{entry['effect']:+.2f}",
            "-" if low is None else f"[{low:+.2f}, {high:+.2f}]", f"{entry['change']:+.3f}",
            *("-" if entry[k] is None else f"{entry[k]:+.2f}" for k in ("eap", "eap_ig")), when]})
    effects = (_b64(_circuit_effects_figure(circuit, formed, boundaries))
               if len(circuit.snapshots) > 1 and last.circuit else None)
    return _render("circuit.html", task=task, settings=circuit.settings, summary=last.document(),
                   has_circuit=bool(last.circuit), robust_spread=ROBUST_SPREAD, roles=roles,
                   graphs=[_circuit_svg(snapshot, title, circuit) for snapshot, title in graphs],
                   effects_figure=effects, trial_id=trial.trial_id, order=order)


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


def _circuit_svg(snapshot: SnapshotCircuit, title: str, circuit: TrialCircuit) -> dict[str, Any]:
    """The circuit at one snapshot, for the template's `graph`: nodes by layer, its edges with width = effect."""
    positions, width, height = _node_positions(circuit, snapshot)
    effects = {e: snapshot.edges[e]["effect"] or 0.0 for e in snapshot.circuit}
    strongest = max(effects.values(), default=1.0) or 1.0
    paths = []
    for edge in sorted(snapshot.circuit, key=lambda e: effects[e]):  # the strongest drawn last, on top
        sender, receiver = edge.split(" -> ")
        kind = (receiver.rsplit(".", 1)[1] if receiver.count(".") == 2
                else "mlp" if receiver.startswith("mlp") else "logits")
        target = receiver.rsplit(".", 1)[0] if kind in "qkv" else receiver
        x1, y1 = positions[sender]
        x2, y2 = positions[target]
        y2 += {"q": -8, "k": 0, "v": 8}.get(kind, 0)
        x1, x2 = x1 + 16, x2 - 16
        middle = (x1 + x2) / 2
        share = max(effects[edge], 0.0) / strongest
        paths.append({"d": f"M {x1:.0f} {y1:.0f} C {middle:.0f} {y1:.0f}, {middle:.0f} {y2:.0f}, {x2:.0f} {y2:.0f}",
                      "color": EDGE_COLORS[kind], "width": 1 + 7 * share, "opacity": 0.35 + 0.6 * share,
                      "edge": edge, "effect": effects[edge]})
    used = {n for e in snapshot.circuit for n in e.split(" -> ")}
    used |= {n.rsplit(".", 1)[0] for n in used if n.count(".") == 2}
    nodes = [{"name": name, "x": x, "y": y, "box": name in ("embed", "logits"), "faded": name not in used}
             for name, (x, y) in positions.items()
             if not name.startswith("mlp") or any(e.startswith(name) or e.endswith(name) for e in snapshot.edges)]
    return {"title": title, "tokens": snapshot.tokens_seen, "circuit_edges": len(snapshot.circuit),
            "edges": len(snapshot.edges), "width": width, "height": height, "paths": paths, "nodes": nodes,
            "faithfulness": "-" if snapshot.faithfulness is None else f"{snapshot.faithfulness:.2f}"}


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

