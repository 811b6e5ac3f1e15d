"""The `sweep` command line: thin Click commands over library functions."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from model.config import ConfigError, TrainConfig
from model.train import CheckpointError, NonFiniteLossError

from .space import data_config

console = Console(stderr=True, soft_wrap=True)
# Tables go to stdout; when it is a pipe or a file, give them room instead of wrapping at 80.
output = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
# Mistakes a user can make: printed as one line, exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CheckpointError)


class UserError(click.ClickException):
    """One line on stderr, exit status 2, no traceback."""

    exit_code = 2


class SweepGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            raise UserError(str(error)) from None
        except NonFiniteLossError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=SweepGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what happens underneath.")
def main(verbose: bool) -> None:
    """Train many small attention-only transformers and read what their heads learned.

    \b
    sweep train imdb --tokenizer bpe:2048 --d-model 64 --heads 4 --out run
    sweep launch imdb --preset smoke
    sweep best --metric test_loss
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def data_options(command):
    """Options that choose and prepare the data (shared by train and launch)."""
    options = [
        click.option("--tokenizer", default="gpt2", show_default=True, help="gpt2, bert, bpe:N, bytes or a tokenizer path."),
        click.option("--text-column", default="text", show_default=True, help="Text column of parquet / jsonl files."),
        click.option("--train-split", default="train", show_default=True),
        click.option("--test-split", default="test", show_default=True),
        click.option("--clean/--no-clean", default=False, help="Lowercase and strip <br /> as the study did."),
        click.option("--pack/--no-pack", default=True, help="Pack documents (default) or truncate and pad each one."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("dataset")
@data_options
@click.option("--layers", default=1, show_default=True, help="Transformer blocks.")
@click.option("--heads", default=8, show_default=True, help="Attention heads per layer.")
@click.option("--d-model", default=256, show_default=True, help="Residual stream width.")
@click.option("--seq-len", default=20, show_default=True, help="Context length.")
@click.option("--mlp/--no-mlp", default=False, help="Add MLPs (attention-only by default).")
@click.option("--lr", default=1e-4, show_default=True, help="Peak learning rate.")
@click.option("--batch-size", default=50, show_default=True)
@click.option("--max-tokens", default=2_000_000, show_default=True, help="Training tokens in all.")
@click.option("--eval-every-tokens", default=200_000, show_default=True, help="Tokens per iteration.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16"]))
@click.option("--compile/--no-compile", default=False, help="torch.compile the model.")
@click.option("--prompt", default="This movie is", show_default=True, help="Prompt for the sample and heatmaps.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("run"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON.")
def train(dataset, layers, heads, d_model, seq_len, mlp, lr, batch_size, max_tokens, eval_every_tokens, seed, device, dtype, compile, prompt, out, as_json, **data_values):
    """Train one model without Ray; write OUT/metrics.jsonl and OUT/checkpoint/.

    \b
    SWEEP_DATA_DIR=../shared/data sweep train imdb --tokenizer bpe:2048 \\
        --heads 4 --d-model 64 --seq-len 32 --max-tokens 400000 --out run
    """
    from model.analysis import AnalysisConfig
    from model.train import run_training

    train_cfg = TrainConfig(lr=lr, batch_size=batch_size, max_tokens=max_tokens, eval_every_tokens=eval_every_tokens, seed=seed, device=device, dtype=dtype, compile=compile)
    model_values = {"n_layers": layers, "n_heads": heads, "d_model": d_model, "seq_len": seq_len, "mlp": mlp}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("training", total=max_tokens, status="")

        def on_iteration(metrics, trainer):
            progress.update(task, completed=metrics["tokens_seen"], status=f"test_loss {metrics['test_loss']:.3f}")
            console.print(_metrics_line(trainer.iteration, metrics), highlight=False)

        metrics = run_training(data_config({"dataset": dataset, **data_values}), model_values, train_cfg, out, AnalysisConfig(prompt=prompt, seed=seed), on_iteration, log=console.print)
    console.print(f"checkpoint: {out / 'checkpoint'}")
    if as_json:
        click.echo(json.dumps(metrics, indent=2))


