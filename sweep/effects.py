"""What changes a circuit: every reading of the atlas summarised over each grid point's replicates (seeds), and the
grid's effect on it with intervals (`sweep effects`, `sweep atlas --json`, the report).

The statistics are model.replicates' (medians, Kaplan-Meier for times that may never come, bootstraps over seeds);
this module maps them over an experiment's atlas: one Observation a trial per reading, grid points named by their
axis values. Heads are matched across replicates by their role in the causal circuit (model.roles), so a grid
point's circuits compare by role-edges, not by head indices that each seed assigns anew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from model.config import ConfigError
from model.replicates import (
    MIN_REPLICATES,
    ONE_REPLICATE,
    Observation,
    axis_effects,
    formed_by,
    jaccard_mean,
    summarise,
)

from .atlas import REPLICATE_AXIS, Atlas, AtlasRow


@dataclass(frozen=True)
class Reading:
    """A per-trial value the grid may change."""

    name: str
    description: str
    time: bool
    """Tokens at which something happened: censored at the trial's last tokens where it never did."""
    read: Callable[[AtlasRow], float | None]
    source: str = "training"
    """training, circuit or stages: a trial whose circuit or LLC was never computed has no value, not a censored
    one."""

    def measured(self, row: AtlasRow) -> bool:
        return {"circuit": row.circuit is not None, "stages": row.stages is not None}.get(self.source, True)


def _circuit(name: str) -> Callable[[AtlasRow], Any]:
    return lambda row: (row.circuit or {}).get(name)


READINGS = {reading.name: reading for reading in (
    Reading("formed_at", "tokens at which induction heads formed (the atlas's induction_formed_at)", True,
            lambda row: row.induction_formed_at),
    Reading("prev_token_formed_at", "tokens at which previous-token heads formed", True,
            lambda row: row.prev_token_formed_at),
    Reading("does_task_from", "tokens from which the model does the circuit's task at every later snapshot", True,
            _circuit("does_task_from"), "circuit"),
    Reading("test_loss", "final held-out loss (nats per token)", False, lambda row: row.values.get("test_loss")),
    Reading("faithfulness", "faithfulness of the last snapshot's circuit", False, _circuit("faithfulness"), "circuit"),
    Reading("circuit_edges", "edges in the last snapshot's circuit", False, _circuit("edges"), "circuit"),
    Reading("first_stage_end", "tokens at which the first developmental stage (LLC) ended", True,
            lambda row: row.stage_boundaries[0] if row.stage_boundaries else None, "stages"),
)}
ROLE_EDGE_PREFIX = "appeared:"
"""`appeared:previous_token -> induction.k`: tokens at which a role-edge first appeared in the trial's circuit."""
# Aoyama et al. 2025: induction heads form after about 10^5.7 sqrt(B C) tokens (B batch size, C context length).
AOYAMA_SCALE = 10 ** 5.7


def reading_of(name: str, atlas: Atlas) -> Reading:
    """The reading `name` names; ConfigError listing the readings (and this atlas's role-edges) otherwise. A role-edge
    no trial's circuit holds is refused too: it is far more often a misspelling than a finding."""
    if name in READINGS:
        return READINGS[name]
    held = sorted({edge for row in atlas.rows for edge in ((row.circuit or {}).get("role_appeared") or {})})
    if name.startswith(ROLE_EDGE_PREFIX):
        edge = " -> ".join(part.strip() for part in name.removeprefix(ROLE_EDGE_PREFIX).split("->"))
        if edge not in held:
            raise ConfigError(f"--reading {name!r}: no trial's circuit holds the role-edge {edge!r}; " + (
                f"role-edges here: {', '.join(held)}" if held
                else f"no trial has a causal circuit yet (`sweep circuit {atlas.experiment}` finds them)"))
        return Reading(f"{ROLE_EDGE_PREFIX}{edge}", f"tokens at which the role-edge {edge} first appeared", True,
                       lambda row: _role_appeared(row, edge), "circuit")
    known = [f"{ROLE_EDGE_PREFIX}{edge}" for edge in held] or [f"{ROLE_EDGE_PREFIX}ROLE-EDGE"]
    raise ConfigError(f"--reading {name!r} is unknown; readings: {', '.join([*READINGS, *known[:6]])}"
                      + (" ..." if len(known) > 6 else ""))


