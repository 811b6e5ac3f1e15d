"""The `sweep` command line: thin Click commands over library functions.

Each command imports its library when it runs: `sweep list`, `status`, `best` and `results` start without torch or
Ray, which only the commands that train or measure load.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from model.config import CheckpointError, ConfigError, NonFiniteLossError
from model.metrics import REPORTED_METRICS

from . import render
from .names import SCHEDULERS
from .render import console, output
from .space import PRESETS, TRIAL_KEYS, data_config

# Mistakes a user can make: printed as one line, exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CheckpointError)


class UserError(click.ClickException):
    """One line on stderr, exit status 2, no traceback."""

    exit_code = 2


class Interrupted(click.ClickException):
    """One line; the exit status of the signal that stopped the sweep (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(self.message, err=True)


class SweepGroup(click.Group):
    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Click's own usage errors (a missing or unknown option, a value out of range) in one line naming the
        option, exit status 2, as every other mistake: not Click's four lines of usage."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            where = f" (`{error.ctx.command_path} -h` for help)" if error.ctx else ""
            click.echo(f"Error: {error.format_message()}{where}", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            raise UserError(str(error)) from None
        except NonFiniteLossError as error:
            raise click.ClickException(str(error)) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # -h, usage errors: Click's own, and no reason to load the sweep's runner (torch, Ray) to say so
        except Exception as error:
            from .driver import SweepInterrupted
            from .runner import RayLostError

            if isinstance(error, SweepInterrupted):
                raise Interrupted(str(error), error.exit_code) from None
            if isinstance(error, RayLostError):
                raise click.ClickException(str(error)) from None
            raise


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


def data_options(command, preset_default: bool = False):
    """Options that choose and prepare the data (shared by train and launch; for launch, the preset decides what
    is not given)."""
    tokenizer_help = TRIAL_KEYS["tokenizer"].help
    if preset_default:
        chosen = ", ".join(f"{name} {preset.fixed.get('tokenizer') or 'repeat:N'}" for name, preset in PRESETS.items())
        tokenizer_help += f" [default: the preset's: {chosen}]"
    options = [
        click.option("--tokenizer", default=TRIAL_KEYS["tokenizer"].default, show_default=not preset_default,
                     help=tokenizer_help),
        click.option("--text-column", default="text", show_default=True, help="Text column of parquet / jsonl files."),
        click.option("--train-split", default="train", show_default=True),
        click.option("--test-split", default="test", show_default=True),
        click.option("--clean/--no-clean", default=False, help="Lowercase and strip <br /> as the study did."),
        click.option("--pack/--no-pack", default=True, help="Pack documents (default) or truncate and pad each one."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


SNAPSHOTS_HELP = ("Snapshot schedule, fixed before training: log (step 0, powers of two, then 30 evenly spaced), "
                  "log:N, every:TOKENS, token counts T1,T2,... or none.")


def snapshot_options(command):
    """--snapshots and --snapshot-dtype (train and launch; a preset may choose its own)."""
    command = click.option("--snapshot-dtype", default=None, type=click.Choice(["float32", "bfloat16"]),
                           help="Snapshot weights' dtype: bfloat16 halves their bytes "
                                "[default: float32, or the preset's].")(command)
    return click.option("--snapshots", default=None, help=SNAPSHOTS_HELP + " [default: log, or the preset's]")(command)


def at_options(command):
    """--step / --tokens-seen: read a run's snapshot instead of its latest checkpoint (--tokens already
    names the token tables of `heads` and the sample length of `generate`)."""
    command = click.option("--tokens-seen", "at_tokens", type=click.IntRange(0), default=None,
                           help="The snapshot at this many training tokens (`sweep snapshots` lists them).")(command)
    return click.option("--step", "at_step", type=click.IntRange(0), default=None,
                        help="The snapshot after this optimizer step.")(command)


def _address(at_step, at_tokens):
    from .trajectory import SnapshotAddress

    return None if at_step is None and at_tokens is None else SnapshotAddress(at_step, at_tokens)


def trial_key_options(command):
    """One option per trial key of the model and training configs (the --grid keys of a sweep)."""
    for spec in reversed([s for s in TRIAL_KEYS.values() if s.key != "tokenizer"]):
        flag = "--" + spec.key.replace("_", "-")
        if isinstance(spec.default, bool):
            command = click.option(f"{flag}/--no-{flag[2:]}", spec.key, default=spec.default, help=spec.help)(command)
        else:
            command = click.option(
                flag, spec.key, default=spec.default, show_default=True, type=type(spec.default), help=spec.help
            )(command)
    return command


@main.command()
@click.argument("dataset")
@data_options
@trial_key_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16"]))
@click.option("--compile/--no-compile", default=False, help="torch.compile the model.")
@click.option(
    "--threads",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="CPU threads for torch (0: every CPU this process may use).",
)
@click.option("--prompt", default="This movie is", show_default=True, help="Prompt for the sample and heatmaps.")
@snapshot_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("run"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON.")
@click.pass_context
def train(ctx, dataset, device, dtype, compile, threads, prompt, snapshots, snapshot_dtype, out, as_json, **values):
    """Train one model without Ray; write OUT/metrics.jsonl, OUT/checkpoint/ and OUT/snapshots/.

    \b
    SWEEP_DATA_DIR=../shared/data sweep train imdb --tokenizer bpe:2048 \\
        --heads 4 --d-model 64 --seq-len 32 --max-tokens 400000 --out run
    """
    from model.analysis import AnalysisConfig
    from model.train import run_training

    from .plan import REPEAT_TOKENIZER
    from .space import trial_configs

    if dataset == "repeat" and ctx.get_parameter_source("tokenizer") != click.core.ParameterSource.DEFAULT:
        raise UserError(REPEAT_TOKENIZER)

    run_settings = {"device": device, "compile": compile, "snapshots": snapshots or "log",
                    "snapshot_dtype": snapshot_dtype or "float32"}
    _, model_cfg, train_cfg = trial_configs({**values, **run_settings})
    train_cfg = dataclasses.replace(train_cfg, dtype=dtype, threads=threads)
    model_values = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k != "vocab_size"}
    data_values = {
        k: v
        for k, v in values.items()
        if k in {"tokenizer", "text_column", "train_split", "test_split", "clean", "pack"}
    }
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("training", total=train_cfg.max_tokens, status="")

        def on_iteration(metrics, trainer):
            progress.update(task, completed=metrics["tokens_seen"], status=f"test_loss {metrics['test_loss']:.3f}")
            console.print(render.metrics_line(trainer.iteration, metrics), highlight=False)

        metrics = run_training(
            data_config({"dataset": dataset, **data_values}),
            model_values,
            train_cfg,
            out,
            AnalysisConfig(prompt=prompt, seed=train_cfg.seed),
            on_iteration,
            log=console.print,
        )
    console.print(f"checkpoint: {out / 'checkpoint'}")
    if as_json:
        click.echo(json.dumps(metrics, indent=2))


def storage_option(command):
    return click.option(
        "--storage", envvar="SWEEP_STORAGE", default=None,
        help="Local path or s3://bucket/prefix [env SWEEP_STORAGE; default ~/sweep-results].",
    )(command)


def source_options(command):
    command = click.option("--trial", default="best", show_default=True,
                           help="best (by the sweep's metric) or a trial id.")(command)
    return storage_option(command)


SOURCE_HELP = ("SOURCE is a checkpoint folder, a `sweep train` run folder, or an experiment name (default: the newest; "
               "with --storage and --trial); --step or --tokens-seen reads one of its snapshots instead of its latest "
               "checkpoint.")


@main.command(help=f"Continue PROMPT with top-k sampling from a checkpoint or a snapshot.\n\n{SOURCE_HELP}")
@click.argument("source", required=False)
@source_options
@at_options
@click.option("--prompt", default="This movie is", show_default=True)
@click.option("--tokens", "sample_tokens", default=7, show_default=True, type=click.IntRange(1, 10_000),
              help="Tokens to sample.")
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True)
def generate(source, trial, storage, at_step, at_tokens, prompt, sample_tokens, top_k, seed):
    import tempfile

    from model.checkpoint import load_checkpoint, load_checkpoint_tokenizer
    from model.generate import generate as sample

    from .results import local_checkpoint

    with tempfile.TemporaryDirectory() as workdir:
        checkpoint, _ = local_checkpoint(source, trial, _open(storage), workdir, _address(at_step, at_tokens))
        net = load_checkpoint(checkpoint)
        tokenizer = load_checkpoint_tokenizer(checkpoint)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt is empty after tokenization; give some text")
    click.echo(tokenizer.readable(sample(net, prompt_ids, sample_tokens, top_k, seed)))


METRIC_HELP = "Metric to rank by: " + ", ".join(REPORTED_METRICS) + "."
MODE_HELP = "min or max [default: the metric's direction: losses min, scores and accuracy max]."
ADDRESS_HELP = ("Ray cluster to join: auto (the cluster this machine belongs to), HEAD_IP:6379 or ray://HEAD_IP:10001 "
                "[default: start a local Ray].")


@main.command()
@click.argument("dataset", required=False, default="")
@click.option("--preset", default="smoke", show_default=True, help=f"{', '.join(PRESETS)}.")
@click.option(
    "--grid",
    multiple=True,
    metavar="KEY=V1,V2",
    help=(
        f"Override or add an axis (repeatable): a list, or a range to sample with --search random/optuna: "
        "loguniform:A:B, uniform:A:B, "
        f"randint:A:B, choice:a,b. Keys: {', '.join(TRIAL_KEYS)}; on/off keys "
        f"({', '.join(k for k, v in TRIAL_KEYS.items() if isinstance(v.default, bool))}) "
        "take on/off, true/false or yes/no."
    ),
)
@click.option("--name", default=None, help="Experiment name [default: DATASET-PRESET-TIME].")
@storage_option
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option(
    "--cpus-per-trial", default=1.0, show_default=True, type=float, help="CPUs (and torch threads) a trial reserves."
)
@click.option("--gpus-per-trial", default=0.0, show_default=True, type=float, help="Fractions share a GPU.")
@click.option(
    "--memory-per-trial",
    default=0.0,
    show_default=True,
    type=float,
    help="MB a trial reserves and may use (0: no limit).",
)
@click.option("--max-concurrent", default=0, show_default=True, help="0: as many as resources allow.")
@click.option("--seeds", default=None, type=click.IntRange(min=1),
              help="Replicates: train every grid point with N seeds (seed, seed+1, ...) [default: the preset's, or 1].")
@click.option("--num-samples", default=1, show_default=True,
              help="grid: replicates, as --seeds; random and optuna: trials drawn.")
@click.option("--metric", default="test_loss", show_default=True, help=METRIC_HELP)
@click.option("--mode", default=None, type=click.Choice(["min", "max"]), help=MODE_HELP)
@click.option(
    "--search",
    default="grid",
    show_default=True,
    type=click.Choice(["grid", "random", "optuna"]),
    help="grid: every combination; random: --num-samples draws of the ranges per grid point; optuna: TPE, "
         "--num-samples trials.",
)
@click.option(
    "--scheduler",
    default=None,
    type=click.Choice(list(SCHEDULERS)),
    help="; ".join(f"{name}: {text}" for name, text in SCHEDULERS.items())
    + " [default: asha, or the preset's choice].",
)
@click.option(
    "--early-stopping/--no-early-stopping",
    default=None,
    help="ASHA on or off [default: the preset's choice; off for induction].",
)
@click.option(
    "--grace-tokens",
    default=None,
    type=int,
    help="asha and halving compare no trial before this many training tokens (leave room for a phase change) [default: "
         "the preset's].",
)
@click.option(
    "--grace-period",
    default=1,
    show_default=True,
    help="asha and halving: iterations before a trial may stop (the first rung).",
)
@click.option(
    "--reduction-factor", default=2, show_default=True, help="asha, halving and hyperband: keep 1/N at each rung."
)
@click.option("--max-iterations", default=None, type=int, help="Cap on iterations per trial.")
@click.option("--max-failures", default=3, show_default=True, help="Retries of a trial whose worker dies.")
@click.option(
    "--wandb/--no-wandb",
    default=False,
    help="Log every trial to Weights & Biases (pip install 'circuit-sweep[wandb]').",
)
@click.option(
    "--compile/--no-compile",
    "compile_model",
    default=None,
    help="torch.compile each trial's model [default: the preset's choice].",
)
@snapshot_options
@functools.partial(data_options, preset_default=True)
@click.pass_context
def launch(
    ctx,
    dataset,
    preset,
    grid,
    name,
    storage,
    address,
    cpus_per_trial,
    gpus_per_trial,
    memory_per_trial,
    max_concurrent,
    seeds,
    num_samples,
    metric,
    mode,
    search,
    scheduler,
    early_stopping,
    grace_tokens,
    grace_period,
    reduction_factor,
    max_iterations,
    max_failures,
    wandb,
    compile_model,
    snapshots,
    snapshot_dtype,
    **data_values,
):
    """Run a hyperparameter sweep of DATASET on Ray Tune with ASHA early stopping.

    \b
    SWEEP_DATA_DIR=../shared/data sweep launch imdb --preset smoke
    sweep launch imdb --preset paper --storage s3://bucket/prefix --address auto
    sweep launch --preset induction
    """
    from .driver import SweepInterrupted
    from .plan import LaunchConfig, plan_sweep
    from .progress import ProgressCallback
    from .runner import launch_sweep

    explicit = {
        k: v for k, v in data_values.items() if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT
    }
    if compile_model is not None:
        explicit["compile"] = compile_model
    for key, value in (("snapshots", snapshots), ("snapshot_dtype", snapshot_dtype)):
        if value is not None:
            explicit[key] = value
    config = LaunchConfig(
        dataset=dataset,
        preset=preset,
        grid=grid,
        name=name,
        storage=storage,
        address=address,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        memory_per_trial_mb=memory_per_trial,
        max_concurrent=max_concurrent,
        num_samples=num_samples,
        seeds=seeds,
        metric=metric,
        mode=mode,
        early_stopping=early_stopping,
        search=search,
        scheduler=scheduler,
        grace_tokens=grace_tokens,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        max_iterations=max_iterations,
        max_failures=max_failures,
        wandb=wandb,
        data=explicit,
    )
    plan = plan_sweep(config)
    progress = ProgressCallback(plan.launch.metric, plan.launch.mode, plan.launch.max_iterations, plan.trial_count)
    try:
        launch_sweep(plan, [progress], log_line=console.print, verbose=ctx.find_root().params["verbose"])
    except SweepInterrupted:
        progress.summarize_interrupted()
        raise
    _print_closing(plan)


CLOSING_TRIALS = 12  # the closing table shows every trial of a small sweep, stopped ones included


def _print_closing(plan) -> None:
    """After launch or resume: the trials ranked by the sweep's metric, and what to run next."""
    _print_best(plan.name, plan.storage.uri, plan.launch.metric, plan.launch.mode, top=CLOSING_TRIALS)
    storage = "" if plan.storage.uri == _open(None).uri else f" --storage {plan.storage.uri}"
    output.print(f"next: sweep atlas {plan.name}{storage} · sweep circuit {plan.name}{storage} · "
                 f"sweep report {plan.name}{storage}", highlight=False)


def _write_whole(path: Path, write, binary: bool = False) -> None:
    """Write a local output file whole or not at all (`write` fills an open file, text unless `binary`); one line if
    it cannot."""
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb") if binary else partial.open("w", newline="") as handle:
            write(handle)
        partial.replace(path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror or error}; pick a writable path") from None


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    import csv

    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    _write_whole(path, write)
    console.print(f"wrote {len(rows)} trials to {path}")


def _open(storage_uri):
    """Storage for the commands that read: an unreachable S3 endpoint fails in seconds (launch, resume and
    trials retry for minutes instead)."""
    from .storage import open_storage

    return open_storage(storage_uri, patient=False)


def _print_best(name, storage_uri, metric, mode, top):
    from .results import best_document, load_experiment

    render.best(best_document(load_experiment(_open(storage_uri), name), metric, mode, top), metric)


@main.command(name="list")
@storage_option
def list_command(storage):
    """List the experiments in the storage, oldest first."""
    from .results import list_experiments

    render.experiments(_open(storage).uri, list_experiments(_open(storage)))


@main.command()
@click.argument("name", required=False)
@storage_option
def status(name, storage):
    """Trials by state, iterations done and the best so far of experiment NAME (default: newest)."""
    from .results import best_trials, load_experiment, status_counts

    experiment = load_experiment(_open(storage), name)
    metric, mode = experiment.record["metric"], experiment.record.get("mode")
    best = best_trials(experiment, metric, mode, 1) if any(metric in t.metrics for t in experiment.trials) else []
    render.status(experiment, status_counts(experiment), best[0] if best else None)


@main.command()
@click.argument("name", required=False)
@storage_option
@click.option("--metric", default="test_loss", show_default=True, help=METRIC_HELP)
@click.option("--mode", default=None, type=click.Choice(["min", "max"]), help=MODE_HELP)
@click.option("--top", default=5, show_default=True, type=click.IntRange(1))
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the best trials as JSON: config, metrics, status, checkpoint and heatmap addresses.",
)
def best(name, storage, metric, mode, top, as_json):
    """The best trials of experiment NAME (default: the newest) by --metric."""
    if as_json:
        from .results import best_document, load_experiment

        click.echo(json.dumps(best_document(load_experiment(_open(storage), name), metric, mode, top), indent=2))
    else:
        _print_best(name, storage, metric, mode, top)


@main.command()
@click.argument("name", required=False)
@storage_option
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write every trial's last metrics as CSV.")
def results(name, storage, csv_path):
    """Every trial of experiment NAME (default: the newest) with its config and last metrics."""
    from .results import load_experiment, results_rows
    from .table import use_snapshot_formed_at

    experiment = load_experiment(_open(storage), name)
    use_snapshot_formed_at(experiment)
    if csv_path:
        _write_csv(csv_path, *results_rows(experiment))
    else:
        render.results(experiment)


@main.command()
@click.argument("name", required=False)
@storage_option
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.pass_context
def resume(ctx, name, storage, address):
    """Finish an interrupted sweep NAME (default: the newest): unfinished and errored trials continue from their
    checkpoints."""
    from .driver import SweepInterrupted
    from .plan import load_plan
    from .progress import ProgressCallback
    from .runner import resume_sweep

    plan = load_plan(name, storage)
    progress = ProgressCallback(plan.launch.metric, plan.launch.mode, plan.launch.max_iterations, plan.trial_count)
    try:
        resume_sweep(plan, [progress], log_line=console.print, verbose=ctx.find_root().params["verbose"],
                     address=address)
    except SweepInterrupted:
        progress.summarize_interrupted()
        raise
    _print_closing(plan)


@main.command(help=f"""The head atlas: every head's scores, ablation and labels.

\b
--history: every head's scores at every iteration (over tokens_seen).
--tokens:  the token tables of circuits.json (OV, layer-0 QK, skip-trigrams, bigrams).

{SOURCE_HELP}""")
@click.argument("source", required=False)
@source_options
@at_options
@click.option("--history", is_flag=True, help="Every head's scores at every iteration of the run.")
@click.option("--tokens", is_flag=True, help="What each head does in tokens, read from the weights.")
@click.option(
    "--head", "only_head", default=None, metavar="L.H", help="With --tokens or --history: one head, e.g. 1.0."
)
@click.option(
    "--matters-threshold",
    type=float,
    default=None,
    help="Relabel `matters`: heads whose ablation raises a loss by more (nats) [default: as trained, 0.05].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the document as JSON.")
def heads(source, trial, storage, at_step, at_tokens, history, tokens, only_head, matters_threshold, as_json):
    import tempfile

    from .results import head_history, local_checkpoint

    address = _address(at_step, at_tokens)
    if history and address is not None:
        raise UserError("--history covers the whole run; --step and --tokens-seen pick one snapshot")
    if history and tokens:
        raise UserError("--history and --tokens are separate views; pick one")
    if only_head is not None and not _is_head(only_head):
        raise UserError(f"--head {only_head!r} must look like LAYER.HEAD, e.g. 1.0")
    if history:
        title, rows = head_history(source, trial, _open(storage))
        render.history(title, rows, only_head, as_json)
        return
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint, title = local_checkpoint(source, trial, _open(storage), workdir, address)
        name = "circuits.json" if tokens else "heads.json"
        if address is not None:  # a snapshot holds weights only: measure it now, on the run's own data
            from model.measures import checkpoint_document

            document = checkpoint_document(checkpoint, "circuits" if tokens else "heads")
        elif not (checkpoint / name).is_file():
            raise UserError(f"{checkpoint} has no {name}; it was written by an older version")
        else:
            document = json.loads((checkpoint / name).read_text())
    if tokens:
        render.tokens(title, document, only_head, as_json)
        return
    from model.metrics import current_labels, label_matters

    document = current_labels(document) if matters_threshold is None else label_matters(document, matters_threshold)
    render.as_json(document) if as_json else render.heads(document, title)


def _run_prompt(checkpoint: Path) -> str:
    """The heatmap prompt of the run a checkpoint came from: the repeat task's own, else the default."""
    from model.analysis import AnalysisConfig, repeat_prompt

    data = json.loads((checkpoint / "config.json").read_text()).get("data", {})
    return repeat_prompt(data.get("repeat_vocab", 64)) if data.get("dataset") == "repeat" else AnalysisConfig.prompt


def _is_head(text: str) -> bool:
    layer, dot, head = text.partition(".")
    return bool(dot) and layer.isdigit() and head.isdigit()


@main.command(help=f"Copy a checkpoint's attention heatmaps to OUT, or render new ones for --prompt.\n\n{SOURCE_HELP}")
@click.argument("source", required=False)
@source_options
@at_options
@click.option("--prompt", default=None, help="Render new heatmaps for this prompt instead of copying the stored ones "
              "[default at a snapshot: the prompt the run was trained with].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("heatmaps"), show_default=True)
def heatmaps(source, trial, storage, at_step, at_tokens, prompt, out):
    import shutil
    import tempfile

    from .results import local_checkpoint

    with tempfile.TemporaryDirectory() as workdir:
        address = _address(at_step, at_tokens)
        checkpoint, title = local_checkpoint(source, trial, _open(storage), workdir, address)
        if prompt is None and address is not None:
            prompt = _run_prompt(checkpoint)
        if prompt is None:
            if not (checkpoint / "heatmaps").is_dir():
                raise UserError(f"{checkpoint} has no heatmaps/; pass --prompt to render them")
            shutil.copytree(checkpoint / "heatmaps", out, dirs_exist_ok=True)
            if not list(out.glob("*.png")) and (out / "patterns.json").is_file():
                from model.analysis import png_heatmaps  # a checkpoint between heatmap renders

                for file, png in png_heatmaps(json.loads((out / "patterns.json").read_text())).items():
                    (out / file).write_bytes(png)
        else:
            from model.analysis import AnalysisConfig, render_heatmaps
            from model.checkpoint import load_checkpoint, load_checkpoint_tokenizer

            net = load_checkpoint(checkpoint)
            tokenizer = load_checkpoint_tokenizer(checkpoint)
            try:
                render_heatmaps(net, tokenizer, out, AnalysisConfig(prompt=prompt))
            except ValueError as error:
                raise UserError(str(error)) from None
    console.print(f"heatmaps of {title} in {out}/: {len(list(out.glob('*.png')))} images")


@main.command(help="Export a checkpoint or snapshot for TransformerLens (3.x HookedTransformer, 4.x TransformerBridge)."
                   f"\n\n{SOURCE_HELP}")
@click.argument("source", required=False)
@source_options
@at_options
@click.option(
    "--format", "export_format", type=click.Choice(["transformer-lens"]), default="transformer-lens", show_default=True
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write.")
def export(source, trial, storage, at_step, at_tokens, export_format, out):
    import tempfile

    from model.checkpoint import load_checkpoint
    from model.export import export_transformer_lens

    from .results import local_checkpoint

    with tempfile.TemporaryDirectory() as workdir:
        checkpoint, title = local_checkpoint(source, trial, _open(storage), workdir, _address(at_step, at_tokens))
        net = load_checkpoint(checkpoint)
        written = export_transformer_lens(net, out, checkpoint / "tokenizer.json")
    console.print(f"{title}: wrote " + ", ".join(str(p) for p in written))


@main.command()
@click.argument("source", required=False)
@storage_option
@click.option("--trial", default=None, help="One trial's snapshots, each listed [default: a line per trial].")
@click.option("--json", "as_json", is_flag=True, help="Print every trial's snapshots as JSON.")
def snapshots(source, storage, trial, as_json):
    """The stored snapshots of experiment SOURCE (default: the newest) or of a `sweep train` run folder.

    \b
    sweep snapshots induction-run --trial 5a2b1_00001
    sweep heads induction-run --trial 5a2b1_00001 --step 1024
    """
    from .results import choose_trial, load_experiment, names_a_path
    from .trajectory import run_folder_snapshots, snapshot_rows

    if names_a_path(source):
        listed = {str(source): run_folder_snapshots(Path(source))}
        title = str(source)
    else:
        experiment = load_experiment(_open(storage), source)
        chosen = [choose_trial(experiment, trial)] if trial else experiment.trials
        listed, title = {t.trial_id: t.snapshots for t in chosen}, experiment.name
    if as_json:
        render.as_json({"source": title, "trials": {k: snapshot_rows(v) for k, v in listed.items()}})
    else:
        render.snapshots(listed, title)


@main.command()
@click.argument("name", required=False)
@storage_option
@click.option("--what", default="loss,scores", show_default=True,
              help="Measures to compute, comma-separated: loss, scores, ablation, composition, llc, "
              "circuit (circuit:induction; circuit:text), or all; "
              "or llc-calibrate: the LLC's eps x gamma calibration on one snapshot (printed, not stored).")
@click.option("--trials", default="", help="Trial ids, comma-separated [default: every trial].")
@click.option("--step", type=int, default=None, help="With llc-calibrate: the snapshot's step [default: the last].")
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.pass_context
def analyse(ctx, name, storage, what, trials, step, address):
    """Measure every stored snapshot of experiment NAME (default: the newest) as Ray tasks, into its analysis table.

    Only what the table lacks is computed: run it again after an interruption, or with a
    new measure to backfill a finished sweep. The table is Parquet in NAME/analysis/:

    \b
    import pyarrow.dataset as ds
    table = ds.dataset("~/sweep-results/NAME/analysis").to_table().to_pandas()
    """
    from model.measures import parse_measures

    from .analyse import choose_trials
    from .table import table_path

    if what == "llc-calibrate":
        return _calibrate_llc(name, storage, trials, step)
    if step is not None:
        raise UserError("--step goes with --what llc-calibrate; the measures run on every snapshot")
    measures = parse_measures(what)
    experiment = _experiment_with(storage, name, "snapshots")
    chosen = choose_trials(experiment, tuple(t for t in trials.split(",") if t))
    if not any(t.snapshots for t in chosen):
        raise UserError(f"{experiment.name} has no snapshots to analyse "
                        "(launched with --snapshots none, or before snapshots existed)")
    counts = _analyse_with_progress(experiment, measures, chosen, address, ctx.find_root().params["verbose"],
                                    f"analysing {experiment.name}")
    if not counts["tasks"]:
        console.print(f"{experiment.name}: the analysis table already holds {', '.join(measures)} for every snapshot; "
                      "nothing to compute")
        return
    console.print(f"{experiment.name}: measured {counts['done']} snapshots ({', '.join(counts['measures'])}), "
                  f"{counts['rows']:,} rows in {experiment.storage.uri_of(table_path(experiment))}")
    if "llc" in counts["measures"]:
        from .stages import store_llc_stages
        from .table import read_table

        store_llc_stages(experiment, read_table(experiment))


PROGRESS_LINE_S = 15.0
"""Seconds between progress lines when stderr is not a terminal (a pipe, a log file)."""


def _experiment_with(storage: str | None, name: str | None, needs: str):
    """Experiment NAME, or without NAME the newest that has what the command needs ("snapshots" or "results"),
    named in the first line when it is not simply the newest."""
    from .results import has_results, has_snapshots, list_experiments, load_experiment, newest_experiment_with

    opened = _open(storage)
    if name:
        return load_experiment(opened, name)
    experiment = newest_experiment_with(opened, {"snapshots": has_snapshots, "results": has_results}[needs], needs)
    if experiment.name != list_experiments(opened)[-1]["name"]:
        console.print(f"experiment {experiment.name}: the newest with {needs}", highlight=False)
    return experiment


def _analyse_with_progress(experiment, measures: tuple[str, ...], trials: list, address, verbose: bool,
                           description: str) -> dict:
    """sweep.analyse.analyse_experiment with a progress bar of snapshots (on a terminal)."""
    from .analyse import analyse_experiment

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} snapshots"),
               TimeElapsedColumn(), TimeRemainingColumn())
    started, said = time.monotonic(), [0.0]

    def line(done: int, total: int) -> None:
        """Piped or redirected: a line on stderr at most every PROGRESS_LINE_S seconds, and the last one."""
        now = time.monotonic()
        if total and (done == total or now - said[0] >= PROGRESS_LINE_S):
            said[0] = now
            console.print(f"{description}: {done}/{total} snapshots, {now - started:.0f} s", highlight=False)

    with Progress(*columns, console=console, disable=not console.is_terminal, transient=True) as progress:
        bar = progress.add_task(description, total=None)

        def report(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)
            if not console.is_terminal:
                line(done, total)

        return analyse_experiment(experiment, measures, trials, address, report, verbose)


def _calibrate_llc(name: str | None, storage: str | None, trials: str, step: int | None) -> None:
    from .results import choose_trial, load_experiment
    from .stages import calibrate_llc

    experiment = load_experiment(_open(storage), name)
    wanted = [t for t in trials.split(",") if t]
    if len(wanted) > 1:
        raise UserError("--what llc-calibrate runs on one trial's snapshot: give one --trials id (or none: the first)")
    trial = choose_trial(experiment, wanted[0]) if wanted else next((t for t in experiment.trials if t.snapshots), None)
    if trial is None:
        raise UserError(f"{experiment.name} has no snapshots to calibrate on")
    with console.status(f"calibrating the LLC on trial {trial.trial_id} (12 settings, about a minute on CPU)"):
        result = calibrate_llc(experiment, trial, step)
    render.calibration(experiment.name, trial.trial_id, result)


@main.command()
@click.argument("name", required=False)
@storage_option
@click.option("--trial", default=None, help="One trial id, or best (by the sweep's metric) [default: every trial].")
@at_options
@click.option("--task", default="induction", show_default=True, help="The task the circuit does: induction, its "
              "copying control, or text (model.tasks.TASKS).")
@click.option("--method", type=click.Choice(["greedy", "acdc"]), default="greedy", show_default=True,
              help="greedy: the shortest prefix by |effect|; acdc: ACDC's pruning, the greedy circuit and their "
              "overlap beside it (computed once a snapshot, as circuit:TASK:acdc).")
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the circuits as JSON.")
@click.pass_context
def circuit(ctx, name, storage, trial, at_step, at_tokens, task, method, address, as_json):
    """The causal circuit of experiment NAME (default: newest): which edges make it, how faithful it is, and in
    which order its edges appeared over training. Every edge is patched alone at every snapshot (path
    patching); what the analysis table lacks is computed first (as `sweep analyse --what circuit:TASK`).

    \b
    sweep circuit induction-run                      # every trial's circuit at its last snapshot
    sweep circuit induction-run --trial 5a2b1_00001  # one trial: edges, effects, order of appearance
    sweep circuit induction-run --trial 5a2b1_00001 --tokens-seen 3612672
    """
    from .circuits import CircuitRequest, circuits_of

    experiment = _experiment_with(storage, name, "snapshots")
    request = CircuitRequest(task, trial, _address(at_step, at_tokens), method)
    verbose = ctx.find_root().params["verbose"]
    document = circuits_of(experiment, request, lambda trials, measures: _analyse_with_progress(
        experiment, measures, trials, address, verbose, f"patching every edge of {experiment.name}"))
    if as_json:
        render.as_json(document)
    elif trial is None:
        render.circuits(document)
    else:
        render.circuit(document)


@main.command()
@click.argument("name", required=False)
@storage_option
@click.option("--trial", default=None, help="One trial [default: every trial].")
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print every trial's stages as JSON.")
@click.pass_context
def stages(ctx, name, storage, trial, address, as_json):
    """Developmental stages of experiment NAME (default: newest): LLC stage boundaries, essential-dynamics
    turning points, and the stage each named circuit formed in.

    What they need that the analysis table lacks (the LLC, head scores and losses at every snapshot) is computed
    first, as `sweep analyse NAME --what loss,scores,llc` would.

    \b
    sweep stages NAME
    """
    from .results import choose_trial
    from .stages import ensure_essential_dynamics, store_llc_stages, trial_stages
    from .table import read_table

    experiment = _experiment_with(storage, name, "snapshots")
    chosen = [choose_trial(experiment, trial)] if trial else experiment.trials
    if not any(t.snapshots for t in chosen):
        raise UserError(f"{experiment.name} has no snapshots to find stages on "
                        "(launched with --snapshots none, or before snapshots existed)")
    verbose = ctx.find_root().params["verbose"]
    _analyse_with_progress(experiment, ("loss", "scores", "llc"), [t for t in chosen if t.snapshots], address, verbose,
                           f"measuring the LLC of {experiment.name}")
    ensure_essential_dynamics(experiment, chosen, address, verbose)
    store_llc_stages(experiment, read_table(experiment))  # kept in the table beside the LLC, for its other readers
    table = read_table(experiment)
    documents = [d for d in trial_stages(experiment, table) if d["trial_id"] in {t.trial_id for t in chosen}]
    if not any(d["llc"] for d in documents):
        raise UserError(f"{experiment.name} has no LLC in its analysis table: "
                        f"run `sweep analyse {experiment.name} --what llc` first")
    if as_json:
        render.as_json({"experiment": experiment.name, "trials": documents})
    else:
        render.stages(experiment.name, documents)


@main.command()
@click.argument("name", required=False)
@storage_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the whole atlas as JSON: trials, groups by axis and by pairs of axes, and the effects of the axes on "
         "every reading (as `sweep effects`).",
)
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write one row per trial as CSV.")
def atlas(name, storage, as_json, csv_path):
    """Which circuits grew where: experiment NAME (default: the newest) over its grid's axes.

    One row per trial (state, losses, heads by label, every head score's max,
    when induction heads formed), then each axis's groups, strongest dependence first.
    """
    from .atlas import atlas_rows_csv, build_atlas
    from .effects import atlas_effects
    from .results import load_experiment

    experiment = load_experiment(_open(storage), name)
    result = build_atlas(experiment)
    if as_json:
        render.as_json(result.document() | {"effects": atlas_effects(result, experiment.record.get("fixed") or {})})
    elif csv_path:
        _write_csv(csv_path, *atlas_rows_csv(result))
    else:
        render.atlas(result)


@main.command()
@click.argument("name", required=False)
@storage_option
@click.option("--reading", default="formed_at", show_default=True,
              help="formed_at, prev_token_formed_at, does_task_from, test_loss, faithfulness, circuit_edges, "
                   "first_stage_end, or appeared:ROLE-EDGE (a role-edge's first appearance).")
@click.option("--json", "as_json", is_flag=True, help="Print the effects, grid points and reference as JSON.")
@click.option("--figure", "figure_path", type=click.Path(path_type=Path), help="Write the effects figure (PNG).")
def effects(name, storage, reading, as_json, figure_path):
    """What the grid changes: experiment NAME's (default: newest) reading per axis value over seeds.

    Each axis value's median over its trials (Kaplan-Meier where some never
    formed) with a 95% bootstrap interval over seeds, and its difference from
    the previous value with an interval: an interval that excludes zero is an
    effect beyond the seeds' noise. Launch with --seeds N for replicates.

    \b
    sweep launch --preset formation && sweep effects --figure effects.png
    sweep effects NAME --reading appeared:"previous_token -> induction.k"
    """
    from .atlas import build_atlas
    from .effects import effects_document, effects_figure

    experiment = _experiment_with(storage, name, "results")
    document = effects_document(build_atlas(experiment), experiment.record.get("fixed") or {}, reading)
    if figure_path:
        _write_whole(figure_path, lambda handle: handle.write(effects_figure(document)), binary=True)
    if as_json:
        render.as_json(document)
    else:
        render.effects(document)


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
    _write_whole(out, lambda handle: handle.write(document))
    console.print(f"report: {out} ({len(document) / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