def _metrics_line(iteration: int, metrics: dict) -> str:
    return (
        f"iter {iteration:3d}  tokens {metrics['tokens_seen']:>11,}  train_loss {metrics['train_loss']:.4f}  "
        f"test_loss {metrics['test_loss']:.4f}  acc {metrics['test_accuracy']:.3f}  "
        f"{metrics['tokens_per_second']:,.0f} tok/s  induction {metrics['induction_score_max']:.2f}"
    )


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--prompt", default="This movie is", show_default=True)
@click.option("--tokens", default=7, show_default=True, type=click.IntRange(1, 10_000), help="Tokens to sample.")
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True)
def generate(checkpoint, prompt, tokens, top_k, seed):
    """Continue PROMPT with top-k sampling from a checkpoint folder."""
    from model.generate import generate as sample
    from model.train import load_checkpoint, load_checkpoint_tokenizer

    net = load_checkpoint(checkpoint)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt is empty after tokenization; give some text")
    click.echo(tokenizer.decode(sample(net, prompt_ids, tokens, top_k, seed)))


def storage_option(command):
    return click.option(
        "--storage", envvar="SWEEP_STORAGE", default=None,
        help="Local path or s3://bucket/prefix [env SWEEP_STORAGE; default ~/sweep-results].",
    )(command)


@main.command()
@click.argument("dataset", required=False, default="")
@click.option("--preset", default="smoke", show_default=True, help="paper, smoke or induction.")
@click.option("--grid", multiple=True, metavar="KEY=V1,V2", help="Override or add an axis (repeatable).")
@click.option("--name", default=None, help="Experiment name [default: DATASET-PRESET-TIME].")
@storage_option
@click.option("--address", default=None, help="Join a cluster: auto or ray://host:10001 [default: local Ray].")
@click.option("--cpus-per-trial", default=1.0, show_default=True, type=float)
@click.option("--gpus-per-trial", default=0.0, show_default=True, type=float, help="Fractions share a GPU.")
@click.option("--memory-per-trial", default=0.0, show_default=True, type=float, help="MB a trial reserves and may use (0: no limit).")
@click.option("--max-concurrent", default=0, show_default=True, help="0: as many as resources allow.")
@click.option("--num-samples", default=1, show_default=True, help="Repeats of the grid (seeds).")
@click.option("--metric", default="test_loss", show_default=True)
@click.option("--mode", default="min", show_default=True, type=click.Choice(["min", "max"]))
@click.option("--early-stopping/--no-early-stopping", default=None, help="ASHA on or off [default: the preset's choice; off for induction].")
@click.option("--grace-period", default=1, show_default=True, help="ASHA: iterations before a trial may stop.")
@click.option("--reduction-factor", default=2, show_default=True, help="ASHA: keep 1/N at each rung.")
@click.option("--max-iterations", default=None, type=int, help="Cap on iterations per trial.")
@click.option("--max-failures", default=3, show_default=True, help="Retries of a trial whose worker dies.")
@click.option("--wandb/--no-wandb", default=False, help="Log every trial to Weights & Biases.")
@click.option("--compile/--no-compile", "compile_model", default=None, help="torch.compile each trial's model [default: the preset's choice].")
@data_options
@click.pass_context
def launch(ctx, dataset, preset, grid, name, storage, address, cpus_per_trial, gpus_per_trial, memory_per_trial, max_concurrent, num_samples, metric, mode, early_stopping, grace_period, reduction_factor, max_iterations, max_failures, wandb, compile_model, **data_values):
    """Run a hyperparameter sweep of DATASET on Ray Tune with ASHA early stopping.

    \b
    SWEEP_DATA_DIR=../shared/data sweep launch imdb --preset smoke
    sweep launch imdb --preset paper --storage s3://bucket/prefix --address auto
    sweep launch --preset induction
    """
    from .progress import ProgressCallback
    from .runner import LaunchConfig, launch_sweep, plan_sweep

    explicit = {k: v for k, v in data_values.items() if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    if compile_model is not None:
        explicit["compile"] = compile_model
    config = LaunchConfig(
        dataset=dataset, preset=preset, grid=grid, name=name, storage=storage, address=address,
        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, memory_per_trial_mb=memory_per_trial, max_concurrent=max_concurrent,
        num_samples=num_samples, metric=metric, mode=mode, early_stopping=early_stopping, grace_period=grace_period,
        reduction_factor=reduction_factor, max_iterations=max_iterations, max_failures=max_failures,
        wandb=wandb, data=explicit,
    )
    plan = plan_sweep(config)
    progress = ProgressCallback(metric, mode, plan.iterations)
    plan = launch_sweep(config, [progress], log_line=console.print, verbose=ctx.find_root().params["verbose"])
    _print_best(plan.name, plan.storage.uri, metric, mode, top=3)


def _open(storage_uri):
    from .storage import open_storage

    return open_storage(storage_uri)


def _print_best(name, storage_uri, metric, mode, top):
    from .results import best_document, load_experiment

    document = best_document(load_experiment(_open(storage_uri), name), metric, mode, top)
    table = Table(title=f"{document['experiment']}: best by {metric} ({mode})")
    extra = [m for m in ("test_loss", "induction_score_max") if m != metric]
    for column in ("trial", "status", "iters", metric, *extra, "config"):
        table.add_column(column)
    for trial in document["trials"]:
        varying = " ".join(f"{k}={trial['config'][k]}" for k in ("seq_len", "lr", "heads", "d_model", "layers", "mlp") if k in trial["config"])
        table.add_row(
            trial["trial_id"], trial["status"], str(trial["iterations"]), f"{trial['metrics'][metric]:.4f}",
            *(f"{trial['metrics'].get(m, float('nan')):.4f}" for m in extra), varying,
        )
    output.print(table)
    if document["trials"] and document["trials"][0]["checkpoint"]:
        output.print(f"best checkpoint: {document['trials'][0]['checkpoint']}", highlight=False)
    return document


@main.command(name="list")
@storage_option
def list_command(storage):
    """List the experiments in the storage, oldest first."""
    from .results import list_experiments

    table = Table(title=f"experiments in {_open(storage).uri}")
    for column in ("name", "created", "trials", "metric"):
        table.add_column(column)
    for experiment in list_experiments(_open(storage)):
        table.add_row(experiment["name"], experiment["created"], str(experiment["trials"]), str(experiment["metric"]))
    output.print(table)


@main.command()
@click.argument("name", required=False)
@storage_option
def status(name, storage):
    """Trials by state, iterations done and the best so far of experiment NAME (default: newest)."""
    from .results import best_trials, load_experiment, status_counts

    experiment = load_experiment(_open(storage), name)
    metric, mode = experiment.record["metric"], experiment.record["mode"]
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(status_counts(experiment).items()))
    iterations = sum(t.iterations for t in experiment.trials)
    click.echo(f"{experiment.name}: {len(experiment.trials)} of {experiment.record['trials']} trials started ({counts or 'none yet'}); {iterations} iterations done")
    best = best_trials(experiment, metric, mode, 1) if any(metric in t.metrics for t in experiment.trials) else []
    if best:
        click.echo(f"best {metric}: {best[0].metrics[metric]:.4f} ({best[0].trial_id})")


