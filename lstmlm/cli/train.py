"""`lstmlm train`: the effective config as a table, progress and samples as training goes, the
perplexity chart and the result at the end; or JSON lines with --json."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import signal
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..config import Config
from ..events import EpochEnded, Evaluated, Event, Finished, Sampled, Started, Stepped
from ..runs import DEFAULT_RUNS_DIR
from . import options
from .console import download_bar, err, out, print_json, visible

STEP_BAR_MIN_BATCHES = 50  # epochs this long get a bar within the epoch too


@options.with_config_options
def train(
    config_file: options.ConfigFile = None,
    run: options.Run = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run (default: the latest) from its last checkpoint.")] = False,
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON lines: one per epoch and a last 'done'.")] = False,
    **overrides: Any,
) -> None:
    """Train a character-level LSTM; prints perplexity as it falls and samples at the end."""
    from .. import session
    from ..plot import perplexity_chart

    with corpus_download_progress() as progress:
        plan = session.prepare_training(runs_dir, run, overrides, config_file, resume, progress)
    stop = session.StopFlag()
    with session.training(plan) as training, stop.installed():
        if not training.world.is_main:  # only rank 0 shows anything
            for _ in training.run(stop):
                pass
            return
        done = render(training.config, training.run(stop), as_json)
        metrics = training.store.read_metrics()
    if not as_json and done.epochs > 1:
        out.print(perplexity_chart(metrics, width=min(out.width, 100), height=10))
    report(done, as_json)
    if done.reason == "interrupted":
        command = session.resume_command(done.run, runs_dir, overrides)  # a command that works as is
        err.print(f"stopped: checkpoint saved; continue with: {visible(command)}", markup=False, soft_wrap=True)
        raise typer.Exit(128 + (stop.signal or signal.SIGINT))


@contextlib.contextmanager
def corpus_download_progress() -> Iterator[Callable[[int, int | None], None] | None]:
    """A bar that shows only if the corpus has to be downloaded; none in a log or a pipe, where a
    bar is noise (and Rich leaves a blank line there, before any error line)."""
    if not err.is_terminal:
        yield None
        return
    with download_bar() as bar:
        task = bar.add_task("downloading the corpus", total=None, visible=False)
        yield lambda done, total: bar.update(task, completed=done, total=total, visible=True)


def config_table(cfg: Config, started: Started) -> Table:
    table = Table(title=f"run [bold]{escape(visible(started.run))}[/]", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    table.add_column(style="dim")
    table.add_column()
    rows = [(k, escape(visible(str(v)))) for section in cfg.to_dict().values() for k, v in section.items()]
    rows += [
        ("parameters", f"{started.num_params:,}"),
        ("vocab", str(started.vocab_size)),
        ("train tokens", f"{started.train_tokens:,}"),
        ("val tokens", f"{started.val_tokens:,}"),
        ("batches/epoch", str(started.batches_per_epoch)),
        ("on", escape(f"{started.device} {started.precision}")),
    ]
    half = (len(rows) + 1) // 2
    for left, right in itertools.zip_longest(rows[:half], rows[half:], fillvalue=("", "")):
        table.add_row(*left, *right)
    return table


def render(cfg: Config, events: Iterator[Event], as_json: bool) -> Finished:
    """Show the events: a progress bar and samples, or JSON lines on stdout."""
    progress = Progress(
        TextColumn("{task.description} {task.completed:.0f}/{task.total:.0f}"),
        BarColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        console=err,
        disable=as_json,
    )
    epochs: Any = None
    steps = None
    with progress:
        for event in events:
            if isinstance(event, Started):
                if not as_json:
                    out.print(config_table(cfg, event))
                epochs = progress.add_task("epoch", total=event.epochs, completed=event.start_epoch, stats="")
                if event.batches_per_epoch >= STEP_BAR_MIN_BATCHES:
                    steps = progress.add_task("step", total=event.batches_per_epoch, stats="")
            elif isinstance(event, Stepped) and steps is not None:
                progress.update(steps, completed=event.step)
            elif isinstance(event, EpochEnded):
                val = f"  val {event.val_perplexity:.3f} ({event.val_bpc:.3f} bpc)" if event.val_perplexity else ""
                progress.update(epochs, completed=event.epoch, stats=f"ppl {event.train_perplexity:.3f}{val}  {event.tokens_per_s:,.0f} tok/s")
                if as_json:
                    print_json({"event": "epoch", **dataclasses.asdict(event)})
            elif isinstance(event, Evaluated) and as_json:
                print_json({"event": "eval", **dataclasses.asdict(event)})
            elif isinstance(event, Sampled) and not as_json and event.epoch < cfg.train.epochs:
                progress.console.print(f"[dim]epoch {event.epoch}[/] {escape(visible(event.text))}")
            elif isinstance(event, Finished):
                return event
    raise AssertionError("training ended without a Finished event")


def report(done: Finished, as_json: bool) -> None:
    if as_json:
        print_json({"event": "done", **dataclasses.asdict(done)})
        return
    if done.reason == "early_stop":
        out.print(f"early stop after epoch {done.epochs}: validation stopped improving")
    if done.reason == "time_limit":
        out.print(f"time limit reached after epoch {done.epochs}")
    out.print(f"perplexity {done.perplexity:.1f}, {done.tokens_per_s:.1f} tokens/sec on {escape(done.device)}")
    if done.val_perplexity is not None:
        out.print(f"validation perplexity {done.val_perplexity:.3f}, {math.log2(done.val_perplexity):.3f} bits per character")
    if done.best_val_perplexity is not None and done.best_val_perplexity != done.val_perplexity:
        out.print(f"best validation perplexity {done.best_val_perplexity:.3f} (best.pt)")
    for text in done.samples.values():
        out.print(escape(visible(text)), soft_wrap=True)
