"""How the CLI shows things: rich tables and lines for the documents the library returns, on stdout (tables) and stderr
(what happens). No command logic here: each takes a document or a record and prints it."""

from __future__ import annotations

import json
import os
import sys

import click
from rich.console import Console
from rich.table import Table

from model.config import ConfigError

from .names import STOPPED_EARLY, display_state
from .space import IDENTITY_KEYS, SHAPE_KEYS

console = Console(stderr=True, soft_wrap=True)
# Tables go to stdout; when it is a pipe or a file, give them room instead of wrapping at 80.
# COLUMNS, where set, says the width (rich reads it).
output = Console(soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)


def metrics_line(iteration: int, metrics: dict) -> str:
    return (
        f"iter {iteration:3d}  tokens {metrics['tokens_seen']:>11,}  train_loss {metrics['train_loss']:.4f}  "
        f"test_loss {metrics['test_loss']:.4f}  acc {metrics['test_accuracy']:.3f}  "
        f"{metrics['tokens_per_second']:,.0f} tok/s  induction {metrics['induction_score_max']:.2f}"
    )


def varying(config: dict) -> str:
    return " ".join(f"{k}={config[k]}" for k in IDENTITY_KEYS if k in config)


def identity_columns(configs: list[dict]) -> list[str]:
    """A table's config columns: the shape, and batch size and seed where trials differ in them (replicates)."""
    extra = [k for k in IDENTITY_KEYS if k not in SHAPE_KEYS
             and len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
    return [*SHAPE_KEYS, *extra]


def metric_cell(metrics: dict, name: str) -> str:
    """A metric for a table; a formed_at read from a head's use (not yet its pattern) says so."""
    text = metric_text(metrics.get(name))
    return f"{text} (use)" if name.endswith("_formed_at") and metrics.get(name.replace("_at", "_by")) == "use" else text


def metric_text(value) -> str:
    """Token counts (formed_at, tokens_seen) as whole numbers, everything else to 4 decimals."""
    if not isinstance(value, (int, float)):
        return "-"
    if isinstance(value, int) or (value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.4f}"


def status_text(status: str, iterations: int, planned: int | None) -> str:

    return f"stopped early at {iterations}/{planned}" if status == STOPPED_EARLY else display_state(status)


def number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def history(title: str, rows: list[dict], only_head: str | None, as_json: bool) -> None:
    if only_head is not None and only_head not in rows[0]["heads"]:
        raise ConfigError(f"--head {only_head} is not a head of {title}; heads: {', '.join(rows[0]['heads'])}")
    if only_head is not None:
        rows = [row | {"heads": {only_head: row["heads"][only_head]}} for row in rows]
    if as_json:
        click.echo(json.dumps({"source": title, "history": rows}, indent=2))
        return
    scores = list(next(iter(rows[0]["heads"].values())))
    table = Table(title=f"head history of {title}")
    for column in ("iter", "tokens_seen", "test_loss", "icl", "head", *scores):
        table.add_column(column, justify="right")
    for row in rows:
        run_columns = [
            str(row["iteration"]),
            f"{row['tokens_seen']:,}",
            number(row.get("test_loss")),
            number(row.get("icl_score")),
        ]
        for index, (head, values) in enumerate(row["heads"].items()):
            table.add_row(
                *(run_columns if index == 0 else [""] * len(run_columns)), head, *(f"{values[s]:.2f}" for s in scores)
            )
    output.print(table)


def tokens(title: str, document: dict, only_head: str | None, as_json: bool) -> None:
    names = [f"{h['layer']}.{h['head']}" for h in document["heads"]]
    chosen = [h for h, name in zip(document["heads"], names) if only_head in (None, name)]
    if not chosen:
        raise ConfigError(f"--head {only_head} is not a head of {title}; heads: {', '.join(names)}")
    if as_json:
        click.echo(json.dumps(document | {"heads": chosen}, indent=2))
        return
    output.print(
        f"token tables of {title} over its {document['frequent_tokens']} most frequent training tokens", highlight=False
    )

    def show(caption: str, rows: list[dict], arrow: str) -> None:
        table = Table(title=caption, title_justify="left")
        table.add_column("token", justify="right")
        table.add_column(arrow)
        for row in rows[:15]:
            table.add_row(repr(row["token"]), "  ".join(f"{t!r} {v:+.2f}" for t, v in row["top"]))
        output.print(table)

    if only_head is None:
        show("direct path W_E W_U: bigrams", document["direct_path"], "raises as the next token")
    for head in chosen:
        name = f"{head['layer']}.{head['head']}"
        show(f"head {name} OV: a token attended to raises", head["ov"], "raises")
        if "qk" in head:
            show(f"head {name} QK: a query token attends to", head["qk"], "keys")
        if head.get("skip_trigrams"):
            table = Table(title=f"head {name} skip-trigrams: A ... B -> C", title_justify="left")
            for column in ("A (query)", "B (key)", "C (raised)", "A->B attention", "B->C logit", "score"):
                table.add_column(column, justify="right")
            for trigram in head["skip_trigrams"][:15]:
                table.add_row(repr(trigram["a"]), repr(trigram["b"]), repr(trigram["c"]),
                              *(f"{trigram[part]:+.2f}" for part in ("qk", "ov")), f"{trigram['score']:.2f}")
            output.print(table)


def fraction(value) -> str:
    return "-" if value is None else f"{value:+.2f}"


def interval(values) -> str:
    low, high = values if values else (None, None)
    return "-" if low is None or high is None else f"[{low:+.2f}, {high:+.2f}]"


def faithfulness_line(trial: dict, target: float) -> str:
    """Faithfulness with its interval and the difference it is a fraction of, and whether the target was met."""
    faithful = trial["faithfulness"]
    faithful_with_interval = f"{faithful:.2f} {interval(trial['faithfulness_interval'])}"
    text = (f"faithfulness {faithful_with_interval} of a {trial['difference']:.3f}-nat difference "
            f"({trial['clean_metric']:.3f} clean, {trial['corrupted_metric']:.3f} corrupted)")
    if trial.get("target_reached") is False:
        text = f"{target:g} not reached: {faithful:.2f} with {len(trial['circuit'])} edges; " + text
    if faithful > 1:
        text += "; above 1: the edges left out worked against the task"
    return text


def panel_line(trial: dict, spread_limit: float) -> str:
    panel = trial.get("panel") or {}
    if not panel:
        return "robustness panel: -"
    cells = ", ".join(f"{name} {number(value, 2)}" for name, value in panel.items())
    verdict = "robust" if trial["robust"] else f"NOT ROBUST (spread above {spread_limit:g})"
    return f"robustness panel (Miller et al. 2024): {cells}; spread {number(trial['panel_spread'], 2)}: {verdict}"


def circuit(document: dict) -> None:
    (trial,) = document["trials"]
    snapshot = trial["snapshot"]
    output.print(f"{document['experiment']} trial {trial['trial_id']} ({varying(trial['config'])}): circuit on "
                 f"{document['task']} at step {snapshot['step']:,} ({snapshot['tokens_seen']:,} tokens)",
                 highlight=False)
    if not trial["circuit"]:
        difference = trial["difference"]
        bound = trial.get("null_bound")
        output.print(f"no circuit: difference {number(difference, 4)} nats ({number(trial['clean_metric'], 3)} clean, "
                     f"{number(trial['corrupted_metric'], 3)} corrupted), the null of untrained models "
                     f"{number(bound, 4)}: the model does not do the task here", highlight=False)
        return
    output.print(f"{len(trial['circuit'])} of {trial['edges_in_graph']} edges, the rest corrupted: "
                 f"{faithfulness_line(trial, document['faithfulness_target'])}", highlight=False)
    output.print(panel_line(trial, document["robust_spread"]), highlight=False)
    table = Table(title="the circuit's edges in the order they appeared")
    for column in ("#", "edge", "kind", "effect", "95% interval", "change (nats)", "EAP", "EAP-IG",
                   "appeared (tokens)"):
        table.add_column(column, justify="left" if column in ("edge", "kind") else "right", no_wrap=True)
    by_edge = {entry["edge"]: entry for entry in trial["circuit"]}
    for position, edge in enumerate(trial["order"], 1):
        entry = by_edge[edge]
        appeared = entry["appeared"]
        when = "-" if not appeared else (f"{appeared['after_tokens']:,}-{appeared['tokens_seen']:,}"
                                         if appeared["after_tokens"] is not None else f"<= {appeared['tokens_seen']:,}")
        table.add_row(str(position), edge, entry["kind"], fraction(entry["effect"]), interval(entry["interval"]),
                      f"{entry['change']:+.3f}", fraction(entry["eap"]), fraction(entry["eap_ig"]), when)
    output.print(table)
    agreement = "; ".join(
        f"{name}: " + (values["reason"] if values.get("reason") else
                       f"Spearman {number(values['spearman'], 2)}, circuit edges in its top {len(trial['circuit'])}: "
                       f"{number(values['circuit_recall'], 2)}")
        for name, values in (("EAP", trial["agreement"]["eap"]), ("EAP-IG", trial["agreement"]["eap_ig"])))
    output.print(f"estimates against exact patching over all {trial['edges_in_graph']} edges: {agreement}; EAP-IG "
                 f"completeness error {number(trial.get('eap_ig_completeness_error'), 3)}", highlight=False)
    if trial.get("other_circuit"):
        output.print(f"the other method's circuit: {len(trial['other_circuit'])} edges, overlap (Jaccard) "
                     f"{number(trial['overlap'], 2)}", highlight=False)
    output.print(f"effect: the rise in the metric when the edge alone carries its corrupted value, as a fraction of "
                 f"the difference, with its 95% bootstrap interval over sequences; appeared: between the last "
                 f"snapshot below and the first whose interval's lower end reached {document['edge_threshold']:g} and "
                 f"stayed there for {document['persist']} more", highlight=False)


def circuits(document: dict) -> None:
    table = Table(title=f"{document['experiment']}: circuits on {document['task']} at each trial's last snapshot",
                  caption=f"order: the circuit's edges by the snapshot where their interval's lower end reached "
                          f"{document['edge_threshold']:g} and stayed; difference: clean to corrupted, in nats")
    keys = identity_columns([trial["config"] for trial in document["trials"]])
    for column in ("trial", *keys, "tokens", "difference", "edges", "faithfulness", "robust", "composition",
                   "order of appearance"):
        table.add_column(column, justify="left" if column == "order of appearance" else "right")
    for trial in document["trials"]:
        composition = sum(trial["kinds"].get(kind, {}).get("edges", 0) for kind in ("head -> q", "head -> k",
                                                                                     "head -> v"))
        order = ", ".join(trial["order"]) or "no circuit"
        faithful = "-" if trial["faithfulness"] is None else (
            f"{trial['faithfulness']:.2f} {interval(trial['faithfulness_interval'])}"
            + ("" if trial.get("target_reached") is not False else " (target missed)"))
        robust = "-" if trial.get("robust") is None else ("yes" if trial["robust"] else "NO")
        table.add_row(trial["trial_id"], *(str(trial["config"].get(k, "")) for k in keys),
                      f"{trial['snapshot']['tokens_seen']:,}", number(trial["difference"], 3),
                      str(len(trial["circuit"])), faithful, robust, str(composition), order)
    output.print(table)


def circuit_groups(axis: str, entries: list[dict]) -> None:
    """One row per axis value and edge kind: how many of the group's circuits hold that kind, and when it appeared."""
    view = Table(title=f"by {axis}: the circuits' edges by kind", title_justify="left")
    for column in (axis, "trials", "with circuit", "edges (mean)", "faithful", "edge kind", "in circuits",
                   "edges of the kind (mean)", "first appeared (median tokens)", "never"):
        view.add_column(column, justify="right")
    for entry in entries:
        group = entry["circuit"]
        if group is None:
            continue
        first = [str(entry["value"]), str(group["trials"]), str(group["with_circuit"]), f"{group['edges']:.1f}",
                 number(group["faithfulness"], 2)]
        for index, (kind, values) in enumerate(group["kinds"].items() or [("-", None)]):
            cells = ([kind, f"{values['trials']}/{group['trials']}", f"{values['edges']:.1f}",
                      number(None if values["first_tokens"] is None else round(values["first_tokens"])),
                      f"{values['never']} of {values['of']}"]
                     if values else ["-"] * 5)
            view.add_row(*(first if index == 0 else [""] * len(first)), *cells)
    output.print(view)


def estimate_text(summary: dict, time: bool) -> str:
    """`3,211,264 [2.8M, 3.6M]`, an estimate with its interval; open ends past training say so."""
    def one(value) -> str:
        if value is None:
            return "-"
        return f"{value / 1e6:.3g}M" if time and abs(value) >= 1e5 else f"{value:,.0f}" if time else f"{value:.4g}"

    estimate = summary["estimate"]
    if estimate is None:
        return "not reached" if summary.get("never") else "-"
    low, high = summary["interval"]
    if low is None and high is None:
        return one(estimate)
    return f"{one(estimate)} [{one(low)}, {'past the end' if high is None else one(high)}]"


def effects(document: dict) -> None:
    """`sweep effects`: the reading per axis value, and each value's difference from the previous one, with
    intervals; then each grid point's replicates."""
    time = document["time"]
    view = Table(title=f"{document['experiment']}: {document['reading']} by axis (median over seeds, 95% bootstrap)",
                 caption=document["description"] + (f"; {document['note']}" if document["note"] else ""),
                 title_justify="left")
    for column in ("axis", "value", "trials", "never", document["reading"], "difference from previous", "effect"):
        view.add_column(column, justify="right")
    for effect in document["effects"]:
        for index, entry in enumerate(effect["values"]):
            difference = entry["difference"]
            if difference is None:
                change, verdict = "", ""
            else:
                change = estimate_text(difference, time)
                low, high = difference["interval"]
                verdict = ("-" if low is None and high is None else
                           "beyond seeds" if (low is not None and low > 0) or (high is not None and high < 0)
                           else "within seeds")
            view.add_row(effect["axis"] if index == 0 else "", str(entry["value"]), str(entry["trials"]),
                         str(entry["never"]) if time else "", estimate_text(entry, time), change, verdict)
    output.print(view)
    points = Table(title="grid points: replicates", title_justify="left")
    for column in ("point", "seed values", document["reading"], "never", "circuits", "role overlap", "head overlap"):
        points.add_column(column, justify="right")
    for entry in document["points"]:
        summary = entry["summary"]
        points.add_row(" ".join(f"{k}={v}" for k, v in entry["point"].items()) or "-",
                       ",".join(str(s) for s in entry["seeds"]), estimate_text(summary, time),
                       f"{summary['never']} of {summary['trials']}" if time else "", str(entry["circuits"]),
                       number(entry["role_overlap"], 2), number(entry["head_overlap"], 2))
    output.print(points)
    if reference := document["reference"]:
        console.print(f"formed_at against sqrt(batch x context): a = {reference['fit_scale']:,.0f} tokens fits the "
                      f"grid points' medians (Aoyama et al. 2025: a = 10^5.7 = {reference['aoyama_scale']:,.0f})")


def millions(tokens: list[int]) -> str:
    return " ".join(f"{t / 1e6:.2g}" for t in tokens) or "-"



def best(document: dict, metric: str) -> None:
    """`sweep best`: the ranked trials, the ones that could not be ranked, and the best checkpoint."""
    from .table import formed_at_caption

    caption = formed_at_caption(document["formed_at_resolution"]) if "formed_at" in metric else None
    table = Table(title=f"{document['experiment']}: best by {metric} ({document['mode']})", caption=caption)
    extra = [m for m in ("test_loss", "induction_score_max") if m != metric]
    for column in ("trial", "status", "iters", metric, *extra, "config"):
        table.add_column(column)
    for trial in document["trials"]:
        table.add_row(
            trial["trial_id"], status_text(trial["status"], trial["iterations"], trial["planned_iterations"]),
            str(trial["iterations"]), metric_cell(trial["metrics"], metric),
            *(metric_cell(trial["metrics"], m) for m in extra), varying(trial["config"]),
        )
    output.print(table)
    if unranked := document["unranked"]:
        why = "the circuit never formed" if metric.endswith("_formed_at") else "no finite value"
        output.print(f"not ranked ({why}): {len(unranked)} trial{'s' if len(unranked) > 1 else ''}, "
                     f"{', '.join(unranked[:8])}{' ...' if len(unranked) > 8 else ''}", highlight=False)
    if document["trials"] and document["trials"][0]["checkpoint"]:
        output.print(f"best checkpoint: {document['trials'][0]['checkpoint']}", highlight=False)


def experiments(storage_uri: str, rows: list[dict]) -> None:
    table = Table(title=f"experiments in {storage_uri}")
    for column in ("name", "created", "trials", "metric"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["created"], str(row["trials"]), str(row["metric"]))
    output.print(table)


def status(experiment, counts: dict[str, int], best_trial) -> None:
    """`sweep status`: trials by state, the ones ASHA stopped, the best so far, and how the driver stopped."""
    from .driver import driver_alive, stopped_reason
    from .names import INTERRUPTED

    metric = experiment.record["metric"]
    states = ", ".join(f"{n} {display_state(state)}" for state, n in sorted(counts.items()))
    iterations = sum(t.iterations for t in experiment.trials)
    click.echo(f"{experiment.name}: {len(experiment.trials)} of {experiment.record['trials']} trials started "
               f"({states or 'none yet'}); {iterations} iterations done")
    for trial in experiment.trials:
        if trial.stopped_early:
            click.echo(f"  {trial.trial_id} {trial.status_text} ({varying(trial.config)})")
    if best_trial is not None:
        click.echo(f"best {metric}: {best_trial.metrics[metric]:.4f} ({best_trial.trial_id})")
    if driver_alive(experiment.driver):
        console.print(f"running: a driver on {experiment.driver.get('host')} (pid {experiment.driver.get('pid')}) "
                      f"updated it at {experiment.driver.get('updated')}", highlight=False)
    elif reason := stopped_reason(experiment.driver):
        interrupted = sum(t.status == INTERRUPTED for t in experiment.trials)
        errored = sum(t.status == "ERROR" for t in experiment.trials)
        parts = [f"{interrupted} interrupted"] * bool(interrupted) + [f"{errored} errored"] * bool(errored)
        advice = f"; {', '.join(parts)}: `sweep resume {experiment.name}` continues them" if parts else ""
        console.print(f"{reason}{advice}", highlight=False)
    if experiment.damaged:
        console.print(f"damaged records, read around: {', '.join(experiment.damaged)}", highlight=False)


def results(experiment) -> None:
    from .table import formed_at_caption

    table = Table(title=experiment.name, caption=formed_at_caption(experiment.formed_at_resolution))
    shown = ("test_loss", "icl_score", "induction_formed_at", "prev_token_formed_at")
    keys = identity_columns([trial.config for trial in experiment.trials])
    for column in ("trial", "status", "iters", *shown, *keys, "error"):
        table.add_column(column)
    for trial in experiment.trials:
        cells = [metric_cell(trial.metrics, m) for m in shown]
        table.add_row(trial.trial_id, trial.status_text, str(trial.iterations), *cells,
                      *(str(trial.config.get(k, "")) for k in keys), trial.error or "")
    output.print(table)


def heads(document: dict, title: str) -> None:
    """`sweep heads`: every head's scores, ablation and labels."""
    names = list(document["heads"][0]["scores"]) if document["heads"] else []
    ablated = any("ablation" in h for h in document["heads"])
    table = Table(title=f"heads of {title}")
    for column in ("layer", "head", *names, *(["ablate: held-out", "ablate: repeated"] if ablated else []), "labels"):
        table.add_column(column, justify="right" if column not in ("labels",) else "left")
    for head in document["heads"]:
        rises = ([f"{head['ablation'][k]:+.3f}" if "ablation" in head else "-" for k in ("held_out", "repeated")]
                 if ablated else [])
        table.add_row(str(head["layer"]), str(head["head"]), *(f"{head['scores'][n]:.2f}" for n in names), *rises,
                      ", ".join(head["labels"]) or "-")
    output.print(table)
    if ablated:
        output.print("ablate: rise in loss (nats) when the head's output is replaced by its mean", highlight=False)


def snapshots(listed: dict, title: str) -> None:
    """`sweep snapshots`: one trial's snapshots, or a line per trial."""
    from .trajectory import human_bytes

    if len(listed) == 1:
        (name, items), = listed.items()
        table = Table(title=f"snapshots of {title}" + (f" trial {name}" if name != title else ""))
        for column in ("step", "tokens_seen", "size"):
            table.add_column(column, justify="right")
        for item in items:
            table.add_row(f"{item.step:,}", f"{item.tokens_seen:,}", human_bytes(item.bytes))
    else:
        table = Table(title=f"snapshots of {title}")
        for column in ("trial", "snapshots", "first step", "last step", "last tokens_seen", "size"):
            table.add_column(column, justify="right")
        for name, items in listed.items():
            ends = [f"{items[0].step:,}", f"{items[-1].step:,}", f"{items[-1].tokens_seen:,}"] if items else ["-"] * 3
            table.add_row(name, str(len(items)), *ends, human_bytes(sum(i.bytes for i in items)))
    output.print(table)


def calibration(experiment_name: str, trial_id: str, result: dict) -> None:
    """`sweep analyse --what llc-calibrate`: every eps x gamma, judged, and the pick."""
    current = result["current"]
    view = Table(title=f"{experiment_name}: LLC calibration on trial {trial_id}, step {result['step']:,} "
                       f"({result['tokens_seen']:,} tokens), n_beta {current['n_beta']:.1f}")
    for column in ("eps", "gamma", "LLC", "chains' range", "diverged chains", "trace settles",
                   "agrees with smaller eps", "stable"):
        view.add_column(column, justify="right")
    for row in result["rows"]:
        llc = "-" if row["llc"] is None else f"{row['llc']:.2f}"
        # the spread of the chains' estimates: from a few chains a standard error looks more precise than it is
        spread = f"{min(row['chains']):.2f} to {max(row['chains']):.2f}" if row["chains"] else "-"
        view.add_row(f"{row['epsilon']:g}", f"{row['gamma']:g}", llc, spread, str(row["diverged"]),
                     "yes" if row["settled"] else "no", "yes" if row["agrees_with_smaller_eps"] else "-",
                     "[green]yes[/]" if row["stable"] else "no")
    output.print(view)
    pick = result["largest_stable"]
    in_use = f"in use: eps {current['epsilon']:g}, gamma {current['gamma']:g}"
    if pick is None:
        output.print(f"no setting is stable on this snapshot ({in_use}); its LLC estimates are not to be trusted")
    else:
        output.print(f"largest stable eps: {pick['epsilon']:g} at gamma {pick['gamma']:g} ({in_use})")


def stages(experiment_name: str, documents: list[dict]) -> None:
    """`sweep stages`: a row per trial: its stages, boundaries, turning points and where its circuits formed."""
    table = Table(title=f"{experiment_name}: developmental stages")
    keys = identity_columns([document["config"] for document in documents])
    for column in ("trial", *keys, "stages", "LLC boundaries (tokens: stage that ends)", "ED turning points",
                   "circuits (tokens, stage)"):
        table.add_column(column)
    for document in documents:
        boundaries = ", ".join(f"{b['tokens']:,}: {b['kind']}" for b in document["llc_boundaries"]) or "-"
        turns = ", ".join(f"{t:,}" for t in document["essential_dynamics_turning_points"]) or "-"
        circuits = ", ".join(f"{name.removesuffix('_formed_at')} {c['tokens_seen']:,} (stage {c['stage']}"
                             f"{', by use' if c.get('by') == 'use' else ''})"
                             for name, c in document["circuits"].items()) or "-"
        shape = (str(document["config"].get(k, "")) for k in keys)
        table.add_row(document["trial_id"], *shape, str(document["stages"]), boundaries, turns, circuits)
    output.print(table)


def atlas(result) -> None:
    """`sweep atlas`: a row per trial, then each axis's groups (and its circuits' edge kinds), then pairs of axes."""
    from .atlas import GRID_SCORES
    from .table import formed_at_caption

    scores = GRID_SCORES
    table = Table(title=f"{result.experiment}: {len(result.rows)} trials",
                  caption=formed_at_caption(result.formed_at_resolution).replace("formed_at", "induction at", 1))
    staged = any(row.stages is not None for row in result.rows)
    stage_columns = ("stages", "stage ends (M tokens)") if staged else ()
    circuit_columns = (
        ("circuit edges", "faithful", "head-to-head edges", "composed at") if result.circuit_task else ()
    )
    columns = ("trial", *result.columns, "status", "test_loss", "icl", *(f"{s} max" for s in scores), "ind.", "prev.",
               "matters", "induction at", *stage_columns, *circuit_columns)
    rows = []
    for row in result.rows:
        stage_cells = (number(row.stages), millions(row.stage_boundaries)) if staged else ()
        circuit = row.circuit or {}
        circuit_cells = (number(circuit.get("edges")), number(circuit.get("faithfulness"), 2),
                         number(circuit.get("composition_edges")),
                         number(circuit.get("composition_appeared_at"))) if circuit_columns else ()
        rows.append((row.trial_id, *(str(row.config.get(a)) for a in result.columns), display_state(row.status),
                     number(row.values["test_loss"]), number(row.values["icl_score"]),
                     *(number(row.values[f"{s}_max"], 2) for s in scores),
                     *(str(row.label_counts[label]) for label in ("induction", "previous_token", "matters")),
                     number(row.induction_formed_at), *stage_cells, *circuit_cells))
    # A narrow terminal squeezes the numbers' headers, never the trial ids and token counts a user copies (headers
    # start with distinct words, so a squeezed one still names its column)
    whole = {"trial", "status", "induction at", "composed at"}
    for index, column in enumerate(columns):
        width = max((len(cells[index]) for cells in rows), default=0) if column in whole else None
        table.add_column(column, justify="right", min_width=width)
    for cells in rows:
        table.add_row(*cells)
    output.print(table)
    if result.circuit_task:
        output.print(f"circuit: on {result.circuit_task} at the last snapshot (`sweep circuit`); head-to-head edges: "
                     "composition (Q, K, V); composed at: tokens when the first of them passed the edge threshold",
                     highlight=False)
    for axis in result.axes:
        score, spread = result.strongest(axis)
        group_table = Table(title=f"by {axis}: {score} depends on it most (group means differ by {spread:.2f}; "
                                  f"{result.noise(axis)})",
                            title_justify="left")
        for column in (axis, "trials", *(f"{s} mean/max" for s in scores), "induction heads", "test_loss",
                       *stage_columns):
            group_table.add_column(column, justify="right")
        for entry in result.groups[axis]:
            cells = [f"{entry[f'{s}_max']['mean']:.2f}/{entry[f'{s}_max']['max']:.2f}"
                     if entry[f"{s}_max"]["mean"] is not None else "-" for s in scores]
            stage_cells = (number(entry["stages"]["mean"], 1), millions(entry["stage_boundaries"])) if staged else ()
            group_table.add_row(str(entry["value"]), str(entry["trials"]), *cells,
                                f"{entry['induction_heads']['mean']:.1f}", number(entry["test_loss"]["mean"]),
                                *stage_cells)
        output.print(group_table)
        if result.circuit_task:
            circuit_groups(axis, result.groups[axis])
    for pair, entries in list(result.pairs.items())[:3]:
        first, second = pair.split(" x ")
        pair_table = Table(title=f"by {pair} (means)", title_justify="left")
        for column in (first, second, "trials", *(f"{s}" for s in scores), "induction heads"):
            pair_table.add_column(column, justify="right")
        for entry in entries:
            pair_table.add_row(str(entry[first]), str(entry[second]), str(entry["trials"]),
                               *(number(entry[f"{s}_max"], 2) for s in scores), f"{entry['induction_heads']:.1f}")
        output.print(pair_table)


def as_json(document) -> None:
    click.echo(json.dumps(document, indent=2))