@main.command()
@click.argument("name", required=False)
@storage_option
@click.option("--metric", default="test_loss", show_default=True)
@click.option("--mode", default="min", show_default=True, type=click.Choice(["min", "max"]))
@click.option("--top", default=5, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print the DESIGN.md JSON document.")
def best(name, storage, metric, mode, top, as_json):
    """The best trials of experiment NAME (default: the newest) by --metric."""
    if as_json:
        from .results import best_document, load_experiment

        click.echo(json.dumps(best_document(load_experiment(_open(storage), name), metric, mode, top), indent=2))
    else:
        _print_best(name, storage, metric, mode, top)


@main.command()
@click.argument("name")
@storage_option
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write every trial's last metrics as CSV.")
def results(name, storage, csv_path):
    """Every trial of NAME with its config and last metrics."""
    import csv

    from .results import load_experiment

    experiment = load_experiment(_open(storage), name)
    config_keys = sorted({k for t in experiment.trials for k in t.config})
    metric_keys = sorted({k for t in experiment.trials for k in t.metrics})
    if csv_path:
        # config columns keep their names; metric columns that clash (lr) get a metric/ prefix
        rows = [{"trial_id": t.trial_id, "status": t.status, "iterations": t.iterations, "error": t.error or "", **t.config,
                 **{(f"metric/{k}" if k in config_keys else k): v for k, v in t.metrics.items()}} for t in experiment.trials]
        metric_keys = [f"metric/{k}" if k in config_keys else k for k in metric_keys]
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["trial_id", "status", "iterations", "error", *config_keys, *metric_keys])
            writer.writeheader()
            writer.writerows(rows)
        console.print(f"wrote {len(rows)} trials to {csv_path}")
        return
    table = Table(title=experiment.name)
    for column in ("trial", "status", "iters", "test_loss", "lr", "heads", "d_model", "layers", "seq_len", "mlp", "error"):
        table.add_column(column)
    for trial in experiment.trials:
        loss = trial.metrics.get("test_loss")
        table.add_row(trial.trial_id, trial.status, str(trial.iterations), f"{loss:.4f}" if isinstance(loss, float) else "-", *(str(trial.config.get(k, "")) for k in ("lr", "heads", "d_model", "layers", "seq_len", "mlp")), trial.error or "")
    output.print(table)


