"""`lstmlm train`: bars while the corpus is made ready, the effective config as a table, progress
and samples as training goes, the perplexity chart and the result at the end; or JSON lines
with --json."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..config import Config
from ..data.text import bits_abbreviation, token_unit
from ..events import Baselined, EpochEnded, Evaluated, Event, Finished, Noted, Sampled, Started, Stepped, Warned
from ..runs import DEFAULT_RUNS_DIR
from . import options
from .console import corpus_progress, err, out, print_json, visible
from .shared import baselines_line, clock, short_count, two_columns

if TYPE_CHECKING:
    from ..baselines import Baselines
    from ..data.pipeline import Data
    from ..training import Chosen

STEP_BAR_MIN_BATCHES = 50  # epochs this long get a bar within the epoch too
JSON_EVENTS: dict[type, str] = {Baselined: "baselines", Noted: "note", Warned: "warning", EpochEnded: "epoch", Evaluated: "eval"}  # --json's lines


@options.with_config_options
def train(
    config_file: options.ConfigFile = None,
    run: options.Run = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run (default: the latest) from its last checkpoint.")] = False,
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
    as_json: options.Json = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show every setting at the start, not only those this run chose.")] = False,
    **overrides: Any,
) -> None:
    """Train a character-level LSTM (or GRU, or RNN: --cell); prints perplexity as it falls, its baselines, and samples at the end
    (with --json: a JSON line for the baselines, per epoch and validation, per note and warning, and a last 'done')."""
    from .. import baselines
    from .. import training as trainings
    from ..distributed import from_environment, launcher
    from ..runs import resume_command
    from .chart import perplexity_chart

    shows = from_environment().is_main  # under torchrun only rank 0 shows anything
    with corpus_progress() if shows else contextlib.nullcontext() as progress:
        plan = trainings.plan(runs_dir, run, overrides, config_file, resume, progress)
    if shows:
        warn_about(plan.data)
    notes = [recipe_line(plan.recipe, len(plan.data.train), len(plan.data.vocab), plan.config.train.max_minutes)] if plan.recipe is not None else []
    notes += [f"precision {plan.precision.precision}: {plan.precision.reason}"] if plan.precision is not None else []
    for note in notes if shows else ():
        if as_json:
            print_json({"event": "note", "message": note})
        else:
            out.print(note, soft_wrap=True, markup=False)
    stop = trainings.StopFlag()
    with trainings.start(plan) as training, stop.installed():
        if not training.world.is_main:  # only rank 0 shows anything
            for _ in training.run(stop):
                pass
            return
        done = render(training.config, training.run(stop), as_json, None if verbose else plan.chosen_keys, runs_dir)
        metrics = training.store.read_metrics()
    if not as_json and done.epochs > 1:
        out.print(perplexity_chart(metrics, width=min(out.width, 100), height=10, baselines=baselines.read(training.store.root)))
    report(done, as_json, token_unit(training.config.data.normalize))
    if done.reason == "interrupted":
        command = resume_command(done.run, runs_dir, overrides, launcher(training.world))  # a command that works as is
        err.print(f"stopped: checkpoint saved; continue with: {visible(command)}", markup=False, soft_wrap=True)
        raise typer.Exit(128 + (stop.signal or signal.SIGINT))


def warn_about(data: Data) -> None:
    """One line for each file of the corpus that was skipped, their count at the end, and any
    other warning (the token store could not be cached, say): on stderr, with --json too."""
    for skipped in data.skipped:
        err.print(f"warning: skipped {skipped.path}: {skipped.reason}", markup=False, highlight=False, soft_wrap=True)
    if data.skipped:
        total = sum(s.size for s in data.skipped)
        err.print(f"warning: skipped {len(data.skipped):,} file(s), {total:,} bytes (--strict refuses them instead)", markup=False, soft_wrap=True)
    for warning in data.warnings:
        err.print(f"warning: {warning}", markup=False, soft_wrap=True)


def recipe_line(chosen: Chosen, tokens: int, vocab: int, minutes: float) -> str:
    """What the default recipe chose and for what (the whole config follows in the table)."""
    r, first = chosen.recipe, chosen.first
    timed = f"{chosen.probe_tokens_per_s:,.0f} tokens/s (the probe)"
    if first is not None:
        timed += f", {chosen.first_tokens_per_s:,.0f} for the {first.layers}×{first.hidden} that gave (as fast as the probe at {chosen.tokens_per_s:,.0f})"
    text = (
        f"default recipe for {short_count(tokens)} training tokens of {vocab} symbols, {minutes:g} min at {timed}: "
        f"{r.layers}×{r.hidden}, embedding {r.embedding}, {r.parameters:,} parameters, batches {r.batch_size}×{r.num_steps}, "
        f"{r.optimizer} lr {r.lr:g} {r.schedule}, dropout {r.dropout:g}, state reset every {r.reset_every} batches; about {r.epochs:.2g} epochs"
    )
    return text + (f" (given instead: {', '.join(chosen.given)})" if chosen.given else "")


ALWAYS_SHOWN = ("corpus", "model", "cell")  # what any run is, chosen or not


def config_table(cfg: Config, started: Started, shown: Collection[str] | None = None, runs_dir: Path = DEFAULT_RUNS_DIR) -> Table:
    """The run's settings — those in `shown` (what the options, the file or the recipe chose),
    or all of them — and what it trains on."""
    settings = [(k, v) for section in cfg.to_dict().values() for k, v in section.items()]
    rows = [(k, escape(visible(shown_corpus(v) if k == "corpus" else str(v)))) for k, v in settings if shown is None or k in shown or k in ALWAYS_SHOWN]
    rows += [
        ("parameters", f"{started.num_params:,}"),
        ("vocab", str(started.vocab_size)),
        ("train tokens", f"{started.train_tokens:,}"),
        ("val tokens", f"{started.val_tokens:,}"),
        ("batches/epoch", str(started.batches_per_epoch)),
        ("on", escape(f"{started.device} {started.precision}")),
    ]
    table = two_columns(rows, title=f"run [bold]{escape(visible(started.run))}[/]")
    hidden = len(settings) - sum(1 for k, _ in settings if k in (shown or ()) or k in ALWAYS_SHOWN)
    if shown is not None and hidden:
        table.caption = f"[dim]the other {hidden} settings: {escape(visible(str(runs_dir / started.run / 'config.json')))}, or --verbose[/]"
    return table


def shown_corpus(corpus: str) -> str:
    """The corpus's path (kept absolute) as typed, likely: from here where it is below here."""
    if not os.path.isabs(corpus):
        return corpus
    below = os.path.relpath(corpus)
    return corpus if below == ".." or below.startswith(".." + os.sep) else below


