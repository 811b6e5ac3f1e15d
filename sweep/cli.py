"""The `sweep` command line: thin Click commands over library functions."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from model.config import ConfigError, DataConfig, TrainConfig
from model.train import CheckpointError, NonFiniteLossError

console = Console(stderr=True, soft_wrap=True)
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


def data_config(dataset: str, **values) -> DataConfig:
    return DataConfig(dataset=dataset, **{k: values[k] for k in ("tokenizer", "text_column", "train_split", "test_split", "clean", "pack")})


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

        metrics = run_training(data_config(dataset, **data_values), model_values, train_cfg, out, AnalysisConfig(prompt=prompt, seed=seed), on_iteration, log=console.print)
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
    from model.tokenizers import TextTokenizer, tokenizer_from_path
    from model.train import load_checkpoint

    net = load_checkpoint(checkpoint)
    tokenizer = TextTokenizer(tokenizer_from_path(checkpoint / "tokenizer.json"), "checkpoint")
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt is empty after tokenization; give some text")
    click.echo(tokenizer.decode(sample(net, prompt_ids, tokens, top_k, seed)))


if __name__ == "__main__":
    sys.exit(main())