@main.command()
@click.argument("name")
@storage_option
@click.option("--address", default=None, help="Ray cluster to resume on [default: local Ray].")
@click.pass_context
def resume(ctx, name, storage, address):
    """Finish an interrupted sweep: unfinished and errored trials continue from their checkpoints."""
    from .progress import ProgressCallback
    from .runner import load_plan, resume_sweep

    plan = load_plan(name, storage)
    progress = ProgressCallback(plan.launch.metric, plan.launch.mode, plan.iterations)
    resume_sweep(name, storage, address, [progress], log_line=console.print, verbose=ctx.find_root().params["verbose"])
    _print_best(name, storage, plan.launch.metric, plan.launch.mode, top=3)


def source_options(command):
    command = click.option("--trial", default="best", show_default=True, help="best (by the sweep's metric) or a trial id.")(command)
    return storage_option(command)


@main.command()
@click.argument("source")
@source_options
@click.option("--json", "as_json", is_flag=True, help="Print heads.json.")
def heads(source, trial, storage, as_json):
    """The head atlas: every head's scores and labels.

    SOURCE is a checkpoint folder or an experiment name (with --storage).
    """
    import tempfile

    from .results import local_checkpoint

    with tempfile.TemporaryDirectory() as workdir:
        checkpoint = local_checkpoint(source, trial, _open(storage), workdir)
        if not (checkpoint / "heads.json").is_file():
            raise UserError(f"{checkpoint} has no heads.json; it was written by an older version")
        document = json.loads((checkpoint / "heads.json").read_text())
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    names = list(document["heads"][0]["scores"]) if document["heads"] else []
    table = Table(title=f"heads of {source}")
    for column in ("layer", "head", *names, "labels"):
        table.add_column(column, justify="right" if column not in ("labels",) else "left")
    for head in document["heads"]:
        table.add_row(str(head["layer"]), str(head["head"]), *(f"{head['scores'][n]:.2f}" for n in names), ", ".join(head["labels"]) or "-")
    output.print(table)


@main.command()
@click.argument("source")
@source_options
@click.option("--prompt", default=None, help="Render new heatmaps for this prompt instead of copying the stored ones.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("heatmaps"), show_default=True)
def heatmaps(source, trial, storage, prompt, out):
    """Copy a checkpoint's attention heatmaps to OUT, or render new ones for --prompt."""
    import shutil
    import tempfile

    from model.analysis import AnalysisConfig, sample_and_patterns, write_heatmaps
    from model.train import load_checkpoint, load_checkpoint_tokenizer

    from .results import local_checkpoint

    with tempfile.TemporaryDirectory() as workdir:
        checkpoint = local_checkpoint(source, trial, _open(storage), workdir)
        if prompt is None:
            if not (checkpoint / "heatmaps").is_dir():
                raise UserError(f"{checkpoint} has no heatmaps/; pass --prompt to render them")
            shutil.copytree(checkpoint / "heatmaps", out, dirs_exist_ok=True)
        else:
            net = load_checkpoint(checkpoint)
            tokenizer = load_checkpoint_tokenizer(checkpoint)
            try:
                ids, patterns = sample_and_patterns(net, tokenizer, AnalysisConfig(prompt=prompt))
            except ValueError as error:
                raise UserError(str(error)) from None
            write_heatmaps(out, ids, tokenizer.token_strings(ids), patterns)
    console.print(f"heatmaps in {out}/: {len(list(out.glob('*.png')))} images")


@main.command()
@click.argument("source")
@source_options
@click.option("--format", "export_format", type=click.Choice(["transformer-lens"]), default="transformer-lens", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write.")
def export(source, trial, storage, export_format, out):
    """Export a checkpoint for TransformerLens' HookedTransformer (transformer-lens 3.x).

    SOURCE is a checkpoint folder or an experiment name (with --storage).
    """
    import tempfile

    from model.export import export_transformer_lens
    from model.train import load_checkpoint

    from .results import local_checkpoint

    with tempfile.TemporaryDirectory() as workdir:
        net = load_checkpoint(local_checkpoint(source, trial, _open(storage), workdir))
    written = export_transformer_lens(net, out)
    console.print("wrote " + ", ".join(str(p) for p in written))


@main.command()
@click.argument("name", required=False)
@storage_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True)
@click.option("--top", default=3, show_default=True, type=click.IntRange(1), help="Trials shown in full.")
def report(name, storage, out, top):
    """One self-contained HTML report of experiment NAME (default: newest), viewable offline."""
    from .report import build_report
    from .results import load_experiment

    document = build_report(load_experiment(_open(storage), name), top)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(document)
    partial.replace(out)  # never a half-written report
    console.print(f"report: {out} ({len(document) / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