def epoch_count(done: float, end: float, timed: bool) -> str:
    """'3/500', or by the clock '0.4/~1.6' (an end the time limit sets, estimated)."""
    if not timed:
        return f"{done:.0f}/{end:.0f}"
    return f"{done:.1f}/~{end:.1f}" if end < 10 else f"{done:.0f}/~{end:.0f}"


def render(cfg: Config, events: Iterator[Event], as_json: bool, shown: Collection[str] | None = None, runs_dir: Path = DEFAULT_RUNS_DIR) -> Finished:
    """Show the events: the settings (`shown`, or all), progress bars (the epochs, to the end
    the run will reach; inside a long epoch its tokens, rate and time left), the baselines
    under the first validation (or epoch, without validation text) and samples; or JSON lines
    on stdout."""
    view = TrainView(cfg, as_json, shown, runs_dir)
    with view.progress:
        for event in events:
            if isinstance(event, Finished):
                view.show_baselines(None)  # a training that ended before any figure
                return event
            view.show(event)
    raise AssertionError("training ended without a Finished event")


class TrainView:
    """What the terminal shows of a training, an event at a time (`show`), or its JSON lines."""

    def __init__(self, cfg: Config, as_json: bool, shown: Collection[str] | None, runs_dir: Path) -> None:
        self.cfg, self.as_json, self.shown, self.runs_dir = cfg, as_json, shown, runs_dir
        self.progress = Progress(
            TextColumn("{task.description} {task.fields[count]}"),
            BarColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=err,
            disable=as_json,
        )
        self.unit = bits_abbreviation(token_unit(cfg.data.normalize))
        self.epochs: Any = None  # the bars' tasks
        self.steps: Any = None
        self.last, self.end, self.timed = cfg.train.epochs, float(cfg.train.epochs), False
        self.baselines: Baselines | None = None  # to show, under the first figure they are a reference for

    def show(self, event: Event) -> None:
        if self.as_json:
            name = JSON_EVENTS.get(type(event))
            if name is not None:
                print_json({"event": name, **dataclasses.asdict(event.baselines if isinstance(event, Baselined) else event)})
            return
        if isinstance(event, Baselined):
            self.baselines = event.baselines
        elif isinstance(event, Noted):
            self.progress.console.print(f"[dim]{escape(visible(event.message))}[/]", soft_wrap=True)
        elif isinstance(event, Warned):
            self.progress.console.print(f"[yellow]warning:[/] {escape(visible(event.message))}", soft_wrap=True)
        elif isinstance(event, Evaluated):
            self.show_baselines(event.val_bpc)
        elif isinstance(event, Sampled) and event.epoch < self.cfg.train.epochs:
            self.progress.console.print(f"[dim]epoch {event.epoch}[/] {escape(visible(event.text))}", soft_wrap=True)  # as the model wrote it
        elif isinstance(event, Started):
            out.print(config_table(self.cfg, event, self.shown, self.runs_dir))
            self._advance(event)
        elif isinstance(event, (Stepped, EpochEnded)):
            self._advance(event)
            if isinstance(event, EpochEnded) and self.baselines is not None and self.baselines.text == "training":
                self.show_baselines(math.log2(event.train_perplexity))

    def _advance(self, event: Started | Stepped | EpochEnded) -> None:
        """The bars: the epochs to the end the run will reach, and the steps of a long epoch."""
        progress = self.progress
        if isinstance(event, Started):
            self.last, self.end, self.timed = event.epochs, float(event.epochs), self.cfg.train.max_minutes > 0
            at_start = epoch_count(event.start_epoch, self.last, self.timed)
            self.epochs = progress.add_task("epoch", total=self.last, completed=event.start_epoch, stats="", count=at_start)
            if event.batches_per_epoch >= STEP_BAR_MIN_BATCHES:
                self.steps = progress.add_task("step", total=event.batches_per_epoch, stats="", count="")
        elif isinstance(event, Stepped):
            if self.timed:  # the end the clock sets, from this epoch's rate
                done, self.end = event.epoch - 1 + event.step / max(1, event.batches), event.epochs_reached(self.last, self.cfg.train.max_minutes)
                progress.update(self.epochs, completed=done, total=self.end, count=epoch_count(done, self.end, self.timed))
            if self.steps is not None:
                progress.update(self.steps, completed=event.step, total=event.batches, stats=within_epoch(event), count=f"{event.step}/{event.batches}")
        else:
            val = f"  val {event.val_perplexity:.3f} ({event.val_bpc:.3f} {self.unit})" if event.val_perplexity else ""
            stats = f"ppl {event.train_perplexity:.3f}{val}  {event.tokens_per_s:,.0f} tok/s"
            self.end = max(self.end, event.epoch)
            progress.update(self.epochs, completed=event.epoch, total=self.end, stats=stats, count=epoch_count(event.epoch, self.end, self.timed))

    def show_baselines(self, model: float | None) -> None:
        """The baselines line, once, beside the model's figure on the same text."""
        b, self.baselines = self.baselines, None
        if b is not None:
            on = "the validation text" if b.text == "validation" else "the training text (in-sample: this run has no validation text)"
            self.progress.console.print(baselines_line(b, b.unit, on, model), soft_wrap=True, markup=False)