def _role_appeared(row: AtlasRow, edge: str) -> float | None:
    return (row.circuit.get("role_appeared") or {}).get(edge) if row.circuit else None


def grid_point(row: AtlasRow, axes: list[str]) -> tuple[tuple[str, Any], ...]:
    """The trial's grid point: its value of every axis but the seed."""
    return tuple((axis, row.config.get(axis)) for axis in axes if axis != REPLICATE_AXIS)


def observation(row: AtlasRow, reading: Reading, axes: list[str]) -> Observation:
    """A trial's reading; a time that never came is censored at the trial's last tokens."""
    value = reading.read(row)
    value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    censored = reading.time and value is None and reading.measured(row) and row.last_tokens
    end = float(row.last_tokens) if censored else None
    return Observation(grid_point(row, axes), value, end)


def replicate_points(atlas: Atlas, reading: Reading) -> list[dict[str, Any]]:
    """One entry a grid point: its trials and seeds, the reading's summary over them, "formed by" (Kaplan-Meier)
    for a time reading, and how alike the replicates' circuits are by role (and, for contrast, by head index)."""
    groups: dict[tuple, list[AtlasRow]] = {}
    for row in atlas.rows:
        groups.setdefault(grid_point(row, atlas.axes), []).append(row)
    entries = []
    for point, rows in groups.items():
        observations = [observation(row, reading, atlas.axes) for row in rows]
        circuits = [row.circuit for row in rows if row.circuit and row.circuit.get("circuit")]
        role_sets = [set(c["role_edges"]) for c in circuits]
        held = sorted({edge for edges in role_sets for edge in edges})
        entries.append({
            "point": dict(point), "trials": [row.trial_id for row in rows],
            "seeds": [row.config.get(REPLICATE_AXIS) for row in rows],
            "last_tokens": max((row.last_tokens or 0 for row in rows), default=None),
            "summary": summarise(observations, reading.time).document(),
            "formed_by": formed_by(observations) if reading.time else None,
            "circuits": len(circuits),
            "role_edges": {edge: sum(edge in edges for edges in role_sets) / len(role_sets) for edge in held},
            "role_overlap": jaccard_mean(role_sets),
            "head_overlap": jaccard_mean([set(c["circuit"]) for c in circuits]),
        })
    return entries


def aoyama_reference(points: list[dict[str, Any]], fixed: dict[str, Any]) -> dict[str, Any] | None:
    """Formation against sqrt(batch x context), where the reading is formed_at: the one-parameter fit
    formed_at = a sqrt(B C) to the grid points' medians (least squares in logs), beside Aoyama et al.'s a = 10^5.7."""
    rows = []
    for entry in points:
        values = fixed | entry["point"]
        batch, context = values.get("batch_size"), values.get("seq_len")
        if batch and context:
            rows.append((math.sqrt(batch * context), entry["summary"]["estimate"], entry))
    formed = [(x, y) for x, y, _ in rows if y]
    if not formed:
        return None
    scale = math.exp(sum(math.log(y / x) for x, y in formed) / len(formed))
    return {"fit_scale": scale, "aoyama_scale": AOYAMA_SCALE,
            "points": [{"point": entry["point"], "sqrt_bc": x, "formed_at": y, "fit": scale * x,
                        "aoyama": AOYAMA_SCALE * x, "last_tokens": entry["last_tokens"]} for x, y, entry in rows]}


def effects_document(atlas: Atlas, fixed: dict[str, Any], name: str = "formed_at") -> dict[str, Any]:
    """`sweep effects --json`: the reading per axis value and the differences between values, with intervals; each
    grid point's replicates; for formed_at the sqrt(B C) reference."""
    reading = reading_of(name, atlas)
    observations = [observation(row, reading, atlas.axes) for row in atlas.rows]
    points = replicate_points(atlas, reading)
    replicates = sorted({len(p["trials"]) for p in points})
    return {
        "experiment": atlas.experiment, "reading": reading.name, "description": reading.description,
        "time": reading.time, "axes": atlas.axes, "replicates": replicates,
        "note": ONE_REPLICATE if min(replicates, default=0) < MIN_REPLICATES else None,
        "effects": [effect.document() for effect in axis_effects(observations, reading.time)],
        "points": points,
        "reference": aoyama_reference(points, fixed) if reading.name == "formed_at" else None,
    }