def within_epoch(step: Stepped) -> str:
    """'12.3M/1.0G tokens  7,700 tok/s  epoch ends in 1:02:03'."""
    text = f"{short_count(step.tokens)}/{short_count(step.epoch_tokens)} tokens  {step.tokens_per_s:,.0f} tok/s"
    if step.tokens_per_s > 0:
        text += f"  epoch ends in {clock((step.epoch_tokens - step.tokens) / step.tokens_per_s)}"
    return text


def report(done: Finished, as_json: bool, unit: str = "character") -> None:
    if as_json:
        print_json({"event": "done", **dataclasses.asdict(done)})
        return
    if done.reason == "early_stop":
        out.print(f"early stop after epoch {done.epochs}: validation stopped improving")
    if done.reason == "time_limit":
        out.print(f"time limit reached after epoch {done.epochs}")
    out.print(f"perplexity {done.perplexity:.1f}, {done.tokens_per_s:.1f} tokens/sec on {escape(done.device)}")
    if done.val_perplexity is not None:
        out.print(f"validation perplexity {done.val_perplexity:.3f}, {math.log2(done.val_perplexity):.3f} bits per {unit}")
    if done.best_val_perplexity is not None and done.best_val_perplexity != done.val_perplexity:
        out.print(f"best validation perplexity {done.best_val_perplexity:.3f} (best.pt)")
    for text in done.samples.values():
        out.print(escape(visible(text)), soft_wrap=True)