def effects_figure(document: dict[str, Any]) -> bytes:
    """One panel an axis (the reading per value, with its interval; open markers where half or more never formed),
    and, for formed_at over batch and context, each grid point against sqrt(B C) beside the one-parameter fit and
    Aoyama et al.'s line."""
    from matplotlib.figure import Figure

    from .figures import png, token_formatter

    effects, reference = document["effects"], document["reference"]
    panels = len(effects) + (1 if reference else 0)
    figure = Figure(figsize=(3.8 * max(1, panels), 4.4 if reference else 3.3), dpi=90, layout="constrained")
    for index, effect in enumerate(effects):
        axes = figure.add_subplot(1, panels, index + 1)
        for position, entry in enumerate(effect["values"]):
            estimate, (low, high) = entry["estimate"], entry["interval"]
            if entry.get("never"):
                axes.annotate(f"never formed: {entry['never']} of {entry['trials']}", (position, 0.02),
                              xycoords=("data", "axes fraction"), ha="center", fontsize=8, color="#aa3377")
            if estimate is None:
                continue
            below = estimate - low if low is not None else 0
            above = high - estimate if high is not None else 0
            axes.errorbar([position], [estimate], yerr=[[below], [above]], fmt="o", color="#4477aa", capsize=4)
            if high is None and entry["reason"] != ONE_REPLICATE:
                axes.annotate("upper end: past training", (position, estimate), textcoords="offset points",
                              xytext=(0, 8), ha="center", fontsize=7, color="#666666")
        axes.set_xticks(range(len(effect["values"])), [str(e["value"]) for e in effect["values"]])
        axes.set_xlim(-0.5, len(effect["values"]) - 0.5)
        axes.set_xlabel(effect["axis"])
        axes.set_ylabel(document["reading"])
        if document["time"]:
            axes.yaxis.set_major_formatter(token_formatter())
        axes.set_title(f"{document['reading']} by {effect['axis']}", fontsize=10)
    if reference:
        axes = figure.add_subplot(1, panels, panels)
        points = sorted(reference["points"], key=lambda p: p["sqrt_bc"])
        by_point = {tuple(sorted(e["point"].items())): e["summary"] for e in document["points"]}
        for point in points:
            summary = by_point[tuple(sorted(point["point"].items()))]
            label = " ".join(f"{k}={v}" for k, v in point["point"].items())
            if point["formed_at"] is None:  # half or more never formed: marked at the end of training
                axes.plot([point["sqrt_bc"]], [point["last_tokens"]], "^", color="#aa3377", markersize=8,
                          label=f"{label}: not formed by the end")
                continue
            low, high = summary["interval"]
            yerr = [[point["formed_at"] - low if low is not None else 0], [high - point["formed_at"] if high else 0]]
            axes.errorbar([point["sqrt_bc"]], [point["formed_at"]], yerr=yerr, fmt="o", capsize=4, label=label)
        xs = [p["sqrt_bc"] for p in points]
        axes.plot(xs, [p["fit"] for p in points], "-", color="#555555",
                  label=f"a sqrt(BC), a = {reference['fit_scale']:.3g} (Aoyama et al.: {AOYAMA_SCALE:.3g})")
        axes.set_xlabel("sqrt(batch x context)")
        axes.set_ylabel("formed_at")
        axes.yaxis.set_major_formatter(token_formatter())
        axes.set_title("against the sqrt(BC) law", fontsize=10)
        axes.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return png(figure)


def atlas_effects(atlas: Atlas, fixed: dict[str, Any], names: tuple[str, ...] = tuple(READINGS)
                  ) -> dict[str, dict[str, Any]]:
    """reading -> its effects document, for each of `names` (default every reading) that some trial measured
    (`sweep atlas --json` carries them all, the report the ones it shows)."""
    found = {}
    for name in names:
        reading = READINGS[name]
        if any(observation(row, reading, atlas.axes).measured for row in atlas.rows):
            found[name] = effects_document(atlas, fixed, name)
    return found
